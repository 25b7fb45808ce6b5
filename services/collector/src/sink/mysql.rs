//! The MySQL (and MariaDB) sink: one row per event, the first stored under its
//! (stream, id), like the PostgreSQL sink.
//!
//! The table (`--table`, `sluice_events` by default) is created if absent:
//! `(stream, id, key, event_time, ingest_time, payload json)` with primary key
//! `(stream, id)`; times are UTC with microseconds. A batch is multi-row `INSERT ... ON
//! DUPLICATE KEY UPDATE id = id` statements of at most [`ROWS_PER_STATEMENT`] rows, so a
//! replay or a retry with the same id leaves the first row as it was. Connecting retries
//! with backoff at start-up (`--db-connect-attempts`, `--db-connect-backoff`); during an
//! outage the collector holds the records and tries again until the database is back.

use std::time::Duration;

use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

use super::{Record, Sink, SinkError, connect_sql};

/// Rows per statement: six placeholders each, well under MySQL's 65,535.
pub const ROWS_PER_STATEMENT: usize = 1_000;

/// Writes rows to MySQL or MariaDB.
pub struct MysqlSink {
    pool: MySqlPool,
    table: String,
}

/// A time as MySQL's `DATETIME(6)` takes it: UTC, microseconds, no zone.
fn datetime(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

impl MysqlSink {
    /// Connects (retrying `attempts` times, `backoff` apart) and creates the table.
    pub async fn connect(
        url: &str,
        table: &str,
        attempts: u32,
        backoff: Duration,
    ) -> Result<Self, SinkError> {
        // Times are written and read as UTC.
        let utc = MySqlPoolOptions::new().after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET time_zone = '+00:00'")
                    .execute(conn)
                    .await
                    .map(|_| ())
            })
        });
        let pool = connect_sql(url, table, attempts, backoff, utc).await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                stream varchar(200) NOT NULL,
                id varchar(200) NOT NULL,
                `key` text,
                event_time datetime(6) NOT NULL,
                ingest_time datetime(6) NOT NULL,
                payload json NOT NULL,
                PRIMARY KEY (stream, id)
            ) DEFAULT CHARSET = utf8mb4"
        ))
        .execute(&pool)
        .await?;
        Ok(Self {
            pool,
            table: table.to_owned(),
        })
    }
}

impl Sink for MysqlSink {
    fn name(&self) -> &'static str {
        "mysql"
    }

    async fn write(&self, batch: &[Record]) -> Result<(), SinkError> {
        // One row per (stream, id): the first in the batch wins.
        let mut seen = std::collections::HashSet::new();
        let rows: Vec<&Record> = batch
            .iter()
            .filter(|r| seen.insert((r.envelope.stream.as_str(), r.envelope.id.as_str())))
            .collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut insert = sqlx::QueryBuilder::<sqlx::MySql>::new(format!(
                "INSERT INTO {} (stream, id, `key`, event_time, ingest_time, payload) ",
                self.table
            ));
            insert.push_values(chunk, |mut row, r| {
                row.push_bind(&r.envelope.stream)
                    .push_bind(&r.envelope.id)
                    .push_bind(&r.envelope.key)
                    .push_bind(datetime(r.envelope.event_time))
                    .push_bind(datetime(r.envelope.ingest_time))
                    .push_bind(r.envelope.payload.get());
            });
            insert.push(" ON DUPLICATE KEY UPDATE id = id");
            insert.build().execute(&self.pool).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_with_microseconds_and_no_zone() {
        let t: jiff::Timestamp = "2026-12-01T10:00:05.123456789Z".parse().expect("time");
        assert_eq!(datetime(t), "2026-12-01 10:00:05.123456");
        let whole: jiff::Timestamp = "2026-12-01T10:00:05Z".parse().expect("time");
        assert_eq!(datetime(whole), "2026-12-01 10:00:05.000000");
    }
}
