//! After a run: did every acknowledged event reach the sink, once?
//!
//! The ids the server acknowledged are looked up in the sink (`--verify-redis`,
//! `--verify-file`, `--verify-postgres`, `--verify-mysql`), waiting up to `--verify-timeout`
//! for collectors to catch up. Redis holds one key per event and the SQL sinks one row per
//! `(stream, id)`,
//! so there a duplicate can only be a second key or row under another id; the file sink
//! appends lines, so a duplicate there is an id on two lines.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What the check found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verification {
    /// The sink checked.
    pub sink: String,
    /// Acknowledged events looked up.
    pub checked: u64,
    /// Acknowledged events not in the sink.
    pub missing: u64,
    /// Acknowledged events in the sink more than once.
    pub duplicated: u64,
    /// Up to ten missing ids.
    pub missing_examples: Vec<String>,
    /// Up to ten duplicated ids.
    pub duplicated_examples: Vec<String>,
    /// Seconds from the end of the run until the sink held every event (or the check
    /// gave up).
    pub seconds: f64,
}

/// Compares the acknowledged ids with how often each was found.
pub fn compare(sink: &str, acknowledged: &[String], found: &BTreeMap<String, u64>) -> Verification {
    let mut v = Verification {
        sink: sink.to_owned(),
        checked: acknowledged.len() as u64,
        missing: 0,
        duplicated: 0,
        missing_examples: Vec::new(),
        duplicated_examples: Vec::new(),
        seconds: 0.0,
    };
    for id in acknowledged {
        match found.get(id).copied().unwrap_or(0) {
            0 => {
                v.missing += 1;
                if v.missing_examples.len() < 10 {
                    v.missing_examples.push(id.clone());
                }
            }
            1 => {}
            _ => {
                v.duplicated += 1;
                if v.duplicated_examples.len() < 10 {
                    v.duplicated_examples.push(id.clone());
                }
            }
        }
    }
    v
}

/// Where to look.
#[derive(Debug, Clone)]
pub enum Sink {
    /// Redis at this URL, keys `<prefix>:<stream>:<id>`.
    Redis {
        /// URL.
        url: String,
        /// Key prefix.
        prefix: String,
    },
    /// The file sink's record directory.
    File(std::path::PathBuf),
    /// PostgreSQL at this URL, in this table.
    Postgres {
        /// URL.
        url: String,
        /// Table.
        table: String,
    },
    /// MySQL or MariaDB at this URL, in this table.
    Mysql {
        /// URL.
        url: String,
        /// Table.
        table: String,
    },
}

impl Sink {
    fn name(&self) -> &'static str {
        match self {
            Self::Redis { .. } => "redis",
            Self::File(_) => "file",
            Self::Postgres { .. } => "postgres",
            Self::Mysql { .. } => "mysql",
        }
    }

    /// How often each of `ids` of `stream` is in the sink.
    async fn count(&self, stream: &str, ids: &[String]) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut found = BTreeMap::new();
        match self {
            Self::Redis { url, prefix } => {
                // A thousand lookups in one round trip can take longer than the client's
                // default half second on a loaded machine.
                let config = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(std::time::Duration::from_secs(30)));
                let mut redis = redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                for chunk in ids.chunks(1000) {
                    let keys: Vec<String> = chunk
                        .iter()
                        .map(|id| sluice_core::store::record_key(prefix, stream, id))
                        .collect();
                    let present: Vec<bool> = {
                        let mut pipe = redis::pipe();
                        for k in &keys {
                            pipe.exists(k);
                        }
                        pipe.query_async(&mut redis).await?
                    };
                    for (id, there) in chunk.iter().zip(present) {
                        found.insert(id.clone(), u64::from(there));
                    }
                }
            }
            Self::File(dir) => {
                let dir = dir.clone();
                let stream = stream.to_owned();
                let lines = tokio::task::spawn_blocking(move || {
                    sluice_core::segment::read_all(Path::new(&dir), &stream)
                })
                .await??;
                for line in lines {
                    if let Some(id) = line["id"].as_str() {
                        *found.entry(id.to_owned()).or_default() += 1;
                    }
                }
            }
            Self::Postgres { url, table } => {
                sluice_core::settings::check_table(table).map_err(anyhow::Error::msg)?;
                let pool = sqlx::PgPool::connect(url).await?;
                let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
                    "SELECT id, count(*) FROM {table} WHERE stream = $1 AND id = ANY($2) GROUP BY id"
                ))
                .bind(stream)
                .bind(ids)
                .fetch_all(&pool)
                .await?;
                pool.close().await;
                for (id, n) in rows {
                    found.insert(id, n.max(0) as u64);
                }
            }
            Self::Mysql { url, table } => {
                sluice_core::settings::check_table(table).map_err(anyhow::Error::msg)?;
                let pool = sqlx::MySqlPool::connect(url).await?;
                for chunk in ids.chunks(1000) {
                    let mut query = sqlx::QueryBuilder::<sqlx::MySql>::new(format!(
                        "SELECT id, count(*) FROM {table} WHERE stream = "
                    ));
                    query.push_bind(stream).push(" AND id IN (");
                    let mut list = query.separated(", ");
                    for id in chunk {
                        list.push_bind(id);
                    }
                    query.push(") GROUP BY id");
                    let rows: Vec<(String, i64)> = query.build_query_as().fetch_all(&pool).await?;
                    for (id, n) in rows {
                        found.insert(id, n.max(0) as u64);
                    }
                }
                pool.close().await;
            }
        }
        Ok(found)
    }

    /// Looks the ids up until none is missing or `timeout` passed.
    pub async fn verify(
        &self,
        stream: &str,
        ids: &[String],
        timeout: Duration,
    ) -> anyhow::Result<Verification> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let mut v = compare(self.name(), ids, &self.count(stream, ids).await?);
            if v.missing == 0 || Instant::now() >= deadline {
                v.seconds = started.elapsed().as_secs_f64();
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_duplicated_ids_are_counted_with_examples() {
        let acked: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let found = BTreeMap::from([
            ("a".to_owned(), 1),
            ("c".to_owned(), 3),
            ("x".to_owned(), 1),
        ]);
        let v = compare("file", &acked, &found);
        assert_eq!((v.checked, v.missing, v.duplicated), (4, 2, 1));
        assert_eq!(v.missing_examples, vec!["b", "d"]);
        assert_eq!(v.duplicated_examples, vec!["c"]);
    }

    #[test]
    fn all_present_once_is_clean() {
        let acked: Vec<String> = (0..50).map(|n| format!("r-{n}")).collect();
        let found = acked.iter().map(|id| (id.clone(), 1)).collect();
        let v = compare("redis", &acked, &found);
        assert_eq!((v.missing, v.duplicated), (0, 0));
    }
}
