//! Wiring and the ingest loop: embedded broker (optional), HTTP API, and one MQTT client whose
//! messages are validated ([`crate::ingest`]), stored ([`crate::db`]) and acknowledged. Stored
//! drift reports are checked against the retraining policy ([`crate::drift`]).

use crate::config::{Broker, Config};
use crate::db::Db;
use crate::drift::{self, Policy, Profiles, RetrainingEvent};
use crate::drift_db::Filter;
use crate::rollouts::{Request, Rollouts};
use crate::{http, ingest};
use anyhow::Context as _;
use millwright_agent::clock::now_ms;
use millwright_agent::mqtt::{self, MqttEvent};
use millwright_shared::topics::{self, Incoming};
use millwright_shared::wire::{self, DeviceStatus, RecordBody, Stream};
use millwright_shared::{ModelName, bundle};
use rumqttc::{AsyncClient, QoS};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Everything that wakes the ingest loop.
#[derive(Debug)]
enum Event {
    Mqtt(MqttEvent),
    Request(Box<Request>),
    Tick,
    Shutdown,
}

/// Where the server's MQTT client connects.
fn broker_address(broker: &Broker) -> anyhow::Result<(String, u16)> {
    match broker {
        #[cfg(feature = "embedded-broker")]
        Broker::Embedded(listen) => {
            crate::broker::start(*listen)?;
            let ip = if listen.ip().is_unspecified() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                listen.ip()
            };
            tracing::info!(%listen, "embedded MQTT broker listening");
            Ok((ip.to_string(), listen.port()))
        }
        #[cfg(not(feature = "embedded-broker"))]
        Broker::Embedded(_) => anyhow::bail!("this build has no embedded broker"),
        Broker::External { host, port } => Ok((host.clone(), *port)),
    }
}

/// What the ingest loop needs besides the database and the MQTT client.
struct Ingest {
    policy: Policy,
    webhook: Option<String>,
}

/// Verifies the configured bundles and keeps their drift reference profiles. A bundle that
/// fails is logged and left out; the server runs without its scores.
pub fn load_profiles(config: &Config) -> Profiles {
    let mut profiles = HashMap::new();
    let Some(trusted) = &config.trusted else { return Profiles(profiles) };
    for path in &config.bundles {
        let verified = std::fs::read(path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| Ok(bundle::verify(&bytes, trusted, millwright_agent::clock::now())?));
        match verified {
            Ok(v) => {
                let m = v.manifest();
                match &m.drift {
                    Some(profile) => {
                        tracing::info!(model = %m.model, release = m.release.0, "drift reference loaded");
                        profiles.insert((m.model.to_string(), m.release.0), profile.clone());
                    }
                    None => tracing::warn!(bundle = %path.display(), "bundle has no drift profile"),
                }
            }
            Err(e) => tracing::error!(bundle = %path.display(), "bundle rejected: {e:#}"),
        }
    }
    Profiles(profiles)
}

/// Runs the server until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let path = config.data_dir.join("server.sqlite");
    let mut db = Db::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = Db::open_reader(&path)?;
    let (host, port) = tokio::task::block_in_place(|| broker_address(&config.broker))?;

    let broker_connected = Arc::new(AtomicBool::new(false));
    let profiles = Arc::new(std::sync::RwLock::new(load_profiles(&config)));
    let mut rollouts =
        config.rollouts.clone().map(|r| Rollouts::new(r, &config.data_dir, profiles.clone()));
    if let Some(r) = &rollouts {
        r.load_profiles(&db);
    }
    let (request_tx, mut request_rx) = mpsc::channel(64);
    let api = http::router(http::ApiState {
        db: Arc::new(Mutex::new(reader)),
        broker_connected: broker_connected.clone(),
        profiles,
        requests: Some(request_tx),
        users: Arc::new(config.users.clone()),
        served: rollouts.as_ref().map(|r| r.served.clone()).unwrap_or_default(),
    });
    let ingest = Ingest { policy: config.retraining, webhook: config.webhook.clone() };
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_listen))?;
    let http_addr: SocketAddr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, api).await {
            tracing::error!("http server stopped: {e}");
        }
    });
    tracing::info!(%http_addr, "HTTP API listening");

    let (tx, mut rx) = mpsc::channel(4096);
    let client = mqtt::start(
        mqtt::Connect {
            client_id: config.client_id.clone(),
            host: host.clone(),
            port,
            keep_alive: Duration::from_secs(10),
            reconnect_max: Duration::from_secs(5),
            last_will: None,
        },
        tx,
    );
    tracing::info!(broker = %format!("{host}:{port}"), "server started");

    let tick_every = rollouts.as_ref().map_or(Duration::from_secs(3600), Rollouts::tick);
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            biased;
            _ = &mut shutdown => Event::Shutdown,
            Some(e) = rx.recv() => Event::Mqtt(e),
            Some(r) = request_rx.recv() => Event::Request(Box::new(r)),
            _ = tick.tick() => Event::Tick,
        };
        match event {
            Event::Shutdown => break,
            Event::Tick => {
                if let Some(r) = &mut rollouts {
                    tokio::task::block_in_place(|| r.on_tick(&mut db, &client, now_ms()));
                }
            }
            Event::Request(request) => match (*request, &mut rollouts) {
                (Request::AckAlert { device, seq, actor, note, reply }, _) => {
                    let result = tokio::task::block_in_place(|| {
                        crate::rollouts::acknowledge(&mut db, &device, seq, &actor, &note, now_ms())
                    });
                    let _ = reply.send(result);
                }
                (request, Some(r)) => r.handle(&mut db, &client, request, now_ms()).await,
                (request, None) => request.refuse_unconfigured(),
            },
            Event::Mqtt(MqttEvent::Connected) => {
                broker_connected.store(true, Ordering::Relaxed);
                tracing::info!("connected to broker");
                for filter in [topics::UPLINK_FILTER, topics::STATUS_FILTER] {
                    let _ = client.subscribe(filter, QoS::AtLeastOnce).await;
                }
                if let Some(r) = &rollouts {
                    tokio::task::block_in_place(|| r.on_connected(&db, &client));
                }
            }
            Event::Mqtt(MqttEvent::Disconnected(_)) => {
                broker_connected.store(false, Ordering::Relaxed)
            }
            Event::Mqtt(MqttEvent::Message { topic, payload }) => {
                on_message(&mut db, &client, &ingest, rollouts.as_mut(), &topic, &payload).await
            }
        }
    }
    let _ = client.disconnect().await;
    tracing::info!("server stopped");
    Ok(())
}

