//! SQL Server source: Change Tracking on the outbox table, read by query.
//!
//! # Reading
//!
//! Each read is one SNAPSHOT-isolation transaction (tiberius
//! `begin_transaction_with_isolation(Snapshot)`: a TDS `TM_BEGIN_XACT`
//! request with isolation level SNAPSHOT, whose descriptor tiberius attaches
//! to the following requests), so that the versions and the rows it sees
//! are one consistent state of the database (SQL Server takes the snapshot
//! at the first statement that reads data: the versions query). A good read
//! commits; a failed one, or one dropped half-way by the runner's
//! `select!`, is rolled back with `IF @@TRANCOUNT > 0 ROLLBACK` before the
//! next read begins:
//!
//! 1. `CHANGE_TRACKING_CURRENT_VERSION()` and
//!    `CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(outbox))` ([`VERSIONS_SQL`]);
//! 2. the decision ([`check_versions`]): a resume point whose
//!    `last_sync_version` is below the minimum valid version means changes
//!    were removed by retention cleanup before they were read — a definite
//!    error that says what to do, never a silent skip; a resume point above
//!    the current version means the database is not the one the checkpoint
//!    was written against (a restore);
//! 3. the inserts since then, up to the current version, joined to the
//!    outbox rows ([`changes_sql`]): `CHANGETABLE(CHANGES outbox, @last)
//!    LEFT JOIN outbox`, `SYS_CHANGE_OPERATION = 'I'`, ordered by
//!    `SYS_CHANGE_VERSION` and the outbox's `[ordinal]`, a page at a time
//!    (`TOP (@n)`, continued by keyset: never `OFFSET`, whose cost grows
//!    with the rows skipped). The outbox is never read with `WHERE id > x`;
//! 4. during catch-up, in the same snapshot, the numbers this site's events
//!    took that the read cannot show again ([`taken_sql`], see below).
//!
//! A catch-up (a read cut at the page size) keeps the version it started
//! with as its upper bound until it reaches it: each page continues where
//! the previous one stopped, over the same range, and a busy database does
//! not move the end away while the backlog is read.
//!
//! # Order inside a transaction
//!
//! Change Tracking gives every row of a transaction the same
//! `SYS_CHANGE_VERSION` and no order among them. The outbox's `[ordinal]`
//! column (`bigint IDENTITY`, filled by SQL Server in insert order) gives
//! it: two outbox rows of one entity written in one transaction (the
//! outbox-filling trigger makes that common) are published in the order
//! they were written, so last-writer-wins everywhere keeps what the origin
//! kept. `sitesync init` creates the column (or adds it to an outbox
//! without it), `check` fails an outbox without it with the statement that
//! adds it, and a stream refuses to start without it.
//!
//! # Positions
//!
//! A row's position is `(SYS_CHANGE_VERSION, index among the rows of that
//! version, the row's ordinal)`; once the row is done the resume point is
//! `next_row()` of it: the same ordinal, one row further. A resume point
//! `(v, i, o)` reads with `last_sync_version = v - 1` and, inside version
//! `v`, only the rows whose ordinal is above `o`. So a restart in the
//! middle of a large transaction resumes after the last confirmed row, and
//! pages of a running stream continue after the previous page's last
//! ordinal, in the same way. Why an ordinal and not a count: this site's
//! outbox rows are deleted once their events came back round, Change
//! Tracking then reports such a row once, at the version of its delete,
//! and a count of rows done would skip as many rows never read. The index
//! only orders positions, and resumes a position typed without an ordinal
//! (`sqlserver:9876#2`): it skips its first `index` rows of that version by
//! count (then continues by ordinal); only there can rows of that version
//! deleted since the stop shift what is skipped. A message's
//! `x-sitesync-position` names its own row, ordinal included: given to
//! `checkpoint reset --to-position` it resumes *after* that row (leave out
//! the `/ordinal` part to resume at the row, by count).
//! After a read that reached the current version `c`, the resume point is
//! `(c + 1, 0)`. With no checkpoint, the stream starts at the table's
//! minimum valid version: everything Change Tracking still holds is
//! published (the other sites' inboxes drop what they already have).
//! Outbox rows are written once and never updated: an UPDATE of an outbox
//! row would move its `SYS_CHANGE_VERSION`.
//!
//! # The same `seq` after a crash
//!
//! Events are numbered by the runner in the order the stream yields them,
//! from the checkpoint's clock. After a crash the rows after the checkpoint
//! are read again, but not all of them: an event published before the
//! crash whose row came back round was deleted from the outbox by this
//! site's sink, and Change Tracking's net changes no longer show its
//! insert. Numbering the rest from the checkpoint would give each of them
//! the number of an event before it, and receivers (which ignore a `seq`
//! at or below the highest they have) would miss real gaps in that range.
//! The sink records each event of this site that comes back round in its
//! inbox (`outcome = 'own'`, with its epoch and seq) in the transaction
//! that deletes its outbox row: while catching up, the stream reads those
//! numbers (of the checkpoint's epoch, from its next seq) in the same
//! snapshot as the rows, and hands them to the runner
//! ([`ChangeStream::taken`]), which skips them. What is still not restored:
//! an event's timestamp is `max(created_at, previous + 1 µs)`, and the
//! previous event may be one the read no longer shows; a row whose
//! `created_at` is not above that deleted event's timestamp can come out a
//! few microseconds earlier than it first did.
//!
//! # Lost payloads
//!
//! An insert that Change Tracking reports but whose outbox row the join
//! does not find (deleted before the read) becomes a [`Change::Row`] with a
//! [`RowError::Undecodable`] naming the key and the version: it goes to the
//! dead-letter queue with that reason, is logged at ERROR and counted
//! ([`SqlServerStream::lost_payloads`]). Change Tracking keeps *net*
//! changes: an outbox row inserted and deleted between two reads usually
//! shows as a single delete, which cannot be told apart from the deletion
//! of a row already published (the sink deletes rows whose events came
//! back): such a row is not seen at all. Nothing but the application should
//! delete outbox rows that have not gone round.
//!
//! # Waiting
//!
//! Change Tracking has no push: the stream reads again at once while reads
//! return rows, and backs off (doubling from [`POLL_MIN`]) up to
//! `database.poll_max_ms` while idle. Idle reads that find the database's
//! version moved on (other tables changed) yield a heartbeat, so that the
//! checkpoint follows. [`ChangeStream::durable`] has nothing to tell the
//! server: Change Tracking retention is by time, not by reader.
//!
//! The queries go through the small [`ChangeTracking`] trait: the binary
//! uses [`TiberiusChangeTracking`]; unit tests drive the same stream with
//! `FakeChangeTracking`.

