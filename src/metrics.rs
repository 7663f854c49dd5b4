//! What the admin listener reports about this process: readiness (each
//! part of the sidecar says whether it works, and why not) and the
//! Prometheus exposition of `/metrics`.
//!
//! Readiness is process-wide state: the sidecar registers the parts it
//! runs ([`expect`]), each part reports as it starts, fails and recovers
//! ([`ready`], [`not_ready`]), and `/ready` answers 200 only when every
//! registered part works.
//!
//! The metrics live in one process-global `prometheus-client` registry
//! ([`get`]). The hot path touches only atomics: a labelled series is
//! looked up once per `(origin, type)` and kept by its caller
//! ([`ByOriginType`]), so counting an event allocates nothing. Gauges that
//! are ages (`*_age_seconds`) are computed on scrape from the instant
//! stored by the hot path. Label cardinality is bounded by the topology:
//! `origin` (a site) and `type` (an event type of the routes), nothing
//! per event or per entity.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

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

/// Labels of what a source reads and publishes: the event type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

/// Labels of what a sink receives: the origin site and the event type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginType {
    pub origin: String,
    pub r#type: String,
}

/// Labels of a per-origin histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabel {
    pub origin: String,
}

/// Labels of a readiness part.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartLabel {
    part: String,
}

