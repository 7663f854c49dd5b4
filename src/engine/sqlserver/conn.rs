//! Connections to SQL Server (tiberius over TCP), identifier quoting and
//! error classification, shared by the source and the sink.
//!
//! Authentication: SQL Server logins (`user=…;password=…` in the ADO.NET
//! string). tiberius can also do Windows/NTLM (`sspi-rs` feature) and
//! Kerberos (`integrated-auth-gssapi`, needs the krb5 headers) on Linux;
//! neither is built in, so that the build needs no system library.
//!
//! TLS is rustls (tiberius' `rustls` feature; no OpenSSL). `encrypt`
//! defaults to `required`; `trust_server_certificate` accepts any
//! certificate; `ca_file` pins the CA.

use super::settings::{Encrypt, Settings};
use crate::config::redact_url;
use crate::error::{Cause, SourceError};
use tiberius::error::Error;
use tiberius::{Client, Config, EncryptionLevel};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

/// A tiberius client on a tokio TCP stream.
pub type MssqlClient = Client<Compat<TcpStream>>;

/// Quotes one identifier as `[name]` (a `]` doubled).
pub fn quote(name: &str) -> String {
    format!("[{}]", name.replace(']', "]]"))
}

/// Quotes `[schema.]name` as `[schema].[name]`.
pub fn quote_table(name: &str) -> String {
    name.split('.').map(quote).collect::<Vec<_>>().join(".")
}

/// An N'…' literal (a `'` doubled), for the few statements that take no
/// parameters (DDL).
pub fn literal(text: &str) -> String {
    format!("N'{}'", text.replace('\'', "''"))
}

/// The tiberius configuration for a connector's `[database]`.
pub fn config(db: &Settings, application: &str) -> Result<Config, SourceError> {
    let mut config = Config::from_ado_string(&db.url).map_err(|e| {
        SourceError::operator(
            Cause::Config,
            format!("database.url `{}`: {e}", redact_url(&db.url)),
        )
    })?;
    let s = db;
    config.application_name(application);
    config.encryption(match s.encrypt {
        Encrypt::Required => EncryptionLevel::Required,
        Encrypt::Strict => EncryptionLevel::Strict,
        Encrypt::LoginOnly => EncryptionLevel::Off,
    });
    if s.trust_server_certificate {
        config.trust_cert();
    } else if let Some(ca) = &s.ca_file {
        config.trust_cert_ca(ca.display());
    }
    // A Change Tracking read of a large backlog can take a while; the
    // timeout bounds each round trip, not the whole result.
    config.command_timeout(Some(s.command_timeout));
    Ok(config)
}

