//! The SQL Server source without a server: the decisions, driven through
//! `FakeChangeTracking`, and the SQL text it sends.

use super::*;
use crate::error::ErrorKind;

/// Change Tracking as a list of tracked inserts and two versions; records
/// the reads it was asked for, and checks the transaction discipline.
#[derive(Default)]
struct FakeChangeTracking {
    current: Option<i64>,
    min_valid: Option<i64>,
    rows: Vec<Tracked>,
    reads: Vec<(i64, i64, u32, u32)>,
    /// The `after` key of each read.
    afters: Vec<Option<String>>,
    in_tx: bool,
    transactions: u32,
    /// Rollbacks of a transaction left open by a read that did not finish.
    rollbacks: u32,
    /// `changes` never answers (to drop a read half-way).
    hang: bool,
}

impl FakeChangeTracking {
    fn new(current: i64, min_valid: i64) -> Self {
        FakeChangeTracking {
            current: Some(current),
            min_valid: Some(min_valid),
            ..Default::default()
        }
    }

    /// The outbox row `key` is deleted at `version` (this site's sink, once
    /// its event came back round). Change Tracking keeps net changes: the
    /// row is now reported once, as a delete at `version`, and no longer
    /// as an insert at the version it was inserted at.
    fn delete(&mut self, version: i64, key: &str) {
        let before = self.rows.len();
        self.rows.retain(|r| r.key != key);
        assert_eq!(self.rows.len() + 1, before, "no insert of {key}");
        self.current = Some(self.current.unwrap_or(0).max(version));
    }

    fn insert(&mut self, version: i64, key: &str) {
        self.rows.push(Tracked {
            version,
            key: key.into(),
            payload: Payload::Row(row(key)),
        });
        self.current = Some(self.current.unwrap_or(0).max(version));
    }
}

/// A key as SQL Server orders the `id` column: integers as numbers, and
/// uniqueidentifier by its byte groups, the last six bytes first (SqlGuid's
/// order: bytes 10..=15, 8, 9, 6, 7, 4, 5, 0..=3 of the stored value), not
/// as text. The source never compares keys: the fake does it as the server
/// would.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SqlKey {
    Int(i64),
    Text(String),
    Guid([u8; 16]),
}

fn sql_key(key: &str) -> SqlKey {
    if let Ok(n) = key.parse::<i64>() {
        return SqlKey::Int(n);
    }
    if let Ok(g) = uuid::Uuid::parse_str(key) {
        let stored = g.to_bytes_le();
        const ORDER: [usize; 16] = [10, 11, 12, 13, 14, 15, 8, 9, 6, 7, 4, 5, 0, 1, 2, 3];
        return SqlKey::Guid(ORDER.map(|i| stored[i]));
    }
    SqlKey::Text(key.to_string())
}

fn row(key: &str) -> OutboxRow {
    OutboxRow {
        id: Some(key.into()),
        created_at: Some("2026-11-23T16:11:28.123456+00:00".into()),
        origin: Some("PARIS".into()),
        kind: Some("customer.upsert".into()),
        entity_key: None,
        data: Some("{}".into()),
        commit_time: None,
    }
}

impl ChangeTracking for FakeChangeTracking {
    async fn versions(&mut self) -> Result<Versions, SourceError> {
        assert!(!self.in_tx, "a transaction left open");
        self.in_tx = true;
        self.transactions += 1;
        Ok(Versions {
            current: self.current,
            min_valid: self.min_valid,
        })
    }

    async fn changes(
        &mut self,
        last_sync: i64,
        upto: i64,
        after: Option<&str>,
        skip: u32,
        limit: u32,
    ) -> Result<Vec<Tracked>, SourceError> {
        assert!(self.in_tx, "changes read outside the snapshot transaction");
        if self.hang {
            std::future::pending::<()>().await;
        }
        self.reads.push((last_sync, upto, skip, limit));
        self.afters.push(after.map(str::to_string));
        // What the real query does: > last, <= upto, after the key inside
        // version last + 1, ordered, OFFSET, FETCH.
        let mut rows: Vec<Tracked> = self
            .rows
            .iter()
            .filter(|r| r.version > last_sync && r.version <= upto)
            .filter(|r| {
                after.is_none_or(|k| r.version > last_sync + 1 || sql_key(&r.key) > sql_key(k))
            })
            .cloned()
            .collect();
        rows.sort_by_key(|r| (r.version, sql_key(&r.key)));
        Ok(rows
            .into_iter()
            .skip(skip as usize)
            .take(limit as usize)
            .collect())
    }

