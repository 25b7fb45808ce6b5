//! Every sink against the real Kafka, Redis and PostgreSQL: what was sent is written, a
//! replay adds nothing, a minute-long outage under the default settings dead-letters
//! nothing, poison goes through the retry topic to the dead-letter topic.
//!
//! Each failure test counts by id: events sent = events in the sink + events on the
//! dead-letter topic, with no duplicates in the sink.

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Parser;
use redis::AsyncCommands;
use serde_json::{Value, json};
use sluice_collector::{Args, run};
use sluice_core::kafka::{TopicSpec, ensure_topics};
use sluice_core::settings::{RetrySettings, retry_group};
use sluice_core::{Envelope, PipelineSettings, StreamSettings};
use sluice_testkit::{
    Pipeline, Proxy, Stack, committed_to_end, json_of, produce, produce_raw, read_topic, topic_len,
    unique, wait_for,
};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

/// The dead-letter topic of the stream `name` (whose topic is its name).
fn dlq(name: &str) -> String {
    StreamSettings::new(name).dead_letter_topic()
}

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

/// The sum of `field` over a stream's per-minute aggregates in Redis.
async fn counted(stack: &Stack, prefix: &str, stream: &str, field: &str) -> i64 {
    let mut redis = stack.redis().await.expect("redis");
    let agg_keys: Vec<String> = redis
        .keys(format!("{prefix}:agg:{stream}:*"))
        .await
        .expect("keys");
    let mut total = 0i64;
    for key in &agg_keys {
        let count: Option<i64> = redis.hget(key, field).await.expect("hget");
        total += count.unwrap_or(0);
    }
    total
}

async fn dead_letters(stack: &Stack, stream: &str) -> Vec<rdkafka::message::OwnedMessage> {
    read_topic(stack, &format!("{stream}.dlq"))
        .await
        .expect("dlq")
}

