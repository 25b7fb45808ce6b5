//! Ingest: its Deployment, its Service (the API and TCP doors; health and metrics stay on a
//! port of their own) and its CPU autoscaler.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use serde_json::json;

use super::pods::{
    common_env, deployment, pod_template, service_container, service_mounts, telemetry_env,
};
use super::settings::record_store;
use super::{API_KEYS_DIR, Images, METRICS_PORT, meta, name_of, names};
use crate::crd::PipelineConfig;

pub(super) fn plan(
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
    let container = service_container(
        "ingest",
        &images.ingest,
        env,
        ports,
        mounts,
        spec.resources.as_ref(),
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::*;
    use crate::plan::*;

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
}
