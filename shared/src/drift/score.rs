//! Drift scores computed from binned counts against reference proportions. The same functions
//! score one asset's interval on the device and the merged counts of a fleet on the server, so
//! a fleet score is recomputed from summed histograms, never averaged.

use serde::{Deserialize, Serialize};

/// Reference and observed shares below this are raised to it before PSI takes logarithms, so an
/// empty bin costs a large but finite amount.
pub const PSI_EPSILON: f64 = 1e-4;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Population stability index, Σ (q − p) · ln(q / p).
    pub psi: f64,
    /// Jensen–Shannon distance, base 2: 0 for identical, 1 for disjoint distributions.
    pub js: f64,
    /// Kolmogorov–Smirnov statistic on the binned CDFs: the largest gap between them.
    pub ks: f64,
}

/// Scores `counts` (observed, per bin) against `reference` proportions. `None` when nothing
/// was counted or the bin counts differ.
pub fn scores(reference: &[f64], counts: &[u64]) -> Option<Scores> {
    let n: u64 = counts.iter().sum();
    if n == 0 || reference.len() != counts.len() {
        return None;
    }
    let q: Vec<f64> = counts.iter().map(|&c| c as f64 / n as f64).collect();
    let mut psi = 0.0;
    let mut js = 0.0;
    let (mut cdf_p, mut cdf_q, mut ks) = (0.0f64, 0.0f64, 0.0f64);
    for (&p, &q) in reference.iter().zip(&q) {
        let (ps, qs) = (p.max(PSI_EPSILON), q.max(PSI_EPSILON));
        psi += (qs - ps) * (qs / ps).ln();
        let m = (p + q) / 2.0;
        if p > 0.0 {
            js += 0.5 * p * (p / m).log2();
        }
        if q > 0.0 {
            js += 0.5 * q * (q / m).log2();
        }
        cdf_p += p;
        cdf_q += q;
        ks = ks.max((cdf_p - cdf_q).abs());
    }
    Some(Scores { psi, js: js.clamp(0.0, 1.0).sqrt(), ks: ks.min(1.0) })
}

/// How far the observed mean moved from the reference mean, in reference scales
/// (see [`super::FeatureProfile::scale`]).
pub fn mean_shift(reference_mean: f64, scale: f64, sum: f64, n: u64) -> Option<f64> {
    if n == 0 || scale <= 0.0 {
        return None;
    }
    Some((sum / n as f64 - reference_mean) / scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_distributions_score_zero() {
        let s = scores(&[0.25, 0.25, 0.5], &[25, 25, 50]).unwrap();
        assert!(s.psi.abs() < 1e-12 && s.js.abs() < 1e-6 && s.ks.abs() < 1e-12, "{s:?}");
    }

    #[test]
    fn disjoint_distributions_score_high_and_finite() {
        let s = scores(&[0.0, 1.0, 0.0], &[0, 0, 40]).unwrap();
        assert!(s.psi > 10.0 && s.psi.is_finite());
        assert!((s.js - 1.0).abs() < 1e-12);
        assert!((s.ks - 1.0).abs() < 1e-12);
    }

    #[test]
    fn known_psi_value() {
        // q = (0.4, 0.6) against p = (0.5, 0.5): 0.1·ln(1.2) − 0.1·ln(0.8).
        let s = scores(&[0.5, 0.5], &[40, 60]).unwrap();
        let expected = 0.1 * (1.2f64).ln() - 0.1 * (0.8f64).ln();
        assert!((s.psi - expected).abs() < 1e-12);
        assert!((s.ks - 0.1).abs() < 1e-12);
    }

    #[test]
    fn nothing_counted_has_no_score() {
        assert_eq!(scores(&[0.5, 0.5], &[0, 0]), None);
        assert_eq!(scores(&[0.5, 0.5], &[1, 1, 1]), None);
        assert_eq!(mean_shift(1.0, 0.0, 5.0, 5), None);
        assert_eq!(mean_shift(1.0, 2.0, 10.0, 2), Some(2.0));
    }
}
