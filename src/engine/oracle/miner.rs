//! Reading LogMiner: a small trait, the real implementation over the
//! `oracle` crate, a recorded fake for unit tests, and the window loop that
//! drives either.
//!
//! The `oracle` crate is blocking (ODPI-C): the source runs every call of
//! a [`LogMiner`] inside `tokio::task::spawn_blocking`.

use super::logs::{self, LogFile, WindowSizer};
use super::position::Position;
use super::transactions::{MinedRow, Transactions};
use crate::error::{Cause, SourceError};
use crate::source::Change;

/// The table whose update and commit, before each reading of the current
/// SCN, makes the log writer flush the redo buffer (a COMMIT returns once
/// LGWR has written the redo up to it). LogMiner reads the redo files,
/// not the buffer: without the flush, an outbox INSERT of a transaction
/// still open can sit in the buffer (LGWR writes at commits, when a third
/// full, or every 3 s) past the end of the window that covers its SCN, and
/// be missed for good. Debezium does the same with `LOG_MINING_FLUSH`.
/// `sitesync init` creates it in the connecting user's schema.
pub const FLUSH_TABLE: &str = "SITESYNC_LOGMNR_FLUSH";
pub const FLUSH_DDL: &str =
    "CREATE TABLE SITESYNC_LOGMNR_FLUSH (ID NUMBER(1) PRIMARY KEY, N NUMBER NOT NULL)";
pub const FLUSH_SQL: &str = "MERGE INTO SITESYNC_LOGMNR_FLUSH f USING DUAL ON (f.ID = 1) \
     WHEN MATCHED THEN UPDATE SET f.N = MOD(f.N + 1, 1000000) \
     WHEN NOT MATCHED THEN INSERT (ID, N) VALUES (1, 0)";

/// What the window loop needs from LogMiner.
pub trait LogMiner: Send {
    /// `V$DATABASE.CURRENT_SCN`, read after the redo buffer was flushed
    /// (see [`FLUSH_TABLE`]): every change up to it is on disk.
    fn current_scn(&mut self) -> Result<u64, SourceError>;

    /// The online logs and the archived logs on disk whose redo ends after
    /// `from_scn`.
    fn list_logs(&mut self, from_scn: u64) -> Result<Vec<LogFile>, SourceError>;

    /// Mines `files` for the window `(lo, hi]` and feeds each row of the
    /// outbox's inserts (and rollback deletes) and of every commit and
    /// rollback to `each`, in LogMiner's order. Returns the row count.
    fn mine(
        &mut self,
        files: &[LogFile],
        lo: u64,
        hi: u64,
        each: &mut dyn FnMut(MinedRow) -> Result<(), SourceError>,
    ) -> Result<usize, SourceError>;
}

/// The SCN a window may end at: one read from `V$DATABASE.CURRENT_SCN` at
/// least `settle` ago. A commit can take an SCN a moment before its redo
/// reaches the online log; mining up to an SCN read just now could end a
/// window before such a commit is readable, and the next window would
/// start after it. Waiting `settle` (default 1 s) between reading an SCN
/// and mining up to it closes that gap.
#[derive(Debug, Clone)]
pub struct SettledScn {
    settle: std::time::Duration,
    /// Samples, oldest first; the front is the newest one old enough.
    samples: std::collections::VecDeque<(u64, std::time::Instant)>,
}

impl SettledScn {
    pub fn new(settle: std::time::Duration) -> SettledScn {
        SettledScn {
            settle,
            samples: std::collections::VecDeque::new(),
        }
    }

    /// Records a reading of the current SCN taken at `now`; returns the
    /// newest reading at least `settle` old, if any.
    pub fn push(&mut self, scn: u64, now: std::time::Instant) -> Option<u64> {
        self.samples.push_back((scn, now));
        let old_enough = |t: std::time::Instant| now.duration_since(t) >= self.settle;
        while self.samples.len() > 1 && old_enough(self.samples[1].1) {
            self.samples.pop_front();
        }
        self.samples
            .front()
            .filter(|(_, t)| old_enough(*t))
            .map(|(scn, _)| *scn)
    }
}

