//! Purge in Oracle (see [`crate::purge`]).
//!
//! A batch is one `DELETE … WHERE old AND ROWNUM <= n` and a `COMMIT`:
//! Oracle locks only the rows it deletes and never blocks readers. Times
//! are compared with `SYSTIMESTAMP` (the tables' columns are `TIMESTAMP
//! WITH TIME ZONE`). The `oracle` crate is blocking: each call runs on
//! `spawn_blocking`.

use super::conn::OracleConnect;
use super::jobs::{failed, task_failed};
use super::settings::Settings;
use super::target::oracle_table;
use crate::checks::Check;
use crate::config::ConnectorConfig;
use crate::error::TargetError;
use crate::purge::{Table, Tables};

/// The purgeable tables of an Oracle site.
pub struct OraclePurge {
    connect: OracleConnect,
    /// The archive table (`OWNER.TABLE`), at the archiving site.
    archive: Option<String>,
}

/// `(table, time column)` of a purged table.
pub fn shape(table: Table, archive: &str) -> (String, &'static str) {
    match table {
        Table::Archive => (oracle_table(archive), "RECEIVED_AT"),
        Table::Inbox => ("SITESYNC_INBOX".into(), "APPLIED_AT"),
        Table::Conflicts => ("SITESYNC_CONFLICTS".into(), "REVIEWED_AT"),
    }
}

/// Rows older than `:1` days.
pub fn count_sql(table: &str, time: &str) -> String {
    format!("SELECT COUNT(*) FROM {table} WHERE {time} < SYSTIMESTAMP - NUMTODSINTERVAL(:1, 'DAY')")
}

/// Deletes at most `:2` rows older than `:1` days.
pub fn delete_sql(table: &str, time: &str) -> String {
    format!(
        "DELETE FROM {table} WHERE {time} < SYSTIMESTAMP - NUMTODSINTERVAL(:1, 'DAY') AND ROWNUM <= :2"
    )
}

/// Adds `REVIEWED_AT` (Oracle has no `ADD COLUMN IF NOT EXISTS`: `init`
/// asks `USER_TAB_COLUMNS` first).
pub const ADD_REVIEWED: &str =
    "ALTER TABLE SITESYNC_CONFLICTS ADD (REVIEWED_AT TIMESTAMP(6) WITH TIME ZONE)";

const HAS_REVIEWED: &str = "SELECT COUNT(*) FROM USER_TAB_COLUMNS WHERE TABLE_NAME = 'SITESYNC_CONFLICTS' AND COLUMN_NAME = 'REVIEWED_AT'";

impl OraclePurge {
    pub fn new(cfg: &ConnectorConfig, db: &Settings) -> Result<OraclePurge, TargetError> {
        let archive = match &cfg.archive {
            Some(a) => {
                use crate::archive::Store;
                Some(
                    super::archive::OracleArchive::new(cfg, db, a)?
                        .table()
                        .to_string(),
                )
            }
            None => None,
        };
        Ok(OraclePurge {
            connect: OracleConnect::new(db)?,
            archive,
        })
    }

    fn shape(&self, table: Table) -> (String, &'static str) {
        shape(table, self.archive.as_deref().unwrap_or("SITESYNC_ARCHIVE"))
    }

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

impl Tables for OraclePurge {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        self.on_connection(|c| {
            let n: i64 = c
                .query_row_as(HAS_REVIEWED, &[])
                .map_err(|e| failed("looking for SITESYNC_CONFLICTS.REVIEWED_AT", &e))?;
            if n == 0 {
                c.execute(ADD_REVIEWED, &[])
                    .map_err(|e| failed("adding SITESYNC_CONFLICTS.REVIEWED_AT", &e))?;
            }
            Ok(vec![
                "SITESYNC_CONFLICTS.REVIEWED_AT: ready (reviewed conflicts are purged after conflict_retention_days)".to_string(),
            ])
        })
        .await
    }

    async fn preflight(&self) -> Vec<Check> {
        let found = self
            .on_connection(|c| {
                c.query_row_as::<i64>(HAS_REVIEWED, &[])
                    .map_err(|e| failed("looking for SITESYNC_CONFLICTS.REVIEWED_AT", &e))
            })
            .await;
        match found {
            Ok(n) if n > 0 => vec![Check::pass(
                "conflicts review",
                "SITESYNC_CONFLICTS.REVIEWED_AT",
            )],
            Ok(_) => vec![Check::fail(
                "conflicts review",
                "SITESYNC_CONFLICTS has no REVIEWED_AT column (made by an older sitesync): the purge cannot tell reviewed conflicts",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "conflicts review",
                e.to_string(),
                "check database.url and the user's grants",
            )],
        }
    }

    fn name(&self, table: Table) -> String {
        match table {
            Table::Archive => self.archive.clone().unwrap_or_default(),
            t => shape(t, "").0,
        }
    }

