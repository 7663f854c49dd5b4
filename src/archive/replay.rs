//! `sitesync replay`: archived events sent again to one site's queue.
//!
//! The archive is read in `(origin, epoch, seq)` order, a page at a time,
//! so each origin's events go out in the order the origin wrote them. They
//! are published to the **default exchange** with the site's queue as the
//! routing key (as `dlq requeue` does): only that site receives them, never
//! the fanout. Each message is the event as its origin published it (the
//! same body, id, type, headers), marked `x-sitesync-replayed`, persistent
//! and `mandatory`, with publisher confirms: a confirm window is kept in
//! flight, and the count of events sent only counts confirmed ones
//! ([`crate::bus::direct`], shared with `sitesync resync`).
//!
//! The receiving sink applies them as any delivery: an event its inbox
//! holds is a duplicate, a newer write wins over an older event
//! (last-writer-wins on its versions). So a replay stopped halfway can be
//! started again from the beginning: what the site has is skipped.

use super::{Cursor, Store};
use crate::bus::direct::{Direct, DirectError, Pace};
use crate::bus::publisher::event_properties;
use crate::error::TargetError;
use crate::event::Event;
use chrono::{DateTime, Utc};
use lapin::Connection;
use lapin::types::{AMQPValue, FieldTable};
use std::collections::BTreeMap;

/// The header a replayed message carries.
pub const HEADER_REPLAYED: &str = "x-sitesync-replayed";

/// Events read per page of the archive.
const PAGE: usize = 1000;

/// Confirms in flight at most.
const WINDOW: usize = 256;

/// Which archived events go.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// This origin's only.
    pub origin: Option<String>,
    /// Written at or after this time (the event's own timestamp)…
    pub from: Option<DateTime<Utc>>,
    /// …and before this one.
    pub to: Option<DateTime<Utc>>,
    /// Event types matching this pattern (`*` matches any run of
    /// characters: `customer.*`).
    pub kind: Option<String>,
    /// Only `(epoch, first seq, last seq)` of `origin` (a gap's range):
    /// the read starts at it and stops past it.
    pub range: Option<(u64, u64, u64)>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        self.origin.as_ref().is_none_or(|o| *o == e.origin)
            && self
                .range
                .is_none_or(|(epoch, from, to)| e.epoch == epoch && (from..=to).contains(&e.seq))
            && self.from.is_none_or(|t| e.timestamp >= t)
            && self.to.is_none_or(|t| e.timestamp < t)
            && self.kind.as_deref().is_none_or(|p| glob(p, &e.kind))
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of
/// characters (none included) and everything else itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Events per `(origin, type)`.
pub type Counts = BTreeMap<(String, String), u64>;

/// Reads every archived event the filter takes, in order, handing each to
/// `each` (which may stop the walk by returning an error).
pub async fn walk<S: Store, E: From<TargetError>>(
    store: &S,
    filter: &Filter,
    mut each: impl AsyncFnMut(Event) -> Result<(), E>,
) -> Result<(), E> {
    // A range starts the read just before its first seq, of its origin.
    let mut after: Option<Cursor> = match (&filter.origin, filter.range) {
        (Some(origin), Some((epoch, from, _))) => {
            Some((origin.clone(), epoch as i64, from.saturating_sub(1) as i64))
        }
        _ => None,
    };
    loop {
        let page = store
            .read(after.as_ref(), filter.origin.as_deref(), PAGE)
            .await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = Some((last.origin.clone(), last.epoch as i64, last.seq as i64));
        let full = page.len() == PAGE;
        for e in page {
            if let Some((epoch, _, to)) = filter.range
                && (e.epoch > epoch || (e.epoch == epoch && e.seq > to))
            {
                return Ok(());
            }
            if filter.matches(&e) {
                each(e).await?;
            }
        }
        if !full {
            return Ok(());
        }
    }
}

