//! Connector and topology configuration.
//!
//! One TOML file per database under `connectors/`, and one shared topology
//! file under `config/`. Loading is pure (no network): the file is parsed,
//! `${VAR}` / `${VAR:-default}` are expanded inside string values, every key
//! is checked, and *every* problem is reported at once, each naming the
//! file, the key and what was expected. `sitesync check` adds the live
//! checks (database preflight, broker, topology).
//!
//! Relative paths (`broker.topology`, `checkpoint.dir`) are resolved against
//! the sidecar's working directory: run it from the project's top directory,
//! or write absolute paths.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::{Table, Value};

/// Everything wrong with one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// One configuration problem: where it is and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `broker.urls[1]`; empty for file-level problems.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{}: {n} configuration error{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            if p.key.is_empty() {
                writeln!(f, "  - {}", p.message)?;
            } else {
                writeln!(
                    f,
                    "  - {}: key `{}`: {}",
                    self.file.display(),
                    p.key,
                    p.message
                )?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The kind of database a connector reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    Postgres,
    /// SQL Server (Change Tracking); `mssql` is accepted too.
    SqlServer,
    /// Oracle (LogMiner).
    Oracle,
}

impl DatabaseKind {
    const NAMES: &'static str = "postgres, sqlserver, oracle";
}

/// How the SQL Server connection is encrypted (TDS `ENCRYPT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlServerEncrypt {
    /// TLS for the whole session, refused if the server cannot (the default).
    Required,
    /// TDS 8.0 strict: TLS before the prelogin (SQL Server 2022+).
    Strict,
    /// TLS for the login packet only (the password), plain text after.
    LoginOnly,
}

/// The `[database]` keys of a SQL Server connector.
#[derive(Debug, Clone)]
pub struct SqlServerSettings {
    /// `encrypt = "required" | "strict" | "login_only"`.
    pub encrypt: SqlServerEncrypt,
    /// Accept any server certificate (test and trusted networks only).
    pub trust_server_certificate: bool,
    /// A PEM or DER CA certificate the server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// How long an idle source waits between two Change Tracking reads, at
    /// most (it reads again at once while there is work).
    pub poll_max: Duration,
    /// How long this sidecar may be down without losing events: `sitesync
    /// check` fails when the Change Tracking retention is shorter.
    pub max_downtime: Duration,
    /// Per round trip to the server (tiberius `command_timeout`).
    pub command_timeout: Duration,
    /// Outbox rows read per Change Tracking query, at most.
    pub read_batch: u32,
}

impl Default for SqlServerSettings {
    fn default() -> Self {
        SqlServerSettings {
            encrypt: SqlServerEncrypt::Required,
            trust_server_certificate: false,
            ca_file: None,
            poll_max: Duration::from_millis(1_000),
            max_downtime: Duration::from_secs(72 * 3600),
            command_timeout: Duration::from_secs(60),
            read_batch: 5_000,
        }
    }
}

/// A connector: one database server at one site.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// The file it came from (for messages and the CLI's reset hints).
    pub file: PathBuf,
    /// Short name: the checkpoint directory, slot and publication defaults,
    /// and log lines use it. Defaults to the file stem (`paris`).
    pub name: String,
    /// The site this database belongs to (`PARIS`): the `origin` of its
    /// events and the queue its sink will consume.
    pub site: String,
    pub database: DatabaseConfig,
    pub broker: BrokerConfig,
    pub checkpoint: CheckpointConfig,
    pub retry: RetryConfig,
    pub shutdown: ShutdownConfig,
    pub sink: SinkConfig,
    /// The shared topology, loaded from `broker.topology`.
    pub topology: TopologyConfig,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub kind: DatabaseKind,
    /// Connection URL (`postgres://user:pass@host:port/db`), or for SQL
    /// Server an ADO.NET connection string (`server=tcp:host,1433;
    /// database=…;user=…;password=${MSSQL_PASSWORD}`), after `${VAR}` expansion.
    pub url: String,
    /// Outbox table, optionally schema-qualified (`public.outbox`).
    pub outbox_table: String,
    /// PostgreSQL: the logical replication slot this connector owns.
    pub slot: String,
    /// PostgreSQL: the publication on the outbox table.
    pub publication: String,
    /// PostgreSQL: how long a replication session may wait for the server
    /// before the sidecar reconnects (it also bounds how late a keepalive reply is).
    pub status_interval: Duration,
    /// SQL Server: TLS, polling and retention settings (defaults elsewhere).
    pub sqlserver: SqlServerSettings,
    /// Oracle: the settings of the LogMiner source and of the client
    /// library (defaults for other engines).
    pub oracle: OracleSettings,
}

