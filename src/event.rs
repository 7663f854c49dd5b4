//! The event: what an outbox row becomes on the bus.
//!
//! Every source decodes its change log into an [`OutboxRow`] (the outbox
//! columns as text, whatever the engine), and [`OutboxRow::to_event`] turns
//! it into an [`Event`] or says, in a [`RowError`], why it cannot: such a row
//! goes to the dead-letter queue with that reason and never stalls the stream.
//!
//! The JSON body is written once, here, and the `data` column is validated
//! without being parsed into a tree ([`RawValue`]): an event's payload is
//! carried through as the application wrote it.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeSet;
use uuid::Uuid;

/// One change of one entity, as it travels between sites.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Globally unique; the AMQP `message_id` and the inbox key at every site.
    pub id: Uuid,
    /// When the origin wrote it (UTC): the first half of last-writer-wins.
    pub timestamp: DateTime<Utc>,
    /// The site that wrote it: the second half of last-writer-wins, and how a
    /// site recognises its own events coming back round.
    pub origin: String,
    /// What happened, e.g. `customer.upsert`: the sink routes on it.
    #[serde(rename = "type")]
    pub kind: String,
    /// The entity the event is about, when the application says so.
    pub entity_key: Option<String>,
    /// The application's payload: a JSON object, kept byte for byte.
    pub data: Box<RawValue>,
    /// The origin's epoch: starts anew when its checkpoint is reset, so that
    /// `seq` may restart without looking like a gap or a replay.
    pub epoch: u64,
    /// Gap-free per-origin number within `epoch`, in commit order. The same
    /// event republished after a crash carries the same number.
    pub seq: u64,
}

impl Event {
    /// The message body.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an Event always serialises")
    }

    /// The event a message body holds (what the sink reads from its
    /// queue, written by anyone who can publish there), or why it is not
    /// one: serde_json's message names the field or the byte at fault.
    pub fn from_body(body: &[u8]) -> Result<Event, String> {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }
}

/// How an origin numbers and times its events, in commit order: the `seq`
/// the next event gets, and the timestamp the last one got. Kept with the
/// checkpoint, so an event republished after a crash gets the same numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub next_seq: u64,
    pub last_ts: Option<DateTime<Utc>>,
}

impl Clock {
    /// An event's timestamp: when it was written, but at least a
    /// microsecond after the origin's previous event, so that timestamps
    /// follow commit order strictly and last-writer-wins on `(timestamp,
    /// origin)` agrees with each origin's own order. (Commit times are
    /// taken before the commit record is ordered in the log: two
    /// transactions committing together can come out a microsecond apart
    /// in the wrong order.)
    pub fn timestamp_for(&self, written: DateTime<Utc>) -> DateTime<Utc> {
        match self.last_ts {
            Some(last) if written <= last => last + chrono::Duration::microseconds(1),
            _ => written,
        }
    }

    /// Moves past the numbers in `taken` that the next event would get
    /// (see [`crate::source::ChangeStream::taken`]), and forgets those
    /// already behind: a number is taken by an earlier event of the same
    /// epoch, which the log no longer shows.
    pub fn skip_taken(&mut self, taken: &mut BTreeSet<u64>) {
        while let Some(&first) = taken.first() {
            if first > self.next_seq {
                break;
            }
            if first == self.next_seq {
                self.next_seq += 1;
            }
            taken.pop_first();
        }
    }

    /// The clock once `event` is published.
    pub fn after(&self, event: &Event) -> Clock {
        Clock {
            next_seq: event.seq + 1,
            last_ts: Some(event.timestamp),
        }
    }
}

/// The outbox columns of one inserted row, as text, before validation.
///
/// Sources fill it from their log; `None` is SQL NULL.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OutboxRow {
    pub id: Option<String>,
    pub created_at: Option<String>,
    pub origin: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub entity_key: Option<String>,
    pub data: Option<String>,
    /// When the transaction committed, from the log: the event's timestamp
    /// (before the clock's adjustment). `created_at` stands in where a log
    /// does not give it.
    #[serde(skip)]
    pub commit_time: Option<DateTime<Utc>>,
}

/// Why an outbox row cannot become an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("column `{0}` is NULL")]
    Null(&'static str),
    #[error("column `id` is `{0}`, not a UUID")]
    BadId(String),
    #[error("column `created_at` is `{0}`, not a timestamp")]
    BadTimestamp(String),
    #[error("column `data` is not valid JSON: {0}")]
    BadJson(String),
    #[error("column `data` is JSON but not an object (events carry a JSON object)")]
    NotAnObject,
    #[error("column `type` is empty")]
    EmptyType,
    #[error("column `origin` is `{row}` but this connector publishes for site `{site}`")]
    ForeignOrigin { row: String, site: String },
    #[error("the row could not be decoded from the log: {0}")]
    Undecodable(String),
    #[error(
        "the event is {bytes} bytes, over broker.max_message_bytes ({limit}); the row itself stays in the outbox table"
    )]
    TooLarge { bytes: usize, limit: usize },
}

