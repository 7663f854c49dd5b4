//! The dashboard in a real headless browser (Debian's Chromium, driven by
//! ChromeDriver over plain WebDriver): three sites, a resync job whose
//! percentage advances on the page, a dead letter requeued from the page,
//! a resync started through the API cancelled from the page, a site
//! stopped and marked with an alert. Screenshots go to the test's
//! output directory (`CARGO_TARGET_TMPDIR/dashboard`).

use crate::support::admin::{self, free_port};
use crate::support::mesh::{Mesh, MeshOptions};
use crate::support::rabbit;
use crate::support::sidecar::binary;
use crate::support::wait_for;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ADMIN: &str = "dashboard-admin-token-0123456789";

/// The WebDriver endpoint and session: plain JSON over HTTP.
#[derive(Clone)]
struct Wd {
    base: String,
    session: String,
    agent: ureq::Agent,
}

impl Wd {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let mut r = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, b) => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(b.unwrap_or(json!({})).to_string().as_bytes()),
        }
        .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let text = r.body_mut().read_to_string().unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(
            v["value"]["error"].is_null(),
            "WebDriver {method} {path}: {text}"
        );
        v["value"].clone()
    }

    /// [`Wd::call`] on the blocking pool (ureq blocks).
    async fn ask(&self, method: &'static str, path: String, body: Option<Value>) -> Value {
        let wd = self.clone();
        tokio::task::spawn_blocking(move || wd.call(method, &path, body))
            .await
            .unwrap()
    }
}

