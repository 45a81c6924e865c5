//! Registry and rollout routes. Reads use the reader connection; writes go to the writer task
//! as [`Request`]s and answer with its result.

use super::{ApiState, error, query};
use crate::auth::authorize;
use crate::config::Role;
use crate::rollout::{Command, Spec};
use crate::writer::Request;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::oneshot;

#[derive(Debug, Deserialize)]
pub struct StartBody {
    #[serde(flatten)]
    pub spec: Spec,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct ReasonBody {
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Deserialize)]
pub struct Limit {
    pub limit: Option<u64>,
}

/// Sends a request to the writer task and waits for its answer.
pub(super) async fn ask(
    state: &ApiState,
    make: impl FnOnce(crate::writer::Reply) -> Request,
) -> Response {
    let Some(tx) = &state.requests else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the server takes no writes");
    };
    let (reply, answer) = oneshot::channel();
    if tx.send(make(reply)).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down");
    }
    // A writer stuck behind a broker that never acknowledges must not hold the request forever.
    let answer = tokio::time::timeout(std::time::Duration::from_secs(30), answer).await;
    let Ok(answer) = answer else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the writer task did not answer in 30 s");
    };
    match answer {
        Ok(Ok(value)) => (StatusCode::OK, Json(value)).into_response(),
        Ok(Err(refusal)) => error(
            StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            refusal.message,
        ),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "no answer from the writer task"),
    }
}

pub async fn register(State(state): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    let actor = match authorize(&headers, &state.users, Role::Admin) {
        Ok(a) => a,
        Err((status, m)) => return error(status, m),
    };
    ask(&state, |reply| Request::Register { bundle: body.to_vec(), actor, reply }).await
}

pub async fn models(State(state): State<ApiState>) -> Response {
    query(&state, |db| db.releases(None)).await
}

pub async fn model(State(state): State<ApiState>, Path(model): Path<String>) -> Response {
    query(&state, move |db| db.releases(Some(&model))).await
}

pub async fn start(State(state): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    let actor = match authorize(&headers, &state.users, Role::Operator) {
        Ok(a) => a,
        Err((status, m)) => return error(status, m),
    };
    let body: StartBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("rollout spec: {e}")),
    };
    ask(&state, |reply| Request::Start { spec: body.spec, actor, reason: body.reason, reply }).await
}

pub async fn rollouts(State(state): State<ApiState>) -> Response {
    query(&state, |db| db.rollouts()).await
}

pub async fn rollout(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let db = state.db.clone();
    let found = tokio::task::spawn_blocking(move || db.with(|db| db.rollout(&id))).await;
    match found {
        Ok(Ok(Some(r))) => Json(r).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "no such rollout"),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "query failed"),
    }
}

pub async fn act(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((id, command)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let actor = match authorize(&headers, &state.users, Role::Operator) {
        Ok(a) => a,
        Err((status, m)) => return error(status, m),
    };
    let command: Command = match serde_json::from_value(serde_json::Value::String(command.clone()))
    {
        Ok(c) => c,
        Err(_) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no action {command:?} (pause, resume, abort, revert)"),
            );
        }
    };
    let reason = serde_json::from_slice::<ReasonBody>(&body).unwrap_or_default().reason;
    ask(&state, |reply| Request::Act { id, command, actor, reason, reply }).await
}

pub async fn audit(State(state): State<ApiState>, Query(limit): Query<Limit>) -> Response {
    let limit = limit.limit.unwrap_or(200).min(10_000);
    query(&state, move |db| db.audit_log(limit)).await
}

pub async fn delivery(State(state): State<ApiState>) -> Response {
    let served = state.served.lock().map(|s| s.clone()).unwrap_or_default();
    Json(served).into_response()
}
