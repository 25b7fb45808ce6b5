//! Every door of a running ingest server (real listener, real Kafka and Redis): batches,
//! NDJSON, ids and keys, workshop paths, chat messages, the read path, WebSocket, the work
//! endpoint, auth, limits, readiness, draining, metrics and the OpenAPI document.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rdkafka::Message as _;
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_core::StreamSettings;
use sluice_ingest::{App, Args, run};
use sluice_testkit::{Pipeline, Stack, json_of, read_topic, topic_len, unique, wait_for};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// A running ingest server for one test; stopped when dropped.
struct Server {
    base: String,
    /// Base of `/metrics`, `/healthz` and `/readyz`.
    admin: String,
    client: reqwest::Client,
    app: App,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(stack: &Stack, pipeline: &Pipeline, tweak: impl FnOnce(&mut Args)) -> Server {
    start_with(stack, pipeline, tweak, true).await
}

/// [`start`], or with `watch_kafka` false, served without the Kafka watcher: Kafka then
/// always counts as reachable, and requests go to the producer whatever the broker does.
async fn start_with(
    stack: &Stack,
    pipeline: &Pipeline,
    tweak: impl FnOnce(&mut Args),
    watch_kafka: bool,
) -> Server {
    let mut args = crate::common::args(stack, pipeline);
    args.redis_replica_url = Some(stack.redis_replica_url.clone());
    tweak(&mut args);
    let app = App::connect(&args).await.expect("ingest starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = format!("http://{}", admin_listener.local_addr().expect("addr"));
    let stop = CancellationToken::new();
    tokio::spawn(sluice_ingest::serve_admin(
        admin_listener,
        app.clone(),
        stop.clone(),
    ));
    if watch_kafka {
        tokio::spawn(run(listener, app.clone(), stop.clone()));
    } else {
        let serve = axum::serve(listener, sluice_ingest::router(app.clone()))
            .with_graceful_shutdown(stop.clone().cancelled_owned());
        tokio::spawn(async move { serve.await });
    }
    Server {
        base,
        admin,
        client: reqwest::Client::new(),
        app,
        stop,
    }
}

impl Server {
    async fn post(&self, path: &str, content_type: &str, body: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.post(path, "application/json", &body.to_string()).await
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        self.get_from(&self.base, path).await
    }

    /// A GET on the metrics and health port.
    async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        self.get_from(&self.admin, path).await
    }

    async fn get_from(&self, base: &str, path: &str) -> (StatusCode, String) {
        let r = self
            .client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("request");
        (r.status(), r.text().await.expect("body"))
    }
}

fn stream(name: &str) -> StreamSettings {
    StreamSettings::new(unique(name))
}

#[tokio::test]
async fn batches_and_ndjson_are_published_with_their_ids() {
    let stack = Stack::from_env();
    let s = stream("batch");
    let (name, topic) = (s.name.clone(), s.topic().to_owned());
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let server = start(&stack, &pipeline, |_| {}).await;
    let path = format!("/v1/streams/{name}/events");

    let (status, body) = server
        .post_json(
            &path,
            &json!([{"id": "a-1", "n": 1}, {"id": 2, "n": 2}, {"n": 3}]),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["count"], 3);
    let ids: Vec<&str> = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id"))
        .collect();
    assert_eq!(&ids[..2], ["a-1", "2"]);
    assert!(body["events"][2]["offset"].is_i64());

    let (status, body) = server
        .post(
            &path,
            "application/x-ndjson",
            "{\"n\":4}\n{\"n\":5}\n\n{\"n\":6}\n",
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["count"], 3);

    // A single event takes its id from X-Sluice-Id.
    let r = server
        .client
        .post(format!("{}{path}", server.base))
        .header("x-sluice-id", "chosen-id")
        .json(&json!({"n": 7}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.json::<Value>().await.expect("json")["id"], "chosen-id");

    let records = read_topic(&stack, &topic).await.expect("topic");
    let mut ns: Vec<u64> = records
        .iter()
        .map(|r| {
            json_of(r).expect("json")["payload"]["n"]
                .as_u64()
                .expect("n")
        })
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, [1, 2, 3, 4, 5, 6, 7]);
    let ids: Vec<String> = records
        .iter()
        .map(|r| {
            json_of(r).expect("json")["id"]
                .as_str()
                .expect("id")
                .to_owned()
        })
        .collect();
    assert!(ids.contains(&"a-1".to_owned()) && ids.contains(&"chosen-id".to_owned()));
}

#[tokio::test]
async fn every_bad_input_gets_its_error_and_nothing_is_published() {
    let stack = Stack::from_env();
    let mut s = stream("bad");
    s.key = Some("/user".into());
    s.schema = Some(json!({
        "type": "object",
        "required": ["user", "lat"],
        "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}}
    }));
    let (name, topic) = (s.name.clone(), s.topic().to_owned());
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let server = start(&stack, &pipeline, |a| {
        a.max_body_bytes = 4096;
        a.max_batch_events = 5;
    })
    .await;
    let path = format!("/v1/streams/{name}/events");
    let good = json!({"user": "ann", "lat": 10.5});

    let cases: Vec<(&str, String, StatusCode, &str, &str)> = vec![
        (
            "application/json",
            "{\"user\":".into(),
            StatusCode::BAD_REQUEST,
            "malformed-json",
            "not valid JSON",
        ),
        (
            "application/json",
            "\"text\"".into(),
            StatusCode::BAD_REQUEST,
            "not-an-object",
            "not a string",
        ),
        (
            "application/json",
            "[]".into(),
            StatusCode::BAD_REQUEST,
            "empty-request",
            "no event",
        ),
        (
            "application/json",
            json!([good, good, good, good, good, good]).to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-many-events",
            "at most 5",
        ),
        (
            "application/json",
            json!([good, 17]).to_string(),
            StatusCode::BAD_REQUEST,
            "not-an-object",
            "event 1:",
        ),
        (
            "application/json",
            json!({"lat": 1}).to_string(),
            StatusCode::BAD_REQUEST,
            "missing-key",
            "/user",
        ),
        (
            "application/json",
            json!({"user": "ann", "lat": 91}).to_string(),
            StatusCode::BAD_REQUEST,
            "schema-violation",
            "\"/lat\"",
        ),
        (
            "application/json",
            json!({"user": "ann"}).to_string(),
            StatusCode::BAD_REQUEST,
            "schema-violation",
            "required",
        ),
        (
            "application/json",
            json!({"user": "ann", "lat": 1, "id": "has space"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid-id",
            "white space",
        ),
        (
            "application/json",
            json!({"user": "ann", "lat": 1, "id": [1]}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid-id",
            "string or an integer",
        ),
        (
            "application/x-ndjson",
            format!("{good}\n{{oops\n"),
            StatusCode::BAD_REQUEST,
            "malformed-json",
            "line 2",
        ),
        (
            "application/json",
            format!("{{\"user\":\"{}\"}}", "x".repeat(5000)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "unreadable-body",
            "",
        ),
    ];
    for (content_type, body, status, kind, detail) in cases {
        let (got, problem) = server.post(&path, content_type, &body).await;
        assert_eq!(got, status, "{body:.80} -> {problem}");
        assert_eq!(
            problem["type"],
            format!("https://sluice.dev/problems/{kind}"),
            "{body:.80}"
        );
        assert!(
            problem["detail"].as_str().expect("detail").contains(detail),
            "{problem}"
        );
    }
    let (status, problem) = server.post_json(&format!("{path}?ack=maybe"), &good).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["type"], "https://sluice.dev/problems/invalid-query");
    let (status, problem) = server.post_json("/v1/streams/nowhere/events", &good).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");

    assert_eq!(
        topic_len(&stack, &topic).expect("len"),
        0,
        "nothing reached Kafka"
    );
    let (status, _) = server.post_json(&path, &good).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(topic_len(&stack, &topic).expect("len"), 1);
}

#[tokio::test]
async fn workshop_paths_publish_to_visit_and_activity() {
    let stack = Stack::from_env();
    let mut visit = StreamSettings::new("visit");
    visit.topic = Some(unique("visit"));
    let mut activity = StreamSettings::new("activity");
    activity.topic = Some(unique("activity"));
    let (visit_topic, activity_topic) = (visit.topic().to_owned(), activity.topic().to_owned());
    let pipeline = Pipeline::create(&stack, vec![visit, activity])
        .await
        .expect("pipeline");
    let server = start(&stack, &pipeline, |_| {}).await;

    for path in [
        "/api/visit/v1/",
        "/api/visit/v1",
        "/api/activity/v1/",
        "/api/activity/v1",
    ] {
        let (status, body) = server
            .post_json(path, &json!({"userId": "u1", "path": path}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{path}: {body}");
    }
    for topic in [visit_topic, activity_topic] {
        let records = read_topic(&stack, &topic).await.expect("topic");
        assert_eq!(records.len(), 2, "{topic}");
    }
}

#[tokio::test]
async fn fire_and_forget_answers_before_the_acknowledgement() {
    let stack = Stack::from_env();
    let s = stream("fnf");
    let (name, topic) = (s.name.clone(), s.topic().to_owned());
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let server = start(&stack, &pipeline, |_| {}).await;
    let (status, body) = server
        .post_json(
            &format!("/v1/streams/{name}/events?ack=none"),
            &json!({"n": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(body["id"].is_string());
    assert!(
        body.get("offset").is_none(),
        "no offset without waiting: {body}"
    );
    wait_for(
        "the event on the topic",
        Duration::from_secs(30),
        || async { Ok((topic_len(&stack, &topic)? > 0).then_some(())) },
    )
    .await
    .expect("delivered");
    let records = read_topic(&stack, &topic).await.expect("topic");
    assert_eq!(json_of(&records[0]).expect("json")["id"], body["id"]);
}

#[tokio::test]
async fn chat_messages_are_keyed_by_recipient_and_unsent_senders_are_listed() {
    let stack = Stack::from_env();
    let s = stream("messages");
    let (name, topic) = (s.name.clone(), s.topic().to_owned());
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let server = start(&stack, &pipeline, |a| a.messages_stream = name.clone()).await;

    let (status, body) = server
        .post_json(
            "/v1/messages",
            &json!({"fromuser": "ann", "touser": "bob", "msg": "hi"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, problem) = server
        .post_json("/v1/messages", &json!({"fromuser": "ann", "msg": "hi"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        problem["detail"]
            .as_str()
            .expect("detail")
            .contains("touser"),
        "{problem}"
    );
    let records = read_topic(&stack, &topic).await.expect("topic");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].key(), Some(&b"bob"[..]));
    assert_eq!(json_of(&records[0]).expect("json")["payload"]["msg"], "hi");

    // The collector keeps the set on the primary; ingest reads it from the replica.
    let mut redis = stack.redis().await.expect("redis");
    let key = format!("{}:unsent:bob", pipeline.key_prefix);
    let _: () = redis.sadd(&key, &["cyd", "ann"]).await.expect("sadd");
    let (status, body) = server.get("/v1/users/bob/unsent").await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body, json!({"user": "bob", "senders": ["ann", "cyd"]}));
    let (_, body) = server.get("/v1/users/nobody/unsent").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["senders"],
        json!([])
    );
}

#[tokio::test]
async fn a_read_hit_publishes_a_read_event() {
    let stack = Stack::from_env();
    let s = stream("reads");
    let name = s.name.clone();
    let read_topic_name = s.read_topic();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    sluice_core::kafka::ensure_topics(
        &stack.kafka(),
        &[sluice_core::kafka::TopicSpec {
            name: read_topic_name.clone(),
            partitions: 1,
        }],
    )
    .await
    .expect("read topic");
    let server = start(&stack, &pipeline, |_| {}).await;

    let mut redis = stack.redis().await.expect("redis");
    let record = json!({"id": "r1", "stream": name, "payload": {"x": 1}});
    let _: () = redis
        .set(
            format!("{}:{name}:r1", pipeline.key_prefix),
            record.to_string(),
        )
        .await
        .expect("set");
    let (status, body) = server.get(&format!("/v1/streams/{name}/records/r1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&body).expect("json"), record);
    let (status, _) = server.get(&format!("/v1/streams/{name}/records/r2")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let len = wait_for("the read event", Duration::from_secs(30), || async {
        let n = topic_len(&stack, &read_topic_name)?;
        Ok((n > 0).then_some(n))
    })
    .await
    .expect("read event");
    assert_eq!(len, 1, "one read event for the one hit");
    let events = read_topic(&stack, &read_topic_name).await.expect("topic");
    assert_eq!(
        json_of(&events[0]).expect("json")["payload"],
        json!({"id": "r1", "stream": name})
    );
}

#[tokio::test]
async fn websocket_acks_each_message_in_order_and_survives_a_bad_one() {
    let stack = Stack::from_env();
    let s = stream("ws");
    let (name, topic) = (s.name.clone(), s.topic().to_owned());
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let server = start(&stack, &pipeline, |a| a.max_body_bytes = 2048).await;
    let url = format!(
        "{}/v1/streams/{name}/ws",
        server.base.replace("http://", "ws://")
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");

    let frames = [
        json!({"id": "w1", "n": 1}).to_string(),
        "{not json".to_owned(),
        json!([{"id": "w2"}, {"id": "w3"}]).to_string(),
        json!(42).to_string(),
        json!({"id": "w4"}).to_string(),
    ];
    for f in &frames {
        socket.send(Message::text(f.clone())).await.expect("send");
    }
    socket
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("send");
    socket
        .send(Message::text(json!({"id": "w5"}).to_string()))
        .await
        .expect("send");
    let mut replies = Vec::new();
    while replies.len() < 7 {
        match socket.next().await.expect("reply").expect("frame") {
            Message::Text(t) => replies.push(serde_json::from_str::<Value>(&t).expect("json")),
            _ => continue,
        }
    }
    assert_eq!(replies[0], json!({"ok": true, "ids": ["w1"]}));
    assert_eq!(replies[1]["ok"], false);
    assert_eq!(
        replies[1]["error"]["type"],
        "https://sluice.dev/problems/malformed-json"
    );
    assert_eq!(replies[2], json!({"ok": true, "ids": ["w2", "w3"]}));
    assert_eq!(
        replies[3]["error"]["type"],
        "https://sluice.dev/problems/not-an-object"
    );
    assert_eq!(replies[4], json!({"ok": true, "ids": ["w4"]}));
    assert_eq!(
        replies[5]["error"]["type"],
        "https://sluice.dev/problems/invalid-field"
    );
    assert_eq!(replies[6], json!({"ok": true, "ids": ["w5"]}));

    // A message over the size limit closes that connection only.
    socket
        .send(Message::text("x".repeat(4096)))
        .await
        .expect("send");
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the oversized message ends the connection");
    assert!(closed);
    let (mut again, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("reconnect");
    again
        .send(Message::text(json!({"id": "w6"}).to_string()))
        .await
        .expect("send");
    let reply = again.next().await.expect("reply").expect("frame");
    assert_eq!(
        serde_json::from_str::<Value>(reply.to_text().expect("text")).expect("json")["ids"],
        json!(["w6"])
    );

    let ids: Vec<String> = read_topic(&stack, &topic)
        .await
        .expect("topic")
        .iter()
        .map(|r| {
            json_of(r).expect("json")["id"]
                .as_str()
                .expect("id")
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 6, "{ids:?}");
}

#[tokio::test]
async fn work_endpoint_runs_requests_concurrently() {
    let stack = Stack::from_env();
    let pipeline = Pipeline::create(&stack, vec![stream("work")])
        .await
        .expect("pipeline");
    let server = start(&stack, &pipeline, |a| a.work_max_ms = 1000).await;
    let (status, problem) = server.post_json("/v1/work?ms=5000", &json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        problem["detail"]
            .as_str()
            .expect("detail")
            .contains("at most 1000")
    );

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let (client, url) = (
            server.client.clone(),
            format!("{}/v1/work?ms=200", server.base),
        );
        tasks.spawn(async move { client.post(url).send().await.map(|r| r.status()) });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("task").expect("request"), StatusCode::OK);
    }
    // One after another would take 100 s; concurrently it is a fraction of that.
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(50),
        "500 × 200 ms took {elapsed:?}"
    );
}

#[tokio::test]
async fn api_keys_guard_the_api_and_websocket_and_follow_the_key_file() {
    let stack = Stack::from_env();
    let s = stream("auth");
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("keys");
    std::fs::write(
        &keys,
        "# keys\nfirst-key-0123456789\n\nsecond-key-0123456789\n",
    )
    .expect("write");
    let server = start(&stack, &pipeline, |a| {
        a.api_keys_file = Some(keys.clone());
        a.api_keys_reload = Duration::from_millis(100);
    })
    .await;
    let url = format!("{}/v1/streams/{name}/events", server.base);
    let post = |auth: Option<(&'static str, String)>| {
        let mut request = server.client.post(&url).json(&json!({}));
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        async move { request.send().await.expect("request") }
    };

    let cases = [
        (None, StatusCode::UNAUTHORIZED),
        (
            Some(("authorization", "Bearer wrong-key-0123456789".to_owned())),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Some(("authorization", "Bearer second-key-0123456789".to_owned())),
            StatusCode::ACCEPTED,
        ),
        (
            Some(("x-api-key", "first-key-0123456789".to_owned())),
            StatusCode::ACCEPTED,
        ),
    ];
    for (auth, want) in cases {
        let r = post(auth.clone()).await;
        assert_eq!(r.status(), want, "{auth:?}");
        if want == StatusCode::UNAUTHORIZED {
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
        }
    }
    // The WebSocket door: the upgrade is refused without a key.
    let ws = format!(
        "{}/v1/streams/{name}/ws",
        server.base.replace("http://", "ws://")
    );
    match tokio_tungstenite::connect_async(&ws).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED.as_u16())
        }
        other => panic!("a WebSocket without a key: {:?}", other.map(|(_, r)| r)),
    }
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(&ws)
            .expect("request");
    request.headers_mut().insert(
        "authorization",
        "Bearer first-key-0123456789".parse().expect("header"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("a WebSocket with a key");
    socket
        .send(Message::text(json!({"n": 1}).to_string()))
        .await
        .expect("send");
    let ack = socket.next().await.expect("frame").expect("frame");
    assert!(ack.to_text().expect("text").contains("\"ids\""), "{ack:?}");
    // The dashboard and the API's description need no key; a path that is no route is
    // answered 404 whether a key came or not.
    for (path, want) in [
        ("/openapi.json", StatusCode::OK),
        ("/ui/", StatusCode::OK),
        ("/no/such/route", StatusCode::NOT_FOUND),
    ] {
        let r = server
            .client
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), want, "{path}");
    }
    // Health and metrics need no key, on their own port.
    assert_eq!(server.admin_get("/healthz").await.0, StatusCode::OK);
    let (_, metrics) = server.admin_get("/metrics").await;
    assert!(
        metrics.contains("sluice_ingest_unauthorized_total{door=\"http\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_ingest_unauthorized_total{door=\"ws\"} 1"),
        "{metrics}"
    );
    // Refused requests are requests too, counted by route and status.
    assert!(
        metrics.contains(
            "sluice_ingest_http_requests_total{route=\"/v1/streams/{stream}/events\",method=\"POST\",status=\"401\"} 2"
        ),
        "{metrics}"
    );

    // A rotated file: the new key is taken without a restart, the old ones refused.
    std::fs::write(&keys, "third-key-0123456789\n").expect("write");
    wait_for("the rotated key", Duration::from_secs(30), || async {
        let r = post(Some(("x-api-key", "third-key-0123456789".to_owned()))).await;
        Ok((r.status() == StatusCode::ACCEPTED).then_some(()))
    })
    .await
    .expect("rotated");
    for old in ["first-key-0123456789", "second-key-0123456789"] {
        let r = post(Some(("x-api-key", old.to_owned()))).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{old}");
    }
    // A broken file keeps the keys in force.
    std::fs::write(&keys, "").expect("write");
    wait_for("the failed reload", Duration::from_secs(30), || async {
        let (_, metrics) = server.admin_get("/metrics").await;
        Ok(metrics
            .contains("sluice_ingest_api_key_reloads_total{result=\"error\"}")
            .then_some(()))
    })
    .await
    .expect("reload failed");
    let r = post(Some(("x-api-key", "third-key-0123456789".to_owned()))).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(post(None).await.status(), StatusCode::UNAUTHORIZED);

    std::fs::write(&keys, "short\n").expect("write");
    let mut args = Args::new(
        pipeline.settings_path.clone(),
        stack.kafka(),
        stack.redis_url.clone(),
    );
    args.api_keys_file = Some(keys);
    let err = App::connect(&args).await.err().expect("short keys refused");
    assert!(err.to_string().contains("too short"), "{err}");
}

/// A broker of this test's own, that it may stop and start, and the stack on it.
async fn own_broker() -> (sluice_testkit::OwnBroker, Stack) {
    let broker = sluice_testkit::OwnBroker::start()
        .await
        .expect("own broker");
    let own = Stack {
        kafka_brokers: broker.brokers(),
        ..Stack::from_env()
    };
    (broker, own)
}

/// What `/readyz` says of Kafka (`reachable` or `unreachable`), with its status.
async fn readiness(server: &Server) -> (StatusCode, String) {
    let (status, text) = server.admin_get("/readyz").await;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (
        status,
        body["kafka"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn unreachable_kafka_answers_503_at_once_and_ingest_stays_ready() {
    let stack = Stack::from_env();
    let s = stream("down");
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    // A port nothing listens on.
    let dead = sluice_testkit::free_port().expect("port");
    let server = start(&stack, &pipeline, |a| {
        a.kafka = sluice_core::kafka::KafkaArgs::new(format!("127.0.0.1:{dead}"))
    })
    .await;

    wait_for(
        "/readyz to report Kafka unreachable",
        Duration::from_secs(30),
        || async { Ok((readiness(&server).await.1 == "unreachable").then_some(())) },
    )
    .await
    .expect("Kafka seen as unreachable");
    // Still ready: a Service keeps the instance, and clients get 503 rather than a
    // refused connection.
    assert_eq!(readiness(&server).await.0, StatusCode::OK);
    let (status, metrics) = server.admin_get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains("sluice_ingest_kafka_reachable 0"),
        "{metrics}"
    );
    let r = server
        .client
        .post(format!("{}/v1/streams/{name}/events", server.base))
        .json(&json!({"n": 1}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("answered without waiting for Kafka");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
}

#[tokio::test]
async fn kafka_away_and_back_is_followed_without_a_restart() {
    let (broker, own) = own_broker().await;
    let s = stream("flaky");
    let name = s.name.clone();
    let pipeline = Pipeline::create(&own, vec![s]).await.expect("pipeline");
    let server = start(&own, &pipeline, |_| {}).await;
    let path = format!("/v1/streams/{name}/events");
    let kafka = |want: &'static str| {
        let server = &server;
        async move {
            wait_for(
                &format!("/readyz to report Kafka {want}"),
                Duration::from_secs(90),
                || async {
                    let (status, kafka) = readiness(server).await;
                    assert_eq!(status, StatusCode::OK, "ready whatever Kafka does");
                    Ok((kafka == want).then_some(()))
                },
            )
            .await
        }
    };
    kafka("reachable").await.expect("reachable");
    assert_eq!(
        server.post_json(&path, &json!({"n": 1})).await.0,
        StatusCode::ACCEPTED
    );

    broker.down().await.expect("stop broker");
    kafka("unreachable")
        .await
        .expect("seen unreachable while Kafka is away");
    let (status, problem) = server.post_json(&path, &json!({"n": 2})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        problem["type"],
        "https://sluice.dev/problems/kafka-unavailable"
    );

    broker.up().await.expect("restart broker");
    kafka("reachable").await.expect("reachable again");
    let (status, body) = server.post_json(&path, &json!({"n": 3})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        topic_len(&own, &name).expect("len"),
        2,
        "events 1 and 3, not 2"
    );
}

/// The ids of the events on a topic, as the envelopes on it name them.
async fn ids_on_topic(stack: &Stack, topic: &str) -> Vec<String> {
    read_topic(stack, topic)
        .await
        .expect("topic")
        .iter()
        .map(|m| {
            json_of(m).expect("json")["id"]
                .as_str()
                .expect("id")
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_batch_published_in_part_answers_which_events_were_published_with_their_ids() {
    let stack = Stack::from_env();
    let s = stream("part");
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    // A producer queue of two events: the rest of a batch of five finds it full.
    let server = start(&stack, &pipeline, |a| {
        a.kafka.options.extend([
            ("queue.buffering.max.messages".to_owned(), "2".to_owned()),
            ("linger.ms".to_owned(), "200".to_owned()),
        ]);
    })
    .await;
    let path = format!("/v1/streams/{name}/events");
    let batch = json!([{"id": "p-0"}, {"n": 1}, {"id": "p-2"}, {"n": 3}, {"id": "p-4"}]);
    let (status, problem) = server.post_json(&path, &batch).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(problem["type"], "https://sluice.dev/problems/overloaded");
    let events = problem["events"].as_array().expect("each event's outcome");
    let statuses: Vec<&str> = events
        .iter()
        .map(|e| e["status"].as_str().expect("status"))
        .collect();
    assert_eq!(
        statuses,
        ["published", "published", "failed", "failed", "failed"],
        "{problem}"
    );
    let ids: Vec<String> = events
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(
        (ids[0].as_str(), ids[2].as_str(), ids[4].as_str()),
        ("p-0", "p-2", "p-4")
    );
    assert!(
        !ids[1].is_empty() && !ids[3].is_empty(),
        "made ids are returned: {ids:?}"
    );
    assert!(events[0]["offset"].is_i64() && events[1]["partition"].is_i64());

    // The client retries what was not published, with the ids of the answer, as a client
    // does after a 503: it sends again only the events the answer calls failed. (The
    // producer frees queue space a moment after an acknowledgement is answered, so a retry
    // sent at once may itself find the queue full.)
    for retry in [
        vec![json!({"id": ids[2]}), json!({"id": ids[3], "n": 3})],
        vec![json!({"id": ids[4]})],
    ] {
        let mut pending = retry;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = server
                .post_json(&path, &Value::Array(pending.clone()))
                .await;
            if status == StatusCode::ACCEPTED {
                break;
            }
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "still refused: {body}"
            );
            let failed: Vec<&str> = body["events"]
                .as_array()
                .expect("each event's outcome")
                .iter()
                .filter(|e| e["status"] == "failed")
                .map(|e| e["id"].as_str().expect("id"))
                .collect();
            pending.retain(|e| failed.contains(&e["id"].as_str().expect("id")));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut on_topic = ids_on_topic(&stack, &name).await;
    on_topic.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(on_topic, want, "each event once");
}

#[tokio::test]
async fn acknowledgements_that_do_not_come_in_time_are_answered_503_with_the_ids() {
    let (broker, own) = own_broker().await;
    let s = stream("late");
    let name = s.name.clone();
    let pipeline = Pipeline::create(&own, vec![s]).await.expect("pipeline");
    // Served without the Kafka watcher, so that the request below is in flight as if the
    // broker died under it (the watcher would otherwise refuse new requests at once).
    let server = start_with(
        &own,
        &pipeline,
        |a| a.ack_timeout = Duration::from_secs(1),
        false,
    )
    .await;
    let client = &server.client;
    let base = &server.base;
    let path = format!("{base}/v1/streams/{name}/events");
    // The new topic's first acknowledgement may take longer than the short deadline.
    wait_for("a first event taken", Duration::from_secs(90), || async {
        let r = client
            .post(&path)
            .json(&json!({"id": "before"}))
            .send()
            .await?;
        Ok((r.status() == StatusCode::ACCEPTED).then_some(()))
    })
    .await
    .expect("first event");

    broker.down().await.expect("stop broker");
    let answer = client
        .post(&path)
        .json(&json!([{"id": "late-1"}, {"n": 2}]))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("answered before the client's own timeout");
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers()["retry-after"], "1");
    let problem: Value = answer.json().await.expect("problem");
    assert_eq!(
        problem["type"],
        "https://sluice.dev/problems/kafka-unavailable"
    );
    let events = problem["events"].as_array().expect("events");
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e["status"] == "unknown"), "{problem}");
    assert_eq!(events[0]["id"], "late-1");
    let made = events[1]["id"].as_str().expect("made id").to_owned();

    // The broker is back: the retry with the same ids is taken, and the topic holds
    // those ids (the first attempt may have arrived too: the sinks store an id once).
    broker.up().await.expect("restart broker");
    let retry = json!([{"id": "late-1"}, {"id": made, "n": 2}]);
    let taken = wait_for("the retry to be taken", Duration::from_secs(90), || async {
        let r = client.post(&path).json(&retry).send().await?;
        Ok((r.status() == StatusCode::ACCEPTED).then_some(()))
    })
    .await;
    taken.expect("retry taken");
    let on_topic: std::collections::BTreeSet<String> =
        ids_on_topic(&own, &name).await.into_iter().collect();
    assert_eq!(
        on_topic,
        ["before".to_owned(), "late-1".to_owned(), made]
            .into_iter()
            .collect()
    );
}

/// Sends one HTTP/1.1 request on `connection` and reads until the server closes it (or
/// `limit` passes): the whole answer as text.
async fn exchange_until_closed(
    connection: &mut tokio::net::TcpStream,
    request: &str,
    limit: Duration,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    connection
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    match tokio::time::timeout(limit, connection.read_to_end(&mut answer)).await {
        Ok(Ok(_)) => Ok(String::from_utf8_lossy(&answer).into_owned()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err(format!(
            "the connection stayed open {limit:?} after: {}",
            String::from_utf8_lossy(&answer)
        )),
    }
}

#[tokio::test]
async fn draining_fails_readiness_and_closes_each_connection_after_its_answer() {
    let stack = Stack::from_env();
    let s = stream("drain");
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let server = start(&stack, &pipeline, |_| {}).await;
    let path = format!("/v1/streams/{name}/events");
    let addr = server.base.trim_start_matches("http://").to_owned();

    // Before: ready, and connections are kept alive.
    assert_eq!(readiness(&server).await.0, StatusCode::OK);
    let r = server
        .client
        .post(format!("{}{path}", server.base))
        .json(&json!({"n": 1}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(r.headers().get("connection").is_none(), "{r:?}");

    // A client holds an idle keep-alive connection when draining starts.
    let mut held = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    server.app.start_draining();
    let (status, text) = server.admin_get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("/problems/draining"), "{text}");

    // Its next request is still served in full, and the server then closes it.
    let body = json!({"id": "during-drain", "n": 2}).to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = exchange_until_closed(&mut held, &request, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // New connections are still taken while draining (load balancers may still send some).
    let (status, _) = server.post_json(&path, &json!({"n": 3})).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    // Then the stop: no new connection is accepted.
    server.stop.cancel();
    wait_for("the listener to close", Duration::from_secs(30), || async {
        Ok(tokio::net::TcpStream::connect(&addr)
            .await
            .is_err()
            .then_some(()))
    })
    .await
    .expect("stopped");
    assert_eq!(
        topic_len(&stack, &name).expect("len"),
        3,
        "every answered event is in the topic"
    );
}

#[tokio::test]
async fn connections_over_the_limit_wait_for_a_free_slot() {
    let stack = Stack::from_env();
    let pipeline = Pipeline::create(&stack, vec![stream("limit")])
        .await
        .expect("pipeline");
    let server = start(&stack, &pipeline, |a| a.max_connections = 2).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let first = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let second = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    // Both slots are held by idle connections: a third is not served...
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let request = client.get(format!("{}/openapi.json", server.base)).send();
    tokio::pin!(request);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut request)
            .await
            .is_err(),
        "a third connection was served while two were held"
    );
    // ...until one closes.
    drop(first);
    let response = tokio::time::timeout(Duration::from_secs(30), request)
        .await
        .expect("served once a slot is free")
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    drop(second);
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_then_stops_accepting() {
    let stack = Stack::from_env();
    let pipeline = Pipeline::create(&stack, vec![stream("drain")])
        .await
        .expect("pipeline");
    let server = start(&stack, &pipeline, |_| {}).await;
    let (client, url) = (
        server.client.clone(),
        format!("{}/v1/work?ms=1500", server.base),
    );
    let in_flight = tokio::spawn(async move { client.post(url).send().await.map(|r| r.status()) });
    // Shut down once the request is being served.
    wait_for(
        "the request to be in flight",
        Duration::from_secs(30),
        || async {
            let (_, text) = server.admin_get("/metrics").await;
            Ok(text
                .contains("sluice_ingest_http_requests_in_flight{route=\"/v1/work\"} 1")
                .then_some(()))
        },
    )
    .await
    .expect("in flight");
    server.stop.cancel();
    let status = in_flight
        .await
        .expect("task")
        .expect("the request in flight is answered");
    assert_eq!(status, StatusCode::OK);
    let refused = reqwest::Client::new()
        .get(format!("{}/openapi.json", server.base))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(refused.is_err(), "no new connection after shutdown");
}

#[tokio::test]
async fn metrics_and_openapi_describe_the_service() {
    let stack = Stack::from_env();
    let s = stream("meta");
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let server = start(&stack, &pipeline, |_| {}).await;
    assert_eq!(
        server
            .post_json(&format!("/v1/streams/{name}/events"), &json!({}))
            .await
            .0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        server
            .post(
                &format!("/v1/streams/{name}/events"),
                "application/json",
                "{"
            )
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(server.admin_get("/readyz").await.0, StatusCode::OK);

    let (status, text) = server.admin_get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("sluice_ingest_http_requests_total{route=\"/v1/streams/{stream}/events\",method=\"POST\",status=\"202\"} 1"), "{text}");
    assert!(
        text.contains(&format!(
            "sluice_ingest_events_produced_total{{stream=\"{name}\"}} 1"
        )),
        "{text}"
    );
    assert!(
        text.contains("sluice_ingest_producer_queue_depth"),
        "{text}"
    );

    let (status, doc) = server.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let doc: Value = serde_json::from_str(&doc).expect("json");
    let publish = format!("/v1/streams/{name}/events");
    for path in [
        publish.as_str(),
        "/v1/streams/{stream}/records/{id}",
        "/v1/streams/{stream}/aggregates",
        "/v1/streams/{stream}/ws",
        "/v1/users/{user}/unsent",
        "/v1/work",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    // The paths of streams this pipeline does not have are not offered.
    for path in ["/v1/messages", "/api/visit/v1/", "/api/activity/v1/"] {
        assert!(doc["paths"].get(path).is_none(), "{path} is documented");
    }
    let (status, admin) = server.admin_get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let admin: Value = serde_json::from_str(&admin).expect("json");
    let paths: Vec<&String> = admin["paths"].as_object().expect("paths").keys().collect();
    assert_eq!(paths, ["/healthz", "/metrics", "/readyz"]);
}
