//! Wiring and the ingest loop: embedded broker (optional), HTTP API, and one MQTT client whose
//! messages pass the identity gate ([`crate::identity`]), are validated ([`crate::ingest`]),
//! stored ([`crate::db`]; many messages per transaction, see [`Group`]) and acknowledged with
//! a signed ack once committed. Stored drift reports are judged
//! against their profile ([`crate::drift::judge`]) and checked against the retraining policy.
//! Retained messages on topics only the server may set (directives, the trust root) are put
//! back when anyone else overwrites them.

use crate::config::{Broker, Config};
use crate::db::{Db, Write, Written};
use crate::drift::{self, Policy, Profiles, RetrainingEvent};
use crate::identity::{self, Admitted, Gate, SERVER_USER, SharedRegistry, Verdict};
use crate::rollouts::Rollouts;
use crate::writer::{Request, db_error, refuse};
use crate::{http, ingest};
use anyhow::Context as _;
use ed25519_dalek::SigningKey;
use millwright_io::clock::now_ms;
use millwright_io::mqtt::{self, MqttEvent};
use millwright_shared::drift::DriftSettings;
use millwright_shared::refusals::Refusals;
use millwright_shared::signed::{self, Purpose};
use millwright_shared::topics::{self, Incoming};
use millwright_shared::wire::{self, DeviceStatus, RecordBody, Stream};
use millwright_shared::{DeviceId, ModelName, bundle};
use rumqttc::{AsyncClient, QoS};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// Everything that wakes the ingest loop.
#[derive(Debug)]
enum Event {
    Mqtt(MqttEvent),
    Request(Box<Request>),
    Tick,
    /// Messages that waited for their device's budget may go on.
    Due,
    Shutdown,
}

/// Where the server's MQTT client connects: host, port, and whether over TLS.
fn broker_address(
    config: &Config,
    logins: crate::broker::Logins,
) -> anyhow::Result<(String, u16, bool)> {
    let tls = config.identity.tls.is_some();
    match &config.broker {
        #[cfg(feature = "embedded-broker")]
        Broker::Embedded(listen) => {
            crate::broker::start(*listen, config.identity.tls.as_ref(), logins)?;
            let ip = if listen.ip().is_unspecified() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                listen.ip()
            };
            let scheme = if tls { "mqtts" } else { "mqtt" };
            tracing::info!(%listen, "embedded MQTT broker listening ({scheme})");
            Ok((ip.to_string(), listen.port(), tls))
        }
        #[cfg(not(feature = "embedded-broker"))]
        Broker::Embedded(_) => {
            let _ = logins;
            anyhow::bail!("this build has no embedded broker")
        }
        Broker::External(address) => Ok((address.host.clone(), address.port, address.tls)),
    }
}

/// What the ingest loop needs besides the database and the MQTT client.
struct Ingest {
    policy: Policy,
    webhook: Option<String>,
    gate: Gate,
    server_key: SigningKey,
    refusals: Arc<Mutex<Refusals>>,
    profiles: Arc<RwLock<Profiles>>,
    identity: crate::config::Identity,
    broker: Arc<http::BrokerLink>,
}

impl Ingest {
    /// Queues a publish without waiting: a broker that takes nothing must not stop the loop
    /// (or the API writes behind it). What does not fit the client's queue is counted and
    /// given up; acks are resent for when the device sends its batch again.
    fn publish(&self, client: &AsyncClient, topic: String, retain: bool, payload: Vec<u8>) {
        if client.try_publish(topic, QoS::AtLeastOnce, retain, payload).is_err() {
            let n = self.broker.publishes_dropped.fetch_add(1, Ordering::Relaxed);
            if n == 0 || (n + 1).is_power_of_two() {
                tracing::warn!(
                    dropped = n + 1,
                    "the MQTT client's queue is full: publishes are given up, not waited for"
                );
            }
        }
    }

    /// Counts a refusal; logs it the first time for this source lately.
    fn refuse(&self, reason: &'static str, source: &str, detail: impl std::fmt::Display) {
        let log = self.refusals.lock().map(|mut r| r.refuse(reason, source, now_ms()));
        if log.unwrap_or(false) {
            tracing::warn!(reason, source, "refused: {detail}");
        }
    }
}

