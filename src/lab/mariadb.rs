//! Private MariaDB servers, for the integration tests' harness
//! (`tests/support/mariadb.rs` wraps [`Server`]) and, later, the demo and
//! the benchmark: `mariadbd` from the installed binaries, in a directory of
//! the caller's under `/tmp`, on a random port on 127.0.0.1, never reading
//! the machine's option files (`--no-defaults`), so the machine's own
//! server (port 3306, `/etc/mysql`) is never involved.
//!
//! Every server writes a ROW-format binary log with full row images and
//! full row metadata (column names), which the binlog source reads.
//!
//! `mariadb-install-db` runs once per process, into a template data
//! directory ([`template`]); each server starts from a copy of it, which is
//! much cheaper than a fresh installation. The template's directory is
//! owned by the process (see [`super::host::create_owned_dir`]) and removed
//! by [`sweep_orphans`] once the process is gone.
//!
//! As root, `mariadbd --user=root` runs as root in directories root owns
//! (it refuses root without the option); as anyone else it runs as that
//! user.
//!
//! Every failure is an `Err` with a message naming the server and what
//! failed, with the tail of the server's error log when the server is
//! involved.

use super::host::{
    create_owned_dir, describe_output, free_port, is_root, process_cmdline_contains, random_hex,
    signal_and_wait_blocking, sweep_orphans as sweep_dirs, tail_file,
};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// How many ports a first start may try (another process may take one
/// between the check and the server's bind).
pub const PORT_ATTEMPTS: usize = 5;

/// How long a start waits for the server to accept connections (crash
/// recovery after [`Server::kill9`] included).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Server::stop`] waits for the server to exit after SIGTERM
/// before it kills it.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of the error log in error messages.
const LOG_LINES: usize = 40;

/// Prefix of the template's directory under `/tmp` (swept by [`sweep_orphans`]).
pub const TEMPLATE_PREFIX: &str = "ssmdbt-";

/// The redo log's size: the default (96 MiB) would make every copy of the
/// template slow; the same value is given to the installation and to every
/// server.
const INNODB_LOG_FILE_SIZE: &str = "--innodb-log-file-size=8M";

/// The buffer pool: several servers run at once on a small machine.
const INNODB_BUFFER_POOL_SIZE: &str = "--innodb-buffer-pool-size=32M";

/// The binary log's base name, in the data directory (`mysql-bin.000001`, …).
pub const BINLOG_BASENAME: &str = "mysql-bin";

const MISSING_BINARIES: &str = "MariaDB server binaries not found (mariadbd in PATH or /usr/sbin, mariadb-install-db in PATH or /usr/bin): install them with `apt-get install mariadb-server`";

/// How a server is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Names the server in error messages (a site: `LONDON`).
    pub name: String,
    /// `--server-id`: a binlog reader must use another one.
    pub server_id: u32,
    /// More `mariadbd` arguments, given last (so they win over the
    /// defaults above: `--innodb-buffer-pool-size=256M`, say).
    pub extra_args: Vec<String>,
}

impl Options {
    /// A server named `name` with a server id no other server of this
    /// process has (1, 2, …).
    pub fn new(name: &str) -> Options {
        static NEXT_ID: AtomicU32 = AtomicU32::new(1);
        Options {
            name: name.to_string(),
            server_id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            extra_args: Vec::new(),
        }
    }
}

/// The installed binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `mariadbd`, the server.
    pub server: PathBuf,
    /// `mariadb-install-db`, which creates a data directory.
    pub install_db: PathBuf,
}

/// Finds the binaries in `PATH`, or where Debian installs them.
pub fn find_binaries() -> Result<Binaries, String> {
    let find = |name: &str, fallback: &str| -> Option<PathBuf> {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|dir| dir.join(name))
            .chain(std::iter::once(Path::new(fallback).join(name)))
            .find(|p| p.is_file())
    };
    Ok(Binaries {
        server: find("mariadbd", "/usr/sbin").ok_or(MISSING_BINARIES)?,
        install_db: find("mariadb-install-db", "/usr/bin").ok_or(MISSING_BINARIES)?,
    })
}

