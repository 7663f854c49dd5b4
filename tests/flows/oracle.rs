//! An Oracle site among PostgreSQL ones: MADRID on Oracle Database Free
//! (gvenzl/oracle-free, through testcontainers-modules), PARIS and LONDON
//! on the private PostgreSQL cluster of the mesh.
//!
//! These need a Docker engine (and the Oracle Instant Client on the test
//! machine, for the `oracle` crate). They are ignored by default:
//!
//! ```text
//! cargo test --test main oracle -- --ignored
//! ```

use crate::support::mesh::{Mesh, MeshOptions, upsert};
use crate::support::sidecar::{Sidecar, binary};
use crate::support::wait_for;
use lapin::options::QueuePurgeOptions;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;
use testcontainers_modules::oracle::free::Oracle;
use testcontainers_modules::testcontainers::core::{CmdWaitFor, ExecCommand};
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};

/// Routes for `item` events into Oracle's `TEST.ITEM`.
const ORACLE_ROUTES: &str = r#"
[[sink.routes]]
type = "item.upsert"
table = "item"
key = ["id"]
operation = "upsert"

[[sink.routes]]
type = "item.delete"
table = "item"
key = ["id"]
operation = "delete"
"#;

/// As SYSDBA: ARCHIVELOG, supplemental logging, the grants of
/// `sitesync init`'s DBA list for the image's `test` user, in FREEPDB1
/// (and `DBMS_LOCK`, which `sitesync resync` needs).
const DBA_SETUP: &str = r#"
sqlplus -s / as sysdba <<'SQL'
WHENEVER SQLERROR EXIT FAILURE
SHUTDOWN IMMEDIATE;
STARTUP MOUNT;
ALTER DATABASE ARCHIVELOG;
ALTER DATABASE OPEN;
ALTER PLUGGABLE DATABASE ALL OPEN;
ALTER DATABASE ADD SUPPLEMENTAL LOG DATA;
ALTER SESSION SET CONTAINER = FREEPDB1;
GRANT CREATE SESSION, CREATE TABLE, CREATE TRIGGER, LOGMINING, SELECT ANY TRANSACTION TO test;
GRANT SELECT ON V_$DATABASE TO test;
GRANT SELECT ON V_$LOG TO test;
GRANT SELECT ON V_$LOGFILE TO test;
GRANT SELECT ON V_$ARCHIVED_LOG TO test;
GRANT SELECT ON V_$THREAD TO test;
GRANT SELECT ON V_$TRANSACTION TO test;
GRANT SELECT ON V_$LOGMNR_CONTENTS TO test;
GRANT EXECUTE ON DBMS_LOGMNR TO test;
GRANT EXECUTE ON DBMS_LOCK TO test;
ALTER USER test QUOTA UNLIMITED ON USERS;
EXIT
SQL
"#;

/// The business table at the Oracle site, with a trigger that logs who
/// wrote (the sink is marked by its CLIENT_IDENTIFIER).
const BUSINESS: [&str; 3] = [
    "CREATE TABLE ITEM (ID NUMBER PRIMARY KEY, N NUMBER NOT NULL, REV VARCHAR2(36) NOT NULL, SITE VARCHAR2(20) NOT NULL, NOTE VARCHAR2(100))",
    "CREATE TABLE ITEM_LOG (ID NUMBER, BY_SINK NUMBER(1))",
    "CREATE OR REPLACE TRIGGER ITEM_LOG_T AFTER INSERT OR UPDATE ON ITEM FOR EACH ROW BEGIN \
     INSERT INTO ITEM_LOG VALUES (:NEW.ID, CASE WHEN SYS_CONTEXT('USERENV', 'CLIENT_IDENTIFIER') = 'sitesync' THEN 1 ELSE 0 END); END;",
];

struct OracleSite {
    node: ContainerAsync<Oracle>,
    connect: String,
}

impl OracleSite {
    async fn start() -> OracleSite {
        let node = Oracle::default()
            .with_startup_timeout(Duration::from_secs(600))
            .start()
            .await
            .expect("Oracle Free starts (needs a Docker engine)");
        let mut setup = node
            .exec(
                ExecCommand::new(["bash", "-c", DBA_SETUP])
                    .with_cmd_ready_condition(CmdWaitFor::exit_code(0)),
            )
            .await
            .expect("the DBA set-up runs");
        let out = String::from_utf8_lossy(&setup.stdout_to_vec().await.unwrap()).into_owned();
        assert!(!out.contains("ORA-"), "DBA set-up:\n{out}");
        let host = node.get_host().await.unwrap();
        let port = node.get_host_port_ipv4(1521).await.unwrap();
        let site = OracleSite {
            node,
            connect: format!("//{host}:{port}/FREEPDB1"),
        };
        for ddl in BUSINESS {
            site.sql(ddl, vec![]).await;
        }
        site
    }

