//! The consumer loop of a collector, for its main topics and for its retry topics.
//!
//! Every assigned partition has its own queue of fetched records (split from the
//! consumer's before the partition is assigned) and a reader task of its own, so that
//! receiving, copying and decoding run for all partitions at once, on all the runtime's
//! threads. The consumer loop polls the consumer's own queue for rebalances, errors and
//! statistics, and starts and stops the readers.
//!
//! 1. A reader waits for a record of its partition, then takes whatever else is already
//!    fetched, up to `--batch-size`; the records in flight across all partitions are
//!    bounded (twice `--batch-size`), and a reader waits when they are over.
//! 2. It decodes the batch into events while its previous batch is written, and writes
//!    it once that one is done (at most `--concurrent-count` partitions written at once),
//!    so the partition's records are written in order.
//! 3. Decoding: a record that is not an event, or an event that names another stream than
//!    the one its topic belongs to, goes to the stream's dead-letter topic at once, with
//!    the reason in the `sluice-error` header.
//! 4. As each write finishes, the reader stores the offset of the last record it got
//!    through; the consumer commits stored offsets every second and on shutdown.
//!
//! "Done" means every event of the partition is in the sink or acknowledged on the retry or
//! dead-letter topic. Two kinds of failure are told apart ([`SinkError::is_retriable`]):
//!
//! - **The sink is unavailable** (down, unreachable, timing out, read-only, out of memory
//!   or disk): the write is tried again, unchanged, after a capped backoff
//!   ([`crate::health`]), for as long as the outage lasts. Nothing goes to the retry or
//!   dead-letter topics for it. Every [`HOLD`] the reader gives the records back to Kafka
//!   (it stores the offsets of what is done and seeks the partition back to the first
//!   record that is not), while the consumer keeps polling and stays in its group, and
//!   reads them again. The batch it decoded meanwhile is not written: it is read again.
//! - **The sink rejects events** (a value it cannot store): on the main topics the batch is
//!   tried `--write-attempts` times, then each event alone, and those it rejects go to
//!   `<stream>.retry` with `sluice-attempt: 1`. On the retry topics each event waits for
//!   its backoff, is tried once, and goes back to `<stream>.retry` with its attempt count
//!   raised, or, after the last attempt, to `<stream>.dlq`.
//!
//! Rebalances: when the group takes partitions away, the consumer hands them over only
//! after their readers have finished the batches they took and stored their offsets
//! ([`Handover`]), so a partition never has two writers and its next owner starts after
//! what was written. When shutdown interrupts a write, only the offsets of what is done
//! are stored; the rest is delivered again to whoever takes the partitions next.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::client::ClientContext;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
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
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
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
    /// Most records of a partition per batch; twice this many in flight at most.
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

/// The consumer's context: turns librdkafka's statistics into the lag metric, gives each
/// assigned partition its own queue, and passes assigned and revoked partitions to the
/// consumer loop ([`Handover`]).
pub struct LagContext {
    metrics: Arc<Metrics>,
    handover: Arc<Handover>,
    /// The consumer itself, to split partition queues from.
    consumer: OnceLock<Weak<StreamConsumer<LagContext>>>,
}

/// A partition assigned to this consumer, with its own queue of fetched records.
struct Assigned {
    topic: String,
    partition: i32,
    queue: StreamPartitionQueue<LagContext>,
}

/// Partitions the group gives this consumer and takes from it. librdkafka waits for the
/// consumer to give revoked partitions up (the group's rebalance waits with it); the
/// consumer loop does so once their readers are finished and their offsets are stored.
#[derive(Default)]
struct Handover {
    /// The partitions revoked and not yet given up.
    revoked: Mutex<Option<TopicPartitionList>>,
    /// The partitions assigned whose readers are not started yet.
    assigned: Mutex<Vec<Assigned>>,
    /// Set once the loop has stopped: partitions revoked from then on (as the consumer
    /// closes) are given up at once.
    closing: AtomicBool,
    /// Wakes the loop when partitions are assigned or revoked.
    wake: Notify,
}

