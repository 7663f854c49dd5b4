//! Applying events to SQL Server.
//!
//! The batch is the sink's ([`crate::sink::batch`], the same for every
//! engine): one READ COMMITTED transaction per batch holds the inbox rows
//! (`sitesync_inbox`, keyed by event id), the per-origin progress and gaps,
//! the deletion of this site's outbox rows whose events came back round,
//! the changes, the entities' versions and the conflicts; the messages are
//! acked only after it commits. This file is its T-SQL.
//!
//! # Upserts: `MERGE … WITH (HOLDLOCK)`
//!
//! A plain `MERGE` takes update locks on the rows it finds but none on a
//! key it does not find, so two sessions merging the same missing key can
//! both take the INSERT branch and one fails on the primary key. `HOLDLOCK`
//! (SERIALIZABLE for that statement) takes a key-range lock on the missing
//! key, so the second waits and then takes the UPDATE branch. One
//! statement, one round trip, and atomic: UPDATE-then-INSERT needs the same
//! `UPDLOCK, HOLDLOCK` hints on the UPDATE and a second statement. The
//! known `MERGE` defects concern filtered indexes, indexed views and
//! `OUTPUT` into tables with triggers; routes should not target those.
//!
//! # Marker for application triggers
//!
//! Every sink connection runs `EXEC sp_set_session_context
//! @key = N'sitesync.applying', @value = 1, @read_only = 1` once, right
//! after it connects: every statement of the sink's session carries it, no
//! other session does. An application trigger that fills the outbox skips
//! the sink's changes with:
//!
//! ```sql
//! IF CAST(SESSION_CONTEXT(N'sitesync.applying') AS int) = 1 RETURN;
//! ```
//!
//! # Per-message failures
//!
//! The steps of a batch, its retries and the isolation of a failing
//! message are the sink's ([`crate::sink::batch`]); this file says them in
//! T-SQL ([`MssqlSession`]) and classifies SQL Server's errors: one
//! message's data (constraint, conversion, truncation, a trigger's
//! `THROW`), busy (deadlock 1205, lock timeout 1222), or the batch as a
//! whole. A savepoint is `save_transaction` + `ROLLBACK TRANSACTION`. A
//! data error that ended the transaction (a conversion, a trigger's error:
//! SQL Server ends those whatever `XACT_ABORT` says) is told apart by
//! `XACT_STATE()`: the batch is redone without that message
//! ([`MssqlSession`]).
//!
//! The session talks to the server through [`Tds`]: tiberius's client, or
//! in tests a fake server with SQL Server's transaction semantics.
//!
//! # Not done yet (see docs/engines/sqlserver.md)
//!
//! - Column values are sent as `nvarchar`, `bigint`, `float` or `bit`
//!   parameters and converted by SQL Server to the column's type: a
//!   `varbinary` column does not accept the base64 text of an event.
//! - An event of this site back round records its version but does not
//!   repair a local write that lost a race with the sink on this site's
//!   table: the session cannot tell who wrote a row last
//!   (`Session::CHECKS_OWN_ROWS` is false; PostgreSQL compares `xmin`).

use super::conn::{self, MssqlClient, quote, quote_table};
use super::settings::Settings;
use super::types::cell_text;
use crate::checks::Check;
use crate::config::{ConnectorConfig, Operation, Route, SinkConfig, redact_url};
use crate::error::{Cause, TargetError};
use crate::event::{Event, parse_timestamp};
use crate::sink::batch::{
    self, Dialect, Failed, GapMark, Local, OpenGap, Origins, Progress, Session, Start, Stored,
    Write,
};
use crate::sink::batch::{ReceiptRow, Traced};
use crate::sink::control::Receipt;
use crate::sink::mapping::{Entity, MappedRow};
use crate::sink::rules::{self, Conflict, GapRow, LateArrivals, Version};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use tiberius::{IsolationLevel, ToSql};
use uuid::Uuid;

/// The sink's tables (idempotent). Origins compare byte-wise
/// (`Latin1_General_BIN2`), as last-writer-wins orders them.
pub const SCHEMA: &str = "
IF OBJECT_ID(N'dbo.sitesync_inbox', N'U') IS NULL CREATE TABLE dbo.sitesync_inbox (
    event_id uniqueidentifier NOT NULL PRIMARY KEY,
    origin nvarchar(64) COLLATE Latin1_General_BIN2 NOT NULL,
    type nvarchar(200) NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    received_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME(),
    applied_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME(),
    outcome nvarchar(16) NOT NULL
);
IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE name = N'sitesync_inbox_origin_seq' AND object_id = OBJECT_ID(N'dbo.sitesync_inbox'))
    CREATE INDEX sitesync_inbox_origin_seq ON dbo.sitesync_inbox (origin, epoch, seq) INCLUDE (outcome);
IF OBJECT_ID(N'dbo.sitesync_origins', N'U') IS NULL CREATE TABLE dbo.sitesync_origins (
    origin nvarchar(64) COLLATE Latin1_General_BIN2 NOT NULL PRIMARY KEY,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    updated_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME()
);
IF OBJECT_ID(N'dbo.sitesync_gaps', N'U') IS NULL CREATE TABLE dbo.sitesync_gaps (
    id bigint IDENTITY PRIMARY KEY,
    origin nvarchar(64) COLLATE Latin1_General_BIN2 NOT NULL,
    epoch bigint NOT NULL,
    from_seq bigint NOT NULL,
    to_seq bigint NOT NULL,
    detected_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME(),
    requested_at datetime2 NULL,
    note nvarchar(400) NULL
);
IF COL_LENGTH(N'dbo.sitesync_gaps', N'requested_at') IS NULL ALTER TABLE dbo.sitesync_gaps ADD requested_at datetime2 NULL;
IF COL_LENGTH(N'dbo.sitesync_gaps', N'note') IS NULL ALTER TABLE dbo.sitesync_gaps ADD note nvarchar(400) NULL;
IF OBJECT_ID(N'dbo.sitesync_receipts', N'U') IS NULL CREATE TABLE dbo.sitesync_receipts (
    event_id uniqueidentifier NOT NULL,
    site nvarchar(64) COLLATE Latin1_General_BIN2 NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    outcome nvarchar(16) NOT NULL,
    reason nvarchar(max) NULL,
    at datetimeoffset(6) NOT NULL,
    received_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME(),
    PRIMARY KEY (event_id, site)
);
IF OBJECT_ID(N'dbo.sitesync_versions', N'U') IS NULL CREATE TABLE dbo.sitesync_versions (
    entity nvarchar(128) NOT NULL,
    [key] nvarchar(300) NOT NULL,
    ts datetimeoffset(6) NOT NULL,
    origin nvarchar(64) COLLATE Latin1_General_BIN2 NOT NULL,
    event_id uniqueidentifier NOT NULL,
    PRIMARY KEY (entity, [key])
);
IF OBJECT_ID(N'dbo.sitesync_conflicts', N'U') IS NULL CREATE TABLE dbo.sitesync_conflicts (
    id bigint IDENTITY PRIMARY KEY,
    loser_event_id uniqueidentifier NOT NULL UNIQUE,
    entity nvarchar(128) NOT NULL,
    [key] nvarchar(300) NOT NULL,
    loser_origin nvarchar(64) COLLATE Latin1_General_BIN2 NOT NULL,
    loser_ts datetimeoffset(6) NOT NULL,
    loser_payload nvarchar(max) NULL,
    winner_event_id uniqueidentifier NOT NULL,
    winner_origin nvarchar(64) COLLATE Latin1_General_BIN2 NOT NULL,
    winner_ts datetimeoffset(6) NOT NULL,
    recorded_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME()
);
";

/// Marks the session as the sink's (see the module doc).
pub const MARK_SESSION: &str =
    "EXEC sp_set_session_context @key = N'sitesync.applying', @value = 1, @read_only = 1";

/// A statement parameter, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(Option<String>),
    Int(i64),
    Float(f64),
    Bit(bool),
    Guid(Uuid),
}

impl Param {
    fn as_sql(&self) -> &dyn ToSql {
        match self {
            Param::Text(t) => t,
            Param::Int(n) => n,
            Param::Float(f) => f,
            Param::Bit(b) => b,
            Param::Guid(g) => g,
        }
    }

