//! `millwright simulate`: a fleet of simulated gateways against a real server. Each gateway
//! is enrolled like a real one (an ed25519 message key, a client certificate of a fresh fleet
//! CA) and speaks the real protocol over its own TLS MQTT connection: signed uplink batches of
//! predictions, the signed acks it checks with the server's key, a signed status every few
//! seconds, its last will. With no address given, it starts its own server (SQLite, embedded
//! broker) in a temporary folder, so the benchmark is one command.
//!
//! The run: enroll and connect every gateway (a bounded number of TLS handshakes at a time),
//! send for `--seconds` (each gateway keeps `--in-flight` batches unacknowledged, as fast as
//! acks come back or at `--rate` batches a second), stop sending and wait for the last acks,
//! then compare every gateway's books with what the server says it stored (its API). One line
//! at the end, for scripts:
//!
//! `simulate: devices=<n> seconds=<s> msgs_per_s=<x> records_per_s=<y> ack_p50_ms=<a>
//! ack_p99_ms=<b> lost=<l> duplicated=<d>` and what else was measured, as more `key=value`.
//!
//! It fails (exit 1) when a record the server acknowledged is not stored, a record is stored
//! twice, or records are still unacknowledged after the drain.
//!
//! With `--rollout <bundle>` the server also gets a trust root of its own and registers the
//! bundle, re-signed, as releases 1 and 2; every gateway serves release 1, and once all are
//! sending, release 2 is rolled out to them (a canary, then doubling waves, no soak, the
//! failure policy as a share of each wave). Each gateway verifies its signed directive,
//! downloads the chunks and checks each against the directive's digests, reports every phase
//! in its update stream, and waits out shadow and probation ([`update`]); `--fail-share` of
//! them (spread evenly) fail after verification. A second line then says how it went:
//!
//! `rollout: devices=<n> state=<completed|paused|...> wave=<w>/<waves> committed=<c>
//! failed=<f> notified_s=<x> finished_s=<y>` and more `key=value`.
//!
//! With `--mosquitto` the gateways and the server meet on a Mosquitto (from `PATH` or
//! `/usr/sbin`) that the simulator starts with the fleet's listener: TLS with client
//! certificates, identities as user names, the registry's ACL
//! ([`millwright_server::mosquitto`]). Every gateway's broker-side socket is then in Mosquitto's process,
//! not in this one beside the gateways' own: 10,000 gateways fit a limit of 20,000 open files.

mod ledger;
mod update;

use super::Failure;
use super::api::ApiArgs;
use anyhow::Context as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use indicatif::{ProgressBar, ProgressStyle};
use ledger::{Books, Ledger};
use millwright_io::clock;
use millwright_io::mqtt::{self, Connect, MqttEvent, Transport};
use millwright_server::config::{
    Config as ServerConfig, RawConfig, RawIdentity, RawMqtt, Role, User,
};
use millwright_server::db::Db;
use millwright_server::pki::{Leaf, Usage};
use millwright_shared::enrollment::Enrollment;
use millwright_shared::keys::SecretKeyFile;
use millwright_shared::signed::{self, Purpose};
use millwright_shared::wire::{
    self, Ack, DeviceStatus, Prediction, Record, RecordBody, Stream, UplinkBatch, WIRE_VERSION,
};
use millwright_shared::{AssetId, DeviceId, ModelName, Release, topics};
use rumqttc::QoS;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, watch};

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Simulated gateways, each with its own MQTT connection.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// How long they send, after all are connected.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Records (predictions) per uplink batch.
    #[arg(long, default_value_t = 10)]
    records: u64,
    /// Batches each gateway keeps sent and unacknowledged.
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Batches per second per gateway; 0 sends the next as soon as an ack makes room.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds between one gateway's status messages (agents send theirs every 10 s).
    #[arg(long, default_value_t = 10)]
    status_secs: u64,
    /// TLS handshakes in progress at once while the fleet connects.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// The longest the fleet may take to connect.
    #[arg(long, default_value_t = 300)]
    connect_timeout_secs: u64,
    /// After the run, how long to wait for the acks of batches still in flight.
    #[arg(long, default_value_t = 60)]
    drain_secs: u64,
    /// A batch unacknowledged this long is sent again (the server stores it once).
    #[arg(long, default_value_t = 15)]
    resend_secs: u64,
    /// Keep the server's data here (wiped at start) instead of a temporary folder.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Roll a second release of this signed bundle out to the fleet while it sends.
    #[arg(long)]
    rollout: Option<PathBuf>,
    /// Share of the gateways (0-1, spread evenly) whose update fails after verification.
    #[arg(long, default_value_t = 0.0, requires = "rollout")]
    fail_share: f64,
    /// The rollout's canary, in percent of the fleet.
    #[arg(long, default_value_t = 1.0, requires = "rollout")]
    canary_percent: f64,
    /// Failures the rollout tolerates per wave, in percent of the wave; more pause it.
    #[arg(long, default_value_t = 1.0, requires = "rollout")]
    max_failures_percent: f64,
    /// Seconds of shadow and of probation on each gateway.
    #[arg(long, default_value_t = 2, requires = "rollout")]
    phase_secs: u64,
    /// The longest the rollout may take; the run fails past it.
    #[arg(long, default_value_t = 600, requires = "rollout")]
    rollout_timeout_secs: u64,
    /// Gateways and server meet on a Mosquitto this starts, not on the embedded broker.
    #[arg(long)]
    mosquitto: bool,
}

/// What every gateway needs to know about the run.
struct Plan {
    mqtt: SocketAddr,
    server_key: VerifyingKey,
    records: u64,
    in_flight: usize,
    rate: f64,
    status_every: Duration,
    resend_after: Duration,
    /// What every simulated prediction is of.
    asset: AssetId,
    model: ModelName,
    /// The run's zero for the ledgers' microseconds.
    zero: Instant,
    /// In a rollout run, the root gateways verify their directives with.
    root: Option<millwright_shared::trust::Root>,
}

/// One simulated gateway's credentials.
struct Gateway {
    device: DeviceId,
    key: SigningKey,
    tls: Arc<rustls::ClientConfig>,
    site: String,
    /// Its update is to fail (`--fail-share`).
    fail: bool,
}

