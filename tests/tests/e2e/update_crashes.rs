//! Power cuts in the middle of real activations, and a server crash in the middle of the
//! rollout, leave every gateway on exactly the old or the new verified release, and the rollout
//! then finishes. The crash after every single effect of every path is the update machine's own
//! table (`agent/src/update_machine.rs`); here real processes are SIGKILLed at moments seen from
//! outside: one gateway while its download's staging file is on disk, one while its status says
//! shadow, one while it says probation. Then the server is SIGKILLed too, and all of them are
//! started again.

use millwright_tests::trust::{ADMIN_TOKEN, OPERATOR_TOKEN, TrustKit};
use millwright_tests::{
    Agent, AgentSpec, BrokerChoice, Server, check_exactly_once, fleet_lock, wait_for_all,
    wait_until, wait_until_every,
};
use serde_json::json;
use std::time::Duration;

const MODEL: &str = "rul-cnn-fd001";
/// When each gateway is killed: what the test watches for.
const STEPS: [&str; 3] = ["fetching", "shadow", "probation"];

/// The gateway is at `step`: its staging file is on disk (fetching), or its status says so.
fn at(agent: &Agent, step: &str) -> bool {
    if step == "fetching" {
        let updates = agent.dir.join("data/updates");
        return std::fs::read_dir(updates).is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "part")))
        });
    }
    agent.status().is_some_and(|s| s["update"]["stage"] == step)
}

#[test]
fn sigkills_at_every_activation_step_and_of_the_server_end_on_verified_releases_and_the_rollout_completes()
 {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let kit = TrustKit::new(&dir.path().join("trust")).unwrap();
    let r1 = dir.path().join("r1.mwb");
    std::fs::write(&r1, kit.release(1).unwrap()).unwrap();
    let r2 = dir.path().join("r2.mwb");
    std::fs::write(&r2, kit.release(2).unwrap()).unwrap();
    // Small chunks, one in flight: the download lasts long enough to be caught.
    let config = kit.server_config("chunk_size = 1024");
    let mut server =
        Server::start_with_config(dir.path(), BrokerChoice::Embedded, &config).unwrap();
    for bundle in [&r1, &r2] {
        let out = server.cli(ADMIN_TOKEN).args(["model", "register"]).arg(bundle).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    let mut fleet = Vec::new();
    for step in STEPS {
        let device = format!("gw-{step}");
        let mut spec = AgentSpec::replaying(&device, [12, 13], 5.0);
        spec.trust_root = Some(kit.root_path.clone());
        spec.bundle = Some(r1.clone());
        spec.updates = Some("fetch_window = 1\nfetch_timeout_secs = 2".into());
        fleet.push((step, Agent::start(dir.path(), spec, &server).unwrap()));
    }
    let known = wait_until(Duration::from_secs(60), || {
        let devices = server.get("/api/v1/devices").unwrap_or_default();
        devices.as_array().is_some_and(|a| {
            a.iter().filter(|d| d["models"][0]["release"] == 1).count() == STEPS.len()
        })
    });
    assert!(known, "the server does not know every gateway yet");

    let spec = json!({
        "model": MODEL, "release": 2, "target": {"kind": "all"},
        "canary": {"count": STEPS.len()}, "waves": {"fixed": 1}, "soak_secs": 0,
        "device_timeout_secs": 300, "on_failure": "pause",
        "activation": {"shadow_secs": 15, "probation_secs": 15, "gates": {"min_predictions": 5}},
        "reason": "crash drill",
    });
    let (status, rollout) = server.post("/api/v1/rollouts", OPERATOR_TOKEN, &spec).unwrap();
    assert_eq!(status, 200, "{rollout}");
    let id = rollout["id"].as_str().unwrap().to_owned();

    for (step, agent) in &mut fleet {
        let reached = wait_until_every(Duration::from_secs(90), Duration::from_millis(10), || {
            at(agent, step)
        });
        assert!(reached, "{}: never seen at {step}: {}", agent.spec.device, agent.proc.log_text());
        agent.proc.kill();
        println!("{step:<12} SIGKILLed; its status file said it served {:?}", agent.serving(MODEL));
    }
    server.proc.kill();
    println!(
        "server SIGKILLed mid-rollout: {}",
        server.get(&format!("/api/v1/rollouts/{id}")).is_err()
    );
    server.restart().unwrap();
    for (_, agent) in &mut fleet {
        agent.restart().unwrap();
    }

    let done = wait_until(Duration::from_secs(120), || {
        server.get(&format!("/api/v1/rollouts/{id}")).is_ok_and(|r| r["state"] == "completed")
    });
    let r = server.get(&format!("/api/v1/rollouts/{id}")).unwrap();
    assert!(done, "the rollout did not complete: {r:#}\n{}", server.proc.log_text());
    for (step, agent) in &fleet {
        let serving =
            wait_until(Duration::from_secs(10), || agent.serving(MODEL).is_some_and(|s| s.0 == 2));
        assert!(serving, "{step}: does not serve release 2: {}", agent.proc.log_text());
        let log = agent.proc.log_text();
        assert!(
            !log.contains("update rejected") && !log.contains("release reverted"),
            "{step}: the update did not go through cleanly: {log}"
        );
        println!("{step:<12} restarted, resumed and committed release 2");
    }
    assert_eq!(
        r["devices"].as_array().unwrap().iter().filter(|d| d["state"] == "committed").count(),
        STEPS.len()
    );
    let agents: Vec<&Agent> = fleet.iter().map(|(_, a)| a).collect();
    wait_for_all(&server, &agents, Duration::from_secs(120)).unwrap();
    for agent in agents {
        let n = check_exactly_once(&server, agent).unwrap();
        println!("{}: {n} predictions exactly once across both crashes", agent.spec.device);
    }
}
