//! Two `sluice-operator` processes on the real control plane: one leads through the Lease
//! and reconciles; when it stops, or is killed, the other takes over. Both serve their
//! metrics. And a leader whose controller hangs gives the Lease up (in this process,
//! through the library's `leader::lead`, with a controller that hangs on purpose).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use sluice_operator::crd::PipelineConfig;
use sluice_operator::leader::{self, LeadError, LeaseSettings, Progress};
use sluice_operator::metrics::Metrics;
use sluice_testkit::wait_for;
use tokio_util::sync::CancellationToken;

use common::{
    Operator, client, condition, emptied, install_crd, metric, namespace, spawn_operator,
};

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

/// Deletes the pipelines `names`, waits until the leading operator let them go, and
/// deletes the namespace.
async fn finish(client: Client, api: &Api<PipelineConfig>, ns: &str, names: &[&str]) {
    for name in names {
        api.delete(name, &DeleteParams::default())
            .await
            .expect("deleted");
    }
    emptied(api, "the pipelines to be gone", Duration::from_secs(60))
        .await
        .expect("finalized by the leader");
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(ns, &DeleteParams::default())
        .await
        .expect("namespace deleted");
}

/// A namespace with two operators competing for `lease`, once one of them leads: the
/// client, the namespace, its PipelineConfigs, the two, and which one leads.
async fn two_operators(
    lease: &str,
) -> (
    Client,
    String,
    Api<PipelineConfig>,
    Operator,
    Operator,
    usize,
) {
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client).await;
    let api: Api<PipelineConfig> = Api::namespaced(client.clone(), &ns);
    let a = start(&ns, lease, "a");
    let b = start(&ns, lease, "b");
    let first = wait_for("one leader", Duration::from_secs(60), || async {
        Ok(leader_of(&[&a, &b]).await)
    })
    .await
    .expect("a leader");
    (client, ns, api, a, b, first)
}

#[tokio::test]
async fn two_operators_elect_one_leader_and_hand_over() {
    let stack = sluice_testkit::Stack::from_env();
    let lease = "sluice-operator-test";
    let (client, ns, api, a, b, first) = two_operators(lease).await;
    let limit = Duration::from_secs(60);
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

    finish(client, &api, &ns, &["first", "second"]).await;
    drop(follower);
}

#[tokio::test]
async fn a_killed_leader_is_replaced_when_its_lease_expires_and_reconciling_resumes() {
    let stack = sluice_testkit::Stack::from_env();
    let (client, ns, api, a, b, first) = two_operators("sluice-operator-kill").await;
    let limit = Duration::from_secs(60);
    create_and_await_ready(&api, "before", &stack.kafka_brokers).await;

    // SIGKILL: no release; the Lease (4 s) has to expire.
    let (leader, follower) = if first == 0 { (a, b) } else { (b, a) };
    let killed = Instant::now();
    leader.process.kill().expect("killed");
    wait_for("the follower to lead", limit, || async {
        Ok((metric(follower.metrics, "sluice_operator_leader ").await == Some(1.0)).then_some(()))
    })
    .await
    .expect("the follower takes over");
    println!(
        "the follower led {:?} after the leader was killed (lease 4 s)",
        killed.elapsed()
    );
    create_and_await_ready(&api, "after", &stack.kafka_brokers).await;
    assert!(
        metric(follower.metrics, "sluice_operator_reconciles_total")
            .await
            .expect("metrics")
            >= 1.0,
        "the new leader reconciles"
    );
    finish(client, &api, &ns, &["before", "after"]).await;
    drop(follower);
}

#[tokio::test]
async fn a_leader_whose_reconcile_hangs_gives_up_the_lease_to_another_replica() {
    let client = client().await;
    let ns = namespace(&client).await;
    let settings = |identity: &str| LeaseSettings {
        name: "sluice-operator-stall".to_owned(),
        namespace: ns.clone(),
        identity: identity.to_owned(),
        duration_seconds: 4,
        stall_after: Duration::from_secs(2),
    };
    let leads = |m: &Metrics| m.encode().lines().any(|l| l == "sluice_operator_leader 1");
    let limit = Duration::from_secs(60);

    // The first replica's controller starts a reconcile that never ends.
    let stuck = Arc::new(Metrics::new());
    stuck.set_ready();
    let stuck_progress = Arc::new(Progress::default());
    let stuck_task = {
        let (client, stuck, progress, settings) = (
            client.clone(),
            stuck.clone(),
            stuck_progress.clone(),
            settings("stuck"),
        );
        tokio::spawn(async move {
            let hung = progress.clone();
            let controller = move |_stop: CancellationToken| {
                let hung = hung.clone();
                async move {
                    let _running = hung.start();
                    std::future::pending::<()>().await;
                }
            };
            let shutdown = CancellationToken::new();
            leader::lead(&settings, client, &stuck, &progress, &shutdown, controller).await
        })
    };
    wait_for("the first replica to lead", limit, || async {
        Ok(leads(&stuck).then_some(()))
    })
    .await
    .expect("leads");

    // A second replica waits for the Lease.
    let standby = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let standby_task = {
        let (client, standby, settings, shutdown) = (
            client.clone(),
            standby.clone(),
            settings("standby"),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let progress = Progress::default();
            let controller = |stop: CancellationToken| async move { stop.cancelled().await };
            leader::lead(
                &settings, client, &standby, &progress, &shutdown, controller,
            )
            .await
        })
    };

    let outcome = tokio::time::timeout(limit, stuck_task)
        .await
        .expect("the stuck leader gives up")
        .expect("task");
    assert!(
        matches!(outcome, Err(LeadError::Stalled(_))),
        "gave up because a reconcile hangs: {outcome:?}"
    );
    assert!(!stuck.is_ready(), "reports not ready");
    assert!(!leads(&stuck));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = leases
        .get("sluice-operator-stall")
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_ne!(holder.as_deref(), Some("stuck"), "the Lease was released");
    let released = Instant::now();
    wait_for("the standby to lead", limit, || async {
        Ok(leads(&standby).then_some(()))
    })
    .await
    .expect("the standby takes over");
    println!("the standby led {:?} after the release", released.elapsed());
    shutdown.cancel();
    standby_task
        .await
        .expect("task")
        .expect("the standby stops cleanly");
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("namespace deleted");
}
