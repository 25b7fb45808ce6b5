//! The Redis sink: each event's JSON under `<prefix>:<stream>:<id>`.
//!
//! A batch is one pipelined `MULTI`/`EXEC` of `SET`s: Redis confirms it as a whole. Writing
//! the same event twice stores the same value under the same key, so a replay after a
//! crash leaves exactly one record per id.

use redis::aio::ConnectionManager;
use sluice_core::{Envelope, store};

use super::{Sink, SinkError};

/// Writes records to Redis.
#[derive(Clone)]
pub struct RedisSink {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisSink {
    /// Connects to the Redis at `url`; keys get `prefix`.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, SinkError> {
        let conn = redis::Client::open(url)?.get_connection_manager().await?;
        Ok(Self {
            conn,
            prefix: prefix.into(),
        })
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn write(&self, batch: &[Envelope]) -> Result<(), SinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for e in batch {
            pipe.set(
                store::record_key(&self.prefix, &e.stream, &e.id),
                e.encode_value(),
            )
            .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }
}
