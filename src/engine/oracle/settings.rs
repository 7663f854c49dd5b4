//! The `[database]` keys of an Oracle connector.

use crate::config::{Reader, redact_url};
use std::path::PathBuf;
use std::time::Duration;

/// Where the database and the client libraries are, and how the source
/// mines.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `oracle://user:password@host[:port]/service_name`, after `${VAR}`
    /// expansion (checked with [`parse_oracle_url`]).
    pub url: String,
    /// The outbox table: `OUTBOX` in the connecting user's schema, or
    /// `SCHEMA.TABLE`.
    pub outbox_table: String,
    /// `client_lib_dir`: where the Oracle Instant Client libraries are
    /// (`libclntsh.so`); unset, the system's library path is searched.
    pub client_lib_dir: Option<PathBuf>,
    /// `window_min_scn` / `window_max_scn`: the bounds of the adaptive
    /// LogMiner window, in SCNs.
    pub window_min_scn: u64,
    pub window_max_scn: u64,
    /// `window_target_rows`: a window returning more rows than this halves
    /// the width; a sparse one doubles it.
    pub window_target_rows: usize,
    /// `poll_interval_ms`: how long to wait when a window found the
    /// database where the last one left it.
    pub poll_interval: Duration,
    /// `max_buffered_mib`: the cap on outbox inserts of open transactions
    /// held in memory (the stream stops with an operator error past it).
    pub max_buffered_mib: usize,
}

impl Settings {
    /// Reads the keys; the problems go to `d`.
    pub fn read(d: &mut Reader<'_>) -> Settings {
        let url = super::super::read_url(
            d,
            "\"oracle://user:${PASSWORD}@host:1521/service_name\"",
            |url| parse_oracle_url(url).map(|_| ()),
        );
        // The connecting user's schema (see `conn::outbox_names`).
        let outbox_table = super::super::read_outbox_table(d, "OUTBOX");
        // Empty (`${ORACLE_CLIENT_LIB_DIR:-}` unset): the system's path.
        let client_lib_dir = d
            .string(
                "client_lib_dir",
                false,
                "the directory of the Oracle Instant Client libraries",
            )
            .filter(|s| !s.trim().is_empty())
            .map(PathBuf::from);
        let scns = |d: &mut Reader<'_>, key: &str, default: u64| {
            d.integer(key, 1..=1_000_000_000_000, "a number of SCNs")
                .map(|n| n as u64)
                .unwrap_or(default)
        };
        let window_min_scn = scns(d, "window_min_scn", 1_000);
        let window_max_scn = scns(d, "window_max_scn", 1_000_000);
        if window_max_scn < window_min_scn {
            d.problem(
                "window_max_scn",
                format!("{window_max_scn} is below window_min_scn ({window_min_scn})"),
            );
        }
        let window_target_rows = d
            .integer("window_target_rows", 1..=10_000_000, "a number of rows")
            .map(|n| n as usize)
            .unwrap_or(20_000);
        let poll_interval = d.millis("poll_interval_ms", 1_000, 3_600_000);
        let max_buffered_mib = d
            .integer("max_buffered_mib", 1..=1_048_576, "a size in MiB")
            .map(|n| n as usize)
            .unwrap_or(256);
        Settings {
            url,
            outbox_table,
            client_lib_dir,
            window_min_scn,
            window_max_scn,
            window_target_rows,
            poll_interval,
            max_buffered_mib,
        }
    }
}

/// The parts of `oracle://user:password@host[:port]/service_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleUrl {
    pub user: String,
    pub password: String,
    /// EZConnect: `//host:port/service_name`.
    pub connect_string: String,
}

/// Parses an Oracle connection URL. User and password may be
/// percent-encoded (`%40` for `@`).
pub fn parse_oracle_url(url: &str) -> Result<OracleUrl, String> {
    let shown = redact_url(url);
    let rest = url.strip_prefix("oracle://").ok_or_else(|| {
        format!(
            "`{shown}` is not an Oracle URL: expected oracle://user:password@host:1521/service_name"
        )
    })?;
    let (auth, target) = rest.rsplit_once('@').ok_or_else(|| {
        format!("`{shown}` names no user (oracle://user:password@host:1521/service_name)")
    })?;
    let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
    let decode = |s: &str| -> Result<String, String> {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("`{shown}`: bad percent-encoding"))?;
                out.push(hex);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).map_err(|_| format!("`{shown}`: user or password is not UTF-8"))
    };
    let (hostport, service) = target
        .split_once('/')
        .filter(|(h, s)| !h.is_empty() && !s.is_empty())
        .ok_or_else(|| {
            format!(
                "`{shown}` names no host or service (oracle://user:password@host:1521/service_name)"
            )
        })?;
    if user.is_empty() {
        return Err(format!("`{shown}` names no user"));
    }
    let hostport = if hostport.contains(':') {
        let (_, port) = hostport.rsplit_once(':').unwrap_or_default();
        port.parse::<u16>()
            .map_err(|_| format!("`{shown}`: the port must be a number"))?;
        hostport.to_string()
    } else {
        format!("{hostport}:1521")
    };
    Ok(OracleUrl {
        user: decode(user)?,
        password: decode(password)?,
        connect_string: format!("//{hostport}/{service}"),
    })
}
