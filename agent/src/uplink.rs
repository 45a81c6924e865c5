//! What to send next from the outbox, and when to send it again.
//!
//! Records leave the outbox only on the server's ack (the store deletes them), and only those
//! the ack covers *and* that are in flight on the current connection ([`Uplink::releasable`]):
//! an ack for records never sent, or sent before a reconnect, deletes nothing. This state
//! only remembers what is in flight on the current connection. After a reconnect everything
//! still in the outbox is sent again from the start (a clean session drops what was queued).
//! A batch that waits too long for its ack is sent again on its own, with a backoff that
//! doubles per attempt, while the rest of the stream flows on; the server's de-duplication
//! turns that at-least-once delivery into exactly-once storage.
//!
//! Times are milliseconds of a monotonic clock: a wall-clock step neither stalls a resend nor
//! fires one early.
//!
//! An optional drain rate paces predictions and drift reports (a token bucket holding one
//! second's worth), so a fleet back from an outage does not flatten its server; alerts and
//! update reports are never held back.

use millwright_shared::wire::{Ack, Stream};
use std::collections::VecDeque;

/// Sending order: update reports steer rollouts and alerts are urgent, so they go first; drift
/// evidence ranks above raw telemetry.
pub const PRIORITY: [Stream; 4] =
    [Stream::Updates, Stream::Alerts, Stream::Drift, Stream::Predictions];

/// Drift reports are a few kilobytes each; this many per message keeps messages well under the
/// broker's packet limit.
pub const DRIFT_BATCH_MAX: usize = 50;

/// A batch's wait for its ack doubles per attempt up to this many times `retry_after_ms`.
pub const MAX_BACKOFF_FACTOR: i64 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Records per MQTT message.
    pub batch_max: usize,
    /// Unacknowledged batches per stream.
    pub max_inflight: usize,
    /// How long a first send waits for its ack before it is sent again.
    pub retry_after_ms: i64,
    /// Predictions and drift reports sent per second at most (`None`: as fast as acks come).
    pub drain_per_sec: Option<u32>,
}

/// The drain rate's budget: records that may be sent now, refilled with time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    tokens: f64,
    refilled_ms: Option<i64>,
}

/// The streams a drain rate paces.
fn paced(stream: Stream) -> bool {
    matches!(stream, Stream::Predictions | Stream::Drift)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inflight {
    first: u64,
    last: u64,
    sent_at_ms: i64,
    /// 1 for the first send.
    attempt: u32,
}

/// Records `first..=last` to send again, as attempt `attempt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resend {
    first: u64,
    last: u64,
    attempt: u32,
}

#[derive(Debug, Clone, Default)]
struct StreamState {
    sent_upto: u64,
    inflight: Vec<Inflight>,
    resend: VecDeque<Resend>,
}

/// Ask the outbox for up to `limit` records of `stream` with a sequence number above `after`
/// and at most `upto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub stream: Stream,
    pub after: u64,
    pub upto: u64,
    pub limit: usize,
    /// Which send of these records this is (1: the first).
    pub attempt: u32,
}

#[derive(Debug, Clone)]
pub struct Uplink {
    settings: Settings,
    connected: bool,
    streams: [StreamState; 4],
    bucket: Bucket,
    /// Per stream, the highest record sent on any connection since start ([`Uplink::drop_floor`]).
    ever_sent: [u64; 4],
    /// Per stream, the floor recorded in the store: at least every record sent by this or an
    /// earlier run of the agent ([`Uplink::reservation`]).
    recorded: [u64; 4],
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Predictions => 0,
        Stream::Alerts => 1,
        Stream::Drift => 2,
        Stream::Updates => 3,
    }
}

/// Every record `first..=last` is acknowledged or refused for good by `ack`.
fn covered(ack: &Ack, first: u64, last: u64) -> bool {
    let mut ranges: Vec<(u64, u64)> = ack.ranges.iter().chain(&ack.refused).copied().collect();
    ranges.sort_unstable();
    let mut next = first;
    for (f, l) in ranges {
        if f > next {
            break;
        }
        if l >= next {
            if l >= last {
                return true;
            }
            next = l + 1;
        }
    }
    false
}

impl Uplink {
    pub fn new(settings: Settings) -> Self {
        let bucket = Bucket { tokens: 0.0, refilled_ms: None };
        Self {
            settings,
            connected: false,
            streams: Default::default(),
            bucket,
            ever_sent: [0; 4],
            recorded: [0; 4],
        }
    }

