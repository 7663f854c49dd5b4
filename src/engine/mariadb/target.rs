//! Applying events to MariaDB (tested on 10.11) and MySQL (8.0.20+, by
//! its documentation: no MySQL server runs here).
//!
//! The batch is the sink's ([`crate::sink::batch`], the same for every
//! engine): one READ COMMITTED transaction per batch holds the inbox rows,
//! the per-origin progress and gaps, the deletion of this site's outbox
//! rows whose events came back round, the changes, the entities' versions
//! and the conflicts; the messages are acked only after it commits. This
//! file is its SQL, and how the servers' errors classify
//! ([`super::conn`], "Error numbers").
//!
//! # Marker for application triggers
//!
//! Every batch starts with `SET @sitesync_applying = 1` (again each time:
//! a connection handed back to the pool is reset, which clears user
//! variables). Every statement of the sink's session carries it, and no
//! other session: an application trigger that fills the outbox skips the
//! sink's changes with
//!
//! ```sql
//! CREATE TRIGGER customers_outbox AFTER UPDATE ON customers FOR EACH ROW
//! BEGIN
//!     IF @sitesync_applying IS NULL OR @sitesync_applying <> 1 THEN
//!         INSERT INTO outbox (type, entity_key, data)
//!         VALUES ('customer.upsert', NEW.id, JSON_OBJECT('id', NEW.id, 'name', NEW.name));
//!     END IF;
//! END
//! ```
//!
//! (`IF @sitesync_applying = 1 THEN … ELSE …` reads the same.) The same
//! batch settings make the session strict (`STRICT_ALL_TABLES`, see
//! [`BEGIN`]), its `time_zone` UTC (see "Values") and its
//! lock waits 1 s (`innodb_lock_wait_timeout`; the sink yields to
//! applications, see [`MariaDbTarget`]'s `BUSY_RETRIES`): a trigger fired
//! by the sink sees `NOW()` in UTC.
//!
//! # Upserts: `INSERT … ON DUPLICATE KEY UPDATE c = VALUES(c)`
//!
//! One multi-row statement per table, operation and column set, like the
//! PostgreSQL target's. `VALUES(c)` is what both servers accept: MySQL
//! 8.0.20+ deprecates it (a warning) in favour of a row alias
//! (`INSERT … AS new … UPDATE c = new.c`), which MariaDB does not have, and
//! MariaDB's `VALUE(c)` is MariaDB's only.
//!
//! `ON DUPLICATE KEY` fires on any unique index, not only the route's key:
//! into a table with another unique index, an event whose values collide
//! with another row's there would update that row. Such a table is
//! written by key instead (its rows locked, found ones updated one by one,
//! the others inserted plainly, so that a collision fails its message with
//! 1062 as on PostgreSQL), and `sitesync check` warns about it. A table's
//! columns and unique indexes are read once per connection (again after a
//! failed batch): an index added meanwhile is seen from the next
//! connection on.
//!
//! # Values
//!
//! JSON fields are sent as parameters and converted by the server to each
//! column's type (strict mode turns a value that does not fit into an
//! error of its message): numbers that are integers as integers, other
//! numbers as their decimal text (exact into `DECIMAL`), booleans as 1/0,
//! strings as text, objects and arrays as JSON text. The columns' types
//! come from `information_schema.COLUMNS` (and, on MariaDB, whose `JSON`
//! is `LONGTEXT` with a `JSON_VALID` check, `CHECK_CONSTRAINTS`):
//!
//! - a JSON column gets every value as JSON text (a string `"a"` as `"a"`,
//!   as PostgreSQL's `jsonb` gets it);
//! - a `DATETIME` or `TIMESTAMP` column gets a text with a zone
//!   (`2026-01-02T03:04:05+02:00`, as PostgreSQL sites publish
//!   `timestamptz`) as UTC (`2026-01-02 01:04:05.000000`): MariaDB refuses
//!   zones in datetime literals. The session's `time_zone` is UTC, so a
//!   `TIMESTAMP` column stores that instant. Text without a zone is left to
//!   the server.
//!
//! Binary columns get the event's text as it is (not base64-decoded).
//!
//! # Not done
//!
//! - This site's rows are not locked before local writes are looked up,
//!   and [`Session::CHECKS_OWN_ROWS`] is false (nothing like PostgreSQL's
//!   `xmin` tells who wrote a row last): a local write racing the sink on
//!   the same row is not repaired when it comes back, as with SQL Server.

use super::conn::{self, Account, Fault, literal, quote, quote_table};
use super::settings::Settings;
use crate::checks::Check;
use crate::config::{ConnectorConfig, Operation, Route, SinkConfig, redact_url};
use crate::error::{Cause, TargetError};
use crate::event::{Event, parse_timestamp};
use crate::sink::batch::{
    self, Dialect, Failed, GapMark, Local, OpenGap, Origins, Progress, Session, Start, Stored,
    Write, route_missing_columns, route_ready, route_without_unique_key,
};
use crate::sink::batch::{ReceiptRow, Traced};
use crate::sink::control::Receipt;
use crate::sink::mapping::{self, Entity};
use crate::sink::rules::{self, Conflict, GapRow, LateArrivals, Version};
use chrono::{DateTime, Utc};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool, Row, Value};
use serde_json::Value as Json;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use uuid::Uuid;

/// The sink's tables, in the connector's database.
pub const SINK_TABLES: [&str; 6] = [
    "sitesync_inbox",
    "sitesync_origins",
    "sitesync_gaps",
    "sitesync_versions",
    "sitesync_conflicts",
    "sitesync_receipts",
];

