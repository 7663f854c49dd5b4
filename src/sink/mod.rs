//! The sink: this site's queue applied to this site's database, exactly
//! once in effect.
//!
//! Messages are consumed from `SITE_<NAME>` (a single-active-consumer
//! quorum queue, so a standby sidecar waits its turn) and applied in
//! batches of `batch_size` messages, `batch_timeout` after the first, or
//! a lull of `batch_idle`, whichever comes first. One database transaction
//! per batch holds the inbox rows, the per-origin progress, the applied
//! changes, the recorded conflicts and the outbox deletions of events that
//! came back round; the messages are acked only after it commits.
//!
//! - [`plan`]: each message's [`Plan`], decided before the database is
//!   touched (apply, own event back round, skip, dead letter, hold).
//! - [`batch`]: the transaction that turns plans into [`Outcome`]s, written
//!   once; each engine says its steps in SQL (a [`batch::Dialect`] in
//!   `crate::engine`).
//! - [`rules`]: last-writer-wins and gap detection; [`mapping`]: from an
//!   event to a row through its route.
//!
//! Failures: an error of the batch as a whole (database down, deadlock,
//! serialization) retries the batch with capped backoff, acking nothing. An
//! error that belongs to one message (a constraint or type violation) fails
//! that message only: it is retried in the next rounds, its entity's later
//! messages held behind it so they never overtake it, and after
//! `max_attempts` it goes to the dead-letter queue with the reason, the
//! attempt count and the site in its headers.

pub mod batch;
pub mod control;
pub mod gaps;
pub mod mapping;
pub mod plan;
pub mod queue;
pub mod receipts;
pub mod rules;
#[cfg(test)]
pub mod testing;

pub use plan::{Item, Outcome, Plan, Seen, Sorted, sort_items};

use crate::bus::BusError;
use crate::bus::pack;
use crate::bus::publisher::{HEADER_EPOCH, HEADER_SEQ, Publisher, settle};
use crate::config::ConnectorConfig;
use crate::error::{Cause, ErrorKind, TargetError};
use crate::event::Event;
use crate::metrics::ByOriginType;
use crate::retry::Backoff;
use crate::runner::Shutdown;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use plan::Message;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use queue::{Filled, Limits, delivered};
use serde_json::value::RawValue;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A database that events are applied to.
pub trait Target: Send + Sync {
    /// Applies one batch in one transaction; one outcome per item.
    fn apply<'a>(
        &'a self,
        items: &'a [Item<'a>],
    ) -> impl Future<Output = Result<Vec<Outcome>, TargetError>> + Send + 'a;

    /// Deletes this site's outbox rows whose events the inbox records as
    /// back round (a safety net: the batch that saw them come back deletes
    /// them too); returns how many.
    fn sweep_own(&self) -> impl Future<Output = Result<u64, TargetError>> + Send + '_;

    /// Every open gap ([`batch::OpenGap`]), for the gap filler.
    fn open_gaps(
        &self,
    ) -> impl Future<Output = Result<Vec<batch::OpenGap>, TargetError>> + Send + '_;

    /// Marks gaps as asked of the archive, or with its answer.
    fn mark_gaps<'a>(
        &'a self,
        ids: &'a [i64],
        mark: batch::GapMark<'a>,
    ) -> impl Future<Output = Result<(), TargetError>> + Send + 'a;

    /// Records a receipt (at the origin).
    fn record_receipt<'a>(
        &'a self,
        receipt: &'a control::Receipt,
    ) -> impl Future<Output = Result<(), TargetError>> + Send + 'a;

    /// What this database knows of one event (`sitesync trace`).
    fn trace(
        &self,
        id: uuid::Uuid,
    ) -> impl Future<Output = Result<batch::Traced, TargetError>> + Send + '_;

    /// Per site: events with a receipt from some site older than
    /// `older_than_s`, and none from it (`sitesync status`).
    fn unreceipted<'a>(
        &'a self,
        sites: &'a [String],
        older_than_s: u64,
    ) -> impl Future<Output = Result<Vec<(String, u64, f64)>, TargetError>> + Send + 'a;
}

