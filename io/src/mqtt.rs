//! The rumqttc adapter: one connection to a broker, plain TCP or TLS with a client
//! certificate, polled by its own task, which reports connection changes and incoming messages
//! to its owner's loop and reconnects with exponential backoff and full jitter (each wait drawn
//! at random up to the backoff, so a fleet that lost its broker at once does not come back at
//! once). Used by the agent and the server.
//!
//! A broker can also accept a connection and then make no progress: it answers pings but
//! acknowledges no publish (a half-open link, a wedged broker, a proxy in trouble). The driver
//! watches its QoS 1 publishes; when the oldest has waited `stall_after` for its PUBACK, it says
//! so ([`MqttEvent::Stalled`]), drops the connection and connects again.
//!
//! Subscriptions are the driver's too ([`Connect::subscriptions`]): made on each connection
//! before anything else goes out. Asked for through the client instead, one could wait behind
//! a full window of unacknowledged publishes, be dropped with them at a reconnect, or be
//! refused by a full request queue, and the party would stay connected and hear nothing.

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, Request, Subscribe,
    TlsConfiguration,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Largest MQTT packet either side sends; an uplink batch of 500 records is ~80 KB.
pub const MAX_PACKET_BYTES: usize = 4 << 20;

/// A publish that has waited this long for its PUBACK means the connection makes no progress.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub enum MqttEvent {
    Connected,
    Disconnected(String),
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// The broker kept the connection but acknowledged no publish for `waited`: the driver
    /// drops the connection and reconnects (a `Disconnected` follows).
    Stalled {
        waited: Duration,
    },
    /// The first PUBACK after a stall: the broker makes progress again.
    Flowing,
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
    /// The longest a QoS 1 publish may wait for its PUBACK before the connection is dropped
    /// and made again ([`DEFAULT_STALL_AFTER`]). Checked whenever the connection yields an
    /// event, at the latest every keep-alive (pings go out regardless of traffic).
    pub stall_after: Duration,
    /// Topic filters subscribed (QoS 1) on every connection, by the driver itself, ahead of
    /// anything its owner queued: a subscription never waits behind publishes the broker has
    /// not acknowledged, and a full request queue cannot lose it.
    pub subscriptions: Vec<String>,
    /// Publishes the client holds for the connection before `try_publish` refuses more
    /// ([`DEFAULT_QUEUE`] for a gateway).
    pub queue: usize,
    /// QoS 1 publishes sent and not yet acknowledged by the broker at most ([`DEFAULT_INFLIGHT`]
    /// for a gateway); past it the client sends nothing until a PUBACK comes, so it bounds
    /// what one connection can send per round trip.
    pub inflight: u16,
}

/// rumqttc's default window: plenty for a gateway's few batches in flight.
pub const DEFAULT_INFLIGHT: u16 = 100;

/// A gateway's request queue: a few batches, statuses and chunk requests at a time.
pub const DEFAULT_QUEUE: usize = 256;

