//! `sitesync demo`: three sites kept in sync, end to end, in one command.
//!
//! The demo starts a private PostgreSQL cluster per site (PARIS, LONDON,
//! MADRID) from the installed server binaries, on random ports, in a
//! directory under `/tmp` (or uses the databases given with `--paris-url`
//! and friends). `--engines` puts sites on MariaDB instead: a private
//! server each, with its binary log as the binlog source needs it; the
//! demo's own SQL per engine is in [`db`]. It writes a topology file with names of its own
//! (`demo-<hex>.events`, `demo-<hex>_SITE_PARIS`, …, so the real `SITE_*`
//! queues are never touched) and one connector file per site, loads them
//! through [`Connector::load`] like `sitesync run` does, creates a
//! small business schema (`customer`, `orders`), runs `init` and `topology
//! declare` in-process, and starts the three sidecars as tasks.
//!
//! Then every site writes business rows together with their outbox rows,
//! one transaction each: its own customers and orders, some updates, a
//! delete, and a conflict (the same customer updated at the three sites at
//! the same moment). Once every event has gone round (every outbox is
//! empty, every inbox holds the other sites' events) it prints a table per
//! site with checksums of the business tables, says which write won the
//! conflict, and whether the sites converged.
//!
//! Everything is removed at the end, also after an error or Ctrl-C: the
//! sidecars are stopped, the demo's queues and exchanges deleted, the
//! clusters stopped and their directory removed (for databases given by
//! URL: the slot, the publication and the demo's tables are dropped).
//!
//! The sidecars log at `warn` unless `RUST_LOG` says otherwise: the demo
//! runs on a runtime of its own whose threads use a quieter subscriber.

use super::BrokerArgs;
use super::host::{create_owned_dir, random_hex};
use super::pg::{Cluster, Options, connect, find_bin_dir, sweep_orphans};
use crate::bus::{self, BusError, management::Management, topology};
use crate::config::{ConnectorConfig, ManagementApi, redact_url};
use crate::engine::postgres::settings::Settings as PgSettings;
use crate::engine::{Connector, Driver, Engine, Task};
use crate::lab::mariadb::{self as maria, Server as MariaServer};
use crate::runner::Shutdown;
use crate::sidecar;
use crate::sink::batch::{Batches, Dialect};
use crate::source::Source;
use chrono::{DateTime, Utc};
use clap::Args;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Barrier, watch};
use tokio::task::JoinHandle;

mod db;
use db::{Db, DemoEngine};

/// Options of `sitesync demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    #[command(flatten)]
    pub rabbit: BrokerArgs,
    /// Use this database for PARIS instead of a private cluster (wal_level=logical; the demo creates its tables there and drops them at the end).
    #[arg(long, value_name = "URL")]
    pub paris_url: Option<String>,
    /// Use this database for LONDON instead of a private cluster.
    #[arg(long, value_name = "URL")]
    pub london_url: Option<String>,
    /// Use this database for MADRID instead of a private cluster.
    #[arg(long, value_name = "URL")]
    pub madrid_url: Option<String>,
    /// How long the writes and the sync may take, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 45)]
    pub timeout: u64,
    /// The engine of each site, in the order PARIS, LONDON, MADRID: e.g.
    /// `postgres,mariadb,postgres` runs LONDON on a private MariaDB server.
    #[arg(
        long,
        value_name = "ENGINES",
        value_delimiter = ',',
        default_value = "postgres,postgres,postgres"
    )]
    pub engines: Vec<DemoEngine>,
}

/// The three sites, in display order.
pub const SITES: [&str; 3] = ["PARIS", "LONDON", "MADRID"];

/// Prefix of the demo's directories under `/tmp` (kept short: each
/// cluster's Unix socket lives in it, and socket paths are limited to 107
/// bytes).
const DIR_PREFIX: &str = "ssdemo-";

/// The customer the three sites update at the same moment.
const SHARED_CUSTOMER: i32 = 1;

/// The tables the demo creates at each site (business, outbox, sink).
const DEMO_TABLES: [&str; 8] = [
    "customer",
    "orders",
    "outbox",
    "sitesync_inbox",
    "sitesync_origins",
    "sitesync_gaps",
    "sitesync_versions",
    "sitesync_conflicts",
];

/// How the events become rows: the same at every site but for the
/// tables' names. `order.upsert` carries the amount as `total`; the route
/// renames it.
fn routes(engine: DemoEngine) -> String {
    let (customer, orders) = engine.tables();
    format!(
        r#"
[[sink.routes]]
type = "customer.upsert"
table = "{customer}"
key = ["id"]
operation = "upsert"

[[sink.routes]]
type = "customer.delete"
table = "{customer}"
key = ["id"]
operation = "delete"

[[sink.routes]]
type = "order.upsert"
table = "{orders}"
key = ["id"]
operation = "upsert"
rename = {{ total = "amount" }}
"#
    )
}

/// A line on stdout. A closed stdout (`sitesync demo | head`) must not
/// panic half-way: the clean-up still has to run.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

// ---------------------------------------------------------------------------
// Entry point: a runtime of its own, with quieter logs
// ---------------------------------------------------------------------------

thread_local! {
    static QUIET: RefCell<Option<tracing::dispatcher::DefaultGuard>> = const { RefCell::new(None) };
}

/// Runs the demo. `Ok` only when the three sites converged.
pub async fn run(args: DemoArgs) -> Result<ExitCode, String> {
    // The CLI's subscriber logs at info; the demo wants the sidecars at
    // warn unless RUST_LOG says otherwise. Its filter cannot be changed, so
    // the demo runs on a runtime whose threads default to another one.
    let quiet = std::env::var_os("RUST_LOG").is_none().then(|| {
        tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("warn,lapin=off"))
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .finish(),
        )
    });
    tokio::task::spawn_blocking(move || {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all().thread_name("sitesync-demo");
        if let Some(dispatch) = quiet.clone() {
            builder.on_thread_start(move || {
                let guard = tracing::dispatcher::set_default(&dispatch);
                QUIET.with(|q| *q.borrow_mut() = Some(guard));
            });
            builder.on_thread_stop(|| {
                QUIET.with(|q| q.borrow_mut().take());
            });
        }
        let runtime = builder
            .build()
            .map_err(|e| format!("cannot start the demo's runtime: {e}"))?;
        let _guard = quiet.as_ref().map(tracing::dispatcher::set_default);
        let result = runtime.block_on(main(args));
        runtime.shutdown_timeout(Duration::from_secs(5));
        result
    })
    .await
    .map_err(|e| format!("the demo panicked: {e}"))?
}

