//! The `PipelineConfig` custom resource (`sluice.dev/v1alpha1`).
//!
//! One resource describes one pipeline: its streams and their Kafka topics, the Kafka
//! connection, Redis, the ingest service and the collectors. The operator turns it into
//! topics, a settings ConfigMap (the same file the services read locally), Deployments,
//! Services and HorizontalPodAutoscalers, and reports what it did in the status.
//!
//! The `///` docs on each field become the descriptions of the generated CRD
//! (`scripts/generate` writes `manifests/crd.yaml`); validation rules reject nonsense at
//! `kubectl apply` time.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The desired state of a Sluice pipeline.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "PipelineConfig",
    plural = "pipelineconfigs",
    shortname = "pc",
    shortname = "pcfg",
    namespaced,
    status = "PipelineConfigStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Streams","type":"integer","jsonPath":".status.streams"}"#,
    printcolumn = r#"{"name":"Collectors","type":"integer","jsonPath":".status.readyCollectors"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.streams.all(s, self.streams.exists_one(t, t.name == s.name))", "message": "stream names must be unique"},
    {"rule": "self.collectors.all(c, self.collectors.exists_one(d, d.name == c.name))", "message": "collector names must be unique"},
    {"rule": "self.collectors.all(c, c.streams.all(n, self.streams.exists(s, s.name == n)))", "message": "every stream a collector names must be one of spec.streams"}
]))]
pub struct PipelineConfigSpec {
    /// How to reach Kafka.
    pub kafka: KafkaSpec,
    /// Redis for records and indexes: managed by the operator, or an external instance.
    #[serde(default)]
    pub redis: RedisSpec,
    /// The streams events can be sent to, each with its Kafka topic.
    #[schemars(length(min = 1, max = 64))]
    pub streams: Vec<StreamSpec>,
    /// The ingest service (HTTP, WebSocket, TCP).
    #[serde(default)]
    pub ingest: IngestSpec,
    /// The collectors, each writing some streams to one sink.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub collectors: Vec<CollectorSpec>,
    /// What collectors do with a write that keeps failing.
    #[serde(default)]
    pub retry: RetrySpec,
    /// How long the Redis sink keeps its per-minute counts and hourly roll-ups.
    #[serde(default)]
    pub aggregates: AggregatesSpec,
    /// What happens to the topics when the PipelineConfig is deleted.
    #[serde(default)]
    pub topic_deletion_policy: TopicDeletionPolicy,
    /// The NetworkPolicies of the pipeline's pods.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
}

/// The NetworkPolicies the operator writes for a pipeline (enforced where the cluster's
/// network plugin enforces NetworkPolicies). Ingest admits any source on its API and TCP
/// ports; collectors admit only the metrics scraper; the managed Redis admits only the
/// pipeline's own pods. Ingest and collectors may reach only DNS, Kafka (the ports of
/// `kafka.bootstrapServers`), Redis, their SQL database (5432 for PostgreSQL, 3306 for
/// MySQL) and the OTLP endpoint's port; `extraEgress` adds more (a database on another
/// port, brokers that advertise other ports).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Write the NetworkPolicies; `false` removes them.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Who may reach ingest's API and TCP ports; any source when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingest_from: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>,
    /// Who may scrape `/metrics` of ingest and collectors; any source when empty (on that
    /// port only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics_from: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>,
    /// Further destinations ingest and collectors may reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_egress: Vec<k8s_openapi::api::networking::v1::NetworkPolicyEgressRule>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            ingest_from: Vec::new(),
            metrics_from: Vec::new(),
            extra_egress: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// The Kafka connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.sasl) || self.sasl.mechanism != 'PLAIN' || has(self.tls) || (has(self.sasl.allowPlaintext) && self.sasl.allowPlaintext)",
     "message": "kafka.sasl.mechanism PLAIN without kafka.tls sends the password in clear text: add kafka.tls, use SCRAM-SHA-256 or SCRAM-SHA-512, or set kafka.sasl.allowPlaintext: true to accept it"}
]))]
pub struct KafkaSpec {
    /// Bootstrap servers, comma separated, for example `kafka.kafka:9092`.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,
    /// TLS to the brokers, with certificates from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<KafkaTls>,
    /// SASL authentication, with credentials from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<KafkaSasl>,
}

