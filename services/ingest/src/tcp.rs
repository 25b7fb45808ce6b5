//! The TCP doors of the buffered store (JSON lines).
//!
//! **Write port** (`--tcp-write-listen`, 2525 by convention): one JSON object per line,
//! such as `{"id":"1","name":"John Doe","age":"25"}`. Each line is checked like an HTTP
//! event of the stream `--tcp-stream` and put on a bounded queue (`--queue-size`).
//! `--worker-size` workers take what is queued, in batches, and publish it to Kafka. Every
//! line is answered, in order, with `ok <id>` once Kafka acknowledged it, or
//! `error <reason>`: a bad line, a line over `--max-line-bytes`, or `error busy ...` when
//! the queue is full. An error never closes the connection. Acknowledged lines are kept in
//! a buffer of recent writes, bounded in bytes (`--tcp-recent-bytes`), so that they can be
//! read back before a collector stored them; a refused line never is.
//!
//! The line `ack sink` (or `ack sink <timeout>`, such as `ack sink 5s`) makes the
//! connection wait for the stream's collectors: from then on each line is answered `ok <id>`
//! once the record is in the sinks (readable from the store), `pending <id>` when they did
//! not confirm within the timeout (the record is still delivered), or
//! `error dead-lettered <id>: <reason>`. `ack kafka` goes back to answering on Kafka's
//! acknowledgement. Both are answered `ok ack <level>`.
//!
//! **Read port** (`--tcp-read-listen`, 2526): a request line `get <id>` is answered with the
//! record's line, or `error not found <id>`; with `--tcp-read-dump`, `all` (or `get data`)
//! dumps every record, one per line, then `end <count>` (without it, `all` is refused: the
//! whole store is not for anyone who can reach the port). Records come from the buffer of
//! recent writes where present, else from the store the stream's collector writes: Redis
//! (read a page of keys at a time), or the stream's PostgreSQL or MySQL table (`store` in
//! its settings, rows streamed as the database sends them); never held whole in memory.
//!
//! **API keys**: when ingest has keys (`--api-keys-file`), the first line on either port
//! must be `auth <key>`, answered `ok auth`; anything else, a wrong key, or no line within
//! ten seconds is answered `error unauthorized: <why>` and the connection is closed. The
//! line `auth <key>` is also accepted (and checked) when no key is required, so that one
//! client works with both.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use redis::AsyncCommands;
use serde_json::Value;
use sluice_core::{Envelope, store};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Decoder, Encoder, Framed, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::App;
use crate::confirm::SinkResult;
use crate::listener::LimitedListener;
use crate::publish::{Ack, Hints, prepare};

/// One input line, or why there is none: a bad line never ends the connection.
pub enum Line {
    /// A line of text, without its end of line.
    Text(String),
    /// A line over the length limit (skipped up to its end).
    TooLong,
    /// A line that is not UTF-8.
    NotUtf8,
}

/// Newline-delimited text with a length limit, where an over-long or non-UTF-8 line is an
/// item of its own rather than an error that would end the stream.
pub struct BoundedLines(LinesCodec);

impl BoundedLines {
    /// Lines of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self(LinesCodec::new_with_max_length(max))
    }

    fn map(r: Result<Option<String>, LinesCodecError>) -> Result<Option<Line>, LinesCodecError> {
        match r {
            Ok(line) => Ok(line.map(Line::Text)),
            Err(LinesCodecError::MaxLineLengthExceeded) => Ok(Some(Line::TooLong)),
            Err(LinesCodecError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Ok(Some(Line::NotUtf8))
            }
            Err(e) => Err(e),
        }
    }
}

impl Decoder for BoundedLines {
    type Item = Line;
    type Error = LinesCodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, LinesCodecError> {
        Self::map(self.0.decode(buf))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, LinesCodecError> {
        Self::map(self.0.decode_eof(buf))
    }
}

impl Encoder<String> for BoundedLines {
    type Error = LinesCodecError;

