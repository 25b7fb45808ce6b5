//! Open-loop pacing: request `n` is due at `start + n / rate`, whether or not earlier
//! answers came back. Latency is measured from that due time, so a slow server shows as
//! latency instead of silently lowering the load (no coordinated omission).

use std::time::{Duration, Instant};

/// When each request of an open-loop run is due.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    per_second: f64,
}

impl Schedule {
    /// `per_second` requests a second from `start`; `None` unless the rate is positive.
    pub fn new(start: Instant, per_second: f64) -> Option<Self> {
        (per_second.is_finite() && per_second > 0.0).then_some(Self { start, per_second })
    }

    /// When request `n` (from 0) is due.
    pub fn due(&self, n: u64) -> Instant {
        self.start + Duration::from_secs_f64(n as f64 / self.per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_spread_evenly_at_the_rate() {
        let start = Instant::now();
        let s = Schedule::new(start, 200.0).expect("schedule");
        assert_eq!(s.due(0), start);
        assert_eq!(s.due(1) - start, Duration::from_millis(5));
        assert_eq!(s.due(200) - start, Duration::from_secs(1));
        assert_eq!(s.due(1000) - start, Duration::from_secs(5));
    }

    #[test]
    fn the_rate_must_be_positive() {
        let now = Instant::now();
        assert!(Schedule::new(now, 0.0).is_none());
        assert!(Schedule::new(now, -3.0).is_none());
        assert!(Schedule::new(now, f64::NAN).is_none());
    }
}
