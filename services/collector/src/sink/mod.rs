//! Sinks: where collectors write events. One module per sink behind one small trait.
//!
//! A sink receives the records of one partition at a time, in offset order, and writes
//! them as a whole or fails as a whole. One rule holds for every sink: **the first event
//! stored under an id wins**; a later event with the same id in the same stream (a
//! client's retry, a replay after a crash, a redrive) changes nothing. Redis sets a record
//! only if absent, PostgreSQL inserts with `ON CONFLICT DO NOTHING`, and the file sink
//! skips ids it holds among the last `--file-dedupe-ids` of a partition (and offsets
//! already on disk).

pub mod file;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod redis_index;

use std::time::Duration;

use sluice_core::Envelope;

/// Longest a Redis sink waits for an answer before it counts the write as failed (and
/// tries it again). One batch is one script call; under load it can take well over the
/// client's default half second, and a timed-out call is an outage, not a rejection.
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to the Redis of `client` that reconnects by itself, for a sink.
pub async fn redis_connection(
    client: ::redis::Client,
) -> Result<::redis::aio::ConnectionManager, SinkError> {
    let config = ::redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT));
    Ok(client.get_connection_manager_with_config(config).await?)
}

/// An event with where it was read from.
#[derive(Debug, Clone)]
pub struct Record {
    /// The event.
    pub envelope: Envelope,
    /// Its partition.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
    /// Read from the stream's retry topic rather than its own: its offset is the retry
    /// topic's, not comparable with the offsets of the stream's topic.
    pub retried: bool,
    /// The Kafka value as read, when it holds the event and nothing else on one line
    /// ([`Envelope::decode_verbatim`]) and the event was stored as it came: a sink can store
    /// it in place of [`Envelope::encode_value`].
    pub verbatim: Option<Vec<u8>>,
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

impl SinkError {
    /// Whether the failure is the sink's rather than the events': the sink is down,
    /// unreachable, timing out, read-only, or out of memory or disk. Such a write is tried
    /// again, unchanged, until the sink takes it; nothing is sent to the retry or
    /// dead-letter topics for it. Only errors that name the events themselves (a value the
    /// store refuses, such as a key of another type in Redis or text PostgreSQL cannot
    /// store) are not retriable; an error of unknown cause counts as the sink's, so that an
    /// outage never dead-letters anything.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Redis(e) => !redis_rejects_event(e),
            Self::Database(e) => !database_rejects_event(e),
            // The directory is the sink: a full, read-only or failing disk is its outage.
            Self::File { .. } => true,
            Self::Unfit { .. } => false,
        }
    }
}

/// Redis errors caused by the event: its key holds a value of another type.
fn redis_rejects_event(e: &::redis::RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
}

/// PostgreSQL errors caused by the rows: data exceptions (class 22, such as text that
/// cannot be stored or a malformed value), integrity violations (23) and program limits
/// (54, such as a row too large); values that cannot be encoded.
fn database_rejects_event(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54")),
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}

/// The SQL sinks' start-up: checks `table` as a name they can write unquoted, then
/// connects with `options` (at most eight connections, five seconds to get one), at most
/// `attempts` times, `backoff` apart, so that a database still starting does not fail it.
pub(crate) async fn connect_sql<DB: sqlx::Database>(
    url: &str,
    table: &str,
    attempts: u32,
    backoff: std::time::Duration,
    options: sqlx::pool::PoolOptions<DB>,
) -> Result<sqlx::Pool<DB>, SinkError> {
    sluice_core::settings::check_table(table).map_err(|reason| SinkError::Unfit {
        id: String::new(),
        reason,
    })?;
    let options = options
        .max_connections(8)
        .acquire_timeout(std::time::Duration::from_secs(5));
    let mut attempt = 1;
    loop {
        match options.clone().connect(url).await {
            Ok(pool) => return Ok(pool),
            Err(e) if attempt < attempts => {
                tracing::warn!(error = %e, attempt, of = attempts, retry_in = ?backoff, "cannot connect to the database");
                tokio::time::sleep(backoff).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
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
    /// MySQL or MariaDB rows.
    Mysql(mysql::MysqlSink),
}

impl Sink for AnySink {
    fn name(&self) -> &'static str {
        match self {
            Self::Redis(s) => s.name(),
            Self::RedisIndex(s) => s.name(),
            Self::File(s) => s.name(),
            Self::Postgres(s) => s.name(),
            Self::Mysql(s) => s.name(),
        }
    }

    async fn write(&self, batch: &[Record]) -> Result<(), SinkError> {
        match self {
            Self::Redis(s) => s.write(batch).await,
            Self::RedisIndex(s) => s.write(batch).await,
            Self::File(s) => s.write(batch).await,
            Self::Postgres(s) => s.write(batch).await,
            Self::Mysql(s) => s.write(batch).await,
        }
    }
}
