//! What to do with each message of a round, decided before the database.
//!
//! Each message gets a [`Plan`]: apply it through its route, delete this
//! site's outbox row (an event of ours that came back), skip it, send it to
//! the dead-letter queue (not JSON, no route, no key), or hold it back
//! behind an earlier failing message of the same entity. [`sort_items`]
//! then gives the first look at a batch that every engine starts from.

use super::mapping::{self, Entity, MappedRow};
use crate::config::{Route, SinkConfig, Unrouted};
use crate::event::Event;
use std::collections::HashSet;
use std::time::Instant;

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

/// A received message as the planner sees it: what it says, and how its
/// earlier rounds went.
#[derive(Debug)]
pub struct Message {
    /// The event, or why the body is not one.
    pub event: Result<Event, String>,
    /// Its origin's `(epoch, seq)`, from the event or the headers.
    pub seen: Option<Seen>,
    /// Rounds in which it failed on its own.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Not before this instant (its retry, or the retry it is held behind).
    pub retry_at: Option<Instant>,
    /// Held behind an earlier failing message of its entity.
    pub held: bool,
}

impl Message {
    pub fn new(event: Result<Event, String>, seen: Option<Seen>) -> Message {
        Message {
            event,
            seen,
            attempts: 0,
            last_error: None,
            retry_at: None,
            held: false,
        }
    }

    /// Whether it may be tried at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| t <= now)
    }
}

/// The plans for a round, in queue order. An entity whose message is held
/// or failing holds every later message of that entity too.
pub fn plan<'a>(
    messages: impl IntoIterator<Item = &'a Message>,
    site: &str,
    sink: &'a SinkConfig,
    now: Instant,
) -> Vec<Item<'a>> {
    let mut blocked: HashSet<Entity> = HashSet::new();
    messages
        .into_iter()
        .map(|m| {
            let plan = match &m.event {
                Err(e) => Plan::DeadLetter(format!("not a sitesync event: {e}")),
                Ok(ev) => plan_event(ev, m, site, sink, now, &mut blocked),
            };
            Item {
                event: m.event.as_ref().ok(),
                seen: m.seen.clone(),
                plan,
            }
        })
        .collect()
}

