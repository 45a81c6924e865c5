//! Millwright fleet server and the central team's CLI.
//!
//! Pure core: [`ingest`] (what an uplink message means and whether to accept it), [`drift`]
//! (fleet drift: merged histograms, drifting assets, the retraining policy).
//! Shell: [`db`] (SQLite), [`drift_db`] (drift reports and events in SQLite), [`broker`] (embedded rumqttd), [`http`] (axum JSON API),
//! [`runtime`] (the MQTT ingest loop and wiring), [`config`], [`daemon`] (the `millwright-server` command), [`cli`] (the `millwright` command).

pub mod alerts_db;
pub mod auth;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod drift;
pub mod drift_db;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod rollout;
pub mod rollout_db;
pub mod rollouts;
pub mod runtime;

pub use config::Config;
pub use runtime::run;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The largest request body the API takes (a bundle being registered).
pub const REGISTRY_MAX_BODY: usize = 64 << 20;