/// Labels of a job kind (`replay`, `resync`, `purge`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Labels of the broker connection (`publisher`, `sink`, `archive`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    pub connection: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms … ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn batch_histogram() -> Histogram {
    // 1 … 4096 messages.
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// Every metric of the process (see `docs/operations.md`, "Metrics").
pub struct Metrics {
    registry: Registry,
    /// Outbox rows read from the change log, by type (`""`: a row that
    /// is not an event).
    pub read: Family<TypeLabel, Counter>,
    /// Events handed to the broker.
    pub published: Family<TypeLabel, Counter>,
    /// Events the broker confirmed.
    pub confirmed: Family<TypeLabel, Counter>,
    /// Rows that could not become events, sent to the dead-letter queue.
    pub source_dead_letters: Counter,
    /// Publish to confirm of one event.
    pub confirm_latency: Histogram,
    /// Unix time of the last change read (the age is computed on scrape).
    last_change: AtomicU64,
    /// Unix time of the last checkpoint written.
    last_checkpoint: AtomicU64,
    source_idle: Gauge<f64, std::sync::atomic::AtomicU64>,
    checkpoint_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Events applied at this site's sink, by origin and type.
    pub applied: Family<OriginType, Counter>,
    /// Events the inbox already held.
    pub duplicate: Family<OriginType, Counter>,
    /// Events last-writer-wins decided against (a conflict recorded).
    pub lost: Family<OriginType, Counter>,
    /// Messages the sink sent to the dead-letter queue.
    pub sink_dead_letters: Family<OriginType, Counter>,
    /// Applied time − event timestamp, by origin.
    pub e2e_latency: HistogramFamily<OriginLabel>,
    /// Messages per batch the sink applies.
    pub batch_size: Histogram,
    /// One batch's transaction, retries included.
    pub apply_time: Histogram,
    /// Messages ready in this site's queue (a passive declare).
    pub queue_messages: Gauge,
    /// Consumers of this site's queue.
    pub queue_consumers: Gauge,
    /// Messages in the dead-letter queue.
    pub dlq_messages: Gauge,
    /// Gaps this site's sink has open (events of an origin not seen).
    pub gaps_open: Gauge,
    /// Rows in this site's outbox: events not yet published and confirmed
    /// (read with `status` by the admin listener at a scrape).
    pub outbox_backlog: Gauge,
    /// Conflicts recorded here (`sitesync_conflicts`, until purged).
    pub conflicts_recorded: Gauge,
    /// Bytes of the change log the source is behind (PostgreSQL: the
    /// slot's confirmed position to the server's WAL end); absent where
    /// the engine gives no byte count.
    pub source_lag_bytes: Gauge,
    /// Whether each broker connection is up.
    pub broker_connected: Family<ConnectionLabel, Gauge>,
    /// Broker connections opened again after a failure.
    pub broker_reconnects: Family<ConnectionLabel, Counter>,
    /// Units done and to do of the running job of each kind.
    pub job_done: Family<KindLabel, Gauge>,
    pub job_size: Family<KindLabel, Gauge>,
    /// Jobs that ended failed, by kind.
    pub jobs_failed: Family<KindLabel, Counter>,
    part_ready: Family<PartLabel, Gauge>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("sitesync");
        let m = Metrics {
            read: Family::default(),
            published: Family::default(),
            confirmed: Family::default(),
            source_dead_letters: Counter::default(),
            confirm_latency: latency_histogram(),
            last_change: AtomicU64::new(0),
            last_checkpoint: AtomicU64::new(0),
            source_idle: Gauge::default(),
            checkpoint_age: Gauge::default(),
            applied: Family::default(),
            duplicate: Family::default(),
            lost: Family::default(),
            sink_dead_letters: Family::default(),
            e2e_latency: Family::new_with_constructor(latency_histogram),
            batch_size: batch_histogram(),
            apply_time: latency_histogram(),
            queue_messages: Gauge::default(),
            queue_consumers: Gauge::default(),
            dlq_messages: Gauge::default(),
            gaps_open: Gauge::default(),
            outbox_backlog: Gauge::default(),
            conflicts_recorded: Gauge::default(),
            source_lag_bytes: Gauge::default(),
            broker_connected: Family::default(),
            broker_reconnects: Family::default(),
            job_done: Family::default(),
            job_size: Family::default(),
            jobs_failed: Family::default(),
            part_ready: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "source_events_read",
            "Outbox rows read from the change log, by event type",
            m.read.clone(),
        );
        r.register(
            "source_events_published",
            "Events handed to the broker, by event type",
            m.published.clone(),
        );
        r.register(
            "source_events_confirmed",
            "Events the broker confirmed, by event type",
            m.confirmed.clone(),
        );
        r.register(
            "source_dead_letters",
            "Outbox rows that could not become events, sent to the dead-letter queue",
            m.source_dead_letters.clone(),
        );
        r.register_with_unit(
            "publish_confirm",
            "Time from publishing an event to its broker confirm",
            Unit::Seconds,
            m.confirm_latency.clone(),
        );
        r.register_with_unit(
            "source_idle",
            "Time since the source last read a change (0 before the first)",
            Unit::Seconds,
            m.source_idle.clone(),
        );
        r.register_with_unit(
            "checkpoint_age",
            "Time since the checkpoint last moved (0 before the first)",
            Unit::Seconds,
            m.checkpoint_age.clone(),
        );
        r.register(
            "sink_events_applied",
            "Events applied to this site's database, by origin and type",
            m.applied.clone(),
        );
        r.register(
            "sink_events_duplicate",
            "Events the inbox already held (delivered again), by origin and type",
            m.duplicate.clone(),
        );
        r.register(
            "sink_events_lost",
            "Events last-writer-wins decided against (conflicts), by origin and type",
            m.lost.clone(),
        );
        r.register(
            "sink_dead_letters",
            "Messages the sink sent to the dead-letter queue, by origin and type",
            m.sink_dead_letters.clone(),
        );
        r.register_with_unit(
            "end_to_end_latency",
            "Applied time minus the event's timestamp, by origin",
            Unit::Seconds,
            m.e2e_latency.clone(),
        );
        r.register(
            "sink_batch_messages",
            "Messages in one batch the sink applies",
            m.batch_size.clone(),
        );
        r.register_with_unit(
            "sink_batch_apply",
            "Time to apply one batch (its transaction, retries included)",
            Unit::Seconds,
            m.apply_time.clone(),
        );
        r.register(
            "queue_messages",
            "Messages ready in this site's queue (passive declare)",
            m.queue_messages.clone(),
        );
        r.register(
            "queue_consumers",
            "Consumers of this site's queue (passive declare)",
            m.queue_consumers.clone(),
        );
        r.register(
            "dlq_messages",
            "Messages in the dead-letter queue (passive declare)",
            m.dlq_messages.clone(),
        );
        r.register(
            "gaps_open",
            "Gaps this site's sink has open (events of an origin it has not seen)",
            m.gaps_open.clone(),
        );
        r.register(
            "outbox_backlog",
            "Rows in this site's outbox: events not yet published and confirmed (read at a scrape, at most every 5 s)",
            m.outbox_backlog.clone(),
        );
        r.register(
            "conflicts_recorded",
            "Conflicts recorded at this site (sitesync_conflicts, until purged; read at a scrape, at most every 5 s)",
            m.conflicts_recorded.clone(),
        );
        r.register_with_unit(
            "source_lag",
            "Change log the source is behind the server's end (PostgreSQL: WAL bytes; read at a scrape, at most every 5 s)",
            Unit::Bytes,
            m.source_lag_bytes.clone(),
        );
        r.register(
            "broker_connected",
            "Whether each broker connection is open (1) or not (0)",
            m.broker_connected.clone(),
        );
        r.register(
            "broker_reconnects",
            "Broker connections opened again after one failed",
            m.broker_reconnects.clone(),
        );
        r.register(
            "job_done",
            "Units done of the running job of each kind",
            m.job_done.clone(),
        );
        r.register(
            "job_size",
            "Units to do of the running job of each kind (0: unknown)",
            m.job_size.clone(),
        );
        r.register(
            "jobs_failed",
            "Jobs that ended failed, by kind",
            m.jobs_failed.clone(),
        );
        let up = Gauge::<i64>::default();
        up.set(1);
        r.register("up", "Whether this sidecar's admin listener answers", up);
        r.register(
            "part_ready",
            "Whether each part of the sidecar works (1) or not (0)",
            m.part_ready.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// A change was read from the log just now.
    pub fn changed(&self) {
        self.last_change.store(now_secs(), Ordering::Relaxed);
    }

    /// The checkpoint moved just now.
    pub fn checkpointed(&self) {
        self.last_checkpoint.store(now_secs(), Ordering::Relaxed);
    }

    fn age(at: &AtomicU64, now: u64) -> f64 {
        match at.load(Ordering::Relaxed) {
            0 => 0.0,
            t => now.saturating_sub(t) as f64,
        }
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The state gauge and the reconnect counter of a broker connection
/// (`publisher`, `sink`, `archive`); not for the hot path.
pub fn connection(name: &str) -> (Gauge, Counter) {
    let label = ConnectionLabel {
        connection: name.to_string(),
    };
    let m = get();
    (
        m.broker_connected.get_or_create_owned(&label),
        m.broker_reconnects.get_or_create_owned(&label),
    )
}

/// The progress gauges (done, total) of the running job of `kind`.
pub fn job(kind: &str) -> (Gauge, Gauge) {
    let label = KindLabel {
        kind: kind.to_string(),
    };
    let m = get();
    (
        m.job_done.get_or_create_owned(&label),
        m.job_size.get_or_create_owned(&label),
    )
}

/// A job of `kind` ended failed.
pub fn job_failed(kind: &str) {
    get()
        .jobs_failed
        .get_or_create(&KindLabel {
            kind: kind.to_string(),
        })
        .inc();
}

/// Series of a `(origin, type)` family resolved once: the caller keeps
/// one, and counting a known pair takes two map lookups by `&str`.
pub struct ByOriginType<M: 'static, C: 'static = fn() -> M> {
    family: &'static Family<OriginType, M, C>,
    cache: HashMap<String, HashMap<String, M>>,
}

impl<M: Clone, C: MetricConstructor<M>> ByOriginType<M, C> {
    pub fn new(family: &'static Family<OriginType, M, C>) -> Self {
        ByOriginType {
            family,
            cache: HashMap::new(),
        }
    }

    pub fn get(&mut self, origin: &str, kind: &str) -> &M {
        if !self.cache.get(origin).is_some_and(|m| m.contains_key(kind)) {
            let series = self.family.get_or_create_owned(&OriginType {
                origin: origin.to_string(),
                r#type: kind.to_string(),
            });
            self.cache
                .entry(origin.to_string())
                .or_default()
                .insert(kind.to_string(), series);
        }
        &self.cache[origin][kind]
    }
}

/// Series of a `type` family resolved once (see [`ByOriginType`]).
pub struct ByType<M: 'static> {
    family: &'static Family<TypeLabel, M>,
    cache: HashMap<String, M>,
}

impl<M: Clone + Default + 'static> ByType<M> {
    pub fn new(family: &'static Family<TypeLabel, M>) -> Self {
        ByType {
            family,
            cache: HashMap::new(),
        }
    }

    pub fn get(&mut self, kind: &str) -> &M {
        if !self.cache.contains_key(kind) {
            let series = self.family.get_or_create_owned(&TypeLabel {
                r#type: kind.to_string(),
            });
            self.cache.insert(kind.to_string(), series);
        }
        &self.cache[kind]
    }
}

/// The OpenMetrics exposition of this process's metrics (what `/metrics`
/// serves, and what Prometheus asks for).
pub fn render() -> String {
    let m = get();
    let now = now_secs();
    m.source_idle.set(Metrics::age(&m.last_change, now));
    m.checkpoint_age.set(Metrics::age(&m.last_checkpoint, now));
    for (part, why) in readiness() {
        m.part_ready
            .get_or_create(&PartLabel {
                part: part.to_string(),
            })
            .set(i64::from(why.is_none()));
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &m.registry)
        .expect("writing to a String does not fail");
    out
}

/// Sets the gauges read from `sitesync status` (the admin listener reads
/// it at a scrape, at most every [`STATUS_EVERY`]).
/// `status` is `SiteStatus::to_json`'s.
pub fn site_status(status: &serde_json::Value) {
    let m = get();
    if let Some(n) = status["outbox_backlog"].as_i64() {
        m.outbox_backlog.set(n);
    }
    if let Some(n) = status["conflicts"].as_i64() {
        m.conflicts_recorded.set(n);
    }
    if let Some(bytes) = status["source_lag_bytes"].as_i64() {
        m.source_lag_bytes.set(bytes);
    }
}

/// Sets the job gauges from the site's job rows (`sitesync jobs --json`'s):
/// per kind, the newest running job that is not stale, else 0. A job run
/// by another process (a command, a run the admin API started) shows in
/// the sidecar's metrics this way.
pub fn site_jobs(jobs: &serde_json::Value) {
    let Some(rows) = jobs.as_array() else { return };
    let mut kinds: BTreeMap<String, (i64, i64)> = ["replay", "resync", "purge"]
        .iter()
        .map(|k| (k.to_string(), (0, 0)))
        .collect();
    for j in rows {
        let Some(kind) = j["kind"].as_str() else {
            continue;
        };
        let slot = kinds.entry(kind.to_string()).or_insert((0, 0));
        // Newest first: the first running one of a kind is its job.
        if *slot == (0, 0) && j["state"] == "running" && j["stale"] != true {
            *slot = (
                j["done"].as_i64().unwrap_or(0),
                j["total"].as_i64().unwrap_or(0),
            );
        }
    }
    for (kind, (done, total)) in kinds {
        let (d, t) = job(&kind);
        d.set(done);
        t.set(total);
    }
}

/// How often at most the admin listener reads the site's status for the
/// gauges.
pub const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What the dashboard shows of an exposition (classic text or
/// OpenMetrics): counter totals summed over their labels, and the
/// end-to-end latency histogram's cumulative buckets summed over origins
/// (the page turns two samples into rates and percentiles over the time
/// between them).
pub fn summary(exposition: &str) -> serde_json::Value {
    let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
    let mut buckets: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    const COUNTERS: [&str; 6] = [
        "sitesync_source_events_confirmed_total",
        "sitesync_sink_events_applied_total",
        "sitesync_sink_events_duplicate_total",
        "sitesync_sink_dead_letters_total",
        // Gauges, shown as they are.
        "sitesync_queue_messages",
        "sitesync_queue_consumers",
    ];
    const E2E: &str = "sitesync_end_to_end_latency_seconds";
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if let Some(c) = COUNTERS.iter().find(|c| **c == name) {
            *totals.entry(c).or_default() += value;
        } else if name == format!("{E2E}_bucket") {
            let le = series
                .split("le=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("+Inf");
            let bound = match le {
                "+Inf" => f64::INFINITY,
                b => b.parse().unwrap_or(f64::INFINITY),
            };
            buckets.entry(le.to_string()).or_insert((bound, 0.0)).1 += value;
        } else if name == format!("{E2E}_count") {
            *totals.entry("e2e_count").or_default() += value;
        }
    }
    let mut list: Vec<(f64, f64)> = buckets.into_values().collect();
    list.sort_by(|a, b| a.0.total_cmp(&b.0));
    serde_json::json!({
        "totals": totals,
        "e2e_buckets": list
            .iter()
            .map(|(le, n)| serde_json::json!([if le.is_finite() { serde_json::json!(le) } else { serde_json::json!("+Inf") }, n]))
            .collect::<Vec<_>>(),
    })
}

/// The same exposition in Prometheus' classic text format (0.0.4), which
/// `promtool check metrics` reads: a counter's family is named with its
/// `_total`, and there are no `# UNIT` or `# EOF` lines.
pub fn to_classic_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# TYPE ", "# HELP "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_gauges_follow_the_newest_running_job_of_each_kind() {
        let rows = serde_json::json!([
            {"kind": "t-resync", "state": "running", "stale": false, "done": 10, "total": 30},
            {"kind": "t-resync", "state": "running", "stale": false, "done": 1, "total": 2},
            {"kind": "t-replay", "state": "running", "stale": true, "done": 5, "total": 9},
            {"kind": "t-purge", "state": "succeeded", "stale": false, "done": 7, "total": 7}
        ]);
        site_jobs(&rows);
        let text = render();
        for (series, want) in [
            ("sitesync_job_done{kind=\"t-resync\"}", "10"),
            ("sitesync_job_size{kind=\"t-resync\"}", "30"),
            ("sitesync_job_done{kind=\"t-replay\"}", "0"),
            ("sitesync_job_size{kind=\"t-purge\"}", "0"),
        ] {
            let line = text
                .lines()
                .find(|l| l.starts_with(series))
                .unwrap_or_else(|| panic!("{series}: {text}"));
            assert_eq!(line.rsplit(' ').next(), Some(want), "{line}");
        }
    }

