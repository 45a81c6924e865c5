//! Rollouts on a real broker with twenty agents. A healthy release goes out through a 10 %
//! canary and two waves and ends on every device; three validly signed but bad releases (NaN
//! outputs on live data, ten times slower, disagreeing with the current model) stop at the
//! canary, which is reverted automatically, and the other eighteen devices never download them.
//! The registry refuses what the agent's loader refuses, and writes need a token.

use millwright_tests::trust::{ADMIN_TOKEN, OPERATOR_TOKEN, TrustKit, VIEWER_TOKEN};
use millwright_tests::variants;
use millwright_tests::{Agent, AgentSpec, BrokerChoice, Server, fleet_lock, repo_file, wait_until};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

const MODEL: &str = "rul-cnn-fd001";
const FLEET: usize = 20;

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn start_args(release: u64) -> Vec<String> {
    [
        "rollout",
        "start",
        "--model",
        MODEL,
        "--release",
        &release.to_string(),
        "--canary",
        "10%",
        "--waves",
        "2",
        "--soak",
        "1s",
        "--shadow",
        "2s",
        "--probation",
        "1s",
        "--min-predictions",
        "4",
        // Under a loaded CI machine a 10x slower model measures 4-5x; the healthy one about 1x.
        "--max-latency-ratio",
        "2",
        "--timeout",
        "60s",
        "--on-failure",
        "revert",
        "--reason",
        "e2e",
        "--follow",
        // A rollout that never ends fails the test here, with the CLI's summary of it, instead
        // of hanging the suite (as at c0dbf50, where a revert's end was never saved).
        "--follow-for",
        "5m",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn served(server: &Server) -> Value {
    server.get("/api/v1/delivery").unwrap_or_default()
}

#[test]
fn twenty_agents_get_a_healthy_release_in_waves_and_bad_ones_stop_at_the_canary() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kit = TrustKit::new(&d.join("trust")).unwrap();
    let r1 = write(d, "r1.mwb", &kit.release(1).unwrap());
    let signers = kit.release_signers();
    let bundle = |onnx: Vec<u8>, release: u64| {
        variants::signed_bundle(&onnx, release, &signers, |m| m.version = format!("e2e-r{release}"))
            .unwrap()
    };
    let releases = [
        (2, "healthy (+0.5 cycles)", write(d, "r2.mwb", &bundle(variants::healthy(0.5), 2))),
        (
            3,
            "NaN outputs on live data",
            write(d, "r3.mwb", &bundle(variants::nan_on_live_data(100.0), 3)),
        ),
        (4, "10x slower", write(d, "r4.mwb", &bundle(variants::slow(10.0), 4))),
        (5, "disagrees by 40 cycles", write(d, "r5.mwb", &bundle(variants::disagreeing(40.0), 5))),
    ];
    let server = Server::start_with_config(
        d,
        BrokerChoice::Embedded,
        &kit.server_config("chunk_size = 65536"),
    )
    .unwrap();

    // The registry: the loader's refusals and the roles come first.
    let cli = |token: &str, args: &[&str]| server.cli(token).args(args).output().unwrap();
    let viewer = cli(VIEWER_TOKEN, &["model", "register", r1.to_str().unwrap()]);
    assert!(!viewer.status.success() && text(&viewer).contains("403"), "{}", text(&viewer));
    let not_onnx = TrustKit::bundle(
        TrustKit::manifest(9, |_| {}).unwrap(),
        variants::not_onnx(),
        &kit.release_signers(),
    );
    let refused =
        cli(ADMIN_TOKEN, &["model", "register", write(d, "bad.mwb", &not_onnx).to_str().unwrap()]);
    assert!(
        !refused.status.success() && text(&refused).contains("model refused by the agent's loader"),
        "{}",
        text(&refused)
    );
    for path in std::iter::once(&r1).chain(releases.iter().map(|(_, _, p)| p)) {
        let out = cli(ADMIN_TOKEN, &["model", "register", path.to_str().unwrap()]);
        assert!(out.status.success(), "register {}: {}", path.display(), text(&out));
    }
    let again = cli(ADMIN_TOKEN, &["model", "register", r1.to_str().unwrap()]);
    assert!(text(&again).contains("already registered"), "{}", text(&again));
    let (status, _) =
        server.post("/api/v1/rollouts/r1/pause", "no-such-token", &json!({})).unwrap();
    assert_eq!(status, 401, "a write without a valid token is refused");

    // Twenty gateways on release 1, replaying the committed training engines.
    let data = repo_file("data/cmapss/train_FD001_units_1-6.txt");
    let mut fleet = Vec::new();
    for i in 1..=FLEET {
        let mut spec = AgentSpec::replaying(&format!("gw-{i:02}"), [((i - 1) % 6 + 1) as u32], 4.0);
        spec.data = Some(data.clone());
        spec.site = Some(if i % 2 == 0 { "plant-north" } else { "plant-south" }.into());
        spec.trust_root = Some(kit.root_path.clone());
        spec.bundle = Some(r1.clone());
        fleet.push(Agent::start(d, spec, &server).unwrap());
    }
    let inventory_ready = wait_until(Duration::from_secs(60), || {
        let devices = server.get("/api/v1/devices").unwrap_or_default();
        devices
            .as_array()
            .is_some_and(|a| a.iter().filter(|d| d["models"][0]["release"] == 1).count() == FLEET)
    });
    assert!(inventory_ready, "the server's inventory lacks devices: {}", server.proc.log_text());
    assert!(
        wait_until(Duration::from_secs(60), || fleet
            .iter()
            .all(|a| server.prediction_count(&a.spec.device) > 0)),
        "not every agent is predicting yet"
    );

    // A healthy release: canary 10 % (2), then two waves of 9.
    let started = Instant::now();
    let out = server.cli(OPERATOR_TOKEN).args(start_args(2)).output().unwrap();
    println!("{}", text(&out));
    assert!(
        out.status.success(),
        "healthy rollout did not complete:\n{}\n{}",
        text(&out),
        server.proc.log_text()
    );
    let r = server.get("/api/v1/rollouts/r1").unwrap();
    assert_eq!(r["state"], "completed");
    assert_eq!(r["waves"], json!([2, 9, 9]));
    let ms =
        |key: &str| (r[key].as_i64().unwrap() - r["created_ms"].as_i64().unwrap()) as f64 / 1000.0;
    println!(
        "release 2 to {FLEET} agents: all notified after {:.1} s, all active and committed after {:.1} s (wall {:.1} s)",
        ms("all_notified_ms"),
        ms("finished_ms"),
        started.elapsed().as_secs_f64()
    );
    for a in &fleet {
        assert!(
            wait_until(Duration::from_secs(10), || a.serving(MODEL).is_some_and(|s| s.0 == 2)),
            "{} does not serve release 2: {:?}",
            a.spec.device,
            a.serving(MODEL)
        );
    }

    // Bad releases stop at the canary and are reverted there.
    for (index, (release, what, _)) in releases.iter().enumerate().skip(1) {
        let before = served(&server);
        let out = server.cli(OPERATOR_TOKEN).args(start_args(*release)).output().unwrap();
        let id = format!("r{}", index + 1);
        let r = server.get(&format!("/api/v1/rollouts/{id}")).unwrap();
        assert!(
            !out.status.success(),
            "release {release} ({what}) was not stopped:\n{}",
            text(&out)
        );
        assert_eq!(r["state"], "reverted", "{what}: {}", text(&out));
        let devices = r["devices"].as_array().unwrap();
        let canary: Vec<&Value> = devices.iter().filter(|d| d["wave"] == 0).collect();
        assert_eq!(canary.len(), 2);
        let reasons: Vec<String> = devices
            .iter()
            .filter_map(|d| {
                d["reason"].as_str().map(|r| format!("{}: {r}", d["device"].as_str().unwrap_or("")))
            })
            .collect();
        println!(
            "release {release} ({what}): {} — {}",
            r["reason"].as_str().unwrap_or(""),
            reasons.join(" | ")
        );
        let after = served(&server);
        for d in devices.iter().filter(|d| d["wave"] != 0) {
            let name = d["device"].as_str().unwrap();
            assert!(
                d["directive"].is_null() && d["state"] == "pending",
                "{what}: {name} got a directive"
            );
            assert_eq!(before[name], after[name], "{what}: {name} was sent chunks");
        }
        for a in &fleet {
            assert!(
                wait_until(Duration::from_secs(20), || a.serving(MODEL).is_some_and(|s| s.0 == 2)
                    && a.status().is_some_and(|s| s["update"].is_null())),
                "{what}: {} does not serve release 2 after the revert: {:?}",
                a.spec.device,
                a.serving(MODEL)
            );
        }
    }
    let audit = server.get("/api/v1/audit?limit=1000").unwrap();
    let actions: Vec<&str> =
        audit.as_array().unwrap().iter().filter_map(|a| a["action"].as_str()).collect();
    for needed in
        ["register", "start", "wave_started", "completed", "device_failed", "revert", "reverted"]
    {
        assert!(actions.contains(&needed), "the audit log has no {needed:?}: {actions:?}");
    }
    assert!(
        audit.as_array().unwrap().iter().any(|a| a["actor"] == "oscar" && a["action"] == "start")
    );
}
