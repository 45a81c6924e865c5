//! The per-asset drift monitor: streaming binned counts and data-quality tallies per feature,
//! closed into a [`DriftReport`] once per interval, with a severity per feature that rises at
//! once and falls only past a hysteresis margin.
//!
//! Severity is judged on one metric, [`Metric::Shift`] by default: how many reference standard
//! deviations the interval mean moved. PSI, JS and KS are always reported, but against a
//! whole-life training reference they score every healthy engine early in its life as "drifted"
//! (its readings sit in a few bins); the mean shift does not, while other operating conditions,
//! offsets and dead sensors move it by many scales. Choose another metric where the reference
//! matches what a single asset sees in an interval. Whatever the metric, a feature whose values
//! mostly lie outside the training range (with a 10 % margin) is at `drift`.

use super::profile::{DriftProfile, FeatureProfile};
use super::report::{DriftReport, FeatureDrift, Quality, Severity};
use super::score;
use crate::ids::{AssetId, ModelName, Release};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The score severities are judged on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// |interval mean − reference mean| / reference scale.
    Shift,
    Psi,
    Js,
    Ks,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftSettings {
    /// Finite values a feature needs in an interval before it gets a verdict.
    pub min_samples: u64,
    pub metric: Metric,
    /// The metric at or above which a feature is `warn`.
    pub warn: f64,
    /// The metric at or above which a feature is `drift`.
    pub drift: f64,
    /// A level is left only once the metric is this far below its threshold.
    pub hysteresis: f64,
    /// Share of values outside the training range that raises the `out_of_range` flag.
    pub out_of_range_share: f64,
    /// Share of values outside the training range that makes a feature `drift` whatever the
    /// metric says: the model is being fed what it never saw.
    pub out_of_range_drift: f64,
}

impl Default for DriftSettings {
    fn default() -> Self {
        DriftSettings::for_metric(Metric::Shift)
    }
}

impl DriftSettings {
    /// Conventional thresholds for each metric: 2 and 3 scales for the mean shift; the usual
    /// 0.1 and 0.25 for PSI; 0.1 and 0.2 for JS distance and KS.
    pub fn for_metric(metric: Metric) -> Self {
        let (warn, drift, hysteresis) = match metric {
            Metric::Shift => (2.0, 3.0, 0.5),
            Metric::Psi => (0.1, 0.25, 0.05),
            Metric::Js | Metric::Ks => (0.1, 0.2, 0.03),
        };
        DriftSettings {
            min_samples: 30,
            metric,
            warn,
            drift,
            hysteresis,
            out_of_range_share: 0.05,
            out_of_range_drift: 0.5,
        }
    }

    /// The value severities are judged on, from the scores of an interval or a merged group.
    pub fn judged(&self, scores: Option<score::Scores>, shift: Option<f64>) -> Option<f64> {
        match self.metric {
            Metric::Shift => shift.map(f64::abs),
            Metric::Psi => scores.map(|s| s.psi),
            Metric::Js => scores.map(|s| s.js),
            Metric::Ks => scores.map(|s| s.ks),
        }
    }

    /// The next severity from the previous one and this interval's metric value.
    pub fn next_severity(&self, previous: Severity, value: f64) -> Severity {
        let level = |warn: f64, drift: f64| {
            if value >= drift {
                Severity::Drift
            } else if value >= warn {
                Severity::Warn
            } else {
                Severity::Ok
            }
        };
        let raised = level(self.warn, self.drift);
        if raised >= previous {
            return raised;
        }
        level(self.warn - self.hysteresis, self.drift - self.hysteresis).min(previous)
    }
}

/// What the caller knows about the interval being closed.
#[derive(Debug, Clone)]
pub struct ReportMeta {
    pub asset: AssetId,
    pub model: ModelName,
    pub release: Release,
    pub site: Option<String>,
    pub from_ms: i64,
    pub to_ms: i64,
}

#[derive(Debug, Clone)]
struct Tally {
    counts: Vec<u64>,
    n: u64,
    sum: f64,
    zeros: u64,
    missing: u64,
    non_finite: u64,
    out_of_range: u64,
    longest_run: u64,
    /// Carried across intervals: a stuck sensor does not unstick at a report boundary.
    run: Option<(f64, u64)>,
    level: Severity,
}

