//! The agent's status snapshot: what `status.json`, the local page, its JSON API, `/metrics`
//! and `millwright-agent status` all show. Pure: the event loop fills it in once a second (and
//! after an operator action); readers only read it.
//!
//! Also here: the prediction history ring behind the trend chart, the open-alert rules
//! (raised by a level going up, closed by a return to ok, acknowledged by an operator) and the
//! terminal summary.

use crate::metrics::LatencyHistogram;
use millwright_shared::drift::{Quality, Severity};
use millwright_shared::wire::{self, Level, RunningModel};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Predictions kept per asset for the trend chart (12 h at one prediction a minute).
pub const HISTORY_POINTS: usize = 720;

/// Counters kept since start.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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
    /// Connections dropped because the broker acknowledged no publish (half-open links).
    pub uplink_stalls: u64,
    pub store_errors: u64,
    /// Records the server refused for good, moved to the dead letters.
    pub records_dead_lettered: u64,
    /// Predictions not kept because outbox commits were failing (shown on the page only).
    pub records_unstored: u64,
    pub bad_acks: u64,
    pub drift_reports: u64,
    pub drift_alerts: u64,
    pub updates_committed: u64,
    pub updates_rejected: u64,
    pub updates_reverted: u64,
    pub chunks_received: u64,
    pub chunks_refused: u64,
    pub alerts_acknowledged: u64,
    /// Messages refused before they were acted on, per reason (unsigned, bad_signature,
    /// stale_epoch, ...): forged acks, chunks and roots, garbage on subscribed topics.
    pub refused: BTreeMap<String, u64>,
    /// Lockouts of a client address after too many wrong operator PINs.
    pub pin_lockouts: u64,
}

/// A corrupt outbox file renamed at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAside {
    pub moved_to: String,
    pub reason: String,
}

/// The whole gateway at one instant: `status.json` and `GET /api/status`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    pub device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub agent_version: String,
    /// When this snapshot was taken.
    pub at_ms: i64,
    pub started_at_ms: i64,
    pub uplink_connected: bool,
    /// The outbox's identity: a new outbox (first start, wiped data folder, a corrupt file set
    /// aside) has a new one, and the server stores each epoch after the one before.
    pub epoch: String,
    /// Unacknowledged outbox records per stream.
    pub backlog: BTreeMap<String, u64>,
    pub oldest_unacked_at_ms: Option<i64>,
    /// Bytes under the data directory (the outbox, its WAL, update staging).
    pub disk_bytes: u64,
    pub assets: Vec<AssetStatus>,
    pub models: Vec<RunningModel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStatus>,
    pub trust_root_version: u64,
    /// The trust root in force has expired: updates are refused until a newer one arrives.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub trust_root_expired: bool,
    /// Outbox rows that did not decode, moved to quarantine and never sent.
    pub outbox_quarantined: u64,
    /// Records the server refused for good (kept in the outbox file's dead letters).
    pub outbox_dead_letters: u64,
    /// Bytes the outbox's records take, and the quota.
    pub outbox_bytes: u64,
    pub outbox_max_bytes: u64,
    /// Records dropped by the quota per stream (each range announced to the server by a gap
    /// record), over this outbox's life.
    pub dropped: BTreeMap<String, u64>,
    /// The outbox was found corrupt at start and replaced by a fresh one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_set_aside: Option<SetAside>,
    /// The wall clock against what this gateway knows to have passed already.
    pub clock: ClockStatus,
    /// The last sequence number given out per outbox stream (what the server must end up with).
    pub last_seq: BTreeMap<String, u64>,
    pub counters: Counters,
    pub inference_latency: LatencyHistogram,
}

/// Whether the gateway's wall clock can be believed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClockStatus {
    /// The clock is well behind the time floor (the latest time this gateway recorded, or the
    /// creation time of a bundle it verified): expiry and certificate checks use the floor.
    pub untrusted: bool,
    pub floor_ms: i64,
}

/// One asset: its health, last prediction, open alert and drift verdicts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssetStatus {
    pub asset: String,
    pub level: Level,
    pub model: String,
    pub release: u64,
    /// What the model predicts, e.g. "remaining_useful_life" in "cycles".
    pub output: String,
    pub units: String,
    pub warning: f32,
    pub alarm: f32,
    #[serde(default)]
    pub latest: Option<Point>,
    #[serde(default)]
    pub alert: Option<OpenAlert>,
    /// Per monitored feature, the last drift verdict (empty before the first report).
    #[serde(default)]
    pub drift: BTreeMap<String, FeatureStatus>,
    /// The model gets no complete readings: why the last was refused, and since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputProblem>,
}

