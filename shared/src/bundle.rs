//! Model bundle v1: one file holding the signed manifest, its signatures and the ONNX bytes.
//!
//! ```text
//! magic     8 bytes  "MWBUNDL1"
//! manifest  u32 BE length, then that many bytes of JSON (the signed bytes)
//! sigs      u32 BE length, then JSON: [{"key_id": "..", "signature": "<base64>"}]
//! model     u64 BE length, then the ONNX bytes
//! ```
//!
//! Architecture invariant: [`verify`] checks the container, the signatures, the manifest, the
//! model's length and hash and the expiry before anything else looks at the bytes, and it is
//! the only way to obtain a [`VerifiedBundle`] — the only type the inference adapter accepts.

use crate::keys::{KeyId, TrustedKeys};
use crate::manifest::{Manifest, ManifestError};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use time::OffsetDateTime;

pub const MAGIC: &[u8; 8] = b"MWBUNDL1";
/// Signatures cover this prefix followed by the manifest bytes, so they cannot be replayed as
/// signatures over anything else.
pub const SIGNING_DOMAIN: &[u8] = b"millwright/bundle-manifest/v1\0";
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
pub const MAX_SIGNATURES_BYTES: usize = 64 << 10;
pub const MAX_MODEL_BYTES: u64 = 512 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSignature {
    pub key_id: KeyId,
    /// Base64 of the 64-byte ed25519 signature.
    pub signature: String,
}

/// The sections of a bundle file, split but not yet trusted.
#[derive(Debug, Clone, PartialEq)]
pub struct RawBundle {
    pub manifest: Vec<u8>,
    pub signatures: Vec<BundleSignature>,
    pub model: Vec<u8>,
}

