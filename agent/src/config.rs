//! Agent configuration in two stages: [`RawConfig`] is the TOML file as written (unknown keys
//! refused); [`Config`] is validated, with paths resolved against the file's folder and the
//! trusted keys read. Every option and its default is in `agent/millwright-agent.example.toml`.

use crate::identity::Identity;
use crate::quota::Quota;
use crate::sources::registers::{Order, Register, Table, ValueType};
use crate::uplink;
use millwright_shared::drift::{DriftSettings, Metric};
use millwright_shared::keys::{PublicKeyFile, TrustedKeys};
use millwright_shared::trust::Root;
use millwright_shared::{AssetId, DeviceId};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_BROKER_PORT: u16 = 1883;
pub const DEFAULT_TLS_BROKER_PORT: u16 = 8883;
pub const DEFAULT_KEEP_ALIVE_SECS: u64 = 10;
pub const DEFAULT_BATCH_MAX: usize = 500;
pub const DEFAULT_MAX_INFLIGHT: usize = 4;
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 10;
/// The group commit's window. Each commit rewrites a few WAL pages, so this sets most of a busy
/// gateway's SD-card wear: measured with 15 assets, 1.1 GiB/h at 50 ms, 0.2 GiB/h at 1 s
/// (`tests/tests/e2e/wear.rs`). Records are not acknowledged to anyone before their commit.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_FLUSH_MAX_RECORDS: usize = 1000;
pub const DEFAULT_RECONNECT_MAX_SECS: u64 = 30;
pub const DEFAULT_CYCLES_PER_SECOND: f64 = 1.0;
pub const DEFAULT_MODBUS_PORT: u16 = 502;
pub const DEFAULT_MODBUS_UNIT_ID: u8 = 1;
pub const DEFAULT_MODBUS_POLL_MS: u64 = 1000;
pub const DEFAULT_MODBUS_TIMEOUT_MS: u64 = 1000;
/// Polling faster than this is refused: a PLC's scan cycle is rarely shorter.
pub const MIN_MODBUS_POLL_MS: u64 = 10;
pub const DEFAULT_DRIFT_INTERVAL_SECS: u64 = 3600;
pub const DEFAULT_MAX_BUNDLE_BYTES: u64 = 64 << 20;
pub const DEFAULT_FETCH_WINDOW: u32 = 4;
pub const DEFAULT_FETCH_TIMEOUT_SECS: u64 = 10;
/// The address the sample config and `millwright-agent status` use for the local page.
pub const DEFAULT_LOCAL_LISTEN: &str = "127.0.0.1:8090";
pub const MIN_PIN_LEN: usize = 4;
pub const MAX_PIN_LEN: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub device: String,
    /// The plant or site the gateway belongs to; drift is aggregated per site.
    pub site: Option<String>,
    /// Free-form labels a rollout can target (e.g. "line-3", "pilot").
    #[serde(default)]
    pub tags: Vec<String>,
    /// The hardware class model bundles may be restricted to (default: the CPU architecture).
    pub device_class: Option<String>,
    pub data_dir: PathBuf,
    /// How often `status.json` is rewritten (default 10 s; the page and its API are live).
    pub status_file_secs: Option<u64>,
    /// Plaintext on the network (an `mqtt://` broker off this host, a local page on a
    /// non-loopback address without a certificate) is refused unless this is true.
    #[serde(default)]
    pub allow_plaintext: bool,
    pub identity: Option<RawIdentity>,
    pub uplink: RawUplink,
    pub trust: RawTrust,
    #[serde(default)]
    pub updates: RawUpdates,
    #[serde(default)]
    pub drift: RawDrift,
    #[serde(default)]
    pub local: RawLocal,
    #[serde(default)]
    pub outbox: RawOutbox,
    #[serde(default)]
    pub assets: Vec<RawAsset>,
}

/// The outbox quota ([`crate::quota`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbox {
    pub max_bytes: Option<u64>,
    pub reserve_bytes: Option<u64>,
}