/// A headless Chromium driven by a private ChromeDriver, ended on drop.
struct Browser {
    driver: Child,
    wd: Wd,
    profile: PathBuf,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/setup.sh test installs it)");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut wd = Wd {
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            agent,
        };
        wait_for(
            async || {
                let wd = wd.clone();
                tokio::task::spawn_blocking(move || {
                    wd.agent.get(&format!("{}/status", wd.base)).call().is_ok()
                })
                .await
                .unwrap()
            },
            Duration::from_secs(30),
        )
        .await
        .expect("chromedriver answers");
        let profile = std::env::temp_dir().join(format!("sitesync-chromium-{port}"));
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1500,1100", format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let created = wd.ask("POST", "/session".into(), Some(caps)).await;
        wd.session = created["sessionId"].as_str().unwrap().to_string();
        Browser {
            driver,
            wd,
            profile,
        }
    }

    async fn open(&self, url: String) {
        let path = format!("/session/{}/url", self.wd.session);
        self.wd.ask("POST", path, Some(json!({ "url": url }))).await;
    }

    /// Runs `script` in the page; its return value.
    async fn run(&self, script: &str) -> Value {
        let path = format!("/session/{}/execute/sync", self.wd.session);
        let body = json!({ "script": script, "args": [] });
        self.wd.ask("POST", path, Some(body)).await
    }

    async fn text(&self) -> String {
        self.run("return document.body.innerText")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the page's text satisfies `f`; the text.
    async fn wait_text(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let t = self.text().await;
            if f(&t) {
                return t;
            }
            if std::time::Instant::now() > deadline {
                panic!("the page never showed {what}:\n{t}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A PNG of the page, saved under the test's output directory.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let path = format!("/session/{}/screenshot", self.wd.session);
        let png = self.wd.ask("GET", path, None).await;
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{name}.png"));
        std::fs::write(&file, base64(png.as_str().unwrap())).unwrap();
        file
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.wd.session.is_empty() {
            let _ = self
                .wd
                .agent
                .delete(&format!("{}/session/{}", self.wd.base, self.wd.session))
                .call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Standard base64, decoded (WebDriver's screenshots).
fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u32> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, d)| acc | (d << (18 - 6 * i)));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}

/// `POST path` with the admin token; the JSON answer (any status).
async fn post(port: u16, path: &str, body: Value) -> Value {
    let url = format!("http://127.0.0.1:{port}{path}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(180)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut r = agent
            .post(&url)
            .header("Authorization", format!("Bearer {ADMIN}"))
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let text = r.body_mut().read_to_string().unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    })
    .await
    .unwrap()
}

/// `[admin]` on `site` with an owner-only token file and its peers.
fn enable_admin(mesh: &Mesh, site: &str, port: u16, peers: &[u16]) {
    let tokens = format!("ops admin {ADMIN}\n");
    admin::enable_admin(mesh, site, port, &tokens, 0o600, peers, "");
}

/// The percentages the page shows for running resync jobs.
fn percents(text: &str) -> Vec<u32> {
    text.lines()
        .filter(|l| l.contains('%'))
        .filter_map(|l| {
            l.split_whitespace()
                .zip(l.split_whitespace().skip(1))
                .find(|(_, pct)| *pct == "%")
                .and_then(|(n, _)| n.parse().ok())
        })
        .collect()
}

#[tokio::test]
async fn the_dashboard_shows_every_site_a_resync_advancing_requeues_and_marks_a_stopped_site() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    enable_admin(&mesh, "LONDON", ports[0], &[ports[1], ports[2]]);
    enable_admin(&mesh, "PARIS", ports[1], &[]);
    enable_admin(&mesh, "MADRID", ports[2], &[]);
    let mut sidecars = mesh.spawn_all();
    // Rows only PARIS has, for a paced resync to MADRID.
    mesh.client("PARIS")
        .await
        .execute(
            "INSERT INTO item (id, n, rev, site) SELECT g, 0, md5('r' || g)::uuid, 'OLD' FROM generate_series(0, 24999) g",
            &[],
        )
        .await
        .unwrap();

    let browser = Browser::start().await;
    browser
        .open(format!("http://127.0.0.1:{}/#token={ADMIN}", ports[0]))
        .await;
    // Every site, ready.
    let text = browser
        .wait_text("three ready sites", |t| {
            t.matches("ready").count() >= 3
                && ["LONDON", "PARIS", "MADRID"].iter().all(|s| t.contains(s))
                && !t.contains("not ready")
        })
        .await;
    assert!(!text.contains("not answering"), "{text}");
    // The token left the address.
    let url = browser.run("return location.href").await;
    assert!(!url.as_str().unwrap().contains("token"), "{url}");

    // A resync at PARIS, paced: its percentage advances on the page.
    let mut resync = Command::new(binary())
        .args([
            "resync",
            "--to-site",
            "MADRID",
            "--all",
            "--rate",
            "1500",
            "--yes",
        ])
        .arg("--connector")
        .arg(mesh.connector("PARIS"))
        .env("RUST_LOG", "info,lapin=off")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = browser
        .wait_text("a resync job with a percentage", |t| {
            t.contains("resync") && percents(t).iter().any(|p| *p > 0 && *p < 100)
        })
        .await;
    let p1 = *percents(&first).iter().filter(|p| **p < 100).max().unwrap();
    browser.screenshot("resync-running").await;
    let later = browser
        .wait_text("the percentage advancing", |t| {
            percents(t).iter().any(|p| *p > p1)
        })
        .await;
    assert!(later.contains("resync"), "{later}");

    // Live writes at PARIS: the page shows the rates and the end-to-end
    // latency percentiles of the events applied in the last minute.
    let paris = mesh.client("PARIS").await;
    for id in 0..20 {
        crate::support::mesh::upsert(&paris, "PARIS", 300_000 + id, id).await;
    }
    let text = browser
        .wait_text("end-to-end percentiles", |t| {
            t.lines()
                .any(|l| l.contains("end to end") && l.contains("p50") && l.contains("p99"))
        })
        .await;
    assert!(
        text.lines()
            .any(|l| l.contains("applied") && l.contains("/s")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("its queue") && l.contains("1 consumer(s)")),
        "each sink consumes its queue: {text}"
    );

    // A dead letter, requeued from the page.
    let conn = rabbit::connect(&mesh.amqp_url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        mesh.names.site("LONDON").as_str().into(),
        BasicPublishOptions::default(),
        b"{not json",
        BasicProperties::default().with_message_id("page-garbage-1".into()),
    )
    .await
    .unwrap();
    browser
        .wait_text("the dead letter", |t| t.contains("page-garbage-1"))
        .await;
    let clicked = browser
        .run("const b = document.querySelector(\"button.requeue[data-id='page-garbage-1']\"); if (!b) return false; b.click(); return true;")
        .await;
    assert_eq!(clicked, Value::Bool(true));
    browser
        .wait_text("the requeue's answer", |t| {
            t.contains("page-garbage-1: sent back to")
        })
        .await;
    // The requeue is in LONDON's audit trail on the page, by the token.
    browser
        .wait_text("the requeue in the audit trail", |t| {
            t.lines()
                .any(|l| l.contains("ops") && l.contains("api") && l.contains("dlq requeue"))
        })
        .await;

    // A resync started through LONDON's API, cancelled from the page: the
    // button is there for this site's own running job, the job ends
    // `cancelled` and says how to resume it.
    mesh.client("LONDON")
        .await
        .execute(
            "INSERT INTO item (id, n, rev, site) SELECT g, 0, md5('l' || g)::uuid, 'OLD' FROM generate_series(200000, 204999) g",
            &[],
        )
        .await
        .unwrap();
    let started = post(
        ports[0],
        "/api/resync",
        json!({ "to_site": "PARIS", "all": true, "rate": 200 }),
    )
    .await;
    assert_eq!(started["job"]["state"], "running", "{started}");
    let job = started["job"]["id"].as_str().unwrap().to_string();
    let button = format!("button.cancel[data-job='{job}']");
    wait_for(
        async || {
            browser
                .run(&format!(
                    "return document.querySelector(\"{button}\") !== null"
                ))
                .await
                == Value::Bool(true)
        },
        Duration::from_secs(30),
    )
    .await
    .expect("a cancel button for the running resync");
    let clicked = browser
        .run(&format!(
            "document.querySelector(\"{button}\").click(); return true;"
        ))
        .await;
    assert_eq!(clicked, Value::Bool(true));
    let text = browser
        .wait_text("the cancel's answer", |t| {
            t.contains(&format!("job {job}: cancelled (exit code 130)"))
        })
        .await;
    assert!(
        text.contains("--resume"),
        "the job's result says how to go on: {text}"
    );
    browser.screenshot("resync-cancelled").await;

    // MADRID stops: the page marks it and raises the alert.
    assert!(resync.wait().unwrap().success());
    let mut madrid = sidecars.remove("MADRID").unwrap();
    assert!(madrid.terminate().await.success());
    let text = browser
        .wait_text("MADRID marked as not answering", |t| {
            t.contains("not answering") && t.contains("MADRID: not answering")
        })
        .await;
    assert!(text.contains("PARIS"), "{text}");
    let shot = browser.screenshot("site-down").await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "{shot:?}");
    for (_, mut s) in sidecars {
        assert!(s.terminate().await.success());
    }
}
