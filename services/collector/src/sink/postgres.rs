//! The PostgreSQL sink: one row per event, the first stored under its (stream, id).
//!
//! The table (`--table`, `sluice_events` by default) is created if absent:
//! `(stream, id, key, event_time, ingest_time, payload jsonb)` with primary key
//! `(stream, id)`. A batch is one `INSERT ... SELECT FROM UNNEST(...) ON CONFLICT DO
//! NOTHING`, so a replay or a retry with the same id leaves the first row as it was.
//! Connecting retries with backoff at start-up (`--db-connect-attempts`,
//! `--db-connect-backoff`); during an outage the collector holds the records and tries
//! again until the database is back, and the pool reconnects by itself.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

use super::{Record, Sink, SinkError, connect_sql};

/// Writes rows to PostgreSQL.
pub struct PostgresSink {
    pool: PgPool,
    insert: String,
}

impl PostgresSink {
    /// Connects (retrying `attempts` times, `backoff` apart) and creates the table.
    pub async fn connect(
        url: &str,
        table: &str,
        attempts: u32,
        backoff: Duration,
    ) -> Result<Self, SinkError> {
        let pool = connect_sql(url, table, attempts, backoff, PgPoolOptions::new()).await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                stream text NOT NULL,
                id text NOT NULL,
                key text,
                event_time timestamptz NOT NULL,
                ingest_time timestamptz NOT NULL,
                payload jsonb NOT NULL,
                PRIMARY KEY (stream, id)
            )"
        ))
        .execute(&pool)
        .await?;
        let insert = format!(
            "INSERT INTO {table} (stream, id, key, event_time, ingest_time, payload)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]::timestamptz[], $5::text[]::timestamptz[], $6::text[]::jsonb[])
             ON CONFLICT (stream, id) DO NOTHING"
        );
        Ok(Self { pool, insert })
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn write(&self, batch: &[Record]) -> Result<(), SinkError> {
        // One row per (stream, id): the first in the batch wins.
        let mut seen = std::collections::HashSet::new();
        let rows: Vec<&Record> = batch
            .iter()
            .filter(|r| seen.insert((r.envelope.stream.as_str(), r.envelope.id.as_str())))
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let column = |f: fn(&Record) -> Option<String>| {
            rows.iter().map(|r| f(r)).collect::<Vec<Option<String>>>()
        };
        sqlx::query(&self.insert)
            .bind(column(|r| Some(r.envelope.stream.clone())))
            .bind(column(|r| Some(r.envelope.id.clone())))
            .bind(column(|r| r.envelope.key.clone()))
            .bind(column(|r| Some(r.envelope.event_time.to_string())))
            .bind(column(|r| Some(r.envelope.ingest_time.to_string())))
            .bind(column(|r| Some(r.envelope.payload.get().to_owned())))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