/// Verifies the configured bundles and keeps their drift reference profiles. A bundle that
/// fails is logged and left out; the server runs without its scores.
pub fn load_profiles(config: &Config) -> Profiles {
    let mut profiles = HashMap::new();
    let Some(trusted) = &config.trusted else { return Profiles(profiles) };
    for path in &config.bundles {
        let verified = std::fs::read(path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| Ok(bundle::verify(&bytes, trusted, millwright_io::clock::now())?));
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
    let registry: SharedRegistry = Arc::new(RwLock::new(db.registry()?));
    // Retention runs beside ingest on a connection of its own; it stops when this sender goes
    // (when `run` returns).
    let retention = Arc::new(Mutex::new(crate::retention::Report::default()));
    let (_retention_stop, stop) = std::sync::mpsc::channel::<()>();
    crate::retention_db::spawn(path.clone(), config.retention, retention.clone(), stop)
        .context("cannot start the retention thread")?;
    // The ACL file follows the registry and this config from the start.
    refresh_acl(&db, &config.identity);
    let refusals = Arc::new(Mutex::new(Refusals::default()));
    let server_key = config.identity.server_key.clone();
    let logins = crate::broker::Logins {
        registry: registry.clone(),
        server_key: server_key.verifying_key(),
        server_client_id: config.client_id.clone(),
        refusals: refusals.clone(),
    };
    let (host, port, tls) = tokio::task::block_in_place(|| broker_address(&config, logins))?;

    let broker = Arc::new(http::BrokerLink::default());
    let queued = Arc::new(AtomicU64::new(0));
    let profiles = Arc::new(RwLock::new(load_profiles(&config)));
    let mut rollouts =
        config.rollouts.clone().map(|r| Rollouts::new(r, &config.data_dir, profiles.clone()));
    if let Some(r) = &rollouts {
        r.load_profiles(&db);
        if r.root_expired() {
            tracing::error!(
                "the configured trust root has expired: gateways refuse its directives; sign \
                 and install a newer root version (millwright root sign)"
            );
        }
    }
    let (request_tx, mut request_rx) = mpsc::channel(64);
    let http_tls = match &config.identity.tls {
        Some(t) => Some(millwright_io::tls::server_config(&t.cert, &t.key, None)?),
        None => None,
    };
    let api = http::router(http::ApiState {
        db: Arc::new(http::ReadPool::new(path.clone())),
        broker: broker.clone(),
        profiles: profiles.clone(),
        requests: Some(request_tx),
        users: Arc::new(config.users.clone()),
        served: rollouts.as_ref().map(|r| r.served.clone()).unwrap_or_default(),
        delivery: rollouts.as_ref().map(Rollouts::delivery),
        lockout: Arc::new(Mutex::new(millwright_shared::lockout::Lockout::new(Default::default()))),
        refusals: refusals.clone(),
        queued: queued.clone(),
        registry: registry.clone(),
        server_key: hex::encode(server_key.verifying_key().as_bytes()),
        https: http_tls.is_some(),
        metrics_cache: Default::default(),
        retention,
    });
    let mut ingest = Ingest {
        policy: config.retraining,
        webhook: config.webhook.clone(),
        gate: Gate::new(registry.clone(), identity::Limits::default()),
        server_key: server_key.clone(),
        refusals: refusals.clone(),
        profiles,
        identity: config.identity.clone(),
        broker: broker.clone(),
    };
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_listen))?;
    let http_addr: SocketAddr = listener.local_addr()?;
    let scheme = if http_tls.is_some() { "https" } else { "http" };
    tokio::spawn(async move {
        if let Err(e) = millwright_io::https::serve(listener, http_tls, api).await {
            tracing::error!("http server stopped: {e}");
        }
    });
    tracing::info!(%http_addr, "{scheme} API listening");

    let transport = match (tls, &config.identity.tls) {
        (true, Some(t)) => {
            let client =
                millwright_io::tls::ClientIdentity { cert: t.cert.clone(), key: t.key.clone() };
            mqtt::Transport::Tls(millwright_io::tls::client_config(&t.ca, Some(&client))?)
        }
        (true, None) => anyhow::bail!("the broker is mqtts:// but [identity] has no TLS files"),
        (false, _) => mqtt::Transport::Tcp,
    };
    let server_id = DeviceId::new(SERVER_USER)?;
    let password = signed::connect_password(&server_key, &server_id, &config.client_id);
    let (tx, mut rx) = mpsc::channel(4096);
    let client = mqtt::start(
        mqtt::Connect {
            client_id: config.client_id.clone(),
            host: host.clone(),
            port,
            transport,
            credentials: Some((SERVER_USER.to_owned(), password)),
            keep_alive: Duration::from_secs(10),
            reconnect_max: Duration::from_secs(5),
            last_will: None,
            stall_after: mqtt::DEFAULT_STALL_AFTER,
            subscriptions: [
                topics::UPLINK_FILTER,
                topics::STATUS_FILTER,
                topics::DESIRED_FILTER,
                topics::TRUST_ROOT,
            ]
            .into_iter()
            .chain(rollouts.is_some().then_some(topics::FETCH_FILTER))
            .map(str::to_owned)
            .collect(),
            queue: SERVER_QUEUE,
            inflight: SERVER_INFLIGHT,
        },
        tx,
    );
    tracing::info!(broker = %format!("{host}:{port}"), tls, "server started");

    let tick_every = rollouts.as_ref().map_or(Duration::from_secs(1), Rollouts::tick);
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due = tokio::time::interval(Duration::from_millis(50));
    due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut group = Group::default();
    loop {
        let waiting = ingest.gate.queued() > 0;
        let event = tokio::select! {
            biased;
            _ = &mut shutdown => Event::Shutdown,
            _ = tick.tick() => Event::Tick,
            _ = due.tick(), if waiting => Event::Due,
            // Before the MQTT queue: an operator's request is rare, and a fleet that always
            // has a message waiting (10,000 gateways) must not keep it out (it timed out).
            Some(r) = request_rx.recv() => Event::Request(Box::new(r)),
            Some(e) = rx.recv() => Event::Mqtt(e),
        };
        if !matches!(event, Event::Mqtt(MqttEvent::Message { .. })) {
            // Whatever else is to be done sees every message before it stored and acted on.
            flush(&mut db, &client, &ingest, rollouts.as_mut(), &mut group).await;
        }
        match event {
            Event::Shutdown => break,
            Event::Tick => {
                if let Some(r) = &mut rollouts {
                    tokio::task::block_in_place(|| r.on_tick(&mut db, &client, now_ms()));
                }
                if let Some(line) = refusals.lock().ok().and_then(|mut r| r.summary(now_ms())) {
                    tracing::warn!("{line}");
                }
            }
            Event::Due => {
                for admitted in ingest.gate.due(now_ms()) {
                    on_admitted(&mut db, &client, &ingest, rollouts.as_mut(), &mut group, admitted)
                        .await;
                }
            }
            Event::Request(request) => match *request {
                Request::AckAlert { device, seq, actor, note, reply } => {
                    let result = tokio::task::block_in_place(|| {
                        crate::writer::acknowledge(&mut db, &device, seq, &actor, &note, now_ms())
                    });
                    let _ = reply.send(result);
                }
                Request::Enroll { enrollment, actor, reply } => {
                    let result = tokio::task::block_in_place(|| {
                        enroll(&mut db, &registry, &ingest.identity, &enrollment, &actor)
                    });
                    let _ = reply.send(result);
                }
                Request::Revoke { device, reason, actor, reply } => {
                    let result = tokio::task::block_in_place(|| {
                        revoke(&mut db, &registry, &ingest.identity, &device, &reason, &actor)
                    });
                    let _ = reply.send(result);
                }
                request => match &mut rollouts {
                    Some(r) => r.handle(&mut db, &client, request, now_ms()).await,
                    None => request.refuse_unconfigured(),
                },
            },
            Event::Mqtt(MqttEvent::Connected) => {
                broker.connected.store(true, Ordering::Relaxed);
                tracing::info!("connected to broker");
                if let Some(r) = &mut rollouts {
                    tokio::task::block_in_place(|| r.on_connected(&db, &client));
                }
            }
            Event::Mqtt(MqttEvent::Disconnected(_)) => {
                broker.connected.store(false, Ordering::Relaxed)
            }
            Event::Mqtt(MqttEvent::Stalled { .. }) => {
                broker.stalled.store(true, Ordering::Relaxed);
                broker.stalls.fetch_add(1, Ordering::Relaxed);
            }
            Event::Mqtt(MqttEvent::Flowing) => broker.stalled.store(false, Ordering::Relaxed),
            Event::Mqtt(MqttEvent::Message { topic, payload }) => {
                let rollouts = rollouts.as_mut();
                on_message(&mut db, &client, &mut ingest, rollouts, &mut group, &topic, &payload)
                    .await
            }
        }
        if group.due(rx.is_empty()) {
            flush(&mut db, &client, &ingest, rollouts.as_mut(), &mut group).await;
        }
        queued.store(ingest.gate.queued() as u64, Ordering::Relaxed);
    }
    let _ = client.disconnect().await;
    tracing::info!("server stopped");
    Ok(())
}

