//! Operating a sidecar: bad outbox rows, a corrupt checkpoint, `checkpoint
//! show` and `checkpoint reset`.

use crate::support::sidecar::{Options, Site, insert_tx};
use crate::support::wait_for;
use sitesync::engine::postgres::position::{Position, format_lsn};
use std::collections::HashSet;
use std::time::Duration;

#[tokio::test]
async fn bad_outbox_rows_go_to_the_dead_letter_queue_with_their_reason_and_the_rest_flows() {
    let site = Site::start(Options {
        database_extra: "outbox_table = \"public.loose_outbox\"".into(),
        broker_extra: "max_message_bytes = 4096".into(),
        skip_init: true,
        ..Options::default()
    })
    .await;
    let client = site.client().await;
    // An outbox with loose types, so that rows can be wrong.
    client
        .batch_execute(
            "CREATE TABLE loose_outbox (id text, created_at timestamptz DEFAULT now(), origin text, \
             type text, entity_key text, data text)",
        )
        .await
        .unwrap();
    site.ok(&["init"]).await;
    let sidecar = site.spawn();
    let good = |n: u32| format!("('{}', 'ok', '{{\"n\": {n}}}')", uuid::Uuid::new_v4());
    client
        .batch_execute(&format!(
            "INSERT INTO loose_outbox (id, type, data) VALUES {};
             INSERT INTO loose_outbox (id, type, data) VALUES (NULL, 'ok', '{{}}');
             INSERT INTO loose_outbox (id, type, data) VALUES ('{}', 'ok', '{{not json');
             INSERT INTO loose_outbox (id, type, data) VALUES {};
             INSERT INTO loose_outbox (id, type, data) VALUES ('not-a-uuid', 'ok', '{{}}');
             INSERT INTO loose_outbox (id, type, data) VALUES ('{}', NULL, '{{}}');
             INSERT INTO loose_outbox (id, origin, type, data) VALUES ('{}', 'LONDON', 'ok', '{{}}');
             INSERT INTO loose_outbox (id, type, data) VALUES ('{}', 'big', '{{\"blob\": \"' || repeat('x', 5000) || '\"}}');
             INSERT INTO loose_outbox (id, type, data) VALUES {};",
            good(1),
            uuid::Uuid::new_v4(),
            good(2),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            good(3),
        ))
        .await
        .unwrap();

    let london = site.names.site("LONDON");
    site.wait_queue(&london, 3, Duration::from_secs(60)).await;
    site.wait_queue(&site.names.dlq, 6, Duration::from_secs(60))
        .await;
    let events = site.drain(&london, 3, Duration::from_secs(30)).await;
    let data: Vec<String> = events
        .iter()
        .map(|r| r.event().data.get().to_string())
        .collect();
    assert_eq!(data, vec![r#"{"n": 1}"#, r#"{"n": 2}"#, r#"{"n": 3}"#]);
    let seqs: Vec<u64> = events.iter().map(|r| r.event().seq).collect();
    assert_eq!(seqs, vec![1, 2, 3], "dead letters take no seq");

    let dead = site
        .drain(&site.names.dlq, 6, Duration::from_secs(30))
        .await;
    let reasons: Vec<String> = dead
        .iter()
        .map(|r| r.reason.clone().expect("a reason header"))
        .collect();
    for (reason, expected) in reasons.iter().zip([
        "column `id` is NULL",
        "column `data` is not valid JSON",
        "column `id` is `not-a-uuid`, not a UUID",
        "column `type` is NULL",
        "column `origin` is `LONDON` but this connector publishes for site `PARIS`",
        "over broker.max_message_bytes (4096)",
    ]) {
        assert!(
            reason.contains(expected),
            "{reason:?} should say {expected:?}"
        );
    }
    // The body keeps the row as written.
    let body: serde_json::Value = serde_json::from_slice(&dead[1].body).unwrap();
    assert_eq!(body["data"], "{not json");
    assert!(dead.iter().all(|r| r.position.is_some()));
    // Too large for the broker: the dead letter goes without its data.
    let big: serde_json::Value = serde_json::from_slice(&dead[5].body).unwrap();
    assert_eq!(big["type"], "big");
    assert!(big["data"].is_null());
    assert!(dead[5].body.len() < 4096);
    assert!(sidecar.log_text().contains("dead-letter queue"));
}

/// Starts the site's sidecar on a checkpoint store it must refuse: it
/// exits with a failure whose log names the store, and `check` fails the
/// checkpoint too. Returns the sidecar's log.
async fn refused_on_its_checkpoint(site: &Site, what: &str) -> String {
    let mut refused = site.spawn();
    let status = refused.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success(), "started on {what}");
    let log = refused.log_text();
    assert!(
        log.contains(&site.store_dir().display().to_string()),
        "{log}"
    );
    let check = site.sitesync(&["check"]).await;
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stdout).contains("[FAIL] checkpoint"));
    log
}

