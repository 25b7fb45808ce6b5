//! `sluice-collector` binary: parses flags, then collects until SIGINT or SIGTERM; or,
//! as `sluice-collector redrive`, sends a stream's dead-lettered events back to its topic.

use anyhow::Context;
use clap::Parser;
use sluice_collector::redrive::{RedriveArgs, redrive};
use sluice_collector::{Args, run};

/// Many small allocations per event: mimalloc serves them faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args_os().nth(1).is_some_and(|a| a == "redrive") {
        let args = RedriveArgs::parse_from(std::env::args_os().skip(1));
        let telemetry = sluice_core::telemetry::init("sluice-collector", &args.log_level);
        let result = redrive(&args).await.context("redrive failed");
        telemetry.shutdown();
        let done = result?;
        println!(
            "redriven {} records from {} to {}",
            done.records, done.from, done.to
        );
        return Ok(());
    }
    let args = Args::parse();
    let telemetry = sluice_core::telemetry::init("sluice-collector", &args.service.log_level);
    let shutdown = sluice_core::shutdown::on_signal();
    let result = run(args, shutdown).await.context("collector failed");
    telemetry.shutdown();
    result
}
