//! `sluice-loadgen`: the load client of the workshops and Sluice's benchmark tool.
//!
//! `--concurrency` clients (`--concurrent-clients`, `--concurrent-user`) send requests over
//! one protocol (`--protocol http | http-batch | ws | tcp | kafka`) until `--requests` were sent or
//! `--duration` passed. Closed loop by default: each client waits for its answer (and
//! `--delay` ms, or `--report-interval` with its unit) before the next request. With `--rate` the run is open loop: request `n`
//! is due at `n / rate` seconds, and its latency counts from then (see [`rate`]).
//!
//! Every event carries an id `<run>-<n>`; with `--verify-redis`, `--verify-file` or
//! `--verify-postgres`, `--verify-mysql` the acknowledged ids are looked up in the sink afterwards (see
//! [`verify`]). A one-line status goes to stderr every `--status-interval` seconds; the
//! report at the end is text, or JSON with `--json`. Targets must be loopback addresses
//! unless `--allow-remote` is given.

pub mod payload;
pub mod rate;
pub mod verify;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http::{HeaderValue, header};
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use payload::Shape;
use rate::Schedule;
use verify::{Sink, Verification};

/// How requests are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// One event per `POST`.
    Http,
    /// `--batch-size` events per `POST`, as a JSON array.
    HttpBatch,
    /// One WebSocket per client; each message (one event, or `--batch-size` as an array)
    /// waits for its acknowledgement frame.
    Ws,
    /// One TCP connection per client to the write port; one JSON line, one `ok <id>`.
    Tcp,
    /// Straight to Kafka with a bare producer (`--kafka-brokers`, topic = `--stream`),
    /// configured as ingest's and writing the records ingest writes for a stream without a
    /// key pointer (each event in its envelope, unkeyed), each request (`--batch-size`
    /// records) waiting for its acknowledgements: the ceiling ingest's figures are measured
    /// against.
    Kafka,
}

/// Command line of `sluice-loadgen`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-loadgen",
    version,
    about = "Load client and benchmark tool for Sluice ingest"
)]
pub struct Args {
    /// Base URL of the ingest service (HTTP and WebSocket).
    #[arg(
        long,
        visible_alias = "web-service",
        env = "SLUICE_LOADGEN_TARGET",
        default_value = "http://127.0.0.1:8080"
    )]
    pub target: String,
    /// Kafka for `--protocol kafka`.
    #[arg(long, env = "SLUICE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Address of ingest's TCP write port (`--protocol tcp`).
    #[arg(
        long,
        env = "SLUICE_LOADGEN_TCP_TARGET",
        default_value = "127.0.0.1:2525"
    )]
    pub tcp_target: String,
    /// Stream to send events to.
    #[arg(long, env = "SLUICE_LOADGEN_STREAM", default_value = "visit")]
    pub stream: String,
    /// HTTP path to post to, instead of `/v1/streams/<stream>/events` (for example the
    /// workshop's `/api/visit/v1/`).
    #[arg(long, env = "SLUICE_LOADGEN_PATH")]
    pub path: Option<String>,
    /// Protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Http)]
    pub protocol: Protocol,
    /// Shape of the events.
    #[arg(long, value_enum, default_value_t = Shape::Visit)]
    pub shape: Shape,
    /// Requests to send in all.
    #[arg(long, env = "SLUICE_LOADGEN_REQUESTS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub requests: u64,
    /// Requests per client; sets `--requests` to clients × this.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub req_per_user: Option<u64>,
    /// Clients sending at the same time.
    #[arg(long, visible_aliases = ["concurrent-clients", "concurrent-user"], env = "SLUICE_LOADGEN_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub concurrency: u64,
    /// Open loop: requests per second in all, whatever the answers; closed loop when unset.
    #[arg(long, env = "SLUICE_LOADGEN_RATE")]
    pub rate: Option<f64>,
    /// Closed loop: milliseconds each client waits between requests.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub delay: u64,
    /// Closed loop: the pause between one client's reports, with its unit (`100ms`, `1s`),
    /// as the workshop's load client takes it; replaces --delay. (The seconds between
    /// status lines, which this flag meant before, are --status-interval.)
    #[arg(long, value_parser = sluice_core::settings::duration_arg, conflicts_with = "delay")]
    pub report_interval: Option<Duration>,
    /// Events per request for `http-batch`, `ws` and `kafka`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch_size: u64,
    /// Reuse HTTP connections (`false`: a new connection per request).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub keep_alive: bool,
    /// Longest the run may take, in seconds.
    #[arg(long, env = "SLUICE_LOADGEN_DURATION", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
    /// Seconds between status lines on stderr; 0 for none.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub status_interval: u64,
    /// Allow targets that are not loopback addresses.
    #[arg(long, env = "SLUICE_LOADGEN_ALLOW_REMOTE")]
    pub allow_remote: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// After the run, check every acknowledged event is in this Redis.
    #[arg(long, value_name = "URL")]
    pub verify_redis: Option<String>,
    /// Key prefix for `--verify-redis`.
    #[arg(long, default_value = sluice_core::store::DEFAULT_PREFIX)]
    pub verify_key_prefix: String,
    /// After the run, check every acknowledged event is in this record directory.
    #[arg(long, value_name = "DIR")]
    pub verify_file: Option<PathBuf>,
    /// After the run, check every acknowledged event is in this PostgreSQL database.
    #[arg(long, value_name = "URL")]
    pub verify_postgres: Option<String>,
    /// After the run, check every acknowledged event is in this MySQL database.
    #[arg(long, value_name = "URL")]
    pub verify_mysql: Option<String>,
    /// Table for `--verify-postgres` and `--verify-mysql`.
    #[arg(long, default_value = "sluice_events")]
    pub verify_table: String,
    /// Seconds to wait for the sink to hold every acknowledged event.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub verify_timeout: u64,
    /// Log filter.
    #[arg(long, env = "SLUICE_LOG", default_value = "warn")]
    pub log_level: String,
}

