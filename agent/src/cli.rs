//! The `millwright-agent` command line: run the agent from a config file, print a running
//! agent's status, or replay recorded data offline.

mod status;

use crate::config::{Config, RawDrift};
use crate::{replay, runtime};
use clap::{Parser, Subcommand};
use millwright_shared::drift::Metric;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "millwright-agent", version, about = "Millwright edge agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent with a TOML configuration.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a running agent's status: from its local page's JSON API, else from the
    /// `status.json` in its data directory.
    Status {
        /// The agent's local page, e.g. https://127.0.0.1:8090 (default: the config's
        /// `[local] listen`).
        #[arg(long)]
        url: Option<String>,
        /// The agent's config file: where its page listens and where its data directory is.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The CA an https:// page's certificate must chain to (default: the fleet CA of the
        /// config's identity).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Verify a bundle and run it over a C-MAPSS file, one JSON line per prediction.
    Replay {
        #[arg(long)]
        bundle: PathBuf,
        /// Public key file to trust (repeatable).
        #[arg(long = "trusted-key", required = true)]
        trusted_keys: Vec<PathBuf>,
        /// Distinct trusted signatures required.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        #[arg(long)]
        cmapss: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        drift: DriftArgs,
    },
}

/// Drift reports from a replay (the bundle needs a drift profile).
#[derive(clap::Args)]
struct DriftArgs {
    /// Also write drift reports here, one JSON line per report.
    #[arg(long)]
    drift_out: Option<PathBuf>,
    /// Readings per drift report for each unit.
    #[arg(long, default_value_t = 50)]
    drift_interval: u64,
    /// Finite values a feature needs for a verdict (default 30).
    #[arg(long)]
    drift_min_samples: Option<u64>,
    /// Severity metric: shift, psi, js or ks (default shift).
    #[arg(long, value_parser = parse_metric)]
    drift_metric: Option<Metric>,
    /// Warn threshold (default by metric).
    #[arg(long)]
    drift_warn: Option<f64>,
    /// Drift threshold (default by metric).
    #[arg(long)]
    drift_threshold: Option<f64>,
}

fn parse_metric(s: &str) -> Result<Metric, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?} is not one of shift, psi, js, ks"))
}

/// Exit codes after sysexits.h.
const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;

/// Parses the command line and runs the agent or a replay.
pub fn main() -> ExitCode {
    crate::logging::init("info,rumqttc=warn");
    match Cli::parse().command {
        Command::Run { config } => run(config),
        Command::Status { url, config, ca } => status::run(url, config, ca),
        Command::Replay { bundle, trusted_keys, threshold, cmapss, out, drift } => {
            match replay_cmd(bundle, trusted_keys, threshold, cmapss, out, drift) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(EX_DATAERR)
                }
            }
        }
    }
}

fn run(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    match runtime.block_on(runtime::run(config, crate::signal::shutdown())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn replay_cmd(
    bundle: PathBuf,
    keys: Vec<PathBuf>,
    threshold: usize,
    cmapss: PathBuf,
    out: PathBuf,
    drift: DriftArgs,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let settings = RawDrift {
        min_samples: drift.drift_min_samples,
        metric: drift.drift_metric,
        warn: drift.drift_warn,
        drift: drift.drift_threshold,
        ..RawDrift::default()
    }
    .settings()?;
    let trusted = crate::config::load_trusted(&keys, threshold)?;
    let root = millwright_shared::trust::Root::from_release_keys(trusted);
    let mut model = runtime::load_bundle(&bundle, &root)?;
    let text = std::fs::read_to_string(&cmapss)
        .with_context(|| format!("cannot read {}", cmapss.display()))?;
    let mut predictions = AtomicFile::create(&out)?;
    let mut drift_file = drift.drift_out.as_deref().map(AtomicFile::create).transpose()?;
    let drift_out = drift_file.as_mut().map(|f| replay::DriftOut {
        out: &mut f.writer,
        settings,
        interval: drift.drift_interval.max(1),
    });
    let summary = replay::replay(&mut model, &text, &mut predictions.writer, drift_out)?;
    predictions.commit()?;
    if let Some(f) = drift_file {
        f.commit()?;
    }
    eprintln!(
        "replayed {} units: {} predictions, {} inference failures, {} drift reports -> {}",
        summary.units,
        summary.predictions,
        summary.inference_failures,
        summary.drift_reports,
        out.display()
    );
    Ok(())
}

/// Output written to `<path>.partial` and renamed into place only when complete; dropped
/// uncommitted, the partial file is removed.
struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: std::io::BufWriter<std::fs::File>,
}

impl AtomicFile {
    fn create(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let tmp = path.with_extension("partial");
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(AtomicFile { path: path.to_owned(), tmp, writer: std::io::BufWriter::new(file) })
    }

    fn commit(mut self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        use std::io::Write as _;
        self.writer.flush()?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
