//! The shell of model updates ([`crate::update_machine`] is the logic): verifies what arrives
//! on the `desired`, `chunk` and trust-root topics, hands it to the machine, and carries out the
//! machine's effects in order: SQLite ([`Store::commit_update`]: a step and its reports in one
//! transaction), the staging file, signed chunk requests, tract (the candidate in a second
//! plan), the swap between two windows and the revert. An effect that fails answers the machine
//! and cancels the effects after it, so nothing is swapped that was not recorded first. After a
//! crash the agent loads whatever the slot names, always verifying it again, and resumes the
//! recorded step: it serves exactly the old or the new verified release.

use super::{Agent, Loaded};
use crate::clock;
use crate::inference::{InferenceError, Model};
use crate::staging::Staging;
use crate::store::NewRecord;
use crate::update_machine::{
    self as machine, Context, Counter, Effect, Input, Machine, Opened, Serving,
};
use crate::{activation, update_state::Change};
use millwright_shared::bundle::sha256_hex;
use millwright_shared::directive::{self, Directive, DirectiveError, Verdict};
use millwright_shared::signed::{self, Purpose};
use millwright_shared::topics;
use millwright_shared::trust::{Envelope, Root, TrustError};
use millwright_shared::wire::{self, FetchRequest, RecordBody, UpdatePhase, WIRE_VERSION};
use rumqttc::QoS;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// At most one report per this long about directives and roots that did not verify: anyone on
/// a broker without ACLs can publish those, as fast as they like.
const UNVERIFIED_REPORT_EVERY_MS: i64 = 600_000;
/// Digests of refused messages remembered, so a retained one is reported once.
const REFUSED_REMEMBERED: usize = 64;
/// The longest reason about a refused directive or root (its text can quote the sender).
const MAX_REFUSAL_REASON: usize = 256;

/// What the agent remembers of refused directives and roots.
#[derive(Debug, Default)]
pub(super) struct Refused {
    digests: VecDeque<String>,
    unverified_reported_ms: Option<i64>,
}

impl Refused {
    /// True the first time `digest` is seen lately.
    fn first(&mut self, digest: &str) -> bool {
        if self.digests.iter().any(|d| d == digest) {
            return false;
        }
        if self.digests.len() == REFUSED_REMEMBERED {
            self.digests.pop_front();
        }
        self.digests.push_back(digest.to_owned());
        true
    }

    fn clear(&mut self) {
        self.digests.clear();
    }
}

/// How a refused directive or root is handled.
enum Refusal {
    /// Its signature did not verify: nothing it says is believed or repeated. Counted, and
    /// reported at most every ten minutes, with its digest only.
    Unverified,
    /// Validly signed but old (or for another device): a replay. Counted, never reported.
    Replay,
    /// Validly signed and refused for a reason the server should hear about, with the
    /// directive's (signed, so trusted) rollout and sequence number.
    Verified(Box<Directive>),
}

/// How a directive refusal is counted (one label per cause) and reported.
fn directive_refusal(e: &DirectiveError, bytes: &[u8]) -> (&'static str, Refusal) {
    let verified = || match decode_directive(bytes) {
        Some(d) => Refusal::Verified(Box::new(d)),
        None => Refusal::Unverified,
    };
    match e {
        DirectiveError::Replayed { .. } => ("directive_replayed", Refusal::Replay),
        DirectiveError::WrongDevice { .. } => ("directive_wrong_device", Refusal::Replay),
        DirectiveError::Expired(_) => ("directive_expired", verified()),
        DirectiveError::ChunkPlan(_) => ("directive_chunk_plan", verified()),
        DirectiveError::Oversized { .. } => ("directive_oversized", verified()),
        DirectiveError::Version(_) => ("directive_version", verified()),
        DirectiveError::TooLarge(_) => ("directive_too_large", Refusal::Unverified),
        DirectiveError::Malformed(_) => ("directive_malformed", Refusal::Unverified),
        DirectiveError::NoServerKey => ("directive_no_server_key", Refusal::Unverified),
        DirectiveError::UntrustedSigner(_) => ("directive_untrusted_signer", Refusal::Unverified),
        DirectiveError::RevokedKey(_) => ("directive_revoked_key", Refusal::Unverified),
        DirectiveError::Signature(_) => ("directive_bad_signature", Refusal::Unverified),
    }
}

