//! The pure half of reconciling: from a `PipelineConfig` (and what was observed in Kafka),
//! what should exist. No I/O here; the apply step writes it with server-side apply.
//!
//! - [`settings`]: the pipeline settings every service reads (rendered into a ConfigMap,
//!   the same file format as `scripts/local-pipeline.yaml`);
//! - [`children`]: the ConfigMap, the ingest Deployment, Service and CPU autoscaler, one
//!   Deployment per collector (a StatefulSet with a volume claim per replica for a file
//!   collector), and, when Redis is managed, a primary (a StatefulSet whose claim keeps its
//!   append-only file) and replicas with their Services, which require a password (a
//!   generated Secret unless the spec names one), and the pipeline's NetworkPolicies
//!   ([`network_policies`]) — each with an owner reference to the PipelineConfig, so
//!   deleting it deletes them (volume claims are kept);
//! - [`topics`]: what to do with each topic: create it, leave it, grow its partitions, or
//!   report that a change is not supported (partitions never shrink; the replication
//!   factor is fixed once the topic exists).
//!
//! Pods carry a checksum of the settings, so a settings change rolls them, and
//! ([`children_with_secrets`]) one of the Secrets they read at start, so a changed Secret
//! rolls the pods that read it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Resource;
use kube::api::ObjectMeta;
use serde_json::{Value, json};
use sluice_core::settings::{
    AggregateSettings, PipelineSettings, RecordStore, RetrySettings, StoreKind, StreamSettings,
};

use crate::crd::{
    CollectorSpec, KafkaSpec, PipelineConfig, RedisMode, RedisSpec, SaslMechanism, SqlSinkSpec,
    StartAt, StorageSpec,
};

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

/// The pipeline settings rendered from the resource.
pub fn settings(pc: &PipelineConfig) -> PipelineSettings {
    PipelineSettings {
        streams: pc
            .spec
            .streams
            .iter()
            .map(|s| {
                let mut out = StreamSettings::new(&s.name);
                out.topic = Some(names::topic(pc, s));
                out.partitions = s.topic.partitions;
                out.key = s.key.clone();
                out.schema = s.schema.clone();
                out.dimensions = s.dimensions.clone();
                // An `ack=sink` answer waits for every collector of the stream.
                out.ack_by = pc
                    .spec
                    .collectors
                    .iter()
                    .filter(|c| c.streams.contains(&s.name))
                    .map(|c| names::collector_group(pc, &c.name))
                    .collect();
                out.store = record_store(pc, &s.name).map(|(kind, sql)| RecordStore {
                    kind,
                    table: sql.table.clone(),
                });
                out
            })
            .collect(),
        retry: RetrySettings {
            max_attempts: u32::try_from(pc.spec.retry.max_attempts)
                .unwrap_or(1)
                .max(1),
            backoff: pc.spec.retry.backoff.clone(),
        },
        aggregates: AggregateSettings {
            minute_retention: pc.spec.aggregates.minute_retention.clone(),
            hour_retention: pc.spec.aggregates.hour_retention.clone(),
        },
    }
}

/// Where ingest reads a stream's records: Redis when a collector of the stream writes
/// there, else the table of its first PostgreSQL or MySQL collector, if any.
fn record_store<'a>(pc: &'a PipelineConfig, stream: &str) -> Option<(StoreKind, &'a SqlSinkSpec)> {
    let collectors: Vec<_> = pc
        .spec
        .collectors
        .iter()
        .filter(|c| c.streams.iter().any(|s| s == stream))
        .collect();
    if collectors.iter().any(|c| c.sink.redis.is_some()) {
        return None;
    }
    collectors.iter().find_map(|c| {
        c.sink
            .postgres
            .as_ref()
            .map(|sql| (StoreKind::Postgres, sql))
            .or_else(|| c.sink.mysql.as_ref().map(|sql| (StoreKind::Mysql, sql)))
    })
}

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

/// Names of the children, topics and consumer groups.
pub mod names {
    use super::{PipelineConfig, name_of};
    use crate::crd::StreamSpec;

    /// The external metric the collectors' autoscalers follow: a collector's consumer lag,
    /// served by the operator ([`crate::external`]).
    pub const LAG_METRIC: &str = "sluice_consumer_lag";

    /// `<namespace>.<pipeline>`: what generated topic and group names start with. A
    /// namespace has no dot, so no two namespaces share a scope.
    fn scope(pc: &PipelineConfig) -> String {
        format!(
            "{}.{}",
            pc.metadata.namespace.as_deref().unwrap_or("default"),
            name_of(pc)
        )
    }
    /// A stream's Kafka topic: the spec's `topic.name`, else `<namespace>.<pipeline>.<stream>`.
    /// Its retry, dead-letter and read topics add `.retry`, `.dlq` and `.reads`.
    pub fn topic(pc: &PipelineConfig, stream: &StreamSpec) -> String {
        stream
            .topic
            .name
            .clone()
            .unwrap_or_else(|| format!("{}.{}", scope(pc), stream.name))
    }

    /// The settings ConfigMap.
    pub fn config(pc: &PipelineConfig) -> String {
        format!("{}-settings", name_of(pc))
    }
    /// The ingest Deployment, Service and autoscaler.
    pub fn ingest(pc: &PipelineConfig) -> String {
        format!("{}-ingest", name_of(pc))
    }
    /// A collector's Deployment.
    pub fn collector(pc: &PipelineConfig, collector: &str) -> String {
        format!("{}-collector-{collector}", name_of(pc))
    }
    /// A collector's consumer group, `<namespace>.<pipeline>.<collector>` (its retry
    /// consumer uses [`sluice_core::settings::retry_group`]).
    pub fn collector_group(pc: &PipelineConfig, collector: &str) -> String {
        format!("{}.{collector}", scope(pc))
    }
    /// A collector's HorizontalPodAutoscaler.
    pub fn collector_hpa(pc: &PipelineConfig, name: &str) -> String {
        collector(pc, name)
    }
    /// The managed Redis primary.
    pub fn redis(pc: &PipelineConfig) -> String {
        format!("{}-redis", name_of(pc))
    }
    /// The managed Redis replicas.
    pub fn redis_replica(pc: &PipelineConfig) -> String {
        format!("{}-redis-replica", name_of(pc))
    }
    /// The Secret with the generated password of the managed Redis.
    pub fn redis_auth(pc: &PipelineConfig) -> String {
        format!("{}-redis-auth", name_of(pc))
    }
    /// The NetworkPolicy of a component: `ingest`, `collectors` or `redis`.
    pub fn network_policy(pc: &PipelineConfig, component: &str) -> String {
        format!("{}-{component}", name_of(pc))
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

/// A claim template named `name` of `storage`'s size and class.
fn claim_template(name: &str, storage: &StorageSpec) -> Value {
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": storage.size}},
    });
    if let Some(class) = &storage.storage_class_name {
        spec["storageClassName"] = json!(class);
    }
    json!({"metadata": {"name": name}, "spec": spec})
}

