//! A private PostgreSQL cluster per test.
//!
//! The connector under test creates replication slots and publications,
//! holds WAL, and must survive the database crashing under it.  None of that
//! can be done safely on a shared server, so every test gets its own cluster,
//! created with `initdb` from the installed server binaries in a temporary
//! directory and listening on a random port on 127.0.0.1.
//!
//! The cluster keeps `fsync=on` on purpose: crash tests (`stop_immediate` +
//! `start_again`) are only meaningful when committed data really is durable.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use super::{TestDir, command_as, free_port, is_root, user_ids, wait_for};

/// Prefix of the temporary directories (`/tmp/sspg-xxxxxxxx`), kept short
/// because the Unix socket lives in the data directory.
const DIR_PREFIX: &str = "sspg-";

/// User that runs the server when the tests run as root (PostgreSQL refuses
/// to run as root).
const PG_USER: &str = "postgres";

/// How long `pg_ctl` may wait for a start or a stop (crash recovery after an
/// immediate stop included).
const PG_CTL_TIMEOUT_SECS: &str = "120";

/// How many times the first start is retried with a fresh port when another
/// process grabbed the chosen port in between.
const PORT_ATTEMPTS: usize = 5;

const MISSING_BINARIES: &str = "PostgreSQL server binaries not found: install them with `apt-get install postgresql` (initdb, pg_ctl, postgres under /usr/lib/postgresql/<v>/bin)";

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
    dir: TestDir,
    bin: PathBuf,
    /// `Some("postgres")` when commands must run through `runuser`.
    user: Option<String>,
    port: u16,
    running: AtomicBool,
}

impl PgCluster {
    /// Creates, configures and starts a new cluster; returns once it accepts
    /// connections.  Panics (with initdb output or the server log) on failure.
    pub async fn start() -> PgCluster {
        let began = Instant::now();
        super::sweep_orphans_once();
        let bin = find_bin_dir();
        let user = if is_root() {
            Some(PG_USER.to_string())
        } else {
            None
        };

        let dir = TestDir::new(DIR_PREFIX).expect("create PostgreSQL test directory");
        if user.is_some() {
            let (uid, gid) = user_ids(PG_USER).unwrap_or_else(|| {
                panic!(
                    "running as root, but there is no `{PG_USER}` user to run PostgreSQL as \
                     (PostgreSQL refuses to run as root)"
                )
            });
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown PostgreSQL test directory");
        }

        let mut cluster = PgCluster {
            dir,
            bin,
            user,
            port: 0,
            running: AtomicBool::new(false),
        };
        cluster.initdb().await;

        for attempt in 1..=PORT_ATTEMPTS {
            cluster.port = free_port();
            cluster.write_config();
            let log_len_before = fs::metadata(cluster.log_path()).map_or(0, |m| m.len());
            let out = cluster.pg_ctl_start().await;
            if out.status.success() {
                break;
            }
            let new_log = fs::read(cluster.log_path())
                .map(|raw| {
                    let new = raw.get(log_len_before as usize..).unwrap_or(&raw);
                    String::from_utf8_lossy(new).into_owned()
                })
                .unwrap_or_default();
            let port_taken = [
                "could not bind",
                "Address already in use",
                "could not create any TCP/IP sockets",
            ]
            .iter()
            .any(|s| new_log.contains(s));
            if !(port_taken && attempt < PORT_ATTEMPTS) {
                panic!(
                    "PostgreSQL failed to start on port {}: {}\n--- server log ({}) ---\n{}",
                    cluster.port,
                    describe_output(&out),
                    cluster.log_path().display(),
                    cluster.log_tail(40)
                );
            }
        }
        cluster.wait_ready().await;
        eprintln!(
            "[harness] PostgreSQL cluster on port {} ready in {:?} ({})",
            cluster.port,
            began.elapsed(),
            cluster.dir.path().display()
        );
        cluster
    }

