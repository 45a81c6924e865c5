//! Fleet drift, pure: group stored per-interval feature reports, add their histograms up and
//! score the sums against the release's reference profile (never an average of device scores);
//! list what is drifting now; and decide when drift has persisted long enough to recommend
//! retraining.

use millwright_shared::drift::score::Scores;
use millwright_shared::drift::{
    DriftProfile, DriftSettings, FeatureDrift, Merged, Metric, Severity,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One feature of one stored report.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureRow {
    pub model: String,
    pub release: u64,
    pub device: String,
    pub site: String,
    pub asset: String,
    pub seq: u64,
    pub from_ms: i64,
    pub to_ms: i64,
    pub feature: FeatureDrift,
}

/// Reference profiles by (model, release), from the bundles the server knows.
#[derive(Debug, Clone, Default)]
pub struct Profiles(pub HashMap<(String, u64), DriftProfile>);

impl Profiles {
    pub fn get(&self, model: &str, release: u64) -> Option<&DriftProfile> {
        self.0.get(&(model.to_owned(), release))
    }
}

/// The most values one feature of one report may have counted (a year of one reading a
/// second is 3e7): beyond it the counts are not plausible, and their sums could overflow.
pub const MAX_REPORT_VALUES: u64 = 1 << 32;

/// A drift report, or a feature of one, the server would not take as the device sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriftProblem {
    #[error("no reference profile for {model} release {release}: its severities are not judged")]
    UnknownRelease { model: String, release: u64 },
    #[error("feature {0:?} is not in the release's profile")]
    UnknownFeature(String),
    #[error("feature {feature:?} has {found} bins, its profile {expected}")]
    Bins { feature: String, found: usize, expected: usize },
    #[error("feature {0:?} counts are not plausible (their sum differs from n, or is too large)")]
    Counts(String),
    #[error("feature {feature:?} was reported at {claimed:?}, its counts say {judged:?}")]
    Overruled { feature: String, claimed: Severity, judged: Severity },
}

impl DriftProblem {
    pub fn reason(&self) -> &'static str {
        match self {
            DriftProblem::UnknownRelease { .. } => "drift_unknown_release",
            DriftProblem::UnknownFeature(_)
            | DriftProblem::Bins { .. }
            | DriftProblem::Counts(_) => "drift_invalid",
            DriftProblem::Overruled { .. } => "drift_severity_overruled",
        }
    }
}

/// Checks a device's drift report against its release's profile and judges it the server's
/// way: features the profile does not know, or whose counts do not fit it, are dropped (the rest
/// of the report is kept, so a bad feature cannot hold the device's drift stream hostage), and
/// every kept feature's severity is recomputed from its counts against the reference (the
/// device's own verdict is not believed). Without a profile the features are kept but judged
/// `insufficient`, so they can never raise a retraining event. Returns what was wrong.
pub fn judge(
    report: &mut millwright_shared::drift::DriftReport,
    profile: Option<&DriftProfile>,
    settings: &DriftSettings,
) -> Vec<DriftProblem> {
    let Some(profile) = profile else {
        for f in report.features.iter_mut().chain(report.output.as_mut()) {
            f.severity = Severity::Insufficient;
        }
        return vec![DriftProblem::UnknownRelease {
            model: report.model.to_string(),
            release: report.release.0,
        }];
    };
    let mut problems = Vec::new();
    let mut check =
        |f: &mut FeatureDrift, reference: Option<&millwright_shared::drift::FeatureProfile>| {
            let Some(reference) = reference else {
                problems.push(DriftProblem::UnknownFeature(wire_name(&f.name)));
                return false;
            };
            if f.counts.len() != reference.bins() {
                problems.push(DriftProblem::Bins {
                    feature: wire_name(&f.name),
                    found: f.counts.len(),
                    expected: reference.bins(),
                });
                return false;
            }
            let total = f.counts.iter().try_fold(0u64, |acc, c| acc.checked_add(*c));
            if total != Some(f.n) || f.n > MAX_REPORT_VALUES || !f.sum.is_finite() {
                problems.push(DriftProblem::Counts(wire_name(&f.name)));
                return false;
            }
            let merged = Merged {
                reports: 1,
                n: f.n,
                counts: f.counts.clone(),
                sum: f.sum,
                ..Default::default()
            };
            let scores = merged.scores(reference);
            let value = settings.judged(
                scores.map(|s| Scores { psi: s.psi, js: s.js, ks: s.ks }),
                scores.and_then(|s| s.shift),
            );
            // The device's own level is kept only where its counts allow it: within the
            // hysteresis band of the metric (a level is left only past it). Anything else is
            // overruled.
            let judged = match value {
                Some(v) if f.n >= settings.min_samples => {
                    let out_of_range = f.out_of_range.min(f.n) as f64;
                    if out_of_range >= settings.out_of_range_drift * f.n as f64 {
                        Severity::Drift
                    } else {
                        settings.next_severity(f.severity, v)
                    }
                }
                _ => Severity::Insufficient,
            };
            if judged < f.severity {
                problems.push(DriftProblem::Overruled {
                    feature: wire_name(&f.name),
                    claimed: f.severity,
                    judged,
                });
            }
            f.severity = judged;
            true
        };
    report.features.retain_mut(|f| {
        let reference = profile.feature(&f.name);
        check(f, reference)
    });
    if let Some(output) = report.output.as_mut() {
        let reference = profile.output.as_ref().filter(|o| o.name == output.name);
        if !check(output, reference) {
            report.output = None;
        }
    }
    problems
}

