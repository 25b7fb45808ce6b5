//! Pipeline settings: the streams of a pipeline and their topics.
//!
//! Every service reads the same YAML file (locally a path given by `--settings`; in a
//! cluster the operator renders it into a ConfigMap from the `PipelineConfig`):
//!
//! ```yaml
//! streams:
//!   - name: visit          # the stream, as it appears in URLs
//!     topic: visit         # the Kafka topic; defaults to the stream name
//!     partitions: 6        # partitions when the topic is created; defaults to 1
//!     key: /userId         # optional JSON pointer to the partition key in the payload
//!     readTopic: visit.reads  # where GET publishes read events; defaults to <topic>.reads
//!     schema:              # optional JSON Schema every event must satisfy
//!       type: object
//!       required: [userId]
//!     ackBy: [visit-redis]  # collector groups that confirm `ack=sink`; any one when absent
//!     store: {kind: mysql, table: records}  # where ingest reads records; Redis when absent
//! ```
//!
//! [`PipelineSettings::from_yaml`] is a pure function from text to checked settings: unknown
//! fields, duplicate names and invalid topic names are errors that say what is wrong.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The longest Kafka topic name Kafka accepts.
const MAX_TOPIC_LEN: usize = 249;

/// The settings of one pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// The streams events can be sent to.
    pub streams: Vec<StreamSettings>,
    /// What collectors do with a write that keeps failing.
    #[serde(default)]
    pub retry: RetrySettings,
    /// How long the Redis sink keeps its per-minute counts and their hourly roll-ups.
    #[serde(default)]
    pub aggregates: AggregateSettings,
}

/// Retention of the Redis sink's aggregates: the per-minute counts serve short ranges, the
/// hourly roll-ups long ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AggregateSettings {
    /// How long a minute's counts are kept, such as `168h` (the default, a week).
    #[serde(default = "default_minute_retention")]
    pub minute_retention: String,
    /// How long an hour's counts are kept, such as `2160h` (the default, 90 days).
    #[serde(default = "default_hour_retention")]
    pub hour_retention: String,
}

fn default_minute_retention() -> String {
    "168h".to_owned()
}

fn default_hour_retention() -> String {
    "2160h".to_owned()
}

impl Default for AggregateSettings {
    fn default() -> Self {
        Self {
            minute_retention: default_minute_retention(),
            hour_retention: default_hour_retention(),
        }
    }
}

impl AggregateSettings {
    /// How long a minute's counts are kept.
    pub fn minute_ttl(&self) -> std::time::Duration {
        parse_duration(&self.minute_retention)
            .unwrap_or(std::time::Duration::from_secs(7 * 24 * 3600))
    }

    /// How long an hour's counts are kept.
    pub fn hour_ttl(&self) -> std::time::Duration {
        parse_duration(&self.hour_retention)
            .unwrap_or(std::time::Duration::from_secs(90 * 24 * 3600))
    }
}

/// Retries of failed sink writes: `<topic>.retry` until the last attempt, then
/// `<topic>.dlq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySettings {
    /// Attempts in all, the first write included, before an event goes to the dead-letter
    /// topic.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the first retry, as `500ms`, `1s` or `2m`; it doubles with each attempt.
    #[serde(default = "default_backoff")]
    pub backoff: String,
}

fn default_max_attempts() -> u32 {
    5
}

fn default_backoff() -> String {
    "1s".to_owned()
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            backoff: default_backoff(),
        }
    }
}

impl RetrySettings {
    /// The wait before retry number `attempt` (1 for the first retry): the backoff doubled
    /// `attempt - 1` times, at most five minutes.
    pub fn delay(&self, attempt: u32) -> std::time::Duration {
        let base = parse_duration(&self.backoff).unwrap_or(std::time::Duration::from_secs(1));
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
        base.saturating_mul(factor)
            .min(std::time::Duration::from_secs(300))
    }
}

/// A command-line duration (`500ms`, `10s`, `5m`, `1h`), for clap's `value_parser`.
pub fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration such as 500ms, 10s, 5m or 1h"))
}

