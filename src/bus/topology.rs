//! The broker topology: declared idempotently by `sitesync topology
//! declare`, verified by `run` before every checkpoint write.
//!
//! - `sitesync.events`: durable fanout exchange; every event goes there.
//! - `SITE_<NAME>`: one durable quorum queue per site, single active
//!   consumer (a standby sidecar takes over, and order holds), dead-lettering
//!   to the dead-letter exchange.
//! - the archive queue (`SITE_PARIS_HISTO`), bound to the same exchange.
//! - `sitesync.dlx` (fanout) and its quorum queue `sitesync.dlq`.
//!
//! Why verify: `mandatory` makes the broker return a message that reaches no
//! queue at all, but a fanout whose LONDON queue was deleted still "delivers"
//! to the others, and LONDON would silently starve. So the runner checks that
//! every bound queue exists before it moves the checkpoint past anything:
//! when one is missing, publishing stops, the log says which, and once it is
//! back the runner republishes from the checkpoint, so the returning queue
//! gets every event confirmed since the last good check.

use super::BusError;
use super::management::Management;
use crate::checks::Check;
use crate::config::TopologyConfig;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(
        "{kind} `{name}` already exists with different settings: {detail}. Either delete it (its messages are lost: rabbitmqctl delete_{kind} {name}) and run `sitesync topology declare`, or change {file} to match"
    )]
    Inequivalent {
        kind: &'static str,
        name: String,
        detail: String,
        file: String,
    },
    #[error("missing from the broker: {}; publishing is stopped until they are back (run `sitesync topology declare` to recreate them)", .0.join(", "))]
    Missing(Vec<String>),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Arguments of a site or archive queue.
fn bound_queue_args(topology: &TopologyConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(topology.dead_letter_exchange.as_str().into()),
    );
    args
}

/// Arguments of the archive queue: a site queue's, and its bound with
/// the overflow policy when the topology sets one (never otherwise).
fn archive_queue_args(topology: &TopologyConfig) -> FieldTable {
    let mut args = bound_queue_args(topology);
    let bound = &topology.archive_bound;
    if let Some(n) = bound.max_length {
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(n as i64));
    }
    if let Some(n) = bound.max_bytes {
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(n as i64),
        );
    }
    if let Some(o) = bound.overflow.filter(|_| bound.is_set()) {
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString(o.as_str().into()),
        );
    }
    args
}

/// How `topology declare` describes the archive queue.
fn archive_description(topology: &TopologyConfig) -> String {
    let bound = &topology.archive_bound;
    let mut limits = Vec::new();
    if let Some(n) = bound.max_length {
        limits.push(format!("at most {n} messages"));
    }
    if let Some(n) = bound.max_bytes {
        limits.push(format!("at most {n} bytes"));
    }
    let archived = match &topology.archive_site {
        Some(site) => format!("archived by {site}"),
        None => "NOT archived by any site (set archive_site)".to_string(),
    };
    match bound.overflow.filter(|_| bound.is_set()) {
        Some(o) => format!(
            "quorum, single active consumer, archive, {archived}; {}, then {}",
            limits.join(" and "),
            o.as_str()
        ),
        None => format!("quorum, single active consumer, archive, {archived}; unbounded"),
    }
}

/// A plain durable quorum queue's arguments (the dead-letter queue, the
/// archive's queue of gap requests).
pub(crate) fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Turns a 406 PRECONDITION_FAILED into a message that names the argument.
fn declare_error(
    kind: &'static str,
    name: &str,
    topology: &TopologyConfig,
    e: lapin::Error,
) -> TopologyError {
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind() {
        let text = amqp.get_message().to_string();
        if text.contains("PRECONDITION_FAILED") {
            let detail = text
                .split_once(" - ")
                .map(|(_, d)| d.to_string())
                .unwrap_or(text.clone());
            return TopologyError::Inequivalent {
                kind,
                name: name.to_string(),
                detail,
                file: topology.file.display().to_string(),
            };
        }
    }
    TopologyError::Bus(BusError::Amqp {
        context: format!("declaring {kind} {name}"),
        source: e,
    })
}

