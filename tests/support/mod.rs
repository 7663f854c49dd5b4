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
//! * [`mariadb::MariaDb`]: a private MariaDB server (ROW binlog with full
//!   row metadata) on a random port, which can be stopped, killed and
//!   started again on the same data directory and port.
//! * [`rabbit`]: helpers for the machine's shared RabbitMQ broker (unique
//!   names, queue length, draining) and [`rabbit::PrivateRabbit`], a private
//!   RabbitMQ node for tests that stop and start the broker.
//! * [`wait_for`] / [`wait_for_value`]: polling with capped backoff, because
//!   everything in this system is asynchronous and fixed sleeps are either
//!   flaky or slow.
//! * [`TestDir`]: a temporary directory that disappears on drop (unless
//!   `SITESYNC_KEEP_TEST_DIRS` is set, for post-mortems).
//!
//! The helpers about the machine (free ports, users, running a command as
//! another user, processes, the directories of dead runs) are the
//! library's, `sitesync::lab::host`, which the demo's and the benchmark's
//! clusters use too; they are re-exported here.
//!
//! The module is compiled into several test binaries (`tests/main.rs`,
//! `tests/harness_selftest.rs`), each of which uses only part of it, hence
//! the crate-wide `dead_code` allowance below.

#![allow(dead_code)]

pub mod admin;
pub mod mariadb;
pub mod mesh;
pub mod pg;
pub mod proxy;
pub mod rabbit;
pub mod sidecar;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use sitesync::lab::host::{
    command_as, describe_output, free_port, is_root, process_alive, process_cmdline_contains,
    random_hex, signal_and_wait_blocking, tail_file, user_ids,
};
use sitesync::lab::host::{create_owned_dir, sweep_orphans as sweep_owned_dirs};

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

/// Whether `SITESYNC_KEEP_TEST_DIRS` is set (to a non-empty value).
pub fn keep_dirs() -> bool {
    std::env::var_os(KEEP_DIRS_ENV).is_some_and(|v| !v.is_empty())
}

/// A temporary directory under `/tmp`, removed (recursively) on drop unless
/// `SITESYNC_KEEP_TEST_DIRS` is set.
///
/// Always `/tmp`, not `$TMPDIR`: the path must stay short (PostgreSQL puts
/// its Unix socket in it and socket paths are limited to 107 bytes) and must
/// be reachable by the `postgres`/`rabbitmq` users when tests run as root.
///
/// It holds an owner file with the pid of the test process that created it
/// (`sitesync::lab::host::OWNER_FILE`), by which [`TestDir::sweep_orphans`]
/// recognises directories (and servers) left behind by a test process that
/// was killed before its destructors could run.
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
            match create_owned_dir(&path, 0o700) {
                Ok(()) => {
                    return Ok(TestDir {
                        path,
                        keep: keep_dirs(),
                    });
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
    /// (which must stop whatever server runs out of it), kills whatever else
    /// runs out of it, and then removes the directory (unless
    /// `SITESYNC_KEEP_TEST_DIRS` is set).  See `sitesync::lab::host::sweep_orphans`.
    ///
    /// Directories of live processes — including other test binaries running
    /// at the same time — are never touched.  Best effort: errors are ignored.
    pub fn sweep_orphans(prefix: &str, stop_server: impl Fn(&Path)) {
        sweep_owned_dirs(prefix, keep_dirs(), stop_server);
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "{KEEP_DIRS_ENV} is set: keeping test directory {}",
                self.path.display()
            );
            let _ = fs::remove_file(self.path.join(sitesync::lab::host::OWNER_FILE));
        } else {
            let _ = fs::remove_dir_all(&self.path);
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

/// Cleans up after dead test processes, once per test process: stops the
/// PostgreSQL clusters, MariaDB servers and RabbitMQ nodes they left behind
/// and removes their directories (see [`TestDir::sweep_orphans`]).  Called
/// by [`pg::PgCluster::start`], [`mariadb::MariaDb::start`] and
/// [`rabbit::PrivateRabbit::start`], so that orphans of every kind go away
/// whichever server a later run starts.
pub fn sweep_orphans_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        pg::sweep_orphans();
        mariadb::sweep_orphans();
        rabbit::sweep_orphans();
    });
}
