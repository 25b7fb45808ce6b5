//! Every sink against the real Kafka, Redis and PostgreSQL: what was sent is written, a
//! replay adds nothing, outages are retried, poison goes to the dead-letter topic.
//!
//! Each failure test counts by id: events sent = events in the sink + events on the
//! dead-letter topic, with no duplicates in the sink.

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Parser;
use redis::AsyncCommands;
use serde_json::{Value, json};
use sluice_collector::{Args, run};
use sluice_core::settings::RetrySettings;
use sluice_core::{Envelope, PipelineSettings, StreamSettings};
use sluice_testkit::{
    Pipeline, Proxy, Stack, committed_to_end, json_of, produce, produce_raw, read_topic, topic_len,
    unique, wait_for,
};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(90);

/// A running in-process collector; stopped (gracefully) when dropped.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), sluice_collector::CollectorError>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(LIMIT, self.task).await;
    }
}

fn start(pipeline: &Pipeline, stack: &Stack, group: &str, extra: &[&str]) -> Running {
    let base = [
        ("--settings", pipeline.settings_path.to_str().expect("path")),
        ("--kafka-brokers", stack.kafka_brokers.as_str()),
        ("--redis-url", stack.redis_url.as_str()),
        ("--database-url", stack.database_url.as_str()),
        ("--key-prefix", pipeline.key_prefix.as_str()),
        ("--group", group),
        ("--batch-size", "50"),
    ];
    let mut argv = vec!["sluice-collector".to_owned()];
    for (flag, value) in base {
        // A flag given in `extra` replaces the default.
        if !extra.contains(&flag) {
            argv.push(flag.to_owned());
            argv.push(value.to_owned());
        }
    }
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    let args = Args::parse_from(argv);
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(args, stop.clone()));
    Running { stop, task }
}

fn events(stream: &str, n: usize, tag: &str) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            let mut e = Envelope::new(
                stream,
                Some(format!("user-{}", i % 5)),
                json!({"n": i, "type": if i % 3 == 0 { "click" } else { "view" }, "tag": tag}),
            );
            e.id = format!("{tag}-{i}");
            e
        })
        .collect()
}

fn ids(events: &[Envelope]) -> BTreeSet<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

async fn redis_ids(stack: &Stack, prefix: &str, stream: &str) -> anyhow::Result<BTreeSet<String>> {
    let mut redis = stack.redis().await?;
    let pattern = format!("{prefix}:{stream}:*");
    let keys: Vec<String> = redis.keys(&pattern).await?;
    Ok(keys
        .into_iter()
        .map(|k| k.rsplit(':').next().unwrap_or_default().to_owned())
        .collect())
}

async fn await_redis(stack: &Stack, prefix: &str, stream: &str, want: usize) -> BTreeSet<String> {
    wait_for(&format!("{want} records in Redis"), LIMIT, || async {
        let got = redis_ids(stack, prefix, stream).await?;
        Ok((got.len() >= want).then_some(got))
    })
    .await
    .expect("records")
}

async fn dead_letters(stack: &Stack, stream: &str) -> Vec<rdkafka::message::OwnedMessage> {
    read_topic(stack, &format!("{stream}.dlq"))
        .await
        .expect("dlq")
}

#[tokio::test]
async fn redis_sink_writes_records_and_aggregates_and_a_replay_adds_nothing() {
    let stack = Stack::from_env();
    let mut s = StreamSettings::new(unique("visit"));
    s.partitions = 3;
    s.dimensions = vec!["/type".into()];
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let sent = events(&name, 300, "r");
    produce(&stack, &name, &sent).await.expect("produce");

    let first = start(&pipeline, &stack, &unique("g"), &[]);
    let stored = await_redis(&stack, &pipeline.key_prefix, &name, 300).await;
    first.stop().await;
    assert_eq!(stored, ids(&sent));

    // A second group reads the whole topic again: no new record, no count twice.
    replay_all(&stack, &pipeline, &name, &[]).await;
    let mut redis = stack.redis().await.expect("redis");
    let agg_keys: Vec<String> = redis
        .keys(format!("{}:agg:{name}:*", pipeline.key_prefix))
        .await
        .expect("keys");
    assert!(!agg_keys.is_empty(), "per-minute aggregates exist");
    let stored = redis_ids(&stack, &pipeline.key_prefix, &name)
        .await
        .expect("ids");
    assert_eq!(stored.len(), 300);
    let mut total = 0i64;
    let mut clicks = 0i64;
    for key in &agg_keys {
        let count: Option<i64> = redis.hget(key, "count").await.expect("hget");
        let click: Option<i64> = redis.hget(key, "/type=click").await.expect("hget");
        total += count.unwrap_or(0);
        clicks += click.unwrap_or(0);
    }
    assert_eq!(total, 300, "each event counted once despite the replay");
    assert_eq!(clicks, 100, "counted per dimension value");
    let record: String = redis
        .get(format!("{}:{name}:r-7", pipeline.key_prefix))
        .await
        .expect("get");
    assert_eq!(
        serde_json::from_str::<Value>(&record).expect("json")["payload"]["n"],
        7
    );
}

