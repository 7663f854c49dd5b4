//! Alerts to a webhook (`[admin] webhook_url`): every
//! [`AlertConfig::every`] the sidecar looks at its own site (its jobs, its
//! gaps, its readiness) and at its peers' `/ready` (which needs no token),
//! and posts each alert that starts (`"status": "firing"`) and each that
//! ends (`"resolved"`), as JSON, retried with backoff. The dashboard shows
//! the same conditions on its page.
//!
//! | alert | when |
//! |---|---|
//! | `site_down` | a peer's admin listener does not answer |
//! | `not_ready` | this site or a peer answers `/ready` with 503 |
//! | `job_failed` | one of this site's latest jobs ended `failed` (once per job) |
//! | `gap_not_in_archive` | a gap here that the archive said it lacks |

use super::Site;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// One alert: a stable key (so that it fires once and resolves once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub key: String,
    pub alert: &'static str,
    pub site: String,
    pub message: String,
}

/// The alerts of one look: this site's status and jobs, and each peer's
/// readiness (`Err`: it did not answer).
pub fn evaluate(
    site: &str,
    ready: &Value,
    status: Option<&Value>,
    jobs: Option<&Value>,
    peers: &[(String, Result<Value, String>)],
) -> Vec<Alert> {
    let mut out = Vec::new();
    let not_ready = |site: &str, ready: &Value| -> Option<Alert> {
        if ready["ready"] == true {
            return None;
        }
        let why: Vec<String> = ready["parts"]
            .as_object()
            .map(|p| {
                p.iter()
                    .filter(|(_, w)| *w != "ok")
                    .map(|(k, w)| format!("{k}: {}", w.as_str().unwrap_or("?")))
                    .collect()
            })
            .unwrap_or_default();
        Some(Alert {
            key: format!("not_ready:{site}"),
            alert: "not_ready",
            site: site.to_string(),
            message: format!("{site} is not ready: {}", why.join("; ")),
        })
    };
    out.extend(not_ready(site, ready));
    for g in status
        .and_then(|s| s["gaps"].as_array())
        .into_iter()
        .flatten()
    {
        if let Some(note) = g["note"].as_str() {
            out.push(Alert {
                key: format!(
                    "gap:{site}:{}:{}:{}",
                    g["origin"], g["epoch"], g["from_seq"]
                ),
                alert: "gap_not_in_archive",
                site: site.to_string(),
                message: format!(
                    "{site}: gap {} seq {}..{}: {note}",
                    g["origin"].as_str().unwrap_or("?"),
                    g["from_seq"],
                    g["to_seq"]
                ),
            });
        }
    }
    for j in jobs.and_then(Value::as_array).into_iter().flatten() {
        if j["state"] == "failed" {
            out.push(Alert {
                key: format!("job:{site}:{}", j["id"].as_str().unwrap_or("?")),
                alert: "job_failed",
                site: site.to_string(),
                message: format!(
                    "{site}: {} job failed: {}",
                    j["kind"].as_str().unwrap_or("?"),
                    j["result"]
                        .as_str()
                        .or(j["last_error"].as_str())
                        .unwrap_or("")
                ),
            });
        }
    }
    for (name, answer) in peers {
        match answer {
            Err(e) => out.push(Alert {
                key: format!("site_down:{name}"),
                alert: "site_down",
                site: name.clone(),
                message: format!("{name} does not answer: {e}"),
            }),
            Ok(ready) => out.extend(not_ready(name, ready)),
        }
    }
    out
}

/// What changed since the last look: alerts that start, alerts that end.
#[derive(Debug, Default)]
pub struct Active(BTreeMap<String, Alert>);

impl Active {
    pub fn update(&mut self, now: Vec<Alert>) -> (Vec<Alert>, Vec<Alert>) {
        let mut next = BTreeMap::new();
        let mut firing = Vec::new();
        for a in now {
            if !self.0.contains_key(&a.key) {
                firing.push(a.clone());
            }
            next.insert(a.key.clone(), a);
        }
        let resolved = self
            .0
            .iter()
            .filter(|(k, _)| !next.contains_key(*k))
            .map(|(_, a)| a.clone())
            .collect();
        self.0 = next;
        (firing, resolved)
    }
}

/// How the alerter runs.
#[derive(Debug, Clone)]
pub struct AlertConfig {
    pub webhook: String,
    pub every: Duration,
    pub peers: Vec<String>,
    pub tls: super::overview::PeerTls,
}

/// Attempts per webhook call, and the first retry's delay (doubling).
pub const ATTEMPTS: u32 = 4;
pub const FIRST_RETRY: Duration = Duration::from_millis(500);

