//! The pipeline's NetworkPolicies: who may reach ingest, the collectors and the managed
//! Redis, and where ingest and the collectors may connect.

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use serde_json::{Value, json};

use super::{Images, meta, name_of, names};
use crate::crd::{PipelineConfig, RedisMode};

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
fn ingress_rule(ports: &[&str], from: &[NetworkPolicyPeer]) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::*;
    use crate::plan::*;

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
}
