//! The HTTP API in process, against the real Kafka and Redis of the stack.

use crate::common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sluice_core::{Envelope, StreamSettings, store};
use sluice_ingest::{App, router};
use sluice_testkit::{Pipeline, Stack, json_of, produce, read_topic, unique, wait_for};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

async fn app_for(stack: &Stack, pipeline: &Pipeline) -> App {
    let mut args = common::args(stack, pipeline);
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
async fn without_an_exporter_a_callers_traceparent_reaches_the_event_as_it_came() {
    // This binary installs no tracer: nothing records spans, as with the shipped settings
    // and no OTLP endpoint. (tests/trace.rs follows the recorded path.)
    let stack = Stack::from_env();
    let mut stream = StreamSettings::new(unique("traced"));
    // One partition: the records read back in the order they were sent.
    stream.partitions = 1;
    let (name, topic) = (stream.name.clone(), stream.topic().to_owned());
    let pipeline = Pipeline::create(&stack, vec![stream])
        .await
        .expect("pipeline");
    let app = app_for(&stack, &pipeline).await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for traceparent in [Some(parent), None] {
        let mut request = Request::post(format!("/v1/streams/{name}/events"))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = traceparent {
            request = request.header("traceparent", t);
        }
        let response = router(app.clone())
            .oneshot(request.body(Body::from(r#"{"n": 1}"#)).expect("request"))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let records = read_topic(&stack, &topic).await.expect("read topic");
    let traceparents: Vec<Option<String>> = records
        .iter()
        .map(|r| {
            rdkafka::Message::headers(r)
                .and_then(|h| rdkafka::message::Headers::iter(h).find(|h| h.key == "traceparent"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
        .collect();
    assert_eq!(traceparents, vec![Some(parent.to_owned()), None]);
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

    // Health and metrics are on their own port, not the API's.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _, problem) = call(&app, "GET", path, "").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(problem["type"], "https://sluice.dev/problems/no-route");
        let response = sluice_ingest::http::admin_router(app.clone())
            .oneshot(
                Request::builder()
                    .uri(path)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn aggregates_count_what_the_collector_wrote_per_minute_and_per_hour() {
    let stack = Stack::from_env();
    let mut s = StreamSettings::new(unique("agg"));
    s.dimensions = vec!["/page".to_owned()];
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let app = app_for(&stack, &pipeline).await;
    let stop = CancellationToken::new();
    common::spawn_collector(&stack, &pipeline, &stop);

    // Events at known times: three on /a at 10:00, two on /b at 10:01, one on /a at 12:30.
    let sent = [
        ("2026-11-30T10:00:05Z", "/a"),
        ("2026-11-30T10:00:30Z", "/a"),
        ("2026-11-30T10:00:59Z", "/a"),
        ("2026-11-30T10:01:00Z", "/b"),
        ("2026-11-30T10:01:40Z", "/b"),
        ("2026-11-30T12:30:00Z", "/a"),
    ];
    let events: Vec<Envelope> = sent
        .iter()
        .enumerate()
        .map(|(i, (time, page))| {
            let mut e = Envelope::new(&name, None, json!({"page": page}));
            e.id = format!("e{i}");
            e.event_time = time.parse().expect("time");
            e
        })
        .collect();
    produce(&stack, &name, &events).await.expect("produce");

    let hours = format!(
        "/v1/streams/{name}/aggregates?from=2026-11-30T10:00:00Z&to=2026-11-30T13:00:00Z&resolution=hour"
    );
    let by_hour = wait_for(
        "the six events counted",
        Duration::from_secs(60),
        || async {
            let (status, _, body) = call(&app, "GET", &hours, "").await;
            anyhow::ensure!(status == StatusCode::OK, "{status}: {body}");
            Ok((body["total"] == 6).then_some(body))
        },
    )
    .await
    .expect("counted");
    let counts = |body: &Value| -> Vec<u64> {
        body["series"]
            .as_array()
            .expect("series")
            .iter()
            .map(|b| b["count"].as_u64().expect("count"))
            .collect()
    };
    assert_eq!(by_hour["resolution"], "hour");
    assert_eq!(counts(&by_hour), [5, 0, 1], "{by_hour}");
    assert_eq!(by_hour["series"][2]["time"], "2026-11-30T12:00:00Z");
    assert_eq!(
        by_hour["dimensions"]["/page"],
        json!([{"value": "/a", "count": 4}, {"value": "/b", "count": 2}])
    );

    // Up to a day, minutes; the range starts at its minute.
    let (status, _, by_minute) = call(
        &app,
        "GET",
        &format!(
            "/v1/streams/{name}/aggregates?from=2026-11-30T10:00:20Z&to=2026-11-30T10:05:00Z&top=1"
        ),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{by_minute}");
    assert_eq!(by_minute["resolution"], "minute");
    assert_eq!(by_minute["from"], "2026-11-30T10:00:00Z");
    assert_eq!(counts(&by_minute), [3, 2, 0, 0, 0]);
    assert_eq!(
        by_minute["dimensions"]["/page"],
        json!([{"value": "/a", "count": 3}])
    );

    // A range with nothing in it: every bucket, each zero.
    let (status, _, empty) = call(
        &app,
        "GET",
        &format!("/v1/streams/{name}/aggregates?from=2026-11-29T10:00:00Z&to=2026-11-29T11:00:00Z"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (empty["total"].as_u64(), counts(&empty).len()),
        (Some(0), 60)
    );
    assert!(counts(&empty).iter().all(|c| *c == 0));

    // Both kinds of hash expire after the default retention (a week, 90 days).
    let redis = stack.redis().await.expect("redis");
    let minute = "2026-11-30T10:00:00Z"
        .parse::<jiff::Timestamp>()
        .expect("t")
        .as_second();
    let ttl = |key: String| {
        let mut redis = redis.clone();
        async move {
            redis::cmd("TTL")
                .arg(key)
                .query_async::<i64>(&mut redis)
                .await
                .expect("TTL")
        }
    };
    let minute_ttl = ttl(store::minute_aggregate_key(
        &pipeline.key_prefix,
        &name,
        minute,
    ))
    .await;
    let hour_ttl = ttl(store::hour_aggregate_key(
        &pipeline.key_prefix,
        &name,
        minute,
    ))
    .await;
    assert!((1..=168 * 3600).contains(&minute_ttl), "{minute_ttl}");
    assert!(
        (168 * 3600 + 1..=2160 * 3600).contains(&hour_ttl),
        "{hour_ttl}"
    );

    // Bad parameters are problems that say what is wrong.
    for (query, says) in [
        (
            "from=2026-11-30T11:00:00Z&to=2026-11-30T10:00:00Z",
            "must be before",
        ),
        ("from=yesterday", "RFC 3339"),
        ("top=0", "top must be from 1 to 100"),
        ("dimension=/nope", "no dimension \"/nope\""),
        ("resolution=second", "resolution"),
        (
            "from=2026-11-01T00:00:00Z&to=2026-11-03T00:00:00Z&resolution=minute",
            "resolution=hour",
        ),
    ] {
        let (status, content_type, problem) = call(
            &app,
            "GET",
            &format!("/v1/streams/{name}/aggregates?{query}"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {problem}");
        assert_eq!(content_type, "application/problem+json");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(says), "{query}: {detail}");
    }
    let (status, _, problem) = call(&app, "GET", "/v1/streams/nope/aggregates", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    stop.cancel();
}

/// A GET through the router, answered with its headers and body.
async fn get(app: &App, uri: &str, headers: &[(&str, &str)]) -> axum::response::Response {
    let mut request = Request::builder().uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    router(app.clone())
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("response")
}

#[tokio::test]
async fn the_stream_list_and_the_dashboards_files_are_served() {
    let stack = Stack::from_env();
    let mut clicks = StreamSettings::new(unique("clicks"));
    clicks.dimensions = vec!["/page".to_owned(), "/country".to_owned()];
    let plain = StreamSettings::new(unique("plain"));
    let (clicks_name, plain_name) = (clicks.name.clone(), plain.name.clone());
    let pipeline = Pipeline::create(&stack, vec![plain, clicks])
        .await
        .expect("pipeline");
    let app = app_for(&stack, &pipeline).await;

    // The streams by name, with what the page needs to offer them.
    let (status, _, list) = call(&app, "GET", "/v1/streams", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list,
        json!({"streams": [
            {"name": clicks_name, "topic": clicks_name, "dimensions": ["/page", "/country"]},
            {"name": plain_name, "topic": plain_name, "dimensions": []},
        ]})
    );

    // /ui goes to /ui/, which is the page; it may load nothing from elsewhere.
    let redirect = get(&app, "/ui", &[]).await;
    assert_eq!(redirect.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(redirect.headers()[header::LOCATION], "/ui/");
    let page = get(&app, "/ui/", &[]).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(
        page.headers()[header::CONTENT_TYPE],
        "text/html",
        "{:?}",
        page.headers()
    );
    let csp = page.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .expect("csp")
        .to_owned();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    assert_eq!(page.headers()[header::CACHE_CONTROL], "no-cache");
    let etag = page.headers()[header::ETAG].clone();
    let html = String::from_utf8(
        page.into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec(),
    )
    .expect("UTF-8");
    assert!(html.contains("<title>Sluice"), "{html}");

    // The bundle the page names is served, cached for good under its hashed name.
    let script = html
        .split('"')
        .find(|s| s.starts_with("/ui/assets/") && s.ends_with(".js"))
        .unwrap_or_else(|| panic!("no script in {html}"));
    let bundle = get(&app, script, &[]).await;
    assert_eq!(bundle.status(), StatusCode::OK);
    assert_eq!(
        bundle.headers()[header::CONTENT_TYPE],
        "text/javascript",
        "{:?}",
        bundle.headers()
    );
    assert!(
        bundle.headers()[header::CACHE_CONTROL]
            .to_str()
            .expect("cache-control")
            .contains("immutable")
    );

    // A browser that has the page asks again with its ETag: nothing is sent.
    let again = get(
        &app,
        "/ui/",
        &[("if-none-match", etag.to_str().expect("etag"))],
    )
    .await;
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);

    // A file that is not there is a 404 problem, like any unknown path.
    let (status, content_type, problem) = call(&app, "GET", "/ui/nope.js", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(problem["type"], "https://sluice.dev/problems/no-route");
}
