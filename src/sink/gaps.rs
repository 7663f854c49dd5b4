//! Automatic gap fill, the sink's side.
//!
//! A gap (`sitesync_gaps`: an origin's seq range that never arrived here) is
//! asked of the archiving site once it is `gap_fill_after_ms` old: younger
//! gaps often close by themselves (a message released by a consumer that
//! died comes back a moment later, and a late arrival takes its seq out of
//! the gap). The request ([`GapRequest`]) goes to the archive's queue of
//! requests; the archiving sidecar sends the events it holds to this site's
//! queue, then a [`GapReply`]. The events close their part of the gap as
//! they arrive; the ranges the reply lists as missing are then marked "not
//! in the archive" on the rows that still hold them, which `sitesync
//! status` shows loudly. A gap still open `gap_fill_again_ms` after its
//! request (the archive was down, the reply was lost) is asked again; one
//! marked not in the archive twelve times less often (the archive may only
//! have lagged behind its queue), or at once by `sitesync gaps fill`.
//!
//! The requests go out on the sink's own connection, from its loop
//! (between batches), so a site whose broker is down asks nothing and
//! loses nothing: the rows stay, and the next check asks.

use super::batch::{GapMark, OpenGap};
use super::control::{self, GAP_REQUEST, GapReply, GapRequest};
use crate::bus::publisher::settle;
use crate::config::{GapFillConfig, TopologyConfig};
use crate::error::{Cause, TargetError};
use lapin::Channel;

/// How often the sink looks for gaps to ask for.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How many times longer a gap the archive said it lacks waits before it
/// is asked again (the archive may have lagged behind its queue then).
pub const NOTED_AGAIN_FACTOR: f64 = 12.0;

/// The open gaps to ask for now: old enough, and never asked or asked long
/// enough ago (a gap the archive said it lacks: [`NOTED_AGAIN_FACTOR`]
/// times longer ago).
pub fn due<'a>(gaps: &'a [OpenGap], fill: &GapFillConfig) -> Vec<&'a OpenGap> {
    let after = fill.after.as_secs_f64();
    let again = fill.again.as_secs_f64();
    gaps.iter()
        .filter(|g| g.age_s >= after)
        .filter(|g| {
            let wait = if g.note.is_some() {
                again * NOTED_AGAIN_FACTOR
            } else {
                again
            };
            g.requested_s.is_none_or(|s| s >= wait)
        })
        .collect()
}

/// The gaps as `sitesync gaps list` prints them.
pub fn describe(gaps: &[OpenGap]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if gaps.is_empty() {
        out.push_str("no open gap: every event of every origin has arrived\n");
    }
    for g in gaps {
        let range = if g.from == g.to {
            format!("seq {}", g.from)
        } else {
            format!("seq {}..{}", g.from, g.to)
        };
        let asked = match g.requested_s {
            None => "never asked".to_string(),
            Some(s) => format!("asked {:.0} s ago", s.max(0.0)),
        };
        let _ = writeln!(
            out,
            "{:<10} epoch {:<6} {range:<24} open {:.0} s, {asked}",
            g.origin,
            g.epoch,
            g.age_s.max(0.0)
        );
        if let Some(note) = &g.note {
            let _ = writeln!(out, "    !! {note}");
        }
    }
    out
}

/// The request for one gap of this `site`.
pub fn request(site: &str, gap: &OpenGap) -> GapRequest {
    GapRequest {
        site: site.to_string(),
        origin: gap.origin.clone(),
        epoch: gap.epoch,
        from: gap.from,
        to: gap.to,
    }
}

/// The rows a reply's missing ranges fall in (of its origin and epoch).
pub fn missing_rows(gaps: &[OpenGap], reply: &GapReply) -> Vec<i64> {
    gaps.iter()
        .filter(|g| g.origin == reply.origin && g.epoch == reply.epoch)
        .filter(|g| {
            reply
                .missing
                .iter()
                .any(|(from, to)| g.from <= *to && *from <= g.to)
        })
        .map(|g| g.id)
        .collect()
}

/// The note a row gets when the archive lacks (part of) it.
pub fn note(reply: &GapReply) -> String {
    let ranges: Vec<String> = reply
        .missing
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}..{b}")
            }
        })
        .collect();
    format!(
        "not in the archive: {} does not hold {} seq {} of epoch {} (it sent {} of {}..{}); \
         resynchronise this data from a site that has it",
        reply.archive,
        reply.origin,
        ranges.join(", "),
        reply.epoch,
        reply.sent,
        reply.from,
        reply.to
    )
}

/// Publishes `requests` to the archive's request queue on `channel` (in
/// confirm mode) and waits for the broker's confirms. Returns how many
/// were confirmed; a request the broker returns (no such queue: the
/// topology was declared before gap fill existed, or no archive runs) is an
/// error that says so.
pub async fn send_requests(
    channel: &Channel,
    topology: &TopologyConfig,
    site: &str,
    requests: &[GapRequest],
) -> Result<usize, TargetError> {
    let queue = topology.gap_request_queue();
    let mut confirms = Vec::with_capacity(requests.len());
    for r in requests {
        let confirm = control::send(channel, &queue, GAP_REQUEST, site, r)
            .await
            .map_err(|e| super::broker(format!("asking for a gap on {queue}: {e}")))?;
        confirms.push(confirm);
    }
    for c in confirms {
        settle(c.await, || format!("a gap request to {queue}")).map_err(|e| {
            TargetError::transient(
                Cause::Unreachable,
                format!(
                    "{e} (is {queue} declared? `sitesync topology declare` makes it; the archiving sidecar consumes it)"
                ),
            )
        })?;
    }
    Ok(requests.len())
}

