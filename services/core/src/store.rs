//! How records are named in Redis, shared by the collector (writes) and ingest (reads).
//!
//! A record lives under `<prefix>:<stream>:<id>`, with `sluice` as the default prefix; the
//! senders with unsent messages for a user are the set `<prefix>:unsent:<user>`; the Redis
//! sink's counts are the hashes `<prefix>:agg:<stream>:<minute>` and
//! `<prefix>:agg-hour:<stream>:<hour>`.
//! Stream names cannot contain ':' and the id is the last part, so every key maps back to
//! exactly one (stream, id).

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "sluice";

/// The Redis key of the record `id` of `stream`.
pub fn record_key(prefix: &str, stream: &str, id: &str) -> String {
    format!("{prefix}:{stream}:{id}")
}

/// The per-minute counts of `stream` for the minute starting at `minute` (seconds since the
/// epoch, a multiple of 60): a hash with the field `count` and one field
/// `<pointer>=<value>` per dimension value seen.
pub fn minute_aggregate_key(prefix: &str, stream: &str, minute: i64) -> String {
    format!("{prefix}:agg:{stream}:{minute}")
}

/// The same counts rolled up for the hour starting at `hour` (a multiple of 3600).
pub fn hour_aggregate_key(prefix: &str, stream: &str, hour: i64) -> String {
    format!("{prefix}:agg-hour:{stream}:{hour}")
}

/// The Redis set of senders with unsent messages for `user`.
pub fn unsent_key(prefix: &str, user: &str) -> String {
    format!("{prefix}:unsent:{user}")
}

/// A Redis client for `url`, authenticating with `password` when one is given (a
/// non-empty `--redis-password` replaces a password in the URL). A password kept out of
/// the URL stays out of the logs and error messages that name the URL.
pub fn redis_client(url: &str, password: Option<&str>) -> redis::RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let mut info = url.into_connection_info()?;
    if let Some(p) = password.filter(|p| !p.is_empty()) {
        let settings = info.redis_settings().clone().set_password(p);
        info = info.set_redis_settings(settings);
    }
    redis::Client::open(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_join_prefix_stream_and_id() {
        assert_eq!(record_key("sluice", "visit", "42"), "sluice:visit:42");
    }

    #[test]
    fn a_given_password_is_what_the_client_sends() {
        let with = redis_client("redis://r:6379/2", Some("s3cret")).expect("client");
        let info = with.get_connection_info().redis_settings();
        assert_eq!(info.password(), Some("s3cret"));
        assert_eq!(info.db(), 2);
        let in_url = redis_client("redis://:inurl@r:6379", None).expect("client");
        assert_eq!(
            in_url.get_connection_info().redis_settings().password(),
            Some("inurl")
        );
        let replaced = redis_client("redis://:inurl@r:6379", Some("given")).expect("client");
        assert_eq!(
            replaced.get_connection_info().redis_settings().password(),
            Some("given")
        );
        let none = redis_client("redis://r:6379", Some("")).expect("client");
        assert_eq!(none.get_connection_info().redis_settings().password(), None);
        assert!(redis_client("http://r", Some("p")).is_err());
    }
}