/// `[database]` keys read when `kind = "oracle"`.
#[derive(Debug, Clone)]
pub struct OracleSettings {
    /// `client_lib_dir`: where the Oracle Instant Client libraries are
    /// (`libclntsh.so`); unset, the system's library path is searched.
    pub client_lib_dir: Option<PathBuf>,
    /// `window_min_scn` / `window_max_scn`: the bounds of the adaptive
    /// LogMiner window, in SCNs.
    pub window_min_scn: u64,
    pub window_max_scn: u64,
    /// `window_target_rows`: a window returning more rows than this halves
    /// the width; a sparse one doubles it.
    pub window_target_rows: usize,
    /// `poll_interval_ms`: how long to wait when a window found the
    /// database where the last one left it.
    pub poll_interval: Duration,
    /// `max_buffered_mib`: the cap on outbox inserts of open transactions
    /// held in memory (the stream stops with an operator error past it).
    pub max_buffered_mib: usize,
}

impl Default for OracleSettings {
    fn default() -> Self {
        OracleSettings {
            client_lib_dir: None,
            window_min_scn: 1_000,
            window_max_scn: 1_000_000,
            window_target_rows: 20_000,
            poll_interval: Duration::from_millis(1_000),
            max_buffered_mib: 256,
        }
    }
}

/// The parts of `oracle://user:password@host[:port]/service_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleUrl {
    pub user: String,
    pub password: String,
    /// EZConnect: `//host:port/service_name`.
    pub connect_string: String,
}

/// Parses an Oracle connection URL. User and password may be
/// percent-encoded (`%40` for `@`).
pub fn parse_oracle_url(url: &str) -> Result<OracleUrl, String> {
    let shown = redact_url(url);
    let rest = url.strip_prefix("oracle://").ok_or_else(|| {
        format!(
            "`{shown}` is not an Oracle URL: expected oracle://user:password@host:1521/service_name"
        )
    })?;
    let (auth, target) = rest.rsplit_once('@').ok_or_else(|| {
        format!("`{shown}` names no user (oracle://user:password@host:1521/service_name)")
    })?;
    let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
    let decode = |s: &str| -> Result<String, String> {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("`{shown}`: bad percent-encoding"))?;
                out.push(hex);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).map_err(|_| format!("`{shown}`: user or password is not UTF-8"))
    };
    let (hostport, service) = target
        .split_once('/')
        .filter(|(h, s)| !h.is_empty() && !s.is_empty())
        .ok_or_else(|| {
            format!(
                "`{shown}` names no host or service (oracle://user:password@host:1521/service_name)"
            )
        })?;
    if user.is_empty() {
        return Err(format!("`{shown}` names no user"));
    }
    let hostport = if hostport.contains(':') {
        let (_, port) = hostport.rsplit_once(':').unwrap_or_default();
        port.parse::<u16>()
            .map_err(|_| format!("`{shown}`: the port must be a number"))?;
        hostport.to_string()
    } else {
        format!("{hostport}:1521")
    };
    Ok(OracleUrl {
        user: decode(user)?,
        password: decode(password)?,
        connect_string: format!("//{hostport}/{service}"),
    })
}

impl DatabaseConfig {
    /// `(schema, table)` of the outbox, schema defaulting to `public`
    /// (`dbo` on SQL Server).
    pub fn outbox_parts(&self) -> (&str, &str) {
        match self.outbox_table.split_once('.') {
            Some((s, t)) => (s, t),
            None if self.kind == DatabaseKind::SqlServer => ("dbo", self.outbox_table.as_str()),
            None => ("public", self.outbox_table.as_str()),
        }
    }
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

fn read_sink(r: &mut Reader<'_>) -> SinkConfig {
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
        Route {
            kind,
            table,
            key,
            operation,
            rename,
            drop,
            constants,
        }
    });
    let mut seen = BTreeSet::new();
    for (i, route) in routes.iter().enumerate() {
        if !route.kind.is_empty() && !seen.insert(route.kind.clone()) {
            r.problem(
                &format!("routes[{i}].type"),
                format!("type `{}` has two routes", route.kind),
            );
        }
    }
    SinkConfig {
        enabled,
        prefetch,
        batch_size,
        batch_timeout,
        batch_idle,
        max_attempts,
        unrouted,
        routes,
    }
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
}

