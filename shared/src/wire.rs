//! Versioned wire messages, JSON on MQTT inside signed frames ([`crate::signed`]). Every
//! message carries `v` ([`WIRE_VERSION`]); receivers reject other versions with a named error
//! instead of guessing.
//!
//! Delivery contract: the agent numbers records per (device, stream) from 1 without gaps;
//! the server stores each (device, stream, seq) once and answers with an [`Ack`] only after the
//! records are durable; the agent deletes a record from its outbox only on that ack, only if the
//! record is in flight to the server, and only if the ack names its outbox's epoch.

use crate::drift::DriftReport;
use crate::gates::Health;
use crate::ids::{AssetId, DeviceId, ModelName, Release};
use serde::{Deserialize, Serialize};

pub const WIRE_VERSION: u32 = 2;

/// The longest free text (site, tag, device class, agent version) a device may send, in bytes.
pub const MAX_LABEL_BYTES: usize = 128;
/// The longest reason an update report carries, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// The most tags a device may carry.
pub const MAX_TAGS: usize = 32;

/// `text` without control characters, cut at a character boundary to at most `max` bytes.
pub fn clean_text(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// The numbered streams a device sends; each has its own sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Stream {
    #[serde(rename = "pred")]
    Predictions,
    #[serde(rename = "alert")]
    Alerts,
    #[serde(rename = "drift")]
    Drift,
    #[serde(rename = "update")]
    Updates,
}

impl Stream {
    pub const ALL: [Stream; 4] =
        [Stream::Predictions, Stream::Alerts, Stream::Drift, Stream::Updates];

    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Predictions => "pred",
            Stream::Alerts => "alert",
            Stream::Drift => "drift",
            Stream::Updates => "update",
        }
    }

    pub fn parse(s: &str) -> Option<Stream> {
        Stream::ALL.into_iter().find(|stream| stream.as_str() == s)
    }
}

/// Agent → server: records of one stream, in sequence order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkBatch {
    pub v: u32,
    pub device: DeviceId,
    /// The identity of the outbox the records come from, chosen when it was created; acks
    /// name it, so an ack for an earlier installation deletes nothing.
    pub epoch: String,
    pub stream: Stream,
    pub records: Vec<Record>,
}

/// One outbox record as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    /// When the agent produced the record, milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub body: RecordBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RecordBody {
    Prediction(Prediction),
    Alert(Alert),
    /// One asset's drift report for one interval.
    Drift(Box<DriftReport>),
    /// A step of a model update, or why one was refused.
    Update(Box<UpdateReport>),
    /// Records `first..=last` of a stream were dropped by policy (the outbox quota) on the
    /// gateway: `dropped` of them (rows already quarantined are not counted). The gap record
    /// itself takes seq `first`, so it travels, is acknowledged and de-duplicated like any other.
    Gap(Gap),
}

/// An in-band announcement of records dropped by policy ([`RecordBody::Gap`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gap {
    pub stream: Stream,
    pub first: u64,
    pub last: u64,
    pub dropped: u64,
    /// Why, e.g. `quota`.
    pub reason: String,
    /// Dropped predictions are thinned, not lost without a trace: what they said, per asset
    /// and model ([`summarize`]). Empty for other streams.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub summaries: Vec<Summary>,
}

/// What a run of one asset's dropped predictions said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub asset: AssetId,
    pub model: ModelName,
    pub count: u64,
    pub first_cycle: u64,
    pub last_cycle: u64,
    pub min: f32,
    pub mean: f32,
    pub max: f32,
    /// The value of the latest of them.
    pub last: f32,
}

impl Summary {
    /// Whether the summary is one `summarize` could have made: counts and cycles in order,
    /// values finite and `min <= mean <= max` (within rounding), `last` within them.
    pub fn is_sound(&self) -> bool {
        let values = [self.min, self.mean, self.max, self.last];
        let slack = 1e-3 * self.max.abs().max(self.min.abs()).max(1.0);
        self.count > 0
            && self.first_cycle <= self.last_cycle
            && values.iter().all(|v| v.is_finite())
            && self.min <= self.max
            && self.mean >= self.min - slack
            && self.mean <= self.max + slack
            && self.last >= self.min
            && self.last <= self.max
    }
}

