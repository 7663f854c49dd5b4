//! Connector and topology configuration.
//!
//! One TOML file per database under `connectors/`, and one shared topology
//! file under `config/`. Loading is pure (no network): the file is parsed,
//! `${VAR}` / `${VAR:-default}` are expanded inside string values, every key
//! is checked, and *every* problem is reported at once, each naming the
//! file, the key and what was expected. `sitesync check` adds the live
//! checks (database preflight, broker, topology).
//!
//! The `[database]` table belongs to the connector's engine: each engine
//! reads its own keys (`crate::engine`), through the same [`Reader`], so
//! that a key of another engine is reported as unknown.
//!
//! Relative paths (`broker.topology`, `checkpoint.dir`) are resolved against
//! the sidecar's working directory: run it from the project's top directory,
//! or write absolute paths.

mod admin;
mod archive;
mod reader;

pub use archive::{
    ArchiveBound, ArchiveConfig, DEFAULT_ARCHIVE_RETENTION_DAYS, DEFAULT_ARCHIVE_TABLE, Overflow,
};

pub use admin::{AdminConfig, DEFAULT_TOKENS_ENV};
pub use reader::{ConfigErrors, Problem, Reader, expand_env};

use reader::parse_file;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A connector: one database server at one site.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// The file it came from (for messages and the CLI's reset hints).
    pub file: PathBuf,
    /// Short name: the checkpoint directory, the engine's defaults (a
    /// replication slot's name) and log lines use it. Defaults to the file
    /// stem (`paris`).
    pub name: String,
    /// The site this database belongs to (`PARIS`): the `origin` of its
    /// events and the queue its sink will consume.
    pub site: String,
    pub broker: BrokerConfig,
    pub checkpoint: CheckpointConfig,
    pub retry: RetryConfig,
    pub shutdown: ShutdownConfig,
    pub sink: SinkConfig,
    /// `[archive]`: this sidecar also consumes the archive queue into a
    /// table of its database (`None`: it does not).
    pub archive: Option<ArchiveConfig>,
    /// The shared topology, loaded from `broker.topology`.
    pub topology: TopologyConfig,
    /// The event types whose routes say `capture = true`: `sitesync init`
    /// installs the triggers that fill the outbox from their tables
    /// (`crate::capture`).
    pub capture: Vec<String>,
    /// `purge_every`: how often the sidecar purges the archive, the inbox
    /// and reviewed conflicts (`crate::purge`); `None` (`"off"`): only
    /// `sitesync purge` does.
    pub purge_every: Option<Duration>,
    /// How long the inbox and reviewed conflicts are kept (`[sink]`).
    pub retention: Retention,
    /// `[admin]`: the HTTP listener (`None`: off).
    pub admin: Option<AdminConfig>,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// AMQP URLs tried in order (failover).
    pub urls: Vec<String>,
    /// Path of the shared topology file.
    pub topology_file: PathBuf,
    /// Messages published and not yet confirmed, at most.
    pub publisher_window: usize,
    /// How often `run` re-verifies the topology while idle (it also does so
    /// before every checkpoint write).
    pub topology_check_interval: Duration,
    /// Per-address connection timeout.
    pub connect_timeout: Duration,
    /// RabbitMQ management API, to verify bindings (AMQP cannot list them):
    /// `broker.management_url`, with the credentials and virtual host it
    /// takes from the first AMQP URL.
    pub management: Option<ManagementApi>,
    /// Larger events go to the dead-letter queue instead of being refused
    /// by the broker (which would close the channel, again and again).
    pub max_message_bytes: usize,
}

/// Where the RabbitMQ management API is and how to log in to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagementApi {
    /// `http(s)://host:port[/path]`, without credentials or trailing slash.
    pub base: String,
    pub user: String,
    pub password: String,
    /// The virtual host whose bindings are checked (not encoded).
    pub vhost: String,
}