impl Tally {
    fn new(profile: &FeatureProfile) -> Self {
        Tally {
            counts: vec![0; profile.bins()],
            n: 0,
            sum: 0.0,
            zeros: 0,
            missing: 0,
            non_finite: 0,
            out_of_range: 0,
            longest_run: 0,
            run: None,
            level: Severity::Ok,
        }
    }

    #[inline]
    fn observe(&mut self, profile: &FeatureProfile, value: Option<f32>) {
        let Some(v) = value else {
            self.missing += 1;
            self.run = None;
            return;
        };
        if !v.is_finite() {
            self.non_finite += 1;
            self.run = None;
            return;
        }
        let v = f64::from(v);
        self.counts[profile.bin(v)] += 1;
        self.n += 1;
        self.sum += v;
        if v == 0.0 {
            self.zeros += 1;
        }
        if !profile.in_range(v) {
            self.out_of_range += 1;
        }
        let run = match self.run {
            Some((last, len)) if last == v => len + 1,
            _ => 1,
        };
        self.run = Some((v, run));
        self.longest_run = self.longest_run.max(run);
    }

    /// Closes the interval: verdict, flags and the wire form; resets the counts.
    fn close(&mut self, profile: &FeatureProfile, settings: &DriftSettings) -> FeatureDrift {
        let scores = score::scores(&profile.proportions, &self.counts);
        let shift = score::mean_shift(profile.mean, profile.scale(), self.sum, self.n);
        let severity = match settings.judged(scores, shift) {
            Some(m) if self.n >= settings.min_samples => {
                self.level = settings.next_severity(self.level, m);
                if self.out_of_range as f64 >= settings.out_of_range_drift * self.n as f64 {
                    self.level = Severity::Drift;
                }
                self.level
            }
            _ => Severity::Insufficient,
        };
        let observed = self.n + self.missing + self.non_finite;
        let mut flags = Vec::new();
        if self.missing > 0 {
            flags.push(Quality::Missing);
        }
        if self.non_finite > 0 {
            flags.push(Quality::NonFinite);
        }
        if self.out_of_range > 0
            && self.out_of_range as f64 >= settings.out_of_range_share * self.n as f64
        {
            flags.push(Quality::OutOfRange);
        }
        let dead = observed >= settings.min_samples
            && (self.n == 0 || (self.zeros == self.n && !profile.in_range(0.0)));
        if dead {
            flags.push(Quality::Dead);
        } else if profile.stuck_run().is_some_and(|limit| self.longest_run >= limit) {
            flags.push(Quality::Stuck);
        }
        let report = FeatureDrift {
            name: profile.name.clone(),
            severity,
            flags,
            n: self.n,
            counts: std::mem::replace(&mut self.counts, vec![0; profile.bins()]),
            sum: self.sum,
            missing: self.missing,
            non_finite: self.non_finite,
            out_of_range: self.out_of_range,
            longest_run: self.longest_run,
            shift: shift.map(round),
            psi: scores.map(|s| round(s.psi)),
            js: scores.map(|s| round(s.js)),
            ks: scores.map(|s| round(s.ks)),
        };
        self.n = 0;
        self.sum = 0.0;
        self.zeros = 0;
        self.missing = 0;
        self.non_finite = 0;
        self.out_of_range = 0;
        self.longest_run = self.run.map_or(0, |(_, len)| len);
        report
    }
}

/// Scores carry six significant decimals on the wire; the counts stay exact.
fn round(v: f64) -> f64 {
    if v.is_finite() { (v * 1e6).round() / 1e6 } else { v }
}

/// Streaming drift state for one asset.
#[derive(Debug, Clone)]
pub struct DriftMonitor {
    profile: Arc<DriftProfile>,
    settings: DriftSettings,
    inputs: Vec<Tally>,
    output: Option<Tally>,
    samples: u64,
    gaps: u64,
    first_cycle: Option<u64>,
    last_cycle: Option<u64>,
}

