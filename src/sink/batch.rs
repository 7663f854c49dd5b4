//! The batch transaction, written once for every engine.
//!
//! A batch of planned messages ([`Item`]s) is applied in one database
//! transaction: the per-origin progress and gaps, the inbox rows, the
//! deletion of this site's outbox rows whose events came back round, the
//! changes that last-writer-wins lets through, the entities' versions and
//! the conflicts. What each step says in SQL is the engine's [`Session`];
//! the order of the steps, the retries and the isolation of a failing
//! message are here.
//!
//! # When an attempt fails
//!
//! Each failure is a [`Failed`], classified by the engine:
//!
//! - [`Failed::Busy`]: an application holds one of the batch's rows (a
//!   lock timeout, a deadlock): the batch is tried again a moment later, up
//!   to [`Dialect::BUSY_RETRIES`] times, then it is a transient failure
//!   (backoff, nothing acked).
//! - [`Failed::Seen`]: an engine's plain inbox insert met an event the
//!   inbox holds already (a redelivery): the batch is applied again with
//!   the inbox insert that skips such events ("careful").
//! - [`Failed::Data`]: one message's data broke a statement (a constraint,
//!   a type): the batch is applied again one message at a time, each under
//!   a savepoint. The failing message is rolled back alone and comes back
//!   as [`Outcome::Failed`]; its entity's later messages are held behind
//!   it; the rest commits.
//! - [`Failed::Gone`]: one message's error ended the whole transaction (SQL
//!   Server aborts it on a conversion error, whatever the savepoints): the
//!   batch is applied again without that message, which fails on its own.
//!   SQL Server's session tells it apart by `XACT_STATE()` after a data
//!   error.
//! - [`Failed::Batch`]: the connection, the server, a statement outside
//!   any one message: returned to the sink, which backs off (transient) or
//!   stops (operator).

use super::control::Receipt;
use super::mapping::{self, Entity, MappedRow};
use super::rules::{self, Conflict, Gap, LocalWrite, Version, decide, track};
use super::{Item, Outcome, Plan, Seen, Sorted, Target, sort_items};
use crate::checks::Check;
use crate::config::{Route, SinkConfig};
use crate::error::{Cause, TargetError};
use crate::event::Event;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use tokio::sync::Mutex;
use uuid::Uuid;

/// The stored versions of entities: `(version, event id)` each.
pub type Stored = HashMap<Entity, (Version, Uuid)>;

/// This site's writes still in its outbox, per entity.
pub type Local = HashMap<Entity, Vec<LocalWrite>>;

/// Each origin's `(epoch, highest seq)` as `sitesync_origins` holds it.
pub type Origins = BTreeMap<String, (u64, u64)>;

/// A route and the row an event maps to through it.
pub type Write<'a> = (&'a Route, &'a MappedRow);

/// Why an attempt at a batch failed (see the module doc).
#[derive(Debug)]
pub enum Failed {
    /// One message's data: the batch is applied message by message.
    Data(String),
    /// One message's error ended the transaction: the batch is applied
    /// again without that message.
    Gone(String),
    /// Rows held by applications: the batch is tried again shortly.
    Busy,
    /// A plain inbox insert met an event the inbox holds already.
    Seen,
    /// The batch as a whole.
    Batch(TargetError),
}

impl From<TargetError> for Failed {
    fn from(e: TargetError) -> Self {
        Failed::Batch(e)
    }
}

/// How a transaction starts.
#[derive(Debug)]
pub struct Start<'a> {
    /// Message by message, each under a savepoint: every failure must then
    /// belong to one message (PostgreSQL checks deferred constraints at
    /// each statement).
    pub isolate: bool,
    /// The rows of other sites' events (the whole batch's when not
    /// isolating; none otherwise): an engine that looks for this site's
    /// writes in flight locks those that exist first (PostgreSQL's does;
    /// the others ignore it).
    pub lock: &'a [Write<'a>],
    /// The origins whose progress the transaction reads (and locks),
    /// sorted, each once.
    pub origins: &'a [&'a str],
    /// Each message's `(origin, epoch, seq)`, in queue order, for
    /// [`advance`].
    pub seen: &'a [&'a Seen],
}

/// What moved in the origins' progress over a batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// `(origin, epoch, highest seq)` of each origin that moved.
    pub changed: Vec<(String, u64, u64)>,
    /// Ranges of an origin's `seq` that never arrived (logged).
    pub gaps: Vec<Gap>,
    /// Arrivals that may fall in gaps recorded before, by origin and
    /// epoch: the engine reads those gap rows (locked) and shrinks them
    /// with [`rules::shrink`].
    pub late: Vec<rules::LateArrivals>,
}

/// Moves the origins' progress (as the transaction read it) over the
/// batch's messages ([`rules::track`]); logs the gaps found.
pub fn advance(state: &mut Origins, seen: &[&Seen]) -> Progress {
    let rules::Tracked {
        changed,
        gaps,
        late,
    } = track(state, seen);
    for gap in &gaps {
        tracing::warn!(origin = %gap.origin, epoch = gap.epoch, from = gap.from, to = gap.to, "gap: events of this origin never arrived");
    }
    Progress {
        late: rules::late_by_origin(&late),
        changed: changed
            .into_iter()
            .map(|o| {
                let (epoch, seq) = state[&o];
                (o, epoch, seq)
            })
            .collect(),
        gaps,
    }
}

/// The last writes of a batch, which an engine may send in one round trip.
#[derive(Debug)]
pub struct Finish<'a> {
    /// The last wave of writes (each entity at most once).
    pub wave: &'a [Write<'a>],
    /// The versions the entities end on.
    pub versions: &'a [(Entity, Version, Uuid)],
    /// What the transaction read of those versions ([`Session::lookup`]).
    pub stored: &'a Stored,
    pub conflicts: &'a [Conflict],
    /// Events that lost to a newer write: their inbox rows say `lost`.
    pub lost: &'a [Uuid],
}

/// One statement's shape: table, upsert (or delete), columns.
pub type StatementShape<'a> = (&'a str, bool, Vec<&'a str>);

/// The rows of one statement, with their route.
pub type StatementRows<'a> = (&'a Route, Vec<&'a serde_json::Map<String, Value>>);

/// A wave of writes (each entity at most once) grouped into statements:
/// one per table, operation and column set (an upsert writes the row's
/// columns, a delete names the key), for engines that write many rows in
/// one statement.
pub fn statements<'a>(wave: &'a [Write<'a>]) -> BTreeMap<StatementShape<'a>, StatementRows<'a>> {
    let mut groups: BTreeMap<StatementShape<'a>, StatementRows<'a>> = BTreeMap::new();
    for (route, row) in wave {
        let upsert = route.operation == crate::config::Operation::Upsert;
        let cols: Vec<&str> = if upsert {
            row.columns.keys().map(String::as_str).collect()
        } else {
            route.key.iter().map(String::as_str).collect()
        };
        groups
            .entry((route.table.as_str(), upsert, cols))
            .or_insert_with(|| (*route, Vec::new()))
            .1
            .push(&row.columns);
    }
    groups
}

