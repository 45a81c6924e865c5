//! Model updates inside the event loop. A verified directive starts an activation:
//!
//! ```text
//! fetch chunks → staged (SHA-256) → verified (release keys, manifest vs directive and device)
//!   → loaded in a second plan + golden self-test → shadow (both models on every window)
//!   → swap (persisted first, then in memory, between two windows) → probation → commit
//!                                                   └─ a failed gate → revert to the last known good
//! ```
//!
//! The download itself is [`super::download`]. Each step is written to SQLite together with the
//! report announcing it
//! ([`Store::commit_update`]); the model slot (which bundle file serves a model) changes in the
//! same transaction as the step that swaps. After a crash, the agent loads whatever the slot
//! names, always verifying it again, and resumes the step: so it serves exactly the old or the
//! new verified release.

use super::{Agent, Loaded};
use crate::activation;
use crate::clock;
use crate::inference::{InferenceError, Model};
use crate::staging::Staging;
use crate::status::UpdateStatus;
use crate::store::NewRecord;
use crate::update_state::{Change, Pending, Slot, Step};
use millwright_shared::bundle::sha256_hex;
use millwright_shared::directive::DirectiveError;
use millwright_shared::directive::{self, Directive, Verdict};
use millwright_shared::gates::{self, Health, HealthMeter};
use millwright_shared::trust::{Envelope, TrustError};
use millwright_shared::wire::{self, RecordBody, UpdatePhase, UpdateReport};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// An activation interrupted this many times by restarts is given up.
const MAX_ATTEMPTS: u32 = 3;

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

/// What an activation is about: the directive (and its signed envelope, which the store
/// keeps), the model it replaces and how many starts it has survived.
pub(super) struct Job {
    pub(super) directive: Directive,
    envelope: Vec<u8>,
    /// Index of the model (in `Agent::models`) the release replaces.
    model: usize,
    attempts: u32,
}

/// The activation in progress.
pub(super) struct Update {
    pub(super) job: Job,
    pub(super) stage: Stage,
}

pub(super) enum Stage {
    Fetching {
        staging: Staging,
        requested: HashMap<u32, i64>,
        bad_chunks: u32,
    },
    /// Loaded and self-tested; both models run on every window.
    Shadow {
        candidate: Box<Model>,
        meter: HealthMeter,
        /// When the shadow period ends, on the monotonic clock (a clock step neither
        /// shortens nor stretches it).
        until_ms: i64,
    },
    /// The new model serves; `previous` is the one it replaced (after a restart it is loaded
    /// from its slot only if needed).
    Probation {
        previous: Option<Box<Model>>,
        meter: HealthMeter,
        /// When probation ends, on the monotonic clock.
        until_ms: i64,
    },
}

/// What watches an inference while an update runs.
pub(super) enum Observer<'a> {
    Shadow { candidate: &'a mut Model, meter: &'a mut HealthMeter, tolerance: f32 },
    Probation { meter: &'a mut HealthMeter },
}

fn first(out: &Result<Vec<f32>, InferenceError>) -> Result<f32, ()> {
    match out {
        Ok(v) => v.first().copied().ok_or(()),
        Err(_) => Err(()),
    }
}

impl Observer<'_> {
    /// Called after the serving model ran `window` (taking `latency_us`).
    pub(super) fn after(self, window: &[f32], current: &Result<Vec<f32>, InferenceError>, us: u64) {
        match self {
            Observer::Shadow { candidate, meter, tolerance } => {
                let started = Instant::now();
                let out = candidate.predict(window);
                let took = started.elapsed().as_micros() as u64;
                let seen = meter.observe(first(&out), took);
                if let Ok(current) = first(current) {
                    meter.compare(seen, current, us, tolerance);
                }
            }
            Observer::Probation { meter } => {
                meter.observe(first(current), us);
            }
        }
    }
}

