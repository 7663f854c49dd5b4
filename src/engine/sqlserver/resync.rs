//! Resync on SQL Server: the snapshot and the jobs' rows.
//!
//! - The snapshot is a SNAPSHOT-isolation transaction,
//!   `SET TRANSACTION ISOLATION LEVEL SNAPSHOT; BEGIN TRANSACTION`
//!   ([`BEGIN_SQL`]): every page of every table reads the committed state
//!   of the database as it was when the transaction started. SQL Server
//!   starts it at its first access to data, not at `BEGIN` ("A transaction
//!   starts the first time it accesses data", SET TRANSACTION ISOLATION
//!   LEVEL): the statement that reads the snapshot's time also reads
//!   `dbo.sitesync_versions` ([`START_SQL`]), so the time printed is the
//!   snapshot's. The database must allow it (`ALLOW_SNAPSHOT_ISOLATION
//!   ON`, which the source's `sitesync init` already sets): it is checked
//!   before, and a database that does not is refused with the exact
//!   `ALTER DATABASE … SET ALLOW_SNAPSHOT_ISOLATION ON` to run
//!   ([`not_allowed`]; error 3952 at the first read says the same). While
//!   the snapshot is open, SQL Server keeps the row versions it may need
//!   in tempdb's version store, as for any long snapshot read.
//! - A page is one statement: `SELECT TOP (n) … ORDER BY` the key. SQL
//!   Server has no row-value comparison, so "after the cursor" is spelled
//!   out (`k1 >= v1 AND (k1 > v1 OR (k1 = v1 AND k2 > v2))`, the first
//!   part for the index seek), each `v` read from the cursor with
//!   `JSON_VALUE` and compared in the column's type (`char`/`varchar` cast
//!   back to `varchar`, so that the comparison follows the column's own
//!   collation and sort rules, as `ORDER BY` does). Each row's entity key
//!   and data are written by the same SQL as the capture triggers
//!   ([`super::capture::key_expr`], [`super::capture::data_expr`]), its
//!   cursor is its key columns `FOR JSON PATH`, its version comes from
//!   `dbo.sitesync_versions`, and whether a write to it waits in the
//!   outbox from the outbox's `entity_key` (when it has that column).
//! - Jobs are rows of `dbo.sitesync_resync`; their locks rows of
//!   `dbo.sitesync_resync_locks` (one per target site and table, the
//!   primary key refusing a second holder, claimed under `UPDLOCK,
//!   HOLDLOCK`); whether a job runs is the application lock
//!   `sitesync_resync_<job>` that the job's connection holds with
//!   `sp_getapplock @LockOwner = 'Session'`, which SQL Server releases
//!   when the session ends (the process dies, its connection drops);
//!   another process asks with `APPLOCK_TEST`.
//!
//! No SQL Server runs on the CI machines: the SQL is tested as text here,
//! and on a real server by the Docker-gated test in
//! tests/flows/sqlserver.rs.

use super::capture::{data_expr, key_expr};
use super::conn::{self, MssqlClient, literal, quote, quote_table};
use super::settings::Settings;
use super::target::{Param, Rows, Statement, Tds, TdsError};
use crate::capture::Column;
use crate::config::ConnectorConfig;
use crate::error::TargetError;
use crate::event::parse_timestamp;
use crate::resync::{
    ClaimError, Cursor, Job, Request, Resync, Row, Snapshot, Stored, Table, job_of, keyset, row_of,
    stored,
};
use chrono::{DateTime, Utc};
use std::collections::HashMap;

