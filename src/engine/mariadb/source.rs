//! The MariaDB source: the binary log read over the replication protocol
//! ([`super::binlog`]), `sitesync init` and `sitesync check`.
//!
//! # Where a stream starts
//!
//! At the checkpoint's position when there is one: by GTID where the
//! position has one, else by binlog file and offset, skipping the rows of
//! its transaction already done ([`super::position`]). With no checkpoint,
//! at the oldest binlog file the server still has: every outbox row the
//! binlog holds is published (the other sites' inboxes drop what they
//! already have), so rows written between `init` and the first run are not
//! lost. MariaDB keeps no record of a reader's progress: the checkpoint is
//! the only one, and the binlog is released by time
//! (`binlog_expire_logs_seconds`), not by readers; a checkpoint older than
//! that is refused with the GTID or file it names.
//!
//! # Heartbeats
//!
//! Every transaction without outbox rows, and every server heartbeat,
//! moves the position. They are passed on at most once a second
//! ([`HEARTBEAT_EVERY`]): the checkpoint follows an idle or busy-elsewhere
//! log without one checkpoint per foreign transaction.

use super::binlog::{self, BinlogReader, OutboxTable, ReaderOptions};
use super::conn::{self, Account, literal, quote_table};
use super::position::Position;
use super::settings::Settings;
use super::target::outbox_ddl;
use crate::checks::Check;
use crate::config::{ConnectorConfig, redact_url};
use crate::error::{Cause, SourceError};
use crate::source::{Change, ChangeStream, LogBounds, Source};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Row};
use std::time::{Duration, Instant};

/// How often an idle server sends a heartbeat on the binlog stream.
pub const SERVER_HEARTBEAT: Duration = Duration::from_secs(1);

/// At most one heartbeat a second goes to the runner.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// The binlog retention below which `check` warns (three days: a weekend
/// of downtime).
pub const RETENTION_WARN: Duration = Duration::from_secs(3 * 24 * 3600);

/// A MariaDB (or MySQL) database whose binlog sitesync reads.
pub struct MariaDbSource {
    cfg: Settings,
    site: String,
    opts: Opts,
    account: Account,
    outbox: OutboxTable,
}

impl MariaDbSource {
    pub fn new(connector: &ConnectorConfig, db: &Settings) -> Result<MariaDbSource, SourceError> {
        let opts = conn::opts(db)?;
        let account = Account::of(&opts);
        let (database, table) = db.outbox_parts();
        let outbox = OutboxTable {
            database: database.unwrap_or(&account.database).to_string(),
            table: table.to_string(),
        };
        Ok(MariaDbSource {
            cfg: db.clone(),
            site: connector.site.clone(),
            opts,
            account,
            outbox,
        })
    }

    async fn connect(&self) -> Result<Conn, SourceError> {
        Conn::new(self.opts.clone())
            .await
            .map_err(|e| conn::classify("connecting", &self.account, &e))
    }

    /// `` `db`.`outbox` ``.
    fn outbox_name(&self) -> String {
        quote_table(&format!("{}.{}", self.outbox.database, self.outbox.table))
    }
}

/// The server settings `check` reads, in one query.
pub const SETTINGS_SQL: &str = "SELECT VERSION(), @@log_bin, @@binlog_format, @@binlog_row_image, \
     @@binlog_row_metadata, @@server_id, @@gtid_binlog_pos, @@binlog_expire_logs_seconds";

/// What [`SETTINGS_SQL`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerState {
    pub version: String,
    pub log_bin: bool,
    pub binlog_format: String,
    pub row_image: String,
    pub row_metadata: String,
    pub server_id: u32,
    pub gtid_pos: String,
    /// 0: never expire.
    pub expire_seconds: u64,
}

