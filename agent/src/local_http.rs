//! The local HTTP adapter (axum): the operator's page, its JSON API and `/metrics`, served
//! from the snapshot the event loop publishes. It never touches the outbox or the uplink, so
//! it keeps answering while the broker is down; the one write, acknowledging an alert, is a
//! request to the loop, refused without the operator PIN.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the page ([`crate::page`]) |
//! | `GET /api/status` | the [`Status`] snapshot as JSON |
//! | `GET /api/assets/{asset}/history?hours=` | the asset's recent predictions (default 12 h) |
//! | `POST /api/alerts/{asset}/ack` | JSON `{"pin": "…"}`: acknowledge its open alert |
//! | `POST /alerts/{asset}/ack` | the page's form (`pin=…`); answers with a redirect to `/` |
//! | `GET /metrics` | Prometheus text ([`crate::metrics`]) |
//! | `GET /page.js` | the page's few lines of script (reload every few seconds) |
//!
//! Every answer carries a strict content security policy and `X-Frame-Options: DENY`; the
//! form is refused when a browser says it was posted from another site; wrong PINs lock the
//! client's address out for a while ([`millwright_shared::lockout`]), during which even the
//! right PIN is refused.

use crate::status::{AckOutcome, Point, Status, since};
use crate::{clock, metrics, page};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use millwright_shared::lockout::{Decision, Limits, Lockout};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// What the page shows: the status and each asset's prediction history.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub status: Status,
    pub history: BTreeMap<String, Vec<Point>>,
}

/// A request from the page to the event loop.
#[derive(Debug)]
pub enum LocalRequest {
    Ack { asset: String, reply: oneshot::Sender<AckOutcome> },
}

/// History served when the query names no span.
pub const DEFAULT_HISTORY_HOURS: f64 = 12.0;

/// A wrong PIN is answered this late, to slow down guessing.
const WRONG_PIN_DELAY: Duration = Duration::from_millis(500);

/// Scripts only from the page's own origin, styles inline, nothing else loaded, no framing.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
                      img-src data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Wrong PINs per client address: the attempts allowed before a lockout, and the lockouts.
#[derive(Debug)]
pub struct PinGuard {
    lockout: Mutex<Lockout<IpAddr>>,
}

impl Default for PinGuard {
    fn default() -> Self {
        PinGuard { lockout: Mutex::new(Lockout::new(Limits::default())) }
    }
}

impl PinGuard {
    /// Lockouts started since the agent started.
    pub fn lockouts(&self) -> u64 {
        self.lockout.lock().map_or(0, |l| l.lockouts)
    }

    fn begin(&self, client: IpAddr) -> Decision {
        let mut l = self.lockout.lock().unwrap_or_else(|e| e.into_inner());
        l.begin(&client, clock::now_ms())
    }

    fn success(&self, client: IpAddr) {
        self.lockout.lock().unwrap_or_else(|e| e.into_inner()).success(&client);
    }
}

#[derive(Clone)]
struct AppState {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    requests: mpsc::Sender<LocalRequest>,
    pin: Option<Arc<str>>,
    guard: Arc<PinGuard>,
}

/// Why a request is refused.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "no operator PIN is configured on this gateway ([local] operator_pin); acknowledging is disabled"
    )]
    NoPin,
    #[error("wrong operator PIN")]
    WrongPin,
    #[error("too many wrong PINs from this address; try again in {0} s")]
    LockedOut(i64),
    #[error("the form was posted from another site")]
    CrossSite,
    #[error("unknown asset {0:?}")]
    UnknownAsset(String),
    #[error("asset {0:?} has no open alert")]
    NoOpenAlert(String),
    #[error("hours must be a number above 0")]
    BadHours,
    #[error("the agent is shutting down")]
    Unavailable,
}