/// Where the run is; every gateway watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Sending,
    Draining,
    Done,
}

/// Live counts for the progress bar and the rates.
#[derive(Debug, Default)]
struct Counters {
    connected: AtomicU64,
    acked_batches: AtomicU64,
    acked_records: AtomicU64,
    reconnects: AtomicU64,
    statuses: AtomicU64,
    bad_acks: AtomicU64,
    /// Update reports acknowledged; chunks that passed their checks; directives and chunks
    /// that did not.
    reports: AtomicU64,
    chunks: AtomicU64,
    bad_directives: AtomicU64,
    bad_chunks: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What a gateway hands back at the end.
struct Outcome {
    device: DeviceId,
    ledger: Ledger,
}

pub fn run(args: SimulateArgs) -> Result<(), Failure> {
    if args.devices == 0 || args.seconds == 0 || args.records == 0 {
        return Err(anyhow::anyhow!("--devices, --seconds and --records must be at least 1").into());
    }
    if !args.rate.is_finite() || args.rate < 0.0 {
        return Err(anyhow::anyhow!("--rate must be a number of batches per second, ≥ 0").into());
    }
    if !(0.0..=1.0).contains(&args.fail_share) {
        return Err(anyhow::anyhow!("--fail-share must be a share from 0 to 1").into());
    }
    raise_file_limit(args.devices, args.mosquitto)?;
    let temp;
    let dir = match &args.data_dir {
        Some(d) => {
            if d.exists() {
                std::fs::remove_dir_all(d)
                    .with_context(|| format!("cannot clear {}", d.display()))?;
            }
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("millwright-simulate-").tempdir()?;
            temp.path().to_owned()
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(simulate(&args, &dir))
}

/// Every gateway holds one socket, and the embedded broker three: the other end, and both
/// ends of its relay to rumqttd. The soft limit is raised to what that needs, and the hard
/// limit too where the process may (as root). Mosquitto, started from here, inherits it and
/// holds one socket per gateway in its own process.
fn raise_file_limit(devices: usize, mosquitto: bool) -> anyhow::Result<()> {
    let per_device = if mosquitto { 1 } else { 4 };
    let needed = devices as u64 * per_device + 512;
    let (soft, hard) = rlimit::Resource::NOFILE.get().context("the open-file limit")?;
    if soft >= needed {
        return Ok(());
    }
    if rlimit::Resource::NOFILE.set(needed, hard.max(needed)).is_err()
        && rlimit::Resource::NOFILE.set(hard.min(needed), hard).is_err()
    {
        anyhow::bail!("cannot raise the open-file limit from {soft}");
    }
    let (soft, _) = rlimit::Resource::NOFILE.get().context("the open-file limit")?;
    if soft < needed {
        anyhow::bail!(
            "the open-file limit is {soft}; {devices} gateways and the embedded broker need about \
             {needed} (raise the hard limit, e.g. `ulimit -Hn {needed}` as root, or simulate \
             fewer devices)"
        );
    }
    Ok(())
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The fleet CA, the server's certificate and key, every gateway's credentials enrolled in the
/// server's registry, and the server's configuration with an admin token for the API.
struct Fleet {
    config: ServerConfig,
    /// Where the gateways connect, and the Mosquitto config to start when it is not the
    /// server's embedded broker.
    broker: SocketAddr,
    mosquitto: Option<PathBuf>,
    gateways: Vec<Gateway>,
    server_key: VerifyingKey,
    api: ApiArgs,
    releases: Option<Releases>,
}

/// A rollout run's trust root and the two releases the server registers.
struct Releases {
    root: millwright_shared::trust::Root,
    model: ModelName,
    bundles: [Vec<u8>; 2],
}

/// A root of fresh root and release keys with the server's key, and `bundle` re-signed with
/// that release key as releases 1 and 2.
fn make_releases(bundle: &Path, server: &SigningKey, root_path: &Path) -> anyhow::Result<Releases> {
    use millwright_shared::bundle::RawBundle;
    let (root_key, release_key) = (super::device::random_key()?, super::device::random_key()?);
    let root_bytes = super::demo_rollout::one_key_root(&root_key, &release_key, server, 2)?;
    std::fs::write(root_path, &root_bytes)?;
    let bytes = std::fs::read(bundle).with_context(|| format!("--rollout {}", bundle.display()))?;
    let reference = RawBundle::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("--rollout {}: {e}", bundle.display()))?;
    let manifest = reference
        .manifest_unverified()
        .map_err(|e| anyhow::anyhow!("--rollout {}: {e}", bundle.display()))?;
    let release = |n| super::demo_rollout::resigned(&reference, n, "simulate", &release_key);
    Ok(Releases {
        root: millwright_shared::trust::Root::provision(&root_bytes, clock::now())?,
        model: manifest.model,
        bundles: [release(1)?, release(2)?],
    })
}

fn make_fleet(count: usize, dir: &Path, args: &SimulateArgs) -> anyhow::Result<Fleet> {
    let pki = dir.join("pki");
    let devices = pki.join("devices");
    std::fs::create_dir_all(&devices)?;
    let now = clock::now();
    let ca = millwright_server::pki::create_ca("Millwright simulated fleet CA", now, 2)?;
    let ca_cert = pki.join(super::ca::CA_CERT);
    std::fs::write(&ca_cert, &ca.cert_pem)?;
    let issuer = millwright_server::pki::Ca::load(&ca.cert_pem, &ca.key_pem)?;
    let mut leaf = Leaf::new(millwright_server::identity::SERVER_USER, Usage::Server, now, 2);
    leaf.ips.push(std::net::IpAddr::from([127, 0, 0, 1]));
    let server = issuer.issue(&leaf)?;
    let (cert, key) = (pki.join("server.crt.pem"), pki.join("server.key.pem"));
    super::bundle::write(&key, server.key_pem.as_bytes(), true)?;
    std::fs::write(&cert, &server.cert_pem)?;
    let server_key = super::device::random_key()?;
    let server_key_file = pki.join("server.secret.json");
    let secret = serde_json::to_vec(&SecretKeyFile::new(&server_key))?;
    super::bundle::write(&server_key_file, &secret, true)?;
    let root_path = pki.join("root.json");
    let releases =
        args.rollout.as_deref().map(|b| make_releases(b, &server_key, &root_path)).transpose()?;

    let data_dir = dir.join("server");
    std::fs::create_dir_all(&data_dir)?;
    let mut db = Db::open(&data_dir.join("server.sqlite"))?;
    let mut gateways = Vec::with_capacity(count);
    for i in 0..count {
        let device = DeviceId::new(format!("sim-{i:05}"))?;
        let key = super::device::random_key()?;
        let client = issuer.issue(&Leaf::new(device.as_str(), Usage::Client, now, 2))?;
        let identity = millwright_io::tls::ClientIdentity {
            cert: devices.join(format!("{device}.crt.pem")),
            key: devices.join(format!("{device}.key.pem")),
        };
        std::fs::write(&identity.cert, &client.cert_pem)?;
        super::bundle::write(&identity.key, client.key_pem.as_bytes(), true)?;
        let site = format!("site-{:02}", i % 20);
        let enrollment = Enrollment {
            device: device.clone(),
            public_key: hex::encode(key.verifying_key().as_bytes()),
            cert_sha256: client.sha256,
            site: Some(site.clone()),
            tags: Vec::new(),
            device_class: None,
        };
        db.enroll(&enrollment, "simulate", clock::now_ms())?;
        let tls = millwright_io::tls::client_config(&ca_cert, Some(&identity))?;
        // Spread evenly: gateway i fails when the running count of failures steps up at it.
        let fail =
            ((i + 1) as f64 * args.fail_share).floor() > (i as f64 * args.fail_share).floor();
        gateways.push(Gateway { device, key, tls, site, fail });
    }
    let (http, broker) = (free_port()?, free_port()?);
    let mosquitto = match args.mosquitto {
        false => None,
        true => {
            let acl = pki.join("mosquitto.acl");
            std::fs::write(&acl, millwright_server::mosquitto::acl(&db.enrollments()?, &[]))?;
            let listener = millwright_server::mosquitto::Listener {
                bind: "127.0.0.1",
                port: broker.port(),
                ca: &ca_cert,
                cert: &cert,
                key: &key,
                acl: &acl,
            };
            let conf = pki.join("mosquitto.conf");
            // As root Mosquitto would switch to its own user, who cannot read the keys.
            let head =
                "user root\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n";
            std::fs::write(
                &conf,
                format!("{head}{}", millwright_server::mosquitto::config(&listener)),
            )?;
            Some(conf)
        }
    };
    drop(db);

    let token =
        millwright_server::auth::new_token().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let mqtt = match &mosquitto {
        None => {
            RawMqtt { embedded_listen: Some(broker.to_string()), broker: None, client_id: None }
        }
        Some(_) => RawMqtt {
            embedded_listen: None,
            broker: Some(format!("mqtts://{broker}")),
            client_id: None,
        },
    };
    let config = ServerConfig::from_raw(RawConfig {
        data_dir: Some(data_dir),
        http_listen: Some(http.to_string()),
        allow_plaintext: false,
        identity: Some(RawIdentity {
            server_key: server_key_file,
            ca: Some(ca_cert.clone()),
            cert: Some(cert),
            key: Some(key),
            ..Default::default()
        }),
        mqtt,
        models: Default::default(),
        drift: Default::default(),
        rollouts: releases.as_ref().map(|_| millwright_server::config::RawRollouts {
            root: root_path.clone(),
            directive_ttl_secs: None,
            chunk_size: None,
            delivery_bytes_per_sec: None,
            fleet_delivery_bytes_per_sec: None,
            tick_ms: Some(250),
        }),
        retention: Default::default(),
        users: vec![User {
            name: "simulate".into(),
            role: Role::Admin,
            token_sha256: millwright_server::auth::token_hash(&token),
        }],
    })?;
    let api =
        ApiArgs { server: format!("https://{http}"), token: Some(token), ca_cert: Some(ca_cert) };
    Ok(Fleet {
        config,
        broker,
        mosquitto,
        gateways,
        server_key: server_key.verifying_key(),
        api,
        releases,
    })
}

/// A call of the (blocking) API client, on a blocking thread.
async fn api_call<F>(api: &ApiArgs, call: F) -> anyhow::Result<serde_json::Value>
where
    F: FnOnce(&ApiArgs) -> anyhow::Result<serde_json::Value> + Send + 'static,
{
    let api = api.clone();
    tokio::task::spawn_blocking(move || call(&api)).await?
}

/// GET on the API from a blocking thread.
async fn api_get(api: &ApiArgs, path: &'static str) -> anyhow::Result<serde_json::Value> {
    api_call(api, move |a| a.get(path)).await
}

async fn simulate(args: &SimulateArgs, dir: &Path) -> Result<(), Failure> {
    let begun = Instant::now();
    let fleet = tokio::task::block_in_place(|| make_fleet(args.devices, dir, args))?;
    let setup_s = begun.elapsed().as_secs_f64();
    let mqtt = fleet.broker;
    let mosquitto = match &fleet.mosquitto {
        Some(conf) => Some(MosquittoProcess::start(conf, mqtt, dir)?),
        None => None,
    };
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = tokio::spawn(millwright_server::run(fleet.config, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(h) = api_get(&fleet.api, "/api/v1/health").await
                && h["broker_connected"] == true
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if ready.is_err() {
        let _ = stop_tx.send(true);
        let why = match server.await {
            Ok(Err(e)) => format!("{e:#}"),
            _ => "its health endpoint never said the broker is connected".into(),
        };
        return Err(anyhow::anyhow!("the simulator's server did not start in 60 s: {why}").into());
    }

    let plan = Arc::new(Plan {
        mqtt,
        server_key: fleet.server_key,
        records: args.records,
        in_flight: args.in_flight.max(1),
        rate: args.rate,
        status_every: Duration::from_secs(args.status_secs.max(1)),
        resend_after: Duration::from_secs(args.resend_secs.max(1)),
        asset: AssetId::new("unit-1")?,
        model: match &fleet.releases {
            Some(r) => r.model.clone(),
            None => ModelName::new("simulated")?,
        },
        zero: Instant::now(),
        root: fleet.releases.as_ref().map(|r| r.root.clone()),
    });
    let counters = Arc::new(Counters::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    let connecting = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let n = fleet.gateways.len() as u64;
    let mut tasks = Vec::with_capacity(fleet.gateways.len());
    // The gateway whose pages the API probe reads, as the dashboard's device view does.
    let first_device = fleet.gateways.first().map(|g| g.device.to_string()).unwrap_or_default();
    for g in fleet.gateways {
        let (plan, counters, phase) = (plan.clone(), counters.clone(), phase_rx.clone());
        tasks.push(tokio::spawn(gateway(g, plan, counters, phase, connecting.clone())));
    }

    let bar = ProgressBar::new(n);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("connected");
    let connect_started = Instant::now();
    let deadline = connect_started + Duration::from_secs(args.connect_timeout_secs);
    while Counters::get(&counters.connected) < n {
        if Instant::now() > deadline {
            let connected = Counters::get(&counters.connected);
            bar.abandon();
            let _ = phase_tx.send(Phase::Done);
            let _ = stop_tx.send(true);
            return Err(anyhow::anyhow!(
                "{connected} of {n} gateways connected in {} s (--connect-timeout-secs)",
                args.connect_timeout_secs
            )
            .into());
        }
        bar.set_position(Counters::get(&counters.connected));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_s = connect_started.elapsed().as_secs_f64();

    bar.set_length(args.seconds);
    bar.set_position(0);
    let sending_started = Instant::now();
    let _ = phase_tx.send(Phase::Sending);
    let (batches0, records0) =
        (Counters::get(&counters.acked_batches), Counters::get(&counters.acked_records));
    let mut last = (batches0, Instant::now());
    let (progress_tx, progress) = watch::channel(String::new());
    let rollout = fleet.releases.map(|releases| {
        let (api, n) = (fleet.api.clone(), args.devices);
        let spec = rollout_spec(args, &releases.model);
        let timeout = Duration::from_secs(args.rollout_timeout_secs);
        tokio::spawn(drive_rollout(api, releases, spec, n, timeout, progress_tx))
    });
    let probe = ApiProbe::start(fleet.api.clone(), first_device.clone());
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    let mut second = 0;
    while second < args.seconds || rollout.as_ref().is_some_and(|r| !r.is_finished()) {
        every.tick().await;
        second += 1;
        let batches = Counters::get(&counters.acked_batches);
        let rate = (batches - last.0) as f64 / last.1.elapsed().as_secs_f64();
        last = (batches, Instant::now());
        bar.set_position(second.min(args.seconds));
        bar.set_message(format!(
            "s · {rate:.0} msgs/s now · {} acked · {} reconnects{}",
            batches - batches0,
            Counters::get(&counters.reconnects),
            progress.borrow().as_str(),
        ));
    }
    let rollout = match rollout {
        Some(handle) => Some(handle.await.map_err(anyhow::Error::from)??),
        None => None,
    };
    let window = sending_started.elapsed().as_secs_f64();
    let api = probe.stop();
    let (batches1, records1) =
        (Counters::get(&counters.acked_batches), Counters::get(&counters.acked_records));
    let _ = phase_tx.send(Phase::Draining);
    bar.set_message("s · draining: waiting for the last acks");

    let drain_started = Instant::now();
    let mut outcomes = Vec::with_capacity(tasks.len());
    let drain = tokio::time::sleep(Duration::from_secs(args.drain_secs));
    tokio::pin!(drain);
    let mut timed_out = false;
    for mut t in tasks {
        loop {
            tokio::select! {
                biased;
                o = &mut t => {
                    if let Ok(o) = o {
                        outcomes.push(o);
                    }
                    break;
                }
                _ = &mut drain, if !timed_out => {
                    // Gateways stop waiting and hand back their books as they are.
                    timed_out = true;
                    let _ = phase_tx.send(Phase::Done);
                }
            }
        }
    }
    let drain_s = drain_started.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let stored: HashMap<String, u64> = api_get(&fleet.api, "/api/v1/devices")
        .await
        .context("the server's device list")?
        .as_array()
        .context("the server's device list is not a list")?
        .iter()
        .filter_map(|d| Some((d["device"].as_str()?.to_owned(), d["predictions"].as_u64()?)))
        .collect();
    let health = api_get(&fleet.api, "/api/v1/health").await.unwrap_or_default();
    let publishes_dropped = health["publishes_dropped"].as_u64().unwrap_or(0);
    let (chunks_sent, chunk_repeats) = (
        health["delivery"]["sent"].as_u64().unwrap_or(0),
        health["delivery"]["repeats"].as_u64().unwrap_or(0),
    );
    let broker = match &mosquitto {
        Some(m) => format!("mosquitto broker_rss_mib={:.0}", memory_mib_of(m.pid(), "VmRSS:")),
        None => "embedded".to_owned(),
    };
    let _ = stop_tx.send(true);
    let _ = server.await;

    let books = outcomes.iter().map(|o| Books {
        sent: o.ledger.sent(),
        acked: o.ledger.acked,
        stored: stored.get(o.device.as_str()).copied().unwrap_or(0),
    });
    let (lost, duplicated) = ledger::reconcile(books.clone());
    let sent: u64 = books.clone().map(|b| b.sent).sum();
    let kept: u64 = books.map(|b| b.stored).sum();
    let missing = n - outcomes.len() as u64;
    let unacked: u64 = outcomes
        .iter()
        .map(|o| o.ledger.sent().saturating_sub(o.ledger.acked + o.ledger.refused))
        .sum();
    let refused: u64 = outcomes.iter().map(|o| o.ledger.refused).sum();
    let repeated: u64 = outcomes.iter().map(|o| o.ledger.repeated).sum();
    let mut latencies: Vec<u32> =
        outcomes.iter().flat_map(|o| o.ledger.latencies_us.iter().copied()).collect();
    latencies.sort_unstable();
    let ms = |q: f64| f64::from(ledger::percentile(&latencies, q)) / 1000.0;
    println!(
        "simulate: devices={n} seconds={} msgs_per_s={:.0} records_per_s={:.0} ack_p50_ms={:.1} \
         ack_p99_ms={:.1} lost={lost} duplicated={duplicated} sent={sent} stored={kept} unacked={unacked} refused={refused} \
         repeated_acks={repeated} bad_acks={} reconnects={} statuses={} setup_s={setup_s:.1} \
         connect_s={connect_s:.1} drain_s={drain_s:.1} rss_mib={:.0} hwm_mib={:.0} \
         publishes_dropped={publishes_dropped} api_reads={} api_failed={} api_p50_ms={:.1} \
         api_p99_ms={:.1} api_max_ms={:.1} broker={broker}",
        args.seconds,
        (batches1 - batches0) as f64 / window,
        (records1 - records0) as f64 / window,
        ms(0.5),
        ms(0.99),
        Counters::get(&counters.bad_acks),
        Counters::get(&counters.reconnects),
        Counters::get(&counters.statuses),
        memory_mib("VmRSS:"),
        memory_mib("VmHWM:"),
        api.latencies_ms.len(),
        api.failed,
        ledger::percentile(&api.latencies_ms, 0.5),
        ledger::percentile(&api.latencies_ms, 0.99),
        api.latencies_ms.last().copied().unwrap_or(0.0),
    );
    let mut problems = Vec::new();
    if let Some(r) = &rollout {
        println!(
            "rollout: devices={n} state={} wave={}/{} committed={} failed={} notified_s={:.1} \
             finished_s={:.1} reports={} chunks={} bad_chunks={} bad_directives={} \
             chunks_sent={chunks_sent} chunk_repeats={chunk_repeats}",
            r.state,
            r.wave + 1,
            r.waves,
            r.committed,
            r.failed,
            r.notified_s,
            r.finished_s,
            Counters::get(&counters.reports),
            Counters::get(&counters.chunks),
            Counters::get(&counters.bad_chunks),
            Counters::get(&counters.bad_directives),
        );
        if let Some(reason) = &r.reason {
            println!("rollout reason: {reason}");
        }
        let bad = Counters::get(&counters.bad_chunks) + Counters::get(&counters.bad_directives);
        if bad > 0 {
            problems
                .push(format!("{bad} directives or chunks from the server failed their checks"));
        }
    }
    if lost > 0 {
        problems.push(format!("{lost} acknowledged records are not stored"));
    }
    if duplicated > 0 {
        problems.push(format!("{duplicated} records are stored more than once"));
    }
    if unacked > 0 || missing > 0 {
        problems.push(format!(
            "{unacked} records still unacknowledged after {} s of drain ({missing} gateways \
             never finished)",
            args.drain_secs
        ));
    }
    if !problems.is_empty() {
        return Err(anyhow::anyhow!("{}", problems.join("; ")).into());
    }
    Ok(())
}

/// The rollout a run starts: release 2 to every gateway, a canary, then doubling waves with
/// no soak, paused when a wave's failures pass their share.
fn rollout_spec(args: &SimulateArgs, model: &ModelName) -> serde_json::Value {
    serde_json::json!({
        "model": model, "release": 2, "target": {"kind": "all"},
        "canary": {"percent": args.canary_percent}, "waves": "exponential", "soak_secs": 0,
        "device_timeout_secs": 120, "max_failures_per_wave": 0,
        "max_failures_percent": args.max_failures_percent, "on_failure": "pause",
        "activation": {"shadow_secs": args.phase_secs, "probation_secs": args.phase_secs,
            "gates": {"min_predictions": 0}},
        "reason": "millwright simulate",
    })
}

/// How a run's rollout ended, from the server's own record of it.
struct RolloutResult {
    state: String,
    wave: u64,
    waves: usize,
    committed: usize,
    failed: usize,
    /// From its start until every device had its directive (or until it stopped).
    notified_s: f64,
    /// From its start until it completed, paused or was reverted.
    finished_s: f64,
    reason: Option<String>,
}

/// Registers both releases, waits until every gateway's status says it serves release 1,
/// starts the rollout and follows it until it is no longer running; `progress` gets a line
/// for the progress bar.
async fn drive_rollout(
    api: ApiArgs,
    releases: Releases,
    spec: serde_json::Value,
    devices: usize,
    timeout: Duration,
    progress: watch::Sender<String>,
) -> anyhow::Result<RolloutResult> {
    for bytes in releases.bundles {
        api_call(&api, move |a| a.post_bytes("/api/v1/models", &bytes))
            .await
            .context("registering a release")?;
    }
    let started = Instant::now();
    loop {
        let list = api_get(&api, "/api/v1/devices").await?;
        let serving = list.as_array().map_or(0, |l| {
            l.iter().filter(|d| d["models"].as_array().is_some_and(|m| !m.is_empty())).count()
        });
        let _ = progress.send(format!(" · {serving}/{devices} serving release 1"));
        if serving >= devices {
            break;
        }
        if started.elapsed() > timeout {
            anyhow::bail!("only {serving} of {devices} gateways said they serve release 1");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = api_call(&api, move |a| a.post_json("/api/v1/rollouts", &spec))
        .await
        .context("starting the rollout")?;
    let id = r["id"].as_str().context("the rollout has no id")?.to_owned();
    let started = Instant::now();
    let count = |r: &serde_json::Value, state: &str| {
        r["devices"].as_array().map_or(0, |d| d.iter().filter(|d| d["state"] == state).count())
    };
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let path = format!("/api/v1/rollouts/{id}");
        let r = api_call(&api, move |a| a.get(&path)).await?;
        let state = r["state"].as_str().unwrap_or("?").to_owned();
        let waves = r["waves"].as_array().map_or(0, Vec::len);
        let line = format!(
            "wave {}/{waves}, {} committed, {} failed, {} waiting on their update",
            r["wave"].as_u64().unwrap_or(0) + 1,
            count(&r, "committed"),
            count(&r, "failed"),
            count(&r, "notified")
        );
        let _ = progress.send(format!(" · rollout {state}, {line}"));
        if state != "running" && state != "reverting" {
            let created = r["created_ms"].as_i64().unwrap_or(0);
            let since = |key: &str| r[key].as_i64().map(|t| (t - created) as f64 / 1000.0);
            let finished_s = since("finished_ms")
                .or_else(|| since("paused_ms"))
                .unwrap_or(started.elapsed().as_secs_f64());
            return Ok(RolloutResult {
                wave: r["wave"].as_u64().unwrap_or(0),
                waves,
                committed: count(&r, "committed"),
                failed: count(&r, "failed"),
                notified_s: since("all_notified_ms").unwrap_or(finished_s),
                finished_s,
                reason: r["reason"].as_str().map(str::to_owned),
                state,
            });
        }
        if started.elapsed() > timeout {
            anyhow::bail!("rollout {id} still {state} after {} s: {line}", timeout.as_secs());
        }
    }
}

/// This process's resident memory (server and simulator together), from /proc.
fn memory_mib(field: &str) -> f64 {
    memory_mib_of(std::process::id(), field)
}

/// A field of `/proc/<pid>/status` in MiB (0 when unreadable).
fn memory_mib_of(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// What the fleet dashboard reads, on one kept connection, round after round (a round a
/// second, three dashboards' worth of its 3 s poll) while the fleet sends.
const DASHBOARD_READS: [&str; 7] = [
    "/api/v1/health",
    "/api/v1/devices",
    "/api/v1/alerts?limit=500",
    "/api/v1/rollouts",
    "/api/v1/drift/drifting",
    "/api/v1/devices/{device}/latest",
    "/api/v1/devices/{device}/predictions?limit=10000&newest=true",
];

/// The dashboard's reads timed while the fleet sends.
struct ApiProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<ApiTimes>,
}

/// Read latencies in ms, sorted, and reads that failed.
#[derive(Default)]
struct ApiTimes {
    latencies_ms: Vec<f64>,
    failed: u64,
}

impl ApiProbe {
    fn start(api: ApiArgs, device: String) -> ApiProbe {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut times = ApiTimes::default();
            let Ok(agent) = api.agent(Duration::from_secs(30)) else { return times };
            while !flag.load(Ordering::Relaxed) {
                let round = Instant::now();
                for path in DASHBOARD_READS {
                    let path = path.replace("{device}", &device);
                    let t = Instant::now();
                    match api.get_with(&agent, &path) {
                        Ok(_) => times.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(_) => times.failed += 1,
                    }
                }
                std::thread::sleep(Duration::from_secs(1).saturating_sub(round.elapsed()));
            }
            times.latencies_ms.sort_by(f64::total_cmp);
            times
        });
        ApiProbe { stop, thread }
    }

    fn stop(self) -> ApiTimes {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The Mosquitto a `--mosquitto` run meets on, stopped when this is dropped.
struct MosquittoProcess {
    child: std::process::Child,
}

impl MosquittoProcess {
    fn start(conf: &Path, listen: SocketAddr, dir: &Path) -> anyhow::Result<MosquittoProcess> {
        let exe = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain([PathBuf::from("/usr/sbin")])
            .map(|d| d.join("mosquitto"))
            .find(|p| p.is_file())
            .context(
                "--mosquitto: no mosquitto in PATH or /usr/sbin (apt-get install mosquitto)",
            )?;
        let log = std::fs::File::create(dir.join("mosquitto.log"))?;
        let child = std::process::Command::new(&exe)
            .arg("-c")
            .arg(conf)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let mut m = MosquittoProcess { child };
        for _ in 0..100 {
            if std::net::TcpStream::connect(listen).is_ok() {
                return Ok(m);
            }
            if let Ok(Some(status)) = m.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default();
                anyhow::bail!("mosquitto exited ({status}):\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("mosquitto did not listen on {listen} in 10 s")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for MosquittoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn micros(plan: &Plan) -> u64 {
    u64::try_from(plan.zero.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn status_payload(
    g: &Gateway,
    (at_ms, started_ms): (i64, i64),
    online: bool,
    backlog: u64,
    models: Vec<wire::RunningModel>,
) -> Vec<u8> {
    let body = wire::encode(&DeviceStatus {
        v: WIRE_VERSION,
        device: g.device.clone(),
        at_ms,
        started_ms,
        online,
        agent_version: concat!("simulate-", env!("CARGO_PKG_VERSION")).into(),
        site: Some(g.site.clone()),
        tags: Vec::new(),
        device_class: None,
        models,
        backlog: online.then_some(wire::Backlog { records: backlog, oldest_at_ms: None }),
    });
    signed::seal(&g.key, Purpose::Status, &g.device, &body)
}

fn batch_payload(
    g: &Gateway,
    plan: &Plan,
    epoch: &str,
    serving: u64,
    (first, last): ledger::Batch,
) -> Vec<u8> {
    let at_ms = clock::now_ms();
    let body = wire::encode(&UplinkBatch {
        v: WIRE_VERSION,
        device: g.device.clone(),
        epoch: epoch.to_owned(),
        stream: Stream::Predictions,
        records: (first..=last)
            .map(|seq| Record {
                seq,
                at_ms,
                body: RecordBody::Prediction(Prediction {
                    asset: plan.asset.clone(),
                    cycle: seq,
                    model: plan.model.clone(),
                    release: Release(serving),
                    value: 100.0 - (seq % 100) as f32,
                }),
            })
            .collect(),
    });
    signed::seal(&g.key, Purpose::Uplink(Stream::Predictions), &g.device, &body)
}

/// A gateway's side of a rollout: the directive it applied last, the update in progress,
/// its update reports until acknowledged, the release it serves. Its methods return what to
/// publish.
struct UpdateSide {
    last: Option<(u64, Vec<u8>)>,
    current: Option<update::Update>,
    /// Update reports sent and not acknowledged: seq → (when sent, payload).
    reports: std::collections::BTreeMap<u64, (u64, Vec<u8>)>,
    next_seq: u64,
    serving: u64,
}

type Publish = (String, Vec<u8>);

impl UpdateSide {
    fn new() -> UpdateSide {
        UpdateSide {
            last: None,
            current: None,
            reports: Default::default(),
            next_seq: 1,
            serving: 1,
        }
    }

    /// The retained directive on the gateway's topic: verified with the root, as an agent does.
    fn on_directive(
        &mut self,
        g: &Gateway,
        root: &millwright_shared::trust::Root,
        counters: &Counters,
        (epoch, now_us): (&str, u64),
        payload: &[u8],
    ) -> Vec<Publish> {
        use millwright_shared::directive::{self, Verdict};
        if payload.is_empty() {
            return Vec::new();
        }
        let last = self.last.as_ref().map(|(seq, bytes)| (*seq, bytes.as_slice()));
        match directive::verify(payload, root, &g.device, last, 64 << 20, clock::now()) {
            Ok(Verdict::New(d)) => {
                self.last = Some((d.seq, payload.to_vec()));
                let (update, out) = update::Update::start(*d, g.fail, now_us);
                self.current = Some(update);
                self.carry_out(g, epoch, now_us, out)
            }
            Ok(Verdict::Applied) => Vec::new(),
            Err(_) => {
                Counters::add(&counters.bad_directives, 1);
                Vec::new()
            }
        }
    }

    /// A chunk: the server's signature for this gateway, then the update's digests.
    fn on_chunk(
        &mut self,
        g: &Gateway,
        plan: &Plan,
        counters: &Counters,
        (epoch, now_us): (&str, u64),
        payload: &[u8],
    ) -> Vec<Publish> {
        use base64::Engine as _;
        let checked = signed::verify(payload, &plan.server_key, Purpose::Chunk, &g.device)
            .ok()
            .and_then(|body| wire::Chunk::decode(body).ok())
            .and_then(|c| {
                let data = base64::engine::general_purpose::STANDARD.decode(&c.data).ok()?;
                Some((c, data))
            });
        let Some((chunk, data)) = checked else {
            Counters::add(&counters.bad_chunks, 1);
            return Vec::new();
        };
        let Some(update) = &mut self.current else { return Vec::new() };
        match update.on_chunk(&chunk, &data, now_us) {
            Ok(out) => {
                Counters::add(&counters.chunks, 1);
                self.carry_out(g, epoch, now_us, out)
            }
            Err(_) => {
                Counters::add(&counters.bad_chunks, 1);
                Vec::new()
            }
        }
    }

    /// Once a second: the update's timers, and reports unacknowledged for `resend_after`.
    fn on_time(&mut self, g: &Gateway, plan: &Plan, epoch: &str, now_us: u64) -> Vec<Publish> {
        let out = self.current.as_mut().map(|u| u.on_time(now_us)).unwrap_or_default();
        let mut publishes = self.carry_out(g, epoch, now_us, out);
        let after = plan.resend_after.as_micros() as u64;
        let topic = topics::uplink(&g.device, Stream::Updates);
        for (sent, payload) in self.reports.values_mut() {
            if now_us.saturating_sub(*sent) >= after {
                *sent = now_us;
                publishes.push((topic.clone(), payload.clone()));
            }
        }
        publishes
    }

    /// An ack of the update stream; returns how many reports it acknowledged.
    fn on_ack(&mut self, ack: &Ack) -> u64 {
        let before = self.reports.len();
        for &(first, last) in ack.ranges.iter().chain(&ack.refused) {
            self.reports.retain(|&seq, _| seq < first || seq > last);
        }
        (before - self.reports.len()) as u64
    }

    /// What the update asked for, as publishes: chunk requests, reports (kept until acked),
    /// and a fresh status when the served release changes.
    fn carry_out(
        &mut self,
        g: &Gateway,
        epoch: &str,
        now_us: u64,
        out: Vec<update::Out>,
    ) -> Vec<Publish> {
        let mut publishes = Vec::new();
        for o in out {
            match o {
                update::Out::Fetch { first, count } => {
                    let Some(u) = &self.current else { continue };
                    let sha256 = u.bundle_sha256().to_owned();
                    let request = wire::FetchRequest { v: WIRE_VERSION, sha256, first, count };
                    let body = wire::encode(&request);
                    let sealed = signed::seal(&g.key, Purpose::Fetch, &g.device, &body);
                    publishes.push((topics::fetch(&g.device), sealed));
                }
                update::Out::Report(report) => {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let body = wire::encode(&UplinkBatch {
                        v: WIRE_VERSION,
                        device: g.device.clone(),
                        epoch: epoch.to_owned(),
                        stream: Stream::Updates,
                        records: vec![Record {
                            seq,
                            at_ms: clock::now_ms(),
                            body: RecordBody::Update(report),
                        }],
                    });
                    let sealed =
                        signed::seal(&g.key, Purpose::Uplink(Stream::Updates), &g.device, &body);
                    self.reports.insert(seq, (now_us, sealed.clone()));
                    publishes.push((topics::uplink(&g.device, Stream::Updates), sealed));
                }
                update::Out::Serving(release) => self.serving = release,
            }
        }
        publishes
    }
}

/// One gateway: connect, send while the run is on, keep the books, wait for the last acks
/// (and in a rollout run, take the rollout).
async fn gateway(
    g: Gateway,
    plan: Arc<Plan>,
    counters: Arc<Counters>,
    mut phase: watch::Receiver<Phase>,
    connecting: Arc<Semaphore>,
) -> Outcome {
    let client_id = g.device.to_string();
    let password = signed::connect_password(&g.key, &g.device, &client_id);
    let (ack_topic, status_topic) = (topics::ack(&g.device), topics::status(&g.device));
    let uplink_topic = topics::uplink(&g.device, Stream::Predictions);
    let (desired_topic, chunk_topic) = (topics::desired(&g.device), topics::chunk(&g.device));
    let epoch = format!("sim{:013x}", clock::now_ms());
    let started_ms = clock::now_ms();
    let mut ledger = Ledger::new(plan.records, plan.in_flight);
    let mut updates = UpdateSide::new();
    let models = |serving: u64| match plan.root {
        Some(_) => vec![wire::RunningModel {
            model: plan.model.clone(),
            release: Release(serving),
            sha256: String::new(),
        }],
        None => Vec::new(),
    };
    let mut subscriptions = vec![ack_topic.clone()];
    if plan.root.is_some() {
        subscriptions.extend([desired_topic.clone(), chunk_topic.clone()]);
    }
    let (tx, mut rx) = mpsc::channel(64);
    let permit = connecting.acquire_owned().await;
    let client = mqtt::start(
        Connect {
            client_id: client_id.clone(),
            host: plan.mqtt.ip().to_string(),
            port: plan.mqtt.port(),
            transport: Transport::Tls(g.tls.clone()),
            credentials: Some((g.device.to_string(), password)),
            keep_alive: Duration::from_secs(30),
            reconnect_max: Duration::from_secs(10),
            last_will: Some((
                status_topic.clone(),
                status_payload(&g, (started_ms, started_ms), false, 0, models(1)),
            )),
            stall_after: mqtt::DEFAULT_STALL_AFTER,
            subscriptions,
            queue: mqtt::DEFAULT_QUEUE,
            inflight: mqtt::DEFAULT_INFLIGHT,
        },
        tx,
    );
    loop {
        match rx.recv().await {
            Some(MqttEvent::Connected) => break,
            Some(_) => {}
            None => return Outcome { device: g.device, ledger },
        }
        if *phase.borrow() == Phase::Done {
            return Outcome { device: g.device, ledger };
        }
    }
    drop(permit);
    Counters::add(&counters.connected, 1);

    let publish = |topic: String, payload: Vec<u8>, retain: bool| {
        let client = client.clone();
        async move {
            // A full request queue or a closed driver: the batch stays in flight, and the
            // resend (or the reconnect) sends it again.
            let _ = client.publish(topic, QoS::AtLeastOnce, retain, payload).await;
        }
    };
    let mut status_at_ms = started_ms;
    let status_offset = Duration::from_millis(random_below(plan.status_every.as_millis() as u64));
    let mut status =
        tokio::time::interval_at(tokio::time::Instant::now() + status_offset, plan.status_every);
    let period = (plan.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / plan.rate));
    let mut pace = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut current = *phase.borrow();
    // A status is due (its timer, or a new release served); in a rollout run at once, so the
    // server knows what each gateway serves before the rollout is planned.
    let mut force_status = plan.root.is_some();
    loop {
        let sending = current == Phase::Sending;
        // The closed loop fills the window whenever it has room; the paced one sends on ticks.
        if sending && period.is_none() {
            while let Some(b) = ledger.next_batch(micros(&plan), true) {
                publish(
                    uplink_topic.clone(),
                    batch_payload(&g, &plan, &epoch, updates.serving, b),
                    false,
                )
                .await;
            }
        }
        if (current == Phase::Draining && ledger.in_flight() == 0) || current == Phase::Done {
            break;
        }
        if std::mem::take(&mut force_status) {
            status_at_ms = clock::now_ms().max(status_at_ms + 1);
            let backlog = ledger.in_flight() as u64 * plan.records;
            let payload = status_payload(
                &g,
                (status_at_ms, started_ms),
                true,
                backlog,
                models(updates.serving),
            );
            publish(status_topic.clone(), payload, true).await;
            Counters::add(&counters.statuses, 1);
        }
        tokio::select! {
            event = rx.recv() => match event {
                Some(MqttEvent::Message { topic, payload }) if topic == ack_topic => {
                    let Ok(body) = signed::verify(&payload, &plan.server_key, Purpose::Ack, &g.device) else {
                        Counters::add(&counters.bad_acks, 1);
                        continue;
                    };
                    let Ok(ack) = Ack::decode(body) else {
                        Counters::add(&counters.bad_acks, 1);
                        continue;
                    };
                    if ack.epoch != epoch {
                        Counters::add(&counters.bad_acks, 1);
                        continue;
                    }
                    if ack.stream == Stream::Updates {
                        Counters::add(&counters.reports, updates.on_ack(&ack));
                        continue;
                    }
                    let before = ledger.acked;
                    let done = ledger.on_ack(micros(&plan), &ack.ranges, &ack.refused);
                    Counters::add(&counters.acked_batches, done);
                    Counters::add(&counters.acked_records, ledger.acked - before);
                }
                Some(MqttEvent::Message { topic, payload }) if topic == desired_topic => {
                    let Some(root) = &plan.root else { continue };
                    let serving = updates.serving;
                    let now = (epoch.as_str(), micros(&plan));
                    for (topic, payload) in updates.on_directive(&g, root, &counters, now, &payload) {
                        publish(topic, payload, false).await;
                    }
                    if updates.serving != serving {
                        force_status = true;
                    }
                }
                Some(MqttEvent::Message { topic, payload }) if topic == chunk_topic => {
                    let now = (epoch.as_str(), micros(&plan));
                    for (topic, payload) in updates.on_chunk(&g, &plan, &counters, now, &payload) {
                        publish(topic, payload, false).await;
                    }
                }
                Some(MqttEvent::Connected) => {
                    Counters::add(&counters.reconnects, 1);
                    for b in ledger.resend(micros(&plan), 0) {
                        publish(uplink_topic.clone(), batch_payload(&g, &plan, &epoch, updates.serving, b), false).await;
                    }
                }
                Some(_) => {}
                None => break,
            },
            _ = pace.tick(), if sending && period.is_some() => {
                if let Some(b) = ledger.next_batch(micros(&plan), true) {
                    publish(uplink_topic.clone(), batch_payload(&g, &plan, &epoch, updates.serving, b), false).await;
                }
            }
            _ = status.tick() => force_status = true,
            _ = housekeeping.tick() => {
                let again = ledger.resend(micros(&plan), plan.resend_after.as_micros() as u64);
                for b in again {
                    publish(uplink_topic.clone(), batch_payload(&g, &plan, &epoch, updates.serving, b), false).await;
                }
                let serving = updates.serving;
                for (topic, payload) in updates.on_time(&g, &plan, &epoch, micros(&plan)) {
                    publish(topic, payload, false).await;
                }
                force_status |= updates.serving != serving;
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    break;
                }
                current = *phase.borrow();
            }
        }
    }
    let _ = client.disconnect().await;
    Outcome { device: g.device, ledger }
}

/// A number below `n` (0 for 0), to spread the gateways' timers.
fn random_below(n: u64) -> u64 {
    let mut bytes = [0u8; 8];
    if n == 0 || getrandom::getrandom(&mut bytes).is_err() {
        return 0;
    }
    u64::from_le_bytes(bytes) % n
}
