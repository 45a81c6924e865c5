//! `millwright device enroll|revoke|list`: a gateway's credentials and the server's registry.
//!
//! `enroll` makes the gateway's identity folder (its ed25519 message key, a client certificate
//! of the fleet CA whose common name is the device id, the CA certificate, the server's message
//! key; the file names are `millwright_shared::enrollment`'s) and registers the device with the
//! server (admin). Copy the folder to the gateway and name it in its `[identity] dir`.

use super::api::ApiArgs;
use super::bundle::write;
use super::{EX_DATAERR, Failure};
use anyhow::Context as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use millwright_server::pki::{Ca, Leaf, Usage};
use millwright_shared::DeviceId;
use millwright_shared::enrollment::{self as files, Enrollment, IDENTITY_KIND, IdentityFile};
use millwright_shared::keys::{KeyId, PublicKeyFile, SecretKeyFile};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Subcommand)]
pub enum DeviceCommand {
    /// Issue a gateway its credentials and enroll it with the server.
    Enroll {
        device: String,
        /// The folder of the fleet CA (ca.crt.pem, ca.key.pem).
        #[arg(long, default_value = "ca")]
        ca: PathBuf,
        /// Where to write the identity folder (default: ./<device>).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        #[arg(long)]
        site: Option<String>,
        /// Labels rollouts can target (comma separated).
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        #[arg(long)]
        class: Option<String>,
        /// Also issue a certificate for the gateway's local HTTPS page, valid for these names or
        /// addresses (repeatable; 127.0.0.1 and localhost are always included).
        #[arg(long = "page-host")]
        page_hosts: Vec<String>,
        /// Validity of the certificates.
        #[arg(long, default_value_t = 1095)]
        days: i64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a gateway: the server refuses everything from it from now on.
    Revoke {
        device: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List enrolled gateways.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// A new ed25519 key.
pub fn random_key() -> anyhow::Result<SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// What to put in an identity folder besides the keys.
#[derive(Debug, Clone, Default)]
pub struct IdentitySpec {
    pub site: Option<String>,
    pub tags: Vec<String>,
    pub class: Option<String>,
    pub page_hosts: Vec<String>,
}

/// Writes `device`'s identity folder into `dir` (refusing to overwrite one) and returns what
/// the server must enroll.
pub fn make_identity(
    ca: &Ca,
    ca_cert_pem: &str,
    dir: &Path,
    device: &DeviceId,
    server_key: &VerifyingKey,
    spec: &IdentitySpec,
    days: i64,
) -> anyhow::Result<Enrollment> {
    if dir.join(files::DEVICE_KEY).exists() {
        anyhow::bail!("{} holds an identity already; refusing to overwrite it", dir.display());
    }
    let now = millwright_io::clock::now();
    let key = random_key()?;
    let client = ca.issue(&Leaf::new(device.as_str(), Usage::Client, now, days))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write(
        &dir.join(files::DEVICE_KEY),
        &serde_json::to_vec_pretty(&SecretKeyFile::new(&key))?,
        true,
    )?;
    write(&dir.join(files::DEVICE_TLS_KEY), client.key_pem.as_bytes(), true)?;
    write(&dir.join(files::DEVICE_CERT), client.cert_pem.as_bytes(), false)?;
    write(&dir.join(files::CA_CERT), ca_cert_pem.as_bytes(), false)?;
    let server = PublicKeyFile::new(server_key);
    write(&dir.join(files::SERVER_KEY), &serde_json::to_vec_pretty(&server)?, false)?;
    if !spec.page_hosts.is_empty() {
        let mut page = Leaf::new(device.as_str(), Usage::Server, now, days);
        page.dns.push("localhost".into());
        page.ips.push(IpAddr::from([127, 0, 0, 1]));
        for host in &spec.page_hosts {
            match host.parse::<IpAddr>() {
                Ok(ip) => page.ips.push(ip),
                Err(_) => page.dns.push(host.clone()),
            }
        }
        let issued = ca.issue(&page)?;
        write(&dir.join(files::PAGE_KEY), issued.key_pem.as_bytes(), true)?;
        write(&dir.join(files::PAGE_CERT), issued.cert_pem.as_bytes(), false)?;
    }
    let identity = IdentityFile {
        kind: IDENTITY_KIND.into(),
        device: device.clone(),
        key_id: KeyId::of(&key.verifying_key()),
        cert_sha256: client.sha256.clone(),
    };
    write(&dir.join(files::IDENTITY_FILE), &serde_json::to_vec_pretty(&identity)?, false)?;
    Ok(Enrollment {
        device: device.clone(),
        public_key: hex::encode(key.verifying_key().as_bytes()),
        cert_sha256: client.sha256,
        site: spec.site.clone(),
        tags: spec.tags.clone(),
        device_class: spec.class.clone(),
    })
}

pub fn run(command: DeviceCommand) -> Result<(), Failure> {
    match command {
        DeviceCommand::Enroll { device, ca, out_dir, site, tags, class, page_hosts, days, api } => {
            let device =
                DeviceId::new(device).map_err(|e| Failure { code: 64, error: e.into() })?;
            if device.is_reserved() {
                return Err(Failure {
                    code: 64,
                    error: anyhow::anyhow!("{device} is reserved and cannot be a device id"),
                });
            }
            let ca_cert = ca.join(super::ca::CA_CERT);
            let api = api.trusting(&ca_cert);
            let identity = api.get("/api/v1/identity")?;
            let server_key = identity["server_key"]
                .as_str()
                .and_then(millwright_server::identity_db::parse_key)
                .context("the server's /api/v1/identity names no server key")?;
            let ca_pem = std::fs::read_to_string(&ca_cert)
                .with_context(|| format!("cannot read {}", ca_cert.display()))?;
            let dir = out_dir.unwrap_or_else(|| PathBuf::from(device.as_str()));
            let spec = IdentitySpec { site, tags, class, page_hosts };
            let enrollment = make_identity(
                &super::ca::load(&ca)?,
                &ca_pem,
                &dir,
                &device,
                &server_key,
                &spec,
                days,
            )?;
            let body = serde_json::to_value(&enrollment)?;
            let row = api.post_json("/api/v1/enrollments", &body).map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                Failure { code: EX_DATAERR, error: e }
            })?;
            println!(
                "enrolled {device} (key {}) -> {}; copy it to the gateway and set [identity] dir",
                row["key_id"].as_str().unwrap_or("?"),
                dir.display()
            );
        }
        DeviceCommand::Revoke { device, reason, api } => {
            let path = format!("/api/v1/enrollments/{device}/revoke");
            let row = api
                .post_json(&path, &serde_json::json!({ "reason": reason }))
                .map_err(|e| Failure { code: EX_DATAERR, error: e })?;
            println!("revoked {} at {}", device, row["revoked_ms"]);
        }
        DeviceCommand::List { api } => {
            let rows = api.get("/api/v1/enrollments")?;
            println!("{:<24} {:<16} {:<16} {:<12} state", "device", "key", "site", "enrolled by");
            for r in rows.as_array().into_iter().flatten() {
                let state = if r["revoked_ms"].is_null() { "enrolled" } else { "revoked" };
                println!(
                    "{:<24} {:<16} {:<16} {:<12} {state}",
                    r["device"].as_str().unwrap_or(""),
                    r["key_id"].as_str().unwrap_or(""),
                    r["site"].as_str().unwrap_or("-"),
                    r["enrolled_by"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}
