//! What the admin listener reports about this process: readiness (each
//! part of the sidecar says whether it works, and why not) and the
//! Prometheus exposition of `/metrics`.
//!
//! Readiness is process-wide state: the sidecar registers the parts it
//! runs ([`expect`]), each part reports as it starts, fails and recovers
//! ([`ready`], [`not_ready`]), and `/ready` answers 200 only when every
//! registered part works.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

/// Each part's state: `None` when it works, else why not.
fn parts() -> &'static Mutex<BTreeMap<&'static str, Option<String>>> {
    static PARTS: OnceLock<Mutex<BTreeMap<&'static str, Option<String>>>> = OnceLock::new();
    PARTS.get_or_init(|| Mutex::new(BTreeMap::new()))
}

fn set(part: &'static str, state: Option<String>) {
    let mut parts = parts().lock().unwrap_or_else(|p| p.into_inner());
    parts.insert(part, state);
}

/// The sidecar runs `part` (`source`, `sink`, `archive`): it counts for
/// readiness from now on, not ready until it says so.
pub fn expect(part: &'static str) {
    let mut parts = parts().lock().unwrap_or_else(|p| p.into_inner());
    parts
        .entry(part)
        .or_insert_with(|| Some("starting".to_string()));
}

/// The readiness part of a consumer's role (`sink`, `archive`); another
/// role counts as `other`.
pub fn part(role: &str) -> &'static str {
    match role {
        "sink" => "sink",
        "archive" => "archive",
        _ => "other",
    }
}

/// `part` works (the source streams, a consumer consumes).
pub fn ready(part: &'static str) {
    set(part, None);
}

/// `part` does not work, and why (kept until it works again).
pub fn not_ready(part: &'static str, why: impl Into<String>) {
    set(part, Some(why.into()));
}

/// Every registered part and why it is not ready (`None`: ready).
pub fn readiness() -> Vec<(&'static str, Option<String>)> {
    let parts = parts().lock().unwrap_or_else(|p| p.into_inner());
    parts.iter().map(|(k, v)| (*k, v.clone())).collect()
}

/// The Prometheus text exposition of this process's metrics.
pub fn render() -> String {
    let mut out = String::new();
    out.push_str("# HELP sitesync_up Whether this sidecar's admin listener answers.\n");
    out.push_str("# TYPE sitesync_up gauge\nsitesync_up 1\n");
    out.push_str(
        "# HELP sitesync_part_ready Whether each part of the sidecar works (1) or not (0).\n",
    );
    out.push_str("# TYPE sitesync_part_ready gauge\n");
    for (part, why) in readiness() {
        out.push_str(&format!(
            "sitesync_part_ready{{part=\"{part}\"}} {}\n",
            u8::from(why.is_none())
        ));
    }
    out.push_str("# EOF\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_is_not_ready_until_it_says_so_and_says_why_not() {
        expect("test-part");
        let state = |p: &str| {
            readiness()
                .into_iter()
                .find(|(k, _)| *k == p)
                .map(|(_, v)| v)
        };
        assert_eq!(state("test-part"), Some(Some("starting".into())));
        ready("test-part");
        assert_eq!(state("test-part"), Some(None));
        expect("test-part");
        assert_eq!(state("test-part"), Some(None), "expect keeps a known state");
        not_ready("test-part", "broker: connection refused");
        assert_eq!(
            state("test-part"),
            Some(Some("broker: connection refused".into()))
        );
        assert!(render().contains("sitesync_part_ready{part=\"test-part\"} 0"));
    }
}
