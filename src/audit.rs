//! The audit trail: every manual action on a site (a checkpoint reset, a
//! dead letter requeued, a replay, a resync, a purge, a gap fill, a
//! conflict reviewed, capture triggers added or removed), from the command
//! line or the admin API, recorded in the site's own database, table
//! `sitesync_audit`: who, when, through what, with which arguments, and how
//! it ended. `sitesync audit` lists it, newest first.
//!
//! # Recording an action (the CLI, the admin API)
//!
//! ```ignore
//! let log = D::audit(cfg, db)?;                      // the engine's AuditLog
//! let outcome = do_the_action().await;                // the action first
//! let _ = audit::record(&log, Via::Api, "token ops", actions::DLQ_REQUEUE,
//!                       json!({"ids": ids}), outcome.as_deref().map_err(|e| e.as_str())).await;
//! ```
//!
//! The action is recorded *after* it ran, with its result: `ok` and the
//! line that says what it did, or `failed` and the error. A dry run is not
//! an action and is not recorded. Recording can fail (the database is
//! down, `sitesync init` was not run): [`record`] then logs a warning and
//! returns the error for the caller to show too, but the action has
//! happened, and its own result is what the caller reports.
//!
//! Each engine's SQL is in `src/engine/<engine>/audit.rs` (an
//! [`AuditLog`]), reached through the engine's `Driver::audit`;
//! `sitesync init` creates the table, `sitesync check` verifies it.

use crate::checks::Check;
use crate::error::TargetError;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::future::Future;
use uuid::Uuid;

/// The table every engine names it (unqualified, beside the sink's tables).
pub const AUDIT_TABLE: &str = "sitesync_audit";

/// The longest `detail` stored, in bytes (an error can be long; Oracle's
/// column is a `VARCHAR2(4000)`); longer ones are cut at a character
/// boundary with `…`.
pub const MAX_DETAIL: usize = 4000;

/// The actions' names, as stored and as `sitesync audit --action` takes
/// them. The API uses the same names for the same actions.
pub mod actions {
    pub const CHECKPOINT_RESET: &str = "checkpoint reset";
    pub const DLQ_REQUEUE: &str = "dlq requeue";
    pub const REPLAY: &str = "replay";
    /// A resync: its `mode` argument says `start`, `resume` or `abandon`.
    pub const RESYNC: &str = "resync";
    pub const PURGE: &str = "purge";
    pub const GAPS_FILL: &str = "gaps fill";
    pub const CONFLICTS_REVIEW: &str = "conflicts review";
    pub const CAPTURE_ADD: &str = "capture add";
    pub const CAPTURE_REMOVE: &str = "capture remove";
    /// A conflict resolved by writing its losing write again.
    pub const CONFLICT_CHOOSE: &str = "conflict choose";
    /// A replay or resync started through the admin API, stopped through it.
    pub const JOB_CANCEL: &str = "job cancel";
    /// Every action recorded.
    pub const ALL: &[&str] = &[
        CHECKPOINT_RESET,
        DLQ_REQUEUE,
        REPLAY,
        RESYNC,
        PURGE,
        GAPS_FILL,
        CONFLICTS_REVIEW,
        CAPTURE_ADD,
        CAPTURE_REMOVE,
        JOB_CANCEL,
        CONFLICT_CHOOSE,
    ];
}

/// Through what an action came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The `sitesync` command line; `who` is `user@host`.
    Cli,
    /// The admin HTTP API; `who` is the token's name.
    Api,
}

impl Via {
    /// The word stored in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Cli => "cli",
            Via::Api => "api",
        }
    }

    /// Reads the stored word; `None` for one this version does not know.
    pub fn parse(text: &str) -> Option<Via> {
        match text.trim() {
            "cli" => Some(Via::Cli),
            "api" => Some(Via::Api),
            _ => None,
        }
    }
}

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It did what was asked; `detail` says what.
    Ok,
    /// It failed, or did only part of it; `detail` is the error.
    Failed,
}

impl Outcome {
    /// The word stored in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
        }
    }

    /// Reads the stored word; `None` for one this version does not know.
    pub fn parse(text: &str) -> Option<Outcome> {
        match text.trim() {
            "ok" => Some(Outcome::Ok),
            "failed" => Some(Outcome::Failed),
            _ => None,
        }
    }
}

