//! Jobs: the record of a long operation (a replay, a purge, later a resync
//! or a gap fill) in the site's own database, table `sitesync_jobs`, so
//! that `sitesync jobs` and the operations dashboard can tell who ran
//! what, how far it got and how it ended, after the process is gone.
//!
//! # Using it (replay, purge, resync, gap fill)
//!
//! ```ignore
//! let log = D::jobs(cfg, db)?;                        // the engine's JobLog
//! let mut job = Job::start(&log, "resync", &who(), json!({"site": "LONDON"}), Some(total)).await?;
//! for … {
//!     …;
//!     job.advance(1);                                // counts; cheap, no I/O
//!     job.failed_one("row 7: …");                   // an error that did not stop the job
//!     job.tick().await;                              // writes progress at most every PROGRESS_EVERY
//! }
//! job.succeeded("resynced 1,234 rows").await;        // or job.failed(&e).await / job.cancelled(..)
//! ```
//!
//! [`Job`] writes `progress` at most every [`PROGRESS_EVERY`], never per
//! row; a failure to write progress or the end is logged, not returned
//! (the work itself matters more than its record), while a failure to
//! *start* the record is returned, so that a missing table is seen at once
//! ("run `sitesync init`").
//!
//! A process killed mid-job leaves its row `running` with an old
//! `updated_at`: nothing rewrites it. [`JobRecord::shown_state`] tells
//! such a row apart from a live one ("stale (no progress since …)") once
//! it is older than [`STALE_AFTER`].
//!
//! Each engine's SQL is in `src/engine/<engine>/jobs.rs` (a [`JobLog`]),
//! reached through the engine's `Driver::jobs`; `sitesync init` creates
//! the table beside the sink's, `sitesync check` verifies it.

use crate::checks::Check;
use crate::error::TargetError;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// The table every engine names it (unqualified, beside the sink's tables).
pub const JOBS_TABLE: &str = "sitesync_jobs";

/// How often a running job writes its progress, at most.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// A `running` job whose row has not moved for this long is shown as
/// stale: its process most likely died (progress comes every
/// [`PROGRESS_EVERY`]; a long statement between two may delay it a while).
pub const STALE_AFTER: Duration = Duration::from_secs(120);

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Started and not finished: working, or its process died (see
    /// [`JobRecord::shown_state`]).
    Running,
    /// Done; `result` says what it did.
    Succeeded,
    /// Stopped by an error; `result` and `last_error` say which.
    Failed,
    /// Stopped on request (SIGINT, a sidecar stopping) before the end.
    Cancelled,
}

impl JobState {
    /// The word stored in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Reads the stored word; `None` for one this version does not know.
    pub fn parse(text: &str) -> Option<JobState> {
        Some(match text.trim() {
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }
}

/// One row of `sitesync_jobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRecord {
    pub id: Uuid,
    /// `replay`, `purge`, `resync`, `gap-fill`.
    pub kind: String,
    /// Who ran it: the OS user (`$USER`, else `uid N`), `sidecar` for
    /// scheduled work; later an API token's name.
    pub who: String,
    /// The job's arguments as given (a replay's filter, a purge's
    /// retentions), for the record.
    pub args: serde_json::Value,
    pub started_at: DateTime<Utc>,
    /// The last write of the row: progress or the end.
    pub updated_at: DateTime<Utc>,
    /// Units done (events, rows).
    pub done: u64,
    /// Units to do, when known.
    pub total: Option<u64>,
    /// Units that failed without stopping the job.
    pub errors: u64,
    pub last_error: Option<String>,
    pub state: JobState,
    /// A line saying how it ended.
    pub result: Option<String>,
}

impl JobRecord {
    /// The state as `sitesync jobs` shows it: a `running` row untouched
    /// for longer than [`STALE_AFTER`] (at `now`) is "stale (no progress
    /// since …)"; the row itself is not changed.
    pub fn shown_state(&self, now: DateTime<Utc>) -> String {
        if self.state == JobState::Running && self.is_stale(now) {
            format!(
                "stale (no progress since {})",
                self.updated_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )
        } else {
            self.state.as_str().to_string()
        }
    }

    /// Whether the row is `running` and has not moved for [`STALE_AFTER`].
    pub fn is_stale(&self, now: DateTime<Utc>) -> bool {
        self.state == JobState::Running
            && (now - self.updated_at).to_std().unwrap_or_default() > STALE_AFTER
    }