/// How long a sink waits with no message before it sweeps the outbox for
/// rows whose events came back, and between two sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A sink that never falls idle still sweeps this often. Under load the
/// batches delete those rows themselves, and a sweep reads the whole
/// outbox (measured: a third of a second per sweep at 5,000 rows in
/// flight), so it waits for a lull.
const SWEEP_BUSY_EVERY: Duration = Duration::from_secs(600);

/// A received event and what happened to it so far: a message, or one
/// event of a pack ([`crate::bus::pack`]), which shares its delivery with
/// the pack's other events.
struct Pending {
    delivery: Arc<Delivery>,
    /// An event of a pack: its own body (what goes to the dead-letter
    /// queue when it is bad).
    part: Option<Box<RawValue>>,
    message: Message,
}

fn seen(event: &Result<Event, String>) -> Option<Seen> {
    let e = event.as_ref().ok()?;
    Some(Seen {
        origin: e.origin.clone(),
        epoch: e.epoch,
        seq: e.seq,
    })
}

impl Pending {
    fn new(delivery: Delivery) -> Pending {
        let event = Event::from_body(&delivery.data);
        let seen = seen(&event).or_else(|| seen_in_headers(&delivery));
        Pending {
            delivery: Arc::new(delivery),
            part: None,
            message: Message::new(event, seen),
        }
    }

    /// The events of a pack, one each; a pack that cannot be opened is one
    /// bad message.
    fn pack(delivery: Delivery) -> Vec<Pending> {
        let encoding = delivery
            .properties
            .content_encoding()
            .as_ref()
            .map(|e| e.as_str().to_string());
        let parts = match pack::open(&delivery.data, encoding.as_deref()) {
            Ok(parts) if !parts.is_empty() => parts,
            Ok(_) => return vec![Pending::bad(delivery, "an empty pack".into())],
            Err(e) => return vec![Pending::bad(delivery, e)],
        };
        let delivery = Arc::new(delivery);
        parts
            .into_iter()
            .map(|part| {
                let event = Event::from_body(part.get().as_bytes());
                let seen = seen(&event);
                Pending {
                    delivery: delivery.clone(),
                    message: Message::new(event, seen),
                    part: Some(part),
                }
            })
            .collect()
    }

    fn bad(delivery: Delivery, reason: String) -> Pending {
        let seen = seen_in_headers(&delivery);
        Pending {
            delivery: Arc::new(delivery),
            part: None,
            message: Message::new(Err(reason), seen),
        }
    }

    fn ready(&self, now: Instant) -> bool {
        self.message.ready(now)
    }
}

/// A control message received ([`control`]), waiting until every message
/// delivered before it is done.
struct Waiting {
    delivery: Delivery,
    control: Result<control::Control, String>,
}

/// Files a delivery: a control message to wait its turn, an event (or
/// each event of a pack) to be planned. Returns how many events it adds.
fn accept(d: Delivery, pending: &mut VecDeque<Pending>, controls: &mut VecDeque<Waiting>) -> usize {
    if let Some(kind) = control::kind(&d) {
        let control = control::parse(&kind, &d.data);
        controls.push_back(Waiting {
            delivery: d,
            control,
        });
        return 0;
    }
    if pack::count(&d.properties).is_some() {
        let events = Pending::pack(d);
        let n = events.len();
        pending.extend(events);
        return n;
    }
    pending.push_back(Pending::new(d));
    1
}

/// Handles the control messages at the head of `controls` whose earlier
/// messages are all done, each acked alone once handled. Returns false
/// when one failed for now (it stays, to be tried again).
async fn handle_controls<T: Target>(
    target: &T,
    dead_letters: &Publisher,
    controls: &mut VecDeque<Waiting>,
    pending: &VecDeque<Pending>,
) -> Result<bool, TargetError> {
    while let Some(w) = controls.front() {
        let tag = w.delivery.delivery_tag;
        if pending.iter().any(|p| p.delivery.delivery_tag < tag) {
            break;
        }
        match &w.control {
            Err(reason) => {
                tracing::warn!(message_id = ?w.delivery.properties.message_id(), %reason, "to the dead-letter queue");
                let confirm = dead_letters
                    .dead_letter_message(&w.delivery, reason, 1)
                    .await
                    .map_err(broker)?;
                settle(confirm.await, || "a dead letter".to_string()).map_err(broker)?;
            }
            Ok(control) => {
                let handled = match control {
                    control::Control::GapReply(reply) => {
                        gaps::on_reply(target, reply).await.map(|_| ())
                    }
                    control::Control::Receipt(receipt) => target.record_receipt(receipt).await,
                };
                match handled {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::Operator => return Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e.message(), "handling a control message failed; trying again shortly");
                        return Ok(false);
                    }
                }
            }
        }
        w.delivery
            .acker
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .map_err(broker)?;
        controls.pop_front();
    }
    Ok(true)
}