/// TLS settings for Kafka.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaTls {
    /// Secret holding `ca.crt`, the certificate authority that signed the brokers'
    /// certificates (and `tls.crt`, `tls.key` when `clientAuth` is set).
    pub secret_name: String,
    /// Authenticate to the brokers with the client certificate `tls.crt` and key `tls.key`
    /// from the same Secret.
    #[serde(default)]
    pub client_auth: bool,
}

/// SASL settings for Kafka.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSasl {
    /// The mechanism.
    pub mechanism: SaslMechanism,
    /// Secret holding `username` and `password`.
    pub secret_name: String,
    /// Accept `PLAIN` without `tls`, which sends the password in clear text to anyone on
    /// the network path; refused unless set.
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// SASL mechanisms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SaslMechanism {
    /// PLAIN (use with TLS).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

/// Redis for the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.mode != 'External' || has(self.url)", "message": "redis.url is required when redis.mode is External"},
    {"rule": "self.mode != 'Managed' || !has(self.url)", "message": "redis.url is only for redis.mode External"}
]))]
pub struct RedisSpec {
    /// `Managed`: the operator runs a Redis primary and replicas; `External`: use `url`.
    #[serde(default)]
    pub mode: RedisMode,
    /// Read replicas of a managed Redis.
    #[serde(default = "default_redis_replicas")]
    #[schemars(range(min = 0, max = 5))]
    pub replicas: i32,
    /// URL of an external Redis primary, such as `redis://redis.data:6379`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// URL of an external Redis replica for reads; the primary when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_url: Option<String>,
    /// The volume claim of the managed primary, which keeps its append-only file: a
    /// restarted primary loads it and its replicas resync to what it holds.
    #[serde(default)]
    pub storage: StorageSpec,
    /// When the managed primary syncs its append-only file to disk. `Always` (the default):
    /// before a write is answered, so a record whose offset a collector committed survives
    /// the loss of the node; `EverySec`: once a second, faster, and a node crash may lose
    /// the last second of writes (a Redis crash alone loses nothing).
    #[serde(default)]
    pub appendfsync: AppendFsync,
    /// The Redis password. Managed: when absent, the operator generates one into the Secret
    /// `<pipeline>-redis-auth` (key `password`) and keeps it; the primary and replicas
    /// require it. External: the password ingest and collectors send, if the server wants
    /// one (it may also be in the URL, which then shows wherever the URL does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeySpec>,
}

/// One key of a Secret in the pipeline's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySpec {
    /// The Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within it.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_password_key() -> String {
    "password".to_owned()
}

/// When Redis syncs its append-only file to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum AppendFsync {
    /// Before a write is answered.
    #[default]
    Always,
    /// Once a second.
    EverySec,
}

impl AppendFsync {
    /// The value of Redis's `appendfsync`.
    pub fn as_redis(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::EverySec => "everysec",
        }
    }
}

/// A PersistentVolumeClaim per pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each claim, such as `1Gi`. A claim cannot be resized through the spec.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub size: String,
    /// StorageClass of the claims; the cluster's default class when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_storage_size() -> String {
    "1Gi".to_owned()
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

fn default_redis_replicas() -> i32 {
    1
}

impl Default for RedisSpec {
    fn default() -> Self {
        Self {
            mode: RedisMode::Managed,
            replicas: default_redis_replicas(),
            url: None,
            replica_url: None,
            password_secret: None,
            storage: StorageSpec::default(),
            appendfsync: AppendFsync::default(),
        }
    }
}

/// Who runs Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum RedisMode {
    /// The operator runs a primary and replicas.
    #[default]
    Managed,
    /// An existing Redis at `url`.
    External,
}