    /// `42 %`, or the count alone when the total is unknown.
    pub fn shown_done(&self) -> String {
        match self.total {
            Some(0) => "100 %".to_string(),
            Some(t) => format!("{} %", (self.done.min(t) * 100) / t),
            None => format!("{} done", self.done),
        }
    }
}

/// What a running job reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobProgress {
    pub done: u64,
    pub total: Option<u64>,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// An engine's `sitesync_jobs` table.
pub trait JobLog: Send + Sync + 'static {
    /// Creates the table (idempotent); one line per thing done.
    fn init(&self) -> impl Future<Output = Result<Vec<String>, TargetError>> + Send;

    /// What `sitesync check` verifies: that the table exists.
    fn preflight(&self) -> impl Future<Output = Vec<Check>> + Send;

    /// Records a job as `running` (now); returns its id.
    fn start<'a>(
        &'a self,
        kind: &'a str,
        who: &'a str,
        args: &'a serde_json::Value,
        total: Option<u64>,
    ) -> impl Future<Output = Result<Uuid, TargetError>> + Send + 'a;

    /// Writes how far the job got (and `updated_at`).
    fn progress<'a>(
        &'a self,
        id: Uuid,
        progress: &'a JobProgress,
    ) -> impl Future<Output = Result<(), TargetError>> + Send + 'a;

    /// Writes the job's end: its state (not `Running`) and a result line.
    fn finish<'a>(
        &'a self,
        id: Uuid,
        state: JobState,
        result: &'a str,
    ) -> impl Future<Output = Result<(), TargetError>> + Send + 'a;

    /// The latest `limit` jobs, newest first, of `kind` only when given.
    fn list<'a>(
        &'a self,
        limit: usize,
        kind: Option<&'a str>,
    ) -> impl Future<Output = Result<Vec<JobRecord>, TargetError>> + Send + 'a;

    /// One job.
    fn get(&self, id: Uuid) -> impl Future<Output = Result<Option<JobRecord>, TargetError>> + Send;
}

/// Set by the admin API in the environment of a command it starts: the
/// run's id, written into the job's `args` as `run`, so that the API can
/// find the process of a job it is asked to cancel.
pub const RUN_ENV: &str = "SITESYNC_RUN";

/// Who runs a command: `$USER` (or `$LOGNAME`), else `uid N`.
pub fn who() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|u| !u.trim().is_empty())
        // SAFETY: getuid has no preconditions and cannot fail.
        .unwrap_or_else(|| format!("uid {}", unsafe { libc::getuid() }))
}

/// A job being run: counts kept in memory, written every
/// [`PROGRESS_EVERY`] at most (see the module's docs).
pub struct Job<'a, L: JobLog> {
    log: &'a L,
    id: Uuid,
    kind: String,
    progress: JobProgress,
    written: Instant,
    dirty: bool,
}

impl<'a, L: JobLog> Job<'a, L> {
    /// Records the job as running.
    pub async fn start(
        log: &'a L,
        kind: &str,
        who: &str,
        args: serde_json::Value,
        total: Option<u64>,
    ) -> Result<Job<'a, L>, TargetError> {
        let mut args = args;
        if let (Ok(run), Some(o)) = (std::env::var(RUN_ENV), args.as_object_mut()) {
            o.insert("run".into(), serde_json::Value::String(run));
        }
        let id = log.start(kind, who, &args, total).await?;
        tracing::info!(job = %id, kind, who, "job started");
        Ok(Job {
            log,
            id,
            kind: kind.to_string(),
            progress: JobProgress {
                total,
                ..JobProgress::default()
            },
            written: Instant::now(),
            dirty: false,
        })
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    /// What the job has counted so far.
    pub fn progress(&self) -> &JobProgress {
        &self.progress
    }

    /// `n` more units done.
    pub fn advance(&mut self, n: u64) {
        self.progress.done += n;
        self.dirty = true;
    }

    /// Sets the units done (for work that counts itself).
    pub fn set_done(&mut self, done: u64) {
        self.progress.done = done;
        self.dirty = true;
    }

    /// Sets the total once it is known.
    pub fn set_total(&mut self, total: Option<u64>) {
        self.progress.total = total;
        self.dirty = true;
    }

    /// One unit failed and the job goes on.
    pub fn failed_one(&mut self, error: impl Into<String>) {
        self.progress.errors += 1;
        self.progress.last_error = Some(error.into());
        self.dirty = true;
    }

    /// Writes the progress if it changed and [`PROGRESS_EVERY`] has passed.
    pub async fn tick(&mut self) {
        if self.dirty && self.written.elapsed() >= PROGRESS_EVERY {
            self.flush().await;
        }
    }

    /// Writes the progress now (a failure is logged).
    pub async fn flush(&mut self) {
        self.written = Instant::now();
        self.dirty = false;
        let (done, total) = crate::metrics::job(&self.kind);
        done.set(i64::try_from(self.progress.done).unwrap_or(i64::MAX));
        total.set(i64::try_from(self.progress.total.unwrap_or(0)).unwrap_or(i64::MAX));
        if let Err(e) = self.log.progress(self.id, &self.progress).await {
            tracing::warn!(job = %self.id, kind = %self.kind, error = %e, "could not record the job's progress; it goes on");
        }
    }

