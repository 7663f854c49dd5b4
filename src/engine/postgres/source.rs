//! PostgreSQL source: logical replication with pgoutput.
//!
//! - The replication connection is pgwire-replication's: it issues
//!   `START_REPLICATION SLOT … LOGICAL … (proto_version '1',
//!   publication_names '…')`, answers keepalives that ask for a reply, and
//!   sends standby status updates carrying the LSN we report through
//!   [`ChangeStream::durable`] — only what the sled checkpoint holds durably.
//! - We decode Relation and Insert ourselves ([`super::pgoutput`]).
//! - Every other query (preflight, init, slot bounds) goes through
//!   tokio-postgres on an ordinary connection. The outbox table itself is
//!   never SELECTed.
//!
//! Positions: a row's position is `(commit LSN, index in its transaction)`;
//! after a commit the resume point is `(commit end LSN, 0)`. The flush LSN
//! reported to the server is the resume point's LSN, so a transaction that
//! was only partly confirmed is streamed again on restart (its commit record
//! starts exactly at that LSN and the walsender skips only commits that start
//! before it), and the stream skips the rows already done.
//!
//! While idle, the walsender pings us with its sent-up-to LSN once it is past
//! what we acknowledged; with no transaction open, every commit before that
//! LSN has been streamed, so it becomes a heartbeat position and the slot
//! keeps moving instead of retaining WAL written by other tables.

use super::pgoutput::{self, Column, PgOutput};
use super::position::{Position, format_lsn, parse_lsn};
use super::settings::Settings;
use crate::checks::Check;
use crate::config::{ConnectorConfig, redact_url};
use crate::error::{Cause, ErrorKind, SourceError};
use crate::event::{OutboxRow, RowError};
use crate::position::LogPosition;
use crate::source::{Change, ChangeStream, LogBounds, Source};
use chrono::{DateTime, Utc};
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use std::collections::HashMap;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;

/// The oldest server pgwire-replication supports.
const MIN_SERVER_VERSION: i32 = 140000;

pub struct PostgresSource {
    cfg: Settings,
    /// Site name: the default `origin` of the outbox table `init` creates.
    site: String,
    /// Shown as `application_name` in `pg_stat_replication`.
    application_name: String,
    pg: tokio_postgres::Config,
}

/// Quotes an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The outbox's id default: a UUID of version 7 (RFC 9562), its first 48
/// bits the Unix time in milliseconds, then the version, then random bits.
/// Ids in time order keep each primary key that holds them (the outbox's,
/// every site's inbox's) growing at its right edge: a random UUID lands on
/// any page of the index, which costs the inbox insert a quarter more at a
/// few hundred thousand rows already, and a page read per row once the
/// index outgrows memory (the inbox keeps every event). PostgreSQL 18 has
/// `uuidv7()`; this works from 13 on, on `gen_random_uuid()`: its first six
/// bytes replaced by the time, and the version bits (bits 4 and 5 of byte
/// 6, counted from the least significant) set to turn 4 into 7.
fn uuid7_function(schema: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {}.sitesync_uuid7() RETURNS uuid LANGUAGE sql VOLATILE PARALLEL SAFE AS \
         $uuid7$ SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) \
         PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3) FROM 1 FOR 6), \
         52, 1), 53, 1), 'hex')::uuid $uuid7$;",
        ident(schema)
    )
}

/// Runs one statement (or a batch) for `init`.
async fn exec(
    client: &tokio_postgres::Client,
    sql: &str,
    context: &str,
) -> Result<(), SourceError> {
    client
        .batch_execute(sql)
        .await
        .map_err(|e| query_error(context, e))
}

/// Classifies a tokio-postgres error.
fn query_error(context: &str, e: tokio_postgres::Error) -> SourceError {
    let transient = match e.code() {
        None => true, // I/O: refused, reset, closed
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("57")
                || c.starts_with("53")
                || c.starts_with("40")
                || *code == SqlState::OBJECT_IN_USE
        }
    };
    let detail = match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    let message = format!("{context}: {detail}");
    let cause = match e.code() {
        None => Cause::Unreachable,
        Some(code) => sqlstate_cause(code.code(), &detail),
    };
    if transient {
        SourceError::transient(cause, message)
    } else {
        SourceError::operator(cause, message)
    }
}

/// What a SQLSTATE says went wrong.
fn sqlstate_cause(code: &str, message: &str) -> Cause {
    match code {
        "42501" => Cause::PermissionDenied,
        "42P01" | "42704" | "3D000" => Cause::NotInitialised,
        "55006" => Cause::Busy,
        "55000" if message.contains("is active") => Cause::Busy,
        "55000" if message.contains("wal_level") => Cause::ServerSettings,
        "58P01" => Cause::LogPurged,
        c if c.starts_with("08") || c.starts_with("57") => Cause::Unreachable,
        c if c.starts_with("28") => Cause::AuthRefused,
        c if c.starts_with("40") => Cause::Busy,
        c if c.starts_with("53") => Cause::Limit,
        _ => Cause::Query,
    }
}

