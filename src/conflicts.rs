//! The conflicts a site recorded (`sitesync_conflicts`: each write that
//! lost by last-writer-wins here, with the write that won), listed, and
//! resolved by choosing the losing write after all.
//!
//! # Choosing the losing write
//!
//! `sitesync conflicts choose ID` (or `POST /api/conflicts/choose`) writes
//! the losing payload again, as a **new event** of this site: origin
//! `choice:<SITE>:<conflict id>` (an origin of its own, epoch 1, seq 1, as a
//! resync job's rows are `resync:<SITE>:<job>`, so that this site's own
//! numbering stays gap-free), its time now, published to the fanout with
//! a publisher confirm. Every site, this one included, applies it by the
//! same rule as any event: its time is later than the winner's (it is at
//! least the winner's time plus a microsecond, whatever this server's
//! clock says), so it wins, and every site converges on the chosen write.
//! A write made anywhere after the choice wins over it in turn: the order
//! of last-writer-wins is kept.
//!
//! The event's id is derived from the site, the conflict and the key:
//! choosing the same conflict twice sends the same event, and each inbox
//! applies it once. The conflict is marked reviewed once the broker has
//! confirmed the event.
//!
//! The event's type is the route of this connector that writes the
//! conflict's table: the upsert route when the losing payload carries more
//! than the key, the one route when there is one, else the caller says
//! which (`--type`).

use crate::config::{Operation, Route};
use crate::event::Event;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

pub use crate::purge::{COLUMNS, Conflict, conflict_of, conflicts_of};

/// The origin of the event that writes conflict `id`'s loser again.
pub fn origin(site: &str, id: i64) -> String {
    format!("choice:{site}:{id}")
}

/// Why a choice is refused (nothing was sent).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refused {
    #[error("no conflict {0} here")]
    NotFound(i64),
    #[error("{0}")]
    Route(String),
    #[error("{0}")]
    Data(String),
}