/// Posts `body` to `url`, retried; the last error when every attempt failed.
async fn post(url: &str, body: Value) -> Result<(), String> {
    let mut delay = FIRST_RETRY;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let (u, b) = (url.to_string(), body.to_string());
        let sent = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .http_status_as_error(false)
                .build()
                .into();
            match agent
                .post(&u)
                .header("Content-Type", "application/json")
                .send(b.as_bytes())
            {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("answered {}", r.status())),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        match sent {
            Ok(()) => return Ok(()),
            Err(e) => last = format!("attempt {attempt}: {e}"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    Err(last)
}

/// A peer's `/ready` (no token needed), or why it did not answer.
async fn peer_ready(url: String, tls: super::overview::PeerTls) -> (String, Result<Value, String>) {
    let u = url.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let agent = tls.agent(super::overview::PEER_TIMEOUT);
        let mut r = agent
            .get(&format!("{}/ready", u.trim_end_matches('/')))
            .call()
            .map_err(|e| e.to_string())?;
        let text = r.body_mut().read_to_string().map_err(|e| e.to_string())?;
        serde_json::from_str::<Value>(&text).map_err(|e| format!("{e}: {text}"))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    (url, answer)
}

/// Looks every `cfg.every` and posts what starts and ends, until
/// `shutdown`. `names` gives each peer URL the site it last said it was.
pub async fn run(
    site: String,
    own: &dyn Site,
    cfg: AlertConfig,
    names: &std::sync::Mutex<std::collections::HashMap<String, String>>,
    mut shutdown: crate::runner::Shutdown,
) {
    let mut active = Active::default();
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(cfg.every) => {}
        }
        let (status, jobs, peers) = tokio::join!(
            own.status(),
            own.jobs(super::overview::JOBS, None),
            futures_util::future::join_all(
                cfg.peers
                    .iter()
                    .map(|p| peer_ready(p.clone(), cfg.tls.clone()))
            )
        );
        // Each peer by its site's name: what its /ready says, or what it
        // said last time.
        let peers: Vec<(String, Result<Value, String>)> = {
            let mut names = names.lock().unwrap_or_else(|p| p.into_inner());
            peers
                .into_iter()
                .map(|(url, r)| {
                    if let Some(site) = r.as_ref().ok().and_then(|v| v["site"].as_str()) {
                        names.insert(url.clone(), site.to_string());
                    }
                    (names.get(&url).cloned().unwrap_or(url), r)
                })
                .collect()
        };
        let ready = super::readiness(&site).1;
        let now = evaluate(
            &site,
            &ready,
            status.as_ref().ok(),
            jobs.as_ref().ok(),
            &peers,
        );
        let (firing, resolved) = active.update(now);
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        for (status, alerts) in [("firing", firing), ("resolved", resolved)] {
            for a in alerts {
                let body = json!({
                    "status": status,
                    "alert": a.alert,
                    "site": a.site,
                    "message": a.message,
                    "from": site,
                    "at": at,
                });
                match post(&cfg.webhook, body).await {
                    Ok(()) => {
                        tracing::info!(alert = a.alert, site = %a.site, status, "alert sent to the webhook")
                    }
                    Err(e) => {
                        tracing::warn!(alert = a.alert, site = %a.site, status, error = %e, "the webhook refused an alert after {ATTEMPTS} attempts")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_fire_once_and_resolve_once() {
        let ready = json!({ "ready": true, "parts": { "sink": "ok" } });
        let status = json!({ "gaps": [
            { "origin": "MADRID", "epoch": 1, "from_seq": 1, "to_seq": 2, "note": "not in the archive" },
            { "origin": "PARIS", "epoch": 1, "from_seq": 7, "to_seq": 7, "note": null },
        ]});
        let jobs = json!([
            { "id": "a", "kind": "resync", "state": "failed", "result": "broker gone" },
            { "id": "b", "kind": "purge", "state": "succeeded" },
        ]);
        let peers = vec![
            ("PARIS".to_string(), Err("connection refused".to_string())),
            (
                "MADRID".to_string(),
                Ok(json!({ "ready": false, "parts": { "source": "standby" } })),
            ),
        ];
        let now = evaluate("LONDON", &ready, Some(&status), Some(&jobs), &peers);
        let kinds: Vec<&str> = now.iter().map(|a| a.alert).collect();
        assert_eq!(
            kinds,
            vec!["gap_not_in_archive", "job_failed", "site_down", "not_ready"]
        );
        assert!(now[3].message.contains("source: standby"), "{:?}", now[3]);
        assert!(now[1].message.contains("broker gone"));
        let mut active = Active::default();
        let (firing, resolved) = active.update(now.clone());
        assert_eq!((firing.len(), resolved.len()), (4, 0));
        let (firing, resolved) = active.update(now.clone());
        assert_eq!((firing.len(), resolved.len()), (0, 0), "no repeat");
        let (firing, resolved) = active.update(now[..2].to_vec());
        assert_eq!(firing.len(), 0);
        let gone: Vec<&str> = resolved.iter().map(|a| a.alert).collect();
        assert_eq!(gone, vec!["not_ready", "site_down"]);
    }
}