/// The template data directory of this process: made by the first call
/// (`mariadb-install-db`, about a second), the same path afterwards. An
/// installation that failed is reported to every caller.
pub async fn template(bin: &Binaries) -> Result<PathBuf, String> {
    TEMPLATE
        .get_or_init(|| install_template(bin.clone()))
        .await
        .clone()
}

static TEMPLATE: OnceCell<Result<PathBuf, String>> = OnceCell::const_new();

/// Removes this process's [`template`], if it made one: for a process
/// that starts no server afterwards (the demo, at its end). Others are
/// swept by [`sweep_orphans`] once their process is gone.
pub fn remove_template() {
    if let Some(Ok(data)) = TEMPLATE.get()
        && let Some(dir) = data.parent()
    {
        let _ = std::fs::remove_dir_all(dir);
    }
}

async fn install_template(bin: Binaries) -> Result<PathBuf, String> {
    let dir = loop {
        let path = PathBuf::from(format!("/tmp/{TEMPLATE_PREFIX}{}", random_hex(8)));
        match create_owned_dir(&path, 0o700) {
            Ok(()) => break path,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("MariaDB template: create {}: {e}", path.display())),
        }
    };
    let data = dir.join("data");
    let mut cmd = tokio::process::Command::new(&bin.install_db);
    cmd.arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-test-db")
        // Creates root@127.0.0.1 (and ::1) besides root@localhost, which
        // a server with --skip-name-resolve matches for TCP clients.
        .arg("--skip-name-resolve")
        .arg(INNODB_LOG_FILE_SIZE)
        .current_dir(&dir)
        .stdin(Stdio::null());
    if is_root() {
        cmd.arg("--user=root");
    }
    let out = cmd.output().await.map_err(|e| {
        format!(
            "MariaDB template: cannot run {}: {e}",
            bin.install_db.display()
        )
    })?;
    if !out.status.success() {
        return Err(format!(
            "MariaDB template: mariadb-install-db into {} failed: {}",
            data.display(),
            describe_output(&out)
        ));
    }
    Ok(data)
}

/// A private server in `dir` (`dir/data`, `dir/server.log`,
/// `dir/mariadb.sock`, `dir/mariadbd.pid`).
///
/// Dropping it kills the server (SIGKILL) if it runs; the directory is the
/// caller's to remove.
///
/// Every method takes `&self`, so a server can be shared (in an `Arc`, say)
/// between tasks.
#[derive(Debug)]
pub struct Server {
    options: Options,
    bin: Binaries,
    dir: PathBuf,
    port: u16,
    /// The running `mariadbd`, a child of this process: kept to signal it
    /// and to reap it (a zombie would still look alive).
    child: Mutex<Option<Child>>,
}

