//! `ack=sink` end to end: the real `sluice-ingest` and `sluice-collector` binaries, the real
//! Kafka, Redis, PostgreSQL and MariaDB. An answer given with `"sink": "written"` means the
//! record is readable at once, from any ingest instance and from every database the
//! stream's collectors write; a collector killed while requests wait delays the answers
//! but loses nothing; a dead-lettered event answers with the collector's reason.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, ensure};
use futures::{SinkExt, StreamExt};
use redis::AsyncCommands;
use serde_json::{Value, json};
use sluice_core::StreamSettings;
use sluice_core::settings::{RecordStore, StoreKind};
use sluice_testkit::{IngestPorts, Pipeline, Process, Stack, free_port, unique, wait_for};
use sqlx::Row;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

const LIMIT: Duration = Duration::from_secs(60);

/// One ingest process with its HTTP base and TCP write port.
struct Ingest {
    _process: Process,
    base: String,
    /// Base of `/metrics`.
    metrics: String,
    tcp: String,
}

/// A pipeline of one stream whose `ackBy` names `groups`.
struct Setup {
    stack: Stack,
    pipeline: Pipeline,
    stream: String,
    table: String,
}

impl Setup {
    async fn new(groups: &[&str]) -> anyhow::Result<Self> {
        Self::with_store(groups, None).await
    }

    /// Like [`Setup::new`], with the stream's records read from a SQL table of `kind`.
    async fn with_store(groups: &[&str], kind: Option<StoreKind>) -> anyhow::Result<Self> {
        let stack = Stack::from_env();
        let table = unique("acks").replace('-', "_");
        let mut stream = StreamSettings::new(unique("acks"));
        stream.partitions = 4;
        stream.ack_by = groups.iter().map(|g| (*g).to_owned()).collect();
        stream.store = kind.map(|kind| RecordStore {
            kind,
            table: table.clone(),
        });
        let name = stream.name.clone();
        let pipeline = Pipeline::create(&stack, vec![stream]).await?;
        Ok(Self {
            stack,
            pipeline,
            stream: name,
            table,
        })
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SLUICE_KAFKA_BROKERS", self.stack.kafka_brokers.clone()),
            ("SLUICE_REDIS_URL", self.stack.redis_url.clone()),
            (
                "SLUICE_SETTINGS",
                self.pipeline.settings_path.display().to_string(),
            ),
            ("SLUICE_KEY_PREFIX", self.pipeline.key_prefix.clone()),
        ]
    }

    fn spawn(&self, binary: &str, args: &[&str]) -> anyhow::Result<Process> {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Process::spawn(binary, args, &env)
    }

    async fn ingest(&self) -> anyhow::Result<Ingest> {
        self.ingest_with(&[]).await
    }

    async fn ingest_with(&self, extra: &[&str]) -> anyhow::Result<Ingest> {
        let ports = IngestPorts::free()?;
        let tcp = format!("127.0.0.1:{}", free_port()?);
        let mut args = ports.flags().to_vec();
        args.extend(["--tcp-write-listen", &tcp, "--tcp-stream", &self.stream]);
        args.extend(extra);
        let process = self.spawn("sluice-ingest", &args)?;
        ports.healthy(LIMIT).await?;
        Ok(Ingest {
            _process: process,
            base: ports.base(),
            metrics: ports.metrics_base(),
            tcp,
        })
    }

    /// A collector of the stream in `group`, writing to `sink`.
    fn collector(&self, group: &str, sink: &str) -> anyhow::Result<Process> {
        let url = match sink {
            "mysql" => self.stack.mysql_url.clone(),
            _ => self.stack.database_url.clone(),
        };
        self.spawn(
            "sluice-collector",
            &[
                "--group",
                group,
                "--sink",
                sink,
                "--database-url",
                &url,
                "--table",
                &self.table,
            ],
        )
    }

    async fn in_redis(&self, id: &str) -> anyhow::Result<bool> {
        let mut redis = self.stack.redis().await?;
        let key = format!("{}:{}:{id}", self.pipeline.key_prefix, self.stream);
        Ok(redis.exists(&key).await?)
    }
}