/// Classifies a replication-connection error.
fn replication_error(e: PgWireError, slot: &str) -> SourceError {
    match &e {
        PgWireError::Server(msg) => {
            let code = msg
                .rsplit_once("(SQLSTATE ")
                .map(|(_, c)| c.trim_end_matches(')').to_string())
                .unwrap_or_default();
            let transient = code.starts_with("08")
                || code.starts_with("57")
                || code.starts_with("53")
                || code == "55006"
                || code == "55000" && msg.contains("is active");
            if code == "42704" && msg.contains("publication") {
                SourceError::operator(
                    Cause::NotInitialised,
                    format!("the publication is missing: {msg}. Run `sitesync init` to create it"),
                )
            } else if code == "42704" {
                SourceError::operator(
                    Cause::NotInitialised,
                    format!(
                        "replication slot `{slot}` is missing: {msg}. Run `sitesync init` to create it (events written before it exists are not in the stream)"
                    ),
                )
            } else if transient {
                SourceError::transient(
                    sqlstate_cause(&code, msg),
                    format!("replication connection: {msg}"),
                )
            } else {
                SourceError::operator(
                    sqlstate_cause(&code, msg),
                    format!("replication connection refused by the server: {msg}"),
                )
            }
        }
        PgWireError::Auth(msg) => SourceError::operator(
            Cause::AuthRefused,
            format!("replication connection: authentication failed: {msg}"),
        ),
        _ => SourceError::transient(Cause::Unreachable, format!("replication connection: {e}")),
    }
}

impl PostgresSource {
    pub fn new(connector: &ConnectorConfig, db: &Settings) -> Result<PostgresSource, SourceError> {
        let pg: tokio_postgres::Config = db.url.parse().map_err(|e| {
            SourceError::operator(
                Cause::Config,
                format!(
                    "database.url `{}` is not a PostgreSQL URL: {e}",
                    redact_url(&db.url)
                ),
            )
        })?;
        Ok(PostgresSource {
            cfg: db.clone(),
            site: connector.site.clone(),
            application_name: format!("sitesync-{}", connector.name),
            pg,
        })
    }

    /// An ordinary (non-replication) connection.
    pub async fn client(&self) -> Result<tokio_postgres::Client, SourceError> {
        let (client, connection) =
            self.pg.connect(tokio_postgres::NoTls).await.map_err(|e| {
                query_error(&format!("connecting to {}", redact_url(&self.cfg.url)), e)
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres query connection ended");
            }
        });
        Ok(client)
    }

    fn outbox_sql_name(&self) -> String {
        let (schema, table) = self.cfg.outbox_parts();
        format!("{}.{}", ident(schema), ident(table))
    }

    fn replication_config(
        &self,
        start: Lsn,
        ack: Option<Lsn>,
    ) -> Result<ReplicationConfig, SourceError> {
        let host = match self.pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => {
                return Err(SourceError::operator(
                    Cause::Config,
                    "database.url names no host",
                ));
            }
        };
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        let user = self.pg.get_user().unwrap_or("postgres").to_string();
        let password = self
            .pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let dbname = self.pg.get_dbname().unwrap_or(&user).to_string();
        let mut cfg = ReplicationConfig::new(
            host,
            user,
            password,
            dbname,
            self.cfg.slot.clone(),
            self.cfg.publication.clone(),
        )
        .with_port(port)
        .with_tls(TlsConfig::disabled())
        .with_start_lsn(start)
        .with_status_interval(self.cfg.status_interval)
        .with_wakeup_interval(self.cfg.status_interval)
        // Bounded: with the publisher's window this caps what a huge
        // transaction can hold in memory.
        .with_buffer_size(1024)
        // Timestamps in the stream come out in UTC ISO form.
        .with_options("-c TimeZone=UTC -c DateStyle=ISO,YMD")
        .with_application_name(self.application_name.clone());
        if let Some(ack) = ack {
            cfg = cfg.with_ack_lsn(ack);
        }
        Ok(cfg)
    }

    /// Says clearly what is wrong before streaming: the slot is missing,
    /// lost, or ahead of the checkpoint (the server would then start at its
    /// own position, past rows the checkpoint has not seen), or the server's
    /// WAL is behind the checkpoint (a restore or a failover).
    async fn check_slot_before_streaming(&self, start: Lsn) -> Result<(), SourceError> {
        let client = self.client().await?;
        let Some(row) = self.slot_row(&client).await? else {
            return Err(SourceError::operator(
                Cause::NotInitialised,
                format!(
                    "replication slot `{}` is missing: run `sitesync init` to create it (outbox rows committed before it exists are not in the stream)",
                    self.cfg.slot
                ),
            ));
        };
        let wal_status: Option<String> = row.get(5);
        if wal_status.as_deref() == Some("lost") {
            return Err(SourceError::operator(
                Cause::LogPurged,
                format!(
                    "replication slot `{}` lost the WAL it needed (wal_status = lost): outbox rows were lost at the source. Drop and recreate the slot (`sitesync init`), reset the checkpoint (`sitesync checkpoint reset --to-start`), and resynchronise the other sites from the archive",
                    self.cfg.slot
                ),
            ));
        }
        let confirmed: Option<String> = row.get(2);
        if let Some(confirmed) = confirmed.as_deref().and_then(|t| parse_lsn(t).ok())
            && start != Lsn::ZERO
            && confirmed > start.as_u64()
        {
            // The slot only moves after our checkpoint is durable, so this
            // means the slot was recreated or advanced by someone else, or
            // the checkpoint store was restored from an older copy (or
            // damaged with its witness: see `checkpoint`). The
            // server would silently start at the slot's position.
            return Err(SourceError::operator(
                Cause::LogPurged,
                format!(
                    "replication slot `{}` is at {} but the checkpoint is at {}: PostgreSQL would start at the slot and skip what lies between                  (was the slot recreated, advanced by another tool, or the checkpoint store restored from an older copy, or damaged so that it fell back to an older record?).                  If skipping is acceptable, run `sitesync checkpoint reset --to-start`; otherwise resynchronise the sites from the archive first",
                    self.cfg.slot,
                    format_lsn(confirmed),
                    format_lsn(start.as_u64())
                ),
            ));
        }
        let current: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| query_error("reading pg_current_wal_lsn()", e))?
            .get(0);
        let current = parse_lsn(&current).map_err(|e| SourceError::operator(Cause::Query, e))?;
        if current < start.as_u64() {
            return Err(SourceError::operator(
                Cause::LogPurged,
                format!(
                    "the server's WAL ends at {} but the checkpoint is at {}: this is not the server the checkpoint was written against                  (restored to an earlier point, or failed over to a replica that lags). New commits below the checkpoint would be skipped.                  Reset the checkpoint (`sitesync checkpoint reset --to-start`) once you know which events the other sites have",
                    format_lsn(current),
                    format_lsn(start.as_u64())
                ),
            ));
        }
        Ok(())
    }

    async fn slot_row(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<Option<tokio_postgres::Row>, SourceError> {
        client
            .query_opt(
                "SELECT plugin, database, confirmed_flush_lsn::text, restart_lsn::text, active_pid, wal_status, slot_type \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.cfg.slot],
            )
            .await
            .map_err(|e| query_error("reading pg_replication_slots", e))
    }
}