use super::conn;
use super::position::Position;
use super::settings::Settings;
use super::types;
use crate::checks::Check;
use crate::config::{ConnectorConfig, redact_url};
use crate::error::{Cause, SourceError};
use crate::event::{OutboxRow, RowError};
use crate::source::{Change, ChangeStream, LogBounds, Source};
use conn::{MssqlClient, classify, literal, quote};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tiberius::{IsolationLevel, ToSql};

/// The server answered what cannot be read: reading again may help.
fn query(message: impl Into<String>) -> SourceError {
    SourceError::transient(Cause::Query, message)
}

/// The shortest pause of an idle stream.
pub const POLL_MIN: Duration = Duration::from_millis(20);

/// The versions read at the start of each snapshot transaction.
pub const VERSIONS_SQL: &str =
    "SELECT CHANGE_TRACKING_CURRENT_VERSION(), CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(@P1))";

/// The inserts into `outbox` (quoted) after version `@P1` up to `@P2`,
/// at most `@P3` of them, in (version, ordinal) order. With `after`, the
/// rows of version `@P1 + 1` are those whose ordinal is above `@P4` (the
/// last one done: of the previous page, or the checkpoint's): a read
/// resumes after an ordinal, not after a count, so that rows of that
/// version deleted since (this site's events that came back round; Change
/// Tracking then reports them once, at the version of their delete) do not
/// shift the rest. A row the join does not find (deleted before it was
/// read) has ordinal 0: ordinals start at 1.
pub fn changes_sql(outbox: &str, after: bool) -> String {
    let after = if after {
        "AND (ct.SYS_CHANGE_VERSION > @P1 + 1 OR CAST(ISNULL(o.[ordinal], 0) AS bigint) > @P4) "
    } else {
        ""
    };
    format!(
        "SELECT TOP (@P3) ct.SYS_CHANGE_VERSION, ct.[id], CAST(ISNULL(o.[ordinal], 0) AS bigint) AS ordinal, o.[id], o.[created_at], o.[origin], o.[type], o.[entity_key], o.[data] \
         FROM CHANGETABLE(CHANGES {outbox}, @P1) AS ct \
         LEFT JOIN {outbox} AS o ON o.[id] = ct.[id] \
         WHERE ct.SYS_CHANGE_OPERATION = 'I' AND ct.SYS_CHANGE_VERSION <= @P2 \
         {after}\
         ORDER BY ct.SYS_CHANGE_VERSION, ordinal"
    )
}

/// The numbers this site's events of epoch `@P2` took, from `@P3` on, that
/// came back round: the sink deleted their outbox rows in the transaction
/// that wrote these inbox rows (an inbox row whose outbox row is still
/// there, left for `sweep_own`, is not one: its row is still to be read).
/// None while the sink's tables do not exist. The inbox's
/// `(origin, epoch, seq)` index serves it.
pub fn taken_sql(outbox: &str) -> String {
    format!(
        "IF OBJECT_ID(N'dbo.sitesync_inbox', N'U') IS NOT NULL \
         SELECT i.seq FROM dbo.sitesync_inbox AS i WHERE i.origin = @P1 AND i.epoch = @P2 AND i.seq >= @P3 AND i.outcome = N'own' \
         AND NOT EXISTS (SELECT 1 FROM {outbox} AS o WHERE o.[id] = i.event_id) ORDER BY i.seq"
    )
}

/// The column that orders the rows of one transaction.
pub const ORDINAL: &str = "ordinal";

/// The statement that adds [`ORDINAL`] to an outbox without it.
pub fn add_ordinal_sql(outbox: &str) -> String {
    format!("ALTER TABLE {outbox} ADD [ordinal] bigint IDENTITY(1,1) NOT NULL")
}

/// What a snapshot transaction sees first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    /// `CHANGE_TRACKING_CURRENT_VERSION()`: NULL when Change Tracking is off
    /// on the database.
    pub current: Option<i64>,
    /// `CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(outbox))`: NULL when the
    /// table is not tracked (or we may not see it).
    pub min_valid: Option<i64>,
}

/// One insert Change Tracking reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracked {
    pub version: i64,
    /// The outbox key as Change Tracking has it (text).
    pub key: String,
    /// The outbox row's `[ordinal]`; 0 when the row is gone.
    pub ordinal: i64,
    pub payload: Payload,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// The outbox row, as read in the same snapshot.
    Row(OutboxRow),
    /// The join found no outbox row: deleted before it was read.
    Gone,
    /// A column could not be converted.
    Undecodable(String),
}

/// The queries a stream needs, in one snapshot transaction per read:
/// `versions` opens it, `changes` reads in it, `finish` ends it.
pub trait ChangeTracking: Send {
    fn versions(&mut self) -> impl Future<Output = Result<Versions, SourceError>> + Send;
    /// The inserts after `last_sync` up to `upto`, in (version, ordinal)
    /// order: with `after`, only the rows of version `last_sync + 1` whose
    /// ordinal is above it (and every later version); then `skip` rows are
    /// skipped and at most `limit` returned.
    fn changes(
        &mut self,
        last_sync: i64,
        upto: i64,
        after: Option<i64>,
        skip: u32,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Tracked>, SourceError>> + Send;
    /// The numbers of `origin`'s events of `epoch`, from `from` on, that
    /// came back round ([`taken_sql`]), in the same snapshot.
    fn taken(
        &mut self,
        origin: &str,
        epoch: u64,
        from: u64,
    ) -> impl Future<Output = Result<Vec<u64>, SourceError>> + Send;
    /// Ends the transaction: commits it after a read that went through,
    /// otherwise rolls back whatever is open (a failed read, or one whose
    /// future was dropped half-way: `next` runs inside `select!`).
    fn finish(&mut self, ok: bool) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// Where the next read starts: every version before `version` is done, and
/// in `version` the rows up to the ordinal `after` (when there is one; else
/// the first `index` rows).
///
/// Why an ordinal and not only a count: this site's sink deletes the outbox
/// rows whose events came back round, and Change Tracking then reports
/// such a row once, at the version of its delete, no longer as an insert
/// at `version`. Skipping `index` rows of `version` by count would then
/// skip as many rows never read, silently. Skipping the ordinals up to
/// `after` skips exactly the rows done, whatever was deleted since. The
/// count remains only for a position typed without an ordinal
/// (`sqlserver:9876#2`); then rows of that version deleted since shift the
/// count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub version: i64,
    pub index: u32,
    /// The ordinal of the last row of `version` done.
    pub after: Option<i64>,
}

impl Cursor {
    /// The start of `version`.
    pub fn at(version: i64) -> Cursor {
        Cursor {
            version,
            index: 0,
            after: None,
        }
    }

