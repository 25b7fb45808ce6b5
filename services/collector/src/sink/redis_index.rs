//! The Redis index sink (chat): per recipient, the set of senders with unsent messages.
//!
//! Each message event `{fromuser, touser, msg}` adds `fromuser` to the set
//! `<prefix>:unsent:<touser>` on the primary. Adding to a set twice changes nothing, so a
//! replay is harmless. Ingest reads the sets from the replica and removes a recipient's set
//! when their messages are marked delivered.

use redis::aio::ConnectionManager;
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
        let conn = client.get_connection_manager().await?;
        Ok(Self {
            conn,
            prefix: prefix.into(),
        })
    }
}

fn field<'a>(r: &'a Record, name: &str) -> Result<&'a str, SinkError> {
    r.envelope
        .payload
        .get(name)
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
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
            let from = field(r, "fromuser")?;
            let to = field(r, "touser")?;
            pipe.sadd(store::unsent_key(&self.prefix, to), from)
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }
}
