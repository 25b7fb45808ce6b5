//! `sluice-collector`: consumes the topics of its streams in consumer groups and writes the
//! events to one sink, at least once, with retry and dead-letter topics.
//!
//! - [`consume`]: the consumer loop: batches, partitions in parallel, offsets, retries;
//! - [`sink`]: the sinks (`redis`, `redis-index`, `file`, `postgres`) behind one trait;
//! - [`metrics`]: Prometheus metrics, with consumer lag per partition;
//! - [`redrive`]: `sluice-collector redrive`, dead-lettered events back to their stream.
//!
//! Each group runs two consumers: the main one on the streams' topics, and a retry
//! consumer (group `<group>.retry`) on their `<stream>.retry` topics. A write that keeps
//! failing goes to `<stream>.retry` with its attempt count; the retry consumer writes it
//! again after the pipeline's backoff, and after the last attempt sends it to
//! `<stream>.dlq`. An offset is stored only once its event is in the sink or acknowledged
//! on a retry or dead-letter topic.

pub mod confirm;
pub mod consume;
pub mod health;
pub mod metrics;
pub mod redrive;
pub mod sink;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use rdkafka::error::KafkaError;
use sluice_core::args::{RedisArgs, ServiceArgs};
use sluice_core::kafka::{KafkaArgs, TopicSpec, ensure_topics};
use sluice_core::settings::{SettingsError, duration_arg};
use sluice_core::{PipelineSettings, StreamSettings};
use tokio_util::sync::CancellationToken;

use consume::{Mode, Worker, WorkerConfig};
use health::SinkHealth;
use metrics::Metrics;
use sink::{AnySink, SinkError};

/// The sink a collector writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    /// Each event's JSON under `<prefix>:<stream>:<id>`, plus per-minute aggregates.
    Redis,
    /// Per recipient, the senders with unsent messages (chat).
    RedisIndex,
    /// JSON lines per stream and partition under `--record-directory`.
    File,
    /// Rows in PostgreSQL, upserted on (stream, id).
    Postgres,
    /// Rows in MySQL or MariaDB, upserted on (stream, id).
    Mysql,
}

impl SinkKind {
    /// The sink's name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::RedisIndex => "redis-index",
            Self::File => "file",
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        }
    }
}

