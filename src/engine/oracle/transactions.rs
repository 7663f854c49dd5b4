//! Transactions assembled from `V$LOGMNR_CONTENTS` rows, emitted at their
//! COMMIT in commit-SCN order.
//!
//! LogMiner is started without `COMMITTED_DATA_ONLY`: that option makes the
//! server buffer every transaction in its own memory until the commit (a
//! known source of PGA blow-ups and of silently discarded long
//! transactions). We buffer instead, and only what matters to us: the
//! outbox INSERTs (their `SQL_REDO`), keyed by XID.
//!
//! - An outbox INSERT (`OPERATION_CODE` 1) is added to its transaction
//!   (created at its first outbox row, so transactions that never touch the
//!   outbox cost nothing). Statements split over several rows (`CSF = 1`)
//!   are joined first; one whose last part never comes (its transaction
//!   ends first) becomes a row error at its place, sent to the dead-letter
//!   queue with the reason.
//! - A DELETE with `ROLLBACK = 1` on the outbox (a rollback to savepoint
//!   undoing one of our inserts, or the undo of an INSERT statement that
//!   failed, e.g. on the `DATA IS JSON` check) removes the buffered insert
//!   of that `ROW_ID`. When the insert was read in an earlier window, the
//!   undo's XID has the sequence `FFFFFFFF` and the transaction is found by
//!   its undo segment and slot ([`Transactions::feed`]).
//! - A value written out of line marks its insert as unreadable: LOB
//!   operations on the outbox (`SEL_LOB_LOCATOR`, `LOB_WRITE`, `LOB_TRIM`,
//!   `LOB_ERASE`: a `DATA` CLOB too long to be stored in the row) and
//!   extended-string operations (`32K_BEGIN`/`WRITE`/`END`: a `DATA`
//!   VARCHAR2 longer than 4,000 bytes under `MAX_STRING_SIZE = EXTENDED`).
//!   sitesync does not reassemble them, so the INSERT's `SQL_REDO` does not
//!   hold the whole value; the row becomes a row error naming the cause
//!   (dead-letter queue), never an event with a partial or stale `DATA`.
//!   An UPDATE of a buffered outbox row in its own transaction does the
//!   same (the INSERT's values are not what was committed).
//! - ROLLBACK (36) drops the transaction. COMMIT (7) moves it to the
//!   window's committed set, under its commit SCN: the COMMIT row's `SCN`
//!   (the `COMMIT_SCN` column is filled only with `COMMITTED_DATA_ONLY`).
//! - START (6) rows are tracked by XID for every transaction, so that a
//!   COMMIT of a transaction whose start was never mined (its redo was
//!   written late, on another instance's thread) is counted and logged
//!   rather than passed over: [`Transactions::unmatched_commits`]. A
//!   transaction open when the session started (`V$TRANSACTION`, read then)
//!   is expected to commit without its start mined.
//! - At the end of a window (every row with `SCN <= hi` has been fed), the
//!   committed transactions are emitted ordered by `(commit SCN, XID)`:
//!   several transactions can commit at one SCN, and the XID makes their
//!   order the same on every reading. A position's `index` counts the rows
//!   of all the transactions committing at its SCN.
//! - Transactions still open at the end of a window are carried to the
//!   next one. Every position carries `mine_from`, the first SCN of the
//!   oldest transaction still buffered (open, or committed but not fully
//!   done), so a restart re-reads every row that is not done yet; rows
//!   before the resume position are skipped then.
//! - Retention (`database.transaction_retention`): an open transaction
//!   whose first outbox row is older than the retention, by the redo's own
//!   clock (the latest `TIMESTAMP` mined), is abandoned at the end of the
//!   window: dropped from the buffer, so that it stops holding `mine_from`
//!   back, with a warning naming its XID, start SCN and rows, a counter,
//!   and a record ([`Abandoned`]) that the source writes to
//!   `SITESYNC_ABANDONED_TX` for `sitesync status`. Its later rows are
//!   ignored; if it commits, its events are lost and that is an error in
//!   the log and in the record. The redo clock makes the decision the same
//!   on every re-reading of the same redo.
//!
//! Memory: the buffered `SQL_REDO` of all transactions together is capped
//! (`database.max_buffered_mib`). Past it the stream stops with an operator
//! error naming the transaction, rather than grow without bound; the
//! operator raises the cap or splits the transaction. (Spilling to the sled
//! store would lift the limit; it is not done.)

use super::position::Position;
use super::redo::{Fragments, parse_insert};
use super::types::to_text;
use crate::error::{Cause, SourceError};
use crate::event::{OutboxRow, RowError};
use crate::position::LogPosition;
use crate::source::Change;
use std::collections::{BTreeMap, HashMap, HashSet};

/// `OPERATION_CODE` values of `V$LOGMNR_CONTENTS`.
pub mod op {
    pub const INSERT: u32 = 1;
    pub const DELETE: u32 = 2;
    pub const UPDATE: u32 = 3;
    pub const START: u32 = 6;
    pub const COMMIT: u32 = 7;
    /// `SEL_LOB_LOCATOR`: a LOB column is about to be written out of line.
    pub const SEL_LOB_LOCATOR: u32 = 9;
    pub const LOB_WRITE: u32 = 10;
    pub const LOB_TRIM: u32 = 11;
    pub const LOB_ERASE: u32 = 29;
    pub const ROLLBACK: u32 = 36;
    /// `32K_BEGIN`, `32K_WRITE`, `32K_END`: a VARCHAR2 over 4,000 bytes
    /// (`MAX_STRING_SIZE = EXTENDED`) written out of line, like a LOB.
    pub const EXTENDED_BEGIN: u32 = 91;
    pub const EXTENDED_WRITE: u32 = 92;
    pub const EXTENDED_END: u32 = 93;
    /// A change LogMiner could not decode (`UNSUPPORTED`).
    pub const UNSUPPORTED: u32 = 255;
}

/// One row of `V$LOGMNR_CONTENTS`, the columns we read.
#[derive(Debug, Clone, PartialEq)]
pub struct MinedRow {
    pub scn: u64,
    /// `RAWTOHEX(XID)`.
    pub xid: String,
    pub operation_code: u32,
    /// `CSF = 1`: `SQL_REDO` continues in the next row.
    pub csf: bool,
    /// `ROLLBACK = 1`: the row undoes an earlier change (rollback to a
    /// savepoint).
    pub rollback: bool,
    pub seg_owner: Option<String>,
    pub table_name: Option<String>,
    pub row_id: Option<String>,
    pub sql_redo: Option<String>,
    /// `RS_ID` and `SSN`: where the change is in the redo, for messages.
    pub rs_id: String,
    pub ssn: u64,
    /// `TIMESTAMP`: when the change was made, in whole seconds, read in
    /// the database's time zone as if it were UTC (only differences are
    /// used: the retention's clock).
    pub time: Option<i64>,
}