impl ManagementApi {
    /// `management_url` may carry credentials (`http://user:pass@host:15672`);
    /// otherwise those of `amqp_url` are used, as is its virtual host.
    pub fn parse(management_url: &str, amqp_url: &str) -> Result<ManagementApi, String> {
        let amqp: lapin::uri::AMQPUri = amqp_url
            .parse()
            .map_err(|e| format!("`{}` is not an AMQP URL: {e}", redact_url(amqp_url)))?;
        let (scheme, rest) = management_url
            .split_once("://")
            .filter(|(s, _)| *s == "http" || *s == "https")
            .ok_or_else(|| format!("`{}` is not an http(s) URL", redact_url(management_url)))?;
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let (user, password, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (u.to_string(), p.to_string(), host)
            }
            None => (
                amqp.authority.userinfo.username.clone(),
                amqp.authority.userinfo.password.clone(),
                authority,
            ),
        };
        if host.is_empty() {
            return Err(format!("`{}` names no host", redact_url(management_url)));
        }
        Ok(ManagementApi {
            base: format!("{scheme}://{host}{}", path.trim_end_matches('/')),
            user,
            password,
            vhost: amqp.vhost,
        })
    }
}

/// The sink: this site's queue applied to this database.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Whether `run` consumes this site's queue (default true).
    pub enabled: bool,
    /// Unacknowledged messages the broker may send ahead.
    pub prefetch: u16,
    /// A batch closes at this many messages…
    pub batch_size: usize,
    /// …or this long after its first message…
    pub batch_timeout: Duration,
    /// …or when no message has come for this long: a lull closes the batch
    /// early, so that a light load is applied at once while a stream keeps
    /// filling batches.
    pub batch_idle: Duration,
    /// Attempts at a message that fails on its own (a constraint, a type)
    /// before it goes to the dead-letter queue.
    pub max_attempts: u32,
    /// What to do with an event type no route names.
    pub unrouted: Unrouted,
    pub routes: Vec<Route>,
    /// Asking the archive for the events of open gaps.
    pub gap_fill: GapFillConfig,
    /// Send each origin a receipt per applied batch (`crate::sink::control`).
    pub receipts: bool,
}

/// When the sink asks the archiving site for a gap's events (see
/// `crate::sink::gaps`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapFillConfig {
    /// On by default; it does anything only when the topology names an
    /// archiving site.
    pub enabled: bool,
    /// A gap this old is asked for (younger ones often close by themselves:
    /// a message released by a consumer that died comes back late).
    pub after: Duration,
    /// A gap asked for this long ago and still open is asked for again.
    pub again: Duration,
}

impl Default for GapFillConfig {
    fn default() -> Self {
        GapFillConfig {
            enabled: true,
            after: Duration::from_secs(30),
            again: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted {
    DeadLetter,
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Upsert,
    Delete,
}

/// How events of one type become rows of one table.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The event `type` this route applies.
    pub kind: String,
    /// Target table, optionally schema-qualified.
    pub table: String,
    /// The table's key columns (after renaming).
    pub key: Vec<String>,
    pub operation: Operation,
    /// Event field → column, for fields whose column has another name.
    pub rename: BTreeMap<String, String>,
    /// Event fields not written.
    pub drop: Vec<String>,
    /// Columns set to a constant on every write.
    pub constants: BTreeMap<String, serde_json::Value>,
}

impl Route {
    /// The column an event field goes to, or `None` if it is dropped.
    pub fn column_of<'a>(&'a self, field: &'a str) -> Option<&'a str> {
        if self.drop.iter().any(|d| d == field) {
            None
        } else {
            Some(self.rename.get(field).map(String::as_str).unwrap_or(field))
        }
    }

    /// The event field a column is read from (the reverse of `rename`).
    pub fn field_of<'a>(&'a self, column: &'a str) -> &'a str {
        self.rename
            .iter()
            .find(|(_, c)| c.as_str() == column)
            .map(|(f, _)| f.as_str())
            .unwrap_or(column)
    }

    /// `(schema, table)`, schema defaulting to `public`.
    pub fn table_parts(&self) -> (&str, &str) {
        match self.table.split_once('.') {
            Some((s, t)) => (s, t),
            None => ("public", self.table.as_str()),
        }
    }

    /// The table as entities name it: `schema.table`, whatever the route
    /// wrote.
    pub fn entity_table(&self) -> String {
        let (schema, table) = self.table_parts();
        format!("{schema}.{table}")
    }
}

impl SinkConfig {
    pub fn route(&self, kind: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.kind == kind)
    }
}

fn is_sql_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !text.starts_with(|c: char| c.is_ascii_digit())
}