impl LocalError {
    fn status(&self) -> StatusCode {
        match self {
            LocalError::NoPin | LocalError::WrongPin | LocalError::CrossSite => {
                StatusCode::FORBIDDEN
            }
            LocalError::LockedOut(_) => StatusCode::TOO_MANY_REQUESTS,
            LocalError::UnknownAsset(_) => StatusCode::NOT_FOUND,
            LocalError::NoOpenAlert(_) => StatusCode::CONFLICT,
            LocalError::BadHours => StatusCode::BAD_REQUEST,
            LocalError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for LocalError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status(), Json(serde_json::json!({ "error": self.to_string() }))).into_response();
        if let LocalError::LockedOut(secs) = self {
            response.headers_mut().insert(header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// Compares without stopping at the first differing byte.
fn pin_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The router, serving `snapshot` and sending acknowledgements to `requests`.
pub fn router(
    snapshot: watch::Receiver<Arc<Snapshot>>,
    requests: mpsc::Sender<LocalRequest>,
    pin: Option<String>,
    guard: Arc<PinGuard>,
    https: bool,
) -> Router {
    let state = AppState { snapshot, requests, pin: pin.map(Arc::from), guard };
    Router::new()
        .route("/", get(page_route))
        .route("/page.js", get(script_route))
        .route("/api/status", get(status_route))
        .route("/api/assets/{asset}/history", get(history_route))
        .route("/api/alerts/{asset}/ack", post(ack_json))
        .route("/alerts/{asset}/ack", post(ack_form))
        .route("/metrics", get(metrics_route))
        .layer(axum::middleware::map_response(move |mut response: Response| async move {
            millwright_io::https::secure_headers(response.headers_mut(), POLICY, https);
            response
        }))
        .with_state(state)
}

/// Serves on `listener` until the process ends: HTTPS with `tls`, plain HTTP without.
pub fn spawn(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
) {
    tokio::spawn(async move {
        if let Err(e) = millwright_io::https::serve(listener, tls, router).await {
            tracing::error!("local page server stopped: {e}");
        }
    });
}

fn current(state: &AppState) -> Arc<Snapshot> {
    state.snapshot.borrow().clone()
}

async fn page_route(State(state): State<AppState>) -> Html<String> {
    let s = current(&state);
    Html(page::render(&s.status, &s.history, clock::now_ms()))
}

async fn script_route() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], page::script())
}

async fn status_route(State(state): State<AppState>) -> Json<Status> {
    Json(current(&state).status.clone())
}

async fn metrics_route(State(state): State<AppState>) -> impl IntoResponse {
    let s = current(&state);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        metrics::render(&s.status, clock::now_ms()),
    )
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    hours: Option<f64>,
}

