//! Integration-test harness for sitesync.
//!
//! sitesync moves rows from PostgreSQL logical replication into RabbitMQ, and
//! the interesting bugs (lost or duplicated messages, slots that do not
//! advance, crash recovery) only show up against real servers.  This module
//! gives every test its own throw-away servers so that tests can crash,
//! restart and reconfigure them without interfering with each other or with
//! the machine's own services:
//!
//! * [`pg::PgCluster`]: a private PostgreSQL cluster (`wal_level=logical`)
//!   on a random port, which can be stopped immediately (crash) and started
//!   again on the same data directory and port.
//! * [`rabbit`]: helpers for the machine's shared RabbitMQ broker (unique
//!   names, queue length, draining) and [`rabbit::PrivateRabbit`], a private
//!   RabbitMQ node for tests that stop and start the broker.
//! * [`wait_for`] / [`wait_for_value`]: polling with capped backoff, because
//!   everything in this system is asynchronous and fixed sleeps are either
//!   flaky or slow.
//! * [`TestDir`]: a temporary directory that disappears on drop (unless
//!   `SITESYNC_KEEP_TEST_DIRS` is set, for post-mortems).
//!
//! The module is compiled into several test binaries (`tests/main.rs`,
//! `tests/harness_selftest.rs`), each of which uses only part of it, hence
//! the crate-wide `dead_code` allowance below.

#![allow(dead_code)]

pub mod mesh;
pub mod pg;
pub mod proxy;
pub mod rabbit;
pub mod sidecar;

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Environment variable that, when set to a non-empty value, keeps every
/// [`TestDir`] (server data directories and logs) after the test finishes.
pub const KEEP_DIRS_ENV: &str = "SITESYNC_KEEP_TEST_DIRS";

/// First delay between two polls of [`wait_for`].
const POLL_INITIAL: Duration = Duration::from_millis(10);
/// Longest delay between two polls of [`wait_for`]: keeps the latency added
/// to a test small once the condition becomes true.
const POLL_MAX: Duration = Duration::from_millis(200);

/// Polls `cond` until it returns `true`, sleeping between attempts with an
/// exponential backoff (10 ms doubling up to 200 ms).
///
/// Returns `Err` with a description (elapsed time, number of attempts) when
/// `timeout` passes first.  A single call of `cond` that hangs is cut off at
/// the deadline as well, so a broker that accepts TCP but never answers
/// cannot hang the test.  `cond` is always called at least once.
///
/// Accepts async closures (`async || ...`) as well as `|| async { ... }`.
///
/// ```ignore
/// wait_for(async || rabbit::queue_len(&url, &q).await == Some(3), Duration::from_secs(10))
///     .await
///     .expect("three messages published");
/// ```
pub async fn wait_for<F>(mut cond: F, timeout: Duration) -> Result<(), String>
where
    F: AsyncFnMut() -> bool,
{
    wait_for_value(async || cond().await.then_some(()), timeout).await
}

/// Like [`wait_for`], but the closure returns `Some(value)` once the
/// condition holds, and that value is returned.
pub async fn wait_for_value<T, F>(mut f: F, timeout: Duration) -> Result<T, String>
where
    F: AsyncFnMut() -> Option<T>,
{
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = POLL_INITIAL;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(_) => {
                return Err(format!(
                    "condition not met within {timeout:?}: attempt {attempts} was still \
                     running at the deadline (elapsed {:?})",
                    start.elapsed()
                ));
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(format!(
                "condition not met within {timeout:?} ({attempts} attempts, elapsed {:?})",
                start.elapsed()
            ));
        }
        // Never sleep past the deadline, but always poll once more at it.
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(POLL_MAX);
    }
}

/// A short random lowercase hex token (`len` ≤ 32 characters).
pub fn random_hex(len: usize) -> String {
    let mut s = uuid::Uuid::new_v4().simple().to_string();
    s.truncate(len);
    s
}

/// Name of the file, inside every [`TestDir`], holding the pid of the test
/// process that created it.  [`TestDir::sweep_orphans`] uses it to recognise
/// directories (and servers) left behind by a test process that was killed
/// before its destructors could run.
const OWNER_FILE: &str = "owner.pid";

