//! Replays and resyncs started through the admin API (`POST /api/replay`,
//! `POST /api/resync`), cancelled through it (`POST /api/jobs/cancel`).
//!
//! A run is the `sitesync replay|resync` command itself, started as a
//! child process of the sidecar with this connector's file and `--yes`:
//! the very code, checks, job row, progress, resume and audit entry of the
//! command line, with nothing re-implemented here. The child learns who
//! asked ([`crate::audit::CALLER_ENV`], the token's name, for its job row
//! and audit entry) and its run's id ([`crate::jobs::RUN_ENV`], written
//! into its job's `args.run`), which is how a cancel finds the process of
//! a job.
//!
//! Before a run starts, the same command runs with `--dry-run`: a request
//! the command refuses (an unknown route, a route that cannot be inverted,
//! a site that is not in the topology) is answered 400 with the command's
//! own words, and nothing is sent.
//!
//! Cancel sends SIGINT, as Ctrl-C would: a resync stops between two rows
//! once what is in flight is confirmed and saves its cursor (`--resume`
//! goes on from there), a replay stops; either records its job
//! `cancelled` and exits with code 130. The child's output goes to the
//! sidecar's log, one line each, and its last lines are kept for
//! `GET /api/runs`. Children get their own process group, so that a Ctrl-C
//! at the sidecar's terminal does not reach them; the sidecar cancels
//! those still running when it shuts down.

use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use uuid::Uuid;

/// Lines of a child's output kept for `GET /api/runs`.
const KEEP_LINES: usize = 20;

/// How long a dry run may take before it is given up.
const DRY_RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A resync, as `POST /api/resync` takes it: the flags of
/// `sitesync resync`, without `--prune` (it deletes rows at the target:
/// it stays on the command line, where its count is shown and confirmed).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResyncRequest {
    pub to_site: Option<String>,
    #[serde(default)]
    pub routes: Vec<String>,
    #[serde(default)]
    pub all: bool,
    #[serde(rename = "where")]
    pub filter: Option<String>,
    #[serde(default)]
    pub allow_dropped: bool,
    pub rate: Option<u32>,
    pub pack: Option<u32>,
    #[serde(default)]
    pub compress: bool,
    /// Go on with a stopped job (its number in `sitesync_resync`).
    pub resume: Option<i64>,
    /// Refused with the reason: see the type's docs.
    pub prune: Option<bool>,
}

/// A replay, as `POST /api/replay` takes it: the flags of
/// `sitesync replay`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    pub to_site: String,
    pub origin: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub rate: Option<u32>,
}

/// `--flag=value`: a value that starts with `-` stays a value.
fn flag(name: &str, value: impl std::fmt::Display) -> String {
    format!("--{name}={value}")
}

/// The arguments of `sitesync resync` for `r` (without `--dry-run` or
/// `--yes`), or why the request is refused.
pub fn resync_args(connector: &Path, r: &ResyncRequest) -> Result<Vec<String>, String> {
    if r.prune == Some(true) {
        return Err("prune is not offered through the API: it deletes rows at the target, so it runs from the command line, where its count is shown first and confirmed (`sitesync resync … --prune --target-connector FILE`)".into());
    }
    let mut args = vec!["resync".to_string(), flag("connector", connector.display())];
    match r.resume {
        Some(job) => {
            if r.to_site.is_some() || !r.routes.is_empty() || r.all || r.filter.is_some() {
                return Err("resume goes on with the job's own sites, routes and condition: give only \"resume\" (and \"rate\", \"pack\", \"compress\")".into());
            }
            args.push(flag("resume", job));
        }
        None => {
            let Some(to_site) = &r.to_site else {
                return Err("give \"to_site\" (the site whose queue receives the rows), or \"resume\": <job>".into());
            };
            if r.routes.is_empty() != r.all {
                return Err(
                    "give \"routes\": [\"<event type>\", …] or \"all\": true (one of the two)"
                        .into(),
                );
            }
            args.push(flag("to-site", to_site));
            for route in &r.routes {
                args.push(flag("route", route));
            }
            if r.all {
                args.push("--all".into());
            }
            if let Some(filter) = &r.filter {
                args.push(flag("where", filter));
            }
            if r.allow_dropped {
                args.push("--allow-dropped".into());
            }
        }
    }
    if let Some(rate) = r.rate {
        args.push(flag("rate", rate));
    }
    if let Some(pack) = r.pack {
        args.push(flag("pack", pack));
    }
    if r.compress {
        args.push("--compress".into());
    }
    Ok(args)
}

