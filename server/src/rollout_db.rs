//! SQLite adapter for rollouts: the registry's releases, each rollout (the engine's state,
//! saved after every decision) as a JSON document of its own fields and one row per device
//! (only the devices a decision changed are written), the directive numbering and the latest
//! directive per device (republished after a restart), and the audit log. A rollout stored
//! as one document with its devices inside (before the rows) is read as it is and written
//! as rows the next time it changes.

use crate::db::Db;
use crate::rollout::Rollout;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use std::collections::BTreeSet;

/// The rollout's own fields as JSON: everything but its devices.
pub fn header_json(r: &mut Rollout) -> serde_json::Result<String> {
    let devices = std::mem::take(&mut r.devices);
    let doc = serde_json::to_string(r);
    r.devices = devices;
    doc
}

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS releases (
    model         TEXT NOT NULL,
    release       INTEGER NOT NULL,
    version       TEXT NOT NULL,
    sha256        TEXT NOT NULL UNIQUE,
    size          INTEGER NOT NULL,
    asset_type    TEXT NOT NULL,
    path          TEXT NOT NULL,
    registered_ms INTEGER NOT NULL,
    registered_by TEXT NOT NULL,
    manifest      TEXT NOT NULL,
    PRIMARY KEY (model, release)
);
CREATE TABLE IF NOT EXISTS rollouts (
    id         TEXT PRIMARY KEY,
    model      TEXT NOT NULL,
    state      TEXT NOT NULL,
    doc        TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout TEXT NOT NULL,
    pos     INTEGER NOT NULL,
    device  TEXT NOT NULL,
    run     TEXT NOT NULL,
    PRIMARY KEY (rollout, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS directive_seq (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS directives (
    device     TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL,
    rollout    TEXT NOT NULL,
    envelope   BLOB NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms  INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL
);
";

/// A registered release.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReleaseRow {
    pub model: String,
    pub release: u64,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub asset_type: String,
    #[serde(skip)]
    pub path: String,
    pub registered_ms: i64,
    pub registered_by: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditRow {
    pub id: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub reason: String,
    pub detail: String,
}

/// The latest directive of a device.
#[derive(Debug, Clone)]
pub struct StoredDirective {
    pub device: String,
    pub seq: u64,
    pub rollout: String,
    pub envelope: Vec<u8>,
    pub expires_ms: i64,
}

fn release_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReleaseRow> {
    Ok(ReleaseRow {
        model: r.get(0)?,
        release: r.get(1)?,
        version: r.get(2)?,
        sha256: r.get(3)?,
        size: r.get(4)?,
        asset_type: r.get(5)?,
        path: r.get(6)?,
        registered_ms: r.get(7)?,
        registered_by: r.get(8)?,
    })
}

const RELEASE_COLUMNS: &str =
    "model, release, version, sha256, size, asset_type, path, registered_ms, registered_by";

impl Db {
    pub fn insert_release(&mut self, row: &ReleaseRow, manifest: &str) -> rusqlite::Result<()> {
        self.conn.execute(
            &format!("INSERT INTO releases ({RELEASE_COLUMNS}, manifest) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
            params![
                row.model,
                row.release,
                row.version,
                row.sha256,
                row.size,
                row.asset_type,
                row.path,
                row.registered_ms,
                row.registered_by,
                manifest
            ],
        )?;
        Ok(())
    }

    pub fn releases(&self, model: Option<&str>) -> rusqlite::Result<Vec<ReleaseRow>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE ?1 IS NULL OR model = ?1 ORDER BY model, release"
        ))?;
        let rows = stmt.query_map([model], release_row)?;
        rows.collect()
    }

    pub fn release(&self, model: &str, release: u64) -> rusqlite::Result<Option<ReleaseRow>> {
        self.conn
            .query_row(
                &format!(
                    "SELECT {RELEASE_COLUMNS} FROM releases WHERE model = ?1 AND release = ?2"
                ),
                params![model, release],
                release_row,
            )
            .optional()
    }

    pub fn release_by_sha(&self, sha256: &str) -> rusqlite::Result<Option<ReleaseRow>> {
        self.conn
            .query_row(
                &format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE sha256 = ?1"),
                [sha256],
                release_row,
            )
            .optional()
    }

    /// Saves the rollout's own fields and the devices it marked changed, in one transaction;
    /// `changed` is emptied once they are stored.
    pub fn save_rollout(&mut self, r: &mut Rollout, now_ms: i64) -> rusqlite::Result<()> {
        let json = |e: serde_json::Error| rusqlite::Error::ToSqlConversionFailure(Box::new(e));
        let doc = header_json(r).map_err(json)?;
        let state = serde_json::to_value(r.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let tx = self.conn.transaction()?;
        let legacy: bool = tx.query_row(
            "SELECT NOT EXISTS (SELECT 1 FROM rollout_devices WHERE rollout = ?1)
                 AND EXISTS (SELECT 1 FROM rollouts WHERE id = ?1)",
            [&r.id],
            |row| row.get(0),
        )?;
        tx.execute(
            "INSERT INTO rollouts (id, model, state, doc, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, doc = excluded.doc, updated_ms = excluded.updated_ms",
            params![r.id, r.spec.model, state, doc, r.created_ms, now_ms],
        )?;
        {
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO rollout_devices (rollout, pos, device, run) VALUES (?1, ?2, ?3, ?4)",
            )?;
            // A rollout stored whole before the rows: every device, once.
            let all: BTreeSet<usize> = (0..r.devices.len()).collect();
            for &i in if legacy { &all } else { &r.changed } {
                let Some(d) = r.devices.get(i) else { continue };
                put.execute(params![
                    r.id,
                    i as i64,
                    d.device,
                    serde_json::to_string(d).map_err(json)?
                ])?;
            }
        }
        tx.commit()?;
        r.changed.clear();
        Ok(())
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> rusqlite::Result<Vec<Rollout>> {
        self.load_rollouts(None)
    }

    pub fn rollout(&self, id: &str) -> rusqlite::Result<Option<Rollout>> {
        Ok(self.load_rollouts(Some(id))?.pop())
    }

    fn load_rollouts(&self, id: Option<&str>) -> rusqlite::Result<Vec<Rollout>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, doc FROM rollouts WHERE ?1 IS NULL OR id = ?1 ORDER BY created_ms, id",
        )?;
        let docs: Vec<(String, String)> =
            stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        let mut rows = self.conn.prepare_cached(
            "SELECT pos, run FROM rollout_devices WHERE rollout = ?1 ORDER BY pos",
        )?;
        let mut out = Vec::new();
        for (id, doc) in docs {
            let mut r: Rollout = match serde_json::from_str(&doc) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(id, "a stored rollout does not decode: {e}");
                    continue;
                }
            };
            let runs: Vec<(i64, String)> =
                rows.query_map([&id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
            if runs.is_empty() {
                // Stored whole, devices inside, before the rows.
                out.push(r);
                continue;
            }
            let count = runs.len();
            let devices: Vec<_> = runs
                .into_iter()
                .enumerate()
                .filter(|(i, (pos, _))| *pos == *i as i64)
                .filter_map(|(_, (pos, run))| match serde_json::from_str(&run) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        tracing::error!(id, pos, "a rollout's device row does not decode: {e}");
                        None
                    }
                })
                .collect();
            if devices.len() != count {
                tracing::error!(id, "a rollout's device rows are damaged: the rollout is left out");
                continue;
            }
            r.devices = devices;
            out.push(r);
        }
        Ok(out)
    }

    pub fn rollout_count(&self) -> rusqlite::Result<u64> {
        self.conn.query_row("SELECT COUNT(*) FROM rollouts", [], |r| r.get(0))
    }

    /// The next directive sequence number (durable, strictly increasing).
    /// The next directive sequence number, kept: one statement, so that it can run on its own
    /// or inside [`Db::batched`].
    pub fn next_directive_seq(&mut self) -> rusqlite::Result<u64> {
        self.conn.query_row(
            "INSERT INTO directive_seq (id, last) VALUES (1, 1)
             ON CONFLICT (id) DO UPDATE SET last = last + 1 RETURNING last",
            [],
            |r| r.get(0),
        )
    }

    /// Runs `f` in one transaction when one can be begun, else write by write. Meant for
    /// writes that are each one statement (a failed one keeps no other out): a wave's
    /// directives, two writes each, were 2 commits a gateway, ~30 s of fsyncs for a wave of
    /// 5,000 with the ingest loop waiting.
    pub fn batched<T>(&mut self, f: impl FnOnce(&mut Db) -> T) -> T {
        let began = self.conn.execute_batch("BEGIN IMMEDIATE").is_ok();
        let out = f(self);
        if began && let Err(e) = self.conn.execute_batch("COMMIT") {
            tracing::error!("cannot commit a batch of rollout writes: {e}");
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        out
    }

    pub fn save_directive(&mut self, d: &StoredDirective) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO directives (device, seq, rollout, envelope, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![d.device, d.seq, d.rollout, d.envelope, d.expires_ms],
        )?;
        Ok(())
    }

    /// The latest directive of one device.
    pub fn directive_of(&self, device: &str) -> rusqlite::Result<Option<StoredDirective>> {
        self.conn
            .prepare_cached(
                "SELECT device, seq, rollout, envelope, expires_ms FROM directives WHERE device = ?1",
            )?
            .query_row([device], |r| {
                Ok(StoredDirective {
                    device: r.get(0)?,
                    seq: r.get(1)?,
                    rollout: r.get(2)?,
                    envelope: r.get(3)?,
                    expires_ms: r.get(4)?,
                })
            })
            .optional()
    }

    pub fn directives(&self) -> rusqlite::Result<Vec<StoredDirective>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT device, seq, rollout, envelope, expires_ms FROM directives ORDER BY device",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredDirective {
                device: r.get(0)?,
                seq: r.get(1)?,
                rollout: r.get(2)?,
                envelope: r.get(3)?,
                expires_ms: r.get(4)?,
            })
        })?;
        rows.collect()
    }

    pub fn audit(
        &mut self,
        at_ms: i64,
        actor: &str,
        action: &str,
        target: &str,
        reason: &str,
        detail: &str,
    ) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO audit (at_ms, actor, action, target, reason, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![at_ms, actor, action, target, reason, detail],
        )?;
        Ok(())
    }

    pub fn audit_log(&self, limit: u64) -> rusqlite::Result<Vec<AuditRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, at_ms, actor, action, target, reason, detail FROM audit ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit], |r| {
            Ok(AuditRow {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                reason: r.get(5)?,
                detail: r.get(6)?,
            })
        })?;
        rows.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::tests::{inventory, report, spec};
    use crate::rollout::{self, OnFailure, State};
    use millwright_shared::wire::UpdatePhase;

    fn reload(db: &Db, r: &Rollout) -> Rollout {
        db.rollout(&r.id).unwrap().expect("stored")
    }

    #[test]
    fn a_rollout_is_its_fields_and_one_row_per_device_and_a_report_writes_one_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("s.sqlite")).unwrap();
        let mut r =
            rollout::plan("r1".into(), spec(OnFailure::Pause), &inventory(50), "ops".into(), 0)
                .unwrap();
        let first = rollout::step(&mut r, 0);
        assert!(!first.is_empty());
        for (seq, d) in r.devices.iter_mut().filter(|d| d.notified_ms.is_some()).enumerate() {
            d.directive = Some(seq as u64 + 1);
        }
        db.save_rollout(&mut r, 0).unwrap();
        assert!(r.changed.is_empty());
        assert_eq!(reload(&db, &r), r);
        let doc: String = db
            .conn
            .query_row("SELECT doc FROM rollouts WHERE id = 'r1'", [], |row| row.get(0))
            .unwrap();
        assert!(doc.contains("\"devices\":[]"), "the devices are rows: {doc}");

        // One device's report: its row and the rollout's own, nothing else.
        let canary = r.devices[0].clone();
        rollout::on_report(&mut r, &canary.device, &report(&canary, UpdatePhase::Received), 5);
        assert_eq!(r.changed.len(), 1);
        let before = db.conn.total_changes();
        db.save_rollout(&mut r, 5).unwrap();
        assert_eq!(db.conn.total_changes() - before, 2);
        assert_eq!(reload(&db, &r), r);

        // A failure pauses it; the timeouts mark what they change too.
        let actions = rollout::step(&mut r, 1_000_000);
        assert!(!actions.is_empty());
        assert_eq!(r.state, State::Paused);
        db.save_rollout(&mut r, 1_000_000).unwrap();
        assert_eq!(reload(&db, &r), r);
    }

    #[test]
    fn a_rollout_stored_whole_is_read_and_then_written_as_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("s.sqlite")).unwrap();
        let mut r =
            rollout::plan("r1".into(), spec(OnFailure::Pause), &inventory(20), "ops".into(), 0)
                .unwrap();
        rollout::step(&mut r, 0);
        r.changed.clear();
        // As the server stored it before the rows.
        db.conn
            .execute(
                "INSERT INTO rollouts (id, model, state, doc, created_ms, updated_ms)
                 VALUES ('r1', 'm', 'running', ?1, 0, 0)",
                [serde_json::to_string(&r).unwrap()],
            )
            .unwrap();
        assert_eq!(reload(&db, &r), r);
        r.device_mut("gw-00").unwrap().directive = Some(9);
        db.save_rollout(&mut r, 1).unwrap();
        let rows: i64 = db
            .conn
            .query_row("SELECT COUNT(*) FROM rollout_devices", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 20, "every device, not only the changed one");
        assert_eq!(reload(&db, &r), r);
    }
}