/// How a root refusal is counted and reported: a validly signed root of a version already
/// held (or skipped) is a replay; the rest did not verify.
fn root_refusal(e: &TrustError) -> (&'static str, Refusal) {
    match e {
        TrustError::Version { .. } => ("root_version", Refusal::Replay),
        TrustError::TooLarge(_) => ("root_too_large", Refusal::Unverified),
        TrustError::Malformed(_) | TrustError::Kind(_) => ("root_malformed", Refusal::Unverified),
        TrustError::BadKey { .. } | TrustError::Threshold { .. } => {
            ("root_bad_keys", Refusal::Unverified)
        }
        TrustError::Signatures { .. } | TrustError::Signature(_) => {
            ("root_signatures", Refusal::Unverified)
        }
        TrustError::Expired { .. } => ("root_expired", Refusal::Unverified),
    }
}

/// The update machine and what the shell holds for it: the open staging file, the candidate
/// model (loaded, not serving), the model a swap replaced (or a revert readied), and a root
/// waiting to be adopted once it is recorded.
pub(super) struct Updates {
    pub(super) machine: Machine,
    staging: Option<Staging>,
    candidate: Option<Box<Model>>,
    /// The model a swap replaced (or a revert readied), with where it came from.
    previous: Option<(Loaded, Box<Model>)>,
    next_root: Option<Box<Root>>,
}

impl Updates {
    pub(super) fn new(machine: Machine) -> Self {
        Self { machine, staging: None, candidate: None, previous: None, next_root: None }
    }

    /// What watches an inference of `model` while an update runs.
    pub(super) fn observer(&mut self, model: usize) -> Option<Observer<'_>> {
        if self.machine.shadowing(model).is_some() {
            let candidate = self.candidate.as_deref_mut()?;
            return Some(Observer {
                machine: &mut self.machine,
                candidate: Some(candidate),
                model,
            });
        }
        matches!(self.machine.progress(), Some((m, machine::Progress::Probation)) if m == model)
            .then_some(Observer { machine: &mut self.machine, candidate: None, model })
    }
}

/// Watches one window of the model an update is about: in shadow the candidate runs it too.
pub(super) struct Observer<'a> {
    machine: &'a mut Machine,
    candidate: Option<&'a mut Model>,
    model: usize,
}

impl Observer<'_> {
    /// Called after the serving model ran `window` (taking `us`).
    pub(super) fn after(self, window: &[f32], current: &Result<Vec<f32>, InferenceError>, us: u64) {
        match self.candidate {
            Some(candidate) => {
                let started = Instant::now();
                let out = candidate.predict(window);
                let took = started.elapsed().as_micros() as u64;
                self.machine.observe_shadow(
                    machine::first_output(&out),
                    took,
                    machine::first_output(current),
                    us,
                );
            }
            None => self.machine.observe_serving(self.model, machine::first_output(current), us),
        }
    }
}

fn decode_directive(envelope: &[u8]) -> Option<Directive> {
    let payload = Envelope::parse(envelope).ok()?.payload_bytes().ok()?;
    serde_json::from_slice(&payload).ok()
}

impl Agent {
    pub(super) fn updates_dir(&self) -> PathBuf {
        self.config.data_dir.join("updates")
    }

    /// Where a verified bundle with this SHA-256 is kept.
    pub(super) fn bundle_path(&self, sha256: &str) -> PathBuf {
        machine::bundle_path(&self.config.data_dir.join("models"), sha256)
    }