impl Args {
    /// What a client waits after an answer before its next request (closed loop).
    pub fn pause(&self) -> Duration {
        self.report_interval
            .unwrap_or(Duration::from_millis(self.delay))
    }

    /// Requests the run sends at most.
    pub fn total_requests(&self) -> u64 {
        self.req_per_user
            .map_or(self.requests, |r| r.saturating_mul(self.concurrency))
    }

    /// Events per request.
    pub fn events_per_request(&self) -> u64 {
        match self.protocol {
            Protocol::HttpBatch | Protocol::Ws | Protocol::Kafka => self.batch_size,
            Protocol::Http | Protocol::Tcp => 1,
        }
    }

    fn sinks(&self) -> Vec<Sink> {
        let mut out = Vec::new();
        if let Some(url) = &self.verify_redis {
            out.push(Sink::Redis {
                url: url.clone(),
                prefix: self.verify_key_prefix.clone(),
            });
        }
        if let Some(dir) = &self.verify_file {
            out.push(Sink::File(dir.clone()));
        }
        if let Some(url) = &self.verify_postgres {
            out.push(Sink::Postgres {
                url: url.clone(),
                table: self.verify_table.clone(),
            });
        }
        if let Some(url) = &self.verify_mysql {
            out.push(Sink::Mysql {
                url: url.clone(),
                table: self.verify_table.clone(),
            });
        }
        out
    }
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The protocol used.
    pub protocol: Protocol,
    /// Requests sent.
    pub sent: u64,
    /// Requests acknowledged.
    pub acknowledged: u64,
    /// Events in the acknowledged requests.
    pub events_acknowledged: u64,
    /// Failed requests by kind (`http-503`, `connect`, `timeout`, `tcp-busy`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Wall time of the run, in seconds.
    pub seconds: f64,
    /// Acknowledged requests per second.
    pub throughput: f64,
    /// Acknowledged events per second.
    pub events_per_second: f64,
    /// Latency percentiles in milliseconds.
    pub latency_ms: Latencies,
    /// What the sink checks found.
    pub verification: Vec<Verification>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latencies {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest request.
    pub max: f64,
}

impl Latencies {
    /// The percentiles of a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

impl Report {
    /// Whether every request was acknowledged and every check came out clean.
    pub fn clean(&self) -> bool {
        self.errors.is_empty()
            && self
                .verification
                .iter()
                .all(|v| v.missing == 0 && v.duplicated == 0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "protocol      {:?}", self.protocol)?;
        writeln!(f, "sent          {}", self.sent)?;
        writeln!(
            f,
            "acknowledged  {} ({} events)",
            self.acknowledged, self.events_acknowledged
        )?;
        for (kind, n) in &self.errors {
            writeln!(f, "error         {kind}: {n}")?;
        }
        writeln!(f, "duration      {:.2} s", self.seconds)?;
        writeln!(
            f,
            "throughput    {:.0} requests/s ({:.0} per minute), {:.0} events/s",
            self.throughput,
            self.throughput * 60.0,
            self.events_per_second
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max
        )?;
        for v in &self.verification {
            writeln!(
                f,
                "verified      {}: {} checked, {} missing, {} duplicated",
                v.sink, v.checked, v.missing, v.duplicated
            )?;
            if !v.missing_examples.is_empty() {
                writeln!(f, "  missing     {}", v.missing_examples.join(" "))?;
            }
            if !v.duplicated_examples.is_empty() {
                writeln!(f, "  duplicated  {}", v.duplicated_examples.join(" "))?;
            }
        }
        Ok(())
    }
}

/// Checks that `host` is a loopback address, unless remote targets are allowed.
fn check_host(host: &str, allow_remote: bool) -> anyhow::Result<()> {
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback && !allow_remote {
        bail!("{host} is not a loopback address; pass --allow-remote to send load to it");
    }
    Ok(())
}

/// Checks that the URL `target` names a loopback address, unless remote targets are
/// allowed.
pub fn check_target(target: &str, allow_remote: bool) -> anyhow::Result<()> {
    let url = target
        .parse::<http::Uri>()
        .with_context(|| format!("{target:?} is not a URL"))?;
    if url.scheme_str() != Some("http") {
        bail!("{target:?} is not an http:// URL (the load client speaks plain HTTP)");
    }
    let host = url.host().context("the target URL has no host")?;
    check_host(host, allow_remote)
}

/// Checks that the `host:port` address `target` is a loopback address, unless remote
/// targets are allowed.
pub fn check_tcp_target(target: &str, allow_remote: bool) -> anyhow::Result<()> {
    let (host, port) = target
        .rsplit_once(':')
        .with_context(|| format!("{target:?} is not host:port"))?;
    port.parse::<u16>()
        .with_context(|| format!("{target:?} has no valid port"))?;
    check_host(host, allow_remote)
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    acknowledged: AtomicU64,
    errors: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, kind: String) {
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(kind).or_default() += 1;
        }
    }
}

