//! The `sitesync` command line.
//!
//! Exit codes: 0 success; 1 a runtime failure (or a failed check); 2 a
//! configuration or usage error.

use crate::archive::Store;
use crate::bus::{self, topology};
use crate::checkpoint::{self, Checkpoint, CheckpointError, CheckpointStore, describe, reset_hint};
use crate::checks::{Check, Status};
use crate::config::{ConfigErrors, ConnectorConfig, TopologyConfig, redact_url};
use crate::engine::{Connector, Driver, Task};
use crate::error::{SourceError, TargetError};
use crate::jobs::{Job, JobLog};
use crate::position::LogPosition;
use crate::purge::Tables;
use crate::runner::Shutdown;
use crate::sidecar;
use crate::sink::Target;
use crate::sink::batch::{Batches, Dialect};
use crate::source::{LogBounds, Source};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "sitesync",
    version,
    about = "Keeps the databases of several sites in sync through RabbitMQ (outbox → change log → broker).",
    after_help = "Quick start:\n  sitesync init --connector connectors/paris.toml\n  sitesync topology declare --connector connectors/paris.toml\n  sitesync run --connector connectors/paris.toml"
)]
pub struct Cli {
    /// Log format on stderr (RUST_LOG sets the filter; default `info,lapin=off,tokio_postgres=warn`).
    #[arg(
        long,
        value_enum,
        global = true,
        default_value = "human",
        env = "SITESYNC_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Args, Debug, Clone)]
struct ConnectorArg {
    /// The connector file (one per database), e.g. connectors/paris.toml.
    #[arg(long, short = 'c', value_name = "FILE")]
    connector: PathBuf,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    connector: ConnectorArg,
    /// One JSON object instead of the report (what the admin API's /api/status answers, with the dead-letter queue's depth and, with [archive], the archive's rows).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stream the outbox to RabbitMQ until SIGTERM/SIGINT (then drain and exit 0).
    #[command(after_help = "Example:\n  sitesync run --connector connectors/paris.toml")]
    Run(ConnectorArg),
    /// Validate the connector file, then check the database, the broker, the topology and the checkpoint.
    #[command(after_help = "Example:\n  sitesync check --connector connectors/paris.toml")]
    Check(ConnectorArg),
    /// Create the outbox table, what the change log needs (PostgreSQL: publication and slot), the sink's tables and, with [archive], the archive table (idempotent).
    #[command(after_help = "Example:\n  sitesync init --connector connectors/paris.toml")]
    Init(ConnectorArg),
    /// Broker topology commands.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Checkpoint commands.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Per origin: the last applied (epoch, seq) and when; gaps; dead letters; conflicts; outbox backlog and source lag; with [archive], the archive's rows and backlog.
    #[command(
        after_help = "Examples:\n  sitesync status --connector connectors/london.toml\n  sitesync status --connector connectors/london.toml --json"
    )]
    Status(StatusArgs),
    /// Gaps (events of an origin that never arrived here): list them, or ask the archive for them now.
    #[command(subcommand)]
    Gaps(GapsCommand),
    /// What this site's database knows of one event: its receipts (applied, dead-lettered with the reason, archived, at each site, with times) and its inbox row.
    #[command(
        after_help = "Example:\n  sitesync trace --connector connectors/paris.toml 0190a0e0-0000-7000-8000-000000000001"
    )]
    Trace {
        #[command(flatten)]
        connector: ConnectorArg,
        /// The event id (the outbox row's id).
        event: String,
    },
    /// Dead-letter queue commands.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Triggers that fill the outbox from business tables, for applications that cannot write it (docs/capture.md).
    #[command(subcommand)]
    Capture(CaptureCommand),
    /// Send archived events again, in each origin's order, to one site's queue (never through the fanout). Run with the archiving site's connector.
    #[command(
        after_help = "Examples:\n  sitesync replay --connector connectors/paris.toml --to-site LONDON --dry-run\n  sitesync replay --connector connectors/paris.toml --to-site LONDON --origin MADRID --from 2026-11-01T00:00:00Z --type 'customer.*' --rate 2000 --yes"
    )]
    Replay(ReplayArgs),
    /// The long operations recorded in this site's database (replay, purge, …): who ran them, how far they got, how they ended.
    #[command(
        after_help = "Examples:\n  sitesync jobs --connector connectors/paris.toml\n  sitesync jobs --connector connectors/paris.toml --kind purge --limit 5 --json"
    )]
    Jobs(JobsArgs),
    /// The manual actions recorded in this site's database (checkpoint reset, dlq requeue, replay, resync, purge, gaps fill, conflicts review, capture add|remove), from the CLI or the admin API: who, when, arguments, result.
    #[command(
        after_help = "Examples:\n  sitesync audit --connector connectors/paris.toml\n  sitesync audit --connector connectors/paris.toml --action 'dlq requeue' --limit 5 --json"
    )]
    Audit(AuditArgs),
    /// Delete archive rows, inbox rows and reviewed conflicts older than their retention, in small batches (the sidecar also does it every purge_every).
    #[command(
        after_help = "Examples:\n  sitesync purge --connector connectors/paris.toml --dry-run\n  sitesync purge --connector connectors/paris.toml --yes"
    )]
    Purge(PurgeArgs),
    /// Conflicts recorded by last-writer-wins.
    #[command(subcommand)]
    Conflicts(ConflictsCommand),
    /// Send the current rows of chosen tables, read in one consistent snapshot, to one site's queue (never through the fanout), as a job that can be resumed (docs/resync.md).
    #[command(
        after_help = "Examples:\n  sitesync resync --connector connectors/paris.toml --to-site LONDON --all --dry-run\n  sitesync resync --connector connectors/paris.toml --to-site LONDON --route customer.upsert --where \"region = 'EU'\" --rate 5000 --yes\n  sitesync resync --connector connectors/paris.toml --resume 7 --yes\n  sitesync resync --connector connectors/paris.toml --abandon 7"
    )]
    Resync(ResyncArgs),
    /// Three sites (PARIS, LONDON, MADRID) on private PostgreSQL clusters and RabbitMQ: writes everywhere, a conflict, and a check that they converge. Leaves nothing behind.
    #[command(
        after_help = "Examples:\n  sitesync demo\n  sitesync demo --broker amqp://guest:guest@127.0.0.1:5672/%2f --no-management\n  sitesync demo --paris-url postgres://postgres@127.0.0.1:5432/paris_demo"
    )]
    Demo(crate::lab::demo::DemoArgs),
    /// Throughput, latency, bulk and memory against RabbitMQ's own ceiling, measured in one run on private PostgreSQL and the local broker. Leaves nothing behind.
    #[command(
        after_help = "Examples:\n  cargo run --release -- bench\n  sitesync bench --json\n  sitesync bench --quick --json"
    )]
    Bench(crate::lab::bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
enum CaptureCommand {
    /// Create the triggers of the routes' tables, or bring them up to date (idempotent).
    #[command(
        after_help = "Examples:\n  sitesync capture add --connector connectors/paris.toml --route customer.upsert --dry-run\n  sitesync capture add --connector connectors/paris.toml --all"
    )]
    Add {
        #[command(flatten)]
        connector: ConnectorArg,
        #[command(flatten)]
        which: CaptureWhich,
        /// Print the SQL; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Drop the capture triggers of the routes' tables.
    #[command(
        after_help = "Example:\n  sitesync capture remove --connector connectors/paris.toml --route customer.upsert"
    )]
    Remove {
        #[command(flatten)]
        connector: ConnectorArg,
        #[command(flatten)]
        which: CaptureWhich,
        /// Print the SQL; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Each routed table: what capture writes, and whether its triggers are there and current.
    #[command(after_help = "Example:\n  sitesync capture list --connector connectors/paris.toml")]
    List(ConnectorArg),
}

/// The routes whose tables `capture add|remove` acts on; neither: the
/// routes that say `capture = true`.
#[derive(Args, Debug)]
#[group(multiple = false)]
struct CaptureWhich {
    /// A route's type (its table is captured with both its routes); may be repeated.
    #[arg(long = "route", value_name = "TYPE")]
    routes: Vec<String>,
    /// Every route's table.
    #[arg(long)]
    all: bool,
}

#[derive(Subcommand, Debug)]
enum GapsCommand {
    /// Each open gap: origin, epoch, seq range, age, when the archive was last asked, and what it said.
    #[command(after_help = "Example:\n  sitesync gaps list --connector connectors/london.toml")]
    List(ConnectorArg),
    /// Ask the archiving site now for the events of every open gap (the sidecar does it by itself after gap_fill_after_ms); with --wait, wait until they close or the archive says it lacks them.
    #[command(
        after_help = "Example:\n  sitesync gaps fill --connector connectors/london.toml --wait 60"
    )]
    Fill {
        #[command(flatten)]
        connector: ConnectorArg,
        /// Wait up to this many seconds for the gaps to close (the sidecar must be running to apply the events).
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List the dead letters: id, type, origin, failing site, reason, when. Nothing is removed.
    #[command(after_help = "Example:\n  sitesync dlq list --connector connectors/paris.toml")]
    List(ConnectorArg),
    /// Send dead letters back to the queue of the site where they failed (never through the fanout).
    #[command(
        after_help = "Examples:\n  sitesync dlq requeue --connector connectors/paris.toml --id 7f1d8a5e-3c2b-4a8e-9f00-0123456789ab\n  sitesync dlq requeue --connector connectors/paris.toml --all"
    )]
    Requeue {
        #[command(flatten)]
        connector: ConnectorArg,
        #[command(flatten)]
        which: RequeueWhich,
    },
}

