//! The desired state the server asks one device to reach: "run this release of this model",
//! signed by an online server key, valid for a short time, numbered so an old one cannot be
//! replayed. It names the bundle by SHA-256 and size and lists the SHA-256 of every chunk, so
//! each chunk is checked as it arrives and the transfer can never grow past the stated size.

use crate::bundle::sha256_hex;
use crate::gates::Gates;
use crate::ids::{DeviceId, ModelName, Release};
use crate::trust::{Envelope, Root};
use crate::wire::Chunk;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub const DIRECTIVE_VERSION: u32 = 1;
pub const DIRECTIVE_DOMAIN: &[u8] = b"millwright/directive/v1\0";
/// Directive envelopes above this size are refused before parsing.
pub const MAX_DIRECTIVE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Install a release newer than any this device has seen for the model.
    Install,
    /// Go back to an older release that still verifies (rollback protection is waived only
    /// for this signed action).
    Revert,
}

/// The bundle file to fetch and how it is cut into chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRef {
    pub sha256: String,
    pub size: u64,
    pub chunk_size: u32,
    /// SHA-256 of each chunk, in order.
    pub chunks: Vec<String>,
}

impl BundleRef {
    /// Length of chunk `index`, or `None` past the end.
    pub fn chunk_len(&self, index: u32) -> Option<u64> {
        let start = u64::from(index) * u64::from(self.chunk_size);
        (start < self.size).then(|| (self.size - start).min(u64::from(self.chunk_size)))
    }

    /// Decodes and checks one chunk against the plan: the bundle it belongs to, its index, its
    /// exact length and its SHA-256. Returns the index and the bytes.
    pub fn accept(&self, chunk: &Chunk) -> Result<(u32, Vec<u8>), ChunkError> {
        if chunk.sha256 != self.sha256 {
            return Err(ChunkError::OtherBundle);
        }
        let expected = self.chunk_len(chunk.index).ok_or(ChunkError::Index(chunk.index))?;
        // base64 is 4 bytes per 3: refuse oversized data before decoding it.
        if chunk.data.len() as u64 > expected.div_ceil(3) * 4 {
            return Err(ChunkError::Length { index: chunk.index, expected, found: None });
        }
        let data = BASE64.decode(&chunk.data).map_err(|_| ChunkError::Encoding(chunk.index))?;
        if data.len() as u64 != expected {
            return Err(ChunkError::Length {
                index: chunk.index,
                expected,
                found: Some(data.len() as u64),
            });
        }
        if sha256_hex(&data) != self.chunks[chunk.index as usize] {
            return Err(ChunkError::Hash(chunk.index));
        }
        Ok((chunk.index, data))
    }

    /// The chunk plan is consistent with the stated size.
    pub fn check(&self) -> Result<(), DirectiveError> {
        let bad = |why: &str| Err(DirectiveError::ChunkPlan(why.to_owned()));
        if self.size == 0 || self.chunk_size == 0 {
            return bad("size and chunk size must be positive");
        }
        if self.size.div_ceil(u64::from(self.chunk_size)) != self.chunks.len() as u64 {
            return bad("the chunk count does not match size / chunk size");
        }
        let hex64 = |h: &String| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex64(&self.sha256) || !self.chunks.iter().all(hex64) {
            return bad("digests must be 64 hex digits");
        }
        Ok(())
    }
}

/// Why a chunk was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk belongs to another bundle")]
    OtherBundle,
    #[error("chunk index {0} is past the end of the bundle")]
    Index(u32),
    #[error("chunk {0} is not valid base64")]
    Encoding(u32),
    #[error("chunk {index} is {} bytes, the directive says {expected}", found.map_or("too many".to_owned(), |n| n.to_string()))]
    Length { index: u32, expected: u64, found: Option<u64> },
    #[error("chunk {0} does not match its SHA-256 in the directive")]
    Hash(u32),
}

