//! A private MariaDB server per test.
//!
//! The binlog source needs a server whose binary log it can read from any
//! position, that can be purged, restarted and killed under it: the
//! machine's own server (port 3306) is never used. Every test gets a copy
//! of a data directory installed once per test process, started with
//! `mariadbd --no-defaults` on a random port in a temporary directory.
//!
//! The server itself is the library's (`sitesync::lab::mariadb::Server`);
//! this wrapper gives it a [`TestDir`] and panics instead of errors.

use std::path::PathBuf;
use std::time::Instant;

use sitesync::lab::mariadb::{Options, Server};

use super::{TestDir, keep_dirs, tail_file};

/// Prefix of the temporary directories (`/tmp/ssmdb-xxxxxxxx`), kept short
/// because the Unix socket lives in the directory.
const DIR_PREFIX: &str = "ssmdb-";

/// A private MariaDB server owned by one test.
///
/// Dropping it kills the server and deletes its directory (kept when
/// `SITESYNC_KEEP_TEST_DIRS` is set). If the test is panicking, the tail of
/// the error log is printed first.
#[derive(Debug)]
pub struct MariaDb {
    // Dropped before `dir`: the server dies before its directory goes.
    server: Server,
    dir: TestDir,
}

impl MariaDb {
    /// Starts a new server; returns once it accepts connections. Panics
    /// (with the installation's output or the error log) on failure.
    pub async fn start() -> MariaDb {
        let began = Instant::now();
        super::sweep_orphans_once();
        let dir = TestDir::new(DIR_PREFIX).expect("create MariaDB test directory");
        let name = dir
            .path()
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let server = Server::start(dir.path().to_path_buf(), Options::new(&name))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "[harness] MariaDB server on port {} ready in {:?} ({})",
            server.port(),
            began.elapsed(),
            dir.path().display()
        );
        MariaDb { server, dir }
    }

    /// The library's server (pid, paths, server id).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// TCP port on 127.0.0.1, the same after a restart.
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// `mysql://root@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        self.server.url(db)
    }

    /// The data directory (binary logs included).
    pub fn data_dir(&self) -> PathBuf {
        self.server.data_dir()
    }

    /// The last `lines` lines of the error log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.server.log_path(), lines)
    }

    /// A connection as root to `db` (`None`: no default database).
    pub async fn conn(&self, db: Option<&str>) -> mysql_async::Conn {
        self.server
            .conn(db)
            .await
            .unwrap_or_else(|e| panic!("{e}\n--- error log ---\n{}", self.log_tail(20)))
    }

    /// Runs `sql` (one statement) as root and returns its rows as text
    /// (tab-separated values, a line per row).
    pub async fn sql(&self, sql: &str) -> String {
        self.server
            .sql(sql)
            .await
            .unwrap_or_else(|e| panic!("{e}\n--- error log ---\n{}", self.log_tail(20)))
    }

    /// Creates database `name`.
    pub async fn create_database(&self, name: &str) {
        self.server
            .create_database(name)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Creates user `user`@127.0.0.1 with `password` and `privileges` on `on`.
    pub async fn create_user(&self, user: &str, password: &str, privileges: &str, on: &str) {
        self.server
            .create_user(user, password, privileges, on)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGTERM, waited.
    pub async fn stop(&self) {
        self.server.stop().await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGKILL, waited.
    pub async fn kill9(&self) {
        self.server.kill9().await;
    }

    /// Starts again on the same data directory and port.
    pub async fn start_again(&self) {
        self.server
            .start_again()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`stop`](Self::stop), then [`start_again`](Self::start_again).
    pub async fn restart(&self) {
        self.server
            .restart()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- MariaDB error log ({}), last 40 lines ---\n{}",
                self.server.log_path().display(),
                self.log_tail(40)
            );
        }
        self.server.kill_blocking();
        // `self.dir` (a TestDir) removes the directory when dropped next.
    }
}

/// Kills the servers of test processes that died without cleaning up, and
/// removes their directories and templates.
pub(super) fn sweep_orphans() {
    sitesync::lab::mariadb::sweep_orphans(DIR_PREFIX, keep_dirs());
}
