//! The protocol between the HTTP API and the server's one writer task: every change the API
//! asks for (registering a release, starting or steering a rollout, acknowledging an alert,
//! enrolling or revoking a device) is a [`Request`] answered on its [`Reply`], so writes are
//! serialised and audited in one place.

use crate::db::Db;
use crate::rollout::{Command, Spec};
use millwright_shared::enrollment::Enrollment;
use tokio::sync::oneshot;

/// A refusal with the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

pub fn refuse(status: u16, message: impl std::fmt::Display) -> Refusal {
    Refusal { status, message: message.to_string() }
}

pub fn db_error(e: rusqlite::Error) -> Refusal {
    refuse(500, format!("database: {e}"))
}

pub type Reply = oneshot::Sender<Result<serde_json::Value, Refusal>>;

/// What the HTTP API asks the writer task to do.
#[derive(Debug)]
pub enum Request {
    Register {
        bundle: Vec<u8>,
        actor: String,
        reply: Reply,
    },
    Start {
        spec: Spec,
        actor: String,
        reason: String,
        reply: Reply,
    },
    Act {
        id: String,
        command: Command,
        actor: String,
        reason: String,
        reply: Reply,
    },
    /// An operator acknowledges an alert.
    AckAlert {
        device: String,
        seq: u64,
        actor: String,
        note: String,
        reply: Reply,
    },
    /// An admin enrolls a device (its keys were made by `millwright device enroll`).
    Enroll {
        enrollment: Enrollment,
        actor: String,
        reply: Reply,
    },
    /// An admin revokes a device: from now on everything it sends is refused.
    Revoke {
        device: String,
        reason: String,
        actor: String,
        reply: Reply,
    },
}

impl Request {
    /// Answers a rollout request on a server without `[rollouts]`.
    pub fn refuse_unconfigured(self) {
        let reply = match self {
            Request::Register { reply, .. }
            | Request::Start { reply, .. }
            | Request::Act { reply, .. }
            | Request::AckAlert { reply, .. }
            | Request::Enroll { reply, .. }
            | Request::Revoke { reply, .. } => reply,
        };
        let _ = reply
            .send(Err(refuse(503, "rollouts are not configured on this server ([rollouts] root)")));
    }
}

/// Records an acknowledgement and, the first time, its audit entry.
pub fn acknowledge(
    db: &mut Db,
    device: &str,
    seq: u64,
    actor: &str,
    note: &str,
    now_ms: i64,
) -> Result<serde_json::Value, Refusal> {
    use crate::alerts_db::AckError;
    let note = millwright_shared::wire::clean_text(note, millwright_shared::wire::MAX_REASON_BYTES);
    let acked = db.acknowledge_alert(device, seq, actor, &note, now_ms).map_err(|e| match e {
        AckError::NotFound { .. } => refuse(404, &e),
        AckError::NotAnAlarm { .. } => refuse(409, &e),
        AckError::Db(_) => refuse(500, &e),
    })?;
    if !acked.already_acknowledged {
        let target = format!("{device}/alert/{seq}");
        db.audit(now_ms, actor, "alert_acknowledged", &target, &note, "").map_err(db_error)?;
    }
    Ok(serde_json::to_value(&acked).unwrap_or_default())
}