    /// Ends the job as succeeded with `result`.
    pub async fn succeeded(self, result: &str) {
        self.end(JobState::Succeeded, result).await;
    }

    /// Ends the job as failed by `error` (also its `last_error`).
    pub async fn failed(mut self, error: &str) {
        self.progress.last_error = Some(error.to_string());
        self.end(JobState::Failed, error).await;
    }

    /// Ends the job as cancelled, saying how far it got.
    pub async fn cancelled(self, result: &str) {
        self.end(JobState::Cancelled, result).await;
    }

    async fn end(mut self, state: JobState, result: &str) {
        self.flush().await;
        if let Err(e) = self.log.finish(self.id, state, result).await {
            tracing::warn!(job = %self.id, kind = %self.kind, error = %e, "could not record the job's end");
        }
        tracing::info!(job = %self.id, kind = %self.kind, state = state.as_str(), result, "job ended");
        let (done, total) = crate::metrics::job(&self.kind);
        done.set(0);
        total.set(0);
        if state == JobState::Failed {
            crate::metrics::job_failed(&self.kind);
        }
    }
}

/// `sitesync jobs`' table: one line per job, newest first.
pub fn render(jobs: &[JobRecord], now: DateTime<Utc>) -> String {
    let mut out = format!(
        "{:<36}  {:<8}  {:<12}  {:<20}  {:>8}  {:>6}  {}\n",
        "id", "kind", "who", "started (UTC)", "done", "errors", "state: result"
    );
    for j in jobs {
        let result = match (&j.result, &j.last_error) {
            (Some(r), _) => format!(": {r}"),
            (None, Some(e)) => format!(": last error: {e}"),
            (None, None) => String::new(),
        };
        out.push_str(&format!(
            "{:<36}  {:<8}  {:<12}  {:<20}  {:>8}  {:>6}  {}{result}\n",
            j.id,
            j.kind,
            j.who,
            j.started_at.format("%Y-%m-%d %H:%M:%S"),
            j.shown_done(),
            j.errors,
            j.shown_state(now),
        ));
    }
    out
}

/// `sitesync jobs --json`: the rows, each with `shown_state` beside its
/// stored `state` (so that a stale row is visible to a script too).
pub fn to_json(jobs: &[JobRecord], now: DateTime<Utc>) -> serde_json::Value {
    serde_json::Value::Array(
        jobs.iter()
            .map(|j| {
                let mut v = serde_json::to_value(j).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("stale".into(), j.is_stale(now).into());
                    o.insert("shown_state".into(), j.shown_state(now).into());
                }
                v
            })
            .collect(),
    )
}

/// A job's row put back together from an engine's columns (text where an
/// engine has no better type); names what is wrong.
#[allow(clippy::too_many_arguments)]
pub fn record(
    id: &str,
    kind: String,
    who: String,
    args: &str,
    started_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    done: i64,
    total: Option<i64>,
    errors: i64,
    last_error: Option<String>,
    state: &str,
    result: Option<String>,
) -> Result<JobRecord, TargetError> {
    let bad = |what: &str| {
        TargetError::operator(
            crate::error::Cause::Query,
            format!("the {JOBS_TABLE} row {id} has {what}"),
        )
    };
    Ok(JobRecord {
        id: id
            .trim()
            .parse()
            .map_err(|_| bad("an id that is not a UUID"))?,
        kind,
        who,
        args: serde_json::from_str(args).map_err(|_| bad("args that are not JSON"))?,
        started_at,
        updated_at,
        done: u64::try_from(done).map_err(|_| bad("a negative done"))?,
        total: total
            .map(u64::try_from)
            .transpose()
            .map_err(|_| bad("a negative total"))?,
        errors: u64::try_from(errors).map_err(|_| bad("a negative errors"))?,
        last_error,
        state: JobState::parse(state).ok_or_else(|| bad(&format!("an unknown state `{state}`")))?,
        result,
    })
}

/// A job log kept in memory, for tests of the code that records jobs.
#[cfg(test)]
pub mod memory {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct MemoryJobs(pub Mutex<Vec<JobRecord>>);

