//! `dbo.sitesync_jobs` in SQL Server (see [`crate::jobs`]). Times are
//! `datetime2` in UTC (`SYSUTCDATETIME()`, the server's clock). The
//! statements go through the sink's [`Tds`] calls.

use super::conn;
use super::settings::Settings;
use super::target::{Param, Rows, Statement, Tds, TdsError};
use crate::checks::Check;
use crate::error::{Cause, TargetError};
use crate::jobs::{JobLog, JobProgress, JobRecord, JobState, record};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The table (idempotent).
pub const DDL: &str = "IF OBJECT_ID(N'dbo.sitesync_jobs', N'U') IS NULL
BEGIN
    CREATE TABLE dbo.sitesync_jobs (
        id uniqueidentifier NOT NULL CONSTRAINT PK_sitesync_jobs PRIMARY KEY NONCLUSTERED,
        kind nvarchar(32) NOT NULL,
        who nvarchar(255) NOT NULL,
        args nvarchar(max) NOT NULL,
        started_at datetime2(6) NOT NULL,
        updated_at datetime2(6) NOT NULL,
        done bigint NOT NULL DEFAULT 0,
        total bigint NULL,
        errors bigint NOT NULL DEFAULT 0,
        last_error nvarchar(max) NULL,
        state nvarchar(16) NOT NULL,
        result nvarchar(max) NULL
    );
    CREATE CLUSTERED INDEX IX_sitesync_jobs_started ON dbo.sitesync_jobs (started_at);
END";

const COLUMNS: &str = "CONVERT(nvarchar(36), id), kind, who, args, CONVERT(nvarchar(30), started_at, 126), \
    CONVERT(nvarchar(30), updated_at, 126), CONVERT(nvarchar(20), done), CONVERT(nvarchar(20), total), \
    CONVERT(nvarchar(20), errors), last_error, state, result";

/// The statements, apart from the connection, so that tests read them.
pub mod sql {
    use super::*;

    pub fn start(id: Uuid, kind: &str, who: &str, args: &str, total: Option<i64>) -> Statement {
        Statement {
            sql: "INSERT INTO dbo.sitesync_jobs (id, kind, who, args, started_at, updated_at, total, state) \
                  VALUES (@P1, @P2, @P3, @P4, SYSUTCDATETIME(), SYSUTCDATETIME(), @P5, N'running')"
                .into(),
            params: vec![
                Param::Guid(id),
                Param::Text(Some(kind.into())),
                Param::Text(Some(who.into())),
                Param::Text(Some(args.into())),
                total.map_or(Param::Text(None), Param::Int),
            ],
        }
    }

    pub fn progress(id: Uuid, p: &JobProgress) -> Statement {
        let n = |v: u64| Param::Int(i64::try_from(v).unwrap_or(i64::MAX));
        Statement {
            sql: "UPDATE dbo.sitesync_jobs SET done = @P2, total = CONVERT(bigint, @P3), errors = @P4, \
                  last_error = @P5, updated_at = SYSUTCDATETIME() WHERE id = @P1"
                .into(),
            params: vec![
                Param::Guid(id),
                n(p.done),
                p.total.map_or(Param::Text(None), n),
                n(p.errors),
                Param::Text(p.last_error.clone()),
            ],
        }
    }

    pub fn finish(id: Uuid, state: JobState, result: &str) -> Statement {
        Statement {
            sql: "UPDATE dbo.sitesync_jobs SET state = @P2, result = @P3, updated_at = SYSUTCDATETIME() WHERE id = @P1".into(),
            params: vec![
                Param::Guid(id),
                Param::Text(Some(state.as_str().into())),
                Param::Text(Some(result.into())),
            ],
        }
    }

    pub fn list(limit: usize, kind: Option<&str>) -> Statement {
        Statement {
            sql: format!(
                "SELECT TOP ({limit}) {COLUMNS} FROM dbo.sitesync_jobs WHERE (@P1 IS NULL OR kind = @P1) ORDER BY started_at DESC, id"
            ),
            params: vec![Param::Text(kind.map(str::to_string))],
        }
    }

    pub fn get(id: Uuid) -> Statement {
        Statement {
            sql: format!("SELECT {COLUMNS} FROM dbo.sitesync_jobs WHERE id = @P1"),
            params: vec![Param::Guid(id)],
        }
    }
}

/// A missing table (208) or column (207) needs `sitesync init`.
pub fn failed(e: TdsError) -> TargetError {
    if matches!(e.number, Some(208 | 207)) {
        TargetError::operator(
            Cause::NotInitialised,
            format!("{}: run `sitesync init`", e.message),
        )
    } else {
        e.batch
    }
}

fn bad(what: &str) -> TargetError {
    TargetError::operator(Cause::Query, format!("a sitesync_jobs row has {what}"))
}

/// A row of [`COLUMNS`], all text.
pub fn row(r: &[Option<String>]) -> Result<JobRecord, TargetError> {
    let text = |i: usize| r.get(i).cloned().flatten();
    let time = |i: usize| -> Result<DateTime<Utc>, TargetError> {
        text(i)
            .and_then(|t| crate::event::parse_timestamp(&format!("{t}Z")))
            .ok_or_else(|| bad("an unreadable time"))
    };
    let int = |i: usize| -> Result<Option<i64>, TargetError> {
        text(i)
            .map(|t| t.trim().parse().map_err(|_| bad("an unreadable count")))
            .transpose()
    };
    record(
        &text(0).unwrap_or_default(),
        text(1).unwrap_or_default(),
        text(2).unwrap_or_default(),
        &text(3).unwrap_or_default(),
        time(4)?,
        time(5)?,
        int(6)?.unwrap_or(0),
        int(7)?,
        int(8)?.unwrap_or(0),
        text(9),
        &text(10).unwrap_or_default(),
        text(11),
    )
}

