//! End-to-end scenarios: real brokers, real server and agent processes, real model and data.
//! The harness is the `millwright_tests` library.

#![allow(clippy::unwrap_used, reason = "test code: a panic with its message is the failure report")]

mod e2e {
    mod attacks;
    mod bundle_refusals;
    mod config_errors;
    mod dashboard;
    mod delivery;
    mod drift_fleet;
    mod faults;
    mod half_open;
    mod http_attacks;
    mod local_page;
    mod modbus;
    mod outbox_faults;
    mod reference_model;
    mod retention;
    mod rollouts;
    mod simulate;
    mod tidy;
    mod trust_state;
    mod update_crashes;
    mod update_outage;
    mod update_refusals;
    mod variants;
    mod wear;
}