#[derive(Args, Debug)]
struct ReplayArgs {
    #[command(flatten)]
    connector: ConnectorArg,
    /// The site whose queue receives the events, e.g. LONDON.
    #[arg(long, value_name = "SITE")]
    to_site: String,
    /// Only this origin's events.
    #[arg(long, value_name = "SITE")]
    origin: Option<String>,
    /// Only events written at or after this time (RFC 3339; without a zone, UTC).
    #[arg(long, value_name = "TIME")]
    from: Option<String>,
    /// Only events written before this time.
    #[arg(long, value_name = "TIME")]
    to: Option<String>,
    /// Only event types matching this pattern (`*` for any run of characters).
    #[arg(long = "type", value_name = "PATTERN")]
    kind: Option<String>,
    /// Print how many events per origin and type would go; send nothing.
    #[arg(long)]
    dry_run: bool,
    /// At most this many events a second.
    #[arg(long, value_name = "N")]
    rate: Option<u32>,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

#[derive(Args, Debug)]
struct JobsArgs {
    #[command(flatten)]
    connector: ConnectorArg,
    /// Only jobs of this kind (replay, purge, resync, gap-fill).
    #[arg(long, value_name = "KIND")]
    kind: Option<String>,
    /// At most this many jobs, newest first.
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: usize,
    /// One JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct AuditArgs {
    #[command(flatten)]
    connector: ConnectorArg,
    /// Only this action (e.g. `purge`, `dlq requeue`, `resync`).
    #[arg(long, value_name = "ACTION")]
    action: Option<String>,
    /// At most this many entries, newest first.
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: usize,
    /// One JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PurgeArgs {
    #[command(flatten)]
    connector: ConnectorArg,
    /// Print how many rows of each table would go; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

#[derive(Subcommand, Debug)]
enum ConflictsCommand {
    /// Mark conflicts reviewed (by their id in sitesync_conflicts): the purge removes them after conflict_retention_days.
    #[command(
        after_help = "Example:\n  sitesync conflicts review --connector connectors/london.toml 12 13 14"
    )]
    Review {
        #[command(flatten)]
        connector: ConnectorArg,
        /// The conflicts' ids.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<i64>,
    },
    /// The latest conflicts recorded here (the losing write, the one that won), newest first.
    List {
        #[command(flatten)]
        connector: ConnectorArg,
        /// At most this many.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: usize,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Choose the losing write after all: it is sent again as a new event of this site, later than the winner, and every site converges on it.
    #[command(
        after_help = "Example:\n  sitesync conflicts choose --connector connectors/london.toml 12"
    )]
    Choose {
        #[command(flatten)]
        connector: ConnectorArg,
        /// The conflict's id (`sitesync conflicts list`).
        #[arg(value_name = "ID")]
        id: i64,
        /// The event type to send it as, when more than one route writes its table.
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args, Debug)]
struct ResyncArgs {
    #[command(flatten)]
    connector: ConnectorArg,
    /// The site whose queue receives the rows, e.g. LONDON.
    #[arg(long, value_name = "SITE", required_unless_present_any = ["resume", "abandon"])]
    to_site: Option<String>,
    /// The rows of this route's table (an event type); may be repeated.
    #[arg(long = "route", value_name = "TYPE")]
    routes: Vec<String>,
    /// The tables of every route.
    #[arg(long, conflicts_with = "routes")]
    all: bool,
    /// Only the rows this SQL condition takes (the table's alias is `r`).
    #[arg(long = "where", value_name = "SQL")]
    filter: Option<String>,
    /// Send the rows of routes that drop fields, without those fields.
    #[arg(long)]
    allow_dropped: bool,
    /// Also delete the target's rows that this site lacks (needs --target-connector; the count is shown first).
    #[arg(long, requires = "target_connector")]
    prune: bool,
    /// The target site's connector file: its database is read for --prune.
    #[arg(long, value_name = "FILE")]
    target_connector: Option<PathBuf>,
    /// Print how many rows of each table would go, and any route refused; send nothing.
    #[arg(long)]
    dry_run: bool,
    /// At most this many rows a second.
    #[arg(long, value_name = "N")]
    rate: Option<u32>,
    /// Up to N rows per message, applied together by the receiving sink (each row still judged on its own; a bad row still goes to the dead-letter queue alone). 1: one row per message.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pack: u32,
    /// Compress each pack with zstd (declared in the message's content encoding): for sites behind slow links. Needs --pack.
    #[arg(long)]
    compress: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// Go on with a job that stopped, after its last confirmed row.
    #[arg(long, value_name = "JOB", conflicts_with_all = ["to_site", "routes", "all", "filter", "allow_dropped", "prune", "abandon"])]
    resume: Option<i64>,
    /// Give up a job that stopped, releasing its tables.
    #[arg(long, value_name = "JOB", conflicts_with_all = ["to_site", "routes", "all", "filter", "allow_dropped", "dry_run", "rate"])]
    abandon: Option<i64>,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct RequeueWhich {
    /// The message id (the event id) to send back; may be repeated.
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<String>,
    /// Every dead letter that failed in a sink.
    #[arg(long)]
    all: bool,
}

#[derive(Subcommand, Debug)]
enum TopologyCommand {
    /// Declare the exchanges, site queues, archive queue and dead-letter queue (idempotent).
    #[command(
        after_help = "Examples:\n  sitesync topology declare --connector connectors/paris.toml\n  sitesync topology declare --topology config/topology.toml --broker amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    Declare {
        /// Take the broker URLs and topology file from this connector.
        #[arg(long, short = 'c', value_name = "FILE", conflicts_with_all = ["topology", "broker"])]
        connector: Option<PathBuf>,
        /// The topology file.
        #[arg(long, value_name = "FILE", requires = "broker")]
        topology: Option<PathBuf>,
        /// Broker URL (with --topology).
        #[arg(long, value_name = "URL", env = "SITESYNC_BROKER_URL")]
        broker: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CheckpointCommand {
    /// Print the checkpoint and, beside it, the database's own record of our position.
    #[command(
        after_help = "Example:\n  sitesync checkpoint show --connector connectors/paris.toml"
    )]
    Show(ConnectorArg),
    /// Move the checkpoint (starts a new epoch). Refused while a sidecar holds the store.
    #[command(
        after_help = "Examples:\n  sitesync checkpoint reset --connector connectors/paris.toml --to-start\n  sitesync checkpoint reset --connector connectors/paris.toml --to-position postgres:0/16B3748\n  sitesync checkpoint reset --connector connectors/paris.toml --to-latest --yes"
    )]
    Reset {
        #[command(flatten)]
        connector: ConnectorArg,
        #[command(flatten)]
        target: ResetTarget,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct ResetTarget {
    /// Resume from the oldest position the database still holds for us
    /// (PostgreSQL: the slot's confirmed_flush_lsn; a slot cannot rewind;
    /// SQL Server: Change Tracking's minimum valid version).
    #[arg(long)]
    to_start: bool,
    /// Resume at this position, e.g. postgres:0/16B3748 or postgres:0/16B3748#5.
    #[arg(long, value_name = "POSITION")]
    to_position: Option<String>,
    /// Skip everything not yet published: move to the end of the log (PostgreSQL: advances the slot).
    #[arg(long)]
    to_latest: bool,
}

/// A command failure: what to print and the exit code.
struct Failure {
    message: String,
    code: u8,
}

impl From<ConfigErrors> for Failure {
    fn from(e: ConfigErrors) -> Self {
        Failure {
            message: e.to_string(),
            code: 2,
        }
    }
}

impl From<CheckpointError> for Failure {
    fn from(e: CheckpointError) -> Self {
        Failure {
            message: e.to_string(),
            code: 1,
        }
    }
}

impl From<SourceError> for Failure {
    fn from(e: SourceError) -> Self {
        fail(e.to_string())
    }
}

impl From<TargetError> for Failure {
    fn from(e: TargetError) -> Self {
        fail(e.to_string())
    }
}

/// The exit code of a replay or resync stopped by SIGINT (128 + 2, as a
/// shell reports a command interrupted).
const CANCELLED: u8 = 130;

/// SIGINT from now on, instead of the default (exit): a replay or resync
/// stops cleanly on it and records its job `cancelled`.
fn interrupts() -> Result<tokio::signal::unix::Signal, Failure> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| fail(format!("cannot catch SIGINT: {e}")))
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        code: 1,
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // A sidecar runs its source on this thread and its sink on a second
    // one (see `sidecar`), each with a single-threaded runtime. Their work
    // is waiting on sockets (the change stream, the broker, the database),
    // and they share the server's cores with the database: on a pool of
    // workers, every database round trip hopped between threads, a wake-up
    // each way (measured in the benchmark: 7-10 % more CPU per event). What
    // blocks (the Oracle driver, the management API) runs on the blocking
    // pool either way; lapin keeps its own I/O thread.
    let mut builder = if matches!(cli.command, Command::Run(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(f) => {
            match cli.log_format {
                LogFormat::Human => eprintln!("error: {}", f.message.trim_end()),
                LogFormat::Json => tracing::error!(exit_code = f.code, "{}", f.message.trim_end()),
            }
            ExitCode::from(f.code)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("info,lapin=off,{}", crate::engine::QUIET_LOGS))
    });
    // Colours only on a terminal: log files and journald get plain text.
    // A line that cannot be written (the log collector went away: EPIPE)
    // is dropped. Reporting it would go through `eprintln!`, which panics
    // on that same broken stderr, in whichever task was logging.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn dispatch(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::Run(c) => on_engine(&c.connector, Act::Run).await,
        Command::Check(c) => check(&c.connector).await,
        Command::Init(c) => on_engine(&c.connector, Act::Init).await,
        Command::Topology(TopologyCommand::Declare {
            connector,
            topology,
            broker,
        }) => declare(connector, topology, broker).await,
        Command::Checkpoint(CheckpointCommand::Show(c)) => on_engine(&c.connector, Act::Show).await,
        Command::Checkpoint(CheckpointCommand::Reset {
            connector,
            target,
            yes,
        }) => on_engine(&connector.connector, Act::Reset { target, yes }).await,
        Command::Status(c) => on_engine(&c.connector.connector, Act::Status { json: c.json }).await,
        Command::Gaps(GapsCommand::List(c)) => {
            on_engine(
                &c.connector,
                Act::Gaps {
                    fill: false,
                    wait: None,
                },
            )
            .await
        }
        Command::Gaps(GapsCommand::Fill { connector, wait }) => {
            on_engine(&connector.connector, Act::Gaps { fill: true, wait }).await
        }
        Command::Trace { connector, event } => {
            let id = event.trim().parse::<uuid::Uuid>().map_err(|_| Failure {
                message: format!("`{event}` is not an event id: expected a UUID"),
                code: 2,
            })?;
            on_engine(&connector.connector, Act::Trace { id }).await
        }
        Command::Dlq(DlqCommand::List(c)) => {
            let connector = Connector::load(&c.connector)?;
            dlq_list(&connector.config).await
        }
        // Through the engine: its audit trail is in the connector's database.
        Command::Dlq(DlqCommand::Requeue { connector, which }) => {
            on_engine(&connector.connector, Act::Requeue(which)).await
        }
        Command::Capture(c) => capture(c).await,
        Command::Replay(args) => {
            let connector = Connector::load(&args.connector.connector)?;
            let cfg = &connector.config;
            let filter = replay_filter(cfg, &args)?;
            connector
                .engine
                .run(OnEngine {
                    cfg,
                    act: Act::Replay { args, filter },
                })
                .await
        }
        Command::Jobs(args) => {
            let file = args.connector.connector.clone();
            on_engine(&file, Act::Jobs(args)).await
        }
        Command::Audit(args) => {
            let file = args.connector.connector.clone();
            on_engine(&file, Act::Audit(args)).await
        }
        Command::Purge(args) => {
            let file = args.connector.connector.clone();
            on_engine(&file, Act::Purge(args)).await
        }
        Command::Conflicts(ConflictsCommand::Review { connector, ids }) => {
            on_engine(&connector.connector, Act::Review(ids)).await
        }
        Command::Conflicts(ConflictsCommand::List {
            connector,
            limit,
            json,
        }) => on_engine(&connector.connector, Act::Conflicts { limit, json }).await,
        Command::Conflicts(ConflictsCommand::Choose {
            connector,
            id,
            kind,
            yes,
        }) => on_engine(&connector.connector, Act::Choose { id, kind, yes }).await,
        Command::Resync(args) => {
            let connector = Connector::load(&args.connector.connector)?;
            let cfg = &connector.config;
            connector
                .engine
                .run(OnEngine {
                    cfg,
                    act: Act::Resync(args),
                })
                .await
        }
        Command::Demo(args) => crate::lab::demo::run(args).await.map_err(fail),
        Command::Bench(args) => crate::lab::bench::run(args).await.map_err(fail),
    }
}

