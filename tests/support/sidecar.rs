//! One PARIS site for a test: a private PostgreSQL cluster, per-test broker
//! names, a connector file, and the `sitesync` binary driven as a process
//! (crash tests kill it with SIGKILL, drain tests send SIGTERM).

use super::pg::PgCluster;
use super::rabbit::{self, unique_names};
use super::{TestDir, tail_file, wait_for};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use sitesync::checkpoint::{Checkpoint, CheckpointStore};
use sitesync::engine::postgres::position::{Position, parse_lsn};
use sitesync::event::Event;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;
use tokio_postgres::Client;

pub const SITES: [&str; 3] = ["PARIS", "LONDON", "MADRID"];

/// The built binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_sitesync")
}

/// Runs `sitesync <args>` in a fresh directory (`prefix`…) to completion,
/// quietly, and panics with its output unless it succeeded; returns stdout
/// and stderr.
pub async fn run_ok(prefix: &str, args: &[&str]) -> (String, String) {
    let dir = TestDir::new(prefix).expect("a directory for the command");
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .current_dir(dir.path())
        .env("RUST_LOG", "warn,lapin=off");
    let what = args.join(" ");
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run sitesync"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "sitesync {what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// Runs `sitesync <args> --connector <connector>` to completion (for a
/// site the mesh does not hold: one on another engine).
pub fn sitesync_with(connector: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .arg("--connector")
        .arg(connector)
        .output()
        .expect("run sitesync")
}

/// `sitesync init` for `connector`; panics with its output unless it
/// succeeded.
pub fn init_with(connector: &Path) {
    let out = sitesync_with(connector, &["init"]);
    assert!(
        out.status.success(),
        "init: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Broker object names of one test.
#[derive(Debug, Clone)]
pub struct Names {
    pub exchange: String,
    pub prefix: String,
    pub archive: String,
    pub dlx: String,
    pub dlq: String,
}

impl Names {
    pub fn new() -> Names {
        let token = unique_names("t");
        Names {
            exchange: format!("{token}.events"),
            prefix: format!("{token}_SITE_"),
            archive: format!("{token}_SITE_PARIS_HISTO"),
            dlx: format!("{token}.dlx"),
            dlq: format!("{token}.dlq"),
        }
    }

    /// A topology file with these names, the three sites, `archive_site`
    /// naming the site that archives, and `extra` lines.
    pub fn topology(&self, archive_site: &str, extra: &str) -> String {
        format!(
            "exchange = \"{}\"\nsites = [\"PARIS\", \"LONDON\", \"MADRID\"]\n\
             site_queue_prefix = \"{}\"\narchive_queue = \"{}\"\n\
             dead_letter_exchange = \"{}\"\ndead_letter_queue = \"{}\"\n\
             archive_site = \"{archive_site}\"\n{extra}",
            self.exchange, self.prefix, self.archive, self.dlx, self.dlq
        )
    }

    pub fn site(&self, site: &str) -> String {
        format!("{}{site}", self.prefix)
    }

    /// Every queue bound to the event exchange.
    pub fn bound(&self) -> Vec<String> {
        let mut v: Vec<String> = SITES.iter().map(|s| self.site(s)).collect();
        v.push(self.archive.clone());
        v
    }

    /// Deletes this test's queues and exchanges from the broker (for
    /// `Drop`, which cannot await: a thread with a runtime of its own).
    pub fn delete_blocking(&self, url: &str) {
        let url = url.to_string();
        let mut queues = self.bound();
        queues.push(self.dlq.clone());
        // The archive's gap-fill requests (`topology declare` makes it):
        // left behind, each test run's would stay on the shared broker.
        queues.push(format!("{}_REQUESTS", self.archive));
        let exchanges = vec![self.exchange.clone(), self.dlx.clone()];
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

/// Settings a test may change.
pub struct Options {
    pub window: usize,
    /// Broker URL (default: the machine's shared broker).
    pub amqp_url: Option<String>,
    /// Extra lines for the `[database]` table.
    pub database_extra: String,
    /// Skip `sitesync init` (the test makes its own outbox).
    pub skip_init: bool,
    /// List an address where no broker listens before the real one.
    pub dead_broker_first: bool,
    /// Extra lines for the `[broker]` table.
    pub broker_extra: String,
    /// Verify bindings through the management API (shared broker only).
    pub management: bool,
    /// `broker.topology_check_interval_ms`: how often an idle sidecar
    /// verifies the topology.
    pub topology_check_interval_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            window: 256,
            amqp_url: None,
            database_extra: String::new(),
            skip_init: false,
            dead_broker_first: false,
            broker_extra: String::new(),
            management: true,
            topology_check_interval_ms: 500,
        }
    }
}

pub struct Site {
    pub dir: TestDir,
    pub pg: PgCluster,
    pub amqp_url: String,
    pub names: Names,
    pub connector: PathBuf,
    pub checkpoints: PathBuf,
    pub window: usize,
}

impl Site {
    pub async fn start(opts: Options) -> Site {
        let pg = PgCluster::start().await;
        pg.create_database("paris").await;
        let dir = TestDir::new("sssite").expect("test dir");
        let amqp_url = opts
            .amqp_url
            .clone()
            .unwrap_or_else(rabbit::shared_amqp_url);
        let names = Names::new();
        let topology = dir.path().join("topology.toml");
        std::fs::write(
            &topology,
            // These tests look at the archive queue as it fills: it is
            // named as MADRID's, a site no sidecar of theirs runs, so that
            // `check` at PARIS finds an archive site.
            names.topology("MADRID", ""),
        )
        .unwrap();
        let checkpoints = dir.path().join("checkpoints");
        let connector = dir.path().join("paris.toml");
        // The shared broker has the management plugin (scripts/setup.sh);
        // private nodes do not.
        let management = if opts.amqp_url.is_none() && opts.management {
            "management_url = \"http://127.0.0.1:15672\"\n"
        } else {
            ""
        };
        let urls = if opts.dead_broker_first {
            format!(
                "\"amqp://guest:guest@127.0.0.1:{}/%2f\", \"{amqp_url}\"",
                super::free_port()
            )
        } else {
            format!("\"{amqp_url}\"")
        };
        std::fs::write(
            &connector,
            format!(
                "site = \"PARIS\"\n\n[database]\nkind = \"postgres\"\nurl = \"{}\"\n{}\n\n[broker]\n{management}urls = [{urls}]\ntopology = \"{}\"\npublisher_window = {}\ntopology_check_interval_ms = {}\n{}\n\n[checkpoint]\n# A short interval keeps the duplicates a crash re-sends within the\n# bounds the crash tests assert (window + one interval of confirms).\ninterval_ms = 20\ndir = \"{}\"\n\n[retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\n# These tests look at every queue, PARIS's too: no sink.\n[sink]\nenabled = false\n",
                pg.url("paris"),
                opts.database_extra,
                topology.display(),
                opts.window,
                opts.topology_check_interval_ms,
                opts.broker_extra,
                checkpoints.join("paris").display()
            ),
        )
        .unwrap();
        let site = Site {
            dir,
            pg,
            amqp_url,
            names,
            connector,
            checkpoints,
            window: opts.window,
        };
        if !opts.skip_init {
            site.ok(&["init"]).await;
        }
        site.ok(&["topology", "declare"]).await;
        site
    }

    /// Runs `sitesync <args> --connector <file>` to completion.
    pub async fn sitesync(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary());
        cmd.args(args).arg("--connector").arg(&self.connector);
        cmd.env("RUST_LOG", "info,lapin=off");
        tokio::task::spawn_blocking(move || cmd.output().expect("run sitesync"))
            .await
            .unwrap()
    }

    /// Like [`Site::sitesync`], asserting success; returns stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.sitesync(args).await;
        assert!(
            out.status.success(),
            "sitesync {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `sitesync run` in the background.
    pub fn spawn(&self) -> Sidecar {
        Sidecar::spawn(&self.connector, self.dir.path())
    }

    /// Starts `sitesync run` with its stdout and stderr a pipe whose reading
    /// end is closed at once (a log collector that went away): every log
    /// line it writes fails with EPIPE.
    pub fn spawn_with_its_log_reader_gone(&self) -> Sidecar {
        let mut child = Sidecar::command(&self.connector)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sitesync run");
        drop(child.stdout.take());
        drop(child.stderr.take());
        Sidecar {
            child: Some(child),
            // Never written: its output goes nowhere.
            log: self.dir.path().join("no-log"),
        }
    }

    pub async fn client(&self) -> Client {
        self.pg.client("paris").await
    }

    pub fn store_dir(&self) -> PathBuf {
        self.checkpoints.join("paris")
    }

    /// The checkpoint a running sidecar last wrote (its `live.json`).
    pub fn live(&self) -> Option<Checkpoint<Position>> {
        sitesync::checkpoint::read_live(&self.store_dir()).map(|(_, ck)| ck)
    }

    /// Waits until the running sidecar has checkpointed `events` events of
    /// the current epoch (its `next_seq` is `events + 1`).
    pub async fn wait_checkpointed(&self, events: u64, timeout: Duration) {
        let r = wait_for(
            async || self.live().is_some_and(|ck| ck.next_seq == events + 1),
            timeout,
        )
        .await;
        if let Err(e) = r {
            panic!(
                "{events} events checkpointed: {e}; last checkpoint: {:?}",
                self.live()
            );
        }
    }

    /// The durable checkpoint (the sidecar must be stopped).
    pub fn stored(&self) -> Option<Checkpoint<Position>> {
        let store = CheckpointStore::open(&self.store_dir(), "test".into())
            .expect("open the checkpoint store");
        let stored = store.load().expect("load the checkpoint");
        drop(store);
        self.wait_sled_released();
        stored
    }

    /// Waits until sled's lock on the store is free again. A sled database
    /// dropped in this process lets go of its file lock a moment later
    /// (its background threads hold the file until they end): a sidecar
    /// started at once was refused with "could not acquire lock".
    fn wait_sled_released(&self) {
        let db = self.store_dir().join("sled").join("db");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let file = std::fs::File::open(&db).expect("open sled's db file");
            match file.try_lock() {
                Ok(()) => {
                    file.unlock().expect("unlock sled's db file");
                    return;
                }
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("sled's lock on {} is still held: {e}", db.display()),
            }
        }
    }

    /// Flips one byte of the stored checkpoint record without fixing its
    /// crc32, as a torn write would (the sidecar must be stopped).
    pub fn corrupt_checkpoint(&self) {
        let db = sled::open(self.store_dir().join("sled")).expect("open sled");
        let mut record = db
            .get("checkpoint")
            .expect("read the record")
            .expect("a checkpoint was written")
            .to_vec();
        let last = record.len() - 2;
        record[last] ^= 0x20;
        db.insert("checkpoint", record).expect("write the record");
        db.flush().expect("flush sled");
        drop(db);
        self.wait_sled_released();
    }

    /// Damages the checkpoint on disk as a failing disk would, under sled:
    /// flips the byte right after `"next_seq":` in every copy of the
    /// record sled's files hold (`newest_only`: in the last copy of its log
    /// only). Returns how many copies were damaged (the sidecar must be
    /// stopped).
    pub fn damage_checkpoint_on_disk(&self, newest_only: bool) -> usize {
        let needle = b"\"next_seq\":";
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.store_dir().join("sled"))
            .expect("list the sled directory")
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let mut damaged = 0;
        for file in files {
            let is_log = file.file_name().is_some_and(|n| n == "db");
            if newest_only && !is_log {
                continue;
            }
            let mut bytes = std::fs::read(&file).unwrap();
            let mut at: Vec<usize> = bytes
                .windows(needle.len())
                .enumerate()
                .filter(|(_, w)| *w == needle)
                .map(|(i, _)| i + needle.len())
                .collect();
            if newest_only {
                at = at.split_off(at.len().saturating_sub(1));
            }
            for i in &at {
                bytes[*i] ^= 0x01;
            }
            damaged += at.len();
            std::fs::write(&file, bytes).unwrap();
        }
        damaged
    }

    /// Creates an independent test_decoding slot: after the writes, its
    /// changes give the server's own commit order of the outbox inserts.
    pub async fn start_oracle(&self, client: &Client) {
        client
            .batch_execute("SELECT pg_create_logical_replication_slot('oracle', 'test_decoding')")
            .await
            .unwrap();
    }

    /// Outbox ids in commit order, and the end LSN of the last commit, from
    /// the oracle slot.
    pub async fn oracle_order(&self, client: &Client) -> (Vec<String>, u64) {
        let rows = client
            .query(
                "SELECT lsn::text, data FROM pg_logical_slot_peek_changes('oracle', NULL, NULL)",
                &[],
            )
            .await
            .unwrap();
        let mut ids = Vec::new();
        let mut last_commit = 0;
        for row in rows {
            let lsn: String = row.get(0);
            let data: String = row.get(1);
            if data.starts_with("table public.outbox: INSERT:") {
                let at = data.find("id[uuid]:'").expect("id column") + "id[uuid]:'".len();
                ids.push(data[at..at + 36].to_string());
            } else if data.starts_with("COMMIT") {
                last_commit = parse_lsn(&lsn).unwrap();
            }
        }
        (ids, last_commit)
    }

    /// The slot's confirmed_flush_lsn.
    pub async fn confirmed_flush(&self, client: &Client) -> u64 {
        let text: String = client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'sitesync_paris'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        parse_lsn(&text).unwrap()
    }

    pub async fn queue_len(&self, queue: &str) -> u32 {
        rabbit::queue_len(&self.amqp_url, queue).await.unwrap_or(0)
    }

    /// `queue`'s length once it has not changed for `quiet`: a quorum
    /// queue applies what a closed channel had sent a little after the
    /// channel is gone (60 s at most).
    pub async fn settled_queue_len(&self, queue: &str, quiet: Duration) -> u32 {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut len = self.queue_len(queue).await;
        let mut since = std::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.queue_len(queue).await;
            if now != len {
                (len, since) = (now, std::time::Instant::now());
            } else if since.elapsed() >= quiet {
                return len;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{queue} still changing after 60 s ({len} messages)"
            );
        }
    }

    /// Waits until `queue` holds at least `n` messages.
    pub async fn wait_queue(&self, queue: &str, n: u32, timeout: Duration) {
        let url = self.amqp_url.clone();
        let q = queue.to_string();
        let mut last = 0;
        let r = wait_for(
            async || {
                last = rabbit::try_queue_len(&url, &q)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                last >= n
            },
            timeout,
        )
        .await;
        if let Err(e) = r {
            panic!("queue {queue} holds {last} messages, expected {n}: {e}");
        }
    }

    /// Every message of `queue` (expects exactly `n`, waits up to `timeout`).
    pub async fn drain(&self, queue: &str, n: usize, timeout: Duration) -> Vec<Received> {
        rabbit::drain(&self.amqp_url, queue, n, timeout)
            .await
            .iter()
            .map(Received::from)
            .collect()
    }

    /// Messages of `queue` until every id of `ids` has arrived (duplicates
    /// kept), then whatever else the queue holds; waits up to `timeout`.
    pub async fn drain_ids(
        &self,
        queue: &str,
        ids: &HashSet<String>,
        timeout: Duration,
    ) -> Vec<Received> {
        let mut seen = HashSet::new();
        let mut got: Vec<Received> = rabbit::drain_until(&self.amqp_url, queue, timeout, |d| {
            if let Some(last) = d.last()
                && let Ok(e) = serde_json::from_slice::<Event>(&last.data)
            {
                seen.insert(e.id.to_string());
            }
            ids.iter().all(|i| seen.contains(i))
        })
        .await
        .iter()
        .map(Received::from)
        .collect();
        // The leader is serving now, so the count is trustworthy.
        let rest = self.queue_len(queue).await as usize;
        got.extend(self.drain(queue, rest, timeout).await);
        got
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.names.delete_blocking(&self.amqp_url);
    }
}

/// A message as a test sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub event: Option<Event>,
    pub body: Vec<u8>,
    pub position: Option<Position>,
    pub message_id: Option<String>,
    pub reason: Option<String>,
}

