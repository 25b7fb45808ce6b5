//! Two `sluice-operator` processes on the real control plane: one leads through the Lease
//! and reconciles; when it stops, the other takes over. Both serve their metrics.

mod common;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use sluice_operator::crd::PipelineConfig;
use sluice_testkit::wait_for;

use common::{Operator, client, condition, install_crd, metric, namespace, spawn_operator};

fn start(ns: &str, lease: &str, identity: &str) -> Operator {
    spawn_operator(
        ns,
        &[
            "--lease-name",
            lease,
            "--lease-namespace",
            ns,
            "--lease-duration",
            "4",
            "--identity",
            identity,
        ],
    )
}

async fn leader_of(ops: &[&Operator]) -> Option<usize> {
    let mut leaders = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if metric(op.metrics, "sluice_operator_leader ").await? == 1.0 {
            leaders.push(i);
        }
    }
    // Exactly one leads.
    (leaders.len() == 1).then(|| leaders[0])
}

async fn create_and_await_ready(api: &Api<PipelineConfig>, name: &str, brokers: &str) {
    let pc: PipelineConfig = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "PipelineConfig",
        "metadata": {"name": name},
        "spec": {
            "kafka": {"bootstrapServers": brokers},
            "streams": [{"name": sluice_testkit::unique(name)}],
            "topicDeletionPolicy": "Delete"
        }
    }))
    .expect("resource");
    api.create(&PostParams::default(), &pc)
        .await
        .expect("created");
    wait_for(
        &format!("{name} Ready=True"),
        Duration::from_secs(90),
        || {
            let api = api.clone();
            async move {
                Ok(condition(&api, name, "Ready")
                    .await
                    .filter(|c| c.0 == "True"))
            }
        },
    )
    .await
    .expect("ready");
}

#[tokio::test]
async fn two_operators_elect_one_leader_and_hand_over() {
    let stack = sluice_testkit::Stack::from_env();
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client).await;
    let api: Api<PipelineConfig> = Api::namespaced(client.clone(), &ns);
    let lease = "sluice-operator-test";
    let a = start(&ns, lease, "a");
    let b = start(&ns, lease, "b");
    let limit = Duration::from_secs(60);

    let first = wait_for("one leader", limit, || async {
        Ok(leader_of(&[&a, &b]).await)
    })
    .await
    .expect("a leader");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = leases
        .get(lease)
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.holder_identity)
        .expect("holder");
    assert!(
        holder.starts_with(["a-", "b-"][first]),
        "the lease names the leader: {holder}"
    );

    create_and_await_ready(&api, "first", &stack.kafka_brokers).await;
    let ops = [&a, &b];
    let reconciles = |i: usize| metric(ops[i].metrics, "sluice_operator_reconciles_total");
    assert!(
        reconciles(first).await.expect("metrics") >= 1.0,
        "the leader reconciles"
    );
    assert_eq!(
        reconciles(1 - first).await.expect("metrics"),
        0.0,
        "the follower does not"
    );
    assert!(
        metric(
            ops[first].metrics,
            "sluice_operator_reconcile_duration_seconds_count"
        )
        .await
        .expect("metrics")
            >= 1.0
    );

    // The leader stops (releasing the lease); the other one takes over and reconciles.
    let (leader, follower) = if first == 0 { (a, b) } else { (b, a) };
    assert!(
        leader
            .process
            .terminate(Duration::from_secs(30))
            .await
            .expect("stopped"),
        "the leader exits cleanly"
    );
    wait_for("the follower to lead", limit, || async {
        Ok((metric(follower.metrics, "sluice_operator_leader ").await == Some(1.0)).then_some(()))
    })
    .await
    .expect("hand-over");
    create_and_await_ready(&api, "second", &stack.kafka_brokers).await;
    assert!(
        metric(follower.metrics, "sluice_operator_reconciles_total")
            .await
            .expect("metrics")
            >= 1.0
    );

    for name in ["first", "second"] {
        api.delete(name, &DeleteParams::default())
            .await
            .expect("deleted");
    }
    wait_for("the pipelines to be gone", limit, || {
        let api = api.clone();
        async move {
            Ok(api
                .list(&Default::default())
                .await?
                .items
                .is_empty()
                .then_some(()))
        }
    })
    .await
    .expect("finalized by the new leader");
    drop(follower);
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("namespace deleted");
}