impl Update {
    pub(super) fn observer(&mut self, model: usize) -> Option<Observer<'_>> {
        if model != self.job.model {
            return None;
        }
        let tolerance = self.job.directive.activation.gates.agreement_tolerance;
        match &mut self.stage {
            Stage::Shadow { candidate, meter, .. } => {
                Some(Observer::Shadow { candidate, meter, tolerance })
            }
            Stage::Probation { meter, .. } => Some(Observer::Probation { meter }),
            Stage::Fetching { .. } => None,
        }
    }

    pub(super) fn status(&self) -> UpdateStatus {
        let (stage, chunks) = match &self.stage {
            Stage::Fetching { staging, .. } => {
                ("fetching", Some((staging.received(), staging.total())))
            }
            Stage::Shadow { .. } => ("shadow", None),
            Stage::Probation { .. } => ("probation", None),
        };
        let d = &self.job.directive;
        UpdateStatus {
            rollout: d.rollout.clone(),
            model: d.model.to_string(),
            release: d.release.0,
            stage: stage.to_owned(),
            chunks,
        }
    }
}

/// Test hook: `MILLWRIGHT_PAUSE_AFTER=<step>` makes the agent stop for 30 s right after it
/// persisted that step, so a test can SIGKILL it there. Steps: received, downloading,
/// downloaded, verified, self_tested, shadow, activated, committed, reverted.
pub(super) fn failpoint(step: &str) {
    if std::env::var("MILLWRIGHT_PAUSE_AFTER").is_ok_and(|s| s == step) {
        tracing::warn!(step, "test hook: pausing after this step (MILLWRIGHT_PAUSE_AFTER)");
        std::thread::sleep(std::time::Duration::from_secs(30));
    }
}

fn decode_directive(envelope: &[u8]) -> Option<Directive> {
    let payload = Envelope::parse(envelope).ok()?.payload_bytes().ok()?;
    serde_json::from_slice(&payload).ok()
}