/// The jobs' tables (idempotent).
pub const SCHEMA: &str =
    "IF OBJECT_ID(N'dbo.sitesync_resync', N'U') IS NULL CREATE TABLE dbo.sitesync_resync (
    job bigint IDENTITY(1,1) NOT NULL PRIMARY KEY,
    to_site nvarchar(64) NOT NULL,
    request nvarchar(max) NOT NULL,
    started_by nvarchar(255) NOT NULL,
    started_at datetime2(6) NOT NULL DEFAULT SYSUTCDATETIME(),
    updated_at datetime2(6) NOT NULL DEFAULT SYSUTCDATETIME(),
    finished_at datetime2(6) NULL,
    attempt int NOT NULL DEFAULT 1,
    total bigint NULL,
    confirmed bigint NOT NULL DEFAULT 0,
    [cursor] nvarchar(max) NULL,
    result nvarchar(64) NULL,
    error nvarchar(max) NULL
);
IF OBJECT_ID(N'dbo.sitesync_resync_locks', N'U') IS NULL CREATE TABLE dbo.sitesync_resync_locks (
    to_site nvarchar(64) COLLATE Latin1_General_BIN2 NOT NULL,
    entity nvarchar(128) COLLATE Latin1_General_BIN2 NOT NULL,
    job bigint NOT NULL,
    PRIMARY KEY (to_site, entity)
);";

/// Whether the database allows snapshot isolation, and its name (for the
/// statement that allows it).
pub const STATE_SQL: &str = "SELECT CAST(snapshot_isolation_state AS int), DB_NAME() FROM sys.databases WHERE database_id = DB_ID()";

/// Opens the snapshot transaction (SQL Server starts it at the first
/// statement that reads data: [`START_SQL`]).
pub const BEGIN_SQL: &str = "SET TRANSACTION ISOLATION LEVEL SNAPSHOT; BEGIN TRANSACTION;";

/// The snapshot's first read: its time (UTC), a read of
/// `dbo.sitesync_versions` (which starts the snapshot), and whether the
/// outbox (`@P1`, quoted) has an `entity_key` column.
pub const START_SQL: &str = "SELECT CONVERT(nvarchar(30), CAST(SYSUTCDATETIME() AS datetime2(6)), 126), \
    (SELECT COUNT_BIG(*) FROM (SELECT TOP (1) 1 AS one FROM dbo.sitesync_versions) v), \
    CASE WHEN COLUMNPROPERTY(OBJECT_ID(@P1), 'entity_key', 'ColumnId') IS NULL THEN 0 ELSE 1 END";

/// SQL Server's error when snapshot isolation is not allowed.
const SNAPSHOT_NOT_ALLOWED: u32 = 3952;

/// "There is already an object named …".
const OBJECT_EXISTS: u32 = 2714;

/// Why a database without snapshot isolation is refused: what to run.
pub fn not_allowed(database: &str) -> String {
    format!(
        "snapshot isolation is not allowed in database {database}: a resync reads every table in one SNAPSHOT transaction. \
         Run `ALTER DATABASE {} SET ALLOW_SNAPSHOT_ISOLATION ON` (as a user allowed to alter the database; `sitesync init` does it too), then resync again",
        quote(database)
    )
}

/// The application lock of a job.
pub fn lock_name(job: i64) -> String {
    format!("sitesync_resync_{job}")
}

/// Takes the job's lock for this session, without waiting; selects
/// `sp_getapplock`'s result (0 granted, -1 held by another session).
pub const HOLD_SQL: &str = "DECLARE @r int; \
    EXEC @r = sp_getapplock @Resource = @P1, @LockMode = 'Exclusive', @LockOwner = 'Session', @LockTimeout = 0; \
    SELECT @r;";

/// Whether this session could take the job's lock: 0 when another
/// session holds it.
pub const TEST_SQL: &str =
    "SELECT CAST(APPLOCK_TEST('public', @P1, 'Exclusive', 'Session') AS int)";

/// Gives the job's lock back, if this session holds it.
pub const RELEASE_SQL: &str = "IF APPLOCK_MODE('public', @P1, 'Session') <> 'NoLock' \
    EXEC sp_releaseapplock @Resource = @P1, @LockOwner = 'Session';";

/// Claims the lock row of (`@P1` target site, `@P2` entity) for job `@P3`
/// unless another job holds it; selects that job (NULL when claimed).
pub const CLAIM_SQL: &str = "DECLARE @holder bigint = (SELECT job FROM dbo.sitesync_resync_locks WITH (UPDLOCK, HOLDLOCK) WHERE to_site = @P1 AND entity = @P2); \
    IF @holder IS NULL INSERT INTO dbo.sitesync_resync_locks (to_site, entity, job) VALUES (@P1, @P2, @P3); \
    SELECT @holder;";