    async fn finish(&mut self, ok: bool) -> Result<(), SourceError> {
        if !ok {
            self.rollbacks += 1;
        }
        self.in_tx = false;
        Ok(())
    }
}

/// A resume point without a key: as typed by hand, or a checkpoint
/// written before the key was kept.
fn pos(version: i64, index: u32) -> Position {
    Position {
        version,
        index,
        after: None,
    }
}

/// A position with the key of the last row done (a row's own position
/// carries its own key).
fn posk(version: i64, index: u32, key: &str) -> Position {
    Position {
        version,
        index,
        after: Some(key.into()),
    }
}

fn stream(
    fake: FakeChangeTracking,
    resume: Option<Position>,
    limit: u32,
) -> SqlServerStream<FakeChangeTracking> {
    SqlServerStream::new(
        fake,
        "[dbo].[outbox]".into(),
        resume.as_ref(),
        Duration::from_millis(1000),
        limit,
    )
}

/// Reads until the stream has nothing more without waiting.
async fn drain(s: &mut SqlServerStream<FakeChangeTracking>) -> Vec<Change<Position>> {
    let mut out = Vec::new();
    loop {
        if let Some(c) = s.buffer.pop_front() {
            out.push(c);
            continue;
        }
        let found = s.read_once().await.unwrap();
        if !found && s.buffer.is_empty() {
            return out;
        }
    }
}

fn describe(changes: &[Change<Position>]) -> Vec<String> {
    changes
        .iter()
        .map(|c| match c {
            Change::Row { position, row } => match row {
                Ok(r) => format!("row {position} {}", r.id.as_deref().unwrap_or("")),
                Err(e) => format!("error {position} {e}"),
            },
            Change::Commit { resume } => format!("commit {resume}"),
            Change::Heartbeat { resume } => format!("heartbeat {resume}"),
        })
        .collect()
}

fn p(version: i64, index: u32) -> String {
    pos(version, index).to_string()
}

/// How `describe` shows the row `key`, the `index`th of `version`.
fn row_at(version: i64, index: u32, key: &str) -> String {
    format!("row {} {key}", posk(version, index, key))
}

#[tokio::test]
async fn rows_come_in_version_then_key_order_with_their_index() {
    let mut fake = FakeChangeTracking::new(10, 0);
    fake.insert(7, "b");
    fake.insert(5, "z");
    fake.insert(7, "a");
    let mut s = stream(fake, Some(pos(1, 0)), 100);
    let got = describe(&drain(&mut s).await);
    assert_eq!(
        got,
        vec![
            row_at(5, 0, "z"),
            format!("commit {}", p(6, 0)),
            row_at(7, 0, "a"),
            row_at(7, 1, "b"),
            format!("commit {}", p(11, 0)),
        ]
    );
    // One snapshot transaction per read; the read asked for versions after 0.
    assert_eq!(s.q.reads[0], (0, 10, 0, 100));
    assert!(!s.q.in_tx);
}

#[tokio::test]
async fn a_resumed_stream_skips_the_rows_already_done_by_key() {
    let mut fake = FakeChangeTracking::new(9, 0);
    for k in ["a", "b", "c"] {
        fake.insert(8, k);
    }
    fake.insert(9, "d");
    // Two rows of version 8 were confirmed before the crash, the last b.
    let mut s = stream(fake, Some(posk(8, 2, "b")), 100);
    let got = describe(&drain(&mut s).await);
    assert_eq!(
        got,
        vec![
            row_at(8, 2, "c"),
            format!("commit {}", p(9, 0)),
            row_at(9, 0, "d"),
            format!("commit {}", p(10, 0)),
        ]
    );
    // last_sync_version = 7, after b, skipping nothing by count.
    assert_eq!(s.q.reads[0], (7, 9, 0, 100));
    assert_eq!(s.q.afters[0].as_deref(), Some("b"));
}

