//! The HTTP API: handlers, routes, the OpenAPI document, auth and request metrics; and
//! the health and metrics endpoints, served on a port of their own.
//!
//! Every `/v1` and `/api` route is described with `utoipa` next to its handler; the
//! router and the document at `GET /openapi.json` are built from the same list, so they
//! cannot drift apart.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, extract::DefaultBodyLimit};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_core::envelope::validate_id;
use sluice_core::{Envelope, store, telemetry};
use tower::Layer;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::App;
use crate::error::{ApiError, Problem};
use crate::gate::GateLayer;
use crate::input;
use crate::publish::{Ack, Hints, Published};

/// Header naming the event id of a single event.
pub const ID_HEADER: &str = "x-sluice-id";
/// Header naming the partition key of every event of a request.
pub const KEY_HEADER: &str = "x-sluice-key";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sluice ingest API",
        description = "Publish events to Kafka over HTTP; read stored records and the counts of a stream back."
    ),
    components(schemas(Problem))
)]
struct ApiDoc;

/// `/metrics`, `/healthz` and `/readyz`: what probes and scrapers read, on a port of
/// their own (`--metrics-listen`) so that the API's port serves only the API.
/// The port has its own OpenAPI document, at `GET /openapi.json` on that port.
pub fn admin_router(app: App) -> Router {
    let (router, openapi) = admin_routes().split_for_parts();
    router
        .route("/openapi.json", get(json_document(&openapi)))
        .fallback(no_route)
        .with_state(app)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sluice ingest health and metrics",
        description = "Liveness, readiness and Prometheus metrics of one ingest process, on its `--metrics-listen` port."
    ),
    components(schemas(Problem))
)]
struct AdminDoc;

fn admin_routes() -> OpenApiRouter<App> {
    OpenApiRouter::with_openapi(AdminDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// A handler answering `document` as JSON.
fn json_document<S: Serialize>(
    document: &S,
) -> impl Fn() -> std::future::Ready<([(header::HeaderName, &'static str); 1], String)>
+ Clone
+ Send
+ 'static {
    let text = serde_json::to_string_pretty(document).unwrap_or_default();
    move || std::future::ready(([(header::CONTENT_TYPE, "application/json")], text.clone()))
}

/// The whole HTTP API.
pub fn router(app: App) -> Router {
    let (router, openapi) = api_router().split_for_parts();
    let streams = app.inner.streams.all();
    let settings: Vec<_> = streams.iter().map(|s| &s.settings).collect();
    let served = crate::openapi::Served {
        streams: &settings,
        messages_stream: &app.inner.messages_stream,
        work_max_ms: app.inner.work_max_ms,
        max_batch_events: app.inner.max_batch_events,
        api_keys: app.api_keys().required(),
    };
    let document =
        crate::openapi::complete(serde_json::to_value(&openapi).unwrap_or_default(), &served);
    // One layer for span, metrics and API key, and the body limit inside it: axum clones
    // and boxes a route's service once per layer on every request.
    let limit = DefaultBodyLimit::max(app.inner.max_body_bytes);
    let api = router
        // The workshop paths are served with and without the trailing slash.
        .route("/api/visit/v1", post(post_visit))
        .route("/api/activity/v1", post(post_activity))
        .layer((GateLayer::api(app.clone()), limit));
    let public = Router::new()
        .route("/ui", get(crate::ui::redirect))
        .route("/ui/", get(crate::ui::file))
        .route("/ui/{*path}", get(crate::ui::file))
        .route("/openapi.json", get(json_document(&document)))
        .layer((GateLayer::public(app.clone()), limit));
    let no_route = GateLayer::public(app.clone()).layer(no_route.with_state(app.clone()));
    api.merge(public).fallback_service(no_route).with_state(app)
}

/// The documented routes.
fn api_router() -> OpenApiRouter<App> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(publish_events))
        .routes(routes!(list_streams))
        .routes(routes!(read_record))
        .routes(routes!(crate::aggregates::aggregates))
        .routes(routes!(post_message))
        .routes(routes!(unsent, mark_delivered))
        .routes(routes!(work))
        .routes(routes!(post_visit))
        .routes(routes!(post_activity))
        .routes(routes!(crate::ws::upgrade))
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().into_openapi()
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    responses((status = 200, description = "Alive", body = Value, example = json!({"status": "ok"})))
)]
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness.
///
/// Ready until the process drains. A Kafka outage does not make ingest unready: every
/// instance shares the broker, and taking them all out of a Service would turn the
/// documented `503` with `Retry-After` into refused connections; `kafka` says whether the
/// broker is reachable.
#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        (status = 200, description = "Ready", body = Value, example = json!({"status": "ready", "kafka": "reachable"})),
        (status = 503, description = "Shutting down", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn readyz(State(app): State<App>) -> Result<Json<Value>, ApiError> {
    if app.draining() {
        return Err(ApiError::Draining);
    }
    let kafka = if app.kafka_ready() {
        "reachable"
    } else {
        "unreachable"
    };
    Ok(Json(json!({"status": "ready", "kafka": kafka})))
}

/// Prometheus metrics, in the OpenMetrics text format.
#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, description = "The metrics", body = String, content_type = "application/openmetrics-text"))
)]
async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let depth = i64::from(rdkafka::producer::Producer::in_flight_count(
        app.inner.publisher.producer(),
    ));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.inner
            .metrics
            .encode(depth, app.kafka_ready(), app.draining()),
    )
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_owned())
}

