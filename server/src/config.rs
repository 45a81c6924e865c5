//! Server configuration: a TOML file ([`RawConfig`], unknown keys refused) and command-line
//! overrides, validated into [`Config`]. Every option is in `server/millwright-server.example.toml`.

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
        Ok(Config {
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
