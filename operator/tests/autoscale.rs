//! Collectors scale on consumer lag through the real HorizontalPodAutoscaler: the operator
//! serves `external.metrics.k8s.io` over HTTPS, an APIService on the real kube-apiserver
//! points at it, and kube-controller-manager's HPA controller scales the collector's
//! Deployment from the lag it reads there.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice_core::Envelope;
use sluice_operator::crd::PipelineConfig;
use sluice_testkit::wait_for;

use common::{Operator, client, condition, install_crd, namespace, spawn_operator};

const APISERVICE: &str = "v1beta1.external.metrics.k8s.io";

/// Removes the APIService when the test ends, even on failure: an APIService without a
/// server behind it stops namespaces from being deleted.
struct Registration;

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kubectl")
            .args([
                "delete",
                "apiservice",
                APISERVICE,
                "--ignore-not-found",
                "--wait=false",
            ])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// An operator process for `ns` without leader election.
fn operator(ns: &str) -> Operator {
    spawn_operator(ns, &["--leader-election", "false"])
}

/// One test at a time owns the cluster's one external metrics APIService.
static APISERVICE_OWNER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Registers the operator on `port` as the external metrics API, through a Service in `ns`,
/// and waits for the APIService to be Available. `verified`: without
/// `insecureSkipTLSVerify` (the operator then sets the `caBundle` itself).
async fn register(client: &kube::Client, ns: &str, port: u16, verified: bool) -> Registration {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let service = serde_json::from_value(json!({
        "metadata": {"name": "sluice-operator"},
        "spec": {"type": "ExternalName", "externalName": "127.0.0.1", "ports": [{"port": port}]}
    }))
    .expect("service");
    services
        .create(&PostParams::default(), &service)
        .await
        .expect("service created");
    let apiservices: Api<APIService> = Api::all(client.clone());
    let registration = Registration;
    let mut spec = json!({
        "group": "external.metrics.k8s.io",
        "version": "v1beta1",
        "service": {"namespace": ns, "name": "sluice-operator", "port": port},
        "groupPriorityMinimum": 100,
        "versionPriority": 100
    });
    if !verified {
        spec["insecureSkipTLSVerify"] = json!(true);
    }
    let apiservice: APIService = serde_json::from_value(json!({
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": APISERVICE},
        "spec": spec
    }))
    .expect("apiservice");
    apiservices
        .patch(
            APISERVICE,
            &PatchParams::apply("sluice-tests").force(),
            &Patch::Apply(&apiservice),
        )
        .await
        .expect("apiservice applied");
    wait_for(
        "the APIService to be Available",
        Duration::from_secs(60),
        || {
            let apiservices = apiservices.clone();
            async move {
                let a = apiservices.get(APISERVICE).await?;
                Ok(a.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .into_iter()
                    .any(|c| c.type_ == "Available" && c.status == "True")
                    .then_some(()))
            }
        },
    )
    .await
    .expect("available");
    registration
}