/// Enrolls a device: stored, audited, admitted by the gate at once, and the broker's ACL
/// file (when configured) rewritten.
fn enroll(
    db: &mut Db,
    registry: &SharedRegistry,
    identity: &crate::config::Identity,
    enrollment: &millwright_shared::enrollment::Enrollment,
    actor: &str,
) -> Result<serde_json::Value, crate::writer::Refusal> {
    use crate::identity_db::EnrollError;
    let row = db.enroll(enrollment, actor, now_ms()).map_err(|e| match e {
        EnrollError::Enrolled(_) => refuse(409, &e),
        EnrollError::Db(_) => refuse(500, &e),
        _ => refuse(422, &e),
    })?;
    if let (Ok(mut r), Some(key)) =
        (registry.write(), crate::identity_db::parse_key(&row.public_key))
    {
        r.insert(enrollment.device.clone(), identity::Entry { key, revoked: false });
    }
    let detail = format!("key {} certificate {}", row.key_id, &row.cert_sha256[..16]);
    db.audit(now_ms(), actor, "device_enrolled", &row.device, "", &detail).map_err(db_error)?;
    tracing::info!(device = row.device, actor, "device enrolled");
    refresh_acl(db, identity);
    Ok(serde_json::to_value(&row).unwrap_or_default())
}