/// A temporary directory under `/tmp`, removed (recursively) on drop unless
/// `SITESYNC_KEEP_TEST_DIRS` is set.
///
/// Always `/tmp`, not `$TMPDIR`: the path must stay short (PostgreSQL puts
/// its Unix socket in it and socket paths are limited to 107 bytes) and must
/// be reachable by the `postgres`/`rabbitmq` users when tests run as root.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
    keep: bool,
}

impl TestDir {
    /// Creates `/tmp/<prefix><8 hex chars>` (mode 0700) and records the
    /// current process as its owner.
    pub fn new(prefix: &str) -> io::Result<TestDir> {
        loop {
            let path = PathBuf::from(format!("/tmp/{prefix}{}", random_hex(8)));
            match fs::create_dir(&path) {
                Ok(()) => {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o700))?;
                    fs::write(path.join(OWNER_FILE), std::process::id().to_string())?;
                    let keep = std::env::var_os(KEEP_DIRS_ENV).is_some_and(|v| !v.is_empty());
                    return Ok(TestDir { path, keep });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the directory will be kept on drop.
    pub fn kept(&self) -> bool {
        self.keep
    }

    /// Cleans up after test processes that died without running destructors
    /// (killed by a timeout, `SIGKILL`, aborted): for every `/tmp/<prefix>*`
    /// directory whose owner process no longer exists, calls `stop_server`
    /// (which must stop whatever server runs out of it) and then removes the
    /// directory (unless `SITESYNC_KEEP_TEST_DIRS` is set).
    ///
    /// Directories of live processes — including other test binaries running
    /// at the same time — are never touched.  Best effort: errors are ignored.
    pub fn sweep_orphans(prefix: &str, stop_server: impl Fn(&Path)) {
        let Ok(entries) = fs::read_dir("/tmp") else {
            return;
        };
        let keep = std::env::var_os(KEEP_DIRS_ENV).is_some_and(|v| !v.is_empty());
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with(prefix) {
                continue;
            }
            let dir = entry.path();
            let owner_file = dir.join(OWNER_FILE);
            let Some(owner) = fs::read_to_string(&owner_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            else {
                continue;
            };
            if process_alive(owner) {
                continue;
            }
            stop_server(&dir);
            // Whatever else still runs out of the directory (an `initdb` that
            // was interrupted, a `runuser` wrapper, ...).
            kill_processes_mentioning(&dir);
            if keep {
                let _ = fs::remove_file(&owner_file);
            } else {
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "{KEEP_DIRS_ENV} is set: keeping test directory {}",
                self.path.display()
            );
            let _ = fs::remove_file(self.path.join(OWNER_FILE));
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Ports that must never be handed to a private server even if they happen
/// to be free right now: the machine's own RabbitMQ (5672, 25672, and 15672
/// or 15692 should plugins get enabled), epmd (4369), PostgreSQL (5432), and
/// the range RabbitMQ's CLI tools bind for their own Erlang distribution
/// (35672–35682 by default).
fn reserved_port(port: u16) -> bool {
    matches!(
        port,
        4369 | 5432 | 5672 | 15672 | 15692 | 25672 | 35672..=35682
    )
}

/// A currently free TCP port on 127.0.0.1 for a private server.
///
/// Ports are picked at random *below* the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`, 32768–60999 by default): a port in that
/// range could be taken as the local port of some outgoing connection while
/// a test has its server stopped, and `start_again` (which must reuse the
/// port: the code under test has the URL) would then fail.  A candidate is
/// accepted once binding it succeeds; the listener is closed again, so
/// another process may still grab it before the server binds it, which is
/// why first starts retry on "address in use".  Ports already handed out by
/// this process are never handed out again, which rules out collisions
/// between tests running in parallel threads.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_start = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = ephemeral_start.max(11000);
    let low = high.saturating_sub(12000).max(10000);
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    for attempt in 0.. {
        let port = if attempt < 500 {
            let r = uuid::Uuid::new_v4().as_u128() as u64;
            low + (r % u64::from(high - low)) as u16
        } else {
            // Fallback: let the kernel choose (ephemeral range).
            let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            l.local_addr().expect("local_addr").port()
        };
        if reserved_port(port) || handed.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.insert(port);
            return port;
        }
    }
    unreachable!("the loop only ends by returning a port")
}

/// Whether the test process runs as root.  PostgreSQL refuses to run as root
/// and RabbitMQ's Debian scripts expect the `rabbitmq` user, so as root the
/// harness runs servers as those users (via `runuser`).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of a local user, `None` when the user does not exist.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    // SAFETY: getpwnam returns either NULL or a pointer to a static passwd
    // record, which we read immediately.  Tests call this rarely; the static
    // buffer is only a concern for concurrent calls, and both fields are
    // plain integers copied out at once.
    unsafe {
        let pw = libc::getpwnam(cname.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    }
}

/// Recursively changes the owner of `path` to `uid:gid` (no symlink
/// following), so that a server running as another user can use a directory
/// prepared by the (root) test process.
pub fn chown_recursive(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_recursive(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Whether a process with this pid exists (zombies included).
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 performs only the existence/permission check.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether the command line of process `pid` mentions `needle`: guards
/// against signalling an unrelated process that reused a stale pid.
pub fn process_cmdline_contains(pid: i32, needle: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).contains(needle))
        .unwrap_or(false)
}

/// Cleans up after dead test processes, once per test process: stops the
/// PostgreSQL clusters and RabbitMQ nodes they left behind and removes their
/// directories (see [`TestDir::sweep_orphans`]).  Called by
/// [`pg::PgCluster::start`] and [`rabbit::PrivateRabbit::start`], so that
/// orphans of both kinds go away whichever server a later run starts.
pub fn sweep_orphans_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        pg::sweep_orphans();
        rabbit::sweep_orphans();
    });
}

