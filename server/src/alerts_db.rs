//! Alert acknowledgements and the fleet's alert feed. An alert is *open* while it is the
//! newest alert of its asset, at warning or alarm, and nobody has acknowledged it.

use crate::db::{AlertRow, Db, alert_row};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS alert_acks (
    device TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    note   TEXT NOT NULL,
    at_ms  INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
";

/// One alert of the fleet with what the dashboard needs to act on it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeedRow {
    pub device: String,
    pub site: Option<String>,
    #[serde(flatten)]
    pub alert: AlertRow,
    /// The newest alert of its asset (older ones are history).
    pub current: bool,
    pub open: bool,
    pub acknowledged_by: Option<String>,
    pub acknowledged_at_ms: Option<i64>,
    pub note: Option<String>,
}

/// Why an acknowledgement was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error("no alert {seq} from device {device}")]
    NotFound { device: String, seq: u64 },
    #[error("alert {seq} from {device} is a return to ok: nothing to acknowledge")]
    NotAnAlarm { device: String, seq: u64 },
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
}

/// What an acknowledgement did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Acked {
    pub device: String,
    pub seq: u64,
    pub acknowledged_by: String,
    pub acknowledged_at_ms: i64,
    pub note: String,
    /// True when somebody had acknowledged it before; their name and time are kept.
    pub already_acknowledged: bool,
}

impl Db {
    /// The newest alerts of the fleet first; only open ones when `open_only`.
    pub fn alert_feed(&self, open_only: bool, limit: u64) -> rusqlite::Result<Vec<FeedRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT a.seq, a.asset, a.cycle, a.model, a.release, a.from_level, a.to_level,
                    a.value, a.at_ms, a.device, d.site,
                    a.seq = (SELECT MAX(b.seq) FROM alerts b
                             WHERE b.device = a.device AND b.asset = a.asset),
                    k.actor, k.at_ms, k.note
             FROM alerts a
             LEFT JOIN devices d ON d.device = a.device
             LEFT JOIN alert_acks k ON k.device = a.device AND k.seq = a.seq
             ORDER BY a.received_ms DESC, a.device, a.seq DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            let alert = alert_row(r)?;
            let current: bool = r.get(11)?;
            let acknowledged_by: Option<String> = r.get(12)?;
            Ok(FeedRow {
                device: r.get(9)?,
                site: r.get(10)?,
                open: current && alert.to != "ok" && acknowledged_by.is_none(),
                alert,
                current,
                acknowledged_by,
                acknowledged_at_ms: r.get(13)?,
                note: r.get(14)?,
            })
        })?;
        let mut out = Vec::new();
        for row in rows {
            let row = row?;
            if !open_only || row.open {
                out.push(row);
            }
            if out.len() as u64 >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Records who acknowledged an alert. Acknowledging twice keeps the first.
    pub fn acknowledge_alert(
        &mut self,
        device: &str,
        seq: u64,
        actor: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<Acked, AckError> {
        let tx = self.conn.transaction()?;
        let to: Option<String> = tx
            .query_row(
                "SELECT to_level FROM alerts WHERE device = ?1 AND seq = ?2",
                params![device, seq],
                |r| r.get(0),
            )
            .optional()?;
        let not_found = || AckError::NotFound { device: device.to_owned(), seq };
        match to.as_deref() {
            None => return Err(not_found()),
            Some("ok") => return Err(AckError::NotAnAlarm { device: device.to_owned(), seq }),
            Some(_) => {}
        }
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO alert_acks (device, seq, actor, note, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![device, seq, actor, note, now_ms],
        )?;
        let (by, at, kept): (String, i64, String) = tx.query_row(
            "SELECT actor, at_ms, note FROM alert_acks WHERE device = ?1 AND seq = ?2",
            params![device, seq],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        tx.commit()?;
        Ok(Acked {
            device: device.to_owned(),
            seq,
            acknowledged_by: by,
            acknowledged_at_ms: at,
            note: kept,
            already_acknowledged: inserted == 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(db: &Db, device: &str, seq: u64, asset: &str, from: &str, to: &str) {
        db.conn
            .execute(
                "INSERT INTO alerts (device, seq, asset, cycle, model, release, from_level,
                 to_level, value, at_ms, received_ms) VALUES (?1, ?2, ?3, ?2, 'm', 1, ?4, ?5, 1.0, ?2, ?2)",
                params![device, seq, asset, from, to],
            )
            .unwrap();
    }

    #[test]
    fn open_alerts_are_the_newest_of_their_asset_at_warning_or_alarm_and_unacknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("s.sqlite")).unwrap();
        alert(&db, "gw", 1, "a", "ok", "warning");
        alert(&db, "gw", 2, "a", "warning", "alarm");
        alert(&db, "gw", 3, "b", "ok", "warning");
        alert(&db, "gw", 4, "b", "warning", "ok");
        let open: Vec<u64> =
            db.alert_feed(true, 100).unwrap().iter().map(|r| r.alert.seq).collect();
        assert_eq!(open, vec![2], "a's alarm is open; a's warning is superseded, b is back to ok");
        assert_eq!(db.alert_feed(false, 100).unwrap().len(), 4);
        assert_eq!(db.alert_feed(false, 2).unwrap().len(), 2);

        assert!(matches!(
            db.acknowledge_alert("gw", 4, "ada", "", 10),
            Err(AckError::NotAnAlarm { .. })
        ));
        assert!(matches!(
            db.acknowledge_alert("gw", 9, "ada", "", 10),
            Err(AckError::NotFound { .. })
        ));
        let first = db.acknowledge_alert("gw", 2, "ada", "seen", 10).unwrap();
        assert!(!first.already_acknowledged);
        let again = db.acknowledge_alert("gw", 2, "bob", "me too", 20).unwrap();
        assert!(again.already_acknowledged);
        assert_eq!((again.acknowledged_by.as_str(), again.acknowledged_at_ms), ("ada", 10));
        assert!(db.alert_feed(true, 100).unwrap().is_empty());
        let row =
            db.alert_feed(false, 100).unwrap().into_iter().find(|r| r.alert.seq == 2).unwrap();
        assert_eq!((row.acknowledged_by.as_deref(), row.open), (Some("ada"), false));
        assert_eq!(db.devices().unwrap().len(), 0, "alerts alone make no device rows");
    }
}
