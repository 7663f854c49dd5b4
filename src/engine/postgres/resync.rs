//! Resync on PostgreSQL: the snapshot and the jobs' rows.
//!
//! - The snapshot is a `REPEATABLE READ READ ONLY` transaction: every page
//!   of every table sees the database as it was at its first statement.
//!   It holds back vacuum for its duration, as any long read does.
//! - A page is one statement: the rows after the cursor in key order
//!   (`(r.k1, r.k2) > (…)`, each cursor value typed by the table itself
//!   through `jsonb_populate_record`, so the primary key's index serves
//!   it), each row's entity key and data written by the same SQL as the
//!   capture triggers ([`super::capture::key_expr`], [`super::capture::data_expr`]),
//!   and its version from `sitesync_versions` (a join on its primary key).
//! - Jobs are rows of `sitesync_resync`; their locks rows of
//!   `sitesync_resync_locks` (one per target site and table, the primary
//!   key refusing a second holder); whether a job runs is a session-level
//!   advisory lock on `(LOCK_CLASS, job)`, which PostgreSQL releases when
//!   the process holding it dies.

use super::capture::{data_expr, key_expr};
use super::settings::Settings;
use super::target::{describe, quote, quote_table};
use crate::config::{ConnectorConfig, redact_url};
use crate::error::{Cause, TargetError};
use crate::resync::{ClaimError, Cursor, Job, Request, Resync, Row, Snapshot, Stored, Table};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use tokio_postgres::Client;

/// The first key of the advisory locks of resync jobs (`syrc`).
const LOCK_CLASS: i32 = 0x7379_7263;

/// The jobs' tables (idempotent).
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sitesync_resync (
    job bigserial PRIMARY KEY,
    to_site text NOT NULL,
    request jsonb NOT NULL,
    started_by text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    attempt integer NOT NULL DEFAULT 1,
    total bigint,
    confirmed bigint NOT NULL DEFAULT 0,
    cursor jsonb,
    result text,
    error text
);
CREATE TABLE IF NOT EXISTS sitesync_resync_locks (
    to_site text NOT NULL,
    entity text NOT NULL,
    job bigint NOT NULL,
    PRIMARY KEY (to_site, entity)
);
"#;

/// Resync on one PostgreSQL database.
pub struct PgResync {
    url: String,
    /// The outbox, quoted (a write waiting there is left out).
    outbox: String,
    outbox_parts: (String, String),
    pg: tokio_postgres::Config,
    /// The connection that holds this process's job (its advisory lock).
    state: Option<Client>,
}

impl PgResync {
    pub fn new(_cfg: &ConnectorConfig, db: &Settings) -> Result<PgResync, TargetError> {
        let pg = db.url.parse().map_err(|e| {
            TargetError::operator(
                Cause::Config,
                format!("database.url `{}`: {e}", redact_url(&db.url)),
            )
        })?;
        let (schema, table) = db.outbox_parts();
        Ok(PgResync {
            url: db.url.clone(),
            outbox: format!("{}.{}", quote(schema), quote(table)),
            outbox_parts: (schema.to_string(), table.to_string()),
            pg,
            state: None,
        })
    }

    async fn connect(&self) -> Result<Client, String> {
        let (client, connection) = self
            .pg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connecting to {}: {e}", redact_url(&self.url)))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// The state connection, with the jobs' tables created.
    async fn state(&mut self) -> Result<&mut Client, String> {
        if self.state.is_none() {
            let client = self.connect().await?;
            client
                .batch_execute(SCHEMA)
                .await
                .map_err(|e| format!("creating sitesync_resync: {}", describe(&e)))?;
            self.state = Some(client);
        }
        Ok(self.state.as_mut().expect("just set"))
    }
}

fn db(what: &str) -> impl Fn(tokio_postgres::Error) -> ClaimError + '_ {
    move |e| ClaimError::Database(format!("{what}: {}", describe(&e)))
}

/// Whether another session holds `job` (tries its lock, and gives it back).
async fn running(client: &Client, job: i64) -> Result<bool, ClaimError> {
    let got: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2::int4)",
            &[&LOCK_CLASS, &(job as i32)],
        )
        .await
        .map_err(db("locking a resync job"))?
        .get(0);
    if got {
        client
            .execute(
                "SELECT pg_advisory_unlock($1, $2::int4)",
                &[&LOCK_CLASS, &(job as i32)],
            )
            .await
            .map_err(db("unlocking a resync job"))?;
    }
    Ok(!got)
}

