//! Receipts, the sending side (opt-in): after each batch, one message per
//! origin of the batch's events, to that origin's queue through the default
//! exchange ([`control::Receipt`]): what became of each event here. The
//! sink sends them when `[sink] receipts = true`, the archive (`archived`)
//! when `[archive] receipts = true`. The origin's sink records them
//! (`sitesync_receipts`) for `sitesync trace` and `status`.
//!
//! A receipt is information, not data: it is published after the batch
//! commits and confirmed by the broker, and one the broker refuses is
//! logged and not sent again (the event itself is safe either way).

use super::Outcome;
use super::control::{self, RECEIPT, Receipt, Receipted};
use crate::bus::publisher::settle;
use crate::config::TopologyConfig;
use crate::event::Event;
use lapin::{Channel, PublisherConfirm};
use std::collections::BTreeMap;

/// A receipt line's outcome, or `None` for what gets no receipt yet (it
/// failed this round and will be tried again, or was held) or none at all
/// (this site's own event, back round).
pub fn outcome(o: &Outcome) -> Option<(&'static str, Option<String>)> {
    match o {
        Outcome::Applied => Some(("applied", None)),
        Outcome::Duplicate => Some(("duplicate", None)),
        Outcome::Lost => Some(("lost", None)),
        Outcome::Skipped => Some(("skipped", None)),
        Outcome::DeadLettered(reason) => Some(("dead_letter", Some(reason.clone()))),
        Outcome::Own | Outcome::Failed(_) | Outcome::Held => None,
    }
}

/// The receipts of one batch, one per origin that the topology lists
/// (only they have a queue), in origin order; none to `site` itself when
/// `skip_own` (a sink's own events back round: the archive does receipt
/// its own site's events).
pub fn build<'a>(
    site: &str,
    skip_own: bool,
    topology: &TopologyConfig,
    at: chrono::DateTime<chrono::Utc>,
    lines: impl IntoIterator<Item = (&'a Event, &'static str, Option<String>)>,
) -> Vec<(String, Receipt)> {
    let mut by_origin: BTreeMap<&str, Vec<Receipted>> = BTreeMap::new();
    for (e, outcome, reason) in lines {
        if (skip_own && e.origin == site) || !topology.sites.contains(&e.origin) {
            continue;
        }
        by_origin.entry(&e.origin).or_default().push(Receipted {
            id: e.id,
            epoch: e.epoch,
            seq: e.seq,
            outcome: outcome.to_string(),
            reason,
        });
    }
    by_origin
        .into_iter()
        .map(|(origin, events)| {
            (
                origin.to_string(),
                Receipt {
                    site: site.to_string(),
                    at,
                    events,
                },
            )
        })
        .collect()
}

/// Publishes `receipts` on `channel` (confirm mode); returns the pending
/// confirms, to be [`settled`] once the batch's acks are out.
pub async fn publish(
    channel: &Channel,
    topology: &TopologyConfig,
    site: &str,
    receipts: Vec<(String, Receipt)>,
) -> Vec<(String, Result<PublisherConfirm, lapin::Error>)> {
    let mut out = Vec::with_capacity(receipts.len());
    for (origin, r) in receipts {
        let queue = topology.site_queue(&origin);
        let sent = control::send(channel, &queue, RECEIPT, site, &r).await;
        out.push((origin, sent));
    }
    out
}

/// Waits for the confirms of [`publish`]; a receipt the broker refused is
/// logged (it is not sent again).
pub async fn settled(sent: Vec<(String, Result<PublisherConfirm, lapin::Error>)>) {
    for (origin, sent) in sent {
        let result = match sent {
            Ok(confirm) => settle(confirm.await, || format!("a receipt to {origin}"))
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!(%origin, error = %e, "a receipt was not delivered (the events themselves are safe)");
        }
    }
}

/// What `sitesync status` says of receipts: per site that sends them,
/// this site's events it has not receipted after `older_than_s`.
pub fn describe_lag(lagging: &[(String, u64, f64)], older_than_s: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (site, n, oldest) in lagging {
        let _ = writeln!(
            out,
            "receipts: !! {n} event(s) with a receipt from some site more than {older_than_s} s ago have none from {site} (oldest {oldest:.0} s): not applied there yet, or its receipts are lost; `sitesync trace` one of them"
        );
    }
    out
}

