//! Applying events to PostgreSQL.
//!
//! One transaction per batch, marked with `SET LOCAL sitesync.applying =
//! 'on'` so that an application trigger that fills the outbox can skip the
//! sink's changes (`current_setting('sitesync.applying', true) = 'on'`).
//! Inside it, set-based statements: the inbox rows (`unnest` arrays), the
//! per-origin progress and gaps, the deletion of this site's outbox rows
//! whose events came back round, the changes themselves (one multi-row
//! `INSERT … ON CONFLICT` or `DELETE` per table and column set, built with
//! `jsonb_populate_recordset`), the entities' versions and the conflicts.
//!
//! The order of the steps, the retries and the isolation of a message
//! whose data fails are the sink's ([`crate::sink::batch`]); this file is
//! the SQL of each step ([`PgSession`]) and how PostgreSQL's errors are
//! classified (`failed`).
//!
//! Local writes: before it looks for this site's writes still in the
//! outbox, the sink locks the rows it looks at that exist (`FOR UPDATE`,
//! with a short `lock_timeout` so that it yields to applications rather
//! than make them wait or deadlock): the rows of other sites' events, and
//! of this site's events back round only those whose entity's version
//! another site wrote before them (the rest need no look). An application
//! writing one of those rows meanwhile either committed already (the sink
//! sees its outbox row) or waits for the sink and commits later, with a
//! later commit time. A write on a row that does not exist yet cannot be
//! locked: if it races the sink, its event coming back round finds the row
//! not as it wrote it while its write is the entity's newest, and writes it
//! again — the sites converge, at the price of that extra write.
//!
//! Last-writer-wins: an entity's version is `(timestamp, origin)` of the
//! event that wrote it (`sitesync_versions`), or of this site's own write
//! still in the outbox (its commit time, with `track_commit_timestamp`;
//! else its `created_at`). An event applies only if its version is higher;
//! otherwise, or when it displaces a local write that has not gone round
//! yet, the losing write is recorded in `sitesync_conflicts`.

use super::settings::Settings;
use crate::checks::Check;
use crate::config::{ConnectorConfig, Operation, Route, SinkConfig, redact_url};
use crate::error::{Cause, TargetError};
use crate::event::Event;
use crate::sink::batch::{
    self, Dialect, Failed, Finish, GapMark, Local, OpenGap, Origins, Progress, Session, Start,
    Stored, Write, route_missing_columns, route_ready, route_without_unique_key,
};
use crate::sink::batch::{ReceiptRow, Traced};
use crate::sink::control::Receipt;
use crate::sink::mapping::Entity;
use crate::sink::rules::{self, Conflict, GapRow, LateArrivals, Version};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::{Client, GenericClient, Row, Statement};
use uuid::Uuid;

/// Quotes `[schema.]name` as SQL.
pub(super) fn quote_table(name: &str) -> String {
    name.split('.')
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

pub(super) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQL that creates the sink's tables (idempotent).
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sitesync_inbox (
    event_id uuid PRIMARY KEY,
    origin text COLLATE "C" NOT NULL,
    type text NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    applied_at timestamptz NOT NULL DEFAULT now(),
    outcome text NOT NULL
);
CREATE TABLE IF NOT EXISTS sitesync_origins (
    origin text COLLATE "C" PRIMARY KEY,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS sitesync_gaps (
    id bigserial PRIMARY KEY,
    origin text COLLATE "C" NOT NULL,
    epoch bigint NOT NULL,
    from_seq bigint NOT NULL,
    to_seq bigint NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    requested_at timestamptz,
    note text
);
ALTER TABLE sitesync_gaps ADD COLUMN IF NOT EXISTS requested_at timestamptz;
ALTER TABLE sitesync_gaps ADD COLUMN IF NOT EXISTS note text;
CREATE TABLE IF NOT EXISTS sitesync_receipts (
    event_id uuid NOT NULL,
    site text COLLATE "C" NOT NULL,
    epoch bigint NOT NULL,
    seq bigint NOT NULL,
    outcome text NOT NULL,
    reason text,
    at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, site)
);
CREATE INDEX IF NOT EXISTS sitesync_receipts_received ON sitesync_receipts (received_at);
CREATE TABLE IF NOT EXISTS sitesync_versions (
    entity text NOT NULL,
    key text NOT NULL,
    ts timestamptz NOT NULL,
    origin text COLLATE "C" NOT NULL,
    event_id uuid NOT NULL,
    PRIMARY KEY (entity, key)
);
CREATE TABLE IF NOT EXISTS sitesync_conflicts (
    id bigserial PRIMARY KEY,
    loser_event_id uuid NOT NULL UNIQUE,
    entity text NOT NULL,
    key text NOT NULL,
    loser_origin text COLLATE "C" NOT NULL,
    loser_ts timestamptz NOT NULL,
    loser_payload jsonb,
    winner_event_id uuid NOT NULL,
    winner_origin text COLLATE "C" NOT NULL,
    winner_ts timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
"#;

/// Whether a database error belongs to one message (its data) or to the
/// batch as a whole (the connection, a deadlock, the server).
fn per_message(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => false,
        Some(code) => {
            let c = code.code();
            // Data (22), integrity (23), cardinality (21, e.g. ON CONFLICT
            // touching a row twice), schema (42), a limit (54, e.g. an
            // index row too large), WITH CHECK OPTION (44), functions and
            // triggers (2F, 38, 39, and P0: an application trigger's RAISE).
            ["21", "22", "23", "2F", "38", "39", "42", "44", "54", "P0"]
                .iter()
                .any(|class| c.starts_with(class))
        }
    }
}

pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => e.to_string(),
    }
}

fn transient(context: &str, e: tokio_postgres::Error) -> TargetError {
    let cause = match e.code() {
        None => Cause::Unreachable,
        Some(code) if code.code().starts_with("08") || code.code().starts_with("57") => {
            Cause::Unreachable
        }
        Some(code) if code.code().starts_with("28") => Cause::AuthRefused,
        Some(code) if code.code() == "42501" => Cause::PermissionDenied,
        Some(code) if code.code().starts_with("40") || code.code() == "55P03" => Cause::Busy,
        Some(_) => Cause::Query,
    };
    TargetError::transient(cause, format!("{context}: {}", describe(&e)))
}

/// How an error fails a batch: an application holding a row (busy), one
/// message's data, or the batch as a whole.
fn failed(context: &str, e: tokio_postgres::Error) -> Failed {
    use tokio_postgres::error::SqlState;
    if matches!(e.code(), Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED)
    {
        Failed::Busy
    } else if per_message(&e) {
        Failed::Data(describe(&e))
    } else {
        Failed::Batch(transient(context, e))
    }
}

