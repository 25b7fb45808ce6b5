//! Sinks: where collectors write events. One module per sink behind one small trait.
//!
//! A sink receives the records of one partition at a time, in offset order, and writes
//! them as a whole or fails as a whole. Writes are idempotent on the event id: after a
//! crash the same records are delivered again and must not be stored twice.

pub mod file;
pub mod postgres;
pub mod redis;
pub mod redis_index;

use sluice_core::Envelope;

/// An event with where it was read from.
#[derive(Debug, Clone)]
pub struct Record {
    /// The event.
    pub envelope: Envelope,
    /// The Kafka topic it was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
}

/// Why a sink write failed. Nothing of the batch counts as written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Redis refused or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A file could not be written.
    #[error("file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The database refused or could not be reached.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// An event does not fit the sink.
    #[error("event {id}: {reason}")]
    Unfit {
        /// The event id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// A destination for events.
pub trait Sink: Send + Sync {
    /// A short name for logs and metrics, such as `redis`.
    fn name(&self) -> &'static str;

    /// Writes every record of `batch` (one partition, in offset order); returns only once
    /// the store confirmed all of them.
    fn write(&self, batch: &[Record]) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// One of the sinks, chosen at start-up.
pub enum AnySink {
    /// Records and per-minute aggregates in Redis.
    Redis(redis::RedisSink),
    /// Per recipient, the senders with unsent messages.
    RedisIndex(redis_index::RedisIndexSink),
    /// JSON-lines files.
    File(file::FileSink),
    /// PostgreSQL rows.
    Postgres(postgres::PostgresSink),
}

impl Sink for AnySink {
    fn name(&self) -> &'static str {
        match self {
            Self::Redis(s) => s.name(),
            Self::RedisIndex(s) => s.name(),
            Self::File(s) => s.name(),
            Self::Postgres(s) => s.name(),
        }
    }

    async fn write(&self, batch: &[Record]) -> Result<(), SinkError> {
        match self {
            Self::Redis(s) => s.write(batch).await,
            Self::RedisIndex(s) => s.write(batch).await,
            Self::File(s) => s.write(batch).await,
            Self::Postgres(s) => s.write(batch).await,
        }
    }
}
