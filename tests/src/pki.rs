//! The fleet credentials of one test: a CA, the server's certificate (HTTPS, the embedded
//! broker, the server's own broker connection), a Mosquitto certificate, and the server's
//! message key (the trust kit's server key, so roots made by [`crate::trust::TrustKit`] name
//! it). Attack tests also get certificates the fleet must refuse: expired ones and ones of
//! another CA.

use millwright_server::pki::{self, Ca, Leaf, Usage};
use millwright_shared::keys::{PublicKeyFile, SecretKeyFile};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    /// The folder `millwright device enroll --ca` reads (ca.crt.pem, ca.key.pem).
    pub ca_dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub broker_cert: PathBuf,
    pub broker_key: PathBuf,
    /// The server's ed25519 message key (secret key file) and its public key file.
    pub message_key: PathBuf,
    pub message_public: PathBuf,
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text)?;
    Ok(())
}

fn loopback(leaf: &mut Leaf) {
    leaf.dns.push("localhost".into());
    leaf.ips.push(IpAddr::from([127, 0, 0, 1]));
}

impl Pki {
    /// Creates the credentials under `root/pki`, or reuses those a scenario made there before.
    pub fn at(root: &Path) -> anyhow::Result<Pki> {
        let dir = root.join("pki");
        let ca_dir = dir.join("ca");
        let p = Pki {
            ca_cert: ca_dir.join("ca.crt.pem"),
            ca_dir,
            server_cert: dir.join("server.crt.pem"),
            server_key: dir.join("server.key.pem"),
            broker_cert: dir.join("broker.crt.pem"),
            broker_key: dir.join("broker.key.pem"),
            message_key: dir.join("server.secret.json"),
            message_public: dir.join("server.pub.json"),
            dir,
        };
        if p.message_public.exists() {
            return Ok(p);
        }
        std::fs::create_dir_all(&p.ca_dir)?;
        let now = OffsetDateTime::now_utc();
        let ca = pki::create_ca("Millwright test fleet CA", now, 30)?;
        write(&p.ca_cert, &ca.cert_pem)?;
        write(&p.ca_dir.join("ca.key.pem"), &ca.key_pem)?;
        let issuer = Ca::load(&ca.cert_pem, &ca.key_pem)?;
        for (name, cert, key) in [
            ("millwright-server", &p.server_cert, &p.server_key),
            ("mosquitto", &p.broker_cert, &p.broker_key),
        ] {
            let mut leaf = Leaf::new(name, Usage::Server, now, 30);
            loopback(&mut leaf);
            let issued = issuer.issue(&leaf)?;
            write(cert, &issued.cert_pem)?;
            write(key, &issued.key_pem)?;
        }
        let message = crate::trust::key(crate::trust::SERVER_SEED);
        std::fs::write(&p.message_key, serde_json::to_vec(&SecretKeyFile::new(&message))?)?;
        let public = PublicKeyFile::new(&message.verifying_key());
        std::fs::write(&p.message_public, serde_json::to_vec(&public)?)?;
        Ok(p)
    }

    fn ca(&self) -> anyhow::Result<Ca> {
        let cert = std::fs::read_to_string(&self.ca_cert)?;
        let key = std::fs::read_to_string(self.ca_dir.join("ca.key.pem"))?;
        Ok(Ca::load(&cert, &key)?)
    }

    /// A client certificate of this fleet's CA for `common_name`, valid from `from` to `to`
    /// days from now (negative: in the past); files `<name>.crt.pem` and `<name>.key.pem`.
    pub fn client_cert(
        &self,
        name: &str,
        common_name: &str,
        from: i64,
        to: i64,
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        let now = OffsetDateTime::now_utc();
        let mut leaf = Leaf::new(common_name, Usage::Client, now, 1);
        leaf.not_before = now + Duration::days(from);
        leaf.not_after = now + Duration::days(to);
        let issued = self.ca()?.issue(&leaf)?;
        let (cert, key) =
            (self.dir.join(format!("{name}.crt.pem")), self.dir.join(format!("{name}.key.pem")));
        write(&cert, &issued.cert_pem)?;
        write(&key, &issued.key_pem)?;
        Ok((cert, key))
    }

    /// A client certificate for `common_name` signed by a CA the fleet never heard of.
    pub fn stranger_cert(&self, common_name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let now = OffsetDateTime::now_utc();
        let ca = pki::create_ca("Someone else's CA", now, 30)?;
        let issued = Ca::load(&ca.cert_pem, &ca.key_pem)?.issue(&Leaf::new(
            common_name,
            Usage::Client,
            now,
            30,
        ))?;
        let (cert, key) = (self.dir.join("stranger.crt.pem"), self.dir.join("stranger.key.pem"));
        write(&cert, &issued.cert_pem)?;
        write(&key, &issued.key_pem)?;
        Ok((cert, key))
    }
}