/// A StatefulSet whose pods each get a claim from `claims`. Claims are kept when it
/// scales down or is deleted, so the data outlives the pods.
fn stateful_set(
    pc: &PipelineConfig,
    name: String,
    component: &str,
    replicas: Option<i32>,
    template: Value,
    claims: Vec<Value>,
) -> StatefulSet {
    let mut spec = json!({
        "serviceName": name,
        "podManagementPolicy": "Parallel",
        "selector": {"matchLabels": {
            "app.kubernetes.io/instance": name_of(pc),
            "app.kubernetes.io/component": component,
        }},
        "template": template,
        "volumeClaimTemplates": claims,
        "persistentVolumeClaimRetentionPolicy": {"whenScaled": "Retain", "whenDeleted": "Retain"},
    });
    if let Some(r) = replicas {
        spec["replicas"] = json!(r);
    }
    let mut s: StatefulSet = serde_json::from_value(json!({"spec": spec})).unwrap_or_default();
    s.metadata = meta(pc, name, component);
    s
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

fn restricted_container() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

fn restricted_pod() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// URLs of the pipeline's Redis primary and read replica.
pub fn redis_urls(pc: &PipelineConfig) -> (String, String) {
    let r = &pc.spec.redis;
    match r.mode {
        RedisMode::External => {
            let primary = r.url.clone().unwrap_or_default();
            let replica = r.replica_url.clone().unwrap_or_else(|| primary.clone());
            (primary, replica)
        }
        RedisMode::Managed => {
            let primary = format!("redis://{}:6379", names::redis(pc));
            let replica = if r.replicas > 0 {
                format!("redis://{}:6379", names::redis_replica(pc))
            } else {
                primary.clone()
            };
            (primary, replica)
        }
    }
}

/// The Secret and key of the Redis password: the spec's `passwordSecret`, else, for a
/// managed Redis, the generated `<pipeline>-redis-auth`; none for an external Redis
/// without one.
pub fn redis_password(pc: &PipelineConfig) -> Option<(String, String)> {
    let r = &pc.spec.redis;
    match (&r.password_secret, r.mode) {
        (Some(s), _) => Some((s.name.clone(), s.key.clone())),
        (None, RedisMode::Managed) => Some((names::redis_auth(pc), "password".to_owned())),
        (None, RedisMode::External) => None,
    }
}

/// The Secret the operator generates for the password of a managed Redis without
/// `passwordSecret`.
pub fn generated_redis_secret(pc: &PipelineConfig) -> Option<String> {
    let r = &pc.spec.redis;
    (r.mode == RedisMode::Managed && r.password_secret.is_none()).then(|| names::redis_auth(pc))
}

/// The Secret holding `password` as the generated password of the pipeline's managed
/// Redis, owned by the resource (deleted with it).
pub fn redis_auth_secret(pc: &PipelineConfig, password: &str) -> Secret {
    Secret {
        metadata: meta(pc, names::redis_auth(pc), "redis"),
        string_data: Some(BTreeMap::from([(
            "password".to_owned(),
            password.to_owned(),
        )])),
        ..Secret::default()
    }
}

/// The arguments that make a Redis server require `password` of its clients and send it
/// to its primary. The pods pass `$(REDIS_PASSWORD)`, which the kubelet replaces with the
/// Secret's value.
pub fn redis_auth_args(password: &str) -> Vec<String> {
    ["--requirepass", password, "--masterauth", password]
        .map(str::to_owned)
        .to_vec()
}

/// Where the Kafka TLS Secret is mounted in ingest and collector pods.
pub const KAFKA_TLS_DIR: &str = "/var/run/sluice/kafka-tls";
/// Where ingest finds the API keys (`keys`) of `spec.ingest.apiKeys`.
pub const API_KEYS_DIR: &str = "/var/run/sluice/api-keys";
/// Port of `/metrics`, `/healthz` and `/readyz` in ingest and collector pods.
pub const METRICS_PORT: u16 = 9464;

/// The librdkafka properties for the spec's TLS and SASL settings that hold no secret: the
/// security protocol and the SASL mechanism.
pub fn kafka_security(spec: &KafkaSpec) -> Vec<(String, String)> {
    let protocol = match (spec.tls.is_some(), spec.sasl.is_some()) {
        (false, false) => return Vec::new(),
        (true, false) => "ssl",
        (false, true) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    let mut out = vec![("security.protocol".to_owned(), protocol.to_owned())];
    if let Some(sasl) = &spec.sasl {
        let mechanism = match sasl.mechanism {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        };
        out.push(("sasl.mechanism".to_owned(), mechanism.to_owned()));
    }
    out
}

/// How a pod reaches Kafka: the environment (credentials by reference to their Secret,
/// never by value), and, with TLS, the Secret's volume and its mount.
/// `extra` are further librdkafka properties for this pod.
fn kafka_client(
    spec: &KafkaSpec,
    extra: Vec<(String, String)>,
) -> (Vec<Value>, Option<(Value, Value)>) {
    let mut options = kafka_security(spec);
    options.extend(extra);
    let mut env = vec![json!({"name": "SLUICE_KAFKA_BROKERS", "value": spec.bootstrap_servers})];
    let mut tls = None;
    if let Some(t) = &spec.tls {
        options.push((
            "ssl.ca.location".to_owned(),
            format!("{KAFKA_TLS_DIR}/ca.crt"),
        ));
        if t.client_auth {
            options.push((
                "ssl.certificate.location".to_owned(),
                format!("{KAFKA_TLS_DIR}/tls.crt"),
            ));
            options.push((
                "ssl.key.location".to_owned(),
                format!("{KAFKA_TLS_DIR}/tls.key"),
            ));
        }
        tls = Some((
            json!({"name": "kafka-tls", "secret": {"secretName": t.secret_name}}),
            json!({"name": "kafka-tls", "mountPath": KAFKA_TLS_DIR, "readOnly": true}),
        ));
    }
    if let Some(sasl) = &spec.sasl {
        for (var, key) in [
            ("SLUICE_KAFKA_SASL_USERNAME", "username"),
            ("SLUICE_KAFKA_SASL_PASSWORD", "password"),
        ] {
            env.push(json!({"name": var, "valueFrom": {"secretKeyRef": {"name": sasl.secret_name, "key": key}}}));
        }
    }
    if !options.is_empty() {
        let joined: Vec<String> = options.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(json!({"name": "SLUICE_KAFKA_OPTIONS", "value": joined.join(",")}));
    }
    (env, tls)
}

fn common_env(pc: &PipelineConfig, kafka_options: Vec<(String, String)>) -> Vec<Value> {
    let (primary, replica) = redis_urls(pc);
    let mut env = vec![json!({"name": "SLUICE_SETTINGS", "value": SETTINGS_PATH})];
    env.extend(kafka_client(&pc.spec.kafka, kafka_options).0);
    if let Some((secret, key)) = redis_password(pc) {
        env.push(json!({"name": "SLUICE_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}));
    }
    env.extend([
        json!({"name": "SLUICE_REDIS_URL", "value": primary}),
        json!({"name": "SLUICE_REDIS_REPLICA_URL", "value": replica}),
        json!({"name": "SLUICE_LOG_FORMAT", "value": "json"}),
    ]);
    env
}

/// The settings mount, and the Kafka TLS Secret's when there is one, of a service
/// container; the TLS volume is added to `volumes`.
fn service_mounts(pc: &PipelineConfig, volumes: &mut Vec<Value>) -> Vec<Value> {
    let mut mounts =
        vec![json!({"name": "settings", "mountPath": "/etc/sluice", "readOnly": true})];
    if let Some((volume, mount)) = kafka_client(&pc.spec.kafka, Vec::new()).1 {
        volumes.push(volume);
        mounts.push(mount);
    }
    mounts
}

fn pod_template(
    pc: &PipelineConfig,
    component: &str,
    checksum: &str,
    container: Value,
    extra_volumes: Vec<Value>,
) -> Value {
    let mut volumes = vec![json!({"name": "settings", "configMap": {"name": names::config(pc)}})];
    volumes.extend(extra_volumes);
    json!({
        "metadata": {
            "labels": labels(pc, component),
            "annotations": {CHECKSUM_ANNOTATION: checksum},
        },
        "spec": {
            "securityContext": restricted_pod(),
            "containers": [container],
            "volumes": volumes,
        },
    })
}

fn deployment(
    pc: &PipelineConfig,
    name: String,
    component: &str,
    replicas: Option<i32>,
    template: Value,
) -> Deployment {
    let mut spec = json!({
        "selector": {"matchLabels": {
            "app.kubernetes.io/instance": name_of(pc),
            "app.kubernetes.io/component": component,
        }},
        "template": template,
    });
    if let Some(r) = replicas {
        spec["replicas"] = json!(r);
    }
    let mut d: Deployment = serde_json::from_value(json!({"spec": spec})).unwrap_or_default();
    d.metadata = meta(pc, name, component);
    d
}

/// Where a pipeline's pods send their traces, when the operator was told.
fn telemetry_env(images: &Images) -> Vec<Value> {
    images
        .otlp_endpoint
        .iter()
        .map(|e| json!({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": e}))
        .collect()
}

fn ingest(
    pc: &PipelineConfig,
    images: &Images,
    checksum: &str,
) -> (Deployment, Service, HorizontalPodAutoscaler) {
    let spec = &pc.spec.ingest;
    // Health and metrics on a port of their own, which the Service leaves out.
    let mut ports = vec![
        json!({"name": "http", "containerPort": 8080}),
        json!({"name": "metrics", "containerPort": METRICS_PORT}),
    ];
    let mut service_ports =
        vec![json!({"name": "http", "port": spec.http_port, "targetPort": "http"})];
    let mut env = common_env(pc, Vec::new());
    env.extend(telemetry_env(images));
    env.push(json!({"name": "SLUICE_INGEST_LISTEN", "value": "0.0.0.0:8080"}));
    env.push(json!({"name": "SLUICE_METRICS_LISTEN", "value": format!("0.0.0.0:{METRICS_PORT}")}));
    let mut volumes = Vec::new();
    let mut mounts = service_mounts(pc, &mut volumes);
    if let Some(keys) = &spec.api_keys {
        volumes.push(json!({"name": "api-keys", "secret": {
            "secretName": keys.secret_name,
            "items": [{"key": keys.key, "path": "keys"}],
        }}));
        // A directory, not a subPath: the kubelet replaces the file when the Secret changes.
        mounts.push(json!({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": true}));
        env.push(json!({"name": "SLUICE_API_KEYS_FILE", "value": format!("{API_KEYS_DIR}/keys")}));
    }
    if let Some(tcp) = &spec.tcp {
        if tcp.dump {
            env.push(json!({"name": "SLUICE_TCP_READ_DUMP", "value": "true"}));
        }
        ports.push(json!({"name": "tcp-write", "containerPort": 2525}));
        ports.push(json!({"name": "tcp-read", "containerPort": 2526}));
        service_ports
            .push(json!({"name": "tcp-write", "port": tcp.write_port, "targetPort": "tcp-write"}));
        service_ports
            .push(json!({"name": "tcp-read", "port": tcp.read_port, "targetPort": "tcp-read"}));
        env.push(json!({"name": "SLUICE_TCP_WRITE_LISTEN", "value": "0.0.0.0:2525"}));
        env.push(json!({"name": "SLUICE_TCP_READ_LISTEN", "value": "0.0.0.0:2526"}));
        env.push(json!({"name": "SLUICE_TCP_STREAM", "value": tcp.stream}));
    }
    // Streams read from a SQL table: the database of the first such stream's collector.
    if let Some((_, sql)) = pc
        .spec
        .streams
        .iter()
        .find_map(|s| record_store(pc, &s.name))
    {
        env.push(json!({"name": "SLUICE_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": sql.secret_name, "key": "url"}}}));
    }
    let mut container = json!({
        "name": "ingest",
        "image": images.ingest,
        "env": env,
        "ports": ports,
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10},
        "securityContext": restricted_container(),
    });
    if let Some(r) = &spec.resources {
        container["resources"] = serde_json::to_value(r).unwrap_or_default();
    }
    let name = names::ingest(pc);
    let template = pod_template(pc, "ingest", checksum, container, volumes);
    // The autoscaler owns the replica count.
    let deployment = deployment(pc, name.clone(), "ingest", None, template);
    let mut service: Service = serde_json::from_value(json!({"spec": {
        "selector": {"app.kubernetes.io/instance": name_of(pc), "app.kubernetes.io/component": "ingest"},
        "ports": service_ports,
    }}))
    .unwrap_or_default();
    service.metadata = meta(pc, name.clone(), "ingest");
    let mut hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({"spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
        "minReplicas": spec.replicas.min,
        "maxReplicas": spec.replicas.max,
        "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}],
    }}))
    .unwrap_or_default();
    hpa.metadata = meta(pc, name, "ingest");
    (deployment, service, hpa)
}

/// The collector flags for its sink.
fn sink_env(c: &CollectorSpec) -> Vec<Value> {
    let mut env = Vec::new();
    let sink = &c.sink;
    if let Some(redis) = &sink.redis {
        env.push(json!({"name": "SLUICE_SINK", "value": "redis"}));
        if let Some(ttl) = &redis.ttl {
            env.push(json!({"name": "SLUICE_RECORD_TTL", "value": ttl}));
        }
    } else if sink.redis_index.is_some() {
        env.push(json!({"name": "SLUICE_SINK", "value": "redis-index"}));
    } else if let Some(file) = &sink.file {
        env.push(json!({"name": "SLUICE_SINK", "value": "file"}));
        env.push(json!({"name": "SLUICE_RECORD_DIRECTORY", "value": "/var/lib/sluice/records"}));
        env.push(json!({"name": "SLUICE_FILE_MAX_BYTES", "value": file.max_bytes.to_string()}));
        env.push(json!({"name": "SLUICE_FILE_MAX_AGE", "value": file.max_age}));
    } else if let Some((kind, sql)) = sink
        .postgres
        .as_ref()
        .map(|s| ("postgres", s))
        .or_else(|| sink.mysql.as_ref().map(|s| ("mysql", s)))
    {
        env.push(json!({"name": "SLUICE_SINK", "value": kind}));
        env.push(json!({"name": "SLUICE_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": sql.secret_name, "key": "url"}}}));
        env.push(json!({"name": "SLUICE_TABLE", "value": sql.table}));
        env.push(
            json!({"name": "SLUICE_DB_CONNECT_ATTEMPTS", "value": sql.connect_attempts.to_string()}),
        );
        env.push(json!({"name": "SLUICE_DB_CONNECT_BACKOFF", "value": sql.connect_backoff}));
    }
    env
}

fn collector(pc: &PipelineConfig, c: &CollectorSpec, images: &Images, checksum: &str) -> Workload {
    let start = match c.start_at {
        StartAt::Earliest => Vec::new(),
        StartAt::Latest => vec![("auto.offset.reset".to_owned(), "latest".to_owned())],
    };
    let mut env = common_env(pc, start);
    env.extend(telemetry_env(images));
    env.extend([
        json!({"name": "SLUICE_COLLECTOR_GROUP", "value": names::collector_group(pc, &c.name)}),
        json!({"name": "SLUICE_COLLECTOR_STREAMS", "value": c.streams.join(",")}),
        json!({"name": "SLUICE_CONCURRENT_COUNT", "value": c.concurrency.to_string()}),
        json!({"name": "SLUICE_BATCH_SIZE", "value": c.batch_size.to_string()}),
        json!({"name": "SLUICE_METRICS_LISTEN", "value": format!("0.0.0.0:{METRICS_PORT}")}),
    ]);
    env.extend(sink_env(c));
    let mut volumes = Vec::new();
    let mut mounts = service_mounts(pc, &mut volumes);
    let mut claims = None;
    if let Some(file) = &c.sink.file {
        mounts.push(json!({"name": "records", "mountPath": "/var/lib/sluice/records"}));
        match &file.claim_name {
            Some(claim) => volumes
                .push(json!({"name": "records", "persistentVolumeClaim": {"claimName": claim}})),
            None => claims = Some(vec![claim_template("records", &file.storage)]),
        }
    }
    let mut container = json!({
        "name": "collector",
        "image": images.collector,
        "env": env,
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        "volumeMounts": mounts,
        // Not ready while its sink is unavailable: the outage shows in the pipeline's
        // ready replicas and in `kubectl get pods`.
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10},
        "securityContext": restricted_container(),
    });
    if let Some(r) = &c.resources {
        container["resources"] = serde_json::to_value(r).unwrap_or_default();
    }
    let component = format!("collector-{}", c.name);
    let template = pod_template(pc, &component, checksum, container, volumes);
    // With autoscaling the HPA owns the replica count.
    let replicas = c.autoscale.is_none().then_some(c.replicas);
    let name = names::collector(pc, &c.name);
    match claims {
        Some(claims) => Workload::StatefulSet(stateful_set(
            pc, name, &component, replicas, template, claims,
        )),
        None => Workload::Deployment(deployment(pc, name, &component, replicas, template)),
    }
}

/// The most replicas that can each own a partition: the collectors' group uses the range
/// assignor, which shares out each topic's partitions on its own, so members beyond the
/// largest topic's partition count would idle.
pub fn useful_replicas(pc: &PipelineConfig, c: &CollectorSpec) -> i32 {
    pc.spec
        .streams
        .iter()
        .filter(|s| c.streams.contains(&s.name))
        .map(|s| s.topic.partitions)
        .max()
        .unwrap_or(1)
}

/// The autoscaler of a collector with `autoscale`: the external metric
/// `sluice_consumer_lag` of its group, `AverageValue` = `lagPerReplica` (so the HPA wants
/// `ceil(lag / lagPerReplica)` replicas), at most one replica per partition, scaling up at
/// once (doubling, or four more, every 15 s) and down only once the lag stayed low for the
/// stabilization window, which is what keeps it from flapping. It scales `workload`.
fn collector_hpa(
    pc: &PipelineConfig,
    c: &CollectorSpec,
    workload: &Workload,
) -> Option<HorizontalPodAutoscaler> {
    let a = c.autoscale.as_ref()?;
    let max = a.max_replicas.min(useful_replicas(pc, c)).max(1);
    // The HPA cannot go below one; scaling to zero is the operator's (see reconcile).
    let min = a.min_replicas.clamp(1, max);
    let name = names::collector(pc, &c.name);
    let mut hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({"spec": {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": workload.kind(), "name": name},
        "minReplicas": min,
        "maxReplicas": max,
        "metrics": [{"type": "External", "external": {
            "metric": {
                "name": names::LAG_METRIC,
                "selector": {"matchLabels": {"pipeline": name_of(pc), "collector": c.name}},
            },
            "target": {"type": "AverageValue", "averageValue": a.lag_per_replica.to_string()},
        }}],
        "behavior": {
            "scaleUp": {
                "stabilizationWindowSeconds": a.scale_up_stabilization_seconds,
                "selectPolicy": "Max",
                "policies": [
                    {"type": "Percent", "value": 100, "periodSeconds": 15},
                    {"type": "Pods", "value": 4, "periodSeconds": 15},
                ],
            },
            "scaleDown": {
                "stabilizationWindowSeconds": a.scale_down_stabilization_seconds,
                "selectPolicy": "Max",
                "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
            },
        },
    }}))
    .unwrap_or_default();
    hpa.metadata = meta(
        pc,
        names::collector_hpa(pc, &c.name),
        &format!("collector-{}", c.name),
    );
    Some(hpa)
}

/// Where the managed Redis keeps its data in its pod.
const REDIS_DATA: &str = "/data";

/// The persistence arguments of a managed Redis primary: an append-only file in `dir`,
/// synced as `spec.appendfsync` says, and no RDB snapshots (the append-only file is what a
/// restart loads).
pub fn redis_primary_args(spec: &RedisSpec, dir: &str) -> Vec<String> {
    [
        "--dir",
        dir,
        "--appendonly",
        "yes",
        "--appendfsync",
        spec.appendfsync.as_redis(),
        "--save",
        "",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn redis(pc: &PipelineConfig, images: &Images) -> Vec<(Workload, Service)> {
    let spec = &pc.spec.redis;
    if spec.mode != RedisMode::Managed {
        return Vec::new();
    }
    let password = redis_password(pc)
        .map(|(secret, key)| json!({"secretKeyRef": {"name": secret, "key": key}}));
    let container = |mut args: Vec<String>| {
        // The password reaches the server as an argument expanded by the kubelet, and
        // redis-cli (the readiness probe) through REDISCLI_AUTH.
        args.extend(redis_auth_args("$(REDIS_PASSWORD)"));
        json!({
            "name": "redis",
            "image": images.redis,
            "args": args,
            "env": [
                {"name": "REDIS_PASSWORD", "valueFrom": password},
                {"name": "REDISCLI_AUTH", "valueFrom": password},
            ],
            "ports": [{"name": "redis", "containerPort": 6379}],
            "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
            "volumeMounts": [{"name": "data", "mountPath": REDIS_DATA}],
            "securityContext": restricted_container(),
        })
    };
    let template = |component: &str, container: Value, volumes: Value| {
        json!({
            "metadata": {"labels": labels(pc, component)},
            "spec": {
                "securityContext": restricted_pod(),
                "containers": [container],
                "volumes": volumes,
            },
        })
    };
    let service = |name: String, component: &str| {
        let mut s: Service = serde_json::from_value(json!({"spec": {
            "selector": {"app.kubernetes.io/instance": name_of(pc), "app.kubernetes.io/component": component},
            "ports": [{"name": "redis", "port": 6379, "targetPort": "redis"}],
        }}))
        .unwrap_or_default();
        s.metadata = meta(pc, name, component);
        s
    };
    // The primary keeps its append-only file on a claim: a restarted primary loads every
    // write it answered, so its replicas resync to that and never to an empty store.
    let primary = stateful_set(
        pc,
        names::redis(pc),
        "redis",
        Some(1),
        template(
            "redis",
            container(redis_primary_args(spec, REDIS_DATA)),
            json!([]),
        ),
        vec![claim_template("data", &spec.storage)],
    );
    let mut out = vec![(
        Workload::StatefulSet(primary),
        service(names::redis(pc), "redis"),
    )];
    if spec.replicas > 0 {
        // Read replicas hold a copy of the primary and load it from there when they start.
        let args = [
            "--save",
            "",
            "--appendonly",
            "no",
            "--replicaof",
            &names::redis(pc),
            "6379",
        ]
        .map(str::to_owned)
        .to_vec();
        let replicas = deployment(
            pc,
            names::redis_replica(pc),
            "redis-replica",
            Some(spec.replicas),
            template(
                "redis-replica",
                container(args),
                json!([{"name": "data", "emptyDir": {}}]),
            ),
        );
        out.push((
            Workload::Deployment(replicas),
            service(names::redis_replica(pc), "redis-replica"),
        ));
    }
    out
}

/// The port of `url` (`scheme://[user@]host[:port]/...`), else `default`.
fn url_port(url: &str, default: u16) -> u16 {
    url.parse::<http::Uri>()
        .ok()
        .and_then(|u| u.port_u16())
        .unwrap_or(default)
}

/// The ports of a comma-separated `host:port` list (9092 where a port is missing).
fn broker_ports(bootstrap_servers: &str) -> Vec<u16> {
    let mut ports: Vec<u16> = bootstrap_servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.rsplit_once(':')
                .filter(|(host, _)| !host.ends_with(':'))
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(9092)
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn tcp_ports(ports: impl IntoIterator<Item = u16>) -> Vec<Value> {
    ports
        .into_iter()
        .map(|p| json!({"port": p, "protocol": "TCP"}))
        .collect()
}

/// A selector of the pipeline's pods of `components` (every pod of it when empty).
fn pods_of(pc: &PipelineConfig, components: &[String]) -> Value {
    let mut selector = json!({"matchLabels": {"app.kubernetes.io/instance": name_of(pc)}});
    if !components.is_empty() {
        selector["matchExpressions"] = json!([{
            "key": "app.kubernetes.io/component",
            "operator": "In",
            "values": components,
        }]);
    }
    selector
}

/// The managed Redis's components.
fn redis_components() -> Vec<String> {
    vec!["redis".to_owned(), "redis-replica".to_owned()]
}

/// Egress to DNS servers.
fn dns_rule() -> Value {
    json!({"ports": [
        {"port": 53, "protocol": "UDP"},
        {"port": 53, "protocol": "TCP"},
    ]})
}

/// Where ingest and collectors may connect: DNS, Kafka, Redis, their SQL databases, the
/// OTLP endpoint and the spec's `extraEgress`.
fn service_egress(pc: &PipelineConfig, images: &Images) -> Vec<Value> {
    let mut rules = vec![dns_rule()];
    rules.push(json!({"ports": tcp_ports(broker_ports(&pc.spec.kafka.bootstrap_servers))}));
    let redis = &pc.spec.redis;
    match redis.mode {
        RedisMode::Managed => rules.push(json!({
            "to": [{"podSelector": pods_of(pc, &redis_components())}],
            "ports": tcp_ports([6379]),
        })),
        RedisMode::External => {
            let mut ports: Vec<u16> = redis
                .url
                .iter()
                .chain(&redis.replica_url)
                .map(|u| url_port(u, 6379))
                .collect();
            ports.sort_unstable();
            ports.dedup();
            rules.push(json!({"ports": tcp_ports(ports)}));
        }
    }
    let sinks = &pc.spec.collectors;
    let mut sql = Vec::new();
    if sinks.iter().any(|c| c.sink.postgres.is_some()) {
        sql.push(5432);
    }
    if sinks.iter().any(|c| c.sink.mysql.is_some()) {
        sql.push(3306);
    }
    if !sql.is_empty() {
        rules.push(json!({"ports": tcp_ports(sql)}));
    }
    if let Some(endpoint) = &images.otlp_endpoint {
        let default = if endpoint.starts_with("https://") {
            443
        } else {
            80
        };
        rules.push(json!({"ports": tcp_ports([url_port(endpoint, default)])}));
    }
    rules.extend(
        pc.spec
            .network_policy
            .extra_egress
            .iter()
            .map(|r| serde_json::to_value(r).unwrap_or_default()),
    );
    rules
}

/// An ingress rule for `ports` (named container ports) from `from` (any source when
/// empty).
fn ingress_rule(
    ports: &[&str],
    from: &[k8s_openapi::api::networking::v1::NetworkPolicyPeer],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"port": p, "protocol": "TCP"}))
        .collect();
    let mut rule = json!({"ports": ports});
    if !from.is_empty() {
        rule["from"] = serde_json::to_value(from).unwrap_or_default();
    }
    rule
}

/// The NetworkPolicies of the pipeline (see [`crate::crd::NetworkPolicySpec`]): ingest
/// admits its doors and the scraper; collectors admit only the scraper; the managed Redis
/// admits only the pipeline's own pods and reaches only its primary. Kubelet probes are not
/// subject to NetworkPolicies.
pub fn network_policies(pc: &PipelineConfig, images: &Images) -> Vec<NetworkPolicy> {
    let spec = &pc.spec.network_policy;
    if !spec.enabled {
        return Vec::new();
    }
    let policy = |component: &str, selector: Value, ingress: Vec<Value>, egress: Vec<Value>| {
        let mut p: NetworkPolicy = serde_json::from_value(json!({"spec": {
            "podSelector": selector,
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        }}))
        .unwrap_or_default();
        p.metadata = meta(pc, names::network_policy(pc, component), component);
        p
    };
    let metrics = ingress_rule(&["metrics"], &spec.metrics_from);
    let egress = service_egress(pc, images);
    let mut doors = vec!["http"];
    if pc.spec.ingest.tcp.is_some() {
        doors.extend(["tcp-write", "tcp-read"]);
    }
    let mut out = vec![policy(
        "ingest",
        pods_of(pc, &["ingest".to_owned()]),
        vec![ingress_rule(&doors, &spec.ingest_from), metrics.clone()],
        egress.clone(),
    )];
    if !pc.spec.collectors.is_empty() {
        let components: Vec<String> = pc
            .spec
            .collectors
            .iter()
            .map(|c| format!("collector-{}", c.name))
            .collect();
        out.push(policy(
            "collectors",
            pods_of(pc, &components),
            vec![metrics],
            egress,
        ));
    }
    if pc.spec.redis.mode == RedisMode::Managed {
        let own = json!([{"podSelector": pods_of(pc, &[])}]);
        out.push(policy(
            "redis",
            pods_of(pc, &redis_components()),
            vec![json!({"from": own, "ports": tcp_ports([6379])})],
            vec![
                dns_rule(),
                json!({"to": [{"podSelector": pods_of(pc, &["redis".to_owned()])}], "ports": tcp_ports([6379])}),
            ],
        ));
    }
    out
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
    let (ingest, ingest_service, ingest_hpa) = ingest(pc, images, &sum);
    let collectors: Vec<Workload> = pc
        .spec
        .collectors
        .iter()
        .map(|c| collector(pc, c, images, &sum))
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
            .filter_map(|(c, w)| collector_hpa(pc, c, w))
            .collect(),
        collectors,
        redis: redis(pc, images),
        redis_auth: generated_redis_secret(pc),
        network_policies: network_policies(pc, images),
    }
}

/// What to do with one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicAction {
    /// Create it.
    Create {
        /// Topic.
        name: String,
        /// Partitions.
        partitions: i32,
        /// Replication factor.
        replication_factor: i32,
        /// Topic configuration.
        config: BTreeMap<String, String>,
    },
    /// Add partitions.
    Grow {
        /// Topic.
        name: String,
        /// Partitions now.
        from: i32,
        /// Partitions wanted.
        to: i32,
    },
    /// It exists as wanted (adopted when it was made by someone else).
    Keep {
        /// Topic.
        name: String,
        /// Partitions.
        partitions: i32,
    },
    /// It exists, was not created by the operator for this resource and is not named in
    /// the spec: left alone.
    NotOurs {
        /// Topic.
        name: String,
        /// Why, in words, and what to do.
        reason: String,
    },
    /// The change asked for cannot be made.
    NotSupported {
        /// Topic.
        name: String,
        /// Why, in words.
        reason: String,
    },
}

