//! `sluice-loadgen` binary: parses flags, runs one load, prints the report.

use clap::Parser;
use sluice_loadgen::{Args, run};

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
    Ok(())
}
