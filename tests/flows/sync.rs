//! Three sites kept in sync: every change applied exactly once, in its
//! origin's order, conflicts resolved the same everywhere. The names say
//! which invariant of the design note each test guards.

use crate::support::mesh::{Mesh, MeshOptions, Write, spawn_random_writer, upsert};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[tokio::test]
async fn writes_at_every_site_reach_the_others_and_go_round() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let _sidecars = mesh.spawn_all();
    let mut writes = Vec::new();
    for (i, site) in mesh.sites().into_iter().enumerate() {
        let c = mesh.client(site).await;
        for k in 0..20 {
            let (event, rev) = upsert(&c, site, (i * 100 + k) as i32, k as i32).await;
            writes.push(Write {
                site,
                event,
                rev: Some(rev),
            });
        }
    }
    mesh.wait_settled(&mesh.foreign_counts(&writes), Duration::from_secs(60))
        .await;
    assert_eq!(mesh.assert_converged().await.len(), 60);
    let tally = mesh.assert_exactly_once(&writes).await;
    assert_eq!(tally.applied, 120);
    assert_eq!(tally.lost, 0);
}

/// Invariants 3 and 7: at-least-once delivery made exactly-once by the
/// inbox, and last-writer-wins converging — under concurrent writers at
/// every site on shared keys for 20 seconds.
#[tokio::test]
async fn invariant_3_and_7_concurrent_writers_on_shared_keys_converge_with_each_event_applied_once()
{
    let mesh = Mesh::start(MeshOptions::default()).await;
    let _sidecars = mesh.spawn_all();
    let until = Instant::now() + Duration::from_secs(20);
    let mut tasks = Vec::new();
    for (i, site) in mesh.sites().into_iter().enumerate() {
        for w in 0..2 {
            let client = mesh.client(site).await;
            let seed = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul((i * 2 + w + 1) as u64);
            tasks.push(spawn_random_writer(
                client,
                site,
                seed,
                40,
                until,
                Duration::from_millis(8),
            ));
        }
    }
    let mut writes: Vec<Write> = Vec::new();
    for t in tasks {
        writes.extend(t.await.unwrap());
    }
    mesh.assert_synced(&writes, "six writers at three sites for 20 s")
        .await;
}

/// Invariant 4: the events of one origin reach every site in that origin's
/// commit order.
#[tokio::test]
async fn invariant_4_a_thousand_updates_of_one_key_arrive_in_the_origins_order() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let _sidecars = mesh.spawn_all();
    let paris = mesh.client("PARIS").await;
    let mut writes = Vec::new();
    for n in 1..=1000 {
        let (event, rev) = upsert(&paris, "PARIS", 1, n).await;
        writes.push(Write {
            site: "PARIS",
            event,
            rev: Some(rev),
        });
    }
    mesh.wait_settled(&mesh.foreign_counts(&writes), Duration::from_secs(120))
        .await;
    for site in ["LONDON", "MADRID"] {
        let c = mesh.client(site).await;
        let ns: Vec<i32> = c
            .query(
                "SELECT n FROM item_log WHERE by_sink AND id = 1 ORDER BY seq",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            ns,
            (1..=1000).collect::<Vec<i32>>(),
            "{site} applied the updates out of order or not once each"
        );
        assert_eq!(mesh.items(site).await[0].1, 1000);
    }
    let tally = mesh.assert_exactly_once(&writes).await;
    assert_eq!((tally.applied, tally.lost), (2000, 0));
}

/// Invariant 7: conflicting writes to one key at all three sites at once
/// end on the same winner everywhere, and the losing writes are recorded.
#[tokio::test]
async fn invariant_7_the_same_key_written_at_three_sites_at_once_has_one_winner_and_recorded_losers()
 {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let _sidecars = mesh.spawn_all();
    let mut clients = Vec::new();
    for site in mesh.sites() {
        clients.push((site, mesh.client(site).await));
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(3));
    let mut tasks = Vec::new();
    for (i, (site, client)) in clients.into_iter().enumerate() {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let (event, rev) = upsert(&client, site, 42, 100 + i as i32).await;
            Write {
                site,
                event,
                rev: Some(rev),
            }
        }));
    }
    let mut writes = Vec::new();
    for t in tasks {
        writes.push(t.await.unwrap());
    }
    mesh.wait_settled(&mesh.foreign_counts(&writes), Duration::from_secs(60))
        .await;
    let rows = mesh.assert_converged().await;
    let winner_rev = rows[0].2;
    let winner = writes
        .iter()
        .find(|w| w.rev == Some(winner_rev))
        .expect("the winner is one of the writes");
    // The winner is the latest (commit timestamp, origin) of the three,
    // as the origins' inboxes record it.
    let mut losers_recorded: HashSet<Uuid> = HashSet::new();
    for site in mesh.sites() {
        let c = mesh.client(site).await;
        for r in c
            .query(
                "SELECT loser_event_id, winner_event_id FROM sitesync_conflicts",
                &[],
            )
            .await
            .unwrap()
        {
            let (loser, _winner): (Uuid, Uuid) = (r.get(0), r.get(1));
            assert_ne!(loser, winner.event, "{site} recorded the winner as a loser");
            losers_recorded.insert(loser);
        }
    }
    let losers: HashSet<Uuid> = writes
        .iter()
        .filter(|w| w.event != winner.event)
        .map(|w| w.event)
        .collect();
    assert_eq!(
        losers_recorded, losers,
        "both losing writes are recorded somewhere"
    );
    mesh.assert_exactly_once(&writes).await;
    eprintln!("winner: {} at {}", winner.event, winner.site);
}