#[test]
fn the_fake_orders_keys_as_sql_server_does() {
    // uniqueidentifier: the last group first, whatever the text says.
    assert!(
        sql_key("ffffffff-0000-0000-0000-000000000001")
            < sql_key("00000000-0000-0000-0000-000000000002")
    );
    assert!(
        sql_key("00000000-0000-0000-0000-010000000000")
            > sql_key("00000000-0000-0000-0000-00ffffffffff")
    );
    assert!(sql_key("9") < sql_key("10"));
}

/// Version 3's outbox rows, in SQL Server's key order; their text order
/// is another (C < E < A textually, among others).
const A: &str = "ffffffff-0000-0000-0000-000000000001";
const B: &str = "80000000-0000-0000-0000-000000000002";
const C: &str = "10000000-0000-0000-0000-000000000003";
const D: &str = "90000000-0000-0000-0000-000000000004";
const E: &str = "00000000-0000-0000-0000-000000000005";

/// The rows' keys among `changes`.
fn keys(changes: &[Change<Position>]) -> Vec<String> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Row { row: Ok(r), .. } => r.id.clone(),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_restart_after_rows_of_the_checkpointed_version_were_deleted_loses_and_repeats_nothing() {
    let mut fake = FakeChangeTracking::new(3, 0);
    for k in [E, D, C, B, A] {
        fake.insert(3, k);
    }
    // The first run reads a page of two rows of version 3, and the
    // checkpoint reaches the resume point after the second.
    let mut first = stream(fake, Some(pos(1, 0)), 2);
    assert!(first.read_once().await.unwrap());
    let done: Vec<Change<Position>> = first.buffer.drain(..).collect();
    assert_eq!(
        describe(&done),
        vec![row_at(3, 0, A), row_at(3, 1, B)],
        "SQL Server's key order"
    );
    let checkpoint = done.last().unwrap().resume_after();
    assert_eq!(checkpoint, posk(3, 2, B));
    // Stopped there; meanwhile A came back round and the sink deleted its
    // outbox row: Change Tracking reports A as a delete at version 4 and
    // version 3's inserts are now B, C, D, E. Skipping two by count would
    // lose C; comparing keys as text (`> B`) would lose C and E.
    let mut fake = first.q;
    fake.delete(4, A);
    fake.reads.clear();
    fake.afters.clear();
    // The checkpoint goes through its store's JSON and back.
    let stored: Position =
        serde_json::from_str(&serde_json::to_string(&checkpoint).unwrap()).unwrap();
    let mut second = stream(fake, Some(stored), 2);
    let again = drain(&mut second).await;
    assert_eq!(
        describe(&again),
        vec![
            row_at(3, 2, C),
            row_at(3, 3, D),
            row_at(3, 4, E),
            format!("commit {}", p(5, 0)),
        ]
    );
    // After B by key in SQL, nothing skipped by count.
    assert_eq!(second.q.reads[0], (2, 4, 0, 2));
    assert_eq!(second.q.afters[0].as_deref(), Some(B));
    assert_eq!(second.q.afters[1].as_deref(), Some(D));
    // Every row exactly once over the two runs.
    let mut all = keys(&done);
    all.extend(keys(&again));
    assert_eq!(all, vec![A, B, C, D, E]);
}

