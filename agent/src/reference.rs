//! The drift reference profile of a model, built from recorded training data (C-MAPSS text):
//! every monitored column's distribution, and the distribution of the model's own output over
//! every full training window, computed with the same loader and plan the agent serves with.

use crate::cmapss::{self, Row};
use crate::inference::Model;
use crate::window::Window;
use millwright_shared::drift::{DriftProfile, FeatureProfile};

/// Builds the profile of `features` (all of the model's inputs must be among them) from
/// `rows`; `source` names the data for people reading the manifest.
pub fn build(
    model: &mut Model,
    rows: &[Row],
    features: &[String],
    bins: usize,
    source: &str,
) -> anyhow::Result<DriftProfile> {
    let manifest = model.manifest().clone();
    for input in manifest.feature_names() {
        if !features.iter().any(|f| f == input) {
            anyhow::bail!("drift features must include every model input; {input:?} is missing");
        }
    }
    let columns = cmapss::feature_indices(features.iter().map(String::as_str))?;
    let profiles = features
        .iter()
        .zip(&columns)
        .map(|(name, &c)| {
            let values: Vec<f32> = rows.iter().map(|r| r.values[c] as f32).collect();
            FeatureProfile::build(name, &values, bins)
        })
        .collect();
    let inputs = cmapss::feature_indices(manifest.feature_names())?;
    let mut outputs = Vec::new();
    for unit in cmapss::units(rows) {
        let mut window = Window::new(manifest.input.window, inputs.len());
        for row in rows.iter().filter(|r| r.unit == unit) {
            if let Some(w) = window.push(inputs.iter().map(|&c| row.values[c] as f32).collect()) {
                outputs.push(model.predict(&w)?.first().copied().unwrap_or(f32::NAN));
            }
        }
    }
    let output = FeatureProfile::build(&manifest.output.tensor, &outputs, bins);
    Ok(DriftProfile {
        source: format!("{source}: {} rows, {} windows", rows.len(), outputs.len()),
        features: profiles,
        output: Some(output),
    })
}
