//! `ack=sink`: answering a client once the collectors have written its events.
//!
//! Each ingest process is an instance with a name of its own (`--instance`, made unique
//! per start). Before an `ack=sink` request's events are published, [`SinkAcks::mark`]
//! numbers each of them and sets the [`HEADER`] to `<instance> <number>`; the collectors
//! that write the events append confirmations to this instance's Redis stream
//! ([`sluice_core::confirm`]). One task per instance reads that stream (a blocking `XREAD`
//! on a connection of its own, started with the first `ack=sink` request) and hands each
//! confirmation to the request that waits for it, then trims what it has read.
//!
//! Which collectors must confirm is the stream's `ackBy` setting: every group named there,
//! or, when it is empty, the first group that confirms. A dead-lettered event ends the
//! wait at once with the collector's reason. Waiting events are bounded in number
//! (`--sink-ack-max-waiting`); a request past that bound is refused with 503 before
//! anything is published. Nothing of this runs for the other acknowledgement levels.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use sluice_core::Envelope;
use sluice_core::confirm::{self, Confirmation, HEADER, Outcome};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What a collector said of one event, or that none has yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkResult {
    /// In the sink of every collector that must confirm.
    Written,
    /// Dead-lettered by a collector, with its reason.
    DeadLettered(String),
    /// Not confirmed before the deadline; it is still delivered.
    Pending,
}

/// Too many events wait for their sinks already.
#[derive(Debug, thiserror::Error)]
#[error(
    "{waiting} events already wait for their sinks on this instance (at most {max}); retry later"
)]
pub struct TooManyWaiting {
    /// Events waiting.
    pub waiting: usize,
    /// The bound.
    pub max: usize,
}

struct Waiter {
    /// Groups that must confirm; any one when empty.
    need: Arc<[String]>,
    /// Groups that confirmed so far.
    got: Vec<String>,
    reply: oneshot::Sender<SinkResult>,
}

/// The confirmations this instance waits for.
pub struct SinkAcks {
    instance: String,
    key: String,
    client: redis::Client,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiter>>,
    max_waiting: usize,
    reading: AtomicBool,
    metrics: Arc<Metrics>,
    closing: CancellationToken,
}

/// The events of one request, numbered and waiting.
pub struct Wait {
    acks: Arc<SinkAcks>,
    tokens: Vec<u64>,
    replies: Vec<Option<oneshot::Receiver<SinkResult>>>,
    stream: String,
}

