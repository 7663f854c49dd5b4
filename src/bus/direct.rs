//! Publishing to one site's queue only: the default exchange with the
//! queue's name as routing key, never the fanout.
//!
//! `sitesync replay` (archived events) and `sitesync resync` (a snapshot of
//! a site's tables) both send to one site this way: persistent, `mandatory`
//! (a missing queue is a failure, not a silent drop), with publisher
//! confirms and a window of them in flight. Confirms are settled in publish
//! order, so what a caller counts as done (the tag handed back) is always a
//! contiguous prefix of what it sent: resuming after the last settled tag
//! leaves nothing out.

use super::publisher::{PublishFailure, settle};
use futures_util::FutureExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Why sending to a queue stopped.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("publishing to {queue}: {source}")]
    Publish {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("{0}")]
    Confirm(#[from] PublishFailure),
}

/// A confirm channel that sends to one queue through the default exchange,
/// with at most `window` messages unconfirmed. Each message carries a tag
/// of the caller's (a cursor, a key) handed back once the broker confirmed
/// it.
pub struct Direct<T> {
    channel: Channel,
    queue: String,
    window: usize,
    /// Unconfirmed messages, oldest first: the confirm, the tag, and what
    /// to call the message in an error.
    inflight: VecDeque<(PublisherConfirm, T, String)>,
}

impl<T> Direct<T> {
    /// Opens a confirm channel on `conn` for `queue`.
    pub async fn open(conn: &Connection, queue: &str, window: usize) -> Result<Self, DirectError> {
        let failed = |source| DirectError::Publish {
            queue: queue.to_string(),
            source,
        };
        let channel = conn.create_channel().await.map_err(failed)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(failed)?;
        Ok(Direct {
            channel,
            queue: queue.to_string(),
            window: window.max(1),
            inflight: VecDeque::new(),
        })
    }

    /// The queue it sends to.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Publishes one message (`what` names it in errors). When the window
    /// is full, waits for the oldest confirm first and returns its tag.
    pub async fn send(
        &mut self,
        body: &[u8],
        props: BasicProperties,
        what: String,
        tag: T,
    ) -> Result<Option<T>, DirectError> {
        let settled = match self.inflight.len() >= self.window {
            true => self.settle_oldest().await?,
            false => None,
        };
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .map_err(|source| DirectError::Publish {
                queue: self.queue.clone(),
                source,
            })?;
        self.inflight.push_back((confirm, tag, what));
        Ok(settled)
    }

    /// Waits for the oldest unconfirmed message; its tag, or `None` when
    /// nothing is in flight.
    pub async fn settle_oldest(&mut self) -> Result<Option<T>, DirectError> {
        let Some((confirm, tag, what)) = self.inflight.pop_front() else {
            return Ok(None);
        };
        settle(confirm.await, || format!("{what} to {}", self.queue))?;
        Ok(Some(tag))
    }

    /// The tags of the oldest messages whose confirms have come already,
    /// in publish order, without waiting: how far the broker is, a window
    /// sooner than [`Direct::send`] hands it back.
    pub fn settled_now(&mut self) -> Result<Vec<T>, DirectError> {
        let mut out = Vec::new();
        while let Some((confirm, _, _)) = self.inflight.front_mut() {
            let Some(result) = confirm.now_or_never() else {
                break;
            };
            let (_, tag, what) = self.inflight.pop_front().expect("just looked");
            settle(result, || format!("{what} to {}", self.queue))?;
            out.push(tag);
        }
        Ok(out)
    }

    /// Closes the channel (after [`Direct::settle_oldest`] has emptied it).
    pub async fn close(self, reason: &str) {
        let _ = self.channel.close(200, reason.into()).await;
    }
}

/// Paces a stream to at most `rate` messages a second (none: no limit):
/// the n-th message not before n / rate seconds after the start.
#[derive(Debug, Clone)]
pub struct Pace {
    rate: Option<u32>,
    began: Instant,
    sent: u64,
}

impl Pace {
    pub fn new(rate: Option<u32>) -> Pace {
        Pace {
            rate,
            began: Instant::now(),
            sent: 0,
        }
    }

    /// Waits until the next message is due, and counts it.
    pub async fn next(&mut self) {
        if let Some(rate) = self.rate {
            let due =
                self.began + Duration::from_secs_f64(self.sent as f64 / f64::from(rate.max(1)));
            tokio::time::sleep_until(due).await;
        }
        self.sent += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pace_spreads_messages_over_time() {
        let start = tokio::time::Instant::now();
        let mut pace = Pace::new(Some(10));
        for _ in 0..21 {
            pace.next().await;
        }
        // The 21st message is due at 20 / 10 s.
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(2), "{took:?}");
        let mut free = Pace::new(None);
        let start = tokio::time::Instant::now();
        for _ in 0..1000 {
            free.next().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
