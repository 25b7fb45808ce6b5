//! The Redis sink: each event's JSON under `<prefix>:<stream>:<id>`, and per-minute and
//! hourly aggregates per stream for the dashboard and the aggregates API.
//!
//! Up to [`EVENTS_PER_CALL`] events of a batch are one Lua script call, which Redis applies
//! atomically (a larger batch is several calls, so that none holds Redis for long). A record
//! key that already holds a value of another type (`WRONGTYPE`) fails the call once the
//! others are stored and counted; the batch is then written again (which changes nothing
//! for the events already stored) and then each event alone, so that only that event is
//! refused. For each event the script sets the record only if it is new (`SET NX`, with the
//! optional TTL; without a TTL, a run of events with distinct ids is first offered to one
//! `MSETNX`, which sets them all when none exists yet) and, only then, counts it for the
//! hashes `<prefix>:agg:<stream>:<minute>` and `<prefix>:agg-hour:<stream>:<hour>` of its
//! event time (field `count`, and one field `<pointer>=<value>` per configured dimension).
//! Consecutive events that count for the same hashes and fields are one run, whose hashes
//! and fields are passed once; the counts of the batch are added with one `HINCRBY` per hash
//! and field at the end, and each hash expires after the pipeline's `aggregates` retention.
//! A replay after a crash therefore adds neither a record nor a count.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use sluice_core::{PipelineSettings, store};

use super::{Record, Sink, SinkError};

/// Most events in one script call. Writing a call again after a failure changes nothing
/// (records are set only if absent, and counted only then).
pub const EVENTS_PER_CALL: usize = 500;

const SCRIPT: &str = r"
local ttl = tonumber(ARGV[1])
local ttls = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local counts = {}
local expiry = {}
local total = 0
local refused = nil
local a = 4
local k = 1
while a <= #ARGV do
  -- A run: the minute and hour hashes, the dimension fields, then the events' values.
  local aggs = {ARGV[a], ARGV[a + 1]}
  local nfields = tonumber(ARGV[a + 2])
  local first_field = a + 3
  local nevents = tonumber(ARGV[first_field + nfields])
  a = first_field + nfields + 1
  local new = 0
  if ttl == 0 and nevents > 1 then
    -- Most runs are new events with distinct ids: one MSETNX sets them all, or none when
    -- any key exists; the events are then set one by one below, which finds out which. A
    -- run naming an id twice goes one by one too (the first of them is kept, and counted).
    local kv = {}
    local seen = {}
    local distinct = true
    for e = 0, nevents - 1 do
      local key = KEYS[k + e]
      if seen[key] then
        distinct = false
        break
      end
      seen[key] = true
      kv[2 * e + 1] = key
      kv[2 * e + 2] = ARGV[a + e]
    end
    if distinct and redis.call('MSETNX', unpack(kv)) == 1 then
      new = nevents
      k = k + nevents
      a = a + nevents
      nevents = 0
    end
  end
  for e = 1, nevents do
    local key = KEYS[k]
    local set
    if ttl > 0 then
      set = redis.call('SET', key, ARGV[a], 'NX', 'EX', ttl)
    else
      set = redis.call('SET', key, ARGV[a], 'NX')
    end
    if set then
      new = new + 1
    elseif not refused then
      local t = redis.call('TYPE', key)['ok']
      if t ~= 'string' then
        refused = 'WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a record'
      end
    end
    k = k + 1
    a = a + 1
  end
  if new > 0 then
    total = total + new
    for span = 1, 2 do
      local agg = aggs[span]
      local fields = counts[agg]
      if not fields then
        fields = {}
        counts[agg] = fields
        expiry[agg] = ttls[span]
      end
      fields['count'] = (fields['count'] or 0) + new
      for f = first_field, first_field + nfields - 1 do
        local field = ARGV[f]
        fields[field] = (fields[field] or 0) + new
      end
    end
  end
end
for agg, fields in pairs(counts) do
  for field, c in pairs(fields) do
    redis.call('HINCRBY', agg, field, c)
  end
  redis.call('EXPIRE', agg, expiry[agg])
end
if refused then
  return redis.error_reply(refused)
end
return total
";