/// A command that needs the connector's engine.
// One value per command line: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Act {
    Run,
    Init,
    Show,
    Status {
        json: bool,
    },
    Reset {
        target: ResetTarget,
        yes: bool,
    },
    Capture {
        action: crate::capture::Action,
        routes: Vec<String>,
        all: bool,
    },
    Replay {
        args: ReplayArgs,
        filter: crate::archive::replay::Filter,
    },
    Gaps {
        fill: bool,
        wait: Option<u64>,
    },
    Trace {
        id: uuid::Uuid,
    },
    Jobs(JobsArgs),
    Audit(AuditArgs),
    Purge(PurgeArgs),
    Review(Vec<i64>),
    Conflicts {
        limit: usize,
        json: bool,
    },
    Choose {
        id: i64,
        kind: Option<String>,
        yes: bool,
    },
    Resync(ResyncArgs),
    Requeue(RequeueWhich),
}

impl Act {
    /// The manual action this is, and its arguments, when it is one the
    /// audit trail records; `None` for the rest and for dry runs.
    fn audited(&self) -> Option<(&'static str, serde_json::Value)> {
        use crate::audit::actions;
        use serde_json::json;
        Some(match self {
            Act::Reset { target, .. } => (
                actions::CHECKPOINT_RESET,
                match (&target.to_position, target.to_latest) {
                    (Some(p), _) => json!({"to": "position", "position": p}),
                    (None, true) => json!({"to": "latest"}),
                    (None, false) => json!({"to": "start"}),
                },
            ),
            Act::Requeue(which) => (
                actions::DLQ_REQUEUE,
                json!({"ids": which.ids, "all": which.all}),
            ),
            Act::Replay { args, .. } if !args.dry_run => (
                actions::REPLAY,
                json!({
                    "to_site": args.to_site,
                    "origin": args.origin,
                    "from": args.from,
                    "to": args.to,
                    "type": args.kind,
                    "rate": args.rate,
                }),
            ),
            Act::Resync(args) if !args.dry_run => (
                actions::RESYNC,
                match (args.abandon, args.resume) {
                    (Some(job), _) => json!({"mode": "abandon", "job": job}),
                    (None, Some(job)) => json!({
                        "mode": "resume",
                        "job": job,
                        "rate": args.rate,
                        "pack": args.pack,
                        "compress": args.compress,
                    }),
                    (None, None) => json!({
                        "mode": "start",
                        "to_site": args.to_site,
                        "routes": args.routes,
                        "all": args.all,
                        "where": args.filter,
                        "allow_dropped": args.allow_dropped,
                        "prune": args.prune,
                        "target_connector": args.target_connector,
                        "rate": args.rate,
                        "pack": args.pack,
                        "compress": args.compress,
                    }),
                },
            ),
            Act::Purge(args) if !args.dry_run => (actions::PURGE, json!({})),
            Act::Gaps { fill: true, wait } => (actions::GAPS_FILL, json!({"wait": wait})),
            Act::Review(ids) => (actions::CONFLICTS_REVIEW, json!({"ids": ids})),
            Act::Choose { id, kind, .. } => {
                (actions::CONFLICT_CHOOSE, json!({"id": id, "type": kind}))
            }
            Act::Capture {
                action: crate::capture::Action::Add { dry_run: false },
                routes,
                all,
            } => (actions::CAPTURE_ADD, json!({"routes": routes, "all": all})),
            Act::Capture {
                action: crate::capture::Action::Remove { dry_run: false },
                routes,
                all,
            } => (
                actions::CAPTURE_REMOVE,
                json!({"routes": routes, "all": all}),
            ),
            _ => return None,
        })
    }
}

/// `status` lists the events of this site that a site sending receipts has
/// not receipted after this long.
const RECEIPT_LAG_S: u64 = 60;

/// Loads the connector and runs `act` with its engine.
async fn on_engine(file: &Path, act: Act) -> Result<ExitCode, Failure> {
    let connector = Connector::load(file)?;
    let cfg = &connector.config;
    connector.engine.run(OnEngine { cfg, act }).await
}

/// `act` for one connector, whatever its engine.
struct OnEngine<'a> {
    cfg: &'a ConnectorConfig,
    act: Act,
}

impl Task for OnEngine<'_> {
    type Output = Result<ExitCode, Failure>;

    async fn run<D: Driver>(self, db: &D::Settings) -> Result<ExitCode, Failure> {
        let cfg = self.cfg;
        let audited = self.act.audited();
        let mut said = String::new();
        let result = act::<D>(cfg, db, self.act, &mut said).await;
        if let Some((action, args)) = audited {
            audit_cli::<D>(cfg, db, action, args, &result, &said).await;
        }
        result
    }
}