fn failures_text(failures: &[gates::GateFailure]) -> String {
    failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

fn pending(job: &Job, step: Step) -> Change {
    Change::Activation(Some(Pending {
        directive: job.envelope.clone(),
        step,
        attempts: job.attempts,
    }))
}

impl Agent {
    pub(super) fn updates_dir(&self) -> PathBuf {
        self.config.data_dir.join("updates")
    }

    /// Where a verified bundle with this SHA-256 is kept.
    pub(super) fn bundle_path(&self, sha256: &str) -> PathBuf {
        self.config.data_dir.join("models").join(format!("{sha256}.mwb"))
    }

    fn report(
        &self,
        d: Option<&Directive>,
        phase: UpdatePhase,
        reason: Option<String>,
        health: Option<Health>,
    ) -> NewRecord {
        NewRecord {
            at_ms: clock::now_ms(),
            body: RecordBody::Update(Box::new(UpdateReport {
                rollout: d.map(|d| wire::clean_text(&d.rollout, wire::MAX_LABEL_BYTES)),
                directive: d.map(|d| d.seq),
                model: d.map(|d| d.model.clone()),
                release: d.map(|d| d.release),
                phase,
                reason: reason.map(|r| wire::clean_text(&r, wire::MAX_REASON_BYTES)),
                health,
            })),
        }
    }

    /// Commits state changes with their report (if any); false (logged) when the store refuses.
    fn persist(&mut self, changes: &[Change], report: Option<NewRecord>) -> bool {
        let reports: Vec<NewRecord> = report.into_iter().collect();
        match self.store.commit_update(changes, &reports) {
            Ok(()) => {
                self.pump();
                true
            }
            Err(e) => {
                self.counters.store_errors += 1;
                tracing::error!("cannot record an update step: {e}");
                false
            }
        }
    }

    /// Persists `step` of `job` with a report of `phase`.
    fn step(&mut self, job: &Job, step: Step, phase: Option<UpdatePhase>) -> bool {
        let report = phase.map(|p| self.report(Some(&job.directive), p, None, None));
        self.persist(&[pending(job, step)], report)
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
        let report = self.report(claims.as_deref(), UpdatePhase::Rejected, Some(reason), None);
        self.persist(&[], Some(report));
    }

    /// Ends the activation without the new release ever serving.
    pub(super) fn reject(&mut self, job: Job, reason: String, health: Option<Health>) {
        let d = &job.directive;
        tracing::warn!(model = %d.model, release = d.release.0, "update rejected: {reason}");
        self.counters.updates_rejected += 1;
        Staging::discard(&self.updates_dir(), &d.bundle);
        let path = self.bundle_path(&d.bundle.sha256);
        if !self.is_referenced(&path) {
            let _ = std::fs::remove_file(&path);
        }
        let report = self.report(Some(d), UpdatePhase::Rejected, Some(reason), health);
        self.persist(&[Change::Activation(None)], Some(report));
    }

    fn is_referenced(&self, path: &Path) -> bool {
        self.loaded.iter().any(|l| l.path == path)
            || self.slots.values().any(|s| s.active == path || s.previous.as_deref() == Some(path))
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
        let model = self.models.iter().position(|m| m.manifest().model == d.model);
        tracing::info!(
            seq = d.seq, rollout = %d.rollout, model = %d.model, release = d.release.0,
            action = ?d.action, "directive received"
        );
        let seen = Change::LastDirective { seq: d.seq, bytes: bytes.to_vec() };
        // Refused before it disturbs the activation in progress.
        if let (directive::Action::Revert, Some(i)) = (d.action, model)
            && let Err(reason) = self.check_revert(&d, i)
        {
            self.counters.updates_rejected += 1;
            tracing::warn!("update rejected: {reason}");
            let report = self.report(Some(&d), UpdatePhase::Rejected, Some(reason), None);
            self.persist(&[seen], Some(report));
            return;
        }
        if let Some(current) = self.update.take() {
            self.abandon(current, d.seq);
        }
        let highest = self.store.highest_seen(d.model.as_str()).ok().flatten();
        let running = model.map(|i| self.models[i].manifest());
        if let Err(refusal) = activation::precheck(&d, running, highest) {
            self.counters.updates_rejected += 1;
            tracing::warn!("update rejected: {refusal}");
            let report =
                self.report(Some(&d), UpdatePhase::Rejected, Some(refusal.to_string()), None);
            self.persist(&[seen], Some(report));
            return;
        }
        let Some(model) = model else { return };
        if self.loaded[model].sha256 == d.bundle.sha256 {
            tracing::info!(release = d.release.0, "already serving this bundle");
            let reason = Some("already serving this release".to_owned());
            let report = self.report(Some(&d), UpdatePhase::Committed, reason, None);
            self.persist(&[seen], Some(report));
            return;
        }
        let job = Job { directive: d, envelope: bytes.to_vec(), model, attempts: 0 };
        let report = self.report(Some(&job.directive), UpdatePhase::Received, None, None);
        if !self.persist(&[seen, pending(&job, Step::Fetching)], Some(report)) {
            return;
        }
        failpoint("received");
        self.fetch(job);
    }

    /// A signed revert may take the model back only to this gateway's own last known good
    /// release (or confirm the one it serves), never to an arbitrary older release: the online
    /// server key alone cannot choose what an old bundle the gateway never trusted is.
    fn check_revert(&self, d: &Directive, model: usize) -> Result<(), String> {
        let serving = &self.loaded[model].sha256;
        let lkg = self
            .slots
            .get(d.model.as_str())
            .and_then(|s| s.previous.as_ref())
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| sha256_hex(&b));
        if &d.bundle.sha256 == serving || lkg.as_deref() == Some(d.bundle.sha256.as_str()) {
            return Ok(());
        }
        Err(format!(
            "revert refused: bundle {} is neither the last known good release of {} on this \
             gateway nor the one it serves",
            &d.bundle.sha256[..12.min(d.bundle.sha256.len())],
            d.model
        ))
    }

    /// A newer directive replaces the activation in progress.
    fn abandon(&mut self, current: Update, by: u64) {
        let reason = format!("superseded by directive {by}");
        match current.stage {
            Stage::Probation { previous, .. } => self.revert(current.job, previous, reason, None),
            _ => self.reject(current.job, reason, None),
        }
    }

    /// Checks the whole file, verifies it, loads it into a second plan and self-tests it;
    /// then the shadow period starts, or the swap happens at once.
    pub(super) fn install_staged(&mut self, job: Job) {
        let d = &job.directive;
        let path = self.bundle_path(&d.bundle.sha256);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => return self.reject(job, format!("cannot read the download: {e}"), None),
        };
        let actual = sha256_hex(&bytes);
        if actual != d.bundle.sha256 || bytes.len() as u64 != d.bundle.size {
            let reason = format!(
                "downloaded bundle ({} bytes, SHA-256 {actual}) is not the one the directive names ({} bytes, {})",
                bytes.len(),
                d.bundle.size,
                d.bundle.sha256
            );
            return self.reject(job, reason, None);
        }
        if !self.step(&job, Step::Staged, Some(UpdatePhase::Downloaded)) {
            return self.reject(job, "cannot record the download".into(), None);
        }
        failpoint("downloaded");
        let verified = match self.root.verify_bundle(&bytes, clock::trusted_now()) {
            Ok(v) => v,
            Err(e) => return self.reject(job, format!("bundle refused: {e}"), None),
        };
        let d = &job.directive;
        let highest = self.store.highest_seen(d.model.as_str()).ok().flatten();
        let asset_types: Vec<String> = self
            .assets
            .iter()
            .filter(|a| a.model == job.model)
            .filter_map(|a| self.config.assets.iter().find(|c| &c.id == a.state.id()))
            .map(|c| c.asset_type.clone())
            .collect();
        let checked = activation::check(
            d,
            verified.manifest(),
            self.models[job.model].manifest(),
            highest,
            &asset_types,
            &self.config.device_class,
        );
        if let Err(refusal) = checked {
            return self.reject(job, refusal.to_string(), None);
        }
        if !self.step(&job, Step::Verified, Some(UpdatePhase::Verified)) {
            return self.reject(job, "cannot record the verification".into(), None);
        }
        failpoint("verified");
        let candidate = match Model::load(&verified) {
            Ok(m) => Box::new(m),
            Err(e) => return self.reject(job, format!("model refused: {e}"), None),
        };
        let report = self.report(Some(&job.directive), UpdatePhase::SelfTested, None, None);
        self.persist(&[], Some(report));
        failpoint("self_tested");
        let shadow_secs = job.directive.activation.shadow_secs;
        if shadow_secs == 0 {
            return self.swap(job, candidate, None);
        }
        if !self.step(&job, Step::Shadow, None) {
            return self.reject(job, "cannot record the shadow period".into(), None);
        }
        failpoint("shadow");
        tracing::info!(release = job.directive.release.0, "shadow period started");
        let until_ms = clock::monotonic_ms() + 1000 * shadow_secs as i64;
        let stage = Stage::Shadow { candidate, meter: HealthMeter::default(), until_ms };
        self.update = Some(Update { job, stage });
    }

    /// Replaces the serving model between two windows. The slot is persisted first: a crash
    /// right after it restarts on the new (verified) release, in probation.
    fn swap(&mut self, job: Job, candidate: Box<Model>, shadow: Option<Health>) {
        let i = job.model;
        let name = job.directive.model.to_string();
        let path = self.bundle_path(&job.directive.bundle.sha256);
        let slot = Slot { active: path.clone(), previous: Some(self.loaded[i].path.clone()) };
        let changes = [
            Change::Slot { model: name.clone(), slot: slot.clone() },
            Change::Seen { model: name.clone(), release: job.directive.release.0 },
            pending(&job, Step::Probation),
        ];
        let report = self.report(Some(&job.directive), UpdatePhase::Activated, None, None);
        if !self.persist(&changes, Some(report)) {
            return self.reject(job, "cannot record the swap".into(), shadow);
        }
        let previous = self.serve(i, *candidate, path, job.directive.bundle.sha256.clone());
        self.slots.insert(name, slot);
        tracing::info!(
            model = %job.directive.model, release = job.directive.release.0,
            "new release serving; probation started"
        );
        failpoint("activated");
        let activation = &job.directive.activation;
        let until_ms = clock::monotonic_ms() + 1000 * activation.probation_secs as i64;
        let stage = Stage::Probation {
            previous: Some(Box::new(previous)),
            meter: HealthMeter::default(),
            until_ms,
        };
        self.update = Some(Update { job, stage });
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

    fn commit(&mut self, update: Update, health: Health) {
        let d = &update.job.directive;
        let report = self.report(Some(d), UpdatePhase::Committed, None, Some(health));
        if !self.persist(&[Change::Activation(None)], Some(report)) {
            self.update = Some(update);
            return;
        }
        tracing::info!(model = %d.model, release = d.release.0, "release committed");
        self.counters.updates_committed += 1;
        failpoint("committed");
        self.remove_unreferenced_bundles();
    }

    /// Goes back to the last known good release after the new one served and failed (or a
    /// newer directive arrived during probation). `previous` is the replaced model if it is
    /// still in memory; otherwise it is loaded (and verified) from its slot.
    fn revert(
        &mut self,
        job: Job,
        previous: Option<Box<Model>>,
        reason: String,
        health: Option<Health>,
    ) {
        let name = job.directive.model.to_string();
        let Some(previous_path) = self.slots.get(&name).and_then(|s| s.previous.clone()) else {
            tracing::error!("no last known good release to revert to; the new one keeps serving");
            self.persist(&[Change::Activation(None)], None);
            return;
        };
        let loaded = match previous {
            Some(model) => Ok(*model),
            None => super::load_bundle(&previous_path, &self.root).map_err(|e| format!("{e:#}")),
        };
        let previous = match loaded {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(
                    "cannot load the last known good release ({e}); the new one keeps serving"
                );
                let reason = format!("{reason}, but the previous release cannot load: {e}");
                let report =
                    self.report(Some(&job.directive), UpdatePhase::Committed, Some(reason), health);
                self.persist(&[Change::Activation(None)], Some(report));
                return;
            }
        };
        let slot = Slot { active: previous_path.clone(), previous: None };
        let report =
            self.report(Some(&job.directive), UpdatePhase::Reverted, Some(reason.clone()), health);
        let changes =
            [Change::Slot { model: name.clone(), slot: slot.clone() }, Change::Activation(None)];
        if !self.persist(&changes, Some(report)) {
            tracing::error!("cannot record the revert; the new release keeps serving");
            return;
        }
        let sha = std::fs::read(&previous_path).map(|b| sha256_hex(&b)).unwrap_or_default();
        self.serve(job.model, previous, previous_path, sha);
        self.slots.insert(name, slot);
        self.counters.updates_reverted += 1;
        tracing::warn!(
            model = %job.directive.model, release = job.directive.release.0,
            "release reverted: {reason}"
        );
        failpoint("reverted");
        self.remove_unreferenced_bundles();
    }

    /// Deletes bundle files in `models/` that no slot, loaded model or activation names.
    fn remove_unreferenced_bundles(&self) {
        let Ok(entries) = std::fs::read_dir(self.config.data_dir.join("models")) else { return };
        let in_progress =
            self.update.as_ref().map(|u| self.bundle_path(&u.job.directive.bundle.sha256));
        for entry in entries.flatten() {
            let path = entry.path();
            if !self.is_referenced(&path) && in_progress.as_ref() != Some(&path) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Once a second: re-requests chunks, judges shadow and probation. `now_ms` is the
    /// monotonic clock ([`clock::monotonic_ms`]): the periods are durations.
    pub(super) fn on_update_tick(&mut self, now_ms: i64) {
        let Some(update) = self.update.take() else { return };
        let gates = update.job.directive.activation.gates.clone();
        match update.stage {
            Stage::Fetching { .. } => {
                self.update = Some(update);
                self.request_chunks(now_ms);
            }
            Stage::Shadow { candidate, meter, until_ms } => {
                let health = meter.health();
                let enough = meter.attempts() >= gates.min_predictions;
                let failures = gates::judge(&health, &gates);
                if enough && !failures.is_empty() {
                    let reason = format!("shadow period failed: {}", failures_text(&failures));
                    return self.reject(update.job, reason, Some(health));
                }
                if enough && now_ms >= until_ms {
                    let report = self.report(
                        Some(&update.job.directive),
                        UpdatePhase::ShadowPassed,
                        None,
                        Some(health.clone()),
                    );
                    self.persist(&[], Some(report));
                    return self.swap(update.job, candidate, Some(health));
                }
                self.update = Some(Update {
                    job: update.job,
                    stage: Stage::Shadow { candidate, meter, until_ms },
                });
            }
            Stage::Probation { previous, meter, until_ms } => {
                // Latency against the current model was judged in shadow, on the same windows.
                let health = meter.health();
                let enough = meter.attempts() >= gates.min_predictions;
                let failures = gates::judge(&health, &gates);
                if enough && !failures.is_empty() {
                    let reason = format!("probation failed: {}", failures_text(&failures));
                    return self.revert(update.job, previous, reason, Some(health));
                }
                let stage = Stage::Probation { previous, meter, until_ms };
                let update = Update { job: update.job, stage };
                if enough && now_ms >= until_ms {
                    return self.commit(update, health);
                }
                self.update = Some(update);
            }
        }
    }

    /// After a restart: picks up the activation the store says was in progress.
    pub(super) fn resume_update(&mut self) {
        let pending_step = match self.store.activation() {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => return tracing::error!("cannot read the activation in progress: {e}"),
        };
        let directive = decode_directive(&pending_step.directive);
        let model = directive
            .as_ref()
            .and_then(|d| self.models.iter().position(|m| m.manifest().model == d.model));
        let (Some(directive), Some(model)) = (directive, model) else {
            tracing::error!("the stored activation names no model served here; dropping it");
            self.persist(&[Change::Activation(None)], None);
            return;
        };
        let attempts = pending_step.attempts + 1;
        let step = pending_step.step;
        tracing::info!(
            step = step.as_str(),
            attempts,
            release = directive.release.0,
            "resuming the update in progress"
        );
        let job = Job { directive, envelope: pending_step.directive, model, attempts };
        if attempts > MAX_ATTEMPTS {
            let reason = format!("the agent restarted {attempts} times during this activation");
            return match step {
                Step::Probation => self.revert(job, None, reason, None),
                _ => self.reject(job, reason, None),
            };
        }
        if !self.step(&job, step, None) {
            return;
        }
        match step {
            Step::Fetching => self.fetch(job),
            Step::Staged | Step::Verified | Step::Shadow => self.install_staged(job),
            Step::Probation => {
                let secs = job.directive.activation.probation_secs;
                let stage = Stage::Probation {
                    previous: None,
                    meter: HealthMeter::default(),
                    until_ms: clock::monotonic_ms() + 1000 * secs as i64,
                };
                self.update = Some(Update { job, stage });
            }
        }
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
                let reason = Some(format!("root version {} accepted", next.version()));
                let report = self.report(None, UpdatePhase::RootRotated, reason, None);
                if self.persist(&[Change::Root(bytes.to_vec())], Some(report)) {
                    tracing::info!(version = next.version(), "trust root rotated");
                    self.root = next;
                    self.refused.clear();
                }
            }
            Err(e) => {
                let (label, kind) = root_refusal(&e);
                self.refuse_message(bytes, label, kind, format!("root rotation refused: {e}"))
            }
        }
    }
}