impl RawOutbox {
    pub fn quota(&self) -> Result<Quota, ConfigError> {
        let q = Quota {
            max_bytes: self.max_bytes.unwrap_or(Quota::DEFAULT.max_bytes),
            reserve_bytes: self.reserve_bytes.unwrap_or(Quota::DEFAULT.reserve_bytes),
        };
        if q.max_bytes < 64 << 10 || q.reserve_bytes >= q.max_bytes {
            return Err(ConfigError::Invalid(format!(
                "outbox: need max_bytes ({}) >= 65536 and reserve_bytes ({}) < max_bytes",
                q.max_bytes, q.reserve_bytes
            )));
        }
        Ok(q)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDrift {
    pub interval_secs: Option<u64>,
    pub min_samples: Option<u64>,
    pub metric: Option<Metric>,
    pub warn: Option<f64>,
    pub drift: Option<f64>,
    pub hysteresis: Option<f64>,
    pub out_of_range_share: Option<f64>,
    pub out_of_range_drift: Option<f64>,
}

impl RawDrift {
    /// Settings with the metric's conventional thresholds where none are given.
    pub fn settings(&self) -> Result<DriftSettings, ConfigError> {
        let mut s = DriftSettings::for_metric(self.metric.unwrap_or(Metric::Shift));
        s.min_samples = self.min_samples.unwrap_or(s.min_samples).max(1);
        s.warn = self.warn.unwrap_or(s.warn);
        s.drift = self.drift.unwrap_or(s.drift);
        s.hysteresis = self.hysteresis.unwrap_or(s.hysteresis);
        s.out_of_range_share = self.out_of_range_share.unwrap_or(s.out_of_range_share);
        s.out_of_range_drift = self.out_of_range_drift.unwrap_or(s.out_of_range_drift);
        let finite = [s.warn, s.drift, s.hysteresis, s.out_of_range_share, s.out_of_range_drift]
            .iter()
            .all(|v| v.is_finite());
        if !finite || s.warn <= 0.0 || s.drift < s.warn || s.hysteresis < 0.0 {
            return Err(ConfigError::Invalid(format!(
                "drift: need 0 < warn ({}) <= drift ({}) and hysteresis ({}) >= 0",
                s.warn, s.drift, s.hysteresis
            )));
        }
        Ok(s)
    }
}

/// The folder of credentials `millwright device enroll` wrote for this gateway.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub dir: PathBuf,
}

/// The operator's local page (off unless `listen` is set).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocal {
    pub listen: Option<String>,
    pub operator_pin: Option<String>,
    /// A certificate and key for HTTPS (e.g. the `page.crt.pem` / `page.key.pem` enrollment
    /// wrote with `--page-host`); without them the page is plain HTTP.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl RawLocal {
    pub fn resolve(&self, base: &Path, allow_plaintext: bool) -> Result<LocalConfig, ConfigError> {
        let listen = match &self.listen {
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                ConfigError::Invalid(format!(
                    "local.listen {text:?} is not an address:port such as \"127.0.0.1:8090\""
                ))
            })?),
            None => None,
        };
        if let Some(pin) = &self.operator_pin {
            let len = pin.chars().count();
            if !(MIN_PIN_LEN..=MAX_PIN_LEN).contains(&len) || pin.chars().any(char::is_whitespace) {
                return Err(ConfigError::Invalid(format!(
                    "local.operator_pin must be {MIN_PIN_LEN} to {MAX_PIN_LEN} characters without spaces"
                )));
            }
        }
        let tls = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((base.join(cert), base.join(key))),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "local: give both cert and key for HTTPS, or neither".into(),
                ));
            }
        };
        if let Some(addr) = listen
            && tls.is_none()
            && !addr.ip().is_loopback()
            && !allow_plaintext
        {
            return Err(ConfigError::Invalid(format!(
                "local.listen {addr} is off this host but the page has no certificate: the \
                 operator PIN would cross the network in clear. Give [local] cert and key \
                 (millwright device enroll --page-host), listen on 127.0.0.1, or set \
                 allow_plaintext = true"
            )));
        }
        Ok(LocalConfig { listen, operator_pin: self.operator_pin.clone(), tls })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUplink {
    pub broker: String,
    pub client_id: Option<String>,
    pub keep_alive_secs: Option<u64>,
    pub batch_max: Option<usize>,
    pub max_inflight: Option<usize>,
    pub retry_after_secs: Option<u64>,
    pub flush_interval_ms: Option<u64>,
    pub flush_max_records: Option<usize>,
    pub reconnect_max_secs: Option<u64>,
    /// Predictions and drift reports sent per second at most while a backlog drains.
    pub drain_records_per_sec: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrust {
    /// The fleet's signed root document; it names the release and server keys.
    pub root: Option<PathBuf>,
    /// Without a root: bare release keys (no server may direct updates).
    #[serde(default)]
    pub keys: Vec<PathBuf>,
    pub threshold: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpdates {
    pub max_bundle_bytes: Option<u64>,
    pub fetch_window: Option<u32>,
    pub fetch_timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAsset {
    pub id: String,
    pub asset_type: String,
    pub bundle: PathBuf,
    pub source: RawSource,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawSource {
    Cmapss {
        path: PathBuf,
        unit: u32,
        cycles_per_second: Option<f64>,
    },
    Mqtt {
        topic: String,
    },
    Modbus {
        address: String,
        unit_id: Option<u8>,
        poll_ms: Option<u64>,
        timeout_ms: Option<u64>,
        /// Feature name → where its value is.
        registers: BTreeMap<String, RawRegister>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegister {
    pub table: Option<Table>,
    pub address: u16,
    #[serde(rename = "type")]
    pub value_type: ValueType,
    pub word_order: Option<Order>,
    pub byte_order: Option<Order>,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    /// For a bool packed in a register: which bit (0-15).
    pub bit: Option<u8>,
    /// The unit the scaled value is in; checked against the model's, when both say.
    pub unit: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub device: DeviceId,
    pub identity: Identity,
    pub site: Option<String>,
    pub tags: Vec<String>,
    pub device_class: String,
    pub data_dir: PathBuf,
    pub status_file_every: Duration,
    pub drift: DriftConfig,
    pub uplink: UplinkConfig,
    /// The provisioned trust root (a newer one may be stored in the data directory).
    pub root: Root,
    pub updates: UpdatesConfig,
    pub local: LocalConfig,
    pub quota: Quota,
    pub assets: Vec<AssetConfig>,
}

/// The local page: where it listens (none: off), the PIN that acknowledges alerts (none:
/// acknowledging is refused) and its HTTPS certificate and key (none: plain HTTP).
#[derive(Debug, Clone, Default)]
pub struct LocalConfig {
    pub listen: Option<SocketAddr>,
    pub operator_pin: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct UpdatesConfig {
    /// The largest bundle a directive may ask this device to download.
    pub max_bundle_bytes: u64,
    /// Chunks requested at a time.
    pub fetch_window: u32,
    /// A request without an answer this long is made again.
    pub fetch_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct UplinkConfig {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS with this gateway's client certificate.
    pub tls: bool,
    pub client_id: String,
    pub keep_alive: Duration,
    pub settings: uplink::Settings,
    pub flush_interval: Duration,
    pub flush_max_records: usize,
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone)]
pub struct DriftConfig {
    /// How often each asset closes a drift interval and sends its report.
    pub interval: Duration,
    pub settings: DriftSettings,
}

#[derive(Debug, Clone)]
pub struct AssetConfig {
    pub id: AssetId,
    pub asset_type: String,
    pub bundle: PathBuf,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Replays one unit of a C-MAPSS file; `cycles_per_second <= 0` means as fast as possible.
    Cmapss { path: PathBuf, unit: u32, cycles_per_second: f64 },
    /// JSON readings on a topic of the uplink broker.
    Mqtt { topic: String },
    /// A PLC polled over Modbus TCP.
    Modbus(ModbusConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModbusConfig {
    /// `host:port`.
    pub address: String,
    pub unit_id: u8,
    pub poll: Duration,
    pub timeout: Duration,
    /// Feature name → its register and, if given, its unit.
    pub registers: BTreeMap<String, (Register, Option<String>)>,
}

fn modbus_config(
    id: &AssetId,
    address: String,
    unit_id: Option<u8>,
    poll_ms: Option<u64>,
    timeout_ms: Option<u64>,
    registers: BTreeMap<String, RawRegister>,
) -> Result<ModbusConfig, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(format!("asset {id}: {m}"));
    let address = match address.rsplit_once(':') {
        _ if address.parse::<SocketAddr>().is_ok() => address,
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            port.parse::<u16>()
                .map_err(|_| invalid(format!("Modbus address {address:?}: bad port")))?;
            address
        }
        None if !address.is_empty() => format!("{address}:{DEFAULT_MODBUS_PORT}"),
        _ => return Err(invalid(format!("Modbus address {address:?} is not host:port"))),
    };
    let poll_ms = poll_ms.unwrap_or(DEFAULT_MODBUS_POLL_MS);
    if poll_ms < MIN_MODBUS_POLL_MS {
        return Err(invalid(format!("poll_ms must be at least {MIN_MODBUS_POLL_MS}")));
    }
    if registers.is_empty() {
        return Err(invalid("a Modbus source needs at least one register".into()));
    }
    let registers = registers
        .into_iter()
        .map(|(feature, r)| {
            let register = Register {
                table: r.table.unwrap_or(Table::Holding),
                address: r.address,
                value_type: r.value_type,
                word_order: r.word_order.unwrap_or_default(),
                byte_order: r.byte_order.unwrap_or_default(),
                scale: r.scale.unwrap_or(1.0),
                offset: r.offset.unwrap_or(0.0),
                bit: r.bit,
            };
            register.check().map_err(|e| invalid(format!("register {feature:?}: {e}")))?;
            Ok((feature, (register, r.unit)))
        })
        .collect::<Result<_, ConfigError>>()?;
    Ok(ModbusConfig {
        address,
        unit_id: unit_id.unwrap_or(DEFAULT_MODBUS_UNIT_ID),
        poll: Duration::from_millis(poll_ms),
        timeout: Duration::from_millis(timeout_ms.unwrap_or(DEFAULT_MODBUS_TIMEOUT_MS).max(1)),
        registers,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// A broker address: `mqtts://host:port` (TLS, port 8883 by default), or `mqtt://host:port` /
/// `host:port` (plain TCP, port 1883 by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerAddress {
    /// Whether plain TCP to it stays on this host.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

pub fn parse_broker(broker: &str) -> Result<BrokerAddress, ConfigError> {
    let (tls, rest) = match broker.strip_prefix("mqtts://") {
        Some(rest) => (true, rest),
        None => (false, broker.strip_prefix("mqtt://").unwrap_or(broker)),
    };
    let bad = || ConfigError::Invalid(format!("broker {broker:?} is not [mqtts://]host:port"));
    let default_port = if tls { DEFAULT_TLS_BROKER_PORT } else { DEFAULT_BROKER_PORT };
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (host, port.parse::<u16>().map_err(|_| bad())?),
        None => (rest, default_port),
    };
    if host.is_empty() || host.contains('/') {
        return Err(bad());
    }
    Ok(BrokerAddress { host: host.to_owned(), port, tls })
}

/// Refuses plain TCP to a broker off this host unless plaintext is allowed.
pub fn check_plaintext(broker: &BrokerAddress, allow_plaintext: bool) -> Result<(), ConfigError> {
    if broker.tls || broker.is_loopback() || allow_plaintext {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!(
        "broker {}:{} is off this host and not mqtts://: messages (and the broker password) \
         would cross the network in clear. Use mqtts://, or set allow_plaintext = true",
        broker.host, broker.port
    )))
}

/// Reads the public key files a verifier trusts; `threshold` distinct ones must sign.
pub fn load_trusted(paths: &[PathBuf], threshold: usize) -> Result<TrustedKeys, ConfigError> {
    let mut keys = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        keys.push(
            PublicKeyFile::parse(&text).map_err(|e| {
                ConfigError::Invalid(format!("trusted key {}: {e}", path.display()))
            })?,
        );
    }
    Ok(TrustedKeys::new(keys, threshold))
}

/// Reads and checks a root document (signed by a threshold of its own root keys). An expired
/// one is returned too: the gateway may have accepted a newer root since, and the runtime
/// decides (see `runtime::current_root`).
pub fn load_root(path: &Path) -> Result<Root, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    Root::provision_expired_too(&bytes)
        .map_err(|e| ConfigError::Invalid(format!("trust root {}: {e}", path.display())))
}

/// Free text the gateway sends as a label: printable and short enough to be stored as sent.
fn check_label(what: &str, text: String) -> Result<String, ConfigError> {
    let clean =
        millwright_shared::wire::clean_text(&text, millwright_shared::wire::MAX_LABEL_BYTES);
    if clean != text || text.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{what} {text:?} must be 1-{} bytes of printable text",
            millwright_shared::wire::MAX_LABEL_BYTES
        )));
    }
    Ok(text)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let raw: RawConfig = toml::from_str(&text)
            .map_err(|e| ConfigError::Syntax { path: path.to_owned(), message: e.to_string() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_raw(raw, base)
    }

    pub fn from_raw(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        let device = DeviceId::new(raw.device).map_err(|e| invalid(e.to_string()))?;
        let broker =
            parse_broker(&raw.uplink.broker).map_err(|e| invalid(format!("uplink.{e}")))?;
        check_plaintext(&broker, raw.allow_plaintext)?;
        let local = raw.local.resolve(base, raw.allow_plaintext)?;
        let u = &raw.uplink;
        let settings = uplink::Settings {
            batch_max: u.batch_max.unwrap_or(DEFAULT_BATCH_MAX),
            max_inflight: u.max_inflight.unwrap_or(DEFAULT_MAX_INFLIGHT),
            retry_after_ms: 1000 * u.retry_after_secs.unwrap_or(DEFAULT_RETRY_AFTER_SECS) as i64,
            drain_per_sec: u.drain_records_per_sec,
        };
        if settings.drain_per_sec == Some(0) {
            return Err(invalid(
                "uplink.drain_records_per_sec must be at least 1 (leave it out for no limit)"
                    .into(),
            ));
        }
        if settings.batch_max == 0 || settings.max_inflight == 0 {
            return Err(invalid(
                "uplink.batch_max and uplink.max_inflight must be at least 1".into(),
            ));
        }
        let uplink = UplinkConfig {
            host: broker.host,
            port: broker.port,
            tls: broker.tls,
            client_id: u.client_id.clone().unwrap_or_else(|| format!("millwright-{device}")),
            keep_alive: Duration::from_secs(
                u.keep_alive_secs.unwrap_or(DEFAULT_KEEP_ALIVE_SECS).max(1),
            ),
            settings,
            flush_interval: Duration::from_millis(
                u.flush_interval_ms.unwrap_or(DEFAULT_FLUSH_INTERVAL_MS).max(1),
            ),
            flush_max_records: u.flush_max_records.unwrap_or(DEFAULT_FLUSH_MAX_RECORDS).max(1),
            reconnect_max: Duration::from_secs(
                u.reconnect_max_secs.unwrap_or(DEFAULT_RECONNECT_MAX_SECS).max(1),
            ),
        };
        let root = match (&raw.trust.root, raw.trust.keys.is_empty()) {
            (Some(path), true) => load_root(&base.join(path))?,
            (None, false) => {
                let keys: Vec<PathBuf> = raw.trust.keys.iter().map(|k| base.join(k)).collect();
                Root::from_release_keys(load_trusted(&keys, raw.trust.threshold.unwrap_or(1))?)
            }
            (Some(_), false) => {
                return Err(invalid(
                    "trust: give either root (a root document) or keys, not both".into(),
                ));
            }
            (None, true) => {
                return Err(invalid(
                    "trust: give root (the fleet's root document) or keys (release public key files)"
                        .into(),
                ));
            }
        };
        let up = &raw.updates;
        let updates = UpdatesConfig {
            max_bundle_bytes: up.max_bundle_bytes.unwrap_or(DEFAULT_MAX_BUNDLE_BYTES),
            fetch_window: up.fetch_window.unwrap_or(DEFAULT_FETCH_WINDOW).clamp(1, 16),
            fetch_timeout: Duration::from_secs(
                up.fetch_timeout_secs.unwrap_or(DEFAULT_FETCH_TIMEOUT_SECS).max(1),
            ),
        };
        let mut assets: Vec<AssetConfig> = Vec::new();
        for a in raw.assets {
            let id = AssetId::new(a.id).map_err(|e| invalid(e.to_string()))?;
            if assets.iter().any(|b| b.id == id) {
                return Err(invalid(format!("asset {id} is configured twice")));
            }
            let source = match a.source {
                RawSource::Cmapss { path, unit, cycles_per_second } => Source::Cmapss {
                    path: base.join(path),
                    unit,
                    cycles_per_second: cycles_per_second.unwrap_or(DEFAULT_CYCLES_PER_SECOND),
                },
                RawSource::Mqtt { topic } => {
                    if topic.is_empty() || topic.contains(['+', '#']) {
                        return Err(invalid(format!(
                            "asset {id}: input topic {topic:?} must be a plain topic name"
                        )));
                    }
                    Source::Mqtt { topic }
                }
                RawSource::Modbus { address, unit_id, poll_ms, timeout_ms, registers } => {
                    Source::Modbus(modbus_config(
                        &id, address, unit_id, poll_ms, timeout_ms, registers,
                    )?)
                }
            };
            assets.push(AssetConfig {
                id,
                asset_type: a.asset_type,
                bundle: base.join(a.bundle),
                source,
            });
        }
        if assets.is_empty() {
            return Err(invalid("no [[assets]] configured".into()));
        }
        let drift = DriftConfig {
            interval: Duration::from_secs(
                raw.drift.interval_secs.unwrap_or(DEFAULT_DRIFT_INTERVAL_SECS).max(1),
            ),
            settings: raw.drift.settings()?,
        };
        let identity = match &raw.identity {
            Some(i) => Identity::load(&base.join(&i.dir), &device)?,
            None => {
                return Err(invalid(format!(
                    "no [identity]: enroll this gateway (millwright device enroll {device}) and \
                     name the folder it wrote in [identity] dir"
                )));
            }
        };
        let site = raw.site.map(|s| check_label("site", s)).transpose()?;
        let tags = raw.tags.into_iter().map(|t| check_label("tag", t)).collect::<Result<_, _>>()?;
        Ok(Config {
            device,
            identity,
            site,
            tags,
            device_class: raw.device_class.unwrap_or_else(|| std::env::consts::ARCH.to_owned()),
            data_dir: base.join(raw.data_dir),
            status_file_every: Duration::from_secs(raw.status_file_secs.unwrap_or(10).max(1)),
            drift,
            uplink,
            root,
            updates,
            local,
            quota: raw.outbox.quota()?,
            assets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse_with_or_without_scheme_and_port() {
        let at = |host: &str, port, tls| BrokerAddress { host: host.into(), port, tls };
        assert_eq!(parse_broker("mqtt://10.0.0.5:1884").unwrap(), at("10.0.0.5", 1884, false));
        assert_eq!(parse_broker("broker.local").unwrap(), at("broker.local", 1883, false));
        assert_eq!(parse_broker("mqtts://broker.local").unwrap(), at("broker.local", 8883, true));
        assert!(parse_broker("localhost:http").is_err());
        assert!(parse_broker("mqtt://").is_err());
    }

    #[test]
    fn plaintext_off_this_host_is_refused_unless_allowed() {
        let remote = parse_broker("mqtt://10.0.0.5:1883").unwrap();
        let err = check_plaintext(&remote, false).unwrap_err().to_string();
        assert!(err.contains("allow_plaintext") && err.contains("mqtts://"), "{err}");
        assert!(check_plaintext(&remote, true).is_ok());
        assert!(check_plaintext(&parse_broker("mqtts://10.0.0.5").unwrap(), false).is_ok());
        assert!(check_plaintext(&parse_broker("127.0.0.1:1883").unwrap(), false).is_ok());
        assert!(check_plaintext(&parse_broker("localhost").unwrap(), false).is_ok());
        let page = RawLocal { listen: Some("0.0.0.0:8090".into()), ..Default::default() };
        let err = page.resolve(Path::new("."), false).unwrap_err().to_string();
        assert!(err.contains("in clear") && err.contains("allow_plaintext"), "{err}");
        assert!(page.resolve(Path::new("."), true).is_ok());
        let https = RawLocal { cert: Some("c.pem".into()), key: Some("k.pem".into()), ..page };
        assert!(https.resolve(Path::new("."), false).unwrap().tls.is_some());
    }

    #[test]
    fn the_example_config_documents_valid_options() {
        let raw: RawConfig =
            toml::from_str(include_str!("../millwright-agent.example.toml")).unwrap();
        assert_eq!(raw.assets.len(), 3);
        assert!(matches!(raw.assets[1].source, RawSource::Mqtt { .. }));
        let RawSource::Modbus { address, unit_id, poll_ms, timeout_ms, registers } =
            toml::from_str::<RawConfig>(include_str!("../millwright-agent.example.toml"))
                .unwrap()
                .assets
                .remove(2)
                .source
        else {
            panic!("the third example asset is not Modbus")
        };
        let id = AssetId::new("engine-3").unwrap();
        let m = modbus_config(&id, address, unit_id, poll_ms, timeout_ms, registers).unwrap();
        assert_eq!(m.registers.len(), 14);
        let (s3, _) = m.registers["s3"];
        assert_eq!(
            (s3.table, s3.word_order, s3.value_type),
            (Table::Holding, Order::Little, ValueType::F32)
        );
        assert_eq!(m.registers["s2"].1.as_deref(), Some("degR"));
    }

    fn modbus(source: &str) -> Result<ModbusConfig, ConfigError> {
        let text = format!(
            "id = 'p1'\nasset_type = 't'\nbundle = 'b.mwb'\n[source]\nkind = 'modbus'\n{source}"
        );
        let raw: RawAsset =
            toml::from_str(&text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let RawSource::Modbus { address, unit_id, poll_ms, timeout_ms, registers } = raw.source
        else {
            panic!("not a Modbus source")
        };
        let id = AssetId::new(raw.id).unwrap();
        modbus_config(&id, address, unit_id, poll_ms, timeout_ms, registers)
    }

    #[test]
    fn a_modbus_source_takes_defaults_and_names_what_is_wrong_with_it() {
        let m = modbus("address = 'plc-7'\n[source.registers]\ns2 = { address = 0, type = 'f32' }")
            .unwrap();
        assert_eq!((m.address.as_str(), m.unit_id), ("plc-7:502", DEFAULT_MODBUS_UNIT_ID));
        assert_eq!(m.poll, Duration::from_millis(DEFAULT_MODBUS_POLL_MS));
        let (s2, unit) = m.registers["s2"].clone();
        assert_eq!(
            (s2.table, s2.byte_order, s2.scale, s2.offset, unit),
            (Table::Holding, Order::Big, 1.0, 0.0, None)
        );
        assert_eq!(
            modbus(
                "address = '[::1]:1502'\n[source.registers]\ns2 = { address = 0, type = 'u16' }"
            )
            .unwrap()
            .address,
            "[::1]:1502"
        );
        let err = |source: &str| modbus(source).unwrap_err().to_string();
        let e = err("address = 'plc:x'\n[source.registers]\ns2 = { address = 0, type = 'u16' }");
        assert!(e.contains("asset p1") && e.contains("bad port"), "{e}");
        let e = err(
            "address = 'plc'\npoll_ms = 1\n[source.registers]\ns2 = { address = 0, type = 'u16' }",
        );
        assert!(e.contains("poll_ms must be at least 10"), "{e}");
        let e = err("address = 'plc'\n[source.registers]");
        assert!(e.contains("at least one register"), "{e}");
        let e = err(
            "address = 'plc'\n[source.registers]\ns2 = { table = 'coil', address = 0, type = 'f32' }",
        );
        assert!(e.contains("register \"s2\"") && e.contains("bool"), "{e}");
        let e = err("address = 'plc'\n[source.registers]\ns2 = { address = 0, type = 'f16' }");
        assert!(e.contains("f16"), "{e}");
        let e = err(
            "address = 'plc'\n[source.registers]\ns2 = { address = 0, type = 'u16', endian = 'big' }",
        );
        assert!(e.contains("endian"), "{e}");
    }

    #[test]
    fn drift_settings_take_metric_defaults_and_refuse_inverted_thresholds() {
        let psi = RawDrift { metric: Some(Metric::Psi), ..Default::default() }.settings().unwrap();
        assert_eq!((psi.warn, psi.drift), (0.1, 0.25));
        let err = RawDrift { warn: Some(3.0), drift: Some(2.0), ..Default::default() }
            .settings()
            .unwrap_err();
        assert!(err.to_string().contains("warn (3) <= drift (2)"), "{err}");
        let err = toml::from_str::<RawDrift>("metric = 'entropy'").unwrap_err().to_string();
        assert!(err.contains("entropy") && err.contains("shift"), "{err}");
    }

    #[test]
    fn the_local_page_is_off_by_default_and_checks_its_address_and_pin() {
        let off = RawLocal::default().resolve(Path::new("."), false).unwrap();
        assert_eq!((off.listen, off.operator_pin), (None, None));
        let on = RawLocal {
            listen: Some("0.0.0.0:8090".into()),
            operator_pin: Some("4711".into()),
            ..Default::default()
        }
        .resolve(Path::new("."), true)
        .unwrap();
        assert_eq!(on.listen.map(|a| a.port()), Some(8090));
        let err = RawLocal { listen: Some("localhost".into()), ..Default::default() }
            .resolve(Path::new("."), false)
            .unwrap_err();
        assert!(err.to_string().contains("local.listen \"localhost\""), "{err}");
        for pin in ["12", "12 34"] {
            let raw = RawLocal { operator_pin: Some(pin.into()), ..Default::default() };
            assert!(
                raw.resolve(Path::new("."), false)
                    .unwrap_err()
                    .to_string()
                    .contains("operator_pin")
            );
        }
    }

    #[test]
    fn unknown_keys_and_missing_files_are_named() {
        let err =
            toml::from_str::<RawConfig>("device = 'a'\ndata_dir = '.'\ncolour = 1").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let raw: RawConfig = toml::from_str(
            "device = 'gw1'\ndata_dir = 'd'\n[uplink]\nbroker = '127.0.0.1:1'\n[trust]\nkeys = ['nope.json']",
        )
        .unwrap();
        let err = Config::from_raw(raw, Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/nope.json"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
        let public = serde_json::to_vec(&PublicKeyFile::new(&key)).unwrap();
        std::fs::write(dir.path().join("k.json"), public).unwrap();
        let text = "device = 'gw1'\ndata_dir = 'd'\n[uplink]\nbroker = '127.0.0.1:1'\n\
                    [trust]\nkeys = ['k.json']\n[[assets]]\nid = 'e1'\nasset_type = 't'\n\
                    bundle = 'b.mwb'\nsource = { kind = 'mqtt', topic = 'in/e1' }";
        let err = Config::from_raw(toml::from_str(text).unwrap(), dir.path()).unwrap_err();
        assert!(err.to_string().contains("no [identity]"), "{err}");
        let text = format!("{text}\n[identity]\ndir = 'id'");
        let err = Config::from_raw(toml::from_str(&text).unwrap(), dir.path()).unwrap_err();
        assert!(err.to_string().contains("id/identity.json"), "{err}");
    }
}
