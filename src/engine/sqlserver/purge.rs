//! Purge in SQL Server (see [`crate::purge`]).
//!
//! A batch is one statement, so one transaction: `DELETE TOP (n) … WHERE
//! old`, then `@@ROWCOUNT`. SQL Server takes update locks on the rows its
//! scan reads and keeps exclusive ones only on those it deletes, for the
//! statement's length; `READPAST` skips rows the sink holds instead of
//! waiting for them (they are met at the next run). Times are UTC
//! (`SYSUTCDATETIME()`), as the sink's defaults write them.

use super::conn::{self, quote_table};
use super::jobs::failed;
use super::settings::Settings;
use super::target::{Param, Statement, Tds};
use crate::checks::Check;
use crate::config::ConnectorConfig;
use crate::error::TargetError;
use crate::purge::{Table, Tables};

/// The purgeable tables of a SQL Server site.
pub struct SqlServerPurge {
    db: Settings,
    /// The archive table (`schema.table`), at the archiving site.
    archive: Option<String>,
}

/// `(table, time column)` of a purged table.
pub fn shape(table: Table, archive: &str) -> (String, &'static str) {
    match table {
        Table::Archive => (quote_table(archive), "received_at"),
        Table::Inbox => ("dbo.sitesync_inbox".into(), "applied_at"),
        Table::Conflicts => ("dbo.sitesync_conflicts".into(), "reviewed_at"),
    }
}

/// `@P1`: the days.
fn older(time: &str) -> String {
    format!("{time} < DATEADD(day, -CONVERT(int, @P1), SYSUTCDATETIME())")
}

/// Rows older than `@P1` days.
pub fn count_statement(table: &str, time: &str, days: u32) -> Statement {
    Statement {
        sql: format!("SELECT COUNT_BIG(*) FROM {table} WHERE {}", older(time)),
        params: vec![Param::Int(days.into())],
    }
}

/// Deletes at most `limit` of them; returns the count.
pub fn delete_statement(table: &str, time: &str, days: u32, limit: usize) -> Statement {
    Statement {
        sql: format!(
            "SET NOCOUNT ON; DELETE TOP ({limit}) FROM {table} WITH (READPAST, ROWLOCK) WHERE {}; SELECT @@ROWCOUNT",
            older(time)
        ),
        params: vec![Param::Int(days.into())],
    }
}

/// Adds `reviewed_at` to a `sitesync_conflicts` made before it existed
/// (SQL Server has no `ADD COLUMN IF NOT EXISTS`: the catalog says).
pub const ADD_REVIEWED: &str = "IF COL_LENGTH(N'dbo.sitesync_conflicts', N'reviewed_at') IS NULL \
    ALTER TABLE dbo.sitesync_conflicts ADD reviewed_at datetime2 NULL";

impl SqlServerPurge {
    pub fn new(cfg: &ConnectorConfig, db: &Settings) -> Result<SqlServerPurge, TargetError> {
        conn::config(db, "sitesync")?;
        let archive = match &cfg.archive {
            Some(a) => {
                use crate::archive::Store;
                Some(
                    super::archive::SqlServerArchive::new(cfg, db, a)?
                        .table()
                        .to_string(),
                )
            }
            None => None,
        };
        Ok(SqlServerPurge {
            db: db.clone(),
            archive,
        })
    }

    fn shape(&self, table: Table) -> (String, &'static str) {
        shape(
            table,
            self.archive.as_deref().unwrap_or("dbo.sitesync_archive"),
        )
    }

    async fn number(&self, st: Statement, context: &str) -> Result<u64, TargetError> {
        let mut c = conn::connect(&self.db, "sitesync-purge").await?;
        let rows = Tds::select(&mut c, &st, context).await.map_err(failed)?;
        Ok(rows
            .first()
            .and_then(|r| r.first())
            .cloned()
            .flatten()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0))
    }
}