impl DriftMonitor {
    pub fn new(profile: Arc<DriftProfile>, settings: DriftSettings) -> Self {
        DriftMonitor {
            inputs: profile.features.iter().map(Tally::new).collect(),
            output: profile.output.as_ref().map(Tally::new),
            profile,
            settings,
            samples: 0,
            gaps: 0,
            first_cycle: None,
            last_cycle: None,
        }
    }

    /// Feature names, in the order [`Self::observe`] takes values.
    pub fn features(&self) -> impl Iterator<Item = &str> {
        self.profile.features.iter().map(|f| f.name.as_str())
    }

    /// Readings since the last report.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// One reading: a value per profile feature, `None` where the reading lacked it.
    pub fn observe(&mut self, cycle: u64, values: &[Option<f32>]) {
        if self.last_cycle.is_some_and(|last| cycle > last + 1) {
            self.gaps += 1;
        }
        self.first_cycle.get_or_insert(cycle);
        self.last_cycle = Some(cycle);
        self.samples += 1;
        for ((tally, profile), value) in
            self.inputs.iter_mut().zip(&self.profile.features).zip(values)
        {
            tally.observe(profile, *value);
        }
        for (tally, _) in self.inputs.iter_mut().zip(&self.profile.features).skip(values.len()) {
            tally.missing += 1;
            tally.run = None;
        }
    }

    /// One model output.
    pub fn observe_output(&mut self, value: f32) {
        if let (Some(tally), Some(profile)) = (&mut self.output, &self.profile.output) {
            tally.observe(profile, Some(value));
        }
    }

