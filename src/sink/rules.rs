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

/// What the messages of a batch did to the origins' progress.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tracked {
    /// The origins whose `(epoch, highest seq)` moved, each once.
    pub changed: Vec<String>,
    /// Ranges skipped over by this batch, less the late arrivals of the
    /// same batch that fell in them.
    pub gaps: Vec<Gap>,
    /// Arrivals at or below their origin's highest seq, or of an older
    /// epoch, that no gap of this batch holds: each may fall in a gap
    /// recorded before (a requeued, redelivered or replayed event), which
    /// must then shrink ([`shrink`]). Duplicates land here too.
    pub late: Vec<Seen>,
}

/// Moves each origin's `(epoch, highest seq)` over the messages seen, in
/// order. A new epoch starts at seq 1; a seq past the next one leaves a
/// gap; a seq at or below the highest (a duplicate, a message requeued
/// from the dead-letter queue or redelivered after another consumer
/// released it, an event replayed to fill a gap) does not move the
/// progress but is an arrival all the same: it is taken out of any gap
/// that holds it, so that a gap always means exactly "these events have
/// not arrived here".
pub fn track(state: &mut BTreeMap<String, (u64, u64)>, seen: &[&Seen]) -> Tracked {
    let mut t = Tracked::default();
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
            if !close_in(&mut t.gaps, s) {
                t.late.push((*s).clone());
            }
            continue;
        }
        if s.seq > from {
            t.gaps.push(Gap {
                origin: s.origin.clone(),
                epoch: s.epoch,
                from,
                to: s.seq - 1,
            });
        }
        state.insert(s.origin.clone(), (s.epoch, s.seq));
        if !t.changed.contains(&s.origin) {
            t.changed.push(s.origin.clone());
        }
    }
    t
}

/// Takes `s` out of the gap of `gaps` that holds it, if one does (a range
/// of one goes, a range cut in the middle becomes two).
fn close_in(gaps: &mut Vec<Gap>, s: &Seen) -> bool {
    let Some(i) = gaps.iter().position(|g| {
        g.origin == s.origin && g.epoch == s.epoch && g.from <= s.seq && s.seq <= g.to
    }) else {
        return false;
    };
    let g = gaps.remove(i);
    let pieces = cut(g.from, g.to, &[s.seq]);
    for (k, (from, to)) in pieces.into_iter().enumerate() {
        let piece = Gap {
            from,
            to,
            ..g.clone()
        };
        gaps.insert(i + k, piece);
    }
    true
}

/// What is left of the range `from..=to` once the `seqs` (sorted, each
/// once) are taken out of it: the pieces in order, none if all arrived.
pub fn cut(from: u64, to: u64, seqs: &[u64]) -> Vec<(u64, u64)> {
    let mut pieces = Vec::new();
    let mut next = from;
    for &s in seqs.iter().filter(|s| (from..=to).contains(*s)) {
        if s > next {
            pieces.push((next, s - 1));
        }
        next = s.saturating_add(1);
        if s == u64::MAX {
            return pieces;
        }
    }
    if next <= to {
        pieces.push((next, to));
    }
    pieces
}

/// A gap as a database holds it: its row id, first and last seq.
pub type GapRow = (i64, u64, u64);

/// How the recorded gaps of one origin and epoch change when the `seqs`
/// arrive late: for each row that holds some of them, what is left of it
/// (empty: the row goes; one piece: the row shrinks; more: the row keeps
/// the first piece and each other piece is a new row with the same
/// detection time and state). Rows that hold none are not listed.
pub fn shrink(rows: &[GapRow], seqs: &[u64]) -> Vec<(i64, Vec<(u64, u64)>)> {
    let mut seqs = seqs.to_vec();
    seqs.sort_unstable();
    seqs.dedup();
    rows.iter()
        .filter(|(_, from, to)| seqs.iter().any(|s| from <= s && s <= to))
        .map(|&(id, from, to)| (id, cut(from, to, &seqs)))
        .collect()
}

/// The late arrivals of a batch by `(origin, epoch)`, in order: the seqs
/// of each, and their lowest and highest (what an engine reads its gap
/// rows for, under lock, before [`shrink`]).
pub fn late_by_origin(late: &[Seen]) -> Vec<LateArrivals> {
    let mut by: BTreeMap<(String, u64), Vec<u64>> = BTreeMap::new();
    for s in late {
        by.entry((s.origin.clone(), s.epoch))
            .or_default()
            .push(s.seq);
    }
    by.into_iter()
        .map(|((origin, epoch), mut seqs)| {
            seqs.sort_unstable();
            seqs.dedup();
            LateArrivals {
                origin,
                epoch,
                low: seqs[0],
                high: seqs[seqs.len() - 1],
                seqs,
            }
        })
        .collect()
}

