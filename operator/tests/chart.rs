//! The Helm chart (`charts/sluice`) and the manifests (`manifests/`) on the real control
//! plane: the chart lints and renders with default and other values, its roles hold no
//! wildcard, everything rendered and every example passes the apiserver's server-side
//! dry run, and an installed chart's ServiceAccount is enough for the operator: running
//! with that identity, it takes an example PipelineConfig to `Ready=True`.
//!
//! Needs `helm` and `kubectl` on PATH (`eval "$(scripts/k8s env)"` puts them there).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};
use sluice_operator::crd::PipelineConfig;
use sluice_testkit::{Process, Stack, free_port, wait_for};

use common::{client, condition, install_crd, namespace, uuid_like};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> String {
    repo().join("charts/sluice").display().to_string()
}

/// Runs a command; its standard output, or its standard error as the error.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
    common::run(program, args, input, &[])
}

fn helm(args: &[&str]) -> Result<String, String> {
    run("helm", args, None)
}

/// `helm template` of the chart into `namespace` with `--set` values.
fn template(namespace: &str, sets: &[&str]) -> Result<String, String> {
    let chart = chart();
    let mut args = vec![
        "template",
        "sluice",
        chart.as_str(),
        "--namespace",
        namespace,
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    helm(&args)
}

/// The documents of a multi-document YAML text.
fn documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "exactly one {kind} rendered");
    found[0]
}

/// The wildcards in the rules of every Role and ClusterRole, as "kind/name: field".
fn wildcards(docs: &[Value]) -> Vec<String> {
    let mut found = Vec::new();
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
    {
        for rule in d["rules"].as_array().into_iter().flatten() {
            for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                let values = rule[field].as_array().into_iter().flatten();
                for v in values.filter_map(Value::as_str) {
                    if v.contains('*') {
                        found.push(format!(
                            "{}/{}: {field} {v}",
                            d["kind"], d["metadata"]["name"]
                        ));
                    }
                }
            }
        }
        if !d["aggregationRule"].is_null() {
            found.push(format!("{}: aggregationRule", d["metadata"]["name"]));
        }
    }
    found
}

fn assert_restricted(pod: &Value, what: &str) {
    let pod_ctx = &pod["securityContext"];
    assert_eq!(pod_ctx["runAsNonRoot"], true, "{what}: runAsNonRoot");
    assert_eq!(
        pod_ctx["seccompProfile"]["type"], "RuntimeDefault",
        "{what}: seccomp"
    );
    for c in pod["containers"].as_array().expect("containers") {
        let ctx = &c["securityContext"];
        assert_eq!(
            ctx["readOnlyRootFilesystem"], true,
            "{what}: read-only root"
        );
        assert_eq!(
            ctx["allowPrivilegeEscalation"], false,
            "{what}: no escalation"
        );
        assert_eq!(
            ctx["capabilities"]["drop"],
            json!(["ALL"]),
            "{what}: no capabilities"
        );
    }
}

fn container_args(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect()
}

fn env_value(deployment: &Value, name: &str) -> Option<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

