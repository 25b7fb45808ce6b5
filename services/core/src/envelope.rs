//! The event envelope: what every event looks like on Kafka and in the stores.
//!
//! An [`Envelope`] travels as one Kafka record:
//!
//! - the Kafka **key** is the event key (for example the chat recipient), so all events of
//!   one key land in one partition and keep their order; events without a key have none;
//! - the Kafka **value** is the JSON object `{"id", "stream", "key", "event_time",
//!   "ingest_time", "payload"}` ([`Envelope::encode_value`]), which is also what sinks store;
//! - the Kafka **headers** are the envelope's headers, among them the W3C `traceparent`.
//!
//! [`Envelope::encode_value`] and [`Envelope::decode`] are the only encode and decode of an
//! event; everything else goes through them.

use std::collections::BTreeMap;

use jiff::Timestamp;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

/// The longest event id accepted, in characters.
pub const MAX_ID_LEN: usize = 128;

/// One event, as ingest publishes it and collectors consume it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique id: given by the client, or a UUIDv7 assigned at ingest.
    pub id: String,
    /// The stream the event belongs to.
    pub stream: String,
    /// The partition key, when the stream defines one or the client sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When the event happened, as the client says; the ingest time when it says nothing.
    pub event_time: Timestamp,
    /// When ingest accepted the event.
    pub ingest_time: Timestamp,
    /// The event itself: the JSON the client sent, kept as JSON text. Decoding an
    /// envelope checks that it is JSON without building a tree of it; sinks that store the
    /// event copy the text, and [`Envelope::payload_value`] parses it where fields are
    /// needed.
    pub payload: Box<RawValue>,
    /// Headers carried as Kafka headers (for example `traceparent`); not part of the value.
    #[serde(skip)]
    pub headers: BTreeMap<String, String>,
}

/// Why bytes from Kafka are not an event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The record has no value.
    #[error("the record has no value")]
    Empty,
    /// The value is not UTF-8 text (JSON is).
    #[error("the value is not a Sluice event envelope: it is not UTF-8 text ({0})")]
    Utf8(#[from] std::str::Utf8Error),
    /// The value is not a JSON envelope.
    #[error("the value is not a Sluice event envelope: {0}")]
    Json(#[from] serde_json::Error),
    /// A field is out of bounds.
    #[error("invalid event envelope: {0}")]
    Invalid(#[from] InvalidId),
}

/// Why a string cannot be an event id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    /// The id is empty.
    #[error("the event id is empty")]
    Empty,
    /// The id is longer than [`MAX_ID_LEN`].
    #[error("the event id is {0} characters long; at most {MAX_ID_LEN} are allowed")]
    TooLong(usize),
    /// The id holds a control character or white space.
    #[error("the event id may not contain white space or control characters")]
    BadCharacter,
}

/// Checks that `id` can serve as an event id: 1 to [`MAX_ID_LEN`] characters, no white space
/// and no control characters (ids become parts of store keys and file names).
pub fn validate_id(id: &str) -> Result<(), InvalidId> {
    if id.is_empty() {
        return Err(InvalidId::Empty);
    }
    // Most ids are ASCII (UUIDs): counted and checked byte by byte, in one pass without
    // branches. For ASCII, Unicode's white space and control characters are the bytes up to
    // the space, and DEL.
    let (length, bad) = if id.is_ascii() {
        let bad = id
            .bytes()
            .fold(false, |bad, b| bad | (b <= b' ') | (b == 0x7f));
        (id.len(), bad)
    } else {
        let bad = id.chars().any(|c| c.is_whitespace() || c.is_control());
        (id.chars().count(), bad)
    };
    if length > MAX_ID_LEN {
        return Err(InvalidId::TooLong(length));
    }
    if bad {
        return Err(InvalidId::BadCharacter);
    }
    Ok(())
}

/// `value` as JSON text.
fn raw(value: &Value) -> Box<RawValue> {
    // A `Value` always serializes, to valid JSON.
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// `payload` on one line: JSON text over several lines has its line breaks turned into
/// spaces, so that a stored event never spans lines. Nothing else of the text changes: a
/// JSON string cannot hold a raw line break, so every one is white space between tokens.
pub fn one_line(payload: Box<RawValue>) -> Box<RawValue> {
    if memchr::memchr2(b'\n', b'\r', payload.get().as_bytes()).is_none() {
        return payload;
    }
    let flat = payload.get().replace(['\n', '\r'], " ");
    RawValue::from_string(flat).unwrap_or(payload)
}

/// Appends `text` as a JSON string.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    // Writing a string to a vector cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// A new time-ordered event id (UUIDv7).
pub fn new_id() -> String {
    let mut text = Uuid::encode_buffer();
    Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut text)
        .to_owned()
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.stream == other.stream
            && self.key == other.key
            && self.event_time == other.event_time
            && self.ingest_time == other.ingest_time
            && self.payload.get() == other.payload.get()
            && self.headers == other.headers
    }
}

