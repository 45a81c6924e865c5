//! Drift benchmark: the cost of one feature value through the on-device monitor, and the size
//! of a drift report per device-hour, on the reference model's 24-feature profile. Prints
//! numbers; asserts nothing about speed.
//!
//! Run: `cargo bench -p millwright-shared --bench drift`

use millwright_shared::AssetId;
use millwright_shared::bundle::RawBundle;
use millwright_shared::drift::monitor::ReportMeta;
use millwright_shared::drift::{DriftMonitor, DriftSettings};
use millwright_shared::wire::{self, Record, RecordBody};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/rul-cnn-fd001/rul-cnn-fd001.mwb");
    let manifest = RawBundle::parse(&std::fs::read(path)?)?.manifest_unverified()?;
    let profile = Arc::new(manifest.drift.ok_or("the reference bundle has no drift profile")?);
    let features = profile.features.len();

    // Readings spread over each feature's training range (a fixed LCG: no dependency, repeatable).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let rows: Vec<Vec<Option<f32>>> = (0..4096)
        .map(|_| {
            profile
                .features
                .iter()
                .map(|f| Some((f.min + (f.max - f.min) * uniform()) as f32))
                .collect()
        })
        .collect();

    let meta = || ReportMeta {
        asset: AssetId::new("engine-1").unwrap_or_else(|_| unreachable!()),
        model: manifest.model.clone(),
        release: manifest.release,
        site: Some("plant-north".into()),
        from_ms: 1_800_000_000_000,
        to_ms: 1_800_003_600_000,
    };
    let mut monitor = DriftMonitor::new(profile.clone(), DriftSettings::default());
    let readings = 2_000_000usize;
    let started = Instant::now();
    for i in 0..readings {
        monitor.observe(i as u64, black_box(&rows[i % rows.len()]));
        monitor.observe_output(black_box((i % 150) as f32));
    }
    let elapsed = started.elapsed();
    let per_value = elapsed.as_secs_f64() * 1e9 / (readings * features) as f64;
    println!(
        "drift update: {readings} readings x {features} features in {:.3} s = {per_value:.1} ns per feature value (target <= 1000 ns)",
        elapsed.as_secs_f64()
    );

    // One hour of 1 Hz readings, then the report as it travels (a record of an uplink batch).
    let mut monitor = DriftMonitor::new(profile, DriftSettings::default());
    for i in 0..3600 {
        monitor.observe(i as u64, &rows[i % rows.len()]);
        monitor.observe_output((i % 150) as f32);
    }
    let record = Record {
        seq: 1,
        at_ms: 1_800_003_600_000,
        body: RecordBody::Drift(Box::new(monitor.report(meta()))),
    };
    let bytes = wire::encode(&record).len();
    println!(
        "drift report: {bytes} bytes per asset-hour at {features} features + output \
         (default interval 1 h; target <= 16384 bytes per device-hour)"
    );
    Ok(())
}
