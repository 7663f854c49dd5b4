//! The MariaDB binlog reader against a private MariaDB server: outbox rows
//! in commit order with their GTIDs and row indexes, a resume in the
//! middle of a transaction, and a start the binlog no longer holds.

use crate::support::mariadb::MariaDb;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, TxOpts};
use sitesync::engine::mariadb::binlog::{
    BinlogReader, OutboxTable, ReaderOptions, current_position, oldest_position,
};
use sitesync::engine::mariadb::position::{Gtids, Position};
use sitesync::error::{Cause, ErrorKind, SourceError};
use sitesync::event::parse_timestamp;
use sitesync::position::LogPosition;
use sitesync::source::Change;
use std::time::{Duration, Instant};

/// The reader's login: replication, and nothing else.
const READER: &str = "sitesync";
const READER_PASSWORD: &str = "r3plica";

/// Creates `app.outbox`, a table that is not the outbox, and the reader's
/// login; returns a root connection to `app`.
async fn setup(db: &MariaDb) -> Conn {
    db.create_database("app").await;
    db.create_user(READER, READER_PASSWORD, "REPLICATION SLAVE", "*.*")
        .await;
    let mut conn = db.conn(Some("app")).await;
    conn.query_drop(
        "CREATE TABLE outbox (
             id CHAR(36) NOT NULL PRIMARY KEY,
             created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
             origin VARCHAR(64) NOT NULL DEFAULT 'LONDON',
             type VARCHAR(255) NOT NULL,
             entity_key VARCHAR(255),
             data LONGTEXT NOT NULL
         ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    )
    .await
    .unwrap();
    conn.query_drop("CREATE TABLE other (id INT PRIMARY KEY) ENGINE=InnoDB")
        .await
        .unwrap();
    conn
}

fn reader_opts(db: &MariaDb) -> Opts {
    Opts::from_url(&format!(
        "mysql://{READER}:{READER_PASSWORD}@127.0.0.1:{}",
        db.port()
    ))
    .unwrap()
}

fn options(db: &MariaDb) -> ReaderOptions {
    ReaderOptions {
        server_id: db.server().server_id() + 1000,
        heartbeat: Duration::from_secs(1),
    }
}

fn outbox() -> OutboxTable {
    OutboxTable {
        database: "app".to_string(),
        table: "outbox".to_string(),
    }
}

/// Inserts one outbox row per id (and a row of `other` after the first) in
/// one transaction, committed or rolled back.
async fn write_tx(conn: &mut Conn, ids: &[String], commit: bool) {
    let mut tx = conn.start_transaction(TxOpts::default()).await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        tx.exec_drop(
            "INSERT INTO outbox (id, type, entity_key, data) VALUES (?, 'customer.upsert', ?, ?)",
            (
                id,
                (i % 2 == 0).then(|| format!("k{i}")),
                format!(r#"{{"n": {i}, "name": "Zoé"}}"#),
            ),
        )
        .await
        .unwrap();
        if i == 0 {
            tx.exec_drop("INSERT INTO other VALUES (?)", (rand_int(),))
                .await
                .unwrap();
        }
    }
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
}

fn rand_int() -> i32 {
    (uuid::Uuid::new_v4().as_u128() % 1_000_000_000) as i32
}

/// `n` UUIDs, tagged with `tag` in their first two hex digits.
fn ids(tag: u8, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{tag:02x}{i:06x}-0000-4000-8000-000000000000"))
        .collect()
}

async fn gtid_pos(conn: &mut Conn) -> String {
    conn.query_first::<String, _>("SELECT @@gtid_binlog_pos")
        .await
        .unwrap()
        .unwrap()
}

/// Rows and commits (heartbeats left out) until `commits` commits were
/// read.
async fn read_commits(reader: &mut BinlogReader, commits: usize) -> Vec<Change<Position>> {
    let mut got = Vec::new();
    let mut seen = 0;
    while seen < commits {
        let change = tokio::time::timeout(Duration::from_secs(30), reader.next())
            .await
            .unwrap_or_else(|_| panic!("no change within 30 s; so far: {got:#?}"))
            .unwrap_or_else(|e| panic!("reading the binlog: {e}; so far: {got:#?}"));
        match change {
            Change::Heartbeat { .. } => {}
            Change::Commit { .. } => {
                seen += 1;
                got.push(change);
            }
            Change::Row { .. } => got.push(change),
        }
    }
    got
}

/// `(id, position)` of the rows, and the commits' resume points.
fn split(changes: &[Change<Position>]) -> (Vec<(String, Position)>, Vec<Position>) {
    let mut rows = Vec::new();
    let mut commits = Vec::new();
    for c in changes {
        match c {
            Change::Row { position, row } => {
                let row = row.as_ref().unwrap_or_else(|e| panic!("{position}: {e}"));
                rows.push((row.id.clone().unwrap(), position.clone()));
            }
            Change::Commit { resume } => commits.push(resume.clone()),
            Change::Heartbeat { .. } => {}
        }
    }
    (rows, commits)
}

