//! Private PostgreSQL clusters for `sitesync demo` and `sitesync bench`:
//! `initdb` and `pg_ctl` from the installed server binaries (as the
//! `postgres` user when run as root), `wal_level=logical`,
//! `track_commit_timestamp=on`, random ports, a directory under `/tmp`.

use crate::config::redact_url;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

/// The owner file in a run's directory: the pid of the process that made it.
pub(crate) const OWNER_FILE: &str = "owner.pid";

/// The server runs as this user when sitesync runs as root.
pub(crate) const PG_USER: &str = "postgres";

const MISSING_BINARIES: &str = "PostgreSQL server binaries not found under /usr/lib/postgresql/<version>/bin: install them with `apt-get install postgresql` (or give the databases' URLs)";

/// How many ports a first start may try (another process may take one
/// between the check and the server's bind).
pub(crate) const PORT_ATTEMPTS: usize = 5;

/// A private cluster in `dir` (`dir/data`, `dir/server.log`, the socket).
pub(crate) struct Cluster {
    pub(crate) site: &'static str,
    pub(crate) dir: PathBuf,
    pub(crate) bin: PathBuf,
    /// `Some("postgres")` when the commands run through `runuser`.
    pub(crate) user: Option<&'static str>,
    pub(crate) owner: Option<(u32, u32)>,
    pub(crate) port: u16,
    /// Ports to try, in order.
    pub(crate) ports: Vec<u16>,
    /// Set when the demo is interrupted: do not start the server.
    pub(crate) cancel: Arc<AtomicBool>,
    /// More `postgresql.conf` lines (the benchmark's statement statistics).
    pub(crate) extra_settings: String,
}

impl Cluster {
    pub(crate) fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub(crate) fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub(crate) fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub(crate) fn command(&self, tool: &str) -> std::process::Command {
        let program = self.bin.join(tool);
        let mut cmd = match self.user {
            Some(user) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => std::process::Command::new(program),
        };
        // The server's user may not be able to enter our working directory.
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    pub(crate) async fn run(
        &self,
        tool: &str,
        args: &[&str],
    ) -> Result<std::process::Output, String> {
        let mut cmd = self.command(tool);
        cmd.args(args);
        tokio::process::Command::from(cmd)
            .output()
            .await
            .map_err(|e| format!("{}: cannot run {tool}: {e}", self.site))
    }

    pub(crate) async fn start(&mut self) -> Result<(), String> {
        let data = self.data().to_string_lossy().into_owned();
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
                    // Whatever LANG says (it may name a locale not installed).
                    "--locale=C",
                ],
            )
            .await?;
        if !out.status.success() {
            return Err(format!("{}: initdb failed: {}", self.site, describe(&out)));
        }
        let conf = self.data().join("postgresql.conf");
        let mut text =
            std::fs::read_to_string(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
        text.push_str("\ninclude = 'sitesync_demo.conf'\n");
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;

        if self.cancel.load(Ordering::SeqCst) {
            return Err(format!("{}: interrupted", self.site));
        }
        let log = self.log().to_string_lossy().into_owned();
        for (attempt, port) in self.ports.clone().into_iter().enumerate() {
            self.port = port;
            self.write_settings()?;
            let before = std::fs::metadata(self.log()).map_or(0, |m| m.len());
            // `-w`: pg_ctl waits until the server accepts connections, or
            // notices that it died (a port taken, say).
            let out = self
                .run(
                    "pg_ctl",
                    &["start", "-D", &data, "-l", &log, "-w", "-t", "60"],
                )
                .await?;
            if out.status.success() {
                return self.wait_ready().await;
            }
            let new_log = std::fs::read(self.log())
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
            if !port_taken || attempt + 1 == self.ports.len() {
                return Err(format!(
                    "{}: PostgreSQL did not start on port {port}: {}\n--- {} ---\n{}",
                    self.site,
                    describe(&out),
                    self.log().display(),
                    tail(&new_log, 20)
                ));
            }
        }
        unreachable!("the last attempt returns")
    }

