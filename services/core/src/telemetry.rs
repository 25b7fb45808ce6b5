//! Logs and traces, set up once per binary.
//!
//! Log lines go to stderr through `tracing`. The level comes from `--log-level`
//! (`SLUICE_LOG`), which takes `tracing` filter directives such as
//! `info,sluice_collector=debug`; `SLUICE_LOG_FORMAT=json` switches to JSON lines.
//!
//! Every `tracing` span is also an OpenTelemetry span. When `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans are exported there over OTLP
//! (HTTP/protobuf), and the W3C `traceparent` that ingest puts in each event's Kafka
//! headers ([`inject`]) lets the collector continue the same trace ([`extract`]). The spans
//! made per request, message or event exist to be recorded: they are made only when
//! something records them ([`spans_recorded`]); otherwise ingest passes a caller's
//! `traceparent` on to its events unchanged ([`caller_trace`]), so that a collector that
//! records continues the caller's trace. `SLUICE_TRACES=off` turns spans off altogether.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes spans still buffered.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports what is still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("trace exporter shutdown: {e}");
        }
    }
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
}

/// A tracer provider for `service`: exporting over OTLP when an endpoint is configured.
pub fn tracer_provider(service: &'static str) -> SdkTracerProvider {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if otlp_configured() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => {
                eprintln!("cannot create the OTLP trace exporter ({e}); spans are not exported")
            }
        }
    }
    builder.build()
}

/// Whether finished spans go anywhere: an OTLP endpoint is configured, or the caller of
/// [`init_with`] gave its own tracer provider.
static RECORDED: AtomicBool = AtomicBool::new(false);

/// Whether spans are recorded anywhere. Work that makes spans only for the record (one per
/// event on a hot path) can be left out when they are not.
pub fn spans_recorded() -> bool {
    RECORDED.load(Ordering::Relaxed)
}

/// The span `make` makes when spans are recorded, and no span otherwise: for spans that
/// exist to be recorded, one per request, message or event.
pub fn recorded_span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if spans_recorded() {
        make()
    } else {
        tracing::Span::none()
    }
}

/// Installs logging and tracing for `service`. `filter` takes `tracing` directives, for
/// example `info`. A second call (as in tests) keeps the first subscriber.
pub fn init(service: &'static str, filter: &str) -> Telemetry {
    install(tracer_provider(service), service, filter, otlp_configured())
}

/// Like [`init`], with a tracer provider made by the caller (tests use an in-memory one).
pub fn init_with(provider: SdkTracerProvider, service: &'static str, filter: &str) -> Telemetry {
    install(provider, service, filter, true)
}

fn install(
    provider: SdkTracerProvider,
    service: &'static str,
    filter: &str,
    recorded: bool,
) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("invalid log filter {filter:?} ({e}); using \"info\"");
        EnvFilter::new("info")
    });
    let json = std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let traces_off = std::env::var("SLUICE_TRACES").is_ok_and(|v| v.eq_ignore_ascii_case("off"));
    if recorded && !traces_off {
        RECORDED.store(true, Ordering::Relaxed);
    }
    // Busy and idle times and the thread are left out of span attributes: measuring them
    // costs two clock reads and a map update each time a span is entered or left (on
    // every poll of an instrumented future), and a thread-name copy per span.
    let otel = (!traces_off).then(|| {
        tracing_opentelemetry::layer()
            .with_tracked_inactivity(false)
            .with_threads(false)
            // Nothing here reads OpenTelemetry's own current context: the trace context
            // is taken from the `tracing` span ([`inject`]).
            .with_context_activation(false)
            .with_tracer(provider.tracer(service))
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Telemetry { provider }
}

struct MapInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapExtractor<'a>(&'a BTreeMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes the current span's context into `headers` as W3C `traceparent` (and
/// `tracestate`). Nothing is written outside a span, or when spans are not recorded.
pub fn inject(headers: &mut BTreeMap<String, String>) {
    if !spans_recorded() {
        return;
    }
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MapInjector(headers));
}

/// The trace context carried in `headers`, to continue the trace in `span`.
pub fn continue_trace(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    let cx = extract(headers);
    let _ = span.set_parent(cx);
}

/// The trace context carried in `headers`.
pub fn extract(headers: &BTreeMap<String, String>) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&MapExtractor(headers))
}

/// The caller's trace context in HTTP `headers` (`traceparent`, `tracestate`), checked and
/// written out again, to pass on unchanged when this process records no span of its own
/// (one that does continues the caller's trace in its span, and [`inject`] writes that);
/// nothing when the request carries none or it is not valid.
pub fn caller_trace(headers: &http::HeaderMap) -> Vec<(String, String)> {
    if spans_recorded() || !headers.contains_key("traceparent") {
        return Vec::new();
    }
    let mut out = BTreeMap::new();
    TraceContextPropagator::new()
        .inject_context(&extract_http(headers), &mut MapInjector(&mut out));
    out.into_iter().collect()
}

/// The trace context carried in HTTP headers.
pub fn extract_http(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HttpExtractor(headers))
}

struct HttpExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn a_traceparent_survives_the_round_trip() {
        let mut headers = BTreeMap::new();
        headers.insert(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        );
        let cx = extract(&headers);
        let span = cx.span();
        let sc = span.span_context();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        let mut out = BTreeMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MapInjector(&mut out));
        assert_eq!(out.get("traceparent"), headers.get("traceparent"));
    }

    #[test]
    fn a_callers_trace_is_passed_on_as_it_came_and_only_when_valid() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = http::HeaderMap::new();
        assert!(caller_trace(&headers).is_empty(), "no traceparent, nothing");
        headers.insert("traceparent", http::HeaderValue::from_static(parent));
        headers.insert("tracestate", http::HeaderValue::from_static("vendor=abc"));
        assert_eq!(
            caller_trace(&headers),
            vec![
                ("traceparent".to_owned(), parent.to_owned()),
                ("tracestate".to_owned(), "vendor=abc".to_owned()),
            ]
        );
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static("00-not-a-trace-01"),
        );
        assert!(
            caller_trace(&headers).is_empty(),
            "an invalid one is dropped"
        );
    }

    #[test]
    fn a_traceparent_is_read_from_http_headers() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "Traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        let cx = extract_http(&headers);
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let none = extract_http(&http::HeaderMap::new());
        assert!(!none.span().span_context().is_valid());
    }

    #[test]
    fn no_context_no_header() {
        let mut headers = BTreeMap::new();
        inject(&mut headers);
        assert!(headers.is_empty());
    }
}