    /// Carries out the machine's `effects` in order. An effect that answers feeds the machine,
    /// whose effects come next; one that fails cancels those queued after it.
    pub(super) fn run(&mut self, effects: Vec<Effect>) {
        self.carry_out_all(effects, true);
    }

    /// Carries out effects that are not the activation's (a root rotation, a refusal's
    /// report): in order, up to the first that fails.
    fn run_alone(&mut self, effects: Vec<Effect>) {
        self.carry_out_all(effects, false);
    }

    fn carry_out_all(&mut self, effects: Vec<Effect>, answer: bool) {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            let Some(input) = self.carry_out(effect) else { continue };
            if matches!(input, Input::Failed(_)) {
                queue.clear();
            }
            if !answer {
                continue;
            }
            let next = self.update.machine.feed(input, clock::monotonic_ms());
            for e in next.into_iter().rev() {
                queue.push_front(e);
            }
        }
    }

    fn carry_out(&mut self, effect: Effect) -> Option<Input> {
        match effect {
            Effect::Persist { changes, reports } => {
                let at_ms = clock::now_ms();
                let records: Vec<NewRecord> = reports
                    .into_iter()
                    .map(|r| NewRecord { at_ms, body: RecordBody::Update(Box::new(r)) })
                    .collect();
                if let Err(e) = self.store.commit_update(&changes, &records) {
                    self.counters.store_errors += 1;
                    tracing::error!("cannot record an update step: {e}");
                    return Some(Input::Failed(e.to_string()));
                }
                for change in changes {
                    if let Change::Slot { model, slot } = change {
                        self.slots.insert(model, slot);
                    }
                }
                self.pump();
                None
            }
            Effect::OpenDownload(plan) => {
                if self.bundle_path(&plan.sha256).exists() {
                    return Some(Input::Opened(Ok(Opened::Bundle)));
                }
                let opened = Staging::open(&self.updates_dir(), &plan).map(|staging| {
                    let have = (0..staging.total() as u32).map(|i| staging.has(i)).collect();
                    self.update.staging = Some(staging);
                    Opened::Partial(have)
                });
                Some(Input::Opened(opened.map_err(|e| e.to_string())))
            }
            Effect::RequestChunks { sha256, indices } => {
                let topic = topics::fetch(&self.config.device);
                for index in indices {
                    let request = FetchRequest {
                        v: WIRE_VERSION,
                        sha256: sha256.clone(),
                        first: index,
                        count: 1,
                    };
                    let body = wire::encode(&request);
                    let payload = signed::seal(
                        &self.config.identity.key,
                        Purpose::Fetch,
                        &self.config.device,
                        &body,
                    );
                    // Not sent now: asked again after the fetch timeout.
                    if self
                        .client
                        .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                        .is_err()
                    {
                        break;
                    }
                }
                None
            }
            Effect::WriteChunk { index, data } => {
                let Some(staging) = &mut self.update.staging else {
                    return Some(Input::Failed("the download has no staging file".into()));
                };
                match staging.write(index, &data) {
                    Ok(()) => None,
                    Err(e) => Some(Input::Failed(format!("cannot write the download: {e}"))),
                }
            }
            Effect::FinishDownload(plan) => {
                let dest = self.bundle_path(&plan.sha256);
                let finished = match self.update.staging.take() {
                    Some(staging) => staging.finish(&dest).map(drop).map_err(|e| e.to_string()),
                    None => Err("the download has no staging file".into()),
                };
                Some(Input::Finished(finished))
            }
            Effect::Verify { directive, model } => {
                Some(Input::Verified(self.verify(&directive, model)))
            }
            Effect::Load(path) => {
                let loaded = super::load_bundle(&path, &self.root).map_err(|e| format!("{e:#}"));
                Some(Input::Loaded(loaded.map(|m| self.update.candidate = Some(Box::new(m)))))
            }
            Effect::Swap { model, path, sha256 } => {
                let Some(candidate) = self.update.candidate.take() else {
                    tracing::error!("no candidate model to swap in");
                    return None;
                };
                let replaced = self.loaded[model].clone();
                let previous = self.serve(model, *candidate, path.clone(), sha256);
                self.update.previous = Some((replaced, Box::new(previous)));
                None
            }
            Effect::LoadPrevious(name) => Some(Input::PreviousLoaded(self.ready_previous(&name))),
            Effect::Revert { model } => {
                if let Some((from, previous)) = self.update.previous.take() {
                    self.serve(model, *previous, from.path, from.sha256);
                }
                None
            }
            Effect::Discard(plan) => {
                self.update.staging = None;
                self.update.candidate = None;
                Staging::discard(&self.updates_dir(), &plan);
                let path = self.bundle_path(&plan.sha256);
                if !self.is_referenced(&path) {
                    let _ = std::fs::remove_file(&path);
                }
                None
            }
            Effect::RemoveUnreferenced => {
                self.update.previous = None;
                self.remove_unreferenced_bundles();
                None
            }
            Effect::Count(counter) => {
                let c = &mut self.counters;
                match counter {
                    Counter::Rejected => c.updates_rejected += 1,
                    Counter::Committed => c.updates_committed += 1,
                    Counter::Reverted => c.updates_reverted += 1,
                    Counter::ChunkReceived => c.chunks_received += 1,
                    Counter::ChunkRefused => c.chunks_refused += 1,
                }
                None
            }
            Effect::Reconsider { directive, envelope } => {
                let effects = self.admit(*directive, envelope);
                // Ahead of nothing: a reconsidered directive is the last thing of its run.
                self.run(effects);
                None
            }
            Effect::AdoptRoot => {
                if let Some(next) = self.update.next_root.take() {
                    tracing::info!(version = next.version(), "trust root rotated");
                    self.root = *next;
                    self.refused.clear();
                }
                None
            }
        }
    }

    /// The whole file against the directive, then the trust root, then this gateway.
    fn verify(&self, d: &Directive, model: usize) -> Result<(), String> {
        let path = self.bundle_path(&d.bundle.sha256);
        let bytes = std::fs::read(&path).map_err(|e| format!("cannot read the download: {e}"))?;
        let actual = sha256_hex(&bytes);
        if actual != d.bundle.sha256 || bytes.len() as u64 != d.bundle.size {
            return Err(format!(
                "downloaded bundle ({} bytes, SHA-256 {actual}) is not the one the directive names ({} bytes, {})",
                bytes.len(),
                d.bundle.size,
                d.bundle.sha256
            ));
        }
        let verified = self
            .root
            .verify_bundle(&bytes, clock::trusted_now())
            .map_err(|e| format!("bundle refused: {e}"))?;
        let highest = self.store.highest_seen(d.model.as_str()).ok().flatten();
        let asset_types: Vec<String> = self
            .assets
            .iter()
            .filter(|a| a.model == model)
            .filter_map(|a| self.config.assets.iter().find(|c| &c.id == a.state.id()))
            .map(|c| c.asset_type.clone())
            .collect();
        activation::check(
            d,
            verified.manifest(),
            self.models[model].manifest(),
            highest,
            &asset_types,
            &self.config.device_class,
        )
        .map_err(|r| r.to_string())
    }

    /// The last known good release of `model`: still in memory since the swap, or loaded (and
    /// verified) from its slot.
    fn ready_previous(&mut self, name: &str) -> Result<PathBuf, String> {
        if let Some((from, _)) = &self.update.previous {
            return Ok(from.path.clone());
        }
        let Some(path) = self.slots.get(name).and_then(|s| s.previous.clone()) else {
            return Err("no last known good release is kept".into());
        };
        let previous = super::load_bundle(&path, &self.root).map_err(|e| format!("{e:#}"))?;
        let sha256 = std::fs::read(&path).map(|b| sha256_hex(&b)).unwrap_or_default();
        let from = Loaded { path: path.clone(), sha256 };
        self.update.previous = Some((from, Box::new(previous)));
        Ok(path)
    }

    /// Puts `model` in service at index `i` for every asset using it; returns the one it replaces.
    fn serve(&mut self, i: usize, model: Model, path: PathBuf, sha256: String) -> Model {
        let now_ms = clock::now_ms();
        self.close_drift_intervals_of(i, now_ms);
        let previous = std::mem::replace(&mut self.models[i], model);
        self.loaded[i] = Loaded { path, sha256 };
        let manifest = self.models[i].manifest().clone();
        let settings = self.config.drift.settings;
        for asset in self.assets.iter_mut().filter(|a| a.model == i) {
            asset.state.adopt(&manifest);
            asset.reset_drift(&manifest, settings, now_ms);
        }
        self.publish_status(true);
        previous
    }

    fn is_referenced(&self, path: &Path) -> bool {
        self.loaded.iter().any(|l| l.path == path)
            || self.slots.values().any(|s| s.active == path || s.previous.as_deref() == Some(path))
    }

    /// Deletes bundle files in `models/` and staging files in `updates/` that no slot, loaded
    /// model or activation names.
    fn remove_unreferenced_bundles(&self) {
        let in_progress = self.update.machine.bundle().cloned();
        if let Ok(entries) = std::fs::read_dir(self.config.data_dir.join("models")) {
            let keep = in_progress.as_ref().map(|b| self.bundle_path(&b.sha256));
            for entry in entries.flatten() {
                let path = entry.path();
                if !self.is_referenced(&path) && keep.as_ref() != Some(&path) {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.updates_dir()) {
            let keep = in_progress.as_ref().map(|b| Staging::path_for(&self.updates_dir(), b));
            for entry in entries.flatten() {
                if keep.as_ref() != Some(&entry.path()) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }

    /// What the machine must know of this gateway to judge `d`.
    fn admit(&mut self, d: Directive, envelope: Vec<u8>) -> Vec<Effect> {
        let index = self.models.iter().position(|m| m.manifest().model == d.model);
        let lkg = index
            .and_then(|_| self.slots.get(d.model.as_str()))
            .and_then(|s| s.previous.as_ref())
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| sha256_hex(&b));
        let highest_seen = self.store.highest_seen(d.model.as_str()).ok().flatten();
        let serving = index.map(|i| Serving {
            index: i,
            manifest: self.models[i].manifest(),
            path: &self.loaded[i].path,
            sha256: &self.loaded[i].sha256,
            last_known_good: lkg.as_deref(),
        });
        self.update.machine.on_directive(d, envelope, Context { serving, highest_seen })
    }

    /// A message on this device's `desired` topic.
    pub(super) fn on_directive(&mut self, bytes: &[u8]) {
        let last = match self.store.last_directive() {
            Ok(last) => last,
            Err(e) => return tracing::error!("cannot read the last directive: {e}"),
        };
        let now = clock::trusted_now();
        let verdict = directive::verify(
            bytes,
            &self.root,
            &self.config.device,
            last.as_ref().map(|(seq, b)| (*seq, b.as_slice())),
            self.config.updates.max_bundle_bytes,
            now,
        );
        let d = match verdict {
            Ok(Verdict::Applied) => return,
            Ok(Verdict::New(d)) => *d,
            Err(e) => {
                let (label, kind) = directive_refusal(&e, bytes);
                return self.refuse_message(bytes, label, kind, format!("directive refused: {e}"));
            }
        };
        if self.root.is_expired(now) {
            let reason = format!(
                "directive refused: trust root version {} has expired; a newer root is needed first",
                self.root.version()
            );
            let kind = Refusal::Verified(Box::new(d));
            return self.refuse_message(bytes, "directive_root_expired", kind, reason);
        }
        let effects = self.admit(d, bytes.to_vec());
        self.run(effects);
    }

    /// A chunk the server signed for this device.
    pub(super) fn on_chunk(&mut self, bytes: &[u8]) {
        let effects = self.update.machine.on_chunk(bytes, clock::monotonic_ms());
        self.run(effects);
    }

    /// The uplink came up or went down.
    pub(super) fn on_link_update(&mut self, up: bool) {
        let effects = self.update.machine.on_link(up, clock::monotonic_ms());
        self.run(effects);
    }

    /// Once a second: re-requests chunks, judges shadow and probation. `now_ms` is the
    /// monotonic clock ([`clock::monotonic_ms`]): the periods are durations.
    pub(super) fn on_update_tick(&mut self, now_ms: i64) {
        let effects = self.update.machine.on_tick(now_ms);
        self.run(effects);
    }

    /// After a start: picks up the activation the store says was in progress.
    pub(super) fn resume_update(&mut self) {
        let pending = match self.store.activation() {
            Ok(p) => p,
            Err(e) => return tracing::error!("cannot read the activation in progress: {e}"),
        };
        let directive = pending.as_ref().and_then(|p| decode_directive(&p.directive));
        let serving = directive.as_ref().and_then(|d| {
            let i = self.models.iter().position(|m| m.manifest().model == d.model)?;
            Some((i, self.loaded[i].path.clone()))
        });
        let effects =
            self.update.machine.resume(pending, directive, serving, clock::monotonic_ms());
        self.run(effects);
    }

    /// Refuses a directive or root: counted under `label`, logged once, and reported as the
    /// kind of refusal says. Nothing an unverified message claims is kept: its report names its
    /// SHA-256 and a capped reason only.
    fn refuse_message(&mut self, bytes: &[u8], label: &'static str, kind: Refusal, reason: String) {
        let digest = sha256_hex(bytes);
        let reason = wire::clean_text(&reason, MAX_REFUSAL_REASON);
        self.refuse(label, label, format!("{reason} (message SHA-256 {digest})"));
        let now_ms = clock::now_ms();
        let claims = match kind {
            Refusal::Replay => return,
            Refusal::Unverified => {
                let recent = self
                    .refused
                    .unverified_reported_ms
                    .is_some_and(|at| now_ms - at < UNVERIFIED_REPORT_EVERY_MS && now_ms >= at);
                if recent || !self.refused.first(&digest) {
                    return;
                }
                self.refused.unverified_reported_ms = Some(now_ms);
                None
            }
            Refusal::Verified(d) => {
                if !self.refused.first(&digest) {
                    return;
                }
                Some(d)
            }
        };
        self.counters.updates_rejected += 1;
        let reason = format!("{reason} (message SHA-256 {digest})");
        let report = machine::report(claims.as_deref(), UpdatePhase::Rejected, Some(reason), None);
        self.run_alone(vec![Effect::Persist { changes: vec![], reports: vec![report] }]);
    }

    /// A message on the fleet's trust-root topic: a rotation, or the root already held.
    pub(super) fn on_root(&mut self, bytes: &[u8]) {
        if self.root.version() == 0 {
            return tracing::debug!("no root provisioned; ignoring the fleet's root document");
        }
        let now = clock::trusted_now();
        if let Ok(same) = millwright_shared::trust::Root::provision(bytes, now)
            && same.metadata() == self.root.metadata()
        {
            return;
        }
        match self.root.rotate(bytes, now) {
            Ok(next) => {
                let effects = machine::rotate_root(bytes.to_vec(), next.version());
                self.update.next_root = Some(Box::new(next));
                self.run_alone(effects);
            }
            Err(e) => {
                let (label, kind) = root_refusal(&e);
                self.refuse_message(bytes, label, kind, format!("root rotation refused: {e}"))
            }
        }
    }
}
