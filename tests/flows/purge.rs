//! Purge and jobs: `sitesync purge` removes exactly the rows older than
//! their retention (archive, inbox, reviewed conflicts) and keeps the
//! others, a dry run deletes nothing; each run, and each replay, is a job
//! in `sitesync_jobs`; an old event redelivered after its inbox row went
//! changes nothing; the sidecar purges on its own every `purge_every`.
//! PostgreSQL sites, and a MariaDB archiving site.

use crate::support::mesh::{Mesh, MeshOptions, upsert};
use crate::support::sidecar::{Sidecar, sitesync_with};
use crate::support::{wait_for, wait_for_value};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

/// The ids of a table's rows (`key` a uuid column).
async fn ids(c: &Client, sql: &str) -> BTreeSet<Uuid> {
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// `sitesync jobs --json` at `site`, parsed.
async fn jobs(mesh: &Mesh, site: &str, kind: &str) -> Vec<serde_json::Value> {
    let out = mesh
        .ok(site, &["jobs", "--kind", kind, "--json", "--limit", "50"])
        .await;
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap_or_else(|e| panic!("{e}: {out}"))
        .as_array()
        .unwrap()
        .clone()
}

/// Adds `text` after the `[section]` line of `site`'s connector (or at the
/// top with `None`).
fn add_to_connector(mesh: &Mesh, site: &str, section: Option<&str>, text: &str) {
    let path = mesh.connector(site);
    let old = std::fs::read_to_string(path).unwrap();
    let new = match section {
        None => format!("{text}{old}"),
        Some(s) => old.replacen(&format!("[{s}]\n"), &format!("[{s}]\n{text}"), 1),
    };
    assert_ne!(old, new, "[{section:?}] not found in {}", path.display());
    std::fs::write(path, new).unwrap();
}

#[tokio::test]
async fn purge_removes_exactly_the_old_rows_and_a_redelivered_old_event_changes_nothing() {
    let mesh = Mesh::start(MeshOptions {
        sites: vec!["PARIS", "LONDON"],
        archive: true,
        sink_extra: "inbox_retention_days = 2\nconflict_retention_days = 3\n".into(),
        ..MeshOptions::default()
    })
    .await;
    add_to_connector(&mesh, "PARIS", Some("archive"), "retention_days = 5\n");
    let (paris, london) = (mesh.client("PARIS").await, mesh.client("LONDON").await);

    // `check` says what `init` made: the jobs table, reviewed_at. A
    // conflicts table from before reviewed_at fails the check until
    // `init` adds it.
    london
        .batch_execute("ALTER TABLE sitesync_conflicts DROP COLUMN reviewed_at")
        .await
        .unwrap();
    let out = mesh.sitesync("LONDON", &["check"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[FAIL] conflicts review: sitesync_conflicts has no reviewed_at column")
            && text.contains("run `sitesync init`"),
        "{text}"
    );
    assert!(text.contains("] jobs table: sitesync_jobs"), "{text}");
    let init = mesh.ok("LONDON", &["init"]).await;
    assert!(
        init.contains("sitesync_conflicts.reviewed_at: ready"),
        "{init}"
    );
    assert!(init.contains("jobs table sitesync_jobs: ready"), "{init}");

    // PARIS writes 40 items, 10 of them twice (a newer version).
    let mut sidecars = mesh.spawn_all();
    let mut first = Vec::new();
    for id in 0..40 {
        first.push(upsert(&paris, "PARIS", id, 1).await.0);
    }
    let mut second = Vec::new();
    for id in 0..10 {
        second.push(upsert(&paris, "PARIS", id, 2).await.0);
    }
    mesh.wait_inbox("LONDON", 50, Duration::from_secs(60)).await;
    wait_for(
        async || count(&paris, "SELECT count(*) FROM sitesync_archive").await == 50,
        Duration::from_secs(60),
    )
    .await
    .expect("PARIS archives the 50 events");

    // Time goes by: the archive rows of items 10..20's first writes were
    // received 6 days ago (retention 5); LONDON applied the first writes
    // of items 0..30 three days ago (retention 2). Conflicts at LONDON: one
    // reviewed 4 days ago (retention 3), one reviewed just now, one never
    // reviewed and recorded 100 days ago.
    let old_archive: BTreeSet<Uuid> = first[10..20].iter().copied().collect();
    let old_inbox: BTreeSet<Uuid> = first[..30].iter().copied().collect();
    let set_back = |table: &'static str, column: &'static str, days: i32, ids: Vec<Uuid>| {
        let c = if table == "sitesync_archive" {
            &paris
        } else {
            &london
        };
        async move {
            let n = c
                .execute(
                    &format!(
                        "UPDATE {table} SET {column} = now() - make_interval(days => $1) WHERE event_id = ANY($2)"
                    ),
                    &[&days, &ids],
                )
                .await
                .unwrap();
            assert_eq!(n as usize, ids.len());
        }
    };
    set_back(
        "sitesync_archive",
        "received_at",
        6,
        old_archive.iter().copied().collect(),
    )
    .await;
    set_back(
        "sitesync_inbox",
        "applied_at",
        3,
        old_inbox.iter().copied().collect(),
    )
    .await;
    let conflict = |n: u128| {
        let london = &london;
        async move {
            london
                .query_one(
                    "INSERT INTO sitesync_conflicts (loser_event_id, entity, key, loser_origin, loser_ts, winner_event_id, winner_origin, winner_ts, recorded_at) \
                     VALUES ($1, 'public.item', '999', 'PARIS', now(), $2, 'LONDON', now(), now() - interval '100 days') RETURNING id",
                    &[&Uuid::from_u128(n), &Uuid::from_u128(n + 1000)],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let (reviewed_long_ago, reviewed_now, unreviewed) =
        (conflict(1).await, conflict(2).await, conflict(3).await);
    let review = mesh
        .ok(
            "LONDON",
            &[
                "conflicts",
                "review",
                &reviewed_long_ago.to_string(),
                &reviewed_now.to_string(),
            ],
        )
        .await;
    assert!(
        review.contains(&format!("conflict {reviewed_now}: reviewed")),
        "{review}"
    );
    london
        .execute(
            "UPDATE sitesync_conflicts SET reviewed_at = now() - interval '4 days' WHERE id = $1",
            &[&reviewed_long_ago],
        )
        .await
        .unwrap();
    let missing = mesh
        .sitesync("LONDON", &["conflicts", "review", "987654"])
        .await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stdout)
            .contains("conflict 987654: not in sitesync_conflicts")
    );

    // A dry run counts, per table, and deletes nothing.
    let archive_before = ids(&paris, "SELECT event_id FROM sitesync_archive").await;
    let inbox_before = ids(&london, "SELECT event_id FROM sitesync_inbox").await;
    let dry = mesh.ok("PARIS", &["purge", "--dry-run"]).await;
    assert!(
        dry.contains(&format!(
            "  {:<32} {:>10}  (older than 5 day(s))",
            "public.sitesync_archive", 10
        )) && dry.contains("dry run: nothing deleted"),
        "{dry}"
    );
    let dry = mesh.ok("LONDON", &["purge", "--dry-run"]).await;
    assert!(
        dry.contains(&format!(
            "  {:<32} {:>10}  (older than 2 day(s))",
            "sitesync_inbox", 30
        )) && dry.contains(&format!(
            "  {:<32} {:>10}  (reviewed more than 3 day(s))",
            "sitesync_conflicts", 1
        )),
        "{dry}"
    );
    assert_eq!(
        ids(&paris, "SELECT event_id FROM sitesync_archive").await,
        archive_before
    );
    assert_eq!(
        ids(&london, "SELECT event_id FROM sitesync_inbox").await,
        inbox_before
    );
    assert!(
        jobs(&mesh, "LONDON", "purge").await.is_empty(),
        "a dry run is no job"
    );

    // Without a terminal and without --yes: refused, nothing deleted.
    let refused = mesh.sitesync("LONDON", &["purge"]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert_eq!(
        ids(&london, "SELECT event_id FROM sitesync_inbox").await,
        inbox_before
    );

    // The purge: exactly the old rows go.
    let out = mesh.ok("PARIS", &["purge", "--yes"]).await;
    assert!(
        out.contains("deleted 10 row(s): public.sitesync_archive 10"),
        "{out}"
    );
    let out = mesh.ok("LONDON", &["purge", "--yes"]).await;
    assert!(
        out.contains("deleted 31 row(s): sitesync_inbox 30, sitesync_conflicts 1"),
        "{out}"
    );
    assert_eq!(
        ids(&paris, "SELECT event_id FROM sitesync_archive").await,
        &archive_before - &old_archive
    );
    assert_eq!(
        ids(&london, "SELECT event_id FROM sitesync_inbox").await,
        &inbox_before - &old_inbox
    );
    let conflicts: BTreeSet<i64> = london
        .query("SELECT id FROM sitesync_conflicts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(conflicts, BTreeSet::from([reviewed_now, unreviewed]));

    // Each run is a job, by whoever ran it, done = total.
    let runs = jobs(&mesh, "LONDON", "purge").await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    let job = &runs[0];
    assert_eq!(job["state"], "succeeded");
    assert_eq!(
        (job["done"].as_u64(), job["total"].as_u64()),
        (Some(31), Some(31))
    );
    assert_eq!(job["args"]["inbox_retention_days"], 2);
    assert_eq!(job["args"]["conflicts_retention_days"], 3);
    assert!(job["who"].as_str().is_some_and(|w| !w.is_empty()), "{job}");
    let table = mesh.ok("LONDON", &["jobs"]).await;
    assert!(
        table.contains(job["id"].as_str().unwrap())
            && table.contains("100 %")
            && table.contains("succeeded: deleted 31 row(s)"),
        "{table}"
    );

    // An old event comes again after its inbox row went: PARIS's archive
    // replays every PARIS event it still holds to LONDON. Items 0..10's
    // first writes are older than what LONDON holds (their second);
    // items 20..30's first write is what LONDON holds (the same version).
    let items_before = mesh.items("LONDON").await;
    let sink_writes = "SELECT count(*) FROM item_log WHERE by_sink";
    let writes_before = count(&london, sink_writes).await;
    let versions = "SELECT count(*), coalesce(md5(string_agg(key || ts::text || event_id::text, ',' ORDER BY key)), '') FROM sitesync_versions";
    let versions_before: (i64, String) = {
        let r = london.query_one(versions, &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    let out = mesh
        .ok(
            "PARIS",
            &[
                "replay",
                "--to-site",
                "LONDON",
                "--origin",
                "PARIS",
                "--yes",
            ],
        )
        .await;
    assert!(out.contains("replayed 40 event(s)"), "{out}");
    // 20 purged first writes come back (items 0..10 and 20..30; 10..20's
    // left the archive too), and the 20 kept ones are duplicates.
    let back: BTreeSet<Uuid> = first[..10].iter().chain(&first[20..30]).copied().collect();
    wait_for(
        async || {
            count(&london, "SELECT count(*) FROM sitesync_inbox").await
                == (inbox_before.len() - old_inbox.len() + back.len()) as i64
                && mesh.queue_len(&mesh.names.site("LONDON")).await == 0
        },
        Duration::from_secs(60),
    )
    .await
    .expect("LONDON takes the replayed events");
    assert_eq!(mesh.items("LONDON").await, items_before, "nothing changed");
    assert_eq!(
        count(&london, sink_writes).await,
        writes_before,
        "no write at all"
    );
    let r = london.query_one(versions, &[]).await.unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, String>(1)), versions_before);
    // What the sink made of them: each returning event is lost to
    // last-writer-wins (its version is not above the entity's), recorded
    // as a conflict whose winner is the entity's current version.
    let outcomes: Vec<(Uuid, String)> = london
        .query(
            "SELECT event_id, outcome FROM sitesync_inbox WHERE event_id = ANY($1)",
            &[&back.iter().copied().collect::<Vec<_>>()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(outcomes.len(), back.len());
    assert!(outcomes.iter().all(|(_, o)| o == "lost"), "{outcomes:?}");
    let recorded: Vec<(Uuid, Uuid)> = london
        .query(
            "SELECT loser_event_id, winner_event_id FROM sitesync_conflicts WHERE loser_event_id = ANY($1)",
            &[&back.iter().copied().collect::<Vec<_>>()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // The winner is the entity's stored version: the second write for
    // items 0..10, the event itself for 20..30 (docs/archive.md, "Purge").
    let winners: std::collections::BTreeMap<Uuid, Uuid> = recorded.into_iter().collect();
    assert_eq!(
        winners.len(),
        back.len(),
        "each returning event is a conflict row"
    );
    for i in 0..10 {
        assert_eq!(
            winners[&first[i]], second[i],
            "item {i}: the newer write wins"
        );
        assert_eq!(
            winners[&first[20 + i]],
            first[20 + i],
            "item {}: its own version",
            20 + i
        );
    }

    // The replay is a job too.
    let replays = jobs(&mesh, "PARIS", "replay").await;
    assert_eq!(replays.len(), 1, "{replays:?}");
    assert_eq!(replays[0]["state"], "succeeded");
    assert_eq!(replays[0]["done"], 40);
    assert_eq!(replays[0]["args"]["to_site"], "LONDON");
    assert!(
        replays[0]["result"]
            .as_str()
            .unwrap()
            .starts_with("replayed 40 event(s)"),
        "{}",
        replays[0]
    );

    // A replay whose process died stays `running`; `jobs` shows it stale,
    // without rewriting its row.
    paris
        .execute(
            "INSERT INTO sitesync_jobs (id, kind, who, args, started_at, updated_at, done, total, state) \
             VALUES ($1, 'replay', 'ops', '{}', now() - interval '2 hours', now() - interval '1 hour', 5, 10, 'running')",
            &[&Uuid::from_u128(42)],
        )
        .await
        .unwrap();
    let table = mesh.ok("PARIS", &["jobs", "--kind", "replay"]).await;
    let line = table
        .lines()
        .find(|l| l.starts_with(&Uuid::from_u128(42).to_string()))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains("50 %") && line.contains("stale (no progress since "),
        "{line}"
    );
    let stored: String = paris
        .query_one(
            "SELECT state FROM sitesync_jobs WHERE id = $1",
            &[&Uuid::from_u128(42)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "running");

    // The sidecar purges by itself every purge_every: LONDON's, restarted
    // with a tiny one, deletes rows set back again and records its job.
    let later: Vec<Uuid> = second.clone();
    set_back("sitesync_inbox", "applied_at", 3, later.clone()).await;
    assert!(
        sidecars
            .get_mut("LONDON")
            .unwrap()
            .terminate()
            .await
            .success()
    );
    add_to_connector(&mesh, "LONDON", None, "purge_every = \"300ms\"\n");
    sidecars.insert("LONDON", mesh.spawn("LONDON"));
    let job = wait_for_value(
        async || {
            jobs(&mesh, "LONDON", "purge")
                .await
                .into_iter()
                .find(|j| j["who"] == "sidecar" && j["state"] == "succeeded" && j["done"] == 10)
        },
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("no scheduled purge: {e}\n{}", sidecars["LONDON"].log_tail()));
    assert!(
        job["result"]
            .as_str()
            .unwrap()
            .contains("sitesync_inbox 10"),
        "{job}"
    );
    let left = ids(&london, "SELECT event_id FROM sitesync_inbox").await;
    assert!(
        left.is_disjoint(&later.iter().copied().collect()),
        "the scheduled purge deleted them"
    );
    sidecars["LONDON"]
        .wait_log("purge done:", Duration::from_secs(30))
        .await;
    for s in sidecars.values_mut() {
        assert!(s.terminate().await.success(), "{}", s.log_tail());
    }
}

#[tokio::test]
async fn a_mariadb_site_purges_its_archive_and_inbox_and_records_the_jobs() {
    let mesh = Mesh::start(MeshOptions {
        sites: vec!["PARIS"],
        ..MeshOptions::default()
    })
    .await;
    // LONDON on MariaDB archives; its sink takes PARIS's events without a
    // route for them (skipped, but in its inbox).
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
            "site = \"LONDON\"\npurge_every = \"off\"\n\n[database]\nkind = \"mariadb\"\nurl = \"{}\"\n\n[broker]\nurls = [\"{}\"]\ntopology = \"{}\"\n\n[checkpoint]\ndir = \"{}\"\n\n[retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\n[sink]\nunrouted = \"skip\"\nbatch_timeout_ms = 20\ninbox_retention_days = 2\n\n[archive]\nbatch_timeout_ms = 50\nretention_days = 7\n",
            maria.url("london"),
            mesh.amqp_url,
            topology.display(),
            mesh.dir.path().join("checkpoints").join("london").display(),
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = sitesync_with(&connector, args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let init = run(&["init"]);
    assert!(
        init.contains("jobs table sitesync_jobs: ready")
            && init.contains("sitesync_conflicts.reviewed_at: ready"),
        "{init}"
    );
    let mut london = Sidecar::spawn(&connector, mesh.dir.path());
    let mut paris = mesh.spawn("PARIS");
    let client = mesh.client("PARIS").await;
    let mut written = Vec::new();
    for id in 0..60 {
        written.push(upsert(&client, "PARIS", id, id).await.0.to_string());
    }
    let mut db = maria.conn(Some("london")).await;
    use mysql_async::prelude::Queryable;
    for table in ["sitesync_archive", "sitesync_inbox"] {
        wait_for(
            async || {
                db.query_first::<i64, _>(format!("SELECT count(*) FROM {table}"))
                    .await
                    .unwrap()
                    == Some(60)
            },
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("LONDON's {table}: {e}\n{}", london.log_tail()));
    }
    // The archive's first 25 rows 8 days old (UTC, as it writes them), the
    // inbox's first 35 three days old.
    let list = |ids: &[String]| {
        ids.iter()
            .map(|i| format!("'{i}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    db.query_drop(format!(
        "UPDATE sitesync_archive SET received_at = UTC_TIMESTAMP(6) - INTERVAL 8 DAY WHERE event_id IN ({})",
        list(&written[..25])
    ))
    .await
    .unwrap();
    db.query_drop(format!(
        "UPDATE sitesync_inbox SET applied_at = NOW(6) - INTERVAL 3 DAY WHERE event_id IN ({})",
        list(&written[..35])
    ))
    .await
    .unwrap();

    let dry = run(&["purge", "--dry-run"]);
    assert!(
        dry.contains(&format!(
            "  {:<32} {:>10}  (older than 7 day(s))",
            "sitesync_archive", 25
        )) && dry.contains(&format!(
            "  {:<32} {:>10}  (older than 2 day(s))",
            "sitesync_inbox", 35
        )),
        "{dry}"
    );
    let out = run(&["purge", "--yes"]);
    assert!(
        out.contains(
            "deleted 60 row(s): sitesync_archive 25, sitesync_inbox 35, sitesync_conflicts 0"
        ),
        "{out}"
    );
    let archive_left: Vec<String> = db
        .query("SELECT event_id FROM sitesync_archive ORDER BY event_id")
        .await
        .unwrap();
    let mut want: Vec<String> = written[25..].to_vec();
    want.sort();
    assert_eq!(archive_left, want);
    let inbox_left: Vec<String> = db
        .query("SELECT event_id FROM sitesync_inbox ORDER BY event_id")
        .await
        .unwrap();
    let mut want: Vec<String> = written[35..].to_vec();
    want.sort();
    assert_eq!(inbox_left, want);

    let jobs: serde_json::Value = serde_json::from_str(&run(&["jobs", "--json"])).unwrap();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["kind"], "purge");
    assert_eq!(jobs[0]["state"], "succeeded");
    assert_eq!(jobs[0]["done"], 60);
    assert_eq!(jobs[0]["stale"], false);
    assert!(paris.terminate().await.success());
    assert!(london.terminate().await.success(), "{}", london.log_tail());
}