/// Query of the publish endpoints.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PublishQuery {
    /// `kafka` (default, also `all`): answer after Kafka acknowledged; `none`: answer once
    /// queued; `sink`: answer once the stream's collectors wrote the events to their sinks
    /// (readable right after), or after `timeout` with `"sink": "pending"`.
    #[param(schema_with = ack_levels)]
    ack: Option<String>,
    /// With `ack=sink`: the longest wait for the sinks, such as `500ms` or `5s` (default
    /// `--sink-ack-timeout`; a longer one than `--sink-ack-max-timeout` is cut to it).
    /// Checked, and without effect, at the other levels.
    #[param(pattern = "^[0-9]{1,6}(ms|s|m|h)$")]
    timeout: Option<String>,
}

/// The values of `ack`.
fn ack_levels() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(["kafka", "all", "none", "sink"]))
        .build()
}

/// The answer to published events.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PublishResponse {
    /// One event was sent.
    Single(Published),
    /// A batch was sent.
    Batch {
        /// Number of events.
        count: usize,
        /// Each event, in request order.
        events: Vec<Published>,
    },
}

pub(crate) fn ack_of(
    app: &App,
    query: Result<Query<PublishQuery>, QueryRejection>,
) -> Result<Ack, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::Query(e.body_text()))?;
    ack_level(app, query.ack.as_deref(), query.timeout.as_deref())
}

/// The acknowledgement level of `ack` and `timeout` as a request or connection gives them.
/// `timeout` bounds the wait of `ack=sink` (cut to `--sink-ack-max-timeout`) and means
/// nothing at the other levels.
pub fn ack_level(app: &App, ack: Option<&str>, timeout: Option<&str>) -> Result<Ack, ApiError> {
    let timeout = timeout
        .map(|t| {
            // 1 to 6 digits and a unit, exactly: what the document's pattern says.
            let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let exact = (1..=6).contains(&digits) && t.trim() == t;
            exact
                .then(|| sluice_core::settings::parse_duration(t))
                .flatten()
                .ok_or_else(|| {
                    ApiError::Query(format!(
                        "timeout {t:?} is not a duration such as 500ms or 5s (1 to 6 digits and ms, s, m or h)"
                    ))
                })
        })
        .transpose()?;
    match ack {
        None | Some("kafka" | "all") => Ok(Ack::All),
        Some("none") => Ok(Ack::None),
        Some("sink") => {
            let max = app.inner.sink_ack_max_timeout;
            Ok(Ack::Sink(
                timeout.unwrap_or(app.inner.sink_ack_timeout).min(max),
            ))
        }
        Some(other) => Err(ApiError::Query(format!(
            "ack must be \"kafka\", \"sink\" or \"none\", not {other:?}"
        ))),
    }
}

fn header_str(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.to_owned())).map_err(|_| {
            ApiError::InvalidField(format!("the header {name} must be visible ASCII"))
        }),
    }
}

/// The id and key headers; an id header is checked even on a batch, which ignores it.
fn hints_of(headers: &HeaderMap) -> Result<Hints, ApiError> {
    let id = header_str(headers, ID_HEADER)?;
    if let Some(id) = &id {
        validate_id(id)?;
    }
    Ok(Hints {
        id,
        key: header_str(headers, KEY_HEADER)?,
        // With no span of this request recorded, the caller's trace goes on as it came.
        headers: telemetry::caller_trace(headers),
    })
}

