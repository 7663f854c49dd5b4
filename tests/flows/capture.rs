//! Capture by generated triggers: the applications write only their
//! business tables, and `sitesync capture` triggers fill the outbox.
//! PARIS and MADRID on PostgreSQL (the mesh's private cluster), LONDON on
//! a private MariaDB server; `customer` and `orders` captured everywhere,
//! LONDON's routes with a rename, a dropped field and a constant of its
//! own.

use crate::support::mariadb::MariaDb;
use crate::support::mesh::{Mesh, MeshOptions};
use crate::support::sidecar::{Sidecar, init_with, sitesync_with};
use crate::support::wait_for;
use mysql_async::Conn;
use mysql_async::prelude::Queryable;
use sitesync::config::{Operation, Route};
use sitesync::sink::mapping::map_row;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::Client;

/// PostgreSQL's business tables, a log of every customer write (by the
/// sink or not) and, once the outbox exists, a log of every outbox insert.
const PG_BUSINESS: &str = r#"
CREATE TABLE customer (id int PRIMARY KEY, name text NOT NULL, email text, balance numeric(12,2), updated timestamptz);
CREATE TABLE orders (region text NOT NULL, no int NOT NULL, customer_id int NOT NULL, total numeric(12,2) NOT NULL,
                     PRIMARY KEY (region, no));
CREATE TABLE customer_log (seq bigserial PRIMARY KEY, id int NOT NULL, op text NOT NULL, by_sink boolean NOT NULL);
CREATE FUNCTION log_customer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO customer_log (id, op, by_sink)
    VALUES (CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END, TG_OP,
            coalesce(current_setting('sitesync.applying', true) = 'on', false));
    RETURN NULL;
END $$;
CREATE TRIGGER customer_log AFTER INSERT OR UPDATE OR DELETE ON customer FOR EACH ROW EXECUTE FUNCTION log_customer();
CREATE TABLE outbox_log (seq bigserial PRIMARY KEY, type text NOT NULL, entity_key text, by_sink boolean NOT NULL);
CREATE FUNCTION log_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_log (type, entity_key, by_sink)
    VALUES (NEW.type, NEW.entity_key, coalesce(current_setting('sitesync.applying', true) = 'on', false));
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_log AFTER INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION log_outbox();
"#;

const PG_ROUTES: &str = r#"
[[sink.routes]]
type = "customer.upsert"
table = "public.customer"
key = ["id"]
operation = "upsert"

[[sink.routes]]
type = "customer.delete"
table = "public.customer"
key = ["id"]
operation = "delete"

[[sink.routes]]
type = "orders.upsert"
table = "public.orders"
key = ["region", "no"]
operation = "upsert"
rename = { customer = "customer_id" }

[[sink.routes]]
type = "orders.delete"
table = "public.orders"
key = ["region", "no"]
operation = "delete"
"#;

/// LONDON's tables: `local_note` is LONDON's own (its field is dropped),
/// `via` is set by the sink (a constant), the order's customer is `cust`.
const MARIA_BUSINESS: &[&str] = &[
    "CREATE TABLE customer (id int PRIMARY KEY, name varchar(100) NOT NULL, email varchar(200) NULL, balance decimal(12,2) NULL, \
     updated timestamp(6) NULL DEFAULT NULL, local_note varchar(50) NULL, via varchar(10) NOT NULL DEFAULT 'app') ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE orders (region varchar(50) NOT NULL, no int NOT NULL, cust int NOT NULL, total decimal(12,2) NOT NULL, \
     PRIMARY KEY (region, no)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE customer_log (seq bigint AUTO_INCREMENT PRIMARY KEY, id int NOT NULL, op varchar(8) NOT NULL, by_sink bool NOT NULL) ENGINE=InnoDB",
    "CREATE TRIGGER customer_log_ins AFTER INSERT ON customer FOR EACH ROW INSERT INTO customer_log (id, op, by_sink) VALUES (NEW.id, 'INSERT', IFNULL(@sitesync_applying = 1, 0))",
    "CREATE TRIGGER customer_log_upd AFTER UPDATE ON customer FOR EACH ROW INSERT INTO customer_log (id, op, by_sink) VALUES (NEW.id, 'UPDATE', IFNULL(@sitesync_applying = 1, 0))",
    "CREATE TRIGGER customer_log_del AFTER DELETE ON customer FOR EACH ROW INSERT INTO customer_log (id, op, by_sink) VALUES (OLD.id, 'DELETE', IFNULL(@sitesync_applying = 1, 0))",
];

