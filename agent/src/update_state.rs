//! The agent's durable update state. It lives in the outbox database so that a step of an
//! update and the report announcing it commit in one transaction: the trust root, the last
//! directive applied, the highest release seen per model, which bundle each model serves (and
//! the one before it, the last known good) and the activation in progress.

use crate::store::{NewRecord, Store, StoreError, append_in};
use crate::update_machine::Progress;
use rusqlite::{OptionalExtension, params};
use std::collections::HashMap;
use std::path::PathBuf;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS trust_state (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS releases_seen (
    model   TEXT PRIMARY KEY,
    release INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS model_slots (
    model    TEXT PRIMARY KEY,
    active   TEXT NOT NULL,
    previous TEXT
);
CREATE TABLE IF NOT EXISTS activation (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    directive BLOB NOT NULL,
    step      TEXT NOT NULL,
    attempts  INTEGER NOT NULL
);
";

/// The bundle files a model name is served from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub active: PathBuf,
    /// The last known good release, kept for a revert.
    pub previous: Option<PathBuf>,
}

/// The activation in progress: its directive (the signed envelope), step and how many times
/// the agent started with it unfinished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub directive: Vec<u8>,
    pub step: Progress,
    pub attempts: u32,
}

/// One change to the update state.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Root(Vec<u8>),
    LastDirective { seq: u64, bytes: Vec<u8> },
    Seen { model: String, release: u64 },
    Slot { model: String, slot: Slot },
    Activation(Option<Pending>),
}

