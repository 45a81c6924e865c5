//! The model update as a pure state machine, the mirror of the server's `rollout.rs`. The
//! shell ([`crate::runtime`]'s `update` module) feeds it what happened (a verified directive,
//! a chunk, a tick, what a window did, the result of an effect it asked for) and carries out the
//! [`Effect`]s it returns, in order: persist a step with its reports, request or write chunks,
//! verify, load, swap, revert, remove files. An effect that fails answers with an [`Input`]
//! and cancels the effects queued after it.
//!
//! ```text
//! Fetching → Staged → Verified → Shadow → Probation → (committed)
//!   each step persisted with its report before the next effect; a failed check, gate or
//!   effect before the swap → rejected; a failed probation gate → reverted
//! ```
//!
//! [`Progress`] is the one word for how far an activation got: the persisted step, the stage in
//! the status and the report announcing it ([`Progress::phase`]). After a crash the shell calls
//! [`Machine::resume`] with the persisted step: it verifies (and loads) the bundle again, never
//! repeats a report already persisted, and gives up after [`MAX_ATTEMPTS`] starts.
//!
//! Times are milliseconds of a monotonic clock, passed in.

use crate::activation;
use crate::status::UpdateStatus;
use crate::update_state::{Change, Pending, Slot};
use millwright_shared::directive::{Action, BundleRef, ChunkError, Directive};
use millwright_shared::gates::{self, Health, HealthMeter};
use millwright_shared::manifest::Manifest;
use millwright_shared::wire::{self, Chunk, UpdatePhase, UpdateReport};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An activation interrupted this many times by restarts is given up.
pub const MAX_ATTEMPTS: u32 = 3;
/// Chunks failing their checks before the download is refused.
pub const MAX_BAD_CHUNKS: u32 = 3;

/// How far an activation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Progress {
    /// The directive verified; chunks are requested and written to the staging file.
    Fetching,
    /// The whole bundle is in `models/`; it is verified next.
    Staged,
    /// Signatures and manifest hold; it is loaded and self-tested next.
    Verified,
    /// Loaded and self-tested; both models run on every window.
    Shadow,
    /// The new release serves (its slot names it); probation runs.
    Probation,
}

impl Progress {
    pub fn as_str(self) -> &'static str {
        match self {
            Progress::Fetching => "fetching",
            Progress::Staged => "staged",
            Progress::Verified => "verified",
            Progress::Shadow => "shadow",
            Progress::Probation => "probation",
        }
    }

    pub fn parse(s: &str) -> Option<Progress> {
        [
            Progress::Fetching,
            Progress::Staged,
            Progress::Verified,
            Progress::Shadow,
            Progress::Probation,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }

    /// The report that announces reaching this step.
    pub fn phase(self) -> UpdatePhase {
        match self {
            Progress::Fetching => UpdatePhase::Received,
            Progress::Staged => UpdatePhase::Downloaded,
            Progress::Verified => UpdatePhase::Verified,
            Progress::Shadow => UpdatePhase::SelfTested,
            Progress::Probation => UpdatePhase::Activated,
        }
    }
}

/// Counters the shell keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Rejected,
    Committed,
    Reverted,
    ChunkReceived,
    ChunkRefused,
}

/// What the shell does, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Commits `changes` and appends `reports` to the outbox in one transaction. On failure the
    /// shell answers [`Input::Failed`].
    Persist {
        changes: Vec<Change>,
        reports: Vec<UpdateReport>,
    },
    /// Finds what of the bundle is here already: answers [`Input::Opened`].
    OpenDownload(BundleRef),
    /// Publishes signed requests for these chunks.
    RequestChunks {
        sha256: String,
        indices: Vec<u32>,
    },
    /// Writes a checked chunk to the staging file (synced); on failure [`Input::Failed`].
    WriteChunk {
        index: u32,
        data: Vec<u8>,
    },
    /// Moves the complete staging file to the bundle path: answers [`Input::Finished`].
    FinishDownload(BundleRef),
    /// Checks the bundle file against the directive (size, SHA-256), the trust root and this
    /// gateway ([`activation::check`]): answers [`Input::Verified`].
    Verify {
        directive: Box<Directive>,
        model: usize,
    },
    /// Verifies the file again and loads it into a second plan (golden self-test): answers
    /// [`Input::Loaded`]; the shell keeps the candidate.
    Load(PathBuf),
    /// Puts the candidate in service for `model` (between two windows), keeping the replaced
    /// one in memory for a revert.
    Swap {
        model: usize,
        path: PathBuf,
        sha256: String,
    },
    /// Makes the last known good release of the model named so ready (in memory, or loaded and
    /// verified from its slot): answers [`Input::PreviousLoaded`] with its path.
    LoadPrevious(String),
    /// Puts the release [`Effect::LoadPrevious`] readied back in service.
    Revert {
        model: usize,
    },
    /// Removes the staging file and, unless something serves or names it, the bundle file.
    Discard(BundleRef),
    /// Removes bundle files and staging files nothing names any more.
    RemoveUnreferenced,
    Count(Counter),
    /// A directive that waited for the activation it replaces to end: the shell judges it again
    /// ([`Machine::on_directive`]) with the gateway as it is now.
    Reconsider {
        directive: Box<Directive>,
        envelope: Vec<u8>,
    },
    /// Puts the trust root just recorded in force.
    AdoptRoot,
}

/// What the bundle's files hold when a download starts or resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// The complete bundle is in `models/` already.
    Bundle,
    /// The staging file, with which chunks are on disk.
    Partial(Vec<bool>),
}

/// The answer to an effect.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Opened(Result<Opened, String>),
    Finished(Result<(), String>),
    Verified(Result<(), String>),
    Loaded(Result<(), String>),
    PreviousLoaded(Result<PathBuf, String>),
    /// An effect failed (a persist, a write): the effects after it were cancelled.
    Failed(String),
}

/// The served model a directive names, as this gateway serves it.
#[derive(Debug, Clone, Copy)]
pub struct Serving<'a> {
    /// Its index among the agent's models.
    pub index: usize,
    pub manifest: &'a Manifest,
    pub path: &'a Path,
    pub sha256: &'a str,
    /// The SHA-256 of its last known good release (its slot's previous bundle), if any.
    pub last_known_good: Option<&'a str>,
}

/// What the machine must know of the gateway to judge a directive.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub serving: Option<Serving<'a>>,
    /// The highest release of the model ever installed here.
    pub highest_seen: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
struct Job {
    directive: Directive,
    /// The signed envelope, which the store keeps.
    envelope: Vec<u8>,
    /// Index of the model the release replaces.
    model: usize,
    /// The bundle serving the model when the activation started: the last known good after
    /// the swap.
    replaces: PathBuf,
    /// Starts survived.
    attempts: u32,
}

