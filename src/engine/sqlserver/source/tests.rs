//! The SQL Server source without a server: the decisions, driven through
//! `FakeChangeTracking`, and the SQL text it sends.

use super::*;
use crate::error::ErrorKind;
use crate::event::Clock;
use std::collections::BTreeSet;

/// Change Tracking as a list of tracked inserts and two versions, over an
/// outbox whose `[ordinal]` SQL Server fills in insert order, and the sink's
/// inbox rows of this site's events that came back round; records the
/// reads it was asked for, and checks the transaction discipline.
#[derive(Default)]
struct FakeChangeTracking {
    current: Option<i64>,
    min_valid: Option<i64>,
    rows: Vec<Tracked>,
    /// The last `[ordinal]` handed out (IDENTITY(1,1)).
    identity: i64,
    /// `dbo.sitesync_inbox` rows with `outcome = 'own'`: (origin, epoch,
    /// seq, outbox key).
    own: Vec<(String, u64, u64, String)>,
    /// (last_sync, upto, skip, limit) of each read.
    reads: Vec<(i64, i64, u32, u32)>,
    /// The `after` ordinal of each read.
    afters: Vec<Option<i64>>,
    /// The `from` of each lookup of taken numbers.
    taken_reads: Vec<u64>,
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

    /// The outbox row `key` is deleted at `version`. Change Tracking keeps
    /// net changes: the row is now reported once, as a delete at
    /// `version`, and no longer as an insert at the version it was
    /// inserted at.
    fn delete(&mut self, version: i64, key: &str) {
        let before = self.rows.len();
        self.rows.retain(|r| r.key != key);
        assert_eq!(self.rows.len() + 1, before, "no insert of {key}");
        self.current = Some(self.current.unwrap_or(0).max(version));
    }

    /// This site's sink, once the event `seq` of the row `key` came back
    /// round: the inbox row and the outbox delete in one transaction.
    fn came_back(&mut self, version: i64, key: &str, epoch: u64, seq: u64) {
        self.own.push(("PARIS".into(), epoch, seq, key.into()));
        self.delete(version, key);
    }

