//! Turning accepted input into events on Kafka; shared by the HTTP, WebSocket and TCP doors.
//!
//! [`Streams`] holds each stream's settings with its compiled JSON Schema. A door hands
//! [`Publisher::publish`] the payloads of one request together with what the request said
//! about ids and keys. Every payload is checked first — object, id, key, schema — so a bad
//! event rejects the whole request and nothing of it reaches Kafka. Then all records are
//! queued on the idempotent producer at once and their acknowledgements awaited together.
//!
//! A full producer queue is [`PublishError::Overloaded`] (HTTP 503 with `Retry-After`);
//! the queue is bounded, so ingest never buffers without limit. Acknowledgements are
//! awaited at most `--ack-timeout`. Whenever a request is not published whole, the answer
//! lists every event of it in order with its id (including the ids ingest made) and
//! whether it was published, was not, or is unknown (no acknowledgement in time; it may
//! still arrive): a retry of the events not known to be published, with the same ids, is
//! stored once by every sink.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::oneshot::Canceled;
use futures::future::join_all;
use futures::stream::FuturesUnordered;
use rdkafka::error::KafkaError;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use sluice_core::envelope::{InvalidId, validate_id};
use sluice_core::settings::KeyError;
use sluice_core::{Envelope, PipelineSettings, StreamSettings};

use crate::confirm::{SinkAcks, SinkResult, TooManyWaiting};
use crate::metrics::Metrics;

/// A stream with its compiled schema.
pub struct Stream {
    /// The stream's settings.
    pub settings: StreamSettings,
    schema: Option<jsonschema::Validator>,
}

/// All streams of the pipeline, by name.
pub struct Streams {
    by_name: HashMap<String, Arc<Stream>>,
    names: String,
}

/// A stream's JSON Schema does not compile.
#[derive(Debug, thiserror::Error)]
#[error("the JSON Schema of stream {stream:?} is invalid: {message}")]
pub struct SchemaError {
    stream: String,
    message: String,
}

impl Streams {
    /// Compiles the schemas of every stream.
    pub fn new(settings: &PipelineSettings) -> Result<Self, SchemaError> {
        let mut by_name = HashMap::new();
        for s in &settings.streams {
            let schema = match &s.schema {
                Some(schema) => {
                    Some(jsonschema::validator_for(schema).map_err(|e| SchemaError {
                        stream: s.name.clone(),
                        message: e.to_string(),
                    })?)
                }
                None => None,
            };
            by_name.insert(
                s.name.clone(),
                Arc::new(Stream {
                    settings: s.clone(),
                    schema,
                }),
            );
        }
        let names = settings
            .streams
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Self { by_name, names })
    }

    /// Every stream, by name.
    pub fn all(&self) -> Vec<&Arc<Stream>> {
        let mut all: Vec<_> = self.by_name.values().collect();
        all.sort_by(|a, b| a.settings.name.cmp(&b.settings.name));
        all
    }

    /// The stream called `name`.
    pub fn get(&self, name: &str) -> Result<&Arc<Stream>, PublishError> {
        self.by_name
            .get(name)
            .ok_or_else(|| PublishError::UnknownStream(name.to_owned(), self.names.clone()))
    }
}

/// Where and how an event breaks its stream's schema.
#[derive(Debug, thiserror::Error)]
#[error(
    "{at}the event does not match the schema of stream {stream:?}: at {path:?}: {message} (rule {rule})"
)]
pub struct SchemaViolation {
    /// Where in the request.
    pub at: String,
    /// The stream.
    pub stream: String,
    /// JSON pointer into the event where validation failed (`""` is the whole event).
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// JSON pointer to the failing keyword in the schema.
    pub rule: String,
}

/// What became of one event of a request that was not published whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EventOutcome {
    /// The event id (the one the request gave, or the one ingest made).
    pub id: String,
    /// `published`: Kafka acknowledged it; `failed`: it was not published; `unknown`: no
    /// acknowledgement within `--ack-timeout` (it may still be published).
    pub status: OutcomeStatus,
    /// Kafka partition, when published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    /// Offset in that partition, when published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    /// With `ack=sink`, what the collectors said of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkState>,
    /// Why a collector dead-lettered it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// With `ack=sink`: where an event stands in its sinks when the answer is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SinkState {
    /// Every collector that must confirm has written it: it is readable.
    Written,
    /// Not confirmed before the timeout; it is still delivered.
    Pending,
    /// A collector gave up on it and sent it to the dead-letter topic.
    DeadLettered,
}

/// See [`EventOutcome::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeStatus {
    /// Kafka acknowledged it.
    Published,
    /// It was not published.
    Failed,
    /// No acknowledgement in time; it may still be published.
    Unknown,
}

