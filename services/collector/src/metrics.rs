//! Prometheus metrics of a collector, served on `--metrics-listen` at `/metrics`.
//!
//! Names start with `sluice_collector_`; labels are bounded: sink, stream, topic,
//! partition and a fixed set of outcomes.

use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
    stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BatchLabels {
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    sink: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: String,
}

/// The metrics of one collector process.
pub struct Metrics {
    registry: Registry,
    consumed: Family<StreamLabels, Counter>,
    written: Family<SinkLabels, Counter>,
    retried: Family<StreamLabels, Counter>,
    dead_lettered: Family<StreamLabels, Counter>,
    batch: Family<BatchLabels, Histogram>,
    lag: Family<PartitionLabels, Gauge<i64, AtomicI64>>,
    sink_available: Family<BatchLabels, Gauge<i64, AtomicI64>>,
    sink_unavailable_since: Family<BatchLabels, Gauge<i64, AtomicI64>>,
    sink_errors: Family<ErrorLabels, Counter>,
    confirmations: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice_collector");
        let consumed = Family::<StreamLabels, Counter>::default();
        registry.register(
            "events_consumed",
            "Records read from Kafka",
            consumed.clone(),
        );
        let written = Family::<SinkLabels, Counter>::default();
        registry.register(
            "events_written",
            "Events the sink confirmed",
            written.clone(),
        );
        let retried = Family::<StreamLabels, Counter>::default();
        registry.register(
            "events_retried",
            "Events sent to the retry topic",
            retried.clone(),
        );
        let dead_lettered = Family::<StreamLabels, Counter>::default();
        registry.register(
            "events_dead_lettered",
            "Events sent to the dead-letter topic",
            dead_lettered.clone(),
        );
        let batch = Family::<BatchLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "batch_duration_seconds",
            "Time to write one batch to the sink",
            batch.clone(),
        );
        let lag = Family::<PartitionLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "consumer_lag",
            "Records behind the end of each assigned partition",
            lag.clone(),
        );
        let sink_available = Family::<BatchLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "sink_available",
            "1 while the sink takes writes, 0 while it is down (records are held and retried)",
            sink_available.clone(),
        );
        let sink_unavailable_since = Family::<BatchLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "sink_unavailable_since_seconds",
            "Unix time the current sink outage began; 0 while the sink is available",
            sink_unavailable_since.clone(),
        );
        let sink_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "sink_errors",
            "Failed sink writes: kind unavailable (retried until the sink is back) or rejected (events sent to the retry topic)",
            sink_errors.clone(),
        );
        let confirmations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "sink_confirmations",
            "Confirmations of ack=sink events to the ingest instance waiting: outcome sent, or dropped (Redis unreachable or the queue full; the client's wait times out)",
            confirmations.clone(),
        );
        Self {
            registry,
            consumed,
            written,
            retried,
            dead_lettered,
            batch,
            lag,
            sink_available,
            sink_unavailable_since,
            sink_errors,
            confirmations,
        }
    }

    /// Counts confirmations of `ack=sink` events: `sent` or `dropped`.
    pub fn confirmations(&self, outcome: &str, n: u64) {
        self.confirmations
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc_by(n);
    }

    /// Marks the sink available (`None`) or unavailable since a time.
    pub fn sink_available(&self, sink: &str, unavailable_since: Option<jiff::Timestamp>) {
        let labels = BatchLabels {
            sink: sink.to_owned(),
        };
        self.sink_available
            .get_or_create(&labels)
            .set(i64::from(unavailable_since.is_none()));
        self.sink_unavailable_since
            .get_or_create(&labels)
            .set(unavailable_since.map_or(0, |t| t.as_second()));
    }

    /// Counts a failed sink write: `unavailable` (the sink's fault, retried until it is
    /// back) or `rejected` (the events', sent through the retry topic).
    pub fn sink_error(&self, sink: &str, kind: &str) {
        self.sink_errors
            .get_or_create(&ErrorLabels {
                sink: sink.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts records read from Kafka.
    pub fn consumed(&self, stream: &str, n: u64) {
        self.consumed
            .get_or_create(&StreamLabels {
                stream: stream.to_owned(),
            })
            .inc_by(n);
    }

    /// Counts events a sink confirmed, and the batch's duration.
    pub fn written(&self, sink: &str, stream: &str, n: u64, elapsed: Duration) {
        self.written
            .get_or_create(&SinkLabels {
                sink: sink.to_owned(),
                stream: stream.to_owned(),
            })
            .inc_by(n);
        self.batch
            .get_or_create(&BatchLabels {
                sink: sink.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts events sent to the retry topic.
    pub fn retried(&self, stream: &str, n: u64) {
        self.retried
            .get_or_create(&StreamLabels {
                stream: stream.to_owned(),
            })
            .inc_by(n);
    }

    /// Counts events sent to the dead-letter topic.
    pub fn dead_lettered(&self, stream: &str, n: u64) {
        self.dead_lettered
            .get_or_create(&StreamLabels {
                stream: stream.to_owned(),
            })
            .inc_by(n);
    }

    /// Sets the lag of a partition.
    pub fn lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag
            .get_or_create(&PartitionLabels {
                topic: topic.to_owned(),
                partition: partition.to_string(),
            })
            .set(lag.max(0));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