/// Reads one window: picks its logs, mines it and returns its changes (an
/// empty list when the database has not moved since the last window).
pub fn read_window<M: LogMiner + ?Sized>(
    miner: &mut M,
    tx: &mut Transactions,
    sizer: &mut WindowSizer,
    settled: &mut SettledScn,
) -> Result<Vec<Change<Position>>, SourceError> {
    let reading = miner.current_scn()?;
    let Some(current) = settled.push(reading, std::time::Instant::now()) else {
        return Ok(Vec::new());
    };
    let Some((lo, hi)) = sizer.next(tx.mined_to(), current) else {
        return Ok(Vec::new());
    };
    let available = miner.list_logs(lo.saturating_add(1))?;
    let files = logs::select(&available, lo, hi)
        .map_err(|m| SourceError::operator(Cause::LogPurged, m.message()))?;
    let rows = miner.mine(&files, lo, hi, &mut |row| tx.feed(row))?;
    sizer.record(rows, hi == current);
    tracing::debug!(
        lo,
        hi,
        rows,
        files = files.len(),
        open = tx.open_count(),
        "LogMiner window"
    );
    Ok(tx.end_window(hi))
}

/// A LogMiner that replays recorded `V$LOGMNR_CONTENTS` rows: the named
/// fake of the unit tests. It keeps what was asked of it.
#[derive(Debug, Default, Clone)]
pub struct RecordedLogMiner {
    pub current_scn: u64,
    pub logs: Vec<LogFile>,
    /// In LogMiner's order.
    pub rows: Vec<MinedRow>,
    /// The windows mined, `(lo, hi)`, and the files each added.
    pub mined: Vec<(u64, u64, Vec<String>)>,
}

impl LogMiner for RecordedLogMiner {
    fn current_scn(&mut self) -> Result<u64, SourceError> {
        Ok(self.current_scn)
    }

    fn list_logs(&mut self, from_scn: u64) -> Result<Vec<LogFile>, SourceError> {
        Ok(self
            .logs
            .iter()
            .filter(|f| !f.archived || f.next_scn > from_scn)
            .cloned()
            .collect())
    }

    fn mine(
        &mut self,
        files: &[LogFile],
        lo: u64,
        hi: u64,
        each: &mut dyn FnMut(MinedRow) -> Result<(), SourceError>,
    ) -> Result<usize, SourceError> {
        self.mined
            .push((lo, hi, files.iter().map(|f| f.name.clone()).collect()));
        let mut n = 0;
        for row in self.rows.iter().filter(|r| r.scn > lo && r.scn <= hi) {
            if !files
                .iter()
                .any(|f| f.first_scn <= row.scn && row.scn < f.next_scn)
            {
                return Err(SourceError::transient(
                    Cause::LogPurged,
                    format!(
                        "ORA-01291: missing log file (SCN {} not in the files added)",
                        row.scn
                    ),
                ));
            }
            each(row.clone())?;
            n += 1;
        }
        Ok(n)
    }
}

/// LogMiner over a real connection (the `oracle` crate).
pub struct OracleLogMiner {
    pub conn: oracle::Connection,
    pub owner: String,
    pub table: String,
    /// Add the log files with `ADD_LOGFILE` (a non-CDB database). Connected
    /// to a PDB (per-PDB mining, 19c RU 10 and later), LogMiner refuses
    /// `ADD_LOGFILE` and finds the logs of the SCN range itself; the
    /// selection still runs, to fail clearly when redo is gone.
    pub add_files: bool,
    /// Flush the redo buffer before reading the current SCN (the stream;
    /// not `bounds`).
    pub flush: bool,
}

/// Parses an SCN fetched as text (`TO_CHAR`); the current log's
/// `NEXT_CHANGE#` may exceed 64 bits on some versions: it saturates.
fn scn(text: Option<String>) -> u64 {
    text.and_then(|t| t.trim().parse::<u128>().ok())
        .map(|n| u64::try_from(n).unwrap_or(u64::MAX))
        .unwrap_or(u64::MAX)
}