impl TopologyConfig {
    pub fn site_queue(&self, site: &str) -> String {
        format!("{}{}", self.site_queue_prefix, site)
    }

    /// Every queue bound to the event exchange: each site's, then the archive.
    pub fn bound_queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = self.sites.iter().map(|s| self.site_queue(s)).collect();
        queues.push(self.archive_queue.clone());
        queues
    }
}

pub const DEFAULT_PUBLISHER_WINDOW: usize = 512;

/// Reads a table key by key, collecting every problem instead of stopping at
/// the first, and reporting the keys nobody asked for as unknown.
struct Reader<'a> {
    table: &'a Table,
    prefix: String,
    seen: BTreeSet<String>,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Reader<'a> {
    fn new(table: &'a Table, prefix: &str, problems: &'a mut Vec<Problem>) -> Self {
        Reader {
            table,
            prefix: prefix.to_string(),
            seen: BTreeSet::new(),
            problems,
        }
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn problem(&mut self, key: &str, message: impl Into<String>) {
        let key = self.key(key);
        self.problems.push(Problem {
            key,
            message: message.into(),
        });
    }

    fn get(&mut self, key: &str) -> Option<&'a Value> {
        self.seen.insert(key.to_string());
        self.table.get(key)
    }

    fn string(&mut self, key: &str, required: bool, what: &str) -> Option<String> {
        match self.get(key) {
            None if required => {
                self.problem(key, format!("missing; expected {what}"));
                None
            }
            None => None,
            Some(Value::String(s)) => match expand_env(s) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.problem(key, e);
                    None
                }
            },
            Some(other) => {
                self.problem(key, format!("expected {what}, found {}", other.type_str()));
                None
            }
        }
    }

    fn integer(
        &mut self,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        what: &str,
    ) -> Option<i64> {
        match self.get(key)? {
            Value::Integer(n) if range.contains(n) => Some(*n),
            Value::Integer(n) => {
                self.problem(
                    key,
                    format!(
                        "{n} is out of range; expected {what} between {} and {}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
            other => {
                self.problem(key, format!("expected {what}, found {}", other.type_str()));
                None
            }
        }
    }

    fn millis(&mut self, key: &str, default: u64, max: u64) -> Duration {
        Duration::from_millis(
            self.integer(key, 1..=max as i64, "a number of milliseconds")
                .map(|n| n as u64)
                .unwrap_or(default),
        )
    }

    fn strings(&mut self, key: &str, what: &str) -> Option<Vec<String>> {
        match self.get(key)? {
            Value::String(s) => match expand_env(s) {
                Ok(s) => Some(vec![s]),
                Err(e) => {
                    self.problem(key, e);
                    None
                }
            },
            Value::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => match expand_env(s) {
                            Ok(s) => out.push(s),
                            Err(e) => self.problem(&format!("{key}[{i}]"), e),
                        },
                        other => self.problem(
                            &format!("{key}[{i}]"),
                            format!("expected {what}, found {}", other.type_str()),
                        ),
                    }
                }
                Some(out)
            }
            other => {
                self.problem(
                    key,
                    format!("expected a list of {what}, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn boolean(&mut self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Boolean(b) => Some(*b),
            other => {
                self.problem(
                    key,
                    format!("expected true or false, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// A table of strings (`{ username = "user_name" }`).
    fn string_map(&mut self, key: &str, what: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match self.get(key) {
            None => {}
            Some(Value::Table(t)) => {
                for (k, v) in t {
                    match v {
                        Value::String(s) => {
                            out.insert(k.clone(), s.clone());
                        }
                        other => self.problem(
                            &format!("{key}.{k}"),
                            format!("expected {what}, found {}", other.type_str()),
                        ),
                    }
                }
            }
            Some(other) => self.problem(
                key,
                format!(
                    "expected a table such as {{ field = \"column\" }}, found {}",
                    other.type_str()
                ),
            ),
        }
        out
    }

    /// A table of values, as JSON (`{ source = "sitesync", version = 2 }`).
    fn value_map(&mut self, key: &str) -> BTreeMap<String, serde_json::Value> {
        let mut out = BTreeMap::new();
        match self.get(key) {
            None => {}
            Some(Value::Table(t)) => {
                for (k, v) in t {
                    match serde_json::to_value(v) {
                        Ok(json) => {
                            out.insert(k.clone(), json);
                        }
                        Err(e) => self.problem(
                            &format!("{key}.{k}"),
                            format!("not representable as JSON: {e}"),
                        ),
                    }
                }
            }
            Some(other) => self.problem(
                key,
                format!(
                    "expected a table such as {{ column = value }}, found {}",
                    other.type_str()
                ),
            ),
        }
        out
    }

    /// An array of tables (`[[sink.routes]]`), each read by `f`.
    fn table_array<T>(&mut self, key: &str, mut f: impl FnMut(&mut Reader<'_>) -> T) -> Vec<T> {
        let prefix = self.key(key);
        let items = match self.get(key) {
            None => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(other) => {
                self.problem(
                    key,
                    format!("expected [[{prefix}]] tables, found {}", other.type_str()),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::Table(t) => {
                    let mut sub = Reader::new(t, &format!("{prefix}[{i}]"), self.problems);
                    out.push(f(&mut sub));
                    sub.finish();
                }
                other => self.problem(
                    &format!("{key}[{i}]"),
                    format!("expected a table, found {}", other.type_str()),
                ),
            }
        }
        out
    }

    /// A sub-table, read by `f`; an absent table reads as empty.
    fn section<T>(&mut self, key: &str, f: impl FnOnce(&mut Reader<'_>) -> T) -> T {
        static EMPTY: std::sync::OnceLock<Table> = std::sync::OnceLock::new();
        let empty = EMPTY.get_or_init(Table::new);
        let prefix = self.key(key);
        let table = match self.get(key) {
            Some(Value::Table(t)) => t,
            None => empty,
            Some(other) => {
                self.problem(
                    key,
                    format!("expected a table [{prefix}], found {}", other.type_str()),
                );
                empty
            }
        };
        let mut sub = Reader::new(table, &prefix, self.problems);
        let out = f(&mut sub);
        sub.finish();
        out
    }

    fn finish(self) {
        let expected: Vec<&str> = self.seen.iter().map(String::as_str).collect();
        for key in self.table.keys() {
            if !self.seen.contains(key) {
                let full = if self.prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{}.{key}", self.prefix)
                };
                self.problems.push(Problem {
                    key: full,
                    message: format!("unknown key; expected one of: {}", expected.join(", ")),
                });
            }
        }
    }
}

/// Expands `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`.
pub fn expand_env(text: &str) -> Result<String, String> {
    expand_with(text, |name| std::env::var(name).ok())
}

fn expand_with(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in `{text}`"))?;
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{inner}}}` is not a variable reference (expected ${{NAME}} or ${{NAME:-default}})"
                ));
            }
            match (lookup(name), default) {
                (Some(v), None) => out.push_str(&v),
                (Some(v), Some(_)) if !v.is_empty() => out.push_str(&v),
                (_, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable `{name}` is not set (write ${{{name}:-default}} to give a default)"
                    ));
                }
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn parse_file(path: &Path) -> Result<Table, ConfigErrors> {
    let fail = |message: String| ConfigErrors {
        file: path.to_path_buf(),
        problems: vec![Problem {
            key: String::new(),
            message,
        }],
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read the file: {e}")))?;
    text.parse::<Table>()
        .map_err(|e| fail(format!("not valid TOML: {}", e.to_string().trim_end())))
}

fn check_identifier(r: &mut Reader<'_>, key: &str, value: &str, what: &str) {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !value.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        r.problem(
            key,
            format!("`{value}` is not a valid {what}: use lowercase letters, digits and _, at most 63 characters"),
        );
    }
}

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
    pub fn load(path: &Path) -> Result<ConnectorConfig, ConfigErrors> {
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
        check_identifier(&mut r, "name", &name, "connector name");
        let site = r
            .string("site", true, "the site name, e.g. \"PARIS\"")
            .unwrap_or_default();
        if !site.is_empty() {
            check_site_name(&mut r, "site", &site);
        }

        let default_slot = format!("sitesync_{name}");
        let database = r.section("database", |d| {
            let kind = match d.string("kind", true, DatabaseKind::NAMES).as_deref() {
                Some("postgres") | Some("postgresql") => Some(DatabaseKind::Postgres),
                Some("oracle") => Some(DatabaseKind::Oracle),
                Some("sqlserver") | Some("mssql") => Some(DatabaseKind::SqlServer),
                Some(other) => {
                    d.problem("kind", format!("`{other}` is not a supported database kind; expected one of: {}", DatabaseKind::NAMES));
                    None
                }
                None => None,
            };
            let url = d
                .string("url", true, "a database URL, e.g. \"postgres://user@host:5432/db\", or for SQL Server an ADO.NET string \"server=tcp:host,1433;database=db;user=u;password=${PASSWORD}\"")
                .unwrap_or_default();
            if kind == Some(DatabaseKind::Postgres) && !url.is_empty()
                && let Err(e) = validate_postgres_url(&url) {
                    d.problem("url", e);
                }
            if kind == Some(DatabaseKind::Oracle) && !url.is_empty()
                && let Err(e) = parse_oracle_url(&url) {
                    d.problem("url", e);
                }
            if kind == Some(DatabaseKind::SqlServer) && !url.is_empty()
                && let Err(e) = validate_sqlserver_url(&url) {
                    d.problem("url", e);
                }
            let outbox_table = d
                .string("outbox_table", false, "a table name, e.g. \"public.outbox\"")
                .unwrap_or_else(|| match kind {
                    // The connecting user's schema (see source::oracle).
                    Some(DatabaseKind::Oracle) => "OUTBOX".into(),
                    Some(DatabaseKind::SqlServer) => "dbo.outbox".into(),
                    _ => "public.outbox".into(),
                });
            for part in outbox_table.split('.') {
                if part.is_empty() || !part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    d.problem("outbox_table", format!("`{outbox_table}` is not a table name: expected [schema.]table with letters, digits and _"));
                    break;
                }
            }
            let slot = d.string("slot", false, "a replication slot name").unwrap_or_else(|| default_slot.clone());
            check_identifier(d, "slot", &slot, "replication slot name");
            let publication = d
                .string("publication", false, "a publication name")
                .unwrap_or_else(|| default_slot.clone());
            check_identifier(d, "publication", &publication, "publication name");
            let status_interval = d.millis("status_interval_ms", 1_000, 3_600_000);
            let mut oracle = OracleSettings::default();
            if kind == Some(DatabaseKind::Oracle) {
                // Empty (`${ORACLE_CLIENT_LIB_DIR:-}` unset): the system's path.
                oracle.client_lib_dir = d
                    .string("client_lib_dir", false, "the directory of the Oracle Instant Client libraries")
                    .filter(|s| !s.trim().is_empty())
                    .map(PathBuf::from);
                let scns = |d: &mut Reader<'_>, key: &str, default: u64| {
                    d.integer(key, 1..=1_000_000_000_000, "a number of SCNs")
                        .map(|n| n as u64)
                        .unwrap_or(default)
                };
                oracle.window_min_scn = scns(d, "window_min_scn", oracle.window_min_scn);
                oracle.window_max_scn = scns(d, "window_max_scn", oracle.window_max_scn);
                if oracle.window_max_scn < oracle.window_min_scn {
                    d.problem("window_max_scn", format!("{} is below window_min_scn ({})", oracle.window_max_scn, oracle.window_min_scn));
                }
                oracle.window_target_rows = d
                    .integer("window_target_rows", 1..=10_000_000, "a number of rows")
                    .map(|n| n as usize)
                    .unwrap_or(oracle.window_target_rows);
                oracle.poll_interval = d.millis("poll_interval_ms", 1_000, 3_600_000);
                oracle.max_buffered_mib = d
                    .integer("max_buffered_mib", 1..=1_048_576, "a size in MiB")
                    .map(|n| n as usize)
                    .unwrap_or(oracle.max_buffered_mib);
            }
            let sqlserver = if kind == Some(DatabaseKind::SqlServer) {
                sqlserver_settings(d)
            } else {
                SqlServerSettings::default()
            };
            kind.map(|kind| DatabaseConfig {
                kind,
                url,
                outbox_table,
                slot,
                publication,
                status_interval,
                oracle,
                sqlserver,
            })
        });

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
        let sink = r.section("sink", read_sink);
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
            (true, Some(database), Some(topology)) => Ok(ConnectorConfig {
                file: path.to_path_buf(),
                name,
                site,
                database,
                broker,
                checkpoint,
                retry,
                shutdown,
                sink,
                topology,
            }),
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
        r.finish();
        let topology = TopologyConfig {
            file: path.to_path_buf(),
            exchange,
            sites,
            site_queue_prefix,
            archive_queue,
            dead_letter_exchange,
            dead_letter_queue,
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

fn validate_postgres_url(url: &str) -> Result<(), String> {
    let cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("`{}` is not a PostgreSQL URL: {e}", redact_url(url)))?;
    if cfg.get_hosts().is_empty() {
        return Err(format!("`{}` names no host", redact_url(url)));
    }
    if cfg.get_dbname().is_none() {
        return Err(format!(
            "`{}` names no database (postgres://user@host:5432/DATABASE)",
            redact_url(url)
        ));
    }
    if cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err("sslmode=require is not supported yet: connect over a trusted network or a local socket, or use sslmode=disable".into());
    }
    Ok(())
}

/// The SQL Server keys of `[database]`; only read for `kind = "sqlserver"`,
/// so that they are unknown keys for the other engines.
fn sqlserver_settings(d: &mut Reader<'_>) -> SqlServerSettings {
    let defaults = SqlServerSettings::default();
    let encrypt = match d
        .string(
            "encrypt",
            false,
            "\"required\", \"strict\" or \"login_only\"",
        )
        .as_deref()
    {
        None | Some("required") | Some("true") => SqlServerEncrypt::Required,
        Some("strict") => SqlServerEncrypt::Strict,
        Some("login_only") => SqlServerEncrypt::LoginOnly,
        Some(other) => {
            d.problem("encrypt", format!("`{other}` is not an encryption mode; expected \"required\" (the default), \"strict\" (TDS 8.0) or \"login_only\""));
            SqlServerEncrypt::Required
        }
    };
    let trust_server_certificate = d.boolean("trust_server_certificate").unwrap_or(false);
    let ca_file = d
        .string(
            "ca_file",
            false,
            "the path of a CA certificate (PEM or DER)",
        )
        .map(PathBuf::from);
    if trust_server_certificate && ca_file.is_some() {
        d.problem("ca_file", "trust_server_certificate = true accepts any certificate: set one or the other, not both");
    }
    let poll_max = d.millis("poll_max_ms", defaults.poll_max.as_millis() as u64, 60_000);
    let max_downtime = d
        .integer("max_downtime_hours", 1..=24 * 365, "a number of hours")
        .map(|h| Duration::from_secs(h as u64 * 3600))
        .unwrap_or(defaults.max_downtime);
    let command_timeout = d.millis(
        "command_timeout_ms",
        defaults.command_timeout.as_millis() as u64,
        3_600_000,
    );
    let read_batch = d
        .integer("read_batch", 1..=1_000_000, "a number of rows")
        .map(|n| n as u32)
        .unwrap_or(defaults.read_batch);
    SqlServerSettings {
        encrypt,
        trust_server_certificate,
        ca_file,
        poll_max,
        max_downtime,
        command_timeout,
        read_batch,
    }
}

/// An ADO.NET connection string tiberius can parse, whose TLS settings are
/// left to the `[database]` keys (so that there is one place for them).
fn validate_sqlserver_url(url: &str) -> Result<(), String> {
    if url.contains("://") {
        return Err(format!(
            "`{}` is a URL; SQL Server connectors take an ADO.NET connection string, e.g. \"server=tcp:db.example,1433;database=sitesync;user=sitesync;password=${{MSSQL_PASSWORD}}\"",
            redact_url(url)
        ));
    }
    for part in url.split(';') {
        let key = part
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if matches!(
            key.as_str(),
            "encrypt" | "trustservercertificate" | "trustservercertificateca"
        ) {
            return Err(format!(
                "`{}` sets `{key}`: set database.encrypt, database.trust_server_certificate or database.ca_file instead",
                redact_url(url)
            ));
        }
    }
    tiberius::Config::from_ado_string(url)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "`{}` is not an ADO.NET connection string tiberius accepts: {e}",
                redact_url(url)
            )
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "USER" => Some("alice".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn env_expansion() {
        assert_eq!(expand_with("a ${USER} b", lookup).unwrap(), "a alice b");
        assert_eq!(expand_with("${NOPE:-dflt}", lookup).unwrap(), "dflt");
        assert_eq!(expand_with("${EMPTY:-dflt}", lookup).unwrap(), "dflt");
        assert_eq!(expand_with("${EMPTY}", lookup).unwrap(), "");
        assert_eq!(
            expand_with("cost $$5 and $x", lookup).unwrap(),
            "cost $5 and $x"
        );
        assert_eq!(expand_with("${NOPE:-}", lookup).unwrap(), "");
        let e = expand_with("x${NOPE}", lookup).unwrap_err();
        assert!(e.contains("`NOPE` is not set"), "{e}");
        assert!(
            expand_with("${USER", lookup)
                .unwrap_err()
                .contains("unterminated")
        );
        assert!(
            expand_with("${a b}", lookup)
                .unwrap_err()
                .contains("not a variable")
        );
    }

    #[test]
    fn a_sqlserver_connector_takes_an_ado_string_and_its_own_keys() {
        let dir = scratch("mssql");
        let topo = write(&dir, "topology.toml", "sites = [\"MADRID\"]\n");
        let load = |db: &str| {
            let path = write(
                &dir,
                "madrid.toml",
                &format!(
                    "site = \"MADRID\"\n[database]\n{db}\n[broker]\nurls = \"amqp://127.0.0.1:5672/%2f\"\ntopology = \"{}\"\n",
                    topo.display()
                ),
            );
            ConnectorConfig::load(&path)
        };
        let c = load("kind = \"mssql\"\nurl = \"server=tcp:db,1433;database=madrid;user=s;password=p\"\nca_file = \"/ca.pem\"\npoll_max_ms = 250\nmax_downtime_hours = 12").unwrap();
        assert_eq!(c.database.kind, DatabaseKind::SqlServer);
        assert_eq!(c.database.outbox_parts(), ("dbo", "outbox"));
        assert_eq!(c.database.sqlserver.encrypt, SqlServerEncrypt::Required);
        assert_eq!(c.database.sqlserver.poll_max, Duration::from_millis(250));
        assert_eq!(
            c.database.sqlserver.max_downtime,
            Duration::from_secs(12 * 3600)
        );
        assert_eq!(c.database.sqlserver.ca_file, Some(PathBuf::from("/ca.pem")));
        // TLS belongs to the keys, not the string; both trust settings at once is refused.
        let e = load("kind = \"sqlserver\"\nurl = \"server=tcp:db,1433;encrypt=false\"\ntrust_server_certificate = true\nca_file = \"/ca.pem\"\nencrypt = \"maybe\"").unwrap_err().to_string();
        assert!(
            e.contains("database.url") && e.contains("database.encrypt"),
            "{e}"
        );
        assert!(e.contains("database.ca_file"), "{e}");
        assert!(e.contains("`maybe` is not an encryption mode"), "{e}");
        // A PostgreSQL connector does not know the SQL Server keys.
        let e = load("kind = \"postgres\"\nurl = \"postgres://u@h:5432/db\"\npoll_max_ms = 5")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("poll_max_ms") && e.contains("unknown key"),
            "{e}"
        );
    }

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
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://u:p@h/db?x=@"),
            "postgres://u:***@h/db?x=@"
        );
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sitesync-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_complete_connector_loads_with_defaults() {
        let dir = scratch("ok");
        let topo = write(&dir, "topology.toml", "sites = [\"PARIS\", \"LONDON\"]\n");
        let path = write(
            &dir,
            "paris.toml",
            &format!(
                "site = \"PARIS\"\n[database]\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:5432/paris\"\n[broker]\nurls = \"amqp://127.0.0.1:5672/%2f\"\ntopology = \"{}\"\n",
                topo.display()
            ),
        );
        let c = ConnectorConfig::load(&path).unwrap();
        assert_eq!(c.name, "paris");
        assert_eq!(c.database.slot, "sitesync_paris");
        assert_eq!(c.database.publication, "sitesync_paris");
        assert_eq!(c.database.outbox_parts(), ("public", "outbox"));
        assert_eq!(c.broker.publisher_window, DEFAULT_PUBLISHER_WINDOW);
        assert_eq!(c.checkpoint.dir, PathBuf::from("checkpoints/paris"));
        assert_eq!(c.topology.exchange, "sitesync.events");
        assert_eq!(
            c.topology.bound_queues(),
            vec!["SITE_PARIS", "SITE_LONDON", "SITE_PARIS_HISTO"]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_with_file_and_key() {
        let dir = scratch("bad");
        let topo = write(&dir, "topology.toml", "sites = [\"PARIS\"]\n");
        let path = write(
            &dir,
            "bad.toml",
            &format!(
                "site = \"PARIS\"\ncolour = \"blue\"\n[database]\nkind = \"postgres\"\nurl = \"${{SITESYNC_TEST_SURELY_UNSET_VAR}}\"\nslot = \"Bad-Slot\"\n[broker]\nurls = [\"http://x\", 5]\npublisher_window = 0\ntopology = \"{}\"\n",
                topo.display()
            ),
        );
        let err = ConnectorConfig::load(&path).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "colour",
            "database.url",
            "database.slot",
            "broker.urls[0]",
            "broker.urls[1]",
            "broker.publisher_window",
        ] {
            assert!(keys.contains(&key), "missing {key} in {keys:?}");
        }
        let text = err.to_string();
        assert!(text.contains("bad.toml"), "{text}");
        assert!(text.contains("key `colour`: unknown key"), "{text}");
        assert!(text.contains("SITESYNC_TEST_SURELY_UNSET_VAR"), "{text}");
    }

    #[test]
    fn an_oracle_connector_with_its_keys() {
        let dir = scratch("oracle");
        let topo = write(&dir, "topology.toml", "sites = [\"MADRID\"]\n");
        let path = write(
            &dir,
            "madrid.toml",
            &format!(
                "site = \"MADRID\"\n[database]\nkind = \"oracle\"\nurl = \"oracle://sitesync:p%40ss@db.example:1522/FREEPDB1\"\nclient_lib_dir = \"/opt/oracle/instantclient_23_6\"\nwindow_max_scn = 50000\nmax_buffered_mib = 64\n[broker]\nurls = \"amqp://h\"\ntopology = \"{}\"\n",
                topo.display()
            ),
        );
        let c = ConnectorConfig::load(&path).unwrap();
        assert_eq!(c.database.kind, DatabaseKind::Oracle);
        assert_eq!(c.database.outbox_table, "OUTBOX");
        assert_eq!(c.database.oracle.window_max_scn, 50_000);
        assert_eq!(c.database.oracle.max_buffered_mib, 64);
        assert_eq!(
            c.database.oracle.client_lib_dir,
            Some(PathBuf::from("/opt/oracle/instantclient_23_6"))
        );
        assert_eq!(
            parse_oracle_url(&c.database.url).unwrap(),
            OracleUrl {
                user: "sitesync".into(),
                password: "p@ss".into(),
                connect_string: "//db.example:1522/FREEPDB1".into(),
            }
        );
        assert_eq!(
            parse_oracle_url("oracle://u:p@h/S").unwrap().connect_string,
            "//h:1521/S"
        );
        for bad in [
            "postgres://u@h/db",
            "oracle://h:1521/S",
            "oracle://u:p@h:x/S",
            "oracle://u:p@h",
        ] {
            assert!(parse_oracle_url(bad).is_err(), "{bad}");
        }
        // The shipped example loads (its password, from the environment,
        // filled in here; its topology, relative, pointed at ours).
        let shipped = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/connectors/madrid-oracle.toml"
        ))
        .unwrap()
        .replace("${MADRID_ORACLE_PASSWORD}", "secret")
        .replace(
            "${SITESYNC_TOPOLOGY:-config/topology.toml}",
            &topo.display().to_string(),
        );
        let c = ConnectorConfig::load(&write(&dir, "madrid-oracle.toml", &shipped)).unwrap();
        assert_eq!(c.database.kind, DatabaseKind::Oracle);
        assert_eq!(c.database.oracle.client_lib_dir, None);
        assert_eq!(c.sink.routes.len(), 3);
        // Oracle keys are unknown to a PostgreSQL connector.
        let pg = write(
            &dir,
            "pg.toml",
            &format!(
                "site = \"MADRID\"\n[database]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\nclient_lib_dir = \"/x\"\n[broker]\nurls = \"amqp://h\"\ntopology = \"{}\"\n",
                topo.display()
            ),
        );
        let err = ConnectorConfig::load(&pg).unwrap_err();
        assert_eq!(err.problems[0].key, "database.client_lib_dir", "{err}");
    }

    #[test]
    fn the_site_must_be_in_the_topology() {
        let dir = scratch("site");
        let topo = write(&dir, "topology.toml", "sites = [\"LONDON\"]\n");
        let path = write(
            &dir,
            "p.toml",
            &format!(
                "site = \"PARIS\"\n[database]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\n[broker]\nurls = \"amqp://h\"\ntopology = \"{}\"\n",
                topo.display()
            ),
        );
        let err = ConnectorConfig::load(&path).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "site");
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

    #[test]
    fn unreadable_and_invalid_files() {
        let err = ConnectorConfig::load(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(err.to_string().contains("cannot read the file"));
        let dir = scratch("syntax");
        let p = write(&dir, "s.toml", "site = \n");
        assert!(
            ConnectorConfig::load(&p)
                .unwrap_err()
                .to_string()
                .contains("not valid TOML")
        );
    }
}