const INSERT_JOB_SQL: &str = "INSERT INTO dbo.sitesync_resync (to_site, request, started_by) OUTPUT inserted.job VALUES (@P1, @P2, @P3)";

const READ_JOB_SQL: &str = "SELECT to_site, request, attempt, confirmed, [cursor], result, error FROM dbo.sitesync_resync WHERE job = @P1";

const RESUME_SQL: &str = "UPDATE dbo.sitesync_resync SET attempt = attempt + 1, error = NULL, updated_at = SYSUTCDATETIME() WHERE job = @P1";

const PROGRESS_SQL: &str = "UPDATE dbo.sitesync_resync SET confirmed = @P2, [cursor] = @P3, error = @P4, total = @P5, updated_at = SYSUTCDATETIME() WHERE job = @P1";

const FINISH_SQL: &str = "UPDATE dbo.sitesync_resync SET result = @P2, finished_at = SYSUTCDATETIME(), updated_at = SYSUTCDATETIME() WHERE job = @P1; \
    DELETE FROM dbo.sitesync_resync_locks WHERE job = @P1;";

/// Resync on one SQL Server database.
pub struct SqlServerResync {
    db: Settings,
    /// The outbox, quoted (a write waiting there is left out).
    outbox: String,
    /// The connection that holds this process's job (its application
    /// lock, owned by the session).
    state: Option<MssqlClient>,
}

impl SqlServerResync {
    pub fn new(_cfg: &ConnectorConfig, db: &Settings) -> Result<SqlServerResync, TargetError> {
        conn::config(db, "sitesync-resync")?;
        let (schema, table) = db.outbox_parts();
        Ok(SqlServerResync {
            db: db.clone(),
            outbox: format!("{}.{}", quote(schema), quote(table)),
            state: None,
        })
    }

    async fn connect(&self) -> Result<MssqlClient, String> {
        conn::connect(&self.db, "sitesync-resync")
            .await
            .map_err(|e| e.to_string())
    }

    /// The state connection, with the jobs' tables created.
    async fn state(&mut self) -> Result<&mut MssqlClient, String> {
        if self.state.is_none() {
            let mut client = self.connect().await?;
            let create = statement(SCHEMA, vec![]);
            let context = "creating dbo.sitesync_resync";
            match Tds::execute(&mut client, &create, context).await {
                // Another process created one of them meanwhile (2714):
                // once more, and both are there.
                Err(e) if e.number == Some(OBJECT_EXISTS) => {
                    Tds::execute(&mut client, &create, context)
                        .await
                        .map_err(described)?;
                }
                created => created.map_err(described)?,
            }
            self.state = Some(client);
        }
        Ok(self.state.as_mut().expect("just set"))
    }
}

fn statement(sql: &str, params: Vec<Param>) -> Statement {
    Statement {
        sql: sql.to_string(),
        params,
    }
}

fn text(t: &str) -> Param {
    Param::Text(Some(t.to_string()))
}

/// A failed statement, with its context and what to do.
fn described(e: TdsError) -> String {
    e.batch.to_string()
}

fn db(e: TdsError) -> ClaimError {
    ClaimError::Database(described(e))
}

/// The first cell of the first row, as text.
fn first(rows: &Rows) -> Option<String> {
    rows.first().and_then(|r| r.first()).cloned().flatten()
}

/// Whether another session holds `job`.
async fn running(c: &mut MssqlClient, job: i64) -> Result<bool, ClaimError> {
    let rows = Tds::select(
        c,
        &statement(TEST_SQL, vec![text(&lock_name(job))]),
        "testing a resync job's lock (APPLOCK_TEST)",
    )
    .await
    .map_err(db)?;
    Ok(first(&rows).as_deref() == Some("0"))
}

/// Takes the lock of `job` for this session; whether it got it.
async fn hold(c: &mut MssqlClient, job: i64) -> Result<bool, ClaimError> {
    let rows = Tds::select(
        c,
        &statement(HOLD_SQL, vec![text(&lock_name(job))]),
        "locking a resync job (sp_getapplock)",
    )
    .await
    .map_err(db)?;
    Ok(first(&rows)
        .and_then(|r| r.parse::<i32>().ok())
        .is_some_and(|r| r >= 0))
}

