//! Events and planned items for the sink's tests (the batch engine's and
//! each engine's session tests).

use super::mapping;
use super::{Item, Plan, Seen};
use crate::config::{Route, SinkConfig, Unrouted};
use crate::event::Event;
use chrono::DateTime;
use serde_json::value::RawValue;
use uuid::Uuid;

/// An event of `origin` about `key`, at second `ts`, carrying `data` (a
/// JSON object); its id and `seq` are `n`, its epoch 1.
pub fn event_with(n: u128, origin: &str, key: &str, ts: i64, data: &str) -> Event {
    Event {
        id: Uuid::from_u128(n),
        timestamp: DateTime::from_timestamp(ts, 0).unwrap(),
        origin: origin.into(),
        kind: "customer.upsert".into(),
        entity_key: Some(key.into()),
        data: RawValue::from_string(data.to_string()).unwrap(),
        epoch: 1,
        seq: n as u64,
    }
}

/// The items a batch of `site` plans for `events` through `route`: this
/// site's own events back round, the others' to apply.
pub fn items<'a>(events: &'a [Event], route: &'a Route, site: &str) -> Vec<Item<'a>> {
    events
        .iter()
        .map(|e| {
            let row = mapping::map_row(route, &mapping::data_object(e).unwrap()).unwrap();
            Item {
                event: Some(e),
                seen: Some(Seen {
                    origin: e.origin.clone(),
                    epoch: e.epoch,
                    seq: e.seq,
                }),
                plan: if e.origin == site {
                    Plan::Own(Some(row))
                } else {
                    Plan::Apply(route, row)
                },
            }
        })
        .collect()
}

/// A sink with these routes, batches of up to 100 messages, three
/// attempts before a dead letter.
pub fn sink_with(routes: Vec<Route>) -> SinkConfig {
    SinkConfig {
        enabled: true,
        gap_fill: Default::default(),
        receipts: false,
        prefetch: 100,
        batch_size: 100,
        batch_timeout: std::time::Duration::from_millis(20),
        batch_idle: std::time::Duration::from_millis(2),
        max_attempts: 3,
        unrouted: Unrouted::DeadLetter,
        routes,
    }
}