/// Parses `500ms`, `1s`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(std::time::Duration::from_millis(n)),
        "s" => Some(std::time::Duration::from_secs(n)),
        "m" => Some(std::time::Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(std::time::Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

/// One stream: where its events go and how they are keyed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StreamSettings {
    /// Name of the stream, used in URLs and store keys.
    pub name: String,
    /// Kafka topic of the stream; the stream name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Number of partitions used when the topic is created.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// JSON pointer (RFC 6901) to the partition key inside the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Topic the read path publishes read events to; `<topic>.reads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_topic: Option<String>,
    /// JSON Schema that every event of the stream must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// JSON pointers of payload fields counted per minute, per value, by the Redis sink
    /// (for example `/type` for visits by type).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimensions: Vec<String>,
    /// The collector groups whose sinks must hold an event before an `ack=sink` request
    /// is answered; when empty, the first group that writes it answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ack_by: Vec<String>,
    /// Where ingest reads the stream's records (GET, the TCP read port): Redis when
    /// absent, or the SQL table a collector writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<RecordStore>,
}

/// A SQL table a collector writes a stream's records to, for ingest to read them back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RecordStore {
    /// The database: `postgres` or `mysql` (ingest's `--database-url` says where).
    pub kind: StoreKind,
    /// The table, as the collector's `--table` (`sluice_events` by default).
    #[serde(default = "default_table")]
    pub table: String,
}

/// The databases a stream's records can be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
}

/// The SQL sinks' default table.
pub const DEFAULT_TABLE: &str = "sluice_events";

fn default_table() -> String {
    DEFAULT_TABLE.to_owned()
}

/// Why a table name of the SQL sinks is refused, if it is: 1 to 63 lowercase letters,
/// digits or '_', starting with a letter or '_' (it is written into SQL statements).
pub fn check_table(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "table name {name:?} must be 1 to 63 lowercase letters, digits or '_', starting with a letter or '_'"
        ))
    }
}

fn default_partitions() -> i32 {
    1
}

/// Why a settings file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("cannot read pipeline settings {path}: {source}")]
    Read {
        /// The path that was read.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid settings YAML.
    #[error("pipeline settings are not valid: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    /// The settings parse but break a rule.
    #[error("pipeline settings are not valid: {0}")]
    Invalid(String),
}

/// Why a partition key could not be taken from a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The payload has nothing at the stream's key pointer.
    #[error("the payload has no value at the key pointer {0}")]
    Missing(String),
    /// The value at the key pointer is an object, an array or null.
    #[error("the value at the key pointer {0} must be a string, a number or a boolean")]
    NotScalar(String),
}

