//! Confirmations of `ack=sink` events to the ingest instance whose client waits
//! ([`sluice_core::confirm`]).
//!
//! The consumer loop hands over what it wrote or dead-lettered ([`Confirmer::written`],
//! [`Confirmer::dead_lettered`]); events without the [`HEADER`] cost a header lookup and
//! nothing else. Confirmations wait on a bounded queue and a background task appends them
//! to the instances' Redis streams, many per round trip. A confirmation that cannot be sent
//! (Redis down for longer than its retries, or the queue full) is dropped and counted: the
//! event is in the sink all the same, and the client's wait ends with its timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sluice_core::confirm::{self, Confirmation, HEADER, Outcome};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::sink::Record;

/// Confirmations waiting to be sent, at most.
const QUEUE: usize = 100_000;
/// Confirmations sent in one round trip, at most.
const BATCH: usize = 1_000;
/// Tries of one round trip before its confirmations are dropped.
const TRIES: u32 = 5;

/// Sends confirmations for one collector group.
#[derive(Clone)]
pub struct Confirmer {
    group: String,
    queue: mpsc::Sender<(String, Confirmation)>,
    metrics: Arc<Metrics>,
}

impl Confirmer {
    /// A confirmer for `group` that writes to the Redis of `client` under `prefix`;
    /// it connects on its first confirmation. Its task sends until every clone of the
    /// confirmer is dropped, then sends what is queued and ends.
    pub fn start(
        client: redis::Client,
        prefix: String,
        group: String,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), redis::RedisError> {
        let connection = ConnectionManager::new_lazy_with_config(
            client,
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(5))),
        )?;
        let (queue, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(send_loop(connection, prefix, rx, metrics.clone()));
        Ok((
            Self {
                group,
                queue,
                metrics,
            },
            task,
        ))
    }

    /// Confirms the events of `records` that wait for their sink: written.
    pub fn written(&self, records: &[Record]) {
        for r in records {
            self.confirm(r, || Outcome::Written);
        }
    }

    /// Confirms an event that waits for its sink: dead-lettered for `reason`.
    pub fn dead_lettered(&self, record: &Record, reason: &str) {
        self.confirm(record, || Outcome::DeadLettered(reason.to_owned()));
    }

    /// Confirms a record that is not an event, from its raw header: dead-lettered.
    pub fn dead_lettered_raw(&self, header: Option<&str>, reason: &str) {
        if let Some((instance, token)) = header.and_then(confirm::parse_header) {
            self.enqueue(
                instance,
                Confirmation {
                    token,
                    group: self.group.clone(),
                    id: String::new(),
                    outcome: Outcome::DeadLettered(reason.to_owned()),
                },
            );
        }
    }

    fn confirm(&self, record: &Record, outcome: impl FnOnce() -> Outcome) {
        let Some(value) = record.envelope.headers.get(HEADER) else {
            return;
        };
        let Some((instance, token)) = confirm::parse_header(value) else {
            return;
        };
        self.enqueue(
            instance,
            Confirmation {
                token,
                group: self.group.clone(),
                id: record.envelope.id.clone(),
                outcome: outcome(),
            },
        );
    }

    fn enqueue(&self, instance: &str, confirmation: Confirmation) {
        if self
            .queue
            .try_send((instance.to_owned(), confirmation))
            .is_err()
        {
            self.metrics.confirmations("dropped", 1);
        }
    }
}

async fn send_loop(
    mut connection: ConnectionManager,
    prefix: String,
    mut rx: mpsc::Receiver<(String, Confirmation)>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    // Ends once every sender is gone and the queue is empty.
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        send(&mut connection, &prefix, &mut batch, &metrics).await;
    }
}

/// Appends `batch` to the instances' streams in one pipeline, trying a few times.
async fn send(
    connection: &mut ConnectionManager,
    prefix: &str,
    batch: &mut Vec<(String, Confirmation)>,
    metrics: &Metrics,
) {
    if batch.is_empty() {
        return;
    }
    let mut by_instance: BTreeMap<&str, Vec<&Confirmation>> = BTreeMap::new();
    for (instance, c) in batch.iter() {
        by_instance.entry(instance).or_default().push(c);
    }
    let mut pipe = redis::pipe();
    for (instance, confirmations) in &by_instance {
        let key = confirm::key(prefix, instance);
        for c in confirmations {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(confirm::STREAM_MAX_LEN)
                .arg("*")
                .arg(c.fields())
                .ignore();
        }
        pipe.cmd("EXPIRE")
            .arg(&key)
            .arg(confirm::STREAM_TTL.as_secs())
            .ignore();
    }
    let n = batch.len() as u64;
    let mut wait = Duration::from_millis(100);
    for attempt in 1..=TRIES {
        match pipe.query_async::<()>(connection).await {
            Ok(()) => {
                metrics.confirmations("sent", n);
                batch.clear();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, confirmations = n, "cannot send sink confirmations to Redis");
                if attempt < TRIES {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }
    metrics.confirmations("dropped", n);
    batch.clear();
}
