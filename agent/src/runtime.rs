//! The agent's event loop: readings in, records into the outbox, batches out, acks back.
//!
//! One task owns the outbox, the models and the uplink state; everything that can wake it is a
//! variant of [`Event`]. Inference runs inline (a window takes microseconds); SQLite commits are
//! grouped every `flush_interval` or `flush_max_records`.

use crate::asset::{AssetState, Cursor, Outcome};
use crate::config::{Config, Source};
use crate::inference::Model;
use crate::mqtt::{self, MqttEvent};
use crate::sources::{self, CmapssReplay, SourceEvent};
use crate::store::{NewRecord, Store};
use crate::uplink::{PRIORITY, Uplink};
use crate::{clock, cmapss, reading};
use anyhow::Context as _;
use millwright_shared::keys::TrustedKeys;
use millwright_shared::wire::{self, Ack, DeviceStatus, Stream, UplinkBatch, WIRE_VERSION};
use millwright_shared::{AssetId, DeviceId, bundle, topics};
use rumqttc::{AsyncClient, QoS};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// Everything that wakes the loop.
#[derive(Debug)]
enum Event {
    Source(SourceEvent),
    Mqtt(MqttEvent),
    Flush,
    Tick,
    Shutdown,
}

struct Asset {
    state: AssetState,
    model: usize,
    features: Vec<String>,
    input_topic: Option<String>,
}

/// Counters kept since start, written to `status.json` in the data directory.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counters {
    pub readings: u64,
    pub readings_rejected: BTreeMap<String, u64>,
    pub predictions: u64,
    pub alerts: u64,
    pub inference_failures: u64,
    pub records_stored: u64,
    pub records_acked: u64,
    pub batches_sent: u64,
    pub resends: u64,
    pub reconnects: u64,
    pub store_errors: u64,
    pub bad_acks: u64,
}

/// What `status.json` holds: the seam for the local status page and `millwright-agent status`.
#[derive(Debug, Serialize)]
struct Status<'a> {
    device: &'a DeviceId,
    agent_version: &'static str,
    uplink_connected: bool,
    backlog: BTreeMap<&'static str, u64>,
    oldest_unacked_at_ms: Option<i64>,
    assets: Vec<AssetStatus>,
    counters: &'a Counters,
}

#[derive(Debug, Serialize)]
struct AssetStatus {
    asset: AssetId,
    level: wire::Level,
}

struct Agent {
    config: Config,
    store: Store,
    models: Vec<Model>,
    assets: Vec<Asset>,
    client: AsyncClient,
    uplink: Uplink,
    pending: Vec<NewRecord>,
    pending_cursors: HashMap<AssetId, Cursor>,
    counters: Counters,
}

/// Verifies and loads every distinct bundle the assets name.
fn load_models(config: &Config, cursors: &HashMap<AssetId, Cursor>) -> (Vec<Model>, Vec<Asset>) {
    let mut models: Vec<Model> = Vec::new();
    let mut by_path: HashMap<PathBuf, usize> = HashMap::new();
    let mut assets = Vec::new();
    for a in &config.assets {
        let index = match by_path.get(&a.bundle) {
            Some(&i) => i,
            None => match load_bundle(&a.bundle, &config.trusted) {
                Ok(model) => {
                    models.push(model);
                    by_path.insert(a.bundle.clone(), models.len() - 1);
                    models.len() - 1
                }
                Err(e) => {
                    tracing::error!(asset = %a.id, bundle = %a.bundle.display(), "{e:#}; asset disabled");
                    continue;
                }
            },
        };
        let manifest = models[index].manifest();
        if manifest.asset_type != a.asset_type {
            tracing::error!(
                asset = %a.id,
                "bundle {} is for asset type {:?}, the asset is {:?}; asset disabled",
                a.bundle.display(), manifest.asset_type, a.asset_type
            );
            continue;
        }
        let input_topic = match &a.source {
            Source::Mqtt { topic } => Some(topic.clone()),
            Source::Cmapss { .. } => None,
        };
        assets.push(Asset {
            state: AssetState::new(a.id.clone(), manifest, cursors.get(&a.id).copied()),
            model: index,
            features: manifest.feature_names().map(str::to_owned).collect(),
            input_topic,
        });
    }
    (models, assets)
}

/// Reads, verifies and loads one bundle file (signatures, hash, expiry, shape, golden outputs).
pub fn load_bundle(path: &Path, trusted: &TrustedKeys) -> anyhow::Result<Model> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let verified = bundle::verify(&bytes, trusted, clock::now())
        .with_context(|| format!("bundle {} rejected", path.display()))?;
    Model::load(&verified).with_context(|| format!("bundle {} rejected", path.display()))
}

fn status_payload(device: &DeviceId, online: bool) -> Vec<u8> {
    wire::encode(&DeviceStatus {
        v: WIRE_VERSION,
        device: device.clone(),
        online,
        agent_version: crate::VERSION.to_owned(),
    })
}