#[tokio::test]
async fn a_corrupt_checkpoint_stops_the_sidecar_and_reset_to_start_republishes_what_the_slot_holds()
{
    let site = Site::start(Options::default()).await;
    let london = site.names.site("LONDON");
    let client = site.client().await;
    let mut sidecar = site.spawn();
    let first: HashSet<String> = insert_tx(&client, 100, "first").await.into_iter().collect();
    site.wait_checkpointed(100, Duration::from_secs(60)).await;
    assert!(sidecar.terminate().await.success());
    let old_epoch = site.stored().unwrap().epoch;
    let while_down: HashSet<String> = insert_tx(&client, 50, "down").await.into_iter().collect();

    site.corrupt_checkpoint();
    let log = refused_on_its_checkpoint(&site, "a corrupt checkpoint").await;
    assert!(log.contains("crc32"), "{log}");
    assert!(
        log.contains(&format!(
            "sitesync checkpoint reset --connector {}",
            site.connector.display()
        )),
        "{log}"
    );

    let out = site
        .ok(&["checkpoint", "reset", "--to-start", "--yes"])
        .await;
    assert!(out.contains("cannot rewind a slot"), "{out}");
    let mut sidecar = site.spawn();
    site.wait_checkpointed(50, Duration::from_secs(60)).await;
    assert!(sidecar.terminate().await.success());
    let after = site.stored().unwrap();
    assert!(after.epoch > old_epoch, "a reset starts a new epoch");

    let total = site.queue_len(&london).await as usize;
    let got = site.drain(&london, total, Duration::from_secs(30)).await;
    let ids: HashSet<String> = got.iter().map(|r| r.event().id.to_string()).collect();
    assert!(while_down.is_subset(&ids));
    assert_eq!(
        ids.len(),
        150,
        "the slot cannot rewind: the first 100 are not sent again"
    );
    let new_epoch: Vec<u64> = got
        .iter()
        .filter(|r| while_down.contains(&r.event().id.to_string()))
        .map(|r| r.event().seq)
        .collect();
    assert_eq!(
        new_epoch,
        (1..=50).collect::<Vec<u64>>(),
        "seq restarts with the epoch"
    );
    assert!(
        got.iter()
            .all(|r| first.contains(&r.event().id.to_string()) || r.event().epoch == after.epoch)
    );
}

/// Damage under sled, as a failing disk does it: sled's own log checks
/// drop the damaged entries as a torn tail, so the store opens holding no
/// record (every copy damaged) or an older one (only the newest). Either
/// way the checkpoint's witness says what was written last, and the
/// sidecar refuses to start, as `check` does, until an explicit reset.
#[tokio::test]
async fn a_checkpoint_damaged_under_sled_is_refused_not_taken_for_a_new_store() {
    // Each on a site of its own, as any opening of sled may write a
    // snapshot file, which changes how sled reads its log.
    for (round, damage) in [
        Damage::NewestCopy { snapshot: false },
        Damage::NewestCopy { snapshot: true },
        Damage::EveryCopy { snapshot: false },
        Damage::EveryCopy { snapshot: true },
        Damage::SledDeleted,
        Damage::SledReplacedByAnOlderCopy,
    ]
    .into_iter()
    .enumerate()
    {
        damaged_under_sled(round, damage).await;
    }
}

/// What happens to the store (`checkpoints/<name>/sled`) while the
/// sidecar is stopped.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// One byte flipped in the newest copy of the record; with a sled
    /// snapshot file written first.
    NewestCopy { snapshot: bool },
    /// In every copy.
    EveryCopy { snapshot: bool },
    /// The sled directory deleted.
    SledDeleted,
    /// The sled directory replaced by a copy taken one checkpoint earlier.
    SledReplacedByAnOlderCopy,
}

