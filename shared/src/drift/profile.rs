//! The reference profile: per feature (and for the model output) the bin edges, the share of the
//! training data in each bin, and summary statistics. Built once from training data; devices and
//! the server bin live data with exactly these edges, so their counts add up across a fleet.

use serde::{Deserialize, Serialize};

/// Default number of quantile bins per feature.
pub const DEFAULT_BINS: usize = 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftProfile {
    /// Where the reference came from (file name, rows), for people reading a manifest.
    pub source: String,
    /// Monitored input features, a superset of the model's inputs.
    pub features: Vec<FeatureProfile>,
    /// The model output over the training windows, if the bundler computed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<FeatureProfile>,
}

/// How the bins of a feature were chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Binning {
    /// Quantile edges of a continuous feature (ties merged).
    Quantile,
    /// Few distinct values: one bin per value, edges halfway between them.
    Discrete,
    /// One value only: bins below, at and above it.
    Constant,
    /// No finite training value at all: everything lands in one bin.
    Empty,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureProfile {
    pub name: String,
    pub binning: Binning,
    /// Ascending cut points; a value `v` falls in bin `#{edges <= v}`, so there are
    /// `edges.len() + 1` bins and the outer ones are open-ended.
    pub edges: Vec<f64>,
    /// Share of the finite training values in each bin; sums to 1.
    pub proportions: Vec<f64>,
    pub count: u64,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// Share of training rows without a finite value.
    pub missing_rate: f64,
    /// Largest share of the finite values taken by one exact value (1 for a constant).
    pub mode_share: f64,
    /// Longest run of one repeated value in the training sequence.
    pub longest_run: u64,
}

impl FeatureProfile {
    /// Builds the profile of one feature from its training values. Values are taken at `f32`
    /// precision, the precision the agent reads sensors at, so a constant sensor is constant on
    /// both sides.
    pub fn build(name: &str, values: &[f32], bins: usize) -> FeatureProfile {
        let bins = bins.max(2);
        let mut longest_run = 0u64;
        let mut run = 0u64;
        for (i, v) in values.iter().enumerate() {
            run = if i > 0 && values[i - 1] == *v { run + 1 } else { 1 };
            longest_run = longest_run.max(run);
        }
        let mut finite: Vec<f64> =
            values.iter().filter(|v| v.is_finite()).map(|&v| f64::from(v)).collect();
        finite.sort_by(f64::total_cmp);
        let n = finite.len();
        let missing_rate =
            if values.is_empty() { 0.0 } else { (values.len() - n) as f64 / values.len() as f64 };
        let mut distinct: Vec<(f64, usize)> = Vec::new();
        for &v in &finite {
            match distinct.last_mut() {
                Some((last, count)) if *last == v => *count += 1,
                _ => distinct.push((v, 1)),
            }
        }
        let (binning, edges) = match distinct.len() {
            0 => (Binning::Empty, Vec::new()),
            1 => {
                // Below, at (within a relative 1e-6, far finer than the f32 readings' own
                // precision would blur) and above the one value.
                let v = distinct[0].0;
                let tol = (v.abs() * 1e-6).max(1e-9);
                (Binning::Constant, vec![v - tol, v + tol])
            }
            d if d <= bins => (
                Binning::Discrete,
                distinct.windows(2).map(|w| w[0].0 + (w[1].0 - w[0].0) / 2.0).collect(),
            ),
            _ => {
                let mut edges: Vec<f64> = (1..bins).map(|i| finite[i * n / bins]).collect();
                edges.dedup();
                // An edge at the minimum would leave the lowest bin empty by construction.
                edges.retain(|&e| e > finite[0]);
                (Binning::Quantile, edges)
            }
        };
        let mut counts = vec![0u64; edges.len() + 1];
        for &v in &finite {
            counts[bin_of(&edges, v)] += 1;
        }
        let proportions = counts
            .iter()
            .map(|&c| if n == 0 { 1.0 / counts.len() as f64 } else { c as f64 / n as f64 })
            .collect();
        let mean = if n == 0 { 0.0 } else { finite.iter().sum::<f64>() / n as f64 };
        let var = if n == 0 {
            0.0
        } else {
            finite.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64
        };
        let mode = distinct.iter().map(|&(_, c)| c).max().unwrap_or(0);
        FeatureProfile {
            name: name.to_owned(),
            binning,
            edges,
            proportions,
            count: n as u64,
            mean,
            std: var.sqrt(),
            min: finite.first().copied().unwrap_or(0.0),
            max: finite.last().copied().unwrap_or(0.0),
            missing_rate,
            mode_share: if n == 0 { 0.0 } else { mode as f64 / n as f64 },
            longest_run,
        }
    }