/// What `sitesync trace` prints of an event, from this database.
pub fn describe_trace(
    cfg: &crate::config::ConnectorConfig,
    id: uuid::Uuid,
    t: &super::batch::Traced,
) -> String {
    use std::fmt::Write;
    let mut out = format!("event {id}, as {}'s database knows it\n", cfg.site);
    if let Some((origin, kind, epoch, seq, outcome, at)) = &t.inbox {
        let _ = writeln!(out, "  from {origin}: {kind}, epoch {epoch} seq {seq}");
        let _ = writeln!(out, "  {:<10} {:<12} {at}", cfg.site, outcome);
    }
    if let Some(r) = t.receipts.first()
        && t.inbox.is_none()
    {
        let _ = writeln!(
            out,
            "  written here ({}), epoch {} seq {}; receipts:",
            cfg.site, r.epoch, r.seq
        );
    }
    for r in &t.receipts {
        let reason = r
            .reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<10} {:<12} {} (receipt here {}){reason}",
            r.site, r.outcome, r.at, r.received_at
        );
    }
    if !t.receipts.is_empty() {
        let heard: Vec<&str> = t.receipts.iter().map(|r| r.site.as_str()).collect();
        let silent: Vec<&str> = cfg
            .topology
            .sites
            .iter()
            .map(String::as_str)
            .filter(|s| *s != cfg.site && !heard.contains(s))
            .collect();
        if !silent.is_empty() {
            let _ = writeln!(out, "  no receipt yet from: {}", silent.join(", "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::testing::event_with;

    #[test]
    fn one_receipt_per_origin_and_none_for_this_site_or_unknown_ones() {
        let topology = TopologyConfig {
            file: "t.toml".into(),
            exchange: "e".into(),
            sites: ["PARIS", "LONDON", "MADRID"].map(String::from).to_vec(),
            site_queue_prefix: "SITE_".into(),
            archive_queue: "SITE_PARIS_HISTO".into(),
            dead_letter_exchange: "dlx".into(),
            dead_letter_queue: "dlq".into(),
            archive_site: None,
            archive_bound: Default::default(),
        };
        let a = event_with(1, "LONDON", "1", 10, "{}");
        let b = event_with(2, "MADRID", "2", 10, "{}");
        let c = event_with(3, "LONDON", "3", 10, "{}");
        let own = event_with(4, "PARIS", "4", 10, "{}");
        let stranger = event_with(5, "ROME", "5", 10, "{}");
        let lines = [
            (&a, Outcome::Applied),
            (&b, Outcome::DeadLettered("no route".into())),
            (&c, Outcome::Duplicate),
            (&own, Outcome::Applied),
            (&stranger, Outcome::Applied),
            (&a, Outcome::Failed("retry".into())),
        ];
        let at = chrono::DateTime::from_timestamp(100, 0).unwrap();
        let receipts = build(
            "PARIS",
            true,
            &topology,
            at,
            lines
                .iter()
                .filter_map(|(e, o)| outcome(o).map(|(o, r)| (*e, o, r))),
        );
        assert_eq!(receipts.len(), 2);
        let (origin, london) = &receipts[0];
        assert_eq!(origin, "LONDON");
        assert_eq!(
            london
                .events
                .iter()
                .map(|l| (l.seq, l.outcome.as_str()))
                .collect::<Vec<_>>(),
            [(1, "applied"), (3, "duplicate")]
        );
        let (origin, madrid) = &receipts[1];
        assert_eq!(origin, "MADRID");
        assert_eq!(madrid.events[0].reason.as_deref(), Some("no route"));
        assert!(
            receipts
                .iter()
                .all(|(_, r)| r.site == "PARIS" && r.at == at)
        );
        // The archive receipts its own site's events too.
        let archived = build("PARIS", false, &topology, at, [(&own, "archived", None)]);
        assert_eq!(archived[0].0, "PARIS");
    }
}