impl ServerState {
    fn from_row(row: &Row) -> ServerState {
        let text = |i: usize| -> String {
            row.get_opt::<String, _>(i)
                .and_then(Result::ok)
                .unwrap_or_default()
        };
        let number = |i: usize| text(i).parse::<u64>().unwrap_or(0);
        ServerState {
            version: text(0),
            log_bin: number(1) == 1,
            binlog_format: text(2),
            row_image: text(3),
            row_metadata: text(4),
            server_id: number(5) as u32,
            gtid_pos: text(6),
            expire_seconds: number(7),
        }
    }
}

/// The checks of the server's settings, each with its fix.
pub fn server_checks(s: &ServerState, ours: u32, replicas: Option<&[u32]>) -> Vec<Check> {
    let mut checks = vec![if s.version.contains("MariaDB") {
        Check::pass("server", format!("MariaDB {}", s.version))
    } else {
        Check::fail(
            "server",
            format!(
                "{} is not MariaDB: reading MySQL's binlog (its GTID sets) is not built yet",
                s.version
            ),
            "use MariaDB 10.5 or newer",
        )
    }];
    let setting = |name: &str, is: &str, want: &str, fix: &str| {
        if is.eq_ignore_ascii_case(want) {
            Check::pass(name, format!("{name} = {is}"))
        } else {
            Check::fail(
                name,
                format!("{name} is {is}, the binlog source needs {want}"),
                fix.to_string(),
            )
        }
    };
    checks.push(if s.log_bin {
        Check::pass("log_bin", "the binary log is on")
    } else {
        Check::fail(
            "log_bin",
            "the server writes no binary log",
            "start mariadbd with --log-bin (and --binlog-format=ROW --binlog-row-image=FULL --binlog-row-metadata=FULL)",
        )
    });
    checks.push(setting(
        "binlog_format",
        &s.binlog_format,
        "ROW",
        "SET GLOBAL binlog_format = 'ROW'; and binlog_format=ROW under [mariadbd] in the server's configuration",
    ));
    checks.push(setting(
        "binlog_row_image",
        &s.row_image,
        "FULL",
        "SET GLOBAL binlog_row_image = 'FULL'; and in the server's configuration",
    ));
    checks.push(setting(
        "binlog_row_metadata",
        &s.row_metadata,
        "FULL",
        "SET GLOBAL binlog_row_metadata = 'FULL'; and in the server's configuration (the source reads column names from it)",
    ));
    checks.push(if s.gtid_pos.is_empty() {
        Check::pass(
            "gtid",
            "no transaction has a GTID yet (positions fall back to binlog file and offset)",
        )
    } else {
        Check::pass("gtid", format!("@@gtid_binlog_pos = {}", s.gtid_pos))
    });
    checks.push(if s.server_id == ours {
        Check::fail(
            "server id",
            format!("database.server_id {ours} is the server's own @@server_id"),
            "set database.server_id to a number no server or replica uses",
        )
    } else if replicas.is_some_and(|r| r.contains(&ours)) {
        Check::fail(
            "server id",
            format!("a replica of this server already registered server id {ours}: the server would end one of the two streams"),
            "set database.server_id to a number no server or replica uses",
        )
    } else {
        match replicas {
            Some(r) => Check::pass(
                "server id",
                format!("{ours}: not the server's ({}), nor any of its {} replica(s)", s.server_id, r.len()),
            ),
            None => Check::warn(
                "server id",
                format!("{ours} is not the server's ({}); its replicas could not be listed (SHOW SLAVE HOSTS needs REPLICATION MASTER ADMIN)", s.server_id),
                "make sure no replica uses this server id",
            ),
        }
    });
    let days = |secs: u64| secs as f64 / 86_400.0;
    checks.push(if s.expire_seconds == 0 {
        Check::pass(
            "binlog retention",
            "binlog_expire_logs_seconds = 0: binlogs are kept until purged by hand",
        )
    } else if Duration::from_secs(s.expire_seconds) < RETENTION_WARN {
        Check::warn(
            "binlog retention",
            format!(
                "binlogs expire after {:.1} days: a sidecar stopped longer than that loses its place (the checkpoint's GTID is purged) and this site needs a resync",
                days(s.expire_seconds)
            ),
            format!(
                "SET GLOBAL binlog_expire_logs_seconds = {}; (and in the server's configuration)",
                RETENTION_WARN.as_secs()
            ),
        )
    } else {
        Check::pass(
            "binlog retention",
            format!(
                "binlogs expire after {:.1} days: a sidecar may be stopped that long",
                days(s.expire_seconds)
            ),
        )
    });
    checks
}

