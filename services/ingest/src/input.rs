//! Request bodies into payloads: one JSON object, a JSON array of objects (a batch), or
//! NDJSON (one object per line, `Content-Type: application/x-ndjson`).
//!
//! Parsing happens before anything is published, so a malformed body changes nothing.
//! Each event is checked to be JSON and kept as the JSON text it came as; a tree of it is
//! built only where a stream needs one (a schema, a key pointer).

use serde_json::value::RawValue;

use crate::error::ApiError;

/// The payloads of a body, and whether they came as a batch.
#[derive(Debug)]
pub struct Payloads {
    /// The events, each as its JSON text.
    pub events: Vec<Box<RawValue>>,
    /// True for an array or NDJSON, whose errors name each event's position.
    pub batch: bool,
}

/// Whether a content type announces NDJSON.
pub fn is_ndjson(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|ct| ct.split(';').next())
        .map(str::trim)
        .is_some_and(|ct| {
            [
                "application/x-ndjson",
                "application/jsonl",
                "application/ndjson",
            ]
            .iter()
            .any(|t| ct.eq_ignore_ascii_case(t))
        })
}

/// Parses `body`; at most `max_events` events are allowed.
pub fn parse(body: &[u8], ndjson: bool, max_events: usize) -> Result<Payloads, ApiError> {
    if ndjson {
        let mut events = Vec::new();
        for (n, line) in body.split(|b| *b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if events.len() == max_events {
                let total = events.len()
                    + 1
                    + body[..]
                        .split(|b| *b == b'\n')
                        .skip(n + 1)
                        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                        .count();
                return Err(ApiError::TooManyEvents(total, max_events));
            }
            events.push(serde_json::from_slice(line).map_err(|source| {
                ApiError::MalformedLine {
                    line: n + 1,
                    source,
                }
            })?);
        }
        if events.is_empty() {
            return Err(ApiError::Empty);
        }
        return Ok(Payloads {
            events,
            batch: true,
        });
    }
    if body.trim_ascii_start().starts_with(b"[") {
        let events: Vec<Box<RawValue>> =
            serde_json::from_slice(body).map_err(ApiError::MalformedJson)?;
        if events.is_empty() {
            return Err(ApiError::Empty);
        }
        if events.len() > max_events {
            return Err(ApiError::TooManyEvents(events.len(), max_events));
        }
        return Ok(Payloads {
            events,
            batch: true,
        });
    }
    let single = serde_json::from_slice(body).map_err(ApiError::MalformedJson)?;
    Ok(Payloads {
        events: vec![single],
        batch: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(p: &Payloads) -> Vec<&str> {
        p.events.iter().map(|e| e.get()).collect()
    }

    #[test]
    fn one_object_an_array_or_ndjson() {
        let single = parse(b" {\"a\": 1}\n", false, 10).expect("ok");
        assert_eq!(texts(&single), [r#"{"a": 1}"#]);
        assert!(!single.batch);
        let array = parse(b" [{\"a\":1}, {\"a\":2}]", false, 10).expect("ok");
        assert_eq!(texts(&array), [r#"{"a":1}"#, r#"{"a":2}"#]);
        assert!(array.batch);
        let nd = parse(b"{\"a\":1}\r\n\n{\"a\":2}\n", true, 10).expect("ok");
        assert_eq!(texts(&nd), [r#"{"a":1}"#, r#"{"a":2}"#]);
        assert!(nd.batch);
        assert_eq!(texts(&parse(b"3", false, 10).expect("ok")), ["3"]);
    }

    #[test]
    fn errors_say_where() {
        let err = parse(b"{\"a\":1}\n{\"a\":\n", true, 10).expect_err("bad line");
        assert!(
            err.to_string().starts_with("line 2 of the NDJSON body"),
            "{err}"
        );
        assert!(matches!(parse(b"[]", false, 10), Err(ApiError::Empty)));
        assert!(matches!(parse(b"\n\n", true, 10), Err(ApiError::Empty)));
        assert!(matches!(
            parse(b"[{},{},{}]", false, 2),
            Err(ApiError::TooManyEvents(3, 2))
        ));
        assert!(matches!(
            parse(b"{}\n{}\n{}\n", true, 2),
            Err(ApiError::TooManyEvents(3, 2))
        ));
        assert!(matches!(
            parse(b"{", false, 2),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(matches!(
            parse(b"[{},", false, 2),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(matches!(
            parse(b"{} {}", false, 2),
            Err(ApiError::MalformedJson(_))
        ));
    }

    #[test]
    fn ndjson_content_types() {
        assert!(is_ndjson(Some("application/x-ndjson")));
        assert!(is_ndjson(Some("application/x-ndjson; charset=utf-8")));
        assert!(is_ndjson(Some("application/jsonl")));
        assert!(is_ndjson(Some(" Application/X-NDJSON ;charset=utf-8")));
        assert!(!is_ndjson(Some("application/json")));
        assert!(!is_ndjson(None));
    }
}
