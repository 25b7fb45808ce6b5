//! The CRD on a real kube-apiserver (started by `scripts/k8s up`): it installs, defaults
//! are applied, and nonsense is rejected with messages a user can act on.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use sluice_operator::crd::PipelineConfig;
use sluice_operator::plan::Workload;

mod common;

use common::{
    await_condition, client, condition, controlled_namespace, controller, install_crd, namespace,
};

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
            "collectors": [
                {"name": "to-redis", "streams": ["visit"], "sink": {"redis": {}},
                 "autoscale": {"minReplicas": 1, "maxReplicas": 6, "lagPerReplica": 1000}},
                {"name": "files", "streams": ["visit"], "sink": {"file": {"storage": {"size": "2Gi"}}},
                 "autoscale": {"minReplicas": 1, "maxReplicas": 3, "lagPerReplica": 1000}}
            ]
        }
    }))
    .expect("resource");
    let created = api
        .create(&PostParams::default(), &good)
        .await
        .expect("a valid spec is accepted");
    assert_eq!(created.spec.retry.max_attempts, 5, "defaults filled in");
    assert_eq!(created.spec.collectors[0].concurrency, 4);
    assert_eq!(
        created.spec.streams[0].topic.replication_factor, None,
        "chosen from the cluster's size"
    );

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
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(&dry, &children.ingest)
        .await
        .expect("ingest accepted");
    for w in children
        .collectors
        .iter()
        .chain(children.redis.iter().map(|(w, _)| w))
    {
        let created = match w {
            Workload::Deployment(d) => deployments.create(&dry, d).await.map(|_| ()),
            Workload::StatefulSet(s) => stateful_sets.create(&dry, s).await.map(|_| ()),
        };
        created.unwrap_or_else(|e| panic!("{} rejected: {e}", w.name()));
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
    for hpa in &children.collector_hpas {
        hpas.create(&dry, hpa)
            .await
            .unwrap_or_else(|e| panic!("{:?} rejected: {e}", hpa.metadata.name));
    }
    // The NetworkPolicies of ingest, collectors and Redis, and the generated Redis password.
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let names: Vec<String> = children
        .network_policies
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(
        names,
        [
            "clickstream-ingest",
            "clickstream-collectors",
            "clickstream-redis"
        ],
        "a policy per component by default"
    );
    for p in &children.network_policies {
        policies
            .create(&dry, p)
            .await
            .unwrap_or_else(|e| panic!("{:?} rejected: {e}", p.metadata.name));
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    assert_eq!(
        children.redis_auth.as_deref(),
        Some("clickstream-redis-auth")
    );
    let secret = sluice_operator::plan::redis_auth_secret(&created, "generated");
    let stored = secrets
        .create(&dry, &secret)
        .await
        .expect("Secret accepted");
    assert_eq!(
        stored.data.expect("data")["password"].0,
        b"generated",
        "the password under the key every pod reads"
    );
    assert_eq!(
        children.collectors[1].kind(),
        "StatefulSet",
        "a file collector keeps a claim per replica"
    );

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

    // PLAIN credentials in clear text only when the spec says so.
    let plain = |sasl: Value, tls: Option<Value>| {
        let mut kafka = json!({"bootstrapServers": "k:9092", "sasl": sasl});
        if let Some(tls) = tls {
            kafka["tls"] = tls;
        }
        serde_json::from_value::<PipelineConfig>(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "PipelineConfig",
            "metadata": {"name": "plain"},
            "spec": {"kafka": kafka, "streams": [{"name": "a"}]}
        }))
        .expect("resource")
    };
    let err = api
        .create(
            &dry,
            &plain(json!({"mechanism": "PLAIN", "secretName": "u"}), None),
        )
        .await
        .expect_err("PLAIN without TLS is refused");
    let message = err.to_string();
    assert!(
        message.contains(
            "kafka.sasl.mechanism PLAIN without kafka.tls sends the password in clear text"
        ),
        "{message}"
    );
    for (sasl, tls) in [
        (
            json!({"mechanism": "PLAIN", "secretName": "u", "allowPlaintext": true}),
            None,
        ),
        (
            json!({"mechanism": "PLAIN", "secretName": "u"}),
            Some(json!({"secretName": "ca"})),
        ),
        (
            json!({"mechanism": "SCRAM-SHA-512", "secretName": "u"}),
            None,
        ),
    ] {
        api.create(&dry, &plain(sasl.clone(), tls.clone()))
            .await
            .unwrap_or_else(|e| panic!("{sasl} with TLS {tls:?} refused: {e}"));
    }

    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("namespace deleted");
}

