//! The API contract, fuzzed from outside: schemathesis (scripts/schemathesis) generates
//! requests from the `/openapi.json` of a running `sluice-ingest` — valid ones, which must
//! be accepted, and invalid ones, which must be refused — and checks every answer against
//! the document: status codes, content types, headers, response schemas, authentication.
//! Every check runs; `tests/contract/schemathesis.toml` names the two operations whose
//! valid requests may get an answer beyond the check's defaults, and why.
//!
//! The pipeline has the workshop's streams (a key pointer on `visit`, dimensions), the chat
//! stream, and a stream with a JSON Schema, with a collector writing all of them to Redis
//! so that `ack=sink` and record reads answer for real; ingest requires an API key.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use sluice_core::StreamSettings;
use sluice_testkit::{IngestPorts, Pipeline, Process, Stack, unique};

const LIMIT: Duration = Duration::from_secs(60);
const KEY: &str = "contract-test-key-0123456789";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_path_buf()
}

/// The streams a fuzzer meets: their names are the document's `enum`.
fn streams() -> Vec<StreamSettings> {
    let stream = |name: &str| {
        let mut s = StreamSettings::new(name.to_owned());
        s.topic = Some(unique(name));
        s
    };
    let mut visit = stream("visit");
    visit.key = Some("/userId".to_owned());
    visit.dimensions = vec!["/page".to_owned()];
    let activity = stream("activity");
    let mut messages = stream("messages");
    messages.key = Some("/touser".to_owned());
    let mut points = stream("points");
    points.schema = Some(json!({
        "type": "object",
        "required": ["lat", "lon"],
        "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90},
            "lon": {"type": "number", "minimum": -180, "maximum": 180},
        },
    }));
    vec![visit, activity, messages, points]
}

/// Runs schemathesis with every check against the document at `url`; its report is the
/// test's output.
fn schemathesis(url: &str, extra: &[&str]) -> anyhow::Result<()> {
    let root = root();
    let installed = Command::new(root.join("scripts/schemathesis"))
        .output()
        .context("cannot run scripts/schemathesis")?;
    ensure!(
        installed.status.success(),
        "scripts/schemathesis failed: {}",
        String::from_utf8_lossy(&installed.stderr)
    );
    let program = String::from_utf8(installed.stdout)?.trim().to_owned();
    let config = root.join("tests/contract/schemathesis.toml");
    let report = tempfile::tempdir()?;
    let mut command = Command::new(&program);
    command
        .arg("--config-file")
        .arg(&config)
        .args(["run", url, "--checks", "all", "--wait-for-schema", "30"])
        .args(["--request-timeout", "20", "--max-examples", "50"])
        .arg("--report-dir")
        .arg(report.path())
        .args(extra)
        .env("NO_COLOR", "1")
        // Its cache of found failures stays with the report, out of the repository.
        .current_dir(report.path());
    let output = command.output().context("cannot run schemathesis")?;
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    ensure!(
        output.status.success(),
        "schemathesis found the server and its document disagreeing ({}); its report is above",
        output.status
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_does_what_its_openapi_document_says() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let pipeline = Pipeline::create(&stack, streams()).await?;
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{KEY}\n"))?;
    let settings = pipeline.settings_path.display().to_string();
    let env = [
        ("SLUICE_KAFKA_BROKERS", stack.kafka_brokers.as_str()),
        ("SLUICE_REDIS_URL", stack.redis_url.as_str()),
        ("SLUICE_SETTINGS", settings.as_str()),
        ("SLUICE_KEY_PREFIX", pipeline.key_prefix.as_str()),
    ];
    let group = unique("contract");
    let _collector = Process::spawn("sluice-collector", &["--group", &group], &env)?;
    let ports = IngestPorts::free()?;
    let mut args = ports.flags().to_vec();
    let keys = keys.display().to_string();
    // Short enough bounds that a generated request never outlasts the request timeout.
    args.extend([
        "--create-topics",
        "--api-keys-file",
        &keys,
        "--work-max-ms",
        "200",
        "--sink-ack-max-timeout",
        "5s",
    ]);
    let _ingest = Process::spawn("sluice-ingest", &args, &env)?;
    ports.healthy(LIMIT).await?;

    // The document names this pipeline's streams, so a generated client can reach them.
    let document: Value = reqwest::get(format!("{}/openapi.json", ports.base()))
        .await?
        .json()
        .await?;
    let record = &document["paths"]["/v1/streams/{stream}/records/{id}"]["get"];
    assert_eq!(
        record["parameters"][0]["schema"]["enum"],
        json!(["activity", "messages", "points", "visit"])
    );
    assert!(document["paths"]["/v1/streams/points/events"]["post"].is_object());

    let auth = format!("Authorization: Bearer {KEY}");
    let api = format!("{}/openapi.json", ports.base());
    let admin = format!("{}/openapi.json", ports.metrics_base());
    tokio::task::spawn_blocking(move || {
        schemathesis(&api, &["-H", &auth, "--max-time", "90"])?;
        schemathesis(&admin, &["--max-time", "20"])
    })
    .await?
}