#[tokio::test]
async fn an_old_checkpoint_without_a_key_loads_and_resumes_by_count_then_by_key() {
    // Written before positions kept the key.
    let stored: Position =
        serde_json::from_str(r#"{"engine":"sql_server","version":3,"index":2}"#).unwrap();
    assert_eq!(stored, pos(3, 2));
    let mut fake = FakeChangeTracking::new(3, 0);
    for k in [A, B, C, D, E] {
        fake.insert(3, k);
    }
    let mut s = stream(fake, Some(stored), 2);
    let got = drain(&mut s).await;
    assert_eq!(
        describe(&got),
        vec![
            row_at(3, 2, C),
            row_at(3, 3, D),
            row_at(3, 4, E),
            format!("commit {}", p(4, 0)),
        ]
    );
    // The count only for the first page; then after the last key read.
    let skips: Vec<u32> = s.q.reads.iter().map(|r| r.2).collect();
    assert_eq!(skips, vec![2, 0]);
    assert_eq!(s.q.afters, vec![None, Some(D.to_string())]);
}

#[tokio::test]
async fn a_checkpoint_at_the_end_of_a_version_moves_on_to_the_next() {
    let mut fake = FakeChangeTracking::new(3, 0);
    for k in [A, B] {
        fake.insert(3, k);
    }
    fake.insert(4, C);
    // Both rows of version 3 done, then both deleted (gone round).
    fake.delete(5, A);
    fake.delete(5, B);
    let mut s = stream(fake, Some(posk(3, 2, B)), 10);
    let got = describe(&drain(&mut s).await);
    assert_eq!(
        got,
        vec![
            format!("commit {}", p(4, 0)),
            row_at(4, 0, C),
            format!("commit {}", p(6, 0)),
        ]
    );
}

#[tokio::test]
async fn pages_continue_inside_a_large_transaction() {
    let mut fake = FakeChangeTracking::new(3, 0);
    for k in ["a", "b", "c", "d", "e"] {
        fake.insert(3, k);
    }
    let mut s = stream(fake, Some(pos(1, 0)), 2);
    let got = describe(&drain(&mut s).await);
    let rows: Vec<&String> = got.iter().filter(|g| g.starts_with("row")).collect();
    assert_eq!(rows.len(), 5, "{got:?}");
    assert_eq!(rows[4], &row_at(3, 4, "e"));
    assert_eq!(got.last().unwrap(), &format!("commit {}", p(4, 0)));
    // Each page starts after the previous page's last key, skipping nothing.
    let skips: Vec<u32> = s.q.reads.iter().map(|r| r.2).collect();
    assert_eq!(skips, vec![0, 0, 0]);
    assert_eq!(
        s.q.afters,
        vec![None, Some("b".to_string()), Some("d".to_string())]
    );
}

#[tokio::test]
async fn a_page_resumes_after_a_key_so_rows_deleted_meanwhile_shift_nothing() {
    let mut fake = FakeChangeTracking::new(3, 0);
    for k in ["a", "b", "c", "d", "e"] {
        fake.insert(3, k);
    }
    let mut s = stream(fake, Some(pos(1, 0)), 2);
    assert!(s.read_once().await.unwrap());
    // a and b went round and the sink deleted their outbox rows: Change
    // Tracking now reports them once, as deletes at a later version, so
    // version 3 holds c, d, e. Skipping 2 by count would lose c and d.
    s.q.rows.retain(|r| r.key != "a" && r.key != "b");
    let got = describe(&drain(&mut s).await);
    assert_eq!(
        got,
        vec![
            row_at(3, 0, "a"),
            row_at(3, 1, "b"),
            row_at(3, 2, "c"),
            row_at(3, 3, "d"),
            row_at(3, 4, "e"),
            format!("commit {}", p(4, 0)),
        ]
    );
}

#[tokio::test]
async fn a_read_dropped_half_way_has_its_transaction_rolled_back_before_the_next() {
    use futures_util::FutureExt;
    let mut fake = FakeChangeTracking::new(3, 0);
    fake.insert(3, "a");
    fake.hang = true;
    let mut s = stream(fake, Some(pos(1, 0)), 10);
    // What `select!` does when another branch is ready first.
    assert!(s.next().now_or_never().is_none());
    assert!(s.q.in_tx, "the dropped read left its transaction open");
    s.q.hang = false;
    // The fake's `versions` asserts that no transaction is open.
    let got = describe(&drain(&mut s).await);
    assert_eq!(got[0], row_at(3, 0, "a"));
    assert_eq!(s.q.rollbacks, 1);
    assert_eq!(s.q.transactions, 3);
    assert!(!s.q.in_tx);
}

#[tokio::test]
async fn a_failed_read_rolls_its_transaction_back_and_a_good_one_commits() {
    let mut fake = FakeChangeTracking::new(4, 0);
    fake.insert(4, "a");
    let mut s = stream(fake, Some(pos(1, 0)), 10);
    assert!(s.read_once().await.unwrap());
    assert_eq!(s.q.rollbacks, 0, "a good read commits");
    // Change Tracking off on the database: the read fails after `versions`.
    s.q.current = None;
    assert!(s.read_once().await.is_err());
    assert_eq!(s.q.rollbacks, 1, "a failed read rolls back");
    assert!(!s.q.in_tx);
    assert!(!s.tx_open);
}

#[tokio::test]
async fn below_the_min_valid_version_is_an_operator_error_that_says_what_to_do() {
    let fake = FakeChangeTracking::new(500, 120);
    let mut s = stream(fake, Some(pos(100, 0)), 100);
    let e = s.read_once().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Operator);
    assert!(
        e.message().contains("lost to Change Tracking retention"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("checkpoint reset"), "{}", e.message());
    assert!(e.message().contains("120"), "{}", e.message());
    // Nothing was read, and the transaction was ended.
    assert!(s.q.reads.is_empty());
    assert!(!s.q.in_tx);
}

#[test]
fn the_version_decisions() {
    let v = |current, min_valid| Versions {
        current: Some(current),
        min_valid: Some(min_valid),
    };
    let c = |version| Cursor::at(version);
    // last_sync = version - 1 may equal the min valid version.
    assert_eq!(
        check_versions(&c(11), v(20, 10), "t").unwrap(),
        Step::Read { upto: 20 }
    );
    assert_eq!(
        check_versions(&c(10), v(20, 10), "t").unwrap_err().kind(),
        ErrorKind::Operator
    );
    assert_eq!(
        check_versions(&c(21), v(20, 10), "t").unwrap(),
        Step::UpToDate
    );
    // A checkpoint ahead of the database: restored from an older backup.
    let e = check_versions(&c(30), v(20, 10), "t").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Operator);
    assert!(e.message().contains("not the database"), "{}", e.message());
    // Change Tracking off on the database, or on the table.
    let off = Versions {
        current: None,
        min_valid: None,
    };
    assert!(
        check_versions(&c(1), off, "t")
            .unwrap_err()
            .message()
            .contains("not enabled on the database")
    );
    let untracked = Versions {
        current: Some(5),
        min_valid: None,
    };
    assert!(
        check_versions(&c(1), untracked, "t")
            .unwrap_err()
            .message()
            .contains("VIEW CHANGE TRACKING")
    );
}