/// Opens a connection, following one routing redirect (Azure SQL,
/// availability group listeners).
pub async fn connect(db: &Settings, application: &str) -> Result<MssqlClient, SourceError> {
    let mut config = config(db, application)?;
    let context = format!("connecting to {}", redact_url(&db.url));
    for _ in 0..2 {
        let tcp = TcpStream::connect(config.get_addr())
            .await
            .map_err(|e| SourceError::transient(Cause::Unreachable, format!("{context}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        match Client::connect(config.clone(), tcp.compat_write()).await {
            Ok(client) => return Ok(client),
            Err(Error::Routing { host, port }) => {
                config.host(&host);
                config.port(port);
            }
            Err(e) => return Err(classify(&context, &e)),
        }
    }
    Err(SourceError::transient(
        Cause::Unreachable,
        format!("{context}: redirected more than once"),
    ))
}

/// SQL Server error numbers that mean "try again" (the server, the
/// network or the lock manager, not our SQL).
const TRANSIENT: &[u32] = &[
    233,  // connection closed by the server
    701,  // out of memory
    1204, // lock manager out of locks
    1205, // deadlock victim
    1222, // lock request timeout
    3960, // snapshot update conflict
    3961, // snapshot read of an object changed by DDL since the snapshot began
    4060, // cannot open database (restoring, failing over)
    10053, 10054, 10060, 10928, 10929, // transport, Azure resource limits
    40197, 40501, 40613, 49918, 49919, 49920, // Azure SQL: service busy, reconfiguring
];

/// Numbers that need a person, each with what to do.
fn operator_hint(number: u32) -> Option<&'static str> {
    Some(match number {
        18456 => "login failed: check user and password in database.url",
        229 | 230 | 262 | 297 | 300 => {
            "permission denied: see `sitesync check` for the grants the connector needs"
        }
        208 => "an object is missing: run `sitesync init`",
        207 => {
            "a column is missing: the outbox needs id, created_at, origin, type, entity_key, data and ordinal (see `sitesync init`)"
        }
        3952 => {
            "snapshot isolation is not allowed in this database: ALTER DATABASE … SET ALLOW_SNAPSHOT_ISOLATION ON (`sitesync init` does it)"
        }
        4998 | 22105 | 22106 => {
            "Change Tracking is not enabled on the outbox table or the database: run `sitesync init`"
        }
        _ => return None,
    })
}

/// Whether an error is worth retrying, with its message.
pub fn classify(context: &str, e: &Error) -> SourceError {
    match e {
        Error::Io { .. } => SourceError::transient(Cause::Unreachable, format!("{context}: {e}")),
        Error::Server(token) => {
            let n = token.code();
            let text = format!(
                "{context}: {} (error {n}, class {})",
                token.message(),
                token.class()
            );
            let cause = cause_of(n);
            if TRANSIENT.contains(&n) || token.class() >= 20 {
                SourceError::transient(cause, text)
            } else if let Some(hint) = operator_hint(n) {
                SourceError::operator(cause, format!("{text}: {hint}"))
            } else {
                SourceError::operator(cause, text)
            }
        }
        Error::Tls(_) => SourceError::operator(
            Cause::AuthRefused,
            format!(
                "{context}: {e}: check database.encrypt, database.ca_file (or, on a trusted network only, database.trust_server_certificate)"
            ),
        ),
        Error::Routing { .. } => {
            SourceError::transient(Cause::Unreachable, format!("{context}: {e}"))
        }
        _ => SourceError::operator(Cause::Query, format!("{context}: {e}")),
    }
}

/// What a server error number says went wrong.
fn cause_of(number: u32) -> Cause {
    match number {
        18456 => Cause::AuthRefused,
        229 | 230 | 262 | 297 | 300 => Cause::PermissionDenied,
        208 | 207 | 4998 | 22105 | 22106 => Cause::NotInitialised,
        3952 => Cause::ServerSettings,
        1205 | 1222 | 3960 | 3961 => Cause::Busy,
        701 | 1204 | 10928 | 10929 => Cause::Limit,
        233 | 4060 | 10053 | 10054 | 10060 | 40197 | 40501 | 40613 | 49918 | 49919 | 49920 => {
            Cause::Unreachable
        }
        _ => Cause::Query,
    }
}

/// The server error number, if the server raised it.
pub fn number(e: &Error) -> Option<u32> {
    match e {
        Error::Server(token) => Some(token.code()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn identifiers_are_bracketed_and_escaped() {
        assert_eq!(quote("outbox"), "[outbox]");
        assert_eq!(quote("we]ird"), "[we]]ird]");
        assert_eq!(quote_table("dbo.outbox"), "[dbo].[outbox]");
        assert_eq!(literal("O'Brien"), "N'O''Brien'");
    }

    #[test]
    fn io_is_transient_and_tls_needs_a_person() {
        let io = Error::Io {
            kind: std::io::ErrorKind::ConnectionReset,
            message: "reset".into(),
        };
        assert_eq!(classify("x", &io).kind(), ErrorKind::Transient);
        let tls = Error::Tls("invalid peer certificate".into());
        let e = classify("x", &tls);
        assert_eq!(e.kind(), ErrorKind::Operator);
        assert!(e.message().contains("ca_file"), "{}", e.message());
    }

    #[test]
    fn the_operator_hints_name_the_fix() {
        assert!(
            operator_hint(3952)
                .unwrap()
                .contains("ALLOW_SNAPSHOT_ISOLATION")
        );
        assert!(operator_hint(18456).unwrap().contains("password"));
        assert!(operator_hint(1205).is_none());
        for n in [233, 1205, 1222, 3960, 3961, 4060, 40613] {
            assert!(TRANSIENT.contains(&n), "{n}");
        }
        for n in [18456, 229, 208, 3952, 4998] {
            assert!(!TRANSIENT.contains(&n) && operator_hint(n).is_some(), "{n}");
        }
    }
}
