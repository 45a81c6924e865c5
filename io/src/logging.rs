//! Structured logs to stderr for every Millwright binary; `RUST_LOG` overrides the default filter.
//! Colours only on a terminal, so journald and log files get plain text.

use std::io::IsTerminal as _;

/// Installs the global subscriber with `default` as the filter unless `RUST_LOG` is set.
pub fn init(default: &str) {
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