    /// The bin `v` falls in.
    pub fn bin(&self, v: f64) -> usize {
        bin_of(&self.edges, v)
    }

    pub fn bins(&self) -> usize {
        self.edges.len() + 1
    }

    pub fn is_constant(&self) -> bool {
        matches!(self.binning, Binning::Constant | Binning::Empty)
    }

    /// The yardstick for mean shifts: the training standard deviation, floored so that a
    /// constant or near-constant feature still has a finite, meaningful scale (0.1 % of its
    /// magnitude, at least 1e-6).
    pub fn scale(&self) -> f64 {
        let floor = (self.mean.abs() * 1e-3).max(1e-6);
        self.std.max(floor)
    }

    /// Values beyond this distance outside `[min, max]` count as out of the training range:
    /// 10 % of the training range, or the scale for a constant feature.
    pub fn range_tolerance(&self) -> f64 {
        if self.is_constant() { self.scale() } else { (self.max - self.min) * 0.1 }
    }

    pub fn in_range(&self, v: f64) -> bool {
        let tol = self.range_tolerance();
        v >= self.min - tol && v <= self.max + tol
    }

    /// Consecutive identical readings that count as a stuck sensor: half again the longest run
    /// in the training data, long enough that the most common training value would repeat that
    /// often by chance with probability below one in a million, and at least 10. `None` for
    /// constant features, which are "stuck" by nature.
    pub fn stuck_run(&self) -> Option<u64> {
        if self.is_constant() || self.mode_share >= 1.0 {
            return None;
        }
        let run = if self.mode_share <= 0.0 { 1.0 } else { (1e-6f64).ln() / self.mode_share.ln() };
        Some((run.ceil() as u64).max(self.longest_run * 3 / 2 + 1).max(10))
    }
}

impl DriftProfile {
    pub fn feature(&self, name: &str) -> Option<&FeatureProfile> {
        self.features.iter().find(|f| f.name == name)
    }
}

fn bin_of(edges: &[f64], v: f64) -> usize {
    edges.partition_point(|&e| e <= v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_bins_split_a_continuous_feature_evenly() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let p = FeatureProfile::build("x", &values, 10);
        assert_eq!(p.binning, Binning::Quantile);
        assert_eq!(p.bins(), 10);
        assert!(p.proportions.iter().all(|&q| (q - 0.1).abs() < 1e-12));
        assert_eq!(p.bin(-5.0), 0);
        assert_eq!(p.bin(99.0), 0);
        assert_eq!(p.bin(100.0), 1);
        assert_eq!(p.bin(5000.0), 9);
        assert!((p.proportions.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_constant_feature_gets_below_at_and_above_bins_and_a_finite_scale() {
        let p = FeatureProfile::build("s1", &[518.67; 100], 10);
        assert_eq!(p.binning, Binning::Constant);
        assert_eq!(p.proportions, vec![0.0, 1.0, 0.0]);
        assert_eq!(p.bin(f64::from(518.67f32)), 1);
        assert_eq!(p.bin(518.0), 0);
        assert_eq!(p.bin(519.0), 2);
        assert_eq!(p.std, 0.0);
        assert!(p.scale() > 0.0 && p.scale().is_finite());
        assert_eq!(p.stuck_run(), None);
    }

    #[test]
    fn few_distinct_values_get_one_bin_each_and_missing_values_are_counted() {
        let mut values = vec![21.61f32; 96];
        values.extend([21.60, 21.60, f32::NAN, f32::NAN]);
        let p = FeatureProfile::build("s6", &values, 10);
        assert_eq!(p.binning, Binning::Discrete);
        assert_eq!(p.bins(), 2);
        assert!((p.proportions[0] - 2.0 / 98.0).abs() < 1e-12);
        assert!((p.missing_rate - 0.02).abs() < 1e-12);
        assert!((p.mode_share - 96.0 / 98.0).abs() < 1e-12);
        assert!(p.stuck_run().is_some_and(|r| r > 500), "{:?}", p.stuck_run());
    }

    #[test]
    fn heavy_ties_merge_quantile_edges() {
        let mut values: Vec<f32> = vec![1.0; 700];
        values.extend((0..300).map(|i| 2.0 + i as f32));
        let p = FeatureProfile::build("x", &values, 10);
        assert!(p.edges.windows(2).all(|w| w[0] < w[1]));
        assert!((p.proportions[0] - 0.7).abs() < 1e-12, "{:?}", p.proportions);
    }
}