/// One row of `sitesync_audit`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub id: Uuid,
    /// When the action ended (UTC; the server's clock on SQL Server and
    /// Oracle, as for jobs).
    pub at: DateTime<Utc>,
    /// Who: `user@host` from the CLI, the token's name from the API.
    pub who: String,
    pub via: Via,
    /// One of [`actions`].
    pub action: String,
    /// The action's arguments as given (ids, filters, flags).
    pub arguments: serde_json::Value,
    pub result: Outcome,
    /// The line that says what it did, or the error.
    pub detail: String,
}

impl Entry {
    /// A new entry, now, with a fresh id; `detail` cut to [`MAX_DETAIL`].
    pub fn new(
        via: Via,
        who: &str,
        action: &str,
        arguments: serde_json::Value,
        result: Result<&str, &str>,
    ) -> Entry {
        let (result, detail) = match result {
            Ok(line) => (Outcome::Ok, line),
            Err(e) => (Outcome::Failed, e),
        };
        Entry {
            id: Uuid::new_v4(),
            at: Utc::now(),
            who: who.to_string(),
            via,
            action: action.to_string(),
            arguments,
            result,
            detail: cut(detail.trim_end(), MAX_DETAIL),
        }
    }
}

/// `text` within `max` bytes, cut at a character boundary with `…`.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// An engine's `sitesync_audit` table.
pub trait AuditLog: Send + Sync + 'static {
    /// Creates the table (idempotent); one line per thing done.
    fn init(&self) -> impl Future<Output = Result<Vec<String>, TargetError>> + Send;

    /// What `sitesync check` verifies: that the table exists.
    fn preflight(&self) -> impl Future<Output = Vec<Check>> + Send;

    /// Stores one entry (committed on its own).
    fn insert<'a>(
        &'a self,
        entry: &'a Entry,
    ) -> impl Future<Output = Result<(), TargetError>> + Send + 'a;

    /// The latest `limit` entries, newest first, of `action` only when
    /// given.
    fn list<'a>(
        &'a self,
        limit: usize,
        action: Option<&'a str>,
    ) -> impl Future<Output = Result<Vec<Entry>, TargetError>> + Send + 'a;
}

/// Records an action that has run: `result` is `Ok(what it did)` or
/// `Err(the error)`.
///
/// The action has happened whatever this returns: a failure to record it
/// is logged here as a warning and returned so that the caller can tell
/// its user too (the CLI on stderr, the API in its answer), never turned
/// into the action's failure.
pub async fn record(
    log: &impl AuditLog,
    via: Via,
    who: &str,
    action: &str,
    arguments: serde_json::Value,
    result: Result<&str, &str>,
) -> Result<Entry, TargetError> {
    let entry = Entry::new(via, who, action, arguments, result);
    match log.insert(&entry).await {
        Ok(()) => Ok(entry),
        Err(e) => {
            tracing::warn!(
                action,
                who,
                via = via.as_str(),
                result = entry.result.as_str(),
                error = %e,
                "the action was done but could not be recorded in {AUDIT_TABLE}"
            );
            Err(e)
        }
    }
}

/// Set by the admin API in the environment of a command it starts (a
/// replay, a resync): the name of the token that asked for it.
pub const CALLER_ENV: &str = "SITESYNC_API_CALLER";

/// Who runs this command and through what: the API token's name when the
/// admin API started the process ([`CALLER_ENV`]), else `user@host` from
/// the command line. Job rows and audit entries both take it.
pub fn actor() -> (Via, String) {
    match std::env::var(CALLER_ENV) {
        Ok(name) if !name.trim().is_empty() => (Via::Api, name.trim().to_string()),
        _ => (Via::Cli, who()),
    }
}

/// Who runs a command: the OS user ([`crate::jobs::who`]) `@` the host.
pub fn who() -> String {
    let user = crate::jobs::who();
    match hostname() {
        Some(host) => format!("{user}@{host}"),
        None => user,
    }
}

/// The machine's name, `None` when it has none.
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = match rc {
        0 => {
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).trim().to_string()
        }
        _ => std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
    };
    (!name.is_empty()).then_some(name)
}