impl Envelope {
    /// A new event for `stream` with a fresh id, ingested now.
    pub fn new(stream: impl Into<String>, key: Option<String>, payload: Value) -> Self {
        Self::with_payload(None, stream, key, raw(&payload))
    }

    /// Like [`Envelope::new`], with `id` (a fresh one when `None`) and the payload as JSON
    /// text, kept as it is but on one line ([`one_line`]).
    pub fn with_payload(
        id: Option<String>,
        stream: impl Into<String>,
        key: Option<String>,
        payload: Box<RawValue>,
    ) -> Self {
        let now = Timestamp::now();
        Self {
            id: id.unwrap_or_else(new_id),
            stream: stream.into(),
            key,
            event_time: now,
            ingest_time: now,
            payload: one_line(payload),
            headers: BTreeMap::new(),
        }
    }

    /// The payload as a JSON tree (parsed from its text on every call).
    pub fn payload_value(&self) -> Value {
        // The text was checked to be JSON when the envelope was made or decoded.
        serde_json::from_str(self.payload.get()).unwrap_or(Value::Null)
    }

    /// The Kafka value: the envelope as JSON, without the headers.
    pub fn encode_value(&self) -> Vec<u8> {
        use std::io::Write as _;
        // What `serde_json::to_vec(self)` writes (a unit test holds them equal), with a
        // timestamp printed once when both are the same, as they are for events ingest makes.
        let size = self.id.len()
            + self.stream.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.payload.get().len()
            + 128;
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(b"{\"id\":");
        push_json_str(&mut out, &self.id);
        out.extend_from_slice(b",\"stream\":");
        push_json_str(&mut out, &self.stream);
        if let Some(key) = &self.key {
            out.extend_from_slice(b",\"key\":");
            push_json_str(&mut out, key);
        }
        // RFC 3339 text needs no escaping; writing to a vector cannot fail.
        out.extend_from_slice(b",\"event_time\":\"");
        let start = out.len();
        let _ = write!(out, "{}", self.event_time);
        let end = out.len();
        out.extend_from_slice(b"\",\"ingest_time\":\"");
        if self.ingest_time == self.event_time {
            out.extend_from_within(start..end);
        } else {
            let _ = write!(out, "{}", self.ingest_time);
        }
        out.extend_from_slice(b"\",\"payload\":");
        out.extend_from_slice(self.payload.get().as_bytes());
        out.push(b'}');
        out
    }

    /// The Kafka headers of this event.
    pub fn kafka_headers(&self) -> OwnedHeaders {
        self.headers.iter().fold(
            OwnedHeaders::new_with_capacity(self.headers.len()),
            |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            },
        )
    }

    /// Decodes an event from a Kafka value and its headers. Headers that are not UTF-8
    /// are left out. Fields the envelope does not have are ignored.
    pub fn decode<H: Headers>(
        value: Option<&[u8]>,
        headers: Option<&H>,
    ) -> Result<Self, DecodeError> {
        Self::decode_verbatim(value, headers).map(|(envelope, _)| envelope)
    }

    /// Decodes like [`Envelope::decode`], and tells whether the value holds the envelope's
    /// fields and nothing else, on one line. Such a value (what [`Envelope::encode_value`]
    /// makes, and so what ingest publishes) can be stored as it is in place of encoding the
    /// event again.
    pub fn decode_verbatim<H: Headers>(
        value: Option<&[u8]>,
        headers: Option<&H>,
    ) -> Result<(Self, bool), DecodeError> {
        let value = value.filter(|v| !v.is_empty()).ok_or(DecodeError::Empty)?;
        // Checked as UTF-8 once, in one pass, rather than string by string as it is parsed.
        let text = std::str::from_utf8(value)?;
        let one_line_value = memchr::memchr2(b'\n', b'\r', value).is_none();
        let exact = Exact::from_layout(text)
            .or_else(|| serde_json::from_str::<Exact<'_>>(text).ok())
            .and_then(Exact::into_envelope);
        let (mut envelope, verbatim) = match exact {
            Some(envelope) => (envelope, one_line_value),
            // Other fields as well, or not an event at all: the lenient decode says which.
            None => (serde_json::from_str::<Envelope>(text)?, false),
        };
        if !one_line_value {
            // Written by another producer over several lines: stored on one.
            envelope.payload = one_line(envelope.payload);
        }
        validate_id(&envelope.id)?;
        if let Some(headers) = headers {
            for header in headers.iter() {
                if let Some(v) = header.value.and_then(|v| std::str::from_utf8(v).ok()) {
                    envelope.headers.insert(header.key.to_owned(), v.to_owned());
                }
            }
        }
        Ok((envelope, verbatim))
    }
}

