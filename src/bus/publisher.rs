//! Publishing with confirms.
//!
//! `basic_publish(..).await` only means *sent*: the returned
//! [`PublisherConfirm`] resolves when the broker has taken responsibility.
//! Every message is persistent and `mandatory`; a confirm counts as delivered
//! only as `Ack` *without* a returned message. `Ack` carrying a returned
//! message (unroutable: no queue bound), `Nack`, and a lost channel are all
//! failures, and the runner republishes from the checkpoint.

use crate::config::TopologyConfig;
use crate::event::{Event, OutboxRow, RowError};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Header with the source position of the event (the text form of the
/// engine's position, e.g. `postgres:0/16B3748#3`).
pub const HEADER_POSITION: &str = "x-sitesync-position";
pub const HEADER_EPOCH: &str = "x-sitesync-epoch";
pub const HEADER_SEQ: &str = "x-sitesync-seq";
/// Dead letters: why, where and at which stage.
pub const HEADER_REASON: &str = "x-sitesync-reason";
pub const HEADER_SITE: &str = "x-sitesync-site";
pub const HEADER_STAGE: &str = "x-sitesync-stage";
/// Sink dead letters: how many attempts failed, and when the last did.
pub const HEADER_ATTEMPTS: &str = "x-sitesync-attempts";
pub const HEADER_FAILED_AT: &str = "x-sitesync-failed-at";
/// Set on a message `sitesync dlq requeue` sent back.
pub const HEADER_REQUEUED: &str = "x-sitesync-requeued";
/// On a dead-lettered event of a pack: the pack's message id.
pub const HEADER_PACKED_IN: &str = "x-sitesync-packed-in";
/// Dead letters too large for the broker go without `data`: its size.
pub const HEADER_DATA_OMITTED: &str = "x-sitesync-data-omitted-bytes";

/// Why a publish did not count as delivered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishFailure {
    #[error(
        "the broker returned {what} as unroutable ({code} {text}): no queue is bound to exchange {exchange}"
    )]
    Returned {
        what: String,
        exchange: String,
        code: u16,
        text: String,
    },
    #[error("the broker refused {what} (nack)")]
    Nacked { what: String },
    #[error("no confirm for {what}: {error}")]
    Lost { what: String, error: String },
}

/// A confirm channel bound to one connector's exchanges.
pub struct Publisher {
    channel: Channel,
    exchange: ShortString,
    dead_letter_exchange: ShortString,
    site: ShortString,
}

