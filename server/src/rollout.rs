//! The rollout engine (pure): which devices get a release when, what their reports mean, and
//! when a wave may follow the previous one. The shell ([`crate::rollouts`]) loads a
//! [`Rollout`], calls [`plan`], [`step`], [`on_report`] or [`act`] with `now`, carries out the
//! returned [`Action`]s (sign and publish directives, write the audit log) and saves it.
//!
//! A wave starts only when the previous one is complete: every device committed the release
//! (and passed the server's own judgement of its health) or failed within the tolerance, and
//! the last commit is `soak_secs` old. Devices of later waves get no directive, so they
//! download nothing until then. Within a wave, an optional [`Rate`] spreads the directives
//! over time. A device fails when it makes no progress for `device_timeout_secs` beyond the
//! time its phase is meant to take (the shadow and probation periods); a paused rollout
//! with a deadline reverts when nobody resumes it in time.

use crate::db::DeviceRow;
use millwright_shared::directive::Activation;
use millwright_shared::gates::{self, Gates, Health};
use millwright_shared::wire::{UpdatePhase, UpdateReport};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    All,
    Site { site: String },
    Tag { tag: String },
    Devices { devices: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Canary {
    Count(usize),
    Percent(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Waves {
    /// The devices after the canary, split into this many nearly equal waves.
    Fixed(usize),
    /// Waves of this many devices (the last may be smaller).
    Size(usize),
    /// Each wave twice the previous, starting at twice the canary.
    Exponential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    Pause,
    Revert,
}

fn default_activation() -> Activation {
    Activation { shadow_secs: 60, probation_secs: 60, gates: Gates::default() }
}

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub model: String,
    pub release: u64,
    pub target: Target,
    #[serde(default = "Spec::default_canary")]
    pub canary: Canary,
    #[serde(default = "Spec::default_waves")]
    pub waves: Waves,
    #[serde(default = "Spec::default_soak")]
    pub soak_secs: u64,
    #[serde(default = "Spec::default_timeout")]
    pub device_timeout_secs: u64,
    #[serde(default)]
    pub max_failures_per_wave: usize,
    /// Failures tolerated per wave as a share of the wave (the larger of this and the count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures_percent: Option<f64>,
    #[serde(default = "Spec::default_on_failure")]
    pub on_failure: OnFailure,
    #[serde(default = "default_activation")]
    pub activation: Activation,
    /// How fast a wave's directives go out; all at once without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// A rollout paused this long (by its policy or by hand) reverts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_deadline_secs: Option<u64>,
}

/// Devices notified per minute within a wave: `per_minute` in the wave's first minute, times
/// `ramp` in each following minute, up to `max_per_minute` (AWS IoT Jobs' exponential rollout,
/// with minutes as its increase criterion).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_minute: u64,
    #[serde(default = "Rate::no_ramp")]
    pub ramp: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_minute: Option<u64>,
}

impl Rate {
    fn no_ramp() -> f64 {
        1.0
    }

    /// Devices that may have been notified `elapsed_ms` after the wave started: at least one,
    /// so a wave always starts.
    pub fn allowed(&self, elapsed_ms: i64) -> usize {
        let cap = self.max_per_minute.map_or(f64::INFINITY, |m| m as f64);
        let (mut rate, mut total, mut left) =
            ((self.per_minute as f64).min(cap), 0.0, elapsed_ms.max(0) as f64 / 60_000.0);
        // Whole minutes one by one while the rate still grows; the rest in closed form.
        while left > 0.0 {
            let growing = self.ramp > 1.0 && rate < cap;
            let span = if growing { left.min(1.0) } else { left };
            total += rate * span;
            left -= span;
            rate = (rate * self.ramp.max(1.0)).min(cap);
        }
        (total.floor() as usize).max(1)
    }
}

impl Spec {
    fn default_canary() -> Canary {
        Canary::Percent(10.0)
    }
    fn default_waves() -> Waves {
        Waves::Fixed(2)
    }
    fn default_soak() -> u64 {
        60
    }
    fn default_timeout() -> u64 {
        900
    }
    fn default_on_failure() -> OnFailure {
        OnFailure::Revert
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Paused,
    Completed,
    Aborted,
    Reverting,
    Reverted,
}

impl State {
    pub fn is_active(self) -> bool {
        matches!(self, State::Running | State::Paused | State::Reverting)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// In a later wave; no directive yet.
    Pending,
    /// Directive sent; waiting for its outcome.
    Notified,
    Committed,
    Failed,
    /// A revert directive was sent.
    Reverting,
    Reverted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRun {
    pub device: String,
    pub wave: usize,
    /// The release the device served when the rollout was planned (what a revert goes back to).
    pub previous: Option<u64>,
    pub state: DeviceState,
    /// The last phase the device reported for this rollout's directive.
    pub phase: Option<UpdatePhase>,
    pub reason: Option<String>,
    /// Sequence number of the directive sent for this rollout (install, then revert).
    pub directive: Option<u64>,
    pub notified_ms: Option<i64>,
    pub updated_ms: Option<i64>,
    /// When the device last moved to a new phase (or got its directive): its timeout counts
    /// from here.
    #[serde(default)]
    pub progress_ms: Option<i64>,
    pub health: Option<Health>,
}

impl DeviceRun {
    /// How long the device may stay in its phase: the timeout, plus the shadow or probation
    /// period that follows the phase it reported last.
    fn allowance_secs(&self, spec: &Spec) -> u64 {
        let period = match (self.state, self.phase) {
            (DeviceState::Notified, Some(UpdatePhase::SelfTested)) => spec.activation.shadow_secs,
            (DeviceState::Notified, Some(UpdatePhase::ShadowPassed | UpdatePhase::Activated)) => {
                spec.activation.probation_secs
            }
            _ => 0,
        };
        spec.device_timeout_secs.saturating_add(period)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub spec: Spec,
    pub state: State,
    /// Why it is paused, reverting, reverted or aborted.
    pub reason: Option<String>,
    pub created_by: String,
    pub created_ms: i64,
    /// Sizes of the waves; wave 0 is the canary.
    pub waves: Vec<usize>,
    /// The wave in progress.
    pub wave: usize,
    pub wave_started_ms: Option<i64>,
    /// Failures of the current wave an operator accepted by resuming.
    pub tolerated: usize,
    pub devices: Vec<DeviceRun>,
    pub all_notified_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// When it was paused, for the pause deadline.
    #[serde(default)]
    pub paused_ms: Option<i64>,
    /// Positions in `devices` of the devices changed since the shell last saved them (it
    /// writes only those); not part of the stored rollout.
    #[serde(skip)]
    pub changed: BTreeSet<usize>,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `device` a directive to install the rollout's release.
    Install { device: String },
    /// Send `device` a signed revert to `release`.
    Revert { device: String, release: u64 },
    /// Write to the audit log (the engine's own decisions; the actor is "server").
    Audit { action: String, detail: String },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("unknown device {0}")]
    UnknownDevice(String),
    #[error("no device in the target serves model {0}")]
    Empty(String),
    #[error("the canary and waves must be at least 1 (canary {canary:?}, waves {waves:?})")]
    Shape { canary: Canary, waves: Waves },
    #[error("{0}")]
    Policy(String),
}

/// What a spec's rate and failure share must be.
fn check_policy(spec: &Spec) -> Result<(), PlanError> {
    if let Some(p) = spec.max_failures_percent
        && !(0.0..=100.0).contains(&p)
    {
        return Err(PlanError::Policy(format!("max_failures_percent {p} is not 0-100")));
    }
    if let Some(rate) = spec.rate {
        if rate.per_minute == 0 || rate.max_per_minute == Some(0) {
            return Err(PlanError::Policy("a rate of 0 devices per minute never finishes".into()));
        }
        if !(rate.ramp.is_finite() && rate.ramp >= 1.0) {
            return Err(PlanError::Policy(format!("ramp {} must be 1 or more", rate.ramp)));
        }
    }
    Ok(())
}

fn targeted(target: &Target, d: &DeviceRow) -> bool {
    match target {
        Target::All => true,
        Target::Site { site } => d.site.as_deref() == Some(site),
        Target::Tag { tag } => d.tags.contains(tag),
        Target::Devices { devices } => devices.contains(&d.device),
    }
}

/// Wave sizes for `n` devices: the canary first.
pub fn wave_sizes(n: usize, canary: Canary, waves: Waves) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let first = match canary {
        Canary::Count(c) => c,
        Canary::Percent(p) => ((n as f64) * p / 100.0).ceil() as usize,
    }
    .clamp(1, n);
    let mut sizes = vec![first];
    let rest = n - first;
    match waves {
        Waves::Fixed(k) => {
            let k = k.clamp(1, rest.max(1));
            for i in 0..k {
                let size = rest / k + usize::from(i < rest % k);
                if size > 0 {
                    sizes.push(size);
                }
            }
        }
        Waves::Size(n) => {
            let n = n.max(1);
            sizes.extend(std::iter::repeat_n(n, rest / n));
            if !rest.is_multiple_of(n) {
                sizes.push(rest % n);
            }
        }
        Waves::Exponential => {
            let (mut left, mut size) = (rest, first * 2);
            while left > 0 {
                sizes.push(size.min(left));
                left -= size.min(left);
                size *= 2;
            }
        }
    }
    sizes
}

/// Plans a rollout over the inventory: the target's devices that serve the model, ordered by
/// id and cut into waves. Devices already on the release count as committed.
pub fn plan(
    id: String,
    spec: Spec,
    inventory: &[DeviceRow],
    created_by: String,
    now_ms: i64,
) -> Result<Rollout, PlanError> {
    if matches!(spec.canary, Canary::Count(0))
        || matches!(spec.waves, Waves::Fixed(0) | Waves::Size(0))
    {
        return Err(PlanError::Shape { canary: spec.canary, waves: spec.waves });
    }
    check_policy(&spec)?;
    if let Target::Devices { devices } = &spec.target
        && let Some(unknown) = devices.iter().find(|d| !inventory.iter().any(|i| &i.device == *d))
    {
        return Err(PlanError::UnknownDevice(unknown.clone()));
    }
    let mut chosen: Vec<&DeviceRow> = inventory
        .iter()
        .filter(|d| targeted(&spec.target, d) && d.serving(&spec.model).is_some())
        .collect();
    chosen.sort_by(|a, b| a.device.cmp(&b.device));
    if chosen.is_empty() {
        return Err(PlanError::Empty(spec.model.clone()));
    }
    let (done, todo): (Vec<&DeviceRow>, Vec<&DeviceRow>) =
        chosen.into_iter().partition(|d| d.serving(&spec.model) == Some(spec.release));
    let waves = wave_sizes(todo.len(), spec.canary, spec.waves);
    let mut devices = Vec::new();
    let mut wave_of = waves.iter().enumerate().flat_map(|(w, &n)| std::iter::repeat_n(w, n));
    for d in &todo {
        devices.push(DeviceRun {
            device: d.device.clone(),
            wave: wave_of.next().unwrap_or(0),
            previous: d.serving(&spec.model),
            state: DeviceState::Pending,
            phase: None,
            reason: None,
            directive: None,
            notified_ms: None,
            updated_ms: None,
            progress_ms: None,
            health: None,
        });
    }
    for d in done {
        devices.push(DeviceRun {
            device: d.device.clone(),
            wave: 0,
            previous: Some(spec.release),
            state: DeviceState::Committed,
            phase: Some(UpdatePhase::Committed),
            reason: Some("already serving this release".into()),
            directive: None,
            notified_ms: None,
            updated_ms: Some(now_ms),
            progress_ms: None,
            health: None,
        });
    }
    let devices_len = devices.len();
    Ok(Rollout {
        id,
        spec,
        state: State::Running,
        reason: None,
        created_by,
        created_ms: now_ms,
        waves,
        wave: 0,
        wave_started_ms: None,
        tolerated: 0,
        devices,
        all_notified_ms: None,
        finished_ms: None,
        paused_ms: None,
        changed: (0..devices_len).collect(),
    })
}

fn audit(action: &str, detail: String) -> Action {
    Action::Audit { action: action.into(), detail }
}

impl Rollout {
    /// A device by id, marked changed.
    pub fn device_mut(&mut self, device: &str) -> Option<&mut DeviceRun> {
        let i = self.devices.iter().position(|d| d.device == device)?;
        self.changed.insert(i);
        self.devices.get_mut(i)
    }

    /// Counts per device state.
    pub fn count(&self, state: DeviceState) -> usize {
        self.devices.iter().filter(|d| d.state == state).count()
    }

    fn in_wave(&self, wave: usize) -> impl Iterator<Item = &DeviceRun> {
        self.devices.iter().filter(move |d| d.wave == wave)
    }

    /// Sends reverts to every device that got this rollout's directive.
    fn start_revert(&mut self, reason: String, now_ms: i64) -> Vec<Action> {
        let mut actions = vec![audit("revert", reason.clone())];
        self.state = State::Reverting;
        self.reason = Some(reason);
        for (i, d) in self.devices.iter_mut().enumerate() {
            if d.notified_ms.is_none() {
                continue;
            }
            self.changed.insert(i);
            match d.previous {
                Some(release) => {
                    d.state = DeviceState::Reverting;
                    d.notified_ms = Some(now_ms);
                    d.progress_ms = Some(now_ms);
                    actions.push(Action::Revert { device: d.device.clone(), release });
                }
                None => {
                    d.state = DeviceState::Failed;
                    d.reason = Some("no previous release to revert to".into());
                }
            }
        }
        if self.count(DeviceState::Reverting) == 0 {
            self.state = State::Reverted;
            self.finished_ms = Some(now_ms);
        }
        actions
    }
}

/// Advances the rollout at `now_ms`: timeouts, the next wave, the failure policy, completion.
pub fn step(r: &mut Rollout, now_ms: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    for (i, d) in r.devices.iter_mut().enumerate() {
        let waiting = matches!(d.state, DeviceState::Notified | DeviceState::Reverting);
        let since = d.progress_ms.or(d.notified_ms);
        let allowance = d.allowance_secs(&r.spec);
        if waiting && since.is_some_and(|t| now_ms - t > 1000 * allowance as i64) {
            let after = d.phase.map_or("its directive", UpdatePhase::as_str);
            let reason = format!("no progress within {allowance} s of {after}");
            actions.push(audit("device_failed", format!("{}: {reason}", d.device)));
            d.state = DeviceState::Failed;
            d.reason = Some(reason);
            d.updated_ms = Some(now_ms);
            r.changed.insert(i);
        }
    }
    match r.state {
        State::Running => actions.extend(step_running(r, now_ms)),
        State::Reverting => {
            if r.count(DeviceState::Reverting) == 0 {
                r.state = State::Reverted;
                r.finished_ms = Some(now_ms);
                actions.push(audit(
                    "reverted",
                    format!(
                        "{} device(s) back on their previous release",
                        r.count(DeviceState::Reverted)
                    ),
                ));
            }
        }
        State::Paused => {
            if let (Some(deadline), Some(since)) = (r.spec.pause_deadline_secs, r.paused_ms)
                && now_ms - since >= 1000 * deadline as i64
            {
                let reason = format!(
                    "paused for {deadline} s without a resume ({})",
                    r.reason.clone().unwrap_or_default()
                );
                actions.extend(r.start_revert(reason, now_ms));
            }
        }
        State::Completed | State::Aborted | State::Reverted => {}
    }
    actions
}

/// The failures a wave of `size` devices may have.
fn tolerance(spec: &Spec, size: usize) -> usize {
    let share = spec.max_failures_percent.map_or(0, |p| (size as f64 * p / 100.0).floor() as usize);
    spec.max_failures_per_wave.max(share)
}

fn step_running(r: &mut Rollout, now_ms: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    let wave = r.wave;
    let started_ms = *r.wave_started_ms.get_or_insert(now_ms);
    let allowed = r.spec.rate.map_or(usize::MAX, |rate| rate.allowed(now_ms - started_ms));
    let notified = r.in_wave(wave).filter(|d| d.notified_ms.is_some()).count();
    let mut started = 0;
    for (i, d) in r
        .devices
        .iter_mut()
        .enumerate()
        .filter(|(_, d)| d.wave == wave && d.state == DeviceState::Pending)
        .take(allowed.saturating_sub(notified))
    {
        r.changed.insert(i);
        d.state = DeviceState::Notified;
        d.notified_ms = Some(now_ms);
        d.progress_ms = Some(now_ms);
        actions.push(Action::Install { device: d.device.clone() });
        started += 1;
    }
    if started_ms == now_ms && notified == 0 {
        let name = if wave == 0 { "canary".to_owned() } else { format!("wave {wave}") };
        let size = r.in_wave(wave).filter(|d| d.state != DeviceState::Committed).count();
        let paced =
            if started < size { format!(", {started} notified now") } else { String::new() };
        actions.push(audit("wave_started", format!("{name}: {size} device(s){paced}")));
    }
    if started > 0
        && r.devices.iter().all(|d| d.state != DeviceState::Pending)
        && r.all_notified_ms.is_none()
    {
        r.all_notified_ms = Some(now_ms);
    }
    let wave: Vec<&DeviceRun> = r.in_wave(r.wave).collect();
    let failed = wave.iter().filter(|d| d.state == DeviceState::Failed).count();
    let tolerated = tolerance(&r.spec, wave.len()) + r.tolerated;
    if failed > tolerated {
        let reason = format!(
            "{failed} of {} device(s) failed in {} (at most {tolerated} tolerated)",
            wave.len(),
            if r.wave == 0 { "the canary".to_owned() } else { format!("wave {}", r.wave) },
        );
        return match r.spec.on_failure {
            OnFailure::Pause => {
                r.state = State::Paused;
                r.paused_ms = Some(now_ms);
                r.reason = Some(reason.clone());
                actions.push(audit("paused", reason));
                actions
            }
            OnFailure::Revert => {
                actions.extend(r.start_revert(reason, now_ms));
                actions
            }
        };
    }
    let settled =
        wave.iter().all(|d| matches!(d.state, DeviceState::Committed | DeviceState::Failed));
    let last = wave.iter().filter_map(|d| d.updated_ms).max().unwrap_or(now_ms);
    if settled && now_ms - last >= 1000 * r.spec.soak_secs as i64 {
        if r.wave + 1 >= r.waves.len() {
            r.state = State::Completed;
            r.finished_ms = Some(now_ms);
            actions.push(audit(
                "completed",
                format!("{} device(s) committed", r.count(DeviceState::Committed)),
            ));
        } else {
            r.wave += 1;
            r.wave_started_ms = None;
            r.tolerated = 0;
            actions.extend(step_running(r, now_ms));
        }
    }
    actions
}

/// The server held, or just sent, a chunk each of `waiting` asked for: their downloads wait on
/// the server (a wave's bundles leave at the fleet's delivery pace), not on them, so their
/// timeouts count from now. A device's progress is moved only once half its timeout has gone,
/// so a long queue costs one save per device per half timeout, not one per tick.
pub fn on_waiting(r: &mut Rollout, waiting: &std::collections::HashSet<String>, now_ms: i64) {
    let half_ms = 500 * i64::try_from(r.spec.device_timeout_secs).unwrap_or(i64::MAX / 1000);
    for (i, d) in r.devices.iter_mut().enumerate() {
        let downloading = matches!(d.state, DeviceState::Notified | DeviceState::Reverting)
            && matches!(d.phase, None | Some(UpdatePhase::Received));
        let since = d.progress_ms.or(d.notified_ms);
        if downloading
            && since.is_some_and(|t| now_ms - t >= half_ms)
            && waiting.contains(&d.device)
        {
            d.progress_ms = Some(now_ms);
            r.changed.insert(i);
        }
    }
}

/// A device's update report. Only reports for the directive this rollout sent count.
pub fn on_report(r: &mut Rollout, device: &str, report: &UpdateReport, now_ms: i64) -> Vec<Action> {
    let gates = r.spec.activation.gates.clone();
    let Some(d) = r.device_mut(device) else { return Vec::new() };
    if report.directive.is_none() || report.directive != d.directive {
        return Vec::new();
    }
    if d.phase != Some(report.phase) {
        d.progress_ms = Some(now_ms);
    }
    d.phase = Some(report.phase);
    d.updated_ms = Some(now_ms);
    if report.health.is_some() {
        d.health = report.health.clone();
    }
    let mut actions = Vec::new();
    match (d.state, report.phase) {
        (DeviceState::Notified, UpdatePhase::Committed) => {
            let failures =
                report.health.as_ref().map(|h| gates::judge(h, &gates)).unwrap_or_default();
            if failures.is_empty() {
                d.state = DeviceState::Committed;
                d.reason = report.reason.clone();
            } else {
                let reason =
                    failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                d.state = DeviceState::Failed;
                d.reason = Some(format!("server gate: {reason}"));
                actions.push(audit("device_failed", format!("{device}: server gate: {reason}")));
            }
        }
        (DeviceState::Notified, UpdatePhase::Rejected | UpdatePhase::Reverted) => {
            d.state = DeviceState::Failed;
            d.reason = report.reason.clone();
            actions.push(audit(
                "device_failed",
                format!(
                    "{device}: {} ({})",
                    report.phase.as_str(),
                    report.reason.clone().unwrap_or_default()
                ),
            ));
        }
        (DeviceState::Reverting, UpdatePhase::Committed) => d.state = DeviceState::Reverted,
        (DeviceState::Reverting, UpdatePhase::Rejected | UpdatePhase::Reverted) => {
            d.state = DeviceState::Failed;
            d.reason =
                Some(format!("revert refused: {}", report.reason.clone().unwrap_or_default()));
        }
        _ => {}
    }
    actions.extend(step(r, now_ms));
    actions
}

/// A hand action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Pause,
    Resume,
    Abort,
    Revert,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot {command:?} a rollout that is {state:?}")]
pub struct NotNow {
    pub command: Command,
    pub state: State,
}

/// Applies a hand action.
pub fn act(
    r: &mut Rollout,
    command: Command,
    reason: &str,
    now_ms: i64,
) -> Result<Vec<Action>, NotNow> {
    let refuse = Err(NotNow { command, state: r.state });
    match (command, r.state) {
        (Command::Pause, State::Running) => {
            r.state = State::Paused;
            r.paused_ms = Some(now_ms);
            r.reason = Some(reason.to_owned());
            Ok(Vec::new())
        }
        (Command::Resume, State::Paused) => {
            r.state = State::Running;
            r.reason = None;
            r.paused_ms = None;
            r.tolerated = r.in_wave(r.wave).filter(|d| d.state == DeviceState::Failed).count();
            Ok(step(r, now_ms))
        }
        (Command::Abort, State::Running | State::Paused) => {
            r.state = State::Aborted;
            r.reason = Some(reason.to_owned());
            r.finished_ms = Some(now_ms);
            Ok(Vec::new())
        }
        (Command::Revert, State::Running | State::Paused | State::Completed | State::Aborted) => {
            Ok(r.start_revert(reason.to_owned(), now_ms))
        }
        _ => refuse,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use millwright_shared::wire::RunningModel;
    use millwright_shared::{ModelName, Release};

    pub(crate) fn inventory(n: usize) -> Vec<DeviceRow> {
        (0..n)
            .map(|i| DeviceRow {
                device: format!("gw-{i:02}"),
                first_seen_ms: 0,
                last_seen_ms: 0,
                online: true,
                agent_version: None,
                predictions: 0,
                alerts: 0,
                site: Some(if i % 2 == 0 { "north" } else { "south" }.into()),
                tags: vec![],
                device_class: None,
                models: vec![RunningModel {
                    model: ModelName::new("m").unwrap(),
                    release: Release(1),
                    sha256: String::new(),
                }],
                backlog_records: None,
                backlog_oldest_ms: None,
                open_alerts: 0,
                dropped: 0,
            })
            .collect()
    }

    pub(crate) fn spec(on_failure: OnFailure) -> Spec {
        Spec {
            model: "m".into(),
            release: 2,
            target: Target::All,
            canary: Canary::Percent(10.0),
            waves: Waves::Fixed(2),
            soak_secs: 10,
            device_timeout_secs: 100,
            max_failures_per_wave: 0,
            max_failures_percent: None,
            on_failure,
            activation: default_activation(),
            rate: None,
            pause_deadline_secs: None,
        }
    }

    pub(crate) fn report(d: &DeviceRun, phase: UpdatePhase) -> UpdateReport {
        UpdateReport {
            rollout: None,
            directive: d.directive,
            model: None,
            release: None,
            phase,
            reason: Some("because".into()),
            health: None,
        }
    }

    /// Runs the shell's part: installs get directive numbers.
    fn apply(r: &mut Rollout, actions: &[Action], seq: &mut u64) -> (usize, usize) {
        let (mut installs, mut reverts) = (0, 0);
        for a in actions {
            let device = match a {
                Action::Install { device } => {
                    installs += 1;
                    device
                }
                Action::Revert { device, .. } => {
                    reverts += 1;
                    device
                }
                Action::Audit { .. } => continue,
            };
            *seq += 1;
            r.device_mut(device).unwrap().directive = Some(*seq);
        }
        (installs, reverts)
    }

    #[test]
    fn waves_are_a_canary_then_fixed_or_doubling_waves() {
        assert_eq!(wave_sizes(20, Canary::Percent(10.0), Waves::Fixed(2)), vec![2, 9, 9]);
        assert_eq!(wave_sizes(20, Canary::Count(1), Waves::Exponential), vec![1, 2, 4, 8, 5]);
        assert_eq!(wave_sizes(3, Canary::Percent(1.0), Waves::Fixed(5)), vec![1, 1, 1]);
        assert_eq!(wave_sizes(1, Canary::Percent(10.0), Waves::Fixed(2)), vec![1]);
        assert_eq!(wave_sizes(20, Canary::Count(2), Waves::Size(5)), vec![2, 5, 5, 5, 3]);
    }

    #[test]
    fn healthy_waves_follow_each_other_after_the_soak_and_the_rollout_completes() {
        let mut r =
            plan("r1".into(), spec(OnFailure::Revert), &inventory(20), "ops".into(), 0).unwrap();
        let mut seq = 0;
        let mut now = 0;
        let first = step(&mut r, now);
        assert_eq!(apply(&mut r, &first, &mut seq), (2, 0));
        for wave_size in [2, 9, 9] {
            let wave: Vec<DeviceRun> =
                r.devices.iter().filter(|d| d.wave == r.wave).cloned().collect();
            assert_eq!(wave.len(), wave_size);
            let mut actions = Vec::new();
            for d in &wave {
                actions = on_report(&mut r, &d.device, &report(d, UpdatePhase::Committed), now);
            }
            assert_eq!(apply(&mut r, &actions, &mut seq), (0, 0), "the soak holds the next wave");
            now += 10_000;
            let stepped = step(&mut r, now);
            let next = apply(&mut r, &stepped, &mut seq);
            if r.state == State::Running {
                assert_eq!(next.0, 9);
            }
        }
        assert_eq!(r.state, State::Completed);
        assert_eq!(r.count(DeviceState::Committed), 20);
    }

    #[test]
    fn a_failed_canary_reverts_only_the_canary_and_later_waves_get_nothing() {
        let mut r =
            plan("r1".into(), spec(OnFailure::Revert), &inventory(20), "ops".into(), 0).unwrap();
        let mut seq = 0;
        let first = step(&mut r, 0);
        apply(&mut r, &first, &mut seq);
        let canary: Vec<DeviceRun> = r.devices.iter().filter(|d| d.wave == 0).cloned().collect();
        let actions =
            on_report(&mut r, &canary[0].device, &report(&canary[0], UpdatePhase::Rejected), 5);
        assert_eq!(apply(&mut r, &actions, &mut seq), (0, 2));
        assert_eq!(r.state, State::Reverting);
        assert!(r.devices.iter().filter(|d| d.wave > 0).all(|d| d.directive.is_none()));
        for d in r.devices.clone().iter().filter(|d| d.state == DeviceState::Reverting) {
            on_report(&mut r, &d.device, &report(d, UpdatePhase::Committed), 6);
        }
        assert_eq!(r.state, State::Reverted);
    }

    #[test]
    fn pause_policy_timeouts_and_hand_actions() {
        let mut r =
            plan("r1".into(), spec(OnFailure::Pause), &inventory(20), "ops".into(), 0).unwrap();
        let mut seq = 0;
        let first = step(&mut r, 0);
        apply(&mut r, &first, &mut seq);
        step(&mut r, 101_000);
        assert_eq!(r.state, State::Paused, "a canary that never answers fails after the timeout");
        assert!(
            r.devices[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("no progress within 100 s of its directive")
        );
        assert!(act(&mut r, Command::Pause, "x", 1).is_err());
        let resumed = act(&mut r, Command::Resume, "accepted", 102_000).unwrap();
        assert_eq!(r.state, State::Running);
        assert!(resumed.is_empty() || resumed.iter().all(|a| matches!(a, Action::Audit { .. })));
        let later = step(&mut r, 112_001);
        assert_eq!(later.iter().filter(|a| matches!(a, Action::Install { .. })).count(), 9);
        act(&mut r, Command::Abort, "enough", 113_000).unwrap();
        assert_eq!(r.state, State::Aborted);
        assert!(step(&mut r, 200_000).iter().all(|a| matches!(a, Action::Audit { .. })));
    }

    #[test]
    fn targets_choose_devices_and_unknown_ones_are_named() {
        let inv = inventory(6);
        let mut s = spec(OnFailure::Pause);
        s.target = Target::Site { site: "south".into() };
        let r = plan("r".into(), s.clone(), &inv, "ops".into(), 0).unwrap();
        assert_eq!(r.devices.len(), 3);
        s.target = Target::Devices { devices: vec!["gw-00".into(), "gw-99".into()] };
        assert_eq!(
            plan("r".into(), s, &inv, "ops".into(), 0),
            Err(PlanError::UnknownDevice("gw-99".into()))
        );
    }

    fn report_of(r: &Rollout, device: &str, phase: UpdatePhase) -> UpdateReport {
        report(r.devices.iter().find(|d| d.device == device).unwrap(), phase)
    }

    #[test]
    fn the_timeout_counts_from_the_last_progress_and_waits_out_shadow_and_probation() {
        // `--shadow 30m --probation 30m` with the default 15 min timeout: each device takes an
        // hour, and only one that stops making progress fails.
        let mut s = spec(OnFailure::Pause);
        s.device_timeout_secs = 900;
        s.activation.shadow_secs = 1800;
        s.activation.probation_secs = 1800;
        s.canary = Canary::Count(3);
        let mut r = plan("r1".into(), s, &inventory(6), "ops".into(), 0).unwrap();
        let mut seq = 0;
        let first = step(&mut r, 0);
        apply(&mut r, &first, &mut seq);
        let min = 60_000;
        let [ok, stuck, silent] = ["gw-00", "gw-01", "gw-02"];
        for (device, phase, at) in [
            (ok, UpdatePhase::Received, 1),
            (stuck, UpdatePhase::Received, 1),
            (ok, UpdatePhase::Downloaded, 10),
            (stuck, UpdatePhase::Downloaded, 10),
            (ok, UpdatePhase::Verified, 10),
            (ok, UpdatePhase::SelfTested, 11),
        ] {
            let rep = report_of(&r, device, phase);
            on_report(&mut r, device, &rep, at * min);
        }
        // 14 min after its directive the silent canary is still within its time.
        step(&mut r, 14 * min);
        assert_eq!(r.count(DeviceState::Failed), 0);
        step(&mut r, 15 * min + 1);
        let failed = |r: &Rollout, d: &str| r.devices.iter().find(|x| x.device == d).cloned();
        assert_eq!(
            failed(&r, silent).unwrap().reason.as_deref(),
            Some("no progress within 900 s of its directive")
        );
        // The stuck download counts from its last new phase, at 10 min.
        step(&mut r, 25 * min);
        assert_eq!(failed(&r, stuck).unwrap().state, DeviceState::Notified);
        step(&mut r, 25 * min + 1);
        assert_eq!(
            failed(&r, stuck).unwrap().reason.as_deref(),
            Some("no progress within 900 s of downloaded")
        );
        // In shadow since 11 min: 30 min of shadow and 15 of timeout, then probation likewise.
        step(&mut r, 56 * min);
        assert_eq!(failed(&r, ok).unwrap().state, DeviceState::Notified, "shadow + timeout");
        for phase in [UpdatePhase::ShadowPassed, UpdatePhase::Activated] {
            let rep = report_of(&r, ok, phase);
            on_report(&mut r, ok, &rep, 56 * min);
        }
        step(&mut r, 101 * min);
        assert_eq!(failed(&r, ok).unwrap().state, DeviceState::Notified, "probation + timeout");
        let rep = report_of(&r, ok, UpdatePhase::Committed);
        on_report(&mut r, ok, &rep, 101 * min);
        assert_eq!(failed(&r, ok).unwrap().state, DeviceState::Committed);
        // A repeated report of the same phase is no progress.
        let mut late =
            plan("r2".into(), spec(OnFailure::Pause), &inventory(1), "ops".into(), 0).unwrap();
        let first = step(&mut late, 0);
        apply(&mut late, &first, &mut seq);
        for at in [0, 50_000, 99_000] {
            let rep = report_of(&late, "gw-00", UpdatePhase::Received);
            on_report(&mut late, "gw-00", &rep, at);
        }
        step(&mut late, 100_001);
        assert_eq!(late.state, State::Paused, "{:?}", late.devices[0].reason);
    }

    #[test]
    fn a_download_waiting_on_the_servers_queue_does_not_time_out_and_a_silent_one_does() {
        // 100 s timeout; both canaries report the download started at 0; the server's queue
        // holds chunks for gw-00 the whole time, gw-01 asked for nothing.
        let mut s = spec(OnFailure::Pause);
        s.canary = Canary::Count(2);
        let mut r = plan("r1".into(), s, &inventory(4), "ops".into(), 0).unwrap();
        let mut seq = 0;
        let first = step(&mut r, 0);
        apply(&mut r, &first, &mut seq);
        let [queued, silent] = ["gw-00", "gw-01"];
        for device in [queued, silent] {
            let rep = report_of(&r, device, UpdatePhase::Received);
            on_report(&mut r, device, &rep, 0);
        }
        let waiting: std::collections::HashSet<String> = [queued.to_string()].into();
        r.changed.clear();
        on_waiting(&mut r, &waiting, 40_000);
        assert!(r.changed.is_empty(), "within half the timeout nothing moves or is saved");
        for at in [60_000, 90_000, 120_000, 150_000] {
            on_waiting(&mut r, &waiting, at);
            step(&mut r, at + 1);
        }
        let run = |r: &Rollout, d: &str| r.devices.iter().find(|x| x.device == d).cloned().unwrap();
        assert_eq!(run(&r, queued).state, DeviceState::Notified, "{:?}", run(&r, queued).reason);
        assert_eq!(run(&r, queued).progress_ms, Some(120_000), "moved at 60 s and at 120 s");
        assert_eq!(
            run(&r, silent).reason.as_deref(),
            Some("no progress within 100 s of received"),
            "the one the server was not serving timed out"
        );
        // Once the chunks are through, the timeout runs again from the last wait.
        step(&mut r, 220_001);
        assert_eq!(run(&r, queued).state, DeviceState::Failed);
    }

    #[test]
    fn a_rate_spreads_a_wave_over_minutes_and_ramps_up() {
        let rate = Rate { per_minute: 10, ramp: 2.0, max_per_minute: Some(40) };
        let minutes = [0, 30, 60, 90, 120, 180, 240].map(|s| rate.allowed(s * 1000));
        assert_eq!(minutes, [1, 5, 10, 20, 30, 70, 110]);
        let flat = Rate { per_minute: 1000, ramp: 1.0, max_per_minute: None };
        assert_eq!(flat.allowed(600_000), 10_000);
        let mut s = spec(OnFailure::Pause);
        s.canary = Canary::Count(100);
        s.rate = Some(rate);
        s.device_timeout_secs = 3600;
        let mut r = plan("r1".into(), s, &inventory(200), "ops".into(), 0).unwrap();
        let mut seq = 0;
        let mut notified = Vec::new();
        for t in (0..=300).step_by(30) {
            let actions = step(&mut r, t * 1000);
            notified.push(apply(&mut r, &actions, &mut seq).0);
        }
        assert_eq!(notified, [1, 4, 5, 10, 10, 20, 20, 20, 10, 0, 0]);
        assert_eq!(r.count(DeviceState::Notified), 100);
        assert!(r.devices.iter().filter(|d| d.wave == 1).all(|d| d.state == DeviceState::Pending));
        assert_eq!(r.all_notified_ms, None, "the next wave is not notified yet");
        let unpaced = plan("r2".into(), spec(OnFailure::Pause), &inventory(200), "ops".into(), 0);
        let mut unpaced = unpaced.unwrap();
        let all = step(&mut unpaced, 0);
        assert_eq!(apply(&mut unpaced, &all, &mut seq).0, 20, "no rate: the canary at once");
        let mut bad = spec(OnFailure::Pause);
        bad.rate = Some(Rate { per_minute: 0, ramp: 1.0, max_per_minute: None });
        assert!(matches!(
            plan("r3".into(), bad, &inventory(2), "ops".into(), 0),
            Err(PlanError::Policy(_))
        ));
    }

    /// 10,000 devices, every 50th fails (2 %): a 1 % tolerance stops the rollout at its canary,
    /// a 5 % one lets it complete with exactly those devices failed.
    #[test]
    fn a_failure_share_stops_ten_thousand_devices_at_the_right_wave() {
        let run = |percent: f64| {
            let mut s = spec(OnFailure::Pause);
            s.canary = Canary::Percent(1.0);
            s.waves = Waves::Exponential;
            s.soak_secs = 0;
            s.max_failures_percent = Some(percent);
            let mut r = plan("r".into(), s, &inventory(10_000), "ops".into(), 0).unwrap();
            let mut seq = 0;
            let mut now = 0;
            let mut waves = 0;
            while r.state == State::Running {
                let actions = step(&mut r, now);
                apply(&mut r, &actions, &mut seq);
                let notified: Vec<(usize, String)> = r
                    .devices
                    .iter()
                    .enumerate()
                    .filter(|(_, d)| d.state == DeviceState::Notified)
                    .map(|(i, d)| (i, d.device.clone()))
                    .collect();
                if notified.is_empty() {
                    break;
                }
                waves += 1;
                for (i, device) in notified {
                    let phase =
                        if i % 50 == 0 { UpdatePhase::Rejected } else { UpdatePhase::Committed };
                    let rep = report(&r.devices[i], phase);
                    let actions = on_report(&mut r, &device, &rep, now);
                    apply(&mut r, &actions, &mut seq);
                }
                now += 1000;
            }
            (r, waves)
        };
        let (strict, waves) = run(1.0);
        assert_eq!((strict.state, strict.wave, waves), (State::Paused, 0, 1));
        assert_eq!(
            strict.reason.as_deref(),
            Some("2 of 100 device(s) failed in the canary (at most 1 tolerated)")
        );
        assert!(strict.devices.iter().filter(|d| d.wave > 0).all(|d| d.directive.is_none()));
        let (lenient, waves) = run(5.0);
        assert_eq!(lenient.state, State::Completed);
        assert_eq!(waves, lenient.waves.len());
        assert_eq!(lenient.count(DeviceState::Failed), 200);
        assert_eq!(lenient.count(DeviceState::Committed), 9_800);
    }

    #[test]
    fn a_paused_rollout_reverts_at_its_deadline_unless_resumed() {
        let mut s = spec(OnFailure::Pause);
        s.pause_deadline_secs = Some(3600);
        s.device_timeout_secs = 7200;
        let mut r = plan("r1".into(), s, &inventory(20), "ops".into(), 0).unwrap();
        let mut seq = 0;
        let first = step(&mut r, 0);
        apply(&mut r, &first, &mut seq);
        let canary: Vec<DeviceRun> = r.devices.iter().filter(|d| d.wave == 0).cloned().collect();
        let rep = report(&canary[0], UpdatePhase::Rejected);
        on_report(&mut r, &canary[0].device, &rep, 1000);
        assert_eq!(r.state, State::Paused);
        // Resumed in time, then paused by hand: the deadline counts from the new pause.
        act(&mut r, Command::Resume, "looked at it", 10_000).unwrap();
        act(&mut r, Command::Pause, "a second look", 20_000).unwrap();
        assert!(step(&mut r, 3_619_999).is_empty());
        let actions = step(&mut r, 3_620_000);
        assert_eq!(r.state, State::Reverting);
        assert!(
            r.reason.as_deref().unwrap().starts_with("paused for 3600 s without a resume"),
            "{:?}",
            r.reason
        );
        assert_eq!(actions.iter().filter(|a| matches!(a, Action::Revert { .. })).count(), 2);
    }
}