    /// Adds the drain rate's tokens for the time since the last refill (up to one second's
    /// worth, at least one record: a batch may always go).
    pub fn refill(&mut self, now_ms: i64) {
        let Some(rate) = self.settings.drain_per_sec else { return };
        let rate = f64::from(rate.max(1));
        let b = &mut self.bucket;
        let elapsed = b.refilled_ms.map_or(1000, |at| (now_ms - at).max(0));
        b.tokens = (b.tokens + rate * elapsed as f64 / 1000.0).min(rate.max(1.0));
        b.refilled_ms = Some(now_ms);
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

    /// The next read to make from the outbox for `stream`, if the window has room: a batch due
    /// again first, else what follows the last record sent.
    pub fn next_request(&self, stream: Stream) -> Option<Request> {
        let s = &self.streams[index(stream)];
        if !self.connected || s.inflight.len() >= self.settings.max_inflight {
            return None;
        }
        let mut limit = match stream {
            Stream::Drift | Stream::Updates => self.settings.batch_max.min(DRIFT_BATCH_MAX),
            Stream::Predictions | Stream::Alerts => self.settings.batch_max,
        };
        if self.settings.drain_per_sec.is_some() && paced(stream) {
            let tokens = self.bucket.tokens.floor() as usize;
            if tokens == 0 {
                return None;
            }
            limit = limit.min(tokens);
        }
        Some(match s.resend.front() {
            Some(r) => {
                Request { stream, after: r.first - 1, upto: r.last, limit, attempt: r.attempt }
            }
            None => Request { stream, after: s.sent_upto, upto: u64::MAX, limit, attempt: 1 },
        })
    }

    /// `req` found nothing to send (its records were acked or quarantined meanwhile).
    pub fn on_nothing(&mut self, req: &Request) {
        if req.attempt > 1 {
            self.streams[index(req.stream)].resend.pop_front();
        }
    }

    /// Records `first..=last` of what `req` asked for were handed to the MQTT client.
    pub fn on_sent(&mut self, req: &Request, first: u64, last: u64, now_ms: i64) {
        if self.settings.drain_per_sec.is_some() && paced(req.stream) {
            // Sequence numbers can skip (quarantined rows): the range is an upper bound.
            self.bucket.tokens = (self.bucket.tokens - (last + 1 - first) as f64).max(0.0);
        }
        let ever = &mut self.ever_sent[index(req.stream)];
        *ever = (*ever).max(last);
        let s = &mut self.streams[index(req.stream)];
        if req.attempt > 1 {
            match s.resend.front_mut() {
                Some(r) if last < r.last => r.first = last + 1,
                _ => {
                    s.resend.pop_front();
                }
            }
        } else {
            s.sent_upto = s.sent_upto.max(last);
        }
        s.inflight.push(Inflight { first, last, sent_at_ms: now_ms, attempt: req.attempt });
    }

    /// The ranges of `ack` that are in flight: the only records an ack may delete.
    pub fn releasable(&self, ack: &Ack) -> Vec<(u64, u64)> {
        self.in_flight(ack.stream, &ack.ranges)
    }

    /// The ranges `ack` refuses for good that are in flight: the only records it may move to
    /// the dead letters.
    pub fn refusable(&self, ack: &Ack) -> Vec<(u64, u64)> {
        self.in_flight(ack.stream, &ack.refused)
    }

    fn in_flight(&self, stream: Stream, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let s = &self.streams[index(stream)];
        let mut out = Vec::new();
        for b in &s.inflight {
            for &(first, last) in ranges {
                let (from, to) = (first.max(b.first), last.min(b.last));
                if from <= to {
                    out.push((from, to));
                }
            }
        }
        out
    }

    /// Forgets in-flight batches (and batches due again) the ack covers completely.
    pub fn on_ack(&mut self, ack: &Ack) {
        let s = &mut self.streams[index(ack.stream)];
        s.inflight.retain(|b| !covered(ack, b.first, b.last));
        s.resend.retain(|r| !covered(ack, r.first, r.last));
    }

    /// How long attempt `attempt` waits for its ack.
    pub fn patience_ms(&self, attempt: u32) -> i64 {
        let factor = 1_i64.checked_shl(attempt.saturating_sub(1)).unwrap_or(i64::MAX);
        self.settings.retry_after_ms.saturating_mul(factor.min(MAX_BACKOFF_FACTOR))
    }

    /// Queues for sending again every batch whose ack is overdue; returns how many.
    pub fn on_tick(&mut self, now_ms: i64) -> usize {
        let mut due = 0;
        for i in 0..self.streams.len() {
            let (late, waiting): (Vec<Inflight>, Vec<Inflight>) = self.streams[i]
                .inflight
                .iter()
                .partition(|b| now_ms - b.sent_at_ms >= self.patience_ms(b.attempt));
            let s = &mut self.streams[i];
            s.inflight = waiting;
            for b in late {
                s.resend.push_back(Resend {
                    first: b.first,
                    last: b.last,
                    attempt: b.attempt.saturating_add(1),
                });
                due += 1;
            }
        }
        due
    }

    /// At or below this record of `stream` the server may already have stored a record whose
    /// ack was lost with its connection (in this run or before a restart), so the quota drops
    /// nothing there: a gap over a stored record would count it twice. The highest record sent,
    /// or the floor recorded ahead of the sends, whichever is higher.
    pub fn drop_floor(&self, stream: Stream) -> u64 {
        self.ever_sent[index(stream)].max(self.recorded[index(stream)])
    }

    /// Before records up to `last` of `stream` go out: the floor to record first, if the one
    /// recorded is below `last` and the quota may drop from `stream` (a batch sent again
    /// records nothing).
    pub fn reservation(&self, stream: Stream, last: u64) -> Option<u64> {
        let droppable = crate::quota::DROP_ORDER.contains(&stream);
        (droppable && last > self.recorded[index(stream)]).then_some(last)
    }

    /// The floor the store holds for `stream` (read at start, or just written).
    pub fn recorded_floor(&mut self, stream: Stream, floor: u64) {
        let r = &mut self.recorded[index(stream)];
        *r = (*r).max(floor);
    }

    pub fn inflight_batches(&self) -> usize {
        self.streams.iter().map(|s| s.inflight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Settings =
        Settings { batch_max: 100, max_inflight: 2, retry_after_ms: 1000, drain_per_sec: None };

    #[test]
    fn the_drop_floor_outlives_the_connection_a_batch_was_sent_on() {
        let mut u = Uplink::new(S);
        u.on_connected();
        let req = u.next_request(P).unwrap();
        u.on_sent(&req, 1, 40, 0);
        assert_eq!(u.drop_floor(P), 40);
        // Its ack may have been lost with the connection: the server may hold 1-40.
        u.on_disconnected();
        assert_eq!(u.drop_floor(P), 40);
        u.on_connected();
        assert_eq!(u.drop_floor(P), 40);
        assert_eq!(u.drop_floor(Stream::Alerts), 0);
    }

    #[test]
    fn the_drop_floor_is_recorded_ahead_of_the_sends_and_outlives_a_restart() {
        let mut u = Uplink::new(S);
        u.on_connected();
        assert_eq!(u.reservation(P, 40), Some(40), "nothing recorded yet");
        u.recorded_floor(P, 40);
        assert_eq!(u.reservation(P, 40), None, "a batch sent again records nothing");
        assert_eq!(u.reservation(P, 12), None);
        assert_eq!(u.reservation(P, 41), Some(41));
        assert_eq!(u.reservation(Stream::Alerts, 9), None, "alerts are never dropped");
        assert_eq!(u.reservation(Stream::Drift, 9), Some(9));
        // A restart: nothing sent in this run yet, the recorded floor still holds.
        let mut after = Uplink::new(S);
        after.recorded_floor(P, 40);
        assert_eq!(after.drop_floor(P), 40);
        after.recorded_floor(P, 3);
        assert_eq!(after.drop_floor(P), 40, "a floor never goes down");
        assert_eq!(after.drop_floor(Stream::Drift), 0);
    }

    #[test]
    fn a_drain_rate_paces_predictions_and_drift_but_never_alerts_or_update_reports() {
        let mut u = Uplink::new(Settings { drain_per_sec: Some(150), max_inflight: 100, ..S });
        u.on_connected();
        assert_eq!(u.next_request(P), None, "no tokens before the first refill");
        assert!(u.next_request(Stream::Alerts).is_some(), "alerts are never paced");
        assert!(u.next_request(Stream::Updates).is_some(), "nor update reports");
        u.refill(10_000);
        let sent = |u: &mut Uplink, stream: Stream, now: i64| -> usize {
            let mut n = 0;
            while let Some(req) = u.next_request(stream) {
                let last = req.after + req.limit as u64;
                u.on_sent(&req, req.after + 1, last, now);
                n += req.limit;
            }
            n
        };
        assert_eq!(sent(&mut u, P, 10_000), 150, "one second's worth, in batches of 100 and 50");
        assert_eq!(u.next_request(Stream::Drift), None, "drift shares the budget");
        u.refill(10_200);
        assert_eq!(sent(&mut u, P, 10_200), 30, "0.2 s later: 30 more");
        u.refill(60_000);
        assert_eq!(sent(&mut u, Stream::Drift, 60_000), 150, "an idle minute banks one second");
        u.refill(59_000);
        assert_eq!(u.next_request(P), None, "a clock that goes back adds nothing");
        let mut free = Uplink::new(S);
        free.on_connected();
        assert_eq!(free.next_request(P).map(|r| r.limit), Some(100), "no rate: no pacing");
    }
    const P: Stream = Stream::Predictions;

    #[test]
    fn sends_nothing_while_disconnected() {
        assert_eq!(Uplink::new(S).next_request(P), None);
    }

    #[test]
    fn window_fills_and_acks_free_it() {
        let mut u = Uplink::new(S);
        u.on_connected();
        assert_eq!(
            u.next_request(P),
            Some(Request { stream: P, after: 0, upto: u64::MAX, limit: 100, attempt: 1 })
        );
        send(&mut u, 1, 100, 0);
        assert_eq!(u.next_request(P).unwrap().after, 100);
        send(&mut u, 101, 200, 0);
        assert_eq!(u.next_request(P), None);
        u.on_ack(&Ack::from_seqs("e", P, (1..=100).collect()));
        assert_eq!(u.next_request(P).unwrap().after, 200);
        assert!(u.next_request(Stream::Alerts).is_some());
    }

    #[test]
    fn a_partial_ack_keeps_the_batch_in_flight() {
        let mut u = Uplink::new(S);
        u.on_connected();
        send(&mut u, 1, 10, 0);
        u.on_ack(&Ack::from_seqs("e", P, (1..=9).collect()));
        assert_eq!(u.inflight_batches(), 1);
    }

    #[test]
    fn an_ack_releases_only_what_is_in_flight() {
        let mut u = Uplink::new(S);
        u.on_connected();
        send(&mut u, 11, 20, 0);
        send(&mut u, 21, 30, 0);
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
    fn a_late_batch_is_sent_again_on_its_own_with_a_doubling_wait_and_the_stream_flows_on() {
        let mut u = Uplink::new(S);
        u.on_connected();
        send(&mut u, 1, 100, 0);
        send(&mut u, 101, 200, 500);
        u.on_ack(&Ack::from_seqs("e", P, (101..=200).collect()));
        assert_eq!(u.on_tick(999), 0);
        assert_eq!(u.on_tick(1000), 1, "only the late batch is due");
        let again = u.next_request(P).unwrap();
        assert_eq!((again.after, again.upto, again.attempt), (0, 100, 2));
        // The broker's packet limit halves it: the rest stays due.
        u.on_sent(&again, 1, 50, 1000);
        let rest = u.next_request(P).unwrap();
        assert_eq!((rest.after, rest.upto, rest.attempt), (50, 100, 2));
        u.on_sent(&rest, 51, 100, 1000);
        // New records follow what was sent first, not the resend.
        assert_eq!(u.next_request(P), None, "window of 2 full");
        u.on_ack(&Ack::from_seqs("e", P, (1..=50).collect()));
        let next = u.next_request(P).unwrap();
        assert_eq!((next.after, next.upto, next.attempt), (200, u64::MAX, 1));
        // The second attempt waits twice as long, the third four times; capped.
        assert_eq!(u.on_tick(2999), 0);
        assert_eq!(u.on_tick(3000), 1);
        assert_eq!(u.patience_ms(3), 4000);
        assert_eq!(u.patience_ms(40), 1000 * MAX_BACKOFF_FACTOR);
        // A batch acked while it waited to be sent again is not sent.
        u.on_ack(&Ack::from_seqs("e", P, (51..=100).collect()));
        assert_eq!(u.next_request(P).unwrap().attempt, 1);
    }

    #[test]
    fn records_refused_for_good_complete_a_batch_as_acked_ones_do() {
        let mut u = Uplink::new(S);
        u.on_connected();
        send(&mut u, 1, 10, 0);
        let mut ack = Ack::from_seqs("e", P, vec![1, 2, 3, 6, 7, 8, 9, 10]);
        ack.refused = vec![(4, 5), (40, 50)];
        assert_eq!(u.refusable(&ack), vec![(4, 5)], "only what is in flight");
        u.on_ack(&ack);
        assert_eq!(u.inflight_batches(), 0);
        send(&mut u, 11, 20, 0);
        let mut partly = Ack::from_seqs("e", P, vec![11, 12]);
        partly.refused = vec![(14, 20)];
        u.on_ack(&partly);
        assert_eq!(u.inflight_batches(), 1, "13 is neither acked nor refused");
    }

    #[test]
    fn a_due_batch_whose_records_are_gone_is_dropped_and_a_reconnect_starts_over() {
        let mut u = Uplink::new(S);
        u.on_connected();
        send(&mut u, 1, 100, 0);
        assert_eq!(u.on_tick(1000), 1);
        let due = u.next_request(P).unwrap();
        u.on_nothing(&due);
        assert_eq!(u.next_request(P).unwrap().after, 100);
        send(&mut u, 101, 200, 1000);
        u.on_disconnected();
        u.on_connected();
        assert_eq!(u.next_request(P).unwrap().after, 0);
    }

    fn send(u: &mut Uplink, first: u64, last: u64, now_ms: i64) {
        let req = u.next_request(P).unwrap();
        assert_eq!(req.attempt, 1);
        u.on_sent(&req, first, last, now_ms);
    }
}