/// `dbo.sitesync_jobs` of a SQL Server site.
pub struct SqlServerJobs {
    db: Settings,
}

impl SqlServerJobs {
    pub fn new(db: &Settings) -> Result<SqlServerJobs, TargetError> {
        conn::config(db, "sitesync")?;
        Ok(SqlServerJobs { db: db.clone() })
    }

    async fn run(&self, st: Statement, context: &str) -> Result<(), TargetError> {
        let mut c = conn::connect(&self.db, "sitesync-jobs").await?;
        Tds::execute(&mut c, &st, context).await.map_err(failed)
    }

    async fn select(&self, st: Statement, context: &str) -> Result<Rows, TargetError> {
        let mut c = conn::connect(&self.db, "sitesync-jobs").await?;
        Tds::select(&mut c, &st, context).await.map_err(failed)
    }
}

impl JobLog for SqlServerJobs {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        self.run(
            Statement {
                sql: DDL.into(),
                params: vec![],
            },
            "creating dbo.sitesync_jobs",
        )
        .await?;
        Ok(vec!["jobs table dbo.sitesync_jobs: ready".to_string()])
    }

    async fn preflight(&self) -> Vec<Check> {
        let st = Statement {
            sql: "SELECT CASE WHEN OBJECT_ID(N'dbo.sitesync_jobs', N'U') IS NULL THEN 0 ELSE 1 END"
                .into(),
            params: vec![],
        };
        match self.select(st, "looking for dbo.sitesync_jobs").await {
            Ok(rows)
                if rows
                    .first()
                    .and_then(|r| r.first())
                    .cloned()
                    .flatten()
                    .as_deref()
                    == Some("1") =>
            {
                vec![Check::pass("jobs table", "dbo.sitesync_jobs")]
            }
            Ok(_) => vec![Check::fail(
                "jobs table",
                "dbo.sitesync_jobs does not exist",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "jobs table",
                e.to_string(),
                "check database.url and the user's permissions",
            )],
        }
    }

    async fn start<'a>(
        &'a self,
        kind: &'a str,
        who: &'a str,
        args: &'a serde_json::Value,
        total: Option<u64>,
    ) -> Result<Uuid, TargetError> {
        let id = Uuid::new_v4();
        let total = total.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        self.run(
            sql::start(id, kind, who, &args.to_string(), total),
            "recording the job",
        )
        .await?;
        Ok(id)
    }

    async fn progress<'a>(&'a self, id: Uuid, p: &'a JobProgress) -> Result<(), TargetError> {
        self.run(sql::progress(id, p), "recording the job's progress")
            .await
    }

    async fn finish<'a>(
        &'a self,
        id: Uuid,
        state: JobState,
        result: &'a str,
    ) -> Result<(), TargetError> {
        self.run(sql::finish(id, state, result), "recording the job's end")
            .await
    }

    async fn list<'a>(
        &'a self,
        limit: usize,
        kind: Option<&'a str>,
    ) -> Result<Vec<JobRecord>, TargetError> {
        let rows = self
            .select(sql::list(limit, kind), "reading dbo.sitesync_jobs")
            .await?;
        rows.iter().map(|r| row(r)).collect()
    }

    async fn get(&self, id: Uuid) -> Result<Option<JobRecord>, TargetError> {
        let rows = self
            .select(sql::get(id), "reading dbo.sitesync_jobs")
            .await?;
        rows.first().map(|r| row(r)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_read_back_as_text_is_a_record() {
        let id = Uuid::from_u128(7);
        let r: Vec<Option<String>> = [
            Some(id.to_string().to_uppercase()),
            Some("purge".into()),
            Some("sidecar".into()),
            Some("{\"inbox_retention_days\":30}".into()),
            Some("2026-12-03T10:00:00.123456".into()),
            Some("2026-12-03T10:00:05".into()),
            Some("10".into()),
            None,
            Some("0".into()),
            None,
            Some("succeeded".into()),
            Some("deleted 10 row(s)".into()),
        ]
        .into();
        let j = row(&r).unwrap();
        assert_eq!(j.id, id);
        assert_eq!(j.args["inbox_retention_days"], 30);
        assert_eq!((j.done, j.total), (10, None));
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!(j.updated_at.to_rfc3339(), "2026-12-03T10:00:05+00:00");
    }

    #[test]
    fn the_statements_bind_in_order_and_keep_the_time_on_the_server() {
        let st = sql::start(Uuid::nil(), "replay", "ops", "{}", None);
        assert!(
            st.sql.contains("SYSUTCDATETIME(), SYSUTCDATETIME(), @P5"),
            "{}",
            st.sql
        );
        assert_eq!(st.params.len(), 5);
        let st = sql::list(20, Some("purge"));
        assert!(st.sql.starts_with("SELECT TOP (20) "), "{}", st.sql);
        assert!(
            st.sql.ends_with("ORDER BY started_at DESC, id"),
            "{}",
            st.sql
        );
        assert!(DDL.starts_with("IF OBJECT_ID(N'dbo.sitesync_jobs', N'U') IS NULL"));
    }
}