/// The lag the aggregated API reports, read through the kube-apiserver like the HPA does.
async fn reported_lag(client: &kube::Client, ns: &str) -> anyhow::Result<String> {
    let request = http::Request::get(format!(
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/sluice_consumer_lag?labelSelector=pipeline%3Dlagged%2Ccollector%3Ddrain"
    ))
    .body(Vec::new())?;
    let list: serde_json::Value = client.request(request).await?;
    Ok(list["items"][0]["value"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

#[tokio::test]
async fn the_hpa_scales_a_collector_on_lag_up_to_its_partitions_and_back() {
    let _owner = APISERVICE_OWNER.lock().await;
    let stack = sluice_testkit::Stack::from_env();
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client).await;
    let operator = operator(&ns);
    let port = operator.external;
    let registration = register(&client, &ns, port, false).await;

    let api: Api<PipelineConfig> = Api::namespaced(client.clone(), &ns);
    let stream = sluice_testkit::unique("lag");
    let pc: PipelineConfig = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "PipelineConfig",
        "metadata": {"name": "lagged"},
        "spec": {
            "kafka": {"bootstrapServers": stack.kafka_brokers},
            "streams": [{"name": stream, "topic": {"partitions": 6}}],
            "collectors": [{"name": "drain", "streams": [stream], "sink": {"redis": {}},
                            "autoscale": {"minReplicas": 1, "maxReplicas": 20, "lagPerReplica": 100,
                                          "scaleDownStabilizationSeconds": 0}}],
            "topicDeletionPolicy": "Delete"
        }
    }))
    .expect("resource");
    api.create(&PostParams::default(), &pc)
        .await
        .expect("created");
    let limit = Duration::from_secs(120);
    wait_for("Ready=True", limit, || {
        let api = api.clone();
        async move {
            Ok(condition(&api, "lagged", "Ready")
                .await
                .filter(|c| c.0 == "True"))
        }
    })
    .await
    .expect("ready");

    // Watch the collector's replicas for the whole test.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let highest = Arc::new(AtomicI32::new(0));
    let sampler = {
        let (deployments, highest) = (deployments.clone(), highest.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(d) = deployments.get("lagged-collector-drain").await {
                    highest.fetch_max(replicas(&d), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let scaled_to = |want: i32| {
        let deployments = deployments.clone();
        async move {
            wait_for(&format!("{want} collector replicas"), limit, || {
                let deployments = deployments.clone();
                async move {
                    let d = deployments.get("lagged-collector-drain").await?;
                    Ok((replicas(&d) == want).then_some(()))
                }
            })
            .await
        }
    };
    assert_eq!(reported_lag(&client, &ns).await.expect("lag"), "0");

    // A backlog of 1,200 events wants 12 replicas at 100 each; the topic has 6 partitions.
    let events: Vec<Envelope> = (0..1200)
        .map(|i| Envelope::new(stream.clone(), Some(format!("k{i}")), json!({"n": i})))
        .collect();
    let topic = format!("{ns}.lagged.{stream}");
    sluice_testkit::produce(&stack, &topic, &events)
        .await
        .expect("backlog");
    let produced = Instant::now();
    assert_eq!(reported_lag(&client, &ns).await.expect("lag"), "1200");
    let first_step = wait_for("a scale-up", limit, || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("lagged-collector-drain").await?;
            Ok((replicas(&d) > 1).then(|| produced.elapsed()))
        }
    })
    .await
    .expect("scaled up");
    scaled_to(6).await.expect("scaled to the partition count");
    println!(
        "lag above target -> first scale-up in {:.1}s, 6 replicas in {:.1}s (HPA sync period 1s)",
        first_step.as_secs_f64(),
        produced.elapsed().as_secs_f64()
    );
    wait_for("the lag in the status", limit, || {
        let api = api.clone();
        async move {
            let pc = api.get("lagged").await?;
            let lag = pc
                .status
                .and_then(|s| s.collectors.first().and_then(|c| c.lag));
            Ok((lag == Some(1200)).then_some(()))
        }
    })
    .await
    .expect("status lag");

    // The backlog is drained (the group commits to the end): back to one replica.
    let group = format!("{ns}.lagged.drain");
    sluice_testkit::commit_to_end(&stack, &group, &topic).expect("committed");
    assert_eq!(reported_lag(&client, &ns).await.expect("lag"), "0");
    scaled_to(1).await.expect("scaled down");
    assert_eq!(
        highest.load(Ordering::Relaxed),
        6,
        "never above the partition count"
    );

    // With minReplicas 0 an idle collector goes to zero, and comes back when lag appears.
    api.patch(
        "lagged",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"collectors": [{"name": "drain", "streams": [stream], "sink": {"redis": {}},
            "autoscale": {"minReplicas": 0, "maxReplicas": 20, "lagPerReplica": 100,
                          "scaleDownStabilizationSeconds": 0, "idleSeconds": 2}}]}})),
    )
    .await
    .expect("patched");
    scaled_to(0).await.expect("scaled to zero");
    sluice_testkit::produce(&stack, &topic, &events[..50])
        .await
        .expect("more");
    scaled_to(1).await.expect("back from zero");
    sampler.abort();

    let apiservices: Api<APIService> = Api::all(client.clone());
    apiservices
        .delete(APISERVICE, &DeleteParams::default())
        .await
        .expect("APIService removed");
    drop(registration);
    api.delete("lagged", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_for("the pipeline to be gone", limit, || {
        let api = api.clone();
        async move { Ok(api.get_opt("lagged").await?.is_none().then_some(())) }
    })
    .await
    .expect("finalized");
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("namespace deleted");
}

