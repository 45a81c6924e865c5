//! Pure: one simulated gateway's uplink book-keeping — the batches it has sent and the server
//! has not acknowledged yet, what the server's acks covered, the latency of each batch from its
//! first send to the ack that completed it — and, after a run, the fleet's books reconciled
//! against what the server says it stored. Times are microseconds since the run began.

use std::collections::BTreeMap;

/// A batch on its way: its last sequence number, when it was first and last sent, and whether
/// it was first sent inside the measured window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flight {
    last: u64,
    first_sent_us: u64,
    sent_us: u64,
    measured: bool,
}

/// The uplink of one gateway: sequence numbers from 1, at most `window` batches in flight.
#[derive(Debug)]
pub struct Ledger {
    records_per_batch: u64,
    window: usize,
    next_seq: u64,
    in_flight: BTreeMap<u64, Flight>,
    /// Records the server acknowledged as stored.
    pub acked: u64,
    /// Records the server refused for good (none, from a healthy server).
    pub refused: u64,
    /// Records named by an ack that were no longer in flight (a resent batch acked twice).
    pub repeated: u64,
    /// Per batch first sent inside the measured window: microseconds until it was acked.
    pub latencies_us: Vec<u32>,
}

/// A batch to publish: inclusive sequence numbers.
pub type Batch = (u64, u64);

impl Ledger {
    pub fn new(records_per_batch: u64, window: usize) -> Ledger {
        Ledger {
            records_per_batch: records_per_batch.max(1),
            window: window.max(1),
            next_seq: 1,
            in_flight: BTreeMap::new(),
            acked: 0,
            refused: 0,
            repeated: 0,
            latencies_us: Vec::new(),
        }
    }

    /// Records sent so far (each once, however often it was resent).
    pub fn sent(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The next new batch, if the window has room.
    pub fn next_batch(&mut self, now_us: u64, measured: bool) -> Option<Batch> {
        if self.in_flight.len() >= self.window {
            return None;
        }
        let first = self.next_seq;
        let last = first + self.records_per_batch - 1;
        self.next_seq = last + 1;
        let flight = Flight { last, first_sent_us: now_us, sent_us: now_us, measured };
        self.in_flight.insert(first, flight);
        Some((first, last))
    }

    /// Batches whose last send was at least `after_us` ago (or all of them, with 0: after a
    /// reconnect, whose clean session dropped what was queued), marked as sent again now.
    pub fn resend(&mut self, now_us: u64, after_us: u64) -> Vec<Batch> {
        let mut again = Vec::new();
        for (first, f) in &mut self.in_flight {
            if now_us.saturating_sub(f.sent_us) >= after_us {
                f.sent_us = now_us;
                again.push((*first, f.last));
            }
        }
        again
    }

    /// An ack: `ranges` stored, `refused` refused for good (inclusive ranges). A batch in
    /// flight is done when every one of its records is in one or the other; how many batches
    /// that completed is returned.
    pub fn on_ack(&mut self, now_us: u64, ranges: &[(u64, u64)], refused: &[(u64, u64)]) -> u64 {
        let covered = |first: u64, last: u64, set: &[(u64, u64)]| -> u64 {
            set.iter()
                .map(|&(a, b)| {
                    let (lo, hi) = (a.max(first), b.min(last));
                    if lo <= hi { hi - lo + 1 } else { 0 }
                })
                .sum()
        };
        let mut done = Vec::new();
        let mut counted = 0;
        for (&first, f) in &self.in_flight {
            let (stored, lost) = (covered(first, f.last, ranges), covered(first, f.last, refused));
            counted += stored;
            if stored + lost > f.last - first {
                done.push(first);
                self.acked += stored;
                self.refused += lost;
                if f.measured {
                    let us = now_us.saturating_sub(f.first_sent_us);
                    self.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
        }
        let named: u64 = ranges.iter().map(|&(a, b)| b.saturating_sub(a) + 1).sum();
        self.repeated += named.saturating_sub(counted);
        for first in &done {
            self.in_flight.remove(first);
        }
        done.len() as u64
    }
}

/// The value at quantile `q` (0..=1) of `sorted`, by nearest rank; 0 when empty.
pub fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One gateway's books at the end, and what the server stored for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Books {
    pub sent: u64,
    pub acked: u64,
    pub stored: u64,
}

/// Records the server acknowledged and does not hold (`lost`), and records it holds beyond
/// what was ever sent (`duplicated`: with sequence numbers from 1, a stored count above the
/// sent count can only be a record stored twice).
pub fn reconcile(books: impl IntoIterator<Item = Books>) -> (u64, u64) {
    books.into_iter().fold((0, 0), |(lost, dup), b| {
        (lost + b.acked.saturating_sub(b.stored), dup + b.stored.saturating_sub(b.sent))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_done_when_its_ack_covers_it_and_its_latency_counts_from_the_first_send() {
        let mut l = Ledger::new(10, 2);
        assert_eq!(l.next_batch(100, true), Some((1, 10)));
        assert_eq!(l.next_batch(150, false), Some((11, 20)));
        assert_eq!(l.next_batch(160, true), None, "the window holds two batches");
        assert_eq!(l.resend(5_100, 5_000), vec![(1, 10)], "only the first waited 5 ms");
        assert_eq!(l.on_ack(6_100, &[(1, 10)], &[]), 1);
        assert_eq!(l.latencies_us, vec![6_000], "from the first send, not the resend");
        assert_eq!(l.on_ack(6_200, &[(11, 15)], &[]), 0, "half a batch completes nothing");
        assert_eq!(l.on_ack(6_300, &[(11, 15)], &[(16, 20)]), 1);
        assert_eq!(l.latencies_us.len(), 1, "the second batch was sent outside the window");
        assert_eq!((l.sent(), l.acked, l.refused, l.in_flight()), (20, 15, 5, 0));
    }

    #[test]
    fn an_ack_for_records_no_longer_in_flight_is_counted_as_repeated() {
        let mut l = Ledger::new(5, 4);
        l.next_batch(0, true);
        assert_eq!(l.on_ack(10, &[(1, 5)], &[]), 1);
        assert_eq!(l.on_ack(20, &[(1, 5)], &[]), 0);
        assert_eq!((l.acked, l.repeated), (5, 5));
        assert_eq!(l.resend(30, 0), vec![], "nothing left to send again");
    }

    #[test]
    fn after_a_reconnect_everything_in_flight_is_sent_again() {
        let mut l = Ledger::new(1, 3);
        for t in 0..3 {
            l.next_batch(t, true);
        }
        assert_eq!(l.resend(3, 0), vec![(1, 1), (2, 2), (3, 3)]);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!((percentile(&v, 0.5), percentile(&v, 0.99), percentile(&v, 1.0)), (50, 99, 100));
        assert_eq!(percentile(&[7], 0.01), 7);
        assert_eq!(percentile::<u32>(&[], 0.5), 0);
    }

    #[test]
    fn reconcile_counts_acked_records_missing_and_records_stored_beyond_those_sent() {
        let books = [
            Books { sent: 100, acked: 100, stored: 100 },
            Books { sent: 50, acked: 40, stored: 45 },
            Books { sent: 30, acked: 30, stored: 28 },
            Books { sent: 10, acked: 10, stored: 12 },
        ];
        assert_eq!(reconcile(books), (2, 2));
    }
}
