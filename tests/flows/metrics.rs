//! The Prometheus metrics of running sidecars (`[admin]`): counters move
//! by exactly the number of events sent, the end-to-end histogram counts
//! each applied event, a dead letter counts once, a live scrape passes
//! `promtool check metrics`, and `config/alerts.yml` passes `promtool
//! check rules` and its unit tests (`promtool test rules`).
//!
//! Without `promtool` (Debian's `prometheus` package) the promtool checks
//! are skipped with a message, unless `SITESYNC_REQUIRE_PROMTOOL` is set
//! (CI sets it after installing the package): then they fail.

use crate::support::mesh::{Mesh, MeshOptions, upsert};
use crate::support::rabbit;
use crate::support::wait_for;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Adds `[admin]` on `port` to `site`'s connector.
fn enable_admin(mesh: &Mesh, site: &str, port: u16) {
    let file = mesh.connector(site).clone();
    let tokens = file.with_extension("tokens");
    std::fs::write(&tokens, "grafana read read-token-for-metrics-0123456789\n").unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut toml = std::fs::read_to_string(&file).unwrap();
    toml.push_str(&format!(
        "\n[admin]\nlisten = \"127.0.0.1:{port}\"\ntokens_file = \"{}\"\n",
        tokens.display()
    ));
    std::fs::write(&file, toml).unwrap();
}

/// `GET path` on the admin port: the status and the body.
async fn get(port: u16, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        match agent.get(&url).call() {
            Ok(mut r) => (
                r.status().as_u16(),
                r.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(_) => (0, String::new()),
        }
    })
    .await
    .unwrap()
}

async fn scrape(port: u16) -> String {
    let (code, body) = get(port, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the sample `series` (`name{labels}` as exposed), 0 when
/// absent.
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.split(' ').next().unwrap().parse().unwrap())
        .unwrap_or(0.0)
}

/// The sum of every sample of metric `name` (any labels).
fn total(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether promtool checks run: `None` (skip, said why) when promtool is
/// missing and not required.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("promtool");
    }
    if std::env::var_os("SITESYNC_REQUIRE_PROMTOOL").is_some() {
        panic!(
            "promtool is missing and SITESYNC_REQUIRE_PROMTOOL is set: apt-get install --no-install-recommends prometheus"
        );
    }
    eprintln!(
        "SKIPPED promtool checks: promtool is missing (apt-get install --no-install-recommends prometheus; set SITESYNC_REQUIRE_PROMTOOL to make this a failure)"
    );
    None
}

/// `promtool args…` with `stdin`; panics with its output unless it succeeds.
fn run_promtool(tool: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(tool)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?}: {text}{}",
        stdin.unwrap_or_default()
    );
    text
}

