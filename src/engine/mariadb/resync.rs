//! Resync on MariaDB (and MySQL): the snapshot and the jobs' rows.
//!
//! - The snapshot is `START TRANSACTION WITH CONSISTENT SNAPSHOT, READ
//!   ONLY` under REPEATABLE READ: every page of every table reads InnoDB's
//!   view of its first read.
//! - A page is one statement: the rows after the cursor in key order
//!   (`(r.k1, r.k2) > (JSON_VALUE(?, '$."k1"'), …)`, the cursor being the
//!   row's key columns as `JSON_OBJECT`), each row's entity key and data
//!   written by the same SQL as the capture triggers
//!   ([`super::capture::key_expr`], [`super::capture::data_expr`]), its
//!   version from `sitesync_versions`, and whether a write to it waits in
//!   the outbox.
//! - Jobs are rows of `sitesync_resync`, their locks rows of
//!   `sitesync_resync_locks` (the primary key refusing a second holder);
//!   whether a job runs is the named lock `sitesync_resync_<job>`
//!   (`GET_LOCK`), which the server releases when the session ends.

use super::capture::{data_expr, key_expr};
use super::conn::{self, literal, quote, quote_table};
use super::settings::Settings;
use crate::config::{ConnectorConfig, redact_url};
use crate::error::TargetError;
use crate::resync::{ClaimError, Cursor, Job, Request, Resync, Row, Snapshot, Stored, Table};
use chrono::{DateTime, NaiveDateTime, Utc};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Value};
use std::collections::HashMap;