async fn on_message(
    db: &mut Db,
    client: &AsyncClient,
    ingest: &Ingest,
    mut rollouts: Option<&mut Rollouts>,
    topic: &str,
    payload: &[u8],
) {
    match topics::parse(topic) {
        Some(Incoming::Uplink { device, stream }) => {
            let batch = match ingest::accept(&device, stream, payload) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(%device, topic, "rejected uplink message: {e}");
                    return;
                }
            };
            let stored = tokio::task::block_in_place(|| db.store(&batch, now_ms()));
            match stored {
                Ok(ack) => {
                    let _ = client
                        .publish(topics::ack(&device), QoS::AtLeastOnce, false, wire::encode(&ack))
                        .await;
                    if stream == Stream::Drift {
                        let releases: BTreeSet<(ModelName, u64)> = batch
                            .records
                            .iter()
                            .filter_map(|r| match &r.body {
                                RecordBody::Drift(d) => Some((d.model.clone(), d.release.0)),
                                _ => None,
                            })
                            .collect();
                        for (model, release) in releases {
                            check_retraining(db, client, ingest, model.as_str(), release).await;
                        }
                    }
                    if let Some(r) = rollouts.as_deref_mut() {
                        for record in &batch.records {
                            if let RecordBody::Update(report) = &record.body {
                                tokio::task::block_in_place(|| {
                                    r.on_report(db, client, device.as_str(), report, now_ms())
                                });
                            }
                        }
                    }
                }
                Err(e) => tracing::error!(%device, "cannot store batch (not acknowledged): {e}"),
            }
        }
        Some(Incoming::Status { device }) => match DeviceStatus::decode(payload) {
            Ok(status) if status.device == device => {
                if let Err(e) = tokio::task::block_in_place(|| db.set_status(&status, now_ms())) {
                    tracing::error!(%device, "cannot store device status: {e}");
                }
                if status.online
                    && let Some(r) = rollouts.as_deref_mut()
                {
                    tokio::task::block_in_place(|| {
                        r.on_device_online(db, client, device.as_str(), now_ms())
                    });
                }
            }
            Ok(status) => {
                tracing::warn!(%device, claimed = %status.device, "status claims another device's identity")
            }
            Err(e) => tracing::warn!(%device, "rejected status message: {e}"),
        },
        Some(Incoming::Fetch { device }) => match rollouts {
            Some(r) => r.on_fetch(db, client, &device, payload),
            None => tracing::debug!(%device, "chunk request, but rollouts are not configured"),
        },
        None => tracing::debug!(topic, "ignoring message on an unknown topic"),
    }
}

/// Raises a retraining event when a release's drift has persisted past the policy: stored,
/// published (retained) on MQTT and POSTed to the webhook if one is configured.
async fn check_retraining(
    db: &mut Db,
    client: &AsyncClient,
    ingest: &Ingest,
    model: &str,
    release: u64,
) {
    let policy = ingest.policy;
    let raised = tokio::task::block_in_place(|| {
        let filter =
            Filter { model: Some(model.to_owned()), release: Some(release), ..Default::default() };
        let recent = db.drift_latest(&filter, policy.persist_reports)?;
        let evidence = drift::persistent(&recent, &policy);
        if evidence.is_empty() {
            return Ok(None);
        }
        let reason = format!(
            "drift persisted for {} consecutive reports on at least {} device(s)",
            policy.persist_reports, policy.min_devices
        );
        db.raise_retraining(model, release, evidence, &reason, now_ms())
    });
    let event = match raised {
        Ok(Some(event)) => event,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(model, release, "cannot evaluate the retraining policy: {e}");
            return;
        }
    };
    let features: Vec<&str> = event.features.iter().map(|f| f.feature.as_str()).collect();
    tracing::warn!(model, release, ?features, id = event.id, "retraining recommended");
    let body = serde_json::to_vec(&event).unwrap_or_default();
    let _ = client.publish(topics::RETRAINING, QoS::AtLeastOnce, true, body).await;
    if let Some(url) = ingest.webhook.clone() {
        tokio::task::spawn_blocking(move || post_webhook(&url, &event));
    }
}

fn post_webhook(url: &str, event: &RetrainingEvent) {
    let result = ureq::post(url).timeout(Duration::from_secs(10)).send_json(event);
    match result {
        Ok(_) => tracing::info!(url, id = event.id, "retraining event posted to the webhook"),
        Err(e) => tracing::error!(url, id = event.id, "webhook failed: {e}"),
    }
}
