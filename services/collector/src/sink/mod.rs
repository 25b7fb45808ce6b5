//! Sinks: where collectors write events. One module per sink behind one small trait.
//!
//! A sink writes a whole batch or fails as a whole; a write must be idempotent on the
//! event id, because after a crash the same events are delivered again.

pub mod redis;

use sluice_core::Envelope;

/// Why a sink write failed. The batch is retried; nothing of it counts as written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Redis refused or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
}

/// A destination for events.
pub trait Sink: Send + Sync {
    /// A short name for logs and metrics, such as `redis`.
    fn name(&self) -> &'static str;

    /// Writes every event of `batch`; returns only once the store confirmed all of them.
    fn write(
        &self,
        batch: &[Envelope],
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;
}