/// SIGKILLs every process (other than this one) whose command line mentions
/// `dir`.  Used only on directories of dead test processes.
fn kill_processes_mentioning(dir: &Path) {
    let needle = dir.to_string_lossy();
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid != me && process_cmdline_contains(pid, &needle) {
            signal_and_wait_blocking(pid, libc::SIGKILL, Duration::from_secs(5));
        }
    }
}

/// Sends `signal` to `pid` and waits (polling, at most `timeout`) until the
/// process is gone.  Returns whether it is gone.  Blocking: used from `Drop`.
pub fn signal_and_wait_blocking(pid: i32, signal: i32, timeout: Duration) -> bool {
    // SAFETY: plain kill(2); errors (already gone) are fine.
    unsafe {
        libc::kill(pid, signal);
    }
    let deadline = Instant::now() + timeout;
    let mut delay = POLL_INITIAL;
    while process_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(POLL_MAX);
    }
    true
}

/// Last `lines` lines of a (log) file, or a note saying why it could not be
/// read.  Used in panic messages so that a failing test shows the server's
/// side of the story.
pub fn tail_file(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(raw) => {
            let text = String::from_utf8_lossy(&raw);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Builds a command that runs `program` as the system user `user` when the
/// test process is root (`runuser -u USER -- env K=V… PROGRAM`), or directly
/// as the current user otherwise.
///
/// `envs` are passed through `env(1)` rather than `Command::env` because
/// `runuser` resets `HOME` (and `USER`, `LOGNAME`, `SHELL`) to the target
/// user's, while RabbitMQ needs `HOME` to find the node's Erlang cookie.
/// The working directory is `cwd`: the target user may not be able to enter
/// the test process's working directory.
pub fn command_as(
    user: Option<&str>,
    program: &Path,
    envs: &[(String, String)],
    cwd: &Path,
) -> std::process::Command {
    let mut cmd = match user {
        Some(user) if is_root() => {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", user, "--", "env"]);
            c
        }
        _ => std::process::Command::new("env"),
    };
    for (k, v) in envs {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg(program);
    cmd.current_dir(cwd);
    cmd.stdin(std::process::Stdio::null());
    cmd
}