/// What `sitesync check` says of a route whose table exists, in the words
/// every engine uses: the columns the route names (key, renames,
/// constants) that the table lacks (`has` tells whether the table has a
/// column, compared as the engine compares names), else `None`.
pub fn route_missing_columns(
    name: &str,
    route: &Route,
    has: impl Fn(&str) -> bool,
) -> Option<Check> {
    let missing: Vec<&str> = route
        .key
        .iter()
        .chain(route.rename.values())
        .chain(route.constants.keys())
        .map(String::as_str)
        .filter(|c| !has(c))
        .collect();
    (!missing.is_empty()).then(|| {
        Check::fail(
            name,
            format!("{} has no column(s) {}", route.table, missing.join(", ")),
            "fix `key`, `rename` or `constants` in the route",
        )
    })
}

/// The failure of an upsert route whose table has no unique index on
/// exactly its key; `fix` is the engine's statement that adds one.
pub fn route_without_unique_key(name: &str, route: &Route, fix: String) -> Check {
    Check::fail(
        name,
        format!(
            "{} has no unique index on exactly ({})",
            route.table,
            route.key.join(", ")
        ),
        fix,
    )
}

/// A route that passed its checks.
pub fn route_ready(name: &str, route: &Route) -> Check {
    Check::pass(
        name,
        format!(
            "{} {} on ({})",
            match route.operation {
                crate::config::Operation::Upsert => "upsert into",
                crate::config::Operation::Delete => "delete from",
            },
            route.table,
            route.key.join(", ")
        ),
    )
}

/// A database the sink applies batches to: how to open a [`Session`] on it.
pub trait Dialect: Send + Sync + 'static {
    type Session: Session;

    /// How many times in a row a batch may meet rows held by applications
    /// (or be chosen as a deadlock victim) before it counts as a failure
    /// and backs off.
    const BUSY_RETRIES: u32;

    /// A connection ready to apply batches: marked for application
    /// triggers, knowing the outbox; refuses a database `sitesync init` has
    /// not prepared.
    fn connect(&self) -> impl Future<Output = Result<Self::Session, TargetError>> + Send;

    /// Creates the sink's tables (idempotent); one line per thing done.
    fn init(&self) -> impl Future<Output = Result<Vec<String>, TargetError>> + Send;

    /// What `sitesync check` verifies for the sink: its tables, and each
    /// route's table.
    fn preflight(&self) -> impl Future<Output = Vec<Check>> + Send;
}

/// One connection of a [`Dialect`]: the SQL of each step of a batch.
///
/// The methods from `begin` to `commit` run inside the transaction
/// [`Session::begin`] opened; their errors are classified as [`Failed`].
/// `rollback`, `usable` and `sweep_own` run outside a batch.
pub trait Session: Send {
    /// Whether this engine checks that this site's own writes, back round,
    /// are what the rows hold ([`Session::rows_not_as_written`]).
    const CHECKS_OWN_ROWS: bool = false;

    /// Whether the connection is known to be gone.
    fn closed(&self) -> bool {
        false
    }

    /// Opens the batch's transaction (READ COMMITTED), marks it for
    /// application triggers, locks `start.lock` where the engine does, and
    /// moves the origins' progress: reads (and locks) that of
    /// `start.origins`, [`advance`]s it over `start.seen`, and writes what
    /// moved and the gaps.
    fn begin(&mut self, start: Start<'_>) -> impl Future<Output = Result<(), Failed>> + Send;

    /// Inserts inbox rows with their outcome; returns the events that are
    /// new (or come back from the dead-letter queue). Not `careful`, an
    /// engine may insert plainly and fail with [`Failed::Seen`] on an event
    /// the inbox holds.
    fn insert_inbox(
        &mut self,
        events: &[(&Event, &'static str)],
        careful: bool,
    ) -> impl Future<Output = Result<HashSet<Uuid>, Failed>> + Send;

    /// Deletes this site's outbox rows whose events came back round.
    fn delete_own(&mut self, ids: &[Uuid]) -> impl Future<Output = Result<(), Failed>> + Send;

    /// Locks those of `rows` that exist, yielding to applications
    /// ([`Failed::Busy`]). Engines that do not look for this site's writes
    /// in flight need no lock.
    fn lock_rows(&mut self, rows: &[Write<'_>]) -> impl Future<Output = Result<(), Failed>> + Send {
        let _ = rows;
        async { Ok(()) }
    }

    /// The stored versions of `entities`.
    fn load_versions(
        &mut self,
        entities: &[&Entity],
    ) -> impl Future<Output = Result<Stored, Failed>> + Send;

    /// This site's writes still in its outbox for `entities`.
    fn local_writes(
        &mut self,
        entities: &[&Entity],
    ) -> impl Future<Output = Result<Local, Failed>> + Send;

    /// Both of the above (an engine may send them in one round trip).
    fn lookup(
        &mut self,
        entities: &[&Entity],
    ) -> impl Future<Output = Result<(Stored, Local), Failed>> + Send {
        async move {
            let stored = self.load_versions(entities).await?;
            let local = self.local_writes(entities).await?;
            Ok((stored, local))
        }
    }

    /// Writes one wave of rows: each entity at most once, in order.
    fn write(&mut self, wave: &[Write<'_>]) -> impl Future<Output = Result<(), Failed>> + Send;

    /// Moves the entities' versions forward (only forward). `stored`: what
    /// this transaction read of them, when it did.
    fn upsert_versions(
        &mut self,
        versions: &[(Entity, Version, Uuid)],
        stored: &Stored,
    ) -> impl Future<Output = Result<(), Failed>> + Send;

    /// Records losing writes in `sitesync_conflicts` (once each).
    fn insert_conflicts(
        &mut self,
        conflicts: &[Conflict],
    ) -> impl Future<Output = Result<(), Failed>> + Send;

    /// Marks these events' inbox rows `lost`.
    fn mark_lost(&mut self, ids: &[Uuid]) -> impl Future<Output = Result<(), Failed>> + Send;

    /// Of these events (this site's, back round), those `sitesync_conflicts`
    /// records as losers here.
    fn recorded_losers(
        &mut self,
        ids: &[Uuid],
    ) -> impl Future<Output = Result<HashSet<Uuid>, Failed>> + Send;

    /// Deletes the conflict records whose loser is one of these events.
    fn withdraw_conflicts(
        &mut self,
        losers: &[Uuid],
    ) -> impl Future<Output = Result<(), Failed>> + Send;

    /// The last writes, the versions, the conflicts and the lost events, in
    /// that order (an engine may send them in one round trip).
    fn finish(&mut self, f: Finish<'_>) -> impl Future<Output = Result<(), Failed>> + Send {
        async move {
            if !f.wave.is_empty() {
                self.write(f.wave).await?;
            }
            if !f.versions.is_empty() {
                self.upsert_versions(f.versions, f.stored).await?;
            }
            if !f.conflicts.is_empty() {
                self.insert_conflicts(f.conflicts).await?;
            }
            if !f.lost.is_empty() {
                self.mark_lost(f.lost).await?;
            }
            Ok(())
        }
    }

    /// Of this site's writes back round (whose entity's version another
    /// site wrote before them), those the row does not hold because the
    /// sink overwrote them; only called when [`Session::CHECKS_OWN_ROWS`].
    fn rows_not_as_written<'w>(
        &mut self,
        writes: &[Write<'w>],
    ) -> impl Future<Output = Result<Vec<Write<'w>>, Failed>> + Send {
        let _ = writes;
        async { Ok(Vec::new()) }
    }

    /// A savepoint for one message.
    fn savepoint(&mut self) -> impl Future<Output = Result<(), Failed>> + Send;

    /// Keeps what was done since the savepoint.
    fn release_savepoint(&mut self) -> impl Future<Output = Result<(), Failed>> + Send;

    /// Undoes what was done since the savepoint (the transaction goes on).
    fn rollback_to_savepoint(&mut self) -> impl Future<Output = Result<(), Failed>> + Send;

    fn commit(&mut self) -> impl Future<Output = Result<(), Failed>> + Send;

    /// Undoes a failed attempt, whatever state it left.
    fn rollback(&mut self) -> impl Future<Output = ()> + Send;

    /// After a batch failed: whether this connection may serve the next
    /// one (else a new one is opened).
    fn usable(&mut self) -> impl Future<Output = bool> + Send;

    /// Deletes this site's outbox rows whose events the inbox records as
    /// back round (outside any batch); returns how many.
    fn sweep_own(&mut self) -> impl Future<Output = Result<u64, TargetError>> + Send;

    /// Every open gap, oldest first, with its age and how long since it was
    /// last asked of the archive (outside any batch).
    fn open_gaps(&mut self) -> impl Future<Output = Result<Vec<OpenGap>, TargetError>> + Send;

    /// Marks the gaps `ids` (outside any batch): asked of the archive now,
    /// or given a note (what the archive said).
    fn mark_gaps<'a>(
        &'a mut self,
        ids: &'a [i64],
        mark: GapMark<'a>,
    ) -> impl Future<Output = Result<(), TargetError>> + Send + 'a;

    /// Records a receipt's lines in `sitesync_receipts` (outside any
    /// batch), one row per event and site: a later outcome replaces an
    /// earlier one (a dead letter requeued and applied), except that a
    /// `duplicate` never replaces anything. Idempotent.
    fn record_receipt<'a>(
        &'a mut self,
        receipt: &'a Receipt,
    ) -> impl Future<Output = Result<(), TargetError>> + Send + 'a;

    /// What this database knows of one event: its receipts and its inbox
    /// row (outside any batch).
    fn trace(&mut self, id: Uuid) -> impl Future<Output = Result<Traced, TargetError>> + Send + '_;

    /// Per site of `sites`: how many events some site sent a receipt for
    /// more than `older_than_s` seconds ago have no receipt from it, and
    /// the oldest such first receipt's age (outside any batch).
    fn unreceipted<'a>(
        &'a mut self,
        sites: &'a [String],
        older_than_s: u64,
    ) -> impl Future<Output = Result<Vec<(String, u64, f64)>, TargetError>> + Send + 'a;
}

/// A row of `sitesync_receipts`, as `sitesync trace` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRow {
    pub site: String,
    pub epoch: u64,
    pub seq: u64,
    pub outcome: String,
    pub reason: Option<String>,
    /// When it happened there, and when the receipt arrived here (RFC 3339).
    pub at: String,
    pub received_at: String,
}

/// What a database knows of one event ([`Session::trace`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traced {
    pub receipts: Vec<ReceiptRow>,
    /// The inbox row: origin, type, epoch, seq, outcome, applied at.
    pub inbox: Option<(String, String, u64, u64, String, String)>,
}

