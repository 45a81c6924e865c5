//! The rollout engine (pure): which devices get a release when, what their reports mean, and
//! when a wave may follow the previous one. The shell ([`crate::rollouts`]) loads a
//! [`Rollout`], calls [`plan`], [`step`], [`on_report`] or [`act`] with `now`, carries out the
//! returned [`Action`]s (sign and publish directives, write the audit log) and saves it.
//!
//! A wave starts only when the previous one is complete: every device committed the release
//! (and passed the server's own judgement of its health) or failed within the tolerance, and
//! the last commit is `soak_secs` old. Devices of later waves get no directive, so they
//! download nothing until then.

use crate::db::DeviceRow;
use millwright_shared::directive::Activation;
use millwright_shared::gates::{self, Gates, Health};
use millwright_shared::wire::{UpdatePhase, UpdateReport};
use serde::{Deserialize, Serialize};

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
    #[serde(default = "Spec::default_on_failure")]
    pub on_failure: OnFailure,
    #[serde(default = "default_activation")]
    pub activation: Activation,
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
    pub health: Option<Health>,
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
            health: None,
        });
    }
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
    })
}

fn audit(action: &str, detail: String) -> Action {
    Action::Audit { action: action.into(), detail }
}

impl Rollout {
    pub fn device_mut(&mut self, device: &str) -> Option<&mut DeviceRun> {
        self.devices.iter_mut().find(|d| d.device == device)
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
        for d in &mut self.devices {
            if d.notified_ms.is_none() {
                continue;
            }
            match d.previous {
                Some(release) => {
                    d.state = DeviceState::Reverting;
                    d.notified_ms = Some(now_ms);
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
    let timeout_ms = 1000 * r.spec.device_timeout_secs as i64;
    for d in &mut r.devices {
        let waiting = matches!(d.state, DeviceState::Notified | DeviceState::Reverting);
        if waiting && d.notified_ms.is_some_and(|t| now_ms - t > timeout_ms) {
            let reason = format!("no answer within {} s", r.spec.device_timeout_secs);
            actions.push(audit("device_failed", format!("{}: {reason}", d.device)));
            d.state = DeviceState::Failed;
            d.reason = Some(reason);
            d.updated_ms = Some(now_ms);
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
        State::Paused | State::Completed | State::Aborted | State::Reverted => {}
    }
    actions
}

fn step_running(r: &mut Rollout, now_ms: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    if r.wave_started_ms.is_none() {
        r.wave_started_ms = Some(now_ms);
        let wave = r.wave;
        let mut started = 0;
        for d in r.devices.iter_mut().filter(|d| d.wave == wave && d.state == DeviceState::Pending)
        {
            d.state = DeviceState::Notified;
            d.notified_ms = Some(now_ms);
            actions.push(Action::Install { device: d.device.clone() });
            started += 1;
        }
        let name = if wave == 0 { "canary".to_owned() } else { format!("wave {wave}") };
        actions.push(audit("wave_started", format!("{name}: {started} device(s)")));
        if r.devices.iter().all(|d| d.state != DeviceState::Pending) && r.all_notified_ms.is_none()
        {
            r.all_notified_ms = Some(now_ms);
        }
    }
    let wave: Vec<&DeviceRun> = r.in_wave(r.wave).collect();
    let failed = wave.iter().filter(|d| d.state == DeviceState::Failed).count();
    if failed > r.spec.max_failures_per_wave + r.tolerated {
        let reason = format!(
            "{failed} device(s) failed in {} (at most {} tolerated)",
            if r.wave == 0 { "the canary".to_owned() } else { format!("wave {}", r.wave) },
            r.spec.max_failures_per_wave + r.tolerated
        );
        return match r.spec.on_failure {
            OnFailure::Pause => {
                r.state = State::Paused;
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

/// A device's update report. Only reports for the directive this rollout sent count.
pub fn on_report(r: &mut Rollout, device: &str, report: &UpdateReport, now_ms: i64) -> Vec<Action> {
    let gates = r.spec.activation.gates.clone();
    let Some(d) = r.device_mut(device) else { return Vec::new() };
    if report.directive.is_none() || report.directive != d.directive {
        return Vec::new();
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
            r.reason = Some(reason.to_owned());
            Ok(Vec::new())
        }
        (Command::Resume, State::Paused) => {
            r.state = State::Running;
            r.reason = None;
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
mod tests {
    use super::*;
    use millwright_shared::wire::RunningModel;
    use millwright_shared::{ModelName, Release};

    fn inventory(n: usize) -> Vec<DeviceRow> {
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

    fn spec(on_failure: OnFailure) -> Spec {
        Spec {
            model: "m".into(),
            release: 2,
            target: Target::All,
            canary: Canary::Percent(10.0),
            waves: Waves::Fixed(2),
            soak_secs: 10,
            device_timeout_secs: 100,
            max_failures_per_wave: 0,
            on_failure,
            activation: default_activation(),
        }
    }

    fn report(d: &DeviceRun, phase: UpdatePhase) -> UpdateReport {
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
        assert!(r.devices[0].reason.as_deref().unwrap().contains("no answer within 100 s"));
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
}