#[test]
fn chart_lints_with_default_and_other_values() {
    let chart = chart();
    helm(&["lint", "--strict", &chart]).unwrap_or_else(|e| panic!("{e}"));
    helm(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "watchNamespace=team-a,replicaCount=1,externalMetrics.certificate.source=certManager,metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true,grafana.dashboard.enabled=true,otlp.endpoint=http://otel:4317",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn default_values_render_a_restricted_leader_elected_operator_with_a_verified_api() {
    let docs = documents(&template("sluice-system", &[]).expect("renders"));
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "Secret",
        "APIService",
        "NetworkPolicy",
        "PodDisruptionBudget",
    ] {
        assert!(!of_kind(&docs, kind).is_empty(), "{kind} rendered");
    }
    assert!(of_kind(&docs, "ServiceMonitor").is_empty(), "optional");
    assert!(of_kind(&docs, "PodMonitor").is_empty(), "optional");
    assert!(of_kind(&docs, "PrometheusRule").is_empty(), "optional");
    assert!(
        of_kind(&docs, "ConfigMap").is_empty(),
        "no dashboard unless asked"
    );

    // The external metrics API reads the apiserver's front-proxy settings through the
    // built-in Role for them.
    let reader = of_kind(&docs, "RoleBinding")
        .into_iter()
        .find(|b| b["metadata"]["namespace"] == "kube-system")
        .expect("a RoleBinding in kube-system");
    assert_eq!(
        reader["roleRef"]["name"],
        "extension-apiserver-authentication-reader"
    );

    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_restricted(pod, "operator");
    assert_eq!(pod["serviceAccountName"], "sluice-operator");
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"], "ghcr.io/sluice-dev/sluice-operator:0.1.0",
        "the tag defaults to the appVersion"
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["limits"]["memory"].is_string());
    let args = container_args(deployment);
    for expected in [
        "--leader-election=true",
        "--lease-name=sluice-operator",
        "--tls-cert-file=/var/run/sluice/tls/tls.crt",
        "--tls-key-file=/var/run/sluice/tls/tls.key",
    ] {
        assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
    }
    assert_eq!(
        env_value(deployment, "SLUICE_INGEST_IMAGE").as_deref(),
        Some("ghcr.io/sluice-dev/sluice-ingest:0.1.0")
    );
    assert!(env_value(deployment, "OTEL_EXPORTER_OTLP_ENDPOINT").is_none());

    // The APIService trusts exactly the CA that signed the served certificate.
    let api = one(&docs, "APIService");
    assert_eq!(api["metadata"]["name"], "v1beta1.external.metrics.k8s.io");
    assert!(api["spec"]["insecureSkipTLSVerify"].is_null());
    assert_eq!(api["spec"]["service"]["name"], "sluice-operator");
    assert_eq!(api["spec"]["service"]["namespace"], "sluice-system");
    let secret = one(&docs, "Secret");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(api["spec"]["caBundle"], secret["data"]["ca.crt"]);
    verify_certificate(secret, "sluice-operator.sluice-system.svc");

    // The leader's Lease is the operator's namespace's business only.
    let role = one(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], "sluice-system");
    assert_eq!(role["rules"][0]["resources"], json!(["leases"]));
    assert!(wildcards(&docs).is_empty(), "{:?}", wildcards(&docs));
}

/// The TCP ports the operator's NetworkPolicy lets it reach.
fn egress_ports(docs: &[Value]) -> Vec<i64> {
    one(docs, "NetworkPolicy")["spec"]["egress"]
        .as_array()
        .expect("egress rules")
        .iter()
        .flat_map(|rule| rule["ports"].as_array().cloned().unwrap_or_default())
        .filter(|p| p["protocol"] == "TCP")
        .filter_map(|p| p["port"].as_i64())
        .collect()
}

#[test]
fn the_operators_egress_admits_the_otlp_endpoint_it_is_given() {
    let plain = egress_ports(&documents(
        &template("sluice-system", &[]).expect("renders"),
    ));
    for (endpoint, port) in [
        ("http://otel.observability:4318", 4318),
        ("https://otel.example.com/v1/traces", 443),
        ("http://otel:4317/", 4317),
    ] {
        let with = egress_ports(&documents(
            &template("sluice-system", &[&format!("otlp.endpoint={endpoint}")]).expect("renders"),
        ));
        // One rule more, for the endpoint's port.
        assert_eq!(with.len(), plain.len() + 1, "{endpoint}: {with:?}");
        assert_eq!(with.last(), Some(&port), "{endpoint}: {with:?}");
    }
}

/// Checks with openssl that the Secret's certificate chains to its CA and names `host`.
fn verify_certificate(secret: &Value, host: &str) {
    use base64::Engine as _;
    let dir = tempfile::tempdir().expect("temp dir");
    let decode = |key: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(secret["data"][key].as_str().expect("base64 data"))
            .expect("base64")
    };
    let ca = dir.path().join("ca.crt");
    let crt = dir.path().join("tls.crt");
    std::fs::write(&ca, decode("ca.crt")).expect("write");
    std::fs::write(&crt, decode("tls.crt")).expect("write");
    let ok = run(
        "openssl",
        &[
            "verify",
            "-CAfile",
            &ca.display().to_string(),
            "-verify_hostname",
            host,
            &crt.display().to_string(),
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("the certificate does not verify: {e}"));
    assert!(ok.contains(": OK"), "{ok}");
}

