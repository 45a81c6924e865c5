//! One asset's pipeline: readings → sliding window → model → prediction and alert records.
//! The model is passed in as a function so this stays pure.

use crate::alert::next_level;
use crate::window::Window;
use millwright_shared::manifest::{AlertThresholds, Manifest, OutputKind};
use millwright_shared::wire::{Alert, Level, Prediction, RecordBody};
use millwright_shared::{AssetId, ModelName, Release};

/// The features an asset reads: the drift profile's (a superset of the model's inputs) when the
/// bundle has one, else the model's inputs; and where each model input sits among them.
pub fn monitored_features(manifest: &Manifest) -> (Vec<String>, Vec<usize>) {
    let names: Vec<String> = match &manifest.drift {
        Some(profile) => profile.features.iter().map(|f| f.name.clone()).collect(),
        None => manifest.feature_names().map(str::to_owned).collect(),
    };
    let inputs = manifest
        .feature_names()
        .map(|input| names.iter().position(|n| n == input).unwrap_or_default())
        .collect();
    (names, inputs)
}

/// How far an asset has got, stored with the records it produced so a restart resumes exactly
/// there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub cycle: u64,
    pub level: Level,
}

/// What one reading led to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The window is not full yet.
    Filling,
    /// At or before the resume point: the reading only refills the window.
    Warmup,
    /// A prediction, perhaps with an alert; `cursor` must be stored with them.
    Produced { records: Vec<RecordBody>, cursor: Cursor },
    /// The model failed or returned a non-finite value; nothing is recorded for this cycle.
    InferenceFailed(String),
}

#[derive(Debug, Clone)]
pub struct AssetState {
    id: AssetId,
    model: ModelName,
    release: Release,
    kind: OutputKind,
    thresholds: AlertThresholds,
    window: Window,
    level: Level,
    last_cycle: Option<u64>,
    resume_cycle: Option<u64>,
}

impl AssetState {
    pub fn new(id: AssetId, manifest: &Manifest, resume: Option<Cursor>) -> Self {
        Self {
            id,
            model: manifest.model.clone(),
            release: manifest.release,
            kind: manifest.output.kind,
            thresholds: manifest.output.alerts,
            window: Window::new(manifest.input.window, manifest.input.features.len()),
            level: resume.map_or(Level::Ok, |c| c.level),
            last_cycle: resume.map(|c| c.cycle),
            resume_cycle: resume.map(|c| c.cycle),
        }
    }

    pub fn id(&self) -> &AssetId {
        &self.id
    }

