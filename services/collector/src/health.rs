//! Whether the sink answers. A write that fails because the sink is down, unreachable,
//! slow, read-only or out of memory or disk ([`SinkError::is_retriable`]) marks it
//! unavailable: the workers stop taking new records and try again after a capped backoff
//! shared by all of them, for as long as it takes. The outage shows in the log (when it
//! starts, every minute while it lasts, and when it ends), in the metrics
//! (`sluice_collector_sink_available`, `sluice_collector_sink_unavailable_since_seconds`)
//! and in `/readyz`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::sink::SinkError;

/// First wait after a failure; doubled on each further failure up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(100);
/// Longest wait between tries while the sink is down.
pub const MAX_WAIT: Duration = Duration::from_secs(5);
/// How often an ongoing outage is logged again.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The sink's availability, shared by every worker of a collector.
pub struct SinkHealth {
    sink: &'static str,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    outage: Option<Outage>,
}

struct Outage {
    since: Instant,
    since_unix: jiff::Timestamp,
    wait: Duration,
    logged: Instant,
    error: String,
}

/// An ongoing outage, as `/readyz` reports it.
#[derive(Debug, Clone)]
pub struct OutageReport {
    /// How long the sink has been unavailable.
    pub lasted: Duration,
    /// The last error.
    pub error: String,
}

impl SinkHealth {
    /// A sink presumed available.
    pub fn new(sink: &'static str, metrics: Arc<Metrics>) -> Self {
        metrics.sink_available(sink, None);
        Self {
            sink,
            metrics,
            state: Mutex::new(State::default()),
        }
    }

    /// Records a failure that is the sink's, not the events'; returns how long to wait
    /// before trying again.
    pub fn unavailable(&self, error: &SinkError) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match &mut state.outage {
            None => {
                let since_unix = jiff::Timestamp::now();
                tracing::error!(sink = self.sink, %error, "sink unavailable; holding records and retrying until it is back");
                self.metrics.sink_available(self.sink, Some(since_unix));
                state.outage = Some(Outage {
                    since: now,
                    since_unix,
                    wait: FIRST_WAIT,
                    logged: now,
                    error: error.to_string(),
                });
                FIRST_WAIT
            }
            Some(o) => {
                o.error = error.to_string();
                if now.duration_since(o.logged) >= LOG_EVERY {
                    o.logged = now;
                    tracing::error!(sink = self.sink, %error, unavailable_for_s = o.since.elapsed().as_secs(), "sink still unavailable; still retrying");
                }
                o.wait = (o.wait * 2).min(MAX_WAIT);
                o.wait
            }
        }
    }

    /// Records a successful write: an outage, if any, is over.
    pub fn available(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(o) = state.outage.take() {
            tracing::info!(sink = self.sink, unavailable_for_ms = u64::try_from(o.since.elapsed().as_millis()).unwrap_or(u64::MAX), since = %o.since_unix, "sink available again");
            self.metrics.sink_available(self.sink, None);
        }
    }

    /// The ongoing outage, if any.
    pub fn outage(&self) -> Option<OutageReport> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.outage.as_ref().map(|o| OutageReport {
            lasted: o.since.elapsed(),
            error: o.error.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_a_ceiling_and_reset_once_the_sink_is_back() {
        let health = SinkHealth::new("redis", Arc::new(Metrics::new()));
        let error = SinkError::Unfit {
            id: "x".to_owned(),
            reason: "down".to_owned(),
        };
        assert!(health.outage().is_none());
        let waits: Vec<u128> = (0..8)
            .map(|_| health.unavailable(&error).as_millis())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(health.outage().expect("an outage").error, error.to_string());
        health.available();
        assert!(health.outage().is_none());
        assert_eq!(health.unavailable(&error).as_millis(), 100);
    }
}
