//! The archive table in Oracle (see [`crate::archive`]).
//!
//! A batch is one transaction: one `MERGE … WHEN NOT MATCHED THEN INSERT`
//! per event (binds, as the sink's statements), which skips an event the
//! table holds, then `COMMIT`; any error rolls the batch back. The `oracle`
//! crate is blocking: the batch runs on `spawn_blocking`, on the archive's
//! one connection. The payload goes into a `CLOB`, bound in the `VALUES`
//! clause (a bind in the `USING` query would be a `VARCHAR2`, at most
//! 32,767 bytes).

use super::conn::{OracleConnect, outbox_names};
use super::settings::Settings;
use super::target::oracle_table;
use crate::archive::{Cursor, Store, archived_event};
use crate::checks::Check;
use crate::config::{ArchiveConfig, ConnectorConfig, DEFAULT_ARCHIVE_TABLE};
use crate::error::{Cause, TargetError};
use crate::event::Event;
use std::sync::{Arc, Mutex};

/// Timestamps travel as text in this form (UTC), as the sink's do.
const TS_FORMAT: &str = "YYYY-MM-DD\"T\"HH24:MI:SS.FF6TZH:TZM";

/// The archive table of an Oracle site.
pub struct OracleArchive {
    connect: OracleConnect,
    /// `OWNER.TABLE` as written in messages.
    name: String,
    /// Quoted.
    quoted: String,
    conn: Arc<Mutex<Option<oracle::Connection>>>,
}

/// The table and its indexes, one statement each (Oracle runs one at a
/// time); `bare` is the table's name without its owner, for the indexes'.
pub fn ddl(table: &str, bare: &str) -> Vec<String> {
    let ix = |what: &str| oracle_table(&format!("{bare}_{what}"));
    vec![
        format!(
            "CREATE TABLE {table} (EVENT_ID VARCHAR2(36) PRIMARY KEY, ORIGIN VARCHAR2(64) NOT NULL, EPOCH NUMBER(19) NOT NULL, SEQ NUMBER(19) NOT NULL, TYPE VARCHAR2(255) NOT NULL, ENTITY_KEY VARCHAR2(4000), EVENT_TS TIMESTAMP(6) WITH TIME ZONE NOT NULL, DATA CLOB NOT NULL, RECEIVED_AT TIMESTAMP(6) WITH TIME ZONE DEFAULT SYSTIMESTAMP NOT NULL)"
        ),
        format!(
            "CREATE INDEX {} ON {table} (ORIGIN, EPOCH, SEQ)",
            ix("ORIGIN_SEQ")
        ),
        format!("CREATE INDEX {} ON {table} (RECEIVED_AT)", ix("RECEIVED")),
        format!("CREATE INDEX {} ON {table} (EVENT_TS)", ix("EVENT_TS")),
    ]
}

/// The insert of one event, binds `:1` (its id, for the match) to `:9`.
pub fn merge_sql(table: &str) -> String {
    format!(
        "MERGE INTO {table} a USING (SELECT :1 EVENT_ID FROM DUAL) s ON (a.EVENT_ID = s.EVENT_ID) \
         WHEN NOT MATCHED THEN INSERT (EVENT_ID, ORIGIN, EPOCH, SEQ, TYPE, ENTITY_KEY, EVENT_TS, DATA) \
         VALUES (:2, :3, :4, :5, :6, :7, TO_TIMESTAMP_TZ(:8, '{TS_FORMAT}'), :9)"
    )
}

/// A page of the archive in `(ORIGIN, EPOCH, SEQ)` order; binds: the
/// origin twice (or NULL), then when `keyset` the cursor's origin, epoch,
/// epoch again, seq (Oracle binds by position in the text).
pub fn read_sql(table: &str, keyset: bool, limit: usize) -> String {
    let after = if keyset {
        " AND (ORIGIN > :3 OR (ORIGIN = :4 AND (EPOCH > :5 OR (EPOCH = :6 AND SEQ > :7))))"
    } else {
        ""
    };
    format!(
        "SELECT EVENT_ID, ORIGIN, EPOCH, SEQ, TYPE, ENTITY_KEY, \
         TO_CHAR(SYS_EXTRACT_UTC(EVENT_TS), 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6\"Z\"'), DATA FROM {table} \
         WHERE (:1 IS NULL OR ORIGIN = :2){after} ORDER BY ORIGIN, EPOCH, SEQ FETCH FIRST {limit} ROWS ONLY"
    )
}

/// The event's time as [`TS_FORMAT`] reads it.
pub fn ts_text(e: &Event) -> String {
    e.timestamp
        .format("%Y-%m-%dT%H:%M:%S%.6f+00:00")
        .to_string()
}

/// An error of the archive: ORA-00942 (no such table) needs `sitesync
/// init`; the others are retried.
fn archive_error(context: &str, e: &oracle::Error) -> TargetError {
    let text = e.to_string();
    if text.contains("ORA-00942") {
        TargetError::operator(
            Cause::NotInitialised,
            format!("{context}: {text}: run `sitesync init`"),
        )
    } else {
        TargetError::transient(Cause::Query, format!("{context}: {text}"))
    }
}

