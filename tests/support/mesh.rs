//! Three sites (PARIS, LONDON, MADRID) for sink tests: one private
//! PostgreSQL cluster with a database per site, per-test broker names, a
//! connector per site with routes for the `item` table, and the sidecars as
//! processes.

use super::pg::PgCluster;
use super::rabbit;
use super::sidecar::{Names, SITES, Sidecar, binary};
use super::{TestDir, wait_for};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

/// The business schema of every site: `item`, and a trigger that logs each
/// write (by the sink or not) into `item_log`.
pub const BUSINESS: &str = r#"
CREATE TABLE item (id int PRIMARY KEY, n int NOT NULL, rev uuid NOT NULL, site text NOT NULL,
                   note text CHECK (note IS NULL OR note <> 'forbidden'));
CREATE TABLE item_log (seq bigserial PRIMARY KEY, id int NOT NULL, n int, rev uuid, op text NOT NULL,
                       by_sink boolean NOT NULL);
CREATE FUNCTION log_item() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO item_log (id, n, rev, op, by_sink)
        VALUES (OLD.id, OLD.n, OLD.rev, TG_OP, coalesce(current_setting('sitesync.applying', true) = 'on', false));
    ELSE
        INSERT INTO item_log (id, n, rev, op, by_sink)
        VALUES (NEW.id, NEW.n, NEW.rev, TG_OP, coalesce(current_setting('sitesync.applying', true) = 'on', false));
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER item_log AFTER INSERT OR UPDATE OR DELETE ON item FOR EACH ROW EXECUTE FUNCTION log_item();
"#;

/// Routes for `item` events.
pub const ROUTES: &str = r#"
[[sink.routes]]
type = "item.upsert"
table = "public.item"
key = ["id"]
operation = "upsert"

[[sink.routes]]
type = "item.delete"
table = "public.item"
key = ["id"]
operation = "delete"
"#;

pub struct MeshOptions {
    /// Broker URL (default: the machine's shared broker, with management).
    pub amqp_url: Option<String>,
    /// Extra lines for every `[sink]` table.
    pub sink_extra: String,
    /// Routes (default: [`ROUTES`]).
    pub routes: String,
    pub sites: Vec<&'static str>,
    /// The broker URL written in the connectors, when it differs from the
    /// one the test inspects (a proxy in between).
    pub connector_amqp_url: Option<String>,
    /// PARIS's connector gets an `[archive]` section (the topology always
    /// names PARIS as the archive site; without it the archive queue
    /// fills, for the tests that look at it).
    pub archive: bool,
    /// Extra lines for PARIS's `[archive]` section.
    pub archive_extra: String,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            amqp_url: None,
            sink_extra: String::new(),
            routes: ROUTES.into(),
            sites: SITES.to_vec(),
            connector_amqp_url: None,
            archive: false,
            archive_extra: String::new(),
        }
    }
}

pub struct Mesh {
    pub dir: TestDir,
    pub pg: PgCluster,
    pub amqp_url: String,
    pub names: Names,
    pub connectors: BTreeMap<&'static str, PathBuf>,
}

pub fn db(site: &str) -> String {
    site.to_lowercase()
}

impl Mesh {
    pub async fn start(opts: MeshOptions) -> Mesh {
        let pg = PgCluster::start().await;
        let dir = TestDir::new("ssmesh").expect("test dir");
        let amqp_url = opts
            .amqp_url
            .clone()
            .unwrap_or_else(rabbit::shared_amqp_url);
        let connector_url = opts
            .connector_amqp_url
            .clone()
            .unwrap_or_else(|| amqp_url.clone());
        let management = if opts.amqp_url.is_none() {
            "management_url = \"http://127.0.0.1:15672\"\n"
        } else {
            ""
        };
        let names = Names::new();
        let topology = dir.path().join("topology.toml");
        std::fs::write(&topology, names.topology("PARIS", "")).unwrap();
        let mut connectors = BTreeMap::new();
        for site in &opts.sites {
            let db = db(site);
            pg.create_database(&db).await;
            pg.client(&db).await.batch_execute(BUSINESS).await.unwrap();
            let file = dir.path().join(format!("{db}.toml"));
            let archive = if opts.archive && *site == "PARIS" {
                format!("\n[archive]\nbatch_timeout_ms = 50\n{}", opts.archive_extra)
            } else {
                String::new()
            };
            std::fs::write(
                &file,
                format!(
                    "site = \"{site}\"\n\n[database]\nkind = \"postgres\"\nurl = \"{}\"\n\n[broker]\n{management}urls = [\"{connector_url}\"]\ntopology = \"{}\"\ntopology_check_interval_ms = 500\n\n[checkpoint]\ndir = \"{}\"\n\n[retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\n[sink]\nbatch_timeout_ms = 20\n{}\n{}{archive}",
                    pg.url(&db),
                    topology.display(),
                    dir.path().join("checkpoints").join(&db).display(),
                    opts.sink_extra,
                    opts.routes,
                ),
            )
            .unwrap();
            connectors.insert(*site, file);
        }
        let mesh = Mesh {
            dir,
            pg,
            amqp_url,
            names,
            connectors,
        };
        for site in &opts.sites {
            mesh.ok(site, &["init"]).await;
        }
        mesh.ok(opts.sites[0], &["topology", "declare"]).await;
        mesh
    }

