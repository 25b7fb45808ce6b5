//! `sluice-loadgen` against a real pipeline (ingest, Kafka, a Redis collector): every
//! protocol, then a check by id that each acknowledged event reached Redis, the file sink
//! and MySQL exactly once.

use std::time::Duration;

use serde_json::Value;
use sluice_core::StreamSettings;
use sluice_testkit::{IngestPorts, Pipeline, Process, Stack, binary, free_port, unique};

#[tokio::test]
async fn every_protocol_delivers_every_acknowledged_event_to_redis() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let mut stream = StreamSettings::new(unique("load"));
    stream.partitions = 3;
    let name = stream.name.clone();
    let pipeline = Pipeline::create(&stack, vec![stream]).await?;
    let settings = pipeline.settings_path.display().to_string();
    let env = [
        ("SLUICE_KAFKA_BROKERS", stack.kafka_brokers.as_str()),
        ("SLUICE_REDIS_URL", stack.redis_url.as_str()),
        ("SLUICE_SETTINGS", settings.as_str()),
        ("SLUICE_KEY_PREFIX", pipeline.key_prefix.as_str()),
    ];
    let ports = IngestPorts::free()?;
    let tcp = format!("127.0.0.1:{}", free_port()?);
    let mut ingest = Process::spawn(
        "sluice-ingest",
        &[
            "--listen",
            &ports.api,
            "--metrics-listen",
            &ports.metrics,
            "--tcp-write-listen",
            &tcp,
            "--tcp-stream",
            &name,
        ],
        &env,
    )?;
    let _collector = Process::spawn("sluice-collector", &["--group", &unique("load")], &env)?;
    // A second group writes the same events to files.
    let records = std::env::temp_dir().join(unique("loadgen-records"));
    let records_dir = records.display().to_string();
    let _files = Process::spawn(
        "sluice-collector",
        &[
            "--group",
            &unique("files"),
            "--sink",
            "file",
            "--record-directory",
            &records_dir,
        ],
        &env,
    )?;
    // And a third to MySQL.
    let table = unique("load").replace('-', "_");
    let _mysql = Process::spawn(
        "sluice-collector",
        &[
            "--group",
            &unique("mysql"),
            "--sink",
            "mysql",
            "--database-url",
            &stack.mysql_url,
            "--table",
            &table,
        ],
        &env,
    )?;
    let base = ports.base();
    ports.healthy(Duration::from_secs(60)).await?;
    anyhow::ensure!(ingest.running(), "ingest exited");

    for (protocol, extra, events) in [
        ("http", vec!["--requests", "400"], 400),
        (
            "http-batch",
            vec!["--requests", "20", "--batch-size", "25"],
            500,
        ),
        ("ws", vec!["--requests", "40", "--batch-size", "5"], 200),
        (
            "tcp",
            vec!["--req-per-user", "25", "--shape", "record"],
            200,
        ),
    ] {
        let mut args = vec![
            "--target",
            &base,
            "--tcp-target",
            &tcp,
            "--stream",
            &name,
            "--protocol",
            protocol,
            "--concurrency",
            "8",
            "--duration",
            "60",
            "--status-interval",
            "0",
            "--json",
            "--verify-redis",
            &stack.redis_url,
            "--verify-key-prefix",
            &pipeline.key_prefix,
            "--verify-file",
            &records_dir,
            "--verify-mysql",
            &stack.mysql_url,
            "--verify-table",
            &table,
        ];
        args.extend(extra);
        let output = tokio::process::Command::new(binary("sluice-loadgen")?)
            .args(&args)
            .output()
            .await?;
        let report: Value = serde_json::from_slice(&output.stdout).map_err(|e| {
            anyhow::anyhow!(
                "{protocol}: no JSON report ({e}): {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        assert!(output.status.success(), "{protocol}: {report}");
        assert_eq!(
            report["events_acknowledged"], events,
            "{protocol}: {report}"
        );
        assert_eq!(
            report["errors"],
            serde_json::json!({}),
            "{protocol}: {report}"
        );
        for (i, sink) in ["redis", "file", "mysql"].into_iter().enumerate() {
            let check = &report["verification"][i];
            assert_eq!(check["sink"], sink);
            assert_eq!(check["checked"], events, "{protocol}: {report}");
            assert_eq!(check["missing"], 0, "{protocol}: {report}");
            assert_eq!(check["duplicated"], 0, "{protocol}: {report}");
        }
        assert!(
            report["latency_ms"]["p50"]
                .as_f64()
                .is_some_and(|p| p > 0.0)
        );
    }
    let _ = std::fs::remove_dir_all(&records);
    Ok(())
}