/// Why one event was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum Unsent {
    /// Kafka refused it, or the producer queue was full.
    #[error(transparent)]
    Failed(KafkaError),
    /// No acknowledgement within the deadline; it may still be published.
    #[error("no acknowledgement within {0:?}")]
    Pending(Duration),
}

/// Why events were not published. Every variant but the last three means nothing was sent;
/// those three list what became of each event.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No stream of that name.
    #[error("there is no stream named {0:?}; the streams of this pipeline are: {1}")]
    UnknownStream(String, String),
    /// An event is not a JSON object.
    #[error("{at}an event must be a JSON object, not {kind}")]
    NotAnObject {
        /// Where in the request (`event 3: `), or empty for a single event.
        at: String,
        /// What it was instead.
        kind: &'static str,
    },
    /// An event's id is unusable.
    #[error("{at}invalid event id: {source}")]
    InvalidId {
        /// Where in the request.
        at: String,
        /// Why.
        #[source]
        source: InvalidId,
    },
    /// An event holds a number beyond a 64-bit float's range, which a stream's key pointer
    /// or schema cannot read.
    #[error(
        "{at}the event holds a number beyond the range of a 64-bit float, which the stream's key pointer and schema cannot read"
    )]
    NumberOutOfRange {
        /// Where in the request.
        at: String,
    },
    /// An event's `id` field is neither a string nor an integer.
    #[error("{at}the field \"id\" must be a string or an integer")]
    IdNotScalar {
        /// Where in the request.
        at: String,
    },
    /// The partition key could not be taken.
    #[error("{at}cannot take the partition key: {source}")]
    Key {
        /// Where in the request.
        at: String,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// An event does not satisfy the stream's schema.
    #[error("{0}")]
    Schema(Box<SchemaViolation>),
    /// The producer queue is full.
    #[error(
        "the Kafka producer queue is full; {published} of {total} events were published; retry the others later with the same ids"
    )]
    Overloaded {
        /// Events published all the same.
        published: usize,
        /// Events in the request.
        total: usize,
        /// Each event, in request order.
        events: Vec<EventOutcome>,
    },
    /// Kafka did not acknowledge every event.
    #[error(
        "Kafka did not acknowledge {failed} of {total} events: {source}; retry them with the same ids (sinks store an id once)"
    )]
    Kafka {
        /// Events not acknowledged.
        failed: usize,
        /// Events in the request.
        total: usize,
        /// The first error.
        #[source]
        source: KafkaError,
        /// Each event, in request order.
        events: Vec<EventOutcome>,
    },
    /// Too many `ack=sink` events wait on this instance; nothing was published.
    #[error(transparent)]
    TooManyWaiting(#[from] TooManyWaiting),
    /// A collector dead-lettered events of an `ack=sink` request.
    #[error(
        "{rejected} of {total} events were published but dead-lettered by a collector: {reason}"
    )]
    SinkRejected {
        /// Events dead-lettered.
        rejected: usize,
        /// Events in the request.
        total: usize,
        /// The first reason.
        reason: String,
        /// Each event, in request order.
        events: Vec<EventOutcome>,
    },
    /// Some acknowledgements did not come in time.
    #[error(
        "Kafka did not acknowledge {pending} of {total} events within {after:?}; they may still be published: retry them with the same ids (sinks store an id once)"
    )]
    Unacknowledged {
        /// Events without an answer.
        pending: usize,
        /// Events in the request.
        total: usize,
        /// The deadline.
        after: Duration,
        /// Each event, in request order.
        events: Vec<EventOutcome>,
    },
}

impl PublishError {
    /// What became of each event, when the request was published in part or not known
    /// to be published.
    pub fn events(&self) -> Option<&[EventOutcome]> {
        match self {
            Self::Overloaded { events, .. }
            | Self::Kafka { events, .. }
            | Self::Unacknowledged { events, .. }
            | Self::SinkRejected { events, .. } => Some(events),
            _ => None,
        }
    }
}

/// What a request says about its events beyond their payloads.
#[derive(Debug, Default, Clone)]
pub struct Hints {
    /// An id for the event (`X-Sluice-Id`); only for a single event.
    pub id: Option<String>,
    /// A partition key for every event (`X-Sluice-Key`), overriding the stream's pointer.
    pub key: Option<String>,
    /// Extra headers for every event, such as `traceparent`.
    pub headers: Vec<(String, String)>,
}

/// What to wait for before answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ack {
    /// Answer after Kafka acknowledged every event (the default; `ack=kafka`).
    #[default]
    All,
    /// Answer once the events are queued (fire-and-forget).
    None,
    /// Answer after Kafka acknowledged every event and the stream's collectors wrote them
    /// to their sinks, or after this long with what is not confirmed yet as pending.
    Sink(Duration),
}

