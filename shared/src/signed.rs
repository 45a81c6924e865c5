//! Signed MQTT messages. Every message a gateway sends that the server acts on (uplink batches,
//! status, chunk requests) is signed with the gateway's device key, and every message the server
//! sends that a gateway acts on (acks, chunks) with a server key, whatever broker carried it.
//! Directives and root documents are signed envelopes of their own ([`crate::trust::Envelope`]).
//!
//! ```text
//! magic      4 bytes  "MWS1"
//! key id     8 bytes  the first 8 bytes of SHA-256 over the ed25519 public key (see KeyId)
//! signature 64 bytes  ed25519 over DOMAIN | purpose | 0 | device | 0 | body
//! body                the message (JSON)
//! ```
//!
//! The signature covers the device the topic names and the purpose of the message (its topic
//! kind), so nothing signed for one device or purpose verifies for another: a batch replayed on
//! another device's topic, or an ack replayed as a chunk, is refused. Receivers verify before
//! they parse the body.

use crate::ids::DeviceId;
use crate::keys::KeyId;
use crate::wire::Stream;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 4] = b"MWS1";
pub const DOMAIN: &[u8] = b"millwright/message/v1\0";
/// Bytes before the body.
pub const HEADER_BYTES: usize = 4 + 8 + 64;

/// What a signed message is for; part of what is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// A batch of one outbox stream (device → server).
    Uplink(Stream),
    /// The device's status, or its last will (device → server).
    Status,
    /// A chunk request (device → server).
    Fetch,
    /// An acknowledgement of stored records (server → device).
    Ack,
    /// A chunk of a bundle (server → device).
    Chunk,
    /// The MQTT password a device (or the server) presents to the embedded broker.
    Connect,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Uplink(Stream::Predictions) => "up/pred",
            Purpose::Uplink(Stream::Alerts) => "up/alert",
            Purpose::Uplink(Stream::Drift) => "up/drift",
            Purpose::Uplink(Stream::Updates) => "up/update",
            Purpose::Status => "status",
            Purpose::Fetch => "fetch",
            Purpose::Ack => "ack",
            Purpose::Chunk => "chunk",
            Purpose::Connect => "connect",
        }
    }
}

/// Why a signed message was refused. Each is a distinct, named cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignedError {
    #[error("message is not signed (no Millwright signature header)")]
    Unsigned,
    #[error("message is signed by key {0}, which is not the expected signer")]
    WrongKey(KeyIdBytes),
    #[error("signature does not match (wrong signer, device or purpose, or the body was modified)")]
    BadSignature,
}

impl SignedError {
    /// A short label for counters and logs.
    pub fn reason(self) -> &'static str {
        match self {
            SignedError::Unsigned => "unsigned",
            SignedError::WrongKey(_) => "wrong_key",
            SignedError::BadSignature => "bad_signature",
        }
    }
}

/// The raw key id of a frame; prints as the hex [`KeyId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyIdBytes(pub [u8; 8]);

impl KeyIdBytes {
    pub fn of(key: &VerifyingKey) -> KeyIdBytes {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyIdBytes(id)
    }

    pub fn key_id(self) -> KeyId {
        KeyId(hex::encode(self.0))
    }
}

impl std::fmt::Display for KeyIdBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

fn message(purpose: Purpose, device: &DeviceId, body: &[u8]) -> Vec<u8> {
    let (purpose, device) = (purpose.as_str().as_bytes(), device.as_str().as_bytes());
    let mut m = Vec::with_capacity(DOMAIN.len() + purpose.len() + device.len() + 2 + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(purpose);
    m.push(0);
    m.extend_from_slice(device);
    m.push(0);
    m.extend_from_slice(body);
    m
}

/// Signs `body` for `purpose` on the topic of `device`; returns the frame to publish.
pub fn seal(key: &SigningKey, purpose: Purpose, device: &DeviceId, body: &[u8]) -> Vec<u8> {
    let signature = key.sign(&message(purpose, device, body));
    let mut frame = Vec::with_capacity(HEADER_BYTES + body.len());
    frame.extend_from_slice(MAGIC);
    frame.extend_from_slice(&KeyIdBytes::of(&key.verifying_key()).0);
    frame.extend_from_slice(&signature.to_bytes());
    frame.extend_from_slice(body);
    frame
}

/// A frame split into its parts, not yet verified.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub key_id: KeyIdBytes,
    signature: [u8; 64],
    body: &'a [u8],
}

/// Splits a frame; [`SignedError::Unsigned`] if it is not one.
pub fn open(bytes: &[u8]) -> Result<Frame<'_>, SignedError> {
    if bytes.len() < HEADER_BYTES || &bytes[..4] != MAGIC {
        return Err(SignedError::Unsigned);
    }
    let mut key_id = [0u8; 8];
    key_id.copy_from_slice(&bytes[4..12]);
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&bytes[12..HEADER_BYTES]);
    Ok(Frame { key_id: KeyIdBytes(key_id), signature, body: &bytes[HEADER_BYTES..] })
}

