//! The CRD on a real kube-apiserver (started by `scripts/k8s up`): it installs, defaults
//! are applied, and nonsense is rejected with messages a user can act on.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;
use sluice_operator::crd::PipelineConfig;

async fn client() -> Client {
    assert!(
        std::env::var("KUBECONFIG").is_ok(),
        "KUBECONFIG is not set: start the control plane with `eval \"$(scripts/k8s up)\"`, or run `make test`"
    );
    Client::try_default().await.expect("kube client")
}

async fn install_crd(client: &Client) {
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

async fn namespace(client: &Client) -> String {
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

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}", nanos & 0xffff_ffff_ffff)
}

#[tokio::test]
async fn the_crd_installs_defaults_and_rejects_nonsense_with_readable_messages() {
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client).await;
    let api: Api<PipelineConfig> = Api::namespaced(client.clone(), &ns);

    let good: PipelineConfig = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "PipelineConfig",
        "metadata": {"name": "clickstream"},
        "spec": {
            "kafka": {"bootstrapServers": "kafka.kafka:9092"},
            "streams": [{"name": "visit", "topic": {"partitions": 6}, "key": "/userId"}],
            "collectors": [{"name": "to-redis", "streams": ["visit"], "sink": {"redis": {}},
                            "autoscale": {"minReplicas": 1, "maxReplicas": 6, "lagPerReplica": 1000}}]
        }
    }))
    .expect("resource");
    let created = api
        .create(&PostParams::default(), &good)
        .await
        .expect("a valid spec is accepted");
    assert_eq!(created.spec.retry.max_attempts, 5, "defaults filled in");
    assert_eq!(created.spec.collectors[0].concurrency, 4);
    assert_eq!(created.spec.streams[0].topic.replication_factor, 1);

    // Everything the plan renders for it is accepted by the apiserver (server-side dry run).
    let children =
        sluice_operator::plan::children(&created, &sluice_operator::plan::Images::default());
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    config_maps
        .create(&dry, &children.config_map)
        .await
        .expect("ConfigMap accepted");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    for d in std::iter::once(&children.ingest)
        .chain(&children.collectors)
        .chain(children.redis.iter().map(|(d, _)| d))
    {
        deployments
            .create(&dry, d)
            .await
            .unwrap_or_else(|e| panic!("{:?} rejected: {e}", d.metadata.name));
    }
    for s in std::iter::once(&children.ingest_service).chain(children.redis.iter().map(|(_, s)| s))
    {
        services
            .create(&dry, s)
            .await
            .unwrap_or_else(|e| panic!("{:?} rejected: {e}", s.metadata.name));
    }
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    hpas.create(&dry, &children.ingest_hpa)
        .await
        .expect("HPA accepted");

    let bad: PipelineConfig = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "PipelineConfig",
        "metadata": {"name": "bad"},
        "spec": {
            "kafka": {"bootstrapServers": "kafka.kafka:9092"},
            "redis": {"mode": "External"},
            "streams": [{"name": "visit"}, {"name": "visit"}],
            "collectors": [{"name": "to-redis", "streams": ["nope"], "sink": {"redis": {}, "file": {}},
                            "autoscale": {"minReplicas": 5, "maxReplicas": 2, "lagPerReplica": 1000}}]
        }
    }))
    .expect("resource");
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("nonsense is rejected");
    let message = err.to_string();
    for expected in [
        "stream names must be unique",
        "every stream a collector names must be one of spec.streams",
        "redis.url is required when redis.mode is External",
        "autoscale.minReplicas must not exceed autoscale.maxReplicas",
        "a sink names exactly one of redis, redisIndex, file, postgres",
    ] {
        assert!(
            message.contains(expected),
            "{expected:?} missing from: {message}"
        );
    }
    let err = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "sluice.dev/v1alpha1", "kind": "PipelineConfig",
                "metadata": {"name": "bad2"},
                "spec": {"kafka": {"bootstrapServers": "k:9092"}, "streams": [{"name": "a b", "topic": {"partitions": 0}}]}
            }))
            .expect("resource"),
        )
        .await
        .expect_err("rejected");
    let message = err.to_string();
    assert!(message.contains("spec.streams[0].name"), "{message}");
    assert!(
        message.contains("spec.streams[0].topic.partitions"),
        "{message}"
    );

    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("namespace deleted");
}
