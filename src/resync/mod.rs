//! `sitesync resync`: the current rows of chosen tables of this site sent,
//! as events, to one other site's queue.
//!
//! The archive holds only its retention window; a new site, a site restored
//! from an old backup, or one whose log was lost needs the rows as they are
//! now. A resync reads the chosen tables of the source site in one
//! consistent snapshot (a read-only transaction: PostgreSQL's REPEATABLE
//! READ, MariaDB's consistent snapshot), each table in key order a page at
//! a time (keyset pagination: `WHERE key > last ORDER BY key LIMIT n`),
//! and turns each row into the event the table's upsert route would read
//! back into it: the inverse of the route, as capture writes it
//! ([`crate::capture::plan`]). A route that cannot be inverted is refused
//! with the reason before anything is sent.
//!
//! The events go to the target site's queue only, through the default
//! exchange with publisher confirms ([`crate::bus::direct`]), never through
//! the fanout: no other site, and not the archive, sees them.
//!
//! # What a snapshot event carries
//!
//! - **Its version is the row's.** A snapshot event's `timestamp` is the
//!   version the source holds for the row in `sitesync_versions` (the
//!   `(timestamp, origin)` of the event that last wrote it there), or the
//!   Unix epoch for a row no event ever wrote (data older than sitesync).
//!   So a snapshot event at the target is worth exactly the write that
//!   made the row: any later write, at any site, during or after the
//!   resync, has a later version and wins by last-writer-wins; an older
//!   event still in flight loses, as it lost at the source. (The snapshot's
//!   own time would not do: a write of a third site made just before the
//!   snapshot and not yet applied at the source would lose at the target to
//!   the older row the snapshot read, and win at the source: the two sites
//!   would disagree for good. docs/resync.md has the case.)
//! - **Its origin is the job's**, `resync:<SITE>:<job>`: never a real site,
//!   so the receiving sink neither takes it for its own event back round
//!   nor moves any real origin's progress or gap detection. Its `epoch` is
//!   the run's attempt (1, then 2 after a `--resume`, …) and its `seq`
//!   runs from 1 within it, gap-free, so the receiving site's gap detection
//!   works for the job as for any origin.
//! - **Its id is the id of the event that wrote the row** (the version's
//!   `event_id`): the target applies the state of one event once, whether
//!   the event itself or the snapshot of its row comes first (the second
//!   is a duplicate in its inbox). A row no event wrote, or whose event is
//!   the target site's own (its inbox records that one as back round, not
//!   applied), gets an id derived from the job, the table and the key
//!   ([`event_id`]). Either way a row sent again after a resume (the
//!   unconfirmed window) has the same id, and the inbox applies it once.
//!
//! - **A row whose write waits in the source's outbox is left out**: that
//!   write's own event is on its way to every site, the target's queue
//!   included, and carries the row as it is; sending the row now as well
//!   would apply it twice.
//!
//! # Safeguards
//!
//! A job holds a lock row per (target site, table) in the source database
//! while it is unfinished, so two resyncs of the same table to the same
//! site cannot run at once; a killed job keeps its locks until it is
//! resumed (`--resume JOB`) or abandoned (`--abandon JOB`). Whether a job
//! is running is the database's own session lock (PostgreSQL's advisory
//! lock), released when its process dies.
//!
//! # Resume
//!
//! Confirms are settled in publish order, so the last confirmed row is a
//! key below which everything is confirmed: it is saved in the job's row
//! (`sitesync_resync`) every second and at the end, and `--resume JOB`
//! starts a new snapshot after it.
//!
//! The engine-free parts are here; each engine's SQL is in
//! `engine/<name>/resync.rs`, through [`Resync`] and [`Snapshot`].

use crate::bus::direct::{Direct, DirectError, Pace};
use crate::bus::pack;
use crate::bus::publisher::event_properties;
use crate::capture::{self, Capture, Plan, Side, Spec};
use crate::config::{Route, SinkConfig};
use crate::event::Event;
use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::time::Duration;
use uuid::Uuid;

/// Rows read per page of a table.
pub const PAGE: usize = 1000;

/// The header every snapshot event carries (the job's number), so that a
/// message in a queue can be told for what it is.
pub const HEADER_RESYNC: &str = "x-sitesync-resync";

/// One table of a resync: what to read and the events it becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// The table as the routes name it (`[schema.]table`).
    pub table: String,
    /// The entity's table as the sink keys versions (`schema.table`).
    pub entity: String,
    /// Every column of a row (database names), generated ones too.
    pub columns: Vec<String>,
    /// The upsert route's side of the inverse: the key columns, and each
    /// column's field in the event.
    pub side: Side,
    /// `--where`: an SQL condition on the table's rows (alias `r`).
    pub filter: Option<String>,
    /// The types of every route of the table: an outbox row of one of
    /// them with the row's key is a write of this site waiting there.
    pub kinds: Vec<String>,
}

/// One row read from a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The row's key columns as a JSON object: where the next page
    /// starts, and what a resume starts after.
    pub cursor: String,
    /// The entity key, as the sink computes it from the event.
    pub key: String,
    /// The event's data: a JSON object.
    pub data: String,
    /// The version the source holds for the entity, if any.
    pub version: Option<Stored>,
    /// A write of this site to the row waits in the outbox: its own event
    /// brings the row to every site, so the snapshot leaves it out.
    pub pending: bool,
}

/// An entity's version at the source (`sitesync_versions`): the event that
/// last wrote it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub ts: DateTime<Utc>,
    pub origin: String,
    pub event_id: Uuid,
}

/// A consistent, read-only snapshot of the source database, open until
/// dropped.
pub trait Snapshot {
    /// When the snapshot was taken (the database's clock).
    fn time(&self) -> DateTime<Utc>;

