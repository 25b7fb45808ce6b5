//! The I/O half of reconciling: observe Kafka and the cluster, apply the [`plan`], report.
//!
//! For each `PipelineConfig`:
//! 1. the finalizer `sluice.dev/topics` is added, so deletion can apply the topic policy;
//! 2. topics are looked up in the cluster's shared topic view ([`KafkaClients`]), then
//!    created or grown as the plan says; a change Kafka cannot make becomes a
//!    `NotSupported` condition, not an error;
//! 3. every child is written with server-side apply under one field manager; a child the
//!    apiserver refuses (quota, Pod Security, a webhook) does not stop the others: it
//!    becomes the `ChildrenApplied` condition and a Warning Event; children the spec no
//!    longer names are deleted. Children unchanged since their last complete apply are
//!    not written again (but at least every ten minutes, `REAPPLY_AFTER`);
//! 4. the Deployments' and StatefulSets' ready replicas, as the controller's watches see
//!    them, give `RedisReady`, `IngestReady`, `CollectorsReady` ([`crate::status`]);
//! 5. the status is written when it changed, and the resource is looked at again soon
//!    while it is not ready, and every minute when it is (to refresh the lag in its
//!    status).
//!
//! Errors (the apiserver refusing a write) are retried with backoff by the controller.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use serde_json::json;
use sluice_core::kafka::KafkaArgs;
use tokio_util::sync::CancellationToken;

use crate::crd::{CollectorStatus, PipelineConfig, TopicDeletionPolicy, TopicStatus};
use crate::kafka::{self, KafkaClients, LagReader, SecretError};
use crate::leader::Progress;
use crate::metrics::Metrics;
use crate::plan::{self, Images, ObservedTopic, TopicAction};
use crate::status::{self, CollectorObserved, Observed, TopicsObserved};

/// The field manager of every write.
pub const MANAGER: &str = "sluice-operator";
/// The finalizer that applies the topic deletion policy.
pub const FINALIZER: &str = "sluice.dev/topics";

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver refused a read or a write.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer could not be added or removed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Deleting topics failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A Secret for the Kafka connection is missing or incomplete.
    #[error("{0}")]
    Secret(#[from] SecretError),
}

impl Error {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Finalizer(_) => "finalizer",
            Self::Kafka(_) => "kafka",
            Self::Secret(_) => "secret",
        }
    }
}

/// What reconciles share.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Images of the children.
    pub images: Images,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// The Kafka clients, one set per cluster, shared with `lag`.
    pub kafka: KafkaClients,
    /// Reads consumer lag for the status and for scaling to zero.
    pub lag: LagReader,
    /// Publishes Events on the resources.
    recorder: Recorder,
    /// Failed reconciles in a row per resource, for the retry backoff.
    failures: std::sync::Mutex<BTreeMap<String, u32>>,
    /// The reconciles running now (a leader whose reconcile hangs gives up).
    pub progress: Progress,
    /// The children as the controller's watches see them (while it runs).
    cached: RwLock<Option<Cached>>,
    /// The last complete apply of each pipeline's children, by the pipeline's uid.
    applied: std::sync::Mutex<BTreeMap<String, LastApply>>,
}

/// What a pipeline's children were when they were last all applied, and when.
struct LastApply {
    digest: u64,
    at: Instant,
}

/// Children unchanged since their last apply are applied again after this long anyway,
/// which repairs what someone changed by hand in a child the operator does not watch.
const REAPPLY_AFTER: Duration = Duration::from_secs(600);

impl Context {
    /// A context for `client`; Events name this process (`POD_NAME`, else the host name).
    pub fn new(client: Client, images: Images) -> Self {
        // events.k8s.io/v1 needs a reporting instance.
        let instance = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| format!("{MANAGER}-{}", std::process::id()));
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.to_owned(),
                instance: Some(instance),
            },
        );
        let kafka = KafkaClients::default();
        Self {
            client,
            images,
            metrics: Arc::new(Metrics::new()),
            lag: LagReader::new(kafka.clone()),
            kafka,
            recorder,
            failures: std::sync::Mutex::default(),
            progress: Progress::default(),
            cached: RwLock::new(None),
            applied: std::sync::Mutex::default(),
        }
    }

    /// The same context recording into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Publishes an Event on `pc`; a failure to publish is only logged.
    async fn event(&self, pc: &PipelineConfig, warning: bool, reason: &str, note: String) {
        let event = KubeEvent {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &pc.object_ref(&())).await {
            tracing::warn!(error = %e, "cannot publish an event");
        }
    }
}

/// How many pipelines are reconciled at once.
pub const DEFAULT_CONCURRENCY: u16 = 8;
/// Changes to one pipeline within this time become one reconcile (a rollout changes a
/// Deployment's status many times in a second).
const DEBOUNCE: Duration = Duration::from_millis(500);

