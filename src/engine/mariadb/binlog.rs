//! Reading a MariaDB binary log over the replication protocol, as outbox
//! rows in commit order.
//!
//! A [`BinlogReader`] is a replica connection (`COM_BINLOG_DUMP`, through
//! mysql_async's binlog stream) that starts at a [`Position`]: by GTID
//! (`@slave_connect_state`, the server then sends every transaction after
//! that state) or by binlog file and offset. Before asking, the session
//! tells the server what the reader understands:
//!
//! - `@mariadb_slave_capability=4`: MariaDB's own events (GTID,
//!   GTID_LIST, BINLOG_CHECKPOINT) are sent as they are, not replaced by
//!   dummies; mysql_async does not parse them, so they are decoded here;
//! - `@master_heartbeat_period`: the server sends a heartbeat when idle,
//!   which both tells a dead connection from a quiet one and lets an idle
//!   reader's position follow the log;
//! - `@slave_connect_state` and `@slave_gtid_strict_mode=1`: where to start,
//!   refused (ERROR 1236) when the binlog no longer holds it.
//!
//! A domain the server's binlog has never seen would not be refused: the
//! server would send that domain from its beginning. So a GTID start is
//! first compared with `@@gtid_binlog_state`, and a domain the server does
//! not know is an operator error.
//!
//! Each transaction starts with a GTID event and ends with an XID event
//! (InnoDB), a `COMMIT` query (a non-transactional engine) or, for DDL, its
//! single query. Between them, TABLE_MAP events name the tables (with the
//! column names of `binlog_row_metadata=FULL`) and rows events carry the
//! rows; a table's id changes when its definition does, so the outbox's ids
//! are learned again in every transaction. Outbox inserts become
//! [`Change::Row`]s at the transaction's position (the GTID state before it,
//! where its events start, the row's index), and its end a
//! [`Change::Commit`]; a transaction without outbox inserts and the
//! server's heartbeats become [`Change::Heartbeat`]s. A rolled-back
//! transaction writes nothing to the binlog.
//!
//! # MySQL
//!
//! MySQL writes its own events for the same things, which mysql_async
//! parses: each transaction starts with a GTID event (`uuid:gno`; an
//! ANONYMOUS_GTID event where GTIDs are off), a file starts with the set
//! of GTIDs before it (PREVIOUS_GTIDS), and a DDL statement is a
//! transaction of one QUERY event with no `BEGIN` before it. A start from
//! a MySQL GTID set asks with `COM_BINLOG_DUMP_GTID` and the set's
//! intervals; MySQL itself refuses a set whose transactions it purged
//! (ERROR 1236). Only MariaDB runs in the tests here: the unit tests check
//! the set's conversions (the dump request, PREVIOUS_GTIDS, each
//! transaction added); the reading of MySQL's events has never run against
//! a MySQL server. Compressed transactions
//! (`binlog_transaction_compression=ON`, TRANSACTION_PAYLOAD events) are
//! refused with a message saying so.

use super::position::{BinlogFile, Gtids, MariaDbGtid, MariaDbState, MySqlSet, Position};
use crate::error::{Cause, SourceError};
use crate::event::{OutboxRow, RowError};
use crate::source::Change;
use chrono::DateTime;
use futures_util::StreamExt;
use mysql_async::binlog::EventType;
use mysql_async::binlog::events::{
    Event, EventData, OptionalMetadataField, PreviousGtidsEvent, RowsEventData, TableMapEvent,
};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn, Opts, Row, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// MariaDB's event types that mysql_async leaves unparsed.
mod mariadb_event {
    /// The `INSERT` statement of the rows that follow (unused).
    pub const ANNOTATE_ROWS: u8 = 160;
    /// Which binlog files crash recovery needs (unused).
    pub const BINLOG_CHECKPOINT: u8 = 161;
    /// The start of a transaction: its GTID.
    pub const GTID: u8 = 162;
    /// The GTID state at the start of a binlog file.
    pub const GTID_LIST: u8 = 163;
}

/// The GTID event's flag for a transaction of one statement with no
/// XID or COMMIT after it (DDL).
const FL_STANDALONE: u8 = 1;

/// The event header's flag for an event the server made up for the
/// stream (the first ROTATE, a FORMAT_DESCRIPTION): its `log_pos` is not a
/// position in the file.
const LOG_EVENT_ARTIFICIAL_F: u16 = 0x20;

/// How long [`BinlogReader::close`] waits for the connection's goodbye.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// `@mariadb_slave_capability`: MARIA_SLAVE_CAPABILITY_GTID, the server sends
/// GTID events (and every other event of its own) unchanged.
const SLAVE_CAPABILITY_GTID: u32 = 4;

/// The outbox table the reader picks out of the binlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxTable {
    /// The database (schema) it is in.
    pub database: String,
    /// The table.
    pub table: String,
}

/// How a reader connects.
#[derive(Debug, Clone)]
pub struct ReaderOptions {
    /// The server id the reader registers with: no replica of the server
    /// and no other reader may use it, nor the server itself.
    pub server_id: u32,
    /// How often an idle server sends a heartbeat.
    pub heartbeat: Duration,
}

/// A transaction's GTID, as its server writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxGtid {
    MariaDb(MariaDbGtid),
    /// MySQL's `uuid:gno`.
    MySql(Uuid, u64),
}