/// The arguments of `sitesync replay` for `r` (without `--dry-run` or
/// `--yes`).
pub fn replay_args(connector: &Path, r: &ReplayRequest) -> Vec<String> {
    let mut args = vec![
        "replay".to_string(),
        flag("connector", connector.display()),
        flag("to-site", &r.to_site),
    ];
    let optional = [
        ("origin", &r.origin),
        ("from", &r.from),
        ("to", &r.to),
        ("type", &r.kind),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            args.push(flag(name, v));
        }
    }
    if let Some(rate) = r.rate {
        args.push(flag("rate", rate));
    }
    args
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Exit {
    Code(i32),
    /// Killed by this signal (not through the API: it sends SIGINT, which
    /// the commands catch).
    Signal(i32),
    /// Its exit could not be read.
    Unknown(String),
}

impl Exit {
    fn of(status: std::io::Result<std::process::ExitStatus>) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(sig)) => Exit::Signal(sig),
                (None, None) => Exit::Unknown(format!("{s}")),
            },
            Err(e) => Exit::Unknown(e.to_string()),
        }
    }

    /// `succeeded (exit code 0)`, `cancelled (exit code 130)`, …
    pub fn describe(&self) -> String {
        match self {
            Exit::Code(0) => "succeeded (exit code 0)".into(),
            Exit::Code(130) => "cancelled (exit code 130)".into(),
            Exit::Code(c) => format!("failed (exit code {c})"),
            Exit::Signal(s) => format!("killed by signal {s}"),
            Exit::Unknown(e) => format!("ended, exit unknown: {e}"),
        }
    }
}

/// One run: a child process and what it said.
pub struct Run {
    pub id: Uuid,
    pub kind: &'static str,
    pub who: String,
    pub args: Vec<String>,
    pub pid: u32,
    pub started: chrono::DateTime<chrono::Utc>,
    lines: Mutex<VecDeque<String>>,
    exit: watch::Receiver<Option<Exit>>,
}

impl Run {
    /// How it ended; `None` while it runs.
    pub fn exit(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Its last lines of output, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Waits until it ends, at most `limit`; how it ended.
    pub async fn wait(&self, limit: Duration) -> Option<Exit> {
        let mut exit = self.exit.clone();
        let ended = tokio::time::timeout(limit, exit.wait_for(Option::is_some)).await;
        match ended {
            Ok(Ok(e)) => e.clone(),
            _ => self.exit(),
        }
    }

    /// Sends SIGINT, as Ctrl-C would; false when it has already ended.
    pub fn interrupt(&self) -> bool {
        if self.exit().is_some() {
            return false;
        }
        // SAFETY: kill has no memory preconditions; the pid is our own
        // child's, which is not reaped (so not reused) before `exit` is set.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGINT) == 0 }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "run": self.id,
            "kind": self.kind,
            "who": self.who,
            "args": self.args,
            "pid": self.pid,
            "started": self.started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "running": self.exit().is_none(),
            "exit": self.exit().map(|e| e.describe()),
            "lines": self.lines(),
        })
    }
}

/// The runs this sidecar started, by id.
pub struct Runs {
    exe: PathBuf,
    runs: Mutex<HashMap<Uuid, Arc<Run>>>,
}