/// The envelope's fields and no others: what [`Envelope::decode_verbatim`] tries first.
/// The timestamps are read as text (RFC 3339 needs no escapes) so that the second is not
/// parsed again when it is the same, as it is for events ingest makes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Exact<'a> {
    id: String,
    stream: String,
    #[serde(default)]
    key: Option<String>,
    event_time: &'a str,
    ingest_time: &'a str,
    payload: Box<RawValue>,
}

/// The text of a JSON string that `rest` starts with (its opening quote already read) and
/// the text after its closing quote; `None` when it holds an escape or a control character.
fn plain_string(rest: &str) -> Option<(&str, &str)> {
    let end = memchr::memchr(b'"', rest.as_bytes())?;
    let text = &rest.as_bytes()[..end];
    // One pass without branches over the text (short: an id, a name, a timestamp).
    let plain = !text
        .iter()
        .fold(false, |bad, &b| bad | (b < 0x20) | (b == b'\\'));
    plain.then(|| (&rest[..end], &rest[end + 1..]))
}

impl<'a> Exact<'a> {
    /// Reads a value laid out as [`Envelope::encode_value`] writes it (the envelope's fields
    /// in its order, no white space between them, strings without escapes) without going
    /// through a general JSON parser for the fields; the payload is checked to be one JSON
    /// value all the same. `None` for any other text, which serde reads.
    fn from_layout(text: &'a str) -> Option<Self> {
        let (id, rest) = plain_string(text.strip_prefix("{\"id\":\"")?)?;
        let (stream, rest) = plain_string(rest.strip_prefix(",\"stream\":\"")?)?;
        let (key, rest) = match rest.strip_prefix(",\"key\":\"") {
            Some(rest) => {
                let (key, rest) = plain_string(rest)?;
                (Some(key), rest)
            }
            None => (None, rest),
        };
        let (event_time, rest) = plain_string(rest.strip_prefix(",\"event_time\":\"")?)?;
        let (ingest_time, rest) = plain_string(rest.strip_prefix(",\"ingest_time\":\"")?)?;
        let payload = rest.strip_prefix(",\"payload\":")?.strip_suffix('}')?;
        let payload = serde_json::from_str::<Box<RawValue>>(payload).ok()?;
        Some(Exact {
            id: id.to_owned(),
            stream: stream.to_owned(),
            key: key.map(str::to_owned),
            event_time,
            ingest_time,
            payload,
        })
    }

