//! Mixed engines: PARIS and MADRID on PostgreSQL (the mesh's private
//! cluster), LONDON on a private MariaDB server, each with its sidecar as
//! a process. LONDON's source reads its binlog; its sink applies the other
//! sites' events with `INSERT … ON DUPLICATE KEY UPDATE`.

use crate::support::mariadb::MariaDb;
use crate::support::mesh::{Mesh, MeshOptions, delete, upsert};
use crate::support::rabbit::drain_until;
use crate::support::sidecar::{Sidecar, init_with, sitesync_with};
use crate::support::wait_for;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, TxOpts};
use sitesync::checkpoint::read_live;
use sitesync::engine::mariadb::position::Position;
use sitesync::event::Event;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// LONDON's business table, and a trigger that logs every write with
/// whether the sink made it (`@sitesync_applying`).
const BUSINESS: &[&str] = &[
    "CREATE TABLE item (id int PRIMARY KEY, n int NOT NULL, rev char(36) NOT NULL, site varchar(32) NOT NULL, note varchar(200) NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE item_log (seq bigint AUTO_INCREMENT PRIMARY KEY, id int NOT NULL, op varchar(8) NOT NULL, by_sink bool NOT NULL) ENGINE=InnoDB",
    "CREATE TRIGGER item_ins AFTER INSERT ON item FOR EACH ROW INSERT INTO item_log (id, op, by_sink) VALUES (NEW.id, 'INSERT', IFNULL(@sitesync_applying = 1, 0))",
    "CREATE TRIGGER item_upd AFTER UPDATE ON item FOR EACH ROW INSERT INTO item_log (id, op, by_sink) VALUES (NEW.id, 'UPDATE', IFNULL(@sitesync_applying = 1, 0))",
    "CREATE TRIGGER item_del AFTER DELETE ON item FOR EACH ROW INSERT INTO item_log (id, op, by_sink) VALUES (OLD.id, 'DELETE', IFNULL(@sitesync_applying = 1, 0))",
];

/// LONDON on MariaDB, next to the mesh's PostgreSQL sites.
struct MariaSite {
    server: MariaDb,
    connector: PathBuf,
}

impl MariaSite {
    /// Starts MariaDB, creates the `london` database with its business
    /// table, writes LONDON's connector next to the mesh's and runs
    /// `sitesync init` for it.
    /// `broker`, `checkpoint`: extra lines for those tables.
    async fn start(mesh: &Mesh, broker: &str, checkpoint: &str) -> MariaSite {
        let server = MariaDb::start().await;
        server.create_database("london").await;
        let mut c = server.conn(Some("london")).await;
        for sql in BUSINESS {
            c.query_drop(*sql).await.unwrap();
        }
        let connector = mesh.dir.path().join("london.toml");
        std::fs::write(
            &connector,
            format!(
                "site = \"LONDON\"\n\n[database]\nkind = \"mariadb\"\nurl = \"{}\"\n\n[broker]\nmanagement_url = \"http://127.0.0.1:15672\"\nurls = [\"{}\"]\ntopology = \"{}\"\ntopology_check_interval_ms = 500\n{broker}\n[checkpoint]\ndir = \"{}\"\n{checkpoint}\n[retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\n[sink]\nbatch_timeout_ms = 20\nmax_attempts = 2\n\n[[sink.routes]]\ntype = \"item.upsert\"\ntable = \"item\"\nkey = [\"id\"]\noperation = \"upsert\"\n\n[[sink.routes]]\ntype = \"item.delete\"\ntable = \"item\"\nkey = [\"id\"]\noperation = \"delete\"\n",
                server.url("london"),
                mesh.amqp_url,
                mesh.dir.path().join("topology.toml").display(),
                mesh.dir.path().join("checkpoints").join("london").display(),
            ),
        )
        .unwrap();
        let site = MariaSite { server, connector };
        init_with(&site.connector);
        site
    }

    fn spawn(&self, mesh: &Mesh) -> Sidecar {
        Sidecar::spawn(&self.connector, mesh.dir.path())
    }

    async fn conn(&self) -> Conn {
        self.server.conn(Some("london")).await
    }
}