/// Adds a transaction done to the GTIDs done so far (of the same kind:
/// one server writes one kind).
fn record(state: &mut Gtids, gtid: TxGtid) {
    match (state, gtid) {
        (Gtids::MariaDb(state), TxGtid::MariaDb(g)) => state.record(g),
        (Gtids::MySql(set), TxGtid::MySql(uuid, gno)) => set.add(uuid, gno, gno),
        _ => {}
    }
}

/// A transaction being read.
#[derive(Debug)]
struct Transaction {
    /// Its GTID (none on a server without GTIDs).
    gtid: Option<TxGtid>,
    /// The GTID state before it, when known: its rows' positions carry it.
    before: Option<Gtids>,
    /// Where its first event is.
    file: BinlogFile,
    offset: u64,
    /// Outbox rows read so far (the next row's index).
    rows: u32,
    /// Rows to read without handing them out (a resume mid-transaction).
    skip: u32,
    /// Ends with its single statement (DDL).
    standalone: bool,
    /// Begun by MySQL's GTID event: a `BEGIN` follows for DML; any other
    /// statement first is DDL, a transaction of its own.
    awaiting_begin: bool,
}

/// A binlog stream turned into [`Change`]s of the outbox.
pub struct BinlogReader {
    stream: BinlogStream,
    outbox: OutboxTable,
    /// Where the stream was asked to start, for error messages.
    from: Position,
    /// The GTID state after the last transaction read, when known: from
    /// the start position, or from the GTID_LIST (MariaDB) or
    /// PREVIOUS_GTIDS (MySQL) event at the start of a binlog file when
    /// started by file and offset.
    state: Option<Gtids>,
    /// The binlog file being read (from the ROTATE events).
    file: Option<BinlogFile>,
    tx: Option<Transaction>,
    /// Rows of the first transaction already done (the start position's
    /// index); 0 once that transaction has begun.
    skip_first: u32,
    /// Whether the first transaction must start where the start position
    /// says (a resume mid-transaction skips rows by count: it must be the
    /// same transaction).
    check_first: bool,
    /// Outbox column names by table id, for the current transaction.
    outbox_ids: HashMap<u64, Arc<[String]>>,
    /// Changes decoded and not handed out yet (a rows event holds several).
    pending: VecDeque<Change<Position>>,
}

impl BinlogReader {
    /// Connects with `opts` (a login with `REPLICATION SLAVE`) and asks for
    /// the binlog from `from`. A GTID start is refused (as an operator
    /// error) when it names a domain the server's binlog does not know; a
    /// purged start is reported by the first [`next`](Self::next).
    pub async fn open(
        opts: Opts,
        options: &ReaderOptions,
        outbox: OutboxTable,
        from: &Position,
    ) -> Result<BinlogReader, SourceError> {
        let mut conn = Conn::new(opts)
            .await
            .map_err(|e| classify(e, from).context("connecting for the binlog stream"))?;
        let mut sids = None;
        let state = match &from.gtid {
            Some(Gtids::MariaDb(state)) => {
                let binlog_state: String = conn
                    .query_first("SELECT @@gtid_binlog_state")
                    .await
                    .map_err(|e| classify(e, from).context("reading @@gtid_binlog_state"))?
                    .unwrap_or_default();
                check_domains(state, &binlog_state, from)?;
                Some(state.clone())
            }
            Some(Gtids::MySql(set)) => {
                sids = Some(dump_sids(set));
                None
            }
            None => None,
        };
        let mut setup = vec![
            format!("SET @mariadb_slave_capability = {SLAVE_CAPABILITY_GTID}"),
            format!(
                "SET @master_heartbeat_period = {}",
                options.heartbeat.as_nanos().max(1)
            ),
        ];
        if let Some(state) = &state {
            setup.push(format!("SET @slave_connect_state = '{state}'"));
            setup.push("SET @slave_gtid_strict_mode = 1".to_string());
        }
        for sql in &setup {
            conn.query_drop(sql)
                .await
                .map_err(|e| classify(e, from).context(sql))?;
        }
        let mut request = BinlogStreamRequest::new(options.server_id);
        let file_name = from.file.name().as_bytes().to_vec();
        if let Some(sids) = sids {
            // COM_BINLOG_DUMP_GTID: MySQL sends what the set lacks.
            request = request.with_gtid().with_gtid_set(sids);
        } else if state.is_none() {
            request = request.with_filename(&file_name).with_pos(from.offset);
        }
        let stream = conn
            .get_binlog_stream(request)
            .await
            .map_err(|e| classify(e, from).context("asking for the binlog stream"))?;
        Ok(BinlogReader {
            stream,
            outbox,
            from: from.clone(),
            state: from.gtid.clone(),
            file: None,
            tx: None,
            skip_first: from.index,
            check_first: from.index > 0,
            outbox_ids: HashMap::new(),
            pending: VecDeque::new(),
        })
    }

