//! Collectors as real processes: two in one group share the partitions and one takes over
//! when the other is killed; partitions change hands in the middle of a backlog without an
//! event written twice; the file sink survives a kill in the middle of its writes.

use std::collections::BTreeSet;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::json;
use sluice_core::{Envelope, StreamSettings};
use sluice_testkit::{
    Pipeline, Process, Stack, free_port, produce, stable_members, unique, wait_for,
};

const LIMIT: Duration = Duration::from_secs(90);

fn events(stream: &str, range: std::ops::Range<usize>) -> Vec<Envelope> {
    range
        .map(|i| {
            let mut e = Envelope::new(stream, Some(format!("k{}", i % 17)), json!({"n": i}));
            e.id = format!("e{i}");
            e
        })
        .collect()
}

fn collector(stack: &Stack, pipeline: &Pipeline, args: &[&str]) -> anyhow::Result<Process> {
    let settings = pipeline.settings_path.display().to_string();
    Process::spawn(
        "sluice-collector",
        args,
        &[
            ("SLUICE_KAFKA_BROKERS", &stack.kafka_brokers),
            ("SLUICE_REDIS_URL", &stack.redis_url),
            ("SLUICE_SETTINGS", &settings),
            ("SLUICE_KEY_PREFIX", &pipeline.key_prefix),
            ("SLUICE_BATCH_SIZE", "20"),
        ],
    )
}