#[tokio::test]
async fn a_pipeline_converges_grows_refuses_a_shrink_and_is_cleaned_up() {
    let _telemetry = sluice_core::telemetry::init("sluice-operator-test", "info");
    let stack = sluice_testkit::Stack::from_env();
    let (client, ns, api, stop) = controlled_namespace().await;
    let limit = Duration::from_secs(120);
    let stream = sluice_testkit::unique("pc");
    // Generated topic names are scoped by namespace and pipeline.
    let topic = format!("{ns}.shop.{stream}");
    let pc: PipelineConfig = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "PipelineConfig",
        "metadata": {"name": "shop"},
        "spec": {
            "kafka": {"bootstrapServers": stack.kafka_brokers},
            "streams": [{"name": stream, "topic": {"partitions": 3, "config": {"retention.ms": "3600000"}}}],
            "collectors": [{"name": "store", "streams": [stream], "sink": {"redis": {}}}],
            "topicDeletionPolicy": "Delete"
        }
    }))
    .expect("resource");
    api.create(&PostParams::default(), &pc)
        .await
        .expect("created");

    let ready = |want: &'static str| await_condition(&api, "shop", "Ready", want, limit);
    ready("True").await.expect("the pipeline becomes ready");
    // On the one-broker test Kafka the topics have a single replica: said, not blocking.
    let replicated = condition(&api, "shop", "Replicated")
        .await
        .expect("Replicated condition");
    assert_eq!(
        (replicated.0.as_str(), replicated.1.as_str()),
        ("False", "SingleCopy"),
        "{}",
        replicated.2
    );
    for topic in [
        topic.clone(),
        format!("{topic}.retry"),
        format!("{topic}.dlq"),
        format!("{topic}.reads"),
    ] {
        assert_eq!(
            sluice_testkit::partitions(&stack, &topic).expect("metadata"),
            Some(3),
            "{topic}"
        );
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let mut metas = Vec::new();
    for name in ["shop-ingest", "shop-collector-store", "shop-redis-replica"] {
        metas.push(deployments.get(name).await.expect(name).metadata);
    }
    metas.push(
        stateful_sets
            .get("shop-redis")
            .await
            .expect("primary")
            .metadata,
    );
    for m in metas {
        let owner = &m.owner_references.expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("PipelineConfig", "shop")
        );
    }
    assert_eq!(
        sluice_testkit::topic_config(&stack, &topic, "retention.ms")
            .await
            .expect("config")
            .as_deref(),
        Some("3600000")
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&Default::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "TopicCreated"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "SingleCopy"), "{reasons:?}");
    let status = api.get("shop").await.expect("get").status.expect("status");
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.topics.len(), 4);

    // Grow the partitions, add a stream and change the collector: it converges.
    let added = format!("{stream}-b");
    api.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {
            "streams": [{"name": stream, "topic": {"partitions": 6, "config": {"retention.ms": "7200000"}}}, {"name": added, "topic": {"partitions": 2}}],
            "collectors": [{"name": "store", "streams": [stream, added], "sink": {"redis": {}}, "concurrency": 8}]
        }})),
    )
    .await
    .expect("edited");
    sluice_testkit::wait_for(
        "the topic's retention to follow the spec",
        limit,
        || async {
            let v = sluice_testkit::topic_config(&stack, &topic, "retention.ms").await?;
            Ok((v.as_deref() == Some("7200000")).then_some(()))
        },
    )
    .await
    .expect("aligned");
    sluice_testkit::wait_for("the added stream's topic", limit, || async {
        Ok(
            (sluice_testkit::partitions(&stack, &format!("{ns}.shop.{added}"))? == Some(2))
                .then_some(()),
        )
    })
    .await
    .expect("added");
    sluice_testkit::wait_for("the topic to grow to 6 partitions", limit, || async {
        Ok((sluice_testkit::partitions(&stack, &topic)? == Some(6)).then_some(()))
    })
    .await
    .expect("grown");
    sluice_testkit::wait_for("the collector to get concurrency 8", limit, || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("shop-collector-store").await?;
            let v = serde_json::to_value(&d)?;
            let env = v["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            Ok(env
                .iter()
                .any(|e| e["name"] == "SLUICE_CONCURRENT_COUNT" && e["value"] == "8")
                .then_some(()))
        }
    })
    .await
    .expect("rolled");
    ready("True").await.expect("ready again");

    // A shrink is refused in words, and nothing else breaks.
    api.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"streams": [
            {"name": stream, "topic": {"partitions": 2, "config": {"retention.ms": "7200000"}}},
            {"name": added, "topic": {"partitions": 2}}
        ]}})),
    )
    .await
    .expect("edited");
    let topics = sluice_testkit::wait_for("TopicsReady=False NotSupported", limit, || {
        let api = api.clone();
        async move {
            Ok(condition(&api, "shop", "TopicsReady")
                .await
                .filter(|c| c.1 == "NotSupported"))
        }
    })
    .await
    .expect("not supported");
    assert!(
        topics.2.contains("cannot remove partitions"),
        "{}",
        topics.2
    );
    assert_eq!(
        condition(&api, "shop", "Ready").await.expect("ready").0,
        "False"
    );
    assert_eq!(
        sluice_testkit::partitions(&stack, &topic).expect("metadata"),
        Some(6)
    );
    assert!(deployments.get("shop-ingest").await.is_ok());

    // Deleting it removes its children and, with the Delete policy, its topics.
    api.delete("shop", &DeleteParams::default())
        .await
        .expect("deleted");
    sluice_testkit::wait_for("the PipelineConfig to be gone", limit, || {
        let api = api.clone();
        async move { Ok(api.get_opt("shop").await?.is_none().then_some(())) }
    })
    .await
    .expect("gone");
    sluice_testkit::wait_for("the topics to be deleted", limit, || async {
        Ok(sluice_testkit::partitions(&stack, &topic)?
            .is_none()
            .then_some(()))
    })
    .await
    .expect("topics deleted");
    common::emptied(&deployments, "the children to be collected", limit)
        .await
        .expect("children gone");

    // With the default Retain policy the topics outlive the resource.
    let kept = sluice_testkit::unique("keep");
    let kept_topic = format!("{ns}.kept.{kept}");
    let retained: PipelineConfig = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "PipelineConfig",
        "metadata": {"name": "kept"},
        "spec": {"kafka": {"bootstrapServers": stack.kafka_brokers}, "streams": [{"name": kept}]}
    }))
    .expect("resource");
    api.create(&PostParams::default(), &retained)
        .await
        .expect("created");
    sluice_testkit::wait_for("the retained pipeline's topic", limit, || async {
        Ok((sluice_testkit::partitions(&stack, &kept_topic)? == Some(1)).then_some(()))
    })
    .await
    .expect("topic");
    api.delete("kept", &DeleteParams::default())
        .await
        .expect("deleted");
    sluice_testkit::wait_for("the retained PipelineConfig to be gone", limit, || {
        let api = api.clone();
        async move { Ok(api.get_opt("kept").await?.is_none().then_some(())) }
    })
    .await
    .expect("gone");
    assert_eq!(
        sluice_testkit::partitions(&stack, &kept_topic).expect("metadata"),
        Some(1),
        "Retain keeps the topic"
    );
    stop.cancel();
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("namespace deleted");
}

