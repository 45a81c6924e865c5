//! Millwright edge agent.
//!
//! Pure core (no tokio, rusqlite, rumqttc, tract or `std::fs`; no clock): [`cmapss`],
//! [`reading`], [`window`], [`alert`], [`asset`], [`uplink`], [`quota`] (what the outbox
//! quota drops), [`activation`] (an update's checks), [`update_machine`] (the model update), [`status`] (the snapshot),
//! [`page`] (the local page's HTML), [`metrics`] (Prometheus text).
//! Shell (one adapter per external system): [`store`] (SQLite), [`inference`] (tract),
//! [`local_http`] (axum: the local page and its API), [`sources`] (file replay pacing), [`runtime`] (the event loop),
//! [`replay`] (offline evaluation), [`cli`] (the command line), [`config`] (TOML and key files),
//! [`identity`] (the gateway's enrolled credentials), [`watchdog`] (systemd notifications). The
//! MQTT and HTTPS transports, the clock, signals and logging are `millwright_io`'s, re-exported
//! here as [`mqtt`], [`clock`], [`signal`], [`logging`].

pub mod activation;
pub mod alert;
pub mod asset;
pub mod cli;
pub mod cmapss;
pub mod config;
pub mod identity;
pub mod inference;
pub mod local_http;
pub mod metrics;
pub mod page;
pub mod quota;
pub mod reading;
pub mod reference;
pub mod replay;
pub mod runtime;
pub mod sources;
pub mod staging;
pub mod status;
pub mod store;
pub mod update_machine;
pub mod update_state;
pub mod uplink;
pub mod watchdog;
pub mod window;

pub use config::Config;
pub use millwright_io::{clock, logging, mqtt, signal};
pub use runtime::run;

/// The agent's version, reported in its status message.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