/// Added to the error of an archive queue declared with other arguments.
const ARCHIVE_BOUND_HINT: &str = " (the archive queue's bound is its arguments x-max-length, x-max-length-bytes and x-overflow, set by archive_max_length, archive_max_bytes and archive_overflow in the topology file: a queue's arguments cannot change once it exists; to bound a queue that holds messages without deleting it, leave those keys out and set a RabbitMQ policy instead, see docs/archive.md)";

async fn channel(conn: &Connection) -> Result<Channel, BusError> {
    conn.create_channel()
        .await
        .map_err(BusError::amqp("opening a channel"))
}

/// Closes a channel that did its work (a failed one is closed already).
async fn close(ch: Channel) {
    let _ = ch.close(200, "done".into()).await;
}

/// Declares everything; returns one line per object. Idempotent.
pub async fn declare(
    conn: &Connection,
    topology: &TopologyConfig,
) -> Result<Vec<String>, TopologyError> {
    declare_objects(conn, topology, true).await
}

/// Declares the exchanges and queues, and with `bind` their bindings.
async fn declare_objects(
    conn: &Connection,
    topology: &TopologyConfig,
    bind: bool,
) -> Result<Vec<String>, TopologyError> {
    let mut done = Vec::new();
    // A failed declare closes its channel: one channel per declaration.
    for (exchange, what) in [
        (&topology.exchange, "event exchange"),
        (&topology.dead_letter_exchange, "dead-letter exchange"),
    ] {
        let ch = channel(conn).await?;
        ch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| declare_error("exchange", exchange, topology, e))?;
        close(ch).await;
        done.push(format!("exchange {exchange} (fanout, durable): {what}"));
    }
    let mut queues: Vec<(String, String, FieldTable, Option<&String>)> = topology
        .bound_queues()
        .into_iter()
        .map(|q| {
            if q == topology.archive_queue {
                (
                    q,
                    archive_description(topology),
                    archive_queue_args(topology),
                    Some(&topology.exchange),
                )
            } else {
                (
                    q,
                    "quorum, single active consumer".to_string(),
                    bound_queue_args(topology),
                    Some(&topology.exchange),
                )
            }
        })
        .collect();
    queues.push((
        topology.dead_letter_queue.clone(),
        "quorum".to_string(),
        quorum_args(),
        Some(&topology.dead_letter_exchange),
    ));
    if topology.archive_site.is_some() {
        // Gap requests to the archiving sidecar, through the default exchange.
        queues.push((
            topology.gap_request_queue(),
            "quorum: gap requests to the archive, not bound".to_string(),
            quorum_args(),
            None,
        ));
    }
    for (queue, what, args, exchange) in queues {
        let ch = channel(conn).await?;
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(|e| {
            let mut err = declare_error("queue", &queue, topology, e);
            if queue == topology.archive_queue
                && let TopologyError::Inequivalent { detail, .. } = &mut err
            {
                detail.push_str(ARCHIVE_BOUND_HINT);
            }
            err
        })?;
        let Some(exchange) = exchange.filter(|_| bind) else {
            close(ch).await;
            done.push(format!("queue {queue} ({what})"));
            continue;
        };
        ch.queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BusError::amqp(format!("binding {queue} to {exchange}")))?;
        close(ch).await;
        done.push(format!("queue {queue} ({what}), bound to {exchange}"));
    }
    Ok(done)
}