/// Command line and environment of `sluice-collector`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-collector",
    version,
    about = "Sluice collector: Kafka in, sinks out",
    after_help = "Without --settings the topics named in --groups are the streams, written to files (--record-directory) by default. --create-topics creates the streams' retry and dead-letter topics (always done without --settings).\n\n`sluice-collector redrive --help`: send a stream's dead-lettered events back to its topic."
)]
pub struct Args {
    /// Settings, topic creation, metrics and logs.
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Consumer group; instances in one group share the partitions.
    #[arg(
        long,
        env = "SLUICE_COLLECTOR_GROUP",
        default_value = "sluice-collector"
    )]
    pub group: String,
    /// Streams to collect, comma separated; all streams of the settings when empty.
    #[arg(
        long = "streams",
        env = "SLUICE_COLLECTOR_STREAMS",
        value_delimiter = ','
    )]
    pub streams: Vec<String>,
    /// Groups and topics as `group:topic[,group:topic...]`; replaces --group and --streams.
    #[arg(long, env = "SLUICE_COLLECTOR_GROUPS", value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Where events are written: `redis` by default with --settings, `file` without.
    #[arg(long, env = "SLUICE_SINK", value_enum)]
    pub sink: Option<SinkKind>,
    /// The Redis the `redis` and `redis-index` sinks write to.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Expiry of records in Redis (`3600s`, `24h`); records never expire when unset.
    #[arg(long, env = "SLUICE_RECORD_TTL", value_parser = duration_arg)]
    pub record_ttl: Option<Duration>,
    /// Directory of the `file` sink.
    #[arg(long, env = "SLUICE_RECORD_DIRECTORY", default_value = "records")]
    pub record_directory: PathBuf,
    /// The `file` sink starts a new segment at this size, in bytes.
    #[arg(long, env = "SLUICE_FILE_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub file_max_bytes: u64,
    /// The `file` sink starts a new segment after this long (`10m`, `1h`).
    #[arg(long, env = "SLUICE_FILE_MAX_AGE", default_value = "1h", value_parser = duration_arg)]
    pub file_max_age: Duration,
    /// How many of the latest event ids per partition the `file` sink remembers, to store
    /// an id once (a retry or redrive with the same id adds no line).
    #[arg(long, env = "SLUICE_FILE_DEDUPE_IDS", default_value_t = 100_000)]
    pub file_dedupe_ids: usize,
    /// When the `file` sink syncs to disk.
    #[arg(long, env = "SLUICE_FSYNC", value_enum, default_value = "batch")]
    pub fsync: sink::file::Fsync,
    /// Database of the `postgres` sink (`postgres://...`) or the `mysql` sink
    /// (`mysql://user:password@host:3306/database`).
    #[arg(
        long,
        env = "SLUICE_DATABASE_URL",
        default_value = "postgres://sluice@127.0.0.1:5432/sluice"
    )]
    pub database_url: String,
    /// Table of the `postgres` sink, created if absent.
    #[arg(long, env = "SLUICE_TABLE", default_value = "sluice_events")]
    pub table: String,
    /// Connection attempts to the database at start-up.
    #[arg(long, env = "SLUICE_DB_CONNECT_ATTEMPTS", default_value_t = 10)]
    pub db_connect_attempts: u32,
    /// Wait between connection attempts (`10s`).
    #[arg(long, env = "SLUICE_DB_CONNECT_BACKOFF", default_value = "10s", value_parser = duration_arg)]
    pub db_connect_backoff: Duration,
    /// Most records of a partition taken from Kafka in one batch (only what is already
    /// fetched: a batch never waits to fill up); twice this many are in flight at most,
    /// across the partitions. Larger batches mean fewer writes and syncs per event.
    #[arg(long, env = "SLUICE_BATCH_SIZE", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// Partitions written concurrently; order within a partition is always kept.
    #[arg(long, env = "SLUICE_CONCURRENT_COUNT", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrent_count: u32,
    /// Tries of a batch write before its events go to the retry topic.
    #[arg(long, env = "SLUICE_WRITE_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub write_attempts: u32,
}

