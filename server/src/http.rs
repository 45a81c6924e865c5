//! The JSON API (axum). Read-only for now; every route is under `/api/v1`.
//!
//! | route | returns |
//! |---|---|
//! | `GET /api/v1/health` | server version, broker connection, totals, what retention removed |
//! | `GET /api/v1/devices` | every device with first/last seen, online, counts |
//! | `GET /api/v1/devices/{device}` | one device |
//! | `GET /api/v1/devices/{device}/latest` | newest prediction, alert and level per asset |
//! | `GET /api/v1/devices/{device}/predictions?asset=&after_seq=&limit=&newest=` | predictions in sequence order: the first `limit` (1,000; at most 10,000), or the newest with `newest=true` |
//! | `GET /api/v1/devices/{device}/predictions/hourly?asset=&from_ms=&limit=` | what retention kept of removed predictions: per asset, release and hour, the count, mean, min, max and last value |
//! | `GET /api/v1/devices/{device}/alerts?after_seq=&limit=&newest=` | alerts in sequence order, the first or the newest |
//! | `GET /api/v1/devices/{device}/gaps` | what the device dropped by policy: ranges, reason, time, per-asset summaries of dropped predictions |
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
mod enrollments;
mod rollouts;
mod ui;

use crate::auth::{authorize_read, bearer, signed_in, user_of};
use crate::config::Role;
use crate::db::Db;
use crate::drift::{self, GroupBy, Profiles};
use crate::drift_db::Filter;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use millwright_shared::drift::DriftSettings;
use millwright_shared::lockout::{Decision, Lockout};
use millwright_shared::refusals::Refusals;
use serde::Deserialize;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The server's MQTT connection as its loop sees it, shared with the API.
#[derive(Debug, Default)]
pub struct BrokerLink {
    pub connected: AtomicBool,
    /// The broker kept the connection but acknowledged no publish for a while; cleared by the
    /// next PUBACK.
    pub stalled: AtomicBool,
    /// Stalls detected since start (each one a reconnection).
    pub stalls: AtomicU64,
    /// Publishes given up because the MQTT client's queue was full (the loop never waits on
    /// the broker; a device resends what was not acknowledged).
    pub publishes_dropped: AtomicU64,
}

impl BrokerLink {
    /// Why the link is not healthy, if it is not.
    pub fn degraded(&self) -> Option<&'static str> {
        if !self.connected.load(Ordering::Relaxed) {
            Some("not connected to the broker")
        } else if self.stalled.load(Ordering::Relaxed) {
            Some("the broker acknowledges no publish (reconnected, waiting for progress)")
        } else {
            None
        }
    }
}

#[derive(Clone)]
pub struct ApiState {
    pub db: Arc<ReadPool>,
    pub broker: Arc<BrokerLink>,
    pub profiles: Arc<std::sync::RwLock<Profiles>>,
    /// The writer task.
    pub requests: Option<tokio::sync::mpsc::Sender<crate::writer::Request>>,
    pub users: Arc<Vec<crate::config::User>>,
    pub served: Arc<Mutex<std::collections::HashMap<String, u64>>>,
    /// The chunk queue, when rollouts are configured.
    pub delivery: Option<Arc<crate::rollouts::Delivery>>,
    /// Wrong tokens per client address.
    pub lockout: Arc<Mutex<Lockout<IpAddr>>>,
    /// Refused MQTT messages and connections (shared with the ingest loop and the broker).
    pub refusals: Arc<Mutex<Refusals>>,
    /// Messages waiting for their device's budget (set by the ingest loop).
    pub queued: Arc<AtomicU64>,
    pub registry: crate::identity::SharedRegistry,
    /// The server's message key (hex), for enrollment.
    pub server_key: String,
    pub https: bool,
    /// The last `/metrics` text and when it was made: scrapes more often than once a second
    /// get it again instead of new database queries.
    pub metrics_cache: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, String)>>>,
    /// What retention has removed ([`crate::retention_db`]).
    pub retention: Arc<Mutex<crate::retention::Report>>,
}