impl<'a> Frame<'a> {
    /// The body, if `key` signed it for `purpose` on the topic of `device`.
    pub fn verify(
        &self,
        key: &VerifyingKey,
        purpose: Purpose,
        device: &DeviceId,
    ) -> Result<&'a [u8], SignedError> {
        if KeyIdBytes::of(key) != self.key_id {
            return Err(SignedError::WrongKey(self.key_id));
        }
        key.verify(&message(purpose, device, self.body), &Signature::from_bytes(&self.signature))
            .map_err(|_| SignedError::BadSignature)?;
        Ok(self.body)
    }

    /// The body, if one of `keys` signed it (the signer is found by key id).
    pub fn verify_any<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k VerifyingKey>,
        purpose: Purpose,
        device: &DeviceId,
    ) -> Result<&'a [u8], SignedError> {
        let key = keys
            .into_iter()
            .find(|k| KeyIdBytes::of(k) == self.key_id)
            .ok_or(SignedError::WrongKey(self.key_id))?;
        self.verify(key, purpose, device)
    }
}

/// Opens and verifies in one step.
pub fn verify<'a>(
    bytes: &'a [u8],
    key: &VerifyingKey,
    purpose: Purpose,
    device: &DeviceId,
) -> Result<&'a [u8], SignedError> {
    open(bytes)?.verify(key, purpose, device)
}

/// The MQTT password for the embedded broker: a signature over the client id, in base64.
pub fn connect_password(key: &SigningKey, device: &DeviceId, client_id: &str) -> String {
    use base64::Engine as _;
    let frame = seal(key, Purpose::Connect, device, client_id.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(&frame[..HEADER_BYTES])
}

/// Whether `password` is `device`'s signature over `client_id`.
pub fn check_connect_password(
    key: &VerifyingKey,
    device: &DeviceId,
    client_id: &str,
    password: &str,
) -> Result<(), SignedError> {
    use base64::Engine as _;
    let mut header = base64::engine::general_purpose::STANDARD
        .decode(password.as_bytes())
        .map_err(|_| SignedError::Unsigned)?;
    if header.len() != HEADER_BYTES {
        return Err(SignedError::Unsigned);
    }
    header.extend_from_slice(client_id.as_bytes());
    verify(&header, key, Purpose::Connect, device).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    #[test]
    fn a_sealed_message_verifies_only_for_its_signer_device_and_purpose() {
        let (gw1, gw2) = (DeviceId::new("gw1").unwrap(), DeviceId::new("gw2").unwrap());
        let up = Purpose::Uplink(Stream::Predictions);
        let frame = seal(&key(1), up, &gw1, b"{\"v\":2}");
        let k1 = key(1).verifying_key();
        assert_eq!(verify(&frame, &k1, up, &gw1), Ok(&b"{\"v\":2}"[..]));
        assert_eq!(verify(&frame, &k1, up, &gw2), Err(SignedError::BadSignature));
        assert_eq!(
            verify(&frame, &k1, Purpose::Uplink(Stream::Alerts), &gw1),
            Err(SignedError::BadSignature)
        );
        assert_eq!(verify(&frame, &k1, Purpose::Ack, &gw1), Err(SignedError::BadSignature));
        assert!(matches!(
            verify(&frame, &key(2).verifying_key(), up, &gw1),
            Err(SignedError::WrongKey(_))
        ));
        let mut tampered = frame.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(verify(&tampered, &k1, up, &gw1), Err(SignedError::BadSignature));
        assert_eq!(verify(b"{\"v\":2}", &k1, up, &gw1), Err(SignedError::Unsigned));
        assert_eq!(verify(&frame[..HEADER_BYTES - 1], &k1, up, &gw1), Err(SignedError::Unsigned));
        let keys = [key(3).verifying_key(), k1];
        assert_eq!(open(&frame).unwrap().verify_any(&keys, up, &gw1), Ok(&b"{\"v\":2}"[..]));
        assert_eq!(open(&frame).unwrap().key_id.key_id(), KeyId::of(&k1));
    }

    #[test]
    fn connect_passwords_bind_the_client_id_to_the_device_key() {
        let gw1 = DeviceId::new("gw1").unwrap();
        let password = connect_password(&key(1), &gw1, "millwright-gw1");
        let k1 = key(1).verifying_key();
        assert_eq!(check_connect_password(&k1, &gw1, "millwright-gw1", &password), Ok(()));
        assert!(check_connect_password(&k1, &gw1, "millwright-gw2", &password).is_err());
        let gw2 = DeviceId::new("gw2").unwrap();
        assert!(check_connect_password(&k1, &gw2, "millwright-gw1", &password).is_err());
        assert_eq!(
            check_connect_password(&k1, &gw1, "millwright-gw1", "hunter2"),
            Err(SignedError::Unsigned)
        );
    }
}
