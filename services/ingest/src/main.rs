//! `sluice-ingest` binary: parses flags, then serves until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use sluice_ingest::{App, Args, run};

/// Many small allocations per event: mimalloc serves them faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = sluice_core::telemetry::init("sluice-ingest", &args.service.log_level);
    let drain = sluice_core::shutdown::on_signal_with_drain(args.drain_delay);
    let shutdown = drain.stop.clone();
    let app = App::connect(&args).await.context("cannot start ingest")?;
    tokio::spawn({
        let app = app.clone();
        async move {
            drain.draining.cancelled().await;
            app.start_draining();
        }
    });
    let address = args.http_address();
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let mut doors = tokio::task::JoinSet::new();
    if let Some(addr) = args.service.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let (app, shutdown) = (app.clone(), shutdown.clone());
        doors.spawn(async move {
            if let Err(e) = sluice_ingest::serve_admin(l, app, shutdown).await {
                tracing::error!(error = %e, "the metrics and health server stopped");
            }
        });
    }
    if let Some(addr) = args.tcp_write_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        doors.spawn(sluice_ingest::tcp::serve_write(
            l,
            app.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(addr) = args.tcp_read_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        doors.spawn(sluice_ingest::tcp::serve_read(
            l,
            app.clone(),
            shutdown.clone(),
        ));
    }
    run(listener, app.clone(), shutdown).await?;
    while doors.join_next().await.is_some() {}
    // What the TCP doors queued last is acknowledged before the process ends.
    app.flush(std::time::Duration::from_secs(10));
    telemetry.shutdown();
    Ok(())
}
