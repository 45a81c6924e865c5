//! Retention applied to the SQLite store ([`crate::retention`] has the rules): a background
//! thread with a connection of its own removes, device by device, the oldest records each
//! stream may lose, in short transactions with a pause between them, so ingest waits for one
//! of them at most. Predictions are summed into `prediction_hours` in the same transaction
//! that deletes them, and the stream's counters move with them.

use crate::db::{Db, stream_table};
use crate::retention::{Cutoffs, Policy, Report, prefix_end};
use millwright_shared::wire::Stream;
use rusqlite::{TransactionBehavior, params};
use serde::Serialize;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Rows one transaction removes at most.
pub const CHUNK: usize = 2_000;
/// The pause between two transactions of a pass: the writer's turn.
pub const PAUSE: Duration = Duration::from_millis(5);
/// A server that starts runs its first pass this soon: one that was down catches up.
const FIRST_PASS: Duration = Duration::from_secs(5);

/// One hour of a release's predictions on one asset, after the raw rows are gone.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HourRow {
    pub asset: String,
    pub model: String,
    pub release: u64,
    pub hour_ms: i64,
    pub records: u64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// The hour's newest prediction (highest sequence number).
    pub last_seq: u64,
    pub last_cycle: u64,
    pub last_value: f64,
}

/// Sums a device's predictions up to `upto` into their hours (adding to hours summed before).
const ROLL_UP: &str = "
WITH g AS (
    SELECT device, asset, model, release,
           at_ms - (((at_ms % 3600000) + 3600000) % 3600000) AS hour_ms,
           COUNT(*) AS n, SUM(value) AS s, MIN(value) AS lo, MAX(value) AS hi,
           MAX(seq) AS last_seq, MAX(received_ms) AS received_ms
    FROM predictions WHERE device = ?1 AND seq <= ?2
    GROUP BY asset, model, release, hour_ms
)
INSERT INTO prediction_hours
    (device, asset, model, release, hour_ms, records, value_sum, value_min, value_max,
     last_seq, last_cycle, last_value, received_ms)
SELECT g.device, g.asset, g.model, g.release, g.hour_ms, g.n, g.s, g.lo, g.hi,
       g.last_seq, p.cycle, p.value, g.received_ms
FROM g JOIN predictions p ON p.device = g.device AND p.seq = g.last_seq
WHERE true
ON CONFLICT (device, asset, model, release, hour_ms) DO UPDATE SET
    records = records + excluded.records,
    value_sum = value_sum + excluded.value_sum,
    value_min = min(value_min, excluded.value_min),
    value_max = max(value_max, excluded.value_max),
    last_cycle = CASE WHEN excluded.last_seq > last_seq THEN excluded.last_cycle ELSE last_cycle END,
    last_value = CASE WHEN excluded.last_seq > last_seq THEN excluded.last_value ELSE last_value END,
    last_seq = max(last_seq, excluded.last_seq),
    received_ms = max(received_ms, excluded.received_ms)";

impl Db {
    /// One transaction: removes the leading records of `device`'s `stream` received before
    /// `cutoff`, at most `chunk` of them; how many.
    fn prune_prefix(
        &mut self,
        stream: Stream,
        device: &str,
        cutoff: i64,
        chunk: usize,
    ) -> rusqlite::Result<usize> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let oldest: Vec<(u64, i64)> = tx
            .prepare_cached(&format!(
                "SELECT seq, received_ms FROM {} WHERE device = ?1 ORDER BY seq LIMIT ?2",
                stream_table(stream)
            ))?
            .query_map(params![device, chunk], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let Some(upto) = prefix_end(&oldest, cutoff) else { return Ok(0) };
        match stream {
            Stream::Predictions => {
                tx.prepare_cached(ROLL_UP)?.execute(params![device, upto])?;
            }
            Stream::Drift => {
                tx.prepare_cached("DELETE FROM drift_features WHERE device = ?1 AND seq <= ?2")?
                    .execute(params![device, upto])?;
            }
            Stream::Alerts | Stream::Updates => {}
        }
        let removed = tx
            .prepare_cached(&format!(
                "DELETE FROM {} WHERE device = ?1 AND seq <= ?2",
                stream_table(stream)
            ))?
            .execute(params![device, upto])?;
        tx.prepare_cached(
            "INSERT INTO stream_counts (device, stream, records, pruned, pruned_upto)
             VALUES (?1, ?2, 0, ?3, ?4)
             ON CONFLICT (device, stream) DO UPDATE SET
                records = max(records - excluded.pruned, 0),
                pruned = pruned + excluded.pruned,
                pruned_upto = max(pruned_upto, excluded.pruned_upto)",
        )?
        .execute(params![device, stream.as_str(), removed, upto])?;
        tx.commit()?;
        Ok(removed)
    }