/// How the device brings the release in: shadow period, probation and the health gates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    /// Both models run side by side this long before the swap (0: no shadow period).
    pub shadow_secs: u64,
    /// After the swap the new model is watched this long before it is committed.
    pub probation_secs: u64,
    pub gates: Gates,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directive {
    pub v: u32,
    pub device: DeviceId,
    /// Strictly increasing for each device.
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The rollout this directive belongs to.
    pub rollout: String,
    pub action: Action,
    pub model: ModelName,
    pub release: Release,
    pub bundle: BundleRef,
    pub activation: Activation,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DirectiveError {
    #[error("directive is {0} bytes, above the limit of {MAX_DIRECTIVE_BYTES}")]
    TooLarge(usize),
    #[error("directive is malformed: {0}")]
    Malformed(String),
    #[error("directive version {0} is not supported (this build reads {DIRECTIVE_VERSION})")]
    Version(u32),
    #[error("this device's root names no server key; it accepts no directives")]
    NoServerKey,
    #[error("directive is not signed by a trusted server key (signed by: {0})")]
    UntrustedSigner(String),
    #[error("directive is signed by revoked key {0}")]
    RevokedKey(String),
    #[error("directive signature check failed: {0}")]
    Signature(String),
    #[error("directive is addressed to device {found}, this is {expected}")]
    WrongDevice { found: DeviceId, expected: DeviceId },
    #[error("directive {seq} is a replay: directive {last} was already applied")]
    Replayed { seq: u64, last: u64 },
    #[error("directive expired at {0}")]
    Expired(String),
    #[error("directive's chunk plan is inconsistent: {0}")]
    ChunkPlan(String),
    #[error("directive asks for a {size}-byte transfer, above this device's limit of {limit}")]
    Oversized { size: u64, limit: u64 },
}

impl Directive {
    /// Signs the directive with the server key.
    pub fn sign(&self, key: &ed25519_dalek::SigningKey) -> Envelope {
        let payload = serde_json::to_vec(self).unwrap_or_default();
        Envelope::sign(DIRECTIVE_DOMAIN, &payload, &[key])
    }
}

/// What to do with a directive that verified.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// A directive this device has not applied yet.
    New(Box<Directive>),
    /// The directive already applied (the broker delivers the retained one again).
    Applied,
}

