//! The ledger of refusals: every message or request refused is counted under its reason (for
//! `/metrics`), and logged once per reason and source, not once per retry or per flood message.
//! The first refusal of a (reason, source) pair is logged in full; repeats within an hour are
//! only counted, and a one-line summary of what went unlogged is due at most once a minute.
//!
//! Pure: the caller passes `now_ms` and writes the log lines it is told to.

use std::collections::{BTreeMap, HashMap};

/// A (reason, source) pair is logged again after this long.
pub const RELOG_MS: i64 = 3_600_000;
/// Unlogged refusals are summarised at most this often.
pub const SUMMARY_MS: i64 = 60_000;
/// Distinct (reason, source) pairs remembered; past that the memory starts afresh.
const MAX_REMEMBERED: usize = 4096;

#[derive(Debug, Default, Clone)]
pub struct Refusals {
    counts: BTreeMap<&'static str, u64>,
    logged: HashMap<(&'static str, String), i64>,
    unlogged: BTreeMap<&'static str, u64>,
    last_summary_ms: Option<i64>,
}

impl Refusals {
    /// Counts a refusal; true when the caller should log it (the first of its kind lately).
    pub fn refuse(&mut self, reason: &'static str, source: &str, now_ms: i64) -> bool {
        *self.counts.entry(reason).or_default() += 1;
        if self.logged.len() >= MAX_REMEMBERED {
            self.logged.clear();
        }
        let key = (reason, source.to_owned());
        match self.logged.get(&key) {
            Some(&at) if now_ms - at < RELOG_MS && now_ms >= at => {
                *self.unlogged.entry(reason).or_default() += 1;
                false
            }
            _ => {
                self.logged.insert(key, now_ms);
                true
            }
        }
    }

    /// A line about the refusals not logged since the last summary, when one is due.
    pub fn summary(&mut self, now_ms: i64) -> Option<String> {
        let recent = self.last_summary_ms.is_some_and(|at| now_ms - at < SUMMARY_MS);
        if self.unlogged.is_empty() || recent {
            return None;
        }
        self.last_summary_ms = Some(now_ms);
        let parts: Vec<String> = std::mem::take(&mut self.unlogged)
            .into_iter()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect();
        Some(format!("further refusals, counted but not logged one by one: {}", parts.join(", ")))
    }

    /// Refusals so far per reason.
    pub fn counts(&self) -> &BTreeMap<&'static str, u64> {
        &self.counts
    }

    pub fn count(&self, reason: &str) -> u64 {
        self.counts.get(reason).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_counted_in_full_and_logged_once_per_reason_and_source() {
        let mut r = Refusals::default();
        let logged: Vec<bool> = (0..100).map(|i| r.refuse("bad_signature", "gw-1", i)).collect();
        assert_eq!(logged.iter().filter(|l| **l).count(), 1);
        assert!(r.refuse("bad_signature", "gw-2", 100), "another source is logged");
        assert!(r.refuse("unsigned", "gw-1", 100), "another reason is logged");
        assert_eq!(r.count("bad_signature"), 101);
        assert_eq!(
            r.summary(100),
            Some("further refusals, counted but not logged one by one: bad_signature: 99".into())
        );
        assert_eq!(r.summary(200), None, "nothing new, and not due");
        assert!(!r.refuse("bad_signature", "gw-1", 200));
        assert_eq!(r.summary(300), None, "a summary a minute at most");
        assert_eq!(
            r.summary(100 + SUMMARY_MS),
            Some("further refusals, counted but not logged one by one: bad_signature: 1".into())
        );
        assert!(r.refuse("bad_signature", "gw-1", RELOG_MS), "logged again an hour later");
    }
}