fn state(text: &str) -> Option<Gtids> {
    Some(Gtids::MariaDb(text.parse().unwrap()))
}

#[tokio::test]
async fn binlog_reader_yields_outbox_rows_with_their_gtids_and_row_indexes() {
    let db = MariaDb::start().await;
    let mut conn = setup(&db).await;
    let (t1, t2, t4, t5) = (ids(0xa, 3), ids(0xb, 1), ids(0xc, 2), ids(0xd, 1));
    let before_t1 = gtid_pos(&mut conn).await;
    write_tx(&mut conn, &t1, true).await;
    let after_t1 = gtid_pos(&mut conn).await;
    // Rolled back: nothing reaches the binlog.
    write_tx(&mut conn, &t2, false).await;
    // Another table only: no outbox row, no commit for it.
    conn.query_drop("INSERT INTO other VALUES (-1)")
        .await
        .unwrap();
    let before_t4 = gtid_pos(&mut conn).await;
    write_tx(&mut conn, &t4, true).await;
    let after_t4 = gtid_pos(&mut conn).await;
    // A new definition: the outbox's table id and column order change.
    conn.query_drop("ALTER TABLE outbox ADD COLUMN note TEXT FIRST")
        .await
        .unwrap();
    let before_t5 = gtid_pos(&mut conn).await;
    write_tx(&mut conn, &t5, true).await;

    let mut admin = db.conn(None).await;
    let from = oldest_position(&mut admin).await.unwrap();
    assert_eq!(from.to_string(), "mariadb:mysql-bin.000001:4#0");
    let mut reader = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), &from)
        .await
        .unwrap();
    let changes = read_commits(&mut reader, 3).await;
    let (rows, commits) = split(&changes);

    let got: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    let want: Vec<&str> = t1
        .iter()
        .chain(&t4)
        .chain(&t5)
        .map(String::as_str)
        .collect();
    assert_eq!(got, want, "outbox rows of committed transactions, in order");
    // Row positions: the state before the transaction, where it starts,
    // the row's index.
    for (i, (_, p)) in rows[..3].iter().enumerate() {
        assert_eq!(p.gtid, state(&before_t1), "{p}");
        assert_eq!(p.index, i as u32, "{p}");
        assert_eq!((&p.file, p.offset), (&rows[0].1.file, rows[0].1.offset));
    }
    assert_eq!(rows[3].1.gtid, state(&before_t4));
    assert_eq!(rows[4].1.index, 1);
    assert_eq!(rows[5].1.gtid, state(&before_t5));
    // Commits: the state including the transaction.
    assert_eq!(commits.len(), 3);
    assert_eq!(commits[0].gtid, state(&after_t1));
    assert_eq!(commits[1].gtid, state(&after_t4));
    assert_eq!(commits[0].index, 0);
    // One stream's positions only grow.
    let mut last: Option<Position> = None;
    for c in &changes {
        let p = match c {
            Change::Row { position, .. } => position.clone(),
            Change::Commit { resume } | Change::Heartbeat { resume } => resume.clone(),
        };
        if let Some(last) = &last {
            assert!(*last < p, "{last} < {p}");
        }
        last = Some(p);
    }

    // The columns, by name, after the ALTER as before.
    let Change::Row { row: Ok(first), .. } = &changes[0] else {
        panic!("{:?}", changes[0])
    };
    assert_eq!(first.kind.as_deref(), Some("customer.upsert"));
    assert_eq!(first.origin.as_deref(), Some("LONDON"));
    assert_eq!(first.entity_key.as_deref(), Some("k0"));
    assert_eq!(first.data.as_deref(), Some(r#"{"n": 0, "name": "Zoé"}"#));
    let created = parse_timestamp(first.created_at.as_deref().unwrap()).unwrap();
    let age = chrono::Utc::now() - created;
    assert!(age.num_seconds().abs() < 60, "created_at {created}");
    let Change::Row {
        row: Ok(second), ..
    } = &changes[1]
    else {
        panic!("{:?}", changes[1])
    };
    assert_eq!(second.entity_key, None, "NULL stays NULL");
    let last_row = changes
        .iter()
        .rev()
        .find_map(|c| match c {
            Change::Row { row, .. } => Some(row.clone().unwrap()),
            _ => None,
        })
        .unwrap();
    assert_eq!(last_row.id.as_deref(), Some(t5[0].as_str()));
    assert_eq!(last_row.data.as_deref(), Some(r#"{"n": 0, "name": "Zoé"}"#));
    reader.close().await;
}

#[tokio::test]
async fn binlog_reader_resumes_in_the_middle_of_a_transaction() {
    let db = MariaDb::start().await;
    let mut conn = setup(&db).await;
    let (t1, t2) = (ids(0xa, 3), ids(0xb, 2));
    write_tx(&mut conn, &t1, true).await;
    write_tx(&mut conn, &t2, true).await;
    let mut admin = db.conn(None).await;
    let from = oldest_position(&mut admin).await.unwrap();
    let mut reader = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), &from)
        .await
        .unwrap();
    let (all, commits) = split(&read_commits(&mut reader, 2).await);
    reader.close().await;
    assert_eq!(all.len(), 5);

    // By GTID: rows 0 and 1 of the first transaction are done.
    let resume = all[1].1.next_row();
    assert_eq!(resume, all[2].1);
    assert!(resume.gtid.is_some(), "{resume}");
    let mut reader = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), &resume)
        .await
        .unwrap();
    let (rows, again) = split(&read_commits(&mut reader, 2).await);
    reader.close().await;
    assert_eq!(
        rows,
        all[2..].to_vec(),
        "the rest only, at the same positions"
    );
    assert_eq!(again, commits);

    // By file and offset, the same.
    let by_file = Position::new(None, resume.file.clone(), resume.offset, resume.index);
    let mut reader = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), &by_file)
        .await
        .unwrap();
    let (rows, _) = split(&read_commits(&mut reader, 2).await);
    reader.close().await;
    let got: Vec<&String> = rows.iter().map(|(id, _)| id).collect();
    assert_eq!(got, vec![&t1[2], &t2[0], &t2[1]]);
    assert_eq!(rows[0].1.index, 2);

    // After the first commit: the second transaction only.
    let mut reader = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), &commits[0])
        .await
        .unwrap();
    let (rows, _) = split(&read_commits(&mut reader, 1).await);
    reader.close().await;
    assert_eq!(rows, all[3..].to_vec());
}