    /// A JSON value as the parameter SQL Server converts to the column's type.
    pub fn from_json(v: &Value) -> Param {
        match v {
            Value::Null => Param::Text(None),
            Value::Bool(b) => Param::Bit(*b),
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => Param::Int(i),
                (None, Some(f)) if n.is_f64() => Param::Float(f),
                // u64 above i64::MAX: exact as text (decimal(20,0) columns).
                _ => Param::Text(Some(n.to_string())),
            },
            Value::String(s) => Param::Text(Some(s.clone())),
            other => Param::Text(Some(other.to_string())),
        }
    }

    fn ts(t: DateTime<Utc>) -> Param {
        Param::Text(Some(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()))
    }
}

/// A statement and its parameters (`@P1…`).
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Param>,
}

/// `@P{n}` for the n-th (1-based) parameter.
fn p(n: usize) -> String {
    format!("@P{n}")
}

/// The upsert of one row: `MERGE … WITH (HOLDLOCK)` on the route's key.
pub fn upsert_statement(route: &Route, row: &MappedRow) -> Statement {
    let cols: Vec<&String> = row.columns.keys().collect();
    let select = cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} AS {}", p(i + 1), quote(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let on = route
        .key
        .iter()
        .map(|k| format!("t.{q} = s.{q}", q = quote(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let updates: Vec<String> = cols
        .iter()
        .filter(|c| !route.key.iter().any(|k| k == **c))
        .map(|c| format!("t.{q} = s.{q}", q = quote(c)))
        .collect();
    let col_list = cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let values = cols
        .iter()
        .map(|c| format!("s.{}", quote(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let matched = if updates.is_empty() {
        String::new()
    } else {
        format!(" WHEN MATCHED THEN UPDATE SET {}", updates.join(", "))
    };
    Statement {
        sql: format!(
            "MERGE {table} WITH (HOLDLOCK) AS t USING (SELECT {select}) AS s ON {on}{matched} \
             WHEN NOT MATCHED THEN INSERT ({col_list}) VALUES ({values});",
            table = quote_table(&route.table)
        ),
        params: cols
            .iter()
            .map(|c| Param::from_json(&row.columns[*c]))
            .collect(),
    }
}

/// The delete of one row by the route's key.
pub fn delete_statement(route: &Route, row: &MappedRow) -> Statement {
    let matches = route
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = {}", quote(k), p(i + 1)))
        .collect::<Vec<_>>()
        .join(" AND ");
    Statement {
        sql: format!("DELETE FROM {} WHERE {matches};", quote_table(&route.table)),
        params: route
            .key
            .iter()
            .map(|k| Param::from_json(row.columns.get(k).unwrap_or(&Value::Null)))
            .collect(),
    }
}

/// The inbox row of an event: inserted, or taken over from an earlier dead
/// letter; returns the id when the event is new here.
pub fn inbox_statement(event: &Event, outcome: &str) -> Statement {
    Statement {
        sql: "MERGE dbo.sitesync_inbox WITH (HOLDLOCK) AS t USING (SELECT @P1 AS event_id) AS s ON t.event_id = s.event_id \
              WHEN NOT MATCHED THEN INSERT (event_id, origin, type, epoch, seq, outcome) VALUES (@P1, @P2, @P3, @P4, @P5, @P6) \
              WHEN MATCHED AND t.outcome = N'dead_letter' THEN UPDATE SET outcome = @P6, received_at = SYSUTCDATETIME(), applied_at = SYSUTCDATETIME() \
              OUTPUT inserted.event_id;"
            .into(),
        params: vec![
            Param::Guid(event.id),
            Param::Text(Some(event.origin.clone())),
            Param::Text(Some(event.kind.clone())),
            Param::Int(event.epoch as i64),
            Param::Int(event.seq as i64),
            Param::Text(Some(outcome.into())),
        ],
    }
}

/// An entity's version moves only forward on `(ts, origin)`.
pub fn version_statement(entity: &Entity, v: &Version, id: Uuid) -> Statement {
    Statement {
        sql: "MERGE dbo.sitesync_versions WITH (HOLDLOCK) AS t \
              USING (SELECT @P1 AS entity, @P2 AS [key], CONVERT(datetimeoffset(6), @P3, 127) AS ts, @P4 AS origin, @P5 AS event_id) AS s \
              ON t.entity = s.entity AND t.[key] = s.[key] \
              WHEN MATCHED AND (s.ts > t.ts OR (s.ts = t.ts AND s.origin COLLATE Latin1_General_BIN2 > t.origin)) THEN UPDATE SET ts = s.ts, origin = s.origin, event_id = s.event_id \
              WHEN NOT MATCHED THEN INSERT (entity, [key], ts, origin, event_id) VALUES (s.entity, s.[key], s.ts, s.origin, s.event_id);"
            .into(),
        params: vec![
            Param::Text(Some(entity.table.clone())),
            Param::Text(Some(entity.key.clone())),
            Param::ts(v.ts),
            Param::Text(Some(v.origin.clone())),
            Param::Guid(id),
        ],
    }
}

pub fn conflict_statement(c: &Conflict) -> Statement {
    Statement {
        sql: "IF NOT EXISTS (SELECT 1 FROM dbo.sitesync_conflicts WHERE loser_event_id = @P1) \
              INSERT INTO dbo.sitesync_conflicts (loser_event_id, entity, [key], loser_origin, loser_ts, loser_payload, winner_event_id, winner_origin, winner_ts) \
              VALUES (@P1, @P2, @P3, @P4, CONVERT(datetimeoffset(6), @P5, 127), @P6, @P7, @P8, CONVERT(datetimeoffset(6), @P9, 127));"
            .into(),
        params: vec![
            Param::Guid(c.loser),
            Param::Text(Some(c.entity.table.clone())),
            Param::Text(Some(c.entity.key.clone())),
            Param::Text(Some(c.loser_version.origin.clone())),
            Param::ts(c.loser_version.ts),
            Param::Text(Some(c.loser_payload.to_string())),
            Param::Guid(c.winner),
            Param::Text(Some(c.winner_version.origin.clone())),
            Param::ts(c.winner_version.ts),
        ],
    }
}

/// Errors that belong to one message's data: constraints (2627, 2601, 547,
/// 515), conversions (241, 242, 245, 8114, 8115, 8152, 2628, 220, 232,
/// 8169 text to uniqueidentifier, 517 date overflow, 8134 divide by zero in
/// a trigger), invalid columns (207), JSON (13609), a trigger's THROW /
/// RAISERROR (50000 and up) and the batch a trigger's error aborted
/// (3616). Some of them also end the transaction: [`MssqlSession`] asks.
const DATA_ERRORS: &[u32] = &[
    207, 220, 232, 241, 242, 245, 515, 517, 547, 2601, 2627, 2628, 3616, 8114, 8115, 8134, 8152,
    8169, 13609,
];

/// What a server error number means for a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByNumber {
    /// Deadlock victim (1205) or lock timeout (1222): the batch again.
    Busy,
    /// One message's data: message by message, the failing one alone.
    Data,
    /// Anything else: [`conn::classify`].
    Other,
}

fn by_number(n: Option<u32>) -> ByNumber {
    match n {
        Some(1205) | Some(1222) => ByNumber::Busy,
        Some(n) if DATA_ERRORS.contains(&n) || n >= 50000 => ByNumber::Data,
        _ => ByNumber::Other,
    }
}

/// How a statement failed: the server's error number when the server
/// raised it, its text, and what it means for the batch as a whole.
#[derive(Debug)]
pub struct TdsError {
    pub number: Option<u32>,
    pub message: String,
    pub batch: TargetError,
}

impl TdsError {
    fn new(context: &str, e: tiberius::error::Error) -> TdsError {
        TdsError {
            number: conn::number(&e),
            message: e.to_string(),
            batch: conn::classify(context, &e).into(),
        }
    }
}

/// What a failed statement means for the batch, by its error number alone
/// (a data error may still have ended the transaction:
/// [`MssqlSession`] asks the server).
fn failed(e: TdsError) -> Failed {
    match by_number(e.number) {
        ByNumber::Busy => Failed::Busy,
        ByNumber::Data => Failed::Data(e.message),
        ByNumber::Other => Failed::Batch(e.batch),
    }
}

/// Rows as text, one `Vec` per row.
pub type Rows = Vec<Vec<Option<String>>>;

/// The calls the sink makes on a SQL Server connection: tiberius's client,
/// or in tests a fake that models the server's transaction semantics.
pub trait Tds: Send {
    /// Runs a statement, discarding what it returns.
    fn execute(
        &mut self,
        st: &Statement,
        context: &str,
    ) -> impl Future<Output = Result<(), TdsError>> + Send;

    /// Runs a statement and returns its first result set as text.
    fn select(
        &mut self,
        st: &Statement,
        context: &str,
    ) -> impl Future<Output = Result<Rows, TdsError>> + Send;

    /// Starts a READ COMMITTED transaction.
    fn begin(&mut self) -> impl Future<Output = Result<(), TdsError>> + Send;

    /// A savepoint named `name` in the transaction.
    fn save(&mut self, name: &str) -> impl Future<Output = Result<(), TdsError>> + Send;

    fn commit(&mut self) -> impl Future<Output = Result<(), TdsError>> + Send;

    fn rollback(&mut self) -> impl Future<Output = Result<(), TdsError>> + Send;
}

impl Tds for MssqlClient {
    async fn execute(&mut self, st: &Statement, context: &str) -> Result<(), TdsError> {
        let params: Vec<&dyn ToSql> = st.params.iter().map(Param::as_sql).collect();
        self.query(st.sql.as_str(), &params)
            .await
            .map_err(|e| TdsError::new(context, e))?
            .into_results()
            .await
            .map_err(|e| TdsError::new(context, e))?;
        Ok(())
    }

    async fn select(&mut self, st: &Statement, context: &str) -> Result<Rows, TdsError> {
        let params: Vec<&dyn ToSql> = st.params.iter().map(Param::as_sql).collect();
        let result = self
            .query(st.sql.as_str(), &params)
            .await
            .map_err(|e| TdsError::new(context, e))?
            .into_first_result()
            .await
            .map_err(|e| TdsError::new(context, e))?;
        result
            .iter()
            .map(|r| {
                r.cells()
                    .map(|(_, c)| cell_text(c))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TdsError {
                number: None,
                message: e.to_string(),
                batch: TargetError::transient(Cause::Query, format!("{context}: {e}")),
            })
    }

    async fn begin(&mut self) -> Result<(), TdsError> {
        self.begin_transaction_with_isolation(IsolationLevel::ReadCommitted)
            .await
            .map_err(|e| TdsError::new("starting the batch", e))
    }

    async fn save(&mut self, name: &str) -> Result<(), TdsError> {
        self.save_transaction(name.to_string())
            .await
            .map_err(|e| TdsError::new("savepoint", e))
    }

    async fn commit(&mut self) -> Result<(), TdsError> {
        self.commit_transaction()
            .await
            .map_err(|e| TdsError::new("committing the batch", e))
    }

    async fn rollback(&mut self) -> Result<(), TdsError> {
        self.rollback_transaction()
            .await
            .map_err(|e| TdsError::new("rolling back the batch", e))
    }
}

async fn run<C: Tds>(client: &mut C, st: &Statement, context: &str) -> Result<(), Failed> {
    client.execute(st, context).await.map_err(failed)
}

async fn rows<C: Tds>(client: &mut C, st: &Statement, context: &str) -> Result<Rows, Failed> {
    client.select(st, context).await.map_err(failed)
}

/// The transaction's state after an error: `XACT_STATE()` is 1 while it
/// can go on, -1 when it is doomed (it can only be rolled back), 0 when
/// there is none (the server rolled it back).
pub const XACT_STATE_SQL: &str = "SELECT XACT_STATE(), @@TRANCOUNT";

/// `ROLLBACK TRANSACTION <savepoint>` with no transaction (3903) or in a
/// doomed one (3931): the error before it ended the transaction.
const TRANSACTION_ENDED: &[u32] = &[3903, 3931];

/// The SQL Server side of the sink: connections, `init` and `check`.
pub struct SqlServerTarget {
    site: String,
    db: Settings,
    sink: Arc<SinkConfig>,
    /// `[schema].[outbox]`.
    outbox: String,
    application: String,
}

impl SqlServerTarget {
    pub fn new(cfg: &ConnectorConfig, db: &Settings) -> Result<SqlServerTarget, TargetError> {
        conn::config(db, "sitesync")?;
        let (schema, table) = db.outbox_parts();
        Ok(SqlServerTarget {
            site: cfg.site.clone(),
            db: db.clone(),
            sink: Arc::new(cfg.sink.clone()),
            outbox: format!("{}.{}", quote(schema), quote(table)),
            application: format!("sitesync-{}-sink", cfg.name),
        })
    }

    async fn open(&self) -> Result<MssqlClient, TargetError> {
        Ok(conn::connect(&self.db, &self.application).await?)
    }
}

impl Dialect for SqlServerTarget {
    type Session = MssqlSession;

    const BUSY_RETRIES: u32 = 40;

    /// A marked connection (see the module doc).
    async fn connect(&self) -> Result<MssqlSession, TargetError> {
        let mut client = self.open().await?;
        let mark = Statement {
            sql: MARK_SESSION.into(),
            params: vec![],
        };
        match run(&mut client, &mark, "marking the sink's session").await {
            Ok(()) => Ok(MssqlSession {
                client,
                site: self.site.clone(),
                sink: self.sink.clone(),
                outbox: self.outbox.clone(),
            }),
            Err(Failed::Batch(e)) => Err(e),
            Err(_) => Err(TargetError::transient(
                Cause::Query,
                "marking the sink's session failed",
            )),
        }
    }

    /// Creates the sink's tables.
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let mut client = self.open().await?;
        let st = Statement {
            sql: SCHEMA.into(),
            params: vec![],
        };
        match run(&mut client, &st, "creating the sink tables").await {
            Ok(()) => {}
            Err(Failed::Batch(e)) => return Err(e),
            Err(Failed::Data(m) | Failed::Gone(m)) => {
                return Err(TargetError::operator(
                    Cause::Query,
                    format!("creating the sink tables: {m}"),
                ));
            }
            Err(Failed::Busy | Failed::Seen) => {
                return Err(TargetError::transient(
                    Cause::Busy,
                    "creating the sink tables: locked",
                ));
            }
        }
        Ok(vec![
            "sink tables dbo.sitesync_inbox, sitesync_origins, sitesync_gaps, sitesync_versions, sitesync_conflicts: ready".into(),
        ])
    }

    /// The sink's tables exist, and every route's table does.
    async fn preflight(&self) -> Vec<Check> {
        let mut client = match self.open().await {
            Ok(c) => c,
            Err(e) => {
                return vec![Check::fail(
                    "sink database",
                    e.to_string(),
                    "check database.url",
                )];
            }
        };
        let mut checks = Vec::new();
        let st = Statement {
            sql: "SELECT CASE WHEN OBJECT_ID(N'dbo.sitesync_inbox', N'U') IS NOT NULL AND OBJECT_ID(N'dbo.sitesync_origins', N'U') IS NOT NULL \
                  AND OBJECT_ID(N'dbo.sitesync_gaps', N'U') IS NOT NULL AND OBJECT_ID(N'dbo.sitesync_versions', N'U') IS NOT NULL \
                  AND OBJECT_ID(N'dbo.sitesync_conflicts', N'U') IS NOT NULL \
                  AND COL_LENGTH(N'dbo.sitesync_gaps', N'requested_at') IS NOT NULL AND COL_LENGTH(N'dbo.sitesync_gaps', N'note') IS NOT NULL \
                  THEN 1 ELSE 0 END"
                .into(),
            params: vec![],
        };
        match rows(&mut client, &st, "looking for the sink tables").await {
            Ok(r) if r.first().and_then(|c| c[0].as_deref()) == Some("1") => {
                checks.push(Check::pass(
                    "sink tables",
                    "sitesync_inbox, _origins, _gaps, _versions, _conflicts",
                ))
            }
            Ok(_) => checks.push(Check::fail(
                "sink tables",
                "missing, or sitesync_gaps lacks requested_at and note (made by an older sitesync)",
                "run `sitesync init`",
            )),
            Err(_) => checks.push(Check::fail(
                "sink tables",
                "cannot be read",
                "check the login's grants",
            )),
        }
        for route in &self.sink.routes {
            let st = Statement {
                sql: "SELECT OBJECT_ID(@P1, N'U')".into(),
                params: vec![Param::Text(Some(quote_table(&route.table)))],
            };
            let found = matches!(rows(&mut client, &st, "looking for a route's table").await, Ok(r) if r.first().is_some_and(|c| c[0].is_some()));
            checks.push(if found {
                Check::pass(format!("route {}", route.kind), route.table.clone())
            } else {
                Check::fail(
                    format!("route {}", route.kind),
                    format!("table {} does not exist", route.table),
                    "create it, or fix sink.routes",
                )
            });
        }
        checks
    }
}

/// One marked connection of the SQL Server sink.
///
/// # When a message's error ends the transaction
///
/// Most errors of one message's data (a duplicate key, a constraint) end
/// the statement only: the batch rolls back to the message's savepoint and
/// goes on. Others end the whole transaction whatever `XACT_ABORT` says: a
/// conversion error (245, 8114…) is batch-aborting, an error raised in a
/// trigger aborts the batch (3616), and a transaction may be left doomed
/// (`XACT_STATE() = -1`: it can only be rolled back). Rolling back to the
/// savepoint then fails (3903, 3931). So after any data error the session
/// reads `XACT_STATE()` and `@@TRANCOUNT`: a transaction that cannot go on
/// makes the error [`Failed::Gone`], and the batch is redone without that
/// message, which fails alone (it goes to the dead-letter queue once it
/// has failed `sink.max_attempts` times).
pub struct MssqlSession<C: Tds = MssqlClient> {
    client: C,
    site: String,
    sink: Arc<SinkConfig>,
    /// `[schema].[outbox]`.
    outbox: String,
}

impl<C: Tds> MssqlSession<C> {
    /// Runs a statement of the batch.
    async fn exec(&mut self, st: &Statement, context: &str) -> Result<(), Failed> {
        match self.client.execute(st, context).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.after(e).await),
        }
    }

    /// Runs a statement of the batch that returns rows.
    async fn select(&mut self, st: &Statement, context: &str) -> Result<Rows, Failed> {
        match self.client.select(st, context).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.after(e).await),
        }
    }

    /// What an error means for the batch: a data error whose transaction
    /// cannot go on is [`Failed::Gone`] (see the type's doc).
    async fn after(&mut self, e: TdsError) -> Failed {
        match failed(e) {
            Failed::Data(reason) => {
                let probe = Statement {
                    sql: XACT_STATE_SQL.into(),
                    params: vec![],
                };
                match self
                    .client
                    .select(&probe, "reading the transaction's state")
                    .await
                {
                    Ok(r) if r.first().and_then(|c| c[0].as_deref()) == Some("1") => {
                        Failed::Data(reason)
                    }
                    Ok(_) => Failed::Gone(reason),
                    Err(e) => Failed::Batch(e.batch),
                }
            }
            other => other,
        }
    }

    /// This site's writes still in the outbox, for the batch's entities,
    /// versioned by their `created_at`.
    async fn read_local_writes(&mut self, entities: &[&Entity]) -> Result<Local, Failed> {
        let mut out = Local::new();
        let st = match local_writes_statement(&self.outbox, &self.sink, entities) {
            Some(st) => st,
            None => return Ok(out),
        };
        let wanted: HashSet<&Entity> = entities.iter().copied().collect();
        for r in self
            .select(&st, "looking for local writes not yet propagated")
            .await?
        {
            let (Some(id), Some(kind), Some(data), Some(ts)) = (
                r[0].as_deref(),
                r[1].as_deref(),
                r[2].as_deref(),
                r[3].as_deref().and_then(parse_timestamp),
            ) else {
                continue;
            };
            if let Some((entity, write)) =
                batch::local_write(&self.sink, &self.site, &wanted, (id, kind, data, ts))
            {
                out.entry(entity).or_default().push(write);
            }
        }
        Ok(out)
    }
}

