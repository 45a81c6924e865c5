//! Server configuration: a TOML file ([`RawConfig`], unknown keys refused) and command-line
//! overrides, validated into [`Config`]. Every option is in `server/millwright-server.example.toml`.

use crate::drift::Policy;
use ed25519_dalek::SigningKey;
pub use millwright_agent::config::ConfigError;
use millwright_io::tls;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MQTT_LISTEN: &str = "127.0.0.1:1883";
pub const DEFAULT_CLIENT_ID: &str = "millwright-server";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub data_dir: Option<PathBuf>,
    pub http_listen: Option<String>,
    /// Plaintext listeners on non-loopback addresses (HTTP, the embedded broker) and a plain
    /// `mqtt://` external broker off this host are refused unless this is true.
    #[serde(default)]
    pub allow_plaintext: bool,
    pub identity: Option<RawIdentity>,
    #[serde(default)]
    pub mqtt: RawMqtt,
    #[serde(default)]
    pub models: RawModels,
    #[serde(default)]
    pub drift: RawFleetDrift,
    pub rollouts: Option<RawRollouts>,
    #[serde(default)]
    pub retention: crate::retention::RawPolicy,
    #[serde(default)]
    pub users: Vec<User>,
}

/// The server's credentials: the key that signs what it sends gateways, and its TLS material.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    /// The online key that signs acks, chunks and directives (`millwright keygen`); with
    /// `[rollouts]` it must be one of the root's server keys.
    pub server_key: PathBuf,
    /// The fleet CA certificate (`millwright ca create`): gateways' client certificates and an
    /// external broker's certificate must chain to it.
    pub ca: Option<PathBuf>,
    /// This server's certificate and key (`millwright ca server-cert`): HTTPS, the embedded
    /// broker's TLS listener, and the client certificate of its own broker connection.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Where to keep a Mosquitto ACL file generated from the device registry, rewritten on every
    /// enrollment and revocation (see `millwright broker mosquitto-config`).
    pub mosquitto_acl: Option<PathBuf>,
    /// A command run after the ACL file changed, e.g. `systemctl reload mosquitto`.
    pub mosquitto_reload: Option<String>,
    /// Topic filters every device may also read there, e.g. the sensor topics of MQTT-fed
    /// assets on the same broker.
    #[serde(default)]
    pub mosquitto_device_reads: Vec<String>,
}

/// Model rollouts: the fleet's root document (directives are signed with `[identity]
/// server_key`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollouts {
    pub root: PathBuf,
    pub directive_ttl_secs: Option<u64>,
    pub chunk_size: Option<u32>,
    pub delivery_bytes_per_sec: Option<u64>,
    pub fleet_delivery_bytes_per_sec: Option<u64>,
    pub tick_ms: Option<u64>,
}

/// Who may change things through the API, and how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

/// An API user: requests carry `Authorization: Bearer <token>`; the config holds only the
/// token's SHA-256 (`millwright user add` prints a new token once).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// Hex of SHA-256 over the token.
    pub token_sha256: String,
}

/// Validated `[identity]`.
#[derive(Debug, Clone)]
pub struct Identity {
    pub server_key: SigningKey,
    /// CA, certificate and key: TLS is on for every listener and for the broker connection.
    pub tls: Option<TlsFiles>,
    pub mosquitto_acl: Option<PathBuf>,
    pub mosquitto_reload: Option<String>,
    pub mosquitto_device_reads: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl RawIdentity {
    fn validate(&self) -> Result<Identity, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        let text = std::fs::read_to_string(&self.server_key)
            .map_err(|source| ConfigError::Read { path: self.server_key.clone(), source })?;
        let (_, server_key) = millwright_shared::keys::SecretKeyFile::parse(&text)
            .map_err(|e| invalid(format!("identity.server_key: {e}")))?;
        let tls = match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => {
                let check = |e: tls::TlsError| invalid(format!("identity: {e}"));
                tls::roots(ca).map_err(check)?;
                tls::certificates(cert).map_err(check)?;
                tls::private_key(key).map_err(check)?;
                Some(TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() })
            }
            (None, None, None) => None,
            _ => {
                return Err(invalid(
                    "identity: give ca, cert and key together (TLS), or none of them".into(),
                ));
            }
        };
        Ok(Identity {
            server_key,
            tls,
            mosquitto_acl: self.mosquitto_acl.clone(),
            mosquitto_reload: self.mosquitto_reload.clone(),
            mosquitto_device_reads: self.mosquitto_device_reads.clone(),
        })
    }
}