#[tokio::test]
async fn kafka_sasl_credentials_come_from_a_secret() {
    let _telemetry = sluice_core::telemetry::init("sluice-operator-test", "info");
    let stack = sluice_testkit::Stack::from_env();
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name}: run `eval \"$(scripts/stack up)\"`"))
    };
    let (brokers, user, password) = (
        var("SLUICE_STACK_KAFKA_SASL_BROKERS"),
        var("SLUICE_STACK_KAFKA_SASL_USER"),
        var("SLUICE_STACK_KAFKA_SASL_PASSWORD"),
    );
    let (client, ns, api, stop) = controlled_namespace().await;
    let limit = Duration::from_secs(90);
    let stream = sluice_testkit::unique("sasl");
    let pc: PipelineConfig = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "PipelineConfig",
        "metadata": {"name": "secured"},
        "spec": {
            "kafka": {"bootstrapServers": brokers, "sasl": {"mechanism": "PLAIN", "secretName": "kafka-user", "allowPlaintext": true}},
            "streams": [{"name": stream, "topic": {"partitions": 2}}],
            "collectors": [{"name": "store", "streams": [stream], "sink": {"redis": {}}}]
        }
    }))
    .expect("resource");
    api.create(&PostParams::default(), &pc)
        .await
        .expect("created");

    // No Secret yet: the condition says which one is missing; nothing is created.
    let (_, reason, message) = await_condition(&api, "secured", "TopicsReady", "False", limit)
        .await
        .expect("condition");
    assert_eq!(reason, "KafkaSecretInvalid");
    assert!(message.contains("kafka-user"), "{message}");
    assert_eq!(
        sluice_testkit::partitions(&stack, &format!("{ns}.secured.{stream}")).expect("metadata"),
        None
    );

    // With the credentials in the Secret, the operator's admin client authenticates.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let secret = serde_json::from_value(json!({
        "metadata": {"name": "kafka-user"},
        "stringData": {"username": user, "password": password}
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret created");
    await_condition(&api, "secured", "TopicsReady", "True", limit)
        .await
        .expect("topics ready through SASL");
    assert_eq!(
        sluice_testkit::partitions(&stack, &format!("{ns}.secured.{stream}")).expect("metadata"),
        Some(2)
    );
    // The lag in the status is read through SASL too.
    sluice_testkit::wait_for("the collector's lag in the status", limit, || {
        let api = api.clone();
        async move {
            let pc = api.get("secured").await?;
            Ok(pc
                .status
                .and_then(|s| s.collectors.first().and_then(|c| c.lag)))
        }
    })
    .await
    .expect("lag read with the Secret's credentials");

    // The pods get the protocol and a reference to the Secret, never the password.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d = deployments
        .get("secured-collector-store")
        .await
        .expect("collector");
    let env = serde_json::to_value(&d).expect("json")["spec"]["template"]["spec"]["containers"][0]
        ["env"]
        .clone();
    let env = env.as_array().expect("env");
    let find = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        find("SLUICE_KAFKA_OPTIONS")["value"],
        "security.protocol=sasl_plaintext,sasl.mechanism=PLAIN"
    );
    assert_eq!(
        find("SLUICE_KAFKA_SASL_PASSWORD")["valueFrom"],
        json!({"secretKeyRef": {"name": "kafka-user", "key": "password"}})
    );
    assert!(!serde_json::to_string(&d).expect("json").contains(&password));

    // A change of the Secret rolls the pods that read it (a new checksum on their
    // template), and not the managed Redis, which does not read it.
    let sum = |v: &Value| {
        v["spec"]["template"]["metadata"]["annotations"][sluice_operator::plan::SECRETS_ANNOTATION]
            .as_str()
            .map(str::to_owned)
    };
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let redis_sum = || async {
        let r = statefulsets.get("secured-redis").await.expect("redis");
        sum(&serde_json::to_value(&r).expect("json"))
    };
    let before = sum(&serde_json::to_value(&d).expect("json")).expect("annotated");
    let redis_before = redis_sum().await.expect("redis annotated");
    secrets
        .patch(
            "kafka-user",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"rotated-at": "now"}})),
        )
        .await
        .expect("secret changed");
    // The operator watches Secrets: the change is seen when it is made, not at the next
    // look at a ready pipeline (every minute), which this wait does not reach.
    let watched = Duration::from_secs(30);
    let rolled =
        sluice_testkit::wait_for("a new secrets checksum on the collector", watched, || {
            let deployments = deployments.clone();
            let before = before.clone();
            async move {
                let d = deployments.get("secured-collector-store").await?;
                Ok(sum(&serde_json::to_value(&d)?).filter(|s| *s != before))
            }
        })
        .await
        .expect("the collector's pods roll");
    assert_ne!(rolled, before);
    let ingest = deployments.get("secured-ingest").await.expect("ingest");
    assert_eq!(
        sum(&serde_json::to_value(&ingest).expect("json")),
        Some(rolled)
    );
    assert_eq!(redis_sum().await, Some(redis_before), "Redis does not roll");
    stop.cancel();
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("namespace deleted");
}

