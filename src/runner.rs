//! `sitesync run`: change log → broker → checkpoint, until told to stop.
//!
//! A *session* reads the source from the checkpoint, publishes each change
//! with a window of unconfirmed messages in flight, and hands the highest
//! *contiguous* confirmed position to the checkpointer. Confirms are consumed
//! in publish order (a [`FuturesOrdered`]), so a confirm that arrives early
//! never moves the checkpoint past an older message still unconfirmed.
//!
//! The checkpointer, a task of its own, verifies that every queue of the
//! topology still exists, then writes and fsyncs the checkpoint, then lets
//! the source tell the database (the slot's flush LSN). Verification comes
//! first so that an event routed while a site queue was missing is never
//! checkpointed: it is republished once the queue is back. A checkpoint
//! that numbers no new event (the position alone moved) skips it.
//!
//! Any publish failure (nack, returned message, lost channel), a source
//! error or a missing queue ends the session; the runner then starts a new
//! one from the checkpoint after a capped, jittered backoff, so whatever was
//! not confirmed is published again (with the same `seq`). Errors that need
//! a person (slot missing, checkpoint corrupt) end the run instead.
//!
//! SIGTERM/SIGINT: stop reading, wait (bounded) for outstanding confirms,
//! checkpoint, report the flush position to the database, exit 0.

use crate::bus::publisher::{PublishFailure, Publisher, settle};
use crate::bus::topology::{TopologyError, Verifier};
use crate::bus::{self, BusError, Link};
use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointStore, describe, reset_hint};
use crate::config::ConnectorConfig;
use crate::error::{ErrorKind, SourceError};
use crate::event::{Clock, RowError};
use crate::metrics::ByType;
use crate::position::LogPosition;
use crate::retry::Backoff;
use crate::source::{Change, ChangeStream, Source};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use prometheus_client::metrics::counter::Counter;
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Why a run ended with an error (all need a person).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A session failure that retrying cannot fix (slot missing, broker
    /// refusing us, a topology object with other arguments…).
    #[error("{0}")]
    NeedsOperator(String),
}

/// A stop request shared by the runner and its tasks.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A shutdown that fires when the returned sender sends `true` (or is
    /// dropped: keep it alive).
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }

    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// How a session failed.
#[derive(Debug)]
struct SessionError {
    kind: ErrorKind,
    message: String,
}

impl SessionError {
    fn transient(message: impl Into<String>) -> Self {
        SessionError {
            kind: ErrorKind::Transient,
            message: message.into(),
        }
    }
}

impl From<SourceError> for SessionError {
    fn from(e: SourceError) -> Self {
        SessionError {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

impl From<BusError> for SessionError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Refused { .. } => SessionError {
                kind: ErrorKind::Operator,
                message: format!("broker: {e}"),
            },
            other => SessionError::transient(format!("broker: {other}")),
        }
    }
}

impl From<TopologyError> for SessionError {
    fn from(e: TopologyError) -> Self {
        match e {
            TopologyError::Inequivalent { .. } => SessionError {
                kind: ErrorKind::Operator,
                message: e.to_string(),
            },
            other => SessionError::transient(other.to_string()),
        }
    }
}

impl From<CheckpointError> for SessionError {
    fn from(e: CheckpointError) -> Self {
        SessionError {
            kind: ErrorKind::Operator,
            message: e.to_string(),
        }
    }
}

impl From<PublishFailure> for SessionError {
    fn from(e: PublishFailure) -> Self {
        SessionError::transient(format!(
            "publish failed, republishing from the checkpoint: {e}"
        ))
    }
}

/// A published (or position-only) item waiting for its confirm.
struct Settled<P> {
    result: Result<(), PublishFailure>,
    /// Resume point once this item is done.
    resume: P,
    /// The origin's clock once this item is done.
    clock: Clock,
}

type Pending<P> = Pin<Box<dyn Future<Output = Settled<P>> + Send>>;

/// How the checkpointer task ended: the last checkpoint it wrote, or why
/// it stopped.
type CheckpointerEnd<P> = Result<Result<Checkpoint<P>, SessionError>, tokio::task::JoinError>;

