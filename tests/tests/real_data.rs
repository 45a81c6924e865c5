//! Drift on the real reference model and the full NASA files (the folder
//! `MILLWRIGHT_FULL_DATA` names; `.ci/run` points it at the team's shared data): the committed profile is the one train_FD001 gives, the
//! in-distribution test set raises no drift, other operating conditions (FD002) drift at the
//! first interval with enough samples, and injected sensor faults are named by feature and kind.
//!
//! A test target of its own that `cargo test` does not run (`test = false`): the README's test
//! command must pass on a clone without the shared data. `.ci/run` runs it by name
//! (`cargo test -p millwright-tests --test real_data`), and it fails there if the data is missing.

#![allow(clippy::unwrap_used, reason = "test code: a panic with its message is the failure report")]

use anyhow::bail;
use millwright_shared::bundle::RawBundle;
use millwright_shared::drift::{DriftProfile, profile::Binning};
use millwright_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A file of the full NASA C-MAPSS data, or an error that says where it was looked for.
fn full_data(name: &str) -> anyhow::Result<PathBuf> {
    let Some(dir) = std::env::var_os("MILLWRIGHT_FULL_DATA") else {
        bail!(
            "set MILLWRIGHT_FULL_DATA to the folder of the full NASA C-MAPSS files (.ci/run does)"
        );
    };
    let path = PathBuf::from(dir).join(name);
    if !path.exists() {
        bail!("{} is missing (MILLWRIGHT_FULL_DATA)", path.display());
    }
    Ok(path)
}

fn profile() -> DriftProfile {
    let bytes = std::fs::read(repo_file(BUNDLE)).unwrap();
    let manifest = RawBundle::parse(&bytes).unwrap().manifest_unverified().unwrap();
    manifest.drift.expect("the reference bundle carries a drift profile")
}

fn features(report: &Value) -> &Vec<Value> {
    report["features"].as_array().unwrap()
}

fn feature<'a>(report: &'a Value, name: &str) -> &'a Value {
    features(report).iter().find(|f| f["name"] == name).unwrap()
}