    /// Serves another release of the model from the next window on. The window, level and
    /// cycle carry over (the caller checked the input spec is the same), so no prediction is
    /// skipped or repeated.
    pub fn adopt(&mut self, manifest: &Manifest) {
        self.model = manifest.model.clone();
        self.release = manifest.release;
        self.kind = manifest.output.kind;
        self.thresholds = manifest.output.alerts;
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// The cycle a reading without one gets.
    pub fn next_cycle(&self) -> u64 {
        self.last_cycle.map_or(1, |c| c + 1)
    }

    pub fn on_reading<E: std::fmt::Display>(
        &mut self,
        cycle: u64,
        row: Vec<f32>,
        predict: impl FnOnce(&[f32]) -> Result<Vec<f32>, E>,
    ) -> Outcome {
        let window = self.window.push(row);
        if self.resume_cycle.is_some_and(|resume| cycle <= resume) {
            return Outcome::Warmup;
        }
        self.resume_cycle = None;
        self.last_cycle = Some(cycle);
        let Some(window) = window else { return Outcome::Filling };
        let value = match predict(&window) {
            Ok(out) => match out.first() {
                Some(v) if v.is_finite() => *v,
                Some(v) => return Outcome::InferenceFailed(format!("model output is {v}")),
                None => return Outcome::InferenceFailed("model output is empty".into()),
            },
            Err(e) => return Outcome::InferenceFailed(e.to_string()),
        };
        let mut records = vec![RecordBody::Prediction(Prediction {
            asset: self.id.clone(),
            cycle,
            model: self.model.clone(),
            release: self.release,
            value,
        })];
        let level = next_level(self.level, value, self.kind, &self.thresholds);
        if level != self.level {
            records.push(RecordBody::Alert(Alert {
                asset: self.id.clone(),
                cycle,
                model: self.model.clone(),
                release: self.release,
                from: self.level,
                to: level,
                value,
            }));
            self.level = level;
        }
        Outcome::Produced { records, cursor: Cursor { cycle, level } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millwright_shared::manifest::*;
    use time::macros::datetime;

    fn manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            model: ModelName::new("m").unwrap(),
            release: Release(1),
            version: "1".into(),
            created_at: datetime!(2026-01-01 0:00 UTC),
            expires_at: datetime!(2030-01-01 0:00 UTC),
            onnx: OnnxDigest { sha256: String::new(), length: 0 },
            input: InputSpec {
                tensor: "x".into(),
                window: 2,
                features: vec![Feature { name: "a".into(), unit: "-".into() }],
            },
            output: OutputSpec {
                tensor: "y".into(),
                kind: OutputKind::RemainingUsefulLife,
                units: "cycles".into(),
                alerts: AlertThresholds { warning: 50.0, alarm: 20.0, hysteresis: 5.0 },
            },
            asset_type: "t".into(),
            device_classes: vec![],
            golden: Golden { tolerance: 1e-4, cases: vec![] },
            drift: None,
        }
    }

    /// A stand-in model: the mean of the window.
    fn mean(w: &[f32]) -> Result<Vec<f32>, String> {
        Ok(vec![w.iter().sum::<f32>() / w.len() as f32])
    }

    fn values(outcome: &Outcome) -> Vec<(u64, f32, usize)> {
        match outcome {
            Outcome::Produced { records, cursor } => match &records[0] {
                RecordBody::Prediction(p) => vec![(cursor.cycle, p.value, records.len())],
                RecordBody::Alert(_)
                | RecordBody::Drift(_)
                | RecordBody::Update(_)
                | RecordBody::Gap(_) => vec![],
            },
            _ => vec![],
        }
    }

    #[test]
    fn predicts_once_the_window_is_full_and_alerts_on_level_changes() {
        let mut a = AssetState::new(AssetId::new("u1").unwrap(), &manifest(), None);
        assert_eq!(a.on_reading(1, vec![100.0], mean), Outcome::Filling);
        assert_eq!(values(&a.on_reading(2, vec![80.0], mean)), vec![(2, 90.0, 1)]);
        assert_eq!(values(&a.on_reading(3, vec![10.0], mean)), vec![(3, 45.0, 2)]);
        assert_eq!(a.level(), Level::Warning);
    }

    #[test]
    fn resuming_refills_the_window_without_repeating_outputs() {
        let resume = Cursor { cycle: 3, level: Level::Warning };
        let mut a = AssetState::new(AssetId::new("u1").unwrap(), &manifest(), Some(resume));
        assert_eq!(a.on_reading(1, vec![100.0], mean), Outcome::Warmup);
        assert_eq!(a.on_reading(2, vec![80.0], mean), Outcome::Warmup);
        assert_eq!(a.on_reading(3, vec![10.0], mean), Outcome::Warmup);
        assert_eq!(values(&a.on_reading(4, vec![90.0], mean)), vec![(4, 50.0, 1)]);
        assert_eq!(a.next_cycle(), 5);
    }

    #[test]
    fn a_failing_or_non_finite_model_output_records_nothing() {
        let mut a = AssetState::new(AssetId::new("u1").unwrap(), &manifest(), None);
        a.on_reading(1, vec![1.0], mean);
        let nan = a.on_reading(2, vec![1.0], |_| Ok::<_, String>(vec![f32::NAN]));
        assert!(matches!(nan, Outcome::InferenceFailed(_)));
        let err = a.on_reading(3, vec![1.0], |_| Err::<Vec<f32>, _>("boom"));
        assert_eq!(err, Outcome::InferenceFailed("boom".into()));
    }
}
