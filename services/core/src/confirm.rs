//! Sink confirmations: how a collector tells the ingest instance that published an event
//! that the event is in the sink (`ack=sink`), or that it was dead-lettered.
//!
//! Ingest marks each event whose client waits for its sink with the Kafka header
//! [`HEADER`], `<instance> <token>`: the ingest instance (unique per process) and a number
//! that instance gave the event. The header travels with the event through the retry
//! topic. A collector that wrote the event, or sent it to the dead-letter topic, appends a
//! [`Confirmation`] to the Redis stream [`key`] of that instance (`XADD` with a length
//! cap and an expiry); the instance reads its own stream and answers the waiting client.
//!
//! Every collector group that writes the event confirms it, each under its own name;
//! which of them a client waits for is the stream's `ackBy` setting.

use std::time::Duration;

/// The Kafka header of an event whose publisher waits for its sink.
pub const HEADER: &str = "sluice-ack";

/// Most entries kept in one instance's confirmation stream (`XADD ... MAXLEN ~`).
pub const STREAM_MAX_LEN: usize = 100_000;

/// How long an instance's confirmation stream lives after its last entry.
pub const STREAM_TTL: Duration = Duration::from_secs(600);

/// Longest instance name.
const MAX_INSTANCE_LEN: usize = 100;

/// The Redis stream of confirmations for the ingest `instance`: `<prefix>:#acks:<instance>`
/// ('#' is in no stream name, so no record key is ever the same).
pub fn key(prefix: &str, instance: &str) -> String {
    format!("{prefix}:#acks:{instance}")
}

/// Whether `name` can name an ingest instance: 1 to 100 ASCII letters, digits, '.', '_'
/// and '-'.
pub fn valid_instance(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_INSTANCE_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The header value for the event numbered `token` by `instance`.
pub fn header_value(instance: &str, token: u64) -> String {
    format!("{instance} {token}")
}

/// The instance and token of a header value; `None` when it is not one.
pub fn parse_header(value: &str) -> Option<(&str, u64)> {
    let (instance, token) = value.split_once(' ')?;
    valid_instance(instance)
        .then_some(())
        .and_then(|()| token.parse().ok())
        .map(|t| (instance, t))
}

/// What became of an event in one collector group's sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sink holds it.
    Written,
    /// It went to the dead-letter topic, for this reason.
    DeadLettered(String),
}

/// One entry of an instance's confirmation stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    /// The number the instance gave the event.
    pub token: u64,
    /// The collector group that confirms.
    pub group: String,
    /// The event's id, for logs.
    pub id: String,
    /// Written or dead-lettered.
    pub outcome: Outcome,
}

impl Confirmation {
    /// The stream entry's fields and values.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("t", self.token.to_string()),
            ("g", self.group.clone()),
            ("id", self.id.clone()),
        ];
        if let Outcome::DeadLettered(reason) = &self.outcome {
            fields.push(("err", reason.clone()));
        }
        fields
    }

    /// A confirmation from a stream entry's fields; `None` when they do not make one.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Self> {
        let (mut token, mut group, mut id, mut error) = (None, None, String::new(), None);
        for (k, v) in fields {
            match k {
                "t" => token = v.parse().ok(),
                "g" => group = Some(v.to_owned()),
                "id" => id = v.to_owned(),
                "err" => error = Some(v.to_owned()),
                _ => {}
            }
        }
        Some(Self {
            token: token?,
            group: group?,
            id,
            outcome: error.map_or(Outcome::Written, Outcome::DeadLettered),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_name_the_instance_and_the_token() {
        let v = header_value("ingest-7f3a", 42);
        assert_eq!(parse_header(&v), Some(("ingest-7f3a", 42)));
        assert_eq!(parse_header("ingest"), None);
        assert_eq!(
            parse_header("a:b 1"),
            None,
            "':' would reach into other keys"
        );
        assert_eq!(parse_header("a x"), None);
        assert_eq!(key("sluice", "a"), "sluice:#acks:a");
    }

    #[test]
    fn confirmations_round_trip_through_fields() {
        for outcome in [Outcome::Written, Outcome::DeadLettered("bad year".into())] {
            let c = Confirmation {
                token: 7,
                group: "g".into(),
                id: "e1".into(),
                outcome,
            };
            let fields = c.fields();
            let back = Confirmation::from_fields(fields.iter().map(|(k, v)| (*k, v.as_str())));
            assert_eq!(back, Some(c));
        }
        assert_eq!(Confirmation::from_fields([("g", "x")]), None);
    }
}
