//! The pure half of reconciling: from a `PipelineConfig` (and what was observed in Kafka),
//! what should exist. No I/O here; the apply step writes it with server-side apply.
//!
//! One module for each thing planned:
//! - [`settings`](mod@settings): the pipeline settings every service reads (rendered into a
//!   ConfigMap, the same file format as `scripts/local-pipeline.yaml`);
//! - [`ingest`](mod@ingest): its Deployment, Service and CPU autoscaler;
//! - [`collectors`]: one Deployment per collector (a StatefulSet with a volume claim per
//!   replica for a file collector), and the lag autoscaler of those that autoscale;
//! - [`redis`](mod@redis): when Redis is managed, a primary (a StatefulSet whose claim keeps
//!   its append-only file) and replicas with their Services, which require a password (a
//!   generated Secret unless the spec names one);
//! - [`network`]: the pipeline's NetworkPolicies;
//! - [`topics`](mod@topics): what to do with each topic: create it, leave it, grow its
//!   partitions, or report that a change is not supported;
//! - [`names`]: the names of children, topics and consumer groups;
//! - [`pods`]: what the pods share (security contexts, Kafka access, mounts).
//!
//! [`children`] puts them together, each child with an owner reference to the
//! PipelineConfig, so deleting it deletes them (volume claims are kept). Pods carry a
//! checksum of the settings, so a settings change rolls them, and
//! ([`children_with_secrets`]) one of the Secrets they read at start, so a changed Secret
//! rolls the pods that read it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Resource;
use kube::api::ObjectMeta;

use crate::crd::{PipelineConfig, RedisMode};

pub mod collectors;
pub mod ingest;
pub mod names;
pub mod network;
pub mod pods;
pub mod redis;
pub mod settings;
pub mod topics;

#[cfg(test)]
mod testing;

pub use collectors::useful_replicas;
pub use network::network_policies;
pub use pods::kafka_security;
pub use redis::{
    generated_redis_secret, redis_auth_args, redis_auth_secret, redis_password, redis_primary_args,
    redis_urls,
};
pub use settings::settings;
pub use topics::{ObservedTopic, TopicAction, replication_factor, topics};

/// Images and other runtime choices that are not part of the resource.
#[derive(Debug, Clone)]
pub struct Images {
    /// Image of `sluice-ingest`.
    pub ingest: String,
    /// Image of `sluice-collector`.
    pub collector: String,
    /// Image of the managed Redis.
    pub redis: String,
    /// OTLP endpoint the ingest and collector pods export traces to; none when unset.
    pub otlp_endpoint: Option<String>,
}

impl Default for Images {
    fn default() -> Self {
        Self {
            ingest: "ghcr.io/sluice-dev/sluice-ingest:0.1.0".to_owned(),
            collector: "ghcr.io/sluice-dev/sluice-collector:0.1.0".to_owned(),
            redis: "redis:7.4-alpine".to_owned(),
            otlp_endpoint: None,
        }
    }
}

/// Where the settings file is mounted in every pod.
pub const SETTINGS_PATH: &str = "/etc/sluice/pipeline.yaml";
/// Pod annotation with the checksum of the settings.
pub const CHECKSUM_ANNOTATION: &str = "sluice.dev/settings-checksum";
/// Pod annotation with a checksum of the resource versions of the Secrets the pod reads at
/// start: a changed Secret changes it, which rolls the pods.
pub const SECRETS_ANNOTATION: &str = "sluice.dev/secrets-checksum";

/// Where the Kafka TLS Secret is mounted in ingest and collector pods.
pub const KAFKA_TLS_DIR: &str = "/var/run/sluice/kafka-tls";
/// Where ingest finds the API keys (`keys`) of `spec.ingest.apiKeys`.
pub const API_KEYS_DIR: &str = "/var/run/sluice/api-keys";
/// Port of `/metrics`, `/healthz` and `/readyz` in ingest and collector pods.
pub const METRICS_PORT: u16 = 9464;

