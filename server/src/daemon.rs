//! The `millwright-server` command line: flags and config file, then [`crate::run`].

use crate::config::{Config, RawConfig};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "millwright-server", version, about = "Millwright fleet server")]
struct Cli {
    /// TOML configuration file; the flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Folder for the database.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP API address.
    #[arg(long)]
    http: Option<String>,
    /// Address of the embedded MQTT broker.
    #[arg(long)]
    mqtt_listen: Option<String>,
    /// Use this external broker (host:port) instead of the embedded one.
    #[arg(long)]
    broker: Option<String>,
}

const EX_USAGE: u8 = 64;

/// Parses the command line and runs the server until SIGTERM or ctrl-c.
pub fn main() -> ExitCode {
    // rumqttd 0.20 logs every ordinary client DISCONNECT as a routing ERROR ("no-connection id
    // N is already gone"); that target is muted unless RUST_LOG asks for it.
    millwright_agent::logging::init("info,rumqttd=warn,rumqttd::router::routing=off,rumqttc=warn");
    let cli = Cli::parse();
    let config = match load(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::run(config, millwright_agent::signal::shutdown())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: Cli) -> Result<Config, crate::config::ConfigError> {
    let mut raw = match &cli.config {
        Some(path) => RawConfig::load(path)?,
        None => RawConfig::default(),
    };
    raw.data_dir = cli.data_dir.or(raw.data_dir);
    raw.http_listen = cli.http.or(raw.http_listen);
    raw.mqtt.embedded_listen = cli.mqtt_listen.or(raw.mqtt.embedded_listen);
    raw.mqtt.broker = cli.broker.or(raw.mqtt.broker);
    Config::from_raw(raw)
}