async fn history_route(
    State(state): State<AppState>,
    Path(asset): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<serde_json::Value>, LocalError> {
    let hours = q.hours.unwrap_or(DEFAULT_HISTORY_HOURS);
    if !hours.is_finite() || hours <= 0.0 {
        return Err(LocalError::BadHours);
    }
    let s = current(&state);
    if !s.status.assets.iter().any(|a| a.asset == asset) {
        return Err(LocalError::UnknownAsset(asset));
    }
    let points = s.history.get(&asset).map(Vec::as_slice).unwrap_or_default();
    let from_ms = clock::now_ms().saturating_sub((hours.min(1e6) * 3_600_000.0) as i64);
    Ok(Json(
        serde_json::json!({ "asset": asset, "hours": hours, "points": since(points, from_ms) }),
    ))
}

#[derive(Debug, Deserialize)]
struct AckBody {
    pin: String,
}

async fn acknowledge(
    state: &AppState,
    client: IpAddr,
    asset: String,
    pin: &str,
) -> Result<AckOutcome, LocalError> {
    let Some(expected) = &state.pin else { return Err(LocalError::NoPin) };
    match state.guard.begin(client) {
        Decision::Attempt => {}
        Decision::Locked { retry_after_ms } => {
            return Err(LocalError::LockedOut((retry_after_ms + 999) / 1000));
        }
        Decision::LockedNow { retry_after_ms } => {
            tracing::warn!(%client, "operator PIN: too many wrong attempts; address locked out");
            return Err(LocalError::LockedOut((retry_after_ms + 999) / 1000));
        }
    }
    if !pin_matches(expected, pin) {
        tracing::warn!(asset, %client, "alert acknowledgement refused: wrong operator PIN");
        tokio::time::sleep(WRONG_PIN_DELAY).await;
        return Err(LocalError::WrongPin);
    }
    state.guard.success(client);
    let (reply, answer) = oneshot::channel();
    state
        .requests
        .send(LocalRequest::Ack { asset: asset.clone(), reply })
        .await
        .map_err(|_| LocalError::Unavailable)?;
    match answer.await.map_err(|_| LocalError::Unavailable)? {
        AckOutcome::UnknownAsset => Err(LocalError::UnknownAsset(asset)),
        AckOutcome::NoOpenAlert => Err(LocalError::NoOpenAlert(asset)),
        done => Ok(done),
    }
}

async fn ack_json(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(asset): Path<String>,
    Json(body): Json<AckBody>,
) -> Result<Json<serde_json::Value>, LocalError> {
    if !millwright_io::https::same_origin(&headers) {
        return Err(LocalError::CrossSite);
    }
    let outcome = acknowledge(&state, client.ip(), asset.clone(), &body.pin).await?;
    Ok(Json(serde_json::json!({ "asset": asset, "outcome": outcome })))
}

async fn ack_form(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(asset): Path<String>,
    Form(body): Form<AckBody>,
) -> Response {
    let outcome = match millwright_io::https::same_origin(&headers) {
        true => acknowledge(&state, client.ip(), asset, &body.pin).await,
        false => Err(LocalError::CrossSite),
    };
    match outcome {
        Ok(_) => Redirect::to("/").into_response(),
        Err(e) => {
            let mut response = (
                e.status(),
                Html(format!(
                    "<!doctype html><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
                     <title>Not acknowledged</title><p>Not acknowledged: {}.</p><p><a href=\"/\">Back</a></p>",
                    page::escape(&e.to_string())
                )),
            )
                .into_response();
            if let LocalError::LockedOut(secs) = e {
                response.headers_mut().insert(header::RETRY_AFTER, secs.into());
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{AssetStatus, OpenAlert, acknowledge};
    use millwright_shared::wire::Level;

    #[test]
    fn pins_match_only_when_equal() {
        assert!(pin_matches("4711", "4711"));
        assert!(!pin_matches("4711", "4712"));
        assert!(!pin_matches("4711", "471"));
        assert!(!pin_matches("4711", ""));
    }

    fn snapshot() -> Snapshot {
        let asset = AssetStatus {
            asset: "unit-1".into(),
            level: Level::Warning,
            model: "m".into(),
            release: 1,
            output: "remaining_useful_life".into(),
            units: "cycles".into(),
            warning: 50.0,
            alarm: 20.0,
            latest: Some(Point { at_ms: clock::now_ms(), cycle: 3, value: 42.0 }),
            alert: None,
            drift: BTreeMap::new(),
            input: None,
        };
        let status = Status { device: "gw-1".into(), assets: vec![asset], ..Status::default() };
        let points = vec![
            Point { at_ms: 0, cycle: 1, value: 99.0 },
            Point { at_ms: clock::now_ms(), cycle: 3, value: 42.0 },
        ];
        Snapshot { status, history: [("unit-1".to_owned(), points)].into() }
    }

    /// Serves the router on a free port with a stand-in event loop that holds one open alert
    /// on `unit-1`; returns the base URL.
    async fn serve(pin: Option<&str>) -> String {
        let (_tx, rx) = watch::channel(Arc::new(snapshot()));
        let (requests, mut incoming) = mpsc::channel(4);
        tokio::spawn(async move {
            let _keep = _tx;
            let mut alert = Some(OpenAlert {
                level: Level::Warning,
                since_ms: 0,
                cycle: 3,
                value: Some(42.0),
                acknowledged_at_ms: None,
            });
            while let Some(LocalRequest::Ack { asset, reply }) = incoming.recv().await {
                let outcome = if asset == "unit-1" {
                    acknowledge(&mut alert, 1)
                } else {
                    AckOutcome::UnknownAsset
                };
                let _ = reply.send(outcome);
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let guard = Arc::new(PinGuard::default());
        spawn(listener, None, router(rx, requests, pin.map(str::to_owned), guard, false));
        base
    }

    fn call(req: ureq::Request, body: Option<&str>) -> (u16, String) {
        let answer = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        match answer {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    }

    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    #[tokio::test]
    async fn the_router_serves_page_api_history_and_metrics_and_refuses_bad_input() {
        let base = serve(Some("4711")).await;
        let b = base.clone();
        let answers = blocking(move || {
            let get = |path: &str| call(ureq::get(&format!("{b}{path}")), None);
            [
                get("/"),
                get("/api/status"),
                get("/api/assets/unit-1/history?hours=1"),
                get("/api/assets/unit-9/history"),
                get("/api/assets/unit-1/history?hours=-2"),
                get("/api/assets/unit-1/history?hours=lots"),
                get("/metrics"),
            ]
        })
        .await;
        let [page, status, history, unknown, negative, garbage, metrics] = answers;
        assert_eq!(page.0, 200);
        assert!(page.1.contains("<h1 id=\"device\">gw-1</h1>"), "{}", page.1);
        assert_eq!(status.0, 200);
        let status: Status = serde_json::from_str(&status.1).unwrap();
        assert_eq!(status.assets[0].latest.map(|p| p.value), Some(42.0));
        assert_eq!(history.0, 200);
        let history: serde_json::Value = serde_json::from_str(&history.1).unwrap();
        assert_eq!(history["points"].as_array().map(Vec::len), Some(1), "the old point is cut");
        assert_eq!(unknown.0, 404);
        assert!(unknown.1.contains("unknown asset"), "{}", unknown.1);
        assert_eq!((negative.0, garbage.0), (400, 400));
        assert_eq!(metrics.0, 200);
        assert!(
            metrics.1.contains("millwright_prediction{asset=\"unit-1\"} 42\n"),
            "{}",
            metrics.1
        );
    }

    #[tokio::test]
    async fn acknowledging_needs_the_pin_and_an_open_alert() {
        let base = serve(Some("4711")).await;
        let b = base.clone();
        let answers = blocking(move || {
            let post = |path: &str, body: &str| call(ureq::post(&format!("{b}{path}")), Some(body));
            [
                post("/api/alerts/unit-1/ack", r#"{"pin":"0000"}"#),
                post("/api/alerts/unit-1/ack", r#"{}"#),
                post("/api/alerts/unit-1/ack", "not json"),
                post("/api/alerts/unit-9/ack", r#"{"pin":"4711"}"#),
                post("/api/alerts/unit-1/ack", r#"{"pin":"4711"}"#),
                post("/api/alerts/unit-1/ack", r#"{"pin":"4711"}"#),
            ]
        })
        .await;
        let [wrong, missing, garbage, unknown, ok, again] = answers;
        assert_eq!(wrong.0, 403);
        assert!(wrong.1.contains("wrong operator PIN"), "{}", wrong.1);
        assert!((400..500).contains(&missing.0) && (400..500).contains(&garbage.0));
        assert_eq!(unknown.0, 404);
        assert_eq!(ok, (200, r#"{"asset":"unit-1","outcome":"acknowledged"}"#.to_owned()));
        assert!(again.1.contains("already_acknowledged"), "{}", again.1);

        let no_pin = serve(None).await;
        let refused = blocking(move || {
            call(ureq::post(&format!("{no_pin}/api/alerts/unit-1/ack")), Some(r#"{"pin":"4711"}"#))
        })
        .await;
        assert_eq!(refused.0, 403);
        assert!(refused.1.contains("no operator PIN is configured"), "{}", refused.1);
    }

    #[tokio::test]
    async fn the_page_form_redirects_home_or_explains_the_refusal() {
        let base = serve(Some("4711")).await;
        let (wrong, ok) = blocking(move || {
            let agent = ureq::AgentBuilder::new().redirects(0).build();
            let form = |pin: &str| {
                let answer =
                    agent.post(&format!("{base}/alerts/unit-1/ack")).send_form(&[("pin", pin)]);
                match answer {
                    Ok(r) => (
                        r.status(),
                        r.header("location").map(str::to_owned),
                        r.into_string().unwrap(),
                    ),
                    Err(ureq::Error::Status(code, r)) => (code, None, r.into_string().unwrap()),
                    Err(e) => panic!("{e}"),
                }
            };
            (form("1234"), form("4711"))
        })
        .await;
        assert_eq!(wrong.0, 403);
        assert!(wrong.2.contains("Not acknowledged: wrong operator PIN"), "{}", wrong.2);
        assert_eq!((ok.0, ok.1.as_deref()), (303, Some("/")));
    }
}
