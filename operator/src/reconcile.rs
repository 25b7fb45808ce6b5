//! The I/O half of reconciling: observe Kafka and the cluster, apply the [`plan`], report.
//!
//! For each `PipelineConfig`:
//! 1. the finalizer `sluice.dev/topics` is added, so deletion can apply the topic policy;
//! 2. topics are observed through the Kafka admin API, then created or grown as the plan
//!    says; a change Kafka cannot make becomes a `NotSupported` condition, not an error;
//! 3. every child is written with server-side apply under one field manager; a child the
//!    apiserver refuses (quota, Pod Security, a webhook) does not stop the others: it
//!    becomes the `ChildrenApplied` condition and a Warning Event; children the spec no
//!    longer names are deleted;
//! 4. the Deployments' and StatefulSets' ready replicas give `RedisReady`, `IngestReady`,
//!    `CollectorsReady`;
//!    `Ready` is true when all conditions are;
//! 5. the status is written, and the resource is looked at again soon while it is not
//!    ready, and every minute when it is.
//!
//! Errors (the apiserver refusing a write) are retried with backoff by the controller.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event, finalizer};
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

use crate::crd::{
    CollectorStatus, PipelineConfig, PipelineConfigStatus, TopicDeletionPolicy, TopicStatus,
};
use crate::kafka::{self, LagReader, SecretError};
use crate::metrics::Metrics;
use crate::plan::{self, Images, ObservedTopic, TopicAction};

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
    /// Reads consumer lag for the status and for scaling to zero.
    pub lag: LagReader,
    /// Publishes Events on the resources.
    recorder: Recorder,
    /// Failed reconciles in a row per resource, for the retry backoff.
    failures: std::sync::Mutex<BTreeMap<String, u32>>,
}

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
        Self {
            client,
            images,
            metrics: Arc::new(Metrics::new()),
            lag: LagReader::default(),
            recorder,
            failures: std::sync::Mutex::default(),
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

/// Runs the controller for the resources `api` sees until `shutdown` is cancelled.
pub async fn run(api: Api<PipelineConfig>, ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let scoped = |_: ()| api.namespace();
    let deployments: Api<Deployment> = match scoped(()) {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let stateful_sets: Api<StatefulSet> = match scoped(()) {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Only the operator's own children: a cluster may have many Deployments.
    let children =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=sluice-operator");
    Controller::new(api, watcher::Config::default())
        .owns(deployments, children.clone())
        .owns(stateful_sets, children)
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

/// Topics as they are in Kafka.
/// The topics that exist, and how many brokers the cluster has.
async fn observe_topics(
    kafka: &KafkaArgs,
) -> Result<(BTreeMap<String, ObservedTopic>, i32), KafkaError> {
    // Metadata requests block; keep them off the async threads.
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let admin = kafka.admin()?;
        let metadata = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))?;
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
        Ok((topics, metadata.brokers().len() as i32))
    })
    .await
    .map_err(|_| KafkaError::Canceled)?
}