    /// Rows of `table` after `after` (a cursor), counted.
    fn count(
        &mut self,
        table: &Table,
        after: Option<&str>,
    ) -> impl Future<Output = Result<u64, String>>;

    /// At most `limit` rows of `table` after `after`, in key order.
    fn page(
        &mut self,
        table: &Table,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Row>, String>>;

    /// The versions the database holds for these keys of `entity` (a
    /// deleted row's version stays: its tombstone).
    fn versions(
        &mut self,
        entity: &str,
        keys: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Stored>, String>>;
}

/// A job as its row in the source database keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: i64,
    pub to_site: String,
    /// What the user asked for (the routes, the condition).
    pub request: Request,
    /// 1 for the first run, one more at each resume.
    pub attempt: i64,
    /// Rows confirmed so far, over all runs.
    pub confirmed: i64,
    /// The last confirmed row: its table (entity) and key cursor.
    pub cursor: Option<Cursor>,
    /// `None` while unfinished; `done`, `abandoned`.
    pub result: Option<String>,
    /// The last error of a run that stopped.
    pub error: Option<String>,
    /// Whether a process holds the job now.
    pub running: bool,
}

/// Where a job stands: after this row of this table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub entity: String,
    pub key: String,
}

/// What a resync sends: the routes (event types) and the condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The upsert routes' types, or empty with `all`.
    pub routes: Vec<String>,
    pub all: bool,
    #[serde(default)]
    pub filter: Option<String>,
    /// Routes that drop fields are sent without them.
    #[serde(default)]
    pub allow_dropped: bool,
    /// Rows of the target that the source lacks are deleted there.
    #[serde(default)]
    pub prune: bool,
    /// The target site's connector file, whose database `--prune` reads.
    #[serde(default)]
    pub target_connector: Option<std::path::PathBuf>,
}

/// Why a job cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "table {entity} is being resynced to {to_site} by job {job}{}",
        if *.running { " (running now): wait for it to finish".to_string() } else { format!(" (not running: it stopped or was killed): resume it with `sitesync resync --resume {job}`, or release it with `--abandon {job}`") }
    )]
    Busy {
        entity: String,
        to_site: String,
        job: i64,
        running: bool,
    },
    #[error("job {0} is running now (another process holds it)")]
    Running(i64),
    #[error("job {job} is finished ({result}): there is nothing to resume")]
    Finished { job: i64, result: String },
    #[error("there is no resync job {0} in this database")]
    Unknown(i64),
    #[error("{0}")]
    Database(String),
}

/// What an engine provides for resync (`engine/<name>/resync.rs`): the
/// snapshot, and the jobs' rows and locks in the source database.
pub trait Resync {
    type Snapshot: Snapshot;

    /// Opens a consistent read-only snapshot.
    fn snapshot(&self) -> impl Future<Output = Result<Self::Snapshot, String>>;

    /// Records a new job and takes its locks (one per target site and
    /// table), refusing when another job holds one; the job is held by
    /// this process until [`Resync::finish`] or the process ends.
    fn start(
        &mut self,
        to_site: &str,
        entities: &[String],
        request: &Request,
        who: &str,
    ) -> impl Future<Output = Result<Job, ClaimError>>;

    /// Takes over an unfinished job that no process holds (`--resume`):
    /// its attempt moves on by one.
    fn resume(&mut self, job: i64) -> impl Future<Output = Result<Job, ClaimError>>;

    /// Reads a job.
    fn job(&mut self, job: i64) -> impl Future<Output = Result<Job, ClaimError>>;

    /// Saves how far the job got.
    fn progress(
        &mut self,
        job: i64,
        total: i64,
        confirmed: i64,
        cursor: Option<&Cursor>,
        error: Option<&str>,
    ) -> impl Future<Output = Result<(), String>>;

    /// Ends a job (`done`, `abandoned`) and releases its locks.
    fn finish(&mut self, job: i64, result: &str) -> impl Future<Output = Result<(), String>>;
}

/// A version from its cells as text (time, origin, event id), if whole:
/// for engines whose driver reads columns as text.
pub fn stored(ts: Option<&str>, origin: Option<String>, id: Option<&str>) -> Option<Stored> {
    Some(Stored {
        ts: crate::event::parse_timestamp(ts?)?,
        origin: origin?,
        event_id: Uuid::parse_str(id?).ok()?,
    })
}

/// A page's row from its cells as text, in the order the SQL Server and
/// Oracle page statements select them: key, data, cursor, the version's
/// time, origin and event id, and whether a write waits in the outbox
/// (`1`).
pub fn row_of(table: &Table, cells: &[Option<String>]) -> Result<Row, String> {
    let at = |i: usize| cells.get(i).cloned().flatten();
    let key = at(0).ok_or_else(|| format!("a row of {} has a NULL key column", table.table))?;
    Ok(Row {
        key,
        data: at(1).unwrap_or_else(|| "{}".into()),
        cursor: at(2).unwrap_or_else(|| "{}".into()),
        version: stored(at(3).as_deref(), at(4), at(5).as_deref()),
        pending: at(6).as_deref() == Some("1"),
    })
}

/// A job's row from its cells as text, in the order the SQL Server and
/// Oracle job statements select them: target site, request, attempt,
/// confirmed, cursor, result, error.
pub fn job_of(job: i64, row: &[Option<String>]) -> Result<Job, ClaimError> {
    let at = |i: usize| row.get(i).cloned().flatten();
    let request: Request = serde_json::from_str(&at(1).unwrap_or_default())
        .map_err(|e| ClaimError::Database(format!("job {job}'s request: {e}")))?;
    let cursor: Option<Cursor> = match at(4) {
        None => None,
        Some(t) => Some(
            serde_json::from_str(&t)
                .map_err(|e| ClaimError::Database(format!("job {job}'s cursor: {e}")))?,
        ),
    };
    Ok(Job {
        id: job,
        to_site: at(0).unwrap_or_default(),
        request,
        attempt: at(2).and_then(|t| t.parse().ok()).unwrap_or(1),
        confirmed: at(3).and_then(|t| t.parse().ok()).unwrap_or(0),
        cursor,
        result: at(5),
        error: at(6),
        running: false,
    })
}

