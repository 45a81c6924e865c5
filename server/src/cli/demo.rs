//! `millwright demo`: the server with its embedded broker and three agents replaying
//! run-to-failure C-MAPSS engines with the signed reference model, all in one process.

use super::Failure;
use crate::config::{
    Config as ServerConfig, RawConfig as RawServer, RawModels, RawMqtt, RawRollouts, Role, User,
};
use crate::db::Db;
use anyhow::Context as _;
use millwright_agent::config::{RawAsset, RawConfig, RawDrift, RawSource, RawTrust, RawUplink};
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
    /// Embedded MQTT broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
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
) -> anyhow::Result<millwright_agent::Config> {
    let gateway = &GATEWAYS[index];
    let raw = RawConfig {
        device: gateway.device.to_owned(),
        site: Some(gateway.site.to_owned()),
        tags: Vec::new(),
        device_class: None,
        data_dir: args.data_dir.join(gateway.device),
        uplink: RawUplink { broker: args.mqtt.clone(), ..Default::default() },
        trust: RawTrust { root: Some(trust_root.to_owned()), keys: Vec::new(), threshold: None },
        updates: Default::default(),
        drift: RawDrift { interval_secs: Some(DRIFT_INTERVAL_SECS), ..Default::default() },
        local: millwright_agent::config::RawLocal {
            listen: Some(local_page(&args.http, index)?.to_string()),
            operator_pin: Some(PIN.into()),
        },
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
    let server = ServerConfig::from_raw(RawServer {
        data_dir: Some(args.data_dir.join("server")),
        http_listen: Some(args.http.clone()),
        mqtt: RawMqtt { embedded_listen: Some(args.mqtt.clone()), broker: None, client_id: None },
        models: RawModels {
            bundles: vec![root.join(BUNDLE)],
            trusted_keys: vec![root.join(PUBLIC_KEY)],
            threshold: None,
        },
        drift: Default::default(),
        rollouts: Some(RawRollouts {
            root: trust.root.clone(),
            server_key: trust.server_key.clone(),
            chunk_size: Some(16 * 1024),
            ..Default::default()
        }),
        users: vec![
            User {
                name: "demo-operator".into(),
                role: Role::Admin,
                token: super::demo_rollout::TOKEN.into(),
            },
            User {
                name: "demo-viewer".into(),
                role: Role::Viewer,
                token: super::demo_rollout::VIEWER_TOKEN.into(),
            },
        ],
    })?;
    let agents = (0..GATEWAYS.len())
        .map(|index| agent_config(&root, &args, index, &trust.root))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let started = Instant::now();
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let db_path = server.data_dir.join("server.sqlite");
        let server_task = tokio::spawn(crate::run(server, stopped(stop_rx.clone())));
        // Agents start once the server (and its broker) is up.
        while !db_path.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut tasks = Vec::new();
        for config in agents {
            tasks.push(tokio::spawn(millwright_agent::run(config, stopped(stop_rx.clone()))));
        }
        println!("Millwright demo: 1 server (embedded broker on {}), 3 agents, 6 engines replayed at {} cycles/s", args.mqtt, args.cycles_per_second);
        println!("  gw-01, gw-02 (plant-north): FD001 engines, the conditions the model was trained on");
        println!("  gw-03 (plant-south): FD002 engines in six other operating conditions: drift, then a retraining recommendation");
        let (token, viewer) = (super::demo_rollout::TOKEN, super::demo_rollout::VIEWER_TOKEN);
        println!("  dashboard: http://{}/   sign in with {token} (admin) or {viewer} (viewer)", args.http);
        for (i, g) in GATEWAYS.iter().enumerate() {
            if let Ok(addr) = local_page(&args.http, i) {
                println!("  {} local page: http://{addr}/   (operator PIN {PIN})", g.device);
            }
        }
        let auth = format!("-H 'Authorization: Bearer {viewer}'");
        println!("  fleet:   curl {auth} http://{}/api/v1/devices", args.http);
        println!("  latest:  curl {auth} http://{}/api/v1/devices/gw-01/latest", args.http);
        println!("  alerts:  curl {auth} http://{}/api/v1/alerts", args.http);
        println!("  health:  curl http://{}/api/v1/health", args.http);
        println!("  drift:   curl {auth} 'http://{}/api/v1/drift?by=site'   (reports every {DRIFT_INTERVAL_SECS} s)", args.http);
        println!("  retraining: curl {auth} http://{}/api/v1/drift/events", args.http);
        println!("  rollout:  release 2 of the model goes out 2 s after the first prediction: canary gw-01 (shadow, probation), then gw-02 and gw-03, {} s of soak per wave", args.soak_secs);
        println!("            MILLWRIGHT_TOKEN={token} millwright rollout status r1 --follow");
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
                        let started = tokio::task::spawn_blocking(move || {
                            super::demo_rollout::start(&http, &root, BUNDLE, &release_2, soak)
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
        let count =
            |s: crate::rollout::DeviceState| r.devices.iter().filter(|d| d.state == s).count();
        println!(
            "rollout {} → release {}: {:?}, wave {}/{}, {} of {} committed, {} failed",
            r.id,
            r.spec.release,
            r.state,
            r.wave + 1,
            r.waves.len(),
            count(crate::rollout::DeviceState::Committed),
            r.devices.len(),
            count(crate::rollout::DeviceState::Failed)
        );
    }
    if let Ok(latest) = db.drift_latest(&Default::default(), 1) {
        let drifting = crate::drift::drifting(&latest);
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