/// Runs the connector until `shutdown` fires or an error needs a person.
pub async fn run<S: Source>(
    cfg: &ConnectorConfig,
    source: S,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    crate::metrics::expect("source");
    let mut standby = shutdown.clone();
    let Some(store) = open_store(cfg, &mut standby).await? else {
        return Ok(());
    };
    let store = Arc::new(store);
    if store.load::<S::Position>()?.is_none() {
        let first = Checkpoint::<S::Position>::new_epoch(None, None);
        store.reset(&first).await?;
        tracing::info!(store = %store.dir().display(), epoch = first.epoch, "new checkpoint store");
    }
    let mut backoff = Backoff::new(&cfg.retry);
    let mut shutdown_wait = shutdown.clone();
    // Sessions started: each after the first opens the broker connection again.
    let mut sessions = 0u64;
    loop {
        let before = store.load::<S::Position>()?;
        if sessions > 0 {
            crate::metrics::connection("publisher").1.inc();
        }
        sessions += 1;
        let outcome = session(cfg, &source, &store, shutdown.clone()).await;
        crate::metrics::connection("publisher").0.set(0);
        match outcome {
            Ok(()) => {
                tracing::info!("stopped cleanly");
                return Ok(());
            }
            Err(e) if e.kind == ErrorKind::Operator => {
                crate::metrics::not_ready("source", e.message.clone());
                tracing::error!(error = %e.message, "stopping: this needs a person");
                return Err(RunError::NeedsOperator(e.message));
            }
            Err(e) => {
                if store.load::<S::Position>()? != before {
                    backoff.reset();
                }
                if shutdown.requested() {
                    return Ok(());
                }
                let delay = backoff.next_delay();
                crate::metrics::not_ready("source", e.message.clone());
                tracing::warn!(error = %e.message, retry_in = ?delay, attempt = backoff.attempt(), "session ended; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown_wait.wait() => {
                        tracing::info!("stopped while waiting to retry");
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Opens the checkpoint store. While another sidecar holds it, this one is
/// the standby: it waits, and takes over as soon as the lock is free (the
/// OS releases it when the holder dies). `None` if told to stop meanwhile.
async fn open_store(
    cfg: &ConnectorConfig,
    shutdown: &mut Shutdown,
) -> Result<Option<CheckpointStore>, CheckpointError> {
    let mut announced = false;
    loop {
        match CheckpointStore::open(&cfg.checkpoint.dir, reset_hint(&cfg.file)) {
            Err(CheckpointError::InUse { pid, .. }) => {
                if !announced {
                    crate::metrics::not_ready(
                        "source",
                        format!("standby: process {pid} holds the checkpoint store"),
                    );
                    tracing::info!(connector = %cfg.name, active = %pid, store = %cfg.checkpoint.dir.display(), "standby: another sitesync holds the checkpoint store; taking over when it stops");
                    announced = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(STANDBY_POLL) => {}
                    _ = shutdown.wait() => return Ok(None),
                }
            }
            Ok(store) => {
                if announced {
                    tracing::info!(connector = %cfg.name, "taking over: the checkpoint store is ours");
                }
                return Ok(Some(store));
            }
            Err(e) => return Err(e),
        }
    }
}

/// How often a standby tries the checkpoint store's lock.
const STANDBY_POLL: Duration = Duration::from_millis(250);

async fn session<S: Source>(
    cfg: &ConnectorConfig,
    source: &S,
    store: &Arc<CheckpointStore>,
    mut shutdown: Shutdown,
) -> Result<(), SessionError> {
    let base = store
        .load::<S::Position>()?
        .expect("written before the first session");
    let conn = bus::connect(
        &cfg.broker.urls,
        cfg.broker.connect_timeout,
        &format!("sitesync-{}", cfg.name),
    )
    .await?;
    crate::metrics::connection("publisher").0.set(1);
    // Verification gets a connection of its own (see `Verifier`).
    let verify_conn = bus::connect(
        &cfg.broker.urls,
        cfg.broker.connect_timeout,
        &format!("sitesync-{}-verify", cfg.name),
    )
    .await?;
    let mut verifier = Verifier::new(
        &cfg.topology,
        crate::bus::management::Management::of(&cfg.broker),
    );
    if !verifier.checks_bindings() {
        tracing::debug!("broker.management_url is not set: queues are verified, bindings are not");
    }
    verifier.verify(&verify_conn).await?;
    let publisher = Publisher::new(&conn, &cfg.topology, &cfg.site)
        .await
        .map_err(BusError::amqp("opening the publisher channel"))?;
    let mut stream = source.open(base.resume.as_ref()).await?;
    stream.numbering(base.epoch, base.clock().next_seq);
    tracing::info!(
        connector = %cfg.name,
        resume = %describe(&base),
        window = cfg.broker.publisher_window,
        "streaming"
    );
    crate::metrics::ready("source");

    let (confirmed_tx, confirmed_rx) = watch::channel::<Option<(S::Position, Clock)>>(None);
    let (durable_tx, mut durable_rx) = watch::channel::<Option<S::Position>>(None);
    let mut checkpointer = tokio::spawn(checkpointer(
        store.clone(),
        base.clone(),
        verify_conn,
        verifier,
        cfg.broker.topology_check_interval,
        cfg.checkpoint.interval,
        confirmed_rx,
        durable_tx,
    ));

    let numbering = Numbering {
        site: &cfg.site,
        epoch: base.epoch,
        max_bytes: cfg.broker.max_message_bytes,
    };
    let mut liveness =
        tokio::time::interval_at(tokio::time::Instant::now() + LIVENESS_EVERY, LIVENESS_EVERY);
    let mut last_change = Instant::now();
    let blocked_log = tokio::spawn(log_flow_control(conn.events_listener(), cfg.name.clone()));
    let mut inflight: FuturesOrdered<Pending<S::Position>> = FuturesOrdered::new();
    let mut clock = base.clock();
    // Numbers taken before a restart by events whose rows the log forgot.
    let mut taken = BTreeSet::new();
    let window = cfg.broker.publisher_window;
    let mut counters = Counters::default();
    let mut report =
        tokio::time::interval_at(tokio::time::Instant::now() + REPORT_EVERY, REPORT_EVERY);
    let mut checkpointer_done: Option<CheckpointerEnd<S::Position>> = None;

    // `drain`: whether the confirms already in flight are worth waiting for
    // (they are after a source error or a shutdown, not after a broker failure).
    // `end`: Ok means a shutdown was requested.
    let (end, drain): (Result<(), SessionError>, bool) = loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break (Ok(()), true),
            done = &mut checkpointer => {
                checkpointer_done = Some(done);
                break (Err(SessionError::transient("the checkpointer stopped")), false);
            }
            _ = report.tick() => counters.report(&cfg.name, clock.next_seq),
            Some(settled) = inflight.next(), if !inflight.is_empty() => {
                match settled.result {
                    Ok(()) => { confirmed_tx.send_replace(Some((settled.resume, settled.clock))); }
                    Err(failure) => {
                        if matches!(failure, PublishFailure::Returned { .. }) {
                            // lapin hands a returned message to whichever
                            // confirm of a multiple-ack resolves first, so the
                            // confirms settled just before may include the
                            // message that was really returned: do not let the
                            // checkpointer commit them.
                            confirmed_tx.send_replace(None);
                        }
                        break (Err(failure.into()), false);
                    }
                }
            }
            Ok(()) = durable_rx.changed() => {
                if let Some(p) = durable_rx.borrow_and_update().clone() {
                    stream.durable(&p);
                }
            }
            _ = liveness.tick() => {
                if last_change.elapsed() >= LIVENESS_EVERY {
                    match tokio::time::timeout(PROBE_TIMEOUT, source.probe()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break (Err(e.into()), true),
                        Err(_) => break (Err(SessionError::transient(format!(
                            "the database did not answer a liveness probe within {PROBE_TIMEOUT:?}"
                        ))), true),
                    }
                }
            }
            change = stream.next(), if inflight.len() < window => {
                let change = match change {
                    Ok(c) => c,
                    Err(e) => break (Err(e.into()), true),
                };
                last_change = Instant::now();
                taken.extend(stream.taken());
                // A publish waits while the broker blocks the connection
                // (a memory or disk alarm): stay responsive to SIGTERM.
                let published = tokio::select! {
                    published = dispatch(change, &publisher, &numbering, &mut clock, &mut taken, &mut counters) => published,
                    _ = shutdown.wait() => break (Ok(()), true),
                };
                match published {
                    Ok(pending) => inflight.push_back(pending),
                    Err(e) => break (Err(e), false),
                }
            }
        }
    };

    if drain && checkpointer_done.is_none() {
        let deadline = tokio::time::sleep(cfg.shutdown.drain_timeout);
        tokio::pin!(deadline);
        let waiting = inflight.len();
        loop {
            tokio::select! {
                settled = inflight.next() => match settled {
                    None => break,
                    Some(Settled { result: Ok(()), resume, clock }) => {
                        confirmed_tx.send_replace(Some((resume, clock)));
                    }
                    Some(Settled { result: Err(e), .. }) => {
                        tracing::warn!(error = %e, "while draining; the rest is republished on the next start");
                        break;
                    }
                },
                _ = &mut deadline => {
                    tracing::warn!(unconfirmed = inflight.len(), of = waiting, "drain timeout: the unconfirmed rest is republished on the next start");
                    break;
                }
            }
        }
    }
    drop(inflight);
    // Closing the channel asks the checkpointer for its last cycle.
    drop(confirmed_tx);
    let final_ck = match checkpointer_done {
        Some(done) => done,
        None => checkpointer.await,
    };
    let end = match final_ck {
        Ok(Ok(ck)) => {
            if let Some(p) = &ck.resume {
                stream.durable(p);
            }
            tracing::debug!(checkpoint = %describe(&ck), "session checkpoint");
            end
        }
        // The checkpointer's own failure (a missing queue, a store that
        // refuses) explains the session's end best.
        Ok(Err(e)) => Err(e),
        Err(join) => Err(SessionError::transient(format!(
            "the checkpointer panicked: {join}"
        ))),
    };
    blocked_log.abort();
    stream.close().await;
    publisher.close().await;
    drop(conn);
    end
}

/// What a pending confirm is for, in error messages.
enum Published<P> {
    Event(uuid::Uuid, P),
    DeadLetter(P),
}

impl<P: LogPosition> std::fmt::Display for Published<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Published::Event(id, at) => write!(f, "event {id} at {at}"),
            Published::DeadLetter(at) => write!(f, "dead letter at {at}"),
        }
    }
}

