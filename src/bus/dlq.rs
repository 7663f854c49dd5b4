//! The dead-letter queue: listing it and sending messages back.
//!
//! A message the sink could not apply carries the site where it failed
//! (`x-sitesync-site`); `requeue` sends it to that site's queue only,
//! through the default exchange — never through the fanout, which would
//! deliver it to every site again. A source dead letter (an outbox row that
//! is not an event) cannot be requeued: the row itself must be fixed.

use super::publisher::{
    HEADER_ATTEMPTS, HEADER_FAILED_AT, HEADER_REASON, HEADER_REQUEUED, HEADER_SITE, HEADER_STAGE,
    settle,
};
use super::{BusError, Link};
use crate::config::TopologyConfig;
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

/// One dead letter, as `dlq list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: String,
    pub kind: String,
    pub origin: String,
    /// Where it failed (the sink's site, or the source's).
    pub site: String,
    /// `sink` or `source`.
    pub stage: String,
    pub reason: String,
    pub attempts: Option<i64>,
    /// When it failed (sink) or was written (source).
    pub when: String,
}

fn header(msg: &BasicGetMessage, name: &str) -> Option<String> {
    match msg
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)?
    {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn describe(msg: &BasicGetMessage) -> DeadLetter {
    let props = &msg.delivery.properties;
    let attempts = match msg
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(HEADER_ATTEMPTS).cloned())
    {
        Some(AMQPValue::LongLongInt(n)) => Some(n),
        _ => None,
    };
    DeadLetter {
        id: props
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        kind: props
            .kind()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        origin: props
            .app_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        site: header(msg, HEADER_SITE).unwrap_or_default(),
        stage: header(msg, HEADER_STAGE).unwrap_or_default(),
        reason: header(msg, HEADER_REASON).unwrap_or_default(),
        attempts,
        when: header(msg, HEADER_FAILED_AT).unwrap_or_else(|| {
            props
                .timestamp()
                .and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0))
                .map(|t| t.to_rfc3339())
                .unwrap_or_default()
        }),
    }
}

/// Takes every message of the dead-letter queue without acking it: they
/// go back to the queue when the channel closes, unless acked.
async fn take_all(
    conn: &Link,
    topology: &TopologyConfig,
) -> Result<(lapin::Channel, Vec<BasicGetMessage>), BusError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(BusError::amqp("opening a channel"))?;
    let queue = channel
        .queue_declare(
            topology.dead_letter_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BusError::amqp(format!(
            "looking at {}",
            topology.dead_letter_queue
        )))?;
    let mut messages = Vec::new();
    for _ in 0..queue.message_count() {
        match channel
            .basic_get(
                topology.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(BusError::amqp(format!(
                "reading {}",
                topology.dead_letter_queue
            )))? {
            Some(msg) => messages.push(msg),
            None => break,
        }
    }
    Ok((channel, messages))
}

/// Every dead letter, oldest first. Nothing is removed.
pub async fn list(conn: &Link, topology: &TopologyConfig) -> Result<Vec<DeadLetter>, BusError> {
    let (channel, messages) = take_all(conn, topology).await?;
    let out = messages.iter().map(describe).collect();
    let _ = channel.close(200, "listed".into()).await;
    Ok(out)
}

/// What `requeue` did with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeued {
    /// Sent back to this queue.
    To(String),
    /// Left in the dead-letter queue, with why.
    Left(String),
}

/// Sends the dead letters `select` picks back to the queue of the site
/// where each failed; returns what happened to each one picked.
pub async fn requeue(
    conn: &Link,
    topology: &TopologyConfig,
    select: impl Fn(&DeadLetter) -> bool,
) -> Result<Vec<(DeadLetter, Requeued)>, BusError> {
    let (channel, messages) = take_all(conn, topology).await?;
    let publish = conn
        .create_channel()
        .await
        .map_err(BusError::amqp("opening a channel"))?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(BusError::amqp("enabling confirms"))?;
    let mut done = Vec::new();
    for msg in messages {
        let letter = describe(&msg);
        if !select(&letter) {
            continue;
        }
        if letter.stage != "sink" || !topology.sites.contains(&letter.site) {
            let why = if letter.stage == "source" {
                format!(
                    "a source dead letter (an outbox row of {} that is not an event) cannot be requeued: fix the row and insert it again",
                    letter.site
                )
            } else if letter.stage == "archive" {
                format!(
                    "an archive dead letter (a message of {} that is not an event) cannot be archived: there is nothing to requeue",
                    topology.archive_queue
                )
            } else {
                format!(
                    "it names no site of the topology to go back to (site `{}`)",
                    letter.site
                )
            };
            done.push((letter, Requeued::Left(why)));
            continue;
        }
        let queue = topology.site_queue(&letter.site);
        let mut headers = msg
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        headers.insert(HEADER_REQUEUED.into(), AMQPValue::Boolean(true));
        let props = msg.delivery.properties.clone().with_headers(headers);
        let confirm = publish
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &msg.delivery.data,
                props,
            )
            .await
            .map_err(BusError::amqp(format!("sending back to {queue}")))?;
        match settle(confirm.await, || {
            format!("message {} to {queue}", letter.id)
        }) {
            Ok(()) => {
                msg.delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(BusError::amqp("removing it from the dead-letter queue"))?;
                done.push((letter, Requeued::To(queue)));
            }
            Err(e) => done.push((letter, Requeued::Left(e.to_string()))),
        }
    }
    let _ = publish.close(200, "requeued".into()).await;
    let _ = channel.close(200, "requeued".into()).await;
    Ok(done)
}