/// Revokes a device: from this moment the gate refuses everything it sends, and the embedded
/// broker refuses its next connection; the ACL file (when configured) loses its entries.
fn revoke(
    db: &mut Db,
    registry: &SharedRegistry,
    identity: &crate::config::Identity,
    device: &str,
    reason: &str,
    actor: &str,
) -> Result<serde_json::Value, crate::writer::Refusal> {
    use crate::identity_db::EnrollError;
    let row = db.revoke(device, actor, reason, now_ms()).map_err(|e| match e {
        EnrollError::NotFound(_) => refuse(404, &e),
        _ => refuse(500, &e),
    })?;
    if let (Ok(mut r), Ok(id)) = (registry.write(), DeviceId::new(device)) {
        r.revoke(&id);
    }
    db.audit(now_ms(), actor, "device_revoked", device, reason, "").map_err(db_error)?;
    tracing::warn!(device, actor, reason, "device revoked");
    refresh_acl(db, identity);
    Ok(serde_json::to_value(&row).unwrap_or_default())
}

/// Rewrites the Mosquitto ACL file from the registry and runs the reload command.
fn refresh_acl(db: &Db, identity: &crate::config::Identity) {
    let Some(path) = &identity.mosquitto_acl else { return };
    let acl = match db.enrollments() {
        Ok(rows) => crate::mosquitto::acl(&rows, &identity.mosquitto_device_reads),
        Err(e) => return tracing::error!("cannot read the registry for the ACL file: {e}"),
    };
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, acl).and_then(|()| std::fs::rename(&tmp, path)) {
        return tracing::error!(path = %path.display(), "cannot write the Mosquitto ACL file: {e}");
    }
    if let Some(command) = &identity.mosquitto_reload {
        let status = std::process::Command::new("sh").arg("-c").arg(command).status();
        match status {
            Ok(s) if s.success() => tracing::info!(command, "broker ACL reloaded"),
            Ok(s) => tracing::error!(command, "broker reload command failed: {s}"),
            Err(e) => tracing::error!(command, "cannot run the broker reload command: {e}"),
        }
    }
}