#[tokio::test]
async fn with_no_checkpoint_the_stream_starts_at_the_min_valid_version() {
    let mut fake = FakeChangeTracking::new(50, 40);
    fake.insert(41, "a");
    let mut s = stream(fake, None, 100);
    let got = describe(&drain(&mut s).await);
    assert_eq!(got[0], row_at(41, 0, "a"));
    assert_eq!(s.q.reads[0].0, 40);
}

#[tokio::test]
async fn a_lost_payload_goes_to_the_dead_letter_queue_with_its_key_and_is_counted() {
    let mut fake = FakeChangeTracking::new(6, 0);
    fake.insert(5, "a");
    fake.rows.push(Tracked {
        version: 5,
        key: "b0b0b0b0-0000-0000-0000-000000000001".into(),
        payload: Payload::Gone,
    });
    fake.insert(6, "c");
    let mut s = stream(fake, Some(pos(1, 0)), 100);
    let got = drain(&mut s).await;
    let lost: Vec<&Change<Position>> = got
        .iter()
        .filter(|c| matches!(c, Change::Row { row: Err(_), .. }))
        .collect();
    assert_eq!(lost.len(), 1);
    let Change::Row {
        position,
        row: Err(e),
    } = lost[0]
    else {
        unreachable!()
    };
    // Its own position: the rows after it keep theirs.
    assert_eq!(
        *position,
        posk(5, 1, "b0b0b0b0-0000-0000-0000-000000000001")
    );
    assert!(e.to_string().contains("lost payload"), "{e}");
    assert!(
        e.to_string()
            .contains("b0b0b0b0-0000-0000-0000-000000000001"),
        "{e}"
    );
    assert_eq!(s.lost_payloads(), 1);
    assert!(describe(&got).contains(&row_at(6, 0, "c")));
}

