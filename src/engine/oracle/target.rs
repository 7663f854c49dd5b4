//! Applying events to Oracle.
//!
//! The batch is the sink's ([`crate::sink::batch`], the same for every
//! engine): one transaction per batch holds the inbox rows
//! (`SITESYNC_INBOX`), the per-origin progress and gaps, the deletion of
//! this site's outbox rows whose events came back round, the writes
//! (`MERGE` for upserts, `DELETE` for deletes), the entities' versions and
//! the conflicts; last-writer-wins ([`crate::sink::rules::decide`]) is fed
//! with the stored versions and this site's writes still in its outbox
//! (compared by their `CREATED_AT`: Oracle keeps no commit time per row).
//!
//! Statements are sent one row at a time with binds. The `oracle` crate is
//! blocking: each step of a batch runs on `spawn_blocking`, on the
//! session's one connection. The steps, their retries and the isolation of
//! a message whose data fails (a constraint, a conversion, an application
//! trigger's `RAISE_APPLICATION_ERROR`) are the sink's
//! ([`crate::sink::batch`]); a message is isolated under a `SAVEPOINT`.
//!
//! Trigger marker: the sink's session runs
//! `DBMS_SESSION.SET_IDENTIFIER('sitesync')` once connected, so an
//! application trigger that fills the outbox skips the sink's changes with
//! `IF SYS_CONTEXT('USERENV', 'CLIENT_IDENTIFIER') = 'sitesync' THEN RETURN; END IF;`.
//! (An application context would need `CREATE ANY CONTEXT` and a trusted
//! package; the client identifier needs no privilege.)
//!
//! Values: each column is bound as text (numbers in their JSON form,
//! converted by Oracle with `NLS_NUMERIC_CHARACTERS = '.,'`; booleans as
//! `1`/`0`; objects and arrays as JSON text; `null` as NULL). DATE and
//! TIMESTAMP columns (their types read from `ALL_TAB_COLUMNS` once per
//! table) take a timestamp in any form the outbox accepts (RFC 3339, or
//! ISO with or without a zone, read as UTC) through `TO_TIMESTAMP_TZ`, and
//! store it in UTC (with its zone for TIMESTAMP WITH TIME ZONE).
//!
//! Not done here (PostgreSQL's session does them): locking the batch's
//! rows before looking for local writes, and rewriting a row whose local
//! write lost a race with the sink on this site's table
//! (`Session::CHECKS_OWN_ROWS` is false).

use super::conn::{OracleConnect, outbox_names};
use super::settings::Settings;
use crate::checks::Check;
use crate::config::{ConnectorConfig, Operation, Route, SinkConfig};
use crate::error::{Cause, TargetError};
use crate::event::{Event, parse_timestamp};
use crate::sink::Seen;
use crate::sink::batch::{
    self, Dialect, Failed, GapMark, Local, OpenGap, Origins, Progress, Session, Start, Stored,
    Write,
};
use crate::sink::batch::{ReceiptRow, Traced};
use crate::sink::control::Receipt;
use crate::sink::mapping::{Entity, MappedRow};
use crate::sink::rules::{self, Conflict, GapRow, LateArrivals, Version};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// The marker application triggers test.
pub const CLIENT_IDENTIFIER: &str = "sitesync";

/// The sink's tables, created by `sitesync init` when missing.
pub const TABLES: [(&str, &str); 6] = [
    (
        "SITESYNC_INBOX",
        "CREATE TABLE SITESYNC_INBOX (EVENT_ID VARCHAR2(36) PRIMARY KEY, ORIGIN VARCHAR2(64) NOT NULL, TYPE VARCHAR2(200) NOT NULL, EPOCH NUMBER(19) NOT NULL, SEQ NUMBER(19) NOT NULL, RECEIVED_AT TIMESTAMP(6) WITH TIME ZONE DEFAULT SYSTIMESTAMP NOT NULL, APPLIED_AT TIMESTAMP(6) WITH TIME ZONE DEFAULT SYSTIMESTAMP NOT NULL, OUTCOME VARCHAR2(20) NOT NULL)",
    ),
    (
        "SITESYNC_ORIGINS",
        "CREATE TABLE SITESYNC_ORIGINS (ORIGIN VARCHAR2(64) PRIMARY KEY, EPOCH NUMBER(19) NOT NULL, SEQ NUMBER(19) NOT NULL, UPDATED_AT TIMESTAMP(6) WITH TIME ZONE DEFAULT SYSTIMESTAMP NOT NULL)",
    ),
    (
        "SITESYNC_GAPS",
        "CREATE TABLE SITESYNC_GAPS (ID NUMBER GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ORIGIN VARCHAR2(64) NOT NULL, EPOCH NUMBER(19) NOT NULL, FROM_SEQ NUMBER(19) NOT NULL, TO_SEQ NUMBER(19) NOT NULL, DETECTED_AT TIMESTAMP(6) WITH TIME ZONE DEFAULT SYSTIMESTAMP NOT NULL, REQUESTED_AT TIMESTAMP(6) WITH TIME ZONE, NOTE VARCHAR2(400))",
    ),
    (
        "SITESYNC_VERSIONS",
        "CREATE TABLE SITESYNC_VERSIONS (ENTITY VARCHAR2(261) NOT NULL, KEY VARCHAR2(1000) NOT NULL, TS TIMESTAMP(6) WITH TIME ZONE NOT NULL, ORIGIN VARCHAR2(64) NOT NULL, EVENT_ID VARCHAR2(36) NOT NULL, PRIMARY KEY (ENTITY, KEY))",
    ),
    (
        "SITESYNC_CONFLICTS",
        "CREATE TABLE SITESYNC_CONFLICTS (ID NUMBER GENERATED ALWAYS AS IDENTITY PRIMARY KEY, LOSER_EVENT_ID VARCHAR2(36) NOT NULL UNIQUE, ENTITY VARCHAR2(261) NOT NULL, KEY VARCHAR2(1000) NOT NULL, LOSER_ORIGIN VARCHAR2(64) NOT NULL, LOSER_TS TIMESTAMP(6) WITH TIME ZONE NOT NULL, LOSER_PAYLOAD CLOB, WINNER_EVENT_ID VARCHAR2(36) NOT NULL, WINNER_ORIGIN VARCHAR2(64) NOT NULL, WINNER_TS TIMESTAMP(6) WITH TIME ZONE NOT NULL, RECORDED_AT TIMESTAMP(6) WITH TIME ZONE DEFAULT SYSTIMESTAMP NOT NULL)",
    ),
    (
        "SITESYNC_RECEIPTS",
        "CREATE TABLE SITESYNC_RECEIPTS (EVENT_ID VARCHAR2(36) NOT NULL, SITE VARCHAR2(64) NOT NULL, EPOCH NUMBER(19) NOT NULL, SEQ NUMBER(19) NOT NULL, OUTCOME VARCHAR2(20) NOT NULL, REASON VARCHAR2(4000), AT TIMESTAMP(6) WITH TIME ZONE NOT NULL, RECEIVED_AT TIMESTAMP(6) WITH TIME ZONE DEFAULT SYSTIMESTAMP NOT NULL, PRIMARY KEY (EVENT_ID, SITE))",
    ),
];

/// The columns later versions added to `SITESYNC_GAPS`, with their type
/// (`init` adds those a table made by an older sitesync lacks).
const GAP_COLUMNS: [(&str, &str); 2] = [
    ("REQUESTED_AT", "TIMESTAMP(6) WITH TIME ZONE"),
    ("NOTE", "VARCHAR2(400)"),
];

