//! The resync phase of `sitesync bench` (`--no-resync` skips it).
//!
//! Rows written straight into PARIS's `bench_item` (no outbox: no other
//! site has them, as for a new site) are sent to MADRID by `sitesync
//! resync`, three times on separate id ranges, and timed from the
//! command's start until MADRID's database holds every row:
//!
//! 1. one row per message (`resync_per_s`);
//! 2. packs of [`PACK`] rows (`resync_packed_per_s`): the figure the
//!    issue's target is about (≥ 3× the raw round trip of the same run,
//!    and the full run's 1,000,000 rows in under 60 s);
//! 3. the same packs compressed with zstd (`resync_zstd_per_s`), and the
//!    bytes a row takes on the wire with and without compression.
//!
//! MADRID's sidecar is started fresh for the phase: its peak RSS
//! (`VmHWM`) at the end is the receiving sidecar's memory under packs.

use super::{Bench, Figures, PAYLOAD_SQL, Sizes, connect, say, wait_count};
use std::time::Instant;

/// Ids of each run's rows.
const SINGLE_BASE: i64 = 70_000_000;
const PACKED_BASE: i64 = 72_000_000;
const ZSTD_BASE: i64 = 74_000_000;
/// Rows per pack.
pub(super) const PACK: u32 = 500;

/// The resync figures.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ResyncFigures {
    pub single_rows: i64,
    pub single_per_s: f64,
    pub packed_rows: i64,
    pub packed_per_s: f64,
    /// The packed run's whole time, command start to the last row applied.
    pub packed_s: f64,
    pub zstd_rows: i64,
    pub zstd_per_s: f64,
    /// MADRID's sidecar: peak RSS over the phase.
    pub sink_rss_mib_peak: f64,
    /// Bytes a row takes in a pack (JSON), and compressed.
    pub bytes_per_row: f64,
    pub zstd_bytes_per_row: f64,
}

impl Bench {
    pub(super) async fn resync_phase(
        &mut self,
        sizes: &Sizes,
        f: &mut Figures,
    ) -> Result<(), String> {
        let paris = connect(&self.url("paris")).await?;
        let madrid = connect(&self.url("madrid")).await?;
        let mut r = ResyncFigures {
            single_rows: sizes.resync_single as i64,
            packed_rows: sizes.resync_packed as i64,
            zstd_rows: sizes.resync_packed as i64,
            ..ResyncFigures::default()
        };
        say(format!(
            "resync: {} + {} + {} rows written straight into PARIS's table (no outbox: only PARIS has them)",
            r.single_rows, r.packed_rows, r.zstd_rows
        ));
        for (base, n) in [
            (SINGLE_BASE, r.single_rows),
            (PACKED_BASE, r.packed_rows),
            (ZSTD_BASE, r.zstd_rows),
        ] {
            let mut first = base;
            while first < base + n {
                let last = (first + 99_999).min(base + n - 1);
                paris
                    .execute(
                        &format!(
                            "INSERT INTO bench_item (id, n, payload) SELECT g, 0, {PAYLOAD_SQL} FROM generate_series($1::bigint, $2::bigint) g"
                        ),
                        &[&first, &last],
                    )
                    .await
                    .map_err(|e| format!("writing PARIS's rows: {e}"))?;
                first = last + 1;
            }
        }
        paris
            .batch_execute("VACUUM ANALYZE bench_item")
            .await
            .map_err(|e| format!("PARIS: {e}"))?;
        let pid = self.spawn("MADRID")?;
        let pack = PACK.to_string();
        let runs: [(&str, i64, i64, Vec<&str>); 3] = [
            ("one row per message", SINGLE_BASE, r.single_rows, vec![]),
            (
                "packs",
                PACKED_BASE,
                r.packed_rows,
                vec!["--pack", pack.as_str()],
            ),
            (
                "zstd packs",
                ZSTD_BASE,
                r.zstd_rows,
                vec!["--pack", pack.as_str(), "--compress"],
            ),
        ];
        let mut rates = Vec::new();
        for (label, base, n, extra) in runs {
            let range = format!("r.id >= {base} AND r.id < {}", base + n);
            let mut args = vec![
                "resync",
                "--to-site",
                "MADRID",
                "--route",
                super::TYPE,
                "--where",
                range.as_str(),
                "--yes",
            ];
            args.extend(extra);
            let began = Instant::now();
            self.sitesync("PARIS", &args).await?;
            let sent = began.elapsed();
            wait_count(
                &madrid,
                &format!(
                    "SELECT count(*) FROM bench_item WHERE id >= {base} AND id < {}",
                    base + n
                ),
                n,
                &format!("MADRID to hold the resync's rows ({label})"),
            )
            .await?;
            let took = began.elapsed();
            let rate = n as f64 / took.as_secs_f64();
            say(format!(
                "resync, {label}: {n} rows in {:.1} s ({rate:.0} rows/s; all confirmed by the broker after {:.1} s)",
                took.as_secs_f64(),
                sent.as_secs_f64()
            ));
            rates.push((rate, took.as_secs_f64()));
            self.running("MADRID")?;
        }
        r.single_per_s = rates[0].0;
        r.packed_per_s = rates[1].0;
        r.packed_s = rates[1].1;
        r.zstd_per_s = rates[2].0;
        r.sink_rss_mib_peak = super::proc_status_kib(pid, "VmHWM:")? / 1024.0;
        (r.bytes_per_row, r.zstd_bytes_per_row) = wire_bytes(&paris).await?;
        self.stop_sidecar("MADRID").await;
        f.resync = Some(r);
        Ok(())
    }
}

/// Bytes a bench row takes in a pack of [`PACK`], plain and with zstd: the
/// events of one pack's worth of PARIS's rows, as `sitesync resync` makes
/// them (the versionless form: the Unix epoch and an id of the job).
async fn wire_bytes(paris: &tokio_postgres::Client) -> Result<(f64, f64), String> {
    let rows = paris
        .query(
            &format!(
                "SELECT id::text, json_build_object('id', id, 'n', n, 'payload', payload)::text FROM bench_item WHERE id >= {PACKED_BASE} ORDER BY id LIMIT {PACK}"
            ),
            &[],
        )
        .await
        .map_err(|e| format!("reading PARIS's rows: {e}"))?;
    let bodies: Vec<Vec<u8>> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let key: String = row.get(0);
            let data: String = row.get(1);
            crate::event::Event {
                id: crate::resync::event_id("resync:PARIS:1", "public.bench_item", &key),
                timestamp: crate::resync::unversioned(),
                origin: "resync:PARIS:1".into(),
                kind: super::TYPE.into(),
                entity_key: Some(key),
                data: serde_json::value::RawValue::from_string(data).expect("JSON from the server"),
                epoch: 1,
                seq: i as u64 + 1,
            }
            .to_body()
        })
        .collect();
    let n = bodies.len().max(1) as f64;
    let plain = crate::bus::pack::body(bodies.iter().map(Vec::as_slice), false).len() as f64;
    let zstd = crate::bus::pack::body(bodies.iter().map(Vec::as_slice), true).len() as f64;
    Ok((plain / n, zstd / n))
}
