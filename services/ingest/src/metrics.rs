//! Prometheus metrics of ingest, served on `GET /metrics`.
//!
//! Names start with `sluice_ingest_`; labels are bounded: the route template (never the
//! concrete path), the status code, the stream (only streams of the settings) and a fixed
//! set of reject reasons.

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DoorLabels {
    door: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    stream: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkAckLabels {
    stream: String,
    outcome: String,
}

/// Handles on the metrics of one label value, kept so that a request finds them with one
/// lookup and no allocation (a family's own lookup builds its label set and hashes it with
/// SipHash every time). Label values are bounded (routes, streams), and so is this.
struct Handles<M> {
    by: RwLock<HashMap<String, M, foldhash::fast::RandomState>>,
}

impl<M: Clone> Handles<M> {
    fn new() -> Self {
        Self {
            by: RwLock::new(HashMap::default()),
        }
    }

    fn get(&self, key: &str, make: impl FnOnce() -> M) -> M {
        if let Some(m) = self
            .by
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            return m.clone();
        }
        self.by
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.to_owned())
            .or_insert_with(make)
            .clone()
    }
}

/// The metrics of one route, from [`Metrics::route`]: count a request with
/// [`RouteMetrics::started`], then [`RouteMetrics::finished`].
pub struct RouteMetrics {
    route: String,
    in_flight: Gauge<i64, AtomicI64>,
    latency: Histogram,
    requests: Family<RequestLabels, Counter>,
    /// The route's request counters by method and status.
    by_status: RwLock<Vec<(String, u16, Counter)>>,
}

impl RouteMetrics {
    /// Counts a request as being served until [`RouteMetrics::finished`].
    pub fn started(&self) {
        self.in_flight.inc();
    }

    /// Counts one request served.
    pub fn finished(&self, method: &str, status: u16, elapsed: Duration) {
        self.in_flight.dec();
        self.latency.observe(elapsed.as_secs_f64());
        let found = self
            .by_status
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(m, s, _)| m == method && *s == status)
            .map(|(_, _, c)| c.clone());
        let counter = found.unwrap_or_else(|| {
            let counter = self
                .requests
                .get_or_create(&RequestLabels {
                    route: self.route.clone(),
                    method: method.to_owned(),
                    status,
                })
                .clone();
            self.by_status
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .push((method.to_owned(), status, counter.clone()));
            counter
        });
        counter.inc();
    }
}

