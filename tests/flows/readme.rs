//! The README and the docs as a newcomer meets them: every relative link
//! leads somewhere, and the three-site walkthrough runs as it is written.

use crate::support::TestDir;
use crate::support::pg::PgCluster;
use crate::support::rabbit;
use crate::support::sidecar::{Names, binary};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every Markdown file under docs/.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    let mut dirs = vec![repo().join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read docs/") {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The anchor GitHub gives a heading: lower case, spaces to `-`, and every
/// character other than letters, digits, `-` and `_` left out.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c.to_lowercase().next().unwrap_or(c)),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks).
fn anchors(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.push(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// The targets of a Markdown file's inline links, outside code: the text
/// between `](` and `)`.
fn link_targets(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

/// Every link of the README and the docs that stays in this repository
/// names a file or directory that exists, and every `#anchor` a heading of
/// that file: the README's move into docs/ left no link behind.
#[test]
fn every_link_of_the_readme_and_the_docs_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            let here = file.strip_prefix(repo()).unwrap().display().to_string();
            if !resolved.exists() {
                broken.push(format!("{here}: {target}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                let body = std::fs::read_to_string(&resolved).unwrap_or_default();
                if !anchors(&body).iter().any(|a| a == anchor) {
                    broken.push(format!("{here}: {target}: no such heading"));
                }
            }
        }
    }
    assert!(
        checked > 30,
        "only {checked} links found: is the parser right?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The text of a Markdown file's code: code blocks and `code spans`.
fn code_of(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if fenced {
            out.push(line.to_string());
        } else {
            out.extend(line.split('`').skip(1).step_by(2).map(str::to_string));
        }
    }
    out
}

/// The commands a piece of code runs as `sitesync <word> [<word>]`.
fn commands_named(code: &str) -> Vec<Vec<String>> {
    let word = |w: &str| {
        !w.is_empty()
            && w.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && w.chars().all(|c| c.is_ascii_lowercase() || c == '-')
    };
    let tokens: Vec<&str> = code.split_whitespace().collect();
    let mut out = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        // A command begins the code, or follows a shell operator: not
        // "another sitesync holds the store" in a quoted log line.
        let starts = i == 0 || ["&&", "||", "|", ";", "$", "do", "then"].contains(&tokens[i - 1]);
        if *t != "sitesync" || !starts {
            continue;
        }
        let words: Vec<String> = tokens[i + 1..]
            .iter()
            .take(2)
            .take_while(|w| word(w))
            .map(|w| w.to_string())
            .collect();
        if !words.is_empty() {
            out.push(words);
        }
    }
    out
}

/// Every `sitesync <command>` that the README and the docs show in code
/// is a command of this binary (`--help` answers for it): a renamed or
/// removed command cannot linger in the docs.
#[test]
fn every_command_the_docs_show_exists() {
    let mut named = std::collections::BTreeSet::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for code in code_of(&text) {
            named.extend(commands_named(&code));
        }
    }
    let help = |args: &[String]| {
        Command::new(binary())
            .args(args)
            .arg("--help")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let mut unknown = Vec::new();
    let mut checked = std::collections::BTreeSet::new();
    for words in &named {
        // `sitesync dlq list`, or `sitesync check` followed by an argument.
        if help(words) {
            checked.insert(words.join(" "));
        } else if help(&words[..1]) {
            checked.insert(words[0].clone());
        } else {
            unknown.push(words.join(" "));
        }
    }
    for expected in [
        "init",
        "check",
        "topology declare",
        "run",
        "status",
        "dlq requeue",
    ] {
        assert!(
            checked.contains(expected),
            "the docs never show `sitesync {expected}`: {checked:?}"
        );
    }
    assert!(
        unknown.is_empty(),
        "the docs show commands sitesync does not have: {unknown:?}"
    );
}

#[test]
fn the_slug_of_a_heading_is_githubs() {
    assert_eq!(
        slug(" Conflicts: last writer wins"),
        "conflicts-last-writer-wins"
    );
    assert_eq!(
        slug(" `sitesync dlq list` and `sitesync dlq requeue`"),
        "sitesync-dlq-list-and-sitesync-dlq-requeue"
    );
    assert_eq!(
        slug(" What it prints, and the last figures"),
        "what-it-prints-and-the-last-figures"
    );
}

/// The shell blocks between `<!-- walkthrough -->` and
/// `<!-- /walkthrough -->`, in order, as one script.
fn walkthrough(readme: &str) -> String {
    let start = readme
        .find("<!-- walkthrough -->")
        .expect("the README marks its walkthrough with <!-- walkthrough -->");
    let end = readme
        .find("<!-- /walkthrough -->")
        .expect("the README ends its walkthrough with <!-- /walkthrough -->");
    let mut script = String::new();
    let mut in_sh = false;
    for line in readme[start..end].lines() {
        match (in_sh, line.trim_end()) {
            (false, "```sh") => in_sh = true,
            (true, "```") => {
                in_sh = false;
                script.push('\n');
            }
            (true, l) => {
                script.push_str(l);
                script.push('\n');
            }
            _ => {}
        }
    }
    script
}

/// The README's install step, as written.
const INSTALL: &str = "cargo install --locked --path .";

/// The README's walkthrough, every command as written, in one shell
/// (`bash -e`), from the repository's top directory, against a private
/// PostgreSQL cluster (three databases owned by a role that is not a
/// superuser, as the walkthrough's preparation makes them)
/// and the local RabbitMQ. The environment is what the walkthrough tells a
/// user to set: the three database URLs; beside them the test points the
/// topology file at names of its own (so that it shares the broker with
/// other tests), the checkpoint stores and `cargo install`'s root at its
/// directory, and puts that root's `bin` first on PATH.
///
/// One change to a command: `cargo install` gets `--debug`, which installs
/// the binary the test suite already built instead of an optimised one (a
/// release build adds a quarter of an hour to a cold CI run).
#[tokio::test]
async fn readme_walkthrough_runs_as_written() {
    if std::env::var_os("SITESYNC_TEST_AMQP_URL").is_some() {
        eprintln!(
            "skipped: the README's connectors name the broker at 127.0.0.1:5672, and \
             SITESYNC_TEST_AMQP_URL points the tests at another one"
        );
        return;
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let script = walkthrough(&readme);
    // The order a newcomer needs (issue: `check` before `topology declare`
    // failed on the missing topology).
    let steps = [
        INSTALL,
        "config/business.sql",
        "sitesync init",
        "sitesync topology declare",
        "sitesync check",
        "sitesync run",
        "INSERT INTO outbox",
        "FROM customer WHERE id = 42",
        "sitesync status",
        "kill %1 %2 %3",
    ];
    let at: Vec<usize> = steps
        .iter()
        .map(|s| {
            script
                .find(s)
                .unwrap_or_else(|| panic!("the walkthrough has no `{s}`:\n{script}"))
        })
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "the walkthrough's steps are out of order ({steps:?} at {at:?}):\n{script}"
    );
    let script = script.replacen(INSTALL, &format!("{INSTALL} --debug"), 1);

    // As the README's preparation block makes them: a role with LOGIN and
    // REPLICATION, no superuser, owning the three databases.
    let pg = PgCluster::start().await;
    let admin = pg.client("postgres").await;
    // One statement per call: CREATE DATABASE cannot share an implicit
    // transaction with others.
    for sql in [
        "CREATE ROLE sitesync LOGIN REPLICATION",
        "CREATE DATABASE paris OWNER sitesync",
        "CREATE DATABASE london OWNER sitesync",
        "CREATE DATABASE madrid OWNER sitesync",
    ] {
        admin
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let url = |db: &str| {
        let url = pg.url(db);
        assert!(url.starts_with("postgres://postgres@"), "{url}");
        url.replacen("postgres://postgres@", "postgres://sitesync@", 1)
    };
    let names = Names::new();
    let for_cleanup = names.clone();
    let _cleanup = scopeguard(move || for_cleanup.delete_blocking(&rabbit::shared_amqp_url()));
    let dir = TestDir::new("ssreadme").unwrap();
    let topology = dir.path().join("topology.toml");
    std::fs::write(
        &topology,
        // PARIS archives, as in config/topology.toml.
        names.topology("PARIS", ""),
    )
    .unwrap();
    let install_root = dir.path().join("cargo");
    // The build the suite runs from: `cargo install --debug` finds the
    // binary there up to date.
    let target_dir = Path::new(binary())
        .parent()
        .and_then(Path::parent)
        .expect("the binary lives in <target>/debug")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        install_root.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut cmd = Command::new("bash");
    cmd.arg("-e")
        .arg("-x")
        .arg("-c")
        .arg(&script)
        .current_dir(repo())
        .env("PARIS_DATABASE_URL", url("paris"))
        .env("LONDON_DATABASE_URL", url("london"))
        .env("MADRID_DATABASE_URL", url("madrid"))
        .env("SITESYNC_TOPOLOGY", &topology)
        .env("SITESYNC_CHECKPOINTS", dir.path().join("checkpoints"))
        .env("CARGO_INSTALL_ROOT", &install_root)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("PATH", path)
        .env("RUST_LOG", "info,lapin=warn")
        .stdin(Stdio::null());
    // What `cargo test` sets for a test (CARGO_MANIFEST_DIR, CARGO_PKG_NAME…)
    // is not in a user's shell: build scripts that watch those variables
    // (ring's) would make the walkthrough's cargo rebuild them.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let ours = matches!(
            &*key,
            "CARGO_HOME" | "CARGO_INSTALL_ROOT" | "CARGO_TARGET_DIR"
        );
        if key.starts_with("CARGO") && !ours {
            cmd.env_remove(&*key);
        }
    }
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::task::spawn_blocking(move || cmd.output().expect("run bash")),
    )
    .await
    .expect("the walkthrough finishes within 10 minutes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("--- the walkthrough's stdout\n{stdout}\n--- its stderr\n{stderr}");
    assert!(
        out.status.success(),
        "the walkthrough failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );

    // It installed the binary where it said and ran that one.
    assert!(install_root.join("bin/sitesync").exists(), "{stderr}");
    // MADRID's row, as the walkthrough's SELECT printed it.
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("42") && l.contains("Zoé") && l.contains("Paris")),
        "MADRID's SELECT did not print row 42:\n{stdout}"
    );
    // LONDON's status names what it received from PARIS.
    assert!(
        stdout.contains("PARIS"),
        "status printed nothing of PARIS:\n{stdout}"
    );
    // Each sidecar drained and stopped on the walkthrough's SIGTERM.
    let stopped =
        stderr.matches("stopped cleanly").count() + stdout.matches("stopped cleanly").count();
    assert_eq!(stopped, 3, "three sidecars stop cleanly:\n{stderr}");
    // Each site kept a checkpoint store where SITESYNC_CHECKPOINTS says.
    for site in ["paris", "london", "madrid"] {
        assert!(
            dir.path().join("checkpoints").join(site).exists(),
            "no checkpoint store for {site}"
        );
    }
    // MADRID applied PARIS's event once; LONDON applied it, or it waits
    // in LONDON's queue (the sidecars stopped without waiting for LONDON).
    let from_paris = async |db: &str| -> i64 {
        pg.client(db)
            .await
            .query_one(
                "SELECT count(*) FROM sitesync_inbox WHERE origin = 'PARIS'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    };
    assert_eq!(
        from_paris("madrid").await,
        1,
        "MADRID's inbox holds PARIS's event once"
    );
    let applied = from_paris("london").await;
    let waiting = rabbit::queue_len(&rabbit::shared_amqp_url(), &names.site("LONDON"))
        .await
        .unwrap_or(0);
    assert_eq!(
        applied + i64::from(waiting),
        1,
        "LONDON applied PARIS's event once or holds it in its queue"
    );
}

/// Runs `f` when dropped (the broker's objects go even when an assertion
/// fails).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
