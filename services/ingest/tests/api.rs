//! The HTTP API in process, against the real Kafka and Redis of the stack.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sluice_core::StreamSettings;
use sluice_ingest::{App, Args, router};
use sluice_testkit::{Pipeline, Stack, json_of, read_topic, unique};
use tower::ServiceExt;

async fn app_for(stack: &Stack, pipeline: &Pipeline) -> App {
    let mut args = Args::new(
        pipeline.settings_path.clone(),
        stack.kafka(),
        stack.redis_url.clone(),
    );
    args.key_prefix = pipeline.key_prefix.clone();
    args.max_body_bytes = 1024;
    App::connect(&args).await.expect("ingest starts")
}

async fn call(app: &App, method: &str, uri: &str, body: &str) -> (StatusCode, String, Value) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .expect("request");
    let response = router(app.clone())
        .oneshot(request)
        .await
        .expect("response");
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, content_type, json)
}

#[tokio::test]
async fn bad_requests_get_problems_and_nothing_reaches_kafka() {
    let stack = Stack::from_env();
    let stream = StreamSettings::new(unique("orders"));
    let topic = stream.topic().to_owned();
    let name = stream.name.clone();
    let pipeline = Pipeline::create(&stack, vec![stream])
        .await
        .expect("pipeline");
    let app = app_for(&stack, &pipeline).await;
    let events = format!("/v1/streams/{name}/events");

    let (status, content_type, problem) = call(&app, "POST", &events, r#"{"total": 12,"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(
        problem["type"],
        "https://sluice.dev/problems/malformed-json"
    );
    assert_eq!(problem["status"], 400);
    let detail = problem["detail"].as_str().expect("detail");
    assert!(
        detail.contains("not valid JSON") && detail.contains("line 1"),
        "{detail}"
    );

    let (status, _, problem) = call(&app, "POST", &events, "[1, 2]").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["type"], "https://sluice.dev/problems/not-an-object");

    let (status, content_type, problem) = call(
        &app,
        "POST",
        "/v1/streams/no-such-stream/events",
        r#"{"a": 1}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(
        problem["type"],
        "https://sluice.dev/problems/unknown-stream"
    );
    assert!(
        problem["detail"]
            .as_str()
            .expect("detail")
            .contains("no-such-stream")
    );

    let big = format!(r#"{{"pad": "{}"}}"#, "x".repeat(2048));
    let (status, _, problem) = call(&app, "POST", &events, &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(problem["status"], 413);

    // A good event after the bad ones must be the only record on the topic.
    let (status, _, accepted) = call(&app, "POST", &events, r#"{"total": 12}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let records = read_topic(&stack, &topic).await.expect("read topic");
    assert_eq!(records.len(), 1, "only the good event reached Kafka");
    let value = json_of(&records[0]).expect("json");
    assert_eq!(value["id"], accepted["id"]);
    assert_eq!(value["payload"], json!({"total": 12}));
}

#[tokio::test]
async fn accepted_events_carry_id_partition_offset_and_key() {
    let stack = Stack::from_env();
    let mut stream = StreamSettings::new(unique("chat"));
    stream.partitions = 3;
    stream.key = Some("/touser".into());
    let name = stream.name.clone();
    let topic = stream.topic().to_owned();
    let pipeline = Pipeline::create(&stack, vec![stream])
        .await
        .expect("pipeline");
    let app = app_for(&stack, &pipeline).await;
    let events = format!("/v1/streams/{name}/events");

    let mut partitions = Vec::new();
    for n in 0..3 {
        let body = json!({"fromuser": format!("u{n}"), "touser": "bob", "msg": "hi"}).to_string();
        let (status, _, accepted) = call(&app, "POST", &events, &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        assert!(accepted["id"].as_str().is_some_and(|id| !id.is_empty()));
        assert!(accepted["offset"].as_i64().is_some());
        partitions.push(accepted["partition"].as_i64().expect("partition"));
    }
    // One key, one partition: the order of bob's messages holds.
    assert!(
        partitions.windows(2).all(|w| w[0] == w[1]),
        "{partitions:?}"
    );

    let (status, _, problem) = call(&app, "POST", &events, r#"{"fromuser": "ann"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["type"], "https://sluice.dev/problems/missing-key");

    let records = read_topic(&stack, &topic).await.expect("read topic");
    assert_eq!(records.len(), 3);
    for r in &records {
        assert_eq!(rdkafka::Message::key(r), Some(&b"bob"[..]));
    }
}

#[tokio::test]
async fn unknown_records_and_paths_are_404_problems() {
    let stack = Stack::from_env();
    let stream = StreamSettings::new(unique("visit"));
    let name = stream.name.clone();
    let pipeline = Pipeline::create(&stack, vec![stream])
        .await
        .expect("pipeline");
    let app = app_for(&stack, &pipeline).await;

    let (status, _, problem) = call(
        &app,
        "GET",
        &format!("/v1/streams/{name}/records/absent-id"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        problem["type"],
        "https://sluice.dev/problems/record-not-found"
    );

    let (status, _, problem) = call(&app, "GET", "/v2/whatever", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(problem["type"], "https://sluice.dev/problems/no-route");

    let (status, _, health) = call(&app, "GET", "/healthz", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
}
