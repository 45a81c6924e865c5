//! Model-health gates: how a new release must behave on live data before it serves (shadow),
//! while it serves (probation), and before a rollout moves to its next wave. The device
//! measures ([`HealthMeter`]) and judges; the server judges the same [`Health`] with the same
//! function, so a gate means one thing everywhere.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gates {
    /// Predictions needed before a phase may pass (a phase ends early only by failing).
    pub min_predictions: u64,
    /// Inference failures / attempts.
    pub max_error_rate: f64,
    /// NaN or infinite outputs tolerated.
    pub max_nonfinite: u64,
    /// Latency of the new model over the current one's, measured on the same windows in
    /// shadow: p99 once [`P99_MIN_SAMPLES`] windows ran, the median before.
    pub max_latency_ratio: f64,
    /// Two outputs agree when they differ by at most this (output units).
    pub agreement_tolerance: f32,
    /// Share of shadow predictions that must agree with the current model.
    pub min_agreement: f64,
    /// |mean(new) − mean(current)| in shadow, over the current model's standard deviation
    /// floored at `agreement_tolerance` (a near-constant output must not turn every small
    /// offset into a shift).
    pub max_output_shift: f64,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            min_predictions: 20,
            max_error_rate: 0.01,
            max_nonfinite: 0,
            max_latency_ratio: 3.0,
            agreement_tolerance: 10.0,
            min_agreement: 0.9,
            max_output_shift: 0.5,
        }
    }
}

/// What a device measured about a new release. Comparisons with the current model exist only
/// for the shadow period, when both run on the same windows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub predictions: u64,
    pub errors: u64,
    pub nonfinite: u64,
    pub p99_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us_current: Option<u64>,
    /// Medians, for the latency gate when there are fewer than [`P99_MIN_SAMPLES`] samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us_current: Option<u64>,
    /// Windows both models ran on (shadow).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compared: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs_diff: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_shift: Option<f64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Below this many windows run by both models, a p99 is one unlucky sample; the latency gate
/// compares medians instead.
pub const P99_MIN_SAMPLES: u64 = 100;

/// One gate a release failed, with the numbers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GateFailure {
    #[error("inference error rate {rate:.3} above {max}")]
    ErrorRate { rate: f64, max: f64 },
    #[error("{count} NaN/infinite outputs (at most {max} allowed)")]
    NonFinite { count: u64, max: u64 },
    #[error(
        "{quantile} latency {us} µs is {ratio:.1}× the current model's {current_us} µs on the same windows (at most {max}×)"
    )]
    Latency { quantile: &'static str, us: u64, current_us: u64, ratio: f64, max: f64 },
    #[error(
        "agrees with the current model on {share:.3} of windows (within {tolerance}), {min} required"
    )]
    Agreement { share: f64, tolerance: f32, min: f64 },
    #[error("output distribution shifted by {shift:.2} σ of the current model's (at most {max})")]
    OutputShift { shift: f64, max: f64 },
}

/// The gates `health` fails (empty: it passes).
pub fn judge(health: &Health, gates: &Gates) -> Vec<GateFailure> {
    let mut failures = Vec::new();
    let attempts = health.predictions + health.errors;
    if attempts > 0 {
        let rate = health.errors as f64 / attempts as f64;
        if rate > gates.max_error_rate {
            failures.push(GateFailure::ErrorRate { rate, max: gates.max_error_rate });
        }
    }
    if health.nonfinite > gates.max_nonfinite {
        failures.push(GateFailure::NonFinite { count: health.nonfinite, max: gates.max_nonfinite });
    }
    let (quantile, new, current) = if health.compared >= P99_MIN_SAMPLES {
        ("p99", health.p99_us, health.p99_us_current)
    } else {
        ("median", health.p50_us, health.p50_us_current)
    };
    if let (Some(us), Some(current_us)) = (new, current) {
        let ratio = us as f64 / current_us.max(1) as f64;
        if ratio > gates.max_latency_ratio {
            failures.push(GateFailure::Latency {
                quantile,
                us,
                current_us,
                ratio,
                max: gates.max_latency_ratio,
            });
        }
    }
    if let Some(share) = health.agreement
        && share < gates.min_agreement
    {
        failures.push(GateFailure::Agreement {
            share,
            tolerance: gates.agreement_tolerance,
            min: gates.min_agreement,
        });
    }
    if let Some(shift) = health.output_shift
        && shift.abs() > gates.max_output_shift
    {
        failures.push(GateFailure::OutputShift { shift, max: gates.max_output_shift });
    }
    failures
}

