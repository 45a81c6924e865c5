//! The server's SQLite store: devices, predictions and alerts (drift: [`crate::drift_db`]).
//!
//! Idempotent on (device, seq) per stream table: a resent record is ignored, and the ack covers
//! it again. [`Db::store`] returns only after the transaction is committed (WAL,
//! `synchronous=FULL`), so an ack never precedes durability.

use crate::ingest::Accepted;
use millwright_shared::DeviceId;
use millwright_shared::wire::{
    Ack, DeviceStatus, MAX_LABEL_BYTES, MAX_REASON_BYTES, MAX_TAGS, RecordBody, RunningModel,
    clean_text,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;
use std::path::Path;

pub struct Db {
    pub(crate) conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    device        TEXT PRIMARY KEY,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    online        INTEGER NOT NULL DEFAULT 0,
    agent_version TEXT
);
CREATE TABLE IF NOT EXISTS predictions (
    device      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    asset       TEXT NOT NULL,
    cycle       INTEGER NOT NULL,
    model       TEXT NOT NULL,
    release     INTEGER NOT NULL,
    value       REAL NOT NULL,
    at_ms       INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS predictions_by_asset ON predictions (device, asset, cycle);
CREATE TABLE IF NOT EXISTS alerts (
    device      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    asset       TEXT NOT NULL,
    cycle       INTEGER NOT NULL,
    model       TEXT NOT NULL,
    release     INTEGER NOT NULL,
    from_level  TEXT NOT NULL,
    to_level    TEXT NOT NULL,
    value       REAL NOT NULL,
    at_ms       INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox_epochs (
    device        TEXT NOT NULL,
    stream        TEXT NOT NULL,
    epoch         TEXT NOT NULL,
    base          INTEGER NOT NULL,
    last_seq      INTEGER NOT NULL,
    current       INTEGER NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    PRIMARY KEY (device, stream, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    device      TEXT NOT NULL,
    stream      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    dropped     INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    -- JSON: what the dropped predictions said, per asset (wire::Summary); [] for other streams
    summaries   TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (device, stream, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS update_reports (
    device      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    rollout     TEXT,
    directive   INTEGER,
    model       TEXT,
    release     INTEGER,
    phase       TEXT NOT NULL,
    reason      TEXT,
    health      TEXT,
    at_ms       INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
";

/// Schema changes after the tables above, applied once each and in order on open: the
/// database's `PRAGMA user_version` says how many it has.
const MIGRATIONS: [&str; 3] = [
    // 1: counters per device and stream (what is stored, what retention removed, and up to
    // which sequence number nothing is left), filled from the tables; hourly summaries of the
    // predictions retention removed.
    "CREATE TABLE stream_counts (
        device      TEXT NOT NULL,
        stream      TEXT NOT NULL,
        records     INTEGER NOT NULL DEFAULT 0,
        pruned      INTEGER NOT NULL DEFAULT 0,
        pruned_upto INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (device, stream)
    ) WITHOUT ROWID;
    INSERT INTO stream_counts (device, stream, records)
        SELECT device, 'pred', COUNT(*) FROM predictions GROUP BY device;
    INSERT INTO stream_counts (device, stream, records)
        SELECT device, 'alert', COUNT(*) FROM alerts GROUP BY device;
    INSERT INTO stream_counts (device, stream, records)
        SELECT device, 'drift', COUNT(*) FROM drift_reports GROUP BY device;
    INSERT INTO stream_counts (device, stream, records)
        SELECT device, 'update', COUNT(*) FROM update_reports GROUP BY device;
    CREATE TABLE prediction_hours (
        device      TEXT NOT NULL,
        asset       TEXT NOT NULL,
        model       TEXT NOT NULL,
        release     INTEGER NOT NULL,
        hour_ms     INTEGER NOT NULL,
        records     INTEGER NOT NULL,
        value_sum   REAL NOT NULL,
        value_min   REAL NOT NULL,
        value_max   REAL NOT NULL,
        last_seq    INTEGER NOT NULL,
        last_cycle  INTEGER NOT NULL,
        last_value  REAL NOT NULL,
        received_ms INTEGER NOT NULL,
        UNIQUE (device, asset, model, release, hour_ms)
    );
    CREATE INDEX prediction_hours_by_received ON prediction_hours (received_ms);",
    // 2: the runs of drift per release, asset and feature, for the retraining check.
    crate::drift_db::RUNS,
    // 3: the newest report per asset and release, for the drifting assets.
    crate::drift_db::LATEST,
];

/// Columns added to `devices` after its first release; added on open when missing.
const DEVICE_COLUMNS: [&str; 8] = [
    "site TEXT",
    "tags TEXT",
    "device_class TEXT",
    "models TEXT",
    "backlog_records INTEGER",
    "backlog_oldest_ms INTEGER",
    "status_at_ms INTEGER",
    "status_started_ms INTEGER",
];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceRow {
    pub device: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub online: bool,
    pub agent_version: Option<String>,
    pub predictions: u64,
    pub alerts: u64,
    pub site: Option<String>,
    pub tags: Vec<String>,
    pub device_class: Option<String>,
    /// The releases the device serves, from its last status message.
    pub models: Vec<RunningModel>,
    /// Records waiting in its outbox when it last said, and when the oldest was made.
    pub backlog_records: Option<u64>,
    pub backlog_oldest_ms: Option<i64>,
    /// Assets whose newest alert is at warning or alarm and not acknowledged.
    pub open_alerts: u64,
    /// Records the device dropped by policy (its outbox quota), as its gap records say.
    pub dropped: u64,
}

impl DeviceRow {
    /// The release of `model` this device serves, if any.
    pub fn serving(&self, model: &str) -> Option<u64> {
        self.models.iter().find(|m| m.model.as_str() == model).map(|m| m.release.0)
    }
}

/// One stream of one device as stored.
/// One gap record as stored (`GET /api/v1/devices/{device}/gaps`).
#[derive(Debug, Clone, Serialize)]
pub struct GapRow {
    pub stream: String,
    /// The stored sequence numbers the gap stands for, `seq..=last_seq`.
    pub seq: u64,
    pub last_seq: u64,
    pub dropped: u64,
    pub reason: String,
    /// When the gateway dropped them, and when the server learnt it.
    pub at_ms: i64,
    pub received_ms: i64,
    pub summaries: Vec<millwright_shared::wire::Summary>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StreamCount {
    pub records: u64,
    /// The highest stored sequence number: the device's own plus its epoch's base.
    pub last_seq: Option<u64>,
    /// The outbox epoch the device sends now, and how many it has had (a reinstall, a wiped
    /// data folder or a corrupt outbox set aside each start a new one).
    pub epoch: Option<String>,
    pub epochs: u64,
    /// Stored sequence number = the device's + this base (0 in its first epoch).
    pub epoch_base: u64,
    /// Ranges the device announced it dropped by policy (its outbox quota), and how many
    /// records they held: with exactly-once delivery, `records + dropped` is `last_seq`.
    pub gaps: u64,
    pub dropped: u64,
    /// Records retention has removed ([`crate::retention`]): `records + dropped + pruned`
    /// is `last_seq` with exactly-once delivery.
    pub pruned: u64,
}

/// What storing a batch did.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// Acknowledges the records stored (or stored before), in the device's numbering.
    pub ack: Ack,
    /// Device sequence numbers refused: above what their closed epoch had stored.
    pub refused: Vec<u64>,
    /// The batch opened a new epoch for its stream (the previous one, if any).
    pub opened: Option<crate::epochs::Opened>,
    /// Records are stored at `base + seq`.
    pub base: u64,
}

/// One write of a group commit ([`Db::write_all`]).
#[derive(Debug, Clone, Copy)]
pub enum Write<'a> {
    Batch(&'a Accepted),
    Status(&'a DeviceStatus),
}

/// What a [`Write`] did: the batch's ack, or whether the status was newer than the last one.
#[derive(Debug)]
pub enum Written {
    Batch(Stored),
    Status(bool),
}

/// The table each uplink stream is stored in.
pub(crate) fn stream_table(stream: millwright_shared::wire::Stream) -> &'static str {
    use millwright_shared::wire::Stream;
    match stream {
        Stream::Predictions => "predictions",
        Stream::Alerts => "alerts",
        Stream::Drift => "drift_reports",
        Stream::Updates => "update_reports",
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PredictionRow {
    pub seq: u64,
    pub asset: String,
    pub cycle: u64,
    pub model: String,
    pub release: u64,
    pub value: f64,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertRow {
    pub seq: u64,
    pub asset: String,
    pub cycle: u64,
    pub model: String,
    pub release: u64,
    pub from: String,
    pub to: String,
    pub value: f64,
    pub at_ms: i64,
}

/// Per asset: the newest prediction and the newest alert (its `to` is the current level).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AssetLatest {
    pub asset: String,
    pub prediction: Option<PredictionRow>,
    pub alert: Option<AlertRow>,
    pub level: String,
}

impl Db {
    pub fn open(path: &Path) -> rusqlite::Result<Db> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(crate::drift_db::SCHEMA)?;
        conn.execute_batch(crate::rollout_db::SCHEMA)?;
        conn.execute_batch(crate::alerts_db::SCHEMA)?;
        conn.execute_batch(crate::identity_db::SCHEMA)?;
        let gap_summaries = conn
            .prepare("SELECT 1 FROM pragma_table_info('gaps') WHERE name = 'summaries'")?
            .exists([])?;
        if !gap_summaries {
            conn.execute_batch("ALTER TABLE gaps ADD COLUMN summaries TEXT NOT NULL DEFAULT '[]'")?;
        }
        for column in DEVICE_COLUMNS {
            let name = column.split(' ').next().unwrap_or(column);
            let exists = conn
                .prepare("SELECT 1 FROM pragma_table_info('devices') WHERE name = ?1")?
                .exists([name])?;
            if !exists {
                conn.execute_batch(&format!("ALTER TABLE devices ADD COLUMN {column}"))?;
            }
        }
        let mut conn = conn;
        migrate(&mut conn)?;
        // Transactions take the write lock when they begin: with a second writer beside this
        // one (retention), a transaction that read first and wrote later could not upgrade
        // once the other had committed (SQLITE_BUSY_SNAPSHOT, not waited for); this way it
        // waits its turn (busy_timeout).
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        Ok(Db { conn })
    }

    /// A second connection for queries, which WAL lets run beside the writer.
    pub fn open_reader(path: &Path) -> rusqlite::Result<Db> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Db { conn })
    }

    fn touch(tx: &Connection, device: &DeviceId, now_ms: i64) -> rusqlite::Result<()> {
        tx.prepare_cached(
            "INSERT INTO devices (device, first_seen_ms, last_seen_ms) VALUES (?1, ?2, ?2)
             ON CONFLICT (device) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
        )?
        .execute(params![device.as_str(), now_ms])?;
        Ok(())
    }

    /// Stores a batch (ignoring records already stored) and returns the ack to send. Records
    /// go to `base + seq` of their outbox epoch ([`crate::epochs`]).
    pub fn store(&mut self, batch: &Accepted, now_ms: i64) -> rusqlite::Result<Stored> {
        let tx = self.conn.transaction()?;
        let stored = Self::store_in(&tx, batch, now_ms)?;
        tx.commit()?;
        Ok(stored)
    }

    /// Group commit: several writes in one transaction, so one fsync for all of them. All or
    /// nothing: on an error none is stored (the caller may try them one by one), and what is
    /// returned may be acknowledged once this returns.
    pub fn write_all(
        &mut self,
        writes: &[Write<'_>],
        now_ms: i64,
    ) -> rusqlite::Result<Vec<Written>> {
        let tx = self.conn.transaction()?;
        let written = writes
            .iter()
            .map(|w| match w {
                Write::Batch(batch) => Self::store_in(&tx, batch, now_ms).map(Written::Batch),
                Write::Status(status) => {
                    Self::set_status_in(&tx, status, now_ms).map(Written::Status)
                }
            })
            .collect::<rusqlite::Result<Vec<_>>>()?;
        tx.commit()?;
        Ok(written)
    }

    fn store_in(tx: &Connection, batch: &Accepted, now_ms: i64) -> rusqlite::Result<Stored> {
        Self::touch(tx, &batch.device, now_ms)?;
        let stream = batch.stream.as_str();
        let d = batch.device.as_str();
        let known = Self::epochs_in(tx, d, stream)?;
        let stored_max: Option<u64> = tx.query_row(
            &format!(
                "SELECT max(coalesce((SELECT MAX(seq) FROM {} WHERE device = ?1), 0),
                            coalesce((SELECT MAX(last_seq) FROM gaps WHERE device = ?1
                                      AND stream = ?2), 0))",
                stream_table(batch.stream)
            ),
            params![d, stream],
            |r| r.get(0),
        )?;
        // Retention removes a stream from its oldest record on; below `pruned_upto` a record is
        // stored before, and the stream's numbering goes on past it.
        let pruned_upto: u64 = tx
            .prepare_cached(
                "SELECT pruned_upto FROM stream_counts WHERE device = ?1 AND stream = ?2",
            )?
            .query_row(params![d, stream], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let stored_max = stored_max.unwrap_or(0).max(pruned_upto);
        let placement = crate::epochs::place(&known, &batch.epoch, stored_max);
        let base = placement.base;
        if placement.opens.is_some() {
            tx.execute(
                "UPDATE outbox_epochs SET current = 0 WHERE device = ?1 AND stream = ?2",
                params![d, stream],
            )?;
            tx.execute(
                "INSERT INTO outbox_epochs
                 (device, stream, epoch, base, last_seq, current, first_seen_ms)
                 VALUES (?1, ?2, ?3, ?4, 0, 1, ?5)",
                params![d, stream, &batch.epoch, base, now_ms],
            )?;
        }
        let (accepted, refused): (Vec<_>, Vec<_>) = batch
            .records
            .iter()
            .partition(|r| placement.accept_upto.is_none_or(|upto| r.seq <= upto));
        let stored_seq = |seq: u64| {
            base.checked_add(seq).filter(|s| i64::try_from(*s).is_ok()).ok_or_else(|| {
                rusqlite::Error::ToSqlConversionFailure("sequence number overflows".into())
            })
        };
        let mut inserted = 0usize;
        {
            let mut pred = tx.prepare_cached(
                "INSERT OR IGNORE INTO predictions
                 (device, seq, asset, cycle, model, release, value, at_ms, received_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            let mut alert = tx.prepare_cached(
                "INSERT OR IGNORE INTO alerts
                 (device, seq, asset, cycle, model, release, from_level, to_level, value, at_ms, received_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            for r in &accepted {
                let seq = stored_seq(r.seq)?;
                if seq <= pruned_upto && !matches!(r.body, RecordBody::Gap(_)) {
                    continue;
                }
                inserted += match &r.body {
                    RecordBody::Prediction(p) => pred.execute(params![
                        d,
                        seq,
                        p.asset.as_str(),
                        p.cycle,
                        p.model.as_str(),
                        p.release.0,
                        f64::from(p.value),
                        r.at_ms,
                        now_ms
                    ])?,
                    RecordBody::Alert(a) => alert.execute(params![
                        d,
                        seq,
                        a.asset.as_str(),
                        a.cycle,
                        a.model.as_str(),
                        a.release.0,
                        a.from.as_str(),
                        a.to.as_str(),
                        f64::from(a.value),
                        r.at_ms,
                        now_ms
                    ])?,
                    RecordBody::Drift(report) => {
                        crate::drift_db::insert(tx, d, seq, r.at_ms, report, now_ms)?
                    }
                    RecordBody::Gap(g) => {
                        tx.prepare_cached(
                            "INSERT OR IGNORE INTO gaps
                             (device, stream, seq, last_seq, dropped, reason, at_ms, received_ms,
                              summaries)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                        )?
                        .execute(params![
                            d,
                            stream,
                            seq,
                            stored_seq(g.last)?,
                            g.dropped,
                            clean_text(&g.reason, MAX_LABEL_BYTES),
                            r.at_ms,
                            now_ms,
                            serde_json::to_string(&g.summaries).unwrap_or_else(|_| "[]".into()),
                        ])?;
                        // A gap is kept in its own table, not counted as a stored record.
                        0
                    }
                    RecordBody::Update(u) => tx
                        .prepare_cached(
                            "INSERT OR IGNORE INTO update_reports
                             (device, seq, rollout, directive, model, release, phase, reason,
                              health, at_ms, received_ms)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                        )?
                        .execute(params![
                            d,
                            seq,
                            u.rollout.as_deref().map(|r| clean_text(r, MAX_LABEL_BYTES)),
                            u.directive,
                            u.model.as_ref().map(|m| m.as_str()),
                            u.release.map(|r| r.0),
                            u.phase.as_str(),
                            u.reason.as_deref().map(|r| clean_text(r, MAX_REASON_BYTES)),
                            u.health.as_ref().and_then(|h| serde_json::to_string(h).ok()),
                            r.at_ms,
                            now_ms
                        ])?,
                };
            }
        }
        if inserted > 0 {
            tx.prepare_cached(
                "INSERT INTO stream_counts (device, stream, records) VALUES (?1, ?2, ?3)
                 ON CONFLICT (device, stream) DO UPDATE SET records = records + excluded.records",
            )?
            .execute(params![d, stream, inserted])?;
        }
        // A gap record at `first` stands for its whole range.
        let last_of = |r: &&millwright_shared::wire::Record| match &r.body {
            RecordBody::Gap(g) => g.last,
            _ => r.seq,
        };
        if let Some(last) = accepted.iter().map(last_of).max() {
            tx.execute(
                "UPDATE outbox_epochs SET last_seq = max(last_seq, ?4)
                 WHERE device = ?1 AND stream = ?2 AND epoch = ?3",
                params![d, stream, &batch.epoch, last],
            )?;
        }
        Ok(Stored {
            ack: Ack::from_seqs(
                &batch.epoch,
                batch.stream,
                accepted.iter().map(|r| r.seq).collect(),
            ),
            refused: refused.iter().map(|r| r.seq).collect(),
            opened: placement.opens,
            base,
        })
    }

    fn epochs_in(
        conn: &Connection,
        device: &str,
        stream: &str,
    ) -> rusqlite::Result<Vec<crate::epochs::Epoch>> {
        let mut stmt = conn.prepare_cached(
            "SELECT epoch, base, last_seq, current FROM outbox_epochs
             WHERE device = ?1 AND stream = ?2 ORDER BY first_seen_ms, base",
        )?;
        let rows = stmt.query_map(params![device, stream], |r| {
            Ok(crate::epochs::Epoch {
                epoch: r.get(0)?,
                base: r.get(1)?,
                last_seq: r.get(2)?,
                current: r.get(3)?,
            })
        })?;
        rows.collect()
    }

    /// Records a status message if it is newer than the last one accepted
    /// ([`crate::identity::status_in_order`]); false (and nothing written) for a stale one. The
    /// last will (`online: false`, nothing else) leaves the inventory as the device last
    /// described it. Labels the registry holds (site, tags, class) win over the device's own.
    pub fn set_status(&mut self, status: &DeviceStatus, now_ms: i64) -> rusqlite::Result<bool> {
        let tx = self.conn.transaction()?;
        let accepted = Self::set_status_in(&tx, status, now_ms)?;
        tx.commit()?;
        Ok(accepted)
    }

    fn set_status_in(
        tx: &Connection,
        status: &DeviceStatus,
        now_ms: i64,
    ) -> rusqlite::Result<bool> {
        let last: Option<(Option<i64>, Option<i64>)> = tx
            .query_row(
                "SELECT status_at_ms, status_started_ms FROM devices WHERE device = ?1",
                [status.device.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let last = match last {
            Some((Some(at_ms), Some(started_ms))) => {
                Some(crate::identity::StatusOrder { at_ms, started_ms })
            }
            _ => None,
        };
        if !crate::identity::status_in_order(last, status) {
            return Ok(false);
        }
        Self::touch(tx, &status.device, now_ms)?;
        let label = |t: &Option<String>| t.as_deref().map(|t| clean_text(t, MAX_LABEL_BYTES));
        tx.execute(
            "UPDATE devices SET online = ?2, agent_version = ?3,
                    status_at_ms = max(coalesce(status_at_ms, ?4), ?4), status_started_ms = ?5
             WHERE device = ?1",
            params![
                status.device.as_str(),
                status.online,
                clean_text(&status.agent_version, MAX_LABEL_BYTES),
                status.at_ms,
                status.started_ms
            ],
        )?;
        if let Some(b) = status.backlog {
            tx.execute(
                "UPDATE devices SET backlog_records = ?2, backlog_oldest_ms = ?3 WHERE device = ?1",
                params![status.device.as_str(), b.records, b.oldest_at_ms],
            )?;
        }
        if status.online {
            let tags: Vec<String> =
                status.tags.iter().take(MAX_TAGS).map(|t| clean_text(t, MAX_LABEL_BYTES)).collect();
            let models: Vec<&RunningModel> = status.models.iter().take(64).collect();
            tx.execute(
                "UPDATE devices SET
                    site = coalesce((SELECT e.site FROM enrolled e WHERE e.device = ?1), ?2),
                    tags = coalesce((SELECT e.tags FROM enrolled e WHERE e.device = ?1
                                     AND e.tags != '[]'), ?3),
                    device_class = coalesce((SELECT e.device_class FROM enrolled e
                                             WHERE e.device = ?1), ?4),
                    models = ?5
                 WHERE device = ?1",
                params![
                    status.device.as_str(),
                    label(&status.site),
                    serde_json::to_string(&tags).ok(),
                    label(&status.device_class),
                    serde_json::to_string(&models).ok()
                ],
            )?;
        }
        Ok(true)
    }

    pub fn devices(&self) -> rusqlite::Result<Vec<DeviceRow>> {
        self.device_rows(None)
    }

    pub fn device(&self, device: &str) -> rusqlite::Result<Option<DeviceRow>> {
        Ok(self.device_rows(Some(device))?.pop())
    }

    fn device_rows(&self, only: Option<&str>) -> rusqlite::Result<Vec<DeviceRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT d.device, d.first_seen_ms, d.last_seen_ms, d.online, d.agent_version,
                    coalesce((SELECT c.records FROM stream_counts c
                              WHERE c.device = d.device AND c.stream = 'pred'), 0),
                    coalesce((SELECT c.records FROM stream_counts c
                              WHERE c.device = d.device AND c.stream = 'alert'), 0),
                    d.site, d.tags, d.device_class, d.models, d.backlog_records, d.backlog_oldest_ms,
                    (SELECT COUNT(*) FROM alerts a WHERE a.device = d.device
                       AND a.to_level != 'ok'
                       AND a.seq = (SELECT MAX(b.seq) FROM alerts b
                                    WHERE b.device = a.device AND b.asset = a.asset)
                       AND NOT EXISTS (SELECT 1 FROM alert_acks k
                                       WHERE k.device = a.device AND k.seq = a.seq)),
                    (SELECT COALESCE(SUM(g.dropped), 0) FROM gaps g WHERE g.device = d.device)
             FROM devices d WHERE ?1 IS NULL OR d.device = ?1 ORDER BY d.device",
        )?;
        let rows = stmt.query_map([only], |r| {
            let list = |i: usize| -> rusqlite::Result<Option<String>> { r.get(i) };
            Ok(DeviceRow {
                device: r.get(0)?,
                first_seen_ms: r.get(1)?,
                last_seen_ms: r.get(2)?,
                online: r.get(3)?,
                agent_version: r.get(4)?,
                predictions: r.get(5)?,
                alerts: r.get(6)?,
                site: r.get(7)?,
                tags: list(8)?.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default(),
                device_class: r.get(9)?,
                models: list(10)?.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default(),
                backlog_records: r.get(11)?,
                backlog_oldest_ms: r.get(12)?,
                open_alerts: r.get(13)?,
                dropped: r.get(14)?,
            })
        })?;
        rows.collect()
    }

    /// Predictions of a device in sequence order, after `after_seq`, optionally of one asset:
    /// the first `limit` of them, or the newest `limit` with `newest`.
    pub fn predictions(
        &self,
        device: &str,
        asset: Option<&str>,
        after_seq: u64,
        limit: u64,
        newest: bool,
    ) -> rusqlite::Result<Vec<PredictionRow>> {
        let mut stmt = self.conn.prepare_cached(&page_sql(
            "SELECT seq, asset, cycle, model, release, value, at_ms FROM predictions
             WHERE device = ?1 AND seq > ?2 AND (?3 IS NULL OR asset = ?3)",
            "?4",
            newest,
        ))?;
        let rows = stmt.query_map(params![device, after_seq, asset, limit], prediction_row)?;
        rows.collect()
    }

    /// Alerts of a device in sequence order, after `after_seq`: the first `limit`, or the
    /// newest `limit` with `newest`.
    pub fn alerts(
        &self,
        device: &str,
        after_seq: u64,
        limit: u64,
        newest: bool,
    ) -> rusqlite::Result<Vec<AlertRow>> {
        let mut stmt = self.conn.prepare_cached(&page_sql(
            "SELECT seq, asset, cycle, model, release, from_level, to_level, value, at_ms
             FROM alerts WHERE device = ?1 AND seq > ?2",
            "?3",
            newest,
        ))?;
        let rows = stmt.query_map(params![device, after_seq, limit], alert_row)?;
        rows.collect()
    }

    /// A device's update reports in sequence order (phase, reason, health as JSON).
    pub fn update_reports(&self, device: &str) -> rusqlite::Result<Vec<serde_json::Value>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, rollout, directive, model, release, phase, reason, health, at_ms
             FROM update_reports WHERE device = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([device], |r| {
            let health: Option<String> = r.get(7)?;
            Ok(serde_json::json!({
                "seq": r.get::<_, u64>(0)?,
                "rollout": r.get::<_, Option<String>>(1)?,
                "directive": r.get::<_, Option<u64>>(2)?,
                "model": r.get::<_, Option<String>>(3)?,
                "release": r.get::<_, Option<u64>>(4)?,
                "phase": r.get::<_, String>(5)?,
                "reason": r.get::<_, Option<String>>(6)?,
                "health": health.and_then(|h| serde_json::from_str::<serde_json::Value>(&h).ok()),
                "at_ms": r.get::<_, i64>(8)?,
            }))
        })?;
        rows.collect()
    }

    /// The newest prediction and alert of every asset of a device.
    pub fn latest(&self, device: &str) -> rusqlite::Result<Vec<AssetLatest>> {
        let mut assets: Vec<String> = self
            .conn
            .prepare_cached(
                "SELECT DISTINCT asset FROM predictions WHERE device = ?1
                 UNION SELECT DISTINCT asset FROM alerts WHERE device = ?1",
            )?
            .query_map([device], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        assets.sort();
        let mut out = Vec::new();
        for asset in assets {
            let prediction = self
                .conn
                .prepare_cached(
                    "SELECT seq, asset, cycle, model, release, value, at_ms FROM predictions
                     WHERE device = ?1 AND asset = ?2 ORDER BY cycle DESC, seq DESC LIMIT 1",
                )?
                .query_row([device, &asset], prediction_row)
                .optional()?;
            let alert = self
                .conn
                .prepare_cached(
                    "SELECT seq, asset, cycle, model, release, from_level, to_level, value, at_ms
                     FROM alerts WHERE device = ?1 AND asset = ?2 ORDER BY seq DESC LIMIT 1",
                )?
                .query_row([device, &asset], alert_row)
                .optional()?;
            let level = alert.as_ref().map_or("ok".to_owned(), |a| a.to.clone());
            out.push(AssetLatest { asset, prediction, alert, level });
        }
        Ok(out)
    }

    /// The device's gap records, newest first: what it dropped by policy, when, why, and for
    /// dropped predictions what they said per asset.
    pub fn gaps(&self, device: &str) -> rusqlite::Result<Vec<GapRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT stream, seq, last_seq, dropped, reason, at_ms, received_ms, summaries
             FROM gaps WHERE device = ?1 ORDER BY received_ms DESC, stream, seq DESC LIMIT 1000",
        )?;
        let rows = stmt.query_map([device], |r| {
            let summaries: String = r.get(7)?;
            Ok(GapRow {
                stream: r.get(0)?,
                seq: r.get(1)?,
                last_seq: r.get(2)?,
                dropped: r.get(3)?,
                reason: r.get(4)?,
                at_ms: r.get(5)?,
                received_ms: r.get(6)?,
                summaries: serde_json::from_str(&summaries).unwrap_or_default(),
            })
        })?;
        rows.collect()
    }

    /// Counts for the health endpoint.
    /// Per uplink stream, the device's stored records and the highest sequence number: with
    /// exactly-once delivery the two agree with the device's own last sequence number.
    pub fn streams(
        &self,
        device: &str,
    ) -> rusqlite::Result<std::collections::BTreeMap<&'static str, StreamCount>> {
        let mut out = std::collections::BTreeMap::new();
        for stream in millwright_shared::wire::Stream::ALL {
            let last_seq: Option<u64> = self.conn.query_row(
                &format!("SELECT MAX(seq) FROM {} WHERE device = ?1", stream_table(stream)),
                [device],
                |r| r.get(0),
            )?;
            let (records, pruned, pruned_upto): (u64, u64, u64) = self
                .conn
                .prepare_cached(
                    "SELECT records, pruned, pruned_upto FROM stream_counts
                     WHERE device = ?1 AND stream = ?2",
                )?
                .query_row(params![device, stream.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?
                .unwrap_or((0, 0, 0));
            let (gaps, dropped, gap_last): (u64, u64, Option<u64>) = self.conn.query_row(
                "SELECT COUNT(*), coalesce(SUM(dropped), 0), MAX(last_seq) FROM gaps
                 WHERE device = ?1 AND stream = ?2",
                params![device, stream.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let last_seq = last_seq.max(gap_last).max(Some(pruned_upto).filter(|&p| p > 0));
            let epochs = Self::epochs_in(&self.conn, device, stream.as_str())?;
            let current = epochs.iter().find(|e| e.current);
            out.insert(
                stream.as_str(),
                StreamCount {
                    records,
                    last_seq,
                    epoch: current.map(|e| e.epoch.clone()),
                    epochs: epochs.len() as u64,
                    epoch_base: current.map_or(0, |e| e.base),
                    gaps,
                    dropped,
                    pruned,
                },
            );
        }
        Ok(out)
    }

    /// Records stored now per uplink stream, from the counters.
    pub fn stored_per_stream(&self) -> rusqlite::Result<Vec<(&'static str, u64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT coalesce(SUM(records), 0) FROM stream_counts WHERE stream = ?1",
        )?;
        millwright_shared::wire::Stream::ALL
            .into_iter()
            .map(|s| Ok((s.as_str(), stmt.query_row([s.as_str()], |r| r.get(0))?)))
            .collect()
    }

    pub fn totals(&self) -> rusqlite::Result<(u64, u64, u64)> {
        self.conn.query_row(
            "SELECT (SELECT COUNT(*) FROM devices),
                    (SELECT coalesce(SUM(records), 0) FROM stream_counts WHERE stream = 'pred'),
                    (SELECT coalesce(SUM(records), 0) FROM stream_counts WHERE stream = 'alert')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }
}

/// Applies the [`MIGRATIONS`] the database has not had, each in a transaction of its own.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", n + 1)?;
        tx.commit()?;
        tracing::info!(version = n + 1, "database migrated");
    }
    Ok(())
}

/// A page of `select` in sequence order, `limit` (a parameter) rows long: its first rows, or
/// its newest (the primary key read backwards, then turned round).
fn page_sql(select: &str, limit: &str, newest: bool) -> String {
    match newest {
        false => format!("{select} ORDER BY seq LIMIT {limit}"),
        true => format!("SELECT * FROM ({select} ORDER BY seq DESC LIMIT {limit}) ORDER BY seq"),
    }
}

fn prediction_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PredictionRow> {
    Ok(PredictionRow {
        seq: r.get(0)?,
        asset: r.get(1)?,
        cycle: r.get(2)?,
        model: r.get(3)?,
        release: r.get(4)?,
        value: r.get(5)?,
        at_ms: r.get(6)?,
    })
}

/// An [`AlertRow`] from the first nine columns of a query on `alerts`.
pub(crate) fn alert_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AlertRow> {
    Ok(AlertRow {
        seq: r.get(0)?,
        asset: r.get(1)?,
        cycle: r.get(2)?,
        model: r.get(3)?,
        release: r.get(4)?,
        from: r.get(5)?,
        to: r.get(6)?,
        value: r.get(7)?,
        at_ms: r.get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use millwright_shared::wire::{Prediction, Record, Stream};
    use millwright_shared::{AssetId, ModelName, Release};

    fn accepted(seqs: &[u64]) -> Accepted {
        Accepted {
            device: DeviceId::new("gw1").unwrap(),
            epoch: "e1".into(),
            stream: Stream::Predictions,
            records: seqs
                .iter()
                .map(|&seq| Record {
                    seq,
                    at_ms: 5,
                    body: RecordBody::Prediction(Prediction {
                        asset: AssetId::new("u1").unwrap(),
                        cycle: 29 + seq,
                        model: ModelName::new("m").unwrap(),
                        release: Release(1),
                        value: seq as f32 * 1.5,
                    }),
                })
                .collect(),
            refused: vec![],
        }
    }

    #[test]
    fn a_group_commit_stores_all_its_writes_in_order_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("s.sqlite")).unwrap();
        let status = |at_ms| DeviceStatus {
            v: millwright_shared::wire::WIRE_VERSION,
            device: DeviceId::new("gw1").unwrap(),
            at_ms,
            started_ms: 1,
            online: true,
            agent_version: "0.1.0".into(),
            site: None,
            tags: vec![],
            device_class: None,
            models: vec![],
            backlog: None,
        };
        let mut gw2 = accepted(&[1, 2]);
        gw2.device = DeviceId::new("gw2").unwrap();
        let (first, again) = (accepted(&[1, 2, 3]), accepted(&[3, 4]));
        let (newer, replay) = (status(20), status(10));
        let writes = [
            Write::Batch(&first),
            Write::Status(&newer),
            Write::Batch(&gw2),
            Write::Batch(&again),
            Write::Status(&replay),
        ];
        let written = db.write_all(&writes, 7).unwrap();
        let acks: Vec<Vec<(u64, u64)>> = written
            .iter()
            .filter_map(|w| match w {
                Written::Batch(s) => Some(s.ack.ranges.clone()),
                Written::Status(_) => None,
            })
            .collect();
        // Each batch is acked for its own records; the later write sees the earlier one.
        assert_eq!(acks, vec![vec![(1, 3)], vec![(1, 2)], vec![(3, 4)]]);
        let statuses: Vec<bool> = written
            .iter()
            .filter_map(|w| match w {
                Written::Status(accepted) => Some(*accepted),
                Written::Batch(_) => None,
            })
            .collect();
        assert_eq!(
            statuses,
            vec![true, false],
            "the replayed status is judged after the newer one"
        );
        assert_eq!(db.totals().unwrap(), (2, 6, 0));

        // A write that cannot be stored (a value SQLite cannot hold: its cycle is above
        // 2^63 - 1) takes the whole group back: nothing of it is stored, so nothing is acked.
        let mut bad = accepted(&[i64::MAX as u64]);
        bad.device = DeviceId::new("gw3").unwrap();
        let mut gw4 = accepted(&[1]);
        gw4.device = DeviceId::new("gw4").unwrap();
        assert!(db.write_all(&[Write::Batch(&gw4), Write::Batch(&bad)], 9).is_err());
        assert_eq!(db.totals().unwrap(), (2, 6, 0), "gw4's record went back with the group");
        db.write_all(&[Write::Batch(&gw4)], 9).unwrap();
        assert_eq!(db.totals().unwrap(), (3, 7, 0), "and is stored on its own");
    }

    #[test]
    fn storing_a_batch_twice_keeps_one_copy_and_acks_both_times() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("s.sqlite")).unwrap();
        let ack = db.store(&accepted(&[1, 2, 3]), 10).unwrap().ack;
        assert_eq!(ack.ranges, vec![(1, 3)]);
        let again = db.store(&accepted(&[2, 3, 4]), 20).unwrap().ack;
        assert_eq!(again.ranges, vec![(2, 4)]);
        let rows = db.predictions("gw1", None, 0, 100, false).unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(rows[1].value, 3.0);
        let seqs = |rows: Vec<PredictionRow>| rows.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(db.predictions("gw1", None, 0, 2, false).unwrap()), vec![1, 2]);
        assert_eq!(seqs(db.predictions("gw1", None, 0, 2, true).unwrap()), vec![3, 4], "newest");
        assert_eq!(seqs(db.predictions("gw1", None, 3, 2, true).unwrap()), vec![4]);
        let devices = db.devices().unwrap();
        assert_eq!(
            (devices[0].first_seen_ms, devices[0].last_seen_ms, devices[0].predictions),
            (10, 20, 4)
        );
        let latest = db.latest("gw1").unwrap();
        assert_eq!(latest[0].prediction.as_ref().unwrap().cycle, 33);
        assert_eq!(latest[0].level, "ok");
    }

    #[test]
    fn a_new_outbox_epoch_is_stored_after_the_old_one_and_a_closed_epoch_only_resends() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("s.sqlite")).unwrap();
        let first = db.store(&accepted(&[1, 2, 3]), 10).unwrap();
        assert_eq!((first.base, first.opened.is_some()), (0, true));
        // A reinstalled gateway numbers from 1 again, in a new epoch.
        let mut reinstalled = accepted(&[1, 2]);
        reinstalled.epoch = "e2".into();
        let stored = db.store(&reinstalled, 20).unwrap();
        assert_eq!(stored.opened.unwrap().previous.as_deref(), Some("e1"));
        assert_eq!(
            (stored.base, stored.ack.ranges.clone(), stored.ack.epoch.as_str()),
            (3, vec![(1, 2)], "e2")
        );
        let again = db.store(&reinstalled, 21).unwrap();
        assert_eq!((again.base, again.opened, again.ack.ranges), (3, None, vec![(1, 2)]));
        // The old outbox's resend of what it stored is acked; anything newer from it is refused.
        let old = db.store(&accepted(&[3, 4]), 30).unwrap();
        assert_eq!((old.ack.ranges, old.refused), (vec![(3, 3)], vec![4]));
        let rows = db.predictions("gw1", None, 0, 100, false).unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(rows[3].cycle, 30, "stored seq 4 is the new outbox's record 1");
        let streams = db.streams("gw1").unwrap();
        let pred = &streams["pred"];
        assert_eq!(
            (pred.records, pred.last_seq, pred.epoch.as_deref(), pred.epochs, pred.epoch_base),
            (5, Some(5), Some("e2"), 2, 3)
        );
    }

    #[test]
    fn a_gap_record_stands_for_its_range_in_the_counts_and_in_the_next_epoch() {
        use millwright_shared::wire::Gap;
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("s.sqlite")).unwrap();
        let mut batch = accepted(&[1, 2, 9]);
        batch.records.insert(
            2,
            Record {
                seq: 3,
                at_ms: 5,
                body: RecordBody::Gap(Gap {
                    stream: Stream::Predictions,
                    first: 3,
                    last: 8,
                    dropped: 6,
                    reason: "quota".into(),
                    summaries: Vec::new(),
                }),
            },
        );
        let stored = db.store(&batch, 10).unwrap();
        assert_eq!(stored.ack.ranges, vec![(1, 3), (9, 9)]);
        let pred = &db.streams("gw1").unwrap()["pred"];
        assert_eq!(
            (pred.records, pred.dropped, pred.gaps, pred.last_seq),
            (3, 6, 1, Some(9)),
            "records + dropped = last_seq"
        );
        // A gap at the end of an epoch: the next epoch starts above it.
        let mut tail = accepted(&[]);
        tail.records.push(Record {
            seq: 10,
            at_ms: 5,
            body: RecordBody::Gap(Gap {
                stream: Stream::Predictions,
                first: 10,
                last: 20,
                dropped: 11,
                reason: "quota".into(),
                summaries: Vec::new(),
            }),
        });
        db.store(&tail, 11).unwrap();
        let mut next = accepted(&[1]);
        next.epoch = "e2".into();
        assert_eq!(db.store(&next, 12).unwrap().base, 20);
    }
}
