//! What an incoming uplink message means and whether to accept it. Pure: the database adapter
//! stores what this returns.

use millwright_shared::DeviceId;
use millwright_shared::wire::{self, DecodeError, Record, Stream, UplinkBatch};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("payload claims device {claimed} but arrived on the topic of {topic}")]
    IdentityMismatch { topic: DeviceId, claimed: DeviceId },
    #[error("payload is for stream {payload:?} but arrived on the topic of {topic:?}")]
    StreamMismatch { topic: Stream, payload: Stream },
    #[error("record sequence numbers start at 1; got 0")]
    ZeroSeq,
    #[error("batch is empty")]
    Empty,
    #[error("outbox epoch {0:?} is not 1-64 letters and digits")]
    BadEpoch(String),
    #[error("record seq {0} is above 2^63 - 1")]
    SeqTooLarge(u64),
}

impl IngestError {
    /// The label refusals are counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::Decode(_) => "malformed",
            IngestError::IdentityMismatch { .. } => "identity_mismatch",
            IngestError::StreamMismatch { .. } => "wrong_stream",
            IngestError::ZeroSeq
            | IngestError::Empty
            | IngestError::BadEpoch(_)
            | IngestError::SeqTooLarge(_) => "malformed",
        }
    }
}

/// A batch that may be stored: identity, stream and record kinds agree.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub device: DeviceId,
    /// The sending outbox's epoch, named back in the ack.
    pub epoch: String,
    pub stream: Stream,
    pub records: Vec<Record>,
    /// Records of the batch that will never be stored (a poison record: it does not decode,
    /// is of another stream, or holds a value storage cannot take). The ack names them so the
    /// gateway stops sending them, and the rest of the batch is stored.
    pub refused: Vec<Poison>,
}

/// A record refused for good, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    pub seq: u64,
    pub reason: String,
}

/// The envelope of a batch whose records are judged one by one.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    v: u32,
    device: DeviceId,
    epoch: String,
    stream: Stream,
    records: Vec<serde_json::Value>,
}

/// Decodes and checks an uplink payload received on the topic of `device`/`stream`. What is
/// wrong with the envelope refuses the whole message (no answer: the sender cannot be told
/// which records it meant); what is wrong with one record refuses that record.
pub fn accept(device: &DeviceId, stream: Stream, payload: &[u8]) -> Result<Accepted, IngestError> {
    let envelope: Envelope = serde_json::from_slice(payload).map_err(DecodeError::from)?;
    if envelope.v != wire::WIRE_VERSION {
        // The strict decoder names the version problem.
        UplinkBatch::decode(payload)?;
    }
    if &envelope.device != device {
        return Err(IngestError::IdentityMismatch {
            topic: device.clone(),
            claimed: envelope.device,
        });
    }
    if envelope.stream != stream {
        return Err(IngestError::StreamMismatch { topic: stream, payload: envelope.stream });
    }
    if envelope.records.is_empty() {
        return Err(IngestError::Empty);
    }
    let epoch_ok = !envelope.epoch.is_empty()
        && envelope.epoch.len() <= 64
        && envelope.epoch.bytes().all(|b| b.is_ascii_alphanumeric());
    if !epoch_ok {
        return Err(IngestError::BadEpoch(wire::clean_text(&envelope.epoch, 64)));
    }
    let mut records = Vec::with_capacity(envelope.records.len());
    let mut refused = Vec::new();
    for value in envelope.records {
        let seq = match value.get("seq").and_then(serde_json::Value::as_u64) {
            Some(0) | None => return Err(IngestError::ZeroSeq),
            Some(seq) if seq > i64::MAX as u64 => return Err(IngestError::SeqTooLarge(seq)),
            Some(seq) => seq,
        };
        match serde_json::from_value::<Record>(value) {
            Ok(record) => match judge_record(&record, stream) {
                None => records.push(record),
                Some(reason) => refused.push(Poison { seq, reason }),
            },
            Err(e) => refused.push(Poison {
                seq,
                reason: wire::clean_text(&format!("does not decode: {e}"), wire::MAX_REASON_BYTES),
            }),
        }
    }
    Ok(Accepted { device: envelope.device, epoch: envelope.epoch, stream, records, refused })
}

