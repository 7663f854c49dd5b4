//! Reading LogMiner: a small trait, the real implementation over the
//! `oracle` crate, a recorded fake for unit tests, and the window loop that
//! drives either.
//!
//! The `oracle` crate is blocking (ODPI-C): the source runs every call of
//! a [`LogMiner`] inside `tokio::task::spawn_blocking`.

use super::logs::{self, Incarnation, LogCatalogue, LogFile, RedoThread, WindowSizer};
use super::position::Position;
use super::transactions::{Abandoned, MinedRow, OpenAtStart, Transactions};
use crate::error::{Cause, SourceError};
use crate::source::Change;

/// The table whose update and commit, before each reading of the current
/// SCN, makes the log writer flush the redo buffer (a COMMIT returns once
/// LGWR has written the redo up to it). LogMiner reads the redo files,
/// not the buffer: without the flush, an outbox INSERT of a transaction
/// still open can sit in the buffer (LGWR writes at commits, when a third
/// full, or every 3 s) past the end of the window that covers its SCN, and
/// be missed for good. Debezium does the same with `LOG_MINING_FLUSH`.
/// The commit flushes the connected instance's log writer only: that is
/// why a database with more than one redo thread (RAC) is refused
/// ([`logs::single_redo_thread`]). `sitesync init` creates it in the
/// connecting user's schema.
pub const FLUSH_TABLE: &str = "SITESYNC_LOGMNR_FLUSH";
pub const FLUSH_DDL: &str =
    "CREATE TABLE SITESYNC_LOGMNR_FLUSH (ID NUMBER(1) PRIMARY KEY, N NUMBER NOT NULL)";
pub const FLUSH_SQL: &str = "MERGE INTO SITESYNC_LOGMNR_FLUSH f USING DUAL ON (f.ID = 1) \
     WHEN MATCHED THEN UPDATE SET f.N = MOD(f.N + 1, 1000000) \
     WHEN NOT MATCHED THEN INSERT (ID, N) VALUES (1, 0)";

/// The transactions the source abandoned past `database.transaction_retention`
/// ([`super::transactions`]), one row per XID, for `sitesync status` and
/// for the next session (which ignores their later rows). `sitesync init`
/// creates it; an operator may delete rows once handled.
pub const ABANDONED_TABLE: &str = "SITESYNC_ABANDONED_TX";
pub const ABANDONED_DDL: &str = "CREATE TABLE SITESYNC_ABANDONED_TX (\
     XID VARCHAR2(16) PRIMARY KEY, \
     START_SCN NUMBER NOT NULL, \
     ROWS_DROPPED NUMBER NOT NULL, \
     ABANDONED_AT_SCN NUMBER NOT NULL, \
     OUTCOME VARCHAR2(12) NOT NULL, \
     ENDED_AT_SCN NUMBER, \
     RECORDED_AT TIMESTAMP(6) WITH TIME ZONE DEFAULT SYSTIMESTAMP NOT NULL)";
const ABANDONED_MERGE: &str = "MERGE INTO SITESYNC_ABANDONED_TX t \
     USING (SELECT :1 XID, :2 START_SCN, :3 ROWS_DROPPED, :4 ABANDONED_AT_SCN, :5 OUTCOME, :6 ENDED_AT_SCN FROM DUAL) s \
     ON (t.XID = s.XID) \
     WHEN MATCHED THEN UPDATE SET t.ROWS_DROPPED = s.ROWS_DROPPED, t.OUTCOME = s.OUTCOME, t.ENDED_AT_SCN = s.ENDED_AT_SCN, t.RECORDED_AT = SYSTIMESTAMP \
     WHEN NOT MATCHED THEN INSERT (XID, START_SCN, ROWS_DROPPED, ABANDONED_AT_SCN, OUTCOME, ENDED_AT_SCN) \
     VALUES (s.XID, s.START_SCN, s.ROWS_DROPPED, s.ABANDONED_AT_SCN, s.OUTCOME, s.ENDED_AT_SCN)";
/// The columns [`Abandoned::from_text`] reads, newest first.
pub const ABANDONED_SELECT: &str = "SELECT XID, TO_CHAR(START_SCN), TO_CHAR(ROWS_DROPPED), TO_CHAR(ABANDONED_AT_SCN), OUTCOME, TO_CHAR(ENDED_AT_SCN) \
     FROM SITESYNC_ABANDONED_TX ORDER BY RECORDED_AT DESC, XID";