/// Reader connections to the database: WAL lets any number of them read beside the writer,
/// so concurrent API reads do not queue behind one connection. Idle ones are kept for reuse.
pub struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Db>>,
}

/// Idle reader connections kept.
const POOL_IDLE: usize = 8;

impl ReadPool {
    pub fn new(path: PathBuf) -> ReadPool {
        ReadPool { path, idle: Mutex::new(Vec::new()) }
    }

    /// Runs `f` on a reader connection (blocking: call it off the async threads).
    pub fn with<T>(&self, f: impl FnOnce(&Db) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let db = match pooled {
            Some(db) => db,
            None => Db::open_reader(&self.path)?,
        };
        let result = f(&db);
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < POOL_IDLE
        {
            idle.push(db);
        }
        result
    }
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
    /// The newest `limit` records (still in sequence order) instead of the first.
    #[serde(default)]
    pub newest: bool,
}

/// The body a request may carry, except a bundle being registered.
pub const MAX_BODY: usize = 64 << 10;

/// Answers are JSON or the dashboard's own files: nothing may frame them or load anything else.
const API_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";

pub fn router(state: ApiState) -> Router {
    let https = state.https;
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{device}", get(device))
        .route("/api/v1/devices/{device}/latest", get(latest))
        .route("/api/v1/devices/{device}/predictions", get(predictions))
        .route("/api/v1/devices/{device}/predictions/hourly", get(prediction_hours))
        .route("/api/v1/devices/{device}/alerts", get(alerts))
        .route("/api/v1/devices/{device}/updates", get(updates))
        .route("/api/v1/devices/{device}/streams", get(streams))
        .route("/api/v1/devices/{device}/gaps", get(gaps))
        .route("/api/v1/drift", get(fleet_drift))
        .route("/api/v1/drift/drifting", get(drifting))
        .route("/api/v1/drift/events", get(retraining_events))
        .route("/api/v1/models", bundles(post(rollouts::register).get(rollouts::models)))
        .route("/api/v1/models/{model}", get(rollouts::model))
        .route("/api/v1/rollouts", post(rollouts::start).get(rollouts::rollouts))
        .route("/api/v1/rollouts/{id}", get(rollouts::rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(rollouts::act))
        .route("/api/v1/audit", get(rollouts::audit))
        .route("/api/v1/delivery", get(rollouts::delivery))
        .route("/api/v1/alerts", get(alerts::feed))
        .route("/api/v1/alerts/{device}/{seq}/ack", post(alerts::acknowledge))
        .route("/api/v1/enrollments", post(enrollments::enroll).get(enrollments::list))
        .route("/api/v1/enrollments/{device}/revoke", post(enrollments::revoke))
        .route("/api/v1/identity", get(enrollments::identity))
        .route("/api/v1/session", get(session))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .merge(ui::router())
        .layer(axum::middleware::map_response(move |mut response: Response| async move {
            millwright_io::https::secure_headers(response.headers_mut(), API_POLICY, https);
            response
        }))
        .with_state(state)
}

/// A route whose POST carries a bundle: its body limit is the registry's, not [`MAX_BODY`].
fn bundles(route: axum::routing::MethodRouter<ApiState>) -> axum::routing::MethodRouter<ApiState> {
    route.layer(axum::extract::DefaultBodyLimit::max(crate::REGISTRY_MAX_BODY))
}

/// Reads that anyone may make without signing in.
const OPEN_READS: [&str; 3] = ["/api/v1/health", "/api/v1/openapi.json", "/api/v1/identity"];

/// Before any handler runs (and before a request body is read): a token that is sent must
/// belong to a user, or the client's address is counted towards a lockout; writes (POST) need
/// a token at all; reads need a viewer's once users exist. A locked-out address gets 429.
async fn authenticate(
    State(state): State<ApiState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    let write = request.method() == axum::http::Method::POST;
    let now_ms = millwright_io::clock::now_ms();
    if state.users.is_empty() {
        // Open to read, closed to writes: no token can be right, so none is checked.
        if write {
            return error(StatusCode::UNAUTHORIZED, "this server has no users: it takes no writes");
        }
        return next.run(request).await;
    }
    if let Some(token) = bearer(request.headers()) {
        let ip = client.ip();
        let locked = state.lockout.lock().map(|mut l| l.check(&ip, now_ms));
        if let Ok(Decision::Locked { retry_after_ms }) = locked {
            return too_many(retry_after_ms);
        }
        if user_of(&state.users, token).is_none() {
            let decision = state.lockout.lock().map(|mut l| l.failure(&ip, now_ms));
            if let Ok(Decision::LockedNow { retry_after_ms }) = decision {
                tracing::warn!(%ip, "too many wrong API tokens; address locked out");
                return too_many(retry_after_ms);
            }
            return error(StatusCode::UNAUTHORIZED, "unknown token");
        }
    } else if write {
        return error(StatusCode::UNAUTHORIZED, "sign in: send Authorization: Bearer <token>");
    }
    // Every method but POST reads: GET, and HEAD, which axum answers from the GET handlers.
    let guarded = !write && path.starts_with("/api/v1/") && !OPEN_READS.contains(&path);
    if guarded && let Err((status, m)) = authorize_read(request.headers(), &state.users) {
        return error(status, m);
    }
    next.run(request).await
}

fn too_many(retry_after_ms: i64) -> Response {
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        "too many wrong tokens from this address; try again later",
    );
    let secs = (retry_after_ms + 999) / 1000;
    response.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
    response
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

/// Runs a query on a reader connection off the async threads.
async fn query<T: serde::Serialize + Send + 'static>(
    state: &ApiState,
    f: impl FnOnce(&Db) -> rusqlite::Result<T> + Send + 'static,
) -> Response {
    let db = state.db.clone();
    let result = tokio::task::spawn_blocking(move || db.with(f).map_err(|e| e.to_string())).await;
    match result {
        Ok(Ok(value)) => Json(value).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// A sequence number given in a query, which SQLite stores as a signed 64-bit integer.
fn seq_param(seq: u64) -> Result<u64, Box<Response>> {
    match i64::try_from(seq) {
        Ok(_) => Ok(seq),
        Err(_) => Err(Box::new(error(StatusCode::BAD_REQUEST, "after_seq is above 2^63 - 1"))),
    }
}

async fn health(State(state): State<ApiState>) -> Response {
    let connected = state.broker.connected.load(Ordering::Relaxed);
    let degraded = state.broker.degraded();
    let sign_in_required = !state.users.is_empty();
    let dropped = state.broker.publishes_dropped.load(Ordering::Relaxed);
    let retention = state.retention.lock().map(|r| r.clone()).unwrap_or_default();
    let delivery = state.delivery.as_ref().map(|d| d.stats()).unwrap_or_default();
    query(&state, move |db| {
        let (devices, predictions, alerts) = db.totals()?;
        Ok(json!({
            "status": if degraded.is_some() { "degraded" } else { "ok" },
            "degraded_reason": degraded,
            "version": crate::VERSION,
            "broker_connected": connected,
            "publishes_dropped": dropped,
            "devices": devices,
            "predictions": predictions,
            "alerts": alerts,
            "sign_in_required": sign_in_required,
            "retention": retention,
            "delivery": delivery,
        }))
    })
    .await
}

async fn devices(State(state): State<ApiState>) -> Response {
    query(&state, |db| db.devices()).await
}

async fn device(State(state): State<ApiState>, Path(device): Path<String>) -> Response {
    let db = state.db.clone();
    let found = tokio::task::spawn_blocking(move || db.with(|db| db.device(&device))).await;
    match found {
        Ok(Ok(Some(row))) => Json(row).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "no such device"),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "query failed"),
    }
}

