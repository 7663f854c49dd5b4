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
//!   are joined first.
//! - A DELETE with `ROLLBACK = 1` on the outbox (a rollback to savepoint
//!   undoing one of our inserts, or the undo of an INSERT statement that
//!   failed, e.g. on the `DATA IS JSON` check) removes the buffered insert
//!   of that `ROW_ID`. When the insert was read in an earlier window, the
//!   undo's XID has the sequence `FFFFFFFF` and the transaction is found by
//!   its undo segment and slot ([`Transactions::feed`]).
//! - ROLLBACK (36) drops the transaction. COMMIT (7) moves it to the
//!   window's committed set, under its commit SCN: the COMMIT row's `SCN`
//!   (the `COMMIT_SCN` column is filled only with `COMMITTED_DATA_ONLY`).
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
use std::collections::{BTreeMap, HashMap};

/// `OPERATION_CODE` values of `V$LOGMNR_CONTENTS`.
pub mod op {
    pub const INSERT: u32 = 1;
    pub const DELETE: u32 = 2;
    pub const START: u32 = 6;
    pub const COMMIT: u32 = 7;
    pub const ROLLBACK: u32 = 36;
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
}

#[derive(Debug)]
struct BufferedRow {
    row_id: Option<String>,
    sql: String,
}

#[derive(Debug)]
struct Tx {
    /// SCN of its first outbox row: mining from here sees all of them.
    first_scn: u64,
    rows: Vec<BufferedRow>,
    fragments: Fragments,
    bytes: usize,
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

    /// Feeds one row of the current window.
    pub fn feed(&mut self, row: MinedRow) -> Result<(), SourceError> {
        match row.operation_code {
            op::INSERT if self.is_outbox(&row) => self.insert(row),
            op::DELETE if row.rollback && self.is_outbox(&row) => {
                self.undo(&row);
                Ok(())
            }
            op::COMMIT => {
                if let Some(tx) = self.open.remove(&row.xid) {
                    if tx.fragments.is_pending() {
                        return Err(SourceError::transient(
                            Cause::Query,
                            format!(
                                "transaction {} committed while a split SQL_REDO (CSF = 1) was unfinished at RS_ID {} SSN {}; re-reading the window",
                                row.xid, row.rs_id, row.ssn
                            ),
                        ));
                    }
                    self.committed.insert((row.scn, row.xid), tx);
                }
                Ok(())
            }
            op::ROLLBACK => {
                if let Some(tx) = self.open.remove(&row.xid) {
                    self.bytes -= tx.bytes;
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
                    row: self.decode(&row.sql),
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
                "the INSERT's SQL_REDO has no DATA column (columns: {}): a CLOB DATA written by separate LOB operations is not read; make DATA a VARCHAR2 (see `sitesync init`)",
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