/// A row of `sitesync_gaps`, as the gap filler reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenGap {
    pub id: i64,
    pub origin: String,
    pub epoch: u64,
    pub from: u64,
    pub to: u64,
    /// Seconds since it was detected.
    pub age_s: f64,
    /// Seconds since it was last asked of the archive, if ever.
    pub requested_s: Option<f64>,
    /// What the archive said of it (e.g. not in the archive).
    pub note: Option<String>,
}

/// What [`Session::mark_gaps`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapMark<'a> {
    /// Asked of the archive now (`requested_at`).
    Requested,
    /// Asked again by hand: `requested_at` now, and the note cleared until
    /// the archive answers again.
    RequestedAnew,
    /// The archive's answer (`note`).
    Note(&'a str),
}

/// A [`Target`] for any engine: its [`Dialect`], one connection at a time.
pub struct Batches<D: Dialect> {
    dialect: D,
    site: String,
    sink: SinkConfig,
    session: Mutex<Option<D::Session>>,
}

impl<D: Dialect> Batches<D> {
    pub fn new(dialect: D, site: &str, sink: &SinkConfig) -> Batches<D> {
        Batches {
            dialect,
            site: site.to_string(),
            sink: sink.clone(),
            session: Mutex::new(None),
        }
    }
}

impl<D: Dialect> Target for Batches<D> {
    async fn apply<'a>(&'a self, items: &'a [Item<'a>]) -> Result<Vec<Outcome>, TargetError> {
        let mut guard = self.session.lock().await;
        if guard.as_ref().is_none_or(|s| s.closed()) {
            *guard = Some(self.dialect.connect().await?);
        }
        let session = guard.as_mut().expect("connected above");
        let result = apply_batch::<D::Session>(
            session,
            &Context {
                site: &self.site,
                sink: &self.sink,
                busy_retries: D::BUSY_RETRIES,
            },
            items,
        )
        .await;
        if result.is_err() && !session.usable().await {
            *guard = None;
        }
        result
    }

    async fn sweep_own(&self) -> Result<u64, TargetError> {
        self.outside_batch(async |s: &mut D::Session| s.sweep_own().await)
            .await
    }

    async fn open_gaps(&self) -> Result<Vec<OpenGap>, TargetError> {
        self.outside_batch(async |s: &mut D::Session| s.open_gaps().await)
            .await
    }

    async fn mark_gaps(&self, ids: &[i64], mark: GapMark<'_>) -> Result<(), TargetError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.outside_batch(async |s: &mut D::Session| s.mark_gaps(ids, mark).await)
            .await
    }

    async fn record_receipt(&self, receipt: &Receipt) -> Result<(), TargetError> {
        if receipt.events.is_empty() {
            return Ok(());
        }
        self.outside_batch(async |s: &mut D::Session| s.record_receipt(receipt).await)
            .await
    }

    async fn trace(&self, id: Uuid) -> Result<Traced, TargetError> {
        self.outside_batch(async |s: &mut D::Session| s.trace(id).await)
            .await
    }

    async fn unreceipted(
        &self,
        sites: &[String],
        older_than_s: u64,
    ) -> Result<Vec<(String, u64, f64)>, TargetError> {
        self.outside_batch(async |s: &mut D::Session| s.unreceipted(sites, older_than_s).await)
            .await
    }
}

impl<D: Dialect> Batches<D> {
    /// Runs `work` on the sink's connection between batches (opening one
    /// if needed; dropping it if it broke).
    async fn outside_batch<R>(
        &self,
        work: impl AsyncFnOnce(&mut D::Session) -> Result<R, TargetError>,
    ) -> Result<R, TargetError> {
        let mut guard = self.session.lock().await;
        if guard.as_ref().is_none_or(|s| s.closed()) {
            *guard = Some(self.dialect.connect().await?);
        }
        let session = guard.as_mut().expect("connected above");
        let result = work(session).await;
        if result.is_err() && !session.usable().await {
            *guard = None;
        }
        result
    }
}

/// What a batch needs to know besides its items.
struct Context<'a> {
    site: &'a str,
    sink: &'a SinkConfig,
    busy_retries: u32,
}

/// How an attempt is made.
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    /// Message by message, each under a savepoint.
    isolate: bool,
    /// The inbox insert skips events it holds already.
    careful: bool,
}

/// Why an attempt stopped: a failure, or a message whose error ended the
/// transaction (the next attempt goes without it).
enum Stop {
    Failed(Failed),
    Without(usize, String),
}

impl From<Failed> for Stop {
    fn from(f: Failed) -> Self {
        Stop::Failed(f)
    }
}