    /// One transaction: removes at most `chunk` hourly summaries last added to before `cutoff`.
    fn prune_hours(&mut self, cutoff: i64, chunk: usize) -> rusqlite::Result<usize> {
        self.conn
            .prepare_cached(
                "DELETE FROM prediction_hours WHERE rowid IN
                    (SELECT rowid FROM prediction_hours WHERE received_ms < ?1 LIMIT ?2)",
            )?
            .execute(params![cutoff, chunk])
    }

    /// Devices with records of `stream` stored.
    fn devices_with(&self, stream: Stream) -> rusqlite::Result<Vec<String>> {
        self.conn
            .prepare_cached(
                "SELECT device FROM stream_counts WHERE stream = ?1 AND records > 0 ORDER BY device",
            )?
            .query_map([stream.as_str()], |r| r.get(0))?
            .collect()
    }

    /// A device's hourly summaries in hour order from `from_ms`, optionally of one asset.
    pub fn prediction_hours(
        &self,
        device: &str,
        asset: Option<&str>,
        from_ms: i64,
        limit: u64,
    ) -> rusqlite::Result<Vec<HourRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT asset, model, release, hour_ms, records, value_sum, value_min, value_max,
                    last_seq, last_cycle, last_value
             FROM prediction_hours
             WHERE device = ?1 AND (?2 IS NULL OR asset = ?2) AND hour_ms >= ?3
             ORDER BY hour_ms, asset, model, release LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![device, asset, from_ms, limit], |r| {
            let records: u64 = r.get(4)?;
            let sum: f64 = r.get(5)?;
            Ok(HourRow {
                asset: r.get(0)?,
                model: r.get(1)?,
                release: r.get(2)?,
                hour_ms: r.get(3)?,
                records,
                mean: sum / records.max(1) as f64,
                min: r.get(6)?,
                max: r.get(7)?,
                last_seq: r.get(8)?,
                last_cycle: r.get(9)?,
                last_value: r.get(10)?,
            })
        })?;
        rows.collect()
    }
}