/// Per stream: how many records of the device are stored and the highest sequence number.
async fn streams(State(state): State<ApiState>, Path(device): Path<String>) -> Response {
    query(&state, move |db| db.streams(&device)).await
}

async fn gaps(State(state): State<ApiState>, Path(device): Path<String>) -> Response {
    query(&state, move |db| db.gaps(&device)).await
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
    let after = match seq_param(page.after_seq) {
        Ok(a) => a,
        Err(e) => return *e,
    };
    query(&state, move |db| {
        db.predictions(&device, page.asset.as_deref(), after, limit, page.newest)
    })
    .await
}

/// Which hourly summaries a query wants.
#[derive(Debug, Deserialize)]
struct HourPage {
    asset: Option<String>,
    #[serde(default = "i64_min")]
    from_ms: i64,
    limit: Option<u64>,
}

fn i64_min() -> i64 {
    i64::MIN
}

/// The hourly summaries of predictions retention has removed, in hour order.
async fn prediction_hours(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    Query(page): Query<HourPage>,
) -> Response {
    let limit = page.limit.unwrap_or(1000).min(MAX_PAGE);
    query(&state, move |db| {
        db.prediction_hours(&device, page.asset.as_deref(), page.from_ms, limit)
    })
    .await
}

async fn alerts(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    let limit = page.limit.unwrap_or(1000).min(MAX_PAGE);
    let after = match seq_param(page.after_seq) {
        Ok(a) => a,
        Err(e) => return *e,
    };
    query(&state, move |db| db.alerts(&device, after, limit, page.newest)).await
}

