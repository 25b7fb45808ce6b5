//! Kafka client settings shared by the services, and topic creation.
//!
//! Producers are idempotent with `acks=all`, so a 2xx from ingest means the event is in
//! every in-sync replica exactly once. Consumers store offsets by hand
//! (`enable.auto.offset.store=false`): a collector stores an offset only after its sink
//! confirmed the write, and the periodic auto-commit sends only stored offsets.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// How to reach Kafka: the `--kafka-brokers` flag and extra client properties.
#[derive(Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma separated.
    #[arg(
        long = "kafka-brokers",
        visible_alias = "brokers",
        env = "SLUICE_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Extra librdkafka properties as `name=value`, comma separated (for example
    /// `security.protocol=ssl`).
    #[arg(long = "kafka-option", env = "SLUICE_KAFKA_OPTIONS", value_delimiter = ',', value_parser = parse_property)]
    pub options: Vec<(String, String)>,
    /// SASL user name (with `security.protocol` and `sasl.mechanism` set as options).
    #[arg(long = "kafka-sasl-username", env = "SLUICE_KAFKA_SASL_USERNAME")]
    pub sasl_username: Option<String>,
    /// SASL password; best given through the environment, as Kubernetes does from a
    /// Secret.
    #[arg(
        long = "kafka-sasl-password",
        env = "SLUICE_KAFKA_SASL_PASSWORD",
        hide_env_values = true
    )]
    pub sasl_password: Option<String>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("{s:?} is not of the form name=value")),
    }
}

/// Never prints the password.
impl std::fmt::Debug for KafkaArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |name: &str| name.contains("password") || name.ends_with(".pem");
        let options: Vec<(&str, &str)> = self
            .options
            .iter()
            .map(|(k, v)| (k.as_str(), if secret(k) { "<hidden>" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaArgs")
            .field("brokers", &self.brokers)
            .field("options", &options)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password",
                &self.sasl_password.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

impl KafkaArgs {
    /// Settings for the given brokers and no extra properties.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            options: Vec::new(),
            sasl_username: None,
            sasl_password: None,
        }
    }

    /// Adds the librdkafka property `name=value`.
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((name.into(), value.into()));
        self
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        // Resolve names to IPv4 first: local brokers advertise 127.0.0.1.
        c.set("broker.address.family", "v4");
        for (k, v) in &self.options {
            c.set(k, v);
        }
        if let Some(user) = &self.sasl_username {
            c.set("sasl.username", user);
        }
        if let Some(password) = &self.sasl_password {
            c.set("sasl.password", password);
        }
        c
    }

    /// An idempotent producer that waits for all in-sync replicas.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            // Snappy stores ingest's JSON events in about a sixth of their size on the
            // broker, as LZ4 does, at a fraction of the CPU: librdkafka's LZ4 sets up (and
            // zeroes) a frame context of ~64 KiB per message set, a quarter of ingest's
            // CPU per acknowledged event when sets hold one or a few events.
            .set("compression.type", "snappy")
            .set("message.timeout.ms", "30000")
            // The producer queue is bounded; when it is full, callers are told so.
            .set("queue.buffering.max.messages", "100000")
            .set("queue.buffering.max.kbytes", "262144");
        merge(c, self.base())
    }

    /// A consumer in `group` that never stores offsets by itself.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("enable.partition.eof", "false")
            // Up to 4 MiB per partition per fetch (librdkafka's default is 1 MiB): a
            // backlog drains in fewer round trips.
            .set("max.partition.fetch.bytes", "4194304")
            // Records fetched ahead and not yet taken are bounded per queue: 10,000 or
            // 16 MiB (librdkafka's defaults, 100,000 and 64 MiB, are meant for one queue
            // per consumer; the collector gives each partition a queue of its own).
            .set("queued.min.messages", "10000")
            .set("queued.max.messages.kbytes", "16384");
        merge(c, self.base())
    }

    /// An admin client.
    pub fn admin(&self) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
        self.base().create()
    }
}

/// `extra` wins over `defaults`, so `--kafka-option` can override any default.
fn merge(mut defaults: ClientConfig, extra: ClientConfig) -> ClientConfig {
    // `config_map` hides secret values, so each value is read with `get`.
    for k in extra.config_map().keys() {
        if let Some(v) = extra.get(k) {
            defaults.set(*k, v);
        }
    }
    defaults
}

/// A topic to create when absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partitions on creation.
    pub partitions: i32,
}

/// Creates the topics that do not exist yet; existing topics are left as they are.
pub async fn ensure_topics(kafka: &KafkaArgs, topics: &[TopicSpec]) -> Result<(), KafkaError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin = kafka.admin()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                tracing::error!(topic = %name, error = %code, "cannot create topic");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    Ok(())
}

/// Which of `names` the cluster does not have (one metadata request).
pub async fn missing_topics(
    kafka: &KafkaArgs,
    names: &[String],
) -> Result<Vec<String>, KafkaError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let admin = kafka.admin()?;
    let names = names.to_vec();
    tokio::task::spawn_blocking(move || {
        let metadata = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(30))?;
        Ok(names
            .into_iter()
            .filter(|n| {
                !metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == n && t.error().is_none())
            })
            .collect())
    })
    .await
    .map_err(|_| KafkaError::Canceled)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_options_override_defaults() {
        let mut k = KafkaArgs::new("127.0.0.1:1");
        k.options.push(("linger.ms".into(), "0".into()));
        let c = k.producer_config();
        assert_eq!(c.get("linger.ms"), Some("0"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("bootstrap.servers"), Some("127.0.0.1:1"));
    }

    #[test]
    fn consumers_never_store_offsets_by_themselves() {
        let c = KafkaArgs::new("b:1").consumer_config("g");
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.id"), Some("g"));
    }

    #[test]
    fn sasl_credentials_reach_every_client() {
        let mut k = KafkaArgs::new("b:1").with("security.protocol", "sasl_plaintext");
        k.sasl_username = Some("u".into());
        k.sasl_password = Some("p,w=x".into());
        for c in [k.producer_config(), k.consumer_config("g"), k.base()] {
            assert_eq!(c.get("sasl.username"), Some("u"));
            assert_eq!(c.get("sasl.password"), Some("p,w=x"));
            assert_eq!(c.get("security.protocol"), Some("sasl_plaintext"));
        }
        assert!(
            !format!("{k:?}").contains("p,w=x"),
            "Debug hides the password"
        );
    }

    #[test]
    fn properties_need_a_name() {
        assert_eq!(parse_property("a = b"), Ok(("a".into(), "b".into())));
        assert!(parse_property("=b").is_err());
        assert!(parse_property("novalue").is_err());
    }
}