/// The online logs (one member per group) and the archived logs on disk.
pub const LIST_LOGS_SQL: &str = "SELECT MIN(F.MEMBER), L.THREAD#, L.SEQUENCE#, TO_CHAR(L.FIRST_CHANGE#), TO_CHAR(L.NEXT_CHANGE#), 'NO' \
     FROM V$LOG L JOIN V$LOGFILE F ON F.GROUP# = L.GROUP# \
     WHERE L.STATUS <> 'UNUSED' AND (F.STATUS IS NULL OR F.STATUS <> 'INVALID') \
     GROUP BY L.THREAD#, L.SEQUENCE#, L.FIRST_CHANGE#, L.NEXT_CHANGE# \
     UNION ALL \
     SELECT MIN(A.NAME), A.THREAD#, A.SEQUENCE#, TO_CHAR(A.FIRST_CHANGE#), TO_CHAR(A.NEXT_CHANGE#), 'YES' \
     FROM V$ARCHIVED_LOG A \
     WHERE A.NAME IS NOT NULL AND A.ARCHIVED = 'YES' AND A.STATUS = 'A' AND A.DELETED = 'NO' \
       AND A.STANDBY_DEST = 'NO' AND A.NEXT_CHANGE# > :1 \
     GROUP BY A.THREAD#, A.SEQUENCE#, A.FIRST_CHANGE#, A.NEXT_CHANGE#";

/// Starts LogMiner on the files added, with the online catalog as
/// dictionary and without `COMMITTED_DATA_ONLY` (we buffer by XID
/// ourselves; see [`super::transactions`]).
pub const START_SQL: &str = "BEGIN DBMS_LOGMNR.START_LOGMNR(STARTSCN => :1, ENDSCN => :2, \
     OPTIONS => DBMS_LOGMNR.DICT_FROM_ONLINE_CATALOG); END;";

/// The rows we read: the outbox's inserts, the changes to it LogMiner
/// could not decode (255, reported loudly), undo-deletes (`ROLLBACK =
/// 1`; the sink's sweeps of outbox rows that came back are other deletes,
/// not read), and every commit and rollback (their XIDs close our
/// transactions). The SCN range is repeated in the query so that a window
/// is exactly `(lo, hi]`.
pub const CONTENTS_SQL: &str = "SELECT TO_CHAR(SCN), RAWTOHEX(XID), OPERATION_CODE, CSF, ROLLBACK, \
     SEG_OWNER, TABLE_NAME, ROW_ID, SQL_REDO, RS_ID, SSN \
     FROM V$LOGMNR_CONTENTS \
     WHERE SCN > :1 AND SCN <= :2 \
       AND (OPERATION_CODE IN (7, 36) \
            OR (SEG_OWNER = :3 AND TABLE_NAME = :4 \
                AND (OPERATION_CODE IN (1, 255) OR (OPERATION_CODE = 2 AND ROLLBACK = 1))))";

impl LogMiner for OracleLogMiner {
    fn current_scn(&mut self) -> Result<u64, SourceError> {
        if self.flush {
            self.conn
                .execute(FLUSH_SQL, &[])
                .and_then(|_| self.conn.commit())
                .map_err(|e| {
                    let m = e.to_string();
                    if m.contains("ORA-00942") {
                        SourceError::operator(Cause::NotInitialised, format!(
                            "{FLUSH_TABLE} is missing ({m}): run `sitesync init`, which creates it (sitesync updates it before each window so that the log writer flushes the redo LogMiner reads)"
                        ))
                    } else {
                        super::conn::db_error(&format!("flushing the redo buffer ({FLUSH_TABLE})"), &e)
                    }
                })?;
        }
        let text: Option<String> = self
            .conn
            .query_row_as("SELECT TO_CHAR(CURRENT_SCN) FROM V$DATABASE", &[])
            .map_err(|e| super::conn::db_error("reading V$DATABASE.CURRENT_SCN", &e))?;
        Ok(scn(text))
    }