/// A feature name as it may appear in a log line.
fn wire_name(name: &str) -> String {
    millwright_shared::wire::clean_text(name, 64)
}

/// What fleet summaries are grouped by, besides model, release and feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// The whole fleet.
    Feature,
    Site,
    Device,
    /// Time buckets of the interval start.
    Bucket,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub model: String,
    pub release: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket_ms: Option<i64>,
    pub feature: String,
    pub reports: u64,
    pub devices: usize,
    /// Values counted across the group.
    pub n: u64,
    pub counts: Vec<u64>,
    /// Scores of the merged histogram; absent when the reference profile is unknown.
    pub psi: Option<f64>,
    pub js: Option<f64>,
    pub ks: Option<f64>,
    pub shift: Option<f64>,
    /// The merged metric's verdict (no hysteresis: a fresh look at the whole group).
    pub severity: Severity,
    /// What the verdict is judged on: the metric, its value for the merged histogram, and the
    /// thresholds for `warn` and `drift`.
    pub metric: Metric,
    pub score: Option<f64>,
    pub warn_at: f64,
    pub drift_at: f64,
    /// Device-interval verdicts in the group at `warn` and at `drift`.
    pub warn_reports: u64,
    pub drift_reports: u64,
    pub missing: u64,
    pub non_finite: u64,
    pub out_of_range: u64,
    /// Data-quality flags raised in the group's reports, by kind.
    pub flags: BTreeMap<String, u64>,
}

type Key = (String, u64, Option<String>, Option<String>, Option<i64>, String);

/// One group being merged: the histogram, its devices, device verdicts at warn and drift, and
/// data-quality flags by kind.
#[derive(Default)]
struct Group<'a> {
    merged: Merged,
    devices: BTreeSet<&'a str>,
    verdicts: [u64; 2],
    flags: BTreeMap<String, u64>,
}