async fn on_message(
    db: &mut Db,
    client: &AsyncClient,
    ingest: &mut Ingest,
    rollouts: Option<&mut Rollouts>,
    group: &mut Group,
    topic: &str,
    payload: &[u8],
) {
    let (device, purpose) = match topics::parse(topic) {
        Some(Incoming::Uplink { device, stream }) => (device, Purpose::Uplink(stream)),
        Some(Incoming::Status { device }) => (device, Purpose::Status),
        Some(Incoming::Fetch { device }) => (device, Purpose::Fetch),
        Some(Incoming::Desired { device }) => {
            return watch_desired(db, client, ingest, rollouts.is_some(), &device, payload).await;
        }
        Some(Incoming::TrustRoot) => {
            let ours = rollouts.as_ref().map(|r| r.root_bytes().to_vec()).unwrap_or_default();
            return watch_retained(
                client,
                ingest,
                topics::TRUST_ROOT,
                "trust_root",
                &ours,
                payload,
            )
            .await;
        }
        _ => {
            return tracing::debug!(
                topic,
                "ignoring message on a topic the server does not act on"
            );
        }
    };
    match ingest.gate.admit(&device, purpose, payload, now_ms()) {
        Verdict::Now(admitted) => on_admitted(db, client, ingest, rollouts, group, admitted).await,
        Verdict::Queued => {}
        Verdict::Refused(r) => {
            let source = format!("{device} {}", purpose.as_str());
            ingest.refuse(r.reason(), &source, format!("{topic}: {r}"))
        }
    }
}

/// A retained directive that is not the server's own (or none where the server has none) was
/// set by someone else: the server's is put back (or the topic cleared).
async fn watch_desired(
    db: &mut Db,
    client: &AsyncClient,
    ingest: &Ingest,
    rollouts: bool,
    device: &DeviceId,
    payload: &[u8],
) {
    let ours = match rollouts {
        true => match tokio::task::block_in_place(|| db.directive_of(device.as_str())) {
            Ok(d) => d.map(|d| d.envelope).unwrap_or_default(),
            Err(e) => return tracing::error!("cannot read the latest directive: {e}"),
        },
        false => Vec::new(),
    };
    watch_retained(client, ingest, &topics::desired(device), device.as_str(), &ours, payload).await
}

async fn watch_retained(
    client: &AsyncClient,
    ingest: &Ingest,
    topic: &str,
    source: &str,
    ours: &[u8],
    payload: &[u8],
) {
    if payload == ours {
        return;
    }
    ingest.refuse(
        "retained_overwritten",
        source,
        format!(
            "{topic} was set by another client ({} bytes); the server's is put back",
            payload.len()
        ),
    );
    let _ = client.try_publish(topic, QoS::AtLeastOnce, true, ours.to_vec());
}

/// The server's MQTT request queue: acks of several group commits and a wave's directives
/// at once (with a gateway's 256, 1,000 simulated gateways taking a rollout had 1,753 acks
/// given up, each resent by its gateway 15 s later).
const SERVER_QUEUE: usize = 8192;

/// The server's window of unacknowledged QoS 1 publishes (acks, directives, chunks) on its one
/// connection.
const SERVER_INFLIGHT: u16 = 1000;

/// The most writes one group commit holds, and the longest the first of them waits for it.
const GROUP_MAX: usize = 256;
const GROUP_WAIT: Duration = Duration::from_millis(50);

/// Admitted uplink batches and status messages not yet stored: written together in one
/// transaction ([`Db::write_all`]) when the MQTT queue runs dry, the group is full, its first
/// message has waited [`GROUP_WAIT`], or anything else is to be done; then each is acted on
/// (acked, its reports handed to the rollouts) in the order it came.
#[derive(Default)]
struct Group {
    held: Vec<Held>,
    since: Option<std::time::Instant>,
}

