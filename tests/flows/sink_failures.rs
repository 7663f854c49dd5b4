//! The sink under failure: a sidecar killed mid-batch, a standby taking
//! over, the broker and the databases restarted, the broker connection cut,
//! poison messages, messages removed from a queue by hand. In every case the
//! sites converge and each event is applied exactly once (counted by the
//! `item_log` trigger, not only read off the final state).

use crate::support::mesh::{
    Mesh, MeshOptions, Write, bulk_upsert, spawn_random_writer, upsert, write,
};
use crate::support::proxy::Proxy;
use crate::support::rabbit::{self, PrivateRabbit};
use crate::support::sidecar::Received;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use std::time::{Duration, Instant};

/// Random writers at PARIS and MADRID on shared keys for `secs` seconds.
async fn writers(mesh: &Mesh, secs: u64) -> Vec<tokio::task::JoinHandle<Vec<Write>>> {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (i, site) in ["PARIS", "MADRID"].into_iter().enumerate() {
        tasks.push(spawn_random_writer(
            mesh.client(site).await,
            site,
            0xA076_1D64_78BD_642Fu64.wrapping_mul(i as u64 + 3),
            30,
            until,
            Duration::from_millis(5),
        ));
    }
    tasks
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<Write>>>) -> Vec<Write> {
    let mut writes = Vec::new();
    for t in tasks {
        writes.extend(t.await.unwrap());
    }
    writes
}

/// Invariants 2 and 3: a message is acked only after its batch committed,
/// so a sink killed with -9 in the middle of applying redelivers what it had
/// not acked, and the inbox turns the redelivery into no second write.
#[tokio::test]
async fn invariant_2_and_3_a_sink_killed_mid_batch_loses_nothing_and_applies_nothing_twice() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let mut sidecars = mesh.spawn_all();
    let tasks = writers(&mesh, 8).await;
    let mut kills = 0;
    for n in [150, 400] {
        mesh.wait_inbox("LONDON", n, Duration::from_secs(60)).await;
        sidecars.get_mut("LONDON").unwrap().kill9();
        kills += 1;
        sidecars.insert("LONDON", mesh.spawn("LONDON"));
    }
    let writes = collect(tasks).await;
    mesh.assert_synced(&writes, &format!("{kills} kill -9 of LONDON"))
        .await;
}

/// Invariant 6 (the sidecar goes away): with a standby running, kill -9 of
/// the active sidecar hands the site's queue and the checkpoint store to
/// the standby, which carries on without loss or double application.
#[tokio::test]
async fn invariant_6_the_standby_takes_over_from_a_killed_active_sidecar() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let mut sidecars = mesh.spawn_all();
    sidecars
        .get("LONDON")
        .unwrap()
        .wait_log("sink consuming", Duration::from_secs(30))
        .await;
    let standby = mesh.spawn("LONDON");
    standby
        .wait_log("standby: another sitesync holds", Duration::from_secs(30))
        .await;
    let tasks = writers(&mesh, 8).await;
    mesh.wait_inbox("LONDON", 300, Duration::from_secs(60))
        .await;
    sidecars.get_mut("LONDON").unwrap().kill9();
    standby.wait_log("streaming", Duration::from_secs(30)).await;
    // LONDON writes too, now that only the standby serves it.
    let london = mesh.client("LONDON").await;
    let mut writes = collect(tasks).await;
    for k in 0..20 {
        let (event, rev) = upsert(&london, "LONDON", 1000 + k, k).await;
        writes.push(Write {
            site: "LONDON",
            event,
            rev: Some(rev),
        });
    }
    mesh.assert_synced(&writes, "standby takeover").await;
}

/// `count` upserts at every site, keys from `base`.
async fn phase(mesh: &Mesh, writes: &mut Vec<Write>, base: i32, count: i32) {
    for site in mesh.sites() {
        let c = mesh.client(site).await;
        for k in 0..count {
            let (event, rev) = upsert(&c, site, base + k, k).await;
            writes.push(Write {
                site,
                event,
                rev: Some(rev),
            });
        }
    }
}

