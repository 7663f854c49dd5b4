//! `sitesync_audit` in MariaDB and MySQL (see [`crate::audit`]), on the
//! pool of [`super::jobs`]. Times are `datetime(6)` in UTC, written by
//! sitesync.

use super::conn;
use super::jobs::{Db, datetime};
use super::settings::Settings;
use crate::audit::{AuditLog, Entry, entry};
use crate::checks::Check;
use crate::error::TargetError;
use mysql_async::prelude::Queryable;
use mysql_async::{Row, Value};

/// The table (in the connection's database, beside the sink's).
pub const DDL: &str = "CREATE TABLE IF NOT EXISTS sitesync_audit (
    id char(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    at datetime(6) NOT NULL,
    who varchar(255) NOT NULL,
    via varchar(8) NOT NULL,
    action varchar(32) NOT NULL,
    arguments longtext NOT NULL,
    result varchar(8) NOT NULL,
    detail text NOT NULL,
    KEY sitesync_audit_at (at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4";

/// The insert; binds in the columns' order.
pub const INSERT: &str = "INSERT INTO sitesync_audit (id, at, who, via, action, arguments, result, detail) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?)";

/// The latest entries: the action or NULL (twice), the limit.
pub const LIST: &str = "SELECT id, DATE_FORMAT(at, '%Y-%m-%dT%H:%i:%s.%fZ'), who, via, action, arguments, result, detail \
     FROM sitesync_audit WHERE (? IS NULL OR action = ?) ORDER BY at DESC, id LIMIT ?";

/// `sitesync_audit` of a MariaDB site.
pub struct MariaDbAudit {
    db: Db,
}

impl MariaDbAudit {
    pub fn new(db: &Settings) -> Result<MariaDbAudit, TargetError> {
        Ok(MariaDbAudit { db: Db::new(db)? })
    }
}

fn row(mut r: Row) -> Result<Entry, TargetError> {
    let id: String = r.take(0).unwrap_or_default();
    let at: Option<String> = r.take(1);
    let at = at
        .as_deref()
        .and_then(crate::event::parse_timestamp)
        .ok_or_else(|| {
            TargetError::operator(
                crate::error::Cause::Query,
                format!("the sitesync_audit row {id} has an unreadable time"),
            )
        })?;
    let via: String = r.take(3).unwrap_or_default();
    let arguments: String = r.take(5).unwrap_or_default();
    let result: String = r.take(6).unwrap_or_default();
    entry(
        &id,
        at,
        r.take(2).unwrap_or_default(),
        &via,
        r.take(4).unwrap_or_default(),
        &arguments,
        &result,
        r.take(7),
    )
}

impl AuditLog for MariaDbAudit {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let mut c = self.db.conn().await?;
        c.query_drop(DDL)
            .await
            .map_err(|e| self.db.error("creating sitesync_audit", &e))?;
        Ok(vec!["audit table sitesync_audit: ready".to_string()])
    }

    async fn preflight(&self) -> Vec<Check> {
        let mut c = match self.db.conn().await {
            Ok(c) => c,
            Err(e) => {
                return vec![Check::fail(
                    "audit table",
                    e.to_string(),
                    "check database.url",
                )];
            }
        };
        match c
            .query_first::<i64, _>(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'sitesync_audit'",
            )
            .await
        {
            Ok(Some(n)) if n > 0 => vec![Check::pass("audit table", "sitesync_audit")],
            Ok(_) => vec![Check::fail(
                "audit table",
                "sitesync_audit does not exist",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "audit table",
                conn::describe(&e),
                "check the database user's grants",
            )],
        }
    }

    async fn insert<'a>(&'a self, e: &'a Entry) -> Result<(), TargetError> {
        let mut c = self.db.conn().await?;
        c.exec_drop(
            INSERT,
            (
                e.id.to_string(),
                datetime(e.at),
                e.who.as_str(),
                e.via.as_str(),
                e.action.as_str(),
                e.arguments.to_string(),
                e.result.as_str(),
                e.detail.as_str(),
            ),
        )
        .await
        .map_err(|err| {
            self.db
                .error("recording the action in sitesync_audit", &err)
        })
    }

    async fn list<'a>(
        &'a self,
        limit: usize,
        action: Option<&'a str>,
    ) -> Result<Vec<Entry>, TargetError> {
        let mut c = self.db.conn().await?;
        let rows: Vec<Row> = c
            .exec(LIST, (action, action, Value::from(limit as u64)))
            .await
            .map_err(|e| self.db.error("reading sitesync_audit", &e))?;
        rows.into_iter().map(row).collect()
    }
}
