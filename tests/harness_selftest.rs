//! Tests of the integration-test harness itself (`tests/support/`), against
//! real servers: if these fail, failures of the connector's integration tests
//! say nothing about the connector.

mod support;

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use mysql_async::prelude::Queryable;

use support::mariadb::MariaDb;
use support::pg::PgCluster;
use support::rabbit::{self, PrivateRabbit};
use support::{TestDir, process_alive, wait_for, wait_for_value};

#[tokio::test]
async fn pg_cluster_starts_with_logical_replication_settings() {
    let pg = PgCluster::start().await;
    let client = pg.client("postgres").await;

    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    for (setting, expected) in [
        ("wal_level", "logical"),
        ("fsync", "on"),
        ("max_replication_slots", "20"),
        ("max_wal_senders", "20"),
        ("wal_sender_timeout", "1min"),
        ("listen_addresses", "127.0.0.1"),
        ("port", &pg.port().to_string()),
        ("server_encoding", "UTF8"),
    ] {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), expected, "SHOW {setting}");
    }
    assert!(
        pg.url("postgres")
            .ends_with(&format!("127.0.0.1:{}/postgres", pg.port()))
    );
    assert!(pg.log_path().exists(), "server log file exists");

    pg.create_database("app").await;
    let app = pg.client("app").await;
    let db: String = app
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "app");

    // Logical replication is usable: a slot with the built-in output plugin.
    app.batch_execute("SELECT pg_create_logical_replication_slot('selftest', 'pgoutput')")
        .await
        .unwrap();
}

