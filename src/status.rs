//! `sitesync status`: what this site has received from each origin, the gaps,
//! the dead letters, the conflicts, and how far behind its source is.

use crate::error::{Cause, SourceError};
use crate::event::parse_timestamp;
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
    /// What the archive said of it (gap fill): e.g. not in the archive.
    pub note: Option<String>,
}

/// What the database says about this site.
#[derive(Debug, Clone, Default)]
pub struct SiteStatus {
    pub origins: Vec<OriginProgress>,
    pub gaps: Vec<GapRecord>,
    pub conflicts: i64,
    pub dead_lettered_here: i64,
    pub outbox_backlog: i64,
    /// How far the source is behind its log, in the engine's words (a
    /// slot's WAL bytes behind the server, a Change Tracking version).
    pub source_lag: String,
    /// The same in bytes of the change log, where the engine counts them
    /// (PostgreSQL).
    pub source_lag_bytes: Option<i64>,
    /// More about the source, one line each, printed under it (Oracle:
    /// the transactions it abandoned).
    pub source_notes: Vec<String>,
}

/// One column of a row read as text, parsed.
fn field<T: std::str::FromStr>(row: &[Option<String>], i: usize, what: &str) -> Result<T, String> {
    row.get(i)
        .and_then(|c| c.as_deref())
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| format!("{what} is missing or not readable in {row:?}"))
}

/// A time column read as text (ISO 8601; without a zone, UTC).
fn time(row: &[Option<String>], i: usize, what: &str) -> Result<DateTime<Utc>, String> {
    row.get(i)
        .and_then(|c| c.as_deref())
        .and_then(parse_timestamp)
        .ok_or_else(|| format!("{what} is missing or not a time in {row:?}"))
}

impl OriginProgress {
    /// From a row of `sitesync_origins` read as text: origin, epoch, seq,
    /// updated at (engines whose driver reads every column as text).
    pub fn from_text(row: &[Option<String>]) -> Result<OriginProgress, String> {
        Ok(OriginProgress {
            origin: field(row, 0, "origin")?,
            epoch: field(row, 1, "epoch")?,
            seq: field(row, 2, "seq")?,
            at: time(row, 3, "updated_at")?,
        })
    }
}

impl GapRecord {
    /// From a row of `sitesync_gaps` read as text: origin, epoch, from seq,
    /// to seq, detected at, note (may be NULL).
    pub fn from_text(row: &[Option<String>]) -> Result<GapRecord, String> {
        Ok(GapRecord {
            origin: field(row, 0, "origin")?,
            epoch: field(row, 1, "epoch")?,
            from_seq: field(row, 2, "from_seq")?,
            to_seq: field(row, 3, "to_seq")?,
            at: time(row, 4, "detected_at")?,
            note: row.get(5).cloned().flatten(),
        })
    }
}

impl SiteStatus {
    /// The sink's part of a status, from its tables read as text (engines
    /// whose driver reads every column as text): the rows of the origins
    /// table and of the gaps table (see [`OriginProgress::from_text`],
    /// [`GapRecord::from_text`]) and the counts row ([`counts_from_text`]).
    /// `tables` names the origins and gaps tables in errors; the source's
    /// lag is the engine's to fill.
    pub fn from_text(
        origins: &[Vec<Option<String>>],
        gaps: &[Vec<Option<String>>],
        counts: &[Option<String>],
        tables: (&str, &str),
    ) -> Result<SiteStatus, SourceError> {
        let unreadable = |what: String| {
            move |e: String| SourceError::transient(Cause::Query, format!("{what}: {e}"))
        };
        let (origins_table, gaps_table) = tables;
        let mut status = SiteStatus::default();
        for row in origins {
            status.origins.push(
                OriginProgress::from_text(row)
                    .map_err(unreadable(format!("reading {origins_table}")))?,
            );
        }
        for row in gaps {
            status.gaps.push(
                GapRecord::from_text(row).map_err(unreadable(format!("reading {gaps_table}")))?,
            );
        }
        (
            status.conflicts,
            status.dead_lettered_here,
            status.outbox_backlog,
        ) = counts_from_text(counts).map_err(unreadable("counting".into()))?;
        Ok(status)
    }
}

/// The counts of a status read as one text row: conflicts, dead letters
/// recorded here, outbox rows.
pub fn counts_from_text(row: &[Option<String>]) -> Result<(i64, i64, i64), String> {
    Ok((
        field(row, 0, "the conflicts count")?,
        field(row, 1, "the dead letters count")?,
        field(row, 2, "the outbox count")?,
    ))
}