/// Applies one batch in one transaction, trying again as the failures
/// say (see the module doc); one outcome per item.
async fn apply_batch<S: Session>(
    s: &mut S,
    cx: &Context<'_>,
    items: &[Item<'_>],
) -> Result<Vec<Outcome>, TargetError> {
    let mut mode = Mode::default();
    let mut busy = 0u32;
    // Messages whose error ended a transaction, with that error.
    let mut without: BTreeMap<usize, String> = BTreeMap::new();
    loop {
        let result = attempt(s, cx, items, mode, &without).await;
        if result.is_err() {
            // Whatever failed, nothing of this attempt stays.
            s.rollback().await;
        }
        match result {
            Ok(outcomes) => return Ok(outcomes),
            Err(Stop::Without(i, reason)) => {
                tracing::debug!(error = %reason, "a message's error ended the transaction; applying the batch again without it");
                without.insert(i, reason);
            }
            Err(Stop::Failed(Failed::Batch(e))) => return Err(e),
            // A redelivery: its inbox row stopped the plain insert.
            Err(Stop::Failed(Failed::Seen)) if !mode.careful => {
                tracing::debug!(
                    "an event of the batch is in the inbox already: applying the batch again, looking for such events"
                );
                mode.careful = true;
            }
            Err(Stop::Failed(Failed::Seen)) => {
                return Err(TargetError::transient(
                    Cause::Query,
                    "the inbox refused an event it did not hold",
                ));
            }
            // Applications are writing the batch's rows: let them finish,
            // then try again (a few times before the backoff).
            Err(Stop::Failed(Failed::Busy)) if busy < cx.busy_retries => {
                busy += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5 + 5 * u64::from(busy))).await;
            }
            Err(Stop::Failed(Failed::Busy)) => {
                return Err(TargetError::transient(
                    Cause::Busy,
                    format!(
                        "the batch's rows stayed locked by applications through {} tries",
                        cx.busy_retries
                    ),
                ));
            }
            // One message's data broke a statement of the whole batch (or
            // ended its transaction): find it, one message at a time.
            Err(Stop::Failed(Failed::Data(e) | Failed::Gone(e))) if !mode.isolate => {
                tracing::debug!(error = %e, "a batch statement failed on a message's data; applying one message at a time");
                mode.isolate = true;
            }
            Err(Stop::Failed(Failed::Data(e) | Failed::Gone(e))) => {
                return Err(TargetError::transient(
                    Cause::Query,
                    format!("a statement outside any one message failed: {e}"),
                ));
            }
        }
    }
}

