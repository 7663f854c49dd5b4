//! `sitesync_jobs` in MariaDB and MySQL (see [`crate::jobs`]), and the
//! pool that it and the purge ([`super::purge`]) use. Times are
//! `datetime(6)` in UTC, written by sitesync.

use super::conn::{self, Account};
use super::settings::Settings;
use crate::checks::Check;
use crate::config::redact_url;
use crate::error::TargetError;
use crate::jobs::{JobLog, JobProgress, JobRecord, JobState, record};
use chrono::{DateTime, Utc};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool, Row, Value};
use uuid::Uuid;

/// The table (in the connection's database, beside the sink's).
pub const DDL: &str = "CREATE TABLE IF NOT EXISTS sitesync_jobs (
    id char(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    kind varchar(32) NOT NULL,
    who varchar(255) NOT NULL,
    args longtext NOT NULL,
    started_at datetime(6) NOT NULL,
    updated_at datetime(6) NOT NULL,
    done bigint NOT NULL DEFAULT 0,
    total bigint NULL,
    errors bigint NOT NULL DEFAULT 0,
    last_error text NULL,
    state varchar(16) NOT NULL,
    result text NULL,
    KEY sitesync_jobs_started (started_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4";

const COLUMNS: &str = "id, kind, who, args, DATE_FORMAT(started_at, '%Y-%m-%dT%H:%i:%s.%fZ'), \
    DATE_FORMAT(updated_at, '%Y-%m-%dT%H:%i:%s.%fZ'), done, total, errors, last_error, state, result";

/// `YYYY-MM-DD HH:MM:SS.ffffff`, UTC.
pub fn datetime(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// A pool with what its errors need.
pub struct Db {
    url: String,
    pool: Pool,
    account: Account,
}

impl Db {
    pub fn new(db: &Settings) -> Result<Db, TargetError> {
        let opts = conn::opts(db)?;
        Ok(Db {
            url: db.url.clone(),
            account: Account::of(&opts),
            pool: Pool::new(opts),
        })
    }

    pub async fn conn(&self) -> Result<Conn, TargetError> {
        self.pool
            .get_conn()
            .await
            .map_err(|e| self.error(&format!("connecting to {}", redact_url(&self.url)), &e))
    }

    /// A server error as a [`TargetError`]; a missing table or column
    /// needs `sitesync init`.
    pub fn error(&self, context: &str, e: &mysql_async::Error) -> TargetError {
        let mut err: TargetError = conn::classify(context, &self.account, e).into();
        if matches!(conn::code(e), Some(1146 | 1054))
            && let TargetError::Operator { message, .. } = &mut err
        {
            message.push_str(": run `sitesync init`");
        }
        err
    }
}

/// `sitesync_jobs` of a MariaDB site.
pub struct MariaDbJobs {
    db: Db,
}

impl MariaDbJobs {
    pub fn new(db: &Settings) -> Result<MariaDbJobs, TargetError> {
        Ok(MariaDbJobs { db: Db::new(db)? })
    }
}

fn time(text: Option<String>, what: &str) -> Result<DateTime<Utc>, TargetError> {
    text.as_deref()
        .and_then(crate::event::parse_timestamp)
        .ok_or_else(|| {
            TargetError::operator(
                crate::error::Cause::Query,
                format!("a sitesync_jobs row has an unreadable {what}"),
            )
        })
}

fn row(mut r: Row) -> Result<JobRecord, TargetError> {
    let id: String = r.take(0).unwrap_or_default();
    let args: String = r.take(3).unwrap_or_default();
    let state: String = r.take(10).unwrap_or_default();
    record(
        &id,
        r.take(1).unwrap_or_default(),
        r.take(2).unwrap_or_default(),
        &args,
        time(r.take(4), "started_at")?,
        time(r.take(5), "updated_at")?,
        r.take(6).unwrap_or_default(),
        r.take(7).unwrap_or_default(),
        r.take(8).unwrap_or_default(),
        r.take(9).unwrap_or_default(),
        &state,
        r.take(11).unwrap_or_default(),
    )
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl JobLog for MariaDbJobs {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let mut c = self.db.conn().await?;
        c.query_drop(DDL)
            .await
            .map_err(|e| self.db.error("creating sitesync_jobs", &e))?;
        Ok(vec!["jobs table sitesync_jobs: ready".to_string()])
    }

    async fn preflight(&self) -> Vec<Check> {
        let mut c = match self.db.conn().await {
            Ok(c) => c,
            Err(e) => {
                return vec![Check::fail(
                    "jobs table",
                    e.to_string(),
                    "check database.url",
                )];
            }
        };
        match c
            .query_first::<i64, _>(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'sitesync_jobs'",
            )
            .await
        {
            Ok(Some(n)) if n > 0 => vec![Check::pass("jobs table", "sitesync_jobs")],
            Ok(_) => vec![Check::fail(
                "jobs table",
                "sitesync_jobs does not exist",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "jobs table",
                conn::describe(&e),
                "check the database user's grants",
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
        let now = datetime(Utc::now());
        let mut c = self.db.conn().await?;
        c.exec_drop(
            "INSERT INTO sitesync_jobs (id, kind, who, args, started_at, updated_at, total, state) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 'running')",
            (
                id.to_string(),
                kind,
                who,
                args.to_string(),
                now.as_str(),
                now.as_str(),
                total.map(count),
            ),
        )
        .await
        .map_err(|e| self.db.error("recording the job", &e))?;
        Ok(id)
    }

    async fn progress<'a>(&'a self, id: Uuid, p: &'a JobProgress) -> Result<(), TargetError> {
        let mut c = self.db.conn().await?;
        c.exec_drop(
            "UPDATE sitesync_jobs SET done = ?, total = ?, errors = ?, last_error = ?, updated_at = ? WHERE id = ?",
            (
                count(p.done),
                p.total.map(count),
                count(p.errors),
                p.last_error.as_deref(),
                datetime(Utc::now()),
                id.to_string(),
            ),
        )
        .await
        .map_err(|e| self.db.error("recording the job's progress", &e))
    }

    async fn finish<'a>(
        &'a self,
        id: Uuid,
        state: JobState,
        result: &'a str,
    ) -> Result<(), TargetError> {
        let mut c = self.db.conn().await?;
        c.exec_drop(
            "UPDATE sitesync_jobs SET state = ?, result = ?, updated_at = ? WHERE id = ?",
            (state.as_str(), result, datetime(Utc::now()), id.to_string()),
        )
        .await
        .map_err(|e| self.db.error("recording the job's end", &e))
    }

    async fn list<'a>(
        &'a self,
        limit: usize,
        kind: Option<&'a str>,
    ) -> Result<Vec<JobRecord>, TargetError> {
        let mut c = self.db.conn().await?;
        let rows: Vec<Row> = c
            .exec(
                format!(
                    "SELECT {COLUMNS} FROM sitesync_jobs WHERE (? IS NULL OR kind = ?) ORDER BY started_at DESC, id LIMIT ?"
                ),
                (kind, kind, Value::from(limit as u64)),
            )
            .await
            .map_err(|e| self.db.error("reading sitesync_jobs", &e))?;
        rows.into_iter().map(row).collect()
    }

    async fn get(&self, id: Uuid) -> Result<Option<JobRecord>, TargetError> {
        let mut c = self.db.conn().await?;
        let found: Option<Row> = c
            .exec_first(
                format!("SELECT {COLUMNS} FROM sitesync_jobs WHERE id = ?"),
                (id.to_string(),),
            )
            .await
            .map_err(|e| self.db.error("reading sitesync_jobs", &e))?;
        found.map(row).transpose()
    }
}
