//! `millwright demo`: the server with its embedded broker and three agents replaying
//! run-to-failure C-MAPSS engines with the signed reference model, all in one process, secure
//! as a real fleet: a fresh fleet CA, enrolled gateways with client certificates, TLS on the
//! broker, HTTPS on the dashboard and the gateways' pages, and random API tokens (written to
//! the data folder, printed once).

use super::Failure;
use anyhow::Context as _;
use millwright_agent::config::{
    RawAsset, RawConfig, RawDrift, RawIdentity as AgentIdentity, RawSource, RawTrust, RawUplink,
};
use millwright_server::config::{
    Config as ServerConfig, RawConfig as RawServer, RawIdentity, RawModels, RawMqtt, RawRollouts,
    Role, User,
};
use millwright_server::db::Db;
use millwright_server::pki::{Leaf, Usage};
use millwright_shared::DeviceId;
use millwright_shared::enrollment as files;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub const BUNDLE: &str = "models/rul-cnn-fd001/rul-cnn-fd001.mwb";
pub const PUBLIC_KEY: &str = "models/keys/demo-release.pub.json";
pub const SECRET_KEY: &str = "models/keys/demo-release.secret.json";
pub const DATA: &str = "data/cmapss/train_FD001_units_1-6.txt";
/// Engines under operating conditions the model was not trained on: the drifting site.
pub const DRIFTING_DATA: &str = "data/cmapss/train_FD002_units_1-2.txt";
/// Seconds per drift report in the demo (an hour by default on real gateways).
const DRIFT_INTERVAL_SECS: u64 = 10;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// HTTP API address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// Embedded MQTT broker address (TLS).
    #[arg(long, default_value = "127.0.0.1:8883")]
    mqtt: String,
    /// Working folder (wiped at start).
    #[arg(long, default_value = "demo-data")]
    data_dir: PathBuf,
    /// Replay speed per engine.
    #[arg(long, default_value_t = 10.0)]
    cycles_per_second: f64,
    /// How long each wave of the demo rollout soaks before the next (long enough to watch it,
    /// or pause it, on the dashboard).
    #[arg(long, default_value_t = 20)]
    soak_secs: u64,
}

/// The demo's operator PIN for acknowledging alerts on the gateways' local pages.
pub const PIN: &str = "1234";

/// The local page of the `index`-th gateway (from 0): the HTTP port plus one, two, three.
fn local_page(http: &str, index: usize) -> anyhow::Result<std::net::SocketAddr> {
    let mut addr: std::net::SocketAddr =
        http.parse().with_context(|| format!("--http {http:?} is not an address:port"))?;
    let port = addr.port().checked_add(1 + index as u16).context("--http port too high")?;
    addr.set_port(port);
    Ok(addr)
}

/// One demo gateway: its id, site, data file and the units it replays.
struct Gateway {
    device: &'static str,
    site: &'static str,
    data: &'static str,
    units: [u32; 2],
}

const GATEWAYS: [Gateway; 3] = [
    Gateway { device: "gw-01", site: "plant-north", data: DATA, units: [1, 2] },
    Gateway { device: "gw-02", site: "plant-north", data: DATA, units: [3, 4] },
    Gateway { device: "gw-03", site: "plant-south", data: DRIFTING_DATA, units: [1, 2] },
];

fn agent_config(
    root: &Path,
    args: &DemoArgs,
    index: usize,
    trust_root: &Path,
    identity: &Path,
) -> anyhow::Result<millwright_agent::Config> {
    let gateway = &GATEWAYS[index];
    let raw = RawConfig {
        device: gateway.device.to_owned(),
        site: Some(gateway.site.to_owned()),
        tags: Vec::new(),
        device_class: None,
        data_dir: args.data_dir.join(gateway.device),
        allow_plaintext: false,
        identity: Some(AgentIdentity { dir: identity.to_owned() }),
        uplink: RawUplink { broker: format!("mqtts://{}", args.mqtt), ..Default::default() },
        trust: RawTrust { root: Some(trust_root.to_owned()), keys: Vec::new(), threshold: None },
        updates: Default::default(),
        drift: RawDrift { interval_secs: Some(DRIFT_INTERVAL_SECS), ..Default::default() },
        local: millwright_agent::config::RawLocal {
            listen: Some(local_page(&args.http, index)?.to_string()),
            operator_pin: Some(PIN.into()),
            cert: Some(identity.join(files::PAGE_CERT)),
            key: Some(identity.join(files::PAGE_KEY)),
        },
        outbox: Default::default(),
        status_file_secs: None,
        assets: gateway
            .units
            .iter()
            .map(|unit| RawAsset {
                id: format!("engine-{unit}"),
                asset_type: "turbofan".into(),
                bundle: PathBuf::from(BUNDLE),
                source: RawSource::Cmapss {
                    path: PathBuf::from(gateway.data),
                    unit: *unit,
                    cycles_per_second: Some(args.cycles_per_second),
                },
            })
            .collect(),
    };
    Ok(millwright_agent::Config::from_raw(raw, root)?)
}