/// The jobs' tables (idempotent).
pub const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS sitesync_resync (
    job bigint NOT NULL AUTO_INCREMENT PRIMARY KEY,
    to_site varchar(64) NOT NULL,
    request text NOT NULL,
    started_by varchar(255) NOT NULL,
    started_at datetime(6) NOT NULL DEFAULT UTC_TIMESTAMP(6),
    updated_at datetime(6) NOT NULL DEFAULT UTC_TIMESTAMP(6),
    finished_at datetime(6) NULL,
    attempt int NOT NULL DEFAULT 1,
    total bigint NULL,
    confirmed bigint NOT NULL DEFAULT 0,
    `cursor` text NULL,
    result varchar(64) NULL,
    error text NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
    "CREATE TABLE IF NOT EXISTS sitesync_resync_locks (
    to_site varchar(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    entity varchar(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    job bigint NOT NULL,
    PRIMARY KEY (to_site, entity)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
];

/// Resync on one MariaDB database.
pub struct MariaDbResync {
    url: String,
    opts: Opts,
    /// The outbox, quoted.
    outbox: String,
    /// The connection that holds this process's job (its named lock).
    state: Option<Conn>,
}

impl MariaDbResync {
    pub fn new(_cfg: &ConnectorConfig, db: &Settings) -> Result<MariaDbResync, TargetError> {
        Ok(MariaDbResync {
            url: db.url.clone(),
            opts: conn::opts(db)?,
            outbox: quote_table(&db.outbox_table),
            state: None,
        })
    }

    async fn connect(&self) -> Result<Conn, String> {
        Conn::new(self.opts.clone()).await.map_err(|e| {
            format!(
                "connecting to {}: {}",
                redact_url(&self.url),
                conn::describe(&e)
            )
        })
    }

    async fn state(&mut self) -> Result<&mut Conn, String> {
        if self.state.is_none() {
            let mut c = self.connect().await?;
            for s in SCHEMA {
                c.query_drop(s)
                    .await
                    .map_err(|e| format!("creating sitesync_resync: {}", conn::describe(&e)))?;
            }
            self.state = Some(c);
        }
        Ok(self.state.as_mut().expect("just set"))
    }
}

fn db(what: &str) -> impl Fn(mysql_async::Error) -> ClaimError + '_ {
    move |e| ClaimError::Database(format!("{what}: {}", conn::describe(&e)))
}

/// The named lock of a job.
fn lock_name(job: i64) -> String {
    format!("sitesync_resync_{job}")
}

/// Whether another session holds `job`.
async fn running(c: &mut Conn, job: i64) -> Result<bool, ClaimError> {
    let free: Option<i64> = c
        .exec_first("SELECT IS_FREE_LOCK(?)", (lock_name(job),))
        .await
        .map_err(db("reading a resync job's lock"))?;
    Ok(free == Some(0))
}

/// Takes the named lock of `job` for this session; whether it got it.
async fn hold(c: &mut Conn, job: i64) -> Result<bool, ClaimError> {
    let got: Option<i64> = c
        .exec_first("SELECT GET_LOCK(?, 0)", (lock_name(job),))
        .await
        .map_err(db("locking a resync job"))?;
    Ok(got == Some(1))
}

fn text(v: &Value) -> Option<String> {
    super::target::text(Some(v))
}

async fn read_job(c: &mut Conn, job: i64) -> Result<Job, ClaimError> {
    let row: Option<mysql_async::Row> = c
        .exec_first(
            "SELECT to_site, request, attempt, confirmed, `cursor`, result, error FROM sitesync_resync WHERE job = ?",
            (job,),
        )
        .await
        .map_err(db("reading sitesync_resync"))?;
    let row = row.ok_or(ClaimError::Unknown(job))?;
    let at = |i: usize| row.as_ref(i).and_then(text);
    let request: Request = serde_json::from_str(&at(1).unwrap_or_default())
        .map_err(|e| ClaimError::Database(format!("job {job}'s request: {e}")))?;
    let cursor: Option<Cursor> = match at(4) {
        None => None,
        Some(t) => Some(
            serde_json::from_str(&t)
                .map_err(|e| ClaimError::Database(format!("job {job}'s cursor: {e}")))?,
        ),
    };
    Ok(Job {
        id: job,
        to_site: at(0).unwrap_or_default(),
        request,
        attempt: at(2).and_then(|t| t.parse().ok()).unwrap_or(1),
        confirmed: at(3).and_then(|t| t.parse().ok()).unwrap_or(0),
        cursor,
        result: at(5),
        error: at(6),
        running: false,
    })
}

impl Resync for MariaDbResync {
    type Snapshot = MariaDbSnapshot;

    async fn snapshot(&self) -> Result<MariaDbSnapshot, String> {
        let mut c = self.connect().await?;
        let start =
            |e: mysql_async::Error| format!("starting the snapshot: {}", conn::describe(&e));
        c.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await
            .map_err(start)?;
        c.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            .await
            .map_err(start)?;
        let now: Option<Value> = c
            .query_first("SELECT DATE_FORMAT(UTC_TIMESTAMP(6), '%Y-%m-%dT%H:%i:%s.%fZ')")
            .await
            .map_err(start)?;
        let time = now
            .as_ref()
            .and_then(text)
            .and_then(|t| crate::event::parse_timestamp(&t))
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        Ok(MariaDbSnapshot {
            conn: c,
            time,
            outbox: self.outbox.clone(),
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
        let c = self.state().await.map_err(ClaimError::Database)?;
        c.query_drop("START TRANSACTION")
            .await
            .map_err(db("starting a resync job"))?;
        c.exec_drop(
            "INSERT INTO sitesync_resync (to_site, request, started_by) VALUES (?, ?, ?)",
            (to_site, request_text.as_str(), who),
        )
        .await
        .map_err(db("inserting into sitesync_resync"))?;
        let job = c.last_insert_id().unwrap_or(0) as i64;
        for entity in entities {
            c.exec_drop(
                "INSERT IGNORE INTO sitesync_resync_locks (to_site, entity, job) VALUES (?, ?, ?)",
                (to_site, entity, job),
            )
            .await
            .map_err(db("inserting into sitesync_resync_locks"))?;
            if c.affected_rows() == 0 {
                let holder: Option<i64> = c
                    .exec_first(
                        "SELECT job FROM sitesync_resync_locks WHERE to_site = ? AND entity = ?",
                        (to_site, entity),
                    )
                    .await
                    .map_err(db("reading sitesync_resync_locks"))?;
                c.query_drop("ROLLBACK").await.map_err(db("rolling back"))?;
                let holder = holder.unwrap_or(0);
                return Err(ClaimError::Busy {
                    entity: entity.clone(),
                    to_site: to_site.to_string(),
                    job: holder,
                    running: running(c, holder).await?,
                });
            }
        }
        c.query_drop("COMMIT")
            .await
            .map_err(db("committing a resync job"))?;
        if !hold(c, job).await? {
            return Err(ClaimError::Running(job));
        }
        read_job(c, job).await
    }

    async fn resume(&mut self, job: i64) -> Result<Job, ClaimError> {
        let c = self.state().await.map_err(ClaimError::Database)?;
        let found = read_job(c, job).await?;
        if let Some(result) = found.result {
            return Err(ClaimError::Finished { job, result });
        }
        if !hold(c, job).await? {
            return Err(ClaimError::Running(job));
        }
        c.exec_drop(
            "UPDATE sitesync_resync SET attempt = attempt + 1, error = NULL, updated_at = UTC_TIMESTAMP(6) WHERE job = ?",
            (job,),
        )
        .await
        .map_err(db("updating sitesync_resync"))?;
        read_job(c, job).await
    }

    async fn job(&mut self, job: i64) -> Result<Job, ClaimError> {
        let c = self.state().await.map_err(ClaimError::Database)?;
        let mut found = read_job(c, job).await?;
        found.running = found.result.is_none() && running(c, job).await?;
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
        let c = self.state().await?;
        c.exec_drop(
            "UPDATE sitesync_resync SET confirmed = ?, `cursor` = ?, error = ?, total = ?, updated_at = UTC_TIMESTAMP(6) WHERE job = ?",
            (confirmed, cursor, error, total, job),
        )
        .await
        .map_err(|e| format!("saving job {job}'s progress: {}", conn::describe(&e)))
    }

    async fn finish(&mut self, job: i64, result: &str) -> Result<(), String> {
        let c = self.state().await?;
        let fail = |e: mysql_async::Error| format!("ending job {job}: {}", conn::describe(&e));
        c.query_drop("START TRANSACTION").await.map_err(fail)?;
        c.exec_drop(
            "UPDATE sitesync_resync SET result = ?, finished_at = UTC_TIMESTAMP(6), updated_at = UTC_TIMESTAMP(6) WHERE job = ?",
            (result, job),
        )
        .await
        .map_err(fail)?;
        c.exec_drop("DELETE FROM sitesync_resync_locks WHERE job = ?", (job,))
            .await
            .map_err(fail)?;
        c.query_drop("COMMIT").await.map_err(fail)?;
        c.exec_drop("DO RELEASE_LOCK(?)", (lock_name(job),))
            .await
            .map_err(fail)
    }
}

/// A read-only snapshot: a connection inside a consistent-snapshot
/// transaction.
pub struct MariaDbSnapshot {
    conn: Conn,
    time: DateTime<Utc>,
    outbox: String,
}

/// The condition "after the cursor" on the key of `table` (alias `r`), one
/// `?` per key column (each bound to the cursor), or `TRUE` without one.
fn after(table: &Table, with_cursor: bool) -> String {
    if !with_cursor {
        return "TRUE".to_string();
    }
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
                "JSON_VALUE(?, {})",
                literal(&format!("$.\"{}\"", c.name.replace('"', "\\\"")))
            )
        })
        .collect();
    format!("({}) > ({})", cols.join(", "), values.join(", "))
}