impl Summary {
    /// The summary of one prediction.
    fn of(p: &Prediction) -> Summary {
        Summary {
            asset: p.asset.clone(),
            model: p.model.clone(),
            count: 1,
            first_cycle: p.cycle,
            last_cycle: p.cycle,
            min: p.value,
            mean: p.value,
            max: p.value,
            last: p.value,
        }
    }

    /// Takes in `later` (same asset and model): counts add, cycles and values span both, the
    /// mean is weighted by the counts and `last` is the value at the later last cycle.
    fn absorb(&mut self, later: &Summary) {
        let n = (self.count + later.count) as f64;
        let weighted =
            f64::from(self.mean) * self.count as f64 + f64::from(later.mean) * later.count as f64;
        self.mean = (weighted / n) as f32;
        self.count += later.count;
        self.first_cycle = self.first_cycle.min(later.first_cycle);
        if later.last_cycle >= self.last_cycle {
            self.last_cycle = later.last_cycle;
            self.last = later.last;
        }
        self.min = self.min.min(later.min);
        self.max = self.max.max(later.max);
    }
}

/// One list of summaries for the predictions of `earlier` and `later` together, per (asset,
/// model) ([`Summary::absorb`]).
pub fn merge_summaries(earlier: Vec<Summary>, later: Vec<Summary>) -> Vec<Summary> {
    let mut out = earlier;
    for b in later {
        match out.iter_mut().find(|a| a.asset == b.asset && a.model == b.model) {
            Some(a) => a.absorb(&b),
            None => out.push(b),
        }
    }
    out
}

/// Summaries of `predictions` per (asset, model), in order of first appearance, over their
/// finite values (a model's NaN has nothing to summarise: it is dropped uncounted here, counted
/// in the gap's `dropped` as every record is).
pub fn summarize<'a>(predictions: impl IntoIterator<Item = &'a Prediction>) -> Vec<Summary> {
    let singles = predictions.into_iter().filter(|p| p.value.is_finite()).map(Summary::of);
    merge_summaries(Vec::new(), singles.collect())
}

impl RecordBody {
    pub fn stream(&self) -> Stream {
        match self {
            RecordBody::Prediction(_) => Stream::Predictions,
            RecordBody::Alert(_) => Stream::Alerts,
            RecordBody::Drift(_) => Stream::Drift,
            RecordBody::Update(_) => Stream::Updates,
            RecordBody::Gap(g) => g.stream,
        }
    }

    /// The asset the record is about (updates are about the device).
    pub fn asset(&self) -> Option<&AssetId> {
        match self {
            RecordBody::Prediction(p) => Some(&p.asset),
            RecordBody::Alert(a) => Some(&a.asset),
            RecordBody::Drift(d) => Some(&d.asset),
            RecordBody::Update(_) | RecordBody::Gap(_) => None,
        }
    }
}

/// The steps of a model update on a device, in order; `Rejected` and `Reverted` end one early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdatePhase {
    /// The directive verified; the download starts (or resumes).
    Received,
    /// Every chunk arrived and the bundle's SHA-256 matches.
    Downloaded,
    /// Release signatures, manifest, release number, asset type, device class and expiry hold.
    Verified,
    /// Loaded into a second plan; every golden case reproduced.
    SelfTested,
    /// The shadow period passed its gates.
    ShadowPassed,
    /// The new model serves; probation runs.
    Activated,
    /// Probation passed; the new release is the last known good.
    Committed,
    /// Refused before it served; the active model never changed.
    Rejected,
    /// It served and failed (or was reverted by a directive); the previous release serves again.
    Reverted,
    /// A new trust root was accepted.
    RootRotated,
}

impl UpdatePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdatePhase::Received => "received",
            UpdatePhase::Downloaded => "downloaded",
            UpdatePhase::Verified => "verified",
            UpdatePhase::SelfTested => "self_tested",
            UpdatePhase::ShadowPassed => "shadow_passed",
            UpdatePhase::Activated => "activated",
            UpdatePhase::Committed => "committed",
            UpdatePhase::Rejected => "rejected",
            UpdatePhase::Reverted => "reverted",
            UpdatePhase::RootRotated => "root_rotated",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, UpdatePhase::Committed | UpdatePhase::Rejected | UpdatePhase::Reverted)
    }
}

/// One step of an update as the device saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateReport {
    /// The rollout and directive sequence number, when the step belongs to a directive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directive: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Release>,
    pub phase: UpdatePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