/// The demo's API tokens, made fresh for each run.
pub struct Tokens {
    pub admin: String,
    pub operator: String,
    pub viewer: String,
}

/// Where the demo's fleet CA, certificates and tokens are, under its data folder.
pub fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

/// The file holding the demo's token for `role` ("admin", "operator", "viewer").
pub fn token_file(data_dir: &Path, role: &str) -> PathBuf {
    data_dir.join(format!("{role}.token"))
}

/// The fleet CA, the server's certificate (for every address the demo listens on) and each
/// gateway's identity folder, enrolled in the server's registry before the server starts.
fn secure_fleet(
    args: &DemoArgs,
    server_key: &Path,
    server_db: &Path,
) -> anyhow::Result<(PathBuf, Vec<PathBuf>, Tokens)> {
    let pki = pki_dir(&args.data_dir);
    std::fs::create_dir_all(&pki)?;
    let now = millwright_io::clock::now();
    let ca = millwright_server::pki::create_ca("Millwright demo fleet CA", now, 30)?;
    let ca_cert = pki.join(super::ca::CA_CERT);
    super::bundle::write(&pki.join(super::ca::CA_KEY), ca.key_pem.as_bytes(), true)?;
    super::bundle::write(&ca_cert, ca.cert_pem.as_bytes(), false)?;
    let issuer = millwright_server::pki::Ca::load(&ca.cert_pem, &ca.key_pem)?;
    let mut server = Leaf::new(millwright_server::identity::SERVER_USER, Usage::Server, now, 30);
    server.dns.push("localhost".into());
    server.ips.push(std::net::IpAddr::from([127, 0, 0, 1]));
    for addr in [&args.http, &args.mqtt] {
        let ip = addr
            .parse::<std::net::SocketAddr>()
            .with_context(|| format!("{addr:?} is not an address:port"))?
            .ip();
        if !server.ips.contains(&ip) && !ip.is_unspecified() {
            server.ips.push(ip);
        }
    }
    let server = issuer.issue(&server)?;
    super::bundle::write(&pki.join("server.key.pem"), server.key_pem.as_bytes(), true)?;
    super::bundle::write(&pki.join("server.crt.pem"), server.cert_pem.as_bytes(), false)?;
    let (_, key) = super::bundle::load_secret(server_key)?;
    let mut db = Db::open(server_db)?;
    let mut identities = Vec::new();
    for (i, g) in GATEWAYS.iter().enumerate() {
        let dir = pki.join(g.device);
        let page = local_page(&args.http, i)?.ip().to_string();
        let spec = super::device::IdentitySpec {
            site: Some(g.site.to_owned()),
            page_hosts: vec![page],
            ..Default::default()
        };
        let device = DeviceId::new(g.device)?;
        let enrollment = super::device::make_identity(
            &issuer,
            &ca.cert_pem,
            &dir,
            &device,
            &key.verifying_key(),
            &spec,
            30,
        )?;
        db.enroll(&enrollment, "demo", millwright_io::clock::now_ms())?;
        identities.push(dir);
    }
    let token =
        || millwright_server::auth::new_token().map_err(|e| anyhow::anyhow!("no randomness: {e}"));
    let tokens = Tokens { admin: token()?, operator: token()?, viewer: token()? };
    for (role, t) in
        [("admin", &tokens.admin), ("operator", &tokens.operator), ("viewer", &tokens.viewer)]
    {
        super::bundle::write(&token_file(&args.data_dir, role), t.as_bytes(), true)?;
    }
    Ok((ca_cert, identities, tokens))
}

