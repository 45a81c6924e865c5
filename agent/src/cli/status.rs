//! `millwright-agent status`: the running agent's summary in a terminal, read from its local
//! page's JSON API, or from `status.json` in its data directory when the API does not answer.

use crate::config::Config;
use crate::status::Status;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Exit code when no status could be read (sysexits.h `EX_UNAVAILABLE`).
const EX_UNAVAILABLE: u8 = 69;

/// The address to ask for a listen address: a wildcard listener is asked on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        a => a,
    }
}

/// The largest status document read (the snapshot of a gateway with many assets is ~100 KB).
const MAX_STATUS_BYTES: usize = 16 << 20;

/// The page's status; over HTTPS the page's certificate must chain to `ca`, the fleet CA of
/// the gateway's identity.
fn fetch(url: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Status> {
    let url = format!("{}/api/status", url.trim_end_matches('/'));
    let tls = ca.map(|ca| millwright_io::tls::client_config(ca, None)).transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let get = millwright_io::https::get(&url, tls, MAX_STATUS_BYTES, Duration::from_secs(3));
    let (code, body) = runtime.block_on(get)?;
    if code != 200 {
        anyhow::bail!("answered {code}: {}", String::from_utf8_lossy(&body).trim());
    }
    Ok(serde_json::from_slice(&body)?)
}

fn read(path: &std::path::Path) -> anyhow::Result<Status> {
    let text = std::fs::read_to_string(path)?;
    Ok(serde_json::from_str(&text)?)
}

/// Prints the summary; `url` wins over the config's `[local] listen`, `ca` over its identity's.
pub fn run(url: Option<String>, config: Option<PathBuf>, ca: Option<PathBuf>) -> ExitCode {
    let config = match config.as_deref().map(Config::load).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: configuration: {e}");
            return ExitCode::from(super::EX_USAGE);
        }
    };
    let url = url.or_else(|| {
        let local = &config.as_ref()?.local;
        let scheme = if local.tls.is_some() { "https" } else { "http" };
        Some(format!("{scheme}://{}", reachable(local.listen?)))
    });
    let ca = ca.or_else(|| config.as_ref().map(|c| c.identity.ca.clone()));
    let mut tried = Vec::new();
    let now_ms = crate::clock::now_ms();
    if let Some(url) = &url {
        match fetch(url, ca.as_deref()) {
            Ok(status) => {
                println!("source: {url}");
                print!("{}", status.summary(now_ms));
                return ExitCode::SUCCESS;
            }
            Err(e) => tried.push(format!("{url}: {e}")),
        }
    }
    if let Some(config) = &config {
        let path = config.data_dir.join("status.json");
        match read(&path) {
            Ok(status) => {
                let why = if tried.is_empty() {
                    "no [local] listen configured".to_owned()
                } else {
                    format!("API not reachable: {}", tried.join("; "))
                };
                println!("source: {} ({why})", path.display());
                print!("{}", status.summary(now_ms));
                return ExitCode::SUCCESS;
            }
            Err(e) => tried.push(format!("{}: {e}", path.display())),
        }
    }
    if tried.is_empty() {
        eprintln!("error: give --url (the agent's local page) or --config (its config file)");
        return ExitCode::from(super::EX_USAGE);
    }
    eprintln!("error: no status available from the agent:\n  {}", tried.join("\n  "));
    ExitCode::from(EX_UNAVAILABLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_asked_on_loopback() {
        let any: SocketAddr = "0.0.0.0:8090".parse().unwrap();
        assert_eq!(reachable(any).to_string(), "127.0.0.1:8090");
        let any6: SocketAddr = "[::]:8090".parse().unwrap();
        assert_eq!(reachable(any6).to_string(), "[::1]:8090");
        let lan: SocketAddr = "10.0.0.5:80".parse().unwrap();
        assert_eq!(reachable(lan), lan);
    }
}
