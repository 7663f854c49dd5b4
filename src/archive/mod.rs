//! The archive: the topology's archive queue (`SITE_PARIS_HISTO`), which
//! receives every event of every site through the fanout, consumed by the
//! one sidecar whose connector has an `[archive]` section into a table of
//! its own database (`sitesync_archive` beside the outbox by default).
//!
//! The consumer is the sink's ([`crate::sink::queue`]: the same consumer,
//! batches and acks), beside the sink and the source in the same process
//! ([`crate::sidecar`]). Each batch is one database transaction that
//! inserts the batch's events and skips those whose `event_id` the table
//! holds already; its messages are acked only after it commits. A crash
//! before the commit leaves the messages unacked (the broker delivers them
//! again); a crash between the commit and the ack delivers again events
//! the table holds (skipped). Either way each event is archived once. A
//! message whose body is not an event goes to the dead-letter queue with
//! the reason (stage `archive`), confirmed before it is acked, and the rest
//! of its batch is archived.
//!
//! Each engine says its SQL in `src/engine/<engine>/archive.rs` (a
//! [`Store`]): the table, indexed by `(origin, epoch, seq)` (to read back
//! an origin's range: replay, gap fill) and by the time it was received
//! and the event's own time (purge, replay's `--from/--to`).

pub mod gapfill;
pub mod replay;

use crate::bus::publisher::{Publisher, settle};
use crate::checks::Check;
use crate::config::{ArchiveConfig, ConnectorConfig};
use crate::error::{ErrorKind, TargetError};
use crate::event::Event;
use crate::retry::Backoff;
use crate::runner::Shutdown;
use crate::sink::broker;
use crate::sink::queue::{self, Filled, Limits, delivered};
use crate::sink::receipts;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use std::collections::HashSet;
use std::future::Future;

/// An engine's archive table.
pub trait Store: Send + Sync + 'static {
    /// The table, as its SQL names it (for messages).
    fn table(&self) -> &str;

    /// Creates the table and its indexes (idempotent); one line per thing
    /// done.
    fn init(&self) -> impl Future<Output = Result<Vec<String>, TargetError>> + Send;

    /// What `sitesync check` verifies: that the table exists.
    fn preflight(&self) -> impl Future<Output = Vec<Check>> + Send;

    /// Inserts `events` (distinct ids) in one transaction, skipping those
    /// whose id the table holds; returns how many were new. Nothing is
    /// kept of a failed call.
    fn write<'a>(
        &'a self,
        events: &'a [&'a Event],
    ) -> impl Future<Output = Result<u64, TargetError>> + Send + 'a;

    /// How many events the table holds (for `sitesync status`).
    fn count(&self) -> impl Future<Output = Result<u64, TargetError>> + Send;

    /// Up to `limit` events in `(origin, epoch, seq)` order, after `after`
    /// (from the first when `None`), of `origin` only when given.
    fn read<'a>(
        &'a self,
        after: Option<&'a Cursor>,
        origin: Option<&'a str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Event>, TargetError>> + Send + 'a;
}

/// Where a read of the archive goes on: after this `(origin, epoch, seq)`.
pub type Cursor = (String, i64, i64);

/// An event as the archive holds it, put back together (what `read`
/// returns): `ts` in any form [`crate::event::parse_timestamp`] reads,
/// `data` the payload's JSON text.
#[allow(clippy::too_many_arguments)]
pub fn archived_event(
    id: &str,
    origin: String,
    epoch: i64,
    seq: i64,
    kind: String,
    entity_key: Option<String>,
    ts: &str,
    data: String,
) -> Result<Event, TargetError> {
    let bad = |what: &str| {
        TargetError::operator(
            crate::error::Cause::Query,
            format!("the archive row of event {id} has {what}"),
        )
    };
    Ok(Event {
        id: id
            .trim()
            .parse()
            .map_err(|_| bad("an id that is not a UUID"))?,
        timestamp: crate::event::parse_timestamp(ts)
            .ok_or_else(|| bad("an unreadable event_ts"))?,
        origin,
        kind,
        entity_key,
        data: serde_json::value::RawValue::from_string(data)
            .map_err(|_| bad("data that is not JSON"))?,
        epoch: u64::try_from(epoch).map_err(|_| bad("a negative epoch"))?,
        seq: u64::try_from(seq).map_err(|_| bad("a negative seq"))?,
    })
}