/// Publishes one change (or queues its position) and returns its pending confirm.
async fn dispatch<P: LogPosition>(
    change: Change<P>,
    publisher: &Publisher,
    ctx: &Numbering<'_>,
    clock: &mut Clock,
    taken: &mut BTreeSet<u64>,
    counters: &mut Counters,
) -> Result<Pending<P>, SessionError> {
    let resume = change.resume_after();
    let Change::Row { position, row } = change else {
        let after = *clock;
        return Ok(Box::pin(async move {
            Settled {
                result: Ok(()),
                resume,
                clock: after,
            }
        }));
    };
    crate::metrics::get().changed();
    let event = match &row {
        Ok(r) => {
            clock.skip_taken(taken);
            r.to_event(ctx.site, ctx.epoch, clock)
        }
        Err(e) => Err(e.clone()),
    }
    .and_then(|event| {
        let body = event.to_body();
        if body.len() > ctx.max_bytes {
            Err(RowError::TooLarge {
                bytes: body.len(),
                limit: ctx.max_bytes,
            })
        } else {
            Ok((event, body))
        }
    });
    // An event is not waited for here: the next events are queued behind
    // it (see `Publisher::send`), and a failure to write it surfaces with
    // its confirm, in order. A dead letter is written before it returns.
    let (sending, what, confirmed) = match event {
        Ok((event, body)) => {
            counters.read.get(&event.kind).inc();
            let sending = publisher.send(&event, body, &position);
            *clock = clock.after(&event);
            counters.events += 1;
            counters.published.get(&event.kind).inc();
            let confirmed = Some(counters.confirmed.get(&event.kind).clone());
            (sending, Published::Event(event.id, position), confirmed)
        }
        Err(reason) => {
            tracing::warn!(%position, %reason, "outbox row cannot become an event: sending it to the dead-letter queue");
            let confirm = publisher
                .dead_letter(row.as_ref().ok(), &reason, &position, ctx.max_bytes)
                .await
                .map_err(|e| SessionError::transient(format!("publishing a dead letter: {e}")))?;
            counters.dead_letters += 1;
            let kind = row.as_ref().ok().and_then(|r| r.kind.as_deref());
            counters.read.get(kind.unwrap_or("")).inc();
            crate::metrics::get().source_dead_letters.inc();
            let sent: Pin<Box<dyn Future<Output = _> + Send>> =
                Box::pin(std::future::ready(Ok(confirm)));
            (sent, Published::DeadLetter(position), None)
        }
    };
    let after = *clock;
    let sent_at = Instant::now();
    Ok(Box::pin(async move {
        let result = match sending.await {
            Ok(confirm) => {
                let settled = settle(confirm.await, || what.to_string());
                if let (Ok(()), Some(counter)) = (&settled, confirmed) {
                    counter.inc();
                    crate::metrics::get()
                        .confirm_latency
                        .observe(sent_at.elapsed().as_secs_f64());
                }
                settled
            }
            Err(e) => Err(PublishFailure::Lost {
                what: what.to_string(),
                error: format!("sending it: {e}"),
            }),
        };
        Settled {
            result,
            resume,
            clock: after,
        }
    }))
}