#[tokio::test]
async fn a_refused_child_is_a_condition_and_an_event_and_what_the_spec_drops_is_removed() {
    let stack = sluice_testkit::Stack::from_env();
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client).await;
    // A quota of two Deployments: the managed Redis replica and ingest take both, and the
    // collector is refused.
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> =
        Api::namespaced(client.clone(), &ns);
    let quota = serde_json::from_value(json!({
        "metadata": {"name": "two-deployments"},
        "spec": {"hard": {"count/deployments.apps": "2"}}
    }))
    .expect("quota");
    quotas
        .create(&PostParams::default(), &quota)
        .await
        .expect("quota created");
    let limit = Duration::from_secs(120);
    sluice_testkit::wait_for("the quota to be in force", limit, || {
        let quotas = quotas.clone();
        async move {
            let q = quotas.get("two-deployments").await?;
            Ok(q.status.and_then(|s| s.hard).map(|_| ()))
        }
    })
    .await
    .expect("quota in force");

    let api: Api<PipelineConfig> = Api::namespaced(client.clone(), &ns);
    let stop = controller(&client, &ns);
    let stream = sluice_testkit::unique("quota");
    let pc: PipelineConfig = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "PipelineConfig",
        "metadata": {"name": "tight"},
        "spec": {
            "kafka": {"bootstrapServers": stack.kafka_brokers},
            "streams": [{"name": stream}],
            "collectors": [{"name": "store", "streams": [stream], "sink": {"redis": {}}}],
            "topicDeletionPolicy": "Delete"
        }
    }))
    .expect("resource");
    api.create(&PostParams::default(), &pc)
        .await
        .expect("created");
    let refused = await_condition(&api, "tight", "ChildrenApplied", "False", limit)
        .await
        .expect("refusal reported");
    assert_eq!(refused.1, "ApplyFailed");
    assert!(
        refused.2.contains("Deployment tight-collector-store")
            && refused.2.contains("exceeded quota"),
        "{}",
        refused.2
    );
    let ready = condition(&api, "tight", "Ready").await.expect("Ready");
    assert_eq!(ready.0, "False");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let warned = sluice_testkit::wait_for("a Warning Event ApplyFailed", limit, || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await?;
            Ok(list
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("ApplyFailed")))
        }
    })
    .await
    .expect("event");
    assert_eq!(warned.type_.as_deref(), Some("Warning"));
    assert!(
        warned.note.unwrap_or_default().contains("exceeded quota"),
        "the Event says why"
    );

    // Redis switched to External: the managed Redis is removed, which frees the quota for
    // the collector.
    api.patch(
        "tight",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"redis": {"mode": "External", "url": stack.redis_url}}})),
    )
    .await
    .expect("patched");
    await_condition(&api, "tight", "ChildrenApplied", "True", limit)
        .await
        .expect("applied once the quota allows");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    assert!(
        stateful_sets
            .get_opt("tight-redis")
            .await
            .expect("get")
            .is_none(),
        "the primary's StatefulSet removed"
    );
    assert!(
        deployments
            .get_opt("tight-redis-replica")
            .await
            .expect("get")
            .is_none(),
        "the replicas' Deployment removed"
    );
    for name in ["tight-redis", "tight-redis-replica"] {
        assert!(
            services.get_opt(name).await.expect("get").is_none(),
            "{name} Service removed"
        );
    }
    for name in ["tight-ingest", "tight-collector-store"] {
        assert!(
            deployments.get_opt(name).await.expect("get").is_some(),
            "{name}"
        );
    }
    remove(client, &api, "tight", &ns, stop).await;
}