/// What `sitesync check` says of who archives the archive queue, from
/// this connector's `[archive]` and the topology's `archive_site` (which
/// every site's check reads, so that each can tell whether some site
/// archives).
pub fn coverage(cfg: &ConnectorConfig) -> Check {
    let t = &cfg.topology;
    let queue = &t.archive_queue;
    let file = t.file.display();
    match (&t.archive_site, &cfg.archive) {
        (None, None) => Check::fail(
            "archive",
            format!(
                "no site archives the archive queue {queue}: nothing consumes it, so it grows until RabbitMQ's disk or memory alarm blocks publishing at every site"
            ),
            format!(
                "name the archiving site in {file} (archive_site = \"PARIS\") and add an [archive] section to that site's connector; see docs/archive.md"
            ),
        ),
        (None, Some(_)) => Check::fail(
            "archive",
            format!(
                "this connector archives {queue}, but {file} does not name an archive site, so the other sites' checks cannot tell that one does"
            ),
            format!("set archive_site = \"{}\" in {file}", cfg.site),
        ),
        (Some(site), None) if *site == cfg.site => Check::fail(
            "archive",
            format!(
                "{file} names {site} as the archive site, and this connector has no [archive] section: nothing consumes {queue}"
            ),
            format!(
                "add an [archive] section to {}, or name another site in archive_site",
                cfg.file.display()
            ),
        ),
        (Some(site), Some(_)) if *site != cfg.site => Check::fail(
            "archive",
            format!(
                "this connector has an [archive] section, and {file} names {site} as the archive site"
            ),
            format!(
                "remove [archive] from {}, or set archive_site = \"{}\" in {file}",
                cfg.file.display(),
                cfg.site
            ),
        ),
        (Some(_), Some(a)) => Check::pass(
            "archive",
            format!(
                "{queue} is archived here, into {}",
                a.table
                    .as_deref()
                    .unwrap_or(crate::config::DEFAULT_ARCHIVE_TABLE)
            ),
        ),
        (Some(site), None) => Check::pass(
            "archive",
            format!("{queue} is archived by {site}'s sidecar"),
        ),
    }
}

/// What `sitesync check` says of the archive queue's consumers now: none
/// is a warning (the archiving sidecar may be restarting), as the queue
/// grows meanwhile.
pub fn consumers(cfg: &ConnectorConfig, messages: u32, consumers: u32) -> Check {
    let queue = &cfg.topology.archive_queue;
    let site = cfg
        .topology
        .archive_site
        .as_deref()
        .unwrap_or("the archive site");
    if consumers > 0 {
        Check::pass(
            "archive queue",
            format!("{queue}: {consumers} consumer(s), {messages} message(s) waiting"),
        )
    } else {
        Check::warn(
            "archive queue",
            format!(
                "{queue} has no consumer now ({messages} message(s) waiting): it grows until {site}'s sidecar runs"
            ),
            format!("start `sitesync run` for {site}'s connector"),
        )
    }
}

/// The events of a batch, each id once (the queue may hold two copies of
/// an event that a site republished after a crash), in queue order.
pub fn distinct<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<&'a Event> {
    let mut seen = HashSet::new();
    events.into_iter().filter(|e| seen.insert(e.id)).collect()
}

