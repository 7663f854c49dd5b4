//! The demo's own SQL at a site, per engine: the business tables, the
//! application's writes (a business change and its outbox row in one
//! transaction), and what the progress lines and the report read.
//!
//! Checksums must agree between engines: each site hashes the same text,
//! one line per row in key order, fields joined by `|`, timestamps in UTC
//! with microseconds (`2026-01-02 03:04:05.123456`) and amounts with two
//! decimals, so a customer written at a PostgreSQL site and applied at a
//! MariaDB one (or the other way round) hashes the same everywhere.

use super::Write;
use chrono::{DateTime, Utc};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, TxOpts};
use tokio::sync::Barrier;
use tokio_postgres::Client;

/// The engines a demo site can run on.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoEngine {
    Postgres,
    #[value(alias = "mysql")]
    Mariadb,
}

impl DemoEngine {
    /// As people write it.
    pub fn label(self) -> &'static str {
        match self {
            DemoEngine::Postgres => "PostgreSQL",
            DemoEngine::Mariadb => "MariaDB",
        }
    }

    /// The routes' table names: schema-qualified on PostgreSQL, in the
    /// connection's database on MariaDB.
    pub fn tables(self) -> (&'static str, &'static str) {
        match self {
            DemoEngine::Postgres => ("public.customer", "public.orders"),
            DemoEngine::Mariadb => ("customer", "orders"),
        }
    }
}

const PG_BUSINESS: &str = "
CREATE TABLE customer (id int PRIMARY KEY, name text NOT NULL, city text, updated_at timestamptz NOT NULL);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL, amount numeric(10,2) NOT NULL, status text NOT NULL);
";

const MARIADB_BUSINESS: [&str; 2] = [
    "CREATE TABLE customer (id int PRIMARY KEY, name varchar(200) NOT NULL, city varchar(200) NULL, updated_at datetime(6) NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL, amount decimal(10,2) NOT NULL, status varchar(32) NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
];

/// One site's counts and checksums, for the report's table.
pub struct Tally {
    pub customers: i64,
    pub orders: i64,
    /// md5 of the rows' text (see the module doc).
    pub customer_sum: String,
    pub orders_sum: String,
    pub outbox: i64,
    pub inbox: i64,
    pub conflicts: i64,
}

/// A conflict over one entity: `(loser origin, loser time, winner origin,
/// winner time)`.
pub type Conflict = (String, DateTime<Utc>, String, DateTime<Utc>);

/// The demo's connection to one site's database.
pub enum Db {
    Pg(Client),
    MariaDb(Conn),
}

/// A MariaDB connection's time zone: `NOW(6)` and `UNIX_TIMESTAMP` in UTC,
/// as the sink's sessions write them.
const MARIADB_UTC: &str = "SET time_zone = '+00:00'";

impl Db {
    /// Creates the business tables; the connection works in UTC from then on.
    pub async fn create_business(&mut self) -> Result<(), String> {
        match self {
            Db::Pg(c) => c
                .batch_execute(PG_BUSINESS)
                .await
                .and(c.batch_execute("SET TimeZone = 'UTC'").await)
                .map_err(|e| e.to_string()),
            Db::MariaDb(c) => {
                for sql in MARIADB_BUSINESS.iter().chain([&MARIADB_UTC]) {
                    c.query_drop(*sql).await.map_err(|e| e.to_string())?;
                }
                Ok(())
            }
        }
    }

