//! What `millwright device enroll` writes for a gateway, and what the gateway and the server
//! agree on about it: the files of an identity folder and the enrollment record.
//!
//! | file | what |
//! |---|---|
//! | `identity.json` | [`IdentityFile`]: the device id and its message key's id |
//! | `device.key.json` | the device's ed25519 key: it signs every message the gateway sends |
//! | `device.crt.pem`, `device.tls-key.pem` | its X.509 client certificate (CN = the device id), signed by the fleet CA, and the certificate's key |
//! | `ca.crt.pem` | the fleet CA: the broker's (and the server's HTTPS) certificate must chain to it |
//! | `server.pub.json` | the server's message key: acks and chunks must be signed by it (or by a server key of the root) |
//! | `page.crt.pem`, `page.key.pem` | optional: a certificate for the gateway's local HTTPS page |

use crate::ids::DeviceId;
use crate::keys::KeyId;
use serde::{Deserialize, Serialize};

pub const IDENTITY_FILE: &str = "identity.json";
pub const DEVICE_KEY: &str = "device.key.json";
pub const DEVICE_CERT: &str = "device.crt.pem";
pub const DEVICE_TLS_KEY: &str = "device.tls-key.pem";
pub const CA_CERT: &str = "ca.crt.pem";
pub const SERVER_KEY: &str = "server.pub.json";
pub const PAGE_CERT: &str = "page.crt.pem";
pub const PAGE_KEY: &str = "page.key.pem";

pub const IDENTITY_KIND: &str = "millwright-identity";

/// `identity.json`: which device a folder of credentials belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    pub kind: String,
    pub device: DeviceId,
    /// The id of the key in `device.key.json`.
    pub key_id: KeyId,
    /// SHA-256 of the client certificate's DER, in hex.
    pub cert_sha256: String,
}

/// What the server's registry holds about an enrolled device (`POST /api/v1/enrollments`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    pub device: DeviceId,
    /// Hex of the device's 32-byte ed25519 public key.
    pub public_key: String,
    /// SHA-256 of the client certificate's DER, in hex.
    pub cert_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_class: Option<String>,
}
