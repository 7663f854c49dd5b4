//! Control messages: what sidecars tell each other through the broker, as
//! opposed to events.
//!
//! A control message is a small JSON body marked by the header
//! [`HEADER_CONTROL`] (its kind), sent through the default exchange to one
//! queue: never through the fanout, never archived, never applied as a
//! row.
//!
//! - `gap-request`: a sink asks the archiving site to send again the events
//!   of one origin's seq range that never arrived ([`GapRequest`]; the
//!   archive's queue of requests, `<archive queue>_REQUESTS`).
//! - `gap-reply`: the archiving site's answer, on the asking site's own
//!   queue *after* the events it found ([`GapReply`]): by the time the sink
//!   reads it, the events found have closed their part of the gap, and
//!   what it lists as missing is marked "not in the archive".
//!
//! - `receipt` (opt-in, `[sink] receipts = true` at the receiving site,
//!   `[archive] receipts = true` at the archiving one): what became of a
//!   batch's events of one origin, sent to that origin's queue, one message
//!   per batch and origin ([`Receipt`]); the origin records it
//!   (`sitesync_receipts`), for `sitesync trace` and `status`.
//!
//! A sink reads its queue's control messages in queue order with the
//! events: it handles one only once every message delivered before it is
//! done (applied, dead-lettered or skipped), then acks it alone. Handling
//! is idempotent (a redelivered reply marks the same rows again), so a
//! crash between handling and ack does no harm.

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};

/// The header whose presence makes a message a control message; its value
/// is the kind.
pub const HEADER_CONTROL: &str = "x-sitesync-control";

pub const GAP_REQUEST: &str = "gap-request";
pub const GAP_REPLY: &str = "gap-reply";
pub const RECEIPT: &str = "receipt";

/// What became of some events of one origin at one site: one message per
/// applied batch and origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The site that sends it (where the events were applied, or archived).
    pub site: String,
    /// When the batch committed there.
    pub at: chrono::DateTime<chrono::Utc>,
    pub events: Vec<Receipted>,
}

/// One event's line in a [`Receipt`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipted {
    pub id: uuid::Uuid,
    pub epoch: u64,
    pub seq: u64,
    /// `applied`, `duplicate`, `lost` (last-writer-wins kept a newer
    /// write), `skipped`, `dead_letter`, or `archived`.
    pub outcome: String,
    /// Why, for a dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Please send again `origin`'s events `from..=to` of `epoch` to `site`'s
/// queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapRequest {
    pub site: String,
    pub origin: String,
    pub epoch: u64,
    pub from: u64,
    pub to: u64,
}

/// What the archive did with a [`GapRequest`]: `sent` events found and
/// sent (confirmed) before this reply; the ranges of the request it does
/// not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapReply {
    /// The archiving site.
    pub archive: String,
    pub origin: String,
    pub epoch: u64,
    pub from: u64,
    pub to: u64,
    pub sent: u64,
    pub missing: Vec<(u64, u64)>,
}

/// A control message a sink handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    GapReply(GapReply),
    Receipt(Receipt),
}

/// The kind of a control message, or `None` for an event.
pub fn kind(delivery: &Delivery) -> Option<String> {
    match delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(HEADER_CONTROL)?
    {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => Some(String::new()),
    }
}

/// Reads a control message a sink receives; the error says why it cannot
/// be handled (it then goes to the dead-letter queue).
pub fn parse(kind: &str, body: &[u8]) -> Result<Control, String> {
    match kind {
        GAP_REPLY => serde_json::from_slice(body)
            .map(Control::GapReply)
            .map_err(|e| format!("a gap-reply control message whose body is not one: {e}")),
        RECEIPT => serde_json::from_slice(body)
            .map(Control::Receipt)
            .map_err(|e| format!("a receipt control message whose body is not one: {e}")),
        other => Err(format!(
            "a control message of kind `{other}`, which a sink does not handle (expected {GAP_REPLY} or {RECEIPT})"
        )),
    }
}

/// Sends a control message of `kind` from `site` to `queue` through the
/// default exchange (persistent, `mandatory`, on `channel`, which is in
/// confirm mode): gap requests, gap replies and receipts all go this way.
pub async fn send<T: Serialize>(
    channel: &lapin::Channel,
    queue: &str,
    kind: &str,
    site: &str,
    body: &T,
) -> Result<lapin::PublisherConfirm, lapin::Error> {
    let body = serde_json::to_vec(body).expect("a control message serialises");
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            properties(kind, site),
        )
        .await
}

/// A channel in confirm mode on `conn`, for control messages.
pub async fn confirm_channel(conn: &lapin::Connection) -> Result<lapin::Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    Ok(ch)
}

/// The properties of a control message of `kind` sent by `site`:
/// persistent, JSON, its own id.
pub fn properties(kind: &str, site: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(HEADER_CONTROL.into(), AMQPValue::LongString(kind.into()));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_app_id(site.into())
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip_and_bad_ones_say_why() {
        let reply = GapReply {
            archive: "PARIS".into(),
            origin: "MADRID".into(),
            epoch: 3,
            from: 10,
            to: 20,
            sent: 9,
            missing: vec![(12, 13)],
        };
        let body = serde_json::to_vec(&reply).unwrap();
        assert_eq!(parse(GAP_REPLY, &body).unwrap(), Control::GapReply(reply));
        let e = parse(GAP_REPLY, b"{}").unwrap_err();
        assert!(
            e.contains("gap-reply") && e.contains("missing field"),
            "{e}"
        );
        let e = parse("receipt-v9", b"{}").unwrap_err();
        assert!(e.contains("`receipt-v9`"), "{e}");
        let receipt = r#"{"site":"LONDON","at":"2026-12-03T10:00:00Z","events":[
            {"id":"0190a0e0-0000-7000-8000-000000000001","epoch":1,"seq":7,"outcome":"applied"},
            {"id":"0190a0e0-0000-7000-8000-000000000002","epoch":1,"seq":8,"outcome":"dead_letter","reason":"no route"}]}"#;
        let Control::Receipt(r) = parse(RECEIPT, receipt.as_bytes()).unwrap() else {
            panic!("a receipt")
        };
        assert_eq!(r.events[1].reason.as_deref(), Some("no route"));
        assert_eq!(r.events[0].reason, None);
    }
}
