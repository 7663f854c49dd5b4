//! Purge in PostgreSQL (see [`crate::purge`]).
//!
//! A batch is one statement, so one transaction: `DELETE … WHERE key IN
//! (SELECT key … LIMIT n)`. The inner select is a plain read (no lock);
//! the delete locks only the rows it removes, for the statement's few
//! milliseconds. The cut-off is the database's `now()` less the
//! retention.

use super::jobs::{Kept, failed};
use super::settings::Settings;
use crate::checks::Check;
use crate::config::ConnectorConfig;
use crate::error::TargetError;
use crate::purge::{Table, Tables};

/// The purgeable tables of a PostgreSQL site.
pub struct PgPurge {
    db: Kept,
    /// The archive table (`schema.table`), at the archiving site.
    archive: Option<String>,
}

/// `(table, key column, time column)` of a purged table; the archive's
/// name is quoted by the caller.
fn shape(table: Table, archive: &str) -> (String, &'static str, &'static str) {
    match table {
        Table::Archive => (archive.to_string(), "event_id", "received_at"),
        Table::Inbox => ("sitesync_inbox".into(), "event_id", "applied_at"),
        Table::Conflicts => ("sitesync_conflicts".into(), "id", "reviewed_at"),
    }
}

/// The cut-off: `$1` days before now.
const OLDER: &str = "< now() - make_interval(days => $1)";

/// How many rows of `table` are older than `$1` days.
pub fn count_sql(table: &str, time: &str) -> String {
    format!("SELECT count(*) FROM {table} WHERE {time} {OLDER}")
}

/// Deletes at most `$2` rows of `table` older than `$1` days.
pub fn delete_sql(table: &str, key: &str, time: &str) -> String {
    format!(
        "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {time} {OLDER} LIMIT $2)"
    )
}

/// Adds `reviewed_at` to a `sitesync_conflicts` made before it existed.
pub const ADD_REVIEWED: &str =
    "ALTER TABLE sitesync_conflicts ADD COLUMN IF NOT EXISTS reviewed_at timestamptz";

impl PgPurge {
    pub fn new(cfg: &ConnectorConfig, db: &Settings) -> Result<PgPurge, TargetError> {
        let archive = match &cfg.archive {
            Some(a) => {
                use crate::archive::Store;
                Some(
                    super::archive::PgArchive::new(cfg, db, a)?
                        .table()
                        .to_string(),
                )
            }
            None => None,
        };
        Ok(PgPurge {
            db: Kept::new(db)?,
            archive,
        })
    }

    fn sql_name(&self, table: Table) -> (String, &'static str, &'static str) {
        let archive = self
            .archive
            .as_deref()
            .map(super::target::quote_table)
            .unwrap_or_default();
        shape(table, &archive)
    }
}

impl Tables for PgPurge {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        c.batch_execute(ADD_REVIEWED)
            .await
            .map_err(|e| failed("adding sitesync_conflicts.reviewed_at", e))?;
        Ok(vec![
            "sitesync_conflicts.reviewed_at: ready (reviewed conflicts are purged after conflict_retention_days)".to_string(),
        ])
    }

    async fn preflight(&self) -> Vec<Check> {
        let guard = match self.db.get().await {
            Ok(g) => g,
            Err(e) => {
                return vec![Check::fail(
                    "conflicts review",
                    e.to_string(),
                    "check database.url",
                )];
            }
        };
        let c = guard.as_ref().expect("connected");
        match c
            .query_one(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('sitesync_conflicts') \
                 AND attname = 'reviewed_at' AND NOT attisdropped",
                &[],
            )
            .await
        {
            Ok(r) if r.get::<_, i64>(0) > 0 => {
                vec![Check::pass("conflicts review", "sitesync_conflicts.reviewed_at")]
            }
            Ok(_) => vec![Check::fail(
                "conflicts review",
                "sitesync_conflicts has no reviewed_at column (made by an older sitesync): the purge cannot tell reviewed conflicts",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "conflicts review",
                e.to_string(),
                "check the database role's privileges",
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
        let (t, _, time) = self.sql_name(table);
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        let n: i64 = c
            .query_one(&count_sql(&t, time), &[&(days as i32)])
            .await
            .map_err(|e| failed(&format!("counting the old rows of {t}"), e))?
            .get(0);
        Ok(n as u64)
    }

    async fn delete(&self, table: Table, days: u32, limit: usize) -> Result<u64, TargetError> {
        let (t, key, time) = self.sql_name(table);
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        c.execute(
            &delete_sql(&t, key, time),
            &[&(days as i32), &(limit as i64)],
        )
        .await
        .map_err(|e| failed(&format!("purging {t}"), e))
    }

    async fn review<'a>(&'a self, ids: &'a [i64]) -> Result<Vec<i64>, TargetError> {
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        let rows = c
            .query(
                "UPDATE sitesync_conflicts SET reviewed_at = COALESCE(reviewed_at, now()) WHERE id = ANY($1) RETURNING id",
                &[&ids],
            )
            .await
            .map_err(|e| failed("marking conflicts reviewed", e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn conflicts(
        &self,
        limit: usize,
        id: Option<i64>,
    ) -> Result<Vec<crate::purge::Conflict>, TargetError> {
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        let rows = c
            .query(&conflicts_sql(), &[&id, &(limit as i64)])
            .await
            .map_err(|e| failed("reading sitesync_conflicts", e))?;
        let texts: Vec<Vec<Option<String>>> = rows
            .iter()
            .map(|r| (0..r.len()).map(|i| r.get(i)).collect())
            .collect();
        crate::purge::conflicts_of(&texts)
    }
}

/// The conflicts' columns as text (times as UTC RFC 3339), newest first,
/// or the one of `$1`.
fn conflicts_sql() -> String {
    let utc =
        |c: &str| format!("to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
    format!(
        "SELECT id::text, entity, key, loser_event_id::text, loser_origin, {}, loser_payload::text, \
         winner_event_id::text, winner_origin, {}, {}, {} FROM sitesync_conflicts \
         WHERE $1::bigint IS NULL OR id = $1 ORDER BY id DESC LIMIT $2",
        utc("loser_ts"),
        utc("winner_ts"),
        utc("recorded_at"),
        utc("reviewed_at")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_deletes_by_key_what_a_plain_read_found_old() {
        let sql = delete_sql("sitesync_inbox", "event_id", "applied_at");
        assert_eq!(
            sql,
            "DELETE FROM sitesync_inbox WHERE event_id IN (SELECT event_id FROM sitesync_inbox \
             WHERE applied_at < now() - make_interval(days => $1) LIMIT $2)"
        );
        let (t, key, time) = shape(Table::Conflicts, "");
        assert_eq!(
            (t.as_str(), key, time),
            ("sitesync_conflicts", "id", "reviewed_at")
        );
        assert!(count_sql("\"public\".\"a\"", "received_at").contains("received_at < now()"));
    }
}
