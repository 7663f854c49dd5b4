//! The archive table in SQL Server (see [`crate::archive`]).
//!
//! A batch is one transaction of multi-row inserts from a `VALUES` list
//! (a new statement every [`CHUNK_ROWS`] rows: SQL Server takes at most
//! 2,100 parameters a statement), each inserting only the events the table
//! does not hold (`WHERE NOT EXISTS`, the key range locked with `UPDLOCK,
//! HOLDLOCK` so that a second archiver, a standby taking over, cannot
//! insert the same id in between). The ids are random to SQL Server's
//! ordering of `uniqueidentifier`, so the primary key is nonclustered and
//! the table is clustered on `(origin, epoch, seq)`.
//!
//! The statements go through the sink's [`Tds`] calls, so that the tests
//! run them on a fake (SQL Server cannot run on the CI machines).

use super::conn::{self, MssqlClient, quote, quote_table};
use super::settings::Settings;
use super::target::{Param, Statement, Tds, TdsError};
use crate::archive::{Cursor, Store, archived_event, chunks};
use crate::checks::Check;
use crate::config::{ArchiveConfig, ConnectorConfig};
use crate::error::{Cause, TargetError};
use crate::event::Event;
use tokio::sync::Mutex;

/// Rows per insert statement (8 parameters each).
pub const CHUNK_ROWS: usize = 250;
/// Payload bytes per insert statement, about.
pub const CHUNK_BYTES: usize = 8 << 20;

/// The archive table of a SQL Server site.
pub struct SqlServerArchive {
    db: Settings,
    application: String,
    /// `schema.table`, unquoted.
    name: String,
    client: Mutex<Option<MssqlClient>>,
}

/// The table and its indexes (idempotent).
pub fn ddl(name: &str) -> String {
    let (schema, table) = name.split_once('.').unwrap_or(("dbo", name));
    let t = format!("{}.{}", quote(schema), quote(table));
    let literal = conn::literal(&t);
    format!(
        "IF OBJECT_ID({literal}, N'U') IS NULL
BEGIN
    CREATE TABLE {t} (
        event_id uniqueidentifier NOT NULL CONSTRAINT {pk} PRIMARY KEY NONCLUSTERED,
        origin nvarchar(64) NOT NULL,
        epoch bigint NOT NULL,
        seq bigint NOT NULL,
        type nvarchar(255) NOT NULL,
        entity_key nvarchar(max) NULL,
        event_ts datetime2(6) NOT NULL,
        data nvarchar(max) NOT NULL,
        received_at datetime2(6) NOT NULL CONSTRAINT {df} DEFAULT SYSUTCDATETIME()
    );
    CREATE CLUSTERED INDEX {ix_seq} ON {t} (origin, epoch, seq);
    CREATE INDEX {ix_received} ON {t} (received_at);
    CREATE INDEX {ix_ts} ON {t} (event_ts);
END",
        pk = quote(&format!("PK_{table}")),
        df = quote(&format!("DF_{table}_received_at")),
        ix_seq = quote(&format!("IX_{table}_origin_seq")),
        ix_received = quote(&format!("IX_{table}_received")),
        ix_ts = quote(&format!("IX_{table}_event_ts")),
    )
}

/// The insert of `events`: the rows of the `VALUES` list whose id the
/// table does not hold.
pub fn insert_statement(table: &str, events: &[&Event]) -> Statement {
    let t = quote_table(table);
    let mut params = Vec::with_capacity(events.len() * 8);
    let mut tuples = Vec::with_capacity(events.len());
    for e in events {
        let n = params.len();
        tuples.push(format!(
            "(@P{}, @P{}, @P{}, @P{}, @P{}, @P{}, CONVERT(datetime2(6), @P{}, 126), @P{})",
            n + 1,
            n + 2,
            n + 3,
            n + 4,
            n + 5,
            n + 6,
            n + 7,
            n + 8
        ));
        params.extend([
            Param::Guid(e.id),
            Param::Text(Some(e.origin.clone())),
            Param::Int(e.epoch as i64),
            Param::Int(e.seq as i64),
            Param::Text(Some(e.kind.clone())),
            Param::Text(e.entity_key.clone()),
            Param::Text(Some(
                e.timestamp.format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
            )),
            Param::Text(Some(e.data.get().to_string())),
        ]);
    }
    Statement {
        sql: format!(
            "INSERT INTO {t} (event_id, origin, epoch, seq, type, entity_key, event_ts, data) \
             SELECT v.event_id, v.origin, v.epoch, v.seq, v.type, v.entity_key, v.event_ts, v.data \
             FROM (VALUES {}) AS v (event_id, origin, epoch, seq, type, entity_key, event_ts, data) \
             WHERE NOT EXISTS (SELECT 1 FROM {t} AS a WITH (UPDLOCK, HOLDLOCK) WHERE a.event_id = v.event_id)",
            tuples.join(", ")
        ),
        params,
    }
}