/// Validated `[rollouts]`.
#[derive(Debug, Clone)]
pub struct Rollouts {
    pub root: millwright_shared::trust::Root,
    /// The root document's bytes, republished retained for devices.
    pub root_bytes: Vec<u8>,
    /// The root in force has expired: the server starts (and says so) so a newer one can be
    /// installed, but registrations are refused.
    pub root_expired: bool,
    pub server_key: SigningKey,
    pub directive_ttl: std::time::Duration,
    pub chunk_size: u32,
    pub delivery_bytes_per_sec: Option<u64>,
    /// All chunks to all devices together, at most this many bytes per second (`None`:
    /// unpaced); acks share the server's MQTT connection with them.
    pub fleet_delivery_bytes_per_sec: Option<u64>,
    pub tick: std::time::Duration,
}

pub const DEFAULT_DIRECTIVE_TTL_SECS: u64 = 3600;
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
pub const DEFAULT_TICK_MS: u64 = 1000;
/// 8 MiB/s of chunks (~128 a second at the default chunk size): a wave of 800 gateways takes
/// a 320 KiB bundle in ~30 s, and the server's link keeps room for the fleet's acks.
pub const DEFAULT_FLEET_DELIVERY_BYTES_PER_SEC: u64 = 8 << 20;

impl RawRollouts {
    fn validate(&self, server_key: &SigningKey) -> Result<Rollouts, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        let root_bytes = std::fs::read(&self.root)
            .map_err(|source| ConfigError::Read { path: self.root.clone(), source })?;
        let root = millwright_shared::trust::Root::provision_expired_too(&root_bytes)
            .map_err(|e| invalid(format!("rollouts.root {}: {e}", self.root.display())))?;
        let root_expired = root.is_expired(millwright_io::clock::now());
        let id = millwright_shared::keys::KeyId::of(&server_key.verifying_key());
        if root.server_keys().is_none_or(|keys| keys.get(&id).is_none()) {
            return Err(invalid(format!(
                "identity.server_key {id} is not one of the root's (unrevoked) server keys; devices would refuse its directives"
            )));
        }
        let chunk_size = self.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
        if !(1024..=1 << 20).contains(&chunk_size) {
            return Err(invalid(format!(
                "rollouts.chunk_size {chunk_size} is not within 1 KiB..1 MiB"
            )));
        }
        Ok(Rollouts {
            root,
            root_bytes,
            root_expired,
            server_key: server_key.clone(),
            directive_ttl: std::time::Duration::from_secs(
                self.directive_ttl_secs.unwrap_or(DEFAULT_DIRECTIVE_TTL_SECS).max(60),
            ),
            chunk_size,
            delivery_bytes_per_sec: self.delivery_bytes_per_sec.filter(|b| *b > 0),
            fleet_delivery_bytes_per_sec: Some(
                self.fleet_delivery_bytes_per_sec.unwrap_or(DEFAULT_FLEET_DELIVERY_BYTES_PER_SEC),
            )
            .filter(|b| *b > 0),
            tick: std::time::Duration::from_millis(self.tick_ms.unwrap_or(DEFAULT_TICK_MS).max(50)),
        })
    }
}

