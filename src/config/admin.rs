//! `[admin]`: the sidecar's HTTP listener (health, readiness, metrics, the
//! JSON API), off unless `listen` is set.

use super::Reader;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The environment variable read for tokens when `tokens_env` is not set.
pub const DEFAULT_TOKENS_ENV: &str = "SITESYNC_ADMIN_TOKENS";

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where the listener binds (`127.0.0.1:9464`).
    pub listen: SocketAddr,
    /// A file of tokens, one `name scope secret` per line; refused when
    /// others than its owner may read it.
    pub tokens_file: Option<PathBuf>,
    /// The environment variable holding tokens (`name:scope:secret`,
    /// separated by commas or white space).
    pub tokens_env: String,
    /// The admin URLs of the other sites' sidecars, for the dashboard.
    pub peers: Vec<String>,
    /// Where alerts are posted (JSON), if anywhere.
    pub webhook_url: Option<String>,
    /// How often the alerter looks.
    pub alert_every: std::time::Duration,
    /// TLS: the certificate chain and its key (PEM); both or neither.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The CA certificates (PEM) that `https://` peers' certificates are
    /// checked against, instead of the public roots: a deployment's own CA.
    pub peers_ca: Option<PathBuf>,
}

/// Reads `[admin]` (called only when the section is present); `None`
/// when it has no `listen` (the listener stays off).
pub(super) fn read_admin(r: &mut Reader<'_>) -> Option<AdminConfig> {
    let listen = r.string(
        "listen",
        false,
        "an address and port, e.g. \"127.0.0.1:9464\"",
    );
    let tokens_file = r
        .string("tokens_file", false, "a file path")
        .map(PathBuf::from);
    let tokens_env = r
        .string("tokens_env", false, "an environment variable's name")
        .unwrap_or_else(|| DEFAULT_TOKENS_ENV.to_string());
    let peers = r
        .strings("peers", "a list of URLs, e.g. [\"http://london:9464\"]")
        .unwrap_or_default();
    for p in &peers {
        if !(p.starts_with("http://") || p.starts_with("https://")) {
            r.problem("peers", format!("`{p}` is not an http:// or https:// URL"));
        }
    }
    let webhook_url = r.string("webhook_url", false, "an http:// or https:// URL");
    if let Some(w) = &webhook_url
        && !(w.starts_with("http://") || w.starts_with("https://"))
    {
        r.problem(
            "webhook_url",
            format!("`{w}` is not an http:// or https:// URL"),
        );
    }
    let alert_every = r.millis("alert_every_ms", 15_000, 3_600_000);
    let peers_ca = r
        .string("peers_ca", false, "a PEM file path")
        .map(PathBuf::from);
    let cert = r
        .string("tls_cert", false, "a PEM file path")
        .map(PathBuf::from);
    let key = r
        .string("tls_key", false, "a PEM file path")
        .map(PathBuf::from);
    let tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => {
            r.problem("tls_key", "tls_cert is set: its key is needed too");
            None
        }
        (None, Some(_)) => {
            r.problem("tls_cert", "tls_key is set: its certificate is needed too");
            None
        }
    };
    let listen = listen?;
    match listen.parse::<SocketAddr>() {
        Ok(listen) => Some(AdminConfig {
            listen,
            tokens_file,
            tokens_env,
            peers,
            webhook_url,
            alert_every,
            tls,
            peers_ca,
        }),
        Err(_) => {
            r.problem(
                "listen",
                format!("`{listen}` is not an address and port, e.g. \"127.0.0.1:9464\""),
            );
            None
        }
    }
}
