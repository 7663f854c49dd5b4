//! Private PostgreSQL clusters, for `sitesync demo`, `sitesync bench` and
//! the integration tests' harness (`tests/support/pg.rs` wraps [`Cluster`]):
//! `initdb` and `pg_ctl` from the installed server binaries (as the
//! `postgres` user when run as root), `wal_level=logical`,
//! `track_commit_timestamp=on`, a random port on 127.0.0.1 (another one
//! when the port is taken at the first start), in a directory of the
//! caller's under `/tmp`.
//!
//! What differs between the users is in [`Options`]: the demo and the
//! benchmark throw their clusters away ([`Options::throwaway`]: `fsync=off`,
//! small shared buffers), while the tests keep `fsync=on`, because their
//! crash tests ([`Cluster::stop_immediate`] then [`Cluster::start_again`])
//! only mean something when committed data is durable.
//!
//! Every failure is an `Err` with a message naming the cluster and what
//! failed, with the tail of the server log when the server is involved.

use super::host::{
    command_as, describe_output, free_port, is_root, process_cmdline_contains,
    signal_and_wait_blocking, sweep_orphans as sweep_dirs, tail_file, user_ids,
};
use crate::config::redact_url;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

/// The server runs as this user when sitesync runs as root (PostgreSQL
/// refuses to run as root).
pub const PG_USER: &str = "postgres";

/// How many ports a first start may try (another process may take one
/// between the check and the server's bind).
pub const PORT_ATTEMPTS: usize = 5;

/// How long a start waits, after `pg_ctl -w`, for a connection over TCP.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `pg_ctl` may take for the immediate stop of [`Cluster::stop_blocking`].
const BLOCKING_STOP_TIMEOUT_SECS: &str = "30";

/// Lines of the server log in error messages.
const LOG_LINES: usize = 40;

const MISSING_BINARIES: &str = "PostgreSQL server binaries not found under /usr/lib/postgresql/<version>/bin (initdb, pg_ctl, postgres): install them with `apt-get install postgresql` (or give the databases' URLs)";

/// How a cluster is set up: what its users need of it.
#[derive(Debug, Clone)]
pub struct Options {
    /// Names the cluster in error messages (a site: `PARIS`).
    pub name: String,
    /// `fsync`: on when committed data must survive a crash of the server.
    pub fsync: bool,
    /// The settings file in the data directory, included last by
    /// `postgresql.conf` (so its settings win; `ALTER SYSTEM` still
    /// overrides them) and rewritten when a start moves to another port.
    pub settings_file: String,
    /// The first line of the settings file (a `#` comment: who wrote it).
    pub settings_comment: String,
    /// `max_replication_slots` and `max_wal_senders`.
    pub max_senders: u32,
    /// `shared_buffers` (`32MB`), or the server's default.
    pub shared_buffers: Option<String>,
    /// More settings lines, written last (each ending with a newline).
    pub extra_settings: String,
    /// How long `pg_ctl` may wait for a start or a stop (crash recovery
    /// after an immediate stop included), in seconds.
    pub pg_ctl_timeout_secs: u32,
    /// Once set, a first start stops short after `initdb` (an interrupted demo).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Options {
    /// The demo's and the benchmark's clusters: thrown away at the end, so
    /// `fsync=off` and 32MB of shared buffers; 10 replication slots and
    /// senders.
    pub fn throwaway(name: &str) -> Options {
        Options {
            name: name.to_string(),
            fsync: false,
            settings_file: "sitesync_demo.conf".to_string(),
            settings_comment: "# Written by `sitesync demo`: a throw-away cluster.".to_string(),
            max_senders: 10,
            shared_buffers: Some("32MB".to_string()),
            extra_settings: String::new(),
            pg_ctl_timeout_secs: 60,
            cancel: None,
        }
    }
}

/// A private cluster in `dir` (`dir/data`, `dir/server.log`, the socket).
///
/// Dropping it stops the server at once (`pg_ctl stop -m immediate`) if
/// one may be running; the directory is the caller's to remove.
///
/// Everything but the first [`start`](Self::start) takes `&self`, so a
/// cluster can be shared (in an `Arc`, say) between tasks.
#[derive(Debug)]
pub struct Cluster {
    options: Options,
    dir: PathBuf,
    bin: PathBuf,
    /// `Some("postgres")` when the commands run through `runuser`.
    user: Option<&'static str>,
    /// uid and gid of that user, who owns `dir`.
    owner: Option<(u32, u32)>,
    port: u16,
    /// Started and not stopped through this handle.
    running: AtomicBool,
}