    /// The next change, in commit order. The end of the stream (the server
    /// shut down) and a lost connection are transient errors; a start the
    /// binlog no longer holds is an operator error naming it.
    pub async fn next(&mut self) -> Result<Change<Position>, SourceError> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Ok(change);
            }
            let event = match self.stream.next().await {
                Some(Ok(event)) => event,
                Some(Err(e)) => return Err(classify(e, &self.from).context("reading the binlog")),
                None => {
                    return Err(SourceError::transient(
                        Cause::Unreachable,
                        "the server ended the binlog stream (it is shutting down)",
                    ));
                }
            };
            self.handle(&event)?;
        }
    }

    /// Ends the stream. A dump connection does not answer a goodbye while
    /// the server streams to it: the close is given [`CLOSE_TIMEOUT`], then
    /// the connection is dropped (the server notices the socket close).
    pub async fn close(self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.stream.close()).await;
    }

    fn handle(&mut self, event: &Event) -> Result<(), SourceError> {
        let header = event.header();
        let end = u64::from(header.log_pos());
        let start = end.saturating_sub(u64::from(header.event_size()));
        let artificial = header.flags_raw() & LOG_EVENT_ARTIFICIAL_F != 0;
        match header.event_type_raw() {
            mariadb_event::GTID => {
                let (seq, domain, flags) = decode_gtid(event.data())?;
                let gtid = MariaDbGtid {
                    domain,
                    server: header.server_id(),
                    seq,
                };
                self.begin(
                    start,
                    Some(TxGtid::MariaDb(gtid)),
                    flags & FL_STANDALONE != 0,
                )?;
            }
            // A file's own GTID_LIST, read when the state is not known yet.
            mariadb_event::GTID_LIST if self.state.is_none() && !artificial => {
                self.state = Some(Gtids::MariaDb(decode_gtid_list(event.data())?));
            }
            t if t == EventType::GTID_EVENT as u8 => {
                if let Some(EventData::GtidEvent(g)) = self.read(event)? {
                    let gtid = TxGtid::MySql(Uuid::from_bytes(g.sid()), g.gno());
                    self.begin(start, Some(gtid), false)?;
                    self.await_begin();
                }
            }
            t if t == EventType::ANONYMOUS_GTID_EVENT as u8 => {
                self.begin(start, None, false)?;
                self.await_begin();
            }
            t if t == EventType::PREVIOUS_GTIDS_EVENT as u8
                && self.state.is_none()
                && !artificial =>
            {
                if let Some(EventData::PreviousGtidsEvent(p)) = self.read(event)? {
                    self.state = Some(Gtids::MySql(previous_gtids(&p)));
                }
            }
            t if t == EventType::TRANSACTION_PAYLOAD_EVENT as u8 => {
                return Err(SourceError::operator(
                    Cause::Config,
                    "the binlog holds a compressed transaction (MySQL's binlog_transaction_compression=ON): the outbox rows inside it cannot be read; set binlog_transaction_compression=OFF",
                ));
            }
            mariadb_event::BINLOG_CHECKPOINT | mariadb_event::ANNOTATE_ROWS => {}
            t if t == EventType::ROTATE_EVENT as u8 => {
                let name = rotate_name(event)?;
                self.file = Some(name.parse().map_err(|e| {
                    SourceError::transient(Cause::Query, format!("a ROTATE event: {e}"))
                })?);
            }
            t if t == EventType::HEARTBEAT_EVENT as u8 => {
                if self.tx.is_none()
                    && let Some(resume) = self.resume_at(end)
                {
                    self.pending.push_back(Change::Heartbeat { resume });
                }
            }
            t if t == EventType::TABLE_MAP_EVENT as u8 => {
                if let Some(EventData::TableMapEvent(tme)) = self.read(event)? {
                    if tme.database_name() == self.outbox.database
                        && tme.table_name() == self.outbox.table
                    {
                        let names = column_names(&tme, &self.outbox)?;
                        self.outbox_ids.insert(tme.table_id(), names);
                    } else {
                        self.outbox_ids.remove(&tme.table_id());
                    }
                }
            }
            t if t == EventType::WRITE_ROWS_EVENT_V1 as u8
                || t == EventType::WRITE_ROWS_EVENT as u8 =>
            {
                self.rows(event)?;
            }
            t if t == EventType::XID_EVENT as u8 => self.commit(end),
            t if t == EventType::QUERY_EVENT as u8 => {
                if let Some(EventData::QueryEvent(q)) = self.read(event)? {
                    let query = q.query();
                    if let Some(tx) = self.tx.as_mut()
                        && std::mem::take(&mut tx.awaiting_begin)
                        && !query.eq_ignore_ascii_case("BEGIN")
                    {
                        // MySQL's DDL: its GTID, then the statement alone.
                        tx.standalone = true;
                    }
                    let standalone = self.tx.as_ref().is_some_and(|tx| tx.standalone);
                    if standalone
                        || query.eq_ignore_ascii_case("COMMIT")
                        || query.eq_ignore_ascii_case("ROLLBACK")
                    {
                        self.commit(end);
                    } else if self.tx.is_none() && query.eq_ignore_ascii_case("BEGIN") {
                        // A server without GTIDs: the transaction starts here.
                        self.begin(start, None, false)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn read<'a>(&self, event: &'a Event) -> Result<Option<EventData<'a>>, SourceError> {
        event.read_data().map_err(|e| {
            SourceError::transient(
                Cause::Query,
                format!(
                    "an event of type {} in {} could not be decoded: {e}",
                    event.header().event_type_raw(),
                    self.file.as_ref().map_or("the binlog", |f| f.name())
                ),
            )
        })
    }

    /// A transaction begun by MySQL's GTID event: the next statement says
    /// whether it is DML (`BEGIN`) or DDL.
    fn await_begin(&mut self) {
        if let Some(tx) = self.tx.as_mut() {
            tx.awaiting_begin = true;
        }
    }

    fn begin(
        &mut self,
        start: u64,
        gtid: Option<TxGtid>,
        standalone: bool,
    ) -> Result<(), SourceError> {
        let file = self.file.clone().ok_or_else(|| {
            SourceError::transient(
                Cause::Query,
                "the binlog stream began a transaction before naming its file (no ROTATE event)",
            )
        })?;
        let skip = std::mem::take(&mut self.skip_first);
        if std::mem::take(&mut self.check_first)
            && (file != self.from.file || start != self.from.offset)
        {
            return Err(SourceError::operator(
                Cause::LogPurged,
                format!(
                    "{}: the transaction to resume in starts at {file}:{start}, not where the checkpoint says: the binlog is not the one the checkpoint was taken on (restored or reset?); rows of it would be skipped by count. Resynchronise this site and run `sitesync checkpoint reset`",
                    self.from
                ),
            ));
        }
        self.outbox_ids.clear();
        self.tx = Some(Transaction {
            gtid,
            before: self.state.clone(),
            file,
            offset: start,
            rows: 0,
            skip,
            standalone,
            awaiting_begin: false,
        });
        Ok(())
    }

    fn rows(&mut self, event: &Event) -> Result<(), SourceError> {
        let Some(EventData::RowsEvent(rows)) = self.read(event)? else {
            return Ok(());
        };
        let table_id = rows.table_id();
        let Some(names) = self.outbox_ids.get(&table_id).cloned() else {
            return Ok(());
        };
        let Some(tx) = self.tx.as_mut() else {
            return Err(SourceError::transient(
                Cause::Query,
                "an outbox rows event outside a transaction",
            ));
        };
        let Some(tme) = self.stream.get_tme(table_id) else {
            return Err(SourceError::transient(
                Cause::Query,
                format!("a rows event for table id {table_id} without its TABLE_MAP"),
            ));
        };
        let rows: &RowsEventData<'_> = &rows;
        for row in rows.rows(tme) {
            let index = tx.rows;
            tx.rows += 1;
            let decoded = match row {
                Ok((_, Some(after))) => outbox_row(&names, tme, after),
                Ok((_, None)) => Err(RowError::Undecodable(
                    "a WRITE_ROWS event without the row's image".to_string(),
                )),
                Err(e) => Err(RowError::Undecodable(e.to_string())),
            };
            if index < tx.skip {
                continue;
            }
            self.pending.push_back(Change::Row {
                position: Position::new(tx.before.clone(), tx.file.clone(), tx.offset, index),
                row: decoded,
            });
        }
        Ok(())
    }

    /// The transaction ends where the event ending it ends.
    fn commit(&mut self, end: u64) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        if let (Some(state), Some(gtid)) = (self.state.as_mut(), tx.gtid) {
            record(state, gtid);
        }
        let Some(resume) = self.resume_at(end) else {
            return;
        };
        self.pending.push_back(if tx.rows > 0 {
            Change::Commit { resume }
        } else {
            Change::Heartbeat { resume }
        });
    }

    /// The resume point at `offset` of the current file, between
    /// transactions.
    fn resume_at(&self, offset: u64) -> Option<Position> {
        let file = self.file.clone()?;
        Some(Position::new(self.state.clone(), file, offset, 0))
    }
}

/// The set a PREVIOUS_GTIDS event holds (its intervals exclude their end).
fn previous_gtids(p: &PreviousGtidsEvent<'_>) -> MySqlSet {
    let mut set = MySqlSet::default();
    for sid in p.sids() {
        let uuid = Uuid::from_bytes(sid.uuid());
        for interval in sid.intervals() {
            if interval.end() > interval.start() {
                set.add(uuid, interval.start(), interval.end() - 1);
            }
        }
    }
    set
}

/// A MySQL GTID set as `COM_BINLOG_DUMP_GTID` takes it: per server uuid,
/// its intervals with the end excluded.
fn dump_sids(set: &MySqlSet) -> Vec<mysql_async::Sid<'static>> {
    set.uuids()
        .map(|uuid| {
            let intervals = set
                .intervals(uuid)
                .iter()
                .map(|&(start, end)| mysql_async::GnoInterval::new(start, end.saturating_add(1)))
                .collect();
            mysql_async::Sid::new(*uuid.as_bytes()).with_intervals(intervals)
        })
        .collect()
}