async fn read_job(c: &mut MssqlClient, job: i64) -> Result<Job, ClaimError> {
    let rows = Tds::select(
        c,
        &statement(READ_JOB_SQL, vec![Param::Int(job)]),
        "reading dbo.sitesync_resync",
    )
    .await
    .map_err(db)?;
    let row = rows.into_iter().next().ok_or(ClaimError::Unknown(job))?;
    job_of(job, &row)
}

impl Resync for SqlServerResync {
    type Snapshot = SqlServerSnapshot;

    async fn snapshot(&self) -> Result<SqlServerSnapshot, String> {
        let mut client = self.connect().await?;
        let state = Tds::select(
            &mut client,
            &statement(STATE_SQL, vec![]),
            "reading whether snapshot isolation is allowed",
        )
        .await
        .map_err(described)?;
        let cells = state.into_iter().next().unwrap_or_default();
        let database = cells.get(1).cloned().flatten().unwrap_or_default();
        if cells.first().cloned().flatten().as_deref() != Some("1") {
            return Err(not_allowed(&database));
        }
        client
            .simple_query(BEGIN_SQL)
            .await
            .map_err(|e| conn::classify("starting the snapshot", &e).to_string())?
            .into_results()
            .await
            .map_err(|e| conn::classify("starting the snapshot", &e).to_string())?;
        let start = Tds::select(
            &mut client,
            &statement(START_SQL, vec![text(&self.outbox)]),
            "starting the snapshot",
        )
        .await
        .map_err(|e| match e.number {
            Some(SNAPSHOT_NOT_ALLOWED) => not_allowed(&database),
            _ => described(e),
        })?;
        let cells = start.into_iter().next().unwrap_or_default();
        let time = cells
            .first()
            .cloned()
            .flatten()
            .and_then(|t| parse_timestamp(&format!("{t}Z")))
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        let keyed = cells.get(2).cloned().flatten().as_deref() == Some("1");
        Ok(SqlServerSnapshot {
            client,
            time,
            outbox: keyed.then(|| self.outbox.clone()),
        })
    }

    async fn start(
        &mut self,
        to_site: &str,
        entities: &[String],
        request: &Request,
        who: &str,
    ) -> Result<Job, ClaimError> {
        let request_text = serde_json::to_string(request).expect("a request always serialises");
        let c = self.state().await.map_err(ClaimError::Database)?;
        c.begin().await.map_err(db)?;
        let claimed = claim(c, to_site, entities, &request_text, who).await;
        let job = match claimed {
            Ok(Ok(job)) => {
                c.commit().await.map_err(db)?;
                job
            }
            Ok(Err((entity, holder))) => {
                c.rollback().await.map_err(db)?;
                return Err(ClaimError::Busy {
                    entity,
                    to_site: to_site.to_string(),
                    job: holder,
                    running: running(c, holder).await?,
                });
            }
            Err(e) => {
                let _ = c.rollback().await;
                return Err(e);
            }
        };
        if !hold(c, job).await? {
            return Err(ClaimError::Running(job));
        }
        read_job(c, job).await
    }

    async fn resume(&mut self, job: i64) -> Result<Job, ClaimError> {
        let c = self.state().await.map_err(ClaimError::Database)?;
        let found = read_job(c, job).await?;
        if let Some(result) = found.result {
            return Err(ClaimError::Finished { job, result });
        }
        if !hold(c, job).await? {
            return Err(ClaimError::Running(job));
        }
        Tds::execute(
            c,
            &statement(RESUME_SQL, vec![Param::Int(job)]),
            "updating dbo.sitesync_resync",
        )
        .await
        .map_err(db)?;
        read_job(c, job).await
    }

    async fn job(&mut self, job: i64) -> Result<Job, ClaimError> {
        let c = self.state().await.map_err(ClaimError::Database)?;
        let mut found = read_job(c, job).await?;
        found.running = found.result.is_none() && running(c, job).await?;
        Ok(found)
    }

