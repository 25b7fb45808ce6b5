//! `sluice-operator` binary. This build generates the CRD (`crdgen`) but carries no
//! reconciler yet; it says so and exits with an error rather than pretend to manage
//! anything.

use clap::Parser;

/// Command line of `sluice-operator`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "sluice-operator",
    version,
    about = "Sluice operator for PipelineConfig resources"
)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!(
        "this build of sluice-operator has no reconciler yet; run the services locally with `make run`"
    )
}