/// What the window loop needs from LogMiner.
pub trait LogMiner: Send {
    /// `V$DATABASE.CURRENT_SCN`, read after the redo buffer was flushed
    /// (see [`FLUSH_TABLE`]): every change up to it is on disk.
    fn current_scn(&mut self) -> Result<u64, SourceError>;

    /// The database's current incarnation, its online logs, and the
    /// archived logs on disk of that incarnation whose redo ends after
    /// `from_scn`.
    fn list_logs(&mut self, from_scn: u64) -> Result<LogCatalogue, SourceError>;

    /// The redo threads that are enabled (`V$THREAD`): one per instance
    /// that can write redo.
    fn redo_threads(&mut self) -> Result<Vec<RedoThread>, SourceError>;

    /// The transactions open now (`V$TRANSACTION`) and an SCN read after
    /// them; `None` when the view is not readable.
    fn open_transactions(&mut self) -> Result<Option<OpenAtStart>, SourceError>;

    /// The transactions abandoned by earlier sessions
    /// ([`ABANDONED_TABLE`]); empty when the table does not exist.
    fn abandoned(&mut self) -> Result<Vec<Abandoned>, SourceError>;

    /// Records abandoned transactions, or their end, in
    /// [`ABANDONED_TABLE`].
    fn record_abandoned(&mut self, notes: &[Abandoned]) -> Result<(), SourceError>;

    /// Mines `files` for the window `(lo, hi]` and feeds each row of the
    /// outbox's inserts, out-of-line writes and updates (and rollback
    /// deletes) and of every start, commit and rollback to `each`, in
    /// LogMiner's order. Returns the row count.
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

/// What the stream checks and reads once, before its first window:
///
/// - a database with more than one enabled redo thread (RAC) is refused
///   with an operator error naming the threads (see
///   [`logs::single_redo_thread`]): the flush before each window reaches
///   the connected instance's log writer only, and another instance's
///   redo could be written after a window passed over it, losing events;
/// - the transactions earlier sessions abandoned, whose later rows are
///   ignored;
/// - the transactions open now, so that a commit of one never seen
///   starting can be told from one that started before the session.
pub fn prepare<M: LogMiner + ?Sized>(
    miner: &mut M,
    tx: &mut Transactions,
) -> Result<(), SourceError> {
    let threads = miner.redo_threads()?;
    logs::single_redo_thread(&threads).map_err(|m| SourceError::operator(Cause::Config, m))?;
    tx.set_abandoned(miner.abandoned()?);
    let open = miner.open_transactions()?;
    if open.is_none() {
        tracing::warn!(
            "V$TRANSACTION is not readable: a commit whose start was never mined cannot be told from one that started before this session, so such commits are not counted. GRANT SELECT ON V_$TRANSACTION to sitesync's user (`sitesync check` prints the statement)"
        );
    }
    tx.set_open_at_start(open);
    Ok(())
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
    let changes = tx.end_window(hi);
    let notes = tx.take_notes();
    if !notes.is_empty() {
        miner.record_abandoned(&notes)?;
    }
    Ok(changes)
}

/// A LogMiner that replays recorded `V$LOGMNR_CONTENTS` rows: the named
/// fake of the unit tests. It keeps what was asked of it.
///
/// It models what the tests need of the server: a log catalogue that, like
/// `V$ARCHIVED_LOG` itself, also lists the logs of older incarnations;
/// enabled redo threads (`V$THREAD`); and redo written late (`late`: rows
/// readable only once that many windows have been mined, as when another
/// RAC instance's log writer writes its buffer after the window that
/// covered its SCNs).
#[derive(Debug, Default, Clone)]
pub struct RecordedLogMiner {
    pub current_scn: u64,
    pub incarnation: Incarnation,
    pub logs: Vec<LogFile>,
    /// In LogMiner's order.
    pub rows: Vec<MinedRow>,
    /// `(n, row)`: the row is in the redo files once `n` windows have been
    /// mined.
    pub late: Vec<(usize, MinedRow)>,
    /// Empty: one thread, as a single instance.
    pub threads: Vec<RedoThread>,
    pub open_at_start: Option<OpenAtStart>,
    /// What [`ABANDONED_TABLE`] holds.
    pub abandoned: Vec<Abandoned>,
    /// The windows mined, `(lo, hi)`, and the files each added.
    pub mined: Vec<(u64, u64, Vec<String>)>,
}

impl LogMiner for RecordedLogMiner {
    fn current_scn(&mut self) -> Result<u64, SourceError> {
        Ok(self.current_scn)
    }