    async fn progress(
        &mut self,
        job: i64,
        total: i64,
        confirmed: i64,
        cursor: Option<&Cursor>,
        error: Option<&str>,
    ) -> Result<(), String> {
        let cursor = cursor.map(|c| serde_json::to_string(c).expect("a cursor serialises"));
        let c = self.state().await?;
        Tds::execute(
            c,
            &statement(
                PROGRESS_SQL,
                vec![
                    Param::Int(job),
                    Param::Int(confirmed),
                    Param::Text(cursor),
                    Param::Text(error.map(str::to_string)),
                    Param::Int(total),
                ],
            ),
            &format!("saving job {job}'s progress"),
        )
        .await
        .map_err(described)
    }

    async fn finish(&mut self, job: i64, result: &str) -> Result<(), String> {
        let c = self.state().await?;
        let context = format!("ending job {job}");
        c.begin().await.map_err(described)?;
        let ended = Tds::execute(
            c,
            &statement(FINISH_SQL, vec![Param::Int(job), text(result)]),
            &context,
        )
        .await;
        if let Err(e) = ended {
            let _ = c.rollback().await;
            return Err(described(e));
        }
        c.commit().await.map_err(described)?;
        Tds::execute(
            c,
            &statement(RELEASE_SQL, vec![text(&lock_name(job))]),
            &format!("unlocking job {job}"),
        )
        .await
        .map_err(described)
    }
}

/// Inside the state connection's transaction: the job's row and a lock
/// row per entity. `Ok(Err((entity, holder)))` when another job holds one.
async fn claim(
    c: &mut MssqlClient,
    to_site: &str,
    entities: &[String],
    request: &str,
    who: &str,
) -> Result<Result<i64, (String, i64)>, ClaimError> {
    let rows = Tds::select(
        c,
        &statement(
            INSERT_JOB_SQL,
            vec![text(to_site), text(request), text(who)],
        ),
        "inserting into dbo.sitesync_resync",
    )
    .await
    .map_err(db)?;
    let job: i64 = first(&rows)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| ClaimError::Database("the new job's number was not returned".into()))?;
    for entity in entities {
        let rows = Tds::select(
            c,
            &statement(
                CLAIM_SQL,
                vec![text(to_site), text(entity), Param::Int(job)],
            ),
            "claiming dbo.sitesync_resync_locks",
        )
        .await
        .map_err(db)?;
        if let Some(holder) = first(&rows).and_then(|t| t.parse::<i64>().ok()) {
            return Ok(Err((entity.clone(), holder)));
        }
    }
    Ok(Ok(job))
}

/// A read-only snapshot: a connection inside a SNAPSHOT transaction
/// (rolled back when the connection drops).
pub struct SqlServerSnapshot {
    client: MssqlClient,
    time: DateTime<Utc>,
    /// The outbox, when it has an `entity_key` column to find a row's
    /// waiting writes by.
    outbox: Option<String>,
}

/// A key column's value in the cursor `param`, in the column's type:
/// numbers, times and uniqueidentifiers convert from JSON_VALUE's
/// `nvarchar` implicitly (their type ranks higher); `char`/`varchar` are
/// cast back, so that the comparison uses the column's collation.
fn cursor_value(c: &Column, param: &str) -> String {
    let path = literal(&format!(
        "$.\"{}\"",
        c.name.replace('\\', "\\\\").replace('"', "\\\"")
    ));
    let v = format!("JSON_VALUE({param}, {path})");
    match c.ty.as_str() {
        "char" | "varchar" => format!("CAST({v} AS varchar(8000))"),
        _ => v,
    }
}

/// The condition "after the cursor `param`" on the key of `table` (alias
/// `r`), or `1 = 1` without a cursor.
fn after(table: &Table, param: &str, with_cursor: bool) -> String {
    if !with_cursor {
        return "1 = 1".to_string();
    }
    let parts: Vec<(String, String)> = table
        .side
        .key
        .iter()
        .map(|c| (format!("r.{}", quote(&c.name)), cursor_value(c, param)))
        .collect();
    keyset(&parts)
}

fn filter(table: &Table) -> String {
    match &table.filter {
        Some(f) => format!("({f})"),
        None => "1 = 1".to_string(),
    }
}