/// The privileges the source needs, from `SHOW GRANTS` lines.
pub fn grant_checks(grants: &[String], account: &Account) -> Vec<Check> {
    let all = grants.iter().any(|g| g.contains("ALL PRIVILEGES ON *.*"));
    let has = |names: &[&str]| all || names.iter().any(|n| grants.iter().any(|g| g.contains(n)));
    let mut missing = Vec::new();
    if !has(&["REPLICATION SLAVE", "REPLICATION REPLICA"]) {
        missing.push("REPLICATION SLAVE");
    }
    if !has(&["BINLOG MONITOR", "REPLICATION CLIENT", "SUPER"]) {
        missing.push("BINLOG MONITOR");
    }
    if missing.is_empty() {
        vec![Check::pass(
            "grants",
            format!(
                "{} may read the binlog (REPLICATION SLAVE, BINLOG MONITOR)",
                account.user
            ),
        )]
    } else {
        vec![Check::fail(
            "grants",
            format!("{} lacks {}", account.user, missing.join(", ")),
            format!(
                "GRANT {} ON *.* TO {}@'<its host>'; (MySQL: REPLICATION CLIENT for BINLOG MONITOR)",
                missing.join(", "),
                literal(&account.user)
            ),
        )]
    }
}

/// The outbox's columns as `(name, extra, character set)`.
pub const OUTBOX_COLUMNS_SQL: &str = "SELECT COLUMN_NAME, EXTRA, IFNULL(CHARACTER_SET_NAME, '') FROM information_schema.COLUMNS \
     WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION";

/// The outbox's checks from its columns: there, ordered, text in utf8mb4.
pub fn outbox_checks(columns: &[(String, String, String)], outbox: &str) -> Vec<Check> {
    if columns.is_empty() {
        return vec![Check::fail(
            "outbox table",
            format!("{outbox} does not exist"),
            "run `sitesync init`",
        )];
    }
    let mut checks = Vec::new();
    let has = |name: &str| {
        columns
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
    };
    let missing: Vec<&str> = [
        "id",
        "created_at",
        "origin",
        "type",
        "entity_key",
        "data",
        "ord",
    ]
    .into_iter()
    .filter(|c| has(c).is_none())
    .collect();
    checks.push(if missing.is_empty() {
        Check::pass("outbox table", format!("{outbox} has its columns"))
    } else {
        Check::fail(
            "outbox table",
            format!("{outbox} lacks {}", missing.join(", ")),
            "drop and recreate it with `sitesync init` once empty, or add the columns as `sitesync init` creates them",
        )
    });
    if let Some((_, extra, _)) = has("ord")
        && !extra.to_ascii_lowercase().contains("auto_increment")
    {
        checks.push(Check::fail(
            "outbox order",
            format!("{outbox}.ord is not AUTO_INCREMENT: it must number the rows in the order they are written"),
            format!("ALTER TABLE {outbox} MODIFY ord bigint NOT NULL AUTO_INCREMENT"),
        ));
    }
    let latin: Vec<&str> = columns
        .iter()
        .filter(|(n, _, cs)| !cs.is_empty() && cs != "utf8mb4" && cs != "ascii" && n != "id")
        .map(|(n, _, _)| n.as_str())
        .collect();
    if !latin.is_empty() {
        checks.push(Check::fail(
            "outbox character set",
            format!("{outbox} columns {} are not utf8mb4: the binlog source reads text as UTF-8, and their rows would go to the dead-letter queue", latin.join(", ")),
            format!("ALTER TABLE {outbox} CONVERT TO CHARACTER SET utf8mb4"),
        ));
    }
    checks
}