#[tokio::test]
async fn pg_committed_row_survives_immediate_stop() {
    let pg = PgCluster::start().await;
    pg.create_database("app").await;
    let port = pg.port();
    {
        let client = pg.client("app").await;
        client
            .batch_execute(
                "CREATE TABLE t (id int PRIMARY KEY, v text);
                 INSERT INTO t VALUES (1, 'committed');",
            )
            .await
            .unwrap();
    }

    let began = Instant::now();
    pg.stop_immediate().await;
    assert!(!pg.is_running());
    assert!(
        pg.try_client("app").await.is_err(),
        "server must be down after stop_immediate"
    );
    pg.start_again().await;
    eprintln!("crash + restart took {:?}", began.elapsed());
    assert_eq!(pg.port(), port, "same port after start_again");

    let client = pg.client("app").await;
    let v: String = client
        .query_one("SELECT v FROM t WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "committed");

    // And a clean restart works too.
    client
        .batch_execute("INSERT INTO t VALUES (2, 'second')")
        .await
        .unwrap();
    pg.restart().await;
    let client = pg.client("app").await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test]
async fn two_pg_clusters_run_side_by_side() {
    let (a, b) = tokio::join!(PgCluster::start(), PgCluster::start());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());

    let ca = a.client("postgres").await;
    let cb = b.client("postgres").await;
    ca.batch_execute("CREATE TABLE only_in_a (x int)")
        .await
        .unwrap();
    let in_b: bool = cb
        .query_one("SELECT to_regclass('only_in_a') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_b, "clusters must not share data");

    // Each cluster has its own identity (initdb per cluster, no template copy).
    let sysid = async |c: &tokio_postgres::Client| -> i64 {
        c.query_one("SELECT system_identifier FROM pg_control_system()", &[])
            .await
            .unwrap()
            .get(0)
    };
    assert_ne!(sysid(&ca).await, sysid(&cb).await);

    // Crashing one leaves the other alone.
    a.stop_immediate().await;
    let one: i32 = cb.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// `SELECT @@gtid_binlog_pos` and the binary logs with their sizes.
async fn binlog_state(db: &MariaDb) -> (String, Vec<(String, u64)>) {
    let pos = db.sql("SELECT @@gtid_binlog_pos").await.trim().to_string();
    let logs = db
        .sql("SHOW BINARY LOGS")
        .await
        .lines()
        .map(|l| {
            let (name, size) = l.split_once('\t').expect("name<TAB>size");
            (name.to_string(), size.parse().expect("a size"))
        })
        .collect();
    (pos, logs)
}

#[tokio::test]
async fn mariadb_server_starts_with_row_binlog_settings() {
    let began = Instant::now();
    let db = MariaDb::start().await;
    eprintln!("MariaDB start took {:?}", began.elapsed());
    assert_ne!(db.port(), 3306, "never the machine's server");
    assert_eq!(
        db.url("app"),
        format!("mysql://root@127.0.0.1:{}/app", db.port())
    );

    let settings = db
        .sql(
            "SELECT @@log_bin, @@binlog_format, @@binlog_row_image, @@binlog_row_metadata, \
             @@port, @@bind_address, @@server_id, @@gtid_domain_id, @@skip_name_resolve, \
             @@datadir",
        )
        .await;
    let expected = format!(
        "1\tROW\tFULL\tFULL\t{}\t127.0.0.1\t{}\t0\t1\t{}/\n",
        db.port(),
        db.server().server_id(),
        db.data_dir().display()
    );
    assert_eq!(settings, expected);

    db.create_database("app").await;
    db.create_user("reader", "s3cret", "SELECT, REPLICATION SLAVE", "*.*")
        .await;
    assert_eq!(
        db.sql("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = 'app'")
            .await,
        "app\n"
    );
    let grants = db.sql("SHOW GRANTS FOR 'reader'@'127.0.0.1'").await;
    assert!(
        grants.contains("GRANT SELECT, REPLICATION SLAVE ON *.* TO `reader`@`127.0.0.1`")
            && grants.contains("IDENTIFIED BY PASSWORD"),
        "{grants}"
    );
    // The user logs in with its password, and not without it.
    let as_reader = |password: &str| {
        mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(db.port())
            .user(Some("reader"))
            .pass(Some(password))
            .db_name(Some("app"))
    };
    let mut conn = mysql_async::Conn::new(as_reader("s3cret")).await.unwrap();
    let me: Option<String> = conn.query_first("SELECT CURRENT_USER()").await.unwrap();
    assert_eq!(me.as_deref(), Some("reader@127.0.0.1"));
    conn.disconnect().await.unwrap();
    match mysql_async::Conn::new(as_reader("wrong")).await {
        Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1045, "{e}"),
        other => panic!("a wrong password must be refused with 1045: {other:?}"),
    }
}

#[tokio::test]
async fn mariadb_binlog_moves_and_data_survives_restart_and_kill() {
    let db = MariaDb::start().await;
    db.create_database("app").await;
    db.sql("CREATE TABLE app.t (id INT PRIMARY KEY, v TEXT)")
        .await;
    let (pos_before, logs_before) = binlog_state(&db).await;
    db.sql("INSERT INTO app.t VALUES (1, 'committed')").await;
    let (pos_after, logs_after) = binlog_state(&db).await;
    let sid = db.server().server_id();
    // Three transactions, in domain 0: CREATE DATABASE, CREATE TABLE, INSERT.
    assert_eq!(pos_before, format!("0-{sid}-2"));
    assert_eq!(pos_after, format!("0-{sid}-3"));
    assert_eq!(logs_after.len(), 1, "{logs_after:?}");
    assert_eq!(logs_after[0].0, "mysql-bin.000001");
    assert!(
        logs_after[0].1 > logs_before[0].1,
        "{logs_before:?} {logs_after:?}"
    );

    // A clean restart: same port, the data and the GTID state kept, a new
    // binary log.
    let pid = db.server().pid().expect("runs");
    let began = Instant::now();
    db.restart().await;
    eprintln!("MariaDB restart took {:?}", began.elapsed());
    assert!(!process_alive(pid as i32), "the old server exited");
    assert_eq!(
        db.sql("SELECT v FROM app.t WHERE id = 1").await,
        "committed\n"
    );
    let (pos, logs) = binlog_state(&db).await;
    assert_eq!(pos, format!("0-{sid}-3"));
    assert_eq!(logs.len(), 2, "{logs:?}");

    // SIGKILL: a committed row survives crash recovery.
    db.sql("INSERT INTO app.t VALUES (2, 'before the kill')")
        .await;
    let pid = db.server().pid().expect("runs");
    db.kill9().await;
    assert!(!process_alive(pid as i32), "killed");
    assert!(!db.server().running());
    assert!(
        db.server().sql("SELECT 1").await.is_err(),
        "down after kill9"
    );
    db.start_again().await;
    assert_eq!(db.sql("SELECT count(*) FROM app.t").await, "2\n");
    assert_eq!(binlog_state(&db).await.0, format!("0-{sid}-4"));

    // Dropping the handle kills the server and removes its directory.
    let pid = db.server().pid().expect("runs");
    let dir = db.server().dir().to_path_buf();
    drop(db);
    assert!(!process_alive(pid as i32), "drop kills the server");
    assert!(!dir.exists() || support::keep_dirs());
}

#[tokio::test]
async fn two_mariadb_servers_run_side_by_side() {
    let (a, b) = tokio::join!(MariaDb::start(), MariaDb::start());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.server().server_id(), b.server().server_id());
    a.sql("CREATE DATABASE only_in_a").await;
    assert_eq!(
        b.sql("SELECT count(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = 'only_in_a'")
            .await,
        "0\n",
        "servers must not share data"
    );
    a.kill9().await;
    assert_eq!(b.sql("SELECT 1").await, "1\n");
}

