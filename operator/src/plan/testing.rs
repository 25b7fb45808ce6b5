//! What the plan's unit tests share: a resource from YAML, and a pod's environment.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::crd::PipelineConfig;

/// A resource from YAML, with a uid so that children get an owner reference.
pub fn pc(yaml: &str) -> PipelineConfig {
    let mut pc: PipelineConfig = serde_yaml_ng::from_str(yaml).expect("resource");
    pc.metadata.uid = Some("0b1c".to_owned());
    pc
}

/// A pipeline with every kind of collector, TCP doors, retry and aggregates.
pub const BASIC: &str = "
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

/// The environment of a workload's first container, by name (a value or a `valueFrom`).
pub fn env_of(d: &impl serde::Serialize) -> BTreeMap<String, Value> {
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
