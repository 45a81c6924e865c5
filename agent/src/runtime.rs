//! The agent's event loop: readings in, records into the outbox, batches out, acks back.
//!
//! One task owns the outbox, the models and the uplink state; everything that can wake it is a
//! variant of [`Event`]. Inference runs inline (a window takes microseconds); SQLite commits are
//! grouped every `flush_interval` or `flush_max_records`.

mod update;

use crate::asset::{self, AssetState, Cursor, Outcome};
use crate::config::{Config, ModbusConfig, Source};
use crate::inference::Model;
use crate::local_http::{self, LocalRequest, Snapshot};
use crate::metrics::LatencyHistogram;
use crate::mqtt::{self, MqttEvent};
use crate::reading::Reading;
use crate::sources::cmapss::CmapssReplay;
use crate::sources::modbus::{ModbusDevice, ModbusPoll};
use crate::sources::registers::Map;
use crate::sources::{self, SourceEvent};
use crate::status::{
    self, AssetStatus, Counters, FeatureStatus, History, InputProblem, OpenAlert, Point, Status,
};
use crate::store::{NewRecord, Store};
use crate::update_machine::{Machine, Settings as MachineSettings};
use crate::update_state::Slot;
use crate::uplink::{PRIORITY, Uplink};
use crate::{clock, cmapss, reading};
use anyhow::Context as _;
use ed25519_dalek::VerifyingKey;
use millwright_shared::bundle::sha256_hex;
use millwright_shared::drift::monitor::ReportMeta;
use millwright_shared::drift::{DriftMonitor, DriftReport, DriftSettings, Severity};
use millwright_shared::keys::KeyId;
use millwright_shared::manifest::{Manifest, OutputKind};
use millwright_shared::refusals::Refusals;
use millwright_shared::signed::{self, Purpose, SignedError};
use millwright_shared::topics::Incoming;
use millwright_shared::trust::Root;
use millwright_shared::wire::{
    self, Ack, DeviceStatus, RecordBody, RunningModel, Stream, UplinkBatch, WIRE_VERSION,
};
use millwright_shared::{AssetId, bundle, topics};
use rumqttc::{AsyncClient, QoS};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Everything that wakes the loop.
#[derive(Debug)]
enum Event {
    Source(SourceEvent),
    Mqtt(MqttEvent),
    Flush,
    Tick,
    /// A request from the local page.
    Local(LocalRequest),
    Shutdown,
}

struct Asset {
    state: AssetState,
    model: usize,
    /// Features read from the source: the drift profile's, or the model's inputs.
    features: Vec<String>,
    /// Position of each model input in `features`.
    inputs: Vec<usize>,
    input_topic: Option<String>,
    /// Since when readings are refused, and the last one's kind, until one is complete again
    /// (logged on change; shown in the status and on the page).
    refusing: Option<InputProblem>,
    drift: Option<DriftMonitor>,
    /// Start of the current drift interval.
    drift_from_ms: i64,
    /// The last drift verdicts, for the status file and local drift alerts.
    drift_status: BTreeMap<String, FeatureStatus>,
    /// Recent predictions, for the local page's trend chart.
    history: History,
    /// Warning or alarm since the last raise, until acknowledged on the local page (in memory).
    alert: Option<OpenAlert>,
}

impl Asset {
    /// Drift is measured against the serving release's profile: a new release starts a new
    /// interval (the caller closed the previous one).
    fn reset_drift(&mut self, manifest: &Manifest, settings: DriftSettings, now_ms: i64) {
        self.drift = manifest
            .drift
            .clone()
            .map(|profile| DriftMonitor::new(std::sync::Arc::new(profile), settings));
        self.drift_from_ms = now_ms;
    }
}

/// Where a loaded model came from: the bundle file and its SHA-256.
#[derive(Clone)]
struct Loaded {
    path: PathBuf,
    sha256: String,
}

struct Agent {
    config: Config,
    store: Store,
    /// The outbox's identity, named in every batch; acks must name it back.
    epoch: String,
    /// The trust root in force (the provisioned one, or a newer one accepted since).
    root: Root,
    models: Vec<Model>,
    /// Parallel to `models`: the bundle file each was loaded from.
    loaded: Vec<Loaded>,
    /// Model name → the bundle files serving it, once an update installed one.
    slots: HashMap<String, Slot>,
    update: update::Updates,
    /// Refused directives and roots: which were reported, and when an unverified one last was.
    refused: update::Refused,
    assets: Vec<Asset>,
    client: AsyncClient,
    uplink: Uplink,
    pending: Vec<NewRecord>,
    pending_cursors: HashMap<AssetId, Cursor>,
    counters: Counters,
    /// Refused messages by reason, and which were logged.
    refusals: Refusals,
    started_at_ms: i64,
    /// When the status was last published.
    status_sent_ms: i64,
    /// The `at_ms` of the last status sent: statuses are ordered even if the clock steps back.
    status_at_ms: i64,
    /// When the time floor was last saved.
    floor_saved_ms: i64,

    latency: LatencyHistogram,
    /// What the local page serves, replaced every tick and after every operator action.
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The local page's wrong-PIN lockouts.
    pin_guard: Arc<local_http::PinGuard>,
    /// Outbox rows moved to quarantine (ever, in this outbox).
    quarantined: u64,
    /// The corrupt outbox file set aside at start, if there was one.
    set_aside: Option<crate::store::SetAside>,
    /// Outbox commits are failing (a full disk, say).
    store_failing: bool,
    /// When `status.json` was last written (monotonic).
    status_file_ms: i64,
}

