//! The audit trail: every manual action from the CLI is in
//! `sitesync_audit` with who, the arguments and how it ended (`ok`, or
//! `failed` with the error); a dry run is not; `init` creates the table
//! and `check` verifies it; a trail that cannot be written does not hide
//! the action's own result. PostgreSQL sites, and a MariaDB site.

use crate::support::mesh::{Mesh, MeshOptions, upsert};
use crate::support::sidecar::sitesync_with;
use crate::support::wait_for;
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

/// `sitesync audit --json` at `site` (of `action` only when given), parsed.
async fn audit(mesh: &Mesh, site: &str, action: Option<&str>) -> Vec<Value> {
    let mut args = vec!["audit", "--json", "--limit", "100"];
    if let Some(a) = action {
        args.extend(["--action", a]);
    }
    let out = mesh.ok(site, &args).await;
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("{e}: {out}"))
        .as_array()
        .unwrap()
        .clone()
}

/// `user@host`, as the CLI records it.
fn who() -> String {
    sitesync::audit::who()
}

#[tokio::test]
async fn every_manual_action_is_recorded_with_who_arguments_and_result_and_a_dry_run_is_not() {
    let mesh = Mesh::start(MeshOptions {
        sites: vec!["PARIS", "LONDON"],
        archive: true,
        ..MeshOptions::default()
    })
    .await;
    let (paris, london) = (mesh.client("PARIS").await, mesh.client("LONDON").await);

    // `init` made the table (Mesh::start ran it) and `check` sees it; a
    // missing table fails the check until `init` again.
    let out = mesh.sitesync("LONDON", &["check"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("] audit table: sitesync_audit"), "{text}");
    london
        .batch_execute("DROP TABLE sitesync_audit")
        .await
        .unwrap();
    let out = mesh.sitesync("LONDON", &["check"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[FAIL] audit table: sitesync_audit does not exist")
            && text.contains("run `sitesync init`"),
        "{text}"
    );
    // Without its table an action still runs and says so; it is just not
    // recorded.
    let out = mesh.sitesync("LONDON", &["purge", "--yes"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: this purge (done) is not in the audit trail (sitesync_audit)")
            && stderr.contains("run `sitesync init`"),
        "{stderr}"
    );
    let init = mesh.ok("LONDON", &["init"]).await;
    assert!(init.contains("audit table sitesync_audit: ready"), "{init}");
    assert!(
        mesh.ok("LONDON", &["init"])
            .await
            .contains("audit table sitesync_audit: ready"),
        "idempotent"
    );
    assert_eq!(
        mesh.ok("LONDON", &["audit"]).await.trim(),
        "no action recorded yet"
    );

    // A checkpoint reset (no sidecar holds the store).
    let out = mesh
        .ok("LONDON", &["checkpoint", "reset", "--to-latest", "--yes"])
        .await;
    assert!(out.contains("reset "), "{out}");

    // Conflicts reviewed: one that exists, then one that does not.
    let conflict: i64 = london
        .query_one(
            "INSERT INTO sitesync_conflicts (loser_event_id, entity, key, loser_origin, loser_ts, winner_event_id, winner_origin, winner_ts) \
             VALUES ($1, 'public.item', '1', 'PARIS', now(), $2, 'LONDON', now()) RETURNING id",
            &[&Uuid::from_u128(1), &Uuid::from_u128(2)],
        )
        .await
        .unwrap()
        .get(0);
    mesh.ok("LONDON", &["conflicts", "review", &conflict.to_string()])
        .await;
    let missing = mesh
        .sitesync("LONDON", &["conflicts", "review", "999999"])
        .await;
    assert_eq!(missing.status.code(), Some(1));

    // A dead letter requeue (an empty queue: nothing to send) and one of
    // an id that is not there (failed).
    mesh.ok("LONDON", &["dlq", "requeue", "--all"]).await;
    let absent = mesh
        .sitesync("LONDON", &["dlq", "requeue", "--id", "no-such-letter"])
        .await;
    assert_eq!(absent.status.code(), Some(1));

    // A gap fill with no gap open; capture triggers added (the dry run
    // is not recorded) and removed.
    let out = mesh.ok("LONDON", &["gaps", "fill"]).await;
    assert!(!out.contains("asked"), "{out}");
    mesh.ok("LONDON", &["capture", "add", "--all", "--dry-run"])
        .await;
    mesh.ok("LONDON", &["capture", "add", "--route", "item.upsert"])
        .await;
    mesh.ok("LONDON", &["capture", "remove", "--all"]).await;

    // Purge: the dry run is not recorded, the real one is.
    let dry = mesh.ok("LONDON", &["purge", "--dry-run"]).await;
    assert!(dry.contains("dry run: nothing deleted"), "{dry}");
    mesh.ok("LONDON", &["purge", "--yes"]).await;

    // A resync refused: the job does not exist.
    let refused = mesh
        .sitesync("PARIS", &["resync", "--abandon", "424242"])
        .await;
    assert!(!refused.status.success());
    // A resync dry run: not recorded.
    // (whether it would be refused or not does not matter here).
    mesh.sitesync(
        "PARIS",
        &["resync", "--to-site", "LONDON", "--all", "--dry-run"],
    )
    .await;

    // A replay of PARIS's archive to LONDON (PARIS's sidecar archives
    // three events first); its dry run is not recorded.
    let mut sidecar = mesh.spawn("PARIS");
    for id in 0..3 {
        upsert(&paris, "PARIS", id, 1).await;
    }
    wait_for(
        async || {
            paris
                .query_one("SELECT count(*) FROM sitesync_archive", &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 3
        },
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("PARIS archives: {e}\n{}", sidecar.log_tail()));
    assert!(
        sidecar.terminate().await.success(),
        "{}",
        sidecar.log_tail()
    );
    mesh.ok("PARIS", &["replay", "--to-site", "LONDON", "--dry-run"])
        .await;
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
    assert!(out.contains("replayed 3 event(s)"), "{out}");

    // LONDON's trail, newest first.
    let me = who();
    assert!(me.contains('@'), "{me}");
    let rows = audit(&mesh, "LONDON", None).await;
    let actions: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("purge", "ok"),
            ("capture remove", "ok"),
            ("capture add", "ok"),
            ("gaps fill", "ok"),
            ("dlq requeue", "failed"),
            ("dlq requeue", "ok"),
            ("conflicts review", "failed"),
            ("conflicts review", "ok"),
            ("checkpoint reset", "ok"),
        ],
        "{rows:#?}"
    );
    for r in &rows {
        assert_eq!(r["who"], me.as_str(), "{r}");
        assert_eq!(r["via"], "cli", "{r}");
        assert!(Uuid::parse_str(r["id"].as_str().unwrap()).is_ok(), "{r}");
        let at: chrono::DateTime<chrono::Utc> = serde_json::from_value(r["at"].clone()).unwrap();
        assert!((chrono::Utc::now() - at).num_seconds() < 600, "{r}");
    }
    let [
        purge,
        capture_remove,
        capture_add,
        gaps_fill,
        requeue_failed,
        requeue,
        review_failed,
        review,
        reset,
    ] = &rows[..]
    else {
        unreachable!()
    };
    assert_eq!(
        capture_add["arguments"]["routes"],
        serde_json::json!(["item.upsert"])
    );
    assert_eq!(capture_add["arguments"]["all"], false);
    assert_eq!(capture_remove["arguments"]["all"], true);
    assert_eq!(gaps_fill["detail"], "no open gap: nothing to ask");
    assert!(
        purge["detail"]
            .as_str()
            .unwrap()
            .starts_with("deleted 0 row(s)"),
        "{purge}"
    );
    assert_eq!(requeue["arguments"]["all"], true);
    assert_eq!(requeue["detail"], "0 sent back, 0 left");
    assert_eq!(
        requeue_failed["arguments"]["ids"],
        serde_json::json!(["no-such-letter"])
    );
    assert!(
        requeue_failed["detail"]
            .as_str()
            .unwrap()
            .contains("not in the dead-letter queue: no-such-letter"),
        "{requeue_failed}"
    );
    assert_eq!(review["arguments"]["ids"], serde_json::json!([conflict]));
    assert_eq!(
        review["detail"],
        format!("1 conflict(s) reviewed: {conflict}")
    );
    assert_eq!(
        review_failed["arguments"]["ids"],
        serde_json::json!([999999])
    );
    assert_eq!(
        review_failed["detail"],
        "0 conflict(s) reviewed; not in sitesync_conflicts: 999999"
    );
    assert_eq!(reset["arguments"]["to"], "latest");
    assert!(
        reset["detail"].as_str().unwrap().starts_with("reset to "),
        "{reset}"
    );

    // PARIS's: the refused resync and the replay; no dry run.
    let rows = audit(&mesh, "PARIS", None).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let (replay, resync) = (&rows[0], &rows[1]);
    assert_eq!(
        (replay["action"].as_str(), replay["result"].as_str()),
        (Some("replay"), Some("ok"))
    );
    assert_eq!(replay["arguments"]["to_site"], "LONDON");
    assert_eq!(replay["arguments"]["origin"], "PARIS");
    assert!(
        replay["detail"]
            .as_str()
            .unwrap()
            .contains("replayed 3 event(s)"),
        "{replay}"
    );
    assert_eq!(
        (resync["action"].as_str(), resync["result"].as_str()),
        (Some("resync"), Some("failed"))
    );
    assert_eq!(resync["arguments"]["mode"], "abandon");
    assert_eq!(resync["arguments"]["job"], 424242);
    assert!(
        resync["detail"]
            .as_str()
            .unwrap()
            .contains("resync refused"),
        "{resync}"
    );

    // --action and --limit; the table.
    let only = audit(&mesh, "LONDON", Some("conflicts review")).await;
    assert_eq!(only.len(), 2);
    assert!(only.iter().all(|r| r["action"] == "conflicts review"));
    let out = mesh
        .ok("LONDON", &["audit", "--limit", "1", "--json"])
        .await;
    let one: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["action"], "purge");
    let table = mesh.ok("LONDON", &["audit"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 10, "{table}");
    assert!(lines[0].starts_with("at (UTC)"), "{table}");
    assert!(
        lines[7].contains("conflicts review  failed  {\"ids\":[999999]}: 0 conflict(s) reviewed"),
        "{table}"
    );
}

#[tokio::test]
async fn a_mariadb_site_records_its_actions() {
    let mesh = Mesh::start(MeshOptions {
        sites: vec!["PARIS"],
        ..MeshOptions::default()
    })
    .await;
    let maria = crate::support::mariadb::MariaDb::start().await;
    maria.create_database("london").await;
    let connector = mesh.dir.path().join("london.toml");
    std::fs::write(
        &connector,
        format!(
            "site = \"LONDON\"\npurge_every = \"off\"\n\n[database]\nkind = \"mariadb\"\nurl = \"{}\"\n\n[broker]\nurls = [\"{}\"]\ntopology = \"{}\"\n\n[checkpoint]\ndir = \"{}\"\n\n[sink]\nunrouted = \"skip\"\ninbox_retention_days = 2\n",
            maria.url("london"),
            mesh.amqp_url,
            mesh.dir.path().join("topology.toml").display(),
            mesh.dir.path().join("checkpoints").join("london").display(),
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = sitesync_with(&connector, args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, init, err) = run(&["init"]);
    assert_eq!(code, Some(0), "{init}{err}");
    assert!(init.contains("audit table sitesync_audit: ready"), "{init}");
    let (code, check, _) = run(&["check"]);
    assert!(
        check.contains("] audit table: sitesync_audit"),
        "{code:?}: {check}"
    );

    assert_eq!(run(&["purge", "--dry-run"]).0, Some(0));
    let (code, out, err) = run(&["purge", "--yes"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, _) = run(&["conflicts", "review", "31337"]);
    assert_eq!(code, Some(1));

    let (code, out, err) = run(&["audit", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_eq!(rows[0]["action"], "conflicts review");
    assert_eq!(rows[0]["result"], "failed");
    assert_eq!(rows[0]["arguments"]["ids"], serde_json::json!([31337]));
    assert_eq!(rows[0]["who"], who().as_str());
    assert_eq!(rows[1]["action"], "purge");
    assert_eq!(rows[1]["result"], "ok");
    assert!(
        rows[1]["detail"]
            .as_str()
            .unwrap()
            .starts_with("deleted 0 row(s)"),
        "{}",
        rows[1]
    );
    let (_, only, _) = run(&["audit", "--action", "purge", "--json"]);
    let only: Vec<Value> = serde_json::from_str(&only).unwrap();
    assert_eq!(only.len(), 1);
    let (_, table, _) = run(&["audit"]);
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .contains("conflicts review  failed"),
        "{table}"
    );
}
