//! What to send next from the outbox, and when to send it again.
//!
//! Records leave the outbox only on the server's ack (the store deletes them), and only those
//! the ack covers *and* that are in flight on the current connection ([`Uplink::releasable`]):
//! an ack for records never sent, or sent before a reconnect, deletes nothing. This state
//! only remembers what is in flight on the current connection. After a reconnect, or when a batch
//! has waited `retry_after_ms` for its ack, everything still in the outbox is sent again from the
//! start; the server's de-duplication turns that at-least-once delivery into exactly-once storage.

use millwright_shared::wire::{Ack, Stream};

/// Sending order: update reports steer rollouts and alerts are urgent, so they go first; drift
/// evidence ranks above raw telemetry.
pub const PRIORITY: [Stream; 4] =
    [Stream::Updates, Stream::Alerts, Stream::Drift, Stream::Predictions];

/// Drift reports are a few kilobytes each; this many per message keeps messages well under the
/// broker's packet limit.
pub const DRIFT_BATCH_MAX: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Records per MQTT message.
    pub batch_max: usize,
    /// Unacknowledged batches per stream.
    pub max_inflight: usize,
    pub retry_after_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inflight {
    first: u64,
    last: u64,
    sent_at_ms: i64,
}

#[derive(Debug, Clone, Default)]
struct StreamState {
    sent_upto: u64,
    inflight: Vec<Inflight>,
}

/// Ask the outbox for up to `limit` records of `stream` with a sequence number above `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub stream: Stream,
    pub after: u64,
    pub limit: usize,
}

#[derive(Debug, Clone)]
pub struct Uplink {
    settings: Settings,
    connected: bool,
    streams: [StreamState; 4],
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Predictions => 0,
        Stream::Alerts => 1,
        Stream::Drift => 2,
        Stream::Updates => 3,
    }
}

impl Uplink {
    pub fn new(settings: Settings) -> Self {
        Self { settings, connected: false, streams: Default::default() }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// A (re)connection: nothing sent before can be assumed to arrive.
    pub fn on_connected(&mut self) {
        self.connected = true;
        self.streams = Default::default();
    }

    pub fn on_disconnected(&mut self) {
        self.connected = false;
        self.streams = Default::default();
    }

    /// The next read to make from the outbox for `stream`, if the window has room.
    pub fn next_request(&self, stream: Stream) -> Option<Request> {
        let s = &self.streams[index(stream)];
        (self.connected && s.inflight.len() < self.settings.max_inflight).then_some(Request {
            stream,
            after: s.sent_upto,
            limit: match stream {
                Stream::Drift | Stream::Updates => self.settings.batch_max.min(DRIFT_BATCH_MAX),
                Stream::Predictions | Stream::Alerts => self.settings.batch_max,
            },
        })
    }

    /// Records `first..=last` of `stream` were handed to the MQTT client.
    pub fn on_sent(&mut self, stream: Stream, first: u64, last: u64, now_ms: i64) {
        let s = &mut self.streams[index(stream)];
        s.sent_upto = s.sent_upto.max(last);
        s.inflight.push(Inflight { first, last, sent_at_ms: now_ms });
    }

    /// The ranges of `ack` that are in flight: the only records an ack may delete.
    pub fn releasable(&self, ack: &Ack) -> Vec<(u64, u64)> {
        let s = &self.streams[index(ack.stream)];
        let mut out = Vec::new();
        for b in &s.inflight {
            for &(first, last) in &ack.ranges {
                let (from, to) = (first.max(b.first), last.min(b.last));
                if from <= to {
                    out.push((from, to));
                }
            }
        }
        out
    }

    /// Forgets in-flight batches the ack covers completely.
    pub fn on_ack(&mut self, ack: &Ack) {
        let s = &mut self.streams[index(ack.stream)];
        s.inflight.retain(|b| !ack.ranges.iter().any(|&(f, l)| f <= b.first && b.last <= l));
    }

    /// Restarts any stream with a batch unacknowledged for too long; true if one was restarted.
    pub fn on_tick(&mut self, now_ms: i64) -> bool {
        let retry = self.settings.retry_after_ms;
        let mut restarted = false;
        for s in &mut self.streams {
            if s.inflight.iter().any(|b| now_ms - b.sent_at_ms >= retry) {
                *s = StreamState::default();
                restarted = true;
            }
        }
        restarted
    }

    pub fn inflight_batches(&self) -> usize {
        self.streams.iter().map(|s| s.inflight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Settings = Settings { batch_max: 100, max_inflight: 2, retry_after_ms: 1000 };
    const P: Stream = Stream::Predictions;

    #[test]
    fn sends_nothing_while_disconnected() {
        assert_eq!(Uplink::new(S).next_request(P), None);
    }

    #[test]
    fn window_fills_and_acks_free_it() {
        let mut u = Uplink::new(S);
        u.on_connected();
        assert_eq!(u.next_request(P), Some(Request { stream: P, after: 0, limit: 100 }));
        u.on_sent(P, 1, 100, 0);
        assert_eq!(u.next_request(P).unwrap().after, 100);
        u.on_sent(P, 101, 200, 0);
        assert_eq!(u.next_request(P), None);
        u.on_ack(&Ack::from_seqs("e", P, (1..=100).collect()));
        assert_eq!(u.next_request(P).unwrap().after, 200);
        assert!(u.next_request(Stream::Alerts).is_some());
    }

    #[test]
    fn a_partial_ack_keeps_the_batch_in_flight() {
        let mut u = Uplink::new(S);
        u.on_connected();
        u.on_sent(P, 1, 10, 0);
        u.on_ack(&Ack::from_seqs("e", P, (1..=9).collect()));
        assert_eq!(u.inflight_batches(), 1);
    }

    #[test]
    fn an_ack_releases_only_what_is_in_flight() {
        let mut u = Uplink::new(S);
        u.on_connected();
        u.on_sent(P, 11, 20, 0);
        u.on_sent(P, 21, 30, 0);
        let forged = Ack { ranges: vec![(1, u64::MAX)], ..Ack::from_seqs("e", P, vec![]) };
        assert_eq!(u.releasable(&forged), vec![(11, 20), (21, 30)]);
        let partly = Ack::from_seqs("e", P, vec![5, 6, 15, 16, 17, 40]);
        assert_eq!(u.releasable(&partly), vec![(15, 17)]);
        assert_eq!(u.releasable(&Ack::from_seqs("e", Stream::Alerts, vec![15])), vec![]);
        u.on_disconnected();
        u.on_connected();
        assert_eq!(u.releasable(&forged), vec![], "nothing is in flight after a reconnect");
    }

    #[test]
    fn a_late_ack_or_a_reconnect_starts_over_from_the_outbox() {
        let mut u = Uplink::new(S);
        u.on_connected();
        u.on_sent(P, 1, 100, 0);
        assert!(!u.on_tick(999));
        assert!(u.on_tick(1000));
        assert_eq!(u.next_request(P).unwrap().after, 0);
        u.on_sent(P, 1, 100, 1000);
        u.on_disconnected();
        u.on_connected();
        assert_eq!(u.next_request(P).unwrap().after, 0);
    }
}