/// Refuses a start state naming a domain `@@gtid_binlog_state` does not
/// hold: the server would send that domain from its beginning.
fn check_domains(
    state: &MariaDbState,
    binlog_state: &str,
    from: &Position,
) -> Result<(), SourceError> {
    let known: MariaDbState = binlog_state
        .parse()
        .map_err(|e| SourceError::transient(Cause::Query, format!("@@gtid_binlog_state: {e}")))?;
    for gtid in state.iter() {
        if known.get(gtid.domain).is_none() {
            return Err(SourceError::operator(
                Cause::LogPurged,
                format!(
                    "{from}: the GTID {gtid} is of domain {}, which this server's binlog does not know (@@gtid_binlog_state is `{binlog_state}`): the checkpoint was taken on another server, or the binlog was reset. Resynchronise this site and run `sitesync checkpoint reset`",
                    gtid.domain
                ),
            ));
        }
    }
    Ok(())
}

/// The file a ROTATE event names.
fn rotate_name(event: &Event) -> Result<String, SourceError> {
    let h = event.header();
    let mut header = [0u8; 19];
    header[0..4].copy_from_slice(&h.timestamp().to_le_bytes());
    header[4] = h.event_type_raw();
    header[5..9].copy_from_slice(&h.server_id().to_le_bytes());
    header[9..13].copy_from_slice(&h.event_size().to_le_bytes());
    header[13..17].copy_from_slice(&h.log_pos().to_le_bytes());
    header[17..19].copy_from_slice(&h.flags_raw().to_le_bytes());
    rotate_file_name(&header, event.data())
}