fn task_failed(e: tokio::task::JoinError) -> TargetError {
    TargetError::transient(Cause::Query, format!("the Oracle archive task failed: {e}"))
}

impl OracleArchive {
    pub fn new(
        _cfg: &ConnectorConfig,
        db: &Settings,
        archive: &ArchiveConfig,
    ) -> Result<OracleArchive, TargetError> {
        let connect = OracleConnect::new(db)?;
        let (owner, _) = outbox_names(&db.outbox_table, &connect.url.user);
        let name = match &archive.table {
            Some(t) if t.contains('.') => t.clone(),
            Some(t) => format!("{owner}.{t}"),
            None => format!("{owner}.{}", DEFAULT_ARCHIVE_TABLE.to_uppercase()),
        };
        Ok(OracleArchive {
            quoted: oracle_table(&name),
            name,
            connect,
            conn: Arc::new(Mutex::new(None)),
        })
    }

    /// The bare table name (for index names and `ALL_TABLES`).
    fn parts(&self) -> (String, String) {
        let (owner, table) = self.name.split_once('.').expect("owner-qualified");
        (owner.to_uppercase(), table.to_uppercase())
    }
}

impl Store for OracleArchive {
    fn table(&self) -> &str {
        &self.name
    }

    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let connect = self.connect.clone();
        let (owner, bare) = self.parts();
        let (table, name) = (self.quoted.clone(), self.name.clone());
        tokio::task::spawn_blocking(move || {
            let conn = connect.connect()?;
            let n: i64 = conn
                .query_row_as(
                    "SELECT COUNT(*) FROM ALL_TABLES WHERE OWNER = :1 AND TABLE_NAME = :2",
                    &[&owner, &bare],
                )
                .map_err(|e| archive_error("looking for the archive table", &e))?;
            if n > 0 {
                return Ok(vec![format!("archive table {name}: already there")]);
            }
            for st in ddl(&table, &bare) {
                conn.execute(&st, &[]).map_err(|e| {
                    TargetError::operator(
                        super::conn::cause_of(&e.to_string()),
                        format!("creating the archive table {name}: {e}"),
                    )
                })?;
            }
            Ok(vec![format!(
                "archive table {name}: created (indexed by ORIGIN, EPOCH, SEQ; RECEIVED_AT; EVENT_TS)"
            )])
        })
        .await
        .map_err(task_failed)?
    }

    async fn preflight(&self) -> Vec<Check> {
        let connect = self.connect.clone();
        let (owner, bare) = self.parts();
        let name = self.name.clone();
        let run = tokio::task::spawn_blocking(move || {
            let conn = match connect.connect() {
                Ok(c) => c,
                Err(e) => return Check::fail("archive table", e.message(), "check database.url"),
            };
            match conn.query_row_as::<i64>(
                "SELECT COUNT(*) FROM ALL_TABLES WHERE OWNER = :1 AND TABLE_NAME = :2",
                &[&owner, &bare],
            ) {
                Ok(n) if n > 0 => Check::pass("archive table", name),
                Ok(_) => Check::fail(
                    "archive table",
                    format!("{name} does not exist"),
                    "run `sitesync init`",
                ),
                Err(e) => Check::fail("archive table", e.to_string(), "check the user's grants"),
            }
        });
        match run.await {
            Ok(check) => vec![check],
            Err(e) => vec![Check::fail(
                "archive table",
                e.to_string(),
                "see the message",
            )],
        }
    }

    async fn write<'a>(&'a self, events: &'a [&'a Event]) -> Result<u64, TargetError> {
        if events.is_empty() {
            return Ok(0);
        }
        let rows: Vec<[String; 9]> = events
            .iter()
            .map(|e| {
                let id = e.id.to_string();
                [
                    id.clone(),
                    id,
                    e.origin.clone(),
                    e.epoch.to_string(),
                    e.seq.to_string(),
                    e.kind.clone(),
                    e.entity_key.clone().unwrap_or_default(),
                    ts_text(e),
                    e.data.get().to_string(),
                ]
            })
            .collect();
        let keys: Vec<bool> = events.iter().map(|e| e.entity_key.is_some()).collect();
        let (connect, slot, sql) = (
            self.connect.clone(),
            self.conn.clone(),
            merge_sql(&self.quoted),
        );
        tokio::task::spawn_blocking(move || {
            let mut guard = slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if guard.is_none() {
                *guard = Some(connect.connect()?);
            }
            let conn = guard.as_ref().expect("connected above");
            let mut new = 0;
            let mut run = || -> Result<(), oracle::Error> {
                for (row, has_key) in rows.iter().zip(&keys) {
                    let key: Option<&str> = has_key.then_some(row[6].as_str());
                    let (epoch, seq): (i64, i64) = (
                        row[3].parse().unwrap_or_default(),
                        row[4].parse().unwrap_or_default(),
                    );
                    let st = conn.execute(
                        &sql,
                        &[
                            &row[0], &row[1], &row[2], &epoch, &seq, &row[5], &key, &row[7],
                            &row[8],
                        ],
                    )?;
                    new += st.row_count()?;
                }
                conn.commit()
            };
            match run() {
                Ok(()) => Ok(new),
                Err(e) => {
                    let _ = conn.rollback();
                    let err = archive_error("archiving a batch", &e);
                    // A new connection for the next try.
                    *guard = None;
                    Err(err)
                }
            }
        })
        .await
        .map_err(task_failed)?
    }

    async fn read<'a>(
        &'a self,
        after: Option<&'a Cursor>,
        origin: Option<&'a str>,
        limit: usize,
    ) -> Result<Vec<Event>, TargetError> {
        let connect = self.connect.clone();
        let sql = read_sql(&self.quoted, after.is_some(), limit);
        let after = after.cloned();
        let origin = origin.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let conn = connect.connect()?;
            let read = || -> Result<Vec<Event>, TargetError> {
                let rows = match &after {
                    Some((o, epoch, seq)) => {
                        conn.query(&sql, &[&origin, &origin, o, o, epoch, epoch, seq])
                    }
                    None => conn.query(&sql, &[&origin, &origin]),
                }
                .map_err(|e| archive_error("reading the archive", &e))?;
                let mut out = Vec::new();
                for row in rows {
                    let row = row.map_err(|e| archive_error("reading the archive", &e))?;
                    let get = |e: oracle::Error| archive_error("reading the archive", &e);
                    let (id, origin, epoch, seq, kind, key, ts, data): (
                        String,
                        String,
                        i64,
                        i64,
                        String,
                        Option<String>,
                        String,
                        String,
                    ) = row.get_as().map_err(get)?;
                    out.push(archived_event(
                        &id, origin, epoch, seq, kind, key, &ts, data,
                    )?);
                }
                Ok(out)
            };
            read()
        })
        .await
        .map_err(task_failed)?
    }

    async fn count(&self) -> Result<u64, TargetError> {
        let connect = self.connect.clone();
        let sql = format!("SELECT COUNT(*) FROM {}", self.quoted);
        tokio::task::spawn_blocking(move || {
            let conn = connect.connect()?;
            let n: i64 = conn
                .query_row_as(&sql, &[])
                .map_err(|e| archive_error("counting the archive", &e))?;
            Ok(n as u64)
        })
        .await
        .map_err(task_failed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_merge_per_event_binds_in_textual_order() {
        let sql = merge_sql("\"APP\".\"SITESYNC_ARCHIVE\"");
        // Oracle binds by position in the text: the id for the match
        // first, then the nine columns' values in order.
        let order: Vec<usize> = (1..=9)
            .map(|n| sql.find(&format!(":{n}")).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{sql}");
        assert!(sql.contains("WHEN NOT MATCHED THEN INSERT"), "{sql}");
        assert!(
            !sql.contains("WHEN MATCHED"),
            "an archived event is never changed: {sql}"
        );
        let ddl = ddl("\"APP\".\"SITESYNC_ARCHIVE\"", "SITESYNC_ARCHIVE");
        assert_eq!(ddl.len(), 4);
        assert!(
            ddl[0].contains("EVENT_ID VARCHAR2(36) PRIMARY KEY"),
            "{}",
            ddl[0]
        );
        assert!(ddl[0].contains("DATA CLOB NOT NULL"), "{}", ddl[0]);
        assert!(ddl[1].contains("\"SITESYNC_ARCHIVE_ORIGIN_SEQ\" ON \"APP\".\"SITESYNC_ARCHIVE\" (ORIGIN, EPOCH, SEQ)"), "{}", ddl[1]);
    }

    #[test]
    fn the_archive_is_read_back_in_each_origins_order_with_binds_in_textual_order() {
        let sql = read_sql("\"APP\".\"SITESYNC_ARCHIVE\"", true, 500);
        let order: Vec<usize> = (1..=7)
            .map(|n| sql.find(&format!(":{n}")).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{sql}");
        assert!(
            sql.ends_with("ORDER BY ORIGIN, EPOCH, SEQ FETCH FIRST 500 ROWS ONLY"),
            "{sql}"
        );
        let first = read_sql("T", false, 10);
        assert!(!first.contains(":3"), "{first}");
    }

    #[test]
    fn times_go_as_utc_text_in_the_sinks_format() {
        let body = r#"{"id":"0190a0e0-0000-7000-8000-000000000001","timestamp":"2026-01-02T03:04:05.5Z","origin":"PARIS","type":"t","entity_key":null,"data":{},"epoch":1,"seq":1}"#;
        let e = Event::from_body(body.as_bytes()).unwrap();
        assert_eq!(ts_text(&e), "2026-01-02T03:04:05.500000+00:00");
    }
}
