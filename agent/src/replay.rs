//! Offline replay: run a verified bundle over a recorded C-MAPSS file, one JSON line per
//! prediction (and optionally one per drift report). Used to evaluate a model on recorded data and as the reference the end-to-end
//! tests compare the fleet against.

use crate::asset::{self, AssetState, Outcome};
use crate::cmapss;
use crate::inference::Model;
use millwright_shared::drift::monitor::ReportMeta;
use millwright_shared::drift::{DriftMonitor, DriftReport, DriftSettings};
use millwright_shared::wire::RecordBody;
use millwright_shared::{AssetId, ModelName, Release};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::Arc;

/// One line of the replay output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionLine {
    pub asset: AssetId,
    pub cycle: u64,
    pub value: f32,
    pub model: ModelName,
    pub release: Release,
}

/// The asset id a C-MAPSS unit gets.
pub fn unit_asset(unit: u32) -> AssetId {
    AssetId::new(format!("unit-{unit}")).unwrap_or_else(|_| unreachable!("digits are topic-safe"))
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub units: usize,
    pub predictions: usize,
    pub inference_failures: usize,
    pub drift_reports: usize,
}

/// Where and how a replay writes drift reports: one JSON line per report, a report every
/// `interval` readings of a unit and one for the rest of each unit.
pub struct DriftOut<'a> {
    pub out: &'a mut dyn Write,
    pub settings: DriftSettings,
    pub interval: u64,
}

/// Replays `text` (a C-MAPSS file) through `model`, writing prediction lines to `out` and,
/// when asked and the bundle has a drift profile, drift reports to `drift`.
pub fn replay(
    model: &mut Model,
    text: &str,
    out: &mut impl Write,
    mut drift: Option<DriftOut<'_>>,
) -> anyhow::Result<Summary> {
    let manifest = model.manifest().clone();
    let rows = cmapss::parse(text)?;
    let (features, inputs) = asset::monitored_features(&manifest);
    let columns = cmapss::feature_indices(features.iter().map(String::as_str))?;
    let profile = manifest.drift.clone().map(Arc::new);
    if drift.is_some() && profile.is_none() {
        anyhow::bail!("bundle {} has no drift profile to replay drift against", manifest.model);
    }
    let mut summary = Summary::default();
    for unit in cmapss::units(&rows) {
        summary.units += 1;
        let id = unit_asset(unit);
        let mut asset = AssetState::new(id.clone(), &manifest, None);
        let mut monitor = match (&drift, &profile) {
            (Some(d), Some(p)) => Some(DriftMonitor::new(p.clone(), d.settings)),
            _ => None,
        };
        let meta = || ReportMeta {
            asset: id.clone(),
            model: manifest.model.clone(),
            release: manifest.release,
            site: None,
            from_ms: 0,
            to_ms: 0,
        };
        for row in rows.iter().filter(|r| r.unit == unit) {
            let observed: Vec<f32> = columns.iter().map(|&c| row.values[c] as f32).collect();
            let values = inputs.iter().map(|&i| observed[i]).collect();
            let outcome = asset.on_reading(row.cycle, values, |w| model.predict(w));
            if let Some(m) = &mut monitor {
                let observed: Vec<Option<f32>> = observed.into_iter().map(Some).collect();
                m.observe(row.cycle, &observed);
            }
            match outcome {
                Outcome::Produced { records, .. } => {
                    for body in records {
                        if let RecordBody::Prediction(p) = body {
                            if let Some(m) = &mut monitor {
                                m.observe_output(p.value);
                            }
                            let line = PredictionLine {
                                asset: p.asset,
                                cycle: p.cycle,
                                value: p.value,
                                model: p.model,
                                release: p.release,
                            };
                            serde_json::to_writer(&mut *out, &line)?;
                            out.write_all(b"\n")?;
                            summary.predictions += 1;
                        }
                    }
                }
                Outcome::InferenceFailed(_) => summary.inference_failures += 1,
                Outcome::Filling | Outcome::Warmup => {}
            }
            if let (Some(m), Some(d)) = (&mut monitor, &mut drift)
                && m.samples() >= d.interval
            {
                write_report(&mut *d.out, &m.report(meta()))?;
                summary.drift_reports += 1;
            }
        }
        if let (Some(m), Some(d)) = (&mut monitor, &mut drift)
            && m.samples() > 0
        {
            write_report(&mut *d.out, &m.report(meta()))?;
            summary.drift_reports += 1;
        }
    }
    Ok(summary)
}

fn write_report(out: &mut dyn Write, report: &DriftReport) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, report)?;
    out.write_all(b"\n")?;
    Ok(())
}
