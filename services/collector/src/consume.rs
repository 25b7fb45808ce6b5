//! The consumer loop of a collector, for its main topics and for its retry topics.
//!
//! 1. Wait for a record, then take whatever else is already fetched, up to `--batch-size`.
//! 2. Split the records by partition. Each partition's records are handled by a task of
//!    their own, in offset order: decoded into events at once, then written once the
//!    partition's previous task is done (at most `--concurrent-count` partitions written at
//!    once, on all the runtime's threads), so the partition's records are written in order.
//! 3. Receive the next batch while this one is written: the loop only waits for the tasks
//!    when more than a batch of records is in flight.
//! 4. Decoding: a record that is not an event, or an event that names another stream than
//!    the one its topic belongs to, goes to the stream's dead-letter topic at once, with
//!    the reason in the `sluice-error` header.
//! 5. As each task finishes, store the offset of the last record it got through; the
//!    consumer commits stored offsets every second and on shutdown.
//!
//! "Done" means every event of the partition is in the sink or acknowledged on the retry or
//! dead-letter topic. Two kinds of failure are told apart ([`SinkError::is_retriable`]):
//!
//! - **The sink is unavailable** (down, unreachable, timing out, read-only, out of memory
//!   or disk): the write is tried again, unchanged, after a capped backoff
//!   ([`crate::health`]), for as long as the outage lasts. Nothing goes to the retry or
//!   dead-letter topics for it. Every [`HOLD`] the worker gives the records back to Kafka
//!   (it stores the offsets of what is done and seeks the partition back to the first
//!   record that is not), so that it keeps polling and stays in its group, and reads them
//!   again. The partition's tasks already under way for later records then write nothing.
//! - **The sink rejects events** (a value it cannot store): on the main topics the batch is
//!   tried `--write-attempts` times, then each event alone, and those it rejects go to
//!   `<stream>.retry` with `sluice-attempt: 1`. On the retry topics each event waits for
//!   its backoff, is tried once, and goes back to `<stream>.retry` with its attempt count
//!   raised, or, after the last attempt, to `<stream>.dlq`.
//!
//! Rebalances: when the group takes partitions away, the consumer hands them over only
//! after every task in flight is finished and its offsets are stored ([`Handover`]), so a
//! partition never has two writers and its next owner starts after what was written. When
//! shutdown interrupts a task, only the offsets of what is done are stored; the rest is
//! delivered again to whoever takes the partitions next.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaRespErr;
use sluice_core::Envelope;
use sluice_core::kafka::KafkaArgs;
use sluice_core::settings::{RetrySettings, StreamSettings};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::confirm::Confirmer;
use crate::health::SinkHealth;
use crate::metrics::Metrics;
use crate::sink::{AnySink, Record, Sink, SinkError};

/// Header with the number of attempts an event has had.
pub const ATTEMPT_HEADER: &str = "sluice-attempt";
/// Header with why an event went to a retry or dead-letter topic.
pub const ERROR_HEADER: &str = "sluice-error";

/// Longest a worker waits for an unavailable sink before it gives the records back to
/// Kafka and polls again (well inside the consumer's `max.poll.interval.ms`).
pub const HOLD: Duration = Duration::from_secs(10);

/// Which topics a worker consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The streams' topics.
    Main,
    /// The streams' retry topics.
    Retry,
}

/// What a worker needs to know.
pub struct WorkerConfig {
    /// Main or retry.
    pub mode: Mode,
    /// Consumer group.
    pub group: String,
    /// The streams.
    pub streams: Vec<StreamSettings>,
    /// The pipeline's retry policy.
    pub retry: RetrySettings,
    /// Most records per batch.
    pub batch_size: usize,
    /// Partitions written at once.
    pub concurrency: usize,
    /// Tries of a batch on the main topics.
    pub write_attempts: u32,
    /// The streams are named after their topics (no settings file): an event is stored
    /// under its topic's stream whatever stream its producer named, rather than refused.
    pub streams_are_topics: bool,
    /// Some of its topics did not exist at start-up: the consumer looks for them every 10 s
    /// rather than at librdkafka's five-minute metadata refresh.
    pub awaits_topics: bool,
}

/// The consumer's context: turns librdkafka's statistics into the lag metric, and passes
/// revoked partitions to the consumer loop ([`Handover`]).
pub struct LagContext {
    metrics: Arc<Metrics>,
    handover: Arc<Handover>,
}