/// An application write at LONDON: the row and its outbox row in one
/// transaction (`delete`: the row goes, with an `item.delete` event).
async fn london_write(c: &mut Conn, id: i32, n: i32, delete: bool) -> Uuid {
    let event = Uuid::new_v4();
    let rev = Uuid::new_v4();
    let mut tx = c.start_transaction(TxOpts::default()).await.unwrap();
    if delete {
        tx.exec_drop("DELETE FROM item WHERE id = ?", (id,))
            .await
            .unwrap();
        tx.exec_drop(
            "INSERT INTO outbox (id, type, entity_key, data) VALUES (?, 'item.delete', ?, JSON_OBJECT('id', ?))",
            (event.to_string(), id.to_string(), id),
        )
        .await
        .unwrap();
    } else {
        tx.exec_drop(
            "INSERT INTO item (id, n, rev, site) VALUES (?, ?, ?, 'LONDON') ON DUPLICATE KEY UPDATE n = VALUES(n), rev = VALUES(rev), site = 'LONDON'",
            (id, n, rev.to_string()),
        )
        .await
        .unwrap();
        tx.exec_drop(
            "INSERT INTO outbox (id, type, entity_key, data) VALUES (?, 'item.upsert', ?, JSON_OBJECT('id', ?, 'n', ?, 'rev', ?, 'site', 'LONDON'))",
            (event.to_string(), id.to_string(), id, n, rev.to_string()),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    event
}

/// `(id, n, rev)` of every item at LONDON, by id.
async fn london_items(c: &mut Conn) -> Vec<(i32, i32, String)> {
    c.query("SELECT id, n, rev FROM item ORDER BY id")
        .await
        .unwrap()
}

async fn london_count(c: &mut Conn, sql: &str) -> i64 {
    c.query_first::<i64, _>(sql).await.unwrap().unwrap_or(0)
}

/// PARIS and MADRID on PostgreSQL, LONDON on MariaDB, every sidecar
/// running (fields drop in order: the sidecars before their servers).
struct Running {
    london_sidecar: Sidecar,
    _pg: BTreeMap<&'static str, Sidecar>,
    london: MariaSite,
    mesh: Mesh,
}

async fn three_sites_running() -> Running {
    three_sites_running_with("", "").await
}

/// With extra lines in LONDON's `[broker]` and `[checkpoint]`.
async fn three_sites_running_with(broker: &str, checkpoint: &str) -> Running {
    let mesh = Mesh::start(MeshOptions {
        sites: vec!["PARIS", "MADRID"],
        ..MeshOptions::default()
    })
    .await;
    let london = MariaSite::start(&mesh, broker, checkpoint).await;
    Running {
        _pg: mesh.spawn_all(),
        london_sidecar: london.spawn(&mesh),
        london,
        mesh,
    }
}

/// Every site's `(id, n, rev)`, PostgreSQL's `rev` as text.
async fn pg_items(mesh: &Mesh, site: &str) -> Vec<(i32, i32, String)> {
    mesh.items(site)
        .await
        .into_iter()
        .map(|(id, n, rev)| (id, n, rev.to_string()))
        .collect()
}

#[tokio::test]
async fn mixed_sites_postgres_mariadb_postgres_converge_with_each_event_applied_once() {
    let r = three_sites_running().await;
    let (mesh, london) = (&r.mesh, &r.london);
    let mut l = london.conn().await;
    let paris = mesh.client("PARIS").await;
    let madrid = mesh.client("MADRID").await;
    // Own keys at each site, then the same keys written everywhere
    // (conflicts), then deletes from every engine.
    for k in 0..30 {
        upsert(&paris, "PARIS", k, k).await;
        london_write(&mut l, 100 + k, k, false).await;
        upsert(&madrid, "MADRID", 200 + k, k).await;
    }
    for k in 0..10 {
        upsert(&paris, "PARIS", 1000 + k, 1).await;
        london_write(&mut l, 1000 + k, 2, false).await;
        upsert(&madrid, "MADRID", 1000 + k, 3).await;
    }
    for k in 0..5 {
        delete(&paris, k).await;
        london_write(&mut l, 100 + k, 0, true).await;
        delete(&madrid, 200 + k).await;
    }
    // 100 keys, 15 deleted. Converged: the same rows everywhere, every
    // outbox empty (every event went round and was deleted by its
    // origin's sink).
    let mut c = london.conn().await;
    let settled = wait_for(
        async || {
            let p = pg_items(mesh, "PARIS").await;
            let m = pg_items(mesh, "MADRID").await;
            let lo = london_items(&mut c).await;
            let outboxes = london_count(&mut c, "SELECT COUNT(*) FROM outbox").await
                + paris
                    .query_one("SELECT count(*) FROM outbox", &[])
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
                + madrid
                    .query_one("SELECT count(*) FROM outbox", &[])
                    .await
                    .unwrap()
                    .get::<_, i64>(0);
            p.len() == 85 && p == m && p == lo && outboxes == 0
        },
        Duration::from_secs(120),
    )
    .await;
    if let Err(e) = settled {
        panic!(
            "not converged: {e}\nPARIS {}\nMADRID {}\nLONDON {}\nLONDON's sidecar:\n{}",
            pg_items(mesh, "PARIS").await.len(),
            pg_items(mesh, "MADRID").await.len(),
            london_items(&mut l).await.len(),
            r.london_sidecar.log_tail()
        );
    }
    // The conflicts went to the last writer: MADRID wrote last.
    let lo = london_items(&mut l).await;
    assert!(
        lo.iter()
            .filter(|(id, _, _)| *id >= 1000)
            .all(|(_, n, _)| *n == 3),
        "{lo:?}"
    );
    // Exactly once at LONDON: each foreign event applied by the sink once
    // (its trigger logs the marker), and LONDON's own writes never by it.
    // PARIS and MADRID wrote 30 + 10 rows and 5 deletes each.
    let by_sink = london_count(
        &mut l,
        "SELECT COUNT(*) FROM item_log WHERE by_sink AND id < 1000",
    )
    .await;
    assert_eq!(
        by_sink,
        2 * (30 + 5),
        "foreign writes of own keys, once each"
    );
    let inbox = london_count(
        &mut l,
        "SELECT COUNT(*) FROM sitesync_inbox WHERE origin <> 'LONDON'",
    )
    .await;
    assert_eq!(inbox, 2 * (30 + 10 + 5));
    let own = london_count(
        &mut l,
        "SELECT COUNT(*) FROM sitesync_inbox WHERE origin = 'LONDON'",
    )
    .await;
    assert_eq!(
        own,
        30 + 10 + 5,
        "LONDON's own events came back round once each"
    );
    // PostgreSQL applied LONDON's events once each too.
    let paris_from_london: i64 = paris
        .query_one(
            "SELECT count(*) FROM sitesync_inbox WHERE origin = 'LONDON'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(paris_from_london, 30 + 10 + 5);
    // `status` and `checkpoint show` read LONDON as they read PostgreSQL.
    let status = sitesync_with(&london.connector, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(text.contains("binlog at mariadb:"), "{text}");
    assert!(text.contains("PARIS"), "{text}");
    let show = sitesync_with(&london.connector, &["checkpoint", "show"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&show.stderr)
    );
    assert!(text.contains("mariadb:"), "{text}");

    // A conflict chosen at the MariaDB site: the row below stands for one
    // its sink recorded (LONDON's write of key 1000 losing to MADRID's),
    // with a payload of its own so that the choice shows. `conflicts
    // list` reads it; `conflicts choose` sends it again from LONDON and
    // every engine ends on it.
    use mysql_async::prelude::Queryable;
    let payload = r#"{"id": 1000, "n": 42, "rev": "00000000-0000-4000-8000-000000000042", "site": "LONDON", "note": null}"#;
    l.exec_drop(
        "INSERT INTO sitesync_conflicts (loser_event_id, entity, `key`, loser_origin, loser_ts, loser_payload, winner_event_id, winner_origin, winner_ts) \
         VALUES (UUID(), 'public.item', '1000', 'LONDON', UTC_TIMESTAMP(6) - INTERVAL 2 SECOND, ?, UUID(), 'MADRID', UTC_TIMESTAMP(6) - INTERVAL 1 SECOND)",
        (payload,),
    )
    .await
    .unwrap();
    let listed = sitesync_with(&london.connector, &["conflicts", "list", "--json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let conflict = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "1000" && c["loser_payload"]["n"] == 42)
        .cloned()
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        conflict["winner_ts"].as_str().unwrap().ends_with('Z'),
        "{conflict}"
    );
    let id = conflict["id"].to_string();
    let chosen = sitesync_with(&london.connector, &["conflicts", "choose", &id, "--yes"]);
    let said = String::from_utf8_lossy(&chosen.stdout);
    assert!(
        chosen.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&chosen.stderr)
    );
    assert!(said.contains(&format!("choice:LONDON:{id}")), "{said}");
    let rev = "00000000-0000-4000-8000-000000000042".to_string();
    wait_for(
        async || {
            let lo = london_items(&mut l).await;
            let everywhere = [
                pg_items(mesh, "PARIS").await,
                pg_items(mesh, "MADRID").await,
                lo,
            ];
            everywhere
                .iter()
                .all(|rows| rows.contains(&(1000, 42, rev.clone())))
        },
        Duration::from_secs(60),
    )
    .await
    .expect("every site holds the chosen write");
    let again = sitesync_with(&london.connector, &["conflicts", "list", "--json"]);
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    let row = again
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == conflict["id"])
        .cloned()
        .unwrap();
    assert!(
        row["reviewed_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{row}"
    );
}

#[tokio::test]
async fn a_mariadb_sidecar_killed_mid_stream_loses_nothing_and_keeps_each_seq() {
    let mut r = three_sites_running().await;
    let (mesh, london) = (&r.mesh, &r.london);
    let mut l = london.conn().await;
    for k in 0..300 {
        london_write(&mut l, k, 1, false).await;
        if k == 150 {
            r.london_sidecar.kill9();
            r.london_sidecar = london.spawn(mesh);
        }
    }
    let paris = mesh.client("PARIS").await;
    wait_for(
        async || {
            paris
                .query_one(
                    "SELECT count(*) FROM sitesync_inbox WHERE origin = 'LONDON' AND outcome = 'applied'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 300
        },
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("LONDON's events at PARIS: {e}\n{}", r.london_sidecar.log_tail()));
    // The seqs PARIS saw are 1..=300 in one epoch: nothing renumbered by
    // the re-sends after the kill, and no gap recorded.
    let (min, max, distinct): (i64, i64, i64) = {
        let row = paris
            .query_one(
                "SELECT min(seq), max(seq), count(DISTINCT seq) FROM sitesync_inbox WHERE origin = 'LONDON'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!((min, max, distinct), (1, 300, 300));
    let gaps: i64 = paris
        .query_one(
            "SELECT count(*) FROM sitesync_gaps WHERE origin = 'LONDON'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gaps, 0);
}

#[tokio::test]
async fn a_mariadb_checkpoint_past_a_purged_binlog_stops_with_what_to_do() {
    let mut r = three_sites_running().await;
    let (mesh, london) = (&r.mesh, &r.london);
    let mut l = london.conn().await;
    london_write(&mut l, 1, 1, false).await;
    // Its event checkpointed (the live file the sidecar writes).
    let store = mesh.dir.path().join("checkpoints").join("london");
    wait_for(
        async || read_live::<Position>(&store).is_some_and(|(_, ck)| ck.next_seq == 2),
        Duration::from_secs(60),
    )
    .await
    .expect("LONDON's first event checkpointed");
    r.london_sidecar.terminate().await;
    // While it is stopped: a write, then the binlog file holding it
    // purged. MariaDB keeps a file until its binlog checkpoint has moved
    // past it: a new file, a transaction in it, and PURGE until it took.
    let first: String = l
        .query::<(String, u64), _>("SHOW BINARY LOGS")
        .await
        .unwrap()
        .last()
        .unwrap()
        .0
        .clone();
    london_write(&mut l, 2, 1, false).await;
    l.query_drop("FLUSH BINARY LOGS").await.unwrap();
    london_write(&mut l, 3, 1, false).await;
    wait_for(
        async || {
            let logs: Vec<(String, u64)> = l.query("SHOW BINARY LOGS").await.unwrap();
            let last = logs.last().unwrap().0.clone();
            l.query_drop(format!("PURGE BINARY LOGS TO '{last}'"))
                .await
                .unwrap();
            let logs: Vec<(String, u64)> = l.query("SHOW BINARY LOGS").await.unwrap();
            !logs.iter().any(|(name, _)| *name == first)
        },
        Duration::from_secs(30),
    )
    .await
    .expect("the first binlog file purged");
    let mut sidecar = london.spawn(mesh);
    let status = sidecar.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success());
    let log = sidecar.log_text();
    assert!(log.contains("no longer holds"), "{log}");
    assert!(log.contains("ERROR 1236"), "{log}");
    assert!(log.contains("checkpoint reset"), "{log}");
}

/// How many of LONDON's events PARIS applied, and their seqs as
/// `(min, max, distinct)`.
async fn london_at_paris(paris: &tokio_postgres::Client) -> (i64, i64, i64, i64) {
    let row = paris
        .query_one(
            "SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0), count(DISTINCT seq) FROM sitesync_inbox WHERE origin = 'LONDON'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

#[tokio::test]
async fn a_mariadb_server_restarted_mid_stream_loses_nothing() {
    let r = three_sites_running().await;
    let (mesh, london) = (&r.mesh, &r.london);
    let mut l = london.conn().await;
    for k in 0..100 {
        london_write(&mut l, k, 1, false).await;
    }
    london.server.restart().await;
    let mut l = london.conn().await;
    for k in 100..200 {
        london_write(&mut l, k, 1, false).await;
    }
    let paris = mesh.client("PARIS").await;
    wait_for(
        async || london_at_paris(&paris).await.0 == 200,
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "LONDON's events at PARIS: {e}\n{}",
            r.london_sidecar.log_tail()
        )
    });
    assert_eq!(london_at_paris(&paris).await, (200, 1, 200, 200));
    // And the other way: PARIS's writes reach LONDON after the restart.
    for k in 1000..1020 {
        upsert(&paris, "PARIS", k, 7).await;
    }
    wait_for(
        async || london_count(&mut l, "SELECT COUNT(*) FROM item WHERE n = 7").await == 20,
        Duration::from_secs(60),
    )
    .await
    .expect("PARIS's writes at LONDON after the restart");
}

#[tokio::test]
async fn a_thousand_row_transaction_interrupted_halfway_is_neither_lost_nor_renumbered() {
    // Two events in flight at most and a checkpoint every 10 ms: the
    // transaction takes long enough to publish that checkpoints land
    // inside it.
    let mut r = three_sites_running_with("publisher_window = 2\n", "interval_ms = 10\n").await;
    let (mesh, london) = (&r.mesh, &r.london);
    let mut l = london.conn().await;
    // One transaction of 1,000 outbox rows (their items exist only at the
    // other sites).
    let mut tx = l.start_transaction(TxOpts::default()).await.unwrap();
    for k in 0..1000 {
        tx.exec_drop(
            "INSERT INTO outbox (type, entity_key, data) VALUES ('item.upsert', ?, JSON_OBJECT('id', ?, 'n', 1, 'rev', UUID(), 'site', 'LONDON'))",
            (k.to_string(), 5000 + k),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    // Killed once part of the transaction is checkpointed.
    let store = mesh.dir.path().join("checkpoints").join("london");
    wait_for(
        async || {
            read_live::<Position>(&store)
                .is_some_and(|(_, ck)| ck.resume.as_ref().is_some_and(|p| p.index > 0))
        },
        Duration::from_secs(60),
    )
    .await
    .expect("a checkpoint in the middle of the transaction");
    r.london_sidecar.kill9();
    let (_, mid) = read_live::<Position>(&store).unwrap();
    r.london_sidecar = london.spawn(mesh);
    let paris = mesh.client("PARIS").await;
    wait_for(
        async || london_at_paris(&paris).await.0 == 1000,
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the transaction at PARIS: {e}\n{}",
            r.london_sidecar.log_tail()
        )
    });
    assert_eq!(london_at_paris(&paris).await, (1000, 1, 1000, 1000));
    // The restart resumed inside the transaction (a row index above 0),
    // at the checkpoint the kill left, not at the transaction's start.
    r.london_sidecar
        .wait_log("streaming", Duration::from_secs(60))
        .await;
    let log = r.london_sidecar.log_text();
    let resumed: Position = log
        .lines()
        .find_map(|l| l.split("resume=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("no resume position in the log:\n{log}"));
    assert!(resumed.index > 0, "{resumed}");
    assert!(
        Some(&resumed) >= mid.resume.as_ref(),
        "{resumed} before {mid:?}"
    );
    // The archive queue holds every event sent, re-sends included: each
    // event id kept its seq, and the seqs are 1..=1000.
    // Every delivery is in it once PARIS has every event (one fanout).
    let held = mesh.queue_len(&mesh.names.archive).await as usize;
    let archived = drain_until(
        &mesh.amqp_url,
        &mesh.names.archive,
        Duration::from_secs(60),
        |got| got.len() >= held,
    )
    .await;
    let mut seqs: BTreeMap<Uuid, Vec<u64>> = BTreeMap::new();
    for d in &archived {
        let e: Event = serde_json::from_slice(&d.data).unwrap();
        seqs.entry(e.id).or_default().push(e.seq);
    }
    assert_eq!(seqs.len(), 1000);
    assert_eq!(archived.len(), held);
    let mut all: Vec<u64> = Vec::new();
    for (id, s) in &seqs {
        assert!(s.iter().all(|x| *x == s[0]), "{id} sent with seqs {s:?}");
        all.push(s[0]);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=1000).collect::<Vec<u64>>());
}

#[tokio::test]
async fn a_payload_mariadb_cannot_store_is_dead_lettered_at_london_and_the_rest_flows() {
    let r = three_sites_running().await;
    let (mesh, london) = (&r.mesh, &r.london);
    let paris = mesh.client("PARIS").await;
    for k in 0..5 {
        upsert(&paris, "PARIS", k, k).await;
    }
    // A note longer than LONDON's varchar(200): data too long (1406) in
    // strict mode, LONDON only.
    let long = "x".repeat(300);
    paris
        .execute(
            "INSERT INTO outbox (type, entity_key, data) VALUES ('item.upsert', '50', jsonb_build_object('id', 50, 'n', 1, 'rev', gen_random_uuid(), 'site', 'PARIS', 'note', $1::text))",
            &[&long],
        )
        .await
        .unwrap();
    for k in 5..10 {
        upsert(&paris, "PARIS", k, k).await;
    }
    let mut l = london.conn().await;
    wait_for(
        async || {
            london_count(&mut l, "SELECT COUNT(*) FROM item WHERE site = 'PARIS'").await == 10
                && london_count(
                    &mut l,
                    "SELECT COUNT(*) FROM sitesync_inbox WHERE outcome = 'dead_letter'",
                )
                .await
                    == 1
        },
        Duration::from_secs(90),
    )
    .await
    .unwrap_or_else(|e| panic!("at LONDON: {e}\n{}", r.london_sidecar.log_tail()));
    assert_eq!(
        london_count(&mut l, "SELECT COUNT(*) FROM item WHERE id = 50").await,
        0
    );
    // MADRID (PostgreSQL, text column) took it.
    let madrid = mesh.client("MADRID").await;
    wait_for(
        async || {
            madrid
                .query_opt("SELECT 1 FROM item WHERE id = 50", &[])
                .await
                .unwrap()
                .is_some()
        },
        Duration::from_secs(60),
    )
    .await
    .expect("item 50 at MADRID");
}

#[tokio::test]
async fn a_mariadb_site_resyncs_its_rows_to_a_postgres_site_while_it_writes() {
    let r = three_sites_running().await;
    let mut c = r.london.conn().await;
    // Rows older than sitesync at LONDON (no event, no version): PARIS
    // has none of them.
    let old = 3000;
    for chunk in (0..old).collect::<Vec<i32>>().chunks(500) {
        let values: Vec<String> = chunk
            .iter()
            .map(|i| format!("({i}, {}, '{}', 'OLD')", i % 1000, Uuid::new_v4()))
            .collect();
        c.query_drop(format!(
            "INSERT INTO item (id, n, rev, site) VALUES {}",
            values.join(", ")
        ))
        .await
        .unwrap();
    }
    // LONDON keeps writing on the first keys while its rows go to PARIS.
    let writer = {
        let mut w = r.london.conn().await;
        tokio::spawn(async move {
            let until = std::time::Instant::now() + Duration::from_secs(4);
            let mut i = 0;
            while std::time::Instant::now() < until {
                london_write(&mut w, i % 150, i, i % 7 == 0).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            i
        })
    };
    let connector = r.london.connector.clone();
    let out = tokio::task::spawn_blocking(move || {
        sitesync_with(
            &connector,
            &["resync", "--to-site", "PARIS", "--all", "--yes"],
        )
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("row(s) sent to"), "{text}");
    let writes = writer.await.unwrap();
    assert!(writes > 100, "{writes} live writes");
    // PARIS ends with LONDON's rows: the old ones from the snapshot, the
    // live ones whichever came last.
    let mut last = 0;
    wait_for(
        async || {
            let london = london_items(&mut c).await;
            last = london.len();
            pg_items(&r.mesh, "PARIS").await == london
        },
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("PARIS did not converge with LONDON ({last} rows): {e}"));
    assert!(last >= old as usize - 150, "{last}");
    // The job is done, in LONDON's database, and its table free again.
    let result: Option<String> = c
        .query_first("SELECT result FROM sitesync_resync WHERE job = 1")
        .await
        .unwrap();
    assert_eq!(result.as_deref(), Some("done"));
    let locks = london_count(&mut c, "SELECT COUNT(*) FROM sitesync_resync_locks").await;
    assert_eq!(locks, 0);
}