#[derive(Debug)]
struct BufferedRow {
    row_id: Option<String>,
    sql: String,
    /// Why the row cannot be published whole (it goes to the dead-letter
    /// queue with this reason).
    problem: Option<String>,
}

#[derive(Debug)]
struct Tx {
    /// SCN of its first outbox row: mining from here sees all of them.
    first_scn: u64,
    /// Redo time of its first outbox row, for the retention.
    first_time: Option<i64>,
    rows: Vec<BufferedRow>,
    fragments: Fragments,
    bytes: usize,
}

/// How an abandoned transaction stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No end seen yet: if it commits, its events are lost.
    Open,
    /// It committed at this SCN: its outbox rows were not published.
    Committed(u64),
    /// It rolled back at this SCN: nothing was lost.
    RolledBack(u64),
}

/// A transaction the source gave up on (see the module docs), as logged,
/// recorded in `SITESYNC_ABANDONED_TX` and shown by `sitesync status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned {
    pub xid: String,
    /// The SCN of its first outbox row.
    pub first_scn: u64,
    /// Its outbox rows dropped (buffered when abandoned, and read after).
    pub rows: u64,
    /// The end of the window it was abandoned in.
    pub at_scn: u64,
    pub outcome: Outcome,
}

impl Abandoned {
    /// The line `sitesync status` prints.
    pub fn status_line(&self) -> String {
        let what = match self.outcome {
            Outcome::Open => "not ended yet: if it commits, its events are lost".to_string(),
            Outcome::Committed(scn) => {
                format!(
                    "COMMITTED at SCN {scn}: its events were lost (re-create them in the outbox if they matter)"
                )
            }
            Outcome::RolledBack(scn) => format!("rolled back at SCN {scn}: nothing was lost"),
        };
        format!(
            "abandoned transaction XID {}: {} outbox row(s) since SCN {}, dropped at SCN {} (database.transaction_retention); {what}",
            self.xid, self.rows, self.first_scn, self.at_scn
        )
    }

    /// The `OUTCOME` column's text.
    pub fn outcome_text(&self) -> &'static str {
        match self.outcome {
            Outcome::Open => "open",
            Outcome::Committed(_) => "committed",
            Outcome::RolledBack(_) => "rolled back",
        }
    }

    /// The SCN it ended at, if it did.
    pub fn ended_scn(&self) -> Option<u64> {
        match self.outcome {
            Outcome::Open => None,
            Outcome::Committed(s) | Outcome::RolledBack(s) => Some(s),
        }
    }

    /// From a row of `SITESYNC_ABANDONED_TX` read as text: XID, start SCN,
    /// rows, abandoned-at SCN, outcome, ended-at SCN.
    pub fn from_text(row: &[Option<String>]) -> Result<Abandoned, String> {
        let text = |i: usize| row.get(i).and_then(|c| c.as_deref()).map(str::trim);
        let num = |i: usize, what: &str| -> Result<u64, String> {
            text(i)
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| format!("{what} is missing or not a number in {row:?}"))
        };
        let xid = text(0)
            .filter(|x| !x.is_empty())
            .ok_or_else(|| format!("the XID is missing in {row:?}"))?
            .to_string();
        let outcome = match text(4) {
            Some("open") => Outcome::Open,
            Some("committed") => Outcome::Committed(num(5, "ENDED_AT_SCN")?),
            Some("rolled back") => Outcome::RolledBack(num(5, "ENDED_AT_SCN")?),
            other => return Err(format!("unknown OUTCOME {other:?} in {row:?}")),
        };
        Ok(Abandoned {
            xid,
            first_scn: num(1, "START_SCN")?,
            rows: num(2, "ROWS_DROPPED")?,
            at_scn: num(3, "ABANDONED_AT_SCN")?,
            outcome,
        })
    }
}

/// The transactions open when the session started: `V$TRANSACTION`'s XIDs,
/// read before `scn` (`V$DATABASE.CURRENT_SCN`). A COMMIT after `scn` of a
/// transaction neither among them nor seen starting was missed in part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenAtStart {
    pub scn: u64,
    pub xids: HashSet<String>,
}

/// The pure state machine between LogMiner rows and [`Change`]s.
#[derive(Debug)]
pub struct Transactions {
    owner: String,
    table: String,
    open: HashMap<String, Tx>,
    /// Committed in the current window: `(commit SCN, XID)` → rows.
    committed: BTreeMap<(u64, String), Tx>,
    /// Rows before this position were done in an earlier session.
    skip_before: Option<Position>,
    /// The last resume point yielded: nothing goes backward.
    last: Option<Position>,
    /// Every row with `SCN <= mined_to` has been fed.
    mined_to: u64,
    bytes: usize,
    max_bytes: usize,
    /// Undecodable changes to the outbox seen (`OPERATION_CODE` 255).
    unsupported: u64,
    /// XIDs whose START was mined and whose end was not yet.
    started: HashSet<String>,
    /// `None`: `V$TRANSACTION` was not readable, unmatched commits are
    /// not told apart from transactions older than the session.
    open_at_start: Option<OpenAtStart>,
    /// Commits of transactions never seen starting (see the module docs).
    unmatched_commits: u64,
    /// `database.transaction_retention` in seconds; `None`: never abandon.
    retention: Option<i64>,
    /// The latest redo time mined.
    clock: Option<i64>,
    /// Abandoned transactions not known to have ended.
    abandoned: HashMap<String, Abandoned>,
    /// Records to write for the operator, oldest first.
    notes: Vec<Abandoned>,
    abandoned_total: u64,
    abandoned_committed: u64,
    /// Outbox rows made row errors because their value was out of line,
    /// changed after the insert, or split and never completed.
    unreadable_rows: u64,
}

