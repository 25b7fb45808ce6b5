//! The pipeline's Redis: the URLs and password ingest and collectors use and, when it is
//! managed, a primary that keeps its append-only file on a claim, read replicas, their
//! Services and the generated password Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Secret, Service};
use serde_json::{Value, json};

use super::pods::{claim_template, deployment, restricted_container, restricted_pod, stateful_set};
use super::{Images, Workload, labels, meta, name_of, names};
use crate::crd::{PipelineConfig, RedisMode, RedisSpec};

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

pub(super) fn workloads(pc: &PipelineConfig, images: &Images) -> Vec<(Workload, Service)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::*;
    use crate::plan::*;

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
}