/// A page of the archive in `(origin, epoch, seq)` order (SQL Server has
/// no row comparison: the keyset spelled out).
pub fn read_statement(
    table: &str,
    after: Option<&Cursor>,
    origin: Option<&str>,
    limit: usize,
) -> Statement {
    let mut params = vec![Param::Text(origin.map(str::to_string))];
    let keyset = match after {
        Some((o, epoch, seq)) => {
            params.extend([
                Param::Text(Some(o.clone())),
                Param::Int(*epoch),
                Param::Int(*seq),
            ]);
            " AND (origin > @P2 OR (origin = @P2 AND (epoch > @P3 OR (epoch = @P3 AND seq > @P4))))"
        }
        None => "",
    };
    Statement {
        sql: format!(
            "SELECT TOP ({limit}) CONVERT(nvarchar(36), event_id), origin, epoch, seq, type, entity_key, \
             CONVERT(nvarchar(30), event_ts, 126), data FROM {} \
             WHERE (@P1 IS NULL OR origin = @P1){keyset} ORDER BY origin, epoch, seq",
            quote_table(table)
        ),
        params,
    }
}

/// An event from a row read as text.
fn row_event(row: &[Option<String>]) -> Result<Event, TargetError> {
    let cell = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let number = |i: usize| cell(i).trim().parse::<i64>().unwrap_or(-1);
    archived_event(
        &cell(0),
        cell(1),
        number(2),
        number(3),
        cell(4),
        row.get(5).cloned().flatten(),
        &cell(6),
        cell(7),
    )
}

/// What an error of the archive means: the table missing (208) needs
/// `sitesync init`; the rest as the connection classified it.
fn archive_error(e: TdsError) -> TargetError {
    if e.number == Some(208) {
        TargetError::operator(
            Cause::NotInitialised,
            format!("{}: run `sitesync init`", e.message),
        )
    } else {
        e.batch
    }
}

/// One batch in one transaction on `client`: begun, inserted chunk by
/// chunk, committed; rolled back if any statement fails.
pub async fn write_batch<C: Tds>(
    client: &mut C,
    table: &str,
    events: &[&Event],
) -> Result<(), TargetError> {
    client.begin().await.map_err(archive_error)?;
    for range in chunks(events, CHUNK_ROWS, CHUNK_BYTES) {
        let st = insert_statement(table, &events[range]);
        if let Err(e) = client.execute(&st, "archiving a batch").await {
            let _ = client.rollback().await;
            return Err(archive_error(e));
        }
    }
    client.commit().await.map_err(archive_error)
}

impl SqlServerArchive {
    pub fn new(
        cfg: &ConnectorConfig,
        db: &Settings,
        archive: &ArchiveConfig,
    ) -> Result<SqlServerArchive, TargetError> {
        conn::config(db, "sitesync")?;
        let (schema, _) = db.outbox_parts();
        Ok(SqlServerArchive {
            db: db.clone(),
            application: format!("sitesync-{}-archive", cfg.name),
            name: archive.table_in(Some(schema)),
            client: Mutex::new(None),
        })
    }

    async fn open(&self) -> Result<MssqlClient, TargetError> {
        Ok(conn::connect(&self.db, &self.application).await?)
    }
}

impl Store for SqlServerArchive {
    fn table(&self) -> &str {
        &self.name
    }

    async fn init(&self) -> Result<Vec<String>, TargetError> {
        let mut client = self.open().await?;
        let st = Statement {
            sql: ddl(&self.name),
            params: vec![],
        };
        Tds::execute(&mut client, &st, "creating the archive table")
            .await
            .map_err(|e| e.batch)?;
        Ok(vec![format!(
            "archive table {}: ready (clustered on origin, epoch, seq; indexed by received_at, event_ts)",
            self.name
        )])
    }

    async fn preflight(&self) -> Vec<Check> {
        let mut client = match self.open().await {
            Ok(c) => c,
            Err(e) => {
                return vec![Check::fail(
                    "archive table",
                    e.to_string(),
                    "check database.url",
                )];
            }
        };
        let st = Statement {
            sql: "SELECT CASE WHEN OBJECT_ID(@P1, N'U') IS NULL THEN 0 ELSE 1 END".into(),
            params: vec![Param::Text(Some(quote_table(&self.name)))],
        };
        match Tds::select(&mut client, &st, "looking for the archive table").await {
            Ok(rows)
                if rows
                    .first()
                    .and_then(|r| r.first())
                    .cloned()
                    .flatten()
                    .as_deref()
                    == Some("1") =>
            {
                vec![Check::pass("archive table", self.name.clone())]
            }
            Ok(_) => vec![Check::fail(
                "archive table",
                format!("{} does not exist", self.name),
                "run `sitesync init`",
            )],
            Err(e) => vec![Check::fail(
                "archive table",
                e.message,
                "check the database user's permissions",
            )],
        }
    }

