//! `millwright model register|list`: the registry on a running server.

use super::api::ApiArgs;
use super::{EX_DATAERR, Failure};
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Register a signed bundle as a release; the server verifies it with the release keys and
    /// runs its golden cases with the agent's loader, and refuses it with the reason otherwise.
    Register { bundle: PathBuf },
    /// List registered releases.
    List,
}

#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    command: ModelCommand,
    #[command(flatten)]
    api: ApiArgs,
}

pub fn run(args: ModelArgs) -> Result<(), Failure> {
    match args.command {
        ModelCommand::Register { bundle } => {
            let bytes = std::fs::read(&bundle)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", bundle.display()))?;
            let row = args
                .api
                .post_bytes("/api/v1/models", &bytes)
                .map_err(|e| Failure { code: EX_DATAERR, error: e })?;
            println!(
                "registered {} release {} ({}), sha256 {}",
                row["model"].as_str().unwrap_or("?"),
                row["release"],
                row["version"].as_str().unwrap_or(""),
                row["sha256"].as_str().unwrap_or("")
            );
        }
        ModelCommand::List => {
            let rows = args.api.get("/api/v1/models")?;
            println!(
                "{:<24} {:>7}  {:<16} {:<12} {:>9}  registered by",
                "model", "release", "version", "asset type", "bytes"
            );
            for r in rows.as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:>7}  {:<16} {:<12} {:>9}  {}",
                    r["model"].as_str().unwrap_or(""),
                    r["release"],
                    r["version"].as_str().unwrap_or(""),
                    r["asset_type"].as_str().unwrap_or(""),
                    r["size"],
                    r["registered_by"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}
