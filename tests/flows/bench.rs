//! `sitesync bench` runs end to end on small counts. The figures of a
//! quick debug run mean nothing; the test checks that every figure of the
//! issue is there, measured, and that nothing is left behind.

use crate::support::rabbit;
use crate::support::sidecar::run_ok;

#[tokio::test]
async fn the_bench_runs_end_to_end_and_prints_every_figure() {
    let (stdout, stderr) = run_ok(
        "ssbench-test",
        &["bench", "--quick", "--json", "--resync-rows", "5000"],
    )
    .await;
    let last = stdout.lines().last().unwrap_or_default();
    let figures: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"));
    for key in [
        "raw_publish_confirm_per_s",
        "raw_round_trip_per_s",
        "source_per_s",
        "own_return_per_s",
        "e2e_per_s",
        "e2e_p50_ms",
        "e2e_p95_ms",
        "e2e_p99_ms",
        "bulk_100k_s",
        "rss_mib_peak",
        "rss_mib_idle",
        // MariaDB is installed wherever the tests run (.ci/run installs it).
        "mariadb_source_per_s",
        "e2e_pg_to_mariadb_per_s",
        // Resync to MADRID: rows that only PARIS had, applied there.
        "resync_per_s",
        "resync_packed_per_s",
        "resync_zstd_per_s",
        "resync_sink_rss_mib_peak",
        "resync_zstd_bytes_per_row",
    ] {
        let v = figures[key].as_f64().unwrap_or(-1.0);
        assert!(v > 0.0, "{key} = {v} in {last}");
    }
    for key in [
        "source_ratio",
        "e2e_ratio",
        "mariadb_source_ratio",
        "e2e_pg_to_mariadb_ratio",
    ] {
        let v = figures[key].as_f64().unwrap_or(-1.0);
        assert!(v > 0.0 && v < 10.0, "{key} = {v} in {last}");
    }
    assert_eq!(figures["resync_packed_rows"].as_i64(), Some(5000), "{last}");
    assert!(
        figures["resync_zstd_bytes_per_row"].as_f64() < figures["resync_bytes_per_row"].as_f64(),
        "compression shrinks the rows: {last}"
    );
    assert!(figures["cpu_idle_pct"].as_f64().is_some_and(|v| v >= 0.0));
    // Each raw ceiling is measured before and after the sitesync phases;
    // the figure is their mean.
    for (runs, mean) in [
        ("raw_publish_runs", "raw_publish_confirm_per_s"),
        ("raw_round_trip_runs", "raw_round_trip_per_s"),
    ] {
        let rates: Vec<f64> = figures[runs]
            .as_array()
            .unwrap_or_else(|| panic!("{runs} missing in {last}"))
            .iter()
            .map(|r| r.as_f64().unwrap_or(-1.0))
            .collect();
        assert_eq!(rates.len(), 2, "{runs} in {last}");
        assert!(rates.iter().all(|r| *r > 0.0), "{runs} in {last}");
        let m = figures[mean].as_f64().unwrap_or(-1.0);
        assert!(
            (m - (rates[0] + rates[1]) / 2.0).abs() <= 1.0,
            "{mean} is not the mean of {runs} in {last}"
        );
    }
    // The CPU tables: the sidecar and the broker did work in the source
    // phase (PARIS alone runs then) and in the end-to-end phase.
    for (table, parts) in [
        ("source_cpu_ms_per_1k", &["sitesync PARIS", "rabbitmq"][..]),
        (
            "e2e_cpu_ms_per_1k",
            &["sitesync PARIS", "sitesync LONDON", "rabbitmq"][..],
        ),
    ] {
        for part in parts {
            let ms = figures[table][part].as_f64().unwrap_or(-1.0);
            assert!(ms > 0.0, "{table}.{part} = {ms} in {last}");
        }
    }
    assert!(
        figures["source_cpu_ms_per_1k"]
            .get("sitesync LONDON")
            .is_none(),
        "LONDON does not run in the source phase: {last}"
    );
    assert!(
        figures["e2e_writers_held_pct"]
            .as_f64()
            .is_some_and(|v| (0.0..=100.0).contains(&v)),
        "{last}"
    );
    assert!(
        figures["e2e_p50_ms"].as_f64() <= figures["e2e_p99_ms"].as_f64(),
        "{last}"
    );
    // The human table comes first.
    assert!(stdout.contains("raw publish + confirm"), "{stdout}");
    assert!(
        stdout.contains("MariaDB source") && stdout.contains("PostgreSQL → MariaDB"),
        "{stdout}"
    );
    // Nothing left: the bench's directory and queues are gone.
    let bench_dir = stderr
        .lines()
        .find_map(|l| l.split(" in /tmp/").nth(1))
        .map(|d| format!("/tmp/{d}"))
        .expect("the bench names its directory");
    assert!(
        !std::path::Path::new(&bench_dir).exists(),
        "{bench_dir} left behind"
    );
    let token = bench_dir.trim_start_matches("/tmp/ssbench-");
    let q = format!("bench-{token}_SITE_LONDON");
    assert_eq!(
        rabbit::queue_len(&rabbit::shared_amqp_url(), &q).await,
        None,
        "{q} left behind"
    );
}