/// What a publish request's headers say: whether the body is NDJSON, and the hints
/// (`X-Sluice-Id`, `X-Sluice-Key`, the caller's trace), read without copying the headers.
struct PublishHeaders {
    ndjson: bool,
    hints: Result<Hints, ApiError>,
}

impl<S: Send + Sync> FromRequestParts<S> for PublishHeaders {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        Ok(Self {
            ndjson: input::is_ndjson(content_type),
            hints: hints_of(headers),
        })
    }
}

/// Parses a body and publishes its events to `stream`.
async fn publish_body(
    app: &App,
    stream: &str,
    query: Result<Query<PublishQuery>, QueryRejection>,
    headers: PublishHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<PublishResponse>), ApiError> {
    let stream = app.inner.streams.get(stream).inspect_err(|_| {
        app.inner.metrics.rejected("", "unknown-stream");
    })?;
    let ack = ack_of(app, query)?;
    let body = body.map_err(|r| ApiError::Body {
        status: r.status(),
        message: r.body_text(),
    })?;
    let payloads = input::parse(&body, headers.ndjson, app.inner.max_batch_events)?;
    let hints = headers.hints?;
    if let (Some(_), Some(pointer)) = (&hints.key, &stream.settings.key) {
        return Err(ApiError::InvalidField(format!(
            "stream {:?} takes each event's key from {pointer}; {KEY_HEADER} applies only to streams without a key pointer",
            stream.settings.name
        )));
    }
    if !app.kafka_ready() {
        return Err(ApiError::NotReady);
    }
    let mut published = app
        .inner
        .publisher
        .publish(stream, payloads.events, &hints, payloads.batch, ack)
        .await?;
    let body = if payloads.batch {
        PublishResponse::Batch {
            count: published.len(),
            events: published,
        }
    } else {
        PublishResponse::Single(published.remove(0))
    };
    Ok((StatusCode::ACCEPTED, Json(body)))
}

/// Publish events to a stream.
///
/// The body is one JSON object, a JSON array of objects, or NDJSON
/// (`Content-Type: application/x-ndjson`). Answers 202 once Kafka acknowledged every
/// event (or once queued with `ack=none`, or once the collectors wrote every event with
/// `ack=sink`). A bad event rejects the whole request and nothing is published.
///
/// The served document has one such operation per stream, at
/// `/v1/streams/<name>/events`, with that stream's event schema (`crate::openapi`); the
/// workshop paths take their parameters and answers from it.
#[utoipa::path(
    post,
    path = "/v1/streams/{stream}/events",
    params(
        ("stream" = String, Path, description = "Stream name"),
        PublishQuery,
        ("x-sluice-id" = Option<String>, Header, description = "Id of a single event (ignored for a batch)", pattern = "^[!-~]{1,128}$"),
        ("x-sluice-key" = Option<String>, Header, description = "Partition key of every event, for a stream without a key pointer"),
    ),
    request_body(content = Value, description = "An event object, an array of them, or NDJSON"),
    responses(
        (status = 202, description = "Published", body = PublishResponse),
        (status = 400, description = "Malformed or invalid event, or invalid parameters", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown stream", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body or batch too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "With `ack=sink`: published, but a collector dead-lettered events (each event's `sink` and `error` say which and why)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Kafka unreachable or producer queue full; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn publish_events(
    State(app): State<App>,
    Path(stream): Path<String>,
    query: Result<Query<PublishQuery>, QueryRejection>,
    headers: PublishHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<PublishResponse>), ApiError> {
    publish_body(&app, &stream, query, headers, body).await
}

/// Report a visit (workshop path; publishes to the stream `visit`).
#[utoipa::path(
    post,
    path = "/api/visit/v1/",
    request_body(content = Value),
    responses((status = 202, description = "Published", body = PublishResponse))
)]
async fn post_visit(
    State(app): State<App>,
    query: Result<Query<PublishQuery>, QueryRejection>,
    headers: PublishHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<PublishResponse>), ApiError> {
    publish_body(&app, "visit", query, headers, body).await
}