/// Whether a write of one of the table's route types to the row (entity
/// key `key`) waits in `outbox`, as 1 or 0.
fn pending(table: &Table, outbox: Option<&str>, key: &str) -> String {
    match outbox {
        Some(o) if !table.kinds.is_empty() => format!(
            "CASE WHEN EXISTS (SELECT 1 FROM {o} o WHERE o.[entity_key] = {key} AND o.[type] IN ({})) THEN 1 ELSE 0 END",
            table
                .kinds
                .iter()
                .map(|k| literal(k))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => "0".to_string(),
    }
}

/// The statement of a page (`@P1` the entity, `@P2` the cursor), with
/// whether a write to the row waits in `outbox`.
pub fn page_sql(table: &Table, outbox: Option<&str>, with_cursor: bool, limit: usize) -> String {
    let key = key_expr("r", &table.side);
    let data = data_expr("r", &table.side);
    let cursor = table
        .side
        .key
        .iter()
        .map(|c| format!("r.{q} AS {q}", q = quote(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let order = table
        .side
        .key
        .iter()
        .map(|c| format!("r.{}", quote(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT TOP ({limit}) {key} AS [k], {data} AS [d], \
         (SELECT {cursor} FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES) AS [c], \
         v.ts, v.origin, CONVERT(nvarchar(36), v.event_id), {} \
         FROM {} r LEFT JOIN dbo.sitesync_versions v ON v.entity = @P1 AND v.[key] = {key} \
         WHERE {} AND {} ORDER BY {order}",
        pending(table, outbox, &key),
        quote_table(&table.table),
        after(table, "@P2", with_cursor),
        filter(table),
    )
}

/// The statement that counts the rows after the cursor (`@P1`).
pub fn count_sql(table: &Table, with_cursor: bool) -> String {
    format!(
        "SELECT COUNT_BIG(*) FROM {} r WHERE {} AND {}",
        quote_table(&table.table),
        after(table, "@P1", with_cursor),
        filter(table),
    )
}

/// The versions of `keys` of an entity (`@P1`), the keys `@P2…`.
pub fn versions_sql(keys: usize) -> String {
    let marks: Vec<String> = (0..keys).map(|i| format!("@P{}", i + 2)).collect();
    format!(
        "SELECT [key], ts, origin, CONVERT(nvarchar(36), event_id) FROM dbo.sitesync_versions WHERE entity = @P1 AND [key] IN ({})",
        marks.join(", ")
    )
}

impl Snapshot for SqlServerSnapshot {
    fn time(&self) -> DateTime<Utc> {
        self.time
    }

    async fn count(&mut self, table: &Table, after: Option<&str>) -> Result<u64, String> {
        let params = after.map(text).into_iter().collect();
        let rows = Tds::select(
            &mut self.client,
            &statement(&count_sql(table, after.is_some()), params),
            &format!("counting the rows of {}", table.table),
        )
        .await
        .map_err(described)?;
        Ok(first(&rows).and_then(|t| t.parse().ok()).unwrap_or(0))
    }

    async fn page(
        &mut self,
        table: &Table,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Row>, String> {
        let sql = page_sql(table, self.outbox.as_deref(), after.is_some(), limit);
        let mut params = vec![text(&table.entity)];
        params.extend(after.map(text));
        let rows = Tds::select(
            &mut self.client,
            &statement(&sql, params),
            &format!("reading {}", table.table),
        )
        .await
        .map_err(described)?;
        rows.iter().map(|r| row_of(table, r)).collect()
    }

    async fn versions(
        &mut self,
        entity: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Stored>, String> {
        let mut out = HashMap::new();
        for chunk in keys.chunks(500) {
            let mut params = vec![text(entity)];
            params.extend(chunk.iter().map(|k| text(k)));
            let rows = Tds::select(
                &mut self.client,
                &statement(&versions_sql(chunk.len()), params),
                &format!("reading the versions of {entity}"),
            )
            .await
            .map_err(described)?;
            for r in rows {
                let at = |i: usize| r.get(i).cloned().flatten();
                if let (Some(key), Some(v)) =
                    (at(0), stored(at(1).as_deref(), at(2), at(3).as_deref()))
                {
                    out.insert(key, v);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Field, Side};

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            route_name: name.into(),
            ty: ty.into(),
            scale: 0,
        }
    }

    fn field(name: &str, ty: &str, field: &str) -> Field {
        Field {
            column: col(name, ty),
            field: field.into(),
        }
    }

    fn table(key: Vec<Column>, fields: Vec<Field>, filter: Option<&str>) -> Table {
        Table {
            table: "dbo.item".into(),
            entity: "dbo.item".into(),
            columns: vec![],
            side: Side {
                kind: "item.upsert".into(),
                key,
                fields,
            },
            filter: filter.map(str::to_string),
            kinds: vec!["item.upsert".into(), "item.delete".into()],
        }
    }

    #[test]
    fn a_page_of_a_one_column_key_reads_the_rows_version_and_waiting_writes() {
        let t = table(
            vec![col("ID", "int")],
            vec![field("ID", "int", "id"), field("Name", "nvarchar", "name")],
            None,
        );
        let first = page_sql(&t, Some("[dbo].[outbox]"), false, 1000);
        assert!(
            first.starts_with("SELECT TOP (1000) CAST(r.[ID] AS nvarchar(20)) AS [k], (SELECT r.[ID] AS [id], r.[Name] AS [name] FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES) AS [d], "),
            "the key and data of the capture triggers: {first}"
        );
        assert!(
            first.contains("(SELECT r.[ID] AS [ID] FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES) AS [c]"),
            "{first}"
        );
        assert!(
            first.contains("FROM [dbo].[item] r LEFT JOIN dbo.sitesync_versions v ON v.entity = @P1 AND v.[key] = CAST(r.[ID] AS nvarchar(20)) "),
            "{first}"
        );
        assert!(
            first.ends_with("WHERE 1 = 1 AND 1 = 1 ORDER BY r.[ID]"),
            "{first}"
        );
        assert!(
            first.contains("CASE WHEN EXISTS (SELECT 1 FROM [dbo].[outbox] o WHERE o.[entity_key] = CAST(r.[ID] AS nvarchar(20)) AND o.[type] IN (N'item.upsert', N'item.delete')) THEN 1 ELSE 0 END FROM"),
            "a write waiting in the outbox: {first}"
        );
        let next = page_sql(&t, None, true, 1000);
        assert!(
            next.contains("WHERE r.[ID] > JSON_VALUE(@P2, N'$.\"ID\"') AND 1 = 1 ORDER BY r.[ID]"),
            "{next}"
        );
        assert!(
            next.contains("CONVERT(nvarchar(36), v.event_id), 0 FROM"),
            "an outbox without entity_key is not looked at: {next}"
        );
    }

    #[test]
    fn a_page_of_a_two_column_key_spells_the_keyset_out_with_a_filter() {
        let t = table(
            vec![col("region", "varchar"), col("id", "bigint")],
            vec![
                field("region", "varchar", "region"),
                field("id", "bigint", "id"),
            ],
            Some("r.id > 10"),
        );
        let next = page_sql(&t, Some("[dbo].[outbox]"), true, 500);
        let r = "CAST(JSON_VALUE(@P2, N'$.\"region\"') AS varchar(8000))";
        let i = "JSON_VALUE(@P2, N'$.\"id\"')";
        assert!(
            next.contains(&format!(
                "WHERE (r.[region] >= {r} AND (r.[region] > {r} OR (r.[region] = {r} AND r.[id] > {i}))) AND (r.id > 10) ORDER BY r.[region], r.[id]"
            )),
            "{next}"
        );
        assert!(
            next.contains("REPLACE(REPLACE(r.[region], N'\\', N'\\\\'), N',', N'\\,') + N',' + REPLACE(REPLACE(CAST(r.[id] AS nvarchar(20))"),
            "a composite key as the sink reads it: {next}"
        );
        assert!(
            next.contains("(SELECT r.[region] AS [region], r.[id] AS [id] FOR JSON PATH"),
            "{next}"
        );
        let count = count_sql(&t, true);
        assert!(
            count.starts_with(
                "SELECT COUNT_BIG(*) FROM [dbo].[item] r WHERE (r.[region] >= CAST(JSON_VALUE(@P1, "
            ),
            "{count}"
        );
        assert!(count.ends_with("AND (r.id > 10)"), "{count}");
        assert_eq!(
            count_sql(&t, false),
            "SELECT COUNT_BIG(*) FROM [dbo].[item] r WHERE 1 = 1 AND (r.id > 10)"
        );
        // Three columns: each branch equal on the ones before.
        let three = keyset(&[
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("c".into(), "3".into()),
        ]);
        assert_eq!(
            three,
            "(a >= 1 AND (a > 1 OR (a = 1 AND b > 2) OR (a = 1 AND b = 2 AND c > 3)))"
        );
    }

    #[test]
    fn a_row_read_back_as_text() {
        let t = table(vec![col("ID", "int")], vec![], None);
        let id = uuid::Uuid::from_u128(9);
        let r = row_of(
            &t,
            &[
                Some("7".into()),
                Some("{\"id\":7}".into()),
                Some("{\"ID\":7}".into()),
                Some("2026-05-01T10:00:00.123456+00:00".into()),
                Some("PARIS".into()),
                Some(id.to_string().to_uppercase()),
                Some("0".into()),
            ],
        )
        .unwrap();
        assert_eq!((r.key.as_str(), r.cursor.as_str()), ("7", "{\"ID\":7}"));
        let v = r.version.unwrap();
        assert_eq!((v.origin.as_str(), v.event_id), ("PARIS", id));
        assert_eq!(v.ts.to_rfc3339(), "2026-05-01T10:00:00.123456+00:00");
        assert!(!r.pending);
        let bare = row_of(
            &t,
            &[
                Some("8".into()),
                None,
                None,
                None,
                None,
                None,
                Some("1".into()),
            ],
        )
        .unwrap();
        assert_eq!(bare.version, None);
        assert!(bare.pending);
        assert!(row_of(&t, &[None]).unwrap_err().contains("NULL key"));
        assert_eq!(
            versions_sql(3),
            "SELECT [key], ts, origin, CONVERT(nvarchar(36), event_id) FROM dbo.sitesync_versions WHERE entity = @P1 AND [key] IN (@P2, @P3, @P4)"
        );
    }

    #[test]
    fn the_snapshot_and_the_locks_are_sql_servers_own() {
        assert_eq!(
            BEGIN_SQL,
            "SET TRANSACTION ISOLATION LEVEL SNAPSHOT; BEGIN TRANSACTION;"
        );
        assert!(
            START_SQL.contains("FROM dbo.sitesync_versions"),
            "the first statement reads data: the snapshot starts there"
        );
        let e = not_allowed("madrid");
        assert!(
            e.contains("`ALTER DATABASE [madrid] SET ALLOW_SNAPSHOT_ISOLATION ON`"),
            "{e}"
        );
        assert!(HOLD_SQL.contains("@LockOwner = 'Session', @LockTimeout = 0"));
        assert!(TEST_SQL.contains("APPLOCK_TEST('public', @P1, 'Exclusive', 'Session')"));
        assert!(RELEASE_SQL.contains("sp_releaseapplock @Resource = @P1, @LockOwner = 'Session'"));
        assert_eq!(lock_name(12), "sitesync_resync_12");
        assert!(CLAIM_SQL.contains("WITH (UPDLOCK, HOLDLOCK)"));
        assert!(SCHEMA.contains("[cursor] nvarchar(max) NULL"));
        let row: Vec<Option<String>> = vec![
            Some("LONDON".into()),
            Some("{\"routes\":[],\"all\":true}".into()),
            Some("2".into()),
            Some("1500".into()),
            Some("{\"entity\":\"dbo.item\",\"key\":\"{\\\"ID\\\":7}\"}".into()),
            None,
            None,
        ];
        let j = job_of(4, &row).unwrap();
        assert_eq!((j.id, j.attempt, j.confirmed), (4, 2, 1500));
        assert!(j.request.all);
        assert_eq!(j.cursor.unwrap().entity, "dbo.item");
    }
}
