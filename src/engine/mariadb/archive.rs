//! The archive table in MariaDB and MySQL (see [`crate::archive`]).
//!
//! A batch is one transaction of multi-row inserts (a new statement every
//! [`CHUNK_ROWS`] rows or [`CHUNK_BYTES`] of payload, under the server's
//! `max_allowed_packet`), each `ON DUPLICATE KEY UPDATE event_id =
//! event_id`, which skips an event the table holds without `INSERT
//! IGNORE`'s habit of turning every other error into a warning. Times are
//! `datetime(6)` in UTC (a `timestamp` ends in 2038).

use super::conn::{self, Account, quote_table};
use super::settings::Settings;
use crate::archive::{Cursor, Store, archived_event, chunks};
use crate::checks::Check;
use crate::config::{ArchiveConfig, ConnectorConfig, redact_url};
use crate::error::TargetError;
use crate::event::Event;
use chrono::{DateTime, Utc};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool, Value};

/// Rows per insert statement, at most.
pub const CHUNK_ROWS: usize = 500;
/// Payload bytes per insert statement, about (one event larger than this
/// goes alone).
pub const CHUNK_BYTES: usize = 4 << 20;

/// The archive table of a MariaDB or MySQL site.
pub struct MariaDbArchive {
    url: String,
    pool: Pool,
    account: Account,
    /// As configured (`db.table` or `table`).
    name: String,
    /// Quoted.
    quoted: String,
}

/// The table and its indexes.
pub fn ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
    event_id char(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    origin varchar(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    type varchar(255) NOT NULL,
    entity_key text,
    event_ts datetime(6) NOT NULL,
    data longtext NOT NULL,
    received_at datetime(6) NOT NULL,
    KEY sitesync_archive_origin_seq (origin, epoch, seq),
    KEY sitesync_archive_received (received_at),
    KEY sitesync_archive_event_ts (event_ts)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
        quote_table(table)
    )
}

/// The insert of `rows` events.
pub fn insert_sql(table: &str, rows: usize) -> String {
    let tuple = "(?, ?, ?, ?, ?, ?, ?, ?, ?)";
    format!(
        "INSERT INTO {} (event_id, origin, epoch, seq, type, entity_key, event_ts, data, received_at) VALUES {} \
         ON DUPLICATE KEY UPDATE event_id = event_id",
        quote_table(table),
        vec![tuple; rows].join(", ")
    )
}