    fn url(&self) -> String {
        format!(
            "oracle://test:test@{}",
            self.connect.trim_start_matches("//")
        )
    }

    fn conn(&self) -> oracle::Connection {
        oracle::Connection::connect("test", "test", &self.connect).expect("connect to FREEPDB1")
    }

    /// Runs one statement with text binds and commits.
    async fn sql(&self, sql: &str, binds: Vec<String>) {
        let conn = self.conn();
        let sql = sql.to_string();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&dyn oracle::sql_type::ToSql> = binds
                .iter()
                .map(|b| b as &dyn oracle::sql_type::ToSql)
                .collect();
            conn.execute(&sql, &refs)
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            conn.commit().unwrap();
        })
        .await
        .unwrap();
    }

    /// Every row of a query, its cells as text (NULL as "").
    async fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        let conn = self.conn();
        let sql = sql.to_string();
        tokio::task::spawn_blocking(move || {
            conn.query(&sql, &[])
                .unwrap()
                .map(|r| {
                    let r = r.unwrap();
                    (0..r.sql_values().len())
                        .map(|i| {
                            r.get::<usize, Option<String>>(i)
                                .unwrap()
                                .unwrap_or_default()
                        })
                        .collect()
                })
                .collect()
        })
        .await
        .unwrap()
    }

    async fn count(&self, sql: &str) -> i64 {
        let conn = self.conn();
        let sql = sql.to_string();
        tokio::task::spawn_blocking(move || conn.query_row_as::<i64>(&sql, &[]).unwrap())
            .await
            .unwrap()
    }

    /// An application write at MADRID: the item and its outbox row in one
    /// transaction.
    async fn upsert(&self, id: i32, n: i32) {
        let conn = self.conn();
        tokio::task::spawn_blocking(move || {
            let rev = uuid::Uuid::new_v4().to_string();
            conn.execute(
                "MERGE INTO ITEM t USING (SELECT :1 ID, :2 N, :3 REV FROM DUAL) s ON (t.ID = s.ID) \
                 WHEN MATCHED THEN UPDATE SET t.N = s.N, t.REV = s.REV, t.SITE = 'MADRID' \
                 WHEN NOT MATCHED THEN INSERT (ID, N, REV, SITE) VALUES (s.ID, s.N, s.REV, 'MADRID')",
                &[&id, &n, &rev],
            )
            .unwrap();
            let data = format!(
                "{{\"id\": {id}, \"n\": {n}, \"rev\": \"{rev}\", \"site\": \"MADRID\", \"note\": null}}"
            );
            conn.execute(
                "INSERT INTO OUTBOX (TYPE, ENTITY_KEY, DATA) VALUES ('item.upsert', :1, :2)",
                &[&id.to_string(), &data],
            )
            .unwrap();
            conn.commit().unwrap();
        })
        .await
        .unwrap();
    }

    /// As SYSDBA: switches logs more often than there are online groups
    /// (so the online copies are overwritten too), then deletes every
    /// archived log from disk and from the catalog.
    async fn purge_archived_logs(&self) {
        let script = "sqlplus -s / as sysdba <<'SQL'\nALTER SYSTEM ARCHIVE LOG CURRENT;\nALTER SYSTEM ARCHIVE LOG CURRENT;\nALTER SYSTEM ARCHIVE LOG CURRENT;\nALTER SYSTEM ARCHIVE LOG CURRENT;\nALTER SYSTEM ARCHIVE LOG CURRENT;\nEXIT\nSQL\nrman target / <<'RMAN'\nDELETE NOPROMPT ARCHIVELOG ALL;\nRMAN\n";
        self.node
            .exec(
                ExecCommand::new(["bash", "-c", script])
                    .with_cmd_ready_condition(CmdWaitFor::exit_code(0)),
            )
            .await
            .expect("archived logs deleted");
    }
}