/// Partitions the group takes from this consumer. librdkafka waits for the consumer to
/// give them up (the group's rebalance waits with it); the consumer loop does so once the
/// work in flight is finished and its offsets are stored.
#[derive(Default)]
struct Handover {
    /// The partitions revoked and not yet given up.
    revoked: Mutex<Option<TopicPartitionList>>,
    /// Set once the loop has stopped: partitions revoked from then on (as the consumer
    /// closes) are given up at once.
    closing: AtomicBool,
    /// Wakes the loop when partitions are revoked.
    wake: Notify,
}

impl Handover {
    fn take(&self) -> Option<TopicPartitionList> {
        self.revoked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Gives up `partitions` (all of them with the eager protocol, librdkafka's default).
fn give_up<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    partitions: &TopicPartitionList,
) -> KafkaResult<()> {
    if matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    ) {
        consumer.incremental_unassign(partitions)
    } else {
        consumer.unassign()
    }
}

/// Whether a consumer error says a subscribed topic does not exist (yet): reported once at
/// start-up ([`crate::run`]); the consumer takes the topic up once it exists.
fn topic_missing(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)
}

impl ClientContext for LagContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if topic_missing(&error) {
            tracing::debug!(%error, reason, "subscribed topic not available");
        } else {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }

    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics.lag(topic, *partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for LagContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                tracing::info!(partitions = partitions.count(), "partitions assigned");
                if matches!(
                    consumer.rebalance_protocol(),
                    RebalanceProtocol::Cooperative
                ) {
                    consumer.incremental_assign(partitions)
                } else {
                    consumer.assign(partitions)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS
                if !self.handover.closing.load(Ordering::Acquire) =>
            {
                *self
                    .handover
                    .revoked
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(partitions.clone());
                self.handover.wake.notify_one();
                return;
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => give_up(consumer, partitions),
            other => {
                let code = rdkafka::types::RDKafkaErrorCode::from(other);
                tracing::error!(error = %code, "rebalance failed; giving up the partitions");
                give_up(consumer, partitions)
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot apply the group's assignment");
        }
    }
}

/// One consumer with its loop.
pub struct Worker {
    consumer: StreamConsumer<LagContext>,
    handover: Arc<Handover>,
    shared: Arc<Shared>,
}

impl Drop for Worker {
    /// However the loop ends (shutdown, or its task dropped with the runtime), partitions
    /// revoked and not yet given up, and any revoked from now on (as the consumer closes),
    /// are given up at once: closing the consumer waits for that.
    fn drop(&mut self) {
        self.handover.closing.store(true, Ordering::Release);
        if let Some(revoked) = self.handover.take()
            && let Err(e) = give_up(&self.consumer, &revoked)
        {
            tracing::warn!(error = %e, "cannot give up the revoked partitions");
        }
    }
}

/// What the consumer loop shares with the tasks that handle its partitions.
struct Shared {
    config: WorkerConfig,
    producer: Arc<FutureProducer>,
    sink: Arc<AnySink>,
    health: Arc<SinkHealth>,
    metrics: Arc<Metrics>,
    confirmer: Confirmer,
    /// topic → stream name
    streams: HashMap<String, String>,
    /// Per partition, the last offset of a record dead-lettered as not an event: read
    /// again after a seek back, it is not dead-lettered twice.
    dead_lettered_through: Mutex<HashMap<(String, i32), i64>>,
}

/// An event read from Kafka, with what the retry path needs.
struct Item {
    record: Record,
    /// Attempts so far (0 on the main topics).
    attempts: u32,
    /// When the record was written to Kafka, in milliseconds since the epoch.
    timestamp_ms: Option<i64>,
}

/// The records of one partition in a batch, copied out of the consumer's buffers for the
/// partition's task.
struct PartitionWork {
    topic: String,
    partition: i32,
    first_offset: i64,
    last_offset: i64,
    /// How many records there are (`messages` is emptied as they are handled).
    count: usize,
    messages: Vec<Fetched>,
}

/// What a partition's task comes back with.
enum Settled {
    /// It handled its records this far.
    Ran(PartitionWork, Progress),
    /// The partition's previous task did not get through its records (they are read again
    /// after a seek back, or shutdown came): this one wrote nothing to the sink. Records of
    /// it that are not events may already be on the dead-letter topic; read again, they are
    /// not sent twice.
    Skipped(usize),
}

/// The partitions' tasks in flight.
struct Flight {
    tasks: FuturesUnordered<JoinHandle<Settled>>,
    /// Per partition, what its next task waits for: whether the last task spawned got
    /// through all its records.
    tails: HashMap<(String, i32), oneshot::Receiver<bool>>,
    /// Per partition, the highest offset stored.
    stored: HashMap<(String, i32), i64>,
    /// Records in the tasks.
    records: usize,
    /// Partitions written at once.
    slots: Arc<Semaphore>,
}

/// A record copied out of the consumer's buffers. Its value moves on into the record
/// written when the sink can store it as read ([`Record::verbatim`]).
struct Fetched {
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
}

impl Fetched {
    fn copy(m: &BorrowedMessage<'_>) -> Self {
        Self {
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: m.headers().map(|h| h.detach()),
        }
    }
}

/// How far the worker got with the records of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Every record is done.
    Done,
    /// Records before `resume_at` are done; the rest are read again (after a seek back),
    /// or, when `stopped`, by whoever takes the partition after shutdown.
    Partial { resume_at: i64, stopped: bool },
}

