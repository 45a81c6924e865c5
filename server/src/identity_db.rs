//! The device registry in the server's SQLite store: one row per enrolled device with its
//! public key, certificate fingerprint, labels, who enrolled it and, once revoked, when, by whom
//! and why. The gate's in-memory [`Registry`] is loaded from here and kept equal to it.

use crate::db::Db;
use crate::identity::{Entry, Registry};
use ed25519_dalek::VerifyingKey;
use millwright_shared::DeviceId;
use millwright_shared::enrollment::Enrollment;
use millwright_shared::wire::{MAX_LABEL_BYTES, MAX_TAGS, clean_text};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS enrolled (
    device         TEXT PRIMARY KEY,
    public_key     TEXT NOT NULL,
    cert_sha256    TEXT NOT NULL,
    site           TEXT,
    tags           TEXT,
    device_class   TEXT,
    enrolled_by    TEXT NOT NULL,
    enrolled_ms    INTEGER NOT NULL,
    revoked_ms     INTEGER,
    revoked_by     TEXT,
    revoked_reason TEXT
) WITHOUT ROWID;
";

/// One enrolled device, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnrolledRow {
    pub device: String,
    pub key_id: String,
    pub public_key: String,
    pub cert_sha256: String,
    pub site: Option<String>,
    pub tags: Vec<String>,
    pub device_class: Option<String>,
    pub enrolled_by: String,
    pub enrolled_ms: i64,
    pub revoked_ms: Option<i64>,
    pub revoked_by: Option<String>,
    pub revoked_reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{0} is reserved and cannot be a device id")]
    Reserved(String),
    #[error("public_key is not 32 bytes of hex of an ed25519 key")]
    BadKey,
    #[error("cert_sha256 is not 64 hex digits")]
    BadFingerprint,
    #[error("device {0} is enrolled already; revoke it first to enroll it with new keys")]
    Enrolled(String),
    #[error("no enrolled device {0}")]
    NotFound(String),
    #[error(
        "{0} is not printable text of at most {MAX_LABEL_BYTES} bytes ({MAX_TAGS} tags at most)"
    )]
    BadLabel(&'static str),
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
}

pub fn parse_key(hex_key: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex_key).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