    pub fn from_position(p: &Position) -> Cursor {
        Cursor {
            version: p.version,
            index: p.index,
            after: p.after,
        }
    }

    pub fn position(&self) -> Position {
        Position {
            version: self.version,
            index: self.index,
            after: self.after,
        }
    }

    /// CHANGETABLE's `last_sync_version`.
    pub fn last_sync(&self) -> i64 {
        self.version - 1
    }

    /// How the next read starts inside `version`: after the ordinal when
    /// there is one (skipping nothing by count), else skipping `index` rows.
    pub fn resume_in_version(&self) -> (Option<i64>, u32) {
        match self.after {
            Some(ordinal) => (Some(ordinal), 0),
            None => (None, self.index),
        }
    }
}

/// What a read does once the versions are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing past the cursor.
    UpToDate,
    /// Read the inserts up to this version.
    Read { upto: i64 },
}

/// The version and min-valid-version decision, before every read.
pub fn check_versions(cursor: &Cursor, v: Versions, outbox: &str) -> Result<Step, SourceError> {
    let Some(current) = v.current else {
        return Err(SourceError::operator(
            Cause::NotInitialised,
            "Change Tracking is not enabled on the database (CHANGE_TRACKING_CURRENT_VERSION() is NULL): run `sitesync init`, or ALTER DATABASE CURRENT SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 4 DAYS, AUTO_CLEANUP = ON)",
        ));
    };
    let Some(min_valid) = v.min_valid else {
        return Err(SourceError::operator(
            Cause::NotInitialised,
            format!(
                "Change Tracking is not enabled on {outbox}, or this login may not see it (CHANGE_TRACKING_MIN_VALID_VERSION is NULL): run `sitesync init`, and GRANT VIEW CHANGE TRACKING ON {outbox} to the connector's user"
            ),
        ));
    };
    let last = cursor.last_sync();
    if last < min_valid {
        return Err(SourceError::operator(
            Cause::LogPurged,
            format!(
                "outbox changes were lost to Change Tracking retention: the checkpoint resumes after version {last}, but SQL Server only keeps changes to {outbox} after version {min_valid} (the retention cleanup ran while this connector was stopped or behind for longer than CHANGE_RETENTION). \
             Outbox rows inserted in between were never published. Resynchronise the other sites from the archive (or a snapshot of this site), then move on with `sitesync checkpoint reset --to-latest`; \
             raise CHANGE_RETENTION above database.max_downtime_hours so that it does not happen again"
            ),
        ));
    }
    if last > current {
        return Err(SourceError::operator(
            Cause::LogPurged,
            format!(
                "the database's Change Tracking version is {current} but the checkpoint resumes after version {last}: this is not the database the checkpoint was written against (restored from a backup, or another server). \
             Rows committed below the checkpoint would be skipped: reset the checkpoint (`sitesync checkpoint reset --to-start`) once you know which events the other sites have"
            ),
        ));
    }
    if last == current {
        Ok(Step::UpToDate)
    } else {
        Ok(Step::Read { upto: current })
    }
}

/// Turns one page of tracked inserts into changes, from `cursor`. Returns
/// the changes and the cursor after them. `full_page`: the page was cut at
/// the limit, so the read has not reached `upto`.
pub fn absorb(
    cursor: Cursor,
    rows: Vec<Tracked>,
    upto: i64,
    full_page: bool,
    outbox: &str,
) -> Result<(Vec<Change<Position>>, Cursor, u64), SourceError> {
    let mut out = Vec::with_capacity(rows.len() + 1);
    let mut cur = cursor;
    let mut lost = 0u64;
    for r in rows {
        if r.version < cur.version || r.version > upto {
            return Err(SourceError::transient(
                Cause::Query,
                format!(
                    "Change Tracking returned version {} outside the read's range ({}..={upto}): reading again",
                    r.version, cur.version
                ),
            ));
        }
        if r.version > cur.version {
            if cur.index > 0 || cur.after.is_some() {
                out.push(Change::Commit {
                    resume: Cursor::at(cur.version + 1).position(),
                });
            }
            cur = Cursor::at(r.version);
        }
        // The row's own position carries its ordinal: `next_row()` of it,
        // the resume point once it is done, resumes after that ordinal.
        cur.after = Some(r.ordinal);
        let position = cur.position();
        let row = match r.payload {
            Payload::Row(row) => Ok(row),
            Payload::Undecodable(why) => Err(RowError::Undecodable(format!(
                "outbox row [id = {}] at Change Tracking version {}: {why}",
                r.key, r.version
            ))),
            Payload::Gone => {
                lost += 1;
                tracing::error!(key = %r.key, version = r.version, %outbox, "lost payload: Change Tracking reports the insert but the outbox row was deleted before it was read");
                Err(RowError::Undecodable(format!(
                    "lost payload: Change Tracking reports the insert of outbox row [id = {}] into {outbox} at version {}, but the row was deleted before sitesync read it; its event cannot be published",
                    r.key, r.version
                )))
            }
        };
        out.push(Change::Row { position, row });
        cur.index += 1;
    }
    if !full_page {
        let end = Cursor::at(upto + 1);
        if end.position() > cur.position() {
            out.push(if out.is_empty() {
                Change::Heartbeat {
                    resume: end.position(),
                }
            } else {
                Change::Commit {
                    resume: end.position(),
                }
            });
            cur = end;
        }
    }
    Ok((out, cur, lost))
}

/// The pause before the next read: none while there is work, doubling from
/// [`POLL_MIN`] to `max` while idle.
#[derive(Debug, Clone)]
pub struct Poll {
    max: Duration,
    idle: Duration,
}

impl Poll {
    pub fn new(max: Duration) -> Poll {
        Poll {
            max: max.max(POLL_MIN),
            idle: Duration::ZERO,
        }
    }

    pub fn after(&mut self, found_rows: bool) -> Duration {
        self.idle = if found_rows {
            Duration::ZERO
        } else if self.idle.is_zero() {
            POLL_MIN
        } else {
            (self.idle * 2).min(self.max)
        };
        self.idle
    }
}