/// `[sink]`, and the types of the routes that say `capture = true`.
fn read_sink(r: &mut Reader<'_>) -> (SinkConfig, Vec<String>) {
    let enabled = r.boolean("enabled").unwrap_or(true);
    let prefetch = r
        .integer("prefetch", 1..=65_535, "a number of messages")
        .unwrap_or(1000) as u16;
    let batch_size = r
        .integer("batch_size", 1..=100_000, "a number of messages")
        .unwrap_or(500) as usize;
    let batch_timeout = r.millis("batch_timeout_ms", 20, 60_000);
    let batch_idle = r.millis("batch_idle_ms", 2, 60_000);
    let max_attempts = r
        .integer("max_attempts", 1..=1000, "a number of attempts")
        .unwrap_or(3) as u32;
    let defaults = GapFillConfig::default();
    let gap_fill = GapFillConfig {
        enabled: r.boolean("gap_fill").unwrap_or(defaults.enabled),
        after: r.millis(
            "gap_fill_after_ms",
            defaults.after.as_millis() as u64,
            86_400_000,
        ),
        again: r.millis(
            "gap_fill_again_ms",
            defaults.again.as_millis() as u64,
            86_400_000,
        ),
    };
    let receipts = r.boolean("receipts").unwrap_or(false);
    let unrouted = match r
        .string("unrouted", false, "\"dead-letter\" or \"skip\"")
        .as_deref()
    {
        None | Some("dead-letter") => Unrouted::DeadLetter,
        Some("skip") => Unrouted::Skip,
        Some(other) => {
            r.problem(
                "unrouted",
                format!("`{other}` is not a policy; expected \"dead-letter\" or \"skip\""),
            );
            Unrouted::DeadLetter
        }
    };
    let routes = r.table_array("routes", |t| {
        let kind = t.string("type", true, "the event type, e.g. \"customer.upsert\"").unwrap_or_default();
        let table = t.string("table", true, "the target table, e.g. \"public.customer\"").unwrap_or_default();
        if !table.is_empty() && !table.split('.').all(is_sql_name) {
            t.problem("table", format!("`{table}` is not a table name: expected [schema.]table with letters, digits and _"));
        }
        let key = t.strings("key", "key column names").unwrap_or_default();
        if key.is_empty() {
            t.problem("key", "missing; expected the key columns, e.g. [\"id\"]");
        }
        let operation = match t.string("operation", false, "\"upsert\" or \"delete\"").as_deref() {
            None | Some("upsert") => Operation::Upsert,
            Some("delete") => Operation::Delete,
            Some(other) => {
                t.problem("operation", format!("`{other}` is not an operation; expected \"upsert\" or \"delete\""));
                Operation::Upsert
            }
        };
        let rename = t.string_map("rename", "a column name");
        let drop = t.strings("drop", "field names").unwrap_or_default();
        let constants = t.value_map("constants");
        let capture = t.boolean("capture").unwrap_or(false);
        for name in key
            .iter()
            .chain(rename.keys())
            .chain(rename.values())
            .chain(drop.iter())
            .chain(constants.keys())
        {
            if !is_sql_name(name) {
                t.problem("", format!("`{name}` is not a usable field or column name (letters, digits and _)"));
            }
        }
        for k in &key {
            if constants.contains_key(k) {
                t.problem("constants", format!("key column `{k}` cannot be a constant"));
            }
        }
        (
            Route {
                kind,
                table,
                key,
                operation,
                rename,
                drop,
                constants,
            },
            capture,
        )
    });
    let capture = routes
        .iter()
        .filter(|(_, c)| *c)
        .map(|(r, _)| r.kind.clone())
        .collect();
    let routes: Vec<Route> = routes.into_iter().map(|(r, _)| r).collect();
    let mut seen = BTreeSet::new();
    for (i, route) in routes.iter().enumerate() {
        if !route.kind.is_empty() && !seen.insert(route.kind.clone()) {
            r.problem(
                &format!("routes[{i}].type"),
                format!("type `{}` has two routes", route.kind),
            );
        }
    }
    (
        SinkConfig {
            enabled,
            prefetch,
            batch_size,
            batch_timeout,
            batch_idle,
            max_attempts,
            unrouted,
            routes,
            gap_fill,
            receipts,
        },
        capture,
    )
}