/// One origin-and-epoch's late arrivals in a batch ([`late_by_origin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateArrivals {
    pub origin: String,
    pub epoch: u64,
    pub low: u64,
    pub high: u64,
    /// Sorted, each once.
    pub seqs: Vec<u64>,
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
        let t = track(&mut state, &refs);
        assert_eq!(t.changed, vec!["P".to_string()]);
        // 3 arrived late in the same batch: only 4 is missing.
        assert_eq!(
            t.gaps,
            vec![Gap {
                origin: "P".into(),
                epoch: 1,
                from: 4,
                to: 4
            }]
        );
        // The second 5 is a duplicate: late, for the recorded gaps to see.
        assert_eq!(t.late, vec![seen("P", 1, 5)]);
        assert_eq!(state["P"], (1, 6));
        // A new epoch restarts at 1; an old epoch changes nothing.
        let msgs = [
            seen("P", 0, 99),
            seen("P", 2, 1),
            seen("P", 2, 2),
            seen("L", 7, 3),
        ];
        let refs: Vec<&Seen> = msgs.iter().collect();
        let t = track(&mut state, &refs);
        assert_eq!(state["P"], (2, 2));
        assert_eq!(
            t.late,
            vec![seen("P", 0, 99)],
            "an old epoch's event may fill an old gap"
        );
        assert_eq!(
            t.gaps,
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
        let t = track(&mut state, &refs);
        assert_eq!(t.changed, vec!["P".to_string()]);
        assert_eq!(
            t.gaps.iter().map(|g| (g.from, g.to)).collect::<Vec<_>>(),
            [(1, 3), (5, u64::MAX - 1)],
            "1..u64::MAX-1 never arrived but 4, late"
        );
        assert_eq!(state["P"], (1, u64::MAX));
        assert_eq!(
            cut(u64::MAX - 1, u64::MAX, &[u64::MAX]),
            [(u64::MAX - 1, u64::MAX - 1)]
        );
        assert_eq!(cut(5, u64::MAX, &[u64::MAX]), [(5, u64::MAX - 1)]);
    }

    #[test]
    fn a_late_arrival_cuts_its_seq_out_of_the_gap_that_holds_it() {
        // The case found by hand: MADRID 1762 released unacked by another
        // consumer came back after 1763 and was applied, yet its gap row
        // stayed. A late seq now shrinks, splits or removes the gap.
        let mut state = BTreeMap::from([("M".to_string(), (1, 1761))]);
        let first = [seen("M", 1, 1763), seen("M", 1, 1764)];
        let t = track(&mut state, &first.iter().collect::<Vec<_>>());
        assert_eq!((t.gaps[0].from, t.gaps[0].to), (1762, 1762));
        let later = [seen("M", 1, 1762), seen("M", 1, 1765)];
        let t = track(&mut state, &later.iter().collect::<Vec<_>>());
        assert!(t.gaps.is_empty());
        assert_eq!(t.late, vec![seen("M", 1, 1762)]);
        assert_eq!(late_by_origin(&t.late)[0].seqs, [1762]);

        let rows = [(7, 1762, 1762), (8, 10, 20), (9, 30, 31)];
        assert_eq!(
            shrink(&rows, &[1762]),
            [(7, vec![])],
            "the one-event gap goes"
        );
        assert_eq!(
            shrink(&rows, &[15, 10, 15, 20, 40]),
            [(8, vec![(11, 14), (16, 19)])],
            "a cut in the middle splits; rows holding none are untouched"
        );
        assert_eq!(shrink(&rows, &[30]), [(9, vec![(31, 31)])]);
        assert!(shrink(&rows, &[1, 25, 1763]).is_empty());
    }

    #[test]
    fn late_arrivals_group_by_origin_and_epoch() {
        let late = [
            seen("P", 1, 9),
            seen("L", 2, 4),
            seen("P", 1, 3),
            seen("P", 1, 9),
            seen("P", 0, 5),
        ];
        let g = late_by_origin(&late);
        let keys: Vec<_> = g
            .iter()
            .map(|l| (l.origin.as_str(), l.epoch, l.low, l.high))
            .collect();
        assert_eq!(keys, [("L", 2, 4, 4), ("P", 0, 5, 5), ("P", 1, 3, 9)]);
        assert_eq!(g[2].seqs, [3, 9]);
    }
}