/// Why the collector stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// The settings file is unusable.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// A stream or topic named on the command line is not in the settings.
    #[error("{0}")]
    Selection(String),
    /// A Kafka client could not be created or subscribed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The sink could not be reached at start-up.
    #[error("sink: {0}")]
    Sink(#[from] SinkError),
    /// The metrics endpoint could not listen.
    #[error("metrics endpoint: {0}")]
    Metrics(#[source] std::io::Error),
}

impl Args {
    /// The sink: --sink, or its default (`redis` with a settings file, `file` without).
    pub fn sink_kind(&self) -> SinkKind {
        self.sink.unwrap_or(if self.service.settings.is_some() {
            SinkKind::Redis
        } else {
            SinkKind::File
        })
    }

    /// The pipeline: the settings file, or without one a stream per topic of --groups.
    pub fn pipeline(&self) -> Result<PipelineSettings, CollectorError> {
        if let Some(path) = &self.service.settings {
            return Ok(PipelineSettings::from_file(path)?);
        }
        if self.groups.is_empty() {
            return Err(CollectorError::Selection(
                "no pipeline: give --settings <file>, or --groups group:topic[,group:topic...] to write those topics to files".to_owned(),
            ));
        }
        let mut streams: Vec<StreamSettings> = Vec::new();
        for entry in &self.groups {
            let Some((_, topic)) = entry.split_once(':') else {
                return Err(CollectorError::Selection(format!(
                    "--groups entry {entry:?} is not group:topic"
                )));
            };
            if !streams.iter().any(|s| s.name == topic) {
                streams.push(StreamSettings::new(topic));
            }
        }
        Ok(PipelineSettings::of_streams(streams)?)
    }
}

/// Which streams each consumer group collects.
pub fn plan_groups<'a>(
    args: &Args,
    settings: &'a PipelineSettings,
) -> Result<BTreeMap<String, Vec<&'a StreamSettings>>, CollectorError> {
    let mut plan: BTreeMap<String, Vec<&StreamSettings>> = BTreeMap::new();
    if !args.groups.is_empty() {
        for entry in &args.groups {
            let (group, topic) = entry.split_once(':').ok_or_else(|| {
                CollectorError::Selection(format!("--groups entry {entry:?} is not group:topic"))
            })?;
            let stream = settings
                .streams
                .iter()
                .find(|s| s.topic() == topic || s.name == topic)
                .ok_or_else(|| {
                    CollectorError::Selection(format!(
                        "topic {topic:?} of --groups is not a stream's topic in the settings"
                    ))
                })?;
            let streams = plan.entry(group.to_owned()).or_default();
            if !streams.iter().any(|s| s.name == stream.name) {
                streams.push(stream);
            }
        }
        return Ok(plan);
    }
    let chosen: Vec<&StreamSettings> = if args.streams.is_empty() {
        settings.streams.iter().collect()
    } else {
        args.streams
            .iter()
            .map(|name| {
                settings.stream(name).ok_or_else(|| {
                    CollectorError::Selection(format!(
                        "stream {name:?} is not in the pipeline settings"
                    ))
                })
            })
            .collect::<Result<_, _>>()?
    };
    if chosen.is_empty() {
        return Err(CollectorError::Selection("no stream to collect".to_owned()));
    }
    plan.insert(args.group.clone(), chosen);
    Ok(plan)
}

async fn build_sink(args: &Args, settings: &PipelineSettings) -> Result<AnySink, SinkError> {
    Ok(match args.sink_kind() {
        SinkKind::Redis => AnySink::Redis(
            sink::redis::RedisSink::connect(
                args.redis.client()?,
                args.redis.key_prefix.clone(),
                args.record_ttl,
                settings,
            )
            .await?,
        ),
        SinkKind::RedisIndex => AnySink::RedisIndex(
            sink::redis_index::RedisIndexSink::connect(
                args.redis.client()?,
                args.redis.key_prefix.clone(),
            )
            .await?,
        ),
        SinkKind::File => AnySink::File(sink::file::FileSink::new(
            &args.record_directory,
            sink::file::FilePolicy {
                max_bytes: args.file_max_bytes,
                max_age: args.file_max_age,
                fsync: args.fsync,
                dedupe_ids: args.file_dedupe_ids,
            },
        )?),
        SinkKind::Mysql => AnySink::Mysql(
            sink::mysql::MysqlSink::connect(
                &args.database_url,
                &args.table,
                args.db_connect_attempts,
                args.db_connect_backoff,
            )
            .await?,
        ),
        SinkKind::Postgres => AnySink::Postgres(
            sink::postgres::PostgresSink::connect(
                &args.database_url,
                &args.table,
                args.db_connect_attempts,
                args.db_connect_backoff,
            )
            .await?,
        ),
    })
}

/// `/readyz`: 503 while the sink is unavailable (the collector holds its records and
/// retries), with how long and why.
async fn ready(health: Arc<SinkHealth>) -> (axum::http::StatusCode, String) {
    match health.outage() {
        None => (axum::http::StatusCode::OK, "ok".to_owned()),
        Some(o) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "sink unavailable for {} s, retrying: {}",
                o.lasted.as_secs(),
                o.error
            ),
        ),
    }
}

