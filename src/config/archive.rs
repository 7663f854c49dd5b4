//! The archive's settings: a connector's `[archive]` section (this sidecar
//! consumes the topology's archive queue into a table of its database) and
//! the topology keys that name the archiving site and bound the queue.

use super::Reader;
use std::time::Duration;

/// `[archive]`: this sidecar also consumes the archive queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveConfig {
    /// `[schema.]table`; `None`: `sitesync_archive` beside the outbox (the
    /// engine knows the outbox's schema).
    pub table: Option<String>,
    /// Unacknowledged messages the broker may send ahead.
    pub prefetch: u16,
    /// A batch closes at this many messages…
    pub batch_size: usize,
    /// …or this long after its first message…
    pub batch_timeout: Duration,
    /// …or after a lull this long.
    pub batch_idle: Duration,
    /// Send each origin an `archived` receipt per batch.
    pub receipts: bool,
    /// Archive rows received longer ago than this many days are purged
    /// (`crate::purge`; default 90, the seed's golden-source window).
    pub retention_days: u32,
}

/// `[archive] retention_days` when not set.
pub const DEFAULT_ARCHIVE_RETENTION_DAYS: u32 = 90;

/// The table name every engine uses when `[archive] table` is not set.
pub const DEFAULT_ARCHIVE_TABLE: &str = "sitesync_archive";

impl ArchiveConfig {
    /// The archive table: `table`, or `sitesync_archive` in `schema` (the
    /// outbox's), or unqualified when `schema` is `None`.
    pub fn table_in(&self, schema: Option<&str>) -> String {
        match (&self.table, schema) {
            (Some(t), _) => t.clone(),
            (None, Some(s)) => format!("{s}.{DEFAULT_ARCHIVE_TABLE}"),
            (None, None) => DEFAULT_ARCHIVE_TABLE.to_string(),
        }
    }
}

/// Reads `[archive]` (called only when the section is present).
pub(super) fn read_archive(r: &mut Reader<'_>) -> ArchiveConfig {
    let table = r.string(
        "table",
        false,
        "a table name, e.g. \"public.sitesync_archive\"",
    );
    if let Some(t) = &table
        && !t.split('.').all(super::is_sql_name)
    {
        r.problem(
            "table",
            format!(
                "`{t}` is not a table name: expected [schema.]table with letters, digits and _"
            ),
        );
    }
    ArchiveConfig {
        table,
        prefetch: r
            .integer("prefetch", 1..=65_535, "a number of messages")
            .unwrap_or(2000) as u16,
        batch_size: r
            .integer("batch_size", 1..=10_000, "a number of messages")
            .unwrap_or(500) as usize,
        batch_timeout: r.millis("batch_timeout_ms", 200, 60_000),
        batch_idle: r.millis("batch_idle_ms", 5, 60_000),
        receipts: r.boolean("receipts").unwrap_or(false),
        retention_days: super::read_days(r, "retention_days", DEFAULT_ARCHIVE_RETENTION_DAYS),
    }
}

/// What RabbitMQ does when a bounded archive queue is full (`x-overflow`;
/// quorum queues take these two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The oldest archive messages are dropped (dead-lettered, as the
    /// queue has a dead-letter exchange): the sites go on publishing.
    DropHead,
    /// New messages are refused: the publisher is nacked, and a site
    /// republishes until the archive has room, so every site stalls.
    RejectPublish,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
        }
    }
}

/// A bound on the archive queue, only when the topology sets one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ArchiveBound {
    /// `x-max-length`: messages.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: bytes of message bodies.
    pub max_bytes: Option<u64>,
    /// `x-overflow`; set exactly when a bound is.
    pub overflow: Option<Overflow>,
}

impl ArchiveBound {
    pub fn is_set(&self) -> bool {
        self.max_length.is_some() || self.max_bytes.is_some()
    }
}

/// Reads the topology's `archive_site`, `archive_max_length`,
/// `archive_max_bytes` and `archive_overflow`.
pub(super) fn read_topology_archive(r: &mut Reader<'_>) -> (Option<String>, ArchiveBound) {
    let site = r.string(
        "archive_site",
        false,
        "the site whose connector has an [archive] section, e.g. \"PARIS\"",
    );
    let max_length = r
        .integer("archive_max_length", 1..=i64::MAX, "a number of messages")
        .map(|n| n as u64);
    let max_bytes = r
        .integer("archive_max_bytes", 1..=i64::MAX, "a size in bytes")
        .map(|n| n as u64);
    let overflow = match r
        .string(
            "archive_overflow",
            false,
            "\"drop-head\" or \"reject-publish\"",
        )
        .as_deref()
    {
        None => None,
        Some("drop-head") => Some(Overflow::DropHead),
        Some("reject-publish") => Some(Overflow::RejectPublish),
        Some(other) => {
            r.problem(
                "archive_overflow",
                format!("`{other}` is not an overflow policy of a quorum queue; expected \"drop-head\" or \"reject-publish\""),
            );
            None
        }
    };
    let bound = ArchiveBound {
        max_length,
        max_bytes,
        overflow,
    };
    if bound.is_set() && overflow.is_none() && !r.has_problem("archive_overflow") {
        r.problem(
            "archive_overflow",
            "missing: a bounded archive queue needs its policy when full, \"drop-head\" (archive events are lost, the sites go on) or \"reject-publish\" (the sites stall until the archive drains); see docs/archive.md",
        );
    }
    if !bound.is_set() && overflow.is_some() {
        r.problem(
            "archive_overflow",
            "set without a bound: add archive_max_length or archive_max_bytes, or remove it",
        );
    }
    (site, bound)
}
