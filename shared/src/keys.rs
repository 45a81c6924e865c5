//! Ed25519 keys, their ids and their file forms.
//!
//! A key id is the first 8 bytes of SHA-256 over the public key, in hex. Key files are small
//! JSON documents so they can be read, diffed and mailed; secret key files hold the 32-byte seed.

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(pub String);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        KeyId(hex::encode(&Sha256::digest(key.as_bytes())[..8]))
    }
}

pub const PUBLIC_KIND: &str = "millwright-public-key";
pub const SECRET_KIND: &str = "millwright-secret-key";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFile {
    pub kind: String,
    pub key_id: KeyId,
    /// Hex of the 32-byte ed25519 public key.
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyFile {
    pub kind: String,
    pub key_id: KeyId,
    /// Hex of the 32-byte ed25519 seed.
    pub secret_key: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KeyError {
    #[error("not a Millwright key file: {0}")]
    Syntax(String),
    #[error("key file kind is {found:?}, expected {expected:?}")]
    Kind { found: String, expected: &'static str },
    #[error("key material is not 32 bytes of hex")]
    Material,
    #[error("key id {stated} does not match the key (its id is {actual})")]
    IdMismatch { stated: KeyId, actual: KeyId },
}

fn bytes32(hex_str: &str) -> Result<[u8; 32], KeyError> {
    hex::decode(hex_str.trim()).ok().and_then(|v| v.try_into().ok()).ok_or(KeyError::Material)
}

impl PublicKeyFile {
    pub fn new(key: &VerifyingKey) -> Self {
        Self {
            kind: PUBLIC_KIND.into(),
            key_id: KeyId::of(key),
            public_key: hex::encode(key.as_bytes()),
        }
    }

    /// Parses and checks a public key file: kind, material and that the id matches the key.
    pub fn parse(text: &str) -> Result<(KeyId, VerifyingKey), KeyError> {
        let file: PublicKeyFile =
            serde_json::from_str(text).map_err(|e| KeyError::Syntax(e.to_string()))?;
        if file.kind != PUBLIC_KIND {
            return Err(KeyError::Kind { found: file.kind, expected: PUBLIC_KIND });
        }
        let key = VerifyingKey::from_bytes(&bytes32(&file.public_key)?)
            .map_err(|_| KeyError::Material)?;
        let actual = KeyId::of(&key);
        if actual != file.key_id {
            return Err(KeyError::IdMismatch { stated: file.key_id, actual });
        }
        Ok((actual, key))
    }
}

impl SecretKeyFile {
    pub fn new(key: &SigningKey) -> Self {
        Self {
            kind: SECRET_KIND.into(),
            key_id: KeyId::of(&key.verifying_key()),
            secret_key: hex::encode(key.to_bytes()),
        }
    }

    pub fn parse(text: &str) -> Result<(KeyId, SigningKey), KeyError> {
        let file: SecretKeyFile =
            serde_json::from_str(text).map_err(|e| KeyError::Syntax(e.to_string()))?;
        if file.kind != SECRET_KIND {
            return Err(KeyError::Kind { found: file.kind, expected: SECRET_KIND });
        }
        let key = SigningKey::from_bytes(&bytes32(&file.secret_key)?);
        let actual = KeyId::of(&key.verifying_key());
        if actual != file.key_id {
            return Err(KeyError::IdMismatch { stated: file.key_id, actual });
        }
        Ok((actual, key))
    }
}

/// The keys a verifier trusts, and how many distinct ones must sign.
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: Vec<(KeyId, VerifyingKey)>,
    threshold: usize,
}

impl TrustedKeys {
    /// `threshold` is clamped to at least 1.
    pub fn new(keys: Vec<(KeyId, VerifyingKey)>, threshold: usize) -> Self {
        Self { keys, threshold: threshold.max(1) }
    }

    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, key)| key)
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.iter().map(|(id, _)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_reject_a_wrong_id() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let secret = serde_json::to_string(&SecretKeyFile::new(&key)).unwrap();
        let (id, parsed) = SecretKeyFile::parse(&secret).unwrap();
        assert_eq!(parsed.to_bytes(), key.to_bytes());
        let public = serde_json::to_string(&PublicKeyFile::new(&key.verifying_key())).unwrap();
        assert_eq!(PublicKeyFile::parse(&public).unwrap().0, id);
        let forged = public.replace(&id.0, "0000000000000000");
        assert!(matches!(PublicKeyFile::parse(&forged), Err(KeyError::IdMismatch { .. })));
        assert!(matches!(PublicKeyFile::parse(&secret), Err(KeyError::Syntax(_))));
    }
}
