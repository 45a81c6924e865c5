//! The attack suite: an attacker on the plant network, or an enrolled gateway turned hostile,
//! tries what the security review found possible, on the embedded broker, on a Mosquitto with
//! the registry's ACL, and on a Mosquitto without any ACL (identity must hold whatever broker
//! sits in the middle). Each named attack must be refused with its own reason: counted in the
//! server's or the gateway's refusal counters under that reason and logged once (not per
//! retry), or refused by the broker (TLS, login, ACL). Meanwhile a genuine gateway replays
//! three engines; at the end every one of its streams (predictions, alerts, drift reports,
//! update reports) is on the server exactly once, predictions bit-equal to the reference, and
//! the server holds nothing the attacks invented.

use base64::Engine as _;
use ed25519_dalek::SigningKey;
use millwright_shared::bundle::sha256_hex;
use millwright_shared::drift::{DriftReport, FeatureDrift, Severity};
use millwright_shared::enrollment::{self as files, IDENTITY_KIND, IdentityFile};
use millwright_shared::keys::{KeyId, SecretKeyFile};
use millwright_shared::signed::{self, Purpose};
use millwright_shared::topics;
use millwright_shared::trust::Envelope;
use millwright_shared::wire::{
    self, Ack, DeviceStatus, FetchRequest, Prediction, Record, RecordBody, Stream, UpdatePhase,
    UpdateReport, UplinkBatch, WIRE_VERSION,
};
use millwright_shared::{AssetId, DeviceId, ModelName, Release};
use millwright_tests::trust::{ADMIN_TOKEN, TrustKit, key};
use millwright_tests::*;
use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VICTIM: &str = "gw-victim";
const INTRUDER: &str = "gw-intruder";
const TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Embedded,
    /// Mosquitto with the ACL file the server keeps from its registry.
    MosquittoAcl,
    /// Mosquitto with no ACL at all: any fleet certificate may publish anywhere.
    MosquittoOpen,
}

/// What a party received: (topic, payload).
type Inbox = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A client of the test broker that counts its acknowledged publishes and keeps what it
/// receives. It reconnects when the broker drops it (Mosquitto answers a publish its ACL denies
/// with a reason code MQTT 3.1.1 clients do not expect, and the client then hangs up).
struct Party {
    client: Client,
    acked: Arc<AtomicU64>,
    /// Connections lost since it connected.
    drops: Arc<AtomicU64>,
    connected: Arc<std::sync::atomic::AtomicBool>,
    received: Inbox,
    closed: Arc<Mutex<Option<String>>>,
    /// Set when the party is dropped: its connection thread stops instead of reconnecting (a
    /// dropped rumqttc client alone does not stop it, and two leftover parties with one
    /// certificate would knock each other off for the rest of the suite).
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Party {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.client.try_disconnect();
    }
}

impl Party {
    /// Connects with `options`; the CONNACK must arrive.
    fn connect(options: MqttOptions) -> anyhow::Result<Party> {
        let (client, connection) = Client::new(options, 1000);
        let party = Party {
            client,
            acked: Arc::default(),
            drops: Arc::default(),
            connected: Arc::default(),
            received: Arc::default(),
            closed: Arc::default(),
            stop: Arc::default(),
        };
        let state = (
            party.acked.clone(),
            party.drops.clone(),
            party.connected.clone(),
            party.received.clone(),
            party.closed.clone(),
            party.stop.clone(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || drive(connection, tx, state));
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(party),
            Ok(Err(e)) => anyhow::bail!("connection refused: {e}"),
            Err(_) => anyhow::bail!("no CONNACK within 10 s"),
        }
    }

    /// Publishes and waits for the broker's PUBACK, or for the broker to drop the connection
    /// (then waits for the reconnection). True if it was acknowledged.
    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> bool {
        let (acked, drops) = (self.acked.load(Ordering::SeqCst), self.drops.load(Ordering::SeqCst));
        self.client.publish(topic, QoS::AtLeastOnce, retain, payload).unwrap();
        let answered = wait_until(TIMEOUT, || {
            self.acked.load(Ordering::SeqCst) > acked || self.drops.load(Ordering::SeqCst) > drops
        });
        assert!(answered, "no PUBACK for {topic}");
        if self.acked.load(Ordering::SeqCst) > acked {
            return true;
        }
        assert!(
            wait_until(TIMEOUT, || self.connected.load(Ordering::SeqCst)),
            "no reconnection after the broker dropped a publish on {topic}"
        );
        false
    }

    fn subscribe(&self, filter: &str) {
        self.client.subscribe(filter, QoS::AtLeastOnce).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }

    fn received_on(&self, topic: &str) -> Vec<Vec<u8>> {
        let r = self.received.lock().unwrap();
        r.iter().filter(|(t, _)| t == topic).map(|(_, p)| p.clone()).collect()
    }
}

type PartyState = (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Arc<std::sync::atomic::AtomicBool>,
    Inbox,
    Arc<Mutex<Option<String>>>,
    Arc<std::sync::atomic::AtomicBool>,
);

fn drive(
    mut connection: Connection,
    first_connect: std::sync::mpsc::Sender<Result<(), String>>,
    (acked, drops, connected, received, closed, stop): PartyState,
) {
    let mut first = true;
    for event in connection.iter() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected.store(true, Ordering::SeqCst);
                if first {
                    first = false;
                    let _ = first_connect.send(Ok(()));
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                received.lock().unwrap().push((p.topic.clone(), p.payload.to_vec()));
            }
            Ok(_) => {}
            Err(e) => {
                if first {
                    let _ = first_connect.send(Err(e.to_string()));
                    return;
                }
                connected.store(false, Ordering::SeqCst);
                *closed.lock().unwrap() = Some(e.to_string());
                drops.fetch_add(1, Ordering::SeqCst);
                if matches!(e, rumqttc::ConnectionError::RequestsDone) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// TLS options for the broker with any client certificate (or none), logged in as `user`.
fn raw_options(
    port: u16,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
    client_id: &str,
    login: Option<(&str, String)>,
) -> MqttOptions {
    let identity =
        cert.map(|(c, k)| millwright_io::tls::ClientIdentity { cert: c.into(), key: k.into() });
    let tls = millwright_io::tls::client_config(ca, identity.as_ref()).unwrap();
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options
        .set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls)));
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    options
}

fn device_key(identity: &Path) -> SigningKey {
    let text = std::fs::read_to_string(identity.join(files::DEVICE_KEY)).unwrap();
    SecretKeyFile::parse(&text).unwrap().1
}

