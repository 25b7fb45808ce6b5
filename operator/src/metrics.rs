//! Prometheus metrics of the operator, served with `/healthz` and `/readyz` on
//! `--metrics-listen`.
//!
//! Names start with `sluice_operator_`; labels are bounded: a result, a failure reason
//! from [`crate::reconcile::Error::label`], and a fixed set of external-metric outcomes.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, atomic};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    failures: Family<ReasonLabels, Counter>,
    duration: Histogram,
    leader: Gauge<i64, AtomicI64>,
    lag_queries: Family<ResultLabels, Counter>,
    certificate_reloads: Family<ResultLabels, Counter>,
    ready: atomic::AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles of PipelineConfig resources, by result (ok, error)",
            reconciles.clone(),
        );
        let failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Failed reconciles by reason",
            failures.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease and runs the controller",
            leader.clone(),
        );
        let lag_queries = Family::<ResultLabels, Counter>::default();
        registry.register(
            "external_metric_requests",
            "Requests to the external metrics API, by result (ok, not_found, error; unauthorized without a user from the front proxy, forbidden when RBAC refuses the user)",
            lag_queries.clone(),
        );
        let certificate_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "certificate_reloads",
            "Reloads of the external metrics API's TLS settings (a renewed certificate, or a changed front-proxy CA from the apiserver), by result (ok, error)",
            certificate_reloads.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            lag_queries,
            certificate_reloads,
            ready: atomic::AtomicBool::new(false),
        }
    }

    /// Records one reconcile; `failure` is the reason label of its error.
    pub fn reconciled(&self, seconds: f64, failure: Option<&str>) {
        self.duration.observe(seconds);
        let result = if failure.is_some() { "error" } else { "ok" };
        self.reconciles
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
        if let Some(reason) = failure {
            self.failures
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .inc();
        }
    }

    /// Whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Records one external metrics request.
    pub fn lag_query(&self, result: &'static str) {
        self.lag_queries
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Records one attempt to serve a renewed certificate.
    pub fn certificate_reload(&self, result: &'static str) {
        self.certificate_reloads
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Marks the process ready (`/readyz` answers 200): it reached the apiserver and its
    /// servers listen.
    pub fn set_ready(&self) {
        self.ready.store(true, atomic::Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(atomic::Ordering::Relaxed)
    }

    /// Marks the process not ready (`/readyz` answers 503).
    pub fn set_not_ready(&self) {
        self.ready.store(false, atomic::Ordering::Relaxed);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// `/metrics`, `/healthz` and `/readyz`.
    pub fn router(self: Arc<Self>) -> Router {
        let metrics = self.clone();
        let ready = self;
        Router::new()
            .route(
                "/metrics",
                get(move || {
                    let m = metrics.clone();
                    async move {
                        (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            m.encode(),
                        )
                    }
                }),
            )
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || {
                    let r = ready.clone();
                    async move {
                        if r.ready.load(atomic::Ordering::Relaxed) {
                            (StatusCode::OK, "ready").into_response()
                        } else {
                            (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
                        }
                    }
                }),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_counted_by_result_and_reason() {
        let m = Metrics::new();
        m.reconciled(0.01, None);
        m.reconciled(0.02, Some("kube"));
        m.set_leader(true);
        let text = m.encode();
        assert!(text.contains(r#"sluice_operator_reconciles_total{result="ok"} 1"#));
        assert!(text.contains(r#"sluice_operator_reconciles_total{result="error"} 1"#));
        assert!(text.contains(r#"sluice_operator_reconcile_failures_total{reason="kube"} 1"#));
        assert!(text.contains("sluice_operator_reconcile_duration_seconds_count 2"));
        assert!(text.contains("sluice_operator_leader 1"));
    }
}