/// What numbering and sizing an event needs from the session.
struct Numbering<'a> {
    site: &'a str,
    epoch: u64,
    max_bytes: usize,
}

const REPORT_EVERY: Duration = Duration::from_secs(30);

/// A stream silent this long gets its database asked whether it still
/// streams to us (heartbeats count as activity).
const LIVENESS_EVERY: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a session did, for the periodic progress line, and its metrics'
/// series by event type (resolved once per type).
struct Counters {
    events: u64,
    dead_letters: u64,
    read: ByType<Counter>,
    published: ByType<Counter>,
    confirmed: ByType<Counter>,
}

impl Default for Counters {
    fn default() -> Self {
        let m = crate::metrics::get();
        Counters {
            events: 0,
            dead_letters: 0,
            read: ByType::new(&m.read),
            published: ByType::new(&m.published),
            confirmed: ByType::new(&m.confirmed),
        }
    }
}

impl Counters {
    fn report(&mut self, connector: &str, next_seq: u64) {
        if self.events > 0 || self.dead_letters > 0 {
            tracing::info!(
                connector,
                events = self.events,
                dead_letters = self.dead_letters,
                next_seq,
                "published in the last {}s",
                REPORT_EVERY.as_secs()
            );
        }
        (self.events, self.dead_letters) = (0, 0);
    }
}

