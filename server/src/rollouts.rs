//! The shell around the rollout engine ([`crate::rollout`]): the model registry, directives
//! (signed with the server key, kept per device, published retained), chunk delivery with an
//! optional per-device byte rate, and the audit log. Everything here runs on the server's one
//! writer task; the HTTP API sends it [`Request`]s.

use crate::config;
use crate::db::Db;
use crate::delivery::{self, Next};
use crate::drift::Profiles;
use crate::rollout::{self, Action, Command, DeviceState, Rollout, Spec};
use crate::rollout_db::{ReleaseRow, StoredDirective};
use crate::writer::{Refusal, Request, db_error, refuse};
use base64::Engine as _;
use millwright_agent::inference::Model;
use millwright_shared::bundle::sha256_hex;
use millwright_shared::directive::{self, Activation, BundleRef, Directive};
use millwright_shared::gates::Gates;
use millwright_shared::signed::{self, Purpose};
use millwright_shared::trust::Envelope;
use millwright_shared::wire::{self, Chunk, FetchRequest, UpdateReport, WIRE_VERSION};
use millwright_shared::{DeviceId, ModelName, Release, topics};
use rumqttc::{AsyncClient, QoS};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use time::OffsetDateTime;

/// Chunks sent for one request at most.
pub const MAX_CHUNKS_PER_REQUEST: u32 = 16;

pub struct Rollouts {
    config: config::Rollouts,
    registry_dir: PathBuf,
    profiles: Arc<RwLock<Profiles>>,
    /// Bytes of chunk data sent per device since start.
    pub served: Arc<Mutex<HashMap<String, u64>>>,
    /// Chunks asked for and not sent yet, drained by one task ([`Rollouts::on_fetch`] starts
    /// it; it ends when this is dropped).
    delivery: Arc<Delivery>,
    drain: Option<tokio::sync::oneshot::Sender<()>>,
    plans: HashMap<String, (BundleRef, Arc<Vec<u8>>)>,
    /// Devices whose latest directive the MQTT client's queue could not take: published again
    /// on every tick until it does.
    unpublished: BTreeSet<String>,
    /// The active rollouts as last saved (loaded once): the engine works on these, so a
    /// report neither reads nor rewrites a whole rollout, only the devices it changed.
    active: Option<Vec<Rollout>>,
    /// Active rollouts that reports changed and that are not saved yet
    /// ([`Rollouts::save_reported`]).
    unsaved: BTreeSet<String>,
    /// Directives stored and not yet published ([`Rollouts::publish_issued`]).
    issued: Vec<(DeviceId, Vec<u8>)>,
}

/// Who a queued chunk is for, and where its bytes are: the bundle and the chunk's first byte.
type Slice = (DeviceId, Arc<Vec<u8>>, usize);

/// The chunk queue and the drain task's alarm clock.
pub struct Delivery {
    queue: Mutex<delivery::Queue<Slice>>,
    wake: tokio::sync::Notify,
}