/// What `crate::purge` keeps of the sink's tables: `[sink]
/// inbox_retention_days` and `conflict_retention_days` (beside the sink's
/// own keys, read apart so that the sink's settings stay the sink's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Inbox rows settled longer ago than this many days are purged. The
    /// inbox is what tells a redelivered event from a new one; once its row
    /// is gone, last-writer-wins against `sitesync_versions` (never purged)
    /// still keeps an old event from overwriting newer state, but records
    /// it as a lost event (a conflict row). So this must exceed the longest
    /// time a message can wait in a queue or the dead-letter queue before
    /// it is delivered again (docs/archive.md, "Purge"). Default 30.
    pub inbox_retention_days: u32,
    /// Conflicts marked reviewed longer ago than this many days are purged;
    /// unreviewed ones are kept. Default 90.
    pub conflict_retention_days: u32,
}

impl Retention {
    fn read(r: &mut Reader<'_>) -> Retention {
        Retention {
            inbox_retention_days: read_days(
                r,
                "inbox_retention_days",
                DEFAULT_INBOX_RETENTION_DAYS,
            ),
            conflict_retention_days: read_days(
                r,
                "conflict_retention_days",
                DEFAULT_CONFLICT_RETENTION_DAYS,
            ),
        }
    }
}

/// `[sink] inbox_retention_days` when not set: a month, far beyond the
/// hours a message waits in a queue while a site is down, and within
/// reach of the dead-letter queue's review (a dead letter requeued later
/// than this is still safe, but recorded as a conflict instead of being
/// told a duplicate; docs/archive.md, "Purge").
pub const DEFAULT_INBOX_RETENTION_DAYS: u32 = 30;

/// `[sink] conflict_retention_days` when not set.
pub const DEFAULT_CONFLICT_RETENTION_DAYS: u32 = 90;

/// `purge_every` when not set: daily.
pub const DEFAULT_PURGE_EVERY: Duration = Duration::from_secs(24 * 3600);

/// A retention in whole days, 1 to 100 years: 0 (purge everything at
/// once) and negative values are refused.
pub(crate) fn read_days(r: &mut Reader<'_>, key: &str, default: u32) -> u32 {
    r.integer(key, 1..=36_500, "a number of days")
        .map(|n| n as u32)
        .unwrap_or(default)
}

/// Reads a duration written `500ms`, `30s`, `15m`, `6h` or `1d`; `off` is
/// `None`.
pub fn parse_every(text: &str) -> Result<Option<Duration>, String> {
    let t = text.trim();
    if t == "off" {
        return Ok(None);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().map_err(|_| {
        format!("`{text}` is not a duration: expected e.g. \"24h\", \"30m\", \"1d\" or \"off\"")
    })?;
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => {
            return Err(format!(
                "`{text}` has no unit: write e.g. \"24h\" (ms, s, m, h or d)"
            ));
        }
        other => {
            return Err(format!(
                "`{other}` is not a unit of `{text}`: use ms, s, m, h or d"
            ));
        }
    };
    let ms = n
        .checked_mul(unit_ms)
        .filter(|ms| *ms > 0 && *ms <= 366 * 86_400_000)
        .ok_or_else(|| format!("`{text}` is out of range: from 1ms to 366d, or \"off\""))?;
    Ok(Some(Duration::from_millis(ms)))
}

#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    pub dir: PathBuf,
    /// The shortest time between two checkpoint writes (each first
    /// verifies the topology).
    pub interval: Duration,
}

