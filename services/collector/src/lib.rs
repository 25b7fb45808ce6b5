//! `sluice-collector`: consumes the topics of its streams in a consumer group and writes
//! the events to a sink, at least once.
//!
//! The loop:
//! 1. wait for a record, then take whatever else is already fetched, up to `--batch-size`;
//! 2. decode each record into an [`Envelope`]; a record that is not an envelope goes to the
//!    stream's dead-letter topic `<stream>.dlq`, with the reason in the `sluice-error` header;
//! 3. write the decoded events to the sink, retrying with backoff until it confirms;
//! 4. only then store the records' offsets, which the consumer commits every second.
//!
//! A record's offset is therefore stored only once it is in the sink or acknowledged on the
//! dead-letter topic. Rebalances happen inside `recv`, between batches, so a batch in flight
//! always finishes before its partitions are given up; on shutdown the current batch
//! finishes and the stored offsets are committed before the consumer leaves the group. A
//! crash replays from the last commit, and the sink's idempotent writes absorb the replay.

pub mod sink;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_core::kafka::{KafkaArgs, TopicSpec, ensure_topics};
use sluice_core::settings::SettingsError;
use sluice_core::{Envelope, PipelineSettings, store};
use tokio_util::sync::CancellationToken;

use sink::Sink;

/// Command line and environment of `sluice-collector`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-collector",
    version,
    about = "Sluice collector: Kafka in, sinks out"
)]
pub struct Args {
    /// Pipeline settings file (streams and their topics).
    #[arg(long, env = "SLUICE_SETTINGS")]
    pub settings: PathBuf,
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
    /// Redis the records are written to.
    #[arg(
        long,
        env = "SLUICE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Prefix of the Redis keys of records.
    #[arg(long, env = "SLUICE_KEY_PREFIX", default_value = store::DEFAULT_PREFIX)]
    pub key_prefix: String,
    /// Most records written to the sink in one batch.
    #[arg(long, env = "SLUICE_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// Create the dead-letter topics at start-up when they do not exist.
    #[arg(long, env = "SLUICE_CREATE_TOPICS")]
    pub create_topics: bool,
    /// Log filter, for example `info` or `info,sluice_collector=debug`.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    pub log_level: String,
}

/// Why the collector stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// The settings file is unusable.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// A stream named on the command line is not in the settings.
    #[error("stream {0:?} is not in the pipeline settings")]
    UnknownStream(String),
    /// A Kafka client could not be created or subscribed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The sink could not be reached at start-up.
    #[error("sink: {0}")]
    Sink(#[from] sink::SinkError),
}

/// The dead-letter topic of `stream`.
pub fn dead_letter_topic(stream: &str) -> String {
    format!("{stream}.dlq")
}

/// Runs a collector writing to Redis until `shutdown` is cancelled.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), CollectorError> {
    let settings = PipelineSettings::from_file(&args.settings)?;
    let sink = sink::redis::RedisSink::connect(&args.redis_url, args.key_prefix.clone()).await?;
    Collector::new(&args, &settings)
        .await?
        .run(sink, shutdown)
        .await
}

/// A consumer bound to its streams, and the producer for dead letters.
pub struct Collector {
    consumer: StreamConsumer,
    dead_letters: FutureProducer,
    /// topic → stream name
    streams: HashMap<String, String>,
    batch_size: usize,
}

impl Collector {
    /// Creates the consumer and subscribes it to the topics of the chosen streams.
    pub async fn new(args: &Args, settings: &PipelineSettings) -> Result<Self, CollectorError> {
        let chosen: Vec<_> = if args.streams.is_empty() {
            settings.streams.iter().collect()
        } else {
            args.streams
                .iter()
                .map(|name| {
                    settings
                        .stream(name)
                        .ok_or_else(|| CollectorError::UnknownStream(name.clone()))
                })
                .collect::<Result<_, _>>()?
        };
        if args.create_topics {
            let dlq: Vec<TopicSpec> = chosen
                .iter()
                .map(|s| TopicSpec {
                    name: dead_letter_topic(&s.name),
                    partitions: 1,
                })
                .collect();
            ensure_topics(&args.kafka, &dlq).await?;
        }
        let streams: HashMap<String, String> = chosen
            .iter()
            .map(|s| (s.topic().to_owned(), s.name.clone()))
            .collect();
        let consumer: StreamConsumer = args.kafka.consumer_config(&args.group).create()?;
        let topics: Vec<&str> = streams.keys().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        tracing::info!(group = %args.group, ?topics, "collector subscribed");
        Ok(Self {
            consumer,
            dead_letters: args.kafka.producer_config().create()?,
            streams,
            batch_size: args.batch_size as usize,
        })
    }