impl Delivery {
    pub fn stats(&self) -> delivery::Stats {
        self.queue.lock().map(|q| q.stats()).unwrap_or_default()
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

fn ms_to_time(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A revert goes straight back: no shadow, no probation.
fn revert_activation() -> Activation {
    Activation {
        shadow_secs: 0,
        probation_secs: 0,
        gates: Gates { min_predictions: 0, ..Gates::default() },
    }
}

impl Rollouts {
    pub fn new(
        config: config::Rollouts,
        data_dir: &std::path::Path,
        profiles: Arc<RwLock<Profiles>>,
    ) -> Rollouts {
        let (device_rate, fleet_rate) =
            (config.delivery_bytes_per_sec, config.fleet_delivery_bytes_per_sec);
        Rollouts {
            config,
            registry_dir: data_dir.join("registry"),
            profiles,
            served: Arc::new(Mutex::new(HashMap::new())),
            delivery: Arc::new(Delivery {
                queue: Mutex::new(delivery::Queue::new(device_rate, fleet_rate)),
                wake: tokio::sync::Notify::new(),
            }),
            drain: None,
            plans: HashMap::new(),
            unpublished: BTreeSet::new(),
            active: None,
            unsaved: BTreeSet::new(),
            issued: Vec::new(),
        }
    }

    /// The active rollouts, from the database the first time (`None` if it cannot be read;
    /// they are read again next time). Hand them back with [`Rollouts::put_active`].
    fn take_active(&mut self, db: &Db) -> Option<Vec<Rollout>> {
        if let Some(active) = self.active.take() {
            return Some(active);
        }
        match db.rollouts() {
            Ok(all) => Some(all.into_iter().filter(|r| r.state.is_active()).collect()),
            Err(e) => {
                tracing::error!("cannot read the rollouts: {e}");
                None
            }
        }
    }

    /// Keeps the rollouts that are still active.
    fn put_active(&mut self, mut active: Vec<Rollout>) {
        active.retain(|r| r.state.is_active());
        self.active = Some(active);
    }

    pub fn tick(&self) -> Duration {
        self.config.tick
    }

    /// The root document the server publishes (retained) for gateways.
    pub fn root_bytes(&self) -> &[u8] {
        &self.config.root_bytes
    }

    /// The chunk queue (its counts are in `/api/v1/health`).
    pub fn delivery(&self) -> Arc<Delivery> {
        self.delivery.clone()
    }

    pub fn root_expired(&self) -> bool {
        self.config.root_expired
    }

    /// Adds the drift profiles of every registered release.
    pub fn load_profiles(&self, db: &Db) {
        let Ok(rows) = db.releases(None) else { return };
        for row in rows {
            if let Ok(bytes) = std::fs::read(&row.path)
                && let Ok(raw) = millwright_shared::bundle::RawBundle::parse(&bytes)
                && let Ok(m) = raw.manifest_unverified()
                && let Some(profile) = m.drift
                && let Ok(mut p) = self.profiles.write()
            {
                p.0.insert((row.model.clone(), row.release), profile);
            }
        }
    }

    pub async fn handle(
        &mut self,
        db: &mut Db,
        client: &AsyncClient,
        request: Request,
        now_ms: i64,
    ) {
        match request {
            Request::Register { bundle, actor, reply } => {
                let result = self.register(db, &bundle, &actor, now_ms).map(|r| to_json(&r));
                let _ = reply.send(result);
            }
            Request::Start { spec, actor, reason, reply } => {
                let result = self.start(db, client, spec, &actor, &reason, now_ms);
                let _ = reply.send(self.after_refusal(result).map(|r| to_json(&r)));
            }
            Request::Act { id, command, actor, reason, reply } => {
                let result = self.act(db, client, &id, command, &actor, &reason, now_ms);
                let _ = reply.send(self.after_refusal(result).map(|r| to_json(&r)));
            }
            Request::AckAlert { reply, .. }
            | Request::Enroll { reply, .. }
            | Request::Revoke { reply, .. } => {
                let _ = reply.send(Err(refuse(500, "not a rollout request")));
            }
        }
    }

    /// Registers a signed bundle: release keys, the agent's own loader with its golden cases,
    /// and a release number above every registered one of that model.
    fn register(
        &mut self,
        db: &mut Db,
        bytes: &[u8],
        actor: &str,
        now_ms: i64,
    ) -> Result<ReleaseRow, Refusal> {
        if self.config.root.is_expired(ms_to_time(now_ms)) {
            return Err(refuse(
                409,
                "the trust root has expired: sign and install a newer root before registering",
            ));
        }
        let verified = self
            .config
            .root
            .verify_bundle(bytes, ms_to_time(now_ms))
            .map_err(|e| refuse(422, format!("bundle refused: {e}")))?;
        let manifest = verified.manifest().clone();
        Model::load(&verified)
            .map_err(|e| refuse(422, format!("model refused by the agent's loader: {e}")))?;
        let model = manifest.model.to_string();
        let sha256 = sha256_hex(bytes);
        let existing = db.releases(Some(&model)).map_err(db_error)?;
        if let Some(same) = existing.iter().find(|r| r.sha256 == sha256) {
            return Err(refuse(
                409,
                format!("this bundle is already registered as release {} of {model}", same.release),
            ));
        }
        if let Some(newest) = existing.iter().map(|r| r.release).max()
            && manifest.release.0 <= newest
        {
            return Err(refuse(
                409,
                format!(
                    "release {} of {model} is not newer than registered release {newest}; releases are immutable",
                    manifest.release.0
                ),
            ));
        }
        let dir = self.registry_dir.join(&model);
        let path = dir.join(format!("{}-{}.mwb", manifest.release.0, &sha256[..12]));
        let write = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(path.with_extension("tmp"), bytes))
            .and_then(|()| std::fs::rename(path.with_extension("tmp"), &path));
        write.map_err(|e| refuse(500, format!("cannot store the bundle: {e}")))?;
        let row = ReleaseRow {
            model: model.clone(),
            release: manifest.release.0,
            version: manifest.version.clone(),
            sha256,
            size: bytes.len() as u64,
            asset_type: manifest.asset_type.clone(),
            path: path.to_string_lossy().into_owned(),
            registered_ms: now_ms,
            registered_by: actor.to_owned(),
        };
        let manifest_json = serde_json::to_string(&manifest).unwrap_or_default();
        db.insert_release(&row, &manifest_json).map_err(db_error)?;
        let _ = db.audit(
            now_ms,
            actor,
            "register",
            &format!("{model}/{}", row.release),
            "",
            &row.version,
        );
        if let Some(profile) = manifest.drift
            && let Ok(mut p) = self.profiles.write()
        {
            p.0.insert((model.clone(), row.release), profile);
        }
        tracing::info!(%model, release = row.release, actor, "release registered");
        Ok(row)
    }

    fn start(
        &mut self,
        db: &mut Db,
        client: &AsyncClient,
        spec: Spec,
        actor: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Rollout, Refusal> {
        if db.release(&spec.model, spec.release).map_err(db_error)?.is_none() {
            return Err(refuse(
                422,
                format!("release {} of {} is not registered", spec.release, spec.model),
            ));
        }
        let mut active =
            self.take_active(db).ok_or_else(|| refuse(500, "cannot read the rollouts"))?;
        if let Some(busy) = active.iter().find(|r| r.spec.model == spec.model) {
            // Refused: `after_refusal` has the active rollouts read again.
            let busy = format!("rollout {} of {} is still {:?}", busy.id, spec.model, busy.state);
            return Err(refuse(409, busy));
        }
        let started = self.plan_and_start(db, client, spec, actor, reason, now_ms);
        if let Ok(r) = &started {
            active.push(r.clone());
        }
        self.put_active(active);
        started
    }

    /// After a refused hand action or start: what is in memory is read again from the
    /// database, so nothing the caller was told failed takes effect.
    fn after_refusal<T>(&mut self, result: Result<T, Refusal>) -> Result<T, Refusal> {
        if result.is_err() {
            self.active = None;
        }
        result
    }

    fn plan_and_start(
        &mut self,
        db: &mut Db,
        client: &AsyncClient,
        spec: Spec,
        actor: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Rollout, Refusal> {
        let inventory = db.devices().map_err(db_error)?;
        let id = format!("r{}", db.rollout_count().map_err(db_error)? + 1);
        let mut r = rollout::plan(id, spec, &inventory, actor.to_owned(), now_ms)
            .map_err(|e| refuse(422, e))?;
        let detail = format!("{} → release {}: waves {:?}", r.spec.model, r.spec.release, r.waves);
        let _ = db.audit(now_ms, actor, "start", &r.id, reason, &detail);
        tracing::info!(id = %r.id, %detail, "rollout started");
        let actions = rollout::step(&mut r, now_ms);
        self.execute(db, client, &mut r, actions, now_ms);
        db.save_rollout(&mut r, now_ms).map_err(db_error)?;
        Ok(r)
    }

    #[allow(clippy::too_many_arguments)]
    fn act(
        &mut self,
        db: &mut Db,
        client: &AsyncClient,
        id: &str,
        command: Command,
        actor: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Rollout, Refusal> {
        let mut active =
            self.take_active(db).ok_or_else(|| refuse(500, "cannot read the rollouts"))?;
        let result = match active.iter().position(|r| r.id == id) {
            Some(i) => self.act_on(db, client, &mut active[i], command, actor, reason, now_ms),
            None => match db.rollout(id) {
                Ok(Some(mut r)) => {
                    let acted = self.act_on(db, client, &mut r, command, actor, reason, now_ms);
                    if acted.is_ok() {
                        active.push(r);
                    }
                    acted
                }
                Ok(None) => Err(refuse(404, format!("no rollout {id}"))),
                Err(e) => Err(db_error(e)),
            },
        };
        self.put_active(active);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn act_on(
        &mut self,
        db: &mut Db,
        client: &AsyncClient,
        r: &mut Rollout,
        command: Command,
        actor: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Rollout, Refusal> {
        let id = r.id.clone();
        let actions = rollout::act(r, command, reason, now_ms).map_err(|e| refuse(409, e))?;
        let action = serde_json::to_value(command)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = db.audit(now_ms, actor, &action, &id, reason, "");
        tracing::info!(id, action, actor, reason, "rollout action");
        self.execute(db, client, r, actions, now_ms);
        db.save_rollout(r, now_ms).map_err(db_error)?;
        Ok(r.clone())
    }

    /// A stored update report: the rollout that sent its directive takes it into account.
    pub fn on_report(
        &mut self,
        db: &mut Db,
        client: &AsyncClient,
        device: &str,
        report: &UpdateReport,
        now_ms: i64,
    ) {
        let Some(mut active) = self.take_active(db) else { return };
        for r in &mut active {
            let ours = r.devices.iter().any(|d| {
                d.device == device && d.directive.is_some() && d.directive == report.directive
            });
            if !ours {
                continue;
            }
            let actions = rollout::on_report(r, device, report, now_ms);
            self.execute(db, client, r, actions, now_ms);
            if r.state.is_active() {
                self.unsaved.insert(r.id.clone());
            } else {
                // It leaves `active` below, so [`Rollouts::save_reported`] would not see it:
                // its end is saved now (once a rollout).
                if let Err(e) = db.save_rollout(r, now_ms) {
                    tracing::error!(id = %r.id, "cannot save the rollout: {e}");
                }
            }
        }
        self.put_active(active);
    }

    /// Saves the rollouts reports changed since the last call: once per group commit, not
    /// once per report (a wave of 800 gateways sends ~5,000 reports, each save a commit).
    pub fn save_reported(&mut self, db: &mut Db, now_ms: i64) {
        if self.unsaved.is_empty() {
            return;
        }
        let unsaved = std::mem::take(&mut self.unsaved);
        let Some(mut active) = self.active.take() else { return };
        for r in active.iter_mut().filter(|r| unsaved.contains(&r.id)) {
            if let Err(e) = db.save_rollout(r, now_ms) {
                tracing::error!(id = %r.id, "cannot save the rollout: {e}");
            }
        }
        self.put_active(active);
    }

    /// Advances every active rollout, after publishing again the directives that did not go
    /// out.
    pub fn on_tick(&mut self, db: &mut Db, client: &AsyncClient, now_ms: i64) {
        self.republish(db, client);
        let Some(mut active) = self.take_active(db) else { return };
        let waiting = self.delivery.queue.lock().unwrap_or_else(|e| e.into_inner()).take_waiting();
        for r in &mut active {
            let before = crate::rollout_db::header_json(r).ok();
            rollout::on_waiting(r, &waiting, now_ms);
            let actions = rollout::step(r, now_ms);
            self.execute(db, client, r, actions, now_ms);
            let moved = !r.changed.is_empty() || crate::rollout_db::header_json(r).ok() != before;
            if moved && let Err(e) = db.save_rollout(r, now_ms) {
                tracing::error!(id = %r.id, "cannot save the rollout: {e}");
            }
        }
        self.put_active(active);
    }

    fn execute(
        &mut self,
        db: &mut Db,
        client: &AsyncClient,
        r: &mut Rollout,
        actions: Vec<Action>,
        now_ms: i64,
    ) {
        db.batched(|db| self.execute_in(db, r, actions, now_ms));
        self.publish_issued(client);
    }

    fn execute_in(&mut self, db: &mut Db, r: &mut Rollout, actions: Vec<Action>, now_ms: i64) {
        for action in actions {
            let (device, release, kind) = match action {
                Action::Audit { action, detail } => {
                    tracing::info!(id = %r.id, action, detail, "rollout");
                    let _ = db.audit(now_ms, "server", &action, &r.id, "", &detail);
                    continue;
                }
                Action::Install { device } => (device, r.spec.release, directive::Action::Install),
                Action::Revert { device, release } => (device, release, directive::Action::Revert),
            };
            let activation = match kind {
                directive::Action::Install => r.spec.activation.clone(),
                directive::Action::Revert => revert_activation(),
            };
            match self.issue(db, &device, &r.id, &r.spec.model, release, kind, activation, now_ms) {
                Ok(seq) => {
                    if let Some(d) = r.device_mut(&device) {
                        d.directive = Some(seq);
                    }
                }
                Err(e) => {
                    tracing::error!(id = %r.id, device, "cannot issue a directive: {}", e.message);
                    if let Some(d) = r.device_mut(&device) {
                        d.state = DeviceState::Failed;
                        d.reason = Some(e.message.clone());
                    }
                    let _ = db.audit(
                        now_ms,
                        "server",
                        "directive_failed",
                        &r.id,
                        "",
                        &format!("{device}: {}", e.message),
                    );
                }
            }
        }
    }

    fn plan_of(&mut self, row: &ReleaseRow) -> Result<(BundleRef, Arc<Vec<u8>>), Refusal> {
        if let Some(plan) = self.plans.get(&row.sha256) {
            return Ok(plan.clone());
        }
        let bytes = std::fs::read(&row.path)
            .map_err(|e| refuse(500, format!("cannot read {}: {e}", row.path)))?;
        if sha256_hex(&bytes) != row.sha256 {
            return Err(refuse(500, format!("registry file {} changed on disk", row.path)));
        }
        let chunk = self.config.chunk_size;
        let plan = BundleRef {
            sha256: row.sha256.clone(),
            size: bytes.len() as u64,
            chunk_size: chunk,
            chunks: bytes.chunks(chunk as usize).map(sha256_hex).collect(),
        };
        let entry = (plan, Arc::new(bytes));
        self.plans.insert(row.sha256.clone(), entry.clone());
        Ok(entry)
    }

    /// Signs a directive for `device` and stores it as the device's latest; it is published
    /// (retained) by [`Rollouts::publish_issued`] after the writes are committed.
    #[allow(clippy::too_many_arguments)]
    fn issue(
        &mut self,
        db: &mut Db,
        device: &str,
        rollout: &str,
        model: &str,
        release: u64,
        action: directive::Action,
        activation: Activation,
        now_ms: i64,
    ) -> Result<u64, Refusal> {
        let row = db.release(model, release).map_err(db_error)?.ok_or_else(|| {
            refuse(422, format!("release {release} of {model} is not in the registry"))
        })?;
        let (bundle, _) = self.plan_of(&row)?;
        let seq = db.next_directive_seq().map_err(db_error)?;
        let now = ms_to_time(now_ms);
        let expires_at = now + self.config.directive_ttl;
        let d = Directive {
            v: directive::DIRECTIVE_VERSION,
            device: DeviceId::new(device).map_err(|e| refuse(422, e))?,
            seq,
            issued_at: now,
            expires_at,
            rollout: rollout.to_owned(),
            action,
            model: ModelName::new(model).map_err(|e| refuse(422, e))?,
            release: Release(release),
            bundle,
            activation,
        };
        let envelope = d.sign(&self.config.server_key).to_bytes();
        let stored = StoredDirective {
            device: device.to_owned(),
            seq,
            rollout: rollout.to_owned(),
            envelope: envelope.clone(),
            expires_ms: (expires_at.unix_timestamp_nanos() / 1_000_000) as i64,
        };
        db.save_directive(&stored).map_err(db_error)?;
        self.unpublished.remove(device);
        self.issued.push((d.device, envelope));
        tracing::info!(device, seq, release, ?action, "directive issued");
        Ok(seq)
    }

    /// Publishes the directives issued since the last call, once they are stored.
    fn publish_issued(&mut self, client: &AsyncClient) {
        for (device, envelope) in std::mem::take(&mut self.issued) {
            self.publish_directive(client, &device, envelope);
        }
    }

    /// Publishes a device's directive (retained) without waiting; what the client's queue
    /// cannot take now is kept for the next tick.
    fn publish_directive(&mut self, client: &AsyncClient, device: &DeviceId, envelope: Vec<u8>) {
        let topic = topics::desired(device);
        if client.try_publish(topic, QoS::AtLeastOnce, true, envelope).is_err()
            && self.unpublished.insert(device.to_string())
            && self.unpublished.len().is_power_of_two()
        {
            tracing::warn!(
                waiting = self.unpublished.len(),
                "the MQTT client's queue is full: directives are published again on the next tick"
            );
        }
    }

    /// The directives that did not fit the client's queue, from the database (the latest of
    /// each device, whatever happened since).
    fn republish(&mut self, db: &Db, client: &AsyncClient) {
        for device in std::mem::take(&mut self.unpublished) {
            match (DeviceId::new(&device), db.directive_of(&device)) {
                (Ok(id), Ok(Some(d))) => self.publish_directive(client, &id, d.envelope),
                (Ok(_), Ok(None)) | (Err(_), _) => {}
                (Ok(_), Err(e)) => {
                    tracing::error!(device, "cannot read the directive to publish: {e}");
                    self.unpublished.insert(device);
                }
            }
        }
    }

    /// After (re)connecting to the broker: the root and every device's latest directive, retained
    /// (an embedded broker forgets retained messages when the server restarts).
    pub fn on_connected(&mut self, db: &Db, client: &AsyncClient) {
        let _ = client.try_publish(
            topics::TRUST_ROOT,
            QoS::AtLeastOnce,
            true,
            self.config.root_bytes.clone(),
        );
        let Ok(directives) = db.directives() else { return };
        for d in directives {
            if let Ok(device) = DeviceId::new(&d.device) {
                self.publish_directive(client, &device, d.envelope);
            }
        }
    }

    /// A device came online: a directive it is still working on that expires within half its
    /// lifetime is issued again, fresh.
    pub fn on_device_online(
        &mut self,
        db: &mut Db,
        client: &AsyncClient,
        device: &str,
        now_ms: i64,
    ) {
        // One indexed read: every online status comes here (1,000 a second at 10,000
        // gateways), and reading every directive each time (as before) stalled ingest once a
        // rollout had issued a few thousand (434 messages/s instead of ~2,000).
        let Ok(Some(current)) = db.directive_of(device) else { return };
        let half = (self.config.directive_ttl.as_millis() / 2) as i64;
        if current.expires_ms - now_ms > half {
            return;
        }
        let Some(mut active) = self.take_active(db) else { return };
        if let Some(r) = active.iter_mut().find(|r| r.id == current.rollout) {
            self.refresh(db, client, r, device, current.seq, now_ms);
        }
        self.put_active(active);
    }

    /// Issues `device` its directive of rollout `r` again, fresh, if it still waits on it.
    fn refresh(
        &mut self,
        db: &mut Db,
        client: &AsyncClient,
        r: &mut Rollout,
        device: &str,
        seq: u64,
        now_ms: i64,
    ) {
        let Some(run) =
            r.devices.iter().find(|d| d.device == device && d.directive == Some(seq)).cloned()
        else {
            return;
        };
        let (release, kind, activation) = match run.state {
            DeviceState::Notified => {
                (r.spec.release, directive::Action::Install, r.spec.activation.clone())
            }
            DeviceState::Reverting => match run.previous {
                Some(previous) => (previous, directive::Action::Revert, revert_activation()),
                None => return,
            },
            _ => return,
        };
        let model = r.spec.model.clone();
        let issued = self.issue(db, device, &r.id, &model, release, kind, activation, now_ms);
        self.publish_issued(client);
        match issued {
            Ok(seq) => {
                if let Some(d) = r.device_mut(device) {
                    d.directive = Some(seq);
                }
                if let Err(e) = db.save_rollout(r, now_ms) {
                    tracing::error!(id = %r.id, "cannot save the rollout: {e}");
                }
            }
            Err(e) => tracing::error!(device, "cannot refresh the directive: {}", e.message),
        }
    }

    /// A chunk request (signed by the device): chunks of the bundle its current directive
    /// names, and no other, at most [`MAX_CHUNKS_PER_REQUEST`] at a time, queued for the
    /// drain task ([`delivery::Queue`]: paced per device and for the fleet, a chunk still
    /// queued not queued again), which signs each for the device as it goes. A request without such a
    /// directive is refused with the reason (for counting).
    pub fn on_fetch(
        &mut self,
        db: &Db,
        client: &AsyncClient,
        device: &DeviceId,
        payload: &[u8],
    ) -> Result<(), (&'static str, String)> {
        let request = FetchRequest::decode(payload)
            .map_err(|e| ("malformed", format!("chunk request: {e}")))?;
        let directed = db
            .directive_of(device.as_str())
            .ok()
            .flatten()
            .and_then(|d| Envelope::parse(&d.envelope).ok())
            .and_then(|e| e.payload_bytes().ok())
            .and_then(|p| serde_json::from_slice::<Directive>(&p).ok());
        if directed.as_ref().is_none_or(|d| d.bundle.sha256 != request.sha256) {
            return Err((
                "no_directive",
                format!(
                    "chunk request for bundle {} that no directive for this device names",
                    millwright_shared::wire::clean_text(&request.sha256, 64)
                ),
            ));
        }
        let row = match db.release_by_sha(&request.sha256) {
            Ok(Some(row)) => row,
            _ => return Err(("no_directive", "the directed bundle is not registered".into())),
        };
        let (plan, bytes) = self.plan_of(&row).map_err(|e| ("internal", e.message))?;
        let count = request.count.min(MAX_CHUNKS_PER_REQUEST);
        {
            let mut queue = self.delivery.queue.lock().unwrap_or_else(|e| e.into_inner());
            for index in request.first..request.first.saturating_add(count) {
                let Some(len) = plan.chunk_len(index) else { continue };
                queue.request(delivery::Item {
                    device: device.to_string(),
                    sha256: request.sha256.clone(),
                    index,
                    len,
                    payload: (
                        device.clone(),
                        bytes.clone(),
                        index as usize * plan.chunk_size as usize,
                    ),
                });
            }
        }
        if self.drain.is_none() {
            let (stop, stopped) = tokio::sync::oneshot::channel();
            self.drain = Some(stop);
            let (delivery, served) = (self.delivery.clone(), self.served.clone());
            let key = self.config.server_key.clone();
            tokio::spawn(drain(delivery, client.clone(), key, served, stopped));
        }
        self.delivery.wake.notify_one();
        Ok(())
    }
}

/// Sends the queued chunks as [`delivery::Queue`] hands them out, each signed for its device,
/// until `stop` goes. A publish waits for room in the client's queue; it fails only once the
/// client is gone.
async fn drain(
    delivery: Arc<Delivery>,
    client: AsyncClient,
    key: ed25519_dalek::SigningKey,
    served: Arc<Mutex<HashMap<String, u64>>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let start = tokio::time::Instant::now();
    loop {
        let now_us = start.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        let next = delivery.queue.lock().unwrap_or_else(|e| e.into_inner()).next(now_us);
        let item = match next {
            Next::Send(item) => item,
            Next::Wait(at) => {
                let at = start + Duration::from_micros(at);
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep_until(at) => {}
                    _ = delivery.wake.notified() => {}
                }
                continue;
            }
            Next::Idle => {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = delivery.wake.notified() => {}
                }
                continue;
            }
        };
        let (device, bytes, first) = &item.payload;
        let Some(data) =
            usize::try_from(item.len).ok().and_then(|len| bytes.get(*first..first + len))
        else {
            continue;
        };
        let chunk = Chunk {
            v: WIRE_VERSION,
            sha256: item.sha256.clone(),
            index: item.index,
            data: base64::engine::general_purpose::STANDARD.encode(data),
        };
        let frame = signed::seal(&key, Purpose::Chunk, device, &wire::encode(&chunk));
        if client.publish(topics::chunk(device), QoS::AtLeastOnce, false, frame).await.is_err() {
            return;
        }
        if let Ok(mut s) = served.lock() {
            *s.entry(item.device).or_default() += item.len;
        }
    }
}