fn flags(f: &Value) -> Vec<&str> {
    f["flags"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

fn guarded(f: &Value) -> bool {
    f["severity"] != "insufficient"
}

#[test]
fn the_committed_profile_is_the_one_train_fd001_gives() {
    // Rebuild from the full training file with the same code and compare bin by bin.
    let text = std::fs::read_to_string(full_data("train_FD001.txt").unwrap()).unwrap();
    let rows = millwright_agent::cmapss::parse(&text).unwrap();
    let p = profile();
    assert!(p.source.starts_with("train_FD001.txt: 20631 rows"), "{}", p.source);
    assert_eq!(p.features.len(), 24);
    for (i, f) in p.features.iter().enumerate() {
        let values: Vec<f32> = rows.iter().map(|r| r.values[i] as f32).collect();
        let rebuilt = millwright_shared::drift::FeatureProfile::build(&f.name, &values, 10);
        assert_eq!(&rebuilt, f, "feature {}", f.name);
    }
    let constant: Vec<&str> = p
        .features
        .iter()
        .filter(|f| f.binning == Binning::Constant)
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(constant, ["setting3", "s1", "s5", "s10", "s16", "s18", "s19"]);
}

#[test]
fn test_fd001_raises_no_drift_and_constant_sensors_score_finite() {
    let (reports, _) = replay_drift(&full_data("test_FD001.txt").unwrap(), &[]).unwrap();
    let p = profile();
    assert_eq!(reports.len(), 308, "100 units, a report every 50 readings and one per unit end");
    let mut rates: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in &reports {
        for f in features(r) {
            let name = f["name"].as_str().unwrap().to_owned();
            assert_ne!(f["severity"], "drift", "{} {name}: {f}", r["asset"]);
            let entry = rates.entry(name.clone()).or_default();
            if guarded(f) {
                entry.0 += 1;
                for score in ["shift", "psi", "js", "ks"] {
                    assert!(f[score].as_f64().is_some_and(f64::is_finite), "{name} {score}: {f}");
                }
            }
            if f["severity"] == "warn" {
                entry.1 += 1;
            }
            let constant = p.feature(&name).unwrap().binning == Binning::Constant;
            if constant {
                assert_ne!(f["severity"], "warn", "constant {name} raised a false alarm");
                assert!(flags(f).is_empty(), "constant {name} flagged: {f}");
                assert!(!guarded(f) || f["psi"] == 0.0, "{f}");
            }
            assert!(!flags(f).contains(&"stuck"), "false stuck flag: {} {f}", r["asset"]);
        }
    }
    let (intervals, alarms): (u64, u64) =
        rates.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    println!(
        "test_FD001 false-alarm rate per feature-interval (warn or drift / guarded intervals):"
    );
    for (name, (n, warn)) in &rates {
        println!("  {name:9} {warn:3}/{n} = {:.4}", *warn as f64 / *n as f64);
    }
    println!(
        "  all       {alarms}/{intervals} = {:.5}; drift: 0",
        alarms as f64 / intervals as f64
    );
    assert!(intervals > 6000);
}

#[test]
fn train_fd002_drifts_in_the_first_interval_with_enough_samples() {
    let path = full_data("train_FD002.txt").unwrap();
    let (reports, _) = replay_drift(&path, &[]).unwrap();
    let p = profile();
    // Ground truth from the raw data: a feature is affected in an interval when most of its
    // values lie outside the training range (with the profile's 10 % margin).
    let rows = millwright_agent::cmapss::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut to_detection = Vec::new();
    let mut affected_total = 0;
    for unit in millwright_agent::cmapss::units(&rows) {
        let asset = format!("unit-{unit}");
        let mine: Vec<&Value> = reports.iter().filter(|r| r["asset"] == asset.as_str()).collect();
        let first = mine.iter().position(|r| guarded(&features(r)[0])).unwrap();
        let samples: u64 = mine[..=first].iter().map(|r| r["samples"].as_u64().unwrap()).sum();
        let (from, to) = (
            mine[first]["first_cycle"].as_u64().unwrap(),
            mine[first]["last_cycle"].as_u64().unwrap(),
        );
        let window: Vec<_> =
            rows.iter().filter(|r| r.unit == unit && r.cycle >= from && r.cycle <= to).collect();
        for (i, fp) in p.features.iter().enumerate() {
            let outside =
                window.iter().filter(|r| !fp.in_range(f64::from(r.values[i] as f32))).count();
            if outside * 2 > window.len() {
                affected_total += 1;
                let f = feature(mine[first], &fp.name);
                assert_eq!(f["severity"], "drift", "{asset} {}: {f}", fp.name);
            }
        }
        to_detection.push(samples);
    }
    let units = to_detection.len() as f64;
    println!(
        "train_FD002: {} units; samples to detection: mean {:.1}, max {} (the first interval \
         meeting the 30-sample guard); {:.1} of 24 features affected per unit, all at drift",
        to_detection.len(),
        to_detection.iter().sum::<u64>() as f64 / units,
        to_detection.iter().max().unwrap(),
        affected_total as f64 / units
    );
    assert!(affected_total as f64 / units > 20.0);
}

/// Rewrites one column of a C-MAPSS text (`col` counts from 0 over the 26 columns).
fn inject(
    text: &str,
    col: usize,
    f: impl Fn(u64, &str, &mut BTreeMap<u32, String>, u32) -> String,
) -> String {
    let mut state = BTreeMap::new();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            let unit: u32 = fields[0].parse().unwrap();
            let cycle: u64 = fields[1].parse().unwrap();
            fields[col] = f(cycle, &fields[col], &mut state, unit);
            fields.join(" ") + "\n"
        })
        .collect()
}

/// Column of sensor `sN` in the text.
fn sensor(n: usize) -> usize {
    4 + n
}

fn replay_text(text: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("faulty.txt");
    std::fs::write(&path, text).unwrap();
    replay_drift(&path, &[]).unwrap().0
}

fn others_flagged(reports: &[Value], except: &str, flag: &str) -> usize {
    reports
        .iter()
        .flat_map(features)
        .filter(|f| f["name"] != except && flags(f).contains(&flag))
        .count()
}

