//! The flags the services of a pipeline share, declared once: [`ServiceArgs`] and
//! [`RedisArgs`] here, with [`crate::kafka::KafkaArgs`] for Kafka. A service flattens them
//! into its own command line, so every service spells them, reads them from the same
//! environment variables and defaults them alike.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::store;

/// What every service of a pipeline takes: its settings, whether it creates its topics,
/// where it serves metrics and health, and how much it logs.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Pipeline settings file: the streams, their topics and the retry policy, the same
    /// file for every service of the pipeline (what runs without one: see below).
    #[arg(long, env = "SLUICE_SETTINGS")]
    pub settings: Option<PathBuf>,
    /// Create the topics this service uses at start-up when they are absent.
    #[arg(long, env = "SLUICE_CREATE_TOPICS")]
    pub create_topics: bool,
    /// Address of `/metrics`, `/healthz` and `/readyz`, kept off any API port so that what
    /// exposes the API does not expose them; off when unset.
    #[arg(long, env = "SLUICE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log filter, for example `info` or `info,sluice_collector=debug`.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    pub log_level: String,
}

impl ServiceArgs {
    /// The flags at their defaults, with `settings`.
    pub fn new(settings: Option<PathBuf>) -> Self {
        Self {
            settings,
            create_topics: false,
            metrics_listen: None,
            log_level: "info".to_owned(),
        }
    }
}

/// How a service reaches the pipeline's Redis.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisArgs {
    /// Redis primary: where collectors write records and ingest reads them.
    #[arg(
        long = "redis-url",
        env = "SLUICE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub url: String,
    /// Password sent to Redis (kept out of the URLs, so out of logs).
    #[arg(
        long = "redis-password",
        env = "SLUICE_REDIS_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// Prefix of the Redis keys of records.
    #[arg(long, env = "SLUICE_KEY_PREFIX", default_value = store::DEFAULT_PREFIX)]
    pub key_prefix: String,
}

impl RedisArgs {
    /// The Redis at `url`, without a password, with the default key prefix.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: None,
            key_prefix: store::DEFAULT_PREFIX.to_owned(),
        }
    }

    /// A client of the primary, with the password.
    pub fn client(&self) -> redis::RedisResult<redis::Client> {
        self.client_of(&self.url)
    }

    /// A client of another server of the same Redis (a replica), with the password.
    pub fn client_of(&self, url: &str) -> redis::RedisResult<redis::Client> {
        store::redis_client(url, self.password.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        service: ServiceArgs,
        #[command(flatten)]
        redis: RedisArgs,
    }

    #[test]
    fn shared_flags_are_read_and_the_password_reaches_the_client() {
        // Flags only: the test environment may set the SLUICE_ variables.
        let cli = Cli::parse_from([
            "x",
            "--settings",
            "p.yaml",
            "--create-topics",
            "--metrics-listen",
            "127.0.0.1:9464",
            "--redis-url",
            "redis://r:6380",
            "--redis-password",
            "pw",
            "--key-prefix",
            "k:",
        ]);
        assert_eq!(cli.service.settings, Some(PathBuf::from("p.yaml")));
        assert!(cli.service.create_topics);
        assert_eq!(
            cli.service.metrics_listen,
            Some(([127, 0, 0, 1], 9464).into())
        );
        assert_eq!(cli.redis.url, "redis://r:6380");
        assert_eq!(cli.redis.password.as_deref(), Some("pw"));
        assert_eq!(cli.redis.key_prefix, "k:");
        let info = cli
            .redis
            .client()
            .expect("client")
            .get_connection_info()
            .clone();
        assert_eq!(info.redis_settings().password(), Some("pw"));
    }
}