/// Runs the collector until `shutdown` is cancelled.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), CollectorError> {
    let settings = args.pipeline()?;
    let plan = plan_groups(&args, &settings)?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(SinkHealth::new(args.sink_kind().name(), metrics.clone()));
    if let Some(addr) = args.service.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(CollectorError::Metrics)?;
        let m = metrics.clone();
        let h = health.clone();
        let router = axum::Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(move || ready(h.clone())))
            .route(
                "/metrics",
                get(move || {
                    let m = m.clone();
                    async move {
                        (
                            [(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            m.encode(),
                        )
                    }
                }),
            );
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
    }
    // Without a settings file no operator or script made the retry and dead-letter topics.
    let own: Vec<TopicSpec> = plan
        .values()
        .flatten()
        .flat_map(|s| {
            [s.retry_topic(), s.dead_letter_topic()].map(|name| TopicSpec {
                name,
                partitions: s.partitions,
            })
        })
        .collect();
    if args.service.create_topics || args.service.settings.is_none() {
        ensure_topics(&args.kafka, &own).await?;
    }
    let missing = report_missing_topics(&args.kafka, &plan, &own).await;
    let sink = Arc::new(build_sink(&args, &settings).await?);
    let producer: Arc<rdkafka::producer::FutureProducer> =
        Arc::new(args.kafka.producer_config().create()?);
    let mut workers = tokio::task::JoinSet::new();
    let mut confirmers = Vec::new();
    for (group, streams) in &plan {
        let (confirmer, sending) = confirm::Confirmer::start(
            args.redis
                .client()
                .map_err(|e| CollectorError::Sink(SinkError::from(e)))?,
            args.redis.key_prefix.clone(),
            group.clone(),
            metrics.clone(),
        )
        .map_err(|e| CollectorError::Sink(SinkError::from(e)))?;
        confirmers.push(sending);
        for mode in [Mode::Main, Mode::Retry] {
            let config = WorkerConfig {
                mode,
                group: match mode {
                    Mode::Main => group.clone(),
                    Mode::Retry => sluice_core::settings::retry_group(group),
                },
                streams: streams.iter().map(|s| (*s).clone()).collect(),
                retry: settings.retry.clone(),
                batch_size: args.batch_size as usize,
                concurrency: args.concurrent_count as usize,
                write_attempts: args.write_attempts,
                streams_are_topics: args.service.settings.is_none(),
                awaits_topics: streams.iter().any(|s| {
                    let topic = match mode {
                        Mode::Main => s.topic().to_owned(),
                        Mode::Retry => s.retry_topic(),
                    };
                    missing.contains(&topic)
                }),
            };
            let worker = Worker::new(
                &args.kafka,
                config,
                sink.clone(),
                health.clone(),
                producer.clone(),
                metrics.clone(),
                confirmer.clone(),
            )?;
            workers.spawn(worker.run(shutdown.clone()));
        }
    }
    while workers.join_next().await.is_some() {}
    // The workers are gone with their confirmers: what they confirmed last goes out.
    for sending in confirmers {
        if tokio::time::timeout(Duration::from_secs(10), sending)
            .await
            .is_err()
        {
            tracing::warn!("sink confirmations not all sent before stopping");
        }
    }
    tracing::info!("collector stopped");
    Ok(())
}

