//! End to end: the real `sluice-ingest` and `sluice-collector` binaries, the real Kafka and
//! Redis. An event posted over HTTP is read back over HTTP once the collector stored it.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use redis::AsyncCommands;
use serde_json::{Value, json};
use sluice_core::StreamSettings;
use sluice_testkit::{IngestPorts, Pipeline, Process, Stack, unique, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

/// A pipeline with its own stream, and the environment its binaries run with.
struct Setup {
    stack: Stack,
    pipeline: Pipeline,
    stream: String,
    topic: String,
    env: Vec<(&'static str, String)>,
}

impl Setup {
    async fn new(partitions: i32) -> anyhow::Result<Self> {
        let stack = Stack::from_env();
        let mut stream = StreamSettings::new(unique("events"));
        stream.partitions = partitions;
        let (name, topic) = (stream.name.clone(), stream.topic().to_owned());
        let pipeline = Pipeline::create(&stack, vec![stream]).await?;
        let env = vec![
            ("SLUICE_KAFKA_BROKERS", stack.kafka_brokers.clone()),
            ("SLUICE_REDIS_URL", stack.redis_url.clone()),
            (
                "SLUICE_SETTINGS",
                pipeline.settings_path.display().to_string(),
            ),
            ("SLUICE_KEY_PREFIX", pipeline.key_prefix.clone()),
        ];
        Ok(Self {
            stack,
            pipeline,
            stream: name,
            topic,
            env,
        })
    }

    fn spawn(&self, binary: &str, args: &[&str]) -> anyhow::Result<Process> {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Process::spawn(binary, args, &env)
    }

    /// Starts ingest and waits until it answers `/healthz`; returns it and its base URL.
    async fn ingest(&self) -> anyhow::Result<(Process, String)> {
        let ports = IngestPorts::free()?;
        let mut process = self.spawn("sluice-ingest", &ports.flags())?;
        let base = ports.base();
        ports.healthy(LIMIT).await?;
        anyhow::ensure!(process.running(), "ingest exited");
        Ok((process, base))
    }

    fn collector(&self, group: &str) -> anyhow::Result<Process> {
        self.spawn(
            "sluice-collector",
            &["--group", group, "--batch-size", "20"],
        )
    }

    /// The ids of the records of this test's stream in Redis.
    async fn stored_ids(&self) -> anyhow::Result<BTreeSet<String>> {
        let mut redis = self.stack.redis().await?;
        let prefix = format!("{}:{}:", self.pipeline.key_prefix, self.stream);
        let mut keys: Vec<String> = Vec::new();
        let mut iter: redis::AsyncIter<'_, String> = redis.scan_match(format!("{prefix}*")).await?;
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
        Ok(keys
            .into_iter()
            .map(|k| k.trim_start_matches(&prefix).to_owned())
            .collect())
    }
}

async fn post(
    client: &reqwest::Client,
    base: &str,
    stream: &str,
    body: &Value,
) -> anyhow::Result<String> {
    let response = client
        .post(format!("{base}/v1/streams/{stream}/events"))
        .json(body)
        .send()
        .await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    anyhow::ensure!(
        status == reqwest::StatusCode::ACCEPTED,
        "POST answered {status}: {answer}"
    );
    Ok(answer["id"]
        .as_str()
        .context("no id in the answer")?
        .to_owned())
}

/// Posts `count` events numbered from `first`, four at a time; returns the acknowledged ids.
async fn post_many(
    base: &str,
    stream: &str,
    first: usize,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let client = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..4 {
        let (client, base, stream) = (client.clone(), base.to_owned(), stream.to_owned());
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for n in (first + lane..first + count).step_by(4) {
                ids.push(
                    post(
                        &client,
                        &base,
                        &stream,
                        &json!({"n": n, "user": format!("u{}", n % 7)}),
                    )
                    .await?,
                );
            }
            anyhow::Ok(ids)
        });
    }
    let mut ids = Vec::new();
    while let Some(lane) = tasks.join_next().await {
        ids.extend(lane??);
    }
    Ok(ids)
}

#[tokio::test]
async fn posted_event_is_read_back_once_the_collector_stored_it() -> anyhow::Result<()> {
    post_and_read_back(Setup::new(3).await?).await
}

