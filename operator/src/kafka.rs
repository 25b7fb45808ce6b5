//! The operator's own Kafka clients and consumer lag.
//!
//! - [`client_args`]: how the operator reaches a pipeline's Kafka, with the TLS and SASL
//!   material read from the Secrets the resource names (the children mount the same
//!   Secrets instead; see [`crate::plan`]);
//! - [`KafkaClients`]: one admin client and one view of the topics per Kafka cluster and
//!   credentials, shared by every reconcile and by the lag reader;
//! - [`partition_lag`]: the lag of one partition, from its log start, log end and the
//!   group's committed offset, with the edge cases other lag scalers get wrong;
//! - [`LagReader`]: the lag of a collector's consumer group over its topics, read from
//!   the brokers; a failed query is an error, never a lag of zero.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use sluice_core::kafka::KafkaArgs;

use crate::crd::{KafkaSpec, PipelineConfig, StartAt};
use crate::plan::{self, ObservedTopic};

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

/// Identifies a Kafka cluster and the credentials used on it: two pipelines with the same
/// brokers but other credentials get clients of their own.
fn cluster_key(kafka: &KafkaArgs) -> String {
    let mut options: Vec<String> = kafka
        .options
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    options.sort();
    format!(
        "{}\n{}\n{:?}\n{:?}",
        kafka.brokers,
        options.join("\n"),
        kafka.sasl_username,
        kafka.sasl_password
    )
}

/// The topics of a cluster as last read from it, with the operator's own changes since.
#[derive(Debug, Clone, Default)]
pub struct TopicView {
    /// Topics by name.
    pub topics: BTreeMap<String, ObservedTopic>,
    /// Brokers in the cluster.
    pub brokers: i32,
}

/// One Kafka cluster's shared clients.
pub struct Cluster {
    admin: AdminClient<DefaultClientContext>,
    /// The topic view and when it was read from the brokers; one refresh at a time.
    view: tokio::sync::Mutex<Option<(Instant, Arc<TopicView>)>>,
}

impl Cluster {
    /// The cluster's admin client.
    pub fn admin(&self) -> &AdminClient<DefaultClientContext> {
        &self.admin
    }

    /// The topics, read from the brokers when the view is older than `max_age`.
    pub async fn topics(self: &Arc<Self>, max_age: Duration) -> Result<Arc<TopicView>, KafkaError> {
        let mut view = self.view.lock().await;
        if let Some((read, v)) = view.as_ref()
            && read.elapsed() < max_age
        {
            return Ok(v.clone());
        }
        // Metadata requests block; keep them off the async threads.
        let this = self.clone();
        let fresh = tokio::task::spawn_blocking(move || this.read_topics())
            .await
            .map_err(|_| KafkaError::Canceled)??;
        let fresh = Arc::new(fresh);
        *view = Some((Instant::now(), fresh.clone()));
        Ok(fresh)
    }

    fn read_topics(&self) -> Result<TopicView, KafkaError> {
        let metadata = self.admin.inner().fetch_metadata(None, QUERY_TIMEOUT)?;
        let topics = metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| {
                let replication_factor = t
                    .partitions()
                    .first()
                    .map_or(0, |p| p.replicas().len() as i32);
                (
                    t.name().to_owned(),
                    ObservedTopic {
                        partitions: t.partitions().len() as i32,
                        replication_factor,
                    },
                )
            })
            .collect();
        Ok(TopicView {
            topics,
            brokers: metadata.brokers().len() as i32,
        })
    }

    /// Forgets the view: the next [`Cluster::topics`] reads the brokers.
    pub async fn invalidate(&self) {
        *self.view.lock().await = None;
    }

    /// Records a change the operator made (a topic created or grown: `Some`, deleted:
    /// `None`), so that the next reconciles see it without reading the whole cluster again.
    pub async fn changed(&self, name: &str, topic: Option<ObservedTopic>) {
        if let Some((_, view)) = self.view.lock().await.as_mut() {
            let view = Arc::make_mut(view);
            match topic {
                Some(t) => view.topics.insert(name.to_owned(), t),
                None => view.topics.remove(name),
            };
        }
    }
}

/// Clients kept while they are used: one unused for [`IDLE_CLIENT`] is dropped (its
/// connections closed), and at most [`MAX_CLIENTS`] are kept, the least recently used
/// going first.
struct IdleCache<T> {
    entries: Mutex<BTreeMap<String, (T, Instant)>>,
}

/// A cached client unused for this long is dropped.
const IDLE_CLIENT: Duration = Duration::from_secs(600);
/// At most this many clients of one kind are kept.
const MAX_CLIENTS: usize = 1024;

impl<T> Default for IdleCache<T> {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
        }
    }
}