/// One client's connection.
enum Conn {
    Http(SendRequest),
    Ws(
        Box<
            tokio_tungstenite::WebSocketStream<
                tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
            >,
        >,
    ),
    Tcp(BufReader<tokio::net::TcpStream>),
    Kafka(rdkafka::producer::FutureProducer),
}

/// Where HTTP requests go. Each load client keeps one HTTP/1.1 connection of its own
/// (hyper's client, no pool shared between clients), as separate clients would; with
/// `--keep-alive false` each request opens a new one.
struct HttpTarget {
    /// `host:port`, to connect to.
    address: String,
    /// The `Host` header.
    host: HeaderValue,
    /// The path and query of every request.
    path: http::Uri,
    keep_alive: bool,
}

impl HttpTarget {
    fn new(url: &str, keep_alive: bool) -> anyhow::Result<Self> {
        let uri = url
            .parse::<http::Uri>()
            .with_context(|| format!("{url:?} is not a URL"))?;
        let authority = uri.authority().context("the target URL has no host")?;
        let address = match authority.port_u16() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => format!("{}:80", authority.host()),
        };
        Ok(Self {
            address,
            host: HeaderValue::from_str(authority.as_str())?,
            path: uri
                .path_and_query()
                .map_or_else(|| http::Uri::from_static("/"), |p| p.clone().into()),
            keep_alive,
        })
    }

    async fn connect(&self) -> Result<SendRequest, String> {
        let stream = tokio::net::TcpStream::connect(&self.address)
            .await
            .map_err(|_| "connect".to_owned())?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|_| "connect".to_owned())?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// POSTs `body` as JSON on `sender`'s connection and reads the whole answer (so that
    /// the connection can take the next request); the answer's status, and whether the
    /// connection stays open. `Err` is the error's kind.
    async fn exchange(
        &self,
        sender: &mut SendRequest,
        body: &Value,
    ) -> Result<(http::StatusCode, bool), &'static str> {
        let body = serde_json::to_vec(body).map_err(|_| "encode")?;
        let mut request = http::Request::post(self.path.clone())
            .header(header::HOST, self.host.clone())
            .header(header::CONTENT_TYPE, "application/json");
        if !self.keep_alive {
            request = request.header(header::CONNECTION, "close");
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| "encode")?;
        let exchange = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let closing = response
                .headers()
                .get(header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            response.into_body().collect().await?;
            Ok::<_, hyper::Error>((status, !closing))
        };
        match tokio::time::timeout(Duration::from_secs(30), exchange).await {
            Ok(Ok((status, open))) => Ok((status, open && self.keep_alive)),
            Ok(Err(_)) => Err("transport"),
            Err(_) => Err("timeout"),
        }
    }
}