/// Runs the agent until `shutdown` completes, then flushes and disconnects.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir.join("outbox.sqlite"))?;
    let cursors = store.cursors()?;
    let (models, assets) = load_models(&config, &cursors);
    if assets.is_empty() {
        anyhow::bail!("no asset could start (see the errors above)");
    }

    let (mqtt_tx, mut mqtt_rx) = mpsc::channel(1024);
    let u = &config.uplink;
    let client = mqtt::start(
        mqtt::Connect {
            client_id: u.client_id.clone(),
            host: u.host.clone(),
            port: u.port,
            keep_alive: u.keep_alive,
            reconnect_max: u.reconnect_max,
            last_will: Some((
                topics::status(&config.device),
                status_payload(&config.device, false),
            )),
        },
        mqtt_tx,
    );

    let (source_tx, mut source_rx) = mpsc::channel(1024);
    let mut replays: BTreeMap<PathBuf, Vec<CmapssReplay>> = BTreeMap::new();
    for (index, asset) in assets.iter().enumerate() {
        let Some(a) = config.assets.iter().find(|a| &a.id == asset.state.id()) else { continue };
        if let Source::Cmapss { path, unit, cycles_per_second } = &a.source {
            let columns = cmapss::feature_indices(asset.features.iter().map(String::as_str))?;
            replays.entry(path.clone()).or_default().push(CmapssReplay {
                asset: index,
                unit: *unit,
                cycles_per_second: *cycles_per_second,
                columns,
                resume_after: cursors.get(asset.state.id()).map(|c| c.cycle),
            });
        }
    }
    for (path, replays) in replays {
        sources::spawn_cmapss(path, replays, source_tx.clone());
    }
    drop(source_tx);

    let mut agent = Agent {
        uplink: Uplink::new(config.uplink.settings),
        config,
        store,
        models,
        assets,
        client,
        pending: Vec::new(),
        pending_cursors: HashMap::new(),
        counters: Counters::default(),
    };
    tracing::info!(
        device = %agent.config.device,
        assets = agent.assets.len(),
        broker = %format!("{}:{}", agent.config.uplink.host, agent.config.uplink.port),
        "agent started"
    );
    crate::watchdog::ready();

    let mut flush = tokio::time::interval(agent.config.uplink.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let room = agent.pending.len() < 10 * agent.config.uplink.flush_max_records;
        let event = tokio::select! {
            biased;
            _ = &mut shutdown => Event::Shutdown,
            Some(e) = mqtt_rx.recv() => Event::Mqtt(e),
            // Only armed while records wait, so an idle agent does not wake 20 times a second.
            _ = flush.tick(), if !agent.pending.is_empty() => Event::Flush,
            _ = tick.tick() => Event::Tick,
            Some(e) = source_rx.recv(), if room => Event::Source(e),
        };
        if matches!(event, Event::Shutdown) {
            crate::watchdog::stopping();
            break;
        }
        agent.handle(event);
    }
    agent.shut_down().await;
    Ok(())
}

impl Agent {
    fn handle(&mut self, event: Event) {
        match event {
            Event::Source(SourceEvent::Reading { asset, cycle, values }) => {
                self.on_reading(asset, cycle, values)
            }
            Event::Source(SourceEvent::Done { asset }) => {
                tracing::info!(asset = %self.assets[asset].state.id(), "replay finished");
            }
            Event::Source(SourceEvent::Failed { asset, error }) => {
                tracing::error!(asset = %self.assets[asset].state.id(), "input source failed: {error}");
            }
            Event::Mqtt(MqttEvent::Connected) => self.on_connected(),
            Event::Mqtt(MqttEvent::Disconnected(_)) => {
                if self.uplink.is_connected() {
                    self.counters.reconnects += 1;
                }
                self.uplink.on_disconnected();
            }
            Event::Mqtt(MqttEvent::Message { topic, payload }) => self.on_message(&topic, &payload),
            Event::Flush => self.flush(),
            Event::Tick => {
                crate::watchdog::ping();
                if self.uplink.on_tick(clock::now_ms()) {
                    self.counters.resends += 1;
                    tracing::info!("acks overdue; resending the outbox");
                }
                self.pump();
                self.write_status();
            }
            Event::Shutdown => {}
        }
    }

    fn on_reading(&mut self, index: usize, cycle: Option<u64>, values: Vec<f32>) {
        self.counters.readings += 1;
        let asset = &mut self.assets[index];
        let model = &mut self.models[asset.model];
        let cycle = cycle.unwrap_or_else(|| asset.state.next_cycle());
        match asset.state.on_reading(cycle, values, |w| model.predict(w)) {
            Outcome::Produced { records, cursor } => {
                let at_ms = clock::now_ms();
                for body in records {
                    match body.stream() {
                        Stream::Predictions => self.counters.predictions += 1,
                        Stream::Alerts => {
                            self.counters.alerts += 1;
                            tracing::warn!(asset = %asset.state.id(), cycle, level = ?asset.state.level(), "asset health changed");
                        }
                    }
                    self.pending.push(NewRecord { at_ms, body });
                }
                self.pending_cursors.insert(asset.state.id().clone(), cursor);
            }
            Outcome::InferenceFailed(error) => {
                self.counters.inference_failures += 1;
                tracing::warn!(asset = %asset.state.id(), cycle, "{error}");
            }
            Outcome::Filling | Outcome::Warmup => {}
        }
        if self.pending.len() >= self.config.uplink.flush_max_records {
            self.flush();
        }
    }

