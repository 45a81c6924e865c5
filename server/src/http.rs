//! The JSON API (axum). Read-only for now; every route is under `/api/v1`.
//!
//! | route | returns |
//! |---|---|
//! | `GET /api/v1/health` | server version, broker connection, totals |
//! | `GET /api/v1/devices` | every device with first/last seen, online, counts |
//! | `GET /api/v1/devices/{device}` | one device |
//! | `GET /api/v1/devices/{device}/latest` | newest prediction, alert and level per asset |
//! | `GET /api/v1/devices/{device}/predictions?asset=&after_seq=&limit=` | predictions in sequence order |
//! | `GET /api/v1/devices/{device}/alerts?after_seq=&limit=` | alerts in sequence order |
//! | `GET /api/v1/devices/{device}/updates` | update reports: phase, reason, health, rollout, directive, release |
//! | `GET /api/v1/drift?by=feature\|site\|device\|bucket&bucket_s=&model=&release=&site=&device=&feature=&from_ms=&to_ms=` | fleet drift: merged histograms and their scores per group |
//! | `GET /api/v1/drift/drifting?model=&release=&site=` | assets whose latest report has a feature at warn/drift or a data-quality flag, and the sites they are at |
//! | `GET /api/v1/drift/events` | "retraining recommended" events with their evidence |
//! | `POST /api/v1/models` (admin; body: the bundle file) | registers a release, or 422/409 with the reason |
//! | `GET /api/v1/models`, `GET /api/v1/models/{model}` | registered releases |
//! | `POST /api/v1/rollouts` (operator; body: a `rollout::Spec` plus `reason`) | starts a rollout, returns it |
//! | `GET /api/v1/rollouts`, `GET /api/v1/rollouts/{id}` | rollouts: state, waves, every device's state, phase, reason, health |
//! | `POST /api/v1/rollouts/{id}/{pause\|resume\|abort\|revert}` (operator; body `{"reason": ..}`) | the rollout after the action |
//! | `GET /api/v1/audit?limit=` | who did what, when and why (newest first) |
//! | `GET /api/v1/delivery` | bytes of bundle chunks sent per device |
//! | `GET /metrics` | Prometheus text: devices online, records stored per stream, rollouts by state, bundle bytes sent, retraining events, broker connection |
//! | `GET /api/v1/openapi.json` | the OpenAPI 3 description of all of this (`server/api/openapi.json`) |
//!
//! | `GET /api/v1/session` | who the bearer token belongs to and their role (the dashboard's sign-in) |
//! | `GET /api/v1/alerts?open=&limit=` | the fleet's alerts, newest first, with who acknowledged them |
//! | `POST /api/v1/alerts/{device}/{seq}/ack` (operator; body `{"note": ..}`) | acknowledges an alert (audited) |
//!
//! Requests carry `Authorization: Bearer <token>` of a configured `[[users]]` entry: reads
//! need a viewer (open when no users are configured), writes an operator or an admin.
//! `/api/v1/health`, `/api/v1/openapi.json` and `/metrics` are open. The dashboard
//! ([`ui`]) is served at `/`.

mod alerts;
mod rollouts;
mod ui;

use crate::auth::{authorize_read, signed_in};
use crate::config::Role;
use crate::db::Db;
use crate::drift::{self, GroupBy, Profiles};
use crate::drift_db::Filter;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use millwright_shared::drift::DriftSettings;
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct ApiState {
    pub db: Arc<Mutex<Db>>,
    pub broker_connected: Arc<AtomicBool>,
    pub profiles: Arc<std::sync::RwLock<Profiles>>,
    /// The writer task, when rollouts are configured.
    pub requests: Option<tokio::sync::mpsc::Sender<crate::rollouts::Request>>,
    pub users: Arc<Vec<crate::config::User>>,
    pub served: Arc<Mutex<std::collections::HashMap<String, u64>>>,
}

/// How the drift summary route groups (the rest of its query is a [`Filter`]).
#[derive(Debug, Deserialize)]
pub struct Grouping {
    pub by: Option<GroupBy>,
    pub bucket_s: Option<i64>,
}

pub const MAX_PAGE: u64 = 10_000;