/// Agent → server: send chunks `first .. first + count` of the bundle with this SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    pub v: u32,
    pub sha256: String,
    pub first: u32,
    pub count: u32,
}

/// Server → agent: one chunk of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    pub v: u32,
    pub sha256: String,
    pub index: u32,
    /// Base64 of the chunk's bytes.
    pub data: String,
}

impl FetchRequest {
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let m: Self = serde_json::from_slice(payload)?;
        check_version(m.v)?;
        Ok(m)
    }
}

impl Chunk {
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let m: Self = serde_json::from_slice(payload)?;
        check_version(m.v)?;
        Ok(m)
    }
}

/// A model a device serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningModel {
    pub model: ModelName,
    pub release: Release,
    /// SHA-256 of the ONNX bytes.
    pub sha256: String,
}

/// The model's output for the window ending at `cycle`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prediction {
    pub asset: AssetId,
    pub cycle: u64,
    pub model: ModelName,
    pub release: Release,
    pub value: f32,
}

/// Health levels of an asset, ordered from good to bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    Warning,
    Alarm,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Alarm => "alarm",
        }
    }
}

/// An asset's health level changed (raised or cleared) at `cycle`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    pub asset: AssetId,
    pub cycle: u64,
    pub model: ModelName,
    pub release: Release,
    pub from: Level,
    pub to: Level,
    pub value: f32,
}

/// Server → agent: these sequence numbers of `stream` are stored durably, and these others
/// the server will never store (a poison record: the agent moves them to its dead letters
/// instead of sending them forever).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub v: u32,
    /// The outbox epoch of the batch acknowledged.
    pub epoch: String,
    pub stream: Stream,
    /// Inclusive ranges `[first, last]`.
    pub ranges: Vec<(u64, u64)>,
    /// Inclusive ranges refused for good, and why (at most [`MAX_REASON_BYTES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<(u64, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Merges sequence numbers in any order into inclusive ranges.
pub fn ranges_of(mut seqs: Vec<u64>) -> Vec<(u64, u64)> {
    seqs.sort_unstable();
    seqs.dedup();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for seq in seqs {
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => ranges.push((seq, seq)),
        }
    }
    ranges
}

impl Ack {
    /// Builds an ack from sequence numbers in any order, merging runs into ranges.
    pub fn from_seqs(epoch: &str, stream: Stream, seqs: Vec<u64>) -> Ack {
        Ack {
            v: WIRE_VERSION,
            epoch: epoch.to_owned(),
            stream,
            ranges: ranges_of(seqs),
            refused: Vec::new(),
            reason: None,
        }
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.ranges.iter().any(|&(first, last)| first <= seq && seq <= last)
    }
}

/// Agent → server, retained; the broker publishes the `online: false` form as the last will.
///
/// Signed statuses could be replayed by another party on a broker without ACLs, so they are
/// ordered: `at_ms` grows with every status an agent sends (it never goes back, whatever the
/// clock does), and `started_ms` is when the agent process started. The last will is built at
/// start, so its `at_ms` equals its `started_ms`. The server accepts an online status only if it
/// is newer than the last one accepted, and an offline one only if it comes from the same run
/// as that status, or a later one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStatus {
    pub v: u32,
    pub device: DeviceId,
    pub at_ms: i64,
    pub started_ms: i64,
    pub online: bool,
    pub agent_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_class: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<RunningModel>,
    /// The outbox when the status was sent (agents resend their status every few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<Backlog>,
}

/// Records waiting in a device's outbox, and when the oldest of them was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backlog {
    pub records: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_at_ms: Option<i64>,
}

/// Why a payload is not a message we accept.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not valid JSON for this message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("wire version {found} is not supported (this build speaks {WIRE_VERSION})")]
    Version { found: u32 },
}

fn check_version(v: u32) -> Result<(), DecodeError> {
    if v == WIRE_VERSION { Ok(()) } else { Err(DecodeError::Version { found: v }) }
}

impl UplinkBatch {
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let batch: Self = serde_json::from_slice(payload)?;
        check_version(batch.v)?;
        Ok(batch)
    }
}

impl Ack {
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let ack: Self = serde_json::from_slice(payload)?;
        check_version(ack.v)?;
        Ok(ack)
    }
}

impl DeviceStatus {
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let status: Self = serde_json::from_slice(payload)?;
        check_version(status.v)?;
        Ok(status)
    }
}

