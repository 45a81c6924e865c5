//! `millwright ca create|server-cert`: the fleet's certificate authority and the certificates
//! of servers and brokers (see [`millwright_server::pki`]).

use super::Failure;
use super::bundle::write;
use anyhow::Context as _;
use millwright_server::pki::{self, Ca, Leaf, Usage};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub const CA_CERT: &str = "ca.crt.pem";
pub const CA_KEY: &str = "ca.key.pem";

#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Create the fleet CA: DIR/ca.crt.pem (give it to servers, brokers and gateways) and
    /// DIR/ca.key.pem (mode 0600; keep it with the central team, offline if you can).
    Create {
        #[arg(long, default_value = "ca")]
        out_dir: PathBuf,
        #[arg(long, default_value = "Millwright fleet CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a server certificate (HTTPS, the embedded broker, a Mosquitto listener; it also
    /// serves as the server's client certificate towards a broker): OUT_DIR/NAME.crt.pem and
    /// OUT_DIR/NAME.key.pem. Give every name and address clients use to reach it.
    ServerCert {
        /// The folder of the CA (ca.crt.pem, ca.key.pem).
        #[arg(long, default_value = "ca")]
        ca: PathBuf,
        /// The certificate's common name, also its file name (Mosquitto takes it as the user).
        #[arg(long, default_value = "millwright-server")]
        name: String,
        /// DNS names (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// IP addresses (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        #[arg(long, default_value_t = 825)]
        days: i64,
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

pub fn run(command: CaCommand) -> Result<(), Failure> {
    let now = millwright_io::clock::now();
    match command {
        CaCommand::Create { out_dir, name, days } => {
            let key = out_dir.join(CA_KEY);
            if key.exists() {
                return Err(anyhow::anyhow!(
                    "{} exists; refusing to overwrite a CA",
                    key.display()
                )
                .into());
            }
            std::fs::create_dir_all(&out_dir)?;
            let ca = pki::create_ca(&name, now, days)?;
            write(&key, ca.key_pem.as_bytes(), true)?;
            write(&out_dir.join(CA_CERT), ca.cert_pem.as_bytes(), false)?;
            println!(
                "fleet CA {name:?} (valid {days} days) -> {} and {} (keep the key offline)",
                out_dir.join(CA_CERT).display(),
                key.display()
            );
        }
        CaCommand::ServerCert { ca, name, dns, ips, days, out_dir } => {
            let out_dir = out_dir.unwrap_or_else(|| ca.clone());
            let mut leaf = Leaf::new(&name, Usage::Server, now, days);
            leaf.dns = dns;
            leaf.ips = ips;
            if leaf.dns.is_empty() && leaf.ips.is_empty() {
                return Err(
                    anyhow::anyhow!("give at least one --dns or --ip clients reach it by").into()
                );
            }
            let issued = load(&ca)?.issue(&leaf)?;
            std::fs::create_dir_all(&out_dir)?;
            let (cert, key) =
                (out_dir.join(format!("{name}.crt.pem")), out_dir.join(format!("{name}.key.pem")));
            write(&key, issued.key_pem.as_bytes(), true)?;
            write(&cert, issued.cert_pem.as_bytes(), false)?;
            println!("server certificate {name} -> {} and {}", cert.display(), key.display());
        }
    }
    Ok(())
}

/// The CA in folder `dir`.
pub fn load(dir: &Path) -> anyhow::Result<Ca> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    Ok(Ca::load(&read(CA_CERT)?, &read(CA_KEY)?)?)
}
