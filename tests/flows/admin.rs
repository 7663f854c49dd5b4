//! The admin listener of a running sidecar (`[admin]`): health and
//! readiness without a token, the JSON API only with one, a read token
//! refused on a mutating call, an admin token's call done; a token file
//! others may read refused at start.

use crate::support::admin::{self, free_port};
use crate::support::mesh::{Mesh, MeshOptions, bulk_upsert};
use crate::support::rabbit;
use crate::support::{wait_for, wait_for_value};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const READ: &str = "read-token-for-tests-0123456789";
const ADMIN: &str = "admin-token-for-tests-0123456789";

/// `[admin]` on `site` with the two test tokens in a file of `mode`.
fn enable_admin(mesh: &Mesh, site: &str, port: u16, mode: u32, peers: &[u16]) {
    enable_admin_with(mesh, site, port, mode, peers, "");
}

/// [`enable_admin`] with more `[admin]` keys.
fn enable_admin_with(mesh: &Mesh, site: &str, port: u16, mode: u32, peers: &[u16], more: &str) {
    let tokens = format!("# test tokens\ngrafana read {READ}\nalice admin {ADMIN}\n");
    admin::enable_admin(mesh, site, port, &tokens, mode, peers, more);
}

/// One HTTP call: the status and the body (JSON when it is).
async fn call(
    port: u16,
    method: &'static str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let token = token.map(|t| format!("Bearer {t}"));
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut response = match (method, body) {
            ("GET", _) => {
                let mut r = agent.get(&url);
                if let Some(t) = &token {
                    r = r.header("Authorization", t);
                }
                r.call()
            }
            (_, body) => {
                let mut r = agent.post(&url);
                if let Some(t) = &token {
                    r = r.header("Authorization", t);
                }
                match body {
                    Some(b) => r
                        .header("Content-Type", "application/json")
                        .send(b.to_string().as_bytes()),
                    None => r.send_empty(),
                }
            }
        }
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_api_needs_a_token_reads_with_any_and_changes_things_only_with_an_admin_one() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let port = free_port();
    let paris_port = free_port();
    let silent_port = free_port();
    enable_admin(&mesh, "LONDON", port, 0o600, &[paris_port, silent_port]);
    enable_admin(&mesh, "PARIS", paris_port, 0o600, &[]);
    let mut london = mesh.spawn("LONDON");
    let mut paris = mesh.spawn("PARIS");

    // Alive at once; ready once the source streams and the sink consumes.
    wait_for(
        async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
        Duration::from_secs(30),
    )
    .await
    .expect("the admin listener answers");
    let (code, body) = call(port, "GET", "/health", None, None).await;
    assert_eq!((code, &body["status"]), (200, &Value::from("alive")));
    let mut ready = Value::Null;
    wait_for(
        async || {
            let (code, body) = call(port, "GET", "/ready", None, None).await;
            ready = body;
            code == 200
        },
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {ready}"));
    assert_eq!(ready["parts"]["source"], "ok", "{ready}");
    assert_eq!(ready["parts"]["sink"], "ok", "{ready}");
    let (code, metrics) = call(port, "GET", "/metrics", None, None).await;
    assert_eq!(code, 200);
    assert!(
        metrics
            .as_str()
            .is_some_and(|m| m.contains("sitesync_part_ready{part=\"sink\"} 1")),
        "{metrics}"
    );

    // The API: no token, an unknown one, a read one.
    let (code, body) = call(port, "GET", "/api/status", None, None).await;
    assert_eq!(code, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("no token"),
        "{body}"
    );
    let (code, body) = call(
        port,
        "GET",
        "/api/status",
        Some("not-a-token-at-all-0000"),
        None,
    )
    .await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = call(port, "GET", "/api/status", Some(READ), None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["site"], "LONDON", "{body}");
    assert!(
        body["origins"].is_array() && body["gaps"].is_array(),
        "{body}"
    );
    let (code, body) = call(port, "GET", "/api/jobs", Some(READ), None).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.is_array(), "{body}");

    // A dead letter at LONDON: a message that is not an event.
    let conn = rabbit::connect(&mesh.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        mesh.names.site("LONDON").as_str().into(),
        BasicPublishOptions::default(),
        b"{not json",
        BasicProperties::default().with_message_id("admin-garbage-1".into()),
    )
    .await
    .unwrap();
    let mut dlq = Value::Null;
    wait_for(
        async || {
            let (_, body) = call(port, "GET", "/api/dlq", Some(READ), None).await;
            dlq = body;
            dlq["dead_letters"]
                .as_array()
                .is_some_and(|l| l.iter().any(|d| d["id"] == "admin-garbage-1"))
        },
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {dlq}"));

    // Requeue: a read token is refused (403), nothing moves; an admin
    // token sends it back to LONDON's queue.
    let which = serde_json::json!({ "ids": ["admin-garbage-1"] });
    let (code, body) = call(
        port,
        "POST",
        "/api/dlq/requeue",
        Some(READ),
        Some(which.clone()),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("grafana"),
        "{body}"
    );
    let (code, body) = call(port, "POST", "/api/dlq/requeue", None, Some(which.clone())).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = call(port, "POST", "/api/dlq/requeue", Some(ADMIN), Some(which)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["requeued"][0]["id"], "admin-garbage-1", "{body}");
    assert!(body["audit_error"].is_null(), "{body}");
    assert_eq!(
        body["requeued"][0]["queue"],
        Value::from(mesh.names.site("LONDON")),
        "{body}"
    );
    let (code, body) = call(port, "POST", "/api/dlq/requeue", Some(ADMIN), None).await;
    assert_eq!(code, 400, "{body}");

    // Conflicts review with an admin token; ids that are not there say so.
    let (code, body) = call(
        port,
        "POST",
        "/api/conflicts/review",
        Some(ADMIN),
        Some(serde_json::json!({ "ids": [999_999] })),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["missing"], serde_json::json!([999_999]), "{body}");
    // Each mutating call is in the audit trail, by the token's name.
    let (code, trail) = call(port, "GET", "/api/audit", Some(READ), None).await;
    assert_eq!(code, 200, "{trail}");
    let entry = |action: &str| -> Value {
        trail
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == action)
            .cloned()
            .unwrap_or_else(|| panic!("no {action} in {trail}"))
    };
    let requeued = entry("dlq requeue");
    assert_eq!(
        (&requeued["who"], &requeued["via"], &requeued["result"]),
        (
            &Value::from("alice"),
            &Value::from("api"),
            &Value::from("ok")
        ),
        "{requeued}"
    );
    assert_eq!(
        requeued["arguments"]["ids"][0], "admin-garbage-1",
        "{requeued}"
    );
    let reviewed = entry("conflicts review");
    assert_eq!(reviewed["result"], "failed", "an id not found: {reviewed}");
    // The refused calls (401, 403) did nothing and are not in it.
    assert_eq!(trail.as_array().unwrap().len(), 2, "{trail}");
    let cli: Value = serde_json::from_str(&mesh.ok("LONDON", &["audit", "--json"]).await).unwrap();
    assert_eq!(cli.as_array().map(Vec::len), Some(2), "{cli}");

    // Gaps: listed with a read token, asked of the archive with an admin one.
    let (code, body) = call(port, "GET", "/api/gaps", Some(READ), None).await;
    assert_eq!((code, body.clone()), (200, serde_json::json!([])), "{body}");
    let (code, body) = call(port, "POST", "/api/gaps/fill", Some(READ), None).await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = call(port, "POST", "/api/gaps/fill", Some(ADMIN), None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["asked"], 0, "no gap, nothing asked: {body}");
    let (code, _) = call(port, "GET", "/nowhere", Some(READ), None).await;
    assert_eq!(code, 404);

    // The overview: LONDON itself, PARIS asked with the caller's token, and
    // a peer that does not answer, marked so; the dead letters once.
    let (code, body) = call(port, "GET", "/api/overview", None, None).await;
    assert_eq!(code, 401, "{body}");
    let mut overview = Value::Null;
    wait_for(
        async || {
            let (_, body) = call(port, "GET", "/api/overview", Some(READ), None).await;
            overview = body;
            overview["sites"][1]["ready"]["ready"] == true
        },
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {overview}"));
    let sites = overview["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 3, "{overview}");
    assert_eq!(sites[0]["site"], "LONDON", "{overview}");
    assert_eq!(sites[1]["site"], "PARIS", "{overview}");
    assert_eq!(sites[1]["answered"], true, "{overview}");
    assert!(sites[1]["status"]["origins"].is_array(), "{overview}");
    assert_eq!(sites[2]["answered"], false, "{overview}");
    assert!(
        sites[2]["error"].as_str().unwrap().contains("no answer"),
        "{overview}"
    );
    assert!(overview["dlq"]["dead_letters"].is_array(), "{overview}");
    // The page itself needs no token (it asks for one).
    let (code, page) = call(port, "GET", "/", None, None).await;
    assert_eq!(code, 200);
    assert!(
        page.as_str().is_some_and(|p| p.contains("/api/overview")),
        "{page}"
    );
    // `status --json` says what /api/status says.
    let cli: Value = serde_json::from_str(&mesh.ok("LONDON", &["status", "--json"]).await).unwrap();
    let (_, api) = call(port, "GET", "/api/status", Some(READ), None).await;
    assert_eq!(cli["site"], "LONDON");
    assert_eq!(cli["origins"], api["origins"], "{cli}\n{api}");
    assert!(cli["dead_letters_in_queue"].is_u64(), "{cli}");
    assert!(london.terminate().await.success());
    assert!(paris.terminate().await.success());

    // A token file others may read: the sidecar does not start, and says why.
    let port = free_port();
    enable_admin(&mesh, "MADRID", port, 0o644, &[]);
    let out = mesh.sitesync("MADRID", &["run"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("chmod 600") && err.contains("mode 644"),
        "{err}"
    );
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "nothing listens on MADRID's admin port"
    );
}

/// A webhook receiver: the JSON bodies posted to it, the first `fail`
/// calls answered 500 (to make the sender retry).
async fn receiver(
    fail: usize,
) -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (g, c) = (got.clone(), calls.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let (g, c) = (g.clone(), c.clone());
            async move {
                if c.fetch_add(1, Ordering::SeqCst) < fail {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                g.lock().unwrap().push(body);
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, got, calls)
}

#[tokio::test]
async fn alerts_reach_the_webhook_once_when_they_start_and_once_when_they_end() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let (hook, got, calls) = receiver(1).await;
    let (port, madrid_port) = (free_port(), free_port());
    enable_admin_with(
        &mesh,
        "LONDON",
        port,
        0o600,
        &[madrid_port],
        &format!("webhook_url = \"http://127.0.0.1:{hook}/hook\"\nalert_every_ms = 300\n"),
    );
    enable_admin(&mesh, "MADRID", madrid_port, 0o600, &[]);
    let mut london = mesh.spawn("LONDON");
    let mut madrid = mesh.spawn("MADRID");
    let alerts = |status: &str, alert: &str, site: &str| -> usize {
        got.lock()
            .unwrap()
            .iter()
            .filter(|a| a["status"] == status && a["alert"] == alert && a["site"] == site)
            .count()
    };
    // A job that failed at LONDON.
    mesh.client("LONDON")
        .await
        .execute(
            "INSERT INTO sitesync_jobs (id, kind, who, args, started_at, updated_at, state, result) \
             VALUES (gen_random_uuid(), 'replay', 'ops', '{}', now(), now(), 'failed', 'the broker went away')",
            &[],
        )
        .await
        .unwrap();
    wait_for(
        async || alerts("firing", "job_failed", "LONDON") == 1,
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", got.lock().unwrap()));
    assert!(
        calls.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the first call failed and was retried"
    );
    let message = got
        .lock()
        .unwrap()
        .iter()
        .find(|a| a["alert"] == "job_failed")
        .unwrap()["message"]
        .clone();
    assert!(
        message.as_str().unwrap().contains("the broker went away"),
        "{message}"
    );
    // MADRID answers once (its name is learned), then stops: site_down
    // fires, named; it comes back: resolved.
    wait_for(
        async || call(madrid_port, "GET", "/ready", None, None).await.0 == 200,
        Duration::from_secs(30),
    )
    .await
    .expect("MADRID ready");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(madrid.terminate().await.success());
    wait_for(
        async || alerts("firing", "site_down", "MADRID") == 1,
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", got.lock().unwrap()));
    let mut madrid = mesh.spawn("MADRID");
    wait_for(
        async || alerts("resolved", "site_down", "MADRID") == 1,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", got.lock().unwrap()));
    // Each fired once: no repeats while it lasted.
    assert_eq!(alerts("firing", "job_failed", "LONDON"), 1);
    assert_eq!(alerts("firing", "site_down", "MADRID"), 1);
    assert!(london.terminate().await.success());
    assert!(madrid.terminate().await.success());
}

#[tokio::test]
async fn with_a_certificate_the_listener_speaks_tls_and_a_key_others_may_read_is_refused() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let dir = mesh.connector("LONDON").parent().unwrap().join("admin-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    // A CA, and a server certificate for 127.0.0.1 signed by it.
    let script = r#"set -e
p="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
openssl req -x509 $p -days 2 -subj /CN=sitesync-test-ca -keyout ca.key -out ca.pem 2>/dev/null
openssl req $p -subj /CN=localhost -keyout key.pem -out req.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost
basicConstraints=CA:FALSE
extendedKeyUsage=serverAuth
' > ext
openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out cert.pem 2>/dev/null
"#;
    let made = std::process::Command::new("bash")
        .args(["-c", script])
        .current_dir(&dir)
        .output()
        .expect("openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port();
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    enable_admin_with(&mesh, "LONDON", port, 0o600, &[], &tls);
    let mut london = mesh.spawn("LONDON");
    let pem = std::fs::read(dir.join("ca.pem")).unwrap();
    let https = |path: &'static str| {
        let pem = pem.clone();
        tokio::task::spawn_blocking(move || {
            let root = ureq::tls::Certificate::from_pem(&pem).unwrap();
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .http_status_as_error(false)
                .tls_config(
                    ureq::tls::TlsConfig::builder()
                        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
                            root,
                        ])))
                        .build(),
                )
                .build()
                .into();
            agent
                .get(&format!("https://127.0.0.1:{port}{path}"))
                .header("Authorization", format!("Bearer {READ}"))
                .call()
                .map(|mut r| {
                    (
                        r.status().as_u16(),
                        r.body_mut().read_to_string().unwrap_or_default(),
                    )
                })
                .map_err(|e| e.to_string())
        })
    };
    let mut last = Err(String::new());
    wait_for(
        async || {
            last = https("/health").await.unwrap();
            last.is_ok()
        },
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {last:?}"));
    let (code, body) = https("/api/status").await.unwrap().unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"site\":\"LONDON\""), "{body}");
    // Plain HTTP to it gets no answer.
    let plain = tokio::task::spawn_blocking(move || {
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .new_agent()
            .get(&format!("http://127.0.0.1:{port}/health"))
            .call()
            .is_ok()
    })
    .await
    .unwrap();
    assert!(!plain, "plain HTTP must not be served");
    // PARIS's dashboard reads LONDON over HTTPS, trusting the deployment's
    // own CA (`peers_ca`).
    let paris_port = free_port();
    let ca = format!("peers_ca = \"{}\"\n", dir.join("ca.pem").display());
    enable_admin_with(&mesh, "PARIS", paris_port, 0o600, &[], &ca);
    let file = mesh.connector("PARIS");
    let toml = std::fs::read_to_string(file).unwrap().replace(
        "peers = []",
        &format!("peers = [\"https://127.0.0.1:{port}\"]"),
    );
    std::fs::write(file, toml).unwrap();
    let mut paris = mesh.spawn("PARIS");
    until_listening(paris_port).await;
    let mut overview = Value::Null;
    wait_for(
        async || {
            overview = call(paris_port, "GET", "/api/overview", Some(READ), None)
                .await
                .1;
            overview["sites"][1]["status"]["site"] == "LONDON"
        },
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {overview}"));
    assert_eq!(overview["sites"][1]["answered"], true, "{overview}");
    assert_eq!(
        overview["sites"][1]["url"],
        format!("https://127.0.0.1:{port}"),
        "{overview}"
    );
    assert!(paris.terminate().await.success());
    assert!(london.terminate().await.success());
    // A key others may read: MADRID does not start.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    enable_admin_with(&mesh, "MADRID", free_port(), 0o600, &[], &tls);
    let out = mesh.sitesync("MADRID", &["run"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin.tls_key") && err.contains("chmod 600"),
        "{err}"
    );
}

/// Waits until `port`'s listener answers.
async fn until_listening(port: u16) {
    wait_for(
        async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
        Duration::from_secs(30),
    )
    .await
    .expect("the admin listener answers");
}

/// The job row `id` as `GET /api/jobs` shows it.
async fn api_job(port: u16, id: &Value) -> Value {
    let (_, jobs) = call(port, "GET", "/api/jobs", Some(READ), None).await;
    jobs.as_array()
        .and_then(|j| j.iter().find(|j| &j["id"] == id).cloned())
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_resync_and_a_replay_started_through_the_api_are_cancelled_there_and_each_step_is_audited()
 {
    use crate::flows::resync::{job, preload, settle, written_twice};
    let n = 3_000;
    let mesh = Mesh::start(MeshOptions {
        archive: true,
        ..MeshOptions::default()
    })
    .await;
    preload(&mesh, &["PARIS", "MADRID"], n).await;
    let (port, london_port) = (free_port(), free_port());
    enable_admin(&mesh, "PARIS", port, 0o600, &[]);
    enable_admin(&mesh, "LONDON", london_port, 0o600, &[]);
    let mut sidecars = mesh.spawn_all();
    until_listening(port).await;
    until_listening(london_port).await;

    // Refused before anything runs: a read token; a route the dry run
    // refuses (its words come back); prune; a replay where no archive is.
    let all = serde_json::json!({ "to_site": "LONDON", "all": true, "rate": 150 });
    let (code, body) = call(port, "POST", "/api/resync", Some(READ), Some(all.clone())).await;
    assert_eq!(code, 403, "{body}");
    let nothing = serde_json::json!({ "to_site": "LONDON", "routes": ["nothing.upsert"] });
    let (code, body) = call(port, "POST", "/api/resync", Some(ADMIN), Some(nothing)).await;
    assert_eq!(code, 400, "{body}");
    let why = body["error"].as_str().unwrap();
    assert!(
        why.contains("dry run") && why.contains("nothing.upsert"),
        "{body}"
    );
    let prune = serde_json::json!({ "to_site": "LONDON", "all": true, "prune": true });
    let (code, body) = call(port, "POST", "/api/resync", Some(ADMIN), Some(prune)).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("command line"),
        "{body}"
    );
    let (code, body) = call(
        port,
        "POST",
        "/api/resync",
        Some(ADMIN),
        Some(serde_json::json!({"to_site": 1})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    let to_paris = serde_json::json!({ "to_site": "PARIS" });
    let (code, body) = call(
        london_port,
        "POST",
        "/api/replay",
        Some(ADMIN),
        Some(to_paris),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("[archive]"),
        "{body}"
    );

    // Started: the job row is there, by alice, naming its run.
    let (code, started) = call(port, "POST", "/api/resync", Some(ADMIN), Some(all)).await;
    assert_eq!(code, 202, "{started}");
    assert_eq!(started["job"]["who"], "alice", "{started}");
    assert_eq!(started["job"]["state"], "running", "{started}");
    assert_eq!(
        started["job"]["args"]["run"], started["run"]["run"],
        "{started}"
    );
    assert!(
        started["run"]["pid"].as_u64().is_some_and(|p| p > 0),
        "{started}"
    );
    assert!(
        started["dry_run"]
            .as_str()
            .unwrap()
            .contains(&format!("{n} row(s) to send")),
        "{started}"
    );
    let job_id = started["job"]["id"].clone();
    wait_for(
        async || job(&mesh, 1).await.is_some_and(|j| j.0 > 0),
        Duration::from_secs(60),
    )
    .await
    .expect("the resync confirms rows");

    // The sidecar's metrics show the run's job (it is another process's).
    let mut metrics = Value::Null;
    wait_for(
        async || {
            metrics = call(port, "GET", "/metrics", None, None).await.1;
            metrics
                .as_str()
                .is_some_and(|m| m.contains(&format!("sitesync_job_size{{kind=\"resync\"}} {n}")))
        },
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {metrics}"));

    // Cancel: a read token may not; alice may, once.
    let cancel = serde_json::json!({ "job": job_id });
    let (code, body) = call(
        port,
        "POST",
        "/api/jobs/cancel",
        Some(READ),
        Some(cancel.clone()),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = call(
        port,
        "POST",
        "/api/jobs/cancel",
        Some(ADMIN),
        Some(cancel.clone()),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["job"]["state"], "cancelled", "{body}");
    assert_eq!(body["run"]["exit"], "cancelled (exit code 130)", "{body}");
    assert!(
        body["job"]["result"]
            .as_str()
            .unwrap()
            .contains("--resume 1"),
        "{body}"
    );
    let (code, again) = call(port, "POST", "/api/jobs/cancel", Some(ADMIN), Some(cancel)).await;
    assert_eq!(code, 409, "{again}");
    assert!(
        again["error"].as_str().unwrap().contains("not running"),
        "{again}"
    );
    let (at_cancel, result, _) = job(&mesh, 1).await.unwrap();
    assert_eq!(result, None, "resumable");
    assert!(at_cancel > 0 && at_cancel < i64::from(n), "{at_cancel}");
    let (code, runs) = call(port, "GET", "/api/runs", Some(READ), None).await;
    assert_eq!(code, 200, "{runs}");
    assert_eq!(
        runs["runs"][0]["exit"], "cancelled (exit code 130)",
        "{runs}"
    );

    // Resumed through the API: it goes on after the last confirmed row,
    // sending none twice (a clean stop confirms what is in flight).
    let resume = serde_json::json!({ "resume": 1, "rate": 5000 });
    let (code, resumed) = call(port, "POST", "/api/resync", Some(ADMIN), Some(resume)).await;
    assert_eq!(code, 202, "{resumed}");
    wait_for(
        async || {
            job(&mesh, 1)
                .await
                .is_some_and(|j| j.1.as_deref() == Some("done"))
        },
        Duration::from_secs(120),
    )
    .await
    .expect("the resumed resync finishes");
    let resumed_job = wait_for_value(
        async || {
            Some(api_job(port, &resumed["job"]["id"]).await).filter(|j| j["state"] == "succeeded")
        },
        Duration::from_secs(30),
    )
    .await
    .expect("the second run's job succeeds");
    assert_eq!(resumed_job["who"], "alice", "{resumed_job}");
    settle(&mesh, &[]).await;
    mesh.assert_converged().await;
    assert_eq!(written_twice(&mesh, "LONDON").await, vec![]);
    let (sent, applied) = crate::flows::resync::second_attempt(&mesh).await;
    assert_eq!(sent, applied, "rows sent twice after the cancel");
    assert_eq!(
        at_cancel + sent,
        i64::from(n),
        "cancelled at {at_cancel}, then {sent}"
    );

    // A replay of MADRID's events to LONDON, cancelled halfway.
    bulk_upsert(&mesh.client("MADRID").await, "MADRID", 100_000, 400).await;
    let paris = mesh.client("PARIS").await;
    wait_for(
        async || {
            let r = paris
                .query_one(
                    "SELECT count(*) FROM sitesync_archive WHERE origin LIKE 'MADRID%'",
                    &[],
                )
                .await
                .unwrap();
            r.get::<_, i64>(0) >= 400
        },
        Duration::from_secs(60),
    )
    .await
    .expect("PARIS archives MADRID's events");
    let replay = serde_json::json!({ "to_site": "LONDON", "origin": "MADRID", "rate": 40 });
    let (code, started) = call(port, "POST", "/api/replay", Some(ADMIN), Some(replay)).await;
    assert_eq!(code, 202, "{started}");
    let replay_id = started["job"]["id"].clone();
    let cancel = serde_json::json!({ "job": replay_id });
    let (code, body) = call(port, "POST", "/api/jobs/cancel", Some(ADMIN), Some(cancel)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["job"]["state"], "cancelled", "{body}");
    assert!(
        body["job"]["result"]
            .as_str()
            .unwrap()
            .starts_with("replay cancelled after"),
        "{body}"
    );

    // The trail: each API step by alice, the runs' own entries too.
    let (_, trail) = call(port, "GET", "/api/audit?limit=100", Some(READ), None).await;
    let entries = trail.as_array().unwrap();
    assert!(
        entries
            .iter()
            .all(|e| e["who"] == "alice" && e["via"] == "api"),
        "{trail}"
    );
    let count = |action: &str, result: &str, text: &str| {
        entries
            .iter()
            .filter(|e| e["action"] == action && e["result"] == result)
            .filter(|e| e["detail"].as_str().unwrap_or_default().contains(text))
            .count()
    };
    assert_eq!(count("resync", "ok", "started as run"), 2, "{trail}");
    assert_eq!(count("replay", "ok", "started as run"), 1, "{trail}");
    assert_eq!(count("resync", "failed", "dry run"), 1, "{trail}");
    assert_eq!(count("resync", "failed", "command line"), 1, "{trail}");
    assert_eq!(
        count("job cancel", "ok", "cancelled (exit code 130)"),
        2,
        "{trail}"
    );
    assert_eq!(count("job cancel", "failed", "not running"), 1, "{trail}");
    assert_eq!(count("resync", "failed", "cancelled after"), 1, "{trail}");
    assert_eq!(count("resync", "ok", "resync job 1 done"), 1, "{trail}");
    assert_eq!(
        count("replay", "failed", "replay cancelled after"),
        1,
        "{trail}"
    );
    for (_, s) in sidecars.iter_mut() {
        assert!(s.terminate().await.success());
    }
}

/// `site`'s row of item `id`: `(n, rev)`.
async fn item(mesh: &Mesh, site: &str, id: i32) -> Option<(i32, uuid::Uuid)> {
    mesh.client(site)
        .await
        .query_opt("SELECT n, rev FROM item WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

#[tokio::test]
async fn choosing_a_conflict_s_losing_write_brings_it_to_every_site_once_and_a_later_write_still_wins()
 {
    use crate::support::mesh::upsert;
    let mesh = Mesh::start(MeshOptions::default()).await;
    let port = free_port();
    enable_admin(&mesh, "LONDON", port, 0o600, &[]);
    // Two writes of one row before any sidecar runs: PARIS's first, then
    // LONDON's, which wins everywhere; LONDON records PARIS's as the loser.
    let (_, paris_rev) = upsert(&mesh.client("PARIS").await, "PARIS", 77, 1).await;
    let (_, london_rev) = upsert(&mesh.client("LONDON").await, "LONDON", 77, 2).await;
    let mut sidecars = mesh.spawn_all();
    until_listening(port).await;
    for site in mesh.sites() {
        wait_for(
            async || item(&mesh, site, 77).await == Some((2, london_rev)),
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("{site} holds LONDON's write: {e}"));
    }
    let conflict = wait_for_value(
        async || {
            let (_, list) = call(port, "GET", "/api/conflicts", Some(READ), None).await;
            list.as_array()?
                .iter()
                .find(|c| c["key"] == "77" && c["loser_origin"] == "PARIS")
                .cloned()
        },
        Duration::from_secs(30),
    )
    .await
    .expect("LONDON records PARIS's losing write");
    assert_eq!(conflict["winner_origin"], "LONDON", "{conflict}");
    assert_eq!(conflict["loser_payload"]["n"], 1, "{conflict}");
    assert!(conflict["reviewed_at"].is_null(), "{conflict}");
    let id = conflict["id"].as_i64().unwrap();

    // Refused: a read token, an unknown conflict.
    let choice = serde_json::json!({ "id": id });
    let (code, body) = call(
        port,
        "POST",
        "/api/conflicts/choose",
        Some(READ),
        Some(choice.clone()),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    let unknown = serde_json::json!({ "id": 999_999 });
    let (code, body) = call(
        port,
        "POST",
        "/api/conflicts/choose",
        Some(ADMIN),
        Some(unknown),
    )
    .await;
    assert_eq!(code, 404, "{body}");

    // Chosen: a new event of LONDON, later than the winner; every site
    // ends on PARIS's losing write.
    let (code, chosen) = call(
        port,
        "POST",
        "/api/conflicts/choose",
        Some(ADMIN),
        Some(choice.clone()),
    )
    .await;
    assert_eq!(code, 200, "{chosen}");
    assert_eq!(
        chosen["event"]["origin"],
        format!("choice:LONDON:{id}"),
        "{chosen}"
    );
    assert_eq!(chosen["event"]["type"], "item.upsert", "{chosen}");
    for site in mesh.sites() {
        wait_for(
            async || item(&mesh, site, 77).await == Some((1, paris_rev)),
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("{site} holds the chosen write: {e}"));
    }
    // Chosen again: the same event, applied nowhere twice.
    let (code, again) = call(
        port,
        "POST",
        "/api/conflicts/choose",
        Some(ADMIN),
        Some(choice),
    )
    .await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["event"]["id"], chosen["event"]["id"], "{again}");
    let event: uuid::Uuid = chosen["event"]["id"].as_str().unwrap().parse().unwrap();
    for site in mesh.sites() {
        let client = mesh.client(site).await;
        wait_for(
            async || {
                let held: i64 = client
                    .query_one(
                        "SELECT count(*) FROM sitesync_inbox WHERE event_id = $1",
                        &[&event],
                    )
                    .await
                    .unwrap()
                    .get(0);
                held == 1
            },
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("{site}'s inbox holds the chosen event once: {e}"));
        let written: i64 = client
            .query_one(
                "SELECT count(*) FROM item_log WHERE by_sink AND rev = $1",
                &[&paris_rev],
            )
            .await
            .unwrap()
            .get(0);
        // PARIS wrote it itself first; the others applied PARIS's event
        // (MADRID, where it did not lose) and the chosen one at most once each.
        assert!(
            written <= 2,
            "{site} wrote PARIS's revision {written} times"
        );
    }
    let listed: Value =
        serde_json::from_str(&mesh.ok("LONDON", &["conflicts", "list", "--json"]).await).unwrap();
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap();
    assert!(
        row["reviewed_at"].is_string(),
        "reviewed once chosen: {row}"
    );

    // A write made after the choice wins over it, as any later write.
    let (_, later) = upsert(&mesh.client("MADRID").await, "MADRID", 77, 3).await;
    for site in mesh.sites() {
        wait_for(
            async || item(&mesh, site, 77).await == Some((3, later)),
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("{site} holds MADRID's later write: {e}"));
    }
    let (_, trail) = call(port, "GET", "/api/audit", Some(READ), None).await;
    let chosen_entries: Vec<&Value> = trail
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "conflict choose")
        .collect();
    assert_eq!(chosen_entries.len(), 3, "{trail}");
    assert!(
        chosen_entries
            .iter()
            .filter(|e| e["result"] == "ok")
            .all(|e| e["who"] == "alice" && e["detail"].as_str().unwrap().contains("sent again")),
        "{trail}"
    );
    for (_, s) in sidecars.iter_mut() {
        assert!(s.terminate().await.success());
    }
}