impl Transactions {
    /// `outbox` as LogMiner names it (`SEG_OWNER`, `TABLE_NAME`: upper
    /// case unless created quoted). Mining resumes at `resume`'s
    /// `mine_from` (or its SCN), else at `start_scn`.
    pub fn new(
        outbox: (String, String),
        resume: Option<Position>,
        start_scn: u64,
        max_bytes: usize,
    ) -> Transactions {
        let first = match &resume {
            Some(p) => p.mine_from.unwrap_or(p.scn),
            None => start_scn,
        };
        Transactions {
            owner: outbox.0,
            table: outbox.1,
            open: HashMap::new(),
            committed: BTreeMap::new(),
            skip_before: resume.clone(),
            last: resume,
            mined_to: first.saturating_sub(1),
            bytes: 0,
            unsupported: 0,
            max_bytes,
            started: HashSet::new(),
            open_at_start: None,
            unmatched_commits: 0,
            retention: None,
            clock: None,
            abandoned: HashMap::new(),
            notes: Vec::new(),
            abandoned_total: 0,
            abandoned_committed: 0,
            unreadable_rows: 0,
        }
    }

    /// Abandons open transactions older than `retention` (zero: never).
    pub fn with_retention(mut self, retention: std::time::Duration) -> Transactions {
        let secs = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        self.retention = (secs > 0).then_some(secs);
        self
    }

    /// The transactions open when the session started (`None`: unknown).
    pub fn set_open_at_start(&mut self, open: Option<OpenAtStart>) {
        self.open_at_start = open;
    }

    /// Transactions abandoned by an earlier session and not known to have
    /// ended: their rows are ignored and their end is recorded.
    pub fn set_abandoned(&mut self, earlier: Vec<Abandoned>) {
        for a in earlier {
            if a.outcome == Outcome::Open {
                self.abandoned.insert(a.xid.clone(), a);
            }
        }
    }

    /// Every row with an SCN up to this one has been fed: the next window
    /// starts after it.
    pub fn mined_to(&self) -> u64 {
        self.mined_to
    }

    /// The first SCN of the oldest open transaction with outbox rows.
    pub fn oldest_open(&self) -> Option<u64> {
        self.open.values().map(|t| t.first_scn).min()
    }