/// The bundle files to try for an asset, best first: the model's active slot, its last known
/// good, then the configured bundle.
fn candidates(configured: &Path, slots: &HashMap<String, Slot>) -> Vec<PathBuf> {
    let model = std::fs::read(configured)
        .ok()
        .and_then(|b| bundle::RawBundle::parse(&b).ok())
        .and_then(|raw| raw.manifest_unverified().ok())
        .map(|m| m.model.to_string());
    let mut out = Vec::new();
    if let Some(slot) = model.and_then(|m| slots.get(&m)) {
        out.push(slot.active.clone());
        out.extend(slot.previous.clone());
    }
    out.push(configured.to_owned());
    out
}

/// Verifies and loads every distinct bundle the assets name (or that an update put in their
/// model's slot).
fn load_models(
    config: &Config,
    root: &Root,
    slots: &HashMap<String, Slot>,
    cursors: &HashMap<AssetId, Cursor>,
) -> (Vec<Model>, Vec<Loaded>, Vec<Asset>) {
    let mut models: Vec<Model> = Vec::new();
    let mut loaded: Vec<Loaded> = Vec::new();
    let mut assets = Vec::new();
    for a in &config.assets {
        let mut index = None;
        for path in candidates(&a.bundle, slots) {
            if let Some(i) = loaded.iter().position(|l| l.path == path) {
                index = Some(i);
                break;
            }
            match load_bundle(&path, root) {
                Ok(model) => {
                    let sha256 = std::fs::read(&path).map(|b| sha256_hex(&b)).unwrap_or_default();
                    models.push(model);
                    loaded.push(Loaded { path, sha256 });
                    index = Some(models.len() - 1);
                    break;
                }
                Err(e) => tracing::error!(asset = %a.id, bundle = %path.display(), "{e:#}"),
            }
        }
        let Some(index) = index else {
            tracing::error!(asset = %a.id, "no bundle for this asset verifies; asset disabled");
            continue;
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
            Source::Cmapss { .. } | Source::Modbus(_) => None,
        };
        let (features, inputs) = asset::monitored_features(manifest);
        let cursor = cursors.get(&a.id).copied();
        // Alerts are held in memory: one still raised at a restart is open again, unacknowledged.
        let alert = cursor.filter(|c| c.level != wire::Level::Ok).map(|c| OpenAlert {
            level: c.level,
            since_ms: clock::now_ms(),
            cycle: c.cycle,
            value: None,
            acknowledged_at_ms: None,
        });
        let mut asset = Asset {
            state: AssetState::new(a.id.clone(), manifest, cursor),
            model: index,
            features,
            inputs,
            input_topic,
            refusing: None,
            drift: None,
            drift_from_ms: 0,
            drift_status: BTreeMap::new(),
            history: History::default(),
            alert,
        };
        asset.reset_drift(manifest, config.drift.settings, clock::now_ms());
        assets.push(asset);
    }
    (models, loaded, assets)
}

/// Reads, verifies and loads one bundle file (signatures, hash, expiry, shape, golden outputs).
pub fn load_bundle(path: &Path, root: &Root) -> anyhow::Result<Model> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let verified = root
        .verify_bundle(&bytes, clock::trusted_now())
        .with_context(|| format!("bundle {} rejected", path.display()))?;
    // A bundle verified here was made no later than now, whatever the wall clock says.
    clock::raise_floor(clock::to_ms(verified.manifest().created_at));
    Model::load(&verified).with_context(|| format!("bundle {} rejected", path.display()))
}

/// The root in force: the provisioned one, or a newer one this device accepted since. Either
/// may have expired since it was accepted; the gateway still starts (it serves its verified
/// models and drains its outbox) and refuses updates until a newer root arrives.
fn current_root(config: &Config, store: &Store) -> Root {
    let stored = store.stored_root().ok().flatten().and_then(|bytes| {
        Root::provision_expired_too(&bytes)
            .map_err(|e| tracing::error!("stored trust root refused: {e}"))
            .ok()
    });
    let root = match stored {
        Some(root) if root.version() > config.root.version() => root,
        _ => config.root.clone(),
    };
    if root.is_expired(clock::trusted_now()) {
        tracing::error!(
            version = root.version(),
            "the trust root in force has expired: models keep serving, updates are refused \
             until the server publishes a newer root"
        );
    }
    root
}

/// How often a connected agent resends its status (with its backlog) to the fleet server.
const STATUS_EVERY_MS: i64 = 10_000;

/// The largest uplink batch body: the broker's packet limit less room for the topic, the
/// signature header and MQTT framing. A batch above it is cut.
const MAX_BATCH_BYTES: usize = mqtt::MAX_PACKET_BYTES - (64 << 10);

/// The status message, signed. The last will is the offline form with `at_ms` equal to the
/// run's start, built before the first connection.
fn status_payload(
    config: &Config,
    (at_ms, started_ms): (i64, i64),
    online: bool,
    models: Vec<RunningModel>,
    backlog: Option<wire::Backlog>,
) -> Vec<u8> {
    let body = wire::encode(&DeviceStatus {
        v: WIRE_VERSION,
        device: config.device.clone(),
        at_ms,
        started_ms,
        online,
        agent_version: crate::VERSION.to_owned(),
        site: config.site.clone(),
        tags: config.tags.clone(),
        device_class: Some(config.device_class.clone()),
        models,
        backlog,
    });
    signed::seal(&config.identity.key, Purpose::Status, &config.device, &body)
}