/// Prometheus text format, made at most once a second.
async fn metrics(State(state): State<ApiState>) -> Response {
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    let mut cache = state.metrics_cache.lock().await;
    if let Some((at, text)) = cache.as_ref()
        && at.elapsed() < std::time::Duration::from_secs(1)
    {
        return ([(axum::http::header::CONTENT_TYPE, content_type)], text.clone()).into_response();
    }
    let db = state.db.clone();
    let snapshot = tokio::task::spawn_blocking(move || {
        db.with(crate::metrics::read).map_err(|e| e.to_string())
    })
    .await;
    match snapshot {
        Ok(Ok(mut s)) => {
            s.broker_connected = state.broker.connected.load(Ordering::Relaxed);
            s.broker_stalled = state.broker.stalled.load(Ordering::Relaxed);
            s.broker_stalls = state.broker.stalls.load(Ordering::Relaxed);
            s.publishes_dropped = state.broker.publishes_dropped.load(Ordering::Relaxed);
            s.bundle_bytes_sent = state.served.lock().map(|m| m.values().sum()).unwrap_or(0);
            s.chunks_queued = state.delivery.as_ref().map_or(0, |d| d.stats().queued);
            if let Ok(r) = state.retention.lock() {
                s.retention_removed = vec![
                    ("predictions", r.predictions),
                    ("hourly", r.hourly),
                    ("alerts", r.alerts),
                    ("drift_reports", r.drift_reports),
                ];
            }
            if let Ok(r) = state.refusals.lock() {
                s.refused = r.counts().iter().map(|(k, n)| ((*k).to_owned(), *n)).collect();
            }
            s.enrolled = state.registry.read().map_or(0, |r| r.enrolled() as u64);
            s.sign_in_lockouts = state.lockout.lock().map_or(0, |l| l.lockouts);
            s.queued = state.queued.load(Ordering::Relaxed);
            let text = crate::metrics::render(&s);
            *cache = Some((tokio::time::Instant::now(), text.clone()));
            ([(axum::http::header::CONTENT_TYPE, content_type)], text).into_response()
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
    // At most a year: `* 1000` stays far from overflowing.
    let bucket_ms = g.bucket_s.unwrap_or(3600).clamp(1, 366 * 86_400) * 1000;
    query(&state, move |db| {
        let rows = db.drift_rows(&filter)?;
        Ok(drift::summarize(&rows, by, bucket_ms, &profiles, &DriftSettings::default()))
    })
    .await
}

async fn drifting(State(state): State<ApiState>, Query(filter): Query<Filter>) -> Response {
    query(&state, move |db| {
        let latest = db.drift_latest(&filter)?;
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
        assert!(served.len() >= 23, "routes not found in the source: {served:?}");
        assert_eq!(served, documented);
    }
}