/// The outcome of writing some records while waiting out sink outages.
enum Attempt {
    Written,
    /// The sink refused them for themselves.
    Rejected(SinkError),
    /// The sink stayed unavailable until the hold ran out.
    Held,
    /// Shutdown came first.
    Stopped,
}

impl Worker {
    /// Creates the consumer and subscribes it.
    pub fn new(
        kafka: &KafkaArgs,
        config: WorkerConfig,
        sink: Arc<AnySink>,
        health: Arc<SinkHealth>,
        producer: Arc<FutureProducer>,
        metrics: Arc<Metrics>,
        confirmer: Confirmer,
    ) -> Result<Self, KafkaError> {
        let streams: HashMap<String, String> = config
            .streams
            .iter()
            .map(|s| {
                let topic = match config.mode {
                    Mode::Main => s.topic().to_owned(),
                    Mode::Retry => s.retry_topic(),
                };
                (topic, s.name.clone())
            })
            .collect();
        let mut client = kafka.consumer_config(&config.group);
        client.set("statistics.interval.ms", "5000");
        if config.awaits_topics {
            client.set("topic.metadata.refresh.interval.ms", "10000");
        }
        if config.mode == Mode::Retry {
            // A retry may wait up to five minutes for its backoff.
            client.set("max.poll.interval.ms", "900000");
        }
        let handover = Arc::new(Handover::default());
        let consumer: StreamConsumer<LagContext> = client.create_with_context(LagContext {
            metrics: metrics.clone(),
            handover: handover.clone(),
        })?;
        let topics: Vec<&str> = streams.keys().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        tracing::info!(group = %config.group, ?topics, sink = sink.name(), "collector subscribed");
        Ok(Self {
            consumer,
            handover,
            shared: Arc::new(Shared {
                config,
                producer,
                sink,
                health,
                metrics,
                confirmer,
                streams,
                dead_lettered_through: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Consumes and writes until `shutdown` is cancelled; then commits and leaves the group.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut flight = Flight {
            tasks: FuturesUnordered::new(),
            tails: HashMap::new(),
            stored: HashMap::new(),
            records: 0,
            slots: Arc::new(Semaphore::new(self.shared.config.concurrency.max(1))),
        };
        // One stream for the loop: `recv` would make (and register) one per record.
        let mut messages = self.consumer.stream();
        loop {
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = self.handover.wake.notified() => {
                    self.hand_over(&mut flight).await;
                    continue;
                }
                Some(joined) = flight.tasks.next() => {
                    self.settle(&mut flight, joined);
                    continue;
                }
                m = messages.next() => m,
            };
            let first = match first {
                // The consumer's stream never ends.
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) if topic_missing(&e) => {
                    tracing::debug!(error = %e, "subscribed topic not available");
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < self.shared.config.batch_size {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    Some(Some(Err(e))) => {
                        tracing::warn!(error = %e, "kafka consumer error");
                        break;
                    }
                    Some(None) | None => break,
                }
            }
            self.dispatch(&batch, &mut flight, &shutdown);
            drop(batch);
            // One batch is written while the next is received; not more.
            while flight.records > self.shared.config.batch_size {
                match flight.tasks.next().await {
                    Some(joined) => self.settle(&mut flight, joined),
                    None => break,
                }
            }
        }
        // Shutdown: the tasks stop at the next record boundary; store what they finished.
        while let Some(joined) = flight.tasks.next().await {
            self.settle(&mut flight, joined);
        }
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "final commit failed; uncommitted records will be delivered again")
            }
        }
        tracing::info!(group = %self.shared.config.group, "consumer stopped");
    }