    fn list_logs(&mut self, from_scn: u64) -> Result<LogCatalogue, SourceError> {
        Ok(LogCatalogue {
            current: self.incarnation.clone(),
            files: self
                .logs
                .iter()
                .filter(|f| !f.archived || f.next_scn > from_scn)
                .cloned()
                .collect(),
        })
    }

    fn redo_threads(&mut self) -> Result<Vec<RedoThread>, SourceError> {
        if self.threads.is_empty() {
            return Ok(vec![RedoThread {
                thread: 1,
                instance: "FREE".into(),
                status: "OPEN".into(),
                enabled: "PUBLIC".into(),
            }]);
        }
        Ok(self.threads.clone())
    }

    fn open_transactions(&mut self) -> Result<Option<OpenAtStart>, SourceError> {
        Ok(self.open_at_start.clone())
    }

    fn abandoned(&mut self) -> Result<Vec<Abandoned>, SourceError> {
        Ok(self.abandoned.clone())
    }

    fn record_abandoned(&mut self, notes: &[Abandoned]) -> Result<(), SourceError> {
        for n in notes {
            match self.abandoned.iter_mut().find(|a| a.xid == n.xid) {
                Some(a) => *a = n.clone(),
                None => self.abandoned.insert(0, n.clone()),
            }
        }
        Ok(())
    }