/// A held write; its device is the one the gate admitted (the batch and status name it).
enum Held {
    Uplink(ingest::Accepted),
    Status(DeviceStatus),
}

impl Group {
    fn push(&mut self, held: Held) {
        self.since.get_or_insert_with(std::time::Instant::now);
        self.held.push(held);
    }

    fn due(&self, queue_empty: bool) -> bool {
        !self.held.is_empty()
            && (queue_empty
                || self.held.len() >= GROUP_MAX
                || self.since.is_some_and(|t| t.elapsed() >= GROUP_WAIT))
    }
}

/// Stores the group in one transaction, or, if that fails, each of its writes in its own (so
/// one write that cannot be stored keeps no other from its ack), then acts on what was stored.
async fn flush(
    db: &mut Db,
    client: &AsyncClient,
    ingest: &Ingest,
    mut rollouts: Option<&mut Rollouts>,
    group: &mut Group,
) {
    let held = std::mem::take(&mut group.held);
    group.since = None;
    if held.is_empty() {
        return;
    }
    let writes: Vec<Write<'_>> = held
        .iter()
        .map(|h| match h {
            Held::Uplink(batch) => Write::Batch(batch),
            Held::Status(status) => Write::Status(status),
        })
        .collect();
    let now = now_ms();
    let written: Vec<rusqlite::Result<Written>> =
        tokio::task::block_in_place(|| match db.write_all(&writes, now) {
            Ok(all) => all.into_iter().map(Ok).collect(),
            Err(e) => {
                if writes.len() > 1 {
                    tracing::warn!(
                        writes = writes.len(),
                        "group commit failed ({e}); writing one by one"
                    );
                }
                writes
                    .iter()
                    .map(|w| db.write_all(std::slice::from_ref(w), now).map(|mut v| v.remove(0)))
                    .collect()
            }
        });
    for (held, written) in held.into_iter().zip(written) {
        match (held, written) {
            (Held::Uplink(batch), Ok(Written::Batch(stored))) => {
                on_stored(db, client, ingest, rollouts.as_deref_mut(), batch, stored).await
            }
            (Held::Uplink(batch), Err(e)) => {
                tracing::error!(device = %batch.device, "cannot store batch (not acknowledged): {e}")
            }
            (Held::Status(status), Ok(Written::Status(accepted))) => {
                let device = &status.device;
                if !accepted {
                    ingest.refuse(
                        "stale_status",
                        device.as_str(),
                        "a status older than the last one accepted (a replay)",
                    );
                } else if status.online
                    && let Some(r) = rollouts.as_deref_mut()
                {
                    tokio::task::block_in_place(|| {
                        r.on_device_online(db, client, device.as_str(), now_ms())
                    });
                }
            }
            (Held::Status(status), Err(e)) => {
                tracing::error!(device = %status.device, "cannot store device status: {e}")
            }
            (_, Ok(_)) => tracing::error!("a group commit answered out of order"),
        }
    }
    if let Some(r) = rollouts {
        tokio::task::block_in_place(|| r.save_reported(db, now_ms()));
    }
}