/// Column positions of the outbox fields in a relation.
#[derive(Debug, Clone, Default)]
struct ColumnMap {
    id: Option<usize>,
    created_at: Option<usize>,
    origin: Option<usize>,
    kind: Option<usize>,
    entity_key: Option<usize>,
    data: Option<usize>,
}

impl ColumnMap {
    fn new(columns: &[String]) -> ColumnMap {
        let find = |name: &str| columns.iter().position(|c| c == name);
        ColumnMap {
            id: find("id"),
            created_at: find("created_at"),
            origin: find("origin"),
            kind: find("type"),
            entity_key: find("entity_key"),
            data: find("data"),
        }
    }

    fn row(
        &self,
        tuple: &[Column],
        commit_time: Option<DateTime<Utc>>,
    ) -> Result<OutboxRow, RowError> {
        let get = |i: Option<usize>| -> Result<Option<String>, RowError> {
            match i.and_then(|i| tuple.get(i)) {
                None | Some(Column::Null) => Ok(None),
                Some(Column::Text(b)) => String::from_utf8(b.to_vec())
                    .map(Some)
                    .map_err(|_| RowError::Undecodable("a column is not valid UTF-8".into())),
                Some(Column::Unchanged) => Err(RowError::Undecodable(
                    "an INSERT carried an unchanged-TOAST marker".into(),
                )),
                Some(Column::Binary(_)) => Err(RowError::Undecodable(
                    "a column arrived in binary format".into(),
                )),
            }
        };
        Ok(OutboxRow {
            id: get(self.id)?,
            created_at: get(self.created_at)?,
            origin: get(self.origin)?,
            kind: get(self.kind)?,
            entity_key: get(self.entity_key)?,
            data: get(self.data)?,
            commit_time,
        })
    }
}

/// PostgreSQL timestamps count microseconds from 2000-01-01.
fn pg_time(micros: i64) -> Option<DateTime<Utc>> {
    const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
    DateTime::from_timestamp_micros(micros.checked_add(PG_EPOCH_UNIX_MICROS)?)
}

struct OpenTx {
    commit_lsn: u64,
    next_index: u32,
    commit_time: Option<DateTime<Utc>>,
}

/// Turns pgoutput messages into [`Change`]s. Kept apart from the connection
/// so it can be driven by recorded messages in unit tests.
struct Decoder {
    outbox: (String, String),
    /// Relation id → the outbox's column map, or `None` for another table.
    relations: HashMap<u32, Option<ColumnMap>>,
    tx: Option<OpenTx>,
    /// Rows before this position were done in an earlier session.
    skip_before: Option<Position>,
    /// The last resume point yielded: heartbeats never go backward.
    last: Option<Position>,
}

impl Decoder {
    fn new(outbox: (String, String), resume: Option<Position>) -> Decoder {
        Decoder {
            outbox,
            relations: HashMap::new(),
            tx: None,
            skip_before: resume.clone(),
            last: resume,
        }
    }

    fn ahead(&self, p: &Position) -> bool {
        match &self.last {
            None => true,
            Some(last) => p > last,
        }
    }