impl MariaDbSource {
    async fn outbox_columns(
        &self,
        c: &mut Conn,
    ) -> Result<Vec<(String, String, String)>, SourceError> {
        c.exec(
            OUTBOX_COLUMNS_SQL,
            (self.outbox.database.as_str(), self.outbox.table.as_str()),
        )
        .await
        .map_err(|e| conn::classify("reading the outbox's columns", &self.account, &e))
    }
}

impl Source for MariaDbSource {
    type Position = Position;
    type Stream = MariaDbStream;

    async fn preflight(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        let mut c = match self.connect().await {
            Ok(c) => {
                checks.push(Check::pass("connection", redact_url(&self.cfg.url)));
                c
            }
            Err(e) => {
                checks.push(Check::fail(
                    "connection",
                    e.message(),
                    "check database.url, that the server listens on TCP and that the login exists",
                ));
                return checks;
            }
        };
        match c.query_first::<Row, _>(SETTINGS_SQL).await {
            Ok(Some(row)) => {
                let state = ServerState::from_row(&row);
                let replicas: Option<Vec<u32>> = c
                    .query::<Row, _>("SHOW SLAVE HOSTS")
                    .await
                    .ok()
                    .map(|rows| rows.iter().filter_map(|r| r.get::<u32, _>(0)).collect());
                checks.extend(server_checks(
                    &state,
                    self.cfg.server_id,
                    replicas.as_deref(),
                ));
            }
            Ok(None) => {}
            Err(e) => checks.push(Check::fail(
                "server settings",
                conn::describe(&e),
                "see the message",
            )),
        }
        match c.query::<String, _>("SHOW GRANTS").await {
            Ok(grants) => checks.extend(grant_checks(&grants, &self.account)),
            Err(e) => checks.push(Check::fail("grants", conn::describe(&e), "see the message")),
        }
        match self.outbox_columns(&mut c).await {
            Ok(columns) => checks.extend(outbox_checks(&columns, &self.outbox_name())),
            Err(e) => checks.push(Check::fail("outbox table", e.message(), "see the message")),
        }
        let _ = c.disconnect().await;
        checks
    }

    async fn init(&self) -> Result<Vec<String>, SourceError> {
        let mut c = self.connect().await?;
        let outbox = self.outbox_name();
        let before = self.outbox_columns(&mut c).await?;
        let mut done = Vec::new();
        if before.is_empty() {
            c.query_drop(outbox_ddl(
                &format!("{}.{}", self.outbox.database, self.outbox.table),
                &self.site,
            ))
            .await
            .map_err(|e| conn::classify("creating the outbox table", &self.account, &e))?;
            done.push(format!(
                "outbox table {outbox}: created (ordered by its AUTO_INCREMENT ord, utf8mb4)"
            ));
        } else {
            done.push(format!("outbox table {outbox}: already there"));
            let problems: Vec<Check> = outbox_checks(&before, &outbox)
                .into_iter()
                .filter(|c| c.status == crate::checks::Status::Fail)
                .collect();
            if let Some(p) = problems.first() {
                return Err(SourceError::operator(
                    Cause::NotInitialised,
                    format!("{}: {}", p.detail, p.fix.clone().unwrap_or_default()),
                ));
            }
        }
        let _ = c.disconnect().await;
        Ok(done)
    }

    async fn open(&self, resume: Option<&Position>) -> Result<MariaDbStream, SourceError> {
        let from = match resume {
            Some(p) => p.clone(),
            None => {
                let mut c = self.connect().await?;
                let oldest = binlog::oldest_position(&mut c).await;
                let _ = c.disconnect().await;
                oldest?
            }
        };
        let reader = BinlogReader::open(
            self.opts.clone(),
            &ReaderOptions {
                server_id: self.cfg.server_id,
                heartbeat: SERVER_HEARTBEAT,
            },
            self.outbox.clone(),
            &from,
        )
        .await?;
        Ok(MariaDbStream {
            reader,
            last_heartbeat: None,
        })
    }