/// The columns of [`GAP_COLUMNS`] that `SITESYNC_GAPS` lacks.
fn missing_gap_columns(conn: &oracle::Connection) -> Result<Vec<&'static str>, oracle::Error> {
    let mut missing = Vec::new();
    for (name, _) in GAP_COLUMNS {
        let n: i64 = conn.query_row_as(
            "SELECT COUNT(*) FROM USER_TAB_COLUMNS WHERE TABLE_NAME = 'SITESYNC_GAPS' AND COLUMN_NAME = :1",
            &[&name],
        )?;
        if n == 0 {
            missing.push(name);
        }
    }
    Ok(missing)
}

/// An identifier as Oracle resolves it: a plain name (`customer`) is
/// upper-cased as Oracle does unquoted names; anything else is quoted as
/// written.
pub fn oracle_ident(name: &str) -> String {
    let plain = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '#'));
    if plain {
        format!("\"{}\"", name.to_ascii_uppercase())
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// `[schema.]table`, each part through [`oracle_ident`].
pub fn oracle_table(name: &str) -> String {
    name.split('.')
        .map(oracle_ident)
        .collect::<Vec<_>>()
        .join(".")
}

/// How a column's value is bound, by the column's type: DATE and
/// TIMESTAMP columns take the event's timestamp text (any form
/// [`parse_timestamp`] reads, sent as UTC) through `TO_TIMESTAMP_TZ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    Text,
    Date,
    Timestamp,
    TimestampTz,
}

impl Bind {
    /// From `ALL_TAB_COLUMNS.DATA_TYPE`.
    pub fn of(data_type: &str) -> Bind {
        if data_type == "DATE" {
            Bind::Date
        } else if data_type.starts_with("TIMESTAMP") && data_type.contains("TIME ZONE") {
            Bind::TimestampTz
        } else if data_type.starts_with("TIMESTAMP") {
            Bind::Timestamp
        } else {
            Bind::Text
        }
    }

    /// The SQL expression for bind `:n`.
    pub fn expr(self, n: usize) -> String {
        let tz = format!("TO_TIMESTAMP_TZ(:{n}, '{TS_FORMAT_9}')");
        match self {
            Bind::Text => format!(":{n}"),
            Bind::Date => format!("CAST({tz} AT TIME ZONE 'UTC' AS DATE)"),
            Bind::Timestamp => format!("CAST({tz} AT TIME ZONE 'UTC' AS TIMESTAMP)"),
            Bind::TimestampTz => tz,
        }
    }

    /// The text bound for a JSON value.
    pub fn text(self, v: &Value) -> Option<String> {
        let text = bind_text(v)?;
        if self == Bind::Text {
            return Some(text);
        }
        Some(match parse_timestamp(&text) {
            Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.9f+00:00").to_string(),
            None => text,
        })
    }
}

const TS_FORMAT_9: &str = "YYYY-MM-DD\"T\"HH24:MI:SS.FF9TZH:TZM";