/// The HTTP status of a GET on the operator's external metrics port with curl, as
/// `client_cert` (certificate and key files) with `headers`; `Err` when the TLS handshake
/// or the connection failed.
fn direct_get(
    port: u16,
    path: &str,
    client_cert: Option<(&std::path::Path, &std::path::Path)>,
    headers: &[&str],
) -> Result<u16, String> {
    let mut command = std::process::Command::new("curl");
    command.args([
        "-sk",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ]);
    if let Some((cert, key)) = client_cert {
        command.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    for h in headers {
        command.args(["-H", h]);
    }
    let out = command
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("curl exited with {}", out.status));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("{e}"))
}

/// `kubectl get --raw` through the apiserver as `user`: the body, or the error kubectl
/// printed.
fn raw_as(user: &str, path: &str) -> Result<String, String> {
    let out = std::process::Command::new("kubectl")
        .args(["get", "--raw", path, "--as", user])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn the_external_metrics_api_answers_the_front_proxy_for_users_rbac_allows() {
    let _owner = APISERVICE_OWNER.lock().await;
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client).await;
    let operator = operator(&ns);
    let port = operator.external;
    let _registration = register(&client, &ns, port, false).await;

    // A user RBAC lets list the metric in this namespace, and one it does not.
    let reader = format!("metrics-reader-{ns}");
    let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(client.clone(), &ns);
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "lag-reader"},
                "rules": [{"apiGroups": ["external.metrics.k8s.io"], "resources": ["sluice_consumer_lag"], "verbs": ["list"]}]
            }))
            .expect("role"),
        )
        .await
        .expect("role created");
    let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
        Api::namespaced(client.clone(), &ns);
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "lag-reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lag-reader"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": reader}]
            }))
            .expect("binding"),
        )
        .await
        .expect("binding created");
    let path = format!(
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/sluice_consumer_lag?labelSelector=pipeline%3Dabsent%2Ccollector%3Dc"
    );

    // Through the apiserver: the allowed user reaches the operator (which knows no such
    // pipeline); the other is refused.
    let answer = wait_for(
        "the reader to get an answer",
        Duration::from_secs(30),
        || async {
            Ok(match raw_as(&reader, &path) {
                Err(e) if e.contains("does not exist") => Some(e),
                _ => None,
            })
        },
    )
    .await
    .expect("the operator answered the reader");
    assert!(
        answer.contains(&format!("PipelineConfig {ns}/absent does not exist")),
        "{answer}"
    );
    let refused = raw_as("nobody", &path).expect_err("refused");
    assert!(
        refused.contains("forbidden") || refused.contains("Forbidden"),
        "{refused}"
    );

    // Directly on the operator's port: without a client certificate the handshake fails,
    // and with one from another CA too.
    assert!(
        direct_get(port, &path, None, &[]).is_err(),
        "no client certificate"
    );
    let dir = tempfile::tempdir().expect("dir");
    let other = sluice_operator::external::self_signed(vec!["front-proxy-client".into()])
        .expect("certificate");
    let (other_cert, other_key) = (dir.path().join("other.crt"), dir.path().join("other.key"));
    std::fs::write(&other_cert, other.cert_pem).expect("write");
    std::fs::write(&other_key, other.key_pem).expect("write");
    assert!(
        direct_get(port, &path, Some((&other_cert, &other_key)), &[]).is_err(),
        "a certificate of another CA"
    );
    // With the front proxy's own certificate, the user it names decides.
    let kubeconfig = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let pki = std::path::Path::new(&kubeconfig)
        .parent()
        .expect("cluster directory")
        .join("pki");
    let proxy = Some((pki.join("admin.crt"), pki.join("admin.key")));
    let proxy = proxy.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    assert_eq!(
        direct_get(port, &path, proxy, &[]),
        Ok(401),
        "no user named"
    );
    assert_eq!(
        direct_get(port, &path, proxy, &["X-Remote-User: nobody"]),
        Ok(403),
        "a user RBAC refuses"
    );
    let named = format!("X-Remote-User: {reader}");
    assert_eq!(
        direct_get(port, &path, proxy, &[&named]),
        Ok(404),
        "a user RBAC allows"
    );
    assert_eq!(
        direct_get(
            port,
            "/apis/external.metrics.k8s.io/v1beta1",
            proxy,
            &["X-Remote-User: nobody"]
        ),
        Ok(200),
        "discovery, for any user the front proxy names"
    );
    let forbidden = common::metric(
        operator.metrics,
        "sluice_operator_external_metric_requests_total{result=\"forbidden\"}",
    )
    .await
    .unwrap_or_default();
    assert!(forbidden >= 1.0, "refusals are counted: {forbidden}");

    let namespaces: Api<Namespace> = Api::all(client);
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}

