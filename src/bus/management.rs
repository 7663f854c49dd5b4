//! Binding checks through the RabbitMQ management HTTP API.
//!
//! AMQP 0-9-1 can tell whether a queue exists (a passive declaration) but
//! not whether it is bound: a site queue unbound from the fanout exchange
//! would silently starve while every publish is still confirmed. The
//! management plugin's HTTP API lists an exchange's bindings, so when
//! `broker.management_url` is set the runner checks them before every
//! checkpoint write, beside the passive declarations.

use crate::config::{BrokerConfig, ManagementApi};
use base64::Engine;
use std::collections::HashSet;
use std::time::Duration;

/// A client for the management API of one broker (cluster).
#[derive(Debug, Clone)]
pub struct Management {
    agent: ureq::Agent,
    /// `http(s)://host:port`, without credentials or trailing slash.
    base: String,
    authorization: String,
    /// Percent-encoded virtual host.
    vhost: String,
}

/// Percent-encodes one path segment (everything but unreserved characters).
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Management {
    /// A client for the API that `broker.management_url` names (parsed
    /// and checked when the connector file was loaded).
    pub fn new(api: &ManagementApi) -> Management {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", api.user, api.password));
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        Management {
            agent,
            base: api.base.clone(),
            authorization: format!("Basic {token}"),
            vhost: segment(&api.vhost),
        }
    }

    /// The client for a connector's broker, when it names a management API.
    pub fn of(broker: &BrokerConfig) -> Option<Management> {
        broker.management.as_ref().map(Management::new)
    }

    /// GET `url` with the credentials: the status and the body.
    fn get(&self, url: &str) -> Result<(ureq::http::StatusCode, String), String> {
        let mut response = self
            .agent
            .get(url)
            .header("Authorization", &self.authorization)
            .call()
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("GET {url}: reading the answer: {e}"))?;
        Ok((status, body))
    }

    /// The broker's version (`/api/overview`). Blocking.
    pub fn version(&self) -> Result<String, String> {
        let url = format!("{}/api/overview", self.base);
        let (_, body) = self.get(&url)?;
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["rabbitmq_version"].as_str().map(str::to_string))
            .ok_or_else(|| format!("GET {url}: no rabbitmq_version in the answer"))
    }

    /// The queues among `queues` that `exchange` has no binding to.
    /// Blocking: call it from `spawn_blocking`.
    pub fn unbound(&self, exchange: &str, queues: &[String]) -> Result<Vec<String>, String> {
        let url = format!(
            "{}/api/exchanges/{}/{}/bindings/source",
            self.base,
            self.vhost,
            segment(exchange)
        );
        let (status, body) = self.get(&url)?;
        if !status.is_success() {
            return Err(format!(
                "GET {url}: HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            ));
        }
        let bindings: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("GET {url}: not JSON: {e}"))?;
        let bound: HashSet<&str> = bindings
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["destination_type"] == "queue")
            .filter_map(|b| b["destination"].as_str())
            .collect();
        Ok(queues
            .iter()
            .filter(|q| !bound.contains(q.as_str()))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client from the two URLs, as a connector file gives them.
    fn client(management_url: &str, amqp_url: &str) -> Result<Management, String> {
        ManagementApi::parse(management_url, amqp_url).map(|api| Management::new(&api))
    }

    #[test]
    fn credentials_and_vhost_come_from_the_amqp_url_unless_given() {
        let m = client("http://127.0.0.1:15672/", "amqp://app:secret@h:5672/%2f").unwrap();
        assert_eq!(m.base, "http://127.0.0.1:15672");
        assert_eq!(m.vhost, "%2F");
        let expected = base64::engine::general_purpose::STANDARD.encode("app:secret");
        assert_eq!(m.authorization, format!("Basic {expected}"));
        let m = client("https://ops:pw@mq.example:443/rabbit", "amqp://h/prod").unwrap();
        assert_eq!(m.base, "https://mq.example:443/rabbit");
        assert_eq!(m.vhost, "prod");
        let expected = base64::engine::general_purpose::STANDARD.encode("ops:pw");
        assert_eq!(m.authorization, format!("Basic {expected}"));
    }

    #[test]
    fn bad_urls_are_named() {
        assert!(
            client("ftp://x", "amqp://h")
                .unwrap_err()
                .contains("not an http(s) URL")
        );
        assert!(
            client("http://", "amqp://h")
                .unwrap_err()
                .contains("no host")
        );
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(segment("sitesync.events"), "sitesync.events");
        assert_eq!(segment("/"), "%2F");
        assert_eq!(segment("a b#c"), "a%20b%23c");
    }
}
