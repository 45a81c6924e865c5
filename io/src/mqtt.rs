//! The rumqttc adapter: one connection to a broker, plain TCP or TLS with a client
//! certificate, polled by its own task, which reports connection changes and incoming messages
//! to its owner's loop and reconnects with exponential backoff and full jitter (each wait drawn
//! at random up to the backoff, so a fleet that lost its broker at once does not come back at
//! once). Used by the agent and the server.

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, TlsConfiguration,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Largest MQTT packet either side sends; an uplink batch of 500 records is ~80 KB.
pub const MAX_PACKET_BYTES: usize = 4 << 20;

#[derive(Debug)]
pub enum MqttEvent {
    Connected,
    Disconnected(String),
    Message { topic: String, payload: Vec<u8> },
}

/// How the bytes travel.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plain TCP (loopback, or where the configuration allows plaintext).
    Tcp,
    /// TLS: the broker's certificate checked against the fleet CA, this party's client
    /// certificate presented ([`crate::tls::client_config`]).
    Tls(Arc<rustls::ClientConfig>),
}

/// Connection parameters for [`start`].
#[derive(Debug, Clone)]
pub struct Connect {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub transport: Transport,
    /// MQTT user name and password: the embedded broker checks them against the device
    /// registry (the password is a signature by the device key, see `shared::signed`).
    pub credentials: Option<(String, String)>,
    pub keep_alive: Duration,
    pub reconnect_max: Duration,
    /// Retained message the broker publishes if the connection dies.
    pub last_will: Option<(String, Vec<u8>)>,
}

/// Starts the connection task; events arrive on `events` until the client is dropped.
pub fn start(connect: Connect, events: mpsc::Sender<MqttEvent>) -> AsyncClient {
    let mut options = MqttOptions::new(connect.client_id, connect.host, connect.port);
    options.set_keep_alive(connect.keep_alive);
    options.set_clean_session(true);
    options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    if let Transport::Tls(config) = connect.transport {
        options
            .set_transport(rumqttc::Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    if let Some((user, password)) = connect.credentials {
        options.set_credentials(user, password);
    }
    if let Some((topic, payload)) = connect.last_will {
        options.set_last_will(LastWill::new(topic, payload, QoS::AtLeastOnce, true));
    }
    let (client, eventloop) = AsyncClient::new(options, 256);
    tokio::spawn(drive(eventloop, events, connect.reconnect_max));
    client
}

/// The first reconnect waits up to this long; each failed attempt doubles it, up to the
/// configured maximum.
const BACKOFF_START: Duration = Duration::from_millis(200);

/// Full jitter: a wait drawn uniformly from `[0, backoff]` by `random`.
fn full_jitter(backoff: Duration, random: u64) -> Duration {
    let ms = backoff.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(random % ms.saturating_add(1))
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // Without randomness the wait is the whole backoff: still bounded, only less spread.
    if getrandom::getrandom(&mut bytes).is_err() {
        return u64::MAX;
    }
    u64::from_le_bytes(bytes)
}

async fn drive(mut eventloop: EventLoop, events: mpsc::Sender<MqttEvent>, max: Duration) {
    let mut backoff = BACKOFF_START;
    let mut connected = false;
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff = BACKOFF_START;
                MqttEvent::Connected
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                MqttEvent::Message { topic: p.topic, payload: p.payload.to_vec() }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(e) => {
                if connected {
                    tracing::warn!(error = %e, "broker connection lost");
                } else {
                    tracing::debug!(error = %e, retry_in = ?backoff, "broker unreachable");
                }
                let was_connected = std::mem::replace(&mut connected, false);
                if events.send(MqttEvent::Disconnected(e.to_string())).await.is_err() {
                    return;
                }
                tokio::time::sleep(full_jitter(backoff, random_u64())).await;
                if !was_connected {
                    backoff = (backoff * 2).min(max.max(BACKOFF_START));
                }
                continue;
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_draws_from_zero_to_the_backoff() {
        let b = Duration::from_millis(800);
        assert_eq!(full_jitter(b, 0), Duration::ZERO);
        assert_eq!(full_jitter(b, 800), b);
        assert_eq!(full_jitter(b, 801), Duration::ZERO);
        assert_eq!(full_jitter(b, u64::MAX), Duration::from_millis(u64::MAX % 801));
        let waits: Vec<Duration> = (0..1000).map(|_| full_jitter(b, random_u64())).collect();
        assert!(waits.iter().all(|w| *w <= b));
        let spread =
            waits.iter().max().unwrap().as_millis() - waits.iter().min().unwrap().as_millis();
        assert!(spread > 600, "1,000 draws spread over {spread} ms of 800");
    }
}