/// `act` for one connector with its engine's driver; a manual action
/// writes into `said` the line that says what it did (its audit detail).
async fn act<D: Driver>(
    cfg: &ConnectorConfig,
    db: &D::Settings,
    act: Act,
    said: &mut String,
) -> Result<ExitCode, Failure> {
    match act {
        Act::Run => {
            let source = D::source(cfg, db)?;
            let target = match cfg.sink.enabled {
                true => Some(Batches::new(D::target(cfg, db)?, &cfg.site, &cfg.sink)),
                false => None,
            };
            let archive = match &cfg.archive {
                Some(a) => Some(D::archive(cfg, db, a)?),
                None => None,
            };
            let upkeep = match cfg.purge_every {
                Some(every) if !crate::purge::Plan::of(cfg).0.is_empty() => Some(sidecar::Upkeep {
                    tables: D::purge(cfg, db)?,
                    jobs: D::jobs(cfg, db)?,
                    every,
                }),
                _ => None,
            };
            let admin: Option<Box<dyn crate::admin::Site>> = match &cfg.admin {
                Some(_) => Some(Box::new(crate::admin::site::EngineSite::<D>::new(cfg, db)?)),
                None => None,
            };
            run(cfg, source, target, archive, upkeep, admin).await
        }
        Act::Init => {
            let archive = match &cfg.archive {
                Some(a) => Some(D::archive(cfg, db, a)?),
                None => None,
            };
            let code = init(
                cfg,
                D::source(cfg, db)?,
                D::target(cfg, db)?,
                archive,
                D::jobs(cfg, db)?,
                D::audit(cfg, db)?,
                D::purge(cfg, db)?,
            )
            .await?;
            if !cfg.capture.is_empty() {
                let c = D::capture(cfg, db)?;
                for line in crate::capture::configured(&c, cfg).await.map_err(fail)? {
                    println!("  {line}");
                }
            }
            Ok(code)
        }
        Act::Capture {
            action,
            routes,
            all,
        } => {
            let c = D::capture(cfg, db)?;
            let done = crate::capture::command(&c, cfg, action, &routes, all)
                .await
                .map_err(fail)?;
            *said = match done {
                true => "the capture triggers of the tables asked for are done".into(),
                false => "a table was refused (the reason is in the command's output)".into(),
            };
            Ok(if done {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Act::Show => show(cfg, D::source(cfg, db)?).await,
        Act::Status { json } => {
            let archived = match &cfg.archive {
                Some(a) => {
                    let store = D::archive(cfg, db, a)?;
                    Some((store.table().to_string(), store.count().await))
                }
                None => None,
            };
            if json {
                return status_json(cfg, D::status(cfg, db), archived).await;
            }
            let code = status(cfg, D::status(cfg, db), archived).await?;
            if cfg.sink.enabled {
                let target = Batches::new(D::target(cfg, db)?, &cfg.site, &cfg.sink);
                let peers: Vec<String> = cfg
                    .topology
                    .sites
                    .iter()
                    .filter(|s| **s != cfg.site)
                    .cloned()
                    .collect();
                match target.unreceipted(&peers, RECEIPT_LAG_S).await {
                    Ok(lagging) => print!(
                        "{}",
                        crate::sink::receipts::describe_lag(&lagging, RECEIPT_LAG_S)
                    ),
                    Err(e) => println!("receipts: unreadable: {}", e.message()),
                }
            }
            Ok(code)
        }
        Act::Trace { id } => {
            let target = Batches::new(D::target(cfg, db)?, &cfg.site, &cfg.sink);
            trace(cfg, &target, id).await
        }
        Act::Reset { target, yes } => reset(cfg, D::source(cfg, db)?, target, yes, said).await,
        Act::Replay { args, filter } => {
            let archive = cfg.archive.as_ref().expect("checked by replay_filter");
            replay(
                cfg,
                D::archive(cfg, db, archive)?,
                D::jobs(cfg, db)?,
                args,
                filter,
                said,
            )
            .await
        }
        Act::Gaps { fill, wait } => {
            let target = Batches::new(D::target(cfg, db)?, &cfg.site, &cfg.sink);
            gaps(cfg, &target, fill, wait, said).await
        }
        Act::Jobs(args) => jobs(D::jobs(cfg, db)?, args).await,
        Act::Audit(args) => audit(D::audit(cfg, db)?, args).await,
        Act::Purge(args) => purge(cfg, D::purge(cfg, db)?, D::jobs(cfg, db)?, args, said).await,
        Act::Review(ids) => review(D::purge(cfg, db)?, &ids, said).await,
        Act::Conflicts { limit, json } => {
            let rows = D::purge(cfg, db)?.conflicts(limit, None).await?;
            match json {
                true => println!(
                    "{}",
                    serde_json::to_string_pretty(&crate::conflicts::to_json(&rows))
                        .unwrap_or_default()
                ),
                false => print!("{}", crate::conflicts::render(&rows)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Act::Choose { id, kind, yes } => {
            choose(cfg, D::purge(cfg, db)?, id, kind.as_deref(), yes, said).await
        }
        Act::Requeue(which) => dlq_requeue(cfg, which, said).await,
        Act::Resync(args) => {
            resync(
                cfg,
                D::capture(cfg, db)?,
                D::resync(cfg, db)?,
                D::jobs(cfg, db)?,
                args,
                said,
            )
            .await
        }
    }
}

/// Records a manual action that ran, from the CLI, in the connector's
/// audit trail: `ok` with `said` when it succeeded, `failed` with the
/// error (or `said`, for an action that did only part of it) otherwise.
/// A failure to record is logged and said on stderr; the action's own
/// result stands.
async fn audit_cli<D: Driver>(
    cfg: &ConnectorConfig,
    db: &D::Settings,
    action: &str,
    args: serde_json::Value,
    result: &Result<ExitCode, Failure>,
    said: &str,
) {
    use crate::audit;
    let partly = format!("{action} did not do all it was asked (exit code 1)");
    let outcome: Result<&str, &str> = match result {
        Ok(code) if *code == ExitCode::SUCCESS => Ok(said),
        Ok(_) if !said.is_empty() => Err(said),
        Ok(_) => Err(&partly),
        Err(f) => Err(&f.message),
    };
    let recorded = match D::audit(cfg, db) {
        Ok(log) => {
            let (via, who) = audit::actor();
            audit::record(&log, via, &who, action, args, outcome)
                .await
                .map(|_| ())
        }
        Err(e) => {
            tracing::warn!(action, error = %e, "the action was done but could not be recorded in {}", audit::AUDIT_TABLE);
            Err(e)
        }
    };
    if let Err(e) = recorded {
        eprintln!(
            "warning: this {action} ({}) is not in the audit trail ({}): {e}",
            match outcome {
                Ok(_) => "done",
                Err(_) => "failed",
            },
            audit::AUDIT_TABLE
        );
    }
}

/// `sitesync trace EVENT`: what this database knows of the event.
async fn trace<T: Target>(
    cfg: &ConnectorConfig,
    target: &T,
    id: uuid::Uuid,
) -> Result<ExitCode, Failure> {
    let traced = target.trace(id).await.map_err(|e| fail(e.to_string()))?;
    print!(
        "{}",
        crate::sink::receipts::describe_trace(cfg, id, &traced)
    );
    if traced.receipts.is_empty() && traced.inbox.is_none() {
        return Err(fail(format!(
            "this site's database knows nothing of event {id}: run trace at its origin (receipts are recorded there when the sites send them) or at the archiving site"
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// `sitesync gaps list|fill`.
async fn gaps<T: Target>(
    cfg: &ConnectorConfig,
    target: &T,
    fill: bool,
    wait: Option<u64>,
    said: &mut String,
) -> Result<ExitCode, Failure> {
    let open = target.open_gaps().await.map_err(|e| fail(e.to_string()))?;
    print!("{}", crate::sink::gaps::describe(&open));
    if !fill || open.is_empty() {
        *said = "no open gap: nothing to ask".into();
        return Ok(ExitCode::SUCCESS);
    }
    let sent = crate::sink::gaps::ask_now(cfg, target, &open)
        .await
        .map_err(fail)?;
    let archive_site = cfg.topology.archive_site.as_deref().unwrap_or_default();
    println!("asked {archive_site}'s archive for {sent} range(s)");
    *said = format!(
        "asked {archive_site}'s archive for {sent} range(s) of {} gap(s)",
        open.len()
    );
    let Some(wait) = wait else {
        println!(
            "the running sidecar applies what the archive sends; `sitesync gaps list` shows what is left"
        );
        return Ok(ExitCode::SUCCESS);
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(wait);
    loop {
        let now = target.open_gaps().await.map_err(|e| fail(e.to_string()))?;
        let waiting = now.iter().filter(|g| g.note.is_none()).count();
        if waiting == 0 {
            if now.is_empty() {
                println!("every gap is closed");
                said.push_str("; every gap is closed");
                return Ok(ExitCode::SUCCESS);
            }
            print!("{}", crate::sink::gaps::describe(&now));
            return Err(fail(format!(
                "{} gap(s) remain: the archive does not hold their events",
                now.len()
            )));
        }
        if std::time::Instant::now() >= deadline {
            print!("{}", crate::sink::gaps::describe(&now));
            return Err(fail(format!(
                "{waiting} gap(s) still open after {wait} s: is this site's sidecar running, and {archive_site}'s?"
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What `sitesync check` verifies of the database and the store, whatever
/// the engine.
struct EngineChecks<'a>(&'a ConnectorConfig);

impl Task for EngineChecks<'_> {
    type Output = Vec<Check>;

    async fn run<D: Driver>(self, db: &D::Settings) -> Vec<Check> {
        let cfg = self.0;
        let mut checks = Vec::new();
        match D::source(cfg, db) {
            Ok(source) => {
                checks.extend(source.preflight().await);
                checks.push(check_store::<<D::Source as Source>::Position>(cfg));
            }
            Err(e) => checks.push(Check::fail("database", e.to_string(), "check database.url")),
        }
        match D::capture(cfg, db) {
            Ok(c) => checks.extend(crate::capture::checks(&c, cfg).await),
            Err(e) => checks.push(Check::fail("capture", e.to_string(), "check database.url")),
        }
        if cfg.sink.enabled {
            match D::target(cfg, db) {
                Ok(target) => checks.extend(target.preflight().await),
                Err(e) => checks.push(Check::fail("sink", e.to_string(), "check database.url")),
            }
        }
        match D::jobs(cfg, db) {
            Ok(jobs) => checks.extend(jobs.preflight().await),
            Err(e) => checks.push(Check::fail(
                "jobs table",
                e.to_string(),
                "check database.url",
            )),
        }
        match D::audit(cfg, db) {
            Ok(audit) => checks.extend(crate::audit::AuditLog::preflight(&audit).await),
            Err(e) => checks.push(Check::fail(
                "audit table",
                e.to_string(),
                "check database.url",
            )),
        }
        match D::purge(cfg, db) {
            Ok(tables) => checks.extend(tables.preflight().await),
            Err(e) => checks.push(Check::fail(
                "conflicts review",
                e.to_string(),
                "check database.url",
            )),
        }
        if let Some(a) = &cfg.archive {
            match D::archive(cfg, db, a) {
                Ok(store) => checks.extend(store.preflight().await),
                Err(e) => checks.push(Check::fail(
                    "archive table",
                    e.to_string(),
                    "check database.url",
                )),
            }
        }
        checks
    }
}

/// `sitesync capture add|remove|list`.
async fn capture(command: CaptureCommand) -> Result<ExitCode, Failure> {
    let (file, action, which) = match command {
        CaptureCommand::Add {
            connector,
            which,
            dry_run,
        } => (
            connector.connector,
            crate::capture::Action::Add { dry_run },
            Some(which),
        ),
        CaptureCommand::Remove {
            connector,
            which,
            dry_run,
        } => (
            connector.connector,
            crate::capture::Action::Remove { dry_run },
            Some(which),
        ),
        CaptureCommand::List(c) => (c.connector, crate::capture::Action::List, None),
    };
    let (routes, all) = which.map_or((Vec::new(), false), |w| (w.routes, w.all));
    on_engine(
        &file,
        Act::Capture {
            action,
            routes,
            all,
        },
    )
    .await
}

async fn run<
    S: Source + 'static,
    T: crate::sink::Target + 'static,
    A: Store,
    P: Tables,
    J: JobLog,
>(
    cfg: &ConnectorConfig,
    source: S,
    target: Option<T>,
    archive: Option<A>,
    upkeep: Option<sidecar::Upkeep<P, J>>,
    admin: Option<Box<dyn crate::admin::Site>>,
) -> Result<ExitCode, Failure> {
    // The admin listener first: a port taken or a token file others may
    // read stops the sidecar before anything starts.
    let bound = match &cfg.admin {
        Some(a) => Some(crate::admin::bind(a).await.map_err(fail)?),
        None => None,
    };
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(e) => {
                    // Without SIGTERM handling only SIGINT drains; the
                    // trigger must stay alive either way.
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        let signal = tokio::select! {
            _ = term => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        };
        // The stop request first: nothing after it can keep it from going.
        let _ = trigger.send(true);
        tracing::info!("{signal}: draining");
        // Keep the sender alive: a dropped sender is not a stop request.
        std::future::pending::<()>().await;
    });
    tracing::info!(
        connector = %cfg.name,
        site = %cfg.site,
        file = %cfg.file.display(),
        checkpoint = %cfg.checkpoint.dir.display(),
        "sitesync {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let serving = match (bound, admin) {
        (Some(bound), Some(site)) => {
            let (cfg, stop) = (cfg.clone(), shutdown.clone());
            Some(tokio::spawn(async move {
                if let Err(e) = crate::admin::serve(&cfg, bound, site, stop).await {
                    tracing::error!(error = %e, "admin API stopped");
                }
            }))
        }
        _ => None,
    };
    let result = sidecar::run(cfg, source, target, archive, upkeep, shutdown).await;
    if let Some(serving) = serving {
        serving.abort();
    }
    result.map_err(|e| fail(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}

async fn init<S: Source, T: Dialect, A: Store, J: JobLog, L: crate::audit::AuditLog, P: Tables>(
    cfg: &ConnectorConfig,
    source: S,
    target: T,
    archive: Option<A>,
    jobs: J,
    audit: L,
    tables: P,
) -> Result<ExitCode, Failure> {
    println!("init {} ({}):", cfg.name, cfg.file.display());
    for line in source.init().await? {
        println!("  {line}");
    }
    for line in target.init().await? {
        println!("  {line}");
    }
    // After the sink's tables: `reviewed_at` is added to theirs.
    for line in tables.init().await? {
        println!("  {line}");
    }
    for line in jobs.init().await? {
        println!("  {line}");
    }
    for line in audit.init().await? {
        println!("  {line}");
    }
    if let Some(archive) = archive {
        for line in archive.init().await? {
            println!("  {line}");
        }
    }
    println!(
        "next: `sitesync topology declare --connector {}` (once per broker), then `sitesync run --connector {}`",
        cfg.file.display(),
        cfg.file.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn declare(
    connector: Option<PathBuf>,
    topology_file: Option<PathBuf>,
    broker: Option<String>,
) -> Result<ExitCode, Failure> {
    let (urls, topology, timeout) = match (connector, topology_file, broker) {
        (Some(c), _, _) => {
            let cfg = Connector::load(&c)?.config;
            (cfg.broker.urls, cfg.topology, cfg.broker.connect_timeout)
        }
        (None, Some(t), Some(b)) => (
            vec![b],
            TopologyConfig::load(&t)?,
            std::time::Duration::from_secs(10),
        ),
        _ => {
            return Err(Failure {
                message: "give --connector FILE, or --topology FILE with --broker URL".into(),
                code: 2,
            });
        }
    };
    let conn = bus::connect(&urls, timeout, "sitesync-topology")
        .await
        .map_err(|e| fail(e.to_string()))?;
    let done = topology::declare(&conn, &topology)
        .await
        .map_err(|e| fail(e.to_string()))?;
    println!("declared from {}:", topology.file.display());
    for line in done {
        println!("  {line}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn broker(cfg: &ConnectorConfig, what: &str) -> Result<bus::Link, Failure> {
    bus::connect(
        &cfg.broker.urls,
        cfg.broker.connect_timeout,
        &format!("sitesync-{what}"),
    )
    .await
    .map_err(|e| fail(e.to_string()))
}

async fn status(
    cfg: &ConnectorConfig,
    site: impl std::future::Future<Output = Result<crate::status::SiteStatus, SourceError>>,
    archived: Option<(String, Result<u64, TargetError>)>,
) -> Result<ExitCode, Failure> {
    println!(
        "connector   {} ({}), site {}",
        cfg.name,
        cfg.file.display(),
        cfg.site
    );
    let site = site.await?;
    let conn = broker(cfg, "status").await.ok();
    let queued = match &conn {
        Some(conn) => bus::topology::queue_depth(conn, &cfg.topology.dead_letter_queue)
            .await
            .ok(),
        None => None,
    };
    print!("{}", site.render(queued));
    if let Some((table, rows)) = archived {
        let rows = match rows {
            Ok(n) => format!("{n} event(s) in {table}"),
            Err(e) => format!("{table} unreadable: {}", e.message()),
        };
        let queue = &cfg.topology.archive_queue;
        let backlog = match &conn {
            Some(conn) => match bus::topology::queue_counts(conn, queue).await {
                Ok((messages, consumers)) => {
                    format!("{messages} message(s) waiting in {queue}, {consumers} consumer(s)")
                }
                Err(e) => format!("{queue} unreadable: {e}"),
            },
            None => format!("{queue}: unknown (broker unreachable)"),
        };
        println!("archive: {rows}; {backlog}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `sitesync status --json`.
async fn status_json(
    cfg: &ConnectorConfig,
    site: impl std::future::Future<Output = Result<crate::status::SiteStatus, SourceError>>,
    archived: Option<(String, Result<u64, TargetError>)>,
) -> Result<ExitCode, Failure> {
    let mut out = site.await?.to_json();
    let conn = broker(cfg, "status").await.ok();
    let queued = match &conn {
        Some(conn) => bus::topology::queue_depth(conn, &cfg.topology.dead_letter_queue)
            .await
            .ok(),
        None => None,
    };
    out["site"] = cfg.site.clone().into();
    out["connector"] = cfg.name.clone().into();
    out["dead_letters_in_queue"] = queued.into();
    if let Some((table, rows)) = archived {
        out["archive"] = match rows {
            Ok(n) => serde_json::json!({ "table": table, "rows": n }),
            Err(e) => serde_json::json!({ "table": table, "error": e.message() }),
        };
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| fail(e.to_string()))?
    );
    Ok(ExitCode::SUCCESS)
}

async fn dlq_list(cfg: &ConnectorConfig) -> Result<ExitCode, Failure> {
    let conn = broker(cfg, "dlq").await?;
    let letters = bus::dlq::list(&conn, &cfg.topology)
        .await
        .map_err(|e| fail(e.to_string()))?;
    println!(
        "{} dead letter(s) in {}",
        letters.len(),
        cfg.topology.dead_letter_queue
    );
    for d in letters {
        let attempts = d
            .attempts
            .map_or_else(String::new, |n| format!(", {n} attempt(s)"));
        println!(
            "{}  type {}  origin {}  failed at {} ({}{attempts})  {}\n    reason: {}",
            if d.id.is_empty() { "(no id)" } else { &d.id },
            d.kind,
            d.origin,
            d.site,
            d.stage,
            d.when,
            d.reason
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn dlq_requeue(
    cfg: &ConnectorConfig,
    which: RequeueWhich,
    said: &mut String,
) -> Result<ExitCode, Failure> {
    let conn = broker(cfg, "dlq").await?;
    let done = bus::dlq::requeue(&conn, &cfg.topology, |d| {
        which.all || which.ids.contains(&d.id)
    })
    .await
    .map_err(|e| fail(e.to_string()))?;
    let mut left = 0;
    for (d, what) in &done {
        match what {
            bus::dlq::Requeued::To(queue) => println!("{}: sent back to {queue}", d.id),
            bus::dlq::Requeued::Left(why) => {
                left += 1;
                println!("{}: left in the dead-letter queue: {why}", d.id);
            }
        }
    }
    let missing: Vec<&String> = which
        .ids
        .iter()
        .filter(|id| !done.iter().any(|(d, _)| &d.id == *id))
        .collect();
    for id in &missing {
        println!("{id}: not in the dead-letter queue");
    }
    *said = format!(
        "{} sent back, {} left",
        done.len() - left,
        left + missing.len()
    );
    if !missing.is_empty() {
        said.push_str(&format!(
            "; not in the dead-letter queue: {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    println!(
        "{} sent back, {} left",
        done.len() - left,
        left + missing.len()
    );
    Ok(if left + missing.len() > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn check(file: &Path) -> Result<ExitCode, Failure> {
    let connector = match Connector::load(file) {
        Ok(connector) => connector,
        Err(e) => {
            println!("[FAIL] config: {}", e.to_string().trim_end());
            return Ok(ExitCode::from(2));
        }
    };
    let cfg = &connector.config;
    let mut checks = vec![Check::pass(
        "config",
        format!(
            "{} (site {}, {} database, topology {})",
            cfg.file.display(),
            cfg.site,
            connector.engine.name(),
            cfg.topology.file.display()
        ),
    )];
    checks.extend(connector.engine.run(EngineChecks(cfg)).await);
    let mut connection = None;
    for url in &cfg.broker.urls {
        match bus::connect(
            std::slice::from_ref(url),
            cfg.broker.connect_timeout,
            "sitesync-check",
        )
        .await
        {
            Ok(conn) => {
                checks.push(Check::pass(
                    "broker",
                    format!("{} reachable", redact_url(url)),
                ));
                connection.get_or_insert(conn);
            }
            Err(e) => checks.push(Check::fail(
                "broker",
                e.to_string(),
                "check broker.urls, that RabbitMQ runs and that the credentials are right",
            )),
        }
    }
    if let Some(conn) = &connection {
        checks.extend(
            topology::check(
                conn,
                &cfg.topology,
                crate::bus::management::Management::of(&cfg.broker),
            )
            .await,
        );
    }
    checks.push(crate::archive::coverage(cfg));
    if let Some(conn) = &connection
        && let Ok((messages, consumers)) =
            topology::queue_counts(conn, &cfg.topology.archive_queue).await
    {
        checks.push(crate::archive::consumers(cfg, messages, consumers));
    }
    let mut worst = Status::Pass;
    for c in &checks {
        println!("{c}");
        if c.status == Status::Fail {
            worst = Status::Fail;
        }
    }
    Ok(if worst == Status::Fail {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn check_store<P: LogPosition>(cfg: &ConnectorConfig) -> Check {
    let dir = &cfg.checkpoint.dir;
    if !dir.join("sled").exists() {
        return Check::pass(
            "checkpoint",
            format!("{}: none yet (created by the first run)", dir.display()),
        );
    }
    match CheckpointStore::open(dir, reset_hint(&cfg.file)) {
        Ok(store) => match store.load::<P>() {
            Ok(Some(ck)) => Check::pass(
                "checkpoint",
                format!("{}: {}", dir.display(), describe(&ck)),
            ),
            Ok(None) => Check::pass("checkpoint", format!("{}: empty", dir.display())),
            Err(e) => Check::fail("checkpoint", e.to_string(), reset_hint(&cfg.file)),
        },
        Err(e @ CheckpointError::InUse { .. }) => Check::pass("checkpoint", e.to_string()),
        Err(e) => Check::fail("checkpoint", e.to_string(), reset_hint(&cfg.file)),
    }
}

async fn show<S: Source>(cfg: &ConnectorConfig, source: S) -> Result<ExitCode, Failure> {
    let dir = &cfg.checkpoint.dir;
    println!(
        "connector   {} ({}), site {}",
        cfg.name,
        cfg.file.display(),
        cfg.site
    );
    println!("store       {}", dir.display());
    let (ck, live) = if !dir.join("sled").exists() {
        println!("checkpoint  none yet: the first `run` starts where the database keeps our place");
        (None, None)
    } else {
        match CheckpointStore::open(dir, reset_hint(&cfg.file)) {
            Ok(store) => (store.load::<S::Position>()?, None),
            Err(CheckpointError::InUse { pid, .. }) => {
                match checkpoint::read_live::<S::Position>(dir) {
                    Some((live_pid, ck)) => (Some(ck), Some(live_pid.to_string())),
                    None => (None, Some(pid)),
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(pid) = &live {
        println!(
            "held by     a running sitesync (pid {pid}); figures from its live.json, at most a moment old"
        );
    }
    if let Some(ck) = &ck {
        println!(
            "position    {}",
            ck.resume.as_ref().map_or_else(
                || "none yet (starts where the database keeps our place)".to_string(),
                |p| p.to_string()
            )
        );
        let started = chrono::DateTime::from_timestamp_millis(ck.epoch as i64)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        println!("epoch       {} (began {started})", ck.epoch);
        println!(
            "next seq    {} ({} event(s) published in this epoch)",
            ck.next_seq,
            ck.next_seq.saturating_sub(1)
        );
        println!(
            "written at  {}",
            ck.written_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
    }
    match source.bounds().await {
        Ok(LogBounds { detail, .. }) => println!("database    {detail}"),
        Err(e) => println!("database    unavailable: {}", e.message()),
    }
    Ok(ExitCode::SUCCESS)
}

async fn reset<S: Source>(
    cfg: &ConnectorConfig,
    source: S,
    target: ResetTarget,
    yes: bool,
    said: &mut String,
) -> Result<ExitCode, Failure> {
    let dir = &cfg.checkpoint.dir;
    // A store sled cannot open is moved aside, but only once the reset is
    // confirmed: until then nothing changes.
    let (store, unopenable) = match CheckpointStore::open(dir, reset_hint(&cfg.file)) {
        Ok(store) => (Some(store), None),
        Err(e @ CheckpointError::InUse { .. }) => {
            return Err(fail(format!("refusing to reset: {e}")));
        }
        Err(CheckpointError::Corrupt { detail, .. }) => (None, Some(detail)),
        Err(e) => return Err(e.into()),
    };
    let current = match (&store, &unopenable) {
        (Some(store), _) => store.load::<S::Position>(),
        (None, Some(detail)) => Err(CheckpointError::Corrupt {
            dir: dir.clone(),
            detail: detail.clone(),
            reset_hint: String::new(),
        }),
        (None, None) => unreachable!("a store or the reason it cannot be opened"),
    };
    let bounds = source.bounds().await?;
    let (current_epoch, current_resume) = match &current {
        Ok(Some(ck)) => {
            println!("current     {}", describe(ck));
            (Some(ck.epoch), ck.resume.clone())
        }
        Ok(None) => {
            println!("current     none");
            (None, None)
        }
        Err(e) => {
            println!("current     unreadable: {e}");
            (None, None)
        }
    };
    println!("database    {}", bounds.detail);
    let oldest = bounds.oldest.clone();
    let (resume, plan) = if target.to_start {
        let from = oldest.as_ref().map_or_else(
            || "where the database keeps our place".to_string(),
            |p| p.to_string(),
        );
        (
            None,
            format!(
                "resume from {from}: everything from there is published again ({})",
                bounds.oldest_note
            ),
        )
    } else if let Some(text) = &target.to_position {
        let p: S::Position = text.parse().map_err(|e: String| Failure {
            message: e,
            code: 2,
        })?;
        if let Some(o) = &oldest
            && p < *o
        {
            return Err(fail(format!(
                "{p} is before {o}: it cannot go back further ({})",
                bounds.oldest_note
            )));
        }
        if p > bounds.latest {
            return Err(fail(format!(
                "{p} is past the end of the log ({})",
                bounds.latest
            )));
        }
        let skipping = match &current_resume {
            Some(c) if p > *c => format!(
                ", SKIPPING every outbox row committed between {c} and {p}: they will never be published"
            ),
            _ => String::new(),
        };
        (Some(p.clone()), format!("resume at {p}{skipping}"))
    } else {
        (
            Some(bounds.latest.clone()),
            format!(
                "skip everything not yet published: move to the end of the log ({}) and resume there",
                bounds.latest
            ),
        )
    };
    println!("plan        {plan}; a new epoch starts and seq restarts at 1");
    confirm(yes, "reset the checkpoint?")?;
    let store = match store {
        Some(store) => store,
        None => {
            let aside = checkpoint::set_aside(dir)?;
            println!("moved the store sled cannot open to {}", aside.display());
            CheckpointStore::open(dir, reset_hint(&cfg.file))?
        }
    };
    let resume = if target.to_latest {
        Some(source.advance_to_latest().await?)
    } else {
        resume
    };
    let next = Checkpoint::new_epoch(resume, current_epoch);
    store.reset(&next).await?;
    println!("reset       {}", describe(&next));
    *said = format!("reset to {}", describe(&next));
    Ok(ExitCode::SUCCESS)
}

/// Checks `replay`'s arguments against the connector and the topology.
fn replay_filter(
    cfg: &ConnectorConfig,
    args: &ReplayArgs,
) -> Result<crate::archive::replay::Filter, Failure> {
    let usage = |message: String| Failure { message, code: 2 };
    if cfg.archive.is_none() {
        return Err(usage(format!(
            "{} has no [archive] section: replay reads the archive, so run it with the archiving site's connector{}",
            cfg.file.display(),
            cfg.topology
                .archive_site
                .as_ref()
                .map_or_else(String::new, |s| format!(" ({s})"))
        )));
    }
    for (flag, site) in [
        ("--to-site", Some(&args.to_site)),
        ("--origin", args.origin.as_ref()),
    ] {
        if let Some(site) = site
            && !cfg.topology.sites.contains(site)
        {
            return Err(usage(format!(
                "{flag} {site}: not a site of {} ({})",
                cfg.topology.file.display(),
                cfg.topology.sites.join(", ")
            )));
        }
    }
    let time = |flag: &str, text: &Option<String>| match text {
        None => Ok(None),
        Some(t) => crate::event::parse_timestamp(t).map(Some).ok_or_else(|| {
            usage(format!(
                "{flag} `{t}` is not a time: expected RFC 3339, e.g. 2026-11-01T00:00:00Z"
            ))
        }),
    };
    Ok(crate::archive::replay::Filter {
        origin: args.origin.clone(),
        from: time("--from", &args.from)?,
        to: time("--to", &args.to)?,
        kind: args.kind.clone(),
        range: None,
    })
}

/// `sitesync replay`: counts, asks, sends, reports; the run (not a dry
/// one) is recorded as a job.
async fn replay<S: Store, J: JobLog>(
    cfg: &ConnectorConfig,
    store: S,
    jobs: J,
    args: ReplayArgs,
    filter: crate::archive::replay::Filter,
    said: &mut String,
) -> Result<ExitCode, Failure> {
    use crate::archive::replay;
    use std::sync::atomic::{AtomicU64, Ordering};
    let queue = cfg.topology.site_queue(&args.to_site);
    let counts = replay::count(&store, &filter).await?;
    let total: u64 = counts.values().sum();
    println!(
        "{total} archived event(s) in {} to send to {queue}:",
        store.table()
    );
    for ((origin, kind), n) in &counts {
        println!("  {origin:<10} {kind:<30} {n}");
    }
    if args.dry_run || total == 0 {
        *said = format!("no archived event to send to {queue}");
        return Ok(ExitCode::SUCCESS);
    }
    confirm(args.yes, &format!("send {total} event(s) to {queue}?"))?;
    let conn = broker(cfg, "replay").await?;
    bus::topology::queue_counts(&conn, &queue)
        .await
        .map_err(|e| fail(format!("{e} (run `sitesync topology declare`)")))?;
    let mut job = Job::start(
        &jobs,
        "replay",
        &crate::audit::actor().1,
        serde_json::json!({
            "to_site": args.to_site,
            "origin": args.origin,
            "from": args.from,
            "to": args.to,
            "type": args.kind,
            "rate": args.rate,
        }),
        Some(total),
    )
    .await?;
    let job_id = job.id();
    let bar = progress_bar(total, "events");
    let began = std::time::Instant::now();
    let mut logged = began;
    let confirmed = AtomicU64::new(0);
    let replaying = replay::replay(&store, &conn, &queue, &filter, args.rate, |p| {
        confirmed.store(p.confirmed, Ordering::Relaxed);
        match &bar {
            Some(bar) => bar.set_position(p.confirmed),
            None if logged.elapsed() >= std::time::Duration::from_secs(5) => {
                logged = std::time::Instant::now();
                let rate = p.confirmed as f64 / began.elapsed().as_secs_f64().max(0.001);
                tracing::info!(
                    confirmed = p.confirmed,
                    total,
                    per_s = rate.round(),
                    "replaying to {queue}"
                );
            }
            None => {}
        }
    });
    let mut interrupt = interrupts()?;
    tokio::pin!(replaying);
    // The job's progress every few seconds, beside the replay; SIGINT
    // (Ctrl-C, or a cancel through the admin API) stops it.
    let result = loop {
        tokio::select! {
            r = &mut replaying => break Some(r),
            _ = tokio::time::sleep(crate::jobs::PROGRESS_EVERY) => {
                job.set_done(confirmed.load(Ordering::Relaxed));
                job.tick().await;
            }
            _ = interrupt.recv() => break None,
        }
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let seconds = began.elapsed().as_secs_f64();
    let Some(result) = result else {
        let done = confirmed.load(Ordering::Relaxed);
        let line = format!(
            "replay cancelled after {done} of {total} event(s) confirmed in {seconds:.1} s; running it again is harmless ({} skips the events it has)",
            args.to_site
        );
        job.set_done(done);
        job.cancelled(&line).await;
        return Err(Failure {
            message: line,
            code: CANCELLED,
        });
    };
    match result {
        Ok(p) => {
            let line = format!(
                "replayed {} event(s) to {queue} in {seconds:.1} s ({:.0}/s), each confirmed by the broker",
                p.confirmed,
                p.confirmed as f64 / seconds.max(0.001)
            );
            job.set_done(p.confirmed);
            job.succeeded(&line).await;
            println!("{line}");
            *said = format!("job {}: {line}", job_id);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            job.set_done(confirmed.load(Ordering::Relaxed));
            job.failed(&e.to_string()).await;
            Err(fail(format!(
                "replay stopped: {e}. Running it again is harmless: {} skips the events it has (its inbox), and a newer write wins over an older event",
                args.to_site
            )))
        }
    }
}

/// `sitesync jobs`: the latest jobs, a table or JSON.
async fn jobs<J: JobLog>(log: J, args: JobsArgs) -> Result<ExitCode, Failure> {
    let rows = log.list(args.limit, args.kind.as_deref()).await?;
    let now = chrono::Utc::now();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&crate::jobs::to_json(&rows, now))
                .map_err(|e| fail(e.to_string()))?
        );
    } else if rows.is_empty() {
        println!("no job recorded yet");
    } else {
        print!("{}", crate::jobs::render(&rows, now));
    }
    Ok(ExitCode::SUCCESS)
}

/// `sitesync audit`: the latest manual actions, a table or JSON.
async fn audit<L: crate::audit::AuditLog>(log: L, args: AuditArgs) -> Result<ExitCode, Failure> {
    let rows = log.list(args.limit, args.action.as_deref()).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&crate::audit::to_json(&rows))
                .map_err(|e| fail(e.to_string()))?
        );
    } else if rows.is_empty() {
        println!("no action recorded yet");
    } else {
        print!("{}", crate::audit::render(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// `sitesync purge`: counts, asks, deletes in batches, reports.
async fn purge<P: Tables, J: JobLog>(
    cfg: &ConnectorConfig,
    tables: P,
    jobs: J,
    args: PurgeArgs,
    said: &mut String,
) -> Result<ExitCode, Failure> {
    use crate::purge;
    let plan = purge::Plan::of(cfg);
    if plan.0.is_empty() {
        println!(
            "nothing to purge: {} has no [archive] and its sink is disabled",
            cfg.file.display()
        );
        *said = "nothing to purge: no [archive] and the sink is disabled".into();
        return Ok(ExitCode::SUCCESS);
    }
    let counts = purge::count(&tables, &plan).await?;
    println!("rows older than their retention:");
    for s in &counts.shares {
        let what = match s.table {
            purge::Table::Conflicts => "reviewed more than",
            _ => "older than",
        };
        println!(
            "  {:<32} {:>10}  ({what} {} day(s))",
            s.name, s.found, s.days
        );
    }
    if args.dry_run {
        println!("dry run: nothing deleted");
        return Ok(ExitCode::SUCCESS);
    }
    if counts.found() == 0 {
        println!("nothing to delete");
    } else {
        confirm(
            args.yes,
            &format!(
                "delete {} row(s) in batches of {}?",
                counts.found(),
                purge::BATCH_ROWS
            ),
        )?;
    }
    let (_keep, stop) = Shutdown::new();
    let report = purge::run(
        &tables,
        &jobs,
        &plan,
        &crate::audit::actor().1,
        purge::BATCH_ROWS,
        &stop,
    )
    .await?;
    *said = format!(
        "deleted {} row(s): {}",
        report.deleted(),
        report.summary(false)
    );
    println!("{said}");
    Ok(ExitCode::SUCCESS)
}

/// `sitesync conflicts choose`: shows the conflict, asks, sends its
/// losing write again.
async fn choose<P: Tables>(
    cfg: &ConnectorConfig,
    tables: P,
    id: i64,
    kind: Option<&str>,
    yes: bool,
    said: &mut String,
) -> Result<ExitCode, Failure> {
    use crate::conflicts::{self, ChooseError};
    let failed = |e: ChooseError| match e {
        ChooseError::Refused(r) => Failure {
            message: format!("nothing sent: {r}"),
            code: 2,
        },
        ChooseError::Failed(e) => fail(e),
    };
    let c = conflicts::find(&tables, id).await.map_err(failed)?;
    print!("{}", conflicts::render(std::slice::from_ref(&c)));
    println!(
        "the losing write ({}): {}",
        c.loser_origin,
        c.loser_payload.as_deref().unwrap_or("(none)")
    );
    confirm(
        yes,
        &format!(
            "write {}'s losing write of {} key {} again, at every site?",
            c.loser_origin, c.entity, c.key
        ),
    )?;
    let chosen = conflicts::choose_found(cfg, &tables, c, kind)
        .await
        .map_err(failed)?;
    *said = chosen.line();
    println!("{said}");
    Ok(ExitCode::SUCCESS)
}

/// `sitesync conflicts review`: marks conflicts reviewed.
async fn review<P: Tables>(tables: P, ids: &[i64], said: &mut String) -> Result<ExitCode, Failure> {
    let found = tables.review(ids).await?;
    let list = |ids: Vec<&i64>| {
        ids.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (reviewed, missing): (Vec<&i64>, Vec<&i64>) = ids.iter().partition(|i| found.contains(i));
    *said = format!("{} conflict(s) reviewed", reviewed.len());
    if !reviewed.is_empty() {
        said.push_str(&format!(": {}", list(reviewed)));
    }
    if !missing.is_empty() {
        said.push_str(&format!("; not in sitesync_conflicts: {}", list(missing)));
    }
    for id in ids {
        if found.contains(id) {
            println!("conflict {id}: reviewed");
        } else {
            println!("conflict {id}: not in sitesync_conflicts");
        }
    }
    Ok(if found.len() == ids.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A progress bar on stderr when it is a terminal (`None` otherwise:
/// the caller logs a line every few seconds instead).
fn progress_bar(total: u64, unit: &str) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{bar:40}} {{pos}}/{{len}} {unit}, {{per_sec}}, ETA {{eta}}"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}

/// `sitesync resync`: checks the routes, counts, asks, claims the job,
/// sends, records how far it got.
async fn resync<C: crate::capture::Capture, R: crate::resync::Resync, J: JobLog>(
    cfg: &ConnectorConfig,
    capture: C,
    mut store: R,
    jobs: J,
    args: ResyncArgs,
    said: &mut String,
) -> Result<ExitCode, Failure> {
    use crate::resync::{self, ClaimError, Request, Run, Snapshot};
    use std::sync::atomic::{AtomicU64, Ordering};
    let usage = |message: String| Failure { message, code: 2 };
    let claim = |e: ClaimError| fail(format!("resync refused: {e}"));
    if args.compress && args.pack < 2 {
        return Err(usage(
            "--compress compresses packs of rows: give --pack N (N of 2 or more) too".into(),
        ));
    }
    if let Some(job) = args.abandon {
        store.resume(job).await.map_err(claim)?;
        store.finish(job, "abandoned").await.map_err(fail)?;
        *said = format!("resync job {job} abandoned: its tables are free");
        println!("{said}");
        return Ok(ExitCode::SUCCESS);
    }
    let (request, to_site) = match args.resume {
        Some(id) => {
            let job = store.job(id).await.map_err(claim)?;
            if let Some(result) = job.result {
                return Err(claim(ClaimError::Finished { job: id, result }));
            }
            if job.running {
                return Err(claim(ClaimError::Running(id)));
            }
            (job.request, job.to_site)
        }
        None => (
            Request {
                routes: args.routes.clone(),
                all: args.all,
                filter: args.filter.clone(),
                allow_dropped: args.allow_dropped,
                prune: args.prune,
                target_connector: args.target_connector.clone(),
            },
            args.to_site.clone().unwrap_or_default(),
        ),
    };
    if !cfg.topology.sites.contains(&to_site) {
        return Err(usage(format!(
            "--to-site {to_site}: not a site of {} ({})",
            cfg.topology.file.display(),
            cfg.topology.sites.join(", ")
        )));
    }
    if to_site == cfg.site {
        return Err(usage(format!(
            "--to-site {to_site} is this connector's own site: a resync sends {}'s rows to another site",
            cfg.site
        )));
    }
    let tables = match resync::tables(&capture, &cfg.sink, &request).await {
        Ok(t) => t,
        Err(reasons) => {
            let mut message = String::from("resync refused, nothing sent:");
            for r in reasons {
                message.push_str(&format!("\n  {r}"));
            }
            return Err(usage(message));
        }
    };
    // --prune: the target's rows, read before the source's snapshot (a row
    // the source gains meanwhile is in its snapshot, and is not deleted).
    let target_rows = match (&request.prune, &request.target_connector) {
        (true, Some(file)) => {
            let file = args.target_connector.as_ref().unwrap_or(file);
            let target = Connector::load(file)?;
            if target.config.site != to_site {
                return Err(usage(format!(
                    "--target-connector {}: its site is {}, not {to_site}",
                    file.display(),
                    target.config.site
                )));
            }
            target
                .engine
                .run(PruneRead {
                    cfg: &target.config,
                    source: &tables,
                    filter: request.filter.as_deref(),
                })
                .await?
        }
        _ => Vec::new(),
    };
    let queue = cfg.topology.site_queue(&to_site);
    let mut snap = store.snapshot().await.map_err(fail)?;
    let resumed = match args.resume {
        Some(id) => Some(store.job(id).await.map_err(claim)?),
        None => None,
    };
    let cursor = resumed.as_ref().and_then(|j| j.cursor.clone());
    let (first, after) = resync::start_at(&tables, cursor.as_ref());
    let mut remaining = 0u64;
    println!(
        "resync of {} to {queue}, snapshot at {}:",
        cfg.site,
        snap.time().to_rfc3339()
    );
    for (i, t) in tables.iter().enumerate() {
        let n = match i.cmp(&first) {
            std::cmp::Ordering::Less => 0,
            std::cmp::Ordering::Equal => snap.count(t, after.as_deref()).await.map_err(fail)?,
            std::cmp::Ordering::Greater => snap.count(t, None).await.map_err(fail)?,
        };
        remaining += n;
        println!("  {:<30} {:<24} {n} row(s)", t.table, t.side.kind);
    }
    let extras = match request.prune {
        true => {
            let mut have = std::collections::HashMap::new();
            for t in &tables {
                have.insert(
                    t.entity.clone(),
                    resync::keys(&mut snap, t).await.map_err(fail)?,
                );
            }
            let extras = resync::extras(&target_rows, &have);
            for (p, _) in &target_rows {
                let n = extras.iter().filter(|x| x.entity == p.table.entity).count();
                println!(
                    "  {:<30} {:<24} {n} row(s) at {to_site} that {} lacks: deleted (--prune)",
                    p.table.table, p.table.side.kind, cfg.site
                );
            }
            extras
        }
        false => Vec::new(),
    };
    remaining += extras.len() as u64;
    let done_before = resumed.as_ref().map_or(0, |j| j.confirmed);
    match &resumed {
        Some(j) => println!(
            "{remaining} row(s) to send after job {}'s last confirmed row ({done_before} sent before)",
            j.id
        ),
        None => println!("{remaining} row(s) to send"),
    }
    if args.dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    confirm(
        args.yes,
        &format!("send {remaining} row(s) of {} to {queue}?", cfg.site),
    )?;
    let entities: Vec<String> = tables.iter().map(|t| t.entity.clone()).collect();
    let job = match args.resume {
        Some(id) => store.resume(id).await.map_err(claim)?,
        None => store
            .start(&to_site, &entities, &request, &crate::audit::actor().1)
            .await
            .map_err(claim)?,
    };
    let conn = broker(cfg, "resync").await?;
    bus::topology::queue_counts(&conn, &queue)
        .await
        .map_err(|e| fail(format!("{e} (run `sitesync topology declare`)")))?;
    let mut direct = bus::direct::Direct::open(&conn, &queue, cfg.broker.publisher_window)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let total = done_before + remaining as i64;
    let bar = progress_bar(total as u64, "rows");
    if let Some(bar) = &bar {
        bar.set_position(done_before as u64);
    }
    println!("resync job {} (attempt {}) started", job.id, job.attempt);
    // Each run is also a job of `sitesync jobs` (and the dashboard).
    let mut record = Job::start(
        &jobs,
        "resync",
        &crate::audit::actor().1,
        serde_json::json!({
            "job": job.id,
            "attempt": job.attempt,
            "to_site": to_site,
            "routes": request.routes,
            "all": request.all,
            "where": request.filter,
            "prune": request.prune,
            "pack": args.pack,
            "compress": args.compress,
            "rate": args.rate,
        }),
        Some(total as u64),
    )
    .await?;
    record.set_done(done_before as u64);
    let began = std::time::Instant::now();
    let mut logged = began;
    // SIGINT (Ctrl-C, or a cancel through the admin API) stops the run
    // between two rows, once what is in flight is confirmed; a second one
    // exits at once (the job resumes from its last saved row, as after a
    // kill).
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut interrupt = interrupts()?;
    let run = Run {
        site: &cfg.site,
        job: &job,
        tables: &tables,
        rate: args.rate,
        window: cfg.broker.publisher_window,
        max_bytes: cfg.broker.max_message_bytes,
        total,
        extras: &extras,
        pack: args.pack as usize,
        compress: args.compress,
        stop: Some(&stop),
    };
    let confirmed = AtomicU64::new(done_before as u64);
    let (sent, result) = {
        let sending = resync::send(&mut store, &mut snap, &mut direct, &run, |s| {
            confirmed.store(s.confirmed as u64, Ordering::Relaxed);
            match &bar {
                Some(bar) => bar.set_position(s.confirmed as u64),
                None if logged.elapsed() >= std::time::Duration::from_secs(5) => {
                    logged = std::time::Instant::now();
                    let rate = (s.confirmed - done_before) as f64
                        / began.elapsed().as_secs_f64().max(0.001);
                    tracing::info!(
                        job = job.id,
                        confirmed = s.confirmed,
                        total,
                        per_s = rate.round(),
                        "resyncing to {queue}"
                    );
                }
                None => {}
            }
        });
        tokio::pin!(sending);
        loop {
            tokio::select! {
                r = &mut sending => break r,
                _ = tokio::time::sleep(crate::jobs::PROGRESS_EVERY) => {
                    record.set_done(confirmed.load(Ordering::Relaxed));
                    record.tick().await;
                }
                _ = interrupt.recv() => {
                    if stop.swap(true, Ordering::Relaxed) {
                        eprintln!("interrupted again: exiting now; resume with `sitesync resync --connector {} --resume {}`", cfg.file.display(), job.id);
                        std::process::exit(CANCELLED.into());
                    }
                    eprintln!("interrupted: stopping after the rows in flight are confirmed (interrupt again to exit now)");
                }
            }
        }
    };
    record.set_done(sent.confirmed as u64);
    for row in &sent.too_large {
        record.failed_one(format!("left out (over broker.max_message_bytes): {row}"));
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    drop(snap);
    for row in &sent.too_large {
        eprintln!(
            "left out: {row}: its event is over broker.max_message_bytes ({})",
            cfg.broker.max_message_bytes
        );
    }
    let seconds = began.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            direct.close("resynced").await;
            store.finish(job.id, "done").await.map_err(fail)?;
            let now = sent.confirmed - done_before;
            let line = format!(
                "resync job {} done: {now} row(s) sent to {queue} in {seconds:.1} s ({:.0}/s), each confirmed by the broker{}{}{}",
                job.id,
                now as f64 / seconds.max(0.001),
                match sent.pruned {
                    0 => String::new(),
                    n => format!(
                        "; {n} delete(s) of rows {to_site} had and {} lacks",
                        cfg.site
                    ),
                },
                match sent.pending {
                    0 => String::new(),
                    n => format!(
                        "; {n} row(s) left to their own events (a write of {} to them waits in its outbox)",
                        cfg.site
                    ),
                },
                match sent.too_large.len() {
                    0 => String::new(),
                    n => format!("; {n} row(s) left out (too large)"),
                }
            );
            record.succeeded(&line).await;
            println!("{line}");
            *said = line;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // The job's row keeps why it stopped ("cancelled" for SIGINT);
            // either way `--resume` goes on after its last confirmed row.
            let message = e.to_string();
            let _ = store
                .progress(
                    job.id,
                    total,
                    sent.confirmed,
                    sent.last.as_ref(),
                    Some(&message),
                )
                .await;
            let resume = format!(
                "`sitesync resync --connector {} --resume {}`",
                cfg.file.display(),
                job.id
            );
            if let resync::SendError::Cancelled = e {
                direct.close("cancelled").await;
                let line = format!(
                    "resync job {} cancelled after {} confirmed row(s) of {total}: go on with {resume}",
                    job.id, sent.confirmed
                );
                record.cancelled(&line).await;
                return Err(Failure {
                    message: line,
                    code: CANCELLED,
                });
            }
            record.failed(&message).await;
            Err(fail(format!(
                "resync job {} stopped after {} confirmed row(s): {message}. Go on with {resume}",
                job.id, sent.confirmed
            )))
        }
    }
}

/// `--prune`: the target's tables, read through its delete routes.
struct PruneRead<'a> {
    cfg: &'a ConnectorConfig,
    source: &'a [crate::resync::Table],
    filter: Option<&'a str>,
}

impl Task for PruneRead<'_> {
    type Output = Result<Vec<(crate::resync::Prune, Vec<crate::resync::Row>)>, Failure>;

    async fn run<D: Driver>(self, db: &D::Settings) -> Self::Output {
        use crate::resync::{self, Resync};
        let c = D::capture(self.cfg, db)?;
        let prunes = resync::prune_tables(&c, &self.cfg.sink, self.source, self.filter)
            .await
            .map_err(|reasons| Failure {
                message: format!("--prune refused, nothing sent:\n  {}", reasons.join("\n  ")),
                code: 2,
            })?;
        let store = D::resync(self.cfg, db)?;
        let mut snap = store.snapshot().await.map_err(fail)?;
        let mut out = Vec::new();
        for p in prunes {
            let rows = resync::all_rows(&mut snap, &p.table).await.map_err(fail)?;
            out.push((p, rows));
        }
        Ok(out)
    }
}

/// Asks on the terminal unless `yes`; refuses without a terminal.
fn confirm(yes: bool, question: &str) -> Result<(), Failure> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure {
            message: format!("{question} — not confirmed: pass --yes to run without a terminal"),
            code: 2,
        });
    }
    print!("{question} type `yes` to continue: ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(fail("not confirmed; nothing changed"))
    }
}