/// An open Change Tracking stream.
pub struct SqlServerStream<Q: ChangeTracking> {
    q: Q,
    outbox: String,
    /// `None` until the first read: then the table's minimum valid version.
    cursor: Option<Cursor>,
    /// The last resume point yielded: nothing goes backward.
    last: Option<Position>,
    buffer: VecDeque<Change<Position>>,
    poll: Poll,
    wait: Duration,
    limit: u32,
    lost: Arc<AtomicU64>,
    /// A transaction was begun and not yet ended (a read failed to end it,
    /// or was dropped half-way): the next read rolls it back first.
    tx_open: bool,
    /// This site: the origin of the events the runner numbers.
    origin: String,
    /// The runner's epoch and first `seq` ([`ChangeStream::numbering`]).
    numbering: Option<(u64, u64)>,
    /// Until a read reaches the end of the log: the rows read may be
    /// re-read rows, and numbers taken by deleted ones are looked up.
    catching_up: bool,
    /// Numbers found taken, not yet handed to the runner.
    taken: Vec<u64>,
    /// The end of a catch-up cut into pages: the version the first page
    /// read up to, kept until a page reaches it.
    catch_up_end: Option<i64>,
}

impl<Q: ChangeTracking> SqlServerStream<Q> {
    pub fn new(
        q: Q,
        outbox: String,
        origin: String,
        resume: Option<&Position>,
        poll_max: Duration,
        limit: u32,
    ) -> Self {
        SqlServerStream {
            origin,
            numbering: None,
            catching_up: true,
            taken: Vec::new(),
            catch_up_end: None,
            q,
            outbox,
            cursor: resume.map(Cursor::from_position),
            last: resume.cloned(),
            buffer: VecDeque::new(),
            poll: Poll::new(poll_max),
            wait: Duration::ZERO,
            limit: limit.max(1),
            lost: Arc::new(AtomicU64::new(0)),
            tx_open: false,
        }
    }

    /// Inserts whose outbox row was gone when read, since the stream opened.
    pub fn lost_payloads(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// One snapshot transaction; returns whether it found rows.
    ///
    /// Cancellation-safe: the runner polls [`ChangeStream::next`] inside
    /// `select!`, which drops it whenever another branch is ready. A read
    /// dropped half-way changes nothing but `tx_open`; its rows are read
    /// again, and its transaction is rolled back before the next one.
    async fn read_once(&mut self) -> Result<bool, SourceError> {
        if self.tx_open {
            self.q.finish(false).await?;
            self.tx_open = false;
        }
        self.tx_open = true;
        let result = self.read_in_transaction().await;
        // Ends the transaction whatever happened: commit after a good read
        // (read-only, nothing to keep), roll back after a failed one (the
        // server may have doomed it).
        let finished = self.q.finish(result.is_ok()).await;
        if finished.is_ok() {
            self.tx_open = false;
        }
        let found = result?;
        finished?;
        Ok(found)
    }

    async fn read_in_transaction(&mut self) -> Result<bool, SourceError> {
        let v = self.q.versions().await?;
        let cursor = match (&self.cursor, v.min_valid) {
            (Some(c), _) => c.clone(),
            (None, Some(min)) => Cursor::at(min + 1),
            // check_versions says what is missing.
            (None, None) => Cursor::at(0),
        };
        let step = check_versions(&cursor, v, &self.outbox)?;
        // The numbers taken are looked up on every read until the stream
        // has caught up, found rows or not: when every row after the
        // checkpoint came back round, the read finds none, and the next new
        // row must still not take their numbers. Read before anything
        // changes, so that a read dropped half-way changes nothing.
        let taken = match self.numbering {
            Some((epoch, next_seq)) if self.catching_up => {
                self.q.taken(&self.origin, epoch, next_seq).await?
            }
            _ => Vec::new(),
        };
        let upto = match step {
            Step::UpToDate => {
                self.taken.extend(taken);
                self.yield_resume(cursor.position(), true);
                self.cursor = Some(cursor);
                self.catching_up = false;
                self.catch_up_end = None;
                return Ok(false);
            }
            Step::Read { upto } => upto,
        };
        // A catch-up in pages keeps the end it started with.
        let upto = match self.catch_up_end {
            Some(end) if end >= cursor.version && end <= upto => end,
            _ => upto,
        };
        // Inside `version`, after the last ordinal done: the previous
        // page's, or the checkpoint's. Only a position typed without one
        // skips by count; see [`Cursor`].
        let (after, skip) = cursor.resume_in_version();
        let rows = self
            .q
            .changes(cursor.last_sync(), upto, after, skip, self.limit)
            .await?;
        let full_page = rows.len() >= self.limit as usize;
        let found = !rows.is_empty();
        let (changes, next, lost) = absorb(cursor, rows, upto, full_page, &self.outbox)?;
        self.taken.extend(taken);
        self.lost.fetch_add(lost, Ordering::Relaxed);
        self.cursor = Some(next);
        self.catch_up_end = full_page.then_some(upto);
        if !full_page {
            self.catching_up = false;
        }
        for change in changes {
            match &change {
                Change::Row { .. } => {
                    self.last = Some(change.resume_after());
                    self.buffer.push_back(change);
                }
                Change::Commit { resume } | Change::Heartbeat { resume } => {
                    let heartbeat = matches!(change, Change::Heartbeat { .. });
                    self.yield_resume(resume.clone(), heartbeat);
                }
            }
        }
        Ok(found)
    }

    /// Queues a commit or heartbeat at `resume` if it moves forward.
    fn yield_resume(&mut self, resume: Position, heartbeat: bool) {
        if self.last.as_ref().is_some_and(|last| resume <= *last) {
            return;
        }
        self.last = Some(resume.clone());
        self.buffer.push_back(if heartbeat {
            Change::Heartbeat { resume }
        } else {
            Change::Commit { resume }
        });
    }
}

impl<Q: ChangeTracking> ChangeStream for SqlServerStream<Q> {
    type Position = Position;

    async fn next(&mut self) -> Result<Change<Position>, SourceError> {
        loop {
            if let Some(change) = self.buffer.pop_front() {
                return Ok(change);
            }
            if !self.wait.is_zero() {
                tokio::time::sleep(self.wait).await;
            }
            let found = self.read_once().await?;
            self.wait = self.poll.after(found);
        }
    }

    fn durable(&mut self, _resume: &Position) {
        // Change Tracking keeps changes for its retention period whoever
        // has read them: nothing to release.
    }

    async fn close(self) {}

    fn numbering(&mut self, epoch: u64, next_seq: u64) {
        self.numbering = Some((epoch, next_seq));
    }

    fn taken(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.taken)
    }
}