async fn read_job(client: &Client, job: i64) -> Result<Job, ClaimError> {
    let row = client
        .query_opt(
            "SELECT to_site, request::text, attempt::int8, confirmed, cursor::text, result, error \
             FROM sitesync_resync WHERE job = $1",
            &[&job],
        )
        .await
        .map_err(db("reading sitesync_resync"))?
        .ok_or(ClaimError::Unknown(job))?;
    let request: Request = serde_json::from_str(row.get::<_, &str>(1))
        .map_err(|e| ClaimError::Database(format!("job {job}'s request: {e}")))?;
    let cursor: Option<Cursor> = match row.get::<_, Option<&str>>(4) {
        None => None,
        Some(text) => Some(
            serde_json::from_str(text)
                .map_err(|e| ClaimError::Database(format!("job {job}'s cursor: {e}")))?,
        ),
    };
    Ok(Job {
        id: job,
        to_site: row.get(0),
        request,
        attempt: row.get(2),
        confirmed: row.get(3),
        cursor,
        result: row.get(5),
        error: row.get(6),
        running: false,
    })
}

impl Resync for PgResync {
    type Snapshot = PgSnapshot;

    async fn snapshot(&self) -> Result<PgSnapshot, String> {
        let client = self.connect().await?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| format!("starting the snapshot: {}", describe(&e)))?;
        // The first statement takes the snapshot.
        let time: DateTime<Utc> = client
            .query_one("SELECT clock_timestamp()", &[])
            .await
            .map_err(|e| format!("starting the snapshot: {}", describe(&e)))?
            .get(0);
        let keyed: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 AND column_name = 'entity_key')",
                &[&self.outbox_parts.0, &self.outbox_parts.1],
            )
            .await
            .map_err(|e| format!("reading the outbox's columns: {}", describe(&e)))?
            .get(0);
        Ok(PgSnapshot {
            client,
            time,
            outbox: keyed.then(|| self.outbox.clone()),
        })
    }

    async fn start(
        &mut self,
        to_site: &str,
        entities: &[String],
        request: &Request,
        who: &str,
    ) -> Result<Job, ClaimError> {
        let request_text = serde_json::to_string(request).expect("a request always serialises");
        let client = self.state().await.map_err(ClaimError::Database)?;
        let tx = client
            .transaction()
            .await
            .map_err(db("starting a resync job"))?;
        let job: i64 = tx
            .query_one(
                "INSERT INTO sitesync_resync (to_site, request, started_by) VALUES ($1, $2::text::jsonb, $3) RETURNING job",
                &[&to_site, &request_text, &who],
            )
            .await
            .map_err(db("inserting into sitesync_resync"))?
            .get(0);
        for entity in entities {
            let taken = tx
                .execute(
                    "INSERT INTO sitesync_resync_locks (to_site, entity, job) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&to_site, entity, &job],
                )
                .await
                .map_err(db("inserting into sitesync_resync_locks"))?;
            if taken == 0 {
                let holder: i64 = tx
                    .query_one(
                        "SELECT job FROM sitesync_resync_locks WHERE to_site = $1 AND entity = $2",
                        &[&to_site, entity],
                    )
                    .await
                    .map_err(db("reading sitesync_resync_locks"))?
                    .get(0);
                tx.rollback().await.map_err(db("rolling back"))?;
                let client = self.state.as_ref().expect("open");
                return Err(ClaimError::Busy {
                    entity: entity.clone(),
                    to_site: to_site.to_string(),
                    job: holder,
                    running: running(client, holder).await?,
                });
            }
        }
        tx.commit().await.map_err(db("committing a resync job"))?;
        let client = self.state.as_ref().expect("open");
        let held: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2::int4)",
                &[&LOCK_CLASS, &(job as i32)],
            )
            .await
            .map_err(db("locking a resync job"))?
            .get(0);
        if !held {
            return Err(ClaimError::Running(job));
        }
        read_job(client, job).await
    }

    async fn resume(&mut self, job: i64) -> Result<Job, ClaimError> {
        let client = self.state().await.map_err(ClaimError::Database)?;
        let found = read_job(client, job).await?;
        if let Some(result) = found.result {
            return Err(ClaimError::Finished { job, result });
        }
        let held: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2::int4)",
                &[&LOCK_CLASS, &(job as i32)],
            )
            .await
            .map_err(db("locking a resync job"))?
            .get(0);
        if !held {
            return Err(ClaimError::Running(job));
        }
        client
            .execute(
                "UPDATE sitesync_resync SET attempt = attempt + 1, error = NULL, updated_at = now() WHERE job = $1",
                &[&job],
            )
            .await
            .map_err(db("updating sitesync_resync"))?;
        read_job(client, job).await
    }

    async fn job(&mut self, job: i64) -> Result<Job, ClaimError> {
        let client = self.state().await.map_err(ClaimError::Database)?;
        let mut found = read_job(client, job).await?;
        found.running = found.result.is_none() && running(client, job).await?;
        Ok(found)
    }

    async fn progress(
        &mut self,
        job: i64,
        total: i64,
        confirmed: i64,
        cursor: Option<&Cursor>,
        error: Option<&str>,
    ) -> Result<(), String> {
        let cursor = cursor.map(|c| serde_json::to_string(c).expect("a cursor serialises"));
        let client = self.state().await?;
        client
            .execute(
                "UPDATE sitesync_resync SET confirmed = $2, cursor = $3::text::jsonb, error = $4, total = $5, updated_at = now() WHERE job = $1",
                &[&job, &confirmed, &cursor, &error, &total],
            )
            .await
            .map_err(|e| format!("saving job {job}'s progress: {}", describe(&e)))?;
        Ok(())
    }

    async fn finish(&mut self, job: i64, result: &str) -> Result<(), String> {
        let client = self.state().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| format!("ending job {job}: {}", describe(&e)))?;
        tx.execute(
            "UPDATE sitesync_resync SET result = $2, finished_at = now(), updated_at = now() WHERE job = $1",
            &[&job, &result],
        )
        .await
        .map_err(|e| format!("ending job {job}: {}", describe(&e)))?;
        tx.execute("DELETE FROM sitesync_resync_locks WHERE job = $1", &[&job])
            .await
            .map_err(|e| format!("releasing job {job}'s locks: {}", describe(&e)))?;
        tx.commit()
            .await
            .map_err(|e| format!("ending job {job}: {}", describe(&e)))?;
        client
            .execute(
                "SELECT pg_advisory_unlock($1, $2::int4)",
                &[&LOCK_CLASS, &(job as i32)],
            )
            .await
            .map_err(|e| format!("unlocking job {job}: {}", describe(&e)))?;
        Ok(())
    }
}