fn header(d: &Delivery, name: &str) -> Option<String> {
    let headers = d.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

impl From<&Delivery> for Received {
    fn from(d: &Delivery) -> Self {
        Received {
            event: serde_json::from_slice(&d.data).ok(),
            body: d.data.clone(),
            position: header(d, "x-sitesync-position").and_then(|p| p.parse().ok()),
            message_id: d.properties.message_id().as_ref().map(|s| s.to_string()),
            reason: header(d, "x-sitesync-reason"),
        }
    }
}

impl Received {
    pub fn event(&self) -> &Event {
        self.event
            .as_ref()
            .unwrap_or_else(|| panic!("not an event: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A running `sitesync run`.
pub struct Sidecar {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Sidecar {
    pub fn spawn(connector: &Path, dir: &Path) -> Sidecar {
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let log = dir.join(format!("sidecar-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Sidecar::command(connector)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn sitesync run");
        Sidecar {
            child: Some(child),
            log,
        }
    }

    /// `sitesync run` for `connector`, its output still to be given.
    fn command(connector: &Path) -> Command {
        let mut cmd = Command::new(binary());
        cmd.args(["run", "--connector"])
            .arg(connector)
            .env("RUST_LOG", "info,sitesync=debug,lapin=off")
            .stdin(Stdio::null());
        cmd
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        tail_file(&self.log, 40)
    }

    /// SIGKILL: no drain, no final checkpoint.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        tokio::task::spawn_blocking(move || child.wait().expect("wait"))
            .await
            .unwrap()
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let r = tokio::time::timeout(
            timeout,
            tokio::task::spawn_blocking(move || child.wait().expect("wait")),
        )
        .await;
        match r {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "sidecar still running after {timeout:?}:\n{}",
                self.log_tail()
            ),
        }
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let log = self.log.clone();
        let r = wait_for(
            async || std::fs::read_to_string(&log).is_ok_and(|t| t.contains(needle)),
            timeout,
        )
        .await;
        if let Err(e) = r {
            panic!(
                "sidecar log never showed {needle:?}: {e}\n{}",
                self.log_tail()
            );
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "--- sidecar log ({}) ---\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        self.kill9();
    }
}

/// Inserts `rows` outbox rows in one transaction; returns their ids.
pub async fn insert_tx(client: &Client, rows: usize, tag: &str) -> Vec<String> {
    let sql = format!(
        "INSERT INTO outbox (type, entity_key, data) \
         SELECT 'test.{tag}', g::text, jsonb_build_object('n', g, 'tag', '{tag}') FROM generate_series(1, {rows}) g \
         RETURNING id::text"
    );
    client
        .query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A writer task committing `txs` transactions of `rows` outbox rows each;
/// yields every id written.
pub fn spawn_writer(
    client: Client,
    txs: usize,
    rows: usize,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut ids = Vec::with_capacity(txs * rows);
        for t in 0..txs {
            ids.extend(insert_tx(&client, rows, &format!("t{t}")).await);
        }
        ids
    })
}