/// How long a topology check may wait for the broker.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks with passive declarations that the exchanges and queues the
/// publisher needs exist; nothing is created.
///
/// Every object is asked about at once, each on a channel of its own (a 404
/// closes the channel it happens on), and the channels are kept between
/// checks: the runner verifies before every checkpoint write, so this sits
/// on the path between a confirm and its checkpoint. Give it a connection
/// that does not publish: on a publishing connection the declarations wait
/// behind the message backlog and the broker's flow control.
pub struct Verifier {
    objects: Vec<(&'static str, String)>,
    channels: Vec<Option<Channel>>,
    /// Bindings are checked only through the management API (when configured).
    management: Option<Management>,
    /// (exchange, queues that must be bound to it).
    bindings: Vec<(String, Vec<String>)>,
    /// When a failed binding check was last reported (they are rate-limited).
    warned_at: Option<std::time::Instant>,
}

impl Verifier {
    pub fn new(topology: &TopologyConfig, management: Option<Management>) -> Verifier {
        let mut objects = vec![
            ("exchange", topology.exchange.clone()),
            ("exchange", topology.dead_letter_exchange.clone()),
        ];
        objects.extend(topology.bound_queues().into_iter().map(|q| ("queue", q)));
        objects.push(("queue", topology.dead_letter_queue.clone()));
        let channels = objects.iter().map(|_| None).collect();
        let bindings = vec![
            (topology.exchange.clone(), topology.bound_queues()),
            (
                topology.dead_letter_exchange.clone(),
                vec![topology.dead_letter_queue.clone()],
            ),
        ];
        Verifier {
            objects,
            channels,
            management,
            bindings,
            warned_at: None,
        }
    }

    /// Whether bindings are verified too.
    pub fn checks_bindings(&self) -> bool {
        self.management.is_some()
    }

    /// The objects that are missing, as `queue NAME` / `exchange NAME`.
    pub async fn missing(&mut self, conn: &Connection) -> Result<Vec<String>, BusError> {
        for ch in &mut self.channels {
            if !ch.as_ref().is_some_and(|c| c.status().connected()) {
                *ch = Some(channel(conn).await?);
            }
        }
        let asks = self
            .objects
            .iter()
            .zip(&self.channels)
            .map(|((kind, name), ch)| {
                let ch = ch.as_ref().expect("opened above");
                async move {
                    if *kind == "exchange" {
                        ch.exchange_declare(
                            name.as_str().into(),
                            ExchangeKind::Fanout,
                            ExchangeDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        )
                        .await
                    } else {
                        ch.queue_declare(
                            name.as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        )
                        .await
                        .map(|_| ())
                    }
                }
            });
        let binding_check = self.management.clone().map(|m| {
            let bindings = self.bindings.clone();
            tokio::task::spawn_blocking(move || {
                let mut unbound = Vec::new();
                for (exchange, queues) in &bindings {
                    for q in m.unbound(exchange, queues)? {
                        unbound.push((exchange.clone(), q));
                    }
                }
                Ok::<_, String>(unbound)
            })
        });
        let answers = tokio::time::timeout(CHECK_TIMEOUT, futures_util::future::join_all(asks))
            .await
            .map_err(|_| {
                // The channels may be stuck mid-declaration: start over next time.
                BusError::Timeout("checking the topology".into(), CHECK_TIMEOUT)
            });
        let answers = match answers {
            Ok(answers) => answers,
            Err(e) => {
                self.channels.iter_mut().for_each(|c| *c = None);
                return Err(e);
            }
        };
        let mut missing = Vec::new();
        for (i, answer) in answers.into_iter().enumerate() {
            let (kind, name) = &self.objects[i];
            match answer {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {
                    missing.push(format!("{kind} {name}"));
                    self.channels[i] = None;
                }
                Err(e) => {
                    self.channels[i] = None;
                    return Err(BusError::Amqp {
                        context: format!("checking {kind} {name}"),
                        source: e,
                    });
                }
            }
        }
        if let Some(check) = binding_check {
            match check.await.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok(unbound) => {
                    for (exchange, queue) in unbound {
                        // A deleted queue has no bindings either: say it once.
                        if !missing.contains(&format!("queue {queue}")) {
                            missing
                                .push(format!("binding of queue {queue} to exchange {exchange}"));
                        }
                    }
                }
                Err(e) => {
                    // The management API being down must not stop the sync:
                    // queues are still verified, bindings are not, and we say so.
                    if self
                        .warned_at
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                    {
                        tracing::warn!(error = %e, "bindings could not be verified through the management API (queues still are)");
                        self.warned_at = Some(std::time::Instant::now());
                    }
                }
            }
        }
        Ok(missing)
    }