/// The shipped default: with a settings file the collector does not create its topics.
#[tokio::test]
async fn a_collector_started_before_its_topics_exist_says_so_once_and_takes_them_up_once_made() {
    let stack = Stack::from_env();
    let mut s = StreamSettings::new(unique("late"));
    s.partitions = 2;
    let name = s.name.clone();
    let topics: Vec<TopicSpec> = [name.clone(), s.retry_topic(), dlq(&name)]
        .into_iter()
        .map(|name| TopicSpec {
            name,
            partitions: 2,
        })
        .collect();
    let pipeline =
        Pipeline::without_topics(PipelineSettings::of_streams(vec![s]).expect("settings"))
            .expect("pipeline");
    let group = unique("g");
    let log = pipeline.settings_path.with_file_name("collector.log");
    let collector = sluice_testkit::Process::spawn_logged(
        "sluice-collector",
        &[
            "--settings",
            pipeline.settings_path.to_str().expect("path"),
            "--kafka-brokers",
            &stack.kafka_brokers,
            "--redis-url",
            &stack.redis_url,
            "--key-prefix",
            &pipeline.key_prefix,
            "--group",
            &group,
        ],
        &[],
        &log,
    )
    .expect("collector");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("both consumers subscribed", LIMIT, || {
        let text = read_log();
        async move { Ok((text.matches("collector subscribed").count() == 2).then_some(())) }
    })
    .await
    .expect("subscribed");
    assert!(
        sluice_testkit::partitions(&stack, &name)
            .expect("metadata")
            .is_none(),
        "the collector created no topic"
    );
    ensure_topics(&stack.kafka(), &topics)
        .await
        .expect("topics");
    let sent = events(&name, 40, "late");
    produce(&stack, &name, &sent).await.expect("produce");
    let stored = await_redis(&stack, &pipeline.key_prefix, &name, sent.len()).await;
    assert_eq!(
        stored,
        ids(&sent),
        "every event written once the topics exist"
    );
    assert!(
        collector.terminate(LIMIT).await.expect("stop"),
        "clean exit"
    );
    let text = read_log();
    let said: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("do not exist yet"))
        .collect();
    assert_eq!(said.len(), 1, "said once:\n{text}");
    for topic in [&name, &dlq(&name)] {
        assert!(
            said[0].contains(&format!("\"{topic}\"")),
            "{topic} named: {}",
            said[0]
        );
    }
    assert!(
        !text.contains("ERROR") && !text.contains("kafka consumer error"),
        "no error for a topic that did not exist yet:\n{text}"
    );
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
    let stored = redis_ids(&stack, &pipeline.key_prefix, &name)
        .await
        .expect("ids");
    assert_eq!(stored.len(), 300);
    let prefix = &pipeline.key_prefix;
    assert_eq!(
        counted(&stack, prefix, &name, "count").await,
        300,
        "each event counted once despite the replay"
    );
    assert_eq!(
        counted(&stack, prefix, &name, "/type=click").await,
        100,
        "counted per dimension value"
    );
    let mut redis = stack.redis().await.expect("redis");
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
        // Segments are cut between batches: small batches, so that several are.
        "--batch-size",
        "50",
    ];

    let read = |dir: std::path::PathBuf, name: String| async move {
        sluice_core::segment::read_all(&dir, &name).map_err(anyhow::Error::from)
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
async fn mysql_sink_upserts_rows_and_a_replay_adds_none() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("points"));
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let table = format!("t_{}", uuid::Uuid::now_v7().simple());
    let mut sent = events(&name, 250, "m");
    sent[7].event_time = "2026-12-01T10:00:05.123456Z".parse().expect("time");
    produce(&stack, &name, &sent).await.expect("produce");
    let extra = [
        "--sink",
        "mysql",
        "--database-url",
        stack.mysql_url.as_str(),
        "--table",
        table.as_str(),
    ];
    let pool = sqlx::MySqlPool::connect(&stack.mysql_url)
        .await
        .expect("mysql");
    let count = |pool: sqlx::MySqlPool, table: String| async move {
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
        "SELECT `key`, CAST(payload AS CHAR), \
         DATE_FORMAT(event_time, '%Y-%m-%dT%H:%i:%s.%fZ') FROM {table} WHERE stream = ? AND id = 'm-7'"
    ))
    .bind(&name)
    .fetch_one(&pool)
    .await
    .expect("row");
    let payload: Value = serde_json::from_str(&row.get::<String, _>(1)).expect("JSON");
    assert_eq!(row.get::<Option<String>, _>(0).as_deref(), Some("user-2"));
    assert_eq!(payload["n"], 7);
    assert_eq!(row.get::<String, _>(2), "2026-12-01T10:00:05.123456Z");
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .expect("drop");
}

/// A proxy in front of the database of `url` (`scheme://user@host:port/database`), and the
/// same URL through it.
async fn through_proxy(url: &str) -> (Proxy, String) {
    let (scheme, db) = url.split_once("://").expect("scheme");
    let (user, rest) = db.split_once('@').expect("user");
    let (hostport, database) = rest.split_once('/').expect("db");
    let proxy = Proxy::start(hostport).await.expect("proxy");
    let through = format!("{scheme}://{user}@127.0.0.1:{}/{database}", proxy.port());
    (proxy, through)
}