impl<T: Clone> IdleCache<T> {
    /// The client kept for `key`, or a new one from `make`.
    fn get_or_make<E>(&self, key: String, make: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|k, (_, used)| *k == key || now.duration_since(*used) < IDLE_CLIENT);
        if let Some((client, used)) = entries.get_mut(&key) {
            *used = now;
            return Ok(client.clone());
        }
        if entries.len() >= MAX_CLIENTS
            && let Some(oldest) = entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            entries.remove(&oldest);
        }
        let client = make()?;
        entries.insert(key, (client.clone(), now));
        Ok(client)
    }
}

/// The operator's Kafka clients: one [`Cluster`] per cluster and credentials, made on
/// first use and kept while used.
#[derive(Default, Clone)]
pub struct KafkaClients {
    clusters: Arc<IdleCache<Arc<Cluster>>>,
}

impl KafkaClients {
    /// The shared clients of `kafka`'s cluster.
    pub fn cluster(&self, kafka: &KafkaArgs) -> Result<Arc<Cluster>, KafkaError> {
        self.clusters.get_or_make(cluster_key(kafka), || {
            Ok(Arc::new(Cluster {
                admin: kafka.admin()?,
                view: tokio::sync::Mutex::new(None),
            }))
        })
    }
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

/// Reads consumer lag from the brokers. Topics and watermarks come from the cluster's
/// shared [`Cluster`]; a group's committed offsets need a client of that group, kept while
/// it is used (a collector's autoscaler asks every few seconds), like the clusters' own.
#[derive(Default, Clone)]
pub struct LagReader {
    kafka: KafkaClients,
    groups: Arc<IdleCache<Arc<BaseConsumer>>>,
}

const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How old the topic view may be for reading lag; a topic missing from it is looked for
/// again in a view at most [`VIEW_RECHECK`] old.
const VIEW_MAX_AGE: Duration = Duration::from_secs(60);
const VIEW_RECHECK: Duration = Duration::from_secs(2);

impl LagReader {
    /// A reader sharing `kafka`'s clients.
    pub fn new(kafka: KafkaClients) -> Self {
        Self {
            kafka,
            groups: Arc::default(),
        }
    }

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
        let cluster = self.kafka.cluster(&kafka)?;
        let mut view = cluster.topics(VIEW_MAX_AGE).await?;
        if topics
            .iter()
            .chain(&retry_topics)
            .any(|t| !view.topics.contains_key(t))
        {
            view = cluster.topics(VIEW_RECHECK).await?;
        }
        let partitions = |topics: &[String]| -> Result<TopicPartitionList, LagError> {
            let mut list = TopicPartitionList::new();
            for topic in topics {
                let t = view
                    .topics
                    .get(topic)
                    .filter(|t| t.partitions > 0)
                    .ok_or_else(|| LagError::NoTopic(topic.clone()))?;
                for p in 0..t.partitions {
                    list.add_partition(topic, p);
                }
            }
            Ok(list)
        };
        let main = partitions(&topics)?;
        let retry = partitions(&retry_topics)?;
        let group = plan::names::collector_group(pc, collector);
        let start_at = spec.start_at;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let main_lag = this.group_lag(&cluster, &kafka, &group, main, start_at)?;
            let retry_lag = this.group_lag(
                &cluster,
                &kafka,
                &sluice_core::settings::retry_group(&group),
                retry,
                StartAt::Earliest,
            )?;
            Ok(GroupLag {
                total: main_lag.total + retry_lag.total,
                partitions: main_lag.partitions,
            })
        })
        .await
        .map_err(|_| LagError::Kafka(KafkaError::Canceled))?
    }

    /// The lag of `group` over `list`'s partitions (blocking: run it off the async
    /// threads). With `Latest`, partitions where the group has no committed offset get
    /// their end committed (see [`LagReader::collector_lag`]).
    fn group_lag(
        &self,
        cluster: &Cluster,
        kafka: &KafkaArgs,
        group: &str,
        list: TopicPartitionList,
        start_at: StartAt,
    ) -> Result<GroupLag, LagError> {
        let consumer = self.client(kafka, group)?;
        let partitions = list.count();
        let committed = consumer.committed_offsets(list, QUERY_TIMEOUT)?;
        let mut total = 0;
        let mut start_here = TopicPartitionList::new();
        for element in committed.elements() {
            if let Some(e) = element.error().err() {
                return Err(LagError::Kafka(e));
            }
            let (log_start, log_end) = cluster.admin.inner().fetch_watermarks(
                element.topic(),
                element.partition(),
                QUERY_TIMEOUT,
            )?;
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
        Ok(GroupLag { total, partitions })
    }

    fn client(&self, kafka: &KafkaArgs, group: &str) -> Result<Arc<BaseConsumer>, KafkaError> {
        let key = format!("{}\n{group}", cluster_key(kafka));
        self.groups.get_or_make(key, || {
            let mut config = kafka.consumer_config(group);
            // Only reads offsets (and fixes a starting point): never joins the group.
            config.set("enable.auto.commit", "false");
            Ok(Arc::new(config.create()?))
        })
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
