//! Graceful shutdown: one `CancellationToken` for a whole process.
//!
//! `main` calls [`on_signal`]; every server and worker receives a clone of the token (or a
//! child of it), stops taking new work when it is cancelled, drains what it holds and
//! returns.
//!
//! A server behind a load balancer calls [`on_signal_with_drain`] instead: on SIGTERM it
//! first drains (it keeps serving, fails its readiness check and asks clients to close
//! their connections) for a delay, while the load balancer takes it out of rotation, and
//! only then stops.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT (Ctrl-C) or SIGTERM.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining");
        cancel.cancel();
    });
    token
}

/// The two steps of stopping a server behind a load balancer.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    /// Cancelled when the server should leave rotation: it keeps serving, but tells load
    /// balancers and clients to go elsewhere.
    pub draining: CancellationToken,
    /// Cancelled when the server should stop accepting and finish what it holds.
    pub stop: CancellationToken,
}

/// Tokens for a two-step stop. SIGTERM (what Kubernetes sends) starts draining, and the
/// stop follows `delay` later, or at once on a second signal. SIGINT (Ctrl-C, where no
/// load balancer needs time) drains and stops at once.
pub fn on_signal_with_drain(delay: Duration) -> Drain {
    let drain = Drain::default();
    let tokens = drain.clone();
    tokio::spawn(async move {
        let first = wait_for_signal().await;
        tokens.draining.cancel();
        if first == Signal::Terminate && !delay.is_zero() {
            tracing::info!(
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "shutdown requested; draining connections before stopping"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = wait_for_signal() => tracing::info!("second signal; stopping now"),
            }
        }
        tracing::info!("stopping: no new connections; finishing requests in flight");
        tokens.stop.cancel();
    });
    drain
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Interrupt,
    Terminate,
}

async fn wait_for_signal() -> Signal {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => Signal::Interrupt,
                    _ = term.recv() => Signal::Terminate,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the process");
                let _ = tokio::signal::ctrl_c().await;
                Signal::Interrupt
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Interrupt
    }
}
