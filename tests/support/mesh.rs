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
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            amqp_url: None,
            sink_extra: String::new(),
            routes: ROUTES.into(),
            sites: SITES.to_vec(),
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
        let management = if opts.amqp_url.is_none() {
            "management_url = \"http://127.0.0.1:15672\"\n"
        } else {
            ""
        };
        let names = Names::new();
        let topology = dir.path().join("topology.toml");
        std::fs::write(
            &topology,
            format!(
                "exchange = \"{}\"\nsites = [\"PARIS\", \"LONDON\", \"MADRID\"]\nsite_queue_prefix = \"{}\"\narchive_queue = \"{}\"\ndead_letter_exchange = \"{}\"\ndead_letter_queue = \"{}\"\n",
                names.exchange, names.prefix, names.archive, names.dlx, names.dlq
            ),
        )
        .unwrap();
        let mut connectors = BTreeMap::new();
        for site in &opts.sites {
            let db = db(site);
            pg.create_database(&db).await;
            pg.client(&db).await.batch_execute(BUSINESS).await.unwrap();
            let file = dir.path().join(format!("{db}.toml"));
            std::fs::write(
                &file,
                format!(
                    "site = \"{site}\"\n\n[database]\nkind = \"postgres\"\nurl = \"{}\"\n\n[broker]\n{management}urls = [\"{amqp_url}\"]\ntopology = \"{}\"\ntopology_check_interval_ms = 500\n\n[checkpoint]\ndir = \"{}\"\n\n[retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\n[sink]\nbatch_timeout_ms = 20\n{}\n{}",
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
        let mut last = String::new();
        let r = wait_for(
            async || {
                let mut all = true;
                last.clear();
                for site in self.sites() {
                    let c = self.client(site).await;
                    let outbox: i64 = c
                        .query_one("SELECT count(*) FROM outbox", &[])
                        .await
                        .unwrap()
                        .get(0);
                    let inbox: i64 = c
                        .query_one(
                            "SELECT count(*) FROM sitesync_inbox WHERE origin <> $1",
                            &[&site],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    let want = expected_foreign.get(site).copied().unwrap_or(0);
                    last.push_str(&format!(
                        "{site}: outbox {outbox}, foreign inbox {inbox}/{want}; "
                    ));
                    all &= outbox == 0 && inbox == want;
                }
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
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let url = self.amqp_url.clone();
        let mut queues = self.names.bound();
        queues.push(self.names.dlq.clone());
        let exchanges = vec![self.names.exchange.clone(), self.names.dlx.clone()];
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let cleanup = async {
                    rabbit::delete_queues(&url, &queues).await;
                    rabbit::delete_exchanges(&url, &exchanges).await;
                };
                let _ = tokio::time::timeout(Duration::from_secs(20), cleanup).await;
            });
        })
        .join();
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
