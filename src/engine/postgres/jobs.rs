//! `sitesync_jobs` in PostgreSQL (see [`crate::jobs`]), and the one kept
//! connection that it and the purge ([`super::purge`]) use.

use super::settings::Settings;
use crate::checks::Check;
use crate::config::redact_url;
use crate::error::{Cause, TargetError};
use crate::jobs::{JobLog, JobProgress, JobRecord, JobState, record};
use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::{Client, Row};
use uuid::Uuid;

/// The table (beside the sink's, in the search path's first schema).
pub const DDL: &str = "CREATE TABLE IF NOT EXISTS sitesync_jobs (
    id uuid PRIMARY KEY,
    kind text NOT NULL,
    who text NOT NULL,
    args jsonb NOT NULL,
    started_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    done bigint NOT NULL DEFAULT 0,
    total bigint,
    errors bigint NOT NULL DEFAULT 0,
    last_error text,
    state text NOT NULL,
    result text
);
CREATE INDEX IF NOT EXISTS sitesync_jobs_started ON sitesync_jobs (started_at);";

const COLUMNS: &str = "id::text, kind, who, args::text, started_at, updated_at, done, total, errors, last_error, state, result";

/// A connection opened on first use and again after it closed.
pub struct Kept {
    url: String,
    pg: tokio_postgres::Config,
    client: Mutex<Option<Client>>,
}

impl Kept {
    pub fn new(db: &Settings) -> Result<Kept, TargetError> {
        Ok(Kept {
            url: db.url.clone(),
            pg: db.url.parse().map_err(|e| {
                TargetError::operator(
                    Cause::Config,
                    format!("database.url `{}`: {e}", redact_url(&db.url)),
                )
            })?,
            client: Mutex::new(None),
        })
    }

    /// The connection, opened when missing or closed.
    pub async fn get(&self) -> Result<MutexGuard<'_, Option<Client>>, TargetError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = self
                .pg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| failed(&format!("connecting to {}", redact_url(&self.url)), e))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "database connection ended");
                }
            });
            *guard = Some(client);
        }
        Ok(guard)
    }
}

/// A PostgreSQL error as a [`TargetError`]: a missing table or column
/// needs `sitesync init`, a refusal needs a person, the rest is
/// transient.
pub fn failed(context: &str, e: tokio_postgres::Error) -> TargetError {
    let text = match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    match e.code().map(|c| c.code()) {
        Some("42P01" | "42703") => TargetError::operator(
            Cause::NotInitialised,
            format!("{context}: {text}: run `sitesync init`"),
        ),
        Some(c) if c.starts_with("28") => {
            TargetError::operator(Cause::AuthRefused, format!("{context}: {text}"))
        }
        Some("42501") => {
            TargetError::operator(Cause::PermissionDenied, format!("{context}: {text}"))
        }
        _ => TargetError::transient(Cause::Unreachable, format!("{context}: {text}")),
    }
}

/// `sitesync_jobs` of a PostgreSQL site.
pub struct PgJobs {
    db: Kept,
}

impl PgJobs {
    pub fn new(db: &Settings) -> Result<PgJobs, TargetError> {
        Ok(PgJobs { db: Kept::new(db)? })
    }
}

fn row(r: &Row) -> Result<JobRecord, TargetError> {
    record(
        r.get::<_, &str>(0),
        r.get(1),
        r.get(2),
        r.get::<_, &str>(3),
        r.get::<_, DateTime<Utc>>(4),
        r.get::<_, DateTime<Utc>>(5),
        r.get(6),
        r.get(7),
        r.get(8),
        r.get(9),
        r.get::<_, &str>(10),
        r.get(11),
    )
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl JobLog for PgJobs {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        c.batch_execute(DDL)
            .await
            .map_err(|e| failed("creating sitesync_jobs", e))?;
        Ok(vec!["jobs table sitesync_jobs: ready".to_string()])
    }

    async fn preflight(&self) -> Vec<Check> {
        let guard = match self.db.get().await {
            Ok(g) => g,
            Err(e) => {
                return vec![Check::fail(
                    "jobs table",
                    e.to_string(),
                    "check database.url",
                )];
            }
        };
        let c = guard.as_ref().expect("connected");
        match c
            .query_one("SELECT to_regclass('sitesync_jobs') IS NOT NULL", &[])
            .await
        {
            Ok(r) if r.get::<_, bool>(0) => vec![Check::pass("jobs table", "sitesync_jobs")],
            Ok(_) => vec![Check::fail(
                "jobs table",
                "sitesync_jobs does not exist",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "jobs table",
                e.to_string(),
                "check the database role's privileges",
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
        let now = Utc::now();
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        c.execute(
            "INSERT INTO sitesync_jobs (id, kind, who, args, started_at, updated_at, total, state) \
             VALUES ($1, $2, $3, $4::text::jsonb, $5, $5, $6, 'running')",
            &[&id, &kind, &who, &args.to_string(), &now, &total.map(count)],
        )
        .await
        .map_err(|e| failed("recording the job", e))?;
        Ok(id)
    }

    async fn progress<'a>(&'a self, id: Uuid, p: &'a JobProgress) -> Result<(), TargetError> {
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        c.execute(
            "UPDATE sitesync_jobs SET done = $2, total = $3, errors = $4, last_error = $5, updated_at = $6 WHERE id = $1",
            &[&id, &count(p.done), &p.total.map(count), &count(p.errors), &p.last_error, &Utc::now()],
        )
        .await
        .map_err(|e| failed("recording the job's progress", e))?;
        Ok(())
    }

    async fn finish<'a>(
        &'a self,
        id: Uuid,
        state: JobState,
        result: &'a str,
    ) -> Result<(), TargetError> {
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        c.execute(
            "UPDATE sitesync_jobs SET state = $2, result = $3, updated_at = $4 WHERE id = $1",
            &[&id, &state.as_str(), &result, &Utc::now()],
        )
        .await
        .map_err(|e| failed("recording the job's end", e))?;
        Ok(())
    }

    async fn list<'a>(
        &'a self,
        limit: usize,
        kind: Option<&'a str>,
    ) -> Result<Vec<JobRecord>, TargetError> {
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        let rows = c
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM sitesync_jobs WHERE ($1::text IS NULL OR kind = $1::text) \
                     ORDER BY started_at DESC, id LIMIT $2"
                ),
                &[&kind, &(limit as i64)],
            )
            .await
            .map_err(|e| failed("reading sitesync_jobs", e))?;
        rows.iter().map(row).collect()
    }

    async fn get(&self, id: Uuid) -> Result<Option<JobRecord>, TargetError> {
        let guard = self.db.get().await?;
        let c = guard.as_ref().expect("connected");
        c.query_opt(
            &format!("SELECT {COLUMNS} FROM sitesync_jobs WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(|e| failed("reading sitesync_jobs", e))?
        .as_ref()
        .map(row)
        .transpose()
    }
}
