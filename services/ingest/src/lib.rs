//! `sluice-ingest`: the front door. Events arrive over HTTP and WebSocket, are checked,
//! wrapped in an [`Envelope`](sluice_core::Envelope) and published to their stream's Kafka
//! topic; records are read back from Redis, where collectors write them.
//!
//! - [`http`]: the versioned JSON API, the workshop paths, OpenAPI; health and metrics on
//!   their own port ([`http::admin_router`]);
//! - [`auth`]: the API keys every door asks for;
//! - [`ws`]: the WebSocket door, one ack or error frame per text frame;
//! - [`tcp`]: the JSON-lines write and read ports of the buffered store;
//! - [`publish`]: checks and publishes events, shared by every door;
//! - [`confirm`]: `ack=sink`, waiting for the collectors' confirmations;
//! - [`records`]: records read back from a stream's SQL table;
//! - [`input`]: request bodies (one object, an array, NDJSON) into payloads;
//! - [`listener`]: the connection limit; [`metrics`]: Prometheus metrics.
//!
//! Ingest answers 2xx only after Kafka acknowledged every event of a request (unless the
//! caller asks for `ack=none`); while Kafka is unreachable publishing answers 503 with
//! `Retry-After` at once, without queueing, and the instance stays ready so that clients
//! get that answer rather than a refused connection. On SIGTERM it drains first
//! ([`App::start_draining`]): `/readyz` fails and every answer closes its connection,
//! while it goes on serving for `--drain-delay`; then it stops.