/// Runs a collector in a new group over the whole topic and waits until it committed
/// everything: every record was delivered to the sink a second time.
async fn replay_all(stack: &Stack, pipeline: &Pipeline, topic: &str, extra: &[&str]) {
    let group = unique("replay");
    let replay = start(pipeline, stack, &group, extra);
    wait_for(
        "the replay group to commit the whole topic",
        LIMIT,
        || async { Ok(committed_to_end(stack, &group, topic)?.then_some(())) },
    )
    .await
    .expect("replayed");
    replay.stop().await;
}

#[tokio::test]
async fn file_sink_writes_every_event_once_across_a_replay() {
    let stack = Stack::from_env();
    let mut s = StreamSettings::new(unique("files"));
    s.partitions = 2;
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let dir = tempfile::tempdir().expect("dir");
    let dir_arg = dir.path().to_str().expect("path").to_owned();
    let sent = events(&name, 400, "f");
    produce(&stack, &name, &sent).await.expect("produce");
    let extra = [
        "--sink",
        "file",
        "--record-directory",
        dir_arg.as_str(),
        "--file-max-bytes",
        "20000",
    ];

    let read = |dir: std::path::PathBuf, name: String| async move {
        sluice_collector::sink::file::read_all(&dir, &name).map_err(anyhow::Error::from)
    };
    let first = start(&pipeline, &stack, &unique("g"), &extra);
    wait_for("400 lines on disk", LIMIT, || {
        let r = read(dir.path().to_owned(), name.clone());
        async move { Ok((r.await?.len() >= 400).then_some(())) }
    })
    .await
    .expect("written");
    first.stop().await;
    // Same directory, new group: every record is delivered again and skipped.
    replay_all(&stack, &pipeline, &name, &extra).await;
    let lines = read(dir.path().to_owned(), name.clone())
        .await
        .expect("read");
    let written: Vec<String> = lines
        .iter()
        .map(|l| l["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(written.len(), 400, "no line twice");
    assert_eq!(written.iter().cloned().collect::<BTreeSet<_>>(), ids(&sent));
    let segments = std::fs::read_dir(dir.path().join(&name).join("0"))
        .expect("dir")
        .count();
    assert!(segments > 1, "segments rotated at 20,000 bytes");
}

#[tokio::test]
async fn postgres_sink_upserts_rows_and_a_replay_adds_none() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("points"));
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let table = format!("t_{}", uuid::Uuid::now_v7().simple());
    let sent = events(&name, 250, "p");
    produce(&stack, &name, &sent).await.expect("produce");
    let extra = ["--sink", "postgres", "--table", table.as_str()];
    let pool = sqlx::PgPool::connect(&stack.database_url)
        .await
        .expect("pg");
    let count = |pool: sqlx::PgPool, table: String| async move {
        let n: i64 = sqlx::query(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&pool)
            .await?
            .get(0);
        anyhow::Ok(n)
    };

    let first = start(&pipeline, &stack, &unique("g"), &extra);
    wait_for("250 rows", LIMIT, || {
        let c = count(pool.clone(), table.clone());
        async move { Ok((c.await.unwrap_or(0) >= 250).then_some(())) }
    })
    .await
    .expect("rows");
    first.stop().await;
    replay_all(&stack, &pipeline, &name, &extra).await;
    assert_eq!(
        count(pool.clone(), table.clone()).await.expect("count"),
        250
    );
    let row = sqlx::query(&format!(
        "SELECT key, payload FROM {table} WHERE stream = $1 AND id = 'p-12'"
    ))
    .bind(&name)
    .fetch_one(&pool)
    .await
    .expect("row");
    let payload: Value = row.get(1);
    assert_eq!(row.get::<Option<String>, _>(0).as_deref(), Some("user-2"));
    assert_eq!(payload["n"], 12);
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .expect("drop");
}