impl Publisher {
    pub async fn new(
        conn: &Connection,
        topology: &TopologyConfig,
        site: &str,
    ) -> Result<Publisher, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher {
            channel,
            exchange: topology.exchange.as_str().into(),
            dead_letter_exchange: topology.dead_letter_exchange.as_str().into(),
            site: site.into(),
        })
    }

    fn options() -> BasicPublishOptions {
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        }
    }

    /// Sends one event whose `body` is `event.to_body()`, without waiting
    /// for it to be written: its frames are queued on the channel before
    /// this returns, so events go out in the order of the calls. The
    /// returned future resolves once they are written, with the pending
    /// broker confirm.
    ///
    /// lapin's `basic_publish` queues the frames, wakes its I/O thread, and
    /// resolves once that thread has written them; awaited message by
    /// message, that was two thread wake-ups and a wait per event (about a
    /// third of the source's CPU in the benchmark, and the publish rate
    /// bound to how fast a busy machine schedules the I/O thread). Started
    /// here and awaited later, the I/O thread writes whatever has queued
    /// meanwhile in one go.
    pub fn send(
        &self,
        event: &Event,
        body: Vec<u8>,
        position: &(dyn std::fmt::Display + Sync),
    ) -> Pin<Box<dyn Future<Output = Result<PublisherConfirm, lapin::Error>> + Send>> {
        let props = event_properties(event, FieldTable::default(), &position.to_string());
        started(&self.channel, self.exchange.clone(), body, props)
    }

    /// Sends a row that cannot become an event to the dead-letter exchange,
    /// with the reason in a header and the row itself as the body.
    /// A row whose JSON exceeds `max_bytes` goes without its `data` (the
    /// header `x-sitesync-data-omitted-bytes` says how much was left out; the
    /// row itself stays in the outbox table).
    pub async fn dead_letter(
        &self,
        row: Option<&OutboxRow>,
        reason: &RowError,
        position: &(dyn std::fmt::Display + Sync),
        max_bytes: usize,
    ) -> Result<PublisherConfirm, lapin::Error> {
        let mut headers = FieldTable::default();
        headers.insert(
            HEADER_REASON.into(),
            AMQPValue::LongString(reason.to_string().into()),
        );
        headers.insert(
            HEADER_SITE.into(),
            AMQPValue::LongString(self.site.as_str().into()),
        );
        headers.insert(HEADER_STAGE.into(), AMQPValue::LongString("source".into()));
        headers.insert(
            HEADER_POSITION.into(),
            AMQPValue::LongString(position.to_string().into()),
        );
        let mut body = match row {
            Some(row) => row.to_json(),
            None => b"{}".to_vec(),
        };
        if body.len() > max_bytes
            && let Some(row) = row
        {
            let omitted = row.data.as_ref().map_or(0, String::len);
            headers.insert(
                HEADER_DATA_OMITTED.into(),
                AMQPValue::LongLongInt(omitted as i64),
            );
            body = OutboxRow {
                data: None,
                ..row.clone()
            }
            .to_json();
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_app_id(self.site.clone())
            .with_type("sitesync.dead_letter".into())
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_headers(headers);
        if let Some(id) = row.and_then(|r| r.id.as_deref()) {
            props = props.with_message_id(id.into());
        }
        self.channel
            .basic_publish(
                self.dead_letter_exchange.clone(),
                "".into(),
                Self::options(),
                &body,
                props,
            )
            .await
    }

    /// Sends a message the sink could not apply to the dead-letter
    /// exchange: the original body and properties, plus headers with the
    /// reason, the attempt count, this site and when.
    pub async fn dead_letter_message(
        &self,
        original: &lapin::message::Delivery,
        reason: &str,
        attempts: u32,
    ) -> Result<PublisherConfirm, lapin::Error> {
        self.dead_letter_at(original, reason, attempts, "sink")
            .await
    }

    /// [`Publisher::dead_letter_message`] for a message that failed at
    /// `stage` (`sink`, or `archive`: a message of the archive queue that
    /// is not an event).
    pub async fn dead_letter_at(
        &self,
        original: &lapin::message::Delivery,
        reason: &str,
        attempts: u32,
        stage: &str,
    ) -> Result<PublisherConfirm, lapin::Error> {
        let props = self.dead_letter_properties(&original.properties, reason, attempts, stage);
        self.channel
            .basic_publish(
                self.dead_letter_exchange.clone(),
                "".into(),
                Self::options(),
                &original.data,
                props,
            )
            .await
    }

    /// [`Publisher::dead_letter_message`] for one event of a pack
    /// ([`crate::bus::pack`]): its own body, with the pack's properties
    /// made its own (no longer a pack nor encoded; the event's id, epoch
    /// and seq when it is one) and the pack's id in [`HEADER_PACKED_IN`].
    pub async fn dead_letter_part(
        &self,
        pack: &lapin::message::Delivery,
        body: &[u8],
        event: Option<&Event>,
        reason: &str,
        attempts: u32,
    ) -> Result<PublisherConfirm, lapin::Error> {
        let mut headers = FieldTable::default();
        for (k, v) in pack.properties.headers().iter().flat_map(|h| h.inner()) {
            let k = k.as_str();
            if k != super::pack::HEADER_PACK && k != HEADER_EPOCH && k != HEADER_SEQ {
                headers.insert(k.into(), v.clone());
            }
        }
        if let Some(id) = pack.properties.message_id() {
            headers.insert(
                HEADER_PACKED_IN.into(),
                AMQPValue::LongString(id.as_str().into()),
            );
        }
        let own = match event {
            Some(e) => event_properties(e, headers, "resync"),
            None => pack
                .properties
                .clone()
                .with_headers(headers)
                .with_content_encoding("".into()),
        };
        let props = self.dead_letter_properties(&own, reason, attempts, "sink");
        self.channel
            .basic_publish(
                self.dead_letter_exchange.clone(),
                "".into(),
                Self::options(),
                body,
                props,
            )
            .await
    }

    fn dead_letter_properties(
        &self,
        original: &BasicProperties,
        reason: &str,
        attempts: u32,
        stage: &str,
    ) -> BasicProperties {
        let mut headers = original.headers().clone().unwrap_or_default();
        headers.insert(HEADER_REASON.into(), AMQPValue::LongString(reason.into()));
        headers.insert(
            HEADER_SITE.into(),
            AMQPValue::LongString(self.site.as_str().into()),
        );
        headers.insert(HEADER_STAGE.into(), AMQPValue::LongString(stage.into()));
        headers.insert(
            HEADER_ATTEMPTS.into(),
            AMQPValue::LongLongInt(attempts as i64),
        );
        headers.insert(
            HEADER_FAILED_AT.into(),
            AMQPValue::LongString(chrono::Utc::now().to_rfc3339().into()),
        );
        original.clone().with_headers(headers).with_delivery_mode(2)
    }

    pub async fn close(&self) {
        let _ = self.channel.close(200, "bye".into()).await;
    }
}

