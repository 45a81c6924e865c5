//! Who may decide what a gateway runs (after TUF/Uptane, sized for one fleet).
//!
//! A device is provisioned with a signed **root** document. The root names three key sets, each
//! with a threshold: `root` keys (offline; they sign the root itself), `release` keys (offline,
//! used through the CLI; they sign model bundles) and `server` keys (online; they sign only
//! short-lived rollout directives). A new root version is accepted only when a threshold of the
//! *current* root keys and a threshold of its *own* root keys signed it, and its version is the
//! next one. Keys listed as `revoked` count for nothing in any role.
//!
//! Signed documents travel as an [`Envelope`]: the exact JSON bytes (base64) and signatures over
//! a domain prefix plus those bytes, so a signature on one kind of document never verifies as
//! another kind.

use crate::bundle::{self, BundleSignature, Rejection, VerifiedBundle};
use crate::keys::{KeyId, TrustedKeys};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub const ROOT_KIND: &str = "millwright-root";
pub const ROOT_DOMAIN: &[u8] = b"millwright/root/v1\0";
/// Root documents above this size are refused before parsing.
pub const MAX_ROOT_BYTES: usize = 64 << 10;

/// Signed bytes and their signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Base64 of the signed JSON document.
    pub payload: String,
    pub signatures: Vec<BundleSignature>,
}

impl Envelope {
    /// Signs `payload` under `domain` with every key.
    pub fn sign(domain: &[u8], payload: &[u8], keys: &[&SigningKey]) -> Envelope {
        let message = [domain, payload].concat();
        Envelope {
            payload: BASE64.encode(payload),
            signatures: keys.iter().map(|k| bundle::signature(k, &message)).collect(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn parse(bytes: &[u8]) -> Result<Envelope, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    pub fn payload_bytes(&self) -> Result<Vec<u8>, String> {
        BASE64.decode(&self.payload).map_err(|e| format!("payload is not base64: {e}"))
    }

    /// The distinct keys of `trusted` that signed the payload under `domain`.
    pub fn signers(
        &self,
        domain: &[u8],
        payload: &[u8],
        trusted: &TrustedKeys,
    ) -> Result<usize, Rejection> {
        let message = [domain, payload].concat();
        Ok(bundle::valid_signers(&message, &self.signatures, trusted)?.len())
    }

    pub fn signed_by(&self, id: &KeyId) -> bool {
        self.signatures.iter().any(|s| &s.key_id == id)
    }
}

/// Public keys (hex) of one role and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySet {
    pub keys: Vec<String>,
    pub threshold: usize,
}

impl KeySet {
    pub fn of(keys: &[VerifyingKey], threshold: usize) -> KeySet {
        KeySet { keys: keys.iter().map(|k| hex::encode(k.as_bytes())).collect(), threshold }
    }

    fn trusted(&self, role: &'static str, revoked: &[KeyId]) -> Result<TrustedKeys, TrustError> {
        let mut keys = Vec::new();
        for text in &self.keys {
            let key = hex::decode(text)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .and_then(|b| VerifyingKey::from_bytes(&b).ok())
                .ok_or(TrustError::BadKey { role })?;
            let id = KeyId::of(&key);
            if !revoked.contains(&id) {
                keys.push((id, key));
            }
        }
        if self.threshold == 0 || self.threshold > keys.len() {
            return Err(TrustError::Threshold {
                role,
                threshold: self.threshold,
                keys: keys.len(),
            });
        }
        Ok(TrustedKeys::new(keys, self.threshold))
    }
}

/// The root document as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootMetadata {
    pub kind: String,
    pub version: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub root: KeySet,
    pub release: KeySet,
    pub server: KeySet,
    #[serde(default)]
    pub revoked: Vec<KeyId>,
}

/// Why a root document was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrustError {
    #[error("root document is malformed: {0}")]
    Malformed(String),
    #[error("root document is {0} bytes, above the limit of {MAX_ROOT_BYTES}")]
    TooLarge(usize),
    #[error("root document kind is {0:?}, expected {ROOT_KIND:?}")]
    Kind(String),
    #[error("root {role} key is not a 32-byte ed25519 public key in hex")]
    BadKey { role: &'static str },
    #[error("root {role} threshold {threshold} is not between 1 and its {keys} usable key(s)")]
    Threshold { role: &'static str, threshold: usize, keys: usize },
    #[error("root version {found} is not the next version after {current}")]
    Version { found: u64, current: u64 },
    #[error(
        "root version {version} has {valid} valid signature(s) by the {whose} root keys, {required} required"
    )]
    Signatures { version: u64, whose: &'static str, valid: usize, required: usize },
    #[error("root signature check failed: {0}")]
    Signature(Rejection),
    #[error("root version {version} expired at {expired_at}")]
    Expired { version: u64, expired_at: String },
}

/// A verified root and the key sets it delegates to.
#[derive(Debug, Clone)]
pub struct Root {
    metadata: RootMetadata,
    envelope: Envelope,
    root_keys: TrustedKeys,
    release: TrustedKeys,
    server: Option<TrustedKeys>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

impl Root {
    /// Signs a root document with the given root keys (old and new ones for a rotation).
    pub fn sign(metadata: &RootMetadata, keys: &[&SigningKey]) -> Envelope {
        let payload = serde_json::to_vec_pretty(metadata).unwrap_or_default();
        Envelope::sign(ROOT_DOMAIN, &payload, keys)
    }