fn label(what: &'static str, text: &str) -> Result<(), EnrollError> {
    match !text.is_empty() && clean_text(text, MAX_LABEL_BYTES) == text {
        true => Ok(()),
        false => Err(EnrollError::BadLabel(what)),
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EnrolledRow> {
    let public_key: String = r.get(1)?;
    let key_id = parse_key(&public_key)
        .map(|k| millwright_shared::keys::KeyId::of(&k).0)
        .unwrap_or_default();
    let tags: Option<String> = r.get(4)?;
    Ok(EnrolledRow {
        device: r.get(0)?,
        key_id,
        public_key,
        cert_sha256: r.get(2)?,
        site: r.get(3)?,
        tags: tags.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default(),
        device_class: r.get(5)?,
        enrolled_by: r.get(6)?,
        enrolled_ms: r.get(7)?,
        revoked_ms: r.get(8)?,
        revoked_by: r.get(9)?,
        revoked_reason: r.get(10)?,
    })
}

const COLUMNS: &str = "device, public_key, cert_sha256, site, tags, device_class, enrolled_by,
    enrolled_ms, revoked_ms, revoked_by, revoked_reason";

impl Db {
    /// Enrolls a device. A revoked device may be enrolled again with new keys; an enrolled
    /// one may not.
    pub fn enroll(
        &mut self,
        e: &Enrollment,
        actor: &str,
        now_ms: i64,
    ) -> Result<EnrolledRow, EnrollError> {
        if e.device.is_reserved() {
            return Err(EnrollError::Reserved(e.device.to_string()));
        }
        parse_key(&e.public_key).ok_or(EnrollError::BadKey)?;
        if e.cert_sha256.len() != 64 || hex::decode(&e.cert_sha256).is_err() {
            return Err(EnrollError::BadFingerprint);
        }
        if let Some(site) = &e.site {
            label("site", site)?;
        }
        if let Some(class) = &e.device_class {
            label("device_class", class)?;
        }
        if e.tags.len() > MAX_TAGS {
            return Err(EnrollError::BadLabel("tags"));
        }
        for t in &e.tags {
            label("tags", t)?;
        }
        let tx = self.conn.transaction()?;
        let existing: Option<Option<i64>> = tx
            .query_row(
                "SELECT revoked_ms FROM enrolled WHERE device = ?1",
                [e.device.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        if matches!(existing, Some(None)) {
            return Err(EnrollError::Enrolled(e.device.to_string()));
        }
        tx.execute(
            "INSERT OR REPLACE INTO enrolled
             (device, public_key, cert_sha256, site, tags, device_class, enrolled_by, enrolled_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                e.device.as_str(),
                e.public_key.to_ascii_lowercase(),
                e.cert_sha256.to_ascii_lowercase(),
                e.site,
                serde_json::to_string(&e.tags).ok(),
                e.device_class,
                actor,
                now_ms
            ],
        )?;
        tx.commit()?;
        self.enrollment(e.device.as_str())?
            .ok_or_else(|| EnrollError::NotFound(e.device.to_string()))
    }

    /// Revokes a device (again: no change).
    pub fn revoke(
        &mut self,
        device: &str,
        actor: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<EnrolledRow, EnrollError> {
        let reason = clean_text(reason, millwright_shared::wire::MAX_REASON_BYTES);
        let changed = self.conn.execute(
            "UPDATE enrolled SET revoked_ms = ?2, revoked_by = ?3, revoked_reason = ?4
             WHERE device = ?1 AND revoked_ms IS NULL",
            params![device, now_ms, actor, reason],
        )?;
        let row = self.enrollment(device)?.ok_or_else(|| EnrollError::NotFound(device.into()))?;
        if changed == 0 {
            tracing::debug!(device, "revoked already");
        }
        Ok(row)
    }

    pub fn enrollment(&self, device: &str) -> rusqlite::Result<Option<EnrolledRow>> {
        self.conn
            .query_row(&format!("SELECT {COLUMNS} FROM enrolled WHERE device = ?1"), [device], row)
            .optional()
    }

    pub fn enrollments(&self) -> rusqlite::Result<Vec<EnrolledRow>> {
        let mut stmt =
            self.conn.prepare(&format!("SELECT {COLUMNS} FROM enrolled ORDER BY device"))?;
        let rows = stmt.query_map([], row)?;
        rows.collect()
    }

    /// The registry the gate checks messages against.
    pub fn registry(&self) -> rusqlite::Result<Registry> {
        let mut registry = Registry::default();
        for r in self.enrollments()? {
            let (Ok(device), Some(key)) = (DeviceId::new(&r.device), parse_key(&r.public_key))
            else {
                tracing::error!(device = r.device, "registry row does not parse; skipped");
                continue;
            };
            registry.insert(device, Entry { key, revoked: r.revoked_ms.is_some() });
        }
        Ok(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn enrollment(device: &str, n: u8) -> Enrollment {
        Enrollment {
            device: DeviceId::new(device).unwrap(),
            public_key: hex::encode(SigningKey::from_bytes(&[n; 32]).verifying_key().as_bytes()),
            cert_sha256: "ab".repeat(32),
            site: Some("plant-north".into()),
            tags: vec!["line-3".into()],
            device_class: None,
        }
    }

    #[test]
    fn devices_are_enrolled_once_revoked_at_once_and_may_come_back_with_new_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("s.sqlite")).unwrap();
        let row = db.enroll(&enrollment("gw1", 1), "ada", 10).unwrap();
        assert_eq!((row.site.as_deref(), row.enrolled_by.as_str()), (Some("plant-north"), "ada"));
        assert!(matches!(
            db.enroll(&enrollment("gw1", 2), "ada", 11),
            Err(EnrollError::Enrolled(_))
        ));
        assert!(matches!(
            db.enroll(&enrollment("trust", 2), "ada", 11),
            Err(EnrollError::Reserved(_))
        ));
        let bad = Enrollment { public_key: "00".into(), ..enrollment("gw2", 2) };
        assert!(matches!(db.enroll(&bad, "ada", 11), Err(EnrollError::BadKey)));
        let gw1 = DeviceId::new("gw1").unwrap();
        assert_eq!(db.registry().unwrap().get(&gw1).map(|e| e.revoked), Some(false));
        let revoked = db.revoke("gw1", "ada", "stolen", 20).unwrap();
        assert_eq!(
            (revoked.revoked_ms, revoked.revoked_reason.as_deref()),
            (Some(20), Some("stolen"))
        );
        assert_eq!(db.registry().unwrap().get(&gw1).map(|e| e.revoked), Some(true));
        assert!(matches!(db.revoke("gw9", "ada", "", 20), Err(EnrollError::NotFound(_))));
        let again = db.enroll(&enrollment("gw1", 3), "ada", 30).unwrap();
        assert_eq!(again.revoked_ms, None);
        assert_eq!(db.enrollments().unwrap().len(), 1);
    }
}