#[tokio::test]
async fn mysql_down_for_a_minute_dead_letters_nothing_and_every_row_arrives_once() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("myout"));
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let (proxy, url) = through_proxy(&stack.mysql_url).await;
    let table = format!("t_{}", uuid::Uuid::now_v7().simple());
    let pool = sqlx::MySqlPool::connect(&stack.mysql_url)
        .await
        .expect("mysql");
    // The poison: a time before the year 0, which MySQL's DATETIME cannot hold.
    let mut poison = Envelope::new(&name, None, json!({"text": "from long ago"}));
    poison.id = "poison".to_owned();
    poison.event_time = "-000001-01-01T00:00:00Z".parse().expect("time");
    let stored = || async {
        let rows = sqlx::query(&format!("SELECT id FROM {table}"))
            .fetch_all(&pool)
            .await;
        // The table appears once the collector reached the database.
        Ok(rows
            .unwrap_or_default()
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect())
    };
    sink_outage_under_load(
        &stack,
        &pipeline,
        &name,
        (
            &proxy,
            &[
                "--sink",
                "mysql",
                "--database-url",
                url.as_str(),
                "--table",
                table.as_str(),
            ],
        ),
        "mysql",
        (poison, "Incorrect datetime value"),
        stored,
    )
    .await;
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
    // An event that names another stream than the one whose topic it is on.
    let other = format!("{name}-other");
    let mut stray = Envelope::new(&other, None, json!({"n": 0}));
    stray.id = "stray".to_owned();
    produce(&stack, &name, &[stray]).await.expect("stray");
    produce(&stack, &name, &after).await.expect("produce");

    let running = start(&pipeline, &stack, &unique("g"), &[]);
    let stored = await_redis(&stack, &pipeline.key_prefix, &name, 20).await;
    let mut sent = ids(&before);
    sent.extend(ids(&after));
    assert_eq!(stored, sent);
    let dlq = wait_for("the poison on the dead-letter topic", LIMIT, || async {
        Ok((topic_len(&stack, &dlq(&name))? >= 2).then_some(()))
    });
    dlq.await.expect("dlq");
    let dead = dead_letters(&stack, &name).await;
    assert_eq!(dead.len(), 2);
    assert_eq!(
        rdkafka::Message::payload(&dead[0]),
        Some(&b"{this is not an event"[..])
    );
    let reason = header(&dead[0], "sluice-error").expect("reason header");
    assert!(reason.contains("not a Sluice event envelope"), "{reason}");
    assert_eq!(json_of(&dead[1]).expect("json")["id"], "stray");
    let reason = header(&dead[1], "sluice-error").expect("reason header");
    assert!(
        reason.contains(&format!("names stream \"{other}\"")),
        "{reason}"
    );
    assert!(
        redis_ids(&stack, &pipeline.key_prefix, &other)
            .await
            .expect("keys")
            .is_empty(),
        "nothing written under the other stream's keys"
    );
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
        aggregates: Default::default(),
    }
}

/// How long the sink is cut off in the outage tests.
const OUTAGE: Duration = Duration::from_secs(60);

/// Produces a few events every half second until `stop`; the events it sent.
fn steady_events(
    stack: &Stack,
    stream: &str,
    tag: &'static str,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Envelope>> {
    let (stack, stream) = (stack.clone(), stream.to_owned());
    tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut round = 0;
        while !stop.is_cancelled() {
            let mut batch = events(&stream, 10, tag);
            for e in &mut batch {
                e.id = format!("{}-{round}", e.id);
            }
            produce(&stack, &stream, &batch).await.expect("produce");
            sent.extend(batch);
            round += 1;
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        sent
    })
}

/// `/readyz` and `/metrics` of a collector's metrics port.
async fn collector_state(port: u16) -> anyhow::Result<(u16, String)> {
    let base = format!("http://127.0.0.1:{port}");
    let ready = reqwest::get(format!("{base}/readyz"))
        .await?
        .status()
        .as_u16();
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?;
    Ok((ready, metrics))
}

