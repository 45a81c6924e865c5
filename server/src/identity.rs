//! Who may speak to the server: the registry of enrolled devices, and the gate every MQTT
//! message passes before the server acts on it, whatever broker carried it.
//!
//! A message is admitted only if it is small enough for its kind, signed (see
//! `millwright_shared::signed`) by the key enrolled for the device its topic names, for the
//! purpose its topic names, that device is not revoked, and the device is within its message
//! budget. A device over budget is not refused outright: up to [`Limits::queue`] of its messages
//! wait for its budget to refill, so a gateway draining a long backlog is slowed, never dropped,
//! while a flood from one compromised gateway cannot crowd out the rest of the fleet.
//!
//! Pure: the caller passes `now_ms`; the registry is shared (read-only) with the embedded
//! broker's connection check.

use ed25519_dalek::VerifyingKey;
use millwright_shared::DeviceId;
use millwright_shared::signed::{self, Purpose, SignedError};
use millwright_shared::wire::{DeviceStatus, Stream};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};

/// The user name the server itself presents to the embedded broker.
pub const SERVER_USER: &str = "millwright-server";

/// An enrolled device as the gate sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub key: VerifyingKey,
    pub revoked: bool,
}

/// Enrolled devices by id.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    devices: HashMap<DeviceId, Entry>,
}

pub type SharedRegistry = Arc<RwLock<Registry>>;

impl Registry {
    pub fn insert(&mut self, device: DeviceId, entry: Entry) {
        self.devices.insert(device, entry);
    }

    pub fn revoke(&mut self, device: &DeviceId) {
        if let Some(e) = self.devices.get_mut(device) {
            e.revoked = true;
        }
    }

    pub fn get(&self, device: &DeviceId) -> Option<Entry> {
        self.devices.get(device).copied()
    }

    /// The key of an enrolled device that is not revoked.
    pub fn active_key(&self, device: &DeviceId) -> Result<VerifyingKey, Refused> {
        match self.devices.get(device) {
            None => Err(Refused::UnknownDevice),
            Some(e) if e.revoked => Err(Refused::RevokedDevice),
            Some(e) => Ok(e.key),
        }
    }

    pub fn enrolled(&self) -> usize {
        self.devices.values().filter(|e| !e.revoked).count()
    }
}

/// Why a message was refused before anything acted on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("message of {size} bytes is above the limit of {limit} for its kind")]
    TooLarge { size: usize, limit: usize },
    #[error("the device is not enrolled")]
    UnknownDevice,
    #[error("the device is revoked")]
    RevokedDevice,
    #[error("{0}")]
    Signature(SignedError),
    #[error("the device is over its message budget, and its queue is full")]
    RateLimited,
}

impl Refused {
    /// The label refusals are counted under (`millwright_refused_total{reason=…}`).
    pub fn reason(self) -> &'static str {
        match self {
            Refused::TooLarge { .. } => "too_large",
            Refused::UnknownDevice => "unknown_device",
            Refused::RevokedDevice => "revoked_device",
            Refused::Signature(e) => e.reason(),
            Refused::RateLimited => "rate_limited",
        }
    }
}

/// The largest message of each kind the server reads.
pub fn max_bytes(purpose: Purpose) -> usize {
    match purpose {
        Purpose::Uplink(_) => millwright_io::mqtt::MAX_PACKET_BYTES,
        Purpose::Status => 64 << 10,
        Purpose::Fetch => 4 << 10,
        Purpose::Ack | Purpose::Chunk | Purpose::Connect => 0,
    }
}

/// Each device's message budget: a token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Messages a device may send at once.
    pub burst: f64,
    /// Messages per second it may keep sending.
    pub per_sec: f64,
    /// Its messages that may wait for budget; beyond that they are refused (and resent later).
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { burst: 200.0, per_sec: 100.0, queue: 64 }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// A message that passed the signature check.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    pub device: DeviceId,
    pub purpose: Purpose,
    pub body: Vec<u8>,
}

