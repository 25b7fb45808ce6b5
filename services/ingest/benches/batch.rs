//! Parsing request bodies into events: a JSON array and NDJSON of 100 events, as
//! `POST /v1/streams/{stream}/events` does per request.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

fn bench(c: &mut Criterion) {
    let events: Vec<serde_json::Value> = (0..100)
        .map(|n| json!({"userId": format!("user-{n}"), "page": "/products/42", "ms": n}))
        .collect();
    let array = serde_json::to_vec(&events).expect("json");
    let ndjson: Vec<u8> = events
        .iter()
        .flat_map(|e| {
            let mut line = e.to_string().into_bytes();
            line.push(b'\n');
            line
        })
        .collect();
    let mut group = c.benchmark_group("batch parsing");
    group.throughput(Throughput::Elements(100));
    group.bench_function("JSON array of 100", |b| {
        b.iter(|| sluice_ingest::input::parse(std::hint::black_box(&array), false, 10_000));
    });
    group.bench_function("NDJSON of 100", |b| {
        b.iter(|| sluice_ingest::input::parse(std::hint::black_box(&ndjson), true, 10_000));
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
