//! Purge in MariaDB and MySQL (see [`crate::purge`]).
//!
//! A batch is two statements: a plain (consistent, lock-free) read of the
//! keys of up to `n` old rows, then `DELETE … WHERE key IN (…)` with the
//! age condition again, which locks only those rows. A single `DELETE …
//! LIMIT n` would lock every row its scan passes (InnoDB's next-key locks
//! under REPEATABLE READ), which for the inbox, not indexed by time, is the
//! whole table: the sink would wait on it.
//!
//! The archive's `received_at` is UTC (`datetime(6)`, written by
//! sitesync), compared with `UTC_TIMESTAMP(6)`; the inbox's `applied_at`
//! and the conflicts' `reviewed_at` are `timestamp(6)`, compared with
//! `NOW(6)` in the session's zone.

use super::conn::{self, quote_table};
use super::jobs::Db;
use super::settings::Settings;
use crate::checks::Check;
use crate::config::ConnectorConfig;
use crate::error::TargetError;
use crate::purge::{Table, Tables};
use mysql_async::Value;
use mysql_async::prelude::Queryable;

/// The purgeable tables of a MariaDB site.
pub struct MariaDbPurge {
    db: Db,
    /// The archive table, as configured, at the archiving site.
    archive: Option<String>,
}

/// `(table, key, age condition)` of a purged table (`?`: the days).
pub fn shape(table: Table, archive: &str) -> (String, &'static str, &'static str) {
    match table {
        Table::Archive => (
            quote_table(archive),
            "event_id",
            "received_at < UTC_TIMESTAMP(6) - INTERVAL ? DAY",
        ),
        Table::Inbox => (
            "sitesync_inbox".into(),
            "event_id",
            "applied_at < NOW(6) - INTERVAL ? DAY",
        ),
        Table::Conflicts => (
            "sitesync_conflicts".into(),
            "id",
            "reviewed_at < NOW(6) - INTERVAL ? DAY",
        ),
    }
}

/// The keys of up to `?` (second parameter) rows older than `?` days.
pub fn select_sql(table: &str, key: &str, older: &str) -> String {
    format!("SELECT {key} FROM {table} WHERE {older} LIMIT ?")
}

/// The delete of `n` of them, the age checked again.
pub fn delete_sql(table: &str, key: &str, older: &str, n: usize) -> String {
    format!(
        "DELETE FROM {table} WHERE {key} IN ({}) AND {older}",
        vec!["?"; n].join(", ")
    )
}

/// Adds `reviewed_at` to a `sitesync_conflicts` made before it existed.
pub const ADD_REVIEWED: &str = "ALTER TABLE sitesync_conflicts ADD COLUMN IF NOT EXISTS reviewed_at timestamp(6) NULL DEFAULT NULL";

impl MariaDbPurge {
    pub fn new(cfg: &ConnectorConfig, db: &Settings) -> Result<MariaDbPurge, TargetError> {
        let archive = match &cfg.archive {
            Some(a) => {
                use crate::archive::Store;
                Some(
                    super::archive::MariaDbArchive::new(cfg, db, a)?
                        .table()
                        .to_string(),
                )
            }
            None => None,
        };
        Ok(MariaDbPurge {
            db: Db::new(db)?,
            archive,
        })
    }

    fn shape(&self, table: Table) -> (String, &'static str, &'static str) {
        shape(table, self.archive.as_deref().unwrap_or_default())
    }
}

