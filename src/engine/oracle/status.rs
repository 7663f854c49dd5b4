//! What `sitesync status` reads from an Oracle site.

use super::conn::{OracleConnect, blocking, db_error, outbox_names};
use super::miner::{ABANDONED_SELECT, ABANDONED_TABLE};
use super::settings::Settings;
use super::transactions::Abandoned;
use crate::error::{Cause, SourceError};
use crate::status::SiteStatus;

/// Times come back as text in this form (UTC).
const UTC: &str = "YYYY-MM-DD\"T\"HH24:MI:SS.FF6\"Z\"";

/// Every row of `sql`, each column as text.
fn texts(
    conn: &oracle::Connection,
    sql: &str,
    context: &str,
) -> Result<Vec<Vec<Option<String>>>, SourceError> {
    let rows = conn.query(sql, &[]).map_err(|e| db_error(context, &e))?;
    let mut out = Vec::new();
    for row in rows {
        let row = row.map_err(|e| db_error(context, &e))?;
        let cells = (0..row.sql_values().len())
            .map(|i| row.get::<usize, Option<String>>(i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| db_error(context, &e))?;
        out.push(cells);
    }
    Ok(out)
}

fn unreadable(context: &str) -> impl Fn(String) -> SourceError + '_ {
    move |e| SourceError::transient(Cause::Query, format!("{context}: {e}"))
}

/// Reads the status of an Oracle site.
pub async fn read(db: &Settings) -> Result<SiteStatus, SourceError> {
    let connect = OracleConnect::new(db)?;
    let (owner, table) = outbox_names(&db.outbox_table, &connect.url.user);
    blocking(move || {
        let conn = connect.connect()?;
        let ready = texts(
            &conn,
            "SELECT COUNT(*) FROM USER_TABLES WHERE TABLE_NAME = 'SITESYNC_ORIGINS'",
            "looking for the sink tables",
        )?;
        if ready.first().and_then(|r| r[0].as_deref()) != Some("1") {
            return Err(SourceError::operator(
                Cause::NotInitialised,
                "the sink tables do not exist: run `sitesync init`",
            ));
        }
        let origins = texts(
            &conn,
            &format!("SELECT ORIGIN, EPOCH, SEQ, TO_CHAR(UPDATED_AT AT TIME ZONE 'UTC', '{UTC}') FROM SITESYNC_ORIGINS ORDER BY ORIGIN"),
            "reading SITESYNC_ORIGINS",
        )?;
        let gaps = texts(
            &conn,
            &format!("SELECT ORIGIN, EPOCH, FROM_SEQ, TO_SEQ, TO_CHAR(DETECTED_AT AT TIME ZONE 'UTC', '{UTC}'), NOTE FROM SITESYNC_GAPS ORDER BY DETECTED_AT, ID"),
            "reading SITESYNC_GAPS",
        )?;
        let counts = texts(
            &conn,
            &format!(
                "SELECT (SELECT COUNT(*) FROM SITESYNC_CONFLICTS), \
                        (SELECT COUNT(*) FROM SITESYNC_INBOX WHERE OUTCOME = 'dead_letter'), \
                        (SELECT COUNT(*) FROM \"{owner}\".\"{table}\") FROM DUAL"
            ),
            "counting conflicts, dead letters and the outbox",
        )?;
        let mut status = SiteStatus::from_text(
            &origins,
            &gaps,
            counts.first().map(Vec::as_slice).unwrap_or_default(),
            ("SITESYNC_ORIGINS", "SITESYNC_GAPS"),
        )?;
        let scn = texts(
            &conn,
            "SELECT CURRENT_SCN FROM V$DATABASE",
            "reading V$DATABASE.CURRENT_SCN",
        )?;
        status.source_lag = match scn.first().and_then(|r| r[0].clone()) {
            Some(scn) => format!(
                "the database at SCN {scn} (the checkpoint's SCN: `sitesync checkpoint show`)"
            ),
            None => "the database's SCN is not readable".to_string(),
        };
        let recorded = texts(
            &conn,
            &format!("SELECT COUNT(*) FROM USER_TABLES WHERE TABLE_NAME = '{ABANDONED_TABLE}'"),
            "looking for SITESYNC_ABANDONED_TX",
        )?;
        status.source_notes = if recorded.first().and_then(|r| r[0].as_deref()) == Some("1") {
            abandoned_notes(&texts(&conn, ABANDONED_SELECT, "reading SITESYNC_ABANDONED_TX")?)
                .map_err(unreadable("reading SITESYNC_ABANDONED_TX"))?
        } else {
            vec![format!(
                "{ABANDONED_TABLE} is missing: transactions abandoned past database.transaction_retention cannot be listed (run `sitesync init`)"
            )]
        };
        Ok(status)
    })
    .await
}

/// At most this many abandoned transactions are listed, newest first.
const ABANDONED_SHOWN: usize = 20;

/// The status lines for the rows of `SITESYNC_ABANDONED_TX` (newest
/// first), read as text.
pub fn abandoned_notes(rows: &[Vec<Option<String>>]) -> Result<Vec<String>, String> {
    let mut notes = rows
        .iter()
        .take(ABANDONED_SHOWN)
        .map(|r| Abandoned::from_text(r).map(|a| a.status_line()))
        .collect::<Result<Vec<_>, _>>()?;
    if rows.len() > ABANDONED_SHOWN {
        notes.push(format!(
            "… and {} older abandoned transaction(s) in {ABANDONED_TABLE}",
            rows.len() - ABANDONED_SHOWN
        ));
    }
    Ok(notes)
}
