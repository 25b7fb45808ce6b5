//! `sluice-loadgen` binary: parses flags, runs one load, prints the report. Exits with 2
//! when a sink check found an acknowledged event missing or duplicated.

use clap::Parser;
use sluice_loadgen::{Args, run};

/// The allocator ingest and the collector use: the bare producer ceiling
/// (`--protocol kafka`) allocates per event as ingest does, and the client's own work
/// takes less of the CPU it shares with the service it measures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = sluice_core::telemetry::init("sluice-loadgen", &args.log_level);
    let report = run(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    if report
        .verification
        .iter()
        .any(|v| v.missing > 0 || v.duplicated > 0)
    {
        std::process::exit(2);
    }
    Ok(())
}