/// `(c1, c2, …) > (v1, v2, …)` spelled out for an SQL without row-value
/// comparison (SQL Server, Oracle), from `(column, value)` pairs: the first
/// column bounded first (`c1 >= v1 AND (…)`) so that the key's index is
/// ranged on it.
pub fn keyset(parts: &[(String, String)]) -> String {
    match parts {
        [] => "1 = 1".to_string(),
        [(c, v)] => format!("{c} > {v}"),
        [(c0, v0), ..] => {
            let branches: Vec<String> = (0..parts.len())
                .map(|i| {
                    let mut terms: Vec<String> = parts[..i]
                        .iter()
                        .map(|(c, v)| format!("{c} = {v}"))
                        .collect();
                    let (c, v) = &parts[i];
                    terms.push(format!("{c} > {v}"));
                    match terms.len() {
                        1 => terms.remove(0),
                        _ => format!("({})", terms.join(" AND ")),
                    }
                })
                .collect();
            format!("({c0} >= {v0} AND ({}))", branches.join(" OR "))
        }
    }
}

/// The tables a request sends, each with the inverse of its upsert route,
/// or every reason why some cannot be sent.
pub async fn tables<C: Capture>(
    c: &C,
    sink: &SinkConfig,
    request: &Request,
) -> Result<Vec<Table>, Vec<String>> {
    let specs = match specs(sink, request) {
        Ok(s) => s,
        Err(e) => return Err(vec![e]),
    };
    let mut out = Vec::new();
    let mut refused = Vec::new();
    for spec in &specs {
        match table(c, spec, request).await {
            Ok(t) => out.push(t),
            Err(e) => refused.push(format!("{}: {e}", spec.table)),
        }
    }
    match refused.is_empty() {
        true => Ok(out),
        false => Err(refused),
    }
}

/// The tables of the routes a request names (each with its upsert and
/// delete routes, as capture pairs them).
fn specs<'a>(sink: &'a SinkConfig, request: &Request) -> Result<Vec<Spec<'a>>, String> {
    if request.routes.is_empty() && !request.all {
        return Err(
            "no route chosen: name them with --route TYPE, or take every route with --all".into(),
        );
    }
    let unknown: Vec<&str> = request
        .routes
        .iter()
        .filter(|k| sink.route(k).is_none())
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        let known: Vec<&str> = sink.routes.iter().map(|r| r.kind.as_str()).collect();
        return Err(format!(
            "no route has type {} (the routes: {})",
            unknown.join(", "),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ));
    }
    capture::specs(sink, |r| request.all || request.routes.contains(&r.kind))
}

/// One table's inverse, or why it has none.
async fn table<C: Capture>(c: &C, spec: &Spec<'_>, request: &Request) -> Result<Table, String> {
    let Some(route) = spec.upsert else {
        return Err(format!(
            "only a delete route ({}) names this table: a snapshot sends rows as upserts",
            spec.kinds()
        ));
    };
    if !route.drop.is_empty() && !request.allow_dropped {
        return Err(dropped(route));
    }
    let found = c
        .table(spec.table)
        .await?
        .ok_or_else(|| format!("table {} does not exist", spec.table))?;
    // The upsert side alone: a delete route does not matter to a snapshot.
    let only = Spec {
        table: spec.table,
        upsert: Some(route),
        delete: None,
    };
    let Plan {
        table,
        columns,
        upsert,
        ..
    } = capture::plan(&only, &found, C::FOLD_CASE)?;
    Ok(Table {
        table,
        entity: route.entity_table(),
        columns,
        side: upsert.expect("an upsert route"),
        filter: request.filter.clone(),
        kinds: spec
            .upsert
            .iter()
            .chain(spec.delete.iter())
            .map(|r| r.kind.clone())
            .collect(),
    })
}

/// Why a route that drops fields is refused.
fn dropped(route: &Route) -> String {
    format!(
        "route {} drops field(s) {}: this database never stored them, so a snapshot cannot send them, and the target's route may need them; pass --allow-dropped to send the rows without them",
        route.kind,
        route.drop.join(", ")
    )
}

/// The origin of a job's events: never a site's name.
pub fn origin(site: &str, job: i64) -> String {
    format!("resync:{site}:{job}")
}

/// The version a row without one gets: older than any event's.
pub fn unversioned() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH
}