/// The plan of one event; `blocked`: the entities held so far this round.
pub fn plan_event<'a>(
    ev: &Event,
    m: &Message,
    site: &str,
    sink: &'a SinkConfig,
    now: Instant,
    blocked: &mut HashSet<Entity>,
) -> Plan<'a> {
    let route = sink.route(&ev.kind);
    let row = route.map(|r| mapping::data_object(ev).and_then(|data| mapping::map_row(r, &data)));
    if ev.origin == site {
        return Plan::Own(row.and_then(Result::ok));
    }
    let (route, row) = match (route, row) {
        (None, _) => {
            return match sink.unrouted {
                Unrouted::Skip => Plan::Skip,
                Unrouted::DeadLetter => Plan::DeadLetter(format!(
                    "no route for event type `{}` at site {} (add a [[sink.routes]] entry, or set sink.unrouted = \"skip\")",
                    ev.kind, site
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
    if m.attempts >= sink.max_attempts {
        return Plan::DeadLetter(format!(
            "{} (after {} attempts)",
            m.last_error.as_deref().unwrap_or("failed"),
            m.attempts
        ));
    }
    if !m.ready(now) {
        blocked.insert(row.entity);
        return Plan::Hold;
    }
    if m.attempts > 0 {
        // A retry goes first; its entity's later messages wait for it.
        blocked.insert(row.entity.clone());
    }
    Plan::Apply(route, row)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Operation;
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn sink_with(unrouted: Unrouted) -> SinkConfig {
        SinkConfig {
            enabled: true,
            gap_fill: Default::default(),
            receipts: false,
            prefetch: 100,
            batch_size: 100,
            batch_timeout: Duration::from_millis(20),
            batch_idle: Duration::from_millis(2),
            max_attempts: 3,
            unrouted,
            routes: vec![Route {
                kind: "customer.upsert".into(),
                table: "customer".into(),
                key: vec!["id".into()],
                operation: Operation::Upsert,
                rename: BTreeMap::new(),
                drop: vec![],
                constants: BTreeMap::new(),
            }],
        }
    }

    fn event(n: u128, origin: &str, kind: &str, data: &str) -> Event {
        Event {
            id: uuid::Uuid::from_u128(n),
            timestamp: chrono::DateTime::from_timestamp(1, 0).unwrap(),
            origin: origin.into(),
            kind: kind.into(),
            entity_key: None,
            data: RawValue::from_string(data.into()).unwrap(),
            epoch: 1,
            seq: n as u64,
        }
    }

    fn message(e: Event) -> Message {
        Message::new(Ok(e), None)
    }

    /// The plans as short words, for comparing.
    fn words(items: &[Item<'_>]) -> Vec<String> {
        items
            .iter()
            .map(|i| match &i.plan {
                Plan::Apply(_, row) => format!("apply {}", row.entity.key),
                Plan::Own(row) => format!("own {}", row.is_some()),
                Plan::Skip => "skip".into(),
                Plan::DeadLetter(reason) => format!("dead letter: {reason}"),
                Plan::Hold => "hold".into(),
            })
            .collect()
    }

    #[test]
    fn each_message_gets_its_plan() {
        let sink = sink_with(Unrouted::DeadLetter);
        let messages = [
            message(event(1, "LONDON", "customer.upsert", r#"{"id": 1}"#)),
            message(event(2, "PARIS", "customer.upsert", r#"{"id": 2}"#)),
            message(event(3, "PARIS", "order.upsert", r#"{"id": 3}"#)),
            message(event(4, "LONDON", "order.upsert", r#"{"id": 4}"#)),
            message(event(
                5,
                "LONDON",
                "customer.upsert",
                r#"{"name": "no key"}"#,
            )),
            message(event(6, "LONDON", "customer.upsert", "[1]")),
            Message::new(Err("expected value at line 1".into()), None),
        ];
        let items = plan(&messages, "PARIS", &sink, Instant::now());
        assert_eq!(
            words(&items),
            [
                "apply 1",
                "own true",
                "own false",
                "dead letter: no route for event type `order.upsert` at site PARIS (add a [[sink.routes]] entry, or set sink.unrouted = \"skip\")",
                "dead letter: key column `id` is missing from the event's data",
                "dead letter: the event's data is not a JSON object",
                "dead letter: not a sitesync event: expected value at line 1",
            ]
        );
        let skip = sink_with(Unrouted::Skip);
        let items = plan(&messages[3..4], "PARIS", &skip, Instant::now());
        assert_eq!(words(&items), ["skip"]);
    }

    #[test]
    fn a_failing_message_holds_its_entity_until_it_goes_through_or_to_the_dead_letters() {
        let sink = sink_with(Unrouted::DeadLetter);
        let now = Instant::now();
        let mut waiting = message(event(1, "LONDON", "customer.upsert", r#"{"id": 1}"#));
        waiting.attempts = 1;
        waiting.last_error = Some("check constraint".into());
        waiting.retry_at = Some(now + Duration::from_secs(1));
        let messages = [
            waiting,
            message(event(2, "LONDON", "customer.upsert", r#"{"id": 1}"#)),
            message(event(3, "LONDON", "customer.upsert", r#"{"id": 2}"#)),
        ];
        let items = plan(&messages, "PARIS", &sink, now);
        assert_eq!(
            words(&items),
            ["hold", "hold", "apply 2"],
            "not due yet: it and its entity wait"
        );

        // Due: it goes first, and its entity's later messages still wait.
        let items = plan(&messages, "PARIS", &sink, now + Duration::from_secs(2));
        assert_eq!(words(&items), ["apply 1", "hold", "apply 2"]);

        // Out of attempts: to the dead-letter queue, with its last error.
        let mut messages = messages;
        messages[0].attempts = 3;
        let items = plan(&messages, "PARIS", &sink, now + Duration::from_secs(2));
        assert_eq!(
            words(&items),
            [
                "dead letter: check constraint (after 3 attempts)",
                "apply 1",
                "apply 2"
            ]
        );
    }

    #[test]
    fn sorting_finds_duplicates_in_the_batch_and_what_goes_to_the_inbox_alone() {
        let sink = sink_with(Unrouted::Skip);
        let messages = [
            message(event(1, "LONDON", "customer.upsert", r#"{"id": 1}"#)),
            message(event(1, "LONDON", "customer.upsert", r#"{"id": 1}"#)),
            message(event(2, "PARIS", "customer.upsert", r#"{"id": 2}"#)),
            message(event(3, "LONDON", "order.upsert", r#"{"id": 3}"#)),
            message(event(4, "LONDON", "customer.upsert", "[]")),
            Message::new(Err("not JSON".into()), None),
        ];
        let items = plan(&messages, "PARIS", &sink, Instant::now());
        let sorted = sort_items(&items);
        assert_eq!(
            sorted.outcomes,
            [
                Outcome::Applied,
                Outcome::Duplicate,
                Outcome::Own,
                Outcome::Skipped,
                Outcome::DeadLettered("the event's data is not a JSON object".into()),
                Outcome::DeadLettered("not a sitesync event: not JSON".into()),
            ]
        );
        assert_eq!(sorted.to_apply, [0]);
        let others: Vec<(usize, u128, &str)> = sorted
            .others
            .iter()
            .map(|(i, e, o)| (*i, e.id.as_u128(), *o))
            .collect();
        // The message that is no event has no inbox row.
        assert_eq!(
            others,
            [(2, 2, "own"), (3, 3, "skipped"), (4, 4, "dead_letter")]
        );
    }
}
