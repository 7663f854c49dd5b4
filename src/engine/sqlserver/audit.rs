//! `dbo.sitesync_audit` in SQL Server (see [`crate::audit`]). Times are
//! `datetime2` in UTC (`SYSUTCDATETIME()`, the server's clock, as for
//! jobs). The statements go through the sink's [`Tds`] calls. `at` is
//! bracketed: T-SQL knows `AT TIME ZONE`.

use super::conn;
use super::jobs::failed;
use super::settings::Settings;
use super::target::{Param, Rows, Statement, Tds};
use crate::audit::{AuditLog, Entry, entry};
use crate::checks::Check;
use crate::error::{Cause, TargetError};

/// The table (idempotent).
pub const DDL: &str = "IF OBJECT_ID(N'dbo.sitesync_audit', N'U') IS NULL
BEGIN
    CREATE TABLE dbo.sitesync_audit (
        id uniqueidentifier NOT NULL CONSTRAINT PK_sitesync_audit PRIMARY KEY NONCLUSTERED,
        [at] datetime2(6) NOT NULL,
        who nvarchar(255) NOT NULL,
        via nvarchar(8) NOT NULL,
        action nvarchar(32) NOT NULL,
        arguments nvarchar(max) NOT NULL,
        result nvarchar(8) NOT NULL,
        detail nvarchar(max) NOT NULL
    );
    CREATE CLUSTERED INDEX IX_sitesync_audit_at ON dbo.sitesync_audit ([at]);
END";

const COLUMNS: &str = "CONVERT(nvarchar(36), id), CONVERT(nvarchar(30), [at], 126), who, via, action, arguments, result, detail";

/// The statements, apart from the connection, so that tests read them.
pub mod sql {
    use super::*;

    pub fn insert(e: &Entry) -> Statement {
        Statement {
            sql: "INSERT INTO dbo.sitesync_audit (id, [at], who, via, action, arguments, result, detail) \
                  VALUES (@P1, SYSUTCDATETIME(), @P2, @P3, @P4, @P5, @P6, @P7)"
                .into(),
            params: vec![
                Param::Guid(e.id),
                Param::Text(Some(e.who.clone())),
                Param::Text(Some(e.via.as_str().into())),
                Param::Text(Some(e.action.clone())),
                Param::Text(Some(e.arguments.to_string())),
                Param::Text(Some(e.result.as_str().into())),
                Param::Text(Some(e.detail.clone())),
            ],
        }
    }

    pub fn list(limit: usize, action: Option<&str>) -> Statement {
        Statement {
            sql: format!(
                "SELECT TOP ({limit}) {COLUMNS} FROM dbo.sitesync_audit WHERE (@P1 IS NULL OR action = @P1) ORDER BY [at] DESC, id"
            ),
            params: vec![Param::Text(action.map(str::to_string))],
        }
    }

    pub fn exists() -> Statement {
        Statement {
            sql:
                "SELECT CASE WHEN OBJECT_ID(N'dbo.sitesync_audit', N'U') IS NULL THEN 0 ELSE 1 END"
                    .into(),
            params: vec![],
        }
    }
}

/// A row of [`COLUMNS`], all text.
pub fn row(r: &[Option<String>]) -> Result<Entry, TargetError> {
    let text = |i: usize| r.get(i).cloned().flatten();
    let at = text(1)
        .and_then(|t| crate::event::parse_timestamp(&format!("{t}Z")))
        .ok_or_else(|| {
            TargetError::operator(
                Cause::Query,
                "a dbo.sitesync_audit row has an unreadable time",
            )
        })?;
    entry(
        &text(0).unwrap_or_default(),
        at,
        text(2).unwrap_or_default(),
        &text(3).unwrap_or_default(),
        text(4).unwrap_or_default(),
        &text(5).unwrap_or_default(),
        &text(6).unwrap_or_default(),
        text(7),
    )
}

/// `dbo.sitesync_audit` of a SQL Server site.
pub struct SqlServerAudit {
    db: Settings,
}

impl SqlServerAudit {
    pub fn new(db: &Settings) -> Result<SqlServerAudit, TargetError> {
        conn::config(db, "sitesync")?;
        Ok(SqlServerAudit { db: db.clone() })
    }

