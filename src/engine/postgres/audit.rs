//! `sitesync_audit` in PostgreSQL (see [`crate::audit`]), on the kept
//! connection of [`super::jobs`].

use super::jobs::{Kept, failed};
use super::settings::Settings;
use crate::audit::{AuditLog, Entry, entry};
use crate::checks::Check;
use crate::error::TargetError;
use chrono::{DateTime, Utc};
use tokio_postgres::Row;

/// The table (beside the sink's, in the search path's first schema).
pub const DDL: &str = "CREATE TABLE IF NOT EXISTS sitesync_audit (
    id uuid PRIMARY KEY,
    at timestamptz NOT NULL,
    who text NOT NULL,
    via text NOT NULL,
    action text NOT NULL,
    arguments jsonb NOT NULL,
    result text NOT NULL,
    detail text NOT NULL
);
CREATE INDEX IF NOT EXISTS sitesync_audit_at ON sitesync_audit (at);";

/// The insert; binds `$1` to `$8` in the columns' order.
pub const INSERT: &str = "INSERT INTO sitesync_audit (id, at, who, via, action, arguments, result, detail) \
     VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8)";

/// The latest `$2` entries, of action `$1` only when not NULL.
pub const LIST: &str = "SELECT id::text, at, who, via, action, arguments::text, result, detail \
     FROM sitesync_audit WHERE ($1::text IS NULL OR action = $1::text) ORDER BY at DESC, id LIMIT $2";

/// `sitesync_audit` of a PostgreSQL site.
pub struct PgAudit {
    db: Kept,
}

impl PgAudit {
    pub fn new(db: &Settings) -> Result<PgAudit, TargetError> {
        Ok(PgAudit { db: Kept::new(db)? })
    }
}

fn row(r: &Row) -> Result<Entry, TargetError> {
    entry(
        r.get::<_, &str>(0),
        r.get::<_, DateTime<Utc>>(1),
        r.get(2),
        r.get::<_, &str>(3),
        r.get(4),
        r.get::<_, &str>(5),
        r.get::<_, &str>(6),
        r.get(7),
    )
}

impl AuditLog for PgAudit {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        c.batch_execute(DDL)
            .await
            .map_err(|e| failed("creating sitesync_audit", e))?;
        Ok(vec!["audit table sitesync_audit: ready".to_string()])
    }

    async fn preflight(&self) -> Vec<Check> {
        let guard = match self.db.get().await {
            Ok(g) => g,
            Err(e) => {
                return vec![Check::fail(
                    "audit table",
                    e.to_string(),
                    "check database.url",
                )];
            }
        };
        let c = guard.as_ref().expect("connected");
        match c
            .query_one("SELECT to_regclass('sitesync_audit') IS NOT NULL", &[])
            .await
        {
            Ok(r) if r.get::<_, bool>(0) => vec![Check::pass("audit table", "sitesync_audit")],
            Ok(_) => vec![Check::fail(
                "audit table",
                "sitesync_audit does not exist",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "audit table",
                e.to_string(),
                "check the database role's privileges",
            )],
        }
    }

    async fn insert<'a>(&'a self, e: &'a Entry) -> Result<(), TargetError> {
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        c.execute(
            INSERT,
            &[
                &e.id,
                &e.at,
                &e.who,
                &e.via.as_str(),
                &e.action,
                &e.arguments.to_string(),
                &e.result.as_str(),
                &e.detail,
            ],
        )
        .await
        .map_err(|err| failed("recording the action in sitesync_audit", err))?;
        Ok(())
    }

    async fn list<'a>(
        &'a self,
        limit: usize,
        action: Option<&'a str>,
    ) -> Result<Vec<Entry>, TargetError> {
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        let rows = c
            .query(LIST, &[&action, &(limit as i64)])
            .await
            .map_err(|e| failed("reading sitesync_audit", e))?;
        rows.iter().map(row).collect()
    }
}