    pub fn connector(&self, site: &str) -> &PathBuf {
        &self.connectors[site]
    }

    /// Runs `sitesync <args> --connector <site's file>` to completion.
    pub async fn sitesync(&self, site: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary());
        cmd.args(args).arg("--connector").arg(self.connector(site));
        cmd.env("RUST_LOG", "info,lapin=off");
        tokio::task::spawn_blocking(move || cmd.output().expect("run sitesync"))
            .await
            .unwrap()
    }

    pub async fn ok(&self, site: &str, args: &[&str]) -> String {
        let out = self.sitesync(site, args).await;
        assert!(
            out.status.success(),
            "sitesync {args:?} at {site} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn spawn(&self, site: &str) -> Sidecar {
        Sidecar::spawn(self.connector(site), self.dir.path())
    }

    pub fn spawn_all(&self) -> BTreeMap<&'static str, Sidecar> {
        self.connectors
            .keys()
            .map(|s| (*s, self.spawn(s)))
            .collect()
    }

    pub async fn client(&self, site: &str) -> Client {
        self.pg.client(&db(site)).await
    }

    pub fn sites(&self) -> Vec<&'static str> {
        self.connectors.keys().copied().collect()
    }

    /// Waits until every outbox is empty (every event went round) and every
    /// inbox holds `events` rows of other origins.
    pub async fn wait_settled(&self, expected_foreign: &BTreeMap<&str, i64>, timeout: Duration) {
        let mut clients = Vec::new();
        for site in self.sites() {
            clients.push((site, self.client(site).await));
        }
        let mut last = String::new();
        let r = wait_for(
            async || {
                let mut all = true;
                let mut now = String::new();
                for (site, c) in &clients {
                    let row = c
                        .query_one(
                            "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM sitesync_inbox WHERE origin <> $1)",
                            &[site],
                        )
                        .await
                        .unwrap();
                    let (outbox, inbox): (i64, i64) = (row.get(0), row.get(1));
                    let want = expected_foreign.get(site).copied().unwrap_or(0);
                    now.push_str(&format!("{site}: outbox {outbox}, foreign inbox {inbox}/{want}; "));
                    all &= outbox == 0 && inbox == want;
                }
                last = now;
                all
            },
            timeout,
        )
        .await;
        if let Err(e) = r {
            panic!("the sites did not settle: {e}\n{last}");
        }
    }

    /// Every site's `item` rows, `(id, n, rev)`.
    pub async fn items(&self, site: &str) -> Vec<(i32, i32, Uuid)> {
        self.client(site)
            .await
            .query("SELECT id, n, rev FROM item ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    pub async fn queue_len(&self, queue: &str) -> u32 {
        rabbit::queue_len(&self.amqp_url, queue).await.unwrap_or(0)
    }

    /// How many events of other origins `site`'s inbox holds (0 while its
    /// database is unreachable).
    pub async fn foreign_inbox(&self, site: &str) -> i64 {
        let Ok(c) = self.pg.try_client(&db(site)).await else {
            return 0;
        };
        c.query_one(
            "SELECT count(*) FROM sitesync_inbox WHERE origin <> $1",
            &[&site],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
    }

    /// Waits until `site`'s inbox holds at least `n` events of other origins.
    pub async fn wait_inbox(&self, site: &str, n: i64, timeout: Duration) {
        let mut last = 0;
        let r = wait_for(
            async || {
                last = self.foreign_inbox(site).await;
                last >= n
            },
            timeout,
        )
        .await;
        if let Err(e) = r {
            panic!("{site}'s inbox holds {last} foreign events, expected {n}: {e}");
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.names.delete_blocking(&self.amqp_url);
    }
}

/// An application write: the business change and its outbox row in one
/// transaction. Returns the event id (the outbox row's id) and the rev.
pub async fn upsert(client: &Client, site: &str, id: i32, n: i32) -> (Uuid, Uuid) {
    write(client, site, id, n, None)
        .await
        .expect("the write commits")
}

/// Like [`upsert`] with a `note` (the `item` table refuses 'forbidden').
pub async fn write(
    client: &Client,
    site: &str,
    id: i32,
    n: i32,
    note: Option<&str>,
) -> Result<(Uuid, Uuid), tokio_postgres::Error> {
    let rev = Uuid::new_v4();
    let row = client
        .query_one(
            "WITH w AS (INSERT INTO item (id, n, rev, site) VALUES ($1, $2, $3, $4) \
                        ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n, rev = EXCLUDED.rev, site = EXCLUDED.site) \
             INSERT INTO outbox (type, entity_key, data) \
             VALUES ('item.upsert', $1::text, jsonb_build_object('id', $1::int, 'n', $2::int, 'rev', $3::uuid, 'site', $4::text, 'note', $5::text)) \
             RETURNING id",
            &[&id, &n, &rev, &site, &note],
        )
        .await?;
    Ok((row.get(0), rev))
}

/// `count` application upserts of keys `base..base + count` and their
/// outbox rows, in one transaction (a bulk change).
pub async fn bulk_upsert(client: &Client, site: &'static str, base: i32, count: i32) -> Vec<Write> {
    client
        .query(
            "WITH r AS (SELECT g AS id, g - $2 AS n, gen_random_uuid() AS rev FROM generate_series($2::int, $2::int + $3::int - 1) g), \
                  w AS (INSERT INTO item (id, n, rev, site) SELECT id, n, rev, $1 FROM r \
                        ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n, rev = EXCLUDED.rev, site = EXCLUDED.site) \
             INSERT INTO outbox (type, entity_key, data) \
             SELECT 'item.upsert', id::text, jsonb_build_object('id', id, 'n', n, 'rev', rev, 'site', $1::text, 'note', NULL) FROM r \
             RETURNING id, (data->>'rev')::uuid",
            &[&site, &base, &count],
        )
        .await
        .expect("the bulk write commits")
        .iter()
        .map(|r| Write {
            site,
            event: r.get(0),
            rev: Some(r.get(1)),
        })
        .collect()
}

/// An application delete and its outbox row, in one statement.
pub async fn delete(client: &Client, id: i32) -> Uuid {
    client
        .query_one(
            "WITH d AS (DELETE FROM item WHERE id = $1) \
             INSERT INTO outbox (type, entity_key, data) VALUES ('item.delete', $1::text, jsonb_build_object('id', $1::int)) RETURNING id",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

/// One application write, as the test recorded it.
#[derive(Debug, Clone)]
pub struct Write {
    pub site: &'static str,
    pub event: Uuid,
    /// The row's `rev` for an upsert (what the log trigger records).
    pub rev: Option<Uuid>,
}

/// A writer committing random upserts (4 in 5) and deletes on keys
/// `0..keys` at `site` until `until`, pausing `pace` between writes.
pub fn spawn_random_writer(
    client: Client,
    site: &'static str,
    seed: u64,
    keys: i32,
    until: std::time::Instant,
    pace: Duration,
) -> tokio::task::JoinHandle<Vec<Write>> {
    tokio::spawn(async move {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut writes = Vec::new();
        while std::time::Instant::now() < until {
            let key = (next() % keys as u64) as i32;
            if next() % 5 == 0 {
                let event = delete(&client, key).await;
                writes.push(Write {
                    site,
                    event,
                    rev: None,
                });
            } else {
                let (event, rev) = upsert(&client, site, key, (next() % 1000) as i32).await;
                writes.push(Write {
                    site,
                    event,
                    rev: Some(rev),
                });
            }
            tokio::time::sleep(pace).await;
        }
        writes
    })
}

/// What [`Mesh::assert_exactly_once`] counted.
#[derive(Debug, Default)]
pub struct Tally {
    pub applied: usize,
    pub lost: usize,
    /// Lost events whose write was overwritten back by a newer local write
    /// in the same transaction (the race on new keys): written once.
    pub lost_after_write: usize,
}

impl Mesh {
    /// Events of other origins each site's inbox must end with.
    pub fn foreign_counts(&self, writes: &[Write]) -> BTreeMap<&'static str, i64> {
        self.sites()
            .into_iter()
            .map(|s| (s, writes.iter().filter(|w| w.site != s).count() as i64))
            .collect()
    }

    /// Every site settled (outboxes empty, inboxes complete), identical, and
    /// each event applied exactly once; prints the tally under `what`.
    pub async fn assert_synced(&self, writes: &[Write], what: &str) -> Tally {
        self.wait_settled(&self.foreign_counts(writes), Duration::from_secs(120))
            .await;
        let rows = self.assert_converged().await;
        let tally = self.assert_exactly_once(writes).await;
        eprintln!(
            "{what}: {} writes, converged on {} rows; {} applications, {} lost to newer writes ({} of them written, then overwritten back in the same transaction)",
            writes.len(),
            rows.len(),
            tally.applied,
            tally.lost,
            tally.lost_after_write
        );
        assert!(tally.applied > 0, "{what}: nothing was applied");
        tally
    }

    /// Every site holds the same `item` rows.
    pub async fn assert_converged(&self) -> Vec<(i32, i32, Uuid)> {
        let sites = self.sites();
        let first = self.items(sites[0]).await;
        for site in &sites[1..] {
            let rows = self.items(site).await;
            if rows != first {
                panic!(
                    "{site} differs from {}:\n{}",
                    sites[0],
                    self.explain_divergence().await
                );
            }
        }
        first
    }

    /// For each key whose row differs between sites: every site's row,
    /// version and log of writes.
    async fn explain_divergence(&self) -> String {
        let mut per_site = BTreeMap::new();
        for site in self.sites() {
            let rows: BTreeMap<i32, (i32, Uuid)> = self
                .items(site)
                .await
                .into_iter()
                .map(|(id, n, rev)| (id, (n, rev)))
                .collect();
            per_site.insert(site, rows);
        }
        let keys: std::collections::BTreeSet<i32> =
            per_site.values().flat_map(|m| m.keys().copied()).collect();
        let mut out = String::new();
        for key in keys {
            let values: Vec<Option<&(i32, Uuid)>> =
                per_site.values().map(|m| m.get(&key)).collect();
            if values.windows(2).all(|w| w[0] == w[1]) {
                continue;
            }
            out.push_str(&format!("key {key}:\n"));
            for site in self.sites() {
                let c = self.client(site).await;
                let version = c
                    .query_opt(
                        "SELECT ts::text, origin, event_id FROM sitesync_versions WHERE key = $1",
                        &[&key.to_string()],
                    )
                    .await
                    .unwrap()
                    .map(|r| {
                        format!(
                            "{} {} {}",
                            r.get::<_, String>(0),
                            r.get::<_, String>(1),
                            r.get::<_, Uuid>(2)
                        )
                    });
                let log: Vec<String> = c
                    .query("SELECT op, n, rev, by_sink FROM item_log WHERE id = $1 ORDER BY seq DESC LIMIT 4", &[&key])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| format!("{}:{:?}:{:?}:{}", r.get::<_, String>(0), r.get::<_, Option<i32>>(1), r.get::<_, Option<Uuid>>(2), r.get::<_, bool>(3)))
                    .collect();
                out.push_str(&format!(
                    "  {site}: row {:?}; version {:?}; last writes (newest first) {:?}\n",
                    per_site[site].get(&key),
                    version,
                    log
                ));
            }
            if out.len() > 6000 {
                break;
            }
        }
        out
    }

    /// Each event of another origin is in each inbox exactly once, as
    /// applied or lost; an applied upsert was written exactly once by the
    /// sink (the log trigger counts), a lost one at most once; no site's
    /// sink rewrote its own events.
    pub async fn assert_exactly_once(&self, writes: &[Write]) -> Tally {
        let mut tally = Tally::default();
        for site in self.sites() {
            let c = self.client(site).await;
            let outcomes: BTreeMap<Uuid, String> = c
                .query(
                    "SELECT event_id, outcome FROM sitesync_inbox WHERE origin <> $1",
                    &[&site],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let sink_writes: BTreeMap<Uuid, i64> = c
                .query("SELECT rev, count(*) FROM item_log WHERE by_sink AND op <> 'DELETE' GROUP BY rev", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            for w in writes {
                let written = w.rev.map(|r| sink_writes.get(&r).copied().unwrap_or(0));
                if w.site == site {
                    assert!(
                        written.unwrap_or(0) <= 1,
                        "{site}'s sink rewrote its own event {} {:?} times",
                        w.event,
                        written
                    );
                    continue;
                }
                let outcome = outcomes.get(&w.event).unwrap_or_else(|| {
                    panic!("{site} never received event {} from {}", w.event, w.site)
                });
                match (outcome.as_str(), written) {
                    ("applied", Some(n)) => {
                        assert_eq!(n, 1, "{site} wrote event {} {n} times", w.event)
                    }
                    ("applied", None) => {}
                    ("lost", Some(n)) => {
                        assert!(n <= 1, "{site} wrote lost event {} {n} times", w.event);
                        tally.lost_after_write += n as usize;
                    }
                    ("lost", None) => {}
                    (other, _) => panic!("{site}: event {} ended as {other}", w.event),
                }
                match outcome.as_str() {
                    "applied" => tally.applied += 1,
                    _ => tally.lost += 1,
                }
            }
        }
        tally
    }
}