/// The statements of one connection, prepared once each.
///
/// A batch sends the same dozen statement texts every time. Sent as text,
/// each would be parsed, analysed and planned again, and cost one more
/// round trip (tokio-postgres prepares an unnamed statement first). The
/// texts depend only on the routes and the column sets of the events, so
/// the map stays small; it is emptied past [`PREPARED_MAX`] texts, and when
/// the connection is replaced (a statement belongs to its connection).
#[derive(Default)]
struct Prepared(std::sync::Mutex<HashMap<String, Statement>>);

/// At most this many prepared statements per connection.
const PREPARED_MAX: usize = 256;

impl Prepared {
    async fn statement<C: GenericClient + Sync>(
        &self,
        c: &C,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(st) = self.map().get(sql) {
            return Ok(st.clone());
        }
        let st = c.prepare(sql).await?;
        let mut map = self.map();
        if map.len() >= PREPARED_MAX {
            map.clear();
        }
        map.insert(sql.to_owned(), st.clone());
        Ok(st)
    }

    async fn query<C: GenericClient + Sync>(
        &self,
        c: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let st = self.statement(c, sql).await?;
        c.query(&st, params).await
    }

    async fn execute<C: GenericClient + Sync>(
        &self,
        c: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let st = self.statement(c, sql).await?;
        c.execute(&st, params).await
    }

    fn clear(&self) {
        self.map().clear();
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Statement>> {
        // A panic while holding it cannot leave the map half-changed.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the sink knows about the outbox, for local writes not yet round.
#[derive(Debug, Clone)]
struct OutboxShape {
    table: String,
    /// `id` is `uuid` (else compared as text).
    uuid_id: bool,
    /// The commit time (or creation time) of an outbox row aliased `o`.
    version_ts: Option<String>,
    has_entity_key: bool,
}

/// The PostgreSQL side of the sink: connections, `init` and `check`.
pub struct PostgresTarget {
    site: String,
    url: String,
    pg: tokio_postgres::Config,
    sink: Arc<SinkConfig>,
    outbox: String,
}

impl PostgresTarget {
    pub fn new(cfg: &ConnectorConfig, db: &Settings) -> Result<PostgresTarget, TargetError> {
        let pg = db.url.parse().map_err(|e| {
            TargetError::operator(
                Cause::Config,
                format!("database.url `{}`: {e}", redact_url(&db.url)),
            )
        })?;
        let (schema, table) = db.outbox_parts();
        Ok(PostgresTarget {
            site: cfg.site.clone(),
            url: db.url.clone(),
            pg,
            sink: Arc::new(cfg.sink.clone()),
            outbox: format!("{schema}.{table}"),
        })
    }

    async fn open(&self) -> Result<Client, TargetError> {
        let (client, connection) = self
            .pg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| transient(&format!("connecting to {}", redact_url(&self.url)), e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "sink database connection ended");
            }
        });
        Ok(client)
    }