/// An asset whose readings the model cannot take (a PLC unreachable, a feature missing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputProblem {
    /// The last refused reading's kind (`input_disconnected`, `missing_feature`, ...).
    pub kind: String,
    /// When readings started being refused.
    pub since_ms: i64,
}

/// A reading of `kind` was refused at `now_ms`: the problem starts, or goes on with the latest
/// kind. True when the kind is new (worth a log line).
pub fn input_problem(problem: &mut Option<InputProblem>, kind: &str, now_ms: i64) -> bool {
    match problem {
        Some(p) if p.kind == kind => false,
        Some(p) => {
            p.kind = kind.to_owned();
            true
        }
        None => {
            *problem = Some(InputProblem { kind: kind.to_owned(), since_ms: now_ms });
            true
        }
    }
}

/// A feature's last drift verdict, its scores and data-quality flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureStatus {
    pub severity: Severity,
    #[serde(default)]
    pub flags: Vec<Quality>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psi: Option<f64>,
}

/// The model update in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub rollout: String,
    pub model: String,
    pub release: u64,
    pub stage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<(usize, usize)>,
}

/// One prediction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub at_ms: i64,
    pub cycle: u64,
    pub value: f32,
}

/// An asset at warning or alarm since its last raise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenAlert {
    pub level: Level,
    pub since_ms: i64,
    pub cycle: u64,
    /// The prediction that raised it (none for an alert re-opened after a restart).
    #[serde(default)]
    pub value: Option<f32>,
    #[serde(default)]
    pub acknowledged_at_ms: Option<i64>,
}

/// The open alert after a level change: a rise raises a new, unacknowledged alert; a return to
/// ok closes it; a step down (alarm to warning) keeps it, acknowledged or not.
pub fn next_alert(open: Option<OpenAlert>, change: &wire::Alert, at_ms: i64) -> Option<OpenAlert> {
    if change.to == Level::Ok {
        return None;
    }
    match open {
        Some(mut alert) if change.to < change.from => {
            alert.level = change.to;
            Some(alert)
        }
        _ => Some(OpenAlert {
            level: change.to,
            since_ms: at_ms,
            cycle: change.cycle,
            value: Some(change.value),
            acknowledged_at_ms: None,
        }),
    }
}

/// What an operator's acknowledgement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckOutcome {
    Acknowledged,
    AlreadyAcknowledged,
    NoOpenAlert,
    UnknownAsset,
}

/// Acknowledges `open` at `at_ms`.
pub fn acknowledge(open: &mut Option<OpenAlert>, at_ms: i64) -> AckOutcome {
    match open {
        None => AckOutcome::NoOpenAlert,
        Some(alert) if alert.acknowledged_at_ms.is_some() => AckOutcome::AlreadyAcknowledged,
        Some(alert) => {
            alert.acknowledged_at_ms = Some(at_ms);
            AckOutcome::Acknowledged
        }
    }
}

/// The last [`HISTORY_POINTS`] predictions of an asset.
#[derive(Debug, Clone, Default)]
pub struct History {
    points: VecDeque<Point>,
}

impl History {
    pub fn push(&mut self, point: Point) {
        if self.points.len() == HISTORY_POINTS {
            self.points.pop_front();
        }
        self.points.push_back(point);
    }

    pub fn last(&self) -> Option<Point> {
        self.points.back().copied()
    }

    pub fn to_vec(&self) -> Vec<Point> {
        self.points.iter().copied().collect()
    }
}

/// The points at or after `from_ms`.
pub fn since(points: &[Point], from_ms: i64) -> Vec<Point> {
    points.iter().filter(|p| p.at_ms >= from_ms).copied().collect()
}