/// The real queries, over one tiberius connection.
pub struct TiberiusChangeTracking {
    client: MssqlClient,
    /// `[schema].[table]`, for OBJECT_ID and CHANGETABLE.
    outbox: String,
    changes_sql: String,
    changes_after_sql: String,
    taken_sql: String,
}

impl TiberiusChangeTracking {
    pub fn new(client: MssqlClient, outbox: String) -> Self {
        TiberiusChangeTracking {
            changes_sql: changes_sql(&outbox, false),
            changes_after_sql: changes_sql(&outbox, true),
            taken_sql: taken_sql(&outbox),
            client,
            outbox,
        }
    }
}

/// The text of the `i`th cell of a row.
fn text_at(row: &tiberius::Row, i: usize) -> Result<Option<String>, String> {
    let cell = row
        .cells()
        .nth(i)
        .map(|(_, c)| c)
        .ok_or_else(|| format!("column {i} missing from the result"))?;
    types::cell_text(cell)
}

fn tracked(row: &tiberius::Row) -> Result<Tracked, SourceError> {
    let version: i64 = row
        .try_get::<i64, _>(0)
        .map_err(|e| query(format!("reading SYS_CHANGE_VERSION: {e}")))?
        .ok_or_else(|| query("SYS_CHANGE_VERSION is NULL"))?;
    let key = text_at(row, 1).map_err(query)?.unwrap_or_default();
    let ordinal: i64 = row
        .try_get::<i64, _>(2)
        .map_err(|e| query(format!("reading the outbox's [ordinal]: {e}")))?
        .unwrap_or(0);
    let payload = (|| -> Result<Payload, String> {
        // o.[id] NULL: the join found no outbox row.
        if text_at(row, 3)?.is_none() {
            return Ok(Payload::Gone);
        }
        Ok(Payload::Row(OutboxRow {
            id: text_at(row, 3)?,
            created_at: text_at(row, 4)?,
            origin: text_at(row, 5)?,
            kind: text_at(row, 6)?,
            entity_key: text_at(row, 7)?,
            data: text_at(row, 8)?,
            commit_time: None,
        }))
    })()
    .unwrap_or_else(Payload::Undecodable);
    Ok(Tracked {
        version,
        key,
        ordinal,
        payload,
    })
}

impl ChangeTracking for TiberiusChangeTracking {
    async fn versions(&mut self) -> Result<Versions, SourceError> {
        self.client
            .begin_transaction_with_isolation(IsolationLevel::Snapshot)
            .await
            .map_err(|e| classify("starting a snapshot transaction", &e))?;
        let params: [&dyn ToSql; 1] = [&self.outbox];
        let row = self
            .client
            .query(VERSIONS_SQL, &params)
            .await
            .map_err(|e| classify("reading the Change Tracking versions", &e))?
            .into_row()
            .await
            .map_err(|e| classify("reading the Change Tracking versions", &e))?
            .ok_or_else(|| query("the versions query returned no row"))?;
        let get = |i: usize| {
            row.try_get::<i64, _>(i)
                .map_err(|e| query(format!("reading a version: {e}")))
        };
        Ok(Versions {
            current: get(0)?,
            min_valid: get(1)?,
        })
    }

    async fn changes(
        &mut self,
        last_sync: i64,
        upto: i64,
        after: Option<i64>,
        skip: u32,
        limit: u32,
    ) -> Result<Vec<Tracked>, SourceError> {
        // A count to skip (a position typed without an ordinal) is read and
        // dropped here, once: pages after it continue by ordinal.
        let top = i64::from(skip) + i64::from(limit);
        let result = match after {
            None => {
                let params: [&dyn ToSql; 3] = [&last_sync, &upto, &top];
                self.client.query(self.changes_sql.as_str(), &params).await
            }
            Some(ordinal) => {
                let params: [&dyn ToSql; 4] = [&last_sync, &upto, &top, &ordinal];
                self.client
                    .query(self.changes_after_sql.as_str(), &params)
                    .await
            }
        };
        let outbox = &self.outbox;
        let failed = |e: tiberius::error::Error| match conn::number(&e) {
            // Invalid column name (the server's message names it).
            Some(207) => SourceError::operator(
                Cause::NotInitialised,
                format!(
                    "{}: the outbox {outbox} lacks a column sitesync reads (id, created_at, origin, type, entity_key, data, ordinal): `sitesync check` names it; `sitesync init` adds [ordinal] ({})",
                    classify("reading CHANGETABLE(CHANGES …)", &e).message(),
                    add_ordinal_sql(outbox)
                ),
            ),
            _ => classify("reading CHANGETABLE(CHANGES …)", &e),
        };
        let rows = result
            .map_err(failed)?
            .into_first_result()
            .await
            .map_err(failed)?;
        rows.iter().skip(skip as usize).map(tracked).collect()
    }

    async fn taken(
        &mut self,
        origin: &str,
        epoch: u64,
        from: u64,
    ) -> Result<Vec<u64>, SourceError> {
        let (epoch, from) = (epoch as i64, from as i64);
        let params: [&dyn ToSql; 3] = [&origin, &epoch, &from];
        let context =
            "reading the numbers of this site's events that came back round (dbo.sitesync_inbox)";
        let rows = self
            .client
            .query(self.taken_sql.as_str(), &params)
            .await
            .map_err(|e| classify(context, &e))?
            .into_first_result()
            .await
            .map_err(|e| classify(context, &e))?;
        rows.iter()
            .map(|r| {
                r.try_get::<i64, _>(0)
                    .map_err(|e| query(format!("{context}: {e}")))?
                    .map(|seq| seq as u64)
                    .ok_or_else(|| query(format!("{context}: a NULL seq")))
            })
            .collect()
    }

    async fn finish(&mut self, ok: bool) -> Result<(), SourceError> {
        if ok {
            self.client
                .commit_transaction()
                .await
                .map_err(|e| classify("ending the snapshot transaction", &e))
        } else {
            // Whatever is open, if anything: the begin may never have
            // reached the server, or the server may have rolled back already.
            exec(
                &mut self.client,
                END_ANY_TRANSACTION_SQL,
                "rolling back the snapshot transaction",
            )
            .await
        }
    }
}

/// Ends a transaction that may or may not be open (T-SQL, so that it is
/// not an error when none is; tiberius clears its transaction descriptor
/// on the server's ROLLBACK environment change either way).
pub const END_ANY_TRANSACTION_SQL: &str = "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION";

pub struct SqlServerSource {
    cfg: Settings,
    site: String,
    application: String,
}