/// Merges `rows` per group and scores each group against its reference.
pub fn summarize(
    rows: &[FeatureRow],
    by: GroupBy,
    bucket_ms: i64,
    profiles: &Profiles,
    settings: &DriftSettings,
) -> Vec<Summary> {
    let mut groups: BTreeMap<Key, Group> = BTreeMap::new();
    for r in rows {
        let key: Key = (
            r.model.clone(),
            r.release,
            matches!(by, GroupBy::Site).then(|| r.site.clone()),
            matches!(by, GroupBy::Device).then(|| r.device.clone()),
            matches!(by, GroupBy::Bucket)
                .then(|| r.from_ms - r.from_ms.rem_euclid(bucket_ms.max(1))),
            r.feature.name.clone(),
        );
        let group = groups.entry(key).or_default();
        if group.merged.add(&r.feature).is_err() {
            // A report whose bins disagree with its release's others is skipped, not merged.
            continue;
        }
        group.devices.insert(&r.device);
        match r.feature.severity {
            Severity::Warn => group.verdicts[0] += 1,
            Severity::Drift => group.verdicts[1] += 1,
            Severity::Ok | Severity::Insufficient => {}
        }
        for flag in &r.feature.flags {
            *group.flags.entry(flag.as_str().to_owned()).or_default() += 1;
        }
    }
    groups
        .into_iter()
        .map(|((model, release, site, device, bucket_ms, feature), group)| {
            let Group { merged: m, devices, verdicts: v, flags } = group;
            let scores = profiles
                .get(&model, release)
                .and_then(|p| {
                    p.feature(&feature).or(p.output.as_ref().filter(|o| o.name == feature))
                })
                .and_then(|p| m.scores(p));
            let binned = scores.map(|s| Scores { psi: s.psi, js: s.js, ks: s.ks });
            let score = settings.judged(binned, scores.and_then(|s| s.shift));
            let severity = match score {
                Some(value) if m.n >= settings.min_samples => {
                    settings.next_severity(Severity::Ok, value)
                }
                _ => Severity::Insufficient,
            };
            Summary {
                model,
                release,
                site,
                device,
                bucket_ms,
                feature,
                reports: m.reports,
                devices: devices.len(),
                n: m.n,
                counts: m.counts,
                psi: scores.map(|s| s.psi),
                js: scores.map(|s| s.js),
                ks: scores.map(|s| s.ks),
                shift: scores.and_then(|s| s.shift),
                severity,
                metric: settings.metric,
                score,
                warn_at: settings.warn,
                drift_at: settings.drift,
                warn_reports: v[0],
                drift_reports: v[1],
                missing: m.missing,
                non_finite: m.non_finite,
                out_of_range: m.out_of_range,
                flags,
            }
        })
        .collect()
}

/// A feature of an asset whose latest report is not clean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drifting {
    pub model: String,
    pub release: u64,
    pub site: String,
    pub device: String,
    pub asset: String,
    pub feature: String,
    pub severity: Severity,
    pub flags: Vec<String>,
    pub shift: Option<f64>,
    pub psi: Option<f64>,
    pub to_ms: i64,
}

/// From the latest report of each (device, asset): features at `warn` or worse or with
/// data-quality flags.
pub fn drifting(latest: &[FeatureRow]) -> Vec<Drifting> {
    latest
        .iter()
        .filter(|r| r.feature.severity >= Severity::Warn || !r.feature.flags.is_empty())
        .map(|r| Drifting {
            model: r.model.clone(),
            release: r.release,
            site: r.site.clone(),
            device: r.device.clone(),
            asset: r.asset.clone(),
            feature: r.feature.name.clone(),
            severity: r.feature.severity,
            flags: r.feature.flags.iter().map(|q| q.as_str().to_owned()).collect(),
            shift: r.feature.shift,
            psi: r.feature.psi,
            to_ms: r.to_ms,
        })
        .collect()
}

/// When drift counts as persistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Consecutive latest reports of an asset at `drift` for one feature.
    pub persist_reports: usize,
    /// Distinct devices that must show it.
    pub min_devices: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { persist_reports: 3, min_devices: 1 }
    }
}

/// The evidence for one feature's persistent drift.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub feature: String,
    /// Start of the earliest interval of the persistent runs.
    pub since_ms: i64,
    pub devices: Vec<String>,
    pub sites: Vec<String>,
}

/// One feature of one asset of one release: how many of its newest reports in a row say
/// `drift`, and since when. Kept per stored report ([`Run::next`]), so the retraining check
/// reads the runs that are long enough instead of the drift history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub device: String,
    pub asset: String,
    pub feature: String,
    pub site: String,
    /// Consecutive newest reports at `drift` (0 when the newest is not).
    pub run: u64,
    /// Start of the first report of the run.
    pub since_ms: i64,
    /// The newest report counted (a report older than it changes nothing).
    pub last_seq: u64,
}

