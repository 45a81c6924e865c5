//! The fleet's alert feed and acknowledgements (operator and above; audited).

use super::rollouts::ask;
use super::{ApiState, error, query};
use crate::auth::authorize;
use crate::config::Role;
use crate::writer::Request;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct FeedQuery {
    /// Only alerts still open (newest of their asset, warning or alarm, unacknowledged).
    #[serde(default)]
    pub open: bool,
    pub limit: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    #[serde(default)]
    pub note: String,
}

pub async fn feed(State(state): State<ApiState>, Query(q): Query<FeedQuery>) -> Response {
    let limit = q.limit.unwrap_or(200).min(super::MAX_PAGE);
    query(&state, move |db| db.alert_feed(q.open, limit)).await
}

pub async fn acknowledge(
    State(state): State<ApiState>,
    Path((device, seq)): Path<(String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let actor = match authorize(&headers, &state.users, Role::Operator) {
        Ok(a) => a,
        Err((status, m)) => return error(status, m),
    };
    let body: AckBody = if body.is_empty() {
        AckBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("bad body: {e}")),
        }
    };
    ask(&state, |reply| Request::AckAlert { device, seq, actor, note: body.note, reply }).await
}