/// What `--dry-run` prints: how many events per origin and type would go.
pub async fn count<S: Store>(store: &S, filter: &Filter) -> Result<Counts, TargetError> {
    let mut counts = Counts::new();
    walk(store, filter, async |e: Event| {
        *counts.entry((e.origin, e.kind)).or_default() += 1;
        Ok::<(), TargetError>(())
    })
    .await?;
    Ok(counts)
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the archive: {0}")]
    Archive(#[from] TargetError),
    #[error("{0}")]
    Send(#[from] DirectError),
}

/// How far a replay got.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Events the broker confirmed.
    pub confirmed: u64,
    /// The last event sent, `(origin, epoch, seq)`.
    pub last: Option<Cursor>,
}

/// Sends the events `filter` takes to `queue` through the default
/// exchange ([`Direct`]), at most `rate` a second when given; `progress`
/// is called after each confirm. Returns what was confirmed.
pub async fn replay<S: Store>(
    store: &S,
    conn: &Connection,
    queue: &str,
    filter: &Filter,
    rate: Option<u32>,
    mut progress: impl FnMut(&Progress),
) -> Result<Progress, ReplayError> {
    let mut direct: Direct<Cursor> = Direct::open(conn, queue, WINDOW).await?;
    let mut pace = Pace::new(rate);
    let mut done = Progress::default();
    walk(store, filter, async |e: Event| {
        pace.next().await;
        let mut headers = FieldTable::default();
        headers.insert(HEADER_REPLAYED.into(), AMQPValue::Boolean(true));
        let props = event_properties(&e, headers, "archive");
        let cursor = (e.origin.clone(), e.epoch as i64, e.seq as i64);
        let settled = direct
            .send(&e.to_body(), props, format!("event {}", e.id), cursor)
            .await?;
        if let Some(cursor) = settled {
            done.confirmed += 1;
            done.last = Some(cursor);
            progress(&done);
        }
        Ok::<(), ReplayError>(())
    })
    .await?;
    while let Some(cursor) = direct.settle_oldest().await? {
        done.confirmed += 1;
        done.last = Some(cursor);
        progress(&done);
    }
    direct.close("replayed").await;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_patterns() {
        assert!(glob("customer.*", "customer.upsert"));
        assert!(glob("*.delete", "order.delete"));
        assert!(glob("*", ""));
        assert!(glob(
            "c*r.*e",
            "customer.upsert".replace("upsert", "delete").as_str()
        ));
        assert!(!glob("customer.*", "order.upsert"));
        assert!(!glob("a*a", "a"), "the two ends may not overlap");
        assert!(glob("item.upsert", "item.upsert"));
        assert!(!glob("item.upsert", "item.upserts"));
    }

    #[test]
    fn the_filter_takes_an_origin_a_time_range_and_a_type() {
        let body = r#"{"id":"0190a0e0-0000-7000-8000-000000000001","timestamp":"2026-01-02T03:04:05Z","origin":"PARIS","type":"customer.upsert","entity_key":null,"data":{},"epoch":1,"seq":1}"#;
        let e = Event::from_body(body.as_bytes()).unwrap();
        let at = |t: &str| Some(t.parse::<DateTime<Utc>>().unwrap());
        assert!(Filter::default().matches(&e));
        let f = Filter {
            origin: Some("PARIS".into()),
            from: at("2026-01-02T03:04:05Z"),
            to: at("2026-01-02T03:04:06Z"),
            kind: Some("customer.*".into()),
            range: None,
        };
        assert!(f.matches(&e));
        assert!(
            Filter {
                range: Some((1, 1, 1)),
                ..f.clone()
            }
            .matches(&e)
        );
        assert!(
            !Filter {
                range: Some((1, 2, 9)),
                ..f.clone()
            }
            .matches(&e),
            "outside the seq range"
        );
        assert!(
            !Filter {
                origin: Some("LONDON".into()),
                ..f.clone()
            }
            .matches(&e)
        );
        assert!(
            !Filter {
                to: at("2026-01-02T03:04:05Z"),
                ..f.clone()
            }
            .matches(&e),
            "to is exclusive"
        );
        assert!(
            !Filter {
                kind: Some("order.*".into()),
                ..f
            }
            .matches(&e)
        );
    }
}
