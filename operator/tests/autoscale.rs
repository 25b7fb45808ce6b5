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
use sluice_testkit::{Process, free_port, wait_for};

use common::{client, condition, install_crd, namespace};

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

async fn register(client: &kube::Client, ns: &str, port: u16) -> Registration {
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
    let apiservice: APIService = serde_json::from_value(json!({
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": APISERVICE},
        "spec": {
            "group": "external.metrics.k8s.io",
            "version": "v1beta1",
            "service": {"namespace": ns, "name": "sluice-operator", "port": port},
            "insecureSkipTLSVerify": true,
            "groupPriorityMinimum": 100,
            "versionPriority": 100
        }
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
    let stack = sluice_testkit::Stack::from_env();
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client).await;
    let port = free_port().expect("port");
    let metrics = free_port().expect("port");
    let _operator = Process::spawn(
        "sluice-operator",
        &[
            "--namespace",
            &ns,
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
            "--external-metrics-listen",
            &format!("127.0.0.1:{port}"),
            "--leader-election",
            "false",
        ],
        &[],
    )
    .expect("operator");
    let registration = register(&client, &ns, port).await;

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