pub mod aggregates;
pub mod auth;
pub mod confirm;
pub mod error;
pub mod gate;
pub mod http;
pub mod input;
pub mod listener;
pub mod metrics;
pub mod openapi;
pub mod publish;
pub mod records;
pub mod tcp;
pub mod ui;
pub mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sluice_core::args::{RedisArgs, ServiceArgs};
use sluice_core::kafka::{KafkaArgs, TopicSpec, ensure_topics};
use sluice_core::settings::{SettingsError, duration_arg};
use sluice_core::{PipelineSettings, StreamSettings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use http::router;

use listener::LimitedListener;
use metrics::Metrics;
use publish::{Publisher, SchemaError, Streams};

/// Command line and environment of `sluice-ingest`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-ingest",
    version,
    about = "Sluice ingest: HTTP and WebSocket in, Kafka out",
    after_help = "Without --settings the pipeline is the streams `visit` and `activity`, on the topics of --visit-topic and --activity-topic (created when absent). --create-topics creates every stream's topic and read-event topic."
)]
pub struct Args {
    /// Address the HTTP server listens on.
    #[arg(long, env = "SLUICE_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Port of the HTTP server, on the address of --listen (the workshop's flag).
    #[arg(long, env = "SLUICE_INGEST_PORT")]
    pub port: Option<u16>,
    /// Settings, topic creation, metrics and logs.
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Topic of the stream `visit` (`POST /api/visit/v1/`); created at start when absent.
    #[arg(long, env = "SLUICE_VISIT_TOPIC")]
    pub visit_topic: Option<String>,
    /// Topic of the stream `activity` (`POST /api/activity/v1/`); created at start when
    /// absent.
    #[arg(long, env = "SLUICE_ACTIVITY_TOPIC")]
    pub activity_topic: Option<String>,
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Redis (the password also goes to the replica).
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Redis replica reads go to first; the primary answers when it is absent or misses.
    #[arg(long, env = "SLUICE_REDIS_REPLICA_URL")]
    pub redis_replica_url: Option<String>,
    /// Database of the streams whose settings name a SQL `store` (`postgres://...` or
    /// `mysql://...`): GET and the TCP read port read their records there.
    #[arg(long, env = "SLUICE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Publish a read event to the stream's read topic on every GET hit.
    #[arg(long, env = "SLUICE_READ_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub read_events: bool,
    /// Stream that `POST /v1/messages` publishes chat messages to.
    #[arg(long, env = "SLUICE_MESSAGES_STREAM", default_value = "messages")]
    pub messages_stream: String,
    /// Largest request body, WebSocket message or frame accepted, in bytes.
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most events in one request or WebSocket message.
    #[arg(long, env = "SLUICE_MAX_BATCH_EVENTS", default_value_t = 10_000)]
    pub max_batch_events: usize,
    /// Most connections held open at once (HTTP and WebSocket together).
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Longest simulated work `POST /v1/work?ms=N` accepts, in milliseconds.
    #[arg(long, env = "SLUICE_WORK_MAX_MS", default_value_t = 10_000)]
    pub work_max_ms: u64,
    /// Address of the TCP JSON-lines write port (for example 127.0.0.1:2525); off when unset.
    #[arg(long, env = "SLUICE_TCP_WRITE_LISTEN")]
    pub tcp_write_listen: Option<SocketAddr>,
    /// Address of the TCP read port (for example 127.0.0.1:2526); off when unset.
    #[arg(long, env = "SLUICE_TCP_READ_LISTEN")]
    pub tcp_read_listen: Option<SocketAddr>,
    /// Let the TCP read port dump every record of the stream (`all`); without it the port
    /// answers `get <id>` only.
    #[arg(long, env = "SLUICE_TCP_READ_DUMP")]
    pub tcp_read_dump: bool,
    /// Stream the TCP write port publishes to and the read port reads.
    #[arg(long, env = "SLUICE_TCP_STREAM", default_value = "records")]
    pub tcp_stream: String,
    /// Lines the TCP write queue holds before answering `error busy`.
    #[arg(long, env = "SLUICE_QUEUE_SIZE", default_value_t = 10_000)]
    pub queue_size: usize,
    /// Bytes of acknowledged TCP lines the read port serves from memory before a
    /// collector stored them.
    #[arg(long, env = "SLUICE_TCP_RECENT_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub tcp_recent_bytes: usize,
    /// Workers publishing the TCP write buffer to Kafka.
    #[arg(long, env = "SLUICE_WORKER_SIZE", default_value_t = 4)]
    pub worker_size: usize,
    /// Longest TCP line accepted, in bytes.
    #[arg(long, env = "SLUICE_MAX_LINE_BYTES", default_value_t = 64 * 1024)]
    pub max_line_bytes: usize,
    /// File of API keys, one per line (`#` starts a comment); when set, every door needs
    /// one of them: the `/v1` and `/api` endpoints, WebSocket, and both TCP ports (the
    /// line `auth <key>` first).
    #[arg(long, env = "SLUICE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// How often the API key file is read again; a changed file replaces the keys.
    #[arg(long, env = "SLUICE_API_KEYS_RELOAD", default_value = "5s", value_parser = duration_arg)]
    pub api_keys_reload: Duration,
    /// Longest wait for Kafka's acknowledgement of a request's events; then the request
    /// is answered 503 with `Retry-After` and each event's id and status.
    #[arg(long, env = "SLUICE_ACK_TIMEOUT", default_value = "10s", value_parser = duration_arg)]
    pub ack_timeout: Duration,
    /// This process's name among the pipeline's ingest instances, where collectors send
    /// `ack=sink` confirmations; the pod's or host's name with a random suffix by default.
    #[arg(long, env = "SLUICE_INSTANCE")]
    pub instance: Option<String>,
    /// How long an `ack=sink` request waits for its collectors when it gives no `timeout`.
    #[arg(long, env = "SLUICE_SINK_ACK_TIMEOUT", default_value = "10s", value_parser = duration_arg)]
    pub sink_ack_timeout: Duration,
    /// The longest `timeout` an `ack=sink` request may ask for.
    #[arg(long, env = "SLUICE_SINK_ACK_MAX_TIMEOUT", default_value = "60s", value_parser = duration_arg)]
    pub sink_ack_max_timeout: Duration,
    /// Most events waiting for their collectors at once on this instance; `ack=sink`
    /// requests beyond it are answered 503 with `Retry-After` before anything is published.
    #[arg(long, env = "SLUICE_SINK_ACK_MAX_WAITING", default_value_t = 100_000)]
    pub sink_ack_max_waiting: usize,
    /// How long ingest keeps serving after SIGTERM, with `/readyz` failing and every
    /// answer closing its connection, so that load balancers and clients move to other
    /// instances before it stops accepting. Ctrl-C (SIGINT) stops without this delay.
    #[arg(long, env = "SLUICE_DRAIN_DELAY", default_value = "5s", value_parser = duration_arg)]
    pub drain_delay: Duration,
}

