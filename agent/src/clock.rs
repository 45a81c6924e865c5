//! The agent's only reads of the wall clock. Pure modules receive these values as parameters.

use time::OffsetDateTime;

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    (now().unix_timestamp_nanos() / 1_000_000) as i64
}