const MARIA_ROUTES: &str = r#"
[[sink.routes]]
type = "customer.upsert"
table = "customer"
key = ["id"]
operation = "upsert"
drop = ["local_note"]
constants = { via = "sync" }
capture = true

[[sink.routes]]
type = "customer.delete"
table = "customer"
key = ["id"]
operation = "delete"

[[sink.routes]]
type = "orders.upsert"
table = "orders"
key = ["region", "no"]
operation = "upsert"
rename = { customer = "cust" }
capture = true

[[sink.routes]]
type = "orders.delete"
table = "orders"
key = ["region", "no"]
operation = "delete"
"#;

/// The outbox log needs the outbox, which `init` creates.
const MARIA_OUTBOX_LOG: &[&str] = &[
    "CREATE TABLE outbox_log (seq bigint AUTO_INCREMENT PRIMARY KEY, type varchar(200) NOT NULL, entity_key varchar(450) NULL, by_sink bool NOT NULL) ENGINE=InnoDB",
    "CREATE TRIGGER outbox_log AFTER INSERT ON outbox FOR EACH ROW INSERT INTO outbox_log (type, entity_key, by_sink) VALUES (NEW.type, NEW.entity_key, IFNULL(@sitesync_applying = 1, 0))",
];

/// Three sites with capture on, the sidecars not started yet.
struct Sites {
    mesh: Mesh,
    maria: MariaDb,
    london: PathBuf,
}

impl Sites {
    async fn start() -> Sites {
        let mesh = Mesh::start(MeshOptions {
            sites: vec!["PARIS", "MADRID"],
            routes: PG_ROUTES.into(),
            ..MeshOptions::default()
        })
        .await;
        for site in ["PARIS", "MADRID"] {
            mesh.client(site)
                .await
                .batch_execute(PG_BUSINESS)
                .await
                .unwrap();
        }
        let maria = MariaDb::start().await;
        maria.create_database("london").await;
        let mut c = maria.conn(Some("london")).await;
        for sql in MARIA_BUSINESS {
            c.query_drop(*sql).await.unwrap();
        }
        let london = mesh.dir.path().join("london.toml");
        std::fs::write(
            &london,
            format!(
                "site = \"LONDON\"\n\n[database]\nkind = \"mariadb\"\nurl = \"{}\"\n\n[broker]\nmanagement_url = \"http://127.0.0.1:15672\"\nurls = [\"{}\"]\ntopology = \"{}\"\ntopology_check_interval_ms = 500\n\n[checkpoint]\ndir = \"{}\"\n\n[retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\n[sink]\nbatch_timeout_ms = 20\n{MARIA_ROUTES}",
                maria.url("london"),
                mesh.amqp_url,
                mesh.dir.path().join("topology.toml").display(),
                mesh.dir.path().join("checkpoints").join("london").display(),
            ),
        )
        .unwrap();
        // `capture = true`: init installs LONDON's triggers.
        init_with(&london);
        for sql in MARIA_OUTBOX_LOG {
            c.query_drop(*sql).await.unwrap();
        }
        Sites {
            mesh,
            maria,
            london,
        }
    }

    async fn london(&self) -> Conn {
        self.maria.conn(Some("london")).await
    }

    fn spawn_london(&self) -> Sidecar {
        Sidecar::spawn(&self.london, self.mesh.dir.path())
    }
}

