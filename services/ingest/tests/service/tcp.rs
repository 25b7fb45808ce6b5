//! The TCP doors of the buffered store against the real Kafka and Redis, with a real
//! collector storing what ingest published.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_core::StreamSettings;
use sluice_ingest::{App, Args};
use sluice_testkit::{Pipeline, Stack, topic_len, unique, wait_for};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const CONNECTIONS: usize = 1000;
const LINES: usize = 3;

/// Sends `lines` on one connection, retrying a line answered `error busy`; returns the ids.
async fn write_lines(addr: String, conn: usize) -> anyhow::Result<Vec<String>> {
    let stream = TcpStream::connect(&addr).await?;
    let (read, mut write) = stream.into_split();
    let mut answers = BufReader::new(read).lines();
    let mut ids = Vec::new();
    for n in 0..LINES {
        let line =
            json!({"id": format!("c{conn}-{n}"), "name": "John Doe", "age": "25"}).to_string();
        loop {
            write.write_all(format!("{line}\n").as_bytes()).await?;
            let answer = answers
                .next_line()
                .await?
                .ok_or_else(|| anyhow::anyhow!("connection closed"))?;
            if let Some(id) = answer.strip_prefix("ok ") {
                ids.push(id.to_owned());
                break;
            }
            anyhow::ensure!(
                answer.starts_with("error busy"),
                "unexpected answer {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(ids)
}

/// Ingest's TCP write and read ports for `stream`: their addresses, and the token that
/// stops them.
async fn start_ports(
    stack: &Stack,
    pipeline: &Pipeline,
    stream: &str,
    tweak: impl FnOnce(&mut Args),
) -> (String, String, CancellationToken) {
    let mut args = common::args(stack, pipeline);
    args.redis_replica_url = Some(stack.redis_replica_url.clone());
    args.tcp_stream = stream.to_owned();
    tweak(&mut args);
    let app = App::connect(&args).await.expect("ingest");
    let stop = CancellationToken::new();
    let write_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let read_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let write_addr = write_listener.local_addr().expect("addr").to_string();
    let read_addr = read_listener.local_addr().expect("addr").to_string();
    tokio::spawn(sluice_ingest::tcp::serve_write(
        write_listener,
        app.clone(),
        stop.clone(),
    ));
    tokio::spawn(sluice_ingest::tcp::serve_read(
        read_listener,
        app.clone(),
        stop.clone(),
    ));
    (write_addr, read_addr, stop)
}

/// Sends one line on a new connection; the answer.
async fn write_one(addr: String, line: String) -> anyhow::Result<String> {
    let stream = TcpStream::connect(&addr).await?;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{line}\n").as_bytes()).await?;
    BufReader::new(read)
        .lines()
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("connection closed"))
}

#[tokio::test]
async fn a_line_refused_busy_is_never_readable() {
    let stack = Stack::from_env();
    let stream = StreamSettings::new(unique("busy"));
    let name = stream.name.clone();
    let pipeline = Pipeline::create(&stack, vec![stream])
        .await
        .expect("pipeline");
    // One queue slot, one worker, acknowledgements that take a while: most of a burst is
    // refused busy.
    let (write_addr, read_addr, stop) = start_ports(&stack, &pipeline, &name, |args| {
        args.queue_size = 1;
        args.worker_size = 1;
        args.kafka
            .options
            .push(("linger.ms".to_owned(), "300".to_owned()));
    })
    .await;
    let mut writers = tokio::task::JoinSet::new();
    for n in 0..20 {
        let id = format!("burst-{n}");
        let line = json!({"id": id, "n": n}).to_string();
        let addr = write_addr.clone();
        writers.spawn(async move { (id, write_one(addr, line).await) });
    }
    let (mut taken, mut refused) = (Vec::new(), Vec::new());
    while let Some(answer) = writers.join_next().await {
        let (id, answer) = answer.expect("task");
        let answer = answer.expect("answered");
        if answer.starts_with("ok ") {
            taken.push(id);
        } else {
            assert!(answer.starts_with("error busy"), "{answer}");
            refused.push(id);
        }
    }
    assert!(
        !taken.is_empty() && !refused.is_empty(),
        "taken {taken:?}, refused {refused:?}"
    );
    let read = TcpStream::connect(&read_addr).await.expect("connect");
    let (r, mut w) = read.into_split();
    let mut lines = BufReader::new(r).lines();
    for id in taken.iter().chain(&refused) {
        w.write_all(format!("get {id}\n").as_bytes())
            .await
            .expect("write");
        let answer = lines.next_line().await.expect("line").expect("answer");
        if taken.contains(id) {
            let record: Value = serde_json::from_str(&answer).expect("record");
            assert_eq!(record["id"], id.as_str());
        } else {
            assert_eq!(
                answer,
                format!("error not found {id}"),
                "refused, not readable"
            );
        }
    }
    stop.cancel();
}

#[tokio::test]
async fn a_thousand_connections_write_and_the_read_port_returns_every_record() {
    let stack = Stack::from_env();
    let mut stream = StreamSettings::new(unique("records"));
    stream.partitions = 3;
    let name = stream.name.clone();
    let pipeline = Pipeline::create(&stack, vec![stream])
        .await
        .expect("pipeline");

    // A buffer smaller than what is sent: writers meet `error busy` and the read port must
    // find older records in the store.
    let (write_addr, read_addr, stop) = start_ports(&stack, &pipeline, &name, |args| {
        args.queue_size = 500;
        args.worker_size = 4;
        args.max_line_bytes = 1024;
        args.tcp_read_dump = true;
    })
    .await;

    common::spawn_collector(&stack, &pipeline, &stop);

    // Bad lines first: each gets its error line and the connection stays usable.
    let mut probe = BufReader::new(TcpStream::connect(&write_addr).await.expect("connect"));
    for (line, expected) in [
        ("{not json".to_owned(), "error not valid JSON"),
        ("[1,2]".to_owned(), "error an event must be a JSON object"),
        (
            format!("{{\"pad\":\"{}\"}}", "x".repeat(2000)),
            "error line too long",
        ),
        ("{\"id\":\"bad id\"}".to_owned(), "error invalid event id"),
    ] {
        probe
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
        let mut answer = String::new();
        probe.read_line(&mut answer).await.expect("answer");
        assert!(answer.starts_with(expected), "{line:.40} -> {answer}");
    }
    probe
        .get_mut()
        .write_all(b"\xff\xfe{}\n")
        .await
        .expect("write");
    let mut answer = String::new();
    probe.read_line(&mut answer).await.expect("answer");
    assert_eq!(answer, "error the line is not UTF-8\n");

    let mut writers = tokio::task::JoinSet::new();
    for conn in 0..CONNECTIONS {
        writers.spawn(write_lines(write_addr.clone(), conn));
    }
    let mut acknowledged = BTreeSet::new();
    while let Some(ids) = writers.join_next().await {
        acknowledged.extend(ids.expect("task").expect("writer"));
    }
    assert_eq!(acknowledged.len(), CONNECTIONS * LINES);

    let read = TcpStream::connect(&read_addr).await.expect("connect");
    let (r, mut w) = read.into_split();
    let mut lines = BufReader::new(r).lines();
    w.write_all(b"get c7-2\n").await.expect("write");
    let record: Value =
        serde_json::from_str(&lines.next_line().await.expect("line").expect("record"))
            .expect("json");
    assert_eq!(
        record,
        json!({"id": "c7-2", "name": "John Doe", "age": "25"})
    );
    w.write_all(b"get nope\n").await.expect("write");
    assert_eq!(
        lines.next_line().await.expect("line").expect("answer"),
        "error not found nope"
    );
    w.write_all(b"what\n").await.expect("write");
    assert!(
        lines
            .next_line()
            .await
            .expect("line")
            .expect("answer")
            .starts_with("error unknown request")
    );

    // Once the collector stored everything, `all` returns every record exactly once.
    let redis = stack.redis().await.expect("redis");
    wait_for(
        "the collector to store every record",
        Duration::from_secs(60),
        || {
            let mut redis = redis.clone();
            let pattern = format!("{}:{name}:*", pipeline.key_prefix);
            let want = acknowledged.len();
            async move {
                let keys: Vec<String> = redis::AsyncCommands::keys(&mut redis, pattern).await?;
                Ok((keys.len() >= want).then_some(()))
            }
        },
    )
    .await
    .expect("stored");
    for request in ["all", "get data"] {
        w.write_all(format!("{request}\n").as_bytes())
            .await
            .expect("write");
        let mut dumped = Vec::new();
        loop {
            let line = lines.next_line().await.expect("line").expect("dump line");
            if let Some(count) = line.strip_prefix("end ") {
                assert_eq!(count.parse::<usize>().expect("count"), dumped.len());
                break;
            }
            let v: Value = serde_json::from_str(&line).expect("json");
            dumped.push(v["id"].as_str().expect("id").to_owned());
        }
        let unique_ids: BTreeSet<String> = dumped.iter().cloned().collect();
        assert_eq!(unique_ids.len(), dumped.len(), "no record twice");
        assert_eq!(unique_ids, acknowledged, "every acknowledged record");
    }
    stop.cancel();
}

/// A connection to a TCP port, a line at a time.
struct Conn {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl Conn {
    async fn open(addr: &str) -> Self {
        let (r, write) = TcpStream::connect(addr)
            .await
            .expect("connect")
            .into_split();
        Self {
            lines: BufReader::new(r).lines(),
            write,
        }
    }

    /// Sends `line`; the answer, or `None` when the server closed the connection.
    async fn ask(&mut self, line: &str) -> Option<String> {
        // A refused connection may already be closed for writing.
        let _ = self.write.write_all(format!("{line}\n").as_bytes()).await;
        self.next().await
    }

    async fn next(&mut self) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .expect("an answer or the end")
            .unwrap_or(None)
    }
}

#[tokio::test]
async fn with_api_keys_both_ports_want_auth_first_and_refuse_everything_else() {
    let stack = Stack::from_env();
    let stream = StreamSettings::new(unique("tcpauth"));
    let name = stream.name.clone();
    let pipeline = Pipeline::create(&stack, vec![stream])
        .await
        .expect("pipeline");
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "first-key-0123456789\n").expect("write");
    let (write_addr, read_addr, stop) = start_ports(&stack, &pipeline, &name, |args| {
        args.api_keys_file = Some(keys.clone());
        args.api_keys_reload = Duration::from_millis(100);
    })
    .await;

    for addr in [&write_addr, &read_addr] {
        // No auth line: refused and closed, the line never published.
        let mut c = Conn::open(addr).await;
        let answer = c.ask(r#"{"id":"no-auth"}"#).await.expect("answer");
        assert_eq!(
            answer,
            "error unauthorized: an API key is required; send `auth <key>` first"
        );
        assert_eq!(c.next().await, None, "closed after the refusal");
        // A wrong key: refused and closed.
        let mut c = Conn::open(addr).await;
        let answer = c.ask("auth wrong-key-0123456789").await.expect("answer");
        assert_eq!(answer, "error unauthorized: the API key is not valid");
        assert_eq!(c.next().await, None);
    }

    let mut w = Conn::open(&write_addr).await;
    assert_eq!(
        w.ask("auth first-key-0123456789").await.as_deref(),
        Some("ok auth")
    );
    assert_eq!(
        w.ask(r#"{"id":"with-auth"}"#).await.as_deref(),
        Some("ok with-auth")
    );
    let mut r = Conn::open(&read_addr).await;
    assert_eq!(
        r.ask("auth first-key-0123456789").await.as_deref(),
        Some("ok auth")
    );
    let record: Value =
        serde_json::from_str(&r.ask("get with-auth").await.expect("record")).expect("json");
    assert_eq!(record["id"], "with-auth");
    // The full dump is off unless ingest is told otherwise.
    let answer = r.ask("all").await.expect("answer");
    assert!(answer.starts_with("error the full dump is off"), "{answer}");
    assert_eq!(
        topic_len(&stack, &name).expect("len"),
        1,
        "only the authenticated line reached Kafka"
    );

    // The key rotated in the file: the new one is taken, the old one refused; connections
    // already in are kept.
    std::fs::write(&keys, "second-key-0123456789\n").expect("write");
    wait_for("the rotated key", Duration::from_secs(30), || {
        let addr = write_addr.clone();
        async move {
            let mut c = Conn::open(&addr).await;
            Ok(
                (c.ask("auth second-key-0123456789").await.as_deref() == Some("ok auth"))
                    .then_some(()),
            )
        }
    })
    .await
    .expect("rotated");
    let mut old = Conn::open(&read_addr).await;
    assert_eq!(
        old.ask("auth first-key-0123456789").await.as_deref(),
        Some("error unauthorized: the API key is not valid")
    );
    assert_eq!(
        w.ask(r#"{"id":"still-in"}"#).await.as_deref(),
        Some("ok still-in")
    );

    // A connection that says nothing is closed after ten seconds.
    let mut silent = Conn::open(&write_addr).await;
    let answer = silent.next().await.expect("answer");
    assert!(
        answer.starts_with("error unauthorized: no `auth <key>` line"),
        "{answer}"
    );
    assert_eq!(silent.next().await, None);
    stop.cancel();
}