/// Running mean and variance (Welford).
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    n: u64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn add(&mut self, x: f64) {
        self.n += 1;
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
    }

    fn std(&self) -> f64 {
        if self.n < 2 { 0.0 } else { (self.m2 / (self.n - 1) as f64).sqrt() }
    }
}

/// Latency samples kept for the p99 (the newest `LATENCY_SAMPLES`).
pub const LATENCY_SAMPLES: usize = 4096;

fn quantile(samples: &[u64], q: f64) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

/// Accumulates a candidate's behaviour; `compare` adds the current model's output on the same
/// window (shadow period).
#[derive(Debug, Clone, Default)]
pub struct HealthMeter {
    predictions: u64,
    errors: u64,
    nonfinite: u64,
    latency_us: Vec<u64>,
    current_latency_us: Vec<u64>,
    compared: u64,
    agreed: u64,
    max_abs_diff: f32,
    tolerance: f32,
    new: Moments,
    current: Moments,
}

fn push_capped(samples: &mut Vec<u64>, us: u64) {
    if samples.len() == LATENCY_SAMPLES {
        samples.remove(0);
    }
    samples.push(us);
}

impl HealthMeter {
    /// One window through the candidate: its first output (or the failure) and its latency.
    pub fn observe(&mut self, output: Result<f32, ()>, latency_us: u64) -> Option<f32> {
        push_capped(&mut self.latency_us, latency_us);
        match output {
            Ok(v) if v.is_finite() => {
                self.predictions += 1;
                Some(v)
            }
            Ok(_) => {
                self.predictions += 1;
                self.nonfinite += 1;
                None
            }
            Err(()) => {
                self.errors += 1;
                None
            }
        }
    }

    /// The current model's output and latency on the window the candidate just saw.
    pub fn compare(
        &mut self,
        candidate: Option<f32>,
        current: f32,
        latency_us: u64,
        tolerance: f32,
    ) {
        push_capped(&mut self.current_latency_us, latency_us);
        let Some(new) = candidate else { return };
        if !current.is_finite() {
            return;
        }
        let diff = (new - current).abs();
        self.tolerance = tolerance;
        self.compared += 1;
        self.agreed += u64::from(diff <= tolerance);
        self.max_abs_diff = self.max_abs_diff.max(diff);
        self.new.add(f64::from(new));
        self.current.add(f64::from(current));
    }

    /// Predictions plus failures seen so far.
    pub fn attempts(&self) -> u64 {
        self.predictions + self.errors
    }

    pub fn health(&self) -> Health {
        let compared = self.compared > 0;
        let shift = compared.then(|| {
            let scale = self.current.std().max(f64::from(self.tolerance)).max(1e-6);
            (self.new.mean - self.current.mean) / scale
        });
        Health {
            predictions: self.predictions,
            errors: self.errors,
            nonfinite: self.nonfinite,
            p99_us: quantile(&self.latency_us, 0.99),
            p99_us_current: quantile(&self.current_latency_us, 0.99),
            p50_us: quantile(&self.latency_us, 0.5),
            p50_us_current: quantile(&self.current_latency_us, 0.5),
            compared: self.compared,
            agreement: compared.then(|| self.agreed as f64 / self.compared as f64),
            max_abs_diff: compared.then_some(self.max_abs_diff),
            output_shift: shift,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_candidate_passes_and_each_bad_behaviour_fails_its_own_gate() {
        let gates = Gates::default();
        let run = |offset: f32, slow: u64, nan_every: u64| {
            let mut m = HealthMeter::default();
            for i in 0..100u64 {
                let current = 50.0 + (i % 20) as f32;
                let out =
                    if nan_every > 0 && i % nan_every == 0 { f32::NAN } else { current + offset };
                let seen = m.observe(Ok(out), 12 * slow);
                m.compare(seen, current, 12, gates.agreement_tolerance);
            }
            judge(&m.health(), &gates)
        };
        assert_eq!(run(0.5, 1, 0), vec![]);
        assert!(matches!(
            run(40.0, 1, 0).as_slice(),
            [GateFailure::Agreement { .. }, GateFailure::OutputShift { .. }]
        ));
        assert!(
            matches!(run(0.0, 10, 0).as_slice(), [GateFailure::Latency { ratio, .. }] if (*ratio - 10.0).abs() < 1e-9)
        );
        assert!(matches!(run(0.0, 1, 10).as_slice(), [GateFailure::NonFinite { count: 10, .. }]));
        let mut failing = HealthMeter::default();
        for _ in 0..10 {
            failing.observe(Err(()), 5);
        }
        assert!(matches!(
            judge(&failing.health(), &gates).as_slice(),
            [GateFailure::ErrorRate { .. }]
        ));
    }
}