/// The outcome of the topic step.
struct TopicsOutcome {
    ready: bool,
    reason: &'static str,
    message: String,
    topics: Vec<TopicStatus>,
    /// What was changed, as (Event reason, note).
    done: Vec<(&'static str, String)>,
    /// Topics with a single replica (losing its broker's disk loses them).
    single_copy: Vec<String>,
    /// Every topic the operator created for the resource, these included.
    created: Vec<String>,
}

async fn apply_topics(
    pc: &PipelineConfig,
    api: &Api<PipelineConfig>,
    kafka: Result<&KafkaArgs, &SecretError>,
) -> TopicsOutcome {
    let mut created: BTreeSet<String> = pc
        .status
        .as_ref()
        .map(|s| s.created_topics.iter().cloned().collect())
        .unwrap_or_default();
    let failed = |reason: &'static str, message: String| TopicsOutcome {
        ready: false,
        reason,
        message,
        topics: Vec::new(),
        done: Vec::new(),
        single_copy: Vec::new(),
        created: created.iter().cloned().collect(),
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
    let admin = match kafka.admin() {
        Ok(a) => a,
        Err(e) => return unreachable(e),
    };
    let (observed, brokers) = match observe_topics(kafka).await {
        Ok(o) => o,
        Err(e) => return unreachable(e),
    };
    let actions = plan::topics(pc, &observed, brokers, &created);
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
                                Ok(_) => done.push((
                                    "TopicCreated",
                                    format!("created topic {name} with {partitions} partitions"),
                                )),
                                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
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
                                Ok(_) => done.push((
                                    "PartitionsAdded",
                                    format!("topic {name} grown to {to} partitions"),
                                )),
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
        match align_config(&admin, &name, &stream.topic.config, &options).await {
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
        ready,
        reason,
        message,
        topics,
        done,
        single_copy,
        created: created.into_iter().collect(),
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

/// Ready replicas of a Deployment that was just applied, and whether it has all it wants.
fn readiness(d: &Deployment) -> (i32, bool) {
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let ready = status.ready_replicas.unwrap_or(0);
    let generation_seen = status.observed_generation >= d.metadata.generation;
    (
        ready,
        generation_seen && ready >= wanted && status.updated_replicas.unwrap_or(0) >= wanted,
    )
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
                let a = self.apply(client, ns, d).await?;
                let (ready_replicas, ready) = readiness(&a);
                Some(Applied {
                    name: a.name_any(),
                    ready_replicas,
                    ready,
                    replicas: a.spec.as_ref().and_then(|s| s.replicas),
                })
            }
            plan::Workload::StatefulSet(s) => {
                let a = self.apply(client, ns, s).await?;
                let replicas = a.spec.as_ref().and_then(|s| s.replicas);
                let wanted = replicas.unwrap_or(1);
                let status = a.status.clone().unwrap_or_default();
                let ready_replicas = status.ready_replicas.unwrap_or(0);
                let generation_seen = status.observed_generation >= a.metadata.generation;
                let updated = status.updated_replicas.unwrap_or(0) >= wanted
                    || status.update_revision == status.current_revision;
                Some(Applied {
                    name: a.name_any(),
                    ready_replicas,
                    ready: generation_seen && ready_replicas >= wanted && updated,
                    replicas,
                })
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
    let topics = apply_topics(&pc, &api, kafka.as_ref()).await;
    for (reason, note) in &topics.done {
        ctx.event(&pc, false, reason, note.clone()).await;
    }
    if !topics.ready {
        ctx.event(&pc, true, topics.reason, topics.message.clone())
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
    refused.apply(client, &ns, &children.config_map).await;
    for policy in &children.network_policies {
        refused.apply(client, &ns, policy).await;
    }
    let mut redis_ready = true;
    for (w, s) in &children.redis {
        refused.apply(client, &ns, s).await;
        let applied = refused.apply_workload(client, &ns, w).await;
        redis_ready &= applied.is_some_and(|a| a.ready);
    }
    refused.apply(client, &ns, &children.ingest_service).await;
    let ingest = refused.apply(client, &ns, &children.ingest).await;
    refused.apply(client, &ns, &children.ingest_hpa).await;
    let ingest_ready = ingest.is_some_and(|i| readiness(&i).1);
    let mut collectors = Vec::new();
    let mut collectors_ready = true;
    let mut scale_to_zero_pending = false;
    let old_status = pc.status.clone().unwrap_or_default();
    for (spec, w) in pc.spec.collectors.iter().zip(&children.collectors) {
        let Some(applied) = refused.apply_workload(client, &ns, w).await else {
            collectors_ready = false;
            collectors.push((
                spec.name.clone(),
                0,
                false,
                CollectorStatus {
                    name: spec.name.clone(),
                    replicas: 0,
                    desired_replicas: None,
                    lag: None,
                    idle_since: None,
                },
            ));
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
        let ready = ready || desired_now == Some(0);
        collectors_ready &= ready;
        collectors.push((
            spec.name.clone(),
            replicas,
            ready,
            CollectorStatus {
                name: spec.name.clone(),
                replicas,
                desired_replicas: desired_now,
                lag,
                idle_since,
            },
        ));
    }
    for hpa in &children.collector_hpas {
        refused.apply(client, &ns, hpa).await;
    }
    if let Err(e) = prune(client, &ns, &pc, &children).await {
        refused
            .0
            .push(format!("removing what the spec no longer names: {e}"));
    }
    let refusals = refused.0;
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

    let generation = pc.metadata.generation;
    let old = pc.status.clone().unwrap_or_default().conditions;
    let condition = |kind: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = old
            .iter()
            .find(|c| c.type_ == kind && c.status == status)
            .map_or_else(
                || Time(jiff::Timestamp::now()),
                |c| c.last_transition_time.clone(),
            );
        Condition {
            type_: kind.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            last_transition_time: since,
            observed_generation: generation,
        }
    };
    let waiting = |what: &str| format!("waiting for {what} to become ready");
    let mut conditions = vec![
        condition(
            "TopicsReady",
            topics.ready,
            topics.reason,
            topics.message.clone(),
        ),
        if refusals.is_empty() {
            condition(
                "ChildrenApplied",
                true,
                "Applied",
                "every child object is applied".to_owned(),
            )
        } else {
            condition(
                "ChildrenApplied",
                false,
                "ApplyFailed",
                format!("the apiserver refused: {}", refusals.join("; ")),
            )
        },
        if redis_ready {
            condition(
                "RedisReady",
                true,
                "RedisReady",
                "Redis is ready".to_owned(),
            )
        } else {
            condition(
                "RedisReady",
                false,
                "Progressing",
                waiting("the managed Redis"),
            )
        },
        if ingest_ready {
            condition(
                "IngestReady",
                true,
                "IngestReady",
                "every ingest replica is ready".to_owned(),
            )
        } else {
            condition("IngestReady", false, "Progressing", waiting("ingest"))
        },
        if collectors_ready {
            condition(
                "CollectorsReady",
                true,
                "CollectorsReady",
                "every collector is ready".to_owned(),
            )
        } else {
            let pending: Vec<&str> = collectors
                .iter()
                .filter(|c| !c.2)
                .map(|c| c.0.as_str())
                .collect();
            condition(
                "CollectorsReady",
                false,
                "Progressing",
                waiting(&format!("collectors {}", pending.join(", "))),
            )
        },
    ];
    let all = conditions.iter().all(|c| c.status == "True");
    let first_problem = conditions.iter().find(|c| c.status != "True").cloned();
    // How safe the topics are: reported, not part of Ready (a one-broker dev cluster is a
    // working pipeline).
    if !topics.topics.is_empty() {
        let replicated = if topics.single_copy.is_empty() {
            condition(
                "Replicated",
                true,
                "Replicated",
                "every topic has more than one replica".to_owned(),
            )
        } else {
            condition(
                "Replicated",
                false,
                "SingleCopy",
                format!(
                    "{} topics have a single replica ({}): losing that broker's disk loses acknowledged events; set topic.replicationFactor to 3 (min.insync.replicas 2) on a cluster of 3 or more brokers",
                    topics.single_copy.len(),
                    topics.single_copy.join(", ")
                ),
            )
        };
        let was_false = old
            .iter()
            .any(|c| c.type_ == "Replicated" && c.status == "False");
        if replicated.status == "False" && !was_false {
            ctx.event(&pc, true, "SingleCopy", replicated.message.clone())
                .await;
        }
        conditions.push(replicated);
    }
    conditions.insert(
        0,
        match first_problem {
            None => condition("Ready", true, "Ready", "the pipeline is ready".to_owned()),
            Some(c) => condition(
                "Ready",
                false,
                &c.reason,
                format!("{}: {}", c.type_, c.message),
            ),
        },
    );
    let status = PipelineConfigStatus {
        observed_generation: generation,
        conditions,
        streams: Some(pc.spec.streams.len() as i32),
        ready_collectors: Some(collectors.iter().filter(|c| c.2).count() as i32),
        topics: topics.topics,
        created_topics: topics.created,
        collectors: collectors.into_iter().map(|c| c.3).collect(),
    };
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
    Ok(Action::requeue(if !refusals.is_empty() {
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
    let selector = format!(
        "app.kubernetes.io/instance={},app.kubernetes.io/managed-by=sluice-operator",
        pc.name_any()
    );
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
    if pc.spec.topic_deletion_policy == TopicDeletionPolicy::Delete {
        let ns = pc.namespace().unwrap_or_default();
        let admin = kafka::client_args(&ctx.client, &ns, &pc.spec.kafka)
            .await?
            .admin()?;
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
                Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
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