impl SqlServerSource {
    pub fn new(connector: &ConnectorConfig, db: &Settings) -> Result<SqlServerSource, SourceError> {
        conn::config(db, "sitesync")?;
        Ok(SqlServerSource {
            cfg: db.clone(),
            site: connector.site.clone(),
            application: format!("sitesync-{}", connector.name),
        })
    }

    pub async fn client(&self) -> Result<MssqlClient, SourceError> {
        conn::connect(&self.cfg, &self.application).await
    }

    /// `[schema].[table]`.
    fn outbox(&self) -> String {
        let (schema, table) = self.cfg.outbox_parts();
        format!("{}.{}", quote(schema), quote(table))
    }

    async fn versions(&self, client: &mut MssqlClient) -> Result<Versions, SourceError> {
        let outbox = self.outbox();
        let params: [&dyn ToSql; 1] = [&outbox];
        let row = client
            .query(VERSIONS_SQL, &params)
            .await
            .map_err(|e| classify("reading the Change Tracking versions", &e))?
            .into_row()
            .await
            .map_err(|e| classify("reading the Change Tracking versions", &e))?
            .ok_or_else(|| query("the versions query returned no row"))?;
        Ok(Versions {
            current: row.try_get::<i64, _>(0).ok().flatten(),
            min_valid: row.try_get::<i64, _>(1).ok().flatten(),
        })
    }
}

/// Runs one query and returns its first row's cells as text.
async fn first_row(
    client: &mut MssqlClient,
    sql: &str,
    params: &[&dyn ToSql],
    context: &str,
) -> Result<Option<Vec<Option<String>>>, SourceError> {
    let row = client
        .query(sql, params)
        .await
        .map_err(|e| classify(context, &e))?
        .into_row()
        .await
        .map_err(|e| classify(context, &e))?;
    match row {
        None => Ok(None),
        Some(row) => {
            let mut out = Vec::new();
            for (_, cell) in row.cells() {
                out.push(types::cell_text(cell).map_err(query)?);
            }
            Ok(Some(out))
        }
    }
}

async fn exec(client: &mut MssqlClient, sql: &str, context: &str) -> Result<(), SourceError> {
    client
        .simple_query(sql)
        .await
        .map_err(|e| classify(context, &e))?
        .into_results()
        .await
        .map_err(|e| classify(context, &e))?;
    Ok(())
}

/// Change Tracking retention in hours, from `sys.change_tracking_databases`.
pub fn retention_hours(period: i64, units: &str) -> i64 {
    match units.to_ascii_uppercase().as_str() {
        "MINUTES" => period / 60,
        "HOURS" => period,
        _ => period * 24, // DAYS
    }
}

/// The retention `init` sets: the configured downtime plus a day, in hours.
pub fn init_retention_hours(cfg: &Settings) -> u64 {
    cfg.max_downtime.as_secs().div_ceil(3600) + 24
}

/// The statements `init` may run, in order (each only when needed).
pub fn init_sql(cfg: &Settings, site: &str) -> InitSql {
    let (schema, table) = cfg.outbox_parts();
    let outbox = format!("{}.{}", quote(schema), quote(table));
    InitSql {
        snapshot: "ALTER DATABASE CURRENT SET ALLOW_SNAPSHOT_ISOLATION ON".into(),
        change_tracking: format!(
            "ALTER DATABASE CURRENT SET CHANGE_TRACKING = ON (CHANGE_RETENTION = {} HOURS, AUTO_CLEANUP = ON)",
            init_retention_hours(cfg)
        ),
        schema: format!(
            "IF SCHEMA_ID({s}) IS NULL EXEC(N'CREATE SCHEMA ' + {q})",
            s = literal(schema),
            q = literal(&quote(schema)),
        ),
        outbox: format!(
            "CREATE TABLE {outbox} (\n\
             \x20   [id] uniqueidentifier NOT NULL CONSTRAINT {pk} PRIMARY KEY DEFAULT NEWID(),\n\
             \x20   [created_at] datetimeoffset(6) NOT NULL DEFAULT SYSDATETIMEOFFSET(),\n\
             \x20   [origin] nvarchar(64) NOT NULL DEFAULT {site},\n\
             \x20   [type] nvarchar(200) NOT NULL,\n\
             \x20   [entity_key] nvarchar(450) NULL,\n\
             \x20   [data] nvarchar(max) NOT NULL CONSTRAINT {ck} CHECK (ISJSON([data]) = 1),\n\
             \x20   [ordinal] bigint IDENTITY(1,1) NOT NULL\n\
             )",
            pk = quote(&format!("PK_{table}")),
            ck = quote(&format!("CK_{table}_data")),
            site = literal(site),
        ),
        track_table: format!(
            "ALTER TABLE {outbox} ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF)"
        ),
        add_ordinal: add_ordinal_sql(&outbox),
    }
}

/// See [`init_sql`].
#[derive(Debug, Clone)]
pub struct InitSql {
    pub snapshot: String,
    pub change_tracking: String,
    pub schema: String,
    pub outbox: String,
    pub track_table: String,
    /// For an outbox created before the ordinal column.
    pub add_ordinal: String,
}

/// The state `init` and `check` look at, in one query.
pub const STATE_SQL: &str = "SELECT \
    (SELECT snapshot_isolation_state FROM sys.databases WHERE database_id = DB_ID()), \
    (SELECT retention_period FROM sys.change_tracking_databases WHERE database_id = DB_ID()), \
    (SELECT retention_period_units_desc FROM sys.change_tracking_databases WHERE database_id = DB_ID()), \
    (SELECT is_auto_cleanup_on FROM sys.change_tracking_databases WHERE database_id = DB_ID()), \
    OBJECT_ID(@P1, 'U'), \
    (SELECT COUNT(*) FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(@P1)), \
    DB_NAME(), \
    CAST(SERVERPROPERTY('ProductVersion') AS nvarchar(128)), \
    COLUMNPROPERTY(OBJECT_ID(@P1), 'ordinal', 'IsIdentity')";

/// Whether the outbox's `[ordinal]` is what orders the rows of one
/// transaction, from `COLUMNPROPERTY(…, 'ordinal', 'IsIdentity')`: 1 an
/// identity column, 0 a column that is not one, NULL no such column.
pub fn ordinal_problem(outbox: &str, is_identity: Option<i64>) -> Option<String> {
    match is_identity {
        Some(1) => None,
        Some(_) => Some(format!(
            "{outbox}.[ordinal] is not an IDENTITY column: SQL Server must number the outbox rows in insert order (drop the column, then {})",
            add_ordinal_sql(outbox)
        )),
        None => Some(format!(
            "{outbox} has no [ordinal] column: Change Tracking gives the rows of one transaction no order, and this column does. Run `sitesync init`, or {}",
            add_ordinal_sql(outbox)
        )),
    }
}