/// The operator's own children, as the watches last saw them.
#[derive(Clone)]
struct Cached {
    deployments: Store<Deployment>,
    stateful_sets: Store<StatefulSet>,
}

/// Runs the controller for the resources `api` sees until `shutdown` is cancelled, at most
/// `concurrency` reconciles at a time.
///
/// Besides its PipelineConfigs, the controller watches the Deployments and StatefulSets it
/// made (a change of their status reconciles their pipeline; the watch's cache gives their
/// readiness without asking the apiserver) and the metadata of the Secrets (a changed
/// Secret reconciles the pipelines that reference it, which roll their pods if they read
/// it at start). Only metadata: the operator reads a Secret's data when it needs it.
pub async fn run(
    api: Api<PipelineConfig>,
    ctx: Arc<Context>,
    concurrency: u16,
    shutdown: CancellationToken,
) {
    let client = ctx.client.clone();
    fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let namespace = api.namespace().map(str::to_owned);
    let namespace = namespace.as_deref();
    // Only the operator's own children: a cluster may have many Deployments.
    let children = watcher::Config::default().labels(MANAGED_BY);
    let (deployments, deployments_writer) = reflector::store();
    let (stateful_sets, stateful_sets_writer) = reflector::store();
    let deployment_events =
        watcher::watcher(scoped::<Deployment>(&client, namespace), children.clone())
            .default_backoff()
            .reflect(deployments_writer)
            .touched_objects();
    let stateful_set_events = watcher::watcher(scoped::<StatefulSet>(&client, namespace), children)
        .default_backoff()
        .reflect(stateful_sets_writer)
        .touched_objects();
    // `PartialObjectMeta`: the watch asks for metadata only.
    let secret_events = watcher::watcher(
        scoped::<PartialObjectMeta<Secret>>(&client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    *ctx.cached.write().unwrap_or_else(PoisonError::into_inner) = Some(Cached {
        deployments,
        stateful_sets,
    });
    let controller = Controller::new(api, watcher::Config::default()).with_config(
        controller::Config::default()
            .concurrency(concurrency)
            .debounce(DEBOUNCE),
    );
    let pipelines = controller.store();
    controller
        .owns_stream(deployment_events)
        .owns_stream(stateful_set_events)
        .watches_stream(secret_events, move |secret| {
            let ns = secret.namespace();
            let name = secret.name_any();
            pipelines
                .state()
                .into_iter()
                .filter(|pc| pc.namespace() == ns && references_secret(pc, &name))
                .map(|pc| ObjectRef::from_obj(&*pc))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(name = %object.name, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

/// The label selector of the operator's children.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by=sluice-operator";

/// Whether `pc` reads the Secret `name` of its namespace: Kafka's TLS and SASL, the
/// sinks' credentials, the Redis password (named or generated), ingest's API keys.
fn references_secret(pc: &PipelineConfig, name: &str) -> bool {
    // The pods' Secrets include the Redis password's, the managed Redis' among them.
    plan::referenced_secrets(pc).0.iter().any(|s| s == name)
        || pc
            .spec
            .ingest
            .api_keys
            .as_ref()
            .is_some_and(|k| k.secret_name == name)
}

fn error_policy(pc: Arc<PipelineConfig>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx
        .failures
        .lock()
        .map(|f| f.get(&key(&pc)).copied().unwrap_or(1))
        .unwrap_or(1);
    let delay = retry_delay(failures);
    tracing::warn!(name = %pc.name_any(), reason = error.label(), error = %error, failures, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// The wait before retrying after `failures` failed reconciles in a row: 1 s, doubling up
/// to 5 minutes.
pub fn retry_delay(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(9);
    Duration::from_secs((1u64 << exponent).min(300))
}

fn key(pc: &PipelineConfig) -> String {
    format!("{}/{}", pc.namespace().unwrap_or_default(), pc.name_any())
}

/// Reconciles one resource, recording the outcome and duration in the metrics.
pub async fn reconcile(pc: Arc<PipelineConfig>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let _running = ctx.progress.start();
    let name = key(&pc);
    let result = reconcile_inner(pc, ctx.clone()).await;
    if let Ok(mut failures) = ctx.failures.lock() {
        if result.is_ok() {
            failures.remove(&name);
        } else {
            *failures.entry(name).or_default() += 1;
        }
    }
    ctx.metrics.reconciled(
        started.elapsed().as_secs_f64(),
        result.as_ref().err().map(Error::label),
    );
    result
}

async fn reconcile_inner(pc: Arc<PipelineConfig>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pc.namespace().unwrap_or_default();
    let api: Api<PipelineConfig> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, pc, |event| async {
        match event {
            Event::Apply(pc) => apply(pc, ctx.clone()).await,
            Event::Cleanup(pc) => cleanup(pc, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// The outcome of the topic step.
struct TopicsOutcome {
    /// What the status says of the topics.
    status: TopicsObserved,
    /// What was changed, as (Event reason, note).
    done: Vec<(&'static str, String)>,
}

/// How old the view of a cluster's topics may be when a reconcile plans the topics: the
/// operator's own changes are in it at once; a change made by someone else is seen after at
/// most this long.
const TOPIC_VIEW_MAX_AGE: Duration = Duration::from_secs(30);

async fn apply_topics(
    pc: &PipelineConfig,
    api: &Api<PipelineConfig>,
    clients: &KafkaClients,
    kafka: Result<&KafkaArgs, &SecretError>,
) -> TopicsOutcome {
    let mut created: BTreeSet<String> = pc
        .status
        .as_ref()
        .map(|s| s.created_topics.iter().cloned().collect())
        .unwrap_or_default();
    let failed = |reason: &'static str, message: String| TopicsOutcome {
        status: TopicsObserved {
            ready: false,
            reason,
            message,
            topics: Vec::new(),
            single_copy: Vec::new(),
            created: created.iter().cloned().collect(),
        },
        done: Vec::new(),
    };
    let kafka = match kafka {
        Ok(k) => k,
        Err(e) => {
            return failed(
                "KafkaSecretInvalid",
                format!("cannot connect to Kafka: {e}"),
            );
        }
    };
    let unreachable = |e: KafkaError| {
        failed(
            "KafkaUnreachable",
            format!(
                "cannot reach Kafka at {}: {e}",
                pc.spec.kafka.bootstrap_servers
            ),
        )
    };
    let cluster = match clients.cluster(kafka) {
        Ok(c) => c,
        Err(e) => return unreachable(e),
    };
    let admin = cluster.admin();
    let view = match cluster.topics(TOPIC_VIEW_MAX_AGE).await {
        Ok(v) => v,
        Err(e) => return unreachable(e),
    };
    let observed = &view.topics;
    let actions = plan::topics(pc, observed, view.brokers, &created);
    // The topics about to be created are recorded first, so that a topic made by this
    // reconcile is known as the pipeline's even if the status write at its end fails.
    let mut recorded = created.clone();
    recorded.extend(actions.iter().filter_map(|a| match a {
        TopicAction::Create { name, .. } => Some(name.clone()),
        _ => None,
    }));
    if recorded != created {
        let patch = json!({"status": {"createdTopics": recorded}});
        if let Err(e) = api
            .patch_status(
                &pc.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            return failed(
                "TopicError",
                format!("cannot record the topics to create in the status: {e}"),
            );
        }
        created = recorded;
    }
    let single_copy: Vec<String> = actions
        .iter()
        .filter_map(|a| match a {
            TopicAction::Create {
                name,
                replication_factor: 1,
                ..
            } => Some(name.clone()),
            TopicAction::Create { .. } | TopicAction::NotOurs { .. } => None,
            TopicAction::Grow { name, .. }
            | TopicAction::Keep { name, .. }
            | TopicAction::NotSupported { name, .. } => observed
                .get(name)
                .filter(|o| o.replication_factor == 1)
                .map(|_| name.clone()),
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut problems = Vec::new();
    let mut not_supported = Vec::new();
    let mut not_ours = Vec::new();
    let mut topics = Vec::new();
    let mut done = Vec::new();
    for action in &actions {
        match action {
            TopicAction::Create {
                name,
                partitions,
                replication_factor,
                config,
            } => {
                let mut topic = NewTopic::new(
                    name,
                    *partitions,
                    TopicReplication::Fixed(*replication_factor),
                );
                for (k, v) in config {
                    topic = topic.set(k, v);
                }
                match admin.create_topics([&topic], &options).await {
                    Ok(results) => {
                        for r in results {
                            match r {
                                Ok(_) => {
                                    let topic = ObservedTopic {
                                        partitions: *partitions,
                                        replication_factor: *replication_factor,
                                    };
                                    cluster.changed(name, Some(topic)).await;
                                    done.push((
                                        "TopicCreated",
                                        format!(
                                            "created topic {name} with {partitions} partitions"
                                        ),
                                    ));
                                }
                                // Made by someone else since the view was read.
                                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                                    cluster.invalidate().await;
                                }
                                Err((t, code)) => problems.push(format!("creating {t}: {code}")),
                            }
                        }
                    }
                    Err(e) => problems.push(format!("creating {name}: {e}")),
                }
                topics.push(TopicStatus {
                    name: name.clone(),
                    partitions: *partitions,
                });
            }
            TopicAction::Grow { name, to, .. } => {
                let grow = NewPartitions::new(name, *to as usize);
                match admin.create_partitions([&grow], &options).await {
                    Ok(results) => {
                        for r in results {
                            match r {
                                Ok(_) => {
                                    let replication_factor =
                                        observed.get(name).map_or(0, |o| o.replication_factor);
                                    let topic = ObservedTopic {
                                        partitions: *to,
                                        replication_factor,
                                    };
                                    cluster.changed(name, Some(topic)).await;
                                    done.push((
                                        "PartitionsAdded",
                                        format!("topic {name} grown to {to} partitions"),
                                    ));
                                }
                                Err((t, code)) => problems.push(format!("growing {t}: {code}")),
                            }
                        }
                    }
                    Err(e) => problems.push(format!("growing {name}: {e}")),
                }
                topics.push(TopicStatus {
                    name: name.clone(),
                    partitions: *to,
                });
            }
            TopicAction::Keep { name, partitions } => topics.push(TopicStatus {
                name: name.clone(),
                partitions: *partitions,
            }),
            TopicAction::NotOurs { reason, .. } => not_ours.push(reason.clone()),
            TopicAction::NotSupported { name, reason } => {
                not_supported.push(reason.clone());
                if let Some(o) = observed.get(name) {
                    topics.push(TopicStatus {
                        name: name.clone(),
                        partitions: o.partitions,
                    });
                }
            }
        }
    }
    // Existing topics of the pipeline get the configuration the spec names.
    for stream in &pc.spec.streams {
        let name = plan::names::topic(pc, stream);
        let ours = stream.topic.name.is_some() || created.contains(&name);
        if stream.topic.config.is_empty() || !observed.contains_key(&name) || !ours {
            continue;
        }
        match align_config(admin, &name, &stream.topic.config, &options).await {
            Ok(true) => done.push((
                "TopicConfigured",
                format!("set {:?} on topic {name}", stream.topic.config),
            )),
            Ok(false) => {}
            Err(e) => problems.push(format!("configuring {name}: {e}")),
        }
    }
    let (ready, reason, message) = if !not_ours.is_empty() {
        (false, "TopicNotOurs", not_ours.join("; "))
    } else if !not_supported.is_empty() {
        (false, "NotSupported", not_supported.join("; "))
    } else if !problems.is_empty() {
        (false, "TopicError", problems.join("; "))
    } else {
        (
            true,
            "TopicsReady",
            format!(
                "{} topics exist with the partitions the spec asks for",
                topics.len()
            ),
        )
    };
    TopicsOutcome {
        status: TopicsObserved {
            ready,
            reason,
            message,
            topics,
            single_copy,
            created: created.into_iter().collect(),
        },
        done,
    }
}

/// Sets the topic configuration the spec names, keeping every other value set on the topic
/// (Kafka's AlterConfigs replaces a topic's whole dynamic configuration).
async fn align_config(
    admin: &AdminClient<DefaultClientContext>,
    name: &str,
    desired: &BTreeMap<String, String>,
    options: &AdminOptions,
) -> Result<bool, KafkaError> {
    let resource = ResourceSpecifier::Topic(name);
    let described = admin.describe_configs([&resource], options).await?;
    let mut current: BTreeMap<String, String> = BTreeMap::new();
    for r in described {
        let r = r.map_err(KafkaError::AdminOp)?;
        for e in r.entries {
            if e.source == ConfigSource::DynamicTopic
                && let Some(v) = e.value
            {
                current.insert(e.name, v);
            }
        }
    }
    if desired.iter().all(|(k, v)| current.get(k) == Some(v)) {
        return Ok(false);
    }
    let mut merged = current;
    merged.extend(desired.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut alter = AlterConfig::new(resource);
    for (k, v) in &merged {
        alter = alter.set(k, v);
    }
    for r in admin.alter_configs([&alter], options).await? {
        r.map_err(|(_, code)| KafkaError::AdminOp(code))?;
    }
    tracing::info!(topic = %name, config = ?desired, "aligned topic configuration");
    Ok(true)
}

async fn ssa<K>(client: &Client, ns: &str, object: &K) -> Result<K, kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let mut value = serde_json::to_value(object).map_err(kube::Error::SerdeError)?;
    value["apiVersion"] = json!(K::api_version(&Default::default()));
    value["kind"] = json!(K::kind(&Default::default()));
    api.patch(
        &object.meta().name.clone().unwrap_or_default(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await
}

/// Children the apiserver refused in one reconcile, as lines a user can act on.
#[derive(Default)]
struct Refusals(Vec<String>);

impl Refusals {
    /// Applies `object`; a refusal (quota, Pod Security, a webhook, a conflict) is kept
    /// with the apiserver's message, so that the other children are still applied and the
    /// status says what went wrong.
    async fn apply<K>(&mut self, client: &Client, ns: &str, object: &K) -> Option<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match ssa(client, ns, object).await {
            Ok(applied) => Some(applied),
            Err(e) => {
                let message = match &e {
                    kube::Error::Api(status) if !status.message.is_empty() => {
                        status.message.clone()
                    }
                    _ => e.to_string(),
                };
                self.0.push(format!(
                    "{} {}: {message}",
                    K::kind(&Default::default()),
                    object.meta().name.clone().unwrap_or_default()
                ));
                None
            }
        }
    }
}

/// The resource versions of the Secrets the pipeline's pods read at start; an absent one
/// is left out. A failed read fails the reconcile (to be retried) rather than being taken
/// for a change that would roll the pods.
async fn secret_versions(
    client: &Client,
    ns: &str,
    pc: &PipelineConfig,
) -> Result<BTreeMap<String, String>, kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let (services, redis) = plan::referenced_secrets(pc);
    let mut versions = BTreeMap::new();
    for name in services.iter().chain(&redis) {
        if let Some(meta) = api.get_metadata_opt(name).await?
            && let Some(v) = meta.metadata.resource_version
        {
            versions.insert(name.clone(), v);
        }
    }
    Ok(versions)
}

/// Creates the Secret with a generated password for the managed Redis when it does not
/// exist. An existing one is never replaced: its password is what Redis and the pods use.
async fn ensure_redis_auth(
    client: &Client,
    ns: &str,
    pc: &PipelineConfig,
    name: &str,
) -> Result<(), kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    if api.get_metadata_opt(name).await?.is_some() {
        return Ok(());
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        kube::Error::Service(format!("no random bytes for the Redis password: {e}").into())
    })?;
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match api
        .create(&Default::default(), &plan::redis_auth_secret(pc, &password))
        .await
    {
        Ok(_) => {
            tracing::info!(secret = %name, "generated the managed Redis password");
            Ok(())
        }
        // Another reconcile made it first.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// A digest of the children as the plan makes them: equal digests, equal objects.
fn digest(children: &plan::Children) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    // Serializing plain data into memory cannot fail.
    serde_json::to_vec(children)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

impl Cached {
    /// The workload as the watch last saw it, if it did.
    fn workload(&self, ns: &str, w: &plan::Workload) -> Option<Applied> {
        let name = w.name();
        match w {
            plan::Workload::Deployment(_) => self
                .deployments
                .get(&ObjectRef::new(&name).within(ns))
                .map(|d| deployment_applied(&d)),
            plan::Workload::StatefulSet(_) => self
                .stateful_sets
                .get(&ObjectRef::new(&name).within(ns))
                .map(|s| stateful_set_applied(&s)),
        }
    }
}

/// A Deployment's ready replicas, and whether it has all it wants.
fn deployment_applied(d: &Deployment) -> Applied {
    let replicas = d.spec.as_ref().and_then(|s| s.replicas);
    let wanted = replicas.unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let ready_replicas = status.ready_replicas.unwrap_or(0);
    let generation_seen = status.observed_generation >= d.metadata.generation;
    Applied {
        name: d.name_any(),
        ready_replicas,
        ready: generation_seen
            && ready_replicas >= wanted
            && status.updated_replicas.unwrap_or(0) >= wanted,
        replicas,
    }
}

/// A StatefulSet's ready replicas, and whether it has all it wants.
fn stateful_set_applied(a: &StatefulSet) -> Applied {
    let replicas = a.spec.as_ref().and_then(|s| s.replicas);
    let wanted = replicas.unwrap_or(1);
    let status = a.status.clone().unwrap_or_default();
    let ready_replicas = status.ready_replicas.unwrap_or(0);
    let generation_seen = status.observed_generation >= a.metadata.generation;
    let updated = status.updated_replicas.unwrap_or(0) >= wanted
        || status.update_revision == status.current_revision;
    Applied {
        name: a.name_any(),
        ready_replicas,
        ready: generation_seen && ready_replicas >= wanted && updated,
        replicas,
    }
}

/// A workload as applied: its ready replicas, whether it has all it wants, and the
/// replicas it asks for.
struct Applied {
    name: String,
    ready_replicas: i32,
    ready: bool,
    replicas: Option<i32>,
}

impl Refusals {
    /// Applies a Deployment or StatefulSet, as [`Refusals::apply`] does.
    async fn apply_workload(
        &mut self,
        client: &Client,
        ns: &str,
        w: &plan::Workload,
    ) -> Option<Applied> {
        match w {
            plan::Workload::Deployment(d) => {
                Some(deployment_applied(&self.apply(client, ns, d).await?))
            }
            plan::Workload::StatefulSet(s) => {
                Some(stateful_set_applied(&self.apply(client, ns, s).await?))
            }
        }
    }
}

/// Sets the replicas of a workload through its scale subresource.
async fn scale(client: &Client, ns: &str, kind: &str, name: &str, n: i32) -> kube::Result<()> {
    let patch = Patch::Merge(json!({"spec": {"replicas": n}}));
    let params = PatchParams::default();
    if kind == "StatefulSet" {
        let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
        api.patch_scale(name, &params, &patch).await?;
    } else {
        let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
        api.patch_scale(name, &params, &patch).await?;
    }
    Ok(())
}

async fn apply(pc: Arc<PipelineConfig>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pc.namespace().unwrap_or_default();
    let client = &ctx.client;
    let kafka = kafka::client_args(client, &ns, &pc.spec.kafka).await;
    let api: Api<PipelineConfig> = Api::namespaced(client.clone(), &ns);
    let topics = apply_topics(&pc, &api, &ctx.kafka, kafka.as_ref()).await;
    for (reason, note) in &topics.done {
        ctx.event(&pc, false, reason, note.clone()).await;
    }
    if !topics.status.ready {
        ctx.event(
            &pc,
            true,
            topics.status.reason,
            topics.status.message.clone(),
        )
        .await;
    }
    let mut refused = Refusals::default();
    if let Some(name) = plan::generated_redis_secret(&pc)
        && let Err(e) = ensure_redis_auth(client, &ns, &pc, &name).await
    {
        refused.0.push(format!("Secret {name}: {e}"));
    }
    let versions = secret_versions(client, &ns, &pc).await?;
    let children = plan::children_with_secrets(&pc, &ctx.images, &versions);
    // Children as they were at their last complete apply need no write: their workloads'
    // readiness comes from the watch's cache. A workload missing there is applied.
    let uid = pc.metadata.uid.clone().unwrap_or_default();
    let digest = digest(&children);
    let unchanged = ctx
        .applied
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&uid)
        .is_some_and(|l| l.digest == digest && l.at.elapsed() < REAPPLY_AFTER);
    let cached = if unchanged {
        ctx.cached
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    } else {
        None
    };
    let skip = cached.is_some();
    let workload = async |refused: &mut Refusals, w: &plan::Workload| {
        if let Some(c) = &cached
            && let Some(found) = c.workload(&ns, w)
        {
            return Some(found);
        }
        refused.apply_workload(client, &ns, w).await
    };
    if !skip {
        refused.apply(client, &ns, &children.config_map).await;
        for policy in &children.network_policies {
            refused.apply(client, &ns, policy).await;
        }
    }
    let mut redis_ready = true;
    for (w, s) in &children.redis {
        if !skip {
            refused.apply(client, &ns, s).await;
        }
        let applied = workload(&mut refused, w).await;
        redis_ready &= applied.is_some_and(|a| a.ready);
    }
    if !skip {
        refused.apply(client, &ns, &children.ingest_service).await;
    }
    let ingest = plan::Workload::Deployment(children.ingest.clone());
    let ingest_ready = workload(&mut refused, &ingest)
        .await
        .is_some_and(|a| a.ready);
    if !skip {
        refused.apply(client, &ns, &children.ingest_hpa).await;
    }
    let mut collectors = Vec::new();
    let mut scale_to_zero_pending = false;
    let old_status = pc.status.clone().unwrap_or_default();
    for (spec, w) in pc.spec.collectors.iter().zip(&children.collectors) {
        let Some(applied) = workload(&mut refused, w).await else {
            collectors.push(CollectorObserved {
                status: CollectorStatus {
                    name: spec.name.clone(),
                    replicas: 0,
                    desired_replicas: None,
                    lag: None,
                    idle_since: None,
                },
                ready: false,
            });
            continue;
        };
        let (replicas, ready, desired) = (applied.ready_replicas, applied.ready, applied.replicas);
        let lag = match &kafka {
            Ok(args) => match ctx.lag.collector_lag(&pc, &spec.name, args.clone()).await {
                Ok(l) => Some(l.total),
                Err(e) => {
                    tracing::debug!(collector = %spec.name, error = %e, "cannot read lag");
                    None
                }
            },
            Err(_) => None,
        };
        let was_idle = old_status
            .collectors
            .iter()
            .find(|c| c.name == spec.name)
            .and_then(|c| c.idle_since.clone());
        let idle_since = match lag {
            Some(0) => was_idle.or_else(|| Some(jiff::Timestamp::now().to_string())),
            _ => None,
        };
        let mut desired_now = desired;
        if let Some(a) = spec.autoscale.as_ref().filter(|a| a.min_replicas == 0) {
            scale_to_zero_pending = true;
            let target = scale_to_zero(lag, idle_since.as_deref(), a.idle_seconds, desired);
            if let Some(n) = target {
                scale(client, &ns, w.kind(), &applied.name, n).await?;
                desired_now = Some(n);
                let (reason, note) = if n == 0 {
                    (
                        "ScaledToZero",
                        format!(
                            "collector {} had no lag for {}s: scaled to zero",
                            spec.name, a.idle_seconds
                        ),
                    )
                } else {
                    (
                        "ScaledFromZero",
                        format!(
                            "collector {} has lag {}: scaled to one replica",
                            spec.name,
                            lag.unwrap_or_default()
                        ),
                    )
                };
                tracing::info!(collector = %spec.name, replicas = n, "{note}");
                ctx.event(&pc, false, reason, note).await;
            }
        }
        // A collector scaled to zero on purpose is ready.
        collectors.push(CollectorObserved {
            status: CollectorStatus {
                name: spec.name.clone(),
                replicas,
                desired_replicas: desired_now,
                lag,
                idle_since,
            },
            ready: ready || desired_now == Some(0),
        });
    }
    if !skip {
        for hpa in &children.collector_hpas {
            refused.apply(client, &ns, hpa).await;
        }
        if let Err(e) = prune(client, &ns, &pc, &children).await {
            refused
                .0
                .push(format!("removing what the spec no longer names: {e}"));
        }
    }
    let refusals = refused.0;
    {
        let mut applied = ctx.applied.lock().unwrap_or_else(PoisonError::into_inner);
        if !refusals.is_empty() {
            applied.remove(&uid);
        } else if !skip {
            applied.insert(
                uid.clone(),
                LastApply {
                    digest,
                    at: Instant::now(),
                },
            );
        }
    }
    if !refusals.is_empty() {
        tracing::warn!(name = %pc.name_any(), refusals = ?refusals, "the apiserver refused children");
        ctx.event(
            &pc,
            true,
            "ApplyFailed",
            format!("the apiserver refused: {}", refusals.join("; ")),
        )
        .await;
    }

    let ready_or_waiting = refusals.is_empty();
    let status = status::status(
        Observed {
            generation: pc.metadata.generation,
            streams: pc.spec.streams.len(),
            topics: topics.status,
            refusals,
            redis_ready,
            ingest_ready,
            collectors,
        },
        pc.status.as_ref(),
        jiff::Timestamp::now(),
    );
    if status::newly_single_copy(pc.status.as_ref(), &status)
        && let Some(c) = status::condition(&status, "Replicated")
    {
        ctx.event(&pc, true, "SingleCopy", c.message.clone()).await;
    }
    let all = status::condition(&status, "Ready").is_some_and(|c| c.status == "True");
    // An unchanged status is not written again.
    if pc.status.as_ref() != Some(&status) {
        api.patch_status(
            &pc.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&json!({
                "apiVersion": "sluice.dev/v1alpha1",
                "kind": "PipelineConfig",
                "status": status,
            })),
        )
        .await?;
    }
    Ok(Action::requeue(if !ready_or_waiting {
        // A refusal (quota, admission) rarely clears within a few seconds.
        Duration::from_secs(10)
    } else if !all {
        Duration::from_secs(3)
    } else if scale_to_zero_pending {
        // Lag is watched for scaling to and from zero.
        Duration::from_secs(5)
    } else {
        Duration::from_secs(60)
    }))
}

/// The replicas to set on a collector that may scale to zero, if they should change: one
/// when lag appears while it has none, zero once its lag has been zero for `idle_seconds`.
/// Unknown lag changes nothing.
pub fn scale_to_zero(
    lag: Option<i64>,
    idle_since: Option<&str>,
    idle_seconds: i32,
    replicas: Option<i32>,
) -> Option<i32> {
    let replicas = replicas.unwrap_or(1);
    match lag? {
        0 if replicas > 0 => {
            let since: jiff::Timestamp = idle_since?.parse().ok()?;
            let idle = jiff::Timestamp::now().duration_since(since).as_secs();
            (idle >= i64::from(idle_seconds)).then_some(0)
        }
        l if l > 0 && replicas == 0 => Some(1),
        _ => None,
    }
}

/// Deletes the Deployments, StatefulSets, Services, autoscalers and NetworkPolicies of the
/// resource that it no longer asks for: removed collectors, the managed Redis once it is
/// `External`, the policies once they are disabled.
/// The volume claims of a deleted StatefulSet are kept.
async fn prune(
    client: &Client,
    ns: &str,
    pc: &PipelineConfig,
    children: &plan::Children,
) -> Result<(), kube::Error> {
    let selector = format!("app.kubernetes.io/instance={},{MANAGED_BY}", pc.name_any());
    let lp = kube::api::ListParams::default().labels(&selector);
    let owned = |meta: &kube::api::ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| Some(&o.uid) == pc.metadata.uid.as_ref())
    };
    let workloads: Vec<&plan::Workload> = children
        .collectors
        .iter()
        .chain(children.redis.iter().map(|(w, _)| w))
        .collect();
    let named = |kind: &str| -> Vec<String> {
        workloads
            .iter()
            .filter(|w| w.kind() == kind)
            .map(|w| w.name())
            .collect()
    };
    let mut deployments = named("Deployment");
    deployments.push(children.ingest.name_any());
    let stateful_sets = named("StatefulSet");
    let services: Vec<String> = std::iter::once(&children.ingest_service)
        .chain(children.redis.iter().map(|(_, s)| s))
        .map(|s| s.name_any())
        .collect();
    let hpas: Vec<String> = std::iter::once(&children.ingest_hpa)
        .chain(&children.collector_hpas)
        .map(|h| h.name_any())
        .collect();
    prune_kind::<Deployment>(client, ns, &lp, &owned, &deployments).await?;
    prune_kind::<StatefulSet>(client, ns, &lp, &owned, &stateful_sets).await?;
    prune_kind::<Service>(client, ns, &lp, &owned, &services).await?;
    prune_kind::<HorizontalPodAutoscaler>(client, ns, &lp, &owned, &hpas).await?;
    let policies: Vec<String> = children
        .network_policies
        .iter()
        .map(|p| p.name_any())
        .collect();
    prune_kind::<NetworkPolicy>(client, ns, &lp, &owned, &policies).await?;
    Ok(())
}

/// Deletes the objects of kind `K` that `lp` selects, `owned` says are the resource's, and
/// `wanted` does not name.
async fn prune_kind<K>(
    client: &Client,
    ns: &str,
    lp: &kube::api::ListParams,
    owned: &impl Fn(&kube::api::ObjectMeta) -> bool,
    wanted: &[String],
) -> Result<(), kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    for object in api.list(lp).await? {
        let name = object.name_any();
        if owned(object.meta()) && !wanted.contains(&name) {
            tracing::info!(kind = K::kind(&Default::default()).as_ref(), %name, "deleting what the spec no longer names");
            api.delete(&name, &Default::default()).await?;
        }
    }
    Ok(())
}

/// Applies the topic deletion policy; the children go with their owner.
async fn cleanup(pc: Arc<PipelineConfig>, ctx: Arc<Context>) -> Result<Action, Error> {
    if let Some(uid) = &pc.metadata.uid {
        ctx.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uid);
    }
    if pc.spec.topic_deletion_policy == TopicDeletionPolicy::Delete {
        let ns = pc.namespace().unwrap_or_default();
        let args = kafka::client_args(&ctx.client, &ns, &pc.spec.kafka).await?;
        let cluster = ctx.kafka.cluster(&args)?;
        let admin = cluster.admin();
        // Only what the operator created: a topic it adopted because the spec named it
        // was there before the pipeline and stays after it.
        let names: Vec<String> = pc
            .status
            .as_ref()
            .map(|s| s.created_topics.clone())
            .unwrap_or_default();
        if names.is_empty() {
            return Ok(Action::await_change());
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for r in admin.delete_topics(&refs, &options).await? {
            match r {
                Ok(t) | Err((t, rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                    cluster.changed(&t, None).await;
                }
                Err((t, code)) => {
                    return Err(Error::Kafka(KafkaError::AdminOp(code)))
                        .inspect_err(|_| tracing::error!(topic = %t, "cannot delete topic"));
                }
            }
        }
        tracing::info!(name = %pc.name_any(), topics = ?names, "deleted the pipeline's topics");
        ctx.event(
            &pc,
            false,
            "TopicsDeleted",
            format!("deleted topics {}", names.join(", ")),
        )
        .await;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_one_second_to_five_minutes() {
        let delays: Vec<u64> = [1, 2, 3, 4, 9, 10, 50]
            .into_iter()
            .map(|n| retry_delay(n).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 256, 300, 300]);
    }

    #[test]
    fn scale_to_zero_waits_for_the_idle_period_and_returns_on_lag() {
        let long_ago = jiff::Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_secs(600))
            .expect("time")
            .to_string();
        let just_now = jiff::Timestamp::now().to_string();
        assert_eq!(
            scale_to_zero(Some(0), Some(&long_ago), 300, Some(2)),
            Some(0)
        );
        assert_eq!(scale_to_zero(Some(0), Some(&just_now), 300, Some(2)), None);
        assert_eq!(
            scale_to_zero(Some(0), Some(&long_ago), 300, Some(0)),
            None,
            "already zero"
        );
        assert_eq!(scale_to_zero(Some(7), None, 300, Some(0)), Some(1));
        assert_eq!(
            scale_to_zero(Some(7), None, 300, Some(3)),
            None,
            "the HPA's business"
        );
        assert_eq!(
            scale_to_zero(None, Some(&long_ago), 300, Some(2)),
            None,
            "unknown lag changes nothing"
        );
    }
}