/// One stream and its topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamSpec {
    /// Name of the stream, as it appears in URLs.
    #[schemars(length(min = 1, max = 100), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub name: String,
    /// Its Kafka topic.
    #[serde(default)]
    pub topic: TopicSpec,
    /// JSON pointer to the partition key in the payload, such as `/userId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub key: Option<String>,
    /// JSON Schema every event of the stream must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub schema: Option<Value>,
    /// JSON pointers of payload fields counted per minute by the Redis sink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub dimensions: Vec<String>,
}

/// A free-form JSON object (a JSON Schema), kept as is by the apiserver.
fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// A stream's Kafka topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicSpec {
    /// Topic name; the stream name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub name: Option<String>,
    /// Partitions; they can grow but never shrink.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 10000))]
    pub partitions: i32,
    /// Replication factor; fixed once the topic exists. When unset: 3, or the number of
    /// brokers when the cluster has fewer; with 3 or more, `min.insync.replicas` is 2
    /// unless `config` says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32))]
    pub replication_factor: Option<i32>,
    /// Topic configuration, such as `retention.ms: "604800000"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

fn default_partitions() -> i32 {
    1
}

impl Default for TopicSpec {
    fn default() -> Self {
        Self {
            name: None,
            partitions: default_partitions(),
            replication_factor: None,
            config: BTreeMap::new(),
        }
    }
}

/// The ingest service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestSpec {
    /// Replica range; an HPA scales ingest on CPU within it.
    #[serde(default)]
    pub replicas: ReplicaRange,
    /// HTTP port of the Service.
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub http_port: i32,
    /// TCP JSON-lines ports, when the buffered store is wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSpec>,
    /// API keys every door asks for (HTTP, WebSocket, both TCP ports); every door is open
    /// without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<ApiKeysSpec>,
    /// CPU and memory of each ingest pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// API keys kept in a Secret of the pipeline's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeysSpec {
    /// The Secret. Ingest reads it again while running: keys added or removed there take
    /// effect without a restart, once the kubelet updated the mounted file.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// The Secret's key holding the API keys, one per line, each at least 16 characters.
    #[serde(default = "default_api_keys_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_api_keys_key() -> String {
    "keys".to_owned()
}

fn default_http_port() -> i32 {
    8080
}

impl Default for IngestSpec {
    fn default() -> Self {
        Self {
            replicas: ReplicaRange::default(),
            http_port: default_http_port(),
            tcp: None,
            api_keys: None,
            resources: None,
        }
    }
}

/// A replica range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.min <= self.max", "message": "replicas.min must not exceed replicas.max"}
]))]
pub struct ReplicaRange {
    /// Fewest replicas.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 100))]
    pub min: i32,
    /// Most replicas.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 100))]
    pub max: i32,
}

fn one() -> i32 {
    1
}

impl Default for ReplicaRange {
    fn default() -> Self {
        Self { min: 1, max: 1 }
    }
}

/// The TCP doors of ingest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.writePort != self.readPort", "message": "tcp.writePort and tcp.readPort must differ"}
]))]
pub struct TcpSpec {
    /// Port taking JSON lines.
    #[serde(default = "default_write_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub write_port: i32,
    /// Port answering `get <id>` (and `all` when `dump` is set).
    #[serde(default = "default_read_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub read_port: i32,
    /// Stream the lines go to.
    #[serde(default = "default_tcp_stream")]
    pub stream: String,
    /// Let the read port dump every record of the stream (`all`) to whoever reaches it
    /// (and has a key, with `apiKeys`).
    #[serde(default)]
    pub dump: bool,
}

fn default_write_port() -> i32 {
    2525
}

fn default_read_port() -> i32 {
    2526
}

fn default_tcp_stream() -> String {
    "records".to_owned()
}