    /// Applies one write in one transaction; with `barrier`, commits only
    /// once every writer holding it is ready to.
    pub async fn apply(&mut self, w: &Write, barrier: Option<&Barrier>) -> Result<(), String> {
        match self {
            Db::Pg(c) => pg_apply(c, w, barrier).await.map_err(|e| e.to_string()),
            Db::MariaDb(c) => mariadb_apply(c, w, barrier)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Whether customer `id` exists.
    pub async fn has_customer(&mut self, id: i32) -> Result<bool, String> {
        match self {
            Db::Pg(c) => c
                .query_opt("SELECT 1 FROM customer WHERE id = $1", &[&id])
                .await
                .map(|r| r.is_some())
                .map_err(|e| e.to_string()),
            Db::MariaDb(c) => c
                .exec_first::<i32, _, _>("SELECT 1 FROM customer WHERE id = ?", (id,))
                .await
                .map(|r| r.is_some())
                .map_err(|e| e.to_string()),
        }
    }

    /// `(outbox rows, inbox rows of other origins)`.
    pub async fn pending(&mut self, site: &str) -> Result<(i64, i64), String> {
        match self {
            Db::Pg(c) => c
                .query_one(
                    "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM sitesync_inbox WHERE origin <> $1)",
                    &[&site],
                )
                .await
                .map(|r| (r.get(0), r.get(1)))
                .map_err(|e| e.to_string()),
            Db::MariaDb(c) => c
                .exec_first(
                    "SELECT (SELECT COUNT(*) FROM outbox), (SELECT COUNT(*) FROM sitesync_inbox WHERE origin <> ?)",
                    (site,),
                )
                .await
                .map(|r| r.unwrap_or((0, 0)))
                .map_err(|e| e.to_string()),
        }
    }

    /// Counts and checksums of the business tables and the sink's tables.
    pub async fn tally(&mut self) -> Result<Tally, String> {
        match self {
            Db::Pg(c) => {
                let r = c
                    .query_one(
                        "SELECT (SELECT count(*) FROM customer), (SELECT count(*) FROM orders), \
                         (SELECT md5(coalesce(string_agg(concat_ws('|', id, name, coalesce(city, ''), \
                            to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')), E'\\n' ORDER BY id), '')) FROM customer), \
                         (SELECT md5(coalesce(string_agg(concat_ws('|', id, customer_id, amount::text, status), E'\\n' ORDER BY id), '')) FROM orders), \
                         (SELECT count(*) FROM outbox), (SELECT count(*) FROM sitesync_inbox), \
                         (SELECT count(*) FROM sitesync_conflicts)",
                        &[],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Tally {
                    customers: r.get(0),
                    orders: r.get(1),
                    customer_sum: r.get(2),
                    orders_sum: r.get(3),
                    outbox: r.get(4),
                    inbox: r.get(5),
                    conflicts: r.get(6),
                })
            }
            Db::MariaDb(c) => {
                let counts: Option<(i64, i64, i64, i64, i64)> = c
                    .query_first(
                        "SELECT (SELECT COUNT(*) FROM customer), (SELECT COUNT(*) FROM orders), \
                         (SELECT COUNT(*) FROM outbox), (SELECT COUNT(*) FROM sitesync_inbox), \
                         (SELECT COUNT(*) FROM sitesync_conflicts)",
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let (customers, orders, outbox, inbox, conflicts) = counts.unwrap_or_default();
                // GROUP_CONCAT stops at group_concat_max_len (1 MiB by
                // default): far above the demo's few dozen rows.
                let sums: Option<(String, String)> = c
                    .query_first(
                        "SELECT (SELECT MD5(COALESCE(GROUP_CONCAT(CONCAT_WS('|', id, name, COALESCE(city, ''), \
                            DATE_FORMAT(updated_at, '%Y-%m-%d %H:%i:%s.%f')) ORDER BY id SEPARATOR '\\n'), '')) FROM customer), \
                         (SELECT MD5(COALESCE(GROUP_CONCAT(CONCAT_WS('|', id, customer_id, amount, status) ORDER BY id SEPARATOR '\\n'), '')) FROM orders)",
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let (customer_sum, orders_sum) = sums.unwrap_or_default();
                Ok(Tally {
                    customers,
                    orders,
                    customer_sum,
                    orders_sum,
                    outbox,
                    inbox,
                    conflicts,
                })
            }
        }
    }

    /// The conflicts recorded over customer `id` (`entity`: the route's table).
    pub async fn conflicts(&mut self, entity: &str, id: i32) -> Result<Vec<Conflict>, String> {
        let key = id.to_string();
        match self {
            Db::Pg(c) => Ok(c
                .query(
                    "SELECT loser_origin, loser_ts, winner_origin, winner_ts FROM sitesync_conflicts \
                     WHERE entity = $1 AND key = $2",
                    &[&entity, &key],
                )
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect()),
            Db::MariaDb(c) => {
                let rows: Vec<(String, i64, String, i64)> = c
                    .exec(
                        "SELECT loser_origin, CAST(UNIX_TIMESTAMP(loser_ts) * 1000000 AS SIGNED), \
                         winner_origin, CAST(UNIX_TIMESTAMP(winner_ts) * 1000000 AS SIGNED) \
                         FROM sitesync_conflicts WHERE entity = ? AND `key` = ?",
                        (entity, key),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let at = |us: i64| DateTime::from_timestamp_micros(us).unwrap_or_default();
                Ok(rows
                    .into_iter()
                    .map(|(lo, lt, wo, wt)| (lo, at(lt), wo, at(wt)))
                    .collect())
            }
        }
    }

    /// `(name, city, origin of the version held)` of customer `id`.
    pub async fn customer(
        &mut self,
        entity: &str,
        id: i32,
    ) -> Result<Option<(String, String, String)>, String> {
        match self {
            Db::Pg(c) => Ok(c
                .query_opt(
                    "SELECT c.name, c.city, v.origin FROM customer c \
                     LEFT JOIN sitesync_versions v ON v.entity = $2 AND v.key = c.id::text WHERE c.id = $1",
                    &[&id, &entity],
                )
                .await
                .map_err(|e| e.to_string())?
                .map(|r| {
                    let (name, city, origin): (String, Option<String>, Option<String>) =
                        (r.get(0), r.get(1), r.get(2));
                    (name, city.unwrap_or_default(), origin.unwrap_or_default())
                })),
            Db::MariaDb(c) => {
                let row: Option<(String, Option<String>, Option<String>)> = c
                    .exec_first(
                        "SELECT c.name, c.city, v.origin FROM customer c \
                         LEFT JOIN sitesync_versions v ON v.entity = ? AND v.`key` = CAST(c.id AS CHAR) WHERE c.id = ?",
                        (entity, id),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(row.map(|(name, city, origin)| {
                    (name, city.unwrap_or_default(), origin.unwrap_or_default())
                }))
            }
        }
    }
}

async fn pg_apply(
    client: &mut Client,
    w: &Write,
    barrier: Option<&Barrier>,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    match w {
        Write::Customer { id, name, city } => {
            tx.execute(
                "INSERT INTO customer (id, name, city, updated_at) VALUES ($1, $2, $3, now()) \
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, city = EXCLUDED.city, updated_at = EXCLUDED.updated_at",
                &[id, name, city],
            )
            .await?;
            tx.execute(
                "INSERT INTO outbox (type, entity_key, data) \
                 SELECT 'customer.upsert', c.id::text, to_jsonb(c) FROM customer c WHERE c.id = $1",
                &[id],
            )
            .await?;
        }
        Write::DeleteCustomer { id } => {
            tx.execute("DELETE FROM customer WHERE id = $1", &[id])
                .await?;
            tx.execute(
                "INSERT INTO outbox (type, entity_key, data) \
                 VALUES ('customer.delete', $1::int::text, jsonb_build_object('id', $1::int))",
                &[id],
            )
            .await?;
        }
        Write::Order {
            id,
            customer_id,
            amount,
            status,
        } => {
            tx.execute(
                "INSERT INTO orders (id, customer_id, amount, status) VALUES ($1, $2, $3::text::numeric, $4) \
                 ON CONFLICT (id) DO UPDATE SET customer_id = EXCLUDED.customer_id, amount = EXCLUDED.amount, status = EXCLUDED.status",
                &[id, customer_id, amount, status],
            )
            .await?;
            // The event calls the amount `total`: the route renames it.
            tx.execute(
                "INSERT INTO outbox (type, entity_key, data) \
                 SELECT 'order.upsert', o.id::text, to_jsonb(o) - 'amount' || jsonb_build_object('total', o.amount) \
                 FROM orders o WHERE o.id = $1",
                &[id],
            )
            .await?;
        }
    }
    if let Some(b) = barrier {
        b.wait().await;
    }
    tx.commit().await
}

/// The same writes on MariaDB: the event's data built with `JSON_OBJECT`,
/// the timestamp as UTC text with a zone, as PostgreSQL's `to_jsonb` gives it.
async fn mariadb_apply(
    conn: &mut Conn,
    w: &Write,
    barrier: Option<&Barrier>,
) -> Result<(), mysql_async::Error> {
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    match w {
        Write::Customer { id, name, city } => {
            tx.exec_drop(
                "INSERT INTO customer (id, name, city, updated_at) VALUES (?, ?, ?, NOW(6)) \
                 ON DUPLICATE KEY UPDATE name = VALUES(name), city = VALUES(city), updated_at = VALUES(updated_at)",
                (id, name, city),
            )
            .await?;
            tx.exec_drop(
                "INSERT INTO outbox (type, entity_key, data) \
                 SELECT 'customer.upsert', CAST(id AS CHAR), JSON_OBJECT('id', id, 'name', name, 'city', city, \
                    'updated_at', DATE_FORMAT(updated_at, '%Y-%m-%dT%H:%i:%s.%fZ')) FROM customer WHERE id = ?",
                (id,),
            )
            .await?;
        }
        Write::DeleteCustomer { id } => {
            tx.exec_drop("DELETE FROM customer WHERE id = ?", (id,))
                .await?;
            tx.exec_drop(
                "INSERT INTO outbox (type, entity_key, data) VALUES ('customer.delete', CAST(? AS CHAR), JSON_OBJECT('id', ?))",
                (id, id),
            )
            .await?;
        }
        Write::Order {
            id,
            customer_id,
            amount,
            status,
        } => {
            tx.exec_drop(
                "INSERT INTO orders (id, customer_id, amount, status) VALUES (?, ?, CAST(? AS DECIMAL(10,2)), ?) \
                 ON DUPLICATE KEY UPDATE customer_id = VALUES(customer_id), amount = VALUES(amount), status = VALUES(status)",
                (id, customer_id, amount, status),
            )
            .await?;
            tx.exec_drop(
                "INSERT INTO outbox (type, entity_key, data) \
                 SELECT 'order.upsert', CAST(id AS CHAR), JSON_OBJECT('id', id, 'customer_id', customer_id, \
                    'total', amount, 'status', status) FROM orders WHERE id = ?",
                (id,),
            )
            .await?;
        }
    }
    if let Some(b) = barrier {
        b.wait().await;
    }
    tx.commit().await
}