/// The route that writes `c`'s loser again (see the module's docs).
pub fn route_for<'a>(
    routes: &'a [Route],
    c: &Conflict,
    kind: Option<&str>,
) -> Result<&'a Route, Refused> {
    let candidates: Vec<&Route> = routes
        .iter()
        .filter(|r| r.entity_table() == c.entity)
        .collect();
    let names = || {
        candidates
            .iter()
            .map(|r| r.kind.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if candidates.is_empty() {
        return Err(Refused::Route(format!(
            "no route of this connector writes {} (the conflict's table): add it to [sink] routes, or resolve the conflict by hand",
            c.entity
        )));
    }
    if let Some(kind) = kind {
        return candidates
            .iter()
            .find(|r| r.kind == kind)
            .copied()
            .ok_or_else(|| {
                Refused::Route(format!(
                    "the route {kind} does not write {}: choose one of {}",
                    c.entity,
                    names()
                ))
            });
    }
    if let [one] = candidates.as_slice() {
        return Ok(one);
    }
    let fields = c
        .loser_payload
        .as_deref()
        .and_then(|p| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(p).ok())
        .map(|m| m.len())
        .unwrap_or(0);
    let upserts: Vec<&&Route> = candidates
        .iter()
        .filter(|r| r.operation == Operation::Upsert && fields > r.key.len())
        .collect();
    match upserts.as_slice() {
        [one] => Ok(one),
        _ => Err(Refused::Route(format!(
            "more than one route writes {}: say which with the type ({})",
            c.entity,
            names()
        ))),
    }
}

/// The event that writes `c`'s loser again from `site`, at `now` (or
/// just after the winner, if this server's clock is behind it).
pub fn event(
    site: &str,
    c: &Conflict,
    route: &Route,
    now: DateTime<Utc>,
) -> Result<Event, Refused> {
    let payload = c.loser_payload.as_deref().unwrap_or("{}");
    let data = RawValue::from_string(payload.to_string()).map_err(|e| {
        Refused::Data(format!(
            "conflict {}: the losing payload is not JSON ({e})",
            c.id
        ))
    })?;
    let winner = DateTime::parse_from_rfc3339(&c.winner_ts)
        .map_err(|e| {
            Refused::Data(format!(
                "conflict {}: the winner's time `{}` is not RFC 3339 ({e})",
                c.id, c.winner_ts
            ))
        })?
        .with_timezone(&Utc);
    let origin = origin(site, c.id);
    Ok(Event {
        id: crate::resync::event_id(&origin, &c.entity, &c.key),
        timestamp: now.max(winner + chrono::Duration::microseconds(1)),
        kind: route.kind.clone(),
        entity_key: Some(c.key.clone()),
        data,
        epoch: 1,
        seq: 1,
        origin,
    })
}

/// Publishes `event` to the topology's fanout exchange and waits for the
/// broker's confirm.
pub async fn publish(cfg: &crate::config::ConnectorConfig, event: &Event) -> Result<(), String> {
    use lapin::options::BasicPublishOptions;
    let conn = crate::bus::connect(
        &cfg.broker.urls,
        cfg.broker.connect_timeout,
        &format!("sitesync-{}-conflict-choice", cfg.name),
    )
    .await
    .map_err(|e| e.to_string())?;
    let sent = async {
        let ch = crate::sink::control::confirm_channel(&conn)
            .await
            .map_err(|e| e.to_string())?;
        let props = crate::bus::publisher::event_properties(
            event,
            Default::default(),
            &format!("conflict choice {}", event.origin),
        );
        let confirm = ch
            .basic_publish(
                cfg.topology.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &event.to_body(),
                props,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        match confirm.is_nack() {
            true => Err(format!(
                "the broker refused the event (nack) on {}",
                cfg.topology.exchange
            )),
            false => Ok(()),
        }
    }
    .await;
    let _ = conn.close(200, "chosen".into()).await;
    sent
}

/// Why a choice was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    /// Nothing was sent: what is wrong with the request or the row.
    #[error("{0}")]
    Refused(#[from] Refused),
    /// Reading the conflict, publishing or marking it reviewed failed;
    /// running the choice again is harmless (the same event).
    #[error("{0}")]
    Failed(String),
}

/// What a choice sent.
#[derive(Debug)]
pub struct Chosen {
    pub conflict: Conflict,
    pub event: Event,
}

impl Chosen {
    /// The line said and audited.
    pub fn line(&self) -> String {
        format!(
            "conflict {}: {}'s losing write of {} key {} sent again as event {} ({} at {}), over {}'s",
            self.conflict.id,
            self.conflict.loser_origin,
            self.conflict.entity,
            self.conflict.key,
            self.event.id,
            self.event.origin,
            self.event
                .timestamp
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            self.conflict.winner_origin,
        )
    }
}

/// Reads conflict `id` of `cfg`'s site.
pub async fn find<P: crate::purge::Tables>(tables: &P, id: i64) -> Result<Conflict, ChooseError> {
    tables
        .conflicts(1, Some(id))
        .await
        .map_err(|e| ChooseError::Failed(e.to_string()))?
        .pop()
        .ok_or(ChooseError::Refused(Refused::NotFound(id)))
}

/// Chooses conflict `id`'s losing write (see the module's docs): the
/// event published with a confirm, then the conflict marked reviewed.
pub async fn choose<P: crate::purge::Tables>(
    cfg: &crate::config::ConnectorConfig,
    tables: &P,
    id: i64,
    kind: Option<&str>,
) -> Result<Chosen, ChooseError> {
    let conflict = find(tables, id).await?;
    choose_found(cfg, tables, conflict, kind).await
}

/// [`choose`] for a conflict already read (the command line shows it and
/// asks first).
pub async fn choose_found<P: crate::purge::Tables>(
    cfg: &crate::config::ConnectorConfig,
    tables: &P,
    conflict: Conflict,
    kind: Option<&str>,
) -> Result<Chosen, ChooseError> {
    let id = conflict.id;
    let route = route_for(&cfg.sink.routes, &conflict, kind)?;
    let event = event(&cfg.site, &conflict, route, Utc::now())?;
    publish(cfg, &event).await.map_err(|e| {
        ChooseError::Failed(format!(
            "conflict {id}: the event was not confirmed ({e}); choosing it again is harmless"
        ))
    })?;
    tables.review(&[id]).await.map_err(|e| {
        ChooseError::Failed(format!(
            "conflict {id}: the event {} was sent, but the conflict could not be marked reviewed: {e}",
            event.id
        ))
    })?;
    let chosen = Chosen { conflict, event };
    tracing::info!(conflict = id, event = %chosen.event.id, origin = %chosen.event.origin, "the losing write chosen");
    Ok(chosen)
}

/// `sitesync conflicts list`: a table.
pub fn render(conflicts: &[Conflict]) -> String {
    let mut out = format!(
        "{:>6}  {:<24}  {:<16}  {:<10}  {:<27}  {:<10}  {:<27}  {}\n",
        "id", "table", "key", "lost", "lost at (UTC)", "won", "won at (UTC)", "reviewed"
    );
    for c in conflicts {
        out.push_str(&format!(
            "{:>6}  {:<24}  {:<16}  {:<10}  {:<27}  {:<10}  {:<27}  {}\n",
            c.id,
            c.entity,
            c.key,
            c.loser_origin,
            c.loser_ts,
            c.winner_origin,
            c.winner_ts,
            c.reviewed_at.as_deref().unwrap_or("no"),
        ));
    }
    out
}

/// The conflicts as JSON (the losing payload as JSON when it is).
pub fn to_json(conflicts: &[Conflict]) -> serde_json::Value {
    serde_json::Value::Array(
        conflicts
            .iter()
            .map(|c| {
                let mut v = serde_json::to_value(c).unwrap_or_default();
                if let Some(p) = c.loser_payload.as_deref()
                    && let Ok(json) = serde_json::from_str::<serde_json::Value>(p)
                {
                    v["loser_payload"] = json;
                }
                v
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn route(kind: &str, operation: Operation) -> Route {
        Route {
            kind: kind.into(),
            table: "item".into(),
            key: vec!["id".into()],
            operation,
            rename: BTreeMap::new(),
            drop: vec![],
            constants: BTreeMap::new(),
        }
    }

    fn conflict(payload: &str) -> Conflict {
        let mut row: Vec<Option<String>> = [
            "7",
            "public.item",
            "42",
            "0f0e0d0c-0000-0000-0000-000000000001",
            "PARIS",
            "2026-12-04T10:00:00.000001Z",
            payload,
            "0f0e0d0c-0000-0000-0000-000000000002",
            "LONDON",
            "2026-12-04T10:00:01.5Z",
            "2026-12-04T10:00:02Z",
        ]
        .iter()
        .map(|s| Some(s.to_string()))
        .collect();
        row.push(None);
        conflict_of(&row).unwrap()
    }

    #[test]
    fn the_upsert_route_is_chosen_for_a_full_payload_and_the_caller_decides_otherwise() {
        let mut routes = vec![
            route("item.upsert", Operation::Upsert),
            route("item.delete", Operation::Delete),
        ];
        let full = conflict(r#"{"id": 42, "n": 1}"#);
        assert_eq!(route_for(&routes, &full, None).unwrap().kind, "item.upsert");
        let key_only = conflict(r#"{"id": 42}"#);
        let err = route_for(&routes, &key_only, None).unwrap_err().to_string();
        assert!(err.contains("item.upsert, item.delete"), "{err}");
        assert_eq!(
            route_for(&routes, &key_only, Some("item.delete"))
                .unwrap()
                .kind,
            "item.delete"
        );
        assert!(route_for(&routes, &full, Some("other.upsert")).is_err());
        routes.pop();
        assert_eq!(
            route_for(&routes, &key_only, None).unwrap().kind,
            "item.upsert"
        );
        routes.clear();
        assert!(
            route_for(&routes, &full, None)
                .unwrap_err()
                .to_string()
                .contains("no route")
        );
    }

    #[test]
    fn the_event_is_later_than_the_winner_whatever_the_clock_and_the_same_each_time() {
        let c = conflict(r#"{"id": 42, "n": 1}"#);
        let r = route("item.upsert", Operation::Upsert);
        let now: DateTime<Utc> = "2026-12-04T11:00:00Z".parse().unwrap();
        let e = event("LONDON", &c, &r, now).unwrap();
        assert_eq!(e.origin, "choice:LONDON:7");
        assert_eq!((e.epoch, e.seq), (1, 1));
        assert_eq!(e.timestamp, now);
        assert_eq!(e.data.get(), r#"{"id": 42, "n": 1}"#);
        assert_eq!(e.entity_key.as_deref(), Some("42"));
        let behind: DateTime<Utc> = "2026-12-04T09:00:00Z".parse().unwrap();
        let late = event("LONDON", &c, &r, behind).unwrap();
        assert_eq!(
            late.timestamp,
            "2026-12-04T10:00:01.500001Z"
                .parse::<DateTime<Utc>>()
                .unwrap()
        );
        assert_eq!(late.id, e.id, "the same conflict, the same event");
        assert_ne!(event("PARIS", &c, &r, now).unwrap().id, e.id);
        let bad = conflict("{not json");
        assert!(matches!(
            event("LONDON", &bad, &r, now),
            Err(Refused::Data(_))
        ));
        let mut short = vec![Some("1".to_string()); 11];
        assert!(conflict_of(&short).is_err());
        short.push(None);
        short[1] = None;
        assert!(conflict_of(&short).unwrap_err().contains("entity"));
    }
}
