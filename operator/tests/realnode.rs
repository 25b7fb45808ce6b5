//! Sluice in real pods on the real node that `scripts/realnode` runs (containerd, kubelet,
//! kube-proxy, CoreDNS): the chart installs the operator from the images built here from
//! `docker/Dockerfile`, and it runs with in-cluster config and its ServiceAccount; the
//! APIService reaches it through the chart's Service and generated certificate; an example
//! PipelineConfig becomes ingest, collector and Redis pods that take events through a
//! NodePort and serve them back; and the HorizontalPodAutoscaler scales the real
//! collectors on the lag they drain themselves, one of them deleted mid-drain, with every
//! event in the sink afterwards; under a steady load, an ingest pod deleted and a settings
//! change that rolls ingest fail no request; the managed Redis primary deleted and then
//! SIGKILLed, and a file collector scaled from three replicas to one and back, lose and
//! duplicate no acknowledged event (claims from the node's pool of volumes). Every namespace enforces the Pod Security
//! `restricted` profile, so the admission controller checks the pods' security contexts.
//!
//! Needs the real node and its images (`eval "$(scripts/realnode up)"`, then
//! `scripts/realnode images`), the stack's Kafka started after the node so that it has a
//! listener for pods (`SLUICE_STACK_KAFKA_POD_BROKERS`), and `helm` and `kubectl` on PATH
//! (`eval "$(scripts/k8s env)"`). `make test` does all of this.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use sluice_core::store::DEFAULT_PREFIX;
use sluice_operator::crd::PipelineConfig;
use sluice_testkit::wait_for;

use common::{condition, uuid_like};

/// Where the chart is installed, and the operator's name in it.
const RELEASE_NAMESPACE: &str = "sluice-system";
const OPERATOR: &str = "sluice-operator";
const APISERVICE: &str = "v1beta1.external.metrics.k8s.io";
/// The real node's name (scripts/realnode).
const NODE: &str = "sluice-node";

/// The real node's cluster, from the environment `scripts/realnode` and `scripts/stack`
/// print.
struct RealNode {
    kubeconfig: String,
    /// Kafka's listener for pods.
    pod_brokers: String,
    /// The address NodePorts answer on.
    host: String,
    /// The node's containerd socket.
    containerd: String,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: start the real node with `eval \"$(scripts/realnode up)\"`, then the stack \
             (`eval \"$(scripts/stack up)\"`), or run `make test`"
        )
    })
}

fn real_node() -> RealNode {
    RealNode {
        kubeconfig: var("SLUICE_REALNODE_KUBECONFIG"),
        pod_brokers: var("SLUICE_STACK_KAFKA_POD_BROKERS"),
        host: var("SLUICE_REALNODE_NODEPORT_HOST"),
        containerd: var("SLUICE_REALNODE_CONTAINERD"),
    }
}

async fn client(node: &RealNode) -> Client {
    let kubeconfig = Kubeconfig::read_from(&node.kubeconfig).expect("the real node's kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("kube client")
}

/// Runs `program` against the real node's cluster; its standard output, or what it said.
fn run(node: &RealNode, program: &str, args: &[&str]) -> Result<String, String> {
    common::run(program, args, None, &[("KUBECONFIG", &node.kubeconfig)])
}

/// Applies a document with kubectl (server-side).
fn apply(node: &RealNode, document: &Value) -> Result<String, String> {
    common::run(
        "kubectl",
        &[
            "apply",
            "--server-side",
            "--field-manager=sluice-tests",
            "-f",
            "-",
        ],
        Some(&document.to_string()),
        &[("KUBECONFIG", &node.kubeconfig)],
    )
}

/// The labels that make the apiserver's Pod Security admission enforce `restricted`.
fn restricted_labels() -> Value {
    json!({
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    })
}

/// Installs the chart once for the tests of this file, with its default images (the ones
/// `scripts/realnode images` built) and Debian's Redis for the pipelines, and waits until
/// helm sees the operator's Deployment available.
fn chart_installed(node: &RealNode) {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        apply(
            node,
            &json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": RELEASE_NAMESPACE, "labels": restricted_labels()}}),
        )?;
        let chart = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/sluice")
            .display()
            .to_string();
        // helm upgrade leaves a CRD it installed before as it was.
        run(
            node,
            "kubectl",
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                &format!("{chart}/crds/pipelineconfigs.yaml"),
            ],
        )?;
        run(
            node,
            "helm",
            &[
                "upgrade",
                "--install",
                "sluice",
                &chart,
                "--namespace",
                RELEASE_NAMESPACE,
                "--set",
                "images.redis.repository=localhost/sluice-redis",
                "--set-string",
                "images.redis.tag=7.0",
                "--wait",
                "--timeout",
                "5m",
            ],
        )
        .map(|_| ())
    });
    if let Err(e) = installed {
        panic!("helm install of charts/sluice on the real node: {e}");
    }
}

/// A namespace of this test, with the `restricted` profile enforced.
async fn restricted_namespace(client: &Client) -> String {
    let name = format!("sluice-real-{}", uuid_like());
    let mut labels = restricted_labels();
    labels["sluice.dev/test"] = json!("true");
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    name
}

