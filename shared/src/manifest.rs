//! The bundle manifest: what a model is, what it eats and emits, and how to recognise it.
//! The manifest's exact bytes are what release keys sign.

use crate::drift::DriftProfile;
use crate::ids::{ModelName, Release};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    pub model: ModelName,
    /// Monotonic per model name.
    pub release: Release,
    /// Human label, e.g. "1.0.0-cnn".
    pub version: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// After this instant no device accepts the bundle.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub onnx: OnnxDigest,
    pub input: InputSpec,
    pub output: OutputSpec,
    /// The kind of machine the model is for (e.g. "turbofan"); assets declare theirs.
    pub asset_type: String,
    /// Device classes (e.g. "aarch64") the model may run on; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_classes: Vec<String>,
    pub golden: Golden,
    /// The training-data reference drift is measured against; its features are the ones the
    /// agent monitors (a superset of the model's inputs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftProfile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxDigest {
    /// Lower-case hex SHA-256 of the ONNX bytes.
    pub sha256: String,
    pub length: u64,
}

/// The model input: a `[batch, window, features]` float32 tensor in raw sensor units
/// (any normalisation is inside the graph).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Name of the ONNX graph input.
    pub tensor: String,
    /// Consecutive readings per window.
    pub window: usize,
    /// Feature order along the last axis.
    pub features: Vec<Feature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    pub name: String,
    pub unit: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// Remaining useful life; low is bad.
    RemainingUsefulLife,
    /// Anomaly score; high is bad.
    AnomalyScore,
}

/// The model output: `[batch, 1]`; element 0 is the value alerts watch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub tensor: String,
    pub kind: OutputKind,
    pub units: String,
    pub alerts: AlertThresholds,
}

/// Where the watched value raises a warning and an alarm. For remaining useful life a level
/// is entered when the value falls to or below the threshold; for an anomaly score when it rises
/// to or above it. A level clears only once the value is `hysteresis` beyond its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertThresholds {
    pub warning: f32,
    pub alarm: f32,
    pub hysteresis: f32,
}

/// Known input/output pairs; every loader reproduces them before it serves a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    /// Largest accepted absolute difference per output element.
    pub tolerance: f32,
    pub cases: Vec<GoldenCase>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenCase {
    /// `window × features` values, row-major.
    pub input: Vec<f32>,
    pub output: Vec<f32>,
}

/// A manifest that is well-formed JSON but inconsistent in itself.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest format {0} is not supported (this build reads format {MANIFEST_FORMAT})")]
    Format(u32),
    #[error("manifest input has no features or a zero window")]
    EmptyInput,
    #[error("golden case {case} has {found} input values, the input spec needs {expected}")]
    GoldenInputSize { case: usize, found: usize, expected: usize },
    #[error("manifest has no golden cases; a model must prove itself before it serves")]
    NoGolden,
    #[error("onnx sha256 {0:?} is not 64 lower-case hex digits")]
    Digest(String),
    #[error("drift profile does not cover model input {0:?}")]
    DriftMissingInput(String),
    #[error("drift profile of {feature:?} is inconsistent: {problem}")]
    DriftProfile { feature: String, problem: &'static str },
}

impl Manifest {
    /// Values per window (`window × features`).
    pub fn input_len(&self) -> usize {
        self.input.window * self.input.features.len()
    }

    pub fn feature_names(&self) -> impl Iterator<Item = &str> {
        self.input.features.iter().map(|f| f.name.as_str())
    }

    /// Checks what serde cannot: internal consistency.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format(self.format));
        }
        if self.input.window == 0 || self.input.features.is_empty() {
            return Err(ManifestError::EmptyInput);
        }
        if self.golden.cases.is_empty() {
            return Err(ManifestError::NoGolden);
        }
        for (case, golden) in self.golden.cases.iter().enumerate() {
            if golden.input.len() != self.input_len() {
                return Err(ManifestError::GoldenInputSize {
                    case,
                    found: golden.input.len(),
                    expected: self.input_len(),
                });
            }
        }
        if let Some(profile) = &self.drift {
            for name in self.feature_names() {
                if profile.feature(name).is_none() {
                    return Err(ManifestError::DriftMissingInput(name.to_owned()));
                }
            }
            for f in profile.features.iter().chain(&profile.output) {
                let problem = if f.proportions.len() != f.edges.len() + 1 {
                    Some("needs one more proportion than edges")
                } else if !f.edges.windows(2).all(|w| w[0] < w[1])
                    || !f.edges.iter().all(|e| e.is_finite())
                {
                    Some("edges are not finite and strictly ascending")
                } else if !f.proportions.iter().all(|p| p.is_finite() && *p >= 0.0) {
                    Some("proportions are not finite shares")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(ManifestError::DriftProfile { feature: f.name.clone(), problem });
                }
            }
        }
        let digest = &self.onnx.sha256;
        if digest.len() != 64 || !digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ManifestError::Digest(digest.clone()));
        }
        Ok(())
    }
}