#[tokio::test]
async fn binlog_reader_refuses_a_purged_or_unknown_start_by_name() {
    let db = MariaDb::start().await;
    let mut conn = setup(&db).await;
    let t1 = ids(0xa, 2);
    write_tx(&mut conn, &t1, true).await;
    let mut admin = db.conn(None).await;
    let from = oldest_position(&mut admin).await.unwrap();
    let mut reader = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), &from)
        .await
        .unwrap();
    let (rows, _) = split(&read_commits(&mut reader, 1).await);
    reader.close().await;
    let purged = rows[1].1.clone();
    let Some(Gtids::MariaDb(purged_state)) = &purged.gtid else {
        panic!("{purged}")
    };

    admin.query_drop("FLUSH BINARY LOGS").await.unwrap();
    write_tx(&mut conn, &ids(0xb, 1), true).await;
    // MariaDB keeps a file a dump thread still reads: the readers above
    // are closed, but the server may not have ended their threads yet.
    crate::support::wait_for(
        async || {
            admin
                .query_drop("PURGE BINARY LOGS TO 'mysql-bin.000002'")
                .await
                .unwrap();
            let oldest: Option<mysql_async::Row> =
                admin.query_first("SHOW BINARY LOGS").await.unwrap();
            oldest.and_then(|row| row.get::<String, _>(0)).as_deref() != Some("mysql-bin.000001")
        },
        Duration::from_secs(30),
    )
    .await
    .expect("mysql-bin.000001 purged once no dump thread reads it");

    let refused = async |from: &Position| -> SourceError {
        let opened = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), from).await;
        let mut reader = match opened {
            Ok(reader) => reader,
            Err(e) => return e,
        };
        let result = tokio::time::timeout(Duration::from_secs(30), reader.next())
            .await
            .expect("an answer within 30 s");
        match result {
            Err(e) => e,
            Ok(change) => panic!("{from}: read {change:?} from a purged start"),
        }
    };
    let e = refused(&purged).await;
    assert_eq!(
        (e.kind(), e.cause()),
        (ErrorKind::Operator, Cause::LogPurged),
        "{e}"
    );
    assert!(e.message().contains(&purged_state.to_string()), "{e}");
    assert!(e.message().contains("ERROR 1236"), "{e}");
    assert!(e.message().contains("sitesync checkpoint reset"), "{e}");

    let by_file = Position::new(None, purged.file.clone(), purged.offset, 0);
    let e = refused(&by_file).await;
    assert_eq!(e.cause(), Cause::LogPurged, "{e}");
    assert!(e.message().contains("mysql-bin.000001"), "{e}");

    // A domain the server has never written: refused before streaming,
    // where the server would replay that domain from its beginning.
    let unknown: Position = format!("mariadb:{purged_state},9-1-1@mysql-bin.000002:4")
        .parse()
        .unwrap();
    let e = refused(&unknown).await;
    assert_eq!(e.cause(), Cause::LogPurged, "{e}");
    assert!(e.message().contains("domain 9"), "{e}");
}