/// The sink's tables (idempotent), one statement each. InnoDB, utf8mb4;
/// origins compare byte-wise (`utf8mb4_bin`), as last-writer-wins orders
/// them; event ids are ASCII, compared byte-wise; entity keys are
/// `varbinary`, so that two keys differing only in case or trailing spaces
/// (which `_bin` collations pad) stay two entities, as at every other site.
/// The same statements on MySQL 8.0.
pub const SCHEMA: [&str; 6] = [
    "CREATE TABLE IF NOT EXISTS sitesync_inbox (
    event_id char(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    origin varchar(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    type varchar(200) NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    received_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    applied_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    outcome varchar(16) NOT NULL,
    KEY sitesync_inbox_origin (origin, epoch, seq)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
    "CREATE TABLE IF NOT EXISTS sitesync_origins (
    origin varchar(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    updated_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
    "CREATE TABLE IF NOT EXISTS sitesync_gaps (
    id bigint NOT NULL AUTO_INCREMENT PRIMARY KEY,
    origin varchar(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    epoch bigint NOT NULL,
    from_seq bigint NOT NULL,
    to_seq bigint NOT NULL,
    detected_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    requested_at timestamp(6) NULL,
    note varchar(400) NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
    "CREATE TABLE IF NOT EXISTS sitesync_versions (
    entity varchar(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    `key` varbinary(1200) NOT NULL,
    ts datetime(6) NOT NULL,
    origin varchar(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    event_id char(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    PRIMARY KEY (entity, `key`)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
    "CREATE TABLE IF NOT EXISTS sitesync_conflicts (
    id bigint NOT NULL AUTO_INCREMENT PRIMARY KEY,
    loser_event_id char(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL UNIQUE,
    entity varchar(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    `key` varbinary(1200) NOT NULL,
    loser_origin varchar(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    loser_ts datetime(6) NOT NULL,
    loser_payload longtext NULL CHECK (loser_payload IS NULL OR JSON_VALID(loser_payload)),
    winner_event_id char(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    winner_origin varchar(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    winner_ts datetime(6) NOT NULL,
    recorded_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
    "CREATE TABLE IF NOT EXISTS sitesync_receipts (
    event_id char(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    site varchar(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    outcome varchar(16) NOT NULL,
    reason text NULL,
    at datetime(6) NOT NULL,
    received_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (event_id, site),
    KEY sitesync_receipts_received (received_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
];

/// The outbox table of a site (`table`: `[db.]name`, unquoted), for the
/// binlog source's `init`:
///
/// - `ord`, `AUTO_INCREMENT` primary key: the rows of one transaction in
///   the order they were written (the binlog keeps that order too; `ord`
///   is what a person reads, and the clustered index);
/// - `id`, the event id, `UUID()` by default (MariaDB 10.2+, MySQL
///   8.0.13+ take an expression default in parentheses); ASCII, compared
///   byte-wise, like the inbox's `event_id` it is joined with;
/// - `created_at`, `TIMESTAMP(6)`: the statement's time, which stands in
///   for the commit time of a local write not yet round;
/// - `origin` defaults to the site; `type`; `entity_key` (the route's key
///   text, for the sink's lookups of local writes, indexed with `type`);
/// - `data`: `JSON` with a `JSON_VALID` check. On MariaDB `JSON` is
///   `LONGTEXT` and the check is what refuses bad JSON (error 4025); on
///   MySQL it is a native type that refuses bad JSON itself (3140), and the
///   check is redundant but accepted (8.0.16+).
pub fn outbox_ddl(table: &str, site: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
    ord bigint NOT NULL AUTO_INCREMENT PRIMARY KEY,
    id char(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL UNIQUE DEFAULT (UUID()),
    created_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    origin varchar(64) NOT NULL DEFAULT {},
    type varchar(200) NOT NULL,
    entity_key varchar(450) NULL,
    data json NOT NULL CHECK (JSON_VALID(data)),
    KEY sitesync_outbox_entity (type, entity_key)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
        quote_table(table),
        literal(site)
    )
}

/// The settings of every batch, sent with its `START TRANSACTION` in one
/// round trip (see the module doc).
///
/// Strict mode (`STRICT_ALL_TABLES`, added to the server's modes) makes a
/// value that does not fit its column an error of its message: without it
/// the server would store a truncated or zeroed value with a warning.
pub const BEGIN: &str = "SET @sitesync_applying = 1, time_zone = '+00:00', innodb_lock_wait_timeout = 1, \
     sql_mode = CONCAT_WS(',', NULLIF(@@sql_mode, ''), 'STRICT_ALL_TABLES'); \
     SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

/// The savepoint each message of an isolated batch runs under.
const SAVEPOINT: &str = "sitesync_item";

/// At most this many parameters per statement (the protocol's limit is
/// 65,535).
const MAX_PARAMS: usize = 60_000;

/// Pauses before looking again for outbox rows of events that came back
/// but that this transaction cannot see yet (63 ms in all): the binlog is
/// written, and can be sent, before InnoDB's commit is visible.
const OWN_ROW_WAITS_MS: [u64; 6] = [1, 2, 4, 8, 16, 32];

/// The MariaDB/MySQL side of the sink: connections, `init` and `check`.
pub struct MariaDbTarget {
    site: String,
    url: String,
    pool: Pool,
    account: Account,
    sink: Arc<SinkConfig>,
    /// `` `db`.`outbox` `` or `` `outbox` ``.
    outbox: String,
}

impl std::fmt::Debug for MariaDbTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MariaDbTarget({})", redact_url(&self.url))
    }
}

impl MariaDbTarget {
    pub fn new(cfg: &ConnectorConfig, db: &Settings) -> Result<MariaDbTarget, TargetError> {
        MariaDbTarget::with(&cfg.site, db, &cfg.sink)
    }

    /// A target for `site`'s database with these sink settings.
    pub fn with(
        site: &str,
        db: &Settings,
        sink: &SinkConfig,
    ) -> Result<MariaDbTarget, TargetError> {
        let opts = conn::opts(db)?;
        Ok(MariaDbTarget {
            site: site.to_string(),
            url: db.url.clone(),
            account: Account::of(&opts),
            pool: Pool::new(opts),
            sink: Arc::new(sink.clone()),
            outbox: quote_table(&db.outbox_table),
        })
    }

    async fn open(&self) -> Result<Conn, TargetError> {
        self.pool.get_conn().await.map_err(|e| {
            conn::classify(
                &format!("connecting to {}", redact_url(&self.url)),
                &self.account,
                &e,
            )
            .into()
        })
    }

    /// The sink's tables missing from the database.
    async fn missing_tables(&self, c: &mut Conn) -> Result<Vec<&'static str>, TargetError> {
        let found: Vec<String> = c
            .exec(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN (?, ?, ?, ?, ?, ?)",
                SINK_TABLES.to_vec(),
            )
            .await
            .map_err(|e| conn::classify("looking for the sink tables", &self.account, &e))?;
        Ok(SINK_TABLES
            .into_iter()
            .filter(|t| !found.iter().any(|f| f == t))
            .collect())
    }

    /// The columns of `sitesync_gaps` that a table made by an older
    /// sitesync lacks (`init` adds them).
    async fn missing_gap_columns(&self, c: &mut Conn) -> Result<Vec<&'static str>, TargetError> {
        let found: Vec<String> = c
            .exec(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
                 AND TABLE_NAME = 'sitesync_gaps' AND COLUMN_NAME IN ('requested_at', 'note')",
                (),
            )
            .await
            .map_err(|e| conn::classify("reading the columns of sitesync_gaps", &self.account, &e))?;
        Ok(GAP_COLUMNS
            .iter()
            .filter(|(name, _)| !found.iter().any(|f| f.eq_ignore_ascii_case(name)))
            .map(|(name, _)| *name)
            .collect())
    }
}

/// The columns later versions added to `sitesync_gaps`, with their type.
const GAP_COLUMNS: [(&str, &str); 2] = [
    ("requested_at", "timestamp(6) NULL"),
    ("note", "varchar(400) NULL"),
];

impl Dialect for MariaDbTarget {
    type Session = MariaDbSession;

    /// Each busy try waits up to `innodb_lock_wait_timeout` (1 s, its
    /// smallest value on MySQL): ten of them before the batch backs off.
    const BUSY_RETRIES: u32 = 10;

    /// A pooled connection; refuses a database `sitesync init` has not
    /// prepared.
    async fn connect(&self) -> Result<MariaDbSession, TargetError> {
        let mut c = self.open().await?;
        let missing = self.missing_tables(&mut c).await?;
        if !missing.is_empty() {
            return Err(TargetError::operator(
                Cause::NotInitialised,
                format!(
                    "the sink tables {} are missing in {}: run `sitesync init`",
                    missing.join(", "),
                    redact_url(&self.url)
                ),
            ));
        }
        let columns = self.missing_gap_columns(&mut c).await?;
        if !columns.is_empty() {
            return Err(TargetError::operator(
                Cause::NotInitialised,
                format!(
                    "sitesync_gaps in {} lacks {} (made by an older sitesync): run `sitesync init`, which adds them",
                    redact_url(&self.url),
                    columns.join(", ")
                ),
            ));
        }
        Ok(MariaDbSession {
            conn: c,
            site: self.site.clone(),
            sink: self.sink.clone(),
            account: self.account.clone(),
            outbox: self.outbox.clone(),
            columns: HashMap::new(),
            broken: false,
            in_batch: false,
        })
    }

    /// Creates the sink's tables.
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let mut c = self.open().await?;
        for ddl in SCHEMA {
            c.query_drop(ddl)
                .await
                .map_err(|e| conn::classify("creating the sink tables", &self.account, &e))?;
        }
        // A table made by an older sitesync gets the new columns (MySQL
        // has no ADD COLUMN IF NOT EXISTS: the catalog says what is there).
        for name in self.missing_gap_columns(&mut c).await? {
            let (_, kind) = GAP_COLUMNS
                .iter()
                .find(|(n, _)| *n == name)
                .expect("listed");
            c.query_drop(format!(
                "ALTER TABLE sitesync_gaps ADD COLUMN {name} {kind}"
            ))
            .await
            .map_err(|e| conn::classify("adding columns to sitesync_gaps", &self.account, &e))?;
        }
        Ok(vec![format!(
            "sink tables {}: ready",
            SINK_TABLES.join(", ")
        )])
    }

    /// The sink's tables, the grants the sink needs, and every route's
    /// table (its key columns, and for an upsert a unique index on exactly
    /// them); each failure with the statement that fixes it.
    async fn preflight(&self) -> Vec<Check> {
        let mut c = match self.open().await {
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
        match self.missing_tables(&mut c).await {
            Ok(missing) if missing.is_empty() => {
                checks.push(match self.missing_gap_columns(&mut c).await {
                    Ok(columns) if columns.is_empty() => {
                        Check::pass("sink tables", SINK_TABLES.join(", "))
                    }
                    Ok(columns) => Check::fail(
                        "sink tables",
                        format!(
                            "sitesync_gaps lacks {} (made by an older sitesync)",
                            columns.join(", ")
                        ),
                        "run `sitesync init`: it adds them",
                    ),
                    Err(e) => {
                        Check::fail("sink tables", e.to_string(), "check the account's grants")
                    }
                })
            }
            Ok(missing) => checks.push(Check::fail(
                "sink tables",
                format!("missing: {}", missing.join(", ")),
                "run `sitesync init`",
            )),
            Err(e) => checks.push(Check::fail(
                "sink tables",
                e.to_string(),
                "check the account's grants",
            )),
        }
        checks.push(grants_check(&mut c, &self.sink, &self.outbox, &self.account).await);
        for route in &self.sink.routes {
            checks.push(route_check(&mut c, route).await);
        }
        checks
    }
}

/// What a column's values need on their way in (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Json,
    DateTime,
    Other,
}

/// What the session knows of a route's table.
#[derive(Debug, Default)]
struct Columns {
    /// The columns (lowercase names: MariaDB's are case-insensitive) that
    /// need more than the plain conversion.
    kinds: HashMap<String, Kind>,
    /// Its unique indexes, each as its sorted lowercase column names
    /// joined with `,`.
    unique: Vec<String>,
}

impl Columns {
    fn kind(&self, column: &str) -> Kind {
        self.kinds
            .get(&column.to_lowercase())
            .copied()
            .unwrap_or(Kind::Other)
    }

    /// Whether a unique index other than `key` exists, which `ON DUPLICATE
    /// KEY UPDATE` would act on too.
    fn other_unique(&self, key: &[String]) -> bool {
        let mut key: Vec<String> = key.iter().map(|k| k.to_lowercase()).collect();
        key.sort();
        let key = key.join(",");
        self.unique.iter().any(|u| *u != key)
    }
}

/// Whether a statement writes the sink's own tables or a route's: a table
/// or column missing from the sink's tables needs `sitesync init`, one
/// missing from a route's table fails that route's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Sink,
    Route,
}

/// One pooled connection of the MariaDB/MySQL sink.
///
/// # When a message's error ends the transaction
///
/// InnoDB undoes the failing statement only, for every error of one
/// message's data, so the batch rolls back to the message's savepoint and
/// goes on. A deadlock (1213) rolls the whole transaction back, savepoints
/// included: it is [`Failed::Busy`], and the batch is redone from the
/// start. Should a savepoint be gone all the same (`ROLLBACK TO SAVEPOINT`
/// fails with 1305), the error that ended the transaction is taken as the
/// message's: [`Failed::Gone`], and the batch is redone without it.
pub struct MariaDbSession {
    conn: Conn,
    site: String,
    sink: Arc<SinkConfig>,
    account: Account,
    /// The outbox, quoted.
    outbox: String,
    /// Route tables' columns, read on the first write to each (forgotten
    /// after a failed batch: the table may have changed).
    columns: HashMap<String, Arc<Columns>>,
    /// The connection failed (not the server's refusal of a statement):
    /// the next batch opens another.
    broken: bool,
    /// A batch began and neither committed nor rolled back: when the sink
    /// finds a session so, the attempt was abandoned (its future dropped,
    /// maybe with a statement in flight, which leaves the protocol
    /// mid-answer), and the next batch opens another connection. Going on
    /// would be worse than slow: `START TRANSACTION` commits what an open
    /// transaction did.
    in_batch: bool,
}

impl MariaDbSession {
    /// What an error of a batch statement means for the batch.
    fn failed(&mut self, context: &str, scope: Scope, e: mysql_async::Error) -> Failed {
        if !matches!(e, mysql_async::Error::Server(_)) {
            self.broken = true;
        }
        match conn::fault(&e) {
            Fault::Busy => Failed::Busy,
            Fault::Data
                if scope == Scope::Sink && matches!(conn::code(&e), Some(1054) | Some(1146)) =>
            {
                Failed::Batch(TargetError::operator(
                    Cause::NotInitialised,
                    format!(
                        "{context}: {}: a table of the sink or the outbox is missing or not as `sitesync init` makes it: run `sitesync init`",
                        conn::describe(&e)
                    ),
                ))
            }
            Fault::Data => Failed::Data(format!("{context}: {}", conn::describe(&e))),
            Fault::Batch => Failed::Batch(conn::classify(context, &self.account, &e).into()),
        }
    }

    /// Runs a statement; returns the rows it changed.
    async fn exec(
        &mut self,
        sql: &str,
        params: Vec<Value>,
        context: &str,
        scope: Scope,
    ) -> Result<u64, Failed> {
        let done = if params.is_empty() {
            self.conn.query_drop(sql).await
        } else {
            self.conn.exec_drop(sql, params).await
        };
        match done {
            Ok(()) => Ok(self.conn.affected_rows()),
            Err(e) => Err(self.failed(context, scope, e)),
        }
    }

    /// Runs a query; returns its rows.
    async fn rows(
        &mut self,
        sql: &str,
        params: Vec<Value>,
        context: &str,
    ) -> Result<Vec<Row>, Failed> {
        let done = if params.is_empty() {
            self.conn.query(sql).await
        } else {
            self.conn.exec(sql, params).await
        };
        done.map_err(|e| self.failed(context, Scope::Sink, e))
    }

    /// The columns of a route's table that need converting.
    async fn columns(&mut self, table: &str) -> Result<Arc<Columns>, Failed> {
        if let Some(c) = self.columns.get(table) {
            return Ok(c.clone());
        }
        let (schema, name) = match table.split_once('.') {
            Some((s, t)) => (Value::from(s), Value::from(t)),
            None => (Value::NULL, Value::from(table)),
        };
        let mut out = Columns::default();
        let rows = self
            .rows(
                "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
                vec![schema.clone(), name.clone()],
                &format!("reading the columns of {table}"),
            )
            .await?;
        for r in rows {
            let (Some(column), Some(kind)) = (text(r.as_ref(0)), text(r.as_ref(1))) else {
                continue;
            };
            let kind = match kind.to_ascii_lowercase().as_str() {
                "json" => Kind::Json,
                "datetime" | "timestamp" => Kind::DateTime,
                _ => continue,
            };
            out.kinds.insert(column.to_lowercase(), kind);
        }
        let unique = self
            .rows(
                "SELECT GROUP_CONCAT(LOWER(COLUMN_NAME) ORDER BY LOWER(COLUMN_NAME) SEPARATOR ',') FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? AND NON_UNIQUE = 0 GROUP BY INDEX_NAME",
                vec![schema.clone(), name.clone()],
                &format!("reading the unique indexes of {table}"),
            )
            .await?;
        out.unique = unique.iter().filter_map(|r| text(r.as_ref(0))).collect();
        // MariaDB: JSON is LONGTEXT with a JSON_VALID check. MySQL's
        // CHECK_CONSTRAINTS has no TABLE_NAME: the query fails there, and
        // MySQL's JSON columns say `json` above.
        let checks = self
            .conn
            .exec::<Row, _, _>(
                "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
                vec![schema, name],
            )
            .await
            .unwrap_or_default();
        for r in checks {
            let Some(clause) = text(r.as_ref(0)) else {
                continue;
            };
            let clause = clause.to_lowercase().replace(' ', "");
            if let Some(rest) = clause.strip_prefix("json_valid(`")
                && let Some(column) = rest.strip_suffix("`)")
            {
                out.kinds.insert(column.replace("``", "`"), Kind::Json);
            }
        }
        let out = Arc::new(out);
        self.columns.insert(table.to_string(), out.clone());
        Ok(out)
    }

    /// One wave of writes (each entity at most once): one statement per
    /// table, operation and column set.
    async fn write_wave(&mut self, wave: &[Write<'_>]) -> Result<(), Failed> {
        let groups = batch::statements(wave);
        for ((table, upsert, cols), (route, rows)) in groups {
            let columns = self.columns(table).await?;
            if upsert && columns.other_unique(&route.key) {
                self.upsert_by_key(route, &cols, &rows, &columns).await?;
                continue;
            }
            let kind = |c: &str| columns.kind(c);
            let per_row = cols.len().max(1);
            for chunk in rows.chunks((MAX_PARAMS / per_row).max(1)) {
                let mut params = Vec::with_capacity(chunk.len() * per_row);
                for r in chunk {
                    for c in &cols {
                        params.push(to_value(r.get(*c).unwrap_or(&Json::Null), kind(c)));
                    }
                }
                let sql = if upsert {
                    upsert_sql(route, &cols, chunk.len())
                } else {
                    delete_sql(route, chunk.len())
                };
                self.exec(&sql, params, &format!("writing {table}"), Scope::Route)
                    .await?;
            }
        }
        Ok(())
    }

    /// Upserts into a table with a unique index besides the route's key,
    /// where `ON DUPLICATE KEY UPDATE` would update another row whose
    /// values collide with an event's on that index: the rows the keys
    /// find are locked and updated one by one, the others inserted plainly,
    /// so that such a collision fails its message (1062) as it does on
    /// PostgreSQL. A key whose text the server prints otherwise than the
    /// event (`1.50` for `1.5`) is taken as new: its insert fails on the
    /// key, never updates a wrong row.
    async fn upsert_by_key(
        &mut self,
        route: &Route,
        cols: &[&str],
        rows: &[&serde_json::Map<String, Json>],
        columns: &Columns,
    ) -> Result<(), Failed> {
        let context = format!("writing {}", route.table);
        let key_of = |r: &serde_json::Map<String, Json>| -> Vec<String> {
            route
                .key
                .iter()
                .map(|k| r.get(k).and_then(mapping::key_text).unwrap_or_default())
                .collect()
        };
        let mut existing: HashSet<Vec<String>> = HashSet::new();
        for chunk in rows.chunks((MAX_PARAMS / route.key.len().max(1)).max(1)) {
            let sql = format!(
                "SELECT {} FROM {} WHERE {} FOR UPDATE",
                route
                    .key
                    .iter()
                    .map(|k| quote(k))
                    .collect::<Vec<_>>()
                    .join(", "),
                quote_table(&route.table),
                delete_sql(route, chunk.len())
                    .split_once(" WHERE ")
                    .map(|(_, w)| w.to_string())
                    .unwrap_or_default()
            );
            let params: Vec<Value> = chunk
                .iter()
                .flat_map(|r| {
                    route
                        .key
                        .iter()
                        .map(|k| to_value(r.get(k).unwrap_or(&Json::Null), columns.kind(k)))
                })
                .collect();
            let found = match self.conn.exec::<Row, _, _>(sql, params).await {
                Ok(f) => f,
                Err(e) => return Err(self.failed(&context, Scope::Route, e)),
            };
            for r in found {
                existing.insert(
                    (0..route.key.len())
                        .map(|i| text(r.as_ref(i)).unwrap_or_default())
                        .collect(),
                );
            }
        }
        let updates: Vec<&str> = cols
            .iter()
            .filter(|c| !route.key.iter().any(|k| k == *c))
            .copied()
            .collect();
        let mut new: Vec<&serde_json::Map<String, Json>> = Vec::new();
        for r in rows {
            if !existing.contains(&key_of(r)) {
                new.push(r);
                continue;
            }
            if updates.is_empty() {
                continue;
            }
            let sql = format!(
                "UPDATE {} SET {} WHERE {}",
                quote_table(&route.table),
                updates
                    .iter()
                    .map(|c| format!("{} = ?", quote(c)))
                    .collect::<Vec<_>>()
                    .join(", "),
                route
                    .key
                    .iter()
                    .map(|k| format!("{} = ?", quote(k)))
                    .collect::<Vec<_>>()
                    .join(" AND ")
            );
            let params = updates
                .iter()
                .map(|c| to_value(r.get(*c).unwrap_or(&Json::Null), columns.kind(c)))
                .chain(
                    route
                        .key
                        .iter()
                        .map(|k| to_value(r.get(k).unwrap_or(&Json::Null), columns.kind(k))),
                )
                .collect();
            self.exec(&sql, params, &context, Scope::Route).await?;
        }
        for chunk in new.chunks((MAX_PARAMS / cols.len().max(1)).max(1)) {
            let sql = format!(
                "INSERT INTO {} ({}) VALUES {}",
                quote_table(&route.table),
                cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", "),
                tuples(cols.len(), chunk.len())
            );
            let params = chunk
                .iter()
                .flat_map(|r| {
                    cols.iter()
                        .map(|c| to_value(r.get(*c).unwrap_or(&Json::Null), columns.kind(c)))
                })
                .collect();
            self.exec(&sql, params, &context, Scope::Route).await?;
        }
        Ok(())
    }

    /// This site's writes still in the outbox, for the batch's entities,
    /// versioned by their `created_at`.
    async fn read_local_writes(&mut self, entities: &[&Entity]) -> Result<Local, Failed> {
        let mut out = Local::new();
        let tables: HashSet<&str> = entities.iter().map(|e| e.table.as_str()).collect();
        let mut types: Vec<String> = self
            .sink
            .routes
            .iter()
            .filter(|r| tables.contains(r.entity_table().as_str()))
            .map(|r| r.kind.clone())
            .collect();
        types.sort_unstable();
        types.dedup();
        if types.is_empty() || entities.is_empty() {
            return Ok(out);
        }
        let mut keys: Vec<&str> = entities.iter().map(|e| e.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let sql = format!(
            "SELECT id, type, data, UNIX_TIMESTAMP(created_at) FROM {} WHERE type IN ({}) AND (entity_key IS NULL OR entity_key IN ({}))",
            self.outbox,
            marks(types.len()),
            marks(keys.len())
        );
        let params: Vec<Value> = types
            .iter()
            .map(|t| Value::from(t.as_str()))
            .chain(keys.iter().map(|k| Value::from(*k)))
            .collect();
        let rows = self
            .rows(&sql, params, "looking for local writes not yet propagated")
            .await?;
        let wanted: HashSet<&Entity> = entities.iter().copied().collect();
        for r in rows {
            let (Some(id), Some(kind), Some(data), Some(ts)) = (
                text(r.as_ref(0)),
                text(r.as_ref(1)),
                text(r.as_ref(2)),
                text(r.as_ref(3)).as_deref().and_then(unix_time),
            ) else {
                continue;
            };
            if let Some((entity, write)) =
                batch::local_write(&self.sink, &self.site, &wanted, (&id, &kind, &data, ts))
            {
                out.entry(entity).or_default().push(write);
            }
        }
        Ok(out)
    }

    /// Each origin's progress, read and locked for the batch.
    async fn read_origins(&mut self, origins: &[&str]) -> Result<Origins, Failed> {
        if origins.is_empty() {
            return Ok(Origins::new());
        }
        let sql = format!(
            "SELECT origin, epoch, seq FROM sitesync_origins WHERE origin IN ({}) FOR UPDATE",
            marks(origins.len())
        );
        let rows = self
            .rows(
                &sql,
                origins.iter().map(|o| Value::from(*o)).collect(),
                "reading origin progress",
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some((
                    text(r.as_ref(0))?,
                    (number(r.as_ref(1))?, number(r.as_ref(2))?),
                ))
            })
            .collect())
    }

    /// The origins' new progress and the gaps found.
    async fn write_progress(&mut self, moved: &Progress) -> Result<(), Failed> {
        if !moved.changed.is_empty() {
            let sql = format!(
                "INSERT INTO sitesync_origins (origin, epoch, seq) VALUES {} \
                 ON DUPLICATE KEY UPDATE epoch = VALUES(epoch), seq = VALUES(seq), updated_at = CURRENT_TIMESTAMP(6)",
                tuples(3, moved.changed.len())
            );
            let params = moved
                .changed
                .iter()
                .flat_map(|(o, e, s)| [Value::from(o.as_str()), Value::from(*e), Value::from(*s)])
                .collect();
            self.exec(&sql, params, "writing origin progress", Scope::Sink)
                .await?;
        }
        if !moved.gaps.is_empty() {
            let sql = format!(
                "INSERT INTO sitesync_gaps (origin, epoch, from_seq, to_seq) VALUES {}",
                tuples(4, moved.gaps.len())
            );
            let params = moved
                .gaps
                .iter()
                .flat_map(|g| {
                    [
                        Value::from(g.origin.as_str()),
                        Value::from(g.epoch),
                        Value::from(g.from),
                        Value::from(g.to),
                    ]
                })
                .collect();
            self.exec(&sql, params, "recording gaps", Scope::Sink)
                .await?;
        }
        Ok(())
    }

    /// Takes late arrivals out of the gaps recorded before
    /// ([`rules::shrink`]): the rows they touch are read under lock, then
    /// shrunk, split or deleted.
    async fn shrink_gaps(&mut self, late: &[LateArrivals]) -> Result<(), Failed> {
        for l in late {
            let rows = self
                .rows(
                    "SELECT id, from_seq, to_seq FROM sitesync_gaps \
                     WHERE origin = ? AND epoch = ? AND from_seq <= ? AND to_seq >= ? ORDER BY id FOR UPDATE",
                    vec![
                        Value::from(l.origin.as_str()),
                        Value::from(l.epoch),
                        Value::from(l.high),
                        Value::from(l.low),
                    ],
                    "reading the gaps late events fall in",
                )
                .await?;
            let rows: Vec<GapRow> = rows
                .iter()
                .filter_map(|r| {
                    Some((
                        number(r.as_ref(0))? as i64,
                        number(r.as_ref(1))?,
                        number(r.as_ref(2))?,
                    ))
                })
                .collect();
            for (id, pieces) in rules::shrink(&rows, &l.seqs) {
                let Some(((from, to), rest)) = pieces.split_first() else {
                    self.exec(
                        "DELETE FROM sitesync_gaps WHERE id = ?",
                        vec![Value::from(id)],
                        "closing a gap",
                        Scope::Sink,
                    )
                    .await?;
                    continue;
                };
                self.exec(
                    "UPDATE sitesync_gaps SET from_seq = ?, to_seq = ? WHERE id = ?",
                    vec![Value::from(*from), Value::from(*to), Value::from(id)],
                    "shrinking a gap",
                    Scope::Sink,
                )
                .await?;
                for (from, to) in rest {
                    self.exec(
                        "INSERT INTO sitesync_gaps (origin, epoch, from_seq, to_seq, detected_at, requested_at, note) \
                         SELECT origin, epoch, ?, ?, detected_at, requested_at, note FROM sitesync_gaps WHERE id = ?",
                        vec![Value::from(*from), Value::from(*to), Value::from(id)],
                        "splitting a gap",
                        Scope::Sink,
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Runs `sql` with `… IN (?, …)` filled with `ids`, in chunks.
    async fn by_ids(
        &mut self,
        sql: impl Fn(&str) -> String,
        ids: &[Uuid],
        context: &str,
    ) -> Result<u64, Failed> {
        let mut changed = 0;
        for chunk in ids.chunks(MAX_PARAMS) {
            let params = chunk.iter().map(|id| Value::from(id.to_string())).collect();
            changed += self
                .exec(&sql(&marks(chunk.len())), params, context, Scope::Sink)
                .await?;
        }
        Ok(changed)
    }
}

impl Session for MariaDbSession {
    fn closed(&self) -> bool {
        self.broken || self.in_batch
    }

    async fn begin(&mut self, start: Start<'_>) -> Result<(), Failed> {
        self.in_batch = true;
        self.exec(BEGIN, Vec::new(), "starting the batch", Scope::Sink)
            .await?;
        let mut state = self.read_origins(start.origins).await?;
        let moved = batch::advance(&mut state, start.seen);
        self.write_progress(&moved).await?;
        self.shrink_gaps(&moved.late).await
    }

    /// Plainly, the rows go in with one `INSERT` that a redelivered event
    /// fails (1062 on the primary key: [`Failed::Seen`]). Carefully, the
    /// events the inbox holds are read (and locked) first: those not there
    /// and those dead-lettered are the new ones, inserted or taken over
    /// with `ON DUPLICATE KEY UPDATE`.
    async fn insert_inbox(
        &mut self,
        events: &[(&Event, &'static str)],
        careful: bool,
    ) -> Result<HashSet<Uuid>, Failed> {
        if events.is_empty() {
            return Ok(HashSet::new());
        }
        let mut fresh: Vec<&(&Event, &'static str)> = events.iter().collect();
        if careful {
            let ids: Vec<Uuid> = events.iter().map(|(e, _)| e.id).collect();
            let mut held: HashMap<Uuid, String> = HashMap::new();
            for chunk in ids.chunks(MAX_PARAMS) {
                let sql = format!(
                    "SELECT event_id, outcome FROM sitesync_inbox WHERE event_id IN ({}) FOR UPDATE",
                    marks(chunk.len())
                );
                let params = chunk.iter().map(|id| Value::from(id.to_string())).collect();
                for r in self.rows(&sql, params, "reading the inbox").await? {
                    if let (Some(Ok(id)), Some(outcome)) = (
                        text(r.as_ref(0)).map(|t| Uuid::parse_str(&t)),
                        text(r.as_ref(1)),
                    ) {
                        held.insert(id, outcome);
                    }
                }
            }
            fresh.retain(|(e, _)| held.get(&e.id).is_none_or(|o| o == "dead_letter"));
            if fresh.is_empty() {
                return Ok(HashSet::new());
            }
        }
        for chunk in fresh.chunks(MAX_PARAMS / 6) {
            let mut sql = format!(
                "INSERT INTO sitesync_inbox (event_id, origin, type, epoch, seq, outcome) VALUES {}",
                tuples(6, chunk.len())
            );
            if careful {
                sql.push_str(
                    " ON DUPLICATE KEY UPDATE outcome = VALUES(outcome), received_at = CURRENT_TIMESTAMP(6), applied_at = CURRENT_TIMESTAMP(6)",
                );
            }
            let params: Vec<Value> = chunk
                .iter()
                .flat_map(|(e, outcome)| {
                    [
                        Value::from(e.id.to_string()),
                        Value::from(e.origin.as_str()),
                        Value::from(e.kind.as_str()),
                        Value::from(e.epoch),
                        Value::from(e.seq),
                        Value::from(*outcome),
                    ]
                })
                .collect();
            if let Err(e) = self.conn.exec_drop(sql, params).await {
                // The primary key is the inbox's only unique index.
                if !careful && conn::code(&e) == Some(1062) {
                    return Err(Failed::Seen);
                }
                return Err(self.failed("writing the inbox", Scope::Sink, e));
            }
        }
        Ok(fresh.iter().map(|(e, _)| e.id).collect())
    }

    /// Deletes the rows; a row not found is looked for again a few times
    /// ([`OWN_ROW_WAITS_MS`]) before it counts as gone already.
    async fn delete_own(&mut self, ids: &[Uuid]) -> Result<(), Failed> {
        let outbox = self.outbox.clone();
        let mut deleted = 0u64;
        for wait in std::iter::once(0).chain(OWN_ROW_WAITS_MS) {
            if wait > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            }
            deleted += self
                .by_ids(
                    |m| format!("DELETE FROM {outbox} WHERE id IN ({m})"),
                    ids,
                    "deleting outbox rows that came back",
                )
                .await?;
            if deleted >= ids.len() as u64 {
                return Ok(());
            }
        }
        // Deleted by hand, or still not visible: the idle sweep deletes
        // the latter once they are.
        tracing::info!(
            missing = ids.len() as u64 - deleted,
            "outbox rows of events that came back were not found"
        );
        Ok(())
    }

    async fn load_versions(&mut self, entities: &[&Entity]) -> Result<Stored, Failed> {
        let mut out = Stored::new();
        for chunk in entities.chunks(MAX_PARAMS / 2) {
            let sql = format!(
                "SELECT entity, `key`, ts, origin, event_id FROM sitesync_versions WHERE {}",
                vec!["(entity = ? AND `key` = ?)"; chunk.len()].join(" OR ")
            );
            let params = chunk
                .iter()
                .flat_map(|e| [Value::from(e.table.as_str()), Value::from(e.key.as_bytes())])
                .collect();
            for r in self.rows(&sql, params, "reading entity versions").await? {
                let (Some(table), Some(key), Some(ts), Some(origin), Some(Ok(id))) = (
                    text(r.as_ref(0)),
                    text(r.as_ref(1)),
                    text(r.as_ref(2)).as_deref().and_then(parse_timestamp),
                    text(r.as_ref(3)),
                    text(r.as_ref(4)).map(|t| Uuid::parse_str(&t)),
                ) else {
                    continue;
                };
                out.insert(Entity { table, key }, (Version { ts, origin }, id));
            }
        }
        Ok(out)
    }

    async fn local_writes(&mut self, entities: &[&Entity]) -> Result<Local, Failed> {
        self.read_local_writes(entities).await
    }

    async fn write(&mut self, wave: &[Write<'_>]) -> Result<(), Failed> {
        self.write_wave(wave).await
    }

    /// Entities without a version get a plain `INSERT` (the sink is the
    /// table's only writer); the others one `UPDATE` joined with the new
    /// versions, forward only.
    async fn upsert_versions(
        &mut self,
        versions: &[(Entity, Version, Uuid)],
        stored: &Stored,
    ) -> Result<(), Failed> {
        let (known, new): (Vec<_>, Vec<_>) = versions
            .iter()
            .partition(|(entity, ..)| stored.contains_key(entity));
        let row = |(e, v, id): &&(Entity, Version, Uuid)| {
            [
                Value::from(e.table.as_str()),
                Value::from(e.key.as_bytes()),
                Value::from(ts_text(v.ts)),
                Value::from(v.origin.as_str()),
                Value::from(id.to_string()),
            ]
        };
        for chunk in new.chunks(MAX_PARAMS / 5) {
            let sql = format!(
                "INSERT INTO sitesync_versions (entity, `key`, ts, origin, event_id) VALUES {}",
                tuples(5, chunk.len())
            );
            let params = chunk.iter().flat_map(row).collect();
            self.exec(&sql, params, "writing entity versions", Scope::Sink)
                .await?;
        }
        for chunk in known.chunks(MAX_PARAMS / 5) {
            let first = "SELECT ? AS entity, ? AS k, CAST(? AS DATETIME(6)) AS ts, \
                 CAST(? AS CHAR CHARACTER SET utf8mb4) COLLATE utf8mb4_bin AS origin, ? AS event_id";
            let rest = " UNION ALL SELECT ?, ?, CAST(? AS DATETIME(6)), CAST(? AS CHAR CHARACTER SET utf8mb4) COLLATE utf8mb4_bin, ?";
            let sql = format!(
                "UPDATE sitesync_versions v JOIN ({first}{}) w ON v.entity = w.entity AND v.`key` = w.k \
                 SET v.ts = w.ts, v.origin = w.origin, v.event_id = w.event_id \
                 WHERE w.ts > v.ts OR (w.ts = v.ts AND w.origin > v.origin)",
                rest.repeat(chunk.len() - 1)
            );
            let params = chunk.iter().flat_map(row).collect();
            self.exec(&sql, params, "writing entity versions", Scope::Sink)
                .await?;
        }
        Ok(())
    }

    async fn insert_conflicts(&mut self, conflicts: &[Conflict]) -> Result<(), Failed> {
        for chunk in conflicts.chunks(MAX_PARAMS / 9) {
            let sql = format!(
                "INSERT INTO sitesync_conflicts (loser_event_id, entity, `key`, loser_origin, loser_ts, loser_payload, winner_event_id, winner_origin, winner_ts) \
                 VALUES {} ON DUPLICATE KEY UPDATE loser_event_id = loser_event_id",
                tuples(9, chunk.len())
            );
            let params = chunk
                .iter()
                .flat_map(|c| {
                    [
                        Value::from(c.loser.to_string()),
                        Value::from(c.entity.table.as_str()),
                        Value::from(c.entity.key.as_bytes()),
                        Value::from(c.loser_version.origin.as_str()),
                        Value::from(ts_text(c.loser_version.ts)),
                        Value::from(c.loser_payload.to_string()),
                        Value::from(c.winner.to_string()),
                        Value::from(c.winner_version.origin.as_str()),
                        Value::from(ts_text(c.winner_version.ts)),
                    ]
                })
                .collect();
            self.exec(&sql, params, "recording conflicts", Scope::Sink)
                .await?;
        }
        Ok(())
    }

    async fn mark_lost(&mut self, ids: &[Uuid]) -> Result<(), Failed> {
        self.by_ids(
            |m| format!("UPDATE sitesync_inbox SET outcome = 'lost' WHERE event_id IN ({m})"),
            ids,
            "recording lost events",
        )
        .await
        .map(drop)
    }

    async fn recorded_losers(&mut self, ids: &[Uuid]) -> Result<HashSet<Uuid>, Failed> {
        let mut out = HashSet::new();
        for chunk in ids.chunks(MAX_PARAMS) {
            let sql = format!(
                "SELECT loser_event_id FROM sitesync_conflicts WHERE loser_event_id IN ({})",
                marks(chunk.len())
            );
            let params = chunk.iter().map(|id| Value::from(id.to_string())).collect();
            for r in self
                .rows(
                    &sql,
                    params,
                    "looking for this site's writes that lost here",
                )
                .await?
            {
                if let Some(Ok(id)) = text(r.as_ref(0)).map(|t| Uuid::parse_str(&t)) {
                    out.insert(id);
                }
            }
        }
        Ok(out)
    }

    async fn withdraw_conflicts(&mut self, losers: &[Uuid]) -> Result<(), Failed> {
        self.by_ids(
            |m| format!("DELETE FROM sitesync_conflicts WHERE loser_event_id IN ({m})"),
            losers,
            "withdrawing conflict records",
        )
        .await
        .map(drop)
    }

    async fn savepoint(&mut self) -> Result<(), Failed> {
        self.exec(
            &format!("SAVEPOINT {SAVEPOINT}"),
            Vec::new(),
            "savepoint",
            Scope::Sink,
        )
        .await
        .map(drop)
    }

    async fn release_savepoint(&mut self) -> Result<(), Failed> {
        self.exec(
            &format!("RELEASE SAVEPOINT {SAVEPOINT}"),
            Vec::new(),
            "releasing a savepoint",
            Scope::Sink,
        )
        .await
        .map(drop)
    }

    /// Fails with [`Failed::Gone`] when the savepoint is gone (1305): the
    /// error before it ended the transaction.
    async fn rollback_to_savepoint(&mut self) -> Result<(), Failed> {
        match self
            .conn
            .query_drop(format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}"))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if conn::code(&e) == Some(1305) => Err(Failed::Gone(conn::describe(&e))),
            Err(e) => Err(self.failed("rolling back to a savepoint", Scope::Sink, e)),
        }
    }

    async fn commit(&mut self) -> Result<(), Failed> {
        self.exec("COMMIT", Vec::new(), "committing the batch", Scope::Sink)
            .await?;
        self.in_batch = false;
        Ok(())
    }

    async fn rollback(&mut self) {
        match self.conn.query_drop("ROLLBACK").await {
            Ok(()) => self.in_batch = false,
            Err(_) => self.broken = true,
        }
    }

    /// Whether the connection still answers (a server error leaves it
    /// fine); the columns are read again on the next batch.
    async fn usable(&mut self) -> bool {
        self.columns.clear();
        !self.closed()
    }

    async fn sweep_own(&mut self) -> Result<u64, TargetError> {
        let sql = format!(
            "DELETE o FROM {} o JOIN sitesync_inbox i ON i.event_id = o.id WHERE i.outcome = 'own'",
            self.outbox
        );
        match self
            .exec(
                &sql,
                Vec::new(),
                "sweeping outbox rows back round",
                Scope::Sink,
            )
            .await
        {
            Ok(n) => Ok(n),
            Err(Failed::Batch(e)) => Err(e),
            Err(Failed::Data(m) | Failed::Gone(m)) => Err(TargetError::transient(Cause::Query, m)),
            Err(Failed::Busy | Failed::Seen) => Err(TargetError::transient(
                Cause::Busy,
                "sweeping outbox rows back round: locked",
            )),
        }
    }

    async fn open_gaps(&mut self) -> Result<Vec<OpenGap>, TargetError> {
        let rows = self
            .rows(
                "SELECT id, origin, epoch, from_seq, to_seq, TIMESTAMPDIFF(MICROSECOND, detected_at, CURRENT_TIMESTAMP(6)), \
                 TIMESTAMPDIFF(MICROSECOND, requested_at, CURRENT_TIMESTAMP(6)), note FROM sitesync_gaps ORDER BY id",
                Vec::new(),
                "reading sitesync_gaps",
            )
            .await
            .map_err(outside_batch)?;
        let micros = |v: Option<&Value>| {
            text(v)
                .and_then(|t| t.parse::<f64>().ok())
                .map(|us| us / 1e6)
        };
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(OpenGap {
                    id: number(r.as_ref(0))? as i64,
                    origin: text(r.as_ref(1))?,
                    epoch: number(r.as_ref(2))?,
                    from: number(r.as_ref(3))?,
                    to: number(r.as_ref(4))?,
                    age_s: micros(r.as_ref(5)).unwrap_or(0.0),
                    requested_s: micros(r.as_ref(6)),
                    note: text(r.as_ref(7)),
                })
            })
            .collect())
    }

    async fn record_receipt(&mut self, r: &Receipt) -> Result<(), TargetError> {
        let at = r.at.naive_utc().format("%Y-%m-%d %H:%M:%S%.6f").to_string();
        for chunk in r.events.chunks(MAX_PARAMS / 7) {
            let sql = format!(
                "INSERT INTO sitesync_receipts (event_id, site, epoch, seq, outcome, reason, at) VALUES {} \
                 ON DUPLICATE KEY UPDATE reason = IF(VALUES(outcome) = 'duplicate', reason, VALUES(reason)), \
                 at = IF(VALUES(outcome) = 'duplicate', at, VALUES(at)), \
                 outcome = IF(VALUES(outcome) = 'duplicate', outcome, VALUES(outcome))",
                tuples(7, chunk.len())
            );
            let params = chunk
                .iter()
                .flat_map(|e| {
                    [
                        Value::from(e.id.to_string()),
                        Value::from(r.site.as_str()),
                        Value::from(e.epoch),
                        Value::from(e.seq),
                        Value::from(e.outcome.as_str()),
                        e.reason.as_deref().map(Value::from).unwrap_or(Value::NULL),
                        Value::from(at.as_str()),
                    ]
                })
                .collect();
            self.exec(&sql, params, "recording a receipt", Scope::Sink)
                .await
                .map_err(outside_batch)?;
        }
        Ok(())
    }

    async fn trace(&mut self, id: Uuid) -> Result<Traced, TargetError> {
        let id = Value::from(id.to_string());
        let time = "DATE_FORMAT({}, '%Y-%m-%dT%H:%i:%s.%fZ')";
        let receipts = self
            .rows(
                &format!(
                    "SELECT site, epoch, seq, outcome, reason, {}, {} FROM sitesync_receipts WHERE event_id = ? ORDER BY at, site",
                    time.replace("{}", "at"),
                    time.replace("{}", "CONVERT_TZ(received_at, @@session.time_zone, '+00:00')")
                ),
                vec![id.clone()],
                "reading sitesync_receipts",
            )
            .await
            .map_err(outside_batch)?
            .iter()
            .filter_map(|r| {
                Some(ReceiptRow {
                    site: text(r.as_ref(0))?,
                    epoch: number(r.as_ref(1))?,
                    seq: number(r.as_ref(2))?,
                    outcome: text(r.as_ref(3))?,
                    reason: text(r.as_ref(4)),
                    at: text(r.as_ref(5))?,
                    received_at: text(r.as_ref(6)).unwrap_or_default(),
                })
            })
            .collect();
        let inbox = self
            .rows(
                &format!(
                    "SELECT origin, type, epoch, seq, outcome, {} FROM sitesync_inbox WHERE event_id = ?",
                    time.replace("{}", "CONVERT_TZ(applied_at, @@session.time_zone, '+00:00')")
                ),
                vec![id],
                "reading sitesync_inbox",
            )
            .await
            .map_err(outside_batch)?
            .first()
            .and_then(|r| {
                Some((
                    text(r.as_ref(0))?,
                    text(r.as_ref(1))?,
                    number(r.as_ref(2))?,
                    number(r.as_ref(3))?,
                    text(r.as_ref(4))?,
                    text(r.as_ref(5)).unwrap_or_default(),
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
            let rows = self
                .rows(
                    "SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(f.t), CURRENT_TIMESTAMP(6)) FROM \
                     (SELECT event_id, MIN(received_at) AS t FROM sitesync_receipts GROUP BY event_id \
                      HAVING MIN(received_at) < CURRENT_TIMESTAMP(6) - INTERVAL ? SECOND) f \
                     WHERE NOT EXISTS (SELECT 1 FROM sitesync_receipts r WHERE r.event_id = f.event_id AND r.site = ?) \
                     AND EXISTS (SELECT 1 FROM sitesync_receipts x WHERE x.site = ?)",
                    vec![Value::from(older_than_s), Value::from(site.as_str()), Value::from(site.as_str())],
                    "reading sitesync_receipts",
                )
                .await
                .map_err(outside_batch)?;
            let Some(r) = rows.first() else { continue };
            let n = number(r.as_ref(0)).unwrap_or(0);
            if n > 0 {
                let age = text(r.as_ref(1))
                    .and_then(|t| t.parse::<f64>().ok())
                    .unwrap_or(0.0)
                    / 1e6;
                out.push((site.clone(), n, age));
            }
        }
        Ok(out)
    }

    async fn mark_gaps(&mut self, ids: &[i64], mark: GapMark<'_>) -> Result<(), TargetError> {
        for chunk in ids.chunks(MAX_PARAMS - 1) {
            let mut params: Vec<Value> = Vec::new();
            let set = match mark {
                GapMark::Requested => "requested_at = CURRENT_TIMESTAMP(6)",
                GapMark::RequestedAnew => "requested_at = CURRENT_TIMESTAMP(6), note = NULL",
                GapMark::Note(note) => {
                    params.push(Value::from(note));
                    "note = ?"
                }
            };
            params.extend(chunk.iter().map(|id| Value::from(*id)));
            let sql = format!(
                "UPDATE sitesync_gaps SET {set} WHERE id IN ({})",
                marks(chunk.len())
            );
            self.exec(&sql, params, "marking gaps", Scope::Sink)
                .await
                .map_err(outside_batch)?;
        }
        Ok(())
    }
}

/// A failure of a statement run between batches, as the sink reports it.
fn outside_batch(f: Failed) -> TargetError {
    match f {
        Failed::Batch(e) => e,
        Failed::Data(m) | Failed::Gone(m) => TargetError::transient(Cause::Query, m),
        Failed::Busy | Failed::Seen => TargetError::transient(Cause::Busy, "locked"),
    }
}

/// `?, ?, …` (`n` of them).
fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `(?, ?), (?, ?), …`: `rows` tuples of `width`.
fn tuples(width: usize, rows: usize) -> String {
    let one = format!("({})", marks(width));
    vec![one; rows].join(", ")
}

/// The upsert of `rows` rows of columns `cols` into the route's table.
pub fn upsert_sql(route: &Route, cols: &[&str], rows: usize) -> String {
    let col_list = cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let updates: Vec<String> = cols
        .iter()
        .filter(|c| !route.key.iter().any(|k| k == *c))
        .map(|c| format!("{q} = VALUES({q})", q = quote(c)))
        .collect();
    // A key-only row: nothing to update, and no error on a row that is there.
    let updates = if updates.is_empty() {
        route
            .key
            .iter()
            .take(1)
            .map(|k| format!("{q} = {q}", q = quote(k)))
            .collect()
    } else {
        updates
    };
    format!(
        "INSERT INTO {} ({col_list}) VALUES {} ON DUPLICATE KEY UPDATE {}",
        quote_table(&route.table),
        tuples(cols.len(), rows),
        updates.join(", ")
    )
}

/// The delete of `rows` rows by the route's key.
pub fn delete_sql(route: &Route, rows: usize) -> String {
    let one = route
        .key
        .iter()
        .map(|k| format!("{} = ?", quote(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let matches = if route.key.len() == 1 {
        format!("{} IN ({})", quote(&route.key[0]), marks(rows))
    } else {
        vec![format!("({one})"); rows].join(" OR ")
    };
    format!("DELETE FROM {} WHERE {matches}", quote_table(&route.table))
}

/// A JSON value as the parameter the server converts to a column of
/// `kind` (see the module doc).
pub fn to_value(v: &Json, kind: Kind) -> Value {
    match (v, kind) {
        (Json::Null, _) => Value::NULL,
        (v, Kind::Json) => Value::from(v.to_string()),
        (Json::Bool(b), _) => Value::Int(i64::from(*b)),
        (Json::Number(n), _) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::from(n.to_string()),
        },
        (Json::String(s), Kind::DateTime) => match zoned(s) {
            Some(t) => Value::from(ts_text(t)),
            None => Value::from(s.as_str()),
        },
        (Json::String(s), _) => Value::from(s.as_str()),
        (other, _) => Value::from(other.to_string()),
    }
}

/// A timestamp text that names its zone, as an instant.
fn zoned(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A UTC time as a `DATETIME(6)` literal.
fn ts_text(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// `UNIX_TIMESTAMP()`'s decimal text as a time.
fn unix_time(text: &str) -> Option<DateTime<Utc>> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let micros: u32 = format!("{frac:0<6}")[..6].parse().ok()?;
    DateTime::from_timestamp(secs.parse().ok()?, micros * 1_000)
}

/// A column's value as text (dates as `YYYY-MM-DD HH:MM:SS.ffffff`).
pub(super) fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::NULL => None,
        Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Int(i) => Some(i.to_string()),
        Value::UInt(u) => Some(u.to_string()),
        Value::Float(f) => Some(f.to_string()),
        Value::Double(f) => Some(f.to_string()),
        Value::Date(y, mo, d, h, mi, s, us) => Some(format!(
            "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}"
        )),
        Value::Time(..) => None,
    }
}

/// A column's value as a count.
fn number(v: Option<&Value>) -> Option<u64> {
    text(v)?.parse().ok()
}

/// Privileges the sink needs, per table.
fn needed(sink: &SinkConfig, outbox: &str) -> Vec<(String, Vec<&'static str>)> {
    let mut out: Vec<(String, Vec<&'static str>)> = SINK_TABLES
        .iter()
        .map(|t| (t.to_string(), vec!["SELECT", "INSERT", "UPDATE", "DELETE"]))
        .collect();
    out.push((outbox.replace('`', ""), vec!["SELECT", "DELETE"]));
    for r in &sink.routes {
        let privileges = match r.operation {
            Operation::Upsert => vec!["SELECT", "INSERT", "UPDATE"],
            Operation::Delete => vec!["SELECT", "DELETE"],
        };
        out.push((r.table.clone(), privileges));
    }
    out
}

/// Whether the account holds what the sink needs on each table, granted
/// globally, on the database or on the table (privileges that come through
/// a role are not visible there: then a warning, not a failure).
async fn grants_check(c: &mut Conn, sink: &SinkConfig, outbox: &str, account: &Account) -> Check {
    const HELD: &str = "SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = @sitesync_grantee \
         UNION SELECT PRIVILEGE_TYPE FROM information_schema.SCHEMA_PRIVILEGES WHERE GRANTEE = @sitesync_grantee AND TABLE_SCHEMA = COALESCE(?, DATABASE()) \
         UNION SELECT PRIVILEGE_TYPE FROM information_schema.TABLE_PRIVILEGES WHERE GRANTEE = @sitesync_grantee AND TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?";
    let setup = "SET @sitesync_grantee = CONCAT('''', SUBSTRING_INDEX(CURRENT_USER(), '@', 1), '''@''', SUBSTRING_INDEX(CURRENT_USER(), '@', -1), '''')";
    if let Err(e) = c.query_drop(setup).await {
        return Check::warn(
            "sink grants",
            conn::describe(&e),
            "check the grants by hand",
        );
    }
    let role: Option<String> = c
        .query_first("SELECT CURRENT_ROLE()")
        .await
        .ok()
        .flatten()
        .flatten();
    let mut missing: Vec<String> = Vec::new();
    for (table, privileges) in needed(sink, outbox) {
        let (schema, name) = match table.split_once('.') {
            Some((s, t)) => (Value::from(s), t.to_string()),
            None => (Value::NULL, table.clone()),
        };
        let held: Vec<String> = match c
            .exec(HELD, vec![schema.clone(), schema, Value::from(name)])
            .await
        {
            Ok(h) => h,
            Err(e) => {
                return Check::warn(
                    "sink grants",
                    conn::describe(&e),
                    "check the grants by hand",
                );
            }
        };
        let lacking: Vec<&str> = privileges
            .into_iter()
            .filter(|p| !held.iter().any(|h| h.eq_ignore_ascii_case(p)))
            .collect();
        if !lacking.is_empty() {
            missing.push(format!("{} on {table}", lacking.join(", ")));
        }
    }
    if missing.is_empty() {
        return Check::pass(
            "sink grants",
            "SELECT, INSERT, UPDATE, DELETE as the sink needs",
        );
    }
    let detail = format!("missing: {}", missing.join("; "));
    let fix = account.grant("SELECT, INSERT, UPDATE, DELETE");
    if role.as_deref().is_some_and(|r| r != "NONE") {
        Check::warn(
            "sink grants",
            format!(
                "{detail} (unless role {} grants them)",
                role.unwrap_or_default()
            ),
            fix,
        )
    } else {
        Check::fail("sink grants", detail, fix)
    }
}

/// Whether a route's table exists with the columns it names and, for an
/// upsert, a unique index on exactly its key (and no other, which `ON
/// DUPLICATE KEY UPDATE` would act on too).
async fn route_check(c: &mut Conn, route: &Route) -> Check {
    let name = format!("route {}", route.kind);
    let (schema, table) = match route.table.split_once('.') {
        Some((s, t)) => (Value::from(s), Value::from(t)),
        None => (Value::NULL, Value::from(route.table.as_str())),
    };
    let columns: Vec<String> = match c
        .exec(
            "SELECT LOWER(COLUMN_NAME) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
            vec![schema.clone(), table.clone()],
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return Check::fail(name, format!("{}: {}", route.table, conn::describe(&e)), "check the account's grants"),
    };
    if columns.is_empty() {
        return Check::fail(
            name,
            format!("table {} does not exist", route.table),
            "create the table, or fix `table` in the route",
        );
    }
    if let Some(missing) =
        route_missing_columns(&name, route, |c| columns.contains(&c.to_lowercase()))
    {
        return missing;
    }
    let unique: Vec<(String, String)> = match c
        .exec(
            "SELECT INDEX_NAME, GROUP_CONCAT(LOWER(COLUMN_NAME) ORDER BY COLUMN_NAME SEPARATOR ',') FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? AND NON_UNIQUE = 0 GROUP BY INDEX_NAME",
            vec![schema, table],
        )
        .await
    {
        Ok(u) => u,
        Err(e) => return Check::fail(name, format!("{}: {}", route.table, conn::describe(&e)), "check the account's grants"),
    };
    let mut key: Vec<String> = route.key.iter().map(|k| k.to_lowercase()).collect();
    key.sort();
    let key = key.join(",");
    let key_list = route
        .key
        .iter()
        .map(|k| quote(k))
        .collect::<Vec<_>>()
        .join(", ");
    if route.operation == Operation::Upsert {
        if !unique.iter().any(|(_, cols)| *cols == key) {
            return route_without_unique_key(
                &name,
                route,
                format!(
                    "ALTER TABLE {} ADD UNIQUE ({key_list}); or make `key` the primary key",
                    quote_table(&route.table)
                ),
            );
        }
        let others: Vec<&str> = unique
            .iter()
            .filter(|(_, cols)| *cols != key)
            .map(|(index, _)| index.as_str())
            .collect();
        if !others.is_empty() {
            return Check::warn(
                name,
                format!(
                    "{} has unique indexes besides the key: {}; its rows are written by key, one statement per updated row (not one INSERT … ON DUPLICATE KEY UPDATE, which would update the row an event collides with there), and an event that collides there fails with error 1062",
                    route.table,
                    others.join(", ")
                ),
                "nothing, if those indexes are meant; without them the route is written in one statement per batch",
            );
        }
    }
    route_ready(&name, route)
}

#[cfg(test)]
mod tests {
    //! Against private MariaDB servers (`crate::lab::mariadb`), one per
    //! test, in `/tmp/ssmdbsink-*`.
    use super::*;
    use crate::config::Operation;
    use crate::error::ErrorKind;
    use crate::lab::host::{create_owned_dir, random_hex};
    use crate::lab::mariadb::{Options, Server, sweep_orphans};
    use crate::sink::batch::Batches;
    use crate::sink::testing::{event_with, items, sink_with};
    use crate::sink::{Outcome, Target};
    use mysql_async::Error;
    use std::collections::BTreeMap as Map;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    const DIR_PREFIX: &str = "ssmdbsink-";

    /// A private server with a database `shop`; killed, and its directory
    /// removed, on drop.
    struct Lab {
        server: Server,
        dir: PathBuf,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            self.server.kill_blocking();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Lab {
        async fn start() -> Lab {
            static SWEPT: std::sync::Once = std::sync::Once::new();
            SWEPT.call_once(|| sweep_orphans(DIR_PREFIX, false));
            let dir = PathBuf::from(format!("/tmp/{DIR_PREFIX}{}", random_hex(8)));
            create_owned_dir(&dir, 0o755).unwrap();
            let server = Server::start(dir.clone(), Options::new("PARIS"))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            server.create_database("shop").await.unwrap();
            Lab { server, dir }
        }

        /// Runs one statement as root in `shop`; its rows as text.
        async fn sql(&self, sql: &str) -> String {
            let mut c = self.conn().await;
            let rows: Vec<Row> = c
                .query(sql)
                .await
                .unwrap_or_else(|e| panic!("`{sql}`: {e}"));
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| text(r.as_ref(i)).unwrap_or_else(|| "NULL".into()))
                        .collect::<Vec<_>>()
                        .join("\t")
                })
                .collect::<Vec<_>>()
                .join("\n")
        }

        async fn conn(&self) -> Conn {
            self.server.conn(Some("shop")).await.unwrap()
        }

        fn settings(&self, user: &str) -> Settings {
            Settings {
                url: format!("mysql://{user}@127.0.0.1:{}/shop", self.server.port()),
                outbox_table: "outbox".into(),
                server_id: 1_000_000_001,
            }
        }

        /// The sink of site PARIS on `shop` as root, initialised, with the
        /// outbox, a `customers` table whose insert trigger logs the marker
        /// and refuses the name `forbidden`, and `orders` referencing it.
        async fn paris(&self) -> Batches<MariaDbTarget> {
            let target = MariaDbTarget::with("PARIS", &self.settings("root"), &sink()).unwrap();
            target.init().await.unwrap();
            self.sql(&outbox_ddl("outbox", "PARIS")).await;
            for ddl in [
                "CREATE TABLE customers (id int NOT NULL PRIMARY KEY, name varchar(20) NOT NULL, email varchar(100) NULL UNIQUE, \
                 age int NULL CHECK (age IS NULL OR age >= 0), vip boolean NULL, score decimal(6,2) NULL, born datetime(6) NULL, profile json NULL)",
                "CREATE TABLE orders (id int NOT NULL PRIMARY KEY, customer_id int NOT NULL, FOREIGN KEY (customer_id) REFERENCES customers (id))",
                "CREATE TABLE trigger_log (n int NOT NULL AUTO_INCREMENT PRIMARY KEY, id int, applying int NULL)",
                "CREATE TRIGGER customers_ins BEFORE INSERT ON customers FOR EACH ROW BEGIN \
                   IF NEW.name = 'forbidden' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'customers: the name forbidden is refused'; END IF; \
                   INSERT INTO trigger_log (id, applying) VALUES (NEW.id, @sitesync_applying); END",
                "CREATE TRIGGER customers_upd AFTER UPDATE ON customers FOR EACH ROW \
                   INSERT INTO trigger_log (id, applying) VALUES (NEW.id, @sitesync_applying)",
            ] {
                self.sql(ddl).await;
            }
            Batches::new(target, "PARIS", &sink())
        }
    }

    fn route() -> Route {
        Route {
            kind: "customer.upsert".into(),
            table: "customers".into(),
            key: vec!["id".into()],
            operation: Operation::Upsert,
            rename: Map::new(),
            drop: vec![],
            constants: Map::new(),
        }
    }

    fn sink() -> SinkConfig {
        sink_with(vec![route()])
    }

    /// [`apply`] in a task of its own (while an application holds rows).
    fn in_background(
        sink: &Arc<Batches<MariaDbTarget>>,
        events: Vec<Event>,
    ) -> tokio::task::JoinHandle<Vec<Outcome>> {
        let sink = sink.clone();
        tokio::spawn(async move { apply(&sink, &events).await })
    }

    /// Customers 1 and 2 written at LONDON.
    fn london_1_and_2() -> Vec<Event> {
        vec![
            event_with(1, "LONDON", "1", 10, r#"{"id": 1, "name": "London 1"}"#),
            event_with(2, "LONDON", "2", 10, r#"{"id": 2, "name": "London 2"}"#),
        ]
    }

    async fn apply(t: &Batches<MariaDbTarget>, events: &[Event]) -> Vec<Outcome> {
        let r = route();
        t.apply(&items(events, &r, "PARIS")).await.unwrap()
    }

    /// Waits until `sql` (as root) answers something other than `0`,
    /// asking every 150 ms: InnoDB refreshes what `INNODB_TRX` shows only
    /// when it was last read over 100 ms before, so a faster poll would
    /// keep reading the same stale picture.
    async fn until(lab: &Lab, sql: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut c = lab.conn().await;
        loop {
            let got: Option<String> = c.query_first(sql).await.unwrap();
            let got = got.unwrap_or_default();
            if !got.is_empty() && got != "0" {
                return got;
            }
            assert!(Instant::now() < deadline, "`{sql}` still answers `{got}`");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Everything the sink writes, as text.
    async fn state(lab: &Lab) -> String {
        let mut out = String::new();
        for q in [
            "SELECT id, name, age, vip, score, born, profile FROM customers ORDER BY id",
            "SELECT event_id, origin, type, epoch, seq, outcome, received_at, applied_at FROM sitesync_inbox ORDER BY seq",
            "SELECT entity, `key`, ts, origin, event_id FROM sitesync_versions ORDER BY `key`",
            "SELECT origin, epoch, seq, updated_at FROM sitesync_origins",
            "SELECT origin, epoch, from_seq, to_seq FROM sitesync_gaps",
            "SELECT COUNT(*) FROM trigger_log",
        ] {
            out.push_str(&lab.sql(q).await);
            out.push_str("\n--\n");
        }
        out
    }

    #[tokio::test]
    async fn a_batch_applies_once_with_the_marker_and_a_redelivery_changes_nothing() {
        let lab = Lab::start().await;
        let paris = lab.paris().await;
        // Only the key is unique: the writes are INSERT … ON DUPLICATE KEY
        // UPDATE (the other tests keep `email` unique, which takes the
        // other path).
        lab.sql("ALTER TABLE customers DROP INDEX email").await;
        let again = MariaDbTarget::with("PARIS", &lab.settings("root"), &sink()).unwrap();
        assert_eq!(again.init().await.unwrap().len(), 1, "init is idempotent");
        let events = [
            event_with(
                1,
                "LONDON",
                "1",
                10,
                r#"{"id": 1, "name": "Zoé", "vip": true, "score": 12.5, "born": "2026-01-02T03:04:05.5+02:00", "profile": {"tags": ["a"]}}"#,
            ),
            event_with(
                2,
                "LONDON",
                "2",
                10,
                r#"{"id": 2, "name": "Bob", "age": 41, "born": "2026-03-04 05:06:07", "profile": "plain"}"#,
            ),
            event_with(
                3,
                "LONDON",
                "1",
                11,
                r#"{"id": 1, "name": "Zoé B", "vip": false, "score": 0.1, "born": null, "profile": [1, 2]}"#,
            ),
            event_with(5, "LONDON", "3", 12, r#"{"id": 3, "name": "Cy"}"#),
        ];
        assert_eq!(apply(&paris, &events).await, vec![Outcome::Applied; 4]);
        assert_eq!(
            lab.sql("SELECT id, name, age, vip, score, born, profile FROM customers ORDER BY id")
                .await,
            "1\tZoé B\tNULL\t0\t0.10\tNULL\t[1,2]\n\
             2\tBob\t41\tNULL\tNULL\t2026-03-04 05:06:07.000000\t\"plain\"\n\
             3\tCy\tNULL\tNULL\tNULL\tNULL\tNULL",
            "the later event of customer 1 won; JSON values as JSON, a zone-less datetime as it is"
        );
        assert_eq!(
            lab.sql("SELECT seq, outcome FROM sitesync_inbox ORDER BY seq")
                .await,
            "1\tapplied\n2\tapplied\n3\tapplied\n5\tapplied"
        );
        assert_eq!(
            lab.sql(
                "SELECT entity, `key`, ts, origin, event_id FROM sitesync_versions ORDER BY `key`"
            )
            .await,
            format!(
                "public.customers\t1\t1970-01-01 00:00:11.000000\tLONDON\t{}\n\
                 public.customers\t2\t1970-01-01 00:00:10.000000\tLONDON\t{}\n\
                 public.customers\t3\t1970-01-01 00:00:12.000000\tLONDON\t{}",
                Uuid::from_u128(3),
                Uuid::from_u128(2),
                Uuid::from_u128(5)
            )
        );
        assert_eq!(
            lab.sql("SELECT origin, epoch, seq FROM sitesync_origins")
                .await,
            "LONDON\t1\t5"
        );
        assert_eq!(
            lab.sql("SELECT origin, epoch, from_seq, to_seq FROM sitesync_gaps")
                .await,
            "LONDON\t1\t4\t4"
        );

        // A datetime with a zone goes in as UTC (customer 1's first write).
        let first = [event_with(
            6,
            "LONDON",
            "4",
            13,
            r#"{"id": 4, "name": "Di", "born": "2026-01-02T03:04:05.5+02:00"}"#,
        )];
        assert_eq!(apply(&paris, &first).await, [Outcome::Applied]);
        assert_eq!(
            lab.sql("SELECT born FROM customers WHERE id = 4").await,
            "2026-01-02 01:04:05.500000"
        );

        // The marker: every row the sink wrote, and none the application did.
        lab.sql("INSERT INTO customers (id, name) VALUES (50, 'local')")
            .await;
        assert_eq!(
            lab.sql("SELECT id, applying FROM trigger_log ORDER BY id, n")
                .await,
            "1\t1\n1\t1\n1\t1\n2\t1\n3\t1\n4\t1\n50\tNULL",
            "customer 1: its insert, then its update's insert attempt and update"
        );

        // The same batch again: all duplicates, nothing changed.
        let before = state(&lab).await;
        let outcomes = apply(&paris, &events).await;
        assert_eq!(outcomes, vec![Outcome::Duplicate; 4]);
        assert_eq!(state(&lab).await, before);

        // An event dead-lettered here, then requeued: applied this time.
        let requeued = [event_with(
            9,
            "LONDON",
            "9",
            20,
            r#"{"id": 9, "name": "Requeued"}"#,
        )];
        lab.sql(&format!(
            "INSERT INTO sitesync_inbox (event_id, origin, type, epoch, seq, outcome) VALUES ('{}', 'LONDON', 'customer.upsert', 1, 9, 'dead_letter')",
            requeued[0].id
        ))
        .await;
        assert_eq!(apply(&paris, &requeued).await, [Outcome::Applied]);
        assert_eq!(
            lab.sql("SELECT name FROM customers WHERE id = 9").await,
            "Requeued"
        );
        assert_eq!(
            lab.sql("SELECT outcome FROM sitesync_inbox WHERE seq = 9")
                .await,
            "applied"
        );

        // Late events take themselves out of the gaps recorded before: a
        // one-event gap goes, a range shrinks, a cut in the middle splits.
        let gaps = async || {
            lab.sql("SELECT from_seq, to_seq FROM sitesync_gaps ORDER BY from_seq")
                .await
        };
        assert_eq!(gaps().await, "4\t4\n7\t8");
        let body = |id: u32| format!(r#"{{"id": {id}, "name": "Late"}}"#);
        let later = [event_with(31, "LONDON", "31", 21, &body(31))];
        apply(&paris, &later).await;
        assert_eq!(gaps().await, "4\t4\n7\t8\n10\t30");
        let late = [
            event_with(4, "LONDON", "40", 22, &body(40)),
            event_with(7, "LONDON", "70", 22, &body(70)),
            event_with(25, "LONDON", "25", 22, &body(25)),
        ];
        assert_eq!(apply(&paris, &late).await, vec![Outcome::Applied; 3]);
        assert_eq!(gaps().await, "8\t8\n10\t24\n26\t30");
        assert_eq!(
            lab.sql("SELECT seq FROM sitesync_origins").await,
            "31",
            "late events do not move the progress"
        );
    }

    /// An outbox row of PARIS (a local write not yet round) about
    /// customer `key`, written at `created_at` (`NULL`: now).
    async fn local_write(lab: &Lab, n: u128, key: &str, data: &str, created_at: &str) {
        lab.sql(&format!(
            "INSERT INTO outbox (id, type, entity_key, data, created_at) VALUES ('{}', 'customer.upsert', '{key}', '{data}', COALESCE({created_at}, CURRENT_TIMESTAMP(6)))",
            Uuid::from_u128(n)
        ))
        .await;
    }

    #[tokio::test]
    async fn last_writer_wins_both_ways_and_own_events_back_round_delete_their_outbox_rows() {
        let lab = Lab::start().await;
        let paris = lab.paris().await;
        let name_of = |id: u32| format!("SELECT name FROM customers WHERE id = {id}");
        let version_of = |key: u32| {
            format!("SELECT origin, event_id FROM sitesync_versions WHERE `key` = '{key}'")
        };
        let id = |n: u128| Uuid::from_u128(n).to_string();

        // Remote against remote: the older write loses, whichever arrives last.
        let london = [event_with(
            1,
            "LONDON",
            "1",
            20,
            r#"{"id": 1, "name": "London"}"#,
        )];
        assert_eq!(apply(&paris, &london).await, [Outcome::Applied]);
        let older = [event_with(
            2,
            "MADRID",
            "1",
            10,
            r#"{"id": 1, "name": "Madrid old"}"#,
        )];
        assert_eq!(apply(&paris, &older).await, [Outcome::Lost]);
        assert_eq!(lab.sql(&name_of(1)).await, "London");
        assert_eq!(
            lab.sql(&format!(
                "SELECT outcome FROM sitesync_inbox WHERE event_id = '{}'",
                id(2)
            ))
            .await,
            "lost"
        );
        assert_eq!(
            lab.sql("SELECT loser_event_id, `key`, loser_origin, loser_ts, JSON_VALUE(loser_payload, '$.name'), winner_event_id, winner_origin, winner_ts FROM sitesync_conflicts").await,
            format!(
                "{}\t1\tMADRID\t1970-01-01 00:00:10.000000\tMadrid old\t{}\tLONDON\t1970-01-01 00:00:20.000000",
                id(2),
                id(1)
            )
        );
        let newer = [event_with(
            3,
            "MADRID",
            "1",
            30,
            r#"{"id": 1, "name": "Madrid new"}"#,
        )];
        assert_eq!(apply(&paris, &newer).await, [Outcome::Applied]);
        assert_eq!(lab.sql(&name_of(1)).await, "Madrid new");
        assert_eq!(lab.sql(&version_of(1)).await, format!("MADRID\t{}", id(3)));
        assert_eq!(
            lab.sql("SELECT COUNT(*) FROM sitesync_conflicts").await,
            "1"
        );

        // Remote against a local write not yet round: the local write is
        // newer (now) than LONDON's (1970) and stays.
        lab.sql("INSERT INTO customers (id, name) VALUES (2, 'local')")
            .await;
        local_write(&lab, 7, "2", r#"{"id": 2, "name": "local"}"#, "NULL").await;
        let remote = [event_with(
            4,
            "LONDON",
            "2",
            40,
            r#"{"id": 2, "name": "London"}"#,
        )];
        assert_eq!(apply(&paris, &remote).await, [Outcome::Lost]);
        assert_eq!(lab.sql(&name_of(2)).await, "local");
        assert_eq!(
            lab.sql(&format!("SELECT winner_event_id, winner_origin FROM sitesync_conflicts WHERE loser_event_id = '{}'", id(4))).await,
            format!("{}\tPARIS", id(7))
        );
        // … and its event back round: its outbox row goes, its version is the entity's.
        let now = Utc::now().timestamp() + 5;
        let back = [event_with(
            7,
            "PARIS",
            "2",
            now,
            r#"{"id": 2, "name": "local"}"#,
        )];
        assert_eq!(apply(&paris, &back).await, [Outcome::Own]);
        assert_eq!(lab.sql("SELECT COUNT(*) FROM outbox").await, "0");
        assert_eq!(lab.sql(&version_of(2)).await, format!("PARIS\t{}", id(7)));
        assert_eq!(
            lab.sql(&format!(
                "SELECT outcome FROM sitesync_inbox WHERE event_id = '{}'",
                id(7)
            ))
            .await,
            "own"
        );

        // A newer remote write against an older local write: it wins, and
        // the local write is recorded as the loser.
        lab.sql("INSERT INTO customers (id, name) VALUES (3, 'old local')")
            .await;
        local_write(
            &lab,
            8,
            "3",
            r#"{"id": 3, "name": "old local"}"#,
            "'2001-01-01 00:00:00'",
        )
        .await;
        let later = [event_with(
            5,
            "LONDON",
            "3",
            now + 100,
            r#"{"id": 3, "name": "London"}"#,
        )];
        assert_eq!(apply(&paris, &later).await, [Outcome::Applied]);
        assert_eq!(lab.sql(&name_of(3)).await, "London");
        assert_eq!(
            lab.sql(&format!("SELECT loser_origin, winner_event_id FROM sitesync_conflicts WHERE loser_event_id = '{}'", id(8))).await,
            format!("PARIS\t{}", id(5))
        );
        // The sweep deletes an outbox row the inbox records as back round.
        local_write(&lab, 9, "9", r#"{"id": 9, "name": "x"}"#, "NULL").await;
        lab.sql(&format!(
            "INSERT INTO sitesync_inbox (event_id, origin, type, epoch, seq, outcome) VALUES ('{}', 'PARIS', 't', 1, 9, 'own')",
            id(9)
        ))
        .await;
        assert_eq!(paris.sweep_own().await.unwrap(), 1);
        assert_eq!(
            lab.sql("SELECT id FROM outbox ORDER BY ord").await,
            id(8),
            "only the row whose event came back is swept"
        );
    }

    #[tokio::test]
    async fn a_bad_payload_or_a_trigger_signal_fails_one_message_and_the_rest_commits() {
        let lab = Lab::start().await;
        let _tables = lab.paris().await;
        lab.sql("INSERT INTO customers (id, name, email) VALUES (100, 'app', 'taken@example')")
            .await;
        // A server that is not strict: the sink's session is, all the same
        // (a new target: the first one's pooled connection has the old mode).
        lab.sql("SET GLOBAL sql_mode = ''").await;
        let paris = Batches::new(
            MariaDbTarget::with("PARIS", &lab.settings("root"), &sink()).unwrap(),
            "PARIS",
            &sink(),
        );
        let events = [
            event_with(1, "LONDON", "1", 10, r#"{"id": 1, "name": "ok"}"#),
            event_with(
                2,
                "LONDON",
                "2",
                10,
                r#"{"id": 2, "name": "typo", "age": "not a number"}"#,
            ),
            event_with(3, "LONDON", "3", 10, r#"{"id": 3, "name": "ok"}"#),
            event_with(4, "LONDON", "4", 10, r#"{"id": 4, "name": "forbidden"}"#),
            event_with(
                5,
                "LONDON",
                "5",
                10,
                r#"{"id": 5, "name": "negative", "age": -1}"#,
            ),
            event_with(
                6,
                "LONDON",
                "6",
                10,
                r#"{"id": 6, "name": "dup", "email": "taken@example"}"#,
            ),
            event_with(7, "LONDON", "2", 11, r#"{"id": 2, "name": "held"}"#),
            event_with(8, "LONDON", "8", 10, r#"{"id": 8, "name": "ok"}"#),
        ];
        let outcomes = apply(&paris, &events).await;
        let failed = |i: usize, what: &str| match &outcomes[i] {
            Outcome::Failed(reason) => assert!(reason.contains(what), "{i}: {reason}"),
            other => panic!("{i}: {other:?}"),
        };
        failed(1, "(error 1366,");
        failed(
            3,
            "the name forbidden is refused (error 1644, SQLSTATE 45000)",
        );
        failed(4, "(error 4025,");
        failed(5, "(error 1062,");
        assert!(failed_names_the_table(&outcomes[1]), "{:?}", outcomes[1]);
        assert_eq!(outcomes[0], Outcome::Applied);
        assert_eq!(outcomes[2], Outcome::Applied);
        assert_eq!(
            outcomes[6],
            Outcome::Held,
            "behind the failed message of its entity"
        );
        assert_eq!(outcomes[7], Outcome::Applied);
        assert_eq!(
            lab.sql("SELECT GROUP_CONCAT(id ORDER BY id) FROM customers")
                .await,
            "1,3,8,100"
        );
        assert_eq!(
            lab.sql("SELECT GROUP_CONCAT(seq ORDER BY seq) FROM sitesync_inbox")
                .await,
            "1,3,8"
        );
        assert_eq!(
            lab.sql("SELECT seq FROM sitesync_origins").await,
            "8",
            "the progress moves past the failed messages (they are retried by id)"
        );
    }

    fn failed_names_the_table(o: &Outcome) -> bool {
        matches!(o, Outcome::Failed(r) if r.starts_with("writing customers: "))
    }

    /// Each data error of the list, provoked on the server: one message's
    /// ([`Fault::Data`]), and it ends the statement only (the savepoint
    /// before it is still there).
    #[tokio::test]
    async fn data_errors_end_their_statement_only() {
        let lab = Lab::start().await;
        let _paris = lab.paris().await;
        lab.sql("INSERT INTO customers (id, name, email) VALUES (100, 'app', 'taken@example')")
            .await;
        lab.sql("INSERT INTO orders (id, customer_id) VALUES (1, 100)")
            .await;
        let mut c = lab.conn().await;
        c.query_drop("START TRANSACTION").await.unwrap();
        let cases: [(&str, u16); 15] = [
            (
                "INSERT INTO customers (id, name, email) VALUES (1, 'x', 'taken@example')",
                1062,
            ),
            ("INSERT INTO orders (id, customer_id) VALUES (2, 999)", 1452),
            ("DELETE FROM customers WHERE id = 100", 1451),
            (
                "INSERT INTO customers (id, name, age) VALUES (1, 'x', 'abc')",
                1366,
            ),
            (
                "INSERT INTO customers (id, name, age) VALUES (1, 'x', 99999999999)",
                1264,
            ),
            (
                "INSERT INTO customers (id, name) VALUES (1, 'a name much too long for it')",
                1406,
            ),
            ("INSERT INTO customers (id, name) VALUES (1, NULL)", 1048),
            (
                "INSERT INTO customers (id, name, age) VALUES (1, 'x', -1)",
                4025,
            ),
            (
                "INSERT INTO customers (id, name, profile) VALUES (1, 'x', '{not json')",
                4025,
            ),
            (
                "INSERT INTO customers (id, name, born) VALUES (1, 'x', 'not a date')",
                1292,
            ),
            (
                "INSERT INTO customers (id, name, age) VALUES (1, 'x', 1/0)",
                1365,
            ),
            (
                "INSERT INTO customers (id, name, nope) VALUES (1, 'x', 1)",
                1054,
            ),
            ("INSERT INTO nope (id) VALUES (1)", 1146),
            (
                "INSERT INTO customers (id, name) VALUES (1, 'forbidden')",
                1644,
            ),
            ("UPDATE customers SET id = 'x' WHERE id = 100", 1366),
        ];
        for (sql, code) in cases {
            c.query_drop("SAVEPOINT s").await.unwrap();
            let e = c.query_drop(sql).await.expect_err(sql);
            assert_eq!(conn::code(&e), Some(code), "{sql}: {e}");
            assert_eq!(conn::fault(&e), Fault::Data, "{sql}");
            c.query_drop("ROLLBACK TO SAVEPOINT s")
                .await
                .unwrap_or_else(|e| panic!("{sql} ended the transaction: {e}"));
        }
        let open: Option<i64> = c.query_first("SELECT @@in_transaction").await.unwrap();
        assert_eq!(open, Some(1));
    }

    /// Customers 1 and 2 exist; an application transaction that changed
    /// 300 rows (so that InnoDB picks the sink as a deadlock's victim) and
    /// holds customer 2.
    async fn application_holding_customer_2(lab: &Lab) -> Conn {
        lab.sql("INSERT INTO customers (id, name) VALUES (1, 'a'), (2, 'b')")
            .await;
        lab.sql("CREATE TABLE filler (id int NOT NULL PRIMARY KEY, n int NOT NULL)")
            .await;
        lab.sql("INSERT INTO filler SELECT seq, 0 FROM seq_1_to_300")
            .await;
        let mut app = lab.conn().await;
        app.query_drop("START TRANSACTION").await.unwrap();
        app.query_drop("UPDATE filler SET n = n + 1").await.unwrap();
        app.query_drop("UPDATE customers SET name = 'app' WHERE id = 2")
            .await
            .unwrap();
        app
    }

    const WAITING: &str = "SELECT COALESCE(MAX(trx_id), 0) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'";

    #[tokio::test]
    async fn a_deadlock_redoes_the_whole_batch() {
        let lab = Lab::start().await;
        let paris = Arc::new(lab.paris().await);
        let mut app = application_holding_customer_2(&lab).await;
        let batch = in_background(&paris, london_1_and_2());
        // The sink wrote customer 1 and waits for customer 2: the
        // application asks for customer 1, a deadlock, and the sink (the
        // smaller transaction) is rolled back.
        until(&lab, WAITING).await;
        app.query_drop("UPDATE customers SET name = 'app' WHERE id = 1")
            .await
            .expect("the application is not the deadlock's victim");
        app.query_drop("COMMIT").await.unwrap();
        assert_eq!(batch.await.unwrap(), vec![Outcome::Applied; 2]);
        assert!(
            lab.sql("SHOW ENGINE INNODB STATUS")
                .await
                .contains("LATEST DETECTED DEADLOCK")
        );
        assert_eq!(
            lab.sql("SELECT GROUP_CONCAT(name ORDER BY id) FROM customers")
                .await,
            "London 1,London 2",
            "the batch was applied again after the application committed"
        );
        assert_eq!(
            lab.sql("SELECT GROUP_CONCAT(seq ORDER BY seq) FROM sitesync_inbox")
                .await,
            "1,2"
        );
        assert_eq!(lab.sql("SELECT seq FROM sitesync_origins").await, "2");
    }

    /// A deadlock while the batch goes message by message (a bad message
    /// made it): InnoDB rolled the transaction back with its savepoints,
    /// and the whole batch is redone, not the message.
    #[tokio::test]
    async fn a_deadlock_among_savepoints_redoes_the_whole_batch() {
        let lab = Lab::start().await;
        let paris = Arc::new(lab.paris().await);
        let mut app = application_holding_customer_2(&lab).await;
        let batch = in_background(
            &paris,
            vec![
                event_with(1, "LONDON", "1", 10, r#"{"id": 1, "name": "London 1"}"#),
                event_with(
                    2,
                    "LONDON",
                    "5",
                    10,
                    r#"{"id": 5, "name": "bad", "age": "x"}"#,
                ),
                event_with(3, "LONDON", "2", 10, r#"{"id": 2, "name": "London 2"}"#),
            ],
        );
        // One message at a time: customer 1 written under its savepoint,
        // customer 5 failed and rolled back to its own, customer 2 waits.
        until(&lab, WAITING).await;
        app.query_drop("UPDATE customers SET name = 'app' WHERE id = 1")
            .await
            .expect("the application is not the deadlock's victim");
        app.query_drop("COMMIT").await.unwrap();
        let outcomes = batch.await.unwrap();
        assert_eq!(outcomes[0], Outcome::Applied);
        assert!(
            matches!(&outcomes[1], Outcome::Failed(r) if r.contains("(error 1366,")),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[2], Outcome::Applied);
        assert!(
            lab.sql("SHOW ENGINE INNODB STATUS")
                .await
                .contains("LATEST DETECTED DEADLOCK")
        );
        assert_eq!(
            lab.sql("SELECT GROUP_CONCAT(id, ':', name ORDER BY id) FROM customers")
                .await,
            "1:London 1,2:London 2",
            "customer 1, undone by the deadlock, was written again"
        );
        assert_eq!(
            lab.sql("SELECT GROUP_CONCAT(seq ORDER BY seq) FROM sitesync_inbox")
                .await,
            "1,3"
        );
    }

    /// A batch whose future is dropped while it waits for a row: the next
    /// batch on the same connection does not commit what it had done.
    #[tokio::test]
    async fn an_abandoned_attempt_is_rolled_back_not_committed() {
        let lab = Lab::start().await;
        let paris = Arc::new(lab.paris().await);
        let mut app = application_holding_customer_2(&lab).await;
        let batch = in_background(&paris, london_1_and_2());
        until(&lab, WAITING).await;
        batch.abort();
        assert!(batch.await.unwrap_err().is_cancelled());
        app.query_drop("COMMIT").await.unwrap();
        let next = [event_with(
            3,
            "LONDON",
            "3",
            10,
            r#"{"id": 3, "name": "London 3"}"#,
        )];
        assert_eq!(apply(&paris, &next).await, [Outcome::Applied]);
        assert_eq!(
            lab.sql("SELECT GROUP_CONCAT(seq ORDER BY seq) FROM sitesync_inbox")
                .await,
            "3",
            "the abandoned batch's inbox rows were not committed"
        );
        assert_eq!(
            lab.sql("SELECT GROUP_CONCAT(id, ':', name ORDER BY id) FROM customers")
                .await,
            "1:a,2:app,3:London 3"
        );
    }

    #[tokio::test]
    async fn a_lock_wait_timeout_tries_the_batch_again() {
        let lab = Lab::start().await;
        let paris = Arc::new(lab.paris().await);
        let mut app = application_holding_customer_2(&lab).await;
        let batch = in_background(
            &paris,
            vec![event_with(
                1,
                "LONDON",
                "2",
                10,
                r#"{"id": 2, "name": "London"}"#,
            )],
        );
        // The first try waits, times out after 1 s, and a second one waits
        // in a new transaction: then the application lets go.
        let first = until(&lab, WAITING).await;
        until(&lab, &format!("SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT' AND trx_id <> {first}")).await;
        app.query_drop("COMMIT").await.unwrap();
        assert_eq!(batch.await.unwrap(), [Outcome::Applied]);
        assert_eq!(
            lab.sql("SELECT name FROM customers WHERE id = 2").await,
            "London"
        );
    }

    /// The two busy errors, provoked between two sessions: both are
    /// [`Fault::Busy`], and after a deadlock the victim's savepoint is gone
    /// (1305): InnoDB rolled back its whole transaction.
    #[tokio::test]
    async fn deadlock_and_lock_wait_errors_are_busy() {
        let lab = Lab::start().await;
        let _paris = lab.paris().await;
        let mut app = application_holding_customer_2(&lab).await;
        let mut victim = lab.conn().await;
        victim
            .query_drop("SET innodb_lock_wait_timeout = 1; START TRANSACTION; SAVEPOINT s; UPDATE customers SET name = 'v' WHERE id = 1")
            .await
            .unwrap();
        let waiting = tokio::spawn(async move {
            let e = victim
                .query_drop("UPDATE customers SET name = 'v' WHERE id = 2")
                .await
                .expect_err("a deadlock");
            (victim, e)
        });
        until(&lab, WAITING).await;
        app.query_drop("UPDATE customers SET name = 'app' WHERE id = 1")
            .await
            .unwrap();
        let (mut victim, e) = waiting.await.unwrap();
        assert_eq!(conn::code(&e), Some(1213), "{e}");
        assert_eq!(conn::fault(&e), Fault::Busy);
        let gone = victim
            .query_drop("ROLLBACK TO SAVEPOINT s")
            .await
            .unwrap_err();
        assert_eq!(conn::code(&gone), Some(1305), "{gone}");

        // The application still holds both rows: a lock wait timeout.
        victim.query_drop("START TRANSACTION").await.unwrap();
        let e: Error = victim
            .query_drop("UPDATE customers SET name = 'v' WHERE id = 2")
            .await
            .unwrap_err();
        assert_eq!(conn::code(&e), Some(1205), "{e}");
        assert_eq!(conn::fault(&e), Fault::Busy);
        app.query_drop("COMMIT").await.unwrap();
    }

    #[tokio::test]
    async fn preflight_names_each_fix_and_grants_errors_stop_the_sink() {
        let lab = Lab::start().await;
        let target = MariaDbTarget::with("PARIS", &lab.settings("root"), &sink()).unwrap();
        let e = target.connect().await.err().expect("not initialised");
        assert_eq!(
            (e.kind(), e.cause()),
            (ErrorKind::Operator, Cause::NotInitialised)
        );
        assert!(
            e.message().contains("sitesync_inbox") && e.message().contains("run `sitesync init`"),
            "{}",
            e.message()
        );
        let checks = target.preflight().await;
        assert_eq!(
            checks[0].fix.as_deref(),
            Some("run `sitesync init`"),
            "{checks:?}"
        );
        assert!(
            checks[0].detail.contains("sitesync_conflicts"),
            "{checks:?}"
        );
        assert!(
            checks[2].detail.contains("table customers does not exist"),
            "{checks:?}"
        );

        let _paris = lab.paris().await;
        lab.sql("CREATE TABLE loose (id int NOT NULL, name text)")
            .await;
        let routes = vec![
            route(),
            Route {
                kind: "loose.upsert".into(),
                table: "loose".into(),
                ..route()
            },
            Route {
                kind: "ghost.delete".into(),
                table: "shop.ghost".into(),
                operation: Operation::Delete,
                ..route()
            },
        ];
        let target =
            MariaDbTarget::with("PARIS", &lab.settings("root"), &sink_with(routes.clone()))
                .unwrap();
        let checks = target.preflight().await;
        let by_name = |n: &str| {
            checks
                .iter()
                .find(|c| c.name == n)
                .unwrap_or_else(|| panic!("{n}: {checks:?}"))
        };
        assert_eq!(by_name("sink tables").status, crate::checks::Status::Pass);
        assert_eq!(
            by_name("sink grants").status,
            crate::checks::Status::Pass,
            "{checks:?}"
        );
        let customers = by_name("route customer.upsert");
        assert_eq!(
            customers.status,
            crate::checks::Status::Warn,
            "{customers:?}"
        );
        assert!(customers.detail.contains("email"), "{customers:?}");
        let loose = by_name("route loose.upsert");
        assert_eq!(loose.status, crate::checks::Status::Fail);
        assert_eq!(
            loose.fix.as_deref(),
            Some("ALTER TABLE `loose` ADD UNIQUE (`id`); or make `key` the primary key")
        );
        assert!(
            by_name("route ghost.delete")
                .detail
                .contains("shop.ghost does not exist")
        );

        // An account that may only read: check says which grant to run,
        // and a batch stops the sink with the same statement.
        lab.server
            .create_user("reader", "", "SELECT", "shop.*")
            .await
            .unwrap();
        let reader = MariaDbTarget::with("PARIS", &lab.settings("reader"), &sink()).unwrap();
        let checks = reader.preflight().await;
        let grants = checks.iter().find(|c| c.name == "sink grants").unwrap();
        assert_eq!(grants.status, crate::checks::Status::Fail, "{grants:?}");
        assert!(
            grants
                .detail
                .contains("INSERT, UPDATE, DELETE on sitesync_inbox"),
            "{grants:?}"
        );
        assert_eq!(
            grants.fix.as_deref(),
            Some("GRANT SELECT, INSERT, UPDATE, DELETE ON `shop`.* TO 'reader'@'<its host>'")
        );
        let reader = Batches::new(reader, "PARIS", &sink());
        let events = [event_with(
            1,
            "LONDON",
            "1",
            10,
            r#"{"id": 1, "name": "x"}"#,
        )];
        let r = route();
        let e = reader
            .apply(&items(&events, &r, "PARIS"))
            .await
            .unwrap_err();
        assert_eq!(
            (e.kind(), e.cause()),
            (ErrorKind::Operator, Cause::PermissionDenied),
            "{e}"
        );
        assert!(
            e.message().contains("(error 1142,")
                && e.message().contains(
                    "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX ON `shop`.* TO 'reader'"
                ),
            "{e}"
        );

        // A savepoint that is gone: the error before ended the transaction.
        let root = MariaDbTarget::with("PARIS", &lab.settings("root"), &sink()).unwrap();
        let mut session = root.connect().await.unwrap();
        session
            .begin(Start {
                isolate: true,
                lock: &[],
                origins: &[],
                seen: &[],
            })
            .await
            .unwrap();
        let gone = session.rollback_to_savepoint().await;
        assert!(
            matches!(&gone, Err(Failed::Gone(m)) if m.contains("(error 1305,")),
            "{gone:?}"
        );
        session.rollback().await;
        assert!(session.usable().await);

        // The outbox missing: not one message's fault, `sitesync init`'s.
        lab.sql("DROP TABLE outbox").await;
        let root = Batches::new(root, "PARIS", &sink());
        let e = root.apply(&items(&events, &r, "PARIS")).await.unwrap_err();
        assert_eq!(
            (e.kind(), e.cause()),
            (ErrorKind::Operator, Cause::NotInitialised),
            "{e}"
        );
        assert!(
            e.message().contains("(error 1146,") && e.message().contains("run `sitesync init`"),
            "{e}"
        );

        // A wrong password: the login is refused, not retried.
        let mut bad = lab.settings("root");
        bad.url = bad.url.replace("root@", "root:wrong@");
        let e = MariaDbTarget::with("PARIS", &bad, &sink())
            .unwrap()
            .connect()
            .await
            .err()
            .expect("refused");
        assert_eq!(
            (e.kind(), e.cause()),
            (ErrorKind::Operator, Cause::AuthRefused),
            "{e}"
        );
        assert!(!e.message().contains("wrong"), "{e}");
    }
}
