//! The command line without servers: configuration errors name the file and
//! the key, and usage errors exit with 2.

use crate::support::TestDir;
use crate::support::sidecar::binary;
use std::path::Path;
use std::process::{Command, Output};

fn sitesync(args: &[&str], dir: &Path) -> Output {
    Command::new(binary())
        .args(args)
        .current_dir(dir)
        .env_remove("SITESYNC_TEST_UNSET_PASSWORD")
        .output()
        .expect("run sitesync")
}

#[test]
fn configuration_errors_name_the_file_and_every_key_at_once() {
    let dir = TestDir::new("sscli").unwrap();
    std::fs::write(dir.path().join("topology.toml"), "sites = [\"PARIS\"]\n").unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "site = \"PARIS\"\nsurprise = true\n\n[database]\nkind = \"postgres\"\n\
         url = \"postgres://app:${SITESYNC_TEST_UNSET_PASSWORD}@db/paris\"\n\n\
         [broker]\nurls = [\"not a url\"]\ntopology = \"topology.toml\"\n",
    )
    .unwrap();
    let file_arg = file.display().to_string();
    for command in [
        vec!["run"],
        vec!["check"],
        vec!["init"],
        vec!["checkpoint", "show"],
    ] {
        let mut args = command.clone();
        args.extend(["--connector", &file_arg]);
        let out = sitesync(&args, dir.path());
        assert_eq!(out.status.code(), Some(2), "{command:?}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for expected in [
            format!("{file_arg}: key `surprise`: unknown key"),
            format!(
                "{file_arg}: key `database.url`: environment variable `SITESYNC_TEST_UNSET_PASSWORD` is not set"
            ),
            format!("{file_arg}: key `broker.urls[0]`: `not a url` is not an AMQP URL"),
        ] {
            assert!(
                text.contains(&expected),
                "{command:?} should say {expected:?}:\n{text}"
            );
        }
    }
}

#[test]
fn a_bad_database_url_and_a_missing_file_are_named() {
    let dir = TestDir::new("sscli").unwrap();
    std::fs::write(dir.path().join("topology.toml"), "sites = [\"PARIS\"]\n").unwrap();
    let file = dir.path().join("paris.toml");
    std::fs::write(
        &file,
        "site = \"PARIS\"\n[database]\nkind = \"postgres\"\nurl = \"postgres://u@h:notaport/db\"\n\
         [broker]\nurls = \"amqp://localhost\"\ntopology = \"topology.toml\"\n",
    )
    .unwrap();
    let out = sitesync(&["check", "--connector", "paris.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("paris.toml: key `database.url`"), "{text}");
    assert!(text.contains("is not a PostgreSQL URL"), "{text}");

    let out = sitesync(&["run", "--connector", "nowhere.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere.toml"));

    // With --log-format json, the failure is a JSON log line too.
    let out = sitesync(
        &["--log-format", "json", "run", "--connector", "nowhere.toml"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert_eq!(line["level"], "ERROR");
    assert!(
        line["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("nowhere.toml"),
        "{line}"
    );
}

#[test]
fn every_command_has_help_with_an_example() {
    let dir = TestDir::new("sscli").unwrap();
    for command in [
        vec!["run"],
        vec!["check"],
        vec!["init"],
        vec!["topology", "declare"],
        vec!["checkpoint", "show"],
        vec!["checkpoint", "reset"],
        vec!["capture", "add"],
        vec!["capture", "remove"],
        vec!["capture", "list"],
        vec!["jobs"],
        vec!["purge"],
        vec!["conflicts", "review"],
        vec!["audit"],
        vec!["status"],
        vec!["resync"],
        vec!["gaps", "fill"],
    ] {
        let mut args = command.clone();
        args.push("--help");
        let out = sitesync(&args, dir.path());
        assert!(out.status.success(), "{command:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example"),
            "{command:?} --help has no example:\n{text}"
        );
    }
}

#[test]
fn the_shipped_connector_files_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for site in ["paris", "london", "madrid"] {
        let out = Command::new(binary())
            .args(["checkpoint", "show", "--connector"])
            .arg(root.join("connectors").join(format!("{site}.toml")))
            .current_dir(root)
            .env("PARIS_DATABASE_URL", "postgres://u@127.0.0.1:1/paris")
            .env("LONDON_DATABASE_URL", "postgres://u@127.0.0.1:1/london")
            .env("MADRID_DATABASE_URL", "postgres://u@127.0.0.1:1/madrid")
            .env(
                "SITESYNC_CHECKPOINTS",
                std::env::temp_dir().join("sitesync-shipped-none"),
            )
            .output()
            .unwrap();
        // The config loads (the database at port 1 is unreachable: show says so).
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{site}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!("site {}", site.to_uppercase())),
            "{text}"
        );
        assert!(text.contains("database    unavailable"), "{text}");
    }
}
