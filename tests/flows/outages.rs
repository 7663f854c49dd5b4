//! The broker or the database goes away mid-stream; queues are unbound or
//! deleted. Nothing is lost, and a failure is never counted as delivered.

use crate::support::rabbit::{self, PrivateRabbit};
use crate::support::sidecar::{Options, Site, insert_tx, spawn_writer};
use lapin::options::{QueueBindOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use std::collections::HashSet;
use std::time::Duration;

/// Once the sidecar has checkpointed `checkpointed` events (so everything
/// it counts as delivered is in the queues), checks that `queue` holds every
/// id of `expected` (duplicates allowed); returns how many messages it held.
async fn assert_all_there(
    site: &Site,
    checkpointed: usize,
    queue: &str,
    expected: &HashSet<String>,
) -> usize {
    site.wait_checkpointed(checkpointed as u64, Duration::from_secs(120))
        .await;
    let got = site
        .drain_ids(queue, expected, Duration::from_secs(60))
        .await;
    let total = got.len();
    let seen: HashSet<String> = got
        .iter()
        .filter_map(|r| r.event.as_ref().map(|e| e.id.to_string()))
        .collect();
    let missing = expected.difference(&seen).count();
    assert_eq!(
        missing,
        0,
        "{queue}: {missing} of {} events missing",
        expected.len()
    );
    total
}

#[tokio::test]
async fn a_broker_restart_mid_stream_loses_nothing() {
    let rabbit = PrivateRabbit::start().await;
    let site = Site::start(Options {
        amqp_url: Some(rabbit.amqp_url()),
        ..Options::default()
    })
    .await;
    let london = site.names.site("LONDON");
    let sidecar = site.spawn();
    let writer = spawn_writer(site.client().await, 100, 50);
    site.wait_queue(&london, 1_000, Duration::from_secs(60))
        .await;
    rabbit.stop().await;
    sidecar
        .wait_log("session ended; retrying", Duration::from_secs(60))
        .await;
    rabbit.start_again().await;
    let written: HashSet<String> = writer.await.unwrap().into_iter().collect();
    let total = assert_all_there(&site, written.len(), &london, &written).await;
    eprintln!(
        "broker restart: {total} messages for {} events",
        written.len()
    );
    assert!(
        sidecar.log_text().contains("streaming"),
        "the sidecar resumed streaming"
    );
}

#[tokio::test]
async fn a_database_restart_mid_stream_loses_nothing() {
    let site = Site::start(Options::default()).await;
    let london = site.names.site("LONDON");
    let sidecar = site.spawn();
    let mut written = HashSet::new();
    let client = site.client().await;
    for t in 0..40 {
        written.extend(insert_tx(&client, 50, &format!("a{t}")).await);
    }
    site.wait_queue(&london, 500, Duration::from_secs(60)).await;
    site.pg.stop_immediate().await;
    sidecar
        .wait_log("session ended; retrying", Duration::from_secs(60))
        .await;
    site.pg.start_again().await;
    let client = site.client().await;
    for t in 0..40 {
        written.extend(insert_tx(&client, 50, &format!("b{t}")).await);
    }
    let total = assert_all_there(&site, written.len(), &london, &written).await;
    eprintln!(
        "database crash and restart: {total} messages for {} events",
        written.len()
    );
}

async fn set_binding(site: &Site, queues: &[String], bound: bool) {
    let conn = rabbit::connect(&site.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    for q in queues {
        if bound {
            ch.queue_bind(
                q.as_str().into(),
                site.names.exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        } else {
            ch.queue_unbind(
                q.as_str().into(),
                site.names.exchange.as_str().into(),
                "".into(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        }
    }
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn an_unroutable_publish_is_a_failure_not_a_delivery() {
    // Without the management API: the binding check would stop publishing
    // before anything is returned, and this test is about returns.
    let site = Site::start(Options {
        management: false,
        ..Options::default()
    })
    .await;
    let london = site.names.site("LONDON");
    let sidecar = site.spawn();
    sidecar.wait_log("streaming", Duration::from_secs(30)).await;
    // Re-binding must be one broker operation, or a retry landing between
    // two binds would reach some queues only (and, without the management
    // API, be counted as delivered): bind the queues to a second fanout
    // exchange now, and later bind that exchange to the event exchange.
    let bound = site.names.bound();
    let rebind = format!("{}.rebind", site.names.exchange);
    let conn = rabbit::connect(&site.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        rebind.as_str().into(),
        lapin::ExchangeKind::Fanout,
        lapin::options::ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for q in &bound {
        ch.queue_bind(
            q.as_str().into(),
            rebind.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    set_binding(&site, &bound, false).await;

    let client = site.client().await;
    let ids: HashSet<String> = insert_tx(&client, 3, "lost?").await.into_iter().collect();
    sidecar
        .wait_log("unroutable", Duration::from_secs(30))
        .await;
    // Not counted as delivered: the checkpoint has not numbered them.
    assert!(
        site.live().is_none_or(|ck| ck.next_seq == 1),
        "the checkpoint moved past an unroutable message: {:?}",
        site.live()
    );
    assert_eq!(site.queue_len(&london).await, 0);

    ch.exchange_bind(
        rebind.as_str().into(),
        site.names.exchange.as_str().into(),
        "".into(),
        lapin::options::ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for queue in &bound {
        assert_all_there(&site, 3, queue, &ids).await;
    }
    rabbit::delete_exchanges(&site.amqp_url, &[rebind]).await;
    let _ = conn.close(200, "done".into()).await;
}

/// Deletes `queue` on the site's broker, the fault a test injects.
async fn delete_queue(site: &Site, queue: &str) {
    let conn = rabbit::connect(&site.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_deleted_site_queue_stops_publishing_and_gets_everything_once_back() {
    let site = Site::start(Options::default()).await;
    let london = site.names.site("LONDON");
    let paris = site.names.site("PARIS");
    let sidecar = site.spawn();
    let client = site.client().await;

    let mut before = HashSet::new();
    for t in 0..10 {
        before.extend(insert_tx(&client, 50, &format!("a{t}")).await);
    }
    site.wait_queue(&london, 500, Duration::from_secs(60)).await;
    site.wait_checkpointed(500, Duration::from_secs(30)).await;

    delete_queue(&site, &london).await;

    let mut after = HashSet::new();
    for t in 0..10 {
        after.extend(insert_tx(&client, 50, &format!("b{t}")).await);
    }
    sidecar
        .wait_log(&format!("queue {london}"), Duration::from_secs(30))
        .await;
    assert!(sidecar.log_text().contains("publishing is stopped"));

    // While the queue is missing nothing is checkpointed past the deletion,
    // and publishing stays stopped: PARIS's queue does not grow. (Watching
    // for an absence needs a window of time; two topology checks fit in it.)
    // What the session that found the queue missing had already sent
    // lands first.
    let stalled_at = site
        .settled_queue_len(&paris, Duration::from_millis(500))
        .await;
    let checkpoint = site.live().map(|ck| ck.next_seq);
    let mut stopped = HashSet::new();
    stopped.extend(insert_tx(&client, 20, "c").await);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        site.queue_len(&paris).await,
        stalled_at,
        "published while a queue was missing"
    );
    assert_eq!(site.live().map(|ck| ck.next_seq), checkpoint);

    // Back: LONDON receives every event since the deletion.
    site.ok(&["topology", "declare"]).await;
    let expected: HashSet<String> = after.union(&stopped).cloned().collect();
    assert_all_there(&site, 1_020, &london, &expected).await;
    let all: HashSet<String> = before.union(&expected).cloned().collect();
    assert_all_there(&site, 1_020, &paris, &all).await;
    assert!(sidecar.log_text().contains("streaming"));
}

/// The checkpoint verifies the topology only for events: with LONDON's
/// queue deleted, a change outside the outbox still moves the checkpoint
/// (the database may release its log), and the next event does not.
#[tokio::test]
async fn the_log_position_moves_without_a_topology_check_but_an_event_waits_for_one() {
    let site = Site::start(Options {
        // No periodic check: only the checkpoint cycles verify.
        topology_check_interval_ms: 3_600_000,
        ..Options::default()
    })
    .await;
    let london = site.names.site("LONDON");
    let sidecar = site.spawn();
    let client = site.client().await;
    insert_tx(&client, 10, "before").await;
    site.wait_checkpointed(10, Duration::from_secs(30)).await;
    let before = site.live().expect("checkpointed");

    delete_queue(&site, &london).await;

    // A transaction that publishes nothing: the stream's position moves
    // past it, and so does the checkpoint, with no event numbered.
    client
        .batch_execute("CREATE TABLE elsewhere (n int); INSERT INTO elsewhere VALUES (1)")
        .await
        .unwrap();
    crate::support::wait_for(
        async || site.live().is_some_and(|ck| ck.resume != before.resume),
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the checkpoint did not move past the change: {e}\n{}",
            sidecar.log_tail()
        )
    });
    assert_eq!(site.live().unwrap().next_seq, before.next_seq);
    assert!(
        !sidecar.log_text().contains(&format!("queue {london}")),
        "verified for a position alone: {}",
        sidecar.log_tail()
    );

    // An event is verified before it is checkpointed: the queue is missing.
    insert_tx(&client, 1, "after").await;
    sidecar
        .wait_log(&format!("queue {london}"), Duration::from_secs(30))
        .await;
    assert_eq!(site.live().unwrap().next_seq, before.next_seq);
}

#[tokio::test]
async fn an_unreachable_first_broker_address_fails_over_to_the_next() {
    let site = Site::start(Options {
        dead_broker_first: true,
        ..Options::default()
    })
    .await;
    let sidecar = site.spawn();
    let client = site.client().await;
    let ids: HashSet<String> = insert_tx(&client, 10, "failover")
        .await
        .into_iter()
        .collect();
    assert_all_there(&site, 10, &site.names.site("MADRID"), &ids).await;
    assert!(
        sidecar.log_text().contains("after failing over"),
        "{}",
        sidecar.log_tail()
    );
}

#[tokio::test]
async fn an_unbound_site_queue_stops_publishing_and_gets_everything_once_rebound() {
    let site = Site::start(Options::default()).await;
    let london = site.names.site("LONDON");
    let sidecar = site.spawn();
    let client = site.client().await;
    let before: HashSet<String> = insert_tx(&client, 200, "before")
        .await
        .into_iter()
        .collect();
    site.wait_checkpointed(200, Duration::from_secs(60)).await;

    // Unbound, LONDON's queue still exists: every publish is still confirmed
    // (the other queues take it), so only the binding check can see it.
    set_binding(&site, std::slice::from_ref(&london), false).await;
    let after: HashSet<String> = insert_tx(&client, 200, "after").await.into_iter().collect();
    sidecar
        .wait_log(
            &format!(
                "binding of queue {london} to exchange {}",
                site.names.exchange
            ),
            Duration::from_secs(30),
        )
        .await;
    assert!(
        site.live().is_some_and(|ck| ck.next_seq <= 201),
        "checkpointed past events LONDON never got: {:?}",
        site.live()
    );

    site.ok(&["topology", "declare"]).await;
    site.wait_checkpointed(400, Duration::from_secs(60)).await;
    let all: HashSet<String> = before.union(&after).cloned().collect();
    assert_all_there(&site, 400, &london, &all).await;
}
