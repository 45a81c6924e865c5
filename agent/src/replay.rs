//! Offline replay: run a verified bundle over a recorded C-MAPSS file, one JSON line per
//! prediction. Used to evaluate a model on recorded data and as the reference the end-to-end
//! tests compare the fleet against.

use crate::asset::{AssetState, Outcome};
use crate::cmapss;
use crate::inference::Model;
use millwright_shared::wire::RecordBody;
use millwright_shared::{AssetId, ModelName, Release};
use serde::{Deserialize, Serialize};
use std::io::Write;

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
}

/// Replays `text` (a C-MAPSS file) through `model`, writing prediction lines to `out`.
pub fn replay(model: &mut Model, text: &str, out: &mut impl Write) -> anyhow::Result<Summary> {
    let manifest = model.manifest().clone();
    let rows = cmapss::parse(text)?;
    let columns = cmapss::feature_indices(manifest.feature_names())?;
    let mut summary = Summary::default();
    for unit in cmapss::units(&rows) {
        summary.units += 1;
        let mut asset = AssetState::new(unit_asset(unit), &manifest, None);
        for row in rows.iter().filter(|r| r.unit == unit) {
            let values = columns.iter().map(|&c| row.values[c] as f32).collect();
            match asset.on_reading(row.cycle, values, |w| model.predict(w)) {
                Outcome::Produced { records, .. } => {
                    for body in records {
                        if let RecordBody::Prediction(p) = body {
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
        }
    }
    Ok(summary)
}