/// Asks the archive for the gaps that are due ([`gaps::due`]); a failure
/// is logged and the next check tries again.
async fn ask_for_gaps<T: Target>(cfg: &ConnectorConfig, target: &T, channel: &lapin::Channel) {
    let open = match target.open_gaps().await {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!(error = %e.message(), "reading the gaps failed; trying again later");
            return;
        }
    };
    let due = gaps::due(&open, &cfg.sink.gap_fill);
    if due.is_empty() {
        return;
    }
    let requests: Vec<control::GapRequest> =
        due.iter().map(|g| gaps::request(&cfg.site, g)).collect();
    let ids: Vec<i64> = due.iter().map(|g| g.id).collect();
    match gaps::send_requests(channel, &cfg.topology, &cfg.site, &requests).await {
        Ok(n) => {
            if let Err(e) = target.mark_gaps(&ids, batch::GapMark::Requested).await {
                tracing::debug!(error = %e.message(), "recording the gap requests failed (they will be sent again)");
            }
            for r in &requests {
                tracing::info!(origin = %r.origin, epoch = r.epoch, from = r.from, to = r.to, "gap fill: asked the archive for the events of this gap");
            }
            tracing::debug!(requests = n, "gap requests confirmed");
        }
        Err(e) => {
            tracing::warn!(error = %e.message(), "gap fill: asking the archive failed; trying again later")
        }
    }
}

/// `(origin, epoch, seq)` of a message that is not a readable event, from
/// its properties.
fn seen_in_headers(delivery: &Delivery) -> Option<Seen> {
    let props = &delivery.properties;
    let origin = props.app_id().as_ref()?.to_string();
    let headers = props.headers().as_ref()?.inner();
    let number = |name: &str| match headers.get(name)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n as u64),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    Some(Seen {
        origin,
        epoch: number(HEADER_EPOCH)?,
        seq: number(HEADER_SEQ)?,
    })
}

/// Consumes this site's queue and applies it until `shutdown`; reconnects
/// after broker failures. Returns an error only for what needs a person.
pub async fn run<T: Target>(
    cfg: &ConnectorConfig,
    target: &T,
    shutdown: Shutdown,
) -> Result<(), TargetError> {
    queue::reconnecting(cfg, "sink", &shutdown, |s| session(cfg, target, s)).await
}

pub(crate) fn broker(e: impl std::fmt::Display) -> TargetError {
    TargetError::transient(Cause::Unreachable, format!("broker: {e}"))
}

impl From<BusError> for TargetError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Refused { .. } => TargetError::operator(Cause::AuthRefused, e.to_string()),
            other => broker(other),
        }
    }
}

/// Delay before a failed message is tried again.
fn retry_delay(attempts: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempts.min(10)))
}