/// The file a ROTATE event names, from its 19-byte header and its body.
/// The body is the position (u64 LE) and the name. The server's first,
/// made-up ROTATE comes before any FORMAT_DESCRIPTION, so mysql_async does
/// not know yet that events end with a CRC32 (the connection asked for
/// checksums): they are found here, by checking them against the event.
pub fn rotate_file_name(header: &[u8; 19], data: &[u8]) -> Result<String, SourceError> {
    let name = data.get(8..).ok_or_else(|| {
        SourceError::transient(
            Cause::Query,
            format!("a ROTATE event of {} bytes", data.len()),
        )
    })?;
    let name = match name.len().checked_sub(4) {
        Some(cut) if checksum_matches(header, &data[..8 + cut], &name[cut..]) => &name[..cut],
        _ => name,
    };
    String::from_utf8(name.to_vec()).map_err(|_| {
        SourceError::transient(
            Cause::Query,
            "a ROTATE event names a file that is not UTF-8",
        )
    })
}

/// Whether `crc` (4 bytes, LE) is the CRC32 of the event's header and `body`.
fn checksum_matches(header: &[u8; 19], body: &[u8], crc: &[u8]) -> bool {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header);
    hasher.update(body);
    hasher.finalize().to_le_bytes() == crc
}

/// MariaDB's GTID event: sequence number (u64 LE), domain (u32 LE), flags
/// (u8), then fields the flags announce.
pub fn decode_gtid(data: &[u8]) -> Result<(u64, u32, u8), SourceError> {
    let short = || {
        SourceError::transient(
            Cause::Query,
            format!(
                "a GTID event of {} bytes, fewer than the 13 it holds",
                data.len()
            ),
        )
    };
    let seq = u64::from_le_bytes(data.get(0..8).ok_or_else(short)?.try_into().unwrap());
    let domain = u32::from_le_bytes(data.get(8..12).ok_or_else(short)?.try_into().unwrap());
    let flags = *data.get(12).ok_or_else(short)?;
    Ok((seq, domain, flags))
}

/// MariaDB's GTID_LIST event: a count (u32 LE, the low 28 bits), then per
/// GTID its domain (u32 LE), server id (u32 LE) and sequence number (u64 LE).
pub fn decode_gtid_list(data: &[u8]) -> Result<MariaDbState, SourceError> {
    let bad = |what: &str| {
        SourceError::transient(
            Cause::Query,
            format!("a GTID_LIST event of {} bytes: {what}", data.len()),
        )
    };
    let count = u32::from_le_bytes(
        data.get(0..4)
            .ok_or_else(|| bad("no count"))?
            .try_into()
            .unwrap(),
    ) & 0x0fff_ffff;
    let mut state = MariaDbState::default();
    for i in 0..count as usize {
        let at = 4 + i * 16;
        let entry = data
            .get(at..at + 16)
            .ok_or_else(|| bad(&format!("GTID {i} of {count} is cut short")))?;
        let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
        state.record(MariaDbGtid {
            domain: le32(&entry[0..4]),
            server: le32(&entry[4..8]),
            seq: u64::from_le_bytes(entry[8..16].try_into().unwrap()),
        });
    }
    Ok(state)
}

/// The column names of a TABLE_MAP event, which only
/// `binlog_row_metadata=FULL` writes.
fn column_names(
    tme: &TableMapEvent<'_>,
    outbox: &OutboxTable,
) -> Result<Arc<[String]>, SourceError> {
    for field in tme.iter_optional_meta() {
        if let Ok(OptionalMetadataField::ColumnName(names)) = field {
            let names: Result<Vec<String>, _> = names
                .iter_names()
                .map(|n| n.map(|n| n.name().into_owned()))
                .collect();
            let names = names.map_err(|e| {
                SourceError::transient(
                    Cause::Query,
                    format!(
                        "the column names of {}.{}: {e}",
                        outbox.database, outbox.table
                    ),
                )
            })?;
            return Ok(names.into());
        }
    }
    Err(SourceError::operator(
        Cause::ServerSettings,
        format!(
            "the binlog names no columns of {}.{}: set binlog_row_metadata = FULL on the server (SET GLOBAL binlog_row_metadata = 'FULL', and in its configuration file)",
            outbox.database, outbox.table
        ),
    ))
}