/// One published event.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Published {
    /// The event id.
    pub id: String,
    /// Kafka partition; absent with `ack=none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    /// Offset in that partition; absent with `ack=none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    /// With `ack=sink`: `written` (readable now) or `pending` (not confirmed in time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkState>,
}

/// Publishes events to Kafka.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    ack_timeout: Duration,
    sink_acks: Arc<SinkAcks>,
}

impl Publisher {
    /// A publisher on `producer` that waits at most `ack_timeout` for acknowledgements,
    /// and for sink confirmations through `sink_acks`.
    pub fn new(
        producer: FutureProducer,
        metrics: Arc<Metrics>,
        ack_timeout: Duration,
        sink_acks: Arc<SinkAcks>,
    ) -> Self {
        Self {
            producer,
            metrics,
            ack_timeout,
            sink_acks,
        }
    }

    /// The sink confirmations this instance waits for.
    pub fn sink_acks(&self) -> &Arc<SinkAcks> {
        &self.sink_acks
    }

    /// The producer.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Publishes one prepared event to `topic` and waits for the acknowledgement; a failure
    /// is logged and counted. For events ingest makes itself, such as read events.
    pub async fn publish_envelope(&self, topic: &str, envelope: Envelope) {
        let value = envelope.encode_value();
        let record = kafka_record(topic, &envelope, &value);
        match self.producer.send(record, std::time::Duration::ZERO).await {
            Ok(_) => self.metrics.produced(&envelope.stream, 1),
            Err((e, _)) => {
                self.metrics.delivery_failed(&envelope.stream);
                tracing::warn!(%topic, error = %e, "read event not published");
            }
        }
    }

    /// Checks every payload, then publishes them all to `stream`. `batch` says whether the
    /// payloads came as a batch (errors then name the event's position).
    pub async fn publish(
        &self,
        stream: &Stream,
        payloads: Vec<Box<RawValue>>,
        hints: &Hints,
        batch: bool,
        ack: Ack,
    ) -> Result<Vec<Published>, PublishError> {
        let name = stream.settings.name.as_str();
        let mut envelopes = prepare(stream, payloads, hints, batch).inspect_err(|e| {
            self.metrics.rejected(name, reject_reason(e));
        })?;
        let total = envelopes.len();
        let (wait, kafka_ack) = match ack {
            Ack::Sink(timeout) => {
                let deadline = tokio::time::Instant::now() + timeout;
                let wait = self
                    .sink_acks
                    .mark(&stream.settings.ack_by, &mut envelopes)
                    .inspect_err(|_| self.metrics.rejected(name, "overloaded"))?;
                (Some((wait, deadline)), Ack::All)
            }
            other => (None, other),
        };
        let results = self
            .send(stream.settings.topic(), envelopes, kafka_ack)
            .await;
        if results.iter().all(Result::is_ok) {
            let published: Vec<Published> = results.into_iter().filter_map(Result::ok).collect();
            return match wait {
                Some((wait, deadline)) => {
                    let sink = wait.until(deadline, &vec![true; published.len()]).await;
                    with_sink_results(published, sink)
                }
                None => Ok(published),
            };
        }
        let mut events = Vec::with_capacity(total);
        let (mut published, mut pending, mut queue_full) = (0, 0, false);
        let mut first_error = None;
        for result in results {
            let (id, status, partition, offset) = match result {
                Ok(p) => {
                    published += 1;
                    (p.id, OutcomeStatus::Published, p.partition, p.offset)
                }
                Err((id, Unsent::Pending(_))) => {
                    pending += 1;
                    (id, OutcomeStatus::Unknown, None, None)
                }
                Err((id, Unsent::Failed(e))) => {
                    queue_full |= matches!(
                        e,
                        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
                    );
                    first_error.get_or_insert(e);
                    (id, OutcomeStatus::Failed, None, None)
                }
            };
            events.push(EventOutcome {
                id,
                status,
                partition,
                offset,
                sink: None,
                error: None,
            });
        }
        if pending > 0 {
            self.metrics.delivery_failed(name);
            return Err(PublishError::Unacknowledged {
                pending,
                total,
                after: self.ack_timeout,
                events,
            });
        }
        match first_error {
            Some(_) if queue_full => {
                self.metrics.rejected(name, "overloaded");
                Err(PublishError::Overloaded {
                    published,
                    total,
                    events,
                })
            }
            Some(source) => {
                self.metrics.delivery_failed(name);
                Err(PublishError::Kafka {
                    failed: total - published,
                    total,
                    source,
                    events,
                })
            }
            // Every result was either published or pending, and none pending.
            None => Ok(Vec::new()),
        }
    }