fn path_text(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Store {
    /// Applies `changes` and appends `reports` to the outbox in one transaction.
    pub fn commit_update(
        &mut self,
        changes: &[Change],
        reports: &[NewRecord],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for change in changes {
            match change {
                Change::Root(bytes) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO trust_state (name, value) VALUES ('root', ?1)",
                        [bytes],
                    )?;
                }
                Change::LastDirective { seq, bytes } => {
                    tx.execute(
                        "INSERT OR REPLACE INTO trust_state (name, value) VALUES ('directive', ?1)",
                        [bytes],
                    )?;
                    tx.execute(
                        "INSERT OR REPLACE INTO trust_state (name, value) VALUES ('directive_seq', ?1)",
                        [seq.to_string().into_bytes()],
                    )?;
                }
                Change::Seen { model, release } => {
                    tx.execute(
                        "INSERT INTO releases_seen (model, release) VALUES (?1, ?2)
                         ON CONFLICT (model) DO UPDATE SET release = max(release, excluded.release)",
                        params![model, release],
                    )?;
                }
                Change::Slot { model, slot } => {
                    tx.execute(
                        "INSERT OR REPLACE INTO model_slots (model, active, previous) VALUES (?1, ?2, ?3)",
                        params![
                            model,
                            path_text(&slot.active),
                            slot.previous.as_deref().map(path_text)
                        ],
                    )?;
                }
                Change::Activation(None) => {
                    tx.execute("DELETE FROM activation", [])?;
                }
                Change::Activation(Some(p)) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO activation (id, directive, step, attempts)
                         VALUES (1, ?1, ?2, ?3)",
                        params![p.directive, p.step.as_str(), p.attempts],
                    )?;
                }
            }
        }
        append_in(&tx, reports, &[])?;
        tx.commit()?;
        Ok(())
    }

    fn trust_value(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM trust_state WHERE name = ?1", [name], |r| r.get(0))
            .optional()?)
    }

    /// The outbox's identity, chosen (at random) the first time it is asked for. Batches name
    /// it and acks must name it back, so an ack meant for an earlier installation of this
    /// gateway deletes nothing from a new outbox.
    pub fn epoch(&mut self) -> Result<String, StoreError> {
        if let Some(bytes) = self.trust_value("outbox_epoch")? {
            return Ok(String::from_utf8_lossy(&bytes).into_owned());
        }
        let mut random = [0u8; 8];
        getrandom::getrandom(&mut random)
            .map_err(|e| StoreError::Corrupt(format!("no randomness for the outbox epoch: {e}")))?;
        let epoch = hex::encode(random);
        self.conn.execute(
            "INSERT INTO trust_state (name, value) VALUES ('outbox_epoch', ?1)",
            [epoch.as_bytes()],
        )?;
        Ok(epoch)
    }

    /// The latest wall-clock time this gateway recorded (milliseconds), the floor under its
    /// clock after a restart.
    pub fn time_floor(&self) -> Result<i64, StoreError> {
        let value = self.trust_value("time_floor_ms")?;
        Ok(value.and_then(|b| String::from_utf8(b).ok()?.parse().ok()).unwrap_or(0))
    }

    pub fn save_time_floor(&mut self, ms: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO trust_state (name, value) VALUES ('time_floor_ms', ?1)",
            [ms.to_string().into_bytes()],
        )?;
        Ok(())
    }

    /// The drop floor recorded for `stream` ([`crate::uplink::Uplink::drop_floor`]).
    pub fn sent_floor(&self, stream: millwright_shared::wire::Stream) -> Result<u64, StoreError> {
        let value = self.trust_value(&format!("sent_floor_{}", stream.as_str()))?;
        Ok(value.and_then(|b| String::from_utf8(b).ok()?.parse().ok()).unwrap_or(0))
    }

    pub fn save_sent_floor(
        &mut self,
        stream: millwright_shared::wire::Stream,
        seq: u64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO trust_state (name, value) VALUES (?1, ?2)",
            params![format!("sent_floor_{}", stream.as_str()), seq.to_string().into_bytes()],
        )?;
        Ok(())
    }

    /// The newest root this device accepted (beyond the provisioned one).
    pub fn stored_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.trust_value("root")
    }

    /// The last directive applied: its sequence number and envelope bytes.
    pub fn last_directive(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let (Some(seq), Some(bytes)) =
            (self.trust_value("directive_seq")?, self.trust_value("directive")?)
        else {
            return Ok(None);
        };
        let seq = String::from_utf8_lossy(&seq)
            .parse()
            .map_err(|_| StoreError::Corrupt("directive_seq is not a number".into()))?;
        Ok(Some((seq, bytes)))
    }

    pub fn highest_seen(&self, model: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT release FROM releases_seen WHERE model = ?1", [model], |r| r.get(0))
            .optional()?)
    }

    pub fn slots(&self) -> Result<HashMap<String, Slot>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT model, active, previous FROM model_slots")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?))
        })?;
        let mut out = HashMap::new();
        for row in rows {
            let (model, active, previous) = row?;
            out.insert(
                model,
                Slot { active: active.into(), previous: previous.map(PathBuf::from) },
            );
        }
        Ok(out)
    }

    pub fn activation(&self) -> Result<Option<Pending>, StoreError> {
        let row = self
            .conn
            .query_row("SELECT directive, step, attempts FROM activation WHERE id = 1", [], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?, r.get::<_, u32>(2)?))
            })
            .optional()?;
        row.map(|(directive, step, attempts)| {
            let step = Progress::parse(&step)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown activation step {step:?}")))?;
            Ok(Pending { directive, step, attempts })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_state_survives_reopening_and_commits_with_its_report() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        {
            let mut store = Store::open(&path).unwrap();
            let report = NewRecord {
                at_ms: 1,
                body: millwright_shared::wire::RecordBody::Update(Box::new(
                    millwright_shared::wire::UpdateReport {
                        rollout: Some("r1".into()),
                        directive: Some(7),
                        model: None,
                        release: None,
                        phase: millwright_shared::wire::UpdatePhase::Received,
                        reason: None,
                        health: None,
                    },
                )),
            };
            store
                .commit_update(
                    &[
                        Change::LastDirective { seq: 7, bytes: b"d7".to_vec() },
                        Change::Seen { model: "m".into(), release: 3 },
                        Change::Seen { model: "m".into(), release: 2 },
                        Change::Slot {
                            model: "m".into(),
                            slot: Slot { active: "a.mwb".into(), previous: Some("p.mwb".into()) },
                        },
                        Change::Activation(Some(Pending {
                            directive: b"d7".to_vec(),
                            step: Progress::Shadow,
                            attempts: 1,
                        })),
                    ],
                    &[report],
                )
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.last_directive().unwrap(), Some((7, b"d7".to_vec())));
        assert_eq!(store.highest_seen("m").unwrap(), Some(3));
        assert_eq!(store.slots().unwrap()["m"].previous, Some(PathBuf::from("p.mwb")));
        assert_eq!(store.activation().unwrap().map(|p| p.step), Some(Progress::Shadow));
        assert_eq!(store.last_seq(millwright_shared::wire::Stream::Updates).unwrap(), 1);
    }

    #[test]
    fn the_drop_floor_survives_reopening() {
        use millwright_shared::wire::Stream;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        {
            let mut store = Store::open(&path).unwrap();
            assert_eq!(store.sent_floor(Stream::Predictions).unwrap(), 0);
            store.save_sent_floor(Stream::Predictions, 1040).unwrap();
            store.save_sent_floor(Stream::Drift, 7).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.sent_floor(Stream::Predictions).unwrap(), 1040);
        assert_eq!(store.sent_floor(Stream::Drift).unwrap(), 7);
        assert_eq!(store.sent_floor(Stream::Alerts).unwrap(), 0);
    }
}