/// The outbox columns of one inserted row; other columns are ignored.
fn outbox_row(
    names: &[String],
    tme: &TableMapEvent<'_>,
    row: BinlogRow,
) -> Result<OutboxRow, RowError> {
    let mut out = OutboxRow::default();
    for (i, value) in row.unwrap().into_iter().enumerate() {
        let Some(name) = names.get(i) else {
            return Err(RowError::Undecodable(format!(
                "the row has {} columns or more, the TABLE_MAP names {}",
                i + 1,
                names.len()
            )));
        };
        let slot = match name.as_str() {
            "id" => &mut out.id,
            "created_at" => &mut out.created_at,
            "origin" => &mut out.origin,
            "type" => &mut out.kind,
            "entity_key" => &mut out.entity_key,
            "data" => &mut out.data,
            _ => continue,
        };
        let column_type = tme.get_column_type(i).ok().flatten();
        *slot = value_text(name, column_type, value)?;
    }
    Ok(out)
}

/// A column's value as text (`None` for NULL). TIMESTAMP columns arrive as
/// seconds since the epoch (`1733211234.123456`) and become RFC 3339 in UTC.
fn value_text(
    name: &str,
    column_type: Option<ColumnType>,
    value: BinlogValue<'_>,
) -> Result<Option<String>, RowError> {
    let undecodable = |what: String| RowError::Undecodable(format!("column `{name}`: {what}"));
    let value = match value {
        BinlogValue::Value(v) => v,
        other => Value::try_from(other).map_err(|e| undecodable(e.to_string()))?,
    };
    let text = match value {
        Value::NULL => return Ok(None),
        Value::Bytes(bytes) => String::from_utf8(bytes).map_err(|_| {
            undecodable("not UTF-8 text (the outbox's text columns must be utf8mb4)".to_string())
        })?,
        Value::Int(n) => n.to_string(),
        Value::UInt(n) => n.to_string(),
        Value::Float(n) => n.to_string(),
        Value::Double(n) => n.to_string(),
        Value::Date(y, mo, d, h, mi, s, us) => {
            format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}")
        }
        Value::Time(negative, days, h, mi, s, us) => format!(
            "{}{}:{mi:02}:{s:02}.{us:06}",
            if negative { "-" } else { "" },
            u64::from(days) * 24 + u64::from(h)
        ),
    };
    if matches!(
        column_type,
        Some(ColumnType::MYSQL_TYPE_TIMESTAMP2 | ColumnType::MYSQL_TYPE_TIMESTAMP)
    ) {
        return epoch_to_rfc3339(&text)
            .map(Some)
            .ok_or_else(|| undecodable(format!("`{text}` is not seconds since the epoch")));
    }
    Ok(Some(text))
}