    fn encode(&mut self, line: String, buf: &mut BytesMut) -> Result<(), LinesCodecError> {
        self.0.encode(line, buf)
    }
}

type Lines<T> = Framed<T, BoundedLines>;

/// An accepted line waiting for Kafka.
struct Job {
    envelope: Envelope,
    reply: oneshot::Sender<Result<(), String>>,
}

/// Acknowledged writes, newest last, at most `capacity` bytes of ids and lines.
struct Recent {
    capacity: usize,
    bytes: usize,
    order: VecDeque<String>,
    records: HashMap<String, String>,
}

impl Recent {
    fn insert(&mut self, id: String, line: String) {
        let size = id.len() + line.len();
        if size > self.capacity {
            return;
        }
        if let Some(old) = self.records.remove(&id) {
            // A rewrite of an id counts as the newest.
            self.bytes -= id.len() + old.len();
            self.order.retain(|o| *o != id);
        }
        self.bytes += size;
        self.records.insert(id.clone(), line);
        self.order.push_back(id);
        while self.bytes > self.capacity {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(line) = self.records.remove(&old) {
                self.bytes -= old.len() + line.len();
            }
        }
    }
}

/// The buffered store behind the TCP ports: the queue, its workers and recent writes.
pub struct Buffer {
    queue: mpsc::Sender<Job>,
    recent: Mutex<Recent>,
    max_line_bytes: usize,
}

impl Buffer {
    /// Creates the queue and starts `workers` workers publishing to `stream`'s topic. They
    /// run until `closing` is cancelled, then publish what is still queued and stop.
    pub fn start(
        app_publisher: crate::publish::Publisher,
        topic: String,
        queue_size: usize,
        workers: usize,
        max_line_bytes: usize,
        recent_bytes: usize,
        closing: CancellationToken,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<Job>(queue_size.max(1));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..workers.max(1) {
            let (rx, publisher, topic, closing) = (
                rx.clone(),
                app_publisher.clone(),
                topic.clone(),
                closing.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let mut jobs = Vec::new();
                    {
                        let mut rx = rx.lock().await;
                        let first = tokio::select! {
                            biased;
                            job = rx.recv() => job,
                            () = closing.cancelled() => rx.try_recv().ok(),
                        };
                        let Some(first) = first else { return };
                        jobs.push(first);
                        while jobs.len() < 1000 {
                            match rx.try_recv() {
                                Ok(job) => jobs.push(job),
                                Err(_) => break,
                            }
                        }
                    }
                    let (envelopes, replies): (Vec<_>, Vec<_>) =
                        jobs.into_iter().map(|j| (j.envelope, j.reply)).unzip();
                    let results = publisher.send(&topic, envelopes, Ack::All).await;
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ =
                            reply.send(result.map(|_| ()).map_err(|(_, e)| format!("kafka: {e}")));
                    }
                }
            });
        }
        Arc::new(Self {
            queue: tx,
            recent: Mutex::new(Recent {
                capacity: recent_bytes,
                bytes: 0,
                order: VecDeque::new(),
                records: HashMap::new(),
            }),
            max_line_bytes,
        })
    }

    fn remember(&self, id: String, line: String) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.insert(id, line);
        }
    }

    fn recent(&self, id: &str) -> Option<String> {
        self.recent
            .lock()
            .ok()
            .and_then(|r| r.records.get(id).cloned())
    }

    fn recent_all(&self) -> Vec<(String, String)> {
        self.recent
            .lock()
            .map(|r| {
                r.order
                    .iter()
                    .filter_map(|id| r.records.get(id).map(|v| (id.clone(), v.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Serves the write port until `shutdown` is cancelled.
pub async fn serve_write(listener: TcpListener, app: App, shutdown: CancellationToken) {
    serve(listener, app, shutdown, "tcp-write", handle_write).await;
}

/// Serves the read port until `shutdown` is cancelled.
pub async fn serve_read(listener: TcpListener, app: App, shutdown: CancellationToken) {
    serve(listener, app, shutdown, "tcp-read", handle_read).await;
}

async fn serve<H, F>(
    listener: TcpListener,
    app: App,
    shutdown: CancellationToken,
    door: &'static str,
    handle: H,
) where
    H: Fn(App, Lines<crate::listener::LimitedStream>, CancellationToken) -> F
        + Copy
        + Send
        + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, door, "TCP door listening");
    }
    let mut listener = LimitedListener::new(listener, app.inner.max_connections);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept_limited() => accepted,
        };
        let max = app.tcp_buffer().map_or(64 * 1024, |b| b.max_line_bytes);
        let framed = Framed::new(stream, BoundedLines::new(max));
        let (app, shutdown) = (app.clone(), shutdown.clone());
        connections.spawn(async move {
            app.inner.metrics.connection_opened(door);
            let mut framed = framed;
            match authenticate(&app, &mut framed, &shutdown).await {
                Ok(()) => handle(app.clone(), framed, shutdown).await,
                Err(Some(answer)) => {
                    app.inner.metrics.unauthorized(door);
                    refuse(framed, answer).await;
                }
                Err(None) => {}
            }
            app.inner.metrics.connection_closed(door);
        });
        while connections.try_join_next().is_some() {}
    }
    // Connections finish the line in hand and close.
    while connections.join_next().await.is_some() {}
}

/// How long a connection may take to send its `auth` line when keys are required.
const AUTH_WAIT: Duration = Duration::from_secs(10);

/// Lets the connection in: at once without API keys, else after a first line
/// `auth <key>` with a valid key (answered `ok auth`). `Err` with the answer that refuses
/// it, or `Err(None)` when it ended or the server stops first.
async fn authenticate<T: AsyncRead + AsyncWrite + Unpin>(
    app: &App,
    framed: &mut Lines<T>,
    shutdown: &CancellationToken,
) -> Result<(), Option<String>> {
    if !app.api_keys().required() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + AUTH_WAIT;
    loop {
        let line = tokio::select! {
            () = shutdown.cancelled() => return Err(None),
            line = tokio::time::timeout_at(deadline, framed.next()) => line,
        };
        let line = match line {
            Err(_) => {
                return Err(Some(format!(
                    "error unauthorized: no `auth <key>` line within {}s",
                    AUTH_WAIT.as_secs()
                )));
            }
            Ok(None | Some(Err(_))) => return Err(None),
            Ok(Some(Ok(Line::Text(line)))) if line.trim().is_empty() => continue,
            Ok(Some(Ok(line))) => line,
        };
        let answer = match line {
            Line::Text(line) => auth_line(app, &line),
            _ => None,
        };
        return match answer {
            Some(Ok(ok)) => framed.send(ok).await.map_err(|_| None),
            Some(Err(refused)) => Err(Some(refused)),
            None => Err(Some(
                "error unauthorized: an API key is required; send `auth <key>` first".to_owned(),
            )),
        };
    }
}

/// A line of the read port (either port for `auth`), as the ports understand it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadRequest<'a> {
    /// A blank line.
    Blank,
    /// `auth <key>`; the key is empty for a bare `auth`.
    Auth(&'a str),
    /// `all` or `get data`: every record.
    All,
    /// `get <id>`.
    Get(&'a str),
    /// Anything else.
    Unknown,
}

/// Parses one line of the read port (surrounding whitespace ignored).
pub fn read_request(line: &str) -> ReadRequest<'_> {
    let line = line.trim();
    match line {
        "" => ReadRequest::Blank,
        "auth" => ReadRequest::Auth(""),
        "all" | "get data" => ReadRequest::All,
        _ => match line.split_once(char::is_whitespace) {
            Some(("auth", key)) => ReadRequest::Auth(key.trim()),
            Some(("get", id)) if !id.trim().is_empty() => ReadRequest::Get(id.trim()),
            _ => ReadRequest::Unknown,
        },
    }
}

/// The answer to a line `auth <key>`: `ok auth`, or the refusal that ends the connection;
/// `None` for any other line.
fn auth_line(app: &App, line: &str) -> Option<Result<String, String>> {
    let ReadRequest::Auth(key) = read_request(line) else {
        return None;
    };
    Some(if app.api_keys().accepts(key.as_bytes()) {
        Ok("ok auth".to_owned())
    } else {
        Err("error unauthorized: the API key is not valid".to_owned())
    })
}

/// Sends `answer` and closes the connection, reading (and dropping) what the client still
/// sends for a moment so that the answer is not lost to a reset.
async fn refuse<T: AsyncRead + AsyncWrite + Unpin>(mut framed: Lines<T>, answer: String) {
    if framed.send(answer).await.is_err() {
        return;
    }
    let mut stream = framed.into_inner();
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left = 1024 * 1024usize;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Reads the next line; `None` at the end of the connection or on shutdown.
async fn next_line<T: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Lines<T>,
    shutdown: &CancellationToken,
) -> Option<Result<Line, LinesCodecError>> {
    tokio::select! {
        () = shutdown.cancelled() => None,
        line = framed.next() => line,
    }
}

async fn handle_write<T: AsyncRead + AsyncWrite + Unpin>(
    app: App,
    mut framed: Lines<T>,
    shutdown: CancellationToken,
) {
    let mut ack = Ack::All;
    while let Some(line) = next_line(&mut framed, &shutdown).await {
        let answer = match line {
            Ok(Line::Text(line)) if line.trim().is_empty() => continue,
            Ok(Line::Text(line)) if auth_line(&app, &line).is_some() => {
                match auth_line(&app, &line) {
                    Some(Err(refused)) => {
                        app.inner.metrics.unauthorized("tcp-write");
                        refuse(framed, refused).await;
                        return;
                    }
                    _ => "ok auth".to_owned(),
                }
            }
            Ok(Line::Text(line)) if line.trim_start().starts_with("ack") => {
                let mut words = line.split_whitespace();
                let level = words.next().filter(|w| *w == "ack").and(words.next());
                let timeout = words.next();
                match (level, words.next()) {
                    (Some(level @ ("kafka" | "sink")), None) => {
                        match crate::http::ack_level(&app, Some(level), timeout) {
                            Ok(a) => {
                                ack = a;
                                format!("ok ack {level}")
                            }
                            Err(e) => format!("error {e}"),
                        }
                    }
                    _ => "error the ack line is `ack kafka` or `ack sink [timeout]`".to_owned(),
                }
            }
            Ok(Line::Text(line)) => {
                let span = sluice_core::telemetry::recorded_span(|| {
                    tracing::info_span!("tcp.line", otel.kind = "server")
                });
                write_line(&app, &line, ack).instrument(span).await
            }
            Ok(Line::TooLong) => {
                let max = app.tcp_buffer().map_or(0, |b| b.max_line_bytes);
                format!("error line too long: at most {max} bytes")
            }
            Ok(Line::NotUtf8) => "error the line is not UTF-8".to_owned(),
            Err(_) => break,
        };
        if framed.send(answer).await.is_err() {
            break;
        }
    }
}

async fn write_line(app: &App, line: &str, ack: Ack) -> String {
    let Some(buffer) = app.tcp_buffer() else {
        return "error the TCP write port has no stream".to_owned();
    };
    let stream = match app.inner.streams.get(&app.inner.tcp_stream) {
        Ok(s) => s,
        Err(e) => return format!("error {e}"),
    };
    let payload: Box<serde_json::value::RawValue> = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return format!("error not valid JSON: {e}"),
    };
    let mut envelopes = match prepare(stream, vec![payload], &Hints::default(), false) {
        Ok(e) => e,
        Err(e) => {
            app.inner
                .metrics
                .rejected(&stream.settings.name, "tcp-invalid");
            return format!("error {e}");
        }
    };
    if !app.kafka_ready() {
        return "error busy: Kafka is unreachable; retry later".to_owned();
    }
    let wait = match ack {
        Ack::Sink(timeout) => match app
            .inner
            .publisher
            .sink_acks()
            .mark(&stream.settings.ack_by, &mut envelopes)
        {
            Ok(wait) => Some((wait, tokio::time::Instant::now() + timeout)),
            Err(e) => return format!("error busy: {e}"),
        },
        _ => None,
    };
    let envelope = envelopes.remove(0);
    let id = envelope.id.clone();
    let line = envelope.payload.get().to_owned();
    let (reply, answer) = oneshot::channel();
    if buffer.queue.try_send(Job { envelope, reply }).is_err() {
        app.inner
            .metrics
            .rejected(&stream.settings.name, "overloaded");
        return "error busy: the queue is full; retry later".to_owned();
    }
    match answer.await {
        Ok(Ok(())) => {
            // Readable only once acknowledged.
            buffer.remember(id.clone(), line);
            let Some((wait, deadline)) = wait else {
                return format!("ok {id}");
            };
            match wait.until(deadline, &[true]).await.pop() {
                Some(SinkResult::Written) => format!("ok {id}"),
                Some(SinkResult::DeadLettered(reason)) => {
                    format!("error dead-lettered {id}: {reason}")
                }
                _ => format!("pending {id}"),
            }
        }
        Ok(Err(e)) => format!("error {e}"),
        Err(_) => "error shutting down".to_owned(),
    }
}