async fn damaged_under_sled(round: usize, damage: Damage) {
    let site = Site::start(Options::default()).await;
    let london = site.names.site("LONDON");
    let client = site.client().await;
    let mut written: HashSet<String> = HashSet::new();
    let mut sidecar = site.spawn();
    // Two checkpoints at least, so that sled's log holds two copies.
    written.extend(insert_tx(&client, 40, &format!("r{round}a")).await);
    site.wait_checkpointed(40, Duration::from_secs(60)).await;
    let sled = site.store_dir().join("sled");
    let older = site.store_dir().join("sled.older");
    if let Damage::SledReplacedByAnOlderCopy = damage {
        assert!(sidecar.terminate().await.success());
        copy_dir(&sled, &older);
        sidecar = site.spawn();
    }
    written.extend(insert_tx(&client, 40, &format!("r{round}b")).await);
    site.wait_checkpointed(80, Duration::from_secs(60)).await;
    assert!(sidecar.terminate().await.success());
    let snapshot = matches!(
        damage,
        Damage::EveryCopy { snapshot: true } | Damage::NewestCopy { snapshot: true }
    );
    // The live file, not sled (see above).
    let before = site.live().unwrap();
    if snapshot {
        site.stored().unwrap();
    }
    let has_snapshot = std::fs::read_dir(&sled).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("snap.")
    });
    match damage {
        Damage::NewestCopy { .. } | Damage::EveryCopy { .. } => {
            assert_eq!(has_snapshot, snapshot, "round {round}");
            let newest_only = matches!(damage, Damage::NewestCopy { .. });
            let damaged = site.damage_checkpoint_on_disk(newest_only);
            assert!(damaged >= 1, "no copy of the record found under sled");
        }
        Damage::SledDeleted => std::fs::remove_dir_all(&sled).unwrap(),
        Damage::SledReplacedByAnOlderCopy => {
            std::fs::remove_dir_all(&sled).unwrap();
            std::fs::rename(&older, &sled).unwrap();
        }
    }

    let log = refused_on_its_checkpoint(&site, &format!("a store that met {damage:?}")).await;
    assert!(log.contains("corrupt"), "{log}");
    assert!(!log.contains("new checkpoint store"), "{log}");
    if let Damage::SledReplacedByAnOlderCopy = damage {
        assert!(log.contains("replaced by an older copy"), "{log}");
        assert!(
            log.contains("next seq 41"),
            "the older copy's record: {log}"
        );
    }
    if !snapshot {
        // sled dropped the damaged entries as a torn tail and opened:
        // only the witness knows what was written last.
        assert!(log.contains("sled lost or rolled back its record"), "{log}");
        assert!(
            log.contains(&format!("next seq {}", before.next_seq)),
            "{log}"
        );
    }

    // The reset recovers; the slot never ran ahead of the checkpoint.
    let out = site
        .ok(&["checkpoint", "reset", "--to-start", "--yes"])
        .await;
    assert!(out.contains("reset"), "{out}");
    let mut sidecar = site.spawn();
    written.extend(insert_tx(&client, 10, &format!("r{round}c")).await);
    // A new epoch (a reset starts one), numbering the new events.
    wait_for(
        async || {
            site.live()
                .is_some_and(|ck| ck.epoch > before.epoch && ck.next_seq == 11)
        },
        Duration::from_secs(60),
    )
    .await
    .expect("the new events checkpointed in a new epoch");
    assert!(sidecar.terminate().await.success());
    // Every event written reached LONDON's queue, whatever the damage.
    let total = site.queue_len(&london).await as usize;
    let got = site.drain(&london, total, Duration::from_secs(30)).await;
    let ids: HashSet<String> = got.iter().map(|r| r.event().id.to_string()).collect();
    assert!(
        written.is_subset(&ids),
        "{} of {} reached LONDON",
        written.intersection(&ids).count(),
        written.len()
    );
}

