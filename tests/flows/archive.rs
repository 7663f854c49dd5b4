//! The archive: PARIS's sidecar consumes the archive queue into
//! `sitesync_archive`, each event once, across a kill -9; `check` fails
//! when no connector archives; a bound reaches the queue only when the
//! topology sets one.

use crate::support::mesh::{Mesh, MeshOptions, spawn_random_writer};
use crate::support::rabbit::{self, drain};
use crate::support::sidecar::{Names, binary};
use crate::support::{TestDir, wait_for, wait_for_value};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::AMQPValue;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The rows of PARIS's archive: `(event_id, origin, epoch, seq)`.
async fn archived(mesh: &Mesh) -> Vec<(Uuid, String, i64, i64)> {
    mesh.client("PARIS")
        .await
        .query(
            "SELECT event_id, origin, epoch, seq FROM public.sitesync_archive",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

async fn archive_count(mesh: &Mesh) -> i64 {
    mesh.client("PARIS")
        .await
        .query_one("SELECT count(*) FROM public.sitesync_archive", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn three_sites_writing_are_archived_exactly_once_across_a_kill_9_of_the_archiver() {
    let mesh = Mesh::start(MeshOptions {
        archive: true,
        ..MeshOptions::default()
    })
    .await;
    // `init` created the table (PARIS only: the others do not archive).
    let tables = |site: &'static str| {
        let mesh = &mesh;
        async move {
            mesh.client(site)
                .await
                .query_one(
                    "SELECT to_regclass('public.sitesync_archive') IS NOT NULL",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    assert!(tables("PARIS").await);
    assert!(!tables("LONDON").await);

    // A message on the archive queue that is not an event goes to the
    // dead-letter queue with the reason; the rest keeps flowing.
    let conn = rabbit::connect(&mesh.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        mesh.names.archive.as_str().into(),
        BasicPublishOptions::default(),
        b"not json at all",
        BasicProperties::default().with_message_id("garbage-1".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let mut sidecars = mesh.spawn_all();
    let until = Instant::now() + Duration::from_secs(12);
    let mut writers = Vec::new();
    for (i, site) in mesh.sites().into_iter().enumerate() {
        writers.push(spawn_random_writer(
            mesh.client(site).await,
            site,
            7 + i as u64,
            200,
            until,
            Duration::from_millis(3),
        ));
    }
    // Mid-stream: PARIS's sidecar (its archive, sink and source) dies
    // without a word, holding unacked archive messages, and comes back.
    wait_for(
        async || archive_count(&mesh).await >= 200,
        Duration::from_secs(60),
    )
    .await
    .expect("the archive fills while the sites write");
    let before = archive_count(&mesh).await;
    let killed_at = Instant::now();
    sidecars.get_mut("PARIS").unwrap().kill9();
    sidecars.insert("PARIS", mesh.spawn("PARIS"));
    let mut writes = Vec::new();
    for w in writers {
        writes.extend(w.await.unwrap());
    }
    assert!(
        killed_at < until,
        "the writers had stopped before the kill: it must come mid-stream"
    );
    let total = writes.len() as i64;
    eprintln!(
        "archive: {total} events written at three sites, PARIS killed with {before} archived"
    );
    assert!(
        before < total,
        "the kill came after everything was archived"
    );

    let got = wait_for_value(
        async || {
            let n = archive_count(&mesh).await;
            (n >= total).then_some(n)
        },
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("the archive holds fewer than {total} events: {e}"));
    assert_eq!(got, total, "no event archived twice, none foreign");
    wait_for(
        async || mesh.queue_len(&mesh.names.archive).await == 0,
        Duration::from_secs(30),
    )
    .await
    .expect("the archive queue drains");

    // Every event written, once; per origin, seq 1..=n in one epoch.
    let rows = archived(&mesh).await;
    let ids: BTreeSet<Uuid> = rows.iter().map(|r| r.0).collect();
    let written: BTreeSet<Uuid> = writes.iter().map(|w| w.event).collect();
    assert_eq!(
        ids, written,
        "the archive's ids are exactly the events written"
    );
    let mut per_origin: BTreeMap<&str, Vec<(i64, i64)>> = BTreeMap::new();
    for (_, origin, epoch, seq) in &rows {
        per_origin.entry(origin).or_default().push((*epoch, *seq));
    }
    for site in mesh.sites() {
        let want = writes.iter().filter(|w| w.site == site).count();
        let mut numbers = per_origin.remove(site).unwrap_or_default();
        numbers.sort_unstable();
        assert_eq!(numbers.len(), want, "{site}: archived events");
        let epochs: BTreeSet<i64> = numbers.iter().map(|n| n.0).collect();
        assert_eq!(epochs.len(), 1, "{site}: one epoch {epochs:?}");
        assert!(
            numbers.iter().enumerate().all(|(i, n)| n.1 == i as i64 + 1),
            "{site}: (epoch, seq) is not 1..={want} without a hole or a repeat"
        );
    }
    assert!(per_origin.is_empty(), "unknown origins {per_origin:?}");

    // The garbage message waits in the dead-letter queue, with its reason.
    let dead = drain(&mesh.amqp_url, &mesh.names.dlq, 1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1);
    let headers = dead[0].properties.headers().clone().unwrap_or_default();
    let header = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(header("x-sitesync-stage"), "archive");
    assert!(
        header("x-sitesync-reason").starts_with("not an event"),
        "{}",
        header("x-sitesync-reason")
    );
    assert_eq!(dead[0].data, b"not json at all");

    // The sites converged meanwhile: the archive took nothing from them.
    mesh.assert_synced(&writes, "archive beside the sinks")
        .await;

    // `status` at PARIS shows the archive and its queue.
    let status = mesh.ok("PARIS", &["status"]).await;
    assert!(
        status.contains(&format!(
            "archive: {total} event(s) in public.sitesync_archive; 0 message(s) waiting in {}",
            mesh.names.archive
        )),
        "{status}"
    );
    for s in sidecars.values_mut() {
        assert!(s.terminate().await.success());
    }
}

fn check_text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The line of `check`'s output about `name`.
fn line<'a>(text: &'a str, name: &str) -> &'a str {
    let at = text
        .find(&format!("] {name}:"))
        .unwrap_or_else(|| panic!("no {name} line:\n{text}"));
    let start = text[..at].rfind('[').unwrap();
    let end = text[at..].find("\n[").map_or(text.len(), |e| at + e);
    &text[start..end]
}

#[tokio::test]
async fn check_fails_while_no_connector_archives_the_archive_queue() {
    let mesh = Mesh::start(MeshOptions {
        sites: vec!["PARIS", "LONDON"],
        ..MeshOptions::default()
    })
    .await;
    let queue = &mesh.names.archive;
    // The topology names PARIS; PARIS's connector has no [archive].
    let out = mesh.sitesync("PARIS", &["check"]).await;
    let text = check_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let archive = line(&text, "archive");
    assert!(archive.starts_with("[FAIL]"), "{archive}");
    assert!(
        archive.contains(&format!("nothing consumes {queue}"))
            && archive.contains("add an [archive] section to"),
        "{archive}"
    );
    // LONDON's check trusts the topology: PARIS archives.
    let out = mesh.sitesync("LONDON", &["check"]).await;
    let text = check_text(&out);
    assert!(
        line(&text, "archive").starts_with("[ok  ]")
            && line(&text, "archive").contains("archived by PARIS's sidecar"),
        "{text}"
    );
    // Nobody consumes it now: a warning.
    assert!(
        line(&text, "archive queue").starts_with("[WARN]")
            && line(&text, "archive queue").contains("has no consumer"),
        "{text}"
    );

    // A topology that names no archive site fails every site's check,
    // naming the queue and the fix.
    let topology = mesh.dir.path().join("topology.toml");
    let without = std::fs::read_to_string(&topology)
        .unwrap()
        .replace("archive_site = \"PARIS\"\n", "");
    std::fs::write(&topology, without).unwrap();
    let out = mesh.sitesync("LONDON", &["check"]).await;
    let text = check_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let archive = line(&text, "archive");
    assert!(
        archive.starts_with("[FAIL]")
            && archive.contains(&format!("no site archives the archive queue {queue}"))
            && archive.contains("archive_site = \"PARIS\""),
        "{archive}"
    );

    // Named again, and PARIS given [archive] and init: PARIS passes.
    std::fs::write(
        &topology,
        std::fs::read_to_string(&topology).unwrap() + "archive_site = \"PARIS\"\n",
    )
    .unwrap();
    let paris = mesh.connector("PARIS");
    std::fs::write(
        paris,
        std::fs::read_to_string(paris).unwrap() + "\n[archive]\n",
    )
    .unwrap();
    let out = mesh.sitesync("PARIS", &["check"]).await;
    let text = check_text(&out);
    assert!(line(&text, "archive table").starts_with("[FAIL]"), "{text}");
    assert!(
        mesh.ok("PARIS", &["init"])
            .await
            .contains("archive table public.sitesync_archive: ready")
    );
    let out = mesh.sitesync("PARIS", &["check"]).await;
    let text = check_text(&out);
    assert!(line(&text, "archive").starts_with("[ok  ]"), "{text}");
    assert!(line(&text, "archive table").starts_with("[ok  ]"), "{text}");
}

/// `sitesync topology declare --topology FILE --broker URL`.
fn declare(topology: &std::path::Path) -> std::process::Output {
    Command::new(binary())
        .args(["topology", "declare", "--topology"])
        .arg(topology)
        .args(["--broker", &rabbit::shared_amqp_url()])
        .output()
        .expect("run sitesync")
}

/// A queue's arguments, read through the management API.
fn arguments(queue: &str) -> serde_json::Map<String, serde_json::Value> {
    let out = Command::new("curl")
        .args([
            "-sf",
            "-u",
            "guest:guest",
            &format!("http://127.0.0.1:15672/api/queues/%2F/{queue}"),
        ])
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "the management API on {queue}: {out:?}"
    );
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    q["arguments"].as_object().cloned().unwrap_or_default()
}

fn topology_text(names: &Names, extra: &str) -> String {
    names.topology("PARIS", extra)
}

#[tokio::test]
async fn the_archive_queue_is_bounded_only_when_the_topology_says_so() {
    if std::env::var_os("SITESYNC_TEST_AMQP_URL").is_some() {
        eprintln!("skipped: reads queue arguments through the shared broker's management API");
        return;
    }
    let dir = TestDir::new("ssarchive").unwrap();
    let topology = dir.path().join("topology.toml");
    let (bounded, rejecting, plain) = (Names::new(), Names::new(), Names::new());
    let cleanup = [bounded.clone(), rejecting.clone(), plain.clone()];
    let _cleanup = scopeguard(move || {
        for n in &cleanup {
            n.delete_blocking(&rabbit::shared_amqp_url());
        }
    });

    // A bound without its policy is refused, naming the key.
    std::fs::write(
        &topology,
        topology_text(&bounded, "archive_max_length = 5\n"),
    )
    .unwrap();
    let out = declare(&topology);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key `archive_overflow`: missing") && err.contains("drop-head"),
        "{err}"
    );

    // Five messages, then drop-head: the oldest go to the dead-letter
    // queue, the sites' queues keep everything.
    std::fs::write(
        &topology,
        topology_text(
            &bounded,
            "archive_max_length = 5\narchive_overflow = \"drop-head\"\n",
        ),
    )
    .unwrap();
    let out = declare(&topology);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("at most 5 messages, then drop-head"),
        "{text}"
    );
    let args = arguments(&bounded.archive);
    assert_eq!(args["x-max-length"], 5, "{args:?}");
    assert_eq!(args["x-overflow"], "drop-head", "{args:?}");
    assert!(!arguments(&bounded.site("LONDON")).contains_key("x-max-length"));
    let conn = rabbit::connect(&rabbit::shared_amqp_url()).await;
    let ch = conn.create_channel().await.unwrap();
    for i in 0..8 {
        ch.basic_publish(
            bounded.exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            format!("message {i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let url = rabbit::shared_amqp_url();
    wait_for(
        async || rabbit::queue_len(&url, &bounded.dlq).await == Some(3),
        Duration::from_secs(10),
    )
    .await
    .expect("the three oldest archive messages are dead-lettered");
    assert_eq!(rabbit::queue_len(&url, &bounded.archive).await, Some(5));
    assert_eq!(
        rabbit::queue_len(&url, &bounded.site("LONDON")).await,
        Some(8)
    );

    // Another bound on the existing queue: the broker refuses, and the
    // error says what to do.
    std::fs::write(
        &topology,
        topology_text(
            &bounded,
            "archive_max_length = 10\narchive_overflow = \"drop-head\"\n",
        ),
    )
    .unwrap();
    let out = declare(&topology);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "queue `{}` already exists with different settings",
            bounded.archive
        )) && err.contains("x-max-length")
            && err.contains("set a RabbitMQ policy instead"),
        "{err}"
    );

    // Quorum queues take reject-publish and a byte bound too.
    std::fs::write(
        &topology,
        topology_text(
            &rejecting,
            "archive_max_bytes = 1000000\narchive_overflow = \"reject-publish\"\n",
        ),
    )
    .unwrap();
    let out = declare(&topology);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let args = arguments(&rejecting.archive);
    assert_eq!(args["x-max-length-bytes"], 1_000_000, "{args:?}");
    assert_eq!(args["x-overflow"], "reject-publish", "{args:?}");

    // Without the keys, no bound at all.
    std::fs::write(&topology, topology_text(&plain, "")).unwrap();
    let out = declare(&topology);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let args = arguments(&plain.archive);
    for key in ["x-max-length", "x-max-length-bytes", "x-overflow"] {
        assert!(!args.contains_key(key), "{key} in {args:?}");
    }
    assert_eq!(args["x-queue-type"], "quorum");
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// An event body as a site publishes it.
fn event_body(id: Uuid, origin: &str, seq: u64) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","timestamp":"2026-03-04T05:06:07.123456Z","origin":"{origin}","type":"item.upsert","entity_key":"{seq}","data":{{"id":{seq},"note":"l'été"}},"epoch":42,"seq":{seq}}}"#
    )
    .into_bytes()
}

#[tokio::test]
async fn a_mariadb_site_archives_each_event_once_and_dead_letters_what_is_not_one() {
    let mesh = Mesh::start(MeshOptions {
        sites: vec!["PARIS"],
        ..MeshOptions::default()
    })
    .await;
    // LONDON on MariaDB is the archive site (its sink off: only PARIS
    // writes here).
    let topology = mesh.dir.path().join("topology.toml");
    std::fs::write(
        &topology,
        std::fs::read_to_string(&topology)
            .unwrap()
            .replace("archive_site = \"PARIS\"", "archive_site = \"LONDON\""),
    )
    .unwrap();
    let maria = crate::support::mariadb::MariaDb::start().await;
    maria.create_database("london").await;
    let connector = mesh.dir.path().join("london.toml");
    std::fs::write(
        &connector,
        format!(
            "site = \"LONDON\"\n\n[database]\nkind = \"mariadb\"\nurl = \"{}\"\n\n[broker]\nurls = [\"{}\"]\ntopology = \"{}\"\n\n[checkpoint]\ndir = \"{}\"\n\n[retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\n[sink]\nenabled = false\n\n[archive]\nbatch_size = 100\nbatch_timeout_ms = 50\n",
            maria.url("london"),
            mesh.amqp_url,
            topology.display(),
            mesh.dir.path().join("checkpoints").join("london").display(),
        ),
    )
    .unwrap();
    let init = crate::support::sidecar::sitesync_with(&connector, &["init"]);
    let text = String::from_utf8_lossy(&init.stdout);
    assert!(
        init.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert!(
        text.contains("archive table sitesync_archive: ready"),
        "{text}"
    );
    let mut london = crate::support::sidecar::Sidecar::spawn(&connector, mesh.dir.path());
    let mut paris = mesh.spawn("PARIS");

    // PARIS writes through its sidecar; MADRID's events (no sidecar here)
    // come by hand to the archive queue, each twice, as a crashed site
    // re-sends them, plus a message that is not an event.
    let client = mesh.client("PARIS").await;
    let mut written = BTreeSet::new();
    for id in 0..300 {
        written.insert(
            crate::support::mesh::upsert(&client, "PARIS", id, id)
                .await
                .0,
        );
    }
    let conn = rabbit::connect(&mesh.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    let madrid: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for round in 0..2 {
        for (i, id) in madrid.iter().enumerate() {
            ch.basic_publish(
                "".into(),
                mesh.names.archive.as_str().into(),
                BasicPublishOptions::default(),
                &event_body(*id, "MADRID", i as u64 + 1),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        if round == 0 {
            ch.basic_publish(
                "".into(),
                mesh.names.archive.as_str().into(),
                BasicPublishOptions::default(),
                b"{\"id\": 1}",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    }
    written.extend(madrid.iter().copied());

    let mut db = maria.conn(Some("london")).await;
    use mysql_async::prelude::Queryable;
    let total = written.len();
    wait_for(
        async || {
            db.query_first::<i64, _>("SELECT count(*) FROM sitesync_archive")
                .await
                .unwrap()
                == Some(total as i64)
        },
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("LONDON's archive: {e}\n{}", london.log_tail()));
    wait_for(
        async || mesh.queue_len(&mesh.names.archive).await == 0,
        Duration::from_secs(30),
    )
    .await
    .expect("the archive queue drains");
    let rows: Vec<(String, String, i64, i64, String)> = db
        .query(
            "SELECT event_id, origin, epoch, seq, data FROM sitesync_archive ORDER BY origin, seq",
        )
        .await
        .unwrap();
    let ids: BTreeSet<Uuid> = rows.iter().map(|r| r.0.parse().unwrap()).collect();
    assert_eq!(ids, written, "each event once, the re-sent ones too");
    let madrid_rows: Vec<&(String, String, i64, i64, String)> =
        rows.iter().filter(|r| r.1 == "MADRID").collect();
    assert_eq!(madrid_rows.len(), 20);
    assert!(
        madrid_rows
            .iter()
            .enumerate()
            .all(|(i, r)| r.2 == 42 && r.3 == i as i64 + 1)
    );
    assert_eq!(
        madrid_rows[0].4, r#"{"id":1,"note":"l'été"}"#,
        "the payload as written"
    );
    let paris_seqs: Vec<i64> = rows
        .iter()
        .filter(|r| r.1 == "PARIS")
        .map(|r| r.3)
        .collect();
    assert_eq!(paris_seqs, (1..=300).collect::<Vec<i64>>());

    let dead = drain(&mesh.amqp_url, &mesh.names.dlq, 1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data, b"{\"id\": 1}");

    let status = crate::support::sidecar::sitesync_with(&connector, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!("archive: {total} event(s) in sitesync_archive")),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(paris.terminate().await.success());
    assert!(london.terminate().await.success(), "{}", london.log_tail());
}

/// A digest of a site's `item` rows (id, n, rev), to compare sites.
async fn checksum(mesh: &Mesh, site: &str) -> (i64, String) {
    let row = mesh
        .client(site)
        .await
        .query_one(
            "SELECT count(*), coalesce(md5(string_agg(id || ':' || n || ':' || rev, ',' ORDER BY id)), '') FROM item",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn a_site_rebuilt_from_an_empty_database_by_replay_converges_with_the_others() {
    let mesh = Mesh::start(MeshOptions {
        archive: true,
        ..MeshOptions::default()
    })
    .await;
    let mut sidecars = mesh.spawn_all();
    // PARIS and MADRID write, on the same keys (conflicts, deletes).
    let until = Instant::now() + Duration::from_secs(5);
    let mut writers = Vec::new();
    for (i, site) in ["PARIS", "MADRID"].into_iter().enumerate() {
        writers.push(spawn_random_writer(
            mesh.client(site).await,
            site,
            31 + i as u64,
            60,
            until,
            Duration::from_millis(4),
        ));
    }
    let mut writes = Vec::new();
    for w in writers {
        writes.extend(w.await.unwrap());
    }
    mesh.assert_synced(&writes, "before the rebuild").await;
    let total = writes.len() as i64;
    wait_for(
        async || archive_count(&mesh).await == total,
        Duration::from_secs(60),
    )
    .await
    .expect("PARIS archived every event");
    let before = checksum(&mesh, "PARIS").await;
    assert!(before.0 > 0);

    // LONDON loses its database: a new one, re-initialised, a new store.
    for s in sidecars.values_mut() {
        assert!(s.terminate().await.success());
    }
    let admin = mesh.pg.client("postgres").await;
    for sql in [
        "SELECT pg_drop_replication_slot('sitesync_london')",
        "DROP DATABASE london WITH (FORCE)",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    mesh.pg.create_database("london").await;
    mesh.client("LONDON")
        .await
        .batch_execute(crate::support::mesh::BUSINESS)
        .await
        .unwrap();
    std::fs::remove_dir_all(mesh.dir.path().join("checkpoints").join("london")).unwrap();
    mesh.ok("LONDON", &["init"]).await;
    assert_eq!(checksum(&mesh, "LONDON").await.0, 0);
    let mut london = mesh.spawn("LONDON");

    // What would go, per origin and type.
    let dry = mesh
        .ok("PARIS", &["replay", "--to-site", "LONDON", "--dry-run"])
        .await;
    assert!(
        dry.contains(&format!(
            "{total} archived event(s) in public.sitesync_archive to send to {}",
            mesh.names.site("LONDON")
        )),
        "{dry}"
    );
    for site in ["PARIS", "MADRID"] {
        for (kind, upsert) in [("item.upsert", true), ("item.delete", false)] {
            let n = writes
                .iter()
                .filter(|w| w.site == site && w.rev.is_some() == upsert)
                .count();
            let line = format!("{site:<10} {kind:<30} {n}");
            assert!(n == 0 || dry.contains(&line), "no `{line}` in:\n{dry}");
        }
    }
    assert_eq!(
        mesh.foreign_inbox("LONDON").await,
        0,
        "a dry run sends nothing"
    );

    // The replay, to LONDON only: the other sites' queues stay empty.
    let out = mesh
        .ok(
            "PARIS",
            &["replay", "--to-site", "LONDON", "--yes", "--rate", "100000"],
        )
        .await;
    assert!(out.contains(&format!("replayed {total} event(s)")), "{out}");
    eprintln!("{}", out.lines().last().unwrap_or_default());
    mesh.wait_inbox("LONDON", total, Duration::from_secs(120))
        .await;
    for site in ["PARIS", "MADRID"] {
        assert_eq!(
            mesh.queue_len(&mesh.names.site(site)).await,
            0,
            "{site}'s queue"
        );
    }
    wait_for(
        async || checksum(&mesh, "LONDON").await == before,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("LONDON did not converge: {e}"));
    assert_eq!(checksum(&mesh, "MADRID").await, before);

    // Again, one origin: harmless (every event a duplicate there).
    let out = mesh
        .ok(
            "PARIS",
            &[
                "replay",
                "--to-site",
                "LONDON",
                "--origin",
                "MADRID",
                "--yes",
            ],
        )
        .await;
    let madrid = writes.iter().filter(|w| w.site == "MADRID").count();
    assert!(
        out.contains(&format!("replayed {madrid} event(s)")),
        "{out}"
    );
    wait_for(
        async || mesh.queue_len(&mesh.names.site("LONDON")).await == 0,
        Duration::from_secs(60),
    )
    .await
    .expect("LONDON takes the second replay");
    assert_eq!(mesh.foreign_inbox("LONDON").await, total);
    assert_eq!(checksum(&mesh, "LONDON").await, before);
    assert!(london.terminate().await.success());
}