impl OutboxRow {
    /// Validates the row and builds the event. `epoch` and `seq` are given by
    /// the caller, which numbers only rows that do become events. The row is
    /// borrowed so that, when it is refused, it can still go whole to the
    /// dead-letter queue.
    pub fn to_event(&self, site: &str, epoch: u64, clock: &Clock) -> Result<Event, RowError> {
        let id_text = self.id.as_deref().ok_or(RowError::Null("id"))?;
        let id =
            Uuid::parse_str(id_text.trim()).map_err(|_| RowError::BadId(id_text.to_string()))?;
        let kind = self.kind.as_deref().ok_or(RowError::Null("type"))?;
        if kind.trim().is_empty() {
            return Err(RowError::EmptyType);
        }
        let origin = match self.origin.as_deref() {
            None => site,
            Some(o) if o == site => o,
            Some(o) => {
                return Err(RowError::ForeignOrigin {
                    row: o.to_string(),
                    site: site.to_string(),
                });
            }
        };
        // The commit time where the log gives it (the last *committed*
        // writer wins), else what the application wrote.
        let written = match (self.commit_time, self.created_at.as_deref()) {
            (Some(commit), _) => commit,
            (None, Some(text)) => {
                parse_timestamp(text).ok_or_else(|| RowError::BadTimestamp(text.to_string()))?
            }
            (None, None) => return Err(RowError::Null("created_at")),
        };
        let timestamp = clock.timestamp_for(written);
        let data_text = self.data.as_deref().ok_or(RowError::Null("data"))?;
        let data: Box<RawValue> =
            serde_json::from_str(data_text).map_err(|e| RowError::BadJson(e.to_string()))?;
        if !data.get().trim_start().starts_with('{') {
            return Err(RowError::NotAnObject);
        }
        Ok(Event {
            id,
            timestamp,
            origin: origin.to_string(),
            kind: kind.to_string(),
            entity_key: self.entity_key.clone(),
            data,
            epoch,
            seq: clock.next_seq,
        })
    }

    /// The row as JSON, for the dead-letter body: nothing the application
    /// wrote is lost, even when it is not valid.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an OutboxRow always serialises")
    }
}