impl<C: Tds> Session for MssqlSession<C> {
    async fn begin(&mut self, start: Start<'_>) -> Result<(), Failed> {
        self.client.begin().await.map_err(failed)?;
        let mut state = read_origins(self, start.origins).await?;
        let moved = batch::advance(&mut state, start.seen);
        write_progress(self, &moved).await?;
        shrink_gaps(self, &moved.late).await
    }

    async fn insert_inbox(
        &mut self,
        events: &[(&Event, &'static str)],
        _careful: bool,
    ) -> Result<HashSet<Uuid>, Failed> {
        // MERGE: an event the inbox holds is never an error here.
        let mut new = HashSet::new();
        for (ev, outcome) in events {
            let st = inbox_statement(ev, outcome);
            if !self.select(&st, "writing the inbox").await?.is_empty() {
                new.insert(ev.id);
            }
        }
        Ok(new)
    }

    async fn delete_own(&mut self, ids: &[Uuid]) -> Result<(), Failed> {
        for id in ids {
            let st = Statement {
                sql: format!("DELETE FROM {} WHERE [id] = @P1;", self.outbox),
                params: vec![Param::Guid(*id)],
            };
            self.exec(&st, "deleting outbox rows that came back")
                .await?;
        }
        Ok(())
    }

    async fn load_versions(&mut self, entities: &[&Entity]) -> Result<Stored, Failed> {
        let mut out = Stored::new();
        for e in entities {
            let st = Statement {
                sql: "SELECT ts, origin, CONVERT(nvarchar(36), event_id) FROM dbo.sitesync_versions WITH (UPDLOCK, HOLDLOCK) WHERE entity = @P1 AND [key] = @P2".into(),
                params: vec![
                    Param::Text(Some(e.table.clone())),
                    Param::Text(Some(e.key.clone())),
                ],
            };
            if let Some(r) = self
                .select(&st, "reading entity versions")
                .await?
                .into_iter()
                .next()
                && let (Some(ts), Some(origin), Some(Ok(id))) = (
                    r[0].as_deref().and_then(parse_timestamp),
                    r[1].clone(),
                    r[2].as_deref().map(Uuid::parse_str),
                )
            {
                out.insert((*e).clone(), (Version { ts, origin }, id));
            }
        }
        Ok(out)
    }

    async fn local_writes(&mut self, entities: &[&Entity]) -> Result<Local, Failed> {
        self.read_local_writes(entities).await
    }

    async fn write(&mut self, wave: &[Write<'_>]) -> Result<(), Failed> {
        for (route, row) in wave {
            let st = match route.operation {
                Operation::Upsert => upsert_statement(route, row),
                Operation::Delete => delete_statement(route, row),
            };
            self.exec(&st, &format!("writing {}", route.table)).await?;
        }
        Ok(())
    }

    async fn upsert_versions(
        &mut self,
        versions: &[(Entity, Version, Uuid)],
        _stored: &Stored,
    ) -> Result<(), Failed> {
        // MERGE on the key, forward only: what was read does not matter.
        for (entity, v, id) in versions {
            self.exec(
                &version_statement(entity, v, *id),
                "writing entity versions",
            )
            .await?;
        }
        Ok(())
    }

    async fn insert_conflicts(&mut self, conflicts: &[Conflict]) -> Result<(), Failed> {
        for c in conflicts {
            self.exec(&conflict_statement(c), "recording conflicts")
                .await?;
        }
        Ok(())
    }

    async fn mark_lost(&mut self, ids: &[Uuid]) -> Result<(), Failed> {
        for id in ids {
            let st = Statement {
                sql: "UPDATE dbo.sitesync_inbox SET outcome = N'lost' WHERE event_id = @P1;".into(),
                params: vec![Param::Guid(*id)],
            };
            self.exec(&st, "recording lost events").await?;
        }
        Ok(())
    }

    async fn recorded_losers(&mut self, ids: &[Uuid]) -> Result<HashSet<Uuid>, Failed> {
        let mut out = HashSet::new();
        for id in ids {
            let st = Statement {
                sql: "SELECT 1 FROM dbo.sitesync_conflicts WHERE loser_event_id = @P1".into(),
                params: vec![Param::Guid(*id)],
            };
            if !self
                .select(&st, "looking for this site's writes that lost here")
                .await?
                .is_empty()
            {
                out.insert(*id);
            }
        }
        Ok(out)
    }

    async fn withdraw_conflicts(&mut self, losers: &[Uuid]) -> Result<(), Failed> {
        for id in losers {
            let st = Statement {
                sql: "DELETE FROM dbo.sitesync_conflicts WHERE loser_event_id = @P1;".into(),
                params: vec![Param::Guid(*id)],
            };
            self.exec(&st, "withdrawing conflict records").await?;
        }
        Ok(())
    }

    async fn savepoint(&mut self) -> Result<(), Failed> {
        self.client.save(SAVEPOINT).await.map_err(failed)
    }

    /// SQL Server has no RELEASE SAVEPOINT: a savepoint ends with its
    /// transaction.
    async fn release_savepoint(&mut self) -> Result<(), Failed> {
        Ok(())
    }

    /// Fails with [`Failed::Gone`] when the error before it ended the
    /// transaction (no transaction, or a doomed one).
    async fn rollback_to_savepoint(&mut self) -> Result<(), Failed> {
        let undo = Statement {
            sql: format!("ROLLBACK TRANSACTION {SAVEPOINT}"),
            params: vec![],
        };
        match self
            .client
            .execute(&undo, "rolling back to a savepoint")
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.number.is_some_and(|n| TRANSACTION_ENDED.contains(&n)) => {
                Err(Failed::Gone(e.message))
            }
            Err(e) => Err(failed(e)),
        }
    }

    async fn commit(&mut self) -> Result<(), Failed> {
        self.client.commit().await.map_err(failed)
    }

    async fn rollback(&mut self) {
        let _ = self.client.rollback().await;
    }

    /// A failed round trip can leave the connection mid-response: after a
    /// batch failed, the next one starts on a new connection.
    async fn usable(&mut self) -> bool {
        false
    }

    async fn sweep_own(&mut self) -> Result<u64, TargetError> {
        let st = Statement {
            sql: format!(
                "DELETE o FROM {} AS o JOIN dbo.sitesync_inbox AS i ON i.event_id = o.[id] WHERE i.outcome = N'own'; SELECT @@ROWCOUNT;",
                self.outbox
            ),
            params: vec![],
        };
        match rows(&mut self.client, &st, "sweeping outbox rows back round").await {
            Ok(r) => Ok(r
                .first()
                .and_then(|c| c.first().cloned().flatten())
                .and_then(|t| t.parse().ok())
                .unwrap_or(0)),
            Err(Failed::Batch(e)) => Err(e),
            Err(_) => Err(TargetError::transient(
                Cause::Query,
                "sweeping outbox rows back round failed",
            )),
        }
    }

    async fn open_gaps(&mut self) -> Result<Vec<OpenGap>, TargetError> {
        let st = Statement {
            sql: "SELECT id, origin, epoch, from_seq, to_seq, DATEDIFF_BIG(millisecond, detected_at, SYSUTCDATETIME()), \
                  DATEDIFF_BIG(millisecond, requested_at, SYSUTCDATETIME()), note FROM dbo.sitesync_gaps ORDER BY id"
                .into(),
            params: vec![],
        };
        let rows = rows(&mut self.client, &st, "reading sitesync_gaps")
            .await
            .map_err(|_| TargetError::transient(Cause::Query, "reading sitesync_gaps failed"))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let t = |i: usize| r.get(i).cloned().flatten();
                let n = |i: usize| t(i)?.parse::<i64>().ok();
                Some(OpenGap {
                    id: n(0)?,
                    origin: t(1)?,
                    epoch: n(2)? as u64,
                    from: n(3)? as u64,
                    to: n(4)? as u64,
                    age_s: n(5).unwrap_or(0) as f64 / 1000.0,
                    requested_s: n(6).map(|ms| ms as f64 / 1000.0),
                    note: t(7),
                })
            })
            .collect())
    }

    async fn record_receipt(&mut self, r: &Receipt) -> Result<(), TargetError> {
        let at = r.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        for e in &r.events {
            let st = Statement {
                sql: "MERGE dbo.sitesync_receipts WITH (HOLDLOCK) AS t \
                      USING (SELECT CAST(@P1 AS uniqueidentifier) AS event_id, @P2 AS site) AS s ON t.event_id = s.event_id AND t.site = s.site \
                      WHEN MATCHED AND @P5 <> N'duplicate' THEN UPDATE SET outcome = @P5, reason = @P6, at = CAST(@P7 AS datetimeoffset(6)), received_at = SYSUTCDATETIME() \
                      WHEN NOT MATCHED THEN INSERT (event_id, site, epoch, seq, outcome, reason, at) \
                      VALUES (s.event_id, s.site, @P3, @P4, @P5, @P6, CAST(@P7 AS datetimeoffset(6)));"
                    .into(),
                params: vec![
                    Param::Text(Some(e.id.to_string())),
                    Param::Text(Some(r.site.clone())),
                    Param::Int(e.epoch as i64),
                    Param::Int(e.seq as i64),
                    Param::Text(Some(e.outcome.clone())),
                    Param::Text(e.reason.clone()),
                    Param::Text(Some(at.clone())),
                ],
            };
            run(&mut self.client, &st, "recording a receipt")
                .await
                .map_err(|_| TargetError::transient(Cause::Query, "recording a receipt failed"))?;
        }
        Ok(())
    }

    async fn trace(&mut self, id: Uuid) -> Result<Traced, TargetError> {
        let fail = |_| {
            TargetError::transient(
                Cause::Query,
                "reading what the database knows of an event failed",
            )
        };
        let st = Statement {
            sql: "SELECT site, epoch, seq, outcome, reason, CONVERT(nvarchar(40), at, 127), CONVERT(nvarchar(33), received_at, 126) \
                  FROM dbo.sitesync_receipts WHERE event_id = CAST(@P1 AS uniqueidentifier) ORDER BY at, site"
                .into(),
            params: vec![Param::Text(Some(id.to_string()))],
        };
        let receipts = rows(&mut self.client, &st, "reading sitesync_receipts")
            .await
            .map_err(fail)?
            .iter()
            .filter_map(|r| {
                let t = |i: usize| r.get(i).cloned().flatten();
                Some(ReceiptRow {
                    site: t(0)?,
                    epoch: t(1)?.parse().ok()?,
                    seq: t(2)?.parse().ok()?,
                    outcome: t(3)?,
                    reason: t(4),
                    at: t(5)?,
                    received_at: t(6).unwrap_or_default(),
                })
            })
            .collect();
        let st = Statement {
            sql:
                "SELECT origin, type, epoch, seq, outcome, CONVERT(nvarchar(33), applied_at, 126) \
                  FROM dbo.sitesync_inbox WHERE event_id = CAST(@P1 AS uniqueidentifier)"
                    .into(),
            params: vec![Param::Text(Some(id.to_string()))],
        };
        let inbox = rows(&mut self.client, &st, "reading sitesync_inbox")
            .await
            .map_err(fail)?
            .first()
            .and_then(|r| {
                let t = |i: usize| r.get(i).cloned().flatten();
                Some((
                    t(0)?,
                    t(1)?,
                    t(2)?.parse().ok()?,
                    t(3)?.parse().ok()?,
                    t(4)?,
                    t(5).unwrap_or_default(),
                ))
            });
        Ok(Traced { receipts, inbox })
    }

    async fn unreceipted(
        &mut self,
        sites: &[String],
        older_than_s: u64,
    ) -> Result<Vec<(String, u64, f64)>, TargetError> {
        let mut out = Vec::new();
        for site in sites {
            let st = Statement {
                sql: "SELECT COUNT(*), DATEDIFF_BIG(millisecond, MIN(f.t), SYSUTCDATETIME()) FROM \
                      (SELECT event_id, MIN(received_at) AS t FROM dbo.sitesync_receipts GROUP BY event_id \
                       HAVING MIN(received_at) < DATEADD(second, -@P1, SYSUTCDATETIME())) f \
                      WHERE NOT EXISTS (SELECT 1 FROM dbo.sitesync_receipts r WHERE r.event_id = f.event_id AND r.site = @P2) \
                      AND EXISTS (SELECT 1 FROM dbo.sitesync_receipts x WHERE x.site = @P2)"
                    .into(),
                params: vec![Param::Int(older_than_s as i64), Param::Text(Some(site.clone()))],
            };
            let r = rows(&mut self.client, &st, "reading sitesync_receipts")
                .await
                .map_err(|_| {
                    TargetError::transient(Cause::Query, "reading sitesync_receipts failed")
                })?;
            let n: u64 = r
                .first()
                .and_then(|c| c.first().cloned().flatten())
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            if n > 0 {
                let ms: f64 = r
                    .first()
                    .and_then(|c| c.get(1).cloned().flatten())
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0.0);
                out.push((site.clone(), n, ms / 1000.0));
            }
        }
        Ok(out)
    }

    async fn mark_gaps(&mut self, ids: &[i64], mark: GapMark<'_>) -> Result<(), TargetError> {
        for id in ids {
            let st = match mark {
                GapMark::Requested => Statement {
                    sql: "UPDATE dbo.sitesync_gaps SET requested_at = SYSUTCDATETIME() WHERE id = @P1;".into(),
                    params: vec![Param::Int(*id)],
                },
                GapMark::RequestedAnew => Statement {
                    sql: "UPDATE dbo.sitesync_gaps SET requested_at = SYSUTCDATETIME(), note = NULL WHERE id = @P1;".into(),
                    params: vec![Param::Int(*id)],
                },
                GapMark::Note(note) => Statement {
                    sql: "UPDATE dbo.sitesync_gaps SET note = @P2 WHERE id = @P1;".into(),
                    params: vec![Param::Int(*id), Param::Text(Some(note.to_string()))],
                },
            };
            run(&mut self.client, &st, "marking gaps")
                .await
                .map_err(|_| TargetError::transient(Cause::Query, "marking gaps failed"))?;
        }
        Ok(())
    }
}