async fn handle_read<T: AsyncRead + AsyncWrite + Unpin>(
    app: App,
    mut framed: Lines<T>,
    shutdown: CancellationToken,
) {
    while let Some(line) = next_line(&mut framed, &shutdown).await {
        let request = match line {
            Ok(Line::Text(l)) => l,
            Ok(Line::TooLong | Line::NotUtf8) => {
                if framed
                    .send("error unknown request; send `get <id>` or `all`".to_owned())
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            Err(_) => break,
        };
        let request = request.trim();
        if let Some(auth) = auth_line(&app, request) {
            match auth {
                Ok(ok) => {
                    if framed.send(ok).await.is_err() {
                        break;
                    }
                    continue;
                }
                Err(refused) => {
                    app.inner.metrics.unauthorized("tcp-read");
                    refuse(framed, refused).await;
                    return;
                }
            }
        }
        let result = match read_request(request) {
            ReadRequest::Blank => continue,
            ReadRequest::All if !app.inner.tcp_read_dump => framed
                .send(
                    "error the full dump is off on this port; ask for one record with `get <id>` \
                     (ingest's --tcp-read-dump, or tcp.dump in the PipelineConfig, turns it on)"
                        .to_owned(),
                )
                .await
                .map_err(|_| ()),
            ReadRequest::All => dump(&app, &mut framed).await,
            ReadRequest::Get(id) => {
                let answer = match lookup(&app, id).await {
                    Ok(Some(record)) => record,
                    Ok(None) => format!("error not found {id}"),
                    Err(e) => format!("error store unavailable: {e}"),
                };
                framed.send(answer).await.map_err(|_| ())
            }
            // An `auth` line was answered above.
            ReadRequest::Auth(_) | ReadRequest::Unknown => framed
                .send("error unknown request; send `get <id>` or `all`".to_owned())
                .await
                .map_err(|_| ()),
        };
        if result.is_err() {
            break;
        }
    }
}

fn payload_of(record: &str) -> Option<Value> {
    let mut v: Value = serde_json::from_str(record).ok()?;
    Some(v.get_mut("payload").map(Value::take).unwrap_or(v))
}

async fn lookup(app: &App, id: &str) -> Result<Option<String>, String> {
    if let Some(line) = app.tcp_buffer().and_then(|b| b.recent(id)) {
        return Ok(Some(line));
    }
    if let Some((sql, store)) = sql_store(app) {
        let record = sql
            .record(store, &app.inner.tcp_stream, id)
            .await
            .map_err(|e| e.to_string())?;
        return Ok(record.and_then(|mut r| r.get_mut("payload").map(|p| p.take().to_string())));
    }
    let key = store::record_key(&app.inner.key_prefix, &app.inner.tcp_stream, id);
    let mut conn = app.read_connection();
    let record: Option<String> = conn.get(&key).await.map_err(|e| e.to_string())?;
    Ok(record
        .as_deref()
        .and_then(payload_of)
        .map(|v| v.to_string()))
}

/// The database and table of the TCP stream, when its records are read from SQL.
fn sql_store(
    app: &App,
) -> Option<(
    &crate::records::SqlStore,
    &sluice_core::settings::RecordStore,
)> {
    let stream = app.inner.streams.get(&app.inner.tcp_stream).ok()?;
    Some((app.sql()?, stream.settings.store.as_ref()?))
}

/// Streams the records of the TCP stream's SQL table, skipping those in `sent`.
async fn dump_sql<T: AsyncRead + AsyncWrite + Unpin>(
    app: &App,
    framed: &mut Lines<T>,
    (sql, store): (
        &crate::records::SqlStore,
        &sluice_core::settings::RecordStore,
    ),
    sent: &HashSet<String>,
    count: &mut u64,
) -> Result<(), ()> {
    let query = sql.dump_query(store);
    let mut rows = sql.payloads(&query, &app.inner.tcp_stream);
    let mut since_flush = 0;
    while let Some(row) = rows.next().await {
        match row {
            Ok((id, _)) if sent.contains(&id) => {}
            Ok((_, payload)) => {
                framed.feed(payload.to_string()).await.map_err(|_| ())?;
                *count += 1;
                since_flush += 1;
                if since_flush == DUMP_PAGE {
                    framed.flush().await.map_err(|_| ())?;
                    since_flush = 0;
                }
            }
            Err(e) => {
                return framed
                    .send(format!("error store unavailable: {e}"))
                    .await
                    .map_err(|_| ());
            }
        }
    }
    framed.send(format!("end {count}")).await.map_err(|_| ())
}

/// Keys of the store read per page of a dump.
const DUMP_PAGE: usize = 500;

/// Streams every record: the recent writes, then the store a page of keys at a time
/// (`SCAN`, then `MGET`), skipping what the recent writes already gave.
async fn dump<T: AsyncRead + AsyncWrite + Unpin>(
    app: &App,
    framed: &mut Lines<T>,
) -> Result<(), ()> {
    let mut sent = HashSet::new();
    let mut count = 0u64;
    for (id, line) in app.tcp_buffer().map(|b| b.recent_all()).unwrap_or_default() {
        framed.feed(line).await.map_err(|_| ())?;
        sent.insert(id);
        count += 1;
    }
    if let Some(store) = sql_store(app) {
        return dump_sql(app, framed, store, &sent, &mut count).await;
    }
    let prefix = store::record_key(&app.inner.key_prefix, &app.inner.tcp_stream, "");
    let pattern = format!("{prefix}*");
    let mut conn = app.read_connection();
    let mut cursor = 0u64;
    loop {
        let page: Result<Vec<Option<String>>, redis::RedisError> = async {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(DUMP_PAGE)
                .query_async(&mut conn)
                .await?;
            cursor = next;
            let keys: Vec<&String> = keys
                .iter()
                .filter(|k| !sent.contains(k.trim_start_matches(&prefix)))
                .collect();
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            conn.mget(&keys).await
        }
        .await;
        let values = match page {
            Ok(v) => v,
            Err(e) => {
                framed
                    .send(format!("error store unavailable: {e}"))
                    .await
                    .map_err(|_| ())?;
                return Ok(());
            }
        };
        for payload in values.iter().flatten().filter_map(|r| payload_of(r)) {
            framed.feed(payload.to_string()).await.map_err(|_| ())?;
            count += 1;
        }
        // What is fed so far goes out before the next page is read.
        framed.flush().await.map_err(|_| ())?;
        if cursor == 0 {
            break;
        }
    }
    framed.send(format!("end {count}")).await.map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_port_lines_are_requests() {
        use ReadRequest::*;
        for (line, want) in [
            ("", Blank),
            ("  \t", Blank),
            ("all", All),
            (" get data ", All),
            ("get 42", Get("42")),
            ("get\t 7 ", Get("7")),
            ("get", Unknown),
            ("get  ", Unknown),
            ("auth", Auth("")),
            ("auth  k-123 ", Auth("k-123")),
            ("authx", Unknown),
            ("GET 1", Unknown),
            ("dump", Unknown),
        ] {
            assert_eq!(read_request(line), want, "{line:?}");
        }
    }

    #[test]
    fn recent_writes_are_bounded_in_bytes_oldest_out_first() {
        let mut recent = Recent {
            capacity: 30,
            bytes: 0,
            order: VecDeque::new(),
            records: HashMap::new(),
        };
        recent.insert("a".into(), "x".repeat(9)); // 10 bytes
        recent.insert("b".into(), "x".repeat(9));
        recent.insert("c".into(), "x".repeat(9));
        assert_eq!(recent.bytes, 30);
        recent.insert("d".into(), "x".repeat(4)); // 5 more: a goes
        assert!(!recent.records.contains_key("a"));
        assert_eq!(recent.bytes, 25);
        recent.insert("b".into(), "x".repeat(19)); // b rewritten, now 20 and newest: c goes
        assert_eq!(recent.order, ["d", "b"].map(String::from));
        assert!(recent.bytes <= 30, "{}", recent.bytes);
        recent.insert("huge".into(), "x".repeat(100)); // larger than the whole buffer
        assert!(!recent.records.contains_key("huge"));
    }
}
