//! The `external.metrics.k8s.io/v1beta1` API the HorizontalPodAutoscaler reads consumer lag
//! from, served over HTTPS behind an `APIService`.
//!
//! One metric, [`LAG_METRIC`], selected by the labels `pipeline` and `collector`:
//! `GET /apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/sluice_consumer_lag?labelSelector=pipeline=shop,collector=to-redis`
//! answers the collector group's lag summed over the partitions of its topics (see
//! [`crate::kafka::partition_lag`]). When Kafka cannot be asked, the answer is an error,
//! so the HPA keeps the replicas it has instead of scaling on a made-up zero.
//!
//! Every answer is JSON with `Content-Type: application/json`; the apiserver's clients
//! otherwise assume protobuf. Only the apiserver's front proxy gets an answer, for a user
//! RBAC lets list the metric (see [`crate::front_proxy`]).

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::json;

use crate::crd::PipelineConfig;
use crate::front_proxy::{Authorizer, FrontProxy, User};
use crate::kafka::{self, LagError, LagReader};
use crate::metrics::Metrics;
use crate::plan::names::LAG_METRIC;

/// The API group and version served.
pub const GROUP_VERSION: &str = "external.metrics.k8s.io/v1beta1";

/// What the handlers share.
#[derive(Clone)]
pub struct ExternalMetrics {
    /// Reads PipelineConfigs and Secrets.
    pub client: Client,
    /// Reads lag from Kafka.
    pub lag: LagReader,
    /// Counts requests.
    pub metrics: Arc<Metrics>,
    /// The apiserver's front proxy, once known: which headers name the user.
    pub front_proxy: Arc<RwLock<Option<FrontProxy>>>,
    /// Asks the apiserver whether a user may read a metric.
    pub authorizer: Authorizer,
}

impl ExternalMetrics {
    /// The user the front proxy sent the request for.
    fn user(&self, headers: &HeaderMap) -> Option<User> {
        self.front_proxy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|p| p.user(headers))
    }
}

/// The answer to a request that names no user.
fn no_user() -> Response {
    status(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "no user: this API answers the kube-apiserver's front proxy only".into(),
    )
}

/// The routes of the API.
pub fn router(state: ExternalMetrics) -> Router {
    Router::new()
        .route("/apis/external.metrics.k8s.io/v1beta1", get(resources))
        .route(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{metric}",
            get(value),
        )
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { status(StatusCode::NOT_FOUND, "NotFound", "no such path".into()) })
        .with_state(state)
}

async fn resources(State(state): State<ExternalMetrics>, headers: HeaderMap) -> Response {
    if state.user(&headers).is_none() {
        return no_user();
    }
    Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": GROUP_VERSION,
        "resources": [{
            "name": LAG_METRIC,
            "singularName": "",
            "namespaced": true,
            "kind": "ExternalMetricValueList",
            "verbs": ["get"],
        }],
    }))
    .into_response()
}

/// A `metav1.Status` failure, as the apiserver passes it on to the HPA.
fn status(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        Json(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        })),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct Params {
    #[serde(rename = "labelSelector", default)]
    label_selector: String,
}

/// Parses an equality-based label selector (`a=b,c==d`); other operators are refused.
pub fn parse_selector(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if term.contains("!=") {
            return Err(format!(
                "selector term {term:?}: only = and == are supported"
            ));
        }
        let (k, v) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .ok_or_else(|| format!("selector term {term:?}: only = and == are supported"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.contains(' ') || v.contains(' ') {
            return Err(format!("selector term {term:?} is not key=value"));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

async fn value(
    State(state): State<ExternalMetrics>,
    Path((namespace, metric)): Path<(String, String)>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    let Some(user) = state.user(&headers) else {
        state.metrics.lag_query("unauthorized");
        return no_user();
    };
    match state.authorizer.allowed(&user, &namespace, &metric).await {
        Ok(true) => {}
        Ok(false) => {
            state.metrics.lag_query("forbidden");
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "user {:?} may not list {metric} of external.metrics.k8s.io in namespace {namespace:?}",
                    user.name
                ),
            );
        }
        Err(e) => {
            state.metrics.lag_query("error");
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "cannot ask the apiserver whether {:?} may read the metric: {e}",
                    user.name
                ),
            );
        }
    }
    if metric != LAG_METRIC {
        state.metrics.lag_query("not_found");
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no external metric {metric:?}; this server has {LAG_METRIC}"),
        );
    }
    let selector = match parse_selector(&params.label_selector) {
        Ok(s) => s,
        Err(e) => {
            state.metrics.lag_query("error");
            return status(StatusCode::BAD_REQUEST, "BadRequest", e);
        }
    };
    let (Some(pipeline), Some(collector)) = (selector.get("pipeline"), selector.get("collector"))
    else {
        state.metrics.lag_query("error");
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("{LAG_METRIC} needs the labels pipeline and collector in labelSelector"),
        );
    };
    let api: Api<PipelineConfig> = Api::namespaced(state.client.clone(), &namespace);
    let pc = match api.get_opt(pipeline).await {
        Ok(Some(pc)) => pc,
        Ok(None) => {
            state.metrics.lag_query("not_found");
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("PipelineConfig {namespace}/{pipeline} does not exist"),
            );
        }
        Err(e) => {
            state.metrics.lag_query("error");
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("cannot read PipelineConfig {namespace}/{pipeline}: {e}"),
            );
        }
    };
    let lag = match kafka::client_args(&state.client, &namespace, &pc.spec.kafka).await {
        Ok(args) => state.lag.collector_lag(&pc, collector, args).await,
        Err(e) => Err(LagError::Secret(e)),
    };
    match lag {
        Ok(lag) => {
            state.metrics.lag_query("ok");
            Json(json!({
                "kind": "ExternalMetricValueList",
                "apiVersion": GROUP_VERSION,
                "metadata": {},
                "items": [{
                    "metricName": LAG_METRIC,
                    "metricLabels": {"pipeline": pipeline, "collector": collector},
                    "timestamp": jiff::Timestamp::now().to_string(),
                    "value": lag.total.to_string(),
                }],
            }))
            .into_response()
        }
        Err(LagError::NoCollector(c)) => {
            state.metrics.lag_query("not_found");
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("PipelineConfig {namespace}/{pipeline} has no collector {c:?}"),
            )
        }
        Err(e) => {
            state.metrics.lag_query("error");
            tracing::warn!(%namespace, %pipeline, %collector, error = %e, "cannot read consumer lag");
            status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("cannot read the lag of {namespace}/{pipeline} collector {collector}: {e}"),
            )
        }
    }
}

/// A certificate and key in PEM.
pub struct Tls {
    /// The certificate chain.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

/// A self-signed certificate for `names` (host names or IP addresses); the APIService then
/// needs `insecureSkipTLSVerify` or this certificate as its `caBundle`.
pub fn self_signed(names: Vec<String>) -> Result<Tls, rcgen::Error> {
    let key = rcgen::generate_simple_self_signed(names)?;
    Ok(Tls {
        cert_pem: key.cert.pem(),
        key_pem: key.signing_key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_equality_terms() {
        let s = parse_selector("pipeline=shop, collector==to-redis").expect("selector");
        assert_eq!(s["pipeline"], "shop");
        assert_eq!(s["collector"], "to-redis");
        assert!(parse_selector("").expect("empty").is_empty());
        assert!(parse_selector("pipeline!=shop").is_err());
        assert!(parse_selector("pipeline in (a,b)").is_err());
        assert!(parse_selector("=x").is_err());
    }
}