#[test]
fn other_values_change_what_they_say_and_nothing_else() {
    let docs = documents(
        &template(
            "ops",
            &[
                "watchNamespace=team-a",
                "replicaCount=1",
                "externalMetrics.certificate.source=insecure",
                "networkPolicy.enabled=false",
                "metrics.serviceMonitor.enabled=true",
                "metrics.podMonitor.enabled=true",
                "metrics.prometheusRule.enabled=true",
                "metrics.prometheusRule.labels.release=monitoring",
                "grafana.dashboard.enabled=true",
                "grafana.dashboard.namespace=grafana",
                "grafana.dashboard.annotations.grafana_folder=Sluice",
                "otlp.endpoint=http://otel.observability:4317",
                "logLevel=debug",
                "images.operator.tag=1.2.3",
                "images.ingest.repository=registry.local/ingest",
                "images.pullSecrets={regcred}",
            ],
        )
        .expect("renders"),
    );
    // One namespace watched: a Role there instead of a ClusterRole. The one cluster-wide
    // permission left is the external metrics API's: asking for access reviews.
    let cluster_roles = of_kind(&docs, "ClusterRole");
    assert_eq!(cluster_roles.len(), 1, "{cluster_roles:?}");
    assert_eq!(
        cluster_roles[0]["rules"],
        json!([{"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}])
    );
    assert_eq!(of_kind(&docs, "ClusterRoleBinding").len(), 1);
    let roles = of_kind(&docs, "Role");
    assert!(
        roles.iter().any(|r| r["metadata"]["namespace"] == "team-a"
            && r["rules"][0]["resources"] == json!(["pipelineconfigs"])),
        "{roles:?}"
    );
    let binding = of_kind(&docs, "RoleBinding")
        .into_iter()
        .find(|b| b["metadata"]["namespace"] == "team-a")
        .expect("a RoleBinding in team-a");
    assert_eq!(binding["subjects"][0]["namespace"], "ops");
    // One replica: no disruption budget that could never be met.
    assert!(of_kind(&docs, "PodDisruptionBudget").is_empty());
    assert!(of_kind(&docs, "NetworkPolicy").is_empty());
    assert!(
        of_kind(&docs, "Secret").is_empty(),
        "no certificate to keep"
    );
    assert_eq!(
        one(&docs, "APIService")["spec"]["insecureSkipTLSVerify"],
        true
    );
    assert_eq!(
        one(&docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"],
        "metrics"
    );
    // The pipelines' pods in the watched namespace, on the ports that serve /metrics.
    let pods = &one(&docs, "PodMonitor")["spec"];
    assert_eq!(pods["namespaceSelector"], json!({"matchNames": ["team-a"]}));
    assert_eq!(
        pods["selector"]["matchLabels"],
        json!({"app.kubernetes.io/managed-by": "sluice-operator"})
    );
    let ports: Vec<&str> = pods["podMetricsEndpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["port"].as_str().expect("port"))
        .collect();
    assert_eq!(ports, ["metrics"]);
    // Each endpoint names the labels the dashboard and the alerts group by.
    for endpoint in pods["podMetricsEndpoints"].as_array().expect("endpoints") {
        let targets: Vec<&str> = endpoint["relabelings"]
            .as_array()
            .expect("relabelings")
            .iter()
            .map(|r| r["targetLabel"].as_str().expect("targetLabel"))
            .collect();
        assert_eq!(targets, ["pipeline", "component"]);
    }

    // The alerts are the file promtool tests; the dashboard is the file the metrics test reads.
    let monitoring = repo().join("charts/sluice/monitoring");
    let rule = one(&docs, "PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "monitoring");
    let rules: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(monitoring.join("rules.yaml")).expect("rules.yaml"),
    )
    .expect("rules.yaml");
    assert_eq!(rule["spec"], rules, "the PrometheusRule carries rules.yaml");
    let dashboard = one(&docs, "ConfigMap");
    assert_eq!(dashboard["metadata"]["namespace"], "grafana");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        dashboard["metadata"]["annotations"]["grafana_folder"],
        "Sluice"
    );
    let json: Value = serde_json::from_str(
        dashboard["data"]["sluice.json"]
            .as_str()
            .expect("sluice.json"),
    )
    .expect("the dashboard is JSON");
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring.join("dashboard.json")).expect("dashboard.json"),
    )
    .expect("dashboard.json");
    assert_eq!(json, file, "the ConfigMap carries dashboard.json");

    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_restricted(pod, "operator");
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "regcred"}]));
    assert_eq!(
        pod["containers"][0]["image"],
        "ghcr.io/sluice-dev/sluice-operator:1.2.3"
    );
    assert!(
        pod["volumes"].is_null(),
        "the operator signs its own certificate"
    );
    let args = container_args(deployment);
    assert!(
        args.iter()
            .any(|a| a == "--tls-name=sluice-operator.ops.svc"),
        "{args:?}"
    );
    for (name, value) in [
        ("SLUICE_WATCH_NAMESPACE", "team-a"),
        ("SLUICE_LOG", "debug"),
        (
            "SLUICE_PIPELINE_OTLP_ENDPOINT",
            "http://otel.observability:4317",
        ),
        ("SLUICE_INGEST_IMAGE", "registry.local/ingest:0.1.0"),
    ] {
        assert_eq!(
            env_value(deployment, name).as_deref(),
            Some(value),
            "{name}"
        );
    }
    assert!(wildcards(&docs).is_empty(), "{:?}", wildcards(&docs));

    // operator: no certificate rendered; the operator makes it and sets the caBundle, with
    // exactly the rights for that one Secret and that one APIService.
    let docs = documents(
        &template("ops", &["externalMetrics.certificate.source=operator"]).expect("renders"),
    );
    assert!(of_kind(&docs, "Secret").is_empty(), "made by the operator");
    let api = one(&docs, "APIService");
    assert!(api["spec"]["caBundle"].is_null());
    assert!(api["spec"]["insecureSkipTLSVerify"].is_null(), "verified");
    let args = container_args(one(&docs, "Deployment"));
    for wanted in [
        "--tls-secret=sluice-operator-tls",
        "--apiservice=v1beta1.external.metrics.k8s.io",
        "--tls-name=sluice-operator.ops.svc,sluice-operator.ops,sluice-operator",
    ] {
        assert!(args.iter().any(|a| a == wanted), "{wanted} in {args:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--tls-cert-file")));
    let role = of_kind(&docs, "Role")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "sluice-operator-certificate")
        .expect("the certificate Role");
    assert_eq!(role["metadata"]["namespace"], "ops");
    assert_eq!(
        role["rules"][0]["resourceNames"],
        json!(["sluice-operator-tls"])
    );
    let apiservice_role = of_kind(&docs, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "sluice-operator-apiservice")
        .expect("the APIService ClusterRole");
    assert_eq!(
        apiservice_role["rules"],
        json!([{"apiGroups": ["apiregistration.k8s.io"], "resources": ["apiservices"],
                "resourceNames": ["v1beta1.external.metrics.k8s.io"], "verbs": ["get", "patch"]}])
    );
    assert!(wildcards(&docs).is_empty(), "{:?}", wildcards(&docs));

    // cert-manager: a Certificate for the Service, its CA injected into the APIService.
    let docs = documents(
        &template("ops", &["externalMetrics.certificate.source=certManager"]).expect("renders"),
    );
    let certificate = one(&docs, "Certificate");
    assert_eq!(certificate["spec"]["secretName"], "sluice-operator-tls");
    assert!(
        certificate["spec"]["dnsNames"]
            .as_array()
            .expect("dnsNames")
            .contains(&json!("sluice-operator.ops.svc"))
    );
    assert_eq!(one(&docs, "Issuer")["spec"]["selfSigned"], json!({}));
    let api = one(&docs, "APIService");
    assert_eq!(
        api["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "ops/sluice-operator"
    );
    assert!(
        of_kind(&docs, "Secret").is_empty(),
        "cert-manager writes it"
    );
}