    /// Queues every envelope on the producer at once, then (with [`Ack::All`]) awaits
    /// their acknowledgements together, at most the publisher's `ack_timeout`. One result
    /// per envelope, in order; an unsent one keeps its id. An envelope that found the
    /// producer queue full fails with `QueueFull` and was not sent.
    pub async fn send(
        &self,
        topic: &str,
        envelopes: Vec<Envelope>,
        ack: Ack,
    ) -> Vec<Result<Published, (String, Unsent)>> {
        let mut pending = Vec::with_capacity(envelopes.len());
        let mut sent = 0u64;
        let mut stream = None;
        for envelope in envelopes {
            let value = envelope.encode_value();
            match self
                .producer
                .send_result(kafka_record(topic, &envelope, &value))
            {
                Ok(delivery) => {
                    sent += 1;
                    pending.push((envelope.id, Ok(delivery)));
                }
                Err((e, _)) => pending.push((envelope.id, Err(e))),
            }
            // Every envelope of a call is of one stream, named for the metrics.
            stream.get_or_insert(envelope.stream);
        }
        let stream = stream.unwrap_or_default();
        self.metrics.produced(&stream, sent);
        if ack == Ack::None {
            let mut out = Vec::with_capacity(pending.len());
            let mut deliveries = Vec::new();
            for (id, result) in pending {
                out.push(match result {
                    Ok(d) => {
                        deliveries.push(d);
                        Ok(Published {
                            id,
                            partition: None,
                            offset: None,
                            sink: None,
                        })
                    }
                    Err(e) => Err((id, Unsent::Failed(e))),
                });
            }
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                for result in join_all(deliveries).await {
                    if !matches!(result, Ok(Ok(_))) {
                        metrics.delivery_failed(&stream);
                    }
                }
            });
            return out;
        }
        // Acknowledgements that do not come in time stay `Pending`. One timer for them all.
        let deadline = tokio::time::sleep(self.ack_timeout);
        tokio::pin!(deadline);
        let mut outcomes: Vec<Result<(i32, i64), Unsent>> = Vec::with_capacity(pending.len());
        let mut ids = Vec::with_capacity(pending.len());
        let mut deliveries = Vec::with_capacity(pending.len());
        for (i, (id, result)) in pending.into_iter().enumerate() {
            ids.push(id);
            match result {
                Ok(delivery) => {
                    outcomes.push(Err(Unsent::Pending(self.ack_timeout)));
                    deliveries.push((i, delivery));
                }
                Err(e) => outcomes.push(Err(Unsent::Failed(e))),
            }
        }
        if deliveries.len() == 1 {
            // One event, as most requests carry: its acknowledgement awaited on its own.
            for (i, delivery) in deliveries {
                tokio::select! {
                    biased;
                    delivered = delivery => outcomes[i] = acknowledged(delivered),
                    () = &mut deadline => {}
                }
            }
        } else {
            let mut waiting: FuturesUnordered<_> = deliveries
                .into_iter()
                .map(|(i, delivery)| async move { (i, delivery.await) })
                .collect();
            loop {
                let (i, delivered) = tokio::select! {
                    biased;
                    next = waiting.next() => match next {
                        Some(next) => next,
                        None => break,
                    },
                    () = &mut deadline => break,
                };
                outcomes[i] = acknowledged(delivered);
            }
        }
        ids.into_iter()
            .zip(outcomes)
            .map(|(id, outcome)| match outcome {
                Ok((partition, offset)) => Ok(Published {
                    id,
                    partition: Some(partition),
                    offset: Some(offset),
                    sink: None,
                }),
                Err(unsent) => Err((id, unsent)),
            })
            .collect()
    }
}

/// The partition and offset of a delivered record, or why it was not.
fn acknowledged(delivered: Result<OwnedDeliveryResult, Canceled>) -> Result<(i32, i64), Unsent> {
    match delivered {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, _))) => Err(Unsent::Failed(e)),
        Err(_) => Err(Unsent::Failed(KafkaError::Canceled)),
    }
}

/// The Kafka record of `envelope` on `topic`, its value encoded as `value`.
fn kafka_record<'a>(
    topic: &'a str,
    envelope: &'a Envelope,
    value: &'a [u8],
) -> FutureRecord<'a, str, [u8]> {
    let mut record = FutureRecord::to(topic).payload(value);
    // Without headers, no header list is made for librdkafka to copy.
    if !envelope.headers.is_empty() {
        record = record.headers(envelope.kafka_headers());
    }
    if let Some(key) = &envelope.key {
        record = record.key(key.as_str());
    }
    record
}

