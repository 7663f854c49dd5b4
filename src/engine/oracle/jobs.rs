//! `SITESYNC_JOBS` in Oracle (see [`crate::jobs`]). Times are
//! `TIMESTAMP(6)` in UTC (`SYS_EXTRACT_UTC(SYSTIMESTAMP)`, the server's
//! clock). The `oracle` crate is blocking: each call runs on
//! `spawn_blocking`, on a connection of its own (progress comes every few
//! seconds, not per row).

use super::conn::OracleConnect;
use super::settings::Settings;
use crate::checks::Check;
use crate::error::{Cause, TargetError};
use crate::jobs::{JobLog, JobProgress, JobRecord, JobState, record};
use uuid::Uuid;

/// The table, created when `USER_TABLES` does not list it.
pub const DDL: &str = "CREATE TABLE SITESYNC_JOBS (ID VARCHAR2(36) PRIMARY KEY, KIND VARCHAR2(32) NOT NULL, \
    WHO VARCHAR2(255) NOT NULL, ARGS CLOB NOT NULL, STARTED_AT TIMESTAMP(6) NOT NULL, UPDATED_AT TIMESTAMP(6) NOT NULL, \
    DONE NUMBER(19) DEFAULT 0 NOT NULL, TOTAL NUMBER(19), ERRORS NUMBER(19) DEFAULT 0 NOT NULL, LAST_ERROR VARCHAR2(4000), \
    STATE VARCHAR2(16) NOT NULL, RESULT VARCHAR2(4000))";

/// The index for `sitesync jobs`' newest-first listing.
pub const INDEX: &str = "CREATE INDEX SITESYNC_JOBS_STARTED ON SITESYNC_JOBS (STARTED_AT)";

const UTC_NOW: &str = "SYS_EXTRACT_UTC(SYSTIMESTAMP)";

const COLUMNS: &str = "ID, KIND, WHO, ARGS, TO_CHAR(STARTED_AT, 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6') || 'Z', \
    TO_CHAR(UPDATED_AT, 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6') || 'Z', DONE, TOTAL, ERRORS, LAST_ERROR, STATE, RESULT";

/// The insert of a new job; binds `:1` to `:5` (id, kind, who, args,
/// total).
pub fn start_sql() -> String {
    format!(
        "INSERT INTO SITESYNC_JOBS (ID, KIND, WHO, ARGS, STARTED_AT, UPDATED_AT, TOTAL, STATE) \
         VALUES (:1, :2, :3, :4, {UTC_NOW}, {UTC_NOW}, :5, 'running')"
    )
}

/// The latest `limit` jobs; `:1` the kind or NULL (twice).
pub fn list_sql(limit: usize) -> String {
    format!(
        "SELECT {COLUMNS} FROM SITESYNC_JOBS WHERE (:1 IS NULL OR KIND = :2) \
         ORDER BY STARTED_AT DESC, ID FETCH FIRST {limit} ROWS ONLY"
    )
}

/// A database error as a [`TargetError`]: a missing table or column
/// needs `sitesync init`.
pub fn failed(context: &str, e: &oracle::Error) -> TargetError {
    let text = e.to_string();
    if text.contains("ORA-00942") || text.contains("ORA-00904") {
        TargetError::operator(
            Cause::NotInitialised,
            format!("{context}: {text}: run `sitesync init`"),
        )
    } else {
        TargetError::transient(Cause::Query, format!("{context}: {text}"))
    }
}

pub fn task_failed(e: tokio::task::JoinError) -> TargetError {
    TargetError::transient(Cause::Query, format!("an Oracle task failed: {e}"))
}

/// `SITESYNC_JOBS` of an Oracle site.
pub struct OracleJobs {
    connect: OracleConnect,
}

