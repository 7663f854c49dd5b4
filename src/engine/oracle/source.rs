//! Oracle source: LogMiner over SCN windows.
//!
//! - The driver is the `oracle` crate (ODPI-C, compiled from source: the
//!   build needs no Oracle software). The Oracle Client libraries are loaded
//!   at run time, from `database.client_lib_dir` or the system's library
//!   path; when they are missing, `check` and `run` say so and how to
//!   install Instant Client ([`super::conn::client_missing`]). Its API is blocking: every
//!   call runs on `spawn_blocking`, and the stream's reader is one blocking
//!   task feeding a bounded channel, so `next()` is cancellation-safe.
//! - Before each window the reader updates and commits a row of
//!   `SITESYNC_LOGMNR_FLUSH` (created by `init`) so that the log writer has
//!   written every change up to the SCN it then reads ([`miner::FLUSH_TABLE`]).
//! - Windows: [`miner::read_window`] picks the redo logs covering `(lo, hi]`
//!   from the current incarnation ([`logs::select`]; a needed archived log
//!   that is gone is an operator error naming the SCN range), adds them
//!   with `DBMS_LOGMNR.ADD_LOGFILE`, starts LogMiner with the online
//!   catalog as dictionary and without `COMMITTED_DATA_ONLY`, and reads
//!   `V$LOGMNR_CONTENTS` for the outbox's INSERTs (and the changes that
//!   make one unreadable) and every START, COMMIT and ROLLBACK. The width
//!   adapts ([`logs::WindowSizer`]). Transactions abandoned past
//!   `database.transaction_retention` are recorded in
//!   `SITESYNC_ABANDONED_TX` ([`miner::ABANDONED_TABLE`]); the stream's
//!   [`Counters`] count them and the other losses it cannot prevent.
//! - Transactions are buffered by XID and emitted at their COMMIT in
//!   `(commit SCN, XID)` order ([`transactions`]); `SQL_REDO` is parsed by
//!   [`super::redo`] and mapped to the outbox fields by [`super::types`].
//! - Positions: `oracle:<commit SCN>#<index>@<mine_from>`: see
//!   [`super::position::Position`]. Nothing is reported back to the
//!   database ([`ChangeStream::durable`] is a no-op): the redo we still need
//!   is the archived logs from `mine_from` on, which `checkpoint show`
//!   prints, and which the DBA's retention (RMAN) must keep.
//! - With no checkpoint, streaming starts at the SCN the outbox table was
//!   created at (or the oldest redo still on disk, if later): rows written
//!   between `init` and the first `run` are not lost.
//!
//! - Before the first window ([`miner::prepare`]): a database with more
//!   than one enabled redo thread (RAC) is refused (a documented limit,
//!   [`logs::single_redo_thread`]); the transactions abandoned by earlier
//!   sessions and those open now (`V$TRANSACTION`) are read.
//!
//! Limits, refused loudly rather than published malformed: `DATA` must be
//! `VARCHAR2(4000 BYTE)` (or `NVARCHAR2(2000)`); `init` creates it so and
//! `check` fails on a LOB or a longer (extended) VARCHAR2. LogMiner writes
//! longer values out of line (LOB or `32K` operations), which sitesync
//! does not reassemble: such a row goes to the dead-letter queue with the
//! reason ([`transactions`]).