#[tokio::test]
async fn redis_index_sink_keeps_senders_with_unsent_messages() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("chat"));
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let mut msgs = Vec::new();
    for (i, (from, to)) in [
        ("ann", "bob"),
        ("cyd", "bob"),
        ("ann", "bob"),
        ("bob", "ann"),
    ]
    .iter()
    .enumerate()
    {
        let mut e = Envelope::new(
            &name,
            Some((*to).to_owned()),
            json!({"fromuser": from, "touser": to, "msg": "hi"}),
        );
        e.id = format!("m{i}");
        msgs.push(e);
    }
    produce(&stack, &name, &msgs).await.expect("produce");
    let running = start(&pipeline, &stack, &unique("g"), &["--sink", "redis-index"]);
    let mut redis = stack.redis().await.expect("redis");
    let key = format!("{}:unsent:bob", pipeline.key_prefix);
    let senders = wait_for("bob's senders", LIMIT, || {
        let mut redis = redis.clone();
        let key = key.clone();
        async move {
            let mut s: Vec<String> = redis.smembers(&key).await?;
            s.sort();
            Ok((s.len() >= 2).then_some(s))
        }
    })
    .await
    .expect("index");
    assert_eq!(senders, ["ann", "cyd"]);
    let ann: Vec<String> = redis
        .smembers(format!("{}:unsent:ann", pipeline.key_prefix))
        .await
        .expect("smembers");
    assert_eq!(ann, ["bob"]);
    running.stop().await;
}

#[tokio::test]
async fn poison_goes_to_the_dead_letter_topic_and_the_events_behind_it_are_written() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("poison"));
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let before = events(&name, 10, "a");
    let after = events(&name, 10, "b");
    produce(&stack, &name, &before).await.expect("produce");
    produce_raw(&stack, &name, "k", b"{this is not an event")
        .await
        .expect("poison");
    produce(&stack, &name, &after).await.expect("produce");

    let running = start(&pipeline, &stack, &unique("g"), &[]);
    let stored = await_redis(&stack, &pipeline.key_prefix, &name, 20).await;
    let mut sent = ids(&before);
    sent.extend(ids(&after));
    assert_eq!(stored, sent);
    let dlq = wait_for("the poison on the dead-letter topic", LIMIT, || async {
        Ok((topic_len(&stack, &format!("{name}.dlq"))? >= 1).then_some(()))
    });
    dlq.await.expect("dlq");
    let dead = dead_letters(&stack, &name).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        rdkafka::Message::payload(&dead[0]),
        Some(&b"{this is not an event"[..])
    );
    let reason = header(&dead[0], "sluice-error").expect("reason header");
    assert!(reason.contains("not a Sluice event envelope"), "{reason}");
    running.stop().await;
}

fn header(m: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    rdkafka::Message::headers(m)
        .and_then(|h| h.iter().find(|h| h.key == name))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn retry_pipeline(stream: StreamSettings, max_attempts: u32, backoff: &str) -> PipelineSettings {
    PipelineSettings {
        streams: vec![stream],
        retry: RetrySettings {
            max_attempts,
            backoff: backoff.to_owned(),
        },
    }
}

#[tokio::test]
async fn redis_outage_is_retried_and_every_event_arrives_once_redis_is_back() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("outage"));
    let name = s.name.clone();
    let pipeline = Pipeline::create_with(&stack, retry_pipeline(s, 10, "1s"))
        .await
        .expect("pipeline");
    let proxy = Proxy::start(stack.redis_url.trim_start_matches("redis://"))
        .await
        .expect("proxy");
    let redis_url = format!("redis://127.0.0.1:{}", proxy.port());
    let extra = ["--redis-url", redis_url.as_str(), "--write-attempts", "2"];
    let running = start(&pipeline, &stack, &unique("g"), &extra);
    let first = events(&name, 50, "x");
    produce(&stack, &name, &first).await.expect("produce");
    await_redis(&stack, &pipeline.key_prefix, &name, 50).await;

    proxy.cut();
    let second = events(&name, 50, "y");
    produce(&stack, &name, &second).await.expect("produce");
    // The writes fail and the events go to the retry topic.
    wait_for("events on the retry topic", LIMIT, || async {
        Ok((topic_len(&stack, &format!("{name}.retry"))? > 0).then_some(()))
    })
    .await
    .expect("retried");
    proxy.restore();

    let mut all = ids(&first);
    all.extend(ids(&second));
    let stored = await_redis(&stack, &pipeline.key_prefix, &name, 100).await;
    assert_eq!(stored, all, "every event once; none dead-lettered");
    assert_eq!(topic_len(&stack, &format!("{name}.dlq")).expect("dlq"), 0);
    running.stop().await;
}