pub fn run(args: DemoArgs) -> Result<(), Failure> {
    let root = std::env::current_dir()?;
    for needed in [BUNDLE, PUBLIC_KEY, SECRET_KEY, DATA, DRIFTING_DATA] {
        if !root.join(needed).exists() {
            return Err(anyhow::anyhow!(
                "{needed} not found: run the demo from the repository root"
            )
            .into());
        }
    }
    if args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("cannot clear {}", args.data_dir.display()))?;
    }
    let trust =
        super::demo_rollout::prepare(&root, &args.data_dir.join("trust"), BUNDLE, SECRET_KEY)?;
    let server_data = args.data_dir.join("server");
    std::fs::create_dir_all(&server_data)?;
    let (ca_cert, identities, tokens) =
        secure_fleet(&args, &trust.server_key, &server_data.join("server.sqlite"))?;
    let pki = pki_dir(&args.data_dir);
    let user = |name: &str, role, token: &str| User {
        name: name.into(),
        role,
        token_sha256: millwright_server::auth::token_hash(token),
    };
    let server = ServerConfig::from_raw(RawServer {
        data_dir: Some(server_data),
        http_listen: Some(args.http.clone()),
        allow_plaintext: false,
        identity: Some(RawIdentity {
            server_key: trust.server_key.clone(),
            ca: Some(ca_cert.clone()),
            cert: Some(pki.join("server.crt.pem")),
            key: Some(pki.join("server.key.pem")),
            ..Default::default()
        }),
        mqtt: RawMqtt { embedded_listen: Some(args.mqtt.clone()), broker: None, client_id: None },
        models: RawModels {
            bundles: vec![root.join(BUNDLE)],
            trusted_keys: vec![root.join(PUBLIC_KEY)],
            threshold: None,
        },
        drift: Default::default(),
        rollouts: Some(RawRollouts {
            root: trust.root.clone(),
            chunk_size: Some(16 * 1024),
            ..Default::default()
        }),
        retention: Default::default(),
        users: vec![
            user("demo-admin", Role::Admin, &tokens.admin),
            user("demo-operator", Role::Operator, &tokens.operator),
            user("demo-viewer", Role::Viewer, &tokens.viewer),
        ],
    })?;
    let agents = (0..GATEWAYS.len())
        .map(|index| agent_config(&root, &args, index, &trust.root, &identities[index]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let started = Instant::now();
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let db_path = server.data_dir.join("server.sqlite");
        let server_task = tokio::spawn(millwright_server::run(server, stopped(stop_rx.clone())));
        // Agents start once the server (and its broker) is up.
        while !db_path.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut tasks = Vec::new();
        for config in agents {
            tasks.push(tokio::spawn(millwright_agent::run(config, stopped(stop_rx.clone()))));
        }
        println!("Millwright demo: 1 server (embedded broker on mqtts://{}, client certificates required), 3 enrolled agents, 6 engines replayed at {} cycles/s", args.mqtt, args.cycles_per_second);
        println!("  gw-01, gw-02 (plant-north): FD001 engines, the conditions the model was trained on");
        println!("  gw-03 (plant-south): FD002 engines in six other operating conditions: drift, then a retraining recommendation");
        let data = args.data_dir.display();
        println!("  fleet CA: {} (trust it in your browser, or pass it to curl with --cacert)", ca_cert.display());
        println!("  dashboard: https://{}/   sign in with the token in {data}/operator.token (or admin.token, viewer.token)", args.http);
        for (i, g) in GATEWAYS.iter().enumerate() {
            if let Ok(addr) = local_page(&args.http, i) {
                println!("  {} local page: https://{addr}/   (operator PIN {PIN})", g.device);
            }
        }
        let auth = format!("--cacert {} -H \"Authorization: Bearer $(cat {data}/viewer.token)\"", ca_cert.display());
        println!("  fleet:   curl {auth} https://{}/api/v1/devices", args.http);
        println!("  latest:  curl {auth} https://{}/api/v1/devices/gw-01/latest", args.http);
        println!("  alerts:  curl {auth} https://{}/api/v1/alerts", args.http);
        println!("  health:  curl --cacert {} https://{}/api/v1/health", ca_cert.display(), args.http);
        println!("  drift:   curl {auth} 'https://{}/api/v1/drift?by=site'   (reports every {DRIFT_INTERVAL_SECS} s)", args.http);
        println!("  retraining: curl {auth} https://{}/api/v1/drift/events", args.http);
        println!("  rollout:  release 2 of the model goes out 2 s after the first prediction: canary gw-01 (shadow, probation), then gw-02 and gw-03, {} s of soak per wave", args.soak_secs);
        println!("            MILLWRIGHT_CA={} MILLWRIGHT_TOKEN=$(cat {data}/viewer.token) millwright rollout status r1 --follow", ca_cert.display());
        println!("Press ctrl-c to stop.");
        let mut first: Option<Duration> = None;
        let mut rollout_started = false;
        let mut every = tokio::time::interval(Duration::from_secs(5));
        let mut rollout_check = tokio::time::interval(Duration::from_secs(1));
        let ctrl_c = millwright_agent::signal::shutdown();
        tokio::pin!(ctrl_c);
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = &mut ctrl_c => break,
                _ = poll.tick(), if first.is_none() => {
                    if let Ok(db) = Db::open_reader(&db_path)
                        && db.totals().is_ok_and(|(_, p, _)| p > 0)
                    {
                        let t = started.elapsed();
                        first = Some(t);
                        println!("first prediction stored by the server {:.2} s after start", t.as_secs_f64());
                    }
                }
                _ = rollout_check.tick(), if !rollout_started => {
                    if first.is_some_and(|t| started.elapsed() > t + Duration::from_secs(2)) {
                        rollout_started = true;
                        let (http, root, release_2) = (args.http.clone(), root.clone(), trust.release_2.clone());
                        let soak = args.soak_secs;
                        let access = super::demo_rollout::Access {
                            ca: ca_cert.clone(),
                            admin: tokens.admin.clone(),
                            operator: tokens.operator.clone(),
                        };
                        let started = tokio::task::spawn_blocking(move || {
                            super::demo_rollout::start(&http, &access, &root, BUNDLE, &release_2, soak)
                        }).await;
                        match started {
                            Ok(Ok(id)) => println!("rollout {id} started: release 2 of {} to the fleet", super::demo_rollout::MODEL),
                            Ok(Err(e)) => println!("rollout not started: {e:#}"),
                            Err(e) => println!("rollout not started: {e}"),
                        }
                    }
                }
                _ = every.tick() => print_summary(&db_path),
            }
        }
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        let _ = server_task.await;
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(())
}