/// How the uplink connects: TLS with the gateway's client certificate for `mqtts://`, and
/// the embedded broker's credentials (the device id and a signature over the client id). The
/// driver subscribes to this device's acks, directive, chunks, the fleet's root and the
/// assets' MQTT `inputs` on every connection.
fn connect_options(
    config: &Config,
    last_will: Vec<u8>,
    inputs: Vec<String>,
) -> anyhow::Result<mqtt::Connect> {
    let u = &config.uplink;
    let transport = match u.tls {
        true => mqtt::Transport::Tls(
            millwright_io::tls::client_config(&config.identity.ca, Some(&config.identity.tls))
                .context("uplink TLS")?,
        ),
        false => mqtt::Transport::Tcp,
    };
    let password = signed::connect_password(&config.identity.key, &config.device, &u.client_id);
    Ok(mqtt::Connect {
        client_id: u.client_id.clone(),
        host: u.host.clone(),
        port: u.port,
        transport,
        credentials: Some((config.device.to_string(), password)),
        keep_alive: u.keep_alive,
        reconnect_max: u.reconnect_max,
        last_will: Some((topics::status(&config.device), last_will)),
        stall_after: mqtt::DEFAULT_STALL_AFTER,
        subscriptions: [
            topics::ack(&config.device),
            topics::desired(&config.device),
            topics::chunk(&config.device),
            topics::TRUST_ROOT.to_owned(),
        ]
        .into_iter()
        .chain(inputs)
        .collect(),
        queue: mqtt::DEFAULT_QUEUE,
        inflight: mqtt::DEFAULT_INFLIGHT,
    })
}

/// Records waiting for a commit are capped at this many flushes' worth: file inputs pause, and
/// predictions from inputs that cannot wait (MQTT) are counted and not kept.
const MAX_PENDING_FLUSHES: usize = 10;

/// How often the time floor is saved while the clock moves forward.
const FLOOR_SAVE_EVERY_MS: i64 = 60_000;

