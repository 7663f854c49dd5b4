//! The archive table in PostgreSQL (see [`crate::archive`]).
//!
//! A batch is one statement, one transaction: the events go in as arrays
//! (`unnest`), and `ON CONFLICT (event_id) DO NOTHING` skips those the
//! table holds. `data` is `json`, which keeps the payload's text as the
//! origin wrote it (`jsonb` would reorder its keys).

use super::settings::Settings;
use crate::archive::{Cursor, Store, archived_event};
use crate::checks::Check;
use crate::config::{ArchiveConfig, ConnectorConfig, redact_url};
use crate::error::{Cause, TargetError};
use crate::event::Event;
use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio_postgres::Client;
use uuid::Uuid;

/// The archive table of a PostgreSQL site.
pub struct PgArchive {
    url: String,
    pg: tokio_postgres::Config,
    /// `schema.table`, unquoted.
    name: String,
    /// `"schema"."table"`.
    quoted: String,
    client: Mutex<Option<Client>>,
}

/// Quotes `schema.table` as SQL.
fn quote_table(name: &str) -> String {
    name.split('.')
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// The table and its indexes, for `table` (`schema.table`).
pub fn ddl(table: &str) -> String {
    let bare = table.rsplit('.').next().unwrap_or(table);
    let t = quote_table(table);
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (
    event_id uuid PRIMARY KEY,
    origin text COLLATE \"C\" NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    type text NOT NULL,
    entity_key text,
    event_ts timestamptz NOT NULL,
    data json NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS \"{bare}_origin_seq\" ON {t} (origin, epoch, seq);
CREATE INDEX IF NOT EXISTS \"{bare}_received\" ON {t} (received_at);
CREATE INDEX IF NOT EXISTS \"{bare}_event_ts\" ON {t} (event_ts);"
    )
}

/// The insert of a batch: one row per element of the arrays, an id the
/// table holds skipped.
pub fn insert_sql(table: &str) -> String {
    format!(
        "INSERT INTO {} (event_id, origin, epoch, seq, type, entity_key, event_ts, data) \
         SELECT u.id, u.origin, u.epoch, u.seq, u.type, u.key, u.ts, u.data::json \
         FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::timestamptz[], $8::text[]) \
              AS u(id, origin, epoch, seq, type, key, ts, data) \
         ON CONFLICT (event_id) DO NOTHING",
        quote_table(table)
    )
}

fn transient(context: &str, e: tokio_postgres::Error) -> TargetError {
    let text = match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    match e.code().map(|c| c.code()) {
        // The table is missing: `sitesync init` creates it.
        Some("42P01") => TargetError::operator(
            Cause::NotInitialised,
            format!("{context}: {text}: run `sitesync init`"),
        ),
        Some(c) if c.starts_with("28") => {
            TargetError::operator(Cause::AuthRefused, format!("{context}: {text}"))
        }
        Some("42501") => {
            TargetError::operator(Cause::PermissionDenied, format!("{context}: {text}"))
        }
        _ => TargetError::transient(Cause::Unreachable, format!("{context}: {text}")),
    }
}

impl PgArchive {
    pub fn new(
        _cfg: &ConnectorConfig,
        db: &Settings,
        archive: &ArchiveConfig,
    ) -> Result<PgArchive, TargetError> {
        let pg = db.url.parse().map_err(|e| {
            TargetError::operator(
                Cause::Config,
                format!("database.url `{}`: {e}", redact_url(&db.url)),
            )
        })?;
        let (schema, _) = db.outbox_parts();
        let name = archive.table_in(Some(schema));
        let name = if name.contains('.') {
            name
        } else {
            format!("public.{name}")
        };
        Ok(PgArchive {
            url: db.url.clone(),
            pg,
            quoted: quote_table(&name),
            name,
            client: Mutex::new(None),
        })
    }

    async fn open(&self) -> Result<Client, TargetError> {
        let (client, connection) = self
            .pg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| transient(&format!("connecting to {}", redact_url(&self.url)), e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "archive database connection ended");
            }
        });
        Ok(client)
    }

    /// The kept connection (opened when missing or closed).
    async fn connected(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, TargetError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(self.open().await?);
        }
        Ok(guard)
    }
}