impl Args {
    /// Settings for tests and embedding: every limit at its default.
    pub fn new(settings: PathBuf, kafka: KafkaArgs, redis_url: String) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            port: None,
            service: ServiceArgs::new(Some(settings)),
            visit_topic: None,
            activity_topic: None,
            kafka,
            redis: RedisArgs::new(redis_url),
            redis_replica_url: None,
            database_url: None,
            read_events: true,
            messages_stream: "messages".to_owned(),
            max_body_bytes: 1024 * 1024,
            max_batch_events: 10_000,
            max_connections: 10_000,
            work_max_ms: 10_000,
            tcp_write_listen: None,
            tcp_read_listen: None,
            tcp_read_dump: false,
            tcp_stream: "records".to_owned(),
            queue_size: 10_000,
            tcp_recent_bytes: 16 * 1024 * 1024,
            worker_size: 4,
            max_line_bytes: 64 * 1024,
            api_keys_file: None,
            api_keys_reload: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(10),
            instance: None,
            sink_ack_timeout: confirm::DEFAULT_TIMEOUT,
            sink_ack_max_timeout: Duration::from_secs(60),
            sink_ack_max_waiting: 100_000,
            drain_delay: Duration::from_secs(5),
        }
    }

    /// This instance's name: --instance, or the pod's (or host's) name with a random
    /// suffix.
    pub fn instance_name(&self) -> Result<String, SettingsError> {
        match &self.instance {
            Some(name) if sluice_core::confirm::valid_instance(name) => Ok(name.clone()),
            Some(name) => Err(SettingsError::Invalid(format!(
                "--instance {name:?} must be 1 to 100 ASCII letters, digits, '.', '_' or '-'"
            ))),
            None => {
                let base = std::env::var("POD_NAME")
                    .or_else(|_| std::env::var("HOSTNAME"))
                    .unwrap_or_default();
                Ok(confirm::instance_name(&base))
            }
        }
    }

    /// The address the HTTP server listens on: --listen, with --port's port when given.
    pub fn http_address(&self) -> SocketAddr {
        let mut addr = self.listen;
        if let Some(port) = self.port {
            addr.set_port(port);
        }
        addr
    }

    /// The pipeline: the settings file with the topics of --visit-topic and
    /// --activity-topic, or without a file the streams `visit` and `activity`. Also the
    /// topics those flags name (all of the file's with --create-topics), to create when
    /// absent.
    pub fn pipeline(&self) -> Result<(PipelineSettings, Vec<TopicSpec>), SettingsError> {
        let named = [
            ("visit", &self.visit_topic),
            ("activity", &self.activity_topic),
        ];
        let mut settings = match &self.service.settings {
            Some(path) => PipelineSettings::from_file(path)?,
            None => PipelineSettings::of_streams(
                named
                    .iter()
                    .map(|(name, _)| StreamSettings::new(*name))
                    .collect(),
            )?,
        };
        let mut create = Vec::new();
        for (name, topic) in named {
            let Some(stream) = settings.streams.iter_mut().find(|s| s.name == name) else {
                if topic.is_some() {
                    return Err(SettingsError::Invalid(format!(
                        "--{name}-topic: the pipeline settings have no stream {name:?}"
                    )));
                }
                continue;
            };
            if let Some(topic) = topic {
                stream.topic = Some(topic.clone());
            }
            if topic.is_some() || self.service.settings.is_none() {
                create.push(TopicSpec {
                    name: stream.topic().to_owned(),
                    partitions: stream.partitions,
                });
            }
        }
        // The topics may have changed: checked as a file's are.
        settings.validate()?;
        if self.service.create_topics {
            create.clear();
            for s in &settings.streams {
                create.push(TopicSpec {
                    name: s.topic().to_owned(),
                    partitions: s.partitions,
                });
                if self.read_events {
                    create.push(TopicSpec {
                        name: s.read_topic(),
                        partitions: s.partitions,
                    });
                }
            }
        }
        Ok((settings, create))
    }
}