/// How often `live.json` is rewritten at most.
const LIVE_EVERY: Duration = Duration::from_millis(250);
/// How often a running sidecar writes its checkpoint's witness (a file
/// fsynced and renamed) while sled takes a record every
/// `checkpoint.interval_ms`.
const WITNESS_EVERY: Duration = Duration::from_secs(1);

/// Verifies the topology, then writes the checkpoint durably, then
/// publishes the durable position; repeats whenever the confirmed position
/// moves, at most every `interval` (a verification costs the broker a few
/// declarations and, with the management API, an HTTP request: under load
/// one cycle per confirm batch would cost a quarter of the throughput), and
/// verifies on its own every `check_every` while idle. Returns the last
/// checkpoint written once `confirmed` is closed.
#[allow(clippy::too_many_arguments)]
async fn checkpointer<P: LogPosition>(
    store: Arc<CheckpointStore>,
    base: Checkpoint<P>,
    conn: Link,
    mut verifier: Verifier,
    check_every: Duration,
    interval: Duration,
    mut confirmed: watch::Receiver<Option<(P, Clock)>>,
    durable: watch::Sender<Option<P>>,
) -> Result<Checkpoint<P>, SessionError> {
    let mut written = base;
    let mut live_at = Instant::now();
    let mut live_dirty = false;
    // The witness and the database's position follow sled at a slower
    // pace: `unwitnessed` is sled's record when the witness is behind it.
    let mut witnessed_at = Instant::now();
    let mut unwitnessed = false;
    loop {
        let live_due = tokio::time::Instant::from_std(live_at + LIVE_EVERY);
        let witness_due = tokio::time::Instant::from_std(witnessed_at + WITNESS_EVERY);
        let closed = tokio::select! {
            changed = confirmed.changed() => changed.is_err(),
            _ = tokio::time::sleep_until(live_due), if live_dirty => {
                store.write_live(&written);
                (live_at, live_dirty) = (Instant::now(), false);
                continue;
            }
            _ = tokio::time::sleep_until(witness_due), if unwitnessed => {
                witness(&store, &written, &durable).await?;
                (witnessed_at, unwitnessed) = (Instant::now(), false);
                continue;
            }
            _ = tokio::time::sleep(check_every) => {
                verifier.verify(&conn).await?;
                continue;
            }
        };
        let target = confirmed.borrow_and_update().clone();
        if let Some((resume, clock)) = target
            && written.resume.as_ref() != Some(&resume)
        {
            // A broker that is gone cannot be verified: on the final
            // cycle, keep the checkpoint where it is rather than fail.
            // Verification guards the events published since the last
            // checkpoint (one routed while a site queue was missing would
            // be confirmed all the same); when the position moved past
            // changes that published none (another table's writes, the
            // sink's own, a keepalive), there is nothing to guard. A dead
            // letter does not count: its exchange has one queue, so a
            // missing one makes it unroutable, and `mandatory` fails it.
            // At the sites that only receive, those cycles ran ten times a
            // second under load, each a round of passive declarations and
            // a management API call.
            let began = Instant::now();
            let verified = if clock.next_seq == written.next_seq {
                Ok(())
            } else {
                verifier.verify(&conn).await
            };
            match verified {
                Ok(()) => {
                    let verified = began.elapsed();
                    let next = written.advanced(resume.clone(), clock);
                    store.commit_unwitnessed(&next).await?;
                    crate::metrics::get().checkpointed();
                    tracing::trace!(?verified, committed = ?(began.elapsed() - verified), %resume, "checkpoint cycle");
                    written = next;
                    unwitnessed = true;
                    if witnessed_at.elapsed() >= WITNESS_EVERY {
                        witness(&store, &written, &durable).await?;
                        (witnessed_at, unwitnessed) = (Instant::now(), false);
                    }
                    live_dirty = true;
                    if !closed {
                        // What is confirmed meanwhile waits for the next
                        // cycle (the watch keeps only the latest).
                        tokio::time::sleep(interval.saturating_sub(began.elapsed())).await;
                    }
                }
                Err(e) if closed => {
                    tracing::debug!(error = %e, "final checkpoint skipped: the topology could not be verified");
                }
                Err(e) => return Err(e.into()),
            }
        }
        if closed {
            if unwitnessed {
                witness(&store, &written, &durable).await?;
            }
            store.write_live(&written);
            return Ok(written);
        }
    }
}

/// Writes the witness of `written`, which sled holds, then lets the
/// database release what comes before its position.
async fn witness<P: LogPosition>(
    store: &CheckpointStore,
    written: &Checkpoint<P>,
    durable: &watch::Sender<Option<P>>,
) -> Result<(), SessionError> {
    store.witness_now(written).await?;
    if let Some(resume) = &written.resume {
        durable.send_replace(Some(resume.clone()));
    }
    Ok(())
}

/// Logs when the broker blocks or unblocks publishing on this connection
/// (RabbitMQ's memory and disk alarms): publishing waits meanwhile.
async fn log_flow_control(
    events: impl futures_util::Stream<Item = lapin::Event> + Send,
    connector: String,
) {
    futures_util::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            lapin::Event::ConnectionBlocked(reason) => {
                tracing::warn!(%connector, %reason, "the broker blocks publishing (resource alarm); waiting")
            }
            lapin::Event::ConnectionUnblocked => {
                tracing::info!(%connector, "the broker accepts publishing again")
            }
            _ => {}
        }
    }
}
