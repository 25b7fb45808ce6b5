//! The event envelope's hot path: encoding an event for Kafka (value and headers) as ingest
//! does per event, and decoding it as a collector does per record.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rdkafka::message::OwnedHeaders;
use serde_json::json;
use sluice_core::Envelope;

fn envelope() -> Envelope {
    let mut e = Envelope::new(
        "visit",
        Some("user-17".to_owned()),
        json!({"userId": "user-17", "page": "/products/42", "ms": 1234, "tags": ["a", "b"]}),
    );
    e.headers.insert(
        "traceparent".to_owned(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
    );
    e
}

fn bench(c: &mut Criterion) {
    let e = envelope();
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode value + headers", |b| {
        b.iter(|| (std::hint::black_box(&e).encode_value(), e.kafka_headers()));
    });
    let value = e.encode_value();
    let headers: OwnedHeaders = e.kafka_headers();
    group.bench_function("decode", |b| {
        b.iter(|| Envelope::decode(Some(std::hint::black_box(&value[..])), Some(&headers)));
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