/// Why ingest cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The settings file is unusable.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// A stream's schema does not compile.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The Kafka client could not be created, or topics could not be created.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Redis is unreachable.
    #[error("redis at {url}: {source}")]
    Redis {
        /// The URL tried.
        url: String,
        /// The error.
        #[source]
        source: redis::RedisError,
    },
    /// A stream reads its records from a database that --database-url does not give.
    #[error("{0}")]
    Database(String),
    /// The API key file cannot be used.
    #[error(transparent)]
    ApiKeys(#[from] auth::KeyFileError),
}

/// What the handlers share.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    streams: Streams,
    publisher: Publisher,
    redis: ConnectionManager,
    replica: Option<ConnectionManager>,
    key_prefix: String,
    read_events: bool,
    messages_stream: String,
    max_body_bytes: usize,
    max_batch_events: usize,
    max_connections: usize,
    work_max_ms: u64,
    api_keys: Arc<auth::ApiKeys>,
    kafka_ready: AtomicBool,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    /// Cancelled when the server shuts down; long-lived connections (WebSocket) close.
    closing: CancellationToken,
    tcp_stream: String,
    tcp: Option<Arc<tcp::Buffer>>,
    tcp_read_dump: bool,
    sql: Option<records::SqlStore>,
    sink_ack_timeout: Duration,
    sink_ack_max_timeout: Duration,
}

/// A Redis connection made on first use: publishing never needs Redis, so ingest starts
/// and takes events while Redis is away (reads answer 503 until it is back), and runs with
/// no Redis at all where nothing reads.
fn redis_connection(redis: &RedisArgs, url: &str) -> Result<ConnectionManager, StartError> {
    let redis_error = |source| StartError::Redis {
        url: url.to_owned(),
        source,
    };
    let client = redis.client_of(url).map_err(redis_error)?;
    ConnectionManager::new_lazy_with_config(client, ConnectionManagerConfig::new())
        .map_err(redis_error)
}

/// The database of the streams whose records are read from SQL, checked against them.
fn sql_store(
    args: &Args,
    settings: &PipelineSettings,
) -> Result<Option<records::SqlStore>, StartError> {
    let wanted: Vec<_> = settings
        .streams
        .iter()
        .filter_map(|s| s.store.as_ref().map(|st| (s.name.as_str(), st.kind)))
        .collect();
    let Some((first, _)) = wanted.first() else {
        return Ok(None);
    };
    let url = args.database_url.as_deref().ok_or_else(|| {
        StartError::Database(format!(
            "stream {first:?} reads its records from SQL: give --database-url"
        ))
    })?;
    let store = records::SqlStore::connect_lazy(url).map_err(StartError::Database)?;
    if let Some((stream, kind)) = wanted.iter().find(|(_, k)| *k != store.kind()) {
        return Err(StartError::Database(format!(
            "stream {stream:?} reads its records from {kind:?}, but --database-url is a {:?} URL",
            store.kind()
        )));
    }
    Ok(Some(store))
}

