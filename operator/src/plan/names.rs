//! Names of the children, topics and consumer groups.

use super::name_of;
use crate::crd::{PipelineConfig, StreamSpec};

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
