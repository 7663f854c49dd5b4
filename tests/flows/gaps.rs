//! Gaps: a gap row means exactly "these events have not arrived here",
//! whatever order they come in; a gap is filled from the archive without a
//! person, and one the archive cannot fill stays open and says why.

use crate::support::mesh::{Mesh, MeshOptions, Write, bulk_upsert};
use crate::support::rabbit;
use crate::support::{wait_for, wait_for_value};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use std::time::Duration;

/// LONDON's open gaps: `(origin, from, to, note)`.
async fn gaps(mesh: &Mesh, site: &str) -> Vec<(String, i64, i64, Option<String>)> {
    mesh.client(site)
        .await
        .query(
            "SELECT origin, from_seq, to_seq, note FROM sitesync_gaps ORDER BY origin, from_seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Takes the first `n` messages off `queue` (acked: gone), with a
/// consumer of prefetch `n` (a quorum queue with a single active consumer
/// refuses `basic.get`). With `to_the_back`, each is first published again
/// at the queue's tail, as a broker does with a message a consumer
/// released after later ones were delivered: it arrives late.
async fn take_first(mesh: &Mesh, queue: &str, n: usize, to_the_back: bool) -> Vec<Vec<u8>> {
    let conn = rabbit::connect(&mesh.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_qos(n as u16, Default::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "take-first".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut taken = Vec::new();
    while taken.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a message to take")
            .expect("the consumer is open")
            .unwrap();
        if to_the_back {
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &d.data,
                d.properties.clone(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
        taken.push(d.data.clone());
    }
    let _ = conn.close(200, "taken".into()).await;
    taken
}

/// Writes `count` rows at each of PARIS and MADRID while LONDON's sidecar
/// is down, and waits until they all wait in LONDON's queue.
async fn written_while_london_is_down(mesh: &Mesh, count: i32) -> Vec<Write> {
    let mut writes = bulk_upsert(&mesh.client("PARIS").await, "PARIS", 1000, count).await;
    writes.extend(bulk_upsert(&mesh.client("MADRID").await, "MADRID", 2000, count).await);
    let queue = mesh.names.site("LONDON");
    let want = writes.len() as u32;
    wait_for(
        async || mesh.queue_len(&queue).await == want,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{want} messages in {queue}: {e}"));
    writes
}

#[tokio::test]
async fn an_event_that_arrives_late_takes_itself_out_of_its_gap() {
    let mesh = Mesh::start(MeshOptions {
        // No archive: nothing may fill the gap but the late event itself.
        // Small batches: the late events come in a later batch than the
        // gap, which is then in the database (within one batch it never
        // gets there).
        sink_extra: "gap_fill = false\nbatch_size = 4\n".into(),
        ..MeshOptions::default()
    })
    .await;
    let mut paris = mesh.spawn("PARIS");
    let mut madrid = mesh.spawn("MADRID");
    let writes = written_while_london_is_down(&mesh, 20).await;
    // The first two messages (PARIS's seq 1 and 2, in some order with
    // MADRID's) go to the back of LONDON's queue: LONDON sees later seqs
    // first, records a gap, then the late events.
    let taken = take_first(&mesh, &mesh.names.site("LONDON"), 2, true).await;
    assert_eq!(taken.len(), 2);
    let mut london = mesh.spawn("LONDON");
    mesh.wait_inbox("LONDON", writes.len() as i64, Duration::from_secs(60))
        .await;
    // Each late event closed its part: no gap stays behind.
    wait_for(
        async || gaps(&mesh, "LONDON").await.is_empty(),
        Duration::from_secs(10),
    )
    .await
    .expect("no gap left at LONDON");
    let log = london.log_text();
    assert!(
        log.contains("gap: events of this origin never arrived"),
        "the reordering made a gap first, or this test tests nothing:\n{}",
        london.log_tail()
    );
    mesh.assert_synced(&writes, "late events").await;
    // A duplicate of an old event (redelivered again) changes nothing.
    let conn = rabbit::connect(&mesh.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_publish(
        "".into(),
        mesh.names.site("LONDON").as_str().into(),
        BasicPublishOptions::default(),
        &taken[0],
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_for(
        async || mesh.queue_len(&mesh.names.site("LONDON")).await == 0,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(gaps(&mesh, "LONDON").await.is_empty());
    assert_eq!(mesh.foreign_inbox("LONDON").await, writes.len() as i64);
    for s in [&mut paris, &mut madrid, &mut london] {
        assert!(s.terminate().await.success());
    }
}

#[tokio::test]
async fn purged_messages_are_filled_from_the_archive_and_what_it_lacks_stays_open_saying_why() {
    let mesh = Mesh::start(MeshOptions {
        archive: true,
        sink_extra: "gap_fill_after_ms = 200\ngap_fill_again_ms = 60000\n".into(),
        ..MeshOptions::default()
    })
    .await;
    let mut paris = mesh.spawn("PARIS");
    let mut madrid = mesh.spawn("MADRID");
    let mut writes = written_while_london_is_down(&mesh, 30).await;
    let archived = async || -> i64 {
        mesh.client("PARIS")
            .await
            .query_one("SELECT count(*) FROM sitesync_archive", &[])
            .await
            .unwrap()
            .get(0)
    };
    let want = writes.len() as i64;
    wait_for(async || archived().await == want, Duration::from_secs(60))
        .await
        .expect("PARIS archived every event");
    // An operator purges LONDON's queue by hand: 60 events gone for good.
    let conn = rabbit::connect(&mesh.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    let queue = mesh.names.site("LONDON");
    let purged = ch
        .queue_purge(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    assert_eq!(purged as usize, writes.len());
    // And the archive lost MADRID's seq 1 and 2 (purged by retention, or
    // dropped by a bound): those cannot be filled. Kept aside, to restore.
    let paris_db = mesh.client("PARIS").await;
    paris_db
        .batch_execute(
            "CREATE TABLE lost AS SELECT * FROM sitesync_archive WHERE origin = 'MADRID' AND seq <= 2; \
             DELETE FROM sitesync_archive WHERE origin = 'MADRID' AND seq <= 2",
        )
        .await
        .unwrap();
    let lost_ids: Vec<i32> = paris_db
        .query("SELECT entity_key::int FROM lost ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(lost_ids.len(), 2);
    // One more event from each origin: LONDON sees seq 31 first, 1..30
    // missing, for both origins.
    writes.extend(bulk_upsert(&mesh.client("PARIS").await, "PARIS", 3000, 1).await);
    writes.extend(bulk_upsert(&mesh.client("MADRID").await, "MADRID", 4000, 1).await);
    let total = writes.len() as i64;

    let mut london = mesh.spawn("LONDON");
    // The gaps are asked of PARIS's archive and filled; MADRID 1..2 stays,
    // marked.
    let settled = wait_for_value(
        async || {
            let g = gaps(&mesh, "LONDON").await;
            let done =
                mesh.foreign_inbox("LONDON").await == total - 2 && g.len() == 1 && g[0].3.is_some();
            done.then_some(g)
        },
        Duration::from_secs(90),
    )
    .await;
    let left = match settled {
        Ok(g) => g,
        Err(e) => panic!(
            "LONDON did not settle on one marked gap: {:?}, inbox {} of {} ({e})\n{}",
            gaps(&mesh, "LONDON").await,
            mesh.foreign_inbox("LONDON").await,
            total - 2,
            london.log_tail()
        ),
    };
    assert_eq!((left[0].0.as_str(), left[0].1, left[0].2), ("MADRID", 1, 2));
    let note = left[0].3.clone().unwrap();
    assert!(
        note.starts_with("not in the archive: PARIS does not hold MADRID seq 1..2 of epoch"),
        "{note}"
    );
    assert!(
        london.log_text().contains("gap fill: asked the archive"),
        "{}",
        london.log_tail()
    );
    for site in ["PARIS", "MADRID"] {
        assert_eq!(
            mesh.queue_len(&mesh.names.site(site)).await,
            0,
            "the fill went to LONDON only"
        );
    }

    // `status` and `gaps list` say it loudly.
    let status = mesh.ok("LONDON", &["status"]).await;
    assert!(status.contains("!! not in the archive"), "{status}");
    let list = mesh.ok("LONDON", &["gaps", "list"]).await;
    assert!(
        list.contains("MADRID")
            && list.contains("seq 1..2")
            && list.contains("!! not in the archive"),
        "{list}"
    );

    // LONDON lacks exactly the two rows whose events the archive lost.
    let ids = |rows: Vec<(i32, i32, uuid::Uuid)>| rows.into_iter().map(|r| r.0).collect::<Vec<_>>();
    let paris_ids = ids(mesh.items("PARIS").await);
    let expected: Vec<i32> = paris_ids
        .iter()
        .copied()
        .filter(|id| !lost_ids.contains(id))
        .collect();
    assert_eq!(ids(mesh.items("LONDON").await), expected);

    // The events come back to the archive (restored by an operator):
    // `gaps fill --wait` asks now, and returns once the gap is closed.
    paris_db
        .batch_execute("INSERT INTO sitesync_archive SELECT * FROM lost")
        .await
        .unwrap();
    let out = mesh.ok("LONDON", &["gaps", "fill", "--wait", "60"]).await;
    assert!(
        out.contains("asked PARIS's archive for 1 range(s)") && out.contains("every gap is closed"),
        "{out}"
    );
    assert!(gaps(&mesh, "LONDON").await.is_empty());
    mesh.assert_synced(&writes, "after the gap fill").await;
    for s in [&mut paris, &mut madrid, &mut london] {
        assert!(s.terminate().await.success());
    }
}

/// PARIS's receipts: `(event, site, outcome, reason)`.
async fn receipts(mesh: &Mesh) -> Vec<(uuid::Uuid, String, String, Option<String>)> {
    mesh.client("PARIS")
        .await
        .query(
            "SELECT event_id, site, outcome, reason FROM sitesync_receipts ORDER BY event_id, site",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[tokio::test]
async fn receipts_bring_each_site_s_outcome_and_a_dead_letter_s_reason_back_to_the_origin() {
    let mesh = Mesh::start(MeshOptions {
        archive: true,
        archive_extra: "receipts = true\n".into(),
        sink_extra: "receipts = true\nmax_attempts = 1\n".into(),
        ..MeshOptions::default()
    })
    .await;
    let mut sidecars = mesh.spawn_all();
    // PARIS accepts a note the other sites refuse: its event is applied at
    // PARIS and dead-lettered at LONDON and MADRID.
    let paris = mesh.client("PARIS").await;
    paris
        .batch_execute("ALTER TABLE item DROP CONSTRAINT item_note_check")
        .await
        .unwrap();
    let (good, _) = crate::support::mesh::upsert(&paris, "PARIS", 1, 1).await;
    let (bad, _) = crate::support::mesh::write(&paris, "PARIS", 2, 2, Some("forbidden"))
        .await
        .unwrap();
    let got = match wait_for_value(
        async || {
            let r = receipts(&mesh).await;
            (r.len() == 6).then_some(r)
        },
        Duration::from_secs(60),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => panic!(
            "six receipts at PARIS: {e}; it has {:?}\n{}",
            receipts(&mesh).await,
            sidecars["PARIS"].log_tail()
        ),
    };
    let of = |id: uuid::Uuid| -> Vec<(String, String)> {
        got.iter()
            .filter(|r| r.0 == id)
            .map(|r| (r.1.clone(), r.2.clone()))
            .collect()
    };
    let pair = |s: &str, o: &str| (s.to_string(), o.to_string());
    assert_eq!(
        of(good),
        [
            pair("LONDON", "applied"),
            pair("MADRID", "applied"),
            pair("PARIS", "archived")
        ]
    );
    assert_eq!(
        of(bad),
        [
            pair("LONDON", "dead_letter"),
            pair("MADRID", "dead_letter"),
            pair("PARIS", "archived")
        ]
    );
    let reason = got
        .iter()
        .find(|r| r.0 == bad && r.1 == "LONDON")
        .and_then(|r| r.3.clone())
        .unwrap_or_default();
    assert!(
        reason.contains("item_note_check"),
        "the reason reaches the origin: {reason}"
    );

    // `trace` at the origin shows every site, with the reason.
    let out = mesh.ok("PARIS", &["trace", &bad.to_string()]).await;
    for want in [
        "LONDON     dead_letter",
        "MADRID     dead_letter",
        "PARIS      archived",
        "item_note_check",
    ] {
        assert!(out.contains(want), "no `{want}` in:\n{out}");
    }
    assert!(!out.contains("no receipt yet"), "{out}");
    // At a receiving site, its own inbox row.
    let out = mesh.ok("LONDON", &["trace", &good.to_string()]).await;
    assert!(
        out.contains("from PARIS: item.upsert") && out.contains("LONDON     applied"),
        "{out}"
    );
    // An id nobody knows says so, and where to look.
    let unknown = mesh
        .sitesync("LONDON", &["trace", &uuid::Uuid::new_v4().to_string()])
        .await;
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("knows nothing of event"));
    // Receipts are control messages: nothing of them reached a dead-letter
    // queue or a row, and every queue is drained.
    for site in mesh.sites() {
        wait_for(
            async || mesh.queue_len(&mesh.names.site(site)).await == 0,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    }
    let status = mesh.ok("PARIS", &["status"]).await;
    assert!(!status.contains("receipts: !!"), "{status}");
    for s in sidecars.values_mut() {
        assert!(s.terminate().await.success());
    }
}
