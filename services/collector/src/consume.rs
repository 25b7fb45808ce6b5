//! The consumer loop of a collector, for its main topics and for its retry topics.
//!
//! 1. Wait for a record, then take whatever else is already fetched, up to `--batch-size`.
//! 2. Split the records by partition. Each partition's records are handled by a task of
//!    their own (at most `--concurrent-count` at once, on all the runtime's threads), in
//!    offset order: decoded into events, then written.
//! 3. Decoding: a record that is not an event, or an event that names another stream than
//!    the one its topic belongs to, goes to the stream's dead-letter topic at once, with
//!    the reason in the `sluice-error` header.
//! 4. Once every partition's task is finished, store, for each partition that is done, the
//!    offset of its last record; the consumer commits stored offsets every second and on
//!    shutdown.
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
//!   again.
//! - **The sink rejects events** (a value it cannot store): on the main topics the batch is
//!   tried `--write-attempts` times, then each event alone, and those it rejects go to
//!   `<stream>.retry` with `sluice-attempt: 1`. On the retry topics each event waits for
//!   its backoff, is tried once, and goes back to `<stream>.retry` with its attempt count
//!   raised, or, after the last attempt, to `<stream>.dlq`.
//!
//! Rebalances happen inside `recv`, between batches, so work in flight always finishes
//! before its partitions are given up. When shutdown interrupts a batch, only the offsets of
//! what is done are stored; the rest is delivered again to whoever takes the partitions
//! next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use sluice_core::Envelope;
use sluice_core::kafka::KafkaArgs;
use sluice_core::settings::{RetrySettings, StreamSettings};
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

/// Turns librdkafka's statistics into the lag metric.
pub struct LagContext {
    metrics: Arc<Metrics>,
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

impl ConsumerContext for LagContext {}

/// One consumer with its loop.
pub struct Worker {
    consumer: StreamConsumer<LagContext>,
    shared: Arc<Shared>,
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
    messages: Vec<Fetched>,
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
        let consumer: StreamConsumer<LagContext> = client.create_with_context(LagContext {
            metrics: metrics.clone(),
        })?;
        let topics: Vec<&str> = streams.keys().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        tracing::info!(group = %config.group, ?topics, sink = sink.name(), "collector subscribed");
        Ok(Self {
            consumer,
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
        loop {
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                m = self.consumer.recv() => m,
            };
            let first = match first {
                Ok(m) => m,
                Err(e) if topic_missing(&e) => {
                    tracing::debug!(error = %e, "subscribed topic not available");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < self.shared.config.batch_size {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "kafka consumer error");
                        break;
                    }
                    None => break,
                }
            }
            if !self.process(&batch, &shutdown).await {
                break;
            }
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

    /// Handles one batch. Returns false when shutdown interrupted it.
    async fn process(&self, batch: &[BorrowedMessage<'_>], shutdown: &CancellationToken) -> bool {
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
                        messages: Vec::new(),
                    });
                    work.len() - 1
                }
            };
            work[index].last_offset = m.offset();
            work[index].messages.push(Fetched::copy(m));
        }
        let outcomes: Vec<_> = futures::stream::iter(work)
            .map(|w| {
                let shared = self.shared.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { shared.handle(w, &shutdown).await })
            })
            .buffer_unordered(self.shared.config.concurrency.max(1))
            .collect()
            .await;
        let mut complete = true;
        for outcome in outcomes {
            let (w, progress) = match outcome {
                Ok(done) => done,
                Err(e) => match e.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    // Only a runtime shutting down cancels a task: nothing is stored.
                    Err(_) => {
                        complete = false;
                        continue;
                    }
                },
            };
            let (topic, partition) = (w.topic.as_str(), w.partition);
            let done_through = match progress {
                Progress::Done => Some(w.last_offset),
                Progress::Partial { resume_at, stopped } => {
                    complete &= !stopped;
                    if !stopped {
                        // Read again from the first record not done. Without a timeout the
                        // seek is asynchronous; records fetched before it are dropped.
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
            if let Some(offset) = done_through
                && let Err(e) = self.consumer.store_offset(topic, partition, offset)
            {
                // The partition was taken away meanwhile; its new owner replays the records.
                tracing::debug!(error = %e, %topic, partition, "offset not stored");
            }
        }
        complete
    }
}

impl Shared {
    fn stream_of<'a>(&'a self, topic: &'a str) -> &'a str {
        self.streams.get(topic).map_or(topic, String::as_str)
    }

    /// Decodes and writes the records of one partition, in order. The records that are not
    /// events go to the dead-letter topic as they come.
    async fn handle(
        &self,
        mut w: PartitionWork,
        shutdown: &CancellationToken,
    ) -> (PartitionWork, Progress) {
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
                            topic: w.topic.clone(),
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
                            Progress::Partial {
                                resume_at,
                                stopped: true,
                            },
                        );
                    }
                    self.dead_lettered_through
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(key, m.offset);
                }
            }
        }
        let progress = match self.config.mode {
            Mode::Main => self.write_main(items, shutdown).await,
            Mode::Retry => self.write_retry(items, shutdown).await,
        };
        (w, progress)
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
