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
    /// `transaction_retention` (`"4h"`, `"90m"`, `"2d"`; `"0"` never): how
    /// long, by the redo's clock, a transaction with outbox rows may stay
    /// open before the source abandons it so that it stops holding back the
    /// SCN mining restarts from (see [`super::transactions`]). Default
    /// [`DEFAULT_TRANSACTION_RETENTION`]; zero when disabled.
    pub transaction_retention: Duration,
}

/// Four hours. An outbox row is written by an application transaction,
/// which lasts milliseconds to minutes; one open for hours is in doubt
/// (a distributed transaction waiting for its coordinator) or was lost
/// track of, and meanwhile every restart re-mines from its first SCN and
/// the archived logs from there must stay on disk. Four hours keeps that
/// within a typical archived-log backup-and-delete cycle (a day) with room
/// to spare, while leaving any ordinary batch transaction alone. A site
/// whose batches run longer raises it, or sets `"0"` to never abandon.
pub const DEFAULT_TRANSACTION_RETENTION: Duration = Duration::from_secs(4 * 3600);

/// Parses `"4h"`, `"90m"`, `"45s"`, `"2d"` (a whole number and a unit), or
/// `"0"` (never).
pub fn parse_retention(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
        format!("`{t}` has no unit: expected e.g. \"4h\", \"90m\", \"2d\" or \"0\"")
    })?;
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{t}` does not start with a whole number: expected e.g. \"4h\""))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "`{t}`: unknown unit `{unit}`; expected s, m, h or d (e.g. \"4h\"), or \"0\" to never abandon"
            ));
        }
    };
    let total = n
        .checked_mul(secs)
        .filter(|&s| s <= 366 * 86_400)
        .ok_or_else(|| format!("`{t}` is over a year"))?;
    if total < 60 {
        return Err(format!(
            "`{t}` is under a minute: a live transaction would be abandoned and its events lost; use minutes or more, or \"0\" to never abandon"
        ));
    }
    Ok(Duration::from_secs(total))
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
        let transaction_retention = match d.string(
            "transaction_retention",
            false,
            "a duration such as \"4h\", or \"0\"",
        ) {
            None => DEFAULT_TRANSACTION_RETENTION,
            Some(text) => parse_retention(&text).unwrap_or_else(|e| {
                d.problem("transaction_retention", e);
                DEFAULT_TRANSACTION_RETENTION
            }),
        };
        Settings {
            url,
            outbox_table,
            client_lib_dir,
            window_min_scn,
            window_max_scn,
            window_target_rows,
            poll_interval,
            max_buffered_mib,
            transaction_retention,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defect_8_transaction_retention_parses_units_and_refuses_nonsense() {
        assert_eq!(parse_retention("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert_eq!(parse_retention(" 90m "), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_retention("2d"), Ok(Duration::from_secs(2 * 86_400)));
        assert_eq!(parse_retention("0"), Ok(Duration::ZERO));
        for (bad, says) in [
            ("4", "no unit"),
            ("4 hours", "unknown unit"),
            ("h", "whole number"),
            ("30s", "under a minute"),
            ("400d", "over a year"),
        ] {
            let e = parse_retention(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert_eq!(DEFAULT_TRANSACTION_RETENTION, Duration::from_secs(14_400));
    }
}
