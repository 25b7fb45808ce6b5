//! `sluice-ingest`: the front door. Events arrive over HTTP, are wrapped in an
//! [`Envelope`] and published to their stream's Kafka topic; records are read back from
//! Redis, where collectors write them.
//!
//! Flow of a `POST /v1/streams/{stream}/events`:
//! 1. the stream is looked up in the pipeline settings (404 if unknown);
//! 2. the body (at most `--max-body-bytes`) is parsed as one JSON object (400 otherwise);
//! 3. the partition key is taken from the stream's key pointer, and an envelope with a fresh
//!    UUIDv7 id is published with the idempotent `acks=all` producer;
//! 4. the answer, 202 with the id, partition and offset, is sent only after Kafka
//!    acknowledged the write. A full producer queue answers 503 with `Retry-After`.
//!
//! `GET /v1/streams/{stream}/records/{id}` answers the stored record from Redis, 404 when
//! there is none yet.

pub mod error;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::Serialize;
use serde_json::Value;
use sluice_core::envelope::validate_id;
use sluice_core::kafka::{KafkaArgs, TopicSpec, ensure_topics};
use sluice_core::settings::SettingsError;
use sluice_core::{Envelope, PipelineSettings, StreamSettings, store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;

/// Command line and environment of `sluice-ingest`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-ingest",
    version,
    about = "Sluice ingest: HTTP in, Kafka out"
)]
pub struct Args {
    /// Address the HTTP server listens on.
    #[arg(long, env = "SLUICE_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Pipeline settings file (streams and their topics).
    #[arg(long, env = "SLUICE_SETTINGS")]
    pub settings: PathBuf,
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Redis holding the records written by collectors.
    #[arg(
        long,
        env = "SLUICE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Prefix of the Redis keys of records.
    #[arg(long, env = "SLUICE_KEY_PREFIX", default_value = store::DEFAULT_PREFIX)]
    pub key_prefix: String,
    /// Create the streams' topics at start-up when they do not exist.
    #[arg(long, env = "SLUICE_CREATE_TOPICS")]
    pub create_topics: bool,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Log filter, for example `info` or `info,sluice_ingest=debug`.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    pub log_level: String,
}

/// Why ingest cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The settings file is unusable.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The Kafka client could not be created, or topics could not be created.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Redis is unreachable.
    #[error("redis at {url}: {source}")]
    Redis {
        /// The URL tried.
        url: String,
        /// The error.
        #[source]
        source: redis::RedisError,
    },
}

/// What the handlers share.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    settings: PipelineSettings,
    producer: FutureProducer,
    redis: ConnectionManager,
    key_prefix: String,
    max_body_bytes: usize,
}

impl App {
    /// Reads the settings, creates the Kafka producer and connects to Redis.
    pub async fn connect(args: &Args) -> Result<Self, StartError> {
        let settings = PipelineSettings::from_file(&args.settings)?;
        Self::with_settings(args, settings).await
    }

    /// Like [`App::connect`], with settings already in hand.
    pub async fn with_settings(
        args: &Args,
        settings: PipelineSettings,
    ) -> Result<Self, StartError> {
        if args.create_topics {
            let topics: Vec<TopicSpec> = settings
                .streams
                .iter()
                .map(|s| TopicSpec {
                    name: s.topic().to_owned(),
                    partitions: s.partitions,
                })
                .collect();
            ensure_topics(&args.kafka, &topics).await?;
        }
        let producer: FutureProducer = args.kafka.producer_config().create()?;
        let redis_error = |source| StartError::Redis {
            url: args.redis_url.clone(),
            source,
        };
        let client = redis::Client::open(args.redis_url.as_str()).map_err(redis_error)?;
        let redis = client.get_connection_manager().await.map_err(redis_error)?;
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                producer,
                redis,
                key_prefix: args.key_prefix.clone(),
                max_body_bytes: args.max_body_bytes,
            }),
        })
    }

    fn stream(&self, name: &str) -> Result<&StreamSettings, ApiError> {
        self.inner.settings.stream(name).ok_or_else(|| {
            let known: Vec<&str> = self
                .inner
                .settings
                .streams
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            ApiError::UnknownStream(name.to_owned(), known.join(", "))
        })
    }

    /// Waits up to `timeout` for queued events to be acknowledged.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.inner.producer.flush(timeout) {
            tracing::error!(error = %e, "events still unacknowledged at shutdown");
        }
    }
}

/// The HTTP API.
pub fn router(app: App) -> Router {
    let limit = app.inner.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/streams/{stream}/events", post(publish))
        .route("/v1/streams/{stream}/records/{id}", get(read_record))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// Serves the API on `listener` until `shutdown` is cancelled, then finishes the requests
/// in flight and waits for their events to be acknowledged.
pub async fn run(
    listener: TcpListener,
    app: App,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "ingest listening");
    axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    app.flush(Duration::from_secs(10));
    Ok(())
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_owned())
}

/// The answer to an accepted event.
#[derive(Debug, Serialize)]
pub struct Accepted {
    /// The event id.
    pub id: String,
    /// The Kafka partition it was written to.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
}

async fn publish(
    State(app): State<App>,
    Path(stream): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let stream = app.stream(&stream)?;
    let body = body.map_err(|r| ApiError::Body {
        status: r.status(),
        message: r.body_text(),
    })?;
    let payload: Value = serde_json::from_slice(&body).map_err(ApiError::MalformedJson)?;
    if !payload.is_object() {
        return Err(ApiError::NotAnObject(json_kind(&payload)));
    }
    let key = stream.key_of(&payload)?;
    let envelope = Envelope::new(&stream.name, key, payload);
    let value = envelope.encode_value();
    let mut record = FutureRecord::to(stream.topic())
        .payload(&value)
        .headers(envelope.kafka_headers());
    if let Some(key) = &envelope.key {
        record = record.key(key.as_str());
    }
    let delivery = app
        .inner
        .producer
        .send(record, Duration::ZERO)
        .await
        .map_err(|(e, _)| match e {
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => ApiError::Overloaded,
            e => ApiError::Kafka(e),
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            id: envelope.id,
            partition: delivery.partition,
            offset: delivery.offset,
        }),
    ))
}

async fn read_record(
    State(app): State<App>,
    Path((stream, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let stream = app.stream(&stream)?;
    validate_id(&id)?;
    let key = store::record_key(&app.inner.key_prefix, &stream.name, &id);
    let mut redis = app.inner.redis.clone();
    let record: Option<String> = redis.get(&key).await.map_err(ApiError::Store)?;
    match record {
        Some(json) => Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response()),
        None => Err(ApiError::NotFound {
            stream: stream.name.clone(),
            id,
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