/// The id of a row's event in a job: the same for the same row whatever
/// the run, so that the receiving inbox applies a row re-sent after a
/// resume once. (Two SipHash-1-3 digests with fixed keys: the same in
/// every run of one build.)
pub fn event_id(origin: &str, entity: &str, key: &str) -> Uuid {
    let digest = |salt: u8| {
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new_with_keys(0x7369_7465_7379_6e63, u64::from(salt));
        (origin, entity, key).hash(&mut h);
        h.finish()
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&digest(1).to_be_bytes());
    bytes[8..].copy_from_slice(&digest(2).to_be_bytes());
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// The event of one snapshot row, to `to_site`.
pub fn event(
    origin: &str,
    to_site: &str,
    attempt: i64,
    seq: u64,
    table: &Table,
    row: &Row,
) -> Result<Event, String> {
    let data = RawValue::from_string(row.data.clone()).map_err(|e| {
        format!(
            "row {} of {}: its data is not JSON: {e}",
            row.key, table.table
        )
    })?;
    let id = match &row.version {
        Some(v) if v.origin != to_site => v.event_id,
        _ => event_id(origin, &table.entity, &row.key),
    };
    Ok(Event {
        id,
        timestamp: row.version.as_ref().map_or_else(unversioned, |v| v.ts),
        origin: origin.to_string(),
        kind: table.side.kind.clone(),
        entity_key: Some(row.key.clone()),
        data,
        epoch: attempt.max(1) as u64,
        seq,
    })
}

/// How far a run got.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sent {
    /// Rows the broker confirmed, over every run of the job.
    pub confirmed: i64,
    /// The last confirmed row.
    pub last: Option<Cursor>,
    /// Rows left out because their event is over `broker.max_message_bytes`.
    pub too_large: Vec<String>,
    /// Rows left out because a write of this site to them waits in the
    /// outbox (its own event brings them).
    pub pending: u64,
    /// Deletes of target rows the source lacks, confirmed.
    pub pruned: u64,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("reading the snapshot: {0}")]
    Read(String),
    #[error("{0}")]
    Send(#[from] DirectError),
    #[error("{0}")]
    Save(String),
    /// Asked to stop ([`Run::stop`]): what was sent is confirmed and saved.
    #[error("cancelled")]
    Cancelled,
}

/// How often a run saves its progress in the job's row.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// What a run sends and where.
pub struct Run<'a> {
    /// The source site (the origin's middle part).
    pub site: &'a str,
    pub job: &'a Job,
    pub tables: &'a [Table],
    /// Rows a second at most.
    pub rate: Option<u32>,
    /// Confirms in flight at most.
    pub window: usize,
    /// Events (or packs) larger than this are left out (and listed).
    pub max_bytes: usize,
    /// Rows to send in all (for the job's row).
    pub total: i64,
    /// `--prune`: the target's rows the source lacks, deleted after the
    /// tables are sent.
    pub extras: &'a [Extra],
    /// `--pack N`: up to N events per message ([`crate::bus::pack`]);
    /// 1 sends each event alone.
    pub pack: usize,
    /// `--compress`: packs compressed with zstd.
    pub compress: bool,
    /// Set to stop the run between two rows (SIGINT, a cancel through the
    /// admin API): what is in flight is confirmed and the job's progress
    /// saved, so that `--resume` goes on exactly after the last row sent.
    pub stop: Option<&'a std::sync::atomic::AtomicBool>,
}

impl Run<'_> {
    fn stopped(&self) -> bool {
        self.stop
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// What a confirmed message counts for: its rows, and the last row's
/// cursor (none for the deletes of `--prune`).
#[derive(Debug, Clone)]
pub struct Tag {
    pub rows: i64,
    pub cursor: Option<Cursor>,
}

/// Sends the rows of `run.tables` after the job's cursor, from `snap`, to
/// `direct`'s queue; `progress` is called after each confirm, and the job's
/// row saved every second. Returns how far it got, and why it stopped if
/// it did not finish.
pub async fn send<R: Resync>(
    resync: &mut R,
    snap: &mut R::Snapshot,
    direct: &mut Direct<Tag>,
    run: &Run<'_>,
    mut progress: impl FnMut(&Sent),
) -> (Sent, Result<(), SendError>) {
    let mut sent = Sent {
        confirmed: run.job.confirmed,
        last: run.job.cursor.clone(),
        too_large: Vec::new(),
        pending: 0,
        pruned: 0,
    };
    let result = sending(resync, snap, direct, run, &mut sent, &mut progress).await;
    (sent, result)
}

/// Events waiting to go out as one message: a pack, or one event alone.
struct Outgoing {
    origin: String,
    job: i64,
    attempt: i64,
    pack: usize,
    compress: bool,
    max_bytes: usize,
    /// Bodies of the events, their events' `(seq)` and what they count for.
    bodies: Vec<Vec<u8>>,
    bytes: usize,
    first_seq: u64,
    /// The properties of the one event, used when it goes alone.
    single: Option<lapin::BasicProperties>,
    tag: Option<Cursor>,
    what: String,
}

impl Outgoing {
    fn new(origin: &str, run: &Run<'_>) -> Outgoing {
        Outgoing {
            origin: origin.to_string(),
            job: run.job.id,
            attempt: run.job.attempt,
            pack: run.pack.max(1),
            compress: run.compress,
            max_bytes: run.max_bytes,
            bodies: Vec::new(),
            bytes: 0,
            first_seq: 0,
            single: None,
            tag: None,
            what: String::new(),
        }
    }

    /// Whether a body of `len` bytes still fits in the message being made.
    fn fits(&self, len: usize) -> bool {
        self.bodies.is_empty()
            || (self.bodies.len() < self.pack && self.bytes + len + 2 <= self.max_bytes)
    }

    fn add(&mut self, event: &Event, body: Vec<u8>, tag: Option<Cursor>, what: String) {
        if self.bodies.is_empty() {
            self.first_seq = event.seq;
            let mut headers = FieldTable::default();
            headers.insert(HEADER_RESYNC.into(), AMQPValue::LongLongInt(self.job));
            self.single = Some(event_properties(event, headers, "resync"));
        }
        self.bytes += body.len() + 1;
        self.bodies.push(body);
        self.tag = tag;
        self.what = what;
    }

    /// Publishes what waits (nothing when empty); confirmed tags go to
    /// `sent`.
    async fn flush(
        &mut self,
        direct: &mut Direct<Tag>,
        sent: &mut Sent,
        progress: &mut impl FnMut(&Sent),
    ) -> Result<(), SendError> {
        if self.bodies.is_empty() {
            return Ok(());
        }
        let rows = self.bodies.len();
        let tag = Tag {
            rows: rows as i64,
            cursor: self.tag.take(),
        };
        let (body, props, what) = match self.pack {
            1 => (
                std::mem::take(&mut self.bodies[0]),
                self.single.take().expect("set with the first body"),
                std::mem::take(&mut self.what),
            ),
            _ => {
                let body = pack::body(self.bodies.iter().map(Vec::as_slice), self.compress);
                let props = pack_properties(
                    &self.origin,
                    self.job,
                    self.attempt,
                    self.first_seq,
                    rows,
                    self.compress,
                );
                let what = format!("a pack of {rows} rows ending with {}", self.what);
                (body, props, what)
            }
        };
        self.bodies.clear();
        self.bytes = 0;
        if let Some(done) = direct.send(&body, props, what, tag).await? {
            settled(sent, done);
            progress(sent);
        }
        for done in direct.settled_now()? {
            settled(sent, done);
            progress(sent);
        }
        Ok(())
    }
}

/// The properties of a pack of `rows` events of a job, the first numbered
/// `first_seq`.
pub fn pack_properties(
    origin: &str,
    job: i64,
    attempt: i64,
    first_seq: u64,
    rows: usize,
    compress: bool,
) -> lapin::BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(HEADER_RESYNC.into(), AMQPValue::LongLongInt(job));
    headers.insert(
        pack::HEADER_PACK.into(),
        AMQPValue::LongLongInt(rows as i64),
    );
    headers.insert(
        crate::bus::publisher::HEADER_EPOCH.into(),
        AMQPValue::LongLongInt(attempt.max(1)),
    );
    headers.insert(
        crate::bus::publisher::HEADER_SEQ.into(),
        AMQPValue::LongLongInt(first_seq as i64),
    );
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(format!("{origin}:{}:{first_seq}", attempt.max(1)).into())
        .with_app_id(origin.into())
        .with_type("sitesync.pack".into())
        .with_timestamp(Utc::now().timestamp().max(0) as u64)
        .with_headers(headers);
    match compress {
        true => props.with_content_encoding(pack::ZSTD.into()),
        false => props,
    }
}

