//! `millwright root create|sign`: the fleet's trust root, made and signed offline.

use super::{EX_DATAERR, Failure};
use ed25519_dalek::{SigningKey, VerifyingKey};
use millwright_shared::keys::{KeyId, PublicKeyFile, SecretKeyFile};
use millwright_shared::trust::{Envelope, KeySet, ROOT_DOMAIN, ROOT_KIND, Root, RootMetadata};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Subcommand)]
pub enum RootCommand {
    /// Write a root document naming the root, release and server keys, signed by `--sign`.
    Create {
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        root_threshold: usize,
        #[arg(long = "release-key", required = true)]
        release_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        release_threshold: usize,
        #[arg(long = "server-key")]
        server_keys: Vec<PathBuf>,
        /// 1 for a new fleet; the current version + 1 for a rotation (sign it with the current
        /// root keys and the new ones).
        #[arg(long, default_value_t = 1)]
        version: u64,
        #[arg(long, default_value_t = 365)]
        expires_days: i64,
        /// Key ids that count for nothing in any role.
        #[arg(long = "revoke")]
        revoked: Vec<String>,
        /// Secret key files to sign with (repeatable).
        #[arg(long = "sign", required = true)]
        sign: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add signatures to a root document (a rotation needs the current and the new root keys).
    Sign {
        root: PathBuf,
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct RootArgs {
    #[command(subcommand)]
    command: RootCommand,
}

fn data_error(e: impl Into<anyhow::Error>) -> Failure {
    Failure { code: EX_DATAERR, error: e.into() }
}

/// Reads key files with `parse` (public or secret key files), naming the file on failure.
fn read_keys<K, E: std::fmt::Display>(
    paths: &[PathBuf],
    parse: impl Fn(&str) -> Result<(KeyId, K), E>,
) -> Result<Vec<K>, Failure> {
    paths
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            let (_, key) =
                parse(&text).map_err(|e| data_error(anyhow::anyhow!("{}: {e}", p.display())))?;
            Ok(key)
        })
        .collect()
}

fn public(paths: &[PathBuf]) -> Result<Vec<VerifyingKey>, Failure> {
    read_keys(paths, PublicKeyFile::parse)
}

fn secret(paths: &[PathBuf]) -> Result<Vec<SigningKey>, Failure> {
    read_keys(paths, SecretKeyFile::parse)
}

fn write(path: &Path, envelope: &Envelope) -> Result<(), Failure> {
    let text = serde_json::to_vec_pretty(envelope).map_err(anyhow::Error::from)?;
    std::fs::write(path, text)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

pub fn run(args: RootArgs) -> Result<(), Failure> {
    match args.command {
        RootCommand::Create {
            root_keys,
            root_threshold,
            release_keys,
            release_threshold,
            server_keys,
            version,
            expires_days,
            revoked,
            sign,
            out,
        } => {
            let now = millwright_agent::clock::now();
            let metadata = RootMetadata {
                kind: ROOT_KIND.into(),
                version,
                expires_at: now.replace_nanosecond(0).unwrap_or(now)
                    + time::Duration::days(expires_days),
                root: KeySet::of(&public(&root_keys)?, root_threshold),
                release: KeySet::of(&public(&release_keys)?, release_threshold),
                server: KeySet::of(&public(&server_keys)?, 1),
                revoked: revoked.into_iter().map(KeyId).collect(),
            };
            let signers = secret(&sign)?;
            let envelope = Root::sign(&metadata, &signers.iter().collect::<Vec<_>>());
            write(&out, &envelope)?;
            match Root::provision(&envelope.to_bytes(), now) {
                Ok(_) => println!(
                    "wrote {} (root version {version}); it verifies on its own",
                    out.display()
                ),
                Err(e) => {
                    println!("wrote {} (root version {version}); not yet valid: {e}", out.display())
                }
            }
        }
        RootCommand::Sign { root, keys } => {
            let bytes = std::fs::read(&root)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", root.display()))?;
            let mut envelope =
                Envelope::parse(&bytes).map_err(|e| data_error(anyhow::anyhow!(e)))?;
            let payload = envelope.payload_bytes().map_err(|e| data_error(anyhow::anyhow!(e)))?;
            let message = [ROOT_DOMAIN, payload.as_slice()].concat();
            for key in secret(&keys)? {
                let sig = millwright_shared::bundle::signature(&key, &message);
                envelope.signatures.retain(|s| s.key_id != sig.key_id);
                envelope.signatures.push(sig);
            }
            write(&root, &envelope)?;
            println!("{} now has {} signature(s)", root.display(), envelope.signatures.len());
        }
    }
    Ok(())
}