/// A batch cut into statements (ranges of `events`) for an engine that
/// limits a statement's size: at most `max_rows` events each, and about
/// `max_bytes` of payload (an event larger than that goes alone).
pub fn chunks(events: &[&Event], max_rows: usize, max_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, e) in events.iter().enumerate() {
        let size = e.data.get().len();
        if i > start && (i - start >= max_rows || bytes + size > max_bytes) {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < events.len() {
        out.push(start..events.len());
    }
    out
}

/// Consumes the archive queue into `store` until `shutdown`; reconnects
/// after broker failures. Returns an error only for what needs a person
/// (the table missing, the database refusing us).
pub async fn run<S: Store>(
    cfg: &ConnectorConfig,
    archive: &ArchiveConfig,
    store: &S,
    shutdown: Shutdown,
) -> Result<(), TargetError> {
    queue::reconnecting(cfg, "archive", &shutdown, |s| {
        session(cfg, archive, store, s)
    })
    .await
}

async fn session<S: Store>(
    cfg: &ConnectorConfig,
    archive: &ArchiveConfig,
    store: &S,
    mut shutdown: Shutdown,
) -> Result<(), TargetError> {
    let queue = cfg.topology.archive_queue.clone();
    let mut consuming = queue::consume(
        cfg,
        &queue,
        archive.prefetch,
        "archive",
        &format!("sitesync-{}-archive", cfg.name),
    )
    .await?;
    let dead_letters = Publisher::new(&consuming.conn, &cfg.topology, &cfg.site)
        .await
        .map_err(broker)?;
    let receipt_channel = if archive.receipts {
        Some(
            crate::sink::control::confirm_channel(&consuming.conn)
                .await
                .map_err(broker)?,
        )
    } else {
        None
    };
    tracing::info!(connector = %cfg.name, %queue, table = store.table(), receipts = archive.receipts, "archive consuming (single active consumer: a standby waits here)");
    let limits = Limits {
        size: archive.batch_size,
        timeout: archive.batch_timeout,
        idle: archive.batch_idle,
    };
    let mut backoff = Backoff::new(&cfg.retry);
    let mut batch: Vec<Delivery> = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            d = consuming.consumer.next() => batch.push(delivered(d, &queue)?),
        }
        let filled = queue::fill(
            &mut consuming.consumer,
            &queue,
            limits,
            batch.len(),
            &mut shutdown,
            |d| {
                batch.push(d);
                1
            },
        )
        .await?;
        if filled == Filled::Stop {
            return Ok(());
        }
        let parsed: Vec<Result<Event, String>> =
            batch.iter().map(|d| Event::from_body(&d.data)).collect();
        let events = distinct(parsed.iter().filter_map(|p| p.as_ref().ok()));
        let new = loop {
            match store.write(&events).await {
                Ok(new) => {
                    backoff.reset();
                    break new;
                }
                Err(e) if e.kind() == ErrorKind::Operator => return Err(e),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e.message(), retry_in = ?delay, messages = batch.len(), "archiving the batch failed; retrying it, nothing acked");
                    tokio::select! {
                        _ = shutdown.wait() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        tracing::debug!(messages = batch.len(), new, "archive batch committed");
        let receipts_sent = match &receipt_channel {
            Some(ch) => {
                let lines = events.iter().map(|e| (*e, "archived", None));
                let built =
                    receipts::build(&cfg.site, false, &cfg.topology, chrono::Utc::now(), lines);
                receipts::publish(ch, &cfg.topology, &cfg.site, built).await
            }
            None => Vec::new(),
        };
        // Dead letters before the ack (confirmed): nothing is lost between.
        for (d, p) in batch.iter().zip(&parsed) {
            if let Err(reason) = p {
                let reason = format!("not an event: {reason}");
                tracing::warn!(message_id = ?d.properties.message_id(), %reason, "archive: to the dead-letter queue");
                let confirm = dead_letters
                    .dead_letter_at(d, &reason, 1, "archive")
                    .await
                    .map_err(broker)?;
                settle(confirm.await, || "a dead letter".to_string()).map_err(broker)?;
            }
        }
        // Every message of the batch is done: one multiple-ack.
        if let Some(last) = batch.last() {
            last.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .map_err(broker)?;
        }
        receipts::settled(receipts_sent).await;
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(bytes: usize) -> Event {
        let body = format!(
            r#"{{"id":"0190a0e0-0000-7000-8000-000000000001","timestamp":"2026-01-01T00:00:00Z","origin":"PARIS","type":"t","entity_key":"1","data":{{"x":"{}"}},"epoch":1,"seq":1}}"#,
            "a".repeat(bytes)
        );
        Event::from_body(body.as_bytes()).unwrap()
    }

    #[test]
    fn a_batch_is_cut_by_rows_and_by_bytes() {
        let small = event(10);
        let batch: Vec<&Event> = vec![&small; 1200];
        assert_eq!(
            chunks(&batch, 500, 1 << 20),
            vec![0..500, 500..1000, 1000..1200]
        );
        let big = event(3 << 20);
        let batch: Vec<&Event> = vec![&small, &big, &big, &small];
        // Two 3 MiB payloads never share a statement; a lone one still goes.
        assert_eq!(chunks(&batch, 500, 4 << 20), vec![0..2, 2..4]);
        assert!(chunks(&[], 500, 1).is_empty());
    }

    #[test]
    fn a_batch_keeps_each_event_once_in_queue_order() {
        let body = |id: &str, seq: u64| {
            format!(
                r#"{{"id":"{id}","timestamp":"2026-01-01T00:00:00Z","origin":"LONDON","type":"t","entity_key":null,"data":{{}},"epoch":1,"seq":{seq}}}"#
            )
        };
        let a = "0190a0e0-0000-7000-8000-000000000001";
        let b = "0190a0e0-0000-7000-8000-000000000002";
        let events: Vec<Event> = [body(a, 1), body(b, 2), body(a, 1)]
            .iter()
            .map(|t| Event::from_body(t.as_bytes()).unwrap())
            .collect();
        let kept = distinct(&events);
        assert_eq!(
            kept.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2],
            "the second copy of {a} is dropped"
        );
    }
}