/// The metrics of one ingest process.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    produced: Family<StreamLabels, Counter>,
    rejected: Family<RejectLabels, Counter>,
    delivery_failed: Family<StreamLabels, Counter>,
    queue_depth: Gauge<i64, AtomicI64>,
    connections: Family<DoorLabels, Gauge<i64, AtomicI64>>,
    in_flight: Family<RouteLabels, Gauge<i64, AtomicI64>>,
    kafka_reachable: Gauge<i64, AtomicI64>,
    draining: Gauge<i64, AtomicI64>,
    sink_acks: Family<SinkAckLabels, Counter>,
    sink_acks_waiting: Gauge<i64, AtomicI64>,
    unauthorized: Family<DoorLabels, Counter>,
    api_key_reloads: Family<ResultLabels, Counter>,
    routes: Handles<Arc<RouteMetrics>>,
    produced_by_stream: Handles<Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice_ingest");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        let produced = Family::<StreamLabels, Counter>::default();
        registry.register(
            "events_produced",
            "Events handed to the Kafka producer",
            produced.clone(),
        );
        let rejected = Family::<RejectLabels, Counter>::default();
        registry.register(
            "events_rejected",
            "Events refused, by reason",
            rejected.clone(),
        );
        let delivery_failed = Family::<StreamLabels, Counter>::default();
        registry.register(
            "delivery_failures",
            "Requests with events Kafka did not acknowledge",
            delivery_failed.clone(),
        );
        let queue_depth = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "producer_queue_depth",
            "Events queued in the producer and not yet acknowledged",
            queue_depth.clone(),
        );
        let connections = Family::<DoorLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "open_connections",
            "Open connections by door",
            connections.clone(),
        );
        let in_flight = Family::<RouteLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being served, by route",
            in_flight.clone(),
        );
        let kafka_reachable = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "kafka_reachable",
            "1 while Kafka answers metadata requests, 0 while it does not (events are refused with 503)",
            kafka_reachable.clone(),
        );
        let draining = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "draining",
            "1 while the process drains before stopping (readiness fails, connections are closed after each answer)",
            draining.clone(),
        );
        let sink_acks = Family::<SinkAckLabels, Counter>::default();
        registry.register(
            "sink_acks",
            "Events of ack=sink requests by how their wait ended: written, dead-lettered, or pending (not confirmed before the request's timeout)",
            sink_acks.clone(),
        );
        let sink_acks_waiting = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "sink_acks_waiting",
            "Events of ack=sink requests waiting for their collectors now",
            sink_acks_waiting.clone(),
        );
        let unauthorized = Family::<DoorLabels, Counter>::default();
        registry.register(
            "unauthorized",
            "Requests and connections refused for a missing or unknown API key, by door (http, ws, tcp-write, tcp-read)",
            unauthorized.clone(),
        );
        let api_key_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "api_key_reloads",
            "Reloads of the API key file that changed the keys (ok) or could not read it (error; the keys in force stay)",
            api_key_reloads.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            produced,
            rejected,
            delivery_failed,
            queue_depth,
            connections,
            in_flight,
            kafka_reachable,
            draining,
            sink_acks,
            sink_acks_waiting,
            unauthorized,
            api_key_reloads,
            routes: Handles::new(),
            produced_by_stream: Handles::new(),
        }
    }

    /// The metrics of requests to `route` (a route template).
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        self.routes.get(route, || {
            let labels = RouteLabels {
                route: route.to_owned(),
            };
            Arc::new(RouteMetrics {
                route: route.to_owned(),
                in_flight: self.in_flight.get_or_create(&labels).clone(),
                latency: self.latency.get_or_create(&labels).clone(),
                requests: self.requests.clone(),
                by_status: RwLock::new(Vec::new()),
            })
        })
    }

    /// Counts a caller refused at `door` for a missing or unknown API key.
    pub fn unauthorized(&self, door: &str) {
        self.unauthorized
            .get_or_create(&DoorLabels {
                door: door.to_owned(),
            })
            .inc();
    }

    /// Counts a reload of the API key file by `result` (`ok`, `error`).
    pub fn api_key_reload(&self, result: &str) {
        self.api_key_reloads
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts an `ack=sink` event by how its wait ended.
    pub fn sink_ack(&self, stream: &str, outcome: &str) {
        self.sink_acks
            .get_or_create(&SinkAckLabels {
                stream: stream.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Sets the number of events waiting for their sinks.
    pub fn sink_acks_waiting(&self, n: usize) {
        self.sink_acks_waiting.set(n as i64);
    }

    /// Counts events handed to the producer.
    pub fn produced(&self, stream: &str, n: u64) {
        self.produced_by_stream
            .get(stream, || {
                self.produced
                    .get_or_create(&StreamLabels {
                        stream: stream.to_owned(),
                    })
                    .clone()
            })
            .inc_by(n);
    }

    /// Counts a refused request.
    pub fn rejected(&self, stream: &str, reason: &str) {
        self.rejected
            .get_or_create(&RejectLabels {
                stream: stream.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a request whose events Kafka did not all acknowledge.
    pub fn delivery_failed(&self, stream: &str) {
        self.delivery_failed
            .get_or_create(&StreamLabels {
                stream: stream.to_owned(),
            })
            .inc();
    }

    /// Tracks open connections of a door (`http`, `ws`, `tcp-write`, `tcp-read`).
    pub fn connection_opened(&self, door: &str) {
        self.connections
            .get_or_create(&DoorLabels {
                door: door.to_owned(),
            })
            .inc();
    }

    /// See [`Metrics::connection_opened`].
    pub fn connection_closed(&self, door: &str) {
        self.connections
            .get_or_create(&DoorLabels {
                door: door.to_owned(),
            })
            .dec();
    }

    /// The Prometheus text exposition, with the producer queue depth and the process's
    /// state read now.
    pub fn encode(&self, queue_depth: i64, kafka_reachable: bool, draining: bool) -> String {
        self.queue_depth.set(queue_depth);
        self.kafka_reachable.set(i64::from(kafka_reachable));
        self.draining.set(i64::from(draining));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series `name{labels}` in `text`.
    fn series(text: &str, name: &str, labels: &str) -> f64 {
        let prefix = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no series {prefix}in:\n{text}"))
            .parse()
            .expect("a number")
    }

    #[test]
    fn kept_handles_count_in_the_registry_families() {
        let m = Metrics::new();
        let route = "/v1/streams/{stream}/events";
        for status in [202, 202, 400] {
            let r = m.route(route);
            r.started();
            r.finished("POST", status, Duration::from_millis(2));
        }
        m.route(route).started();
        m.route("/healthz").started();
        m.produced("visit", 2);
        m.produced("visit", 3);
        m.produced("chat", 1);
        let text = m.encode(0, true, false);
        let requests = "sluice_ingest_http_requests_total";
        let post = format!("route=\"{route}\",method=\"POST\"");
        assert_eq!(
            series(&text, requests, &format!("{post},status=\"202\"")),
            2.0
        );
        assert_eq!(
            series(&text, requests, &format!("{post},status=\"400\"")),
            1.0
        );
        let in_flight = "sluice_ingest_http_requests_in_flight";
        assert_eq!(series(&text, in_flight, &format!("route=\"{route}\"")), 1.0);
        assert_eq!(series(&text, in_flight, "route=\"/healthz\""), 1.0);
        let latency = "sluice_ingest_http_request_duration_seconds_count";
        assert_eq!(series(&text, latency, &format!("route=\"{route}\"")), 3.0);
        let produced = "sluice_ingest_events_produced_total";
        assert_eq!(series(&text, produced, "stream=\"visit\""), 5.0);
        assert_eq!(series(&text, produced, "stream=\"chat\""), 1.0);
    }
}