    /// `Ok` when everything the publisher needs exists.
    pub async fn verify(&mut self, conn: &Connection) -> Result<(), TopologyError> {
        let missing = self.missing(conn).await?;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(TopologyError::Missing(missing))
        }
    }
}

/// The ready messages in `queue` and its consumers (a passive
/// declaration).
pub async fn queue_counts(conn: &Connection, queue: &str) -> Result<(u32, u32), BusError> {
    let ch = channel(conn).await?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BusError::amqp(format!("looking at queue {queue}")))?;
    let _ = ch.close(200, "done".into()).await;
    Ok((q.message_count(), q.consumer_count()))
}

/// The number of ready messages in `queue` (a passive declaration).
pub async fn queue_depth(conn: &Connection, queue: &str) -> Result<u32, BusError> {
    let ch = channel(conn).await?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BusError::amqp(format!("looking at queue {queue}")))?;
    let _ = ch.close(200, "done".into()).await;
    Ok(q.message_count())
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

/// For `sitesync check`: existence, bindings (through the management API
/// when configured: AMQP 0-9-1 cannot list them), then equivalence
/// (re-declaring an existing object with our arguments fails with 406 if
/// they differ). Nothing is created or bound.
pub async fn check(
    conn: &Connection,
    topology: &TopologyConfig,
    management: Option<Management>,
) -> Vec<Check> {
    let mut verifier = Verifier::new(topology, management);
    let missing = match verifier.missing(conn).await {
        Ok(m) => m,
        Err(e) => {
            return vec![Check::fail(
                "topology",
                e.to_string(),
                "check the broker connection",
            )];
        }
    };
    let (unbound, absent): (Vec<String>, Vec<String>) =
        missing.into_iter().partition(|m| m.starts_with("binding "));
    if !absent.is_empty() {
        return vec![Check::fail(
            "topology",
            format!("missing: {}", absent.join(", ")),
            "run `sitesync topology declare`",
        )];
    }
    let bindings = if !verifier.checks_bindings() {
        Check::warn(
            "bindings",
            "not verified: AMQP cannot list bindings, so a queue unbound from the exchange would go unnoticed",
            "set broker.management_url (RabbitMQ management plugin) so that run and check verify bindings",
        )
    } else if unbound.is_empty() {
        Check::pass(
            "bindings",
            "every queue is bound (checked through the management API)",
        )
    } else {
        Check::fail(
            "bindings",
            format!("missing: {}", unbound.join(", ")),
            "run `sitesync topology declare`",
        )
    };
    let objects = match declare_objects(conn, topology, false).await {
        Ok(_) => Check::pass(
            "topology",
            format!(
                "exchange {} with {} bound queue(s), dead letters {} -> {}",
                topology.exchange,
                topology.bound_queues().len(),
                topology.dead_letter_exchange,
                topology.dead_letter_queue
            ),
        ),
        Err(e) => Check::fail("topology", e.to_string(), "see the message"),
    };
    vec![objects, bindings]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_queues_are_quorum_with_single_active_consumer_and_dead_lettering() {
        let t = TopologyConfig {
            file: "t.toml".into(),
            exchange: "e".into(),
            sites: vec!["PARIS".into()],
            site_queue_prefix: "SITE_".into(),
            archive_queue: "SITE_PARIS_HISTO".into(),
            dead_letter_exchange: "dlx".into(),
            dead_letter_queue: "dlq".into(),
            archive_site: None,
            archive_bound: Default::default(),
        };
        let args = bound_queue_args(&t);
        let inner = args.inner();
        assert_eq!(
            inner.get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            inner.get("x-single-active-consumer"),
            Some(&AMQPValue::Boolean(true))
        );
        assert_eq!(
            inner.get("x-dead-letter-exchange"),
            Some(&AMQPValue::LongString("dlx".into()))
        );
    }
}