/// One collector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CollectorSpec {
    /// Name of the collector (its Deployment is `<pipeline>-collector-<name>`).
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Streams it collects; each must be one of `spec.streams`.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 100)))]
    pub streams: Vec<String>,
    /// Where it writes.
    pub sink: SinkSpec,
    /// Partitions written concurrently by each replica.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 1024))]
    pub concurrency: i32,
    /// Records per batch.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 100000))]
    pub batch_size: i32,
    /// Fixed replicas when `autoscale` is absent.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Where a new consumer group starts reading; also how lag is counted for a partition
    /// the group has not committed yet (`Earliest`: all retained records; `Latest`: none).
    #[serde(default)]
    pub start_at: StartAt,
    /// Scale on consumer lag through a HorizontalPodAutoscaler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleSpec>,
    /// CPU and memory of each collector pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// Where a consumer group without a committed offset starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StartAt {
    /// The oldest retained record.
    #[default]
    Earliest,
    /// Only records written after the group first joins.
    Latest,
}

fn default_concurrency() -> i32 {
    4
}

fn default_batch_size() -> i32 {
    5000
}

/// A collector's sink: exactly one of the fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.redis), has(self.redisIndex), has(self.file), has(self.postgres), has(self.mysql)].filter(x, x).size() == 1", "message": "a sink names exactly one of redis, redisIndex, file, postgres, mysql"}
]))]
pub struct SinkSpec {
    /// Records and per-minute aggregates in the pipeline's Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSinkSpec>,
    /// Per recipient, the senders with unsent messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_index: Option<EmptySpec>,
    /// JSON-lines files on a volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileSinkSpec>,
    /// Rows in PostgreSQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<SqlSinkSpec>,
    /// Rows in MySQL or MariaDB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<SqlSinkSpec>,
}

/// Nothing to configure.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct EmptySpec {}

/// The Redis sink.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSinkSpec {
    /// Expiry of records, such as `24h`; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub ttl: Option<String>,
}

/// The file sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileSinkSpec {
    /// An existing PersistentVolumeClaim that every replica writes to (ReadWriteMany when
    /// there is more than one replica). When absent, each replica gets a claim of its own
    /// from `storage`, kept when the collector scales down and reattached when it scales up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// The claim of each replica when `claimName` is absent.
    #[serde(default)]
    pub storage: StorageSpec,
    /// Start a new segment at this size, in bytes.
    #[serde(default = "default_file_bytes")]
    #[schemars(range(min = 1024))]
    pub max_bytes: i64,
    /// Start a new segment after this long, such as `1h`.
    #[serde(default = "default_file_age")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub max_age: String,
}

fn default_file_bytes() -> i64 {
    64 * 1024 * 1024
}

fn default_file_age() -> String {
    "1h".to_owned()
}

/// The PostgreSQL and MySQL sinks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SqlSinkSpec {
    /// Secret with the key `url`, such as `postgres://user:password@db:5432/app` or
    /// `mysql://user:password@db:3306/app`.
    pub secret_name: String,
    /// Table, created if absent.
    #[serde(default = "default_table")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub table: String,
    /// Connection attempts at start-up.
    #[serde(default = "default_connect_attempts")]
    #[schemars(range(min = 1, max = 1000))]
    pub connect_attempts: i32,
    /// Wait between connection attempts, such as `10s`.
    #[serde(default = "default_connect_backoff")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub connect_backoff: String,
}

fn default_table() -> String {
    "sluice_events".to_owned()
}

fn default_connect_attempts() -> i32 {
    10
}

fn default_connect_backoff() -> String {
    "10s".to_owned()
}

/// Autoscaling of a collector on consumer lag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.minReplicas <= self.maxReplicas", "message": "autoscale.minReplicas must not exceed autoscale.maxReplicas"}
]))]
pub struct AutoscaleSpec {
    /// Fewest replicas (0 lets the collector scale to zero while it has no lag).
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most replicas; never more than the partitions of its topics.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Target lag per replica.
    #[schemars(range(min = 1))]
    pub lag_per_replica: i64,
    /// Seconds the lag must stay down before replicas are removed (the HPA's scale-down
    /// stabilization window, which keeps replicas from flapping).
    #[serde(default = "default_scale_down_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
    /// Seconds the lag must stay up before replicas are added (0: at once).
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: i32,
    /// With `minReplicas: 0`: seconds the lag must stay at zero before the collector is
    /// scaled to zero; it is scaled back to one as soon as lag appears.
    #[serde(default = "default_idle_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub idle_seconds: i32,
}