fn id(device: &str) -> DeviceId {
    DeviceId::new(device).unwrap()
}

fn prediction_batch(device: &str, epoch: &str, seq: u64, value: f32) -> Vec<u8> {
    wire::encode(&UplinkBatch {
        v: WIRE_VERSION,
        device: id(device),
        epoch: epoch.into(),
        stream: Stream::Predictions,
        records: vec![Record {
            seq,
            at_ms: millwright_io::clock::now_ms(),
            body: RecordBody::Prediction(Prediction {
                asset: AssetId::new("unit-12").unwrap(),
                cycle: 40,
                model: ModelName::new("rul-cnn-fd001").unwrap(),
                release: Release(1),
                value,
            }),
        }],
    })
}

fn status(device: &str, at_ms: i64, online: bool) -> Vec<u8> {
    wire::encode(&DeviceStatus {
        v: WIRE_VERSION,
        device: id(device),
        at_ms,
        started_ms: at_ms,
        online,
        agent_version: "0.1.0".into(),
        site: Some("plant-x".into()),
        tags: vec![],
        device_class: None,
        models: vec![],
        backlog: None,
    })
}

fn committed_report(device: &str) -> Vec<u8> {
    wire::encode(&UplinkBatch {
        v: WIRE_VERSION,
        device: id(device),
        epoch: "e".into(),
        stream: Stream::Updates,
        records: vec![Record {
            seq: 9_000,
            at_ms: 0,
            body: RecordBody::Update(Box::new(UpdateReport {
                rollout: Some("r1".into()),
                directive: Some(1),
                model: Some(ModelName::new("rul-cnn-fd001").unwrap()),
                release: Some(Release(2)),
                phase: UpdatePhase::Committed,
                reason: None,
                health: None,
            })),
        }],
    })
}

/// A drift batch of `device` for s2 of the reference profile, `severity` claimed.
fn drift_batch(device: &str, seq: u64, severity: Severity, counts: Vec<u64>, sum: f64) -> Vec<u8> {
    let n = counts.iter().fold(0u64, |a, c| a.wrapping_add(*c));
    wire::encode(&UplinkBatch {
        v: WIRE_VERSION,
        device: id(device),
        epoch: "e".into(),
        stream: Stream::Drift,
        records: vec![Record {
            seq,
            at_ms: 0,
            body: RecordBody::Drift(Box::new(DriftReport {
                asset: AssetId::new("unit-1").unwrap(),
                model: ModelName::new("rul-cnn-fd001").unwrap(),
                release: Release(1),
                site: None,
                from_ms: seq as i64 * 1000,
                to_ms: seq as i64 * 1000 + 999,
                first_cycle: None,
                last_cycle: None,
                samples: n,
                gaps: 0,
                features: vec![FeatureDrift {
                    name: "s2".into(),
                    severity,
                    flags: vec![],
                    n,
                    counts,
                    sum,
                    missing: 0,
                    non_finite: 0,
                    out_of_range: 0,
                    longest_run: 1,
                    shift: None,
                    psi: None,
                    js: None,
                    ks: None,
                }],
                output: None,
            })),
        }],
    })
}

/// What a running fleet offers the attacks.
struct Ctx<'a> {
    kind: Kind,
    server: &'a Server,
    victim: &'a Agent,
    mosquitto: Option<&'a Mosquitto>,
    intruder: Party,
    intruder_dir: PathBuf,
    intruder_key: SigningKey,
    /// Enrolled devices for short connections: takeover attempts and retained-message checks
    /// (a second connection under the intruder's own name would knock the intruder off).
    taker_dir: PathBuf,
    watcher_dir: PathBuf,
    victim_key: SigningKey,
    root: &'a Path,
    table: Mutex<Vec<(String, String)>>,
}

