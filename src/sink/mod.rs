//! The sink: this site's queue applied to this site's database, exactly
//! once in effect.
//!
//! Messages are consumed from `SITE_<NAME>` (a single-active-consumer
//! quorum queue, so a standby sidecar waits its turn) and applied in
//! batches of `batch_size` messages, `batch_timeout` after the first, or
//! a lull of `batch_idle`, whichever comes first. One database transaction per batch holds the inbox rows, the
//! per-origin progress, the applied changes, the recorded conflicts and the
//! outbox deletions of events that came back round; the messages are acked
//! only after it commits.
//!
//! Each message gets a [`Plan`] before the database is touched: apply it
//! through its route, delete this site's outbox row (an event of ours that
//! came back), skip it, send it to the dead-letter queue (not JSON, no
//! route, no key), or hold it back behind an earlier failing message of the
//! same entity. The [`Target`] (the database side, one file per engine)
//! turns plans into [`Outcome`]s.
//!
//! Failures: an error of the batch as a whole (database down, deadlock,
//! serialization) retries the batch with capped backoff, acking nothing. An
//! error that belongs to one message (a constraint or type violation) fails
//! that message only: it is retried in the next rounds, its entity's later
//! messages held behind it so they never overtake it, and after
//! `max_attempts` it goes to the dead-letter queue with the reason, the
//! attempt count and the site in its headers.

pub mod mapping;
pub mod rules;

use crate::bus::publisher::{HEADER_EPOCH, HEADER_SEQ, Publisher, settle};
use crate::bus::{self, BusError};
use crate::config::{ConnectorConfig, Route, Unrouted};
use crate::event::Event;
use crate::retry::Backoff;
use crate::runner::Shutdown;
use crate::source::ErrorKind;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use mapping::{Entity, MappedRow};
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

/// `(origin, epoch, seq)` of a message, for gap detection: from the event,
/// or, for a message that is not a readable event, from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub origin: String,
    pub epoch: u64,
    pub seq: u64,
}

/// What to do with one message, decided before the database.
#[derive(Debug, Clone)]
pub enum Plan<'a> {
    /// Apply it through `route`.
    Apply(&'a Route, MappedRow),
    /// One of this site's events came back round: delete its outbox row,
    /// and remember its version for the entity (when it has a route).
    Own(Option<MappedRow>),
    /// No route, and the policy says skip.
    Skip,
    /// Record it as seen and send it to the dead-letter queue.
    DeadLetter(String),
    /// Not this round: behind a failing message of the same entity, or
    /// waiting for its own retry. Counted as seen, nothing else.
    Hold,
}

/// One message as the target sees it.
#[derive(Debug, Clone)]
pub struct Item<'a> {
    pub event: Option<&'a Event>,
    pub seen: Option<Seen>,
    pub plan: Plan<'a>,
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Already in the inbox.
    Duplicate,
    /// Ours, back round: the outbox row is gone.
    Own,
    /// Last-writer-wins kept what the site has; the event is recorded in
    /// `sitesync_conflicts`.
    Lost,
    Skipped,
    /// Recorded as seen; goes to the dead-letter queue with this reason.
    DeadLettered(String),
    /// Failed on its own this round (rolled back alone); retried later.
    Failed(String),
    /// Not attempted this round.
    Held,
}

/// The first look at a batch, the same for every target: each item's
/// outcome until the database says otherwise (a duplicate of an earlier
/// item of the batch is known at once), the events recorded in the inbox
/// without a route (own, skipped, dead-lettered, by index) and the items to
/// apply through their routes.
#[derive(Debug)]
pub struct Sorted<'a> {
    pub outcomes: Vec<Outcome>,
    pub others: Vec<(usize, &'a Event, &'static str)>,
    pub to_apply: Vec<usize>,
}

