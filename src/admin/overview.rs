//! `GET /api/overview`: every site of the deployment at once, for the
//! dashboard. This sidecar answers for itself and asks each of its peers
//! (`[admin] peers`) with the caller's own token, in parallel, each within
//! [`PEER_TIMEOUT`]: a peer that does not answer is marked so, with why,
//! and the others are shown anyway.
//!
//! Asking the peers from the server (rather than from the page) keeps the
//! page on one origin: no cross-origin requests, no token sent anywhere
//! but to the sites themselves.

use serde_json::{Value, json};
use std::time::Duration;

/// How long a peer may take to answer one request.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// The jobs listed per site.
pub const JOBS: usize = 20;

/// The conflicts listed per site.
pub const CONFLICTS: usize = 10;

/// How this sidecar reaches its peers: plain HTTP, or HTTPS checked
/// against the public roots or, with `[admin] peers_ca`, the deployment's
/// own CA.
#[derive(Clone, Default)]
pub struct PeerTls(Option<std::sync::Arc<Vec<ureq::tls::Certificate<'static>>>>);

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(roots) => write!(f, "PeerTls({} CA certificate(s))", roots.len()),
            None => write!(f, "PeerTls(public roots)"),
        }
    }
}

impl PeerTls {
    /// From `[admin] peers_ca`; an error names the file.
    pub fn load(admin: Option<&crate::config::AdminConfig>) -> Result<PeerTls, String> {
        match admin.and_then(|a| a.peers_ca.as_deref()) {
            Some(file) => Ok(PeerTls(Some(std::sync::Arc::new(super::tls::peer_roots(
                file,
            )?)))),
            None => Ok(PeerTls(None)),
        }
    }

    /// An agent that answers any status and gives up after `timeout`.
    pub fn agent(&self, timeout: Duration) -> ureq::Agent {
        let mut b = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false);
        if let Some(roots) = &self.0 {
            b = b.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::Specific(roots.clone()))
                    .build(),
            );
        }
        b.build().into()
    }
}

/// What one peer answers, or why it does not: its `/ready`, `/api/status`,
/// `/api/jobs`, `/api/conflicts`, a summary of `/metrics` (its own site only; the dead-letter queue is the
/// deployment's, listed once by this sidecar).
pub async fn peer(url: String, authorization: Option<String>, tls: PeerTls) -> Value {
    tokio::task::spawn_blocking(move || ask(&url, authorization.as_deref(), &tls))
        .await
        .unwrap_or_else(|e| json!({ "answered": false, "error": e.to_string() }))
}

fn ask(url: &str, authorization: Option<&str>, tls: &PeerTls) -> Value {
    let agent = tls.agent(PEER_TIMEOUT);
    let base = url.trim_end_matches('/');
    let get = |path: &str| -> Result<(u16, Value), String> {
        let mut req = agent.get(&format!("{base}{path}"));
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        let mut r = req.call().map_err(|e| e.to_string())?;
        let code = r.status().as_u16();
        let text = r.body_mut().read_to_string().map_err(|e| e.to_string())?;
        Ok((
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    };
    let (_, ready) = match get("/ready") {
        Ok(r) => r,
        Err(e) => {
            return json!({ "url": url, "answered": false, "error": format!("no answer: {e}") });
        }
    };
    let mut out = json!({ "url": url, "answered": true, "ready": ready });
    for (key, path) in [
        ("status", "/api/status".to_string()),
        ("jobs", format!("/api/jobs?limit={JOBS}")),
        ("conflicts", format!("/api/conflicts?limit={CONFLICTS}")),
    ] {
        match get(&path) {
            Ok((200, v)) => out[key] = v,
            Ok((code, v)) => {
                out["error"] = Value::String(format!(
                    "{path}: {code} {}",
                    v.get("error").and_then(Value::as_str).unwrap_or("")
                ))
            }
            Err(e) => out["error"] = Value::String(format!("{path}: {e}")),
        }
    }
    match get("/metrics") {
        Ok((200, Value::String(text))) => out["metrics"] = crate::metrics::summary(&text),
        Ok((code, _)) => out["error"] = Value::String(format!("/metrics: {code}")),
        Err(e) => out["error"] = Value::String(format!("/metrics: {e}")),
    }
    if let Some(site) = out["status"]["site"].as_str() {
        out["site"] = Value::String(site.to_string());
    }
    out
}
