//! A private PostgreSQL cluster per test.
//!
//! The connector under test creates replication slots and publications,
//! holds WAL, and must survive the database crashing under it.  None of that
//! can be done safely on a shared server, so every test gets its own cluster,
//! created with `initdb` from the installed server binaries in a temporary
//! directory and listening on a random port on 127.0.0.1.
//!
//! The cluster itself is the library's (`sitesync::lab::pg::Cluster`, which
//! `sitesync demo` and `sitesync bench` start too); this wrapper gives it
//! the tests' settings, a [`TestDir`], and panics instead of errors.
//!
//! The cluster keeps `fsync=on` on purpose: crash tests (`stop_immediate` +
//! `start_again`) are only meaningful when committed data really is durable.

use std::path::PathBuf;
use std::time::Instant;

use sitesync::lab::pg::{Cluster, Options, find_bin_dir};
use tokio_postgres::{Client, NoTls};

use super::{TestDir, keep_dirs, tail_file};

/// Prefix of the temporary directories (`/tmp/sspg-xxxxxxxx`), kept short
/// because the Unix socket lives in the directory.
const DIR_PREFIX: &str = "sspg-";

/// How long `pg_ctl` may wait for a start or a stop (crash recovery after an
/// immediate stop included).
const PG_CTL_TIMEOUT_SECS: u32 = 120;

/// A private PostgreSQL cluster (`wal_level=logical`) owned by one test.
///
/// Dropping it stops the server immediately and deletes its directory
/// (kept when `SITESYNC_KEEP_TEST_DIRS` is set).  If the test is panicking,
/// the tail of the server log is printed first.
///
/// Stop/start methods take `&self`, so a cluster can be shared (e.g. in an
/// `Arc`) between the test body and tasks it spawns.
#[derive(Debug)]
pub struct PgCluster {
    // Dropped before `dir`: the server stops before its directory goes.
    cluster: Cluster,
    dir: TestDir,
}

impl PgCluster {
    /// Creates, configures and starts a new cluster; returns once it accepts
    /// connections.  Panics (with initdb output or the server log) on failure.
    pub async fn start() -> PgCluster {
        let began = Instant::now();
        super::sweep_orphans_once();
        let bin = find_bin_dir().unwrap_or_else(|e| panic!("{e}"));
        let dir = TestDir::new(DIR_PREFIX).expect("create PostgreSQL test directory");
        let name = dir
            .path()
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let options = Options {
            name,
            fsync: true,
            settings_file: "sitesync_test.conf".to_string(),
            settings_comment: "# Written by the sitesync test harness (tests/support/pg.rs)."
                .to_string(),
            max_senders: 20,
            shared_buffers: None,
            extra_settings: "wal_sender_timeout = '60s'\n".to_string(),
            pg_ctl_timeout_secs: PG_CTL_TIMEOUT_SECS,
            cancel: None,
        };
        let cluster =
            Cluster::new(dir.path().to_path_buf(), bin, options).unwrap_or_else(|e| panic!("{e}"));
        // Made before the start: if it panics, `Drop` prints the log and
        // stops whatever runs.
        let mut pg = PgCluster { cluster, dir };
        pg.cluster.start().await.unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "[harness] PostgreSQL cluster on port {} ready in {:?} ({})",
            pg.port(),
            began.elapsed(),
            pg.dir.path().display()
        );
        pg
    }

    /// TCP port the server listens on (127.0.0.1).  Stable across
    /// [`stop_immediate`](Self::stop_immediate) / [`start_again`](Self::start_again).
    pub fn port(&self) -> u16 {
        self.cluster.port()
    }

    /// Connection URL for database `db` as the superuser `postgres`
    /// (trust authentication, no password).
    pub fn url(&self, db: &str) -> String {
        self.cluster.url(db)
    }

    /// The cluster's data directory (`PGDATA`).
    pub fn data_dir(&self) -> PathBuf {
        self.cluster.data_dir()
    }

    /// The server log file (everything the postmaster writes, at
    /// `log_min_messages=warning`), to print when a test fails.
    pub fn log_path(&self) -> PathBuf {
        self.cluster.log_path()
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log_path(), lines)
    }

    /// Whether the harness believes the server is running (it was started
    /// and not stopped through this handle).
    pub fn is_running(&self) -> bool {
        self.cluster.running()
    }

    /// Creates database `name` (connecting to the `postgres` database).
    pub async fn create_database(&self, name: &str) {
        let client = self.client("postgres").await;
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A connected client for database `db`; the connection is driven by a
    /// spawned task (its error, e.g. after a crash, surfaces through the
    /// client).  Panics when the connection fails.
    pub async fn client(&self, db: &str) -> Client {
        self.try_client(db).await.unwrap_or_else(|e| {
            panic!(
                "connect to {}: {e}\n--- server log ---\n{}",
                self.url(db),
                self.log_tail(20)
            )
        })
    }

    /// Like [`client`](Self::client), but returns the error, for tests that
    /// expect the server to be down.
    pub async fn try_client(&self, db: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(&self.url(db), NoTls).await?;
        tokio::spawn(async move {
            // Errors (server crashed or stopped) are reported to the client's
            // callers; nothing to add here.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Stops the server with `pg_ctl stop -m immediate`: every process is
    /// killed without a checkpoint, so the next start performs crash
    /// recovery — the closest to a power cut we can get without losing
    /// fsync'ed data.
    pub async fn stop_immediate(&self) {
        self.cluster
            .stop_immediate()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Stops the server with `pg_ctl stop -m fast` (clean shutdown:
    /// disconnects clients, writes a checkpoint).
    pub async fn stop_fast(&self) {
        self.cluster
            .stop_fast()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts the server again on the same data directory and port, and
    /// waits until it accepts connections (after crash recovery, if any).
    pub async fn start_again(&self) {
        self.cluster
            .start_again()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Clean restart: [`stop_fast`](Self::stop_fast) then
    /// [`start_again`](Self::start_again).
    pub async fn restart(&self) {
        self.stop_fast().await;
        self.start_again().await;
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- PostgreSQL server log ({}), last 40 lines ---\n{}",
                self.log_path().display(),
                self.log_tail(40)
            );
        }
        // Whenever a postmaster may be running, whatever `is_running` says
        // (a start may have failed half-way).
        self.cluster.stop_blocking();
        // `self.dir` (a TestDir) removes the directory when dropped next.
    }
}

/// Stops the servers of test processes that died without cleaning up, and
/// removes their directories (see `sitesync::lab::pg::sweep_orphans`).
pub(super) fn sweep_orphans() {
    sitesync::lab::pg::sweep_orphans(DIR_PREFIX, keep_dirs());
}
