//! The gateway's enrolled credentials, read from the folder `millwright device enroll` wrote
//! (the file names are in `millwright_shared::enrollment`): the device key that signs every
//! message, the client certificate the broker asks for, the fleet CA the broker's certificate
//! must chain to, and the server's message key.

use crate::config::ConfigError;
use ed25519_dalek::{SigningKey, VerifyingKey};
use millwright_io::tls::{self, ClientIdentity};
use millwright_shared::DeviceId;
use millwright_shared::enrollment::{self as files, IDENTITY_KIND, IdentityFile};
use millwright_shared::keys::{KeyId, PublicKeyFile, SecretKeyFile};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Identity {
    pub dir: PathBuf,
    /// Signs every message this gateway sends.
    pub key: SigningKey,
    /// The TLS client certificate and its key.
    pub tls: ClientIdentity,
    /// The fleet CA certificate.
    pub ca: PathBuf,
    /// The server's message key from enrollment; used when the trust root names no server key.
    pub server_key: Option<VerifyingKey>,
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })
}

impl Identity {
    /// Reads and checks the folder: it must be `device`'s, its key must be the one enrolled, and
    /// the certificate files must parse.
    pub fn load(dir: &Path, device: &DeviceId) -> Result<Identity, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(format!("identity {}: {m}", dir.display()));
        let text = read(&dir.join(files::IDENTITY_FILE))?;
        let file: IdentityFile = serde_json::from_str(&text).map_err(|e| {
            invalid(format!("{} is not an identity file: {e}", files::IDENTITY_FILE))
        })?;
        if file.kind != IDENTITY_KIND {
            return Err(invalid(format!("{} has kind {:?}", files::IDENTITY_FILE, file.kind)));
        }
        if &file.device != device {
            return Err(invalid(format!(
                "these credentials are for device {}, this gateway is {device}",
                file.device
            )));
        }
        let (key_id, key) = SecretKeyFile::parse(&read(&dir.join(files::DEVICE_KEY))?)
            .map_err(|e| invalid(format!("{}: {e}", files::DEVICE_KEY)))?;
        if key_id != file.key_id {
            return Err(invalid(format!(
                "{} holds key {key_id}, but key {} was enrolled",
                files::DEVICE_KEY,
                file.key_id
            )));
        }
        let tls = ClientIdentity {
            cert: dir.join(files::DEVICE_CERT),
            key: dir.join(files::DEVICE_TLS_KEY),
        };
        let ca = dir.join(files::CA_CERT);
        tls::certificates(&tls.cert).map_err(|e| invalid(e.to_string()))?;
        tls::private_key(&tls.key).map_err(|e| invalid(e.to_string()))?;
        tls::roots(&ca).map_err(|e| invalid(e.to_string()))?;
        let server_path = dir.join(files::SERVER_KEY);
        let server_key = match server_path.exists() {
            true => Some(
                PublicKeyFile::parse(&read(&server_path)?)
                    .map_err(|e| invalid(format!("{}: {e}", files::SERVER_KEY)))?
                    .1,
            ),
            false => None,
        };
        Ok(Identity { dir: dir.to_owned(), key, tls, ca, server_key })
    }

    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.key.verifying_key())
    }
}
