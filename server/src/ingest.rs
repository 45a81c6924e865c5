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
    #[error("record seq {seq} is a {kind:?} record in stream {stream:?}")]
    WrongKind { seq: u64, kind: Stream, stream: Stream },
    #[error("record sequence numbers start at 1; got 0")]
    ZeroSeq,
    #[error("prediction seq {seq} has a non-finite value")]
    NonFinite { seq: u64 },
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
            IngestError::StreamMismatch { .. } | IngestError::WrongKind { .. } => "wrong_stream",
            IngestError::ZeroSeq
            | IngestError::NonFinite { .. }
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
}

/// Decodes and checks an uplink payload received on the topic of `device`/`stream`.
pub fn accept(device: &DeviceId, stream: Stream, payload: &[u8]) -> Result<Accepted, IngestError> {
    let batch = UplinkBatch::decode(payload)?;
    if &batch.device != device {
        return Err(IngestError::IdentityMismatch { topic: device.clone(), claimed: batch.device });
    }
    if batch.stream != stream {
        return Err(IngestError::StreamMismatch { topic: stream, payload: batch.stream });
    }
    if batch.records.is_empty() {
        return Err(IngestError::Empty);
    }
    let epoch_ok = !batch.epoch.is_empty()
        && batch.epoch.len() <= 64
        && batch.epoch.bytes().all(|b| b.is_ascii_alphanumeric());
    if !epoch_ok {
        return Err(IngestError::BadEpoch(wire::clean_text(&batch.epoch, 64)));
    }
    for r in &batch.records {
        if r.seq == 0 {
            return Err(IngestError::ZeroSeq);
        }
        if r.seq > i64::MAX as u64 {
            return Err(IngestError::SeqTooLarge(r.seq));
        }
        if r.body.stream() != stream {
            return Err(IngestError::WrongKind { seq: r.seq, kind: r.body.stream(), stream });
        }
        if let millwright_shared::wire::RecordBody::Prediction(p) = &r.body
            && !p.value.is_finite()
        {
            return Err(IngestError::NonFinite { seq: r.seq });
        }
    }
    Ok(Accepted { device: batch.device, epoch: batch.epoch, stream, records: batch.records })
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
        assert!(matches!(
            accept(&gw1, Stream::Alerts, &batch("gw1", Stream::Alerts, 1)),
            Err(IngestError::WrongKind { .. })
        ));
        assert!(matches!(
            accept(&gw1, Stream::Predictions, &batch("gw1", Stream::Predictions, 0)),
            Err(IngestError::ZeroSeq)
        ));
        assert!(matches!(accept(&gw1, Stream::Predictions, b"{}"), Err(IngestError::Decode(_))));
    }
}