/// Invariant 5: no loops. An application trigger fills the outbox on every
/// change of `item` unless the sink made it (`sitesync.applying`); the
/// sink never writes the outbox itself, and an event back at its origin is
/// not applied again but deletes the outbox row.
#[tokio::test]
async fn invariant_5_no_loops_the_sink_marks_its_transactions_and_events_come_back_once() {
    let routes = format!(
        "{}\n[[sink.routes]]\ntype = \"note.upsert\"\ntable = \"public.note\"\nkey = [\"id\"]\n",
        crate::support::mesh::ROUTES
    );
    let mesh = Mesh::start(MeshOptions {
        routes,
        ..MeshOptions::default()
    })
    .await;
    for site in mesh.sites() {
        mesh.client(site)
            .await
            .batch_execute(
                "CREATE TABLE note (id int PRIMARY KEY, body text NOT NULL);
                 CREATE FUNCTION note_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF coalesce(current_setting('sitesync.applying', true), '') <> 'on' THEN
                         INSERT INTO outbox (type, entity_key, data)
                         VALUES ('note.upsert', NEW.id::text, jsonb_build_object('id', NEW.id, 'body', NEW.body));
                     END IF;
                     RETURN NULL;
                 END $$;
                 CREATE TRIGGER note_outbox AFTER INSERT OR UPDATE ON note FOR EACH ROW EXECUTE FUNCTION note_outbox();",
            )
            .await
            .unwrap();
    }
    let _sidecars = mesh.spawn_all();
    let paris = mesh.client("PARIS").await;
    for id in 0..10 {
        paris
            .execute("INSERT INTO note VALUES ($1, 'from paris')", &[&id])
            .await
            .unwrap();
    }
    let expected: BTreeMap<&str, i64> =
        BTreeMap::from([("PARIS", 0), ("LONDON", 10), ("MADRID", 10)]);
    mesh.wait_settled(&expected, Duration::from_secs(60)).await;
    for site in ["LONDON", "MADRID"] {
        let c = mesh.client(site).await;
        let notes: i64 = c
            .query_one("SELECT count(*) FROM note", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(notes, 10, "{site}");
    }
    // No echo: PARIS's own events came back once each and deleted its
    // outbox rows; nothing was published by LONDON or MADRID.
    let c = mesh.client("PARIS").await;
    let own: i64 = c
        .query_one(
            "SELECT count(*) FROM sitesync_inbox WHERE outcome = 'own'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(own, 10);
    for site in mesh.sites() {
        let c = mesh.client(site).await;
        let from_others: i64 = c
            .query_one(
                "SELECT count(*) FROM sitesync_inbox WHERE origin <> 'PARIS'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(from_others, 0, "{site} received an echo");
    }
}

/// Events in each site's inbox once things settle: `paris` of PARIS's
/// and `others` of LONDON's (MADRID gets both).
fn settled(paris: u32, others: u32) -> BTreeMap<&'static str, i64> {
    BTreeMap::from([
        ("PARIS", i64::from(paris)),
        ("LONDON", i64::from(others)),
        ("MADRID", i64::from(paris + others)),
    ])
}

/// Three sites running, with LONDON's row 1 applied everywhere; PARIS's
/// client.
async fn londons_row_at_paris() -> (
    Mesh,
    BTreeMap<&'static str, crate::support::sidecar::Sidecar>,
    tokio_postgres::Client,
) {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let sidecars = mesh.spawn_all();
    let (london, paris) = (mesh.client("LONDON").await, mesh.client("PARIS").await);
    upsert(&london, "LONDON", 1, 10).await;
    mesh.wait_settled(&settled(1, 0), Duration::from_secs(60))
        .await;
    (mesh, sidecars, paris)
}

/// The race on a new key, made deterministic: an application DELETE at
/// PARIS that found no row while the sink was inserting one from LONDON's
/// event. PARIS's delete is the newer write and wins at LONDON and MADRID;
/// at PARIS the row is still there, written by the sink. When the delete's
/// event comes back round, the sink sees that the row is not as PARIS
/// wrote it (the sink's transaction wrote it, under an older version of
/// another site) and applies the delete again: the sites converge.
#[tokio::test]
async fn a_local_delete_that_lost_a_race_with_the_sink_is_applied_again_when_its_event_comes_back()
{
    let (mesh, _sidecars, paris) = londons_row_at_paris().await;
    assert_eq!(mesh.items("PARIS").await.len(), 1, "LONDON's row at PARIS");
    // The delete's outbox row, as the application wrote it: its DELETE
    // statement saw no row to delete.
    paris
        .execute(
            "INSERT INTO outbox (type, entity_key, data) VALUES ('item.delete', '1', jsonb_build_object('id', 1))",
            &[],
        )
        .await
        .unwrap();
    mesh.wait_settled(&settled(1, 1), Duration::from_secs(60))
        .await;
    let rows = mesh.assert_converged().await;
    assert!(rows.is_empty(), "the delete won everywhere: {rows:?}");
    let origin: String = paris
        .query_one("SELECT origin FROM sitesync_versions WHERE key = '1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(origin, "PARIS", "PARIS's delete is the entity's version");
    let by_sink: i64 = paris
        .query_one(
            "SELECT count(*) FROM item_log WHERE id = 1 AND op = 'DELETE' AND by_sink",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(by_sink, 1, "the sink deleted the row at PARIS");
}

/// Two local deletes at PARIS that both found no row (the sink was
/// inserting LONDON's). The first comes back round while the second is in
/// the outbox: that one decides, so the first must leave the entity's
/// version to LONDON; had it moved the version to PARIS, the second would
/// seem safe on its return and the row would stay at PARIS for good.
#[tokio::test]
async fn two_local_deletes_that_lost_a_race_with_the_sink_win_when_the_first_comes_back_before_the_second()
 {
    let (mesh, _sidecars, paris) = londons_row_at_paris().await;
    // An application holds PARIS's row: the sink's batch with the first
    // delete back round waits on it (and tries again) until it lets go.
    let mut holder = mesh.client("PARIS").await;
    let hold = holder.transaction().await.unwrap();
    hold.execute("SELECT 1 FROM item WHERE id = 1 FOR UPDATE", &[])
        .await
        .unwrap();
    let delete = "INSERT INTO outbox (type, entity_key, data) VALUES ('item.delete', '1', jsonb_build_object('id', 1))";
    paris.execute(delete, &[]).await.unwrap();
    crate::support::wait_for(
        async || {
            paris
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE%'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                > 0
        },
        Duration::from_secs(30),
    )
    .await
    .expect("the sink's batch waits on the held row");
    paris.execute(delete, &[]).await.unwrap();
    hold.rollback().await.unwrap();
    mesh.wait_settled(&settled(1, 2), Duration::from_secs(60))
        .await;
    let rows = mesh.assert_converged().await;
    assert!(rows.is_empty(), "the deletes won everywhere: {rows:?}");
}

/// What the README's first set-up command runs: `sitesync demo` runs three sites on
/// private clusters, writes everywhere with a conflict, and exits 0 only
/// when the sites converged, leaving no queue behind.
#[tokio::test]
async fn the_demo_converges_and_cleans_up() {
    let (stdout, _) =
        crate::support::sidecar::run_ok("ssdemo-test", &["demo", "--timeout", "120"]).await;
    assert_demo_converged_and_gone(&stdout).await;
}

/// `sitesync demo --engines postgres,mariadb,postgres`: LONDON on a private
/// MariaDB server (binlog source, `ON DUPLICATE KEY UPDATE` sink) between
/// two PostgreSQL sites; the same rows hash the same on both engines.
#[tokio::test]
async fn the_mixed_demo_with_london_on_mariadb_converges_and_cleans_up() {
    let (stdout, _) = crate::support::sidecar::run_ok(
        "ssdemo-test",
        &[
            "demo",
            "--engines",
            "postgres,mariadb,postgres",
            "--timeout",
            "120",
        ],
    )
    .await;
    assert!(
        stdout.contains("LONDON on MariaDB") && stdout.contains("private MariaDB server"),
        "{stdout}"
    );
    assert_demo_converged_and_gone(&stdout).await;
}

/// The demo's verdict is PASS; one table row per site, all with the same
/// checksums and empty outboxes; its queues and its directory are gone.
async fn assert_demo_converged_and_gone(stdout: &str) {
    let verdict = stdout.lines().last().unwrap_or_default();
    assert!(
        verdict.starts_with("PASS: the three sites converged"),
        "{stdout}"
    );
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| {
            ["PARIS ", "LONDON ", "MADRID "]
                .iter()
                .any(|s| l.starts_with(s))
        })
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    for r in &rows {
        assert_eq!(r[3..5], rows[0][3..5], "checksums differ:\n{stdout}");
        assert_eq!(r[5], "0", "outbox not empty:\n{stdout}");
    }
    let prefix = stdout
        .split("queues ")
        .nth(1)
        .and_then(|s| s.split("_SITE_").next())
        .expect("the demo names its queues");
    for site in ["PARIS", "LONDON", "MADRID"] {
        let q = format!("{prefix}_SITE_{site}");
        let left =
            crate::support::rabbit::queue_len(&crate::support::rabbit::shared_amqp_url(), &q).await;
        assert_eq!(left, None, "the demo left {q} behind");
    }
    let dir = stdout
        .split(" in /tmp/")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the demo names its directory");
    let dir = std::path::Path::new("/tmp").join(dir);
    assert!(!dir.exists(), "the demo left {} behind", dir.display());
}