    /// TCP port the server listens on (127.0.0.1).  Stable across
    /// [`stop_immediate`](Self::stop_immediate) / [`start_again`](Self::start_again).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL for database `db` as the superuser `postgres`
    /// (trust authentication, no password).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The cluster's data directory (`PGDATA`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server log file (everything the postmaster writes, at
    /// `log_min_messages=warning`), to print when a test fails.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        super::tail_file(&self.log_path(), lines)
    }

    /// Whether the harness believes the server is running (it was started
    /// and not stopped through this handle).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
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
        self.pg_ctl_stop("immediate").await;
    }

    /// Stops the server with `pg_ctl stop -m fast` (clean shutdown:
    /// disconnects clients, writes a checkpoint).
    pub async fn stop_fast(&self) {
        self.pg_ctl_stop("fast").await;
    }

    /// Starts the server again on the same data directory and port, and
    /// waits until it accepts connections (after crash recovery, if any).
    pub async fn start_again(&self) {
        let out = self.pg_ctl_start().await;
        if !out.status.success() {
            panic!(
                "PostgreSQL failed to start again on port {}: {}\n--- server log ({}) ---\n{}",
                self.port,
                describe_output(&out),
                self.log_path().display(),
                self.log_tail(40)
            );
        }
        self.wait_ready().await;
    }

    /// Clean restart: [`stop_fast`](Self::stop_fast) then
    /// [`start_again`](Self::start_again).
    pub async fn restart(&self) {
        self.stop_fast().await;
        self.start_again().await;
    }

    async fn initdb(&self) {
        let data = self.data_dir().to_string_lossy().into_owned();
        let out = self
            .run(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    // Independent of the environment's LANG (which may name
                    // a locale that is not installed) and deterministic.
                    "--locale=C",
                ],
            )
            .await;
        if !out.status.success() {
            panic!("initdb failed: {}", describe_output(&out));
        }
        // Our settings live in their own file, included last so they win,
        // and rewritten when a start has to be retried on another port.
        // `ALTER SYSTEM` (postgresql.auto.conf) still overrides them.
        let conf = self.data_dir().join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str("\ninclude = 'sitesync_test.conf'\n");
        fs::write(&conf, text).expect("write postgresql.conf");
    }

    fn write_config(&self) {
        let data = self.data_dir();
        let conf = format!(
            "# Written by the sitesync test harness (tests/support/pg.rs).\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{socket_dir}'\n\
             wal_level = logical\n\
             max_replication_slots = 20\n\
             max_wal_senders = 20\n\
             wal_sender_timeout = '60s'\n\
             log_min_messages = warning\n\
             # Last-writer-wins compares local writes by their commit time.\n\
             track_commit_timestamp = on\n\
             # fsync stays on: crash tests rely on committed data being durable.\n\
             fsync = on\n",
            port = self.port,
            socket_dir = data.display(),
        );
        let path = data.join("sitesync_test.conf");
        fs::write(&path, conf).expect("write sitesync_test.conf");
        if self.user.is_some()
            && let Some((uid, gid)) = user_ids(PG_USER)
        {
            let _ = std::os::unix::fs::chown(&path, Some(uid), Some(gid));
        }
    }

    async fn pg_ctl_start(&self) -> Output {
        let data = self.data_dir().to_string_lossy().into_owned();
        let log = self.log_path().to_string_lossy().into_owned();
        // `-w` makes pg_ctl poll until the server accepts connections, and
        // notice when the postmaster dies instead (e.g. port taken).
        let out = self
            .run(
                "pg_ctl",
                &[
                    "start",
                    "-D",
                    &data,
                    "-l",
                    &log,
                    "-w",
                    "-t",
                    PG_CTL_TIMEOUT_SECS,
                ],
            )
            .await;
        if out.status.success() {
            self.running.store(true, Ordering::SeqCst);
        }
        out
    }

    async fn pg_ctl_stop(&self, mode: &str) {
        let data = self.data_dir().to_string_lossy().into_owned();
        let out = self
            .run(
                "pg_ctl",
                &[
                    "stop",
                    "-D",
                    &data,
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    PG_CTL_TIMEOUT_SECS,
                ],
            )
            .await;
        if !out.status.success() {
            panic!(
                "pg_ctl stop -m {mode} failed: {}\n--- server log ---\n{}",
                describe_output(&out),
                self.log_tail(20)
            );
        }
        self.running.store(false, Ordering::SeqCst);
    }

    /// Polls (with backoff) until a client connection succeeds.  `pg_ctl -w`
    /// already waited for readiness; this double-checks over TCP, the way
    /// the code under test connects.
    async fn wait_ready(&self) {
        let url = self.url("postgres");
        let url = url.as_str();
        let ready = wait_for(
            async || tokio_postgres::connect(url, NoTls).await.is_ok(),
            Duration::from_secs(60),
        )
        .await;
        if let Err(e) = ready {
            panic!(
                "PostgreSQL on port {} does not accept connections: {e}\n--- server log ---\n{}",
                self.port,
                self.log_tail(40)
            );
        }
    }

    async fn run(&self, tool: &str, args: &[&str]) -> Output {
        let mut cmd = command_as(
            self.user.as_deref(),
            &self.bin.join(tool),
            &[],
            self.dir.path(),
        );
        cmd.args(args);
        tokio::process::Command::from(cmd)
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
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
        // Stop whenever a postmaster may be running, whatever `running` says
        // (a start may have failed half-way).
        if self.data_dir().join("postmaster.pid").exists() {
            let data = self.data_dir();
            let mut cmd = command_as(
                self.user.as_deref(),
                &self.bin.join("pg_ctl"),
                &[],
                self.dir.path(),
            );
            cmd.arg("stop")
                .arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "-w", "-t", "30"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let _ = cmd.status();
        }
        // `self.dir` (a TestDir) removes the directory when dropped next.
    }
}

/// The `bin` directory of the highest PostgreSQL version installed under
/// `/usr/lib/postgresql` (Debian layout).  Panics with installation
/// instructions when there is none.
pub fn find_bin_dir() -> PathBuf {
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let bin = entry.path().join("bin");
            if !(bin.join("initdb").exists()
                && bin.join("pg_ctl").exists()
                && bin.join("postgres").exists())
            {
                continue;
            }
            let Some(version) = entry.file_name().to_str().and_then(parse_version) else {
                continue;
            };
            if best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    match best {
        Some((_, bin)) => bin,
        None => panic!("{MISSING_BINARIES}"),
    }
}

/// "15" → [15], "9.6" → [9, 6]; `None` for anything else.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|p| p.parse().ok()).collect()
}

/// Stops the servers of test processes that died without cleaning up (see
/// [`TestDir::sweep_orphans`]): SIGQUIT is what `pg_ctl stop -m immediate`
/// sends to the postmaster.
pub(super) fn sweep_orphans() {
    TestDir::sweep_orphans(DIR_PREFIX, |dir: &Path| {
        let pid = fs::read_to_string(dir.join("data").join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid
            && super::process_cmdline_contains(pid, &dir.to_string_lossy())
            && !super::signal_and_wait_blocking(pid, libc::SIGQUIT, Duration::from_secs(10))
        {
            super::signal_and_wait_blocking(pid, libc::SIGKILL, Duration::from_secs(5));
        }
    });
}

fn describe_output(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