    /// Consumes and writes until `shutdown` is cancelled; then commits and leaves the group.
    pub async fn run<S: Sink>(
        self,
        sink: S,
        shutdown: CancellationToken,
    ) -> Result<(), CollectorError> {
        loop {
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                m = self.consumer.recv() => m,
            };
            let first = match first {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < self.batch_size {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "kafka consumer error");
                        break;
                    }
                    None => break,
                }
            }
            if !self.process(&sink, &batch, &shutdown).await {
                // Shut down before the batch was confirmed: its offsets stay unstored and
                // the records are delivered again to whoever takes the partitions.
                break;
            }
        }
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "final commit failed; uncommitted records will be delivered again")
            }
        }
        tracing::info!("collector stopped");
        Ok(())
    }

    /// Writes one batch and stores its offsets. Returns false when shutdown interrupted it.
    async fn process<S: Sink>(
        &self,
        sink: &S,
        batch: &[BorrowedMessage<'_>],
        shutdown: &CancellationToken,
    ) -> bool {
        let mut events = Vec::with_capacity(batch.len());
        for m in batch {
            match Envelope::decode(m.payload(), m.headers()) {
                Ok(e) => events.push(e),
                Err(reason) => {
                    if !self.dead_letter(m, &reason.to_string(), shutdown).await {
                        return false;
                    }
                }
            }
        }
        // One span per event, continuing the trace ingest started; they end with the write.
        let spans: Vec<tracing::Span> = events
            .iter()
            .map(|e| {
                let span = tracing::info_span!("sink.write", otel.kind = "consumer", sink = sink.name(), stream = %e.stream, event.id = %e.id);
                sluice_core::telemetry::continue_trace(&span, &e.headers);
                span
            })
            .collect();
        let mut backoff = Backoff::new();
        loop {
            match sink.write(&events).await {
                Ok(()) => break,
                Err(e) => {
                    let wait = backoff.next();
                    tracing::warn!(sink = sink.name(), error = %e, retry_in = ?wait, events = events.len(), "sink write failed");
                    tokio::select! {
                        () = shutdown.cancelled() => return false,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        drop(spans);
        for m in batch {
            if let Err(e) = self.consumer.store_offset_from_message(m) {
                // The partition was taken away meanwhile; its new owner replays the record.
                tracing::debug!(error = %e, topic = m.topic(), partition = m.partition(), "offset not stored");
            }
        }
        tracing::debug!(
            events = events.len(),
            records = batch.len(),
            "batch written"
        );
        true
    }

    /// Sends a record that is not an event to its stream's dead-letter topic and waits for
    /// Kafka to acknowledge it. Returns false when shutdown interrupted it.
    async fn dead_letter(
        &self,
        m: &BorrowedMessage<'_>,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        let stream = self
            .streams
            .get(m.topic())
            .map_or(m.topic(), String::as_str);
        let topic = dead_letter_topic(stream);
        tracing::warn!(%topic, source = m.topic(), partition = m.partition(), offset = m.offset(), %reason, "record is not an event; dead-lettering it");
        let mut backoff = Backoff::new();
        loop {
            let mut headers = OwnedHeaders::new();
            if let Some(h) = m.headers() {
                for header in h.iter() {
                    headers = headers.insert(header);
                }
            }
            let partition = m.partition().to_string();
            let offset = m.offset().to_string();
            headers = headers
                .insert(Header {
                    key: "sluice-error",
                    value: Some(reason),
                })
                .insert(Header {
                    key: "sluice-source-topic",
                    value: Some(m.topic()),
                })
                .insert(Header {
                    key: "sluice-source-partition",
                    value: Some(&partition),
                })
                .insert(Header {
                    key: "sluice-source-offset",
                    value: Some(&offset),
                });
            let mut record = FutureRecord::<[u8], [u8]>::to(&topic).headers(headers);
            if let Some(p) = m.payload() {
                record = record.payload(p);
            }
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            match self.dead_letters.send(record, Duration::from_secs(5)).await {
                Ok(_) => return true,
                Err((e, _)) => {
                    let wait = backoff.next();
                    tracing::error!(%topic, error = %e, retry_in = ?wait, "cannot write to the dead-letter topic");
                    tokio::select! {
                        () = shutdown.cancelled() => return false,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

/// Exponential backoff from 100 ms up to 5 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }

    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_ceiling() {
        let mut b = Backoff::new();
        let waits: Vec<u128> = (0..8).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn dead_letters_go_to_the_stream_dlq() {
        assert_eq!(dead_letter_topic("visit"), "visit.dlq");
    }
}
