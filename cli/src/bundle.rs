//! `keygen`, `bundle`, `sign`, `verify` and `inspect`.

use super::{EX_DATAERR, Failure};
use anyhow::Context as _;
use ed25519_dalek::SigningKey;
use millwright_agent::clock;
use millwright_agent::inference::Model;
use millwright_shared::bundle::{self, RawBundle};
use millwright_shared::keys::{KeyId, PublicKeyFile, SecretKeyFile, TrustedKeys};
use millwright_shared::manifest::{
    Golden, GoldenCase, InputSpec, MANIFEST_FORMAT, Manifest, OnnxDigest, OutputSpec,
};
use millwright_shared::{ModelName, Release};
use serde::Deserialize;
use std::path::Path;
use time::OffsetDateTime;

fn data_error(error: anyhow::Error) -> Failure {
    Failure { code: EX_DATAERR, error }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes atomically: a crash never leaves half a bundle or key behind.
pub(super) fn write(path: &Path, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

pub fn load_secret(path: &Path) -> anyhow::Result<(KeyId, SigningKey)> {
    SecretKeyFile::parse(&read_text(path)?)
        .with_context(|| format!("secret key {}", path.display()))
}

pub fn keygen(out_dir: &Path, name: &str) -> Result<(), Failure> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    std::fs::create_dir_all(out_dir)?;
    let secret = out_dir.join(format!("{name}.secret.json"));
    let public = out_dir.join(format!("{name}.pub.json"));
    if secret.exists() {
        return Err(
            anyhow::anyhow!("{} exists; refusing to overwrite a key", secret.display()).into()
        );
    }
    write(&secret, &serde_json::to_vec_pretty(&SecretKeyFile::new(&key))?, true)?;
    write(&public, &serde_json::to_vec_pretty(&PublicKeyFile::new(&key.verifying_key()))?, false)?;
    println!(
        "key {} -> {} (keep offline), {}",
        KeyId::of(&key.verifying_key()),
        secret.display(),
        public.display()
    );
    Ok(())
}

/// The model metadata a bundle is built from (TOML).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleMeta {
    pub model: ModelName,
    pub release: u64,
    pub version: String,
    pub asset_type: String,
    /// Days from now until devices stop accepting the bundle.
    pub valid_days: u32,
    pub golden_tolerance: f32,
    pub input: InputSpec,
    pub output: OutputSpec,
    /// Columns the drift profile covers (default: every C-MAPSS setting and sensor).
    pub drift_features: Option<Vec<String>>,
    /// Device classes the model may run on (default: any).
    #[serde(default)]
    pub device_classes: Vec<String>,
}

/// Golden pairs as written by the training pipeline (onnxruntime outputs).
#[derive(Debug, Deserialize)]
pub struct GoldenFile {
    pub cases: Vec<GoldenCase>,
}

/// Proves a bundle loads with the agent's own loader before anyone signs it: sign a copy with
/// a throwaway key, verify it and load it.
fn check_loads(raw: &RawBundle, now: OffsetDateTime) -> anyhow::Result<Model> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    let mut copy = raw.clone();
    copy.signatures.clear();
    copy.sign(&key);
    let trusted = TrustedKeys::new(vec![(KeyId::of(&key.verifying_key()), key.verifying_key())], 1);
    let verified = bundle::verify(&copy.to_bytes(), &trusted, now)?;
    Ok(Model::load(&verified)?)
}

/// Training data to build the drift reference profile from.
pub struct TrainingData<'a> {
    pub path: &'a Path,
    pub bins: usize,
}