/// Declares a durable quorum queue and publishes one persistent message with
/// publisher confirms.
async fn publish_to_quorum_queue(url: &str, queue: &str, body: &[u8]) {
    let conn = rabbit::connect(url).await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "publish confirmed");
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn private_rabbit_keeps_quorum_queue_messages_across_restarts() {
    let began = Instant::now();
    let node = PrivateRabbit::start().await;
    eprintln!("private node boot took {:?}", began.elapsed());
    let url = node.amqp_url();
    assert_ne!(node.amqp_port(), 5672);
    assert!(node.is_running());

    let queue = rabbit::unique_names("q");
    assert_eq!(rabbit::queue_len(&url, &queue).await, None);
    publish_to_quorum_queue(&url, &queue, b"first").await;
    assert_eq!(rabbit::queue_len(&url, &queue).await, Some(1));

    // The CLI reaches the node (same cookie) and sees a quorum queue.  (Its
    // message counts lag: quorum queue metrics are emitted periodically.)
    let out = node.rabbitmqctl(&["list_queues", "name", "type"]).await;
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "rabbitmqctl list_queues: {out:?}");
    assert!(
        listing
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [queue.as_str(), "quorum"]),
        "{listing}"
    );

    // Graceful stop and start.
    let began = Instant::now();
    node.stop().await;
    eprintln!("private node stop took {:?}", began.elapsed());
    assert!(!node.is_running());
    assert!(
        rabbit::try_connect(&url).await.is_err(),
        "node must be down after stop"
    );
    assert!(
        rabbit::try_queue_len(&url, &queue).await.is_err(),
        "try_queue_len reports an unreachable broker as an error, not as a missing queue"
    );
    let began = Instant::now();
    node.start_again().await;
    eprintln!("private node restart took {:?}", began.elapsed());
    assert_eq!(node.amqp_url(), url, "same URL after start_again");
    // Quorum queues recover asynchronously after boot.
    let url_ref = url.as_str();
    let queue_ref = queue.as_str();
    wait_for(
        async || rabbit::queue_len(url_ref, queue_ref).await == Some(1),
        Duration::from_secs(30),
    )
    .await
    .expect("message still in the quorum queue after stop/start_again");

    // Crash (SIGKILL) and start: the confirmed message survives too.
    publish_to_quorum_queue(&url, &queue, b"second").await;
    node.kill().await;
    assert!(!node.is_running());
    node.start_again().await;

    let got = rabbit::drain(&url, &queue, 2, Duration::from_secs(30)).await;
    let bodies: Vec<&[u8]> = got.iter().map(|d| d.data.as_slice()).collect();
    assert_eq!(bodies, vec![&b"first"[..], &b"second"[..]]);
    assert_eq!(*got[0].properties.delivery_mode(), Some(2));
    assert_eq!(rabbit::queue_len(&url, &queue).await, Some(0));
}

#[tokio::test]
async fn shared_broker_helpers() {
    let url = rabbit::shared_amqp_url();
    let queue = rabbit::unique_names("t");
    assert_eq!(queue.len(), 9);
    assert_ne!(queue, rabbit::unique_names("t"));

    assert_eq!(
        rabbit::queue_len(&url, &queue).await,
        None,
        "missing queue reports None"
    );

    // A classic, non-durable queue: the shared broker keeps nothing behind.
    let conn = rabbit::connect(&url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for i in 0..3u8 {
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &[i],
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let (u, q) = (url.as_str(), queue.as_str());
    wait_for(
        async || rabbit::queue_len(u, q).await == Some(3),
        Duration::from_secs(10),
    )
    .await
    .expect("three messages queued");

    // drain stops at `expected` and leaves the rest in the queue.
    let first = rabbit::drain(&url, &queue, 2, Duration::from_secs(10)).await;
    assert_eq!(
        first.iter().map(|d| d.data.clone()).collect::<Vec<_>>(),
        vec![vec![0], vec![1]]
    );
    // drain returns what arrived when the timeout passes first.
    let rest = rabbit::drain(&url, &queue, 5, Duration::from_millis(500)).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].data, vec![2]);

    rabbit::delete_queues(&url, &[&queue]).await;
    assert_eq!(rabbit::queue_len(&url, &queue).await, None);
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn wait_for_polls_until_true_or_times_out() {
    let began = Instant::now();
    let mut calls = 0;
    wait_for(
        async || {
            calls += 1;
            calls == 4
        },
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(calls, 4);
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "backoff starts small"
    );

    let err = wait_for(async || false, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.contains("not met"), "{err}");

    // A condition that hangs is cut off at the deadline.
    let began = Instant::now();
    let err = wait_for(
        async || {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            true
        },
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(5), "{err}");

    // Plain closures returning futures work too (`move` to own captures).
    let target = String::from("x");
    wait_for(
        move || {
            let target = target.clone();
            async move { target == "x" }
        },
        Duration::from_secs(1),
    )
    .await
    .unwrap();

    let v = wait_for_value(async || Some(42), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(v, 42);
}

#[test]
fn test_dir_is_removed_on_drop() {
    let dir = TestDir::new("sstest-").unwrap();
    let path = dir.path().to_path_buf();
    assert!(path.starts_with("/tmp"));
    std::fs::write(path.join("file"), b"x").unwrap();
    let kept = dir.kept();
    drop(dir);
    assert_eq!(path.exists(), kept);
}
