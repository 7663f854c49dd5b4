//! The sidecar's admin listener (`[admin] listen`): health, readiness,
//! Prometheus metrics and a JSON API over this site, with bearer tokens.
//!
//! | path | scope | what |
//! |---|---|---|
//! | `GET /health` | none | the process answers |
//! | `GET /ready` | none | every part works (source streaming, sink and archive consuming); 503 with each part's reason otherwise |
//! | `GET /metrics` | none | the Prometheus exposition |
//! | `GET /api/status` | read | what `sitesync status` prints, as JSON |
//! | `GET /api/jobs` | read | replays, resyncs, purges (`?limit=N&kind=K`) |
//! | `GET /api/dlq` | read | the dead letters |
//! | `POST /api/dlq/requeue` | admin | `{"ids": [...]}` or `{"all": true}` |
//! | `POST /api/conflicts/review` | admin | `{"ids": [...]}` |
//! | `GET /api/conflicts` | read | the latest conflicts (`?limit=N`) |
//! | `POST /api/conflicts/choose` | admin | `{"id": N, "type": "…"?}`: the losing write sent again, as a new event of this site |
//! | `POST /api/resync` | admin | starts `sitesync resync` (`{"to_site", "routes" or "all", "where", "rate", "pack", "compress"}` or `{"resume": N}`): 202 with its run and job, 400 with the dry run's refusal |
//! | `POST /api/replay` | admin | starts `sitesync replay` (`{"to_site", "origin", "from", "to", "type", "rate"}`), as above |
//! | `POST /api/jobs/cancel` | admin | `{"job": "<job id>"}`: stops a replay or resync this sidecar started (SIGINT); a resync resumes later where it stopped |
//! | `GET /api/runs` | read | the replays and resyncs this sidecar started: pid, exit, last lines of output |
//! | `GET /api/gaps` | read | the open gaps |
//! | `POST /api/gaps/fill` | admin | asks the archive for every open gap now |
//! | `GET /api/audit` | read | the latest manual actions (`?limit=N`) |
//! | `GET /api/overview` | read | this site and each peer's (`[admin] peers`), for the dashboard |
//! | `GET /` | none | the dashboard page (it asks for a token, and reads `/api/overview`) |
//!
//! `/health`, `/ready` and `/metrics` answer without a token, as probes
//! and scrapers expect (the listener binds to loopback unless told
//! otherwise); everything under `/api` needs one: 401 without a token or
//! with an unknown one, 403 for a read token on a mutating call, each with
//! a JSON body that says why. Engine work goes through [`Site`], so that
//! this module knows no engine.

pub mod alerts;
pub mod auth;
pub mod overview;
pub mod runs;
pub mod site;
pub mod tls;

use crate::config::{AdminConfig, ConnectorConfig};
use auth::{Caller, Refused, Scope, Tokens};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// What the API asks of this site's database (the engine's side).
pub trait Site: Send + Sync + 'static {
    /// `sitesync status` as JSON.
    fn status(&self) -> BoxFuture<'_, Result<Value, String>>;
    /// The latest jobs, as `sitesync jobs --json`.
    fn jobs(&self, limit: usize, kind: Option<String>) -> BoxFuture<'_, Result<Value, String>>;
    /// One job, as `sitesync jobs --json` shows it; `None` if there is none.
    fn job(&self, id: uuid::Uuid) -> BoxFuture<'_, Result<Option<Value>, String>>;
    /// Marks conflicts reviewed; the ids found.
    fn review(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<Vec<i64>, String>>;
    /// The latest conflicts, as `sitesync conflicts list --json`.
    fn conflicts(&self, limit: usize) -> BoxFuture<'_, Result<Value, String>>;
    /// Chooses a conflict's losing write (`sitesync conflicts choose`).
    fn choose(
        &self,
        id: i64,
        kind: Option<String>,
    ) -> BoxFuture<'_, Result<crate::conflicts::Chosen, crate::conflicts::ChooseError>>;
    /// The open gaps, as `sitesync gaps list`.
    fn gaps(&self) -> BoxFuture<'_, Result<Value, String>>;
    /// Asks the archive for every open gap now, as `sitesync gaps fill`:
    /// the gaps asked for and how many ranges were sent.
    fn fill_gaps(&self) -> BoxFuture<'_, Result<(Value, usize), String>>;
    /// Records a manual action of the API in the site's audit trail; the
    /// error when it could not (the action stands either way).
    fn audit(
        &self,
        who: String,
        action: &'static str,
        arguments: Value,
        result: Result<String, String>,
    ) -> BoxFuture<'_, Result<(), String>>;
    /// The latest entries of the audit trail, as `sitesync audit --json`.
    fn audit_list(&self, limit: usize) -> BoxFuture<'_, Result<Value, String>>;
}