/// A short, stable checksum of the settings text (FNV-1a, 64 bits, hex).
pub fn checksum(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn name_of(pc: &PipelineConfig) -> String {
    pc.metadata.name.clone().unwrap_or_default()
}

/// Labels every child carries; `component` tells them apart.
pub fn labels(pc: &PipelineConfig, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "sluice".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name_of(pc)),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "sluice-operator".to_owned(),
        ),
    ])
}

fn meta(pc: &PipelineConfig, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pc.metadata.namespace.clone(),
        labels: Some(labels(pc, component)),
        owner_references: pc.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The pods of one component: a Deployment, or a StatefulSet where each pod keeps a
/// volume claim of its own across restarts and scaling.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Workload {
    /// Interchangeable pods.
    Deployment(Deployment),
    /// Pods with a claim each.
    StatefulSet(StatefulSet),
}

impl Workload {
    /// Its metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Deployment(d) => &d.metadata,
            Self::StatefulSet(s) => &s.metadata,
        }
    }

    /// Its name.
    pub fn name(&self) -> String {
        self.metadata().name.clone().unwrap_or_default()
    }

    /// `Deployment` or `StatefulSet`, as in a `scaleTargetRef`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Deployment(_) => "Deployment",
            Self::StatefulSet(_) => "StatefulSet",
        }
    }

    /// Its pod template.
    pub fn template_mut(&mut self) -> Option<&mut PodTemplateSpec> {
        match self {
            Self::Deployment(d) => d.spec.as_mut().map(|s| &mut s.template),
            Self::StatefulSet(s) => s.spec.as_mut().map(|s| &mut s.template),
        }
    }

    /// The replicas it asks for; none when an autoscaler owns them.
    pub fn replicas(&self) -> Option<i32> {
        match self {
            Self::Deployment(d) => d.spec.as_ref().and_then(|s| s.replicas),
            Self::StatefulSet(s) => s.spec.as_ref().and_then(|s| s.replicas),
        }
    }
}

/// Everything the resource asks for, as Kubernetes objects.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Children {
    /// The settings.
    pub config_map: ConfigMap,
    /// Ingest.
    pub ingest: Deployment,
    /// Ingest's Service.
    pub ingest_service: Service,
    /// Ingest's CPU autoscaler.
    pub ingest_hpa: HorizontalPodAutoscaler,
    /// One per collector: a StatefulSet for a file collector without `claimName`.
    pub collectors: Vec<Workload>,
    /// One per collector with `autoscale`, on its consumer lag.
    pub collector_hpas: Vec<HorizontalPodAutoscaler>,
    /// The managed Redis primary (a StatefulSet) and replicas (a Deployment) with their
    /// Services; empty for External.
    pub redis: Vec<(Workload, Service)>,
    /// The Secret with a generated Redis password, for a managed Redis without
    /// `passwordSecret`. Created once and never replaced (see [`redis_auth_secret`]).
    pub redis_auth: Option<String>,
    /// The NetworkPolicies of ingest, the collectors and the managed Redis; none when
    /// `networkPolicy.enabled` is false.
    pub network_policies: Vec<NetworkPolicy>,
}

/// Every child of the resource.
pub fn children(pc: &PipelineConfig, images: &Images) -> Children {
    let settings_text = settings(pc).to_yaml();
    let sum = checksum(&settings_text);
    let mut config_map = ConfigMap {
        data: Some(BTreeMap::from([(
            "pipeline.yaml".to_owned(),
            settings_text,
        )])),
        ..ConfigMap::default()
    };
    config_map.metadata = meta(pc, names::config(pc), "settings");
    let (ingest, ingest_service, ingest_hpa) = ingest::plan(pc, images, &sum);
    let collectors: Vec<Workload> = pc
        .spec
        .collectors
        .iter()
        .map(|c| collectors::workload(pc, c, images, &sum))
        .collect();
    Children {
        config_map,
        ingest,
        ingest_service,
        ingest_hpa,
        collector_hpas: pc
            .spec
            .collectors
            .iter()
            .zip(&collectors)
            .filter_map(|(c, w)| collectors::autoscaler(pc, c, w))
            .collect(),
        collectors,
        redis: redis::workloads(pc, images),
        redis_auth: generated_redis_secret(pc),
        network_policies: network_policies(pc, images),
    }
}