fn stdout(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A route as the connector files write it, for reading the outbox back.
fn route(kind: &str, key: &[&str], rename: &[(&str, &str)], op: Operation) -> Route {
    Route {
        kind: kind.into(),
        table: "t".into(),
        key: key.iter().map(|k| k.to_string()).collect(),
        operation: op,
        rename: rename
            .iter()
            .map(|(f, c)| (f.to_string(), c.to_string()))
            .collect(),
        drop: vec![],
        constants: BTreeMap::new(),
    }
}

/// Customers as `(id, name, email, balance, updated µs)`, whatever the engine.
type Customer = (i32, String, Option<String>, Option<String>, Option<i64>);
/// Orders as `(region, no, customer, total)`.
type Order = (String, i32, i32, String);

async fn pg_state(c: &Client) -> (Vec<Customer>, Vec<Order>) {
    let customers = c
        .query(
            "SELECT id, name, email, balance::text, (extract(epoch FROM updated) * 1000000)::bigint FROM customer ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let orders = c
        .query(
            "SELECT region, no, customer_id, total::text FROM orders ORDER BY region COLLATE \"C\", no",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    (customers, orders)
}

async fn maria_state(c: &mut Conn) -> (Vec<Customer>, Vec<Order>) {
    let customers = c
        .query(
            "SELECT id, name, email, CAST(balance AS CHAR), CAST(UNIX_TIMESTAMP(updated) * 1000000 AS SIGNED) FROM customer ORDER BY id",
        )
        .await
        .unwrap();
    let orders = c
        .query("SELECT region, no, cust, CAST(total AS CHAR) FROM orders ORDER BY CAST(region AS BINARY), no")
        .await
        .unwrap();
    (customers, orders)
}

async fn pg_count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

async fn maria_count(c: &mut Conn, sql: &str) -> i64 {
    c.query_first::<i64, _>(sql).await.unwrap().unwrap_or(0)
}

/// Waits until every site holds the same rows, `customers` of them, and
/// every outbox is empty.
async fn wait_converged(s: &Sites, customers: usize, sidecars: &[&Sidecar], timeout: Duration) {
    let paris = s.mesh.client("PARIS").await;
    let madrid = s.mesh.client("MADRID").await;
    let mut l = s.london().await;
    let mut last = String::new();
    let r = wait_for(
        async || {
            let p = pg_state(&paris).await;
            let m = pg_state(&madrid).await;
            let lo = maria_state(&mut l).await;
            let outboxes = pg_count(&paris, "SELECT count(*) FROM outbox").await
                + pg_count(&madrid, "SELECT count(*) FROM outbox").await
                + maria_count(&mut l, "SELECT COUNT(*) FROM outbox").await;
            last = format!(
                "customers PARIS {} MADRID {} LONDON {}; orders {} {} {}; outboxes {outboxes}",
                p.0.len(),
                m.0.len(),
                lo.0.len(),
                p.1.len(),
                m.1.len(),
                lo.1.len()
            );
            p.0.len() == customers && p == m && p == lo && outboxes == 0
        },
        timeout,
    )
    .await;
    if let Err(e) = r {
        let logs: Vec<String> = sidecars.iter().map(|s| s.log_tail()).collect();
        let p = pg_state(&paris).await;
        let lo = maria_state(&mut l).await;
        let diff: Vec<_> = p.0.iter().filter(|c| !lo.0.contains(c)).take(5).collect();
        panic!(
            "not converged: {e}\n{last}\nPARIS rows not at LONDON: {diff:?}\nLONDON not at PARIS: {:?}\n{}",
            lo.0.iter()
                .filter(|c| !p.0.contains(c))
                .take(5)
                .collect::<Vec<_>>(),
            logs.join("\n---\n")
        );
    }
}

#[tokio::test]
async fn captured_tables_converge_exactly_once_without_echo() {
    let s = Sites::start().await;
    let mesh = &s.mesh;
    // --dry-run shows the SQL and changes nothing.
    let dry = mesh
        .ok("PARIS", &["capture", "add", "--all", "--dry-run"])
        .await;
    assert!(
        dry.contains("REFERENCING NEW TABLE AS sitesync_new FOR EACH STATEMENT")
            && dry.contains("current_setting('sitesync.applying', true) = 'on'"),
        "{dry}"
    );
    let list = mesh.ok("PARIS", &["capture", "list"]).await;
    assert!(list.contains("not captured"), "{list}");
    // PARIS by route, MADRID with --all; a second run changes nothing.
    let added = mesh
        .ok(
            "PARIS",
            &[
                "capture",
                "add",
                "--route",
                "customer.upsert",
                "--route",
                "orders.delete",
            ],
        )
        .await;
    assert!(added.contains("public.customer: capture added"), "{added}");
    assert!(added.contains("public.orders: capture added"), "{added}");
    mesh.ok("MADRID", &["capture", "add", "--all"]).await;
    let again = mesh.ok("MADRID", &["capture", "add", "--all"]).await;
    assert_eq!(again.matches("capture up to date").count(), 2, "{again}");
    let list = mesh.ok("PARIS", &["capture", "list"]).await;
    assert_eq!(list.matches("captured, up to date").count(), 2, "{list}");
    let l_list = stdout(&sitesync_with(&s.london, &["capture", "list"]));
    assert_eq!(l_list.matches("(capture = true)").count(), 2, "{l_list}");
    assert_eq!(
        l_list.matches("captured, up to date").count(),
        2,
        "{l_list}"
    );

    let paris = mesh.client("PARIS").await;
    let madrid = mesh.client("MADRID").await;
    let mut london = s.london().await;
    let mut events: BTreeMap<&str, i64> = BTreeMap::new();

    // Before any sidecar runs: the outbox rows the triggers wrote carry
    // what the routes map back to the rows, under the sink's entity keys.
    paris
        .batch_execute(
            "INSERT INTO customer VALUES (1, 'Ada', 'ada@paris', 10.50, '2026-01-02 03:04:05.123456+02');
             INSERT INTO orders VALUES ('north,east\\', 1, 1, 99.90);",
        )
        .await
        .unwrap();
    // A TIMESTAMP is written in the session's zone and published in UTC.
    london.query_drop("SET time_zone = '+01:00'").await.unwrap();
    london
        .query_drop(
            "INSERT INTO customer (id, name, email, balance, updated, local_note) VALUES (101, 'Bo', NULL, 7, '2026-03-04 05:06:07.5', 'mine')",
        )
        .await
        .unwrap();
    london
        .query_drop("INSERT INTO orders VALUES ('west,1', 1, 101, 5.00)")
        .await
        .unwrap();
    *events.entry("PARIS").or_default() += 2;
    *events.entry("LONDON").or_default() += 2;
    let customer = route("customer.upsert", &["id"], &[], Operation::Upsert);
    let pg_orders = route(
        "orders.upsert",
        &["region", "no"],
        &[("customer", "customer_id")],
        Operation::Upsert,
    );
    let rows = paris
        .query(
            "SELECT type, entity_key, data::text FROM outbox ORDER BY created_at, type",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let (kind, key, data): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let data: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&data).unwrap();
        let route = if kind == "customer.upsert" {
            &customer
        } else {
            &pg_orders
        };
        assert_eq!(
            map_row(route, &data).unwrap().entity.key,
            key,
            "{kind} {data:?}"
        );
        if kind == "customer.upsert" {
            assert_eq!(key, "1");
            assert_eq!(data["balance"], serde_json::json!(10.50));
            assert_eq!(data["updated"], "2026-01-02T01:04:05.123456+00:00");
        } else {
            assert_eq!(key, "north\\,east\\\\,1");
            assert_eq!(data["customer"], 1, "renamed back: {data:?}");
            assert!(!data.contains_key("customer_id"), "{data:?}");
        }
    }
    let london_rows: Vec<(String, String, String)> = london
        .query("SELECT type, entity_key, data FROM outbox ORDER BY ord")
        .await
        .unwrap();
    let maria_orders = route(
        "orders.upsert",
        &["region", "no"],
        &[("customer", "cust")],
        Operation::Upsert,
    );
    for (kind, key, data) in &london_rows {
        let data: serde_json::Map<String, serde_json::Value> = serde_json::from_str(data).unwrap();
        let route = if kind == "customer.upsert" {
            &customer
        } else {
            &maria_orders
        };
        assert_eq!(
            &map_row(route, &data).unwrap().entity.key,
            key,
            "{kind} {data:?}"
        );
        if kind == "customer.upsert" {
            assert!(
                !data.contains_key("local_note") && !data.contains_key("via"),
                "the dropped field and the constant stay at LONDON: {data:?}"
            );
            assert_eq!(data["updated"], "2026-03-04T04:06:07.500000Z", "{data:?}");
        } else {
            assert_eq!(key, "west\\,1,1");
            assert_eq!(data["customer"], 101, "{data:?}");
        }
    }

    let sidecars: Vec<Sidecar> = vec![mesh.spawn("PARIS"), mesh.spawn("MADRID"), s.spawn_london()];
    let refs: Vec<&Sidecar> = sidecars.iter().collect();

    // Each site's own customers: multi-row inserts, one update of them
    // all, a multi-row delete; MADRID's first customer alone.
    madrid
        .batch_execute("INSERT INTO customer VALUES (201, 'Cy', NULL, 1, now())")
        .await
        .unwrap();
    *events.entry("MADRID").or_default() += 1;
    for (site, base) in [("PARIS", 0), ("MADRID", 200)] {
        let c = if site == "PARIS" { &paris } else { &madrid };
        c.execute(
            "INSERT INTO customer SELECT g, 'c' || g, 'c' || g || '@x', g * 1.25, now() FROM generate_series($1::int + 2, $1::int + 10) g",
            &[&base],
        )
        .await
        .unwrap();
        c.execute(
            "UPDATE customer SET balance = balance + 100, name = name || '!' WHERE id BETWEEN $1::int + 1 AND $1::int + 10",
            &[&base],
        )
        .await
        .unwrap();
        c.execute(
            "DELETE FROM customer WHERE id IN ($1::int + 9, $1::int + 10)",
            &[&base],
        )
        .await
        .unwrap();
        *events.entry(site).or_default() += 9 + 10 + 2;
    }
    for id in 102..=110 {
        london
            .exec_drop(
                "INSERT INTO customer (id, name, email, balance, updated) VALUES (?, CONCAT('c', ?), NULL, ? * 1.25, NOW(6))",
                (id, id, id),
            )
            .await
            .unwrap();
    }
    london
        .query_drop("UPDATE customer SET balance = balance + 100, name = CONCAT(name, '!') WHERE id BETWEEN 101 AND 110")
        .await
        .unwrap();
    london
        .query_drop("DELETE FROM customer WHERE id IN (109, 110)")
        .await
        .unwrap();
    *events.entry("LONDON").or_default() += 9 + 10 + 2;

    // Orders: more of them, a delete, and at MADRID an update that moves
    // an order to another key (a delete of the old key, then an upsert).
    paris
        .batch_execute("INSERT INTO orders SELECT 'north,east\\', g, 2, g FROM generate_series(2, 5) g; DELETE FROM orders WHERE region = 'north,east\\' AND no = 2")
        .await
        .unwrap();
    *events.entry("PARIS").or_default() += 4 + 1;
    madrid
        .batch_execute("INSERT INTO orders SELECT 'south', g, 201, g * 2 FROM generate_series(1, 5) g; UPDATE orders SET no = 50 WHERE region = 'south' AND no = 5")
        .await
        .unwrap();
    *events.entry("MADRID").or_default() += 5 + 2;
    london
        .query_drop("UPDATE orders SET total = 6.50 WHERE region = 'west,1' AND no = 1")
        .await
        .unwrap();
    *events.entry("LONDON").or_default() += 1;

    // The same keys everywhere: MADRID writes last and wins.
    for k in 1000..1005 {
        paris
            .execute(
                "INSERT INTO customer VALUES ($1, 'PARIS', NULL, 1, now()) ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
                &[&k],
            )
            .await
            .unwrap();
        london
            .exec_drop(
                "INSERT INTO customer (id, name, balance) VALUES (?, 'LONDON', 2) ON DUPLICATE KEY UPDATE name = VALUES(name)",
                (k,),
            )
            .await
            .unwrap();
        madrid
            .execute(
                "INSERT INTO customer VALUES ($1, 'MADRID', NULL, 3, now()) ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
                &[&k],
            )
            .await
            .unwrap();
    }
    for site in ["PARIS", "LONDON", "MADRID"] {
        *events.entry(site).or_default() += 5;
    }

    // 3 sites × 8 own customers + 5 shared.
    wait_converged(&s, 3 * 8 + 5, &refs, Duration::from_secs(180)).await;
    let (customers, orders) = pg_state(&paris).await;
    assert!(
        customers
            .iter()
            .filter(|c| c.0 >= 1000)
            .all(|c| c.1 == "MADRID"),
        "{customers:?}"
    );
    assert!(orders.iter().any(|o| o.0 == "south" && o.1 == 50));
    assert!(
        !orders.iter().any(|o| o.0 == "south" && o.1 == 5),
        "{orders:?}"
    );
    assert_eq!(orders.len(), 1 + 3 + 1 + 5);
    // LONDON's constant on rows the sink wrote, its own value on its own.
    assert_eq!(
        maria_count(&mut london, "SELECT COUNT(*) FROM customer WHERE via = 'sync' AND id BETWEEN 1 AND 299 AND (id < 101 OR id > 110)").await,
        16
    );
    assert_eq!(
        maria_count(
            &mut london,
            "SELECT COUNT(*) FROM customer WHERE local_note = 'mine'"
        )
        .await,
        1
    );

    // Exactly once, no echo: every site's inbox holds each event of the
    // others once; its outbox received exactly its own application's
    // changes, none while the sink applied (an applied event never came
    // back as a new one); each other site's writes of its own customers
    // were applied by the sink once each (22 per site).
    let total: i64 = events.values().sum();
    for site in ["PARIS", "MADRID"] {
        let c = mesh.client(site).await;
        assert_eq!(
            pg_count(
                &c,
                &format!("SELECT count(*) FROM sitesync_inbox WHERE origin <> '{site}'")
            )
            .await,
            total - events[site],
            "{site}'s inbox"
        );
        assert_eq!(
            pg_count(&c, "SELECT count(*) FROM outbox_log WHERE by_sink").await,
            0,
            "{site}: echo"
        );
        assert_eq!(
            pg_count(&c, "SELECT count(*) FROM outbox_log").await,
            events[site],
            "{site}: own events"
        );
        let own = if site == "PARIS" { (1, 10) } else { (201, 210) };
        assert_eq!(
            pg_count(
                &c,
                &format!("SELECT count(*) FROM customer_log WHERE by_sink AND id < 1000 AND id NOT BETWEEN {} AND {}", own.0, own.1)
            )
            .await,
            44,
            "{site}: the others' customer writes, applied once each"
        );
        assert_eq!(
            pg_count(
                &c,
                &format!(
                    "SELECT count(*) FROM customer_log WHERE by_sink AND id BETWEEN {} AND {}",
                    own.0, own.1
                )
            )
            .await,
            0
        );
    }
    assert_eq!(
        maria_count(
            &mut london,
            "SELECT COUNT(*) FROM sitesync_inbox WHERE origin <> 'LONDON'"
        )
        .await,
        total - events["LONDON"]
    );
    assert_eq!(
        maria_count(&mut london, "SELECT COUNT(*) FROM outbox_log WHERE by_sink").await,
        0
    );
    assert_eq!(
        maria_count(&mut london, "SELECT COUNT(*) FROM outbox_log").await,
        events["LONDON"]
    );
    assert_eq!(
        maria_count(&mut london, "SELECT COUNT(*) FROM customer_log WHERE by_sink AND id < 1000 AND id NOT BETWEEN 101 AND 110").await,
        44
    );

    // A bulk change at PARIS: 20,000 new customers in one statement, then
    // one UPDATE of them all, one trigger call (statement-level).
    let n: i32 = 20_000;
    paris
        .execute(
            "INSERT INTO customer SELECT g, 'bulk' || g, NULL, g, now() FROM generate_series(10000, 10000 + $1 - 1) g",
            &[&n],
        )
        .await
        .unwrap();
    paris
        .batch_execute(
            "BEGIN; SET LOCAL track_functions = 'pl';
             UPDATE customer SET balance = balance + 0.5, name = 'updated' WHERE id >= 10000;
             CREATE TEMP TABLE calls AS SELECT calls FROM pg_stat_xact_user_functions WHERE funcname = 'sitesync_capture_customer_upd';
             COMMIT;",
        )
        .await
        .unwrap();
    assert_eq!(
        pg_count(&paris, "SELECT calls FROM calls").await,
        1,
        "one trigger call for the whole UPDATE"
    );
    wait_converged(&s, 3 * 8 + 5 + n as usize, &refs, Duration::from_secs(600)).await;
    assert_eq!(
        maria_count(
            &mut london,
            "SELECT COUNT(*) FROM customer WHERE name = 'updated'"
        )
        .await,
        n as i64
    );
    drop(sidecars);
}

#[tokio::test]
async fn check_reports_missing_disabled_and_out_of_date_triggers_and_add_refuses_tables_without_a_key()
 {
    let s = Sites::start().await;
    let mesh = &s.mesh;
    let check = |out: &std::process::Output, name: &str| -> String {
        stdout(out)
            .lines()
            .skip_while(|l| !l.contains(&format!("] capture {name}:")))
            .take(2)
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Nothing asked, nothing installed: check says nothing of capture.
    let out = mesh.sitesync("PARIS", &["check"]).await;
    assert!(!stdout(&out).contains("] capture"), "{}", stdout(&out));
    mesh.ok("PARIS", &["capture", "add", "--all"]).await;
    let out = mesh.sitesync("PARIS", &["check"]).await;
    assert!(
        check(&out, "public.customer").starts_with("[ok  ]"),
        "{}",
        stdout(&out)
    );

    // A column added: out of date; a trigger disabled: disabled.
    let paris = mesh.client("PARIS").await;
    paris
        .batch_execute("ALTER TABLE customer ADD COLUMN phone text; ALTER TABLE orders DISABLE TRIGGER sitesync_capture_del")
        .await
        .unwrap();
    let out = mesh.sitesync("PARIS", &["check"]).await;
    assert!(!out.status.success());
    let c = check(&out, "public.customer");
    assert!(
        c.starts_with("[FAIL]") && c.contains("sitesync_capture_ins is out of date"),
        "{c}"
    );
    assert!(c.contains("fix: sitesync capture add"), "{c}");
    let o = check(&out, "public.orders");
    assert!(
        o.contains("trigger sitesync_capture_del is disabled"),
        "{o}"
    );
    // `capture add` brings both up to date, and the new column is captured.
    let added = mesh.ok("PARIS", &["capture", "add", "--all"]).await;
    assert_eq!(added.matches("capture replaced").count(), 2, "{added}");
    let out = mesh.sitesync("PARIS", &["check"]).await;
    assert!(
        check(&out, "public.customer").starts_with("[ok  ]"),
        "{}",
        stdout(&out)
    );
    assert!(
        check(&out, "public.orders").starts_with("[ok  ]"),
        "{}",
        stdout(&out)
    );
    paris
        .batch_execute("INSERT INTO customer (id, name, phone) VALUES (1, 'a', '555')")
        .await
        .unwrap();
    let data: String = paris
        .query_one("SELECT data::text FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert!(data.contains("\"phone\": \"555\""), "{data}");

    // `capture remove` drops them; check (no `capture = true` at PARIS)
    // is quiet again.
    let removed = mesh.ok("PARIS", &["capture", "remove", "--all"]).await;
    assert_eq!(removed.matches("capture removed").count(), 2, "{removed}");
    let left = pg_count(
        &paris,
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'sitesync%' OR tgfoid IN (SELECT oid FROM pg_proc WHERE proname LIKE 'sitesync_capture%')",
    )
    .await;
    assert_eq!(left, 0);
    assert_eq!(
        pg_count(
            &paris,
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'sitesync_capture%'"
        )
        .await,
        0
    );

    // LONDON asks for capture (`capture = true`): a dropped trigger is
    // missing, and a MariaDB column added makes the rest out of date.
    let mut london = s.london().await;
    london
        .query_drop("DROP TRIGGER sitesync_cap_customer_del")
        .await
        .unwrap();
    london
        .query_drop("ALTER TABLE orders ADD COLUMN extra int NULL")
        .await
        .unwrap();
    let out = sitesync_with(&s.london, &["check"]);
    assert!(
        check(&out, "customer").contains("trigger sitesync_cap_customer_del is missing"),
        "{}",
        stdout(&out)
    );
    assert!(
        check(&out, "orders").contains("out of date"),
        "{}",
        stdout(&out)
    );
    init_with(&s.london);
    let out = sitesync_with(&s.london, &["check"]);
    assert!(
        check(&out, "customer").starts_with("[ok  ]"),
        "{}",
        stdout(&out)
    );
    assert!(
        check(&out, "orders").starts_with("[ok  ]"),
        "{}",
        stdout(&out)
    );

    // A table whose key is not unique is refused, and nothing is created.
    paris
        .batch_execute("CREATE TABLE note (id int NOT NULL, body text)")
        .await
        .unwrap();
    let file = mesh.connector("PARIS").clone();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        format!(
            "{text}\n[[sink.routes]]\ntype = \"note.upsert\"\ntable = \"note\"\nkey = [\"id\"]\n"
        ),
    )
    .unwrap();
    let out = mesh
        .sitesync("PARIS", &["capture", "add", "--route", "note.upsert"])
        .await;
    assert!(!out.status.success());
    assert!(
        stdout(&out)
            .contains("note: refused: note has no primary key or unique index on exactly (id)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        pg_count(
            &paris,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'note'::regclass"
        )
        .await,
        0
    );
    let out = mesh
        .sitesync("PARIS", &["capture", "add", "--route", "nope.upsert"])
        .await;
    assert!(
        stdout(&out).contains("no route of") && stdout(&out).contains("has type `nope.upsert`"),
        "{}",
        stdout(&out)
    );
}