#[tokio::test]
async fn postgres_outage_is_retried_and_every_row_arrives() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("pgout"));
    let name = s.name.clone();
    let pipeline = Pipeline::create_with(&stack, retry_pipeline(s, 10, "1s"))
        .await
        .expect("pipeline");
    let db = stack.database_url.trim_start_matches("postgres://");
    let (user, rest) = db.split_once('@').expect("user");
    let (hostport, database) = rest.split_once('/').expect("db");
    let proxy = Proxy::start(hostport).await.expect("proxy");
    let url = format!("postgres://{user}@127.0.0.1:{}/{database}", proxy.port());
    let table = format!("t_{}", uuid::Uuid::now_v7().simple());
    let extra = [
        "--sink",
        "postgres",
        "--database-url",
        url.as_str(),
        "--table",
        table.as_str(),
        "--write-attempts",
        "2",
    ];
    let running = start(&pipeline, &stack, &unique("g"), &extra);
    let pool = sqlx::PgPool::connect(&stack.database_url)
        .await
        .expect("pg");
    let rows = |pool: sqlx::PgPool, table: String| async move {
        let n: i64 = sqlx::query(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&pool)
            .await?
            .get(0);
        anyhow::Ok(n)
    };
    let first = events(&name, 40, "x");
    produce(&stack, &name, &first).await.expect("produce");
    wait_for("40 rows", LIMIT, || {
        let r = rows(pool.clone(), table.clone());
        async move { Ok((r.await.unwrap_or(0) >= 40).then_some(())) }
    })
    .await
    .expect("rows");

    proxy.cut();
    let second = events(&name, 40, "y");
    produce(&stack, &name, &second).await.expect("produce");
    wait_for("events on the retry topic", LIMIT, || async {
        Ok((topic_len(&stack, &format!("{name}.retry"))? > 0).then_some(()))
    })
    .await
    .expect("retried");
    proxy.restore();
    wait_for("80 rows", LIMIT, || {
        let r = rows(pool.clone(), table.clone());
        async move { Ok((r.await.unwrap_or(0) >= 80).then_some(())) }
    })
    .await
    .expect("rows");
    let stored: Vec<String> = sqlx::query(&format!("SELECT id FROM {table}"))
        .fetch_all(&pool)
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut all = ids(&first);
    all.extend(ids(&second));
    assert_eq!(stored.len(), 80);
    assert_eq!(stored.into_iter().collect::<BTreeSet<_>>(), all);
    assert_eq!(topic_len(&stack, &format!("{name}.dlq")).expect("dlq"), 0);
    running.stop().await;
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .expect("drop");
}

#[tokio::test]
async fn an_event_that_never_fits_ends_on_the_dead_letter_topic_after_its_last_attempt() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("unfit"));
    let name = s.name.clone();
    let pipeline = Pipeline::create_with(&stack, retry_pipeline(s, 3, "200ms"))
        .await
        .expect("pipeline");
    let mut msgs = Vec::new();
    for (i, body) in [
        json!({"fromuser": "ann", "touser": "bob"}),
        json!({"fromuser": "ann"}),
        json!({"fromuser": "cyd", "touser": "bob"}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut e = Envelope::new(&name, None, body);
        e.id = format!("u{i}");
        msgs.push(e);
    }
    produce(&stack, &name, &msgs).await.expect("produce");
    let running = start(
        &pipeline,
        &stack,
        &unique("g"),
        &["--sink", "redis-index", "--write-attempts", "1"],
    );
    wait_for(
        "the unfit event on the dead-letter topic",
        LIMIT,
        || async { Ok((topic_len(&stack, &format!("{name}.dlq"))? >= 1).then_some(())) },
    )
    .await
    .expect("dlq");
    let dead = dead_letters(&stack, &name).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(json_of(&dead[0]).expect("json")["id"], "u1");
    assert_eq!(header(&dead[0], "sluice-attempt").as_deref(), Some("3"));
    assert!(
        header(&dead[0], "sluice-error")
            .expect("reason")
            .contains("touser")
    );
    let mut redis = stack.redis().await.expect("redis");
    let mut senders: Vec<String> = redis
        .smembers(format!("{}:unsent:bob", pipeline.key_prefix))
        .await
        .expect("smembers");
    senders.sort();
    assert_eq!(senders, ["ann", "cyd"], "the events around it were written");
    running.stop().await;
}
