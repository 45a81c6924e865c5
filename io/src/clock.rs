//! The only reads of the wall clock. Pure modules receive these values as parameters.
//!
//! A gateway without a battery-backed clock can boot in 1970, or be set back by hand. Time
//! checks that guard trust (certificate validity, bundle and directive expiry) therefore use
//! [`trusted_now`]: the wall clock, but never earlier than a *floor* the process was told about
//! (a persisted "latest time seen", the creation time of a verified bundle), and the floor
//! itself moves on at the rate of the monotonic clock. Timers use [`monotonic_ms`], so a clock
//! stuck in the past, or stepped, neither stalls them nor fires them early.

use std::sync::Mutex;
use std::time::Instant;
use time::OffsetDateTime;

/// A wall clock this far behind the floor is reported as untrustworthy.
pub const UNTRUSTED_BEHIND_MS: i64 = 5 * 60 * 1000;

/// The floor and when (monotonically) it was set.
static FLOOR: Mutex<Option<(i64, Instant)>> = Mutex::new(None);

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    (now().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Milliseconds of a monotonic clock (since this process first asked): for timers, which a
/// wall-clock step must neither stall nor fire early.
pub fn monotonic_ms() -> i64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64
}

/// Time can be no earlier than `ms` (milliseconds since the epoch); a lower value is ignored.
pub fn raise_floor(ms: i64) {
    let mut floor = FLOOR.lock().unwrap_or_else(|e| e.into_inner());
    if ms > current(*floor) {
        *floor = Some((ms, Instant::now()));
    }
}

fn current(floor: Option<(i64, Instant)>) -> i64 {
    floor.map_or(0, |(ms, at)| ms.saturating_add(at.elapsed().as_millis() as i64))
}

/// The floor, moved on since it was set (0 until one is raised).
pub fn floor_ms() -> i64 {
    current(*FLOOR.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The wall clock, or the floor when the clock is behind it.
pub fn trusted_now_ms() -> i64 {
    now_ms().max(floor_ms())
}

/// [`trusted_now_ms`] as a date.
pub fn trusted_now() -> OffsetDateTime {
    from_ms(trusted_now_ms())
}

/// The wall clock is well behind what this process knows to have passed already.
pub fn is_untrusted() -> bool {
    floor_ms() - now_ms() > UNTRUSTED_BEHIND_MS
}

pub fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

pub fn to_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}