fn count_lines(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

impl Ctx<'_> {
    fn record(&self, name: &str, observed: String) {
        println!("{:?} | {name:<58} | {observed}", self.kind);
        self.table.lock().unwrap().push((name.to_owned(), observed));
    }

    fn server_refused(&self, reason: &str) -> f64 {
        self.server.metric(&format!("millwright_refused_total{{reason=\"{reason}\"}}"))
    }

    fn agent_refused(&self, label: &str) -> u64 {
        self.victim.status().and_then(|s| s["counters"]["refused"][label].as_u64()).unwrap_or(0)
    }

    /// `send` three times (a retry of the attack); the server counts each under `reason` and
    /// logs it at most once.
    fn expect_server<T>(&self, name: &str, reason: &'static str, send: impl Fn() -> T) {
        let before = self.server_refused(reason);
        let needle = format!("reason=\"{reason}\"");
        let lines = count_lines(&self.server.proc.log_text(), &needle);
        for _ in 0..3 {
            send();
        }
        let counted = wait_until(TIMEOUT, || self.server_refused(reason) >= before + 3.0);
        assert!(
            counted,
            "{name}: the server did not count 3 refusals as {reason} ({} -> {})\n{}",
            before,
            self.server_refused(reason),
            self.server.proc.log_text()
        );
        let log = self.server.proc.log_text();
        let new = count_lines(&log, &needle) - lines;
        assert!(new <= 1, "{name}: {reason} logged {new} times for 3 tries");
        assert!(count_lines(&log, &needle) >= 1, "{name}: {reason} never logged");
        self.record(name, format!("refused by the server: {reason} (3 counted, logged {new})"));
    }

    /// Like [`Ctx::expect_server`], on the victim gateway's counters and log.
    fn expect_agent<T>(&self, name: &str, label: &'static str, send: impl Fn() -> T) {
        let before = self.agent_refused(label);
        let needle = format!("reason=\"{label}\"");
        let lines = count_lines(&self.victim.proc.log_text(), &needle);
        for _ in 0..3 {
            send();
        }
        let counted = wait_until(TIMEOUT, || self.agent_refused(label) >= before + 3);
        assert!(
            counted,
            "{name}: the gateway did not count 3 refusals as {label}: {}\n{}",
            self.victim.status().unwrap()["counters"]["refused"],
            self.victim.proc.log_text()
        );
        let log = self.victim.proc.log_text();
        let new = count_lines(&log, &needle) - lines;
        assert!(new <= 1, "{name}: {label} logged {new} times for 3 tries");
        assert!(count_lines(&log, &needle) >= 1, "{name}: {label} never logged");
        self.record(name, format!("refused by the gateway: {label} (3 counted, logged {new})"));
    }

    /// Mosquitto's ACL drops the publishes (and says so in its log).
    ///
    /// A denied QoS 1 publish makes the 3.1.1 client hang up, sometimes only after it has
    /// counted the PUBACK; a publish queued in that moment dies with the connection and never
    /// reaches the broker. So the attack is sent again (up to three times) while the broker has
    /// not logged it at all; a publish the broker received and let through fails at once.
    fn expect_denied<T>(&self, name: &str, send: impl Fn() -> T) {
        let m = self.mosquitto.expect("a Mosquitto fleet");
        let log = || m.log_text();
        let denied = || count_lines(&log(), "Denied PUBLISH");
        let intruders = [INTRUDER, "gw-taker", "gw-watcher"];
        let received = || {
            let text = log();
            text.lines()
                .filter(|l| l.contains("Received PUBLISH from"))
                .filter(|l| intruders.iter().any(|who| l.contains(&format!("from {who} "))))
                .count()
        };
        let before = (denied(), received());
        let mut tries = 0;
        let seen = loop {
            tries += 1;
            send();
            if wait_until(TIMEOUT / 2, || denied() > before.0) {
                break true;
            }
            let let_through = received() > before.1;
            assert!(!let_through, "{name}: Mosquitto let the publish through:\n{}", log());
            if tries == 3 {
                break false;
            }
        };
        assert!(seen, "{name}: Mosquitto never saw the publish in {tries} tries:\n{}", log());
        let note = if tries > 1 { format!(" after {tries} sends") } else { String::new() };
        self.record(name, format!("refused by the broker: ACL (Denied PUBLISH){note}"));
    }

    /// Publishes on another party's topic: the ACL broker drops it, elsewhere the server
    /// refuses it under `reason`.
    fn on_others_topic_server<T>(&self, name: &str, reason: &'static str, send: impl Fn() -> T) {
        match self.kind {
            Kind::MosquittoAcl => self.expect_denied(name, send),
            _ => self.expect_server(name, reason, send),
        }
    }

    fn on_others_topic_agent<T>(&self, name: &str, label: &'static str, send: impl Fn() -> T) {
        match self.kind {
            Kind::MosquittoAcl => self.expect_denied(name, send),
            _ => self.expect_agent(name, label, send),
        }
    }

    /// The connection must not be established.
    fn expect_no_connection(
        &self,
        name: &str,
        options: MqttOptions,
        login_reason: Option<&'static str>,
    ) {
        let before = login_reason.map(|r| self.server_refused(r));
        let result = Party::connect(options);
        let Err(e) = result else { panic!("{name}: the broker let the connection in") };
        if let (Kind::Embedded, Some(reason), Some(before)) = (self.kind, login_reason, before) {
            let counted = wait_until(TIMEOUT, || self.server_refused(reason) > before);
            assert!(counted, "{name}: the embedded broker's refusal was not counted as {reason}");
            return self.record(name, format!("refused at connect ({reason}): {e}"));
        }
        self.record(name, format!("refused at connect: {e}"));
    }

    fn victim_reconnects(&self) -> u64 {
        self.victim.status().and_then(|s| s["counters"]["reconnects"].as_u64()).unwrap_or(0)
    }

    /// A spare enrolled device's connection under another client id.
    fn taker_as(&self, client_id: &str) -> MqttOptions {
        mqtt_as(self.server.mqtt_port, &self.taker_dir, Some(client_id)).unwrap()
    }
}

/// An identity folder for `device` with a certificate of the fleet CA, but never enrolled.
fn unenrolled_identity(server: &Server, device: &str) -> PathBuf {
    let dir = server.root.join(device).join("identity");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key_pem) = server.pki.client_cert(device, device, -1, 30).unwrap();
    std::fs::copy(cert, dir.join(files::DEVICE_CERT)).unwrap();
    std::fs::copy(key_pem, dir.join(files::DEVICE_TLS_KEY)).unwrap();
    std::fs::copy(&server.pki.ca_cert, dir.join(files::CA_CERT)).unwrap();
    let key = key(99);
    std::fs::write(
        dir.join(files::DEVICE_KEY),
        serde_json::to_vec(&SecretKeyFile::new(&key)).unwrap(),
    )
    .unwrap();
    let file = IdentityFile {
        kind: IDENTITY_KIND.into(),
        device: id(device),
        key_id: KeyId::of(&key.verifying_key()),
        cert_sha256: "0".repeat(64),
    };
    std::fs::write(dir.join(files::IDENTITY_FILE), serde_json::to_vec(&file).unwrap()).unwrap();
    dir
}

fn run_suite(kind: Kind) {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let kit = TrustKit::new(&root.join("trust")).unwrap();
    let r1 = root.join("r1.mwb");
    std::fs::write(&r1, kit.release(1).unwrap()).unwrap();
    let mosquitto = match kind {
        Kind::Embedded => None,
        Kind::MosquittoAcl => Some(Mosquitto::start_with(root, Acl::Registry).unwrap()),
        Kind::MosquittoOpen => Some(Mosquitto::start_with(root, Acl::Open).unwrap()),
    };
    let broker = mosquitto.as_ref().map_or(BrokerChoice::Embedded, BrokerChoice::Mosquitto);
    let config = format!(
        "{}\n[models]\nbundles = [{:?}]\ntrusted_keys = [{:?}]\n",
        kit.server_config(""),
        repo_file(BUNDLE),
        repo_file(PUBLIC_KEY)
    );
    let server = Server::start_with_config(root, broker, &config).unwrap();
    let out = server.cli(ADMIN_TOKEN).args(["model", "register"]).arg(&r1).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Two engines run to failure, so the alert stream has records too.
    let mut spec = AgentSpec::replaying(VICTIM, [1, 2], 4.0);
    spec.data = Some(repo_file("data/cmapss/train_FD001_units_1-6.txt"));
    spec.trust_root = Some(kit.root_path.clone());
    spec.bundle = Some(r1.clone());
    spec.drift = Some("interval_secs = 2".into());
    let victim = Agent::start(root, spec, &server).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || server.prediction_count(VICTIM) > 0),
        "the victim never delivered:\n{}",
        victim.proc.log_text()
    );
    let intruder_dir = server.enroll(INTRUDER).unwrap();
    let taker_dir = server.enroll("gw-taker").unwrap();
    let watcher_dir = server.enroll("gw-watcher").unwrap();
    let intruder = Party::connect(mqtt_as(server.mqtt_port, &intruder_dir, None).unwrap()).unwrap();
    let ctx = Ctx {
        kind,
        server: &server,
        victim: &victim,
        mosquitto: mosquitto.as_ref(),
        intruder,
        intruder_key: device_key(&intruder_dir),
        intruder_dir,
        taker_dir,
        watcher_dir,
        victim_key: device_key(&victim.identity),
        root,
        table: Mutex::default(),
    };
    let started = Instant::now();
    connection_attacks(&ctx);
    uplink_attacks(&ctx, &kit);
    downlink_attacks(&ctx, &kit);
    drift_attacks(&ctx);
    flood_attacks(&ctx);
    revocation(&ctx);
    let attacks = ctx.table.lock().unwrap().len();
    println!("{kind:?}: {attacks} attacks refused in {:.1} s", started.elapsed().as_secs_f64());

    // Nothing of the genuine gateway was lost or duplicated, on any stream.
    wait_for_all(&server, &[&victim], Duration::from_secs(120)).unwrap();
    let n = check_exactly_once(&server, &victim)
        .unwrap_or_else(|e| panic!("{e}\n{}", victim.proc.log_text()));
    let streams = check_streams(&server, &victim, Duration::from_secs(30)).unwrap();
    println!("{kind:?}: the victim's {n} predictions and every stream exactly once: {streams:?}");
    // Nothing invented is stored: only enrolled devices, no rollout moved, no retraining.
    let devices: Vec<String> = server
        .get("/api/v1/devices")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap().to_owned())
        .collect();
    for invented in ["gw-ghost", "fake-canary"] {
        assert!(!devices.contains(&invented.to_owned()), "{invented} was stored: {devices:?}");
    }
    assert_eq!(server.get("/api/v1/rollouts").unwrap(), serde_json::json!([]));
    assert_eq!(server.get("/api/v1/drift/events").unwrap(), serde_json::json!([]));
    let victim_status = server.get(&format!("/api/v1/devices/{VICTIM}")).unwrap();
    assert_ne!(victim_status["site"], "plant-x", "a forged status was stored: {victim_status}");
    assert!(attacks >= 40, "{kind:?}: only {attacks} attacks");
}