#[test]
fn injected_sensor_faults_are_named_by_feature_and_kind() {
    let text = std::fs::read_to_string(full_data("test_FD001.txt").unwrap()).unwrap();
    let p = profile();

    // Stuck: s7 holds its cycle-10 value from then on.
    let stuck = replay_text(&inject(&text, sensor(7), |cycle, v, held, unit| {
        if cycle == 10 {
            held.insert(unit, v.to_owned());
        }
        held.get(&unit).filter(|_| cycle >= 10).cloned().unwrap_or_else(|| v.to_owned())
    }));
    let long_units = stuck
        .iter()
        .filter(|r| r["last_cycle"].as_u64().unwrap() >= 60)
        .map(|r| r["asset"].as_str().unwrap().to_owned())
        .collect::<std::collections::BTreeSet<_>>();
    for asset in &long_units {
        assert!(
            stuck.iter().any(|r| r["asset"] == asset.as_str() && flags(feature(r, "s7")).contains(&"stuck")),
            "{asset}: s7 stuck not flagged"
        );
    }
    assert_eq!(others_flagged(&stuck, "s7", "stuck"), 0);

    // Offset: s11 + 3 training standard deviations.
    let sd = p.feature("s11").unwrap().std;
    let offset = replay_text(&inject(&text, sensor(11), |_, v, _, _| {
        format!("{:.2}", v.parse::<f64>().unwrap() + 3.0 * sd)
    }));
    let s11: Vec<&Value> =
        offset.iter().map(|r| feature(r, "s11")).filter(|f| guarded(f)).collect();
    let flagged = s11.iter().filter(|f| f["severity"] != "ok").count();
    let drift = s11.iter().filter(|f| f["severity"] == "drift").count();
    println!(
        "+3σ offset on s11: {flagged}/{} guarded intervals at warn or drift ({drift} at drift)",
        s11.len()
    );
    assert!(flagged * 4 >= s11.len() * 3, "offset detected in only {flagged}/{}", s11.len());
    let units = offset
        .iter()
        .map(|r| r["asset"].as_str().unwrap())
        .collect::<std::collections::BTreeSet<_>>();
    let detected = units
        .iter()
        .filter(|u| {
            offset.iter().any(|r| {
                r["asset"] == **u
                    && feature(r, "s11")["severity"] != "ok"
                    && guarded(feature(r, "s11"))
            })
        })
        .count();
    println!("  units where the offset was flagged at least once: {detected}/{}", units.len());
    for r in &offset {
        for f in features(r).iter().filter(|f| f["name"] != "s11") {
            assert_ne!(f["severity"], "drift", "offset misattributed to {}", f["name"]);
        }
    }

    // NaN bursts: s12 is NaN for 3 cycles in every 25.
    let nan = replay_text(&inject(&text, sensor(12), |cycle, v, _, _| {
        if cycle % 25 < 3 { "NaN".into() } else { v.to_owned() }
    }));
    for r in &nan {
        let (from, to) = (r["first_cycle"].as_u64().unwrap(), r["last_cycle"].as_u64().unwrap());
        let expected = (from..=to).filter(|c| c % 25 < 3).count() as u64;
        let f = feature(r, "s12");
        assert_eq!(f["non_finite"].as_u64().unwrap_or(0), expected, "{f}");
        assert_eq!(flags(f).contains(&"non_finite"), expected > 0, "{f}");
    }
    assert_eq!(others_flagged(&nan, "s12", "non_finite"), 0);

    // Dead: s3 reads 0 from cycle 10 on.
    let dead =
        replay_text(&inject(
            &text,
            sensor(3),
            |cycle, v, _, _| {
                if cycle >= 10 { "0".into() } else { v.to_owned() }
            },
        ));
    let mut dead_intervals = 0;
    for r in &dead {
        let f = feature(r, "s3");
        if r["first_cycle"].as_u64().unwrap() >= 10 && r["samples"].as_u64().unwrap() >= 30 {
            dead_intervals += 1;
            assert!(flags(f).contains(&"dead"), "{f}");
            assert_eq!(f["severity"], "drift", "{f}");
        }
    }
    assert!(dead_intervals > 100);
    assert_eq!(others_flagged(&dead, "s3", "dead"), 0);
    println!(
        "faults: stuck s7 flagged on all {} long units; NaN bursts counted exactly; dead s3 in {dead_intervals} intervals",
        long_units.len()
    );
}
