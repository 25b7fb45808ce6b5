//! Helpers shared by the operator's tests on the real control plane.

#![allow(dead_code)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;
use sluice_operator::crd::PipelineConfig;

pub async fn client() -> Client {
    assert!(
        std::env::var("KUBECONFIG").is_ok(),
        "KUBECONFIG is not set: start the control plane with `eval \"$(scripts/k8s up)\"`, or run `make test`"
    );
    Client::try_default().await.expect("kube client")
}

pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = PipelineConfig::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("sluice-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("CRD applied");
    let name = crd.name_any();
    let established = kube::runtime::wait::await_condition(
        crds,
        &name,
        kube::runtime::wait::conditions::is_crd_established(),
    );
    tokio::time::timeout(Duration::from_secs(60), established)
        .await
        .expect("CRD established in time")
        .expect("watch");
}

pub async fn namespace(client: &Client) -> String {
    let name = format!("sluice-test-{}", uuid_like());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"sluice.dev/test": "true"}}
    }))
    .expect("namespace");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    name
}

pub fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}", nanos & 0xffff_ffff_ffff)
}

/// A condition of the resource as (status, reason, message).
pub async fn condition(
    api: &Api<PipelineConfig>,
    name: &str,
    kind: &str,
) -> Option<(String, String, String)> {
    let pc = api.get_opt(name).await.ok()??;
    pc.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status, c.reason, c.message))
}

/// Waits up to `limit` until the resource's condition `kind` has `status`; the condition as
/// (status, reason, message).
pub async fn await_condition(
    api: &Api<PipelineConfig>,
    name: &str,
    kind: &str,
    status: &str,
    limit: std::time::Duration,
) -> anyhow::Result<(String, String, String)> {
    sluice_testkit::wait_for(&format!("{kind}={status}"), limit, || async {
        Ok(condition(api, name, kind).await.filter(|c| c.0 == status))
    })
    .await
}

/// A namespace of its own with the CRD installed and the controller running for it: the
/// client, the namespace, its PipelineConfig API, and the token that stops the controller.
pub async fn controlled_namespace() -> (
    Client,
    String,
    Api<sluice_operator::crd::PipelineConfig>,
    tokio_util::sync::CancellationToken,
) {
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client).await;
    let api = Api::namespaced(client.clone(), &ns);
    let stop = controller(&client, &ns);
    (client, ns, api, stop)
}

/// Runs the controller in this process for `namespace` until the token is cancelled.
pub fn controller(client: &Client, namespace: &str) -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    let ctx = std::sync::Arc::new(sluice_operator::reconcile::Context::new(
        client.clone(),
        sluice_operator::plan::Images::default(),
    ));
    tokio::spawn(sluice_operator::reconcile::run(
        Api::namespaced(client.clone(), namespace),
        ctx,
        sluice_operator::reconcile::DEFAULT_CONCURRENCY,
        stop.clone(),
    ));
    stop
}

/// The sum of the metric lines starting with `name` on an operator's `/metrics` at
/// 127.0.0.1:`port` (0 when absent); `None` while the endpoint does not answer.
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// Runs `program` with `envs`, `input` on its standard input; its standard output, or its
/// standard error as the error.
pub fn run(
    program: &str,
    args: &[&str],
    input: Option<&str>,
    envs: &[(&str, &str)],
) -> Result<String, String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e}; `eval \"$(scripts/k8s env)\"` puts it on PATH")
        });
    if let Some(text) = input {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("command output");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// A `sluice-operator` process, with the ports of its `/metrics` and external metrics API.
pub struct Operator {
    /// The process, stopped when dropped.
    pub process: sluice_testkit::Process,
    /// Port of `/metrics`, `/healthz` and `/readyz`.
    pub metrics: u16,
    /// Port of the external metrics API.
    pub external: u16,
}

/// Starts `sluice-operator` for `namespace` on free ports, with `extra` flags.
pub fn spawn_operator(namespace: &str, extra: &[&str]) -> Operator {
    let metrics = sluice_testkit::free_port().expect("port");
    let external = sluice_testkit::free_port().expect("port");
    let (metrics_listen, external_listen) = (
        format!("127.0.0.1:{metrics}"),
        format!("127.0.0.1:{external}"),
    );
    let mut args = vec![
        "--namespace",
        namespace,
        "--metrics-listen",
        &metrics_listen,
        "--external-metrics-listen",
        &external_listen,
    ];
    args.extend(extra);
    let process =
        sluice_testkit::Process::spawn("sluice-operator", &args, &[]).expect("operator started");
    Operator {
        process,
        metrics,
        external,
    }
}

/// Waits until `api` lists nothing (`what` names it in the error).
pub async fn emptied<K>(api: &Api<K>, what: &str, limit: Duration) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    sluice_testkit::wait_for(what, limit, || async {
        Ok(api
            .list(&Default::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await
}