/// Published events with what their sinks said: the events, or the request's failure
/// when a collector dead-lettered any of them.
fn with_sink_results(
    mut published: Vec<Published>,
    sink: Vec<SinkResult>,
) -> Result<Vec<Published>, PublishError> {
    let mut first_reason = None;
    let mut rejected = 0;
    let mut reasons = Vec::with_capacity(sink.len());
    for (p, result) in published.iter_mut().zip(sink) {
        let (state, reason) = match result {
            SinkResult::Written => (SinkState::Written, None),
            SinkResult::Pending => (SinkState::Pending, None),
            SinkResult::DeadLettered(reason) => {
                rejected += 1;
                first_reason.get_or_insert_with(|| reason.clone());
                (SinkState::DeadLettered, Some(reason))
            }
        };
        p.sink = Some(state);
        reasons.push(reason);
    }
    let Some(reason) = first_reason else {
        return Ok(published);
    };
    let total = published.len();
    let events = published
        .into_iter()
        .zip(reasons)
        .map(|(p, error)| EventOutcome {
            id: p.id,
            status: OutcomeStatus::Published,
            partition: p.partition,
            offset: p.offset,
            sink: p.sink,
            error,
        })
        .collect();
    Err(PublishError::SinkRejected {
        rejected,
        total,
        reason,
        events,
    })
}

fn reject_reason(e: &PublishError) -> &'static str {
    match e {
        PublishError::UnknownStream(..) => "unknown-stream",
        PublishError::NotAnObject { .. } => "not-an-object",
        PublishError::InvalidId { .. } | PublishError::IdNotScalar { .. } => "invalid-id",
        PublishError::Key { .. } => "missing-key",
        PublishError::NumberOutOfRange { .. } => "number-out-of-range",
        PublishError::Schema(_) => "schema",
        PublishError::Overloaded { .. } | PublishError::TooManyWaiting(_) => "overloaded",
        PublishError::Kafka { .. } | PublishError::Unacknowledged { .. } => "kafka",
        PublishError::SinkRejected { .. } => "dead-lettered",
    }
}

/// The id a number written with a fraction or an exponent stands for, read from its text
/// exactly: an integer (`7.0`, `1e3`, `9007199254740993.0`), as JSON Schema counts it,
/// within the 64-bit range of a plain integer id.
fn integer_of_written(text: &str) -> Option<String> {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i64>().ok()?),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() || !(whole.bytes().chain(fraction.bytes())).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = [whole, fraction].concat();
    // The value is digits × 10^shift.
    let shift = exponent.checked_sub(i64::try_from(fraction.len()).ok()?)?;
    let digits = digits.trim_start_matches('0');
    let integer = if shift >= 0 {
        // More than 20 digits is beyond the range whatever they are.
        if digits.is_empty() {
            String::new()
        } else if usize::try_from(shift).ok()? + digits.len() > 20 {
            return None;
        } else {
            format!("{digits}{}", "0".repeat(usize::try_from(shift).ok()?))
        }
    } else {
        let dropped = usize::try_from(shift.unsigned_abs()).ok()?;
        let kept = digits.len().saturating_sub(dropped);
        if !digits[kept..].bytes().all(|b| b == b'0') {
            return None;
        }
        digits[..kept].to_owned()
    };
    let magnitude: i128 = if integer.is_empty() {
        0
    } else {
        integer.parse().ok()?
    };
    let value = if negative { -magnitude } else { magnitude };
    (i128::from(i64::MIN)..=i128::from(u64::MAX))
        .contains(&value)
        .then(|| value.to_string())
}

/// The `id` field of a payload.
#[derive(Default)]
enum IdField {
    #[default]
    Absent,
    Text(String),
    /// An integer written as one (64-bit).
    Integer(String),
    /// A number written with a fraction or an exponent, or a payload not read as a tree:
    /// the field's text is read again, since a float may not hold it exactly.
    Written,
    /// Null or a boolean.
    Unusable,
}

impl IdField {
    /// The `id` field of a payload read as a tree.
    fn of(tree: &Value) -> Self {
        match tree.get("id") {
            None => Self::Absent,
            Some(Value::String(id)) => Self::Text(id.clone()),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Self::Integer(n.to_string()),
            Some(Value::Number(_)) => Self::Written,
            Some(_) => Self::Unusable,
        }
    }

    /// The id it stands for; `Err` when it is neither a string nor an integer. `payload`
    /// is the text it was read from.
    fn id(self, payload: &str) -> Result<Option<String>, ()> {
        match self {
            Self::Absent => Ok(None),
            Self::Text(id) | Self::Integer(id) => Ok(Some(id)),
            Self::Written => match written_id(payload) {
                None => Ok(None),
                Some(text) if text.starts_with('"') => {
                    serde_json::from_str::<String>(text).map(Some).map_err(drop)
                }
                Some(text) => integer_of_written(text).map(Some).ok_or(()),
            },
            Self::Unusable => Err(()),
        }
    }
}