#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT, how long to wait for outstanding confirms.
    pub drain_timeout: Duration,
}

/// The broker topology shared by every site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyConfig {
    pub file: PathBuf,
    /// Durable fanout exchange every event is published to.
    pub exchange: String,
    /// Site names (`PARIS`, `LONDON`, …): one quorum queue each.
    pub sites: Vec<String>,
    /// Site queue name = prefix + site name (`SITE_PARIS`).
    pub site_queue_prefix: String,
    /// Archive queue bound to the same exchange.
    pub archive_queue: String,
    /// Dead-letter exchange and its queue.
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// The site whose connector archives the archive queue (`[archive]`),
    /// so that `sitesync check` at any site can tell whether one does.
    pub archive_site: Option<String>,
    /// A bound on the archive queue, when the topology sets one.
    pub archive_bound: ArchiveBound,
}

impl TopologyConfig {
    pub fn site_queue(&self, site: &str) -> String {
        format!("{}{}", self.site_queue_prefix, site)
    }

    /// The queue of gap requests the archiving sidecar consumes
    /// (`SITE_PARIS_HISTO_REQUESTS`): not bound to the fanout, sent to
    /// through the default exchange.
    pub fn gap_request_queue(&self) -> String {
        format!("{}_REQUESTS", self.archive_queue)
    }

    /// Every queue bound to the event exchange: each site's, then the archive.
    pub fn bound_queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = self.sites.iter().map(|s| self.site_queue(s)).collect();
        queues.push(self.archive_queue.clone());
        queues
    }
}

pub const DEFAULT_PUBLISHER_WINDOW: usize = 512;

fn check_site_name(r: &mut Reader<'_>, key: &str, value: &str) {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        r.problem(
            key,
            format!(
                "`{value}` is not a site name: use uppercase letters, digits and _ (e.g. PARIS)"
            ),
        );
    }
}

