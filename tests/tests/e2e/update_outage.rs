//! A 30 s broker outage in the middle of a bundle transfer: the download resumes where it
//! stopped (the server's delivery is paced at 8 KiB/s so the outage lands mid-transfer), no
//! chunk is accepted twice, and the rollout completes.

use millwright_tests::trust::{ADMIN_TOKEN, OPERATOR_TOKEN, TrustKit};
use millwright_tests::{Agent, AgentSpec, BrokerChoice, Mosquitto, Server, fleet_lock, wait_until};
use serde_json::json;
use std::time::{Duration, Instant};

const MODEL: &str = "rul-cnn-fd001";
const DEVICE: &str = "gw-remote";
const CHUNK: u64 = 8192;

fn chunks(agent: &Agent) -> Option<(u64, u64)> {
    let status = agent.status()?;
    let c = status["update"]["chunks"].as_array()?;
    Some((c.first()?.as_u64()?, c.get(1)?.as_u64()?))
}

#[test]
fn a_thirty_second_broker_outage_mid_transfer_resumes_the_download_where_it_stopped() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let kit = TrustKit::new(&dir.path().join("trust")).unwrap();
    let r1 = dir.path().join("r1.mwb");
    std::fs::write(&r1, kit.release(1).unwrap()).unwrap();
    let r2_bytes = kit.release(2).unwrap();
    let r2 = dir.path().join("r2.mwb");
    std::fs::write(&r2, &r2_bytes).unwrap();
    let mut broker = Mosquitto::start(dir.path()).unwrap();
    let config = kit.server_config(&format!("chunk_size = {CHUNK}\ndelivery_bytes_per_sec = 8192"));
    let server =
        Server::start_with_config(dir.path(), BrokerChoice::Mosquitto(&broker), &config).unwrap();
    for bundle in [&r1, &r2] {
        let out = server.cli(ADMIN_TOKEN).args(["model", "register"]).arg(bundle).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut spec = AgentSpec::replaying(DEVICE, [12, 13], 2.0);
    spec.trust_root = Some(kit.root_path.clone());
    spec.bundle = Some(r1.clone());
    let agent = Agent::start(dir.path(), spec, &server).unwrap();
    assert!(wait_until(Duration::from_secs(30), || {
        server
            .get(&format!("/api/v1/devices/{DEVICE}"))
            .is_ok_and(|d| d["models"][0]["release"] == 1)
    }));

    let spec = json!({
        "model": MODEL, "release": 2, "target": {"kind": "devices", "devices": [DEVICE]},
        "canary": {"count": 1}, "soak_secs": 0, "device_timeout_secs": 600,
        "activation": {"shadow_secs": 1, "probation_secs": 1, "gates": {"min_predictions": 3}},
        "reason": "outage drill",
    });
    let (status, rollout) = server.post("/api/v1/rollouts", OPERATOR_TOKEN, &spec).unwrap();
    assert_eq!(status, 200, "{rollout}");
    let id = rollout["id"].as_str().unwrap().to_owned();

    let total = r2_bytes.len().div_ceil(CHUNK as usize) as u64;
    assert!(
        wait_until(Duration::from_secs(60), || chunks(&agent).is_some_and(|(have, _)| have >= 8)),
        "the transfer did not start: {:?}\n{}",
        chunks(&agent),
        agent.proc.log_text()
    );
    broker.stop();
    let before = chunks(&agent).unwrap();
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(30));
    let during = chunks(&agent).unwrap();
    broker.restart().unwrap();
    println!(
        "broker down for {:.1} s with {}/{} chunks staged (still {}/{} when it came back)",
        outage.elapsed().as_secs_f64(),
        before.0,
        before.1,
        during.0,
        during.1
    );
    assert_eq!(before.1, total);
    assert!(before.0 < total, "the transfer finished before the outage");

    let resumed_at = Instant::now();
    let done = wait_until(Duration::from_secs(120), || {
        server.get(&format!("/api/v1/rollouts/{id}")).is_ok_and(|r| r["state"] == "completed")
    });
    assert!(done, "the rollout did not complete after the outage:\n{}", agent.proc.log_text());
    let status = agent.status().unwrap();
    let received = status["counters"]["chunks_received"].as_u64().unwrap();
    let served = server.get("/api/v1/delivery").unwrap()[DEVICE].as_u64().unwrap();
    println!(
        "completed {:.1} s after the broker returned; {received} chunks accepted for {total} in the bundle; \
         server sent {served} bytes for a {}-byte bundle",
        resumed_at.elapsed().as_secs_f64(),
        r2_bytes.len()
    );
    assert_eq!(received, total, "every chunk was accepted exactly once (none fetched twice)");
    assert!(
        served < r2_bytes.len() as u64 + 8 * CHUNK,
        "the server sent {served} bytes: the download started over instead of resuming"
    );
    assert!(agent.serving(MODEL).is_some_and(|s| s.0 == 2));
    assert_eq!(during.0, before.0, "nothing arrives while the broker is down");
}