/// `YYYY-MM-DD HH:MM:SS.ffffff`, UTC.
fn datetime(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

impl MariaDbArchive {
    pub fn new(
        _cfg: &ConnectorConfig,
        db: &Settings,
        archive: &ArchiveConfig,
    ) -> Result<MariaDbArchive, TargetError> {
        let opts = conn::opts(db)?;
        let (schema, _) = db.outbox_parts();
        let name = archive.table_in(schema);
        Ok(MariaDbArchive {
            url: db.url.clone(),
            account: Account::of(&opts),
            pool: Pool::new(opts),
            quoted: quote_table(&name),
            name,
        })
    }

    async fn open(&self) -> Result<Conn, TargetError> {
        self.pool
            .get_conn()
            .await
            .map_err(|e| self.error(&format!("connecting to {}", redact_url(&self.url)), &e))
    }

    fn error(&self, context: &str, e: &mysql_async::Error) -> TargetError {
        let mut err: TargetError = conn::classify(context, &self.account, e).into();
        if conn::code(e) == Some(1146)
            && let TargetError::Operator { message, .. } = &mut err
        {
            message.push_str(": run `sitesync init`");
        }
        err
    }

    async fn insert(&self, c: &mut Conn, events: &[&Event]) -> Result<u64, TargetError> {
        let received = datetime(Utc::now());
        c.query_drop("START TRANSACTION")
            .await
            .map_err(|e| self.error("starting the archive batch", &e))?;
        let mut new = 0;
        for range in chunks(events, CHUNK_ROWS, CHUNK_BYTES) {
            let rows = &events[range];
            let mut params: Vec<Value> = Vec::with_capacity(rows.len() * 9);
            for e in rows {
                params.extend([
                    Value::from(e.id.to_string()),
                    Value::from(e.origin.as_str()),
                    Value::from(e.epoch as i64),
                    Value::from(e.seq as i64),
                    Value::from(e.kind.as_str()),
                    e.entity_key.as_deref().map_or(Value::NULL, Value::from),
                    Value::from(datetime(e.timestamp)),
                    Value::from(e.data.get()),
                    Value::from(received.as_str()),
                ]);
            }
            c.exec_drop(insert_sql(&self.name, rows.len()), params)
                .await
                .map_err(|e| self.error("archiving a batch", &e))?;
            // A skipped duplicate counts 0 (its update changes nothing).
            new += c.affected_rows();
        }
        c.query_drop("COMMIT")
            .await
            .map_err(|e| self.error("committing the archive batch", &e))?;
        Ok(new)
    }
}

impl Store for MariaDbArchive {
    fn table(&self) -> &str {
        &self.name
    }

    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let mut c = self.open().await?;
        c.query_drop(ddl(&self.name))
            .await
            .map_err(|e| self.error("creating the archive table", &e))?;
        Ok(vec![format!(
            "archive table {}: ready (indexed by origin, epoch, seq; received_at; event_ts)",
            self.name
        )])
    }

    async fn preflight(&self) -> Vec<Check> {
        let mut c = match self.open().await {
            Ok(c) => c,
            Err(e) => {
                return vec![Check::fail(
                    "archive table",
                    e.to_string(),
                    "check database.url",
                )];
            }
        };
        let (db, table) = match self.name.split_once('.') {
            Some((d, t)) => (Some(d.to_string()), t.to_string()),
            None => (None, self.name.clone()),
        };
        let found: Result<Option<i64>, _> = c
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
                (db, table),
            )
            .await;
        match found {
            Ok(Some(n)) if n > 0 => vec![Check::pass("archive table", self.name.clone())],
            Ok(_) => vec![Check::fail(
                "archive table",
                format!("{} does not exist", self.name),
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "archive table",
                conn::describe(&e),
                "check the database user's grants",
            )],
        }
    }

    async fn write<'a>(&'a self, events: &'a [&'a Event]) -> Result<u64, TargetError> {
        if events.is_empty() {
            return Ok(0);
        }
        let mut c = self.open().await?;
        let r = self.insert(&mut c, events).await;
        if r.is_err() {
            // Nothing of a failed batch stays (a broken connection is
            // dropped by the pool).
            let _ = c.query_drop("ROLLBACK").await;
        }
        r
    }

    async fn read<'a>(
        &'a self,
        after: Option<&'a Cursor>,
        origin: Option<&'a str>,
        limit: usize,
    ) -> Result<Vec<Event>, TargetError> {
        let mut c = self.open().await?;
        let origin = origin.map_or(Value::NULL, Value::from);
        let (sql, params) = match after {
            Some((o, epoch, seq)) => (
                read_sql(&self.name, true, limit),
                vec![
                    Value::from(o.as_str()),
                    Value::from(*epoch),
                    Value::from(*seq),
                    origin.clone(),
                    origin,
                ],
            ),
            None => (
                read_sql(&self.name, false, limit),
                vec![origin.clone(), origin],
            ),
        };
        let rows: Vec<ReadRow> = c
            .exec(sql, params)
            .await
            .map_err(|e| self.error("reading the archive", &e))?;
        rows.into_iter()
            .map(|(id, origin, epoch, seq, kind, key, ts, data)| {
                archived_event(&id, origin, epoch, seq, kind, key, &ts, data)
            })
            .collect()
    }

    async fn count(&self) -> Result<u64, TargetError> {
        let mut c = self.open().await?;
        let n: Option<i64> = c
            .query_first(format!("SELECT COUNT(*) FROM {}", self.quoted))
            .await
            .map_err(|e| self.error("counting the archive", &e))?;
        Ok(n.unwrap_or(0) as u64)
    }
}

/// A page of the archive in `(origin, epoch, seq)` order: the cursor's
/// three values first when `keyset`, then the origin twice (or NULL).
pub fn read_sql(table: &str, keyset: bool, limit: usize) -> String {
    let after = if keyset {
        "(origin, epoch, seq) > (?, ?, ?) AND "
    } else {
        ""
    };
    format!(
        "SELECT event_id, origin, epoch, seq, type, entity_key, DATE_FORMAT(event_ts, '%Y-%m-%dT%H:%i:%s.%fZ'), data \
         FROM {} WHERE {after}(? IS NULL OR origin = ?) ORDER BY origin, epoch, seq LIMIT {limit}",
        quote_table(table)
    )
}

type ReadRow = (
    String,
    String,
    i64,
    i64,
    String,
    Option<String>,
    String,
    String,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_insert_skips_ids_the_table_holds_without_insert_ignore() {
        let sql = insert_sql("archive", 2);
        assert!(sql.starts_with("INSERT INTO `archive` ("), "{sql}");
        assert_eq!(sql.matches("(?, ?, ?, ?, ?, ?, ?, ?, ?)").count(), 2);
        assert!(sql.ends_with("ON DUPLICATE KEY UPDATE event_id = event_id"));
        let t = ddl("shop.sitesync_archive");
        assert!(t.contains("`shop`.`sitesync_archive`"), "{t}");
        assert!(
            t.contains("KEY sitesync_archive_origin_seq (origin, epoch, seq)"),
            "{t}"
        );
        assert_eq!(
            datetime("2026-05-04T03:02:01.5Z".parse().unwrap()),
            "2026-05-04 03:02:01.500000"
        );
    }
}
