//! Records read back from the SQL table a stream's collector writes (`store` in the
//! stream's settings), for `GET /v1/streams/{stream}/records/{id}` and the TCP read port.
//!
//! The pool connects on first use (`--database-url`), so ingest starts while the database
//! is away. A record comes back in the form the Redis store keeps it:
//! `{"id", "stream", "key", "event_time", "ingest_time", "payload"}`. A dump streams rows as
//! the database sends them; it never holds the table in memory.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::{Value, json};
use sluice_core::settings::{RecordStore, StoreKind};
use sqlx::Row;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgPool, PgPoolOptions};

/// A database ingest reads records from.
#[derive(Clone)]
pub enum SqlStore {
    /// PostgreSQL.
    Postgres(PgPool),
    /// MySQL or MariaDB.
    Mysql(MySqlPool),
}

/// The columns every query reads, times as RFC 3339 in UTC.
const PG_COLUMNS: &str = r#"id, key, to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), to_char(ingest_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), payload::text"#;
const MYSQL_COLUMNS: &str = "id, `key`, DATE_FORMAT(event_time, '%Y-%m-%dT%H:%i:%s.%fZ'), DATE_FORMAT(ingest_time, '%Y-%m-%dT%H:%i:%s.%fZ'), CAST(payload AS CHAR)";

/// One row: id, key, event time, ingest time, payload text.
type Columns = (String, Option<String>, String, String, String);

impl SqlStore {
    /// A pool for `url` (`postgres://` or `mysql://`) that connects on first use.
    pub fn connect_lazy(url: &str) -> Result<Self, String> {
        let timeout = Duration::from_secs(5);
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(timeout)
                .connect_lazy(url)
                .map(Self::Postgres)
                .map_err(|e| e.to_string())
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            MySqlPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(timeout)
                .connect_lazy(url)
                .map(Self::Mysql)
                .map_err(|e| e.to_string())
        } else {
            Err("--database-url must start with postgres:// or mysql://".to_owned())
        }
    }

    /// The kind of database.
    pub fn kind(&self) -> StoreKind {
        match self {
            Self::Postgres(_) => StoreKind::Postgres,
            Self::Mysql(_) => StoreKind::Mysql,
        }
    }

    /// The record `id` of `stream`, as the Redis store keeps it.
    pub async fn record(
        &self,
        store: &RecordStore,
        stream: &str,
        id: &str,
    ) -> Result<Option<Value>, sqlx::Error> {
        let row = match self {
            Self::Postgres(pool) => sqlx::query(&format!(
                "SELECT {PG_COLUMNS} FROM {} WHERE stream = $1 AND id = $2",
                store.table
            ))
            .bind(stream)
            .bind(id)
            .fetch_optional(pool)
            .await?
            .map(|r| columns_pg(&r))
            .transpose()?,
            Self::Mysql(pool) => sqlx::query(&format!(
                "SELECT {MYSQL_COLUMNS} FROM {} WHERE stream = ? AND id = ?",
                store.table
            ))
            .bind(stream)
            .bind(id)
            .fetch_optional(pool)
            .await?
            .map(|r| columns_mysql(&r))
            .transpose()?,
        };
        Ok(row.map(|c| record(stream, c)))
    }

    /// The query of [`SqlStore::payloads`] for `store`.
    pub fn dump_query(&self, store: &RecordStore) -> String {
        match self {
            Self::Postgres(_) => format!(
                "SELECT {PG_COLUMNS} FROM {} WHERE stream = $1 ORDER BY id",
                store.table
            ),
            Self::Mysql(_) => format!(
                "SELECT {MYSQL_COLUMNS} FROM {} WHERE stream = ? ORDER BY id",
                store.table
            ),
        }
    }

    /// Every record of `stream`, its id and payload, in id order as the rows arrive;
    /// `sql` is [`SqlStore::dump_query`].
    pub fn payloads<'a>(
        &'a self,
        sql: &'a str,
        stream: &'a str,
    ) -> BoxStream<'a, Result<(String, Value), sqlx::Error>> {
        match self {
            Self::Postgres(pool) => sqlx::query(sql)
                .bind(stream)
                .fetch(pool)
                .map(|r| r.and_then(|r| columns_pg(&r)).map(payload))
                .boxed(),
            Self::Mysql(pool) => sqlx::query(sql)
                .bind(stream)
                .fetch(pool)
                .map(|r| r.and_then(|r| columns_mysql(&r)).map(payload))
                .boxed(),
        }
    }
}

fn columns_pg(r: &sqlx::postgres::PgRow) -> Result<Columns, sqlx::Error> {
    Ok((
        r.try_get(0)?,
        r.try_get(1)?,
        r.try_get(2)?,
        r.try_get(3)?,
        r.try_get(4)?,
    ))
}

fn columns_mysql(r: &sqlx::mysql::MySqlRow) -> Result<Columns, sqlx::Error> {
    Ok((
        r.try_get(0)?,
        r.try_get(1)?,
        r.try_get(2)?,
        r.try_get(3)?,
        r.try_get(4)?,
    ))
}

fn parse(payload: &str) -> Value {
    serde_json::from_str(payload).unwrap_or_else(|_| Value::String(payload.to_owned()))
}

fn record(stream: &str, (id, key, event_time, ingest_time, payload): Columns) -> Value {
    let mut record = json!({
        "id": id,
        "stream": stream,
        "event_time": event_time,
        "ingest_time": ingest_time,
        "payload": parse(&payload),
    });
    if let Some(key) = key {
        record["key"] = json!(key);
    }
    record
}

fn payload((id, _, _, _, payload): Columns) -> (String, Value) {
    let value = parse(&payload);
    (id, value)
}