    /// How many transactions with outbox rows are open.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    fn is_outbox(&self, row: &MinedRow) -> bool {
        row.seg_owner.as_deref() == Some(self.owner.as_str())
            && row.table_name.as_deref() == Some(self.table.as_str())
    }

    /// Changes to the outbox LogMiner could not decode, so far.
    pub fn unsupported(&self) -> u64 {
        self.unsupported
    }

    /// Commits of transactions whose start was never mined and that were
    /// not open when the session started, so far (see the module docs).
    pub fn unmatched_commits(&self) -> u64 {
        self.unmatched_commits
    }

    /// Transactions abandoned past the retention, so far.
    pub fn abandoned_total(&self) -> u64 {
        self.abandoned_total
    }

    /// Abandoned transactions that then committed (their events lost).
    pub fn abandoned_committed(&self) -> u64 {
        self.abandoned_committed
    }

    /// Outbox rows sent as row errors because their `DATA` was not whole
    /// in the INSERT's redo, so far.
    pub fn unreadable_rows(&self) -> u64 {
        self.unreadable_rows
    }

    /// The records of abandoned transactions since the last call, to
    /// write to `SITESYNC_ABANDONED_TX`.
    pub fn take_notes(&mut self) -> Vec<Abandoned> {
        std::mem::take(&mut self.notes)
    }

    /// Feeds one row of the current window.
    pub fn feed(&mut self, row: MinedRow) -> Result<(), SourceError> {
        if let Some(t) = row.time {
            self.clock = Some(self.clock.map_or(t, |c| c.max(t)));
        }
        if self.is_outbox(&row) && self.abandoned.contains_key(&row.xid) {
            if row.operation_code == op::INSERT && !row.csf {
                if let Some(a) = self.abandoned.get_mut(&row.xid) {
                    a.rows += 1;
                    self.notes.push(a.clone());
                }
                tracing::warn!(xid = %row.xid, scn = row.scn, "an outbox insert of an abandoned transaction is ignored");
            }
            return Ok(());
        }
        match row.operation_code {
            op::INSERT if self.is_outbox(&row) => self.insert(row),
            op::DELETE if row.rollback && self.is_outbox(&row) => {
                self.undo(&row);
                Ok(())
            }
            op::UPDATE
            | op::SEL_LOB_LOCATOR
            | op::LOB_WRITE
            | op::LOB_TRIM
            | op::LOB_ERASE
            | op::EXTENDED_BEGIN
            | op::EXTENDED_WRITE
            | op::EXTENDED_END
                if self.is_outbox(&row) =>
            {
                self.out_of_line(&row);
                Ok(())
            }
            op::START => {
                self.started.insert(row.xid);
                Ok(())
            }
            op::COMMIT => {
                let started = self.started.remove(&row.xid);
                if let Some(mut tx) = self.open.remove(&row.xid) {
                    close_pending(&mut tx, &row, &mut self.unreadable_rows);
                    self.committed.insert((row.scn, row.xid), tx);
                } else if let Some(mut a) = self.abandoned.remove(&row.xid) {
                    a.outcome = Outcome::Committed(row.scn);
                    self.abandoned_committed += 1;
                    tracing::error!(
                        xid = %a.xid,
                        start_scn = a.first_scn,
                        rows = a.rows,
                        commit_scn = row.scn,
                        "a transaction abandoned past database.transaction_retention has COMMITTED: its outbox rows were not published and their events are lost to the other sites; re-create them in the outbox if they matter (`sitesync status` lists it)"
                    );
                    self.notes.push(a);
                } else if !started {
                    self.unmatched(&row);
                }
                Ok(())
            }
            op::ROLLBACK => {
                self.started.remove(&row.xid);
                if let Some(tx) = self.open.remove(&row.xid) {
                    self.bytes -= tx.bytes;
                } else if let Some(mut a) = self.abandoned.remove(&row.xid) {
                    a.outcome = Outcome::RolledBack(row.scn);
                    tracing::info!(xid = %a.xid, scn = row.scn, "an abandoned transaction rolled back: nothing was lost");
                    self.notes.push(a);
                }
                Ok(())
            }
            // A change to the outbox LogMiner could not decode: it may be
            // an insert whose event is then missing. Said loudly and
            // counted, never passed over in silence.
            op::UNSUPPORTED if self.is_outbox(&row) => {
                self.unsupported += 1;
                tracing::error!(
                    xid = %row.xid,
                    scn = row.scn,
                    rs_id = %row.rs_id,
                    row_id = row.row_id.as_deref().unwrap_or(""),
                    total = self.unsupported,
                    "LogMiner could not decode a change to the outbox (OPERATION_CODE 255, UNSUPPORTED): if it was an insert, its event is lost; check supplemental logging on the outbox (`sitesync check`) and that its columns have supported types"
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A COMMIT of a transaction with nothing buffered whose START was
    /// never mined: if it started after the session (it was not open
    /// then), its start and any outbox insert were in redo that a window
    /// passed over (written late, e.g. by another RAC instance's log
    /// writer). Counted and logged; the rows cannot be read any more.
    fn unmatched(&mut self, row: &MinedRow) {
        let Some(open) = &mut self.open_at_start else {
            return;
        };
        if open.xids.remove(&row.xid) || row.scn <= open.scn {
            return;
        }
        self.unmatched_commits += 1;
        tracing::warn!(
            xid = %row.xid,
            commit_scn = row.scn,
            total = self.unmatched_commits,
            "a transaction committed whose start was never mined, though it was not open when this session started: part of its redo was written after the window that covered it (a redo thread written late). If it inserted into the outbox, those events are lost; compare the outbox with the other sites"
        );
    }

    /// A change that makes the buffered insert of its row unpublishable:
    /// a value written out of line, or an UPDATE after the insert.
    fn out_of_line(&mut self, row: &MinedRow) {
        let Some(tx) = self.open.get_mut(&row.xid) else {
            tracing::warn!(
                xid = %row.xid,
                scn = row.scn,
                operation_code = row.operation_code,
                row_id = row.row_id.as_deref().unwrap_or(""),
                "a change to an outbox row outside any buffered insert (an UPDATE or LOB write of a row inserted earlier): sitesync publishes inserts only, so it is not published"
            );
            return;
        };
        let reason = match row.operation_code {
            op::UPDATE => format!(
                "the row was updated (UPDATE at SCN {}) after its INSERT in the same transaction; sitesync publishes the INSERT's values only and does not publish a stale event. Write outbox rows once, with their final values",
                row.scn
            ),
            op::EXTENDED_BEGIN | op::EXTENDED_WRITE | op::EXTENDED_END => format!(
                "DATA is longer than 4,000 bytes in an extended VARCHAR2 column (MAX_STRING_SIZE = EXTENDED), which LogMiner writes out of line (32K_BEGIN/32K_WRITE at SCN {}); sitesync reads DATA only from the INSERT, so the event is not published. DATA must be VARCHAR2(4000 BYTE): `sitesync check` says so; keep payloads under 4,000 bytes",
                row.scn
            ),
            _ => format!(
                "DATA was written out of line (LOB operation, OPERATION_CODE {} at SCN {}): a CLOB over ~4,000 bytes is not in the INSERT's SQL_REDO and sitesync does not reassemble LOB writes, so the event is not published. DATA must be VARCHAR2(4000 BYTE): `sitesync check` says so; keep payloads under 4,000 bytes",
                row.operation_code, row.scn
            ),
        };
        // LogMiner may write a LOB row's INSERT and its LOB operations
        // with an empty ROW_ID: without a match, the latest insert of the
        // transaction (LOB writes follow their INSERT) is the one.
        let by_id = row
            .row_id
            .as_deref()
            .filter(|id| !id.is_empty() && !id.bytes().all(|b| b == b'A'))
            .and_then(|id| {
                tx.rows
                    .iter()
                    .rposition(|r| r.row_id.as_deref() == Some(id))
            });
        let Some(i) = by_id.or_else(|| tx.rows.len().checked_sub(1)) else {
            return;
        };
        let target = &mut tx.rows[i];
        if target.problem.is_none() {
            self.unreadable_rows += 1;
            tracing::error!(
                xid = %row.xid,
                scn = row.scn,
                row_id = target.row_id.as_deref().unwrap_or(""),
                "an outbox row cannot be published whole: {reason}"
            );
            target.problem = Some(reason);
        }
    }

    /// A `ROLLBACK = 1` delete: removes the buffered insert of its
    /// `ROW_ID`. When the insert was mined in an earlier LogMiner session
    /// (an earlier window: every window is a new session), LogMiner cannot
    /// link the undo to the transaction's sequence and writes its XID with
    /// the sequence `FFFFFFFF`; the transaction is then found by the XID's
    /// first 8 hex digits (undo segment and slot), as Debezium does
    /// (`AbstractLogMinerEventProcessor.removeEventWithRowId`).
    fn undo(&mut self, row: &MinedRow) {
        let Some(row_id) = row.row_id.as_deref() else {
            return;
        };
        let remove = |tx: &mut Tx| -> Option<usize> {
            let i = tx
                .rows
                .iter()
                .rposition(|r| r.row_id.as_deref() == Some(row_id))?;
            let gone = tx.rows.remove(i);
            tx.bytes -= gone.sql.len();
            Some(gone.sql.len())
        };
        let mut freed = self.open.get_mut(&row.xid).and_then(remove);
        if freed.is_none()
            && let Some(prefix) = no_sequence_prefix(&row.xid)
        {
            // Open transactions sharing the undo slot: the newest first
            // (a slot is reused only after its transaction ended).
            let mut candidates: Vec<(&String, &mut Tx)> = self
                .open
                .iter_mut()
                .filter(|(x, _)| x.len() == 16 && x[..8].eq_ignore_ascii_case(prefix))
                .collect();
            candidates.sort_by_key(|(_, t)| std::cmp::Reverse(t.first_scn));
            freed = candidates.into_iter().find_map(|(_, t)| remove(t));
        }
        match freed {
            Some(n) => self.bytes -= n,
            None => tracing::debug!(
                xid = %row.xid,
                row_id,
                rs_id = %row.rs_id,
                "an undo (ROLLBACK = 1) on the outbox matched no buffered insert"
            ),
        }
    }

    fn insert(&mut self, row: MinedRow) -> Result<(), SourceError> {
        let text = row.sql_redo.unwrap_or_default();
        let tx = self.open.entry(row.xid.clone()).or_insert_with(|| Tx {
            first_scn: row.scn,
            first_time: row.time,
            rows: Vec::new(),
            fragments: Fragments::default(),
            bytes: 0,
        });
        tx.bytes += text.len();
        self.bytes += text.len();
        if let Some(sql) = tx.fragments.push(&text, row.csf) {
            tx.rows.push(BufferedRow {
                row_id: row.row_id,
                sql,
                problem: None,
            });
        }
        if self.bytes > self.max_bytes {
            let (xid, biggest) = self
                .open
                .iter()
                .max_by_key(|(_, t)| t.bytes)
                .map(|(x, t)| (x.clone(), t))
                .expect("a transaction was just added");
            return Err(SourceError::operator(
                Cause::Limit,
                format!(
                    "open transactions hold {} MiB of outbox inserts, over database.max_buffered_mib ({} MiB); the largest is XID {xid} with {} rows ({} MiB) since SCN {}. Raise database.max_buffered_mib (memory permitting) and restart, or split such transactions in the application",
                    self.bytes >> 20,
                    self.max_bytes >> 20,
                    biggest.rows.len(),
                    biggest.bytes >> 20,
                    biggest.first_scn
                ),
            ));
        }
        Ok(())
    }

    /// Drops the open transactions whose first outbox row is older than
    /// the retention by the redo clock (see the module docs); `hi` is the
    /// window's end.
    fn abandon_expired(&mut self, hi: u64) {
        let (Some(retention), Some(now)) = (self.retention, self.clock) else {
            return;
        };
        let mut expired: Vec<(u64, String)> = self
            .open
            .iter()
            .filter(|(_, t)| {
                t.first_time
                    .is_some_and(|ft| now.saturating_sub(ft) > retention)
            })
            .map(|(x, t)| (t.first_scn, x.clone()))
            .collect();
        expired.sort();
        for (_, xid) in expired {
            let Some(tx) = self.open.remove(&xid) else {
                continue;
            };
            self.bytes -= tx.bytes;
            self.abandoned_total += 1;
            let age = tx.first_time.map_or(0, |ft| now - ft);
            let rows = tx.rows.len() as u64 + u64::from(tx.fragments.is_pending());
            tracing::warn!(
                xid = %xid,
                start_scn = tx.first_scn,
                rows,
                age_secs = age,
                retention_secs = retention,
                total = self.abandoned_total,
                "abandoning a transaction open longer than database.transaction_retention: it no longer holds back the SCN mining restarts from; its {rows} buffered outbox row(s) are dropped and, if it ever commits, its events are lost (logged as an error). An in-doubt distributed transaction is resolved with COMMIT FORCE or ROLLBACK FORCE (DBA_2PC_PENDING); `sitesync status` lists it"
            );
            let a = Abandoned {
                xid: xid.clone(),
                first_scn: tx.first_scn,
                rows,
                at_scn: hi,
                outcome: Outcome::Open,
            };
            self.notes.push(a.clone());
            self.abandoned.insert(xid, a);
        }
    }

    /// Whether `p` is before the last resume point yielded or the resume
    /// position of the session (rows there were done). Compared on
    /// `(scn, index)` only: `mine_from` says where to read, not what is
    /// done.
    fn behind(&self, p: &Position) -> bool {
        let k = key(p);
        self.last.as_ref().is_some_and(|l| k < key(l))
            || self.skip_before.as_ref().is_some_and(|s| k < key(s))
    }

    /// Strictly past everything yielded (for heartbeats, which must move).
    fn ahead(&self, p: &Position) -> bool {
        let k = key(p);
        self.last.as_ref().is_none_or(|l| k > key(l))
            && self.skip_before.as_ref().is_none_or(|s| k > key(s))
    }

    /// Ends the window: every row with `SCN <= hi` has been fed. Returns
    /// the window's changes in commit order, then a heartbeat.
    pub fn end_window(&mut self, hi: u64) -> Vec<Change<Position>> {
        self.abandon_expired(hi);
        let mut out = Vec::new();
        let committed = std::mem::take(&mut self.committed);
        let oldest_open = self.oldest_open();
        // `mine_from` must let a restart re-read every row not done *and*
        // every transaction committing at the same SCN as one not done, or
        // the `index` counted across them would shift. So a position in a
        // group of same-SCN commits mines from the oldest first SCN of the
        // whole group, of every later group and of the open transactions.
        let keys: Vec<u64> = committed.keys().map(|(scn, _)| *scn).collect();
        let firsts: Vec<u64> = committed.values().map(|t| t.first_scn).collect();
        let mut suffix_min = vec![u64::MAX; firsts.len() + 1];
        for i in (0..firsts.len()).rev() {
            suffix_min[i] = suffix_min[i + 1].min(firsts[i]);
        }
        let mut group_start = vec![0; keys.len()];
        for i in 1..keys.len() {
            group_start[i] = if keys[i] == keys[i - 1] {
                group_start[i - 1]
            } else {
                i
            };
        }
        let floor = oldest_open.unwrap_or(u64::MAX).min(hi.saturating_add(1));
        let mine_from = |i: usize| -> u64 { suffix_min[i].min(floor) };
        // After transaction `i`: its group is done only if the next one
        // commits later.
        let after = |i: usize| -> u64 {
            if keys.get(i + 1) == keys.get(i) {
                mine_from(group_start[i])
            } else {
                mine_from(i + 1)
            }
        };
        let mut group_scn = None;
        let mut index = 0u32;
        for (i, ((scn, _xid), tx)) in committed.into_iter().enumerate() {
            self.bytes -= tx.bytes;
            if group_scn != Some(scn) {
                group_scn = Some(scn);
                index = 0;
            }
            let from = mine_from(group_start[i]);
            let n = tx.rows.len();
            for row in tx.rows {
                let position = Position {
                    scn,
                    index,
                    mine_from: Some(from),
                };
                index += 1;
                if self.behind(&position) {
                    continue;
                }
                self.last = Some(position.next_row());
                out.push(Change::Row {
                    position,
                    row: match row.problem {
                        Some(why) => Err(RowError::Undecodable(why)),
                        None => self.decode(&row.sql),
                    },
                });
            }
            let resume = Position {
                scn,
                index,
                mine_from: Some(after(i)),
            };
            if n > 0 && !self.behind(&resume) {
                self.last = Some(resume.clone());
                out.push(Change::Commit { resume });
            }
        }
        self.mined_to = self.mined_to.max(hi);
        let beat = Position {
            scn: hi.saturating_add(1),
            index: 0,
            mine_from: Some(mine_from(keys.len())),
        };
        if self.ahead(&beat) {
            self.last = Some(beat.clone());
            out.push(Change::Heartbeat { resume: beat });
        }
        out
    }

    /// One joined `SQL_REDO` → the outbox row, or why it cannot be.
    fn decode(&self, sql: &str) -> Result<OutboxRow, RowError> {
        let insert = parse_insert(sql).map_err(|e| RowError::Undecodable(e.to_string()))?;
        if !insert
            .columns
            .iter()
            .any(|(c, _)| c.eq_ignore_ascii_case("data"))
        {
            // A LOB column LogMiner writes by separate LOB operations can be
            // left out of the INSERT; sitesync reads no LOB operations.
            return Err(RowError::Undecodable(format!(
                "the INSERT's SQL_REDO has no DATA column (columns: {}): a CLOB DATA written by separate LOB operations is not read; DATA must be VARCHAR2(4000 BYTE) (`sitesync check` says so; `sitesync init` creates it so)",
                insert
                    .columns
                    .iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let field = |name: &str| -> Result<Option<String>, RowError> {
            match insert
                .columns
                .iter()
                .find(|(c, _)| c.eq_ignore_ascii_case(name))
            {
                None => Ok(None),
                Some((c, v)) => {
                    to_text(v).map_err(|e| RowError::Undecodable(format!("column {c}: {e}")))
                }
            }
        };
        Ok(OutboxRow {
            id: field("id")?,
            created_at: field("created_at")?,
            origin: field("origin")?,
            kind: field("type")?,
            entity_key: field("entity_key")?,
            data: field("data")?,
            // V$LOGMNR_CONTENTS.TIMESTAMP is a DATE (whole seconds): the
            // outbox's created_at (SYSTIMESTAMP, microseconds) stands in.
            commit_time: None,
        })
    }
}

/// At the COMMIT of `tx`: a statement split over several rows (`CSF = 1`)
/// whose last part never came cannot be assembled; it becomes a row error
/// in its place (dead-letter queue), never a guess.
fn close_pending(tx: &mut Tx, commit: &MinedRow, unreadable: &mut u64) {
    let Some(partial) = tx.fragments.take_pending() else {
        return;
    };
    *unreadable += 1;
    let why = format!(
        "the INSERT's SQL_REDO was split over several rows (CSF = 1) and its last part never came before the COMMIT at SCN {} (RS_ID {}): the statement cannot be assembled, so the event is not published ({} bytes read)",
        commit.scn,
        commit.rs_id.trim(),
        partial.len()
    );
    tracing::error!(xid = %commit.xid, scn = commit.scn, "an outbox row cannot be published whole: {why}");
    tx.rows.push(BufferedRow {
        row_id: None,
        sql: partial,
        problem: Some(why),
    });
}

/// The undo-segment-and-slot prefix of an XID written without its
/// sequence (`RAWTOHEX(XID)` ending in `FFFFFFFF`).
fn no_sequence_prefix(xid: &str) -> Option<&str> {
    (xid.len() == 16 && xid.is_ascii() && xid[8..].eq_ignore_ascii_case("FFFFFFFF"))
        .then(|| &xid[..8])
}

/// What a position says is done: `(commit SCN, index)`.
fn key(p: &Position) -> (u64, u32) {
    (p.scn, p.index)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const ID: &str = "7f1d8a5e-3c2b-4a8e-9f00-0123456789ab";

    pub(crate) fn insert_sql(kind: &str) -> String {
        format!(
            "insert into \"SITESYNC\".\"OUTBOX\"(\"ID\",\"CREATED_AT\",\"ORIGIN\",\"TYPE\",\"ENTITY_KEY\",\"DATA\") values ('{ID}',TO_TIMESTAMP_TZ('2026-11-23 16:11:28.123456 +00:00'),'PARIS','{kind}',NULL,'{{\"n\":1}}');"
        )
    }

    fn base(scn: u64, xid: &str, op: u32) -> MinedRow {
        MinedRow {
            scn,
            xid: xid.into(),
            operation_code: op,
            csf: false,
            rollback: false,
            seg_owner: None,
            table_name: None,
            row_id: None,
            sql_redo: None,
            rs_id: format!(" 0x00000a.{scn:08x}.0010 "),
            ssn: 0,
            time: Some(scn as i64),
        }
    }

    pub(crate) fn ins(scn: u64, xid: &str, kind: &str) -> MinedRow {
        MinedRow {
            seg_owner: Some("SITESYNC".into()),
            table_name: Some("OUTBOX".into()),
            row_id: Some(format!("AAAR{scn}{kind}")),
            sql_redo: Some(insert_sql(kind)),
            ..base(scn, xid, op::INSERT)
        }
    }

    pub(crate) fn commit(scn: u64, xid: &str) -> MinedRow {
        base(scn, xid, op::COMMIT)
    }

    pub(crate) fn rollback(scn: u64, xid: &str) -> MinedRow {
        base(scn, xid, op::ROLLBACK)
    }

    pub(crate) fn start(scn: u64, xid: &str) -> MinedRow {
        base(scn, xid, op::START)
    }

    fn other_table(scn: u64, xid: &str) -> MinedRow {
        MinedRow {
            seg_owner: Some("APP".into()),
            table_name: Some("CUSTOMER".into()),
            sql_redo: Some("insert into \"APP\".\"CUSTOMER\"(\"ID\") values ('1');".into()),
            ..base(scn, xid, op::INSERT)
        }
    }

    fn pos(scn: u64, index: u32, from: u64) -> Position {
        Position {
            scn,
            index,
            mine_from: Some(from),
        }
    }

    fn machine(resume: Option<Position>) -> Transactions {
        Transactions::new(("SITESYNC".into(), "OUTBOX".into()), resume, 100, 1 << 20)
    }

    fn window(t: &mut Transactions, rows: Vec<MinedRow>, hi: u64) -> Vec<String> {
        for r in rows {
            t.feed(r).unwrap();
        }
        t.end_window(hi).iter().map(describe).collect()
    }

    pub(crate) fn describe(c: &Change<Position>) -> String {
        match c {
            Change::Row { position, row } => match row {
                Ok(r) => format!("row {position} {}", r.kind.as_deref().unwrap_or("?")),
                Err(e) => format!("bad {position} {e}"),
            },
            Change::Commit { resume } => format!("commit {resume}"),
            Change::Heartbeat { resume } => format!("beat {resume}"),
        }
    }

    #[test]
    fn rows_come_out_at_commit_in_commit_order_and_rollbacks_vanish() {
        let mut t = machine(None);
        let out = window(
            &mut t,
            vec![
                start(101, "A"),
                ins(101, "A", "a1"),
                ins(102, "B", "b1"),
                other_table(103, "B"),
                ins(104, "C", "gone"),
                ins(105, "A", "a2"),
                commit(106, "B"),
                rollback(107, "C"),
                commit(108, "A"),
                commit(109, "D"),
            ],
            110,
        );
        assert_eq!(
            out,
            vec![
                "row oracle:106#0@101 b1",
                "commit oracle:106#1@101",
                "row oracle:108#0@101 a1",
                "row oracle:108#1@101 a2",
                "commit oracle:108#2@111",
                "beat oracle:111#0@111",
            ]
        );
        let Change::Row { row: Ok(row), .. } = &machine(None).decoded_for_test() else {
            panic!()
        };
        assert_eq!(row.id.as_deref(), Some(ID));
        assert_eq!(
            row.created_at.as_deref(),
            Some("2026-11-23T16:11:28.123456+00:00")
        );
        assert_eq!(row.data.as_deref(), Some("{\"n\":1}"));
        assert_eq!(row.entity_key, None);
    }

    #[test]
    fn an_undecodable_change_to_the_outbox_is_counted_not_passed_over_in_silence() {
        let mut t = machine(None);
        let unsupported = MinedRow {
            seg_owner: Some("SITESYNC".into()),
            table_name: Some("OUTBOX".into()),
            sql_redo: Some("Unsupported".into()),
            ..base(102, "B", op::UNSUPPORTED)
        };
        let elsewhere = MinedRow {
            seg_owner: Some("APP".into()),
            table_name: Some("CUSTOMER".into()),
            ..base(103, "B", op::UNSUPPORTED)
        };
        let out = window(
            &mut t,
            vec![
                ins(101, "B", "b1"),
                unsupported,
                elsewhere,
                commit(104, "B"),
            ],
            105,
        );
        assert_eq!(t.unsupported(), 1, "only the outbox's own change counts");
        assert_eq!(out[0], "row oracle:104#0@101 b1", "the rest keeps flowing");
    }

    #[test]
    fn same_scn_commits_are_ordered_by_xid_and_counted_together() {
        // Whatever order the redo gives them in.
        for order in [["X2", "X1"], ["X1", "X2"]] {
            let mut t = machine(None);
            let out = window(
                &mut t,
                vec![
                    ins(101, "X2", "second"),
                    ins(102, "X1", "first"),
                    commit(105, order[0]),
                    commit(105, order[1]),
                ],
                105,
            );
            assert_eq!(
                out,
                vec![
                    "row oracle:105#0@101 first",
                    "commit oracle:105#1@101",
                    "row oracle:105#1@101 second",
                    "commit oracle:105#2@106",
                    "beat oracle:106#0@106",
                ]
            );
        }
    }

    #[test]
    fn a_window_ending_mid_transaction_carries_it_and_holds_mine_from_back() {
        let mut t = machine(None);
        let out = window(
            &mut t,
            vec![ins(101, "A", "a1"), ins(102, "B", "b1"), commit(103, "B")],
            104,
        );
        // A is open: every position keeps mining from A's first SCN.
        assert_eq!(
            out,
            vec![
                "row oracle:103#0@101 b1",
                "commit oracle:103#1@101",
                "beat oracle:105#0@101",
            ]
        );
        assert_eq!(t.oldest_open(), Some(101));
        assert_eq!(t.mined_to(), 104);
        let out = window(&mut t, vec![ins(106, "A", "a2"), commit(107, "A")], 110);
        assert_eq!(
            out,
            vec![
                "row oracle:107#0@101 a1",
                "row oracle:107#1@101 a2",
                "commit oracle:107#2@111",
                "beat oracle:111#0@111",
            ]
        );
        assert_eq!(t.open_count(), 0);
    }

    #[test]
    fn a_restart_rereads_from_mine_from_and_skips_what_was_done() {
        // The first session crashed after row 0 of the transaction at 107
        // (position oracle:107#1@101), with B (103) fully done.
        let resume = pos(107, 1, 101);
        let mut t = machine(Some(resume));
        assert_eq!(t.mined_to(), 100, "mining restarts at SCN 101");
        let out = window(
            &mut t,
            vec![
                ins(101, "A", "a1"),
                ins(102, "B", "b1"),
                commit(103, "B"),
                ins(106, "A", "a2"),
                commit(107, "A"),
            ],
            110,
        );
        assert_eq!(
            out,
            vec![
                "row oracle:107#1@101 a2",
                "commit oracle:107#2@111",
                "beat oracle:111#0@111",
            ]
        );
    }

    #[test]
    fn a_split_statement_is_joined_and_a_partial_rollback_removes_its_insert() {
        let mut t = machine(None);
        let sql = insert_sql("split");
        let (a, b) = sql.split_at(50);
        let mut first = ins(101, "A", "split");
        first.sql_redo = Some(a.into());
        first.csf = true;
        let mut second = ins(101, "A", "split");
        second.sql_redo = Some(b.into());
        let mut undone = ins(102, "A", "undone");
        undone.row_id = Some("ROW-U".into());
        let mut undo = ins(103, "A", "");
        undo.operation_code = op::DELETE;
        undo.rollback = true;
        undo.row_id = Some("ROW-U".into());
        undo.sql_redo = Some("delete from \"SITESYNC\".\"OUTBOX\" where ROWID = 'ROW-U';".into());
        let out = window(
            &mut t,
            vec![first, second, undone, undo, commit(104, "A")],
            104,
        );
        assert_eq!(
            out,
            vec![
                "row oracle:104#0@101 split",
                "commit oracle:104#1@105",
                "beat oracle:105#0@105"
            ]
        );
    }

    #[test]
    fn an_undo_in_a_later_window_finds_its_transaction_without_the_sequence() {
        // LogMiner writes an undo's XID with sequence FFFFFFFF when the
        // change it undoes was mined in an earlier session (window).
        let xid = "0A001B00C4010000";
        let mut t = machine(None);
        let mut kept = ins(101, xid, "kept");
        kept.row_id = Some("ROW-K".into());
        let mut undone = ins(102, xid, "undone");
        undone.row_id = Some("ROW-U".into());
        // Another open transaction in another slot: untouched.
        let mut other = ins(103, "0B000200C5010000", "other");
        other.row_id = Some("ROW-U".into());
        assert_eq!(
            window(&mut t, vec![kept, undone, other], 104),
            vec!["beat oracle:105#0@101"]
        );
        let mut undo = ins(106, "0a001b00ffffffff", "");
        undo.operation_code = op::DELETE;
        undo.rollback = true;
        undo.row_id = Some("ROW-U".into());
        let out = window(
            &mut t,
            vec![undo, commit(107, xid), commit(108, "0B000200C5010000")],
            110,
        );
        assert_eq!(
            out,
            vec![
                "row oracle:107#0@101 kept",
                "commit oracle:107#1@103",
                "row oracle:108#0@103 other",
                "commit oracle:108#1@111",
                "beat oracle:111#0@111",
            ]
        );
        assert_eq!(t.bytes, 0, "the buffer's byte count is back to zero");
        assert_eq!(no_sequence_prefix("0A001B00FFFFFFFF"), Some("0A001B00"));
        assert_eq!(no_sequence_prefix("0A001B00C4010000"), None);
        assert_eq!(no_sequence_prefix("ÿÿ"), None);
    }

    #[test]
    fn an_unparsable_insert_is_a_row_error_at_its_position() {
        let mut t = machine(None);
        let mut bad = ins(101, "A", "x");
        bad.sql_redo =
            Some("insert into \"SITESYNC\".\"OUTBOX\"(\"ID\") values (Unsupported Type);".into());
        let out = window(
            &mut t,
            vec![bad, ins(102, "A", "ok"), commit(103, "A")],
            103,
        );
        assert!(out[0].starts_with("bad oracle:103#0@101"), "{out:?}");
        assert!(out[0].contains("at byte"), "{out:?}");
        assert_eq!(out[1], "row oracle:103#1@101 ok");
        // An out-of-row CLOB: EMPTY_CLOB() in the INSERT, or no DATA at all.
        let mut t = machine(None);
        let mut empty = ins(101, "A", "x");
        empty.sql_redo = Some(insert_sql("x").replace("'{\"n\":1}'", "EMPTY_CLOB()"));
        let mut missing = ins(102, "A", "x");
        missing.sql_redo =
            Some("insert into \"SITESYNC\".\"OUTBOX\"(\"ID\",\"TYPE\") values ('x','t');".into());
        let out = window(&mut t, vec![empty, missing, commit(103, "A")], 103);
        assert!(out[0].starts_with("bad oracle:103#0@101"), "{out:?}");
        assert!(out[0].contains("out of row"), "{out:?}");
        assert!(out[1].starts_with("bad oracle:103#1@101"), "{out:?}");
        assert!(out[1].contains("no DATA column"), "{out:?}");
    }

    /// A change of `op` to the outbox row `row_id` in `xid`.
    fn outbox_op(scn: u64, xid: &str, op: u32, row_id: &str) -> MinedRow {
        MinedRow {
            seg_owner: Some("SITESYNC".into()),
            table_name: Some("OUTBOX".into()),
            row_id: Some(row_id.into()),
            sql_redo: Some("DECLARE loc_c CLOB; buf_c VARCHAR2(6174); BEGIN NULL; END;".into()),
            ..base(scn, xid, op)
        }
    }

    #[test]
    fn defect_7_an_insert_whose_data_is_not_whole_in_its_redo_goes_to_the_dead_letter_path() {
        let mut t = machine(None);
        // A: a CLOB DATA written out of line, INSERT and LOB operations
        // with an empty ROW_ID as LogMiner writes them.
        let empty = "AAAAAAAAAAAAAAAAAA";
        let mut lob = ins(101, "A", "lob");
        lob.row_id = Some(empty.into());
        lob.sql_redo = Some(insert_sql("lob").replace("'{\"n\":1}'", "EMPTY_CLOB()"));
        // B: an extended VARCHAR2 over 4,000 bytes: the INSERT holds a
        // value that parses and would publish, but is not what was
        // written (32K_BEGIN/32K_WRITE follow).
        let mut ext = ins(111, "B", "extended");
        ext.row_id = Some("ROW-B".into());
        // C: a statement split over CSF rows whose last part never came.
        let mut split = ins(121, "C", "split");
        split.sql_redo = Some(insert_sql("split")[..60].to_string());
        split.csf = true;
        // D: updated after its insert, in the same transaction.
        let mut upd = ins(131, "D", "updated");
        upd.row_id = Some("ROW-D".into());
        let out = window(
            &mut t,
            vec![
                lob,
                outbox_op(102, "A", op::SEL_LOB_LOCATOR, empty),
                outbox_op(102, "A", op::LOB_WRITE, empty),
                ins(103, "A", "fine"),
                commit(104, "A"),
                ext,
                outbox_op(112, "B", op::EXTENDED_BEGIN, "ROW-B"),
                outbox_op(112, "B", op::EXTENDED_WRITE, "ROW-B"),
                outbox_op(112, "B", op::EXTENDED_END, "ROW-B"),
                commit(114, "B"),
                split,
                commit(124, "C"),
                upd,
                outbox_op(132, "D", op::UPDATE, "ROW-D"),
                commit(134, "D"),
            ],
            140,
        );
        assert!(out[0].starts_with("bad oracle:104#0@101"), "{out:?}");
        assert!(
            out[0].contains("written out of line (LOB operation"),
            "{out:?}"
        );
        assert_eq!(
            out[1], "row oracle:104#1@101 fine",
            "the rest keeps flowing"
        );
        assert!(out[3].starts_with("bad oracle:114#0@111"), "{out:?}");
        assert!(out[3].contains("extended VARCHAR2"), "{out:?}");
        assert!(out[5].starts_with("bad oracle:124#0@121"), "{out:?}");
        assert!(
            out[5].contains("split over several rows (CSF = 1)"),
            "{out:?}"
        );
        assert!(out[7].starts_with("bad oracle:134#0@131"), "{out:?}");
        assert!(out[7].contains("updated (UPDATE at SCN 132)"), "{out:?}");
        assert_eq!(t.unreadable_rows(), 4);
        assert_eq!(t.bytes, 0, "the buffer's byte count is back to zero");
        // Every refusal names the fix.
        for i in [0, 3] {
            assert!(out[i].contains("VARCHAR2(4000 BYTE)"), "{}", out[i]);
        }
    }

    #[test]
    fn the_buffer_is_capped_with_an_error_naming_the_transaction() {
        let mut t = Transactions::new(("SITESYNC".into(), "OUTBOX".into()), None, 100, 1000);
        let mut err = None;
        for i in 0..10 {
            if let Err(e) = t.feed(ins(101 + i, "BIG", "x")) {
                err = Some(e);
                break;
            }
        }
        let e = err.expect("the cap is hit");
        assert_eq!(e.kind(), crate::error::ErrorKind::Operator);
        assert!(e.message().contains("XID BIG"), "{}", e.message());
        assert!(e.message().contains("max_buffered_mib"), "{}", e.message());
    }

    #[test]
    fn heartbeats_only_move_forward() {
        let mut t = machine(Some(pos(200, 0, 200)));
        assert!(window(&mut t, vec![], 150).is_empty());
        assert_eq!(window(&mut t, vec![], 250), vec!["beat oracle:251#0@251"]);
        assert!(window(&mut t, vec![], 250).is_empty());
    }

    impl Transactions {
        fn decoded_for_test(&self) -> Change<Position> {
            Change::Row {
                position: pos(1, 0, 1),
                row: self.decode(&insert_sql("t")),
            }
        }
    }
}
