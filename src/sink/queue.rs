//! Consuming a queue in batches, shared by the sink (this site's queue)
//! and the archive (the archive queue): the consumer, filling a batch, and
//! acking what a batch finished.

use super::broker;
use crate::bus::{self, Link};
use crate::config::ConnectorConfig;
use crate::error::{ErrorKind, TargetError};
use crate::retry::Backoff;
use crate::runner::Shutdown;
use futures_util::{FutureExt, StreamExt};
use lapin::Acker;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use std::time::Duration;

/// Runs `session` (one connection's worth of consuming) until it ends
/// cleanly, `shutdown` fires, or it fails with an error that needs a
/// person; after any other error it starts again with capped backoff.
/// `role` (`sink`, `archive`) names it in the log.
pub async fn reconnecting<F, Fut>(
    cfg: &ConnectorConfig,
    role: &str,
    shutdown: &Shutdown,
    mut session: F,
) -> Result<(), TargetError>
where
    F: FnMut(Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<(), TargetError>>,
{
    let mut backoff = Backoff::new(&cfg.retry);
    let mut waiting = shutdown.clone();
    let part = crate::metrics::part(role);
    crate::metrics::expect(part);
    let mut sessions = 0u64;
    loop {
        if sessions > 0 {
            crate::metrics::connection(part).1.inc();
        }
        sessions += 1;
        let ended = session(shutdown.clone()).await;
        crate::metrics::connection(part).0.set(0);
        match ended {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Operator => {
                crate::metrics::not_ready(part, e.message());
                return Err(e);
            }
            Err(e) => {
                crate::metrics::not_ready(part, e.message());
                if shutdown.requested() {
                    return Ok(());
                }
                let delay = backoff.next_delay();
                tracing::warn!(error = %e.message(), retry_in = ?delay, "{role} session ended; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = waiting.wait() => return Ok(()),
                }
            }
        }
    }
}

/// A consumer of one queue, on a connection and channel of its own.
pub struct Consuming {
    /// Kept open while consuming (dead letters go out on it too).
    pub conn: Link,
    /// The channel the consumer is on; kept so that it stays open.
    pub channel: Channel,
    pub consumer: Consumer,
    pub queue: String,
}

/// Starts consuming `queue` with `prefetch` messages ahead, as the
/// connector's `role` (`sink`, `archive`: the connection's name) under
/// consumer tag `tag`.
pub async fn consume(
    cfg: &ConnectorConfig,
    queue: &str,
    prefetch: u16,
    role: &str,
    tag: &str,
) -> Result<Consuming, TargetError> {
    let conn = bus::connect(
        &cfg.broker.urls,
        cfg.broker.connect_timeout,
        &format!("sitesync-{}-{role}", cfg.name),
    )
    .await?;
    let channel = conn.create_channel().await.map_err(broker)?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(broker)?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker(format!("consuming {queue}: {e}")))?;
    if let p @ ("sink" | "archive") = crate::metrics::part(role) {
        crate::metrics::ready(p);
        crate::metrics::connection(p).0.set(1);
    }
    Ok(Consuming {
        conn,
        channel,
        consumer,
        queue: queue.to_string(),
    })
}

/// When a batch closes: at `size` messages, `timeout` after it began, or
/// after a lull of `idle`, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub size: usize,
    pub timeout: Duration,
    pub idle: Duration,
}

/// How filling a batch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    /// The batch is closed: apply it.
    Batch,
    /// A stop was requested.
    Stop,
}

/// Fills a batch that has `ready` events already, handing each new
/// delivery to `push`, which says how many events it held (a pack holds
/// many, a control message none).
///
/// Meanwhile the consumer is not waited on: what arrived is taken at each
/// tick of `idle`, without a wake-up of this thread per message from
/// lapin's (at thousands of messages a second, those wake-ups cost more
/// CPU than the messages themselves).
pub async fn fill(
    consumer: &mut Consumer,
    queue: &str,
    limits: Limits,
    mut ready: usize,
    shutdown: &mut Shutdown,
    mut push: impl FnMut(Delivery) -> usize,
) -> Result<Filled, TargetError> {
    let deadline = tokio::time::Instant::now() + limits.timeout;
    let mut waited = false;
    loop {
        let mut arrived = false;
        while ready < limits.size {
            let Some(d) = consumer.next().now_or_never() else {
                break;
            };
            ready += push(delivered(d, queue)?);
            arrived = true;
        }
        let now = tokio::time::Instant::now();
        if ready >= limits.size || now >= deadline || (waited && !arrived) {
            return Ok(Filled::Batch);
        }
        tokio::select! {
            _ = shutdown.wait() => return Ok(Filled::Stop),
            _ = tokio::time::sleep_until(deadline.min(now + limits.idle)) => {}
        }
        waited = true;
    }
}

/// Acks the messages of a batch that are `done` (in delivery order, all
/// on one channel): the done prefix with one multiple-ack, the rest one by
/// one.
pub async fn ack_done(ackers: &[&Acker], done: &[bool]) -> Result<(), TargetError> {
    ack_done_before(ackers, done, usize::MAX).await
}

/// [`ack_done`], with the multiple-ack limited to the first `limit`
/// messages: a message delivered on the channel after them but not in
/// `ackers` (a control message the sink has yet to handle) must not be
/// acked by it.
pub async fn ack_done_before(
    ackers: &[&Acker],
    done: &[bool],
    limit: usize,
) -> Result<(), TargetError> {
    let prefix = done.iter().take(limit).take_while(|d| **d).count();
    if prefix > 0 {
        ackers[prefix - 1]
            .ack(BasicAckOptions { multiple: true })
            .await
            .map_err(broker)?;
    }
    for (acker, _) in ackers
        .iter()
        .zip(done)
        .skip(prefix)
        .filter(|(_, done)| **done)
    {
        acker
            .ack(BasicAckOptions { multiple: false })
            .await
            .map_err(broker)?;
    }
    Ok(())
}

/// A delivery from the consumer, or why there is none.
pub fn delivered(d: Option<lapin::Result<Delivery>>, queue: &str) -> Result<Delivery, TargetError> {
    match d {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(broker(format!("consuming {queue}: {e}"))),
        None => Err(broker(format!(
            "the consumer of {queue} was cancelled (queue deleted?)"
        ))),
    }
}