/// Records `action` by `who` in the audit trail; a failure to record is
/// logged by the engine's side and said in the answer (`audit_error`).
async fn audited(
    ctx: &Shared,
    who: &Caller,
    action: &'static str,
    arguments: Value,
    result: Result<String, String>,
    mut answer: Value,
) -> Value {
    if let Err(e) = ctx
        .site
        .audit(who.name.clone(), action, arguments, result)
        .await
    {
        answer["audit_error"] =
            Value::String(format!("done, but not recorded in the audit trail: {e}"));
    }
    answer
}

struct Shared {
    cfg: ConnectorConfig,
    tokens: Tokens,
    site: Box<dyn Site>,
    peers: Vec<String>,
    /// The site each peer URL last said it was: a peer that stops
    /// answering is still shown by its name.
    names: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Replays and resyncs started through the API.
    runs: runs::Runs,
    /// When the status gauges were last read (ms since the epoch).
    status_read: std::sync::atomic::AtomicU64,
    /// How the peers are reached (`[admin] peers_ca`).
    peer_tls: overview::PeerTls,
}

type Ctx = State<Arc<Shared>>;

/// An error of the API: its status and a JSON body that says why.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"sitesync\""),
            );
        }
        r
    }
}

fn caller(ctx: &Shared, headers: &HeaderMap, needs: Scope) -> Result<Caller, Failure> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    ctx.tokens.check(auth, needs).map_err(|r| match r {
        Refused::Unauthenticated(why) => Failure(StatusCode::UNAUTHORIZED, why.to_string()),
        Refused::Forbidden { name, needs } => Failure(
            StatusCode::FORBIDDEN,
            format!(
                "token `{name}` may not do this: it needs the {} scope",
                needs.as_str()
            ),
        ),
    })
}

fn internal(e: impl std::fmt::Display) -> Failure {
    Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "alive" }))
}

/// Whether every part works, and `{"site": …, "ready": …, "parts": {part:
/// "ok" or why}}`.
fn readiness(site: &str) -> (bool, Value) {
    let parts = crate::metrics::readiness();
    let all = parts.iter().all(|(_, why)| why.is_none());
    let body: serde_json::Map<String, Value> = parts
        .into_iter()
        .map(|(part, why)| (part.to_string(), Value::String(why.unwrap_or("ok".into()))))
        .collect();
    (all, json!({ "site": site, "ready": all, "parts": body }))
}

async fn ready(State(ctx): Ctx) -> Response {
    let (all, body) = readiness(&ctx.cfg.site);
    let code = match all {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, Json(body)).into_response()
}

