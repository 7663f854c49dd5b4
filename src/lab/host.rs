//! The machine the private servers run on: users, ports, processes, and
//! the directories under `/tmp` that runs leave behind when they are killed.
//!
//! Shared by [`super::pg`] (the demo's and the benchmark's clusters) and the
//! integration tests' harness (`tests/support/`), which starts PostgreSQL
//! clusters and RabbitMQ nodes of its own with the same helpers.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The owner file in a run's directory: the pid of the process that made
/// it. [`sweep_orphans`] uses it to recognise directories (and servers)
/// left behind by a process killed before it could clean up.
pub const OWNER_FILE: &str = "owner.pid";

/// First delay between two polls of a process that should go away.
const POLL_INITIAL: Duration = Duration::from_millis(10);
/// Longest delay between two such polls.
const POLL_MAX: Duration = Duration::from_millis(200);

/// Whether this process runs as root. PostgreSQL refuses to run as root and
/// RabbitMQ's Debian scripts expect the `rabbitmq` user, so as root the
/// servers run as those users (through [`command_as`]).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of a local user, `None` when the user does not exist.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    // SAFETY: getpwnam returns either NULL or a pointer to a static passwd
    // record, read at once (both fields are plain integers copied out).
    unsafe {
        let pw = libc::getpwnam(cname.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    }
}

/// A short random lowercase hex token (`len` ≤ 32 characters).
pub fn random_hex(len: usize) -> String {
    let mut s = uuid::Uuid::new_v4().simple().to_string();
    s.truncate(len);
    s
}

/// Ports never handed to a private server even when they happen to be free
/// right now: the machine's own RabbitMQ (5672, 25672, and 15672 or 15692
/// should plugins get enabled), epmd (4369), PostgreSQL (5432), and the
/// range RabbitMQ's CLI tools bind for their own Erlang distribution
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
/// a server is stopped, and a start on the same port (the clients have the
/// URL) would then fail. A candidate is accepted once binding it succeeds;
/// the listener is closed again, so another process may still grab it
/// before the server binds it, which is why first starts retry on "address
/// in use". Ports already handed out by this process are never handed out
/// again, which rules out collisions between servers started at once.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
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
            match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
                Ok(addr) => addr.port(),
                Err(_) => continue,
            }
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

/// A command that runs `program` as the system user `user` when this
/// process is root (`runuser -u USER -- env K=V… PROGRAM`), or directly as
/// the current user otherwise.
///
/// `envs` are passed through `env(1)` rather than `Command::env` because
/// `runuser` resets `HOME` (and `USER`, `LOGNAME`, `SHELL`) to the target
/// user's, while RabbitMQ needs `HOME` to find the node's Erlang cookie.
/// The working directory is `cwd`: the target user may not be able to enter
/// this process's working directory. Standard input is closed.
pub fn command_as(
    user: Option<&str>,
    program: &Path,
    envs: &[(String, String)],
    cwd: &Path,
) -> Command {
    let mut cmd = match user {
        Some(user) if is_root() => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--", "env"]);
            c
        }
        _ => Command::new("env"),
    };
    for (k, v) in envs {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg(program);
    cmd.current_dir(cwd);
    cmd.stdin(Stdio::null());
    cmd
}

/// A finished command's status and output, for error messages.
pub fn describe_output(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last `lines` lines of a (log) file, or a note saying why it could
/// not be read: error messages show the server's side of the story.
pub fn tail_file(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(raw) => tail(&String::from_utf8_lossy(&raw), lines),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
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
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).contains(needle))
        .unwrap_or(false)
}

/// Sends `signal` to `pid` and waits (polling, at most `timeout`) until the
/// process is gone. Returns whether it is gone. Blocking: used from `Drop`.
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

/// SIGKILLs every process (other than this one) whose command line mentions
/// `dir`. Used only on directories of dead processes.
fn kill_processes_mentioning(dir: &Path) {
    let needle = dir.to_string_lossy();
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
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

/// Creates the directory `path` with permissions `mode` and records this
/// process as its owner ([`OWNER_FILE`]), for [`sweep_orphans`]. Nothing
/// is left behind when a step fails after the creation.
pub fn create_owned_dir(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::create_dir(path)?;
    let done = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::write(path.join(OWNER_FILE), std::process::id().to_string()));
    if done.is_err() {
        let _ = std::fs::remove_dir_all(path);
    }
    done
}

/// Cleans up after processes that died without cleaning up (killed by a
/// timeout, `SIGKILL`, aborted): for every `/tmp/<prefix>*` directory whose
/// owner process ([`OWNER_FILE`]) no longer exists, calls `stop_server`
/// (which must stop whatever server runs out of it), kills whatever else
/// still runs out of it, then removes the directory — or, with `keep`, only
/// its owner file (the directory stays for a post-mortem and is not swept
/// again).
///
/// Directories of live processes — other runs, other test binaries running
/// at the same time — are never touched. Best effort: errors are ignored.
pub fn sweep_orphans(prefix: &str, keep: bool, stop_server: impl Fn(&Path)) {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(prefix) {
            continue;
        }
        let dir = entry.path();
        let owner_file = dir.join(OWNER_FILE);
        let Some(owner) = std::fs::read_to_string(&owner_file)
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
        // was interrupted, a `runuser` wrapper, a sidecar, ...).
        kill_processes_mentioning(&dir);
        if keep {
            let _ = std::fs::remove_file(&owner_file);
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_handed_out_twice_nor_reserved() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        assert!(ports.iter().all(|&p| !reserved_port(p) && p >= 10000));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 3), "");
    }
}