async fn metric(port: u16, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test]
async fn two_collectors_share_the_partitions_and_one_takes_over_from_the_other()
-> anyhow::Result<()> {
    let stack = Stack::from_env();
    let mut s = StreamSettings::new(unique("shared"));
    s.partitions = 6;
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await?;
    let group = unique("group");
    let (port_a, port_b) = (free_port()?, free_port()?);
    let (listen_a, listen_b) = (format!("127.0.0.1:{port_a}"), format!("127.0.0.1:{port_b}"));
    let a = collector(
        &stack,
        &pipeline,
        &["--group", &group, "--metrics-listen", &listen_a],
    )?;
    let mut b = collector(
        &stack,
        &pipeline,
        &["--group", &group, "--metrics-listen", &listen_b],
    )?;
    wait_for("both collectors to hold partitions", LIMIT, || async {
        Ok((stable_members(&stack, &group)? == 2).then_some(()))
    })
    .await?;

    let mut sent: BTreeSet<String> = BTreeSet::new();
    let first = events(&name, 0..600);
    sent.extend(first.iter().map(|e| e.id.clone()));
    produce(&stack, &name, &first).await?;
    let redis = stack.redis().await?;
    let stored = |want: usize| {
        let redis = redis.clone();
        let pattern = format!("{}:{name}:*", pipeline.key_prefix);
        async move {
            wait_for(&format!("{want} records in Redis"), LIMIT, || {
                let (mut redis, pattern) = (redis.clone(), pattern.clone());
                async move {
                    let keys: Vec<String> = redis.keys(&pattern).await?;
                    Ok((keys.len() >= want).then_some(keys))
                }
            })
            .await
        }
    };
    stored(600).await?;
    // Both instances consumed part of the topic.
    let consumed_a = metric(port_a, "sluice_collector_events_consumed_total").await?;
    let consumed_b = metric(port_b, "sluice_collector_events_consumed_total").await?;
    assert!(
        consumed_a > 0.0 && consumed_b > 0.0,
        "a consumed {consumed_a}, b consumed {consumed_b}"
    );
    assert!(consumed_a + consumed_b >= 600.0);

    // A dies; B takes over its partitions once the group notices, and nothing is lost.
    a.kill()?;
    let second = events(&name, 600..1200);
    sent.extend(second.iter().map(|e| e.id.clone()));
    produce(&stack, &name, &second).await?;
    let keys = stored(1200).await?;
    let prefix = format!("{}:{name}:", pipeline.key_prefix);
    let got: BTreeSet<String> = keys
        .iter()
        .map(|k| k.trim_start_matches(&prefix).to_owned())
        .collect();
    assert_eq!(got, sent, "every event once");
    assert!(b.running());
    // B's lag is reported per partition and reaches zero.
    wait_for(
        "B's lag metric at zero for all six partitions",
        LIMIT,
        || async {
            let text = reqwest::get(format!("http://127.0.0.1:{port_b}/metrics"))
                .await?
                .text()
                .await?;
            let lags: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.starts_with("sluice_collector_consumer_lag{")
                        && l.contains(&format!("topic=\"{name}\""))
                })
                .collect();
            Ok((lags.len() == 6 && lags.iter().all(|l| l.ends_with(" 0"))).then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// The ids on the lines under `dir` (a collector's record directory) for `stream`.
fn ids_on_disk(dir: &std::path::Path, stream: &str) -> Vec<String> {
    sluice_core::segment::read_all(dir, stream)
        .unwrap_or_default()
        .iter()
        .map(|l| l["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn partitions_change_hands_mid_backlog_and_every_event_is_written_once() -> anyhow::Result<()>
{
    // Two file collectors with a directory each (a volume per replica): an event in both
    // directories was written by both, because a partition changed hands before what its
    // first owner had in flight was stored.
    let stack = Stack::from_env();
    let mut s = StreamSettings::new(unique("handover"));
    s.partitions = 6;
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await?;
    let sent = events(&name, 0..120_000);
    for chunk in sent.chunks(40_000) {
        produce(&stack, &name, chunk).await?;
    }
    let group = unique("group");
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    // Small fetches per partition: each batch holds records of every partition, so that
    // every partition has records in flight and left to write when it changes hands; and
    // frequent heartbeats, so that the group rebalances well before the backlog is drained.
    let args = |dir: &tempfile::TempDir| -> [String; 10] {
        [
            "--group".to_owned(),
            group.clone(),
            "--sink".to_owned(),
            "file".to_owned(),
            "--record-directory".to_owned(),
            dir.path().display().to_string(),
            "--kafka-option".to_owned(),
            "max.partition.fetch.bytes=16384".to_owned(),
            "--kafka-option".to_owned(),
            "heartbeat.interval.ms=100".to_owned(),
        ]
    };
    let on_disk = |dir: &tempfile::TempDir, want: usize| {
        let (dir, name) = (dir.path().to_owned(), name.clone());
        async move {
            wait_for(&format!("{want} lines in {}", dir.display()), LIMIT, || {
                let (dir, name) = (dir.clone(), name.clone());
                async move { Ok((ids_on_disk(&dir, &name).len() >= want).then_some(())) }
            })
            .await
        }
    };
    let args_a = args(&dir_a);
    let mut a = collector(&stack, &pipeline, &args_a.each_ref().map(String::as_str))?;
    on_disk(&dir_a, 1000).await?;
    // B joins while A is in the middle of the backlog, then leaves again before it is
    // drained: the partitions move from A to both, and back to A.
    let args_b = args(&dir_b);
    let b = collector(&stack, &pipeline, &args_b.each_ref().map(String::as_str))?;
    on_disk(&dir_b, 500).await?;
    let written_by_a_then = ids_on_disk(dir_a.path(), &name).len();
    assert!(b.terminate(LIMIT).await?, "B stops when asked");
    wait_for("every event on disk", LIMIT, || async {
        let n = ids_on_disk(dir_a.path(), &name).len() + ids_on_disk(dir_b.path(), &name).len();
        Ok((n >= sent.len()).then_some(()))
    })
    .await?;
    let mut ids = ids_on_disk(dir_a.path(), &name);
    let written_by_a = ids.len();
    ids.extend(ids_on_disk(dir_b.path(), &name));
    let once: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        once.len(),
        ids.len(),
        "{} events written twice (A wrote {written_by_a}, B {})",
        ids.len() - once.len(),
        ids.len() - written_by_a
    );
    assert_eq!(
        once,
        sent.iter().map(|e| e.id.clone()).collect::<BTreeSet<_>>()
    );
    eprintln!(
        "A wrote {written_by_a_then} before B left and {written_by_a} in all, B {}",
        ids.len() - written_by_a
    );
    assert!(a.running());
    Ok(())
}

#[tokio::test]
async fn file_sink_killed_mid_write_keeps_whole_lines_and_every_event_once() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let mut s = StreamSettings::new(unique("files"));
    s.partitions = 2;
    let name = s.name.clone();
    let pipeline = Pipeline::create(&stack, vec![s]).await?;
    let dir = tempfile::tempdir()?;
    let dir_arg = dir.path().display().to_string();
    let group = unique("group");
    let sent = events(&name, 0..5000);
    produce(&stack, &name, &sent).await?;
    let args = [
        "--group",
        group.as_str(),
        "--sink",
        "file",
        "--record-directory",
        dir_arg.as_str(),
        "--file-max-bytes",
        "100000",
    ];
    let lines = |want: usize| {
        let (dir, name) = (dir.path().to_owned(), name.clone());
        async move {
            wait_for(&format!("{want} lines on disk"), LIMIT, || {
                let (dir, name) = (dir.clone(), name.clone());
                async move {
                    // Lines are read whole or not at all; a partial line is an error here.
                    let lines = sluice_core::segment::read_all(&dir, &name).unwrap_or_default();
                    Ok((lines.len() >= want).then_some(lines))
                }
            })
            .await
        }
    };
    let first = collector(&stack, &pipeline, &args)?;
    lines(500).await?;
    first.kill()?;
    let _second = collector(&stack, &pipeline, &args)?;
    let all = lines(5000).await?;
    let ids: Vec<String> = all
        .iter()
        .map(|l| l["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let unique_ids: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), unique_ids.len(), "no event written twice");
    assert_eq!(
        unique_ids,
        sent.iter().map(|e| e.id.clone()).collect::<BTreeSet<_>>()
    );
    // Every line of every segment is whole JSON.
    sluice_core::segment::read_all(dir.path(), &name)?;
    Ok(())
}