/// A sink cut off for [`OUTAGE`] under a steady stream, with the pipeline's default retry
/// policy and the collector's default flags; one poison event (that the sink rejects for
/// itself, with an error that says `rejected_for`) is sent during the outage. Afterwards:
/// the poison alone is on the dead-letter topic, after its last attempt; every other event is in the sink (`stored` lists the ids
/// there, one per stored copy); both groups are committed to the end.
/// The collector runs with the sink flags `sink_args` (through `proxy`) and nothing else
/// beyond the connections.
async fn sink_outage_under_load<F, Fut>(
    stack: &Stack,
    pipeline: &Pipeline,
    name: &str,
    (proxy, sink_args): (&Proxy, &[&str]),
    sink: &str,
    (poison, rejected_for): (Envelope, &str),
    stored: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<String>>>,
{
    let metrics_port = sluice_testkit::free_port().expect("port");
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let group = unique("g");
    let mut args = sink_args.to_vec();
    args.extend(["--metrics-listen", metrics_listen.as_str()]);
    let running = start(pipeline, stack, &group, &args);
    let first = events(name, 50, "x");
    produce(stack, name, &first).await.expect("produce");
    wait_for("the first events in the sink", LIMIT, || async {
        Ok((stored().await?.len() >= 50).then_some(()))
    })
    .await
    .expect("first events");

    let cut_at = tokio::time::Instant::now();
    proxy.cut();
    let stop = CancellationToken::new();
    let steady = steady_events(stack, name, "y", stop.clone());
    // The wait is visible: readiness fails and the metrics say since when.
    let seen = wait_for(
        "the collector to report the sink unavailable",
        LIMIT,
        || async {
            let (ready, metrics) = collector_state(metrics_port).await?;
            let down = format!("sluice_collector_sink_available{{sink=\"{sink}\"}} 0");
            Ok((ready == 503 && metrics.contains(&down)).then_some(metrics))
        },
    )
    .await
    .expect("outage reported");
    assert!(
        seen.contains(&format!(
            "sluice_collector_sink_errors_total{{sink=\"{sink}\",kind=\"unavailable\"}}"
        )),
        "{seen}"
    );
    produce(stack, name, std::slice::from_ref(&poison))
        .await
        .expect("poison");
    tokio::time::sleep_until(cut_at + OUTAGE).await;
    assert_eq!(
        topic_len(stack, &dlq(name)).expect("dlq"),
        0,
        "nothing dead-lettered during the outage"
    );
    proxy.restore();
    let sent = {
        // The stream goes on for a while after the sink is back.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        steady.await.expect("steady producer")
    };

    let mut all = ids(&first);
    all.extend(ids(&sent));
    let want = all.len();
    let got = wait_for(&format!("{want} events in the sink"), LIMIT * 2, || async {
        let got = stored().await?;
        Ok((got.len() >= want).then_some(got))
    })
    .await
    .expect("every event");
    assert_eq!(got.len(), want, "no event stored twice");
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), all);
    // The poison goes through the retry topic to the dead-letter topic on the default
    // policy (5 attempts, 1 s doubling).
    wait_for("the poison on the dead-letter topic", LIMIT, || async {
        Ok((topic_len(stack, &dlq(name))? >= 1).then_some(()))
    })
    .await
    .expect("dlq");
    let dead = dead_letters(stack, name).await;
    assert_eq!(dead.len(), 1, "the poison alone is dead-lettered");
    assert_eq!(json_of(&dead[0]).expect("json")["id"], poison.id.as_str());
    assert_eq!(header(&dead[0], "sluice-attempt").as_deref(), Some("5"));
    let reason = header(&dead[0], "sluice-error").expect("reason");
    assert!(reason.contains(rejected_for), "{reason}");
    for (g, topic) in [
        (group.to_owned(), name.to_owned()),
        (retry_group(&group), StreamSettings::new(name).retry_topic()),
    ] {
        wait_for(
            &format!("{g} committed to the end of {topic}"),
            LIMIT,
            || async { Ok(committed_to_end(stack, &g, &topic)?.then_some(())) },
        )
        .await
        .expect("lag 0");
    }
    let (ready, metrics) = collector_state(metrics_port).await.expect("state");
    assert_eq!(ready, 200, "ready again");
    assert!(
        metrics.contains(&format!(
            "sluice_collector_sink_available{{sink=\"{sink}\"}} 1"
        )),
        "{metrics}"
    );
    running.stop().await;
}

