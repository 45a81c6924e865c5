//! The device registry: enroll and revoke (admin; audited, through the writer task), list
//! (viewer), and the server's public identity (open: what `millwright device enroll` gives the
//! gateway as the server's message key).

use super::rollouts::ask;
use super::{ApiState, error, query};
use crate::auth::authorize;
use crate::config::Role;
use crate::writer::Request;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use millwright_shared::enrollment::Enrollment;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    #[serde(default)]
    pub reason: String,
}

pub async fn enroll(State(state): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    let actor = match authorize(&headers, &state.users, Role::Admin) {
        Ok(a) => a,
        Err((status, m)) => return error(status, m),
    };
    let enrollment: Enrollment = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("enrollment: {e}")),
    };
    ask(&state, |reply| Request::Enroll { enrollment, actor, reply }).await
}

pub async fn revoke(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(device): Path<String>,
    body: Bytes,
) -> Response {
    let actor = match authorize(&headers, &state.users, Role::Admin) {
        Ok(a) => a,
        Err((status, m)) => return error(status, m),
    };
    let body: RevokeBody = if body.is_empty() {
        RevokeBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("bad body: {e}")),
        }
    };
    ask(&state, |reply| Request::Revoke { device, reason: body.reason, actor, reply }).await
}

pub async fn list(State(state): State<ApiState>) -> Response {
    query(&state, |db| db.enrollments()).await
}

/// The server's message key: gateways check acks and chunks against it.
pub async fn identity(State(state): State<ApiState>) -> Response {
    Json(serde_json::json!({ "server_key": state.server_key })).into_response()
}
