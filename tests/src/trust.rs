//! Trust material for rollout scenarios: root, release and server keys (fixed seeds, so runs
//! are reproducible), the root document agents are provisioned with, signed bundles built from
//! the reference model, and directives signed like the server signs them.

use crate::{BUNDLE, repo_file};
use ed25519_dalek::SigningKey;
use millwright_shared::bundle::{RawBundle, sha256_hex};
use millwright_shared::directive::{Action, Activation, BundleRef, DIRECTIVE_VERSION, Directive};
use millwright_shared::gates::Gates;
use millwright_shared::keys::{KeyId, PublicKeyFile, SecretKeyFile};
use millwright_shared::manifest::Manifest;
use millwright_shared::trust::{KeySet, ROOT_KIND, Root, RootMetadata};
use millwright_shared::{DeviceId, ModelName, Release};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// The seed of the server's message key: every test server signs with it, and every root the
/// kit makes names it as the server key.
pub const SERVER_SEED: u8 = 21;

/// Keys by role. Root: 3 keys, threshold 2. Release: 3 keys, threshold 2, plus one revoked.
/// Server: one key, plus one revoked.
pub struct TrustKit {
    pub root_keys: Vec<SigningKey>,
    pub release_keys: Vec<SigningKey>,
    pub revoked_release: SigningKey,
    pub server_key: SigningKey,
    pub revoked_server: SigningKey,
    /// The provisioned root document (version 1).
    pub root_path: PathBuf,
    pub server_secret: PathBuf,
    /// Public key files of the release keys (for `millwright verify` and the like).
    pub release_public: Vec<PathBuf>,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl TrustKit {
    /// Writes `root.json` (version 1), the server's secret key file and the release public
    /// key files into `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<TrustKit> {
        std::fs::create_dir_all(dir)?;
        let kit = TrustKit {
            root_keys: vec![key(1), key(2), key(3)],
            release_keys: vec![key(11), key(12), key(13)],
            revoked_release: key(19),
            server_key: key(SERVER_SEED),
            revoked_server: key(29),
            root_path: dir.join("root.json"),
            server_secret: dir.join("server.secret.json"),
            release_public: (0..3).map(|i| dir.join(format!("release-{i}.pub.json"))).collect(),
        };
        let root = kit.root_document(1, &[&kit.root_keys[0], &kit.root_keys[1]]);
        std::fs::write(&kit.root_path, root)?;
        std::fs::write(
            &kit.server_secret,
            serde_json::to_vec(&SecretKeyFile::new(&kit.server_key))?,
        )?;
        for (k, path) in kit.release_keys.iter().zip(&kit.release_public) {
            std::fs::write(path, serde_json::to_vec(&PublicKeyFile::new(&k.verifying_key()))?)?;
        }
        Ok(kit)
    }

    /// The root metadata of `version`: this kit's keys, the revoked ones listed as revoked.
    pub fn metadata(&self, version: u64, root_keys: &[&SigningKey]) -> RootMetadata {
        let public =
            |keys: &[&SigningKey]| -> Vec<_> { keys.iter().map(|k| k.verifying_key()).collect() };
        let release: Vec<&SigningKey> =
            self.release_keys.iter().chain([&self.revoked_release]).collect();
        RootMetadata {
            kind: ROOT_KIND.into(),
            version,
            expires_at: now() + time::Duration::days(365),
            root: KeySet::of(&public(root_keys), 2),
            release: KeySet::of(&public(&release), 2),
            server: KeySet::of(&public(&[&self.server_key, &self.revoked_server]), 1),
            revoked: vec![
                KeyId::of(&self.revoked_release.verifying_key()),
                KeyId::of(&self.revoked_server.verifying_key()),
            ],
        }
    }

    /// A root document of `version` listing this kit's root keys, signed by `signers`.
    pub fn root_document(&self, version: u64, signers: &[&SigningKey]) -> Vec<u8> {
        let keys: Vec<&SigningKey> = self.root_keys.iter().collect();
        Root::sign(&self.metadata(version, &keys), signers).to_bytes()
    }

