//! The demo's rollout: a fleet trust root made on the spot (fresh root and server keys; the
//! committed demo release key signs bundles), release 2 of the reference model, and a rollout
//! of it through the API once the fleet is predicting: a canary, then the rest.

use ed25519_dalek::SigningKey;
use millwright_shared::bundle::RawBundle;
use millwright_shared::keys::{KeyId, SecretKeyFile};
use millwright_shared::trust::{KeySet, ROOT_KIND, Root, RootMetadata};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const MODEL: &str = "rul-cnn-fd001";

/// How the demo reaches its server's API: the CA its certificate chains to, and the tokens.
pub struct Access {
    pub ca: PathBuf,
    pub admin: String,
    pub operator: String,
}

pub struct DemoTrust {
    pub root: PathBuf,
    pub server_key: PathBuf,
    pub release_2: PathBuf,
}

/// Writes `root.json`, the server key and release 2 of the reference bundle into `dir`.
pub fn prepare(
    repo: &Path,
    dir: &Path,
    bundle: &str,
    release_secret: &str,
) -> anyhow::Result<DemoTrust> {
    std::fs::create_dir_all(dir)?;
    let (root_key, server_key) = (super::device::random_key()?, super::device::random_key()?);
    let (_, release_key) =
        SecretKeyFile::parse(&std::fs::read_to_string(repo.join(release_secret))?)?;
    let trust = DemoTrust {
        root: dir.join("root.json"),
        server_key: dir.join("server.secret.json"),
        release_2: dir.join("rul-cnn-fd001-r2.mwb"),
    };
    let root = one_key_root(&root_key, &release_key, &server_key, 30)?;
    std::fs::write(&trust.root, root)?;
    std::fs::write(&trust.server_key, serde_json::to_vec(&SecretKeyFile::new(&server_key))?)?;
    let reference = RawBundle::parse(&std::fs::read(repo.join(bundle))?)?;
    let next = reference.manifest_unverified()?.release.0 + 1;
    std::fs::write(&trust.release_2, resigned(&reference, next, "demo", &release_key)?)?;
    Ok(trust)
}

/// A version-1 trust root of one root, one release and one server key, signed by the root
/// key and valid for `days` (the demo's and the simulator's own fleets).
pub fn one_key_root(
    root: &SigningKey,
    release: &SigningKey,
    server: &SigningKey,
    days: i64,
) -> anyhow::Result<Vec<u8>> {
    let now = millwright_io::clock::now();
    let metadata = RootMetadata {
        kind: ROOT_KIND.into(),
        version: 1,
        expires_at: now.replace_nanosecond(0)? + time::Duration::days(days),
        root: KeySet::of(&[root.verifying_key()], 1),
        release: KeySet::of(&[release.verifying_key()], 1),
        server: KeySet::of(&[server.verifying_key()], 1),
        revoked: Vec::<KeyId>::new(),
    };
    Ok(Root::sign(&metadata, &[root]).to_bytes())
}

/// `reference` as release `release`, its version marked `<version>-<tag>-r<release>`, signed
/// with `key`.
pub fn resigned(
    reference: &RawBundle,
    release: u64,
    tag: &str,
    key: &SigningKey,
) -> anyhow::Result<Vec<u8>> {
    let mut manifest = reference.manifest_unverified()?;
    manifest.release = millwright_shared::Release(release);
    manifest.version = format!("{}-{tag}-r{release}", manifest.version);
    let mut bundle = RawBundle::unsigned(manifest, reference.model.clone());
    bundle.sign(key);
    Ok(bundle.to_bytes())
}

fn answer(
    url: &str,
    result: Result<ureq::Response, ureq::Error>,
) -> anyhow::Result<serde_json::Value> {
    match result {
        Ok(r) => Ok(r.into_json()?),
        Err(ureq::Error::Status(code, r)) => {
            let v: serde_json::Value = r.into_json().unwrap_or_default();
            anyhow::bail!("{url}: {code} {}", v["error"].as_str().unwrap_or(""))
        }
        Err(e) => anyhow::bail!("{url}: {e}"),
    }
}

/// Registers releases 1 and 2 (as the admin) and starts rolling release 2 out (as the
/// operator); returns the rollout id.
pub fn start(
    http: &str,
    access: &Access,
    repo: &Path,
    bundle: &str,
    release_2: &Path,
    soak_secs: u64,
) -> anyhow::Result<String> {
    let base = format!("https://{http}/api/v1");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .tls_config(millwright_io::tls::client_config(&access.ca, None)?)
        .build();
    for file in [repo.join(bundle), release_2.to_owned()] {
        let url = format!("{base}/models");
        let request = agent.post(&url).set("Authorization", &format!("Bearer {}", access.admin));
        let bytes = std::fs::read(&file)?;
        answer(&url, request.send_bytes(&bytes))?;
    }
    let url = format!("{base}/rollouts");
    let request = agent.post(&url).set("Authorization", &format!("Bearer {}", access.operator));
    let spec = json!({
        "model": MODEL, "release": 2, "target": {"kind": "all"},
        "canary": {"count": 1}, "waves": {"fixed": 1}, "soak_secs": soak_secs,
        "device_timeout_secs": 300, "on_failure": "revert",
        "activation": {"shadow_secs": 2, "probation_secs": 2, "gates": {"min_predictions": 10}},
        "reason": "demo: release 2 of the reference model",
    });
    let rollout = answer(&url, request.send_json(spec))?;
    Ok(rollout["id"].as_str().unwrap_or("?").to_owned())
}