async fn session<T: Target>(
    cfg: &ConnectorConfig,
    target: &T,
    mut shutdown: Shutdown,
) -> Result<(), TargetError> {
    let queue = cfg.topology.site_queue(&cfg.site);
    let queue::Consuming {
        conn,
        channel,
        mut consumer,
        ..
    } = queue::consume(
        cfg,
        &queue,
        cfg.sink.prefetch,
        "sink",
        &format!("sitesync-{}", cfg.name),
    )
    .await?;
    let dead_letters = Publisher::new(&conn, &cfg.topology, &cfg.site)
        .await
        .map_err(broker)?;
    // Gap requests go out on a confirm channel of their own.
    let gap_channel = if cfg.sink.gap_fill.enabled && cfg.topology.archive_site.is_some() {
        Some(control::confirm_channel(&conn).await.map_err(broker)?)
    } else {
        None
    };
    // Receipts too, when this site sends them.
    let receipt_channel = if cfg.sink.receipts {
        Some(control::confirm_channel(&conn).await.map_err(broker)?)
    } else {
        None
    };
    tracing::info!(connector = %cfg.name, %queue, prefetch = cfg.sink.prefetch, gap_fill = gap_channel.is_some(), receipts = cfg.sink.receipts, "sink consuming (single active consumer: a standby waits here)");

    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut controls: VecDeque<Waiting> = VecDeque::new();
    let mut control_retry: Option<Instant> = None;
    let mut next_gap_check = Instant::now() + gaps::CHECK_EVERY;
    let mut backoff = Backoff::new(&cfg.retry);
    let mut observed = Observed::new();
    // Queue depths and open gaps are read every OBSERVE_EVERY, on a
    // channel of their own (a failed passive declare closes its channel).
    let mut observe_channel: Option<lapin::Channel> = None;
    let mut next_observe = Instant::now();
    let mut swept = Instant::now();
    let mut last_message = Instant::now();
    let mut pack_limit: Option<u16> = None;
    loop {
        if Instant::now() >= next_observe {
            observe(cfg, target, &conn, &mut observe_channel).await;
            next_observe = Instant::now() + OBSERVE_EVERY;
        }
        if !controls.is_empty() && control_retry.is_none_or(|t| t <= Instant::now()) {
            control_retry =
                match handle_controls(target, &dead_letters, &mut controls, &pending).await? {
                    true => None,
                    false => Some(Instant::now() + backoff.next_delay()),
                };
        }
        if let Some(ch) = &gap_channel
            && Instant::now() >= next_gap_check
        {
            ask_for_gaps(cfg, target, ch).await;
            next_gap_check = Instant::now() + gaps::CHECK_EVERY;
        }
        // Wait for something to do: a new message, or a retry coming due;
        // while idle, sweep the outbox now and then.
        let now = Instant::now();
        if !pending.iter().any(|p| p.ready(now)) {
            let next_retry = pending.iter().filter_map(|p| p.message.retry_at).min();
            let gap_check = gap_channel.as_ref().map(|_| next_gap_check);
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                d = consumer.next() => {
                    let _ = accept(delivered(d, &queue)?, &mut pending, &mut controls);
                    if pending.is_empty() {
                        continue;
                    }
                }
                _ = sleep_until(next_retry) => {}
                _ = sleep_until(control_retry.filter(|_| !controls.is_empty())) => continue,
                _ = sleep_until(gap_check) => continue,
                _ = sleep_until(Some(next_observe)) => continue,
                _ = sleep_until(Some((last_message.max(swept) + SWEEP_EVERY).min(swept + SWEEP_BUSY_EVERY))) => {
                    swept = Instant::now();
                    match target.sweep_own().await {
                        Ok(0) => {}
                        Ok(n) => tracing::warn!(rows = n, "deleted outbox rows whose events had come back but were missed then"),
                        Err(e) => tracing::debug!(error = %e.message(), "sweeping the outbox failed; trying again later"),
                    }
                    continue;
                }
            }
        }
        // Fill the batch for at most batch_timeout. Messages waiting for a
        // retry (or held behind one) do not count: new messages keep
        // flowing past them, up to the prefetch.
        // A lull of batch_idle closes it early: a light load is applied
        // at once, a stream fills batches.
        let now = Instant::now();
        let ready = pending.iter().filter(|p| p.ready(now)).count();
        let limits = Limits {
            size: cfg.sink.batch_size,
            timeout: cfg.sink.batch_timeout,
            idle: cfg.sink.batch_idle,
        };
        let filled = queue::fill(&mut consumer, &queue, limits, ready, &mut shutdown, |d| {
            accept(d, &mut pending, &mut controls)
        })
        .await?;
        if filled == Filled::Stop {
            return Ok(());
        }
        bound_packs(&channel, &pending, cfg.sink.prefetch, &mut pack_limit).await?;

        // Every pending message takes part (those waiting are planned as
        // held, and hold their entity's later messages).
        let round = pending.len();
        last_message = Instant::now();
        pending.make_contiguous();
        let (batch, _) = pending.as_slices();
        let batch = &batch[..round];
        let items = plan::plan(
            batch.iter().map(|p| &p.message),
            &cfg.site,
            &cfg.sink,
            Instant::now(),
        );
        if items.iter().all(|i| matches!(i.plan, Plan::Hold)) {
            // Nothing can move until a retry comes due.
            hold_until_next_retry(&mut pending, Instant::now(), false);
            continue;
        }
        let applying = Instant::now();
        let outcomes = loop {
            match target.apply(&items).await {
                Ok(outcomes) => {
                    tracing::trace!(messages = items.len(), took = ?applying.elapsed(), "batch applied");
                    backoff.reset();
                    break outcomes;
                }
                Err(e) if e.kind() == ErrorKind::Operator => return Err(e),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e.message(), retry_in = ?delay, messages = items.len(), "applying the batch failed; retrying it, nothing acked");
                    tokio::select! {
                        _ = shutdown.wait() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        drop(items);
        observed.batch(round, applying.elapsed());
        for (p, o) in pending.iter().zip(&outcomes) {
            observed.outcome(p.message.event.as_ref().ok(), o);
        }

        // Dead letters first (confirmed), then acks: nothing is lost between.
        let mut done = vec![false; round];
        for (i, outcome) in outcomes.iter().enumerate() {
            let p = &mut pending[i];
            match outcome {
                Outcome::Failed(reason) => {
                    let m = &mut p.message;
                    m.attempts += 1;
                    m.last_error = Some(reason.clone());
                    m.retry_at = Some(Instant::now() + retry_delay(m.attempts));
                    tracing::warn!(message_id = ?p.delivery.properties.message_id(), attempts = m.attempts, %reason, "message failed on its own; retrying it later");
                }
                Outcome::Held => p.message.held = true,
                Outcome::DeadLettered(reason) => {
                    let attempts = p.message.attempts.max(1);
                    let confirm = match &p.part {
                        None => {
                            tracing::warn!(message_id = ?p.delivery.properties.message_id(), %reason, "to the dead-letter queue");
                            dead_letters
                                .dead_letter_message(&p.delivery, reason, attempts)
                                .await
                        }
                        Some(part) => {
                            let event = p.message.event.as_ref().ok();
                            tracing::warn!(pack = ?p.delivery.properties.message_id(), event = ?event.map(|e| e.id), %reason, "an event of a pack to the dead-letter queue, on its own");
                            dead_letters
                                .dead_letter_part(&p.delivery, part.get().as_bytes(), event, reason, attempts)
                                .await
                        }
                    }
                    .map_err(broker)?;
                    settle(confirm.await, || "a dead letter".to_string()).map_err(broker)?;
                    done[i] = true;
                }
                _ => done[i] = true,
            }
        }
        // A delivery is done when every event of it still pending is (the
        // events of a pack are next to each other, in the round).
        let deliveries = by_delivery(pending.iter().take(round).map(|p| &p.delivery), &done);
        // Receipts: one per origin of the batch, after the commit.
        let receipts_sent = match &receipt_channel {
            Some(ch) => {
                let lines = pending
                    .iter()
                    .take(round)
                    .zip(&outcomes)
                    .filter_map(|(p, o)| {
                        let e = p.message.event.as_ref().ok()?;
                        let (outcome, reason) = receipts::outcome(o)?;
                        Some((e, outcome, reason))
                    });
                let built =
                    receipts::build(&cfg.site, true, &cfg.topology, chrono::Utc::now(), lines);
                receipts::publish(ch, &cfg.topology, &cfg.site, built).await
            }
            None => Vec::new(),
        };
        // Not past a control message still waiting (it is acked alone).
        let first_control = controls.front().map(|w| w.delivery.delivery_tag);
        let before_control = deliveries
            .iter()
            .take_while(|(d, _)| first_control.is_none_or(|t| d.delivery_tag < t))
            .count();
        let ackers: Vec<&lapin::Acker> = deliveries.iter().map(|(d, _)| &d.acker).collect();
        let acked: Vec<bool> = deliveries.iter().map(|(_, done)| *done).collect();
        queue::ack_done_before(&ackers, &acked, before_control).await?;
        receipts::settled(receipts_sent).await;
        let mut i = 0;
        pending.retain(|_| {
            let keep = i >= round || !done[i];
            i += 1;
            keep
        });
        let progressed = done.iter().any(|d| *d);
        hold_until_next_retry(&mut pending, Instant::now(), progressed);
    }
}

/// Keeps the events a sink holds near `prefetch` when packs arrive: the
/// prefetch counts messages, and a pack of N events is N. While the newest
/// message is a pack, the channel's limit (RabbitMQ's `global` prefetch,
/// which also holds for a consumer already started) is `prefetch / N`, at
/// least 2; once single events come again it is lifted.
/// How often the sink reads its queue's depth, the dead-letter queue's and
/// the open gaps for the metrics (a passive declare each, one query).
const OBSERVE_EVERY: Duration = Duration::from_secs(15);

/// Sets the gauges of this site's queue, the dead-letter queue and the
/// open gaps; a failure leaves them as they were (logged at debug).
async fn observe<T: Target>(
    cfg: &ConnectorConfig,
    target: &T,
    conn: &crate::bus::Link,
    channel: &mut Option<lapin::Channel>,
) {
    let m = crate::metrics::get();
    if channel.as_ref().is_none_or(|c| !c.status().connected()) {
        *channel = conn.create_channel().await.ok();
    }
    if let Some(ch) = channel.as_ref() {
        let site = cfg.topology.site_queue(&cfg.site);
        for (queue, messages, consumers) in [
            (site.as_str(), &m.queue_messages, Some(&m.queue_consumers)),
            (
                cfg.topology.dead_letter_queue.as_str(),
                &m.dlq_messages,
                None,
            ),
        ] {
            let options = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match ch
                .queue_declare(queue.into(), options, Default::default())
                .await
            {
                Ok(q) => {
                    messages.set(i64::from(q.message_count()));
                    if let Some(c) = consumers {
                        c.set(i64::from(q.consumer_count()));
                    }
                }
                Err(e) => {
                    tracing::debug!(%queue, error = %e, "metrics: the queue's depth is unknown");
                    break;
                }
            }
        }
    }
    match target.open_gaps().await {
        Ok(gaps) => {
            _ = m
                .gaps_open
                .set(i64::try_from(gaps.len()).unwrap_or(i64::MAX))
        }
        Err(e) => tracing::debug!(error = %e.message(), "metrics: the open gaps are unknown"),
    }
}

/// The sink's metrics, each `(origin, type)` series resolved once.
struct Observed {
    applied: ByOriginType<Counter>,
    duplicate: ByOriginType<Counter>,
    lost: ByOriginType<Counter>,
    dead: ByOriginType<Counter>,
    /// The end-to-end histogram of each origin.
    e2e: Vec<(String, Histogram)>,
}

impl Observed {
    fn new() -> Self {
        let m = crate::metrics::get();
        Observed {
            applied: ByOriginType::new(&m.applied),
            duplicate: ByOriginType::new(&m.duplicate),
            lost: ByOriginType::new(&m.lost),
            dead: ByOriginType::new(&m.sink_dead_letters),
            e2e: Vec::new(),
        }
    }

    fn batch(&self, messages: usize, took: Duration) {
        let m = crate::metrics::get();
        m.batch_size.observe(messages as f64);
        m.apply_time.observe(took.as_secs_f64());
    }

    /// Counts one message's outcome; an applied event's latency is now
    /// minus its timestamp (the origin's commit, on the origin's clock).
    fn outcome(&mut self, event: Option<&Event>, outcome: &Outcome) {
        let (origin, kind) = event.map_or(("", ""), |e| (e.origin.as_str(), e.kind.as_str()));
        let origin = metric_origin(origin);
        match outcome {
            Outcome::Applied => {
                self.applied.get(origin, kind).inc();
                // A resync's rows carry their stored version's time, not
                // when they were sent: not a latency.
                if let Some(e) = event.filter(|e| !e.origin.starts_with("resync:")) {
                    let late = (chrono::Utc::now() - e.timestamp).num_microseconds();
                    let seconds = late.unwrap_or(0).max(0) as f64 / 1e6;
                    self.e2e_of(origin).observe(seconds);
                }
            }
            Outcome::Duplicate => _ = self.duplicate.get(origin, kind).inc(),
            Outcome::Lost => _ = self.lost.get(origin, kind).inc(),
            Outcome::DeadLettered(_) => _ = self.dead.get(origin, kind).inc(),
            _ => {}
        }
    }

    fn e2e_of(&mut self, origin: &str) -> &Histogram {
        let at = match self.e2e.iter().position(|(o, _)| o == origin) {
            Some(at) => at,
            None => {
                let h = crate::metrics::get().e2e_latency.get_or_create_owned(
                    &crate::metrics::OriginLabel {
                        origin: origin.to_string(),
                    },
                );
                self.e2e.push((origin.to_string(), h));
                self.e2e.len() - 1
            }
        };
        &self.e2e[at].1
    }
}

/// The origin as the metrics label it: a resync job's or a conflict
/// choice's own origin (`resync:PARIS:7`, `choice:LONDON:12`) without its
/// number, so that each job or choice does not make a new series.
fn metric_origin(origin: &str) -> &str {
    match origin.rsplit_once(':') {
        Some((head, n))
            if (head.starts_with("resync:") || head.starts_with("choice:"))
                && n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            head
        }
        _ => origin,
    }
}