/// `1733211234.123456` (seconds since the epoch, up to six decimals) as
/// RFC 3339 in UTC.
pub fn epoch_to_rfc3339(text: &str) -> Option<String> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    let t = DateTime::from_timestamp(secs, nanos)?;
    Some(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

/// A mysql_async error as a [`SourceError`]: what the server refused
/// (purged position, duplicate server id, missing grant) needs a person;
/// a lost connection is retried.
fn classify(e: mysql_async::Error, from: &Position) -> SourceError {
    match e {
        mysql_async::Error::Server(s) => match s.code {
            1236 => SourceError::operator(
                Cause::LogPurged,
                format!(
                    "the server's binlog no longer holds {from} (ERROR 1236: {}): the changes after it are gone. Resynchronise this site and run `sitesync checkpoint reset`",
                    s.message
                ),
            ),
            4052 => SourceError::operator(
                Cause::Busy,
                format!(
                    "ERROR 4052: {}: another replica or reader uses the same server id; give this connector a server id of its own",
                    s.message
                ),
            ),
            1045 | 1227 => SourceError::operator(
                Cause::PermissionDenied,
                format!(
                    "ERROR {}: {}: the login needs the REPLICATION SLAVE privilege (GRANT REPLICATION SLAVE ON *.* TO …)",
                    s.code, s.message
                ),
            ),
            code => SourceError::transient(Cause::Query, format!("ERROR {code}: {}", s.message)),
        },
        mysql_async::Error::Io(e) => SourceError::transient(Cause::Unreachable, e.to_string()),
        mysql_async::Error::Url(e) => SourceError::operator(Cause::Config, e.to_string()),
        other => SourceError::transient(Cause::Query, other.to_string()),
    }
}

/// Where the binlog can be read from its beginning: the oldest binlog file
/// the server still has, offset 4 (after the file's magic number). A
/// reader started there learns the GTID state from the file's GTID_LIST.
pub async fn oldest_position(conn: &mut Conn) -> Result<Position, SourceError> {
    let first: Option<(String, u64)> = conn
        .query_first("SHOW BINARY LOGS")
        .await
        .map_err(|e| SourceError::transient(Cause::Query, format!("SHOW BINARY LOGS: {e}")))?;
    let (name, _) = first.ok_or_else(|| {
        SourceError::operator(
            Cause::ServerSettings,
            "SHOW BINARY LOGS lists no file: the server writes no binlog (start it with --log-bin)",
        )
    })?;
    let file = name
        .parse()
        .map_err(|e: String| SourceError::transient(Cause::Query, e))?;
    Ok(Position::new(None, file, 4, 0))
}

/// The end of the binlog: `@@gtid_binlog_pos` where the server has GTIDs,
/// and `SHOW MASTER STATUS`.
pub async fn current_position(conn: &mut Conn) -> Result<Position, SourceError> {
    let query = |e: mysql_async::Error| SourceError::transient(Cause::Query, e.to_string());
    let status: Option<Row> = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .map_err(query)?;
    let status = status.ok_or_else(|| {
        SourceError::operator(
            Cause::ServerSettings,
            "SHOW MASTER STATUS is empty: the server writes no binlog (start it with --log-bin)",
        )
    })?;
    let name: String = status.get(0).unwrap_or_default();
    let offset: u64 = status.get(1).unwrap_or_default();
    let gtid: Option<String> = conn
        .query_first("SELECT @@gtid_binlog_pos")
        .await
        .map_err(query)?;
    let state: MariaDbState = gtid
        .unwrap_or_default()
        .parse()
        .map_err(|e: String| SourceError::transient(Cause::Query, e))?;
    let file = name
        .parse()
        .map_err(|e: String| SourceError::transient(Cause::Query, e))?;
    Ok(Position::new(Some(Gtids::MariaDb(state)), file, offset, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: &str = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
    const B: &str = "8a94f357-aab4-11df-86ab-c80aa9429563";

    #[test]
    fn a_mysql_set_is_asked_for_as_its_intervals_and_grows_by_each_transaction() {
        let set: MySqlSet = format!("{A}:1-5:7,{B}:1-3").parse().unwrap();
        // The dump request's Sids print as MySQL prints the set (their
        // intervals exclude the end; the text does not).
        let asked: Vec<String> = dump_sids(&set).iter().map(|s| s.to_string()).collect();
        assert_eq!(asked.join(","), set.to_string());
        assert_eq!(dump_sids(&set)[0].intervals().len(), 2);

        let mut state = Gtids::MySql(set);
        let a: Uuid = A.parse().unwrap();
        record(&mut state, TxGtid::MySql(a, 6));
        record(&mut state, TxGtid::MySql(a, 8));
        assert_eq!(state.to_string(), format!("{A}:1-8,{B}:1-3"));
        // A MariaDB GTID never lands in a MySQL set, nor the other way round.
        let mariadb = MariaDbGtid {
            domain: 0,
            server: 1,
            seq: 9,
        };
        record(&mut state, TxGtid::MariaDb(mariadb));
        assert_eq!(state.to_string(), format!("{A}:1-8,{B}:1-3"));
        let mut other = Gtids::MariaDb("0-1-5".parse().unwrap());
        record(&mut other, TxGtid::MySql(a, 1));
        record(&mut other, TxGtid::MariaDb(mariadb));
        assert_eq!(other.to_string(), "0-1-9");
    }

    #[test]
    fn a_previous_gtids_event_gives_the_set_before_its_file() {
        use mysql_async::binlog::events::PreviousGtidsSid;
        let a: Uuid = A.parse().unwrap();
        let b: Uuid = B.parse().unwrap();
        let event = PreviousGtidsEvent::new(vec![
            PreviousGtidsSid::new(
                *a.as_bytes(),
                None,
                vec![
                    mysql_async::GnoInterval::new(1, 6),
                    mysql_async::GnoInterval::new(7, 8),
                ],
            ),
            // An empty interval (end not past start) holds nothing.
            PreviousGtidsSid::new(
                *b.as_bytes(),
                None,
                vec![mysql_async::GnoInterval::new(4, 4)],
            ),
        ]);
        let set = previous_gtids(&event);
        assert_eq!(set.to_string(), format!("{A}:1-5:7"));
        assert!(previous_gtids(&PreviousGtidsEvent::new(Vec::new())).is_empty());
    }

    #[test]
    fn mariadb_gtid_events_are_decoded() {
        let mut data = 10u64.to_le_bytes().to_vec();
        data.extend(7u32.to_le_bytes());
        data.push(FL_STANDALONE);
        assert_eq!(decode_gtid(&data).unwrap(), (10, 7, 1));
        let e = decode_gtid(&data[..12]).unwrap_err();
        assert!(e.message().contains("12 bytes"), "{e}");

        let mut list = (2u32 | 0x1000_0000).to_le_bytes().to_vec();
        for (domain, server, seq) in [(0u32, 1u32, 10u64), (3, 2, 5)] {
            list.extend(domain.to_le_bytes());
            list.extend(server.to_le_bytes());
            list.extend(seq.to_le_bytes());
        }
        assert_eq!(
            decode_gtid_list(&list).unwrap().to_string(),
            "0-1-10,3-2-5",
            "the flags in the count's high bits are ignored"
        );
        let e = decode_gtid_list(&list[..30]).unwrap_err();
        assert!(e.message().contains("GTID 1 of 2 is cut short"), "{e}");
    }

    #[test]
    fn timestamps_arrive_as_epoch_seconds() {
        assert_eq!(
            epoch_to_rfc3339("1733211234.123456").as_deref(),
            Some("2024-12-03T07:33:54.123456Z")
        );
        assert_eq!(
            epoch_to_rfc3339("0").as_deref(),
            Some("1970-01-01T00:00:00.000000Z")
        );
        assert_eq!(
            epoch_to_rfc3339("1.5").as_deref(),
            Some("1970-01-01T00:00:01.500000Z")
        );
        assert_eq!(epoch_to_rfc3339("x"), None);
        assert_eq!(epoch_to_rfc3339("1.-5"), None);
    }

    #[test]
    fn an_unknown_domain_is_refused_by_name() {
        let from: Position = "mariadb:0-1-10,5-1-3@mysql-bin.000001:400".parse().unwrap();
        let Some(Gtids::MariaDb(state)) = &from.gtid else {
            unreachable!()
        };
        assert!(check_domains(state, "0-1-12,5-1-3", &from).is_ok());
        let e = check_domains(state, "0-1-12", &from).unwrap_err();
        assert_eq!(e.cause(), Cause::LogPurged);
        assert!(
            e.message().contains(
                "the GTID 5-1-3 is of domain 5, which this server's binlog does not know"
            ),
            "{e}"
        );
    }

    /// A ROTATE event's header (the server's first, made up one).
    const ROTATE_HEADER: [u8; 19] = [
        0, 0, 0, 0, 4, 1, 0, 0, 0, 0x2f, 0, 0, 0, 0, 0, 0, 0, 0x20, 0,
    ];

    /// A ROTATE event's body naming `name` at `pos`, with its checksum.
    fn rotate(pos: u64, name: &[u8], checksum: bool) -> Vec<u8> {
        let mut data = pos.to_le_bytes().to_vec();
        data.extend_from_slice(name);
        if checksum {
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&ROTATE_HEADER);
            hasher.update(&data);
            data.extend(hasher.finalize().to_le_bytes());
        }
        data
    }

    /// A GTID_LIST event's body.
    fn gtid_list(state: &MariaDbState) -> Vec<u8> {
        let mut list = (state.iter().count() as u32).to_le_bytes().to_vec();
        for g in state.iter() {
            list.extend(g.domain.to_le_bytes());
            list.extend(g.server.to_le_bytes());
            list.extend(g.seq.to_le_bytes());
        }
        list
    }

    #[test]
    fn rotate_events_name_their_file_with_or_without_a_checksum() {
        for checksum in [true, false] {
            let data = rotate(4, b"mariadb-bin.000001", checksum);
            assert_eq!(
                rotate_file_name(&ROTATE_HEADER, &data).unwrap(),
                "mariadb-bin.000001"
            );
        }
        let e = rotate_file_name(&ROTATE_HEADER, &[0; 7]).unwrap_err();
        assert!(e.message().contains("a ROTATE event of 7 bytes"), "{e}");
        let e = rotate_file_name(&ROTATE_HEADER, &rotate(4, b"\xff.1", false)).unwrap_err();
        assert!(e.message().contains("not UTF-8"), "{e}");
    }

    #[test]
    fn a_gtid_list_announcing_more_gtids_than_it_holds_fails_at_the_first_missing() {
        let e = decode_gtid_list(&0x0fff_ffffu32.to_le_bytes()).unwrap_err();
        assert!(
            e.message().contains("GTID 0 of 268435455 is cut short"),
            "{e}"
        );
    }

    fn state() -> impl Strategy<Value = MariaDbState> {
        crate::engine::mariadb::position::tests::mariadb_states(0..5)
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_say_why(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            match decode_gtid(&data) {
                Ok((seq, domain, _)) => {
                    prop_assert_eq!(&seq.to_le_bytes()[..], &data[..8]);
                    prop_assert_eq!(&domain.to_le_bytes()[..], &data[8..12]);
                }
                Err(e) => prop_assert!(e.message().contains("a GTID event of"), "{}", e),
            }
            match decode_gtid_list(&data) {
                Ok(state) => prop_assert_eq!(
                    state.to_string().parse::<MariaDbState>(),
                    Ok(state.clone())
                ),
                Err(e) => prop_assert!(e.message().contains("a GTID_LIST event of"), "{}", e),
            }
            let mut header = ROTATE_HEADER;
            header.copy_from_slice(&[data.as_slice(), &ROTATE_HEADER].concat()[..19]);
            match rotate_file_name(&header, &data) {
                Ok(name) => prop_assert!(data.len() >= 8 && data[8..].starts_with(name.as_bytes())),
                Err(e) => prop_assert!(e.message().contains("a ROTATE event"), "{}", e),
            }
        }

        #[test]
        fn gtid_lists_round_trip(state in state()) {
            prop_assert_eq!(decode_gtid_list(&gtid_list(&state)).unwrap(), state);
        }

        #[test]
        fn rotate_names_round_trip(pos in any::<u64>(), name in "[a-z0-9_.-]{0,20}", checksum in any::<bool>()) {
            let data = rotate(pos, name.as_bytes(), checksum);
            prop_assert_eq!(rotate_file_name(&ROTATE_HEADER, &data).unwrap(), name);
        }

        #[test]
        fn epoch_seconds_become_the_same_instant(secs in 0i64..=u32::MAX.into(), micros in 0u32..1_000_000) {
            let text = if micros == 0 { secs.to_string() } else { format!("{secs}.{micros:06}") };
            let rfc3339 = epoch_to_rfc3339(&text).unwrap();
            let expected = DateTime::from_timestamp(secs, micros * 1000).unwrap();
            prop_assert_eq!(crate::event::parse_timestamp(&rfc3339), Some(expected));
        }

        #[test]
        fn epoch_text_never_panics(text in prop_oneof![any::<String>(), "-?[0-9]{0,22}(\\.[0-9]{0,12})?"]) {
            let _ = epoch_to_rfc3339(&text);
        }
    }
}
