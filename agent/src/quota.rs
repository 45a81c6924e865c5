//! The outbox quota: how much the lower classes must give up when the outbox is too big. Pure.
//!
//! Classes, highest first: update reports and alerts (never dropped), drift reports,
//! predictions. The whole outbox may take `max_bytes`; drift reports and predictions together
//! at most `max_bytes - reserve_bytes`, so a flood of predictions always leaves the reserve to
//! alerts and update reports. Past either limit the oldest predictions go first, then the
//! oldest drift reports, down to a tenth below the limit (so a full outbox does not drop on
//! every commit). What goes is announced in-band by a gap record ([`crate::store::Store::drop_oldest`]).

use millwright_shared::wire::Stream;
use std::collections::HashMap;

/// The classes that may be dropped, in the order they are.
pub const DROP_ORDER: [Stream; 2] = [Stream::Predictions, Stream::Drift];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub max_bytes: u64,
    pub reserve_bytes: u64,
}

impl Quota {
    /// Defaults for a small SD card: 256 MiB of outbox, 16 MiB of it kept for alerts and
    /// update reports. About 1.1 million predictions (~240 bytes each), days of a busy gateway.
    pub const DEFAULT: Quota = Quota { max_bytes: 256 << 20, reserve_bytes: 16 << 20 };

    /// Bytes the droppable classes must free, given each stream's bytes; 0 within the quota.
    pub fn excess(&self, bytes: &HashMap<Stream, u64>) -> u64 {
        let total: u64 = bytes.values().sum();
        let lower: u64 = DROP_ORDER.iter().map(|s| bytes.get(s).copied().unwrap_or(0)).sum();
        let lower_max = self.max_bytes.saturating_sub(self.reserve_bytes);
        if total <= self.max_bytes && lower <= lower_max {
            return 0;
        }
        let slack = self.max_bytes / 10;
        let over_total = total.saturating_sub(self.max_bytes.saturating_sub(slack));
        let over_lower = lower.saturating_sub(lower_max.saturating_sub(slack));
        over_total.max(over_lower).min(lower)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Quota = Quota { max_bytes: 1000, reserve_bytes: 200 };

    fn bytes(pred: u64, drift: u64, alert: u64, update: u64) -> HashMap<Stream, u64> {
        [
            (Stream::Predictions, pred),
            (Stream::Drift, drift),
            (Stream::Alerts, alert),
            (Stream::Updates, update),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn nothing_goes_within_the_quota() {
        assert_eq!(Q.excess(&bytes(700, 100, 100, 100)), 0);
        assert_eq!(Q.excess(&HashMap::new()), 0);
    }

    #[test]
    fn the_lower_classes_give_up_the_reserve_and_a_tenth_more() {
        // 850 of predictions and drift is 50 over the 800 they may take: down to 700.
        assert_eq!(Q.excess(&bytes(800, 50, 0, 0)), 150);
        // Over the whole quota because of alerts: the lower classes make room, down to 900.
        assert_eq!(Q.excess(&bytes(500, 100, 500, 0)), 200);
    }

    #[test]
    fn alerts_and_updates_alone_are_never_dropped() {
        assert_eq!(Q.excess(&bytes(0, 0, 900, 900)), 0, "nothing droppable");
        assert_eq!(Q.excess(&bytes(30, 0, 900, 900)), 30, "at most what the lower classes hold");
    }
}