/// Bundles whose manifests the server knows (for drift reference profiles).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModels {
    #[serde(default)]
    pub bundles: Vec<PathBuf>,
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    pub threshold: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleetDrift {
    pub persist_reports: Option<usize>,
    pub min_devices: Option<usize>,
    pub webhook: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    /// Address of the embedded broker; ignored when `broker` is set.
    pub embedded_listen: Option<String>,
    /// An external broker (`host:port` or `mqtt://host:port`) instead of the embedded one.
    pub broker: Option<String>,
    pub client_id: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Broker {
    /// Start rumqttd in-process on this address and connect to it.
    Embedded(SocketAddr),
    External(millwright_agent::config::BrokerAddress),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub http_listen: SocketAddr,
    pub identity: Identity,
    pub broker: Broker,
    pub client_id: String,
    /// Signed bundles to read reference profiles from, and the keys that must sign them.
    pub bundles: Vec<PathBuf>,
    pub trusted: Option<millwright_shared::keys::TrustedKeys>,
    pub retraining: Policy,
    /// POSTed every retraining event as JSON, if set.
    pub webhook: Option<String>,
    /// Model registry and rollouts, when a root and server key are configured.
    pub rollouts: Option<Rollouts>,
    /// How long what gateways send is kept ([`crate::retention`]).
    pub retention: crate::retention::Policy,
    pub users: Vec<User>,
}

impl RawConfig {
    pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Syntax { path: path.to_owned(), message: e.to_string() })
    }
}

fn addr(name: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::Invalid(format!("{name} {value:?} is not an ip:port address")))
}