/// Report an activity (workshop path; publishes to the stream `activity`).
#[utoipa::path(
    post,
    path = "/api/activity/v1/",
    request_body(content = Value),
    responses((status = 202, description = "Published", body = PublishResponse))
)]
async fn post_activity(
    State(app): State<App>,
    query: Result<Query<PublishQuery>, QueryRejection>,
    headers: PublishHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<PublishResponse>), ApiError> {
    publish_body(&app, "activity", query, headers, body).await
}

/// Reads `key` from the replica, falling back to the primary on a miss or an error.
async fn read_with_fallback<T, F, Fut>(app: &App, read: F) -> Result<Option<T>, ApiError>
where
    F: Fn(ConnectionManager) -> Fut,
    Fut: Future<Output = redis::RedisResult<Option<T>>>,
{
    if let Some(replica) = &app.inner.replica {
        match read(replica.clone()).await {
            Ok(Some(v)) => return Ok(Some(v)),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "redis replica read failed; asking the primary"),
        }
    }
    read(app.inner.redis.clone()).await.map_err(ApiError::Store)
}

/// A stream as `GET /v1/streams` lists it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StreamInfo {
    /// The stream's name, as in the paths.
    pub name: String,
    /// The Kafka topic its events are published to.
    pub topic: String,
    /// The JSON pointers whose values the Redis sink counts (the aggregates' dimensions).
    pub dimensions: Vec<String>,
}

/// The streams of the pipeline.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StreamList {
    /// Every stream, by name.
    pub streams: Vec<StreamInfo>,
}

/// List the streams.
///
/// The pipeline's streams with their topics and the dimensions their aggregates count.
#[utoipa::path(
    get,
    path = "/v1/streams",
    responses((status = 200, description = "The streams", body = StreamList))
)]
async fn list_streams(State(app): State<App>) -> Json<StreamList> {
    Json(StreamList {
        streams: app
            .inner
            .streams
            .all()
            .into_iter()
            .map(|s| StreamInfo {
                name: s.settings.name.clone(),
                topic: s.settings.topic().to_owned(),
                dimensions: s.settings.dimensions.clone(),
            })
            .collect(),
    })
}