/// Serializes a wire message. These types hold only strings, integers and floats, so this
/// cannot fail except on non-finite floats, which become `null` in serde_json.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    serde_json::to_vec(message).unwrap_or_default()
}

#[cfg(test)]
mod summary_tests {
    use super::*;

    fn p(asset: &str, cycle: u64, value: f32) -> Prediction {
        Prediction {
            asset: AssetId::new(asset).unwrap(),
            cycle,
            model: ModelName::new("m").unwrap(),
            release: Release(1),
            value,
        }
    }

    #[test]
    fn summaries_per_asset_over_finite_values_with_the_latest_last() {
        let preds = [
            p("u1", 31, 120.0),
            p("u2", 31, 80.0),
            p("u1", 32, f32::NAN),
            p("u1", 33, 100.0),
            p("u1", 30, 130.0), // out of order: not the last
            p("u3", 31, f32::INFINITY),
        ];
        let s = summarize(&preds);
        assert_eq!(s.len(), 2, "u3 had nothing finite: {s:?}");
        let u1 = &s[0];
        assert_eq!((u1.asset.as_str(), u1.count, u1.first_cycle, u1.last_cycle), ("u1", 3, 30, 33));
        assert_eq!((u1.min, u1.max, u1.last), (100.0, 130.0, 100.0));
        assert!((u1.mean - 350.0 / 3.0).abs() < 1e-4);
        assert!(s.iter().all(Summary::is_sound));
        assert_eq!((s[1].asset.as_str(), s[1].count, s[1].mean), ("u2", 1, 80.0));
        let json = serde_json::to_string(&RecordBody::Gap(Gap {
            stream: Stream::Predictions,
            first: 1,
            last: 6,
            dropped: 6,
            reason: "quota".into(),
            summaries: s.clone(),
        }))
        .unwrap();
        let back: RecordBody = serde_json::from_str(&json).unwrap();
        assert!(matches!(back, RecordBody::Gap(g) if g.summaries == s));
        // Summaries of two runs merge into the summary of both.
        let (a, b) = preds.split_at(3);
        assert_eq!(merge_summaries(summarize(a), summarize(b)), s);
        let mut bad = s[0].clone();
        bad.mean = 500.0;
        assert!(!bad.is_sound());
        let no_summaries =
            r#"{"kind":"gap","stream":"pred","first":1,"last":2,"dropped":2,"reason":"quota"}"#;
        assert!(
            matches!(serde_json::from_str(no_summaries).unwrap(), RecordBody::Gap(g) if g.summaries.is_empty())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_text_loses_control_characters_and_is_cut_at_a_character() {
        assert_eq!(clean_text("plant\u{1b}[31m-north\n", 64), "plant[31m-north");
        assert_eq!(clean_text("ééé", 5), "éé");
        assert_eq!(clean_text("<img src=x onerror=alert(1)>", 128), "<img src=x onerror=alert(1)>");
    }

    #[test]
    fn ack_merges_sequence_numbers_into_ranges() {
        let ack = Ack::from_seqs("e1", Stream::Alerts, vec![5, 1, 2, 3, 7, 8, 2]);
        assert_eq!(ack.ranges, vec![(1, 3), (5, 5), (7, 8)]);
        assert!(ack.contains(2) && ack.contains(8) && !ack.contains(4) && !ack.contains(9));
    }

    #[test]
    fn batches_round_trip_and_other_versions_are_refused() {
        let batch = UplinkBatch {
            v: WIRE_VERSION,
            device: DeviceId::new("gw1").unwrap(),
            epoch: "e1".into(),
            stream: Stream::Predictions,
            records: vec![Record {
                seq: 1,
                at_ms: 1_700_000_000_000,
                body: RecordBody::Prediction(Prediction {
                    asset: AssetId::new("unit-1").unwrap(),
                    cycle: 31,
                    model: ModelName::new("rul").unwrap(),
                    release: Release(1),
                    value: 112.5,
                }),
            }],
        };
        let bytes = encode(&batch);
        assert_eq!(UplinkBatch::decode(&bytes).unwrap(), batch);
        let v1 = String::from_utf8(bytes).unwrap().replace("\"v\":2", "\"v\":1");
        assert!(matches!(
            UplinkBatch::decode(v1.as_bytes()),
            Err(DecodeError::Version { found: 1 })
        ));
        assert!(matches!(UplinkBatch::decode(b"not json"), Err(DecodeError::Json(_))));
    }
}
