//! `sitesync status`: what this site has received from each origin, the gaps,
//! the dead letters, the conflicts, and how far behind its source is.

use crate::config::ConnectorConfig;
use crate::source::SourceError;
use chrono::{DateTime, Utc};
use std::fmt::Write;

/// One origin's progress at this site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginProgress {
    pub origin: String,
    pub epoch: i64,
    pub seq: i64,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapRecord {
    pub origin: String,
    pub epoch: i64,
    pub from_seq: i64,
    pub to_seq: i64,
    pub at: DateTime<Utc>,
}

/// What the database says about this site.
#[derive(Debug, Clone, Default)]
pub struct SiteStatus {
    pub origins: Vec<OriginProgress>,
    pub gaps: Vec<GapRecord>,
    pub conflicts: i64,
    pub dead_lettered_here: i64,
    pub outbox_backlog: i64,
    /// Bytes of WAL between the slot's confirmed position and the server's.
    pub source_lag_bytes: Option<i64>,
}

fn query(context: &str) -> impl Fn(tokio_postgres::Error) -> SourceError + '_ {
    move |e| SourceError::transient(format!("{context}: {e}"))
}

/// Reads the status of a PostgreSQL site.
pub async fn postgres(
    cfg: &ConnectorConfig,
    client: &tokio_postgres::Client,
) -> Result<SiteStatus, SourceError> {
    let mut status = SiteStatus::default();
    let ready: bool = client
        .query_one("SELECT to_regclass('sitesync_origins') IS NOT NULL", &[])
        .await
        .map_err(query("looking for the sink tables"))?
        .get(0);
    if !ready {
        return Err(SourceError::operator(
            "the sink tables do not exist: run `sitesync init`",
        ));
    }
    for row in client
        .query(
            "SELECT origin, epoch, seq, updated_at FROM sitesync_origins ORDER BY origin",
            &[],
        )
        .await
        .map_err(query("reading sitesync_origins"))?
    {
        status.origins.push(OriginProgress {
            origin: row.get(0),
            epoch: row.get(1),
            seq: row.get(2),
            at: row.get(3),
        });
    }
    for row in client
        .query(
            "SELECT origin, epoch, from_seq, to_seq, detected_at FROM sitesync_gaps ORDER BY detected_at, id",
            &[],
        )
        .await
        .map_err(query("reading sitesync_gaps"))?
    {
        status.gaps.push(GapRecord {
            origin: row.get(0),
            epoch: row.get(1),
            from_seq: row.get(2),
            to_seq: row.get(3),
            at: row.get(4),
        });
    }
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM sitesync_conflicts), \
                    (SELECT count(*) FROM sitesync_inbox WHERE outcome = 'dead_letter')",
            &[],
        )
        .await
        .map_err(query("counting conflicts and dead letters"))?;
    status.conflicts = row.get(0);
    status.dead_lettered_here = row.get(1);
    let (schema, table) = cfg.database.outbox_parts();
    status.outbox_backlog = client
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".\"{table}\""),
            &[],
        )
        .await
        .map_err(query("counting the outbox"))?
        .get(0);
    status.source_lag_bytes = client
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.database.slot],
        )
        .await
        .map_err(query("reading the slot"))?
        .and_then(|r| r.get(0));
    Ok(status)
}

impl SiteStatus {
    /// The report `sitesync status` prints.
    pub fn render(&self, dead_letters_in_queue: Option<u32>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "received from each origin (highest seq; applied, or dead-lettered):"
        );
        if self.origins.is_empty() {
            let _ = writeln!(out, "  nothing yet");
        }
        for o in &self.origins {
            let _ = writeln!(
                out,
                "  {:<10} epoch {:<14} seq {:<10} at {}",
                o.origin,
                o.epoch,
                o.seq,
                o.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            );
        }
        let _ = writeln!(out, "gaps (events that never arrived):");
        if self.gaps.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for g in &self.gaps {
            let range = if g.from_seq == g.to_seq {
                format!("seq {}", g.from_seq)
            } else {
                format!("seq {}..={}", g.from_seq, g.to_seq)
            };
            let _ = writeln!(
                out,
                "  {:<10} epoch {:<14} {range} (detected {})",
                g.origin,
                g.epoch,
                g.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
        }
        let queued = dead_letters_in_queue.map_or_else(
            || "unknown (broker unreachable)".to_string(),
            |n| n.to_string(),
        );
        let _ = writeln!(
            out,
            "dead letters: {} recorded here; {queued} in the dead-letter queue (all sites)",
            self.dead_lettered_here
        );
        let _ = writeln!(out, "conflicts recorded: {}", self.conflicts);
        let lag = self.source_lag_bytes.map_or_else(
            || "no slot".to_string(),
            |b| format!("{b} bytes of WAL behind the server"),
        );
        let _ = writeln!(
            out,
            "source: {} outbox row(s) not yet back round; slot {lag}",
            self.outbox_backlog
        );
        out
    }
}
