//! The database engines, and the one list of them.
//!
//! Each folder holds everything about one engine: its `[database]`
//! settings, its connection, its change-log source, its sink dialect, its
//! positions and what `sitesync status` reads. What an engine folder gives
//! the rest of sitesync is a [`Driver`]; the `engines!` list below is the
//! only place that names them. See `docs/ARCHITECTURE.md`, "Adding an
//! engine".

pub mod mariadb;
pub mod oracle;
pub mod postgres;
pub mod sqlserver;

use crate::config::{ArchiveConfig, ConfigErrors, ConnectorConfig, Reader};
use crate::error::{SourceError, TargetError};
use crate::sink::batch::Dialect;
use crate::source::Source;
use crate::status::SiteStatus;
use std::fmt::Debug;
use std::future::Future;
use std::path::Path;

/// Log directives that keep the engines' drivers quiet by default (the
/// command line's log filter adds them).
pub const QUIET_LOGS: &str = "tokio_postgres=warn";

/// What an engine folder provides.
pub trait Driver: 'static {
    /// The engine's name in connector files (`[database] kind`) and in its
    /// positions' text (`postgres:0/16B3748`).
    const NAME: &'static str;
    /// Other names `kind` accepts for it.
    const ALIASES: &'static [&'static str] = &[];

    /// The `[database]` keys of this engine.
    type Settings: Clone + Debug + Send + Sync + 'static;
    /// Its change log.
    type Source: Source + 'static;
    /// Its side of the sink.
    type Target: Dialect;
    /// Its archive table (`src/engine/<name>/archive.rs`).
    type Archive: crate::archive::Store;

    /// Reads the `[database]` keys (all but `kind`); the problems go to `d`,
    /// and a key the engine does not know is reported as unknown.
    fn settings(d: &mut Reader<'_>, connector: &str) -> Self::Settings;

    fn source(cfg: &ConnectorConfig, db: &Self::Settings) -> Result<Self::Source, SourceError>;

    fn target(cfg: &ConnectorConfig, db: &Self::Settings) -> Result<Self::Target, TargetError>;

    /// Its capture triggers (`crate::capture`): `sitesync capture`.
    type Capture: crate::capture::Capture;

    fn capture(cfg: &ConnectorConfig, db: &Self::Settings) -> Result<Self::Capture, TargetError>;

    /// Its resync (`crate::resync`): the snapshot and the jobs' rows.
    type Resync: crate::resync::Resync;

    fn resync(cfg: &ConnectorConfig, db: &Self::Settings) -> Result<Self::Resync, TargetError>;

    /// The archive table of a connector with an `[archive]` section.
    fn archive(
        cfg: &ConnectorConfig,
        db: &Self::Settings,
        archive: &ArchiveConfig,
    ) -> Result<Self::Archive, TargetError>;

    /// Its `sitesync_jobs` table (`src/engine/<name>/jobs.rs`).
    type Jobs: crate::jobs::JobLog;

    /// The job log of this site's database.
    fn jobs(cfg: &ConnectorConfig, db: &Self::Settings) -> Result<Self::Jobs, TargetError>;

    /// Its `sitesync_audit` table (`src/engine/<name>/audit.rs`).
    type Audit: crate::audit::AuditLog;

    /// The audit trail of this site's database: who did which manual
    /// action, and how it ended.
    fn audit(cfg: &ConnectorConfig, db: &Self::Settings) -> Result<Self::Audit, TargetError>;

    /// Its purge of the archive, the inbox and reviewed conflicts
    /// (`src/engine/<name>/purge.rs`).
    type Purge: crate::purge::Tables;

    /// The purgeable tables of this site's database.
    fn purge(cfg: &ConnectorConfig, db: &Self::Settings) -> Result<Self::Purge, TargetError>;

    /// What `sitesync status` reads from this site's database.
    fn status(
        cfg: &ConnectorConfig,
        db: &Self::Settings,
    ) -> impl Future<Output = Result<SiteStatus, SourceError>> + Send;
}

/// Something to do with a connector whatever its engine: [`Engine::run`]
/// calls it with the engine's [`Driver`].
pub trait Task {
    type Output;

    fn run<D: Driver>(self, db: &D::Settings) -> impl Future<Output = Self::Output>;
}

/// The one list of engines: for each, its variant of [`Engine`] and its
/// [`Driver`]. Adding an engine adds one line here.
macro_rules! engines {
    ($($variant:ident => $driver:ty),+ $(,)?) => {
        /// A connector's database: its engine, with that engine's settings.
        #[derive(Debug, Clone)]
        pub enum Engine {
            $($variant(<$driver as Driver>::Settings)),+
        }

        impl Engine {
            /// The `kind` of each engine, in the list's order.
            pub const NAMES: &'static [&'static str] = &[$(<$driver as Driver>::NAME),+];

            /// The engine's name (`postgres`).
            pub fn name(&self) -> &'static str {
                match self {
                    $(Engine::$variant(_) => <$driver as Driver>::NAME),+
                }
            }

            /// Runs `task` with this engine's driver.
            pub async fn run<T: Task>(&self, task: T) -> T::Output {
                match self {
                    $(Engine::$variant(db) => task.run::<$driver>(db).await),+
                }
            }

            /// The settings of the engine that `kind` names; `None` when no
            /// engine has that name.
            fn settings(kind: &str, d: &mut Reader<'_>, connector: &str) -> Option<Engine> {
                $(
                    if kind == <$driver as Driver>::NAME
                        || <$driver as Driver>::ALIASES.contains(&kind)
                    {
                        return Some(Engine::$variant(<$driver as Driver>::settings(d, connector)));
                    }
                )+
                None
            }
        }
    };
}