    /// One replication event in, at most one change out.
    fn feed(&mut self, ev: ReplicationEvent) -> Result<Option<Change<Position>>, SourceError> {
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                self.tx = Some(OpenTx {
                    commit_lsn: final_lsn.as_u64(),
                    next_index: 0,
                    commit_time: pg_time(commit_time_micros),
                });
                Ok(None)
            }
            ReplicationEvent::XLogData { data, .. } => self.xlog(data),
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.tx = None;
                let resume = Position {
                    lsn: end_lsn.as_u64(),
                    index: 0,
                };
                if self.ahead(&resume) {
                    self.last = Some(resume.clone());
                    Ok(Some(Change::Commit { resume }))
                } else {
                    Ok(None)
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if self.tx.is_some() {
                    return Ok(None);
                }
                let resume = Position {
                    lsn: wal_end.as_u64(),
                    index: 0,
                };
                let past_skip = self.skip_before.as_ref().is_none_or(|s| &resume > s);
                if self.ahead(&resume) && past_skip {
                    self.last = Some(resume.clone());
                    Ok(Some(Change::Heartbeat { resume }))
                } else {
                    Ok(None)
                }
            }
            ReplicationEvent::Message { .. } => Ok(None),
            ReplicationEvent::StoppedAt { reached } => Err(SourceError::transient(
                Cause::Unreachable,
                format!(
                    "replication stream stopped at {}",
                    format_lsn(reached.as_u64())
                ),
            )),
        }
    }

    fn xlog(&mut self, data: bytes::Bytes) -> Result<Option<Change<Position>>, SourceError> {
        let decoded = pgoutput::decode(data.clone());
        let (relation_id, tuple) = match decoded {
            Ok(PgOutput::Relation(rel)) => {
                let is_outbox = rel.namespace == self.outbox.0 && rel.name == self.outbox.1;
                self.relations
                    .insert(rel.id, is_outbox.then(|| ColumnMap::new(&rel.columns)));
                return Ok(None);
            }
            Ok(PgOutput::Other(_)) => return Ok(None),
            Ok(PgOutput::Insert { relation_id, tuple }) => (relation_id, Ok(tuple)),
            Err(e) => {
                // An insert we cannot decode: if its relation is the outbox,
                // it becomes a dead letter at its position; otherwise we
                // cannot tell what was lost, and a person must look.
                let rel = (data.len() >= 5 && data[0] == b'I')
                    .then(|| u32::from_be_bytes(data[1..5].try_into().expect("4 bytes")));
                match rel {
                    Some(id) => (id, Err(RowError::Undecodable(e.to_string()))),
                    None => {
                        return Err(SourceError::operator(
                            Cause::Query,
                            format!("{e}; the replication stream cannot be read past it"),
                        ));
                    }
                }
            }
        };
        let map = match self.relations.get(&relation_id) {
            Some(Some(map)) => map,
            Some(None) => return Ok(None),
            None => {
                return Err(SourceError::transient(
                    Cause::Query,
                    format!(
                        "insert for relation {relation_id} arrived before its Relation message; reconnecting"
                    ),
                ));
            }
        };
        let Some(tx) = self.tx.as_mut() else {
            return Err(SourceError::transient(
                Cause::Query,
                "insert outside a transaction; reconnecting",
            ));
        };
        let position = Position {
            lsn: tx.commit_lsn,
            index: tx.next_index,
        };
        tx.next_index += 1;
        if self.skip_before.as_ref().is_some_and(|s| &position < s) {
            return Ok(None);
        }
        let row = tuple.and_then(|t| map.row(&t, tx.commit_time));
        self.last = Some(position.next_row());
        Ok(Some(Change::Row { position, row }))
    }
}

pub struct PostgresStream {
    client: ReplicationClient,
    decoder: Decoder,
    slot: String,
    /// The last LSN reported through `durable`, for the final status update.
    acked: Option<Lsn>,
    status_interval: std::time::Duration,
}

impl ChangeStream for PostgresStream {
    type Position = Position;

    async fn next(&mut self) -> Result<Change<Position>, SourceError> {
        loop {
            let ev = match self.client.recv().await {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    return Err(SourceError::transient(
                        Cause::Unreachable,
                        "the replication stream ended",
                    ));
                }
                Err(e) => return Err(replication_error(e, &self.slot)),
            };
            if let Some(change) = self.decoder.feed(ev)? {
                return Ok(change);
            }
        }
    }

    fn durable(&mut self, resume: &Position) {
        let lsn = Lsn::from_u64(resume.lsn);
        self.client.update_applied_lsn(lsn);
        self.acked = Some(lsn);
    }

    async fn close(mut self) {
        // Stopping sends CopyDone without a last status update: wait (at
        // most one status interval and a bit) until the server has been told
        // the final durable position, so the slot does not lag behind the
        // checkpoint after a clean stop.
        if let Some(acked) = self.acked {
            let metrics = self.client.metrics();
            let deadline = tokio::time::Instant::now()
                + self.status_interval
                + std::time::Duration::from_secs(1);
            while metrics.last_applied_lsn() < acked
                && self.client.is_running()
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        if let Err(e) = self.client.shutdown().await {
            tracing::debug!(error = %e, "replication connection closed with an error");
        }
    }
}

/// What the oldest position of a slot is, for `checkpoint reset`.
const SLOT_NOTE: &str = "the oldest position the slot can stream (its confirmed_flush_lsn): PostgreSQL cannot rewind a slot, so events confirmed before it can only come back from the archive queue";

impl Source for PostgresSource {
    type Position = Position;
    type Stream = PostgresStream;

    async fn preflight(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        let client = match self.client().await {
            Ok(c) => {
                checks.push(Check::pass("connection", redact_url(&self.cfg.url)));
                c
            }
            Err(e) => {
                checks.push(Check::fail(
                    "connection",
                    e.message(),
                    "check database.url, that PostgreSQL is running and that pg_hba.conf lets this host in",
                ));
                return checks;
            }
        };
        match preflight_queries(self, &client, &mut checks).await {
            Ok(()) => {}
            Err(e) => checks.push(Check::fail("preflight", e.message(), "see the error above")),
        }
        checks
    }