    impl JobLog for MemoryJobs {
        async fn init(&self) -> Result<Vec<String>, TargetError> {
            Ok(vec![])
        }
        async fn preflight(&self) -> Vec<Check> {
            vec![]
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
            self.0.lock().unwrap().push(JobRecord {
                id,
                kind: kind.into(),
                who: who.into(),
                args: args.clone(),
                started_at: now,
                updated_at: now,
                done: 0,
                total,
                errors: 0,
                last_error: None,
                state: JobState::Running,
                result: None,
            });
            Ok(id)
        }
        async fn progress<'a>(&'a self, id: Uuid, p: &'a JobProgress) -> Result<(), TargetError> {
            let mut jobs = self.0.lock().unwrap();
            let j = jobs.iter_mut().find(|j| j.id == id).unwrap();
            (j.done, j.total, j.errors, j.last_error) =
                (p.done, p.total, p.errors, p.last_error.clone());
            j.updated_at = Utc::now();
            Ok(())
        }
        async fn finish<'a>(
            &'a self,
            id: Uuid,
            state: JobState,
            result: &'a str,
        ) -> Result<(), TargetError> {
            let mut jobs = self.0.lock().unwrap();
            let j = jobs.iter_mut().find(|j| j.id == id).unwrap();
            j.state = state;
            j.result = Some(result.into());
            Ok(())
        }
        async fn list<'a>(
            &'a self,
            limit: usize,
            kind: Option<&'a str>,
        ) -> Result<Vec<JobRecord>, TargetError> {
            let jobs = self.0.lock().unwrap();
            Ok(jobs
                .iter()
                .rev()
                .filter(|j| kind.is_none_or(|k| j.kind == k))
                .take(limit)
                .cloned()
                .collect())
        }
        async fn get(&self, id: Uuid) -> Result<Option<JobRecord>, TargetError> {
            Ok(self.0.lock().unwrap().iter().find(|j| j.id == id).cloned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryJobs;
    use super::*;

    fn job(state: JobState, updated_ago: i64) -> JobRecord {
        let now = Utc::now();
        JobRecord {
            id: Uuid::nil(),
            kind: "replay".into(),
            who: "ops".into(),
            args: serde_json::json!({}),
            started_at: now - chrono::Duration::seconds(updated_ago + 10),
            updated_at: now - chrono::Duration::seconds(updated_ago),
            done: 50,
            total: Some(200),
            errors: 0,
            last_error: None,
            state,
            result: None,
        }
    }

    #[test]
    fn a_running_job_without_progress_for_a_while_is_shown_stale_others_as_stored() {
        let now = Utc::now();
        assert_eq!(job(JobState::Running, 10).shown_state(now), "running");
        let old = job(JobState::Running, 600);
        assert!(old.is_stale(now));
        assert!(
            old.shown_state(now)
                .starts_with("stale (no progress since "),
            "{}",
            old.shown_state(now)
        );
        assert_eq!(old.state, JobState::Running, "the row is not rewritten");
        assert_eq!(job(JobState::Succeeded, 600).shown_state(now), "succeeded");
        assert_eq!(job(JobState::Running, 10).shown_done(), "25 %");
        let rows = to_json(&[old], now);
        assert_eq!(rows[0]["stale"], true);
        assert_eq!(rows[0]["state"], "running");
    }

    #[test]
    fn states_round_trip_and_a_bad_row_is_named() {
        for s in [
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        let now = Utc::now();
        let e = record(
            "not-a-uuid",
            "purge".into(),
            "x".into(),
            "{}",
            now,
            now,
            0,
            None,
            0,
            None,
            "running",
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not-a-uuid"), "{e}");
        let e = record(
            &Uuid::nil().to_string(),
            "purge".into(),
            "x".into(),
            "{}",
            now,
            now,
            0,
            None,
            0,
            None,
            "exploded",
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown state `exploded`"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn progress_is_written_every_few_seconds_not_per_unit_and_the_end_is_recorded() {
        let log = MemoryJobs::default();
        let mut job = Job::start(&log, "purge", "ops", serde_json::json!({"x": 1}), Some(10))
            .await
            .unwrap();
        let id = job.id();
        for _ in 0..5 {
            job.advance(1);
            job.tick().await;
        }
        assert_eq!(
            log.get(id).await.unwrap().unwrap().done,
            0,
            "no write before PROGRESS_EVERY"
        );
        tokio::time::advance(PROGRESS_EVERY).await;
        job.failed_one("row 3: locked");
        job.tick().await;
        let row = log.get(id).await.unwrap().unwrap();
        assert_eq!((row.done, row.errors), (5, 1));
        job.advance(5);
        job.succeeded("10 rows").await;
        let row = log.get(id).await.unwrap().unwrap();
        assert_eq!(row.state, JobState::Succeeded);
        assert_eq!(row.done, 10, "the end writes the last progress");
        assert_eq!(row.result.as_deref(), Some("10 rows"));
        assert_eq!(row.last_error.as_deref(), Some("row 3: locked"));
    }
}
