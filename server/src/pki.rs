//! The fleet's certificate authority (rcgen, ECDSA P-256): the CA itself, server certificates
//! (HTTPS, the embedded broker, a Mosquitto listener; also usable as the server's client
//! certificate), device client certificates (the common name is the device id, which Mosquitto
//! takes as the user name) and gateway page certificates. Pure apart from key generation: it
//! returns PEM text, and the CLI writes the files.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0:?} is not a DNS name")]
    Name(String),
}

/// A certificate and its private key, as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// SHA-256 of the certificate's DER, in hex (the registry's fingerprint).
    pub sha256: String,
}

fn issued(cert: &Certificate, key: &KeyPair) -> Issued {
    Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        sha256: millwright_shared::bundle::sha256_hex(cert.der()),
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A gateway's client certificate.
    Client,
    /// A TLS server (and, for the Millwright server, its own broker connection's client).
    Server,
}

/// A leaf certificate to issue.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub common_name: String,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub usage: Usage,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Leaf {
    /// Valid from a minute ago (clock skew) for `days`.
    pub fn new(common_name: &str, usage: Usage, now: OffsetDateTime, days: i64) -> Leaf {
        Leaf {
            common_name: common_name.to_owned(),
            dns: Vec::new(),
            ips: Vec::new(),
            usage,
            not_before: now - Duration::minutes(1),
            not_after: now + Duration::days(days),
        }
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A new self-signed CA, valid for `days`.
pub fn create_ca(common_name: &str, now: OffsetDateTime, days: i64) -> Result<Issued, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::minutes(1);
    params.not_after = now + Duration::days(days);
    Ok(issued(&params.self_signed(&key)?, &key))
}

/// A CA loaded from its files, ready to issue.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert = CertificateParams::from_ca_cert_pem(cert_pem)?.self_signed(&key)?;
        Ok(Ca { cert, key })
    }

    /// Issues `leaf` with a new key.
    pub fn issue(&self, leaf: &Leaf) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&leaf.common_name);
        let mut sans = Vec::new();
        for dns in &leaf.dns {
            let ia5 = dns.clone().try_into().map_err(|_| PkiError::Name(dns.clone()))?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(leaf.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match leaf.usage {
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Server => {
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
            }
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = leaf.not_before;
        params.not_after = leaf.not_after;
        Ok(issued(&params.signed_by(&key, &self.cert, &self.key)?, &key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_issues_server_and_client_certificates_that_chain_to_it() {
        let now = OffsetDateTime::now_utc();
        let ca = create_ca("Test fleet CA", now, 30).unwrap();
        let loaded = Ca::load(&ca.cert_pem, &ca.key_pem).unwrap();
        let mut server = Leaf::new("millwright-server", Usage::Server, now, 30);
        server.dns.push("localhost".into());
        server.ips.push("127.0.0.1".parse().unwrap());
        let server = loaded.issue(&server).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (ca_path, cert_path) = (dir.path().join("ca.pem"), dir.path().join("s.pem"));
        std::fs::write(&ca_path, &ca.cert_pem).unwrap();
        std::fs::write(&cert_path, &server.cert_pem).unwrap();
        millwright_io::tls::check_server_certificate(&ca_path, &cert_path, "127.0.0.1").unwrap();
        millwright_io::tls::check_server_certificate(&ca_path, &cert_path, "localhost").unwrap();
        let err =
            millwright_io::tls::check_server_certificate(&ca_path, &cert_path, "evil.example")
                .unwrap_err();
        assert!(err.contains("evil.example"), "{err}");
        let other = create_ca("Another CA", now, 30).unwrap();
        std::fs::write(&ca_path, &other.cert_pem).unwrap();
        assert!(
            millwright_io::tls::check_server_certificate(&ca_path, &cert_path, "localhost")
                .is_err()
        );
        assert_eq!(server.sha256.len(), 64);
    }
}