/// Runs the agent until `shutdown` completes, then flushes and disconnects.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let (mut store, set_aside) =
        Store::open_or_set_aside(&config.data_dir.join("outbox.sqlite"), clock::now_ms())?;
    if let Some(s) = &set_aside {
        tracing::error!(
            moved_to = %s.moved_to.display(),
            "the outbox was corrupt ({}): set aside, starting a fresh one (a new epoch); records              in the old file were not sent",
            s.reason
        );
    }
    let quarantined = store.quarantined()?;
    clock::raise_floor(store.time_floor()?);
    let epoch = store.epoch()?;
    let cursors = store.cursors()?;
    let root = current_root(&config, &store);
    let slots = store.slots()?;
    let (models, loaded, assets) = load_models(&config, &root, &slots, &cursors);
    if assets.is_empty() {
        // Inference is off, but the outbox still drains and updates can still arrive.
        tracing::error!(
            "no asset could start (see the errors above): the gateway connects, delivers its \
             outbox and waits for an update"
        );
    }

    if clock::is_untrusted() {
        tracing::error!(
            clock_ms = clock::now_ms(),
            floor_ms = clock::floor_ms(),
            "the wall clock is behind what this gateway recorded before: it is not trusted, \
             expiry and certificate checks use the recorded time instead"
        );
    }
    let started_at_ms = clock::trusted_now_ms();
    let (mqtt_tx, mut mqtt_rx) = mpsc::channel(1024);
    let will = status_payload(&config, (started_at_ms, started_at_ms), false, vec![], None);
    let inputs = assets.iter().filter_map(|a| a.input_topic.clone()).collect();
    let client = mqtt::start(connect_options(&config, will, inputs)?, mqtt_tx);

    let (snapshot, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let pin_guard = Arc::new(local_http::PinGuard::default());
    let (local_tx, mut local_rx) = mpsc::channel(16);
    if let Some(addr) = config.local.listen {
        // The page is a convenience: a gateway whose port is taken keeps inferring and buffering.
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let local = listener.local_addr().map_or(addr.to_string(), |a| a.to_string());
                tracing::info!(address = %local, "local page listening");
                let tls = match &config.local.tls {
                    Some((cert, key)) => Some(
                        millwright_io::tls::server_config(cert, key, None)
                            .context("local page certificate")?,
                    ),
                    None => None,
                };
                let router = local_http::router(
                    snapshot_rx,
                    local_tx,
                    config.local.operator_pin.clone(),
                    pin_guard.clone(),
                    tls.is_some(),
                );
                local_http::spawn(listener, tls, router);
            }
            Err(e) => tracing::error!(address = %addr, "local page disabled: cannot listen: {e}"),
        }
    } else {
        drop(local_tx);
    }

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
        sources::cmapss::spawn(path, replays, source_tx.clone());
    }
    // One connection per PLC, shared by the assets that read from it.
    let mut plcs: BTreeMap<String, Vec<ModbusPoll>> = BTreeMap::new();
    for (index, asset) in assets.iter().enumerate() {
        let Some(a) = config.assets.iter().find(|a| &a.id == asset.state.id()) else { continue };
        if let Source::Modbus(m) = &a.source {
            let poll = modbus_poll(index, asset, m, models[asset.model].manifest());
            plcs.entry(m.address.clone()).or_default().push(poll);
        }
    }
    for (address, polls) in plcs {
        sources::modbus::spawn(ModbusDevice { address, polls }, source_tx.clone());
    }
    drop(source_tx);

    let machine = Machine::new(MachineSettings {
        models_dir: config.data_dir.join("models"),
        fetch_window: config.updates.fetch_window as usize,
        fetch_timeout_ms: i64::try_from(config.updates.fetch_timeout.as_millis())
            .unwrap_or(i64::MAX),
    });
    let mut uplink = Uplink::new(config.uplink.settings);
    for stream in PRIORITY {
        uplink.recorded_floor(stream, store.sent_floor(stream)?);
    }
    let mut agent = Agent {
        uplink,
        config,
        store,
        epoch,
        root,
        models,
        loaded,
        slots,
        update: update::Updates::new(machine),
        refused: update::Refused::default(),
        assets,
        client,
        pending: Vec::new(),
        pending_cursors: HashMap::new(),
        counters: Counters::default(),
        refusals: Refusals::default(),
        started_at_ms,
        status_sent_ms: 0,
        status_at_ms: started_at_ms,
        floor_saved_ms: 0,
        latency: LatencyHistogram::default(),
        snapshot,
        pin_guard,
        quarantined,
        set_aside,
        store_failing: false,
        status_file_ms: i64::MIN / 2,
    };
    tracing::info!(
        device = %agent.config.device,
        assets = agent.assets.len(),
        broker = %format!(
            "{}://{}:{}",
            if agent.config.uplink.tls { "mqtts" } else { "mqtt" },
            agent.config.uplink.host,
            agent.config.uplink.port
        ),
        "agent started"
    );
    agent.resume_update();
    crate::watchdog::ready();

    let mut flush = tokio::time::interval(agent.config.uplink.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let room =
            agent.pending.len() < MAX_PENDING_FLUSHES * agent.config.uplink.flush_max_records;
        let event = tokio::select! {
            biased;
            _ = &mut shutdown => Event::Shutdown,
            // Before MQTT: a flood on a subscribed topic must not starve the tick, which feeds
            // the systemd watchdog.
            _ = tick.tick() => Event::Tick,
            Some(e) = mqtt_rx.recv() => Event::Mqtt(e),
            // Only armed while records wait, so an idle agent does not wake 20 times a second.
            _ = flush.tick(), if !agent.pending.is_empty() => Event::Flush,
            Some(r) = local_rx.recv() => Event::Local(r),
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
            Event::Source(SourceEvent::Reading { asset, reading }) => self.on_input(asset, reading),
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
                self.on_link_update(false);
            }
            Event::Mqtt(MqttEvent::Message { topic, payload }) => self.on_message(&topic, &payload),
            Event::Mqtt(MqttEvent::Stalled { .. }) => self.counters.uplink_stalls += 1,
            Event::Mqtt(MqttEvent::Flowing) => {}
            Event::Flush => self.flush(),
            Event::Tick => {
                crate::watchdog::ping();
                let due = self.uplink.on_tick(clock::monotonic_ms());
                if due > 0 {
                    tracing::info!(batches = due, "acks overdue; sending those batches again");
                    self.pump();
                }
                if let Some(line) = self.refusals.summary(clock::now_ms()) {
                    tracing::warn!("{line}");
                }
                self.keep_time_floor();
                self.close_drift_intervals(clock::now_ms(), false);
                self.on_update_tick(clock::monotonic_ms());
                self.pump();
                let due = clock::monotonic_ms() - self.status_file_ms
                    >= self.config.status_file_every.as_millis() as i64;
                self.publish_snapshot(due);
                let now_ms = clock::now_ms();
                if self.uplink.is_connected() && now_ms - self.status_sent_ms >= STATUS_EVERY_MS {
                    self.publish_status(true);
                }
            }
            Event::Local(LocalRequest::Ack { asset, reply }) => {
                let now_ms = clock::now_ms();
                let outcome = match self.assets.iter_mut().find(|a| a.state.id().as_str() == asset)
                {
                    Some(a) => status::acknowledge(&mut a.alert, now_ms),
                    None => status::AckOutcome::UnknownAsset,
                };
                if outcome == status::AckOutcome::Acknowledged {
                    self.counters.alerts_acknowledged += 1;
                    tracing::info!(asset, "alert acknowledged on the local page");
                    self.write_status();
                }
                let _ = reply.send(outcome);
            }
            Event::Shutdown => {}
        }
    }

    /// One reading: `observed` holds every monitored feature (for drift), `row` the model's
    /// inputs, or `None` when the reading was refused for the model (already counted).
    fn on_reading(
        &mut self,
        index: usize,
        cycle: Option<u64>,
        observed: Vec<Option<f32>>,
        row: Option<Vec<f32>>,
    ) {
        let asset = &mut self.assets[index];
        let model = &mut self.models[asset.model];
        let mut observer = self.update.observer(asset.model);
        let latency = &mut self.latency;
        let cycle = cycle.unwrap_or_else(|| asset.state.next_cycle());
        let outcome = row.map(|row| {
            self.counters.readings += 1;
            asset.state.on_reading(cycle, row, |w| {
                let started = Instant::now();
                let out = model.predict(w);
                let us = started.elapsed().as_micros() as u64;
                latency.observe(us);
                if let Some(observer) = observer.take() {
                    observer.after(w, &out, us);
                }
                out
            })
        });
        if let Some(drift) = &mut asset.drift
            && !matches!(outcome, Some(Outcome::Warmup))
        {
            drift.observe(cycle, &observed);
            if let Some(Outcome::Produced { records, .. }) = &outcome
                && let Some(RecordBody::Prediction(p)) = records.first()
            {
                drift.observe_output(p.value);
            }
        }
        let max_pending = MAX_PENDING_FLUSHES * self.config.uplink.flush_max_records;
        match outcome {
            Some(Outcome::Produced { records, cursor }) => {
                let at_ms = clock::now_ms();
                for body in records {
                    match &body {
                        RecordBody::Prediction(p) => {
                            asset.history.push(Point { at_ms, cycle: p.cycle, value: p.value });
                        }
                        RecordBody::Alert(change) => {
                            asset.alert = status::next_alert(asset.alert.take(), change, at_ms);
                        }
                        RecordBody::Drift(_) | RecordBody::Update(_) | RecordBody::Gap(_) => {}
                    }
                    match body.stream() {
                        Stream::Predictions => self.counters.predictions += 1,
                        Stream::Alerts => {
                            self.counters.alerts += 1;
                            tracing::warn!(asset = %asset.state.id(), cycle, level = ?asset.state.level(), "asset health changed");
                        }
                        Stream::Drift | Stream::Updates => {}
                    }
                    // Memory stays bounded while commits fail (a full disk): past the cap a
                    // prediction is shown on the page but not kept; alerts always are.
                    if body.stream() == Stream::Predictions && self.pending.len() >= max_pending {
                        self.counters.records_unstored += 1;
                        continue;
                    }
                    self.pending.push(NewRecord { at_ms, body });
                }
                self.pending_cursors.insert(asset.state.id().clone(), cursor);
            }
            Some(Outcome::InferenceFailed(error)) => {
                self.counters.inference_failures += 1;
                tracing::warn!(asset = %asset.state.id(), cycle, "{error}");
            }
            Some(Outcome::Filling | Outcome::Warmup) | None => {}
        }
        if self.pending.len() >= self.config.uplink.flush_max_records {
            self.flush();
        }
    }

    /// Closes every asset's drift interval that is due (all of them when `force`), queues the
    /// reports in the outbox and raises local drift alerts for verdicts that got worse.
    fn close_drift_intervals(&mut self, now_ms: i64, force: bool) {
        self.close_drift(now_ms, |_| force);
    }

    /// Closes the drift intervals of the assets served by model `i` (before it is replaced).
    fn close_drift_intervals_of(&mut self, i: usize, now_ms: i64) {
        self.close_drift(now_ms, |asset| asset.model == i);
    }

    fn close_drift(&mut self, now_ms: i64, force: impl Fn(&Asset) -> bool) {
        let interval_ms = i64::try_from(self.config.drift.interval.as_millis()).unwrap_or(i64::MAX);
        let mut queued = false;
        for asset in &mut self.assets {
            let forced = force(asset);
            let Some(monitor) = &mut asset.drift else { continue };
            if !forced && now_ms - asset.drift_from_ms < interval_ms {
                continue;
            }
            if monitor.samples() == 0 {
                asset.drift_from_ms = now_ms;
                continue;
            }
            let manifest = self.models[asset.model].manifest();
            let report = monitor.report(ReportMeta {
                asset: asset.state.id().clone(),
                model: manifest.model.clone(),
                release: manifest.release,
                site: self.config.site.clone(),
                from_ms: asset.drift_from_ms,
                to_ms: now_ms,
            });
            asset.drift_from_ms = now_ms;
            self.counters.drift_alerts += local_drift_alerts(&asset.drift_status, &report);
            asset.drift_status = report
                .features
                .iter()
                .map(|f| {
                    let severity = match (f.severity, asset.drift_status.get(&f.name)) {
                        (Severity::Insufficient, Some(previous)) => previous.severity,
                        (severity, _) => severity,
                    };
                    let status = FeatureStatus {
                        severity,
                        flags: f.flags.clone(),
                        shift: f.shift,
                        psi: f.psi,
                    };
                    (f.name.clone(), status)
                })
                .collect();
            self.counters.drift_reports += 1;
            self.pending
                .push(NewRecord { at_ms: now_ms, body: RecordBody::Drift(Box::new(report)) });
            queued = true;
        }
        if queued {
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
                if std::mem::take(&mut self.store_failing) {
                    tracing::info!(
                        failed_commits = self.counters.store_errors,
                        "outbox writes work again"
                    );
                }
                self.enforce_quota();
                self.pump();
            }
            Err(e) => {
                self.counters.store_errors += 1;
                // Logged when it starts, not on every retry (20 a second on a full disk).
                if !std::mem::replace(&mut self.store_failing, true) {
                    tracing::error!(
                        pending = self.pending.len(),
                        "outbox write failed, retrying; inputs pause and predictions beyond \
                         {} waiting are not kept until it works: {e}",
                        MAX_PENDING_FLUSHES * self.config.uplink.flush_max_records
                    );
                }
            }
        }
    }

    /// Past the outbox quota, drops the oldest predictions (then drift reports) that are not in
    /// flight, each drop announced by a gap record in its stream ([`crate::quota`]).
    fn enforce_quota(&mut self) {
        let quota = self.config.quota;
        let mut need = self.store.bytes().map_or(0, |b| quota.excess(&b));
        for stream in crate::quota::DROP_ORDER {
            // Each drop frees what is needed or stops at what is in flight or announced.
            for _ in 0..4 {
                if need == 0 {
                    return;
                }
                let floor = self.uplink.drop_floor(stream);
                match self.store.drop_oldest(stream, floor, need, "quota") {
                    Ok(Some(gap)) => tracing::warn!(
                        stream = stream.as_str(),
                        first = gap.first,
                        last = gap.last,
                        records = gap.dropped,
                        max_bytes = quota.max_bytes,
                        "outbox over its quota: oldest records dropped, the gap is announced"
                    ),
                    Ok(None) => break,
                    Err(e) => {
                        self.counters.store_errors += 1;
                        return tracing::error!("outbox quota: cannot drop records: {e}");
                    }
                }
                need = self.store.bytes().map_or(0, |b| quota.excess(&b));
            }
        }
    }

    fn on_connected(&mut self) {
        tracing::info!("uplink connected");
        self.uplink.on_connected();
        self.publish_status(true);
        self.on_link_update(true);
        self.pump();
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        match topics::parse(topic) {
            // A retained message cleared (by the server, after someone else set it).
            Some(Incoming::TrustRoot | Incoming::Desired { .. }) if payload.is_empty() => {
                return;
            }
            Some(Incoming::TrustRoot) => return self.on_root(payload),
            Some(Incoming::Desired { device }) if device == self.config.device => {
                return self.on_directive(payload);
            }
            Some(Incoming::Chunk { device }) if device == self.config.device => {
                if let Some(body) = self.open_from_server(payload, Purpose::Chunk, "chunk") {
                    self.on_chunk(&body);
                }
                return;
            }
            Some(Incoming::Ack { device }) if device == self.config.device => {
                return self.on_ack(payload);
            }
            _ => {}
        }
        let Some(index) = self.assets.iter().position(|a| a.input_topic.as_deref() == Some(topic))
        else {
            return;
        };
        let asset = &mut self.assets[index];
        match reading::parse(payload, asset.features.iter().map(String::as_str)) {
            Ok(reading) => self.on_input(index, reading),
            Err(e) => refused(&mut self.counters, asset, &e),
        }
    }

    /// A reading from any source. One the model cannot take (a feature missing, unavailable or
    /// not finite) is counted by kind, logged when the kind changes, and still counts for drift
    /// and data quality.
    fn on_input(&mut self, index: usize, reading: Reading) {
        let asset = &mut self.assets[index];
        let row = match reading.values(&asset.inputs, &asset.features) {
            Ok(row) => {
                if let Some(problem) = asset.refusing.take() {
                    tracing::info!(asset = %asset.state.id(), "readings are complete again after {}", problem.kind);
                }
                Some(row)
            }
            Err(e) => {
                refused(&mut self.counters, asset, &e);
                None
            }
        };
        self.on_reading(index, reading.cycle, reading.for_drift(), row);
    }

    /// An ack: signed by a server key for this device, naming this outbox's epoch. Only the
    /// records it covers that are in flight are deleted.
    fn on_ack(&mut self, payload: &[u8]) {
        let Some(body) = self.open_from_server(payload, Purpose::Ack, "ack") else { return };
        let ack = match Ack::decode(&body) {
            Ok(ack) => ack,
            Err(e) => {
                self.counters.bad_acks += 1;
                return self.refuse("ack_malformed", "ack", format!("ack: {e}"));
            }
        };
        if ack.epoch != self.epoch {
            return self.refuse(
                "ack_stale_epoch",
                "ack",
                format!(
                    "ack for outbox epoch {:?}, this outbox is {} (an ack from before a \
                     reinstall deletes nothing)",
                    wire::clean_text(&ack.epoch, 32),
                    self.epoch
                ),
            );
        }
        let ranges = self.uplink.releasable(&ack);
        if !ranges.is_empty() {
            match self.store.delete(ack.stream, &ranges) {
                Ok(n) => self.counters.records_acked += n as u64,
                Err(e) => {
                    // Still in flight: the batch is sent again and its next ack deletes it.
                    self.counters.store_errors += 1;
                    return tracing::error!("outbox delete failed (a full disk?): {e}");
                }
            }
        }
        let refused = self.uplink.refusable(&ack);
        if !refused.is_empty() {
            let reason = ack.reason.as_deref().map_or_else(
                || "refused by the server".to_owned(),
                |r| wire::clean_text(r, wire::MAX_REASON_BYTES),
            );
            match self.store.dead_letter(ack.stream, &refused, &reason, clock::now_ms()) {
                Ok(n) => {
                    self.counters.records_dead_lettered += n as u64;
                    tracing::warn!(
                        stream = ack.stream.as_str(),
                        records = n,
                        ranges = ?refused,
                        "the server refused records for good; moved to the dead letters: {reason}"
                    );
                }
                Err(e) => {
                    // Not forgotten: they stay in the outbox and are sent again.
                    tracing::error!("outbox dead-letter move failed: {e}");
                    return;
                }
            }
        }
        self.uplink.on_ack(&ack);
        self.pump();
    }

    /// The server keys this gateway accepts: the root's, and the one its enrollment named
    /// (unless the root revokes it).
    fn server_key(&self, id: &KeyId) -> Option<VerifyingKey> {
        if let Some(key) = self.root.server_keys().and_then(|keys| keys.get(id)) {
            return Some(*key);
        }
        self.config.identity.server_key.filter(|k| &KeyId::of(k) == id && !self.root.is_revoked(id))
    }

    /// The body of a message the server signed for this device and `purpose`, or `None` (the
    /// refusal counted and logged once).
    pub(super) fn open_from_server(
        &mut self,
        payload: &[u8],
        purpose: Purpose,
        what: &'static str,
    ) -> Option<Vec<u8>> {
        let verified = signed::open(payload).and_then(|frame| {
            let key = self
                .server_key(&frame.key_id.key_id())
                .ok_or(SignedError::WrongKey(frame.key_id))?;
            frame.verify(&key, purpose, &self.config.device).map(<[u8]>::to_vec)
        });
        match verified {
            Ok(body) => Some(body),
            Err(e) => {
                if what == "ack" {
                    self.counters.bad_acks += 1;
                }
                let label = match (what, e) {
                    ("ack", SignedError::Unsigned) => "ack_unsigned",
                    ("ack", SignedError::WrongKey(_)) => "ack_wrong_key",
                    ("ack", SignedError::BadSignature) => "ack_bad_signature",
                    (_, SignedError::Unsigned) => "chunk_unsigned",
                    (_, SignedError::WrongKey(_)) => "chunk_wrong_key",
                    (_, SignedError::BadSignature) => "chunk_bad_signature",
                };
                self.refuse(label, what, format!("{what} refused: {e}"));
                None
            }
        }
    }

    /// Counts a refused message under `reason`; logs it the first time for this source.
    pub(super) fn refuse(&mut self, reason: &'static str, source: &str, detail: String) {
        if self.refusals.refuse(reason, source, clock::now_ms()) {
            tracing::warn!(reason, source, "refused: {detail}");
        }
    }

    /// Raises the time floor while the clock moves forward (it moves on by itself otherwise), and
    /// saves it every minute, so a restart with a clock reset to 1970 still knows roughly when
    /// it is.
    fn keep_time_floor(&mut self) {
        clock::raise_floor(clock::now_ms());
        if clock::floor_ms() - self.floor_saved_ms >= FLOOR_SAVE_EVERY_MS {
            self.save_time_floor();
        }
    }

    fn save_time_floor(&mut self) {
        clock::raise_floor(clock::now_ms());
        let floor = clock::floor_ms();
        match self.store.save_time_floor(floor) {
            Ok(()) => self.floor_saved_ms = floor,
            Err(e) => tracing::warn!("cannot save the time floor: {e}"),
        }
    }

    /// The retained status message; its `online: false` form is also the last will.
    fn publish_status(&mut self, online: bool) {
        self.status_sent_ms = clock::now_ms();
        self.status_at_ms = clock::trusted_now_ms().max(self.status_at_ms + 1);
        let backlog = online.then(|| self.backlog()).flatten();
        let order = (self.status_at_ms, self.started_at_ms);
        let payload = status_payload(&self.config, order, online, self.running_models(), backlog);
        let topic = topics::status(&self.config.device);
        let _ = self.client.try_publish(topic, QoS::AtLeastOnce, true, payload);
    }

    fn running_models(&self) -> Vec<RunningModel> {
        self.models
            .iter()
            .map(|m| {
                let manifest = m.manifest();
                RunningModel {
                    model: manifest.model.clone(),
                    release: manifest.release,
                    sha256: manifest.onnx.sha256.clone(),
                }
            })
            .collect()
    }

    /// Sends outbox records while the uplink window has room, each batch signed and kept
    /// under the broker's packet limit.
    fn pump(&mut self) {
        self.uplink.refill(clock::monotonic_ms());
        for stream in PRIORITY {
            while let Some(req) = self.uplink.next_request(stream) {
                let mut records = match self.store.read(stream, req.after, req.upto, req.limit) {
                    Ok(read) => {
                        for (seq, reason) in &read.quarantined {
                            self.quarantined += 1;
                            tracing::error!(
                                stream = stream.as_str(),
                                seq,
                                "outbox row does not decode, moved to quarantine (not sent): {}",
                                wire::clean_text(reason, 200)
                            );
                        }
                        match (read.records.is_empty(), read.quarantined.is_empty()) {
                            (true, true) if req.attempt > 1 => {
                                self.uplink.on_nothing(&req);
                                continue;
                            }
                            (true, true) => break,
                            (true, false) => continue,
                            _ => read.records,
                        }
                    }
                    // This stream waits for the next pump; the others go on.
                    Err(e) => {
                        self.counters.store_errors += 1;
                        tracing::error!(stream = stream.as_str(), "outbox read failed: {e}");
                        break;
                    }
                };
                let mut batch = UplinkBatch {
                    v: WIRE_VERSION,
                    device: self.config.device.clone(),
                    epoch: self.epoch.clone(),
                    stream,
                    records: Vec::new(),
                };
                let body = loop {
                    batch.records = records;
                    let body = wire::encode(&batch);
                    if body.len() <= MAX_BATCH_BYTES || batch.records.len() == 1 {
                        break body;
                    }
                    records = std::mem::take(&mut batch.records);
                    records.truncate(records.len() / 2);
                };
                let records = &batch.records;
                let (first, last) = (records[0].seq, records[records.len() - 1].seq);
                let topic = topics::uplink(&self.config.device, stream);
                let frame = signed::seal(
                    &self.config.identity.key,
                    Purpose::Uplink(stream),
                    &self.config.device,
                    &body,
                );
                if let Some(floor) = self.uplink.reservation(stream, last) {
                    // Recorded before the send: after a restart the quota still spares what
                    // this run sent. Sent regardless when the store refuses (a full disk is when
                    // draining matters most): this run's own floor still holds.
                    match self.store.save_sent_floor(stream, floor) {
                        Ok(()) => self.uplink.recorded_floor(stream, floor),
                        Err(e) => {
                            self.counters.store_errors += 1;
                            // Counted; the failing commits are logged where they happen.
                            tracing::debug!(
                                stream = stream.as_str(),
                                "cannot record the drop floor: {e}"
                            );
                        }
                    }
                }
                if self.client.try_publish(topic, QoS::AtLeastOnce, false, frame).is_err() {
                    return;
                }
                self.counters.batches_sent += 1;
                if req.attempt > 1 {
                    self.counters.resends += 1;
                }
                self.uplink.on_sent(&req, first, last, clock::monotonic_ms());
            }
        }
    }

    /// Every stream's waiting records together.
    fn backlog(&self) -> Option<wire::Backlog> {
        let mut total = wire::Backlog { records: 0, oldest_at_ms: None };
        for stream in Stream::ALL {
            let b = self.store.backlog(stream).ok()?;
            total.records += b.records;
            total.oldest_at_ms = match (total.oldest_at_ms, b.oldest_at_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Some(total)
    }

    /// The snapshot of everything the status file, the local page and `/metrics` show.
    fn status(&self) -> Status {
        let mut backlog = BTreeMap::new();
        let mut oldest: Option<i64> = None;
        for stream in Stream::ALL {
            if let Ok(b) = self.store.backlog(stream) {
                backlog.insert(stream.as_str().to_owned(), b.records);
                oldest = match (oldest, b.oldest_at_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        let assets = self
            .assets
            .iter()
            .map(|a| {
                let manifest = self.models[a.model].manifest();
                AssetStatus {
                    asset: a.state.id().to_string(),
                    level: a.state.level(),
                    model: manifest.model.to_string(),
                    release: manifest.release.0,
                    output: match manifest.output.kind {
                        OutputKind::RemainingUsefulLife => "remaining_useful_life".into(),
                        OutputKind::AnomalyScore => "anomaly_score".into(),
                    },
                    units: manifest.output.units.clone(),
                    warning: manifest.output.alerts.warning,
                    alarm: manifest.output.alerts.alarm,
                    latest: a.history.last(),
                    alert: a.alert.clone(),
                    drift: a.drift_status.clone(),
                    input: a.refusing.clone(),
                }
            })
            .collect();
        let mut counters = self.counters.clone();
        counters.refused =
            self.refusals.counts().iter().map(|(r, n)| ((*r).to_owned(), *n)).collect();
        counters.pin_lockouts = self.pin_guard.lockouts();
        Status {
            device: self.config.device.to_string(),
            site: self.config.site.clone(),
            agent_version: crate::VERSION.to_owned(),
            at_ms: clock::now_ms(),
            started_at_ms: self.started_at_ms,
            uplink_connected: self.uplink.is_connected(),
            epoch: self.epoch.clone(),
            backlog,
            oldest_unacked_at_ms: oldest,
            disk_bytes: dir_bytes(&self.config.data_dir),
            assets,
            models: self.running_models(),
            update: self.update.machine.status(),
            trust_root_version: self.root.version(),
            trust_root_expired: self.root.is_expired(clock::trusted_now()),
            outbox_quarantined: self.quarantined,
            outbox_dead_letters: self.store.dead_letters().unwrap_or(0),
            outbox_bytes: self.store.bytes().map_or(0, |b| b.values().sum()),
            outbox_max_bytes: self.config.quota.max_bytes,
            dropped: self
                .store
                .dropped()
                .unwrap_or_default()
                .into_iter()
                .map(|(s, n)| (s.as_str().to_owned(), n))
                .collect(),
            outbox_set_aside: self.set_aside.as_ref().map(|s| status::SetAside {
                moved_to: s.moved_to.display().to_string(),
                reason: s.reason.clone(),
            }),
            clock: status::ClockStatus {
                untrusted: clock::is_untrusted(),
                floor_ms: clock::floor_ms(),
            },
            last_seq: Stream::ALL
                .into_iter()
                .filter_map(|s| Some((s.as_str().to_owned(), self.store.last_seq(s).ok()?)))
                .collect(),
            counters,
            inference_latency: self.latency.clone(),
        }
    }

    /// Writes `status.json` and publishes the snapshot the local page serves.
    fn write_status(&mut self) {
        self.publish_snapshot(true);
    }

    /// Publishes the snapshot the local page serves (every tick, in memory) and, when `to_file`,
    /// writes it to `status.json` too (every `status_file_secs`: an SD card's wear).
    fn publish_snapshot(&mut self, to_file: bool) {
        let status = self.status();
        if to_file {
            self.status_file_ms = clock::monotonic_ms();
            let path = self.config.data_dir.join("status.json");
            let tmp = path.with_extension("json.tmp");
            let body = serde_json::to_vec_pretty(&status).unwrap_or_default();
            if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, &path)) {
                tracing::debug!("cannot write {}: {e}", path.display());
            }
        }
        let history =
            self.assets.iter().map(|a| (a.state.id().to_string(), a.history.to_vec())).collect();
        self.snapshot.send_replace(Arc::new(Snapshot { status, history }));
    }

    async fn shut_down(&mut self) {
        self.close_drift_intervals(clock::now_ms(), true);
        self.flush();
        self.save_time_floor();
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

/// Counts a reading the model cannot take by its kind; logs it when the asset's kind changes.
fn refused(counters: &mut Counters, asset: &mut Asset, e: &reading::ReadingError) {
    *counters.readings_rejected.entry(e.kind().to_owned()).or_default() += 1;
    if status::input_problem(&mut asset.refusing, e.kind(), clock::now_ms()) {
        tracing::warn!(asset = %asset.state.id(), kind = e.kind(), "rejected reading: {e}");
    }
}

/// The asset's PLC poll: a register per monitored feature (the model's inputs and what its drift
/// profile watches). A feature without one, or whose register's unit is not the model's, is
/// never read (it is missing in every reading); a register for a feature the bundle does not
/// monitor is not read either. Each is logged.
fn modbus_poll(index: usize, asset: &Asset, m: &ModbusConfig, manifest: &Manifest) -> ModbusPoll {
    let id = asset.state.id();
    let registers = asset
        .features
        .iter()
        .map(|feature| {
            let want = manifest.input.features.iter().find(|f| &f.name == feature);
            let Some((register, unit)) = m.registers.get(feature) else {
                match want {
                    Some(_) => tracing::error!(asset = %id, feature, "no Modbus register for this model input: the model cannot predict"),
                    None => tracing::warn!(asset = %id, feature, "no Modbus register for this feature the drift profile watches: drift reports flag it missing"),
                }
                return None;
            };
            if let (Some(unit), Some(want)) = (unit, want)
                && *unit != want.unit
            {
                tracing::error!(asset = %id, feature, "the register's unit is {unit:?}, the model's {:?}: it is not read", want.unit);
                return None;
            }
            Some(*register)
        })
        .collect();
    for name in m.registers.keys().filter(|n| !asset.features.contains(n)) {
        tracing::warn!(asset = %id, feature = name, "the model does not monitor this feature: its register is not read");
    }
    ModbusPoll {
        asset: index,
        unit_id: m.unit_id,
        every: m.poll,
        timeout: m.timeout,
        map: Map::new(registers),
    }
}

/// Bytes of the files under `dir` (the outbox with its WAL, staged downloads, the status file).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Logs, in one line per report, each feature whose drift verdict or data-quality flags got
/// worse since the last report; returns how many.
fn local_drift_alerts(previous: &BTreeMap<String, FeatureStatus>, report: &DriftReport) -> u64 {
    let mut raised = Vec::new();
    for f in &report.features {
        let before = previous.get(&f.name);
        let worse = f.severity >= Severity::Warn && before.is_none_or(|b| f.severity > b.severity);
        let new_flags: Vec<&str> = f
            .flags
            .iter()
            .filter(|q| before.is_none_or(|b| !b.flags.contains(q)))
            .map(|q| q.as_str())
            .collect();
        if worse || !new_flags.is_empty() {
            let shift = f.shift.map_or(String::new(), |s| format!(" shift {s:.2}"));
            let flags = if f.flags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", new_flags.join(","))
            };
            raised.push(format!("{} {}{shift}{flags}", f.name, f.severity.as_str()));
        }
    }
    if !raised.is_empty() {
        tracing::warn!(asset = %report.asset, "drift alert: {}", raised.join("; "));
    }
    raised.len() as u64
}