/// Why a decoded record cannot be stored, if it cannot.
fn judge_record(r: &Record, stream: Stream) -> Option<String> {
    use millwright_shared::wire::RecordBody;
    let fits = |n: u64| i64::try_from(n).is_ok();
    if r.body.stream() != stream {
        return Some(format!(
            "a {} record in the {} stream",
            r.body.stream().as_str(),
            stream.as_str()
        ));
    }
    match &r.body {
        RecordBody::Prediction(p) if !p.value.is_finite() => Some("value is not finite".into()),
        RecordBody::Prediction(p) if !fits(p.cycle) || !fits(p.release.0) => {
            Some("cycle or release above 2^63 - 1".into())
        }
        RecordBody::Alert(a) if !fits(a.cycle) || !fits(a.release.0) => {
            Some("cycle or release above 2^63 - 1".into())
        }
        RecordBody::Alert(a) if !a.value.is_finite() => Some("value is not finite".into()),
        RecordBody::Update(u)
            if !u.directive.is_none_or(fits) || !u.release.is_none_or(|r| fits(r.0)) =>
        {
            Some("directive or release above 2^63 - 1".into())
        }
        RecordBody::Gap(g)
            if g.first != r.seq
                || g.last < g.first
                || !fits(g.last)
                || g.dropped == 0
                || g.dropped > g.last - g.first + 1 =>
        {
            Some("a gap record whose range does not start at its own seq".into())
        }
        RecordBody::Gap(g)
            if !g.summaries.is_empty()
                && (g.stream != Stream::Predictions
                    || g.summaries.len() as u64 > g.dropped
                    || g.summaries.iter().map(|s| s.count).sum::<u64>() > g.dropped
                    || !g.summaries.iter().all(|s| s.is_sound() && fits(s.last_cycle))) =>
        {
            Some("a gap's summaries do not fit its range".into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millwright_shared::wire::{Prediction, RecordBody, WIRE_VERSION};
    use millwright_shared::{AssetId, ModelName, Release};

    fn batch(device: &str, stream: Stream, seq: u64) -> Vec<u8> {
        wire::encode(&UplinkBatch {
            v: WIRE_VERSION,
            device: DeviceId::new(device).unwrap(),
            epoch: "e1".into(),
            stream,
            records: vec![Record {
                seq,
                at_ms: 0,
                body: RecordBody::Prediction(Prediction {
                    asset: AssetId::new("u1").unwrap(),
                    cycle: 30,
                    model: ModelName::new("m").unwrap(),
                    release: Release(1),
                    value: 1.0,
                }),
            }],
        })
    }

    #[test]
    fn accepts_a_batch_on_its_own_topic_only() {
        let gw1 = DeviceId::new("gw1").unwrap();
        assert!(accept(&gw1, Stream::Predictions, &batch("gw1", Stream::Predictions, 1)).is_ok());
        assert!(matches!(
            accept(&gw1, Stream::Predictions, &batch("gw2", Stream::Predictions, 1)),
            Err(IngestError::IdentityMismatch { .. })
        ));
        assert!(matches!(
            accept(&gw1, Stream::Alerts, &batch("gw1", Stream::Predictions, 1)),
            Err(IngestError::StreamMismatch { .. })
        ));
        // A prediction record in the alert stream is refused, record by record.
        let judged = accept(&gw1, Stream::Alerts, &batch("gw1", Stream::Alerts, 1)).unwrap();
        assert_eq!(judged.records, vec![]);
        assert_eq!(
            judged.refused,
            vec![Poison { seq: 1, reason: "a pred record in the alert stream".into() }]
        );
        assert!(matches!(
            accept(&gw1, Stream::Predictions, &batch("gw1", Stream::Predictions, 0)),
            Err(IngestError::ZeroSeq)
        ));
        assert!(matches!(accept(&gw1, Stream::Predictions, b"{}"), Err(IngestError::Decode(_))));
    }

    #[test]
    fn a_poison_record_is_refused_and_its_neighbours_are_accepted() {
        let gw1 = DeviceId::new("gw1").unwrap();
        let mut doc: serde_json::Value =
            serde_json::from_slice(&batch("gw1", Stream::Predictions, 1)).unwrap();
        let good = doc["records"][0].clone();
        let mut huge = good.clone();
        huge["seq"] = 2.into();
        huge["body"]["cycle"] = serde_json::json!(9_223_372_036_854_775_900_u64);
        let mut newer = good.clone();
        newer["seq"] = 3.into();
        newer["body"]["confidence"] = serde_json::json!(0.9);
        let mut last = good;
        last["seq"] = 4.into();
        doc["records"] = serde_json::json!([doc["records"][0], huge, newer, last]);
        let judged = accept(&gw1, Stream::Predictions, doc.to_string().as_bytes()).unwrap();
        assert_eq!(judged.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 4]);
        let refused: Vec<u64> = judged.refused.iter().map(|p| p.seq).collect();
        assert_eq!(refused, vec![2, 3]);
        assert_eq!(judged.refused[0].reason, "cycle or release above 2^63 - 1");
        assert!(judged.refused[1].reason.contains("unknown field"), "{:?}", judged.refused[1]);
        // A record without a sequence number cannot be named: the message is refused.
        doc["records"][1].as_object_mut().unwrap().remove("seq");
        assert!(accept(&gw1, Stream::Predictions, doc.to_string().as_bytes()).is_err());
    }

    #[test]
    fn a_gap_is_stored_only_with_summaries_that_fit_its_range() {
        let gw1 = DeviceId::new("gw1").unwrap();
        let summary = serde_json::json!({"asset": "u1", "model": "m", "count": 4,
            "first_cycle": 30, "last_cycle": 33, "min": 10.0, "mean": 11.5, "max": 13.0, "last": 13.0});
        let gap = |seq: u64, summaries: serde_json::Value| {
            serde_json::json!({"seq": seq, "at_ms": 0, "body": {"kind": "gap", "stream": "pred",
                "first": seq, "last": seq + 3, "dropped": 4, "reason": "quota",
                "summaries": summaries}})
        };
        let mut doc: serde_json::Value =
            serde_json::from_slice(&batch("gw1", Stream::Predictions, 1)).unwrap();
        let mut too_many = summary.clone();
        too_many["count"] = 5.into();
        let mut unsound = summary.clone();
        unsound["mean"] = 99.0.into();
        doc["records"] = serde_json::json!([
            gap(1, serde_json::json!([summary])),
            gap(5, serde_json::json!([too_many])),
            gap(9, serde_json::json!([unsound])),
            gap(13, serde_json::json!([])),
        ]);
        let judged = accept(&gw1, Stream::Predictions, doc.to_string().as_bytes()).unwrap();
        assert_eq!(judged.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 13]);
        let refused: Vec<(u64, &str)> =
            judged.refused.iter().map(|p| (p.seq, p.reason.as_str())).collect();
        let why = "a gap's summaries do not fit its range";
        assert_eq!(refused, vec![(5, why), (9, why)]);
    }
}
