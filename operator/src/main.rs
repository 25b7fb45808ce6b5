//! `sluice-operator` binary: watches `PipelineConfig` resources and reconciles them until
//! SIGINT or SIGTERM.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use kube::{Api, Client};
use sluice_operator::crd::PipelineConfig;
use sluice_operator::plan::Images;
use sluice_operator::reconcile::{Context, run};

/// Command line of `sluice-operator`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "sluice-operator",
    version,
    about = "Sluice operator for PipelineConfig resources"
)]
struct Args {
    /// Watch only this namespace; every namespace when unset.
    #[arg(long, env = "SLUICE_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Image of sluice-ingest.
    #[arg(long, env = "SLUICE_INGEST_IMAGE", default_value_t = Images::default().ingest)]
    ingest_image: String,
    /// Image of sluice-collector.
    #[arg(long, env = "SLUICE_COLLECTOR_IMAGE", default_value_t = Images::default().collector)]
    collector_image: String,
    /// Image of the managed Redis.
    #[arg(long, env = "SLUICE_REDIS_IMAGE", default_value_t = Images::default().redis)]
    redis_image: String,
    /// Log filter.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = sluice_core::telemetry::init("sluice-operator", &args.log_level);
    let shutdown = sluice_core::shutdown::on_signal();
    let client = Client::try_default()
        .await
        .context("cannot reach the Kubernetes API")?;
    let api: Api<PipelineConfig> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let ctx = Arc::new(Context::new(
        client,
        Images {
            ingest: args.ingest_image,
            collector: args.collector_image,
            redis: args.redis_image,
        },
    ));
    tracing::info!(namespace = ?args.namespace, "sluice-operator started");
    run(api, ctx, shutdown).await;
    telemetry.shutdown();
    Ok(())
}