/// The query that reads it alone.
pub const ORDINAL_SQL: &str = "SELECT COLUMNPROPERTY(OBJECT_ID(@P1), 'ordinal', 'IsIdentity')";

/// What [`STATE_SQL`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DbState {
    /// `snapshot_isolation_state` = 1 (ON).
    pub snapshot: bool,
    /// Change Tracking retention in hours, `None` when it is off.
    pub retention_hours: Option<i64>,
    pub auto_cleanup: bool,
    pub outbox_exists: bool,
    pub outbox_tracked: bool,
    pub database: String,
    pub version: String,
    /// `COLUMNPROPERTY(outbox, 'ordinal', 'IsIdentity')`.
    pub ordinal: Option<i64>,
}

impl DbState {
    fn from_cells(c: &[Option<String>]) -> DbState {
        let at = |i: usize| c.get(i).cloned().flatten();
        let num = |i: usize| at(i).and_then(|s| s.parse::<i64>().ok());
        DbState {
            snapshot: num(0) == Some(1),
            retention_hours: match (num(1), at(2)) {
                (Some(p), Some(u)) => Some(retention_hours(p, &u)),
                _ => None,
            },
            auto_cleanup: at(3).as_deref() == Some("true"),
            outbox_exists: at(4).is_some(),
            outbox_tracked: num(5).unwrap_or(0) > 0,
            database: at(6).unwrap_or_default(),
            version: at(7).unwrap_or_default(),
            ordinal: num(8),
        }
    }
}

/// The grants the connector's login needs on the outbox: reading it and its
/// changes (source), deleting rows whose events came back (sink); and
/// reading the sink's inbox, where a restart finds the numbers of events
/// whose rows came back round ([`taken_sql`]; NULL while it does not exist).
pub const GRANTS_SQL: &str = "SELECT HAS_PERMS_BY_NAME(@P1, 'OBJECT', 'SELECT'), \
    HAS_PERMS_BY_NAME(@P1, 'OBJECT', 'VIEW CHANGE TRACKING'), \
    HAS_PERMS_BY_NAME(@P1, 'OBJECT', 'DELETE'), SUSER_SNAME(), \
    HAS_PERMS_BY_NAME(N'dbo.sitesync_inbox', 'OBJECT', 'SELECT')";

/// The checks of `sitesync check` from the state read.
pub fn state_checks(cfg: &Settings, s: &DbState, outbox: &str) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(Check::pass(
        "server",
        format!("SQL Server {} (database {})", s.version, s.database),
    ));
    checks.push(if s.snapshot {
        Check::pass("snapshot isolation", "ALLOW_SNAPSHOT_ISOLATION is ON")
    } else {
        Check::fail(
            "snapshot isolation",
            "ALLOW_SNAPSHOT_ISOLATION is OFF: Change Tracking reads need one consistent snapshot",
            "ALTER DATABASE CURRENT SET ALLOW_SNAPSHOT_ISOLATION ON; (or `sitesync init`)",
        )
    });
    let want = cfg.max_downtime.as_secs().div_ceil(3600) as i64;
    match s.retention_hours {
        None => checks.push(Check::fail(
            "change tracking (database)",
            "off",
            format!(
                "ALTER DATABASE CURRENT SET CHANGE_TRACKING = ON (CHANGE_RETENTION = {} HOURS, AUTO_CLEANUP = ON); (or `sitesync init`)",
                init_retention_hours(cfg)
            ),
        )),
        Some(h) if h < want => checks.push(Check::fail(
            "change tracking retention",
            format!(
                "{h} h, shorter than database.max_downtime_hours ({want} h): a sidecar stopped that long loses outbox rows to the cleanup"
            ),
            format!(
                "ALTER DATABASE CURRENT SET CHANGE_TRACKING (CHANGE_RETENTION = {} HOURS); or lower max_downtime_hours",
                init_retention_hours(cfg)
            ),
        )),
        Some(h) => checks.push(Check::pass(
            "change tracking retention",
            format!("{h} h, covers database.max_downtime_hours ({want} h)"),
        )),
    }
    if s.retention_hours.is_some() && !s.auto_cleanup {
        checks.push(Check::warn(
            "change tracking cleanup",
            "AUTO_CLEANUP is OFF: the tracking tables grow without bound",
            "ALTER DATABASE CURRENT SET CHANGE_TRACKING (AUTO_CLEANUP = ON)",
        ));
    }
    if !s.outbox_exists {
        checks.push(Check::fail(
            "outbox table",
            format!("{outbox} does not exist"),
            "run `sitesync init`",
        ));
    } else if s.outbox_tracked {
        checks.push(Check::pass(
            "change tracking (outbox)",
            format!("{outbox} is tracked"),
        ));
    } else {
        checks.push(Check::fail(
            "change tracking (outbox)",
            format!("{outbox} is not tracked"),
            format!("ALTER TABLE {outbox} ENABLE CHANGE_TRACKING; (or `sitesync init`)"),
        ));
    }
    if s.outbox_exists {
        checks.push(match ordinal_problem(outbox, s.ordinal) {
            None => Check::pass(
                "outbox order",
                format!("{outbox}.[ordinal] numbers rows in insert order"),
            ),
            Some(problem) => Check::fail(
                "outbox order",
                problem,
                format!("{}; (or `sitesync init`)", add_ordinal_sql(outbox)),
            ),
        });
    }
    checks
}

/// The grant checks from [`GRANTS_SQL`]'s row.
pub fn grant_checks(cells: &[Option<String>], outbox: &str, sink: bool) -> Vec<Check> {
    let login = cells.get(3).cloned().flatten().unwrap_or_default();
    let has = |i: usize| cells.get(i).cloned().flatten().as_deref() == Some("1");
    let mut wanted = vec![(0, "SELECT"), (1, "VIEW CHANGE TRACKING")];
    if sink {
        wanted.push((2, "DELETE"));
    }
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(i, _)| !has(*i))
        .map(|(_, p)| *p)
        .collect();
    let mut checks = Vec::new();
    if cells.get(4).cloned().flatten().as_deref() == Some("0") {
        checks.push(Check::fail(
            "grants (inbox)",
            format!("{login} lacks SELECT on dbo.sitesync_inbox: after a crash, the events read again could not keep their seq"),
            format!("GRANT SELECT ON dbo.sitesync_inbox TO {};", quote(&login)),
        ));
    }
    checks.extend(if missing.is_empty() {
        vec![Check::pass(
            "grants",
            format!(
                "{login} has {} on {outbox}",
                wanted
                    .iter()
                    .map(|(_, p)| *p)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )]
    } else {
        vec![Check::fail(
            "grants",
            format!("{login} lacks {} on {outbox}", missing.join(", ")),
            format!(
                "GRANT {} ON {outbox} TO {};",
                missing.join(", "),
                quote(&login)
            ),
        )]
    });
    checks
}