pub fn build(
    onnx: &Path,
    meta: &Path,
    golden: &Path,
    out: &Path,
    sign_with: &[std::path::PathBuf],
    training: Option<TrainingData<'_>>,
) -> Result<(), Failure> {
    let meta: BundleMeta = toml::from_str(&read_text(meta)?)
        .map_err(|e| data_error(anyhow::anyhow!("{}: {e}", meta.display())))?;
    let golden: GoldenFile = serde_json::from_str(&read_text(golden)?)
        .map_err(|e| data_error(anyhow::anyhow!("{}: {e}", golden.display())))?;
    let now = clock::now();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        model: meta.model,
        release: Release(meta.release),
        version: meta.version,
        created_at: now,
        expires_at: now + time::Duration::days(i64::from(meta.valid_days)),
        onnx: OnnxDigest { sha256: String::new(), length: 0 },
        input: meta.input,
        output: meta.output,
        asset_type: meta.asset_type,
        device_classes: meta.device_classes,
        golden: Golden { tolerance: meta.golden_tolerance, cases: golden.cases },
        drift: None,
    };
    let onnx = read(onnx)?;
    let mut raw = RawBundle::unsigned(manifest.clone(), onnx.clone());
    let mut model = check_loads(&raw, now)
        .map_err(|e| data_error(e.context("the agent's loader refuses this model")))?;
    if let Some(training) = training {
        let features = meta.drift_features.unwrap_or_else(|| {
            millwright_agent::cmapss::COLUMNS[2..].iter().map(|c| c.to_string()).collect()
        });
        let text = read_text(training.path)?;
        let rows = millwright_agent::cmapss::parse(&text)
            .map_err(|e| data_error(anyhow::anyhow!("{}: {e}", training.path.display())))?;
        let name = training.path.file_name().map_or_else(
            || training.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let profile =
            millwright_agent::reference::build(&mut model, &rows, &features, training.bins, &name)
                .map_err(|e| data_error(e.context("cannot build the drift profile")))?;
        println!("drift profile: {} features, {}", profile.features.len(), profile.source);
        let mut manifest = manifest;
        manifest.drift = Some(profile);
        raw = RawBundle::unsigned(manifest, onnx);
        check_loads(&raw, now)
            .map_err(|e| data_error(e.context("the agent's loader refuses this model")))?;
    }
    for key in sign_with {
        raw.sign(&load_secret(key)?.1);
    }
    write(out, &raw.to_bytes(), false)?;
    println!(
        "bundle {} written ({} bytes, {} signature(s))",
        out.display(),
        raw.to_bytes().len(),
        raw.signatures.len()
    );
    Ok(())
}

pub fn sign(path: &Path, key: &Path, out: Option<&Path>) -> Result<(), Failure> {
    let mut raw = RawBundle::parse(&read(path)?).map_err(|e| data_error(e.into()))?;
    raw.manifest_unverified()
        .map_err(|e| data_error(e.into()))?
        .validate()
        .map_err(|e| data_error(e.into()))?;
    let (id, key) = load_secret(key)?;
    raw.sign(&key);
    let out = out.unwrap_or(path);
    write(out, &raw.to_bytes(), false)?;
    println!("signed {} with key {id}", out.display());
    Ok(())
}

pub fn verify(
    path: &Path,
    trusted: &[std::path::PathBuf],
    threshold: usize,
) -> Result<(), Failure> {
    let trusted = millwright_agent::config::load_trusted(trusted, threshold)?;
    let bytes = read(path)?;
    let verified = bundle::verify(&bytes, &trusted, clock::now()).map_err(|e| {
        data_error(anyhow::Error::new(e).context(format!("bundle {} rejected", path.display())))
    })?;
    let model = Model::load(&verified).map_err(|e| {
        data_error(anyhow::Error::new(e).context(format!("bundle {} rejected", path.display())))
    })?;
    let m = model.manifest();
    let signers: Vec<String> = verified.signed_by().iter().map(|k| k.0.clone()).collect();
    println!(
        "ok: {} {} ({}) signed by {}; {} golden case(s) reproduced within {}",
        m.model,
        m.release,
        m.version,
        signers.join(", "),
        m.golden.cases.len(),
        m.golden.tolerance
    );
    Ok(())
}

pub fn inspect(path: &Path) -> Result<(), Failure> {
    let raw = RawBundle::parse(&read(path)?).map_err(|e| data_error(e.into()))?;
    let m = raw.manifest_unverified().map_err(|e| data_error(e.into()))?;
    let features: Vec<String> =
        m.input.features.iter().map(|f| format!("{} [{}]", f.name, f.unit)).collect();
    println!("UNVERIFIED contents of {} (use `millwright verify` to check them)", path.display());
    println!("model:       {} {} ({})", m.model, m.release, m.version);
    println!("asset type:  {}", m.asset_type);
    println!("created:     {}", m.created_at);
    println!("expires:     {}", m.expires_at);
    println!("onnx:        {} bytes, sha256 {}", m.onnx.length, m.onnx.sha256);
    println!(
        "input:       {:?} window {} × {} features: {}",
        m.input.tensor,
        m.input.window,
        m.input.features.len(),
        features.join(", ")
    );
    println!(
        "output:      {:?} {:?} in {}; warning {} alarm {} hysteresis {}",
        m.output.tensor,
        m.output.kind,
        m.output.units,
        m.output.alerts.warning,
        m.output.alerts.alarm,
        m.output.alerts.hysteresis
    );
    println!("golden:      {} case(s), tolerance {}", m.golden.cases.len(), m.golden.tolerance);
    match &m.drift {
        Some(p) => println!(
            "drift:       {} features ({}), output profile {}",
            p.features.len(),
            p.source,
            if p.output.is_some() { "yes" } else { "no" }
        ),
        None => println!("drift:       no profile"),
    }
    for s in &raw.signatures {
        println!("signature:   key {}", s.key_id);
    }
    if raw.signatures.is_empty() {
        println!("signature:   none");
    }
    Ok(())
}
