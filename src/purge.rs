//! Purge: what the site's sitesync tables keep forever unless told
//! otherwise, removed after its retention.
//!
//! - the archive (`[archive] retention_days`, default 90): rows by
//!   `received_at`;
//! - the inbox (`[sink] inbox_retention_days`, default 30): rows by
//!   `applied_at` (when the event was settled here);
//! - the conflicts (`[sink] conflict_retention_days`, default 90): rows a
//!   person marked reviewed (`reviewed_at`), by that time. A conflict
//!   nobody reviewed is kept.
//!
//! `sitesync_versions`, `sitesync_origins` and `sitesync_gaps` are never
//! purged: the versions are what keeps a redelivered old event from
//! overwriting newer state once its inbox row is gone (the safety argument
//! is in `docs/archive.md`, "Purge").
//!
//! The same code runs from `sitesync purge` and, every `purge_every`, in
//! the sidecar ([`schedule`]). Rows go in batches of [`BATCH_ROWS`], each
//! its own short transaction that locks only the rows it deletes (each
//! engine says how in `src/engine/<engine>/purge.rs`, a [`Tables`]), so the
//! sink and the archive go on meanwhile. Every run is recorded as a job
//! (`crate::jobs`, kind `purge`).

use crate::checks::Check;
use crate::config::ConnectorConfig;
use crate::error::TargetError;
use crate::jobs::{Job, JobLog};
use crate::runner::Shutdown;
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

/// Rows deleted per transaction, at most: small enough that a batch holds
/// its row locks for milliseconds, large enough that a day's rows go in a
/// few hundred statements.
pub const BATCH_ROWS: usize = 5_000;

/// A progress line in the log at most this often.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// A purged table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    /// The archive table (only at the archiving site).
    Archive,
    /// `sitesync_inbox`.
    Inbox,
    /// `sitesync_conflicts`, the reviewed rows.
    Conflicts,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::Archive => "archive",
            Table::Inbox => "inbox",
            Table::Conflicts => "conflicts",
        })
    }
}

/// What goes: each table and its retention in days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan(pub Vec<(Table, u32)>);

impl Plan {
    /// The connector's retentions: the archive only with `[archive]`, the
    /// inbox and the conflicts only with the sink enabled (without it
    /// nothing writes them).
    pub fn of(cfg: &ConnectorConfig) -> Plan {
        let mut tables = Vec::new();
        if let Some(a) = &cfg.archive {
            tables.push((Table::Archive, a.retention_days));
        }
        if cfg.sink.enabled {
            tables.push((Table::Inbox, cfg.retention.inbox_retention_days));
            tables.push((Table::Conflicts, cfg.retention.conflict_retention_days));
        }
        Plan(tables)
    }

    /// The job's `args`.
    pub fn args(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .map(|(t, days)| (format!("{t}_retention_days"), (*days).into()))
                .collect(),
        )
    }
}

/// One recorded conflict, as the site's database holds it (times as UTC
/// RFC 3339 text).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Conflict {
    pub id: i64,
    /// The table, `schema.table`, as entities name it.
    pub entity: String,
    pub key: String,
    pub loser_event_id: String,
    pub loser_origin: String,
    pub loser_ts: String,
    /// The losing event's data (JSON text).
    pub loser_payload: Option<String>,
    pub winner_event_id: String,
    pub winner_origin: String,
    pub winner_ts: String,
    pub recorded_at: String,
    pub reviewed_at: Option<String>,
}

/// The columns every engine selects, in this order, as text.
pub const COLUMNS: [&str; 12] = [
    "id",
    "entity",
    "key",
    "loser_event_id",
    "loser_origin",
    "loser_ts",
    "loser_payload",
    "winner_event_id",
    "winner_origin",
    "winner_ts",
    "recorded_at",
    "reviewed_at",
];

/// A conflict from a row of [`COLUMNS`] read as text.
pub fn conflict_of(row: &[Option<String>]) -> Result<Conflict, String> {
    if row.len() != COLUMNS.len() {
        return Err(format!(
            "a row of sitesync_conflicts with {} columns, not {}",
            row.len(),
            COLUMNS.len()
        ));
    }
    let text = |i: usize| -> Result<String, String> {
        row[i]
            .clone()
            .ok_or_else(|| format!("sitesync_conflicts.{} is NULL", COLUMNS[i]))
    };
    let id = text(0)?;
    Ok(Conflict {
        id: id
            .trim()
            .parse()
            .map_err(|_| format!("sitesync_conflicts.id `{id}` is not a number"))?,
        entity: text(1)?,
        key: text(2)?,
        loser_event_id: text(3)?,
        loser_origin: text(4)?,
        loser_ts: text(5)?,
        loser_payload: row[6].clone(),
        winner_event_id: text(7)?,
        winner_origin: text(8)?,
        winner_ts: text(9)?,
        recorded_at: text(10)?,
        reviewed_at: row[11].clone(),
    })
}

