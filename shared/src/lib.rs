//! The Millwright contract shared by agent, server and CLI: identifiers, the MQTT topic scheme,
//! versioned wire messages, the model bundle format and its ed25519 signing.
//!
//! Architecture invariant: nothing in this crate does I/O or reads the clock. Callers pass bytes
//! in and get values or typed errors out; `now` is always a parameter.

pub mod bundle;
pub mod directive;
pub mod drift;
pub mod enrollment;
pub mod gates;
pub mod ids;
pub mod keys;
pub mod lockout;
pub mod manifest;
pub mod refusals;
pub mod signed;
pub mod topics;
pub mod trust;
pub mod wire;

pub use bundle::{Rejection, VerifiedBundle};
pub use ids::{AssetId, DeviceId, IdError, ModelName, Release};