#[derive(Debug, Clone, Default)]
struct Download {
    have: Vec<bool>,
    /// Chunk index → when it was requested.
    requested: HashMap<u32, i64>,
    bad_chunks: u32,
    /// False until the shell said what is on disk.
    opened: bool,
}

#[derive(Debug, Clone)]
struct Active {
    job: Job,
    progress: Progress,
    /// The furthest step persisted (with its report): after a resume, the steps up to it are
    /// done again without a report.
    reported: Progress,
    download: Download,
    meter: HealthMeter,
    /// When shadow or probation ends.
    until_ms: i64,
    /// Waiting for [`Input::PreviousLoaded`] to revert, with the reason and health.
    reverting: Option<(String, Option<Health>)>,
    /// The swap's persist was asked for and no other input came since: a failure now means
    /// the swap did not happen.
    swapping: bool,
}

/// How the machine is configured.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where verified bundles are kept (`<data>/models`).
    pub models_dir: PathBuf,
    pub fetch_window: usize,
    pub fetch_timeout_ms: i64,
}

/// Where a verified bundle with this SHA-256 is kept.
pub fn bundle_path(models_dir: &Path, sha256: &str) -> PathBuf {
    models_dir.join(format!("{sha256}.mwb"))
}

/// A trust root that verified as a rotation: recorded with its report, then in force. A crash
/// between the two starts on the recorded root. (Not a model update, but the same discipline.)
pub fn rotate_root(document: Vec<u8>, version: u64) -> Vec<Effect> {
    let reason = Some(format!("root version {version} accepted"));
    vec![
        Effect::Persist {
            changes: vec![Change::Root(document)],
            reports: vec![report(None, UpdatePhase::RootRotated, reason, None)],
        },
        Effect::AdoptRoot,
    ]
}

/// The activation in progress, if any.
#[derive(Debug, Clone)]
pub struct Machine {
    settings: Settings,
    active: Option<Active>,
    connected: bool,
    /// A directive waiting for the activation it replaces to end.
    queued: Option<(Box<Directive>, Vec<u8>)>,
    /// The activation a commit just ended, until the commit is known to be recorded: a
    /// [`Input::Failed`] right after it puts it back, and the next tick commits again.
    committing: Option<Box<Active>>,
}

/// The report about `d` in `phase`.
pub fn report(
    d: Option<&Directive>,
    phase: UpdatePhase,
    reason: Option<String>,
    health: Option<Health>,
) -> UpdateReport {
    UpdateReport {
        rollout: d.map(|d| wire::clean_text(&d.rollout, wire::MAX_LABEL_BYTES)),
        directive: d.map(|d| d.seq),
        model: d.map(|d| d.model.clone()),
        release: d.map(|d| d.release),
        phase,
        reason: reason.map(|r| wire::clean_text(&r, wire::MAX_REASON_BYTES)),
        health,
    }
}

/// A signed revert may take the model back only to this gateway's own last known good release
/// (or confirm the one it serves), never to an arbitrary older release: the online server key
/// alone cannot choose what an old bundle the gateway never trusted is.
fn check_revert(d: &Directive, serving: &Serving<'_>) -> Result<(), String> {
    if d.bundle.sha256 == serving.sha256 || serving.last_known_good == Some(&d.bundle.sha256) {
        return Ok(());
    }
    Err(format!(
        "revert refused: bundle {} is neither the last known good release of {} on this \
         gateway nor the one it serves",
        &d.bundle.sha256[..12.min(d.bundle.sha256.len())],
        d.model
    ))
}

