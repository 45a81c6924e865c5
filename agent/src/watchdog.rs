//! systemd service notifications: `READY=1` once the agent runs, `WATCHDOG=1` from every
//! turn of the event loop's one-second tick (so a hung loop misses its pings and systemd
//! restarts the agent after `WatchdogSec`), `STOPPING=1` on shutdown.
//!
//! Outside systemd (no `NOTIFY_SOCKET` in the environment) every call does nothing.

use sd_notify::NotifyState;

/// Tells systemd (`Type=notify`) that the agent has loaded its models and is running.
pub fn ready() {
    send(NotifyState::Ready);
}

/// The watchdog keep-alive; the event loop calls it on every tick.
pub fn ping() {
    send(NotifyState::Watchdog);
}

/// Tells systemd that a requested shutdown is under way.
pub fn stopping() {
    send(NotifyState::Stopping);
}

fn send(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::debug!("sd_notify failed: {e}");
    }
}