pub fn sort_items<'a>(items: &[Item<'a>]) -> Sorted<'a> {
    let mut sorted = Sorted {
        outcomes: Vec::with_capacity(items.len()),
        others: Vec::new(),
        to_apply: Vec::new(),
    };
    let mut first_seen: HashSet<uuid::Uuid> = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let outcome = match (&item.plan, item.event) {
            (Plan::Hold, _) => Outcome::Held,
            (Plan::DeadLetter(reason), None) => Outcome::DeadLettered(reason.clone()),
            (_, Some(ev)) if !first_seen.insert(ev.id) => Outcome::Duplicate,
            (Plan::DeadLetter(reason), Some(ev)) => {
                sorted.others.push((i, ev, "dead_letter"));
                Outcome::DeadLettered(reason.clone())
            }
            (Plan::Own(_), Some(ev)) => {
                sorted.others.push((i, ev, "own"));
                Outcome::Own
            }
            (Plan::Skip, Some(ev)) => {
                sorted.others.push((i, ev, "skipped"));
                Outcome::Skipped
            }
            (Plan::Apply(..), Some(_)) => {
                sorted.to_apply.push(i);
                Outcome::Applied
            }
            (_, None) => unreachable!("only dead letters lack an event"),
        };
        sorted.outcomes.push(outcome);
    }
    sorted
}

/// A failure of the whole batch: retried.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TargetError {
    pub kind: ErrorKind,
    pub message: String,
}

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
}

/// How long a sink waits with no message before it sweeps the outbox for
/// rows whose events came back, and between two sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A sink that never falls idle still sweeps this often. Under load the
/// batches delete those rows themselves, and a sweep reads the whole
/// outbox (measured: a third of a second per sweep at 5,000 rows in
/// flight), so it waits for a lull.
const SWEEP_BUSY_EVERY: Duration = Duration::from_secs(600);

/// A received message and what happened to it so far.
struct Pending {
    delivery: Delivery,
    event: Result<Event, String>,
    attempts: u32,
    last_error: Option<String>,
    retry_at: Option<Instant>,
    /// Held behind an earlier failing message of its entity.
    held: bool,
}

impl Pending {
    fn new(delivery: Delivery) -> Pending {
        let event = serde_json::from_slice::<Event>(&delivery.data).map_err(|e| e.to_string());
        Pending {
            delivery,
            event,
            attempts: 0,
            last_error: None,
            retry_at: None,
            held: false,
        }
    }

    fn ready(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| t <= now)
    }

    fn seen(&self) -> Option<Seen> {
        if let Ok(e) = &self.event {
            return Some(Seen {
                origin: e.origin.clone(),
                epoch: e.epoch,
                seq: e.seq,
            });
        }
        let props = &self.delivery.properties;
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
}

/// The plans for a round, in queue order. An entity whose message is held
/// or failing holds every later message of that entity too.
fn plan<'a>(pending: &'a [Pending], cfg: &'a ConnectorConfig, now: Instant) -> Vec<Item<'a>> {
    let mut blocked: HashSet<Entity> = HashSet::new();
    let mut items = Vec::with_capacity(pending.len());
    for p in pending {
        let seen = p.seen();
        let event = p.event.as_ref().ok();
        let plan = match &p.event {
            Err(e) => Plan::DeadLetter(format!("not a sitesync event: {e}")),
            Ok(ev) => plan_event(ev, p, cfg, now, &mut blocked),
        };
        items.push(Item { event, seen, plan });
    }
    items
}

fn plan_event<'a>(
    ev: &Event,
    p: &Pending,
    cfg: &'a ConnectorConfig,
    now: Instant,
    blocked: &mut HashSet<Entity>,
) -> Plan<'a> {
    let route = cfg.sink.route(&ev.kind);
    let row = route.map(|r| mapping::data_object(ev).and_then(|data| mapping::map_row(r, &data)));
    if ev.origin == cfg.site {
        return Plan::Own(row.and_then(Result::ok));
    }
    let (route, row) = match (route, row) {
        (None, _) => {
            return match cfg.sink.unrouted {
                Unrouted::Skip => Plan::Skip,
                Unrouted::DeadLetter => Plan::DeadLetter(format!(
                    "no route for event type `{}` at site {} (add a [[sink.routes]] entry, or set sink.unrouted = \"skip\")",
                    ev.kind, cfg.site
                )),
            };
        }
        (Some(_), Some(Err(e))) => return Plan::DeadLetter(e),
        (Some(route), Some(Ok(row))) => (route, row),
        (Some(_), None) => unreachable!("a route gives a mapping"),
    };
    if blocked.contains(&row.entity) {
        return Plan::Hold;
    }
    if p.attempts >= cfg.sink.max_attempts {
        return Plan::DeadLetter(format!(
            "{} (after {} attempts)",
            p.last_error.as_deref().unwrap_or("failed"),
            p.attempts
        ));
    }
    if !p.ready(now) {
        blocked.insert(row.entity);
        return Plan::Hold;
    }
    if p.attempts > 0 {
        // A retry goes first; its entity's later messages wait for it.
        blocked.insert(row.entity.clone());
    }
    Plan::Apply(route, row)
}

