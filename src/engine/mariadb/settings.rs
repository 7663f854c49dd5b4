//! The `[database]` keys of a MariaDB or MySQL connector.
//!
//! ```toml
//! [database]
//! kind = "mariadb"
//! url = "mysql://sitesync:${LONDON_MARIADB_PASSWORD}@db.london:3306/shop"
//! outbox_table = "outbox"      # the default; `db.table` for another database
//! server_id = 1234567890       # optional: see `Settings::server_id`
//! ```

use crate::config::{Reader, redact_url};

/// The lowest server id a connector takes by default; see
/// [`default_server_id`].
pub const DEFAULT_SERVER_ID_BASE: u32 = 1_000_000_000;

/// Where the database is, and what sitesync names in it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `mysql://user:password@host:3306/db`, after `${VAR}` expansion
    /// (mysql_async's URL, its query parameters included). The database
    /// is required: the outbox and the sink's tables live in it.
    pub url: String,
    /// The outbox table, optionally in another database (`db.outbox`).
    pub outbox_table: String,
    /// The server id the binlog source registers under as a replica. Every
    /// replica of a server must have its own, different from the server's:
    /// MariaDB and MySQL end an older dump connection that registered the
    /// same id. Defaults to [`default_server_id`] of the connector's name.
    pub server_id: u32,
}

impl Settings {
    /// Reads the keys; the problems go to `d`.
    pub fn read(d: &mut Reader<'_>, connector: &str) -> Settings {
        let url = super::super::read_url(
            d,
            "\"mysql://sitesync:${MARIADB_PASSWORD}@host:3306/db\"",
            validate_url,
        );
        let outbox_table = super::super::read_outbox_table(d, "outbox");
        if outbox_table.split('.').count() > 2 {
            d.problem(
                "outbox_table",
                format!(
                    "`{outbox_table}` has more than two parts: expected table or database.table"
                ),
            );
        }
        let server_id = d
            .integer("server_id", 1..=i64::from(u32::MAX), "a replica server id")
            .map(|n| n as u32)
            .unwrap_or_else(|| default_server_id(connector));
        Settings {
            url,
            outbox_table,
            server_id,
        }
    }

    /// `(database, table)` of the outbox; no database means the URL's.
    pub fn outbox_parts(&self) -> (Option<&str>, &str) {
        match self.outbox_table.split_once('.') {
            Some((db, t)) => (Some(db), t),
            None => (None, self.outbox_table.as_str()),
        }
    }
}

/// The server id a connector takes when `server_id` is not set: a number
/// from 1,000,000,000 to 1,999,999,999 derived from the connector's name
/// (its CRC-32).
///
/// Why so: the id must stay the same from one run to the next (a sidecar
/// restarted while its old dump connection lingers then replaces that
/// connection, as the server ends the older one of an id); two connectors
/// of one server must not share it; and it must stay clear of the ids
/// people give real replicas, which are small numbers (1, 2, 101…).
/// `sitesync check` still compares it with the replicas the server knows.
pub fn default_server_id(connector: &str) -> u32 {
    DEFAULT_SERVER_ID_BASE + crc32fast::hash(connector.as_bytes()) % DEFAULT_SERVER_ID_BASE
}