#[tokio::test]
async fn metrics_count_exactly_the_events_sent_and_pass_promtool() {
    const N: i32 = 40;
    let mesh = Mesh::start(MeshOptions::default()).await;
    let (paris_port, london_port) = (free_port(), free_port());
    enable_admin(&mesh, "PARIS", paris_port);
    enable_admin(&mesh, "LONDON", london_port);
    // One row written at both sites before their sidecars run: LONDON's
    // later write wins and LONDON records PARIS's as a conflict.
    upsert(&mesh.client("PARIS").await, "PARIS", 5, 1).await;
    upsert(&mesh.client("LONDON").await, "LONDON", 5, 2).await;
    let mut paris = mesh.spawn("PARIS");
    let mut london = mesh.spawn("LONDON");
    for port in [paris_port, london_port] {
        let mut last = String::new();
        wait_for(
            async || {
                let (code, body) = get(port, "/ready").await;
                last = body;
                code == 200
            },
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}: {last}"));
    }

    // The gauges `status` gives: the conflict, the source's lag, the
    // outbox, read at a scrape.
    let mut last = String::new();
    wait_for(
        async || {
            last = scrape(london_port).await;
            sample(&last, "sitesync_conflicts_recorded") == 1.0
        },
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {last}"));
    let status: serde_json::Value =
        serde_json::from_str(&mesh.ok("LONDON", &["status", "--json"]).await).unwrap();
    assert_eq!(status["conflicts"], 1, "{status}");
    assert!(status["source_lag_bytes"].is_i64(), "{status}");
    for gauge in ["sitesync_outbox_backlog ", "sitesync_source_lag_bytes "] {
        assert!(last.contains(gauge), "{gauge}: {last}");
    }
    let applied = "sitesync_sink_events_applied_total{origin=\"PARIS\",type=\"item.upsert\"}";
    let e2e = "sitesync_end_to_end_latency_seconds_count{origin=\"PARIS\"}";
    let published = "sitesync_source_events_published_total{type=\"item.upsert\"}";
    let confirmed = "sitesync_source_events_confirmed_total{type=\"item.upsert\"}";
    let london_before = scrape(london_port).await;
    let paris_before = scrape(paris_port).await;

    let client = mesh.client("PARIS").await;
    for id in 0..N {
        upsert(&client, "PARIS", 1000 + id, id).await;
    }
    mesh.wait_inbox("LONDON", i64::from(N), Duration::from_secs(60))
        .await;
    let want = sample(&london_before, applied) + f64::from(N);
    let mut london_after = String::new();
    wait_for(
        async || {
            london_after = scrape(london_port).await;
            sample(&london_after, applied) >= want
        },
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {london_after}"));
    // Nothing more than N comes (a duplicate would count as duplicate).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let london_after = scrape(london_port).await;
    assert_eq!(sample(&london_after, applied), want, "{london_after}");
    assert_eq!(
        sample(&london_after, e2e) - sample(&london_before, e2e),
        f64::from(N),
        "{london_after}"
    );
    let mut paris_after = String::new();
    wait_for(
        async || {
            paris_after = scrape(paris_port).await;
            sample(&paris_after, confirmed) >= sample(&paris_before, confirmed) + f64::from(N)
        },
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {paris_after}"));
    for series in [published, confirmed] {
        assert_eq!(
            sample(&paris_after, series) - sample(&paris_before, series),
            f64::from(N),
            "{series}: {paris_after}"
        );
    }
    assert!(sample(&paris_after, "sitesync_publish_confirm_seconds_count") >= f64::from(N));
    assert_eq!(
        sample(
            &paris_after,
            "sitesync_broker_connected{connection=\"publisher\"}"
        ),
        1.0,
        "{paris_after}"
    );
    assert_eq!(
        sample(&london_after, "sitesync_part_ready{part=\"sink\"}"),
        1.0
    );
    // A plain scrape gets the classic text format (counters' families
    // named `…_total`, no `# EOF`); one that asks for OpenMetrics gets it.
    assert!(!london_after.contains("# EOF"), "{london_after}");
    assert!(
        london_after.contains("# TYPE sitesync_sink_events_applied_total counter"),
        "{london_after}"
    );
    let open = {
        let url = format!("http://127.0.0.1:{london_port}/metrics");
        tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .header("Accept", "application/openmetrics-text; version=1.0.0")
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap()
        })
        .await
        .unwrap()
    };
    assert!(open.ends_with("# EOF\n"), "OpenMetrics: {open}");
    assert!(
        open.contains("# TYPE sitesync_sink_events_applied counter"),
        "{open}"
    );

    // A dead letter at LONDON: a message that is not an event.
    let dead = "sitesync_sink_dead_letters_total";
    let dead_before = total(&london_after, dead);
    let conn = rabbit::connect(&mesh.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        mesh.names.site("LONDON").as_str().into(),
        BasicPublishOptions::default(),
        b"{not json",
        BasicProperties::default().with_message_id("metrics-garbage-1".into()),
    )
    .await
    .unwrap();
    let mut last = String::new();
    wait_for(
        async || {
            last = scrape(london_port).await;
            total(&last, dead) > dead_before
        },
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {last}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = scrape(london_port).await;
    assert_eq!(total(&last, dead), dead_before + 1.0, "{last}");

    // A scrape without an OpenMetrics `Accept` gets the classic text
    // format, which promtool reads as it comes.
    if let Some(tool) = promtool() {
        for body in [&last, &paris_after] {
            run_promtool(tool, &["check", "metrics"], Some(body));
        }
    }
    assert!(london.terminate().await.success());
    assert!(paris.terminate().await.success());
}

#[test]
fn the_alert_rules_pass_promtool() {
    let Some(tool) = promtool() else { return };
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config/alerts.yml")
            .exists()
    );
    run_promtool(tool, &["check", "rules", "config/alerts.yml"], None);
    run_promtool(tool, &["test", "rules", "tests/alerts.test.yml"], None);
}
