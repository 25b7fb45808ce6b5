//! The Redis index sink (chat): per recipient, the set of senders with unsent messages.
//!
//! Each message event `{fromuser, touser, msg}` adds `fromuser` to the set
//! `<prefix>:unsent:<touser>` on the primary. Adding to a set twice changes nothing, so a
//! replay is harmless. Ingest reads the sets from the replica and removes a recipient's set
//! when their messages are marked delivered.

use redis::aio::ConnectionManager;
use serde_json::Value;
use sluice_core::store;

use super::{Record, Sink, SinkError};

/// Keeps the unsent-message index in Redis.
pub struct RedisIndexSink {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisIndexSink {
    /// Connects to the Redis primary of `client`.
    pub async fn connect(
        client: redis::Client,
        prefix: impl Into<String>,
    ) -> Result<Self, SinkError> {
        let conn = super::redis_connection(client).await?;
        Ok(Self {
            conn,
            prefix: prefix.into(),
        })
    }
}

fn field(payload: &Value, r: &Record, name: &str) -> Result<String, SinkError> {
    payload
        .get(name)
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| SinkError::Unfit {
            id: r.envelope.id.clone(),
            reason: format!("a chat message needs a string field {name:?}"),
        })
}

impl Sink for RedisIndexSink {
    fn name(&self) -> &'static str {
        "redis-index"
    }

    async fn write(&self, batch: &[Record]) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for r in batch {
            let payload = r.envelope.payload_value();
            let from = field(&payload, r, "fromuser")?;
            let to = field(&payload, r, "touser")?;
            pipe.sadd(store::unsent_key(&self.prefix, &to), from)
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }
}