    /// Commits pending records and cursors in one transaction. On failure (a full disk, say)
    /// they stay pending and the next flush tries again; inputs pause while too much is pending.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let cursors: Vec<_> = self.pending_cursors.iter().map(|(a, c)| (a.clone(), *c)).collect();
        match self.store.append(&self.pending, &cursors) {
            Ok(()) => {
                self.counters.records_stored += self.pending.len() as u64;
                self.pending.clear();
                self.pending_cursors.clear();
                self.pump();
            }
            Err(e) => {
                self.counters.store_errors += 1;
                tracing::error!(
                    pending = self.pending.len(),
                    "outbox write failed, will retry: {e}"
                );
            }
        }
    }

    fn on_connected(&mut self) {
        tracing::info!("uplink connected");
        self.uplink.on_connected();
        let device = &self.config.device;
        let _ = self.client.try_subscribe(topics::ack(device), QoS::AtLeastOnce);
        for asset in &self.assets {
            if let Some(topic) = &asset.input_topic {
                let _ = self.client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
            }
        }
        self.publish_status(true);
        self.pump();
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        if topic == topics::ack(&self.config.device) {
            match Ack::decode(payload) {
                Ok(ack) => {
                    match self.store.delete(&ack) {
                        Ok(n) => self.counters.records_acked += n as u64,
                        Err(e) => tracing::error!("outbox delete failed: {e}"),
                    }
                    self.uplink.on_ack(&ack);
                    self.pump();
                }
                Err(e) => {
                    self.counters.bad_acks += 1;
                    tracing::warn!("ignoring malformed ack: {e}");
                }
            }
            return;
        }
        let Some(index) = self.assets.iter().position(|a| a.input_topic.as_deref() == Some(topic))
        else {
            return;
        };
        let features = self.assets[index].features.iter().map(String::as_str);
        match reading::parse(payload, features) {
            Ok(r) => self.on_reading(index, r.cycle, r.values),
            Err(e) => {
                *self.counters.readings_rejected.entry(e.kind().to_owned()).or_default() += 1;
                tracing::warn!(asset = %self.assets[index].state.id(), topic, kind = e.kind(), "rejected reading: {e}");
            }
        }
    }

    /// The retained status message; its `online: false` form is also the last will.
    fn publish_status(&self, online: bool) {
        let device = &self.config.device;
        let payload = status_payload(device, online);
        let _ = self.client.try_publish(topics::status(device), QoS::AtLeastOnce, true, payload);
    }

    /// Sends outbox records while the uplink window has room.
    fn pump(&mut self) {
        for stream in PRIORITY {
            while let Some(req) = self.uplink.next_request(stream) {
                let records = match self.store.read(stream, req.after, req.limit) {
                    Ok(r) if r.is_empty() => break,
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!("outbox read failed: {e}");
                        return;
                    }
                };
                let (first, last) = (records[0].seq, records[records.len() - 1].seq);
                let batch = UplinkBatch {
                    v: WIRE_VERSION,
                    device: self.config.device.clone(),
                    stream,
                    records,
                };
                let topic = topics::uplink(&self.config.device, stream);
                if self
                    .client
                    .try_publish(topic, QoS::AtLeastOnce, false, wire::encode(&batch))
                    .is_err()
                {
                    return;
                }
                self.counters.batches_sent += 1;
                self.uplink.on_sent(stream, first, last, clock::now_ms());
            }
        }
    }

    fn write_status(&self) {
        let mut backlog = BTreeMap::new();
        let mut oldest: Option<i64> = None;
        for stream in Stream::ALL {
            if let Ok(b) = self.store.backlog(stream) {
                backlog.insert(stream.as_str(), b.records);
                oldest = match (oldest, b.oldest_at_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        let status = Status {
            device: &self.config.device,
            agent_version: crate::VERSION,
            uplink_connected: self.uplink.is_connected(),
            backlog,
            oldest_unacked_at_ms: oldest,
            assets: self
                .assets
                .iter()
                .map(|a| AssetStatus { asset: a.state.id().clone(), level: a.state.level() })
                .collect(),
            counters: &self.counters,
        };
        let path = self.config.data_dir.join("status.json");
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&status).unwrap_or_default();
        if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::debug!("cannot write {}: {e}", path.display());
        }
    }

    async fn shut_down(&mut self) {
        self.flush();
        self.write_status();
        self.publish_status(false);
        let _ = self.client.try_disconnect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        tracing::info!(
            stored = self.counters.records_stored,
            acked = self.counters.records_acked,
            "agent stopped; unacknowledged records stay in the outbox"
        );
    }
}