    fn list_logs(&mut self, from_scn: u64) -> Result<Vec<LogFile>, SourceError> {
        let from = from_scn.min(i64::MAX as u64) as i64;
        let rows = self.conn.query(LIST_LOGS_SQL, &[&from]).map_err(|e| {
            super::conn::db_error("listing redo logs (V$LOG, V$LOGFILE, V$ARCHIVED_LOG)", &e)
        })?;
        let mut out = Vec::new();
        for row in rows {
            let row = row.map_err(|e| super::conn::db_error("listing redo logs", &e))?;
            let get = |i: usize| -> Result<Option<String>, SourceError> {
                row.get::<usize, Option<String>>(i)
                    .map_err(|e| super::conn::db_error("listing redo logs", &e))
            };
            let num = |i: usize| -> Result<u64, SourceError> {
                row.get::<usize, Option<i64>>(i)
                    .map(|n| n.unwrap_or(0).max(0) as u64)
                    .map_err(|e| super::conn::db_error("listing redo logs", &e))
            };
            out.push(LogFile {
                name: get(0)?.unwrap_or_default(),
                thread: num(1)? as u32,
                sequence: num(2)?,
                first_scn: scn(get(3)?),
                next_scn: scn(get(4)?),
                archived: get(5)?.as_deref() == Some("YES"),
            });
        }
        Ok(out)
    }

    fn mine(
        &mut self,
        files: &[LogFile],
        lo: u64,
        hi: u64,
        each: &mut dyn FnMut(MinedRow) -> Result<(), SourceError>,
    ) -> Result<usize, SourceError> {
        for (i, f) in files.iter().enumerate().filter(|_| self.add_files) {
            let sql = if i == 0 {
                "BEGIN DBMS_LOGMNR.ADD_LOGFILE(LOGFILENAME => :1, OPTIONS => DBMS_LOGMNR.NEW); END;"
            } else {
                "BEGIN DBMS_LOGMNR.ADD_LOGFILE(LOGFILENAME => :1, OPTIONS => DBMS_LOGMNR.ADDFILE); END;"
            };
            self.conn
                .execute(sql, &[&f.name])
                .map_err(|e| super::conn::db_error(&format!("adding log file {}", f.name), &e))?;
        }
        let (start, end) = ((lo + 1) as i64, hi.min(i64::MAX as u64) as i64);
        self.conn.execute(START_SQL, &[&start, &end]).map_err(|e| {
            super::conn::db_error(&format!("starting LogMiner for SCN {}..{hi}", lo + 1), &e)
        })?;
        let result = self.read_contents(lo, hi, each);
        // Always end the session: it holds PGA until then.
        if let Err(e) = self.conn.execute("BEGIN DBMS_LOGMNR.END_LOGMNR; END;", &[]) {
            tracing::debug!(error = %e, "ending the LogMiner session");
        }
        result
    }
}