/// Copies a directory of plain files (sled's), recursively.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn checkpoint_show_and_reset_to_latest_or_to_a_position() {
    let site = Site::start(Options::default()).await;
    let london = site.names.site("LONDON");
    let client = site.client().await;
    let mut sidecar = site.spawn();
    insert_tx(&client, 10, "a").await;
    site.wait_checkpointed(10, Duration::from_secs(60)).await;

    // While running: show reads the live file; reset is refused.
    let shown = site.ok(&["checkpoint", "show"]).await;
    assert!(shown.contains("held by     a running sitesync"), "{shown}");
    assert!(shown.contains("next seq    11"), "{shown}");
    assert!(shown.contains("confirmed_flush_lsn"), "{shown}");
    let refused = site
        .sitesync(&["checkpoint", "reset", "--to-latest", "--yes"])
        .await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("in use by another sitesync"));
    assert!(sidecar.terminate().await.success());

    // Stopped: rows written now are skipped by --to-latest.
    insert_tx(&client, 5, "skipped").await;
    let shown = site.ok(&["checkpoint", "show"]).await;
    assert!(shown.contains("position    postgres:"), "{shown}");
    let before = site.stored().unwrap();
    let Some(Position {
        lsn: before_lsn, ..
    }) = before.resume.clone()
    else {
        panic!()
    };

    // Behind the slot: refused with how far back it can go.
    let back = format!("postgres:{}", format_lsn(before_lsn - 1));
    let out = site
        .sitesync(&["checkpoint", "reset", "--to-position", &back, "--yes"])
        .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot go back further"));
    // Without --yes and without a terminal: refused, nothing changed.
    let out = site.sitesync(&["checkpoint", "reset", "--to-latest"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert_eq!(site.stored().unwrap(), before);

    site.ok(&["checkpoint", "reset", "--to-latest", "--yes"])
        .await;
    let after = site.stored().unwrap();
    assert!(after.resume > before.resume);
    assert_eq!(after.next_seq, 1);
    let slot = site.confirmed_flush(&client).await;
    let Some(Position { lsn, .. }) = after.resume else {
        panic!()
    };
    assert_eq!(
        slot, lsn,
        "--to-latest advanced the slot to the new position"
    );

    let mut sidecar = site.spawn();
    let later: Vec<String> = insert_tx(&client, 3, "later").await;
    site.wait_queue(&london, 13, Duration::from_secs(60)).await;
    assert!(sidecar.terminate().await.success());
    let got = site.drain(&london, 13, Duration::from_secs(30)).await;
    let tags: Vec<String> = got.iter().map(|r| r.event().kind.clone()).collect();
    assert!(!tags.iter().any(|t| t == "test.skipped"), "{tags:?}");
    assert_eq!(
        got[10..]
            .iter()
            .map(|r| r.event().id.to_string())
            .collect::<Vec<_>>(),
        later
    );
    assert_eq!(site.queue_len(&london).await, 0);
}

#[tokio::test]
async fn init_and_declare_are_idempotent_and_check_says_what_to_fix() {
    let site = Site::start(Options::default()).await;
    let again = site.ok(&["init"]).await;
    assert_eq!(again.matches("already there").count(), 3, "{again}");
    assert!(
        again.contains("function public.sitesync_uuid7: ready"),
        "{again}"
    );
    // The outbox's ids are UUIDs of version 7: the time in their first 48
    // bits, so that they grow in the order the rows are written.
    let db = site.client().await;
    let mut last = 0i64;
    for _ in 0..5 {
        let row = db
            .query_one(
                "INSERT INTO outbox (type, data) VALUES ('t.upsert', '{}') \
                 RETURNING id::text, floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                &[],
            )
            .await
            .unwrap();
        let (id, now_ms): (String, i64) = (row.get(0), row.get(1));
        let hex: String = id.chars().filter(|c| *c != '-').collect();
        assert_eq!(&hex[12..13], "7", "version 7: {id}");
        assert!(
            matches!(&hex[16..17], "8" | "9" | "a" | "b"),
            "the RFC 9562 variant: {id}"
        );
        let ms = i64::from_str_radix(&hex[..12], 16).unwrap();
        assert!(
            (0..1000).contains(&(now_ms - ms)) && ms >= last,
            "time {ms} in {id}, written at {now_ms}, after {last}"
        );
        last = ms;
    }
    db.batch_execute("DELETE FROM outbox").await.unwrap();
    let check = site.ok(&["check"]).await;
    assert!(!check.contains("[FAIL]"), "{check}");
    for name in [
        "wal_level",
        "REPLICATION privilege",
        "free replication slots",
        "publication",
        "replication slot",
        "topology",
        "broker",
    ] {
        assert!(
            check.contains(&format!("[ok  ] {name}")),
            "{name} not checked:\n{check}"
        );
    }

    let client = site.client().await;
    client
        .batch_execute("DROP PUBLICATION sitesync_paris")
        .await
        .unwrap();
    let out = site.sitesync(&["check"]).await;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[FAIL] publication: sitesync_paris does not exist"),
        "{text}"
    );
    assert!(text.contains("fix: run `sitesync init`"), "{text}");
    assert!(
        site.ok(&["init"])
            .await
            .contains("publication sitesync_paris: created")
    );

    // A site queue that exists with other arguments: the error names it and the argument.
    let london = site.names.site("LONDON");
    let conn = crate::support::rabbit::connect(&site.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(
        london.as_str().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        london.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;
    for command in [&["topology", "declare"][..], &["check"][..]] {
        let out = site.sitesync(command).await;
        assert_eq!(out.status.code(), Some(1), "{command:?}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!(
                "queue `{london}` already exists with different settings"
            )),
            "{text}"
        );
        assert!(
            text.contains("inequivalent arg 'x-"),
            "the argument is named: {text}"
        );
    }
}

