//! One trace from the HTTP request through Kafka to the sink write, with real Kafka and
//! Redis and an in-memory span exporter.

mod common;

use std::time::Duration;

use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use rdkafka::message::Headers;
use serde_json::{Value, json};
use sluice_core::StreamSettings;
use sluice_ingest::{App, run};
use sluice_testkit::{Pipeline, Stack, read_topic, unique, wait_for};
use tokio_util::sync::CancellationToken;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test]
async fn the_trace_follows_an_event_from_http_through_kafka_to_redis() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _telemetry = sluice_core::telemetry::init_with(provider.clone(), "sluice-test", "info");

    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("traced"));
    let (name, topic) = (s.name.clone(), s.topic().to_owned());
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let args = common::args(&stack, &pipeline);
    let app = App::connect(&args).await.expect("ingest");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let stop = CancellationToken::new();
    tokio::spawn(run(listener, app, stop.clone()));
    common::spawn_collector(&stack, &pipeline, &stop);

    let client = reqwest::Client::new();
    let answer: Value = client
        .post(format!("{base}/v1/streams/{name}/events"))
        .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
        .json(&json!({"n": 1}))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let id = answer["id"].as_str().expect("id").to_owned();

    // The Kafka record carries the same trace.
    let records = read_topic(&stack, &topic).await.expect("topic");
    let traceparent = rdkafka::Message::headers(&records[0])
        .and_then(|h| h.iter().find(|h| h.key == "traceparent"))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("traceparent header");
    assert!(
        traceparent.starts_with(&format!("00-{TRACE_ID}-")),
        "{traceparent}"
    );
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "the header names ingest's span, not the caller's"
    );

    // The collector's write of that event is a span of the same trace.
    let spans = wait_for("the collector's span", Duration::from_secs(60), || {
        let exporter = exporter.clone();
        let id = id.clone();
        async move {
            let spans = exporter.get_finished_spans()?;
            let written = spans.iter().any(|s| {
                s.name == "sink.write"
                    && s.attributes
                        .iter()
                        .any(|kv| kv.key.as_str() == "event.id" && kv.value.as_str() == id)
            });
            Ok(written.then_some(spans))
        }
    })
    .await
    .expect("spans");
    let request = spans
        .iter()
        .find(|s| s.name.starts_with("POST "))
        .expect("request span");
    let write = spans
        .iter()
        .find(|s| s.name == "sink.write")
        .expect("write span");
    assert_eq!(request.span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(write.span_context.trace_id().to_string(), TRACE_ID);
    assert_eq!(request.parent_span_id.to_string(), "00f067aa0ba902b7");
    assert_eq!(
        format!("00-{TRACE_ID}-{}-01", write.parent_span_id),
        traceparent,
        "the write continues from the span named in the Kafka header"
    );
    stop.cancel();
}