    /// An outbox insert in the transaction of `version`; its ordinal is
    /// the next identity value.
    fn insert(&mut self, version: i64, key: &str) {
        self.identity += 1;
        self.rows.push(Tracked {
            version,
            key: key.into(),
            ordinal: self.identity,
            payload: Payload::Row(row(key)),
        });
        self.current = Some(self.current.unwrap_or(0).max(version));
    }
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
        after: Option<i64>,
        skip: u32,
        limit: u32,
    ) -> Result<Vec<Tracked>, SourceError> {
        assert!(self.in_tx, "changes read outside the snapshot transaction");
        if self.hang {
            std::future::pending::<()>().await;
        }
        self.reads.push((last_sync, upto, skip, limit));
        self.afters.push(after);
        // What the real query does: > last, <= upto, after the ordinal
        // inside version last + 1, ordered by (version, ordinal), TOP.
        let mut rows: Vec<Tracked> = self
            .rows
            .iter()
            .filter(|r| r.version > last_sync && r.version <= upto)
            .filter(|r| after.is_none_or(|o| r.version > last_sync + 1 || r.ordinal > o))
            .cloned()
            .collect();
        rows.sort_by_key(|r| (r.version, r.ordinal));
        Ok(rows
            .into_iter()
            .take(skip as usize + limit as usize)
            .skip(skip as usize)
            .collect())
    }

    async fn taken(
        &mut self,
        origin: &str,
        epoch: u64,
        from: u64,
    ) -> Result<Vec<u64>, SourceError> {
        assert!(self.in_tx, "taken numbers read outside the snapshot");
        self.taken_reads.push(from);
        // `NOT EXISTS` the outbox row: an inbox row whose outbox row is
        // still there (a delete left to `sweep_own`) is not taken.
        Ok(self
            .own
            .iter()
            .filter(|(o, e, seq, key)| {
                o == origin
                    && *e == epoch
                    && *seq >= from
                    && !self.rows.iter().any(|r| &r.key == key)
            })
            .map(|(_, _, seq, _)| *seq)
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

/// A resume point without an ordinal, as typed by hand.
fn pos(version: i64, index: u32) -> Position {
    Position {
        version,
        index,
        after: None,
    }
}

/// A position with the ordinal of the last row done (a row's own position
/// carries its own ordinal).
fn poso(version: i64, index: u32, ordinal: i64) -> Position {
    Position {
        version,
        index,
        after: Some(ordinal),
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
        "PARIS".into(),
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

/// How `describe` shows the row `key`, the `index`th of `version`, with
/// its ordinal.
fn row_at(version: i64, index: u32, ordinal: i64, key: &str) -> String {
    format!("row {} {key}", poso(version, index, ordinal))
}

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
async fn rows_come_in_version_then_ordinal_order_with_their_index() {
    let mut fake = FakeChangeTracking::new(10, 0);
    fake.insert(7, "b"); // ordinal 1
    fake.insert(5, "z"); // 2
    fake.insert(7, "a"); // 3
    let mut s = stream(fake, Some(pos(1, 0)), 100);
    let got = describe(&drain(&mut s).await);
    assert_eq!(
        got,
        vec![
            row_at(5, 0, 2, "z"),
            format!("commit {}", p(6, 0)),
            row_at(7, 0, 1, "b"),
            row_at(7, 1, 3, "a"),
            format!("commit {}", p(11, 0)),
        ]
    );
    // One snapshot transaction per read; the read asked for versions after 0.
    assert_eq!(s.q.reads[0], (0, 10, 0, 100));
    assert!(!s.q.in_tx);
}

/// Two outbox rows of one transaction, as SQL Server orders their
/// uniqueidentifier keys: the second written sorts first.
const FIRST: &str = "00000000-0000-0000-0000-0000000000ff";
const SECOND: &str = "ffffffff-0000-0000-0000-000000000001";

#[tokio::test]
async fn defect_2_rows_of_one_transaction_go_out_in_insert_order() {
    // One transaction writes customer 7 twice (the outbox-filling trigger
    // does this on an INSERT then UPDATE): the origin keeps the second
    // write. Change Tracking gives both rows version 4 and no order; by
    // key, SQL Server orders SECOND first (a uniqueidentifier compares its
    // last six bytes first), and every other site would end on the first
    // write: the one published last wins last-writer-wins.
    let mut fake = FakeChangeTracking::new(4, 0);
    fake.insert(4, FIRST);
    fake.insert(4, SECOND);
    let mut s = stream(fake, Some(pos(1, 0)), 100);
    let got = drain(&mut s).await;
    assert_eq!(
        keys(&got),
        vec![FIRST, SECOND],
        "insert order, not key order"
    );
    // Their events' timestamps follow that order, so the second write wins
    // at every site as it did at the origin.
    let mut clock = Clock {
        next_seq: 1,
        last_ts: None,
    };
    let mut stamps = Vec::new();
    for change in &got {
        if let Change::Row { row: Ok(r), .. } = change {
            let e = r.to_event("PARIS", 1, &clock).unwrap();
            clock = clock.after(&e);
            stamps.push((e.timestamp, e.id.to_string()));
        }
    }
    assert!(stamps[0].0 < stamps[1].0);
    assert_eq!(stamps[1].1, SECOND);
}

#[tokio::test]
async fn a_resumed_stream_skips_the_rows_already_done_by_ordinal() {
    let mut fake = FakeChangeTracking::new(9, 0);
    for k in ["a", "b", "c"] {
        fake.insert(8, k);
    }
    fake.insert(9, "d");
    // Two rows of version 8 were confirmed before the crash, the last b.
    let mut s = stream(fake, Some(poso(8, 2, 2)), 100);
    let got = describe(&drain(&mut s).await);
    assert_eq!(
        got,
        vec![
            row_at(8, 2, 3, "c"),
            format!("commit {}", p(9, 0)),
            row_at(9, 0, 4, "d"),
            format!("commit {}", p(10, 0)),
        ]
    );
    // last_sync_version = 7, after ordinal 2, skipping nothing by count.
    assert_eq!(s.q.reads[0], (7, 9, 0, 100));
    assert_eq!(s.q.afters[0], Some(2));
}

#[tokio::test]
async fn a_restart_after_rows_of_the_checkpointed_version_were_deleted_loses_and_repeats_nothing() {
    let mut fake = FakeChangeTracking::new(3, 0);
    for k in ["a", "b", "c", "d", "e"] {
        fake.insert(3, k);
    }
    // The first run reads a page of two rows of version 3, and the
    // checkpoint reaches the resume point after the second.
    let mut first = stream(fake, Some(pos(1, 0)), 2);
    assert!(first.read_once().await.unwrap());
    let done: Vec<Change<Position>> = first.buffer.drain(..).collect();
    assert_eq!(
        describe(&done),
        vec![row_at(3, 0, 1, "a"), row_at(3, 1, 2, "b")]
    );
    let checkpoint = done.last().unwrap().resume_after();
    assert_eq!(checkpoint, poso(3, 2, 2));
    // Stopped there; meanwhile a came back round and the sink deleted its
    // outbox row: Change Tracking reports a as a delete at version 4 and
    // version 3's inserts are now b, c, d, e. Skipping two by count would
    // lose c.
    let mut fake = first.q;
    fake.delete(4, "a");
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
            row_at(3, 2, 3, "c"),
            row_at(3, 3, 4, "d"),
            row_at(3, 4, 5, "e"),
            format!("commit {}", p(5, 0)),
        ]
    );
    // After ordinal 2, nothing skipped by count.
    assert_eq!(second.q.reads[0], (2, 4, 0, 2));
    assert_eq!(second.q.afters[..2], [Some(2), Some(4)]);
    // Every row exactly once over the two runs.
    let mut all = keys(&done);
    all.extend(keys(&again));
    assert_eq!(all, vec!["a", "b", "c", "d", "e"]);
}

#[tokio::test]
async fn a_position_typed_without_an_ordinal_resumes_by_count_then_by_ordinal() {
    let typed: Position = "sqlserver:3#2".parse().unwrap();
    assert_eq!(typed, pos(3, 2));
    let mut fake = FakeChangeTracking::new(3, 0);
    for k in ["a", "b", "c", "d", "e"] {
        fake.insert(3, k);
    }
    let mut s = stream(fake, Some(typed), 2);
    let got = drain(&mut s).await;
    assert_eq!(
        describe(&got),
        vec![
            row_at(3, 2, 3, "c"),
            row_at(3, 3, 4, "d"),
            row_at(3, 4, 5, "e"),
            format!("commit {}", p(4, 0)),
        ]
    );
    // The count only for the first page; then after the last ordinal read.
    let skips: Vec<u32> = s.q.reads.iter().map(|r| r.2).collect();
    assert_eq!(skips, vec![2, 0]);
    assert_eq!(s.q.afters, vec![None, Some(4)]);
}

#[tokio::test]
async fn a_checkpoint_at_the_end_of_a_version_moves_on_to_the_next() {
    let mut fake = FakeChangeTracking::new(3, 0);
    for k in ["a", "b"] {
        fake.insert(3, k);
    }
    fake.insert(4, "c");
    // Both rows of version 3 done, then both deleted (gone round).
    fake.delete(5, "a");
    fake.delete(5, "b");
    let mut s = stream(fake, Some(poso(3, 2, 2)), 10);
    let got = describe(&drain(&mut s).await);
    assert_eq!(
        got,
        vec![
            format!("commit {}", p(4, 0)),
            row_at(4, 0, 3, "c"),
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
    assert_eq!(rows[4], &row_at(3, 4, 5, "e"));
    assert_eq!(got.last().unwrap(), &format!("commit {}", p(4, 0)));
    // Each page starts after the previous page's last ordinal, skipping
    // nothing.
    let skips: Vec<u32> = s.q.reads.iter().map(|r| r.2).collect();
    assert_eq!(skips, vec![0, 0, 0]);
    assert_eq!(s.q.afters, vec![None, Some(2), Some(4)]);
}

#[tokio::test]
async fn defect_9_catch_up_pages_by_key_not_offset() {
    // A backlog of 3 versions × 4 rows, read 3 rows a page while the
    // database keeps committing (other tables: the version moves on).
    let mut fake = FakeChangeTracking::new(3, 0);
    for v in 1..=3 {
        for k in ["a", "b", "c", "d"] {
            fake.insert(v, &format!("{k}{v}"));
        }
    }
    let mut s = stream(fake, Some(pos(1, 0)), 3);
    let mut got = Vec::new();
    loop {
        if let Some(c) = s.buffer.pop_front() {
            got.push(c);
            continue;
        }
        // A new write elsewhere before every page.
        let moved = s.q.current.unwrap() + 1;
        s.q.current = Some(moved);
        if !s.read_once().await.unwrap() {
            break;
        }
    }
    assert_eq!(keys(&got).len(), 12, "{:?}", describe(&got));
    // Never a count to skip: each page continues from the last row read,
    // by version and ordinal, and no page re-reads what a page before it
    // read (OFFSET would make page n cost n pages).
    assert!(s.q.reads.iter().all(|r| r.2 == 0), "{:?}", s.q.reads);
    let lasts: Vec<i64> = s.q.reads.iter().map(|r| r.0).collect();
    assert!(lasts.windows(2).all(|w| w[0] <= w[1]), "{lasts:?}");
    assert_eq!(s.q.afters[1..4], [Some(3), Some(6), Some(9)]);
    // The catch-up keeps the end it started with (4), though the database
    // moved on before every page; the read after it goes to the new end.
    let ends: Vec<i64> = s.q.reads.iter().map(|r| r.1).collect();
    assert_eq!(ends, [4, 4, 4, 4, 4], "{ends:?}");
    s.q.insert(9, "z");
    assert!(s.read_once().await.unwrap());
    assert_eq!(s.q.reads[5].1, 9);
}

#[tokio::test]
async fn defect_4_replay_after_deletes_keeps_each_events_seq() {
    // Outbox ids are UUIDs; the test names them by a letter.
    fn id(name: &str) -> String {
        format!(
            "00000000-0000-0000-0000-0000000000{:02x}",
            name.as_bytes()[0]
        )
    }
    fn name(id: &str) -> String {
        let byte = u8::from_str_radix(&id[id.len() - 2..], 16).unwrap();
        (byte as char).to_string()
    }
    // Five outbox rows in three transactions; the runner numbers them
    // from the clock, as its dispatch does.
    fn number(
        changes: &[Change<Position>],
        clock: &mut Clock,
        taken: &mut BTreeSet<u64>,
    ) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for c in changes {
            if let Change::Row { row: Ok(r), .. } = c {
                clock.skip_taken(taken);
                let e = r.to_event("PARIS", 7, clock).unwrap();
                *clock = clock.after(&e);
                out.push((name(r.id.as_deref().unwrap()), e.seq));
            }
        }
        out
    }
    let mut fake = FakeChangeTracking::new(3, 0);
    for (v, k) in [(1, "a"), (1, "b"), (2, "c"), (3, "d"), (3, "e")] {
        fake.insert(v, &id(k));
    }
    let start = Clock {
        next_seq: 40,
        last_ts: None,
    };
    let mut first = stream(fake, Some(pos(1, 0)), 100);
    first.numbering(7, start.next_seq);
    let published = drain(&mut first).await;
    let mut clock = start;
    let mut taken = BTreeSet::new();
    let before = number(&published, &mut clock, &mut taken);
    assert_eq!(
        before,
        [("a", 40), ("b", 41), ("c", 42), ("d", 43), ("e", 44)].map(|(k, s)| (k.to_string(), s))
    );
    // The checkpoint stayed at the start (the crash came before it was
    // written), while a, c and e came back round: the sink recorded them
    // in its inbox and deleted their outbox rows.
    let mut fake = first.q;
    fake.came_back(4, &id("a"), 7, 40);
    fake.came_back(4, &id("c"), 7, 42);
    fake.came_back(5, &id("e"), 7, 44);
    // Another epoch's and an older number of this one change nothing.
    fake.own.push(("PARIS".into(), 6, 41, id("x")));
    fake.own.push(("PARIS".into(), 7, 12, id("y")));
    fake.own.push(("LONDON".into(), 7, 43, id("z")));
    // And an inbox row whose outbox row the sink has not deleted yet (b,
    // left to the sweep): b is still to be read, its number is not taken.
    fake.own.push(("PARIS".into(), 7, 41, id("b")));
    fake.taken_reads.clear();
    let mut second = stream(fake, Some(pos(1, 0)), 100);
    second.numbering(7, start.next_seq);
    let again = drain(&mut second).await;
    let mut clock = start;
    let mut taken: BTreeSet<u64> = second.taken().into_iter().collect();
    let after = number(&again, &mut clock, &mut taken);
    // b and d are published again with the numbers they had.
    assert_eq!(after, [("b".to_string(), 41), ("d".to_string(), 43)]);
    // The next new event follows e's number.
    clock.skip_taken(&mut taken);
    assert_eq!(clock.next_seq, 45);
    // Looked up while catching up, from the checkpoint's number.
    assert_eq!(second.q.taken_reads, vec![40]);
    // Once caught up, no more lookups.
    second.q.insert(6, &id("f"));
    drain(&mut second).await;
    assert_eq!(second.q.taken_reads.len(), 1);
    assert!(second.taken().is_empty());
}

#[tokio::test]
async fn defect_4_when_every_row_read_again_came_back_the_next_event_takes_no_number_of_theirs() {
    // Published as 40, 41, 42 before a crash that came before the
    // checkpoint; all three came back round and were deleted. The read
    // after the restart finds no insert at all (net changes), and the
    // next row written must get 43, on this restart and the one after.
    let mut fake = FakeChangeTracking::new(2, 0);
    let ids = [
        "00000000-0000-0000-0000-0000000000a1",
        "00000000-0000-0000-0000-0000000000a2",
        "00000000-0000-0000-0000-0000000000a3",
    ];
    for k in ids {
        fake.insert(2, k);
    }
    for (seq, k) in (40..).zip(ids) {
        fake.came_back(3, k, 7, seq);
    }
    let start = Clock {
        next_seq: 40,
        last_ts: None,
    };
    for restart in 0..2 {
        let mut s = stream(fake, Some(pos(1, 0)), 100);
        s.numbering(7, start.next_seq);
        // Up to date with the log but for the deletes: a heartbeat only.
        let got = drain(&mut s).await;
        assert!(keys(&got).is_empty(), "{:?}", describe(&got));
        let mut taken: BTreeSet<u64> = s.taken().into_iter().collect();
        assert_eq!(taken, BTreeSet::from([40, 41, 42]), "restart {restart}");
        let mut clock = start;
        clock.skip_taken(&mut taken);
        assert_eq!(clock.next_seq, 43, "restart {restart}");
        fake = s.q;
    }
}

#[tokio::test]
async fn a_page_resumes_after_an_ordinal_so_rows_deleted_meanwhile_shift_nothing() {
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
            row_at(3, 0, 1, "a"),
            row_at(3, 1, 2, "b"),
            row_at(3, 2, 3, "c"),
            row_at(3, 3, 4, "d"),
            row_at(3, 4, 5, "e"),
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
    assert_eq!(got[0], row_at(3, 0, 1, "a"));
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
    assert_eq!(got[0], row_at(41, 0, 1, "a"));
    assert_eq!(s.q.reads[0].0, 40);
}

#[tokio::test]
async fn a_lost_payload_goes_to_the_dead_letter_queue_with_its_key_and_is_counted() {
    let mut fake = FakeChangeTracking::new(6, 0);
    fake.insert(5, "a");
    // The join found no outbox row: the query gives it ordinal 0.
    fake.rows.push(Tracked {
        version: 5,
        key: "b0b0b0b0-0000-0000-0000-000000000001".into(),
        ordinal: 0,
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
    assert_eq!(*position, poso(5, 0, 0));
    assert!(e.to_string().contains("lost payload"), "{e}");
    assert!(
        e.to_string()
            .contains("b0b0b0b0-0000-0000-0000-000000000001"),
        "{e}"
    );
    assert_eq!(s.lost_payloads(), 1);
    assert!(describe(&got).contains(&row_at(5, 1, 1, "a")));
    assert!(describe(&got).contains(&row_at(6, 0, 2, "c")));
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
fn the_change_query_pages_by_version_and_ordinal_with_top_and_no_offset() {
    let sql = changes_sql("[dbo].[outbox]", false);
    assert!(sql.starts_with("SELECT TOP (@P3) ct.SYS_CHANGE_VERSION"));
    assert!(sql.contains("FROM CHANGETABLE(CHANGES [dbo].[outbox], @P1) AS ct"));
    assert!(sql.contains("LEFT JOIN [dbo].[outbox] AS o ON o.[id] = ct.[id]"));
    assert!(sql.contains("ct.SYS_CHANGE_OPERATION = 'I'"));
    assert!(sql.contains("ct.SYS_CHANGE_VERSION <= @P2"));
    assert!(sql.ends_with("ORDER BY ct.SYS_CHANGE_VERSION, ordinal"));
    assert!(!sql.contains("OFFSET"));
    assert!(!sql.contains("id] >"));
    let after = changes_sql("[dbo].[outbox]", true);
    // Only inside the first version, and the ordinal a parameter.
    assert!(after.contains(
        "ct.SYS_CHANGE_VERSION <= @P2 AND (ct.SYS_CHANGE_VERSION > @P1 + 1 OR CAST(ISNULL(o.[ordinal], 0) AS bigint) > @P4) ORDER BY"
    ));
    assert!(!after.contains("OFFSET"));
    let taken = taken_sql("[dbo].[outbox]");
    assert!(taken.contains("FROM dbo.sitesync_inbox AS i WHERE i.origin = @P1 AND i.epoch = @P2 AND i.seq >= @P3 AND i.outcome = N'own'"));
    assert!(
        taken.contains(
            "AND NOT EXISTS (SELECT 1 FROM [dbo].[outbox] AS o WHERE o.[id] = i.event_id)"
        )
    );
    assert!(taken.starts_with("IF OBJECT_ID(N'dbo.sitesync_inbox', N'U') IS NOT NULL"));
    // An int or smallint identity reads as bigint all the same.
    assert!(sql.contains("CAST(ISNULL(o.[ordinal], 0) AS bigint) AS ordinal"));
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
    assert!(
        sql.outbox
            .contains("[ordinal] bigint IDENTITY(1,1) NOT NULL")
    );
    assert_eq!(
        sql.add_ordinal,
        "ALTER TABLE [app].[out]]box] ADD [ordinal] bigint IDENTITY(1,1) NOT NULL"
    );
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
        ordinal: Some(1),
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
}

#[test]
fn check_fails_an_outbox_without_its_ordering_column_with_the_statement_that_adds_it() {
    use crate::checks::Status;
    let cfg = db_config();
    for (ordinal, says) in [
        (None, "has no [ordinal] column"),
        (Some(0), "is not an IDENTITY"),
    ] {
        let old = DbState {
            snapshot: true,
            retention_hours: Some(96),
            auto_cleanup: true,
            outbox_exists: true,
            outbox_tracked: true,
            ordinal,
            ..Default::default()
        };
        let checks = state_checks(&cfg, &old, "[dbo].[outbox]");
        let order = checks.iter().find(|c| c.name == "outbox order").unwrap();
        assert_eq!(order.status, Status::Fail);
        assert!(order.detail.contains(says), "{}", order.detail);
        assert!(
            order.fix.as_deref().unwrap().starts_with(
                "ALTER TABLE [dbo].[outbox] ADD [ordinal] bigint IDENTITY(1,1) NOT NULL"
            ),
            "{:?}",
            order.fix
        );
    }
    // The stream's own refusal says the same.
    let e = ordinal_problem("[dbo].[outbox]", None).unwrap();
    assert!(e.contains("sitesync init"), "{e}");
    assert!(ordinal_problem("[dbo].[outbox]", Some(1)).is_none());
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
    // The inbox, where a restart finds the numbers already taken: NULL
    // while the sink's tables do not exist, 0 when it may not be read.
    let mut no_inbox = cells("1", "1", "1");
    no_inbox.push(Some("0".into()));
    let checks = grant_checks(&no_inbox, "[dbo].[outbox]", true);
    assert_eq!(checks[0].name, "grants (inbox)");
    assert_eq!(checks[0].status, crate::checks::Status::Fail);
    assert_eq!(
        checks[0].fix.as_deref(),
        Some("GRANT SELECT ON dbo.sitesync_inbox TO [sitesync];")
    );
    assert_eq!(checks[1].status, crate::checks::Status::Pass);
}
