//! How long the server keeps what gateways send (`[retention]`), as pure rules: the cut-off
//! of each kind of data at a given time, and which leading records of a device's stream are
//! old enough to go. The background pass that applies them is [`crate::retention_db`].
//!
//! Raw predictions go first (30 days by default), summed into one row per device, asset,
//! release and hour before they are deleted; the hourly rows, alerts and drift reports stay a
//! year; the audit log, gaps, update reports and rollouts are kept for good. Age is the
//! server's receive time, not the gateway's clock, which may be wrong.
//!
//! A stream is pruned from its oldest record onward and never past a record that is still
//! young, so what is gone is always a prefix: the stream remembers where it ends, and a record
//! a gateway resends from before it is acknowledged as stored before instead of stored twice.

use serde::{Deserialize, Serialize};

const DAY_MS: i64 = 86_400_000;

/// Days each kind of data is kept; `None` keeps it for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub predictions_days: Option<u32>,
    pub hourly_days: Option<u32>,
    pub alerts_days: Option<u32>,
    pub drift_days: Option<u32>,
    /// Minutes between passes.
    pub every_minutes: u32,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            predictions_days: Some(30),
            hourly_days: Some(365),
            alerts_days: Some(365),
            drift_days: Some(365),
            every_minutes: 60,
        }
    }
}

/// `[retention]` as written: days per kind, 0 for "keep for good".
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub predictions_days: Option<u32>,
    pub hourly_days: Option<u32>,
    pub alerts_days: Option<u32>,
    pub drift_days: Option<u32>,
    pub every_minutes: Option<u32>,
}

impl RawPolicy {
    pub fn validate(&self) -> Result<Policy, String> {
        let d = Policy::default();
        let days = |v: Option<u32>, default: Option<u32>| match v {
            Some(0) => None,
            Some(n) => Some(n),
            None => default,
        };
        let policy = Policy {
            predictions_days: days(self.predictions_days, d.predictions_days),
            hourly_days: days(self.hourly_days, d.hourly_days),
            alerts_days: days(self.alerts_days, d.alerts_days),
            drift_days: days(self.drift_days, d.drift_days),
            every_minutes: self.every_minutes.unwrap_or(d.every_minutes),
        };
        if policy.every_minutes == 0 {
            return Err("retention.every_minutes must be at least 1".into());
        }
        if let (Some(raw), Some(hourly)) = (policy.predictions_days, policy.hourly_days)
            && hourly < raw
        {
            return Err(format!(
                "retention.hourly_days ({hourly}) is shorter than retention.predictions_days \
                 ({raw}): the hourly summaries would go before the predictions they sum"
            ));
        }
        Ok(policy)
    }
}

/// Receive times before which each kind of data goes (`None`: kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    pub predictions: Option<i64>,
    pub hourly: Option<i64>,
    pub alerts: Option<i64>,
    pub drift: Option<i64>,
}

impl Policy {
    pub fn cutoffs(&self, now_ms: i64) -> Cutoffs {
        let before = |days: Option<u32>| days.map(|d| now_ms.saturating_sub(i64::from(d) * DAY_MS));
        Cutoffs {
            predictions: before(self.predictions_days),
            hourly: before(self.hourly_days),
            alerts: before(self.alerts_days),
            drift: before(self.drift_days),
        }
    }
}

/// Of a stream's oldest records `(seq, received_ms)` in sequence order, the last sequence
/// number that may go: the end of the leading run received before `cutoff`.
pub fn prefix_end(oldest: &[(u64, i64)], cutoff: i64) -> Option<u64> {
    oldest.iter().take_while(|(_, received)| *received < cutoff).last().map(|(seq, _)| *seq)
}

/// The start of the hour `at_ms` falls in.
pub fn hour_of(at_ms: i64) -> i64 {
    at_ms.div_euclid(3_600_000) * 3_600_000
}

/// What passes have removed, by kind, since the server started, and when the last one ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub policy: Option<Policy>,
    pub passes: u64,
    pub last_pass_ms: Option<i64>,
    /// How long the last pass took, and its longest transaction (what ingest may wait for).
    pub last_pass_duration_ms: u64,
    pub longest_transaction_ms: u64,
    pub predictions: u64,
    pub hourly: u64,
    pub alerts: u64,
    pub drift_reports: u64,
    /// Why the last pass stopped early, if it did.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_follow_the_days_and_zero_keeps_for_good() {
        let p = RawPolicy { predictions_days: Some(2), alerts_days: Some(0), ..Default::default() }
            .validate()
            .unwrap();
        let now = 100 * DAY_MS;
        let c = p.cutoffs(now);
        assert_eq!(c.predictions, Some(98 * DAY_MS));
        assert_eq!(c.hourly, Some((100 - 365) * DAY_MS));
        assert_eq!(c.alerts, None, "0 days keeps alerts for good");
        assert_eq!(c.drift, Some((100 - 365) * DAY_MS));
        assert_eq!(Policy::default().cutoffs(now).predictions, Some(70 * DAY_MS));
    }

    #[test]
    fn a_policy_that_cannot_hold_is_named() {
        let short =
            RawPolicy { predictions_days: Some(30), hourly_days: Some(7), ..Default::default() };
        let err = short.validate().unwrap_err();
        assert!(err.contains("hourly_days (7)") && err.contains("predictions_days (30)"), "{err}");
        let never = RawPolicy { every_minutes: Some(0), ..Default::default() };
        assert!(never.validate().unwrap_err().contains("every_minutes"));
        let keep_raw =
            RawPolicy { predictions_days: Some(0), hourly_days: Some(7), ..Default::default() };
        assert_eq!(keep_raw.validate().unwrap().predictions_days, None);
    }

    #[test]
    fn only_the_leading_run_of_old_records_goes() {
        let rows = [(1, 10), (2, 20), (4, 90), (5, 30), (6, 31)];
        assert_eq!(prefix_end(&rows, 50), Some(2), "a young record stops the prefix");
        assert_eq!(prefix_end(&rows, 100), Some(6));
        assert_eq!(prefix_end(&rows, 10), None);
        assert_eq!(prefix_end(&[], 10), None);
    }

    #[test]
    fn hours_start_on_the_hour_before_1970_too() {
        assert_eq!(hour_of(3_600_000 * 5 + 17), 3_600_000 * 5);
        assert_eq!(hour_of(-1), -3_600_000);
    }
}