/// The answer of an `ack=sink` POST: status and body.
async fn post(
    client: &reqwest::Client,
    base: &str,
    stream: &str,
    timeout: &str,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    let response = client
        .post(format!(
            "{base}/v1/streams/{stream}/events?ack=sink&timeout={timeout}"
        ))
        .json(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// Checks, right after an answer, that the record is readable everywhere: GET from the
/// other ingest instance, and a row in PostgreSQL and in MySQL.
struct Readers {
    http: reqwest::Client,
    base: String,
    stream: String,
    table: String,
    postgres: sqlx::PgPool,
    mysql: sqlx::MySqlPool,
}

impl Readers {
    async fn check(&self, id: &str) -> anyhow::Result<()> {
        let got = self
            .http
            .get(format!(
                "{}/v1/streams/{}/records/{id}",
                self.base, self.stream
            ))
            .send()
            .await?;
        ensure!(got.status() == 200, "GET {id} answered {}", got.status());
        let pg: i64 = sqlx::query(&format!(
            "SELECT count(*) FROM {} WHERE stream = $1 AND id = $2",
            self.table
        ))
        .bind(&self.stream)
        .bind(id)
        .fetch_one(&self.postgres)
        .await?
        .get(0);
        ensure!(pg == 1, "{id}: {pg} rows in PostgreSQL");
        let my: i64 = sqlx::query(&format!(
            "SELECT count(*) FROM {} WHERE stream = ? AND id = ?",
            self.table
        ))
        .bind(&self.stream)
        .bind(id)
        .fetch_one(&self.mysql)
        .await?
        .get(0);
        ensure!(my == 1, "{id}: {my} rows in MySQL");
        Ok(())
    }
}

#[tokio::test]
async fn every_answer_of_ack_sink_is_readable_at_once_from_every_sink_and_instance()
-> anyhow::Result<()> {
    let (redis_group, pg_group, my_group) = (unique("redis"), unique("pg"), unique("my"));
    let setup = Setup::new(&[&redis_group, &pg_group, &my_group]).await?;
    let (a, b) = (setup.ingest().await?, setup.ingest().await?);
    // Two processes share the Redis group; PostgreSQL and MySQL have one each.
    let _collectors = [
        setup.collector(&redis_group, "redis")?,
        setup.collector(&redis_group, "redis")?,
        setup.collector(&pg_group, "postgres")?,
        setup.collector(&my_group, "mysql")?,
    ];
    let readers_of = |base: String| {
        let (stream, table) = (setup.stream.clone(), setup.table.clone());
        let (pg, my) = (
            setup.stack.database_url.clone(),
            setup.stack.mysql_url.clone(),
        );
        async move {
            anyhow::Ok(Readers {
                http: reqwest::Client::new(),
                base,
                stream,
                table,
                postgres: sqlx::PgPool::connect(&pg).await?,
                mysql: sqlx::MySqlPool::connect(&my).await?,
            })
        }
    };
    // What is written through A is read through B, and the other way round.
    let (read_on_b, read_on_a) = (
        readers_of(b.base.clone()).await?,
        readers_of(a.base.clone()).await?,
    );
    let client = reqwest::Client::new();
    let stream = setup.stream.as_str();
    let mut confirmed = BTreeSet::new();

    // 600 single events over HTTP, 8 at a time, alternating between the instances.
    let singles = futures::stream::iter(0..600)
        .map(|n| {
            let (client, base, readers) = if n % 2 == 0 {
                (&client, &a.base, &read_on_b)
            } else {
                (&client, &b.base, &read_on_a)
            };
            async move {
                let id = format!("h{n}");
                let (status, body) =
                    post(client, base, stream, "30s", &json!({"id": id, "n": n})).await?;
                ensure!(status == 202, "{id}: {status} {body}");
                ensure!(body["sink"] == "written", "{id}: {body}");
                readers.check(&id).await?;
                anyhow::Ok(id)
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for id in singles {
        confirmed.insert(id?);
    }

    // A batch of 100.
    let batch: Vec<Value> = (0..100).map(|n| json!({"id": format!("b{n}")})).collect();
    let (status, body) = post(&client, &b.base, stream, "30s", &json!(batch)).await?;
    ensure!(status == 202, "batch: {status} {body}");
    for event in body["events"].as_array().context("events")? {
        ensure!(event["sink"] == "written", "{event}");
        let id = event["id"].as_str().context("id")?;
        read_on_a.check(id).await?;
        confirmed.insert(id.to_owned());
    }

    // 200 WebSocket messages on one connection to A, the connection's level ack=sink.
    let url = format!(
        "{}/v1/streams/{stream}/ws?ack=sink&timeout=30s",
        a.base.replace("http://", "ws://")
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await?;
    for n in 0..200 {
        let id = format!("w{n}");
        socket
            .send(Message::text(json!({"id": id}).to_string()))
            .await?;
        let reply = loop {
            match socket.next().await.context("socket closed")?? {
                Message::Text(t) => break serde_json::from_str::<Value>(&t)?,
                _ => continue,
            }
        };
        ensure!(
            reply == json!({"ok": true, "ids": [id], "sink": "written"}),
            "{reply}"
        );
        read_on_b.check(&id).await?;
        confirmed.insert(id);
    }

    // 100 lines on B's TCP write port after `ack sink`.
    let (read, mut write) = tokio::net::TcpStream::connect(&b.tcp).await?.into_split();
    let mut answers = BufReader::new(read).lines();
    write.write_all(b"ack sink 30s\n").await?;
    ensure!(answers.next_line().await?.as_deref() == Some("ok ack sink"));
    for n in 0..100 {
        let id = format!("t{n}");
        write
            .write_all(format!("{}\n", json!({"id": id})).as_bytes())
            .await?;
        let answer = answers.next_line().await?.context("connection closed")?;
        ensure!(answer == format!("ok {id}"), "{answer}");
        read_on_a.check(&id).await?;
        confirmed.insert(id);
    }
    assert_eq!(confirmed.len(), 1000);

    // The default level is unchanged: answered on Kafka's acknowledgement, no sink field.
    let plain = client
        .post(format!("{}/v1/streams/{stream}/events", a.base))
        .json(&json!({"id": "plain"}))
        .send()
        .await?;
    assert_eq!(plain.status(), 202);
    assert_eq!(plain.json::<Value>().await?.get("sink"), None);

    // A counted its 300 single events and 200 messages as written.
    let metrics = client
        .get(format!("{}/metrics", a.metrics))
        .send()
        .await?
        .text()
        .await?;
    let written = metrics
        .lines()
        .find(|l| {
            l.starts_with("sluice_ingest_sink_acks_total")
                && l.contains(stream)
                && l.contains("outcome=\"written\"")
        })
        .context("no sink_acks metric")?;
    assert!(written.ends_with(" 500"), "{written}");
    Ok(())
}

#[tokio::test]
async fn a_collector_killed_while_requests_wait_confirms_after_its_restart() -> anyhow::Result<()> {
    let group = unique("redis");
    let setup = Setup::new(&[&group]).await?;
    let ingest = setup.ingest().await?;
    let client = reqwest::Client::new();
    let stream = setup.stream.clone();

    let mut collector = Some(setup.collector(&group, "redis")?);
    let (status, body) = post(
        &client,
        &ingest.base,
        &stream,
        "30s",
        &json!({"id": "first"}),
    )
    .await?;
    assert_eq!((status, &body["sink"]), (202, &json!("written")), "{body}");

    // 40 requests wait for the sink while the only collector is killed and started again.
    let mut waiting = tokio::task::JoinSet::new();
    for n in 0..40 {
        let (client, base, stream) = (client.clone(), ingest.base.clone(), stream.clone());
        waiting.spawn(async move {
            let id = format!("k{n}");
            let answer = post(&client, &base, &stream, "60s", &json!({"id": id})).await;
            (id, answer)
        });
        if n == 10
            && let Some(c) = collector.take()
        {
            c.kill()?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _restarted = setup.collector(&group, "redis")?;
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    let mut ids = Vec::new();
    while let Some(done) = waiting.join_next().await {
        let (id, answer) = done?;
        let (status, body) = answer?;
        assert_eq!(status, 202, "{id}: {body}");
        assert_eq!(body["id"], id.as_str());
        let state = body["sink"].as_str().context("sink state")?.to_owned();
        if state == "written" {
            assert!(
                setup.in_redis(&id).await?,
                "{id} answered written but absent"
            );
        }
        *states.entry(state).or_default() += 1;
        ids.push(id);
    }
    println!("answers after the kill: {states:?}");
    assert_eq!(states.values().sum::<usize>(), 40);
    assert!(
        states.keys().all(|s| s == "written" || s == "pending"),
        "{states:?}"
    );
    // Every event is in the sink, pending or not.
    for id in &ids {
        wait_for(&format!("{id} in Redis"), LIMIT, || async {
            Ok(setup.in_redis(id).await?.then_some(()))
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_dead_lettered_event_answers_with_the_collectors_reason() -> anyhow::Result<()> {
    let group = unique("redis");
    let setup = Setup::new(&[&group]).await?;
    let ingest = setup.ingest().await?;
    let _collector = setup.collector(&group, "redis")?;
    // The poison: its record key already holds a list, so Redis refuses to store it; the
    // shipped retry policy tries it five times over about 15 s, then dead-letters it.
    let mut redis = setup.stack.redis().await?;
    let key = format!("{}:{}:poison", setup.pipeline.key_prefix, setup.stream);
    let _: i64 = redis.rpush(&key, "in the way").await?;
    let client = reqwest::Client::new();
    let (status, body) = post(
        &client,
        &ingest.base,
        &setup.stream,
        "60s",
        &json!([{"id": "fine"}, {"id": "poison"}]),
    )
    .await?;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["type"], "https://sluice.dev/problems/dead-lettered");
    let events = body["events"].as_array().context("events")?;
    assert_eq!(events[0]["id"], "fine");
    assert_eq!(events[0]["sink"], "written");
    assert_eq!(events[1]["id"], "poison");
    assert_eq!(events[1]["sink"], "dead-lettered");
    let reason = events[1]["error"].as_str().context("error")?;
    assert!(
        reason.contains(&group) && reason.contains("WRONGTYPE"),
        "{reason}"
    );
    assert!(setup.in_redis("fine").await?);
    Ok(())
}

#[tokio::test]
async fn the_read_doors_of_a_mysql_stream_read_mysql_once_the_buffer_is_empty() -> anyhow::Result<()>
{
    read_doors_read_the_table(StoreKind::Mysql).await
}

#[tokio::test]
async fn the_read_doors_of_a_postgres_stream_read_postgres_once_the_buffer_is_empty()
-> anyhow::Result<()> {
    read_doors_read_the_table(StoreKind::Postgres).await
}

/// Lines written to the TCP port with `ack sink` into a collector's table are read back by
/// another ingest instance (an empty buffer): `get`, the dump, and GET.
async fn read_doors_read_the_table(kind: StoreKind) -> anyhow::Result<()> {
    let group = unique("sql");
    let setup = Setup::with_store(&[&group], Some(kind)).await?;
    let (sink, url) = match kind {
        StoreKind::Mysql => ("mysql", setup.stack.mysql_url.as_str()),
        StoreKind::Postgres => ("postgres", setup.stack.database_url.as_str()),
    };
    let database = ["--database-url", url];
    let _collector = setup.collector(&group, sink)?;
    // Written through one instance, until MySQL holds every line...
    let writer = setup.ingest_with(&database).await?;
    let (read, mut write) = tokio::net::TcpStream::connect(&writer.tcp)
        .await?
        .into_split();
    let mut answers = BufReader::new(read).lines();
    write.write_all(b"ack sink 30s\n").await?;
    ensure!(answers.next_line().await?.as_deref() == Some("ok ack sink"));
    let mut sent = BTreeMap::new();
    for n in 0..50 {
        let record = json!({"id": format!("r{n:02}"), "name": format!("name {n}"), "age": n});
        write.write_all(format!("{record}\n").as_bytes()).await?;
        let answer = answers.next_line().await?.context("connection closed")?;
        ensure!(answer == format!("ok r{n:02}"), "{answer}");
        sent.insert(format!("r{n:02}"), record);
    }
    drop(writer);

    // ... then read through a new instance, whose buffer of recent writes is empty.
    let read_port = format!("127.0.0.1:{}", free_port()?);
    let mut args = database.to_vec();
    args.extend(["--tcp-read-listen", read_port.as_str(), "--tcp-read-dump"]);
    let reader = setup.ingest_with(&args).await?;
    let (read, mut write) = tokio::net::TcpStream::connect(&read_port)
        .await?
        .into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"get r07\nget nobody\nall\n").await?;
    let one: Value = serde_json::from_str(&lines.next_line().await?.context("answer")?)?;
    assert_eq!(one, sent["r07"]);
    assert_eq!(
        lines.next_line().await?.as_deref(),
        Some("error not found nobody")
    );
    let mut dumped = BTreeMap::new();
    loop {
        let line = lines.next_line().await?.context("dump ended early")?;
        if let Some(count) = line.strip_prefix("end ") {
            assert_eq!(count, "50");
            break;
        }
        let record: Value = serde_json::from_str(&line).with_context(|| line.clone())?;
        let id = record["id"].as_str().context("id")?.to_owned();
        dumped.insert(id, record);
    }
    assert_eq!(dumped, sent, "every record, from the table, as written");

    // GET reads the same table.
    let got: Value = reqwest::get(format!(
        "{}/v1/streams/{}/records/r42",
        reader.base, setup.stream
    ))
    .await?
    .json()
    .await?;
    assert_eq!(got["payload"], sent["r42"]);
    assert_eq!(got["id"], "r42");
    assert!(
        got["event_time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{got}"
    );
    Ok(())
}
