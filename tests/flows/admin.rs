//! The admin listener of a running sidecar (`[admin]`): health and
//! readiness without a token, the JSON API only with one, a read token
//! refused on a mutating call, an admin token's call done; a token file
//! others may read refused at start.

use crate::support::mesh::{Mesh, MeshOptions};
use crate::support::rabbit;
use crate::support::wait_for;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const READ: &str = "read-token-for-tests-0123456789";
const ADMIN: &str = "admin-token-for-tests-0123456789";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Adds `[admin]` to `site`'s connector, with a token file of `mode`.
fn enable_admin(mesh: &Mesh, site: &str, port: u16, mode: u32) {
    let file = mesh.connector(site).clone();
    let tokens = file.with_extension("tokens");
    std::fs::write(
        &tokens,
        format!("# test tokens\ngrafana read {READ}\nalice admin {ADMIN}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(mode)).unwrap();
    let mut toml = std::fs::read_to_string(&file).unwrap();
    toml.push_str(&format!(
        "\n[admin]\nlisten = \"127.0.0.1:{port}\"\ntokens_file = \"{}\"\n",
        tokens.display()
    ));
    std::fs::write(&file, toml).unwrap();
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
    enable_admin(&mesh, "LONDON", port, 0o600);
    let mut london = mesh.spawn("LONDON");

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
    let (code, _) = call(port, "GET", "/nowhere", Some(READ), None).await;
    assert_eq!(code, 404);
    assert!(london.terminate().await.success());

    // A token file others may read: the sidecar does not start, and says why.
    let port = free_port();
    enable_admin(&mesh, "MADRID", port, 0o644);
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