#[test]
fn wrong_values_are_refused_with_a_message_naming_them() {
    let err = template("ops", &["externalMetrics.certificate.source=selfmade"])
        .expect_err("an unknown certificate source is refused");
    assert!(
        err.contains("externalMetrics/certificate/source") && err.contains("'certManager'"),
        "the message names the value and what it may be: {err}"
    );
    let err = template("ops", &["replicaCont=2"]).expect_err("a misspelt value is refused");
    assert!(err.contains("replicaCont"), "{err}");
    let err = template("ops", &["externalMetrics.certificate.source=secret"])
        .expect_err("source secret needs a name");
    assert!(err.contains("secretName is required"), "{err}");
    let err = template(
        "ops",
        &[
            "externalMetrics.certificate.source=secret",
            "externalMetrics.certificate.secretName=own-tls",
        ],
    )
    .expect_err("an own certificate needs its CA for the APIService");
    assert!(
        err.contains("needs the CA") && err.contains("ops/own-tls"),
        "{err}"
    );
    let docs = documents(
        &template(
            "ops",
            &[
                "externalMetrics.certificate.source=secret",
                "externalMetrics.certificate.secretName=own-tls",
                "externalMetrics.certificate.caBundle=Q0E=",
            ],
        )
        .expect("renders with the CA given"),
    );
    assert_eq!(one(&docs, "APIService")["spec"]["caBundle"], "Q0E=");
    assert!(
        of_kind(&docs, "Secret").is_empty(),
        "the Secret is the user's"
    );
    let volumes = &one(&docs, "Deployment")["spec"]["template"]["spec"]["volumes"];
    assert_eq!(volumes[0]["secret"]["secretName"], "own-tls");
}