impl Tables for MariaDbPurge {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let mut c = self.db.conn().await?;
        c.query_drop(ADD_REVIEWED)
            .await
            .map_err(|e| self.db.error("adding sitesync_conflicts.reviewed_at", &e))?;
        Ok(vec![
            "sitesync_conflicts.reviewed_at: ready (reviewed conflicts are purged after conflict_retention_days)".to_string(),
        ])
    }

    async fn preflight(&self) -> Vec<Check> {
        let mut c = match self.db.conn().await {
            Ok(c) => c,
            Err(e) => {
                return vec![Check::fail(
                    "conflicts review",
                    e.to_string(),
                    "check database.url",
                )];
            }
        };
        match c
            .query_first::<i64, _>(
                "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
                 AND TABLE_NAME = 'sitesync_conflicts' AND COLUMN_NAME = 'reviewed_at'",
            )
            .await
        {
            Ok(Some(n)) if n > 0 => {
                vec![Check::pass(
                    "conflicts review",
                    "sitesync_conflicts.reviewed_at",
                )]
            }
            Ok(_) => vec![Check::fail(
                "conflicts review",
                "sitesync_conflicts has no reviewed_at column (made by an older sitesync): the purge cannot tell reviewed conflicts",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "conflicts review",
                conn::describe(&e),
                "check the database user's grants",
            )],
        }
    }

    fn name(&self, table: Table) -> String {
        match table {
            Table::Archive => self.archive.clone().unwrap_or_default(),
            t => shape(t, "").0,
        }
    }

    async fn count(&self, table: Table, days: u32) -> Result<u64, TargetError> {
        let (t, _, older) = self.shape(table);
        let mut c = self.db.conn().await?;
        let n: Option<u64> = c
            .exec_first(format!("SELECT COUNT(*) FROM {t} WHERE {older}"), (days,))
            .await
            .map_err(|e| self.db.error(&format!("counting the old rows of {t}"), &e))?;
        Ok(n.unwrap_or(0))
    }

    async fn delete(&self, table: Table, days: u32, limit: usize) -> Result<u64, TargetError> {
        let (t, key, older) = self.shape(table);
        let mut c = self.db.conn().await?;
        let keys: Vec<Value> = c
            .exec(select_sql(&t, key, older), (days, limit as u64))
            .await
            .map_err(|e| self.db.error(&format!("finding old rows of {t}"), &e))?;
        if keys.is_empty() {
            return Ok(0);
        }
        let n = keys.len();
        let mut params = keys;
        params.push(Value::from(days));
        c.exec_drop(delete_sql(&t, key, older, n), params)
            .await
            .map_err(|e| self.db.error(&format!("purging {t}"), &e))?;
        // A row changed in between (none is: old rows are not written)
        // stays, and is met at the next run.
        Ok(c.affected_rows())
    }

    async fn review<'a>(&'a self, ids: &'a [i64]) -> Result<Vec<i64>, TargetError> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let list = vec!["?"; ids.len()].join(", ");
        let mut c = self.db.conn().await?;
        c.exec_drop(
            format!("UPDATE sitesync_conflicts SET reviewed_at = COALESCE(reviewed_at, NOW(6)) WHERE id IN ({list})"),
            ids.to_vec(),
        )
        .await
        .map_err(|e| self.db.error("marking conflicts reviewed", &e))?;
        c.exec(
            format!("SELECT id FROM sitesync_conflicts WHERE id IN ({list}) ORDER BY id"),
            ids.to_vec(),
        )
        .await
        .map_err(|e| self.db.error("marking conflicts reviewed", &e))
    }

    async fn conflicts(
        &self,
        limit: usize,
        id: Option<i64>,
    ) -> Result<Vec<crate::purge::Conflict>, TargetError> {
        let mut c = self.db.conn().await?;
        let rows: Vec<mysql_async::Row> = match id {
            Some(id) => c.exec(conflicts_sql(true), (id,)).await,
            None => c.exec(conflicts_sql(false), (limit as u64,)).await,
        }
        .map_err(|e| self.db.error("reading sitesync_conflicts", &e))?;
        let texts: Vec<Vec<Option<String>>> = rows
            .into_iter()
            .map(|r| {
                r.unwrap()
                    .into_iter()
                    .map(|v| match v {
                        mysql_async::Value::NULL => None,
                        mysql_async::Value::Bytes(b) => {
                            Some(String::from_utf8_lossy(&b).into_owned())
                        }
                        other => Some(other.as_sql(true).trim_matches('\'').to_string()),
                    })
                    .collect()
            })
            .collect();
        crate::purge::conflicts_of(&texts)
    }
}

/// The conflicts' columns as text, newest first (`LIMIT ?`), or the one
/// numbered `?`. `loser_ts` and `winner_ts` are written in UTC by the
/// sink; `recorded_at` and `reviewed_at` are TIMESTAMPs, read in the
/// session's zone and turned to UTC.
fn conflicts_sql(one: bool) -> String {
    let ts = |c: &str| format!("DATE_FORMAT({c}, '%Y-%m-%dT%H:%i:%s.%fZ')");
    let utc = |c: &str| {
        format!(
            "DATE_FORMAT(CONVERT_TZ({c}, @@session.time_zone, '+00:00'), '%Y-%m-%dT%H:%i:%s.%fZ')"
        )
    };
    format!(
        "SELECT CAST(id AS CHAR), entity, CONVERT(`key` USING utf8mb4), loser_event_id, loser_origin, {}, loser_payload, \
         winner_event_id, winner_origin, {}, {}, {} FROM sitesync_conflicts {}",
        ts("loser_ts"),
        ts("winner_ts"),
        utc("recorded_at"),
        utc("reviewed_at"),
        match one {
            true => "WHERE id = ?",
            false => "ORDER BY id DESC LIMIT ?",
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_reads_the_keys_then_deletes_those_still_old() {
        let (t, key, older) = shape(Table::Inbox, "");
        assert_eq!(
            select_sql(&t, key, older),
            "SELECT event_id FROM sitesync_inbox WHERE applied_at < NOW(6) - INTERVAL ? DAY LIMIT ?"
        );
        assert_eq!(
            delete_sql(&t, key, older, 3),
            "DELETE FROM sitesync_inbox WHERE event_id IN (?, ?, ?) AND applied_at < NOW(6) - INTERVAL ? DAY"
        );
        let (t, _, older) = shape(Table::Archive, "app.sitesync_archive");
        assert_eq!(t, "`app`.`sitesync_archive`");
        assert!(
            older.contains("UTC_TIMESTAMP(6)"),
            "the archive's times are UTC"
        );
    }
}
