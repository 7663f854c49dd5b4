//! The engine-free rules of the sink: last-writer-wins between an event,
//! the entity's stored version and this site's own writes still in its
//! outbox; and per-origin progress with gap detection. Every target (one
//! file per engine) feeds its rows through these, so that all engines
//! decide alike.

use super::mapping::Entity;
use super::{Outcome, Seen};
use crate::event::Event;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use uuid::Uuid;

/// An entity's version: the last-writer-wins key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub ts: DateTime<Utc>,
    pub origin: String,
}

/// Who holds an entity's current version.
#[derive(Debug, Clone)]
enum Holder {
    /// An event applied earlier (or in this batch).
    Event(Uuid),
    /// A write of this site still in its outbox: its event has not come back.
    Local { id: Uuid },
}

/// A write of this site still in its outbox (its event has not come back).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalWrite {
    /// Its commit time (or created_at) and this site.
    pub version: Version,
    /// The outbox row's id: the event id it will travel under.
    pub id: Uuid,
    pub payload: Value,
}

/// A losing write, for `sitesync_conflicts`.
#[derive(Debug, Clone)]
pub struct Conflict {
    pub loser: Uuid,
    pub entity: Entity,
    pub loser_version: Version,
    pub loser_payload: Value,
    pub winner: Uuid,
    pub winner_version: Version,
}

/// Per-batch decisions of last-writer-wins, kept apart from SQL so they can
/// be tested alone.
#[derive(Debug, Default)]
pub struct Decisions {
    pub applied: Vec<bool>,
    pub conflicts: Vec<Conflict>,
    /// The version each entity ends on, when an event of the batch wrote it.
    pub versions: BTreeMap<Entity, (Version, Uuid)>,
}

/// Decides, in order, which events apply. `stored` holds the entities'
/// versions from `sitesync_versions`; `local` this site's writes still in
/// the outbox, per entity.
pub fn decide(
    events: &[(&Event, &Entity)],
    stored: &HashMap<Entity, (Version, Uuid)>,
    local: &HashMap<Entity, Vec<LocalWrite>>,
) -> Decisions {
    let mut d = Decisions::default();
    let mut current: HashMap<&Entity, (Version, Holder)> = HashMap::new();
    let mut recorded: HashSet<Uuid> = HashSet::new();
    for (event, entity) in events {
        let cur = current.entry(entity).or_insert_with(|| {
            let mut best: Option<(Version, Holder)> = stored
                .get(*entity)
                .map(|(v, id)| (v.clone(), Holder::Event(*id)));
            for w in local.get(*entity).into_iter().flatten() {
                if best.as_ref().is_none_or(|(b, _)| w.version > *b) {
                    best = Some((w.version.clone(), Holder::Local { id: w.id }));
                }
            }
            best.unwrap_or((
                Version {
                    ts: DateTime::<Utc>::MIN_UTC,
                    origin: String::new(),
                },
                Holder::Event(Uuid::nil()),
            ))
        });
        let version = Version {
            ts: event.timestamp,
            origin: event.origin.clone(),
        };
        if version > cur.0 {
            // Local writes not yet propagated that this event overrides lose.
            for w in local.get(*entity).into_iter().flatten() {
                if w.version < version && recorded.insert(w.id) {
                    d.conflicts.push(Conflict {
                        loser: w.id,
                        entity: (*entity).clone(),
                        loser_version: w.version.clone(),
                        loser_payload: w.payload.clone(),
                        winner: event.id,
                        winner_version: version.clone(),
                    });
                }
            }
            *cur = (version.clone(), Holder::Event(event.id));
            d.versions.insert((*entity).clone(), (version, event.id));
            d.applied.push(true);
        } else {
            let winner = match &cur.1 {
                Holder::Event(id) | Holder::Local { id, .. } => *id,
            };
            if recorded.insert(event.id) {
                d.conflicts.push(Conflict {
                    loser: event.id,
                    entity: (*entity).clone(),
                    loser_version: version,
                    loser_payload: serde_json::from_str(event.data.get()).unwrap_or(Value::Null),
                    winner,
                    winner_version: cur.0.clone(),
                });
            }
            d.applied.push(false);
        }
    }
    d
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub origin: String,
    pub epoch: u64,
    pub from: u64,
    pub to: u64,
}

