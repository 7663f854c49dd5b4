//! Connections to Oracle (the `oracle` crate over ODPI-C, the client
//! libraries loaded at run time), error classification and quoting, shared
//! by the source and the sink.

use super::settings::{OracleUrl, Settings, parse_oracle_url};
use crate::config::redact_url;
use crate::error::{Cause, SourceError};
use std::path::PathBuf;
use std::sync::OnceLock;

/// How to install the client libraries, for the DPI-1047 message.
pub fn client_missing(detail: &str, dir: Option<&PathBuf>) -> String {
    let looked = match dir {
        Some(d) => format!("in database.client_lib_dir = {}", d.display()),
        None => "on the system's library path (database.client_lib_dir is not set)".into(),
    };
    format!(
        "the Oracle Client libraries (libclntsh.so) were not found {looked}: {detail}. \
         sitesync loads them at run time. Install Oracle Instant Client (Basic or Basic Light, 19c or newer) \
         from https://www.oracle.com/database/technologies/instant-client/downloads.html, e.g. unzip it to \
         /opt/oracle/instantclient_23_6 and install libaio (Debian/Ubuntu: apt-get install libaio1t64 or libaio1; \
         RHEL: dnf install libaio); then set database.client_lib_dir = \"/opt/oracle/instantclient_23_6\" in the \
         connector file, or add that directory to LD_LIBRARY_PATH (or to /etc/ld.so.conf.d and run ldconfig)"
    )
}

/// The ORA-/DPI- code of an error message, e.g. `ORA-01291` → 1291.
pub(crate) fn code(message: &str, prefix: &str) -> Option<u32> {
    let at = message.find(prefix)? + prefix.len();
    message
        .get(at..)?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// Classifies an `oracle` crate error.
pub(crate) fn db_error(context: &str, e: &oracle::Error) -> SourceError {
    classify(context, &e.to_string())
}

pub(crate) fn classify(context: &str, message: &str) -> SourceError {
    if code(message, "DPI-").is_some_and(|c| c == 1047 || c == 1072) {
        return SourceError::operator(
            Cause::ClientLibrary,
            format!("{context}: {}", client_missing(message, None)),
        );
    }
    let text = format!("{context}: {message}");
    let cause = cause_of(message);
    match code(message, "ORA-") {
        // Connection lost, instance starting or stopping, listener issues,
        // resource busy, log switch races while mining.
        Some(
            28 | 54 | 60 | 1012 | 1033 | 1034 | 1089 | 1090 | 1092 | 3113 | 3114 | 3135 | 12170
            | 12514 | 12516 | 12519 | 12520 | 12528 | 12537 | 12541 | 12543 | 12547 | 12560 | 25408
            | 1291 | 308 | 310 | 334 | 1284 | 4030 | 4031,
        ) => SourceError::transient(cause, text),
        Some(1017) => SourceError::operator(
            cause,
            format!("{text} (check the user and password in database.url)"),
        ),
        Some(942) | Some(1031) | Some(1035) | Some(1045) | Some(6550) => SourceError::operator(
            cause,
            format!("{text} (a privilege is missing: run `sitesync check` for the grants)"),
        ),
        Some(_) => SourceError::operator(cause, text),
        // DPI errors (not connected, connection closed) and anything else.
        None => SourceError::transient(cause, text),
    }
}

/// What an ORA-/DPI- error message says went wrong.
pub(crate) fn cause_of(message: &str) -> Cause {
    if code(message, "DPI-").is_some_and(|c| c == 1047 || c == 1072) {
        return Cause::ClientLibrary;
    }
    match code(message, "ORA-") {
        Some(1017) => Cause::AuthRefused,
        Some(1031 | 1035 | 1045 | 6550) => Cause::PermissionDenied,
        Some(942) => Cause::NotInitialised,
        Some(54 | 60 | 8177) => Cause::Busy,
        // Redo needed by the window is gone (archived log removed).
        Some(1291 | 308 | 310 | 334 | 1284) => Cause::LogPurged,
        Some(4030 | 4031) => Cause::Limit,
        Some(
            28 | 1012 | 1033 | 1034 | 1089 | 1090 | 1092 | 3113 | 3114 | 3135 | 12170 | 12514
            | 12516 | 12519 | 12520 | 12528 | 12537 | 12541 | 12543 | 12547 | 12560 | 25408,
        ) => Cause::Unreachable,
        Some(_) => Cause::Query,
        None => Cause::Unreachable,
    }
}

/// Loads the client library once per process, from `dir` if given.
pub(crate) fn init_client(dir: Option<&PathBuf>) -> Result<(), SourceError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        let mut params = oracle::InitParams::new();
        if let Some(dir) = dir {
            params
                .oracle_client_lib_dir(dir.as_os_str())
                .map_err(|e| e.to_string())?;
        }
        params.init().map(|_| ()).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|e| SourceError::operator(Cause::ClientLibrary, client_missing(&e, dir)))
}

/// Runs blocking driver work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        SourceError::transient(
            Cause::Query,
            format!("an Oracle call panicked or was cancelled: {e}"),
        )
    })?
}