/// Every child of the resource, with the pods of each component annotated with the
/// checksum of the `versions` (name to resource version) of the Secrets it reads (see
/// [`referenced_secrets`]), so that a changed Secret rolls exactly the pods that read it.
pub fn children_with_secrets(
    pc: &PipelineConfig,
    images: &Images,
    versions: &BTreeMap<String, String>,
) -> Children {
    let mut c = children(pc, images);
    let (services, redis) = referenced_secrets(pc);
    if !services.is_empty() {
        let sum = secrets_checksum(&services, versions);
        annotate_pods(c.ingest.spec.as_mut().map(|s| &mut s.template), &sum);
        for w in &mut c.collectors {
            annotate_pods(w.template_mut(), &sum);
        }
    }
    if !redis.is_empty() {
        let sum = secrets_checksum(&redis, versions);
        for (w, _) in &mut c.redis {
            annotate_pods(w.template_mut(), &sum);
        }
    }
    c
}

/// The Secrets whose values pods read when they start, by the components that read them:
/// ingest and collectors read the Kafka credentials and certificates, the SQL URLs and the
/// Redis password; the managed Redis reads its password. The API keys are not among them:
/// ingest reads its key file again while running.
pub fn referenced_secrets(pc: &PipelineConfig) -> (Vec<String>, Vec<String>) {
    let mut services = Vec::new();
    let kafka = &pc.spec.kafka;
    services.extend(kafka.tls.iter().map(|t| t.secret_name.clone()));
    services.extend(kafka.sasl.iter().map(|s| s.secret_name.clone()));
    for c in &pc.spec.collectors {
        services.extend(c.sink.postgres.iter().map(|s| s.secret_name.clone()));
        services.extend(c.sink.mysql.iter().map(|s| s.secret_name.clone()));
    }
    let password = redis_password(pc).map(|(name, _)| name);
    services.extend(password.clone());
    let redis: Vec<String> = password
        .filter(|_| pc.spec.redis.mode == RedisMode::Managed)
        .into_iter()
        .collect();
    services.sort();
    services.dedup();
    (services, redis)
}

/// The checksum of the resource versions of `secrets` (an absent Secret counts as such).
fn secrets_checksum(secrets: &[String], versions: &BTreeMap<String, String>) -> String {
    let text: Vec<String> = secrets
        .iter()
        .map(|s| {
            let version = versions.get(s).map_or("absent", String::as_str);
            format!("{s}={version}")
        })
        .collect();
    checksum(&text.join("\n"))
}