impl Runs {
    /// Runs of this very binary.
    pub fn new() -> Result<Runs, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find the sitesync binary to run: {e}"))?;
        Ok(Runs::of(exe))
    }

    /// Runs of `exe` (tests use a stand-in).
    pub fn of(exe: PathBuf) -> Runs {
        Runs {
            exe,
            runs: Mutex::new(HashMap::new()),
        }
    }

    fn command(&self, args: &[String], who: &str, run: Option<Uuid>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.exe);
        c.args(args)
            .env(crate::audit::CALLER_ENV, who)
            .env_remove(crate::jobs::RUN_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(run) = run {
            c.env(crate::jobs::RUN_ENV, run.to_string());
        }
        c
    }

    /// Runs the command with `--dry-run` to its end: its output when it
    /// succeeds, its output as the error when it refuses.
    pub async fn dry_run(&self, args: &[String], who: &str) -> Result<String, String> {
        let mut args = args.to_vec();
        args.push("--dry-run".into());
        let mut c = self.command(&args, who, None);
        c.kill_on_drop(true);
        let out = tokio::time::timeout(DRY_RUN_TIMEOUT, c.output())
            .await
            .map_err(|_| format!("the dry run did not end within {DRY_RUN_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        match out.status.success() {
            true => Ok(stdout),
            false => Err([stderr, stdout]
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join("\n")),
        }
    }

    /// Starts the command (with `--yes`) as a child process; its run.
    pub fn start(
        &self,
        kind: &'static str,
        args: &[String],
        who: &str,
    ) -> Result<Arc<Run>, String> {
        let id = Uuid::new_v4();
        let mut full = args.to_vec();
        full.push("--yes".into());
        let mut child = self
            .command(&full, who, Some(id))
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
        let pid = child.id().unwrap_or_default();
        let (set_exit, exit) = watch::channel(None);
        let run = Arc::new(Run {
            id,
            kind,
            who: who.to_string(),
            args: full,
            pid,
            started: chrono::Utc::now(),
            lines: Mutex::new(VecDeque::new()),
            exit,
        });
        let readers: Vec<_> = [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        .map(|out| tokio::spawn(keep_lines(run.clone(), out)))
        .collect();
        tracing::info!(run = %id, pid, kind, by = who, "admin API: started `sitesync {}`", args.join(" "));
        let ended = run.clone();
        tokio::spawn(async move {
            let exit = Exit::of(child.wait().await);
            // Its last lines first, then its end.
            for r in readers {
                let _ = r.await;
            }
            tracing::info!(run = %ended.id, pid = ended.pid, kind = ended.kind, "admin API: the run {}", exit.describe());
            // The run's own process counted nothing this sidecar exposes.
            if !matches!(exit, Exit::Code(0) | Exit::Code(130)) {
                crate::metrics::job_failed(ended.kind);
            }
            let _ = set_exit.send(Some(exit));
        });
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, run.clone());
        Ok(run)
    }

    pub fn get(&self, id: Uuid) -> Option<Arc<Run>> {
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Every run, newest first.
    pub fn list(&self) -> Vec<Arc<Run>> {
        let mut all: Vec<Arc<Run>> = self
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|r| std::cmp::Reverse(r.started));
        all
    }

    /// Interrupts every run still going and waits for them, up to `limit`
    /// in all (the sidecar's shutdown).
    pub async fn cancel_all(&self, limit: Duration) {
        let going: Vec<Arc<Run>> = self
            .list()
            .into_iter()
            .filter(|r| r.exit().is_none())
            .collect();
        for r in &going {
            tracing::info!(run = %r.id, pid = r.pid, "admin API: shutting down, interrupting the run");
            r.interrupt();
        }
        let waits = going.iter().map(|r| r.wait(limit));
        futures_util::future::join_all(waits).await;
    }
}

/// Logs each line of a child's output and keeps the last ones.
async fn keep_lines(run: Arc<Run>, out: impl tokio::io::AsyncRead + Unpin) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim_end().to_string();
        if line.is_empty() {
            continue;
        }
        tracing::info!(run = %run.id, kind = run.kind, "{line}");
        let mut kept = run.lines.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == KEEP_LINES {
            kept.pop_front();
        }
        kept.push_back(line);
    }
}

