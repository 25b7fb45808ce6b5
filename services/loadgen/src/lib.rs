//! `sluice-loadgen`: a closed-loop HTTP load client for a Sluice ingest.
//!
//! `--concurrency` clients each post events one after another to
//! `POST /v1/streams/{stream}/events` until `--requests` were sent or `--duration` passed,
//! whichever comes first. Latency is recorded per request in an HDR histogram; the report
//! gives throughput, errors by kind, and latency percentiles.
//!
//! Targets are limited to loopback addresses unless `--allow-remote` is given.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Mutex;

/// Command line of `sluice-loadgen`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-loadgen",
    version,
    about = "Load client for Sluice ingest"
)]
pub struct Args {
    /// Base URL of the ingest service.
    #[arg(
        long,
        env = "SLUICE_LOADGEN_TARGET",
        default_value = "http://127.0.0.1:8080"
    )]
    pub target: String,
    /// Stream to post events to.
    #[arg(long, env = "SLUICE_LOADGEN_STREAM", default_value = "visit")]
    pub stream: String,
    /// Requests to send in all.
    #[arg(long, env = "SLUICE_LOADGEN_REQUESTS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub requests: u64,
    /// Clients sending at the same time, each waiting for its answer before the next request.
    #[arg(long, env = "SLUICE_LOADGEN_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub concurrency: u64,
    /// Longest the run may take, in seconds.
    #[arg(long, env = "SLUICE_LOADGEN_DURATION", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
    /// Allow targets that are not loopback addresses.
    #[arg(long, env = "SLUICE_LOADGEN_ALLOW_REMOTE")]
    pub allow_remote: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Log filter.
    #[arg(long, env = "SLUICE_LOG", default_value = "warn")]
    pub log_level: String,
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Requests sent.
    pub sent: u64,
    /// Requests answered 202.
    pub acknowledged: u64,
    /// Failed requests by kind (`http-503`, `connect`, ...).
    pub errors: Vec<(String, u64)>,
    /// Wall time of the run, in seconds.
    pub seconds: f64,
    /// Acknowledged requests per second.
    pub throughput: f64,
    /// Latency percentiles in milliseconds: p50, p90, p99, p99.9, max.
    pub latency_ms: Latencies,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Serialize)]
pub struct Latencies {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest request.
    pub max: f64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "sent          {}", self.sent)?;
        writeln!(f, "acknowledged  {}", self.acknowledged)?;
        for (kind, n) in &self.errors {
            writeln!(f, "error         {kind}: {n}")?;
        }
        writeln!(f, "duration      {:.2} s", self.seconds)?;
        writeln!(
            f,
            "throughput    {:.0} events/s ({:.0} per minute)",
            self.throughput,
            self.throughput * 60.0
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max
        )
    }
}

/// Checks that `target` is a loopback address, unless remote targets are allowed.
pub fn check_target(target: &str, allow_remote: bool) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(target).with_context(|| format!("{target:?} is not a URL"))?;
    let host = url.host_str().context("the target URL has no host")?;
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback && !allow_remote {
        bail!("{host} is not a loopback address; pass --allow-remote to send load to it");
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    acknowledged: AtomicU64,
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

/// Runs the load and returns what it measured.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    check_target(&args.target, args.allow_remote)?;
    let url = format!(
        "{}/v1/streams/{}/events",
        args.target.trim_end_matches('/'),
        args.stream
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(args.concurrency as usize)
        .build()?;
    let tally = Arc::new(Tally::default());
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();

    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, url, tally, histogram, next) = (
            client.clone(),
            url.clone(),
            tally.clone(),
            histogram.clone(),
            next.clone(),
        );
        let requests = args.requests;
        clients.spawn(async move {
            let mut local =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests || Instant::now() >= deadline {
                    break;
                }
                let body =
                    json!({"userId": format!("user-{}", n % 1000), "page": "/products", "n": n});
                let start = Instant::now();
                tally.sent.fetch_add(1, Ordering::Relaxed);
                let outcome = client.post(&url).json(&body).send().await;
                let micros = start.elapsed().as_micros().max(1) as u64;
                let kind = match outcome {
                    Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => None,
                    Ok(r) => Some(format!("http-{}", r.status().as_u16())),
                    Err(e) if e.is_timeout() => Some("timeout".to_owned()),
                    Err(e) if e.is_connect() => Some("connect".to_owned()),
                    Err(_) => Some("transport".to_owned()),
                };
                match kind {
                    None => {
                        tally.acknowledged.fetch_add(1, Ordering::Relaxed);
                        local.saturating_record(micros);
                    }
                    Some(kind) => *tally.errors.lock().await.entry(kind).or_default() += 1,
                }
            }
            histogram.lock().await.add(&local).expect("same bounds");
        });
    }
    while let Some(done) = clients.join_next().await {
        done?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let h = histogram.lock().await;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let acknowledged = tally.acknowledged.load(Ordering::Relaxed);
    Ok(Report {
        sent: tally.sent.load(Ordering::Relaxed),
        acknowledged,
        errors: tally.errors.lock().await.clone().into_iter().collect(),
        seconds,
        throughput: acknowledged as f64 / seconds.max(f64::EPSILON),
        latency_ms: Latencies {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_unless_allowed() {
        assert!(check_target("http://127.0.0.1:8080", false).is_ok());
        assert!(check_target("http://localhost:8080", false).is_ok());
        assert!(check_target("http://[::1]:8080", false).is_ok());
        let err = check_target("http://10.0.0.5:8080", false).expect_err("remote");
        assert!(err.to_string().contains("--allow-remote"));
        assert!(check_target("http://10.0.0.5:8080", true).is_ok());
        assert!(check_target("not a url", false).is_err());
    }
}