/// Writes records and aggregates to Redis.
pub struct RedisSink {
    conn: ConnectionManager,
    prefix: String,
    ttl: Option<Duration>,
    dimensions: HashMap<String, Vec<String>>,
    /// How long minute and hour aggregates are kept, in seconds.
    aggregate_ttls: (u64, u64),
    script: redis::Script,
}

impl RedisSink {
    /// Connects to the Redis of `client`; keys get `prefix`; records expire after `ttl`.
    pub async fn connect(
        client: redis::Client,
        prefix: impl Into<String>,
        ttl: Option<Duration>,
        settings: &PipelineSettings,
    ) -> Result<Self, SinkError> {
        let conn = super::redis_connection(client).await?;
        Ok(Self {
            conn,
            prefix: prefix.into(),
            ttl,
            dimensions: settings
                .streams
                .iter()
                .map(|s| (s.name.clone(), s.dimensions.clone()))
                .collect(),
            aggregate_ttls: (
                settings.aggregates.minute_ttl().as_secs().max(60),
                settings.aggregates.hour_ttl().as_secs().max(60),
            ),
            script: redis::Script::new(SCRIPT),
        })
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn write(&self, batch: &[Record]) -> Result<(), SinkError> {
        for chunk in batch.chunks(EVENTS_PER_CALL) {
            self.call(chunk).await?;
        }
        Ok(())
    }
}

/// Consecutive events of one stream, minute and dimension values: their counts go to the
/// same hash fields, so the script is told the hashes and fields once per run.
struct Run<'a> {
    stream: &'a str,
    minute: i64,
    fields: Vec<String>,
    events: Vec<&'a Record>,
}

impl RedisSink {
    /// The dimension fields `<pointer>=<value>` that `e` counts for.
    fn fields(&self, e: &sluice_core::Envelope) -> Vec<String> {
        let Some(dimensions) = self.dimensions.get(&e.stream).filter(|d| !d.is_empty()) else {
            return Vec::new();
        };
        // Parsed only for the streams that count by payload fields.
        let payload = e.payload_value();
        dimensions
            .iter()
            .filter_map(|pointer| {
                let v = payload.pointer(pointer)?;
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                Some(format!("{pointer}={v}"))
            })
            .collect()
    }

    /// One script call for `events`: the arguments are the record TTL and the aggregate
    /// TTLs, then per run the minute and hour hashes, the number of fields, the fields,
    /// the number of events and their values; the keys are the events' record keys.
    async fn call(&self, events: &[Record]) -> Result<(), SinkError> {
        let mut runs: Vec<Run<'_>> = Vec::new();
        for r in events {
            let e = &r.envelope;
            let minute = e.event_time.as_second().div_euclid(60) * 60;
            let fields = self.fields(e);
            match runs.last_mut() {
                Some(run)
                    if run.stream == e.stream && run.minute == minute && run.fields == fields =>
                {
                    run.events.push(r);
                }
                _ => runs.push(Run {
                    stream: &e.stream,
                    minute,
                    fields,
                    events: vec![r],
                }),
            }
        }
        let mut invocation = self.script.prepare_invoke();
        invocation
            .arg(self.ttl.map_or(0, |t| t.as_secs().max(1)))
            .arg(self.aggregate_ttls.0)
            .arg(self.aggregate_ttls.1);
        for run in &runs {
            let hour = run.minute.div_euclid(3600) * 3600;
            invocation
                .arg(store::minute_aggregate_key(
                    &self.prefix,
                    run.stream,
                    run.minute,
                ))
                .arg(store::hour_aggregate_key(&self.prefix, run.stream, hour))
                .arg(run.fields.len());
            for f in &run.fields {
                invocation.arg(f.as_str());
            }
            invocation.arg(run.events.len());
            for r in &run.events {
                let e = &r.envelope;
                invocation.key(store::record_key(&self.prefix, &e.stream, &e.id));
                // The value as read from Kafka when it is the event alone, else encoded again.
                match &r.verbatim {
                    Some(value) => invocation.arg(value.as_slice()),
                    None => invocation.arg(e.encode_value()),
                };
            }
        }
        let mut conn = self.conn.clone();
        let _new: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }
}