#[derive(Debug, Deserialize)]
pub struct Page {
    pub asset: Option<String>,
    #[serde(default)]
    pub after_seq: u64,
    pub limit: Option<u64>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{device}", get(device))
        .route("/api/v1/devices/{device}/latest", get(latest))
        .route("/api/v1/devices/{device}/predictions", get(predictions))
        .route("/api/v1/devices/{device}/alerts", get(alerts))
        .route("/api/v1/devices/{device}/updates", get(updates))
        .route("/api/v1/drift", get(fleet_drift))
        .route("/api/v1/drift/drifting", get(drifting))
        .route("/api/v1/drift/events", get(retraining_events))
        .route("/api/v1/models", post(rollouts::register).get(rollouts::models))
        .route("/api/v1/models/{model}", get(rollouts::model))
        .route("/api/v1/rollouts", post(rollouts::start).get(rollouts::rollouts))
        .route("/api/v1/rollouts/{id}", get(rollouts::rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(rollouts::act))
        .route("/api/v1/audit", get(rollouts::audit))
        .route("/api/v1/delivery", get(rollouts::delivery))
        .route("/api/v1/alerts", get(alerts::feed))
        .route("/api/v1/alerts/{device}/{seq}/ack", post(alerts::acknowledge))
        .route("/api/v1/session", get(session))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .merge(ui::router())
        .layer(axum::extract::DefaultBodyLimit::max(crate::REGISTRY_MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(state.clone(), reads_need_a_viewer))
        .with_state(state)
}

/// Reads that anyone may make without signing in.
const OPEN_READS: [&str; 2] = ["/api/v1/health", "/api/v1/openapi.json"];

async fn reads_need_a_viewer(
    State(state): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // Every method but POST (whose handlers check for an operator or admin themselves) reads:
    // GET, and HEAD, which axum answers from the GET handlers.
    let path = request.uri().path();
    let guarded = request.method() != axum::http::Method::POST
        && path.starts_with("/api/v1/")
        && !OPEN_READS.contains(&path);
    if guarded && let Err((status, m)) = authorize_read(request.headers(), &state.users) {
        return error(status, m);
    }
    next.run(request).await
}

/// Who is signed in: the name and role of the bearer token's user. A server without users is
/// open to read and closed to writes: everyone is its anonymous viewer.
async fn session(State(state): State<ApiState>, headers: axum::http::HeaderMap) -> Response {
    if state.users.is_empty() {
        return Json(json!({ "name": "anonymous", "role": Role::Viewer, "open": true }))
            .into_response();
    }
    match signed_in(&headers, &state.users, Role::Viewer) {
        Ok(user) => {
            Json(json!({ "name": user.name, "role": user.role, "open": false })).into_response()
        }
        Err((status, m)) => error(status, m),
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

/// Runs a query on the reader connection off the async threads.
async fn query<T: serde::Serialize + Send + 'static>(
    state: &ApiState,
    f: impl FnOnce(&Db) -> rusqlite::Result<T> + Send + 'static,
) -> Response {
    let db = state.db.clone();
    let result = tokio::task::spawn_blocking(move || {
        let db = db.lock().map_err(|_| "database lock poisoned".to_owned())?;
        f(&db).map_err(|e| e.to_string())
    })
    .await;
    match result {
        Ok(Ok(value)) => Json(value).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn health(State(state): State<ApiState>) -> Response {
    let connected = state.broker_connected.load(Ordering::Relaxed);
    let sign_in_required = !state.users.is_empty();
    query(&state, move |db| {
        let (devices, predictions, alerts) = db.totals()?;
        Ok(json!({
            "status": if connected { "ok" } else { "degraded" },
            "version": crate::VERSION,
            "broker_connected": connected,
            "devices": devices,
            "predictions": predictions,
            "alerts": alerts,
            "sign_in_required": sign_in_required,
        }))
    })
    .await
}

async fn devices(State(state): State<ApiState>) -> Response {
    query(&state, |db| db.devices()).await
}

async fn device(State(state): State<ApiState>, Path(device): Path<String>) -> Response {
    let db = state.db.clone();
    let found =
        tokio::task::spawn_blocking(move || db.lock().ok().map(|db| db.device(&device))).await;
    match found {
        Ok(Some(Ok(Some(row)))) => Json(row).into_response(),
        Ok(Some(Ok(None))) => error(StatusCode::NOT_FOUND, "no such device"),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "query failed"),
    }
}

async fn latest(State(state): State<ApiState>, Path(device): Path<String>) -> Response {
    query(&state, move |db| db.latest(&device)).await
}

async fn predictions(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    let limit = page.limit.unwrap_or(1000).min(MAX_PAGE);
    query(&state, move |db| db.predictions(&device, page.asset.as_deref(), page.after_seq, limit))
        .await
}

async fn alerts(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    let limit = page.limit.unwrap_or(1000).min(MAX_PAGE);
    query(&state, move |db| db.alerts(&device, page.after_seq, limit)).await
}

/// Prometheus text format.
async fn metrics(State(state): State<ApiState>) -> Response {
    let db = state.db.clone();
    let snapshot = tokio::task::spawn_blocking(move || {
        let db = db.lock().map_err(|_| "database lock poisoned".to_owned())?;
        crate::metrics::read(&db).map_err(|e| e.to_string())
    })
    .await;
    match snapshot {
        Ok(Ok(mut s)) => {
            s.broker_connected = state.broker_connected.load(Ordering::Relaxed);
            s.bundle_bytes_sent = state.served.lock().map(|m| m.values().sum()).unwrap_or(0);
            let content_type = "text/plain; version=0.0.4; charset=utf-8";
            ([(axum::http::header::CONTENT_TYPE, content_type)], crate::metrics::render(&s))
                .into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The OpenAPI 3 description of this API (`server/api/openapi.json`).
pub const OPENAPI: &str = include_str!("../api/openapi.json");

async fn openapi() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn updates(State(state): State<ApiState>, Path(device): Path<String>) -> Response {
    query(&state, move |db| db.update_reports(&device)).await
}

async fn fleet_drift(
    State(state): State<ApiState>,
    Query(filter): Query<Filter>,
    Query(g): Query<Grouping>,
) -> Response {
    let profiles = state.profiles.read().map(|p| p.clone()).unwrap_or_default();
    let by = g.by.unwrap_or(GroupBy::Feature);
    let bucket_ms = g.bucket_s.unwrap_or(3600).max(1) * 1000;
    query(&state, move |db| {
        let rows = db.drift_rows(&filter)?;
        Ok(drift::summarize(&rows, by, bucket_ms, &profiles, &DriftSettings::default()))
    })
    .await
}

async fn drifting(State(state): State<ApiState>, Query(filter): Query<Filter>) -> Response {
    query(&state, move |db| {
        let latest = db.drift_latest(&filter, 1)?;
        let assets = drift::drifting(&latest);
        let mut sites: std::collections::BTreeMap<&str, std::collections::BTreeSet<&str>> =
            Default::default();
        for a in &assets {
            sites.entry(&a.site).or_default().insert(&a.device);
        }
        let sites: Vec<_> = sites
            .into_iter()
            .map(|(site, devices)| json!({ "site": site, "devices": devices }))
            .collect();
        Ok(json!({ "assets": assets, "sites": sites }))
    })
    .await
}

async fn retraining_events(State(state): State<ApiState>) -> Response {
    query(&state, |db| db.retraining_events()).await
}

#[cfg(test)]
mod tests {
    use super::OPENAPI;

    /// Every route the router serves is in the OpenAPI document with the same methods, and the
    /// document describes nothing the router does not serve.
    #[test]
    fn the_openapi_document_describes_exactly_the_routes() {
        let source = include_str!("http.rs");
        let mut served: Vec<(String, String)> = Vec::new();
        for line in source.lines().map(str::trim).filter(|l| l.starts_with(".route(\"")) {
            let path = line.split('"').nth(1).unwrap().to_owned();
            for method in ["get", "post"] {
                if line.contains(&format!("{method}(")) || line.contains(&format!(".{method}(")) {
                    served.push((path.clone(), method.to_owned()));
                }
            }
        }
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.push((path.clone(), method.clone()));
            }
        }
        served.sort();
        documented.sort();
        assert!(served.len() >= 19, "routes not found in the source: {served:?}");
        assert_eq!(served, documented);
    }
}
