//! `millwright score`: RMSE of replay predictions at each unit's last cycle against a C-MAPSS
//! RUL file (line i is the true remaining life of unit i after its last cycle).

use super::{EX_DATAERR, Failure};
use anyhow::Context as _;
use millwright_agent::replay::{PredictionLine, unit_asset};
use std::collections::HashMap;
use std::path::Path;

/// Root-mean-square error of `predicted[i]` against `truth[i]`.
pub fn rmse(pairs: &[(f64, f64)]) -> f64 {
    let sum: f64 = pairs.iter().map(|(p, t)| (p - t) * (p - t)).sum();
    (sum / pairs.len().max(1) as f64).sqrt()
}

pub fn run(
    predictions: &Path,
    truth: &Path,
    expect: Option<f64>,
    tolerance: f64,
) -> Result<(), Failure> {
    let text = std::fs::read_to_string(predictions)
        .with_context(|| format!("cannot read {}", predictions.display()))?;
    let mut last: HashMap<String, (u64, f32)> = HashMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let p: PredictionLine = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", predictions.display(), i + 1))?;
        let entry = last.entry(p.asset.to_string()).or_insert((p.cycle, p.value));
        if p.cycle >= entry.0 {
            *entry = (p.cycle, p.value);
        }
    }
    let truth_text = std::fs::read_to_string(truth)
        .with_context(|| format!("cannot read {}", truth.display()))?;
    let mut pairs = Vec::new();
    for (i, line) in truth_text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let t: f64 =
            line.trim().parse().with_context(|| format!("{} line {}", truth.display(), i + 1))?;
        let asset = unit_asset(i as u32 + 1).to_string();
        let (_, predicted) = last
            .get(&asset)
            .with_context(|| format!("no prediction for {asset} in {}", predictions.display()))?;
        pairs.push((f64::from(*predicted), t));
    }
    let value = rmse(&pairs);
    println!("last-cycle RMSE over {} units: {value:.4}", pairs.len());
    if let Some(expected) = expect
        && (value - expected).abs() > tolerance
    {
        return Err(Failure {
            code: EX_DATAERR,
            error: anyhow::anyhow!(
                "RMSE {value:.4} differs from the expected {expected:.4} by more than {tolerance}"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rmse_of_known_errors() {
        assert_eq!(super::rmse(&[(1.0, 4.0), (2.0, -2.0)]), (12.5f64).sqrt());
    }
}