impl Cluster {
    /// A cluster to be in `dir`, which exists (and is traversable by the
    /// `postgres` user when root: it is given to that user), run with the
    /// server binaries in `bin` (see [`find_bin_dir`]). Nothing runs yet.
    pub fn new(dir: PathBuf, bin: PathBuf, options: Options) -> Result<Cluster, String> {
        let user = is_root().then_some(PG_USER);
        let owner = match user {
            Some(u) => Some(user_ids(u).ok_or_else(|| {
                format!(
                    "{}: running as root, but there is no `{u}` user to run PostgreSQL as (PostgreSQL refuses to run as root)",
                    options.name
                )
            })?),
            None => None,
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("{}: chown {}: {e}", options.name, dir.display()))?;
        }
        Ok(Cluster {
            options,
            dir,
            bin,
            user,
            owner,
            port: 0,
            running: AtomicBool::new(false),
        })
    }

    /// The name given in [`Options::name`].
    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// The TCP port on 127.0.0.1 (0 before the first start); the same
    /// after [`stop_immediate`](Self::stop_immediate) and
    /// [`start_again`](Self::start_again).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` as the superuser `postgres` (trust
    /// authentication, no password).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The cluster's directory (the data directory, the log and the socket are in it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server log (everything the postmaster writes, at
    /// `log_min_messages=warning`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Whether the server was started and not stopped through this handle.
    pub fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Whether a postmaster may be running out of the data directory
    /// (whatever [`running`](Self::running) says: a start may have failed
    /// half-way).
    fn postmaster_pid_exists(&self) -> bool {
        self.data_dir().join("postmaster.pid").exists()
    }

    fn command(&self, tool: &str) -> std::process::Command {
        // The server's user may not be able to enter our working directory.
        command_as(self.user, &self.bin.join(tool), &[], &self.dir)
    }

    async fn run(&self, tool: &str, args: &[&str]) -> Result<Output, String> {
        let mut cmd = self.command(tool);
        cmd.args(args);
        tokio::process::Command::from(cmd)
            .output()
            .await
            .map_err(|e| format!("{}: cannot run {tool}: {e}", self.name()))
    }

    fn log_tail(&self) -> String {
        format!(
            "--- server log ({}) ---\n{}",
            self.log_path().display(),
            tail_file(&self.log_path(), LOG_LINES)
        )
    }

    /// Creates the cluster (`initdb`), starts it on a free port (another
    /// one, up to [`PORT_ATTEMPTS`] in all, when the port was taken
    /// meanwhile) and returns once it accepts connections.
    pub async fn start(&mut self) -> Result<(), String> {
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
                    // Whatever LANG says (it may name a locale not
                    // installed), and deterministic.
                    "--locale=C",
                ],
            )
            .await?;
        if !out.status.success() {
            return Err(format!(
                "{}: initdb failed: {}",
                self.name(),
                describe_output(&out)
            ));
        }
        let conf = self.data_dir().join("postgresql.conf");
        let mut text =
            std::fs::read_to_string(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
        text.push_str(&format!("\ninclude = '{}'\n", self.options.settings_file));
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;

        if self
            .options
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            return Err(format!("{}: interrupted", self.name()));
        }
        for attempt in 1..=PORT_ATTEMPTS {
            self.port = free_port();
            self.write_settings()?;
            let before = std::fs::metadata(self.log_path()).map_or(0, |m| m.len());
            let out = self.pg_ctl_start().await?;
            if out.status.success() {
                return self.wait_ready().await;
            }
            let new_log = std::fs::read(self.log_path())
                .map(|raw| {
                    String::from_utf8_lossy(raw.get(before as usize..).unwrap_or(&raw)).into_owned()
                })
                .unwrap_or_default();
            let port_taken = [
                "could not bind",
                "Address already in use",
                "could not create any TCP/IP sockets",
            ]
            .iter()
            .any(|s| new_log.contains(s));
            if !port_taken || attempt == PORT_ATTEMPTS {
                return Err(format!(
                    "{}: PostgreSQL did not start on port {}: {}\n{}",
                    self.name(),
                    self.port,
                    describe_output(&out),
                    self.log_tail()
                ));
            }
        }
        unreachable!("the last attempt returns")
    }

    fn write_settings(&self) -> Result<(), String> {
        let o = &self.options;
        let path = self.data_dir().join(&o.settings_file);
        let mut text = format!(
            "{comment}\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{socket}'\n\
             wal_level = logical\n\
             # Last-writer-wins compares local writes by their commit time.\n\
             track_commit_timestamp = on\n\
             max_replication_slots = {senders}\n\
             max_wal_senders = {senders}\n",
            comment = o.settings_comment,
            port = self.port,
            socket = self.dir.display(),
            senders = o.max_senders,
        );
        if let Some(size) = &o.shared_buffers {
            text.push_str(&format!("shared_buffers = {size}\n"));
        }
        if o.fsync {
            text.push_str(
                "# fsync stays on: crash tests rely on committed data being durable.\nfsync = on\n",
            );
        } else {
            text.push_str("fsync = off\n");
        }
        text.push_str("log_min_messages = warning\n");
        text.push_str(&o.extra_settings);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// `pg_ctl start -w`: pg_ctl waits until the server accepts
    /// connections, or notices that it died (a port taken, say).
    async fn pg_ctl_start(&self) -> Result<Output, String> {
        let data = self.data_dir().to_string_lossy().into_owned();
        let log = self.log_path().to_string_lossy().into_owned();
        let timeout = self.options.pg_ctl_timeout_secs.to_string();
        let out = self
            .run(
                "pg_ctl",
                &["start", "-D", &data, "-l", &log, "-w", "-t", &timeout],
            )
            .await?;
        if out.status.success() {
            self.running.store(true, Ordering::SeqCst);
        }
        Ok(out)
    }

    /// `pg_ctl -w` waited already; this checks over TCP, the way the
    /// sidecars connect, polling with a capped backoff.
    async fn wait_ready(&self) -> Result<(), String> {
        let url = self.url("postgres");
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut delay = Duration::from_millis(10);
        loop {
            let attempt = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(100), Duration::from_secs(5));
            let last =
                match tokio::time::timeout(attempt, tokio_postgres::connect(&url, NoTls)).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => with_causes(&e),
                    Err(_) => format!("no answer within {attempt:?}"),
                };
            if Instant::now() >= deadline {
                return Err(format!(
                    "{}: PostgreSQL on port {} does not accept connections within {READY_TIMEOUT:?}: {last}\n{}",
                    self.name(),
                    self.port,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now()))).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// Starts the server again on the same data directory and port, and
    /// returns once it accepts connections (after crash recovery, if any).
    pub async fn start_again(&self) -> Result<(), String> {
        let out = self.pg_ctl_start().await?;
        if !out.status.success() {
            return Err(format!(
                "{}: PostgreSQL did not start again on port {}: {}\n{}",
                self.name(),
                self.port,
                describe_output(&out),
                self.log_tail()
            ));
        }
        self.wait_ready().await
    }

    /// `pg_ctl stop -m immediate`: every process is killed without a
    /// checkpoint, so the next start performs crash recovery — the closest
    /// to a power cut without losing fsync'ed data. An error when pg_ctl
    /// fails (no server running, say).
    pub async fn stop_immediate(&self) -> Result<(), String> {
        self.pg_ctl_stop("immediate").await
    }

    /// `pg_ctl stop -m fast`: a clean shutdown (clients disconnected, a
    /// checkpoint written). An error when pg_ctl fails.
    pub async fn stop_fast(&self) -> Result<(), String> {
        self.pg_ctl_stop("fast").await
    }

    /// A clean restart: [`stop_fast`](Self::stop_fast), then
    /// [`start_again`](Self::start_again).
    pub async fn restart(&self) -> Result<(), String> {
        self.stop_fast().await?;
        self.start_again().await
    }

    async fn pg_ctl_stop(&self, mode: &str) -> Result<(), String> {
        let data = self.data_dir().to_string_lossy().into_owned();
        let timeout = self.options.pg_ctl_timeout_secs.to_string();
        let out = self
            .run(
                "pg_ctl",
                &["stop", "-D", &data, "-m", mode, "-w", "-t", &timeout],
            )
            .await?;
        if !out.status.success() {
            return Err(format!(
                "{}: pg_ctl stop -m {mode} failed: {}\n{}",
                self.name(),
                describe_output(&out),
                self.log_tail()
            ));
        }
        self.running.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// The clean-up's stop: nothing when no server runs out of the data
    /// directory, else a fast stop, and an immediate one if that fails; an
    /// error only when a server is still there.
    pub async fn stop(&self) -> Result<(), String> {
        if !self.postmaster_pid_exists() {
            self.running.store(false, Ordering::SeqCst);
            return Ok(());
        }
        let fast = self.stop_fast().await;
        if fast.is_ok() || !self.postmaster_pid_exists() {
            self.running.store(false, Ordering::SeqCst);
            return Ok(());
        }
        self.stop_blocking();
        if self.postmaster_pid_exists() {
            fast
        } else {
            Ok(())
        }
    }

    /// `pg_ctl stop -m immediate`, blocking (for `Drop`), when a server may
    /// be running out of the data directory.
    pub fn stop_blocking(&self) {
        if !self.postmaster_pid_exists() {
            return;
        }
        let _ = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "-t", BLOCKING_STOP_TIMEOUT_SECS])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.running.store(false, Ordering::SeqCst);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// Stops the clusters left under `/tmp/<prefix>*` by processes killed
/// before they cleaned up (the pid in the directory's owner file is gone;
/// see [`super::host::sweep_orphans`]), and removes their directories
/// (with `keep`, only the owner files). A cluster's directory is the swept
/// directory itself (the tests') or one of its subdirectories (one per
/// site: the demo's and the benchmark's).
pub fn sweep_orphans(prefix: &str, keep: bool) {
    sweep_dirs(prefix, keep, |dir: &Path| {
        stop_orphan(dir);
        for sub in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if sub.path().is_dir() {
                stop_orphan(&sub.path());
            }
        }
    });
}