#[tokio::test]
async fn a_slot_moved_behind_the_sidecars_back_stops_it_until_an_explicit_reset() {
    let site = Site::start(Options::default()).await;
    let client = site.client().await;
    let mut sidecar = site.spawn();
    insert_tx(&client, 5, "a").await;
    site.wait_checkpointed(5, Duration::from_secs(60)).await;
    assert!(sidecar.terminate().await.success());

    // Someone advances the slot while the sidecar is down: the rows in
    // between would be skipped by the server without a word.
    insert_tx(&client, 5, "skipped").await;
    client
        .batch_execute("SELECT pg_replication_slot_advance('sitesync_paris', pg_current_wal_lsn())")
        .await
        .unwrap();
    let mut refused = site.spawn();
    let status = refused.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = refused.log_text();
    assert!(
        log.contains("replication slot `sitesync_paris` is at"),
        "{log}"
    );
    assert!(
        log.contains("sitesync checkpoint reset --to-start"),
        "{log}"
    );

    site.ok(&["checkpoint", "reset", "--to-start", "--yes"])
        .await;
    let mut sidecar = site.spawn();
    insert_tx(&client, 2, "after").await;
    site.wait_checkpointed(2, Duration::from_secs(60)).await;
    assert!(sidecar.terminate().await.success());
}

/// `check` covers the sink: its tables, commit timestamps, and each route's
/// table, columns and unique key, naming the route and the fix.
#[tokio::test]
async fn check_verifies_every_route_and_names_what_to_fix() {
    use crate::support::mesh::{Mesh, MeshOptions, ROUTES};
    let routes = format!(
        "{ROUTES}\n[[sink.routes]]\ntype = \"ghost.upsert\"\ntable = \"public.ghost\"\nkey = [\"id\"]\n\n\
         [[sink.routes]]\ntype = \"log.upsert\"\ntable = \"public.item_log\"\nkey = [\"id\"]\n\n\
         [[sink.routes]]\ntype = \"item.rename\"\ntable = \"public.item\"\nkey = [\"id\"]\nrename = {{ label = \"title\" }}\n"
    );
    let mesh = Mesh::start(MeshOptions {
        routes,
        sites: vec!["LONDON"],
        ..MeshOptions::default()
    })
    .await;
    let out = mesh.sitesync("LONDON", &["check"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line for {needle}:\n{text}"))
            .to_string()
    };
    assert!(line("sink tables").starts_with("[ok"), "{text}");
    assert!(line("track_commit_timestamp").starts_with("[ok"), "{text}");
    assert!(line("route item.upsert").starts_with("[ok"), "{text}");
    let ghost = line("route ghost.upsert");
    assert!(
        ghost.starts_with("[FAIL]") && ghost.contains("public.ghost does not exist"),
        "{ghost}"
    );
    let log = line("route log.upsert");
    assert!(
        log.starts_with("[FAIL]") && log.contains("no unique index on exactly (id)"),
        "{log}"
    );
    let rename = line("route item.rename");
    assert!(
        rename.starts_with("[FAIL]") && rename.contains("no column(s) title"),
        "{rename}"
    );
}