fn connection_attacks(ctx: &Ctx<'_>) {
    let pki = &ctx.server.pki;
    let port = ctx.server.mqtt_port;
    ctx.expect_no_connection(
        "anonymous client, no certificate",
        raw_options(port, &pki.ca_cert, None, "anyone", None),
        None,
    );
    {
        let name = "plaintext connection to the TLS listener";
        let mut options = MqttOptions::new("plain", "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        let Err(e) = Party::connect(options) else { panic!("{name}: let in") };
        ctx.record(name, format!("refused at connect: {e}"));
    }
    {
        // Connections that never start a TLS handshake must not hold up anyone else's: the
        // embedded broker's accept loop once waited on each handshake in turn, with no limit.
        let name = "silent TCP connections to the TLS listener";
        let silent: Vec<std::net::TcpStream> =
            (0..3).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(300));
        let quiet = ctx.server.enroll("gw-quiet").unwrap();
        let started = Instant::now();
        let party = Party::connect(mqtt_as(port, &quiet, None).unwrap())
            .unwrap_or_else(|e| panic!("{name}: a gateway could not connect beside them: {e}"));
        let took = started.elapsed();
        drop(party);
        drop(silent);
        ctx.record(name, format!("a gateway connected beside three in {} ms", took.as_millis()));
    }
    let (cert, key_pem) = pki.client_cert("expired", INTRUDER, -10, -1).unwrap();
    ctx.expect_no_connection(
        "expired client certificate",
        raw_options(port, &pki.ca_cert, Some((&cert, &key_pem)), INTRUDER, None),
        None,
    );
    let (cert, key_pem) = pki.stranger_cert(INTRUDER).unwrap();
    ctx.expect_no_connection(
        "client certificate of another CA",
        raw_options(port, &pki.ca_cert, Some((&cert, &key_pem)), INTRUDER, None),
        None,
    );
    // A fleet certificate for a device the registry does not know.
    let ghost = unenrolled_identity(ctx.server, "gw-ghost");
    let ghost_options = mqtt_as(port, &ghost, None).unwrap();
    match ctx.kind {
        Kind::Embedded => ctx.expect_no_connection(
            "unknown device with a fleet certificate",
            ghost_options,
            Some("unknown_device"),
        ),
        _ => {
            let ghost = Party::connect(ghost_options).unwrap();
            let frame = signed::seal(
                &key(99),
                Purpose::Uplink(Stream::Predictions),
                &id("gw-ghost"),
                &prediction_batch("gw-ghost", "e", 1, 1.0),
            );
            let topic = topics::uplink(&id("gw-ghost"), Stream::Predictions);
            let name = "unknown device with a fleet certificate";
            match ctx.kind {
                Kind::MosquittoAcl => {
                    ctx.expect_denied(name, || ghost.publish(&topic, frame.clone(), false))
                }
                _ => ctx.expect_server(name, "unknown_device", || {
                    ghost.publish(&topic, frame.clone(), false)
                }),
            }
        }
    }
    // Client-id takeover of the gateway and of the server.
    for (name, client_id, reconnects) in [
        ("client-id takeover of a gateway", format!("millwright-{VICTIM}"), true),
        ("client-id takeover of the server", "millwright-server".to_owned(), false),
    ] {
        let before = ctx.victim_reconnects();
        match ctx.kind {
            Kind::Embedded => {
                ctx.expect_no_connection(name, ctx.taker_as(&client_id), Some("client_id_taken"))
            }
            _ => {
                // Mosquitto makes the certificate's name the client id: the attacker gets its
                // own session, nobody is knocked off.
                let party = Party::connect(ctx.taker_as(&client_id)).unwrap();
                std::thread::sleep(Duration::from_secs(2));
                drop(party);
                ctx.record(
                    name,
                    "client id replaced by the certificate's name; nobody knocked off".into(),
                );
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let health = ctx.server.get("/api/v1/health").unwrap();
        assert_eq!(health["broker_connected"], true, "{name}: the server lost its broker");
        if reconnects {
            assert_eq!(ctx.victim_reconnects(), before, "{name}: the gateway was knocked off");
        }
    }
    if ctx.kind == Kind::Embedded {
        let server_user = raw_options(
            port,
            &pki.ca_cert,
            Some((
                &ctx.intruder_dir.join(files::DEVICE_CERT),
                &ctx.intruder_dir.join(files::DEVICE_TLS_KEY),
            )),
            "millwright-server",
            Some(("millwright-server", "not-the-server-key".into())),
        );
        ctx.expect_no_connection(
            "the server's user name without its key",
            server_user,
            Some("bad_login"),
        );
    }
}

fn uplink_attacks(ctx: &Ctx<'_>, kit: &TrustKit) {
    let intruder = &ctx.intruder;
    let victim = id(VICTIM);
    let pred = topics::uplink(&victim, Stream::Predictions);
    let ack = topics::ack(&victim);
    let up = Purpose::Uplink(Stream::Predictions);
    let ack_body = |epoch: &str| {
        wire::encode(&Ack {
            v: WIRE_VERSION,
            epoch: epoch.into(),
            stream: Stream::Predictions,
            ranges: vec![(1, i64::MAX as u64)],
            refused: vec![(1, i64::MAX as u64)],
            reason: Some("forged".into()),
        })
    };
    // Acks that would empty the victim's outbox, or move it all to the dead letters.
    ctx.on_others_topic_agent("forged ack, unsigned", "ack_unsigned", || {
        intruder.publish(&ack, ack_body("anything"), false)
    });
    let by_intruder = signed::seal(&ctx.intruder_key, Purpose::Ack, &victim, &ack_body("x"));
    ctx.on_others_topic_agent(
        "forged ack signed by another enrolled device",
        "ack_wrong_key",
        || intruder.publish(&ack, by_intruder.clone(), false),
    );
    // A validly signed ack of an earlier installation of this gateway (its outbox epoch is gone).
    let replayed =
        signed::seal(&kit.server_key, Purpose::Ack, &victim, &ack_body("0123456789abcdef"));
    ctx.on_others_topic_agent("ack replayed from before a reinstall", "ack_stale_epoch", || {
        intruder.publish(&ack, replayed.clone(), false)
    });
    // Batches, statuses, reports and chunk requests under the victim's name.
    let forged =
        signed::seal(&ctx.intruder_key, up, &victim, &prediction_batch(VICTIM, "e", 5000, 4242.0));
    ctx.on_others_topic_server("batch under another device's name, wrong key", "wrong_key", || {
        intruder.publish(&pred, forged.clone(), false)
    });
    ctx.on_others_topic_server("batch under another device's name, unsigned", "unsigned", || {
        intruder.publish(&pred, prediction_batch(VICTIM, "e", 5001, 1.0), false)
    });
    let genuine =
        signed::seal(&ctx.victim_key, up, &victim, &prediction_batch(VICTIM, "e", 5002, 2.0));
    let alert_topic = topics::uplink(&victim, Stream::Alerts);
    ctx.on_others_topic_server(
        "the gateway's batch replayed on another stream's topic",
        "bad_signature",
        || intruder.publish(&alert_topic, genuine.clone(), false),
    );
    let own_pred = topics::uplink(&id(INTRUDER), Stream::Predictions);
    ctx.expect_server(
        "the gateway's batch replayed under another device's topic",
        "wrong_key",
        || intruder.publish(&own_pred, genuine.clone(), false),
    );
    let status_topic = topics::status(&victim);
    let forged_status = signed::seal(
        &ctx.intruder_key,
        Purpose::Status,
        &victim,
        &status(VICTIM, i64::MAX - 1, true),
    );
    ctx.on_others_topic_server("status under another device's name", "wrong_key", || {
        intruder.publish(&status_topic, forged_status.clone(), false)
    });
    ctx.on_others_topic_server("status unsigned", "unsigned", || {
        intruder.publish(&status_topic, status(VICTIM, i64::MAX - 1, true), false)
    });
    let old_status =
        signed::seal(&ctx.victim_key, Purpose::Status, &victim, &status(VICTIM, 1, true));
    ctx.on_others_topic_server(
        "the gateway's status replayed from long ago",
        "stale_status",
        || intruder.publish(&status_topic, old_status.clone(), false),
    );
    let update_topic = topics::uplink(&victim, Stream::Updates);
    let report = signed::seal(
        &ctx.intruder_key,
        Purpose::Uplink(Stream::Updates),
        &victim,
        &committed_report(VICTIM),
    );
    ctx.on_others_topic_server("forged 'committed' update report", "wrong_key", || {
        intruder.publish(&update_topic, report.clone(), false)
    });
    let sha = sha256_hex(&std::fs::read(ctx.root.join("r1.mwb")).unwrap());
    let fetch = wire::encode(&FetchRequest { v: WIRE_VERSION, sha256: sha, first: 0, count: 16 });
    let fetch_topic = topics::fetch(&victim);
    let forged_fetch = signed::seal(&ctx.intruder_key, Purpose::Fetch, &victim, &fetch);
    ctx.on_others_topic_server("chunk request under another device's name", "wrong_key", || {
        intruder.publish(&fetch_topic, forged_fetch.clone(), false)
    });
    let own_fetch = signed::seal(&ctx.intruder_key, Purpose::Fetch, &id(INTRUDER), &fetch);
    let own_fetch_topic = topics::fetch(&id(INTRUDER));
    ctx.expect_server("chunk request without a directive for that bundle", "no_directive", || {
        intruder.publish(&own_fetch_topic, own_fetch.clone(), false)
    });
    let ghost = id("gw-ghost");
    let ghost_batch =
        signed::seal(&ctx.intruder_key, up, &ghost, &prediction_batch("gw-ghost", "e", 1, 1.0));
    ctx.on_others_topic_server("batch from an unknown device", "unknown_device", || {
        intruder.publish(&topics::uplink(&ghost, Stream::Predictions), ghost_batch.clone(), false)
    });
    // An invented canary: a status and a 'committed' report of a device nobody enrolled.
    let canary = id("fake-canary");
    let canary_status =
        signed::seal(&ctx.intruder_key, Purpose::Status, &canary, &status("fake-canary", 5, true));
    ctx.on_others_topic_server("invented canary's status", "unknown_device", || {
        intruder.publish(&topics::status(&canary), canary_status.clone(), false)
    });
    let canary_report = signed::seal(
        &ctx.intruder_key,
        Purpose::Uplink(Stream::Updates),
        &canary,
        &committed_report("fake-canary"),
    );
    ctx.on_others_topic_server("invented canary's 'committed' report", "unknown_device", || {
        intruder.publish(&topics::uplink(&canary, Stream::Updates), canary_report.clone(), false)
    });
    // Validly signed by the intruder for its own topic, but lying inside.
    let claims_victim =
        signed::seal(&ctx.intruder_key, up, &id(INTRUDER), &prediction_batch(VICTIM, "e", 1, 1.0));
    ctx.expect_server("own topic, but the batch names another device", "identity_mismatch", || {
        intruder.publish(&own_pred, claims_victim.clone(), false)
    });
    let own_status_topic = topics::status(&id(INTRUDER));
    let status_of_victim = signed::seal(
        &ctx.intruder_key,
        Purpose::Status,
        &id(INTRUDER),
        &status(VICTIM, i64::MAX - 2, true),
    );
    ctx.expect_server(
        "own topic, but the status names another device",
        "identity_mismatch",
        || intruder.publish(&own_status_topic, status_of_victim.clone(), false),
    );
    let huge_seq = signed::seal(
        &ctx.intruder_key,
        up,
        &id(INTRUDER),
        &prediction_batch(INTRUDER, "e", u64::MAX, 1.0),
    );
    ctx.expect_server("sequence number above 2^63 (an unstorable batch)", "malformed", || {
        intruder.publish(&own_pred, huge_seq.clone(), false)
    });
    // Oversized and deeply nested payloads on the intruder's own topics.
    let own_status = topics::status(&id(INTRUDER));
    let huge_status = vec![b' '; 100 << 10];
    ctx.expect_server("oversized status (100 KiB)", "too_large", || {
        intruder.publish(&own_status, huge_status.clone(), false)
    });
    let nested = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let nested = signed::seal(&ctx.intruder_key, up, &id(INTRUDER), nested.as_bytes());
    ctx.expect_server("deeply nested JSON batch, validly signed", "malformed", || {
        intruder.publish(&own_pred, nested.clone(), false)
    });
    // Above the brokers' packet limit (4 MiB, the server's too): the broker drops the sender.
    let name = "oversized batch (4.3 MB)";
    let taker =
        Party::connect(mqtt_as(ctx.server.mqtt_port, &ctx.taker_dir, None).unwrap()).unwrap();
    let taker_id = id("gw-taker");
    let big = signed::seal(&device_key(&ctx.taker_dir), up, &taker_id, &vec![b'x'; 4_300_000]);
    let _ = taker.client.publish(
        topics::uplink(&taker_id, Stream::Predictions),
        QoS::AtLeastOnce,
        false,
        big,
    );
    let dropped = wait_until(TIMEOUT, || taker.drops.load(Ordering::SeqCst) > 0);
    assert!(dropped, "{name}: the broker kept the sender");
    let health = ctx.server.get("/api/v1/health").unwrap();
    assert_eq!(health["broker_connected"], true, "{name}: the server lost its broker");
    let why = taker.closed.lock().unwrap().clone().unwrap_or_default();
    ctx.record(name, format!("refused by the broker: the sender was dropped ({why})"));
}

fn downlink_attacks(ctx: &Ctx<'_>, kit: &TrustKit) {
    let intruder = &ctx.intruder;
    let victim = id(VICTIM);
    let desired = topics::desired(&victim);
    let directive = TrustKit::directive(
        VICTIM,
        10_000,
        &kit.release(2).unwrap(),
        16 * 1024,
        2,
        millwright_tests::trust::quick_activation(),
    )
    .unwrap();
    let rogue_directive = directive.sign(&key(77)).to_bytes();
    ctx.on_others_topic_agent(
        "directive signed by a non-server key",
        "directive_untrusted_signer",
        || intruder.publish(&desired, rogue_directive.clone(), false),
    );
    let chunk = wire::encode(&wire::Chunk {
        v: WIRE_VERSION,
        sha256: "a".repeat(64),
        index: 0,
        data: base64::engine::general_purpose::STANDARD.encode(b"bytes"),
    });
    let rogue_chunk = signed::seal(&key(78), Purpose::Chunk, &victim, &chunk);
    ctx.on_others_topic_agent("chunk signed by a non-server key", "chunk_wrong_key", || {
        intruder.publish(&topics::chunk(&victim), rogue_chunk.clone(), false)
    });
    // Validly signed by the server, but for another device (a replay from elsewhere).
    let mut elsewhere = directive.clone();
    elsewhere.device = id("gw-other");
    let elsewhere = elsewhere.sign(&kit.server_key).to_bytes();
    ctx.on_others_topic_agent(
        "another device's directive replayed here",
        "directive_wrong_device",
        || intruder.publish(&desired, elsewhere.clone(), false),
    );
    // The root the gateway holds, re-signed with other content: a version it already has.
    let mut same_version = kit.metadata(1, &kit.root_keys.iter().collect::<Vec<_>>());
    same_version.expires_at += time::Duration::days(3);
    let same_version = millwright_shared::trust::Root::sign(
        &same_version,
        &[&kit.root_keys[0], &kit.root_keys[1]],
    )
    .to_bytes();
    ctx.on_others_topic_agent(
        "root of the version already held, other content",
        "root_version",
        || intruder.publish(topics::TRUST_ROOT, same_version.clone(), false),
    );
    let rogue_root = kit.root_document(2, &[&key(81), &key(82)]);
    ctx.on_others_topic_agent(
        "root signed by keys that are not root keys",
        "root_signatures",
        || intruder.publish(topics::TRUST_ROOT, rogue_root.clone(), false),
    );
    // Retained messages only the server may set.
    for (name, topic, payload) in [
        (
            "retained directive set by a non-server client",
            desired.clone(),
            b"{\"garbage\":1}".to_vec(),
        ),
        (
            "retained trust root set by a non-server client",
            topics::TRUST_ROOT.to_owned(),
            b"{\"garbage\":2}".to_vec(),
        ),
    ] {
        ctx.on_others_topic_server(name, "retained_overwritten", || {
            intruder.publish(&topic, payload.clone(), true)
        });
        // A client subscribing now gets the server's retained message (or none), not the forgery.
        let watcher =
            Party::connect(mqtt_as(ctx.server.mqtt_port, &ctx.watcher_dir, None).unwrap()).unwrap();
        watcher.subscribe(&topic);
        std::thread::sleep(Duration::from_millis(500));
        let got = watcher.received_on(&topic);
        assert!(!got.iter().any(|p| p == &payload), "{name}: the forged retained message stayed");
    }
    // Unverified claims echoed into reports: two large envelopes with huge claimed strings.
    let before = ctx.victim.status().unwrap()["last_seq"]["update"].as_u64().unwrap_or(0);
    let claim = |n: u8| {
        let mut d = serde_json::to_value(&directive).unwrap();
        d["rollout"] = serde_json::Value::String(format!("{n}{}", "R".repeat(700_000)));
        d["seq"] = u64::MAX.into();
        Envelope {
            payload: base64::engine::general_purpose::STANDARD
                .encode(serde_json::to_vec(&d).unwrap()),
            signatures: vec![],
        }
        .to_bytes()
    };
    let (one, two) = (claim(1), claim(2));
    ctx.on_others_topic_agent(
        "two large unsigned envelopes with claims to echo",
        "directive_untrusted_signer",
        || {
            intruder.publish(&desired, one.clone(), false);
            intruder.publish(&desired, two.clone(), false);
        },
    );
    if ctx.kind != Kind::MosquittoAcl {
        std::thread::sleep(Duration::from_secs(2));
        let after = ctx.victim.status().unwrap()["last_seq"]["update"].as_u64().unwrap_or(0);
        assert!(after - before <= 1, "refusals of unverified messages flooded the outbox");
        let reports = ctx.server.get(&format!("/api/v1/devices/{VICTIM}/updates")).unwrap();
        for r in reports.as_array().unwrap() {
            assert!(serde_json::to_vec(r).unwrap().len() < 2048, "a report carries claims: {r}");
            if r["reason"].as_str().is_some_and(|s| s.contains("message SHA-256")) {
                assert!(r["rollout"].is_null() && r["directive"].is_null(), "{r}");
            }
        }
    }
}

fn drift_attacks(ctx: &Ctx<'_>) {
    let intruder = &ctx.intruder;
    let own = id(INTRUDER);
    let topic = topics::uplink(&own, Stream::Drift);
    let purpose = Purpose::Uplink(Stream::Drift);
    // s2's reference: spread evenly over its bins is what training looks like.
    let bins = 10;
    let mean = 642.68;
    let skewed: Vec<Vec<u8>> = (1..=3)
        .map(|seq| {
            let body = drift_batch(INTRUDER, seq, Severity::Drift, vec![10; bins], mean * 100.0);
            signed::seal(&ctx.intruder_key, purpose, &own, &body)
        })
        .collect();
    let i = AtomicU64::new(0);
    ctx.expect_server(
        "drift reports claiming a drift their counts deny",
        "drift_severity_overruled",
        || {
            let n = i.fetch_add(1, Ordering::SeqCst) as usize;
            intruder.publish(&topic, skewed[n % 3].clone(), false)
        },
    );
    let one_bin = signed::seal(
        &ctx.intruder_key,
        purpose,
        &own,
        &drift_batch(INTRUDER, 10, Severity::Ok, vec![100], mean * 100.0),
    );
    ctx.expect_server("drift report with another bin count", "drift_invalid", || {
        intruder.publish(&topic, one_bin.clone(), false)
    });
    let mut overflow = vec![0u64; bins];
    overflow[0] = u64::MAX;
    overflow[1] = 5;
    let overflow = signed::seal(
        &ctx.intruder_key,
        purpose,
        &own,
        &drift_batch(INTRUDER, 11, Severity::Ok, overflow, 1.0),
    );
    ctx.expect_server("drift counts that overflow", "drift_invalid", || {
        intruder.publish(&topic, overflow.clone(), false)
    });
    let ghost = id("gw-ghost");
    let ghost_drift = signed::seal(
        &ctx.intruder_key,
        purpose,
        &ghost,
        &drift_batch("gw-ghost", 1, Severity::Drift, vec![100, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0.0),
    );
    ctx.on_others_topic_server(
        "forged drift reports from an invented device",
        "unknown_device",
        || intruder.publish(&topics::uplink(&ghost, Stream::Drift), ghost_drift.clone(), false),
    );
}

fn flood_attacks(ctx: &Ctx<'_>) {
    // 2,000 distinct garbage roots in a few seconds: counted, coalesced, the loop keeps ticking.
    let name = "flood of distinct garbage on the trust-root topic";
    if ctx.kind == Kind::MosquittoAcl {
        ctx.expect_denied(name, || ctx.intruder.publish(topics::TRUST_ROOT, b"x0".to_vec(), false));
    } else {
        let before = ctx.agent_refused("root_malformed");
        let updates = ctx.victim.status().unwrap()["last_seq"]["update"].as_u64().unwrap_or(0);
        for n in 0..2000 {
            let _ = ctx.intruder.client.publish(
                topics::TRUST_ROOT,
                QoS::AtMostOnce,
                false,
                format!("garbage {n}"),
            );
        }
        let mut worst_lag = 0;
        let counted = wait_until(TIMEOUT, || {
            if let Some(s) = ctx.victim.status() {
                worst_lag = worst_lag
                    .max(millwright_io::clock::now_ms() - s["at_ms"].as_i64().unwrap_or(0));
            }
            ctx.agent_refused("root_malformed") >= before + 1500
        });
        assert!(
            counted,
            "{name}: {} of 2000 counted",
            ctx.agent_refused("root_malformed") - before
        );
        let grown =
            ctx.victim.status().unwrap()["last_seq"]["update"].as_u64().unwrap_or(0) - updates;
        assert!(grown <= 1, "{name}: the outbox took {grown} reports");
        assert!(worst_lag < 3000, "{name}: the status lagged {worst_lag} ms (watchdog starved)");
        ctx.record(name, format!("refused by the gateway: root_malformed, {} counted, {grown} report, status lag ≤ {worst_lag} ms", ctx.agent_refused("root_malformed") - before));
    }
    // 1,000 one-record batches from one enrolled device: throttled, while another device's
    // acks keep coming within five seconds.
    let name = "flood of 1,000 one-record batches from an enrolled device";
    let probe_dir = ctx.server.enroll("gw-probe").unwrap();
    let probe_key = device_key(&probe_dir);
    let probe = Party::connect(mqtt_as(ctx.server.mqtt_port, &probe_dir, None).unwrap()).unwrap();
    let probe_id = id("gw-probe");
    probe.subscribe(&topics::ack(&probe_id));
    let before = ctx.server_refused("rate_limited");
    let own = id(INTRUDER);
    let topic = topics::uplink(&own, Stream::Predictions);
    for seq in 1..=1000 {
        let body = prediction_batch(INTRUDER, "flood", seq, 1.0);
        let frame =
            signed::seal(&ctx.intruder_key, Purpose::Uplink(Stream::Predictions), &own, &body);
        let _ = ctx.intruder.client.publish(&topic, QoS::AtLeastOnce, false, frame);
    }
    let mut latencies = Vec::new();
    for seq in 1..=10 {
        let body = prediction_batch("gw-probe", "probe", seq, 1.0);
        let frame =
            signed::seal(&probe_key, Purpose::Uplink(Stream::Predictions), &probe_id, &body);
        let acks = probe.received_on(&topics::ack(&probe_id)).len();
        let sent = Instant::now();
        probe.publish(&topics::uplink(&probe_id, Stream::Predictions), frame, false);
        let acked = wait_until(Duration::from_secs(10), || {
            probe.received_on(&topics::ack(&probe_id)).len() > acks
        });
        assert!(acked, "{name}: the probe got no ack");
        latencies.push(sent.elapsed().as_millis() as u64);
    }
    latencies.sort_unstable();
    let worst = *latencies.last().unwrap();
    assert!(
        wait_until(TIMEOUT, || ctx.server_refused("rate_limited") > before),
        "{name}: nothing throttled"
    );
    // Starved would be the flood's whole length; 100–300 ms is typical here, and one CI run with
    // the cross builds beside it (every accepted flood batch an fsync) saw 2.5 s.
    assert!(worst < 5000, "{name}: another device's ack took {worst} ms");
    ctx.record(
        name,
        format!(
            "throttled: rate_limited {} counted; another device's acks ≤ {worst} ms (median {} ms)",
            ctx.server_refused("rate_limited") - before,
            latencies[latencies.len() / 2]
        ),
    );
}

fn revocation(ctx: &Ctx<'_>) {
    let name = "revoked device mid-session";
    let mole_dir = ctx.server.enroll("gw-mole").unwrap();
    let mole_key = device_key(&mole_dir);
    let mole = id("gw-mole");
    let party = Party::connect(mqtt_as(ctx.server.mqtt_port, &mole_dir, None).unwrap()).unwrap();
    party.subscribe(&topics::ack(&mole));
    let topic = topics::uplink(&mole, Stream::Predictions);
    let batch = |seq| {
        signed::seal(
            &mole_key,
            Purpose::Uplink(Stream::Predictions),
            &mole,
            &prediction_batch("gw-mole", "m", seq, 1.0),
        )
    };
    party.publish(&topic, batch(1), false);
    assert!(
        wait_until(TIMEOUT, || !party.received_on(&topics::ack(&mole)).is_empty()),
        "{name}: not acked before the revocation"
    );
    let reloads = || ctx.mosquitto.map_or(0, |m| count_lines(&m.log_text(), "Reloading config"));
    let reloaded = reloads();
    let out = ctx
        .server
        .cli(ADMIN_TOKEN)
        .args(["device", "revoke", "gw-mole", "--reason", "stolen"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The server rewrote the ACL and sent Mosquitto its reload signal before answering; the
    // reload itself happens in Mosquitto's next loop (until then the server refuses the
    // revoked key, as on any broker).
    if ctx.kind == Kind::MosquittoAcl {
        assert!(
            wait_until(TIMEOUT, || reloads() > reloaded),
            "{name}: Mosquitto did not reload its ACL after the revocation"
        );
    }
    let seq = AtomicU64::new(2);
    match ctx.kind {
        Kind::MosquittoAcl => ctx.expect_denied(name, || {
            party.publish(&topic, batch(seq.fetch_add(1, Ordering::SeqCst)), false)
        }),
        _ => ctx.expect_server(name, "revoked_device", || {
            party.publish(&topic, batch(seq.fetch_add(1, Ordering::SeqCst)), false)
        }),
    }
    drop(party);
    if ctx.kind == Kind::Embedded {
        ctx.expect_no_connection(
            "revoked device reconnects",
            mqtt_as(ctx.server.mqtt_port, &mole_dir, None).unwrap(),
            Some("revoked_device"),
        );
    }
    let audit = ctx.server.get("/api/v1/audit").unwrap();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "device_revoked" && a["target"] == "gw-mole"),
        "{audit}"
    );
}

#[test]
fn attacks_are_refused_on_the_embedded_broker_and_nothing_is_lost() {
    run_suite(Kind::Embedded);
}

#[test]
fn attacks_are_refused_on_mosquitto_with_the_registry_acl_and_nothing_is_lost() {
    run_suite(Kind::MosquittoAcl);
}

#[test]
fn attacks_are_refused_on_mosquitto_without_any_acl_and_nothing_is_lost() {
    run_suite(Kind::MosquittoOpen);
}

/// `millwright broker mosquitto-config` writes a listener and an ACL from the registry that
/// Mosquitto runs as is: each enrolled device may write only its own topics, and a revoked one
/// none.
#[test]
fn the_generated_mosquitto_config_confines_each_device_and_shuts_out_revoked_ones() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let (a, b) = (server.enroll("gw-a").unwrap(), server.enroll("gw-b").unwrap());
    let out = server.cli(ADMIN_TOKEN).args(["device", "revoke", "gw-b"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let port = free_port();
    let conf_dir = dir.path().join("mosquitto");
    let pki = &server.pki;
    let out = server
        .cli(millwright_tests::trust::VIEWER_TOKEN)
        .args(["broker", "mosquitto-config", "--bind", "127.0.0.1", "--port", &port.to_string()])
        .arg("--ca-file")
        .arg(&pki.ca_cert)
        .arg("--cert")
        .arg(&pki.broker_cert)
        .arg("--key")
        .arg(&pki.broker_key)
        .arg("--out-dir")
        .arg(&conf_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    let conf = conf_dir.join("millwright.conf");
    let acl = std::fs::read_to_string(conf_dir.join("millwright.acl")).unwrap();
    assert!(acl.contains("user gw-a\n") && !acl.contains("gw-b"), "{acl}");
    // As the test runs as root in a private folder, Mosquitto must not drop to its own user;
    // and its debug log says what the ACL denied.
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text += "user root\nlog_type all\nlog_dest stderr\n";
    std::fs::write(&conf, text).unwrap();
    let log = dir.path().join("generated-mosquitto.log");
    let _broker = Proc::spawn(
        std::process::Command::new("/usr/sbin/mosquitto").arg("-c").arg(&conf),
        log.clone(),
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok()));
    let party_a = Party::connect(mqtt_as(port, &a, None).unwrap()).unwrap();
    let own = signed::seal(&device_key(&a), Purpose::Status, &id("gw-a"), &status("gw-a", 1, true));
    assert!(party_a.publish(&topics::status(&id("gw-a")), own, false), "its own topic is allowed");
    let denied = |who: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&format!("Denied PUBLISH from {who}"))
    };
    assert!(!denied("gw-a"));
    party_a.publish(&topics::status(&id("gw-b")), b"x".to_vec(), false);
    assert!(wait_until(Duration::from_secs(5), || denied("gw-a")), "another device's topic");
    let party_b = Party::connect(mqtt_as(port, &b, None).unwrap()).unwrap();
    party_b.publish(&topics::status(&id("gw-b")), b"x".to_vec(), false);
    assert!(
        wait_until(Duration::from_secs(5), || denied("gw-b")),
        "a revoked device writes nothing"
    );
    println!("generated Mosquitto config: gw-a writes its own topics only; revoked gw-b nothing");
}