impl Handover {
    fn take(&self) -> Option<TopicPartitionList> {
        self.revoked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn take_assigned(&self) -> Vec<Assigned> {
        std::mem::take(&mut *self.assigned.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl LagContext {
    /// Gives each of `partitions` its own queue, before they are assigned: none of their
    /// records is then fetched into the consumer's queue, and librdkafka keeps the queue
    /// apart when it starts fetching.
    fn split(&self, partitions: &TopicPartitionList) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut assigned = self
            .handover
            .assigned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for p in partitions.elements() {
            match consumer.split_partition_queue(p.topic(), p.partition()) {
                Some(queue) => assigned.push(Assigned {
                    topic: p.topic().to_owned(),
                    partition: p.partition(),
                    queue,
                }),
                None => tracing::error!(
                    topic = p.topic(),
                    partition = p.partition(),
                    "cannot give the partition a queue of its own; its records are not read"
                ),
            }
        }
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
                self.split(partitions);
                self.handover.wake.notify_one();
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
    consumer: Arc<StreamConsumer<LagContext>>,
    handover: Arc<Handover>,
    shared: Arc<Shared>,
}

impl Drop for Worker {
    /// However the loop ends (shutdown, or its task dropped with the runtime), partitions
    /// revoked and not yet given up, and any revoked from now on (as the consumer closes),
    /// are given up at once: closing the consumer waits for that. Queues of partitions
    /// whose readers never started are dropped.
    fn drop(&mut self) {
        self.handover.closing.store(true, Ordering::Release);
        drop(self.handover.take_assigned());
        if let Some(revoked) = self.handover.take()
            && let Err(e) = give_up(&*self.consumer, &revoked)
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
    /// Partitions written at once.
    slots: Semaphore,
    /// Records taken from Kafka and not yet settled, across the partitions.
    in_flight: Arc<Semaphore>,
}

/// An event read from Kafka, with what the retry path needs.
struct Item {
    record: Record,
    /// Attempts so far (0 on the main topics).
    attempts: u32,
    /// When the record was written to Kafka, in milliseconds since the epoch.
    timestamp_ms: Option<i64>,
}

/// The readers of the assigned partitions.
struct Readers {
    /// Per partition, what stops its reader.
    running: HashMap<(String, i32), CancellationToken>,
    /// The readers, each coming back with its partition when it ends.
    ended: FuturesUnordered<JoinHandle<(String, i32)>>,
}

impl Readers {
    fn ended(&mut self, joined: Result<(String, i32), JoinError>) {
        match joined {
            // A reader ends once its token is cancelled; a partition assigned again has a
            // new reader with a token of its own, which stays.
            Ok(key) => {
                if self
                    .running
                    .get(&key)
                    .is_some_and(CancellationToken::is_cancelled)
                {
                    self.running.remove(&key);
                }
            }
            Err(e) => {
                if let Ok(panic) = e.try_into_panic() {
                    std::panic::resume_unwind(panic)
                }
                // Only a runtime shutting down cancels a task: nothing is stored.
            }
        }
    }
}

/// A partition's reader: receives the partition's records from its own queue, decodes
/// them while the batch before is written, writes them in order and stores the offset of
/// what is done.
struct Reader {
    shared: Arc<Shared>,
    consumer: Arc<StreamConsumer<LagContext>>,
    topic: String,
    partition: i32,
    /// The highest offset stored.
    stored: i64,
}

/// A partition's batch being written.
struct Writing {
    first_offset: i64,
    last_offset: i64,
    task: JoinHandle<Progress>,
}

/// A record that is not an event, copied out of the consumer's buffers for the
/// dead-letter topic.
struct Fetched {
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
}

impl Fetched {
    fn copy(m: &BorrowedMessage<'_>) -> Self {
        Self {
            offset: m.offset(),
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
        let consumer: Arc<StreamConsumer<LagContext>> =
            Arc::new(client.create_with_context(LagContext {
                metrics: metrics.clone(),
                handover: handover.clone(),
                consumer: OnceLock::new(),
            })?);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let topics: Vec<&str> = streams.keys().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        tracing::info!(group = %config.group, ?topics, sink = sink.name(), "collector subscribed");
        let slots = Semaphore::new(config.concurrency.max(1));
        let in_flight = Arc::new(Semaphore::new(config.batch_size.max(1) * 2));
        Ok(Self {
            consumer,
            handover,
            shared: Arc::new(Shared {
                slots,
                in_flight,
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
        let mut readers = Readers {
            running: HashMap::new(),
            ended: FuturesUnordered::new(),
        };
        // Partitions whose records came on the consumer's queue, reported once each.
        let mut unsplit = HashSet::new();
        // One stream for the loop: `recv` would make (and register) one per event. Polling
        // it serves rebalances, errors and statistics.
        let mut events = self.consumer.stream();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = self.handover.wake.notified() => {
                    self.hand_over(&mut readers).await;
                    self.start_readers(&mut readers, &shutdown);
                }
                Some(joined) = readers.ended.next() => readers.ended(joined),
                event = events.next() => match event {
                    // The consumer's stream never ends.
                    None => break,
                    Some(Ok(m)) => {
                        // Only a partition that could not get a queue of its own has
                        // records here. They are not written and their offsets are not
                        // stored: they are read again after the next rebalance.
                        if unsplit.insert((m.topic().to_owned(), m.partition())) {
                            tracing::error!(topic = m.topic(), partition = m.partition(), "records of a partition without a queue of its own are not read");
                        }
                    }
                    Some(Err(e)) if topic_missing(&e) => {
                        tracing::debug!(error = %e, "subscribed topic not available");
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
                },
            }
        }
        // Shutdown: the readers stop (their tokens are the shutdown's children), their
        // writes at the next record boundary, and store what they finished.
        while let Some(joined) = readers.ended.next().await {
            readers.ended(joined);
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

    /// Starts a reader for each partition assigned since the last call.
    fn start_readers(&self, readers: &mut Readers, shutdown: &CancellationToken) {
        for a in self.handover.take_assigned() {
            let stop = shutdown.child_token();
            if let Some(earlier) = readers
                .running
                .insert((a.topic.clone(), a.partition), stop.clone())
            {
                earlier.cancel();
            }
            let reader = Reader {
                shared: self.shared.clone(),
                consumer: self.consumer.clone(),
                topic: a.topic,
                partition: a.partition,
                stored: -1,
            };
            readers
                .ended
                .push(tokio::spawn(reader.run(a.queue, stop, shutdown.clone())));
        }
    }

    /// Gives up the partitions the group took away, once their readers have finished the
    /// batches they took and stored their offsets (giving them up commits the stored
    /// offsets).
    async fn hand_over(&self, readers: &mut Readers) {
        let Some(revoked) = self.handover.take() else {
            return;
        };
        let keys: Vec<(String, i32)> = revoked
            .elements()
            .iter()
            .map(|p| (p.topic().to_owned(), p.partition()))
            .collect();
        for key in &keys {
            if let Some(stop) = readers.running.get(key) {
                stop.cancel();
            }
        }
        while keys.iter().any(|key| readers.running.contains_key(key)) {
            match readers.ended.next().await {
                Some(joined) => readers.ended(joined),
                None => break,
            }
        }
        match give_up(&*self.consumer, &revoked) {
            Ok(()) => tracing::info!(
                partitions = revoked.count(),
                "partitions handed over after the work in flight"
            ),
            Err(e) => tracing::error!(error = %e, "cannot give up the revoked partitions"),
        }
    }
}

impl Reader {
    /// Reads, decodes and writes the partition until `stop` (a rebalance took the
    /// partition away, or shutdown); then finishes the batches it took, stores their
    /// offsets and comes back with the partition.
    async fn run(
        mut self,
        queue: StreamPartitionQueue<LagContext>,
        stop: CancellationToken,
        shutdown: CancellationToken,
    ) -> (String, i32) {
        let batch_size = self.shared.config.batch_size.max(1);
        let mut messages = queue.stream();
        let mut writing: Option<Writing> = None;
        loop {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                joined = async { (&mut writing.as_mut().expect("checked").task).await }, if writing.is_some() => {
                    if let Some(w) = writing.take() {
                        self.settle(w.first_offset, w.last_offset, joined);
                    }
                    continue;
                }
                m = messages.next() => m,
            };
            let first = match first {
                // A partition's stream never ends.
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, topic = %self.topic, partition = self.partition, "kafka consumer error");
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < batch_size {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    Some(Some(Err(e))) => {
                        tracing::warn!(error = %e, topic = %self.topic, partition = self.partition, "kafka consumer error");
                        break;
                    }
                    Some(None) | None => break,
                }
            }
            // The semaphore is never closed, and a batch never needs more than it has.
            let Ok(permit) = self
                .shared
                .in_flight
                .clone()
                .acquire_many_owned(batch.len() as u32)
                .await
            else {
                break;
            };
            let first_offset = batch.first().map_or(0, Message::offset);
            let last_offset = batch.last().map_or(0, Message::offset);
            let (items, rejected) = self.shared.decode(&self.topic, self.partition, &batch);
            drop(batch);
            if !self
                .shared
                .dead_letter_all(&self.topic, self.partition, rejected, &shutdown)
                .await
            {
                // Shutdown came first: nothing of this batch is written or stored.
                break;
            }
            // The batch before is written first; when it was given back to Kafka, this
            // one is read again after it.
            if let Some(w) = writing.take() {
                let joined = w.task.await;
                if !self.settle(w.first_offset, w.last_offset, joined) {
                    continue;
                }
            }
            writing = Some(Writing {
                first_offset,
                last_offset,
                task: tokio::spawn(write(self.shared.clone(), items, permit, shutdown.clone())),
            });
        }
        if let Some(w) = writing.take() {
            let joined = w.task.await;
            self.settle(w.first_offset, w.last_offset, joined);
        }
        (self.topic, self.partition)
    }

    /// Stores the offset of what a finished write got through, or seeks the partition
    /// back to the first record it did not. Returns whether it got through all of them.
    fn settle(
        &mut self,
        first_offset: i64,
        last_offset: i64,
        joined: Result<Progress, JoinError>,
    ) -> bool {
        let progress = match joined {
            Ok(progress) => progress,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Only a runtime shutting down cancels a task: nothing is stored.
                Err(_) => return false,
            },
        };
        let (topic, partition) = (self.topic.as_str(), self.partition);
        let done_through = match progress {
            Progress::Done => Some(last_offset),
            Progress::Partial { resume_at, stopped } => {
                if !stopped {
                    // Read again from the first record not done. The seek raises the
                    // partition's version at once: records fetched before it are dropped.
                    if let Err(e) = self.consumer.seek(
                        topic,
                        partition,
                        rdkafka::Offset::Offset(resume_at),
                        Duration::ZERO,
                    ) {
                        tracing::warn!(error = %e, %topic, partition, resume_at, "cannot seek back; the records are read again after the next rebalance");
                    }
                }
                (resume_at > first_offset).then_some(resume_at - 1)
            }
        };
        if let Some(offset) = done_through
            && offset > self.stored
        {
            self.stored = offset;
            if let Err(e) = self.consumer.store_offset(topic, partition, offset) {
                // The partition was taken away meanwhile; its new owner replays the records.
                tracing::debug!(error = %e, %topic, partition, "offset not stored");
            }
        }
        progress == Progress::Done
    }
}

/// Writes a partition's batch once a slot is free (at most `--concurrent-count` at once);
/// the batch's records count as in flight until it is done.
async fn write(
    shared: Arc<Shared>,
    items: Vec<Item>,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) -> Progress {
    // The semaphore is never closed: a permit always comes.
    let _slot = shared.slots.acquire().await.ok();
    let progress = shared.write_items(items, &shutdown).await;
    drop(permit);
    progress
}

impl Shared {
    fn stream_of<'a>(&'a self, topic: &'a str) -> &'a str {
        self.streams.get(topic).map_or(topic, String::as_str)
    }

    /// Decodes the records of one partition, in order, into its events and the records
    /// that are not events, with why.
    fn decode(
        &self,
        topic: &str,
        partition: i32,
        messages: &[BorrowedMessage<'_>],
    ) -> (Vec<Item>, Vec<(Fetched, String)>) {
        let stream = self.stream_of(topic);
        self.metrics.consumed(stream, messages.len() as u64);
        let mut items = Vec::with_capacity(messages.len());
        let mut rejected = Vec::new();
        for m in messages {
            // The topic says which stream a record belongs to, not the record: one that
            // names another stream would land in that stream's keys, rows or files.
            let decoded = Envelope::decode_verbatim(m.payload(), m.headers())
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
                            "the event names stream {:?} but was read from {topic:?}, a topic of stream {stream:?}",
                            envelope.stream
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
                            partition,
                            offset: m.offset(),
                            retried: self.config.mode == Mode::Retry,
                            verbatim: m.payload().filter(|_| verbatim).map(<[u8]>::to_vec),
                        },
                        attempts,
                        timestamp_ms: m.timestamp().to_millis(),
                    });
                }
                Err(reason) => rejected.push((Fetched::copy(m), reason)),
            }
        }
        (items, rejected)
    }

    /// Sends a partition's records that are not events to the dead-letter topic, in
    /// order; one read again after a seek back is not sent twice. Returns false when
    /// shutdown came first.
    async fn dead_letter_all(
        &self,
        topic: &str,
        partition: i32,
        rejected: Vec<(Fetched, String)>,
        shutdown: &CancellationToken,
    ) -> bool {
        let stream = self.stream_of(topic);
        for (m, reason) in rejected {
            let key = (topic.to_owned(), partition);
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
                .dead_letter_raw(topic, partition, &m, stream, &reason, shutdown)
                .await
            {
                return false;
            }
            self.dead_lettered_through
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, m.offset);
        }
        true
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