impl SiteStatus {
    /// The same as JSON (`sitesync status --json`, the admin API).
    pub fn to_json(&self) -> serde_json::Value {
        let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        serde_json::json!({
            "origins": self.origins.iter().map(|o| serde_json::json!({
                "origin": o.origin, "epoch": o.epoch, "seq": o.seq, "at": time(&o.at),
            })).collect::<Vec<_>>(),
            "gaps": self.gaps.iter().map(|g| serde_json::json!({
                "origin": g.origin, "epoch": g.epoch, "from_seq": g.from_seq,
                "to_seq": g.to_seq, "detected_at": time(&g.at), "note": g.note,
            })).collect::<Vec<_>>(),
            "conflicts": self.conflicts,
            "dead_lettered_here": self.dead_lettered_here,
            "outbox_backlog": self.outbox_backlog,
            "source_lag": self.source_lag,
            "source_lag_bytes": self.source_lag_bytes,
            "source_notes": self.source_notes,
        })
    }

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
            if let Some(note) = &g.note {
                let _ = writeln!(out, "    !! {note}");
            }
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
        let _ = writeln!(
            out,
            "source: {} outbox row(s) not yet back round; {}",
            self.outbox_backlog, self.source_lag
        );
        for note in &self.source_notes {
            let _ = writeln!(out, "  {note}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[&str]) -> Vec<Option<String>> {
        cells.iter().map(|c| Some(c.to_string())).collect()
    }

    #[test]
    fn rows_read_as_text_become_progress_gaps_and_counts() {
        let o = OriginProgress::from_text(&row(&["PARIS", "17", "42", "2026-11-23T10:00:00.123"]))
            .unwrap();
        assert_eq!((o.origin.as_str(), o.epoch, o.seq), ("PARIS", 17, 42));
        assert_eq!(o.at.to_rfc3339(), "2026-11-23T10:00:00.123+00:00");
        let g =
            GapRecord::from_text(&row(&["LONDON", "1", "3", "4", "2026-11-23T10:00:00Z"])).unwrap();
        assert_eq!((g.from_seq, g.to_seq), (3, 4));
        assert_eq!(counts_from_text(&row(&["2", "0", "5"])).unwrap(), (2, 0, 5));
        let e = OriginProgress::from_text(&row(&["PARIS", "x", "1", "2026-11-23T10:00:00"]))
            .unwrap_err();
        assert!(e.contains("epoch"), "{e}");
        let e = GapRecord::from_text(&[Some("L".into()), None]).unwrap_err();
        assert!(e.contains("epoch"), "{e}");
    }

    #[test]
    fn a_status_from_the_sink_tables_read_as_text_names_the_table_of_a_bad_row() {
        let origins = vec![row(&["PARIS", "17", "42", "2026-11-23T10:00:00"])];
        let gaps = vec![row(&["LONDON", "1", "3", "4", "2026-11-23T10:00:00Z"])];
        let status =
            SiteStatus::from_text(&origins, &gaps, &row(&["2", "1", "5"]), ("o_t", "g_t")).unwrap();
        assert_eq!(status.origins[0].seq, 42);
        assert_eq!(status.gaps[0].to_seq, 4);
        assert_eq!(
            (
                status.conflicts,
                status.dead_lettered_here,
                status.outbox_backlog
            ),
            (2, 1, 5)
        );
        let bad = vec![row(&["LONDON", "x", "3", "4", "2026-11-23T10:00:00Z"])];
        let e = SiteStatus::from_text(&origins, &bad, &row(&["0", "0", "0"]), ("o_t", "g_t"))
            .unwrap_err();
        assert!(e.message().starts_with("reading g_t: "), "{}", e.message());
    }

    #[test]
    fn the_report_shows_gaps_and_the_source_in_the_engine_s_words() {
        let status = SiteStatus {
            gaps: vec![
                GapRecord::from_text(&row(&["PARIS", "1", "3", "4", "2026-11-23T10:00:00Z"]))
                    .unwrap(),
            ],
            outbox_backlog: 2,
            source_lag: "slot 12 bytes of WAL behind the server".into(),
            source_notes: vec!["a note on the source".into()],
            ..SiteStatus::default()
        };
        let text = status.render(Some(1));
        assert!(
            text.contains("PARIS") && text.contains("seq 3..=4"),
            "{text}"
        );
        assert!(
            text.contains(
                "source: 2 outbox row(s) not yet back round; slot 12 bytes of WAL behind the server"
            ),
            "{text}"
        );
        assert!(text.contains("1 in the dead-letter queue"), "{text}");
        assert!(
            text.ends_with("behind the server\n  a note on the source\n"),
            "{text}"
        );
    }
}