    /// Parses and checks a root document on its own: kind, keys, thresholds, and a threshold
    /// of its own root keys (the first root a device holds is trusted because it was installed).
    pub fn provision(bytes: &[u8], now: OffsetDateTime) -> Result<Root, TrustError> {
        let root = Root::provision_expired_too(bytes)?;
        if root.is_expired(now) {
            return Err(TrustError::Expired {
                version: root.metadata.version,
                expired_at: rfc3339(root.metadata.expires_at),
            });
        }
        Ok(root)
    }

    /// Like [`Root::provision`], but an expired root is returned too: a gateway provisioned
    /// with a root that has since expired may hold a newer one, and a server must still start to
    /// say so. Callers check [`Root::is_expired`] before trusting it with anything new.
    pub fn provision_expired_too(bytes: &[u8]) -> Result<Root, TrustError> {
        if bytes.len() > MAX_ROOT_BYTES {
            return Err(TrustError::TooLarge(bytes.len()));
        }
        let envelope = Envelope::parse(bytes).map_err(TrustError::Malformed)?;
        let payload = envelope.payload_bytes().map_err(TrustError::Malformed)?;
        let metadata: RootMetadata =
            serde_json::from_slice(&payload).map_err(|e| TrustError::Malformed(e.to_string()))?;
        if metadata.kind != ROOT_KIND {
            return Err(TrustError::Kind(metadata.kind));
        }
        let revoked = &metadata.revoked;
        let root_keys = metadata.root.trusted("root", revoked)?;
        let release = metadata.release.trusted("release", revoked)?;
        let server = match metadata.server.keys.is_empty() {
            true => None,
            false => Some(metadata.server.trusted("server", revoked)?),
        };
        let root = Root { metadata, envelope, root_keys, release, server };
        root.check_signed_by(&root.root_keys, "new", &payload)?;
        Ok(root)
    }

    /// Whether the root has expired at `now` (a root made from bare release keys never does).
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.metadata.version > 0 && now >= self.metadata.expires_at
    }

    /// A trust state for devices configured with bare release keys (no root document): bundles
    /// verify against those keys and no server may direct updates.
    pub fn from_release_keys(release: TrustedKeys) -> Root {
        Root {
            metadata: RootMetadata {
                kind: ROOT_KIND.into(),
                version: 0,
                expires_at: OffsetDateTime::UNIX_EPOCH,
                root: KeySet { keys: Vec::new(), threshold: 0 },
                release: KeySet { keys: Vec::new(), threshold: release.threshold() },
                server: KeySet { keys: Vec::new(), threshold: 0 },
                revoked: Vec::new(),
            },
            envelope: Envelope { payload: String::new(), signatures: Vec::new() },
            root_keys: TrustedKeys::new(Vec::new(), usize::MAX),
            release,
            server: None,
        }
    }

    fn check_signed_by(
        &self,
        keys: &TrustedKeys,
        whose: &'static str,
        payload: &[u8],
    ) -> Result<(), TrustError> {
        let valid =
            self.envelope.signers(ROOT_DOMAIN, payload, keys).map_err(TrustError::Signature)?;
        if valid < keys.threshold() {
            return Err(TrustError::Signatures {
                version: self.metadata.version,
                whose,
                valid,
                required: keys.threshold(),
            });
        }
        Ok(())
    }

    /// The next root: its version must follow this one, and a threshold of this root's keys
    /// and of its own root keys must have signed it.
    pub fn rotate(&self, bytes: &[u8], now: OffsetDateTime) -> Result<Root, TrustError> {
        let next = Root::provision(bytes, now)?;
        if next.metadata.version != self.metadata.version + 1 {
            return Err(TrustError::Version {
                found: next.metadata.version,
                current: self.metadata.version,
            });
        }
        let payload = next.envelope.payload_bytes().map_err(TrustError::Malformed)?;
        next.check_signed_by(&self.root_keys, "current", &payload)?;
        Ok(next)
    }

    pub fn version(&self) -> u64 {
        self.metadata.version
    }

    pub fn metadata(&self) -> &RootMetadata {
        &self.metadata
    }

    /// The document as received, for durable storage and republishing.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.envelope.to_bytes()
    }

