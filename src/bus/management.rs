//! Binding checks through the RabbitMQ management HTTP API.
//!
//! AMQP 0-9-1 can tell whether a queue exists (a passive declaration) but
//! not whether it is bound: a site queue unbound from the fanout exchange
//! would silently starve while every publish is still confirmed. The
//! management plugin's HTTP API lists an exchange's bindings, so when
//! `broker.management_url` is set the runner checks them before every
//! checkpoint write, beside the passive declarations.

use crate::config::redact_url;
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
    /// `management_url` may carry credentials (`http://user:pass@host:15672`);
    /// otherwise those of `amqp_url` are used, as is its virtual host.
    pub fn new(management_url: &str, amqp_url: &str) -> Result<Management, String> {
        let amqp: lapin::uri::AMQPUri = amqp_url
            .parse()
            .map_err(|e| format!("`{}` is not an AMQP URL: {e}", redact_url(amqp_url)))?;
        let (scheme, rest) = management_url
            .split_once("://")
            .filter(|(s, _)| *s == "http" || *s == "https")
            .ok_or_else(|| format!("`{}` is not an http(s) URL", redact_url(management_url)))?;
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let (user, password, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (u.to_string(), p.to_string(), host)
            }
            None => (
                amqp.authority.userinfo.username.clone(),
                amqp.authority.userinfo.password.clone(),
                authority,
            ),
        };
        if host.is_empty() {
            return Err(format!("`{}` names no host", redact_url(management_url)));
        }
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Management {
            agent,
            base: format!("{scheme}://{host}{}", path.trim_end_matches('/')),
            authorization: format!("Basic {token}"),
            vhost: segment(&amqp.vhost),
        })
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

    #[test]
    fn credentials_and_vhost_come_from_the_amqp_url_unless_given() {
        let m = Management::new("http://127.0.0.1:15672/", "amqp://app:secret@h:5672/%2f").unwrap();
        assert_eq!(m.base, "http://127.0.0.1:15672");
        assert_eq!(m.vhost, "%2F");
        let expected = base64::engine::general_purpose::STANDARD.encode("app:secret");
        assert_eq!(m.authorization, format!("Basic {expected}"));
        let m = Management::new("https://ops:pw@mq.example:443/rabbit", "amqp://h/prod").unwrap();
        assert_eq!(m.base, "https://mq.example:443/rabbit");
        assert_eq!(m.vhost, "prod");
        let expected = base64::engine::general_purpose::STANDARD.encode("ops:pw");
        assert_eq!(m.authorization, format!("Basic {expected}"));
    }

    #[test]
    fn bad_urls_are_named() {
        assert!(
            Management::new("ftp://x", "amqp://h")
                .unwrap_err()
                .contains("not an http(s) URL")
        );
        assert!(
            Management::new("http://", "amqp://h")
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
