//! Every committed outbox row reaches every queue, in commit order, and the
//! checkpoint and the slot follow.

use crate::support::sidecar::{Options, Site, insert_tx};
use crate::support::wait_for;
use sitesync::engine::postgres::position::Position;
use std::collections::HashSet;
use std::time::Duration;

/// 200 transaction sizes between 1 and 99 rows, summing to exactly 10,000.
fn mixed_sizes() -> Vec<usize> {
    let mut sizes: Vec<usize> = (0..200).map(|i| 1 + (i * 37 + 11) % 99).collect();
    let sum: usize = sizes.iter().sum();
    // Spread the difference over the transactions, keeping each in 1..=99.
    let mut diff = 10_000i64 - sum as i64;
    let mut i = 0;
    while diff != 0 {
        let s = &mut sizes[i % 200];
        if diff > 0 && *s < 99 {
            *s += 1;
            diff -= 1;
        } else if diff < 0 && *s > 1 {
            *s -= 1;
            diff += 1;
        }
        i += 1;
    }
    sizes
}

#[tokio::test]
async fn ten_thousand_rows_from_four_writers_arrive_everywhere_in_commit_order() {
    let site = Site::start(Options::default()).await;
    let client = site.client().await;
    site.start_oracle(&client).await;
    let mut sidecar = site.spawn();

    let sizes = mixed_sizes();
    assert_eq!(sizes.iter().sum::<usize>(), 10_000);
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = site.client().await;
        let mine: Vec<usize> = sizes.iter().skip(w).step_by(4).copied().collect();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for (t, n) in mine.into_iter().enumerate() {
                ids.extend(insert_tx(&client, n, &format!("w{w}t{t}")).await);
            }
            ids
        }));
    }
    let mut written = HashSet::new();
    for w in writers {
        written.extend(w.await.unwrap());
    }
    assert_eq!(written.len(), 10_000);

    let (commit_order, last_commit_end) = site.oracle_order(&client).await;
    assert_eq!(
        commit_order.len(),
        10_000,
        "the oracle slot saw every insert"
    );

    for queue in site.names.bound() {
        site.wait_queue(&queue, 10_000, Duration::from_secs(120))
            .await;
        let got = site.drain(&queue, 10_000, Duration::from_secs(60)).await;
        let ids: Vec<String> = got.iter().map(|r| r.event().id.to_string()).collect();
        assert_eq!(ids.len(), 10_000, "{queue}");
        assert!(
            ids == commit_order,
            "{queue}: events are not in the server's commit order"
        );
        // seq numbers the events 1..=10000 in that order, in one epoch.
        let epoch = got[0].event().epoch;
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.event().seq, i as u64 + 1, "{queue}: seq of message {i}");
            assert_eq!(r.event().epoch, epoch);
            assert_eq!(r.event().origin, "PARIS");
        }
        // The position header grows strictly with the queue order.
        let positions: Vec<Position> = got
            .iter()
            .map(|r| r.position.clone().expect("position header"))
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{queue}: positions not increasing"
        );
        assert_eq!(
            site.queue_len(&queue).await,
            0,
            "{queue}: nothing beyond the 10,000"
        );
    }
    assert_eq!(site.queue_len(&site.names.dlq).await, 0);

    // The checkpoint reaches the last commit, and the slot follows it.
    wait_for(
        async || {
            site.live()
                .and_then(|ck| ck.resume)
                .is_some_and(|p| matches!(p, Position { lsn, .. } if lsn >= last_commit_end))
        },
        Duration::from_secs(30),
    )
    .await
    .expect("checkpoint reaches the end of the last transaction");
    wait_for(
        async || site.confirmed_flush(&client).await >= last_commit_end,
        Duration::from_secs(30),
    )
    .await
    .expect("the slot's confirmed_flush_lsn catches up");

    // SIGTERM drains and exits 0; the durable checkpoint is where live.json said.
    let status = sidecar.terminate().await;
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        sidecar.log_tail()
    );
    let stored = site.stored().unwrap();
    assert_eq!(stored.next_seq, 10_001);
    let Some(Position { lsn, .. }) = stored.resume else {
        panic!("{stored:?}")
    };
    assert!(lsn >= last_commit_end);
    assert!(
        site.confirmed_flush(&client).await <= lsn,
        "the slot never runs ahead of the checkpoint"
    );
}