    pub fn release_keys(&self) -> &TrustedKeys {
        &self.release
    }

    /// The keys that may sign rollout directives, if this root names any.
    pub fn server_keys(&self) -> Option<&TrustedKeys> {
        self.server.as_ref()
    }

    pub fn is_revoked(&self, id: &KeyId) -> bool {
        self.metadata.revoked.contains(id)
    }

    /// Verifies a bundle against the release keys; a bundle that falls short because a
    /// signer was revoked says so.
    pub fn verify_bundle(
        &self,
        bytes: &[u8],
        now: OffsetDateTime,
    ) -> Result<VerifiedBundle, Rejection> {
        bundle::verify(bytes, &self.release, now).map_err(|e| match e {
            Rejection::UntrustedSigner { .. } | Rejection::BelowThreshold { .. } => {
                let revoked = bundle::RawBundle::parse(bytes).ok().and_then(|raw| {
                    raw.signatures.into_iter().map(|s| s.key_id).find(|id| self.is_revoked(id))
                });
                revoked.map_or(e, Rejection::RevokedKey)
            }
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn metadata(version: u64, root: &[u8], revoked: Vec<KeyId>) -> RootMetadata {
        let keys: Vec<VerifyingKey> = root.iter().map(|&n| key(n).verifying_key()).collect();
        RootMetadata {
            kind: ROOT_KIND.into(),
            version,
            expires_at: datetime!(2030-01-01 0:00 UTC),
            root: KeySet::of(&keys, 2),
            release: KeySet::of(&[key(10).verifying_key(), key(11).verifying_key()], 1),
            server: KeySet::of(&[key(20).verifying_key()], 1),
            revoked,
        }
    }

    const NOW: OffsetDateTime = datetime!(2026-06-01 0:00 UTC);

    #[test]
    fn a_root_needs_its_own_threshold_and_rotation_needs_the_old_one_too() {
        let v1 = metadata(1, &[1, 2, 3], vec![]);
        let one_sig = Root::sign(&v1, &[&key(1)]).to_bytes();
        assert!(matches!(
            Root::provision(&one_sig, NOW),
            Err(TrustError::Signatures { valid: 1, required: 2, .. })
        ));
        let root = Root::provision(&Root::sign(&v1, &[&key(1), &key(2)]).to_bytes(), NOW).unwrap();

        let v2 = metadata(2, &[4, 5, 6], vec![]);
        let new_only = Root::sign(&v2, &[&key(4), &key(5)]).to_bytes();
        assert!(matches!(
            root.rotate(&new_only, NOW),
            Err(TrustError::Signatures { whose: "current", valid: 0, .. })
        ));
        let both = Root::sign(&v2, &[&key(1), &key(3), &key(4), &key(5)]).to_bytes();
        let next = root.rotate(&both, NOW).unwrap();
        assert_eq!(next.version(), 2);
        let skip = Root::sign(&metadata(4, &[4, 5, 6], vec![]), &[&key(4), &key(5)]).to_bytes();
        assert!(matches!(
            next.rotate(&skip, NOW),
            Err(TrustError::Version { found: 4, current: 2 })
        ));
        assert!(matches!(
            next.rotate(&both, NOW),
            Err(TrustError::Version { found: 2, current: 2 })
        ));
    }

    #[test]
    fn an_expired_root_is_refused_for_trust_but_can_still_be_read() {
        let v1 = metadata(1, &[1, 2, 3], vec![]);
        let bytes = Root::sign(&v1, &[&key(1), &key(2)]).to_bytes();
        let later = datetime!(2031-01-01 0:00 UTC);
        assert!(matches!(Root::provision(&bytes, later), Err(TrustError::Expired { .. })));
        let root = Root::provision_expired_too(&bytes).unwrap();
        assert!(root.is_expired(later) && !root.is_expired(NOW));
        let v2 = metadata(2, &[1, 2, 3], vec![]);
        let next = Root::sign(&v2, &[&key(1), &key(2)]).to_bytes();
        assert_eq!(root.rotate(&next, NOW).unwrap().version(), 2, "an expired root can rotate");
    }

    #[test]
    fn revoked_keys_count_for_nothing() {
        let revoked = KeyId::of(&key(11).verifying_key());
        let v1 = metadata(1, &[1, 2, 3], vec![revoked.clone()]);
        let root = Root::provision(&Root::sign(&v1, &[&key(1), &key(2)]).to_bytes(), NOW).unwrap();
        assert!(root.release_keys().get(&revoked).is_none());
        assert!(root.is_revoked(&revoked));
        let tampered = Envelope { payload: BASE64.encode(b"{}"), ..Root::sign(&v1, &[&key(1)]) };
        assert!(matches!(
            Root::provision(&tampered.to_bytes(), NOW),
            Err(TrustError::Malformed(_))
        ));
    }
}