/// One try at the batch in one transaction.
async fn attempt<S: Session>(
    s: &mut S,
    cx: &Context<'_>,
    items: &[Item<'_>],
    mode: Mode,
    without: &BTreeMap<usize, String>,
) -> Result<Vec<Outcome>, Stop> {
    let careful = mode.careful || mode.isolate;
    let seen: Vec<&Seen> = items.iter().filter_map(|i| i.seen.as_ref()).collect();
    let mut origins: Vec<&str> = seen.iter().map(|s| s.origin.as_str()).collect();
    origins.sort_unstable();
    origins.dedup();
    let lock = if mode.isolate {
        Vec::new()
    } else {
        applied_rows(items)
    };
    s.begin(Start {
        isolate: mode.isolate,
        lock: &lock,
        origins: &origins,
        seen: &seen,
    })
    .await?;

    let Sorted {
        mut outcomes,
        others,
        to_apply,
    } = sort_items(items);

    // Inbox rows for own, skipped and dead-lettered events.
    let refs: Vec<(&Event, &'static str)> = others.iter().map(|(_, e, o)| (*e, *o)).collect();
    let new = if refs.is_empty() {
        HashSet::new()
    } else {
        s.insert_inbox(&refs, careful).await?
    };
    let mut own_ids: Vec<Uuid> = Vec::new();
    let mut own_rows: Vec<(&Event, &MappedRow)> = Vec::new();
    for (i, ev, _) in &others {
        if !new.contains(&ev.id) {
            outcomes[*i] = Outcome::Duplicate;
        } else if let Plan::Own(row) = &items[*i].plan {
            own_ids.push(ev.id);
            if let Some(row) = row {
                own_rows.push((ev, row));
            }
        }
    }
    if !own_ids.is_empty() {
        s.delete_own(&own_ids).await?;
    }
    // An event of ours back round: its write is now the entity's version.
    if !own_rows.is_empty() && !mode.isolate {
        own_back_round(s, cx, &own_rows).await?;
    } else if !own_rows.is_empty() {
        // One message at a time: recording them must not fail the batch;
        // if the events' data does not fit, the versions are simply not
        // moved.
        s.savepoint().await?;
        match own_back_round(s, cx, &own_rows).await {
            Ok(()) => s.release_savepoint().await?,
            Err(Failed::Data(e)) => {
                s.rollback_to_savepoint().await?;
                tracing::warn!(error = %e, "events of this site back round: their versions could not be recorded");
            }
            Err(e) => return Err(e.into()),
        }
    }

    let batch: Vec<(usize, &Event, &Route, &MappedRow)> = to_apply
        .iter()
        .map(|&i| {
            let Plan::Apply(route, row) = &items[i].plan else {
                unreachable!("sort_items lists Apply plans only")
            };
            (
                i,
                items[i].event.expect("applied events exist"),
                *route,
                row,
            )
        })
        .collect();
    if mode.isolate {
        let mut blocked: HashSet<&Entity> = HashSet::new();
        for one in &batch {
            let (i, _, route, row) = *one;
            if let Some(reason) = without.get(&i) {
                blocked.insert(&row.entity);
                outcomes[i] = Outcome::Failed(reason.clone());
                continue;
            }
            if blocked.contains(&row.entity) {
                outcomes[i] = Outcome::Held;
                continue;
            }
            s.savepoint().await?;
            let applied = match s.lock_rows(&[(route, row)]).await {
                Ok(()) => apply_events(s, std::slice::from_ref(one), careful).await,
                Err(e) => Err(e),
            };
            match applied {
                Ok(o) => {
                    s.release_savepoint().await?;
                    outcomes[i] = o.into_iter().next().expect("one outcome");
                }
                Err(Failed::Data(reason)) => match s.rollback_to_savepoint().await {
                    Ok(()) => {
                        blocked.insert(&row.entity);
                        outcomes[i] = Outcome::Failed(reason);
                    }
                    // The error ended the transaction after all.
                    Err(Failed::Gone(_)) => return Err(Stop::Without(i, reason)),
                    Err(e) => return Err(e.into()),
                },
                Err(Failed::Gone(reason)) => return Err(Stop::Without(i, reason)),
                Err(e) => return Err(e.into()),
            }
        }
    } else {
        let decided = apply_events(s, &batch, careful).await?;
        for ((i, ..), o) in batch.iter().zip(decided) {
            outcomes[*i] = o;
        }
    }
    s.commit().await?;
    Ok(outcomes)
}

/// The rows a batch writes for other sites' events.
fn applied_rows<'a>(items: &'a [Item<'a>]) -> Vec<Write<'a>> {
    items
        .iter()
        .filter_map(|i| match &i.plan {
            Plan::Apply(route, row) => Some((*route, row)),
            _ => None,
        })
        .collect()
}

/// Inbox rows, last-writer-wins, the writes, versions and conflicts for
/// events to apply. Returns Applied / Lost / Duplicate per event.
async fn apply_events<S: Session>(
    s: &mut S,
    batch: &[(usize, &Event, &Route, &MappedRow)],
    careful: bool,
) -> Result<Vec<Outcome>, Failed> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let refs: Vec<(&Event, &'static str)> =
        batch.iter().map(|(_, e, ..)| (*e, "applied")).collect();
    let new = s.insert_inbox(&refs, careful).await?;
    let fresh: Vec<&(usize, &Event, &Route, &MappedRow)> = batch
        .iter()
        .filter(|(_, e, ..)| new.contains(&e.id))
        .collect();
    let entities: Vec<&Entity> = {
        let mut seen = HashSet::new();
        fresh
            .iter()
            .map(|(.., row)| &row.entity)
            .filter(|e| seen.insert(*e))
            .collect()
    };
    let (stored, local) = s.lookup(&entities).await?;
    let pairs: Vec<(&Event, &Entity)> = fresh
        .iter()
        .map(|(_, e, _, row)| (*e, &row.entity))
        .collect();
    let decided = decide(&pairs, &stored, &local);

    // The writes, in order; an entity at most once per wave.
    let mut wave: Vec<Write<'_>> = Vec::new();
    let mut in_wave: HashSet<&Entity> = HashSet::new();
    for ((.., route, row), applied) in fresh.iter().zip(&decided.applied) {
        if !applied {
            continue;
        }
        if !in_wave.insert(&row.entity) {
            s.write(&wave).await?;
            wave.clear();
            in_wave.clear();
            in_wave.insert(&row.entity);
        }
        wave.push((route, row));
    }
    let versions: Vec<(Entity, Version, Uuid)> = decided
        .versions
        .iter()
        .map(|(e, (v, id))| (e.clone(), v.clone(), *id))
        .collect();
    let lost: Vec<Uuid> = fresh
        .iter()
        .zip(&decided.applied)
        .filter(|(_, a)| !**a)
        .map(|((_, e, ..), _)| e.id)
        .collect();
    s.finish(Finish {
        wave: &wave,
        versions: &versions,
        stored: &stored,
        conflicts: &decided.conflicts,
        lost: &lost,
    })
    .await?;
    for c in &decided.conflicts {
        tracing::info!(entity = %c.entity.table, key = %c.entity.key, loser = %c.loser, loser_origin = %c.loser_version.origin, winner = %c.winner, winner_origin = %c.winner_version.origin, "conflict resolved by last-writer-wins");
    }
    Ok(rules::outcomes(
        batch.iter().map(|(_, e, ..)| new.contains(&e.id)),
        &decided.applied,
    ))
}

/// Events of this site back round: each becomes its entity's version if it
/// is the newest.
///
/// One that supersedes a version written by another site's event must also
/// be what the row holds, in two cases:
///
/// - **Decided on a provisional time.** While a write of this site waits in
///   the outbox, a remote event is compared with the write's own time (its
///   commit time or `created_at`), not yet with the timestamp its event is
///   published under: the source pushes that above the origin's previous
///   event, so it can be later. When the remote event won here on the
///   provisional time (the write is recorded as the loser of a conflict)
///   but the published timestamp is newer than that event, every other
///   site keeps this write: the row is written again from its event and
///   the conflict record, which was untrue, is withdrawn. Every engine.
/// - **A race on the table** (engines that can check rows,
///   [`Session::CHECKS_OWN_ROWS`]): a local write that raced the sink (a
///   DELETE that found no row while the sink inserted one) can have lost
///   on this site's table while winning everywhere else. Such a row is
///   written again from the event.
async fn own_back_round<S: Session>(
    s: &mut S,
    cx: &Context<'_>,
    own: &[(&Event, &MappedRow)],
) -> Result<(), Failed> {
    let mut newest: BTreeMap<&Entity, (&Event, &MappedRow)> = BTreeMap::new();
    for (ev, row) in own {
        let v = (ev.timestamp, ev.origin.as_str());
        match newest.get(&row.entity) {
            Some((old, _)) if (old.timestamp, old.origin.as_str()) >= v => {}
            _ => {
                newest.insert(&row.entity, (ev, row));
            }
        }
    }
    let version_of = |ev: &Event| Version {
        ts: ev.timestamp,
        origin: ev.origin.clone(),
    };
    let entities: Vec<&Entity> = own.iter().map(|(_, row)| &row.entity).collect();
    let before = s.load_versions(&entities).await?;
    // Candidates: an entity whose version another site's event wrote,
    // older than this write of ours. Only their rows are locked, and only
    // then are this site's later writes still in the outbox read (with
    // such a write, the row holds it, not this event's write). Most events
    // back round supersede a version of their own site or none: they need
    // neither the lock nor the lookups.
    let mut candidates: Vec<(&Entity, Version, &Route, &MappedRow, Uuid)> = Vec::new();
    for (entity, (ev, row)) in &newest {
        let version = version_of(ev);
        if let Some((prev, _)) = before.get(*entity)
            && *prev < version
            && prev.origin != cx.site
            && let Some(route) = cx.sink.route(&ev.kind)
        {
            candidates.push((entity, version, route, row, ev.id));
        }
    }
    let mut suspects: Vec<Write<'_>> = Vec::new();
    let mut astray: Vec<Write<'_>> = Vec::new();
    let mut withdrawn: Vec<Uuid> = Vec::new();
    // Candidates with a later write of this site still in the outbox: that
    // write's return decides. Their version stays the other site's
    // meanwhile, so that it is a candidate too, with the row and the
    // version still written by one sink transaction (PostgreSQL's check
    // compares their xmin). Moved to this event, it would make the later
    // write look safe: two local DELETEs that both found no row while the
    // sink inserted one left the row in place for good. A remote event
    // arriving meanwhile still loses to the pending write.
    let mut deferred: HashSet<&Entity> = HashSet::new();
    if !candidates.is_empty() {
        let rows: Vec<Write<'_>> = candidates
            .iter()
            .map(|(_, _, route, row, _)| (*route, *row))
            .collect();
        s.lock_rows(&rows).await?;
        let entities: Vec<&Entity> = candidates.iter().map(|(e, ..)| *e).collect();
        let pending = s.local_writes(&entities).await?;
        let ids: Vec<Uuid> = candidates.iter().map(|(.., id)| *id).collect();
        let lost_here = s.recorded_losers(&ids).await?;
        for (entity, version, route, row, id) in &candidates {
            let later = pending.get(*entity);
            let superseded_locally =
                later.is_some_and(|writes| writes.iter().any(|w| w.version > *version));
            if superseded_locally {
                deferred.insert(*entity);
            } else if lost_here.contains(id) {
                // Decided here on the write's provisional time: its
                // published time wins. Unless a later write of this site
                // holds the row: its return decides.
                if later.is_some_and(|w| !w.is_empty()) {
                    deferred.insert(*entity);
                } else {
                    astray.push((*route, *row));
                    withdrawn.push(*id);
                }
            } else if S::CHECKS_OWN_ROWS {
                suspects.push((*route, *row));
            }
        }
    }
    let versions: Vec<(Entity, Version, Uuid)> = newest
        .values()
        .filter(|(_, row)| !deferred.contains(&row.entity))
        .map(|(ev, row)| (row.entity.clone(), version_of(ev), ev.id))
        .collect();
    // Before the versions move: the check compares with them.
    if !suspects.is_empty() {
        astray.extend(s.rows_not_as_written(&suspects).await?);
    }
    s.upsert_versions(&versions, &before).await?;
    if !withdrawn.is_empty() {
        s.withdraw_conflicts(&withdrawn).await?;
    }
    for (_, row) in &astray {
        tracing::info!(entity = %row.entity.table, key = %row.entity.key, "a write of this site lost here, on its own time or in a race with the sink, but won everywhere else: written again from its event");
    }
    if astray.is_empty() {
        return Ok(());
    }
    s.write(&astray).await
}

/// A write of this site still in its outbox, from an outbox row as an
/// engine reads it (`id`, `type`, `data` as JSON text, its time): mapped
/// through its route to its entity, when that is one of `wanted`.
pub fn local_write(
    sink: &SinkConfig,
    site: &str,
    wanted: &HashSet<&Entity>,
    (id, kind, data, ts): (&str, &str, &str, DateTime<Utc>),
) -> Option<(Entity, LocalWrite)> {
    let id = Uuid::parse_str(id.trim()).ok()?;
    let route = sink.route(kind)?;
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(data) else {
        return None;
    };
    let mapped = mapping::map_row(route, &map).ok()?;
    if !wanted.contains(&mapped.entity) {
        return None;
    }
    Some((
        mapped.entity,
        LocalWrite {
            version: Version {
                ts,
                origin: site.to_string(),
            },
            id,
            payload: Value::Object(map),
        },
    ))
}

#[cfg(test)]
mod tests {
    //! The transaction logic on a fake session: an in-memory database with
    //! transactions and savepoints, whose writes can be made to fail the
    //! way engines' errors are classified.
    use super::*;
    use crate::config::Operation;
    use crate::sink::testing::{event_with, items, sink_with};
    use std::collections::BTreeMap as Map;

    /// What the fake database holds.
    #[derive(Debug, Clone, Default, PartialEq)]
    struct Tables {
        inbox: Map<Uuid, &'static str>,
        origins: Origins,
        gaps: Vec<(String, u64, u64)>,
        rows: Map<String, Value>,
        versions: Map<Entity, (Version, Uuid)>,
        conflicts: Vec<Uuid>,
        outbox: Vec<Uuid>,
        /// The writes of this site's outbox rows, by entity.
        writes: Vec<(Entity, LocalWrite)>,
    }

    /// How writing one entity key fails.
    #[derive(Debug, Clone, Copy)]
    enum Fault {
        Data,
        /// The error ends the transaction (a savepoint cannot undo it).
        Gone,
        /// Busy this many more times.
        Busy(u32),
    }

    #[derive(Default)]
    struct Fake {
        committed: Tables,
        tx: Option<Tables>,
        savepoint: Option<Tables>,
        /// The transaction was ended by an error.
        doomed: bool,
        faults: HashMap<String, Fault>,
        /// Inserts the inbox plainly, failing on an event it holds.
        plain_inbox: bool,
        /// How each attempt began: isolated or not.
        begun: Vec<bool>,
    }

    impl Fake {
        fn tx(&mut self) -> Result<&mut Tables, Failed> {
            if self.doomed {
                return Err(Failed::Gone("the transaction was ended".into()));
            }
            Ok(self.tx.as_mut().expect("begin opened a transaction"))
        }
    }

    impl Session for Fake {
        async fn begin(&mut self, start: Start<'_>) -> Result<(), Failed> {
            self.begun.push(start.isolate);
            self.tx = Some(self.committed.clone());
            self.doomed = false;
            let committed = &self.committed.origins;
            let mut state: Origins = start
                .origins
                .iter()
                .filter_map(|o| committed.get(*o).map(|v| (o.to_string(), *v)))
                .collect();
            let progress = advance(&mut state, start.seen);
            let tx = self.tx()?;
            for (o, e, s) in progress.changed {
                tx.origins.insert(o, (e, s));
            }
            for g in progress.gaps {
                tx.gaps.push((g.origin, g.from, g.to));
            }
            // Late arrivals shrink the gaps recorded before, as each
            // engine does under lock (row ids: positions).
            for l in &progress.late {
                let rows: Vec<rules::GapRow> = (tx.gaps.iter().enumerate())
                    .filter(|(_, g)| g.0 == l.origin)
                    .map(|(i, g)| (i as i64, g.1, g.2))
                    .collect();
                for (id, pieces) in rules::shrink(&rows, &l.seqs).into_iter().rev() {
                    let (origin, ..) = tx.gaps.remove(id as usize);
                    for (k, (from, to)) in pieces.into_iter().enumerate() {
                        tx.gaps.insert(id as usize + k, (origin.clone(), from, to));
                    }
                }
            }
            Ok(())
        }

        async fn insert_inbox(
            &mut self,
            events: &[(&Event, &'static str)],
            careful: bool,
        ) -> Result<HashSet<Uuid>, Failed> {
            let plain = self.plain_inbox && !careful;
            let tx = self.tx()?;
            let mut new = HashSet::new();
            for (e, outcome) in events {
                match tx.inbox.get(&e.id) {
                    Some(_) if plain => return Err(Failed::Seen),
                    Some(&"dead_letter") | None => {
                        tx.inbox.insert(e.id, outcome);
                        new.insert(e.id);
                    }
                    Some(_) => {}
                }
            }
            Ok(new)
        }

        async fn delete_own(&mut self, ids: &[Uuid]) -> Result<(), Failed> {
            self.tx()?.outbox.retain(|id| !ids.contains(id));
            Ok(())
        }

        async fn load_versions(&mut self, entities: &[&Entity]) -> Result<Stored, Failed> {
            let tx = self.tx()?;
            Ok(entities
                .iter()
                .filter_map(|e| tx.versions.get(*e).map(|v| ((*e).clone(), v.clone())))
                .collect())
        }

        async fn local_writes(&mut self, entities: &[&Entity]) -> Result<Local, Failed> {
            let tx = self.tx()?;
            let mut out = Local::new();
            for (e, w) in &tx.writes {
                if entities.contains(&e) && tx.outbox.contains(&w.id) {
                    out.entry(e.clone()).or_default().push(w.clone());
                }
            }
            Ok(out)
        }

        async fn write(&mut self, wave: &[Write<'_>]) -> Result<(), Failed> {
            for (_, row) in wave {
                match self.faults.get_mut(&row.entity.key) {
                    Some(Fault::Data) => {
                        return Err(Failed::Data(format!("bad {}", row.entity.key)));
                    }
                    Some(Fault::Gone) => {
                        self.doomed = true;
                        return Err(Failed::Gone(format!("fatal {}", row.entity.key)));
                    }
                    Some(Fault::Busy(n)) if *n > 0 => {
                        *n -= 1;
                        return Err(Failed::Busy);
                    }
                    _ => {}
                }
                let tx = self.tx()?;
                tx.rows
                    .insert(row.entity.key.clone(), Value::Object(row.columns.clone()));
            }
            Ok(())
        }

        async fn upsert_versions(
            &mut self,
            versions: &[(Entity, Version, Uuid)],
            _stored: &Stored,
        ) -> Result<(), Failed> {
            let tx = self.tx()?;
            for (e, v, id) in versions {
                if tx.versions.get(e).is_none_or(|(old, _)| old < v) {
                    tx.versions.insert(e.clone(), (v.clone(), *id));
                }
            }
            Ok(())
        }

        async fn insert_conflicts(&mut self, conflicts: &[Conflict]) -> Result<(), Failed> {
            let tx = self.tx()?;
            tx.conflicts.extend(conflicts.iter().map(|c| c.loser));
            Ok(())
        }

        async fn mark_lost(&mut self, ids: &[Uuid]) -> Result<(), Failed> {
            let tx = self.tx()?;
            for id in ids {
                tx.inbox.insert(*id, "lost");
            }
            Ok(())
        }

        async fn recorded_losers(&mut self, ids: &[Uuid]) -> Result<HashSet<Uuid>, Failed> {
            let tx = self.tx()?;
            Ok(ids
                .iter()
                .filter(|id| tx.conflicts.contains(id))
                .copied()
                .collect())
        }

        async fn withdraw_conflicts(&mut self, losers: &[Uuid]) -> Result<(), Failed> {
            self.tx()?.conflicts.retain(|id| !losers.contains(id));
            Ok(())
        }

        async fn savepoint(&mut self) -> Result<(), Failed> {
            self.savepoint = Some(self.tx()?.clone());
            Ok(())
        }

        async fn release_savepoint(&mut self) -> Result<(), Failed> {
            self.savepoint = None;
            Ok(())
        }

        async fn rollback_to_savepoint(&mut self) -> Result<(), Failed> {
            self.tx()?;
            self.tx = self.savepoint.take();
            Ok(())
        }

        async fn commit(&mut self) -> Result<(), Failed> {
            let tx = self.tx()?.clone();
            self.committed = tx;
            self.tx = None;
            Ok(())
        }

        async fn rollback(&mut self) {
            self.tx = None;
            self.doomed = false;
        }

        async fn usable(&mut self) -> bool {
            true
        }

        async fn sweep_own(&mut self) -> Result<u64, TargetError> {
            Ok(0)
        }

        async fn open_gaps(&mut self) -> Result<Vec<OpenGap>, TargetError> {
            Ok(Vec::new())
        }

        async fn mark_gaps(&mut self, _: &[i64], _: GapMark<'_>) -> Result<(), TargetError> {
            Ok(())
        }

        async fn record_receipt(&mut self, _: &Receipt) -> Result<(), TargetError> {
            Ok(())
        }

        async fn trace(&mut self, _: Uuid) -> Result<Traced, TargetError> {
            Ok(Traced::default())
        }

        async fn unreceipted(
            &mut self,
            _: &[String],
            _: u64,
        ) -> Result<Vec<(String, u64, f64)>, TargetError> {
            Ok(Vec::new())
        }
    }

    fn route() -> Route {
        Route {
            kind: "customer.upsert".into(),
            table: "public.customer".into(),
            key: vec!["id".into()],
            operation: Operation::Upsert,
            rename: Map::new(),
            drop: vec![],
            constants: Map::new(),
        }
    }

    fn sink() -> SinkConfig {
        sink_with(vec![route()])
    }

    /// An event of `origin` about customer `key`, at second `ts`.
    fn event(n: u128, origin: &str, key: &str, ts: i64) -> Event {
        event_with(
            n,
            origin,
            key,
            ts,
            &format!("{{\"id\": \"{key}\", \"n\": {n}}}"),
        )
    }

    async fn apply(fake: &mut Fake, items: &[Item<'_>]) -> Result<Vec<Outcome>, TargetError> {
        let sink = sink();
        let cx = Context {
            site: "PARIS",
            sink: &sink,
            busy_retries: 3,
        };
        apply_batch(fake, &cx, items).await
    }

    fn keys(t: &Tables) -> Vec<&str> {
        t.rows.keys().map(String::as_str).collect()
    }

    #[tokio::test]
    async fn a_batch_commits_its_rows_inbox_progress_and_versions_at_once() {
        let events = [
            event(1, "LONDON", "a", 10),
            event(2, "LONDON", "b", 10),
            event(5, "LONDON", "a", 11),
        ];
        let r = route();
        let mut fake = Fake::default();
        let outcomes = apply(&mut fake, &items(&events, &r, "PARIS"))
            .await
            .unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied; 3]);
        let t = &fake.committed;
        assert_eq!(keys(t), ["a", "b"]);
        assert_eq!(
            t.rows["a"]["n"], 5,
            "the later event of an entity wins the row"
        );
        assert_eq!(t.inbox.len(), 3);
        assert_eq!(t.origins["LONDON"], (1, 5));
        assert_eq!(t.gaps, [("LONDON".to_string(), 3, 4)]);
        assert_eq!(fake.begun, [false], "one attempt, not isolated");
    }

    #[tokio::test]
    async fn a_late_event_applied_in_a_later_batch_closes_its_gap() {
        let r = route();
        let mut fake = Fake::default();
        let first = [event(1, "LONDON", "a", 10), event(5, "LONDON", "b", 10)];
        apply(&mut fake, &items(&first, &r, "PARIS")).await.unwrap();
        assert_eq!(fake.committed.gaps, [("LONDON".to_string(), 2, 4)]);
        // 3 comes back (released by a consumer that died holding it).
        let late = [event(3, "LONDON", "c", 10), event(6, "LONDON", "d", 10)];
        let outcomes = apply(&mut fake, &items(&late, &r, "PARIS")).await.unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied; 2]);
        assert_eq!(
            fake.committed.gaps,
            [("LONDON".to_string(), 2, 2), ("LONDON".to_string(), 4, 4)],
            "the gap now holds exactly what has not arrived"
        );
        let rest = [event(2, "LONDON", "e", 10), event(4, "LONDON", "f", 10)];
        apply(&mut fake, &items(&rest, &r, "PARIS")).await.unwrap();
        assert!(fake.committed.gaps.is_empty());
        assert_eq!(fake.committed.origins["LONDON"], (1, 6));
    }

    /// Four events of LONDON: `a`, `b` twice, `c`; writing `b` fails with
    /// `fault`. Returns the outcomes and the fake after the batch.
    async fn with_a_bad_entity(fault: Fault) -> (Vec<Outcome>, Fake) {
        let events = [
            event(1, "LONDON", "a", 10),
            event(2, "LONDON", "b", 10),
            event(3, "LONDON", "b", 11),
            event(4, "LONDON", "c", 10),
        ];
        let r = route();
        let mut fake = Fake {
            faults: HashMap::from([("b".to_string(), fault)]),
            ..Fake::default()
        };
        let outcomes = apply(&mut fake, &items(&events, &r, "PARIS"))
            .await
            .unwrap();
        (outcomes, fake)
    }

    #[tokio::test]
    async fn a_message_whose_data_fails_is_rolled_back_alone_and_holds_its_entity() {
        let (outcomes, fake) = with_a_bad_entity(Fault::Data).await;
        assert_eq!(
            outcomes,
            vec![
                Outcome::Applied,
                Outcome::Failed("bad b".into()),
                Outcome::Held,
                Outcome::Applied
            ]
        );
        let t = &fake.committed;
        assert_eq!(keys(t), ["a", "c"]);
        let inbox: Vec<u128> = t.inbox.keys().map(|id| id.as_u128()).collect();
        assert_eq!(
            inbox,
            [1, 4],
            "the failed and the held messages are not in the inbox"
        );
        assert_eq!(fake.begun, [false, true], "then one message at a time");
    }

    #[tokio::test]
    async fn a_message_whose_error_ends_the_transaction_is_left_out_and_the_rest_commits() {
        let (outcomes, fake) = with_a_bad_entity(Fault::Gone).await;
        assert_eq!(
            outcomes,
            vec![
                Outcome::Applied,
                Outcome::Failed("fatal b".into()),
                Outcome::Held,
                Outcome::Applied
            ]
        );
        assert_eq!(keys(&fake.committed), ["a", "c"]);
        assert_eq!(
            fake.begun,
            [false, true, true],
            "the whole batch, one at a time, then without the message that ended it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rows_held_by_applications_are_waited_for_then_the_batch_backs_off() {
        let events = [event(1, "LONDON", "a", 10)];
        let r = route();
        let mut fake = Fake {
            faults: HashMap::from([("a".to_string(), Fault::Busy(3))]),
            ..Fake::default()
        };
        let outcomes = apply(&mut fake, &items(&events, &r, "PARIS"))
            .await
            .unwrap();
        assert_eq!(outcomes, [Outcome::Applied]);
        assert_eq!(
            fake.begun.len(),
            4,
            "three busy tries, then it went through"
        );

        let mut fake = Fake {
            faults: HashMap::from([("a".to_string(), Fault::Busy(4))]),
            ..Fake::default()
        };
        let e = apply(&mut fake, &items(&events, &r, "PARIS"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Transient);
        assert!(e.message().contains("stayed locked"), "{}", e.message());
        assert!(fake.committed.rows.is_empty());
    }

    #[tokio::test]
    async fn a_redelivered_event_is_found_by_the_careful_inbox_insert() {
        let events = [event(1, "LONDON", "a", 10), event(2, "LONDON", "b", 10)];
        let r = route();
        let mut fake = Fake {
            plain_inbox: true,
            ..Fake::default()
        };
        fake.committed.inbox.insert(events[0].id, "applied");
        let outcomes = apply(&mut fake, &items(&events, &r, "PARIS"))
            .await
            .unwrap();
        assert_eq!(outcomes, [Outcome::Duplicate, Outcome::Applied]);
        assert_eq!(
            keys(&fake.committed),
            ["b"],
            "the duplicate changed nothing"
        );
        assert_eq!(fake.begun, [false, false]);
    }

    #[tokio::test]
    async fn an_older_event_loses_and_is_recorded_and_own_events_move_the_version() {
        let r = route();
        let entity = |k: &str| Entity {
            table: "public.customer".into(),
            key: k.into(),
        };
        let mut fake = Fake::default();
        let newer = Version {
            ts: DateTime::from_timestamp(20, 0).unwrap(),
            origin: "MADRID".into(),
        };
        fake.committed
            .versions
            .insert(entity("a"), (newer, Uuid::from_u128(99)));
        fake.committed.outbox = vec![Uuid::from_u128(7)];
        // An older write of LONDON, and this site's own event back round.
        let events = [event(1, "LONDON", "a", 10), event(7, "PARIS", "b", 30)];
        let outcomes = apply(&mut fake, &items(&events, &r, "PARIS"))
            .await
            .unwrap();
        assert_eq!(outcomes, [Outcome::Lost, Outcome::Own]);
        let t = &fake.committed;
        assert!(t.rows.is_empty(), "the loser is not written");
        assert_eq!(t.conflicts, [events[0].id]);
        assert_eq!(t.inbox[&events[0].id], "lost");
        assert_eq!(t.inbox[&events[1].id], "own");
        assert!(t.outbox.is_empty(), "the own event's outbox row is deleted");
        assert_eq!(t.versions[&entity("b")].1, events[1].id);
    }

    /// PARIS wrote customer `a` at second 10 (its outbox row waits), then
    /// LONDON's write of `a` at second 11 arrives: on the write's own time
    /// it wins here. Then PARIS's event comes back round, published at
    /// second `published`. Returns the fake after both batches.
    async fn local_write_then_remote_then_back_round(published: i64) -> Fake {
        let r = route();
        let a = Entity {
            table: "public.customer".into(),
            key: "a".into(),
        };
        let mine = event(7, "PARIS", "a", published);
        let mut fake = Fake::default();
        fake.committed.outbox = vec![mine.id];
        fake.committed.writes = vec![(
            a.clone(),
            LocalWrite {
                version: Version {
                    ts: DateTime::from_timestamp(10, 0).unwrap(),
                    origin: "PARIS".into(),
                },
                id: mine.id,
                payload: serde_json::json!({"id": "a", "n": 7}),
            },
        )];
        fake.committed
            .rows
            .insert("a".into(), serde_json::json!({"id": "a", "n": 7}));
        let remote = [event(1, "LONDON", "a", 11)];
        let outcomes = apply(&mut fake, &items(&remote, &r, "PARIS"))
            .await
            .unwrap();
        assert_eq!(outcomes, [Outcome::Applied]);
        assert_eq!(fake.committed.rows["a"]["n"], 1, "LONDON's write won here");
        assert_eq!(fake.committed.conflicts, [mine.id], "PARIS's write lost");

        let back = [mine];
        let outcomes = apply(&mut fake, &items(&back, &r, "PARIS")).await.unwrap();
        assert_eq!(outcomes, [Outcome::Own]);
        fake
    }

    #[tokio::test]
    async fn defect_3_a_local_write_published_later_than_the_remote_write_wins_here_too() {
        // The source pushed PARIS's event to second 12, above its previous
        // event: every other site keeps PARIS's write over LONDON's (11).
        let fake = local_write_then_remote_then_back_round(12).await;
        let t = &fake.committed;
        let a = Entity {
            table: "public.customer".into(),
            key: "a".into(),
        };
        assert_eq!(t.rows["a"]["n"], 7, "the row is PARIS's write again");
        assert_eq!(t.versions[&a].1, Uuid::from_u128(7));
        assert!(
            t.conflicts.is_empty(),
            "the record that PARIS's write lost is withdrawn"
        );
    }

    #[tokio::test]
    async fn a_local_write_published_before_the_remote_write_stays_lost() {
        let fake = local_write_then_remote_then_back_round(10).await;
        let t = &fake.committed;
        assert_eq!(t.rows["a"]["n"], 1, "LONDON's write stays");
        assert_eq!(t.conflicts, [Uuid::from_u128(7)]);
        assert_eq!(
            t.versions[&Entity {
                table: "public.customer".into(),
                key: "a".into(),
            }]
                .1,
            Uuid::from_u128(1)
        );
    }

    #[test]
    fn a_local_write_is_read_through_its_route() {
        let sink = sink();
        let e = Entity {
            table: "public.customer".into(),
            key: "42".into(),
        };
        let wanted = HashSet::from([&e]);
        let ts = DateTime::from_timestamp(5, 0).unwrap();
        let id = "00000000-0000-0000-0000-000000000007";
        let (entity, write) = local_write(
            &sink,
            "PARIS",
            &wanted,
            (id, "customer.upsert", r#"{"id": 42, "name": "Zoé"}"#, ts),
        )
        .unwrap();
        assert_eq!(entity, e);
        assert_eq!(write.id, Uuid::from_u128(7));
        assert_eq!(
            write.version,
            Version {
                ts,
                origin: "PARIS".into()
            }
        );
        // Another entity, an unknown type, data that is not an object, an
        // id that is not a UUID: not this batch's local writes.
        for row in [
            (id, "customer.upsert", r#"{"id": 43}"#),
            (id, "order.upsert", r#"{"id": 42}"#),
            (id, "customer.upsert", "[42]"),
            ("x", "customer.upsert", r#"{"id": 42}"#),
        ] {
            assert!(
                local_write(&sink, "PARIS", &wanted, (row.0, row.1, row.2, ts)).is_none(),
                "{row:?}"
            );
        }
    }
}