/// Moves each origin's `(epoch, highest seq)` over the messages seen, in
/// order; returns the origins that changed and the gaps found. A new epoch
/// starts at seq 1; a seq at or below the highest (a duplicate, or a
/// message requeued from the dead-letter queue) changes nothing.
pub fn track(state: &mut BTreeMap<String, (u64, u64)>, seen: &[&Seen]) -> (Vec<String>, Vec<Gap>) {
    let mut changed = Vec::new();
    let mut gaps = Vec::new();
    for s in seen {
        let (from, moved) = match state.get(&s.origin) {
            None => (1, true),
            Some(&(epoch, _)) if s.epoch > epoch => (1, true),
            Some(&(epoch, _)) if s.epoch < epoch => (0, false),
            // Saturating: a message claiming seq u64::MAX (anyone who can
            // publish can write one) must not overflow the next one.
            Some(&(_, seq)) => (seq.saturating_add(1), s.seq > seq),
        };
        if !moved {
            continue;
        }
        if s.seq > from {
            gaps.push(Gap {
                origin: s.origin.clone(),
                epoch: s.epoch,
                from,
                to: s.seq - 1,
            });
        }
        state.insert(s.origin.clone(), (s.epoch, s.seq));
        if !changed.contains(&s.origin) {
            changed.push(s.origin.clone());
        }
    }
    (changed, gaps)
}

