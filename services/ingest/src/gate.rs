//! What every HTTP request passes through, as one layer around each route: a span that
//! continues the caller's trace (`traceparent`), the request metrics, and, on the API's
//! routes, the API key check.
//!
//! One layer rather than one per concern: axum boxes and clones a route's service once
//! per layer on every request, so each layer costs allocations on the hot path.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_core::telemetry;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::App;
use crate::error::ApiError;
use crate::metrics::RouteMetrics;

/// The [`Gate`] layer.
#[derive(Clone)]
pub struct GateLayer {
    app: App,
    key_required: bool,
}

impl GateLayer {
    /// The gate of the API's routes: they want an API key when ingest has keys.
    pub fn api(app: App) -> Self {
        Self {
            app,
            key_required: true,
        }
    }

    /// The gate of what anyone may read without a key: the dashboard, the OpenAPI
    /// document, and paths that are no route (answered `404`).
    pub fn public(app: App) -> Self {
        Self {
            app,
            key_required: false,
        }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            app: self.app.clone(),
            key_required: self.key_required,
        }
    }
}

/// Observes a request (span, metrics) and lets it through when its API key is accepted
/// or its route needs none.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    app: App,
    key_required: bool,
}

impl<S> Service<Request> for Gate<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let label = request
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str);
        let method = request.method().clone();
        let span = telemetry::recorded_span(|| {
            let span = tracing::info_span!(
                "http.request",
                otel.name = format!("{method} {label}"),
                otel.kind = "server",
                http.request.method = method.as_str(),
                http.route = label,
                http.response.status_code = tracing::field::Empty,
            );
            if !span.is_disabled() {
                let _ = span.set_parent(telemetry::extract_http(request.headers()));
            }
            span
        });
        let metrics = self.app.inner.metrics.route(label);
        metrics.started();
        let observed = Observed {
            app: self.app.clone(),
            metrics,
            method,
            start: Instant::now(),
            span: span.clone(),
        };
        if self.key_required && !self.accepted(&request) {
            let websocket = request.headers().contains_key(header::UPGRADE);
            self.app
                .inner
                .metrics
                .unauthorized(if websocket { "ws" } else { "http" });
            return GateFuture {
                passed: None,
                refused: Some(ApiError::Unauthorized.into_response()),
                observed: Some(observed),
            };
        }
        GateFuture {
            passed: Some(self.inner.call(request).instrument(span)),
            refused: None,
            observed: Some(observed),
        }
    }
}

impl<S> Gate<S> {
    /// Whether the request carries an accepted API key (`Authorization: Bearer` or
    /// `X-Api-Key`), or none is required.
    fn accepted(&self, request: &Request) -> bool {
        let keys = self.app.api_keys();
        if !keys.required() {
            return true;
        }
        let headers = request.headers();
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim)
            .unwrap_or_default()
            .as_bytes();
        keys.accepts(given)
    }
}

/// What is recorded of a request once its response is made.
struct Observed {
    app: App,
    metrics: Arc<RouteMetrics>,
    method: axum::http::Method,
    start: Instant,
    span: tracing::Span,
}

impl Observed {
    fn finish(self, mut response: Response) -> Response {
        if self.app.draining() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Clients finish this exchange and open their next connection elsewhere.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let status = response.status().as_u16();
        self.span.record("http.response.status_code", status);
        self.metrics
            .finished(self.method.as_str(), status, self.start.elapsed());
        response
    }
}

pin_project_lite::pin_project! {
    /// The response of a route behind the [`Gate`], or the gate's own refusal.
    pub struct GateFuture<F> {
        #[pin]
        passed: Option<Instrumented<F>>,
        refused: Option<Response>,
        observed: Option<Observed>,
    }
}

impl<F> Future for GateFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.passed.as_pin_mut() {
            Some(passed) => match ready!(passed.poll(cx)) {
                Ok(response) => response,
                Err(never) => match never {},
            },
            None => this.refused.take().unwrap_or_else(|| {
                // Polled again after it completed: nothing left to answer.
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }),
        };
        Poll::Ready(Ok(match this.observed.take() {
            Some(observed) => observed.finish(response),
            None => response,
        }))
    }
}