fn print_summary(db_path: &Path) {
    let Ok(db) = Db::open_reader(db_path) else { return };
    let Ok(devices) = db.devices() else { return };
    for r in db.rollouts().unwrap_or_default() {
        let count = |s: millwright_server::rollout::DeviceState| {
            r.devices.iter().filter(|d| d.state == s).count()
        };
        println!(
            "rollout {} → release {}: {:?}, wave {}/{}, {} of {} committed, {} failed",
            r.id,
            r.spec.release,
            r.state,
            r.wave + 1,
            r.waves.len(),
            count(millwright_server::rollout::DeviceState::Committed),
            r.devices.len(),
            count(millwright_server::rollout::DeviceState::Failed)
        );
    }
    if let Ok(latest) = db.drift_latest(&Default::default()) {
        let drifting = millwright_server::drift::drifting(&latest);
        let drift: std::collections::BTreeSet<String> = drifting
            .iter()
            .filter(|d| d.severity == millwright_shared::drift::Severity::Drift)
            .map(|d| format!("{}/{}", d.device, d.asset))
            .collect();
        if !drift.is_empty() {
            println!(
                "drift: {} feature(s) drifting on {}",
                drifting.len(),
                drift.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
    }
    for e in db.retraining_events().unwrap_or_default() {
        let features: Vec<&str> = e.features.iter().map(|f| f.feature.as_str()).collect();
        println!(
            "retraining recommended for {} release {}: {}",
            e.model,
            e.release,
            features.join(", ")
        );
    }
    for d in devices {
        let latest = db.latest(&d.device).unwrap_or_default();
        let assets: Vec<String> = latest
            .iter()
            .filter_map(|a| {
                a.prediction.as_ref().map(|p| {
                    format!("{} cycle {} RUL {:.0} [{}]", a.asset, p.cycle, p.value, a.level)
                })
            })
            .collect();
        println!(
            "{} {}: {} predictions, {} alerts | {}",
            d.device,
            if d.online { "online" } else { "offline" },
            d.predictions,
            d.alerts,
            assets.join(" | ")
        );
    }
}
