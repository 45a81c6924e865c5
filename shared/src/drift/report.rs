//! The drift report a device sends once per interval per asset, and the merge of many reports
//! into fleet-level counts. Reports carry binned counts and sums, not only scores, so the server
//! can add histograms up and recompute scores over any grouping.

use super::profile::FeatureProfile;
use super::score::{self, Scores};
use crate::ids::{AssetId, ModelName, Release};
use serde::{Deserialize, Serialize};

/// A feature's verdict for one interval, ordered from good to bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Fewer samples than the guard: no verdict.
    Insufficient,
    Ok,
    Warn,
    Drift,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Insufficient => "insufficient",
            Severity::Ok => "ok",
            Severity::Warn => "warn",
            Severity::Drift => "drift",
        }
    }
}

/// Data-quality findings for a feature in one interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    /// Readings without this feature.
    Missing,
    /// NaN or infinite values.
    NonFinite,
    /// Values well outside the training range.
    OutOfRange,
    /// The same value repeated far longer than the training data makes plausible.
    Stuck,
    /// No usable value for the whole interval, or only zeros where training never saw zero.
    Dead,
}

impl Quality {
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Missing => "missing",
            Quality::NonFinite => "non_finite",
            Quality::OutOfRange => "out_of_range",
            Quality::Stuck => "stuck",
            Quality::Dead => "dead",
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One asset's drift evidence for one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftReport {
    pub asset: AssetId,
    pub model: ModelName,
    pub release: Release,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Interval bounds, milliseconds since the Unix epoch.
    pub from_ms: i64,
    pub to_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_cycle: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cycle: Option<u64>,
    /// Readings seen in the interval.
    pub samples: u64,
    /// Jumps in the cycle number (readings lost between samples).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gaps: u64,
    pub features: Vec<FeatureDrift>,
    /// The model output's drift, when the profile has an output reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<FeatureDrift>,
}

impl DriftReport {
    /// The worst feature severity in the report.
    pub fn worst(&self) -> Severity {
        self.features.iter().map(|f| f.severity).max().unwrap_or(Severity::Insufficient)
    }

    /// Features at or above `at_least`.
    pub fn flagged(&self, at_least: Severity) -> impl Iterator<Item = &FeatureDrift> {
        self.features.iter().filter(move |f| f.severity >= at_least)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureDrift {
    pub name: String,
    pub severity: Severity,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<Quality>,
    /// Finite values counted.
    pub n: u64,
    /// Finite values per reference bin.
    pub counts: Vec<u64>,
    /// Sum of the finite values (with `n`, the mean; sums add up across devices).
    pub sum: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub missing: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub non_finite: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub out_of_range: u64,
    /// Longest run of one repeated value in the interval (including a run carried in).
    pub longest_run: u64,
    /// Mean shift in reference scales.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psi: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub js: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ks: Option<f64>,
}

/// Reports of one feature added together: the fleet (or site, or bucket) view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Merged {
    pub reports: u64,
    pub n: u64,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub missing: u64,
    pub non_finite: u64,
    pub out_of_range: u64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("feature {feature:?}: a report has {found} bins, earlier ones have {expected}")]
pub struct MergeError {
    pub feature: String,
    pub found: usize,
    pub expected: usize,
}

/// Fleet-level scores recomputed from merged counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MergedScores {
    pub psi: f64,
    pub js: f64,
    pub ks: f64,
    pub shift: Option<f64>,
}

impl Merged {
    /// Adds one report's counts. Reports of one model release share the profile's bins, so a
    /// different bin count means the report belongs to another release.
    pub fn add(&mut self, f: &FeatureDrift) -> Result<(), MergeError> {
        if self.reports == 0 && self.counts.is_empty() {
            self.counts = vec![0; f.counts.len()];
        }
        if f.counts.len() != self.counts.len() {
            return Err(MergeError {
                feature: f.name.clone(),
                found: f.counts.len(),
                expected: self.counts.len(),
            });
        }
        // Saturating: a sum of stored counts never wraps (or panics) whatever a report held.
        for (total, c) in self.counts.iter_mut().zip(&f.counts) {
            *total = total.saturating_add(*c);
        }
        self.reports += 1;
        self.n = self.n.saturating_add(f.n);
        self.sum += f.sum;
        self.missing = self.missing.saturating_add(f.missing);
        self.non_finite = self.non_finite.saturating_add(f.non_finite);
        self.out_of_range = self.out_of_range.saturating_add(f.out_of_range);
        Ok(())
    }

    /// Scores against the feature's reference; `None` if nothing was counted.
    pub fn scores(&self, profile: &FeatureProfile) -> Option<MergedScores> {
        let Scores { psi, js, ks } = score::scores(&profile.proportions, &self.counts)?;
        let shift = score::mean_shift(profile.mean, profile.scale(), self.sum, self.n);
        Some(MergedScores { psi, js, ks, shift })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature(counts: Vec<u64>) -> FeatureDrift {
        FeatureDrift {
            name: "s2".into(),
            severity: Severity::Ok,
            flags: vec![],
            n: counts.iter().sum(),
            sum: counts.iter().sum::<u64>() as f64,
            counts,
            missing: 0,
            non_finite: 1,
            out_of_range: 0,
            longest_run: 1,
            shift: None,
            psi: None,
            js: None,
            ks: None,
        }
    }

    #[test]
    fn merging_adds_histograms_and_refuses_other_bin_counts() {
        let mut m = Merged::default();
        m.add(&feature(vec![1, 2, 3])).unwrap();
        m.add(&feature(vec![4, 0, 1])).unwrap();
        assert_eq!(m.counts, vec![5, 2, 4]);
        assert_eq!((m.n, m.reports, m.non_finite), (11, 2, 2));
        assert!(m.add(&feature(vec![1, 1])).is_err());
    }

    #[test]
    fn reports_serialize_compactly_without_empty_fields() {
        let json = serde_json::to_string(&feature(vec![1, 2])).unwrap();
        assert!(!json.contains("missing") && !json.contains("flags") && !json.contains("psi"));
        assert!(json.contains("\"non_finite\":1"));
    }
}
