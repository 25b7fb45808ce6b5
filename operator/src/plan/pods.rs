//! What the pods of a pipeline share: restricted security contexts, how they reach Kafka
//! (credentials by reference to their Secret, never by value), the settings mount, and the
//! Deployment and StatefulSet shapes with the pipeline's labels and owner reference.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::ResourceRequirements;
use serde_json::{Value, json};

use super::redis::{redis_password, redis_urls};
use super::{
    CHECKSUM_ANNOTATION, Images, KAFKA_TLS_DIR, SETTINGS_PATH, labels, meta, name_of, names,
};
use crate::crd::{KafkaSpec, PipelineConfig, SaslMechanism, StorageSpec};

pub(super) fn restricted_container() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

pub(super) fn restricted_pod() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

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

pub(super) fn common_env(pc: &PipelineConfig, kafka_options: Vec<(String, String)>) -> Vec<Value> {
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

/// The container of a Sluice service (ingest or a collector), `ports` including the
/// `metrics` port: the probes ask `/readyz` and `/healthz` there, and the security context
/// is the restricted one.
pub(super) fn service_container(
    name: &str,
    image: &str,
    env: Vec<Value>,
    ports: Vec<Value>,
    mounts: Vec<Value>,
    resources: Option<&ResourceRequirements>,
) -> Value {
    let mut container = json!({
        "name": name,
        "image": image,
        "env": env,
        "ports": ports,
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10},
        "securityContext": restricted_container(),
    });
    if let Some(r) = resources {
        container["resources"] = serde_json::to_value(r).unwrap_or_default();
    }
    container
}

/// The settings mount, and the Kafka TLS Secret's when there is one, of a service
/// container; the TLS volume is added to `volumes`.
pub(super) fn service_mounts(pc: &PipelineConfig, volumes: &mut Vec<Value>) -> Vec<Value> {
    let mut mounts =
        vec![json!({"name": "settings", "mountPath": "/etc/sluice", "readOnly": true})];
    if let Some((volume, mount)) = kafka_client(&pc.spec.kafka, Vec::new()).1 {
        volumes.push(volume);
        mounts.push(mount);
    }
    mounts
}

/// Where a pipeline's pods send their traces, when the operator was told.
pub(super) fn telemetry_env(images: &Images) -> Vec<Value> {
    images
        .otlp_endpoint
        .iter()
        .map(|e| json!({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": e}))
        .collect()
}

pub(super) fn pod_template(
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

pub(super) fn deployment(
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

/// A claim template named `name` of `storage`'s size and class.
pub(super) fn claim_template(name: &str, storage: &StorageSpec) -> Value {
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
pub(super) fn stateful_set(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::*;
    use crate::plan::*;

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
}