    async fn count(&self, table: Table, days: u32) -> Result<u64, TargetError> {
        let (t, time) = self.shape(table);
        self.on_connection(move |c| {
            let n: i64 = c
                .query_row_as(&count_sql(&t, time), &[&i64::from(days)])
                .map_err(|e| failed(&format!("counting the old rows of {t}"), &e))?;
            Ok(n as u64)
        })
        .await
    }

    async fn delete(&self, table: Table, days: u32, limit: usize) -> Result<u64, TargetError> {
        let (t, time) = self.shape(table);
        self.on_connection(move |c| {
            let st = c
                .execute(&delete_sql(&t, time), &[&i64::from(days), &(limit as i64)])
                .map_err(|e| failed(&format!("purging {t}"), &e))?;
            let n = st
                .row_count()
                .map_err(|e| failed(&format!("purging {t}"), &e))?;
            c.commit()
                .map_err(|e| failed(&format!("purging {t}"), &e))?;
            Ok(n)
        })
        .await
    }

    async fn review<'a>(&'a self, ids: &'a [i64]) -> Result<Vec<i64>, TargetError> {
        let ids = ids.to_vec();
        self.on_connection(move |c| {
            let mut found = Vec::new();
            for id in ids {
                let st = c
                    .execute(
                        "UPDATE SITESYNC_CONFLICTS SET REVIEWED_AT = COALESCE(REVIEWED_AT, SYSTIMESTAMP) WHERE ID = :1",
                        &[&id],
                    )
                    .map_err(|e| failed("marking conflicts reviewed", &e))?;
                if st.row_count().map_err(|e| failed("marking conflicts reviewed", &e))? > 0 {
                    found.push(id);
                }
            }
            c.commit().map_err(|e| failed("marking conflicts reviewed", &e))?;
            Ok(found)
        })
        .await
    }

    async fn conflicts(
        &self,
        limit: usize,
        id: Option<i64>,
    ) -> Result<Vec<crate::purge::Conflict>, TargetError> {
        let rows = self
            .on_connection(move |c| {
                let key = id.unwrap_or(limit as i64);
                let rows = c
                    .query(&conflicts_sql(id.is_some()), &[&key])
                    .map_err(|e| failed("reading SITESYNC_CONFLICTS", &e))?;
                let mut out = Vec::new();
                for row in rows {
                    let row = row.map_err(|e| failed("reading SITESYNC_CONFLICTS", &e))?;
                    let cells = (0..crate::purge::COLUMNS.len())
                        .map(|i| row.get::<usize, Option<String>>(i))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| failed("reading SITESYNC_CONFLICTS", &e))?;
                    out.push(cells);
                }
                Ok(out)
            })
            .await?;
        crate::purge::conflicts_of(&rows)
    }
}

/// The conflicts' columns as text (times as UTC RFC 3339), newest first
/// (`:1` rows), or the one numbered `:1`.
fn conflicts_sql(one: bool) -> String {
    let utc =
        |c: &str| format!("TO_CHAR(SYS_EXTRACT_UTC({c}), 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6\"Z\"')");
    format!(
        "SELECT TO_CHAR(ID), ENTITY, KEY, LOSER_EVENT_ID, LOSER_ORIGIN, {}, LOSER_PAYLOAD, WINNER_EVENT_ID, WINNER_ORIGIN, {}, {}, {} \
         FROM SITESYNC_CONFLICTS {}",
        utc("LOSER_TS"),
        utc("WINNER_TS"),
        utc("RECORDED_AT"),
        utc("REVIEWED_AT"),
        match one {
            true => "WHERE ID = :1",
            false => "ORDER BY ID DESC FETCH FIRST :1 ROWS ONLY",
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_are_read_as_utc_text_newest_first_or_by_id() {
        let latest = conflicts_sql(false);
        assert!(
            latest.starts_with("SELECT TO_CHAR(ID), ENTITY, KEY, LOSER_EVENT_ID"),
            "{latest}"
        );
        assert!(
            latest.contains(
                "TO_CHAR(SYS_EXTRACT_UTC(WINNER_TS), 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6\"Z\"')"
            )
        );
        assert!(
            latest.ends_with("ORDER BY ID DESC FETCH FIRST :1 ROWS ONLY"),
            "{latest}"
        );
        assert!(conflicts_sql(true).ends_with("WHERE ID = :1"));
    }

    #[test]
    fn a_batch_is_one_bounded_delete_by_the_servers_clock() {
        let (t, time) = shape(Table::Inbox, "");
        assert_eq!(
            delete_sql(&t, time),
            "DELETE FROM SITESYNC_INBOX WHERE APPLIED_AT < SYSTIMESTAMP - NUMTODSINTERVAL(:1, 'DAY') AND ROWNUM <= :2"
        );
        assert_eq!(shape(Table::Conflicts, "").1, "REVIEWED_AT");
        assert!(ADD_REVIEWED.contains("ADD (REVIEWED_AT TIMESTAMP(6) WITH TIME ZONE)"));
    }
}