/// A topic as observed in Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedTopic {
    /// Partitions.
    pub partitions: i32,
    /// Replication factor (of partition 0).
    pub replication_factor: i32,
}

/// The replication factor of a stream's topics: the spec's, else 3, or the number of
/// brokers when the cluster has fewer.
pub fn replication_factor(spec: &crate::crd::TopicSpec, brokers: i32) -> i32 {
    spec.replication_factor
        .unwrap_or_else(|| brokers.clamp(1, 3))
}

/// `config` with `min.insync.replicas: 2` added for 3 or more replicas, unless it is set.
fn in_sync(
    mut config: BTreeMap<String, String>,
    replication_factor: i32,
) -> BTreeMap<String, String> {
    if replication_factor >= 3 && !config.contains_key("min.insync.replicas") {
        config.insert("min.insync.replicas".to_owned(), "2".to_owned());
    }
    config
}

/// What to do with every topic of the resource: the streams' topics and their retry,
/// dead-letter and read topics. `observed` maps topic names to what exists; `brokers` is
/// the size of the cluster; `created` lists the topics the operator created for this
/// resource. Topics made with 3 or more replicas get `min.insync.replicas: 2` unless the
/// spec's config sets it. An existing topic the operator did not create is used only when
/// the stream names it in `topic.name`; otherwise it is left alone and reported.
pub fn topics(
    pc: &PipelineConfig,
    observed: &BTreeMap<String, ObservedTopic>,
    brokers: i32,
    created: &std::collections::BTreeSet<String>,
) -> Vec<TopicAction> {
    let mut out = Vec::new();
    for (s, names) in pc.spec.streams.iter().zip(settings(pc).streams) {
        let replication_factor = replication_factor(&s.topic, brokers);
        let wanted = [
            (
                names.topic().to_owned(),
                in_sync(s.topic.config.clone(), replication_factor),
            ),
            (
                names.retry_topic(),
                in_sync(BTreeMap::new(), replication_factor),
            ),
            (
                names.dead_letter_topic(),
                in_sync(BTreeMap::new(), replication_factor),
            ),
            (
                names.read_topic(),
                in_sync(BTreeMap::new(), replication_factor),
            ),
        ];
        let adopt = s.topic.name.is_some();
        for (name, config) in wanted {
            let partitions = s.topic.partitions;
            out.push(match observed.get(&name) {
                Some(_) if !adopt && !created.contains(&name) => TopicAction::NotOurs {
                    reason: format!(
                        "topic {name} exists and was not created for this pipeline; to use it, name it in streams[{}].topic.name, else rename the pipeline or delete the topic",
                        s.name
                    ),
                    name,
                },
                None => TopicAction::Create {
                    name,
                    partitions,
                    replication_factor,
                    config,
                },
                Some(o) if o.partitions > partitions => TopicAction::NotSupported {
                    reason: format!(
                        "topic {name} has {} partitions and the spec asks for {partitions}; Kafka cannot remove partitions, so keep {} or more",
                        o.partitions, o.partitions
                    ),
                    name,
                },
                Some(o)
                    if s.topic.replication_factor.is_some()
                        && o.replication_factor != replication_factor =>
                {
                    TopicAction::NotSupported {
                    reason: format!(
                        "topic {name} has replication factor {} and the spec asks for {replication_factor}; the operator does not change it",
                        o.replication_factor
                    ),
                    name,
                }
                }
                Some(o) if o.partitions < partitions => TopicAction::Grow {
                    name,
                    from: o.partitions,
                    to: partitions,
                },
                Some(o) => TopicAction::Keep {
                    name,
                    partitions: o.partitions,
                },
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn pc(yaml: &str) -> PipelineConfig {
        let mut pc: PipelineConfig = serde_yaml_ng::from_str(yaml).expect("resource");
        pc.metadata.uid = Some("0b1c".to_owned());
        pc
    }

    const BASIC: &str = "
apiVersion: sluice.dev/v1alpha1
kind: PipelineConfig
metadata: {name: shop, namespace: prod}
spec:
  kafka: {bootstrapServers: 'kafka:9092'}
  streams:
    - {name: visit, topic: {partitions: 6, config: {retention.ms: '1000'}}, key: /userId, dimensions: [/type]}
    - {name: messages, key: /touser}
  ingest: {replicas: {min: 2, max: 5}, tcp: {writePort: 2525, readPort: 2526, stream: visit}}
  collectors:
    - {name: to-redis, streams: [visit], sink: {redis: {ttl: 24h}}, autoscale: {minReplicas: 1, maxReplicas: 6, lagPerReplica: 1000}}
    - {name: chat, streams: [messages], sink: {redisIndex: {}}, replicas: 2}
    - {name: archive, streams: [visit], sink: {file: {claimName: records}}}
    - {name: db, streams: [visit], sink: {postgres: {secretName: pg}}}
  retry: {maxAttempts: 3, backoff: 2s}
  aggregates: {minuteRetention: 2h}
";

    fn env_of(d: &impl serde::Serialize) -> BTreeMap<String, Value> {
        let v = serde_json::to_value(d).expect("json");
        v["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env")
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().expect("name").to_owned(),
                    e.get("value")
                        .cloned()
                        .unwrap_or_else(|| e["valueFrom"].clone()),
                )
            })
            .collect()
    }

    #[test]
    fn a_managed_redis_requires_a_generated_password_that_every_pod_sends() {
        let c = children(&pc(BASIC), &Images::default());
        assert_eq!(c.redis_auth.as_deref(), Some("shop-redis-auth"));
        let from_secret = json!({"secretKeyRef": {"name": "shop-redis-auth", "key": "password"}});
        assert_eq!(env_of(&c.ingest)["SLUICE_REDIS_PASSWORD"], from_secret);
        for w in &c.collectors {
            assert_eq!(env_of(w)["SLUICE_REDIS_PASSWORD"], from_secret);
        }
        // The URLs carry no password: it stays out of logs.
        assert_eq!(
            env_of(&c.ingest)["SLUICE_REDIS_URL"],
            "redis://shop-redis:6379"
        );
        for (w, _) in &c.redis {
            let v = serde_json::to_value(w).expect("json");
            let container = &v["spec"]["template"]["spec"]["containers"][0];
            let args: Vec<&str> = container["args"]
                .as_array()
                .expect("args")
                .iter()
                .map(|a| a.as_str().expect("text"))
                .collect();
            let requires = args
                .windows(2)
                .any(|w| w == ["--requirepass", "$(REDIS_PASSWORD)"]);
            let sends = args
                .windows(2)
                .any(|w| w == ["--masterauth", "$(REDIS_PASSWORD)"]);
            assert!(requires && sends, "{args:?}");
            assert_eq!(env_of(w)["REDIS_PASSWORD"], from_secret);
            // The readiness probe's redis-cli authenticates from REDISCLI_AUTH.
            assert_eq!(env_of(w)["REDISCLI_AUTH"], from_secret);
        }
        let secret = serde_json::to_value(redis_auth_secret(&pc(BASIC), "pw")).expect("json");
        assert_eq!(secret["metadata"]["name"], "shop-redis-auth");
        assert_eq!(secret["stringData"]["password"], "pw");
        assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "0b1c");

        // A Secret the spec names is used as it is, and none is generated.
        let named = pc(&BASIC.replace(
            "  kafka: {bootstrapServers: 'kafka:9092'}",
            "  kafka: {bootstrapServers: 'kafka:9092'}\n  redis: {passwordSecret: {name: mine, key: pass}}",
        ));
        let c = children(&named, &Images::default());
        assert_eq!(c.redis_auth, None);
        let mine = json!({"secretKeyRef": {"name": "mine", "key": "pass"}});
        assert_eq!(env_of(&c.ingest)["SLUICE_REDIS_PASSWORD"], mine);
        assert_eq!(env_of(&c.redis[0].0)["REDIS_PASSWORD"], mine);

        // External: a password only when the spec names its Secret.
        let external = |extra: &str| {
            pc(&BASIC.replace(
                "  kafka: {bootstrapServers: 'kafka:9092'}",
                &format!("  kafka: {{bootstrapServers: 'kafka:9092'}}\n  redis: {{mode: External, url: 'redis://r:6379'{extra}}}"),
            ))
        };
        let c = children(&external(""), &Images::default());
        assert_eq!(c.redis_auth, None);
        assert!(!env_of(&c.ingest).contains_key("SLUICE_REDIS_PASSWORD"));
        let c = children(
            &external(", passwordSecret: {name: ext}"),
            &Images::default(),
        );
        assert_eq!(
            env_of(&c.ingest)["SLUICE_REDIS_PASSWORD"],
            json!({"secretKeyRef": {"name": "ext", "key": "password"}})
        );
    }

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

    fn policy(c: &Children, name: &str) -> Value {
        let p = c
            .network_policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no NetworkPolicy {name}"));
        serde_json::to_value(p).expect("json")
    }

    fn ports_of(rule: &Value) -> Vec<Value> {
        rule["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| p["port"].clone())
            .collect()
    }

    #[test]
    fn every_pipeline_gets_network_policies_that_admit_only_what_it_uses() {
        let images = Images {
            otlp_endpoint: Some("http://otel.observability:4318/".to_owned()),
            ..Images::default()
        };
        let multi = pc(&BASIC.replace("'kafka:9092'", "'k-0.kafka:9092, k-1.kafka:9094,k-2'"));
        let c = children(&multi, &images);
        assert_eq!(c.network_policies.len(), 3);

        let ingest = policy(&c, "shop-ingest");
        assert_eq!(ingest["metadata"]["ownerReferences"][0]["uid"], "0b1c");
        let spec = &ingest["spec"];
        assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(
            spec["podSelector"]["matchExpressions"][0]["values"],
            json!(["ingest"])
        );
        // The doors from anywhere, the metrics port on its own rule.
        assert_eq!(
            ports_of(&spec["ingress"][0]),
            [json!("http"), json!("tcp-write"), json!("tcp-read")]
        );
        assert!(spec["ingress"][0].get("from").is_none());
        assert_eq!(ports_of(&spec["ingress"][1]), [json!("metrics")]);
        let egress = spec["egress"].as_array().expect("egress");
        assert_eq!(ports_of(&egress[0]), [json!(53), json!(53)], "DNS");
        assert_eq!(
            ports_of(&egress[1]),
            [json!(9092), json!(9094)],
            "every broker port"
        );
        assert_eq!(ports_of(&egress[2]), [json!(6379)]);
        assert_eq!(
            egress[2]["to"][0]["podSelector"]["matchExpressions"][0]["values"],
            json!(["redis", "redis-replica"]),
            "Redis only in the pipeline's own Redis pods"
        );
        assert_eq!(ports_of(&egress[3]), [json!(5432)], "the PostgreSQL sink");
        assert_eq!(ports_of(&egress[4]), [json!(4318)], "the OTLP endpoint");
        assert_eq!(egress.len(), 5);

        let collectors = policy(&c, "shop-collectors");
        let spec = &collectors["spec"];
        assert_eq!(
            spec["podSelector"]["matchExpressions"][0]["values"],
            json!([
                "collector-to-redis",
                "collector-chat",
                "collector-archive",
                "collector-db"
            ])
        );
        assert_eq!(spec["ingress"].as_array().expect("rules").len(), 1);
        assert_eq!(ports_of(&spec["ingress"][0]), [json!("metrics")]);
        assert_eq!(spec["egress"], ingest["spec"]["egress"]);

        let redis = policy(&c, "shop-redis");
        let spec = &redis["spec"];
        assert_eq!(ports_of(&spec["ingress"][0]), [json!(6379)]);
        assert_eq!(
            spec["ingress"][0]["from"],
            json!([{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "shop"}}}]),
            "only the pipeline's own pods"
        );
        assert_eq!(
            spec["egress"][1]["to"][0]["podSelector"]["matchExpressions"][0]["values"],
            json!(["redis"]),
            "replicas reach their primary"
        );
    }

    #[test]
    fn network_policies_follow_the_spec() {
        let custom = pc(&BASIC.replace(
            "  kafka: {bootstrapServers: 'kafka:9092'}",
            "  kafka: {bootstrapServers: 'kafka:9092'}
  redis: {mode: External, url: 'redis://:pw@r.data:6380/1', replicaUrl: 'redis://r2.data'}
  networkPolicy:
    ingestFrom: [{namespaceSelector: {matchLabels: {edge: 'true'}}}]
    metricsFrom: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]
    extraEgress: [{ports: [{port: 15432, protocol: TCP}]}]",
        ));
        let c = children(&custom, &Images::default());
        assert!(
            c.network_policies
                .iter()
                .all(|p| p.metadata.name.as_deref() != Some("shop-redis")),
            "no policy for a Redis it does not run"
        );
        let ingest = policy(&c, "shop-ingest");
        assert_eq!(
            ingest["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["edge"],
            "true"
        );
        assert_eq!(
            ingest["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "monitoring"
        );
        let egress = ingest["spec"]["egress"].as_array().expect("egress");
        assert_eq!(
            ports_of(&egress[2]),
            [json!(6379), json!(6380)],
            "the external Redis ports"
        );
        assert!(egress[2].get("to").is_none());
        assert_eq!(ports_of(egress.last().expect("extra")), [json!(15432)]);

        let off = pc(&BASIC.replace(
            "  kafka: {bootstrapServers: 'kafka:9092'}",
            "  kafka: {bootstrapServers: 'kafka:9092'}\n  networkPolicy: {enabled: false}",
        ));
        assert!(
            children(&off, &Images::default())
                .network_policies
                .is_empty()
        );
    }

    #[test]
    fn ports_are_read_from_urls_and_broker_lists() {
        assert_eq!(url_port("http://otel:4318/v1", 80), 4318);
        assert_eq!(url_port("https://otel.example", 443), 443);
        assert_eq!(url_port("redis://:p@r:6390/0", 6379), 6390);
        assert_eq!(url_port("not a url", 6379), 6379);
        assert_eq!(broker_ports("a:9093,b:9093, c"), [9092, 9093]);
        assert_eq!(broker_ports("[::1]:19092"), [19092]);
    }

    #[test]
    fn pipeline_pods_export_traces_only_when_told_where() {
        let plain = children(&pc(BASIC), &Images::default());
        assert!(!env_of(&plain.ingest).contains_key("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let images = Images {
            otlp_endpoint: Some("http://otel.observability:4318".to_owned()),
            ..Images::default()
        };
        let traced = children(&pc(BASIC), &images);
        assert_eq!(
            env_of(&traced.ingest)["OTEL_EXPORTER_OTLP_ENDPOINT"],
            "http://otel.observability:4318"
        );
        for w in &traced.collectors {
            assert_eq!(
                env_of(w)["OTEL_EXPORTER_OTLP_ENDPOINT"],
                "http://otel.observability:4318",
                "{}",
                w.name()
            );
        }
    }

    #[test]
    fn settings_are_the_services_file_format() {
        let s = settings(&pc(BASIC));
        let text = s.to_yaml();
        let back = PipelineSettings::from_yaml(&text).expect("the services accept it");
        assert_eq!(back.streams[0].partitions, 6);
        assert_eq!(back.streams[0].key.as_deref(), Some("/userId"));
        assert_eq!(back.streams[0].dimensions, ["/type"]);
        assert_eq!(
            back.streams[0].ack_by,
            ["prod.shop.to-redis", "prod.shop.archive", "prod.shop.db"],
            "ack=sink waits for every collector of the stream, by group"
        );
        assert_eq!(back.streams[1].ack_by, ["prod.shop.chat"]);
        assert_eq!(back.retry.max_attempts, 3);
        assert_eq!(back.retry.backoff, "2s");
        assert_eq!(back.aggregates.minute_ttl().as_secs(), 7200);
        assert_eq!(back.aggregates.hour_retention, "2160h", "the default");
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
    fn a_stream_without_a_redis_collector_is_read_from_its_sql_table() {
        let store = pc(&BASIC.replace(
            "    - {name: messages, key: /touser}",
            "    - {name: messages, key: /touser}\n    - {name: records}",
        )
        .replace(
            "    - {name: db, streams: [visit], sink: {postgres: {secretName: pg}}}",
            "    - {name: db, streams: [visit], sink: {postgres: {secretName: pg}}}\n    - {name: kv, streams: [records], sink: {mysql: {secretName: my, table: kv_records}}}",
        ));
        let s = settings(&store);
        assert_eq!(s.streams[0].store, None, "visit has a Redis collector");
        assert_eq!(
            s.streams[2].store,
            Some(RecordStore {
                kind: StoreKind::Mysql,
                table: "kv_records".to_owned()
            })
        );
        let c = children(&store, &Images::default());
        assert_eq!(
            env_of(&c.ingest)["SLUICE_DATABASE_URL"]["secretKeyRef"],
            json!({"name": "my", "key": "url"})
        );
        let plain = children(&pc(BASIC), &Images::default());
        assert!(!env_of(&plain.ingest).contains_key("SLUICE_DATABASE_URL"));
    }

    #[test]
    fn ingest_gets_its_ports_probes_service_and_cpu_autoscaler() {
        let c = children(&pc(BASIC), &Images::default());
        let env = env_of(&c.ingest);
        assert_eq!(env["SLUICE_KAFKA_BROKERS"], "kafka:9092");
        assert_eq!(env["SLUICE_SETTINGS"], SETTINGS_PATH);
        assert_eq!(env["SLUICE_REDIS_URL"], "redis://shop-redis:6379");
        assert_eq!(
            env["SLUICE_REDIS_REPLICA_URL"],
            "redis://shop-redis-replica:6379"
        );
        assert_eq!(env["SLUICE_TCP_STREAM"], "visit");
        assert!(
            c.ingest.spec.as_ref().expect("spec").replicas.is_none(),
            "the HPA owns replicas"
        );
        let ports: Vec<i32> = c
            .ingest_service
            .spec
            .as_ref()
            .expect("spec")
            .ports
            .as_ref()
            .expect("ports")
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [8080, 2525, 2526]);
        let hpa = &c.ingest_hpa.spec;
        assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 5));
        assert_eq!(hpa.scale_target_ref.name, "shop-ingest");
        let v = serde_json::to_value(&c.ingest).expect("json");
        let container = &v["spec"]["template"]["spec"]["containers"][0];
        // Probes and scrapes on the metrics port, which the Service does not expose.
        assert_eq!(
            container["readinessProbe"]["httpGet"],
            json!({"path": "/readyz", "port": "metrics"})
        );
        assert_eq!(
            container["livenessProbe"]["httpGet"],
            json!({"path": "/healthz", "port": "metrics"})
        );
        assert_eq!(
            container["ports"],
            json!([
                {"name": "http", "containerPort": 8080},
                {"name": "metrics", "containerPort": 9464},
                {"name": "tcp-write", "containerPort": 2525},
                {"name": "tcp-read", "containerPort": 2526},
            ])
        );
        assert_eq!(env["SLUICE_METRICS_LISTEN"], "0.0.0.0:9464");
        // Every door open and no dump unless the spec says so.
        assert!(!env.contains_key("SLUICE_API_KEYS_FILE"));
        assert!(!env.contains_key("SLUICE_TCP_READ_DUMP"));
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        assert_eq!(
            v["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
    }

    #[test]
    fn api_keys_come_from_the_named_secret_as_a_file_the_kubelet_keeps_current() {
        let yaml = BASIC.replace(
            "stream: visit}}",
            "stream: visit, dump: true}, apiKeys: {secretName: shop-keys}}",
        );
        let c = children(&pc(&yaml), &Images::default());
        let env = env_of(&c.ingest);
        assert_eq!(env["SLUICE_API_KEYS_FILE"], "/var/run/sluice/api-keys/keys");
        assert_eq!(env["SLUICE_TCP_READ_DUMP"], "true");
        let v = serde_json::to_value(&c.ingest).expect("json");
        let pod = &v["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "api-keys")
            .expect("api-keys volume");
        assert_eq!(
            volume["secret"],
            json!({"secretName": "shop-keys", "items": [{"key": "keys", "path": "keys"}]})
        );
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["name"] == "api-keys")
            .expect("api-keys mount");
        assert_eq!(mount["mountPath"], API_KEYS_DIR);
        assert!(mount.get("subPath").is_none(), "a subPath is never updated");
        // Another key of the Secret.
        let other = yaml.replace(
            "{secretName: shop-keys}",
            "{secretName: shop-keys, key: api}",
        );
        let c = children(&pc(&other), &Images::default());
        let v = serde_json::to_value(&c.ingest).expect("json");
        let items = v["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "api-keys")
            .expect("volume")["secret"]["items"]
            .clone();
        assert_eq!(items, json!([{"key": "api", "path": "keys"}]));
    }

    #[test]
    fn a_mysql_sink_gets_its_database_from_the_secret() {
        let yaml = BASIC.replace(
            "sink: {postgres: {secretName: pg}}",
            "sink: {mysql: {secretName: my, table: points, connectAttempts: 20}}",
        );
        let c = children(&pc(&yaml), &Images::default());
        let env = env_of(&c.collectors[3]);
        assert_eq!(env["SLUICE_SINK"], "mysql");
        assert_eq!(
            env["SLUICE_DATABASE_URL"],
            json!({"secretKeyRef": {"name": "my", "key": "url"}})
        );
        assert_eq!(env["SLUICE_TABLE"], "points");
        assert_eq!(env["SLUICE_DB_CONNECT_ATTEMPTS"], "20");
    }

    #[test]
    fn each_collector_gets_its_sink_group_and_replicas() {
        let c = children(&pc(BASIC), &Images::default());
        let names: Vec<String> = c.collectors.iter().map(Workload::name).collect();
        assert_eq!(
            names,
            [
                "shop-collector-to-redis",
                "shop-collector-chat",
                "shop-collector-archive",
                "shop-collector-db"
            ]
        );
        let env: Vec<BTreeMap<String, Value>> = c.collectors.iter().map(env_of).collect();
        assert_eq!(env[0]["SLUICE_SINK"], "redis");
        assert_eq!(env[0]["SLUICE_RECORD_TTL"], "24h");
        assert_eq!(env[0]["SLUICE_COLLECTOR_GROUP"], "prod.shop.to-redis");
        assert_eq!(env[0]["SLUICE_COLLECTOR_STREAMS"], "visit");
        assert_eq!(env[1]["SLUICE_SINK"], "redis-index");
        assert_eq!(env[2]["SLUICE_SINK"], "file");
        assert_eq!(env[3]["SLUICE_SINK"], "postgres");
        assert_eq!(
            env[3]["SLUICE_DATABASE_URL"],
            json!({"secretKeyRef": {"name": "pg", "key": "url"}})
        );
        let replicas: Vec<Option<i32>> = c.collectors.iter().map(Workload::replicas).collect();
        assert_eq!(
            replicas,
            [None, Some(2), Some(1), Some(1)],
            "autoscaled collectors leave replicas to the HPA"
        );
        let archive = serde_json::to_value(&c.collectors[2]).expect("json");
        assert_eq!(
            archive["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"],
            "records"
        );
        let container = &archive["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["readinessProbe"]["httpGet"],
            json!({"path": "/readyz", "port": "metrics"}),
            "not ready while the sink is unavailable"
        );
    }

    #[test]
    fn a_file_collector_without_a_claim_gets_one_per_replica_that_outlives_its_pods() {
        let resource = pc(&BASIC.replace(
            "sink: {file: {claimName: records}}}",
            "sink: {file: {storage: {size: 5Gi, storageClassName: fast}}}, autoscale: {maxReplicas: 6, lagPerReplica: 1000}}",
        ));
        let c = children(&resource, &Images::default());
        let archive = &c.collectors[2];
        assert_eq!(archive.kind(), "StatefulSet");
        let v = serde_json::to_value(archive).expect("json");
        let claim = &v["spec"]["volumeClaimTemplates"][0];
        assert_eq!(claim["metadata"], json!({"name": "records"}));
        assert_eq!(
            claim["spec"],
            json!({
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "5Gi"}},
                "storageClassName": "fast",
            })
        );
        assert_eq!(
            v["spec"]["persistentVolumeClaimRetentionPolicy"],
            json!({"whenScaled": "Retain", "whenDeleted": "Retain"}),
            "files stay when the collector scales down or is deleted"
        );
        assert_eq!(v["spec"]["podManagementPolicy"], "Parallel");
        let pod = &v["spec"]["template"]["spec"];
        assert!(
            !pod["volumes"]
                .as_array()
                .expect("volumes")
                .iter()
                .any(|v| v["name"] == "records"),
            "the claim template is the volume: {pod}"
        );
        assert_eq!(
            pod["containers"][0]["volumeMounts"][1],
            json!({"name": "records", "mountPath": "/var/lib/sluice/records"})
        );
        assert!(v["spec"].get("replicas").is_none(), "the HPA owns replicas");
        let hpa = c
            .collector_hpas
            .iter()
            .find(|h| h.metadata.name.as_deref() == Some("shop-collector-archive"))
            .expect("an autoscaler");
        assert_eq!(hpa.spec.scale_target_ref.kind, "StatefulSet");
        assert_eq!(hpa.spec.scale_target_ref.name, "shop-collector-archive");
    }

    #[test]
    fn managed_redis_has_a_primary_and_replicas_and_external_has_none() {
        let c = children(&pc(BASIC), &Images::default());
        assert_eq!(c.redis.len(), 2);
        // The primary keeps an append-only file, synced before each answer, on a claim.
        let primary = &c.redis[0].0;
        assert_eq!(primary.kind(), "StatefulSet");
        let v = serde_json::to_value(primary).expect("json");
        assert_eq!(v["spec"]["replicas"], 1);
        assert_eq!(
            v["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
            "1Gi"
        );
        let container = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["args"],
            json!([
                "--dir",
                "/data",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--requirepass",
                "$(REDIS_PASSWORD)",
                "--masterauth",
                "$(REDIS_PASSWORD)"
            ])
        );
        assert_eq!(
            container["volumeMounts"],
            json!([{"name": "data", "mountPath": "/data"}])
        );
        let relaxed = pc(&BASIC.replace(
            "  kafka: {bootstrapServers: 'kafka:9092'}",
            "  kafka: {bootstrapServers: 'kafka:9092'}\n  redis: {appendfsync: EverySec}",
        ));
        let args = serde_json::to_value(&children(&relaxed, &Images::default()).redis[0].0)
            .expect("json")["spec"]["template"]["spec"]["containers"][0]["args"]
            .clone();
        assert_eq!(args[5], "everysec");
        let replica = serde_json::to_value(&c.redis[1].0).expect("json");
        let args = &replica["spec"]["template"]["spec"]["containers"][0]["args"];
        assert!(
            args.as_array()
                .expect("args")
                .windows(3)
                .any(|w| w == [json!("--replicaof"), json!("shop-redis"), json!("6379")]),
            "{args}"
        );
        assert_eq!(replica["spec"]["replicas"], 1);
        let external = pc(&BASIC.replace("  kafka: {bootstrapServers: 'kafka:9092'}", "  kafka: {bootstrapServers: 'kafka:9092'}\n  redis: {mode: External, url: 'redis://r:6379'}"));
        let c = children(&external, &Images::default());
        assert!(c.redis.is_empty());
        assert_eq!(env_of(&c.ingest)["SLUICE_REDIS_URL"], "redis://r:6379");
        assert_eq!(
            env_of(&c.ingest)["SLUICE_REDIS_REPLICA_URL"],
            "redis://r:6379"
        );
    }

    #[test]
    fn topics_are_created_grown_kept_or_refused() {
        let resource = pc(BASIC);
        let none = BTreeMap::new();
        let mine = BTreeSet::new();
        let plan = topics(&resource, &none, 1, &mine);
        assert_eq!(
            plan.len(),
            8,
            "topic, retry, dlq and reads for each of two streams"
        );
        assert_eq!(
            plan[0],
            TopicAction::Create {
                name: "prod.shop.visit".into(),
                partitions: 6,
                replication_factor: 1,
                config: BTreeMap::from([("retention.ms".to_owned(), "1000".to_owned())]),
            }
        );
        let names: Vec<&str> = plan
            .iter()
            .map(|a| match a {
                TopicAction::Create { name, .. } => name.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names[1..4],
            [
                "prod.shop.visit.retry",
                "prod.shop.visit.dlq",
                "prod.shop.visit.reads"
            ]
        );
        // Unset, the replication is 3 where the cluster has the brokers, with two in sync.
        let planned = topics(&resource, &none, 5, &mine);
        let TopicAction::Create {
            replication_factor,
            config,
            ..
        } = &planned[1]
        else {
            panic!("a topic to create: {:?}", planned[1])
        };
        assert_eq!(*replication_factor, 3);
        assert_eq!(config["min.insync.replicas"], "2");
        let seen = |p: i32, rf: i32| ObservedTopic {
            partitions: p,
            replication_factor: rf,
        };
        let observed = BTreeMap::from([
            ("prod.shop.visit".to_owned(), seen(3, 1)),
            ("prod.shop.visit.retry".to_owned(), seen(6, 1)),
            ("prod.shop.visit.dlq".to_owned(), seen(8, 1)),
            ("prod.shop.visit.reads".to_owned(), seen(6, 3)),
        ]);
        let created: BTreeSet<String> = observed.keys().cloned().collect();
        let mut explicit = pc(BASIC);
        explicit.spec.streams[0].topic.replication_factor = Some(1);
        let plan = topics(&explicit, &observed, 1, &created);
        assert_eq!(
            plan[0],
            TopicAction::Grow {
                name: "prod.shop.visit".into(),
                from: 3,
                to: 6
            }
        );
        assert_eq!(
            plan[1],
            TopicAction::Keep {
                name: "prod.shop.visit.retry".into(),
                partitions: 6
            }
        );
        let TopicAction::NotSupported { reason, .. } = &plan[2] else {
            panic!("{:?}", plan[2])
        };
        assert!(reason.contains("cannot remove partitions"), "{reason}");
        let TopicAction::NotSupported { reason, .. } = &plan[3] else {
            panic!("{:?}", plan[3])
        };
        assert!(reason.contains("replication factor 3"), "{reason}");
    }

    #[test]
    fn names_are_scoped_by_namespace_and_pipeline_and_others_topics_are_left_alone() {
        let here = pc(BASIC);
        let there = pc(&BASIC.replace("namespace: prod", "namespace: staging"));
        let groups = |p: &PipelineConfig| names::collector_group(p, "to-redis");
        assert_eq!(groups(&here), "prod.shop.to-redis");
        assert_ne!(groups(&here), groups(&there), "one name in two namespaces");
        let settings_here = settings(&here);
        assert_eq!(settings_here.streams[0].topic(), "prod.shop.visit");
        assert_eq!(
            settings_here.streams[0].dead_letter_topic(),
            "prod.shop.visit.dlq"
        );
        assert_ne!(
            settings_here.streams[0].topic(),
            settings(&there).streams[0].topic()
        );

        // A topic of that name that the operator did not create is not used...
        let observed = BTreeMap::from([(
            "prod.shop.visit".to_owned(),
            ObservedTopic {
                partitions: 6,
                replication_factor: 1,
            },
        )]);
        let plan = topics(&here, &observed, 1, &BTreeSet::new());
        let TopicAction::NotOurs { name, reason } = &plan[0] else {
            panic!("{:?}", plan[0])
        };
        assert_eq!(name, "prod.shop.visit");
        assert!(reason.contains("streams[visit].topic.name"), "{reason}");
        assert!(matches!(plan[1], TopicAction::Create { .. }));
        // ...unless the spec names it.
        let mut named = here.clone();
        named.spec.streams[0].topic.name = Some("prod.shop.visit".to_owned());
        let plan = topics(&named, &observed, 1, &BTreeSet::new());
        assert_eq!(
            plan[0],
            TopicAction::Keep {
                name: "prod.shop.visit".into(),
                partitions: 6
            }
        );
    }

    #[test]
    fn kafka_tls_and_sasl_reach_every_service_pod_by_reference() {
        let plain = children(&pc(BASIC), &Images::default());
        let env = env_of(&plain.ingest);
        assert!(!env.contains_key("SLUICE_KAFKA_OPTIONS"));
        assert!(!env.contains_key("SLUICE_KAFKA_SASL_PASSWORD"));

        let secure = pc(&BASIC.replace(
            "kafka: {bootstrapServers: 'kafka:9092'}",
            "kafka: {bootstrapServers: 'kafka:9093', tls: {secretName: kafka-ca, clientAuth: true}, sasl: {mechanism: SCRAM-SHA-512, secretName: kafka-user}}",
        ));
        let c = children(&secure, &Images::default());
        let pods = std::iter::once(serde_json::to_value(&c.ingest).expect("json")).chain(
            c.collectors
                .iter()
                .map(|w| serde_json::to_value(w).expect("json")),
        );
        for d in pods {
            let env = env_of(&d);
            assert_eq!(
                env["SLUICE_KAFKA_OPTIONS"],
                format!(
                    "security.protocol=sasl_ssl,sasl.mechanism=SCRAM-SHA-512,\
                     ssl.ca.location={KAFKA_TLS_DIR}/ca.crt,\
                     ssl.certificate.location={KAFKA_TLS_DIR}/tls.crt,\
                     ssl.key.location={KAFKA_TLS_DIR}/tls.key"
                )
            );
            assert_eq!(
                env["SLUICE_KAFKA_SASL_PASSWORD"],
                json!({"secretKeyRef": {"name": "kafka-user", "key": "password"}}),
                "the password is referenced, never copied"
            );
            assert_eq!(
                env["SLUICE_KAFKA_SASL_USERNAME"]["secretKeyRef"]["key"],
                "username"
            );
            let pod = &d["spec"]["template"]["spec"];
            let volumes = pod["volumes"].as_array().expect("volumes");
            assert!(
                volumes
                    .contains(&json!({"name": "kafka-tls", "secret": {"secretName": "kafka-ca"}}))
            );
            let mounts = pod["containers"][0]["volumeMounts"]
                .as_array()
                .expect("mounts");
            assert!(mounts.contains(
                &json!({"name": "kafka-tls", "mountPath": KAFKA_TLS_DIR, "readOnly": true})
            ));
        }
        let sasl_only = pc(&BASIC.replace(
            "kafka: {bootstrapServers: 'kafka:9092'}",
            "kafka: {bootstrapServers: 'kafka:9092', sasl: {mechanism: PLAIN, secretName: u}}",
        ));
        assert_eq!(
            kafka_security(&sasl_only.spec.kafka),
            vec![
                ("security.protocol".to_owned(), "sasl_plaintext".to_owned()),
                ("sasl.mechanism".to_owned(), "PLAIN".to_owned())
            ]
        );
    }

    #[test]
    fn autoscaled_collectors_get_a_lag_autoscaler_capped_at_their_partitions() {
        let c = children(&pc(BASIC), &Images::default());
        assert_eq!(c.collector_hpas.len(), 1, "only to-redis autoscales");
        let hpa = serde_json::to_value(&c.collector_hpas[0]).expect("json");
        assert_eq!(hpa["metadata"]["name"], "shop-collector-to-redis");
        assert_eq!(
            hpa["spec"]["scaleTargetRef"]["name"],
            "shop-collector-to-redis"
        );
        assert_eq!(hpa["spec"]["minReplicas"], 1);
        assert_eq!(hpa["spec"]["maxReplicas"], 6);
        let metric = &hpa["spec"]["metrics"][0]["external"];
        assert_eq!(metric["metric"]["name"], "sluice_consumer_lag");
        assert_eq!(
            metric["metric"]["selector"]["matchLabels"],
            json!({"pipeline": "shop", "collector": "to-redis"})
        );
        assert_eq!(
            metric["target"],
            json!({"type": "AverageValue", "averageValue": "1000"})
        );
        let behavior = &hpa["spec"]["behavior"];
        assert_eq!(behavior["scaleUp"]["stabilizationWindowSeconds"], 0);
        assert_eq!(behavior["scaleDown"]["stabilizationWindowSeconds"], 120);

        // More replicas than partitions would idle: capped at 6; minReplicas 0 is the
        // operator's business, the HPA keeps one.
        let many = pc(&BASIC.replace(
            "autoscale: {minReplicas: 1, maxReplicas: 6, lagPerReplica: 1000}",
            "autoscale: {minReplicas: 0, maxReplicas: 50, lagPerReplica: 1000, scaleDownStabilizationSeconds: 5}",
        ));
        let hpa = &children(&many, &Images::default()).collector_hpas[0];
        let spec = &hpa.spec;
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(1), 6));
        assert_eq!(
            spec.behavior
                .as_ref()
                .and_then(|b| b.scale_down.as_ref())
                .and_then(|d| d.stabilization_window_seconds),
            Some(5)
        );
    }

    #[test]
    fn checksums_are_stable() {
        assert_eq!(checksum("a"), checksum("a"));
        assert_ne!(checksum("a"), checksum("b"));
        assert_eq!(checksum("").len(), 16);
    }
}