    /// Splits a batch by partition and starts a task for each partition's records, after
    /// the partition's previous task.
    fn dispatch(
        &self,
        batch: &[BorrowedMessage<'_>],
        flight: &mut Flight,
        shutdown: &CancellationToken,
    ) {
        let mut work: Vec<PartitionWork> = Vec::new();
        for m in batch {
            let index = match work
                .iter()
                .position(|w| w.partition == m.partition() && w.topic == m.topic())
            {
                Some(i) => i,
                None => {
                    work.push(PartitionWork {
                        topic: m.topic().to_owned(),
                        partition: m.partition(),
                        first_offset: m.offset(),
                        last_offset: m.offset(),
                        count: 0,
                        messages: Vec::new(),
                    });
                    work.len() - 1
                }
            };
            let w = &mut work[index];
            w.last_offset = m.offset();
            w.count += 1;
            w.messages.push(Fetched::copy(m));
        }
        for w in work {
            let (done, next) = oneshot::channel();
            let previous = flight.tails.insert((w.topic.clone(), w.partition), next);
            flight.records += w.count;
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            let slots = flight.slots.clone();
            flight.tasks.push(tokio::spawn(async move {
                // Decoding needs no order: it goes ahead while the previous task writes.
                let (w, decoded) = shared.decode(w, &shutdown).await;
                if let Some(previous) = previous
                    && !previous.await.unwrap_or(false)
                {
                    let _ = done.send(false);
                    return Settled::Skipped(w.count);
                }
                // The semaphore is never closed: a permit always comes.
                let _slot = slots.acquire().await.ok();
                let progress = match decoded {
                    Ok(items) => shared.write_items(items, &shutdown).await,
                    Err(stopped) => stopped,
                };
                let _ = done.send(progress == Progress::Done);
                Settled::Ran(w, progress)
            }));
        }
    }

    /// Stores the offsets of what a finished task got through, or seeks its partition back
    /// to the first record it did not.
    fn settle(&self, flight: &mut Flight, joined: Result<Settled, JoinError>) {
        let (w, progress) = match joined {
            Ok(Settled::Ran(w, progress)) => (w, progress),
            Ok(Settled::Skipped(count)) => {
                flight.records -= count;
                return;
            }
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Only a runtime shutting down cancels a task: nothing is stored.
                Err(_) => return,
            },
        };
        flight.records -= w.count;
        let (topic, partition) = (w.topic.as_str(), w.partition);
        let done_through = match progress {
            Progress::Done => Some(w.last_offset),
            Progress::Partial { resume_at, stopped } => {
                if !stopped {
                    // Read again from the first record not done. Without a timeout the
                    // seek is asynchronous; records fetched before it are dropped, and the
                    // partition's tasks already started for them write nothing.
                    flight.tails.remove(&(w.topic.clone(), partition));
                    if let Err(e) = self.consumer.seek(
                        topic,
                        partition,
                        rdkafka::Offset::Offset(resume_at),
                        Duration::ZERO,
                    ) {
                        tracing::warn!(error = %e, %topic, partition, resume_at, "cannot seek back; the records are read again after the next rebalance");
                    }
                }
                (resume_at > w.first_offset).then_some(resume_at - 1)
            }
        };
        if let Some(offset) = done_through {
            let stored = flight
                .stored
                .entry((w.topic.clone(), partition))
                .or_insert(-1);
            if offset > *stored {
                *stored = offset;
                if let Err(e) = self.consumer.store_offset(topic, partition, offset) {
                    // The partition was taken away meanwhile; its new owner replays the records.
                    tracing::debug!(error = %e, %topic, partition, "offset not stored");
                }
            }
        }
    }