/// Why a bundle was refused. Each variant is a distinct, named cause.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("not a Millwright bundle (bad magic bytes)")]
    BadMagic,
    #[error("bundle is truncated: the {section} section is cut short")]
    Truncated { section: &'static str },
    #[error("bundle has {0} unexpected bytes after the model")]
    TrailingBytes(u64),
    #[error("bundle {section} section is {size} bytes, above the limit of {limit}")]
    TooLarge { section: &'static str, size: u64, limit: u64 },
    #[error("bundle signature list is malformed: {0}")]
    MalformedSignatures(String),
    #[error("bundle is not signed by any trusted key (signed by: {signed_by})")]
    UntrustedSigner { signed_by: String },
    #[error(
        "signature by trusted key {0} does not match the manifest (the manifest was modified or the signature is corrupt)"
    )]
    BadSignature(KeyId),
    #[error("bundle has {valid} valid trusted signature(s), {required} required")]
    BelowThreshold { valid: usize, required: usize },
    #[error("manifest is malformed: {0}")]
    MalformedManifest(String),
    #[error("manifest is inconsistent: {0}")]
    InvalidManifest(#[from] ManifestError),
    #[error("model is {actual} bytes but the signed manifest says {stated}")]
    ModelLength { stated: u64, actual: u64 },
    #[error(
        "model SHA-256 {actual} does not match the signed manifest's {stated} (model tampered)"
    )]
    ModelHash { stated: String, actual: String },
    #[error("bundle expired at {expired_at}")]
    Expired { expired_at: String },
    #[error("bundle is signed by revoked key {0} and has too few other valid signatures")]
    RevokedKey(KeyId),
}

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, section: &'static str) -> Result<&'a [u8], Rejection> {
        let n = usize::try_from(n).map_err(|_| Rejection::Truncated { section })?;
        if self.bytes.len() < n {
            return Err(Rejection::Truncated { section });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u32(&mut self, section: &'static str) -> Result<u64, Rejection> {
        let b = self.take(4, section)?;
        Ok(u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
    }

    fn u64(&mut self, section: &'static str) -> Result<u64, Rejection> {
        let b = self.take(8, section)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
}

fn limit(section: &'static str, size: u64, limit: u64) -> Result<(), Rejection> {
    if size > limit { Err(Rejection::TooLarge { section, size, limit }) } else { Ok(()) }
}

impl RawBundle {
    /// Splits a bundle file into its sections, checking only the container.
    pub fn parse(bytes: &[u8]) -> Result<RawBundle, Rejection> {
        let mut cur = Cursor { bytes };
        if cur.take(8, "header").map_err(|_| Rejection::BadMagic)? != MAGIC {
            return Err(Rejection::BadMagic);
        }
        let len = cur.u32("manifest")?;
        limit("manifest", len, MAX_MANIFEST_BYTES as u64)?;
        let manifest = cur.take(len, "manifest")?.to_vec();
        let len = cur.u32("signatures")?;
        limit("signatures", len, MAX_SIGNATURES_BYTES as u64)?;
        let sigs = cur.take(len, "signatures")?;
        let signatures: Vec<BundleSignature> = serde_json::from_slice(sigs)
            .map_err(|e| Rejection::MalformedSignatures(e.to_string()))?;
        let len = cur.u64("model")?;
        limit("model", len, MAX_MODEL_BYTES)?;
        let model = cur.take(len, "model")?.to_vec();
        if !cur.bytes.is_empty() {
            return Err(Rejection::TrailingBytes(cur.bytes.len() as u64));
        }
        Ok(RawBundle { manifest, signatures, model })
    }

    /// Serializes the bundle to its file form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let sigs = serde_json::to_vec(&self.signatures).unwrap_or_else(|_| b"[]".to_vec());
        let mut out = Vec::with_capacity(32 + self.manifest.len() + sigs.len() + self.model.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.manifest.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.manifest);
        out.extend_from_slice(&(sigs.len() as u32).to_be_bytes());
        out.extend_from_slice(&sigs);
        out.extend_from_slice(&(self.model.len() as u64).to_be_bytes());
        out.extend_from_slice(&self.model);
        out
    }

    /// An unsigned bundle whose manifest states the model's digest and length.
    pub fn unsigned(mut manifest: Manifest, model: Vec<u8>) -> RawBundle {
        manifest.onnx.sha256 = sha256_hex(&model);
        manifest.onnx.length = model.len() as u64;
        let manifest = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        RawBundle { manifest, signatures: Vec::new(), model }
    }

    /// Adds (or replaces) the signature of `key` over the manifest bytes.
    pub fn sign(&mut self, key: &SigningKey) {
        let sig = signature(key, &signed_message(&self.manifest));
        self.signatures.retain(|s| s.key_id != sig.key_id);
        self.signatures.push(sig);
    }

    /// Parses the manifest without checking any signature (for `inspect`).
    pub fn manifest_unverified(&self) -> Result<Manifest, Rejection> {
        serde_json::from_slice(&self.manifest)
            .map_err(|e| Rejection::MalformedManifest(e.to_string()))
    }
}

fn signed_message(manifest: &[u8]) -> Vec<u8> {
    [SIGNING_DOMAIN, manifest].concat()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A bundle whose signatures, hash, length and expiry were checked. Only [`verify`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    manifest: Manifest,
    model: Vec<u8>,
    signed_by: Vec<KeyId>,
}

impl VerifiedBundle {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn model_bytes(&self) -> &[u8] {
        &self.model
    }

    pub fn signed_by(&self) -> &[KeyId] {
        &self.signed_by
    }
}

/// The distinct trusted keys whose signatures over `message` are valid. Signatures by keys
/// not in `trusted` are ignored; a trusted key's signature that does not verify is an error,
/// since it means the signed bytes were changed.
pub fn valid_signers(
    message: &[u8],
    signatures: &[BundleSignature],
    trusted: &TrustedKeys,
) -> Result<BTreeSet<KeyId>, Rejection> {
    let mut valid = BTreeSet::new();
    for sig in signatures {
        let Some(key) = trusted.get(&sig.key_id) else { continue };
        let signature = BASE64
            .decode(&sig.signature)
            .ok()
            .and_then(|b| Signature::from_slice(&b).ok())
            .ok_or_else(|| Rejection::BadSignature(sig.key_id.clone()))?;
        key.verify(message, &signature).map_err(|_| Rejection::BadSignature(sig.key_id.clone()))?;
        valid.insert(sig.key_id.clone());
    }
    Ok(valid)
}

/// Signs `message` with `key` in the bundle signature form.
pub fn signature(key: &SigningKey, message: &[u8]) -> BundleSignature {
    BundleSignature {
        key_id: KeyId::of(&key.verifying_key()),
        signature: BASE64.encode(key.sign(message).to_bytes()),
    }
}

/// Verifies a bundle file against the trusted keys at instant `now`.
pub fn verify(
    bytes: &[u8],
    trusted: &TrustedKeys,
    now: OffsetDateTime,
) -> Result<VerifiedBundle, Rejection> {
    let raw = RawBundle::parse(bytes)?;
    let valid = valid_signers(&signed_message(&raw.manifest), &raw.signatures, trusted)?;
    if valid.is_empty() {
        let signed_by: Vec<String> = raw.signatures.iter().map(|s| s.key_id.0.clone()).collect();
        let signed_by =
            if signed_by.is_empty() { "nobody".to_owned() } else { signed_by.join(", ") };
        return Err(Rejection::UntrustedSigner { signed_by });
    }
    if valid.len() < trusted.threshold() {
        return Err(Rejection::BelowThreshold {
            valid: valid.len(),
            required: trusted.threshold(),
        });
    }
    let manifest = raw.manifest_unverified()?;
    manifest.validate()?;
    let actual_len = raw.model.len() as u64;
    if actual_len != manifest.onnx.length {
        return Err(Rejection::ModelLength { stated: manifest.onnx.length, actual: actual_len });
    }
    let actual = sha256_hex(&raw.model);
    if actual != manifest.onnx.sha256 {
        return Err(Rejection::ModelHash { stated: manifest.onnx.sha256.clone(), actual });
    }
    if now >= manifest.expires_at {
        let expired_at = manifest
            .expires_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        return Err(Rejection::Expired { expired_at });
    }
    Ok(VerifiedBundle { manifest, model: raw.model, signed_by: valid.into_iter().collect() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ModelName, Release};
    use crate::manifest::*;
    use time::macros::datetime;

    fn manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            model: ModelName::new("m").unwrap(),
            release: Release(3),
            version: "1.0".into(),
            created_at: datetime!(2026-01-01 0:00 UTC),
            expires_at: datetime!(2027-01-01 0:00 UTC),
            onnx: OnnxDigest { sha256: String::new(), length: 0 },
            input: InputSpec {
                tensor: "x".into(),
                window: 2,
                features: vec![Feature { name: "a".into(), unit: "-".into() }],
            },
            output: OutputSpec {
                tensor: "y".into(),
                kind: OutputKind::AnomalyScore,
                units: "-".into(),
                alerts: AlertThresholds { warning: 0.5, alarm: 0.8, hysteresis: 0.1 },
            },
            asset_type: "pump".into(),
            device_classes: vec![],
            golden: Golden {
                tolerance: 1e-4,
                cases: vec![GoldenCase { input: vec![1.0, 2.0], output: vec![0.1] }],
            },
            drift: None,
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn trusted(keys: &[&SigningKey], threshold: usize) -> TrustedKeys {
        TrustedKeys::new(
            keys.iter().map(|k| (KeyId::of(&k.verifying_key()), k.verifying_key())).collect(),
            threshold,
        )
    }

    fn signed(keys: &[&SigningKey]) -> Vec<u8> {
        let mut raw = RawBundle::unsigned(manifest(), b"onnx bytes".to_vec());
        for k in keys {
            raw.sign(k);
        }
        raw.to_bytes()
    }

    const NOW: OffsetDateTime = datetime!(2026-06-01 0:00 UTC);

    #[test]
    fn a_signed_bundle_verifies_and_exposes_its_model() {
        let bundle = verify(&signed(&[&key(1)]), &trusted(&[&key(1)], 1), NOW).unwrap();
        assert_eq!(bundle.model_bytes(), b"onnx bytes");
        assert_eq!(bundle.manifest().release, Release(3));
    }

    #[test]
    fn each_kind_of_damage_gets_its_own_rejection() {
        let good = signed(&[&key(1)]);
        let keys = trusted(&[&key(1)], 1);
        let check = |bytes: &[u8]| verify(bytes, &keys, NOW).unwrap_err();

        let mut model_flip = good.clone();
        let last = model_flip.len() - 1;
        model_flip[last] ^= 1;
        assert!(matches!(check(&model_flip), Rejection::ModelHash { .. }));

        let mut manifest_flip = good.clone();
        manifest_flip[8 + 4 + 10] ^= 1;
        assert!(matches!(check(&manifest_flip), Rejection::BadSignature(_)));

        assert!(matches!(
            check(&good[..good.len() - 3]),
            Rejection::Truncated { section: "model" }
        ));
        assert!(matches!(check(&good[..20]), Rejection::Truncated { section: "manifest" }));
        assert_eq!(check(b"PK\x03\x04zip"), Rejection::BadMagic);
        assert!(matches!(check(&[good.as_slice(), b"x"].concat()), Rejection::TrailingBytes(1)));

        let stranger = signed(&[&key(2)]);
        assert!(matches!(check(&stranger), Rejection::UntrustedSigner { .. }));

        let expired = verify(&good, &keys, datetime!(2027-01-01 0:00 UTC)).unwrap_err();
        assert!(matches!(expired, Rejection::Expired { .. }));
    }

    #[test]
    fn a_threshold_needs_that_many_distinct_trusted_signers() {
        let keys = trusted(&[&key(1), &key(2), &key(3)], 2);
        let one = verify(&signed(&[&key(1), &key(9)]), &keys, NOW).unwrap_err();
        assert_eq!(one, Rejection::BelowThreshold { valid: 1, required: 2 });
        assert!(verify(&signed(&[&key(1), &key(3)]), &keys, NOW).is_ok());
    }
}