#[tokio::test]
async fn redis_down_for_a_minute_dead_letters_nothing_and_every_event_arrives_once() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("outage"));
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let proxy = Proxy::start(stack.redis_url.trim_start_matches("redis://"))
        .await
        .expect("proxy");
    let redis_url = format!("redis://127.0.0.1:{}", proxy.port());
    // The poison: its record key already holds a list, so Redis refuses to store it.
    let mut poison = Envelope::new(&name, None, json!({"n": -1}));
    poison.id = "poison".to_owned();
    let mut redis = stack.redis().await.expect("redis");
    let _: i64 = redis
        .rpush(
            sluice_core::store::record_key(&pipeline.key_prefix, &name, "poison"),
            "not a record",
        )
        .await
        .expect("rpush");
    let stored = || async {
        let mut ids = redis_ids(&stack, &pipeline.key_prefix, &name).await?;
        ids.remove("poison");
        Ok(ids.into_iter().collect())
    };
    sink_outage_under_load(
        &stack,
        &pipeline,
        &name,
        (&proxy, &["--redis-url", redis_url.as_str()]),
        "redis",
        (poison, "WRONGTYPE"),
        &stored,
    )
    .await;
    // Each stored event is counted once, although the batches that held the poison were
    // written again and then event by event; the poison is not counted.
    let want = stored().await.expect("ids").len();
    assert_eq!(
        counted(&stack, &pipeline.key_prefix, &name, "count").await,
        i64::try_from(want).expect("count")
    );
}

#[tokio::test]
async fn postgres_down_for_a_minute_dead_letters_nothing_and_every_row_arrives_once() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("pgout"));
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let (proxy, url) = through_proxy(&stack.database_url).await;
    let table = format!("t_{}", uuid::Uuid::now_v7().simple());
    let pool = sqlx::PgPool::connect(&stack.database_url)
        .await
        .expect("pg");
    // The poison: PostgreSQL cannot store a NUL character in jsonb.
    let mut poison = Envelope::new(&name, None, json!({"text": "\u{0}"}));
    poison.id = "poison".to_owned();
    let stored = || async {
        let rows = sqlx::query(&format!("SELECT id FROM {table}"))
            .fetch_all(&pool)
            .await;
        // The table appears once the collector reached the database.
        Ok(rows
            .unwrap_or_default()
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect())
    };
    sink_outage_under_load(
        &stack,
        &pipeline,
        &name,
        (
            &proxy,
            &[
                "--sink",
                "postgres",
                "--database-url",
                url.as_str(),
                "--table",
                table.as_str(),
            ],
        ),
        "postgres",
        (poison, "unsupported Unicode escape"),
        stored,
    )
    .await;
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
        || async { Ok((topic_len(&stack, &dlq(&name))? >= 1).then_some(())) },
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

#[tokio::test]
async fn redrive_sends_dead_lettered_events_back_once_the_sink_takes_them() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("redrive"));
    let name = s.name.clone();
    let pipeline = Pipeline::create_with(&stack, retry_pipeline(s, 2, "200ms"))
        .await
        .expect("pipeline");
    // Two events Redis refuses while their keys hold lists.
    let mut redis = stack.redis().await.expect("redis");
    let blocked = ["r-1", "r-2"];
    for id in blocked {
        let _: i64 = redis
            .rpush(
                sluice_core::store::record_key(&pipeline.key_prefix, &name, id),
                "in the way",
            )
            .await
            .expect("rpush");
    }
    let mut sent = events(&name, 5, "ok");
    for id in blocked {
        let mut e = Envelope::new(&name, None, json!({"n": id}));
        e.id = id.to_owned();
        sent.push(e);
    }
    produce(&stack, &name, &sent).await.expect("produce");
    let group = unique("g");
    let running = start(&pipeline, &stack, &group, &["--write-attempts", "1"]);
    wait_for("both on the dead-letter topic", LIMIT, || async {
        Ok((topic_len(&stack, &dlq(&name))? >= 2).then_some(()))
    })
    .await
    .expect("dlq");

    // What was in the way is removed; the dead letters go back to the stream's topic.
    for id in blocked {
        let _: i64 = redis
            .del(sluice_core::store::record_key(
                &pipeline.key_prefix,
                &name,
                id,
            ))
            .await
            .expect("del");
    }
    let settings = pipeline.settings_path.to_str().expect("path");
    let redrive_group = unique("redrive");
    let redrive = || {
        let args = sluice_collector::redrive::RedriveArgs::parse_from([
            "sluice-collector redrive",
            "--settings",
            settings,
            "--kafka-brokers",
            stack.kafka_brokers.as_str(),
            "--stream",
            name.as_str(),
            "--group",
            redrive_group.as_str(),
        ]);
        async move { sluice_collector::redrive::redrive(&args).await }
    };
    let done = redrive().await.expect("redrive");
    assert_eq!(
        (done.records, done.from.as_str(), done.to.as_str()),
        (2, dlq(&name).as_str(), name.as_str())
    );
    let stored = await_redis(&stack, &pipeline.key_prefix, &name, 7).await;
    assert_eq!(stored, ids(&sent), "every event in the sink");
    let copies = read_topic(&stack, &name).await.expect("stream topic");
    let redriven: Vec<_> = copies
        .iter()
        .filter(|m| header(m, "sluice-redriven-from").is_some())
        .collect();
    assert_eq!(redriven.len(), 2);
    assert!(
        redriven
            .iter()
            .all(|m| header(m, "sluice-attempt").is_none() && header(m, "sluice-error").is_none()),
        "sent back as new events"
    );
    // A second redrive has nothing left to send.
    assert_eq!(redrive().await.expect("redrive").records, 0);
    running.stop().await;
}

