//! `sitesync bench`: throughput, latency, bulk and memory, measured in one
//! run against the broker's own ceiling on the same machine.
//!
//! Each site (PARIS, LONDON, MADRID) gets a private PostgreSQL cluster of
//! its own, as each site has its own server (`wal_level=logical`,
//! `track_commit_timestamp=on`, `fsync=off`; in one cluster, every site's
//! walsender would decode every site's WAL), the topology gets names of its own on the given broker,
//! and the sidecars run as processes of this binary (`sitesync run`), so
//! that the PARIS sidecar's memory and CPU can be read from `/proc`.
//!
//! In order:
//! 1. `raw_publish_confirm_per_s`: lapin alone publishes event-sized
//!    messages into the same topology (fanout to the three site queues and
//!    the archive, quorum queues), persistent and mandatory, with confirms
//!    pipelined over sitesync's publisher window: as many messages as the
//!    source phase publishes.
//! 2. `raw_round_trip_per_s`: the same, plus one consumer per site queue
//!    acking, until every site queue has delivered and had acked every
//!    message.
//!
//!    Both raw phases run again at the end, once the sidecars have
//!    stopped, and the figures are the means of the two measures: the
//!    machine's load drifts over a run, and a ceiling measured in seconds
//!    at the start alone moved by a third between runs.
//! 3. `source_per_s`: outbox rows preloaded at PARIS in transactions of 100;
//!    the PARIS sidecar starts and the clock stops when its checkpoint has
//!    passed the last one.
//! 4. `e2e_per_s`: four writers at PARIS commit business rows with their
//!    outbox rows (10 per transaction) as fast as they can for the run's
//!    duration; the figure is the events written divided by the time until
//!    LONDON and MADRID have applied them all (a backlog counts against it).
//! 5. `e2e_p50_ms`…: the offered rate (1,000 events/s by default, a
//!    transaction every 10 ms) for the run's duration; each event's latency
//!    is from its commit at PARIS to the later of its sink commits at LONDON
//!    and MADRID, both read with `pg_xact_commit_timestamp` (one clock).
//! 6. `bulk_100k_s`: one transaction of 100,000 rows at PARIS, from its
//!    commit until both other sites hold every row.
//! 7. `rss_mib_peak` (VmHWM over the whole run), `rss_mib_idle` and
//!    `cpu_idle_pct` (user + system time over an idle window) of the PARIS
//!    sidecar.
//! 8. With MariaDB's server binaries installed (`--no-mariadb` skips it), a
//!    private MariaDB server stands for LONDON once the PostgreSQL phases
//!    are over: `mariadb_source_per_s`, outbox rows preloaded there in
//!    transactions of 100 and read from its binlog by its sidecar (sink
//!    off), as the PostgreSQL source phase, compared with the same raw
//!    publish; then `e2e_pg_to_mariadb_per_s`, PARIS's four writers for the
//!    run's duration with that MariaDB site's sink applying every event
//!    (MADRID stopped).
//!
//! 9. The capture phase (`--no-capture` skips it; see [`capture`]): the
//!    application's write with a capture trigger against without
//!    (`capture_write_ratio`), and one UPDATE of the bulk phase's rows at
//!    PARIS, captured, until LONDON and MADRID hold them
//!    (`capture_bulk_update_s`).
//!
//! Everything is removed at the end: sidecars stopped, queues and
//! exchanges deleted, the clusters stopped and their directory removed.

mod capture;
mod resync;