#[tokio::test]
async fn an_idle_stream_heartbeats_only_when_the_database_moved_on() {
    let fake = FakeChangeTracking::new(10, 0);
    let mut s = stream(fake, Some(pos(11, 0)), 100);
    // Up to date: nothing.
    assert!(drain(&mut s).await.is_empty());
    // Other tables changed: the version moved, with no outbox row.
    s.q.current = Some(15);
    let got = describe(&drain(&mut s).await);
    assert_eq!(got, vec![format!("heartbeat {}", p(16, 0))]);
    // And never backward.
    assert!(drain(&mut s).await.is_empty());
}

#[test]
fn polling_is_immediate_while_there_is_work_and_backs_off_to_the_maximum() {
    let mut poll = Poll::new(Duration::from_millis(150));
    assert_eq!(poll.after(true), Duration::ZERO);
    assert_eq!(poll.after(false), POLL_MIN);
    assert_eq!(poll.after(false), POLL_MIN * 2);
    assert_eq!(poll.after(false), POLL_MIN * 4);
    assert_eq!(poll.after(false), Duration::from_millis(150));
    assert_eq!(poll.after(false), Duration::from_millis(150));
    // Work again: at once, and the next idle wait starts small.
    assert_eq!(poll.after(true), Duration::ZERO);
    assert_eq!(poll.after(false), POLL_MIN);
}

#[test]
fn the_change_query_is_changetable_joined_to_the_outbox_never_a_key_scan() {
    let sql = changes_sql("[dbo].[outbox]", false);
    assert!(sql.contains("FROM CHANGETABLE(CHANGES [dbo].[outbox], @P1) AS ct"));
    assert!(sql.contains("LEFT JOIN [dbo].[outbox] AS o ON o.[id] = ct.[id]"));
    assert!(sql.contains("ct.SYS_CHANGE_OPERATION = 'I'"));
    assert!(sql.contains("ct.SYS_CHANGE_VERSION <= @P2"));
    assert!(sql.contains("ORDER BY ct.SYS_CHANGE_VERSION, ct.[id]"));
    assert!(sql.contains("OFFSET @P3 ROWS FETCH NEXT @P4 ROWS ONLY"));
    assert!(!sql.contains("id] >"));
    let after = changes_sql("[dbo].[outbox]", true);
    // Only inside the first version, and the key a parameter.
    assert!(after.contains(
        "ct.SYS_CHANGE_VERSION <= @P2 AND (ct.SYS_CHANGE_VERSION > @P1 + 1 OR ct.[id] > @P5) ORDER BY"
    ));
    assert!(after.ends_with("OFFSET @P3 ROWS FETCH NEXT @P4 ROWS ONLY"));
    assert_eq!(
        END_ANY_TRANSACTION_SQL,
        "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION"
    );
    assert!(VERSIONS_SQL.contains("CHANGE_TRACKING_CURRENT_VERSION()"));
    assert!(VERSIONS_SQL.contains("CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(@P1))"));
}

fn db_config() -> Settings {
    Settings {
        url: "server=tcp:localhost,1433;user=sa;password=x".into(),
        outbox_table: "app.out]box".into(),
        encrypt: super::super::settings::Encrypt::Required,
        trust_server_certificate: false,
        ca_file: None,
        poll_max: Duration::from_millis(1_000),
        max_downtime: Duration::from_secs(72 * 3600),
        command_timeout: Duration::from_secs(60),
        read_batch: 5_000,
    }
}