#[tokio::test]
async fn every_sink_keeps_the_first_event_stored_under_an_id() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("same"));
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    // Two events with one id (a client's retry with other content, say), in that order.
    let mut first = Envelope::new(&name, Some("k".into()), json!({"v": 1}));
    first.id = "same".to_owned();
    let mut second = Envelope::new(&name, Some("k".into()), json!({"v": 2}));
    second.id = "same".to_owned();
    let mut other = Envelope::new(&name, Some("k".into()), json!({"v": 3}));
    other.id = "other".to_owned();
    produce(&stack, &name, &[first, second, other])
        .await
        .expect("produce");

    let table = format!("t_{}", uuid::Uuid::now_v7().simple());
    let dir = tempfile::tempdir().expect("dir");
    let dir_arg = dir.path().to_str().expect("path").to_owned();
    let collectors = [
        start(&pipeline, &stack, &unique("g"), &[]),
        start(
            &pipeline,
            &stack,
            &unique("g"),
            &["--sink", "postgres", "--table", table.as_str()],
        ),
        start(
            &pipeline,
            &stack,
            &unique("g"),
            &["--sink", "file", "--record-directory", dir_arg.as_str()],
        ),
        start(
            &pipeline,
            &stack,
            &unique("g"),
            &[
                "--sink",
                "mysql",
                "--database-url",
                stack.mysql_url.as_str(),
                "--table",
                table.as_str(),
            ],
        ),
    ];
    let pool = sqlx::PgPool::connect(&stack.database_url)
        .await
        .expect("pg");
    let mysql = sqlx::MySqlPool::connect(&stack.mysql_url)
        .await
        .expect("mysql");
    let stored = wait_for("both ids in every sink", LIMIT, || async {
        let mut redis = stack.redis().await?;
        let record: Option<String> = redis
            .get(sluice_core::store::record_key(
                &pipeline.key_prefix,
                &name,
                "same",
            ))
            .await?;
        let others: Option<String> = redis
            .get(sluice_core::store::record_key(
                &pipeline.key_prefix,
                &name,
                "other",
            ))
            .await?;
        let rows = sqlx::query(&format!("SELECT id, payload FROM {table} ORDER BY id"))
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
        let my_rows = sqlx::query(&format!(
            "SELECT id, CAST(payload AS CHAR) FROM {table} ORDER BY id"
        ))
        .fetch_all(&mysql)
        .await
        .unwrap_or_default();
        let lines = sluice_core::segment::read_all(dir.path(), &name)?;
        let done = others.is_some()
            && rows.len() == 2
            && my_rows.len() == 2
            && lines.iter().any(|l| l["id"] == "other");
        Ok(done.then_some((record, rows, my_rows, lines)))
    })
    .await
    .expect("stored");
    let (record, rows, my_rows, lines) = stored;
    let record: Value = serde_json::from_str(&record.expect("record")).expect("json");
    assert_eq!(record["payload"]["v"], 1, "Redis keeps the first");
    assert_eq!(
        counted(&stack, &pipeline.key_prefix, &name, "count").await,
        2,
        "Redis counts the id once"
    );
    let payload: Value = rows[1].get(1);
    assert_eq!(
        (rows[1].get::<String, _>(0).as_str(), payload["v"].as_i64()),
        ("same", Some(1)),
        "PostgreSQL keeps the first"
    );
    let payload: Value = serde_json::from_str(&my_rows[1].get::<String, _>(1)).expect("JSON");
    assert_eq!(
        (
            my_rows[1].get::<String, _>(0).as_str(),
            payload["v"].as_i64()
        ),
        ("same", Some(1)),
        "MySQL keeps the first"
    );
    let same: Vec<&Value> = lines.iter().filter(|l| l["id"] == "same").collect();
    assert_eq!(same.len(), 1, "one line for the id: {lines:?}");
    assert_eq!(same[0]["payload"]["v"], 1, "the file keeps the first");
    for c in collectors {
        c.stop().await;
    }
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .expect("drop");
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mysql)
        .await
        .expect("drop");
}