impl App {
    /// Reads the settings, creates the Kafka producer and connects to Redis.
    pub async fn connect(args: &Args) -> Result<Self, StartError> {
        let (settings, create) = args.pipeline()?;
        let streams = Streams::new(&settings)?;
        if !create.is_empty() {
            ensure_topics(&args.kafka, &create).await?;
        }
        let producer: FutureProducer = args.kafka.producer_config().create()?;
        let redis = redis_connection(&args.redis, &args.redis.url)?;
        let replica = match &args.redis_replica_url {
            Some(url) => Some(redis_connection(&args.redis, url)?),
            None => None,
        };
        let sql = sql_store(args, &settings)?;
        let api_keys = Arc::new(auth::ApiKeys::load(args.api_keys_file.as_deref())?);
        let metrics = Arc::new(Metrics::new());
        let closing = CancellationToken::new();
        tokio::spawn(api_keys.clone().watch(
            args.api_keys_reload,
            metrics.clone(),
            closing.clone(),
        ));
        let instance = args.instance_name()?;
        let sink_acks = confirm::SinkAcks::new(
            instance.clone(),
            args.redis.client().map_err(|source| StartError::Redis {
                url: args.redis.url.clone(),
                source,
            })?,
            &args.redis.key_prefix,
            args.sink_ack_max_waiting,
            metrics.clone(),
            closing.clone(),
        );
        tracing::info!(%instance, "ingest instance");
        let publisher = Publisher::new(producer, metrics.clone(), args.ack_timeout, sink_acks);
        let tcp = settings.stream(&args.tcp_stream).map(|s| {
            tcp::Buffer::start(
                publisher.clone(),
                s.topic().to_owned(),
                args.queue_size,
                args.worker_size,
                args.max_line_bytes,
                args.tcp_recent_bytes,
                closing.clone(),
            )
        });
        Ok(Self {
            inner: Arc::new(Inner {
                streams,
                publisher,
                redis,
                replica,
                key_prefix: args.redis.key_prefix.clone(),
                read_events: args.read_events,
                messages_stream: args.messages_stream.clone(),
                max_body_bytes: args.max_body_bytes,
                max_batch_events: args.max_batch_events,
                max_connections: args.max_connections,
                work_max_ms: args.work_max_ms,
                api_keys,
                // Optimistic until the first check says otherwise.
                kafka_ready: AtomicBool::new(true),
                draining: AtomicBool::new(false),
                metrics,
                closing,
                tcp_stream: args.tcp_stream.clone(),
                tcp,
                tcp_read_dump: args.tcp_read_dump,
                sql,
                sink_ack_timeout: args.sink_ack_timeout,
                sink_ack_max_timeout: args.sink_ack_max_timeout,
            }),
        })
    }

    /// Whether Kafka answered the last metadata request.
    pub fn kafka_ready(&self) -> bool {
        self.inner.kafka_ready.load(Ordering::Relaxed)
    }

    /// Starts draining: `/readyz` answers 503 and every HTTP answer carries
    /// `Connection: close`, while requests are still served. Stopping is the caller's
    /// next step ([`run`]'s `shutdown`).
    pub fn start_draining(&self) {
        if !self.inner.draining.swap(true, Ordering::Relaxed) {
            tracing::info!("draining: readiness fails and connections close after each answer");
        }
    }

    /// Whether [`App::start_draining`] was called.
    pub fn draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Asks Kafka for metadata every `interval` and keeps [`App::kafka_ready`] up to date,
    /// until `shutdown` is cancelled. The metadata asked for is one stream's topic, not the
    /// whole cluster's (thousands of topics on a shared cluster, every second, from every
    /// replica).
    pub async fn watch_kafka(self, interval: Duration, shutdown: CancellationToken) {
        let probe = self
            .inner
            .streams
            .all()
            .first()
            .map(|s| s.settings.topic().to_owned());
        loop {
            let producer = self.inner.publisher.producer().clone();
            let probe = probe.clone();
            let answer = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(probe.as_deref(), Duration::from_secs(2))
                    .map(|_| ())
            })
            .await;
            let ready = matches!(answer, Ok(Ok(())));
            let was = self.inner.kafka_ready.swap(ready, Ordering::Relaxed);
            match (was, ready, answer) {
                (true, false, Ok(Err(e))) => {
                    tracing::error!(error = %e, "Kafka is unreachable; refusing events until it is back")
                }
                (true, false, _) => {
                    tracing::error!("Kafka is unreachable; refusing events until it is back")
                }
                (false, true, _) => tracing::info!("Kafka is reachable again"),
                _ => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// The API keys the doors ask for.
    pub fn api_keys(&self) -> &auth::ApiKeys {
        &self.inner.api_keys
    }

    /// The TCP write buffer, when the TCP stream is in the settings.
    pub fn tcp_buffer(&self) -> Option<&Arc<tcp::Buffer>> {
        self.inner.tcp.as_ref()
    }

    /// The database of streams whose records are read from SQL.
    pub fn sql(&self) -> Option<&records::SqlStore> {
        self.inner.sql.as_ref()
    }

    /// A Redis connection for reads: the replica when there is one.
    pub fn read_connection(&self) -> ConnectionManager {
        self.inner
            .replica
            .clone()
            .unwrap_or_else(|| self.inner.redis.clone())
    }

    /// Waits up to `timeout` for queued events to be acknowledged.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.inner.publisher.producer().flush(timeout) {
            tracing::error!(error = %e, "events still unacknowledged at shutdown");
        }
    }
}