/// `MERGE` for an upsert of `columns` keyed by `key`: binds `:1…:n` in
/// `columns` order, each through its [`Bind`].
pub fn merge_sql(table: &str, columns: &[(&str, Bind)], key: &[String]) -> String {
    let t = oracle_table(table);
    let source = columns
        .iter()
        .enumerate()
        .map(|(i, (c, b))| format!("{} {}", b.expr(i + 1), oracle_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let columns: Vec<&str> = columns.iter().map(|(c, _)| *c).collect();
    let on = key
        .iter()
        .map(|k| format!("t.{q} = s.{q}", q = oracle_ident(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| !key.iter().any(|k| k == *c))
        .map(|c| format!("t.{q} = s.{q}", q = oracle_ident(c)))
        .collect();
    let insert_cols = columns
        .iter()
        .map(|c| oracle_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let insert_vals = columns
        .iter()
        .map(|c| format!("s.{}", oracle_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let matched = if updates.is_empty() {
        String::new()
    } else {
        format!(" WHEN MATCHED THEN UPDATE SET {}", updates.join(", "))
    };
    format!(
        "MERGE INTO {t} t USING (SELECT {source} FROM DUAL) s ON ({on}){matched} WHEN NOT MATCHED THEN INSERT ({insert_cols}) VALUES ({insert_vals})"
    )
}

/// `DELETE` by key: binds `:1…:n` in `key` order.
pub fn delete_sql(table: &str, key: &[(&str, Bind)]) -> String {
    let cond = key
        .iter()
        .enumerate()
        .map(|(i, (k, b))| format!("{} = {}", oracle_ident(k), b.expr(i + 1)))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!("DELETE FROM {} WHERE {cond}", oracle_table(table))
}

/// Inbox row: inserted, or taken over from a dead letter coming back.
/// `row_count() == 1` means the event is new.
pub const INBOX_SQL: &str = "MERGE INTO SITESYNC_INBOX i USING (SELECT :1 EVENT_ID, :2 ORIGIN, :3 TYPE, :4 EPOCH, :5 SEQ, :6 OUTCOME FROM DUAL) s \
     ON (i.EVENT_ID = s.EVENT_ID) \
     WHEN MATCHED THEN UPDATE SET i.OUTCOME = s.OUTCOME, i.RECEIVED_AT = SYSTIMESTAMP, i.APPLIED_AT = SYSTIMESTAMP WHERE i.OUTCOME = 'dead_letter' \
     WHEN NOT MATCHED THEN INSERT (EVENT_ID, ORIGIN, TYPE, EPOCH, SEQ, OUTCOME) VALUES (s.EVENT_ID, s.ORIGIN, s.TYPE, s.EPOCH, s.SEQ, s.OUTCOME)";

/// Timestamps travel as text in this form (UTC).
const TS_FORMAT: &str = "YYYY-MM-DD\"T\"HH24:MI:SS.FF6TZH:TZM";

/// An entity's version moves only forward on `(ts, origin)`.
pub const VERSION_SQL: &str = "MERGE INTO SITESYNC_VERSIONS v USING (SELECT :1 ENTITY, :2 KEY, TO_TIMESTAMP_TZ(:3, 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6TZH:TZM') TS, :4 ORIGIN, :5 EVENT_ID FROM DUAL) s \
     ON (v.ENTITY = s.ENTITY AND v.KEY = s.KEY) \
     WHEN MATCHED THEN UPDATE SET v.TS = s.TS, v.ORIGIN = s.ORIGIN, v.EVENT_ID = s.EVENT_ID \
       WHERE s.TS > v.TS OR (s.TS = v.TS AND s.ORIGIN > v.ORIGIN) \
     WHEN NOT MATCHED THEN INSERT (ENTITY, KEY, TS, ORIGIN, EVENT_ID) VALUES (s.ENTITY, s.KEY, s.TS, s.ORIGIN, s.EVENT_ID)";

pub const CONFLICT_SQL: &str = "MERGE INTO SITESYNC_CONFLICTS c USING (SELECT :1 LOSER_EVENT_ID FROM DUAL) s ON (c.LOSER_EVENT_ID = s.LOSER_EVENT_ID) \
     WHEN NOT MATCHED THEN INSERT (LOSER_EVENT_ID, ENTITY, KEY, LOSER_ORIGIN, LOSER_TS, LOSER_PAYLOAD, WINNER_EVENT_ID, WINNER_ORIGIN, WINNER_TS) \
     VALUES (s.LOSER_EVENT_ID, :2, :3, :4, TO_TIMESTAMP_TZ(:5, 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6TZH:TZM'), :6, :7, :8, TO_TIMESTAMP_TZ(:9, 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6TZH:TZM'))";

fn ts_text(v: &Version) -> String {
    v.ts.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

/// A JSON value as the text bound for its column (`None`: NULL).
pub fn bind_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(if *b { "1" } else { "0" }.into()),
        Value::Number(n) => Some(n.to_string()),
        other => Some(other.to_string()),
    }
}

/// Whether an ORA- error belongs to one message's data.
fn per_message(code: u32) -> bool {
    matches!(
        code,
        1 | 904
            | 942
            | 1400
            | 1407
            | 1438
            | 1722
            | 1830
            | 1840
            | 1841
            | 1843
            | 1847
            | 1858
            | 1861
            | 2290
            | 2291
            | 2292
            | 4088
            | 4091
            | 6502
            | 6512
            | 12899
            | 30926
            | 40441
    ) || (20000..=20999).contains(&code)
}

/// The ORA- code of an error message (the source's parser).
fn ora_code(message: &str) -> Option<u32> {
    super::conn::code(message, "ORA-")
}

/// How an `oracle` crate error fails a batch.
fn failed(context: &str, e: oracle::Error) -> Failed {
    let m = e.to_string();
    match ora_code(&m) {
        // Resource busy (NOWAIT), deadlock, serialization failure: the
        // whole batch is rolled back and tried again.
        Some(54 | 60 | 8177) => Failed::Busy,
        Some(c) if per_message(c) => Failed::Data(m),
        _ => Failed::Batch(TargetError::transient(
            super::conn::cause_of(&m),
            format!("{context}: {m}"),
        )),
    }
}

/// An error outside a batch's statements (init, the sweep): retried.
fn failed_outside_batch(context: &str, e: oracle::Error) -> TargetError {
    let m = e.to_string();
    TargetError::transient(super::conn::cause_of(&m), format!("{context}: {m}"))
}

/// A blocking task that panicked or was cancelled.
fn task_failed(e: tokio::task::JoinError) -> TargetError {
    TargetError::transient(Cause::Query, format!("the Oracle sink task failed: {e}"))
}

/// The Oracle side of the sink: connections, `init` and `check`.
pub struct OracleTarget {
    site: String,
    sink: Arc<SinkConfig>,
    connect: OracleConnect,
    outbox: String,
}

impl OracleTarget {
    pub fn new(cfg: &ConnectorConfig, db: &Settings) -> Result<OracleTarget, TargetError> {
        let connect = OracleConnect::new(db)?;
        let (owner, table) = outbox_names(&db.outbox_table, &connect.url.user);
        Ok(OracleTarget {
            site: cfg.site.clone(),
            sink: Arc::new(cfg.sink.clone()),
            outbox: format!("\"{owner}\".\"{table}\""),
            connect,
        })
    }
}

/// What the blocking side needs besides the connection.
struct Ctx {
    site: String,
    sink: Arc<SinkConfig>,
    outbox: String,
    /// Route tables' column types (see [`column_types`]), for this
    /// connection (a new connection may see changed tables).
    columns: Mutex<HashMap<String, HashMap<String, Bind>>>,
}

impl Dialect for OracleTarget {
    type Session = OracleSession;

    const BUSY_RETRIES: u32 = 5;

    /// A connection with the trigger marker set. Every statement the sink
    /// sends runs on it: a connection opened without the marker (the idle
    /// sweep once opened one) would let application triggers copy the
    /// sink's writes into the outbox.
    async fn connect(&self) -> Result<OracleSession, TargetError> {
        let connect = self.connect.clone();
        let conn = tokio::task::spawn_blocking(move || {
            let conn = connect.connect()?;
            conn.execute(MARKER_SQL, &[]).map_err(|e| {
                TargetError::transient(
                    Cause::Query,
                    format!("setting the trigger marker (DBMS_SESSION.SET_IDENTIFIER): {e}"),
                )
            })?;
            Ok::<_, TargetError>(conn)
        })
        .await
        .map_err(task_failed)??;
        Ok(OracleSession {
            conn: Arc::new(Mutex::new(conn)),
            ctx: Arc::new(Ctx {
                site: self.site.clone(),
                sink: self.sink.clone(),
                outbox: self.outbox.clone(),
                columns: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Creates the sink's tables that are missing; one line per table.
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let connect = self.connect.clone();
        tokio::task::spawn_blocking(move || {
            let conn = connect.connect()?;
            let mut done = Vec::new();
            for (name, ddl) in TABLES {
                let n: i64 = conn
                    .query_row_as("SELECT COUNT(*) FROM USER_TABLES WHERE TABLE_NAME = :1", &[&name])
                    .map_err(|e| failed_outside_batch(&format!("looking for {name}"), e))?;
                if n > 0 {
                    done.push(format!("sink table {name}: already there"));
                } else {
                    conn.execute(ddl, &[])
                        .map_err(|e| {
                            TargetError::operator(
                                super::conn::cause_of(&e.to_string()),
                                format!("creating {name}: {e}"),
                            )
                        })?;
                    done.push(format!("sink table {name}: created"));
                }
            }
            let missing = missing_gap_columns(&conn)
                .map_err(|e| failed_outside_batch("reading the columns of SITESYNC_GAPS", e))?;
            for name in missing {
                let (_, kind) = GAP_COLUMNS.iter().find(|(n, _)| *n == name).expect("listed");
                conn.execute(&format!("ALTER TABLE SITESYNC_GAPS ADD ({name} {kind})"), &[])
                    .map_err(|e| failed_outside_batch("adding columns to SITESYNC_GAPS", e))?;
                done.push(format!("sink table SITESYNC_GAPS: column {name} added"));
            }
            done.push(format!(
                "trigger marker: the sink's session sets CLIENT_IDENTIFIER = '{CLIENT_IDENTIFIER}'; an outbox trigger skips it with IF SYS_CONTEXT('USERENV', 'CLIENT_IDENTIFIER') = '{CLIENT_IDENTIFIER}' THEN RETURN; END IF;"
            ));
            Ok(done)
        })
        .await
        .map_err(task_failed)?
    }

    /// Checks the sink's tables and each route's table.
    async fn preflight(&self) -> Vec<Check> {
        let connect = self.connect.clone();
        let routes = self.sink.routes.clone();
        let run = tokio::task::spawn_blocking(move || {
            let conn = match connect.connect() {
                Ok(c) => c,
                Err(e) => {
                    let fix = if e.message().contains("libclntsh") {
                        "install Oracle Instant Client (see the message) and set database.client_lib_dir"
                    } else {
                        "check database.url"
                    };
                    return vec![Check::fail("sink database", e.message(), fix)];
                }
            };
            let mut checks = Vec::new();
            let missing: Vec<&str> = TABLES
                .iter()
                .map(|(name, _)| *name)
                .filter(|name| {
                    conn.query_row_as::<i64>(
                        "SELECT COUNT(*) FROM USER_TABLES WHERE TABLE_NAME = :1",
                        &[name],
                    )
                    .map(|n| n == 0)
                    .unwrap_or(true)
                })
                .collect();
            let old_gaps = if missing.is_empty() {
                missing_gap_columns(&conn).unwrap_or_default()
            } else {
                Vec::new()
            };
            checks.push(if missing.is_empty() && old_gaps.is_empty() {
                Check::pass(
                    "sink tables",
                    "SITESYNC_INBOX, _ORIGINS, _GAPS, _VERSIONS, _CONFLICTS",
                )
            } else if missing.is_empty() {
                Check::fail(
                    "sink tables",
                    format!(
                        "SITESYNC_GAPS lacks {} (made by an older sitesync)",
                        old_gaps.join(", ")
                    ),
                    "run `sitesync init`: it adds them",
                )
            } else {
                Check::fail(
                    "sink tables",
                    format!("missing: {}", missing.join(", ")),
                    "run `sitesync init`",
                )
            });
            for route in &routes {
                let name = format!("route {}", route.kind);
                let sql = format!("SELECT * FROM {} WHERE 1 = 0", oracle_table(&route.table));
                checks.push(match conn.query(&sql, &[]) {
                    Ok(_) => Check::pass(name, route.table.clone()),
                    Err(e) => Check::fail(
                        name,
                        format!("{}: {e}", route.table),
                        "create the table, or fix `table` in the route",
                    ),
                });
            }
            checks
        });
        run.await.unwrap_or_else(|e| {
            vec![Check::fail(
                "sink database",
                e.to_string(),
                "see the message",
            )]
        })
    }
}

/// Sets the marker application triggers test (`CLIENT_IDENTIFIER`).
pub const MARKER_SQL: &str = "BEGIN DBMS_SESSION.SET_IDENTIFIER('sitesync'); END;";

/// One marked connection of the Oracle sink.
pub struct OracleSession {
    conn: Arc<Mutex<oracle::Connection>>,
    ctx: Arc<Ctx>,
}

impl OracleSession {
    /// Runs `f` on the connection, on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&oracle::Connection, &Ctx) -> Result<T, Failed> + Send + 'static,
    ) -> Result<T, Failed> {
        let (conn, ctx) = (self.conn.clone(), self.ctx.clone());
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn, &ctx)
        })
        .await
        .map_err(|e| Failed::Batch(task_failed(e)))?
    }
}

/// Entities, owned, for the blocking side.
fn owned(entities: &[&Entity]) -> Vec<Entity> {
    entities.iter().map(|e| (*e).clone()).collect()
}

/// Writes, owned, for the blocking side.
fn owned_writes(writes: &[Write<'_>]) -> Vec<(Route, MappedRow)> {
    writes
        .iter()
        .map(|(route, row)| ((*route).clone(), (*row).clone()))
        .collect()
}

impl Session for OracleSession {
    /// Oracle opens a transaction with the first statement; reading the
    /// origins (`FOR UPDATE`) is that statement.
    async fn begin(&mut self, start: Start<'_>) -> Result<(), Failed> {
        let origins: Vec<String> = start.origins.iter().map(|o| o.to_string()).collect();
        let seen: Vec<Seen> = start.seen.iter().map(|s| (*s).clone()).collect();
        self.blocking(move |conn, _| {
            let mut state = read_origins(conn, &origins)?;
            let seen: Vec<&Seen> = seen.iter().collect();
            let moved = batch::advance(&mut state, &seen);
            write_progress(conn, &moved)?;
            shrink_gaps(conn, &moved.late)
        })
        .await
    }

    async fn insert_inbox(
        &mut self,
        events: &[(&Event, &'static str)],
        _careful: bool,
    ) -> Result<HashSet<Uuid>, Failed> {
        // MERGE: an event the inbox holds is never an error here.
        let events: Vec<(Event, &'static str)> =
            events.iter().map(|(e, o)| ((*e).clone(), *o)).collect();
        self.blocking(move |conn, _| {
            let mut new = HashSet::new();
            for (e, outcome) in &events {
                if inbox(conn, e, outcome)? {
                    new.insert(e.id);
                }
            }
            Ok(new)
        })
        .await
    }

    async fn delete_own(&mut self, ids: &[Uuid]) -> Result<(), Failed> {
        let ids = ids.to_vec();
        self.blocking(move |conn, ctx| {
            for id in &ids {
                let lower = id.to_string();
                let upper = lower.to_uppercase();
                let n = exec(
                    conn,
                    "deleting outbox rows that came back",
                    &format!("DELETE FROM {} WHERE ID IN (:1, :2)", ctx.outbox),
                    &[&lower, &upper],
                )?;
                if n == 0 {
                    tracing::info!(%id, "the outbox row of an event that came back was not found (the idle sweep retries)");
                }
            }
            Ok(())
        })
        .await
    }

    async fn load_versions(&mut self, entities: &[&Entity]) -> Result<Stored, Failed> {
        let entities = owned(entities);
        self.blocking(move |conn, _| load_versions(conn, &entities))
            .await
    }

    async fn local_writes(&mut self, entities: &[&Entity]) -> Result<Local, Failed> {
        let entities = owned(entities);
        self.blocking(move |conn, ctx| local_writes(conn, ctx, &entities))
            .await
    }

    async fn write(&mut self, wave: &[Write<'_>]) -> Result<(), Failed> {
        let wave = owned_writes(wave);
        self.blocking(move |conn, ctx| {
            let mut cache = ctx.columns.lock().unwrap_or_else(|p| p.into_inner());
            for (route, row) in &wave {
                write_row(conn, &mut cache, route, row)?;
            }
            Ok(())
        })
        .await
    }

    async fn upsert_versions(
        &mut self,
        versions: &[(Entity, Version, Uuid)],
        _stored: &Stored,
    ) -> Result<(), Failed> {
        // MERGE on the key, forward only: what was read does not matter.
        let versions = versions.to_vec();
        self.blocking(move |conn, _| {
            for (entity, version, id) in &versions {
                upsert_version(conn, entity, version, *id)?;
            }
            Ok(())
        })
        .await
    }

    async fn insert_conflicts(&mut self, conflicts: &[Conflict]) -> Result<(), Failed> {
        let conflicts = conflicts.to_vec();
        self.blocking(move |conn, _| insert_conflicts(conn, &conflicts))
            .await
    }

    async fn mark_lost(&mut self, ids: &[Uuid]) -> Result<(), Failed> {
        let ids = ids.to_vec();
        self.blocking(move |conn, _| {
            for id in &ids {
                let id = id.to_string();
                exec(
                    conn,
                    "recording lost events",
                    "UPDATE SITESYNC_INBOX SET OUTCOME = 'lost' WHERE EVENT_ID = :1",
                    &[&id],
                )?;
            }
            Ok(())
        })
        .await
    }

    async fn recorded_losers(&mut self, ids: &[Uuid]) -> Result<HashSet<Uuid>, Failed> {
        let ids = ids.to_vec();
        self.blocking(move |conn, _| {
            let mut out = HashSet::new();
            for id in &ids {
                let text = id.to_string();
                match conn.query_row_as::<i64>(
                    "SELECT 1 FROM SITESYNC_CONFLICTS WHERE LOSER_EVENT_ID = :1",
                    &[&text],
                ) {
                    Ok(_) => {
                        out.insert(*id);
                    }
                    Err(err) if no_data(&err) => {}
                    Err(err) => {
                        return Err(failed("looking for this site's writes that lost here", err));
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn withdraw_conflicts(&mut self, losers: &[Uuid]) -> Result<(), Failed> {
        let ids = losers.to_vec();
        self.blocking(move |conn, _| {
            for id in &ids {
                let id = id.to_string();
                exec(
                    conn,
                    "withdrawing conflict records",
                    "DELETE FROM SITESYNC_CONFLICTS WHERE LOSER_EVENT_ID = :1",
                    &[&id],
                )?;
            }
            Ok(())
        })
        .await
    }

    async fn savepoint(&mut self) -> Result<(), Failed> {
        self.blocking(|conn, _| exec(conn, "savepoint", "SAVEPOINT sitesync_item", &[]).map(|_| ()))
            .await
    }

    /// Oracle has no RELEASE SAVEPOINT: a savepoint ends with its
    /// transaction.
    async fn release_savepoint(&mut self) -> Result<(), Failed> {
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self) -> Result<(), Failed> {
        self.blocking(|conn, _| {
            exec(
                conn,
                "rolling back a savepoint",
                "ROLLBACK TO SAVEPOINT sitesync_item",
                &[],
            )
            .map(|_| ())
        })
        .await
    }

    async fn commit(&mut self) -> Result<(), Failed> {
        self.blocking(|conn, _| conn.commit().map_err(|e| failed("committing the batch", e)))
            .await
    }

    async fn rollback(&mut self) {
        let _ = self
            .blocking(|conn, _| {
                let _ = conn.rollback();
                Ok(())
            })
            .await;
    }

    async fn usable(&mut self) -> bool {
        self.blocking(|conn, _| Ok(conn.ping().is_ok()))
            .await
            .unwrap_or(false)
    }

    async fn sweep_own(&mut self) -> Result<u64, TargetError> {
        let swept = self
            .blocking(|conn, ctx| {
                let sql = format!(
                    "DELETE FROM {} o WHERE EXISTS (SELECT 1 FROM SITESYNC_INBOX i WHERE LOWER(o.ID) = i.EVENT_ID AND i.OUTCOME = 'own')",
                    ctx.outbox
                );
                let fail = |e: oracle::Error| {
                    Failed::Batch(failed_outside_batch("sweeping outbox rows that came back", e))
                };
                let n = conn
                    .execute(&sql, &[])
                    .map_err(fail)?
                    .row_count()
                    .map_err(fail)?;
                conn.commit().map_err(fail)?;
                Ok(n)
            })
            .await;
        match swept {
            Ok(n) => Ok(n),
            Err(Failed::Batch(e)) => Err(e),
            Err(_) => Err(TargetError::transient(
                Cause::Query,
                "sweeping outbox rows that came back failed",
            )),
        }
    }

    async fn open_gaps(&mut self) -> Result<Vec<OpenGap>, TargetError> {
        let read = self
            .blocking(|conn, _| {
                let fail = |e: oracle::Error| {
                    Failed::Batch(failed_outside_batch("reading SITESYNC_GAPS", e))
                };
                let rows = conn
                    .query_as::<(i64, String, i64, i64, i64, f64, Option<f64>, Option<String>)>(
                        "SELECT ID, ORIGIN, EPOCH, FROM_SEQ, TO_SEQ, \
                         (CAST(SYSTIMESTAMP AS DATE) - CAST(DETECTED_AT AS DATE)) * 86400, \
                         (CAST(SYSTIMESTAMP AS DATE) - CAST(REQUESTED_AT AS DATE)) * 86400, NOTE \
                         FROM SITESYNC_GAPS ORDER BY ID",
                        &[],
                    )
                    .map_err(fail)?;
                let mut out = Vec::new();
                for r in rows {
                    let (id, origin, epoch, from, to, age_s, requested_s, note) =
                        r.map_err(fail)?;
                    out.push(OpenGap {
                        id,
                        origin,
                        epoch: epoch as u64,
                        from: from as u64,
                        to: to as u64,
                        age_s,
                        requested_s,
                        note,
                    });
                }
                Ok(out)
            })
            .await;
        read.map_err(|f| match f {
            Failed::Batch(e) => e,
            _ => TargetError::transient(Cause::Query, "reading SITESYNC_GAPS failed"),
        })
    }

    async fn record_receipt(&mut self, r: &Receipt) -> Result<(), TargetError> {
        let r = r.clone();
        let done = self
            .blocking(move |conn, _| {
                let fail = |e: oracle::Error| Failed::Batch(failed_outside_batch("recording a receipt", e));
                let at = r.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
                for e in &r.events {
                    let (id, epoch, seq) = (e.id.to_string(), e.epoch as i64, e.seq as i64);
                    conn.execute(
                        "MERGE INTO SITESYNC_RECEIPTS t USING (SELECT :1 EVENT_ID, :2 SITE FROM DUAL) s \
                         ON (t.EVENT_ID = s.EVENT_ID AND t.SITE = s.SITE) \
                         WHEN MATCHED THEN UPDATE SET t.OUTCOME = :5, t.REASON = :6, t.AT = TO_TIMESTAMP_TZ(:7, 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6TZH:TZM'), t.RECEIVED_AT = SYSTIMESTAMP WHERE :5 <> 'duplicate' \
                         WHEN NOT MATCHED THEN INSERT (EVENT_ID, SITE, EPOCH, SEQ, OUTCOME, REASON, AT) \
                         VALUES (s.EVENT_ID, s.SITE, :3, :4, :5, :6, TO_TIMESTAMP_TZ(:7, 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6TZH:TZM'))",
                        &[&id, &r.site, &epoch, &seq, &e.outcome, &e.reason, &at],
                    )
                    .map_err(fail)?;
                }
                conn.commit().map_err(fail)
            })
            .await;
        done.map_err(|f| match f {
            Failed::Batch(e) => e,
            _ => TargetError::transient(Cause::Query, "recording a receipt failed"),
        })
    }

    async fn trace(&mut self, id: Uuid) -> Result<Traced, TargetError> {
        let id = id.to_string();
        let read = self
            .blocking(move |conn, _| {
                let fail = |e: oracle::Error| Failed::Batch(failed_outside_batch("reading what the database knows of an event", e));
                let utc = "YYYY-MM-DD\"T\"HH24:MI:SS.FF3\"Z\"";
                let rows = conn
                    .query_as::<(String, i64, i64, String, Option<String>, String, String)>(
                        &format!(
                            "SELECT SITE, EPOCH, SEQ, OUTCOME, REASON, TO_CHAR(AT AT TIME ZONE 'UTC', '{utc}'), \
                             TO_CHAR(RECEIVED_AT AT TIME ZONE 'UTC', '{utc}') FROM SITESYNC_RECEIPTS WHERE EVENT_ID = :1 ORDER BY AT, SITE"
                        ),
                        &[&id],
                    )
                    .map_err(fail)?;
                let mut receipts = Vec::new();
                for r in rows {
                    let (site, epoch, seq, outcome, reason, at, received_at) = r.map_err(fail)?;
                    receipts.push(ReceiptRow {
                        site,
                        epoch: epoch as u64,
                        seq: seq as u64,
                        outcome,
                        reason,
                        at,
                        received_at,
                    });
                }
                let inbox = match conn.query_row_as::<(String, String, i64, i64, String, String)>(
                    &format!(
                        "SELECT ORIGIN, TYPE, EPOCH, SEQ, OUTCOME, TO_CHAR(APPLIED_AT AT TIME ZONE 'UTC', '{utc}') FROM SITESYNC_INBOX WHERE EVENT_ID = :1"
                    ),
                    &[&id],
                ) {
                    Ok((o, t, e, s, out, at)) => Some((o, t, e as u64, s as u64, out, at)),
                    Err(e) if no_data(&e) => None,
                    Err(e) => return Err(fail(e)),
                };
                Ok(Traced { receipts, inbox })
            })
            .await;
        read.map_err(|f| match f {
            Failed::Batch(e) => e,
            _ => TargetError::transient(
                Cause::Query,
                "reading what the database knows of an event failed",
            ),
        })
    }

    async fn unreceipted(
        &mut self,
        sites: &[String],
        older_than_s: u64,
    ) -> Result<Vec<(String, u64, f64)>, TargetError> {
        let sites = sites.to_vec();
        let read = self
            .blocking(move |conn, _| {
                let fail = |e: oracle::Error| Failed::Batch(failed_outside_batch("reading SITESYNC_RECEIPTS", e));
                let mut out = Vec::new();
                let older = older_than_s as i64;
                for site in &sites {
                    let (n, age): (i64, Option<f64>) = conn
                        .query_row_as(
                            "SELECT COUNT(*), MAX((CAST(SYSTIMESTAMP AS DATE) - CAST(f.T AS DATE)) * 86400) FROM \
                             (SELECT EVENT_ID, MIN(RECEIVED_AT) T FROM SITESYNC_RECEIPTS GROUP BY EVENT_ID \
                              HAVING MIN(RECEIVED_AT) < SYSTIMESTAMP - NUMTODSINTERVAL(:1, 'SECOND')) f \
                             WHERE NOT EXISTS (SELECT 1 FROM SITESYNC_RECEIPTS r WHERE r.EVENT_ID = f.EVENT_ID AND r.SITE = :2) \
                             AND EXISTS (SELECT 1 FROM SITESYNC_RECEIPTS x WHERE x.SITE = :2)",
                            &[&older, site],
                        )
                        .map_err(fail)?;
                    if n > 0 {
                        out.push((site.clone(), n as u64, age.unwrap_or(0.0)));
                    }
                }
                Ok(out)
            })
            .await;
        read.map_err(|f| match f {
            Failed::Batch(e) => e,
            _ => TargetError::transient(Cause::Query, "reading SITESYNC_RECEIPTS failed"),
        })
    }

    async fn mark_gaps(&mut self, ids: &[i64], mark: GapMark<'_>) -> Result<(), TargetError> {
        let ids = ids.to_vec();
        // None: asked now; Some(None): asked now, note cleared; Some(n): noted.
        let note: Option<Option<String>> = match mark {
            GapMark::Requested => None,
            GapMark::RequestedAnew => Some(None),
            GapMark::Note(n) => Some(Some(n.to_string())),
        };
        let done = self
            .blocking(move |conn, _| {
                let fail = |e: oracle::Error| Failed::Batch(failed_outside_batch("marking gaps", e));
                for id in &ids {
                    match &note {
                        None => conn.execute(
                            "UPDATE SITESYNC_GAPS SET REQUESTED_AT = SYSTIMESTAMP WHERE ID = :1",
                            &[id],
                        ),
                        Some(None) => conn.execute(
                            "UPDATE SITESYNC_GAPS SET REQUESTED_AT = SYSTIMESTAMP, NOTE = NULL WHERE ID = :1",
                            &[id],
                        ),
                        Some(Some(n)) => conn.execute("UPDATE SITESYNC_GAPS SET NOTE = :1 WHERE ID = :2", &[n, id]),
                    }
                    .map_err(fail)?;
                }
                conn.commit().map_err(fail)
            })
            .await;
        done.map_err(|f| match f {
            Failed::Batch(e) => e,
            _ => TargetError::transient(Cause::Query, "marking gaps failed"),
        })
    }
}

fn exec(
    conn: &oracle::Connection,
    context: &str,
    sql: &str,
    binds: &[&dyn oracle::sql_type::ToSql],
) -> Result<u64, Failed> {
    conn.execute(sql, binds)
        .and_then(|s| s.row_count())
        .map_err(|e| failed(context, e))
}

/// Writes the inbox row; whether the event is new.
fn inbox(conn: &oracle::Connection, e: &Event, outcome: &str) -> Result<bool, Failed> {
    let id = e.id.to_string();
    let (epoch, seq) = (e.epoch as i64, e.seq as i64);
    let n = exec(
        conn,
        "writing the inbox",
        INBOX_SQL,
        &[&id, &e.origin, &e.kind, &epoch, &seq, &outcome],
    )?;
    Ok(n > 0)
}

fn no_data(e: &oracle::Error) -> bool {
    e.kind() == oracle::ErrorKind::NoDataFound
}

fn load_versions(conn: &oracle::Connection, entities: &[Entity]) -> Result<Stored, Failed> {
    let mut out = Stored::new();
    for e in entities {
        let row = conn.query_row_as::<(String, String, String)>(
            &format!("SELECT TO_CHAR(TS AT TIME ZONE 'UTC', '{TS_FORMAT}'), ORIGIN, EVENT_ID FROM SITESYNC_VERSIONS WHERE ENTITY = :1 AND KEY = :2"),
            &[&e.table, &e.key],
        );
        match row {
            Ok((ts, origin, id)) => {
                if let (Some(ts), Ok(id)) = (parse_timestamp(&ts), Uuid::parse_str(&id)) {
                    out.insert(e.clone(), (Version { ts, origin }, id));
                }
            }
            Err(err) if no_data(&err) => {}
            Err(err) => return Err(failed("reading entity versions", err)),
        }
    }
    Ok(out)
}

fn upsert_version(
    conn: &oracle::Connection,
    e: &Entity,
    v: &Version,
    id: Uuid,
) -> Result<(), Failed> {
    let (ts, id) = (ts_text(v), id.to_string());
    exec(
        conn,
        "writing entity versions",
        VERSION_SQL,
        &[&e.table, &e.key, &ts, &v.origin, &id],
    )?;
    Ok(())
}

/// Each origin's progress, read and locked (`FOR UPDATE`).
fn read_origins(conn: &oracle::Connection, origins: &[String]) -> Result<Origins, Failed> {
    let mut state = Origins::new();
    for origin in origins {
        let row = conn.query_row_as::<(i64, i64)>(
            "SELECT EPOCH, SEQ FROM SITESYNC_ORIGINS WHERE ORIGIN = :1 FOR UPDATE",
            &[origin],
        );
        match row {
            Ok((e, s)) => {
                state.insert(origin.clone(), (e as u64, s as u64));
            }
            Err(e) if no_data(&e) => {}
            Err(e) => return Err(failed("reading origin progress", e)),
        }
    }
    Ok(state)
}

/// The origins' new progress and the gaps found.
fn write_progress(conn: &oracle::Connection, moved: &Progress) -> Result<(), Failed> {
    for (origin, e, s) in &moved.changed {
        let (e, s) = (*e as i64, *s as i64);
        exec(
            conn,
            "writing origin progress",
            "MERGE INTO SITESYNC_ORIGINS o USING (SELECT :1 ORIGIN, :2 EPOCH, :3 SEQ FROM DUAL) s ON (o.ORIGIN = s.ORIGIN) \
             WHEN MATCHED THEN UPDATE SET o.EPOCH = s.EPOCH, o.SEQ = s.SEQ, o.UPDATED_AT = SYSTIMESTAMP \
             WHEN NOT MATCHED THEN INSERT (ORIGIN, EPOCH, SEQ) VALUES (s.ORIGIN, s.EPOCH, s.SEQ)",
            &[origin, &e, &s],
        )?;
    }
    for g in &moved.gaps {
        let (e, f, t) = (g.epoch as i64, g.from as i64, g.to as i64);
        exec(
            conn,
            "recording gaps",
            "INSERT INTO SITESYNC_GAPS (ORIGIN, EPOCH, FROM_SEQ, TO_SEQ) VALUES (:1, :2, :3, :4)",
            &[&g.origin, &e, &f, &t],
        )?;
    }
    Ok(())
}

/// Takes late arrivals out of the gaps recorded before ([`rules::shrink`]):
/// the rows they touch are read under lock, then shrunk, split or deleted.
fn shrink_gaps(conn: &oracle::Connection, late: &[LateArrivals]) -> Result<(), Failed> {
    for l in late {
        let (e, low, high) = (l.epoch as i64, l.low as i64, l.high as i64);
        let rows = conn
            .query_as::<(i64, i64, i64)>(
                "SELECT ID, FROM_SEQ, TO_SEQ FROM SITESYNC_GAPS \
                 WHERE ORIGIN = :1 AND EPOCH = :2 AND FROM_SEQ <= :3 AND TO_SEQ >= :4 ORDER BY ID FOR UPDATE",
                &[&l.origin, &e, &high, &low],
            )
            .map_err(|e| failed("reading the gaps late events fall in", e))?;
        let mut found: Vec<GapRow> = Vec::new();
        for r in rows {
            let (id, from, to) =
                r.map_err(|e| failed("reading the gaps late events fall in", e))?;
            found.push((id, from as u64, to as u64));
        }
        for (id, pieces) in rules::shrink(&found, &l.seqs) {
            let Some(((from, to), rest)) = pieces.split_first() else {
                exec(
                    conn,
                    "closing a gap",
                    "DELETE FROM SITESYNC_GAPS WHERE ID = :1",
                    &[&id],
                )?;
                continue;
            };
            let (from, to) = (*from as i64, *to as i64);
            exec(
                conn,
                "shrinking a gap",
                "UPDATE SITESYNC_GAPS SET FROM_SEQ = :1, TO_SEQ = :2 WHERE ID = :3",
                &[&from, &to, &id],
            )?;
            for (from, to) in rest {
                let (from, to) = (*from as i64, *to as i64);
                exec(
                    conn,
                    "splitting a gap",
                    "INSERT INTO SITESYNC_GAPS (ORIGIN, EPOCH, FROM_SEQ, TO_SEQ, DETECTED_AT, REQUESTED_AT, NOTE) \
                     SELECT ORIGIN, EPOCH, :1, :2, DETECTED_AT, REQUESTED_AT, NOTE FROM SITESYNC_GAPS WHERE ID = :3",
                    &[&from, &to, &id],
                )?;
            }
        }
    }
    Ok(())
}

/// This site's writes still in the outbox, for these entities.
/// The routes that write `entity`'s table (a route may name it with or
/// without its schema).
fn routes_of<'s>(sink: &'s SinkConfig, entity: &Entity) -> impl Iterator<Item = &'s Route> {
    sink.routes
        .iter()
        .filter(move |r| r.entity_table() == entity.table)
}

fn local_writes(
    conn: &oracle::Connection,
    ctx: &Ctx,
    entities: &[Entity],
) -> Result<Local, Failed> {
    let mut out = Local::new();
    let wanted: HashSet<&Entity> = entities.iter().collect();
    for e in entities {
        for route in routes_of(&ctx.sink, e) {
            let rows = conn
                .query_as::<(String, String, String)>(
                    &format!(
                        "SELECT ID, DATA, TO_CHAR(CREATED_AT AT TIME ZONE 'UTC', '{TS_FORMAT}') FROM {} WHERE TYPE = :1 AND (ENTITY_KEY IS NULL OR ENTITY_KEY = :2)",
                        ctx.outbox
                    ),
                    &[&route.kind, &e.key],
                )
                .map_err(|err| failed("looking for local writes not yet propagated", err))?;
            for row in rows {
                let Ok((id, data, ts)) = row else { continue };
                let Some(ts) = parse_timestamp(&ts) else {
                    continue;
                };
                if let Some((entity, write)) =
                    batch::local_write(&ctx.sink, &ctx.site, &wanted, (&id, &route.kind, &data, ts))
                {
                    out.entry(entity).or_default().push(write);
                }
            }
        }
    }
    Ok(out)
}

/// The types of a route table's columns (`ALL_TAB_COLUMNS`), by name as
/// Oracle stores it; read once per table and connection.
fn column_types<'c>(
    conn: &oracle::Connection,
    cache: &'c mut HashMap<String, HashMap<String, Bind>>,
    table: &str,
) -> Result<&'c HashMap<String, Bind>, Failed> {
    if !cache.contains_key(table) {
        let parts: Vec<String> = table
            .split('.')
            .map(|p| oracle_ident(p).trim_matches('"').replace("\"\"", "\""))
            .collect();
        let (owner, name) = match parts.as_slice() {
            [o, t] => (Some(o.clone()), t.clone()),
            _ => (None, parts.concat()),
        };
        let rows = conn
            .query_as::<(String, String)>(
                "SELECT COLUMN_NAME, DATA_TYPE FROM ALL_TAB_COLUMNS WHERE OWNER = NVL(:1, USER) AND TABLE_NAME = :2",
                &[&owner, &name],
            )
            .map_err(|e| failed(&format!("reading the columns of {table}"), e))?;
        let mut types = HashMap::new();
        for (column, data_type) in rows.flatten() {
            types.insert(column, Bind::of(&data_type));
        }
        cache.insert(table.to_string(), types);
    }
    Ok(&cache[table])
}

/// A column's bind, looked up under the name Oracle resolves it to.
fn bind_of(types: &HashMap<String, Bind>, column: &str) -> Bind {
    let resolved = oracle_ident(column);
    types
        .get(resolved.trim_matches('"'))
        .copied()
        .unwrap_or(Bind::Text)
}

fn write_row(
    conn: &oracle::Connection,
    cache: &mut HashMap<String, HashMap<String, Bind>>,
    route: &Route,
    row: &MappedRow,
) -> Result<(), Failed> {
    let context = format!("writing {}", route.table);
    let types = column_types(conn, cache, &route.table)?;
    let (sql, values): (String, Vec<Option<String>>) = match route.operation {
        Operation::Upsert => {
            let cols: Vec<(&str, Bind)> = row
                .columns
                .keys()
                .map(|c| (c.as_str(), bind_of(types, c)))
                .collect();
            let values = cols
                .iter()
                .zip(row.columns.values())
                .map(|((_, b), v)| b.text(v))
                .collect();
            (merge_sql(&route.table, &cols, &route.key), values)
        }
        Operation::Delete => {
            let key: Vec<(&str, Bind)> = route
                .key
                .iter()
                .map(|k| (k.as_str(), bind_of(types, k)))
                .collect();
            let values = key
                .iter()
                .map(|(k, b)| row.columns.get(*k).and_then(|v| b.text(v)))
                .collect();
            (delete_sql(&route.table, &key), values)
        }
    };
    let binds: Vec<&dyn oracle::sql_type::ToSql> = values
        .iter()
        .map(|v| v as &dyn oracle::sql_type::ToSql)
        .collect();
    exec(conn, &context, &sql, &binds)?;
    Ok(())
}

fn insert_conflicts(conn: &oracle::Connection, conflicts: &[Conflict]) -> Result<(), Failed> {
    for c in conflicts {
        let loser = c.loser.to_string();
        let winner = c.winner.to_string();
        let payload = c.loser_payload.to_string();
        let (lts, wts) = (ts_text(&c.loser_version), ts_text(&c.winner_version));
        exec(
            conn,
            "recording conflicts",
            CONFLICT_SQL,
            &[
                &loser,
                &c.entity.table,
                &c.entity.key,
                &c.loser_version.origin,
                &lts,
                &payload,
                &winner,
                &c.winner_version.origin,
                &wts,
            ],
        )?;
    }
    Ok(())
}

/// For the unit tests: the data of an event as the sink maps it.
#[cfg(test)]
fn mapped(route: &Route, data: &str) -> MappedRow {
    let ev = Event {
        id: Uuid::nil(),
        timestamp: chrono::Utc::now(),
        origin: "PARIS".into(),
        kind: route.kind.clone(),
        entity_key: None,
        data: serde_json::value::RawValue::from_string(data.into()).unwrap(),
        epoch: 1,
        seq: 1,
    };
    crate::sink::mapping::map_row(route, &crate::sink::mapping::data_object(&ev).unwrap()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn route(op: Operation, key: &[&str]) -> Route {
        Route {
            kind: "customer.upsert".into(),
            table: "app.customer".into(),
            key: key.iter().map(|k| k.to_string()).collect(),
            operation: op,
            rename: BTreeMap::new(),
            drop: vec![],
            constants: BTreeMap::new(),
        }
    }

    #[test]
    fn a_local_write_is_looked_for_under_a_route_that_names_its_table_without_a_schema() {
        let mut bare = route(Operation::Upsert, &["id"]);
        bare.table = "CUSTOMER".into();
        let mut other = route(Operation::Upsert, &["id"]);
        other.kind = "order.upsert".into();
        other.table = "app.orders".into();
        let sink =
            crate::sink::testing::sink_with(vec![bare, route(Operation::Upsert, &["id"]), other]);
        // The entity a route's event maps to names the table with its schema.
        let entity = mapped(&sink.routes[0], r#"{"id": 1}"#).entity;
        let kinds: Vec<&str> = routes_of(&sink, &entity)
            .map(|r| r.table.as_str())
            .collect();
        assert_eq!(kinds, ["CUSTOMER"]);
        let entity = mapped(&sink.routes[1], r#"{"id": 1}"#).entity;
        let kinds: Vec<&str> = routes_of(&sink, &entity)
            .map(|r| r.table.as_str())
            .collect();
        assert_eq!(kinds, ["app.customer"]);
    }

    #[test]
    fn identifiers_resolve_as_oracle_does() {
        assert_eq!(oracle_ident("customer_id"), "\"CUSTOMER_ID\"");
        assert_eq!(oracle_ident("Mixed Case"), "\"Mixed Case\"");
        assert_eq!(oracle_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(oracle_table("app.customer"), "\"APP\".\"CUSTOMER\"");
    }

    #[test]
    fn the_merge_and_delete_the_sink_sends() {
        let r = route(Operation::Upsert, &["id"]);
        let row = mapped(
            &r,
            r#"{"id": 42, "name": "Zoé", "vip": true, "tags": ["a"], "note": null}"#,
        );
        let cols: Vec<(&str, Bind)> = row
            .columns
            .keys()
            .map(|c| (c.as_str(), Bind::Text))
            .collect();
        assert_eq!(
            merge_sql(&r.table, &cols, &r.key),
            "MERGE INTO \"APP\".\"CUSTOMER\" t USING (SELECT :1 \"ID\", :2 \"NAME\", :3 \"NOTE\", :4 \"TAGS\", :5 \"VIP\" FROM DUAL) s \
             ON (t.\"ID\" = s.\"ID\") WHEN MATCHED THEN UPDATE SET t.\"NAME\" = s.\"NAME\", t.\"NOTE\" = s.\"NOTE\", t.\"TAGS\" = s.\"TAGS\", t.\"VIP\" = s.\"VIP\" \
             WHEN NOT MATCHED THEN INSERT (\"ID\", \"NAME\", \"NOTE\", \"TAGS\", \"VIP\") VALUES (s.\"ID\", s.\"NAME\", s.\"NOTE\", s.\"TAGS\", s.\"VIP\")"
        );
        let binds: Vec<Option<String>> = row.columns.values().map(bind_text).collect();
        assert_eq!(
            binds,
            vec![
                Some("42".into()),
                Some("Zoé".into()),
                None,
                Some("[\"a\"]".into()),
                Some("1".into())
            ]
        );
        // Key columns only: nothing to update when matched.
        assert_eq!(
            merge_sql(
                "t",
                &[("a", Bind::Text), ("b", Bind::Text)],
                &["a".into(), "b".into()]
            ),
            "MERGE INTO \"T\" t USING (SELECT :1 \"A\", :2 \"B\" FROM DUAL) s ON (t.\"A\" = s.\"A\" AND t.\"B\" = s.\"B\") WHEN NOT MATCHED THEN INSERT (\"A\", \"B\") VALUES (s.\"A\", s.\"B\")"
        );
        assert_eq!(
            delete_sql("app.customer", &[("id", Bind::Text), ("site", Bind::Text)]),
            "DELETE FROM \"APP\".\"CUSTOMER\" WHERE \"ID\" = :1 AND \"SITE\" = :2"
        );
    }

    #[test]
    fn dates_and_timestamps_are_bound_through_to_timestamp_tz() {
        assert_eq!(Bind::of("DATE"), Bind::Date);
        assert_eq!(Bind::of("TIMESTAMP(6)"), Bind::Timestamp);
        assert_eq!(Bind::of("TIMESTAMP(6) WITH TIME ZONE"), Bind::TimestampTz);
        assert_eq!(
            Bind::of("TIMESTAMP(6) WITH LOCAL TIME ZONE"),
            Bind::TimestampTz
        );
        assert_eq!(Bind::of("NUMBER"), Bind::Text);
        let sql = merge_sql(
            "customer",
            &[
                ("id", Bind::Text),
                ("updated_at", Bind::TimestampTz),
                ("born", Bind::Date),
            ],
            &["id".into()],
        );
        assert!(
            sql.contains("USING (SELECT :1 \"ID\", TO_TIMESTAMP_TZ(:2, 'YYYY-MM-DD\"T\"HH24:MI:SS.FF9TZH:TZM') \"UPDATED_AT\", CAST(TO_TIMESTAMP_TZ(:3, 'YYYY-MM-DD\"T\"HH24:MI:SS.FF9TZH:TZM') AT TIME ZONE 'UTC' AS DATE) \"BORN\" FROM DUAL)"),
            "{sql}"
        );
        let v = serde_json::json!("2026-11-23T17:11:28.5+01:00");
        assert_eq!(
            Bind::TimestampTz.text(&v).as_deref(),
            Some("2026-11-23T16:11:28.500000000+00:00")
        );
        assert_eq!(
            Bind::Text.text(&v).as_deref(),
            Some("2026-11-23T17:11:28.5+01:00")
        );
        // Not a timestamp: sent as it is, and Oracle's error fails that message.
        assert_eq!(
            Bind::Date.text(&serde_json::json!("soon")).as_deref(),
            Some("soon")
        );
        assert_eq!(Bind::Date.text(&Value::Null), None);
    }

    #[test]
    fn the_bookkeeping_sql() {
        assert!(INBOX_SQL.contains("WHERE i.OUTCOME = 'dead_letter'"));
        assert!(VERSION_SQL.contains("WHERE s.TS > v.TS OR (s.TS = v.TS AND s.ORIGIN > v.ORIGIN)"));
        assert!(CONFLICT_SQL.contains("WHEN NOT MATCHED THEN INSERT"));
        assert!(
            !CONFLICT_SQL.contains("WHEN MATCHED"),
            "a conflict is recorded once"
        );
        for (name, ddl) in TABLES {
            assert!(ddl.starts_with(&format!("CREATE TABLE {name} (")), "{ddl}");
        }
        let v = Version {
            ts: parse_timestamp("2026-11-23T16:11:28.5Z").unwrap(),
            origin: "PARIS".into(),
        };
        assert_eq!(ts_text(&v), "2026-11-23T16:11:28.500000+00:00");
    }

    #[test]
    fn data_errors_are_told_from_batch_errors() {
        // One message's data: unique, NULL, invalid number, too large, FK
        // (parent missing, child found), precision, dates, triggers.
        for code in [
            1, 1400, 1722, 12899, 2291, 2292, 1438, 1840, 1841, 1861, 20001, 4088,
        ] {
            assert!(per_message(code), "{code}");
        }
        // The batch: busy, deadlock, serialization, connection losses,
        // timeouts, failover, logon.
        for code in [
            54, 60, 8177, 3113, 3114, 3135, 12541, 12170, 25408, 1017, 1012, 1033,
        ] {
            assert!(!per_message(code), "{code}");
        }
        assert_eq!(ora_code("ORA-00001: unique constraint violated"), Some(1));
        // The first code of a stack is the one that counts.
        assert_eq!(
            ora_code(
                "ORA-20001: refused\nORA-06512: at \"APP.TRG\", line 3\nORA-04088: error during execution of trigger"
            ),
            Some(20001)
        );
        assert_eq!(
            ora_code("DPI-1080: connection was closed by ORA-3113"),
            Some(3113)
        );
        assert_eq!(ora_code("no code here"), None);
        assert_eq!(ora_code("ORA-"), None);
        assert!(MARKER_SQL.contains(&format!("SET_IDENTIFIER('{CLIENT_IDENTIFIER}')")));
    }
}