/// What a sink does about a gap reply: marks the rows of the missing
/// ranges with the archive's answer. Returns how many rows were marked.
pub async fn on_reply<T: super::Target>(
    target: &T,
    reply: &GapReply,
) -> Result<usize, TargetError> {
    if reply.missing.is_empty() {
        tracing::info!(origin = %reply.origin, epoch = reply.epoch, from = reply.from, to = reply.to, sent = reply.sent, archive = %reply.archive, "gap fill: the archive sent every event of the range");
        return Ok(0);
    }
    let gaps = target.open_gaps().await?;
    let rows = missing_rows(&gaps, reply);
    let note = note(reply);
    target.mark_gaps(&rows, GapMark::Note(&note)).await?;
    tracing::error!(origin = %reply.origin, epoch = reply.epoch, missing = ?reply.missing, archive = %reply.archive, "gap fill: {note}");
    Ok(rows.len())
}

/// Asks the archive now for every gap in `open` (`sitesync gaps fill`, the
/// admin API), marking them asked anew; how many ranges were sent. The
/// running sidecar applies what the archive sends back.
pub async fn ask_now<T: super::Target>(
    cfg: &crate::config::ConnectorConfig,
    target: &T,
    open: &[OpenGap],
) -> Result<usize, String> {
    if open.is_empty() {
        return Ok(0);
    }
    if cfg.topology.archive_site.is_none() {
        return Err(format!(
            "{} names no archiving site (archive_site): there is no archive to ask; see docs/archive.md",
            cfg.topology.file.display()
        ));
    }
    let conn = crate::bus::connect(
        &cfg.broker.urls,
        cfg.broker.connect_timeout,
        &format!("sitesync-{}-gaps", cfg.name),
    )
    .await
    .map_err(|e| e.to_string())?;
    let channel = super::control::confirm_channel(&conn)
        .await
        .map_err(|e| format!("broker: {e}"))?;
    let requests: Vec<_> = open.iter().map(|g| request(&cfg.site, g)).collect();
    let sent = send_requests(&channel, &cfg.topology, &cfg.site, &requests)
        .await
        .map_err(|e| e.to_string())?;
    let ids: Vec<i64> = open.iter().map(|g| g.id).collect();
    target
        .mark_gaps(&ids, super::batch::GapMark::RequestedAnew)
        .await
        .map_err(|e| e.to_string())?;
    let _ = conn.close(200, "asked".into()).await;
    Ok(sent)
}

/// The gaps as JSON (the admin API).
pub fn to_json(open: &[OpenGap]) -> serde_json::Value {
    serde_json::Value::Array(
        open.iter()
            .map(|g| {
                serde_json::json!({
                    "id": g.id, "origin": g.origin, "epoch": g.epoch, "from_seq": g.from,
                    "to_seq": g.to, "age_s": g.age_s, "requested_s": g.requested_s, "note": g.note,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gap(
        id: i64,
        from: u64,
        to: u64,
        age_s: f64,
        requested_s: Option<f64>,
        note: Option<&str>,
    ) -> OpenGap {
        OpenGap {
            id,
            origin: "MADRID".into(),
            epoch: 2,
            from,
            to,
            age_s,
            requested_s,
            note: note.map(String::from),
        }
    }

    #[test]
    fn young_gaps_wait_asked_ones_wait_longer_and_noted_ones_are_left() {
        let fill = GapFillConfig {
            enabled: true,
            after: Duration::from_secs(30),
            again: Duration::from_secs(300),
        };
        let gaps = [
            gap(1, 1, 1, 5.0, None, None),
            gap(2, 3, 4, 31.0, None, None),
            gap(3, 6, 6, 400.0, Some(100.0), None),
            gap(4, 8, 9, 900.0, Some(301.0), None),
            gap(5, 11, 11, 9000.0, Some(400.0), Some("not in the archive")),
            gap(6, 13, 13, 9000.0, Some(3601.0), Some("not in the archive")),
        ];
        let ids: Vec<i64> = due(&gaps, &fill).iter().map(|g| g.id).collect();
        assert_eq!(ids, [2, 4, 6]);
        assert_eq!(
            request("LONDON", &gaps[1]),
            GapRequest {
                site: "LONDON".into(),
                origin: "MADRID".into(),
                epoch: 2,
                from: 3,
                to: 4
            }
        );
    }

    #[test]
    fn a_reply_marks_exactly_the_rows_its_missing_ranges_touch() {
        let gaps = [
            gap(1, 10, 12, 0.0, None, None),
            gap(2, 15, 15, 0.0, None, None),
            gap(3, 20, 30, 0.0, None, None),
            OpenGap {
                origin: "PARIS".into(),
                ..gap(4, 10, 30, 0.0, None, None)
            },
        ];
        let reply = GapReply {
            archive: "PARIS".into(),
            origin: "MADRID".into(),
            epoch: 2,
            from: 10,
            to: 30,
            sent: 12,
            missing: vec![(12, 12), (25, 26)],
        };
        assert_eq!(missing_rows(&gaps, &reply), [1, 3]);
        let n = note(&reply);
        assert!(
            n.starts_with(
                "not in the archive: PARIS does not hold MADRID seq 12, 25..26 of epoch 2"
            ),
            "{n}"
        );
    }
}
