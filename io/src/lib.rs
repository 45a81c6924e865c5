//! Millwright's shared shell, used by the agent, the server and the CLI: the MQTT adapter
//! ([`mqtt`], plain TCP or TLS), TLS material and rustls configurations ([`tls`]), HTTP and
//! HTTPS serving ([`https`]), the only reads of the wall clock ([`clock`]), shutdown signals
//! ([`signal`]) and log setup ([`logging`]).

pub mod clock;
pub mod https;
pub mod logging;
pub mod mqtt;
pub mod signal;
pub mod tls;