    fn mine(
        &mut self,
        files: &[LogFile],
        lo: u64,
        hi: u64,
        each: &mut dyn FnMut(MinedRow) -> Result<(), SourceError>,
    ) -> Result<usize, SourceError> {
        let written = self.mined.len();
        self.mined
            .push((lo, hi, files.iter().map(|f| f.name.clone()).collect()));
        let mut visible: Vec<&MinedRow> = self
            .rows
            .iter()
            .chain(
                self.late
                    .iter()
                    .filter(|(n, _)| *n <= written)
                    .map(|(_, r)| r),
            )
            .filter(|r| r.scn > lo && r.scn <= hi)
            .collect();
        visible.sort_by_key(|r| r.scn);
        let mut n = 0;
        for row in visible {
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
    /// [`ABANDONED_TABLE`] was found missing (said once).
    pub abandoned_table_missing: bool,
}

/// Parses an SCN fetched as text (`TO_CHAR`); the current log's
/// `NEXT_CHANGE#` may exceed 64 bits on some versions: it saturates.
fn scn(text: Option<String>) -> u64 {
    text.and_then(|t| t.trim().parse::<u128>().ok())
        .map(|n| u64::try_from(n).unwrap_or(u64::MAX))
        .unwrap_or(u64::MAX)
}

/// The current incarnation, as [`Incarnation`] holds it.
pub const INCARNATION_SQL: &str = "SELECT TO_CHAR(RESETLOGS_CHANGE#), TO_CHAR(RESETLOGS_TIME, 'YYYY-MM-DD HH24:MI:SS') FROM V$DATABASE";

/// The online logs (one member per group; they always belong to the
/// current incarnation) and the archived logs on disk of the current
/// incarnation: an older incarnation's archived log can carry the same
/// thread and sequence, or the same SCNs, after `OPEN RESETLOGS`.
pub const LIST_LOGS_SQL: &str = "SELECT MIN(F.MEMBER), L.THREAD#, L.SEQUENCE#, TO_CHAR(L.FIRST_CHANGE#), TO_CHAR(L.NEXT_CHANGE#), 'NO', \
       TO_CHAR(D.RESETLOGS_CHANGE#), TO_CHAR(D.RESETLOGS_TIME, 'YYYY-MM-DD HH24:MI:SS') \
     FROM V$LOG L JOIN V$LOGFILE F ON F.GROUP# = L.GROUP# CROSS JOIN V$DATABASE D \
     WHERE L.STATUS <> 'UNUSED' AND (F.STATUS IS NULL OR F.STATUS <> 'INVALID') \
     GROUP BY L.THREAD#, L.SEQUENCE#, L.FIRST_CHANGE#, L.NEXT_CHANGE#, D.RESETLOGS_CHANGE#, D.RESETLOGS_TIME \
     UNION ALL \
     SELECT MIN(A.NAME), A.THREAD#, A.SEQUENCE#, TO_CHAR(A.FIRST_CHANGE#), TO_CHAR(A.NEXT_CHANGE#), 'YES', \
       TO_CHAR(A.RESETLOGS_CHANGE#), TO_CHAR(A.RESETLOGS_TIME, 'YYYY-MM-DD HH24:MI:SS') \
     FROM V$ARCHIVED_LOG A JOIN V$DATABASE D \
       ON A.RESETLOGS_CHANGE# = D.RESETLOGS_CHANGE# AND A.RESETLOGS_TIME = D.RESETLOGS_TIME \
     WHERE A.NAME IS NOT NULL AND A.ARCHIVED = 'YES' AND A.STATUS = 'A' AND A.DELETED = 'NO' \
       AND A.STANDBY_DEST = 'NO' AND A.NEXT_CHANGE# > :1 \
     GROUP BY A.THREAD#, A.SEQUENCE#, A.FIRST_CHANGE#, A.NEXT_CHANGE#, A.RESETLOGS_CHANGE#, A.RESETLOGS_TIME";

/// The enabled redo threads and their instances.
pub const THREADS_SQL: &str = "SELECT THREAD#, INSTANCE, STATUS, ENABLED FROM V$THREAD WHERE ENABLED <> 'DISABLED' ORDER BY THREAD#";

/// Without `SELECT` on `V$THREAD`: the threads that have log groups (a
/// disabled thread's groups count too, so this errs on refusing).
pub const THREADS_FROM_LOGS_SQL: &str =
    "SELECT DISTINCT THREAD#, NULL, NULL, NULL FROM V$LOG ORDER BY THREAD#";

/// Starts LogMiner on the files added, with the online catalog as
/// dictionary and without `COMMITTED_DATA_ONLY` (we buffer by XID
/// ourselves; see [`super::transactions`]).
pub const START_SQL: &str = "BEGIN DBMS_LOGMNR.START_LOGMNR(STARTSCN => :1, ENDSCN => :2, \
     OPTIONS => DBMS_LOGMNR.DICT_FROM_ONLINE_CATALOG); END;";

/// The rows we read: every start, commit and rollback (their XIDs open and
/// close our transactions); of the outbox, the inserts, the changes
/// LogMiner could not decode (255, reported loudly), the updates, LOB
/// operations (9, 10, 11, 29) and extended-string operations (91–93) that
/// make an insert unreadable, and undo-deletes (`ROLLBACK = 1`; the sink's
/// sweeps of outbox rows that came back are other deletes, not read). The
/// SCN range is repeated in the query so that a window is exactly
/// `(lo, hi]`.
pub const CONTENTS_SQL: &str = "SELECT TO_CHAR(SCN), RAWTOHEX(XID), OPERATION_CODE, CSF, ROLLBACK, \
     SEG_OWNER, TABLE_NAME, ROW_ID, SQL_REDO, RS_ID, SSN, TO_CHAR(TIMESTAMP, 'YYYY-MM-DD HH24:MI:SS') \
     FROM V$LOGMNR_CONTENTS \
     WHERE SCN > :1 AND SCN <= :2 \
       AND (OPERATION_CODE IN (6, 7, 36) \
            OR (SEG_OWNER = :3 AND TABLE_NAME = :4 \
                AND (OPERATION_CODE IN (1, 3, 9, 10, 11, 29, 91, 92, 93, 255) \
                     OR (OPERATION_CODE = 2 AND ROLLBACK = 1))))";

/// `TIMESTAMP` as text → seconds, read as UTC.
fn redo_time(text: Option<String>) -> Option<i64> {
    let t = text?;
    chrono::NaiveDateTime::parse_from_str(t.trim(), "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|d| d.and_utc().timestamp())
}

/// The enabled redo threads, from `V$THREAD`, or from `V$LOG` when that
/// is not readable (`false`: not exact, errs on more threads).
pub fn read_redo_threads(
    conn: &oracle::Connection,
) -> Result<(Vec<RedoThread>, bool), SourceError> {
    let what = "reading the redo threads (V$THREAD)";
    let (rows, exact) = match texts(conn, THREADS_SQL, &[]) {
        Ok(rows) => (rows, true),
        Err(e) if e.to_string().contains("ORA-00942") => (
            texts(conn, THREADS_FROM_LOGS_SQL, &[]).map_err(|e| super::conn::db_error(what, &e))?,
            false,
        ),
        Err(e) => return Err(super::conn::db_error(what, &e)),
    };
    Ok((
        rows.iter().map(|r| RedoThread::from_text(r)).collect(),
        exact,
    ))
}

/// Runs `sql` and reads every row's columns as text.
fn texts(
    conn: &oracle::Connection,
    sql: &str,
    params: &[&dyn oracle::sql_type::ToSql],
) -> Result<Vec<Vec<Option<String>>>, oracle::Error> {
    let rows = conn.query(sql, params)?;
    let mut out = Vec::new();
    for row in rows {
        let row = row?;
        let cells = (0..row.sql_values().len())
            .map(|i| row.get::<usize, Option<String>>(i))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(cells);
    }
    Ok(out)
}

impl OracleLogMiner {
    /// Runs `sql` and reads every row's columns as text.
    fn texts(
        &self,
        sql: &str,
        params: &[&dyn oracle::sql_type::ToSql],
    ) -> Result<Vec<Vec<Option<String>>>, oracle::Error> {
        texts(&self.conn, sql, params)
    }
}

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

    fn list_logs(&mut self, from_scn: u64) -> Result<LogCatalogue, SourceError> {
        let what = "listing redo logs (V$DATABASE, V$LOG, V$LOGFILE, V$ARCHIVED_LOG)";
        let current = self
            .texts(INCARNATION_SQL, &[])
            .map_err(|e| super::conn::db_error(what, &e))?;
        let current = current
            .first()
            .map(|r| Incarnation {
                resetlogs_scn: scn(r[0].clone()),
                resetlogs_time: r[1].clone().unwrap_or_default(),
            })
            .unwrap_or_default();
        let from = from_scn.min(i64::MAX as u64) as i64;
        let rows = self
            .texts(LIST_LOGS_SQL, &[&from])
            .map_err(|e| super::conn::db_error(what, &e))?;
        let files = rows
            .into_iter()
            .map(|r| {
                let num = |i: usize| {
                    r[i].as_deref()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                LogFile {
                    name: r[0].clone().unwrap_or_default(),
                    thread: num(1) as u32,
                    sequence: num(2),
                    first_scn: scn(r[3].clone()),
                    next_scn: scn(r[4].clone()),
                    archived: r[5].as_deref() == Some("YES"),
                    incarnation: Incarnation {
                        resetlogs_scn: scn(r[6].clone()),
                        resetlogs_time: r[7].clone().unwrap_or_default(),
                    },
                }
            })
            .collect();
        Ok(LogCatalogue { current, files })
    }

    fn redo_threads(&mut self) -> Result<Vec<RedoThread>, SourceError> {
        let (threads, exact) = read_redo_threads(&self.conn)?;
        if !exact {
            tracing::warn!(
                "V$THREAD is not readable: the redo threads are taken from V$LOG (a disabled thread's log groups count too); GRANT SELECT ON V_$THREAD to sitesync's user"
            );
        }
        Ok(threads)
    }

    fn open_transactions(&mut self) -> Result<Option<OpenAtStart>, SourceError> {
        let what = "reading the open transactions (V$TRANSACTION)";
        let xids = match self.texts("SELECT RAWTOHEX(XID) FROM V$TRANSACTION", &[]) {
            Ok(rows) => rows,
            Err(e) if e.to_string().contains("ORA-00942") => return Ok(None),
            Err(e) => return Err(super::conn::db_error(what, &e)),
        };
        // The SCN is read after the list: a transaction missing from it
        // had committed before this SCN, or starts after the list.
        let text: Option<String> = self
            .conn
            .query_row_as("SELECT TO_CHAR(CURRENT_SCN) FROM V$DATABASE", &[])
            .map_err(|e| super::conn::db_error("reading V$DATABASE.CURRENT_SCN", &e))?;
        Ok(Some(OpenAtStart {
            scn: scn(text),
            xids: xids
                .into_iter()
                .filter_map(|r| r.into_iter().next().flatten())
                .collect(),
        }))
    }

    fn abandoned(&mut self) -> Result<Vec<Abandoned>, SourceError> {
        let what = "reading SITESYNC_ABANDONED_TX";
        match self.texts(ABANDONED_SELECT, &[]) {
            Ok(rows) => rows
                .iter()
                .map(|r| Abandoned::from_text(r))
                .collect::<Result<_, _>>()
                .map_err(|e| SourceError::transient(Cause::Query, format!("{what}: {e}"))),
            Err(e) if e.to_string().contains("ORA-00942") => {
                self.abandoned_table_missing = true;
                Ok(Vec::new())
            }
            Err(e) => Err(super::conn::db_error(what, &e)),
        }
    }

    fn record_abandoned(&mut self, notes: &[Abandoned]) -> Result<(), SourceError> {
        if self.abandoned_table_missing {
            tracing::error!(
                "{ABANDONED_TABLE} is missing, so `sitesync status` cannot name the abandoned transactions (the log above does): run `sitesync init`, which creates it"
            );
            return Ok(());
        }
        let what = "recording abandoned transactions (SITESYNC_ABANDONED_TX)";
        for n in notes {
            let ended = n.ended_scn().map(|s| s.min(i64::MAX as u64) as i64);
            let result = self.conn.execute(
                ABANDONED_MERGE,
                &[
                    &n.xid,
                    &(n.first_scn.min(i64::MAX as u64) as i64),
                    &(n.rows.min(i64::MAX as u64) as i64),
                    &(n.at_scn.min(i64::MAX as u64) as i64),
                    &n.outcome_text(),
                    &ended,
                ],
            );
            match result {
                Ok(_) => {}
                Err(e) if e.to_string().contains("ORA-00942") => {
                    self.abandoned_table_missing = true;
                    return self.record_abandoned(notes);
                }
                Err(e) => return Err(super::conn::db_error(what, &e)),
            }
        }
        self.conn
            .commit()
            .map_err(|e| super::conn::db_error(what, &e))
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
                time: redo_time(text(11)?),
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
    use crate::engine::oracle::transactions::tests::{commit, describe, ins, rollback, start};
    use crate::engine::oracle::transactions::{OpenAtStart, Outcome};

    fn log(seq: u64, first: u64, next: u64, archived: bool) -> LogFile {
        LogFile {
            name: format!("{}{seq}", if archived { "arch" } else { "redo" }),
            thread: 1,
            sequence: seq,
            first_scn: first,
            next_scn: next,
            archived,
            incarnation: Incarnation::default(),
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
            ..RecordedLogMiner::default()
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
                ..RecordedLogMiner::default()
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

    /// A two-instance RAC database: thread 1 (ORCL1, the instance sitesync
    /// is connected to) and thread 2 (ORCL2). Transaction R on ORCL2
    /// starts and inserts an outbox row at SCNs 105-106, but ORCL2's log
    /// writer writes that redo only after the first window (up to 139)
    /// was mined; its COMMIT at 150 is on disk in time.
    fn rac() -> RecordedLogMiner {
        let mut t2 = log(1, 1, u64::MAX, false);
        t2.thread = 2;
        t2.name = "thread2/redo1".into();
        let thread = |n: u32, instance: &str| RedoThread {
            thread: n,
            instance: instance.into(),
            status: "OPEN".into(),
            enabled: "PUBLIC".into(),
        };
        RecordedLogMiner {
            current_scn: 200,
            logs: vec![log(1, 1, u64::MAX, false), t2],
            rows: vec![
                start(101, "A"),
                ins(102, "A", "a1"),
                commit(110, "A"),
                // Open before the session started: its start is older.
                commit(120, "P"),
                commit(150, "R"),
            ],
            late: vec![(1, start(105, "R")), (1, ins(106, "R", "lost"))],
            threads: vec![thread(1, "ORCL1"), thread(2, "ORCL2")],
            open_at_start: Some(OpenAtStart {
                scn: 100,
                xids: ["P".to_string()].into_iter().collect(),
            }),
            ..RecordedLogMiner::default()
        }
    }

    #[test]
    fn defect_5_a_database_with_two_redo_threads_is_refused_before_any_window() {
        let mut m = rac();
        let mut tx = machine(None);
        let e = prepare(&mut m, &mut tx).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Operator);
        let msg = e.message();
        for needle in [
            "2 enabled redo threads",
            "thread 1 (ORCL1, OPEN, PUBLIC)",
            "thread 2 (ORCL2, OPEN, PUBLIC)",
            "documented limit",
            "ALTER DATABASE DISABLE THREAD",
        ] {
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
        assert!(m.mined.is_empty(), "nothing is mined: {:?}", m.mined);
        // One thread (a single instance) is accepted.
        let mut single = rac();
        single.threads.truncate(1);
        prepare(&mut single, &mut machine(None)).unwrap();
    }

    #[test]
    fn defect_5_a_commit_whose_late_written_start_was_never_mined_is_counted() {
        // What the refusal prevents: mined anyway, window by window, R's
        // insert is passed over (its redo was not on disk yet) and its
        // COMMIT finds nothing buffered. That must not go unnoticed.
        let mut m = rac();
        let mut tx = machine(None);
        tx.set_open_at_start(m.open_at_start.clone());
        let out = drain(&mut m, &mut tx, 40);
        assert_eq!(rows(&out), vec!["row oracle:110#0@102 a1"]);
        assert_eq!(tx.unmatched_commits(), 1, "R's commit is counted");
        // P was open when the session started, A was seen starting: only R
        // counts. Without V$TRANSACTION nothing can be told apart.
        let mut blind = rac();
        blind.open_at_start = None;
        let mut tx = machine(None);
        drain(&mut blind, &mut tx, 40);
        assert_eq!(tx.unmatched_commits(), 0);
        // With the redo on disk in time (one window over all of it), R's
        // event comes out and nothing is counted.
        let mut m = rac();
        let mut tx = machine(None);
        tx.set_open_at_start(m.open_at_start.clone());
        m.rows.extend(m.late.drain(..).map(|(_, r)| r));
        let out = drain(&mut m, &mut tx, 1000);
        assert_eq!(
            rows(&out),
            vec!["row oracle:110#0@102 a1", "row oracle:150#0@106 lost"]
        );
        assert_eq!(tx.unmatched_commits(), 0);
    }

    #[test]
    fn defect_6_windows_mine_only_the_current_incarnations_logs() {
        let catalogue = crate::engine::oracle::logs::tests::two_incarnations();
        let mut m = RecordedLogMiner {
            current_scn: 800,
            incarnation: catalogue.current.clone(),
            logs: catalogue.files,
            rows: vec![
                ins(470, "A", "a1"),
                commit(480, "A"),
                ins(720, "B", "b1"),
                commit(730, "B"),
            ],
            ..RecordedLogMiner::default()
        };
        let mut tx = Transactions::new(("SITESYNC".into(), "OUTBOX".into()), None, 451, 1 << 20);
        let out = drain(&mut m, &mut tx, 100);
        assert_eq!(
            rows(&out),
            vec!["row oracle:480#0@470 a1", "row oracle:730#0@720 b1"]
        );
        for (lo, hi, files) in &m.mined {
            assert!(
                files.iter().all(|f| f.starts_with("new/")),
                "window ({lo}, {hi}] added {files:?}"
            );
        }
    }

    /// `SITESYNC_ABANDONED_TX` as `sitesync status` reads it.
    fn as_table(recorded: &[Abandoned]) -> Vec<Vec<Option<String>>> {
        recorded
            .iter()
            .map(|a| {
                vec![
                    Some(a.xid.clone()),
                    Some(a.first_scn.to_string()),
                    Some(a.rows.to_string()),
                    Some(a.at_scn.to_string()),
                    Some(a.outcome_text().to_string()),
                    a.ended_scn().map(|s| s.to_string()),
                ]
            })
            .collect()
    }

    #[test]
    fn defect_8_an_abandoned_transaction_stops_pinning_the_restart_scn_and_status_names_it() {
        // Redo time is one second per SCN (the fake's rows): STUCK starts
        // at SCN 110 and never ends; the retention is one minute.
        const STUCK: &str = "0A0001000000AB01";
        let recorded = || RecordedLogMiner {
            current_scn: 400,
            logs: vec![log(1, 1, u64::MAX, false)],
            rows: vec![
                ins(110, STUCK, "stuck"),
                ins(120, "B", "b1"),
                commit(125, "B"),
                commit(200, "F1"),
                ins(260, STUCK, "stuck-again"),
                ins(300, "C", "c1"),
                commit(310, "C"),
            ],
            ..RecordedLogMiner::default()
        };
        let restart_scn =
            |out: &[Change<Position>]| out.last().unwrap().resume_after().mine_from.unwrap();
        // Without a retention, STUCK holds the restart SCN at 110 for good.
        let mut m = recorded();
        let out = drain(&mut m, &mut machine(None), 50);
        assert_eq!(restart_scn(&out), 110);
        assert!(m.abandoned.is_empty());

        let mut m = recorded();
        let mut tx = machine(None).with_retention(std::time::Duration::from_secs(60));
        let out = drain(&mut m, &mut tx, 50);
        assert_eq!(
            rows(&out),
            vec!["row oracle:125#0@110 b1", "row oracle:310#0@300 c1"]
        );
        assert_eq!(restart_scn(&out), 401, "STUCK no longer pins it");
        assert_eq!(tx.abandoned_total(), 1);
        assert_eq!(
            m.abandoned,
            vec![Abandoned {
                xid: STUCK.into(),
                first_scn: 110,
                // Its buffered row, and the one it wrote after.
                rows: 2,
                at_scn: 249,
                outcome: Outcome::Open,
            }]
        );
        let status = crate::status::SiteStatus {
            source_notes: crate::engine::oracle::status::abandoned_notes(&as_table(&m.abandoned))
                .unwrap(),
            ..Default::default()
        }
        .render(Some(0));
        assert!(
            status.contains(&format!(
                "abandoned transaction XID {STUCK}: 2 outbox row(s) since SCN 110, dropped at SCN 249"
            )),
            "{status}"
        );
        assert!(
            status.contains("if it commits, its events are lost"),
            "{status}"
        );

        // A later session reads the record: STUCK's rows are ignored, and
        // its COMMIT, should it come, is an error and recorded.
        let mut again = recorded();
        again.abandoned = m.abandoned.clone();
        again.rows.push(ins(420, STUCK, "third"));
        again.rows.push(commit(450, STUCK));
        again.current_scn = 500;
        let resume = out.last().unwrap().resume_after();
        let mut tx = machine(Some(resume));
        prepare(&mut again, &mut tx).unwrap();
        assert!(rows(&drain(&mut again, &mut tx, 50)).is_empty());
        assert_eq!(tx.abandoned_committed(), 1);
        assert_eq!(again.abandoned[0].outcome, Outcome::Committed(450));
        assert_eq!(again.abandoned[0].rows, 3);
        let line = again.abandoned[0].status_line();
        assert!(
            line.contains("COMMITTED at SCN 450: its events were lost"),
            "{line}"
        );
    }

    #[test]
    fn defect_6_the_log_listing_sql_keeps_to_the_current_incarnation() {
        // The archived logs are joined to V$DATABASE's incarnation on both
        // columns (two flashbacks to one SCN share RESETLOGS_CHANGE#).
        assert!(
            LIST_LOGS_SQL.contains(
                "FROM V$ARCHIVED_LOG A JOIN V$DATABASE D \
                   ON A.RESETLOGS_CHANGE# = D.RESETLOGS_CHANGE# AND A.RESETLOGS_TIME = D.RESETLOGS_TIME"
            ),
            "{LIST_LOGS_SQL}"
        );
        assert!(INCARNATION_SQL.contains("RESETLOGS_CHANGE#), TO_CHAR(RESETLOGS_TIME"));
    }

    #[test]
    fn defect_7_the_contents_sql_reads_what_makes_an_outbox_insert_unreadable() {
        // Updates, LOB operations and 32K operations on the outbox, and
        // every transaction's START (defect 5's unmatched commits).
        assert!(
            CONTENTS_SQL.contains("OPERATION_CODE IN (1, 3, 9, 10, 11, 29, 91, 92, 93, 255)"),
            "{CONTENTS_SQL}"
        );
        assert!(
            CONTENTS_SQL.contains("OPERATION_CODE IN (6, 7, 36)"),
            "{CONTENTS_SQL}"
        );
        assert_eq!(redo_time(Some("1970-01-02 00:00:01".into())), Some(86_401));
        assert_eq!(redo_time(Some("not a time".into())), None);
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