async fn sending<R: Resync>(
    resync: &mut R,
    snap: &mut R::Snapshot,
    direct: &mut Direct<Tag>,
    run: &Run<'_>,
    sent: &mut Sent,
    progress: &mut impl FnMut(&Sent),
) -> Result<(), SendError> {
    let origin = origin(run.site, run.job.id);
    let mut pace = Pace::new(run.rate);
    let mut seq = 0u64;
    let mut saved = std::time::Instant::now();
    let mut out = Outgoing::new(&origin, run);
    let start = start_at(run.tables, run.job.cursor.as_ref());
    for (i, table) in run.tables.iter().enumerate().skip(start.0) {
        let mut after = match i == start.0 {
            true => start.1.clone(),
            false => None,
        };
        loop {
            let page = snap
                .page(table, after.as_deref(), PAGE)
                .await
                .map_err(SendError::Read)?;
            for row in &page {
                if run.stopped() {
                    drain(resync, direct, run, &mut out, sent, progress).await?;
                    return Err(SendError::Cancelled);
                }
                if row.pending {
                    sent.pending += 1;
                    continue;
                }
                let event = event(
                    &origin,
                    &run.job.to_site,
                    run.job.attempt,
                    seq + 1,
                    table,
                    row,
                )
                .map_err(SendError::Read)?;
                let body = event.to_body();
                if body.len() > run.max_bytes {
                    sent.too_large
                        .push(format!("{} key {}", table.table, row.key));
                    continue;
                }
                pace.next().await;
                seq += 1;
                if !out.fits(body.len()) {
                    out.flush(direct, sent, progress).await?;
                }
                let tag = Cursor {
                    entity: table.entity.clone(),
                    key: row.cursor.clone(),
                };
                let what = format!("row {} of {}", row.key, table.table);
                out.add(&event, body, Some(tag), what);
                if out.bodies.len() >= out.pack {
                    out.flush(direct, sent, progress).await?;
                }
                if saved.elapsed() >= SAVE_EVERY {
                    saved = std::time::Instant::now();
                    resync
                        .progress(
                            run.job.id,
                            run.total,
                            sent.confirmed,
                            sent.last.as_ref(),
                            None,
                        )
                        .await
                        .map_err(SendError::Save)?;
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE => after = Some(last.cursor.clone()),
                _ => break,
            }
        }
    }
    // The rows' last message before the deletes: a delete carries no
    // cursor, so it must not share a pack (or a tag) with rows.
    out.flush(direct, sent, progress).await?;
    for chunk in run.extras.chunks(PAGE) {
        let mut tombstones: HashMap<(String, String), Stored> = HashMap::new();
        let mut by_table: HashMap<&str, Vec<String>> = HashMap::new();
        for x in chunk {
            by_table.entry(&x.source).or_default().push(x.key.clone());
        }
        for (entity, keys) in by_table {
            for (key, v) in snap
                .versions(entity, &keys)
                .await
                .map_err(SendError::Read)?
            {
                tombstones.insert((entity.to_string(), key), v);
            }
        }
        for x in chunk {
            if run.stopped() {
                drain(resync, direct, run, &mut out, sent, progress).await?;
                return Err(SendError::Cancelled);
            }
            seq += 1;
            let tombstone = tombstones.get(&(x.source.clone(), x.key.clone()));
            let event = prune_event(
                &origin,
                &run.job.to_site,
                run.job.attempt,
                seq,
                x,
                tombstone,
            )
            .map_err(SendError::Read)?;
            pace.next().await;
            let body = event.to_body();
            if !out.fits(body.len()) {
                out.flush(direct, sent, progress).await?;
            }
            // No cursor: a resume prunes again (the same ids).
            let what = format!("the delete of {} key {}", x.entity, x.key);
            out.add(&event, body, None, what);
            if out.bodies.len() >= out.pack {
                out.flush(direct, sent, progress).await?;
            }
        }
    }
    drain(resync, direct, run, &mut out, sent, progress).await
}

/// Sends what waits, settles every message in flight and saves the job's
/// progress: the end of a run, or its stop.
async fn drain<R: Resync>(
    resync: &mut R,
    direct: &mut Direct<Tag>,
    run: &Run<'_>,
    out: &mut Outgoing,
    sent: &mut Sent,
    progress: &mut impl FnMut(&Sent),
) -> Result<(), SendError> {
    out.flush(direct, sent, progress).await?;
    while let Some(done) = direct.settle_oldest().await? {
        settled(sent, done);
        progress(sent);
    }
    resync
        .progress(
            run.job.id,
            run.total,
            sent.confirmed,
            sent.last.as_ref(),
            None,
        )
        .await
        .map_err(SendError::Save)
}

/// Counts a confirmed message: rows (up to its cursor), or deletes of
/// `--prune` (no cursor).
fn settled(sent: &mut Sent, tag: Tag) {
    sent.confirmed += tag.rows;
    match tag.cursor {
        Some(cursor) => sent.last = Some(cursor),
        None => sent.pruned += tag.rows as u64,
    }
}

/// Where a run starts: the table of the cursor (by index) and the key
/// after which its rows go; the first table from its start without one.
/// A cursor whose table is no longer in the list starts from the first.
pub fn start_at(tables: &[Table], cursor: Option<&Cursor>) -> (usize, Option<String>) {
    match cursor {
        Some(c) => match tables.iter().position(|t| t.entity == c.entity) {
            Some(i) => (i, Some(c.key.clone())),
            None => (0, None),
        },
        None => (0, None),
    }
}

/// One table of the target, for `--prune`: its rows as the target's
/// delete route would carry them (the key fields only).
#[derive(Debug, Clone, PartialEq)]
pub struct Prune {
    /// The source's table they are compared with (its entity).
    pub entity: String,
    /// The target's table and the inverse of its delete route.
    pub table: Table,
}

/// The target's tables for `--prune`, one per source table (matched by
/// the upsert route's type), each read through the inverse of its delete
/// route; or why some cannot be pruned.
pub async fn prune_tables<C: Capture>(
    c: &C,
    target: &SinkConfig,
    source: &[Table],
    filter: Option<&str>,
) -> Result<Vec<Prune>, Vec<String>> {
    let mut out = Vec::new();
    let mut refused = Vec::new();
    for t in source {
        let Some(up) = target.route(&t.side.kind) else {
            refused.push(format!(
                "{}: the target has no route of type {}, so --prune cannot tell its table",
                t.table, t.side.kind
            ));
            continue;
        };
        let table = up.entity_table();
        let delete = target
            .routes
            .iter()
            .find(|r| r.entity_table() == table && r.operation == crate::config::Operation::Delete);
        let Some(delete) = delete else {
            refused.push(format!(
                "{}: the target has no delete route for its table {}: --prune sends deletes",
                t.table, up.table
            ));
            continue;
        };
        let found = match c.table(&up.table).await {
            Ok(Some(f)) => f,
            Ok(None) => {
                refused.push(format!("{}: the target has no table {}", t.table, up.table));
                continue;
            }
            Err(e) => {
                refused.push(format!(
                    "{}: reading the target's {}: {e}",
                    t.table, up.table
                ));
                continue;
            }
        };
        let only = Spec {
            table: &up.table,
            upsert: None,
            delete: Some(delete),
        };
        match capture::plan(&only, &found, C::FOLD_CASE) {
            Ok(Plan {
                table: name,
                columns,
                delete: Some(side),
                ..
            }) => out.push(Prune {
                entity: t.entity.clone(),
                table: Table {
                    table: name,
                    entity: table.clone(),
                    columns,
                    side,
                    filter: filter.map(str::to_string),
                    kinds: vec![],
                },
            }),
            Ok(_) => unreachable!("a delete route gives a delete side"),
            Err(e) => refused.push(format!("{}: the target's {}: {e}", t.table, up.table)),
        }
    }
    match refused.is_empty() {
        true => Ok(out),
        false => Err(refused),
    }
}

/// Every row of `table` in `snap`, a page at a time.
pub async fn all_rows<S: Snapshot>(snap: &mut S, table: &Table) -> Result<Vec<Row>, String> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = snap.page(table, after.as_deref(), PAGE).await?;
        let full = page.len() == PAGE;
        after = page.last().map(|r| r.cursor.clone());
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

/// The keys of `table` in `snap`.
pub async fn keys<S: Snapshot>(snap: &mut S, table: &Table) -> Result<HashSet<String>, String> {
    Ok(all_rows(snap, table)
        .await?
        .into_iter()
        .map(|r| r.key)
        .collect())
}

/// A target row the source lacks: the delete to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Extra {
    /// The source's table (its entity): where its tombstone is.
    pub source: String,
    /// The target's table (its entity) and its delete type.
    pub entity: String,
    pub kind: String,
    pub key: String,
    /// The key fields, as the target's delete route reads them.
    pub data: String,
}

