//! The `[database]` keys of a SQL Server connector.

use crate::config::{Reader, redact_url};
use std::path::PathBuf;
use std::time::Duration;

/// How the SQL Server connection is encrypted (TDS `ENCRYPT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encrypt {
    /// TLS for the whole session, refused if the server cannot (the default).
    Required,
    /// TDS 8.0 strict: TLS before the prelogin (SQL Server 2022+).
    Strict,
    /// TLS for the login packet only (the password), plain text after.
    LoginOnly,
}

/// Where the database is, how to reach it, and how the source polls.
#[derive(Debug, Clone)]
pub struct Settings {
    /// An ADO.NET connection string (`server=tcp:host,1433;database=…;
    /// user=…;password=${MSSQL_PASSWORD}`), after `${VAR}` expansion; its
    /// TLS settings are the keys below, not the string's.
    pub url: String,
    /// The outbox table, optionally schema-qualified (`dbo.outbox`).
    pub outbox_table: String,
    /// `encrypt = "required" | "strict" | "login_only"`.
    pub encrypt: Encrypt,
    /// Accept any server certificate (test and trusted networks only).
    pub trust_server_certificate: bool,
    /// A PEM or DER CA certificate the server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// How long an idle source waits between two Change Tracking reads, at
    /// most (it reads again at once while there is work).
    pub poll_max: Duration,
    /// How long this sidecar may be down without losing events: `sitesync
    /// check` fails when the Change Tracking retention is shorter.
    pub max_downtime: Duration,
    /// Per round trip to the server (tiberius `command_timeout`).
    pub command_timeout: Duration,
    /// Outbox rows read per Change Tracking query, at most.
    pub read_batch: u32,
}

impl Settings {
    /// Reads the keys; the problems go to `d`.
    pub fn read(d: &mut Reader<'_>) -> Settings {
        let url = super::super::read_url(
            d,
            "an ADO.NET string \"server=tcp:host,1433;database=db;user=u;password=${PASSWORD}\"",
            validate_url,
        );
        let outbox_table = super::super::read_outbox_table(d, "dbo.outbox");
        let encrypt = match d
            .string(
                "encrypt",
                false,
                "\"required\", \"strict\" or \"login_only\"",
            )
            .as_deref()
        {
            None | Some("required") | Some("true") => Encrypt::Required,
            Some("strict") => Encrypt::Strict,
            Some("login_only") => Encrypt::LoginOnly,
            Some(other) => {
                d.problem("encrypt", format!("`{other}` is not an encryption mode; expected \"required\" (the default), \"strict\" (TDS 8.0) or \"login_only\""));
                Encrypt::Required
            }
        };
        let trust_server_certificate = d.boolean("trust_server_certificate").unwrap_or(false);
        let ca_file = d
            .string(
                "ca_file",
                false,
                "the path of a CA certificate (PEM or DER)",
            )
            .map(PathBuf::from);
        if trust_server_certificate && ca_file.is_some() {
            d.problem("ca_file", "trust_server_certificate = true accepts any certificate: set one or the other, not both");
        }
        let poll_max = d.millis("poll_max_ms", 1_000, 60_000);
        let max_downtime = d
            .integer("max_downtime_hours", 1..=24 * 365, "a number of hours")
            .map(|h| Duration::from_secs(h as u64 * 3600))
            .unwrap_or(Duration::from_secs(72 * 3600));
        let command_timeout = d.millis("command_timeout_ms", 60_000, 3_600_000);
        let read_batch = d
            .integer("read_batch", 1..=1_000_000, "a number of rows")
            .map(|n| n as u32)
            .unwrap_or(5_000);
        Settings {
            url,
            outbox_table,
            encrypt,
            trust_server_certificate,
            ca_file,
            poll_max,
            max_downtime,
            command_timeout,
            read_batch,
        }
    }

    /// `(schema, table)` of the outbox, the schema defaulting to `dbo`.
    pub fn outbox_parts(&self) -> (&str, &str) {
        match self.outbox_table.split_once('.') {
            Some((s, t)) => (s, t),
            None => ("dbo", self.outbox_table.as_str()),
        }
    }
}

/// An ADO.NET connection string tiberius can parse, whose TLS settings are
/// left to the `[database]` keys (so that there is one place for them).
fn validate_url(url: &str) -> Result<(), String> {
    if url.contains("://") {
        return Err(format!(
            "`{}` is a URL; SQL Server connectors take an ADO.NET connection string, e.g. \"server=tcp:db.example,1433;database=sitesync;user=sitesync;password=${{MSSQL_PASSWORD}}\"",
            redact_url(url)
        ));
    }
    for part in url.split(';') {
        let key = part
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if matches!(
            key.as_str(),
            "encrypt" | "trustservercertificate" | "trustservercertificateca"
        ) {
            return Err(format!(
                "`{}` sets `{key}`: set database.encrypt, database.trust_server_certificate or database.ca_file instead",
                redact_url(url)
            ));
        }
    }
    tiberius::Config::from_ado_string(url)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "`{}` is not an ADO.NET connection string tiberius accepts: {e}",
                redact_url(url)
            )
        })
}
