//! `SITESYNC_AUDIT` in Oracle (see [`crate::audit`]). Times are
//! `TIMESTAMP(6)` in UTC (`SYS_EXTRACT_UTC(SYSTIMESTAMP)`, the server's
//! clock, as for jobs). The `oracle` crate is blocking: each call runs on
//! `spawn_blocking`, on a connection of its own (an action is recorded
//! once, not per row). `AT` is quoted: it is a PL/SQL reserved word.

use super::conn::OracleConnect;
use super::jobs::{failed, task_failed};
use super::settings::Settings;
use crate::audit::{AuditLog, Entry, entry};
use crate::checks::Check;
use crate::error::{Cause, TargetError};

/// The table, created when `USER_TABLES` does not list it. `DETAIL` is
/// at most [`crate::audit::MAX_DETAIL`] bytes (an empty one reads back as
/// NULL, taken as empty).
pub const DDL: &str = "CREATE TABLE SITESYNC_AUDIT (ID VARCHAR2(36) PRIMARY KEY, \"AT\" TIMESTAMP(6) NOT NULL, \
    WHO VARCHAR2(255) NOT NULL, VIA VARCHAR2(8) NOT NULL, ACTION VARCHAR2(32) NOT NULL, ARGUMENTS CLOB NOT NULL, \
    RESULT VARCHAR2(8) NOT NULL, DETAIL VARCHAR2(4000))";

/// The index for `sitesync audit`'s newest-first listing.
pub const INDEX: &str = "CREATE INDEX SITESYNC_AUDIT_AT ON SITESYNC_AUDIT (\"AT\")";

const EXISTS: &str = "SELECT COUNT(*) FROM USER_TABLES WHERE TABLE_NAME = 'SITESYNC_AUDIT'";

/// The insert; binds `:1` to `:7` (id, who, via, action, arguments,
/// result, detail).
pub fn insert_sql() -> &'static str {
    "INSERT INTO SITESYNC_AUDIT (ID, \"AT\", WHO, VIA, ACTION, ARGUMENTS, RESULT, DETAIL) \
     VALUES (:1, SYS_EXTRACT_UTC(SYSTIMESTAMP), :2, :3, :4, :5, :6, :7)"
}

/// The latest `limit` entries; `:1` and `:2` the action or NULL.
pub fn list_sql(limit: usize) -> String {
    format!(
        "SELECT ID, TO_CHAR(\"AT\", 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6') || 'Z', WHO, VIA, ACTION, ARGUMENTS, RESULT, DETAIL \
         FROM SITESYNC_AUDIT WHERE (:1 IS NULL OR ACTION = :2) ORDER BY \"AT\" DESC, ID FETCH FIRST {limit} ROWS ONLY"
    )
}

/// `SITESYNC_AUDIT` of an Oracle site.
pub struct OracleAudit {
    connect: OracleConnect,
}

impl OracleAudit {
    pub fn new(db: &Settings) -> Result<OracleAudit, TargetError> {
        Ok(OracleAudit {
            connect: OracleConnect::new(db)?,
        })
    }

    /// Runs `work` on a connection of its own, off the async threads.
    async fn on_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&oracle::Connection) -> Result<T, TargetError> + Send + 'static,
    ) -> Result<T, TargetError> {
        let connect = self.connect.clone();
        tokio::task::spawn_blocking(move || {
            let conn = connect.connect()?;
            work(&conn)
        })
        .await
        .map_err(task_failed)?
    }
}