impl OracleLogMiner {
    fn read_contents(
        &mut self,
        lo: u64,
        hi: u64,
        each: &mut dyn FnMut(MinedRow) -> Result<(), SourceError>,
    ) -> Result<usize, SourceError> {
        let what = "reading V$LOGMNR_CONTENTS";
        let mut stmt = self
            .conn
            .statement(CONTENTS_SQL)
            .fetch_array_size(1000)
            .build()
            .map_err(|e| super::conn::db_error(what, &e))?;
        let (lo, hi) = (lo as i64, hi.min(i64::MAX as u64) as i64);
        let rows = stmt
            .query(&[&lo, &hi, &self.owner, &self.table])
            .map_err(|e| super::conn::db_error(what, &e))?;
        let mut n = 0;
        for row in rows {
            let row = row.map_err(|e| super::conn::db_error(what, &e))?;
            let text = |i: usize| -> Result<Option<String>, SourceError> {
                row.get::<usize, Option<String>>(i)
                    .map_err(|e| super::conn::db_error(what, &e))
            };
            let num = |i: usize| -> Result<i64, SourceError> {
                row.get::<usize, Option<i64>>(i)
                    .map(|n| n.unwrap_or(0))
                    .map_err(|e| super::conn::db_error(what, &e))
            };
            each(MinedRow {
                scn: scn(text(0)?),
                xid: text(1)?.unwrap_or_default(),
                operation_code: num(2)? as u32,
                csf: num(3)? == 1,
                rollback: num(4)? == 1,
                seg_owner: text(5)?,
                table_name: text(6)?,
                row_id: text(7)?,
                sql_redo: text(8)?,
                rs_id: text(9)?.unwrap_or_default(),
                ssn: num(10)?.max(0) as u64,
            })?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::oracle::position::Position;
    use crate::engine::oracle::transactions::tests::{commit, describe, ins, rollback};

    fn log(seq: u64, first: u64, next: u64, archived: bool) -> LogFile {
        LogFile {
            name: format!("{}{seq}", if archived { "arch" } else { "redo" }),
            thread: 1,
            sequence: seq,
            first_scn: first,
            next_scn: next,
            archived,
        }
    }

    fn recorded() -> RecordedLogMiner {
        RecordedLogMiner {
            current_scn: 400,
            logs: vec![
                log(1, 1, 150, true),
                log(2, 150, 250, true),
                log(2, 150, 250, false),
                log(3, 250, u64::MAX, false),
            ],
            rows: vec![
                ins(110, "A", "a1"),
                ins(120, "B", "b1"),
                commit(130, "B"),
                // A spans the log switch at 150 and several windows.
                ins(160, "A", "a2"),
                ins(170, "C", "c1"),
                rollback(180, "C"),
                ins(200, "D", "d1"),
                commit(240, "A"),
                commit(240, "D"),
                ins(260, "E", "e1"),
                commit(300, "E"),
            ],
            mined: Vec::new(),
        }
    }

    fn machine(resume: Option<Position>) -> Transactions {
        Transactions::new(("SITESYNC".into(), "OUTBOX".into()), resume, 100, 1 << 20)
    }

    /// Reads until caught up; returns every change.
    fn drain(
        miner: &mut RecordedLogMiner,
        tx: &mut Transactions,
        width: u64,
    ) -> Vec<Change<Position>> {
        let mut sizer = WindowSizer::new(width, width, 1_000_000);
        let mut settled = SettledScn::new(std::time::Duration::ZERO);
        let mut out = Vec::new();
        loop {
            let changes = read_window(miner, tx, &mut sizer, &mut settled).unwrap();
            if changes.is_empty() && tx.mined_to() >= miner.current_scn {
                return out;
            }
            out.extend(changes);
        }
    }

    fn rows(changes: &[Change<Position>]) -> Vec<String> {
        changes
            .iter()
            .filter(|c| matches!(c, Change::Row { .. }))
            .map(describe)
            .collect()
    }

    #[test]
    fn small_windows_across_a_log_switch_give_commit_order() {
        let mut m = recorded();
        let mut tx = machine(None);
        let out = drain(&mut m, &mut tx, 40);
        assert_eq!(
            rows(&out),
            vec![
                "row oracle:130#0@110 b1",
                "row oracle:240#0@110 a1",
                "row oracle:240#1@110 a2",
                "row oracle:240#2@110 d1",
                "row oracle:300#0@260 e1",
            ]
        );
        // Windows of 40 SCNs from 99; the one over the switch adds both logs.
        assert_eq!(m.mined[0].0, 99);
        assert!(
            m.mined
                .iter()
                .any(|(lo, hi, files)| *lo < 150 && *hi >= 150 && files.len() == 2),
            "{:?}",
            m.mined
        );
        // The archived copy is read, not the online log of the same sequence.
        assert!(
            m.mined
                .iter()
                .all(|(_, _, f)| !f.contains(&"redo2".to_string()))
        );
    }

    #[test]
    fn a_crash_anywhere_resumes_without_loss_or_duplicates() {
        let mut m = recorded();
        let all = drain(&mut m, &mut machine(None), 40);
        let expected = rows(&all);
        // Crash after each change in turn: resume from its resume point.
        for (i, change) in all.iter().enumerate() {
            let resume = change.resume_after();
            let mut before: Vec<String> = rows(&all[..=i]);
            let mut again = recorded();
            let mut tx = machine(Some(resume.clone()));
            before.extend(rows(&drain(&mut again, &mut tx, 25)));
            assert_eq!(before, expected, "resumed at {resume}");
        }
    }

    #[test]
    fn a_gone_archived_log_stops_with_the_scn_range() {
        let mut m = recorded();
        m.logs.retain(|f| f.sequence != 1);
        let mut sizer = WindowSizer::new(40, 40, 1000);
        let mut settled = SettledScn::new(std::time::Duration::ZERO);
        let e = read_window(&mut m, &mut machine(None), &mut sizer, &mut settled).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Operator);
        assert!(e.message().contains("SCN 100..139"), "{}", e.message());
        assert!(m.mined.is_empty(), "nothing is mined past a hole");
    }

    /// Random transactions (some rolled back, some committing at the same
    /// SCN) read in random window widths, then a crash after any change and
    /// a resume with another width: the rows come out once each, in
    /// `(commit SCN, XID)` order, with rising positions.
    mod model {
        use super::*;
        use proptest::prelude::*;

        type Spec = (u64, Vec<u64>, u64, bool);

        fn recorded(txs: &[Spec]) -> (RecordedLogMiner, Vec<String>) {
            let mut rows: Vec<MinedRow> = Vec::new();
            let mut committed: Vec<((u64, String), Vec<String>)> = Vec::new();
            for (i, (start, gaps, delay, commits)) in txs.iter().enumerate() {
                let xid = format!("X{i:02}");
                let mut scn = 101 + start;
                let mut kinds = Vec::new();
                for (j, gap) in gaps.iter().enumerate() {
                    scn += gap;
                    let kind = format!("t{i}r{j}");
                    rows.push(ins(scn, &xid, &kind));
                    kinds.push(kind);
                }
                let end = scn + 1 + delay;
                rows.push(if *commits {
                    commit(end, &xid)
                } else {
                    rollback(end, &xid)
                });
                if *commits {
                    committed.push(((end, xid), kinds));
                }
            }
            rows.sort_by_key(|r| r.scn);
            committed.sort();
            let expected = committed.into_iter().flat_map(|(_, k)| k).collect();
            let current = rows.iter().map(|r| r.scn).max().unwrap_or(0) + 10;
            let miner = RecordedLogMiner {
                current_scn: current,
                logs: vec![log(1, 1, u64::MAX, false)],
                rows,
                mined: Vec::new(),
            };
            (miner, expected)
        }

        fn kinds(changes: &[Change<Position>]) -> Vec<String> {
            changes
                .iter()
                .filter_map(|c| match c {
                    Change::Row { row: Ok(r), .. } => r.kind.clone(),
                    _ => None,
                })
                .collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]

            #[test]
            fn any_windows_and_any_crash_give_each_row_once_in_commit_order(
                txs in proptest::collection::vec(
                    (0u64..40, proptest::collection::vec(0u64..6, 0..4), 0u64..8, proptest::bool::weighted(0.8)),
                    1..8,
                ),
                width in 1u64..30,
                width_after in 1u64..30,
                crash in any::<proptest::sample::Index>(),
            ) {
                let (miner, expected) = recorded(&txs);
                let all = drain(&mut miner.clone(), &mut machine(None), width);
                prop_assert_eq!(kinds(&all), expected.clone());
                let positions: Vec<Position> = all
                    .iter()
                    .filter(|c| matches!(c, Change::Row { .. }))
                    .map(|c| match c { Change::Row { position, .. } => position.clone(), _ => unreachable!() })
                    .collect();
                prop_assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
                if all.is_empty() {
                    return Ok(());
                }
                let at = crash.index(all.len());
                let resume = all[at].resume_after();
                let mut got = kinds(&all[..=at]);
                got.extend(kinds(&drain(&mut miner.clone(), &mut machine(Some(resume.clone())), width_after)));
                prop_assert_eq!(got, expected, "resumed at {}", resume);
            }
        }
    }

    #[test]
    fn windows_end_at_an_scn_read_at_least_settle_ago() {
        let t0 = std::time::Instant::now();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        let mut s = SettledScn::new(std::time::Duration::from_millis(1000));
        assert_eq!(s.push(100, ms(0)), None);
        assert_eq!(s.push(150, ms(400)), None);
        assert_eq!(s.push(200, ms(1000)), Some(100));
        assert_eq!(s.push(250, ms(1500)), Some(150));
        assert_eq!(s.push(300, ms(3000)), Some(250));
        let mut zero = SettledScn::new(std::time::Duration::ZERO);
        assert_eq!(zero.push(7, ms(0)), Some(7));
    }

    #[test]
    fn scn_text_saturates() {
        assert_eq!(scn(Some("18446744073709551615".into())), u64::MAX);
        assert_eq!(scn(Some("99999999999999999999999".into())), u64::MAX);
        assert_eq!(scn(Some(" 42 ".into())), 42);
    }
}