/// Stops the postmaster of the cluster in `dir`, if it still runs: SIGQUIT
/// (what `pg_ctl stop -m immediate` sends), then SIGKILL.
fn stop_orphan(dir: &Path) {
    let pid = std::fs::read_to_string(dir.join("data").join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok());
    if let Some(pid) = pid
        && process_cmdline_contains(pid, &dir.to_string_lossy())
        && !signal_and_wait_blocking(pid, libc::SIGQUIT, Duration::from_secs(10))
    {
        signal_and_wait_blocking(pid, libc::SIGKILL, Duration::from_secs(5));
    }
}

/// A connection whose driver runs as a task.
pub async fn connect(url: &str) -> Result<Client, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("connecting to {}: {}", redact_url(url), with_causes(&e)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The `bin` directory of the highest PostgreSQL version installed under
/// `/usr/lib/postgresql` (Debian's layout).
pub fn find_bin_dir() -> Result<PathBuf, String> {
    let entries =
        std::fs::read_dir("/usr/lib/postgresql").map_err(|_| MISSING_BINARIES.to_string())?;
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries.flatten() {
        let bin = entry.path().join("bin");
        if ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|t| bin.join(t).exists())
        {
            found.push((entry.file_name().to_string_lossy().into_owned(), bin));
        }
    }
    highest_version(found).ok_or_else(|| MISSING_BINARIES.to_string())
}

/// The entry with the highest version name ("9.6" < "15" < "17").
pub fn highest_version(found: Vec<(String, PathBuf)>) -> Option<PathBuf> {
    found
        .into_iter()
        .filter_map(|(name, bin)| {
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// An error and its causes (tokio-postgres keeps "connection refused" in
/// the source).
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_postgres_version_wins() {
        let found = vec![
            ("9.6".to_string(), PathBuf::from("/a")),
            ("17".to_string(), PathBuf::from("/c")),
            ("15".to_string(), PathBuf::from("/b")),
            ("x".to_string(), PathBuf::from("/x")),
        ];
        assert_eq!(highest_version(found), Some(PathBuf::from("/c")));
        assert_eq!(highest_version(Vec::new()), None);
    }
}
