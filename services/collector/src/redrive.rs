//! `sluice-collector redrive`: sends what a stream's dead-letter topic holds back to the
//! stream's topic, where the collectors take it again as new, once whatever made the
//! sink reject it is fixed.
//!
//! The dead-letter topic is read in its own consumer group (`--group`), from where the
//! last redrive stopped, up to its end as it was when the command started; each record is
//! produced to the stream's topic with its key, payload and headers (less the retry
//! bookkeeping: `sluice-attempt`, `sluice-error` and the `sluice-source-*` headers, plus
//! `sluice-redriven-from`), and its offset is committed only once Kafka acknowledged the
//! copy. A redrive cut short sends the rest next time; one that completed sends nothing
//! twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::PipelineSettings;
use sluice_core::kafka::KafkaArgs;

use crate::CollectorError;
use crate::consume::{ATTEMPT_HEADER, ERROR_HEADER};

/// Header naming the dead-letter topic a redriven record came from.
pub const REDRIVEN_HEADER: &str = "sluice-redriven-from";

/// Command line of `sluice-collector redrive`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-collector redrive",
    version,
    about = "Sends the events of a stream's dead-letter topic back to the stream's topic"
)]
pub struct RedriveArgs {
    /// Pipeline settings file (streams and their topics).
    #[arg(long, env = "SLUICE_SETTINGS")]
    pub settings: PathBuf,
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The stream whose dead-letter topic is sent back.
    #[arg(long)]
    pub stream: String,
    /// Consumer group that remembers how far redrives got.
    #[arg(long, default_value = "sluice-redrive")]
    pub group: String,
    /// Send at most this many records.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Log filter.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    pub log_level: String,
}

/// What a redrive did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redriven {
    /// The dead-letter topic read.
    pub from: String,
    /// The stream's topic written.
    pub to: String,
    /// Records sent back.
    pub records: u64,
}

/// How long to wait for the next record before the end is taken as reached.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends the dead-letter topic of `args.stream` back to the stream's topic.
pub async fn redrive(args: &RedriveArgs) -> Result<Redriven, CollectorError> {
    let settings = PipelineSettings::from_file(&args.settings)?;
    let stream = settings.stream(&args.stream).ok_or_else(|| {
        CollectorError::Selection(format!(
            "stream {:?} is not in the pipeline settings",
            args.stream
        ))
    })?;
    let from = stream.dead_letter_topic();
    let to = stream.topic().to_owned();
    let consumer: StreamConsumer = args.kafka.consumer_config(&args.group).create()?;
    let producer: FutureProducer = args.kafka.producer_config().create()?;

    // Where to start (the group's committed offset, else the beginning) and where to stop
    // (the end now), per partition.
    let metadata = consumer.fetch_metadata(Some(&from), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition(&from, *p);
    }
    let committed = consumer.committed_offsets(wanted, Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for element in committed.elements() {
        let p = element.partition();
        let (low, high) = consumer.fetch_watermarks(&from, p, Duration::from_secs(10))?;
        let start = match element.offset() {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        if start < high {
            assignment.add_partition_offset(&from, p, Offset::Offset(start))?;
            ends.insert(p, high);
        }
    }
    let mut sent = 0u64;
    let limit = args.limit.unwrap_or(u64::MAX);
    if !ends.is_empty() && limit > 0 {
        consumer.assign(&assignment)?;
    }
    while !ends.is_empty() && sent < limit {
        let m = match tokio::time::timeout(READ_TIMEOUT, consumer.recv()).await {
            Ok(m) => m?,
            Err(_) => {
                tracing::warn!(topic = %from, "no record within {READ_TIMEOUT:?}; stopping before the end");
                break;
            }
        };
        let p = m.partition();
        let Some(end) = ends.get(&p).copied() else {
            continue;
        };
        if m.offset() >= end {
            ends.remove(&p);
            continue;
        }
        let mut headers = OwnedHeaders::new();
        if let Some(h) = m.headers() {
            for header in h.iter().filter(|h| {
                h.key != ATTEMPT_HEADER
                    && h.key != ERROR_HEADER
                    && !h.key.starts_with("sluice-source-")
                    && h.key != REDRIVEN_HEADER
            }) {
                headers = headers.insert(header);
            }
        }
        headers = headers.insert(Header {
            key: REDRIVEN_HEADER,
            value: Some(from.as_str()),
        });
        let mut record = FutureRecord::<[u8], [u8]>::to(&to).headers(headers);
        if let Some(payload) = m.payload() {
            record = record.payload(payload);
        }
        if let Some(key) = m.key() {
            record = record.key(key);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        consumer.store_offset(&from, p, m.offset())?;
        sent += 1;
        if m.offset() + 1 >= end {
            ends.remove(&p);
        }
    }
    if sent > 0 {
        consumer.commit_consumer_state(CommitMode::Sync)?;
    }
    tracing::info!(%from, %to, records = sent, "redrive done");
    Ok(Redriven {
        from,
        to,
        records: sent,
    })
}