#[tokio::test]
async fn collectors_at_zero_wake_on_new_events_from_latest_and_on_pending_retries() {
    let stack = sluice_testkit::Stack::from_env();
    let (client, ns, api, stop) = controlled_namespace().await;
    let limit = Duration::from_secs(120);
    let (fresh, retried) = (
        sluice_testkit::unique("fresh"),
        sluice_testkit::unique("retried"),
    );
    let to_zero =
        json!({"minReplicas": 0, "maxReplicas": 2, "lagPerReplica": 100, "idleSeconds": 1});
    let pc: PipelineConfig = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "PipelineConfig",
        "metadata": {"name": "sleepy"},
        "spec": {
            "kafka": {"bootstrapServers": stack.kafka_brokers},
            "redis": {"mode": "External", "url": stack.redis_url},
            "streams": [{"name": fresh}, {"name": retried}],
            "collectors": [
                {"name": "latest", "streams": [fresh], "sink": {"redis": {}}, "startAt": "Latest",
                 "autoscale": to_zero},
                {"name": "retrier", "streams": [retried], "sink": {"redis": {}}, "autoscale": to_zero}
            ],
            "topicDeletionPolicy": "Delete"
        }
    }))
    .expect("resource");
    api.create(&PostParams::default(), &pc)
        .await
        .expect("created");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let scaled_to = |name: &'static str, want: i32| {
        let deployments = deployments.clone();
        async move {
            sluice_testkit::wait_for(&format!("{name} at {want} replicas"), limit, || {
                let deployments = deployments.clone();
                async move {
                    let d = deployments.get_opt(name).await?;
                    let replicas = d.and_then(|d| d.spec).and_then(|s| s.replicas);
                    Ok((replicas == Some(want)).then_some(()))
                }
            })
            .await
        }
    };
    scaled_to("sleepy-collector-latest", 0)
        .await
        .expect("idle at zero");
    scaled_to("sleepy-collector-retrier", 0)
        .await
        .expect("idle at zero");

    // Events after the collector was created wake the one that starts at Latest (its group
    // starts where the topic ended when the operator first looked); events waiting on a
    // retry topic wake the other.
    let event = |stream: &str| {
        let mut e = sluice_core::Envelope::new(stream, None, json!({"n": 1}));
        e.id = "wake".to_owned();
        e
    };
    sluice_testkit::produce(&stack, &format!("{ns}.sleepy.{fresh}"), &[event(&fresh)])
        .await
        .expect("produce");
    let retry_topic = format!("{ns}.sleepy.{retried}.retry");
    sluice_testkit::produce(&stack, &retry_topic, &[event(&retried)])
        .await
        .expect("produce retry");
    scaled_to("sleepy-collector-latest", 1)
        .await
        .expect("woken by a new event");
    scaled_to("sleepy-collector-retrier", 1)
        .await
        .expect("woken by a pending retry");
    // The status (written after the scaling, in the same pass) reports both lags.
    sluice_testkit::wait_for("a lag of 1 for each in the status", limit, || {
        let api = api.clone();
        async move {
            let status = api.get("sleepy").await?.status.unwrap_or_default();
            let lags: Vec<Option<i64>> = status.collectors.iter().map(|c| c.lag).collect();
            Ok((lags == [Some(1), Some(1)]).then_some(()))
        }
    })
    .await
    .expect("lags reported");

    remove(client, &api, "sleepy", &ns, stop).await;
}