impl PipelineSettings {
    /// Parses and checks settings from YAML text.
    pub fn from_yaml(text: &str) -> Result<Self, SettingsError> {
        let settings: PipelineSettings = serde_yaml_ng::from_str(text)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Settings of just these streams, with the default retry policy and retention,
    /// checked as a file would be (for the programs' flag-only forms).
    pub fn of_streams(streams: Vec<StreamSettings>) -> Result<Self, SettingsError> {
        let settings = Self {
            streams,
            retry: RetrySettings::default(),
            aggregates: AggregateSettings::default(),
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Reads, parses and checks a settings file.
    pub fn from_file(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// The settings as YAML text, as [`PipelineSettings::from_yaml`] reads it.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }

    /// The stream called `name`.
    pub fn stream(&self, name: &str) -> Option<&StreamSettings> {
        self.streams.iter().find(|s| s.name == name)
    }

    /// Checks the rules a settings file must keep (names, topics, durations), for settings
    /// changed after reading.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |m: String| Err(SettingsError::Invalid(m));
        if self.retry.max_attempts < 1 {
            return invalid("retry.maxAttempts must be at least 1".to_owned());
        }
        if parse_duration(&self.retry.backoff).is_none() {
            return invalid(format!(
                "retry.backoff {:?} is not a duration such as \"500ms\", \"1s\" or \"2m\"",
                self.retry.backoff
            ));
        }
        for (field, value) in [
            (
                "aggregates.minuteRetention",
                &self.aggregates.minute_retention,
            ),
            ("aggregates.hourRetention", &self.aggregates.hour_retention),
        ] {
            if parse_duration(value).is_none_or(|d| d < std::time::Duration::from_secs(60)) {
                return invalid(format!(
                    "{field} {value:?} is not a duration of a minute or more, such as \"168h\""
                ));
            }
        }
        let mut names = BTreeMap::new();
        let mut topics = BTreeMap::new();
        for s in &self.streams {
            if let Err(why) = check_name(&s.name, 200) {
                return invalid(format!("stream name {:?} {why}", s.name));
            }
            if names.insert(s.name.as_str(), ()).is_some() {
                return invalid(format!("stream {:?} is defined twice", s.name));
            }
            let topic = s.topic();
            if let Err(why) = check_name(topic, MAX_TOPIC_LEN) {
                return invalid(format!("topic {topic:?} of stream {:?} {why}", s.name));
            }
            if let Some(other) = topics.insert(topic, s.name.as_str()) {
                return invalid(format!(
                    "streams {other:?} and {:?} both use the topic {topic:?}",
                    s.name
                ));
            }
            let reads = s.read_topic();
            if let Err(why) = check_name(&reads, MAX_TOPIC_LEN) {
                return invalid(format!("read topic {reads:?} of stream {:?} {why}", s.name));
            }
            if let Some(schema) = &s.schema
                && !schema.is_object()
                && !schema.is_boolean()
            {
                return invalid(format!(
                    "schema of stream {:?} must be a JSON Schema object",
                    s.name
                ));
            }
            if s.partitions < 1 {
                return invalid(format!(
                    "stream {:?} has {} partitions; it needs at least 1",
                    s.name, s.partitions
                ));
            }
            if let Some(d) = s.dimensions.iter().find(|d| !d.starts_with('/')) {
                return invalid(format!(
                    "dimension {d:?} of stream {:?} is not a JSON pointer; it must start with '/'",
                    s.name
                ));
            }
            if let Some(store) = &s.store
                && let Err(why) = check_table(&store.table)
            {
                return invalid(format!("store of stream {:?}: {why}", s.name));
            }
            if let Some(key) = &s.key
                && !key.starts_with('/')
            {
                return invalid(format!(
                    "key {key:?} of stream {:?} is not a JSON pointer; it must start with '/', as in \"/userId\"",
                    s.name
                ));
            }
        }
        Ok(())
    }
}

impl StreamSettings {
    /// A stream whose topic has the stream's name.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            topic: None,
            partitions: default_partitions(),
            key: None,
            read_topic: None,
            schema: None,
            dimensions: Vec::new(),
            ack_by: Vec::new(),
            store: None,
        }
    }

    /// The topic read events of this stream go to: `read_topic`, else `<topic>.reads`.
    pub fn read_topic(&self) -> String {
        self.read_topic
            .clone()
            .unwrap_or_else(|| format!("{}.reads", self.topic()))
    }

    /// The topic collectors send events the sink rejected to, to be tried again:
    /// `<topic>.retry`.
    pub fn retry_topic(&self) -> String {
        format!("{}.retry", self.topic())
    }

    /// The topic of events that used up their attempts or are not events:
    /// `<topic>.dlq`.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dlq", self.topic())
    }

    /// The Kafka topic of the stream.
    pub fn topic(&self) -> &str {
        self.topic.as_deref().unwrap_or(&self.name)
    }

    /// The partition key of `payload` at the stream's key pointer, if the stream has one.
    pub fn key_of(&self, payload: &Value) -> Result<Option<String>, KeyError> {
        let Some(pointer) = &self.key else {
            return Ok(None);
        };
        match payload.pointer(pointer) {
            None => Err(KeyError::Missing(pointer.clone())),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(Some(v.to_string())),
            Some(_) => Err(KeyError::NotScalar(pointer.clone())),
        }
    }
}