impl ConnectorConfig {
    /// Loads and validates a connector file and the topology file it names.
    /// `read_database` reads the `[database]` table, whose keys are the
    /// engine's (`crate::engine` gives it), with the connector's name; it
    /// records its problems in the reader, and they are reported with the
    /// rest.
    pub fn load_with<D>(
        path: &Path,
        read_database: impl FnOnce(&mut Reader<'_>, &str) -> Option<D>,
    ) -> Result<(ConnectorConfig, D), ConfigErrors> {
        let table = parse_file(path)?;
        let mut problems = Vec::new();
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_lowercase())
            .unwrap_or_else(|| "connector".into());
        let mut r = Reader::new(&table, "", &mut problems);

        let name = r
            .string("name", false, "a short connector name")
            .unwrap_or(stem);
        r.identifier("name", &name, "connector name");
        let site = r
            .string("site", true, "the site name, e.g. \"PARIS\"")
            .unwrap_or_default();
        if !site.is_empty() {
            check_site_name(&mut r, "site", &site);
        }
        let purge_every =
            match r.string("purge_every", false, "a duration, e.g. \"24h\", or \"off\"") {
                None => Some(DEFAULT_PURGE_EVERY),
                Some(text) => parse_every(&text).unwrap_or_else(|e| {
                    r.problem("purge_every", e);
                    None
                }),
            };

        let database = r.section("database", |d| read_database(d, &name));

        let (broker, topology_path) = r.section("broker", |b| {
            let urls = b.strings("urls", "AMQP URLs").unwrap_or_default();
            if urls.is_empty() {
                b.problem("urls", "missing; expected one or more AMQP URLs, e.g. [\"amqp://guest:guest@127.0.0.1:5672/%2f\"]");
            }
            for (i, url) in urls.iter().enumerate() {
                if let Err(e) = url.parse::<lapin::uri::AMQPUri>() {
                    b.problem(&format!("urls[{i}]"), format!("`{}` is not an AMQP URL: {e}", redact_url(url)));
                }
            }
            let topology = b
                .string("topology", false, "the path of the topology file")
                .unwrap_or_else(|| "config/topology.toml".into());
            let window = b
                .integer("publisher_window", 1..=65_535, "the number of unconfirmed messages")
                .map(|n| n as usize)
                .unwrap_or(DEFAULT_PUBLISHER_WINDOW);
            let check = b.millis("topology_check_interval_ms", 5_000, 3_600_000);
            let connect_timeout = b.millis("connect_timeout_ms", 10_000, 600_000);
            let max_message_bytes = b
                .integer("max_message_bytes", 1024..=536_870_912, "a size in bytes")
                .map(|n| n as usize)
                .unwrap_or(16 * 1024 * 1024);
            let management_url = b.string("management_url", false, "the management API URL, e.g. \"http://127.0.0.1:15672\"");
            let management = match (&management_url, urls.first()) {
                (Some(m), Some(first)) => ManagementApi::parse(m, first)
                    .map_err(|e| b.problem("management_url", e))
                    .ok(),
                _ => None,
            };
            (
                BrokerConfig {
                    urls,
                    topology_file: PathBuf::from(&topology),
                    publisher_window: window,
                    topology_check_interval: check,
                    connect_timeout,
                    management,
                    max_message_bytes,
                },
                PathBuf::from(topology),
            )
        });

        let checkpoint = r.section("checkpoint", |c| CheckpointConfig {
            interval: c.millis("interval_ms", 100, 60_000),
            dir: PathBuf::from(
                c.string("dir", false, "a directory path")
                    .unwrap_or_else(|| format!("checkpoints/{name}")),
            ),
        });
        let retry = r.section("retry", |c| RetryConfig {
            initial_backoff: c.millis("initial_backoff_ms", 200, 600_000),
            max_backoff: c.millis("max_backoff_ms", 30_000, 3_600_000),
        });
        if retry.initial_backoff > retry.max_backoff {
            r.problem(
                "retry.initial_backoff_ms",
                "must not exceed retry.max_backoff_ms",
            );
        }
        let shutdown = r.section("shutdown", |c| ShutdownConfig {
            drain_timeout: c.millis("drain_timeout_ms", 10_000, 600_000),
        });
        let ((sink, capture), retention) =
            r.section("sink", |s| (read_sink(s), Retention::read(s)));
        let archive = r
            .has("archive")
            .then(|| r.section("archive", archive::read_archive));
        let admin = match r.has("admin") {
            true => r.section("admin", admin::read_admin),
            false => None,
        };
        r.finish();

        let topology = match TopologyConfig::load(&topology_path) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(Problem {
                    key: "broker.topology".into(),
                    message: format!(
                        "the topology file is not usable:\n    {}",
                        e.to_string().trim_end().replace('\n', "\n    ")
                    ),
                });
                None
            }
        };
        if let Some(t) = &topology
            && !site.is_empty()
            && !t.sites.contains(&site)
        {
            problems.push(Problem {
                key: "site".into(),
                message: format!(
                    "site `{site}` is not one of the sites in {} ({})",
                    t.file.display(),
                    t.sites.join(", ")
                ),
            });
        }

        match (problems.is_empty(), database, topology) {
            (true, Some(database), Some(topology)) => Ok((
                ConnectorConfig {
                    file: path.to_path_buf(),
                    name,
                    site,
                    broker,
                    checkpoint,
                    retry,
                    shutdown,
                    sink,
                    archive,
                    topology,
                    capture,
                    purge_every,
                    retention,
                    admin,
                },
                database,
            )),
            _ => Err(ConfigErrors {
                file: path.to_path_buf(),
                problems,
            }),
        }
    }
}

