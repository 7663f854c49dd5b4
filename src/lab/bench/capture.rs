//! The capture phase of `sitesync bench` (`--no-capture` skips it).
//!
//! 1. `capture_write_ratio`: what a capture trigger costs the
//!    application's write. With PARIS's sidecar stopped (so that it does
//!    not publish meanwhile), one connection commits transactions of 10
//!    rows (one multi-row INSERT each) alternately into `bench_plain`, a
//!    table without capture, and `bench_item`, captured by `sitesync
//!    capture add` (PostgreSQL's statement-level trigger: one outbox row per
//!    row, one trigger call per statement); rounds alternate so that the
//!    machine's drift falls on both. The figure is the time per
//!    transaction with capture over the time without.
//! 2. `capture_bulk_update_s`: PARIS's sidecar started again (the captured
//!    writes go round), one UPDATE of the bulk phase's rows at PARIS, from
//!    its commit until LONDON and MADRID hold every updated row.
//!
//! Capture is removed again at the end: the later phases write the outbox
//! themselves.

use super::{BULK_BASE, Bench, Figures, PAYLOAD_SQL, Sizes, connect, quiesce, say, wait_count};
use std::time::{Duration, Instant};

/// Ids of the captured writes.
const CAPTURE_BASE: i64 = 50_000_000;
/// Ids of the writes without capture.
const PLAIN_BASE: i64 = 60_000_000;
/// Rows per transaction of the write-cost rounds.
const ROWS_PER_TX: i64 = 10;

/// The capture figures.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct CaptureFigures {
    pub without_ms_per_tx: f64,
    pub with_ms_per_tx: f64,
    pub bulk_update_s: f64,
}

impl CaptureFigures {
    pub fn ratio(&self) -> f64 {
        if self.without_ms_per_tx > 0.0 {
            self.with_ms_per_tx / self.without_ms_per_tx
        } else {
            0.0
        }
    }
}

impl Bench {
    pub(super) async fn capture_phases(
        &mut self,
        sizes: &Sizes,
        f: &mut Figures,
    ) -> Result<(), String> {
        let paris = connect(&self.url("paris")).await?;
        paris
            .batch_execute("CREATE TABLE bench_plain (id bigint PRIMARY KEY, n int NOT NULL, payload text NOT NULL)")
            .await
            .map_err(|e| format!("PARIS: {e}"))?;
        self.sitesync("PARIS", &["capture", "add", "--route", super::TYPE])
            .await?;
        self.stop_sidecar("PARIS").await;
        let (rounds, per_round) = if sizes.settle.is_zero() {
            (2, 50)
        } else {
            (6, 1_000)
        };
        say(format!(
            "capture: the application's write, {rounds} rounds of {per_round} transactions of {ROWS_PER_TX} rows each, without capture and with it"
        ));
        quiesce("capture", sizes.settle).await;
        let mut spent = [Duration::ZERO; 2];
        let mut next = [PLAIN_BASE, CAPTURE_BASE];
        for _ in 0..rounds {
            for (i, table) in ["bench_plain", "bench_item"].iter().enumerate() {
                let sql = format!(
                    "INSERT INTO {table} (id, n, payload) SELECT g, 0, {PAYLOAD_SQL} FROM generate_series($1::bigint, $1::bigint + {}) g",
                    ROWS_PER_TX - 1
                );
                let began = Instant::now();
                for _ in 0..per_round {
                    paris
                        .execute(&sql, &[&next[i]])
                        .await
                        .map_err(|e| format!("writing {table} at PARIS: {e}"))?;
                    next[i] += ROWS_PER_TX;
                }
                spent[i] += began.elapsed();
            }
        }
        let txs = (rounds * per_round) as f64;
        let mut c = super::capture::CaptureFigures {
            without_ms_per_tx: spent[0].as_secs_f64() * 1000.0 / txs,
            with_ms_per_tx: spent[1].as_secs_f64() * 1000.0 / txs,
            ..Default::default()
        };
        let captured = next[1] - CAPTURE_BASE;
        wait_count(
            &paris,
            &format!("SELECT count(*) FROM outbox WHERE type = '{}'", super::TYPE),
            captured,
            "the captured writes in PARIS's outbox",
        )
        .await?;
        say(format!(
            "capture: {:.3} ms per transaction without, {:.3} ms with ({:.2}×); {captured} rows captured",
            c.without_ms_per_tx,
            c.with_ms_per_tx,
            c.ratio()
        ));
        self.spawn("PARIS")?;
        let london = connect(&self.url("london")).await?;
        let madrid = connect(&self.url("madrid")).await?;
        for db in [&london, &madrid] {
            wait_count(
                db,
                &format!("SELECT count(*) FROM bench_item WHERE id >= {CAPTURE_BASE}"),
                captured,
                "the captured writes",
            )
            .await?;
        }
        quiesce("capture bulk update", sizes.settle).await;
        say(format!(
            "capture: one UPDATE of {} rows at PARIS",
            sizes.bulk
        ));
        let bulk_end = BULK_BASE + sizes.bulk as i64;
        let began = Instant::now();
        paris
            .execute(
                "UPDATE bench_item SET n = n + 1000 WHERE id >= $1 AND id < $2",
                &[&BULK_BASE, &bulk_end],
            )
            .await
            .map_err(|e| format!("updating at PARIS: {e}"))?;
        let committed = began.elapsed();
        let began = Instant::now();
        for db in [&london, &madrid] {
            wait_count(
                db,
                &format!("SELECT count(*) FROM bench_item WHERE id >= {BULK_BASE} AND id < {bulk_end} AND n >= 1000"),
                sizes.bulk as i64,
                "the captured bulk update",
            )
            .await?;
        }
        c.bulk_update_s = began.elapsed().as_secs_f64();
        say(format!(
            "capture: the UPDATE committed in {:.1} s, applied at LONDON and MADRID {:.1} s later",
            committed.as_secs_f64(),
            c.bulk_update_s
        ));
        wait_count(
            &paris,
            "SELECT count(*) FROM outbox",
            0,
            "PARIS's outbox to empty",
        )
        .await?;
        self.sitesync("PARIS", &["capture", "remove", "--route", super::TYPE])
            .await?;
        f.capture = Some(c);
        Ok(())
    }
}
