//! Server configuration: a TOML file ([`RawConfig`], unknown keys refused) and command-line
//! overrides, validated into [`Config`]. Every option is in `server/millwright-server.example.toml`.

use crate::drift::Policy;
pub use millwright_agent::config::ConfigError;
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
    #[serde(default)]
    pub mqtt: RawMqtt,
    #[serde(default)]
    pub models: RawModels,
    #[serde(default)]
    pub drift: RawFleetDrift,
    pub rollouts: Option<RawRollouts>,
    #[serde(default)]
    pub users: Vec<User>,
}

/// Model rollouts: the fleet's root document and the online key that signs directives.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollouts {
    pub root: PathBuf,
    pub server_key: PathBuf,
    pub directive_ttl_secs: Option<u64>,
    pub chunk_size: Option<u32>,
    pub delivery_bytes_per_sec: Option<u64>,
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

/// An API user: write requests carry `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub token: String,
}

/// Validated `[rollouts]`.
#[derive(Debug, Clone)]
pub struct Rollouts {
    pub root: millwright_shared::trust::Root,
    /// The root document's bytes, republished retained for devices.
    pub root_bytes: Vec<u8>,
    pub server_key: ed25519_dalek::SigningKey,
    pub directive_ttl: std::time::Duration,
    pub chunk_size: u32,
    pub delivery_bytes_per_sec: Option<u64>,
    pub tick: std::time::Duration,
}

pub const DEFAULT_DIRECTIVE_TTL_SECS: u64 = 3600;
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
pub const DEFAULT_TICK_MS: u64 = 1000;

impl RawRollouts {
    fn validate(&self) -> Result<Rollouts, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        let root_bytes = std::fs::read(&self.root)
            .map_err(|source| ConfigError::Read { path: self.root.clone(), source })?;
        let root =
            millwright_shared::trust::Root::provision(&root_bytes, millwright_agent::clock::now())
                .map_err(|e| invalid(format!("rollouts.root {}: {e}", self.root.display())))?;
        let text = std::fs::read_to_string(&self.server_key)
            .map_err(|source| ConfigError::Read { path: self.server_key.clone(), source })?;
        let (id, server_key) = millwright_shared::keys::SecretKeyFile::parse(&text)
            .map_err(|e| invalid(format!("rollouts.server_key: {e}")))?;
        if root.server_keys().is_none_or(|keys| keys.get(&id).is_none()) {
            return Err(invalid(format!(
                "rollouts.server_key {id} is not one of the root's (unrevoked) server keys; devices would refuse its directives"
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
            server_key,
            directive_ttl: std::time::Duration::from_secs(
                self.directive_ttl_secs.unwrap_or(DEFAULT_DIRECTIVE_TTL_SECS).max(60),
            ),
            chunk_size,
            delivery_bytes_per_sec: self.delivery_bytes_per_sec.filter(|b| *b > 0),
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
    External {
        host: String,
        port: u16,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub http_listen: SocketAddr,
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
        let broker = match raw.mqtt.broker {
            Some(url) => {
                let (host, port) = millwright_agent::config::parse_broker(&url)
                    .map_err(|e| ConfigError::Invalid(format!("mqtt.broker: {e}")))?;
                Broker::External { host, port }
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
        let rollouts = raw.rollouts.as_ref().map(RawRollouts::validate).transpose()?;
        for (i, u) in raw.users.iter().enumerate() {
            if u.token.len() < 16 {
                return Err(ConfigError::Invalid(format!(
                    "users[{i}] ({}): the token must be at least 16 characters",
                    u.name
                )));
            }
        }
        Ok(Config {
            rollouts,
            users: raw.users,
            bundles: raw.models.bundles,
            trusted,
            retraining,
            webhook: raw.drift.webhook,
            data_dir: raw.data_dir.unwrap_or_else(|| PathBuf::from("millwright-server-data")),
            http_listen: addr(
                "http_listen",
                raw.http_listen.as_deref().unwrap_or(DEFAULT_HTTP_LISTEN),
            )?,
            broker,
            client_id: raw.mqtt.client_id.unwrap_or_else(|| DEFAULT_CLIENT_ID.to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let raw: RawConfig =
            toml::from_str(include_str!("../millwright-server.example.toml")).unwrap();
        let config = Config::from_raw(raw).unwrap();
        assert_eq!(config.http_listen.port(), 8080);
        assert!(matches!(config.broker, Broker::Embedded(_)));
    }

    #[test]
    fn a_bad_address_is_named() {
        let raw = RawConfig { http_listen: Some("localhost".into()), ..Default::default() };
        let err = Config::from_raw(raw).unwrap_err().to_string();
        assert!(err.contains("http_listen \"localhost\""), "{err}");
    }
}
