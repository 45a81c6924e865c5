//! Millwright fleet server (the central team's CLI, `millwright`, is the `millwright-cli` crate).
//!
//! Pure core: [`identity`] (the device registry and the gate every MQTT message passes),
//! [`ingest`] (what an uplink message means and whether to accept it), [`drift`] (fleet drift:
//! the server's judgement of reports, merged histograms, drifting assets, the retraining
//! policy), [`epochs`] (where an outbox epoch's records are stored), [`rollout`] (the rollout engine),
//! [`retention`] (what is kept how long), [`delivery`] (the chunk queue), [`mosquitto`] (broker config and ACL from the
//! registry).
//! Shell: [`db`] (SQLite), [`drift_db`], [`identity_db`], [`alerts_db`], [`rollout_db`],
//! [`retention_db`] (its parts), [`broker`] (embedded rumqttd), [`http`] (axum JSON API), [`writer`] (the writer task's
//! protocol), [`rollouts`] (the rollout engine's shell), [`runtime`] (the MQTT ingest loop and
//! wiring), [`config`], [`daemon`] (the `millwright-server` command).

pub mod alerts_db;
pub mod auth;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod config;
pub mod daemon;
pub mod db;
pub mod delivery;
pub mod drift;
pub mod drift_db;
pub mod epochs;
pub mod http;
pub mod identity;
pub mod identity_db;
pub mod ingest;
pub mod metrics;
pub mod mosquitto;
pub mod pki;
pub mod retention;
pub mod retention_db;
pub mod rollout;
pub mod rollout_db;
pub mod rollouts;
pub mod runtime;
pub mod writer;

pub use config::Config;
pub use runtime::run;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The largest request body the API takes (a bundle being registered).
pub const REGISTRY_MAX_BODY: usize = 64 << 20;