async fn bound_packs(
    channel: &lapin::Channel,
    pending: &VecDeque<Pending>,
    prefetch: u16,
    limit: &mut Option<u16>,
) -> Result<(), TargetError> {
    let Some(newest) = pending.back() else {
        return Ok(());
    };
    let want = match newest.part {
        Some(_) => {
            let n = pack::count(&newest.delivery.properties).unwrap_or(1).max(1);
            Some((u64::from(prefetch) / n).clamp(2, u64::from(prefetch)) as u16)
        }
        None => None,
    };
    if want == *limit {
        return Ok(());
    }
    // 0 lifts the channel's limit; the consumer's own stays.
    channel
        .basic_qos(
            want.unwrap_or(0),
            lapin::options::BasicQosOptions { global: true },
        )
        .await
        .map_err(broker)?;
    tracing::debug!(limit = ?want, "packs: the channel's prefetch follows their size");
    *limit = want;
    Ok(())
}

/// The deliveries of a round in order, each once, with whether it is done:
/// every one of its events in the round is.
fn by_delivery<'a>(
    events: impl Iterator<Item = &'a Arc<Delivery>>,
    done: &[bool],
) -> Vec<(&'a Delivery, bool)> {
    let mut out: Vec<(&Delivery, bool)> = Vec::new();
    for (d, done) in events.zip(done) {
        match out.last_mut() {
            Some((last, all)) if last.delivery_tag == d.delivery_tag => *all &= *done,
            _ => out.push((d, *done)),
        }
    }
    out
}

