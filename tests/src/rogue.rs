//! A test party on the broker that speaks the server's side of model delivery: it publishes
//! directives and roots it signed itself and answers chunk requests from a bundle it chooses,
//! optionally damaged, signing the chunks with a key it is given (the server's, to play a
//! server that sends bad chunks, or another, to play a forger). Devices must refuse whatever
//! it sends wrongly, on their own. It is an enrolled device of the fleet (`rogue-<device>`),
//! so the embedded broker lets it in, and it publishes where a broker without ACLs lets it.

use crate::Server;
use base64::Engine as _;
use ed25519_dalek::SigningKey;
use millwright_shared::signed::{self, Purpose};
use millwright_shared::topics;
use millwright_shared::wire::{self, Chunk, FetchRequest, WIRE_VERSION};
use rumqttc::{Client, Event, Packet, QoS};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How chunks are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    None,
    /// Every chunk's bytes are flipped (its hash no longer matches).
    FlipBytes,
    /// Every chunk carries 1 KiB more than it should.
    Oversize,
}

#[derive(Default)]
struct Offer {
    bundle: Vec<u8>,
    chunk_size: usize,
    sha256: String,
    damage: Option<Damage>,
    served: u64,
}

pub struct Rogue {
    client: Client,
    offer: Arc<Mutex<Offer>>,
}

impl Rogue {
    /// Enrolls itself with `server`, connects to its broker and serves chunk requests of
    /// `device`, signing chunks with `chunk_key`.
    pub fn start(server: &Server, device: &str, chunk_key: SigningKey) -> anyhow::Result<Rogue> {
        let identity = server.enroll(&format!("rogue-{device}"))?;
        let options = crate::mqtt_as(server.mqtt_port, &identity, None)?;
        let (client, mut connection) = Client::new(options, 100);
        let device_id = millwright_shared::DeviceId::new(device)?;
        client.subscribe(topics::fetch(&device_id), QoS::AtLeastOnce)?;
        let offer = Arc::new(Mutex::new(Offer::default()));
        let (responder, shared) = (client.clone(), offer.clone());
        std::thread::spawn(move || {
            for event in connection.iter() {
                let Ok(Event::Incoming(Packet::Publish(p))) = event else {
                    if event.is_err() {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    continue;
                };
                // The device signs its requests; the rogue reads them without checking.
                if signed::open(&p.payload).is_err() {
                    continue;
                }
                let body = &p.payload[signed::HEADER_BYTES..];
                let Ok(request) = FetchRequest::decode(body) else { continue };
                let mut offer = shared.lock().unwrap_or_else(|e| e.into_inner());
                if request.sha256 != offer.sha256 || offer.chunk_size == 0 {
                    continue;
                }
                for index in request.first..request.first + request.count {
                    let start = index as usize * offer.chunk_size;
                    if start >= offer.bundle.len() {
                        break;
                    }
                    let end = (start + offer.chunk_size).min(offer.bundle.len());
                    let mut data = offer.bundle[start..end].to_vec();
                    match offer.damage.unwrap_or(Damage::None) {
                        Damage::None => {}
                        Damage::FlipBytes => data.iter_mut().for_each(|b| *b ^= 0xff),
                        Damage::Oversize => data.extend(std::iter::repeat_n(0u8, 1024)),
                    }
                    offer.served += data.len() as u64;
                    let chunk = Chunk {
                        v: WIRE_VERSION,
                        sha256: offer.sha256.clone(),
                        index,
                        data: base64::engine::general_purpose::STANDARD.encode(&data),
                    };
                    let frame =
                        signed::seal(&chunk_key, Purpose::Chunk, &device_id, &wire::encode(&chunk));
                    let _ = responder.try_publish(
                        topics::chunk(&device_id),
                        QoS::AtLeastOnce,
                        false,
                        frame,
                    );
                }
            }
        });
        Ok(Rogue { client, offer })
    }

    /// Answers chunk requests for `bundle` (named by its SHA-256) from now on.
    pub fn offer(&self, bundle: &[u8], chunk_size: u32, damage: Damage) {
        let mut offer = self.offer.lock().unwrap_or_else(|e| e.into_inner());
        *offer = Offer {
            bundle: bundle.to_vec(),
            chunk_size: chunk_size as usize,
            sha256: millwright_shared::bundle::sha256_hex(bundle),
            damage: Some(damage),
            served: offer.served,
        };
    }

    /// Bytes of chunk data sent so far.
    pub fn served(&self) -> u64 {
        self.offer.lock().unwrap_or_else(|e| e.into_inner()).served
    }

    /// Publishes `payload` retained on `topic`.
    pub fn publish_retained(&self, topic: String, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client.publish(topic, QoS::AtLeastOnce, true, payload)?;
        Ok(())
    }
}
