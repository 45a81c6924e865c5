//! Guessing limits for secrets typed or sent by people: the operator PIN on a gateway's page and
//! the bearer tokens of the server API. Per client address, a few attempts are allowed in a
//! window; past that the address is locked out for a while, and the lockout doubles each time
//! it is earned again. An attempt is counted when it *starts*, so parallel guesses cannot slip
//! past the limit, and a success clears the address's record.
//!
//! Pure: the caller passes `now_ms` and keeps the state behind its own lock.

use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Attempts without a success allowed per window.
    pub attempts: u32,
    pub window_ms: i64,
    /// The first lockout; each further one doubles, up to `max_lockout_ms`.
    pub lockout_ms: i64,
    pub max_lockout_ms: i64,
    /// Addresses remembered at most (the oldest are forgotten first).
    pub max_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            attempts: 5,
            window_ms: 60_000,
            lockout_ms: 60_000,
            max_lockout_ms: 3_600_000,
            max_clients: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Client {
    window_start_ms: i64,
    attempts: u32,
    locked_until_ms: i64,
    lockouts: u32,
    seen_ms: i64,
}

/// What [`Lockout::begin`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead and check the secret.
    Attempt,
    /// Refused without checking; retry after this many milliseconds.
    Locked { retry_after_ms: i64 },
    /// This attempt used the last one of the window: it is refused and the lockout starts now
    /// (log it once).
    LockedNow { retry_after_ms: i64 },
}

#[derive(Debug)]
pub struct Lockout<K> {
    limits: Limits,
    clients: HashMap<K, Client>,
    /// Lockouts started so far (for `/metrics`).
    pub lockouts: u64,
    /// Attempts refused without checking (for `/metrics`).
    pub refused: u64,
}

impl<K: Eq + Hash + Clone> Lockout<K> {
    pub fn new(limits: Limits) -> Self {
        Lockout { limits, clients: HashMap::new(), lockouts: 0, refused: 0 }
    }

    /// Counts an attempt by `client`, or refuses it.
    pub fn begin(&mut self, client: &K, now_ms: i64) -> Decision {
        self.forget_oldest_if_full(client);
        let limits = self.limits;
        let c = self.clients.entry(client.clone()).or_default();
        c.seen_ms = now_ms;
        if now_ms < c.locked_until_ms {
            self.refused += 1;
            return Decision::Locked { retry_after_ms: c.locked_until_ms - now_ms };
        }
        if now_ms - c.window_start_ms >= limits.window_ms {
            c.window_start_ms = now_ms;
            c.attempts = 0;
        }
        if c.attempts >= limits.attempts {
            let lockout = limits
                .lockout_ms
                .saturating_mul(1i64 << c.lockouts.min(30))
                .min(limits.max_lockout_ms);
            c.lockouts += 1;
            c.locked_until_ms = now_ms + lockout;
            c.attempts = 0;
            c.window_start_ms = now_ms;
            self.lockouts += 1;
            self.refused += 1;
            return Decision::LockedNow { retry_after_ms: lockout };
        }
        c.attempts += 1;
        Decision::Attempt
    }

    /// Whether `client` is locked out, without counting an attempt (for secrets where only
    /// failures count, like high-entropy API tokens checked by [`Lockout::failure`]).
    pub fn check(&mut self, client: &K, now_ms: i64) -> Decision {
        match self.clients.get(client) {
            Some(c) if now_ms < c.locked_until_ms => {
                self.refused += 1;
                Decision::Locked { retry_after_ms: c.locked_until_ms - now_ms }
            }
            _ => Decision::Attempt,
        }
    }

    /// Counts a failed attempt; [`Decision::LockedNow`] when it used up the window.
    pub fn failure(&mut self, client: &K, now_ms: i64) -> Decision {
        match self.begin(client, now_ms) {
            Decision::Attempt => {
                let full =
                    self.clients.get(client).is_some_and(|c| c.attempts >= self.limits.attempts);
                if full {
                    // The next attempt would be refused: lock out now.
                    self.begin(client, now_ms)
                } else {
                    Decision::Attempt
                }
            }
            locked => locked,
        }
    }

    /// The attempt succeeded: the address starts afresh.
    pub fn success(&mut self, client: &K) {
        self.clients.remove(client);
    }

    fn forget_oldest_if_full(&mut self, client: &K) {
        if self.clients.len() < self.limits.max_clients || self.clients.contains_key(client) {
            return;
        }
        let oldest = self.clients.iter().min_by_key(|(_, c)| c.seen_ms).map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.clients.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        attempts: 3,
        window_ms: 1000,
        lockout_ms: 500,
        max_lockout_ms: 1500,
        max_clients: 2,
    };

    #[test]
    fn parallel_guesses_past_the_limit_are_refused_before_they_are_checked() {
        let mut l = Lockout::new(L);
        let started: Vec<Decision> = (0..10).map(|_| l.begin(&"a", 0)).collect();
        assert_eq!(started.iter().filter(|d| **d == Decision::Attempt).count(), 3);
        assert_eq!(started[3], Decision::LockedNow { retry_after_ms: 500 });
        assert_eq!(started[4], Decision::Locked { retry_after_ms: 500 });
        assert_eq!((l.lockouts, l.refused), (1, 7));
        assert_eq!(l.begin(&"b", 0), Decision::Attempt, "other addresses are not affected");
    }

    #[test]
    fn counting_only_failures_locks_out_on_the_last_one_allowed() {
        let mut l = Lockout::new(L);
        assert_eq!(l.check(&"a", 0), Decision::Attempt);
        assert_eq!(l.failure(&"a", 0), Decision::Attempt);
        assert_eq!(l.failure(&"a", 0), Decision::Attempt);
        assert_eq!(l.failure(&"a", 0), Decision::LockedNow { retry_after_ms: 500 });
        assert_eq!(l.check(&"a", 100), Decision::Locked { retry_after_ms: 400 });
        assert_eq!(l.check(&"a", 500), Decision::Attempt);
        assert_eq!(l.lockouts, 1);
    }

    #[test]
    fn lockouts_double_and_a_success_clears_the_record() {
        let mut l = Lockout::new(L);
        let exhaust = |l: &mut Lockout<&str>, at: i64| {
            for _ in 0..3 {
                assert_eq!(l.begin(&"a", at), Decision::Attempt);
            }
            l.begin(&"a", at)
        };
        assert_eq!(exhaust(&mut l, 0), Decision::LockedNow { retry_after_ms: 500 });
        assert_eq!(l.begin(&"a", 499), Decision::Locked { retry_after_ms: 1 });
        assert_eq!(exhaust(&mut l, 500), Decision::LockedNow { retry_after_ms: 1000 });
        assert_eq!(exhaust(&mut l, 1500), Decision::LockedNow { retry_after_ms: 1500 });
        assert!(matches!(l.begin(&"a", 2000), Decision::Locked { .. }));
        l.success(&"a");
        assert_eq!(l.begin(&"a", 2000), Decision::Attempt);
    }

    #[test]
    fn the_window_resets_the_count_and_old_addresses_are_forgotten_when_full() {
        let mut l = Lockout::new(L);
        for at in [0, 10, 20] {
            assert_eq!(l.begin(&"a", at), Decision::Attempt);
        }
        assert_eq!(l.begin(&"a", 1000), Decision::Attempt, "a new window");
        l.begin(&"b", 1001);
        l.begin(&"c", 1002);
        assert_eq!(l.clients.len(), 2);
        assert!(!l.clients.contains_key("a"), "the least recently seen address went");
    }
}