#[tokio::test]
async fn the_file_sink_writes_events_from_the_retry_topic_once() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("fretry"));
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let dir = tempfile::tempdir().expect("dir");
    let dir_arg = dir.path().to_str().expect("path").to_owned();
    // Events on the stream's topic, and others on its retry topic (as a rejected write
    // leaves them), whose offsets there are as low as those on the stream's topic.
    let main = events(&name, 20, "m");
    let retried = events(&name, 5, "r");
    produce(&stack, &name, &main).await.expect("produce");
    produce(&stack, &StreamSettings::new(&name).retry_topic(), &retried)
        .await
        .expect("produce retry");
    let running = start(
        &pipeline,
        &stack,
        &unique("g"),
        &["--sink", "file", "--record-directory", dir_arg.as_str()],
    );
    let mut want = ids(&main);
    want.extend(ids(&retried));
    let lines = wait_for("every event on disk", LIMIT, || async {
        let lines = sluice_core::segment::read_all(dir.path(), &name)?;
        Ok((lines.len() >= want.len()).then_some(lines))
    })
    .await
    .expect("written");
    running.stop().await;
    let got: Vec<String> = lines
        .iter()
        .map(|l| l["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(got.len(), want.len(), "each event once: {got:?}");
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), want);
}

/// A Redis of the test's own on 127.0.0.1, started with the arguments the operator gives
/// the managed primary's pod (`redis_primary_args` of the default spec), its data in
/// `dir`.
/// Waits for the Redis of `stack` to answer PING.
async fn answers_ping(stack: &Stack) {
    wait_for("the test's Redis to answer", LIMIT, || async {
        let mut c = stack.redis().await?;
        let pong: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok((pong == "PONG").then_some(()))
    })
    .await
    .expect("redis");
}

struct ManagedRedis {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
    password: Option<String>,
}

impl ManagedRedis {
    /// A Redis with the managed primary's arguments, requiring `password` when given as
    /// the operator's pods do.
    fn start(dir: &std::path::Path, port: u16, password: Option<&str>) -> Self {
        let spec = sluice_operator::crd::RedisSpec::default();
        let dir_text = dir.to_str().expect("path");
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(sluice_operator::plan::redis_primary_args(&spec, dir_text))
            .args(
                password
                    .map(sluice_operator::plan::redis_auth_args)
                    .unwrap_or_default(),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/setup installs it)");
        Self {
            child,
            port,
            dir: dir.to_owned(),
            password: password.map(str::to_owned),
        }
    }