/// Read a stored record.
///
/// Reads from the Redis replica (the primary when the replica misses), or from the SQL
/// table of a stream whose settings name one (`store`), and on a hit
/// publishes a read event to the stream's read topic without delaying the answer.
#[utoipa::path(
    get,
    path = "/v1/streams/{stream}/records/{id}",
    params(
        ("stream" = String, Path, description = "Stream name"),
        ("id" = String, Path, description = "Event id", min_length = 1, max_length = 128, pattern = r"^[^\s\u0000-\u001f\u007f-\u009f]+$"),
    ),
    responses(
        (status = 200, description = "The stored record", body = Value),
        (status = 400, description = "Not a valid event id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown stream, or no such record yet", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The record store is unreachable; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn read_record(
    State(app): State<App>,
    Path((stream, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let stream = app.inner.streams.get(&stream)?;
    validate_id(&id)?;
    let name = stream.settings.name.clone();
    let key = store::record_key(&app.inner.key_prefix, &name, &id);
    let record: Option<String> = match (&stream.settings.store, app.sql()) {
        (Some(store), Some(sql)) => sql
            .record(store, &name, &id)
            .await
            .map_err(ApiError::Database)?
            .map(|r| r.to_string()),
        _ => {
            read_with_fallback(&app, |mut c| {
                let key = key.clone();
                async move { c.get(&key).await }
            })
            .await?
        }
    };
    let Some(json) = record else {
        return Err(ApiError::NotFound { stream: name, id });
    };
    if app.inner.read_events {
        let publisher = app.inner.publisher.clone();
        let topic = stream.settings.read_topic();
        tokio::spawn(async move {
            let event = Envelope::new(
                format!("{name}.reads"),
                Some(id.clone()),
                json!({"id": id, "stream": name}),
            );
            publisher.publish_envelope(&topic, event).await;
        });
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

/// A chat message.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct Message {
    /// Sender: 1 to 128 characters, without ':' or control characters.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^:\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub fromuser: String,
    /// Recipient; the partition key, so one user's messages keep their order. 1 to 128
    /// characters, without ':' or control characters.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^:\u0000-\u001f\u007f-\u009f]+$"
    )]
    pub touser: String,
    /// The text.
    pub msg: String,
}

/// Send a chat message.
///
/// Publishes `{fromuser, touser, msg}` to the messages stream with `touser` as the key.
#[utoipa::path(
    post,
    path = "/v1/messages",
    request_body = Message,
    responses(
        (status = 202, description = "Published", body = Published),
        (status = 400, description = "Not a valid message", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Kafka unreachable or producer queue full; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn post_message(
    State(app): State<App>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let stream = app.inner.streams.get(&app.inner.messages_stream)?;
    let body = body.map_err(|r| ApiError::Body {
        status: r.status(),
        message: r.body_text(),
    })?;
    let value: Box<serde_json::value::RawValue> =
        serde_json::from_slice(&body).map_err(ApiError::MalformedJson)?;
    let message: Message = serde_json::from_str(value.get()).map_err(|e| {
        ApiError::InvalidField(format!(
            "a message is {{\"fromuser\", \"touser\", \"msg\"}}, all strings: {e}"
        ))
    })?;
    for (field, v) in [("fromuser", &message.fromuser), ("touser", &message.touser)] {
        if v.is_empty()
            || v.chars().count() > 128
            || v.contains(':')
            || v.chars().any(char::is_control)
        {
            return Err(ApiError::InvalidField(format!(
                "{field} must be 1 to 128 characters without ':' or control characters"
            )));
        }
    }
    if !app.kafka_ready() {
        return Err(ApiError::NotReady);
    }
    let hints = Hints {
        key: Some(message.touser.clone()),
        ..Hints::default()
    };
    let mut published = app
        .inner
        .publisher
        .publish(stream, vec![value], &hints, false, Ack::All)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(published.remove(0))))
}

/// Users with unsent messages for a recipient.
#[derive(Debug, Serialize, ToSchema)]
pub struct Unsent {
    /// The recipient.
    pub user: String,
    /// Senders with unsent messages to them, sorted.
    pub senders: Vec<String>,
}

/// Who has unsent messages for a user.
///
/// Reads the set the messages collector keeps, from the Redis replica.
#[utoipa::path(
    get,
    path = "/v1/users/{user}/unsent",
    params(("user" = String, Path, description = "The recipient", min_length = 1)),
    responses(
        (status = 200, description = "Senders with unsent messages", body = Unsent),
        (status = 503, description = "The record store is unreachable; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn unsent(
    State(app): State<App>,
    Path(user): Path<String>,
) -> Result<Json<Unsent>, ApiError> {
    let key = store::unsent_key(&app.inner.key_prefix, &user);
    let senders: Option<Vec<String>> = read_with_fallback(&app, |mut c| {
        let key = key.clone();
        async move {
            let members: Vec<String> = c.smembers(&key).await?;
            Ok((!members.is_empty()).then_some(members))
        }
    })
    .await?;
    let mut senders = senders.unwrap_or_default();
    senders.sort();
    Ok(Json(Unsent { user, senders }))
}

/// Mark a user's messages delivered.
///
/// Removes the recipient's set of senders with unsent messages, on the Redis primary.
#[utoipa::path(
    delete,
    path = "/v1/users/{user}/unsent",
    params(("user" = String, Path, description = "The recipient", min_length = 1)),
    responses(
        (status = 204, description = "Marked delivered"),
        (status = 503, description = "The record store is unreachable; retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn mark_delivered(
    State(app): State<App>,
    Path(user): Path<String>,
) -> Result<StatusCode, ApiError> {
    let key = store::unsent_key(&app.inner.key_prefix, &user);
    let mut redis = app.inner.redis.clone();
    let _: i64 = redis.del(&key).await.map_err(ApiError::Store)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of the work endpoint.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WorkQuery {
    /// Milliseconds of simulated work, at most `--work-max-ms`.
    #[param(minimum = 0)]
    ms: u64,
}

/// Simulate compute-heavy work.
///
/// Waits `ms` milliseconds without holding a thread: each request is a task, so
/// throughput follows concurrency ÷ `ms`.
#[utoipa::path(
    post,
    path = "/v1/work",
    params(WorkQuery),
    responses(
        (status = 200, description = "Done", body = Value),
        (status = 400, description = "ms missing or over the limit", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn work(
    State(app): State<App>,
    query: Result<Query<WorkQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(WorkQuery { ms }) = query.map_err(|e| ApiError::Query(e.body_text()))?;
    if ms > app.inner.work_max_ms {
        return Err(ApiError::Query(format!(
            "ms is {ms}; at most {} is allowed",
            app.inner.work_max_ms
        )));
    }
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(Json(json!({"ms": ms})))
}