/// A URL mysql_async reads, naming a host and a database.
fn validate_url(url: &str) -> Result<(), String> {
    if !url.starts_with("mysql://") {
        return Err(format!(
            "`{}` is not a MariaDB/MySQL URL: expected mysql://user:${{PASSWORD}}@host:3306/db",
            redact_url(url)
        ));
    }
    let opts = mysql_async::Opts::from_url(url)
        .map_err(|e| format!("`{}` is not a URL mysql_async reads: {e}", redact_url(url)))?;
    if opts.db_name().is_none_or(str::is_empty) {
        return Err(format!(
            "`{}` names no database (mysql://user@host:3306/DATABASE)",
            redact_url(url)
        ));
    }
    if opts.user().is_none_or(str::is_empty) {
        return Err(format!(
            "`{}` names no user (mysql://USER:${{PASSWORD}}@host:3306/db)",
            redact_url(url)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Problem;

    /// Reads `toml` as a `[database]` table of connector `london`: the
    /// settings and the problems, each as `key: message`.
    fn read(toml: &str) -> (Settings, Vec<String>) {
        let table: toml::Table = toml.parse().unwrap();
        let mut problems: Vec<Problem> = Vec::new();
        let mut d = Reader::new(&table, "database", &mut problems);
        let s = Settings::read(&mut d, "london");
        d.finish();
        let problems = problems
            .into_iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect();
        (s, problems)
    }

    const URL: &str = "url = \"mysql://sitesync:secret@db.london:3306/shop\"\n";

    #[test]
    fn the_defaults() {
        let (s, problems) = read(URL);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s.url, "mysql://sitesync:secret@db.london:3306/shop");
        assert_eq!(s.outbox_parts(), (None, "outbox"));
        assert_eq!(s.server_id, default_server_id("london"));
    }

    #[test]
    fn every_key_set() {
        let (s, problems) = read(&format!(
            "{URL}outbox_table = \"events.outbox\"\nserver_id = 4294967295\n"
        ));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s.outbox_parts(), (Some("events"), "outbox"));
        assert_eq!(s.server_id, u32::MAX);
        let (s, _) = read(&format!("{URL}server_id = 1\n"));
        assert_eq!(s.server_id, 1);
    }

    #[test]
    fn the_default_server_id_is_stable_distinct_and_clear_of_small_ids() {
        let london = default_server_id("london");
        assert_eq!(london, default_server_id("london"));
        assert_ne!(london, default_server_id("paris"));
        for name in [
            "london",
            "paris",
            "madrid",
            "",
            "a-very-long-connector-name",
        ] {
            let id = default_server_id(name);
            assert!((1_000_000_000..2_000_000_000).contains(&id), "{name}: {id}");
        }
    }

    /// Each bad value is reported under its key, with what was expected.
    #[test]
    fn bad_values_name_their_key() {
        let cases: Vec<(String, &str, &str)> = vec![
            (String::new(), "database.url", "missing"),
            (
                "url = 5\n".into(),
                "database.url",
                "expected a connection string",
            ),
            (
                "url = \"postgres://u@h/db\"\n".into(),
                "database.url",
                "not a MariaDB/MySQL URL",
            ),
            (
                "url = \"mysql://u@h:3306\"\n".into(),
                "database.url",
                "names no database",
            ),
            (
                "url = \"mysql://h:3306/db\"\n".into(),
                "database.url",
                "names no user",
            ),
            (
                "url = \"mysql://u@h:notaport/db\"\n".into(),
                "database.url",
                "not a URL mysql_async reads",
            ),
            (
                format!("{URL}outbox_table = \"a.b.c\"\n"),
                "database.outbox_table",
                "more than two parts",
            ),
            (
                format!("{URL}outbox_table = \"out box\"\n"),
                "database.outbox_table",
                "not a table name",
            ),
            (
                format!("{URL}server_id = 0\n"),
                "database.server_id",
                "0 is out of range; expected a replica server id between 1 and 4294967295",
            ),
            (
                format!("{URL}server_id = \"7\"\n"),
                "database.server_id",
                "expected a replica server id, found string",
            ),
        ];
        for (toml, key, message) in cases {
            let (_, problems) = read(&toml);
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(message)),
                "{toml:?}: expected `{key}: …{message}…` in {problems:?}"
            );
        }
        let (_, problems) = read(&format!("{URL}server_id = 4294967296\n"));
        assert!(
            problems[0].starts_with("database.server_id: 4294967296 is out of range"),
            "{problems:?}"
        );
        let (_, problems) = read(&format!("{URL}slot = \"x\"\n"));
        assert!(
            problems[0].starts_with("database.slot: unknown key"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_password_from_the_environment_is_not_shown_in_errors() {
        let (_, problems) = read("url = \"mysql://u:hunter2@h:3306\"\n");
        assert!(problems[0].contains("names no database"), "{problems:?}");
        assert!(!problems[0].contains("hunter2"), "{problems:?}");
    }
}