/// Says once, at start-up, which of the collector's topics do not exist yet, and returns
/// them: the consumers wait for them (and take them up once they exist) without further
/// errors.
async fn report_missing_topics(
    kafka: &KafkaArgs,
    plan: &BTreeMap<String, Vec<&StreamSettings>>,
    own: &[TopicSpec],
) -> Vec<String> {
    let mut names: Vec<String> = plan
        .values()
        .flatten()
        .map(|s| s.topic().to_owned())
        .chain(own.iter().map(|t| t.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    match sluice_core::kafka::missing_topics(kafka, &names).await {
        Ok(missing) => {
            if !missing.is_empty() {
                tracing::warn!(
                    topics = ?missing,
                    "these topics do not exist yet: the collector consumes them once they exist, and events the sink rejects cannot be retried or dead-lettered until their stream's .retry and .dlq topics exist; the operator and scripts/stack create them, or start the collector with --create-topics"
                );
            }
            missing
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the topics to check that the collector's exist");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["sluice-collector", "--settings", "x.yaml"];
        argv.extend_from_slice(extra);
        Args::parse_from(argv)
    }

    #[test]
    fn dead_letters_and_retries_follow_the_streams_topic() {
        let settings = PipelineSettings::from_yaml(
            "streams:\n  - name: visit\n    topic: prod.shop.visit\n  - name: activity\n",
        )
        .expect("settings");
        let visit = settings.stream("visit").expect("visit");
        assert_eq!(visit.retry_topic(), "prod.shop.visit.retry");
        assert_eq!(visit.dead_letter_topic(), "prod.shop.visit.dlq");
        let activity = settings.stream("activity").expect("activity");
        assert_eq!(activity.dead_letter_topic(), "activity.dlq");
    }

    #[test]
    fn groups_come_from_the_workshop_form_or_from_group_and_streams() {
        let settings = PipelineSettings::from_yaml(
            "streams:\n  - name: visit\n    topic: visits-v1\n  - name: activity\n",
        )
        .expect("settings");
        let plan = plan_groups(&args(&[]), &settings).expect("plan");
        assert_eq!(plan["sluice-collector"].len(), 2);
        let plan = plan_groups(
            &args(&["--groups", "g1:visits-v1,g2:activity,g1:activity"]),
            &settings,
        )
        .expect("plan");
        let names = |g: &str| plan[g].iter().map(|s| s.name.as_str()).collect::<Vec<_>>();
        assert_eq!(names("g1"), ["visit", "activity"]);
        assert_eq!(names("g2"), ["activity"]);
        let err = plan_groups(&args(&["--groups", "g1:nope"]), &settings).expect_err("unknown");
        assert!(err.to_string().contains("\"nope\""));
        let err = plan_groups(&args(&["--groups", "g1"]), &settings).expect_err("malformed");
        assert!(err.to_string().contains("group:topic"));
        let err = plan_groups(&args(&["--streams", "visit,x"]), &settings).expect_err("unknown");
        assert!(err.to_string().contains("\"x\""));
    }

    #[test]
    fn without_settings_the_topics_of_groups_are_the_streams_written_to_files() {
        let workshop = Args::parse_from([
            "sluice-collector",
            "--brokers",
            "kafka:9092",
            "--groups",
            "visits:visits-v1,activities:activities-v1,more:visits-v1",
            "--record-directory",
            "out",
        ]);
        assert_eq!(workshop.kafka.brokers, "kafka:9092");
        assert_eq!(workshop.sink_kind(), SinkKind::File);
        let settings = workshop.pipeline().expect("pipeline");
        let names: Vec<&str> = settings.streams.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["visits-v1", "activities-v1"]);
        let plan = plan_groups(&workshop, &settings).expect("plan");
        assert_eq!(plan.len(), 3);
        assert_eq!(args(&[]).sink_kind(), SinkKind::Redis, "with settings");

        let none = Args::parse_from(["sluice-collector"]);
        let err = none.pipeline().expect_err("nothing to collect");
        assert!(
            err.to_string().contains("--settings") && err.to_string().contains("--groups"),
            "{err}"
        );
        let bad = Args::parse_from(["sluice-collector", "--groups", "g:bad topic"]);
        let err = bad.pipeline().expect_err("not a topic name");
        assert!(err.to_string().contains("bad topic"), "{err}");
    }

    #[test]
    fn durations_in_flags() {
        let a = args(&["--record-ttl", "24h", "--file-max-age", "10m"]);
        assert_eq!(a.record_ttl, Some(Duration::from_secs(86_400)));
        assert_eq!(a.file_max_age, Duration::from_secs(600));
        assert!(
            Args::try_parse_from([
                "sluice-collector",
                "--settings",
                "x",
                "--record-ttl",
                "soon"
            ])
            .is_err()
        );
    }
}