    /// Gives up the partitions the group took away, once every task in flight is finished
    /// and its offsets are stored (giving them up commits the stored offsets).
    async fn hand_over(&self, flight: &mut Flight) {
        let Some(revoked) = self.handover.take() else {
            return;
        };
        while let Some(joined) = flight.tasks.next().await {
            self.settle(flight, joined);
        }
        flight.tails.clear();
        flight.stored.clear();
        match give_up(&self.consumer, &revoked) {
            Ok(()) => tracing::info!(
                partitions = revoked.count(),
                "partitions handed over after the work in flight"
            ),
            Err(e) => tracing::error!(error = %e, "cannot give up the revoked partitions"),
        }
    }
}

impl Shared {
    fn stream_of<'a>(&'a self, topic: &'a str) -> &'a str {
        self.streams.get(topic).map_or(topic, String::as_str)
    }

    /// Decodes the records of one partition, in order. The records that are not events go
    /// to the dead-letter topic as they come. Without events when shutdown came first, with
    /// how far it got.
    async fn decode(
        &self,
        mut w: PartitionWork,
        shutdown: &CancellationToken,
    ) -> (PartitionWork, Result<Vec<Item>, Progress>) {
        let messages = std::mem::take(&mut w.messages);
        let stream = self.stream_of(&w.topic);
        self.metrics.consumed(stream, messages.len() as u64);
        let mut items = Vec::with_capacity(messages.len());
        for mut m in messages {
            // The topic says which stream a record belongs to, not the record: one that
            // names another stream would land in that stream's keys, rows or files.
            let decoded = Envelope::decode_verbatim(m.value.as_deref(), m.headers.as_ref())
                .map_err(|e| e.to_string())
                .and_then(|(mut envelope, verbatim)| {
                    if envelope.stream == stream {
                        Ok((envelope, verbatim))
                    } else if self.config.streams_are_topics {
                        // Stored under another stream than its value names.
                        stream.clone_into(&mut envelope.stream);
                        Ok((envelope, false))
                    } else {
                        Err(format!(
                            "the event names stream {:?} but was read from {:?}, a topic of stream {stream:?}",
                            envelope.stream, w.topic
                        ))
                    }
                });
            match decoded {
                Ok((envelope, verbatim)) => {
                    let attempts = envelope
                        .headers
                        .get(ATTEMPT_HEADER)
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(0);
                    items.push(Item {
                        record: Record {
                            envelope,
                            partition: w.partition,
                            offset: m.offset,
                            retried: self.config.mode == Mode::Retry,
                            verbatim: m.value.take().filter(|_| verbatim),
                        },
                        attempts,
                        timestamp_ms: m.timestamp_ms,
                    });
                }
                Err(reason) => {
                    let key = (w.topic.clone(), w.partition);
                    let already = self
                        .dead_lettered_through
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(&key)
                        .is_some_and(|through| *through >= m.offset);
                    if already {
                        continue;
                    }
                    if !self
                        .dead_letter_raw(&w.topic, w.partition, &m, stream, &reason, shutdown)
                        .await
                    {
                        // Nothing of the partition is written yet.
                        let resume_at = w.first_offset;
                        return (
                            w,
                            Err(Progress::Partial {
                                resume_at,
                                stopped: true,
                            }),
                        );
                    }
                    self.dead_lettered_through
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(key, m.offset);
                }
            }
        }
        (w, Ok(items))
    }

    /// Writes the events of one partition, in order.
    async fn write_items(&self, items: Vec<Item>, shutdown: &CancellationToken) -> Progress {
        match self.config.mode {
            Mode::Main => self.write_main(items, shutdown).await,
            Mode::Retry => self.write_retry(items, shutdown).await,
        }
    }

    /// Writes the events of one partition, with a span per event continuing its trace when
    /// spans are recorded (an OTLP endpoint is configured).
    async fn write(&self, records: &[Record]) -> Result<(), crate::sink::SinkError> {
        let traced = sluice_core::telemetry::spans_recorded();
        let spans: Vec<tracing::Span> = records
            .iter()
            .filter(|_| traced)
            .map(|r| {
                let e = &r.envelope;
                let span = tracing::info_span!("sink.write", otel.kind = "consumer", sink = self.sink.name(), stream = %e.stream, event.id = %e.id);
                sluice_core::telemetry::continue_trace(&span, &e.headers);
                span
            })
            .collect();
        let started = Instant::now();
        let result = self.sink.write(records).await;
        if result.is_ok()
            && let Some(first) = records.first()
        {
            self.metrics.written(
                self.sink.name(),
                &first.envelope.stream,
                records.len() as u64,
                started.elapsed(),
            );
        }
        if result.is_ok() {
            self.confirmer.written(records);
        }
        drop(spans);
        result
    }

