//! `sluice-collector` binary: parses flags, then collects until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use sluice_collector::{Args, run};

/// Many small allocations per event: mimalloc serves them faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = sluice_core::telemetry::init("sluice-collector", &args.log_level);
    let shutdown = sluice_core::shutdown::on_signal();
    let result = run(args, shutdown).await.context("collector failed");
    telemetry.shutdown();
    result
}