    async fn bounds(&self) -> Result<LogBounds<Position>, SourceError> {
        let mut c = self.connect().await?;
        let oldest = binlog::oldest_position(&mut c).await?;
        let latest = binlog::current_position(&mut c).await?;
        let _ = c.disconnect().await;
        Ok(LogBounds {
            detail: format!(
                "binlog from {} (its oldest file) to {latest}",
                oldest.file.name()
            ),
            oldest: Some(oldest),
            latest,
            oldest_note: "the oldest binlog file the server still has: older ones were purged (binlog_expire_logs_seconds, or PURGE BINARY LOGS), so events confirmed before it can only come back from the archive queue".into(),
        })
    }

    async fn probe(&self) -> Result<(), SourceError> {
        let mut c = self.connect().await?;
        c.query_drop("SELECT 1")
            .await
            .map_err(|e| conn::classify("probing the server", &self.account, &e))?;
        let _ = c.disconnect().await;
        Ok(())
    }

    async fn advance_to_latest(&self) -> Result<Position, SourceError> {
        // The server keeps no record of our progress: the latest position
        // is the checkpoint's to hold.
        let mut c = self.connect().await?;
        let latest = binlog::current_position(&mut c).await;
        let _ = c.disconnect().await;
        latest
    }
}

/// An open binlog stream.
pub struct MariaDbStream {
    reader: BinlogReader,
    last_heartbeat: Option<Instant>,
}

impl ChangeStream for MariaDbStream {
    type Position = Position;

    async fn next(&mut self) -> Result<Change<Position>, SourceError> {
        loop {
            let change = self.reader.next().await?;
            if let Change::Heartbeat { .. } = change {
                if self
                    .last_heartbeat
                    .is_some_and(|at| at.elapsed() < HEARTBEAT_EVERY)
                {
                    continue;
                }
                self.last_heartbeat = Some(Instant::now());
            }
            return Ok(change);
        }
    }

    fn durable(&mut self, _resume: &Position) {
        // The binlog is released by time, whoever has read it.
    }

    async fn close(self) {
        self.reader.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::Status;

    fn state() -> ServerState {
        ServerState {
            version: "10.11.6-MariaDB-0+deb12u1-log".into(),
            log_bin: true,
            binlog_format: "ROW".into(),
            row_image: "FULL".into(),
            row_metadata: "FULL".into(),
            server_id: 1,
            gtid_pos: "0-1-42".into(),
            expire_seconds: 0,
        }
    }

    fn failing(checks: &[Check]) -> Vec<String> {
        checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.name.clone())
            .collect()
    }

    #[test]
    fn check_names_each_server_setting_the_binlog_source_needs_with_its_fix() {
        assert!(failing(&server_checks(&state(), 1_000_000_007, Some(&[2, 3]))).is_empty());
        let bare = ServerState {
            log_bin: false,
            binlog_format: "MIXED".into(),
            row_image: "MINIMAL".into(),
            row_metadata: "NO_LOG".into(),
            ..state()
        };
        let checks = server_checks(&bare, 7, None);
        assert_eq!(
            failing(&checks),
            [
                "log_bin",
                "binlog_format",
                "binlog_row_image",
                "binlog_row_metadata"
            ]
        );
        let format = checks.iter().find(|c| c.name == "binlog_format").unwrap();
        assert!(format.detail.contains("MIXED"), "{}", format.detail);
        assert!(
            format
                .fix
                .as_deref()
                .unwrap()
                .contains("SET GLOBAL binlog_format = 'ROW'")
        );
        // Replicas not listable: a warning, not a failure.
        let id = checks.iter().find(|c| c.name == "server id").unwrap();
        assert_eq!(id.status, Status::Warn);
        // MySQL is refused by name.
        let mysql = ServerState {
            version: "8.0.36".into(),
            ..state()
        };
        assert_eq!(failing(&server_checks(&mysql, 7, Some(&[]))), ["server"]);
    }

