//! `millwright user add`: a new API token, printed once; the server's config keeps only its
//! SHA-256.

use super::Failure;
use millwright_server::config::Role;
use std::io::Write as _;
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum UserCommand {
    /// Make a token for a new user and print it once; with --config, append the user (with
    /// the token's hash only) to that server config.
    Add {
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?} is not one of viewer, operator, admin"))
}

/// The `[[users]]` table for a user with `token`.
pub fn users_entry(name: &str, role: Role, token: &str) -> String {
    let role = serde_json::to_value(role).ok().and_then(|v| v.as_str().map(str::to_owned));
    format!(
        "\n[[users]]\nname = {name:?}\nrole = {:?}\ntoken_sha256 = {:?}\n",
        role.unwrap_or_default(),
        millwright_server::auth::token_hash(token)
    )
}

pub fn run(command: UserCommand) -> Result<(), Failure> {
    let UserCommand::Add { name, role, config } = command;
    let token =
        millwright_server::auth::new_token().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let entry = users_entry(&name, role, &token);
    match &config {
        Some(path) => {
            let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
            file.write_all(entry.as_bytes())?;
            eprintln!("added user {name} to {} (restart the server to apply)", path.display());
        }
        None => eprintln!("add this to the server's config:{entry}"),
    }
    eprintln!("the token, shown only now (store it like a password):");
    println!("{token}");
    Ok(())
}