use super::conn::{OracleConnect, blocking, db_error, ident, literal, outbox_names};
use super::position::Position;
use super::settings::Settings;
use super::{logs, miner, transactions};
use crate::checks::Check;
use crate::config::ConnectorConfig;
use crate::error::{Cause, SourceError};
use crate::source::{Change, ChangeStream, LogBounds, Source};
use logs::{WindowSizer, single_redo_thread};
use miner::{
    ABANDONED_DDL, ABANDONED_TABLE, FLUSH_DDL, FLUSH_TABLE, LogMiner, OracleLogMiner, SettledScn,
    read_window,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use transactions::Transactions;

pub struct OracleSource {
    cfg: Settings,
    site: String,
    connect: OracleConnect,
    /// The outbox as LogMiner names it: `(SEG_OWNER, TABLE_NAME)`.
    owner: String,
    table: String,
}

impl OracleSource {
    pub fn new(connector: &ConnectorConfig, db: &Settings) -> Result<OracleSource, SourceError> {
        let connect = OracleConnect::new(db)?;
        let (owner, table) = outbox_names(&db.outbox_table, &connect.url.user);
        Ok(OracleSource {
            cfg: db.clone(),
            site: connector.site.clone(),
            connect,
            owner,
            table,
        })
    }

    fn outbox_sql_name(&self) -> String {
        format!("{}.{}", ident(&self.owner), ident(&self.table))
    }

    /// The DDL of the outbox table.
    fn outbox_ddl(&self) -> String {
        outbox_ddl(&self.outbox_sql_name(), &self.site)
    }
}

/// The outbox table. `data` is `VARCHAR2(4000 BYTE)` so that LogMiner
/// always writes its value in the INSERT's `SQL_REDO` (see the module
/// docs): in bytes, because `VARCHAR2(4000 CHAR)` under `MAX_STRING_SIZE
/// = EXTENDED` holds up to 16,000 bytes, which LogMiner writes out of
/// line. A payload over 4,000 bytes is refused by the database (ORA-12899)
/// when the application inserts it. `id` defaults to a `SYS_GUID()` in
/// UUID form.
pub fn outbox_ddl(name: &str, site: &str) -> String {
    format!(
        "CREATE TABLE {name} (\n\
         \x20 ID VARCHAR2(36) DEFAULT LOWER(REGEXP_REPLACE(RAWTOHEX(SYS_GUID()), '^(.{{8}})(.{{4}})(.{{4}})(.{{4}})(.{{12}})$', '\\1-\\2-\\3-\\4-\\5')) PRIMARY KEY,\n\
         \x20 CREATED_AT TIMESTAMP(6) WITH TIME ZONE DEFAULT SYSTIMESTAMP NOT NULL,\n\
         \x20 ORIGIN VARCHAR2(64) DEFAULT {site} NOT NULL,\n\
         \x20 TYPE VARCHAR2(200) NOT NULL,\n\
         \x20 ENTITY_KEY VARCHAR2(400),\n\
         \x20 DATA VARCHAR2(4000 BYTE) NOT NULL CONSTRAINT {check} CHECK (DATA IS JSON)\n\
         )",
        site = literal(site),
        check = ident(&format!(
            "{}_DATA_JSON",
            name.rsplit('.')
                .next()
                .unwrap_or("OUTBOX")
                .trim_matches('"')
        )),
    )
}

/// The statements a DBA runs once (sitesync's user cannot).
pub fn dba_statements(user: &str, outbox: &str) -> Vec<String> {
    let u = ident(&user.to_uppercase());
    vec![
        "-- as SYSDBA, once (ARCHIVELOG needs a restart):".into(),
        "SHUTDOWN IMMEDIATE; STARTUP MOUNT; ALTER DATABASE ARCHIVELOG; ALTER DATABASE OPEN;".into(),
        "ALTER DATABASE ADD SUPPLEMENTAL LOG DATA;".into(),
        format!("ALTER TABLE {outbox} ADD SUPPLEMENTAL LOG DATA (ALL) COLUMNS;"),
        format!("GRANT CREATE SESSION, LOGMINING, SELECT ANY TRANSACTION TO {u};"),
        format!("GRANT SELECT ON V_$DATABASE TO {u};"),
        format!("GRANT SELECT ON V_$LOG TO {u};"),
        format!("GRANT SELECT ON V_$LOGFILE TO {u};"),
        format!("GRANT SELECT ON V_$ARCHIVED_LOG TO {u};"),
        format!("GRANT SELECT ON V_$THREAD TO {u};"),
        format!("GRANT SELECT ON V_$TRANSACTION TO {u};"),
        format!("GRANT SELECT ON V_$LOGMNR_CONTENTS TO {u};"),
        format!("GRANT EXECUTE ON DBMS_LOGMNR TO {u};"),
    ]
}

/// The stream: a blocking reader task feeding a bounded channel.
pub struct OracleStream {
    rx: mpsc::Receiver<Result<Change<Position>, SourceError>>,
    reader: tokio::task::JoinHandle<()>,
    counters: Arc<Counters>,
}

/// What the reader counts, for metrics: each a total since the stream
/// opened, updated after every window.
#[derive(Debug, Default)]
pub struct Counters {
    /// Transactions abandoned past `database.transaction_retention`.
    pub abandoned: AtomicU64,
    /// Abandoned transactions that then committed (their events lost).
    pub abandoned_committed: AtomicU64,
    /// Commits of transactions whose start was never mined (redo written
    /// late; see [`transactions`]).
    pub unmatched_commits: AtomicU64,
    /// Outbox rows sent to the dead-letter queue because their `DATA` was
    /// not whole in the INSERT's redo.
    pub unreadable_rows: AtomicU64,
}

impl Counters {
    fn update(&self, tx: &Transactions) {
        self.abandoned
            .store(tx.abandoned_total(), Ordering::Relaxed);
        self.abandoned_committed
            .store(tx.abandoned_committed(), Ordering::Relaxed);
        self.unmatched_commits
            .store(tx.unmatched_commits(), Ordering::Relaxed);
        self.unreadable_rows
            .store(tx.unreadable_rows(), Ordering::Relaxed);
    }
}

impl OracleStream {
    /// The reader's counters (see [`Counters`]).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

impl ChangeStream for OracleStream {
    type Position = Position;

    async fn next(&mut self) -> Result<Change<Position>, SourceError> {
        match self.rx.recv().await {
            Some(item) => item,
            None => Err(SourceError::transient(
                Cause::Query,
                "the LogMiner reader stopped",
            )),
        }
    }

    fn durable(&mut self, _resume: &Position) {
        // Nothing to tell Oracle: the redo we still need is whatever the
        // archived-log retention keeps from the checkpoint's mine_from on.
    }

    async fn close(self) {
        drop(self.rx);
        // The reader stops at its next send or poll (after the window it is
        // reading, at worst).
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.reader).await;
    }
}

/// How long an SCN read from `V$DATABASE` waits before a window may end
/// at it (see [`SettledScn`]).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the connection is: a non-CDB database, a PDB (per-PDB mining), or
/// the root of a CDB (refused: the outbox lives in a PDB, connect there).
fn container(conn: &oracle::Connection) -> Result<Container, SourceError> {
    let (cdb, name): (Option<String>, Option<String>) = conn
        .query_row_as(
            "SELECT CDB, SYS_CONTEXT('USERENV', 'CON_NAME') FROM V$DATABASE",
            &[],
        )
        .map_err(|e| db_error("reading V$DATABASE.CDB", &e))?;
    Ok(match (cdb.as_deref(), name) {
        (Some("YES"), Some(n)) if n == "CDB$ROOT" => Container::Root,
        (Some("YES"), n) => Container::Pdb(n.unwrap_or_default()),
        _ => Container::NonCdb,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Container {
    NonCdb,
    Pdb(String),
    Root,
}

const ROOT_REFUSED: &str = "connected to CDB$ROOT: connect database.url to the PDB that holds the outbox (e.g. oracle://sitesync:…@host:1521/FREEPDB1); sitesync mines per PDB";

/// The reader's loop: windows until the receiver is gone or an error.
fn read_loop(
    mut miner: OracleLogMiner,
    mut tx: Transactions,
    mut sizer: WindowSizer,
    out: mpsc::Sender<Result<Change<Position>, SourceError>>,
    poll: std::time::Duration,
    counters: Arc<Counters>,
) {
    let mut settled = SettledScn::new(SETTLE);
    loop {
        let window = read_window(&mut miner, &mut tx, &mut sizer, &mut settled);
        counters.update(&tx);
        match window {
            Ok(changes) if changes.is_empty() => {
                if out.is_closed() {
                    return;
                }
                std::thread::sleep(poll);
            }
            Ok(changes) => {
                // A window with nothing of ours: the database is quiet, so
                // wait before the next one (the SCN keeps moving anyway).
                let quiet = changes
                    .iter()
                    .all(|c| matches!(c, Change::Heartbeat { .. }));
                for c in changes {
                    if out.blocking_send(Ok(c)).is_err() {
                        return;
                    }
                }
                if quiet {
                    std::thread::sleep(poll);
                }
            }
            Err(e) => {
                let _ = out.blocking_send(Err(e));
                return;
            }
        }
    }
}

impl Source for OracleSource {
    type Position = Position;
    type Stream = OracleStream;

    async fn preflight(&self) -> Vec<Check> {
        let connect = self.connect.clone();
        let (owner, table) = (self.owner.clone(), self.table.clone());
        let outbox = self.outbox_sql_name();
        match blocking(move || {
            let conn = match connect.connect() {
                Ok(c) => c,
                Err(e) => {
                    let (name, fix) = if e.message().contains("libclntsh") {
                        ("Oracle client library", "install Oracle Instant Client (see the message) and set database.client_lib_dir")
                    } else {
                        ("connection", "check database.url, that Oracle is running and that the listener knows the service")
                    };
                    return Ok(vec![Check::fail(name, e.message(), fix)]);
                }
            };
            let mut checks = vec![Check::pass("connection", connect.shown.clone())];
            preflight_queries(&conn, &connect.url.user, &owner, &table, &outbox, &mut checks);
            Ok(checks)
        })
        .await
        {
            Ok(checks) => checks,
            Err(e) => vec![Check::fail("preflight", e.message(), "see the message")],
        }
    }

    async fn init(&self) -> Result<Vec<String>, SourceError> {
        let connect = self.connect.clone();
        let (owner, table) = (self.owner.clone(), self.table.clone());
        let outbox = self.outbox_sql_name();
        let ddl = self.outbox_ddl();
        blocking(move || {
            let conn = connect.connect()?;
            let mut done = Vec::new();
            let exists: i64 = conn
                .query_row_as(
                    "SELECT COUNT(*) FROM ALL_TABLES WHERE OWNER = :1 AND TABLE_NAME = :2",
                    &[&owner, &table],
                )
                .map_err(|e| db_error("looking for the outbox table", &e))?;
            if exists > 0 {
                done.push(format!("outbox table {owner}.{table}: already there"));
            } else {
                conn.execute(&ddl, &[])
                    .map_err(|e| db_error("creating the outbox table", &e))?;
                done.push(format!("outbox table {owner}.{table}: created"));
            }
            let logged: i64 = conn
                .query_row_as(
                    "SELECT COUNT(*) FROM ALL_LOG_GROUPS WHERE OWNER = :1 AND TABLE_NAME = :2 AND LOG_GROUP_TYPE = 'ALL COLUMN LOGGING'",
                    &[&owner, &table],
                )
                .map_err(|e| db_error("reading ALL_LOG_GROUPS", &e))?;
            if logged > 0 {
                done.push("supplemental logging of the outbox's columns: already on".into());
            } else {
                match conn.execute(
                    &format!("ALTER TABLE {outbox} ADD SUPPLEMENTAL LOG DATA (ALL) COLUMNS"),
                    &[],
                ) {
                    Ok(_) => done.push("supplemental logging of the outbox's columns: turned on".into()),
                    Err(e) => done.push(format!(
                        "supplemental logging of the outbox's columns: not turned on ({e}); a DBA runs it (below)"
                    )),
                }
            }
            for (name, ddl, what) in [
                (FLUSH_TABLE, FLUSH_DDL, "log writer flush table", ),
                (ABANDONED_TABLE, ABANDONED_DDL, "abandoned transactions table"),
            ] {
                let there: i64 = conn
                    .query_row_as(
                        "SELECT COUNT(*) FROM USER_TABLES WHERE TABLE_NAME = :1",
                        &[&name],
                    )
                    .map_err(|e| db_error(&format!("looking for {name}"), &e))?;
                if there > 0 {
                    done.push(format!("{what} {name}: already there"));
                } else {
                    conn.execute(ddl, &[])
                        .map_err(|e| db_error(&format!("creating {name}"), &e))?;
                    done.push(format!("{what} {name}: created"));
                }
            }
            done.push(
                "a DBA runs these once (sitesync cannot; `sitesync check` tells which are still needed):".into(),
            );
            for s in dba_statements(&connect.url.user, &outbox) {
                done.push(format!("    {s}"));
            }
            Ok(done)
        })
        .await
    }

    async fn open(&self, resume: Option<&Position>) -> Result<OracleStream, SourceError> {
        let resume = resume.cloned();
        let connect = self.connect.clone();
        let (owner, table) = (self.owner.clone(), self.table.clone());
        let settings = self.cfg.clone();
        let (out, rx) = mpsc::channel(1024);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let setup = (|| {
                let conn = connect.connect()?;
                let add_files = match container(&conn)? {
                    Container::NonCdb => true,
                    Container::Pdb(_) => false,
                    Container::Root => {
                        return Err(SourceError::operator(Cause::Config, ROOT_REFUSED));
                    }
                };
                let mut miner = OracleLogMiner {
                    conn,
                    owner: owner.clone(),
                    table: table.clone(),
                    add_files,
                    flush: true,
                    abandoned_table_missing: false,
                };
                let start = match &resume {
                    Some(_) => 0,
                    None => first_scn(&mut miner)?,
                };
                let mut tx = Transactions::new(
                    (owner, table),
                    resume,
                    start,
                    settings.max_buffered_mib << 20,
                )
                .with_retention(settings.transaction_retention);
                miner::prepare(&mut miner, &mut tx)?;
                Ok((miner, tx))
            })();
            match setup {
                Ok((miner, tx)) => {
                    let _ = ready_tx.send(Ok(()));
                    let sizer = WindowSizer::new(
                        settings.window_min_scn,
                        settings.window_max_scn,
                        settings.window_target_rows,
                    );
                    read_loop(miner, tx, sizer, out, settings.poll_interval, shared);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        match ready_rx.await {
            Ok(Ok(())) => Ok(OracleStream {
                rx,
                reader,
                counters,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SourceError::transient(
                Cause::Query,
                "the LogMiner reader stopped while starting",
            )),
        }
    }

    async fn bounds(&self) -> Result<LogBounds<Position>, SourceError> {
        let connect = self.connect.clone();
        blocking(move || {
            let conn = connect.connect()?;
            let mut miner = OracleLogMiner {
                conn,
                owner: String::new(),
                table: String::new(),
                add_files: false,
                flush: false,
                abandoned_table_missing: false,
            };
            let current = miner.current_scn()?;
            let available = miner.list_logs(0)?;
            let oldest = available.current_files().min_by_key(|f| f.first_scn);
            Ok(LogBounds {
                oldest: oldest.map(|f| Position {
                    scn: f.first_scn,
                    index: 0,
                    mine_from: Some(f.first_scn),
                }),
                latest: Position {
                    scn: current + 1,
                    index: 0,
                    mine_from: Some(current + 1),
                },
                oldest_note: "the start of the oldest redo log still on disk: older redo is gone, so events confirmed before it can only come back from the archive queue".into(),
                detail: match oldest {
                    Some(f) => format!(
                        "redo on disk from SCN {} ({} log sequence {} of thread {}); current SCN {current}. The checkpoint's @SCN is where mining restarts: archived logs from there on must be kept",
                        f.first_scn,
                        if f.archived { "archived" } else { "online" },
                        f.sequence,
                        f.thread
                    ),
                    None => format!("no redo log listed; current SCN {current}"),
                },
            })
        })
        .await
    }

    async fn probe(&self) -> Result<(), SourceError> {
        let connect = self.connect.clone();
        blocking(move || {
            let conn = connect.connect()?;
            conn.query_row("SELECT 1 FROM DUAL", &[])
                .map_err(|e| db_error("probing the database", &e))?;
            Ok(())
        })
        .await
    }

    async fn advance_to_latest(&self) -> Result<Position, SourceError> {
        // Nothing to move in the database: the latest position is the
        // current SCN.
        Ok(self.bounds().await?.latest)
    }
}

/// Where a connector with no checkpoint starts: the SCN at which the outbox
/// table was created (so rows written since `init` are read), or the oldest
/// redo on disk if that is later or unknown.
fn first_scn(miner: &mut OracleLogMiner) -> Result<u64, SourceError> {
    let created: Option<String> = miner
        .conn
        .query_row_as(
            "SELECT TO_CHAR(TIMESTAMP_TO_SCN(CREATED)) FROM ALL_OBJECTS WHERE OWNER = :1 AND OBJECT_NAME = :2 AND OBJECT_TYPE = 'TABLE'",
            &[&miner.owner, &miner.table],
        )
        .ok()
        .flatten();
    let oldest = miner
        .list_logs(0)?
        .current_files()
        .map(|f| f.first_scn)
        .min()
        .unwrap_or(0);
    let start = created
        .and_then(|c| c.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .max(oldest);
    tracing::info!(
        scn = start,
        "no checkpoint: streaming from the outbox table's creation (or the oldest redo on disk)"
    );
    Ok(start)
}

fn preflight_queries(
    conn: &oracle::Connection,
    user: &str,
    owner: &str,
    table: &str,
    outbox: &str,
    checks: &mut Vec<Check>,
) {
    match container(conn) {
        Ok(Container::NonCdb) => checks.push(Check::pass(
            "container",
            "non-CDB database: log files are added with DBMS_LOGMNR.ADD_LOGFILE",
        )),
        Ok(Container::Pdb(name)) => checks.push(Check::pass(
            "container",
            format!(
                "PDB {name}: per-PDB LogMiner (Oracle 19c RU 10 or later; LogMiner finds the logs)"
            ),
        )),
        Ok(Container::Root) => checks.push(Check::fail("container", "CDB$ROOT", ROOT_REFUSED)),
        Err(e) => checks.push(Check::fail("container", e.message(), "see the message")),
    }
    let one = |sql: &str| -> Result<Option<String>, String> {
        conn.query_row_as::<Option<String>>(sql, &[])
            .map_err(|e| e.to_string())
    };
    match one("SELECT LOG_MODE FROM V$DATABASE") {
        Ok(Some(mode)) if mode == "ARCHIVELOG" => checks.push(Check::pass("ARCHIVELOG mode", mode)),
        Ok(mode) => checks.push(Check::fail(
            "ARCHIVELOG mode",
            format!("the database is in {} mode", mode.unwrap_or_default()),
            "as SYSDBA: SHUTDOWN IMMEDIATE; STARTUP MOUNT; ALTER DATABASE ARCHIVELOG; ALTER DATABASE OPEN; (redo must be archived for LogMiner to read what the online logs no longer hold)",
        )),
        Err(e) => checks.push(Check::fail(
            "ARCHIVELOG mode",
            format!("cannot read V$DATABASE: {e}"),
            format!("GRANT SELECT ON V_$DATABASE TO {};", ident(&user.to_uppercase())),
        )),
    }
    match one("SELECT SUPPLEMENTAL_LOG_DATA_MIN FROM V$DATABASE") {
        Ok(Some(min)) if min == "YES" || min == "IMPLICIT" => {
            checks.push(Check::pass("supplemental logging (minimal)", min))
        }
        Ok(min) => checks.push(Check::fail(
            "supplemental logging (minimal)",
            format!("SUPPLEMENTAL_LOG_DATA_MIN = {}", min.unwrap_or_default()),
            "as SYSDBA: ALTER DATABASE ADD SUPPLEMENTAL LOG DATA;",
        )),
        Err(e) => checks.push(Check::fail(
            "supplemental logging (minimal)",
            e,
            "GRANT SELECT ON V_$DATABASE",
        )),
    }
    let count = |sql: &str, a: &str, b: &str| -> Result<i64, String> {
        conn.query_row_as::<i64>(sql, &[&a, &b])
            .map_err(|e| e.to_string())
    };
    match count(
        "SELECT COUNT(*) FROM ALL_TAB_COLUMNS WHERE OWNER = :1 AND TABLE_NAME = :2 AND COLUMN_NAME IN ('ID', 'TYPE', 'DATA')",
        owner,
        table,
    ) {
        Ok(3) => checks.push(Check::pass("outbox table", format!("{owner}.{table}"))),
        Ok(0) => checks.push(Check::fail(
            "outbox table",
            format!("{owner}.{table} does not exist (or this user cannot see it)"),
            "run `sitesync init`",
        )),
        Ok(_) => checks.push(Check::fail(
            "outbox table",
            format!("{owner}.{table} lacks ID, TYPE or DATA"),
            "the outbox needs ID, CREATED_AT, ORIGIN, TYPE, ENTITY_KEY and DATA (see `sitesync init`)",
        )),
        Err(e) => checks.push(Check::fail("outbox table", e, "see the message")),
    }
    match conn.query_row_as::<(Option<String>, Option<i64>)>(
        "SELECT DATA_TYPE, DATA_LENGTH FROM ALL_TAB_COLUMNS WHERE OWNER = :1 AND TABLE_NAME = :2 AND COLUMN_NAME = 'DATA'",
        &[&owner, &table],
    ) {
        Ok((Some(data_type), length)) => checks.push(data_column_check(
            outbox,
            &data_type,
            length.unwrap_or(0),
        )),
        // No DATA column: the outbox table check above says so.
        Ok((None, _)) => {}
        Err(e) if e.to_string().contains("ORA-01403") => {}
        Err(e) => checks.push(Check::fail("outbox DATA column", e.to_string(), "see the message")),
    }
    match super::miner::read_redo_threads(conn) {
        Ok((threads, exact)) => match single_redo_thread(&threads) {
            Ok(()) if exact => checks.push(Check::pass(
                "redo threads",
                "one enabled redo thread (a single instance)",
            )),
            Ok(()) => checks.push(Check::warn(
                "redo threads",
                "one thread in V$LOG (V$THREAD is not readable)",
                format!("GRANT SELECT ON V_$THREAD TO {};", ident(&user.to_uppercase())),
            )),
            Err(m) => checks.push(Check::fail(
                "redo threads",
                m,
                "mine a single-instance database; disable threads left over from a former RAC (ALTER DATABASE DISABLE THREAD n)",
            )),
        },
        Err(e) => checks.push(Check::fail("redo threads", e.message(), "see the message")),
    }
    match count(
        "SELECT COUNT(*) FROM ALL_LOG_GROUPS WHERE OWNER = :1 AND TABLE_NAME = :2 AND LOG_GROUP_TYPE = 'ALL COLUMN LOGGING'",
        owner,
        table,
    ) {
        Ok(n) if n > 0 => checks.push(Check::pass(
            "supplemental logging (outbox columns)",
            "ALL COLUMN LOGGING",
        )),
        Ok(_) => checks.push(Check::fail(
            "supplemental logging (outbox columns)",
            format!("no ALL COLUMN log group on {owner}.{table}"),
            format!("ALTER TABLE {outbox} ADD SUPPLEMENTAL LOG DATA (ALL) COLUMNS;"),
        )),
        Err(e) => checks.push(Check::fail(
            "supplemental logging (outbox columns)",
            e,
            "see the message",
        )),
    }
    let u = ident(&user.to_uppercase());
    let privs: Vec<String> = conn
        .query_as::<String>("SELECT PRIVILEGE FROM SESSION_PRIVS", &[])
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default();
    for (p, why) in [
        ("LOGMINING", "to start LogMiner (12c and later)"),
        ("SELECT ANY TRANSACTION", "to read V$LOGMNR_CONTENTS"),
    ] {
        if privs.iter().any(|have| have == p) {
            checks.push(Check::pass(format!("privilege {p}"), "granted"));
        } else {
            checks.push(Check::fail(
                format!("privilege {p}"),
                format!("missing ({why})"),
                format!("GRANT {p} TO {u};"),
            ));
        }
    }
    // Without V$THREAD the threads are read from V$LOG, and without
    // V$TRANSACTION commits never seen starting are not counted: both work,
    // less well.
    for (view, needed) in [
        ("V$DATABASE", true),
        ("V$LOG", true),
        ("V$LOGFILE", true),
        ("V$ARCHIVED_LOG", true),
        ("V$THREAD", false),
        ("V$TRANSACTION", false),
    ] {
        let name = format!("SELECT on {view}");
        let grant = format!("GRANT SELECT ON {} TO {u};", view.replace("V$", "V_$"));
        match conn.query_row(
            &format!("SELECT COUNT(*) FROM {view} WHERE ROWNUM = 1"),
            &[],
        ) {
            Ok(_) => checks.push(Check::pass(name, "granted")),
            Err(e) if needed => checks.push(Check::fail(name, e.to_string(), grant)),
            Err(e) => checks.push(Check::warn(name, e.to_string(), grant)),
        }
    }
    match conn.query_row_as::<i64>(
        "SELECT COUNT(*) FROM USER_TABLES WHERE TABLE_NAME = :1",
        &[&ABANDONED_TABLE],
    ) {
        Ok(n) if n > 0 => checks.push(Check::pass(
            "abandoned transactions table",
            format!("{ABANDONED_TABLE} (what `sitesync status` lists)"),
        )),
        Ok(_) => checks.push(Check::fail(
            "abandoned transactions table",
            format!("{ABANDONED_TABLE} is missing: `sitesync status` could not name a transaction abandoned past database.transaction_retention"),
            "run `sitesync init`",
        )),
        Err(e) => checks.push(Check::fail(
            "abandoned transactions table",
            e.to_string(),
            "see the message",
        )),
    }
    match conn.query_row_as::<i64>(
        "SELECT COUNT(*) FROM USER_TABLES WHERE TABLE_NAME = :1",
        &[&FLUSH_TABLE],
    ) {
        Ok(n) if n > 0 => checks.push(Check::pass(
            "log writer flush table",
            format!("{FLUSH_TABLE} (updated before each window)"),
        )),
        Ok(_) => checks.push(Check::fail(
            "log writer flush table",
            format!("{FLUSH_TABLE} is missing: without it a window could pass over redo still in the log buffer"),
            "run `sitesync init`",
        )),
        Err(e) => checks.push(Check::fail("log writer flush table", e.to_string(), "see the message")),
    }
    // Outside a LogMiner session V$LOGMNR_CONTENTS answers ORA-01306 when it
    // may be read, and ORA-00942 when it may not.
    match conn.query_row("SELECT COUNT(*) FROM V$LOGMNR_CONTENTS", &[]) {
        Err(e) if e.to_string().contains("ORA-00942") => checks.push(Check::fail(
            "SELECT on V$LOGMNR_CONTENTS",
            e.to_string(),
            format!("GRANT SELECT ON V_$LOGMNR_CONTENTS TO {u};"),
        )),
        _ => checks.push(Check::pass("SELECT on V$LOGMNR_CONTENTS", "granted")),
    }
    match count(
        "SELECT COUNT(*) FROM ALL_OBJECTS WHERE OWNER = :1 AND OBJECT_NAME = :2 AND OBJECT_TYPE = 'PACKAGE'",
        "SYS",
        "DBMS_LOGMNR",
    ) {
        Ok(n) if n > 0 => checks.push(Check::pass("EXECUTE on DBMS_LOGMNR", "granted")),
        _ => checks.push(Check::fail(
            "EXECUTE on DBMS_LOGMNR",
            "the package is not visible to this user",
            format!("GRANT EXECUTE ON DBMS_LOGMNR TO {u};"),
        )),
    }
    // Where archived logs start: what a checkpoint can still resume from.
    match one("SELECT TO_CHAR(MIN(A.FIRST_CHANGE#)) FROM V$ARCHIVED_LOG A JOIN V$DATABASE D ON A.RESETLOGS_CHANGE# = D.RESETLOGS_CHANGE# AND A.RESETLOGS_TIME = D.RESETLOGS_TIME WHERE A.STATUS = 'A' AND A.DELETED = 'NO'") {
        Ok(Some(scn)) => checks.push(Check::pass(
            "archived redo",
            format!("on disk from SCN {scn}: a checkpoint older than that cannot be resumed"),
        )),
        Ok(None) => checks.push(Check::warn(
            "archived redo",
            "no archived log on disk yet",
            "fine on a new database; keep archived logs until sitesync has read them (RMAN retention)",
        )),
        Err(_) => {}
    }
}

/// The most `DATA` may hold, in bytes: LogMiner writes a longer value out
/// of line (a LOB, or an extended VARCHAR2 over 4,000 bytes, as LOB-like
/// `32K` operations), and sitesync reads `DATA` from the INSERT only.
pub const DATA_MAX_BYTES: i64 = 4000;

/// The `check` of the outbox's `DATA` column, from `ALL_TAB_COLUMNS`'
/// `DATA_TYPE` and `DATA_LENGTH` (bytes).
pub fn data_column_check(outbox: &str, data_type: &str, data_length: i64) -> Check {
    let name = "outbox DATA column";
    let kind = data_type.trim().to_ascii_uppercase();
    match kind.as_str() {
        "VARCHAR2" | "NVARCHAR2" if data_length <= DATA_MAX_BYTES => Check::pass(
            name,
            format!("{kind}, {data_length} bytes at most: LogMiner carries it whole in the INSERT"),
        ),
        "VARCHAR2" | "NVARCHAR2" => Check::fail(
            name,
            format!(
                "{kind} of {data_length} bytes (MAX_STRING_SIZE = EXTENDED): LogMiner writes a value over {DATA_MAX_BYTES} bytes out of line, which sitesync does not read, so such an event would go to the dead-letter queue instead of the other sites"
            ),
            format!(
                "ALTER TABLE {outbox} MODIFY (DATA VARCHAR2(4000 BYTE)); (fails while a longer value is in the outbox: let sitesync drain it first). Keep payloads under 4,000 bytes"
            ),
        ),
        _ => Check::fail(
            name,
            format!(
                "{kind}: LogMiner writes a {kind} value over about 4,000 bytes out of line, which sitesync does not read, so such an event would go to the dead-letter queue instead of the other sites"
            ),
            format!(
                "DATA must be VARCHAR2(4000 BYTE) (or NVARCHAR2(2000)); a {kind} column cannot be modified into one: once sitesync has drained the outbox, rename it, run `sitesync init` to create {outbox} anew, and move the application to it. Keep payloads under 4,000 bytes"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defect_7_check_refuses_a_lob_or_over_4000_byte_data_column() {
        let outbox = "\"APP\".\"OUTBOX\"";
        let pass = data_column_check(outbox, "VARCHAR2", 4000);
        assert_eq!(pass.status, crate::checks::Status::Pass, "{pass:?}");
        let pass = data_column_check(outbox, "NVARCHAR2", 4000);
        assert_eq!(pass.status, crate::checks::Status::Pass, "{pass:?}");
        // VARCHAR2(32767), or VARCHAR2(4000 CHAR) in AL32UTF8 under
        // MAX_STRING_SIZE = EXTENDED (16,000 bytes).
        for length in [32767, 16000] {
            let c = data_column_check(outbox, "VARCHAR2", length);
            assert_eq!(c.status, crate::checks::Status::Fail, "{c:?}");
            assert!(c.detail.contains("out of line"), "{c:?}");
            assert!(
                c.fix
                    .as_deref()
                    .unwrap_or_default()
                    .contains("MODIFY (DATA VARCHAR2(4000 BYTE))"),
                "{c:?}"
            );
        }
        for lob in ["CLOB", "NCLOB", "BLOB", "JSON"] {
            let c = data_column_check(outbox, lob, 4000);
            assert_eq!(c.status, crate::checks::Status::Fail, "{c:?}");
            assert!(
                c.fix
                    .as_deref()
                    .unwrap_or_default()
                    .contains("VARCHAR2(4000 BYTE)"),
                "{c:?}"
            );
        }
    }

    #[test]
    fn outbox_names_and_ddl() {
        assert_eq!(
            outbox_names("OUTBOX", "sitesync"),
            ("SITESYNC".into(), "OUTBOX".into())
        );
        assert_eq!(
            outbox_names("app.outbox", "sitesync"),
            ("APP".into(), "OUTBOX".into())
        );
        let ddl = outbox_ddl("\"APP\".\"OUTBOX\"", "MAD'RID");
        assert!(
            ddl.starts_with("CREATE TABLE \"APP\".\"OUTBOX\" ("),
            "{ddl}"
        );
        assert!(ddl.contains("DEFAULT 'MAD''RID' NOT NULL"), "{ddl}");
        assert!(
            ddl.contains(
                "DATA VARCHAR2(4000 BYTE) NOT NULL CONSTRAINT \"OUTBOX_DATA_JSON\" CHECK (DATA IS JSON)"
            ),
            "{ddl}"
        );
        assert!(ddl.contains("'\\1-\\2-\\3-\\4-\\5'"), "{ddl}");
        let dba = dba_statements("sitesync", "\"APP\".\"OUTBOX\"").join("\n");
        for needle in [
            "ALTER DATABASE ARCHIVELOG",
            "ALTER DATABASE ADD SUPPLEMENTAL LOG DATA;",
            "GRANT CREATE SESSION, LOGMINING, SELECT ANY TRANSACTION TO \"SITESYNC\"",
            "GRANT EXECUTE ON DBMS_LOGMNR TO \"SITESYNC\"",
            "V_$ARCHIVED_LOG",
            "GRANT SELECT ON V_$THREAD TO \"SITESYNC\"",
            "GRANT SELECT ON V_$TRANSACTION TO \"SITESYNC\"",
        ] {
            assert!(dba.contains(needle), "{needle}: {dba}");
        }
    }
}
