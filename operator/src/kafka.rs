//! The operator's own Kafka clients and consumer lag.
//!
//! - [`client_args`]: how the operator reaches a pipeline's Kafka, with the TLS and SASL
//!   material read from the Secrets the resource names (the children mount the same
//!   Secrets instead; see [`crate::plan`]);
//! - [`partition_lag`]: the lag of one partition, from its log start, log end and the
//!   group's committed offset, with the edge cases other lag scalers get wrong;
//! - [`LagReader`]: the lag of a collector's consumer group over its topics, read from
//!   the brokers; a failed query is an error, never a lag of zero.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use sluice_core::kafka::KafkaArgs;

use crate::crd::{KafkaSpec, PipelineConfig, StartAt};
use crate::plan;

/// A Secret the resource names is missing or incomplete.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The Secret could not be read.
    #[error("cannot read Secret {name}: {source}")]
    Read {
        /// Secret name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// A key is missing or not text.
    #[error("Secret {name} has no text key {key:?}")]
    Key {
        /// Secret name.
        name: String,
        /// The key.
        key: &'static str,
    },
}

/// The operator's client settings for `spec`, with the TLS certificates and SASL
/// credentials read from their Secrets in `namespace`.
pub async fn client_args(
    client: &Client,
    namespace: &str,
    spec: &KafkaSpec,
) -> Result<KafkaArgs, SecretError> {
    let mut args = KafkaArgs::new(&spec.bootstrap_servers);
    for (k, v) in plan::kafka_security(spec) {
        args = args.with(k, v);
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(tls) = &spec.tls {
        let data = read_secret(&secrets, &tls.secret_name).await?;
        args = args.with("ssl.ca.pem", key(&data, &tls.secret_name, "ca.crt")?);
        if tls.client_auth {
            args = args
                .with(
                    "ssl.certificate.pem",
                    key(&data, &tls.secret_name, "tls.crt")?,
                )
                .with("ssl.key.pem", key(&data, &tls.secret_name, "tls.key")?);
        }
    }
    if let Some(sasl) = &spec.sasl {
        let data = read_secret(&secrets, &sasl.secret_name).await?;
        args.sasl_username = Some(key(&data, &sasl.secret_name, "username")?);
        args.sasl_password = Some(key(&data, &sasl.secret_name, "password")?);
    }
    Ok(args)
}

async fn read_secret(
    api: &Api<Secret>,
    name: &str,
) -> Result<BTreeMap<String, Vec<u8>>, SecretError> {
    let secret = api.get(name).await.map_err(|source| SecretError::Read {
        name: name.to_owned(),
        source,
    })?;
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    for (k, v) in secret.string_data.unwrap_or_default() {
        data.insert(k, v.into_bytes());
    }
    Ok(data)
}

fn key(
    data: &BTreeMap<String, Vec<u8>>,
    name: &str,
    key: &'static str,
) -> Result<String, SecretError> {
    data.get(key)
        .and_then(|v| String::from_utf8(v.clone()).ok())
        .ok_or_else(|| SecretError::Key {
            name: name.to_owned(),
            key,
        })
}

/// What the brokers say about one partition for one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffsets {
    /// The first offset still in the log (records before it were deleted by retention).
    pub log_start: i64,
    /// The offset the next record will get.
    pub log_end: i64,
    /// The group's committed offset, if it has one.
    pub committed: Option<i64>,
}

/// Records of the partition the group has still to read; never negative.
///
/// - no committed offset: the group will start where `start_at` says, so the whole
///   retained log counts for `Earliest` and nothing for `Latest`;
/// - a committed offset before the log start (retention deleted what the group had not
///   read): the group resumes at the log start, so only what is retained counts;
/// - a committed offset past the log end (the topic was recreated, or a stale read): zero.
pub fn partition_lag(p: PartitionOffsets, start_at: StartAt) -> i64 {
    let end = p.log_end.max(p.log_start);
    let position = match p.committed {
        None => match start_at {
            StartAt::Earliest => p.log_start,
            StartAt::Latest => end,
        },
        Some(c) => c.max(p.log_start),
    };
    (end - position).max(0)
}

/// The lag of one consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLag {
    /// The sum over partitions.
    pub total: i64,
    /// Partitions of the group's topics.
    pub partitions: usize,
}

/// Reads consumer lag from the brokers, keeping one client per cluster and group.
#[derive(Default, Clone)]
pub struct LagReader {
    clients: Arc<Mutex<BTreeMap<String, Arc<BaseConsumer>>>>,
}

/// At most this many clients are kept; beyond it the cache starts over.
const MAX_CLIENTS: usize = 64;
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