    /// The envelope, or `None` when a timestamp is not one (the lenient decode says why).
    fn into_envelope(self) -> Option<Envelope> {
        let event_time: Timestamp = self.event_time.parse().ok()?;
        let ingest_time = if self.ingest_time == self.event_time {
            event_time
        } else {
            self.ingest_time.parse().ok()?
        };
        Some(Envelope {
            id: self.id,
            stream: self.stream,
            key: self.key,
            event_time,
            ingest_time,
            payload: self.payload,
            headers: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Envelope {
        let mut e = Envelope::new("visit", Some("user-7".into()), json!({"page": "/", "n": 3}));
        e.headers.insert(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        e
    }

    #[test]
    fn round_trips_through_value_and_headers() {
        let e = sample();
        let value = e.encode_value();
        let headers = e.kafka_headers();
        let back = Envelope::decode(Some(&value), Some(&headers)).expect("decodes");
        assert_eq!(back, e);
    }

    #[test]
    fn value_is_plain_json_without_headers() {
        let e = sample();
        let v: Value = serde_json::from_slice(&e.encode_value()).expect("json");
        assert_eq!(v["id"], json!(e.id));
        assert_eq!(v["stream"], json!("visit"));
        assert_eq!(v["key"], json!("user-7"));
        assert_eq!(v["payload"], json!({"page": "/", "n": 3}));
        assert!(v["event_time"].as_str().expect("string").ends_with('Z'));
        assert!(v.get("headers").is_none());
    }

    #[test]
    fn a_value_is_verbatim_only_with_the_envelopes_fields_on_one_line() {
        let e = sample();
        let value = e.encode_value();
        let none = None::<&OwnedHeaders>;
        let (back, verbatim) = Envelope::decode_verbatim(Some(&value), none).expect("decodes");
        assert!(verbatim);
        assert_eq!(back.payload.get(), e.payload.get());
        let mut tree: Value = serde_json::from_slice(&value).expect("json");
        let pretty = serde_json::to_vec_pretty(&tree).expect("pretty");
        let (back, verbatim) = Envelope::decode_verbatim(Some(&pretty), none).expect("decodes");
        assert!(!verbatim, "a value over several lines is not one line");
        assert_eq!(back.id, e.id);
        assert!(
            !back.encode_value().contains(&b'\n'),
            "its payload is stored on one line"
        );
        assert_eq!(back.payload_value(), e.payload_value());
        tree["partition"] = json!(3);
        let extra = serde_json::to_vec(&tree).expect("json");
        let (back, verbatim) = Envelope::decode_verbatim(Some(&extra), none).expect("decodes");
        assert!(
            !verbatim,
            "a value with other fields is not the envelope alone"
        );
        assert_eq!(back.id, e.id);
        let err = Envelope::decode_verbatim(Some(br#"{"id":"x"}"#), none).expect_err("no stream");
        assert!(err.to_string().contains("missing field `stream`"), "{err}");
    }

    /// The layout read and serde's read of the same text agree wherever the layout read
    /// takes it: the encodings of events with and without a key, and each of them with a
    /// byte taken out or one of JSON's structural characters put in at every position.
    #[test]
    fn the_layout_read_agrees_with_serde() {
        let serde_read = |text: &str| {
            serde_json::from_str::<Exact<'_>>(text)
                .ok()
                .and_then(Exact::into_envelope)
        };
        let mut keyless = Envelope::new("s", None, json!({"a": [1, "x\\\"y"], "b": {}}));
        keyless.ingest_time = "2026-01-02T03:04:05.5Z".parse().expect("timestamp");
        let mut taken = 0;
        for e in [sample(), keyless] {
            let text = String::from_utf8(e.encode_value()).expect("utf-8");
            let mut variants = vec![text.clone()];
            for at in (0..=text.len()).filter(|at| text.is_char_boundary(*at)) {
                for put in ["\"", "\\", " ", "\n", "}", "{", ",", ":", "\u{1}"] {
                    variants.push(format!("{}{put}{}", &text[..at], &text[at..]));
                }
                if at < text.len() {
                    variants.push(format!("{}{}", &text[..at], &text[at + 1..]));
                }
            }
            for variant in &variants {
                if let Some(exact) = Exact::from_layout(variant) {
                    taken += 1;
                    let fast = exact.into_envelope();
                    assert_eq!(fast, serde_read(variant), "{variant}");
                }
            }
            let back = Exact::from_layout(&text).and_then(Exact::into_envelope);
            assert_eq!(
                back,
                Some(Envelope {
                    headers: BTreeMap::new(),
                    ..e
                })
            );
        }
        assert!(taken > 2, "the layout read took {taken} texts");
    }

    #[test]
    fn timestamps_are_read_whether_equal_or_not() {
        let none = None::<&OwnedHeaders>;
        let mut e = sample();
        e.event_time = "2026-01-02T03:04:05.5Z".parse().expect("timestamp");
        let (back, verbatim) =
            Envelope::decode_verbatim(Some(&e.encode_value()), none).expect("decodes");
        assert!(verbatim);
        assert_eq!(
            back,
            Envelope {
                headers: BTreeMap::new(),
                ..e.clone()
            }
        );
        e.ingest_time = e.event_time;
        let (back, _) = Envelope::decode_verbatim(Some(&e.encode_value()), none).expect("decodes");
        assert_eq!(back.ingest_time, e.event_time);
        // Escaped text is still a timestamp, read by the lenient decode.
        let escaped = String::from_utf8(e.encode_value())
            .expect("utf-8")
            .replacen("\"2026-01", "\"\\u0032026-01", 1);
        let (back, verbatim) =
            Envelope::decode_verbatim(Some(escaped.as_bytes()), none).expect("decodes");
        assert!(!verbatim);
        assert_eq!(back.event_time, e.event_time);
        let bad = String::from_utf8(e.encode_value())
            .expect("utf-8")
            .replacen("2026-01-02T", "2026-13-02T", 1);
        let err = Envelope::decode_verbatim(Some(bad.as_bytes()), none).expect_err("no month 13");
        assert!(
            err.to_string().contains("event_time") || err.to_string().contains("month"),
            "{err}"
        );
    }

    #[test]
    fn keyless_events_have_no_key_field() {
        let e = Envelope::new("s", None, json!({}));
        let v: Value = serde_json::from_slice(&e.encode_value()).expect("json");
        assert!(v.get("key").is_none());
        let back =
            Envelope::decode::<OwnedHeaders>(Some(&e.encode_value()), None).expect("decodes");
        assert_eq!(back.key, None);
    }

    #[test]
    fn rejects_what_is_not_an_envelope() {
        assert!(matches!(
            Envelope::decode::<OwnedHeaders>(None, None),
            Err(DecodeError::Empty)
        ));
        assert!(matches!(
            Envelope::decode::<OwnedHeaders>(Some(b"{not json"), None),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            Envelope::decode::<OwnedHeaders>(Some(br#"{"id":"1"}"#), None),
            Err(DecodeError::Json(_))
        ));
        let err = Envelope::decode::<OwnedHeaders>(Some(b"{\"id\":\"\xff\"}"), None)
            .expect_err("not UTF-8");
        assert!(matches!(err, DecodeError::Utf8(_)), "{err:?}");
        assert!(err.to_string().contains("not UTF-8"), "{err}");
        let mut e = sample();
        e.id = "has space".into();
        assert!(matches!(
            Envelope::decode::<OwnedHeaders>(Some(&e.encode_value()), None),
            Err(DecodeError::Invalid(InvalidId::BadCharacter))
        ));
    }

    #[test]
    fn ids_are_bounded() {
        assert_eq!(validate_id(""), Err(InvalidId::Empty));
        assert_eq!(validate_id(&"x".repeat(MAX_ID_LEN)), Ok(()));
        assert_eq!(
            validate_id(&"x".repeat(MAX_ID_LEN + 1)),
            Err(InvalidId::TooLong(MAX_ID_LEN + 1))
        );
        assert_eq!(validate_id("a\nb"), Err(InvalidId::BadCharacter));
        assert_eq!(validate_id("order-42:v1"), Ok(()));
        assert_eq!(validate_id("a\u{b}b"), Err(InvalidId::BadCharacter));
        assert_eq!(validate_id("a\u{7f}"), Err(InvalidId::BadCharacter));
        for c in (0u8..128).map(char::from) {
            let refused = c.is_whitespace() || c.is_control();
            assert_eq!(
                validate_id(&format!("a{c}b")).is_err(),
                refused,
                "{c:?} is refused exactly when it is white space or a control character"
            );
        }
        assert_eq!(validate_id("caf\u{e9}\u{a0}"), Err(InvalidId::BadCharacter));
        assert_eq!(validate_id(&"\u{e9}".repeat(MAX_ID_LEN)), Ok(()));
        assert_eq!(
            validate_id(&"\u{e9}".repeat(MAX_ID_LEN + 1)),
            Err(InvalidId::TooLong(MAX_ID_LEN + 1))
        );
    }

    #[test]
    fn the_value_is_what_serde_writes() {
        let mut e = sample();
        let serde = |e: &Envelope| serde_json::to_vec(e).expect("json");
        assert_eq!(e.encode_value(), serde(&e));
        e.key = None;
        e.id = "quote\"back\\slash\u{7f}é\u{1F600}".to_owned();
        e.stream = "tab\there".to_owned();
        assert_eq!(e.encode_value(), serde(&e));
        e.key = Some("\u{1}".to_owned());
        e.event_time = "2026-01-01T00:00:00Z".parse().expect("timestamp");
        e.ingest_time = "2026-01-01T00:00:00.5Z".parse().expect("timestamp");
        assert_eq!(e.encode_value(), serde(&e));
        e.ingest_time = e.event_time;
        assert_eq!(e.encode_value(), serde(&e));
    }

    #[test]
    fn a_payload_over_several_lines_is_kept_on_one() {
        let text = "{\"a\": [1,\r\n  2],\n \"b\": \"x\\ny\"}";
        let payload = RawValue::from_string(text.to_owned()).expect("json");
        let e = Envelope::with_payload(None, "s", None, payload);
        assert_eq!(e.payload.get(), "{\"a\": [1,    2],  \"b\": \"x\\ny\"}");
        assert_eq!(e.payload_value(), json!({"a": [1, 2], "b": "x\ny"}));
        let compact = RawValue::from_string(r#"{"b":1,"a":2}"#.to_owned()).expect("json");
        let e = Envelope::with_payload(Some("x".to_owned()), "s", None, compact);
        assert_eq!(e.id, "x");
        assert_eq!(e.payload.get(), r#"{"b":1,"a":2}"#, "kept as it came");
    }

    #[test]
    fn new_ids_are_time_ordered_uuids() {
        let a = new_id();
        let b = new_id();
        assert_eq!(Uuid::parse_str(&a).expect("uuid").get_version_num(), 7);
        assert!(a < b, "{a} sorts before {b}");
    }
}