/// The properties an event is published with: persistent, its id, origin,
/// type and time, and in `headers` (added to those given) its `(epoch,
/// seq)` and the position it was read at (`position`).
pub fn event_properties(event: &Event, mut headers: FieldTable, position: &str) -> BasicProperties {
    headers.insert(
        HEADER_POSITION.into(),
        AMQPValue::LongString(position.into()),
    );
    headers.insert(
        HEADER_EPOCH.into(),
        AMQPValue::LongLongInt(event.epoch as i64),
    );
    headers.insert(HEADER_SEQ.into(), AMQPValue::LongLongInt(event.seq as i64));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(event.id.to_string().into())
        .with_app_id(event.origin.as_str().into())
        .with_type(event.kind.as_str().into())
        .with_timestamp(event.timestamp.timestamp().max(0) as u64)
        .with_headers(headers)
}

/// `basic_publish` (persistent options aside: `mandatory`) started: the
/// frames are queued on the channel before this returns, in call order,
/// and the returned future resolves once they are written, with the
/// pending confirm (see [`Publisher::send`]). The bench's raw publisher
/// uses it too, so that both publish the same way.
pub fn started(
    channel: &Channel,
    exchange: ShortString,
    body: Vec<u8>,
    props: BasicProperties,
) -> Pin<Box<dyn Future<Output = Result<PublisherConfirm, lapin::Error>> + Send>> {
    let channel = channel.clone();
    let mut sending = Box::pin(async move {
        channel
            .basic_publish(exchange, "".into(), Publisher::options(), &body, props)
            .await
    });
    // The first poll runs `basic_publish` up to its wait: the frames are
    // queued now. The waker of the later polls is the one that counts.
    match sending
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(result) => Box::pin(std::future::ready(result)),
        Poll::Pending => sending,
    }
}

/// Turns a confirm into delivered-or-failure. `what` names the message in errors.
pub fn settle(
    result: Result<Confirmation, lapin::Error>,
    what: impl FnOnce() -> String,
) -> Result<(), PublishFailure> {
    match result {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) => Err(PublishFailure::Returned {
            what: what(),
            exchange: returned.delivery.exchange.to_string(),
            code: returned.reply_code,
            text: returned.reply_text.to_string(),
        }),
        Ok(Confirmation::Nack(_)) => Err(PublishFailure::Nacked { what: what() }),
        Ok(Confirmation::NotRequested) => Err(PublishFailure::Lost {
            what: what(),
            error: "confirms were not enabled on the channel".into(),
        }),
        Err(e) => Err(PublishFailure::Lost {
            what: what(),
            error: e.to_string(),
        }),
    }
}
