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
    let listen = listen?;
    match listen.parse::<SocketAddr>() {
        Ok(listen) => Some(AdminConfig {
            listen,
            tokens_file,
            tokens_env,
            peers,
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