impl Tables for SqlServerPurge {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let mut c = conn::connect(&self.db, "sitesync-purge").await?;
        let st = Statement {
            sql: ADD_REVIEWED.into(),
            params: vec![],
        };
        Tds::execute(&mut c, &st, "adding dbo.sitesync_conflicts.reviewed_at")
            .await
            .map_err(failed)?;
        Ok(vec![
            "dbo.sitesync_conflicts.reviewed_at: ready (reviewed conflicts are purged after conflict_retention_days)".to_string(),
        ])
    }

    async fn preflight(&self) -> Vec<Check> {
        let st = Statement {
            sql: "SELECT CASE WHEN COL_LENGTH(N'dbo.sitesync_conflicts', N'reviewed_at') IS NULL THEN 0 ELSE 1 END".into(),
            params: vec![],
        };
        match self.number(st, "looking for reviewed_at").await {
            Ok(1) => vec![Check::pass(
                "conflicts review",
                "dbo.sitesync_conflicts.reviewed_at",
            )],
            Ok(_) => vec![Check::fail(
                "conflicts review",
                "dbo.sitesync_conflicts has no reviewed_at column (made by an older sitesync): the purge cannot tell reviewed conflicts",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "conflicts review",
                e.to_string(),
                "check database.url and the user's permissions",
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
        let (t, time) = self.shape(table);
        self.number(
            count_statement(&t, time, days),
            &format!("counting the old rows of {t}"),
        )
        .await
    }

    async fn delete(&self, table: Table, days: u32, limit: usize) -> Result<u64, TargetError> {
        let (t, time) = self.shape(table);
        self.number(
            delete_statement(&t, time, days, limit),
            &format!("purging {t}"),
        )
        .await
    }

    async fn review<'a>(&'a self, ids: &'a [i64]) -> Result<Vec<i64>, TargetError> {
        let mut found = Vec::new();
        let mut c = conn::connect(&self.db, "sitesync-purge").await?;
        for id in ids {
            let st = Statement {
                sql: "UPDATE dbo.sitesync_conflicts SET reviewed_at = COALESCE(reviewed_at, SYSUTCDATETIME()) \
                      OUTPUT CONVERT(nvarchar(20), inserted.id) WHERE id = @P1"
                    .into(),
                params: vec![Param::Int(*id)],
            };
            let rows = Tds::select(&mut c, &st, "marking conflicts reviewed")
                .await
                .map_err(failed)?;
            if !rows.is_empty() {
                found.push(*id);
            }
        }
        Ok(found)
    }

    async fn conflicts(
        &self,
        limit: usize,
        id: Option<i64>,
    ) -> Result<Vec<crate::purge::Conflict>, TargetError> {
        let mut c = conn::connect(&self.db, "sitesync-purge").await?;
        let rows = Tds::select(
            &mut c,
            &conflicts_statement(limit, id),
            "reading dbo.sitesync_conflicts",
        )
        .await
        .map_err(failed)?;
        crate::purge::conflicts_of(&rows)
    }
}

/// The conflicts' columns as text (times as UTC ISO 8601), newest first,
/// or the one numbered `id`.
fn conflicts_statement(limit: usize, id: Option<i64>) -> Statement {
    let utc = |c: &str| {
        format!(
            "CONVERT(nvarchar(40), CONVERT(datetime2(6), SWITCHOFFSET({c}, '+00:00')), 126) + 'Z'"
        )
    };
    let columns = format!(
        "CONVERT(nvarchar(20), id), entity, [key], CONVERT(nvarchar(36), loser_event_id), loser_origin, {}, loser_payload, \
         CONVERT(nvarchar(36), winner_event_id), winner_origin, {}, CONVERT(nvarchar(40), recorded_at, 126) + 'Z', \
         CONVERT(nvarchar(40), reviewed_at, 126) + 'Z'",
        utc("loser_ts"),
        utc("winner_ts")
    );
    match id {
        Some(id) => Statement {
            sql: format!("SELECT {columns} FROM dbo.sitesync_conflicts WHERE id = @P1"),
            params: vec![Param::Int(id)],
        },
        None => Statement {
            sql: format!("SELECT TOP (@P1) {columns} FROM dbo.sitesync_conflicts ORDER BY id DESC"),
            params: vec![Param::Int(limit as i64)],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_are_read_as_utc_text_newest_first_or_by_id() {
        let latest = conflicts_statement(20, None);
        assert!(
            latest
                .sql
                .starts_with("SELECT TOP (@P1) CONVERT(nvarchar(20), id), entity, [key]"),
            "{}",
            latest.sql
        );
        assert!(latest.sql.contains("CONVERT(nvarchar(40), CONVERT(datetime2(6), SWITCHOFFSET(winner_ts, '+00:00')), 126) + 'Z'"));
        assert!(latest.sql.ends_with("ORDER BY id DESC"));
        let one = conflicts_statement(20, Some(7));
        assert!(one.sql.ends_with("WHERE id = @P1"), "{}", one.sql);
        assert!(matches!(one.params.as_slice(), [Param::Int(7)]));
    }

    #[test]
    fn a_batch_is_one_bounded_delete_that_skips_locked_rows_and_says_its_count() {
        let (t, time) = shape(Table::Inbox, "");
        let st = delete_statement(&t, time, 30, 5000);
        assert_eq!(
            st.sql,
            "SET NOCOUNT ON; DELETE TOP (5000) FROM dbo.sitesync_inbox WITH (READPAST, ROWLOCK) \
             WHERE applied_at < DATEADD(day, -CONVERT(int, @P1), SYSUTCDATETIME()); SELECT @@ROWCOUNT"
        );
        assert_eq!(st.params.len(), 1);
        assert_eq!(
            shape(Table::Archive, "dbo.sitesync_archive").0,
            "[dbo].[sitesync_archive]"
        );
        assert!(
            ADD_REVIEWED
                .starts_with("IF COL_LENGTH(N'dbo.sitesync_conflicts', N'reviewed_at') IS NULL")
        );
    }
}