/// Accepts RFC 3339 and the ISO form PostgreSQL, MySQL, SQL Server and
/// Oracle print (`2026-11-23 16:11:28.123456+00`, `…+05:30`, or without a
/// zone, which is read as UTC).
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(text, format) {
            return Some(t.with_timezone(&Utc));
        }
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn clock(next_seq: u64) -> Clock {
        Clock {
            next_seq,
            last_ts: None,
        }
    }

    fn row() -> OutboxRow {
        OutboxRow {
            id: Some("7f1d8a5e-3c2b-4a8e-9f00-0123456789ab".into()),
            created_at: Some("2026-11-23 16:11:28.123456+00".into()),
            origin: Some("PARIS".into()),
            kind: Some("customer.upsert".into()),
            entity_key: Some("42".into()),
            data: Some(r#"{"name": "Zoé", "n": 1}"#.into()),
            commit_time: None,
        }
    }

    #[test]
    fn a_good_row_becomes_an_event_with_its_payload_untouched() {
        let e = row().to_event("PARIS", 7, &clock(3)).unwrap();
        assert_eq!(e.id.to_string(), "7f1d8a5e-3c2b-4a8e-9f00-0123456789ab");
        assert_eq!(e.timestamp.to_rfc3339(), "2026-11-23T16:11:28.123456+00:00");
        assert_eq!(e.data.get(), r#"{"name": "Zoé", "n": 1}"#);
        let body: serde_json::Value = serde_json::from_slice(&e.to_body()).unwrap();
        assert_eq!(body["type"], "customer.upsert");
        assert_eq!(body["epoch"], 7);
        assert_eq!(body["seq"], 3);
        assert_eq!(body["data"]["name"], "Zoé");
        assert_eq!(body["entity_key"], "42");
    }

    #[test]
    fn bad_rows_say_what_is_wrong() {
        let cases: Vec<(OutboxRow, RowError)> = vec![
            (OutboxRow { id: None, ..row() }, RowError::Null("id")),
            (
                OutboxRow {
                    id: Some("nope".into()),
                    ..row()
                },
                RowError::BadId("nope".into()),
            ),
            (
                OutboxRow {
                    kind: None,
                    ..row()
                },
                RowError::Null("type"),
            ),
            (
                OutboxRow {
                    kind: Some(" ".into()),
                    ..row()
                },
                RowError::EmptyType,
            ),
            (
                OutboxRow {
                    data: None,
                    ..row()
                },
                RowError::Null("data"),
            ),
            (
                OutboxRow {
                    data: Some("[1,2]".into()),
                    ..row()
                },
                RowError::NotAnObject,
            ),
            (
                OutboxRow {
                    created_at: Some("yesterday".into()),
                    ..row()
                },
                RowError::BadTimestamp("yesterday".into()),
            ),
            (
                OutboxRow {
                    origin: Some("LONDON".into()),
                    ..row()
                },
                RowError::ForeignOrigin {
                    row: "LONDON".into(),
                    site: "PARIS".into(),
                },
            ),
        ];
        for (row, expected) in cases {
            assert_eq!(row.to_event("PARIS", 1, &clock(1)).unwrap_err(), expected);
        }
        let err = OutboxRow {
            data: Some("{not json".into()),
            ..row()
        }
        .to_event("PARIS", 1, &clock(1))
        .unwrap_err();
        assert!(matches!(err, RowError::BadJson(_)), "{err}");
        assert!(err.to_string().contains("not valid JSON"));
    }

    #[test]
    fn null_origin_is_this_site_and_the_commit_time_wins_over_created_at() {
        let commit = parse_timestamp("2026-01-02T03:04:05Z").unwrap();
        let e = OutboxRow {
            origin: None,
            commit_time: Some(commit),
            ..row()
        }
        .to_event("PARIS", 1, &clock(1))
        .unwrap();
        assert_eq!(e.origin, "PARIS");
        assert_eq!(e.timestamp, commit);
        // Without a commit time (a log that lacks it), created_at it is.
        let e = row().to_event("PARIS", 1, &clock(1)).unwrap();
        assert_eq!(e.timestamp.to_rfc3339(), "2026-11-23T16:11:28.123456+00:00");
    }

    #[test]
    fn timestamps_follow_the_origins_commit_order_strictly() {
        let t = |s: &str| parse_timestamp(s).unwrap();
        let mut c = clock(1);
        // A transaction that committed later with an earlier clock reading
        // is moved just past its predecessor.
        for (written, expected) in [
            ("2026-01-01T00:00:10Z", "2026-01-01T00:00:10Z"),
            ("2026-01-01T00:00:05Z", "2026-01-01T00:00:10.000001Z"),
            ("2026-01-01T00:00:10.000001Z", "2026-01-01T00:00:10.000002Z"),
            ("2026-01-01T00:00:11Z", "2026-01-01T00:00:11Z"),
        ] {
            let e = OutboxRow {
                commit_time: Some(t(written)),
                ..row()
            }
            .to_event("PARIS", 1, &c)
            .unwrap();
            assert_eq!(e.timestamp, t(expected), "written at {written}");
            assert_eq!(e.seq, c.next_seq);
            c = c.after(&e);
        }
        assert_eq!(c.next_seq, 5);
    }

    #[test]
    fn numbers_taken_by_events_not_read_again_are_skipped_in_order() {
        // 10 and 11 went to events whose rows the log forgot, 13 too;
        // 7 is behind the clock already.
        let mut taken = BTreeSet::from([7, 10, 11, 13]);
        let mut c = clock(10);
        c.skip_taken(&mut taken);
        assert_eq!(c.next_seq, 12, "10 and 11 are skipped");
        assert_eq!(taken, BTreeSet::from([13]), "and 7 forgotten");
        let e = row().to_event("PARIS", 1, &c).unwrap();
        assert_eq!(e.seq, 12);
        c = c.after(&e);
        c.skip_taken(&mut taken);
        assert_eq!(c.next_seq, 14);
        assert!(taken.is_empty());
        // Nothing taken: nothing moves.
        c.skip_taken(&mut taken);
        assert_eq!(c.next_seq, 14);
    }

    #[test]
    fn timestamps_in_the_forms_databases_print() {
        let utc = parse_timestamp("2026-11-23T16:11:28Z").unwrap();
        assert_eq!(parse_timestamp("2026-11-23 16:11:28+00"), Some(utc));
        assert_eq!(parse_timestamp("2026-11-23 17:11:28+01:00"), Some(utc));
        assert_eq!(parse_timestamp("2026-11-23 16:11:28"), Some(utc));
        assert_eq!(
            parse_timestamp("2026-11-23 16:11:28.5+00")
                .unwrap()
                .timestamp_millis()
                % 1000,
            500
        );
        assert_eq!(parse_timestamp("23/11/2026"), None);
    }

    /// The body of a real event, as the publisher writes it.
    fn body() -> Vec<u8> {
        row().to_event("PARIS", 7, &clock(3)).unwrap().to_body()
    }

    /// Whether two events say the same, `data` byte for byte.
    fn same(a: &Event, b: &Event) -> bool {
        (
            a.id,
            a.timestamp,
            &a.origin,
            &a.kind,
            &a.entity_key,
            a.epoch,
            a.seq,
        ) == (
            b.id,
            b.timestamp,
            &b.origin,
            &b.kind,
            &b.entity_key,
            b.epoch,
            b.seq,
        ) && a.data.get() == b.data.get()
    }

    /// Whatever a body decodes to, written again, decodes the same.
    fn round_trips(e: &Event) -> Result<(), TestCaseError> {
        let again = Event::from_body(&e.to_body())
            .map_err(|why| TestCaseError::fail(format!("{why}: {e:?}")))?;
        prop_assert!(same(e, &again), "{:?} came back as {:?}", e, again);
        Ok(())
    }

    #[test]
    fn a_body_that_is_not_an_event_says_what_is_wrong() {
        let e = Event::from_body(&body()).unwrap();
        assert_eq!(e.seq, 3);
        for (bad, problem) in [
            (&b"not json"[..], "expected ident"),
            (b"", "EOF while parsing"),
            (b"{}", "missing field `id`"),
            (
                b"\"an event\"",
                "invalid type: string \"an event\", expected struct Event",
            ),
        ] {
            let why = Event::from_body(bad).unwrap_err();
            assert!(why.contains(problem), "{bad:?}: {why}");
        }
        let mut cut = body();
        cut.truncate(cut.len() - 1);
        assert!(Event::from_body(&cut).unwrap_err().contains("EOF"));
    }

    fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
        // Every instant with a four-digit year, to the nanosecond.
        (-62_135_596_800i64..253_402_300_800, 0u32..1_000_000_000)
            .prop_map(|(secs, nanos)| DateTime::from_timestamp(secs, nanos).unwrap())
    }

    fn event() -> impl Strategy<Value = Event> {
        let data = proptest::collection::btree_map(any::<String>(), any::<i64>(), 0..4)
            .prop_map(|m| RawValue::from_string(serde_json::to_string(&m).unwrap()).unwrap());
        (
            any::<u128>(),
            timestamp(),
            any::<String>(),
            any::<String>(),
            any::<Option<String>>(),
            data,
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(id, timestamp, origin, kind, entity_key, data, epoch, seq)| Event {
                    id: Uuid::from_u128(id),
                    timestamp,
                    origin,
                    kind,
                    entity_key,
                    data,
                    epoch,
                    seq,
                },
            )
    }

    proptest! {
        #[test]
        fn events_round_trip_through_their_body(e in event()) {
            let back = Event::from_body(&e.to_body()).unwrap();
            prop_assert!(same(&e, &back), "{:?} came back as {:?}", e, back);
        }

        #[test]
        fn any_bytes_are_an_event_or_say_why(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            match Event::from_body(&bytes) {
                Ok(e) => round_trips(&e)?,
                Err(why) => prop_assert!(!why.is_empty()),
            }
        }

        #[test]
        fn mangled_bodies_are_an_event_or_say_why(
            at in any::<prop::sample::Index>(),
            cut in 0usize..8,
            junk in "[\\x00-\\x7f]{0,6}",
        ) {
            let body = body();
            let at = at.index(body.len());
            let mut mangled = body[..at].to_vec();
            mangled.extend_from_slice(junk.as_bytes());
            mangled.extend_from_slice(&body[(at + cut).min(body.len())..]);
            match Event::from_body(&mangled) {
                Ok(e) => round_trips(&e)?,
                Err(why) => prop_assert!(why.contains(" at line "), "{}", why),
            }
        }

        #[test]
        fn parse_timestamp_never_panics(text in any::<String>()) {
            let _ = parse_timestamp(&text);
        }

        #[test]
        fn timestamps_in_the_forms_databases_print_round_trip(
            t in timestamp(),
            offset_minutes in -(23 * 60 + 59)..(23 * 60 + 59i32),
        ) {
            let zone = chrono::FixedOffset::east_opt(offset_minutes * 60).unwrap();
            let local = t.with_timezone(&zone);
            prop_assume!(local.format("%Y").to_string().len() == 4);
            for text in [
                t.to_rfc3339(),
                local.to_rfc3339(),
                local.format("%Y-%m-%d %H:%M:%S%.f%:z").to_string(),
                t.format("%Y-%m-%d %H:%M:%S%.f").to_string(),
                t.format("%Y-%m-%dT%H:%M:%S%.f+00").to_string(),
            ] {
                prop_assert_eq!(parse_timestamp(&text), Some(t), "{}", text);
            }
        }
    }
}