/// The text of a payload's last `id` field, as written; `None` without one.
fn written_id(payload: &str) -> Option<&str> {
    struct LastId<'a>(Option<&'a RawValue>);
    impl<'de> Deserialize<'de> for LastId<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = LastId<'de>;

                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }

                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<LastId<'de>, A::Error> {
                    let mut last = None;
                    while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                        if key == "id" {
                            last = Some(map.next_value::<&'de RawValue>()?);
                        } else {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                    Ok(LastId(last))
                }
            }
            d.deserialize_map(Visitor)
        }
    }
    serde_json::from_str::<LastId<'_>>(payload)
        .ok()?
        .0
        .map(RawValue::get)
}

/// Reads an `id` field as it is parsed. An object or an array fails the read: the payload
/// is then read as a tree, which finds the same.
impl<'de> Deserialize<'de> for IdField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = IdField;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an integer")
            }

            fn visit_str<E>(self, v: &str) -> Result<IdField, E> {
                Ok(IdField::Text(v.to_owned()))
            }

            fn visit_string<E>(self, v: String) -> Result<IdField, E> {
                Ok(IdField::Text(v))
            }

            fn visit_u64<E>(self, v: u64) -> Result<IdField, E> {
                Ok(IdField::Integer(v.to_string()))
            }

            fn visit_i64<E>(self, v: i64) -> Result<IdField, E> {
                Ok(IdField::Integer(v.to_string()))
            }

            fn visit_f64<E>(self, _: f64) -> Result<IdField, E> {
                Ok(IdField::Written)
            }

            fn visit_unit<E>(self) -> Result<IdField, E> {
                Ok(IdField::Unusable)
            }

            fn visit_bool<E>(self, _: bool) -> Result<IdField, E> {
                Ok(IdField::Unusable)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// What is read of a payload that no schema or key pointer needs as a tree.
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    id: IdField,
}

/// Checks every payload and wraps it in an envelope; the first bad one fails them all. A
/// payload is stored as the JSON text it came as (on one line); it is parsed into a tree
/// only for a stream's schema or key pointer.
pub fn prepare(
    stream: &Stream,
    payloads: Vec<Box<RawValue>>,
    hints: &Hints,
    batch: bool,
) -> Result<Vec<Envelope>, PublishError> {
    let settings = &stream.settings;
    let needs_tree = stream.schema.is_some() || settings.key.is_some();
    // The trace continues from the current span (the request, message or line), the same
    // for every event of the request: read once.
    let mut trace = std::collections::BTreeMap::new();
    sluice_core::telemetry::inject(&mut trace);
    let mut out = Vec::with_capacity(payloads.len());
    for (n, payload) in payloads.into_iter().enumerate() {
        // Where in the request, for an error.
        let at = || {
            if batch {
                format!("event {n}: ")
            } else {
                String::new()
            }
        };
        if !payload.get().starts_with('{') {
            return Err(PublishError::NotAnObject {
                at: at(),
                kind: raw_kind(&payload),
            });
        }
        // A payload whose `id` field is given twice is read as a tree too (the last wins).
        let head = (!needs_tree)
            .then(|| serde_json::from_str::<Head>(payload.get()).ok())
            .flatten();
        let (own, tree) = match head {
            Some(head) => (head.id, None),
            None => match serde_json::from_str::<Value>(payload.get()) {
                Ok(tree) => (IdField::of(&tree), Some(tree)),
                // Valid JSON text that a tree cannot hold (a number beyond a float's range):
                // its id is read from the text, and only a key pointer or a schema needs more.
                Err(_) if needs_tree => {
                    return Err(match IdField::Written.id(payload.get()) {
                        Err(()) => PublishError::IdNotScalar { at: at() },
                        Ok(_) => PublishError::NumberOutOfRange { at: at() },
                    });
                }
                Err(_) => (IdField::Written, None),
            },
        };
        // The payload's `id` is checked even where the header's id takes its place.
        let own = own
            .id(payload.get())
            .map_err(|()| PublishError::IdNotScalar { at: at() })?;
        let check = |id: &str| {
            validate_id(id).map_err(|source| PublishError::InvalidId { at: at(), source })
        };
        if let Some(own) = &own {
            check(own)?;
        }
        let id = match &hints.id {
            Some(header) if !batch => {
                check(header)?;
                Some(header.clone())
            }
            _ => own,
        };
        // A stream with a key pointer keys every event by it, so that the events of one
        // key keep their order; the hint keys the events of a stream without one.
        let key = match (&settings.key, &tree) {
            (Some(_), Some(tree)) => settings
                .key_of(tree)
                .map_err(|source| PublishError::Key { at: at(), source })?,
            _ => hints.key.clone(),
        };
        if let (Some(schema), Some(tree)) = (&stream.schema, &tree)
            && let Some(error) = schema.iter_errors(tree).next()
        {
            return Err(PublishError::Schema(Box::new(SchemaViolation {
                at: at(),
                stream: settings.name.clone(),
                path: error.instance_path().to_string(),
                message: error.to_string(),
                rule: error.schema_path().to_string(),
            })));
        }
        let mut envelope = Envelope::with_payload(id, &settings.name, key, payload);
        for (k, v) in hints.headers.iter().map(|(k, v)| (k, v)).chain(&trace) {
            envelope.headers.insert(k.clone(), v.clone());
        }
        out.push(envelope);
    }
    Ok(out)
}