/// What the gate decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Act on it now.
    Now(Admitted),
    /// Verified, but the device is over budget: it waits in the gate ([`Gate::due`]).
    Queued,
    Refused(Refused),
}

#[derive(Debug)]
pub struct Gate {
    registry: SharedRegistry,
    limits: Limits,
    buckets: HashMap<DeviceId, Bucket>,
    waiting: HashMap<DeviceId, VecDeque<Admitted>>,
}

impl Gate {
    pub fn new(registry: SharedRegistry, limits: Limits) -> Gate {
        Gate { registry, limits, buckets: HashMap::new(), waiting: HashMap::new() }
    }

    pub fn registry(&self) -> &SharedRegistry {
        &self.registry
    }

    /// Checks a message from `device` on a topic of `purpose`.
    pub fn admit(
        &mut self,
        device: &DeviceId,
        purpose: Purpose,
        payload: &[u8],
        now_ms: i64,
    ) -> Verdict {
        let limit = max_bytes(purpose);
        if payload.len() > limit {
            return Verdict::Refused(Refused::TooLarge { size: payload.len(), limit });
        }
        let key = match self.registry.read().map(|r| r.active_key(device)) {
            Ok(Ok(key)) => key,
            Ok(Err(refused)) => return Verdict::Refused(refused),
            Err(_) => return Verdict::Refused(Refused::UnknownDevice),
        };
        let body = match signed::verify(payload, &key, purpose, device) {
            Ok(body) => body.to_vec(),
            Err(e) => return Verdict::Refused(Refused::Signature(e)),
        };
        let admitted = Admitted { device: device.clone(), purpose, body };
        let waiting = self.waiting.get(device).map_or(0, VecDeque::len);
        if waiting == 0 && self.take_token(device, now_ms) {
            return Verdict::Now(admitted);
        }
        if waiting >= self.limits.queue {
            return Verdict::Refused(Refused::RateLimited);
        }
        self.waiting.entry(device.clone()).or_default().push_back(admitted);
        Verdict::Queued
    }

    /// Queued messages whose device has budget again, oldest first per device.
    pub fn due(&mut self, now_ms: i64) -> Vec<Admitted> {
        let mut out = Vec::new();
        let devices: Vec<DeviceId> = self.waiting.keys().cloned().collect();
        for device in devices {
            while self.waiting.get(&device).is_some_and(|q| !q.is_empty())
                && self.take_token(&device, now_ms)
            {
                if let Some(m) = self.waiting.get_mut(&device).and_then(VecDeque::pop_front) {
                    out.push(m);
                }
            }
            if self.waiting.get(&device).is_some_and(VecDeque::is_empty) {
                self.waiting.remove(&device);
            }
        }
        out
    }

    /// Messages waiting for budget.
    pub fn queued(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }

    fn take_token(&mut self, device: &DeviceId, now_ms: i64) -> bool {
        let Limits { burst, per_sec, .. } = self.limits;
        let b =
            self.buckets.entry(device.clone()).or_insert(Bucket { tokens: burst, at_ms: now_ms });
        let elapsed = (now_ms - b.at_ms).max(0) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * per_sec).min(burst);
        b.at_ms = now_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Where a device's statuses stand: the `at_ms` and `started_ms` of the last one accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusOrder {
    pub at_ms: i64,
    pub started_ms: i64,
}

/// Whether `status` is newer than the last accepted one: an online status must be sent later;
/// an offline one (the last will is built at start, so it is "older" than the run's online
/// statuses) must come from the same agent run or a later one. Replays of old statuses fail.
pub fn status_in_order(last: Option<StatusOrder>, status: &DeviceStatus) -> bool {
    let Some(last) = last else { return true };
    if status.online { status.at_ms > last.at_ms } else { status.started_ms >= last.started_ms }
}