/// One pass over the whole store at the cut-offs; `pause` between transactions. Adds what it
/// removed to `report`. Stops at the first error (the next pass starts again).
pub fn pass(
    db: &mut Db,
    cutoffs: &Cutoffs,
    pause: Duration,
    report: &mut Report,
) -> rusqlite::Result<()> {
    let started = Instant::now();
    let mut longest = Duration::ZERO;
    let mut timed = |f: &mut dyn FnMut() -> rusqlite::Result<usize>| {
        let t = Instant::now();
        let n = f();
        longest = longest.max(t.elapsed());
        n
    };
    let kinds = [
        (Stream::Predictions, cutoffs.predictions),
        (Stream::Alerts, cutoffs.alerts),
        (Stream::Drift, cutoffs.drift),
    ];
    let mut outcome = Ok(());
    'kinds: for (stream, cutoff) in kinds {
        let Some(cutoff) = cutoff else { continue };
        let devices = match db.devices_with(stream) {
            Ok(d) => d,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        for device in devices {
            loop {
                let removed = match timed(&mut || db.prune_prefix(stream, &device, cutoff, CHUNK)) {
                    Ok(n) => n,
                    Err(e) => {
                        outcome = Err(e);
                        break 'kinds;
                    }
                };
                match stream {
                    Stream::Predictions => report.predictions += removed as u64,
                    Stream::Alerts => report.alerts += removed as u64,
                    _ => report.drift_reports += removed as u64,
                }
                if removed == 0 {
                    break;
                }
                std::thread::sleep(pause);
                if removed < CHUNK {
                    break;
                }
            }
        }
    }
    if let (Ok(()), Some(cutoff)) = (&outcome, cutoffs.hourly) {
        loop {
            match timed(&mut || db.prune_hours(cutoff, CHUNK)) {
                Ok(0) => break,
                Ok(n) => {
                    report.hourly += n as u64;
                    std::thread::sleep(pause);
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
    }
    report.passes += 1;
    report.last_pass_duration_ms = started.elapsed().as_millis() as u64;
    report.longest_transaction_ms = longest.as_millis() as u64;
    report.error = outcome.as_ref().err().map(|e| e.to_string());
    outcome
}

/// Runs passes on a thread of its own until `stop` is dropped: the first soon after start,
/// then every `policy.every_minutes`.
pub fn spawn(
    path: std::path::PathBuf,
    policy: Policy,
    report: Arc<Mutex<Report>>,
    stop: Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    if let Ok(mut r) = report.lock() {
        r.policy = Some(policy);
    }
    std::thread::Builder::new().name("retention".into()).spawn(move || {
        let every = Duration::from_secs(u64::from(policy.every_minutes) * 60);
        let mut wait = FIRST_PASS;
        loop {
            match stop.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            wait = every;
            let mut db = match Db::open(&path) {
                Ok(db) => db,
                Err(e) => {
                    tracing::error!("retention: cannot open {}: {e}", path.display());
                    continue;
                }
            };
            // This thread is the report's only writer: the pass adds to the totals so far.
            let now = millwright_io::clock::now_ms();
            let mut totals = report.lock().map(|r| r.clone()).unwrap_or_default();
            let before = totals.clone();
            let result = pass(&mut db, &policy.cutoffs(now), PAUSE, &mut totals);
            totals.last_pass_ms = Some(now);
            if let Ok(mut r) = report.lock() {
                *r = totals.clone();
            }
            let removed = |r: &Report| r.predictions + r.hourly + r.alerts + r.drift_reports;
            match result {
                Ok(()) if removed(&totals) > removed(&before) => {
                    tracing::info!(
                        predictions = totals.predictions - before.predictions,
                        hourly = totals.hourly - before.hourly,
                        alerts = totals.alerts - before.alerts,
                        drift_reports = totals.drift_reports - before.drift_reports,
                        took_ms = totals.last_pass_duration_ms,
                        longest_transaction_ms = totals.longest_transaction_ms,
                        "retention pass removed old records"
                    );
                }
                Ok(()) => {}
                Err(e) => tracing::error!("retention pass stopped: {e}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Accepted;
    use crate::retention::RawPolicy;
    use millwright_shared::drift::DriftReport;
    use millwright_shared::wire::{Alert, Level, Prediction, Record, RecordBody};
    use millwright_shared::{AssetId, DeviceId, ModelName, Release};

    const DAY: i64 = 86_400_000;
    const HOUR: i64 = 3_600_000;

    fn batch(epoch: &str, stream: Stream, records: Vec<Record>) -> Accepted {
        Accepted {
            device: DeviceId::new("gw1").unwrap(),
            epoch: epoch.into(),
            stream,
            records,
            refused: vec![],
        }
    }

    fn prediction(seq: u64, at_ms: i64) -> Record {
        Record {
            seq,
            at_ms,
            body: RecordBody::Prediction(Prediction {
                asset: AssetId::new("u1").unwrap(),
                cycle: 100 + seq,
                model: ModelName::new("m").unwrap(),
                release: Release(1),
                value: seq as f32,
            }),
        }
    }

    fn stored_seqs(db: &Db, table: &str) -> Vec<u64> {
        db.conn
            .prepare(&format!("SELECT seq FROM {table} WHERE device = 'gw1' ORDER BY seq"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn run(db: &mut Db, policy: &Policy, now: i64) -> Report {
        let mut report = Report::default();
        pass(db, &policy.cutoffs(now), Duration::ZERO, &mut report).unwrap();
        report
    }

    #[test]
    fn old_predictions_are_summed_into_their_hours_and_removed_and_the_counts_stay_true() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("s.sqlite")).unwrap();
        let t0 = 1_000 * DAY;
        let hour = 7 * HOUR;
        // seq 1..=6 made in one hour, 7..=10 in the next, all received at t0 (old); 11..=15
        // received 40 days later.
        let old: Vec<Record> =
            (1..=10).map(|s| prediction(s, hour + (s as i64) * 10 * 60_000)).collect();
        db.store(&batch("e1", Stream::Predictions, old), t0).unwrap();
        let young: Vec<Record> = (11..=15).map(|s| prediction(s, hour + 2 * HOUR)).collect();
        db.store(&batch("e1", Stream::Predictions, young), t0 + 40 * DAY).unwrap();

        let policy = Policy::default();
        let now = t0 + 40 * DAY + 1;
        let report = run(&mut db, &policy, now);
        assert_eq!((report.predictions, report.alerts, report.hourly), (10, 0, 0));
        assert_eq!(stored_seqs(&db, "predictions"), (11..=15).collect::<Vec<_>>());
        let hours = db.prediction_hours("gw1", None, i64::MIN, 100).unwrap();
        let summary: Vec<(i64, u64, f64, f64, f64, u64, u64)> = hours
            .iter()
            .map(|h| (h.hour_ms, h.records, h.mean, h.min, h.max, h.last_seq, h.last_cycle))
            .collect();
        assert_eq!(
            summary,
            [(hour, 5, 3.0, 1.0, 5.0, 5, 105), (hour + HOUR, 5, 8.0, 6.0, 10.0, 10, 110)],
            "seq 6 is made at 60 minutes past: the next hour"
        );
        let pred = |db: &Db| db.streams("gw1").unwrap()["pred"].clone();
        let s = pred(&db);
        assert_eq!((s.records, s.pruned, s.last_seq), (5, 10, Some(15)));
        assert_eq!(db.device("gw1").unwrap().unwrap().predictions, 5);
        assert_eq!(db.totals().unwrap().1, 5);

        // A gateway that never got its ack sends 3, 4 again: acknowledged, not stored twice.
        let resent = db
            .store(
                &batch(
                    "e1",
                    Stream::Predictions,
                    vec![prediction(3, 0), prediction(4, 0), prediction(16, 0)],
                ),
                now,
            )
            .unwrap();
        assert_eq!(resent.ack.ranges, vec![(3, 4), (16, 16)]);
        assert_eq!(stored_seqs(&db, "predictions"), (11..=16).collect::<Vec<_>>());
        let s = pred(&db);
        assert_eq!((s.records, s.pruned, s.last_seq), (6, 10, Some(16)));
        assert_eq!(run(&mut db, &policy, now).predictions, 0, "nothing more is old enough");

        // Everything old: the numbering goes on past what is gone, in a new epoch too.
        let later = now + 60 * DAY;
        assert_eq!(run(&mut db, &policy, later).predictions, 6);
        let s = pred(&db);
        assert_eq!((s.records, s.pruned, s.last_seq), (0, 16, Some(16)));
        let opened =
            db.store(&batch("e2", Stream::Predictions, vec![prediction(1, 0)]), later).unwrap();
        assert_eq!(opened.base, 16, "the new epoch starts after the removed records");
        assert_eq!(stored_seqs(&db, "predictions"), [17]);
        let hours = db.prediction_hours("gw1", None, i64::MIN, 100).unwrap();
        let per_hour: Vec<(i64, u64)> = hours.iter().map(|h| (h.hour_ms, h.records)).collect();
        assert_eq!(per_hour, [(0, 1), (hour, 5), (hour + HOUR, 5), (hour + 2 * HOUR, 5)]);
        assert_eq!((hours[0].last_value, hours[3].last_value), (16.0, 15.0));

        // The hourly summaries go after their own days; one added to late stays.
        let short =
            RawPolicy { predictions_days: Some(30), hourly_days: Some(50), ..Default::default() }
                .validate()
                .unwrap();
        let report = run(&mut db, &short, later + 40 * DAY);
        assert_eq!((report.predictions, report.hourly), (1, 3));
        let left: Vec<(i64, u64)> = db
            .prediction_hours("gw1", None, i64::MIN, 100)
            .unwrap()
            .iter()
            .map(|h| (h.hour_ms, h.records))
            .collect();
        assert_eq!(left, [(0, 2)], "16 and 17 share hour 0, summed again when 17 went");
    }

    #[test]
    fn alerts_and_drift_go_by_their_own_days_and_a_young_record_stops_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("s.sqlite")).unwrap();
        let alert = |seq: u64| Record {
            seq,
            at_ms: 0,
            body: RecordBody::Alert(Alert {
                asset: AssetId::new("u1").unwrap(),
                cycle: seq,
                model: ModelName::new("m").unwrap(),
                release: Release(1),
                from: Level::Ok,
                to: Level::Warning,
                value: 1.0,
            }),
        };
        let drift = |seq: u64| Record {
            seq,
            at_ms: 0,
            body: RecordBody::Drift(Box::new(DriftReport {
                asset: AssetId::new("u1").unwrap(),
                model: ModelName::new("m").unwrap(),
                release: Release(1),
                site: None,
                from_ms: 0,
                to_ms: 1,
                first_cycle: None,
                last_cycle: None,
                samples: 10,
                gaps: 0,
                features: vec![],
                output: None,
            })),
        };
        let t0 = 1_000 * DAY;
        // Alert 2 arrives late (young); 1 and 3 are old.
        db.store(&batch("e1", Stream::Alerts, vec![alert(1), alert(3)]), t0).unwrap();
        db.store(&batch("e1", Stream::Alerts, vec![alert(2)]), t0 + 20 * DAY).unwrap();
        db.store(&batch("e1", Stream::Drift, vec![drift(1), drift(2)]), t0).unwrap();
        db.conn
            .execute(
                "INSERT INTO drift_features (device, seq, feature, severity, body)
                 VALUES ('gw1', 1, 's2', 'ok', '{}')",
                [],
            )
            .unwrap();
        let policy =
            RawPolicy { alerts_days: Some(10), drift_days: Some(30), ..Default::default() }
                .validate()
                .unwrap();
        let report = run(&mut db, &policy, t0 + 25 * DAY);
        assert_eq!(
            (report.alerts, report.drift_reports),
            (1, 0),
            "alert 2 is young, and 3 waits behind it"
        );
        assert_eq!(stored_seqs(&db, "alerts"), [2, 3]);
        let report = run(&mut db, &policy, t0 + 31 * DAY);
        assert_eq!((report.alerts, report.drift_reports), (2, 2));
        assert!(stored_seqs(&db, "drift_reports").is_empty());
        assert!(stored_seqs(&db, "drift_features").is_empty(), "a report's features go with it");
        let streams = db.streams("gw1").unwrap();
        assert_eq!((streams["alert"].records, streams["alert"].pruned), (0, 3));
        assert_eq!((streams["drift"].records, streams["drift"].pruned), (0, 2));
        let kept = RawPolicy { alerts_days: Some(0), ..Default::default() }.validate().unwrap();
        db.store(&batch("e1", Stream::Alerts, vec![alert(4)]), t0).unwrap();
        assert_eq!(run(&mut db, &kept, t0 + 9_999 * DAY).alerts, 0, "0 days keeps alerts for good");
    }

    #[test]
    fn a_database_from_before_the_counters_is_counted_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let mut db = Db::open(&path).unwrap();
        db.store(&batch("e1", Stream::Predictions, (1..=4).map(|s| prediction(s, 0)).collect()), 1)
            .unwrap();
        // As the release before the counters left it.
        db.conn
            .execute_batch(
                "DROP TABLE stream_counts; DROP TABLE prediction_hours; DROP TABLE drift_runs;
                 DROP TABLE drift_latest; PRAGMA user_version = 0;",
            )
            .unwrap();
        drop(db);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.streams("gw1").unwrap()["pred"].records, 4);
        let version: u32 = db.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, 3, "every migration applied once");
    }
}