    /// A connection for applying, with what the sink needs to know about
    /// the outbox; refuses a database `sitesync init` has not prepared.
    async fn session(&self) -> Result<PgSession, TargetError> {
        let client = self.open().await?;
        let (schema, table) = self.outbox.split_once('.').expect("schema-qualified");
        let columns: HashMap<String, String> = client
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
                &[&schema, &table],
            )
            .await
            .map_err(|e| transient("reading the outbox's columns", e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let ready: bool = client
            .query_one(
                "SELECT to_regclass('sitesync_inbox') IS NOT NULL AND to_regclass('sitesync_conflicts') IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| transient("looking for the sink tables", e))?
            .get(0);
        if !ready {
            return Err(TargetError::operator(
                Cause::NotInitialised,
                format!(
                    "the sink tables are missing in {}: run `sitesync init`",
                    redact_url(&self.url)
                ),
            ));
        }
        let commit_ts: String = client
            .query_one("SHOW track_commit_timestamp", &[])
            .await
            .map_err(|e| transient("reading track_commit_timestamp", e))?
            .get(0);
        let created = columns.contains_key("created_at");
        let version_ts = match (commit_ts == "on", created) {
            (true, true) => {
                Some("COALESCE(pg_xact_commit_timestamp(o.xmin), o.created_at)".to_string())
            }
            (true, false) => Some("pg_xact_commit_timestamp(o.xmin)".to_string()),
            (false, true) => Some("o.created_at".to_string()),
            (false, false) => None,
        };
        if commit_ts != "on" {
            tracing::warn!(
                "track_commit_timestamp is off: a local write not yet propagated is compared by its created_at, not its commit time (see `sitesync check`)"
            );
        }
        let shape = OutboxShape {
            table: quote_table(&self.outbox),
            uuid_id: columns.get("id").is_some_and(|t| t == "uuid"),
            version_ts: version_ts
                .filter(|_| columns.contains_key("type") && columns.contains_key("data")),
            has_entity_key: columns.contains_key("entity_key"),
        };
        Ok(PgSession {
            client,
            shape,
            prepared: Prepared::default(),
            site: self.site.clone(),
            sink: self.sink.clone(),
            in_transaction: false,
        })
    }
}

impl Dialect for PostgresTarget {
    type Session = PgSession;

    /// Applications hold rows for a short while: a batch waits for them
    /// (5 ms more each time) up to 40 times before it backs off.
    const BUSY_RETRIES: u32 = 40;

    async fn connect(&self) -> Result<PgSession, TargetError> {
        self.session().await
    }

    /// Creates the sink's tables; returns one line per table.
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let client = self.open().await?;
        client
            .batch_execute(SCHEMA)
            .await
            .map_err(|e| transient("creating the sink tables", e))?;
        let outbox = quote_table(&self.outbox);
        // Local writes not yet round are looked up by type and entity key.
        let _ = client
            .batch_execute(&format!(
                "CREATE INDEX IF NOT EXISTS sitesync_outbox_entity ON {outbox} (type, entity_key)"
            ))
            .await;
        Ok(vec![
            "sink tables sitesync_inbox, sitesync_origins, sitesync_gaps, sitesync_versions, sitesync_conflicts: ready".to_string(),
        ])
    }

    /// What `sitesync check` verifies for the sink: its tables, the commit
    /// timestamps that make last-writer-wins fair to local writes, and that
    /// every route's table has the columns and the unique key it names.
    async fn preflight(&self) -> Vec<Check> {
        let client = match self.open().await {
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
        match client
            .query_one(
                "SELECT to_regclass('sitesync_inbox') IS NOT NULL AND to_regclass('sitesync_origins') IS NOT NULL \
                 AND to_regclass('sitesync_gaps') IS NOT NULL AND to_regclass('sitesync_versions') IS NOT NULL \
                 AND to_regclass('sitesync_conflicts') IS NOT NULL, current_setting('track_commit_timestamp'), \
                 (SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('sitesync_gaps') \
                  AND attname IN ('requested_at', 'note') AND NOT attisdropped)",
                &[],
            )
            .await
        {
            Err(e) => checks.push(Check::fail("sink tables", e.to_string(), "check the database role's privileges")),
            Ok(row) => {
                let (ready, commit_ts, gap_columns): (bool, String, i64) = (row.get(0), row.get(1), row.get(2));
                checks.push(if !ready {
                    Check::fail("sink tables", "missing", "run `sitesync init`")
                } else if gap_columns < 2 {
                    Check::fail(
                        "sink tables",
                        "sitesync_gaps lacks the requested_at and note columns (made by an older sitesync)",
                        "run `sitesync init`: it adds them",
                    )
                } else {
                    Check::pass("sink tables", "sitesync_inbox, _origins, _gaps, _versions, _conflicts")
                });
                checks.push(if commit_ts == "on" {
                    Check::pass("track_commit_timestamp", "on: local writes are compared by commit time")
                } else {
                    Check::warn(
                        "track_commit_timestamp",
                        "off: a local write not yet propagated is compared by the outbox's created_at (its statement time), which can order two sites' writes unlike their commits",
                        "ALTER SYSTEM SET track_commit_timestamp = on; then restart PostgreSQL",
                    )
                });
            }
        }
        for route in &self.sink.routes {
            checks.push(route_check(&client, route).await);
        }
        checks
    }
}

/// One connection of the PostgreSQL sink, with what it knows of the outbox
/// and the statements it prepared.
pub struct PgSession {
    client: Client,
    shape: OutboxShape,
    /// Statements prepared on `client`.
    prepared: Prepared,
    site: String,
    sink: Arc<SinkConfig>,
    /// BEGIN was sent, and no COMMIT or ROLLBACK since.
    in_transaction: bool,
}

impl PgSession {
    /// This site's writes still in the outbox, for the entities of the batch.
    async fn read_local_writes(&self, entities: &[&Entity]) -> Result<Local, Failed> {
        let mut out = Local::new();
        let shape = &self.shape;
        let Some(ts) = &shape.version_ts else {
            return Ok(out);
        };
        let tables: HashSet<&str> = entities.iter().map(|e| e.table.as_str()).collect();
        let types: Vec<&str> = self
            .sink
            .routes
            .iter()
            .filter(|r| tables.contains(r.table.as_str()))
            .map(|r| r.kind.as_str())
            .collect();
        if types.is_empty() {
            return Ok(out);
        }
        let keys: Vec<&str> = entities
            .iter()
            .map(|e| e.key.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // One index probe of (type, entity_key) per key (`OFFSET 0` keeps
        // the lateral subquery from being turned into a join the planner
        // may run the other way round), and one for the rows with no
        // entity key. `entity_key IS NULL OR entity_key =
        // ANY($2)` kept the index to `type` and filtered every row of the
        // type still in the outbox (thousands under load, when statistics
        // lag behind an outbox that empties as fast as it fills).
        let sql = if shape.has_entity_key {
            format!(
                "SELECT w.* FROM unnest($2::text[]) AS k(key) CROSS JOIN LATERAL \
                 (SELECT o.id::text, o.type, o.data::text, {ts} FROM {t} o WHERE o.entity_key = k.key AND o.type = ANY($1) OFFSET 0) w \
                 UNION ALL SELECT o.id::text, o.type, o.data::text, {ts} FROM {t} o WHERE o.type = ANY($1) AND o.entity_key IS NULL",
                t = shape.table
            )
        } else {
            format!(
                "SELECT o.id::text, o.type, o.data::text, {ts} FROM {} o WHERE o.type = ANY($1) AND $2::text[] IS NOT NULL",
                shape.table
            )
        };
        let rows = self
            .prepared
            .query(&self.client, &sql, &[&types, &keys])
            .await
            .map_err(|e| failed("looking for local writes not yet propagated", e))?;
        let wanted: HashSet<&Entity> = entities.iter().copied().collect();
        for row in rows {
            let (id, kind, data, ts): (String, String, Option<String>, Option<DateTime<Utc>>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            let (Some(data), Some(ts)) = (data, ts) else {
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
}

impl PgSession {
    /// One statement without parameters (transaction control).
    async fn simple(&self, sql: &str, context: &str) -> Result<(), Failed> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| failed(context, e))
    }

    /// Rolls back a transaction this session left open (an attempt that
    /// failed, or was cancelled); the flag clears only once it is gone.
    async fn end_leftover(&mut self) -> Result<(), tokio_postgres::Error> {
        if self.in_transaction && !self.client.is_closed() {
            self.client.batch_execute("ROLLBACK").await?;
        }
        self.in_transaction = false;
        Ok(())
    }
}

impl Session for PgSession {
    const CHECKS_OWN_ROWS: bool = true;

    fn closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn begin(&mut self, start: Start<'_>) -> Result<(), Failed> {
        // An attempt that never ended (it was cancelled): end it first.
        self.end_leftover()
            .await
            .map_err(|e| failed("ending an unfinished batch", e))?;
        // READ COMMITTED whatever the database's default: every statement
        // sees what committed before it (see `delete_own`).
        self.simple(
            "START TRANSACTION ISOLATION LEVEL READ COMMITTED",
            "starting the batch",
        )
        .await?;
        self.in_transaction = true;
        let (c, p) = (&self.client, &self.prepared);
        if start.isolate {
            c.batch_execute(BATCH_SETTINGS)
                .await
                .map_err(|e| failed("marking the transaction", e))?;
            // Every failure must belong to one message: deferred
            // constraints are checked at each statement, not at COMMIT, and
            // rows are locked message by message (a key value that does
            // not fit its column fails its own message only).
            c.batch_execute("SET CONSTRAINTS ALL IMMEDIATE")
                .await
                .map_err(|e| failed("making constraints immediate", e))?;
            progress(c, p, &start).await
        } else {
            // One round trip for the three (tokio-postgres pipelines
            // statements polled together; the server runs them in order).
            // After a failure the later ones fail as the transaction is
            // aborted: the first error in order is the cause.
            let (marked, locked, progressed) = tokio::join!(
                c.batch_execute(BATCH_SETTINGS),
                lock_rows(c, p, start.lock),
                progress(c, p, &start),
            );
            marked.map_err(|e| failed("marking the transaction", e))?;
            locked?;
            progressed
        }
    }

    async fn insert_inbox(
        &mut self,
        events: &[(&Event, &'static str)],
        careful: bool,
    ) -> Result<HashSet<Uuid>, Failed> {
        insert_inbox(&self.client, &self.prepared, events, careful).await
    }

    async fn delete_own(&mut self, ids: &[Uuid]) -> Result<(), Failed> {
        delete_own(&self.client, &self.prepared, &self.shape, ids).await
    }

    async fn lock_rows(&mut self, rows: &[Write<'_>]) -> Result<(), Failed> {
        lock_rows(&self.client, &self.prepared, rows).await
    }

    async fn load_versions(&mut self, entities: &[&Entity]) -> Result<Stored, Failed> {
        load_versions(&self.client, &self.prepared, entities).await
    }

    async fn local_writes(&mut self, entities: &[&Entity]) -> Result<Local, Failed> {
        self.read_local_writes(entities).await
    }

    async fn lookup(&mut self, entities: &[&Entity]) -> Result<(Stored, Local), Failed> {
        // One round trip for both.
        let (stored, local) = tokio::join!(
            load_versions(&self.client, &self.prepared, entities),
            self.read_local_writes(entities),
        );
        Ok((stored?, local?))
    }

    async fn write(&mut self, wave: &[Write<'_>]) -> Result<(), Failed> {
        write_wave(&self.client, &self.prepared, wave).await
    }

    async fn upsert_versions(
        &mut self,
        versions: &[(Entity, Version, Uuid)],
        stored: &Stored,
    ) -> Result<(), Failed> {
        upsert_versions(&self.client, &self.prepared, versions, stored).await
    }

    async fn insert_conflicts(&mut self, conflicts: &[Conflict]) -> Result<(), Failed> {
        insert_conflicts(&self.client, &self.prepared, conflicts).await
    }

    async fn mark_lost(&mut self, ids: &[Uuid]) -> Result<(), Failed> {
        mark_lost(&self.client, &self.prepared, ids).await
    }

    async fn recorded_losers(&mut self, ids: &[Uuid]) -> Result<HashSet<Uuid>, Failed> {
        let rows = self
            .prepared
            .query(
                &self.client,
                "SELECT loser_event_id FROM sitesync_conflicts WHERE loser_event_id = ANY($1)",
                &[&ids],
            )
            .await
            .map_err(|e| failed("looking for this site's writes that lost here", e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn withdraw_conflicts(&mut self, losers: &[Uuid]) -> Result<(), Failed> {
        self.prepared
            .execute(
                &self.client,
                "DELETE FROM sitesync_conflicts WHERE loser_event_id = ANY($1)",
                &[&losers],
            )
            .await
            .map(|_| ())
            .map_err(|e| failed("withdrawing conflict records", e))
    }

    async fn finish(&mut self, f: Finish<'_>) -> Result<(), Failed> {
        let (c, p) = (&self.client, &self.prepared);
        // The last wave, the versions, the conflicts and the lost events in
        // one round trip; the first error in order is the cause.
        let (written, versioned, recorded, marked) = tokio::join!(
            write_wave(c, p, f.wave),
            upsert_versions(c, p, f.versions, f.stored),
            insert_conflicts(c, p, f.conflicts),
            mark_lost(c, p, f.lost),
        );
        written?;
        versioned?;
        recorded?;
        marked
    }

    async fn rows_not_as_written<'w>(
        &mut self,
        writes: &[Write<'w>],
    ) -> Result<Vec<Write<'w>>, Failed> {
        rows_not_as_written(&self.client, writes).await
    }

    async fn savepoint(&mut self) -> Result<(), Failed> {
        self.simple("SAVEPOINT sitesync_item", "savepoint").await
    }

    async fn release_savepoint(&mut self) -> Result<(), Failed> {
        self.simple("RELEASE SAVEPOINT sitesync_item", "releasing a savepoint")
            .await
    }

    async fn rollback_to_savepoint(&mut self) -> Result<(), Failed> {
        self.simple(
            "ROLLBACK TO SAVEPOINT sitesync_item",
            "rolling back a savepoint",
        )
        .await
    }

    async fn commit(&mut self) -> Result<(), Failed> {
        self.simple("COMMIT", "committing the batch").await?;
        self.in_transaction = false;
        Ok(())
    }

    async fn rollback(&mut self) {
        // A ROLLBACK that fails leaves the flag set: the session is then
        // not reused (`usable`).
        let _ = self.end_leftover().await;
    }

    async fn usable(&mut self) -> bool {
        // Prepared again on the next try: a statement may be what failed
        // (its table changed under it, or the server lost it).
        self.prepared.clear();
        !self.client.is_closed() && !self.in_transaction
    }

    async fn sweep_own(&mut self) -> Result<u64, TargetError> {
        self.end_leftover()
            .await
            .map_err(|e| transient("ending an unfinished batch", e))?;
        let shape = &self.shape;
        // A text id is cast for the inbox's index, and only when it reads
        // as a UUID (an id that does not is no event of ours).
        let matches = if shape.uuid_id {
            "i.event_id = o.id"
        } else {
            "i.event_id = CASE WHEN o.id::text ~* '^\\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\\}?$' THEN o.id::text::uuid END"
        };
        // Driven by the outbox (small), one inbox lookup per row: a
        // correlated subquery is never turned into a join, which had the
        // planner scan every 'own' row of the inbox (it only grows).
        let sql = format!(
            "DELETE FROM {} o WHERE (SELECT i.outcome FROM sitesync_inbox i WHERE {matches}) = 'own'",
            shape.table
        );
        self.client
            .execute(&sql, &[])
            .await
            .map_err(|e| transient("sweeping outbox rows that came back", e))
    }

    async fn open_gaps(&mut self) -> Result<Vec<OpenGap>, TargetError> {
        self.end_leftover()
            .await
            .map_err(|e| transient("ending an unfinished batch", e))?;
        let rows = self
            .client
            .query(
                "SELECT id, origin, epoch, from_seq, to_seq, extract(epoch FROM now() - detected_at)::float8, \
                 extract(epoch FROM now() - requested_at)::float8, note FROM sitesync_gaps ORDER BY id",
                &[],
            )
            .await
            .map_err(|e| transient("reading sitesync_gaps", e))?;
        Ok(rows
            .iter()
            .map(|r| OpenGap {
                id: r.get(0),
                origin: r.get(1),
                epoch: r.get::<_, i64>(2) as u64,
                from: r.get::<_, i64>(3) as u64,
                to: r.get::<_, i64>(4) as u64,
                age_s: r.get(5),
                requested_s: r.get(6),
                note: r.get(7),
            })
            .collect())
    }

    async fn record_receipt(&mut self, r: &Receipt) -> Result<(), TargetError> {
        self.end_leftover()
            .await
            .map_err(|e| transient("ending an unfinished batch", e))?;
        let ids: Vec<Uuid> = r.events.iter().map(|e| e.id).collect();
        let epochs: Vec<i64> = r.events.iter().map(|e| e.epoch as i64).collect();
        let seqs: Vec<i64> = r.events.iter().map(|e| e.seq as i64).collect();
        let outcomes: Vec<&str> = r.events.iter().map(|e| e.outcome.as_str()).collect();
        let reasons: Vec<Option<&str>> = r.events.iter().map(|e| e.reason.as_deref()).collect();
        self.client
            .execute(
                "INSERT INTO sitesync_receipts (event_id, site, epoch, seq, outcome, reason, at) \
                 SELECT e, $1, ep, s, o, r, $2 FROM unnest($3::uuid[], $4::int8[], $5::int8[], $6::text[], $7::text[]) AS u(e, ep, s, o, r) \
                 ON CONFLICT (event_id, site) DO UPDATE SET outcome = EXCLUDED.outcome, reason = EXCLUDED.reason, at = EXCLUDED.at, received_at = now() \
                 WHERE EXCLUDED.outcome <> 'duplicate'",
                &[&r.site, &r.at, &ids, &epochs, &seqs, &outcomes, &reasons],
            )
            .await
            .map(|_| ())
            .map_err(|e| transient("recording a receipt", e))
    }

    async fn trace(&mut self, id: Uuid) -> Result<Traced, TargetError> {
        self.end_leftover()
            .await
            .map_err(|e| transient("ending an unfinished batch", e))?;
        let time = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let receipts = self
            .client
            .query(
                "SELECT site, epoch, seq, outcome, reason, at, received_at FROM sitesync_receipts WHERE event_id = $1 ORDER BY at, site",
                &[&id],
            )
            .await
            .map_err(|e| transient("reading sitesync_receipts", e))?
            .iter()
            .map(|r| ReceiptRow {
                site: r.get(0),
                epoch: r.get::<_, i64>(1) as u64,
                seq: r.get::<_, i64>(2) as u64,
                outcome: r.get(3),
                reason: r.get(4),
                at: time(r.get(5)),
                received_at: time(r.get(6)),
            })
            .collect();
        let inbox = self
            .client
            .query_opt(
                "SELECT origin, type, epoch, seq, outcome, applied_at FROM sitesync_inbox WHERE event_id = $1",
                &[&id],
            )
            .await
            .map_err(|e| transient("reading sitesync_inbox", e))?
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    r.get::<_, i64>(2) as u64,
                    r.get::<_, i64>(3) as u64,
                    r.get(4),
                    time(r.get(5)),
                )
            });
        Ok(Traced { receipts, inbox })
    }

    async fn unreceipted(
        &mut self,
        sites: &[String],
        older_than_s: u64,
    ) -> Result<Vec<(String, u64, f64)>, TargetError> {
        self.end_leftover()
            .await
            .map_err(|e| transient("ending an unfinished batch", e))?;
        let rows = self
            .client
            .query(
                "WITH first AS (SELECT event_id, min(received_at) AS t FROM sitesync_receipts GROUP BY event_id \
                                HAVING min(received_at) < now() - make_interval(secs => $2)) \
                 SELECT s.site, count(*), extract(epoch FROM now() - min(f.t))::float8 \
                 FROM first f CROSS JOIN unnest($1::text[]) AS s(site) \
                 WHERE NOT EXISTS (SELECT 1 FROM sitesync_receipts r WHERE r.event_id = f.event_id AND r.site = s.site) \
                 AND EXISTS (SELECT 1 FROM sitesync_receipts x WHERE x.site = s.site) \
                 GROUP BY s.site ORDER BY s.site",
                &[&sites, &(older_than_s as f64)],
            )
            .await
            .map_err(|e| transient("reading sitesync_receipts", e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64, r.get(2)))
            .collect())
    }

    async fn mark_gaps(&mut self, ids: &[i64], mark: GapMark<'_>) -> Result<(), TargetError> {
        self.end_leftover()
            .await
            .map_err(|e| transient("ending an unfinished batch", e))?;
        let done = match mark {
            GapMark::Requested => {
                self.client
                    .execute(
                        "UPDATE sitesync_gaps SET requested_at = now() WHERE id = ANY($1)",
                        &[&ids],
                    )
                    .await
            }
            GapMark::RequestedAnew => self
                .client
                .execute(
                    "UPDATE sitesync_gaps SET requested_at = now(), note = NULL WHERE id = ANY($1)",
                    &[&ids],
                )
                .await,
            GapMark::Note(note) => {
                self.client
                    .execute(
                        "UPDATE sitesync_gaps SET note = $2 WHERE id = ANY($1)",
                        &[&ids, &note],
                    )
                    .await
            }
        };
        done.map(|_| ()).map_err(|e| transient("marking gaps", e))
    }
}

/// Of this site's writes whose events came back, those the row does not
/// hold because the sink overwrote them: the row was last written by the
/// sink transaction that recorded the entity's current version (same
/// `xmin`), or an upsert's row is gone. A row the application changed since
/// (other columns, a trigger, constants of the route) is left alone.
async fn rows_not_as_written<'a>(
    tx: &Client,
    writes: &[Write<'a>],
) -> Result<Vec<Write<'a>>, Failed> {
    let mut astray = Vec::new();
    for (route, row) in writes {
        let t = quote_table(&route.table);
        let matches = route
            .key
            .iter()
            .map(|k| format!("t.{q} = x.{q}", q = quote(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let by_sink = format!(
            "EXISTS (SELECT 1 FROM {t} t JOIN jsonb_populate_recordset(NULL::{t}, $1::jsonb) x ON {matches} \
             JOIN sitesync_versions v ON v.entity = $2 AND v.key = $3 WHERE t.xmin = v.xmin)"
        );
        let sql = if route.operation == Operation::Delete {
            format!("SELECT {by_sink}")
        } else {
            format!(
                "SELECT {by_sink} OR NOT EXISTS (SELECT 1 FROM {t} t JOIN jsonb_populate_recordset(NULL::{t}, $1::jsonb) x ON {matches})"
            )
        };
        let json = Value::Array(vec![Value::Object(row.columns.clone())]);
        let differs: bool = tx
            .query_one(&sql, &[&json, &row.entity.table, &row.entity.key])
            .await
            .map_err(|e| failed(&format!("checking {}", route.table), e))?
            .get(0);
        if differs {
            astray.push((*route, *row));
        }
    }
    Ok(astray)
}

/// The settings of every batch transaction, sent in one round trip:
///
/// - the marker that application triggers test;
/// - `lock_timeout`, how long the sink waits for an application holding a
///   row before it backs off: 250 ms, well under the server's
///   `deadlock_timeout`, so that it is the sink that yields; for the whole
///   transaction, since a write can wait on an application too (its insert
///   of the same new key), and must yield as well;
/// - no hash or merge joins. Every statement of the sink reaches rows by
///   key: the batch's keys (an `unnest` or `jsonb_populate_recordset` of a
///   few hundred rows) joined to a table that can hold millions. The
///   planner, misled by statistics that lag behind tables growing as fast
///   as `sitesync_versions` and `sitesync_inbox` do, chose hash joins over
///   a sequential scan of the whole table, which made each batch cost in
///   proportion to the table (measured: 20 ms per batch at 13,000 versions,
///   growing). Nested loops over the key's index cost in proportion to the
///   batch. The settings end with the transaction; application triggers
///   fired by the sink's writes run under them too.
const BATCH_SETTINGS: &str = "SET LOCAL sitesync.applying = 'on'; \
     SET LOCAL lock_timeout = '250ms'; \
     SET LOCAL enable_hashjoin = off; \
     SET LOCAL enable_mergejoin = off";

/// Locks those of `rows` that exist (`FOR UPDATE`), waiting at most
/// `lock_timeout` (see [`BATCH_SETTINGS`]) for an application holding one:
/// then the sink yields (the batch is tried again a moment later) rather
/// than make the application wait on it in turn, or deadlock with it.
async fn lock_rows(tx: &Client, p: &Prepared, rows: &[Write<'_>]) -> Result<(), Failed> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut by_table: BTreeMap<&str, (&Route, Vec<Value>)> = BTreeMap::new();
    for (route, row) in rows {
        let keys: serde_json::Map<String, Value> = route
            .key
            .iter()
            .filter_map(|k| row.columns.get(k).map(|v| (k.clone(), v.clone())))
            .collect();
        by_table
            .entry(route.table.as_str())
            .or_insert_with(|| (*route, Vec::new()))
            .1
            .push(Value::Object(keys));
    }
    for (table, (route, keys)) in by_table {
        let t = quote_table(table);
        let matches = route
            .key
            .iter()
            .map(|k| format!("t.{q} = x.{q}", q = quote(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        p.query(tx,
            &format!("SELECT 1 FROM {t} t JOIN jsonb_populate_recordset(NULL::{t}, $1::jsonb) x ON {matches} FOR UPDATE OF t"),
            &[&Value::Array(keys)],
        )
        .await
        .map_err(|e| failed("locking the batch's rows", e))?;
    }
    Ok(())
}

/// Inserts inbox rows; returns the events that are new (or come back from
/// the dead-letter queue).
///
/// Most batches hold no event seen before, and a plain INSERT costs the
/// server much less than `ON CONFLICT` (speculative insertion: one more
/// index probe and one more WAL record per row, which every walsender then
/// decodes). So unless `careful`, the plain one runs and a redelivered event
/// fails it with a unique violation ([`Failed::Seen`]): the batch is then
/// applied again, carefully, the events the inbox holds found and skipped.
async fn insert_inbox<C: GenericClient + Sync>(
    tx: &C,
    p: &Prepared,
    events: &[(&Event, &'static str)],
    careful: bool,
) -> Result<HashSet<Uuid>, Failed> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<Uuid> = events.iter().map(|(e, _)| e.id).collect();
    let origins: Vec<&str> = events.iter().map(|(e, _)| e.origin.as_str()).collect();
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.kind.as_str()).collect();
    let epochs: Vec<i64> = events.iter().map(|(e, _)| e.epoch as i64).collect();
    let seqs: Vec<i64> = events.iter().map(|(e, _)| e.seq as i64).collect();
    let outcomes: Vec<&str> = events.iter().map(|(_, o)| *o).collect();
    const INSERT: &str = "INSERT INTO sitesync_inbox (event_id, origin, type, epoch, seq, outcome) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::text[])";
    let params: [&(dyn ToSql + Sync); 6] = [&ids, &origins, &kinds, &epochs, &seqs, &outcomes];
    if !careful {
        return match p.execute(tx, INSERT, &params).await {
            Ok(_) => Ok(ids.into_iter().collect()),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                Err(Failed::Seen)
            }
            Err(e) => Err(failed("writing the inbox", e)),
        };
    }
    let rows = p
        .query(
            tx,
            &format!(
                "{INSERT} ON CONFLICT (event_id) DO UPDATE SET outcome = EXCLUDED.outcome, received_at = now(), applied_at = now() \
                 WHERE sitesync_inbox.outcome = 'dead_letter' \
                 RETURNING event_id"
            ),
            &params,
        )
        .await
        .map_err(|e| failed("writing the inbox", e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Each origin's progress, read and locked (`FOR UPDATE`) for the batch.
async fn read_origins(tx: &Client, p: &Prepared, origins: &[&str]) -> Result<Origins, Failed> {
    if origins.is_empty() {
        return Ok(Origins::new());
    }
    let rows = p
        .query(
            tx,
            "SELECT origin, epoch, seq FROM sitesync_origins WHERE origin = ANY($1) FOR UPDATE",
            &[&origins],
        )
        .await
        .map_err(|e| failed("reading origin progress", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let (o, e, s): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
            (o, (e as u64, s as u64))
        })
        .collect())
}

/// Moves the origins' progress: read (and locked), advanced over the
/// batch, the changes and gaps written.
async fn progress(tx: &Client, p: &Prepared, start: &Start<'_>) -> Result<(), Failed> {
    let mut state = read_origins(tx, p, start.origins).await?;
    let moved = batch::advance(&mut state, start.seen);
    write_progress(tx, p, &moved).await?;
    shrink_gaps(tx, p, &moved.late).await
}

/// Takes late arrivals out of the gaps recorded before ([`rules::shrink`]):
/// the rows they touch are read under lock, then shrunk, split or deleted.
async fn shrink_gaps(tx: &Client, p: &Prepared, late: &[LateArrivals]) -> Result<(), Failed> {
    for l in late {
        let rows = p
            .query(
                tx,
                "SELECT id, from_seq, to_seq FROM sitesync_gaps \
                 WHERE origin = $1 AND epoch = $2 AND from_seq <= $4 AND to_seq >= $3 ORDER BY id FOR UPDATE",
                &[&l.origin, &(l.epoch as i64), &(l.low as i64), &(l.high as i64)],
            )
            .await
            .map_err(|e| failed("reading the gaps late events fall in", e))?;
        let rows: Vec<GapRow> = rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0),
                    r.get::<_, i64>(1) as u64,
                    r.get::<_, i64>(2) as u64,
                )
            })
            .collect();
        for (id, pieces) in rules::shrink(&rows, &l.seqs) {
            let Some(((from, to), rest)) = pieces.split_first() else {
                p.execute(tx, "DELETE FROM sitesync_gaps WHERE id = $1", &[&id])
                    .await
                    .map_err(|e| failed("closing a gap", e))?;
                continue;
            };
            p.execute(
                tx,
                "UPDATE sitesync_gaps SET from_seq = $2, to_seq = $3 WHERE id = $1",
                &[&id, &(*from as i64), &(*to as i64)],
            )
            .await
            .map_err(|e| failed("shrinking a gap", e))?;
            for (from, to) in rest {
                p.execute(
                    tx,
                    "INSERT INTO sitesync_gaps (origin, epoch, from_seq, to_seq, detected_at, requested_at, note) \
                     SELECT origin, epoch, $2, $3, detected_at, requested_at, note FROM sitesync_gaps WHERE id = $1",
                    &[&id, &(*from as i64), &(*to as i64)],
                )
                .await
                .map_err(|e| failed("splitting a gap", e))?;
            }
        }
    }
    Ok(())
}

/// The origins' new progress and the gaps found.
async fn write_progress(tx: &Client, p: &Prepared, moved: &Progress) -> Result<(), Failed> {
    let (changed, gaps) = (&moved.changed, &moved.gaps);
    if !changed.is_empty() {
        let o: Vec<&str> = changed.iter().map(|(o, ..)| o.as_str()).collect();
        let e: Vec<i64> = changed.iter().map(|(_, e, _)| *e as i64).collect();
        let s: Vec<i64> = changed.iter().map(|(.., s)| *s as i64).collect();
        p.execute(tx,
            "INSERT INTO sitesync_origins (origin, epoch, seq) SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[]) \
             ON CONFLICT (origin) DO UPDATE SET epoch = EXCLUDED.epoch, seq = EXCLUDED.seq, updated_at = now()",
            &[&o, &e, &s],
        )
        .await
        .map_err(|e| failed("writing origin progress", e))?;
    }
    if !gaps.is_empty() {
        let o: Vec<&str> = gaps.iter().map(|g| g.origin.as_str()).collect();
        let e: Vec<i64> = gaps.iter().map(|g| g.epoch as i64).collect();
        let f: Vec<i64> = gaps.iter().map(|g| g.from as i64).collect();
        let t: Vec<i64> = gaps.iter().map(|g| g.to as i64).collect();
        p.execute(tx,
            "INSERT INTO sitesync_gaps (origin, epoch, from_seq, to_seq) SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[])",
            &[&o, &e, &f, &t],
        )
        .await
        .map_err(|e| failed("recording gaps", e))?;
    }
    Ok(())
}

/// Marks events that lost to a newer write.
async fn mark_lost(tx: &Client, p: &Prepared, lost: &[Uuid]) -> Result<(), Failed> {
    if lost.is_empty() {
        return Ok(());
    }
    p.execute(
        tx,
        "UPDATE sitesync_inbox SET outcome = 'lost' WHERE event_id = ANY($1)",
        &[&lost],
    )
    .await
    .map(|_| ())
    .map_err(|e| failed("recording lost events", e))
}

/// Pauses before looking again for outbox rows of events that came back
/// but that this transaction cannot see yet (63 ms in all).
const OWN_ROW_WAITS_MS: [u64; 6] = [1, 2, 4, 8, 16, 32];

/// Deletes this site's outbox rows whose events came back round.
///
/// An event can come back before its own transaction is visible here:
/// PostgreSQL flushes a commit to the WAL, where the walsender may decode
/// and send it, before it removes the transaction from the running set, and
/// on a busy machine that gap can outlast a broker round trip. A row not
/// found is therefore looked for again a few times, each statement with a
/// fresh snapshot (READ COMMITTED), before it counts as already gone
/// (deleted by hand). Without this, a row could stay in the outbox for good.
async fn delete_own(
    tx: &Client,
    p: &Prepared,
    shape: &OutboxShape,
    ids: &[Uuid],
) -> Result<(), Failed> {
    let mut missing: Vec<Uuid> = ids.to_vec();
    for wait in std::iter::once(0).chain(OWN_ROW_WAITS_MS) {
        if missing.is_empty() {
            return Ok(());
        }
        if wait > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
        }
        let deleted: HashSet<Uuid> = if shape.uuid_id {
            p.query(
                tx,
                &format!(
                    "DELETE FROM {} WHERE id = ANY($1) RETURNING id",
                    shape.table
                ),
                &[&missing],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        } else {
            let text: Vec<String> = missing.iter().map(Uuid::to_string).collect();
            p.query(
                tx,
                &format!(
                    "DELETE FROM {} WHERE id::text = ANY($1) RETURNING id::text",
                    shape.table
                ),
                &[&text],
            )
            .await
            .map(|rows| {
                rows.iter()
                    .filter_map(|r| Uuid::parse_str(r.get::<_, &str>(0)).ok())
                    .collect()
            })
        }
        .map_err(|e| failed("deleting outbox rows that came back", e))?;
        missing.retain(|id| !deleted.contains(id));
    }
    // Already gone (deleted by hand), or still not visible: the idle sweep
    // deletes the latter once they are.
    tracing::info!(
        ids = ?missing,
        "outbox rows of events that came back were not found"
    );
    Ok(())
}

async fn load_versions<C: GenericClient + Sync>(
    tx: &C,
    p: &Prepared,
    entities: &[&Entity],
) -> Result<Stored, Failed> {
    if entities.is_empty() {
        return Ok(Stored::new());
    }
    let tables: Vec<&str> = entities.iter().map(|e| e.table.as_str()).collect();
    let keys: Vec<&str> = entities.iter().map(|e| e.key.as_str()).collect();
    let rows = p.query(tx,
            "SELECT v.entity, v.key, v.ts, v.origin, v.event_id FROM sitesync_versions v \
             JOIN unnest($1::text[], $2::text[]) AS w(entity, key) ON v.entity = w.entity AND v.key = w.key",
            &[&tables, &keys],
        )
        .await
        .map_err(|e| failed("reading entity versions", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                Entity {
                    table: r.get(0),
                    key: r.get(1),
                },
                (
                    Version {
                        ts: r.get(2),
                        origin: r.get(3),
                    },
                    r.get(4),
                ),
            )
        })
        .collect())
}

/// Moves the entities' versions. `stored`: what this transaction read of
/// them ([`load_versions`]). An entity without one gets a plain INSERT (a
/// fraction of the cost of `ON CONFLICT`, see [`insert_inbox`]): the sink
/// is the table's only writer, and should a second one have written it
/// meanwhile, the unique violation fails the batch into one message at a
/// time, where the lookup runs again.
async fn upsert_versions<C: GenericClient + Sync>(
    tx: &C,
    p: &Prepared,
    versions: &[(Entity, Version, Uuid)],
    stored: &Stored,
) -> Result<(), Failed> {
    let (known, new): (Vec<_>, Vec<_>) = versions
        .iter()
        .partition(|(entity, ..)| stored.contains_key(entity));
    if !new.is_empty() {
        let (tables, keys, ts, origins, ids) = version_columns(&new);
        p.execute(
            tx,
            "INSERT INTO sitesync_versions (entity, key, ts, origin, event_id) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::uuid[])",
            &[&tables, &keys, &ts, &origins, &ids],
        )
        .await
        .map_err(|e| failed("writing entity versions", e))?;
    }
    if !known.is_empty() {
        let (tables, keys, ts, origins, ids) = version_columns(&known);
        p.execute(
            tx,
            "UPDATE sitesync_versions v SET ts = w.ts, origin = w.origin, event_id = w.event_id \
             FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::uuid[]) AS w(entity, key, ts, origin, event_id) \
             WHERE v.entity = w.entity AND v.key = w.key AND (w.ts, w.origin) > (v.ts, v.origin)",
            &[&tables, &keys, &ts, &origins, &ids],
        )
        .await
        .map_err(|e| failed("writing entity versions", e))?;
    }
    Ok(())
}

type VersionColumns<'a> = (
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<DateTime<Utc>>,
    Vec<&'a str>,
    Vec<Uuid>,
);

/// Entity versions as the columns of an `unnest`.
fn version_columns<'a>(versions: &[&'a (Entity, Version, Uuid)]) -> VersionColumns<'a> {
    (
        versions.iter().map(|(e, ..)| e.table.as_str()).collect(),
        versions.iter().map(|(e, ..)| e.key.as_str()).collect(),
        versions.iter().map(|(_, v, _)| v.ts).collect(),
        versions.iter().map(|(_, v, _)| v.origin.as_str()).collect(),
        versions.iter().map(|(.., id)| *id).collect(),
    )
}

async fn insert_conflicts<C: GenericClient + Sync>(
    tx: &C,
    p: &Prepared,
    conflicts: &[Conflict],
) -> Result<(), Failed> {
    if conflicts.is_empty() {
        return Ok(());
    }
    let losers: Vec<Uuid> = conflicts.iter().map(|c| c.loser).collect();
    let entities: Vec<&str> = conflicts.iter().map(|c| c.entity.table.as_str()).collect();
    let keys: Vec<&str> = conflicts.iter().map(|c| c.entity.key.as_str()).collect();
    let loser_origins: Vec<&str> = conflicts
        .iter()
        .map(|c| c.loser_version.origin.as_str())
        .collect();
    let loser_ts: Vec<DateTime<Utc>> = conflicts.iter().map(|c| c.loser_version.ts).collect();
    let payloads: Vec<&Value> = conflicts.iter().map(|c| &c.loser_payload).collect();
    let winners: Vec<Uuid> = conflicts.iter().map(|c| c.winner).collect();
    let winner_origins: Vec<&str> = conflicts
        .iter()
        .map(|c| c.winner_version.origin.as_str())
        .collect();
    let winner_ts: Vec<DateTime<Utc>> = conflicts.iter().map(|c| c.winner_version.ts).collect();
    p.execute(tx,
        "INSERT INTO sitesync_conflicts (loser_event_id, entity, key, loser_origin, loser_ts, loser_payload, winner_event_id, winner_origin, winner_ts) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[], $7::uuid[], $8::text[], $9::timestamptz[]) \
         ON CONFLICT (loser_event_id) DO NOTHING",
        &[&losers, &entities, &keys, &loser_origins, &loser_ts, &payloads, &winners, &winner_origins, &winner_ts],
    )
    .await
    .map_err(|e| failed("recording conflicts", e))?;
    Ok(())
}

/// Executes one wave of writes (each entity at most once): one statement
/// per table, operation and column set.
async fn write_wave<C: GenericClient + Sync>(
    tx: &C,
    p: &Prepared,
    wave: &[Write<'_>],
) -> Result<(), Failed> {
    let groups = batch::statements(wave);
    let mut statements = Vec::with_capacity(groups.len());
    for ((table, upsert, cols), (route, rows)) in groups {
        let table_q = quote_table(table);
        let col_list = cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
        let keys = route
            .key
            .iter()
            .map(|k| quote(k))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = if upsert {
            let updates: Vec<String> = cols
                .iter()
                .filter(|c| !route.key.iter().any(|k| k == *c))
                .map(|c| format!("{q} = EXCLUDED.{q}", q = quote(c)))
                .collect();
            let on_conflict = if updates.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            };
            format!(
                "INSERT INTO {table_q} ({col_list}) SELECT {col_list} FROM jsonb_populate_recordset(NULL::{table_q}, $1::jsonb) \
                 ON CONFLICT ({keys}) {on_conflict}"
            )
        } else {
            let matches = route
                .key
                .iter()
                .map(|k| format!("t.{q} = x.{q}", q = quote(k)))
                .collect::<Vec<_>>()
                .join(" AND ");
            format!(
                "DELETE FROM {table_q} t USING jsonb_populate_recordset(NULL::{table_q}, $1::jsonb) x WHERE {matches}"
            )
        };
        statements.push((table, sql, rows));
    }
    // Every statement of the wave in one round trip (each entity is in one
    // of them only); the first error in order is the cause.
    // The rows are serialised straight from the events' columns.
    let json: Vec<Json<&Vec<&serde_json::Map<String, Value>>>> =
        statements.iter().map(|(.., rows)| Json(rows)).collect();
    let params: Vec<[&(dyn ToSql + Sync); 1]> =
        json.iter().map(|j| [j as &(dyn ToSql + Sync)]).collect();
    let results = futures_util::future::join_all(
        statements
            .iter()
            .zip(&params)
            .map(|((_, sql, _), params)| p.execute(tx, sql, params)),
    )
    .await;
    for ((table, ..), result) in statements.iter().zip(results) {
        result.map_err(|e| failed(&format!("writing {table}"), e))?;
    }
    Ok(())
}

/// Whether a route's table exists with the columns it writes and, for an
/// upsert, a unique index on exactly its key columns (`ON CONFLICT` needs it).
async fn route_check(client: &Client, route: &Route) -> Check {
    let name = format!("route {}", route.kind);
    let table = quote_table(&route.table);
    let found = client
        .query_opt(
            "SELECT array(SELECT attname::text FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped), \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique AND i.indpred IS NULL \
                            AND (SELECT array_agg(attname::text ORDER BY attname::text) FROM pg_attribute \
                                 WHERE attrelid = c.oid AND attnum = ANY (i.indkey)) = (SELECT array_agg(k ORDER BY k) FROM unnest($2::text[]) k)) \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&table, &route.key],
        )
        .await;
    let row = match found {
        Err(e) => {
            return Check::fail(
                name,
                format!("{}: {e}", route.table),
                "check the table name",
            );
        }
        Ok(None) => {
            return Check::fail(
                name,
                format!("table {} does not exist", route.table),
                "create the table, or fix `table` in the route",
            );
        }
        Ok(Some(row)) => row,
    };
    let (columns, unique): (Vec<String>, bool) = (row.get(0), row.get(1));
    if let Some(missing) = route_missing_columns(&name, route, |c| columns.iter().any(|t| t == c)) {
        return missing;
    }
    if route.operation == Operation::Upsert && !unique {
        return route_without_unique_key(
            &name,
            route,
            format!(
                "CREATE UNIQUE INDEX ON {table} ({}); or make `key` the primary key",
                route
                    .key
                    .iter()
                    .map(|k| quote(k))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    route_ready(&name, route)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_quoted() {
        assert_eq!(quote_table("public.customer"), "\"public\".\"customer\"");
        assert_eq!(quote_table("t"), "\"t\"");
    }
}