#[test]
fn the_rendered_chart_in_manifests_is_up_to_date() {
    let committed = std::fs::read_to_string(repo().join("manifests/sluice.yaml"))
        .expect("manifests/sluice.yaml");
    let rendered = run(
        &repo().join("scripts/generate").display().to_string(),
        &["--print-rendered"],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        committed == rendered,
        "manifests/sluice.yaml is out of date: run scripts/generate"
    );
    let docs = documents(&committed);
    assert!(wildcards(&docs).is_empty(), "{:?}", wildcards(&docs));
}

/// The two tests that write the cluster's one external metrics APIService take turns.
static APISERVICE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Rewrites the namespaced documents of `text` into `ns` and dry-runs them on the
/// apiserver; cluster-scoped ones (Namespace, APIService, ClusterRole...) as they are.
fn server_dry_run(text: &str, ns: &str, what: &str) {
    let mut docs = documents(text);
    for d in &mut docs {
        if d["metadata"]["namespace"].is_string() {
            d["metadata"]["namespace"] = json!(ns);
        }
        if let Some(subjects) = d.get_mut("subjects").and_then(Value::as_array_mut) {
            for s in subjects {
                s["namespace"] = json!(ns);
            }
        }
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
    let out = run(
        "kubectl",
        &[
            "apply",
            "--server-side",
            "--field-manager=sluice-tests",
            "--dry-run=server",
            "--namespace",
            ns,
            "-f",
            "-",
        ],
        Some(&list.to_string()),
    )
    .unwrap_or_else(|e| panic!("{what} does not pass the server-side dry run: {e}"));
    assert!(out.contains("(server dry run)"), "{what}: {out}");
}

#[tokio::test]
async fn everything_rendered_and_every_example_passes_the_apiservers_dry_run() {
    let _turn = APISERVICE.lock().await;
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client).await;

    server_dry_run(
        &template(&ns, &[]).expect("renders"),
        &ns,
        "the default chart",
    );
    server_dry_run(
        &template(
            &ns,
            &[
                "externalMetrics.certificate.source=insecure",
                "replicaCount=1",
                "otlp.endpoint=http://otel:4317",
            ],
        )
        .expect("renders"),
        &ns,
        "the chart with other values",
    );
    let yaml_in = |dir: PathBuf| {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        files
    };
    let examples = yaml_in(repo().join("manifests/examples"));
    assert!(
        examples.len() >= 6,
        "one example per workload: {examples:?}"
    );
    for path in yaml_in(repo().join("manifests"))
        .into_iter()
        .chain(examples)
    {
        server_dry_run(
            &std::fs::read_to_string(&path).expect("read"),
            &ns,
            &path.display().to_string(),
        );
    }
    delete_namespace(&client, &ns).await;
}