/// The mesh with PARIS and LONDON on PostgreSQL, and MADRID's connector on
/// Oracle (initialised).
async fn three_sites(oracle: &OracleSite) -> (Mesh, std::path::PathBuf) {
    let mesh = Mesh::start(MeshOptions {
        sites: vec!["PARIS", "LONDON"],
        ..MeshOptions::default()
    })
    .await;
    let file = mesh.dir.path().join("madrid.toml");
    std::fs::write(
        &file,
        format!(
            "site = \"MADRID\"\n\n[database]\nkind = \"oracle\"\nurl = \"{}\"\nwindow_min_scn = 100\npoll_interval_ms = 200\n\n[broker]\nurls = [\"{}\"]\ntopology = \"{}\"\n\n[checkpoint]\ndir = \"{}\"\n\n[retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\n[sink]\nbatch_timeout_ms = 20\n{ORACLE_ROUTES}",
            oracle.url(),
            mesh.amqp_url,
            mesh.dir.path().join("topology.toml").display(),
            mesh.dir.path().join("checkpoints").join("madrid").display(),
        ),
    )
    .unwrap();
    let out = run(&file, &["init"]).await;
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&file, &["check"]).await;
    assert!(
        out.status.success(),
        "check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (mesh, file)
}

async fn run(connector: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(binary());
    cmd.args(args).arg("--connector").arg(connector);
    tokio::task::spawn_blocking(move || cmd.output().expect("run sitesync"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a Docker engine to start Oracle Free (gvenzl/oracle-free): run with cargo test --test main oracle -- --ignored"]
async fn an_oracle_site_syncs_with_two_postgres_sites_both_ways() {
    let oracle = OracleSite::start().await;
    let (mesh, madrid) = three_sites(&oracle).await;
    let mut sidecars = mesh.spawn_all();
    let _madrid = Sidecar::spawn(&madrid, mesh.dir.path());
    let paris = mesh.client("PARIS").await;
    for id in 1..=20 {
        upsert(&paris, "PARIS", id, id).await;
        oracle.upsert(100 + id, id).await;
    }
    // MADRID's 20 reach PARIS and LONDON; PARIS's 20 reach LONDON and MADRID.
    mesh.wait_inbox("PARIS", 20, Duration::from_secs(120)).await;
    mesh.wait_inbox("LONDON", 40, Duration::from_secs(120))
        .await;
    wait_for(
        async || {
            oracle
                .count("SELECT COUNT(*) FROM ITEM WHERE SITE = 'PARIS'")
                .await
                == 20
        },
        Duration::from_secs(120),
    )
    .await
    .expect("PARIS's items at MADRID");
    // The sink's writes are marked for the trigger; the app's are not.
    assert_eq!(
        oracle
            .count("SELECT COUNT(*) FROM ITEM_LOG WHERE BY_SINK = 1")
            .await,
        20
    );
    assert_eq!(
        oracle
            .count("SELECT COUNT(*) FROM ITEM_LOG WHERE BY_SINK = 0")
            .await,
        20
    );
    // Every MADRID event went round: its outbox is empty.
    wait_for(
        async || oracle.count("SELECT COUNT(*) FROM OUTBOX").await == 0,
        Duration::from_secs(120),
    )
    .await
    .expect("MADRID's outbox empties as its events come back");
    for s in sidecars.values_mut() {
        s.terminate().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a Docker engine to start Oracle Free (gvenzl/oracle-free): run with cargo test --test main oracle -- --ignored"]
async fn a_kill_9_mid_stream_at_the_oracle_site_loses_and_duplicates_nothing() {
    let oracle = OracleSite::start().await;
    let (mesh, madrid) = three_sites(&oracle).await;
    let _others = mesh.spawn_all();
    let mut sidecar = Sidecar::spawn(&madrid, mesh.dir.path());
    let writer = async {
        for id in 1..=300 {
            oracle.upsert(id, id).await;
        }
    };
    // Mid-stream: once MADRID's first events have reached PARIS, while
    // the writer goes on.
    let killer = async {
        mesh.wait_inbox("PARIS", 50, Duration::from_secs(180)).await;
        sidecar.kill9();
    };
    tokio::join!(writer, killer);
    let _again = Sidecar::spawn(&madrid, mesh.dir.path());
    mesh.wait_inbox("PARIS", 300, Duration::from_secs(180))
        .await;
    mesh.wait_inbox("LONDON", 300, Duration::from_secs(180))
        .await;
    // Every write arrived (the inbox refuses a duplicate id, so count the
    // items: 300, with MADRID's last value each).
    let items = mesh.items("PARIS").await;
    assert_eq!(items.len(), 300);
    assert!(items.iter().all(|(id, n, _)| id == n));
    assert_eq!(mesh.items("LONDON").await.len(), 300);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a Docker engine to start Oracle Free (gvenzl/oracle-free): run with cargo test --test main oracle -- --ignored"]
async fn a_missing_archived_log_stops_the_source_with_the_scn_range() {
    let oracle = OracleSite::start().await;
    let (mesh, madrid) = three_sites(&oracle).await;
    // A first run records a checkpoint, then stops.
    let mut sidecar = Sidecar::spawn(&madrid, mesh.dir.path());
    oracle.upsert(1, 1).await;
    mesh.wait_inbox("PARIS", 1, Duration::from_secs(120)).await;
    sidecar.terminate().await;
    // Writes while it is down, then their redo is archived and deleted.
    for id in 2..=10 {
        oracle.upsert(id, id).await;
    }
    oracle.purge_archived_logs().await;
    for _ in 0..3 {
        oracle.upsert(11, 11).await;
    }
    let mut sidecar = Sidecar::spawn(&madrid, mesh.dir.path());
    let status = sidecar.wait_exit(Duration::from_secs(120)).await;
    assert!(!status.success());
    let log = sidecar.log_text();
    assert!(log.contains("is not available"), "{log}");
    assert!(log.contains("RESTORE ARCHIVELOG FROM SCN"), "{log}");
    assert!(log.contains("checkpoint reset --to-latest"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a Docker engine to start Oracle Free (gvenzl/oracle-free): run with cargo test --test main oracle -- --ignored"]
async fn oracle_capture_triggers_fill_the_outbox_and_skip_the_sink() {
    let oracle = OracleSite::start().await;
    let (mesh, madrid) = three_sites(&oracle).await;
    let out = run(&madrid, &["capture", "add", "--all"]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("capture added"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = run(&madrid, &["capture", "add", "--all"]).await;
    assert!(String::from_utf8_lossy(&again.stdout).contains("capture up to date"));
    let _sidecars = mesh.spawn_all();
    let _madrid = Sidecar::spawn(&madrid, mesh.dir.path());
    // The application writes ITEM only: 10 inserts, an update of them all,
    // two deletes; the trigger writes 22 events.
    for id in 1..=10 {
        oracle
            .sql(
                "INSERT INTO ITEM (ID, N, REV, SITE) VALUES (:1, 0, :2, 'MADRID')",
                vec![id.to_string(), uuid::Uuid::new_v4().to_string()],
            )
            .await;
    }
    oracle.sql("UPDATE ITEM SET N = ID * 10", vec![]).await;
    oracle.sql("DELETE FROM ITEM WHERE ID > 8", vec![]).await;
    let paris = mesh.client("PARIS").await;
    upsert(&paris, "PARIS", 100, 1).await;
    mesh.wait_inbox("PARIS", 22, Duration::from_secs(180)).await;
    mesh.wait_inbox("LONDON", 23, Duration::from_secs(180))
        .await;
    let items = mesh.items("LONDON").await;
    assert_eq!(
        items
            .iter()
            .filter(|(id, _, _)| *id <= 10)
            .map(|(id, n, _)| (*id, *n))
            .collect::<Vec<_>>(),
        (1..=8).map(|id| (id, id * 10)).collect::<Vec<_>>()
    );
    // PARIS's write applied at MADRID by the sink, and not captured back.
    wait_for(
        async || {
            oracle
                .count("SELECT COUNT(*) FROM ITEM WHERE ID = 100")
                .await
                == 1
        },
        Duration::from_secs(120),
    )
    .await
    .expect("PARIS's item at MADRID");
    wait_for(
        async || oracle.count("SELECT COUNT(*) FROM OUTBOX").await == 0,
        Duration::from_secs(120),
    )
    .await
    .expect("MADRID's outbox empties");
    assert_eq!(
        mesh.foreign_inbox("PARIS").await,
        22,
        "no echo of PARIS's event"
    );
    let out = run(&madrid, &["check"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("[ok  ] capture item"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    oracle
        .sql("ALTER TRIGGER SITESYNC_CAP_ITEM DISABLE", vec![])
        .await;
    let out = run(&madrid, &["check"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("trigger SITESYNC_CAP_ITEM is disabled"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a Docker engine to start Oracle Free (gvenzl/oracle-free): run with cargo test --test main oracle -- --ignored"]
async fn oracle_purge_removes_the_old_inbox_rows_and_records_the_job() {
    let oracle = OracleSite::start().await;
    // `three_sites` runs init and a passing check (SITESYNC_JOBS and
    // SITESYNC_CONFLICTS.REVIEWED_AT included).
    let (mesh, madrid) = three_sites(&oracle).await;
    let mut sidecars = mesh.spawn_all();
    let mut sidecar = Sidecar::spawn(&madrid, mesh.dir.path());
    let paris = mesh.client("PARIS").await;
    for id in 1..=20 {
        upsert(&paris, "PARIS", id, id).await;
    }
    wait_for(
        async || oracle.count("SELECT COUNT(*) FROM SITESYNC_INBOX").await == 20,
        Duration::from_secs(120),
    )
    .await
    .expect("MADRID applies PARIS's 20");
    // Eight of them settled 40 days ago (inbox retention: 30 by default).
    oracle
        .sql(
            "UPDATE SITESYNC_INBOX SET APPLIED_AT = SYSTIMESTAMP - INTERVAL '40' DAY WHERE ROWNUM <= 8",
            vec![],
        )
        .await;
    let text = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dry = text(run(&madrid, &["purge", "--dry-run"]).await);
    assert!(
        dry.contains(&format!("  {:<32} {:>10}", "SITESYNC_INBOX", 8)),
        "{dry}"
    );
    let out = text(run(&madrid, &["purge", "--yes"]).await);
    assert!(out.contains("deleted 8 row(s): SITESYNC_INBOX 8"), "{out}");
    assert_eq!(
        oracle.count("SELECT COUNT(*) FROM SITESYNC_INBOX").await,
        12
    );
    let jobs: serde_json::Value =
        serde_json::from_str(&text(run(&madrid, &["jobs", "--json"]).await)).unwrap();
    assert_eq!(jobs[0]["kind"], "purge");
    assert_eq!(jobs[0]["state"], "succeeded");
    assert_eq!(jobs[0]["done"], 8);
    // The dry run is not in the audit trail (SITESYNC_AUDIT, made by
    // init); the purge is, and a review of a conflict that is not there
    // is, failed.
    let review = run(&madrid, &["conflicts", "review", "31337"]).await;
    assert_eq!(review.status.code(), Some(1));
    let audit: serde_json::Value =
        serde_json::from_str(&text(run(&madrid, &["audit", "--json"]).await)).unwrap();
    let audit = audit.as_array().unwrap();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(
        (&audit[0]["action"], &audit[0]["result"]),
        (
            &serde_json::json!("conflicts review"),
            &serde_json::json!("failed")
        )
    );
    assert_eq!(audit[0]["arguments"]["ids"], serde_json::json!([31337]));
    assert_eq!(
        (&audit[1]["action"], &audit[1]["result"]),
        (&serde_json::json!("purge"), &serde_json::json!("ok"))
    );
    assert!(
        audit[1]["detail"]
            .as_str()
            .unwrap()
            .starts_with("deleted 8 row(s)"),
        "{}",
        audit[1]
    );
    assert_eq!(audit[1]["who"], sitesync::audit::who().as_str());
    sidecar.terminate().await;
    for s in sidecars.values_mut() {
        s.terminate().await;
    }
}

/// `sitesync resync` from the Oracle site to a PostgreSQL one: 300 rows
/// of MADRID's (270 older than sitesync, with no version; 30 written
/// there by PARIS's events) to LONDON, whose queue lost PARIS's events.
/// The rows arrive as MADRID holds them, each under the version MADRID
/// holds (the time and id of the event that wrote it; the Unix epoch for
/// the older rows), and a second job of the same table is refused while
/// the first one runs (its DBMS_LOCK lock).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a Docker engine to start Oracle Free (gvenzl/oracle-free): run with cargo test --test main oracle -- --ignored"]
async fn oracle_resync_sends_the_rows_under_their_versions_and_refuses_a_second_job() {
    let oracle = OracleSite::start().await;
    let (mesh, madrid) = three_sites(&oracle).await;
    oracle
        .sql(
            "INSERT INTO ITEM (ID, N, REV, SITE) SELECT LEVEL - 1, MOD(LEVEL - 1, 1000), \
             LOWER(REGEXP_REPLACE(RAWTOHEX(SYS_GUID()), '(.{8})(.{4})(.{4})(.{4})(.{12})', '\\1-\\2-\\3-\\4-\\5')), 'OLD' \
             FROM DUAL CONNECT BY LEVEL <= 300",
            vec![],
        )
        .await;
    let mut sidecars = std::collections::BTreeMap::new();
    sidecars.insert("PARIS", mesh.spawn("PARIS"));
    sidecars.insert("MADRID", Sidecar::spawn(&madrid, mesh.dir.path()));
    let paris = mesh.client("PARIS").await;
    for id in 0..30 {
        upsert(&paris, "PARIS", id, 1000 + id).await;
    }
    wait_for(
        async || {
            oracle
                .count("SELECT COUNT(*) FROM ITEM WHERE SITE = 'PARIS'")
                .await
                == 30
        },
        Duration::from_secs(120),
    )
    .await
    .expect("MADRID applies PARIS's 30");
    // LONDON gets MADRID's rows from the snapshot only.
    let conn = crate::support::rabbit::connect(&mesh.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_purge(
        mesh.names.site("LONDON").as_str().into(),
        QueuePurgeOptions::default(),
    )
    .await
    .unwrap();
    sidecars.insert("LONDON", mesh.spawn("LONDON"));

    // A paced job (about 5 s), as a process of its own.
    let child = Command::new(binary())
        .args([
            "resync",
            "--to-site",
            "LONDON",
            "--all",
            "--yes",
            "--rate",
            "60",
        ])
        .arg("--connector")
        .arg(&madrid)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        async || {
            oracle
                .count("SELECT COUNT(*) FROM USER_TABLES WHERE TABLE_NAME = 'SITESYNC_RESYNC'")
                .await
                == 1
        },
        Duration::from_secs(60),
    )
    .await
    .expect("the job's table");
    wait_for(
        async || {
            oracle
                .count("SELECT NVL(MAX(CONFIRMED), 0) FROM SITESYNC_RESYNC WHERE JOB = 1")
                .await
                > 0
        },
        Duration::from_secs(60),
    )
    .await
    .expect("the job confirms rows");
    // While it runs, a second job of the same table is refused.
    let busy = run(
        &madrid,
        &[
            "resync",
            "--to-site",
            "LONDON",
            "--route",
            "item.upsert",
            "--yes",
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&busy.stderr);
    assert!(!busy.status.success(), "{text}");
    assert!(text.contains("by job 1 (running now)"), "{text}");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        oracle
            .count("SELECT COUNT(*) FROM SITESYNC_RESYNC WHERE JOB = 1 AND RESULT = 'done' AND CONFIRMED = 300")
            .await,
        1
    );
    assert_eq!(
        oracle
            .count("SELECT COUNT(*) FROM SITESYNC_RESYNC_LOCKS")
            .await,
        0,
        "the finished job freed its table"
    );

    // Every row arrives as MADRID holds it.
    let rows: Vec<(i32, i32)> = oracle
        .rows("SELECT ID, N FROM ITEM ORDER BY ID")
        .await
        .iter()
        .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
        .collect();
    assert_eq!(rows.len(), 300);
    let mut last = 0;
    wait_for(
        async || {
            let london = mesh.items("LONDON").await;
            last = london.len();
            london
                .iter()
                .map(|(id, n, _)| (*id, *n))
                .collect::<Vec<_>>()
                == rows
        },
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("LONDON holds {last} of MADRID's 300 rows: {e}"));
    // Under MADRID's versions: the time and id of the event that wrote
    // each row there, and the epoch for a row no event wrote.
    let source: HashMap<String, (String, String)> = oracle
        .rows("SELECT KEY, LOWER(EVENT_ID), TO_CHAR(TS AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6') FROM SITESYNC_VERSIONS")
        .await
        .into_iter()
        .map(|r| (r[0].clone(), (r[1].clone(), r[2].clone())))
        .collect();
    assert_eq!(source.len(), 30);
    let london: HashMap<String, (String, String)> = mesh
        .client("LONDON")
        .await
        .query(
            "SELECT key, event_id::text, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') FROM sitesync_versions",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(london.len(), 300);
    for (key, v) in &london {
        match source.get(key) {
            Some(s) => assert_eq!(s, v, "key {key}"),
            None => assert_eq!(
                v.1, "1970-01-01T00:00:00.000000",
                "key {key}: no version at MADRID"
            ),
        }
    }
    for s in sidecars.values_mut() {
        s.terminate().await;
    }
}