/// Quotes an Oracle identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal.
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The mining session's formats: `SQL_REDO` writes dates and timestamps in
/// them, and [`super::redo`] reads them.
pub const SESSION_NLS: &str = "ALTER SESSION SET NLS_DATE_FORMAT = 'YYYY-MM-DD HH24:MI:SS' \
     NLS_TIMESTAMP_FORMAT = 'YYYY-MM-DD HH24:MI:SS.FF6' \
     NLS_TIMESTAMP_TZ_FORMAT = 'YYYY-MM-DD HH24:MI:SS.FF6 TZH:TZM' \
     NLS_NUMERIC_CHARACTERS = '.,' TIME_ZONE = '+00:00'";

/// Connection settings, shared by the source and the sink.
#[derive(Debug, Clone)]
pub struct OracleConnect {
    pub url: OracleUrl,
    pub shown: String,
    pub client_lib_dir: Option<PathBuf>,
}

impl OracleConnect {
    pub fn new(cfg: &Settings) -> Result<OracleConnect, SourceError> {
        Ok(OracleConnect {
            url: parse_oracle_url(&cfg.url).map_err(|e| SourceError::operator(Cause::Config, e))?,
            shown: redact_url(&cfg.url),
            client_lib_dir: cfg.client_lib_dir.clone(),
        })
    }

    /// A new connection with the session formats set (blocking).
    pub fn connect(&self) -> Result<oracle::Connection, SourceError> {
        init_client(self.client_lib_dir.as_ref())?;
        let conn = oracle::Connector::new(
            self.url.user.as_str(),
            self.url.password.as_str(),
            self.url.connect_string.as_str(),
        )
        .connect()
        .map_err(|e| {
            let m = e.to_string();
            if code(&m, "DPI-").is_some_and(|c| c == 1047 || c == 1072) {
                SourceError::operator(
                    Cause::ClientLibrary,
                    client_missing(&m, self.client_lib_dir.as_ref()),
                )
            } else {
                classify(&format!("connecting to {}", self.shown), &m)
            }
        })?;
        conn.execute(SESSION_NLS, &[])
            .map_err(|e| db_error("setting the session formats", &e))?;
        Ok(conn)
    }
}

/// `[schema.]table` as Oracle stores unquoted names (upper case); the
/// schema defaults to the connecting user.
pub fn outbox_names(outbox_table: &str, user: &str) -> (String, String) {
    match outbox_table.split_once('.') {
        Some((s, t)) => (s.to_uppercase(), t.to_uppercase()),
        None => (user.to_uppercase(), outbox_table.to_uppercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn a_missing_client_library_says_how_to_install_it() {
        let e = classify(
            "connecting",
            "DPI Error: DPI-1047: Cannot locate a 64-bit Oracle Client library: \"libclntsh.so: cannot open shared object file: No such file or directory\"",
        );
        assert_eq!(e.kind(), ErrorKind::Operator);
        for needle in [
            "Instant Client",
            "client_lib_dir",
            "LD_LIBRARY_PATH",
            "DPI-1047",
            "libaio",
        ] {
            assert!(e.message().contains(needle), "{needle}: {}", e.message());
        }
    }

    #[test]
    fn oracle_errors_are_classified() {
        let t = |m: &str| classify("x", m).kind();
        assert_eq!(
            t("ORA-03113: end-of-file on communication channel"),
            ErrorKind::Transient
        );
        assert_eq!(t("ORA-01291: missing logfile"), ErrorKind::Transient);
        assert_eq!(
            t("ORA-01033: ORACLE initialization or shutdown in progress"),
            ErrorKind::Transient
        );
        assert_eq!(
            t("ORA-01017: invalid username/password; logon denied"),
            ErrorKind::Operator
        );
        assert_eq!(t("ORA-01031: insufficient privileges"), ErrorKind::Operator);
        assert_eq!(
            t("DPI-1080: connection was closed by ORA-3113"),
            ErrorKind::Transient
        );
        assert!(
            classify("x", "ORA-00942: table or view does not exist")
                .message()
                .contains("sitesync check")
        );
    }

    /// The client library is not installed here: this runs the real
    /// driver's load path and checks the message an operator would see.
    #[test]
    fn connecting_without_a_client_library_gives_the_install_message() {
        let connect = OracleConnect {
            url: parse_oracle_url("oracle://u:p@127.0.0.1:1/none").unwrap(),
            shown: "oracle://u:***@127.0.0.1:1/none".into(),
            client_lib_dir: None,
        };
        match connect.connect() {
            // A machine with Instant Client installed gets a connection
            // error instead (nothing listens on port 1).
            Err(e) if e.message().contains("libclntsh") => {
                eprintln!("{}", e.message());
                assert_eq!(e.kind(), ErrorKind::Operator);
                assert!(e.message().contains("Instant Client"), "{}", e.message());
            }
            Err(e) => assert!(e.message().contains("connecting to"), "{}", e.message()),
            Ok(_) => panic!("nothing listens on port 1"),
        }
    }
}