fn filter(table: &Table) -> String {
    match &table.filter {
        Some(f) => format!("({f})"),
        None => "TRUE".to_string(),
    }
}

/// The statement of a page: parameters the entity, then the cursor once
/// per key column.
pub fn page_sql(table: &Table, outbox: &str, with_cursor: bool, limit: usize) -> String {
    let key = key_expr("r", &table.side);
    let data = data_expr("r", &table.side.fields);
    let cursor = table
        .side
        .key
        .iter()
        .map(|c| format!("{}, r.{}", literal(&c.name), quote(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let order = table
        .side
        .key
        .iter()
        .map(|c| format!("r.{}", quote(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let kinds = match table.kinds.is_empty() {
        true => "NULL".to_string(),
        false => table
            .kinds
            .iter()
            .map(|k| literal(k))
            .collect::<Vec<_>>()
            .join(", "),
    };
    format!(
        "SELECT {key} AS k, {data} AS d, JSON_OBJECT({cursor}) AS c, \
         DATE_FORMAT(v.ts, '%Y-%m-%dT%H:%i:%s.%fZ'), v.origin, v.event_id, \
         EXISTS (SELECT 1 FROM {outbox} o WHERE o.`entity_key` = {key} AND o.`type` IN ({kinds})) \
         FROM {} r LEFT JOIN sitesync_versions v ON v.entity = ? AND v.`key` = {key} \
         WHERE {} AND {} ORDER BY {order} LIMIT {limit}",
        quote_table(&table.table),
        after(table, with_cursor),
        filter(table),
    )
}

/// The statement that counts the rows after the cursor.
pub fn count_sql(table: &Table, with_cursor: bool) -> String {
    format!(
        "SELECT COUNT(*) FROM {} r WHERE {} AND {}",
        quote_table(&table.table),
        after(table, with_cursor),
        filter(table),
    )
}

/// The parameters of a statement: `first`, then the cursor once per key
/// column.
fn params(table: &Table, first: Option<&str>, after: Option<&str>) -> Vec<Value> {
    let mut out: Vec<Value> = first.into_iter().map(Value::from).collect();
    if let Some(a) = after {
        out.extend(table.side.key.iter().map(|_| Value::from(a)));
    }
    out
}

impl Snapshot for MariaDbSnapshot {
    fn time(&self) -> DateTime<Utc> {
        self.time
    }

    async fn versions(
        &mut self,
        entity: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Stored>, String> {
        let mut out = HashMap::new();
        for chunk in keys.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let mut params: Vec<Value> = vec![Value::from(entity)];
            params.extend(chunk.iter().map(|k| Value::from(k.as_str())));
            let rows: Vec<mysql_async::Row> = self
                .conn
                .exec(
                    format!(
                        "SELECT `key`, DATE_FORMAT(ts, '%Y-%m-%dT%H:%i:%s.%fZ'), origin, event_id FROM sitesync_versions WHERE entity = ? AND `key` IN ({marks})"
                    ),
                    params,
                )
                .await
                .map_err(|e| format!("reading the versions of {entity}: {}", conn::describe(&e)))?;
            for r in rows {
                let at = |i: usize| r.as_ref(i).and_then(text);
                let ts = at(1).and_then(|t| crate::event::parse_timestamp(&t));
                let id = at(3).and_then(|t| uuid::Uuid::parse_str(&t).ok());
                if let (Some(key), Some(ts), Some(origin), Some(event_id)) = (at(0), ts, at(2), id)
                {
                    out.insert(
                        key,
                        Stored {
                            ts,
                            origin,
                            event_id,
                        },
                    );
                }
            }
        }
        Ok(out)
    }

    async fn count(&mut self, table: &Table, after: Option<&str>) -> Result<u64, String> {
        let n: Option<u64> = self
            .conn
            .exec_first(
                count_sql(table, after.is_some()),
                params(table, None, after),
            )
            .await
            .map_err(|e| {
                format!(
                    "counting the rows of {}: {}",
                    table.table,
                    conn::describe(&e)
                )
            })?;
        Ok(n.unwrap_or(0))
    }

    async fn page(
        &mut self,
        table: &Table,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Row>, String> {
        let sql = page_sql(table, &self.outbox, after.is_some(), limit);
        let rows: Vec<mysql_async::Row> = self
            .conn
            .exec(sql, params(table, Some(&table.entity), after))
            .await
            .map_err(|e| format!("reading {}: {}", table.table, conn::describe(&e)))?;
        rows.iter()
            .map(|r| {
                let at = |i: usize| r.as_ref(i).and_then(text);
                let key = at(0)
                    .ok_or_else(|| format!("a row of {} has a NULL key column", table.table))?;
                let ts = at(3).and_then(|t| {
                    NaiveDateTime::parse_from_str(t.trim_end_matches('Z'), "%Y-%m-%dT%H:%M:%S%.f")
                        .ok()
                        .map(|n| n.and_utc())
                });
                let event_id = at(5).and_then(|t| uuid::Uuid::parse_str(&t).ok());
                Ok(Row {
                    key,
                    data: at(1).unwrap_or_else(|| "{}".into()),
                    cursor: at(2).unwrap_or_else(|| "{}".into()),
                    version: match (ts, at(4), event_id) {
                        (Some(ts), Some(origin), Some(event_id)) => Some(Stored {
                            ts,
                            origin,
                            event_id,
                        }),
                        _ => None,
                    },
                    pending: at(6).is_some_and(|t| t == "1"),
                })
            })
            .collect()
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
    fn a_page_is_keyset_paginated_with_the_rows_version_and_waiting_writes() {
        let t = Table {
            table: "item".into(),
            entity: "public.item".into(),
            columns: vec!["region".into(), "id".into()],
            side: Side {
                kind: "item.upsert".into(),
                key: vec![col("region", "varchar"), col("id", "int")],
                fields: vec![
                    Field {
                        column: col("region", "varchar"),
                        field: "region".into(),
                    },
                    Field {
                        column: col("id", "int"),
                        field: "id".into(),
                    },
                ],
            },
            filter: None,
            kinds: vec!["item.upsert".into(), "item.delete".into()],
        };
        let first = page_sql(&t, "`outbox`", false, 500);
        assert!(
            first.contains("WHERE TRUE AND TRUE ORDER BY r.`region`, r.`id` LIMIT 500"),
            "{first}"
        );
        assert!(
            first.contains("JSON_OBJECT('region', r.`region`, 'id', r.`id`) AS c"),
            "{first}"
        );
        assert!(
            first.contains("o.`type` IN ('item.upsert', 'item.delete')"),
            "{first}"
        );
        assert!(
            first.contains("LEFT JOIN sitesync_versions v ON v.entity = ? AND v.`key` = CONCAT("),
            "{first}"
        );
        let next = page_sql(&t, "`outbox`", true, 500);
        assert!(
            next.contains(
                "(r.`region`, r.`id`) > (JSON_VALUE(?, '$.\"region\"'), JSON_VALUE(?, '$.\"id\"'))"
            ),
            "{next}"
        );
        assert_eq!(params(&t, Some("public.item"), Some("{}")).len(), 3);
        assert_eq!(params(&t, None, None).len(), 0);
        assert!(
            count_sql(&t, true)
                .starts_with("SELECT COUNT(*) FROM `item` r WHERE (r.`region`, r.`id`) >")
        );
    }
}