/// A message that passed the gate: checked, then held for the group commit (uplink batches,
/// status) or acted on at once (chunk requests, after the group before them is stored).
async fn on_admitted(
    db: &mut Db,
    client: &AsyncClient,
    ingest: &Ingest,
    rollouts: Option<&mut Rollouts>,
    group: &mut Group,
    admitted: Admitted,
) {
    let Admitted { device, purpose, body } = admitted;
    match purpose {
        Purpose::Uplink(stream) => {
            let mut batch = match ingest::accept(&device, stream, &body) {
                Ok(b) => b,
                Err(e) => {
                    return ingest.refuse(
                        e.reason(),
                        device.as_str(),
                        format!("uplink {}: {e}", stream.as_str()),
                    );
                }
            };
            if stream == Stream::Drift {
                judge_drift(ingest, &device, &mut batch);
            }
            if let Some(first) = batch.refused.first() {
                ingest.refuse(
                    "poison_record",
                    device.as_str(),
                    format!(
                        "{} record(s) of {} refused for good, e.g. seq {}: {}",
                        batch.refused.len(),
                        stream.as_str(),
                        first.seq,
                        first.reason
                    ),
                );
            }
            group.push(Held::Uplink(batch));
        }
        Purpose::Status => {
            let status = match DeviceStatus::decode(&body) {
                Ok(s) if s.device == device => s,
                Ok(s) => {
                    return ingest.refuse(
                        "identity_mismatch",
                        device.as_str(),
                        format!("status claims device {}", s.device),
                    );
                }
                Err(e) => {
                    return ingest.refuse("malformed", device.as_str(), format!("status: {e}"));
                }
            };
            group.push(Held::Status(status));
        }
        Purpose::Fetch => match rollouts {
            Some(r) => {
                flush(db, client, ingest, Some(&mut *r), group).await;
                if let Err(reason) = r.on_fetch(db, client, &device, &body) {
                    ingest.refuse(reason.0, device.as_str(), reason.1);
                }
            }
            None => ingest.refuse(
                "no_directive",
                device.as_str(),
                "chunk request, but rollouts are not configured",
            ),
        },
        Purpose::Ack | Purpose::Chunk | Purpose::Connect => {}
    }
}

/// A committed batch: its epoch logged, its ack sent, its drift checked against the retraining
/// policy and its update reports handed to the rollouts.
async fn on_stored(
    db: &mut Db,
    client: &AsyncClient,
    ingest: &Ingest,
    rollouts: Option<&mut Rollouts>,
    mut batch: ingest::Accepted,
    mut stored: crate::db::Stored,
) {
    let (device, stream) = (&batch.device.clone(), batch.stream);
    if let Some(opened) = &stored.opened {
        tracing::warn!(
            %device,
            stream = stream.as_str(),
            epoch = %batch.epoch,
            previous = opened.previous.as_deref().unwrap_or("none"),
            base = stored.base,
            "outbox epoch started: the device's records are stored from seq {}",
            stored.base + 1
        );
    }
    if !stored.refused.is_empty() {
        ingest.refuse(
            "closed_epoch",
            device.as_str(),
            format!(
                "{} record(s) of closed outbox epoch {} above what it had stored",
                stored.refused.len(),
                batch.epoch
            ),
        );
        batch.records.retain(|r| !stored.refused.contains(&r.seq));
    }
    if let Some(first) = batch.refused.first() {
        stored.ack.refused = wire::ranges_of(batch.refused.iter().map(|p| p.seq).collect());
        stored.ack.reason = Some(first.reason.clone());
    }
    if !stored.ack.ranges.is_empty() || !stored.ack.refused.is_empty() {
        let frame =
            signed::seal(&ingest.server_key, Purpose::Ack, device, &wire::encode(&stored.ack));
        ingest.publish(client, topics::ack(device), false, frame);
    }
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
    if let Some(r) = rollouts {
        for record in &batch.records {
            if let RecordBody::Update(report) = &record.body {
                tokio::task::block_in_place(|| {
                    r.on_report(db, client, device.as_str(), report, now_ms())
                });
            }
        }
    }
}

/// Judges each drift report of a batch against its release's profile; what does not fit is
/// dropped from the report and counted.
fn judge_drift(ingest: &Ingest, device: &DeviceId, batch: &mut ingest::Accepted) {
    let profiles = ingest.profiles.read().map(|p| p.clone()).unwrap_or_default();
    let settings = DriftSettings::default();
    for record in &mut batch.records {
        if let RecordBody::Drift(report) = &mut record.body {
            let profile = profiles.get(report.model.as_str(), report.release.0);
            for problem in drift::judge(report, profile, &settings) {
                ingest.refuse(
                    problem.reason(),
                    device.as_str(),
                    format!("drift seq {}: {problem}", record.seq),
                );
            }
        }
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
        let runs = db.drift_runs(model, release, policy.persist_reports as u64)?;
        let evidence = drift::persistent(&runs, &policy);
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
    ingest.publish(client, topics::RETRAINING.to_owned(), true, body);
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