async fn delete_namespace(client: &kube::Client, ns: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(ns, &DeleteParams::default()).await;
}

/// A kubeconfig for the same apiserver as the test's, authenticated by `token`.
fn kubeconfig_with_token(token: &str, dir: &Path) -> PathBuf {
    let admin = kube::config::Kubeconfig::read().expect("KUBECONFIG readable");
    let context = admin.current_context.clone().expect("a current context");
    let cluster_name = admin
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .expect("the context's cluster");
    let cluster = admin
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.clone())
        .expect("the cluster");
    let mut cluster_json = json!({"server": cluster.server});
    if let Some(ca) = cluster.certificate_authority_data {
        cluster_json["certificate-authority-data"] = json!(ca);
    }
    if let Some(ca) = cluster.certificate_authority {
        cluster_json["certificate-authority"] = json!(ca);
    }
    if cluster.insecure_skip_tls_verify == Some(true) {
        cluster_json["insecure-skip-tls-verify"] = json!(true);
    }
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster_json}],
        "users": [{"name": "sluice-operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": "sluice-operator"}}],
        "current-context": "operator",
    });
    let path = dir.join("kubeconfig.yaml");
    std::fs::write(&path, serde_yaml_ng::to_string(&config).expect("yaml")).expect("write");
    path
}

/// Uninstalls the release when dropped, so a failing test leaves no APIService behind.
struct Release {
    namespace: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = helm(&[
            "uninstall",
            "sluice",
            "--namespace",
            &self.namespace,
            "--wait",
        ]);
    }
}