/// Invariant 6 (the broker and the databases go away): the broker stopped
/// and started while every site keeps writing, then the database cluster
/// (every site's source and sink database) crash-restarted while the sinks
/// apply.
#[tokio::test]
async fn invariant_6_a_broker_restart_and_a_database_restart_mid_stream_lose_nothing() {
    let rabbit = PrivateRabbit::start().await;
    let mesh = Mesh::start(MeshOptions {
        amqp_url: Some(rabbit.amqp_url()),
        ..MeshOptions::default()
    })
    .await;
    let sidecars = mesh.spawn_all();
    let mut writes = Vec::new();
    phase(&mesh, &mut writes, 0, 100).await;
    mesh.wait_inbox("LONDON", 50, Duration::from_secs(60)).await;
    rabbit.stop().await;
    // Each site keeps working alone while the broker is down.
    phase(&mesh, &mut writes, 1000, 100).await;
    for s in sidecars.values() {
        s.wait_log("session ended; retrying", Duration::from_secs(60))
            .await;
    }
    rabbit.start_again().await;
    // A bulk change at PARIS and MADRID; the cluster crash-restarts while
    // LONDON's sink is applying it.
    let before = mesh.foreign_inbox("LONDON").await;
    for site in ["PARIS", "MADRID"] {
        let c = mesh.client(site).await;
        writes.extend(bulk_upsert(&c, site, 2000 + 5000 * (site == "MADRID") as i32, 3000).await);
    }
    mesh.wait_inbox("LONDON", before + 100, Duration::from_secs(60))
        .await;
    mesh.pg.stop_immediate().await;
    mesh.pg.start_again().await;
    let at_restart = mesh.foreign_inbox("LONDON").await;
    eprintln!(
        "database restarted with {} of {} foreign events applied at LONDON",
        at_restart,
        mesh.foreign_counts(&writes)["LONDON"]
    );
    phase(&mesh, &mut writes, 3000, 100).await;
    mesh.assert_synced(&writes, "broker restart, then database restart")
        .await;
}

/// Invariant 6 (the network goes away): a TCP proxy between every sidecar
/// and the broker drops all connections, three times, mid-stream.
#[tokio::test]
async fn invariant_6_connections_cut_between_the_sidecars_and_the_broker_lose_nothing() {
    let broker: std::net::SocketAddr = "127.0.0.1:5672".parse().unwrap();
    let proxy = Proxy::start(broker).await;
    let mesh = Mesh::start(MeshOptions {
        connector_amqp_url: Some(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port())),
        ..MeshOptions::default()
    })
    .await;
    let sidecars = mesh.spawn_all();
    let tasks = writers(&mesh, 8).await;
    let mut cut = 0;
    for n in [100, 250, 400] {
        mesh.wait_inbox("LONDON", n, Duration::from_secs(60)).await;
        cut += proxy.cut();
    }
    assert!(cut >= 3, "the proxy carried the sidecars' connections");
    let writes = collect(tasks).await;
    mesh.assert_synced(&writes, "three cuts").await;
    assert!(
        sidecars["LONDON"].log_text().contains("retrying"),
        "LONDON noticed the cut"
    );
}