/// A name for the kind of a JSON text, for error messages.
fn raw_kind(text: &RawValue) -> &'static str {
    match text.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `value` alone, as the JSON text of a request without hints.
    fn single(s: &Stream, value: Value) -> Result<Vec<Envelope>, PublishError> {
        prepare(s, texts(vec![value]), &Hints::default(), false)
    }

    /// `values` as the JSON texts a request would bring.
    fn texts(values: Vec<Value>) -> Vec<Box<RawValue>> {
        values
            .iter()
            .map(|v| serde_json::value::to_raw_value(v).expect("json"))
            .collect()
    }

    fn stream(yaml: &str) -> Arc<Stream> {
        let settings = PipelineSettings::from_yaml(yaml).expect("settings");
        let streams = Streams::new(&settings).expect("schemas compile");
        streams
            .get(&settings.streams[0].name)
            .expect("stream")
            .clone()
    }

    #[test]
    fn ids_come_from_the_header_the_payload_or_are_made() {
        let s = stream("streams:\n  - name: s\n");
        let hints = Hints {
            id: Some("from-header".into()),
            ..Hints::default()
        };
        let e = prepare(
            &s,
            texts(vec![json!({"id": "from-payload"})]),
            &hints,
            false,
        )
        .expect("ok");
        assert_eq!(e[0].id, "from-header");
        let e = prepare(
            &s,
            texts(vec![
                json!({"id": "from-payload"}),
                json!({"id": 42}),
                json!({}),
            ]),
            &hints,
            true,
        )
        .expect("ok");
        assert_eq!(e[0].id, "from-payload");
        assert_eq!(e[1].id, "42");
        assert_eq!(
            uuid::Uuid::parse_str(&e[2].id)
                .expect("uuid")
                .get_version_num(),
            7
        );
    }

    #[test]
    fn one_bad_event_rejects_the_batch_and_names_its_position() {
        let s = stream("streams:\n  - name: s\n");
        let err = prepare(
            &s,
            texts(vec![json!({}), json!(3)]),
            &Hints::default(),
            true,
        )
        .expect_err("bad");
        assert_eq!(
            err.to_string(),
            "event 1: an event must be a JSON object, not a number"
        );
        let err = single(&s, json!({"id": {"x": 1}})).expect_err("bad");
        assert!(matches!(err, PublishError::IdNotScalar { .. }));
        let e = single(&s, json!({"id": -7.0})).expect("ok");
        assert_eq!(e[0].id, "-7");
        let beyond = RawValue::from_string(r#"{"id": -9223372036854775809}"#.to_owned());
        let err = prepare(&s, vec![beyond.expect("json")], &Hints::default(), false)
            .expect_err("beyond i64");
        assert!(matches!(err, PublishError::IdNotScalar { .. }));
        let err = single(&s, json!({"id": 7.5})).expect_err("a fraction");
        assert!(matches!(err, PublishError::IdNotScalar { .. }));
        // An integer written with a fraction or an exponent is read from its text, exactly,
        // whether the payload is read as a tree (a key pointer) or not.
        let keyed = stream("streams:\n  - name: k\n    key: /user\n");
        for stream in [&s, &keyed] {
            for (written, id) in [
                ("9007199254740992.0", Some("9007199254740992")),
                ("9007199254740993.0", Some("9007199254740993")),
                ("1.8446744073709551615e19", Some("18446744073709551615")),
                ("-9.223372036854775808E+18", Some("-9223372036854775808")),
                ("1e3", Some("1000")),
                ("12.50e1", Some("125")),
                ("-0.0", Some("0")),
                ("1.8446744073709551616e19", None),
                ("18446744073709551616", None),
                ("1e400", None),
                ("1e-400", None),
                ("125e-1", None),
            ] {
                let body = format!(r#"{{"user": "ann", "id": {written}}}"#);
                let payload = RawValue::from_string(body).expect("json");
                let got = prepare(stream, vec![payload], &Hints::default(), false);
                match (got, id) {
                    (Ok(e), Some(id)) => assert_eq!(e[0].id, id, "{written}"),
                    (Err(PublishError::IdNotScalar { .. }), None) => {}
                    (got, _) => panic!("{written}: {got:?}"),
                }
            }
        }
        let err = single(&s, json!({"id": "a b"})).expect_err("bad");
        assert!(err.to_string().contains("white space"), "{err}");
    }

    #[test]
    fn payloads_are_stored_as_they_came_on_one_line() {
        let s = stream("streams:\n  - name: s\n");
        let keyed = stream("streams:\n  - name: k\n    key: /user\n");
        let body = "{\"z\": 1,\n \"id\": \"a\\u0062\", \"user\": \"ann\"}";
        for stream in [&s, &keyed] {
            let payload = RawValue::from_string(body.to_owned()).expect("json");
            let e = prepare(stream, vec![payload], &Hints::default(), false).expect("ok");
            assert_eq!(e[0].id, "ab", "the id's escapes are read");
            assert_eq!(
                e[0].payload.get(),
                "{\"z\": 1,  \"id\": \"a\\u0062\", \"user\": \"ann\"}"
            );
        }
        for unusable in [json!(null), json!(true), json!([1]), json!({"a": 1})] {
            let err = single(&s, json!({"id": unusable})).expect_err("not an id");
            assert!(matches!(err, PublishError::IdNotScalar { .. }), "{err}");
        }
        let e = single(&s, json!({"id": 18_446_744_073_709_551_615_u64})).expect("ok");
        assert_eq!(e[0].id, "18446744073709551615");
        // An id given twice: the last one, as when the payload is read as a tree.
        let twice = RawValue::from_string(r#"{"id": "first", "id": "last"}"#.to_owned());
        let e = prepare(&s, vec![twice.expect("json")], &Hints::default(), false).expect("ok");
        assert_eq!(e[0].id, "last");
        let err = single(&s, json!([1])).expect_err("an array");
        assert_eq!(
            err.to_string(),
            "an event must be a JSON object, not an array"
        );
    }

    #[test]
    fn a_number_beyond_a_float_is_kept_as_written_unless_a_key_or_schema_must_read_it() {
        let plain = stream("streams:\n  - name: p\n");
        let keyed = stream("streams:\n  - name: k\n    key: /user\n");
        let text = r#"{"user": "ann", "n": 1e400}"#;
        let read = |s: &Stream| {
            let payload = RawValue::from_string(text.to_owned()).expect("json");
            prepare(s, vec![payload], &Hints::default(), false)
        };
        let e = read(&plain).expect("stored as it came");
        assert_eq!(e[0].payload.get(), text);
        let err = read(&keyed).expect_err("the key pointer cannot read it");
        assert!(
            matches!(err, PublishError::NumberOutOfRange { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("64-bit float"), "{err}");
    }

    #[test]
    fn the_key_pointer_keys_events_and_the_hint_only_streams_without_one() {
        let s = stream("streams:\n  - name: s\n    key: /user\n");
        let hints = Hints {
            key: Some("bob".into()),
            ..Hints::default()
        };
        let e = prepare(&s, texts(vec![json!({"user": "ann"})]), &hints, false).expect("ok");
        assert_eq!(e[0].key.as_deref(), Some("ann"));
        let err = prepare(&s, texts(vec![json!({})]), &hints, false).expect_err("no key");
        assert!(matches!(err, PublishError::Key { .. }));
        let plain = stream("streams:\n  - name: p\n");
        let e = prepare(&plain, texts(vec![json!({"user": "ann"})]), &hints, false).expect("ok");
        assert_eq!(e[0].key.as_deref(), Some("bob"));
    }

    #[test]
    fn schema_errors_name_the_path_and_the_rule() {
        let s = stream(
            "streams:\n  - name: points\n    schema:\n      type: object\n      required: [lat]\n      properties:\n        lat: {type: number, minimum: -90, maximum: 90}\n",
        );
        assert!(single(&s, json!({"lat": 45.5})).is_ok());
        let err = single(&s, json!({"lat": 91})).expect_err("bad");
        let PublishError::Schema(violation) = &err else {
            panic!("not a schema error: {err}")
        };
        assert_eq!(violation.path, "/lat");
        assert!(violation.rule.ends_with("/maximum"), "{}", violation.rule);
        let err = single(&s, json!({})).expect_err("bad");
        assert!(err.to_string().contains("required"), "{err}");
    }

    #[test]
    fn invalid_schemas_are_refused_at_start() {
        let settings =
            PipelineSettings::from_yaml("streams:\n  - name: s\n    schema: {type: 12}\n")
                .expect("yaml");
        let err = Streams::new(&settings).err().expect("invalid schema");
        assert!(err.to_string().contains("stream \"s\""), "{err}");
    }
}
