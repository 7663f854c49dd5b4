//! Sources: a database's change log, read as a stream of outbox inserts in
//! commit order.
//!
//! Each engine implements [`Source`] in one file (PostgreSQL in
//! [`postgres`], SQL Server Change Tracking in [`sqlserver`]; MariaDB and
//! Oracle follow the same shape). The
//! trait is small on purpose:
//!
//! - [`Source::preflight`] checks what streaming needs (wal_level, binlog
//!   format, Change Tracking, LogMiner grants…) and says how to fix each gap;
//! - [`Source::init`] creates what it can (outbox table, publication, slot),
//!   idempotently, and reports what it did;
//! - [`Source::open`] starts a [`ChangeStream`] at a resume [`Position`];
//! - [`ChangeStream::durable`] tells the database how far the checkpoint is
//!   durable, so that it may release its log (PostgreSQL's flush LSN).
//!
//! A stream yields [`Change`]s: rows at their own position, transaction
//! commits and heartbeats (the log moved on with nothing for us). Positions
//! only grow within a stream; the runner republishes from the checkpoint by
//! opening a new stream.

use crate::checks::Check;
use crate::event::{OutboxRow, RowError};
use crate::position::Position;
use std::future::Future;

/// One item of a change stream, in commit order.
#[derive(Debug, Clone)]
pub enum Change {
    /// An outbox row inserted by a committed transaction. `position` is the
    /// row's own position; once it is done, the resume point is
    /// `position.next_row()`. `row` is `Err` when the log entry could not be
    /// decoded into outbox columns (it goes to the dead-letter queue).
    Row {
        position: Position,
        row: Result<OutboxRow, RowError>,
    },
    /// The transaction ended; everything before `resume` has been streamed.
    Commit { resume: Position },
    /// No transaction of ours is open and the log has moved on to `resume`:
    /// checkpointing it lets the database release its log while we are idle.
    Heartbeat { resume: Position },
}

impl Change {
    /// Where to resume once this change is done.
    pub fn resume_after(&self) -> Position {
        match self {
            Change::Row { position, .. } => position.next_row(),
            Change::Commit { resume } | Change::Heartbeat { resume } => resume.clone(),
        }
    }
}

/// What a source error asks of us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The database went away, restarted, or the slot is busy: reconnect
    /// with backoff and resume from the checkpoint.
    Transient,
    /// Needs a person (slot missing, WAL removed, permission denied): stop
    /// and say what to do.
    Operator,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    pub kind: ErrorKind,
    pub message: String,
}

impl SourceError {
    pub fn transient(message: impl Into<String>) -> Self {
        SourceError {
            kind: ErrorKind::Transient,
            message: message.into(),
        }
    }

    pub fn operator(message: impl Into<String>) -> Self {
        SourceError {
            kind: ErrorKind::Operator,
            message: message.into(),
        }
    }
}

/// How far back and forward a checkpoint reset may go, as the database
/// sees it.
#[derive(Debug, Clone)]
pub struct LogBounds {
    /// The oldest position the log can still stream from (PostgreSQL: the
    /// slot's `confirmed_flush_lsn`; a slot cannot rewind).
    pub oldest: Option<Position>,
    /// The current end of the log.
    pub latest: Position,
    /// The database's own record of our progress, for display.
    pub detail: String,
}

/// A database whose change log sitesync reads.
pub trait Source: Send + Sync {
    type Stream: ChangeStream;

    /// Checks before streaming, each with its fix.
    fn preflight(&self) -> impl Future<Output = Vec<Check>> + Send;

    /// Creates the outbox table and whatever the log needs; idempotent.
    /// Returns one line per action (done or already there).
    fn init(&self) -> impl Future<Output = Result<Vec<String>, SourceError>> + Send;

    /// Starts streaming at `resume` (`None`: where the database's own record
    /// of our progress is).
    fn open(
        &self,
        resume: Option<&Position>,
    ) -> impl Future<Output = Result<Self::Stream, SourceError>> + Send;

    /// The log's bounds, for `checkpoint show` and `checkpoint reset`.
    fn bounds(&self) -> impl Future<Output = Result<LogBounds, SourceError>> + Send;

    /// Whether the database still streams to us, asked on an ordinary
    /// connection: a replication connection lost to a silent network
    /// partition can wait for minutes before TCP notices.
    fn probe(&self) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Moves the database's own record of our progress to the end of the log
    /// (`checkpoint reset --to-latest`) and returns that position.
    fn advance_to_latest(&self) -> impl Future<Output = Result<Position, SourceError>> + Send;
}

/// An open change stream.
pub trait ChangeStream: Send {
    /// The next change, in commit order.
    fn next(&mut self) -> impl Future<Output = Result<Change, SourceError>> + Send;

    /// Everything before `resume` is durably checkpointed: the database may
    /// release it.
    fn durable(&mut self, resume: &Position);

    /// Ends the stream cleanly, after reporting the last durable position.
    fn close(self) -> impl Future<Output = ()> + Send;
}