#[tokio::test]
async fn binlog_reader_reads_large_transactions_in_order() {
    const TXS: usize = 20;
    const ROWS: usize = 1_000;
    let db = MariaDb::start().await;
    let mut conn = setup(&db).await;
    let mut written = Vec::new();
    for t in 0..TXS {
        let batch = ids(t as u8, ROWS);
        let mut tx = conn.start_transaction(TxOpts::default()).await.unwrap();
        tx.exec_batch(
            "INSERT INTO outbox (id, type, data) VALUES (?, 'bulk', '{}')",
            batch.iter().map(|id| (id,)),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        written.extend(batch);
    }
    let mut admin = db.conn(None).await;
    let from = oldest_position(&mut admin).await.unwrap();
    let began = Instant::now();
    let mut reader = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), &from)
        .await
        .unwrap();
    let (rows, commits) = split(&read_commits(&mut reader, TXS).await);
    let took = began.elapsed();
    reader.close().await;
    eprintln!(
        "read {} outbox rows in {took:?}: {:.0} rows/s",
        rows.len(),
        rows.len() as f64 / took.as_secs_f64()
    );
    let got: Vec<&String> = rows.iter().map(|(id, _)| id).collect();
    assert_eq!(got, written.iter().collect::<Vec<_>>());
    assert_eq!(commits.len(), TXS);
    assert!(rows.iter().all(|(_, p)| p.index < ROWS as u32));
}

/// Reads until the stream fails; heartbeats (and nothing else) may come
/// first.
async fn until_error(reader: &mut BinlogReader) -> SourceError {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), reader.next())
            .await
            .expect("the stream ends within 30 s")
        {
            Ok(Change::Heartbeat { .. }) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => return e,
        }
    }
}

#[tokio::test]
async fn binlog_reader_reports_a_stopped_or_killed_server_as_transient() {
    let db = MariaDb::start().await;
    let mut conn = setup(&db).await;
    write_tx(&mut conn, &ids(0xa, 1), true).await;
    drop(conn);
    let end = current_position(&mut db.conn(None).await).await.unwrap();
    assert!(end.gtid.is_some(), "{end}");

    let mut reader = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), &end)
        .await
        .unwrap();
    // Idle at the end of the binlog: the server's heartbeats say where it is.
    let Ok(Change::Heartbeat { resume }) = reader.next().await else {
        panic!("a heartbeat from an idle server")
    };
    assert_eq!(
        (resume.gtid.clone(), &resume.file),
        (end.gtid.clone(), &end.file)
    );
    db.stop().await;
    let e = until_error(&mut reader).await;
    assert_eq!(
        (e.kind(), e.cause()),
        (ErrorKind::Transient, Cause::Unreachable),
        "{e}"
    );

    db.start_again().await;
    let end = current_position(&mut db.conn(None).await).await.unwrap();
    let mut reader = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), &end)
        .await
        .unwrap();
    db.kill9().await;
    let e = until_error(&mut reader).await;
    assert_eq!(
        (e.kind(), e.cause()),
        (ErrorKind::Transient, Cause::Unreachable),
        "{e}"
    );
}

#[tokio::test]
async fn binlog_reader_names_a_missing_grant_and_a_server_id_in_use() {
    let db = MariaDb::start().await;
    let _conn = setup(&db).await;
    db.create_user("nogrant", "pw", "SELECT", "*.*").await;
    let end = current_position(&mut db.conn(None).await).await.unwrap();

    let no_grant = Opts::from_url(&format!("mysql://nogrant:pw@127.0.0.1:{}", db.port())).unwrap();
    let e = match BinlogReader::open(no_grant, &options(&db), outbox(), &end).await {
        Err(e) => e,
        Ok(mut reader) => until_error(&mut reader).await,
    };
    assert_eq!(
        (e.kind(), e.cause()),
        (ErrorKind::Operator, Cause::PermissionDenied),
        "{e}"
    );
    assert!(e.message().contains("REPLICATION SLAVE"), "{e}");

    // Two readers with one server id: the server ends one of them.
    let mut first = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), &end)
        .await
        .unwrap();
    assert!(matches!(first.next().await, Ok(Change::Heartbeat { .. })));
    let mut second = BinlogReader::open(reader_opts(&db), &options(&db), outbox(), &end)
        .await
        .unwrap();
    let e = tokio::select! {
        e = until_error(&mut first) => e,
        e = until_error(&mut second) => e,
    };
    eprintln!("server id in use: {e}");
    assert_eq!(
        (e.kind(), e.cause()),
        (ErrorKind::Operator, Cause::Busy),
        "{e}"
    );
    assert!(e.message().contains("server id"), "{e}");
}