    /// Closes the interval into a report and starts the next one.
    pub fn report(&mut self, meta: ReportMeta) -> DriftReport {
        let settings = self.settings;
        let features = self
            .inputs
            .iter_mut()
            .zip(&self.profile.features)
            .map(|(tally, profile)| tally.close(profile, &settings))
            .collect();
        let output = match (&mut self.output, &self.profile.output) {
            (Some(tally), Some(profile)) => Some(tally.close(profile, &settings)),
            _ => None,
        };
        let report = DriftReport {
            asset: meta.asset,
            model: meta.model,
            release: meta.release,
            site: meta.site,
            from_ms: meta.from_ms,
            to_ms: meta.to_ms,
            first_cycle: self.first_cycle,
            last_cycle: self.last_cycle,
            samples: self.samples,
            gaps: self.gaps,
            features,
            output,
        };
        self.samples = 0;
        self.gaps = 0;
        self.first_cycle = None;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Arc<DriftProfile> {
        let ramp: Vec<f32> = (0..1000).map(|i| 100.0 + (i % 100) as f32 * 0.1).collect();
        Arc::new(DriftProfile {
            source: "test".into(),
            features: vec![
                FeatureProfile::build("ramp", &ramp, 10),
                FeatureProfile::build("const", &[5.0; 1000], 10),
            ],
            output: None,
        })
    }

    fn meta() -> ReportMeta {
        ReportMeta {
            asset: AssetId::new("a").unwrap(),
            model: ModelName::new("m").unwrap(),
            release: Release(1),
            site: None,
            from_ms: 0,
            to_ms: 1,
        }
    }

    fn run(m: &mut DriftMonitor, start: u64, n: u64, f: impl Fn(u64) -> [Option<f32>; 2]) {
        for i in 0..n {
            m.observe(start + i, &f(i));
        }
    }

    fn ramp(i: u64) -> f32 {
        100.0 + ((i * 37) % 100) as f32 * 0.1
    }

    #[test]
    fn in_distribution_data_is_ok_and_constant_features_score_finite() {
        let mut m = DriftMonitor::new(profile(), DriftSettings::default());
        run(&mut m, 1, 100, |i| [Some(ramp(i)), Some(5.0)]);
        let r = m.report(meta());
        assert_eq!(r.samples, 100);
        for f in &r.features {
            assert_eq!(f.severity, Severity::Ok, "{f:?}");
            assert!(f.flags.is_empty(), "{f:?}");
            for s in [f.shift, f.psi, f.js, f.ks] {
                assert!(s.is_some_and(f64::is_finite), "{f:?}");
            }
        }
        assert_eq!(r.features[1].psi, Some(0.0));
    }

    #[test]
    fn too_few_samples_get_no_verdict() {
        let mut m = DriftMonitor::new(profile(), DriftSettings::default());
        run(&mut m, 1, 10, |_| [Some(1000.0), Some(5.0)]);
        assert_eq!(m.report(meta()).features[0].severity, Severity::Insufficient);
    }

    #[test]
    fn a_shifted_feature_drifts_and_recovers_only_past_the_hysteresis() {
        // Judge on the shift alone (values this far off also leave the training range).
        let settings = DriftSettings { out_of_range_drift: f64::INFINITY, ..Default::default() };
        let mut m = DriftMonitor::new(profile(), settings);
        let std = m.profile.features[0].std as f32;
        let shifted = |k: f32| move |i| [Some(ramp(i) + k * std), Some(5.0)];
        run(&mut m, 1, 50, shifted(3.5));
        let r = m.report(meta());
        assert_eq!(r.features[0].severity, Severity::Drift);
        assert_eq!(r.features[1].severity, Severity::Ok);
        run(&mut m, 51, 50, shifted(2.7));
        assert_eq!(m.report(meta()).features[0].severity, Severity::Drift, "inside hysteresis");
        run(&mut m, 101, 50, shifted(2.2));
        assert_eq!(m.report(meta()).features[0].severity, Severity::Warn);
        run(&mut m, 151, 50, shifted(0.0));
        assert_eq!(m.report(meta()).features[0].severity, Severity::Ok);
    }

    #[test]
    fn mostly_out_of_range_values_drift_whatever_the_metric() {
        let settings = DriftSettings { warn: 1e9, drift: 1e9, ..Default::default() };
        let mut m = DriftMonitor::new(profile(), settings);
        run(&mut m, 1, 40, |i| [Some(if i % 3 == 0 { ramp(i) } else { 150.0 }), Some(5.0)]);
        let r = m.report(meta());
        assert_eq!(r.features[0].severity, Severity::Drift);
        assert_eq!(r.features[0].flags, vec![Quality::OutOfRange]);
        assert_eq!(r.features[1].severity, Severity::Ok);
    }

    #[test]
    fn quality_flags_name_the_fault() {
        let mut m = DriftMonitor::new(profile(), DriftSettings::default());
        // Stuck: one value repeated; the constant feature goes missing, then NaN.
        run(&mut m, 1, 40, |i| [Some(100.5), if i < 5 { None } else { Some(f32::NAN) }]);
        let r = m.report(meta());
        assert_eq!(r.features[0].flags, vec![Quality::Stuck]);
        assert_eq!(r.features[1].flags, vec![Quality::Missing, Quality::NonFinite, Quality::Dead]);
        // Dead: zeros where training never saw zero (also far out of range).
        run(&mut m, 41, 40, |_| [Some(0.0), Some(5.0)]);
        let r = m.report(meta());
        assert_eq!(r.features[0].flags, vec![Quality::OutOfRange, Quality::Dead]);
        assert_eq!(r.features[0].severity, Severity::Drift);
        assert!(r.features[1].flags.is_empty());
    }

    #[test]
    fn cycle_jumps_count_as_gaps() {
        let mut m = DriftMonitor::new(profile(), DriftSettings::default());
        for cycle in [1, 2, 3, 7, 8, 20] {
            m.observe(cycle, &[Some(100.0), Some(5.0)]);
        }
        let r = m.report(meta());
        assert_eq!((r.gaps, r.first_cycle, r.last_cycle), (2, Some(1), Some(20)));
    }

    #[test]
    fn psi_metric_uses_its_own_thresholds() {
        let s = DriftSettings::for_metric(Metric::Psi);
        assert_eq!(s.next_severity(Severity::Ok, 0.3), Severity::Drift);
        assert_eq!(s.next_severity(Severity::Drift, 0.22), Severity::Drift);
        assert_eq!(s.next_severity(Severity::Drift, 0.12), Severity::Warn);
        assert_eq!(s.next_severity(Severity::Warn, 0.04), Severity::Ok);
    }
}