    #[test]
    fn check_refuses_a_server_id_the_server_or_a_replica_uses() {
        let own = server_checks(&state(), 1, Some(&[]));
        assert_eq!(failing(&own), ["server id"]);
        let replica = server_checks(&state(), 3, Some(&[2, 3]));
        let c = replica.iter().find(|c| c.name == "server id").unwrap();
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("replica"), "{}", c.detail);
    }

    #[test]
    fn check_warns_when_binlogs_expire_before_a_long_weekend() {
        let short = ServerState {
            expire_seconds: 86_400,
            ..state()
        };
        let checks = server_checks(&short, 7, Some(&[]));
        let r = checks
            .iter()
            .find(|c| c.name == "binlog retention")
            .unwrap();
        assert_eq!(r.status, Status::Warn);
        assert!(r.detail.contains("1.0 days"), "{}", r.detail);
        assert!(
            r.fix
                .as_deref()
                .unwrap()
                .contains("binlog_expire_logs_seconds = 259200")
        );
        let long = ServerState {
            expire_seconds: 30 * 86_400,
            ..state()
        };
        let r = server_checks(&long, 7, Some(&[]));
        assert!(failing(&r).is_empty());
    }

    #[test]
    fn grants_name_what_is_missing_and_the_grant_to_run() {
        let account = Account {
            user: "sitesync".into(),
            database: "london".into(),
        };
        let ok = grant_checks(
            &["GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO `sitesync`@`%`".into()],
            &account,
        );
        assert_eq!(ok[0].status, Status::Pass);
        let none = grant_checks(&["GRANT USAGE ON *.* TO `sitesync`@`%`".into()], &account);
        assert_eq!(none[0].status, Status::Fail);
        assert_eq!(
            none[0].fix.as_deref().unwrap(),
            "GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO 'sitesync'@'<its host>'; (MySQL: REPLICATION CLIENT for BINLOG MONITOR)"
        );
        let root = grant_checks(
            &["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION".into()],
            &account,
        );
        assert_eq!(root[0].status, Status::Pass);
    }

    #[test]
    fn check_fails_an_outbox_without_its_order_or_in_another_character_set() {
        let col =
            |n: &str, extra: &str, cs: &str| (n.to_string(), extra.to_string(), cs.to_string());
        let good = vec![
            col("ord", "auto_increment", ""),
            col("id", "", "ascii"),
            col("created_at", "", ""),
            col("origin", "", "utf8mb4"),
            col("type", "", "utf8mb4"),
            col("entity_key", "", "utf8mb4"),
            col("data", "", "utf8mb4"),
        ];
        assert!(failing(&outbox_checks(&good, "`london`.`outbox`")).is_empty());
        assert_eq!(
            failing(&outbox_checks(&[], "`london`.`outbox`")),
            ["outbox table"]
        );
        let mut unordered = good.clone();
        unordered.retain(|(n, _, _)| n != "ord");
        let checks = outbox_checks(&unordered, "`london`.`outbox`");
        assert!(
            checks[0].detail.contains("lacks ord"),
            "{}",
            checks[0].detail
        );
        let mut plain = good.clone();
        plain[0] = col("ord", "", "");
        let checks = outbox_checks(&plain, "`london`.`outbox`");
        assert_eq!(failing(&checks), ["outbox order"]);
        let mut latin = good;
        latin[6] = col("data", "", "latin1");
        let checks = outbox_checks(&latin, "`london`.`outbox`");
        let cs = checks
            .iter()
            .find(|c| c.name == "outbox character set")
            .unwrap();
        assert!(cs.detail.contains("data"), "{}", cs.detail);
        assert_eq!(
            cs.fix.as_deref().unwrap(),
            "ALTER TABLE `london`.`outbox` CONVERT TO CHARACTER SET utf8mb4"
        );
    }
}