#[tokio::test]
async fn a_second_sidecar_waits_as_standby_and_takes_over_when_the_first_dies() {
    let site = Site::start(Options::default()).await;
    let london = site.names.site("LONDON");
    let client = site.client().await;
    let mut first = site.spawn();
    first.wait_log("streaming", Duration::from_secs(30)).await;
    let standby = site.spawn();
    standby
        .wait_log(
            "standby: another sitesync holds the checkpoint store",
            Duration::from_secs(30),
        )
        .await;
    assert!(
        standby
            .log_text()
            .contains(&format!("active={}", first.pid())),
        "{}",
        standby.log_tail()
    );
    let mut written: HashSet<String> = insert_tx(&client, 100, "before")
        .await
        .into_iter()
        .collect();
    site.wait_checkpointed(100, Duration::from_secs(30)).await;

    first.kill9();
    standby
        .wait_log("taking over", Duration::from_secs(10))
        .await;
    written.extend(insert_tx(&client, 100, "after").await);
    site.wait_checkpointed(200, Duration::from_secs(30)).await;
    let total = site.queue_len(&london).await as usize;
    let got = site.drain(&london, total, Duration::from_secs(30)).await;
    let ids: HashSet<String> = got.iter().map(|r| r.event().id.to_string()).collect();
    assert_eq!(ids, written, "nothing lost across the takeover");
    let mut seqs: Vec<u64> = got.iter().map(|r| r.event().seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs,
        (1..=200).collect::<Vec<u64>>(),
        "seq stays gap-free across the takeover"
    );
}

#[tokio::test]
async fn an_idle_sidecar_answers_keepalives_and_keeps_its_slot_moving() {
    let site = Site::start(Options::default()).await;
    let client = site.client().await;
    // A short sender timeout: without replies the server would cut us off.
    for sql in [
        "ALTER SYSTEM SET wal_sender_timeout = '2s'",
        "SELECT pg_reload_conf()",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let sidecar = site.spawn();
    sidecar.wait_log("streaming", Duration::from_secs(30)).await;
    let walsender = async || -> Option<(i32, String)> {
        let row = client
            .query_opt(
                "SELECT pid, reply_time::text FROM pg_stat_replication WHERE application_name = 'sitesync-paris'",
                &[],
            )
            .await
            .unwrap()?;
        Some((
            row.get(0),
            row.get::<_, Option<String>>(1).unwrap_or_default(),
        ))
    };
    let (pid, _) = crate::support::wait_for_value(walsender, Duration::from_secs(10))
        .await
        .expect("the sidecar's walsender");

    // Unrelated writes move the WAL with nothing for the outbox: the slot
    // must follow (heartbeat positions), not pin the WAL.
    client
        .batch_execute(
            "CREATE TABLE other (x int); INSERT INTO other SELECT generate_series(1, 20000);",
        )
        .await
        .unwrap();
    let wal: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let wal = sitesync::engine::postgres::position::parse_lsn(&wal).unwrap();
    wait_for(
        async || site.confirmed_flush(&client).await >= wal,
        Duration::from_secs(30),
    )
    .await
    .expect("the slot advances while the outbox is idle");
    wait_for(
        async || {
            site.live()
                .and_then(|ck| ck.resume)
                .is_some_and(|p| p >= Position { lsn: wal, index: 0 })
        },
        Duration::from_secs(30),
    )
    .await
    .expect("the checkpoint follows the heartbeats");
    assert_eq!(
        site.live().unwrap().next_seq,
        1,
        "heartbeats are not events"
    );

    // Replies keep coming for three sender timeouts, on the same connection.
    let first_reply: String = client
        .query_one("SELECT now()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_for(
        async || {
            let now: String = client
                .query_one(
                    "SELECT (now() - $1::text::timestamptz > interval '6 seconds')::text",
                    &[&first_reply],
                )
                .await
                .unwrap()
                .get(0);
            now == "true"
                && walsender()
                    .await
                    .is_some_and(|(p, reply)| p == pid && reply > first_reply)
        },
        Duration::from_secs(30),
    )
    .await
    .expect("the walsender outlives three timeouts and keeps getting replies");
    assert!(
        !sidecar.log_text().contains("retrying"),
        "{}",
        sidecar.log_tail()
    );
    insert_tx(&client, 1, "after-idle").await;
    site.wait_queue(&site.names.site("LONDON"), 1, Duration::from_secs(30))
        .await;
}

/// A sidecar whose log collector went away (stderr a closed pipe) keeps
/// publishing, and still drains and exits on SIGTERM. A log line that
/// cannot be written must cost nothing: before, the failed write panicked
/// the task that logged it, and the signal task, which logs before it asks
/// for the stop, died with the request unsent.
#[tokio::test]
async fn a_sidecar_whose_log_reader_is_gone_keeps_publishing_and_stops_on_sigterm() {
    let site = Site::start(Options::default()).await;
    let client = site.client().await;
    let mut sidecar = site.spawn_with_its_log_reader_gone();
    insert_tx(&client, 10, "nolog").await;
    site.wait_checkpointed(10, Duration::from_secs(60)).await;
    // SAFETY: plain kill(2) on our own child.
    unsafe {
        libc::kill(sidecar.pid(), libc::SIGTERM);
    }
    let status = sidecar.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
    assert_eq!(site.stored().map(|ck| ck.next_seq), Some(11));
}