    /// Writes `records`, waiting out an unavailable sink until `hold_until`.
    async fn write_through_outage(
        &self,
        records: &[Record],
        hold_until: Instant,
        shutdown: &CancellationToken,
    ) -> Attempt {
        loop {
            match self.write(records).await {
                Ok(()) => {
                    self.health.available();
                    return Attempt::Written;
                }
                Err(e) if e.is_retriable() => {
                    self.metrics.sink_error(self.sink.name(), "unavailable");
                    let wait = self.health.unavailable(&e);
                    let holding = Instant::now() + wait < hold_until;
                    if !sleep_or_shutdown(wait, shutdown).await {
                        return Attempt::Stopped;
                    }
                    if !holding {
                        return Attempt::Held;
                    }
                }
                Err(e) => {
                    // The sink answered: it is up, and refuses these events.
                    self.health.available();
                    self.metrics.sink_error(self.sink.name(), "rejected");
                    return Attempt::Rejected(e);
                }
            }
        }
    }

    /// Main topics: the whole partition batch (a few times if the sink rejects it), then
    /// each event alone, and the retry topic for the events the sink rejects.
    async fn write_main(&self, items: Vec<Item>, shutdown: &CancellationToken) -> Progress {
        let records: Vec<Record> = items.into_iter().map(|i| i.record).collect();
        let Some(first) = records.first().map(|r| r.offset) else {
            return Progress::Done;
        };
        let hold_until = Instant::now() + HOLD;
        let held = |resume_at| Progress::Partial {
            resume_at,
            stopped: false,
        };
        let stopped = |resume_at| Progress::Partial {
            resume_at,
            stopped: true,
        };
        let mut backoff = Backoff::new();
        for attempt in 1..=self.config.write_attempts {
            match self
                .write_through_outage(&records, hold_until, shutdown)
                .await
            {
                Attempt::Written => return Progress::Done,
                Attempt::Held => return held(first),
                Attempt::Stopped => return stopped(first),
                Attempt::Rejected(e) => {
                    tracing::warn!(sink = self.sink.name(), error = %e, attempt, events = records.len(), "sink rejected the batch");
                    if attempt < self.config.write_attempts
                        && !sleep_or_shutdown(backoff.next(), shutdown).await
                    {
                        return stopped(first);
                    }
                }
            }
        }
        for record in &records {
            match self
                .write_through_outage(std::slice::from_ref(record), hold_until, shutdown)
                .await
            {
                Attempt::Written => {}
                Attempt::Held => return held(record.offset),
                Attempt::Stopped => return stopped(record.offset),
                Attempt::Rejected(e) => {
                    if !self.send_on(record, 1, &e.to_string(), shutdown).await {
                        return stopped(record.offset);
                    }
                }
            }
        }
        Progress::Done
    }

    /// Retry topics: each event after its backoff, once (as often as it takes while the
    /// sink is unavailable).
    async fn write_retry(&self, items: Vec<Item>, shutdown: &CancellationToken) -> Progress {
        for item in items {
            let offset = item.record.offset;
            let attempts = item.attempts.max(1);
            let due_ms = item.timestamp_ms.unwrap_or(0)
                + self.config.retry.delay(attempts).as_millis() as i64;
            let now_ms = jiff::Timestamp::now().as_millisecond();
            if due_ms > now_ms
                && !sleep_or_shutdown(Duration::from_millis((due_ms - now_ms) as u64), shutdown)
                    .await
            {
                return Progress::Partial {
                    resume_at: offset,
                    stopped: true,
                };
            }
            let hold_until = Instant::now() + HOLD;
            match self
                .write_through_outage(std::slice::from_ref(&item.record), hold_until, shutdown)
                .await
            {
                Attempt::Written => {}
                Attempt::Held => {
                    return Progress::Partial {
                        resume_at: offset,
                        stopped: false,
                    };
                }
                Attempt::Stopped => {
                    return Progress::Partial {
                        resume_at: offset,
                        stopped: true,
                    };
                }
                Attempt::Rejected(e) => {
                    if !self
                        .send_on(&item.record, attempts + 1, &e.to_string(), shutdown)
                        .await
                    {
                        return Progress::Partial {
                            resume_at: offset,
                            stopped: true,
                        };
                    }
                }
            }
        }
        Progress::Done
    }