/// `sitesync audit`'s table: one line per action, newest first.
pub fn render(entries: &[Entry]) -> String {
    let who_width = entries
        .iter()
        .map(|e| e.who.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(3, 32);
    let mut out = format!(
        "{:<19}  {:<who_width$}  {:<3}  {:<16}  {:<6}  {}\n",
        "at (UTC)", "who", "via", "action", "result", "arguments: detail"
    );
    for e in entries {
        let args = match &e.arguments {
            serde_json::Value::Object(o) if o.is_empty() => String::new(),
            serde_json::Value::Null => String::new(),
            a => a.to_string(),
        };
        // One line per entry: a multi-line error keeps its first line.
        let detail = e.detail.lines().next().unwrap_or("");
        let sep = match (args.is_empty(), detail.is_empty()) {
            (false, false) => ": ",
            _ => "",
        };
        out.push_str(&format!(
            "{:<19}  {:<who_width$}  {:<3}  {:<16}  {:<6}  {args}{sep}{detail}\n",
            e.at.format("%Y-%m-%d %H:%M:%S"),
            e.who,
            e.via.as_str(),
            e.action,
            e.result.as_str(),
        ));
    }
    out
}

/// `sitesync audit --json`: the entries as stored, newest first.
pub fn to_json(entries: &[Entry]) -> serde_json::Value {
    serde_json::to_value(entries).unwrap_or_default()
}

/// An entry put back together from an engine's columns (text where an
/// engine has no better type); names what is wrong.
#[allow(clippy::too_many_arguments)]
pub fn entry(
    id: &str,
    at: DateTime<Utc>,
    who: String,
    via: &str,
    action: String,
    arguments: &str,
    result: &str,
    detail: Option<String>,
) -> Result<Entry, TargetError> {
    let bad = |what: &str| {
        TargetError::operator(
            crate::error::Cause::Query,
            format!("the {AUDIT_TABLE} row {id} has {what}"),
        )
    };
    Ok(Entry {
        id: id
            .trim()
            .parse()
            .map_err(|_| bad("an id that is not a UUID"))?,
        at,
        who,
        via: Via::parse(via).ok_or_else(|| bad(&format!("an unknown via `{via}`")))?,
        action,
        arguments: serde_json::from_str(arguments)
            .map_err(|_| bad("arguments that are not JSON"))?,
        result: Outcome::parse(result)
            .ok_or_else(|| bad(&format!("an unknown result `{result}`")))?,
        // Oracle reads an empty VARCHAR2 back as NULL.
        detail: detail.unwrap_or_default(),
    })
}

/// An audit log kept in memory, for tests of the code that records.
#[cfg(test)]
pub mod memory {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct MemoryAudit {
        pub entries: Mutex<Vec<Entry>>,
        /// Fail every insert (a database that is down).
        pub failing: bool,
    }

    impl AuditLog for MemoryAudit {
        async fn init(&self) -> Result<Vec<String>, TargetError> {
            Ok(vec![])
        }
        async fn preflight(&self) -> Vec<Check> {
            vec![]
        }
        async fn insert<'a>(&'a self, entry: &'a Entry) -> Result<(), TargetError> {
            if self.failing {
                return Err(TargetError::transient(
                    crate::error::Cause::Unreachable,
                    "connecting: refused",
                ));
            }
            self.entries.lock().unwrap().push(entry.clone());
            Ok(())
        }
        async fn list<'a>(
            &'a self,
            limit: usize,
            action: Option<&'a str>,
        ) -> Result<Vec<Entry>, TargetError> {
            let entries = self.entries.lock().unwrap();
            Ok(entries
                .iter()
                .rev()
                .filter(|e| action.is_none_or(|a| e.action == a))
                .take(limit)
                .cloned()
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryAudit;
    use super::*;
    use serde_json::json;

    fn at(entry: Entry, time: &str) -> Entry {
        Entry {
            at: crate::event::parse_timestamp(time).unwrap(),
            ..entry
        }
    }

    #[test]
    fn the_table_has_one_line_per_entry_with_its_arguments_and_first_line_of_detail() {
        let ok = at(
            Entry::new(
                Via::Cli,
                "ops@paris-1",
                actions::CONFLICTS_REVIEW,
                json!({"ids": [12, 13]}),
                Ok("2 conflict(s) reviewed"),
            ),
            "2026-12-03T10:00:00Z",
        );
        let failed = at(
            Entry::new(
                Via::Api,
                "token dashboard",
                actions::PURGE,
                json!({}),
                Err("deleting: connection reset\nretry later"),
            ),
            "2026-12-03T10:05:07.5Z",
        );
        let text = render(&[failed, ok]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("at (UTC)"), "{text}");
        assert_eq!(
            lines[1],
            "2026-12-03 10:05:07  token dashboard  api  purge             failed  deleting: connection reset"
        );
        assert_eq!(
            lines[2],
            "2026-12-03 10:00:00  ops@paris-1      cli  conflicts review  ok      {\"ids\":[12,13]}: 2 conflict(s) reviewed"
        );
    }

    #[test]
    fn json_keeps_every_field_with_its_stored_words() {
        let e = Entry::new(
            Via::Cli,
            "ops@h",
            actions::RESYNC,
            json!({"mode": "abandon", "job": 7}),
            Err("resync refused: job 7 is running"),
        );
        let v = to_json(std::slice::from_ref(&e));
        let row = &v[0];
        assert_eq!(row["id"], e.id.to_string());
        assert_eq!(row["who"], "ops@h");
        assert_eq!(row["via"], "cli");
        assert_eq!(row["action"], "resync");
        assert_eq!(row["arguments"]["mode"], "abandon");
        assert_eq!(row["result"], "failed");
        assert_eq!(row["detail"], "resync refused: job 7 is running");
        let at: DateTime<Utc> = serde_json::from_value(row["at"].clone()).unwrap();
        assert_eq!(at, e.at);
        assert_eq!(to_json(&[]), json!([]));
    }

    #[test]
    fn a_row_read_back_is_an_entry_and_a_bad_one_is_named() {
        let now = Utc::now();
        let id = Uuid::from_u128(9).to_string();
        let e = entry(
            &id,
            now,
            "ops@h".into(),
            "api",
            "purge".into(),
            "{\"x\":1}",
            "ok",
            None,
        )
        .unwrap();
        assert_eq!(
            (e.via, e.result, e.detail.as_str()),
            (Via::Api, Outcome::Ok, "")
        );
        assert_eq!(e.arguments["x"], 1);
        let bad = |via: &str, args: &str, result: &str| {
            entry(&id, now, "w".into(), via, "a".into(), args, result, None)
                .unwrap_err()
                .to_string()
        };
        assert!(bad("ftp", "{}", "ok").contains("unknown via `ftp`"));
        assert!(bad("cli", "{", "ok").contains("arguments that are not JSON"));
        assert!(bad("cli", "{}", "meh").contains("unknown result `meh`"));
        let e = entry("nope", now, "w".into(), "cli", "a".into(), "{}", "ok", None).unwrap_err();
        assert!(e.to_string().contains("row nope"), "{e}");
    }

    #[test]
    fn a_long_detail_is_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_DETAIL);
        let e = Entry::new(Via::Cli, "w", "purge", json!({}), Err(&long));
        assert!(e.detail.len() <= MAX_DETAIL, "{}", e.detail.len());
        assert!(e.detail.ends_with('…'));
        assert_eq!(cut("short", 10), "short");
    }

    #[test]
    fn who_is_user_at_host() {
        let w = who();
        assert!(w.starts_with(&crate::jobs::who()), "{w}");
        if hostname().is_some() {
            assert!(w.contains('@'), "{w}");
        }
    }

    #[tokio::test]
    async fn record_stores_the_outcome_and_a_failure_to_record_is_returned_not_hidden() {
        let log = MemoryAudit::default();
        let e = record(
            &log,
            Via::Cli,
            "ops@h",
            actions::DLQ_REQUEUE,
            json!({"all": true}),
            Ok("3 sent back, 0 left"),
        )
        .await
        .unwrap();
        assert_eq!(e.result, Outcome::Ok);
        record(
            &log,
            Via::Api,
            "t",
            actions::REPLAY,
            json!({}),
            Err("broker down"),
        )
        .await
        .unwrap();
        let listed = log.list(10, None).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].action, "replay", "newest first");
        assert_eq!(listed[0].result, Outcome::Failed);
        assert_eq!(log.list(10, Some("dlq requeue")).await.unwrap(), vec![e]);

        let down = MemoryAudit {
            failing: true,
            ..MemoryAudit::default()
        };
        let err = record(&down, Via::Cli, "w", actions::PURGE, json!({}), Ok("done"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
    }
}
