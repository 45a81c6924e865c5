//! Pure checks of an update against the directive and what this device runs: before the
//! download (is the model here, is the release newer) and after verification (does the signed
//! manifest match the directive, the assets and this device).

use millwright_shared::Release;
use millwright_shared::directive::{Action, Directive};
use millwright_shared::manifest::Manifest;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("no asset on this gateway runs model {0}")]
    NotRunning(String),
    #[error(
        "release {release} of {model} is not newer than release {highest} already installed (rollback refused)"
    )]
    Rollback { model: String, release: u64, highest: u64 },
    #[error("bundle holds model {bundle}, the directive names {directive}")]
    ModelName { bundle: String, directive: String },
    #[error("bundle holds release {bundle}, the directive names release {directive}")]
    Release { bundle: u64, directive: u64 },
    #[error("bundle is for asset type {bundle:?}, the assets running this model are {assets:?}")]
    AssetType { bundle: String, assets: Vec<String> },
    #[error("bundle is for device classes {classes:?}, this gateway is {device:?}")]
    DeviceClass { classes: Vec<String>, device: String },
    #[error(
        "bundle's input ({bundle}) differs from the running model's ({running}); a model with other inputs needs another model name"
    )]
    InputSpec { bundle: String, running: String },
}

fn input_text(m: &Manifest) -> String {
    let names: Vec<&str> = m.feature_names().collect();
    format!("{} × [{}]", m.input.window, names.join(", "))
}

/// Before anything is downloaded: the model runs here and, unless this is a signed revert, the
/// release is newer than any installed (the serving one included).
pub fn precheck(
    directive: &Directive,
    running: Option<&Manifest>,
    highest_seen: Option<u64>,
) -> Result<(), Refusal> {
    let Some(running) = running else {
        return Err(Refusal::NotRunning(directive.model.to_string()));
    };
    newer(directive, directive.release, highest_seen.max(Some(running.release.0)))
}

fn newer(directive: &Directive, release: Release, highest: Option<u64>) -> Result<(), Refusal> {
    match highest {
        Some(highest) if directive.action == Action::Install && release.0 <= highest => {
            Err(Refusal::Rollback {
                model: directive.model.to_string(),
                release: release.0,
                highest,
            })
        }
        _ => Ok(()),
    }
}

/// After the bundle verified: its signed manifest matches the directive, is newer (unless a
/// revert), fits the assets and this device, and eats the same input as the running model so
/// the swap keeps every sliding window.
pub fn check(
    directive: &Directive,
    manifest: &Manifest,
    running: &Manifest,
    highest_seen: Option<u64>,
    asset_types: &[String],
    device_class: &str,
) -> Result<(), Refusal> {
    if manifest.model != directive.model {
        return Err(Refusal::ModelName {
            bundle: manifest.model.to_string(),
            directive: directive.model.to_string(),
        });
    }
    if manifest.release != directive.release {
        return Err(Refusal::Release {
            bundle: manifest.release.0,
            directive: directive.release.0,
        });
    }
    newer(directive, manifest.release, highest_seen.max(Some(running.release.0)))?;
    if asset_types.iter().any(|t| t != &manifest.asset_type) {
        return Err(Refusal::AssetType {
            bundle: manifest.asset_type.clone(),
            assets: asset_types.to_vec(),
        });
    }
    if !manifest.device_classes.is_empty()
        && !manifest.device_classes.iter().any(|c| c == device_class)
    {
        return Err(Refusal::DeviceClass {
            classes: manifest.device_classes.clone(),
            device: device_class.to_owned(),
        });
    }
    if manifest.input != running.input {
        return Err(Refusal::InputSpec {
            bundle: input_text(manifest),
            running: input_text(running),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use millwright_shared::directive::{Activation, BundleRef};
    use millwright_shared::gates::Gates;
    use millwright_shared::manifest::*;
    use millwright_shared::{DeviceId, ModelName};
    use time::macros::datetime;

    /// A manifest of model `m`, release `release` (shared by the update machine's tests).
    pub(crate) fn manifest(release: u64) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            model: ModelName::new("m").unwrap(),
            release: Release(release),
            version: "x".into(),
            created_at: datetime!(2026-01-01 0:00 UTC),
            expires_at: datetime!(2027-01-01 0:00 UTC),
            onnx: OnnxDigest { sha256: "0".repeat(64), length: 1 },
            input: InputSpec {
                tensor: "x".into(),
                window: 3,
                features: vec![Feature { name: "a".into(), unit: "-".into() }],
            },
            output: OutputSpec {
                tensor: "y".into(),
                kind: OutputKind::RemainingUsefulLife,
                units: "cycles".into(),
                alerts: AlertThresholds { warning: 50.0, alarm: 20.0, hysteresis: 5.0 },
            },
            asset_type: "turbofan".into(),
            device_classes: vec![],
            golden: Golden { tolerance: 1e-4, cases: vec![] },
            drift: None,
        }
    }

    /// A directive for model `m` (shared by the update machine's tests).
    pub(crate) fn directive(release: u64, action: Action) -> Directive {
        Directive {
            v: 1,
            device: DeviceId::new("gw").unwrap(),
            seq: 1,
            issued_at: datetime!(2026-06-01 0:00 UTC),
            expires_at: datetime!(2026-06-01 1:00 UTC),
            rollout: "r".into(),
            action,
            model: ModelName::new("m").unwrap(),
            release: Release(release),
            bundle: BundleRef { sha256: String::new(), size: 1, chunk_size: 1, chunks: vec![] },
            activation: Activation { shadow_secs: 0, probation_secs: 0, gates: Gates::default() },
        }
    }

    #[test]
    fn each_mismatch_is_refused_with_its_own_reason() {
        let running = manifest(2);
        let types = ["turbofan".to_owned()];
        let ok = |d: &Directive, m: &Manifest| check(d, m, &running, Some(2), &types, "x86_64");
        assert_eq!(ok(&directive(3, Action::Install), &manifest(3)), Ok(()));
        assert!(matches!(
            ok(&directive(3, Action::Install), &manifest(4)),
            Err(Refusal::Release { bundle: 4, directive: 3 })
        ));
        assert!(matches!(
            ok(&directive(1, Action::Install), &manifest(1)),
            Err(Refusal::Rollback { highest: 2, .. })
        ));
        assert_eq!(ok(&directive(1, Action::Revert), &manifest(1)), Ok(()));
        let pump = Manifest { asset_type: "pump".into(), ..manifest(3) };
        assert!(matches!(
            ok(&directive(3, Action::Install), &pump),
            Err(Refusal::AssetType { .. })
        ));
        let arm = Manifest { device_classes: vec!["armv7".into()], ..manifest(3) };
        assert!(matches!(
            ok(&directive(3, Action::Install), &arm),
            Err(Refusal::DeviceClass { .. })
        ));
        let mut wide = manifest(3);
        wide.input.window = 5;
        assert!(matches!(
            ok(&directive(3, Action::Install), &wide),
            Err(Refusal::InputSpec { .. })
        ));
        assert!(matches!(
            precheck(&directive(3, Action::Install), None, None),
            Err(Refusal::NotRunning(_))
        ));
        assert!(matches!(
            precheck(&directive(2, Action::Install), Some(&running), None),
            Err(Refusal::Rollback { highest: 2, .. })
        ));
    }
}