/// Sets `SECRETS_ANNOTATION` on a pod template.
fn annotate_pods(template: Option<&mut PodTemplateSpec>, value: &str) {
    if let Some(t) = template {
        t.metadata
            .get_or_insert_with(ObjectMeta::default)
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(SECRETS_ANNOTATION.to_owned(), value.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::*;
    use sluice_core::settings::PipelineSettings;

    #[test]
    fn a_changed_secret_rolls_exactly_the_pods_that_read_it() {
        let sasl = pc(&BASIC.replace(
            "  kafka: {bootstrapServers: 'kafka:9092'}",
            "  kafka: {bootstrapServers: 'kafka:9092', sasl: {mechanism: SCRAM-SHA-512, secretName: kafka-user}}\n  ingest: {apiKeys: {secretName: keys}}",
        ).replace("  ingest: {replicas: {min: 2, max: 5}, tcp: {writePort: 2525, readPort: 2526, stream: visit}}\n", ""));
        let (services, redis) = referenced_secrets(&sasl);
        assert_eq!(services, ["kafka-user", "pg", "shop-redis-auth"]);
        assert_eq!(redis, ["shop-redis-auth"], "Redis reads only its password");
        let annotation = |c: &Children| {
            (
                secrets_sum(&c.ingest),
                c.collectors.iter().map(secrets_sum).collect::<Vec<_>>(),
                c.redis
                    .iter()
                    .map(|(w, _)| secrets_sum(w))
                    .collect::<Vec<_>>(),
            )
        };
        let versions = |kafka: &str, redis: &str| {
            BTreeMap::from([
                ("kafka-user".to_owned(), kafka.to_owned()),
                ("pg".to_owned(), "7".to_owned()),
                ("shop-redis-auth".to_owned(), redis.to_owned()),
                ("keys".to_owned(), "1".to_owned()),
            ])
        };
        let before = annotation(&children_with_secrets(
            &sasl,
            &Images::default(),
            &versions("1", "1"),
        ));
        assert!(before.0.is_some());
        let kafka_changed = annotation(&children_with_secrets(
            &sasl,
            &Images::default(),
            &versions("2", "1"),
        ));
        assert_ne!(kafka_changed.0, before.0, "ingest rolls");
        assert!(
            kafka_changed.1.iter().zip(&before.1).all(|(a, b)| a != b),
            "collectors roll"
        );
        assert_eq!(kafka_changed.2, before.2, "Redis does not");
        let redis_changed = annotation(&children_with_secrets(
            &sasl,
            &Images::default(),
            &versions("1", "2"),
        ));
        assert!(
            redis_changed.2.iter().zip(&before.2).all(|(a, b)| a != b),
            "Redis rolls"
        );
        // The API keys are read again by the running pods: a change rolls nothing.
        let mut keys = versions("1", "1");
        keys.insert("keys".to_owned(), "2".to_owned());
        assert_eq!(
            annotation(&children_with_secrets(&sasl, &Images::default(), &keys)),
            before
        );
        // An absent Secret counts as such: its creation rolls the pods that wait for it.
        let mut absent = versions("1", "1");
        absent.remove("kafka-user");
        assert_ne!(
            annotation(&children_with_secrets(&sasl, &Images::default(), &absent)).0,
            before.0
        );
    }

    /// The secrets annotation of a workload's pods.
    fn secrets_sum(w: &impl serde::Serialize) -> Option<String> {
        serde_json::to_value(w).expect("json")["spec"]["template"]["metadata"]["annotations"]
            [SECRETS_ANNOTATION]
            .as_str()
            .map(str::to_owned)
    }

    #[test]
    fn every_child_has_an_owner_reference_and_labels() {
        let c = children(&pc(BASIC), &Images::default());
        let metas: Vec<&ObjectMeta> = [
            &c.config_map.metadata,
            &c.ingest.metadata,
            &c.ingest_service.metadata,
            &c.ingest_hpa.metadata,
        ]
        .into_iter()
        .chain(c.collectors.iter().map(Workload::metadata))
        .chain(
            c.redis
                .iter()
                .flat_map(|(w, s)| [w.metadata(), &s.metadata]),
        )
        .collect();
        assert_eq!(metas.len(), 4 + 4 + 4);
        for m in metas {
            let owner = &m.owner_references.as_ref().expect("owner")[0];
            assert_eq!(owner.kind, "PipelineConfig");
            assert_eq!(owner.name, "shop");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(m.namespace.as_deref(), Some("prod"));
            assert_eq!(
                m.labels.as_ref().expect("labels")["app.kubernetes.io/instance"],
                "shop"
            );
        }
    }

    #[test]
    fn the_config_map_holds_the_settings_and_pods_their_checksum() {
        let resource = pc(BASIC);
        let c = children(&resource, &Images::default());
        let text = &c.config_map.data.as_ref().expect("data")["pipeline.yaml"];
        assert_eq!(
            PipelineSettings::from_yaml(text).expect("valid"),
            settings(&resource)
        );
        let sum = checksum(text);
        let pods = std::iter::once(serde_json::to_value(&c.ingest).expect("json")).chain(
            c.collectors
                .iter()
                .map(|w| serde_json::to_value(w).expect("json")),
        );
        for v in pods {
            assert_eq!(
                v["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION],
                sum.as_str()
            );
        }
        // A settings change changes the checksum, so the pods roll.
        let mut changed = resource.clone();
        changed.spec.streams[0].topic.partitions = 12;
        let other = children(&changed, &Images::default());
        let other_sum = checksum(&other.config_map.data.as_ref().expect("data")["pipeline.yaml"]);
        assert_ne!(sum, other_sum);
    }

    #[test]
    fn checksums_are_stable() {
        assert_eq!(checksum("a"), checksum("a"));
        assert_ne!(checksum("a"), checksum("b"));
        assert_eq!(checksum("").len(), 16);
    }
}