#[tokio::test]
async fn services_authenticate_to_kafka_with_sasl_credentials_from_the_environment()
-> anyhow::Result<()> {
    let var = |name: &str| {
        std::env::var(name)
            .with_context(|| format!("{name} is not set: run `eval \"$(scripts/stack up)\"`"))
    };
    let mut setup = Setup::new(2).await?;
    setup.env.retain(|(k, _)| *k != "SLUICE_KAFKA_BROKERS");
    setup.env.extend([
        (
            "SLUICE_KAFKA_BROKERS",
            var("SLUICE_STACK_KAFKA_SASL_BROKERS")?,
        ),
        (
            "SLUICE_KAFKA_OPTIONS",
            "security.protocol=sasl_plaintext,sasl.mechanism=PLAIN".to_owned(),
        ),
        (
            "SLUICE_KAFKA_SASL_USERNAME",
            var("SLUICE_STACK_KAFKA_SASL_USER")?,
        ),
        (
            "SLUICE_KAFKA_SASL_PASSWORD",
            var("SLUICE_STACK_KAFKA_SASL_PASSWORD")?,
        ),
    ]);
    post_and_read_back(setup).await
}

/// Posts one event and reads it back over GET once a collector stored it.
async fn post_and_read_back(setup: Setup) -> anyhow::Result<()> {
    let (_ingest, base) = setup.ingest().await?;
    let _collector = setup.collector(&unique("group"))?;
    let client = reqwest::Client::new();

    let payload = json!({"userId": "u-17", "page": "/pricing", "ms": 5321});
    let id = post(&client, &base, &setup.stream, &payload).await?;

    let url = format!("{base}/v1/streams/{}/records/{id}", setup.stream);
    let record: Value = wait_for("the record to be readable over GET", LIMIT, || {
        let request = client.get(&url).send();
        async move {
            let response = request.await?;
            if response.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            anyhow::ensure!(
                response.status().is_success(),
                "GET answered {}",
                response.status()
            );
            Ok(Some(response.json().await?))
        }
    })
    .await?;
    assert_eq!(record["payload"], payload);
    assert_eq!(record["id"], json!(id));
    assert_eq!(record["stream"], json!(setup.stream));
    assert!(record["ingest_time"].is_string());
    Ok(())
}

#[tokio::test]
async fn killed_collector_resumes_and_stores_every_acknowledged_event_once() -> anyhow::Result<()> {
    let setup = Setup::new(3).await?;
    let (_ingest, base) = setup.ingest().await?;
    let group = unique("group");

    // First half with the collector running; it is killed (SIGKILL, as a crash) once it
    // has stored part of it, whatever it had not committed yet.
    let collector = setup.collector(&group)?;
    let mut acknowledged = post_many(&base, &setup.stream, 0, 200).await?;
    let before_kill = wait_for(
        "the collector to store part of the events",
        LIMIT,
        || async {
            let n = setup.stored_ids().await?.len();
            Ok((n >= 50).then_some(n))
        },
    )
    .await?;
    collector.kill()?;

    // Second half while no collector runs: acknowledged by Kafka, not yet stored.
    acknowledged.extend(post_many(&base, &setup.stream, 200, 200).await?);
    let while_down = setup.stored_ids().await?.len();
    assert!(
        while_down < acknowledged.len(),
        "{while_down} stored of {}",
        acknowledged.len()
    );

    // Restarted in the same group, it replays from the last commit and catches up.
    let collector = setup.collector(&group)?;
    let expected: BTreeSet<String> = acknowledged.iter().cloned().collect();
    assert_eq!(expected.len(), 400, "ids are unique");
    let stored = wait_for("every acknowledged event in Redis", LIMIT, || async {
        let stored = setup.stored_ids().await?;
        Ok((stored.len() >= expected.len()).then_some(stored))
    })
    .await?;
    assert_eq!(
        stored, expected,
        "Redis holds exactly the acknowledged events, once each"
    );
    assert!(before_kill >= 50);

    // Every stored record is the event that was sent under that id.
    let mut redis = setup.stack.redis().await?;
    for id in acknowledged.iter().step_by(37) {
        let key = format!("{}:{}:{id}", setup.pipeline.key_prefix, setup.stream);
        let value: String = redis.get(&key).await?;
        let record: Value = serde_json::from_str(&value)?;
        assert_eq!(record["id"], json!(id));
        assert!(record["payload"]["n"].as_u64().is_some_and(|n| n < 400));
    }

    // A graceful stop commits what was written: the group's offsets reach the end.
    assert!(
        collector.terminate(LIMIT).await?,
        "collector exits cleanly on SIGTERM"
    );
    let consumer: StreamConsumer = setup.stack.kafka().consumer_config(&group).create()?;
    let mut partitions = TopicPartitionList::new();
    for p in 0..3 {
        partitions.add_partition(&setup.topic, p);
    }
    let committed = consumer.committed_offsets(partitions, Duration::from_secs(10))?;
    for element in committed.elements() {
        let (_, high) = consumer.fetch_watermarks(
            &setup.topic,
            element.partition(),
            Duration::from_secs(10),
        )?;
        assert_eq!(
            element.offset(),
            Offset::Offset(high),
            "partition {} committed to its end",
            element.partition()
        );
    }
    Ok(())
}