#[tokio::test]
async fn the_installed_charts_identity_is_enough_to_take_an_example_to_ready() {
    let _turn = APISERVICE.lock().await;
    let stack = Stack::from_env();
    let client = client().await;
    install_crd(&client).await;
    let operator_ns = namespace(&client).await;
    let pipeline_ns = namespace(&client).await;

    let chart = chart();
    helm(&[
        "install",
        "sluice",
        &chart,
        "--namespace",
        &operator_ns,
        "--set",
        "replicaCount=1",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let release = Release {
        namespace: operator_ns.clone(),
    };

    // The APIService trusts the certificate the chart made for the operator's Service.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &operator_ns);
    let secret = secrets
        .get("sluice-operator-tls")
        .await
        .expect("the TLS Secret");
    let secret = serde_json::to_value(&secret).expect("json");
    verify_certificate(&secret, &format!("sluice-operator.{operator_ns}.svc"));
    let api_service = run(
        "kubectl",
        &[
            "get",
            "apiservice",
            "v1beta1.external.metrics.k8s.io",
            "-o",
            "json",
        ],
        None,
    )
    .expect("the APIService exists");
    let api_service: Value = serde_json::from_str(&api_service).expect("json");
    assert_eq!(api_service["spec"]["caBundle"], secret["data"]["ca.crt"]);

    // The operator, as a local process, with the chart's ServiceAccount and nothing else.
    let token = run(
        "kubectl",
        &[
            "create",
            "token",
            "sluice-operator",
            "--namespace",
            &operator_ns,
            "--duration",
            "1h",
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = kubeconfig_with_token(token.trim(), dir.path());
    let kubeconfig_path = kubeconfig.display().to_string();
    let can_i = |what: &[&str]| {
        let mut args = vec!["--kubeconfig", kubeconfig_path.as_str(), "auth", "can-i"];
        args.extend(what);
        run("kubectl", &args, None).is_ok_and(|answer| answer.trim() == "yes")
    };
    assert!(
        can_i(&["patch", "pipelineconfigs.sluice.dev", "--all-namespaces"]),
        "the token works"
    );
    assert!(
        can_i(&["watch", "secrets", "--all-namespaces"]),
        "the operator watches Secrets, so that a changed one reconciles its pipelines"
    );
    for denied in [
        &["create", "namespaces"][..],
        &["delete", "pipelineconfigs.sluice.dev", "--all-namespaces"],
        &["update", "secrets", "--all-namespaces"],
        &["delete", "secrets", "--all-namespaces"],
        &["create", "clusterroles"],
        &["delete", "configmaps", "--all-namespaces"],
    ] {
        assert!(
            !can_i(denied),
            "the operator's identity cannot do what it does not need: {denied:?}"
        );
    }
    let metrics = free_port().expect("port");
    let external = free_port().expect("port");
    let mut operator = Process::spawn(
        "sluice-operator",
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
            "--external-metrics-listen",
            &format!("127.0.0.1:{external}"),
            "--lease-name",
            "sluice-operator",
            "--lease-duration",
            "4",
        ],
        &[
            ("KUBECONFIG", kubeconfig_path.as_str()),
            ("POD_NAMESPACE", operator_ns.as_str()),
            ("POD_NAME", "sluice-operator-local"),
        ],
    )
    .expect("operator started");

    // The workload 1 example, pointed at the test's broker and topics of its own.
    let text = std::fs::read_to_string(repo().join("manifests/examples/clickstream.yaml"))
        .expect("the example");
    let mut example: Value = serde_yaml_ng::from_str(&text).expect("yaml");
    let tag = uuid_like();
    example["metadata"]["namespace"] = json!(pipeline_ns);
    example["spec"]["kafka"]["bootstrapServers"] = json!(stack.kafka_brokers);
    for s in example["spec"]["streams"].as_array_mut().expect("streams") {
        let name = s["name"].as_str().expect("name").to_owned();
        s["topic"]["name"] = json!(format!("chart-{tag}-{name}"));
    }
    let pc: PipelineConfig = serde_json::from_value(example).expect("a PipelineConfig");
    let api: Api<PipelineConfig> = Api::namespaced(client.clone(), &pipeline_ns);
    api.create(&PostParams::default(), &pc)
        .await
        .expect("created");

    let ready = wait_for("the example to be Ready", Duration::from_secs(120), || {
        let api = api.clone();
        async move {
            let c = condition(&api, "clickstream", "Ready").await;
            Ok(c.filter(|c| c.0 == "True"))
        }
    })
    .await;
    if ready.is_err() {
        let status = api.get("clickstream").await.map(|p| p.status);
        panic!("not Ready with the chart's identity: {status:?}");
    }
    assert!(operator.running(), "the operator runs on");

    // Its Events and its Lease went through the same identity.
    let events: Api<Event> = Api::namespaced(client.clone(), &pipeline_ns);
    let published = events.list(&ListParams::default()).await.expect("events");
    assert!(
        published
            .items
            .iter()
            .any(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("clickstream")),
        "the operator published Events on the resource"
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &operator_ns);
    let lease = leases.get("sluice-operator").await.expect("the Lease");
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert!(
        holder.starts_with("sluice-operator-local"),
        "the local operator holds the chart's Lease: {holder}"
    );

    // Deletion runs the finalizer with the same identity.
    api.delete("clickstream", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_for("the example to be gone", Duration::from_secs(60), || {
        let api = api.clone();
        async move { Ok(api.get_opt("clickstream").await?.is_none().then_some(())) }
    })
    .await
    .expect("the finalizer ran");
    operator.kill().expect("operator stopped");
    delete_namespace(&client, &pipeline_ns).await;
    drop(release);
    delete_namespace(&client, &operator_ns).await;
}