type SendRequest = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

struct Target {
    protocol: Protocol,
    http: HttpTarget,
    ws_url: String,
    tcp: String,
    topic: String,
    kafka: Option<rdkafka::producer::FutureProducer>,
}

impl Target {
    async fn connect(&self) -> Result<Conn, String> {
        match self.protocol {
            Protocol::Http | Protocol::HttpBatch => self.http.connect().await.map(Conn::Http),
            Protocol::Ws => tokio_tungstenite::connect_async(&self.ws_url)
                .await
                .map(|(ws, _)| Conn::Ws(Box::new(ws)))
                .map_err(|_| "ws-connect".to_owned()),
            Protocol::Tcp => tokio::net::TcpStream::connect(&self.tcp)
                .await
                .map(|s| Conn::Tcp(BufReader::new(s)))
                .map_err(|_| "connect".to_owned()),
            Protocol::Kafka => self
                .kafka
                .clone()
                .map(Conn::Kafka)
                .ok_or_else(|| "kafka-client".to_owned()),
        }
    }
}

/// Sends one request of `events`; `Err` is the error's kind. A connection that failed is
/// dropped, so the next request opens a new one.
async fn send(target: &Target, conn: &mut Option<Conn>, events: Vec<Value>) -> Result<(), String> {
    if conn.is_none() {
        *conn = Some(target.connect().await?);
    }
    let result = match conn.as_mut() {
        Some(Conn::Http(client)) => {
            let body = if target.protocol == Protocol::HttpBatch {
                Value::Array(events)
            } else {
                events.into_iter().next().unwrap_or_default()
            };
            match target.http.exchange(client, &body).await {
                Ok((status, reusable)) => {
                    if !reusable {
                        *conn = None;
                    }
                    if status.is_success() {
                        Ok(())
                    } else {
                        Err(format!("http-{}", status.as_u16()))
                    }
                }
                Err(kind) => Err(kind.to_owned()),
            }
        }
        Some(Conn::Ws(ws)) => {
            let text = if events.len() == 1 {
                events[0].to_string()
            } else {
                Value::Array(events).to_string()
            };
            if ws.send(Message::text(text)).await.is_err() {
                Err("ws-closed".to_owned())
            } else {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => {
                            let answer: Value =
                                serde_json::from_str(t.as_str()).unwrap_or_default();
                            break if answer["ok"] == true {
                                Ok(())
                            } else {
                                Err(format!(
                                    "ws-{}",
                                    answer["error"]["status"].as_u64().unwrap_or(0)
                                ))
                            };
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        _ => break Err("ws-closed".to_owned()),
                    }
                }
            }
        }
        Some(Conn::Tcp(stream)) => {
            let mut line = events.into_iter().next().unwrap_or_default().to_string();
            line.push('\n');
            if stream.get_mut().write_all(line.as_bytes()).await.is_err() {
                Err("tcp-closed".to_owned())
            } else {
                let mut answer = String::new();
                match stream.read_line(&mut answer).await {
                    Ok(0) | Err(_) => Err("tcp-closed".to_owned()),
                    Ok(_) if answer.starts_with("ok ") => Ok(()),
                    Ok(_) if answer.contains("busy") => Err("tcp-busy".to_owned()),
                    Ok(_) => Err("tcp-error".to_owned()),
                }
            }
        }
        Some(Conn::Kafka(producer)) => {
            // Every record of the request is queued at once, then the request waits for
            // all their acknowledgements, as ingest does. Each record is what ingest writes
            // for a stream without a key pointer: the event in its envelope, with no key.
            let mut deliveries = Vec::with_capacity(events.len());
            let mut failed = None;
            for event in events {
                let value =
                    sluice_core::envelope::Envelope::new(&target.topic, None, event).encode_value();
                let record =
                    rdkafka::producer::FutureRecord::<(), _>::to(&target.topic).payload(&value);
                match producer.send_result(record) {
                    Ok(delivery) => deliveries.push(delivery),
                    Err((e, _)) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            // Records already queued are waited for even when a later one was refused.
            let acknowledged = futures::future::join_all(deliveries).await;
            let error = failed.or_else(|| {
                acknowledged.into_iter().find_map(|d| match d {
                    Ok(Ok(_)) => None,
                    Ok(Err((e, _))) => Some(e),
                    Err(_) => Some(rdkafka::error::KafkaError::Canceled),
                })
            });
            match error {
                None => Ok(()),
                Some(e) => Err(format!(
                    "kafka-{}",
                    e.rdkafka_error_code()
                        .map_or_else(|| "error".to_owned(), |c| format!("{c:?}"))
                )),
            }
        }
        None => Err("connect".to_owned()),
    };
    if matches!(
        result.as_ref().map_err(String::as_str),
        Err("ws-closed" | "tcp-closed" | "transport" | "timeout")
    ) {
        *conn = None;
    }
    result
}

/// Runs the load and, when asked, the sink checks; returns what it measured.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    check_target(&args.target, args.allow_remote)?;
    if args.protocol == Protocol::Tcp {
        check_tcp_target(&args.tcp_target, args.allow_remote)?;
    }
    let base = args.target.trim_end_matches('/');
    let path = args
        .path
        .clone()
        .unwrap_or_else(|| format!("/v1/streams/{}/events", args.stream));
    let target = Arc::new(Target {
        protocol: args.protocol,
        http: HttpTarget::new(&format!("{base}{path}"), args.keep_alive)?,
        ws_url: format!(
            "{}/v1/streams/{}/ws",
            base.replacen("http", "ws", 1),
            args.stream
        ),
        tcp: args.tcp_target.clone(),
        topic: args.stream.clone(),
        kafka: if args.protocol == Protocol::Kafka {
            check_tcp_target(
                args.kafka_brokers.split(',').next().unwrap_or_default(),
                args.allow_remote,
            )?;
            Some(
                sluice_core::kafka::KafkaArgs::new(&args.kafka_brokers)
                    .producer_config()
                    .create()
                    .context("cannot create a Kafka producer")?,
            )
        } else {
            None
        },
    });
    let verifying = !args.sinks().is_empty();
    let run_id = format!(
        "lg{:x}",
        jiff::Timestamp::now().as_microsecond() & 0xffff_ffff_ffff
    );
    let total = args.total_requests();
    let per_request = args.events_per_request();
    let tally = Arc::new(Tally::default());
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        120_000_000,
        3,
    )?));
    let acked_ids = Arc::new(Mutex::new(Vec::<String>::new()));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let schedule = match args.rate {
        Some(r) => Some(Schedule::new(started, r).context("--rate must be a positive number")?),
        None => None,
    };
    let delay = args.pause();

    let progress = (args.status_interval > 0).then(|| {
        let (tally, every) = (tally.clone(), Duration::from_secs(args.status_interval));
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(every).await;
                let acked = tally.acknowledged.load(Ordering::Relaxed);
                let errors: u64 = tally.errors.lock().map(|e| e.values().sum()).unwrap_or(0);
                eprintln!(
                    "[loadgen] {:>6.1}s  sent {}  acknowledged {}  errors {}  {:.0} req/s",
                    started.elapsed().as_secs_f64(),
                    tally.sent.load(Ordering::Relaxed),
                    acked,
                    errors,
                    (acked - last) as f64 / every.as_secs_f64()
                );
                last = acked;
            }
        })
    });

    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (target, tally, histogram, next, acked_ids, run_id) = (
            target.clone(),
            tally.clone(),
            histogram.clone(),
            next.clone(),
            acked_ids.clone(),
            run_id.clone(),
        );
        let shape = args.shape;
        clients.spawn(async move {
            let mut local =
                Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("valid bounds");
            let mut ids = Vec::new();
            let mut conn = None;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total || Instant::now() >= deadline {
                    break;
                }
                let due = match schedule {
                    Some(s) => {
                        let due = s.due(n);
                        if due >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                let events: Vec<Value> = (n * per_request..(n + 1) * per_request)
                    .map(|i| payload::event(shape, &run_id, i))
                    .collect();
                let sent_ids: Vec<String> = if verifying {
                    events
                        .iter()
                        .filter_map(|e| e["id"].as_str().map(str::to_owned))
                        .collect()
                } else {
                    Vec::new()
                };
                tally.sent.fetch_add(1, Ordering::Relaxed);
                match send(&target, &mut conn, events).await {
                    Ok(()) => {
                        local.saturating_record(due.elapsed().as_micros().max(1) as u64);
                        tally.acknowledged.fetch_add(1, Ordering::Relaxed);
                        ids.extend(sent_ids);
                    }
                    Err(kind) => tally.error(kind),
                }
                if schedule.is_none() && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
            histogram.lock().await.add(&local).expect("same bounds");
            acked_ids.lock().await.extend(ids);
        });
    }
    while let Some(done) = clients.join_next().await {
        done?;
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
    }
    let acknowledged = tally.acknowledged.load(Ordering::Relaxed);
    let ids = acked_ids.lock().await.clone();
    let mut verification = Vec::new();
    for sink in args.sinks() {
        verification.push(
            sink.verify(&args.stream, &ids, Duration::from_secs(args.verify_timeout))
                .await?,
        );
    }
    let latency_ms = Latencies::of(&*histogram.lock().await);
    let errors = tally.errors.lock().map(|e| e.clone()).unwrap_or_default();
    Ok(Report {
        protocol: args.protocol,
        sent: tally.sent.load(Ordering::Relaxed),
        acknowledged,
        events_acknowledged: acknowledged * per_request,
        errors,
        seconds,
        throughput: acknowledged as f64 / seconds.max(f64::EPSILON),
        events_per_second: (acknowledged * per_request) as f64 / seconds.max(f64::EPSILON),
        latency_ms,
        verification,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn only_loopback_targets_unless_allowed() {
        assert!(check_target("http://127.0.0.1:8080", false).is_ok());
        assert!(check_target("http://localhost:8080", false).is_ok());
        assert!(check_target("http://[::1]:8080", false).is_ok());
        let err = check_target("http://10.0.0.5:8080", false).expect_err("remote");
        assert!(err.to_string().contains("--allow-remote"));
        assert!(check_target("http://10.0.0.5:8080", true).is_ok());
        assert!(check_target("not a url", false).is_err());
        assert!(check_tcp_target("127.0.0.1:2525", false).is_ok());
        assert!(check_tcp_target("10.1.2.3:2525", false).is_err());
        assert!(check_tcp_target("127.0.0.1", false).is_err());
    }

    #[test]
    fn workshop_flags_are_accepted() {
        let a = Args::try_parse_from([
            "sluice-loadgen",
            "--web-service",
            "http://127.0.0.1:9000",
            "--concurrent-clients",
            "8",
            "--report-interval",
            "100ms",
        ])
        .expect("workshop client flags");
        assert_eq!(
            (a.target.as_str(), a.concurrency, a.pause()),
            ("http://127.0.0.1:9000", 8, Duration::from_millis(100))
        );
        let unitless = Args::try_parse_from(["sluice-loadgen", "--report-interval", "2"])
            .expect_err("a pause without its unit");
        assert!(unitless.to_string().contains("500ms"), "{unitless}");
        let both =
            Args::try_parse_from(["sluice-loadgen", "--report-interval", "1s", "--delay", "5"])
                .expect_err("two pauses");
        assert!(both.to_string().contains("cannot be used with"), "{both}");
        let t = Args::try_parse_from([
            "sluice-loadgen",
            "--protocol",
            "tcp",
            "--concurrent-user",
            "50",
            "--req-per-user",
            "20",
            "--delay",
            "10",
        ])
        .expect("TCP client flags");
        assert_eq!(t.total_requests(), 1000);
        assert_eq!(t.events_per_request(), 1);
        let b = Args::try_parse_from([
            "sluice-loadgen",
            "--protocol",
            "http-batch",
            "--batch-size",
            "50",
        ])
        .expect("batch");
        assert_eq!(b.events_per_request(), 50);
        assert!(
            Args::try_parse_from(["sluice-loadgen", "--requests", "0"]).is_err(),
            "bounded"
        );
        assert!(
            Args::try_parse_from(["sluice-loadgen", "--duration", "100000"]).is_err(),
            "bounded"
        );
    }

    #[test]
    fn latencies_come_from_the_histogram() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("histogram");
        for micros in 1..=1000 {
            h.record(micros * 1000).expect("record");
        }
        let l = Latencies::of(&h);
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 1.5, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
    }
}