engines! {
    Postgres => postgres::Postgres,
    SqlServer => sqlserver::SqlServer,
    Oracle => oracle::Oracle,
    MariaDb => mariadb::MariaDb,
}

impl Engine {
    /// Reads `[database]`: `kind` picks the engine, which reads the rest.
    pub fn read(d: &mut Reader<'_>, connector: &str) -> Option<Engine> {
        let names = Engine::NAMES.join(", ");
        let Some(kind) = d.string("kind", true, &names) else {
            // Which keys are right depends on the kind: name only it.
            d.skip_rest();
            return None;
        };
        let engine = Engine::settings(&kind, d, connector);
        if engine.is_none() {
            d.problem(
                "kind",
                format!("`{kind}` is not a supported database kind; expected one of: {names}"),
            );
            d.skip_rest();
        }
        engine
    }
}

/// A connector file, loaded: the engine-free settings and the engine's.
#[derive(Debug, Clone)]
pub struct Connector {
    pub config: ConnectorConfig,
    pub engine: Engine,
}

impl Connector {
    /// Loads and validates a connector file, the topology file it names
    /// and its engine's keys; every problem is reported at once.
    pub fn load(path: &Path) -> Result<Connector, ConfigErrors> {
        let (config, engine) = ConnectorConfig::load_with(path, Engine::read)?;
        Ok(Connector { config, engine })
    }
}

/// `url`, required, checked by the engine's `validate`; `example` shows its
/// form.
pub(crate) fn read_url(
    d: &mut Reader<'_>,
    example: &str,
    validate: impl FnOnce(&str) -> Result<(), String>,
) -> String {
    let url = d
        .string("url", true, &format!("a connection string, e.g. {example}"))
        .unwrap_or_default();
    if !url.is_empty()
        && let Err(e) = validate(&url)
    {
        d.problem("url", e);
    }
    url
}

/// `outbox_table`: `[schema.]table`, letters, digits and _.
pub(crate) fn read_outbox_table(d: &mut Reader<'_>, default: &str) -> String {
    let outbox_table = d
        .string(
            "outbox_table",
            false,
            &format!("a table name, e.g. \"{default}\""),
        )
        .unwrap_or_else(|| default.to_string());
    let valid = outbox_table.split('.').all(|part| {
        !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    if !valid {
        d.problem(
            "outbox_table",
            format!("`{outbox_table}` is not a table name: expected [schema.]table with letters, digits and _"),
        );
    }
    outbox_table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_PUBLISHER_WINDOW;
    use crate::config::test_files::{scratch, write};
    use crate::engine::oracle::settings::{OracleUrl, parse_oracle_url};
    use std::path::PathBuf;
    use std::time::Duration;

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
            Connector::load(&path)
        };
        let c = load("kind = \"mssql\"\nurl = \"server=tcp:db,1433;database=madrid;user=s;password=p\"\nca_file = \"/ca.pem\"\npoll_max_ms = 250\nmax_downtime_hours = 12").unwrap();
        let Engine::SqlServer(db) = &c.engine else {
            panic!("{:?}", c.engine)
        };
        assert_eq!(db.outbox_parts(), ("dbo", "outbox"));
        assert_eq!(db.encrypt, sqlserver::settings::Encrypt::Required);
        assert_eq!(db.poll_max, Duration::from_millis(250));
        assert_eq!(db.max_downtime, Duration::from_secs(12 * 3600));
        assert_eq!(db.ca_file, Some(PathBuf::from("/ca.pem")));
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
        let Connector { config: c, engine } = Connector::load(&path).unwrap();
        let Engine::Postgres(db) = engine else {
            panic!("{engine:?}")
        };
        assert_eq!(c.name, "paris");
        assert_eq!(db.slot, "sitesync_paris");
        assert_eq!(db.publication, "sitesync_paris");
        assert_eq!(db.outbox_parts(), ("public", "outbox"));
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
        let err = Connector::load(&path).unwrap_err();
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
        let c = Connector::load(&path).unwrap();
        let Engine::Oracle(db) = &c.engine else {
            panic!("{:?}", c.engine)
        };
        assert_eq!(db.outbox_table, "OUTBOX");
        assert_eq!(db.window_max_scn, 50_000);
        assert_eq!(db.max_buffered_mib, 64);
        assert_eq!(
            db.client_lib_dir,
            Some(PathBuf::from("/opt/oracle/instantclient_23_6"))
        );
        assert_eq!(
            parse_oracle_url(&db.url).unwrap(),
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
        let c = Connector::load(&write(&dir, "madrid-oracle.toml", &shipped)).unwrap();
        let Engine::Oracle(db) = &c.engine else {
            panic!("{:?}", c.engine)
        };
        assert_eq!(db.client_lib_dir, None);
        assert_eq!(c.config.sink.routes.len(), 3);
        // Oracle keys are unknown to a PostgreSQL connector.
        let pg = write(
            &dir,
            "pg.toml",
            &format!(
                "site = \"MADRID\"\n[database]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\nclient_lib_dir = \"/x\"\n[broker]\nurls = \"amqp://h\"\ntopology = \"{}\"\n",
                topo.display()
            ),
        );
        let err = Connector::load(&pg).unwrap_err();
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
        let err = Connector::load(&path).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "site");
    }

    #[test]
    fn unreadable_and_invalid_files() {
        let err = Connector::load(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(err.to_string().contains("cannot read the file"));
        let dir = scratch("syntax");
        let p = write(&dir, "s.toml", "site = \n");
        assert!(
            Connector::load(&p)
                .unwrap_err()
                .to_string()
                .contains("not valid TOML")
        );
    }
}