    async fn init(&self) -> Result<Vec<String>, SourceError> {
        let client = self.client().await?;
        let mut done = Vec::new();
        let (schema, table) = self.cfg.outbox_parts();
        let outbox = self.outbox_sql_name();
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2)",
                &[&schema, &table],
            )
            .await
            .map_err(|e| query_error("looking for the outbox table", e))?
            .get(0);
        if exists {
            done.push(format!("outbox table {schema}.{table}: already there"));
            // For an outbox made before the function existed, to switch
            // its id default to it by hand (docs/configuration.md, the outbox table); never fails `init`.
            match client.batch_execute(&uuid7_function(schema)).await {
                Ok(()) => done.push(format!("function {schema}.sitesync_uuid7: ready")),
                Err(e) => done.push(format!(
                    "function {schema}.sitesync_uuid7: not created ({}); the outbox's ids stay as its default makes them",
                    query_error("creating it", e).message()
                )),
            }
        } else {
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {schema_q};
                     {UUID7}
                     CREATE TABLE IF NOT EXISTS {outbox} (
                         id uuid PRIMARY KEY DEFAULT {schema_q}.sitesync_uuid7(),
                         created_at timestamptz NOT NULL DEFAULT now(),
                         origin text NOT NULL DEFAULT {site},
                         type text NOT NULL,
                         entity_key text,
                         data jsonb NOT NULL
                     );",
                    schema_q = ident(schema),
                    site = literal(&self.site),
                    UUID7 = uuid7_function(schema),
                ))
                .await
                .map_err(|e| query_error("creating the outbox table", e))?;
            done.push(format!("outbox table {schema}.{table}: created"));
        }

        let publication = client
            .query_opt(
                "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, puballtables FROM pg_publication WHERE pubname = $1",
                &[&self.cfg.publication],
            )
            .await
            .map_err(|e| query_error("reading pg_publication", e))?;
        let pub_q = ident(&self.cfg.publication);
        match publication {
            None => {
                exec(
                    &client,
                    &format!(
                        "CREATE PUBLICATION {pub_q} FOR TABLE {outbox} WITH (publish = 'insert')"
                    ),
                    "creating the publication",
                )
                .await?;
                done.push(format!(
                    "publication {}: created (inserts on {schema}.{table} only)",
                    self.cfg.publication
                ));
            }
            Some(row) => {
                let all_tables: bool = row.get(4);
                if all_tables {
                    return Err(SourceError::operator(
                        Cause::Config,
                        format!(
                            "publication {} exists and is FOR ALL TABLES; sitesync needs one on the outbox only: drop it or set database.publication to another name",
                            self.cfg.publication
                        ),
                    ));
                }
                let covers: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
                        &[&self.cfg.publication, &schema, &table],
                    )
                    .await
                    .map_err(|e| query_error("reading pg_publication_tables", e))?
                    .get(0);
                if !covers {
                    exec(
                        &client,
                        &format!("ALTER PUBLICATION {pub_q} ADD TABLE {outbox}"),
                        "adding the outbox to the publication",
                    )
                    .await?;
                    done.push(format!(
                        "publication {}: outbox table added",
                        self.cfg.publication
                    ));
                }
                let (ins, upd, del, tru): (bool, bool, bool, bool) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                if !ins || upd || del || tru {
                    exec(
                        &client,
                        &format!("ALTER PUBLICATION {pub_q} SET (publish = 'insert')"),
                        "setting the publication to inserts only",
                    )
                    .await?;
                    done.push(format!(
                        "publication {}: set to publish inserts only",
                        self.cfg.publication
                    ));
                }
                if covers && ins && !upd && !del && !tru {
                    done.push(format!(
                        "publication {}: already there",
                        self.cfg.publication
                    ));
                }
            }
        }

        match self.slot_row(&client).await? {
            Some(row) => {
                let plugin: Option<String> = row.get(0);
                if plugin.as_deref() != Some("pgoutput") {
                    return Err(SourceError::operator(
                        Cause::Config,
                        format!(
                            "replication slot {} exists with plugin {:?}, not pgoutput: drop it (SELECT pg_drop_replication_slot('{}')) or set database.slot to another name",
                            self.cfg.slot, plugin, self.cfg.slot
                        ),
                    ));
                }
                done.push(format!("replication slot {}: already there", self.cfg.slot));
            }
            None => {
                let row = client
                    .query_one(
                        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                        &[&self.cfg.slot],
                    )
                    .await
                    .map_err(|e| query_error("creating the replication slot", e))?;
                let lsn: String = row.get(0);
                done.push(format!(
                    "replication slot {}: created at {lsn} (outbox rows committed from now on are streamed)",
                    self.cfg.slot
                ));
            }
        }
        Ok(done)
    }

    async fn open(&self, resume: Option<&Position>) -> Result<PostgresStream, SourceError> {
        let resume = resume.cloned();
        let start = resume.as_ref().map_or(Lsn::ZERO, |p| Lsn::from_u64(p.lsn));
        self.check_slot_before_streaming(start).await?;
        let ack = resume.as_ref().map(|_| start);
        let cfg = self.replication_config(start, ack)?;
        let client = ReplicationClient::connect(cfg)
            .await
            .map_err(|e| replication_error(e, &self.cfg.slot))?;
        let (schema, table) = self.cfg.outbox_parts();
        Ok(PostgresStream {
            client,
            decoder: Decoder::new((schema.to_string(), table.to_string()), resume),
            slot: self.cfg.slot.clone(),
            acked: None,
            status_interval: self.cfg.status_interval,
        })
    }

    async fn bounds(&self) -> Result<LogBounds<Position>, SourceError> {
        let client = self.client().await?;
        let current: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| query_error("reading pg_current_wal_lsn()", e))?
            .get(0);
        let latest = Position {
            lsn: parse_lsn(&current).map_err(|e| SourceError::operator(Cause::Query, e))?,
            index: 0,
        };
        let Some(row) = self.slot_row(&client).await? else {
            return Ok(LogBounds {
                oldest: None,
                latest,
                oldest_note: SLOT_NOTE.into(),
                detail: format!(
                    "slot {} does not exist (run `sitesync init`)",
                    self.cfg.slot
                ),
            });
        };
        let confirmed: Option<String> = row.get(2);
        let restart: Option<String> = row.get(3);
        let active: Option<i32> = row.get(4);
        let wal_status: Option<String> = row.get(5);
        let oldest = match &confirmed {
            Some(text) => Some(Position {
                lsn: parse_lsn(text).map_err(|e| SourceError::operator(Cause::Query, e))?,
                index: 0,
            }),
            None => None,
        };
        Ok(LogBounds {
            oldest,
            latest,
            oldest_note: SLOT_NOTE.into(),
            detail: format!(
                "slot {}: confirmed_flush_lsn {}, restart_lsn {}, wal_status {}, {}; server WAL at {current}",
                self.cfg.slot,
                confirmed.as_deref().unwrap_or("none"),
                restart.as_deref().unwrap_or("none"),
                wal_status.as_deref().unwrap_or("unknown"),
                match active {
                    Some(pid) => format!("streaming to pid {pid}"),
                    None => "not streaming".into(),
                }
            ),
        })
    }

    async fn probe(&self) -> Result<(), SourceError> {
        let client = self.client().await?;
        let streaming: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
                 WHERE s.slot_name = $1 AND r.application_name = $2)",
                &[&self.cfg.slot, &self.application_name],
            )
            .await
            .map_err(|e| query_error("probing the replication connection", e))?
            .get(0);
        if streaming {
            Ok(())
        } else {
            Err(SourceError::transient(
                Cause::Unreachable,
                format!(
                    "the server no longer streams slot {} to us: reconnecting",
                    self.cfg.slot
                ),
            ))
        }
    }

    async fn advance_to_latest(&self) -> Result<Position, SourceError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT end_lsn::text FROM pg_replication_slot_advance($1, pg_current_wal_lsn())",
                &[&self.cfg.slot],
            )
            .await
            .map_err(|e| query_error(&format!("advancing slot {}", self.cfg.slot), e))?;
        let lsn: String = row.get(0);
        Ok(Position {
            lsn: parse_lsn(&lsn).map_err(|e| SourceError::operator(Cause::Query, e))?,
            index: 0,
        })
    }
}