impl TopologyConfig {
    pub fn load(path: &Path) -> Result<TopologyConfig, ConfigErrors> {
        let table = parse_file(path)?;
        let mut problems = Vec::new();
        let mut r = Reader::new(&table, "", &mut problems);
        let exchange = r
            .string("exchange", false, "an exchange name")
            .unwrap_or_else(|| "sitesync.events".into());
        let sites = r.strings("sites", "site names").unwrap_or_default();
        if sites.is_empty() {
            r.problem("sites", "missing; expected the list of site names, e.g. [\"PARIS\", \"LONDON\", \"MADRID\"]");
        }
        for (i, s) in sites.iter().enumerate() {
            check_site_name(&mut r, &format!("sites[{i}]"), s);
        }
        let mut unique = BTreeSet::new();
        for s in &sites {
            if !unique.insert(s) {
                r.problem("sites", format!("site `{s}` is listed twice"));
            }
        }
        let site_queue_prefix = r
            .string("site_queue_prefix", false, "a queue name prefix")
            .unwrap_or_else(|| "SITE_".into());
        let archive_queue = r
            .string("archive_queue", false, "a queue name")
            .unwrap_or_else(|| "SITE_PARIS_HISTO".into());
        let dead_letter_exchange = r
            .string("dead_letter_exchange", false, "an exchange name")
            .unwrap_or_else(|| "sitesync.dlx".into());
        let dead_letter_queue = r
            .string("dead_letter_queue", false, "a queue name")
            .unwrap_or_else(|| "sitesync.dlq".into());
        for (key, value) in [
            ("exchange", &exchange),
            ("archive_queue", &archive_queue),
            ("dead_letter_exchange", &dead_letter_exchange),
            ("dead_letter_queue", &dead_letter_queue),
        ] {
            if value.is_empty() || value.len() > 255 || value.starts_with("amq.") {
                r.problem(key, format!("`{value}` is not usable: names are 1 to 255 bytes and must not start with `amq.`"));
            }
        }
        let (archive_site, archive_bound) = archive::read_topology_archive(&mut r);
        if let Some(a) = &archive_site
            && !sites.contains(a)
        {
            r.problem(
                "archive_site",
                format!("`{a}` is not one of the sites ({})", sites.join(", ")),
            );
        }
        r.finish();
        let topology = TopologyConfig {
            file: path.to_path_buf(),
            exchange,
            sites,
            site_queue_prefix,
            archive_queue,
            dead_letter_exchange,
            dead_letter_queue,
            archive_site,
            archive_bound,
        };
        if topology
            .bound_queues()
            .contains(&topology.dead_letter_queue)
        {
            problems.push(Problem {
                key: "dead_letter_queue".into(),
                message: "must differ from every site queue and the archive queue".into(),
            });
        }
        if problems.is_empty() {
            Ok(topology)
        } else {
            Err(ConfigErrors {
                file: path.to_path_buf(),
                problems,
            })
        }
    }
}

