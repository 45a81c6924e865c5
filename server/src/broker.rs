//! The embedded MQTT broker (rumqttd), for one-command installs. It runs on its own threads;
//! production fleets point the server at an external broker instead.
//!
//! With the server's TLS files it listens with TLS and requires a client certificate chained
//! to the fleet CA. The TLS is ours, not rumqttd's: rumqttd's accept loop waits for each
//! connection's handshake before it accepts the next, with no time limit, so one silent TCP
//! connection kept every gateway out. Here each handshake runs in its own task, bounded by
//! [`millwright_io::https::HANDSHAKE_TIMEOUT`], and a connection that completes it is relayed to rumqttd listening in
//! plain on a loopback port of its own. Every connection must also log in: the user name is the device id (or the
//! server's), the client id must be `millwright-<device>` (or the device id), and the password
//! is that party's signature over the client id ([`millwright_shared::signed::connect_password`]),
//! checked against the device registry. So unknown and revoked devices are refused at connect,
//! and nobody can take over another party's client id. rumqttd has no topic ACLs: what a
//! connected device may *say* is decided by the server's gate, not by the broker.

use crate::config::TlsFiles;
use crate::identity::{SERVER_USER, SharedRegistry};
use anyhow::Context as _;
use ed25519_dalek::VerifyingKey;
use millwright_shared::DeviceId;
use millwright_shared::refusals::Refusals;
use millwright_shared::signed;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Who may connect.
#[derive(Clone)]
pub struct Logins {
    pub registry: SharedRegistry,
    /// The server's own message key and client id.
    pub server_key: VerifyingKey,
    pub server_client_id: String,
    pub refusals: Arc<Mutex<Refusals>>,
}

impl Logins {
    /// Whether a CONNECT with these credentials may proceed; refusals are counted.
    pub fn check(&self, client_id: &str, user: &str, password: &str) -> Result<(), &'static str> {
        let server = || DeviceId::new(SERVER_USER).map_err(|_| "bad_login");
        let verdict = if user == SERVER_USER {
            match client_id == self.server_client_id {
                true => signed::check_connect_password(
                    &self.server_key,
                    &server()?,
                    client_id,
                    password,
                )
                .map_err(|_| "bad_login"),
                false => Err("client_id_taken"),
            }
        } else {
            self.check_device(client_id, user, password)
        };
        if let Err(reason) = verdict {
            let now_ms = millwright_io::clock::now_ms();
            let log = self.refusals.lock().map(|mut r| r.refuse(reason, user, now_ms));
            if log.unwrap_or(false) {
                tracing::warn!(user = %millwright_shared::wire::clean_text(user, 64), reason, "embedded broker refused a connection");
            }
        }
        verdict
    }

    fn check_device(
        &self,
        client_id: &str,
        user: &str,
        password: &str,
    ) -> Result<(), &'static str> {
        let device = DeviceId::new(user).map_err(|_| "unknown_device")?;
        if device.is_reserved() {
            return Err("unknown_device");
        }
        if client_id != device.as_str() && client_id != format!("millwright-{device}") {
            return Err("client_id_taken");
        }
        let key = self
            .registry
            .read()
            .map_err(|_| "unknown_device")?
            .active_key(&device)
            .map_err(|e| e.reason())?;
        signed::check_connect_password(&key, &device, client_id, password).map_err(|_| "bad_login")
    }
}

/// Starts the broker on `listen` and waits until it accepts connections: with `tls`, our TLS
/// listener there in front of rumqttd on a loopback port. Called within the tokio runtime.
pub fn start(listen: SocketAddr, tls: Option<&TlsFiles>, logins: Logins) -> anyhow::Result<()> {
    let Some(files) = tls else { return start_rumqttd(listen, logins) };
    let acceptor = {
        let config = millwright_io::tls::server_config(&files.cert, &files.key, Some(&files.ca))?;
        let mut config = (*config).clone();
        config.alpn_protocols.clear();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    };
    let front = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen} for the embedded broker"))?;
    front.set_nonblocking(true)?;
    let front = tokio::net::TcpListener::from_std(front)?;
    let inner = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?.local_addr()?;
    start_rumqttd(inner, logins)?;
    tokio::spawn(relay(front, acceptor, inner));
    Ok(())
}

/// Accepts at once, shakes hands in a task per connection, relays each that succeeds.
async fn relay(
    front: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    inner: SocketAddr,
) {
    loop {
        let (tcp, peer) = millwright_io::https::accept(&front).await;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Some(mut tls) = millwright_io::https::handshake(&acceptor, tcp, peer).await else {
                return;
            };
            let mut broker = match tokio::net::TcpStream::connect(inner).await {
                Ok(b) => b,
                Err(e) => return tracing::error!("embedded broker unreachable on {inner}: {e}"),
            };
            let _ = broker.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
        });
    }
}

/// rumqttd in plain TCP on `listen`, on its own threads; returns once it accepts connections.
fn start_rumqttd(listen: SocketAddr, logins: Logins) -> anyhow::Result<()> {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: millwright_io::mqtt::MAX_PACKET_BYTES,
        max_inflight_count: 200,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    connections.set_auth_handler(move |client_id: String, user: String, password: String| {
        let verdict = logins.check(&client_id, &user, &password);
        async move { verdict.is_ok() }
    });
    let server = ServerSettings {
        name: "v4-1".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4-1".to_owned(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new().name("embedded-broker".into()).spawn(move || {
        let mut broker = Broker::new(config);
        if let Err(e) = broker.start() {
            tracing::error!("embedded broker stopped: {e}");
        }
    })?;
    for _ in 0..100 {
        if std::net::TcpStream::connect_timeout(&probe_address(listen), Duration::from_millis(200))
            .is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("embedded broker did not start listening on {listen}")
}

fn probe_address(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    }
}