/// Each applied-through-a-route event's outcome, in batch order: a
/// duplicate when the inbox had it already (`is_new` false), else applied
/// or lost as [`decide`] said (one decision per new event, in order).
pub fn outcomes(is_new: impl IntoIterator<Item = bool>, applied: &[bool]) -> Vec<Outcome> {
    let mut applied = applied.iter();
    is_new
        .into_iter()
        .map(|new| {
            if !new {
                Outcome::Duplicate
            } else if *applied.next().expect("one decision per fresh event") {
                Outcome::Applied
            } else {
                Outcome::Lost
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn ev(id: u128, origin: &str, ts: i64) -> Event {
        Event {
            id: Uuid::from_u128(id),
            timestamp: DateTime::from_timestamp(ts, 0).unwrap(),
            origin: origin.into(),
            kind: "t".into(),
            entity_key: None,
            data: RawValue::from_string(format!("{{\"v\": {id}}}")).unwrap(),
            epoch: 1,
            seq: id as u64,
        }
    }

    fn entity(key: &str) -> Entity {
        Entity {
            table: "t".into(),
            key: key.into(),
        }
    }

    fn version(origin: &str, ts: i64) -> Version {
        Version {
            ts: DateTime::from_timestamp(ts, 0).unwrap(),
            origin: origin.into(),
        }
    }

    #[test]
    fn the_higher_timestamp_wins_and_the_loser_is_recorded() {
        let k = entity("1");
        let (a, b, c) = (ev(1, "PARIS", 10), ev(2, "LONDON", 5), ev(3, "MADRID", 20));
        let d = decide(
            &[(&a, &k), (&b, &k), (&c, &k)],
            &HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(d.applied, vec![true, false, true]);
        assert_eq!(d.conflicts.len(), 1);
        assert_eq!(d.conflicts[0].loser, b.id);
        assert_eq!(d.conflicts[0].winner, a.id);
        assert_eq!(d.versions[&k], (version("MADRID", 20), c.id));
    }

    #[test]
    fn equal_timestamps_are_ordered_by_origin() {
        let k = entity("1");
        let (a, b) = (ev(1, "LONDON", 10), ev(2, "PARIS", 10));
        let d = decide(&[(&b, &k), (&a, &k)], &HashMap::new(), &HashMap::new());
        assert_eq!(
            d.applied,
            vec![true, false],
            "PARIS > LONDON at the same instant"
        );
    }

    #[test]
    fn every_arrival_order_ends_on_the_same_winner() {
        let k = entity("1");
        let events = [
            ev(1, "PARIS", 10),
            ev(2, "LONDON", 12),
            ev(3, "MADRID", 11),
            ev(4, "PARIS", 12),
        ];
        let orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]];
        for order in orders {
            let list: Vec<(&Event, &Entity)> = order.iter().map(|&i| (&events[i], &k)).collect();
            let d = decide(&list, &HashMap::new(), &HashMap::new());
            assert_eq!(d.versions[&k].1, events[3].id, "order {order:?}");
        }
    }

    #[test]
    fn a_stored_version_and_a_local_write_count() {
        let k = entity("1");
        let stored = HashMap::from([(k.clone(), (version("PARIS", 10), Uuid::from_u128(9)))]);
        let older = ev(1, "LONDON", 9);
        let d = decide(&[(&older, &k)], &stored, &HashMap::new());
        assert_eq!(d.applied, vec![false]);
        assert_eq!(d.conflicts[0].winner, Uuid::from_u128(9));

        // A local write not yet propagated, newer than the incoming event.
        let local = HashMap::from([(
            k.clone(),
            vec![LocalWrite {
                version: version("MADRID", 15),
                id: Uuid::from_u128(7),
                payload: Value::Null,
            }],
        )]);
        let mid = ev(2, "PARIS", 12);
        let d = decide(&[(&mid, &k)], &stored, &local);
        assert_eq!(d.applied, vec![false]);
        assert_eq!(d.conflicts[0].loser, mid.id);
        assert_eq!(d.conflicts[0].winner, Uuid::from_u128(7));

        // Older than the incoming event: the local write loses, recorded once.
        let newer = ev(3, "PARIS", 20);
        let newest = ev(4, "PARIS", 21);
        let d = decide(&[(&newer, &k), (&newest, &k)], &stored, &local);
        assert_eq!(d.applied, vec![true, true]);
        assert_eq!(d.conflicts.len(), 1);
        assert_eq!(d.conflicts[0].loser, Uuid::from_u128(7));
        assert_eq!(d.conflicts[0].winner, newer.id);
    }

    fn seen(origin: &str, epoch: u64, seq: u64) -> Seen {
        Seen {
            origin: origin.into(),
            epoch,
            seq,
        }
    }

    #[test]
    fn gaps_duplicates_requeues_and_epochs() {
        let mut state = BTreeMap::new();
        let msgs = [
            seen("P", 1, 1),
            seen("P", 1, 2),
            seen("P", 1, 5),
            seen("P", 1, 3),
            seen("P", 1, 5),
            seen("P", 1, 6),
        ];
        let refs: Vec<&Seen> = msgs.iter().collect();
        let (changed, gaps) = track(&mut state, &refs);
        assert_eq!(changed, vec!["P".to_string()]);
        assert_eq!(
            gaps,
            vec![Gap {
                origin: "P".into(),
                epoch: 1,
                from: 3,
                to: 4
            }]
        );
        assert_eq!(state["P"], (1, 6));
        // A new epoch restarts at 1; an old epoch changes nothing.
        let msgs = [
            seen("P", 0, 99),
            seen("P", 2, 1),
            seen("P", 2, 2),
            seen("L", 7, 3),
        ];
        let refs: Vec<&Seen> = msgs.iter().collect();
        let (_, gaps) = track(&mut state, &refs);
        assert_eq!(state["P"], (2, 2));
        assert_eq!(
            gaps,
            vec![Gap {
                origin: "L".into(),
                epoch: 7,
                from: 1,
                to: 2
            }]
        );
    }

    #[test]
    fn a_message_claiming_the_last_seq_does_not_overflow_the_next() {
        // Found reading what the sink does with a decoded event's numbers:
        // `seq + 1` overflowed (a panic in debug builds) on the message
        // after one with seq u64::MAX from the same origin and epoch.
        let mut state = BTreeMap::new();
        let msgs = [
            seen("P", 1, u64::MAX),
            seen("P", 1, 4),
            seen("P", 1, u64::MAX),
        ];
        let refs: Vec<&Seen> = msgs.iter().collect();
        let (changed, gaps) = track(&mut state, &refs);
        assert_eq!(changed, vec!["P".to_string()]);
        assert_eq!(gaps.len(), 1, "1..u64::MAX-1 never arrived");
        assert_eq!(state["P"], (1, u64::MAX));
    }
}