fn row(r: &oracle::Row) -> Result<Entry, TargetError> {
    let bad = |e: oracle::Error| failed("reading SITESYNC_AUDIT", &e);
    let id: String = r.get(0).map_err(bad)?;
    let at: String = r.get(1).map_err(bad)?;
    let at = crate::event::parse_timestamp(&at).ok_or_else(|| {
        TargetError::operator(
            Cause::Query,
            format!("the SITESYNC_AUDIT row {id} has an unreadable time `{at}`"),
        )
    })?;
    let via: String = r.get(3).map_err(bad)?;
    let arguments: String = r.get(5).map_err(bad)?;
    let result: String = r.get(6).map_err(bad)?;
    entry(
        &id,
        at,
        r.get(2).map_err(bad)?,
        &via,
        r.get(4).map_err(bad)?,
        &arguments,
        &result,
        r.get(7).map_err(bad)?,
    )
}

impl AuditLog for OracleAudit {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        self.on_connection(|c| {
            let n: i64 = c
                .query_row_as(EXISTS, &[])
                .map_err(|e| failed("looking for SITESYNC_AUDIT", &e))?;
            if n > 0 {
                return Ok(vec![
                    "audit table SITESYNC_AUDIT: already there".to_string(),
                ]);
            }
            for st in [DDL, INDEX] {
                c.execute(st, &[])
                    .map_err(|e| failed("creating SITESYNC_AUDIT", &e))?;
            }
            Ok(vec!["audit table SITESYNC_AUDIT: created".to_string()])
        })
        .await
    }

    async fn preflight(&self) -> Vec<Check> {
        let found = self
            .on_connection(|c| {
                c.query_row_as::<i64>(EXISTS, &[])
                    .map_err(|e| failed("looking for SITESYNC_AUDIT", &e))
            })
            .await;
        match found {
            Ok(n) if n > 0 => vec![Check::pass("audit table", "SITESYNC_AUDIT")],
            Ok(_) => vec![Check::fail(
                "audit table",
                "SITESYNC_AUDIT does not exist",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "audit table",
                e.to_string(),
                "check database.url and the user's grants",
            )],
        }
    }

    async fn insert<'a>(&'a self, e: &'a Entry) -> Result<(), TargetError> {
        let binds = (
            e.id.to_string(),
            e.who.clone(),
            e.via.as_str().to_string(),
            e.action.clone(),
            e.arguments.to_string(),
            e.result.as_str().to_string(),
            e.detail.clone(),
        );
        self.on_connection(move |c| {
            let context = "recording the action in SITESYNC_AUDIT";
            c.execute(
                insert_sql(),
                &[
                    &binds.0, &binds.1, &binds.2, &binds.3, &binds.4, &binds.5, &binds.6,
                ],
            )
            .map_err(|e| failed(context, &e))?;
            c.commit().map_err(|e| failed(context, &e))
        })
        .await
    }

    async fn list<'a>(
        &'a self,
        limit: usize,
        action: Option<&'a str>,
    ) -> Result<Vec<Entry>, TargetError> {
        let action = action.map(str::to_string);
        self.on_connection(move |c| {
            let rows = c
                .query(&list_sql(limit), &[&action, &action])
                .map_err(|e| failed("reading SITESYNC_AUDIT", &e))?;
            rows.map(|r| row(&r.map_err(|e| failed("reading SITESYNC_AUDIT", &e))?))
                .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statements_keep_utc_time_on_the_server_and_bind_in_textual_order() {
        let s = insert_sql();
        assert!(
            s.contains("VALUES (:1, SYS_EXTRACT_UTC(SYSTIMESTAMP), :2, :3, :4, :5, :6, :7)"),
            "{s}"
        );
        let l = list_sql(20);
        assert!(
            l.contains("(:1 IS NULL OR ACTION = :2)")
                && l.ends_with("ORDER BY \"AT\" DESC, ID FETCH FIRST 20 ROWS ONLY"),
            "{l}"
        );
        assert!(DDL.starts_with("CREATE TABLE SITESYNC_AUDIT (ID VARCHAR2(36) PRIMARY KEY"));
        assert!(DDL.contains("DETAIL VARCHAR2(4000)"));
        assert_eq!(crate::audit::MAX_DETAIL, 4000, "the DETAIL column's size");
    }
}
