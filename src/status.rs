//! `sitesync status`: what this site has received from each origin, the gaps,
//! the dead letters, the conflicts, and how far behind its source is.

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