/// A URL with its password replaced by `***`, for messages and logs. An
/// ADO.NET connection string (no `://`) has its `password`/`pwd` value
/// replaced.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        if url.contains('=') {
            return url
                .split(';')
                .map(|part| match part.split_once('=') {
                    Some((k, _))
                        if matches!(k.trim().to_ascii_lowercase().as_str(), "password" | "pwd") =>
                    {
                        format!("{k}=***")
                    }
                    _ => part.to_string(),
                })
                .collect::<Vec<_>>()
                .join(";");
        }
        return url.to_string();
    };
    let after = &url[scheme_end + 3..];
    let authority_end = after.find(['/', '?']).unwrap_or(after.len());
    let authority = &after[..authority_end];
    match authority.rfind('@') {
        Some(at) => match authority[..at].split_once(':') {
            Some((user, _)) => format!(
                "{}{user}:***{}",
                &url[..scheme_end + 3],
                &url[scheme_end + 3 + at..]
            ),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Connector and topology files written for tests.
#[cfg(test)]
pub(crate) mod test_files {
    use std::path::{Path, PathBuf};

    /// Writes `text` to `dir/name`.
    pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A directory of this test run's own.
    pub(crate) fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sitesync-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

#[cfg(test)]
mod tests {
    use super::test_files::{scratch, write};
    use super::*;

    #[test]
    fn ado_passwords_are_redacted() {
        assert_eq!(
            redact_url("server=tcp:h,1433;user=sa;Password=s3cret;database=d"),
            "server=tcp:h,1433;user=sa;Password=***;database=d"
        );
        assert_eq!(redact_url("server=h;pwd=x"), "server=h;pwd=***");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("db://u@h/db"), "db://u@h/db");
        assert_eq!(redact_url("db://u:p@h/db?x=@"), "db://u:***@h/db?x=@");
    }

    /// Loads a connector whose `[database]` is skipped, with `top` at the
    /// top of the file and `sections` after `[broker]`.
    fn load(name: &str, top: &str, sections: &str) -> Result<ConnectorConfig, ConfigErrors> {
        let dir = scratch(name);
        let topo = write(&dir, "topology.toml", "sites = [\"PARIS\"]\n");
        let path = write(
            &dir,
            "paris.toml",
            &format!(
                "site = \"PARIS\"\n{top}\n[database]\nkind = \"x\"\n[broker]\nurls = \"amqp://h\"\ntopology = \"{}\"\n{sections}",
                topo.display()
            ),
        );
        ConnectorConfig::load_with(&path, |d, _| {
            d.skip_rest();
            Some(())
        })
        .map(|(c, ())| c)
    }

    #[test]
    fn retentions_and_the_purge_schedule_have_defaults_and_refuse_zero_negative_and_nonsense() {
        let c = load("purge-defaults", "", "[archive]\n").unwrap();
        assert_eq!(c.archive.unwrap().retention_days, 90);
        assert_eq!(
            c.retention.inbox_retention_days,
            DEFAULT_INBOX_RETENTION_DAYS
        );
        assert_eq!(c.retention.conflict_retention_days, 90);
        assert_eq!(c.purge_every, Some(Duration::from_secs(86_400)));

        let c = load(
            "purge-set",
            "purge_every = \"6h\"",
            "[sink]\ninbox_retention_days = 45\nconflict_retention_days = 7\n[archive]\nretention_days = 365\n",
        )
        .unwrap();
        assert_eq!(c.archive.unwrap().retention_days, 365);
        assert_eq!(c.retention.inbox_retention_days, 45);
        assert_eq!(c.retention.conflict_retention_days, 7);
        assert_eq!(c.purge_every, Some(Duration::from_secs(6 * 3600)));
        assert_eq!(
            load("purge-off", "purge_every = \"off\"", "")
                .unwrap()
                .purge_every,
            None
        );

        let err = load(
            "purge-bad",
            "purge_every = \"0s\"",
            "[sink]\ninbox_retention_days = 0\nconflict_retention_days = -3\n[archive]\nretention_days = \"90\"\n",
        )
        .unwrap_err();
        let text = err.to_string();
        for (key, says) in [
            ("purge_every", "`0s` is out of range"),
            (
                "sink.inbox_retention_days",
                "0 is out of range; expected a number of days between 1 and 36500",
            ),
            ("sink.conflict_retention_days", "-3 is out of range"),
            (
                "archive.retention_days",
                "expected a number of days, found string",
            ),
        ] {
            assert!(
                err.problems
                    .iter()
                    .any(|p| p.key == key && p.message.contains(says)),
                "{key}: {says}\n{text}"
            );
        }
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_every("500ms"), Ok(Some(Duration::from_millis(500))));
        assert_eq!(parse_every("15m"), Ok(Some(Duration::from_secs(900))));
        assert_eq!(
            parse_every(" 2d "),
            Ok(Some(Duration::from_secs(2 * 86_400)))
        );
        assert!(parse_every("24").unwrap_err().contains("has no unit"));
        assert!(parse_every("1w").unwrap_err().contains("`w` is not a unit"));
        assert!(
            parse_every("-1h")
                .unwrap_err()
                .contains("is not a duration")
        );
        assert!(parse_every("400d").unwrap_err().contains("out of range"));
    }

    #[test]
    fn topology_problems() {
        let dir = scratch("topo");
        let topo = write(
            &dir,
            "t.toml",
            "sites = [\"PARIS\", \"paris\", \"PARIS\"]\nexchange = \"amq.fanout\"\nextra = 1\n",
        );
        let err = TopologyConfig::load(&topo).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"sites[1]"), "{keys:?}");
        assert!(keys.contains(&"sites"), "{keys:?}");
        assert!(keys.contains(&"exchange"), "{keys:?}");
        assert!(keys.contains(&"extra"), "{keys:?}");
    }
}
