//! HTTP errors as RFC 7807 problem documents.
//!
//! Every handler returns `Result<_, ApiError>`; each variant knows its status code, a
//! stable problem type and a message a user can act on.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sluice_core::envelope::InvalidId;

use crate::publish::PublishError;

/// Everything that can go wrong in a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The events could not be published (bad event, unknown stream, Kafka trouble).
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The body is not valid JSON.
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(#[source] serde_json::Error),
    /// A line of an NDJSON body is not valid JSON.
    #[error("line {line} of the NDJSON body is not valid JSON: {source}")]
    MalformedLine {
        /// 1-based line number.
        line: usize,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The body holds no event.
    #[error("the request holds no event")]
    Empty,
    /// The body holds more events than allowed.
    #[error("the request holds {0} events; at most {1} are allowed in one request")]
    TooManyEvents(usize, usize),
    /// A request field is missing or of the wrong type.
    #[error("{0}")]
    InvalidField(String),
    /// The id in the path is not a valid event id.
    #[error("invalid event id: {0}")]
    InvalidId(#[from] InvalidId),
    /// The body could not be read (too large, or the connection broke).
    #[error("{message}")]
    Body {
        /// The status axum chose (413 for a body over the limit).
        status: StatusCode,
        /// What went wrong.
        message: String,
    },
    /// A query parameter is invalid.
    #[error("{0}")]
    Query(String),
    /// No record with that id in the store (yet).
    #[error("no record {id:?} in stream {stream:?}")]
    NotFound {
        /// The stream asked for.
        stream: String,
        /// The id asked for.
        id: String,
    },
    /// The path matches no endpoint.
    #[error("no endpoint at {0}")]
    NoRoute(String),
    /// A request to the WebSocket door that is not a WebSocket handshake.
    #[error("this endpoint speaks WebSocket only: {0}")]
    NotWebSocket(String),
    /// No valid API key.
    #[error(
        "a valid API key is required: send it as `Authorization: Bearer <key>` or `X-Api-Key: <key>`"
    )]
    Unauthorized,
    /// Kafka is unreachable: ingest accepts nothing until it is back.
    #[error("Kafka is unreachable; retry later")]
    NotReady,
    /// This instance is shutting down (only `/readyz` says so; requests are still served).
    #[error("this ingest instance is shutting down; send to another one")]
    Draining,
    /// The store could not be read.
    #[error("the record store is unavailable: {0}")]
    Store(#[source] redis::RedisError),
    /// The stream's SQL table could not be read.
    #[error("the record database is unavailable: {0}")]
    Database(#[source] sqlx::Error),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Publish(p) => match p {
                PublishError::UnknownStream(..) => StatusCode::NOT_FOUND,
                PublishError::Overloaded { .. }
                | PublishError::TooManyWaiting(_)
                | PublishError::Kafka { .. }
                | PublishError::Unacknowledged { .. } => StatusCode::SERVICE_UNAVAILABLE,
                PublishError::SinkRejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::BAD_REQUEST,
            },
            Self::NotFound { .. } | Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::MalformedJson(_)
            | Self::MalformedLine { .. }
            | Self::Empty
            | Self::InvalidField(_)
            | Self::InvalidId(_)
            | Self::Query(_) => StatusCode::BAD_REQUEST,
            Self::TooManyEvents(..) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Body { status, .. } => *status,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotWebSocket(_) => StatusCode::UPGRADE_REQUIRED,
            Self::NotReady | Self::Draining | Self::Store(_) | Self::Database(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The problem type: a stable, documented identifier of this kind of error.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Publish(p) => match p {
                PublishError::UnknownStream(..) => "unknown-stream",
                PublishError::NotAnObject { .. } => "not-an-object",
                PublishError::InvalidId { .. } | PublishError::IdNotScalar { .. } => "invalid-id",
                PublishError::Key { .. } => "missing-key",
                PublishError::NumberOutOfRange { .. } => "number-out-of-range",
                PublishError::Schema(_) => "schema-violation",
                PublishError::Overloaded { .. } | PublishError::TooManyWaiting(_) => "overloaded",
                PublishError::SinkRejected { .. } => "dead-lettered",
                PublishError::Kafka { .. } | PublishError::Unacknowledged { .. } => {
                    "kafka-unavailable"
                }
            },
            Self::MalformedJson(_) | Self::MalformedLine { .. } => "malformed-json",
            Self::Empty => "empty-request",
            Self::TooManyEvents(..) => "too-many-events",
            Self::InvalidField(_) => "invalid-field",
            Self::InvalidId(_) => "invalid-id",
            Self::Body { .. } => "unreadable-body",
            Self::Query(_) => "invalid-query",
            Self::NotFound { .. } => "record-not-found",
            Self::NoRoute(_) => "no-route",
            Self::Unauthorized => "unauthorized",
            Self::NotWebSocket(_) => "not-a-websocket",
            Self::NotReady => "kafka-unavailable",
            Self::Draining => "draining",
            Self::Store(_) | Self::Database(_) => "store-unavailable",
        }
    }

    /// Whether the client should retry later (503 with `Retry-After`).
    fn retry_later(&self) -> bool {
        self.status() == StatusCode::SERVICE_UNAVAILABLE
    }
}

/// An RFC 7807 problem document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// URI identifying the kind of problem.
    pub r#type: String,
    /// The HTTP status text.
    pub title: &'static str,
    /// The HTTP status code.
    pub status: u16,
    /// What is wrong, in words.
    pub detail: String,
    /// When a request was not published whole: each of its events in order, with its id
    /// and whether it was published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<crate::publish::EventOutcome>>,
}

impl ApiError {
    /// The problem document of this error.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        Problem {
            r#type: format!("https://sluice.dev/problems/{}", self.kind()),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: self.to_string(),
            events: match self {
                Self::Publish(p) => p.events().map(<[_]>::to_vec),
                _ => None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let problem = self.problem();
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.retry_later() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        match self {
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::NotWebSocket(_) => {
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            }
            _ => {}
        }
        response
    }
}