    #[test]
    fn the_summary_sums_counters_and_latency_buckets_over_their_labels() {
        let text = "# TYPE sitesync_sink_events_applied_total counter\n\
            sitesync_sink_events_applied_total{origin=\"PARIS\",type=\"a\"} 3\n\
            sitesync_sink_events_applied_total{origin=\"MADRID\",type=\"a\"} 4\n\
            sitesync_end_to_end_latency_seconds_bucket{origin=\"PARIS\",le=\"0.001\"} 1\n\
            sitesync_end_to_end_latency_seconds_bucket{origin=\"PARIS\",le=\"+Inf\"} 3\n\
            sitesync_end_to_end_latency_seconds_bucket{origin=\"MADRID\",le=\"0.001\"} 2\n\
            sitesync_end_to_end_latency_seconds_bucket{origin=\"MADRID\",le=\"+Inf\"} 4\n\
            sitesync_end_to_end_latency_seconds_count{origin=\"PARIS\"} 3\n\
            sitesync_end_to_end_latency_seconds_count{origin=\"MADRID\"} 4\n";
        let s = summary(text);
        assert_eq!(s["totals"]["sitesync_sink_events_applied_total"], 7.0);
        assert_eq!(s["totals"]["e2e_count"], 7.0);
        assert_eq!(
            s["e2e_buckets"],
            serde_json::json!([[0.001, 3.0], ["+Inf", 7.0]])
        );
    }

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