impl OracleJobs {
    pub fn new(db: &Settings) -> Result<OracleJobs, TargetError> {
        Ok(OracleJobs {
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

    /// A DML statement, committed.
    async fn write(
        &self,
        sql: String,
        binds: Vec<Box<dyn oracle::sql_type::ToSql + Send>>,
        context: &'static str,
    ) -> Result<(), TargetError> {
        self.on_connection(move |c| {
            let refs: Vec<&dyn oracle::sql_type::ToSql> = binds
                .iter()
                .map(|b| b.as_ref() as &dyn oracle::sql_type::ToSql)
                .collect();
            c.execute(&sql, &refs).map_err(|e| failed(context, &e))?;
            c.commit().map_err(|e| failed(context, &e))
        })
        .await
    }
}

fn row(r: &oracle::Row) -> Result<JobRecord, TargetError> {
    let bad = |e: oracle::Error| failed("reading SITESYNC_JOBS", &e);
    let time = |i: usize| -> Result<chrono::DateTime<chrono::Utc>, TargetError> {
        let t: String = r.get(i).map_err(bad)?;
        crate::event::parse_timestamp(&t).ok_or_else(|| {
            TargetError::operator(
                Cause::Query,
                format!("a SITESYNC_JOBS row has an unreadable time `{t}`"),
            )
        })
    };
    let id: String = r.get(0).map_err(bad)?;
    let args: String = r.get(3).map_err(bad)?;
    let state: String = r.get(10).map_err(bad)?;
    record(
        &id,
        r.get(1).map_err(bad)?,
        r.get(2).map_err(bad)?,
        &args,
        time(4)?,
        time(5)?,
        r.get(6).map_err(bad)?,
        r.get(7).map_err(bad)?,
        r.get(8).map_err(bad)?,
        r.get(9).map_err(bad)?,
        &state,
        r.get(11).map_err(bad)?,
    )
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl JobLog for OracleJobs {
    async fn init(&self) -> Result<Vec<String>, TargetError> {
        self.on_connection(|c| {
            let n: i64 = c
                .query_row_as(
                    "SELECT COUNT(*) FROM USER_TABLES WHERE TABLE_NAME = 'SITESYNC_JOBS'",
                    &[],
                )
                .map_err(|e| failed("looking for SITESYNC_JOBS", &e))?;
            if n > 0 {
                return Ok(vec!["jobs table SITESYNC_JOBS: already there".to_string()]);
            }
            for st in [DDL, INDEX] {
                c.execute(st, &[])
                    .map_err(|e| failed("creating SITESYNC_JOBS", &e))?;
            }
            Ok(vec!["jobs table SITESYNC_JOBS: created".to_string()])
        })
        .await
    }

    async fn preflight(&self) -> Vec<Check> {
        let found = self
            .on_connection(|c| {
                c.query_row_as::<i64>(
                    "SELECT COUNT(*) FROM USER_TABLES WHERE TABLE_NAME = 'SITESYNC_JOBS'",
                    &[],
                )
                .map_err(|e| failed("looking for SITESYNC_JOBS", &e))
            })
            .await;
        match found {
            Ok(n) if n > 0 => vec![Check::pass("jobs table", "SITESYNC_JOBS")],
            Ok(_) => vec![Check::fail(
                "jobs table",
                "SITESYNC_JOBS does not exist",
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "jobs table",
                e.to_string(),
                "check database.url and the user's grants",
            )],
        }
    }

    async fn start<'a>(
        &'a self,
        kind: &'a str,
        who: &'a str,
        args: &'a serde_json::Value,
        total: Option<u64>,
    ) -> Result<Uuid, TargetError> {
        let id = Uuid::new_v4();
        self.write(
            start_sql(),
            vec![
                Box::new(id.to_string()),
                Box::new(kind.to_string()),
                Box::new(who.to_string()),
                Box::new(args.to_string()),
                Box::new(total.map(count)),
            ],
            "recording the job",
        )
        .await?;
        Ok(id)
    }

    async fn progress<'a>(&'a self, id: Uuid, p: &'a JobProgress) -> Result<(), TargetError> {
        self.write(
            format!("UPDATE SITESYNC_JOBS SET DONE = :1, TOTAL = :2, ERRORS = :3, LAST_ERROR = :4, UPDATED_AT = {UTC_NOW} WHERE ID = :5"),
            vec![
                Box::new(count(p.done)),
                Box::new(p.total.map(count)),
                Box::new(count(p.errors)),
                Box::new(p.last_error.clone()),
                Box::new(id.to_string()),
            ],
            "recording the job's progress",
        )
        .await
    }

    async fn finish<'a>(
        &'a self,
        id: Uuid,
        state: JobState,
        result: &'a str,
    ) -> Result<(), TargetError> {
        self.write(
            format!("UPDATE SITESYNC_JOBS SET STATE = :1, RESULT = :2, UPDATED_AT = {UTC_NOW} WHERE ID = :3"),
            vec![
                Box::new(state.as_str().to_string()),
                Box::new(result.chars().take(4000).collect::<String>()),
                Box::new(id.to_string()),
            ],
            "recording the job's end",
        )
        .await
    }

    async fn list<'a>(
        &'a self,
        limit: usize,
        kind: Option<&'a str>,
    ) -> Result<Vec<JobRecord>, TargetError> {
        let kind = kind.map(str::to_string);
        self.on_connection(move |c| {
            let rows = c
                .query(&list_sql(limit), &[&kind, &kind])
                .map_err(|e| failed("reading SITESYNC_JOBS", &e))?;
            rows.map(|r| row(&r.map_err(|e| failed("reading SITESYNC_JOBS", &e))?))
                .collect()
        })
        .await
    }

    async fn get(&self, id: Uuid) -> Result<Option<JobRecord>, TargetError> {
        let id = id.to_string();
        self.on_connection(move |c| {
            let mut rows = c
                .query(
                    &format!("SELECT {COLUMNS} FROM SITESYNC_JOBS WHERE ID = :1"),
                    &[&id],
                )
                .map_err(|e| failed("reading SITESYNC_JOBS", &e))?;
            rows.next()
                .map(|r| row(&r.map_err(|e| failed("reading SITESYNC_JOBS", &e))?))
                .transpose()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statements_keep_utc_time_on_the_server_and_bind_in_textual_order() {
        let s = start_sql();
        assert!(s.contains("VALUES (:1, :2, :3, :4, SYS_EXTRACT_UTC(SYSTIMESTAMP), SYS_EXTRACT_UTC(SYSTIMESTAMP), :5, 'running')"), "{s}");
        let l = list_sql(20);
        assert!(
            l.contains("(:1 IS NULL OR KIND = :2)") && l.ends_with("FETCH FIRST 20 ROWS ONLY"),
            "{l}"
        );
        assert!(DDL.starts_with("CREATE TABLE SITESYNC_JOBS (ID VARCHAR2(36) PRIMARY KEY"));
    }
}
