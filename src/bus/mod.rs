//! RabbitMQ: connections with failover, the topology, the publisher.

pub mod direct;
pub mod dlq;
pub mod management;
pub mod pack;
pub mod publisher;
pub mod topology;

use crate::config::redact_url;
use lapin::{Connection, ConnectionProperties};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("no broker reachable: {}", .attempts.join("; "))]
    Unreachable { attempts: Vec<String> },
    /// Every broker answered and refused us (credentials, permissions,
    /// virtual host): retrying will not help.
    #[error("every broker refused the connection: {}; check the user, password and virtual host in broker.urls", .attempts.join("; "))]
    Refused { attempts: Vec<String> },
    #[error("{0}: no answer from the broker within {1:?}")]
    Timeout(String, Duration),
    #[error("{context}: {source}")]
    Amqp {
        context: String,
        #[source]
        source: lapin::Error,
    },
}

impl BusError {
    pub fn amqp(context: impl Into<String>) -> impl FnOnce(lapin::Error) -> BusError {
        let context = context.into();
        move |source| BusError::Amqp { context, source }
    }
}

/// A broker connection that is closed when dropped: lapin keeps a
/// connection open until it is closed explicitly, and a session that ends
/// early (a missing queue, a failed publish) must not leave one behind.
pub struct Link(Option<Connection>);

impl std::ops::Deref for Link {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.0.as_ref().expect("open until dropped")
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = conn.close(200, "bye".into()).await;
            });
        }
    }
}

/// Connects to the first broker of `urls` that answers, in order.
pub async fn connect(urls: &[String], timeout: Duration, name: &str) -> Result<Link, BusError> {
    let mut attempts = Vec::new();
    let mut refusals = 0;
    for url in urls {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(timeout, Connection::connect(url, props)).await {
            Ok(Ok(conn)) => {
                if attempts.is_empty() {
                    tracing::debug!(broker = %redact_url(url), "connected to RabbitMQ");
                } else {
                    tracing::warn!(broker = %redact_url(url), unreachable = %attempts.join("; "), "connected to RabbitMQ after failing over");
                }
                return Ok(Link(Some(conn)));
            }
            Ok(Err(e)) => {
                if is_refusal(&e) {
                    refusals += 1;
                }
                attempts.push(format!("{}: {e}", redact_url(url)));
            }
            Err(_) => attempts.push(format!("{}: no answer within {timeout:?}", redact_url(url))),
        }
    }
    if refusals == urls.len() {
        Err(BusError::Refused { attempts })
    } else {
        Err(BusError::Unreachable { attempts })
    }
}

/// ACCESS_REFUSED (bad credentials, no permission) or NOT_ALLOWED (no such
/// virtual host).
fn is_refusal(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.get_id(), 403 | 530))
}