#[tokio::test]
async fn an_operator_keeping_its_own_certificate_is_verified_by_the_apiserver() {
    let _owner = APISERVICE_OWNER.lock().await;
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client).await;
    let names = format!("sluice-operator.{ns}.svc,localhost");
    let args = [
        "--leader-election",
        "false",
        "--lease-namespace",
        ns.as_str(),
        "--tls-secret",
        "sluice-operator-tls",
        "--apiservice",
        APISERVICE,
        "--tls-name",
        names.as_str(),
        "--tls-reload-seconds",
        "2",
    ];
    let first = spawn_operator(&ns, &args);
    // Available only once the apiserver verified the operator's certificate against the
    // caBundle the operator set: the APIService has no insecureSkipTLSVerify.
    let registration = register(&client, &ns, first.external, true).await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let secret = secrets
        .get("sluice-operator-tls")
        .await
        .expect("the certificate's Secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.expect("data");
    let apiservices: Api<APIService> = Api::all(client.clone());
    let bundle = apiservices
        .get(APISERVICE)
        .await
        .expect("apiservice")
        .spec
        .and_then(|s| s.ca_bundle)
        .expect("a caBundle");
    assert_eq!(bundle, data["ca.crt"]);
    assert!(
        String::from_utf8_lossy(&data["tls.key"].0).contains("PRIVATE KEY"),
        "the key is kept with it"
    );
    // Through the apiserver, as the HPA controller reads it.
    let discovery: serde_json::Value = client
        .request(
            http::Request::get("/apis/external.metrics.k8s.io/v1beta1")
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("discovery through the aggregator");
    assert_eq!(discovery["groupVersion"], "external.metrics.k8s.io/v1beta1");

    // Another replica (or a restart) serves the same certificate: the Secret is unchanged.
    drop(first);
    let second = spawn_operator(&ns, &args);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    services
        .patch(
            "sluice-operator",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ports": [{"port": second.external}]}})),
        )
        .await
        .expect("service moved to the second process");
    apiservices
        .patch(
            APISERVICE,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"service": {"port": second.external}}})),
        )
        .await
        .expect("apiservice moved");
    wait_for(
        "discovery through the aggregator from the second process",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move {
                let request =
                    http::Request::get("/apis/external.metrics.k8s.io/v1beta1").body(Vec::new())?;
                Ok(client
                    .request::<serde_json::Value>(request)
                    .await
                    .ok()
                    .filter(|d| d["groupVersion"] == "external.metrics.k8s.io/v1beta1"))
            }
        },
    )
    .await
    .expect("the second process is verified too");
    let again = secrets.get("sluice-operator-tls").await.expect("secret");
    assert_eq!(again.data.expect("data")["tls.crt"], data["tls.crt"]);
    drop(registration);
}