#[test]
fn init_sql_enables_change_tracking_and_snapshot_isolation_and_quotes_names() {
    let sql = init_sql(&db_config(), "PA'RIS");
    assert_eq!(
        sql.snapshot,
        "ALTER DATABASE CURRENT SET ALLOW_SNAPSHOT_ISOLATION ON"
    );
    // 72 h of downtime by default, plus a day.
    assert_eq!(
        sql.change_tracking,
        "ALTER DATABASE CURRENT SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 96 HOURS, AUTO_CLEANUP = ON)"
    );
    assert!(sql.outbox.starts_with("CREATE TABLE [app].[out]]box] ("));
    assert!(
        sql.outbox
            .contains("[id] uniqueidentifier NOT NULL CONSTRAINT [PK_out]]box] PRIMARY KEY")
    );
    assert!(sql.outbox.contains("DEFAULT N'PA''RIS'"));
    assert!(sql.outbox.contains("CHECK (ISJSON([data]) = 1)"));
    assert_eq!(
        sql.track_table,
        "ALTER TABLE [app].[out]]box] ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF)"
    );
    assert_eq!(
        sql.schema,
        "IF SCHEMA_ID(N'app') IS NULL EXEC(N'CREATE SCHEMA ' + N'[app]')"
    );
}

#[test]
fn check_compares_retention_with_the_allowed_downtime() {
    let cfg = db_config();
    let ok = DbState {
        snapshot: true,
        retention_hours: Some(96),
        auto_cleanup: true,
        outbox_exists: true,
        outbox_tracked: true,
        database: "paris".into(),
        version: "16.0".into(),
    };
    let status = |s: &DbState| {
        state_checks(&cfg, s, "[dbo].[outbox]")
            .into_iter()
            .map(|c| (c.name, c.status))
            .collect::<Vec<_>>()
    };
    use crate::checks::Status;
    assert!(status(&ok).iter().all(|(_, s)| *s == Status::Pass));
    let short = DbState {
        retention_hours: Some(48),
        ..ok.clone()
    };
    let checks = state_checks(&cfg, &short, "[dbo].[outbox]");
    let retention = checks
        .iter()
        .find(|c| c.name == "change tracking retention")
        .unwrap();
    assert_eq!(retention.status, Status::Fail);
    assert!(retention.detail.contains("48 h"), "{}", retention.detail);
    assert!(
        retention
            .fix
            .as_deref()
            .unwrap()
            .contains("CHANGE_RETENTION = 96 HOURS")
    );
    let bare = DbState {
        snapshot: false,
        retention_hours: None,
        outbox_tracked: false,
        ..ok.clone()
    };
    let failing: Vec<String> = status(&bare)
        .into_iter()
        .filter(|(_, s)| *s == Status::Fail)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        failing,
        vec![
            "snapshot isolation",
            "change tracking (database)",
            "change tracking (outbox)"
        ]
    );
    assert_eq!(retention_hours(2, "DAYS"), 48);
    assert_eq!(retention_hours(90, "MINUTES"), 1);
}

#[test]
fn grants_name_what_is_missing_and_the_grant_to_run() {
    let cells = |sel: &str, ct: &str, del: &str| {
        vec![
            Some(sel.to_string()),
            Some(ct.to_string()),
            Some(del.to_string()),
            Some("sitesync".to_string()),
        ]
    };
    let ok = grant_checks(&cells("1", "1", "1"), "[dbo].[outbox]", true);
    assert_eq!(ok[0].status, crate::checks::Status::Pass);
    let missing = grant_checks(&cells("1", "0", "0"), "[dbo].[outbox]", true);
    assert_eq!(missing[0].status, crate::checks::Status::Fail);
    assert_eq!(
        missing[0].fix.as_deref(),
        Some("GRANT VIEW CHANGE TRACKING, DELETE ON [dbo].[outbox] TO [sitesync];")
    );
    // A source-only connector does not need DELETE.
    let source_only = grant_checks(&cells("1", "1", "0"), "[dbo].[outbox]", false);
    assert_eq!(source_only[0].status, crate::checks::Status::Pass);
}