/// Conflicts from rows of [`COLUMNS`] as text; a row that cannot be read
/// is an error naming the column.
pub fn conflicts_of(
    rows: &[Vec<Option<String>>],
) -> Result<Vec<Conflict>, crate::error::TargetError> {
    rows.iter()
        .map(|r| {
            conflict_of(r)
                .map_err(|e| crate::error::TargetError::operator(crate::error::Cause::Query, e))
        })
        .collect()
}

/// An engine's purgeable tables.
pub trait Tables: Send + Sync + 'static {
    /// Adds what purge needs to tables `init` made before it
    /// (`sitesync_conflicts.reviewed_at`); idempotent; one line per thing
    /// done.
    fn init(&self) -> impl Future<Output = Result<Vec<String>, TargetError>> + Send;

    /// What `sitesync check` verifies: `reviewed_at` is there.
    fn preflight(&self) -> impl Future<Output = Vec<Check>> + Send;

    /// The table as its SQL names it (for messages).
    fn name(&self, table: Table) -> String;

    /// Rows older than `days` (the database's clock).
    fn count(
        &self,
        table: Table,
        days: u32,
    ) -> impl Future<Output = Result<u64, TargetError>> + Send;

    /// Deletes at most `limit` rows older than `days`, in one transaction
    /// that locks only them; returns how many went (fewer than `limit`:
    /// none are left).
    fn delete(
        &self,
        table: Table,
        days: u32,
        limit: usize,
    ) -> impl Future<Output = Result<u64, TargetError>> + Send;

    /// Marks conflicts reviewed now (`sitesync conflicts review`); returns
    /// the ids it found.
    fn review<'a>(
        &'a self,
        ids: &'a [i64],
    ) -> impl Future<Output = Result<Vec<i64>, TargetError>> + Send + 'a;

    /// The latest conflicts recorded here, newest first (`limit` at most),
    /// or the one numbered `id` (`sitesync conflicts list`, the API's
    /// `/api/conflicts`, a choice).
    fn conflicts(
        &self,
        limit: usize,
        id: Option<i64>,
    ) -> impl Future<Output = Result<Vec<Conflict>, TargetError>> + Send;
}

/// One table's share of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub table: Table,
    /// As the database names it.
    pub name: String,
    pub days: u32,
    /// Rows older than the retention when the run began.
    pub found: u64,
    /// Rows deleted.
    pub deleted: u64,
}

/// What a run did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub shares: Vec<Share>,
}

impl Report {
    pub fn deleted(&self) -> u64 {
        self.shares.iter().map(|s| s.deleted).sum()
    }

    pub fn found(&self) -> u64 {
        self.shares.iter().map(|s| s.found).sum()
    }

