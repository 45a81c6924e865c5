//! SQLite adapter for rollouts: the registry's releases, each rollout as one JSON document
//! (the engine's state, saved after every decision), the directive numbering and the latest
//! directive per device (republished after a restart), and the audit log.

use crate::db::Db;
use crate::rollout::Rollout;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

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

    pub fn save_rollout(&mut self, r: &Rollout, now_ms: i64) -> rusqlite::Result<()> {
        let doc = serde_json::to_string(r)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        let state = serde_json::to_value(r.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.conn.execute(
            "INSERT INTO rollouts (id, model, state, doc, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, doc = excluded.doc, updated_ms = excluded.updated_ms",
            params![r.id, r.spec.model, state, doc, r.created_ms, now_ms],
        )?;
        Ok(())
    }

    pub fn rollouts(&self) -> rusqlite::Result<Vec<Rollout>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT doc FROM rollouts ORDER BY created_ms, id")?;
        let docs = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for doc in docs {
            let doc = doc?;
            match serde_json::from_str(&doc) {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!("a stored rollout does not decode: {e}"),
            }
        }
        Ok(out)
    }

    pub fn rollout(&self, id: &str) -> rusqlite::Result<Option<Rollout>> {
        Ok(self.rollouts()?.into_iter().find(|r| r.id == id))
    }

    pub fn rollout_count(&self) -> rusqlite::Result<u64> {
        self.conn.query_row("SELECT COUNT(*) FROM rollouts", [], |r| r.get(0))
    }

    /// The next directive sequence number (durable, strictly increasing).
    pub fn next_directive_seq(&mut self) -> rusqlite::Result<u64> {
        let tx = self.conn.transaction()?;
        let last: Option<u64> = tx
            .query_row("SELECT last FROM directive_seq WHERE id = 1", [], |r| r.get(0))
            .optional()?;
        let next = last.unwrap_or(0) + 1;
        tx.execute("INSERT OR REPLACE INTO directive_seq (id, last) VALUES (1, ?1)", [next])?;
        tx.commit()?;
        Ok(next)
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
