//! Collectors: one Deployment per collector (a StatefulSet with a claim per replica for a
//! file sink without `claimName`), its sink's settings, and the autoscaler that follows its
//! consumer lag.

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use serde_json::{Value, json};

use super::pods::{
    claim_template, common_env, deployment, pod_template, service_container, service_mounts,
    stateful_set, telemetry_env,
};
use super::{Images, METRICS_PORT, Workload, meta, name_of, names};
use crate::crd::{CollectorSpec, PipelineConfig, StartAt};

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

pub(super) fn workload(
    pc: &PipelineConfig,
    c: &CollectorSpec,
    images: &Images,
    checksum: &str,
) -> Workload {
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
    // Not ready while its sink is unavailable: the outage shows in the pipeline's ready
    // replicas and in `kubectl get pods`.
    let container = service_container(
        "collector",
        &images.collector,
        env,
        vec![json!({"name": "metrics", "containerPort": METRICS_PORT})],
        mounts,
        c.resources.as_ref(),
    );
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
pub(super) fn autoscaler(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::*;
    use crate::plan::*;

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
}