    /// `archive 120, inbox 4000, conflicts 0`.
    pub fn summary(&self, dry: bool) -> String {
        self.shares
            .iter()
            .map(|s| format!("{} {}", s.name, if dry { s.found } else { s.deleted }))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How many rows each table of `plan` would lose (`--dry-run`).
pub async fn count<T: Tables>(tables: &T, plan: &Plan) -> Result<Report, TargetError> {
    let mut report = Report::default();
    for &(table, days) in &plan.0 {
        report.shares.push(Share {
            table,
            name: tables.name(table),
            days,
            found: tables.count(table, days).await?,
            deleted: 0,
        });
    }
    Ok(report)
}

/// Purges the tables of `plan` in batches of `batch` rows, recorded as a
/// job by `who`; stops between two batches when `shutdown` fires (the job
/// then says cancelled). An error ends the run (and the job as failed).
pub async fn run<T: Tables, L: JobLog>(
    tables: &T,
    jobs: &L,
    plan: &Plan,
    who: &str,
    batch: usize,
    shutdown: &Shutdown,
) -> Result<Report, TargetError> {
    let mut report = count(tables, plan).await?;
    let total = report.found();
    let mut job = Job::start(jobs, "purge", who, plan.args(), Some(total)).await?;
    let began = Instant::now();
    let mut logged = began;
    for i in 0..report.shares.len() {
        loop {
            let share = &mut report.shares[i];
            if shutdown.requested() {
                let line = format!("stopped on request; deleted {}", report_line(share));
                job.cancelled(&line).await;
                return Ok(report);
            }
            let n = match tables.delete(share.table, share.days, batch).await {
                Ok(n) => n,
                Err(e) => {
                    job.failed(&format!("{}: {}", share.name, e)).await;
                    return Err(e);
                }
            };
            share.deleted += n;
            job.advance(n);
            job.tick().await;
            if logged.elapsed() >= LOG_EVERY {
                logged = Instant::now();
                tracing::info!(table = %share.name, deleted = share.deleted, of = share.found, "purging");
            }
            if n < batch as u64 {
                break;
            }
        }
    }
    let line = format!(
        "deleted {} row(s) in {:.1} s: {}",
        report.deleted(),
        began.elapsed().as_secs_f64(),
        report.summary(false)
    );
    job.succeeded(&line).await;
    Ok(report)
}

fn report_line(share: &Share) -> String {
    format!(
        "{} of {} row(s) of {}",
        share.deleted, share.found, share.name
    )
}

/// The first scheduled run comes this long after the sidecar starts, at
/// most (a sidecar restarted again and again does not purge each time,
/// and sites started together do not purge together): a random point in
/// the second half of `min(every, FIRST_RUN_MAX)`.
pub const FIRST_RUN_MAX: Duration = Duration::from_secs(15 * 60);

/// The wait before the first scheduled run.
pub fn first_delay(every: Duration) -> Duration {
    let base = every.min(FIRST_RUN_MAX);
    base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

/// The wait between two scheduled runs: `every`, ±10 %.
pub fn next_delay(every: Duration) -> Duration {
    every.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}

/// The sidecar's scheduled purge of `plan`: every `every` (jittered)
/// until `shutdown`. A failed run is logged and tried again at the next
/// one; nothing here stops the sidecar. `connector` names it in the logs.
pub async fn schedule<T: Tables, L: JobLog>(
    connector: &str,
    plan: &Plan,
    tables: &T,
    jobs: &L,
    every: Duration,
    mut shutdown: Shutdown,
) {
    if plan.0.is_empty() {
        return;
    }
    let mut wait = first_delay(every);
    tracing::info!(connector, first_in = ?wait, every = ?every, "purge scheduled");
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match run(tables, jobs, plan, "sidecar", BATCH_ROWS, &shutdown).await {
            Ok(report) => tracing::info!(
                connector,
                deleted = report.deleted(),
                "purge done: {}",
                report.summary(false)
            ),
            Err(e) => tracing::warn!(
                connector,
                error = %e,
                "purge failed; trying again at the next run"
            ),
        }
        wait = next_delay(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobState;
    use crate::jobs::memory::MemoryJobs;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Tables of old rows, counted down by each delete; optionally failing.
    #[derive(Default)]
    struct Fake {
        old: Mutex<BTreeMap<Table, u64>>,
        deletes: Mutex<Vec<(Table, usize)>>,
        fail_on: Option<Table>,
        /// Deletes that fail before the first that works.
        failures: Mutex<u32>,
    }

    impl Tables for Fake {
        async fn init(&self) -> Result<Vec<String>, TargetError> {
            Ok(vec![])
        }
        async fn preflight(&self) -> Vec<Check> {
            vec![]
        }
        fn name(&self, table: Table) -> String {
            format!("t_{table}")
        }
        async fn count(&self, table: Table, _: u32) -> Result<u64, TargetError> {
            Ok(*self.old.lock().unwrap().get(&table).unwrap_or(&0))
        }
        async fn delete(&self, table: Table, _: u32, limit: usize) -> Result<u64, TargetError> {
            let mut failures = self.failures.lock().unwrap();
            if *failures > 0 || self.fail_on == Some(table) {
                *failures = failures.saturating_sub(1);
                return Err(TargetError::transient(
                    crate::error::Cause::Unreachable,
                    "connection reset",
                ));
            }
            drop(failures);
            self.deletes.lock().unwrap().push((table, limit));
            let mut old = self.old.lock().unwrap();
            let left = old.entry(table).or_default();
            let n = (*left).min(limit as u64);
            *left -= n;
            Ok(n)
        }
        async fn review<'a>(&'a self, ids: &'a [i64]) -> Result<Vec<i64>, TargetError> {
            Ok(ids.to_vec())
        }
        async fn conflicts(&self, _: usize, _: Option<i64>) -> Result<Vec<Conflict>, TargetError> {
            Ok(vec![])
        }
    }

    fn plan() -> Plan {
        Plan(vec![
            (Table::Archive, 90),
            (Table::Inbox, 30),
            (Table::Conflicts, 90),
        ])
    }

    #[tokio::test]
    async fn a_run_deletes_in_batches_until_a_short_one_and_records_the_job() {
        let fake = Fake::default();
        fake.old
            .lock()
            .unwrap()
            .extend([(Table::Archive, 12), (Table::Inbox, 5)]);
        let jobs = MemoryJobs::default();
        let (_tx, stop) = Shutdown::new();
        let report = run(&fake, &jobs, &plan(), "ops", 5, &stop).await.unwrap();
        assert_eq!(report.deleted(), 17);
        assert_eq!(
            report.summary(false),
            "t_archive 12, t_inbox 5, t_conflicts 0"
        );
        // 5 + 5 + 2 (short: done); 5, then 0 (short); 0.
        let deletes: Vec<Table> = fake.deletes.lock().unwrap().iter().map(|d| d.0).collect();
        assert_eq!(
            deletes,
            [
                Table::Archive,
                Table::Archive,
                Table::Archive,
                Table::Inbox,
                Table::Inbox,
                Table::Conflicts
            ]
        );
        let job = &jobs.0.lock().unwrap()[0];
        assert_eq!(job.kind, "purge");
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!((job.done, job.total), (17, Some(17)));
        assert_eq!(job.args["inbox_retention_days"], 30);
        assert!(
            job.result.as_deref().unwrap().contains("deleted 17 row(s)"),
            "{:?}",
            job.result
        );
    }

    #[tokio::test]
    async fn a_failing_table_fails_the_run_and_the_job_with_its_name() {
        let fake = Fake {
            fail_on: Some(Table::Inbox),
            ..Fake::default()
        };
        let jobs = MemoryJobs::default();
        let (_tx, stop) = Shutdown::new();
        let e = run(&fake, &jobs, &plan(), "ops", 5, &stop)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("connection reset"), "{e}");
        let job = &jobs.0.lock().unwrap()[0];
        assert_eq!(job.state, JobState::Failed);
        assert!(
            job.last_error.as_deref().unwrap().starts_with("t_inbox: "),
            "{:?}",
            job.last_error
        );
    }

    #[tokio::test]
    async fn a_stop_request_ends_the_run_between_batches_as_cancelled() {
        let fake = Fake::default();
        fake.old.lock().unwrap().insert(Table::Archive, 100);
        let jobs = MemoryJobs::default();
        let (tx, stop) = Shutdown::new();
        tx.send(true).unwrap();
        let report = run(&fake, &jobs, &plan(), "ops", 5, &stop).await.unwrap();
        assert_eq!(report.deleted(), 0);
        assert!(fake.deletes.lock().unwrap().is_empty());
        assert_eq!(jobs.0.lock().unwrap()[0].state, JobState::Cancelled);
    }

    #[tokio::test(start_paused = true)]
    async fn the_schedule_goes_on_after_a_failed_run_and_stops_with_the_sidecar() {
        let fake = Fake {
            failures: Mutex::new(1),
            ..Fake::default()
        };
        fake.old.lock().unwrap().insert(Table::Inbox, 3);
        let jobs = MemoryJobs::default();
        let (tx, stop) = Shutdown::new();
        let every = Duration::from_secs(3600);
        let plan = plan();
        let scheduled = schedule("paris", &plan, &fake, &jobs, every, stop);
        let later = async {
            // Nothing before the first run's delay; then a failed run, a
            // run that works, and a stop request ends the schedule.
            tokio::time::sleep(FIRST_RUN_MAX / 2 - Duration::from_secs(1)).await;
            assert!(jobs.0.lock().unwrap().is_empty(), "no run at once");
            tokio::time::sleep(every * 2 + every / 2).await;
            tx.send(true).unwrap();
        };
        tokio::join!(scheduled, later);
        let runs = jobs.0.lock().unwrap();
        assert!(runs.len() >= 2, "{runs:?}");
        assert_eq!(runs[0].state, JobState::Failed);
        assert_eq!(runs[0].who, "sidecar");
        assert_eq!(runs[1].state, JobState::Succeeded);
        assert_eq!(runs[1].done, 3, "the next run did the work");
    }

    #[test]
    fn the_first_run_waits_a_while_and_later_ones_are_jittered() {
        let day = Duration::from_secs(86_400);
        for _ in 0..100 {
            let first = first_delay(day);
            assert!(
                first >= FIRST_RUN_MAX / 2 && first <= FIRST_RUN_MAX,
                "{first:?}"
            );
            let tiny = first_delay(Duration::from_millis(200));
            assert!(tiny >= Duration::from_millis(100) && tiny <= Duration::from_millis(200));
            let next = next_delay(day);
            assert!(
                next >= day.mul_f64(0.9) && next <= day.mul_f64(1.1),
                "{next:?}"
            );
        }
    }
}
