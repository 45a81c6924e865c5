//! The `millwright-agent` command line: run the agent from a config file, or replay recorded
//! data offline.

use crate::config::Config;
use crate::{replay, runtime};
use clap::{Parser, Subcommand};
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
    },
}

/// Exit codes after sysexits.h.
const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;

/// Parses the command line and runs the agent or a replay.
pub fn main() -> ExitCode {
    crate::logging::init("info,rumqttc=warn");
    match Cli::parse().command {
        Command::Run { config } => run(config),
        Command::Replay { bundle, trusted_keys, threshold, cmapss, out } => {
            match replay_cmd(bundle, trusted_keys, threshold, cmapss, out) {
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
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let trusted = crate::config::load_trusted(&keys, threshold)?;
    let mut model = runtime::load_bundle(&bundle, &trusted)?;
    let text = std::fs::read_to_string(&cmapss)
        .with_context(|| format!("cannot read {}", cmapss.display()))?;
    let tmp = out.with_extension("partial");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    let summary = replay::replay(&mut model, &text, &mut file);
    let summary = match summary.and_then(|s| {
        use std::io::Write as _;
        file.flush()?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &out).with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "replayed {} units: {} predictions, {} inference failures -> {}",
        summary.units,
        summary.predictions,
        summary.inference_failures,
        out.display()
    );
    Ok(())
}
