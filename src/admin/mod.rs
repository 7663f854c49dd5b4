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
//!
//! `/health`, `/ready` and `/metrics` answer without a token, as probes
//! and scrapers expect (the listener binds to loopback unless told
//! otherwise); everything under `/api` needs one: 401 without a token or
//! with an unknown one, 403 for a read token on a mutating call, each with
//! a JSON body that says why. Engine work goes through [`Site`], so that
//! this module knows no engine.

pub mod auth;
pub mod site;

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
    /// Marks conflicts reviewed; the ids found.
    fn review(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<Vec<i64>, String>>;
}

struct Shared {
    cfg: ConnectorConfig,
    tokens: Tokens,
    site: Box<dyn Site>,
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

async fn ready() -> Response {
    let parts = crate::metrics::readiness();
    let all = parts.iter().all(|(_, why)| why.is_none());
    let body: serde_json::Map<String, Value> = parts
        .into_iter()
        .map(|(part, why)| (part.to_string(), Value::String(why.unwrap_or("ok".into()))))
        .collect();
    let code = match all {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, Json(json!({ "ready": all, "parts": body }))).into_response()
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
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
    let conn = broker(&ctx.cfg).await?;
    let done = crate::bus::dlq::requeue(&conn, &ctx.cfg.topology, |d| {
        which.all || which.ids.contains(&d.id)
    })
    .await
    .map_err(|e| Failure(StatusCode::BAD_GATEWAY, e.to_string()))?;
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
    Ok(Json(
        json!({ "requeued": sent, "left": left, "missing": missing }),
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
    let found = ctx.site.review(ids.clone()).await.map_err(internal)?;
    let missing: Vec<i64> = ids.iter().filter(|i| !found.contains(i)).copied().collect();
    tracing::info!(by = %who.name, reviewed = found.len(), missing = missing.len(), "admin API: conflicts reviewed");
    Ok(Json(json!({ "reviewed": found, "missing": missing })))
}

async fn not_found() -> Failure {
    Failure(
        StatusCode::NOT_FOUND,
        "no such endpoint: see GET /health, /ready, /metrics, /api/status, /api/jobs, /api/dlq"
            .into(),
    )
}

/// The routes, over `site`.
pub fn router(cfg: ConnectorConfig, tokens: Tokens, site: Box<dyn Site>) -> axum::Router {
    let shared = Arc::new(Shared { cfg, tokens, site });
    axum::Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/jobs", get(jobs))
        .route("/api/dlq", get(dlq))
        .route("/api/dlq/requeue", post(requeue))
        .route("/api/conflicts/review", post(review))
        .fallback(not_found)
        .with_state(shared)
}

/// A bound listener with its tokens, ready to serve.
pub struct Bound {
    listener: tokio::net::TcpListener,
    tokens: Tokens,
}

/// Reads the tokens and binds `[admin] listen`; an error names the file,
/// the variable or the address (the sidecar does not start without its
/// listener).
pub async fn bind(admin: &AdminConfig) -> Result<Bound, String> {
    let tokens = Tokens::load(&admin.tokens_env, admin.tokens_file.as_deref())?;
    if tokens.is_empty() {
        tracing::warn!(env = %admin.tokens_env, "admin API: no token configured: /health, /ready and /metrics answer, every /api call is refused (401)");
    }
    let listener = tokio::net::TcpListener::bind(admin.listen)
        .await
        .map_err(|e| format!("admin.listen {}: {e}", admin.listen))?;
    Ok(Bound { listener, tokens })
}

/// Serves the API on `bound` until `shutdown`.
pub async fn serve(
    cfg: &ConnectorConfig,
    bound: Bound,
    site: Box<dyn Site>,
    mut shutdown: crate::runner::Shutdown,
) -> Result<(), String> {
    let at = bound.listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(listen = %at, "admin API listening");
    axum::serve(bound.listener, router(cfg.clone(), bound.tokens, site))
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
        .map_err(|e| format!("admin API: {e}"))
}