    async fn write<'a>(&'a self, events: &'a [&'a Event]) -> Result<u64, TargetError> {
        if events.is_empty() {
            return Ok(0);
        }
        let mut guard = self.client.lock().await;
        if guard.is_none() {
            *guard = Some(self.open().await?);
        }
        let client = guard.as_mut().expect("opened above");
        let r = write_batch(client, &self.name, events).await;
        if r.is_err() {
            // A new connection for the next try: this one may be broken.
            *guard = None;
        }
        r.map(|()| events.len() as u64)
    }

    async fn read<'a>(
        &'a self,
        after: Option<&'a Cursor>,
        origin: Option<&'a str>,
        limit: usize,
    ) -> Result<Vec<Event>, TargetError> {
        let mut client = self.open().await?;
        let st = read_statement(&self.name, after, origin, limit);
        let rows = Tds::select(&mut client, &st, "reading the archive")
            .await
            .map_err(archive_error)?;
        rows.iter().map(|r| row_event(r)).collect()
    }

    async fn count(&self) -> Result<u64, TargetError> {
        let mut client = self.open().await?;
        let st = Statement {
            sql: format!("SELECT COUNT_BIG(*) FROM {}", quote_table(&self.name)),
            params: vec![],
        };
        let rows = Tds::select(&mut client, &st, "counting the archive")
            .await
            .map_err(archive_error)?;
        Ok(rows
            .first()
            .and_then(|r| r.first())
            .cloned()
            .flatten()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A fake SQL Server (the real one cannot run here) that keeps the
    /// archive as a set of ids: an insert adds the rows of its `VALUES`
    /// list whose id it lacks, inside a transaction that commit keeps and
    /// rollback drops; `fail_at` makes the n-th insert fail.
    #[derive(Default)]
    struct Server {
        committed: Vec<uuid::Uuid>,
        tx: Option<Vec<uuid::Uuid>>,
        inserts: usize,
        fail_at: Option<usize>,
        statements: Vec<Statement>,
    }

    #[derive(Clone, Default)]
    struct FakeServer(Arc<Mutex<Server>>);

    impl Tds for FakeServer {
        async fn execute(&mut self, st: &Statement, _: &str) -> Result<(), TdsError> {
            let mut s = self.0.lock().unwrap();
            s.inserts += 1;
            s.statements.push(st.clone());
            if s.fail_at == Some(s.inserts) {
                return Err(TdsError {
                    number: Some(208),
                    message: "Invalid object name 'dbo.sitesync_archive'".into(),
                    batch: TargetError::transient(Cause::Query, "208"),
                });
            }
            let ids: Vec<uuid::Uuid> = st
                .params
                .iter()
                .filter_map(|p| match p {
                    Param::Guid(g) => Some(*g),
                    _ => None,
                })
                .collect();
            let held: Vec<uuid::Uuid> = s.committed.clone();
            let tx = s.tx.as_mut().expect("inside a transaction");
            for id in ids {
                if !held.contains(&id) && !tx.contains(&id) {
                    tx.push(id);
                }
            }
            Ok(())
        }

        async fn select(
            &mut self,
            _: &Statement,
            _: &str,
        ) -> Result<crate::engine::sqlserver::target::Rows, TdsError> {
            Ok(vec![])
        }

        async fn begin(&mut self) -> Result<(), TdsError> {
            self.0.lock().unwrap().tx = Some(Vec::new());
            Ok(())
        }

        async fn save(&mut self, _: &str) -> Result<(), TdsError> {
            Ok(())
        }

        async fn commit(&mut self) -> Result<(), TdsError> {
            let mut s = self.0.lock().unwrap();
            let tx = s.tx.take().expect("a transaction to commit");
            s.committed.extend(tx);
            Ok(())
        }

        async fn rollback(&mut self) -> Result<(), TdsError> {
            self.0.lock().unwrap().tx = None;
            Ok(())
        }
    }

    fn events(n: u64) -> Vec<Event> {
        (1..=n)
            .map(|seq| {
                let body = format!(
                    r#"{{"id":"{}","timestamp":"2026-01-02T03:04:05.123456Z","origin":"LONDON","type":"item.upsert","entity_key":"{seq}","data":{{"n":{seq}}},"epoch":7,"seq":{seq}}}"#,
                    uuid::Uuid::new_v4()
                );
                Event::from_body(body.as_bytes()).unwrap()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_batch_is_one_transaction_of_chunks_under_the_parameter_limit() {
        let server = FakeServer::default();
        let all = events(600);
        let refs: Vec<&Event> = all.iter().collect();
        write_batch(&mut server.clone(), "dbo.sitesync_archive", &refs)
            .await
            .unwrap();
        let s = server.0.lock().unwrap();
        assert_eq!(s.committed.len(), 600);
        assert_eq!(s.statements.len(), 3, "600 rows in chunks of 250");
        for st in &s.statements {
            assert!(st.params.len() <= 2100, "{} parameters", st.params.len());
            assert!(st.sql.contains("WITH (UPDLOCK, HOLDLOCK)"), "{}", st.sql);
            assert!(
                st.sql.starts_with("INSERT INTO [dbo].[sitesync_archive]"),
                "{}",
                st.sql
            );
        }
        // The event's time goes as ISO 8601 text, converted by the server.
        assert!(
            matches!(&s.statements[0].params[6], Param::Text(Some(t)) if t == "2026-01-02T03:04:05.123456")
        );
    }

    #[tokio::test]
    async fn a_redelivered_batch_adds_nothing_and_a_failed_one_keeps_nothing() {
        let server = FakeServer::default();
        let all = events(300);
        let refs: Vec<&Event> = all.iter().collect();
        write_batch(&mut server.clone(), "dbo.sitesync_archive", &refs[..100])
            .await
            .unwrap();
        // Redelivered after a crash between commit and ack: skipped.
        write_batch(&mut server.clone(), "dbo.sitesync_archive", &refs[..100])
            .await
            .unwrap();
        assert_eq!(server.0.lock().unwrap().committed.len(), 100);
        // The second chunk fails: the first chunk's rows go too.
        server.0.lock().unwrap().fail_at = Some(4);
        let e = write_batch(&mut server.clone(), "dbo.sitesync_archive", &refs)
            .await
            .unwrap_err();
        assert!(e.message().contains("run `sitesync init`"), "{e}");
        let s = server.0.lock().unwrap();
        assert_eq!(s.committed.len(), 100, "nothing of the failed batch stays");
        assert!(s.tx.is_none(), "rolled back");
    }

    #[test]
    fn the_archive_is_read_back_in_each_origins_order() {
        let cursor: Cursor = ("LONDON".into(), 7, 120);
        let st = read_statement("dbo.sitesync_archive", Some(&cursor), None, 500);
        assert!(st.sql.starts_with("SELECT TOP (500)"), "{}", st.sql);
        assert!(
            st.sql.ends_with("ORDER BY origin, epoch, seq"),
            "{}",
            st.sql
        );
        assert!(
            st.sql.contains(
                "(origin > @P2 OR (origin = @P2 AND (epoch > @P3 OR (epoch = @P3 AND seq > @P4))))"
            ),
            "{}",
            st.sql
        );
        assert_eq!(
            st.params,
            vec![
                Param::Text(None),
                Param::Text(Some("LONDON".into())),
                Param::Int(7),
                Param::Int(120)
            ]
        );
        let first = read_statement("dbo.sitesync_archive", None, Some("PARIS"), 10);
        assert_eq!(first.params, vec![Param::Text(Some("PARIS".into()))]);
        assert!(!first.sql.contains("@P2"), "{}", first.sql);
        // A row as the server returns it, as text.
        let e = row_event(&[
            Some("0190A0E0-0000-7000-8000-000000000001".into()),
            Some("LONDON".into()),
            Some("7".into()),
            Some("121".into()),
            Some("item.upsert".into()),
            None,
            Some("2026-01-02T03:04:05.123456".into()),
            Some(r#"{"id":1}"#.into()),
        ])
        .unwrap();
        assert_eq!((e.epoch, e.seq, e.entity_key), (7, 121, None));
        assert_eq!(e.data.get(), r#"{"id":1}"#);
        assert_eq!(e.timestamp.to_rfc3339(), "2026-01-02T03:04:05.123456+00:00");
    }

    #[test]
    fn the_table_is_created_once_with_its_indexes() {
        let sql = ddl("dbo.sitesync_archive");
        assert!(
            sql.starts_with("IF OBJECT_ID(N'[dbo].[sitesync_archive]', N'U') IS NULL"),
            "{sql}"
        );
        assert!(sql.contains("PRIMARY KEY NONCLUSTERED"), "{sql}");
        assert!(sql.contains("CLUSTERED INDEX [IX_sitesync_archive_origin_seq] ON [dbo].[sitesync_archive] (origin, epoch, seq)"), "{sql}");
    }
}