impl Source for SqlServerSource {
    type Position = Position;
    type Stream = SqlServerStream<TiberiusChangeTracking>;

    async fn preflight(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        let mut client = match self.client().await {
            Ok(c) => {
                checks.push(Check::pass("connection", redact_url(&self.cfg.url)));
                c
            }
            Err(e) => {
                checks.push(Check::fail(
                    "connection",
                    e.message(),
                    "check database.url, database.encrypt / ca_file, that SQL Server listens on TCP and that the login exists",
                ));
                return checks;
            }
        };
        let outbox = self.outbox();
        let params: [&dyn ToSql; 1] = [&outbox];
        match first_row(
            &mut client,
            STATE_SQL,
            &params,
            "reading the database state",
        )
        .await
        {
            Ok(Some(cells)) => checks.extend(state_checks(
                &self.cfg,
                &DbState::from_cells(&cells),
                &outbox,
            )),
            Ok(None) => {}
            Err(e) => checks.push(Check::fail(
                "database state",
                e.message(),
                "see the message",
            )),
        }
        match first_row(&mut client, GRANTS_SQL, &params, "reading the grants").await {
            Ok(Some(cells)) => checks.extend(grant_checks(&cells, &outbox, true)),
            Ok(None) => {}
            Err(e) => checks.push(Check::fail("grants", e.message(), "see the message")),
        }
        checks
    }

    async fn init(&self) -> Result<Vec<String>, SourceError> {
        let mut client = self.client().await?;
        let outbox = self.outbox();
        let sql = init_sql(&self.cfg, &self.site);
        let params: [&dyn ToSql; 1] = [&outbox];
        let state = first_row(
            &mut client,
            STATE_SQL,
            &params,
            "reading the database state",
        )
        .await?
        .map(|c| DbState::from_cells(&c))
        .unwrap_or_default();
        let mut done = Vec::new();
        if state.snapshot {
            done.push(format!(
                "snapshot isolation on {}: already allowed",
                state.database
            ));
        } else {
            exec(&mut client, &sql.snapshot, "allowing snapshot isolation").await?;
            done.push(format!("snapshot isolation on {}: allowed", state.database));
        }
        match state.retention_hours {
            Some(h) => done.push(format!(
                "change tracking on {}: already on (retention {h} h)",
                state.database
            )),
            None => {
                exec(
                    &mut client,
                    &sql.change_tracking,
                    "enabling Change Tracking",
                )
                .await?;
                done.push(format!(
                    "change tracking on {}: enabled (retention {} h, auto cleanup)",
                    state.database,
                    init_retention_hours(&self.cfg)
                ));
            }
        }
        if state.outbox_exists {
            done.push(format!("outbox table {outbox}: already there"));
            match state.ordinal {
                Some(1) => {}
                None => {
                    exec(
                        &mut client,
                        &sql.add_ordinal,
                        "adding the [ordinal] column to the outbox",
                    )
                    .await?;
                    done.push(format!(
                        "outbox table {outbox}: [ordinal] added (orders the rows of one transaction)"
                    ));
                }
                Some(_) => {
                    return Err(SourceError::operator(
                        Cause::Config,
                        ordinal_problem(&outbox, state.ordinal).unwrap_or_default(),
                    ));
                }
            }
        } else {
            exec(&mut client, &sql.schema, "creating the outbox's schema").await?;
            exec(&mut client, &sql.outbox, "creating the outbox table").await?;
            done.push(format!("outbox table {outbox}: created"));
        }
        if state.outbox_tracked {
            done.push(format!("change tracking on {outbox}: already on"));
        } else {
            exec(
                &mut client,
                &sql.track_table,
                "enabling Change Tracking on the outbox",
            )
            .await?;
            done.push(format!(
                "change tracking on {outbox}: enabled (outbox rows inserted from now on are streamed)"
            ));
        }
        Ok(done)
    }

    async fn open(
        &self,
        resume: Option<&Position>,
    ) -> Result<SqlServerStream<TiberiusChangeTracking>, SourceError> {
        let mut client = self.client().await?;
        let outbox = self.outbox();
        let params: [&dyn ToSql; 1] = [&outbox];
        let is_identity = first_row(
            &mut client,
            ORDINAL_SQL,
            &params,
            "reading the outbox's [ordinal] column",
        )
        .await?
        .and_then(|c| c.first().cloned().flatten())
        .and_then(|v| v.parse::<i64>().ok());
        if let Some(problem) = ordinal_problem(&outbox, is_identity) {
            return Err(SourceError::operator(Cause::NotInitialised, problem));
        }
        Ok(SqlServerStream::new(
            TiberiusChangeTracking::new(client, self.outbox()),
            self.outbox(),
            self.site.clone(),
            resume,
            self.cfg.poll_max,
            self.cfg.read_batch,
        ))
    }

    async fn bounds(&self) -> Result<LogBounds<Position>, SourceError> {
        let mut client = self.client().await?;
        let v = self.versions(&mut client).await?;
        let Some(current) = v.current else {
            return Err(SourceError::operator(
                Cause::NotInitialised,
                "Change Tracking is off on the database: run `sitesync init`",
            ));
        };
        Ok(LogBounds {
            oldest: v.min_valid.map(|m| Cursor::at(m + 1).position()),
            latest: Cursor::at(current + 1).position(),
            oldest_note: "the oldest version Change Tracking still holds (its minimum valid version): changes before it were cleaned up, so events confirmed before it can only come back from the archive queue".into(),
            detail: format!(
                "Change Tracking: current version {current}, minimum valid version for {} {}",
                self.outbox(),
                v.min_valid
                    .map_or("none (table not tracked)".to_string(), |m| m.to_string())
            ),
        })
    }

    async fn probe(&self) -> Result<(), SourceError> {
        let mut client = self.client().await?;
        first_row(&mut client, "SELECT 1", &[], "probing SQL Server").await?;
        Ok(())
    }

    async fn advance_to_latest(&self) -> Result<Position, SourceError> {
        // SQL Server keeps no record of our progress: the latest position
        // is the checkpoint's to hold.
        Ok(self.bounds().await?.latest)
    }
}

#[cfg(test)]
mod tests;