    /// The settings of `stream`, whose records this worker reads (every record's stream is
    /// one of them, checked against its topic).
    fn settings_of(&self, stream: &str) -> std::borrow::Cow<'_, StreamSettings> {
        match self.config.streams.iter().find(|s| s.name == stream) {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(StreamSettings::new(stream)),
        }
    }

    /// Sends an event that failed `attempts` times to the retry topic, or to the
    /// dead-letter topic once the attempts are used up. Returns false on shutdown.
    async fn send_on(
        &self,
        record: &Record,
        attempts: u32,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        let stream = record.envelope.stream.as_str();
        let last = attempts >= self.config.retry.max_attempts;
        let settings = self.settings_of(stream);
        let topic = if last {
            settings.dead_letter_topic()
        } else {
            settings.retry_topic()
        };
        let mut headers = record.envelope.headers.clone();
        headers.insert(ATTEMPT_HEADER.to_owned(), attempts.to_string());
        headers.insert(ERROR_HEADER.to_owned(), reason.to_owned());
        let kafka_headers = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        });
        let value = record.envelope.encode_value();
        if last {
            tracing::error!(%topic, id = %record.envelope.id, attempts, %reason, "event dead-lettered after its last attempt");
        } else {
            tracing::warn!(%topic, id = %record.envelope.id, attempts, %reason, "event sent to the retry topic");
        }
        let sent = self
            .produce(
                &topic,
                record.envelope.key.as_deref().map(str::as_bytes),
                Some(&value),
                kafka_headers,
                shutdown,
            )
            .await;
        if sent {
            if last {
                self.metrics.dead_lettered(stream, 1);
                self.confirmer.dead_lettered(record, reason);
            } else {
                self.metrics.retried(stream, 1);
            }
        }
        sent
    }

    /// Sends a record that is not an event to the stream's dead-letter topic.
    async fn dead_letter_raw(
        &self,
        source: &str,
        partition: i32,
        m: &Fetched,
        stream: &str,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        let topic = self.settings_of(stream).dead_letter_topic();
        tracing::error!(%topic, source, partition, offset = m.offset, %reason, "record is not an event; dead-lettering it");
        let mut headers = OwnedHeaders::new();
        if let Some(h) = &m.headers {
            for header in h.iter() {
                headers = headers.insert(header);
            }
        }
        let partition = partition.to_string();
        let offset = m.offset.to_string();
        headers = headers
            .insert(Header {
                key: ERROR_HEADER,
                value: Some(reason),
            })
            .insert(Header {
                key: "sluice-source-topic",
                value: Some(source),
            })
            .insert(Header {
                key: "sluice-source-partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "sluice-source-offset",
                value: Some(&offset),
            });
        let sent = self
            .produce(
                &topic,
                m.key.as_deref(),
                m.value.as_deref(),
                headers,
                shutdown,
            )
            .await;
        if sent {
            self.metrics.dead_lettered(stream, 1);
            let waiting = m.headers.as_ref().and_then(|h| {
                h.iter()
                    .find(|h| h.key == sluice_core::confirm::HEADER)
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
            });
            self.confirmer.dead_lettered_raw(waiting, reason);
        }
        sent
    }

    /// Produces one record and waits for Kafka's acknowledgement, retrying with backoff.
    /// Returns false when shutdown came first.
    async fn produce(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut backoff = Backoff::new();
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers.clone());
            if let Some(p) = payload {
                record = record.payload(p);
            }
            if let Some(k) = key {
                record = record.key(k);
            }
            match self.producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => return true,
                Err((e, _)) => {
                    tracing::error!(%topic, error = %e, "cannot write to Kafka; retrying");
                    if !sleep_or_shutdown(backoff.next(), shutdown).await {
                        return false;
                    }
                }
            }
        }
    }
}

/// Sleeps, unless shutdown comes first (then returns false).
async fn sleep_or_shutdown(wait: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

/// Exponential backoff from 100 ms up to 5 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }

    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_ceiling() {
        let mut b = Backoff::new();
        let waits: Vec<u128> = (0..8).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