/// Sets the gauges `status` gives (outbox backlog, conflicts, source lag)
/// and the job gauges from the job rows, when they are older than [`crate::metrics::STATUS_EVERY`]: a scrape
/// reads them fresh, without querying the database on every one.
async fn observe_status(ctx: &Shared) {
    use std::sync::atomic::Ordering;
    let now = now_ms();
    let last = ctx.status_read.load(Ordering::Relaxed);
    let every = crate::metrics::STATUS_EVERY.as_millis() as u64;
    if now.saturating_sub(last) < every
        || ctx
            .status_read
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let read = async { tokio::join!(ctx.site.status(), ctx.site.jobs(50, None)) };
    match tokio::time::timeout(STATUS_WAIT, read).await {
        Ok((status, jobs)) => {
            match status {
                Ok(s) => crate::metrics::site_status(&s),
                Err(e) => tracing::debug!(error = %e, "metrics: the site's status is unknown"),
            }
            match jobs {
                Ok(j) => crate::metrics::site_jobs(&j),
                Err(e) => tracing::debug!(error = %e, "metrics: the site's jobs are unknown"),
            }
        }
        Err(_) => tracing::debug!("metrics: the site's status took over {STATUS_WAIT:?}"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long a scrape waits for the site's status.
const STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The exposition: OpenMetrics when the scraper asks for it (Prometheus
/// does, in its `Accept` header), else Prometheus' classic text format
/// (what `curl` and `promtool check metrics` read).
async fn metrics(State(ctx): Ctx, headers: HeaderMap) -> Response {
    observe_status(&ctx).await;
    let open = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let body = crate::metrics::render();
    match open {
        true => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        false => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::to_classic_text(&body),
        )
            .into_response(),
    }
}

async fn status(State(ctx): Ctx, headers: HeaderMap) -> Result<Json<Value>, Failure> {
    caller(&ctx, &headers, Scope::Read)?;
    let mut status = ctx.site.status().await.map_err(internal)?;
    if let Some(o) = status.as_object_mut() {
        o.insert("site".into(), Value::String(ctx.cfg.site.clone()));
        o.insert("connector".into(), Value::String(ctx.cfg.name.clone()));
    }
    Ok(Json(status))
}

#[derive(Deserialize)]
struct JobsQuery {
    limit: Option<usize>,
    kind: Option<String>,
}

async fn jobs(
    State(ctx): Ctx,
    headers: HeaderMap,
    Query(q): Query<JobsQuery>,
) -> Result<Json<Value>, Failure> {
    caller(&ctx, &headers, Scope::Read)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    Ok(Json(ctx.site.jobs(limit, q.kind).await.map_err(internal)?))
}

fn letter(d: &crate::bus::dlq::DeadLetter) -> Value {
    json!({
        "id": d.id,
        "type": d.kind,
        "origin": d.origin,
        "site": d.site,
        "stage": d.stage,
        "reason": d.reason,
        "attempts": d.attempts,
        "when": d.when,
    })
}

async fn broker(cfg: &ConnectorConfig) -> Result<crate::bus::Link, Failure> {
    crate::bus::connect(
        &cfg.broker.urls,
        cfg.broker.connect_timeout,
        &format!("sitesync-{}-admin", cfg.name),
    )
    .await
    .map_err(|e| Failure(StatusCode::BAD_GATEWAY, e.to_string()))
}

async fn dlq(State(ctx): Ctx, headers: HeaderMap) -> Result<Json<Value>, Failure> {
    caller(&ctx, &headers, Scope::Read)?;
    let conn = broker(&ctx.cfg).await?;
    let letters = crate::bus::dlq::list(&conn, &ctx.cfg.topology)
        .await
        .map_err(|e| Failure(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let _ = conn.close(200, "listed".into()).await;
    Ok(Json(json!({
        "queue": ctx.cfg.topology.dead_letter_queue,
        "dead_letters": letters.iter().map(letter).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
struct Which {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
}

async fn requeue(
    State(ctx): Ctx,
    headers: HeaderMap,
    body: Option<Json<Which>>,
) -> Result<Json<Value>, Failure> {
    let who = caller(&ctx, &headers, Scope::Admin)?;
    let Some(Json(which)) = body else {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "send a JSON body: {\"ids\": [\"<message id>\", …]} or {\"all\": true}".into(),
        ));
    };
    if which.ids.is_empty() && !which.all {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "nothing chosen: give \"ids\" or \"all\": true".into(),
        ));
    }
    let arguments = json!({ "ids": which.ids, "all": which.all });
    let conn = broker(&ctx.cfg).await?;
    let done = match crate::bus::dlq::requeue(&conn, &ctx.cfg.topology, |d| {
        which.all || which.ids.contains(&d.id)
    })
    .await
    {
        Ok(done) => done,
        Err(e) => {
            let e = e.to_string();
            audited(
                &ctx,
                &who,
                crate::audit::actions::DLQ_REQUEUE,
                arguments,
                Err(e.clone()),
                Value::Null,
            )
            .await;
            return Err(Failure(StatusCode::BAD_GATEWAY, e));
        }
    };
    let _ = conn.close(200, "requeued".into()).await;
    let mut sent = Vec::new();
    let mut left = Vec::new();
    for (d, what) in &done {
        match what {
            crate::bus::dlq::Requeued::To(queue) => {
                sent.push(json!({ "id": d.id, "queue": queue }))
            }
            crate::bus::dlq::Requeued::Left(why) => left.push(json!({ "id": d.id, "why": why })),
        }
    }
    let missing: Vec<&String> = which
        .ids
        .iter()
        .filter(|id| !done.iter().any(|(d, _)| &d.id == *id))
        .collect();
    tracing::info!(by = %who.name, sent = sent.len(), left = left.len(), missing = missing.len(), "admin API: dead letters requeued");
    let line = format!(
        "{} sent back, {} left, {} not found",
        sent.len(),
        left.len(),
        missing.len()
    );
    let result = match left.is_empty() && missing.is_empty() {
        true => Ok(line),
        false => Err(line),
    };
    let answer = json!({ "requeued": sent, "left": left, "missing": missing });
    Ok(Json(
        audited(
            &ctx,
            &who,
            crate::audit::actions::DLQ_REQUEUE,
            arguments,
            result,
            answer,
        )
        .await,
    ))
}

#[derive(Deserialize)]
struct Ids {
    ids: Vec<i64>,
}

async fn review(
    State(ctx): Ctx,
    headers: HeaderMap,
    body: Option<Json<Ids>>,
) -> Result<Json<Value>, Failure> {
    let who = caller(&ctx, &headers, Scope::Admin)?;
    let Some(Json(Ids { ids })) = body else {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "send a JSON body: {\"ids\": [<conflict id>, …]}".into(),
        ));
    };
    let arguments = json!({ "ids": ids });
    let found = match ctx.site.review(ids.clone()).await {
        Ok(f) => f,
        Err(e) => {
            audited(
                &ctx,
                &who,
                crate::audit::actions::CONFLICTS_REVIEW,
                arguments,
                Err(e.clone()),
                Value::Null,
            )
            .await;
            return Err(internal(e));
        }
    };
    let missing: Vec<i64> = ids.iter().filter(|i| !found.contains(i)).copied().collect();
    tracing::info!(by = %who.name, reviewed = found.len(), missing = missing.len(), "admin API: conflicts reviewed");
    let line = format!("{} reviewed, {} not found", found.len(), missing.len());
    let result = match missing.is_empty() {
        true => Ok(line),
        false => Err(line),
    };
    let answer = json!({ "reviewed": found, "missing": missing });
    Ok(Json(
        audited(
            &ctx,
            &who,
            crate::audit::actions::CONFLICTS_REVIEW,
            arguments,
            result,
            answer,
        )
        .await,
    ))
}

async fn conflicts(
    State(ctx): Ctx,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, Failure> {
    caller(&ctx, &headers, Scope::Read)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    Ok(Json(ctx.site.conflicts(limit).await.map_err(internal)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Choice {
    id: i64,
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn choose(
    State(ctx): Ctx,
    headers: HeaderMap,
    request: Result<Json<Choice>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, Failure> {
    use crate::conflicts::{ChooseError, Refused};
    let who = caller(&ctx, &headers, Scope::Admin)?;
    let Choice { id, kind } = body(
        request,
        "{\"id\": <conflict id>} (and \"type\" when more than one route writes its table)",
    )?;
    let arguments = json!({ "id": id, "type": kind });
    let action = crate::audit::actions::CONFLICT_CHOOSE;
    let chosen = match ctx.site.choose(id, kind).await {
        Ok(c) => c,
        Err(e) => {
            let code = match &e {
                ChooseError::Refused(Refused::NotFound(_)) => StatusCode::NOT_FOUND,
                ChooseError::Refused(_) => StatusCode::CONFLICT,
                ChooseError::Failed(_) => StatusCode::BAD_GATEWAY,
            };
            return refused(&ctx, &who, action, arguments, code, e.to_string()).await;
        }
    };
    tracing::info!(by = %who.name, conflict = id, event = %chosen.event.id, "admin API: a conflict's losing write chosen");
    let answer = json!({
        "conflict": crate::conflicts::to_json(std::slice::from_ref(&chosen.conflict))[0],
        "event": {
            "id": chosen.event.id,
            "origin": chosen.event.origin,
            "type": chosen.event.kind,
            "timestamp": chosen.event.timestamp.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        },
    });
    Ok(Json(
        audited(&ctx, &who, action, arguments, Ok(chosen.line()), answer).await,
    ))
}

/// This site as the dashboard shows it: its readiness, status and jobs.
async fn own(ctx: &Shared) -> Value {
    let mut out = json!({
        "url": "self",
        "site": ctx.cfg.site,
        "answered": true,
        "ready": readiness(&ctx.cfg.site).1,
    });
    // What is read here also sets the gauges a scrape would read again.
    match ctx.site.status().await {
        Ok(mut s) => {
            crate::metrics::site_status(&s);
            if let Some(o) = s.as_object_mut() {
                o.insert("site".into(), Value::String(ctx.cfg.site.clone()));
            }
            out["status"] = s;
        }
        Err(e) => out["error"] = Value::String(format!("status: {e}")),
    }
    match ctx.site.jobs(overview::JOBS, None).await {
        Ok(j) => {
            crate::metrics::site_jobs(&j);
            out["jobs"] = j;
        }
        Err(e) => out["error"] = Value::String(format!("jobs: {e}")),
    }
    ctx.status_read
        .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    match ctx.site.conflicts(overview::CONFLICTS).await {
        Ok(c) => out["conflicts"] = c,
        Err(e) => out["error"] = Value::String(format!("conflicts: {e}")),
    }
    out["metrics"] = crate::metrics::summary(&crate::metrics::render());
    out
}

async fn overview(State(ctx): Ctx, headers: HeaderMap) -> Result<Json<Value>, Failure> {
    caller(&ctx, &headers, Scope::Read)?;
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let peers = ctx
        .peers
        .iter()
        .map(|p| overview::peer(p.clone(), auth.clone(), ctx.peer_tls.clone()));
    let (me, others, dlq) = tokio::join!(own(&ctx), futures_util::future::join_all(peers), async {
        let conn = broker(&ctx.cfg).await?;
        let letters = crate::bus::dlq::list(&conn, &ctx.cfg.topology)
            .await
            .map_err(|e| Failure(StatusCode::BAD_GATEWAY, e.to_string()));
        let _ = conn.close(200, "listed".into()).await;
        letters
    });
    let mut sites = vec![me];
    {
        let mut names = ctx.names.lock().unwrap_or_else(|p| p.into_inner());
        for mut peer in others {
            let url = peer["url"].as_str().unwrap_or_default().to_string();
            match peer["site"].as_str() {
                Some(site) => {
                    names.insert(url, site.to_string());
                }
                None => {
                    if let Some(site) = names.get(&url) {
                        peer["site"] = Value::String(site.clone());
                    }
                }
            }
            sites.push(peer);
        }
    }
    let dlq = match dlq {
        Ok(l) => json!({ "dead_letters": l.iter().map(letter).collect::<Vec<_>>() }),
        Err(Failure(_, e)) => json!({ "error": e }),
    };
    let audit = match ctx.site.audit_list(overview::JOBS).await {
        Ok(a) => a,
        Err(e) => json!({ "error": e }),
    };
    Ok(Json(json!({
        "site": ctx.cfg.site,
        "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "sites": sites,
        "dlq": dlq,
        "audit": audit,
    })))
}

async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("dashboard.html"))
}

async fn gaps(State(ctx): Ctx, headers: HeaderMap) -> Result<Json<Value>, Failure> {
    caller(&ctx, &headers, Scope::Read)?;
    Ok(Json(ctx.site.gaps().await.map_err(internal)?))
}

async fn fill_gaps(State(ctx): Ctx, headers: HeaderMap) -> Result<Json<Value>, Failure> {
    let who = caller(&ctx, &headers, Scope::Admin)?;
    let (gaps, sent) = match ctx.site.fill_gaps().await {
        Ok(r) => r,
        Err(e) => {
            audited(
                &ctx,
                &who,
                crate::audit::actions::GAPS_FILL,
                json!({}),
                Err(e.clone()),
                Value::Null,
            )
            .await;
            return Err(Failure(StatusCode::CONFLICT, e));
        }
    };
    tracing::info!(by = %who.name, ranges = sent, "admin API: the archive asked for the open gaps");
    let line = format!("asked the archive for {sent} range(s)");
    let answer = json!({ "asked": sent, "gaps": gaps });
    Ok(Json(
        audited(
            &ctx,
            &who,
            crate::audit::actions::GAPS_FILL,
            json!({}),
            Ok(line),
            answer,
        )
        .await,
    ))
}

/// Starts `args` (a replay or resync) as a run once its dry run passes,
/// and waits for its job row: 202 with the run and the job, 400 with the
/// dry run's refusal, 409 when the run ended before it recorded a job.
/// Each outcome is audited as `action`.
/// Records a refused request in the audit trail; the refusal.
async fn refused<T>(
    ctx: &Shared,
    who: &Caller,
    action: &'static str,
    arguments: Value,
    code: StatusCode,
    why: String,
) -> Result<T, Failure> {
    audited(ctx, who, action, arguments, Err(why.clone()), Value::Null).await;
    Err(Failure(code, why))
}

async fn start_run(
    ctx: &Shared,
    who: &Caller,
    kind: &'static str,
    action: &'static str,
    args: Result<Vec<String>, String>,
    arguments: Value,
) -> Result<Response, Failure> {
    let args = match args {
        Ok(a) => a,
        Err(why) => {
            return refused(
                ctx,
                who,
                action,
                arguments.clone(),
                StatusCode::BAD_REQUEST,
                why,
            )
            .await;
        }
    };
    let dry_run = match ctx.runs.dry_run(&args, &who.name).await {
        Ok(text) => text,
        Err(why) => {
            return refused(
                ctx,
                who,
                action,
                arguments.clone(),
                StatusCode::BAD_REQUEST,
                format!("refused by its dry run, nothing sent: {why}"),
            )
            .await;
        }
    };
    let run = match ctx.runs.start(kind, &args, &who.name) {
        Ok(r) => r,
        Err(why) => {
            return refused(
                ctx,
                who,
                action,
                arguments.clone(),
                StatusCode::INTERNAL_SERVER_ERROR,
                why,
            )
            .await;
        }
    };
    // Its job row names the run (`args.run`); until it is written the
    // run is checking, counting and connecting.
    let waited = std::time::Instant::now();
    let job = loop {
        let rows = ctx.site.jobs(50, Some(kind.to_string())).await;
        let found = rows.ok().and_then(|rows| {
            rows.as_array()?
                .iter()
                .find(|j| runs::run_of(j) == Some(run.id))
                .cloned()
        });
        if found.is_some() || waited.elapsed() >= JOB_ROW_WAIT {
            break found;
        }
        if run.exit().is_some() {
            // A last look: the row may have come with its end.
            break None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let exit = run.exit();
    match (&job, &exit) {
        (None, Some(runs::Exit::Code(0))) => {
            let line = format!(
                "run {} {}: {}",
                run.id,
                exit.as_ref().map(runs::Exit::describe).unwrap_or_default(),
                run.lines().join(" / ")
            );
            let answer = json!({ "run": run.to_json(), "job": null, "dry_run": dry_run });
            let answer = audited(ctx, who, action, arguments, Ok(line), answer).await;
            Ok((StatusCode::OK, Json(answer)).into_response())
        }
        (None, Some(e)) => {
            let why = format!(
                "the run ended before it started its job, {}: {}",
                e.describe(),
                run.lines().join(" / ")
            );
            refused(
                ctx,
                who,
                action,
                arguments.clone(),
                StatusCode::CONFLICT,
                why,
            )
            .await
        }
        _ => {
            let line = format!("started as run {} (pid {})", run.id, run.pid);
            let answer = json!({ "run": run.to_json(), "job": job, "dry_run": dry_run });
            let answer = audited(ctx, who, action, arguments, Ok(line), answer).await;
            Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
        }
    }
}

/// How long a started run may take to write its job row before the API
/// answers without it (the run goes on).
const JOB_ROW_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a cancel waits for the run to end.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A JSON body, or 400 saying what is wrong with it and what to send.
fn body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
    send: &str,
) -> Result<T, Failure> {
    body.map(|Json(b)| b).map_err(|e| {
        Failure(
            StatusCode::BAD_REQUEST,
            format!("{}: send {send}", e.body_text()),
        )
    })
}

async fn start_resync(
    State(ctx): Ctx,
    headers: HeaderMap,
    request: Result<Json<runs::ResyncRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Failure> {
    let who = caller(&ctx, &headers, Scope::Admin)?;
    let request = body(
        request,
        "{\"to_site\": \"LONDON\", \"routes\": [\"<event type>\", …] or \"all\": true, \"where\", \"rate\", \"pack\", \"compress\"} or {\"resume\": <job>}",
    )?;
    let arguments = json!({
        "to_site": request.to_site,
        "routes": request.routes,
        "all": request.all,
        "where": request.filter,
        "rate": request.rate,
        "pack": request.pack,
        "compress": request.compress,
        "resume": request.resume,
        "mode": if request.resume.is_some() { "resume" } else { "start" },
    });
    let args = runs::resync_args(&ctx.cfg.file, &request);
    start_run(
        &ctx,
        &who,
        "resync",
        crate::audit::actions::RESYNC,
        args,
        arguments,
    )
    .await
}

async fn start_replay(
    State(ctx): Ctx,
    headers: HeaderMap,
    request: Result<Json<runs::ReplayRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Failure> {
    let who = caller(&ctx, &headers, Scope::Admin)?;
    let request = body(
        request,
        "{\"to_site\": \"LONDON\", \"origin\", \"from\", \"to\", \"type\", \"rate\"}",
    )?;
    let arguments = json!({
        "to_site": request.to_site,
        "origin": request.origin,
        "from": request.from,
        "to": request.to,
        "type": request.kind,
        "rate": request.rate,
    });
    let args = match ctx.cfg.archive.is_some() {
        true => Ok(runs::replay_args(&ctx.cfg.file, &request)),
        false => Err(format!(
            "{} keeps no archive (no [archive] in its connector): ask the archiving site's API ({})",
            ctx.cfg.site,
            ctx.cfg
                .topology
                .archive_site
                .as_deref()
                .unwrap_or("named by archive_site in the topology")
        )),
    };
    start_run(
        &ctx,
        &who,
        "replay",
        crate::audit::actions::REPLAY,
        args,
        arguments,
    )
    .await
}

#[derive(Deserialize)]
struct CancelRequest {
    job: uuid::Uuid,
}

async fn cancel(
    State(ctx): Ctx,
    headers: HeaderMap,
    request: Result<Json<CancelRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, Failure> {
    let who = caller(&ctx, &headers, Scope::Admin)?;
    let CancelRequest { job: id } = body(request, "{\"job\": \"<job id>\"}")?;
    let arguments = json!({ "job": id });
    let job = match ctx.site.job(id).await {
        Ok(Some(j)) => j,
        Ok(None) => {
            return refused(
                &ctx,
                &who,
                crate::audit::actions::JOB_CANCEL,
                arguments.clone(),
                StatusCode::NOT_FOUND,
                format!("no job {id} at {}", ctx.cfg.site),
            )
            .await;
        }
        Err(e) => {
            return refused(
                &ctx,
                &who,
                crate::audit::actions::JOB_CANCEL,
                arguments.clone(),
                StatusCode::INTERNAL_SERVER_ERROR,
                e,
            )
            .await;
        }
    };
    if job["state"] != "running" {
        let why = format!(
            "job {id} is not running: {}{}",
            job["shown_state"].as_str().unwrap_or("?"),
            job["result"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        return refused(
            &ctx,
            &who,
            crate::audit::actions::JOB_CANCEL,
            arguments.clone(),
            StatusCode::CONFLICT,
            why,
        )
        .await;
    }
    let Some(run) = runs::run_of(&job).and_then(|r| ctx.runs.get(r)) else {
        let why = format!(
            "job {id} ({}, by {}) was not started by this sidecar's API: stop it where it runs (Ctrl-C, or SIGINT to its process)",
            job["kind"].as_str().unwrap_or("?"),
            job["who"].as_str().unwrap_or("?")
        );
        return refused(
            &ctx,
            &who,
            crate::audit::actions::JOB_CANCEL,
            arguments.clone(),
            StatusCode::CONFLICT,
            why,
        )
        .await;
    };
    if !run.interrupt() {
        let why = format!(
            "job {id}'s run {} has already ended: {}",
            run.id,
            run.exit().map(|e| e.describe()).unwrap_or_default()
        );
        return refused(
            &ctx,
            &who,
            crate::audit::actions::JOB_CANCEL,
            arguments.clone(),
            StatusCode::CONFLICT,
            why,
        )
        .await;
    }
    tracing::info!(by = %who.name, job = %id, run = %run.id, pid = run.pid, "admin API: job interrupted");
    let exit = run.wait(CANCEL_WAIT).await;
    let job = ctx.site.job(id).await.ok().flatten().unwrap_or(job);
    let result = match &exit {
        Some(e) => Ok(format!(
            "job {id} {}: {}",
            e.describe(),
            job["result"].as_str().unwrap_or("no result recorded")
        )),
        None => Err(format!(
            "job {id} interrupted, still running after {CANCEL_WAIT:?} (pid {})",
            run.pid
        )),
    };
    let answer = json!({ "job": job, "run": run.to_json() });
    Ok(Json(
        audited(
            &ctx,
            &who,
            crate::audit::actions::JOB_CANCEL,
            arguments,
            result,
            answer,
        )
        .await,
    ))
}

async fn list_runs(State(ctx): Ctx, headers: HeaderMap) -> Result<Json<Value>, Failure> {
    caller(&ctx, &headers, Scope::Read)?;
    let runs: Vec<Value> = ctx.runs.list().iter().map(|r| r.to_json()).collect();
    Ok(Json(json!({ "runs": runs })))
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
}

async fn audit_list(
    State(ctx): Ctx,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, Failure> {
    caller(&ctx, &headers, Scope::Read)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    Ok(Json(ctx.site.audit_list(limit).await.map_err(internal)?))
}

async fn not_found() -> Failure {
    Failure(
        StatusCode::NOT_FOUND,
        "no such endpoint: see GET /health, /ready, /metrics, /api/status, /api/jobs, /api/dlq"
            .into(),
    )
}

fn shared(
    cfg: ConnectorConfig,
    tokens: Tokens,
    site: Box<dyn Site>,
    peer_tls: overview::PeerTls,
) -> Arc<Shared> {
    let peers = cfg
        .admin
        .as_ref()
        .map(|a| a.peers.clone())
        .unwrap_or_default();
    let runs = runs::Runs::new().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "admin API: replays and resyncs cannot be started through it");
        runs::Runs::of(std::path::PathBuf::from("sitesync"))
    });
    Arc::new(Shared {
        cfg,
        tokens,
        site,
        peers,
        names: Default::default(),
        runs,
        status_read: Default::default(),
        peer_tls,
    })
}

/// The routes, over `site`.
pub fn router(cfg: ConnectorConfig, tokens: Tokens, site: Box<dyn Site>) -> axum::Router {
    let tls = overview::PeerTls::load(cfg.admin.as_ref()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "admin API: the peers are asked with the public roots");
        overview::PeerTls::default()
    });
    routes(shared(cfg, tokens, site, tls))
}

fn routes(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/api/overview", get(overview))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/jobs", get(jobs))
        .route("/api/dlq", get(dlq))
        .route("/api/dlq/requeue", post(requeue))
        .route("/api/conflicts/review", post(review))
        .route("/api/conflicts", get(conflicts))
        .route("/api/conflicts/choose", post(choose))
        .route("/api/gaps", get(gaps))
        .route("/api/gaps/fill", post(fill_gaps))
        .route("/api/audit", get(audit_list))
        .route("/api/resync", post(start_resync))
        .route("/api/replay", post(start_replay))
        .route("/api/jobs/cancel", post(cancel))
        .route("/api/runs", get(list_runs))
        .fallback(not_found)
        .with_state(shared)
}

/// A bound listener with its tokens, ready to serve.
pub struct Bound {
    listener: tokio::net::TcpListener,
    tokens: Tokens,
    tls: Option<tokio_rustls::TlsAcceptor>,
    peer_tls: overview::PeerTls,
}

/// Reads the tokens and binds `[admin] listen`; an error names the file,
/// the variable or the address (the sidecar does not start without its
/// listener).
pub async fn bind(admin: &AdminConfig) -> Result<Bound, String> {
    let tokens = Tokens::load(&admin.tokens_env, admin.tokens_file.as_deref())?;
    let tls = match &admin.tls {
        Some((cert, key)) => Some(tls::acceptor(cert, key)?),
        None => None,
    };
    let peer_tls = overview::PeerTls::load(Some(admin))?;
    if tokens.is_empty() {
        tracing::warn!(env = %admin.tokens_env, "admin API: no token configured: /health, /ready and /metrics answer, every /api call is refused (401)");
    }
    let listener = tokio::net::TcpListener::bind(admin.listen)
        .await
        .map_err(|e| format!("admin.listen {}: {e}", admin.listen))?;
    Ok(Bound {
        listener,
        tokens,
        tls,
        peer_tls,
    })
}

/// Serves the API on `bound` until `shutdown`.
pub async fn serve(
    cfg: &ConnectorConfig,
    bound: Bound,
    site: Box<dyn Site>,
    mut shutdown: crate::runner::Shutdown,
) -> Result<(), String> {
    let at = bound.listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(listen = %at, tls = bound.tls.is_some(), "admin API listening");
    let shared = shared(cfg.clone(), bound.tokens, site, bound.peer_tls);
    let running = shared.clone();
    let alerting = match cfg.admin.as_ref().and_then(|a| a.webhook_url.clone()) {
        Some(webhook) => {
            let admin = cfg.admin.as_ref().expect("just read");
            let alerts = alerts::AlertConfig {
                webhook,
                every: admin.alert_every,
                peers: admin.peers.clone(),
                tls: shared.peer_tls.clone(),
            };
            let (shared, stop) = (shared.clone(), shutdown.clone());
            Some(tokio::spawn(async move {
                alerts::run(
                    shared.cfg.site.clone(),
                    shared.site.as_ref(),
                    alerts,
                    &shared.names,
                    stop,
                )
                .await
            }))
        }
        None => None,
    };
    let stop = async move { shutdown.wait().await };
    let served = match bound.tls {
        None => {
            axum::serve(bound.listener, routes(shared))
                .with_graceful_shutdown(stop)
                .await
        }
        Some(acceptor) => {
            let listener = tls::TlsListener {
                tcp: bound.listener,
                acceptor,
            };
            axum::serve(listener, routes(shared))
                .with_graceful_shutdown(stop)
                .await
        }
    }
    .map_err(|e| format!("admin API: {e}"));
    if let Some(a) = alerting {
        a.abort();
    }
    running.runs.cancel_all(CANCEL_WAIT).await;
    served
}