/// The stream of an uplink purpose.
pub fn stream_of(purpose: Purpose) -> Option<Stream> {
    match purpose {
        Purpose::Uplink(stream) => Some(stream),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use millwright_shared::wire::WIRE_VERSION;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn gate(limits: Limits) -> (Gate, DeviceId) {
        let gw1 = DeviceId::new("gw1").unwrap();
        let mut registry = Registry::default();
        registry.insert(gw1.clone(), Entry { key: key(1).verifying_key(), revoked: false });
        (Gate::new(Arc::new(RwLock::new(registry)), limits), gw1)
    }

    const UP: Purpose = Purpose::Uplink(Stream::Predictions);

    #[test]
    fn only_the_enrolled_key_for_the_topic_device_and_purpose_gets_in() {
        let (mut g, gw1) = gate(Limits::default());
        let ok = signed::seal(&key(1), UP, &gw1, b"{}");
        assert!(matches!(g.admit(&gw1, UP, &ok, 0), Verdict::Now(a) if a.body == b"{}"));
        let refused = |g: &mut Gate, d: &DeviceId, p: Purpose, m: &[u8]| match g.admit(d, p, m, 0) {
            Verdict::Refused(r) => r.reason(),
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(&mut g, &gw1, UP, b"{}"), "unsigned");
        assert_eq!(refused(&mut g, &gw1, UP, &signed::seal(&key(2), UP, &gw1, b"{}")), "wrong_key");
        assert_eq!(refused(&mut g, &gw1, Purpose::Status, &ok), "bad_signature");
        let gw2 = DeviceId::new("gw2").unwrap();
        assert_eq!(refused(&mut g, &gw2, UP, &ok), "unknown_device");
        let big = vec![b' '; 5 << 10];
        assert_eq!(refused(&mut g, &gw1, Purpose::Fetch, &big), "too_large");
        g.registry().write().unwrap().revoke(&gw1);
        assert_eq!(refused(&mut g, &gw1, UP, &ok), "revoked_device");
    }

    #[test]
    fn a_device_over_budget_waits_then_is_refused_and_others_are_untouched() {
        let (mut g, gw1) = gate(Limits { burst: 3.0, per_sec: 10.0, queue: 2 });
        let m = signed::seal(&key(1), UP, &gw1, b"{}");
        let verdicts: Vec<Verdict> = (0..6).map(|_| g.admit(&gw1, UP, &m, 0)).collect();
        assert_eq!(verdicts.iter().filter(|v| matches!(v, Verdict::Now(_))).count(), 3);
        assert_eq!(verdicts[3], Verdict::Queued);
        assert_eq!(verdicts[4], Verdict::Queued);
        assert_eq!(verdicts[5], Verdict::Refused(Refused::RateLimited));
        assert_eq!(g.due(50).len(), 0, "no token yet");
        assert_eq!(g.due(100).len(), 1, "one token after 100 ms");
        assert_eq!(g.due(1000).len(), 1);
        assert_eq!(g.queued(), 0);
        assert!(matches!(g.admit(&gw1, UP, &m, 1000), Verdict::Now(_)));
    }

    #[test]
    fn old_statuses_are_out_of_order_and_the_last_will_of_the_current_run_is_not() {
        let status = |at_ms, started_ms, online| DeviceStatus {
            v: WIRE_VERSION,
            device: DeviceId::new("gw1").unwrap(),
            at_ms,
            started_ms,
            online,
            agent_version: String::new(),
            site: None,
            tags: vec![],
            device_class: None,
            models: vec![],
            backlog: None,
        };
        let last = Some(StatusOrder { at_ms: 500, started_ms: 100 });
        assert!(status_in_order(None, &status(1, 1, true)));
        assert!(status_in_order(last, &status(501, 100, true)));
        assert!(!status_in_order(last, &status(500, 100, true)), "a replay");
        assert!(status_in_order(last, &status(100, 100, false)), "this run's last will");
        assert!(!status_in_order(last, &status(50, 50, false)), "an earlier run's last will");
    }
}