fn default_idle_seconds() -> i32 {
    300
}

fn default_scale_down_window() -> i32 {
    120
}

/// Retention of the Redis sink's aggregates, which the dashboard and the aggregates API
/// read: minutes for short ranges, hours for long ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AggregatesSpec {
    /// How long a minute's counts are kept, such as `168h` (a week).
    #[serde(default = "default_minute_retention")]
    #[schemars(regex(pattern = r"^[0-9]+(m|h)$"))]
    pub minute_retention: String,
    /// How long an hour's counts are kept, such as `2160h` (90 days).
    #[serde(default = "default_hour_retention")]
    #[schemars(regex(pattern = r"^[0-9]+(m|h)$"))]
    pub hour_retention: String,
}

fn default_minute_retention() -> String {
    "168h".to_owned()
}

fn default_hour_retention() -> String {
    "2160h".to_owned()
}

impl Default for AggregatesSpec {
    fn default() -> Self {
        Self {
            minute_retention: default_minute_retention(),
            hour_retention: default_hour_retention(),
        }
    }
}

/// Retries of failed writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Attempts in all before an event goes to `<topic>.dlq`.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: i32,
    /// Wait before the first retry, doubling per attempt, such as `1s`.
    #[serde(default = "default_backoff")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub backoff: String,
}

fn default_max_attempts() -> i32 {
    5
}

fn default_backoff() -> String {
    "1s".to_owned()
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            backoff: default_backoff(),
        }
    }
}

/// What happens to topics when the pipeline is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum TopicDeletionPolicy {
    /// Keep the topics and their data.
    #[default]
    Retain,
    /// Delete the topics.
    Delete,
}

/// What the operator observed and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineConfigStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `TopicsReady`, `RedisReady`, `IngestReady`, `CollectorsReady`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Number of streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<i32>,
    /// Collectors with all their replicas ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_collectors: Option<i32>,
    /// Each topic and its partitions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<TopicStatus>,
    /// The topics the operator created for this pipeline: the only ones it uses without
    /// their being named in the spec, and the only ones `topicDeletionPolicy: Delete`
    /// deletes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created_topics: Vec<String>,
    /// Each collector's replicas and lag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collectors: Vec<CollectorStatus>,
}

/// A topic as observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TopicStatus {
    /// Topic name.
    pub name: String,
    /// Partitions.
    pub partitions: i32,
}

/// A collector as observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CollectorStatus {
    /// Collector name.
    pub name: String,
    /// Ready replicas.
    pub replicas: i32,
    /// Replicas its Deployment asks for (set by the autoscaler when it has one).
    #[serde(
        default,
        alias = "desired_replicas",
        skip_serializing_if = "Option::is_none"
    )]
    pub desired_replicas: Option<i32>,
    /// Consumer lag summed over its partitions; absent when Kafka could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// Since when the lag has been zero (kept for scaling to zero).
    // `alias`: the snake_case name of the status that earlier versions wrote.
    #[serde(default, alias = "idle_since", skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_status_is_camel_case_and_reads_the_earlier_snake_case() {
        let status = CollectorStatus {
            name: "c".into(),
            replicas: 1,
            desired_replicas: Some(2),
            lag: Some(0),
            idle_since: Some("2026-12-01T10:00:00Z".into()),
        };
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"name": "c", "replicas": 1, "desiredReplicas": 2, "lag": 0,
                "idleSince": "2026-12-01T10:00:00Z"})
        );
        let earlier: CollectorStatus = serde_json::from_value(serde_json::json!({
            "name": "c", "replicas": 1, "desired_replicas": 2, "lag": 0,
            "idle_since": "2026-12-01T10:00:00Z"
        }))
        .expect("earlier status");
        assert_eq!(earlier, status);
    }
}