    /// The reference manifest, for `release`, edited by `edit`.
    pub fn manifest(release: u64, edit: impl FnOnce(&mut Manifest)) -> anyhow::Result<Manifest> {
        let reference = RawBundle::parse(&std::fs::read(repo_file(BUNDLE))?)?;
        let mut m = reference.manifest_unverified()?;
        m.release = Release(release);
        m.version = format!("test-r{release}");
        m.created_at = now().replace_nanosecond(0)?;
        m.expires_at = m.created_at + time::Duration::days(30);
        edit(&mut m);
        Ok(m)
    }

    /// A bundle of `onnx` with `manifest`, signed by `signers`.
    pub fn bundle(manifest: Manifest, onnx: Vec<u8>, signers: &[&SigningKey]) -> Vec<u8> {
        let mut raw = RawBundle::unsigned(manifest, onnx);
        for k in signers {
            raw.sign(k);
        }
        raw.to_bytes()
    }

    /// The reference model as `release`, signed by two release keys.
    pub fn release(&self, release: u64) -> anyhow::Result<Vec<u8>> {
        let onnx = std::fs::read(repo_file("models/rul-cnn-fd001/model.onnx"))?;
        Ok(Self::bundle(Self::manifest(release, |_| {})?, onnx, &self.release_signers()))
    }

    pub fn release_signers(&self) -> Vec<&SigningKey> {
        vec![&self.release_keys[0], &self.release_keys[1]]
    }

    /// A directive for `device` to install `bundle` (cut into `chunk_size` chunks), valid for
    /// an hour, unsigned.
    pub fn directive(
        device: &str,
        seq: u64,
        bundle: &[u8],
        chunk_size: u32,
        release: u64,
        activation: Activation,
    ) -> anyhow::Result<Directive> {
        Ok(Directive {
            v: DIRECTIVE_VERSION,
            device: DeviceId::new(device)?,
            seq,
            issued_at: now(),
            expires_at: now() + time::Duration::hours(1),
            rollout: format!("test-{seq}"),
            action: Action::Install,
            model: ModelName::new("rul-cnn-fd001")?,
            release: Release(release),
            bundle: bundle_ref(bundle, chunk_size),
            activation,
        })
    }
}

/// The tokens of the users every test server has (the harness adds them, hashed).
pub const OPERATOR_TOKEN: &str = "operator-token-0123456789";
pub const ADMIN_TOKEN: &str = "admin-token-0123456789";
pub const VIEWER_TOKEN: &str = "viewer-token-0123456789";

impl TrustKit {
    /// Server config with rollouts on this kit's root, and `extra` lines in `[rollouts]` (e.g.
    /// `chunk_size = 8192`). The server signs directives with its identity key, the kit's
    /// server key.
    pub fn server_config(&self, extra: &str) -> String {
        format!("[rollouts]\nroot = {:?}\ntick_ms = 200\n{extra}\n", self.root_path)
    }

    /// Releases 1 and 2 of the reference model (the same weights) written to `dir` as
    /// `r1.mwb` and `r2.mwb`, and a server on the embedded broker with this kit's config
    /// (`extra` in its `[rollouts]`, e.g. a chunk size) that has both registered.
    pub fn server_with_two_releases(
        &self,
        dir: &Path,
        extra: &str,
    ) -> anyhow::Result<(PathBuf, PathBuf, crate::Server)> {
        let (r1, r2) = (dir.join("r1.mwb"), dir.join("r2.mwb"));
        std::fs::write(&r1, self.release(1)?)?;
        std::fs::write(&r2, self.release(2)?)?;
        let config = self.server_config(extra);
        let server = crate::Server::start_with_config(dir, crate::BrokerChoice::Embedded, &config)?;
        for bundle in [&r1, &r2] {
            let out = server.cli(ADMIN_TOKEN).args(["model", "register"]).arg(bundle).output()?;
            anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((r1, r2, server))
    }
}

/// How a bundle is named and cut in a directive.
pub fn bundle_ref(bundle: &[u8], chunk_size: u32) -> BundleRef {
    BundleRef {
        sha256: sha256_hex(bundle),
        size: bundle.len() as u64,
        chunk_size,
        chunks: bundle.chunks(chunk_size as usize).map(sha256_hex).collect(),
    }
}

/// Activation without shadow or probation, with gates that need few predictions.
pub fn quick_activation() -> Activation {
    Activation {
        shadow_secs: 0,
        probation_secs: 0,
        gates: Gates { min_predictions: 1, ..Gates::default() },
    }
}
