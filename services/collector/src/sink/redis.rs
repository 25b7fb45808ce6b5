//! The Redis sink: each event's JSON under `<prefix>:<stream>:<id>`, and per-minute
//! aggregates per stream for the dashboard.
//!
//! A batch is one Lua script call, so Redis applies it atomically; it first checks that no
//! record key holds a value of another type (`WRONGTYPE`, which refuses the batch before
//! anything is written, and then the event alone). For each event the script
//! sets the record only if it is new (`SET NX`, with the optional TTL) and, only then,
//! counts it for the hash `<prefix>:agg:<stream>:<minute>` (field `count`, and one field
//! `<pointer>=<value>` per configured dimension); the counts of the batch are added with
//! one `HINCRBY` per hash and field at the end. A replay after a crash therefore adds
//! neither a record nor a count.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use sluice_core::{PipelineSettings, store};

use super::{Record, Sink, SinkError};

/// Aggregates are kept this long.
const AGGREGATE_TTL_SECONDS: u64 = 7 * 24 * 3600;

const SCRIPT: &str = r"
for _, key in ipairs(KEYS) do
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= 'string' then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a record')
  end
end
local ttl = tonumber(ARGV[1])
local agg_ttl = tonumber(ARGV[2])
local counts = {}
local n = 0
local a = 3
for i, key in ipairs(KEYS) do
  local value = ARGV[a]
  local agg = ARGV[a + 1]
  local nfields = tonumber(ARGV[a + 2])
  local set
  if ttl > 0 then
    set = redis.call('SET', key, value, 'NX', 'EX', ttl)
  else
    set = redis.call('SET', key, value, 'NX')
  end
  if set then
    n = n + 1
    local fields = counts[agg]
    if not fields then
      fields = {}
      counts[agg] = fields
    end
    fields['count'] = (fields['count'] or 0) + 1
    for f = 1, nfields do
      local field = ARGV[a + 2 + f]
      fields[field] = (fields[field] or 0) + 1
    end
  end
  a = a + 3 + nfields
end
for agg, fields in pairs(counts) do
  for field, c in pairs(fields) do
    redis.call('HINCRBY', agg, field, c)
  end
  redis.call('EXPIRE', agg, agg_ttl)
end
return n
";

/// The key of the per-minute aggregate of `stream` for the minute starting at `minute`
/// (seconds since the epoch, a multiple of 60).
pub fn aggregate_key(prefix: &str, stream: &str, minute: i64) -> String {
    format!("{prefix}:agg:{stream}:{minute}")
}

/// Writes records and aggregates to Redis.
pub struct RedisSink {
    conn: ConnectionManager,
    prefix: String,
    ttl: Option<Duration>,
    dimensions: HashMap<String, Vec<String>>,
    script: redis::Script,
}

impl RedisSink {
    /// Connects to the Redis at `url`; keys get `prefix`; records expire after `ttl`.
    pub async fn connect(
        url: &str,
        prefix: impl Into<String>,
        ttl: Option<Duration>,
        settings: &PipelineSettings,
    ) -> Result<Self, SinkError> {
        let conn = redis::Client::open(url)?.get_connection_manager().await?;
        Ok(Self {
            conn,
            prefix: prefix.into(),
            ttl,
            dimensions: settings
                .streams
                .iter()
                .map(|s| (s.name.clone(), s.dimensions.clone()))
                .collect(),
            script: redis::Script::new(SCRIPT),
        })
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn write(&self, batch: &[Record]) -> Result<(), SinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut invocation = self.script.prepare_invoke();
        invocation
            .arg(self.ttl.map_or(0, |t| t.as_secs().max(1)))
            .arg(AGGREGATE_TTL_SECONDS);
        for r in batch {
            let e = &r.envelope;
            let minute = e.event_time.as_second().div_euclid(60) * 60;
            let fields: Vec<String> = self
                .dimensions
                .get(&e.stream)
                .into_iter()
                .flatten()
                .filter_map(|pointer| {
                    let v = e.payload.pointer(pointer)?;
                    let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    Some(format!("{pointer}={v}"))
                })
                .collect();
            invocation
                .key(store::record_key(&self.prefix, &e.stream, &e.id))
                .arg(e.encode_value())
                .arg(aggregate_key(&self.prefix, &e.stream, minute))
                .arg(fields.len());
            for f in fields {
                invocation.arg(f);
            }
        }
        let mut conn = self.conn.clone();
        let _new: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }
}
