//! Leader election: only the replica holding the Lease runs the controller.
//!
//! [`lead`] waits for the Lease, runs the controller while it holds it, and stops the
//! controller when the Lease is lost. A leader that cannot do its work does not keep the
//! Lease: when the controller ends by itself, or a reconcile has been running for longer
//! than the stall limit ([`Progress`]), the replica reports not ready, releases the Lease
//! so that another replica takes over at once, and [`lead`] returns the reason (the binary
//! then exits, and the pod is restarted). A replica that dies without releasing it is
//! replaced when the Lease expires.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The reconciles running now, and since when.
#[derive(Default)]
pub struct Progress {
    next: AtomicU64,
    running: Mutex<BTreeMap<u64, Instant>>,
}

/// One running reconcile; dropping it ends it.
pub struct Running<'a> {
    progress: &'a Progress,
    id: u64,
}

impl Progress {
    /// Marks the start of a reconcile until the returned guard is dropped.
    pub fn start(&self) -> Running<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Instant::now());
        Running { progress: self, id }
    }

    /// How long the oldest running reconcile has been running.
    pub fn oldest(&self) -> Option<Duration> {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .min()
            .map(Instant::elapsed)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.progress
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// The Lease and this replica's name in it.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Name of the Lease.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// This replica's name in the Lease.
    pub identity: String,
    /// Seconds a Lease lasts without renewal.
    pub duration_seconds: u64,
    /// A reconcile running for longer than this means the controller is stuck.
    pub stall_after: Duration,
}

/// Why a leader gave up.
#[derive(Debug, thiserror::Error)]
pub enum LeadError {
    /// The Lease could not be used.
    #[error("cannot use Lease {namespace}/{name}: {source}")]
    Lease {
        /// Lease name.
        name: String,
        /// Its namespace.
        namespace: String,
        /// Why.
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
    /// The controller ended while this replica led.
    #[error("the controller stopped while leading")]
    ControllerEnded,
    /// A reconcile did not finish in time.
    #[error("a reconcile has been running for {0:?}: the controller is stuck")]
    Stalled(Duration),
}

/// Runs `controller` (given a token that stops it) while this replica holds the Lease,
/// until `shutdown`; the Lease is released on the way out. See the module's description
/// for what makes a leader give up.
pub async fn lead<F, Fut>(
    settings: &LeaseSettings,
    client: Client,
    metrics: &Metrics,
    progress: &Progress,
    shutdown: &CancellationToken,
    mut controller: F,
) -> Result<(), LeadError>
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let identity = settings.identity.as_str();
    let duration = settings.duration_seconds;
    let lease_error = |source| LeadError::Lease {
        name: settings.name.clone(),
        namespace: settings.namespace.clone(),
        source,
    };
    let manager = LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(identity)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .build()
        .await
        .map_err(lease_error)?;
    let (mut leading, lease_task) = manager.watch().await;
    tracing::info!(%identity, lease = %settings.name, "waiting for the leader lease");
    let mut outcome = Ok(());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            r = leading.wait_for(|l| *l) => if r.is_err() { break },
        }
        tracing::info!(%identity, "leading: running the controller");
        metrics.set_leader(true);
        let stop = shutdown.child_token();
        let mut task = tokio::spawn(controller(stop.clone()));
        let mut ended = false;
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = leading.wait_for(|l| !*l) => {
                    tracing::warn!(%identity, "lost the leader lease: stopping the controller");
                    break;
                }
                _ = &mut task => {
                    ended = true;
                    // The controller ends by itself on shutdown too.
                    if !shutdown.is_cancelled() {
                        outcome = Err(LeadError::ControllerEnded);
                    }
                    break;
                }
                _ = check.tick() => {
                    if let Some(oldest) = progress.oldest().filter(|d| *d > settings.stall_after) {
                        outcome = Err(LeadError::Stalled(oldest));
                        break;
                    }
                }
            }
        }
        if let Err(e) = &outcome {
            tracing::error!(%identity, error = %e, "giving up the leader lease");
            metrics.set_not_ready();
        }
        stop.cancel();
        // A stuck controller does not hold up the hand-over: the process exits after.
        if outcome.is_err() {
            task.abort();
        } else if !ended {
            let _ = task.await;
        }
        metrics.set_leader(false);
        if shutdown.is_cancelled() || outcome.is_err() {
            break;
        }
    }
    drop(leading);
    match lease_task.await {
        Ok(Ok(_)) => tracing::info!(%identity, "released the leader lease"),
        Ok(Err(e)) => tracing::warn!(%identity, error = %e, "cannot release the leader lease"),
        Err(e) => tracing::warn!(error = %e, "lease task failed"),
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_tracks_the_oldest_running_reconcile() {
        let p = Progress::default();
        assert_eq!(p.oldest(), None);
        let first = p.start();
        let second = p.start();
        assert!(p.oldest().is_some());
        drop(first);
        assert!(p.oldest().is_some(), "the second still runs");
        drop(second);
        assert_eq!(p.oldest(), None, "nothing runs");
    }
}