/// A read-only snapshot: a connection inside a REPEATABLE READ
/// transaction.
pub struct PgSnapshot {
    client: Client,
    time: DateTime<Utc>,
    /// The outbox, when it has an `entity_key` column to find a row's
    /// waiting writes by.
    outbox: Option<String>,
}

/// The condition "after the cursor `$n`" on the key of `table` (alias
/// `r`), or `true` without a cursor.
fn after(table: &Table, param: usize, with_cursor: bool) -> String {
    if !with_cursor {
        return "true".to_string();
    }
    let qtable = quote_table(&table.table);
    let cols: Vec<String> = table
        .side
        .key
        .iter()
        .map(|c| format!("r.{}", quote(&c.name)))
        .collect();
    let values: Vec<String> = table
        .side
        .key
        .iter()
        .map(|c| {
            format!(
                "(SELECT c.{} FROM jsonb_populate_record(NULL::{qtable}, ${param}::text::jsonb) c)",
                quote(&c.name)
            )
        })
        .collect();
    format!("({}) > ({})", cols.join(", "), values.join(", "))
}

fn filter(table: &Table) -> String {
    match &table.filter {
        Some(f) => format!("({f})"),
        None => "true".to_string(),
    }
}

/// The statement of a page (`$1` the entity, `$2` the table's route
/// types, `$3` the cursor), with whether a write to the row waits in
/// `outbox`.
pub fn page_sql(table: &Table, outbox: Option<&str>, with_cursor: bool, limit: usize) -> String {
    let key = key_expr("r", &table.side);
    let data = data_expr("r", &table.columns, &table.side.fields);
    let cursor = table
        .side
        .key
        .iter()
        .map(|c| format!("'{}', r.{}", c.name.replace('\'', "''"), quote(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let order = table
        .side
        .key
        .iter()
        .map(|c| format!("r.{}", quote(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let pending = match outbox {
        Some(o) => format!(
            "EXISTS (SELECT 1 FROM {o} o WHERE o.entity_key = ({key}) AND o.type = ANY($2::text[]))"
        ),
        None => "($2::text[] IS NULL AND false)".to_string(),
    };
    format!(
        "SELECT {key} AS k, ({data})::text AS d, jsonb_build_object({cursor})::text AS c, v.ts, v.origin::text, v.event_id, {pending} \
         FROM {} r LEFT JOIN sitesync_versions v ON v.entity = $1::text AND v.key = ({key}) \
         WHERE {} AND {} ORDER BY {order} LIMIT {limit}",
        quote_table(&table.table),
        after(table, 3, with_cursor),
        filter(table),
    )
}

/// The statement that counts the rows after the cursor (`$1`).
pub fn count_sql(table: &Table, with_cursor: bool) -> String {
    format!(
        "SELECT count(*) FROM {} r WHERE {} AND {}",
        quote_table(&table.table),
        after(table, 1, with_cursor),
        filter(table),
    )
}

impl Snapshot for PgSnapshot {
    fn time(&self) -> DateTime<Utc> {
        self.time
    }

    async fn versions(
        &mut self,
        entity: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Stored>, String> {
        self.read_versions(entity, keys).await
    }

    async fn count(&mut self, table: &Table, after: Option<&str>) -> Result<u64, String> {
        let sql = count_sql(table, after.is_some());
        let row = match after {
            Some(a) => self.client.query_one(&sql, &[&a]).await,
            None => self.client.query_one(&sql, &[]).await,
        }
        .map_err(|e| format!("counting the rows of {}: {}", table.table, describe(&e)))?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    async fn page(
        &mut self,
        table: &Table,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Row>, String> {
        let sql = page_sql(table, self.outbox.as_deref(), after.is_some(), limit);
        let rows = match after {
            Some(a) => {
                self.client
                    .query(&sql, &[&table.entity, &table.kinds, &a])
                    .await
            }
            None => {
                self.client
                    .query(&sql, &[&table.entity, &table.kinds])
                    .await
            }
        }
        .map_err(|e| format!("reading {}: {}", table.table, describe(&e)))?;
        rows.iter()
            .map(|r| {
                let key: Option<String> = r.get(0);
                let key =
                    key.ok_or_else(|| format!("a row of {} has a NULL key column", table.table))?;
                let ts: Option<DateTime<Utc>> = r.get(3);
                let origin: Option<String> = r.get(4);
                let event_id: Option<uuid::Uuid> = r.get(5);
                Ok(Row {
                    key,
                    data: r.get(1),
                    cursor: r.get(2),
                    version: match (ts, origin, event_id) {
                        (Some(ts), Some(origin), Some(event_id)) => Some(Stored {
                            ts,
                            origin,
                            event_id,
                        }),
                        _ => None,
                    },
                    pending: r.get(6),
                })
            })
            .collect()
    }
}

impl PgSnapshot {
    async fn read_versions(
        &mut self,
        entity: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Stored>, String> {
        let rows = self
            .client
            .query(
                "SELECT key, ts, origin::text, event_id FROM sitesync_versions WHERE entity = $1 AND key = ANY($2)",
                &[&entity, &keys],
            )
            .await
            .map_err(|e| format!("reading the versions of {entity}: {}", describe(&e)))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    Stored {
                        ts: r.get(1),
                        origin: r.get(2),
                        event_id: r.get(3),
                    },
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Column, Field, Side};

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            route_name: name.into(),
            ty: ty.into(),
            scale: 0,
        }
    }

    #[test]
    fn a_page_is_keyset_paginated_with_the_rows_version() {
        let t = Table {
            table: "shop.item".into(),
            entity: "shop.item".into(),
            columns: vec!["region".into(), "id".into(), "label".into()],
            side: Side {
                kind: "item.upsert".into(),
                key: vec![col("region", "text"), col("id", "int4")],
                fields: vec![
                    Field {
                        column: col("region", "text"),
                        field: "region".into(),
                    },
                    Field {
                        column: col("id", "int4"),
                        field: "id".into(),
                    },
                    Field {
                        column: col("label", "text"),
                        field: "name".into(),
                    },
                ],
            },
            filter: Some("r.id > 10".into()),
            kinds: vec!["item.upsert".into(), "item.delete".into()],
        };
        let first = page_sql(&t, Some("\"public\".\"outbox\""), false, 1000);
        assert!(
            first.contains("WHERE true AND (r.id > 10) ORDER BY r.\"region\", r.\"id\" LIMIT 1000"),
            "{first}"
        );
        assert!(
            first.contains("LEFT JOIN sitesync_versions v ON v.entity = $1::text AND v.key = ("),
            "{first}"
        );
        assert!(
            first.contains("jsonb_build_object('region', r.\"region\", 'id', r.\"id\")::text AS c"),
            "{first}"
        );
        assert!(
            first.contains("jsonb_build_object('name', r.\"label\")"),
            "the renamed column under its field: {first}"
        );
        assert!(
            first.contains("EXISTS (SELECT 1 FROM \"public\".\"outbox\" o WHERE o.entity_key = ("),
            "a write waiting in the outbox: {first}"
        );
        let next = page_sql(&t, None, true, 1000);
        assert!(next.contains("($2::text[] IS NULL AND false)"), "{next}");
        assert!(
            next.contains("(r.\"region\", r.\"id\") > ((SELECT c.\"region\" FROM jsonb_populate_record(NULL::\"shop\".\"item\", $3::text::jsonb) c), (SELECT c.\"id\" FROM jsonb_populate_record(NULL::\"shop\".\"item\", $3::text::jsonb) c))"),
            "{next}"
        );
        let count = count_sql(&t, true);
        assert!(count.starts_with("SELECT count(*) FROM \"shop\".\"item\" r WHERE (r.\"region\", r.\"id\") > ((SELECT c.\"region\" FROM jsonb_populate_record(NULL::\"shop\".\"item\", $1::text::jsonb)"), "{count}");
    }
}