    /// SIGKILL, then the same process again on the same port and folder.
    fn kill_and_restart(&mut self) -> Self {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
        Self::start(&self.dir, self.port, self.password.as_deref())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for ManagedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_redis_that_requires_a_password_takes_writes_from_a_collector_given_it() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("locked"));
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let dir = tempfile::tempdir().expect("dir");
    let port = sluice_testkit::free_port().expect("port");
    let password = "the-pipelines-redis-password";
    let server = ManagedRedis::start(dir.path(), port, Some(password));
    let reader = Stack {
        redis_url: format!("redis://:{password}@127.0.0.1:{port}"),
        ..stack.clone()
    };
    answers_ping(&reader).await;
    let url = server.url();

    // A wrong password: the collector does not start, and says why.
    let wrong = start(
        &pipeline,
        &stack,
        &unique("g"),
        &["--redis-url", &url, "--redis-password", "not-the-password"],
    );
    let failed = tokio::time::timeout(LIMIT, wrong.task)
        .await
        .expect("the collector gives up")
        .expect("joined")
        .expect_err("a wrong password is refused");
    let message = format!("{failed:#}");
    assert!(
        message.to_lowercase().contains("password"),
        "the error names the password: {message}"
    );

    // The password given apart from the URL (as the operator's pods give it).
    let group = unique("g");
    let running = start(
        &pipeline,
        &stack,
        &group,
        &["--redis-url", &url, "--redis-password", password],
    );
    let batch = events(&name, 50, "locked");
    produce(&stack, &name, &batch).await.expect("produce");
    let sent = ids(&batch);
    wait_for("every event in the locked Redis", LIMIT, || async {
        let got = redis_ids(&reader, &pipeline.key_prefix, &name).await?;
        Ok((got == sent).then_some(()))
    })
    .await
    .expect("written");
    running.stop().await;
}

#[tokio::test]
async fn a_redis_killed_mid_write_with_the_operators_arguments_keeps_every_committed_event() {
    let stack = Stack::from_env();
    let s = StreamSettings::new(unique("killed"));
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await.expect("pipeline");
    let dir = tempfile::tempdir().expect("dir");
    let port = sluice_testkit::free_port().expect("port");
    let mut server = ManagedRedis::start(dir.path(), port, None);
    let own = Stack {
        redis_url: server.url(),
        ..stack.clone()
    };
    answers_ping(&own).await;
    let group = unique("g");
    let running = start(&pipeline, &own, &group, &[]);

    // A stream of events that keeps the collector writing while Redis is killed.
    let stop = CancellationToken::new();
    let producer = {
        let (stack, name, stop) = (stack.clone(), name.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = BTreeSet::new();
            let mut round = 0;
            while !stop.is_cancelled() {
                let mut batch = events(&name, 200, "k");
                for e in &mut batch {
                    e.id = format!("{}-{round}", e.id);
                }
                produce(&stack, &name, &batch).await.expect("produce");
                sent.extend(ids(&batch));
                round += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            sent
        })
    };
    for kill in 1..=2 {
        wait_for("the collector to write", LIMIT, || async {
            let got = redis_ids(&own, &pipeline.key_prefix, &name).await?;
            Ok((got.len() >= 1_000 * kill).then_some(()))
        })
        .await
        .expect("writing");
        server = server.kill_and_restart();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let sent = producer.await.expect("producer");

    wait_for(
        &format!("{group} committed to the end of {name}"),
        LIMIT,
        || async { Ok(committed_to_end(&stack, &group, &name)?.then_some(())) },
    )
    .await
    .expect("lag 0");
    let stored = redis_ids(&own, &pipeline.key_prefix, &name)
        .await
        .expect("ids");
    let missing: Vec<&String> = sent.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "{} of {} events committed by the collector are not in Redis after two SIGKILLs, first: {:?}",
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(
        topic_len(&stack, &dlq(&name)).expect("dlq"),
        0,
        "nothing dead-lettered"
    );
    running.stop().await;
}