/// The savepoint each message of an isolated batch runs under.
const SAVEPOINT: &str = "sitesync_item";

/// `SELECT id, type, data, created_at` of the outbox rows that may be
/// local writes of the entities (by route type and entity key).
pub fn local_writes_statement(
    outbox: &str,
    sink: &SinkConfig,
    entities: &[&Entity],
) -> Option<Statement> {
    let tables: HashSet<&str> = entities.iter().map(|e| e.table.as_str()).collect();
    let mut types: Vec<&str> = sink
        .routes
        .iter()
        .filter(|r| tables.contains(r.entity_table().as_str()))
        .map(|r| r.kind.as_str())
        .collect();
    types.sort_unstable();
    types.dedup();
    if types.is_empty() || entities.is_empty() {
        return None;
    }
    let mut params: Vec<Param> = Vec::new();
    let list = |values: Vec<&str>, params: &mut Vec<Param>| -> String {
        values
            .into_iter()
            .map(|v| {
                params.push(Param::Text(Some(v.to_string())));
                p(params.len())
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let type_list = list(types, &mut params);
    let keys: Vec<&str> = entities.iter().map(|e| e.key.as_str()).collect();
    let key_list = list(keys, &mut params);
    Some(Statement {
        sql: format!(
            "SELECT CONVERT(nvarchar(36), [id]), [type], [data], [created_at] FROM {outbox} \
             WHERE [type] IN ({type_list}) AND ([entity_key] IS NULL OR [entity_key] IN ({key_list}))"
        ),
        params,
    })
}

/// Each origin's progress, read and locked (`UPDLOCK, HOLDLOCK`).
async fn read_origins<C: Tds>(
    s: &mut MssqlSession<C>,
    origins: &[&str],
) -> Result<Origins, Failed> {
    let mut state = Origins::new();
    for o in origins {
        let st = Statement {
            sql: "SELECT epoch, seq FROM dbo.sitesync_origins WITH (UPDLOCK, HOLDLOCK) WHERE origin = @P1".into(),
            params: vec![Param::Text(Some(o.to_string()))],
        };
        if let Some(r) = s
            .select(&st, "reading origin progress")
            .await?
            .into_iter()
            .next()
        {
            let n = |i: usize| {
                r[i].as_deref()
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            state.insert(o.to_string(), (n(0), n(1)));
        }
    }
    Ok(state)
}

/// The origins' new progress and the gaps found.
async fn write_progress<C: Tds>(s: &mut MssqlSession<C>, moved: &Progress) -> Result<(), Failed> {
    for (o, epoch, seq) in &moved.changed {
        let st = Statement {
            sql: "MERGE dbo.sitesync_origins WITH (HOLDLOCK) AS t USING (SELECT @P1 AS origin) AS s ON t.origin = s.origin \
                  WHEN MATCHED THEN UPDATE SET epoch = @P2, seq = @P3, updated_at = SYSUTCDATETIME() \
                  WHEN NOT MATCHED THEN INSERT (origin, epoch, seq) VALUES (@P1, @P2, @P3);"
                .into(),
            params: vec![
                Param::Text(Some(o.to_string())),
                Param::Int(*epoch as i64),
                Param::Int(*seq as i64),
            ],
        };
        s.exec(&st, "writing origin progress").await?;
    }
    for g in &moved.gaps {
        let st = Statement {
            sql: "INSERT INTO dbo.sitesync_gaps (origin, epoch, from_seq, to_seq) VALUES (@P1, @P2, @P3, @P4);".into(),
            params: vec![
                Param::Text(Some(g.origin.clone())),
                Param::Int(g.epoch as i64),
                Param::Int(g.from as i64),
                Param::Int(g.to as i64),
            ],
        };
        s.exec(&st, "recording gaps").await?;
    }
    Ok(())
}

/// Takes late arrivals out of the gaps recorded before ([`rules::shrink`]):
/// the rows they touch are read under lock, then shrunk, split or deleted.
async fn shrink_gaps<C: Tds>(s: &mut MssqlSession<C>, late: &[LateArrivals]) -> Result<(), Failed> {
    for l in late {
        let st = Statement {
            sql: "SELECT id, from_seq, to_seq FROM dbo.sitesync_gaps WITH (UPDLOCK, HOLDLOCK) \
                  WHERE origin = @P1 AND epoch = @P2 AND from_seq <= @P3 AND to_seq >= @P4 ORDER BY id"
                .into(),
            params: vec![
                Param::Text(Some(l.origin.clone())),
                Param::Int(l.epoch as i64),
                Param::Int(l.high as i64),
                Param::Int(l.low as i64),
            ],
        };
        let rows: Vec<GapRow> = s
            .select(&st, "reading the gaps late events fall in")
            .await?
            .iter()
            .filter_map(|r| {
                let n = |i: usize| r.get(i)?.as_deref()?.parse::<i64>().ok();
                Some((n(0)?, n(1)? as u64, n(2)? as u64))
            })
            .collect();
        for (id, pieces) in rules::shrink(&rows, &l.seqs) {
            let (sql, params, context) = match pieces.split_first() {
                None => (
                    "DELETE FROM dbo.sitesync_gaps WHERE id = @P1;",
                    vec![Param::Int(id)],
                    "closing a gap",
                ),
                Some(((from, to), _)) => (
                    "UPDATE dbo.sitesync_gaps SET from_seq = @P2, to_seq = @P3 WHERE id = @P1;",
                    vec![
                        Param::Int(id),
                        Param::Int(*from as i64),
                        Param::Int(*to as i64),
                    ],
                    "shrinking a gap",
                ),
            };
            s.exec(
                &Statement {
                    sql: sql.into(),
                    params,
                },
                context,
            )
            .await?;
            for (from, to) in pieces.iter().skip(1) {
                let st = Statement {
                    sql: "INSERT INTO dbo.sitesync_gaps (origin, epoch, from_seq, to_seq, detected_at, requested_at, note) \
                          SELECT origin, epoch, @P2, @P3, detected_at, requested_at, note FROM dbo.sitesync_gaps WHERE id = @P1;"
                        .into(),
                    params: vec![Param::Int(id), Param::Int(*from as i64), Param::Int(*to as i64)],
                };
                s.exec(&st, "splitting a gap").await?;
            }
        }
    }
    Ok(())
}

impl std::fmt::Debug for SqlServerTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqlServerTarget({})", redact_url(&self.db.url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_errors_are_one_messages_and_lock_errors_retry_the_batch() {
        // Duplicate key, unique index, FK/CHECK, NULL into NOT NULL,
        // conversions, overflow, truncation (2019+ and older), bad GUID
        // text, bad JSON, a trigger's THROW and the batch it aborted.
        // Whether the transaction survived is asked of the server after
        // (see the defect_1 tests below).
        for n in [
            2627, 2601, 547, 515, 245, 8114, 8115, 220, 2628, 8152, 8169, 13609, 50000, 51234, 3616,
        ] {
            assert_eq!(by_number(Some(n)), ByNumber::Data, "{n}");
        }
        assert_eq!(by_number(Some(1205)), ByNumber::Busy);
        assert_eq!(by_number(Some(1222)), ByNumber::Busy);
        // Login, permissions, connection: not one message's fault.
        for n in [18456, 229, 233, 4060] {
            assert_eq!(by_number(Some(n)), ByNumber::Other, "{n}");
        }
        assert_eq!(by_number(None), ByNumber::Other);
    }

    /// A fake SQL Server (the real one cannot run here): statements are
    /// recorded, not interpreted, in a transaction with savepoints, and
    /// fail as Microsoft documents. A parameter `not a number` is a
    /// conversion error (245), which ends the transaction whatever
    /// `XACT_ABORT` says: the server rolls it back, or (`dooms`) leaves it
    /// doomed, `XACT_STATE() = -1`, able only to roll back. A parameter
    /// `taken` is a duplicate key (2627), which ends the statement only.
    #[derive(Debug, Default)]
    struct Server {
        committed: Vec<Statement>,
        tx: Option<Vec<Statement>>,
        /// The transaction's length at each `SAVE TRANSACTION`.
        savepoints: Vec<usize>,
        doomed: bool,
        dooms: bool,
        begun: usize,
    }

    fn server_error(number: u32, text: &str) -> TdsError {
        let message = format!("{text} (error {number})");
        TdsError {
            number: Some(number),
            batch: TargetError::operator(Cause::Query, message.clone()),
            message,
        }
    }

    impl Server {
        fn run(&mut self, st: &Statement) -> Result<Rows, TdsError> {
            if st.sql == XACT_STATE_SQL {
                let (state, count) = match (&self.tx, self.doomed) {
                    (None, _) => ("0", "0"),
                    (Some(_), true) => ("-1", "1"),
                    (Some(_), false) => ("1", "1"),
                };
                return Ok(vec![vec![Some(state.into()), Some(count.into())]]);
            }
            if st.sql.starts_with("ROLLBACK TRANSACTION ") {
                let Some(tx) = self.tx.as_mut() else {
                    return Err(server_error(
                        3903,
                        "The ROLLBACK TRANSACTION request has no corresponding BEGIN TRANSACTION",
                    ));
                };
                if self.doomed {
                    return Err(server_error(
                        3931,
                        "The current transaction cannot be committed and cannot be rolled back to a savepoint",
                    ));
                }
                let at = *self.savepoints.last().expect("a savepoint");
                tx.truncate(at);
                return Ok(vec![]);
            }
            if self.doomed && !st.sql.starts_with("SELECT") {
                return Err(server_error(
                    3930,
                    "The current transaction cannot be committed and cannot support operations that write to the log file",
                ));
            }
            if st
                .params
                .contains(&Param::Text(Some("not a number".into())))
            {
                if self.dooms {
                    self.doomed = true;
                } else {
                    self.tx = None;
                    self.savepoints.clear();
                }
                return Err(server_error(
                    245,
                    "Conversion failed when converting the nvarchar value 'not a number' to data type int",
                ));
            }
            if st.params.contains(&Param::Text(Some("taken".into()))) {
                return Err(server_error(2627, "Violation of UNIQUE KEY constraint"));
            }
            match &mut self.tx {
                Some(tx) => tx.push(st.clone()),
                None => self.committed.push(st.clone()),
            }
            // The inbox's MERGE outputs the id of an event new here.
            Ok(
                match (st.sql.contains("OUTPUT inserted.event_id"), &st.params[..]) {
                    (true, [Param::Guid(id), ..]) => vec![vec![Some(id.to_string())]],
                    _ => vec![],
                },
            )
        }
    }

    #[derive(Clone, Default)]
    struct FakeServer(Arc<std::sync::Mutex<Server>>);

    impl FakeServer {
        fn with<T>(
            &self,
            f: impl FnOnce(&mut Server) -> Result<T, TdsError>,
        ) -> Result<T, TdsError> {
            f(&mut self.0.lock().unwrap())
        }
    }

    impl Tds for FakeServer {
        async fn execute(&mut self, st: &Statement, _: &str) -> Result<(), TdsError> {
            self.with(|s| s.run(st).map(|_| ()))
        }

        async fn select(&mut self, st: &Statement, _: &str) -> Result<Rows, TdsError> {
            self.with(|s| s.run(st))
        }

        async fn begin(&mut self) -> Result<(), TdsError> {
            self.with(|s| {
                s.tx = Some(Vec::new());
                s.savepoints.clear();
                s.doomed = false;
                s.begun += 1;
                Ok(())
            })
        }

        async fn save(&mut self, _: &str) -> Result<(), TdsError> {
            self.with(|s| match (&s.tx, s.doomed) {
                (None, _) => Err(server_error(628, "Cannot issue SAVE TRANSACTION when there is no active transaction")),
                (Some(_), true) => Err(server_error(3931, "The current transaction cannot be committed and cannot be rolled back to a savepoint")),
                (Some(tx), false) => {
                    let at = tx.len();
                    s.savepoints.push(at);
                    Ok(())
                }
            })
        }

        async fn commit(&mut self) -> Result<(), TdsError> {
            self.with(|s| match (s.tx.take(), s.doomed) {
                (None, _) => Err(server_error(
                    3902,
                    "The COMMIT TRANSACTION request has no corresponding BEGIN TRANSACTION",
                )),
                (Some(_), true) => Err(server_error(
                    3930,
                    "The current transaction cannot be committed",
                )),
                (Some(tx), false) => {
                    s.committed.extend(tx);
                    Ok(())
                }
            })
        }

        async fn rollback(&mut self) -> Result<(), TdsError> {
            self.with(|s| {
                s.doomed = false;
                match s.tx.take() {
                    Some(_) => Ok(()),
                    None => Err(server_error(
                        3903,
                        "The ROLLBACK TRANSACTION request has no corresponding BEGIN TRANSACTION",
                    )),
                }
            })
        }
    }

    struct FakeDialect(FakeServer);

    impl Dialect for FakeDialect {
        type Session = MssqlSession<FakeServer>;
        const BUSY_RETRIES: u32 = 3;

        async fn connect(&self) -> Result<Self::Session, TargetError> {
            Ok(MssqlSession {
                client: self.0.clone(),
                site: "PARIS".into(),
                sink: Arc::new(sink_with(vec![route(Operation::Upsert)])),
                outbox: "[dbo].[outbox]".into(),
            })
        }

        async fn init(&self) -> Result<Vec<String>, TargetError> {
            Ok(Vec::new())
        }

        async fn preflight(&self) -> Vec<Check> {
            Vec::new()
        }
    }

    /// LONDON's customers 1, 2, 3 applied at PARIS in one batch, customer
    /// 2's age being `age2`: the outcomes, and the fake server after.
    async fn three_customers(age2: &str, dooms: bool) -> (Vec<Outcome>, Server) {
        let r = route(Operation::Upsert);
        let events = [
            event_with(1, "LONDON", "1", 10, r#"{"id": 1, "age": "30"}"#),
            event_with(
                2,
                "LONDON",
                "2",
                10,
                &format!(r#"{{"id": 2, "age": "{age2}"}}"#),
            ),
            event_with(3, "LONDON", "3", 10, r#"{"id": 3, "age": "41"}"#),
        ];
        let server = FakeServer::default();
        server.0.lock().unwrap().dooms = dooms;
        let target = Batches::new(
            FakeDialect(server.clone()),
            "PARIS",
            &sink_with(vec![r.clone()]),
        );
        let outcomes = target
            .apply(&items(&events, &r, "PARIS"))
            .await
            .expect("one bad message does not fail the batch");
        let state = std::mem::take(&mut *server.0.lock().unwrap());
        (outcomes, state)
    }

    /// The customers' ids the committed MERGEs wrote, and the events the
    /// committed inbox rows hold.
    fn committed(s: &Server) -> (Vec<i64>, Vec<Uuid>) {
        let mut rows = Vec::new();
        let mut inbox = Vec::new();
        for st in &s.committed {
            // A customer's columns are `age`, `id`; the inbox's first is
            // the event id.
            match &st.params[..] {
                [_, Param::Int(id)] if st.sql.starts_with("MERGE [dbo].[customers]") => {
                    rows.push(*id)
                }
                [Param::Guid(id), ..] if st.sql.starts_with("MERGE dbo.sitesync_inbox") => {
                    inbox.push(*id)
                }
                _ => {}
            }
        }
        (rows, inbox)
    }

    fn assert_one_message_failed(outcomes: &[Outcome], s: &Server, error: &str) {
        assert_eq!(outcomes[0], Outcome::Applied);
        assert!(
            matches!(&outcomes[1], Outcome::Failed(e) if e.contains(error)),
            "{:?}",
            outcomes[1]
        );
        assert_eq!(outcomes[2], Outcome::Applied);
        let (rows, inbox) = committed(s);
        assert_eq!(rows, [1, 3], "customers 1 and 3 are written, 2 is not");
        assert_eq!(inbox, [Uuid::from_u128(1), Uuid::from_u128(3)]);
    }

    #[tokio::test]
    async fn defect_1_a_conversion_error_the_server_rolled_back_fails_one_message_not_the_site() {
        let (outcomes, s) = three_customers("not a number", false).await;
        assert_one_message_failed(&outcomes, &s, "Conversion failed");
        assert_eq!(
            s.begun, 3,
            "the batch, then one message at a time, then without the message that ended it"
        );
    }

    #[tokio::test]
    async fn defect_1_a_doomed_transaction_is_redone_without_the_message_that_doomed_it() {
        let (outcomes, s) = three_customers("not a number", true).await;
        assert_one_message_failed(&outcomes, &s, "Conversion failed");
        assert_eq!(s.begun, 3);
    }

    #[tokio::test]
    async fn a_duplicate_key_ends_its_statement_only_and_the_batch_goes_on_past_it() {
        let (outcomes, s) = three_customers("taken", false).await;
        assert_one_message_failed(&outcomes, &s, "UNIQUE KEY");
        assert_eq!(
            s.begun, 2,
            "rolled back to the message's savepoint: no third attempt"
        );
    }

    use crate::config::Operation;
    use crate::sink::batch::Batches;
    use crate::sink::testing::{event_with, items, sink_with};
    use crate::sink::{Outcome, Target};
    use serde_json::json;
    use std::collections::BTreeMap as Map;

    fn route(op: Operation) -> Route {
        Route {
            kind: "customer.upsert".into(),
            table: "dbo.customers".into(),
            key: vec!["id".into()],
            operation: op,
            rename: Map::new(),
            drop: vec![],
            constants: Map::new(),
        }
    }

    fn mapped(v: Value) -> MappedRow {
        let Value::Object(columns) = v else { panic!() };
        MappedRow {
            entity: Entity {
                table: "dbo.customers".into(),
                key: "1".into(),
            },
            columns,
        }
    }

    #[test]
    fn an_upsert_is_one_merge_with_holdlock_and_parameters() {
        let st = upsert_statement(
            &route(Operation::Upsert),
            &mapped(json!({"id": 1, "name": "Zoé", "vip": true, "score": 1.5, "note": null})),
        );
        assert_eq!(
            st.sql,
            "MERGE [dbo].[customers] WITH (HOLDLOCK) AS t USING (SELECT @P1 AS [id], @P2 AS [name], @P3 AS [note], @P4 AS [score], @P5 AS [vip]) AS s \
             ON t.[id] = s.[id] WHEN MATCHED THEN UPDATE SET t.[name] = s.[name], t.[note] = s.[note], t.[score] = s.[score], t.[vip] = s.[vip] \
             WHEN NOT MATCHED THEN INSERT ([id], [name], [note], [score], [vip]) VALUES (s.[id], s.[name], s.[note], s.[score], s.[vip]);"
        );
        assert_eq!(
            st.params,
            vec![
                Param::Int(1),
                Param::Text(Some("Zoé".into())),
                Param::Text(None),
                Param::Float(1.5),
                Param::Bit(true)
            ]
        );
    }

    #[test]
    fn a_key_only_upsert_has_no_update_branch_and_identifiers_are_escaped() {
        let mut r = route(Operation::Upsert);
        r.table = "dbo.we]ird".into();
        let st = upsert_statement(&r, &mapped(json!({"id": "a"})));
        assert!(st.sql.starts_with("MERGE [dbo].[we]]ird] WITH (HOLDLOCK)"));
        assert!(!st.sql.contains("WHEN MATCHED"));
    }

    #[test]
    fn a_delete_uses_the_key_only() {
        let st = delete_statement(
            &route(Operation::Delete),
            &mapped(json!({"id": 7, "name": "x"})),
        );
        assert_eq!(st.sql, "DELETE FROM [dbo].[customers] WHERE [id] = @P1;");
        assert_eq!(st.params, vec![Param::Int(7)]);
    }

    #[test]
    fn the_inbox_takes_over_dead_letters_only_and_says_what_is_new() {
        let ev = Event {
            id: Uuid::from_u128(1),
            timestamp: DateTime::from_timestamp(0, 0).unwrap(),
            origin: "LONDON".into(),
            kind: "t".into(),
            entity_key: None,
            data: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            epoch: 2,
            seq: 9,
        };
        let st = inbox_statement(&ev, "applied");
        assert!(st.sql.contains("WITH (HOLDLOCK)"));
        assert!(
            st.sql
                .contains("WHEN MATCHED AND t.outcome = N'dead_letter'")
        );
        assert!(st.sql.ends_with("OUTPUT inserted.event_id;"));
        assert_eq!(st.params[0], Param::Guid(ev.id));
        assert_eq!(st.params[3], Param::Int(2));
        assert_eq!(st.params[4], Param::Int(9));
    }

    #[test]
    fn versions_only_move_forward_on_timestamp_then_origin() {
        let st = version_statement(
            &Entity {
                table: "dbo.customers".into(),
                key: "1".into(),
            },
            &Version {
                ts: DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap(),
                origin: "PARIS".into(),
            },
            Uuid::from_u128(5),
        );
        assert!(st.sql.contains("WHEN MATCHED AND (s.ts > t.ts OR (s.ts = t.ts AND s.origin COLLATE Latin1_General_BIN2 > t.origin))"));
        assert_eq!(
            st.params[2],
            Param::Text(Some("2023-11-14T22:13:20.123456Z".into()))
        );
    }

    #[test]
    fn json_values_become_typed_parameters() {
        assert_eq!(Param::from_json(&json!(null)), Param::Text(None));
        assert_eq!(Param::from_json(&json!(42)), Param::Int(42));
        assert_eq!(Param::from_json(&json!(2.5)), Param::Float(2.5));
        assert_eq!(
            Param::from_json(&json!(18446744073709551615u64)),
            Param::Text(Some("18446744073709551615".into()))
        );
        assert_eq!(
            Param::from_json(&json!({"a": 1})),
            Param::Text(Some("{\"a\":1}".into()))
        );
    }

    #[test]
    fn the_trigger_marker_is_a_read_only_session_context_key() {
        assert_eq!(
            MARK_SESSION,
            "EXEC sp_set_session_context @key = N'sitesync.applying', @value = 1, @read_only = 1"
        );
    }
}
