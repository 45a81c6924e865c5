//! TLS material from PEM files and the rustls configurations built from it, on the `ring`
//! provider: the gateway's and the server's broker connections (a client certificate chained
//! to the fleet CA, the broker's certificate checked against that CA), HTTPS listeners, and
//! HTTPS clients that trust the fleet CA.
//!
//! Certificate validity is judged at [`crate::clock::trusted_now`], so a gateway whose clock
//! restarted in 1970 still accepts a broker certificate issued last week.

use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, SEC1 or PKCS#1)")]
    NoKey { path: PathBuf },
    #[error("{path}: the CA certificate is not usable as a trust anchor: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// Every certificate in a PEM file, in order (a leaf, then its chain).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey { path: path.to_owned() })
}

/// The fleet CA as the only trust anchor.
pub fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::BadCa { path: ca.to_owned(), reason: e.to_string() })?;
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The wall clock for rustls, never earlier than the process's time floor.
#[derive(Debug)]
struct FlooredTime;

impl rustls::time_provider::TimeProvider for FlooredTime {
    fn current_time(&self) -> Option<UnixTime> {
        let ms = u64::try_from(crate::clock::trusted_now_ms()).ok()?;
        Some(UnixTime::since_unix_epoch(Duration::from_millis(ms)))
    }
}

/// A client certificate and its key, presented to a broker or server that asks for one.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A client that trusts only `ca` and, when given, presents `identity`.
pub fn client_config(
    ca: &Path,
    identity: Option<&ClientIdentity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_details(provider(), Arc::new(FlooredTime))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?);
    let config = match identity {
        Some(id) => {
            builder.with_client_auth_cert(certificates(&id.cert)?, private_key(&id.key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A listener's configuration: `cert` (with its chain) and `key`; with `client_ca`, every client
/// must present a certificate chained to it.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_details(provider(), Arc::new(FlooredTime))
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| TlsError::BadCa { path: ca.to_owned(), reason: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certificates(cert)?, private_key(key)?)?;
    // HTTP/1.1 only (`https::serve` has no HTTP/2): a client offered h2 would speak it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Whether `cert` (the first in its file) verifies as a server certificate for `name` against
/// `ca` now: for configuration checks that name the problem before anything connects.
pub fn check_server_certificate(ca: &Path, cert: &Path, name: &str) -> Result<(), String> {
    let roots = roots(ca).map_err(|e| e.to_string())?;
    let chain = certificates(cert).map_err(|e| e.to_string())?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| e.to_string())?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| format!("{name:?} is not a DNS name or IP address: {e}"))?;
    let now = FlooredTime.current_time_or_epoch();
    verifier.verify_server_cert(&chain[0], &chain[1..], &server_name, &[], now).map(|_| ()).map_err(
        |e| format!("{} is not valid for {name} under {}: {e}", cert.display(), ca.display()),
    )
}

impl FlooredTime {
    fn current_time_or_epoch(&self) -> UnixTime {
        use rustls::time_provider::TimeProvider as _;
        self.current_time().unwrap_or(UnixTime::since_unix_epoch(Duration::ZERO))
    }
}