async fn main(args: DemoArgs) -> Result<ExitCode, String> {
    let mut demo = Demo::new(args);
    demo.say(format!(
        "sitesync demo: three sites ({}) kept in sync through RabbitMQ",
        demo.layout()
    ));
    let outcome = tokio::select! {
        outcome = demo.play() => outcome,
        signal = interrupted() => {
            demo.say(format!("{signal}: stopping and cleaning up"));
            Err(format!("interrupted by {signal}"))
        }
    };
    let cleaned = demo.cleanup().await;
    let elapsed = demo.began.elapsed();
    match outcome {
        Ok(outcome) if outcome.converged && cleaned.is_empty() => {
            out!(
                "PASS: the three sites converged in {:.1} s (customer {}, orders {}; {} events, conflict won by {})",
                elapsed.as_secs_f64(),
                outcome.checksums.0,
                outcome.checksums.1,
                outcome.events,
                outcome.winner
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(outcome) => {
            let mut why = outcome.problems;
            why.extend(cleaned);
            Err(format!(
                "the sites did not converge ({:.1} s):\n  - {}",
                elapsed.as_secs_f64(),
                why.join("\n  - ")
            ))
        }
        Err(e) => {
            out!("demo stopped after {:.1} s", elapsed.as_secs_f64());
            if cleaned.is_empty() {
                Err(e)
            } else {
                Err(format!("{e}\ncleaning up: {}", cleaned.join("; ")))
            }
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM, with the signal's name.
async fn interrupted() -> &'static str {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term => "SIGTERM",
    }
}

// ---------------------------------------------------------------------------
// The demo's state, and its clean-up
// ---------------------------------------------------------------------------

/// What the demo found at the end.
struct Outcome {
    converged: bool,
    /// Short checksums of `customer` and `orders` at PARIS.
    checksums: (String, String),
    events: usize,
    /// The site whose write won the conflict.
    winner: String,
    problems: Vec<String>,
}

/// Broker-side names of one demo run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Names {
    exchange: String,
    prefix: String,
    archive: String,
    dlx: String,
    dlq: String,
}

impl Names {
    fn new(token: &str) -> Names {
        let base = format!("demo-{token}");
        Names {
            exchange: format!("{base}.events"),
            prefix: format!("{base}_SITE_"),
            archive: format!("{base}_SITE_PARIS_HISTO"),
            dlx: format!("{base}.dlx"),
            dlq: format!("{base}.dlq"),
        }
    }

    fn queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = SITES
            .iter()
            .map(|s| format!("{}{s}", self.prefix))
            .collect();
        queues.push(self.archive.clone());
        // The archive's gap-fill requests (`topology declare` makes it).
        queues.push(format!("{}_REQUESTS", self.archive));
        queues.push(self.dlq.clone());
        queues
    }
}

struct Site {
    name: &'static str,
    engine: DemoEngine,
    /// The database URL given on the command line, if any (PostgreSQL).
    given_url: Option<String>,
    /// Its private PostgreSQL cluster.
    cluster: Option<Cluster>,
    /// Its private MariaDB server.
    server: Option<MariaServer>,
    /// The database URL in use.
    url: String,
    /// Its connector file, loaded.
    connector: Option<Connector>,
    /// The demo's objects exist in a database given by URL (dropped at the end).
    created: bool,
    /// The demo's own connection (writes, polling, the report).
    conn: Option<Db>,
}

impl Site {
    fn db(&self) -> String {
        self.name.to_lowercase()
    }

    fn cfg(&self) -> &ConnectorConfig {
        &self.connector.as_ref().expect("loaded before use").config
    }

    fn conn(&mut self) -> &mut Db {
        self.conn.as_mut().expect("connected before use")
    }

    /// The entity of customers in `sitesync_versions` and
    /// `sitesync_conflicts`, as the sink names it from the route.
    fn customer_entity(&self) -> String {
        self.cfg()
            .sink
            .route("customer.upsert")
            .map(|r| r.entity_table())
            .unwrap_or_default()
    }
}

/// The clusters after their start, and how each start went.
type Started = (Vec<Cluster>, Vec<Result<(), String>>);

struct Demo {
    args: DemoArgs,
    began: Instant,
    token: String,
    names: Names,
    dir: Option<PathBuf>,
    sites: Vec<Site>,
    management: Option<String>,
    /// The topology is (maybe partly) declared: delete it at the end.
    declared: bool,
    trigger: Option<watch::Sender<bool>>,
    sidecars: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
    /// Tells starting clusters to stop short.
    cancel: Arc<AtomicBool>,
    /// The clusters while they start.
    starting: Option<JoinHandle<Started>>,
}

impl Demo {
    fn new(args: DemoArgs) -> Demo {
        let token = random_hex(8);
        let urls = [
            args.paris_url.clone(),
            args.london_url.clone(),
            args.madrid_url.clone(),
        ];
        let sites = SITES
            .iter()
            .zip(urls)
            .zip(
                args.engines
                    .iter()
                    .chain(std::iter::repeat(&DemoEngine::Postgres)),
            )
            .map(|((name, given_url), engine)| Site {
                name,
                engine: *engine,
                given_url,
                cluster: None,
                server: None,
                url: String::new(),
                connector: None,
                created: false,
                conn: None,
            })
            .collect();
        Demo {
            args,
            began: Instant::now(),
            names: Names::new(&token),
            token,
            dir: None,
            sites,
            management: None,
            declared: false,
            trigger: None,
            sidecars: Vec::new(),
            starting: None,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A progress line, with the time since the start.
    fn say(&self, message: impl AsRef<str>) {
        out!(
            "[{:5.1}s] {}",
            self.began.elapsed().as_secs_f64(),
            message.as_ref()
        );
    }

    /// `PARIS on PostgreSQL, LONDON on MariaDB, …`.
    fn layout(&self) -> String {
        self.sites
            .iter()
            .map(|s| format!("{} on {}", s.name, s.engine.label()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    async fn play(&mut self) -> Result<Outcome, String> {
        self.check_engines()?;
        self.check_broker().await?;
        let pg_needed = self
            .sites
            .iter()
            .any(|s| s.given_url.is_none() && s.engine == DemoEngine::Postgres);
        let bin = if pg_needed {
            Some(find_bin_dir()?)
        } else {
            None
        };
        self.check_given_urls()?;
        for site in &mut self.sites {
            if let Some(url) = &site.given_url {
                check_given(site.name, url).await?;
                site.url = url.clone();
            }
        }
        sweep_orphans(DIR_PREFIX, false);
        self.make_dir()?;
        self.start_databases(bin).await?;
        self.write_config()?;
        self.prepare_sites().await?;
        self.declare_topology().await?;
        self.start_sidecars()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.args.timeout);
        let written = self.write_changes(deadline).await?;
        self.wait_settled(&written, deadline).await?;
        self.report(&written).await
    }

    async fn check_broker(&mut self) -> Result<(), String> {
        let url = &self.args.rabbit.broker;
        url.parse::<lapin::uri::AMQPUri>()
            .map_err(|e| format!("--broker `{}` is not an AMQP URL: {e}", redact_url(url)))?;
        self.say(format!("checking RabbitMQ at {}", redact_url(url)));
        match bus::connect(
            std::slice::from_ref(url),
            Duration::from_secs(5),
            "sitesync-demo",
        )
        .await
        {
            Ok(_) => {}
            Err(e @ BusError::Refused { .. }) => {
                return Err(format!(
                    "RabbitMQ at {} refused the demo (check the user, password and virtual host of --broker): {e}",
                    redact_url(url)
                ));
            }
            Err(e) => {
                return Err(format!(
                    "RabbitMQ is not reachable at {}: {e}\n\
                     Start it with `rabbitmq-server -detached` (install it with `apt-get install rabbitmq-server`), \
                     or give another broker with --broker URL",
                    redact_url(url)
                ));
            }
        }
        if self.args.rabbit.no_management {
            return Ok(());
        }
        let management = ManagementApi::parse(&self.args.rabbit.management_url, url)
            .map(|api| Management::new(&api))
            .map_err(|e| format!("--management-url: {e}"))?;
        // `amq.fanout` exists in every virtual host: listing its bindings
        // tells whether the API answers with these credentials.
        let probe = tokio::task::spawn_blocking(move || management.unbound("amq.fanout", &[]))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        match probe {
            Ok(_) => self.management = Some(self.args.rabbit.management_url.clone()),
            Err(e) => self.say(format!(
                "note: the management API does not answer ({e}); bindings will not be verified \
                 (enable it with `rabbitmq-plugins enable rabbitmq_management`, or pass --no-management)"
            )),
        }
        Ok(())
    }

    /// One engine per site; a database given by URL is a PostgreSQL one.
    fn check_engines(&self) -> Result<(), String> {
        if self.args.engines.len() != SITES.len() {
            return Err(format!(
                "--engines names {} engine(s); the demo has {} sites ({}): give one per site, e.g. postgres,mariadb,postgres",
                self.args.engines.len(),
                SITES.len(),
                SITES.join(", ")
            ));
        }
        for site in &self.sites {
            if site.given_url.is_some() && site.engine != DemoEngine::Postgres {
                return Err(format!(
                    "--{}-url gives a PostgreSQL database, but --engines puts {} on {}: \
                     a {} site of the demo runs on a private server the demo starts",
                    site.db(),
                    site.name,
                    site.engine.label(),
                    site.engine.label()
                ));
            }
        }
        if self.sites.iter().any(|s| s.engine == DemoEngine::Mariadb) {
            maria::find_binaries()?;
        }
        Ok(())
    }

    /// Two sites on one database would share their tables.
    fn check_given_urls(&self) -> Result<(), String> {
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for site in &self.sites {
            let Some(url) = &site.given_url else { continue };
            let cfg: tokio_postgres::Config = url.parse().map_err(|e| {
                format!(
                    "--{}-url `{}` is not a PostgreSQL URL: {e}",
                    site.db(),
                    redact_url(url)
                )
            })?;
            let key = format!(
                "{:?}/{:?}/{:?}",
                cfg.get_hosts(),
                cfg.get_ports(),
                cfg.get_dbname()
            );
            if let Some(other) = seen.insert(key, site.name) {
                return Err(format!(
                    "{other} and {} are given the same database: each site needs its own",
                    site.name
                ));
            }
        }
        Ok(())
    }

    fn make_dir(&mut self) -> Result<(), String> {
        let dir = PathBuf::from(format!("/tmp/{DIR_PREFIX}{}", self.token));
        // Traversable by the `postgres` user, who owns each cluster's directory.
        create_owned_dir(&dir, 0o755).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        self.dir = Some(dir);
        Ok(())
    }

    fn dir(&self) -> &Path {
        self.dir.as_deref().expect("made before use")
    }

    async fn start_databases(&mut self, bin: Option<PathBuf>) -> Result<(), String> {
        let dir = self.dir().to_path_buf();
        for site in &mut self.sites {
            if site.given_url.is_some() || site.engine != DemoEngine::Postgres {
                continue;
            }
            let site_dir = dir.join(site.db());
            std::fs::create_dir(&site_dir)
                .map_err(|e| format!("creating {}: {e}", site_dir.display()))?;
            // Each cluster gets ports of its own (free_port never hands
            // one out twice), so they can start at once.
            site.cluster = Some(Cluster::new(
                site_dir,
                bin.clone().expect("found when a site needs a cluster"),
                Options {
                    cancel: Some(self.cancel.clone()),
                    ..Options::throwaway(site.name)
                },
            )?);
        }
        let clusters = self
            .sites
            .iter()
            .filter_map(|s| s.cluster.as_ref())
            .map(|c| c.name())
            .collect::<Vec<_>>();
        if !clusters.is_empty() {
            self.say(format!(
                "starting {} private PostgreSQL cluster(s) for {} (wal_level=logical, track_commit_timestamp=on) in {}",
                clusters.len(),
                clusters.join(", "),
                dir.display()
            ));
        }
        let began = Instant::now();
        // A task of its own: an interrupted demo lets a start (initdb,
        // pg_ctl) finish, then stops the cluster, rather than leave it half-way.
        let mut clusters: Vec<Cluster> = self
            .sites
            .iter_mut()
            .filter_map(|s| s.cluster.take())
            .collect();
        self.starting = Some(tokio::spawn(async move {
            let started =
                futures_util::future::join_all(clusters.iter_mut().map(|c| c.start())).await;
            (clusters, started)
        }));
        self.finish_starting()
            .await
            .into_iter()
            .collect::<Result<Vec<()>, String>>()?;
        for site in &mut self.sites {
            if let Some(c) = &site.cluster {
                let admin = connect(&c.url("postgres")).await?;
                admin
                    .batch_execute(&format!("CREATE DATABASE {}", site.db()))
                    .await
                    .map_err(|e| format!("{}: creating database {}: {e}", site.name, site.db()))?;
                site.url = c.url(&site.db());
            }
        }
        self.start_mariadb().await?;
        let mut lines = Vec::new();
        for site in &self.sites {
            lines.push(match (&site.cluster, &site.server) {
                (Some(c), _) => format!("{} on port {}", site.name, c.port()),
                (_, Some(m)) => format!("{} on port {} (MariaDB)", site.name, m.port()),
                _ => format!("{} at {}", site.name, redact_url(&site.url)),
            });
        }
        self.say(format!(
            "databases ready in {:.1} s: {}",
            began.elapsed().as_secs_f64(),
            lines.join(", ")
        ));
        Ok(())
    }

    /// A private MariaDB server per MariaDB site (binary log in ROW format
    /// with full row metadata, as the binlog source needs), one at a time.
    async fn start_mariadb(&mut self) -> Result<(), String> {
        let dir = self.dir().to_path_buf();
        let names: Vec<&str> = self
            .sites
            .iter()
            .filter(|s| s.engine == DemoEngine::Mariadb)
            .map(|s| s.name)
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        self.say(format!(
            "starting {} private MariaDB server(s) for {} (log_bin, binlog_format=ROW, binlog_row_metadata=FULL) in {}",
            names.len(),
            names.join(", "),
            dir.display()
        ));
        for site in &mut self.sites {
            if site.engine != DemoEngine::Mariadb {
                continue;
            }
            let site_dir = dir.join(site.db());
            std::fs::create_dir(&site_dir)
                .map_err(|e| format!("creating {}: {e}", site_dir.display()))?;
            let server = MariaServer::start(site_dir, maria::Options::new(site.name)).await?;
            server.create_database(&site.db()).await?;
            site.url = server.url(&site.db());
            site.server = Some(server);
        }
        Ok(())
    }

    /// Waits for the clusters' start and gives them back to their sites
    /// (also when the start failed: they are stopped in the clean-up).
    async fn finish_starting(&mut self) -> Vec<Result<(), String>> {
        // The handle stays in `self.starting` until the task is done: if
        // this wait is interrupted, the clean-up waits again.
        let Some(task) = self.starting.as_mut() else {
            return Vec::new();
        };
        let done = task.await;
        self.starting = None;
        let (clusters, started) = match done {
            Ok(done) => done,
            Err(e) => return vec![Err(format!("starting the clusters: {e}"))],
        };
        for cluster in clusters {
            if let Some(site) = self.sites.iter_mut().find(|s| s.name == cluster.name()) {
                site.cluster = Some(cluster);
            }
        }
        started
    }

    fn write_config(&mut self) -> Result<(), String> {
        let dir = self.dir().to_path_buf();
        let topology = dir.join("topology.toml");
        std::fs::write(&topology, topology_toml(&self.names))
            .map_err(|e| format!("writing {}: {e}", topology.display()))?;
        for i in 0..self.sites.len() {
            let site = &self.sites[i];
            let file = dir.join(format!("{}.toml", site.db()));
            let text = connector_toml(&ConnectorSpec {
                site: site.name,
                engine: site.engine,
                url: &site.url,
                broker: &self.args.rabbit.broker,
                management_url: self.management.as_deref(),
                topology: &topology,
                checkpoints: &dir.join("checkpoints"),
                slot: &format!("demo_{}_{}", self.token, site.db()),
            });
            std::fs::write(&file, text).map_err(|e| format!("writing {}: {e}", file.display()))?;
            let connector = Connector::load(&file).map_err(|e| e.to_string())?;
            self.sites[i].connector = Some(connector);
        }
        self.say(format!(
            "wrote {} and a connector per site (exchange {}, queues {}*)",
            topology.display(),
            self.names.exchange,
            self.names.prefix
        ));
        Ok(())
    }

    /// The business schema, then `sitesync init` at every site.
    async fn prepare_sites(&mut self) -> Result<(), String> {
        self.say("creating the business tables (customer, orders) and running `sitesync init` at every site");
        for site in &mut self.sites {
            let mut conn = match &site.server {
                Some(server) => Db::MariaDb(server.conn(Some(&site.db())).await?),
                None => Db::Pg(connect(&site.url).await?),
            };
            site.created = true;
            conn.create_business()
                .await
                .map_err(|e| format!("{}: creating the business tables: {e}", site.name))?;
            site.conn = Some(conn);
            let connector = site.connector.as_ref().expect("loaded");
            connector
                .engine
                .run(Init(&connector.config))
                .await
                .map_err(|e| format!("{}: init: {e}", site.name))?;
        }
        Ok(())
    }

    async fn declare_topology(&mut self) -> Result<(), String> {
        let cfg = self.sites[0].cfg();
        let conn = bus::connect(
            &cfg.broker.urls,
            cfg.broker.connect_timeout,
            "sitesync-demo",
        )
        .await
        .map_err(|e| e.to_string())?;
        self.declared = true;
        let done = topology::declare(&conn, &cfg.topology)
            .await
            .map_err(|e| format!("declaring the topology: {e}"))?;
        self.say(format!(
            "declared the topology on the broker: {} exchanges and queues",
            done.len()
        ));
        Ok(())
    }

    fn start_sidecars(&mut self) -> Result<(), String> {
        let (trigger, shutdown) = Shutdown::new();
        self.trigger = Some(trigger);
        for site in &self.sites {
            let connector = site.connector.clone().expect("loaded");
            let shutdown = shutdown.clone();
            let task = tokio::spawn(async move {
                let Connector { config, engine } = connector;
                engine.run(Sidecar(&config, shutdown)).await
            });
            self.sidecars.push((site.name, task));
        }
        self.say(
            "started the three sidecars (source: outbox → broker; sink: site queue → database)",
        );
        Ok(())
    }

    /// Every site's writes; returns the events written per site.
    async fn write_changes(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<BTreeMap<&'static str, usize>, String> {
        let mut written: BTreeMap<&'static str, usize> = BTreeMap::new();
        let scripts: Vec<Vec<Write>> = (0..SITES.len()).map(script).collect();
        let counts: Vec<(usize, usize, usize, usize)> = scripts.iter().map(|s| tally(s)).collect();
        self.say(format!(
            "writing at every site at once, each change with its outbox row in one transaction: {}",
            self.sites
                .iter()
                .zip(&counts)
                .map(|(s, (c, o, u, d))| format!(
                    "{} {c} customers, {o} orders, {u} updates, {d} delete",
                    s.name
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ));
        let runs = self
            .sites
            .iter_mut()
            .zip(&scripts)
            .map(|(site, writes)| async move {
                let name = site.name;
                let conn = site.conn();
                for w in writes {
                    conn.apply(w, None)
                        .await
                        .map_err(|e| format!("{name}: writing {w:?}: {e}"))?;
                }
                Ok::<_, String>(())
            });
        within(
            deadline,
            "writing",
            futures_util::future::try_join_all(runs),
        )
        .await??;
        for (site, writes) in SITES.iter().zip(&scripts) {
            written.insert(*site, writes.len());
        }

        // The conflict needs the shared customer everywhere first.
        let (sites, sidecars) = (&mut self.sites, &self.sidecars);
        within(deadline, "waiting for the shared customer", async {
            poll(async || {
                if let Some((name, _)) = sidecars.iter().find(|(_, t)| t.is_finished()) {
                    return Some(Err(format!(
                        "the {name} sidecar stopped (see its log above)"
                    )));
                }
                for site in sites.iter_mut() {
                    if !site.conn().has_customer(SHARED_CUSTOMER).await.ok()? {
                        return None;
                    }
                }
                Some(Ok(()))
            })
            .await
        })
        .await??;
        self.say(format!(
            "customer {SHARED_CUSTOMER} (created at PARIS) has reached every site; now the three sites update it at the same moment"
        ));
        let barrier = Arc::new(Barrier::new(self.sites.len()));
        let updates = self.sites.iter_mut().map(|site| {
            let barrier = barrier.clone();
            async move {
                let w = conflict_write(site.name);
                site.conn()
                    .apply(&w, Some(&barrier))
                    .await
                    .map_err(|e| format!("{}: the conflicting update: {e}", site.name))
            }
        });
        within(
            deadline,
            "the conflicting updates",
            futures_util::future::try_join_all(updates),
        )
        .await??;
        for site in SITES {
            *written.entry(site).or_default() += 1;
        }
        Ok(written)
    }

    /// Until every outbox is empty and every inbox holds the others' events.
    async fn wait_settled(
        &mut self,
        written: &BTreeMap<&'static str, usize>,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        let total: usize = written.values().sum();
        self.say(format!(
            "{total} events written; waiting until each has reached the other sites and come back round to its origin"
        ));
        let began = Instant::now();
        let mut last_report = Instant::now();
        let mut last = String::new();
        let mut delay = Duration::from_millis(20);
        loop {
            let mut settled = true;
            last.clear();
            for site in &mut self.sites {
                let want = (total - written[site.name]) as i64;
                let name = site.name;
                let (outbox, inbox) = site
                    .conn()
                    .pending(name)
                    .await
                    .map_err(|e| format!("{name}: {e}"))?;
                settled &= outbox == 0 && inbox == want;
                let _ = write!(
                    last,
                    "{} outbox {outbox}, from others {inbox}/{want}; ",
                    site.name
                );
            }
            if settled {
                self.say(format!(
                    "settled in {:.1} s: every outbox is empty and every site has received the others' events",
                    began.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            if let Some((name, _)) = self.sidecars.iter().find(|(_, t)| t.is_finished()) {
                return Err(format!(
                    "the {name} sidecar stopped (see its log above); {}",
                    last.trim_end_matches("; ")
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the sites did not settle within {} s: {}",
                    self.args.timeout,
                    last.trim_end_matches("; ")
                ));
            }
            if last_report.elapsed() >= Duration::from_secs(3) {
                self.say(format!("  still waiting: {}", last.trim_end_matches("; ")));
                last_report = Instant::now();
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    async fn report(&mut self, written: &BTreeMap<&'static str, usize>) -> Result<Outcome, String> {
        let mut rows = Vec::new();
        let mut conflicts = Vec::new();
        let mut finals = Vec::new();
        for site in &mut self.sites {
            let (name, entity) = (site.name, site.customer_entity());
            let err = |e: String| format!("{name}: {e}");
            let t = site.conn().tally().await.map_err(err)?;
            rows.push(SiteRow {
                site: name.to_string(),
                customers: t.customers,
                orders: t.orders,
                customer_sum: t.customer_sum,
                orders_sum: t.orders_sum,
                outbox: t.outbox,
                inbox: t.inbox,
                conflicts: t.conflicts,
            });
            conflicts.extend(
                site.conn()
                    .conflicts(&entity, SHARED_CUSTOMER)
                    .await
                    .map_err(err)?,
            );
            finals.push(
                site.conn()
                    .customer(&entity, SHARED_CUSTOMER)
                    .await
                    .map_err(err)?,
            );
        }

        out!("");
        out!("{}", render_table(&rows).trim_end());
        out!("");

        // The conflict: when each site's write committed, and what won.
        let mut committed: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
        for (lo, lt, wo, wt) in &conflicts {
            committed.entry(lo.clone()).or_insert(*lt);
            committed.entry(wo.clone()).or_insert(*wt);
        }
        out!(
            "conflict: customer {SHARED_CUSTOMER} updated at the three sites at the same moment (last writer wins):"
        );
        for site in SITES {
            let w = conflict_write(site);
            let Write::Customer { name, city, .. } = &w else {
                unreachable!("the conflict is a customer update")
            };
            let at = committed
                .get(site)
                .map_or_else(|| "?".to_string(), |t| t.format("%H:%M:%S%.6f").to_string());
            out!("  {site:<7} committed {at}  name {name:?}, city {city}");
        }
        if let (Some(first), Some(last)) = (committed.values().min(), committed.values().max()) {
            out!(
                "  the three commits were {:.3} ms apart",
                (*last - *first).num_microseconds().unwrap_or(0) as f64 / 1000.0
            );
        }
        let winner = match &finals[0] {
            Some((name, city, _)) => SITES
                .iter()
                .find(
                    |s| matches!(conflict_write(s), Write::Customer { name: n, .. } if n == *name),
                )
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("none ({name:?}, {city})")),
            None => "none (the customer is missing)".into(),
        };
        let same_everywhere = finals.iter().all(|f| f == &finals[0]);
        match &finals[0] {
            Some((name, city, origin)) if same_everywhere => out!(
                "  every site now has name {name:?}, city {city}: {winner}'s write won (version held by {origin} at every site)"
            ),
            _ => out!("  the sites disagree: {finals:?}"),
        }
        let recorded: i64 = rows.iter().map(|r| r.conflicts).sum();
        out!(
            "  the losing writes are kept in sitesync_conflicts ({recorded} rows over the three sites)"
        );
        out!("");

        let mut problems = Vec::new();
        if !converged(&rows) {
            problems.push(format!(
                "the checksums differ or events are pending: {}",
                rows.iter()
                    .map(|r| format!(
                        "{} {}/{} (outbox {})",
                        r.site,
                        short(&r.customer_sum),
                        short(&r.orders_sum),
                        r.outbox
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !same_everywhere {
            problems.push(format!(
                "customer {SHARED_CUSTOMER} differs between sites: {finals:?}"
            ));
        }
        Ok(Outcome {
            converged: problems.is_empty(),
            checksums: (short(&rows[0].customer_sum), short(&rows[0].orders_sum)),
            events: written.values().sum(),
            winner,
            problems,
        })
    }

    /// Stops and removes everything; returns what could not be cleaned up.
    async fn cleanup(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.starting.is_some() {
            self.cancel.store(true, Ordering::SeqCst);
            self.say("waiting for the clusters' start to finish");
            self.finish_starting().await;
        }
        if let Some(trigger) = self.trigger.take() {
            self.say("stopping the sidecars");
            let _ = trigger.send(true);
            // They drain at once; 20 s in all (each drains within 5 s).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            for (site, mut task) in std::mem::take(&mut self.sidecars) {
                match tokio::time::timeout_at(deadline, &mut task).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => problems.push(format!("the {site} sidecar: {e}")),
                    Ok(Err(e)) => problems.push(format!("the {site} sidecar: {e}")),
                    Err(_) => {
                        task.abort();
                        problems.push(format!("the {site} sidecar did not stop within 20 s"));
                    }
                }
            }
            drop(trigger);
        }
        for site in &mut self.sites {
            site.conn = None;
        }
        if std::mem::take(&mut self.declared) {
            self.say(format!(
                "deleting the demo's queues and exchanges ({}*)",
                self.names.prefix
            ));
            if let Err(e) = tokio::time::timeout(
                Duration::from_secs(15),
                delete_topology(&self.args.rabbit.broker, &self.names),
            )
            .await
            .unwrap_or_else(|_| Err("no answer within 15 s".into()))
            {
                problems.push(format!("deleting the demo's queues and exchanges: {e}"));
            }
        }
        for site in &self.sites {
            if site.created
                && site.given_url.is_some()
                && let Some(Connector {
                    engine: Engine::Postgres(db),
                    ..
                }) = &site.connector
            {
                self.say(format!(
                    "{}: dropping the demo's slot, publication and tables",
                    site.name
                ));
                if let Err(e) = drop_demo_objects(&site.url, db).await {
                    problems.push(format!("{}: {e}", site.name));
                }
            }
        }
        let clusters: Vec<&Cluster> = self
            .sites
            .iter()
            .filter_map(|s| s.cluster.as_ref())
            .collect();
        if !clusters.is_empty() {
            self.say("stopping the PostgreSQL clusters");
            let stops = futures_util::future::join_all(clusters.iter().map(|c| c.stop())).await;
            problems.extend(stops.into_iter().filter_map(Result::err));
        }
        let servers: Vec<&MariaServer> = self
            .sites
            .iter()
            .filter_map(|s| s.server.as_ref())
            .collect();
        if !servers.is_empty() {
            self.say("stopping the MariaDB servers");
            let stops = futures_util::future::join_all(servers.iter().map(|m| m.stop())).await;
            problems.extend(stops.into_iter().filter_map(Result::err));
            maria::remove_template();
        }
        if let Some(dir) = self.dir.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                problems.push(format!("removing {}: {e}", dir.display()));
            }
            for site in &mut self.sites {
                site.cluster = None;
                site.server = None;
            }
        }
        problems
    }
}

impl Drop for Demo {
    /// The last resort (a panic): no cluster is left running, no directory
    /// left behind. After [`Demo::cleanup`] there is nothing left to do.
    fn drop(&mut self) {
        if self.declared {
            let (url, names) = (self.args.rabbit.broker.clone(), self.names.clone());
            // Not on this runtime's threads: they may be shutting down.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                runtime
                    .block_on(tokio::time::timeout(
                        Duration::from_secs(10),
                        delete_topology(&url, &names),
                    ))
                    .ok()
            })
            .join();
        }
        for cluster in self.sites.iter().filter_map(|s| s.cluster.as_ref()) {
            cluster.stop_blocking();
        }
        for site in &mut self.sites {
            if let Some(server) = site.server.take() {
                server.kill_blocking();
                maria::remove_template();
            }
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs `f` until `deadline`.
async fn within<T>(
    deadline: tokio::time::Instant,
    what: &str,
    f: impl Future<Output = T>,
) -> Result<T, String> {
    tokio::time::timeout_at(deadline, f)
        .await
        .map_err(|_| format!("{what}: timed out"))
}

/// Polls `f` (with a capped backoff) until it gives a value.
async fn poll<T>(mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------
// Configuration files
// ---------------------------------------------------------------------------

/// A TOML basic string. `$` is doubled: the loader expands `${VAR}`.
fn toml_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("$$"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn topology_toml(names: &Names) -> String {
    format!(
        "# Written by `sitesync demo`: names of its own, so the real SITE_* queues are never touched.\n\
         exchange = {}\n\
         sites = [{}]\n\
         site_queue_prefix = {}\n\
         archive_queue = {}\n\
         dead_letter_exchange = {}\n\
         dead_letter_queue = {}\n",
        toml_str(&names.exchange),
        SITES.map(toml_str).join(", "),
        toml_str(&names.prefix),
        toml_str(&names.archive),
        toml_str(&names.dlx),
        toml_str(&names.dlq),
    )
}

/// What one site's connector file says.
struct ConnectorSpec<'a> {
    site: &'a str,
    engine: DemoEngine,
    url: &'a str,
    broker: &'a str,
    management_url: Option<&'a str>,
    topology: &'a Path,
    checkpoints: &'a Path,
    /// The slot and publication name (PostgreSQL).
    slot: &'a str,
}

/// A connector file in the format of `connectors/paris.toml`, with the
/// demo's routes.
fn connector_toml(spec: &ConnectorSpec<'_>) -> String {
    let name = spec.site.to_lowercase();
    let management = spec
        .management_url
        .map(|m| format!("management_url = {}\n", toml_str(m)))
        .unwrap_or_default();
    // PostgreSQL names its slot and publication; MariaDB's binlog reader
    // takes a server id of its own by default.
    let database = match spec.engine {
        DemoEngine::Postgres => format!(
            "kind = \"postgres\"\nurl = {url}\nslot = {slot}\npublication = {slot}\n",
            url = toml_str(spec.url),
            slot = toml_str(spec.slot),
        ),
        DemoEngine::Mariadb => format!("kind = \"mariadb\"\nurl = {}\n", toml_str(spec.url)),
    };
    format!(
        "# The {site} site of `sitesync demo`.\n\
         site = {site_q}\n\
         name = {name_q}\n\
         \n\
         [database]\n\
         {database}\
         \n\
         [broker]\n\
         urls = [{broker}]\n\
         topology = {topology}\n\
         {management}\
         connect_timeout_ms = 5000\n\
         \n\
         [checkpoint]\n\
         dir = {checkpoint}\n\
         \n\
         [retry]\n\
         initial_backoff_ms = 100\n\
         max_backoff_ms = 2000\n\
         \n\
         [shutdown]\n\
         drain_timeout_ms = 5000\n\
         \n\
         [sink]\n\
         batch_timeout_ms = 20\n\
         {routes}",
        site = spec.site,
        site_q = toml_str(spec.site),
        name_q = toml_str(&name),
        routes = routes(spec.engine),
        broker = toml_str(spec.broker),
        topology = toml_str(&spec.topology.to_string_lossy()),
        checkpoint = toml_str(&spec.checkpoints.join(&name).to_string_lossy()),
    )
}

/// `sitesync init` of one site, whatever its engine: the outbox (and what
/// the source needs), then the sink's tables.
struct Init<'a>(&'a ConnectorConfig);

impl Task for Init<'_> {
    type Output = Result<(), String>;

    async fn run<D: Driver>(self, db: &D::Settings) -> Result<(), String> {
        let source = D::source(self.0, db).map_err(|e| e.to_string())?;
        source.init().await.map_err(|e| e.to_string())?;
        let target = D::target(self.0, db).map_err(|e| e.to_string())?;
        target.init().await.map_err(|e| e.message().to_string())?;
        Ok(())
    }
}

/// One site's sidecar, whatever its engine, as `sitesync run` runs it.
struct Sidecar<'a>(&'a ConnectorConfig, Shutdown);

impl Task for Sidecar<'_> {
    type Output = Result<(), String>;

    async fn run<D: Driver>(self, db: &D::Settings) -> Result<(), String> {
        let Sidecar(cfg, shutdown) = self;
        let source = D::source(cfg, db).map_err(|e| e.to_string())?;
        let target = D::target(cfg, db).map_err(|e| e.to_string())?;
        let target = Batches::new(target, &cfg.site, &cfg.sink);
        sidecar::run(
            cfg,
            source,
            Some(target),
            None::<crate::engine::postgres::archive::PgArchive>,
            None::<
                sidecar::Upkeep<
                    crate::engine::postgres::purge::PgPurge,
                    crate::engine::postgres::jobs::PgJobs,
                >,
            >,
            shutdown,
        )
        .await
        .map_err(|e| e.to_string())
    }
}

// ---------------------------------------------------------------------------
// The business writes
// ---------------------------------------------------------------------------

/// One application write: a business change and its outbox row.
#[derive(Debug, Clone, PartialEq)]
enum Write {
    Customer {
        id: i32,
        name: String,
        city: String,
    },
    DeleteCustomer {
        id: i32,
    },
    Order {
        id: i32,
        customer_id: i32,
        /// numeric(10,2), as text.
        amount: String,
        status: &'static str,
    },
}

const FIRST_NAMES: [&str; 8] = [
    "Ada", "Blaise", "Carmen", "Dora", "Émile", "Frida", "Gustave", "Hélène",
];

fn home(site: &str) -> (&'static str, &'static str) {
    match site {
        "PARIS" => ("Paris", "Lyon"),
        "LONDON" => ("London", "Leeds"),
        _ => ("Madrid", "Sevilla"),
    }
}

/// The writes of site `i` (of [`SITES`]): ids `(i+1)*100 + k`, so each
/// site creates rows of its own; PARIS also creates the shared customer.
fn script(i: usize) -> Vec<Write> {
    let site = SITES[i];
    let base = (i as i32 + 1) * 100;
    let (city, other_city) = home(site);
    let mut w = Vec::new();
    if i == 0 {
        w.push(Write::Customer {
            id: SHARED_CUSTOMER,
            name: "Zoé".into(),
            city: city.into(),
        });
    }
    for (k, first) in (1..).zip(FIRST_NAMES) {
        w.push(Write::Customer {
            id: base + k,
            name: format!("{first} of {site}"),
            city: city.into(),
        });
        w.push(Write::Order {
            id: base + k,
            customer_id: base + k,
            amount: format!("{}.{:02}", 10 + k * 7, (k * 37) % 100),
            status: "new",
        });
    }
    w.push(Write::Customer {
        id: base + 2,
        name: format!("{} of {site}", FIRST_NAMES[1]),
        city: other_city.into(),
    });
    w.push(Write::Order {
        id: base + 3,
        customer_id: base + 3,
        amount: "99.90".into(),
        status: "shipped",
    });
    w.push(Write::Order {
        id: base + 4,
        customer_id: base + 4,
        amount: format!("{}.{:02}", 10 + 4 * 7, (4 * 37) % 100),
        status: "cancelled",
    });
    w.push(Write::DeleteCustomer { id: base + 8 });
    w
}

/// (customers created, orders created, updates, deletes) of a script.
fn tally(writes: &[Write]) -> (usize, usize, usize, usize) {
    let mut seen = HashSet::new();
    let (mut c, mut o, mut u, mut d) = (0, 0, 0, 0);
    for w in writes {
        match w {
            Write::Customer { id, .. } if seen.insert(("c", *id)) => c += 1,
            Write::Order { id, .. } if seen.insert(("o", *id)) => o += 1,
            Write::DeleteCustomer { .. } => d += 1,
            _ => u += 1,
        }
    }
    (c, o, u, d)
}

/// What `site` writes to the shared customer during the conflict.
fn conflict_write(site: &str) -> Write {
    let name = match site {
        "PARIS" => "Zoé Martin",
        "LONDON" => "Zoe Smith",
        _ => "Zoé García",
    };
    Write::Customer {
        id: SHARED_CUSTOMER,
        name: name.into(),
        city: home(site).0.into(),
    }
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

/// One site's line of the final table.
#[derive(Debug, Clone, PartialEq)]
struct SiteRow {
    site: String,
    customers: i64,
    orders: i64,
    /// md5 of the table's rows as JSON, in key order.
    customer_sum: String,
    orders_sum: String,
    outbox: i64,
    inbox: i64,
    conflicts: i64,
}

fn short(sum: &str) -> String {
    sum.chars().take(8).collect()
}

/// Whether the sites converged: nothing pending, the same rows everywhere.
fn converged(rows: &[SiteRow]) -> bool {
    let Some(first) = rows.first() else {
        return false;
    };
    rows.iter().all(|r| {
        r.outbox == 0 && r.customer_sum == first.customer_sum && r.orders_sum == first.orders_sum
    })
}

fn render_table(rows: &[SiteRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:>9} {:>7} {:>17} {:>15} {:>7} {:>6} {:>10}",
        "site",
        "customers",
        "orders",
        "customer checksum",
        "orders checksum",
        "outbox",
        "inbox",
        "conflicts"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<8} {:>9} {:>7} {:>17} {:>15} {:>7} {:>6} {:>10}",
            r.site,
            r.customers,
            r.orders,
            short(&r.customer_sum),
            short(&r.orders_sum),
            r.outbox,
            r.inbox,
            r.conflicts
        );
    }
    out
}

// ---------------------------------------------------------------------------
// PostgreSQL: private clusters and given databases
// ---------------------------------------------------------------------------

/// A database given by URL must be reachable, logical, and free of the
/// demo's tables (the demo creates them and drops them at the end).
async fn check_given(site: &str, url: &str) -> Result<(), String> {
    let client = connect(url).await.map_err(|e| format!("{site}: {e}"))?;
    let wal: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(|e| format!("{site}: {e}"))?
        .get(0);
    if wal != "logical" {
        return Err(format!(
            "{site}: the database at {} has wal_level = {wal}; sitesync needs logical: \
             run `ALTER SYSTEM SET wal_level = logical` and restart PostgreSQL",
            redact_url(url)
        ));
    }
    let tables: Vec<&str> = DEMO_TABLES.to_vec();
    let existing: Vec<String> = client
        .query(
            "SELECT t FROM unnest($1::text[]) t WHERE to_regclass(t) IS NOT NULL",
            &[&tables],
        )
        .await
        .map_err(|e| format!("{site}: {e}"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !existing.is_empty() {
        return Err(format!(
            "{site}: the database at {} already has {}: the demo creates these tables and drops them at the end; \
             give it a database without them (e.g. `createdb sitesync_demo_{}`)",
            redact_url(url),
            existing.join(", "),
            site.to_lowercase()
        ));
    }
    Ok(())
}

/// Drops what the demo created in a database given by URL.
async fn drop_demo_objects(url: &str, db: &PgSettings) -> Result<(), String> {
    let client = connect(url).await?;
    let slot = &db.slot;
    // The walsender of a stopped sidecar may take a moment to go.
    let dropped = tokio::time::timeout(
        Duration::from_secs(10),
        poll(async || {
            let active: Option<bool> = client
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[slot],
                )
                .await
                .ok()?
                .map(|r| r.get(0));
            match active {
                None => Some(()),
                Some(true) => None,
                Some(false) => {
                    // It may turn active again in between: then the next round.
                    let _ = client
                        .execute("SELECT pg_drop_replication_slot($1)", &[slot])
                        .await;
                    None
                }
            }
        }),
    )
    .await;
    let mut problems = Vec::new();
    if dropped.is_err() {
        problems.push(format!("replication slot {slot} is still in use; drop it with SELECT pg_drop_replication_slot('{slot}')"));
    }
    let sql = format!(
        "DROP PUBLICATION IF EXISTS \"{}\"; DROP TABLE IF EXISTS {};",
        db.publication,
        DEMO_TABLES.join(", ")
    );
    if let Err(e) = client.batch_execute(&sql).await {
        problems.push(format!("{sql}: {e}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

// ---------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------

async fn delete_topology(url: &str, names: &Names) -> Result<(), String> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let conn = bus::connect(
        std::slice::from_ref(&url.to_string()),
        Duration::from_secs(5),
        "sitesync-demo-cleanup",
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    // A channel per object: an error closes the channel it happens on.
    for queue in names.queues() {
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        if let Err(e) = ch
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            problems.push(format!("queue {queue}: {e}"));
        }
        let _ = ch.close(200, "demo cleanup".into()).await;
    }
    for exchange in [&names.exchange, &names.dlx] {
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        if let Err(e) = ch
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
        {
            problems.push(format!("exchange {exchange}: {e}"));
        }
        let _ = ch.close(200, "demo cleanup".into()).await;
    }
    let _ = conn.close(200, "demo cleanup".into()).await;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Operation, TopologyConfig};

    /// The topology a demo run declares.
    fn topology_of(names: &Names, file: &Path) -> TopologyConfig {
        TopologyConfig {
            file: file.to_path_buf(),
            exchange: names.exchange.clone(),
            sites: SITES.iter().map(|s| s.to_string()).collect(),
            site_queue_prefix: names.prefix.clone(),
            archive_queue: names.archive.clone(),
            dead_letter_exchange: names.dlx.clone(),
            dead_letter_queue: names.dlq.clone(),
            archive_site: None,
            archive_bound: Default::default(),
        }
    }

    /// A PostgreSQL site's connector file, loaded as `sitesync run` loads it.
    fn load_site(file: &Path) -> Result<(ConnectorConfig, PgSettings), String> {
        let connector = Connector::load(file).map_err(|e| e.to_string())?;
        match connector.engine {
            Engine::Postgres(db) => Ok((connector.config, db)),
            other => Err(format!("{}: {} site", file.display(), other.name())),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sitesync-demo-test-{name}-{}-{}",
            std::process::id(),
            random_hex(6)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_site(
        dir: &Path,
        site: &str,
        broker: &str,
        management: Option<&str>,
    ) -> (Names, PathBuf) {
        write_site_on(dir, site, DemoEngine::Postgres, broker, management)
    }

    fn write_site_on(
        dir: &Path,
        site: &str,
        engine: DemoEngine,
        broker: &str,
        management: Option<&str>,
    ) -> (Names, PathBuf) {
        let names = Names::new("0123abcd");
        let topology = dir.join("topology.toml");
        std::fs::write(&topology, topology_toml(&names)).unwrap();
        let file = dir.join(format!("{}.toml", site.to_lowercase()));
        let url = match engine {
            DemoEngine::Postgres => "postgres://postgres@127.0.0.1:12345/paris",
            DemoEngine::Mariadb => "mysql://root@127.0.0.1:12346/london",
        };
        let text = connector_toml(&ConnectorSpec {
            site,
            engine,
            url,
            broker,
            management_url: management,
            topology: &topology,
            checkpoints: &dir.join("checkpoints"),
            slot: "demo_0123abcd_paris",
        });
        std::fs::write(&file, text).unwrap();
        (names, file)
    }

    #[test]
    fn the_generated_files_load_with_the_routes() {
        let dir = scratch("load");
        let (names, file) = write_site(
            &dir,
            "PARIS",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            Some("http://127.0.0.1:15672"),
        );
        let (cfg, db) = load_site(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.site, "PARIS");
        assert_eq!(cfg.name, "paris");
        assert_eq!(db.slot, "demo_0123abcd_paris");
        assert_eq!(db.publication, "demo_0123abcd_paris");
        assert_eq!(cfg.checkpoint.dir, dir.join("checkpoints").join("paris"));
        assert_eq!(
            cfg.broker.management.as_ref().map(|api| api.base.as_str()),
            Some("http://127.0.0.1:15672")
        );
        assert_eq!(
            cfg.topology,
            topology_of(&names, &dir.join("topology.toml"))
        );
        assert_eq!(
            cfg.topology.site_queue("LONDON"),
            "demo-0123abcd_SITE_LONDON"
        );
        assert!(cfg.sink.enabled);
        let kinds: Vec<&str> = cfg.sink.routes.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["customer.upsert", "customer.delete", "order.upsert"]
        );
        let delete = cfg.sink.route("customer.delete").unwrap();
        assert_eq!(delete.operation, Operation::Delete);
        assert_eq!(delete.table, "public.customer");
        let order = cfg.sink.route("order.upsert").unwrap();
        assert_eq!(order.table, "public.orders");
        assert_eq!(order.column_of("total"), Some("amount"));
        assert_eq!(order.key, ["id"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_mariadb_site_gets_a_mariadb_connector_with_unqualified_tables() {
        let dir = scratch("mariadb");
        let (_, file) = write_site_on(
            &dir,
            "LONDON",
            DemoEngine::Mariadb,
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            None,
        );
        let connector = Connector::load(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(connector.engine.name(), "mariadb");
        let cfg = &connector.config;
        assert_eq!(cfg.site, "LONDON");
        let tables: Vec<&str> = cfg.sink.routes.iter().map(|r| r.table.as_str()).collect();
        assert_eq!(tables, ["customer", "customer", "orders"]);
        assert_eq!(
            cfg.sink.route("order.upsert").unwrap().column_of("total"),
            Some("amount")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The options of `sitesync demo <args>`.
    fn parse(args: &[&str]) -> Result<DemoArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            demo: DemoArgs,
        }
        use clap::Parser as _;
        Cli::try_parse_from(std::iter::once("demo").chain(args.iter().copied())).map(|c| c.demo)
    }

    fn demo_with(args: &[&str]) -> Demo {
        Demo::new(parse(args).unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn engines_are_one_per_site_and_a_given_url_is_a_postgres_site() {
        let demo = demo_with(&["--engines", "postgres,mysql,postgres"]);
        assert_eq!(
            demo.layout(),
            "PARIS on PostgreSQL, LONDON on MariaDB, MADRID on PostgreSQL"
        );
        assert_eq!(
            demo_with(&[]).layout(),
            "PARIS on PostgreSQL, LONDON on PostgreSQL, MADRID on PostgreSQL"
        );
        let err = demo_with(&["--engines", "postgres,mariadb"])
            .check_engines()
            .unwrap_err();
        assert!(
            err.contains("names 2 engine(s)") && err.contains("one per site"),
            "{err}"
        );
        let err = demo_with(&[
            "--engines",
            "postgres,mariadb,postgres",
            "--london-url",
            "postgres://127.0.0.1/london",
        ])
        .check_engines()
        .unwrap_err();
        assert!(
            err.contains("--london-url") && err.contains("LONDON on MariaDB"),
            "{err}"
        );
        assert!(parse(&["--engines", "postgres,oracle,postgres"]).is_err());
    }

    #[test]
    fn management_may_be_absent_and_dollars_stay_literal() {
        let dir = scratch("dollar");
        let broker = "amqp://app:pa$${x}\"\\@127.0.0.1:5672/%2f";
        let (_, file) = write_site(&dir, "MADRID", broker, None);
        let (cfg, _) = load_site(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.broker.urls, [broker]);
        assert_eq!(cfg.broker.management, None);
        assert_eq!(cfg.site, "MADRID");
        assert_eq!(cfg.checkpoint.dir, dir.join("checkpoints").join("madrid"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_never_touch_the_real_queues() {
        let names = Names::new("0123abcd");
        for q in names.queues() {
            assert!(q.starts_with("demo-0123abcd"), "{q}");
        }
        // Three sites, the archive, its request queue, the dead letters.
        assert_eq!(names.queues().len(), 6);
        assert!(
            names
                .queues()
                .contains(&format!("{}_REQUESTS", names.archive))
        );
        assert!(names.exchange.starts_with("demo-0123abcd"));
        assert!(names.dlx.starts_with("demo-0123abcd"));
    }

    fn row(site: &str, c: &str, o: &str, outbox: i64) -> SiteRow {
        SiteRow {
            site: site.into(),
            customers: 9,
            orders: 8,
            customer_sum: c.into(),
            orders_sum: o.into(),
            outbox,
            inbox: 64,
            conflicts: 2,
        }
    }

    #[test]
    fn converged_needs_equal_checksums_and_empty_outboxes() {
        let same = [
            row("PARIS", "aa", "bb", 0),
            row("LONDON", "aa", "bb", 0),
            row("MADRID", "aa", "bb", 0),
        ];
        assert!(converged(&same));
        let mut differ = same.clone();
        differ[2].orders_sum = "bc".into();
        assert!(!converged(&differ));
        let mut differ = same.clone();
        differ[1].customer_sum = "ab".into();
        assert!(!converged(&differ));
        let mut pending = same.clone();
        pending[0].outbox = 1;
        assert!(!converged(&pending));
        assert!(!converged(&[]));
        let table = render_table(&same);
        assert_eq!(table.lines().count(), 4);
        assert!(
            table.lines().nth(2).unwrap().starts_with("LONDON "),
            "{table}"
        );
    }

    #[test]
    fn each_site_writes_rows_of_its_own() {
        let mut ids: Vec<HashSet<i32>> = Vec::new();
        for (i, site) in SITES.iter().enumerate() {
            let writes = script(i);
            let (c, o, u, d) = tally(&writes);
            assert_eq!((c, o, u, d), (8 + usize::from(i == 0), 8, 3, 1), "{site}");
            ids.push(
                writes
                    .iter()
                    .map(|w| match w {
                        Write::Customer { id, .. }
                        | Write::DeleteCustomer { id }
                        | Write::Order { id, .. } => *id,
                    })
                    .filter(|id| *id != SHARED_CUSTOMER)
                    .collect(),
            );
        }
        assert!(
            ids[0].is_disjoint(&ids[1])
                && ids[1].is_disjoint(&ids[2])
                && ids[0].is_disjoint(&ids[2])
        );
        // The conflict: three different values for the same customer.
        let values: HashSet<String> = SITES
            .iter()
            .map(|s| format!("{:?}", conflict_write(s)))
            .collect();
        assert_eq!(values.len(), 3);
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str("a\"b\\c$d"), "\"a\\\"b\\\\c$$d\"");
        assert_eq!(toml_str("tab\there"), "\"tab\\u0009here\"");
    }
}