/// Serves HTTP and WebSocket on `listener` until `shutdown` is cancelled; then stops
/// accepting, finishes the requests in flight and waits for their events to be acknowledged.
/// Keeps the Kafka state up to date meanwhile.
pub async fn run(
    listener: TcpListener,
    app: App,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "ingest listening");
    tokio::spawn(
        app.clone()
            .watch_kafka(Duration::from_secs(1), shutdown.clone()),
    );

    let closing = app.inner.closing.clone();
    let on_shutdown = shutdown.clone();
    tokio::spawn(async move {
        on_shutdown.cancelled().await;
        closing.cancel();
    });
    let listener = LimitedListener::new(listener, app.inner.max_connections);
    axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    app.flush(Duration::from_secs(10));
    tracing::info!("ingest stopped");
    Ok(())
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` is cancelled.
pub async fn serve_admin(
    listener: TcpListener,
    app: App,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "metrics and health listening");
    axum::serve(listener, http::admin_router(app))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn the_workshop_flags_make_the_visit_and_activity_streams_and_their_topics() {
        let args = Args::parse_from([
            "sluice-ingest",
            "--brokers",
            "kafka:9092",
            "--port",
            "9000",
            "--visit-topic",
            "visits-v1",
            "--activity-topic",
            "activities-v1",
        ]);
        assert_eq!(args.kafka.brokers, "kafka:9092");
        assert_eq!(args.http_address(), "127.0.0.1:9000".parse().expect("addr"));
        let (settings, create) = args.pipeline().expect("pipeline");
        let topics: Vec<(&str, &str)> = settings
            .streams
            .iter()
            .map(|s| (s.name.as_str(), s.topic()))
            .collect();
        assert_eq!(
            topics,
            [("visit", "visits-v1"), ("activity", "activities-v1")]
        );
        let created: Vec<&str> = create.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(created, ["visits-v1", "activities-v1"]);

        // No flags: the two streams on topics of their names, created too.
        let (_, create) = Args::parse_from(["sluice-ingest"])
            .pipeline()
            .expect("pipeline");
        let created: Vec<&str> = create.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(created, ["visit", "activity"]);
    }

    #[test]
    fn with_a_settings_file_the_topic_flags_move_its_streams_or_say_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pipeline.yaml");
        std::fs::write(&path, "streams:\n  - name: visit\n  - name: orders\n").expect("write");
        let settings = path.display().to_string();
        let args = Args::parse_from([
            "sluice-ingest",
            "--settings",
            &settings,
            "--visit-topic",
            "visits-v2",
        ]);
        let (pipeline, create) = args.pipeline().expect("pipeline");
        assert_eq!(
            pipeline.stream("visit").map(|s| s.topic()),
            Some("visits-v2")
        );
        assert_eq!(pipeline.stream("orders").map(|s| s.topic()), Some("orders"));
        let created: Vec<&str> = create.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(created, ["visits-v2"], "only the topic a flag named");

        let missing = Args::parse_from([
            "sluice-ingest",
            "--settings",
            &settings,
            "--activity-topic",
            "a",
        ]);
        let err = missing.pipeline().expect_err("no activity stream");
        assert!(err.to_string().contains("--activity-topic"), "{err}");
        let bad = Args::parse_from(["sluice-ingest", "--visit-topic", "not a topic"]);
        let err = bad.pipeline().expect_err("bad topic");
        assert!(err.to_string().contains("not a topic"), "{err}");
    }
}