impl Server {
    /// Copies the [`template`] into `dir/data` (`dir` exists and is this
    /// process's), starts the server on a free port (another one, up to
    /// [`PORT_ATTEMPTS`] in all, when the port was taken meanwhile) and
    /// returns once it accepts connections.
    pub async fn start(dir: PathBuf, options: Options) -> Result<Server, String> {
        let bin = find_binaries()?;
        let template = template(&bin).await?;
        let data = dir.join("data");
        let out = tokio::process::Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("{}: cannot run cp: {e}", options.name))?;
        if !out.status.success() {
            return Err(format!(
                "{}: copying the template {} to {} failed: {}",
                options.name,
                template.display(),
                data.display(),
                describe_output(&out)
            ));
        }
        let mut server = Server {
            options,
            bin,
            dir,
            port: 0,
            child: Mutex::new(None),
        };
        for attempt in 1..=PORT_ATTEMPTS {
            server.port = free_port();
            let before = std::fs::metadata(server.log_path()).map_or(0, |m| m.len());
            server.spawn()?;
            match server.wait_ready().await {
                Ok(()) => return Ok(server),
                Err(e) => {
                    let new_log = std::fs::read(server.log_path())
                        .map(|raw| {
                            String::from_utf8_lossy(raw.get(before as usize..).unwrap_or(&raw))
                                .into_owned()
                        })
                        .unwrap_or_default();
                    let port_taken = ["Address already in use", "Do you already have another"]
                        .iter()
                        .any(|s| new_log.contains(s));
                    if !port_taken || attempt == PORT_ATTEMPTS {
                        return Err(e);
                    }
                    server.kill_blocking();
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The name given in [`Options::name`].
    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// The server's `--server-id`.
    pub fn server_id(&self) -> u32 {
        self.options.server_id
    }

    /// The TCP port on 127.0.0.1, the same after a restart.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` as `root` (no password, from 127.0.0.1).
    pub fn url(&self, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.port)
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data directory (the binary logs are in it).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The error log (`--log-error`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The Unix socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("mariadb.sock")
    }

    /// The pid of the running server, `None` when it does not run (or
    /// exited by itself: it is reaped here).
    pub fn pid(&self) -> Option<u32> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => child.as_ref().map(Child::id),
            Some(_) => {
                *child = None;
                None
            }
            None => None,
        }
    }

    /// Whether the server runs.
    pub fn running(&self) -> bool {
        self.pid().is_some()
    }

    fn log_tail(&self) -> String {
        format!(
            "--- error log ({}) ---\n{}",
            self.log_path().display(),
            tail_file(&self.log_path(), LOG_LINES)
        )
    }

    fn spawn(&self) -> Result<(), String> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = child.as_mut()
            && matches!(c.try_wait(), Ok(None))
        {
            return Err(format!(
                "{}: mariadbd already runs (pid {})",
                self.name(),
                c.id()
            ));
        }
        let out_path = self.dir.join("mariadbd.out");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .map_err(|e| format!("{}: {}: {e}", self.name(), out_path.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {}: {e}", self.name(), out_path.display()))?;
        let mut cmd = Command::new(&self.bin.server);
        cmd.arg("--no-defaults");
        if is_root() {
            cmd.arg("--user=root");
        }
        cmd.arg(format!("--datadir={}", self.data_dir().display()))
            .arg(format!("--socket={}", self.socket_path().display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("mariadbd.pid").display()
            ))
            .arg(format!("--log-error={}", self.log_path().display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg("--skip-name-resolve")
            .arg(format!("--log-bin={BINLOG_BASENAME}"))
            .arg("--binlog-format=ROW")
            .arg("--binlog-row-image=FULL")
            .arg("--binlog-row-metadata=FULL")
            .arg(format!("--server-id={}", self.options.server_id))
            // The server's own default is latin1 (before 11.6).
            .arg("--character-set-server=utf8mb4")
            .arg(INNODB_LOG_FILE_SIZE)
            .arg(INNODB_BUFFER_POOL_SIZE)
            .args(&self.options.extra_args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let spawned = cmd.spawn().map_err(|e| {
            format!(
                "{}: cannot run {}: {e}",
                self.name(),
                self.bin.server.display()
            )
        })?;
        *child = Some(spawned);
        Ok(())
    }

    /// Polls (with a capped backoff) until the server accepts a client
    /// over TCP, the way the sidecars connect; an error at once when the
    /// server exits.
    async fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut delay = Duration::from_millis(10);
        loop {
            let last = match self.sql("SELECT 1").await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if !self.running() {
                return Err(format!(
                    "{}: mariadbd exited before accepting connections on port {}\n{}",
                    self.name(),
                    self.port,
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{}: MariaDB on port {} does not accept connections within {READY_TIMEOUT:?}: {last}\n{}",
                    self.name(),
                    self.port,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now()))).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// A connection as root to database `db` (`None`: no default
    /// database), over TCP as the sidecars connect; cut off after
    /// [`CONNECT_TIMEOUT`].
    pub async fn conn(&self, db: Option<&str>) -> Result<Conn, String> {
        let opts = OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(self.port)
            .user(Some("root"))
            .db_name(db)
            .prefer_socket(false);
        match tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(opts)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(format!(
                "{}: connecting to {}: {e}",
                self.name(),
                self.url(db.unwrap_or(""))
            )),
            Err(_) => Err(format!(
                "{}: connecting to {}: no answer within {CONNECT_TIMEOUT:?}",
                self.name(),
                self.url(db.unwrap_or(""))
            )),
        }
    }

    /// Runs `sql` (one statement) as root on a new connection and returns
    /// its rows as text: one line per row, values separated by tabs,
    /// `NULL` for a null (the `mariadb --batch` client's format).
    pub async fn sql(&self, sql: &str) -> Result<String, String> {
        let mut conn = self.conn(None).await?;
        let rows: Vec<Row> = conn
            .query(sql)
            .await
            .map_err(|e| format!("{}: `{sql}` failed: {e}", self.name()))?;
        let _ = conn.disconnect().await;
        Ok(rows_as_text(rows))
    }

    /// Creates database `name`.
    pub async fn create_database(&self, name: &str) -> Result<(), String> {
        self.sql(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await
            .map(drop)
    }

    /// Creates user `user` (from 127.0.0.1) with `password` and grants it
    /// `privileges` (`SELECT, REPLICATION SLAVE`) on `on` (`*.*`, `app.*`).
    pub async fn create_user(
        &self,
        user: &str,
        password: &str,
        privileges: &str,
        on: &str,
    ) -> Result<(), String> {
        let account = format!("{}@'127.0.0.1'", quote_string(user));
        self.sql(&format!(
            "CREATE USER {account} IDENTIFIED BY {}",
            quote_string(password)
        ))
        .await?;
        self.sql(&format!("GRANT {privileges} ON {on} TO {account}"))
            .await
            .map(drop)
    }

    /// A clean shutdown: SIGTERM, then waits until the server has exited
    /// (and kills it when it has not after a minute). Nothing when the
    /// server does not run.
    pub async fn stop(&self) -> Result<(), String> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut delay = Duration::from_millis(10);
        while self.running() {
            if Instant::now() >= deadline {
                self.kill_blocking();
                return Err(format!(
                    "{}: mariadbd (pid {pid}) did not exit within {STOP_TIMEOUT:?} of SIGTERM, killed it\n{}",
                    self.name(),
                    self.log_tail()
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
        Ok(())
    }

    /// SIGKILL, waited: the next start performs crash recovery.
    pub async fn kill9(&self) {
        self.kill_blocking();
    }

    /// SIGKILL and reaps the server, blocking (for `Drop`; a SIGKILLed
    /// process exits at once).
    pub fn kill_blocking(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut c) = child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data directory and port, and
    /// returns once it accepts connections (after crash recovery, if any).
    pub async fn start_again(&self) -> Result<(), String> {
        self.spawn()?;
        self.wait_ready().await
    }

    /// A clean restart: [`stop`](Self::stop), then
    /// [`start_again`](Self::start_again).
    pub async fn restart(&self) -> Result<(), String> {
        self.stop().await?;
        self.start_again().await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill_blocking();
    }
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: plain kill(2) of our own child; an error (gone) is fine.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Rows in the `mariadb --batch` client's text format.
fn rows_as_text(rows: Vec<Row>) -> String {
    let mut text = String::new();
    for row in rows {
        let values: Vec<String> = row
            .unwrap()
            .into_iter()
            .map(|v| match v {
                Value::NULL => "NULL".to_string(),
                Value::Bytes(b) => String::from_utf8_lossy(&b).into_owned(),
                other => other.as_sql(true).trim_matches('\'').to_string(),
            })
            .collect();
        text.push_str(&values.join("\t"));
        text.push('\n');
    }
    text
}

/// `name` as a quoted identifier.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// `text` as a quoted string literal.
pub fn quote_string(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// Kills the servers left under `/tmp/<prefix>*` by processes killed
/// before they cleaned up (see [`super::host::sweep_orphans`]), and removes
/// their directories (with `keep`, only the owner files), the templates of
/// dead processes ([`TEMPLATE_PREFIX`]) included.
pub fn sweep_orphans(prefix: &str, keep: bool) {
    sweep_dirs(prefix, keep, kill_orphan);
    sweep_dirs(TEMPLATE_PREFIX, false, |_| {});
}

/// Kills the `mariadbd` of the server in `dir`, if it still runs.
fn kill_orphan(dir: &Path) {
    let pid = std::fs::read_to_string(dir.join("mariadbd.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    if let Some(pid) = pid
        && process_cmdline_contains(pid, &dir.to_string_lossy())
    {
        signal_and_wait_blocking(pid, libc::SIGKILL, Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_the_quote_characters() {
        assert_eq!(quote_ident("a`b"), "`a``b`");
        assert_eq!(quote_string(r"it's a\b"), r"'it''s a\\b'");
    }

    #[test]
    fn server_ids_differ_per_server() {
        assert_ne!(Options::new("a").server_id, Options::new("b").server_id);
    }
}
