//! `sluice-ingest` binary: parses flags, then serves until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use sluice_ingest::{App, Args, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    sluice_core::telemetry::init(&args.log_level);
    let shutdown = sluice_core::shutdown::on_signal();
    let app = App::connect(&args).await.context("cannot start ingest")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    run(listener, app, shutdown).await?;
    Ok(())
}
