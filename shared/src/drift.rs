//! Data drift against a model's training reference, computed where the data is.
//!
//! - [`profile`]: the reference profile built from training data at bundling time; it travels
//!   inside the signed manifest.
//! - [`score`]: PSI, Jensen–Shannon distance, KS statistic and mean shift from binned counts.
//! - [`monitor`]: the per-asset streaming accumulator, data-quality checks and severities with
//!   hysteresis; it emits one [`report::DriftReport`] per interval.
//! - [`report`]: the compact report the agent sends through its outbox, and the merge of reports
//!   (histograms add up) the server uses for fleet-level scores.
//!
//! All of it is pure: callers pass values and get values back.

pub mod monitor;
pub mod profile;
pub mod report;
pub mod score;

pub use monitor::{DriftMonitor, DriftSettings, Metric, ReportMeta};
pub use profile::{DriftProfile, FeatureProfile};
pub use report::{DriftReport, FeatureDrift, Merged, Quality, Severity};