fn ready_pod(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `GET` of an aggregated API path through the apiserver, as `kubectl get --raw` does.
fn get_raw(node: &RealNode, path: &str) -> Result<Value, String> {
    let text = run(node, "kubectl", &["get", "--raw", path])?;
    serde_json::from_str(&text).map_err(|e| format!("{path}: {e}: {text}"))
}

/// The lag the operator reports for a collector through the apiserver.
fn lag(node: &RealNode, namespace: &str, pipeline: &str, collector: &str) -> Result<i64, String> {
    let list = get_raw(
        node,
        &format!(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/sluice_consumer_lag\
             ?labelSelector=pipeline%3D{pipeline}%2Ccollector%3D{collector}"
        ),
    )?;
    list["items"][0]["value"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no lag value in {list}"))
}

/// An example from `manifests/examples/`, renamed for this test (the pipeline, and its
/// streams, whose names are Kafka topic and group names) and pointed at the test broker.
fn example(file: &str, node: &RealNode) -> (PipelineConfig, BTreeMap<String, String>) {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/examples")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("example");
    let mut pc: PipelineConfig = serde_yaml_ng::from_str(&text).expect("example parses");
    let id = uuid_like();
    pc.metadata.name = Some(format!("{}-{id}", pc.name_any()));
    pc.spec.kafka.bootstrap_servers = node.pod_brokers.clone();
    pc.spec.topic_deletion_policy = sluice_operator::crd::TopicDeletionPolicy::Delete;
    let renamed: BTreeMap<String, String> = pc
        .spec
        .streams
        .iter()
        .map(|s| (s.name.clone(), format!("{}-{id}", s.name)))
        .collect();
    for s in &mut pc.spec.streams {
        s.name = renamed[&s.name].clone();
    }
    for c in &mut pc.spec.collectors {
        for s in &mut c.streams {
            *s = renamed[s].clone();
        }
    }
    (pc, renamed)
}

async fn create(client: &Client, namespace: &str, pc: &PipelineConfig) -> Api<PipelineConfig> {
    let api: Api<PipelineConfig> = Api::namespaced(client.clone(), namespace);
    api.create(&PostParams::default(), pc)
        .await
        .expect("PipelineConfig created");
    api
}

/// A NodePort Service for the pipeline's ingest HTTP port, as `manifests/kind-nodeports.yaml`
/// gives kind; the base URL it answers on, once ingest answers there.
async fn ingest_nodeport(
    client: &Client,
    node: &RealNode,
    namespace: &str,
    pipeline: &str,
) -> String {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": format!("{pipeline}-ingest-nodeport")},
        "spec": {
            "type": "NodePort",
            "selector": {"app.kubernetes.io/instance": pipeline, "app.kubernetes.io/component": "ingest"},
            "ports": [{"name": "http", "port": 8080, "targetPort": "http"}],
        }
    }))
    .expect("service");
    let created = services
        .create(&PostParams::default(), &service)
        .await
        .expect("NodePort Service created");
    let port = created
        .spec
        .and_then(|s| s.ports)
        .and_then(|p| p.into_iter().next())
        .and_then(|p| p.node_port)
        .expect("a node port");
    let base = format!("http://{}:{port}", node.host);
    // kube-proxy opens the port a moment after the Service is created. Health and metrics
    // are not on this port: the API document is.
    wait_for(
        "ingest to answer through the NodePort",
        Duration::from_secs(120),
        || async {
            let r = reqwest::get(format!("{base}/openapi.json")).await?;
            Ok((r.status() == 200).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // The image carries the dashboard, built into the binary.
    let page = reqwest::get(format!("{base}/ui/"))
        .await
        .expect("GET /ui/ through the NodePort");
    assert_eq!(page.status(), 200, "the image serves the dashboard");
    let html = page.text().await.expect("the page");
    assert!(
        html.contains("<title>Sluice"),
        "the dashboard's page: {html}"
    );
    base
}

async fn pipeline_ready(
    node: &RealNode,
    api: &Api<PipelineConfig>,
    namespace: &str,
    name: &str,
    limit: Duration,
) {
    let ready = wait_for("the pipeline to become Ready", limit, || async {
        Ok(condition(api, name, "Ready")
            .await
            .filter(|(status, _, _)| status == "True"))
    })
    .await;
    if let Err(e) = ready {
        panic!("{e}\n{}", what_kubectl_shows(node, namespace));
    }
}

/// What a user would look at when a pipeline does not become Ready: its status, its
/// children and their events, and the operator's last log lines.
fn what_kubectl_shows(node: &RealNode, namespace: &str) -> String {
    let commands: [&[&str]; 5] = [
        &["get", "pcfg,deploy,sts,pods", "-n", namespace, "-o", "wide"],
        &[
            "get",
            "pcfg",
            "-n",
            namespace,
            "-o",
            "jsonpath={.items[*].status}",
        ],
        &["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"],
        &[
            "logs",
            "-n",
            namespace,
            "-l",
            "app.kubernetes.io/managed-by=sluice-operator",
            "--all-containers",
            "--tail=10",
            "--prefix",
        ],
        &[
            "logs",
            "-n",
            RELEASE_NAMESPACE,
            "-l",
            "app.kubernetes.io/name=sluice-operator",
            "--tail=40",
            "--prefix",
        ],
    ];
    commands
        .iter()
        .map(|args| {
            let out = run(node, "kubectl", args).unwrap_or_else(|e| e);
            format!("$ kubectl {}\n{out}", args.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Deletes the pipeline, waits until the operator's finalizer let it go (its topics are
/// deleted with it), then deletes the namespace.
async fn remove(
    client: &Client,
    api: &Api<PipelineConfig>,
    name: &str,
    namespace: &str,
    limit: Duration,
) {
    api.delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("the pipeline to be deleted", limit, || async {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let _ = Api::<Namespace>::all(client.clone())
        .delete(namespace, &DeleteParams::default())
        .await;
}

/// The pipeline's managed Redis primary, through its ClusterIP (routed to the node's
/// bridge), with the password the operator generated (Redis refuses commands without it).
async fn pipeline_redis(
    client: &Client,
    namespace: &str,
    pipeline: &str,
) -> redis::aio::MultiplexedConnection {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let redis_ip = services
        .get(&format!("{pipeline}-redis"))
        .await
        .expect("redis service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("cluster IP");
    let url = format!("redis://{redis_ip}:6379");
    let mut anonymous = redis::Client::open(url.as_str())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("the pipeline's Redis through its ClusterIP");
    let refused = redis::cmd("GET")
        .arg("sluice:any")
        .query_async::<Option<String>>(&mut anonymous)
        .await
        .expect_err("the managed Redis answers no client without its password");
    assert!(
        refused.to_string().contains("NOAUTH"),
        "refused for want of authentication: {refused}"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get(&format!("{pipeline}-redis-auth"))
        .await
        .expect("the generated password's Secret");
    let password =
        String::from_utf8(secret.data.expect("data")["password"].0.clone()).expect("text");
    assert_eq!(password.len(), 64, "256 random bits, hex");
    // Thousands of lookups in one round trip take longer than the client's default half
    // second on a loaded machine.
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(30)));
    sluice_core::store::redis_client(&url, Some(&password))
        .expect("redis url")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("the pipeline's Redis with its password")
}

/// How many of `ids` have no record of `stream` in the pipeline's Redis.
async fn missing_in_redis(
    redis: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    ids: &[String],
) -> usize {
    let mut missing = 0usize;
    for chunk in ids.chunks(5_000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.exists(format!("{DEFAULT_PREFIX}:{stream}:{id}"));
        }
        let found: Vec<bool> = pipe.query_async(redis).await.expect("EXISTS");
        missing += found.iter().filter(|f| !**f).count();
    }
    missing
}

/// An example pipeline on the real node, in a restricted namespace of its own, Ready, with
/// a NodePort to its ingest.
struct Deployed {
    node: RealNode,
    client: Client,
    ns: String,
    api: Api<PipelineConfig>,
    name: String,
    /// The example's stream names, to the names they were given.
    streams: BTreeMap<String, String>,
    base: String,
}

impl Deployed {
    /// Deploys `file` from `manifests/examples` as `edit` changes it.
    async fn example(file: &str, limit: Duration, edit: impl FnOnce(&mut PipelineConfig)) -> Self {
        Self::example_with(file, limit, &[], edit).await
    }

    /// Like [`Deployed::example`], with `secrets` created in the namespace first.
    async fn example_with(
        file: &str,
        limit: Duration,
        secrets: &[Secret],
        edit: impl FnOnce(&mut PipelineConfig),
    ) -> Self {
        let node = real_node();
        chart_installed(&node);
        let client = client(&node).await;
        let ns = restricted_namespace(&client).await;
        let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        for secret in secrets {
            api.create(&PostParams::default(), secret)
                .await
                .expect("Secret created");
        }
        let (mut pc, streams) = example(file, &node);
        edit(&mut pc);
        let name = pc.name_any();
        let api = create(&client, &ns, &pc).await;
        pipeline_ready(&node, &api, &ns, &name, limit).await;
        let base = ingest_nodeport(&client, &node, &ns, &name).await;
        Self {
            node,
            client,
            ns,
            api,
            name,
            streams,
            base,
        }
    }

    async fn remove(self, limit: Duration) {
        remove(&self.client, &self.api, &self.name, &self.ns, limit).await;
    }
}

/// Clients that each POST one event after another through their own keep-alive
/// connection, as a steady load, until stopped.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<LoadOutcome>>,
}

/// What the clients of a [`SteadyLoad`] saw.
#[derive(Default)]
struct LoadOutcome {
    /// Ids of the events answered `202`.
    acknowledged: Vec<String>,
    /// Every other answer, and every request that got no answer (reset, refused, timed
    /// out), with the error's causes.
    failed: Vec<String>,
}

/// An error with its causes, as one line.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl SteadyLoad {
    fn start(base: &str, stream: &str, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let url = format!("{base}/v1/streams/{stream}/events");
        let run = uuid_like();
        let clients = (0..clients)
            .map(|c| {
                let (stop, acknowledged, url) = (stop.clone(), acknowledged.clone(), url.clone());
                let prefix = format!("load-{run}-{c}");
                tokio::spawn(async move {
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()
                        .expect("client");
                    let mut outcome = LoadOutcome::default();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let id = format!("{prefix}-{n}");
                        match http
                            .post(&url)
                            .json(&json!({"id": id, "n": n, "userId": format!("user-{c}-{}", n % 16)}))
                            .send()
                            .await
                        {
                            Ok(r) if r.status() == 202 => {
                                outcome.acknowledged.push(id);
                                acknowledged.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => outcome.failed.push(format!(
                                "{id}: {} (Retry-After {:?})",
                                r.status(),
                                r.headers().get("retry-after")
                            )),
                            Err(e) => outcome.failed.push(format!("{id}: {}", causes(&e))),
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    outcome
                })
            })
            .collect();
        Self {
            stop,
            acknowledged,
            clients,
        }
    }

    /// Waits until `more` events beyond those acknowledged so far are acknowledged.
    async fn progress(&self, more: usize, limit: Duration) {
        let target = self.acknowledged.load(Ordering::Relaxed) + more;
        wait_for(
            &format!("the load to get {more} more events acknowledged"),
            limit,
            || async { Ok((self.acknowledged.load(Ordering::Relaxed) >= target).then_some(())) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn finish(self) -> LoadOutcome {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadOutcome::default();
        for client in self.clients {
            let o = client.await.expect("load client");
            all.acknowledged.extend(o.acknowledged);
            all.failed.extend(o.failed);
        }
        all
    }
}

/// The pipeline's ingest pods that are not being deleted, once there are `want` of them,
/// all Ready and none other terminating; their names with their settings checksum.
async fn settled_ingest_pods(
    pods: &Api<Pod>,
    pipeline: &str,
    want: usize,
    limit: Duration,
) -> BTreeMap<String, String> {
    let selector = ListParams::default().labels(&format!(
        "app.kubernetes.io/instance={pipeline},app.kubernetes.io/component=ingest"
    ));
    wait_for(
        &format!("{want} Ready ingest pods and no other"),
        limit,
        || async {
            let list = pods.list(&selector).await?;
            let settled = list.items.len() == want
                && list
                    .items
                    .iter()
                    .all(|p| ready_pod(p) && p.metadata.deletion_timestamp.is_none());
            Ok(settled.then(|| {
                list.items
                    .iter()
                    .map(|p| {
                        let sum = p
                            .annotations()
                            .get("sluice.dev/settings-checksum")
                            .cloned()
                            .unwrap_or_default();
                        (p.name_any(), sum)
                    })
                    .collect()
            }))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn the_chart_runs_the_operator_in_real_pods_behind_the_apiservice() {
    let node = real_node();
    chart_installed(&node);
    let client = client(&node).await;
    let limit = Duration::from_secs(180);

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    wait_for("both operator replicas Ready", limit, || async {
        let d = deployments.get(OPERATOR).await?;
        Ok((d.status.and_then(|s| s.ready_replicas) == Some(2)).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let operators = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=sluice-operator"))
        .await
        .expect("operator pods");
    let names: BTreeSet<String> = operators
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.name_any())
        .collect();
    assert_eq!(names.len(), 2, "two operator pods: {names:?}");
    for pod in operators
        .items
        .iter()
        .filter(|p| names.contains(&p.name_any()))
    {
        let spec = pod.spec.as_ref().expect("pod spec");
        assert_eq!(
            spec.node_name.as_deref(),
            Some(NODE),
            "{} runs on the real node",
            pod.name_any()
        );
        assert_eq!(spec.service_account_name.as_deref(), Some(OPERATOR));
        assert!(
            ready_pod(pod),
            "{} is Ready through its probes",
            pod.name_any()
        );
        let image = spec.containers[0].image.clone().unwrap_or_default();
        assert!(
            image.starts_with("ghcr.io/sluice-dev/sluice-operator:"),
            "the chart's default image: {image}"
        );
    }

    // The replicas elect a leader through the apiserver with their ServiceAccount; an
    // operator's identity is its pod's name and process id.
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let of_a_pod = |holder: &String| names.iter().any(|n| holder.starts_with(&format!("{n}-")));
    wait_for("an operator pod to hold the Lease", limit, || async {
        let lease = leases.get_opt(OPERATOR).await?;
        Ok(lease
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(of_a_pod))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // The aggregator reaches the operator through the chart's Service, trusting the CA the
    // chart generated.
    let apiservices: Api<APIService> = Api::all(client.clone());
    let available = wait_for("the APIService to become Available", limit, || async {
        let a = apiservices.get(APISERVICE).await?;
        let is_available = a
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Available" && c.status == "True")
            });
        Ok(is_available.then_some(a))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let spec = available.spec.expect("APIService spec");
    assert_ne!(spec.insecure_skip_tls_verify, Some(true), "TLS is verified");
    assert!(
        spec.ca_bundle.is_some_and(|b| !b.0.is_empty()),
        "the chart's CA is in the caBundle"
    );
    assert_eq!(
        spec.service.and_then(|s| s.name).as_deref(),
        Some(OPERATOR),
        "through the chart's Service"
    );
    let resources =
        get_raw(&node, "/apis/external.metrics.k8s.io/v1beta1").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        resources.to_string().contains("sluice_consumer_lag"),
        "the API lists the lag metric: {resources}"
    );
}

#[tokio::test]
async fn an_example_pipeline_runs_in_real_pods_and_serves_its_events() {
    let limit = Duration::from_secs(240);
    let deployed = Deployed::example("kv-store.yaml", limit, |_| {}).await;
    let Deployed {
        node,
        client,
        ns,
        api,
        name,
        base,
        ..
    } = &deployed;
    let stream = deployed.streams["items"].clone();

    // Every pod of the pipeline runs on the real node and is Ready.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods.list(&ListParams::default()).await.expect("pods");
    let components: BTreeSet<String> = list
        .items
        .iter()
        .filter(|p| ready_pod(p))
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE))
        .filter_map(|p| p.labels().get("app.kubernetes.io/component").cloned())
        .collect();
    for component in ["ingest", "collector-to-redis", "redis", "redis-replica"] {
        assert!(
            components.contains(component),
            "a Ready {component} pod on the real node; Ready components: {components:?}"
        );
    }

    // Events in through the NodePort, back out of the pipeline's Redis through GET.
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = format!("item-{i}-{}", uuid_like());
        let answer = wait_for(
            "ingest to take an event through the NodePort",
            limit,
            || async {
                let r = http
                    .post(format!("{base}/v1/streams/{stream}/events"))
                    .json(&json!({"id": id, "name": format!("item {i}")}))
                    .send()
                    .await?;
                Ok((r.status() == 202).then_some(r.json::<Value>().await?))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer["id"], id.as_str());
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate() {
        let record = wait_for("the record to be readable through GET", limit, || async {
            let r = http
                .get(format!("{base}/v1/streams/{stream}/records/{id}"))
                .send()
                .await?;
            Ok((r.status() == 200).then_some(r.json::<Value>().await?))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(record["payload"]["name"], format!("item {i}"));
        assert_eq!(record["stream"], stream.as_str());
    }

    // ack=sink across pods: the collector pod confirms to the ingest pod through the
    // pipeline's Redis, and the record is readable as soon as the answer comes.
    let id = format!("item-acked-{}", uuid_like());
    let answer: Value = http
        .post(format!(
            "{base}/v1/streams/{stream}/events?ack=sink&timeout=30s"
        ))
        .json(&json!({"id": id, "name": "acked"}))
        .send()
        .await
        .expect("POST ack=sink")
        .json()
        .await
        .expect("answer");
    assert_eq!(answer["sink"], "written", "{answer}");
    let record = http
        .get(format!("{base}/v1/streams/{stream}/records/{id}"))
        .send()
        .await
        .expect("GET");
    assert_eq!(
        record.status(),
        200,
        "readable right after the ack=sink answer"
    );

    // What a user sees: kubectl shows the pipeline Ready, and the lag through the
    // apiserver drops to zero once the collector wrote the events.
    let table =
        run(node, "kubectl", &["get", "pcfg", "-n", ns, name]).unwrap_or_else(|e| panic!("{e}"));
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(
        row.split_whitespace().nth(1) == Some("True"),
        "kubectl get pcfg shows READY True: {table}"
    );
    wait_for("the collector's lag to reach 0", limit, || async {
        Ok(lag(node, ns, name, "to-redis").ok().filter(|l| *l == 0))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // Two ingest replicas under a steady load: one pod deleted, then a settings change
    // that rolls every ingest pod. Draining instances (readiness failing, each answer
    // closing its connection, then the stop) fail no request.
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ingest": {"replicas": {"min": 2, "max": 4}}}})),
    )
    .await
    .expect("two ingest replicas");
    let before = settled_ingest_pods(&pods, name, 2, limit).await;
    let load = SteadyLoad::start(base, &stream, 8);
    load.progress(200, limit).await;

    let deleted = before.keys().next().expect("an ingest pod").clone();
    pods.delete(&deleted, &DeleteParams::default())
        .await
        .expect("ingest pod deleted");
    let after_delete = settled_ingest_pods(&pods, name, 2, limit).await;
    assert!(!after_delete.contains_key(&deleted), "{after_delete:?}");
    load.progress(200, limit).await;

    let mut streams_now = api.get(name).await.expect("pipeline").spec.streams;
    let mut added = streams_now[0].clone();
    added.name = format!("{stream}-more");
    streams_now.push(added);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"streams": streams_now}})),
    )
    .await
    .expect("a stream added to the settings");
    let old_sum = after_delete.values().next().cloned().unwrap_or_default();
    let rolled = wait_for(
        "every ingest pod to roll to the new settings",
        limit,
        || async {
            let now = settled_ingest_pods(&pods, name, 2, limit).await;
            Ok(now.values().all(|sum| *sum != old_sum).then_some(now))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        rolled.keys().all(|p| !after_delete.contains_key(p)),
        "new pods: {rolled:?}"
    );
    load.progress(200, limit).await;

    let outcome = load.finish().await;
    eprintln!(
        "steady load through an ingest pod deletion and a rollout: {} events acknowledged, {} failed",
        outcome.acknowledged.len(),
        outcome.failed.len()
    );
    assert!(
        outcome.failed.is_empty(),
        "{} of {} requests failed, first: {:?}",
        outcome.failed.len(),
        outcome.failed.len() + outcome.acknowledged.len(),
        &outcome.failed[..outcome.failed.len().min(10)]
    );
    wait_for("the collector's lag to reach 0", limit, || async {
        Ok(lag(node, ns, name, "to-redis").ok().filter(|l| *l == 0))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut redis = pipeline_redis(client, ns, name).await;
    assert_eq!(
        missing_in_redis(&mut redis, &stream, &outcome.acknowledged).await,
        0,
        "every acknowledged event is in the sink"
    );

    deployed.remove(limit).await;
}

/// Replicas of a Deployment: (spec, ready).
async fn replicas(deployments: &Api<Deployment>, name: &str) -> anyhow::Result<(i32, i32)> {
    let d = deployments.get(name).await?;
    Ok((
        d.spec.and_then(|s| s.replicas).unwrap_or(0),
        d.status.and_then(|s| s.ready_replicas).unwrap_or(0),
    ))
}

#[tokio::test]
async fn the_hpa_scales_real_collectors_on_the_lag_they_drain() {
    let node = real_node();
    chart_installed(&node);
    let client = client(&node).await;
    let ns = restricted_namespace(&client).await;
    let limit = Duration::from_secs(420);
    // A backlog that takes one collector some seconds: longer than the HPA takes to add
    // replicas.
    const EVENTS: usize = 240_000;
    const BATCH: usize = 1_000;

    // The kv-store pipeline at first without its collector: a backlog builds up in Kafka.
    let (mut pc, streams) = example("kv-store.yaml", &node);
    let name = pc.name_any();
    let stream = streams["items"].clone();
    let collector = pc.spec.collectors.remove(0);
    let api = create(&client, &ns, &pc).await;
    pipeline_ready(&node, &api, &ns, &name, limit).await;
    let base = ingest_nodeport(&client, &node, &ns, &name).await;
    let http = reqwest::Client::new();
    let mut ids = Vec::with_capacity(EVENTS);
    for b in 0..EVENTS / BATCH {
        let batch: Vec<Value> = (0..BATCH)
            .map(|i| json!({"id": format!("e{}", b * BATCH + i), "n": b * BATCH + i}))
            .collect();
        let answer = wait_for("ingest to take a batch", limit, || async {
            let r = http
                .post(format!("{base}/v1/streams/{stream}/events"))
                .json(&batch)
                .send()
                .await?;
            Ok((r.status() == 202).then_some(r.json::<Value>().await?))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer["count"], BATCH);
        ids.extend((0..BATCH).map(|i| format!("e{}", b * BATCH + i)));
    }

    // The collector arrives with the example's autoscaling (at most 6 replicas, one per
    // partition) and the default scale-down window.
    let lag_per_replica = collector
        .autoscale
        .as_ref()
        .expect("the example autoscales")
        .lag_per_replica;
    let collector_name = collector.name.clone();
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"collectors": [collector]}})),
    )
    .await
    .expect("collector added");

    let deployment = format!("{name}-collector-{collector_name}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let collector_pods = ListParams::default().labels(&format!(
        "app.kubernetes.io/component=collector-{collector_name}"
    ));
    let mut most = 0;
    let mut drained = false;
    let mut deleted_mid_drain = None;
    let deadline = tokio::time::Instant::now() + limit;
    // Follow the Deployment until the lag is gone and the HPA has scaled it back to one.
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backlog did not drain and scale back within {limit:?} (most replicas {most})"
        );
        let (wanted, ready) = replicas(&deployments, &deployment).await.unwrap_or((0, 0));
        most = most.max(wanted);
        assert!(wanted <= 6, "never above the 6 partitions: {wanted}");
        let current = lag(&node, &ns, &name, &collector_name).ok();
        drained |= current == Some(0);
        // A collector pod is deleted while the backlog drains (as soon as one is Ready:
        // a faster drain must not outrun the test): what it had taken from Kafka but not
        // written must be written by another.
        if deleted_mid_drain.is_none() && ready >= 1 && current.is_some_and(|l| l > 0) {
            let list = pods.list(&collector_pods).await.expect("collector pods");
            if let Some(pod) = list.items.iter().find(|p| ready_pod(p)) {
                pods.delete(&pod.name_any(), &DeleteParams::default())
                    .await
                    .expect("collector pod deleted");
                deleted_mid_drain = Some((pod.name_any(), current.unwrap_or_default()));
            }
        }
        if drained && most > 1 && wanted == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (deleted, lag_then) = deleted_mid_drain.expect("a collector pod was deleted mid-drain");
    eprintln!("deleted collector pod {deleted} with a lag of {lag_then}; at most {most} replicas");
    let hpa = hpas
        .get(&format!("{name}-collector-{collector_name}"))
        .await
        .expect("the collector's HPA");
    assert_eq!(
        hpa.spec.max_replicas, 6,
        "one replica per partition at most"
    );
    assert!(
        most > 1,
        "the HPA scaled the collectors up on a lag of {EVENTS} (target {lag_per_replica} per replica)"
    );

    // Every event is in the pipeline's Redis exactly once, written by the collectors.
    let mut redis = pipeline_redis(&client, &ns, &name).await;
    let missing = missing_in_redis(&mut redis, &stream, &ids).await;
    assert_eq!(missing, 0, "every acknowledged event is in the sink");
    let mut counted = 0i64;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{DEFAULT_PREFIX}:agg:{stream}:*"))
        .query_async(&mut redis)
        .await
        .expect("KEYS");
    for key in keys {
        let c: Option<i64> = redis::cmd("HGET")
            .arg(&key)
            .arg("count")
            .query_async(&mut redis)
            .await
            .expect("HGET");
        counted += c.unwrap_or(0);
    }
    assert_eq!(
        counted, EVENTS as i64,
        "the per-minute aggregates count each event once"
    );

    remove(&client, &api, &name, &ns, limit).await;
}

/// The pod `name` once it is Ready and `changed` says it differs from what it was: its uid,
/// its first container's id in containerd and that container's restarts.
async fn ready_pod_after(
    pods: &Api<Pod>,
    name: &str,
    limit: Duration,
    changed: impl Fn(&str, i32) -> bool,
) -> (String, String, i32) {
    wait_for(&format!("pod {name} Ready again"), limit, || async {
        let Some(pod) = pods.get_opt(name).await? else {
            return Ok(None);
        };
        if !ready_pod(&pod) || pod.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        let uid = pod.uid().unwrap_or_default();
        let status = pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.into_iter().next());
        let Some(c) = status else { return Ok(None) };
        let id = c
            .container_id
            .unwrap_or_default()
            .trim_start_matches("containerd://")
            .to_owned();
        Ok(changed(&uid, c.restart_count).then_some((uid, id, c.restart_count)))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn the_managed_redis_keeps_every_acknowledged_event_when_its_primary_dies_mid_drain() {
    let limit = Duration::from_secs(240);
    // The kv-store example with the operator's defaults for Redis (a primary whose
    // append-only file is synced before each answer, on a volume claim).
    let deployed = Deployed::example("kv-store.yaml", limit, |pc| {
        pc.spec.collectors[0].autoscale = None;
    })
    .await;
    let Deployed {
        node,
        client,
        ns,
        name,
        base,
        ..
    } = &deployed;
    let stream = deployed.streams["items"].clone();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let primary = format!("{name}-redis-0");
    let (uid, _, _) = ready_pod_after(&pods, &primary, limit, |_, _| true).await;

    let load = SteadyLoad::start(base, &stream, 8);
    load.progress(300, limit).await;
    // The primary's pod deleted: the StatefulSet makes a new one on the same claim.
    pods.delete(&primary, &DeleteParams::default())
        .await
        .expect("primary pod deleted");
    let (_, container, restarts) =
        ready_pod_after(&pods, &primary, limit, |now, _| now != uid).await;
    load.progress(300, limit).await;
    // Its container SIGKILLed: kubelet starts it again in the same pod.
    let killed = std::process::Command::new("ctr")
        .args(["-a", &node.containerd, "-n", "k8s.io", "tasks", "kill"])
        .args(["-s", "SIGKILL", &container])
        .output()
        .expect("ctr");
    assert!(
        killed.status.success(),
        "ctr tasks kill: {}",
        String::from_utf8_lossy(&killed.stderr)
    );
    ready_pod_after(&pods, &primary, limit, |_, r| r > restarts).await;
    load.progress(300, limit).await;
    let outcome = load.finish().await;
    assert!(
        outcome.failed.is_empty(),
        "ingest does not need Redis to take events: {:?}",
        &outcome.failed[..outcome.failed.len().min(10)]
    );

    wait_for("the collector's lag to reach 0", limit, || async {
        Ok(lag(node, ns, name, "to-redis").ok().filter(|l| *l == 0))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut redis = pipeline_redis(client, ns, name).await;
    let missing = missing_in_redis(&mut redis, &stream, &outcome.acknowledged).await;
    eprintln!(
        "Redis primary deleted, then SIGKILLed, under load: {} events acknowledged, {missing} missing",
        outcome.acknowledged.len()
    );
    assert_eq!(missing, 0, "every acknowledged event is in the sink");

    deployed.remove(limit).await;
}

/// The ids in every JSON-lines file under `dir`, with how often each appears.
fn ids_in_files(dir: &std::path::Path, counts: &mut BTreeMap<String, usize>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            ids_in_files(&path, counts);
        } else if path.extension().is_some_and(|e| e == "jsonl") {
            let text = std::fs::read_to_string(&path).expect("segment");
            for line in text.lines().filter(|l| !l.is_empty()) {
                let record: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}: {e}: {line}", path.display()));
                let id = record["id"].as_str().expect("id").to_owned();
                *counts.entry(id).or_default() += 1;
            }
        }
    }
}

#[tokio::test]
async fn a_file_collector_scaled_from_three_to_one_and_back_keeps_every_event_once() {
    let limit = Duration::from_secs(240);
    // The clickstream example's file collector, three replicas and the default storage: a
    // volume claim per replica.
    let deployed = Deployed::example("clickstream.yaml", limit, |pc| {
        pc.spec.collectors[0].autoscale = None;
        pc.spec.collectors[0].replicas = 3;
    })
    .await;
    let Deployed {
        node,
        client,
        ns,
        api,
        name,
        base,
        ..
    } = &deployed;
    let stream = deployed.streams["visit"].clone();
    let collector = api.get(name).await.expect("pipeline").spec.collectors[0]
        .name
        .clone();
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let sts = format!("{name}-collector-{collector}");
    let ready_replicas = |want: i32| {
        let (stateful_sets, sts) = (stateful_sets.clone(), sts.clone());
        async move {
            wait_for(&format!("{want} ready file collectors"), limit, || async {
                let s = stateful_sets.get(&sts).await?;
                let status = s.status.unwrap_or_default();
                Ok((status.replicas == want && status.ready_replicas == Some(want)).then_some(()))
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
    };
    ready_replicas(3).await;

    let load = SteadyLoad::start(base, &stream, 8);
    load.progress(300, limit).await;
    for replicas in [1, 3] {
        let mut collectors = api.get(name).await.expect("pipeline").spec.collectors;
        collectors[0].replicas = replicas;
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"collectors": collectors}})),
        )
        .await
        .expect("scaled");
        ready_replicas(replicas).await;
        load.progress(300, limit).await;
    }
    let outcome = load.finish().await;
    assert!(
        outcome.failed.is_empty(),
        "{:?}",
        &outcome.failed[..outcome.failed.len().min(10)]
    );
    wait_for("the collector's lag to reach 0", limit, || async {
        Ok(lag(node, ns, name, &collector).ok().filter(|l| *l == 0))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // The files on the three claims, read where the volumes keep them.
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), ns);
    let volumes: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(client.clone());
    let mut counts = BTreeMap::new();
    for i in 0..3 {
        let claim = claims
            .get(&format!("records-{sts}-{i}"))
            .await
            .expect("a claim per replica");
        let volume = claim
            .spec
            .and_then(|s| s.volume_name)
            .expect("the claim is bound");
        let path = volumes
            .get(&volume)
            .await
            .expect("volume")
            .spec
            .and_then(|s| s.host_path)
            .expect("a hostPath volume of the test cluster")
            .path;
        ids_in_files(std::path::Path::new(&path), &mut counts);
    }
    let missing = outcome
        .acknowledged
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .count();
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "file collector 3 -> 1 -> 3 under load: {} events acknowledged, {missing} missing, {} written more than once",
        outcome.acknowledged.len(),
        twice.len()
    );
    assert_eq!(missing, 0, "every acknowledged event is in the files");
    assert!(
        twice.is_empty(),
        "each event once: {:?}",
        &twice[..twice.len().min(10)]
    );
    assert_eq!(counts.len(), outcome.acknowledged.len(), "nothing else");

    deployed.remove(limit).await;
}

/// A NodePort Service for the pipeline's TCP write and read ports; their addresses on the
/// node.
async fn tcp_nodeports(
    client: &Client,
    node: &RealNode,
    namespace: &str,
    pipeline: &str,
) -> (String, String) {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": format!("{pipeline}-tcp-nodeport")},
        "spec": {
            "type": "NodePort",
            "selector": {"app.kubernetes.io/instance": pipeline, "app.kubernetes.io/component": "ingest"},
            "ports": [
                {"name": "tcp-write", "port": 2525, "targetPort": "tcp-write"},
                {"name": "tcp-read", "port": 2526, "targetPort": "tcp-read"},
            ],
        }
    }))
    .expect("service");
    let created = services
        .create(&PostParams::default(), &service)
        .await
        .expect("NodePort Service created");
    let ports: Vec<i32> = created
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p.node_port)
        .collect();
    assert_eq!(ports.len(), 2, "two node ports");
    (
        format!("{}:{}", node.host, ports[0]),
        format!("{}:{}", node.host, ports[1]),
    )
}

/// Sends `lines` on one new TCP connection, each after the answer to the one before; the
/// answers, `None` once the server closed the connection.
async fn tcp_lines(addr: &str, lines: &[&str]) -> anyhow::Result<Vec<Option<String>>> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = tokio::net::TcpStream::connect(addr).await?.into_split();
    let mut answers = BufReader::new(read).lines();
    let mut out = Vec::new();
    for line in lines {
        // A refused connection may be closed for writing already.
        let _ = write.write_all(format!("{line}\n").as_bytes()).await;
        let answer = tokio::time::timeout(Duration::from_secs(30), answers.next_line())
            .await?
            .unwrap_or(None);
        out.push(answer);
    }
    Ok(out)
}

/// Ingest pods of a pipeline: name to (uid, restarts).
async fn ingest_pods(pods: &Api<Pod>, pipeline: &str) -> BTreeMap<String, (String, i32)> {
    let selector =
        format!("app.kubernetes.io/instance={pipeline},app.kubernetes.io/component=ingest");
    pods.list(&ListParams::default().labels(&selector))
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map_or(0, |c| c.iter().map(|c| c.restart_count).sum());
            (p.name_any(), (p.uid().unwrap_or_default(), restarts))
        })
        .collect()
}

#[tokio::test]
async fn an_api_key_secret_locks_every_door_and_a_rotated_key_takes_over_without_a_restart() {
    let limit = Duration::from_secs(240);
    let keys = |key: &str| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "ingest-keys"},
            "stringData": {"keys": format!("# the shop's clients\n{key}\n")},
        }))
        .expect("secret")
    };
    let (old_key, new_key) = ("old-key-0123456789abcdef", "new-key-0123456789abcdef");
    let mut tcp_stream = String::new();
    let deployed = Deployed::example_with("kv-store.yaml", limit, &[keys(old_key)], |pc| {
        pc.spec.ingest.api_keys = Some(sluice_operator::crd::ApiKeysSpec {
            secret_name: "ingest-keys".to_owned(),
            key: "keys".to_owned(),
        });
        tcp_stream = pc.spec.streams[0].name.clone();
        pc.spec.ingest.tcp =
            Some(serde_json::from_value(json!({"stream": tcp_stream})).expect("tcp spec"));
    })
    .await;
    let Deployed {
        node,
        client,
        ns,
        name,
        base,
        ..
    } = &deployed;
    let stream = tcp_stream.as_str();
    let (write, read) = tcp_nodeports(client, node, ns, name).await;
    let http = reqwest::Client::new();
    let post = |key: Option<&str>, id: &str| {
        let mut r = http
            .post(format!("{base}/v1/streams/{stream}/events"))
            .json(&json!({"id": id, "name": "locked"}));
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        async move { r.send().await.map(|r| r.status().as_u16()) }
    };

    // HTTP: refused without a key or with a wrong one, taken with the key.
    assert_eq!(post(None, "no-key").await.expect("POST"), 401);
    assert_eq!(post(Some(new_key), "wrong-key").await.expect("POST"), 401);
    assert_eq!(post(Some(old_key), "with-key").await.expect("POST"), 202);
    let get = |key: Option<&str>| {
        let mut r = http.get(format!("{base}/v1/streams/{stream}/records/with-key"));
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        async move { r.send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(get(None).await.expect("GET"), 401);
    wait_for("the record to be readable with the key", limit, || async {
        Ok((get(Some(old_key)).await? == 200).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // WebSocket: the upgrade is refused without a key, switched with it.
    let upgrade = |key: Option<&str>| {
        let mut r = http
            .get(format!("{base}/v1/streams/{stream}/ws"))
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        async move { r.send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(upgrade(None).await.expect("upgrade"), 401);
    assert_eq!(upgrade(Some(old_key)).await.expect("upgrade"), 101);
    // TCP, both ports: refused and closed without `auth`, served after it; no dump.
    let refused = "error unauthorized: an API key is required; send `auth <key>` first";
    for addr in [&write, &read] {
        let answers = wait_for("the TCP door to answer", limit, || async {
            Ok(tcp_lines(addr, &["{\"id\":\"tcp-no-key\"}", "get x"])
                .await
                .ok())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answers, [Some(refused.to_owned()), None], "{addr}");
    }
    let auth = format!("auth {old_key}");
    let answers = tcp_lines(&write, &[&auth, "{\"id\":\"tcp-key\",\"name\":\"t\"}"])
        .await
        .expect("write port");
    assert_eq!(
        answers,
        [Some("ok auth".to_owned()), Some("ok tcp-key".to_owned())]
    );
    let answers = tcp_lines(&read, &[&auth, "all"]).await.expect("read port");
    assert_eq!(answers[0].as_deref(), Some("ok auth"));
    assert!(
        answers[1]
            .as_deref()
            .is_some_and(|a| a.starts_with("error the full dump is off")),
        "{answers:?}"
    );

    // The key rotated in the Secret: the running pods take the new key and refuse the old
    // one once the kubelet updated the mounted file; no pod is replaced or restarted.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let before = ingest_pods(&pods, name).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .replace("ingest-keys", &PostParams::default(), &{
            let mut s = keys(new_key);
            s.metadata.resource_version = secrets
                .get("ingest-keys")
                .await
                .expect("secret")
                .metadata
                .resource_version;
            s
        })
        .await
        .expect("Secret rotated");
    let started = std::time::Instant::now();
    wait_for("the rotated key to be taken", limit, || async {
        Ok((post(Some(new_key), "rotated").await? == 202).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "the rotated key was taken {:.0} s after the Secret changed",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(post(Some(old_key), "old").await.expect("POST"), 401);
    let auth = format!("auth {new_key}");
    let answers = tcp_lines(&write, &[&auth]).await.expect("write port");
    assert_eq!(answers, [Some("ok auth".to_owned())]);
    assert_eq!(
        ingest_pods(&pods, name).await,
        before,
        "the same ingest pods, never restarted"
    );

    deployed.remove(limit).await;
}