impl Run {
    /// The run after `report`'s verdict on its feature, from the run before it (if any).
    pub fn next(previous: Option<&Run>, report: &FeatureRow) -> Option<Run> {
        if previous.is_some_and(|p| report.seq <= p.last_seq) {
            return None;
        }
        let drift = report.feature.severity == Severity::Drift;
        let (run, since_ms) = match previous {
            Some(p) if drift && p.run > 0 => (p.run + 1, p.since_ms),
            _ if drift => (1, report.from_ms),
            _ => (0, report.from_ms),
        };
        Some(Run {
            device: report.device.clone(),
            asset: report.asset.clone(),
            feature: report.feature.name.clone(),
            site: report.site.clone(),
            run,
            since_ms,
            last_seq: report.seq,
        })
    }
}

/// Features of one release whose drift persisted per `policy`: at `drift` in at least
/// `persist_reports` newest reports in a row of an asset, on at least `min_devices` devices.
pub fn persistent(runs: &[Run], policy: &Policy) -> Vec<Evidence> {
    let long_enough =
        |r: &&Run| policy.persist_reports > 0 && r.run >= policy.persist_reports as u64;
    let mut by_feature: BTreeMap<&str, (i64, BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for r in runs.iter().filter(long_enough) {
        let entry =
            by_feature.entry(&r.feature).or_insert((r.since_ms, BTreeSet::new(), BTreeSet::new()));
        entry.0 = entry.0.min(r.since_ms);
        entry.1.insert(r.device.clone());
        entry.2.insert(r.site.clone());
    }
    by_feature
        .into_iter()
        .filter(|(_, (_, devices, _))| devices.len() >= policy.min_devices.max(1))
        .map(|(feature, (since_ms, devices, sites))| Evidence {
            feature: feature.to_owned(),
            since_ms,
            devices: devices.into_iter().collect(),
            sites: sites.into_iter().collect(),
        })
        .collect()
}

/// A "retraining recommended" event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrainingEvent {
    pub id: i64,
    pub model: String,
    pub release: u64,
    pub raised_ms: i64,
    pub reason: String,
    pub features: Vec<Evidence>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(device: &str, seq: u64, severity: Severity, counts: Vec<u64>) -> FeatureRow {
        FeatureRow {
            model: "m".into(),
            release: 1,
            device: device.into(),
            site: format!("site-{}", &device[..1]),
            asset: "a".into(),
            seq,
            from_ms: seq as i64 * 1000,
            to_ms: seq as i64 * 1000 + 999,
            feature: FeatureDrift {
                name: "s2".into(),
                severity,
                flags: vec![],
                n: counts.iter().sum(),
                sum: 0.0,
                counts,
                missing: 0,
                non_finite: 0,
                out_of_range: 0,
                longest_run: 1,
                shift: None,
                psi: None,
                js: None,
                ks: None,
            },
        }
    }

    #[test]
    fn persistence_needs_consecutive_latest_drift_reports_on_enough_devices() {
        use Severity::*;
        let rows = vec![
            row("x1", 1, Ok, vec![1]),
            row("x1", 2, Drift, vec![1]),
            row("x1", 3, Drift, vec![1]),
            row("x1", 4, Drift, vec![1]),
            row("y1", 7, Drift, vec![1]),
            row("y1", 8, Warn, vec![1]),
        ];
        let runs = runs_after(&rows);
        let found = persistent(&runs, &Policy { persist_reports: 3, min_devices: 1 });
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].devices, vec!["x1".to_owned()]);
        assert_eq!(found[0].since_ms, 2000, "the run starts with report 2");
        assert!(persistent(&runs, &Policy { persist_reports: 3, min_devices: 2 }).is_empty());
        assert!(persistent(&runs, &Policy { persist_reports: 4, min_devices: 1 }).is_empty());
        // A report at ok ends the run; an old report arriving late changes nothing.
        let mut more = rows.clone();
        more.push(row("x1", 5, Ok, vec![1]));
        more.push(row("x1", 3, Drift, vec![1]));
        let runs = runs_after(&more);
        assert!(persistent(&runs, &Policy { persist_reports: 1, min_devices: 1 }).is_empty());
        assert_eq!(
            runs.iter().map(|r| (r.device.as_str(), r.run)).collect::<Vec<_>>(),
            [("x1", 0), ("y1", 0)]
        );
        // y1 drifts again: a new run from its report 9; x1 then again from 6.
        more.extend([row("y1", 9, Drift, vec![1]), row("x1", 6, Drift, vec![1])]);
        let found = persistent(&runs_after(&more), &Policy { persist_reports: 1, min_devices: 2 });
        assert_eq!((found[0].devices.len(), found[0].since_ms), (2, 6000));
    }

    /// The runs after `rows` in arrival order, one per (device, asset, feature).
    fn runs_after(rows: &[FeatureRow]) -> Vec<Run> {
        let mut runs: BTreeMap<(String, String, String), Run> = BTreeMap::new();
        for r in rows {
            let key = (r.device.clone(), r.asset.clone(), r.feature.name.clone());
            if let Some(next) = Run::next(runs.get(&key), r) {
                runs.insert(key, next);
            }
        }
        runs.into_values().collect()
    }

    #[test]
    fn the_server_judges_reports_from_their_counts_and_drops_what_does_not_fit() {
        use millwright_shared::drift::{DriftReport, FeatureProfile};
        use millwright_shared::{AssetId, ModelName, Release};
        let values: Vec<f32> = (0..1000).map(|i| (i % 100) as f32).collect();
        let profile = DriftProfile {
            source: "test".into(),
            features: vec![FeatureProfile::build("s2", &values, 10)],
            output: None,
        };
        let reference = &profile.features[0];
        let feature = |name: &str, severity, counts: Vec<u64>, sum: f64| FeatureDrift {
            name: name.into(),
            n: counts.iter().fold(0u64, |a, c| a.wrapping_add(*c)),
            sum,
            counts,
            ..row("x", 1, severity, vec![]).feature
        };
        let spread = vec![10u64; reference.bins()];
        let in_range_sum = 100.0 * 49.5;
        let mut report = DriftReport {
            asset: AssetId::new("a").unwrap(),
            model: ModelName::new("m").unwrap(),
            release: Release(1),
            site: None,
            from_ms: 0,
            to_ms: 1,
            first_cycle: None,
            last_cycle: None,
            samples: 100,
            gaps: 0,
            features: vec![
                feature("s2", Severity::Drift, spread.clone(), in_range_sum),
                feature("fake_x", Severity::Drift, spread.clone(), in_range_sum),
                feature("s2", Severity::Ok, vec![100], in_range_sum),
                feature("s2", Severity::Ok, vec![u64::MAX, 1, 0, 0, 0, 0, 0, 0, 0, 0], 1.0),
            ],
            output: None,
        };
        let problems = judge(&mut report, Some(&profile), &DriftSettings::default());
        let reasons: Vec<&str> = problems.iter().map(DriftProblem::reason).collect();
        assert_eq!(
            reasons,
            ["drift_severity_overruled", "drift_invalid", "drift_invalid", "drift_invalid"]
        );
        assert!(matches!(
            problems[0],
            DriftProblem::Overruled { claimed: Severity::Drift, judged: Severity::Ok, .. }
        ));
        assert!(matches!(problems[1], DriftProblem::UnknownFeature(_)));
        assert!(matches!(problems[2], DriftProblem::Bins { found: 1, .. }));
        assert!(matches!(problems[3], DriftProblem::Counts(_)));
        assert_eq!(report.features.len(), 1);
        assert_eq!(report.features[0].severity, Severity::Ok, "the claimed drift is not believed");
        let mut unknown = report.clone();
        let problems = judge(&mut unknown, None, &DriftSettings::default());
        assert!(matches!(problems[..], [DriftProblem::UnknownRelease { .. }]));
        assert_eq!(unknown.features[0].severity, Severity::Insufficient);
    }

    #[test]
    fn summaries_add_histograms_per_group() {
        let rows = vec![
            row("x1", 1, Severity::Ok, vec![1, 2]),
            row("y1", 1, Severity::Drift, vec![3, 4]),
            row("x2", 1, Severity::Ok, vec![1, 1, 1]),
        ];
        let s = summarize(&rows, GroupBy::Feature, 1, &Profiles::default(), &Default::default());
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].counts.clone(), s[0].devices, s[0].drift_reports), (vec![4, 6], 2, 1));
        assert_eq!(s[0].psi, None, "no reference profile, no score");
        let s = summarize(&rows, GroupBy::Site, 1, &Profiles::default(), &Default::default());
        assert_eq!(s.len(), 2);
    }
}