use super::host::{create_owned_dir, random_hex};
use super::pg::{Cluster, Options, connect, find_bin_dir, sweep_orphans};
use crate::bus::publisher::started;
use crate::bus::{self, management::Management};
use crate::checkpoint::read_live;
use crate::config::{ManagementApi, redact_url};
use crate::engine::mariadb::position::Position as MariaPosition;
use crate::engine::postgres::position::Position;
use crate::lab::mariadb::{self as maria, Server as MariaServer};
use clap::Args;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection};
use mysql_async::prelude::Queryable;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Options of `sitesync bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Print one JSON object with every figure as the last line.
    #[arg(long)]
    pub json: bool,
    /// Small counts and short windows (a smoke run of a few seconds; the figures mean little).
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub rabbit: super::BrokerArgs,
    /// Outbox rows preloaded for the source figure (and messages for the raw figures).
    #[arg(long, value_name = "N")]
    pub events: Option<u64>,
    /// How long the end-to-end and the latency runs last, in seconds.
    #[arg(long, value_name = "SECONDS")]
    pub seconds: Option<u64>,
    /// The offered rate of the latency run, in events per second.
    #[arg(long, value_name = "PER_S")]
    pub rate: Option<u64>,
    /// Rows in the bulk transaction.
    #[arg(long, value_name = "N")]
    pub bulk: Option<u64>,
    /// Also print the SQL statements that took the most server time at
    /// PARIS and LONDON during the end-to-end run (loads pg_stat_statements
    /// into the private clusters).
    #[arg(long)]
    pub statements: bool,
    /// The publisher window (unconfirmed messages in flight), for the
    /// sidecars and the raw publisher alike.
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65_535))]
    pub window: u64,
    /// Skip the MariaDB phases (they run when MariaDB's server binaries are
    /// installed).
    #[arg(long)]
    pub no_mariadb: bool,
    /// Skip the capture phase (the write cost of a capture trigger, and a
    /// captured bulk UPDATE).
    #[arg(long)]
    pub no_capture: bool,
    /// Skip the resync phase (rows sent by `sitesync resync` to a site that
    /// lacks them, one per message, in packs, in compressed packs).
    #[arg(long)]
    pub no_resync: bool,
    /// Rows of the resync phase's packed runs (one tenth of it, at least
    /// 1,000, one per message); 1,000,000 by default, 20,000 with --quick.
    #[arg(long, value_name = "N")]
    pub resync_rows: Option<u64>,
}

/// The counts of one run.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    window: u64,
    /// Messages of each raw publish phase (as many as the source phase).
    raw: u64,
    /// Messages of each raw round trip phase.
    raw_trip: u64,
    source: u64,
    seconds: u64,
    rate: u64,
    bulk: u64,
    idle: u64,
    /// Rows of the resync runs: one per message, then packed.
    resync_single: u64,
    resync_packed: u64,
    /// How long each phase may wait for a quiet machine (none in a quick
    /// run, which runs among the tests).
    settle: Duration,
}

impl Figures {
    /// The mean of the plain runs around the metrics phase (the first
    /// end-to-end phase when there are none).
    fn e2e_plain_per_s(&self) -> f64 {
        match self.e2e_plain_runs.is_empty() {
            true => self.e2e_per_s,
            false => self.e2e_plain_runs.iter().sum::<f64>() / self.e2e_plain_runs.len() as f64,
        }
    }

    /// The metrics phase against its baseline, in percent (negative: slower).
    fn metrics_delta_pct(&self) -> f64 {
        (self.e2e_metrics_per_s / self.e2e_plain_per_s().max(1.0) - 1.0) * 100.0
    }
}

impl Sizes {
    fn of(a: &BenchArgs) -> Sizes {
        let base = if a.quick {
            Sizes {
                window: a.window,
                raw: 2_000,
                raw_trip: 2_000,
                source: 2_000,
                seconds: 3,
                rate: 200,
                bulk: 2_000,
                idle: 2,
                resync_single: 2_000,
                resync_packed: 20_000,
                settle: Duration::ZERO,
            }
        } else {
            Sizes {
                window: a.window,
                raw: 100_000,
                raw_trip: 50_000,
                source: 100_000,
                seconds: 30,
                rate: 1_000,
                bulk: 100_000,
                idle: 10,
                resync_single: 100_000,
                resync_packed: 1_000_000,
                settle: Duration::from_secs(60),
            }
        };
        Sizes {
            window: a.window,
            raw: a.events.map_or(base.raw, |n| n.max(100)),
            raw_trip: a.events.map_or(base.raw_trip, |n| (n / 2).max(100)),
            source: a.events.unwrap_or(base.source),
            seconds: a.seconds.unwrap_or(base.seconds),
            rate: a.rate.unwrap_or(base.rate).max(1),
            bulk: a.bulk.unwrap_or(base.bulk),
            idle: base.idle,
            resync_single: a
                .resync_rows
                .map_or(base.resync_single, |n| (n / 10).max(1_000)),
            resync_packed: a.resync_rows.unwrap_or(base.resync_packed).max(1),
            settle: base.settle,
        }
    }
}

/// The figures, in the order printed.
#[derive(Debug, Default)]
struct Figures {
    /// The mean of `raw_publish_runs`.
    raw_publish_confirm_per_s: f64,
    /// The mean of `raw_trip_runs`.
    raw_round_trip_per_s: f64,
    /// Before the sitesync phases and after them.
    raw_publish_runs: Vec<f64>,
    raw_trip_runs: Vec<f64>,
    /// PARIS's sidecar with its sink off.
    source_per_s: f64,
    /// Then its sink alone: the events back round, each deleting its
    /// outbox row.
    own_return_per_s: f64,
    e2e_per_s: f64,
    e2e_written_per_s: f64,
    /// The share of the writers' time spent held back by the backlog: near
    /// zero, the writers (not sitesync) set the end-to-end rate.
    e2e_held_pct: f64,
    e2e_p50_ms: f64,
    e2e_p95_ms: f64,
    e2e_p99_ms: f64,
    e2e_max_ms: f64,
    /// CPU milliseconds per 1,000 events during the end-to-end phase, by part.
    e2e_cpu: Vec<(String, f64)>,
    /// After the end-to-end phase's events were applied at LONDON and
    /// MADRID, how long until PARIS's archive held them all.
    e2e_archive_lag_s: f64,
    /// The end-to-end phase again, every sink sending receipts and PARIS's
    /// archive too (PARIS recording them).
    e2e_receipts_per_s: f64,
    /// The end-to-end phase again, every sidecar exposing `/metrics`
    /// (`[admin] listen`) and scraped every second.
    e2e_metrics_per_s: f64,
    /// Scrapes answered during that phase (three sidecars, one a second).
    metrics_scrapes: u64,
    /// The plain end-to-end phase just before and just after the metrics
    /// phase: its baseline, free of the drift over a long run.
    e2e_plain_runs: Vec<f64>,
    /// `sitesync replay` of PARIS's archive to LONDON's queue (the whole
    /// command: its count, then the confirmed sends), events a second.
    replay_per_s: f64,
    replay_events: i64,
    /// The same during the source phase.
    source_cpu: Vec<(String, f64)>,
    bulk_100k_s: f64,
    rss_mib_peak: f64,
    rss_mib_idle: f64,
    cpu_idle_pct: f64,
    /// The MariaDB phases, when they ran.
    mariadb: Option<MariaFigures>,
    /// The capture phase, when it ran.
    capture: Option<capture::CaptureFigures>,
    /// The resync phase, when it ran.
    resync: Option<resync::ResyncFigures>,
}

/// The MariaDB site's figures.
#[derive(Debug, Default, Clone, Copy)]
struct MariaFigures {
    source_per_s: f64,
    e2e_per_s: f64,
    e2e_written_per_s: f64,
    e2e_held_pct: f64,
}

const SITES: [&str; 3] = ["PARIS", "LONDON", "MADRID"];
const DIR_PREFIX: &str = "ssbench-";
/// The event type and table of the bench.
const TYPE: &str = "bench.upsert";
const BUSINESS: &str =
    "CREATE TABLE bench_item (id bigint PRIMARY KEY, n int NOT NULL, payload text NOT NULL)";
/// Id ranges of the phases (the source phase uses 1..).
const E2E_BASE: i64 = 10_000_000;
const LATENCY_BASE: i64 = 20_000_000;
const BULK_BASE: i64 = 30_000_000;
const E2E_RECEIPTS_BASE: i64 = 15_000_000;
const E2E_METRICS_BASE: i64 = 17_000_000;
/// The plain end-to-end runs just before and just after the metrics phase.
const E2E_PLAIN_BEFORE_BASE: i64 = 16_000_000;
const E2E_PLAIN_AFTER_BASE: i64 = 18_000_000;
const MARIADB_E2E_BASE: i64 = 40_000_000;
const WARM_ID: i64 = 9_999_999;
const MARIADB_WARM_ID: i64 = 39_999_999;
/// The MariaDB site's business table.
const MARIADB_BUSINESS: &str = "CREATE TABLE bench_item (id bigint PRIMARY KEY, n int NOT NULL, payload text NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";
/// The key of the MariaDB site's sidecar among the bench's processes.
const MARIADB_SITE: &str = "LONDON (MariaDB)";
/// How far the end-to-end writers may run ahead of the slower sink.
const E2E_BACKLOG: u64 = 5_000;
/// Writers of the end-to-end phase (connections to PARIS).
const E2E_WRITERS: usize = 4;
/// The payload of every event: 64 bytes of text, like a small business row.
const PAYLOAD_SQL: &str = "repeat('x', 64)";
/// How a phase waits for a condition.
const POLL: Duration = Duration::from_millis(50);

pub async fn run(args: BenchArgs) -> Result<ExitCode, String> {
    let sizes = Sizes::of(&args);
    let mut bench = Bench::new(&args)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("installing a SIGTERM handler: {e}"))?;
    let result = tokio::select! {
        r = async {
            bench.setup().await?;
            bench.measure(sizes).await
        } => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
        _ = term.recv() => Err("terminated".to_string()),
    };
    bench.cleanup().await;
    let figures = result?;
    print!("{}", render(&figures, &sizes, &bench.context));
    if args.json {
        println!("{}", json(&figures));
    }
    Ok(ExitCode::SUCCESS)
}

struct Bench {
    broker: String,
    management: Option<String>,
    token: String,
    dir: PathBuf,
    clusters: Vec<Cluster>,
    connectors: HashMap<&'static str, PathBuf>,
    /// PARIS's connector with its sink off, for the source phase.
    source_only: PathBuf,
    /// Each site's connector with receipts on (the receipts phase).
    with_receipts: HashMap<&'static str, PathBuf>,
    /// Each site's connector with `[admin] listen`, and its port (the
    /// metrics phase).
    with_metrics: HashMap<&'static str, (PathBuf, u16)>,
    sidecars: HashMap<&'static str, Child>,
    /// Each running sidecar's log file.
    logs: HashMap<&'static str, PathBuf>,
    names: Names,
    declared: bool,
    window: usize,
    statements: bool,
    context: String,
    /// The backends of the end-to-end writers at PARIS: the application's
    /// own transactions, told apart from the sink's in the CPU tables.
    writer_backends: Vec<u32>,
    /// Run the MariaDB phases (when the binaries are there).
    with_mariadb: bool,
    /// Run the capture phase.
    with_capture: bool,
    with_resync: bool,
    /// The MariaDB site, once started.
    maria: Option<MariaSite>,
}

/// LONDON on a private MariaDB server, for the MariaDB phases.
struct MariaSite {
    server: MariaServer,
    /// Its connector, and the same without its sink.
    connector: PathBuf,
    source_only: PathBuf,
}

/// The bench's broker names.
struct Names {
    exchange: String,
    dlx: String,
    dlq: String,
    prefix: String,
    archive: String,
}

impl Names {
    fn site(&self, site: &str) -> String {
        format!("{}{site}", self.prefix)
    }

    fn site_queues(&self) -> Vec<String> {
        SITES.iter().map(|s| self.site(s)).collect()
    }
}

fn say(message: impl AsRef<str>) {
    eprintln!("[bench] {}", message.as_ref());
}

impl Bench {
    fn new(args: &BenchArgs) -> Result<Bench, String> {
        let token = random_hex(8);
        let t = format!("bench-{token}");
        Ok(Bench {
            broker: args.rabbit.broker.clone(),
            management: (!args.rabbit.no_management).then(|| args.rabbit.management_url.clone()),
            dir: PathBuf::from(format!("/tmp/{DIR_PREFIX}{token}")),
            token,
            clusters: Vec::new(),
            connectors: HashMap::new(),
            source_only: PathBuf::new(),
            with_receipts: HashMap::new(),
            with_metrics: HashMap::new(),
            sidecars: HashMap::new(),
            logs: HashMap::new(),
            names: Names {
                exchange: format!("{t}.events"),
                dlx: format!("{t}.dlx"),
                dlq: format!("{t}.dlq"),
                prefix: format!("{t}_SITE_"),
                archive: format!("{t}_SITE_PARIS_HISTO"),
            },
            declared: false,
            window: args.window as usize,
            statements: args.statements,
            context: String::new(),
            writer_backends: Vec::new(),
            with_mariadb: !args.no_mariadb,
            with_capture: !args.no_capture,
            with_resync: !args.no_resync,
            maria: None,
        })
    }

    async fn setup(&mut self) -> Result<(), String> {
        let conn = self.connect_broker("sitesync-bench").await?;
        drop(conn);
        let mut version = "(version unknown without the management API)".to_string();
        if let Some(url) = self.management.clone() {
            let api = Management::new(&ManagementApi::parse(&url, &self.broker)?);
            match tokio::task::spawn_blocking(move || api.version())
                .await
                .map_err(|e| e.to_string())?
            {
                Ok(v) => version = v,
                Err(e) => {
                    say(format!(
                        "the management API does not answer ({e}): bindings are not verified"
                    ));
                    self.management = None;
                }
            }
        }
        let bin = find_bin_dir()?;
        sweep_orphans(DIR_PREFIX, false);
        create_owned_dir(&self.dir, 0o755)
            .map_err(|e| format!("preparing {}: {e}", self.dir.display()))?;
        say(format!(
            "starting three private PostgreSQL clusters ({}) in {}",
            bin.display(),
            self.dir.display()
        ));
        let mut starts = Vec::new();
        for site in SITES {
            let pg_dir = self.dir.join(site.to_lowercase());
            std::fs::create_dir(&pg_dir).map_err(|e| format!("{}: {e}", pg_dir.display()))?;
            let options = Options {
                extra_settings: format!(
                    // PostgreSQL's default, over the demo's 32MB: a site's
                    // server is not a throw-away one.
                    "shared_buffers = 128MB\n{}{}",
                    match self.statements {
                        true => "shared_preload_libraries = 'pg_stat_statements'\n",
                        false => "",
                    },
                    // More settings for the private clusters, one per line
                    // (auto_explain while profiling, say).
                    std::env::var("SITESYNC_BENCH_PG_SETTINGS").unwrap_or_default()
                ),
                ..Options::throwaway(site)
            };
            let mut cluster = Cluster::new(pg_dir, bin.clone(), options)?;
            starts.push(tokio::spawn(async move {
                let r = cluster.start().await;
                (cluster, r)
            }));
        }
        let mut failed = None;
        for start in starts {
            let (cluster, r) = start.await.map_err(|e| e.to_string())?;
            self.clusters.push(cluster);
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let mut pg_version = String::new();
        for site in SITES {
            let db = site.to_lowercase();
            let admin = connect(&self.cluster(site).url("postgres")).await?;
            pg_version = admin
                .query_one("SHOW server_version", &[])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await
                .map_err(|e| format!("creating database {db}: {e}"))?;
            if self.statements {
                connect(&self.url(&db))
                    .await?
                    .batch_execute("CREATE EXTENSION pg_stat_statements")
                    .await
                    .map_err(|e| format!("{site}: {e}"))?;
            }
            connect(&self.url(&db))
                .await?
                .batch_execute(BUSINESS)
                .await
                .map_err(|e| format!("{site}: {e}"))?;
        }
        self.write_config()?;
        for site in SITES {
            self.sitesync(site, &["init"]).await?;
        }
        self.declared = true;
        self.sitesync("PARIS", &["topology", "declare"]).await?;
        let maria_version = match self.with_mariadb {
            true => self.setup_mariadb().await?,
            false => None,
        };
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        self.context = format!(
            "{cores} cores; RabbitMQ {version}; PostgreSQL {pg_version} (a private cluster per site, fsync off){}; management API {}",
            maria_version
                .map(|v| format!("; MariaDB {v} (a private server, binlog in ROW format)"))
                .unwrap_or_default(),
            if self.management.is_some() {
                "on"
            } else {
                "off"
            }
        );
        Ok(())
    }

    /// Starts the MariaDB site (a private server with its `london`
    /// database and business table), writes its connectors and runs
    /// `sitesync init`; its version. `None` when MariaDB is not installed.
    async fn setup_mariadb(&mut self) -> Result<Option<String>, String> {
        if let Err(e) = maria::find_binaries() {
            say(format!("the MariaDB phases are skipped: {e}"));
            return Ok(None);
        }
        let dir = self.dir.join("london-mariadb");
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        say(format!(
            "starting a private MariaDB server for the MariaDB phases in {}",
            dir.display()
        ));
        let server = MariaServer::start(dir, maria::Options::new("LONDON")).await?;
        server.create_database("london").await?;
        let mut c = server.conn(Some("london")).await?;
        c.query_drop(MARIADB_BUSINESS)
            .await
            .map_err(|e| format!("LONDON (MariaDB): {e}"))?;
        let version: String = c
            .query_first("SELECT VERSION()")
            .await
            .map_err(|e| format!("LONDON (MariaDB): {e}"))?
            .unwrap_or_default();
        drop(c);
        let management = self
            .management
            .as_ref()
            .map(|m| format!("management_url = \"{m}\"\n"))
            .unwrap_or_default();
        let head = format!(
            "site = \"LONDON\"\nname = \"london_mariadb\"\n\n[database]\nkind = \"mariadb\"\nurl = \"{url}\"\n\n[broker]\nurls = [\"{broker}\"]\ntopology = \"{topology}\"\n{management}publisher_window = {window}\n\n[checkpoint]\ndir = \"{ck}\"\n\n",
            url = server.url("london"),
            broker = self.broker.replace('"', "\\\""),
            topology = self.dir.join("topology.toml").display(),
            window = self.window,
            ck = self
                .dir
                .join("checkpoints")
                .join("london_mariadb")
                .display(),
        );
        let connector = self.dir.join("london-mariadb.toml");
        let text = format!(
            "{head}[sink]\n\n[[sink.routes]]\ntype = \"{TYPE}\"\ntable = \"bench_item\"\nkey = [\"id\"]\n"
        );
        std::fs::write(&connector, text).map_err(|e| format!("{}: {e}", connector.display()))?;
        let source_only = self.dir.join("london-mariadb-source.toml");
        std::fs::write(&source_only, format!("{head}[sink]\nenabled = false\n"))
            .map_err(|e| format!("{}: {e}", source_only.display()))?;
        self.connectors.insert(MARIADB_SITE, connector.clone());
        self.maria = Some(MariaSite {
            server,
            connector,
            source_only,
        });
        self.sitesync(MARIADB_SITE, &["init"]).await?;
        Ok(Some(version))
    }

    /// A connection to the bench's broker, named `name` in RabbitMQ.
    async fn connect_broker(&self, name: &str) -> Result<bus::Link, String> {
        bus::connect(
            std::slice::from_ref(&self.broker),
            Duration::from_secs(5),
            name,
        )
        .await
        .map_err(|e| format!("RabbitMQ at {}: {e}", redact_url(&self.broker)))
    }

    fn cluster(&self, site: &str) -> &Cluster {
        self.clusters
            .iter()
            .find(|c| c.name() == site)
            .expect("started")
    }

    /// The URL of a site's database (`paris`, `london`, `madrid`).
    fn url(&self, db: &str) -> String {
        self.cluster(&db.to_uppercase()).url(db)
    }

    fn write_config(&mut self) -> Result<(), String> {
        let n = &self.names;
        let topology = self.dir.join("topology.toml");
        let text = format!(
            "exchange = \"{}\"\nsites = [\"PARIS\", \"LONDON\", \"MADRID\"]\nsite_queue_prefix = \"{}\"\narchive_queue = \"{}\"\ndead_letter_exchange = \"{}\"\ndead_letter_queue = \"{}\"\narchive_site = \"PARIS\"\n",
            n.exchange, n.prefix, n.archive, n.dlx, n.dlq
        );
        std::fs::write(&topology, text).map_err(|e| format!("{}: {e}", topology.display()))?;
        let management = self
            .management
            .as_ref()
            .map(|m| format!("management_url = \"{m}\"\n"))
            .unwrap_or_default();
        for site in SITES {
            let db = site.to_lowercase();
            let file = self.dir.join(format!("{db}.toml"));
            let text = format!(
                "site = \"{site}\"\n\n[database]\nkind = \"postgres\"\nurl = \"{url}\"\n\n[broker]\nurls = [\"{broker}\"]\ntopology = \"{topology}\"\n{management}publisher_window = {window}\n\n[checkpoint]\ndir = \"{ck}\"\n\n[sink]\n\n[[sink.routes]]\ntype = \"{TYPE}\"\ntable = \"public.bench_item\"\nkey = [\"id\"]\n",
                url = self.url(&db),
                broker = self.broker.replace('"', "\\\""),
                topology = topology.display(),
                window = self.window,
                ck = self.dir.join("checkpoints").join(&db).display(),
            );
            // PARIS archives, as in production (its source-only connector
            // below, cut at `[sink]`, does not).
            let archive = if site == "PARIS" { "\n[archive]\n" } else { "" };
            std::fs::write(&file, format!("{text}{archive}"))
                .map_err(|e| format!("{}: {e}", file.display()))?;
            if site == "PARIS" {
                // The same connector (slot, checkpoint) without its sink.
                let (head, _) = text.split_once("[sink]").expect("the text has a sink");
                let source_only = self.dir.join("paris-source.toml");
                let text = format!("name = \"{db}\"\n{head}[sink]\nenabled = false\n");
                std::fs::write(&source_only, text)
                    .map_err(|e| format!("{}: {e}", source_only.display()))?;
                self.source_only = source_only;
            }
            // The same connector with receipts on (sink, and PARIS's archive).
            let receipts = self.dir.join(format!("{db}-receipts.toml"));
            let archive = if site == "PARIS" {
                "\n[archive]\nreceipts = true\n"
            } else {
                ""
            };
            let text = format!(
                "name = \"{db}\"\n{}{archive}",
                text.replacen("[sink]\n", "[sink]\nreceipts = true\n", 1)
            );
            std::fs::write(&receipts, text).map_err(|e| format!("{}: {e}", receipts.display()))?;
            self.with_receipts.insert(site, receipts);
            // The same connector with its admin listener on (/metrics).
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("a free port for {site}'s admin listener: {e}"))?
                .port();
            let exposed = self.dir.join(format!("{db}-metrics.toml"));
            let base =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let text = format!("name = \"{db}\"\n{base}\n[admin]\nlisten = \"127.0.0.1:{port}\"\n");
            std::fs::write(&exposed, text).map_err(|e| format!("{}: {e}", exposed.display()))?;
            self.with_metrics.insert(site, (exposed, port));
            self.connectors.insert(site, file);
        }
        Ok(())
    }

    /// Runs `sitesync <args> --connector <site>` to completion.
    async fn sitesync(&self, site: &str, args: &[&str]) -> Result<(), String> {
        let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(args)
            .arg("--connector")
            .arg(&self.connectors[site])
            .env("RUST_LOG", sidecar_log());
        let out = cmd
            .output()
            .await
            .map_err(|e| format!("sitesync {args:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "sitesync {} at {site} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn spawn(&mut self, site: &'static str) -> Result<u32, String> {
        let connector = self.connectors[site].clone();
        self.spawn_with(site, &connector)
    }

    /// Starts `site`'s sidecar on `connector`.
    fn spawn_with(&mut self, site: &'static str, connector: &Path) -> Result<u32, String> {
        let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
        let stem = connector
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(site);
        let log = self.dir.join(format!("{stem}.log"));
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(exe)
            .args(["run", "--connector"])
            .arg(connector)
            .env("RUST_LOG", sidecar_log())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting the {site} sidecar: {e}"))?;
        let pid = child.id();
        self.sidecars.insert(site, child);
        self.logs.insert(site, log);
        Ok(pid)
    }

    async fn measure(&mut self, sizes: Sizes) -> Result<Figures, String> {
        let mut f = Figures::default();
        self.raw_phases(&sizes, &mut f, "before the sitesync phases")
            .await?;

        let paris = connect(&self.url("paris")).await?;
        say(format!(
            "source: {} outbox rows preloaded at PARIS in transactions of 100",
            sizes.source
        ));
        let mut first = 1i64;
        while first <= sizes.source as i64 {
            let last = (first + 99).min(sizes.source as i64);
            paris
                .execute(
                    &format!(
                        "INSERT INTO outbox (type, entity_key, data) SELECT '{TYPE}', g::text, \
                         jsonb_build_object('id', g, 'n', 0, 'payload', {PAYLOAD_SQL}) FROM generate_series($1::bigint, $2::bigint) g"
                    ),
                    &[&first, &last],
                )
                .await
                .map_err(|e| format!("preloading: {e}"))?;
            first = last + 1;
        }
        quiesce("source", sizes.settle).await;
        let cpu_before = self.cpu_by_part();
        let began = Instant::now();
        // Its sink off, as the raw publish has no consumer: what the sink
        // then does with the events back round is the next phase.
        let source_only = self.source_only.clone();
        let source_pid = self.spawn_with("PARIS", &source_only)?;
        let ck = self.dir.join("checkpoints").join("paris");
        let target = sizes.source + 1;
        let mut first_checkpoint = None;
        self.poll_while_running("PARIS", Duration::from_secs(900), async || {
            let next = read_live::<Position>(&ck).map_or(0, |(_, c)| c.next_seq);
            if next > 1 && first_checkpoint.is_none() {
                first_checkpoint = Some(began.elapsed());
            }
            Ok((next >= target)
                .then_some(())
                .ok_or(format!("the PARIS checkpoint: {next} of {target}")))
        })
        .await?;
        let elapsed = began.elapsed();
        if let Some(first) = first_checkpoint {
            say(format!(
                "source: first checkpoint {:.2} s after the sidecar started, the last {:.2} s after it",
                first.as_secs_f64(),
                elapsed.as_secs_f64()
            ));
        }
        f.source_per_s = sizes.source as f64 / elapsed.as_secs_f64();
        f.source_cpu = self.cpu_since("source", &cpu_before, sizes.source as i64, elapsed);
        let source_peak = proc_status_kib(source_pid, "VmHWM:")? / 1024.0;
        self.stop_sidecar("PARIS").await;

        // The whole sidecar now: its sink takes the events back round from
        // PARIS's queue, each deleting its outbox row.
        say(format!(
            "own events back round: PARIS's sink takes its {} events from its queue",
            sizes.source
        ));
        quiesce("own events back round", sizes.settle).await;
        // The source phase filled the archive queue: the sink's figure is
        // the sink's alone.
        self.purge_archive().await?;
        let cpu_before = self.cpu_by_part();
        let began = Instant::now();
        let mut paris_pid = self.spawn("PARIS")?;
        self.poll_while_running("PARIS", Duration::from_secs(600), async || {
            let now = received(&paris).await?;
            Ok((now >= sizes.source as i64).then_some(()).ok_or(format!(
                "PARIS's events back round: {now} of {}",
                sizes.source
            )))
        })
        .await?;
        let elapsed = began.elapsed();
        f.own_return_per_s = sizes.source as f64 / elapsed.as_secs_f64();
        self.cpu_since(
            "own events back round",
            &cpu_before,
            sizes.source as i64,
            elapsed,
        );
        // LONDON and MADRID were not running: start them on empty queues.
        let conn = self.connect_broker("sitesync-bench").await?;
        for q in [
            self.names.site("LONDON"),
            self.names.site("MADRID"),
            self.names.archive.clone(),
        ] {
            purge(&conn, &q).await?;
        }
        drop(conn);
        wait_count(
            &paris,
            "SELECT count(*) FROM outbox",
            0,
            "PARIS's outbox to empty",
        )
        .await?;
        self.spawn("LONDON")?;
        self.spawn("MADRID")?;
        let london = connect(&self.url("london")).await?;
        let madrid = connect(&self.url("madrid")).await?;
        say("warming up: one event through LONDON and MADRID");
        write_rows(&paris, WARM_ID, 1).await?;
        for c in [&london, &madrid] {
            wait_count(
                c,
                &format!("SELECT count(*) FROM bench_item WHERE id = {WARM_ID}"),
                1,
                "the warm-up event",
            )
            .await?;
        }

        say(format!(
            "end to end: {E2E_WRITERS} writers at PARIS for {} s, as fast as they go",
            sizes.seconds
        ));
        if self.statements {
            for db in ["paris", "london"] {
                connect(&self.url(db))
                    .await?
                    .batch_execute("SELECT pg_stat_statements_reset()")
                    .await
                    .map_err(|e| format!("{db}: {e}"))?;
            }
        }
        // The writers' connections stay open until the CPU is read: a
        // backend that has exited is in no part's ticks.
        let mut writers = Vec::new();
        self.writer_backends.clear();
        for _ in 0..E2E_WRITERS {
            let client = connect(&self.url("paris")).await?;
            let pid: i32 = client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .map_err(|e| format!("PARIS: {e}"))?
                .get(0);
            self.writer_backends.push(pid as u32);
            writers.push(Arc::new(client));
        }
        quiesce("end to end", sizes.settle).await;
        let cpu_before = self.cpu_by_part();
        let (written, elapsed, held_pct) = self
            .e2e(
                &[(&london).into(), (&madrid).into()],
                &writers,
                sizes.seconds,
                E2E_BASE,
            )
            .await?;
        f.e2e_held_pct = held_pct;
        f.e2e_cpu = self.cpu_since("end to end", &cpu_before, written, elapsed);
        drop(writers);
        if self.statements {
            for db in ["paris", "london"] {
                say(top_statements(&connect(&self.url(db)).await?, db, written).await?);
            }
        }
        f.e2e_per_s = written as f64 / elapsed.as_secs_f64();
        f.e2e_written_per_s = written as f64 / sizes.seconds as f64;
        // PARIS archived the phase meanwhile (its sidecar consumes the
        // archive queue): every event of it is in the archive table.
        let archived = format!(
            "SELECT count(*) FROM sitesync_archive WHERE origin = 'PARIS' AND (data->>'id')::bigint >= {E2E_BASE} AND (data->>'id')::bigint < {}",
            E2E_BASE + 10_000_000
        );
        let began = Instant::now();
        wait_count(
            &paris,
            &archived,
            written,
            "the end-to-end events in PARIS's archive",
        )
        .await?;
        f.e2e_archive_lag_s = began.elapsed().as_secs_f64();
        say(format!(
            "end to end: PARIS's archive held the phase's {written} events {:.2} s after the other sites had applied them",
            f.e2e_archive_lag_s
        ));
        self.purge_archive().await?;

        // Receipts: the same phase with every sink receipting and PARIS's
        // archive too, beside the phase above (same run, same machine).
        let e2e_peak = proc_status_kib(paris_pid, "VmHWM:")? / 1024.0;
        self.stop_sidecars().await;
        for site in SITES {
            let c = self.with_receipts[site].clone();
            self.spawn_with(site, &c)?;
        }
        quiesce("end to end with receipts", sizes.settle).await;
        let mut writers = Vec::new();
        for _ in 0..E2E_WRITERS {
            writers.push(Arc::new(connect(&self.url("paris")).await?));
        }
        say(format!(
            "end to end with receipts: {E2E_WRITERS} writers at PARIS for {} s",
            sizes.seconds
        ));
        let (written_r, elapsed_r, _) = self
            .e2e(
                &[(&london).into(), (&madrid).into()],
                &writers,
                sizes.seconds,
                E2E_RECEIPTS_BASE,
            )
            .await?;
        drop(writers);
        f.e2e_receipts_per_s = written_r as f64 / elapsed_r.as_secs_f64();
        // Every event of the phase gets its receipts at PARIS: two sites'
        // and the archive's.
        let receipted = format!(
            "SELECT count(*) FROM sitesync_receipts r JOIN sitesync_archive a ON a.event_id = r.event_id \
             WHERE (a.data->>'id')::bigint >= {E2E_RECEIPTS_BASE} AND (a.data->>'id')::bigint < {}",
            E2E_RECEIPTS_BASE + 5_000_000
        );
        wait_count(
            &paris,
            &receipted,
            written_r * 3,
            "the receipts of the phase at PARIS",
        )
        .await?;
        say(format!(
            "end to end with receipts: {:.0} ev/s against {:.0} without ({:+.1} %); PARIS holds the {} receipts",
            f.e2e_receipts_per_s,
            f.e2e_per_s,
            (f.e2e_receipts_per_s / f.e2e_per_s.max(1.0) - 1.0) * 100.0,
            written_r * 3
        ));
        self.stop_sidecars().await;
        self.purge_archive().await?;

        // The metrics phase's baseline: the plain phase again, just before
        // it (and just after it, below).
        for site in SITES {
            self.spawn(site)?;
        }
        quiesce("end to end, before the metrics phase", sizes.settle).await;
        let before = self
            .plain_e2e(&london, &madrid, sizes.seconds, E2E_PLAIN_BEFORE_BASE)
            .await?;
        f.e2e_plain_runs.push(before);
        self.stop_sidecars().await;
        self.purge_archive().await?;

        // Metrics: the same phase with every sidecar's admin listener on
        // and scraped every second, as Prometheus would (same run).
        for site in SITES {
            let c = self.with_metrics[site].0.clone();
            self.spawn_with(site, &c)?;
        }
        quiesce("end to end with metrics", sizes.settle).await;
        let ports: Vec<u16> = SITES.iter().map(|s| self.with_metrics[s].1).collect();
        // The phase starts once every listener answers (a scrape before a
        // sidecar has bound its port would count as a failure).
        for port in &ports {
            let deadline = Instant::now() + Duration::from_secs(60);
            while tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .is_err()
            {
                if Instant::now() > deadline {
                    return Err(format!(
                        "end to end with metrics: nothing listens on 127.0.0.1:{port} after 60 s"
                    ));
                }
                tokio::time::sleep(POLL).await;
            }
        }
        let scraping = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let scraper = {
            let scraping = scraping.clone();
            tokio::task::spawn_blocking(move || scrape_every_second(&ports, &scraping))
        };
        let mut writers = Vec::new();
        for _ in 0..E2E_WRITERS {
            writers.push(Arc::new(connect(&self.url("paris")).await?));
        }
        say(format!(
            "end to end with metrics: {E2E_WRITERS} writers at PARIS for {} s, /metrics of the three sidecars scraped every second",
            sizes.seconds
        ));
        let measured = self
            .e2e(
                &[(&london).into(), (&madrid).into()],
                &writers,
                sizes.seconds,
                E2E_METRICS_BASE,
            )
            .await;
        scraping.store(false, Ordering::Relaxed);
        let (answered, failed) = scraper
            .await
            .map_err(|e| format!("the metrics scraper: {e}"))?;
        let (written_m, elapsed_m, _) = measured?;
        drop(writers);
        if answered == 0 || failed > 0 {
            return Err(format!(
                "end to end with metrics: {answered} scrapes answered, {failed} failed"
            ));
        }
        f.e2e_metrics_per_s = written_m as f64 / elapsed_m.as_secs_f64();
        f.metrics_scrapes = answered;
        self.stop_sidecars().await;
        for site in SITES {
            let pid = self.spawn(site)?;
            if site == "PARIS" {
                paris_pid = pid;
            }
        }
        self.purge_archive().await?;
        quiesce("end to end, after the metrics phase", sizes.settle).await;
        let after = self
            .plain_e2e(&london, &madrid, sizes.seconds, E2E_PLAIN_AFTER_BASE)
            .await?;
        f.e2e_plain_runs.push(after);
        say(format!(
            "end to end with metrics: {:.0} ev/s against {:.0} without ({:+.1} %; the mean of {before:.0} just before and {after:.0} just after); {answered} scrapes answered",
            f.e2e_metrics_per_s,
            f.e2e_plain_per_s(),
            f.metrics_delta_pct(),
        ));
        self.purge_archive().await?;
        quiesce("latency", sizes.settle).await;

        say(format!(
            "latency: {} events/s offered at PARIS for {} s",
            sizes.rate, sizes.seconds
        ));
        let (p50, p95, p99, max) = self
            .latency(&paris, &london, &madrid, sizes.rate, sizes.seconds)
            .await?;
        (f.e2e_p50_ms, f.e2e_p95_ms, f.e2e_p99_ms, f.e2e_max_ms) = (p50, p95, p99, max);
        self.purge_archive().await?;
        quiesce("bulk", sizes.settle).await;

        say(format!(
            "bulk: one transaction of {} rows at PARIS",
            sizes.bulk
        ));
        let began = Instant::now();
        write_rows(&paris, BULK_BASE, sizes.bulk as i64).await?;
        let committed = began.elapsed();
        let began = Instant::now();
        for c in [&london, &madrid] {
            wait_count(
                c,
                &format!("SELECT count(*) FROM bench_item WHERE id >= {BULK_BASE}"),
                sizes.bulk as i64,
                "the bulk transaction",
            )
            .await?;
        }
        f.bulk_100k_s = began.elapsed().as_secs_f64();
        say(format!(
            "bulk: committed in {:.1} s, applied at LONDON and MADRID {:.1} s later",
            committed.as_secs_f64(),
            f.bulk_100k_s
        ));

        wait_count(
            &paris,
            "SELECT count(*) FROM outbox",
            0,
            "PARIS's outbox to empty",
        )
        .await?;
        f.rss_mib_peak = source_peak
            .max(e2e_peak)
            .max(proc_status_kib(paris_pid, "VmHWM:")? / 1024.0);
        say(format!("idle: {} s", sizes.idle));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = proc_cpu_ticks(paris_pid)?;
        let began = Instant::now();
        tokio::time::sleep(Duration::from_secs(sizes.idle)).await;
        let ticks = proc_cpu_ticks(paris_pid)? - before;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        f.cpu_idle_pct = ticks as f64 / hz / began.elapsed().as_secs_f64() * 100.0;
        f.rss_mib_idle = proc_status_kib(paris_pid, "VmRSS:")? / 1024.0;

        if self.with_capture {
            self.capture_phases(&sizes, &mut f).await?;
        }

        // The broker's ceiling again, the sidecars stopped (the bench's
        // consumers need the single-active-consumer site queues): the
        // machine's load drifts over the minutes of a run, and the mean of
        // a measure before and after brackets the sitesync phases.
        self.stop_sidecars().await;
        // Replay: PARIS's archive (the end-to-end phases' events) to
        // LONDON's queue, LONDON's sidecar stopped; the queue is emptied
        // after.
        f.replay_events = paris
            .query_one("SELECT count(*) FROM sitesync_archive", &[])
            .await
            .map_err(|e| format!("counting PARIS's archive: {e}"))?
            .get(0);
        say(format!(
            "replay: {} archived events to LONDON's queue",
            f.replay_events
        ));
        let began = Instant::now();
        self.sitesync("PARIS", &["replay", "--to-site", "LONDON", "--yes"])
            .await?;
        f.replay_per_s = f.replay_events as f64 / began.elapsed().as_secs_f64();
        say(format!(
            "replay: {:.0} events/s, each confirmed",
            f.replay_per_s
        ));
        let conn = self.connect_broker("sitesync-bench").await?;
        purge(&conn, &self.names.site("LONDON")).await?;
        drop(conn);
        if self.with_resync {
            self.resync_phase(&sizes, &mut f).await?;
        }
        if self.maria.is_some() {
            f.mariadb = Some(self.mariadb_phases(&sizes, &paris).await?);
            self.stop_sidecars().await;
        }
        self.raw_phases(&sizes, &mut f, "after the sitesync phases")
            .await?;
        let mean = |runs: &[f64]| runs.iter().sum::<f64>() / runs.len().max(1) as f64;
        f.raw_publish_confirm_per_s = mean(&f.raw_publish_runs);
        f.raw_round_trip_per_s = mean(&f.raw_trip_runs);
        Ok(f)
    }

    /// The raw publish and raw round trip phases, on empty queues.
    async fn raw_phases(&self, sizes: &Sizes, f: &mut Figures, when: &str) -> Result<(), String> {
        let conn = self.connect_broker("sitesync-bench-raw").await?;
        self.purge(&conn).await?;
        let body = sample_body();
        say(format!(
            "raw publish with confirms, {when}: {} messages of {} bytes, window {}",
            sizes.raw,
            body.len(),
            self.window
        ));
        quiesce("raw publish", sizes.settle).await;
        let (cpu_before, began) = (self.cpu_by_part(), Instant::now());
        let rate = self.raw_publish(&conn, &body, sizes.raw).await?;
        self.cpu_since(
            "raw publish",
            &cpu_before,
            sizes.raw as i64,
            began.elapsed(),
        );
        f.raw_publish_runs.push(rate);
        self.purge(&conn).await?;
        say(format!(
            "raw round trip, {when}: {} messages, consumed and acked from every site queue",
            sizes.raw_trip
        ));
        quiesce("raw round trip", sizes.settle).await;
        let (cpu_before, began) = (self.cpu_by_part(), Instant::now());
        let rate = self.raw_round_trip(&conn, &body, sizes.raw_trip).await?;
        self.cpu_since(
            "raw round trip",
            &cpu_before,
            sizes.raw_trip as i64,
            began.elapsed(),
        );
        f.raw_trip_runs.push(rate);
        self.purge(&conn).await
    }

    /// Polls `done` until it is `Ok(Ok(()))`, while `site`'s sidecar runs,
    /// for at most `timeout`; `Ok(Err(seen))` says how far it got (for the
    /// error when time is up).
    async fn poll_while_running(
        &mut self,
        site: &str,
        timeout: Duration,
        mut done: impl AsyncFnMut() -> Result<Result<(), String>, String>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = match done().await? {
                Ok(()) => return Ok(()),
                Err(seen) => seen,
            };
            self.running(site)?;
            if Instant::now() > deadline {
                return Err(format!("{seen} after {} s", timeout.as_secs()));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// An error with the end of its log when `site`'s sidecar has exited.
    fn running(&mut self, site: &str) -> Result<(), String> {
        let child = self
            .sidecars
            .get_mut(site)
            .ok_or_else(|| format!("the {site} sidecar was not started"))?;
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                let log = self.logs.get(site).cloned().unwrap_or_default();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join("\n  ");
                Err(format!(
                    "the {site} sidecar exited ({status}); the end of {}:\n  {tail}",
                    log.display()
                ))
            }
            Err(e) => Err(format!("the {site} sidecar: {e}")),
        }
    }

    /// Stops one sidecar (SIGTERM: it drains and exits).
    async fn stop_sidecar(&mut self, site: &str) {
        if let Some(mut child) = self.sidecars.remove(site) {
            terminate(&child);
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }

    /// Stops the sidecars (SIGTERM: they drain and exit).
    async fn stop_sidecars(&mut self) {
        // All told first, so that they drain side by side.
        self.sidecars.values().for_each(terminate);
        for (_, mut child) in self.sidecars.drain() {
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }

    /// The CPU per 1,000 events by part since `before` (a
    /// [`Bench::cpu_by_part`] taken when the phase began), printed.
    fn cpu_since(
        &self,
        phase: &str,
        before: &BTreeMap<String, u64>,
        events: i64,
        elapsed: Duration,
    ) -> Vec<(String, f64)> {
        let after = self.cpu_by_part();
        let mut parts = cpu_delta(before, &after, events);
        let machine = parts
            .iter()
            .position(|(part, _)| part == MACHINE)
            .map(|i| parts.remove(i).1);
        say(render_cpu(phase, &parts, machine, events, elapsed));
        parts
    }

    /// CPU ticks so far of every process taking part, by part: each
    /// sidecar, each cluster's walsender, client backends and background
    /// processes (a PostgreSQL process's working directory is its data
    /// directory), RabbitMQ (`beam.smp`) and this process (the writers).
    fn cpu_by_part(&self) -> BTreeMap<String, u64> {
        let mut parts = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return parts;
        };
        let me = std::process::id();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let part = if pid == me {
                Some("bench (writers, probes)".to_string())
            } else if let Some((site, _)) = self.sidecars.iter().find(|(_, c)| c.id() == pid) {
                Some(format!("sitesync {site}"))
            } else if self.maria.as_ref().and_then(|m| m.server.pid()) == Some(pid) {
                Some("mariadb LONDON".to_string())
            } else {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "beam.smp" {
                    Some("rabbitmq".to_string())
                } else {
                    std::fs::read_link(format!("/proc/{pid}/cwd"))
                        .ok()
                        .and_then(|cwd| {
                            self.clusters.iter().find(|c| cwd.starts_with(c.data_dir()))
                        })
                        .map(|c| {
                            if self.writer_backends.contains(&pid) {
                                return format!("postgres {} writers' backends", c.name());
                            }
                            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                                .unwrap_or_default();
                            format!("postgres {} {}", c.name(), pg_process_kind(&cmd))
                        })
                }
            };
            if let (Some(part), Ok(ticks)) = (part, proc_cpu_ticks(pid)) {
                *parts.entry(part).or_insert(0) += ticks;
            }
        }
        if let Some((busy, _)) = machine_ticks() {
            parts.insert(MACHINE.to_string(), busy);
        }
        parts
    }

    /// Messages per second through lapin alone, confirms pipelined over
    /// the window, each message started the way sitesync's publisher starts
    /// one (`bus::publisher::started`: queued without waiting for it to be
    /// written).
    async fn raw_publish(&self, conn: &Connection, body: &[u8], n: u64) -> Result<f64, String> {
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let exchange: lapin::types::ShortString = self.names.exchange.as_str().into();
        let began = Instant::now();
        let mut inflight = VecDeque::with_capacity(self.window);
        for i in 0..n {
            inflight.push_back(started(
                &ch,
                exchange.clone(),
                body.to_vec(),
                raw_properties(i),
            ));
            if inflight.len() >= self.window {
                let sent = inflight.pop_front().expect("full").await;
                settle(sent.map_err(|e| format!("publishing: {e}"))?).await?;
            }
        }
        for sending in inflight {
            settle(sending.await.map_err(|e| format!("publishing: {e}"))?).await?;
        }
        let rate = n as f64 / began.elapsed().as_secs_f64();
        let _ = ch.close(200, "done".into()).await;
        Ok(rate)
    }

    /// The same publisher, with a consumer per site queue and one on the
    /// archive queue (the end-to-end phase drains all four, as production
    /// does); until every queue has delivered and had acked every message.
    async fn raw_round_trip(&self, conn: &Connection, body: &[u8], n: u64) -> Result<f64, String> {
        let mut consumers = Vec::new();
        let mut queues = self.names.site_queues();
        queues.push(self.names.archive.clone());
        for q in queues {
            let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
            ch.basic_qos(1000, BasicQosOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            let mut consumer = ch
                .basic_consume(
                    q.as_str().into(),
                    format!("bench-{}", self.token).as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("consuming {q}: {e}"))?;
            consumers.push(tokio::spawn(async move {
                let mut got = 0u64;
                while got < n {
                    match consumer.next().await {
                        Some(Ok(d)) => {
                            got += 1;
                            if got.is_multiple_of(100) || got == n {
                                d.ack(BasicAckOptions { multiple: true })
                                    .await
                                    .map_err(|e| e.to_string())?;
                            }
                        }
                        Some(Err(e)) => return Err(e.to_string()),
                        None => return Err("the consumer ended".to_string()),
                    }
                }
                let _ = ch.close(200, "done".into()).await;
                Ok::<(), String>(())
            }));
        }
        let began = Instant::now();
        self.raw_publish(conn, body, n).await?;
        for c in consumers {
            c.await.map_err(|e| e.to_string())??;
        }
        Ok(n as f64 / began.elapsed().as_secs_f64())
    }

    /// The MariaDB site's phases, every other sidecar stopped: its source
    /// alone on preloaded outbox rows, then PARIS's writers with its sink
    /// applying every event.
    async fn mariadb_phases(
        &mut self,
        sizes: &Sizes,
        paris: &Client,
    ) -> Result<MariaFigures, String> {
        let mut mf = MariaFigures::default();
        let m = self.maria.as_ref().expect("started");
        let (connector, source_only) = (m.connector.clone(), m.source_only.clone());
        let london = tokio::sync::Mutex::new(m.server.conn(Some("london")).await?);
        let conn = self.connect_broker("sitesync-bench").await?;
        self.purge(&conn).await?;

        say(format!(
            "MariaDB source: {} outbox rows preloaded at LONDON (MariaDB) in transactions of 100",
            sizes.source
        ));
        let mut first = 1u64;
        while first <= sizes.source {
            let last = (first + 99).min(sizes.source);
            // `seq_<a>_to_<b>`: MariaDB's Sequence engine, a table of numbers.
            london
                .lock()
                .await
                .query_drop(format!(
                    "INSERT INTO outbox (type, entity_key, data) SELECT '{TYPE}', seq, \
                     JSON_OBJECT('id', seq, 'n', 0, 'payload', REPEAT('x', 64)) FROM seq_{first}_to_{last}"
                ))
                .await
                .map_err(|e| format!("preloading at LONDON (MariaDB): {e}"))?;
            first = last + 1;
        }
        quiesce("MariaDB source", sizes.settle).await;
        let cpu_before = self.cpu_by_part();
        let began = Instant::now();
        self.spawn_with(MARIADB_SITE, &source_only)?;
        let ck = self.dir.join("checkpoints").join("london_mariadb");
        let target = sizes.source + 1;
        self.poll_while_running(MARIADB_SITE, Duration::from_secs(900), async || {
            let next = read_live::<MariaPosition>(&ck).map_or(0, |(_, c)| c.next_seq);
            Ok((next >= target).then_some(()).ok_or(format!(
                "the LONDON (MariaDB) checkpoint: {next} of {target}"
            )))
        })
        .await?;
        let elapsed = began.elapsed();
        mf.source_per_s = sizes.source as f64 / elapsed.as_secs_f64();
        self.cpu_since("MariaDB source", &cpu_before, sizes.source as i64, elapsed);
        self.stop_sidecar(MARIADB_SITE).await;
        self.purge(&conn).await?;
        drop(conn);

        self.spawn("PARIS")?;
        self.spawn_with(MARIADB_SITE, &connector)?;
        say("warming up: one event from PARIS through LONDON (MariaDB)");
        write_rows(paris, MARIADB_WARM_ID, 1).await?;
        wait_count(
            At::MariaDb(&london),
            &format!("SELECT count(*) FROM bench_item WHERE id = {MARIADB_WARM_ID}"),
            1,
            "the warm-up event at LONDON (MariaDB)",
        )
        .await?;
        say(format!(
            "PostgreSQL to MariaDB: {E2E_WRITERS} writers at PARIS for {} s, LONDON's sink on MariaDB",
            sizes.seconds
        ));
        let mut writers = Vec::new();
        for _ in 0..E2E_WRITERS {
            writers.push(Arc::new(connect(&self.url("paris")).await?));
        }
        quiesce("PostgreSQL to MariaDB", sizes.settle).await;
        let cpu_before = self.cpu_by_part();
        let (written, elapsed, held_pct) = self
            .e2e(
                &[At::MariaDb(&london)],
                &writers,
                sizes.seconds,
                MARIADB_E2E_BASE,
            )
            .await?;
        self.cpu_since("PostgreSQL to MariaDB", &cpu_before, written, elapsed);
        mf.e2e_per_s = written as f64 / elapsed.as_secs_f64();
        mf.e2e_written_per_s = written as f64 / sizes.seconds as f64;
        mf.e2e_held_pct = held_pct;
        Ok(mf)
    }

    /// Empties the archive queue between phases: what a phase left there
    /// (PARIS archives only while its whole sidecar runs) must not weigh
    /// on the next one, nor grow into a broker memory alarm.
    async fn purge_archive(&self) -> Result<(), String> {
        let conn = self.connect_broker("sitesync-bench").await?;
        purge(&conn, &self.names.archive).await
    }

    async fn purge(&self, conn: &Connection) -> Result<(), String> {
        let mut queues = self.names.site_queues();
        queues.push(self.names.archive.clone());
        for q in queues {
            purge(conn, &q).await?;
        }
        Ok(())
    }

    /// The plain end-to-end phase once more (the sidecars already
    /// running, without receipts or metrics): its rate, events a second.
    async fn plain_e2e(
        &self,
        london: &Client,
        madrid: &Client,
        seconds: u64,
        base: i64,
    ) -> Result<f64, String> {
        let mut writers = Vec::new();
        for _ in 0..E2E_WRITERS {
            writers.push(Arc::new(connect(&self.url("paris")).await?));
        }
        say(format!(
            "end to end, plain: {E2E_WRITERS} writers at PARIS for {seconds} s (ids from {base})"
        ));
        let (written, elapsed, _) = self
            .e2e(&[london.into(), madrid.into()], &writers, seconds, base)
            .await?;
        Ok(written as f64 / elapsed.as_secs_f64())
    }

    /// Four writers for `seconds`, as fast as the whole path absorbs: they
    /// pause while more than [`E2E_BACKLOG`] events written are not yet
    /// applied at both other sites. Returns how many events they wrote and
    /// the time until LONDON and MADRID had applied them all.
    /// `sites`: where the events must be applied; `base`: the first id
    /// written (the phase's range is `base..base + 10,000,000`).
    async fn e2e(
        &self,
        sites: &[At<'_>],
        writers: &[Arc<Client>],
        seconds: u64,
        base: i64,
    ) -> Result<(i64, Duration, f64), String> {
        const PER_TX: i64 = 10;
        let mut start = Vec::new();
        for site in sites {
            start.push(received(*site).await?);
        }
        let next = Arc::new(AtomicU64::new(base as u64));
        let applied = Arc::new(AtomicU64::new(0));
        let began = Instant::now();
        let until = began + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for client in writers {
            let client = client.clone();
            let (next, applied) = (next.clone(), applied.clone());
            tasks.push(tokio::spawn(async move {
                let mut written = 0i64;
                let mut held = Duration::ZERO;
                while Instant::now() < until {
                    let issued = next.load(Ordering::Relaxed) - base as u64;
                    if issued > applied.load(Ordering::Relaxed) + E2E_BACKLOG {
                        let paused = Instant::now();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        held += paused.elapsed();
                        continue;
                    }
                    let first = next.fetch_add(PER_TX as u64, Ordering::Relaxed) as i64;
                    write_rows(&client, first, PER_TX).await?;
                    written += PER_TX;
                }
                Ok::<(i64, Duration), String>((written, held))
            }));
        }
        // Progress: the events of PARIS each other site has received.
        while Instant::now() < until {
            let mut done = i64::MAX;
            for (site, from) in sites.iter().zip(&start) {
                done = done.min(received(*site).await? - from);
            }
            applied.store(done.max(0) as u64, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut written = 0;
        let mut held = Duration::ZERO;
        for w in tasks {
            let (n, h) = w.await.map_err(|e| e.to_string())??;
            written += n;
            held += h;
        }
        let held_pct = held.as_secs_f64() / (E2E_WRITERS as f64 * seconds as f64).max(1.0) * 100.0;
        let query = format!(
            "SELECT count(*) FROM bench_item WHERE id >= {base} AND id < {}",
            base + 10_000_000
        );
        for (site, from) in sites.iter().zip(&start) {
            poll_received(*site, from + written).await?;
            wait_count(*site, &query, written, "the end-to-end events").await?;
        }
        Ok((written, began.elapsed(), held_pct))
    }

    /// `rate` events/s for `seconds` (a transaction every 10 ms); the
    /// latency percentiles in milliseconds.
    async fn latency(
        &self,
        paris: &Client,
        london: &Client,
        madrid: &Client,
        rate: u64,
        seconds: u64,
    ) -> Result<(f64, f64, f64, f64), String> {
        let ticks = seconds * 100;
        let per_tick = rate as f64 / 100.0;
        let mut writers = Vec::new();
        for _ in 0..4 {
            writers.push(Arc::new(connect(&self.url("paris")).await?));
        }
        let mut interval = tokio::time::interval(Duration::from_millis(10));
        let mut tasks = Vec::new();
        let mut due = 0.0f64;
        let mut next = LATENCY_BASE;
        for tick in 0..ticks {
            interval.tick().await;
            due += per_tick;
            let rows = due.floor() as i64;
            if rows == 0 {
                continue;
            }
            due -= rows as f64;
            let client = writers[tick as usize % writers.len()].clone();
            let first = next;
            next += rows;
            tasks.push(tokio::spawn(async move {
                write_rows(&client, first, rows).await
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        let written = next - LATENCY_BASE;
        let range = format!("id >= {LATENCY_BASE} AND id < {BULK_BASE}");
        for c in [london, madrid] {
            wait_count(
                c,
                &format!("SELECT count(*) FROM bench_item WHERE {range}"),
                written,
                "the latency events",
            )
            .await?;
        }
        let (p, l, m) = (
            commit_times(paris, &range).await?,
            commit_times(london, &range).await?,
            commit_times(madrid, &range).await?,
        );
        let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
            .map_err(|e| e.to_string())?;
        // (commit at PARIS, latency), both in µs.
        let mut latencies: Vec<(i64, i64)> = Vec::with_capacity(p.len());
        for (id, at_paris) in &p {
            let (Some(t0), Some(Some(t1)), Some(Some(t2))) =
                (at_paris, l.get(id).copied(), m.get(id).copied())
            else {
                return Err(format!(
                    "no commit timestamp for row {id} (track_commit_timestamp is off?)"
                ));
            };
            let micros = (t1.max(t2) - t0).max(1);
            hist.saturating_record(micros as u64);
            latencies.push((*t0, micros));
        }
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        say(slowest_by_window(&latencies, ms(0.99)));
        say(hops_at(london, "LONDON", &p, &l, ms(0.99)).await?);
        Ok((ms(0.50), ms(0.95), ms(0.99), hist.max() as f64 / 1000.0))
    }

    async fn cleanup(&mut self) {
        self.stop_sidecars().await;
        if self.declared
            && let Ok(conn) = self.connect_broker("sitesync-bench-cleanup").await
        {
            let mut queues = self.names.site_queues();
            queues.push(self.names.archive.clone());
            // The archive's gap-fill requests (`topology declare` makes it).
            queues.push(format!("{}_REQUESTS", self.names.archive));
            queues.push(self.names.dlq.clone());
            for q in queues {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                    let _ = ch.close(200, "done".into()).await;
                }
            }
            for x in [&self.names.exchange, &self.names.dlx] {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                    let _ = ch.close(200, "done".into()).await;
                }
            }
        }
        for cluster in &self.clusters {
            if let Err(e) = cluster.stop().await {
                say(format!("stopping the {} cluster: {e}", cluster.name()));
            }
        }
        if let Some(m) = self.maria.take() {
            if let Err(e) = m.server.stop().await {
                say(format!("stopping the MariaDB server: {e}"));
            }
            maria::remove_template();
        }
        if std::env::var_os("SITESYNC_KEEP_BENCH_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            say(format!("kept {}", self.dir.display()));
        }
    }
}

/// An event body of the size the source publishes for a bench row.
fn sample_body() -> Vec<u8> {
    let data = format!(
        "{{\"n\": 0, \"id\": 1234567, \"payload\": \"{}\"}}",
        "x".repeat(64)
    );
    let event = serde_json::json!({
        "id": uuid::Uuid::new_v4(),
        "timestamp": chrono::Utc::now(),
        "origin": "PARIS",
        "type": TYPE,
        "entity_key": "1234567",
        "data": serde_json::from_str::<serde_json::Value>(&data).expect("valid"),
        "epoch": 1_795_461_845_867u64,
        "seq": 1_234_567u64,
    });
    serde_json::to_vec(&event).expect("serializable")
}

/// The properties and headers sitesync sets on an event.
fn raw_properties(i: u64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-sitesync-position".into(),
        AMQPValue::LongString(format!("postgres:0/1A2B3C8#{i}").into()),
    );
    headers.insert("x-sitesync-epoch".into(), AMQPValue::LongLongInt(1));
    headers.insert("x-sitesync-seq".into(), AMQPValue::LongLongInt(i as i64));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_app_id("PARIS".into())
        .with_type(TYPE.into())
        .with_timestamp(0)
        .with_headers(headers)
}

async fn settle(confirm: lapin::PublisherConfirm) -> Result<(), String> {
    match confirm.await {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => Err("a raw message came back unroutable".into()),
        Ok(other) => Err(format!("a raw message was not confirmed: {other:?}")),
        Err(e) => Err(format!("a raw message's confirm: {e}")),
    }
}

async fn purge(conn: &Connection, queue: &str) -> Result<(), String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .map_err(|e| format!("purging {queue}: {e}"))?;
    let _ = ch.close(200, "done".into()).await;
    Ok(())
}

/// `count` rows of `bench_item` from id `first`, with their outbox rows, in
/// one statement (one transaction), the way an application writes.
async fn write_rows(client: &Client, first: i64, count: i64) -> Result<(), String> {
    client
        .execute(
            &format!(
                "WITH r AS (SELECT g AS id FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) g), \
                      w AS (INSERT INTO bench_item (id, n, payload) SELECT id, 0, {PAYLOAD_SQL} FROM r) \
                 INSERT INTO outbox (type, entity_key, data) \
                 SELECT '{TYPE}', id::text, jsonb_build_object('id', id, 'n', 0, 'payload', {PAYLOAD_SQL}) FROM r"
            ),
            &[&first, &count],
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("writing at PARIS: {e}"))
}

/// Where in the latency phase the slow events were: for each 3-second
/// window of commits at PARIS, the slowest event and how many were at or
/// above the p99 (spikes bunched in one window point at a pause, such as a
/// vacuum or a checkpoint, rather than at the steady path).
/// `latencies`: each event's commit at PARIS and its latency, in µs.
fn slowest_by_window(latencies: &[(i64, i64)], p99_ms: f64) -> String {
    const WINDOW_US: i64 = 3_000_000;
    let Some(start) = latencies.iter().map(|(t0, _)| *t0).min() else {
        return "latency: no events".into();
    };
    let mut windows: BTreeMap<i64, (f64, usize)> = BTreeMap::new();
    for &(t0, micros) in latencies {
        let ms = micros as f64 / 1000.0;
        let w = windows.entry((t0 - start) / WINDOW_US).or_default();
        w.0 = w.0.max(ms);
        w.1 += usize::from(ms >= p99_ms);
    }
    let cells: Vec<String> = windows
        .iter()
        .map(|(w, (max, slow))| format!("{}s {max:.0}ms/{slow}", w * WINDOW_US / 1_000_000))
        .collect();
    format!(
        "latency: slowest event and events at or above the p99 ({p99_ms:.0} ms), by 3 s of the phase: {}",
        cells.join(", ")
    )
}

/// Where an event's time goes at one site: from its commit at PARIS to
/// the start of the sink transaction that applied it (the source, the
/// broker and the sink's batching: the inbox's `received_at` is the
/// transaction's start), then to that transaction's commit; the medians
/// over every event and over those at or above the p99.
async fn hops_at(
    c: &Client,
    site: &str,
    paris: &HashMap<i64, Option<i64>>,
    here: &HashMap<i64, Option<i64>>,
    p99_ms: f64,
) -> Result<String, String> {
    let rows = c
        .query(
            &format!(
                "SELECT v.key::bigint, (extract(epoch FROM i.received_at) * 1000000)::bigint \
                 FROM sitesync_versions v JOIN sitesync_inbox i ON i.event_id = v.event_id \
                 WHERE v.key::bigint >= {LATENCY_BASE} AND v.key::bigint < {BULK_BASE}"
            ),
            &[],
        )
        .await
        .map_err(|e| format!("reading {site}'s inbox: {e}"))?;
    let mut all: Vec<(f64, f64)> = Vec::new();
    let mut slow: Vec<(f64, f64)> = Vec::new();
    for r in rows {
        let (id, started): (i64, i64) = (r.get(0), r.get(1));
        let (Some(Some(t0)), Some(Some(t1))) = (paris.get(&id), here.get(&id)) else {
            continue;
        };
        let hops = (
            (started - t0) as f64 / 1000.0,
            (t1 - started) as f64 / 1000.0,
        );
        all.push(hops);
        if hops.0 + hops.1 >= p99_ms {
            slow.push(hops);
        }
    }
    let median = |hops: &[(f64, f64)]| {
        let mid = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let (a, b): (Vec<f64>, Vec<f64>) = hops.iter().copied().unzip();
        (mid(a), mid(b))
    };
    let ((a, b), (sa, sb)) = (median(&all), median(&slow));
    let slow = match slow.len() {
        0 => "none of its events was at or above the p99".to_string(),
        n => format!("for its {n} events at or above the p99: {sa:.1} ms and {sb:.1} ms"),
    };
    Ok(format!(
        "latency at {site}: commit at PARIS to the sink's transaction start {a:.1} ms, to its commit {b:.1} ms (medians); {slow}"
    ))
}

/// Each row's commit time (µs since the epoch) among `bench_item` rows
/// matching `range`.
async fn commit_times(c: &Client, range: &str) -> Result<HashMap<i64, Option<i64>>, String> {
    let sql = format!(
        "SELECT id, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint FROM bench_item WHERE {range}"
    );
    c.query(&sql, &[])
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .map_err(|e| format!("reading commit times: {e}"))
}

/// The highest `seq` of PARIS's events a site has received (its sink's
/// progress, cheap to read).
async fn received<'a>(at: impl Into<At<'a>>) -> Result<i64, String> {
    at.into()
        .number("SELECT seq FROM sitesync_origins WHERE origin = 'PARIS'")
        .await
        .map(|n| n.unwrap_or(0))
        .map_err(|e| format!("reading sitesync_origins: {e}"))
}

/// A site's database, where a phase reads its progress.
#[derive(Clone, Copy)]
enum At<'a> {
    Pg(&'a Client),
    MariaDb(&'a tokio::sync::Mutex<mysql_async::Conn>),
}

impl<'a> From<&'a Client> for At<'a> {
    fn from(c: &'a Client) -> At<'a> {
        At::Pg(c)
    }
}

impl At<'_> {
    /// The one number `sql` selects (the same text on both engines).
    async fn number(self, sql: &str) -> Result<Option<i64>, String> {
        match self {
            At::Pg(c) => c
                .query_opt(sql, &[])
                .await
                .map(|r| r.map(|r| r.get(0)))
                .map_err(|e| e.to_string()),
            At::MariaDb(c) => c
                .lock()
                .await
                .query_first(sql)
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

/// Waits until a site has received PARIS's events up to `seq`.
async fn poll_received(at: At<'_>, seq: i64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let now = received(at).await?;
        if now >= seq {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "PARIS's events: {now} of {seq} received after 10 minutes"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `sql` (a count) until it reaches `want` (10 minutes at most).
async fn wait_count<'a>(
    at: impl Into<At<'a>>,
    sql: &str,
    want: i64,
    what: &str,
) -> Result<(), String> {
    let at = at.into();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n = at
            .number(sql)
            .await
            .map_err(|e| format!("waiting for {what}: {e}"))?
            .unwrap_or(0);
        if n == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "waiting for {what}: {n} of {want} after 10 minutes"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Sends SIGTERM to a sidecar: it drains and exits.
fn terminate(child: &Child) {
    // SAFETY: plain kill(2) of our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// A `/proc/PID/status` field in KiB.
fn proc_status_kib(pid: u32, field: &str) -> Result<f64, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .ok_or_else(|| format!("/proc/{pid}/status has no {field}"))
}

/// What a PostgreSQL process does, from its command line
/// (`postgres: walsender …`, `postgres: user db 127.0.0.1(…) idle`, …).
fn pg_process_kind(cmdline: &str) -> &'static str {
    let title = cmdline.replace('\0', " ");
    const BACKGROUND: [&str; 8] = [
        "checkpointer",
        "background writer",
        "walwriter",
        "autovacuum",
        "logical replication",
        "stats",
        "archiver",
        "startup",
    ];
    if title.contains("walsender") {
        "walsender"
    } else if BACKGROUND.iter().any(|b| title.contains(b)) || !title.contains("postgres:") {
        "background"
    } else {
        "backends"
    }
}

/// The statements that took the most server time, per 1,000 events.
async fn top_statements(c: &Client, db: &str, events: i64) -> Result<String, String> {
    let rows = c
        .query(
            "SELECT calls, total_exec_time + total_plan_time, rows, \
             regexp_replace(left(query, 110), '\\s+', ' ', 'g') \
             FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY 2 DESC LIMIT 10",
            &[],
        )
        .await
        .map_err(|e| format!("{db}: pg_stat_statements: {e}"))?;
    let per_1k = 1000.0 / events.max(1) as f64;
    let mut out = format!("{db}: statements by server time per 1,000 events (ms, calls, rows):");
    for r in rows {
        let (calls, ms, n, q): (i64, f64, i64, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        out.push_str(&format!(
            "\n  {:>6.1} {:>6.1} {:>7.0}  {q}",
            ms * per_1k,
            calls as f64 * per_1k,
            n as f64 * per_1k
        ));
    }
    Ok(out)
}

/// CPU milliseconds per 1,000 events, by part, between two snapshots.
fn cpu_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    events: i64,
) -> Vec<(String, f64)> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut parts: Vec<(String, f64)> = after
        .iter()
        .map(|(part, t)| {
            let ticks = t.saturating_sub(before.get(part).copied().unwrap_or(0));
            let ms = ticks as f64 * 1000.0 / hz;
            (part.clone(), ms * 1000.0 / events.max(1) as f64)
        })
        .filter(|(_, ms)| *ms > 0.0)
        .collect();
    parts.sort_by(|a, b| b.1.total_cmp(&a.1));
    parts
}

/// The key of [`Bench::cpu_by_part`]'s snapshot that holds the whole
/// machine's busy ticks (every process, the kernel's own work included).
const MACHINE: &str = "(the machine)";

/// `machine`: the whole machine's busy CPU per 1,000 events, when known.
fn render_cpu(
    phase: &str,
    parts: &[(String, f64)],
    machine: Option<f64>,
    events: i64,
    elapsed: Duration,
) -> String {
    let total: f64 = parts.iter().map(|(_, ms)| ms).sum();
    let mut out = format!(
        "{phase}: CPU per 1,000 events, by part ({total:.0} ms in all; {:.1} s of wall time):",
        elapsed.as_secs_f64()
    );
    if let Some(machine) = machine {
        // Busy cores on average: CPU ms per event times events per ms.
        let cores = machine / 1000.0 * events as f64 / elapsed.as_secs_f64().max(1e-9) / 1000.0;
        let of = std::thread::available_parallelism().map_or(1, |n| n.get());
        out.push_str(&format!(
            "\n  the machine: {cores:.2} of {of} cores busy on average, {machine:.0} ms per 1,000 events \
             ({:.0} ms outside the parts below: other processes, the kernel's own work)",
            (machine - total).max(0.0)
        ));
    }
    for (part, ms) in parts {
        out.push_str(&format!(
            "\n  {part:<32} {ms:>7.0} ms  {:>4.0} %",
            ms / total.max(f64::MIN_POSITIVE) * 100.0
        ));
    }
    out
}

/// The `RUST_LOG` of the sidecars and of the commands the bench runs:
/// `SITESYNC_BENCH_LOG`, else warnings only.
fn sidecar_log() -> String {
    std::env::var("SITESYNC_BENCH_LOG").unwrap_or_else(|_| "warn,lapin=off".into())
}

/// The machine's busy and total CPU ticks so far (all cores, /proc/stat).
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total - idle, total))
}

/// Waits until the machine is quiet (under a tenth of a core busy over
/// half a second, `at_most`) before a phase starts, so that no
/// phase pays for the last one's aftermath: the broker truncating the logs
/// of purged queues, PostgreSQL's background writes, an autovacuum.
async fn quiesce(phase: &str, at_most: Duration) {
    const WINDOW: Duration = Duration::from_millis(500);
    const QUIET_CORES: f64 = 0.1;
    if at_most.is_zero() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let began = Instant::now();
    let mut busy = f64::NAN;
    while began.elapsed() < at_most {
        let Some((b0, t0)) = machine_ticks() else {
            return;
        };
        tokio::time::sleep(WINDOW).await;
        let Some((b1, t1)) = machine_ticks() else {
            return;
        };
        busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64 * cores;
        if busy < QUIET_CORES {
            if began.elapsed() > 2 * WINDOW {
                say(format!(
                    "{phase}: waited {:.1} s for the machine to go quiet",
                    began.elapsed().as_secs_f64()
                ));
            }
            return;
        }
    }
    say(format!(
        "{phase}: the machine is still busy ({busy:.2} cores) after {at_most:?}; going on"
    ));
}

/// User + system CPU ticks of a process.
fn proc_cpu_ticks(pid: u32) -> Result<u64, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = text.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => Err(format!("/proc/{pid}/stat: unexpected format")),
    }
}

/// "mean of 9100 before and 8700 after".
fn runs(rates: &[f64]) -> String {
    match rates {
        [before, after] => format!("mean of {before:.0} before and {after:.0} after"),
        _ => format!("{rates:.0?}"),
    }
}

/// GETs `/metrics` of each sidecar's admin listener (`ports`) once a
/// second while `go` holds; returns the scrapes answered 200 and the
/// others.
fn scrape_every_second(ports: &[u16], go: &std::sync::atomic::AtomicBool) -> (u64, u64) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let (mut answered, mut failed) = (0, 0);
    while go.load(Ordering::Relaxed) {
        let began = Instant::now();
        for port in ports {
            let url = format!("http://127.0.0.1:{port}/metrics");
            match agent.get(&url).call() {
                Ok(mut r) if r.status() == 200 => match r.body_mut().read_to_string() {
                    Ok(_) => answered += 1,
                    Err(_) => failed += 1,
                },
                _ => failed += 1,
            }
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(began.elapsed()));
    }
    (answered, failed)
}

fn render(f: &Figures, s: &Sizes, context: &str) -> String {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    format!(
        "\nsitesync bench ({context})\n\
         {:<34}{:>10.0} msg/s  ({} messages, window {}, three site queues and the archive, quorum; {})\n\
         {:<34}{:>10.0} msg/s  ({} messages; {})\n\
         {:<34}{:>10.0} ev/s   ratio {:.2} to raw publish (target ≥ 0.8); the sink off\n\
         {:<34}{:>10.0} ev/s   PARIS's sink taking them back from its queue\n\
         {:<34}{:>10.0} ev/s   ratio {:.2} to raw round trip (target ≥ 0.6); written at {:.0}/s, held back {:.0} % of the time; archived at PARIS {:.2} s after\n\
         {:<34}{:>10.0} ev/s   {:+.1} % against the phase above (every sink and the archive sending receipts)\n\
         {:<34}{:>10.0} ev/s   {:+.1} % against the plain phase just before and after it ({}; every sidecar's /metrics scraped every second, {} scrapes)\n\
         {:<34}{:>10.0} ev/s   {} archived events to one site's queue, confirmed (the whole command)\n\
         {:<34}{:>10.1} ms p50, {:.1} p95, {:.1} p99 (target < 100), {:.1} max\n\
         {:<34}{:>10.1} s      (target < 60)\n\
         {:<34}{:>10.1} MiB peak, {:.1} MiB idle; idle CPU {:.2} %\n{}",
        "raw publish + confirm",
        f.raw_publish_confirm_per_s,
        s.raw,
        s.window,
        runs(&f.raw_publish_runs),
        "raw round trip",
        f.raw_round_trip_per_s,
        s.raw_trip,
        runs(&f.raw_trip_runs),
        format!("source ({} preloaded rows)", s.source),
        f.source_per_s,
        ratio(f.source_per_s, f.raw_publish_confirm_per_s),
        "own events back round",
        f.own_return_per_s,
        format!("end to end ({} s, {E2E_WRITERS} writers)", s.seconds),
        f.e2e_per_s,
        ratio(f.e2e_per_s, f.raw_round_trip_per_s),
        f.e2e_written_per_s,
        f.e2e_held_pct,
        f.e2e_archive_lag_s,
        "end to end with receipts",
        f.e2e_receipts_per_s,
        (f.e2e_receipts_per_s / f.e2e_per_s.max(1.0) - 1.0) * 100.0,
        "end to end with metrics",
        f.e2e_metrics_per_s,
        f.metrics_delta_pct(),
        runs(&f.e2e_plain_runs),
        f.metrics_scrapes,
        "replay",
        f.replay_per_s,
        f.replay_events,
        format!("latency at {}/s", s.rate),
        f.e2e_p50_ms,
        f.e2e_p95_ms,
        f.e2e_p99_ms,
        f.e2e_max_ms,
        format!("bulk ({} rows in one tx)", s.bulk),
        f.bulk_100k_s,
        "PARIS sidecar RSS",
        f.rss_mib_peak,
        f.rss_mib_idle,
        f.cpu_idle_pct,
        match f.mariadb {
            Some(m) => format!(
                "{:<34}{:>10.0} ev/s   ratio {:.2} to raw publish (target ≥ 0.8); binlog, the sink off\n\
                 {:<34}{:>10.0} ev/s   ratio {:.2} to raw round trip; written at {:.0}/s, held back {:.0} % of the time\n",
                format!("MariaDB source ({} rows)", s.source),
                m.source_per_s,
                ratio(m.source_per_s, f.raw_publish_confirm_per_s),
                format!("PostgreSQL → MariaDB ({} s)", s.seconds),
                m.e2e_per_s,
                ratio(m.e2e_per_s, f.raw_round_trip_per_s),
                m.e2e_written_per_s,
                m.e2e_held_pct,
            ),
            None => "MariaDB phases                    not run (--no-mariadb, or MariaDB not installed)\n".into(),
        },
    ) + &match f.capture {
        Some(c) => format!(
            "{:<34}{:>10.2} ×      {:.3} ms per transaction of 10 rows with a capture trigger, {:.3} ms without\n\
             {:<34}{:>10.1} s      from its commit at PARIS until LONDON and MADRID hold every row\n",
            "capture: write cost",
            c.ratio(),
            c.with_ms_per_tx,
            c.without_ms_per_tx,
            format!("capture: UPDATE of {} rows", s.bulk),
            c.bulk_update_s,
        ),
        None => "capture phase                     not run (--no-capture)\n".into(),
    } + &match f.resync {
        Some(r) => format!(
            "{:<34}{:>10.0} rows/s ratio {:.2} to raw round trip\n\
             {:<34}{:>10.0} rows/s ratio {:.2} to raw round trip (target ≥ 3); {:.1} s in all\n\
             {:<34}{:>10.0} rows/s ratio {:.2} to raw round trip; {:.0} bytes a row on the wire instead of {:.0}\n\
             {:<34}{:>10.1} MiB    peak RSS of the receiving sidecar\n",
            format!("resync, 1 row/message ({})", r.single_rows),
            r.single_per_s,
            ratio(r.single_per_s, f.raw_round_trip_per_s),
            format!("resync, packs of {} ({})", resync::PACK, r.packed_rows),
            r.packed_per_s,
            ratio(r.packed_per_s, f.raw_round_trip_per_s),
            r.packed_s,
            format!("resync, zstd packs ({})", r.zstd_rows),
            r.zstd_per_s,
            ratio(r.zstd_per_s, f.raw_round_trip_per_s),
            r.zstd_bytes_per_row,
            r.bytes_per_row,
            "resync: MADRID sidecar",
            r.sink_rss_mib_peak,
        ),
        None => "resync phase                      not run (--no-resync)\n".into(),
    }
}

fn json(f: &Figures) -> String {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let round = |x: f64, places: i32| {
        let m = 10f64.powi(places);
        (x * m).round() / m
    };
    let by_part = |parts: &[(String, f64)]| {
        parts
            .iter()
            .map(|(part, ms)| (part.clone(), serde_json::json!(round(*ms, 0))))
            .collect::<serde_json::Map<String, serde_json::Value>>()
    };
    let m = f.mariadb.unwrap_or_default();
    let maria = |x: f64, places| f.mariadb.map(|_| round(x, places));
    let mut v = serde_json::json!({
        "mariadb_source_per_s": maria(m.source_per_s, 0),
        "mariadb_source_ratio": maria(ratio(m.source_per_s, f.raw_publish_confirm_per_s), 3),
        "e2e_pg_to_mariadb_per_s": maria(m.e2e_per_s, 0),
        "e2e_pg_to_mariadb_ratio": maria(ratio(m.e2e_per_s, f.raw_round_trip_per_s), 3),
        "raw_publish_confirm_per_s": round(f.raw_publish_confirm_per_s, 0),
        "raw_round_trip_per_s": round(f.raw_round_trip_per_s, 0),
        "raw_publish_runs": f.raw_publish_runs.iter().map(|r| round(*r, 0)).collect::<Vec<_>>(),
        "raw_round_trip_runs": f.raw_trip_runs.iter().map(|r| round(*r, 0)).collect::<Vec<_>>(),
        "source_per_s": round(f.source_per_s, 0),
        "source_ratio": round(ratio(f.source_per_s, f.raw_publish_confirm_per_s), 3),
        "own_return_per_s": round(f.own_return_per_s, 0),
        "e2e_per_s": round(f.e2e_per_s, 0),
        "e2e_ratio": round(ratio(f.e2e_per_s, f.raw_round_trip_per_s), 3),
        "e2e_archive_lag_s": round(f.e2e_archive_lag_s, 2),
        "e2e_receipts_per_s": round(f.e2e_receipts_per_s, 0),
        "receipts_cost_pct": round((1.0 - f.e2e_receipts_per_s / f.e2e_per_s.max(1.0)) * 100.0, 1),
        "e2e_metrics_per_s": round(f.e2e_metrics_per_s, 0),
        "metrics_cost_pct": round(-f.metrics_delta_pct(), 1),
        "e2e_plain_around_metrics_per_s": f.e2e_plain_runs.iter().map(|r| round(*r, 0)).collect::<Vec<_>>(),
        "metrics_scrapes": f.metrics_scrapes,
        "replay_per_s": round(f.replay_per_s, 0),
        "replay_events": f.replay_events,
        "e2e_writers_held_pct": round(f.e2e_held_pct, 1),
        "e2e_p50_ms": round(f.e2e_p50_ms, 2),
        "e2e_p95_ms": round(f.e2e_p95_ms, 2),
        "e2e_p99_ms": round(f.e2e_p99_ms, 2),
        "e2e_max_ms": round(f.e2e_max_ms, 2),
        "bulk_100k_s": round(f.bulk_100k_s, 2),
        "rss_mib_peak": round(f.rss_mib_peak, 1),
        "rss_mib_idle": round(f.rss_mib_idle, 1),
        "cpu_idle_pct": round(f.cpu_idle_pct, 2),
        "capture_write_ratio": f.capture.map(|c| round(c.ratio(), 3)),
        "capture_write_ms_per_tx": f.capture.map(|c| round(c.with_ms_per_tx, 3)),
        "plain_write_ms_per_tx": f.capture.map(|c| round(c.without_ms_per_tx, 3)),
        "capture_bulk_update_s": f.capture.map(|c| round(c.bulk_update_s, 2)),
        "e2e_cpu_ms_per_1k": by_part(&f.e2e_cpu),
        "source_cpu_ms_per_1k": by_part(&f.source_cpu),
    });
    // The resync phase's figures (a second object: one json! of all of
    // them is over the macro's recursion limit).
    let resync = serde_json::json!({
        "resync_rows": f.resync.map(|r| r.single_rows),
        "resync_per_s": f.resync.map(|r| round(r.single_per_s, 0)),
        "resync_packed_rows": f.resync.map(|r| r.packed_rows),
        "resync_packed_per_s": f.resync.map(|r| round(r.packed_per_s, 0)),
        "resync_packed_ratio": f.resync.map(|r| round(ratio(r.packed_per_s, f.raw_round_trip_per_s), 3)),
        "resync_packed_s": f.resync.map(|r| round(r.packed_s, 1)),
        "resync_zstd_per_s": f.resync.map(|r| round(r.zstd_per_s, 0)),
        "resync_bytes_per_row": f.resync.map(|r| round(r.bytes_per_row, 0)),
        "resync_zstd_bytes_per_row": f.resync.map(|r| round(r.zstd_bytes_per_row, 0)),
        "resync_sink_rss_mib_peak": f.resync.map(|r| round(r.sink_rss_mib_peak, 1)),
    });
    if let (Some(all), serde_json::Value::Object(more)) = (v.as_object_mut(), resync) {
        all.extend(more);
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_figures_of_this_process() {
        let pid = std::process::id();
        assert!(proc_status_kib(pid, "VmRSS:").unwrap() > 0.0);
        assert!(proc_status_kib(pid, "VmHWM:").unwrap() > 0.0);
        proc_cpu_ticks(pid).unwrap();
        assert!(proc_status_kib(pid, "NoSuchField:").is_err());
    }

    #[test]
    fn the_json_line_has_every_key_of_the_issue() {
        let line = json(&Figures::default());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        for key in [
            "raw_publish_confirm_per_s",
            "raw_round_trip_per_s",
            "source_per_s",
            "source_ratio",
            "e2e_per_s",
            "e2e_ratio",
            "e2e_p50_ms",
            "e2e_p95_ms",
            "e2e_p99_ms",
            "bulk_100k_s",
            "rss_mib_peak",
            "rss_mib_idle",
            "cpu_idle_pct",
        ] {
            assert!(v[key].is_number(), "{key}");
        }
    }

    #[test]
    fn the_cpu_table_says_how_busy_the_machine_was_and_what_the_parts_leave_out() {
        let parts = vec![
            ("rabbitmq".to_string(), 100.0),
            ("sitesync PARIS".to_string(), 25.0),
        ];
        // 250 ms per 1,000 events at 7,000 events/s: 1.75 cores.
        let text = render_cpu(
            "end to end",
            &parts,
            Some(250.0),
            70_000,
            Duration::from_secs(10),
        );
        assert!(text.contains("125 ms in all"), "{text}");
        assert!(text.contains("1.75 of"), "{text}");
        assert!(
            text.contains("250 ms per 1,000 events (125 ms outside"),
            "{text}"
        );
        let without = render_cpu("end to end", &parts, None, 70_000, Duration::from_secs(10));
        assert!(!without.contains("the machine"), "{without}");
    }
}