/// The rows of the target that the source lacks, in the target's key
/// order, table by table.
pub fn extras(
    target: &[(Prune, Vec<Row>)],
    source: &HashMap<String, HashSet<String>>,
) -> Vec<Extra> {
    let mut out = Vec::new();
    for (p, rows) in target {
        let have = source.get(&p.entity);
        for r in rows {
            if have.is_none_or(|h| !h.contains(&r.key)) {
                out.push(Extra {
                    source: p.entity.clone(),
                    entity: p.table.entity.clone(),
                    kind: p.table.side.kind.clone(),
                    key: r.key.clone(),
                    data: r.data.clone(),
                });
            }
        }
    }
    out
}

/// The delete of a target row the source lacks. Its version is the
/// source's tombstone of the row when it has one (the delete it applied:
/// a newer write at the target still wins), else the Unix epoch: a row the
/// target holds from an event the source has not applied yet keeps it.
pub fn prune_event(
    origin: &str,
    to_site: &str,
    attempt: i64,
    seq: u64,
    extra: &Extra,
    tombstone: Option<&Stored>,
) -> Result<Event, String> {
    let data = RawValue::from_string(extra.data.clone())
        .map_err(|e| format!("key {} of {}: not JSON: {e}", extra.key, extra.entity))?;
    let id = match tombstone {
        Some(v) if v.origin != to_site => v.event_id,
        _ => event_id(origin, &format!("prune:{}", extra.entity), &extra.key),
    };
    Ok(Event {
        id,
        timestamp: tombstone.map_or_else(unversioned, |v| v.ts),
        origin: origin.to_string(),
        kind: extra.kind.clone(),
        entity_key: Some(extra.key.clone()),
        data,
        epoch: attempt.max(1) as u64,
        seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Column, Table as Found};
    use crate::config::Operation;
    use std::collections::BTreeMap;

    fn col(name: &str) -> Column {
        Column {
            name: name.into(),
            route_name: name.into(),
            ty: "text".into(),
            scale: 0,
        }
    }

    struct Fake(Found);

    impl Capture for Fake {
        const FOLD_CASE: bool = false;
        async fn table(&self, t: &str) -> Result<Option<Found>, String> {
            Ok((t == "public.users").then(|| self.0.clone()))
        }
        async fn installed(&self, _: &str) -> Result<Vec<capture::Installed>, String> {
            Ok(vec![])
        }
        fn install(&self, _: &Plan, _: &str) -> capture::Generated {
            capture::Generated {
                triggers: vec![],
                statements: vec![],
            }
        }
        fn remove(&self, _: &str, _: &[String]) -> Vec<String> {
            vec![]
        }
        async fn execute(&self, _: &[String]) -> Result<(), String> {
            Ok(())
        }
    }

    fn route(kind: &str, table: &str, op: Operation) -> Route {
        Route {
            kind: kind.into(),
            table: table.into(),
            key: vec!["id".into()],
            operation: op,
            rename: BTreeMap::new(),
            drop: vec![],
            constants: BTreeMap::new(),
        }
    }

    fn cfg(routes: Vec<Route>) -> SinkConfig {
        crate::sink::testing::sink_with(routes)
    }

    fn users() -> Fake {
        Fake(Found {
            columns: vec![col("id"), col("user_name"), col("password")],
            generated: vec!["upper_name".into()],
            unique: vec![vec!["id".into()]],
        })
    }

    fn all() -> Request {
        Request {
            routes: vec![],
            all: true,
            filter: Some("id > 3".into()),
            allow_dropped: false,
            prune: false,
            target_connector: None,
        }
    }

    #[tokio::test]
    async fn a_table_is_read_through_the_inverse_of_its_upsert_route() {
        let mut up = route("user.upsert", "public.users", Operation::Upsert);
        up.rename = BTreeMap::from([("username".to_string(), "user_name".to_string())]);
        up.constants = BTreeMap::from([("password".to_string(), serde_json::json!("x"))]);
        let del = route("user.delete", "users", Operation::Delete);
        let c = cfg(vec![up, del]);
        let t = tables(&users(), &c, &all()).await.unwrap();
        assert_eq!(t.len(), 1);
        let t = &t[0];
        assert_eq!(t.entity, "public.users");
        assert_eq!(t.side.kind, "user.upsert", "the delete route is not sent");
        let fields: Vec<(&str, &str)> = t
            .side
            .fields
            .iter()
            .map(|f| (f.column.name.as_str(), f.field.as_str()))
            .collect();
        // The constant's column is left out; the renamed one goes back
        // under its field.
        assert_eq!(fields, vec![("id", "id"), ("user_name", "username")]);
        assert_eq!(t.columns, vec!["id", "user_name", "password", "upper_name"]);
        assert_eq!(t.filter.as_deref(), Some("id > 3"));
        assert_eq!(t.kinds, vec!["user.upsert", "user.delete"]);
    }

    #[tokio::test]
    async fn routes_that_cannot_be_inverted_are_refused_with_their_reasons() {
        let mut up = route("user.upsert", "public.users", Operation::Upsert);
        up.drop = vec!["password".into()];
        let only_delete = route("order.delete", "orders", Operation::Delete);
        let missing = route("item.upsert", "items", Operation::Upsert);
        let c = cfg(vec![up.clone(), only_delete, missing]);
        let e = tables(&users(), &c, &all()).await.unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains("drops field(s) password"), "{e:?}");
        assert!(e[0].contains("--allow-dropped"), "{e:?}");
        assert!(e[1].contains("only a delete route (order.delete)"), "{e:?}");
        assert!(e[2].contains("table items does not exist"), "{e:?}");
        // Allowed: sent without the dropped field.
        let c = cfg(vec![up]);
        let t = tables(
            &users(),
            &c,
            &Request {
                allow_dropped: true,
                ..all()
            },
        )
        .await
        .unwrap();
        assert!(t[0].side.fields.iter().all(|f| f.field != "password"));
        // A key the route does not write back: capture's own refusal.
        let mut renamed_away = route("user.upsert", "public.users", Operation::Upsert);
        renamed_away.drop = vec!["id".into()];
        let c = cfg(vec![renamed_away]);
        let e = tables(
            &users(),
            &c,
            &Request {
                allow_dropped: true,
                ..all()
            },
        )
        .await
        .unwrap_err();
        assert!(
            e[0].contains("does not write its key column id back"),
            "{e:?}"
        );
        // An unknown type.
        let e = tables(
            &users(),
            &c,
            &Request {
                routes: vec!["nope".into()],
                all: false,
                filter: None,
                allow_dropped: false,
                prune: false,
                target_connector: None,
            },
        )
        .await
        .unwrap_err();
        assert!(e[0].contains("no route has type nope"), "{e:?}");
    }

    #[test]
    fn a_snapshot_event_carries_the_rows_version_and_the_jobs_numbers() {
        let t = Table {
            table: "users".into(),
            entity: "public.users".into(),
            columns: vec![],
            side: Side {
                kind: "user.upsert".into(),
                key: vec![],
                fields: vec![],
            },
            filter: None,
            kinds: vec![],
        };
        let at = "2026-05-01T10:00:00.123456Z"
            .parse::<DateTime<Utc>>()
            .unwrap();
        let row = Row {
            cursor: r#"{"id": 7}"#.into(),
            key: "7".into(),
            data: r#"{"id": 7, "username": "zoé"}"#.into(),
            version: Some(Stored {
                ts: at,
                origin: "MADRID".into(),
                event_id: Uuid::from_u128(99),
            }),
            pending: false,
        };
        let o = origin("PARIS", 12);
        assert_eq!(o, "resync:PARIS:12");
        let e = event(&o, "LONDON", 2, 5, &t, &row).unwrap();
        assert_eq!(
            e.timestamp, at,
            "the row's version, not the snapshot's time"
        );
        assert_eq!(
            e.id,
            Uuid::from_u128(99),
            "the id of the event that wrote the row"
        );
        assert_eq!(e.origin, "resync:PARIS:12");
        assert_eq!((e.epoch, e.seq), (2, 5));
        assert_eq!(e.kind, "user.upsert");
        assert_eq!(e.entity_key.as_deref(), Some("7"));
        assert_eq!(e.data.get(), r#"{"id": 7, "username": "zoé"}"#);
        // The target's own write: an id of the job's (its inbox keeps its
        // own events as back round, not applied).
        let own = event(&o, "MADRID", 2, 5, &t, &row).unwrap();
        assert_eq!(own.id, event_id(&o, "public.users", "7"));
        assert_eq!(own.timestamp, at);
        // Derived ids: the same row in another run of the job gets the
        // same; another row, job or table another.
        let bare_row = Row {
            version: None,
            ..row.clone()
        };
        let bare = event(&o, "LONDON", 1, 1, &t, &bare_row).unwrap();
        assert_eq!(
            event(&o, "LONDON", 3, 9, &t, &bare_row).unwrap().id,
            bare.id
        );
        assert_eq!(bare.id, own.id);
        assert_ne!(event_id(&o, "public.users", "8"), bare.id);
        assert_ne!(event_id(&origin("PARIS", 13), "public.users", "7"), bare.id);
        assert_ne!(event_id(&o, "public.other", "7"), bare.id);
        // No version: older than any event.
        assert_eq!(bare.timestamp, DateTime::<Utc>::UNIX_EPOCH);
        let bad = Row {
            data: "{nope".into(),
            ..row
        };
        assert!(
            event(&o, "LONDON", 1, 1, &t, &bad)
                .unwrap_err()
                .contains("not JSON")
        );
    }

    #[test]
    fn prune_deletes_what_the_source_lacks_under_its_tombstone_or_the_epoch() {
        let side = Side {
            kind: "item.delete".into(),
            key: vec![],
            fields: vec![],
        };
        let target = Table {
            table: "item".into(),
            entity: "public.item".into(),
            columns: vec![],
            side,
            filter: None,
            kinds: vec![],
        };
        let row = |key: &str| Row {
            cursor: format!("{{\"id\": {key}}}"),
            key: key.into(),
            data: format!("{{\"id\": {key}}}"),
            version: None,
            pending: false,
        };
        let prune = Prune {
            entity: "public.items_src".into(),
            table: target,
        };
        let source = HashMap::from([(
            "public.items_src".to_string(),
            HashSet::from(["1".to_string(), "3".to_string()]),
        )]);
        let x = extras(
            &[(prune, vec![row("1"), row("2"), row("3"), row("4")])],
            &source,
        );
        let keys: Vec<&str> = x.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, vec!["2", "4"]);
        assert_eq!(x[0].kind, "item.delete");
        assert_eq!(
            (x[0].source.as_str(), x[0].entity.as_str()),
            ("public.items_src", "public.item")
        );
        let o = origin("PARIS", 3);
        // No tombstone at the source: the epoch, a derived id.
        let e = prune_event(&o, "LONDON", 1, 7, &x[0], None).unwrap();
        assert_eq!(e.timestamp, DateTime::<Utc>::UNIX_EPOCH);
        assert_eq!(e.id, event_id(&o, "prune:public.item", "2"));
        assert_eq!(
            (e.kind.as_str(), e.seq, e.data.get()),
            ("item.delete", 7, "{\"id\": 2}")
        );
        // The source deleted it: that delete's version and id.
        let at = "2026-05-01T10:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let t = Stored {
            ts: at,
            origin: "MADRID".into(),
            event_id: Uuid::from_u128(5),
        };
        let e = prune_event(&o, "LONDON", 1, 8, &x[1], Some(&t)).unwrap();
        assert_eq!((e.timestamp, e.id), (at, Uuid::from_u128(5)));
    }

    #[test]
    fn a_busy_table_says_how_to_go_on() {
        let dead = ClaimError::Busy {
            entity: "public.item".into(),
            to_site: "LONDON".into(),
            job: 4,
            running: false,
        }
        .to_string();
        assert!(
            dead.contains("--resume 4") && dead.contains("--abandon 4"),
            "{dead}"
        );
        let live = ClaimError::Busy {
            entity: "public.item".into(),
            to_site: "LONDON".into(),
            job: 4,
            running: true,
        }
        .to_string();
        assert!(live.contains("running now"), "{live}");
    }
}
