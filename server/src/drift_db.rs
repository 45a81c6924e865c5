//! Drift reports in the server's SQLite store: one row per report, one per (report, feature)
//! with the feature's counts as JSON, and the retraining events raised from them.

use crate::db::Db;
use crate::drift::{Evidence, FeatureRow, RetrainingEvent, Run};
use millwright_shared::drift::{DriftReport, FeatureDrift};
use rusqlite::{Connection, params};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS drift_reports (
    device      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    asset       TEXT NOT NULL,
    site        TEXT NOT NULL,
    model       TEXT NOT NULL,
    release     INTEGER NOT NULL,
    from_ms     INTEGER NOT NULL,
    to_ms       INTEGER NOT NULL,
    samples     INTEGER NOT NULL,
    gaps        INTEGER NOT NULL,
    worst       TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS drift_reports_by_release ON drift_reports (model, release, from_ms);
CREATE TABLE IF NOT EXISTS drift_features (
    device   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    feature  TEXT NOT NULL,
    severity TEXT NOT NULL,
    body     TEXT NOT NULL,
    PRIMARY KEY (device, seq, feature)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retraining_events (
    id        INTEGER PRIMARY KEY,
    model     TEXT NOT NULL,
    release   INTEGER NOT NULL,
    raised_ms INTEGER NOT NULL,
    body      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS retraining_features (
    model    TEXT NOT NULL,
    release  INTEGER NOT NULL,
    feature  TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    PRIMARY KEY (model, release, feature)
) WITHOUT ROWID;
";

/// Per release, asset and feature, the run of newest reports at `drift` ([`Run`]); added by
/// migration 2 (runs count from the first report stored after it).
pub const RUNS: &str = "
CREATE TABLE drift_runs (
    model    TEXT NOT NULL,
    release  INTEGER NOT NULL,
    device   TEXT NOT NULL,
    asset    TEXT NOT NULL,
    feature  TEXT NOT NULL,
    site     TEXT NOT NULL,
    run      INTEGER NOT NULL,
    since_ms INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (model, release, device, asset, feature)
) WITHOUT ROWID;
CREATE INDEX drift_runs_by_length ON drift_runs (model, release, run);";

/// Per (device, asset, model, release) its newest report; added by migration 3, filled from
/// the reports stored before it.
pub const LATEST: &str = "
CREATE TABLE drift_latest (
    device  TEXT NOT NULL,
    asset   TEXT NOT NULL,
    model   TEXT NOT NULL,
    release INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (device, asset, model, release)
) WITHOUT ROWID;
INSERT INTO drift_latest (device, asset, model, release, seq)
    SELECT device, asset, model, release, MAX(seq) FROM drift_reports
    GROUP BY device, asset, model, release;";

/// The site a report is filed under when the device names none.
pub const NO_SITE: &str = "-";

/// Which stored reports a query looks at.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Filter {
    pub model: Option<String>,
    pub release: Option<u64>,
    pub site: Option<String>,
    pub device: Option<String>,
    pub feature: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

/// Stores one drift record inside the caller's transaction; a resent record is ignored.
pub fn insert(
    tx: &Connection,
    device: &str,
    seq: u64,
    at_ms: i64,
    report: &DriftReport,
    now_ms: i64,
) -> rusqlite::Result<usize> {
    let inserted = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO drift_reports
             (device, seq, asset, site, model, release, from_ms, to_ms, samples, gaps, worst, at_ms, received_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?
        .execute(params![
            device,
            seq,
            report.asset.as_str(),
            report.site.as_deref().unwrap_or(NO_SITE),
            report.model.as_str(),
            report.release.0,
            report.from_ms,
            report.to_ms,
            report.samples,
            report.gaps,
            report.worst().as_str(),
            at_ms,
            now_ms
        ])?;
    if inserted == 0 {
        return Ok(0);
    }
    let mut feature = tx.prepare_cached(
        "INSERT OR IGNORE INTO drift_features (device, seq, feature, severity, body)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for f in report.features.iter().chain(&report.output) {
        let body = serde_json::to_string(f).unwrap_or_default();
        feature.execute(params![device, seq, f.name, f.severity.as_str(), body])?;
    }
    advance_runs(tx, device, seq, report)?;
    tx.prepare_cached(
        "INSERT INTO drift_latest (device, asset, model, release, seq) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (device, asset, model, release) DO UPDATE SET seq = max(seq, excluded.seq)",
    )?
    .execute(params![
        device,
        report.asset.as_str(),
        report.model.as_str(),
        report.release.0,
        seq
    ])?;
    Ok(inserted)
}

/// Moves the report's asset's runs on by its verdicts ([`Run::next`]).
fn advance_runs(
    tx: &Connection,
    device: &str,
    seq: u64,
    report: &DriftReport,
) -> rusqlite::Result<()> {
    let (model, release, asset) = (report.model.as_str(), report.release.0, report.asset.as_str());
    let previous: std::collections::HashMap<String, Run> = tx
        .prepare_cached(
            "SELECT device, asset, feature, site, run, since_ms, last_seq FROM drift_runs
             WHERE model = ?1 AND release = ?2 AND device = ?3 AND asset = ?4",
        )?
        .query_map(params![model, release, device, asset], run_row)?
        .map(|r| r.map(|r| (r.feature.clone(), r)))
        .collect::<rusqlite::Result<_>>()?;
    let mut save = tx.prepare_cached(
        "INSERT OR REPLACE INTO drift_runs
         (model, release, device, asset, feature, site, run, since_ms, last_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for f in report.features.iter().chain(&report.output) {
        let row = FeatureRow {
            model: model.to_owned(),
            release,
            device: device.to_owned(),
            site: report.site.clone().unwrap_or_else(|| NO_SITE.to_owned()),
            asset: asset.to_owned(),
            seq,
            from_ms: report.from_ms,
            to_ms: report.to_ms,
            feature: f.clone(),
        };
        if let Some(run) = Run::next(previous.get(&f.name), &row) {
            save.execute(params![
                model,
                release,
                device,
                asset,
                run.feature,
                run.site,
                run.run,
                run.since_ms,
                run.last_seq
            ])?;
        }
    }
    Ok(())
}

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Run> {
    Ok(Run {
        device: r.get(0)?,
        asset: r.get(1)?,
        feature: r.get(2)?,
        site: r.get(3)?,
        run: r.get(4)?,
        since_ms: r.get(5)?,
        last_seq: r.get(6)?,
    })
}

const SELECT: &str = "SELECT r.model, r.release, r.device, r.site, r.asset, r.seq, r.from_ms,
        r.to_ms, f.body
     FROM drift_reports r JOIN drift_features f ON f.device = r.device AND f.seq = r.seq";

fn feature_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<FeatureRow>> {
    let body: String = r.get(8)?;
    let Ok(feature) = serde_json::from_str::<FeatureDrift>(&body) else { return Ok(None) };
    Ok(Some(FeatureRow {
        model: r.get(0)?,
        release: r.get(1)?,
        device: r.get(2)?,
        site: r.get(3)?,
        asset: r.get(4)?,
        seq: r.get(5)?,
        from_ms: r.get(6)?,
        to_ms: r.get(7)?,
        feature,
    }))
}

const WHERE: &str = "(?1 IS NULL OR r.model = ?1) AND (?2 IS NULL OR r.release = ?2)
     AND (?3 IS NULL OR r.site = ?3) AND (?4 IS NULL OR r.device = ?4)
     AND (?5 IS NULL OR f.feature = ?5) AND (?6 IS NULL OR r.from_ms >= ?6)
     AND (?7 IS NULL OR r.from_ms < ?7)";

impl Db {
    /// Every feature row matching `filter`.
    pub fn drift_rows(&self, filter: &Filter) -> rusqlite::Result<Vec<FeatureRow>> {
        let sql = format!("{SELECT} WHERE {WHERE} ORDER BY r.device, r.seq");
        self.query_features(&sql, filter)
    }

    /// The feature rows of each (device, asset)'s newest report of its release: one row per
    /// asset read, however long the history.
    pub fn drift_latest(&self, filter: &Filter) -> rusqlite::Result<Vec<FeatureRow>> {
        let sql = format!(
            "{SELECT} JOIN drift_latest k ON k.device = r.device AND k.seq = r.seq
             WHERE {WHERE} ORDER BY r.device, r.seq"
        );
        self.query_features(&sql, filter)
    }

    fn query_features(&self, sql: &str, f: &Filter) -> rusqlite::Result<Vec<FeatureRow>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(
            params![f.model, f.release, f.site, f.device, f.feature, f.from_ms, f.to_ms],
            feature_row,
        )?;
        rows.filter_map(Result::transpose).collect()
    }

    /// The runs of a release at least `min_run` reports long: what the retraining check
    /// needs, however long the drift history.
    pub fn drift_runs(
        &self,
        model: &str,
        release: u64,
        min_run: u64,
    ) -> rusqlite::Result<Vec<Run>> {
        self.conn
            .prepare_cached(
                "SELECT device, asset, feature, site, run, since_ms, last_seq FROM drift_runs
                 WHERE model = ?1 AND release = ?2 AND run >= ?3
                 ORDER BY device, asset, feature",
            )?
            .query_map(params![model, release, min_run], run_row)?
            .collect()
    }

    /// (model, release) pairs with reports stored since `since_ms`.
    pub fn drift_releases_since(&self, since_ms: i64) -> rusqlite::Result<Vec<(String, u64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT model, release FROM drift_reports WHERE received_ms >= ?1",
        )?;
        let rows = stmt.query_map([since_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// Records a retraining event for the features not already in one; returns it, or `None`
    /// when every feature was already reported.
    pub fn raise_retraining(
        &mut self,
        model: &str,
        release: u64,
        evidence: Vec<Evidence>,
        reason: &str,
        now_ms: i64,
    ) -> rusqlite::Result<Option<RetrainingEvent>> {
        let tx = self.conn.transaction()?;
        let mut fresh = Vec::new();
        for e in evidence {
            let known: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM retraining_features
                 WHERE model = ?1 AND release = ?2 AND feature = ?3)",
                params![model, release, e.feature],
                |r| r.get(0),
            )?;
            if !known {
                fresh.push(e);
            }
        }
        if fresh.is_empty() {
            return Ok(None);
        }
        let mut event = RetrainingEvent {
            id: 0,
            model: model.to_owned(),
            release,
            raised_ms: now_ms,
            reason: reason.to_owned(),
            features: fresh,
        };
        tx.execute(
            "INSERT INTO retraining_events (model, release, raised_ms, body) VALUES (?1, ?2, ?3, '')",
            params![model, release, now_ms],
        )?;
        event.id = tx.last_insert_rowid();
        tx.execute(
            "UPDATE retraining_events SET body = ?2 WHERE id = ?1",
            params![event.id, serde_json::to_string(&event).unwrap_or_default()],
        )?;
        for e in &event.features {
            tx.execute(
                "INSERT INTO retraining_features (model, release, feature, event_id)
                 VALUES (?1, ?2, ?3, ?4)",
                params![model, release, e.feature, event.id],
            )?;
        }
        tx.commit()?;
        Ok(Some(event))
    }

    pub fn retraining_events(&self) -> rusqlite::Result<Vec<RetrainingEvent>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT body FROM retraining_events ORDER BY id")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows
            .filter_map(Result::ok)
            .filter_map(|body| serde_json::from_str(&body).ok())
            .collect())
    }
}
