//! The `millwright` command: argument parsing and dispatch. Each subcommand lives in its own
//! module; failures print one line naming the cause and exit non-zero (64 usage, 65 bad data).

mod api;
mod broker;
mod bundle;
pub mod ca;
mod demo;
mod demo_rollout;
pub mod device;
mod drift;
mod model;
mod rollout;
mod root;
mod score;
mod simulate;
pub mod user;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "millwright",
    version,
    about = "Millwright: keys, fleet CA and device enrollment, trust root, model bundles, registry, rollouts, evaluation, fleet drift, demo, fleet simulator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an ed25519 release key pair: NAME.secret.json (mode 0600) and NAME.pub.json.
    Keygen {
        /// Folder to write the key files into.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        #[arg(long, default_value = "release")]
        name: String,
    },
    /// Build a bundle from an ONNX model, a metadata TOML and golden input/output pairs; the
    /// model must pass the agent's own loader and its golden cases before a bundle is written.
    Bundle {
        #[arg(long)]
        onnx: PathBuf,
        #[arg(long)]
        meta: PathBuf,
        #[arg(long)]
        golden: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Sign with this secret key file as well (repeatable).
        #[arg(long = "sign")]
        sign: Vec<PathBuf>,
        /// Build the drift reference profile from this training data (C-MAPSS text).
        #[arg(long)]
        training_data: Option<PathBuf>,
        /// Quantile bins per feature in the drift profile.
        #[arg(long, default_value_t = millwright_shared::drift::profile::DEFAULT_BINS)]
        drift_bins: usize,
    },
    /// Add a signature to a bundle.
    Sign {
        bundle: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Write here instead of replacing the bundle.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a bundle as a device would: signatures, hash, expiry, shapes, golden outputs.
    Verify {
        bundle: PathBuf,
        #[arg(long = "trusted-key", required = true)]
        trusted_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        threshold: usize,
    },
    /// Show a bundle's manifest and signatures without trusting them.
    Inspect { bundle: PathBuf },
    /// RMSE at each unit's last cycle, from replay output and a C-MAPSS RUL file.
    Score {
        #[arg(long)]
        predictions: PathBuf,
        #[arg(long)]
        truth: PathBuf,
        /// Fail unless the RMSE is within --tolerance of this value.
        #[arg(long)]
        expect_rmse: Option<f64>,
        #[arg(long, default_value_t = 0.01)]
        tolerance: f64,
    },
    /// Start a server with its embedded broker and three agents replaying C-MAPSS units.
    Demo(demo::DemoArgs),
    /// A fleet of simulated gateways (enrolled, signed, over TLS MQTT) against a server it
    /// starts itself (SQLite, embedded broker): messages/s, records/s, ack latency, and
    /// every acknowledged record checked against what the server stored.
    Simulate(simulate::SimulateArgs),
    /// Fleet drift from a running server: merged scores per feature, site, device or time
    /// bucket; drifting assets; retraining recommendations.
    Drift(drift::DriftArgs),
    /// The fleet's trust root: create one, or add signatures (rotation).
    Root(root::RootArgs),
    /// The model registry of a running server.
    Model(model::ModelArgs),
    /// Roll a registered release out to the fleet, watch it, pause, resume, abort or revert it.
    Rollout(rollout::RolloutArgs),
    /// The fleet's certificate authority: create it, issue server and broker certificates.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Gateways: enroll (credentials and registration), revoke, list.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// Broker configuration from the device registry.
    #[command(subcommand)]
    Broker(broker::BrokerCommand),
    /// API users: make a token.
    #[command(subcommand)]
    User(user::UserCommand),
}

/// A failure with its exit code.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure { code: 1, error: e.into() }
    }
}

pub const EX_DATAERR: u8 = 65;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    millwright_io::logging::init(match cli.command {
        // Its own server's errors only: thousands of gateways connecting and leaving are not
        // news, and the broker logs every one of them.
        Command::Simulate(_) => "error,rumqttd=off",
        _ => {
            "warn,millwright_agent=info,millwright_server=info,millwright_cli=info,rumqttd::router::routing=off"
        }
    });
    let result = match cli.command {
        Command::Keygen { out_dir, name } => bundle::keygen(&out_dir, &name),
        Command::Bundle { onnx, meta, golden, out, sign, training_data, drift_bins } => {
            let training = training_data
                .as_deref()
                .map(|path| bundle::TrainingData { path, bins: drift_bins });
            bundle::build(&onnx, &meta, &golden, &out, &sign, training)
        }
        Command::Sign { bundle, key, out } => bundle::sign(&bundle, &key, out.as_deref()),
        Command::Verify { bundle, trusted_keys, threshold } => {
            bundle::verify(&bundle, &trusted_keys, threshold)
        }
        Command::Inspect { bundle } => bundle::inspect(&bundle),
        Command::Score { predictions, truth, expect_rmse, tolerance } => {
            score::run(&predictions, &truth, expect_rmse, tolerance)
        }
        Command::Demo(args) => demo::run(args),
        Command::Simulate(args) => simulate::run(args),
        Command::Drift(args) => drift::run(args),
        Command::Root(args) => root::run(args),
        Command::Model(args) => model::run(args),
        Command::Rollout(args) => rollout::run(args),
        Command::Ca(command) => ca::run(command),
        Command::Device(command) => device::run(command),
        Command::Broker(command) => broker::run(command),
        Command::User(command) => user::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