impl Config {
    pub fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let http_listen =
            addr("http_listen", raw.http_listen.as_deref().unwrap_or(DEFAULT_HTTP_LISTEN))?;
        let identity = match &raw.identity {
            Some(i) => i.validate()?,
            None => {
                return Err(ConfigError::Invalid(
                    "no [identity]: the server needs its signing key (identity.server_key, made \
                     by `millwright keygen`) and, off loopback, its TLS files (identity.ca, cert, \
                     key, made by `millwright ca`)"
                        .into(),
                ));
            }
        };
        let plaintext = |what: &str, addr: &SocketAddr| {
            if identity.tls.is_some() || addr.ip().is_loopback() || raw.allow_plaintext {
                return Ok(());
            }
            Err(ConfigError::Invalid(format!(
                "{what} {addr} is off this host but [identity] has no TLS certificate: \
                 everything would cross the network in clear. Give identity.ca, cert and key, \
                 listen on 127.0.0.1, or set allow_plaintext = true"
            )))
        };
        let broker = match raw.mqtt.broker {
            Some(url) => {
                let address = millwright_agent::config::parse_broker(&url)
                    .map_err(|e| ConfigError::Invalid(format!("mqtt.{e}")))?;
                millwright_agent::config::check_plaintext(&address, raw.allow_plaintext)?;
                if address.tls && identity.tls.is_none() {
                    return Err(ConfigError::Invalid(
                        "mqtt.broker is mqtts:// but [identity] has no ca, cert and key".into(),
                    ));
                }
                Broker::External(address)
            }
            None if cfg!(feature = "embedded-broker") => Broker::Embedded(addr(
                "mqtt.embedded_listen",
                raw.mqtt.embedded_listen.as_deref().unwrap_or(DEFAULT_MQTT_LISTEN),
            )?),
            None => {
                return Err(ConfigError::Invalid(
                    "this build has no embedded broker; set mqtt.broker".into(),
                ));
            }
        };
        let trusted = if raw.models.bundles.is_empty() {
            None
        } else if raw.models.trusted_keys.is_empty() {
            return Err(ConfigError::Invalid(
                "models.bundles needs models.trusted_keys to verify them".into(),
            ));
        } else {
            Some(millwright_agent::config::load_trusted(
                &raw.models.trusted_keys,
                raw.models.threshold.unwrap_or(1),
            )?)
        };
        if let Some(url) = &raw.drift.webhook
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "drift.webhook {url:?} is not an http(s) URL"
            )));
        }
        let defaults = Policy::default();
        let retraining = Policy {
            persist_reports: raw.drift.persist_reports.unwrap_or(defaults.persist_reports).max(1),
            min_devices: raw.drift.min_devices.unwrap_or(defaults.min_devices).max(1),
        };
        let rollouts =
            raw.rollouts.as_ref().map(|r| r.validate(&identity.server_key)).transpose()?;
        let retention = raw.retention.validate().map_err(ConfigError::Invalid)?;
        for (i, u) in raw.users.iter().enumerate() {
            let hex64 = u.token_sha256.len() == 64 && hex::decode(&u.token_sha256).is_ok();
            if !hex64 {
                return Err(ConfigError::Invalid(format!(
                    "users[{i}] ({}): token_sha256 must be the 64 hex digits `millwright user add` prints",
                    u.name
                )));
            }
        }
        plaintext("http_listen", &http_listen)?;
        if let Broker::Embedded(listen) = &broker {
            plaintext("mqtt.embedded_listen", listen)?;
        }
        Ok(Config {
            identity,
            rollouts,
            retention,
            users: raw.users,
            bundles: raw.models.bundles,
            trusted,
            retraining,
            webhook: raw.drift.webhook,
            data_dir: raw.data_dir.unwrap_or_else(|| PathBuf::from("millwright-server-data")),
            http_listen,
            broker,
            client_id: raw.mqtt.client_id.unwrap_or_else(|| DEFAULT_CLIENT_ID.to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_identity(dir: &Path, mut raw: RawConfig) -> RawConfig {
        let key = dir.join("server.secret.json");
        let secret = millwright_shared::keys::SecretKeyFile::new(&SigningKey::from_bytes(&[7; 32]));
        std::fs::write(&key, serde_json::to_vec(&secret).unwrap()).unwrap();
        raw.identity = Some(RawIdentity { server_key: key, ..Default::default() });
        raw
    }

    #[test]
    fn the_example_config_is_valid() {
        let raw: RawConfig =
            toml::from_str(include_str!("../millwright-server.example.toml")).unwrap();
        assert!(raw.identity.is_some());
        let dir = tempfile::tempdir().unwrap();
        let raw = RawConfig { identity: None, ..raw };
        let config = Config::from_raw(with_identity(dir.path(), raw)).unwrap();
        assert_eq!(config.http_listen.port(), 8080);
        assert!(matches!(config.broker, Broker::Embedded(_)));
    }

    #[test]
    fn a_bad_address_is_named_and_plaintext_off_loopback_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let raw = RawConfig { http_listen: Some("localhost".into()), ..Default::default() };
        let err = Config::from_raw(with_identity(dir.path(), raw)).unwrap_err().to_string();
        assert!(err.contains("http_listen \"localhost\""), "{err}");
        let err = Config::from_raw(RawConfig::default()).unwrap_err().to_string();
        assert!(err.contains("no [identity]"), "{err}");
        let open = || RawConfig { http_listen: Some("0.0.0.0:8080".into()), ..Default::default() };
        let err = Config::from_raw(with_identity(dir.path(), open())).unwrap_err().to_string();
        assert!(
            err.contains("http_listen 0.0.0.0:8080") && err.contains("allow_plaintext"),
            "{err}"
        );
        let allowed = RawConfig { allow_plaintext: true, ..open() };
        assert!(Config::from_raw(with_identity(dir.path(), allowed)).is_ok());
        let mqtt = RawConfig {
            mqtt: RawMqtt { broker: Some("mqtt://10.1.2.3:1883".into()), ..Default::default() },
            ..Default::default()
        };
        let err = Config::from_raw(with_identity(dir.path(), mqtt)).unwrap_err().to_string();
        assert!(err.contains("mqtts://") && err.contains("allow_plaintext"), "{err}");
    }
}