/// Poison messages in the middle of a stream — a body that is not JSON, an
/// event type with no route, a row LONDON's own constraint refuses, a row
/// LONDON's trigger refuses (`RAISE`), a key value that does not fit its
/// column — each go to the dead-letter queue with the reason, and
/// everything else is applied (none of them stalls the queue). Once the
/// causes are fixed, `dlq requeue` applies them.
#[tokio::test]
async fn poison_messages_go_to_the_dead_letter_queue_and_apply_once_requeued_after_the_fix() {
    let mesh = Mesh::start(MeshOptions {
        sink_extra: "max_attempts = 2\n".into(),
        ..MeshOptions::default()
    })
    .await;
    let london = mesh.client("LONDON").await;
    london
        .batch_execute(
            "ALTER TABLE item ADD CONSTRAINT london_refuses_666 CHECK (n <> 666);
             CREATE TABLE tag (id int PRIMARY KEY, label text NOT NULL);
             CREATE FUNCTION refuse_777() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.n = 777 THEN RAISE EXCEPTION 'london refuses 777'; END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_777 BEFORE INSERT OR UPDATE ON item FOR EACH ROW EXECUTE FUNCTION refuse_777();",
        )
        .await
        .unwrap();
    let mut sidecars = mesh.spawn_all();
    let paris = mesh.client("PARIS").await;
    let mut writes = Vec::new();
    let mut record = |site, (event, rev)| {
        writes.push(Write {
            site,
            event,
            rev: Some(rev),
        })
    };
    for k in 0..20 {
        record("PARIS", upsert(&paris, "PARIS", k, k).await);
    }
    // A constraint violation at LONDON only.
    let refused = write(&paris, "PARIS", 100, 666, None).await.unwrap();
    record("PARIS", refused);
    // A trigger's RAISE at LONDON only.
    let raised = write(&paris, "PARIS", 101, 777, None).await.unwrap();
    record("PARIS", raised);
    // A key that does not fit the integer column (at every other site; at
    // PARIS the event comes back as its own).
    let bad_key: uuid::Uuid = paris
        .query_one(
            "INSERT INTO outbox (type, entity_key, data) VALUES ('item.upsert', 'abc', '{\"id\": \"abc\", \"n\": 1}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // An event type no route knows.
    let unrouted: uuid::Uuid = paris
        .query_one(
            "INSERT INTO outbox (type, entity_key, data) VALUES ('tag.upsert', '1', '{\"id\": 1, \"label\": \"red\"}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Not JSON, straight into LONDON's queue.
    let conn = rabbit::connect(&mesh.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        mesh.names.site("LONDON").as_str().into(),
        BasicPublishOptions::default(),
        b"{not json",
        BasicProperties::default().with_message_id("garbage-1".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    for k in 20..40 {
        record("PARIS", upsert(&paris, "PARIS", k, k).await);
    }

    // Everything else is applied at LONDON; MADRID has all but the
    // unrouted and the bad-key events. (Each inbox also records its dead
    // letters: four at LONDON, two at MADRID.)
    mesh.wait_inbox("LONDON", 44, Duration::from_secs(60)).await;
    mesh.wait_inbox("MADRID", 44, Duration::from_secs(60)).await;
    let ids: Vec<i32> = mesh.items("LONDON").await.iter().map(|r| r.0).collect();
    assert_eq!(ids, (0..40).collect::<Vec<_>>(), "LONDON applied the rest");
    assert_eq!(mesh.items("MADRID").await.len(), 42);
    // PARIS's own events all came back, the bad-key one included.
    mesh.wait_settled(
        &std::collections::BTreeMap::from([("PARIS", 0), ("LONDON", 44), ("MADRID", 44)]),
        Duration::from_secs(60),
    )
    .await;

    let dlq = mesh.ok("LONDON", &["dlq", "list"]).await;
    let line = |needle: &str| {
        let at = dlq
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} not in the dead-letter list:\n{dlq}"));
        dlq[at..].lines().take(2).collect::<Vec<_>>().join("\n")
    };
    let refused_entry = line(&refused.0.to_string());
    assert!(
        refused_entry.contains("failed at LONDON") && refused_entry.contains("london_refuses_666"),
        "{refused_entry}"
    );
    let raised_entry = line(&raised.0.to_string());
    assert!(
        raised_entry.contains("london refuses 777"),
        "{raised_entry}"
    );
    assert_eq!(
        dlq.matches(&bad_key.to_string()).count(),
        2,
        "the bad key failed at LONDON and at MADRID:\n{dlq}"
    );
    let garbage = line("garbage-1");
    assert!(garbage.contains("not a sitesync event"), "{garbage}");
    let unrouted_entry = line(&unrouted.to_string());
    assert!(unrouted_entry.contains("tag.upsert"), "{unrouted_entry}");
    assert_eq!(
        dlq.matches(&unrouted.to_string()).count(),
        2,
        "the unrouted event failed at LONDON and at MADRID:\n{dlq}"
    );

    // Fix LONDON: drop the constraint and the trigger, route `tag.upsert`.
    london
        .batch_execute(
            "ALTER TABLE item DROP CONSTRAINT london_refuses_666; DROP TRIGGER refuse_777 ON item",
        )
        .await
        .unwrap();
    let file = mesh.connector("LONDON");
    let mut toml = std::fs::read_to_string(file).unwrap();
    toml.push_str(
        "\n[[sink.routes]]\ntype = \"tag.upsert\"\ntable = \"public.tag\"\nkey = [\"id\"]\n",
    );
    std::fs::write(file, toml).unwrap();
    sidecars.get_mut("LONDON").unwrap().terminate().await;
    sidecars.insert("LONDON", mesh.spawn("LONDON"));
    let requeued = mesh.ok("LONDON", &["dlq", "requeue", "--all"]).await;
    assert!(requeued.contains("sent back to"), "{requeued}");

    let c = &london;
    crate::support::wait_for(
        async || {
            let n: i64 = c
                .query_one(
                    "SELECT (SELECT count(*) FROM item WHERE (id, n) IN ((100, 666), (101, 777))) + (SELECT count(*) FROM tag WHERE label = 'red')",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n == 3
        },
        Duration::from_secs(60),
    )
    .await
    .expect("the requeued events were applied at LONDON after the fix");
    // What cannot be fixed comes back: the garbage (LONDON), the unrouted
    // event at MADRID, which still has no route, and the bad key (twice).
    let left = {
        let mut out = String::new();
        crate::support::wait_for(
            async || {
                out = mesh.ok("LONDON", &["dlq", "list"]).await;
                out.starts_with("4 dead letter(s)")
            },
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{out}"));
        out
    };
    assert!(left.contains("garbage-1"), "{left}");
    assert!(left.contains("failed at MADRID"), "{left}");
    assert!(!left.contains(&refused.0.to_string()), "{left}");
    // The requeued constraint victim was applied once, by the sink.
    let written: i64 = london
        .query_one(
            "SELECT count(*) FROM item_log WHERE id = 100 AND by_sink",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, 1);
}

/// A few messages taken out of LONDON's queue by hand (as a purge would)
/// while its sidecar is down: when it comes back, the sink records the gap
/// with the exact missing range of the origin's `seq`, and `sitesync
/// status` shows it.
#[tokio::test]
async fn messages_removed_from_a_queue_by_hand_are_recorded_as_a_gap_with_their_exact_range() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let mut sidecars = mesh.spawn_all();
    let paris = mesh.client("PARIS").await;
    for k in 0..3 {
        upsert(&paris, "PARIS", k, k).await;
    }
    mesh.wait_inbox("LONDON", 3, Duration::from_secs(60)).await;
    sidecars.get_mut("LONDON").unwrap().terminate().await;
    for k in 3..10 {
        upsert(&paris, "PARIS", k, k).await;
    }
    let queue = mesh.names.site("LONDON");
    crate::support::wait_for(
        async || mesh.queue_len(&queue).await >= 7,
        Duration::from_secs(60),
    )
    .await
    .expect("PARIS's events reached LONDON's queue");
    // basic.get is refused on a single-active-consumer queue: consume two.
    let removed: Vec<_> = rabbit::drain(&mesh.amqp_url, &queue, 2, Duration::from_secs(30))
        .await
        .iter()
        .map(|d| Received::from(d).event().clone())
        .collect();
    let (epoch, from, to) = (removed[0].epoch, removed[0].seq, removed[1].seq);
    assert_eq!(to, from + 1);
    sidecars.insert("LONDON", mesh.spawn("LONDON"));
    mesh.wait_inbox("LONDON", 8, Duration::from_secs(60)).await;
    let gaps: Vec<(String, i64, i64, i64)> = mesh
        .client("LONDON")
        .await
        .query(
            "SELECT origin, epoch, from_seq, to_seq FROM sitesync_gaps",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        gaps,
        vec![("PARIS".to_string(), epoch as i64, from as i64, to as i64)]
    );
    let status = mesh.ok("LONDON", &["status"]).await;
    let expected = format!("seq {from}..={to}");
    assert!(
        status
            .lines()
            .any(|l| l.contains("PARIS") && l.contains(&expected)),
        "status shows the gap {expected}:\n{status}"
    );
    // MADRID got everything: no gap there.
    let madrid_gaps: i64 = mesh
        .client("MADRID")
        .await
        .query_one("SELECT count(*) FROM sitesync_gaps", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(madrid_gaps, 0);
}

/// An outbox row whose event is already recorded as back round (a deletion
/// missed when it came back) is swept by the idle sink: the outbox cannot
/// keep a row for good.
#[tokio::test]
async fn an_outbox_row_whose_event_came_back_is_swept_even_if_its_deletion_was_missed() {
    let mesh = Mesh::start(MeshOptions {
        sites: vec!["PARIS"],
        ..MeshOptions::default()
    })
    .await;
    let paris = mesh.client("PARIS").await;
    let id = uuid::Uuid::new_v4();
    // The inbox already says the event came back, so when it does the
    // batch sees a duplicate and deletes nothing.
    paris
        .execute(
            "WITH i AS (INSERT INTO sitesync_inbox (event_id, origin, type, epoch, seq, outcome) \
                        VALUES ($1, 'PARIS', 'item.upsert', 0, 0, 'own')) \
             INSERT INTO outbox (id, type, entity_key, data) VALUES ($1, 'item.upsert', '5', '{\"id\": 5, \"n\": 1}')",
            &[&id],
        )
        .await
        .unwrap();
    let sidecar = mesh.spawn("PARIS");
    crate::support::wait_for(
        async || {
            paris
                .query_one("SELECT count(*) FROM outbox", &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 0
        },
        Duration::from_secs(60),
    )
    .await
    .expect("the sweep deleted the row");
    sidecar
        .wait_log(
            "deleted outbox rows whose events had come back",
            Duration::from_secs(10),
        )
        .await;
}

/// Invariant 3 on the sink's fast path: a batch first writes its inbox rows
/// with a plain INSERT, which an event the inbox holds already fails; the
/// batch is then applied again, looking for such events. Here the copy of
/// an applied event carries newer data under the same id, so applied twice
/// it would win: it is skipped, and the new event beside it is applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_event_is_skipped_by_its_inbox_row_and_the_rest_of_its_batch_applies() {
    let mesh = Mesh::start(MeshOptions {
        sites: vec!["PARIS", "LONDON"],
        ..MeshOptions::default()
    })
    .await;
    let paris = mesh.client("PARIS").await;
    let london = mesh.client("LONDON").await;
    let mut sidecars = mesh.spawn_all();
    let (first, _) = upsert(&paris, "PARIS", 1, 1).await;
    mesh.wait_inbox("LONDON", 1, Duration::from_secs(60)).await;

    // The event as published, from the archive queue; LONDON stopped so
    // that the copy and the next event wait in its queue together.
    let published = rabbit::drain(
        &mesh.amqp_url,
        &mesh.names.archive,
        1,
        Duration::from_secs(10),
    )
    .await
    .pop()
    .expect("the archive queue holds the event");
    let mut body: serde_json::Value = serde_json::from_slice(&published.data).unwrap();
    assert_eq!(body["id"], first.to_string());
    body["timestamp"] =
        serde_json::json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    body["data"]["n"] = serde_json::json!(99);
    let mut london_sidecar = sidecars.remove("LONDON").unwrap();
    london_sidecar.terminate().await;
    let queue = mesh.names.site("LONDON");
    let conn = rabbit::connect(&mesh.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        queue.as_str().into(),
        BasicPublishOptions::default(),
        &serde_json::to_vec(&body).unwrap(),
        published.properties.clone(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    upsert(&paris, "PARIS", 2, 2).await;
    crate::support::wait_for(
        async || mesh.queue_len(&queue).await == 2,
        Duration::from_secs(30),
    )
    .await
    .expect("the copy and the new event wait in LONDON's queue");

    let london_sidecar = mesh.spawn("LONDON");
    mesh.wait_inbox("LONDON", 2, Duration::from_secs(60)).await;
    crate::support::wait_for(
        async || mesh.queue_len(&queue).await == 0,
        Duration::from_secs(30),
    )
    .await
    .expect("LONDON acked both");
    let items = mesh.items("LONDON").await;
    assert_eq!(
        items.iter().map(|(id, n, _)| (*id, *n)).collect::<Vec<_>>(),
        vec![(1, 1), (2, 2)],
        "the copy was not applied, the new event was"
    );
    let applied: i64 = london
        .query_one(
            "SELECT count(*) FROM item_log WHERE by_sink AND id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 1, "event {first} applied once");
    london_sidecar
        .wait_log("in the inbox already", Duration::from_secs(10))
        .await;
    assert!(
        !london_sidecar.log_text().contains("one message at a time"),
        "the batch was applied again whole, not message by message:\n{}",
        london_sidecar.log_tail()
    );
}
