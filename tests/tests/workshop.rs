//! The clickstream workshop's three programs, started with exactly the workshop's flags
//! and no settings file: the web service (`sluice-ingest --brokers --port --visit-topic
//! --activity-topic`) creates its two topics, the collector (`sluice-collector --brokers
//! --concurrent-count --groups --record-directory`) writes both topics to files, and the
//! load client (`sluice-loadgen --web-service --concurrent-clients --report-interval`)
//! paces each client's reports by the interval. Only a bound on the load (`--requests`) and
//! its JSON report are added to the workshop's flags.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use rdkafka::Message;
use serde_json::{Value, json};
use sluice_core::Envelope;
use sluice_testkit::{
    Process, Stack, binary, free_port, healthy, partitions, read_topic, unique, wait_for,
};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn the_workshop_programs_run_with_the_workshops_own_flags() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let brokers = stack.kafka_brokers.clone();
    let visit_topic = unique("visits-v1");
    let activity_topic = unique("activities-v1");

    // The web service: its topics do not exist yet; it creates them. The workshop runs no
    // Redis: nothing answers where ingest would look for one.
    let port = free_port()?.to_string();
    let health = format!("127.0.0.1:{}", free_port()?);
    let no_redis = format!("redis://127.0.0.1:{}", free_port()?);
    let _web = Process::spawn(
        "sluice-ingest",
        &[
            "--brokers",
            &brokers,
            "--port",
            &port,
            "--visit-topic",
            &visit_topic,
            "--activity-topic",
            &activity_topic,
            "--metrics-listen",
            &health,
        ],
        &[("SLUICE_REDIS_URL", &no_redis)],
    )?;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    healthy(&format!("http://{health}"), LIMIT).await?;
    for topic in [&visit_topic, &activity_topic] {
        anyhow::ensure!(
            partitions(&stack, topic)?.is_some(),
            "the web service created {topic}"
        );
    }

    // The collector: two groups, one per topic, into files.
    let records = tempfile::tempdir()?;
    let records_dir = records.path().display().to_string();
    let groups = format!(
        "{}:{visit_topic},{}:{activity_topic}",
        unique("visits"),
        unique("activities")
    );
    let _collector = Process::spawn(
        "sluice-collector",
        &[
            "--brokers",
            &brokers,
            "--concurrent-count",
            "2",
            "--groups",
            &groups,
            "--record-directory",
            &records_dir,
        ],
        &[],
    )?;

    // The load client: three clients, each pausing 100 ms between its reports.
    let output = tokio::process::Command::new(binary("sluice-loadgen")?)
        .args([
            "--web-service",
            &base,
            "--concurrent-clients",
            "3",
            "--report-interval",
            "100ms",
            "--requests",
            "30",
            "--json",
        ])
        .output()
        .await?;
    let report: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "no JSON report: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    anyhow::ensure!(output.status.success(), "the load client failed: {report}");
    anyhow::ensure!(report["acknowledged"] == 30, "{report}");

    // The pacing shows in when the web service took the reports: of any four in a row, two
    // came from one client, which waited 100 ms after its answer before the next.
    let mut taken: Vec<jiff::Timestamp> = read_topic(&stack, &visit_topic)
        .await?
        .iter()
        .map(|m| {
            Envelope::decode(m.payload(), None::<&rdkafka::message::OwnedHeaders>)
                .map(|e| e.ingest_time)
        })
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(taken.len() == 30, "{} reports on the topic", taken.len());
    taken.sort();
    for window in taken.windows(4) {
        let span = window[3].duration_since(window[0]);
        anyhow::ensure!(
            span >= jiff::SignedDuration::from_millis(100),
            "four reports within {span:?}: the clients did not pause between reports"
        );
    }

    // Every report in the collector's files once, under the topic's name.
    let lines = wait_for("the 30 reports in the collector's files", LIMIT, || {
        let (dir, topic) = (records.path().to_owned(), visit_topic.clone());
        async move {
            let lines = sluice_core::segment::read_all(&dir, &topic).unwrap_or_default();
            Ok((lines.len() >= 30).then_some(lines))
        }
    })
    .await?;
    let ids: BTreeSet<&str> = lines.iter().filter_map(|l| l["id"].as_str()).collect();
    anyhow::ensure!(
        lines.len() == 30 && ids.len() == 30,
        "{} lines, {} ids",
        lines.len(),
        ids.len()
    );
    let acknowledged_ids: BTreeSet<String> = taken_ids(&stack, &visit_topic).await?;
    anyhow::ensure!(
        ids.iter().all(|id| acknowledged_ids.contains(*id)),
        "the files hold the reports the web service took"
    );

    // The activity topic goes to its own group's files.
    let answer = client
        .post(format!("{base}/api/activity/v1/"))
        .json(&json!({"id": "workshop-activity-1", "userId": "ann", "activity": "click"}))
        .send()
        .await?;
    anyhow::ensure!(answer.status() == reqwest::StatusCode::ACCEPTED);
    wait_for("the activity in the collector's files", LIMIT, || {
        let dir = records.path().to_owned();
        async move {
            let mut found = false;
            for entry in walk(&dir)? {
                if std::fs::read_to_string(entry)?.contains("workshop-activity-1") {
                    found = true;
                }
            }
            Ok(found.then_some(()))
        }
    })
    .await?;
    Ok(())
}

/// The ids of the events on `topic`.
async fn taken_ids(stack: &Stack, topic: &str) -> anyhow::Result<BTreeSet<String>> {
    read_topic(stack, topic)
        .await?
        .iter()
        .map(|m| {
            Envelope::decode(m.payload(), None::<&rdkafka::message::OwnedHeaders>)
                .map(|e| e.id)
                .map_err(anyhow::Error::from)
        })
        .collect()
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}
