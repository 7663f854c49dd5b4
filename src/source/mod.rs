//! Sources: a database's change log, read as a stream of outbox inserts in
//! commit order.
//!
//! Each engine implements [`Source`] in its folder under `crate::engine`
//! (PostgreSQL logical replication, SQL Server Change Tracking, Oracle
//! LogMiner). The trait is small on purpose:
//!
//! - [`Source::preflight`] checks what streaming needs (`wal_level`, Change
//!   Tracking, LogMiner grants…) and says how to fix each gap;
//! - [`Source::init`] creates what it can (outbox table, publication, slot),
//!   idempotently, and reports what it did;
//! - [`Source::open`] starts a [`ChangeStream`] at a resume position (the
//!   engine's [`LogPosition`]);
//! - [`ChangeStream::durable`] tells the database how far the checkpoint is
//!   durable, so that it may release its log (PostgreSQL's flush LSN).
//!
//! A stream yields [`Change`]s: rows at their own position, transaction
//! commits and heartbeats (the log moved on with nothing for us). Positions
//! only grow within a stream; the runner republishes from the checkpoint by
//! opening a new stream.

use crate::checks::Check;
use crate::error::SourceError;
use crate::event::{OutboxRow, RowError};
use crate::position::LogPosition;
use std::future::Future;

/// One item of a change stream, in commit order.
#[derive(Debug, Clone)]
pub enum Change<P> {
    /// An outbox row inserted by a committed transaction. `position` is the
    /// row's own position; once it is done, the resume point is
    /// `position.next_row()`. `row` is `Err` when the log entry could not be
    /// decoded into outbox columns (it goes to the dead-letter queue).
    Row {
        position: P,
        row: Result<OutboxRow, RowError>,
    },
    /// The transaction ended; everything before `resume` has been streamed.
    Commit { resume: P },
    /// No transaction of ours is open and the log has moved on to `resume`:
    /// checkpointing it lets the database release its log while we are idle.
    Heartbeat { resume: P },
}

impl<P: LogPosition> Change<P> {
    /// Where to resume once this change is done.
    pub fn resume_after(&self) -> P {
        match self {
            Change::Row { position, .. } => position.next_row(),
            Change::Commit { resume } | Change::Heartbeat { resume } => resume.clone(),
        }
    }
}

/// How far back and forward a checkpoint reset may go, as the database
/// sees it.
#[derive(Debug, Clone)]
pub struct LogBounds<P> {
    /// The oldest position the log can still stream from (PostgreSQL: the
    /// slot's `confirmed_flush_lsn`; a slot cannot rewind).
    pub oldest: Option<P>,
    /// The current end of the log.
    pub latest: P,
    /// What `oldest` is and why the log cannot go back further, in the
    /// engine's words (for `checkpoint reset`).
    pub oldest_note: String,
    /// The database's own record of our progress, for display.
    pub detail: String,
}

/// A database whose change log sitesync reads.
pub trait Source: Send + Sync {
    /// Where this engine's log can be resumed.
    type Position: LogPosition;
    type Stream: ChangeStream<Position = Self::Position>;

    /// Checks before streaming, each with its fix.
    fn preflight(&self) -> impl Future<Output = Vec<Check>> + Send;

    /// Creates the outbox table and whatever the log needs; idempotent.
    /// Returns one line per action (done or already there).
    fn init(&self) -> impl Future<Output = Result<Vec<String>, SourceError>> + Send;

    /// Starts streaming at `resume` (`None`: where the database's own record
    /// of our progress is).
    fn open(
        &self,
        resume: Option<&Self::Position>,
    ) -> impl Future<Output = Result<Self::Stream, SourceError>> + Send;

    /// The log's bounds, for `checkpoint show` and `checkpoint reset`.
    fn bounds(&self)
    -> impl Future<Output = Result<LogBounds<Self::Position>, SourceError>> + Send;

    /// Whether the database still streams to us, asked on an ordinary
    /// connection: a replication connection lost to a silent network
    /// partition can wait for minutes before TCP notices.
    fn probe(&self) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Moves the database's own record of our progress to the end of the log
    /// (`checkpoint reset --to-latest`) and returns that position.
    fn advance_to_latest(&self)
    -> impl Future<Output = Result<Self::Position, SourceError>> + Send;
}

/// An open change stream.
pub trait ChangeStream: Send {
    type Position: LogPosition;

    /// The next change, in commit order.
    fn next(&mut self) -> impl Future<Output = Result<Change<Self::Position>, SourceError>> + Send;

    /// Everything before `resume` is durably checkpointed: the database may
    /// release it.
    fn durable(&mut self, resume: &Self::Position);

    /// Ends the stream cleanly, after reporting the last durable position.
    fn close(self) -> impl Future<Output = ()> + Send;

    /// How the runner numbers the events of this stream: the checkpoint's
    /// epoch and the `seq` its next event gets. Told once, before the first
    /// [`ChangeStream::next`]. Only a log that forgets rows (see
    /// [`ChangeStream::taken`]) needs it.
    fn numbering(&mut self, _epoch: u64, _next_seq: u64) {}

    /// Numbers of the epoch given to [`ChangeStream::numbering`], at or
    /// above its `next_seq`, that events published before a restart already
    /// took, whose rows the log no longer shows: the runner skips them when
    /// it numbers the rows read again, so that each event republished after
    /// a crash keeps its `seq`. Asked after every [`ChangeStream::next`];
    /// a stream hands each number out once or more (the runner keeps a set).
    /// A log that shows every committed row again (PostgreSQL's slot,
    /// LogMiner) has none.
    fn taken(&mut self) -> Vec<u64> {
        Vec::new()
    }
}