    async fn run(&self, st: Statement, context: &str) -> Result<(), TargetError> {
        let mut c = conn::connect(&self.db, "sitesync-audit").await?;
        Tds::execute(&mut c, &st, context).await.map_err(failed)
    }

    async fn select(&self, st: Statement, context: &str) -> Result<Rows, TargetError> {
        let mut c = conn::connect(&self.db, "sitesync-audit").await?;
        Tds::select(&mut c, &st, context).await.map_err(failed)
    }
}

impl AuditLog for SqlServerAudit {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        self.run(
            Statement {
                sql: DDL.into(),
                params: vec![],
            },
            "creating dbo.sitesync_audit",
        )
        .await?;
        Ok(vec!["audit table dbo.sitesync_audit: ready".to_string()])
    }

    async fn preflight(&self) -> Vec<Check> {
        match self
            .select(sql::exists(), "looking for dbo.sitesync_audit")
            .await
        {
            Ok(rows)
                if rows
                    .first()
                    .and_then(|r| r.first())
                    .cloned()
                    .flatten()
                    .as_deref()
                    == Some("1") =>
            {
                vec![Check::pass("audit table", "dbo.sitesync_audit")]
            }
            Ok(_) => vec![Check::fail(
                "audit table",
                "dbo.sitesync_audit does not exist",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "audit table",
                e.to_string(),
                "check database.url and the user's permissions",
            )],
        }
    }

    async fn insert<'a>(&'a self, e: &'a Entry) -> Result<(), TargetError> {
        self.run(sql::insert(e), "recording the action in dbo.sitesync_audit")
            .await
    }

    async fn list<'a>(
        &'a self,
        limit: usize,
        action: Option<&'a str>,
    ) -> Result<Vec<Entry>, TargetError> {
        let rows = self
            .select(sql::list(limit, action), "reading dbo.sitesync_audit")
            .await?;
        rows.iter().map(|r| row(r)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Outcome, Via};
    use uuid::Uuid;

    #[test]
    fn a_row_read_back_as_text_is_an_entry() {
        let id = Uuid::from_u128(5);
        let r: Vec<Option<String>> = vec![
            Some(id.to_string().to_uppercase()),
            Some("2026-12-03T10:00:00.123456".into()),
            Some("ops@madrid-1".into()),
            Some("cli".into()),
            Some("conflicts review".into()),
            Some("{\"ids\":[4]}".into()),
            Some("failed".into()),
            Some("conflict 4: not in sitesync_conflicts".into()),
        ];
        let e = row(&r).unwrap();
        assert_eq!(e.id, id);
        assert_eq!((e.via, e.result), (Via::Cli, Outcome::Failed));
        assert_eq!(e.arguments["ids"][0], 4);
        assert_eq!(e.at.to_rfc3339(), "2026-12-03T10:00:00.123456+00:00");
    }

    #[test]
    fn the_statements_bind_in_order_and_keep_the_time_on_the_server() {
        let e = Entry::new(
            Via::Api,
            "token ops",
            "purge",
            serde_json::json!({"x": 1}),
            Ok("deleted 3 row(s)"),
        );
        let st = sql::insert(&e);
        assert!(
            st.sql
                .contains("VALUES (@P1, SYSUTCDATETIME(), @P2, @P3, @P4, @P5, @P6, @P7)"),
            "{}",
            st.sql
        );
        assert_eq!(st.params.len(), 7);
        assert!(matches!(&st.params[2], Param::Text(Some(v)) if v == "api"));
        assert!(matches!(&st.params[5], Param::Text(Some(r)) if r == "ok"));
        let st = sql::list(20, Some("purge"));
        assert!(st.sql.starts_with("SELECT TOP (20) "), "{}", st.sql);
        assert!(
            st.sql.contains("(@P1 IS NULL OR action = @P1)"),
            "{}",
            st.sql
        );
        assert!(st.sql.ends_with("ORDER BY [at] DESC, id"), "{}", st.sql);
        assert!(DDL.starts_with("IF OBJECT_ID(N'dbo.sitesync_audit', N'U') IS NULL"));
        assert!(sql::exists().sql.contains("dbo.sitesync_audit"));
    }
}