impl Store for PgArchive {
    fn table(&self) -> &str {
        &self.name
    }

    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let client = self.open().await?;
        client
            .batch_execute(&ddl(&self.name))
            .await
            .map_err(|e| transient("creating the archive table", e))?;
        Ok(vec![format!(
            "archive table {}: ready (indexed by origin, epoch, seq; received_at; event_ts)",
            self.name
        )])
    }

    async fn preflight(&self) -> Vec<Check> {
        let client = match self.open().await {
            Ok(c) => c,
            Err(e) => {
                return vec![Check::fail(
                    "archive table",
                    e.to_string(),
                    "check database.url",
                )];
            }
        };
        match client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.quoted])
            .await
        {
            Ok(row) if row.get::<_, bool>(0) => {
                vec![Check::pass("archive table", self.name.clone())]
            }
            Ok(_) => vec![Check::fail(
                "archive table",
                format!("{} does not exist", self.name),
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "archive table",
                e.to_string(),
                "check the database role's privileges",
            )],
        }
    }

    async fn write<'a>(&'a self, events: &'a [&'a Event]) -> Result<u64, TargetError> {
        if events.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let origins: Vec<&str> = events.iter().map(|e| e.origin.as_str()).collect();
        let epochs: Vec<i64> = events.iter().map(|e| e.epoch as i64).collect();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq as i64).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        let keys: Vec<Option<&str>> = events.iter().map(|e| e.entity_key.as_deref()).collect();
        let times: Vec<DateTime<Utc>> = events.iter().map(|e| e.timestamp).collect();
        let data: Vec<&str> = events.iter().map(|e| e.data.get()).collect();
        let sql = insert_sql(&self.name);
        let guard = self.connected().await?;
        let c = guard.as_ref().expect("connected");
        c.execute(
            &sql,
            &[&ids, &origins, &epochs, &seqs, &kinds, &keys, &times, &data],
        )
        .await
        .map_err(|e| transient("archiving a batch", e))
    }

    async fn read<'a>(
        &'a self,
        after: Option<&'a Cursor>,
        origin: Option<&'a str>,
        limit: usize,
    ) -> Result<Vec<Event>, TargetError> {
        let guard = self.connected().await?;
        let c = guard.as_ref().expect("connected");
        let limit = limit as i64;
        let rows = match after {
            Some((o, epoch, seq)) => {
                c.query(
                    &read_sql(&self.name, true),
                    &[o, epoch, seq, &origin, &limit],
                )
                .await
            }
            None => {
                c.query(&read_sql(&self.name, false), &[&origin, &limit])
                    .await
            }
        }
        .map_err(|e| transient("reading the archive", e))?;
        rows.iter()
            .map(|r| {
                archived_event(
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                    r.get(5),
                    r.get(6),
                    r.get(7),
                )
            })
            .collect()
    }

    async fn count(&self) -> Result<u64, TargetError> {
        let sql = format!("SELECT count(*) FROM {}", self.quoted);
        let guard = self.connected().await?;
        let c = guard.as_ref().expect("connected");
        let n: i64 = c
            .query_one(&sql, &[])
            .await
            .map_err(|e| transient("counting the archive", e))?
            .get(0);
        Ok(n as u64)
    }
}

/// A page of the archive in `(origin, epoch, seq)` order: `$1..$3` the
/// cursor when `keyset`, then the origin (or NULL) and the limit.
pub fn read_sql(table: &str, keyset: bool) -> String {
    let (after, origin, limit) = if keyset {
        (
            "(origin, epoch, seq) > ($1::text, $2::int8, $3::int8) AND ",
            "$4",
            "$5",
        )
    } else {
        ("", "$1", "$2")
    };
    format!(
        "SELECT event_id::text, origin, epoch, seq, type, entity_key, \
                to_char(event_ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), data::text \
         FROM {} WHERE {after}({origin}::text IS NULL OR origin = {origin}::text) \
         ORDER BY origin, epoch, seq LIMIT {limit}::int8",
        quote_table(table)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_keyed_by_event_and_indexed_for_ranges_and_time() {
        let sql = ddl("public.sitesync_archive");
        assert!(sql.contains("\"public\".\"sitesync_archive\""), "{sql}");
        assert!(sql.contains("event_id uuid PRIMARY KEY"), "{sql}");
        assert!(sql.contains("(origin, epoch, seq)"), "{sql}");
        assert!(
            sql.contains("(received_at)") && sql.contains("(event_ts)"),
            "{sql}"
        );
        let insert = insert_sql("app.archive");
        assert!(
            insert.starts_with("INSERT INTO \"app\".\"archive\""),
            "{insert}"
        );
        assert!(
            insert.ends_with("ON CONFLICT (event_id) DO NOTHING"),
            "{insert}"
        );
    }
}
