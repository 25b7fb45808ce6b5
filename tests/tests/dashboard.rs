//! The dashboard at `/ui/` in a real browser: the real `sluice-ingest` (asking for an API
//! key) and `sluice-collector` binaries, the real Kafka and Redis, and Debian's headless
//! Chromium driven by playwright-core (services/ingest/ui/e2e/dashboard.mjs). The events
//! sent here are counted by hand; the page must show those numbers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use sluice_core::StreamSettings;
use sluice_testkit::{IngestPorts, Pipeline, Process, Stack, unique, wait_for};

const LIMIT: Duration = Duration::from_secs(60);
const API_KEY: &str = "dashboard-test-key";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The top values a user should see: by count, most first, then by value.
fn top(values: impl IntoIterator<Item = &'static str>) -> Value {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for value in values {
        *counts.entry(value).or_default() += 1;
    }
    let mut ranked: Vec<(&str, u64)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    ranked
        .into_iter()
        .map(|(value, count)| json!({"value": value, "count": count}))
        .collect()
}

#[tokio::test]
async fn the_dashboard_shows_what_was_sent_and_follows_new_events_live() -> anyhow::Result<()> {
    let script = repo().join("services/ingest/ui/e2e/dashboard.mjs");
    let modules = repo().join("services/ingest/ui/node_modules/playwright-core");
    anyhow::ensure!(
        modules.is_dir(),
        "{} is missing: scripts/setup installs the dashboard's packages",
        modules.display()
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    anyhow::ensure!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: scripts/setup installs Debian's chromium"
    );

    let stack = Stack::from_env();
    let mut stream = StreamSettings::new(unique("clicks"));
    stream.dimensions = vec!["/page".to_owned(), "/country".to_owned()];
    let name = stream.name.clone();
    let pipeline = Pipeline::create(&stack, vec![stream]).await?;
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("{API_KEY}\n"))?;
    let keys = keys.display().to_string();
    let env = [
        ("SLUICE_KAFKA_BROKERS", stack.kafka_brokers.clone()),
        ("SLUICE_REDIS_URL", stack.redis_url.clone()),
        (
            "SLUICE_SETTINGS",
            pipeline.settings_path.display().to_string(),
        ),
        ("SLUICE_KEY_PREFIX", pipeline.key_prefix.clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let ports = IngestPorts::free()?;
    let mut args = ports.flags().to_vec();
    args.extend(["--api-keys-file", &keys]);
    let _ingest = Process::spawn("sluice-ingest", &args, &env)?;
    let group = unique("dashboard");
    let _collector = Process::spawn("sluice-collector", &["--group", &group], &env)?;
    let base = ports.base();
    let client = reqwest::Client::new();
    ports.healthy(LIMIT).await?;

    // Thirteen clicks: pages and countries in known numbers.
    let sent = [
        ("/home", "de"),
        ("/home", "de"),
        ("/home", "fr"),
        ("/home", "de"),
        ("/pricing", "fr"),
        ("/home", "jp"),
        ("/docs", "de"),
        ("/pricing", "fr"),
        ("/home", "fr"),
        ("/pricing", "de"),
        ("/home", "jp"),
        ("/docs", "fr"),
        ("/pricing", "de"),
    ];
    let body: Vec<Value> = sent
        .iter()
        .map(|(page, country)| json!({"page": page, "country": country}))
        .collect();
    let answer = client
        .post(format!("{base}/v1/streams/{name}/events"))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(
        answer.status() == reqwest::StatusCode::ACCEPTED,
        "POST answered {}: {}",
        answer.status(),
        answer.text().await?
    );
    let aggregates = format!("{base}/v1/streams/{name}/aggregates");
    wait_for("the collector to write the 13 events", LIMIT, || {
        let request = client.get(&aggregates).bearer_auth(API_KEY).send();
        async move {
            let counts: Value = request.await?.error_for_status()?.json().await?;
            Ok((counts["total"] == sent.len()).then_some(()))
        }
    })
    .await?;

    let expected = json!({
        "total": sent.len(),
        "dimensions": {
            "/page": top(sent.iter().map(|(page, _)| *page)),
            "/country": top(sent.iter().map(|(_, country)| *country)),
        },
    });
    let live = json!({"count": 9, "dimension": "/page", "value": "/live"});
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let output = tokio::process::Command::new("node")
        .arg(&script)
        .current_dir(repo().join("services/ingest/ui"))
        .env("SLUICE_UI_BASE", &base)
        .env("SLUICE_UI_STREAM", &name)
        .env("SLUICE_UI_API_KEY", API_KEY)
        .env("SLUICE_UI_EXPECT", expected.to_string())
        .env("SLUICE_UI_LIVE", live.to_string())
        .env("SLUICE_UI_SCREENSHOT", &screenshot)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run node")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    anyhow::ensure!(
        output.status.success(),
        "the browser saw something else ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let png = std::fs::read(&screenshot).context("the screenshot")?;
    anyhow::ensure!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is not a PNG"
    );
    println!("screenshot: {} ({} bytes)", screenshot.display(), png.len());
    Ok(())
}
