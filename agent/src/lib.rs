//! Millwright edge agent.
//!
//! Pure core (no tokio, rusqlite, rumqttc, tract or `std::fs`; no clock): [`cmapss`],
//! [`reading`], [`window`], [`alert`], [`asset`], [`uplink`], [`status`] (the snapshot),
//! [`page`] (the local page's HTML), [`metrics`] (Prometheus text).
//! Shell (one adapter per external system): [`store`] (SQLite), [`inference`] (tract),
//! [`mqtt`] (rumqttc), [`local_http`] (axum: the local page and its API), [`sources`] (file replay pacing), [`runtime`] (the event loop),
//! [`replay`] (offline evaluation), [`cli`] (the command line), [`config`] (TOML and key files), [`clock`], [`signal`], [`logging`],
//! [`watchdog`] (systemd notifications).

pub mod activation;
pub mod alert;
pub mod asset;
pub mod cli;
pub mod clock;
pub mod cmapss;
pub mod config;
pub mod inference;
pub mod local_http;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod page;
pub mod reading;
pub mod reference;
pub mod replay;
pub mod runtime;
pub mod signal;
pub mod sources;
pub mod staging;
pub mod status;
pub mod store;
pub mod update_state;
pub mod uplink;
pub mod watchdog;
pub mod window;

pub use config::Config;
pub use runtime::run;

/// The agent's version, reported in its status message.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