/// Names of streams and topics: ASCII letters, digits, '.', '_' and '-', as Kafka allows.
fn check_name(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > max {
        return Err(format!("is longer than {max} characters"));
    }
    if name == "." || name == ".." {
        return Err("may not be '.' or '..'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "contains {c:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// The consumer group a collector reads its retry topics with: `<group>.retry`, beside
/// `group` on the streams' own topics.
pub fn retry_group(group: &str) -> String {
    format!("{group}.retry")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(check_table("sluice_events").is_ok());
        assert!(check_table("_t1").is_ok());
        assert!(check_table("Events").is_err());
        assert!(check_table("t; drop table x").is_err());
        assert!(check_table("1t").is_err());
        assert!(check_table(&"t".repeat(64)).is_err());
    }
    use serde_json::json;

    #[test]
    fn parses_streams_with_defaults() {
        let s = PipelineSettings::from_yaml(
            "streams:\n  - name: visit\n    key: /userId\n    partitions: 6\n  - name: activity\n    topic: act-v1\n",
        )
        .expect("valid");
        let visit = s.stream("visit").expect("visit");
        assert_eq!(visit.topic(), "visit");
        assert_eq!(visit.partitions, 6);
        let activity = s.stream("activity").expect("activity");
        assert_eq!(activity.topic(), "act-v1");
        assert_eq!(activity.partitions, 1);
        assert_eq!(activity.read_topic(), "act-v1.reads");
        assert!(s.stream("nope").is_none());
    }

    #[test]
    fn yaml_round_trips() {
        let mut stream = StreamSettings::new("chat");
        stream.key = Some("/touser".into());
        let s = PipelineSettings {
            streams: vec![stream],
            retry: RetrySettings::default(),
            aggregates: AggregateSettings::default(),
        };
        assert_eq!(PipelineSettings::from_yaml(&s.to_yaml()).expect("valid"), s);
    }

    fn error_of(yaml: &str) -> String {
        PipelineSettings::from_yaml(yaml)
            .expect_err("should be rejected")
            .to_string()
    }

    #[test]
    fn rejects_bad_settings_with_a_reason() {
        assert!(
            error_of("streams:\n  - name: a\n    colour: red\n").contains("unknown field `colour`")
        );
        assert!(error_of("streams:\n  - name: a\n  - name: a\n").contains("defined twice"));
        assert!(error_of("streams:\n  - name: a b\n").contains("contains ' '"));
        assert!(
            error_of("streams:\n  - name: a\n  - name: b\n    topic: a\n")
                .contains("both use the topic")
        );
        assert!(error_of("streams:\n  - name: a\n    partitions: 0\n").contains("at least 1"));
        assert!(error_of("streams:\n  - name: a\n    key: userId\n").contains("JSON pointer"));
        assert!(error_of("streams: 3\n").contains("not valid"));
    }

    #[test]
    fn aggregates_are_kept_a_week_by_minute_and_90_days_by_hour_unless_set() {
        let a = PipelineSettings::from_yaml("streams: []\n")
            .expect("valid")
            .aggregates;
        assert_eq!(a.minute_ttl().as_secs(), 7 * 24 * 3600);
        assert_eq!(a.hour_ttl().as_secs(), 90 * 24 * 3600);
        let set = PipelineSettings::from_yaml(
            "streams: []\naggregates: {minuteRetention: 2h, hourRetention: 48h}\n",
        )
        .expect("valid")
        .aggregates;
        assert_eq!(
            (set.minute_ttl().as_secs(), set.hour_ttl().as_secs()),
            (7200, 172_800)
        );
        assert!(
            error_of("streams: []\naggregates: {minuteRetention: 5s}\n").contains(
                "aggregates.minuteRetention \"5s\" is not a duration of a minute or more"
            )
        );
        assert!(
            error_of("streams: []\naggregates: {hourRetention: soon}\n").contains("hourRetention")
        );
    }

    #[test]
    fn retry_delays_double_up_to_a_ceiling() {
        let r =
            PipelineSettings::from_yaml("streams: []\nretry: {maxAttempts: 3, backoff: 500ms}\n")
                .expect("valid")
                .retry;
        assert_eq!(r.max_attempts, 3);
        let ms: Vec<u128> = (1..=4).map(|a| r.delay(a).as_millis()).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000]);
        assert_eq!(r.delay(40).as_secs(), 300);
        assert!(error_of("streams: []\nretry: {backoff: soon}\n").contains("not a duration"));
        assert!(error_of("streams: []\nretry: {maxAttempts: 0}\n").contains("at least 1"));
        assert_eq!(
            parse_duration("2m"),
            Some(std::time::Duration::from_secs(120))
        );
        assert_eq!(parse_duration("1.5s"), None);
    }

    #[test]
    fn takes_the_key_from_the_payload() {
        let mut s = StreamSettings::new("chat");
        assert_eq!(s.key_of(&json!({"touser": "bob"})), Ok(None));
        s.key = Some("/touser".into());
        assert_eq!(s.key_of(&json!({"touser": "bob"})), Ok(Some("bob".into())));
        assert_eq!(s.key_of(&json!({"touser": 7})), Ok(Some("7".into())));
        assert_eq!(
            s.key_of(&json!({"from": "ann"})),
            Err(KeyError::Missing("/touser".into()))
        );
        assert_eq!(
            s.key_of(&json!({"touser": {"a": 1}})),
            Err(KeyError::NotScalar("/touser".into()))
        );
    }
}