/// Starts the connection task; events arrive on `events` until the client is dropped.
pub fn start(connect: Connect, events: mpsc::Sender<MqttEvent>) -> AsyncClient {
    let mut options = MqttOptions::new(connect.client_id, connect.host, connect.port);
    options.set_keep_alive(connect.keep_alive);
    options.set_clean_session(true);
    options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    options.set_inflight(connect.inflight.max(1));
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
    let (client, mut eventloop) = AsyncClient::new(options, connect.queue.max(1));
    // Small messages that wait for an answer (a batch for its ack, an ack for the next batch)
    // go out at once: with Nagle's algorithm each waited for the peer's delayed ACK, ~40 ms a
    // hop, ~88 ms per batch and its ack through a broker (`millwright simulate` measured it).
    eventloop.network_options.set_tcp_nodelay(true);
    let subscriptions = connect.subscriptions;
    tokio::spawn(drive(
        eventloop,
        events,
        connect.reconnect_max,
        connect.stall_after,
        subscriptions,
    ));
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

/// The publishes a connection has sent and the broker has not acknowledged yet.
#[derive(Debug, Default)]
struct Unacked {
    sent: HashMap<u16, Instant>,
    /// A stall was reported and no PUBACK has arrived since.
    stalled: bool,
}

impl Unacked {
    fn sent(&mut self, pkid: u16, now: Instant) {
        if pkid != 0 {
            self.sent.entry(pkid).or_insert(now);
        }
    }

    /// A PUBACK: true if it is the first since a stall.
    fn acked(&mut self, pkid: u16) -> bool {
        self.sent.remove(&pkid);
        std::mem::replace(&mut self.stalled, false)
    }

    /// How long the oldest publish has waited, if that is `limit` or more.
    fn stalled_for(&self, now: Instant, limit: Duration) -> Option<Duration> {
        let oldest = self.sent.values().min()?;
        let waited = now.saturating_duration_since(*oldest);
        (waited >= limit).then_some(waited)
    }

    /// A new connection starts with nothing in flight (clean session).
    fn reset(&mut self) {
        self.sent.clear();
    }

    /// After a stall, a connection that has had nothing waiting for `limit` since it was made
    /// counts as flowing too (an idle party has no PUBACK to show): true once, then.
    fn idle_since_stall(&mut self, connected_for: Duration, limit: Duration) -> bool {
        let idle = self.stalled && self.sent.is_empty() && connected_for >= limit;
        if idle {
            self.stalled = false;
        }
        idle
    }
}

async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::Sender<MqttEvent>,
    max: Duration,
    stall_after: Duration,
    subscriptions: Vec<String>,
) {
    let mut backoff = BACKOFF_START;
    let mut connected = false;
    let mut unacked = Unacked::default();
    let mut connected_at = Instant::now();
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff = BACKOFF_START;
                unacked.reset();
                connected_at = Instant::now();
                // A new (clean) session: the pending queue was emptied on connect, and it goes
                // out before the request queue, whatever the publish window holds.
                for filter in &subscriptions {
                    let subscribe = Subscribe::new(filter.clone(), QoS::AtLeastOnce);
                    eventloop.pending.push_front(Request::Subscribe(subscribe));
                }
                Some(MqttEvent::Connected)
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                Some(MqttEvent::Message { topic: p.topic, payload: p.payload.to_vec() })
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                unacked.sent(pkid, Instant::now());
                None
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => unacked.acked(ack.pkid).then(|| {
                tracing::info!("the broker acknowledges publishes again");
                MqttEvent::Flowing
            }),
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => None,
            Err(e) => {
                if connected {
                    tracing::warn!(error = %e, "broker connection lost");
                } else {
                    tracing::debug!(error = %e, retry_in = ?backoff, "broker unreachable");
                }
                unacked.reset();
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
        if let Some(event) = event
            && events.send(event).await.is_err()
        {
            return;
        }
        if connected && unacked.idle_since_stall(connected_at.elapsed(), stall_after) {
            tracing::info!("nothing waits for the broker since the stall");
            if events.send(MqttEvent::Flowing).await.is_err() {
                return;
            }
        }
        if let Some(waited) = unacked.stalled_for(Instant::now(), stall_after) {
            tracing::warn!(
                waited_secs = waited.as_secs(),
                unacked = unacked.sent.len(),
                "the broker acknowledges no publish: reconnecting"
            );
            unacked.reset();
            unacked.stalled = true;
            connected = false;
            // Drops the connection; the next poll connects again.
            eventloop.clean();
            for event in [
                MqttEvent::Stalled { waited },
                MqttEvent::Disconnected(format!("no PUBACK for {} s", waited.as_secs())),
            ] {
                if events.send(event).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unacknowledged_publish_decides_a_stall() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(30);
        let mut u = Unacked::default();
        assert_eq!(u.stalled_for(t0 + limit * 9, limit), None, "nothing sent, nothing waits");
        u.sent(1, t0);
        u.sent(2, t0 + Duration::from_secs(20));
        u.sent(0, t0); // QoS 0 has no packet id and no PUBACK
        u.sent(1, t0 + Duration::from_secs(25)); // a retransmission keeps its first time
        assert_eq!(u.stalled_for(t0 + Duration::from_secs(29), limit), None);
        assert_eq!(u.stalled_for(t0 + limit, limit), Some(limit));
        assert!(!u.acked(1), "no stall was reported");
        assert_eq!(u.stalled_for(t0 + Duration::from_secs(45), limit), None, "2 waited 25 s");
        assert_eq!(
            u.stalled_for(t0 + Duration::from_secs(50), limit),
            Some(Duration::from_secs(30))
        );
        u.reset();
        u.stalled = true;
        assert_eq!(u.stalled_for(t0 + limit * 9, limit), None, "a new connection owes nothing");
        assert!(u.acked(7), "the first PUBACK after a stall says the broker flows again");
        assert!(!u.acked(8));
        u.stalled = true;
        u.sent(9, t0);
        assert!(!u.idle_since_stall(limit, limit), "a publish still waits");
        u.acked(9);
        u.stalled = true;
        assert!(!u.idle_since_stall(limit / 2, limit), "not connected long enough yet");
        assert!(u.idle_since_stall(limit, limit), "connected a while with nothing waiting");
        assert!(!u.idle_since_stall(limit * 2, limit), "said once");
    }

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