/// Checks a directive envelope for `device`: size, signature by a threshold of the root's
/// server keys, version, address, sequence (greater than `last_seq`, or equal with the same
/// bytes), expiry, chunk plan and the device's transfer limit.
pub fn verify(
    bytes: &[u8],
    root: &Root,
    device: &DeviceId,
    last: Option<(u64, &[u8])>,
    max_bundle_bytes: u64,
    now: OffsetDateTime,
) -> Result<Verdict, DirectiveError> {
    if bytes.len() > MAX_DIRECTIVE_BYTES {
        return Err(DirectiveError::TooLarge(bytes.len()));
    }
    let envelope = Envelope::parse(bytes).map_err(DirectiveError::Malformed)?;
    let payload = envelope.payload_bytes().map_err(DirectiveError::Malformed)?;
    let server = root.server_keys().ok_or(DirectiveError::NoServerKey)?;
    let valid = envelope.signers(DIRECTIVE_DOMAIN, &payload, server).map_err(|e| match e {
        crate::bundle::Rejection::BadSignature(key) => DirectiveError::Signature(format!(
            "the signature by server key {key} does not match (the directive was modified)"
        )),
        other => DirectiveError::Signature(other.to_string()),
    })?;
    if valid < server.threshold() {
        if let Some(s) = envelope.signatures.iter().find(|s| root.is_revoked(&s.key_id)) {
            return Err(DirectiveError::RevokedKey(s.key_id.0.clone()));
        }
        let ids: Vec<&str> = envelope.signatures.iter().map(|s| s.key_id.0.as_str()).collect();
        return Err(DirectiveError::UntrustedSigner(if ids.is_empty() {
            "nobody".into()
        } else {
            ids.join(", ")
        }));
    }
    let version: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|e| DirectiveError::Malformed(e.to_string()))?;
    if let Some(v) = version.get("v").and_then(serde_json::Value::as_u64)
        && v != u64::from(DIRECTIVE_VERSION)
    {
        return Err(DirectiveError::Version(u32::try_from(v).unwrap_or(u32::MAX)));
    }
    let directive: Directive =
        serde_json::from_slice(&payload).map_err(|e| DirectiveError::Malformed(e.to_string()))?;
    if &directive.device != device {
        return Err(DirectiveError::WrongDevice {
            found: directive.device,
            expected: device.clone(),
        });
    }
    if let Some((last_seq, last_bytes)) = last {
        if directive.seq == last_seq && last_bytes == bytes {
            return Ok(Verdict::Applied);
        }
        if directive.seq <= last_seq {
            return Err(DirectiveError::Replayed { seq: directive.seq, last: last_seq });
        }
    }
    if now >= directive.expires_at {
        return Err(DirectiveError::Expired(
            directive
                .expires_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        ));
    }
    directive.bundle.check()?;
    if directive.bundle.size > max_bundle_bytes {
        return Err(DirectiveError::Oversized {
            size: directive.bundle.size,
            limit: max_bundle_bytes,
        });
    }
    Ok(Verdict::New(Box::new(directive)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::TrustedKeys;
    use crate::trust::{KeySet, ROOT_KIND, RootMetadata};
    use ed25519_dalek::SigningKey;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-06-01 0:00 UTC);

    fn root() -> Root {
        let k = |n: u8| SigningKey::from_bytes(&[n; 32]);
        let meta = RootMetadata {
            kind: ROOT_KIND.into(),
            version: 1,
            expires_at: datetime!(2030-01-01 0:00 UTC),
            root: KeySet::of(&[k(1).verifying_key()], 1),
            release: KeySet::of(&[k(2).verifying_key()], 1),
            server: KeySet::of(&[k(3).verifying_key()], 1),
            revoked: vec![],
        };
        Root::provision(&Root::sign(&meta, &[&k(1)]).to_bytes(), NOW).unwrap()
    }

    fn directive(seq: u64) -> Directive {
        Directive {
            v: DIRECTIVE_VERSION,
            device: DeviceId::new("gw1").unwrap(),
            seq,
            issued_at: NOW,
            expires_at: datetime!(2026-06-01 1:00 UTC),
            rollout: "r1".into(),
            action: Action::Install,
            model: ModelName::new("m").unwrap(),
            release: Release(2),
            bundle: BundleRef {
                sha256: "a".repeat(64),
                size: 10,
                chunk_size: 4,
                chunks: vec!["b".repeat(64); 3],
            },
            activation: Activation { shadow_secs: 0, probation_secs: 0, gates: Gates::default() },
        }
    }

    #[test]
    fn directives_are_checked_for_signer_address_sequence_expiry_and_size() {
        let (root, gw1) = (root(), DeviceId::new("gw1").unwrap());
        let server = SigningKey::from_bytes(&[3; 32]);
        let signed = directive(5).sign(&server).to_bytes();
        let check = |bytes: &[u8], last: Option<(u64, &[u8])>, max: u64, now| {
            verify(bytes, &root, &gw1, last, max, now)
        };
        assert!(matches!(check(&signed, None, 100, NOW), Ok(Verdict::New(_))));
        assert_eq!(check(&signed, Some((5, &signed)), 100, NOW), Ok(Verdict::Applied));
        assert!(matches!(
            check(&signed, Some((7, b"x")), 100, NOW),
            Err(DirectiveError::Replayed { seq: 5, last: 7 })
        ));
        let rogue = directive(6).sign(&SigningKey::from_bytes(&[9; 32])).to_bytes();
        assert!(matches!(check(&rogue, None, 100, NOW), Err(DirectiveError::UntrustedSigner(_))));
        assert!(matches!(
            check(&signed, None, 100, datetime!(2026-06-01 2:00 UTC)),
            Err(DirectiveError::Expired(_))
        ));
        assert!(matches!(check(&signed, None, 5, NOW), Err(DirectiveError::Oversized { .. })));
        let other = Directive { device: DeviceId::new("gw2").unwrap(), ..directive(6) };
        assert!(matches!(
            check(&other.sign(&server).to_bytes(), None, 100, NOW),
            Err(DirectiveError::WrongDevice { .. })
        ));
        let mut bad_plan = directive(6);
        bad_plan.bundle.chunks.pop();
        assert!(matches!(
            check(&bad_plan.sign(&server).to_bytes(), None, 100, NOW),
            Err(DirectiveError::ChunkPlan(_))
        ));
        let legacy = Root::from_release_keys(TrustedKeys::new(vec![], 1));
        assert_eq!(
            verify(&signed, &legacy, &gw1, None, 100, NOW),
            Err(DirectiveError::NoServerKey)
        );
        assert_eq!(directive(1).bundle.chunk_len(2), Some(2));
        assert_eq!(directive(1).bundle.chunk_len(3), None);
    }

    #[test]
    fn chunks_are_checked_for_bundle_index_length_and_hash() {
        let bytes = b"0123456789".to_vec();
        let plan = BundleRef {
            sha256: sha256_hex(&bytes),
            size: 10,
            chunk_size: 4,
            chunks: bytes.chunks(4).map(sha256_hex).collect(),
        };
        plan.check().unwrap();
        let chunk = |index: u32, data: &[u8]| Chunk {
            v: 1,
            sha256: plan.sha256.clone(),
            index,
            data: BASE64.encode(data),
        };
        assert_eq!(plan.accept(&chunk(2, b"89")), Ok((2, b"89".to_vec())));
        assert_eq!(plan.accept(&chunk(1, b"4567")), Ok((1, b"4567".to_vec())));
        assert_eq!(plan.accept(&chunk(1, b"4568")), Err(ChunkError::Hash(1)));
        assert_eq!(plan.accept(&chunk(3, b"x")), Err(ChunkError::Index(3)));
        assert!(matches!(plan.accept(&chunk(2, b"899")), Err(ChunkError::Length { .. })));
        assert!(matches!(
            plan.accept(&chunk(0, &[0; 4096])),
            Err(ChunkError::Length { found: None, .. })
        ));
        let other = Chunk { sha256: "0".repeat(64), ..chunk(0, b"0123") };
        assert_eq!(plan.accept(&other), Err(ChunkError::OtherBundle));
    }
}
