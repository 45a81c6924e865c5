//! The embedded MQTT broker (rumqttd), for one-command installs. It runs on its own threads;
//! production fleets point the server at an external broker instead.

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// Starts the broker on `listen` and waits until it accepts connections.
pub fn start(listen: SocketAddr) -> anyhow::Result<()> {
    let server = ServerSettings {
        name: "v4-1".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: millwright_agent::mqtt::MAX_PACKET_BYTES,
            max_inflight_count: 200,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
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
        if mqtt_handshake(listen).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("embedded broker did not start listening on {listen}")
}

/// A complete MQTT 3.1.1 CONNECT / CONNACK / DISCONNECT exchange, so readiness probes do not
/// show up in the broker's log as aborted connections.
fn mqtt_handshake(listen: SocketAddr) -> std::io::Result<()> {
    use std::io::{Read as _, Write as _};
    const CONNECT: [u8; 22] = [
        0x10, 20, // CONNECT, remaining length
        0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0,
        10, // protocol, level 4, clean session, keep-alive
        0, 8, b'm', b'w', b'-', b'p', b'r', b'o', b'b', b'e', // client id
    ];
    let addr = if listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    };
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(&CONNECT)?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::other("broker refused the probe"));
    }
    stream.write_all(&[0xE0, 0])
}