impl LagReader {
    /// The lag of `collector` in `pc`, with `kafka` built by [`client_args`]: what its
    /// group has still to read on the streams' topics, plus what its retry group has still
    /// to read on their retry topics (retries pending keep a collector from scaling to
    /// zero).
    ///
    /// A collector that starts at `Latest` gets its starting point fixed here: the first
    /// time its group has no committed offset on a partition, the partition's end is
    /// committed for it. Events published from then on count as lag, wake a collector
    /// scaled to zero, and are read when it starts, rather than skipped by a consumer that
    /// would start at the end it finds then.
    pub async fn collector_lag(
        &self,
        pc: &PipelineConfig,
        collector: &str,
        kafka: KafkaArgs,
    ) -> Result<GroupLag, LagError> {
        let spec = pc
            .spec
            .collectors
            .iter()
            .find(|c| c.name == collector)
            .ok_or_else(|| LagError::NoCollector(collector.to_owned()))?;
        let settings = plan::settings(pc);
        let streams: Vec<_> = spec
            .streams
            .iter()
            .filter_map(|s| settings.stream(s))
            .collect();
        let topics: Vec<String> = streams.iter().map(|s| s.topic().to_owned()).collect();
        let retry_topics: Vec<String> = streams.iter().map(|s| s.retry_topic()).collect();
        let group = plan::names::collector_group(pc, collector);
        let start_at = spec.start_at;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let main = this.group_lag(&kafka, &group, &topics, start_at)?;
            let retry = this.group_lag(
                &kafka,
                &format!("{group}.retry"),
                &retry_topics,
                StartAt::Earliest,
            )?;
            Ok(GroupLag {
                total: main.total + retry.total,
                partitions: main.partitions,
            })
        })
        .await
        .map_err(|_| LagError::Kafka(KafkaError::Canceled))?
    }

    /// The lag of `group` over `topics` (blocking: run it off the async threads). With
    /// `Latest`, partitions where the group has no committed offset get their end
    /// committed (see [`LagReader::collector_lag`]).
    pub fn group_lag(
        &self,
        kafka: &KafkaArgs,
        group: &str,
        topics: &[String],
        start_at: StartAt,
    ) -> Result<GroupLag, LagError> {
        let consumer = self.client(kafka, group)?;
        let mut list = TopicPartitionList::new();
        for topic in topics {
            let metadata = consumer.fetch_metadata(Some(topic), QUERY_TIMEOUT)?;
            let t = metadata
                .topics()
                .first()
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .ok_or_else(|| LagError::NoTopic(topic.clone()))?;
            for p in t.partitions() {
                list.add_partition(topic, p.id());
            }
        }
        let committed = consumer.committed_offsets(list.clone(), QUERY_TIMEOUT)?;
        let mut total = 0;
        let mut start_here = TopicPartitionList::new();
        for element in committed.elements() {
            if let Some(e) = element.error().err() {
                return Err(LagError::Kafka(e));
            }
            let (log_start, log_end) =
                consumer.fetch_watermarks(element.topic(), element.partition(), QUERY_TIMEOUT)?;
            let committed = match element.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            if committed.is_none() && start_at == StartAt::Latest {
                start_here
                    .add_partition_offset(
                        element.topic(),
                        element.partition(),
                        Offset::Offset(log_end),
                    )
                    .map_err(LagError::Kafka)?;
            }
            total += partition_lag(
                PartitionOffsets {
                    log_start,
                    log_end,
                    committed,
                },
                start_at,
            );
        }
        if start_here.count() > 0 {
            // Refused while the group has members (they then hold their own position).
            match consumer.commit(&start_here, CommitMode::Sync) {
                Ok(()) => {
                    tracing::info!(%group, partitions = start_here.count(), "fixed where a collector starting at Latest begins")
                }
                Err(e) => tracing::debug!(%group, error = %e, "starting point not committed"),
            }
        }
        Ok(GroupLag {
            total,
            partitions: list.count(),
        })
    }

    fn client(&self, kafka: &KafkaArgs, group: &str) -> Result<Arc<BaseConsumer>, KafkaError> {
        let mut config = kafka.consumer_config(group);
        // Only reads offsets: never joins the group, never commits.
        config.set("enable.auto.commit", "false");
        // `config_map` hides secret values; the key must change when a password does.
        let mut key: Vec<String> = config
            .config_map()
            .keys()
            .map(|k| format!("{k}={}", config.get(k).unwrap_or_default()))
            .collect();
        key.sort();
        let key = key.join("\n");
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        let consumer: Arc<BaseConsumer> = Arc::new(config.create()?);
        clients.insert(key, consumer.clone());
        Ok(consumer)
    }
}

/// Why lag could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LagError {
    /// The resource has no such collector.
    #[error("the pipeline has no collector {0:?}")]
    NoCollector(String),
    /// A topic of the collector does not exist.
    #[error("topic {0} does not exist")]
    NoTopic(String),
    /// The brokers did not answer.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A Secret for the connection is missing.
    #[error("{0}")]
    Secret(#[from] SecretError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(log_start: i64, log_end: i64, committed: Option<i64>, start_at: StartAt) -> i64 {
        partition_lag(
            PartitionOffsets {
                log_start,
                log_end,
                committed,
            },
            start_at,
        )
    }

    #[test]
    fn committed_groups_lag_by_what_is_left_to_read() {
        assert_eq!(lag(0, 100, Some(40), StartAt::Earliest), 60);
        assert_eq!(lag(0, 100, Some(100), StartAt::Latest), 0);
    }

    #[test]
    fn no_commit_counts_by_where_the_group_will_start() {
        assert_eq!(
            lag(10, 100, None, StartAt::Earliest),
            90,
            "the retained log"
        );
        assert_eq!(lag(10, 100, None, StartAt::Latest), 0, "nothing yet");
    }

    #[test]
    fn an_empty_topic_has_no_lag() {
        assert_eq!(lag(0, 0, None, StartAt::Earliest), 0);
        assert_eq!(lag(0, 0, Some(0), StartAt::Earliest), 0);
        // Everything was deleted by retention: start = end.
        assert_eq!(lag(500, 500, Some(20), StartAt::Earliest), 0);
    }

    #[test]
    fn data_deleted_by_retention_counts_from_the_log_start() {
        assert_eq!(lag(80, 100, Some(30), StartAt::Earliest), 20);
        assert_eq!(lag(80, 100, Some(30), StartAt::Latest), 20);
    }

    #[test]
    fn lag_is_never_negative() {
        assert_eq!(
            lag(0, 100, Some(150), StartAt::Earliest),
            0,
            "commit past the end"
        );
        assert_eq!(
            lag(50, 40, None, StartAt::Earliest),
            0,
            "inconsistent watermarks"
        );
    }
}