/// A duration for people: "42 s", "7 min", "3 h 05 min", "2 d 4 h".
pub fn human_age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// A size for people: "512 B", "1.5 KiB", "12.3 MiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl Status {
    pub fn backlog_total(&self) -> u64 {
        self.backlog.values().sum()
    }

    /// The terminal summary printed by `millwright-agent status`.
    pub fn summary(&self, now_ms: i64) -> String {
        let mut out = String::new();
        let uplink = if self.uplink_connected { "connected" } else { "DOWN (buffering locally)" };
        out += &format!(
            "device {}  agent {}  up {}  (snapshot {} old)\n",
            self.device,
            self.agent_version,
            human_age(self.at_ms - self.started_at_ms),
            human_age(now_ms - self.at_ms)
        );
        out += &format!("uplink {uplink}\n");
        let oldest = self
            .oldest_unacked_at_ms
            .map_or(String::new(), |t| format!(", oldest {} old", human_age(now_ms - t)));
        let streams: Vec<String> = self.backlog.iter().map(|(s, n)| format!("{s} {n}")).collect();
        out += &format!(
            "outbox {} records ({}){oldest}; buffer {}\n",
            self.backlog_total(),
            streams.join(", "),
            human_bytes(self.disk_bytes)
        );
        for m in &self.models {
            out += &format!("model {} release {}\n", m.model, m.release.0);
        }
        match &self.update {
            Some(u) => {
                let chunks = u.chunks.map_or(String::new(), |(r, t)| format!(" ({r}/{t} chunks)"));
                out += &format!(
                    "update {} release {}: {}{chunks} (rollout {})\n",
                    u.model, u.release, u.stage, u.rollout
                );
            }
            None => out += "update none in progress\n",
        }
        for a in &self.assets {
            let latest = a.latest.map_or("no prediction yet".to_owned(), |p| {
                format!("{:.1} {} at cycle {}", p.value, a.units, p.cycle)
            });
            out += &format!("asset {} {}: {latest}\n", a.asset, a.level.as_str().to_uppercase());
            if let Some(p) = &a.input {
                out += &format!(
                    "  input refused since {} ago ({}): no predictions\n",
                    human_age(now_ms - p.since_ms),
                    p.kind
                );
            }
            if let Some(alert) = &a.alert {
                let ack = match alert.acknowledged_at_ms {
                    Some(t) => format!("acknowledged {} ago", human_age(now_ms - t)),
                    None => "NOT acknowledged".to_owned(),
                };
                out += &format!(
                    "  alert {} since {} ago, {ack}\n",
                    alert.level.as_str(),
                    human_age(now_ms - alert.since_ms)
                );
            }
            let flagged: Vec<String> = a
                .drift
                .iter()
                .filter(|(_, f)| f.severity >= Severity::Warn || !f.flags.is_empty())
                .map(|(name, f)| {
                    let flags: Vec<&str> = f.flags.iter().map(|q| q.as_str()).collect();
                    if flags.is_empty() {
                        format!("{name} {}", f.severity.as_str())
                    } else {
                        format!("{name} {} [{}]", f.severity.as_str(), flags.join(","))
                    }
                })
                .collect();
            if !a.drift.is_empty() {
                let drift =
                    if flagged.is_empty() { "all ok".to_owned() } else { flagged.join("; ") };
                out += &format!("  drift {drift}\n");
            }
        }
        let rejected: u64 = self.counters.readings_rejected.values().sum();
        out += &format!(
            "counters readings {} (rejected {rejected}), predictions {}, inference failures {}, reconnects {}\n",
            self.counters.readings,
            self.counters.predictions,
            self.counters.inference_failures,
            self.counters.reconnects
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millwright_shared::{AssetId, ModelName, Release};

    fn change(from: Level, to: Level) -> wire::Alert {
        wire::Alert {
            asset: AssetId::new("a").unwrap(),
            cycle: 7,
            model: ModelName::new("m").unwrap(),
            release: Release(1),
            from,
            to,
            value: 12.0,
        }
    }

    #[test]
    fn an_alert_opens_on_a_rise_survives_a_step_down_and_closes_at_ok() {
        use Level::*;
        let open = next_alert(None, &change(Ok, Warning), 100).unwrap();
        assert_eq!((open.level, open.since_ms, open.cycle), (Warning, 100, 7));
        let mut open = Some(open);
        assert_eq!(acknowledge(&mut open, 150), AckOutcome::Acknowledged);
        assert_eq!(acknowledge(&mut open, 160), AckOutcome::AlreadyAcknowledged);
        // A rise to alarm is a new raise: it needs a new acknowledgement.
        let alarm = next_alert(open, &change(Warning, Alarm), 200).unwrap();
        assert_eq!((alarm.level, alarm.since_ms, alarm.acknowledged_at_ms), (Alarm, 200, None));
        let mut open = Some(alarm);
        acknowledge(&mut open, 250);
        let down = next_alert(open, &change(Alarm, Warning), 300).unwrap();
        assert_eq!((down.level, down.since_ms, down.acknowledged_at_ms), (Warning, 200, Some(250)));
        assert_eq!(next_alert(Some(down), &change(Warning, Ok), 400), None);
        assert_eq!(acknowledge(&mut None, 500), AckOutcome::NoOpenAlert);
    }

    #[test]
    fn the_history_keeps_the_latest_points_and_filters_by_time() {
        let mut h = History::default();
        for i in 0..(HISTORY_POINTS as i64 + 5) {
            h.push(Point { at_ms: i * 10, cycle: i as u64, value: i as f32 });
        }
        let all = h.to_vec();
        assert_eq!(all.len(), HISTORY_POINTS);
        assert_eq!(all[0].cycle, 5);
        assert_eq!(h.last().map(|p| p.cycle), Some(HISTORY_POINTS as u64 + 4));
        let recent = since(&all, (HISTORY_POINTS as i64 + 2) * 10);
        assert_eq!(recent.iter().map(|p| p.cycle).collect::<Vec<_>>(), vec![722, 723, 724]);
    }

    #[test]
    fn ages_and_sizes_read_like_people_write_them() {
        assert_eq!(human_age(-5), "0 s");
        assert_eq!(human_age(42_000), "42 s");
        assert_eq!(human_age(7 * 60_000 + 5), "7 min");
        assert_eq!(human_age(3 * 3_600_000 + 5 * 60_000), "3 h 05 min");
        assert_eq!(human_age(2 * 86_400_000 + 4 * 3_600_000), "2 d 4 h");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12_900_000), "12.3 MiB");
    }

    #[test]
    fn an_input_problem_keeps_its_start_across_kinds_and_says_when_the_kind_is_new() {
        let mut problem = None;
        assert!(input_problem(&mut problem, "input_disconnected", 1_000));
        assert!(!input_problem(&mut problem, "input_disconnected", 2_000));
        assert!(input_problem(&mut problem, "input_timeout", 3_000));
        assert_eq!(problem, Some(InputProblem { kind: "input_timeout".into(), since_ms: 1_000 }));
    }

    #[test]
    fn the_summary_shows_uplink_backlog_models_alerts_and_flagged_drift() {
        let mut status = Status {
            device: "gw-1".into(),
            agent_version: "0.1.0".into(),
            at_ms: 10_000,
            started_at_ms: 0,
            uplink_connected: false,
            backlog: [("pred".to_owned(), 40), ("alert".to_owned(), 2)].into(),
            oldest_unacked_at_ms: Some(4_000),
            disk_bytes: 2048,
            ..Status::default()
        };
        status.assets.push(AssetStatus {
            asset: "unit-1".into(),
            level: Level::Alarm,
            model: "m".into(),
            release: 3,
            output: "remaining_useful_life".into(),
            units: "cycles".into(),
            warning: 50.0,
            alarm: 20.0,
            latest: Some(Point { at_ms: 9_000, cycle: 190, value: 12.25 }),
            alert: Some(OpenAlert {
                level: Level::Alarm,
                since_ms: 8_000,
                cycle: 188,
                value: Some(19.0),
                acknowledged_at_ms: None,
            }),
            drift: [
                (
                    "s2".to_owned(),
                    FeatureStatus {
                        severity: Severity::Drift,
                        flags: vec![Quality::Stuck],
                        shift: Some(4.0),
                        psi: None,
                    },
                ),
                (
                    "s3".to_owned(),
                    FeatureStatus { severity: Severity::Ok, flags: vec![], shift: None, psi: None },
                ),
            ]
            .into(),
            input: Some(InputProblem { kind: "input_disconnected".into(), since_ms: 5_000 }),
        });
        let text = status.summary(12_000);
        for want in [
            "device gw-1  agent 0.1.0  up 10 s  (snapshot 2 s old)",
            "uplink DOWN (buffering locally)",
            "outbox 42 records (alert 2, pred 40), oldest 8 s old; buffer 2.0 KiB",
            "update none in progress",
            "asset unit-1 ALARM: 12.2 cycles at cycle 190",
            "  input refused since 7 s ago (input_disconnected): no predictions\n",
            "alert alarm since 4 s ago, NOT acknowledged",
            "drift s2 drift [stuck]\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