/// The run a job row belongs to (its `args.run`), if the API started it.
pub fn run_of(job: &Value) -> Option<Uuid> {
    job["args"]["run"].as_str().and_then(|r| r.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resync_request_becomes_the_command_s_flags_and_prune_is_refused() {
        let file = Path::new("connectors/paris.toml");
        let r = ResyncRequest {
            to_site: Some("LONDON".into()),
            routes: vec!["item.upsert".into()],
            filter: Some("-1 < r.id".into()),
            rate: Some(100),
            pack: Some(50),
            ..Default::default()
        };
        assert_eq!(
            resync_args(file, &r).unwrap(),
            [
                "resync",
                "--connector=connectors/paris.toml",
                "--to-site=LONDON",
                "--route=item.upsert",
                "--where=-1 < r.id",
                "--rate=100",
                "--pack=50"
            ]
        );
        let resume = ResyncRequest {
            resume: Some(7),
            ..Default::default()
        };
        assert_eq!(
            resync_args(file, &resume).unwrap(),
            ["resync", "--connector=connectors/paris.toml", "--resume=7"]
        );
        let prune = ResyncRequest {
            prune: Some(true),
            ..r
        };
        assert!(
            resync_args(file, &prune)
                .unwrap_err()
                .contains("command line")
        );
        let neither = ResyncRequest {
            to_site: Some("LONDON".into()),
            ..Default::default()
        };
        assert!(resync_args(file, &neither).unwrap_err().contains("\"all\""));
        let mixed = ResyncRequest {
            resume: Some(7),
            all: true,
            ..Default::default()
        };
        assert!(
            resync_args(file, &mixed)
                .unwrap_err()
                .contains("only \"resume\"")
        );
        let unknown = serde_json::from_value::<ResyncRequest>(json!({"to_site": "L", "al": true}));
        assert!(
            unknown
                .unwrap_err()
                .to_string()
                .contains("unknown field `al`")
        );
    }

    #[test]
    fn a_replay_request_becomes_the_command_s_flags() {
        let r = ReplayRequest {
            to_site: "LONDON".into(),
            origin: Some("MADRID".into()),
            kind: Some("customer.*".into()),
            ..Default::default()
        };
        assert_eq!(
            replay_args(Path::new("p.toml"), &r),
            [
                "replay",
                "--connector=p.toml",
                "--to-site=LONDON",
                "--origin=MADRID",
                "--type=customer.*"
            ]
        );
    }

    /// A stand-in for the binary: a shell script that says who runs it,
    /// then waits for SIGINT and exits 130 as the commands do.
    fn stand_in(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("stand-in");
        std::fs::write(
            &script,
            "#!/bin/sh\n\
             case \"$*\" in *--dry-run*) echo \"refused: $SITESYNC_API_CALLER\" >&2; exit 2;; esac\n\
             trap 'echo interrupted; exit 130' INT\n\
             echo \"run $SITESYNC_RUN by $SITESYNC_API_CALLER: $*\"\n\
             while :; do sleep 0.05; done\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    #[tokio::test]
    async fn a_run_is_told_who_and_which_run_keeps_its_lines_and_stops_on_interrupt() {
        let dir = std::env::temp_dir().join(format!("sitesync-runs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let runs = Runs::of(stand_in(&dir));
        let refused = runs.dry_run(&["resync".into()], "alice").await;
        assert_eq!(refused.unwrap_err(), "refused: alice");
        let run = runs.start("resync", &["resync".into()], "alice").unwrap();
        let said = format!("run {} by alice: resync --yes", run.id);
        let mut waited = 0;
        while !run.lines().contains(&said) {
            assert!(waited < 200, "no line {said:?}: {:?}", run.lines());
            tokio::time::sleep(Duration::from_millis(25)).await;
            waited += 1;
        }
        assert_eq!(run.exit(), None);
        assert!(run.interrupt());
        assert_eq!(
            run.wait(Duration::from_secs(10)).await,
            Some(Exit::Code(130))
        );
        assert_eq!(run.lines().last().map(String::as_str), Some("interrupted"));
        assert!(!run.interrupt(), "an ended run is not interrupted again");
        assert_eq!(runs.list().len(), 1);
        assert_eq!(run.to_json()["exit"], "cancelled (exit code 130)");
        let job = json!({"args": {"run": run.id.to_string()}});
        assert_eq!(run_of(&job), Some(run.id));
        assert_eq!(run_of(&json!({"args": {}})), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