/// Deletes the PipelineConfig, waits until the controller let it go, stops the controller
/// and deletes the namespace.
async fn remove(
    client: kube::Client,
    api: &Api<PipelineConfig>,
    name: &str,
    ns: &str,
    stop: tokio_util::sync::CancellationToken,
) {
    api.delete(name, &DeleteParams::default())
        .await
        .expect("deleted");
    sluice_testkit::wait_for(
        "the PipelineConfig to be gone",
        Duration::from_secs(120),
        || async { Ok(api.get_opt(name).await?.is_none().then_some(())) },
    )
    .await
    .expect("gone");
    stop.cancel();
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .delete(ns, &DeleteParams::default())
        .await
        .expect("namespace deleted");
}

#[tokio::test]
async fn a_topic_the_operator_did_not_create_is_used_only_when_named_and_never_deleted() {
    let stack = sluice_testkit::Stack::from_env();
    let (client, ns, api, stop) = controlled_namespace().await;
    let limit = Duration::from_secs(120);
    let stream = sluice_testkit::unique("theirs");
    // Someone else's topic, under the name the pipeline would generate.
    let theirs = format!("{ns}.owner.{stream}");
    sluice_core::kafka::ensure_topics(
        &stack.kafka(),
        &[sluice_core::kafka::TopicSpec {
            name: theirs.clone(),
            partitions: 2,
        }],
    )
    .await
    .expect("an existing topic");
    let pc: PipelineConfig = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "PipelineConfig",
        "metadata": {"name": "owner"},
        "spec": {
            "kafka": {"bootstrapServers": stack.kafka_brokers},
            "redis": {"mode": "External", "url": stack.redis_url},
            "streams": [{"name": stream, "topic": {"partitions": 2}}],
            "topicDeletionPolicy": "Delete"
        }
    }))
    .expect("resource");
    api.create(&PostParams::default(), &pc)
        .await
        .expect("created");
    let (_, reason, message) = await_condition(&api, "owner", "TopicsReady", "False", limit)
        .await
        .expect("refused");
    assert_eq!(reason, "TopicNotOurs");
    assert!(
        message.contains(&theirs) && message.contains("topic.name"),
        "{message}"
    );

    // Named in the spec, it is used; its retry, dead-letter and read topics are created.
    api.patch(
        "owner",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"streams": [
            {"name": stream, "topic": {"name": theirs, "partitions": 2}}
        ]}})),
    )
    .await
    .expect("named");
    await_condition(&api, "owner", "TopicsReady", "True", limit)
        .await
        .expect("adopted");
    let status = api
        .get("owner")
        .await
        .expect("get")
        .status
        .unwrap_or_default();
    let mut created = status.created_topics.clone();
    created.sort();
    assert_eq!(
        created,
        [
            format!("{theirs}.dlq"),
            format!("{theirs}.reads"),
            format!("{theirs}.retry")
        ],
        "the status records what the operator created"
    );

    // Deleted with the Delete policy: what it created goes, the adopted topic stays.
    remove(client, &api, "owner", &ns, stop).await;
    sluice_testkit::wait_for("the created topics to be deleted", limit, || async {
        Ok(
            sluice_testkit::partitions(&stack, &format!("{theirs}.retry"))?
                .is_none()
                .then_some(()),
        )
    })
    .await
    .expect("deleted");
    assert_eq!(
        sluice_testkit::partitions(&stack, &theirs).expect("metadata"),
        Some(2),
        "a topic the operator did not create is never deleted"
    );
}
