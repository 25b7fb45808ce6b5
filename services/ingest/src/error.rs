//! HTTP errors as RFC 7807 problem documents.
//!
//! Every handler returns `Result<_, ApiError>`; each variant knows its status code, a
//! stable problem type and a message a user can act on.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rdkafka::error::KafkaError;
use serde::Serialize;
use sluice_core::envelope::InvalidId;
use sluice_core::settings::KeyError;

/// Everything that can go wrong in a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No stream of that name in the pipeline settings.
    #[error("there is no stream named {0:?}; the streams of this pipeline are: {1}")]
    UnknownStream(String, String),
    /// The body is not valid JSON.
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(#[source] serde_json::Error),
    /// The body is JSON but not an object.
    #[error("an event must be a JSON object, not {0}")]
    NotAnObject(&'static str),
    /// The partition key cannot be taken from the payload.
    #[error("cannot take the partition key: {0}")]
    Key(#[from] KeyError),
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
    /// The producer queue is full: the client should retry later.
    #[error("the Kafka producer queue is full; retry later")]
    Overloaded,
    /// Kafka did not acknowledge the event.
    #[error("Kafka did not acknowledge the event: {0}")]
    Kafka(#[source] KafkaError),
    /// The store could not be read.
    #[error("the record store is unavailable: {0}")]
    Store(#[source] redis::RedisError),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::UnknownStream(..) | Self::NotFound { .. } | Self::NoRoute(_) => {
                StatusCode::NOT_FOUND
            }
            Self::MalformedJson(_) | Self::NotAnObject(_) | Self::Key(_) | Self::InvalidId(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::Body { status, .. } => *status,
            Self::Overloaded | Self::Kafka(_) | Self::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The problem type: a stable, documented identifier of this kind of error.
    fn kind(&self) -> &'static str {
        match self {
            Self::UnknownStream(..) => "unknown-stream",
            Self::MalformedJson(_) => "malformed-json",
            Self::NotAnObject(_) => "not-an-object",
            Self::Key(_) => "missing-key",
            Self::InvalidId(_) => "invalid-id",
            Self::Body { .. } => "unreadable-body",
            Self::NotFound { .. } => "record-not-found",
            Self::NoRoute(_) => "no-route",
            Self::Overloaded => "overloaded",
            Self::Kafka(_) => "kafka-unavailable",
            Self::Store(_) => "store-unavailable",
        }
    }
}

/// The RFC 7807 body.
#[derive(Debug, Serialize)]
struct Problem {
    r#type: String,
    title: &'static str,
    status: u16,
    detail: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let problem = Problem {
            r#type: format!("https://sluice.dev/problems/{}", self.kind()),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: self.to_string(),
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, Self::Overloaded) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