/// Consumes this site's queue and applies it until `shutdown`; reconnects
/// after broker failures. Returns an error only for what needs a person.
pub async fn run<T: Target>(
    cfg: &ConnectorConfig,
    target: &T,
    shutdown: Shutdown,
) -> Result<(), String> {
    let mut backoff = Backoff::new(&cfg.retry);
    let mut waiting = shutdown.clone();
    loop {
        match session(cfg, target, shutdown.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.kind == ErrorKind::Operator => return Err(e.message),
            Err(e) => {
                if shutdown.requested() {
                    return Ok(());
                }
                let delay = backoff.next_delay();
                tracing::warn!(error = %e.message, retry_in = ?delay, "sink session ended; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = waiting.wait() => return Ok(()),
                }
            }
        }
    }
}

fn broker(e: impl std::fmt::Display) -> TargetError {
    TargetError {
        kind: ErrorKind::Transient,
        message: format!("broker: {e}"),
    }
}

impl From<BusError> for TargetError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Refused { .. } => TargetError {
                kind: ErrorKind::Operator,
                message: e.to_string(),
            },
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
    let conn = bus::connect(
        &cfg.broker.urls,
        cfg.broker.connect_timeout,
        &format!("sitesync-{}-sink", cfg.name),
    )
    .await?;
    let channel = conn.create_channel().await.map_err(broker)?;
    channel
        .basic_qos(cfg.sink.prefetch, BasicQosOptions::default())
        .await
        .map_err(broker)?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            format!("sitesync-{}", cfg.name).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker(format!("consuming {queue}: {e}")))?;
    let dead_letters = Publisher::new(&conn, &cfg.topology, &cfg.site)
        .await
        .map_err(broker)?;
    tracing::info!(connector = %cfg.name, %queue, prefetch = cfg.sink.prefetch, "sink consuming (single active consumer: a standby waits here)");

    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut backoff = Backoff::new(&cfg.retry);
    let mut swept = Instant::now();
    let mut last_message = Instant::now();
    loop {
        // Wait for something to do: a new message, or a retry coming due;
        // while idle, sweep the outbox now and then.
        let now = Instant::now();
        if !pending.iter().any(|p| p.ready(now)) {
            let next_retry = pending.iter().filter_map(|p| p.retry_at).min();
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                d = consumer.next() => pending.push_back(Pending::new(delivered(d, &queue)?)),
                _ = sleep_until(next_retry) => {}
                _ = sleep_until(Some((last_message.max(swept) + SWEEP_EVERY).min(swept + SWEEP_BUSY_EVERY))) => {
                    swept = Instant::now();
                    match target.sweep_own().await {
                        Ok(0) => {}
                        Ok(n) => tracing::warn!(rows = n, "deleted outbox rows whose events had come back but were missed then"),
                        Err(e) => tracing::debug!(error = %e.message, "sweeping the outbox failed; trying again later"),
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
        // Meanwhile the consumer is not waited on: what arrived is taken
        // at each tick of batch_idle, without a wake-up of this thread per
        // message from lapin's (at thousands of messages a second, those
        // wake-ups cost the sink more CPU than the messages themselves).
        let deadline = tokio::time::Instant::now() + cfg.sink.batch_timeout;
        let now = Instant::now();
        let mut ready = pending.iter().filter(|p| p.ready(now)).count();
        let mut waited = false;
        loop {
            let mut arrived = false;
            while ready < cfg.sink.batch_size {
                let Some(d) = consumer.next().now_or_never() else {
                    break;
                };
                pending.push_back(Pending::new(delivered(d, &queue)?));
                ready += 1;
                arrived = true;
            }
            let now = tokio::time::Instant::now();
            if ready >= cfg.sink.batch_size || now >= deadline || (waited && !arrived) {
                break;
            }
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                _ = tokio::time::sleep_until(deadline.min(now + cfg.sink.batch_idle)) => {}
            }
            waited = true;
        }

        // Every pending message takes part (those waiting are planned as
        // held, and hold their entity's later messages).
        let round = pending.len();
        last_message = Instant::now();
        pending.make_contiguous();
        let (batch, _) = pending.as_slices();
        let batch = &batch[..round];
        let items = plan(batch, cfg, Instant::now());
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
                Err(e) if e.kind == ErrorKind::Operator => return Err(e),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e.message, retry_in = ?delay, messages = items.len(), "applying the batch failed; retrying it, nothing acked");
                    tokio::select! {
                        _ = shutdown.wait() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        drop(items);

        // Dead letters first (confirmed), then acks: nothing is lost between.
        let mut done = vec![false; round];
        for (i, outcome) in outcomes.iter().enumerate() {
            let p = &mut pending[i];
            match outcome {
                Outcome::Failed(reason) => {
                    p.attempts += 1;
                    p.last_error = Some(reason.clone());
                    p.retry_at = Some(Instant::now() + retry_delay(p.attempts));
                    tracing::warn!(message_id = ?p.delivery.properties.message_id(), attempts = p.attempts, %reason, "message failed on its own; retrying it later");
                }
                Outcome::Held => p.held = true,
                Outcome::DeadLettered(reason) => {
                    let attempts = p.attempts.max(1);
                    tracing::warn!(message_id = ?p.delivery.properties.message_id(), %reason, "to the dead-letter queue");
                    let confirm = dead_letters
                        .dead_letter_message(&p.delivery, reason, attempts)
                        .await
                        .map_err(broker)?;
                    settle(confirm.await, || "a dead letter".to_string()).map_err(broker)?;
                    done[i] = true;
                }
                _ => done[i] = true,
            }
        }
        // Ack the done prefix with one multiple-ack, the rest one by one.
        let prefix = done.iter().take_while(|d| **d).count();
        if prefix > 0 {
            pending[prefix - 1]
                .delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .map_err(broker)?;
        }
        for i in prefix..round {
            if done[i] {
                pending[i]
                    .delivery
                    .acker
                    .ack(BasicAckOptions { multiple: false })
                    .await
                    .map_err(broker)?;
            }
        }
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

/// Messages held behind a failing one wait until the next retry comes due
/// (before it, their plan cannot change), so the loop does not spin. After
/// a round that finished messages, they are planned again at once (their
/// blocker may be gone).
fn hold_until_next_retry(pending: &mut VecDeque<Pending>, now: Instant, progressed: bool) {
    if progressed {
        for p in pending.iter_mut().filter(|p| p.attempts == 0 && p.held) {
            p.retry_at = None;
        }
        return;
    }
    let next = pending
        .iter()
        .filter(|p| p.attempts > 0)
        .filter_map(|p| p.retry_at)
        .filter(|t| *t > now)
        .min();
    for p in pending.iter_mut().filter(|p| p.attempts == 0 && p.held) {
        p.retry_at = next;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

fn delivered(d: Option<lapin::Result<Delivery>>, queue: &str) -> Result<Delivery, TargetError> {
    match d {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(broker(format!("consuming {queue}: {e}"))),
        None => Err(broker(format!(
            "the consumer of {queue} was cancelled (queue deleted?)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Operation;
    use std::collections::BTreeMap;

    fn route(kind: &str) -> Route {
        Route {
            kind: kind.into(),
            table: "t".into(),
            key: vec!["id".into()],
            operation: Operation::Upsert,
            rename: BTreeMap::new(),
            drop: vec![],
            constants: BTreeMap::new(),
        }
    }

    #[test]
    fn retry_delays_grow() {
        assert_eq!(retry_delay(1), Duration::from_millis(200));
        assert_eq!(retry_delay(3), Duration::from_millis(800));
        assert!(retry_delay(40) <= Duration::from_secs(103));
        let _ = route("x");
    }
}