impl SinkAcks {
    /// The confirmations of `instance`, read from the Redis of `client` under `prefix`
    /// once the first request waits, until `closing` is cancelled.
    pub fn new(
        instance: String,
        client: redis::Client,
        prefix: &str,
        max_waiting: usize,
        metrics: Arc<Metrics>,
        closing: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            key: confirm::key(prefix, &instance),
            instance,
            client,
            next: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            max_waiting,
            reading: AtomicBool::new(false),
            metrics,
            closing,
        })
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Numbers `envelopes` and marks them for confirmation by `need` (any one group when
    /// empty). Dropping the [`Wait`] forgets whatever is not confirmed.
    pub fn mark(
        self: &Arc<Self>,
        need: &[String],
        envelopes: &mut [Envelope],
    ) -> Result<Wait, TooManyWaiting> {
        let need: Arc<[String]> = need.into();
        let mut tokens = Vec::with_capacity(envelopes.len());
        let mut replies = Vec::with_capacity(envelopes.len());
        {
            let mut waiting = self.waiting();
            if waiting.len() + envelopes.len() > self.max_waiting {
                return Err(TooManyWaiting {
                    waiting: waiting.len(),
                    max: self.max_waiting,
                });
            }
            for envelope in envelopes.iter_mut() {
                let token = self.next.fetch_add(1, Ordering::Relaxed);
                let (reply, answer) = oneshot::channel();
                waiting.insert(
                    token,
                    Waiter {
                        need: need.clone(),
                        got: Vec::new(),
                        reply,
                    },
                );
                envelope.headers.insert(
                    HEADER.to_owned(),
                    confirm::header_value(&self.instance, token),
                );
                tokens.push(token);
                replies.push(Some(answer));
            }
            self.metrics.sink_acks_waiting(waiting.len());
        }
        if !self.reading.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().read());
        }
        Ok(Wait {
            acks: self.clone(),
            tokens,
            replies,
            stream: envelopes
                .first()
                .map(|e| e.stream.clone())
                .unwrap_or_default(),
        })
    }

    /// Hands a confirmation to the request waiting for it, if any still does.
    fn deliver(&self, c: Confirmation) {
        let mut waiting = self.waiting();
        let Some(waiter) = waiting.get_mut(&c.token) else {
            return;
        };
        if !waiter.need.is_empty() && !waiter.need.contains(&c.group) {
            return;
        }
        let done = match c.outcome {
            Outcome::DeadLettered(reason) => Some(SinkResult::DeadLettered(format!(
                "collector {}: {reason}",
                c.group
            ))),
            Outcome::Written => {
                if !waiter.got.contains(&c.group) {
                    waiter.got.push(c.group);
                }
                (waiter.need.is_empty() || waiter.need.iter().all(|g| waiter.got.contains(g)))
                    .then_some(SinkResult::Written)
            }
        };
        if let Some(result) = done
            && let Some(waiter) = waiting.remove(&c.token)
        {
            let _ = waiter.reply.send(result);
            self.metrics.sink_acks_waiting(waiting.len());
        }
    }

    fn forget(&self, tokens: &[u64]) {
        let mut waiting = self.waiting();
        for t in tokens {
            waiting.remove(t);
        }
        self.metrics.sink_acks_waiting(waiting.len());
    }

    /// Reads this instance's confirmations until closing, reconnecting after errors; then
    /// deletes the stream.
    async fn read(self: Arc<Self>) {
        let options = StreamReadOptions::default().block(1000).count(1000);
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        // The stream is this process's alone: everything in it is for this process.
        let mut last = "0-0".to_owned();
        let mut connection = None;
        while !self.closing.is_cancelled() {
            let conn = match &mut connection {
                Some(c) => c,
                None => match self
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                {
                    Ok(c) => connection.insert(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach Redis for sink confirmations; retrying");
                        self.pause().await;
                        continue;
                    }
                },
            };
            let (keys, ids) = ([&self.key], [&last]);
            let read: redis::RedisResult<Option<StreamReadReply>> = tokio::select! {
                () = self.closing.cancelled() => break,
                r = conn.xread_options(&keys, &ids, &options) => r,
            };
            match read {
                Ok(Some(reply)) => {
                    for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
                        let fields: Vec<(String, String)> = entry
                            .map
                            .iter()
                            .filter_map(|(k, v)| {
                                redis::from_redis_value_ref::<String>(v)
                                    .ok()
                                    .map(|v| (k.clone(), v))
                            })
                            .collect();
                        if let Some(c) = Confirmation::from_fields(
                            fields.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                        ) {
                            self.deliver(c);
                        }
                        last = entry.id;
                    }
                    // What is read is not needed again.
                    let trimmed: redis::RedisResult<i64> = redis::cmd("XTRIM")
                        .arg(&self.key)
                        .arg("MINID")
                        .arg(&last)
                        .query_async(conn)
                        .await;
                    if let Err(e) = trimmed {
                        tracing::debug!(error = %e, "cannot trim the sink confirmations");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading sink confirmations failed; reconnecting");
                    connection = None;
                    self.pause().await;
                }
            }
        }
        if let Some(conn) = &mut connection {
            let _: redis::RedisResult<i64> = conn.del(&self.key).await;
        }
    }

    async fn pause(&self) {
        tokio::select! {
            () = self.closing.cancelled() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

impl Wait {
    /// Waits until `deadline` for the events whose `published` is true (the others were
    /// not published and are not waited for: [`SinkResult::Pending`]). One result per
    /// event, in order.
    pub async fn until(mut self, deadline: Instant, published: &[bool]) -> Vec<SinkResult> {
        let mut results = Vec::with_capacity(self.replies.len());
        for (i, reply) in self.replies.iter_mut().enumerate() {
            let result = match reply.take() {
                Some(answer) if published.get(i).copied().unwrap_or(false) => {
                    match tokio::time::timeout_at(deadline, answer).await {
                        Ok(Ok(result)) => result,
                        _ => SinkResult::Pending,
                    }
                }
                _ => SinkResult::Pending,
            };
            let outcome = match &result {
                SinkResult::Written => "written",
                SinkResult::DeadLettered(_) => "dead-lettered",
                SinkResult::Pending => "pending",
            };
            self.acks.metrics.sink_ack(&self.stream, outcome);
            results.push(result);
        }
        results
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        self.acks.forget(&self.tokens);
    }
}

/// A name for this process among the pipeline's ingest instances: `base` (the pod's name
/// or the host's) with a random suffix, so that a restarted process never reads the
/// confirmations meant for the one before it.
pub fn instance_name(base: &str) -> String {
    let base: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(60)
        .collect();
    let base = if base.is_empty() { "ingest" } else { &base };
    let random = uuid::Uuid::now_v7().simple().to_string();
    format!("{base}-{}", &random[random.len() - 12..])
}

/// How long an `ack=sink` request waits for its confirmations when it says nothing.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn acks(max: usize) -> Arc<SinkAcks> {
        SinkAcks::new(
            "i-1".into(),
            // Nothing listens there: the reader keeps retrying in the background.
            redis::Client::open("redis://127.0.0.1:1").expect("client"),
            "sluice",
            max,
            Arc::new(Metrics::new()),
            CancellationToken::new(),
        )
    }

    fn confirmation(token: u64, group: &str, outcome: Outcome) -> Confirmation {
        Confirmation {
            token,
            group: group.into(),
            id: String::new(),
            outcome,
        }
    }

    #[tokio::test]
    async fn every_named_group_must_confirm_and_a_dead_letter_ends_the_wait() {
        let acks = acks(10);
        let mut events = vec![
            Envelope::new("s", None, json!({})),
            Envelope::new("s", None, json!({})),
        ];
        let need = ["redis".to_owned(), "postgres".to_owned()];
        let wait = acks.mark(&need, &mut events).expect("room");
        let token = |e: &Envelope| confirm::parse_header(&e.headers[HEADER]).expect("header").1;
        let (a, b) = (token(&events[0]), token(&events[1]));
        acks.deliver(confirmation(a, "redis", Outcome::Written));
        acks.deliver(confirmation(a, "files", Outcome::Written)); // not asked for
        acks.deliver(confirmation(
            b,
            "postgres",
            Outcome::DeadLettered("bad".into()),
        ));
        acks.deliver(confirmation(a, "postgres", Outcome::Written));
        let results = wait
            .until(Instant::now() + Duration::from_secs(5), &[true, true])
            .await;
        assert_eq!(results[0], SinkResult::Written);
        assert_eq!(
            results[1],
            SinkResult::DeadLettered("collector postgres: bad".into())
        );
        assert!(acks.waiting().is_empty());
    }

    #[tokio::test]
    async fn waits_are_bounded_timed_out_and_forgotten() {
        let acks = acks(2);
        let mut three = vec![Envelope::new("s", None, json!({})); 3];
        assert!(acks.mark(&[], &mut three).is_err(), "over the bound");
        let mut one = vec![Envelope::new("s", None, json!({}))];
        let wait = acks.mark(&[], &mut one).expect("room");
        assert_eq!(acks.waiting().len(), 1);
        let results = wait
            .until(Instant::now() + Duration::from_millis(20), &[true])
            .await;
        assert_eq!(results, [SinkResult::Pending]);
        assert!(acks.waiting().is_empty(), "a finished wait is forgotten");
        assert_ne!(instance_name("pod-a"), instance_name("pod-a"));
        assert!(confirm::valid_instance(&instance_name("x y/z")));
    }
}