fn failures_text(failures: &[gates::GateFailure]) -> String {
    failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

fn recorded(job: &Job, step: Progress) -> Change {
    Change::Activation(Some(Pending {
        directive: job.envelope.clone(),
        step,
        attempts: job.attempts,
    }))
}

/// How a window went through a model: its first output, or that it failed.
pub(crate) fn first_output<E>(out: &Result<Vec<f32>, E>) -> Result<f32, ()> {
    match out {
        Ok(v) => v.first().copied().ok_or(()),
        Err(_) => Err(()),
    }
}

impl Machine {
    pub fn new(settings: Settings) -> Self {
        Self { settings, active: None, connected: false, queued: None, committing: None }
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The model the activation in progress replaces and how far it got.
    pub fn progress(&self) -> Option<(usize, Progress)> {
        self.active.as_ref().map(|a| (a.job.model, a.progress))
    }

    /// The bundle of the activation in progress (kept by [`Effect::RemoveUnreferenced`]).
    pub fn bundle(&self) -> Option<&BundleRef> {
        self.active.as_ref().map(|a| &a.job.directive.bundle)
    }

    pub fn status(&self) -> Option<UpdateStatus> {
        let a = self.active.as_ref()?;
        let d = &a.job.directive;
        let chunks = (a.progress == Progress::Fetching)
            .then(|| (a.download.have.iter().filter(|h| **h).count(), d.bundle.chunks.len()));
        Some(UpdateStatus {
            rollout: d.rollout.clone(),
            model: d.model.to_string(),
            release: d.release.0,
            stage: a.progress.as_str().to_owned(),
            chunks,
        })
    }

    /// After a start: the activation the store says was in progress (`directive` is its
    /// envelope decoded, `serving` the index and bundle of the model it names), or none.
    pub fn resume(
        &mut self,
        pending: Option<Pending>,
        directive: Option<Directive>,
        serving: Option<(usize, PathBuf)>,
        now_ms: i64,
    ) -> Vec<Effect> {
        let Some(p) = pending else { return vec![Effect::RemoveUnreferenced] };
        let (Some(directive), Some((model, replaces))) = (directive, serving) else {
            tracing::error!("the stored activation names no model served here; dropping it");
            return vec![
                Effect::Persist { changes: vec![Change::Activation(None)], reports: vec![] },
                Effect::RemoveUnreferenced,
            ];
        };
        let attempts = p.attempts + 1;
        tracing::info!(
            step = p.step.as_str(),
            attempts,
            release = directive.release.0,
            "resuming the update in progress"
        );
        let job = Job { directive, envelope: p.directive, model, replaces, attempts };
        self.active = Some(Active {
            job,
            progress: p.step,
            reported: p.step,
            download: Download::default(),
            meter: HealthMeter::default(),
            until_ms: now_ms,
            reverting: None,
            swapping: false,
        });
        if attempts > MAX_ATTEMPTS {
            let reason = format!("the agent restarted {attempts} times during this activation");
            return if p.step == Progress::Probation {
                self.start_revert(reason, None)
            } else {
                self.reject(reason, None)
            };
        }
        let a = self.active.as_mut().expect("just set");
        let mut effects =
            vec![Effect::Persist { changes: vec![recorded(&a.job, p.step)], reports: vec![] }];
        match p.step {
            Progress::Fetching => {
                effects.push(Effect::OpenDownload(a.job.directive.bundle.clone()));
            }
            Progress::Staged | Progress::Verified | Progress::Shadow => {
                // Verified again before it is loaded again: the file may have changed.
                a.progress = Progress::Staged;
                effects.push(self.verify());
            }
            Progress::Probation => {
                a.until_ms = now_ms + 1000 * a.job.directive.activation.probation_secs as i64;
            }
        }
        effects
    }

    /// The uplink went up or down: chunk requests made before a reconnect cannot be assumed to
    /// arrive.
    pub fn on_link(&mut self, up: bool, now_ms: i64) -> Vec<Effect> {
        self.committing = None;
        self.connected = up;
        if let Some(a) = &mut self.active {
            a.download.requested.clear();
        }
        if up { self.request_chunks(now_ms) } else { vec![] }
    }

    /// A directive that verified (signature, device, sequence, expiry, trust root in force).
    pub fn on_directive(
        &mut self,
        d: Directive,
        envelope: Vec<u8>,
        ctx: Context<'_>,
    ) -> Vec<Effect> {
        self.committing = None;
        tracing::info!(
            seq = d.seq, rollout = %d.rollout, model = %d.model, release = d.release.0,
            action = ?d.action, "directive received"
        );
        let seen = Change::LastDirective { seq: d.seq, bytes: envelope.clone() };
        // Refused before it disturbs the activation in progress.
        if let (Action::Revert, Some(serving)) = (d.action, &ctx.serving)
            && let Err(reason) = check_revert(&d, serving)
        {
            tracing::warn!("update rejected: {reason}");
            return vec![
                Effect::Persist {
                    changes: vec![seen],
                    reports: vec![report(Some(&d), UpdatePhase::Rejected, Some(reason), None)],
                },
                Effect::Count(Counter::Rejected),
            ];
        }
        if self.active.is_some() {
            let reason = format!("superseded by directive {}", d.seq);
            self.queued = Some((Box::new(d), envelope));
            return self.abandon(reason);
        }
        let running = ctx.serving.map(|s| s.manifest);
        if let Err(refusal) = activation::precheck(&d, running, ctx.highest_seen) {
            tracing::warn!("update rejected: {refusal}");
            return vec![
                Effect::Persist {
                    changes: vec![seen],
                    reports: vec![report(
                        Some(&d),
                        UpdatePhase::Rejected,
                        Some(refusal.to_string()),
                        None,
                    )],
                },
                Effect::Count(Counter::Rejected),
            ];
        }
        let Some(serving) = ctx.serving else { return vec![] };
        if serving.sha256 == d.bundle.sha256 {
            tracing::info!(release = d.release.0, "already serving this bundle");
            let reason = Some("already serving this release".to_owned());
            return vec![Effect::Persist {
                changes: vec![seen],
                reports: vec![report(Some(&d), UpdatePhase::Committed, reason, None)],
            }];
        }
        let job = Job {
            directive: d,
            envelope,
            model: serving.index,
            replaces: serving.path.to_path_buf(),
            attempts: 0,
        };
        let effects = vec![
            Effect::Persist {
                changes: vec![seen, recorded(&job, Progress::Fetching)],
                reports: vec![report(Some(&job.directive), UpdatePhase::Received, None, None)],
            },
            Effect::OpenDownload(job.directive.bundle.clone()),
        ];
        self.active = Some(Active {
            job,
            progress: Progress::Fetching,
            reported: Progress::Fetching,
            download: Download::default(),
            meter: HealthMeter::default(),
            until_ms: 0,
            reverting: None,
            swapping: false,
        });
        effects
    }

    /// A chunk the server signed for this device (the signature checked by the shell, so an
    /// unsigned chunk from another party never counts as a bad chunk of the download).
    pub fn on_chunk(&mut self, bytes: &[u8], now_ms: i64) -> Vec<Effect> {
        self.committing = None;
        let Some(a) = &mut self.active else { return vec![] };
        if a.progress != Progress::Fetching || !a.download.opened {
            return vec![];
        }
        let accepted = Chunk::decode(bytes)
            .map_err(|e| format!("chunk message refused: {e}"))
            .and_then(|chunk| match a.job.directive.bundle.accept(&chunk) {
                Err(ChunkError::OtherBundle) => Ok(None),
                Err(e) => {
                    a.download.requested.remove(&chunk.index);
                    Err(e.to_string())
                }
                Ok(ok) => Ok(Some(ok)),
            });
        match accepted {
            Ok(Some((index, data))) => {
                a.download.requested.remove(&index);
                let Some(have) = a.download.have.get_mut(index as usize) else { return vec![] };
                if *have {
                    return self.request_chunks(now_ms);
                }
                *have = true;
                let mut effects =
                    vec![Effect::WriteChunk { index, data }, Effect::Count(Counter::ChunkReceived)];
                if a.download.have.iter().all(|h| *h) {
                    effects.push(Effect::FinishDownload(a.job.directive.bundle.clone()));
                } else {
                    effects.extend(self.request_chunks(now_ms));
                }
                effects
            }
            Ok(None) => vec![],
            Err(e) => {
                a.download.bad_chunks += 1;
                let bad = a.download.bad_chunks;
                tracing::warn!(bad, "{e}");
                let mut effects = vec![Effect::Count(Counter::ChunkRefused)];
                if bad >= MAX_BAD_CHUNKS {
                    effects.extend(
                        self.reject(format!("download refused after {bad} bad chunks: {e}"), None),
                    );
                }
                effects
            }
        }
    }

    /// The answer to an effect.
    pub fn feed(&mut self, input: Input, now_ms: i64) -> Vec<Effect> {
        let committing = self.committing.take();
        if let (Input::Failed(reason), None, Some(a)) = (&input, &self.active, committing) {
            tracing::error!("cannot record the commit ({reason}); trying again on the next tick");
            self.active = Some(*a);
            return vec![];
        }
        let Some(a) = &mut self.active else { return self.reconsider(vec![]) };
        let effects = match input {
            // The new release serves and the store says probation: a resume's count of starts
            // that could not be recorded changes nothing; probation goes on.
            Input::Failed(reason) if a.progress == Progress::Probation && !a.swapping => {
                tracing::error!("cannot record an update step: {reason}");
                vec![]
            }
            Input::Failed(reason) => {
                self.reject(format!("cannot record the update step: {reason}"), None)
            }
            Input::Opened(Ok(Opened::Bundle)) => self.staged(),
            Input::Opened(Ok(Opened::Partial(have))) => {
                tracing::info!(
                    have = have.iter().filter(|h| **h).count(),
                    of = have.len(),
                    "downloading release {}",
                    a.job.directive.release.0
                );
                let complete = have.iter().all(|h| *h);
                a.download = Download { have, opened: true, ..Download::default() };
                if complete {
                    vec![Effect::FinishDownload(a.job.directive.bundle.clone())]
                } else {
                    self.request_chunks(now_ms)
                }
            }
            Input::Opened(Err(e)) => self.reject(format!("cannot stage the download: {e}"), None),
            Input::Finished(Ok(())) => self.staged(),
            Input::Finished(Err(e)) => self.reject(format!("cannot keep the download: {e}"), None),
            Input::Verified(Ok(())) => {
                let mut effects = Vec::new();
                if a.reported < Progress::Verified {
                    a.reported = Progress::Verified;
                    effects.push(Effect::Persist {
                        changes: vec![recorded(&a.job, Progress::Verified)],
                        reports: vec![report(
                            Some(&a.job.directive),
                            UpdatePhase::Verified,
                            None,
                            None,
                        )],
                    });
                }
                a.progress = Progress::Verified;
                let path = bundle_path(&self.settings.models_dir, &a.job.directive.bundle.sha256);
                effects.push(Effect::Load(path));
                effects
            }
            Input::Verified(Err(reason)) => self.reject(reason, None),
            Input::Loaded(Ok(())) => self.loaded(now_ms),
            Input::Loaded(Err(e)) => self.reject(format!("model refused: {e}"), None),
            Input::PreviousLoaded(result) => self.previous_loaded(result),
        };
        self.reconsider(effects)
    }

    /// Once a second: re-requests chunks, judges shadow and probation.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<Effect> {
        self.committing = None;
        let Some(a) = &mut self.active else { return self.reconsider(vec![]) };
        a.swapping = false;
        if a.reverting.is_some() {
            return vec![];
        }
        let gates = &a.job.directive.activation.gates;
        let health = a.meter.health();
        let enough = a.meter.attempts() >= gates.min_predictions;
        let failures = gates::judge(&health, gates);
        let effects = match a.progress {
            Progress::Fetching => self.request_chunks(now_ms),
            Progress::Shadow if enough && !failures.is_empty() => {
                let reason = format!("shadow period failed: {}", failures_text(&failures));
                self.reject(reason, Some(health))
            }
            Progress::Shadow if enough && now_ms >= a.until_ms => self.swap(Some(health), now_ms),
            Progress::Probation if enough && !failures.is_empty() => {
                // Latency against the current model was judged in shadow, on the same windows.
                let reason = format!("probation failed: {}", failures_text(&failures));
                self.start_revert(reason, Some(health))
            }
            Progress::Probation if enough && now_ms >= a.until_ms => {
                let d = &a.job.directive;
                tracing::info!(model = %d.model, release = d.release.0, "release committed");
                let effects = vec![
                    Effect::Persist {
                        changes: vec![Change::Activation(None)],
                        reports: vec![report(Some(d), UpdatePhase::Committed, None, Some(health))],
                    },
                    Effect::Count(Counter::Committed),
                    Effect::RemoveUnreferenced,
                ];
                self.committing = self.active.take().map(Box::new);
                effects
            }
            _ => vec![],
        };
        self.reconsider(effects)
    }

    /// In shadow for `model`: the tolerance the two models must agree within.
    pub fn shadowing(&self, model: usize) -> Option<f32> {
        let a = self.active.as_ref()?;
        (a.job.model == model && a.progress == Progress::Shadow && a.reverting.is_none())
            .then_some(a.job.directive.activation.gates.agreement_tolerance)
    }

    /// One window in shadow: the candidate's output and latency, the serving model's.
    pub fn observe_shadow(
        &mut self,
        candidate: Result<f32, ()>,
        candidate_us: u64,
        serving: Result<f32, ()>,
        serving_us: u64,
    ) {
        let Some(a) = &mut self.active else { return };
        let tolerance = a.job.directive.activation.gates.agreement_tolerance;
        let seen = a.meter.observe(candidate, candidate_us);
        if let Ok(current) = serving {
            a.meter.compare(seen, current, serving_us, tolerance);
        }
    }

    /// One window through `model`: counted if it is the release in probation.
    pub fn observe_serving(&mut self, model: usize, output: Result<f32, ()>, us: u64) {
        if let Some(a) = &mut self.active
            && a.job.model == model
            && a.progress == Progress::Probation
            && a.reverting.is_none()
        {
            a.meter.observe(output, us);
        }
    }

    fn verify(&self) -> Effect {
        let a = self.active.as_ref().expect("an activation");
        Effect::Verify { directive: Box::new(a.job.directive.clone()), model: a.job.model }
    }

    fn request_chunks(&mut self, now_ms: i64) -> Vec<Effect> {
        let Some(a) = &mut self.active else { return vec![] };
        if !self.connected || a.progress != Progress::Fetching || !a.download.opened {
            return vec![];
        }
        let timeout = self.settings.fetch_timeout_ms;
        let dl = &mut a.download;
        dl.requested.retain(|_, at| now_ms - *at < timeout);
        let room = self.settings.fetch_window.saturating_sub(dl.requested.len());
        let wanted: Vec<u32> = (0..dl.have.len() as u32)
            .filter(|i| !dl.have[*i as usize] && !dl.requested.contains_key(i))
            .take(room)
            .collect();
        if wanted.is_empty() {
            return vec![];
        }
        for i in &wanted {
            dl.requested.insert(*i, now_ms);
        }
        vec![Effect::RequestChunks {
            sha256: a.job.directive.bundle.sha256.clone(),
            indices: wanted,
        }]
    }

    /// The complete bundle is in `models/`.
    fn staged(&mut self) -> Vec<Effect> {
        let Some(a) = &mut self.active else { return vec![] };
        let mut effects = Vec::new();
        if a.reported < Progress::Staged {
            a.reported = Progress::Staged;
            effects.push(Effect::Persist {
                changes: vec![recorded(&a.job, Progress::Staged)],
                reports: vec![report(Some(&a.job.directive), UpdatePhase::Downloaded, None, None)],
            });
        }
        a.progress = Progress::Staged;
        effects.push(self.verify());
        effects
    }

    /// Loaded and self-tested: the shadow period starts, or the swap happens at once.
    fn loaded(&mut self, now_ms: i64) -> Vec<Effect> {
        let Some(a) = &mut self.active else { return vec![] };
        let shadow_secs = a.job.directive.activation.shadow_secs;
        if shadow_secs == 0 {
            return self.swap(None, now_ms);
        }
        let mut effects = Vec::new();
        if a.reported < Progress::Shadow {
            a.reported = Progress::Shadow;
            effects.push(Effect::Persist {
                changes: vec![recorded(&a.job, Progress::Shadow)],
                reports: vec![report(Some(&a.job.directive), UpdatePhase::SelfTested, None, None)],
            });
        }
        tracing::info!(release = a.job.directive.release.0, "shadow period started");
        a.progress = Progress::Shadow;
        a.meter = HealthMeter::default();
        a.until_ms = now_ms + 1000 * shadow_secs as i64;
        effects
    }

    /// The slot is persisted (with the reports) before the swap: a crash right after it
    /// restarts on the new (verified) release, in probation.
    fn swap(&mut self, shadow: Option<Health>, now_ms: i64) -> Vec<Effect> {
        let Some(a) = &mut self.active else { return vec![] };
        let d = &a.job.directive;
        let path = bundle_path(&self.settings.models_dir, &d.bundle.sha256);
        let name = d.model.to_string();
        let mut reports = Vec::new();
        if a.reported < Progress::Shadow {
            reports.push(report(Some(d), UpdatePhase::SelfTested, None, None));
        }
        if shadow.is_some() {
            reports.push(report(Some(d), UpdatePhase::ShadowPassed, None, shadow));
        }
        reports.push(report(Some(d), UpdatePhase::Activated, None, None));
        let slot = Slot { active: path.clone(), previous: Some(a.job.replaces.clone()) };
        let effects = vec![
            Effect::Persist {
                changes: vec![
                    Change::Slot { model: name.clone(), slot },
                    Change::Seen { model: name, release: d.release.0 },
                    recorded(&a.job, Progress::Probation),
                ],
                reports,
            },
            Effect::Swap { model: a.job.model, path, sha256: d.bundle.sha256.clone() },
        ];
        tracing::info!(model = %d.model, release = d.release.0, "new release serving; probation started");
        a.reported = Progress::Probation;
        a.progress = Progress::Probation;
        a.swapping = true;
        a.meter = HealthMeter::default();
        a.until_ms = now_ms + 1000 * d.activation.probation_secs as i64;
        effects
    }

    /// Ends the activation without the new release ever serving.
    fn reject(&mut self, reason: String, health: Option<Health>) -> Vec<Effect> {
        let Some(a) = self.active.take() else { return vec![] };
        let d = &a.job.directive;
        tracing::warn!(model = %d.model, release = d.release.0, "update rejected: {reason}");
        vec![
            Effect::Persist {
                changes: vec![Change::Activation(None)],
                reports: vec![report(Some(d), UpdatePhase::Rejected, Some(reason), health)],
            },
            Effect::Discard(d.bundle.clone()),
            Effect::Count(Counter::Rejected),
        ]
    }

    /// A newer directive replaces the activation in progress.
    fn abandon(&mut self, reason: String) -> Vec<Effect> {
        match &self.active {
            Some(a) if a.progress == Progress::Probation => {
                if a.reverting.is_some() {
                    return vec![];
                }
                self.start_revert(reason, None)
            }
            Some(_) => {
                let effects = self.reject(reason, None);
                self.reconsider(effects)
            }
            None => self.reconsider(vec![]),
        }
    }

    /// Goes back to the last known good release after the new one served and failed (or a
    /// newer directive arrived during probation): first it is readied, then recorded, then put
    /// in service.
    fn start_revert(&mut self, reason: String, health: Option<Health>) -> Vec<Effect> {
        let Some(a) = &mut self.active else { return vec![] };
        a.reverting = Some((reason, health));
        vec![Effect::LoadPrevious(a.job.directive.model.to_string())]
    }

    fn previous_loaded(&mut self, result: Result<PathBuf, String>) -> Vec<Effect> {
        let Some(mut a) = self.active.take() else { return vec![] };
        let Some((reason, health)) = a.reverting.take() else { return vec![] };
        let d = &a.job.directive;
        match result {
            Ok(previous) => {
                tracing::warn!(model = %d.model, release = d.release.0, "release reverted: {reason}");
                let slot = Slot { active: previous, previous: None };
                vec![
                    Effect::Persist {
                        changes: vec![
                            Change::Slot { model: d.model.to_string(), slot },
                            Change::Activation(None),
                        ],
                        reports: vec![report(Some(d), UpdatePhase::Reverted, Some(reason), health)],
                    },
                    Effect::Revert { model: a.job.model },
                    Effect::Count(Counter::Reverted),
                    Effect::RemoveUnreferenced,
                ]
            }
            Err(e) => {
                tracing::error!(
                    "cannot load the last known good release ({e}); the new one keeps serving"
                );
                let reason = format!("{reason}, but the previous release cannot load: {e}");
                vec![Effect::Persist {
                    changes: vec![Change::Activation(None)],
                    reports: vec![report(Some(d), UpdatePhase::Committed, Some(reason), health)],
                }]
            }
        }
    }

    /// Once idle, a directive that waited is judged again.
    fn reconsider(&mut self, mut effects: Vec<Effect>) -> Vec<Effect> {
        if self.active.is_none()
            && let Some((directive, envelope)) = self.queued.take()
        {
            effects.push(Effect::Reconsider { directive, envelope });
        }
        effects
    }
}

#[cfg(test)]
mod tests {
    //! The crash table: every path of an activation, run once straight through and then once
    //! per effect with a power cut right after that effect. A small in-memory gateway carries
    //! the effects out (durable: the store's rows, the files; volatile: the machine and the
    //! models in memory) and restarts the way the agent does: it loads what the slot names and
    //! resumes the recorded step.

    use super::*;
    use crate::activation::tests::{directive as activation_directive, manifest};
    use millwright_shared::bundle::sha256_hex;
    use millwright_shared::directive::{Activation as Plan, BundleRef};
    use millwright_shared::gates::Gates;
    use std::collections::{BTreeMap, BTreeSet};

    const S1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const BUNDLE: &[u8] = b"abcdefghi";
    const CHUNKS: [&str; 3] = ["YWJj", "ZGVm", "Z2hp"];

    fn s2() -> String {
        sha256_hex(BUNDLE)
    }

    fn directive(seq: u64, action: Action, shadow_secs: u64) -> Directive {
        let (release, bundle) = match action {
            Action::Install => (
                2,
                BundleRef {
                    sha256: s2(),
                    size: BUNDLE.len() as u64,
                    chunk_size: 3,
                    chunks: BUNDLE.chunks(3).map(sha256_hex).collect(),
                },
            ),
            Action::Revert => {
                (1, BundleRef { sha256: S1.into(), size: 1, chunk_size: 1, chunks: vec![] })
            }
        };
        Directive {
            seq,
            bundle,
            activation: Plan {
                shadow_secs,
                probation_secs: 5,
                gates: Gates { min_predictions: 4, ..Gates::default() },
            },
            ..activation_directive(release, action)
        }
    }

    /// One path of the table.
    #[derive(Clone, Copy)]
    struct Path {
        name: &'static str,
        shadow_secs: u64,
        /// The download verifies against the root and the gateway.
        verifies: bool,
        /// The candidate's outputs in shadow, and the new release's in probation, are finite.
        shadow_ok: bool,
        probation_ok: bool,
        /// The server sends a revert directive once the gateway reports the swap.
        revert_directive: bool,
        /// A trust root rotation instead of a model update.
        root: bool,
        /// Crash whenever the shadow step is recorded: on the way and after every resume.
        crash_every_resume: bool,
        /// The disk fills just as the swap is to be recorded; the space returns with a restart.
        disk_full_at_swap: bool,
        /// The disk fills just as the commit is to be recorded; the space returns a second later.
        disk_full_at_commit: bool,
        expected: &'static [(u64, UpdatePhase)],
        serves: u64,
    }

    use UpdatePhase::*;
    const INSTALL: [(u64, UpdatePhase); 7] = [
        (1, Received),
        (1, Downloaded),
        (1, Verified),
        (1, SelfTested),
        (1, ShadowPassed),
        (1, Activated),
        (1, Committed),
    ];

    const SELF_TESTED_THEN_REJECTED: [(u64, UpdatePhase); 5] =
        [(1, Received), (1, Downloaded), (1, Verified), (1, SelfTested), (1, Rejected)];

    fn paths() -> Vec<Path> {
        let base = Path {
            name: "install",
            shadow_secs: 3,
            verifies: true,
            shadow_ok: true,
            probation_ok: true,
            revert_directive: false,
            root: false,
            crash_every_resume: false,
            disk_full_at_swap: false,
            disk_full_at_commit: false,
            expected: &INSTALL,
            serves: 2,
        };
        vec![
            base,
            Path {
                name: "install without shadow",
                shadow_secs: 0,
                expected: &[
                    (1, Received),
                    (1, Downloaded),
                    (1, Verified),
                    (1, SelfTested),
                    (1, Activated),
                    (1, Committed),
                ],
                ..base
            },
            Path {
                name: "reject",
                verifies: false,
                expected: &[(1, Received), (1, Downloaded), (1, Rejected)],
                serves: 1,
                ..base
            },
            Path {
                name: "shadow fail",
                shadow_ok: false,
                expected: &SELF_TESTED_THEN_REJECTED,
                serves: 1,
                ..base
            },
            Path {
                name: "probation fail → revert",
                probation_ok: false,
                expected: &[
                    (1, Received),
                    (1, Downloaded),
                    (1, Verified),
                    (1, SelfTested),
                    (1, ShadowPassed),
                    (1, Activated),
                    (1, Reverted),
                ],
                serves: 1,
                ..base
            },
            Path {
                name: "revert directive",
                revert_directive: true,
                expected: &[
                    (1, Received),
                    (1, Downloaded),
                    (1, Verified),
                    (1, SelfTested),
                    (1, ShadowPassed),
                    (1, Activated),
                    (1, Reverted),
                    (2, Committed),
                ],
                serves: 1,
                ..base
            },
            Path {
                name: "root rotation",
                root: true,
                expected: &[(0, RootRotated)],
                serves: 1,
                ..base
            },
            Path { name: "full disk at the swap", disk_full_at_swap: true, ..base },
            Path { name: "full disk at the commit", disk_full_at_commit: true, ..base },
            Path {
                name: "resume after repeated crashes",
                crash_every_resume: true,
                expected: &SELF_TESTED_THEN_REJECTED,
                serves: 1,
                ..base
            },
        ]
    }

    /// What survives a power cut.
    #[derive(Default)]
    struct Durable {
        activation: Option<Pending>,
        slot: Option<Slot>,
        seen: Option<u64>,
        last_directive: u64,
        root: u64,
        reports: Vec<(u64, UpdatePhase, Option<String>)>,
        /// Files in `models/`.
        bundles: BTreeSet<PathBuf>,
        /// Staging files and which chunks they hold.
        staged: BTreeMap<String, Vec<bool>>,
        /// No write succeeds.
        full: bool,
        filled: bool,
    }

    /// What a power cut loses.
    struct Volatile {
        machine: Machine,
        serving: PathBuf,
        candidate: Option<PathBuf>,
        previous: Option<PathBuf>,
        root: u64,
        requests: Vec<u32>,
        next_root: Option<u64>,
    }

    struct Crash;

    struct Gateway {
        path: Path,
        durable: Durable,
        live: Volatile,
        now_ms: i64,
        effects: usize,
        crash_after: Option<usize>,
        crashes: usize,
        /// Broken invariants seen on the way.
        violations: Vec<String>,
    }

    fn models_dir() -> PathBuf {
        PathBuf::from("data/models")
    }
    fn configured() -> PathBuf {
        PathBuf::from("conf/r1.mwb")
    }
    fn release_of(path: &std::path::Path) -> u64 {
        if path == bundle_path(&models_dir(), &s2()) { 2 } else { 1 }
    }
    fn sha_of(path: &std::path::Path) -> String {
        if release_of(path) == 2 { s2() } else { S1.into() }
    }

    impl Gateway {
        fn new(path: Path, crash_after: Option<usize>) -> Self {
            let durable = Durable { root: 1, ..Durable::default() };
            let live = Self::boot(&durable);
            Gateway {
                path,
                durable,
                live,
                now_ms: 0,
                effects: 0,
                crash_after,
                crashes: 0,
                violations: vec![],
            }
        }

        /// The agent's start: what the slot names (if its file is there), else the configured
        /// bundle; the recorded root.
        fn boot(durable: &Durable) -> Volatile {
            let serving = durable
                .slot
                .as_ref()
                .and_then(|s| {
                    std::iter::once(&s.active)
                        .chain(&s.previous)
                        .find(|p| *p == &configured() || durable.bundles.contains(*p))
                        .cloned()
                })
                .unwrap_or_else(configured);
            let settings =
                Settings { models_dir: models_dir(), fetch_window: 2, fetch_timeout_ms: 3000 };
            Volatile {
                machine: Machine::new(settings),
                serving,
                candidate: None,
                previous: None,
                root: durable.root,
                requests: vec![],
                next_root: None,
            }
        }

        fn restart(&mut self) -> Result<(), Crash> {
            self.live = Self::boot(&self.durable);
            let p = self.durable.activation.clone();
            let d = p.as_ref().map(|p| self.decode(&p.directive));
            let serving = Some((0, self.live.serving.clone()));
            let effects = self.live.machine.resume(p, d, serving, self.now_ms);
            self.run(effects)?;
            let effects = self.live.machine.on_link(true, self.now_ms);
            self.run(effects)
        }

        fn run(&mut self, effects: Vec<Effect>) -> Result<(), Crash> {
            let mut queue: std::collections::VecDeque<Effect> = effects.into();
            while let Some(effect) = queue.pop_front() {
                let records_shadow = matches!(&effect, Effect::Persist { changes, .. }
                    if changes.iter().any(|c| matches!(c, Change::Activation(Some(p)) if p.step == Progress::Shadow)));
                let input = self.carry_out(effect);
                self.effects += 1;
                let crash = self.crash_after == Some(self.effects)
                    || (self.path.crash_every_resume && records_shadow);
                if crash {
                    self.crashes += 1;
                    return Err(Crash);
                }
                let Some(input) = input else { continue };
                if matches!(input, Input::Failed(_)) {
                    queue.clear();
                }
                for e in self.live.machine.feed(input, self.now_ms).into_iter().rev() {
                    queue.push_front(e);
                }
            }
            Ok(())
        }

        fn referenced(&self, p: &PathBuf) -> bool {
            self.live.serving == *p
                || self
                    .durable
                    .slot
                    .as_ref()
                    .is_some_and(|s| s.active == *p || s.previous.as_ref() == Some(p))
        }

        fn carry_out(&mut self, effect: Effect) -> Option<Input> {
            let (d, l) = (&mut self.durable, &mut self.live);
            match effect {
                Effect::Persist { changes, reports } => {
                    let swap = changes.iter().any(|c| matches!(c, Change::Slot { .. }));
                    let commit = reports.iter().any(|r| r.phase == Committed);
                    if !d.filled
                        && ((self.path.disk_full_at_swap && swap)
                            || (self.path.disk_full_at_commit && commit))
                    {
                        (d.full, d.filled) = (true, true);
                    }
                    if d.full {
                        return Some(Input::Failed("database or disk is full".into()));
                    }
                    for c in changes {
                        match c {
                            Change::Root(doc) => d.root = doc[0].into(),
                            Change::LastDirective { seq, .. } => d.last_directive = seq,
                            Change::Seen { release, .. } => d.seen = d.seen.max(Some(release)),
                            Change::Slot { slot, .. } => d.slot = Some(slot),
                            Change::Activation(p) => d.activation = p,
                        }
                    }
                    for r in reports {
                        d.reports.push((r.directive.unwrap_or(0), r.phase, r.reason));
                    }
                    None
                }
                Effect::OpenDownload(plan) => {
                    if d.bundles.contains(&bundle_path(&models_dir(), &plan.sha256)) {
                        return Some(Input::Opened(Ok(Opened::Bundle)));
                    }
                    let have = d
                        .staged
                        .entry(plan.sha256.clone())
                        .or_insert(vec![false; plan.chunks.len()]);
                    Some(Input::Opened(Ok(Opened::Partial(have.clone()))))
                }
                Effect::RequestChunks { indices, .. } => {
                    l.requests.extend(indices);
                    None
                }
                Effect::WriteChunk { index, .. } => {
                    let have = d.staged.get_mut(&s2())?;
                    have[index as usize] = true;
                    None
                }
                Effect::FinishDownload(plan) => {
                    d.staged.remove(&plan.sha256);
                    d.bundles.insert(bundle_path(&models_dir(), &plan.sha256));
                    Some(Input::Finished(Ok(())))
                }
                Effect::Verify { directive, .. } => {
                    let here =
                        d.bundles.contains(&bundle_path(&models_dir(), &directive.bundle.sha256));
                    Some(Input::Verified(if here && self.path.verifies {
                        Ok(())
                    } else {
                        Err("bundle refused: manifest names another asset type".into())
                    }))
                }
                Effect::Load(path) => {
                    let here = d.bundles.contains(&path);
                    l.candidate = here.then_some(path);
                    Some(Input::Loaded(if here { Ok(()) } else { Err("cannot read".into()) }))
                }
                Effect::Swap { path, .. } => {
                    if d.slot.as_ref().map(|s| &s.active) != Some(&path) {
                        self.violations
                            .push(format!("swapped to {path:?} before its slot was recorded"));
                    }
                    assert_eq!(
                        l.candidate.take(),
                        Some(path.clone()),
                        "swapped in what was not loaded"
                    );
                    l.previous = Some(std::mem::replace(&mut l.serving, path));
                    None
                }
                Effect::LoadPrevious(_) => {
                    if let Some(p) = &l.previous {
                        return Some(Input::PreviousLoaded(Ok(p.clone())));
                    }
                    let previous = d.slot.as_ref().and_then(|s| s.previous.clone());
                    Some(Input::PreviousLoaded(match previous {
                        Some(p) if p == configured() || d.bundles.contains(&p) => {
                            l.previous = Some(p.clone());
                            Ok(p)
                        }
                        _ => Err("no last known good release is kept".into()),
                    }))
                }
                Effect::Revert { .. } => {
                    l.serving = l.previous.take().expect("readied by LoadPrevious");
                    None
                }
                Effect::Discard(plan) => {
                    d.staged.remove(&plan.sha256);
                    l.candidate = None;
                    let p = bundle_path(&models_dir(), &plan.sha256);
                    if !self.referenced(&p) {
                        self.durable.bundles.remove(&p);
                    }
                    None
                }
                Effect::RemoveUnreferenced => {
                    l.previous = None;
                    let keep = l.machine.bundle().map(|b| b.sha256.clone());
                    d.staged.retain(|sha, _| Some(sha) == keep.as_ref());
                    let bundles: Vec<PathBuf> = d.bundles.iter().cloned().collect();
                    for p in bundles {
                        let in_progress =
                            keep.as_ref().is_some_and(|k| bundle_path(&models_dir(), k) == p);
                        if !self.referenced(&p) && !in_progress {
                            self.durable.bundles.remove(&p);
                        }
                    }
                    None
                }
                Effect::Count(_) => None,
                Effect::Reconsider { directive, envelope } => {
                    let effects = self.deliver(*directive, envelope);
                    // Run inline, as the shell does.
                    self.run(effects).err().map(|Crash| Input::Failed("crash".into()))
                }
                Effect::AdoptRoot => {
                    l.root = l.next_root.take().expect("a verified root waits");
                    None
                }
            }
        }

        /// The stored envelope is the directive's sequence number.
        fn decode(&self, envelope: &[u8]) -> Directive {
            let seq: u64 = String::from_utf8_lossy(envelope).parse().unwrap();
            let action = if seq == 1 { Action::Install } else { Action::Revert };
            directive(seq, action, self.path.shadow_secs)
        }

        fn deliver(&mut self, d: Directive, envelope: Vec<u8>) -> Vec<Effect> {
            let serving = self.live.serving.clone();
            let manifest = manifest(release_of(&serving));
            let sha = sha_of(&serving);
            let lkg =
                self.durable.slot.as_ref().and_then(|s| s.previous.as_ref()).map(|p| sha_of(p));
            let ctx = Context {
                serving: Some(Serving {
                    index: 0,
                    manifest: &manifest,
                    path: &serving,
                    sha256: &sha,
                    last_known_good: lkg.as_deref(),
                }),
                highest_seen: self.durable.seen,
            };
            self.live.machine.on_directive(d, envelope, ctx)
        }

        /// The server's retained directive for this gateway: the install, then (on the revert
        /// path, once the swap was reported) the revert.
        fn desired(&self) -> Option<Directive> {
            if self.path.root {
                return None;
            }
            let swapped = self.durable.reports.iter().any(|r| r.1 == Activated);
            if self.path.revert_directive && swapped {
                return Some(directive(2, Action::Revert, self.path.shadow_secs));
            }
            Some(directive(1, Action::Install, self.path.shadow_secs))
        }

        /// One thing happens: a directive or root arrives, a chunk answers a request, or a
        /// second passes with two windows inferred.
        fn step(&mut self, delivered: &mut u64) -> Result<(), Crash> {
            if self.path.disk_full_at_commit {
                self.durable.full = false;
            }
            if self.path.root && self.live.root < 2 {
                self.live.next_root = Some(2);
                return self.run(rotate_root(vec![2], 2));
            }
            if let Some(d) = self.desired()
                && d.seq > self.durable.last_directive
                && d.seq > *delivered
            {
                *delivered = d.seq;
                let envelope = d.seq.to_string().into_bytes();
                let effects = self.deliver(d, envelope);
                return self.run(effects);
            }
            if !self.live.requests.is_empty() {
                let index = self.live.requests.remove(0);
                let chunk = Chunk {
                    v: wire::WIRE_VERSION,
                    sha256: s2(),
                    index,
                    data: CHUNKS[index as usize].into(),
                };
                let effects = self.live.machine.on_chunk(&wire::encode(&chunk), self.now_ms);
                return self.run(effects);
            }
            self.now_ms += 1000;
            for _ in 0..2 {
                let good = |ok: bool| if ok { Ok(10.0) } else { Ok(f32::NAN) };
                if self.live.machine.shadowing(0).is_some() {
                    let candidate = good(self.path.shadow_ok);
                    self.live.machine.observe_shadow(candidate, 100, Ok(10.0), 100);
                }
                let out = if release_of(&self.live.serving) == 2 {
                    good(self.path.probation_ok)
                } else {
                    Ok(10.0)
                };
                self.live.machine.observe_serving(0, out, 100);
            }
            let effects = self.live.machine.on_tick(self.now_ms);
            self.run(effects)
        }

        /// Runs the path to its end, restarting after every crash.
        fn play(mut self) -> Gateway {
            let mut delivered = 0;
            let mut started = false;
            for _ in 0..500 {
                let result = if started { self.step(&mut delivered) } else { self.restart() };
                started = true;
                if let Err(Crash) = result {
                    delivered = 0;
                    started = false;
                    continue;
                }
                if self.path.disk_full_at_swap
                    && self.durable.full
                    && !self.live.machine.is_active()
                {
                    // Space returns; the agent is restarted.
                    self.durable.full = false;
                    started = false;
                    continue;
                }
                let done = self.durable.activation.is_none()
                    && !self.live.machine.is_active()
                    && self.desired().is_none_or(|d| d.seq <= self.durable.last_directive)
                    && (!self.path.root || self.live.root == 2);
                if done {
                    break;
                }
            }
            self
        }
    }

    /// Checks one finished run; returns what went wrong.
    fn verdict(g: &Gateway) -> Result<(), String> {
        if !g.violations.is_empty() {
            return Err(g.violations.join("; "));
        }
        if (g.path.disk_full_at_swap || g.path.disk_full_at_commit) && !g.durable.filled {
            return Err("the disk never filled".into());
        }
        let phases: Vec<(u64, UpdatePhase)> =
            g.durable.reports.iter().map(|r| (r.0, r.1)).collect();
        if phases != g.path.expected {
            return Err(format!("reports {phases:?}, expected {:?}", g.path.expected));
        }
        if release_of(&g.live.serving) != g.path.serves {
            return Err(format!("serves {:?}, expected release {}", g.live.serving, g.path.serves));
        }
        let after_restart = Gateway::boot(&g.durable).serving;
        if after_restart != g.live.serving {
            return Err(format!(
                "serves {:?} but would start on {after_restart:?}",
                g.live.serving
            ));
        }
        let verified =
            g.live.serving == configured() || g.durable.bundles.contains(&g.live.serving);
        if !verified {
            return Err(format!(
                "serves {:?}, which is not a verified bundle on disk",
                g.live.serving
            ));
        }
        if g.durable.activation.is_some() || g.live.machine.is_active() {
            return Err("an activation is still open".into());
        }
        let leftovers: Vec<&PathBuf> =
            g.durable.bundles.iter().filter(|p| !g.referenced(p)).collect();
        if !leftovers.is_empty() || !g.durable.staged.is_empty() {
            return Err(format!(
                "files left behind: {leftovers:?}, staging {:?}",
                g.durable.staged.keys()
            ));
        }
        if g.path.root && (g.live.root != 2 || g.durable.root != 2) {
            return Err(format!("root {} in force, {} recorded", g.live.root, g.durable.root));
        }
        Ok(())
    }

    #[test]
    fn a_crash_after_any_effect_of_any_path_comes_back_serving_a_verified_release_with_each_report_once()
     {
        let mut runs = 0;
        let mut failures = Vec::new();
        let mut table = Vec::new();
        for path in paths() {
            let straight = Gateway::new(path, None).play();
            if let Err(e) = verdict(&straight) {
                failures.push(format!("{} without a crash: {e}", path.name));
            }
            let effects = straight.effects;
            let straight_crashes = straight.crashes;
            if path.crash_every_resume {
                // Every start ended by a crash: the activation is given up after MAX_ATTEMPTS.
                let reason =
                    straight.durable.reports.last().and_then(|r| r.2.clone()).unwrap_or_default();
                if !reason.contains("restarted 4 times")
                    || straight_crashes != MAX_ATTEMPTS as usize + 1
                {
                    failures.push(format!(
                        "{}: {straight_crashes} crashes, then {reason:?}",
                        path.name
                    ));
                }
            }
            for k in 1..=effects {
                let g = Gateway::new(path, Some(k)).play();
                runs += 1;
                if g.crashes == 0 {
                    failures.push(format!("{} crash after effect {k}: never crashed", path.name));
                }
                if let Err(e) = verdict(&g) {
                    failures.push(format!("{} crash after effect {k}: {e}", path.name));
                }
            }
            table.push(format!("{:<30} {effects:>3} effects", path.name));
        }
        println!("{}", table.join("\n"));
        println!(
            "crash table: {} paths, {runs} runs each cut after one effect in turn, {} failed",
            table.len(),
            failures.len()
        );
        assert!(failures.is_empty(), "{failures:#?}");
        assert!(runs > 100, "the table is too small to mean much: {runs} runs");
    }
}