/// Messages held behind a failing one wait until the next retry comes due
/// (before it, their plan cannot change), so the loop does not spin. After
/// a round that finished messages, they are planned again at once (their
/// blocker may be gone).
fn hold_until_next_retry(pending: &mut VecDeque<Pending>, now: Instant, progressed: bool) {
    if progressed {
        for m in messages(pending).filter(|m| m.attempts == 0 && m.held) {
            m.retry_at = None;
        }
        return;
    }
    let next = pending
        .iter()
        .filter(|p| p.message.attempts > 0)
        .filter_map(|p| p.message.retry_at)
        .filter(|t| *t > now)
        .min();
    for m in messages(pending).filter(|m| m.attempts == 0 && m.held) {
        m.retry_at = next;
    }
}

fn messages(pending: &mut VecDeque<Pending>) -> impl Iterator<Item = &mut Message> {
    pending.iter_mut().map(|p| &mut p.message)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_s_or_a_choice_s_origin_is_one_metrics_series_per_site() {
        assert_eq!(metric_origin("resync:PARIS:17"), "resync:PARIS");
        assert_eq!(metric_origin("choice:LONDON:3"), "choice:LONDON");
        assert_eq!(metric_origin("PARIS"), "PARIS");
        assert_eq!(metric_origin("resync:PARIS:x"), "resync:PARIS:x");
        assert_eq!(metric_origin("MY:SITE:2"), "MY:SITE:2");
    }

    fn event(seq: u64) -> Vec<u8> {
        format!(
            r#"{{"id":"00000000-0000-0000-0000-{seq:012}","timestamp":"2026-12-03T10:00:00Z","origin":"resync:PARIS:1","type":"item.upsert","entity_key":"{seq}","data":{{"id":{seq}}},"epoch":1,"seq":{seq}}}"#
        )
        .into_bytes()
    }

    fn delivery(tag: u64, data: Vec<u8>, pack: Option<(i64, Option<&str>)>) -> Delivery {
        let mut d = Delivery::mock(tag, "".into(), "q".into(), false, data);
        if let Some((n, encoding)) = pack {
            let mut h = lapin::types::FieldTable::default();
            h.insert(pack::HEADER_PACK.into(), AMQPValue::LongLongInt(n));
            d.properties = d.properties.with_headers(h);
            if let Some(e) = encoding {
                d.properties = d.properties.with_content_encoding(e.into());
            }
        }
        d
    }

    #[test]
    fn a_pack_becomes_one_pending_event_per_row_sharing_its_delivery() {
        let (mut pending, mut controls) = (VecDeque::new(), VecDeque::new());
        assert_eq!(
            accept(delivery(1, event(1), None), &mut pending, &mut controls),
            1
        );
        let bodies = [event(2), b"{\"not\": \"an event\"}".to_vec(), event(4)];
        let body = pack::body(bodies.iter().map(Vec::as_slice), true);
        let d = delivery(2, body, Some((3, Some(pack::ZSTD))));
        assert_eq!(accept(d, &mut pending, &mut controls), 3);
        // A pack that cannot be opened is one bad message.
        let d = delivery(3, b"garbage".to_vec(), Some((5, Some(pack::ZSTD))));
        assert_eq!(accept(d, &mut pending, &mut controls), 1);
        assert_eq!(pending.len(), 5);
        let seqs: Vec<Option<u64>> = pending
            .iter()
            .map(|p| p.message.event.as_ref().ok().map(|e| e.seq))
            .collect();
        assert_eq!(seqs, vec![Some(1), Some(2), None, Some(4), None]);
        // The bad row keeps its own body, for the dead-letter queue.
        assert_eq!(
            pending[2].part.as_ref().unwrap().get(),
            r#"{"not": "an event"}"#
        );
        assert!(pending[0].part.is_none() && pending[4].part.is_none());
        assert!(
            pending[4]
                .message
                .event
                .as_ref()
                .unwrap_err()
                .contains("zstd pack that cannot be opened")
        );
        assert!(Arc::ptr_eq(&pending[1].delivery, &pending[3].delivery));
    }

    #[test]
    fn a_delivery_is_done_when_every_event_of_it_is() {
        let a = Arc::new(delivery(1, vec![], None));
        let pack = Arc::new(delivery(2, vec![], Some((3, None))));
        let c = Arc::new(delivery(3, vec![], None));
        let events = [&a, &pack, &pack, &pack, &c];
        let tags = |done: &[bool]| -> Vec<(u64, bool)> {
            by_delivery(events.iter().copied(), done)
                .iter()
                .map(|(d, done)| (d.delivery_tag, *done))
                .collect()
        };
        assert_eq!(
            tags(&[true, true, false, true, true]),
            vec![(1, true), (2, false), (3, true)]
        );
        assert_eq!(
            tags(&[true, true, true, true, false]),
            vec![(1, true), (2, true), (3, false)]
        );
    }

    #[test]
    fn retry_delays_grow() {
        assert_eq!(retry_delay(1), Duration::from_millis(200));
        assert_eq!(retry_delay(3), Duration::from_millis(800));
        assert!(retry_delay(40) <= Duration::from_secs(103));
    }
}
