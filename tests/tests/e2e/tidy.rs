//! Tidy checks on the source tree: every Rust file starts with `//!`, and the pure modules
//! import none of the I/O crates and never read the clock.

use millwright_tests::repo_root;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_starts_with_a_module_doc_comment() {
    let mut files = Vec::new();
    for krate in ["shared", "io", "agent", "server", "cli", "tests"] {
        rust_files(&repo_root().join(krate), &mut files);
    }
    assert!(files.len() > 20);
    let missing: Vec<_> =
        files.iter().filter(|f| !std::fs::read_to_string(f).unwrap().starts_with("//!")).collect();
    assert!(missing.is_empty(), "files without a //! header: {missing:?}");
}

const PURE: &[&str] = &[
    "shared/src",
    "agent/src/window.rs",
    "agent/src/alert.rs",
    "agent/src/asset.rs",
    "agent/src/cmapss.rs",
    "agent/src/reading.rs",
    "agent/src/sources/registers.rs",
    "agent/src/uplink.rs",
    "agent/src/quota.rs",
    "agent/src/activation.rs",
    "agent/src/update_machine.rs",
    "agent/src/status.rs",
    "agent/src/page.rs",
    "agent/src/metrics.rs",
    "server/src/ingest.rs",
    "server/src/drift.rs",
    "server/src/rollout.rs",
    "server/src/identity.rs",
    "server/src/mosquitto.rs",
    "server/src/epochs.rs",
    "server/src/retention.rs",
    "server/src/delivery.rs",
    "cli/src/simulate/ledger.rs",
    "cli/src/simulate/update.rs",
];

const FORBIDDEN: &[&str] = &[
    "tokio::",
    "rusqlite",
    "rumqttc",
    "tract_",
    "axum",
    "std::fs",
    "std::net",
    "SystemTime",
    "Instant::now",
    "now_utc()",
    "clock::",
];

#[test]
fn the_pure_core_does_no_io_and_reads_no_clock() {
    let mut files = Vec::new();
    for p in PURE {
        let path = repo_root().join(p);
        if path.is_dir() { rust_files(&path, &mut files) } else { files.push(path) }
    }
    let mut offences = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // Unit tests may use fixtures; the rule is for the code itself.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for word in FORBIDDEN {
            if code.contains(word) {
                offences.push(format!("{} mentions {word}", file.display()));
            }
        }
    }
    assert!(offences.is_empty(), "{offences:#?}");
}