    pub(crate) fn write_settings(&self) -> Result<(), String> {
        let path = self.data().join("sitesync_demo.conf");
        let text = format!(
            "# Written by `sitesync demo`: a throw-away cluster.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{socket}'\n\
             wal_level = logical\n\
             # Last-writer-wins compares local writes by their commit time.\n\
             track_commit_timestamp = on\n\
             max_replication_slots = 10\n\
             max_wal_senders = 10\n\
             shared_buffers = 32MB\n\
             fsync = off\n\
             log_min_messages = warning\n\
             {extra}",
            port = self.port,
            socket = self.dir.display(),
            extra = self.extra_settings,
        );
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// `pg_ctl -w` waited already; this checks over TCP, the way the
    /// sidecars connect, polling.
    pub(crate) async fn wait_ready(&self) -> Result<(), String> {
        let url = self.url("postgres");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut delay = Duration::from_millis(10);
        loop {
            let last = match tokio::time::timeout(
                Duration::from_secs(5),
                tokio_postgres::connect(&url, NoTls),
            )
            .await
            {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer within 5 s".to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "{}: PostgreSQL on port {} does not accept connections: {last}\n{}",
                    self.site,
                    self.port,
                    tail(&std::fs::read_to_string(self.log()).unwrap_or_default(), 20)
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    pub(crate) fn running(&self) -> bool {
        self.data().join("postmaster.pid").exists()
    }

    pub(crate) async fn stop(&self) -> Result<(), String> {
        if !self.running() {
            return Ok(());
        }
        let data = self.data().to_string_lossy().into_owned();
        let out = self
            .run(
                "pg_ctl",
                &["stop", "-D", &data, "-m", "fast", "-w", "-t", "30"],
            )
            .await?;
        if out.status.success() || !self.running() {
            return Ok(());
        }
        self.stop_blocking();
        if self.running() {
            Err(format!(
                "{}: pg_ctl stop failed: {}",
                self.site,
                describe(&out)
            ))
        } else {
            Ok(())
        }
    }

    /// `pg_ctl stop -m immediate`, blocking (for `Drop`).
    pub(crate) fn stop_blocking(&self) {
        if !self.running() {
            return;
        }
        let _ = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "-t", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A connection whose driver runs as a task.
pub(crate) async fn connect(url: &str) -> Result<Client, String> {
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
pub(crate) fn find_bin_dir() -> Result<PathBuf, String> {
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
pub(crate) fn highest_version(found: Vec<(String, PathBuf)>) -> Option<PathBuf> {
    found
        .into_iter()
        .filter_map(|(name, bin)| {
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of a local user.
pub(crate) fn user_ids(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns NULL or a pointer to a static record, read at once.
    unsafe {
        let pw = libc::getpwnam(cname.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    }
}

/// A free TCP port on 127.0.0.1, below the ephemeral range (so no outgoing
/// connection takes it meanwhile), never one of the well-known servers'.
pub(crate) fn free_port(taken: &mut HashSet<u16>) -> u16 {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = ephemeral.max(11000);
    let low = high.saturating_sub(12000).max(10000);
    loop {
        let port = low + (uuid::Uuid::new_v4().as_u128() % u128::from(high - low)) as u16;
        if matches!(port, 15672 | 15692 | 25672 | 35672..=35682) || taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
}

pub(crate) fn random_hex(len: usize) -> String {
    let mut s = uuid::Uuid::new_v4().simple().to_string();
    s.truncate(len);
    s
}

pub(crate) fn describe(out: &std::process::Output) -> String {
    format!(
        "{}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// An error and its causes (tokio-postgres keeps "connection refused" in
/// the source).
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
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

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stops the clusters left under `/tmp/<prefix>*` by runs that were
/// killed before cleaning up (the pid in their owner file is gone), and
/// removes their directories.
pub(crate) fn sweep_orphans(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let dir = entry.path();
        let Some(owner) = std::fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(owner, 0) == 0 }
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if alive {
            continue;
        }
        let clusters = std::fs::read_dir(&dir).into_iter().flatten().flatten();
        for cluster in clusters {
            let pid_file = cluster.path().join("data").join("postmaster.pid");
            let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()));
            if ours {
                // SIGQUIT is `pg_ctl stop -m immediate`.
                // SAFETY: plain kill(2) of the postmaster found above.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
                let deadline = Instant::now() + Duration::from_secs(10);
                // SAFETY: as above, signal 0.
                while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
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