async fn preflight_queries(
    source: &PostgresSource,
    client: &tokio_postgres::Client,
    checks: &mut Vec<Check>,
) -> Result<(), SourceError> {
    let cfg = &source.cfg;
    let q = |e| query_error("preflight query", e);

    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(q)?
        .get(0);
    if version >= MIN_SERVER_VERSION {
        checks.push(Check::pass("server version", version.to_string()));
    } else {
        checks.push(Check::fail(
            "server version",
            format!("{version}"),
            "sitesync needs PostgreSQL 14 or newer (pgoutput protocol and slot behaviour it relies on)",
        ));
    }

    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(q)?
        .get(0);
    if wal_level == "logical" {
        checks.push(Check::pass("wal_level", wal_level));
    } else {
        checks.push(Check::fail(
            "wal_level",
            format!("is `{wal_level}`"),
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
        ));
    }

    let role = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(q)?;
    let (user, can_replicate): (String, bool) = (role.get(0), role.get(1));
    if can_replicate {
        checks.push(Check::pass(
            "REPLICATION privilege",
            format!("role {user} has it"),
        ));
    } else {
        checks.push(Check::fail(
            "REPLICATION privilege",
            format!("role {user} lacks it"),
            format!("ALTER ROLE {} WITH REPLICATION;", ident(&user)),
        ));
    }

    let slots = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int, (SELECT count(*)::int FROM pg_replication_slots), current_setting('max_wal_senders')::int",
            &[],
        )
        .await
        .map_err(q)?;
    let (max_slots, used, senders): (i32, i32, i32) = (slots.get(0), slots.get(1), slots.get(2));
    let slot = source.slot_row(client).await?;
    if senders < 1 {
        checks.push(Check::fail(
            "max_wal_senders",
            "is 0",
            "ALTER SYSTEM SET max_wal_senders = 10; then restart PostgreSQL",
        ));
    }
    if slot.is_none() && used >= max_slots {
        checks.push(Check::fail(
            "free replication slots",
            format!("{used} of {max_slots} in use"),
            "raise max_replication_slots (restart needed) or drop an unused slot",
        ));
    } else {
        checks.push(Check::pass(
            "free replication slots",
            format!("{} of {max_slots} free", max_slots - used),
        ));
    }

    let (schema, table) = cfg.outbox_parts();
    let columns: Vec<(String, String)> = client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
            &[&schema, &table],
        )
        .await
        .map_err(q)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    if columns.is_empty() {
        checks.push(Check::fail(
            "outbox table",
            format!("{schema}.{table} does not exist"),
            "run `sitesync init`",
        ));
    } else {
        let missing: Vec<&str> = ["id", "type", "data"]
            .into_iter()
            .filter(|c| !columns.iter().any(|(n, _)| n == c))
            .collect();
        if missing.is_empty() {
            checks.push(Check::pass("outbox table", format!("{schema}.{table}")));
        } else {
            checks.push(Check::fail(
                "outbox table",
                format!("{schema}.{table} lacks column(s) {}", missing.join(", ")),
                "the outbox needs id, created_at, origin, type, entity_key and data (see `sitesync init`)",
            ));
        }
    }

    let publication = client
        .query_opt(
            "SELECT pubinsert, EXISTS (SELECT 1 FROM pg_publication_tables t WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3) \
             FROM pg_publication p WHERE pubname = $1",
            &[&cfg.publication, &schema, &table],
        )
        .await
        .map_err(q)?;
    match publication {
        None => checks.push(Check::fail(
            "publication",
            format!("{} does not exist", cfg.publication),
            "run `sitesync init`",
        )),
        Some(row) => {
            let (ins, covers): (bool, bool) = (row.get(0), row.get(1));
            if ins && covers {
                checks.push(Check::pass(
                    "publication",
                    format!("{} publishes inserts on {schema}.{table}", cfg.publication),
                ));
            } else {
                checks.push(Check::fail(
                    "publication",
                    format!(
                        "{} does not publish inserts on {schema}.{table}",
                        cfg.publication
                    ),
                    "run `sitesync init` (it adds the table and sets publish = 'insert')",
                ));
            }
        }
    }

    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(q)?
        .get(0);
    match slot {
        None => checks.push(Check::fail(
            "replication slot",
            format!("{} does not exist", cfg.slot),
            "run `sitesync init`",
        )),
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let slot_db: Option<String> = row.get(1);
            let confirmed: Option<String> = row.get(2);
            let active: Option<i32> = row.get(4);
            let wal_status: Option<String> = row.get(5);
            if plugin.as_deref() != Some("pgoutput") {
                checks.push(Check::fail(
                    "replication slot",
                    format!("{} uses plugin {plugin:?}", cfg.slot),
                    format!(
                        "drop it (SELECT pg_drop_replication_slot('{}')) and run `sitesync init`",
                        cfg.slot
                    ),
                ));
            } else if slot_db.as_deref() != Some(db.as_str()) {
                checks.push(Check::fail(
                    "replication slot",
                    format!("{} belongs to database {slot_db:?}, not {db}", cfg.slot),
                    "set database.slot to a name of your own and run `sitesync init`",
                ));
            } else if wal_status.as_deref() == Some("lost") {
                checks.push(Check::fail(
                    "replication slot",
                    format!("{}: the WAL it needs was removed (wal_status = lost)", cfg.slot),
                    "events were lost at the source: drop and recreate the slot (`sitesync init`), reset the checkpoint, and resynchronise the other sites",
                ));
            } else if let Some(pid) = active {
                checks.push(Check::warn(
                    "replication slot",
                    format!("{} is streaming to pid {pid} now", cfg.slot),
                    "another sidecar (or client) holds it; a second `run` waits until it is free",
                ));
            } else {
                checks.push(Check::pass(
                    "replication slot",
                    format!(
                        "{}, confirmed_flush_lsn {}",
                        cfg.slot,
                        confirmed.unwrap_or_default()
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl From<SourceError> for Check {
    fn from(e: SourceError) -> Check {
        let fix = match e.kind() {
            ErrorKind::Transient => "retry; check that the database is up",
            ErrorKind::Operator => "see the message",
        };
        Check::fail("database", e.message(), fix)
    }
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::tests::{insert_bytes, relation_bytes};
    use super::*;

    const COLS: [&str; 6] = ["id", "created_at", "origin", "type", "entity_key", "data"];
    const ID: &str = "7f1d8a5e-3c2b-4a8e-9f00-0123456789ab";

    fn begin(lsn: u64) -> ReplicationEvent {
        ReplicationEvent::Begin {
            final_lsn: Lsn::from_u64(lsn),
            xid: 1,
            commit_time_micros: 0,
        }
    }

    fn commit(lsn: u64, end: u64) -> ReplicationEvent {
        ReplicationEvent::Commit {
            lsn: Lsn::from_u64(lsn),
            end_lsn: Lsn::from_u64(end),
            commit_time_micros: 0,
        }
    }

    fn xlog(data: bytes::Bytes) -> ReplicationEvent {
        ReplicationEvent::XLogData {
            wal_start: Lsn::ZERO,
            wal_end: Lsn::ZERO,
            server_time_micros: 0,
            data,
        }
    }

    fn keepalive(lsn: u64) -> ReplicationEvent {
        ReplicationEvent::KeepAlive {
            wal_end: Lsn::from_u64(lsn),
            reply_requested: false,
            server_time_micros: 0,
        }
    }

    fn insert(kind: &str) -> ReplicationEvent {
        xlog(insert_bytes(
            1,
            &[
                Some(ID),
                Some("2026-11-23 10:00:00+00"),
                Some("PARIS"),
                Some(kind),
                None,
                Some("{}"),
            ],
        ))
    }

    fn run(decoder: &mut Decoder, events: Vec<ReplicationEvent>) -> Vec<Change<Position>> {
        events
            .into_iter()
            .filter_map(|e| decoder.feed(e).unwrap())
            .collect()
    }

    fn pos(lsn: u64, index: u32) -> Position {
        Position { lsn, index }
    }

    fn decoder(resume: Option<Position>) -> Decoder {
        Decoder::new(("public".into(), "outbox".into()), resume)
    }

    #[test]
    fn rows_are_numbered_within_their_transaction_and_commits_move_past_it() {
        let mut d = decoder(None);
        let out = run(
            &mut d,
            vec![
                xlog(relation_bytes(1, "public", "outbox", &COLS)),
                xlog(relation_bytes(2, "public", "other", &["x"])),
                begin(100),
                insert("a"),
                xlog(insert_bytes(2, &[Some("ignored")])),
                insert("b"),
                commit(100, 120),
            ],
        );
        assert_eq!(out.len(), 3, "{out:?}");
        match &out[0] {
            Change::Row { position, row } => {
                assert_eq!(position, &pos(100, 0));
                assert_eq!(row.as_ref().unwrap().kind.as_deref(), Some("a"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&out[1], Change::Row { position, .. } if position == &pos(100, 1)));
        assert!(matches!(&out[2], Change::Commit { resume } if resume == &pos(120, 0)));
    }

    #[test]
    fn a_resumed_stream_skips_the_rows_already_done() {
        // Crash after rows 0 and 1 of the transaction committing at 100.
        let mut d = decoder(Some(pos(100, 2)));
        let out = run(
            &mut d,
            vec![
                xlog(relation_bytes(1, "public", "outbox", &COLS)),
                keepalive(90),
                begin(100),
                insert("a"),
                insert("b"),
                insert("c"),
                commit(100, 120),
            ],
        );
        let positions: Vec<Position> = out.iter().map(Change::resume_after).collect();
        assert_eq!(positions, vec![pos(100, 3), pos(120, 0)]);
    }

    #[test]
    fn heartbeats_only_between_transactions_and_only_forward() {
        let mut d = decoder(None);
        let out = run(
            &mut d,
            vec![
                xlog(relation_bytes(1, "public", "outbox", &COLS)),
                keepalive(50),
                keepalive(50),
                begin(100),
                keepalive(200),
                insert("a"),
                commit(100, 120),
                keepalive(110),
                keepalive(300),
            ],
        );
        let kinds: Vec<String> = out
            .iter()
            .map(|c| match c {
                Change::Row { .. } => "row".to_string(),
                Change::Commit { resume } => format!("commit {resume}"),
                Change::Heartbeat { resume } => format!("beat {resume}"),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                "beat postgres:0/32#0",
                "row",
                "commit postgres:0/78#0",
                "beat postgres:0/12C#0"
            ]
        );
    }

    #[test]
    fn an_undecodable_outbox_insert_becomes_a_row_error_at_its_position() {
        let mut d = decoder(None);
        let mut bad = insert_bytes(1, &[Some("x")]).to_vec();
        bad[5] = b'Z';
        let out = run(
            &mut d,
            vec![
                xlog(relation_bytes(1, "public", "outbox", &COLS)),
                begin(100),
                xlog(bad.into()),
                insert("after"),
                commit(100, 120),
            ],
        );
        assert!(
            matches!(&out[0], Change::Row { position, row: Err(RowError::Undecodable(_)) } if position == &pos(100, 0))
        );
        assert!(
            matches!(&out[1], Change::Row { position, row: Ok(_) } if position == &pos(100, 1))
        );
    }

    #[test]
    fn a_custom_outbox_with_missing_columns_decodes_what_it_has() {
        let mut d = decoder(None);
        let out = run(
            &mut d,
            vec![
                xlog(relation_bytes(
                    1,
                    "public",
                    "outbox",
                    &["data", "id", "type", "extra"],
                )),
                begin(100),
                xlog(insert_bytes(
                    1,
                    &[Some("{\"a\":1}"), Some(ID), Some("t"), Some("zzz")],
                )),
            ],
        );
        let Change::Row { row: Ok(row), .. } = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(row.id.as_deref(), Some(ID));
        assert_eq!(row.data.as_deref(), Some("{\"a\":1}"));
        assert_eq!(row.origin, None);
        assert_eq!(row.created_at, None);
    }

    #[test]
    fn errors_are_classified() {
        let e = replication_error(
            PgWireError::Server("replication slot \"s\" does not exist (SQLSTATE 42704)".into()),
            "s",
        );
        assert_eq!(e.kind(), ErrorKind::Operator);
        assert!(e.message().contains("sitesync init"), "{}", e.message());
        let e = replication_error(
            PgWireError::Server(
                "replication slot \"s\" is active for PID 42 (SQLSTATE 55006)".into(),
            ),
            "s",
        );
        assert_eq!(e.kind(), ErrorKind::Transient);
        let e = replication_error(
            PgWireError::Server("the database system is starting up (SQLSTATE 57P03)".into()),
            "s",
        );
        assert_eq!(e.kind(), ErrorKind::Transient);
        let e = replication_error(
            PgWireError::Auth("password authentication failed".into()),
            "s",
        );
        assert_eq!(e.kind(), ErrorKind::Operator);
    }

    #[test]
    fn pg_epoch_conversion() {
        assert_eq!(
            pg_time(0).unwrap().to_rfc3339(),
            "2000-01-01T00:00:00+00:00"
        );
    }
}
