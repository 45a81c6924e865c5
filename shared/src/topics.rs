//! The MQTT topic scheme. Every topic starts with `millwright/v1/{device}` so a broker ACL can
//! confine each device to its own subtree.
//!
//! | topic | direction | payload |
//! |---|---|---|
//! | `millwright/v1/{device}/up/{stream}` | agent → server | [`crate::wire::UplinkBatch`] |
//! | `millwright/v1/{device}/ack` | server → agent | [`crate::wire::Ack`] |
//! | `millwright/v1/{device}/status` | agent → server, retained, also the last will | [`crate::wire::DeviceStatus`] |
//! | `millwright/v1/{device}/desired` | server → agent, retained | a server-signed [`crate::directive::Directive`] envelope |
//! | `millwright/v1/{device}/fetch` | agent → server | [`crate::wire::FetchRequest`] |
//! | `millwright/v1/{device}/chunk` | server → agent | [`crate::wire::Chunk`] |
//! | `millwright/v1/trust/root` | server → agents, retained | the current root document ([`crate::trust`]) |
//! | `millwright/v1/events/retraining` | server → subscribers, retained (the latest) | a retraining-recommended event (JSON) |

use crate::ids::DeviceId;
use crate::wire::Stream;

pub const ROOT: &str = "millwright/v1";

/// Where the server subscribes for uplink batches of every device.
pub const UPLINK_FILTER: &str = "millwright/v1/+/up/+";
/// Where the server subscribes for device status of every device.
pub const STATUS_FILTER: &str = "millwright/v1/+/status";

pub fn uplink(device: &DeviceId, stream: Stream) -> String {
    format!("{ROOT}/{device}/up/{}", stream.as_str())
}

pub fn ack(device: &DeviceId) -> String {
    format!("{ROOT}/{device}/ack")
}

pub fn status(device: &DeviceId) -> String {
    format!("{ROOT}/{device}/status")
}

pub fn desired(device: &DeviceId) -> String {
    format!("{ROOT}/{device}/desired")
}

pub fn fetch(device: &DeviceId) -> String {
    format!("{ROOT}/{device}/fetch")
}

pub fn chunk(device: &DeviceId) -> String {
    format!("{ROOT}/{device}/chunk")
}

/// Where the server subscribes for chunk requests of every device.
pub const FETCH_FILTER: &str = "millwright/v1/+/fetch";

/// The fleet's current trust root (retained).
pub const TRUST_ROOT: &str = "millwright/v1/trust/root";

/// Where the server announces "retraining recommended" events.
pub const RETRAINING: &str = "millwright/v1/events/retraining";

/// Where the server watches every device's retained directive: a broker without ACLs lets any
/// client overwrite it, and the server puts its own back.
pub const DESIRED_FILTER: &str = "millwright/v1/+/desired";

/// A Millwright topic, parsed back into what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Uplink { device: DeviceId, stream: Stream },
    Status { device: DeviceId },
    Fetch { device: DeviceId },
    Ack { device: DeviceId },
    Desired { device: DeviceId },
    Chunk { device: DeviceId },
    TrustRoot,
}

/// Parses a topic under [`ROOT`]; `None` for anything that is not ours.
pub fn parse(topic: &str) -> Option<Incoming> {
    if topic == TRUST_ROOT {
        return Some(Incoming::TrustRoot);
    }
    let rest = topic.strip_prefix(ROOT)?.strip_prefix('/')?;
    let mut levels = rest.split('/');
    let device = DeviceId::new(levels.next()?).ok()?;
    if device.is_reserved() {
        return None;
    }
    let incoming = match (levels.next()?, levels.next()) {
        ("up", Some(stream)) => Incoming::Uplink { device, stream: Stream::parse(stream)? },
        ("status", None) => return Some(Incoming::Status { device }),
        ("fetch", None) => return Some(Incoming::Fetch { device }),
        ("ack", None) => return Some(Incoming::Ack { device }),
        ("desired", None) => return Some(Incoming::Desired { device }),
        ("chunk", None) => return Some(Incoming::Chunk { device }),
        _ => return None,
    };
    levels.next().is_none().then_some(incoming)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_through_the_parser() {
        let d = DeviceId::new("gw1").unwrap();
        assert_eq!(
            parse(&uplink(&d, Stream::Predictions)),
            Some(Incoming::Uplink { device: d.clone(), stream: Stream::Predictions })
        );
        assert_eq!(parse(&status(&d)), Some(Incoming::Status { device: d.clone() }));
        assert_eq!(parse("millwright/v1/gw1/up/unknown"), None);
        assert_eq!(parse("millwright/v1/gw1/up/pred/extra"), None);
        assert_eq!(parse("other/v1/gw1/status"), None);
        assert_eq!(parse(&ack(&d)), Some(Incoming::Ack { device: d.clone() }));
        assert_eq!(parse(&desired(&d)), Some(Incoming::Desired { device: d.clone() }));
        assert_eq!(parse(TRUST_ROOT), Some(Incoming::TrustRoot));
        assert_eq!(parse("millwright/v1/trust/status"), None, "reserved levels are no device");
        assert_eq!(parse(RETRAINING), None);
    }
}
