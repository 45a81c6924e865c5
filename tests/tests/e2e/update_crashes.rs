//! A power cut at any step of an activation leaves the gateway on exactly the old or the new
//! verified release, and it finishes the update after it restarts. One gateway per step is
//! stopped right after it persisted that step (`MILLWRIGHT_PAUSE_AFTER`) and SIGKILLed there.

use millwright_shared::directive::Activation;
use millwright_shared::gates::Gates;
use millwright_shared::topics;
use millwright_tests::rogue::{Damage, Rogue};
use millwright_tests::trust::TrustKit;
use millwright_tests::{
    Agent, AgentSpec, BrokerChoice, Server, check_exactly_once, fleet_lock, wait_for_all,
    wait_until,
};
use std::time::Duration;

const MODEL: &str = "rul-cnn-fd001";
const STEPS: [&str; 8] = [
    "received",
    "downloading",
    "downloaded",
    "verified",
    "self_tested",
    "shadow",
    "activated",
    "committed",
];

#[test]
fn a_sigkill_at_every_activation_step_ends_on_a_verified_release_and_the_update_completes() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let kit = TrustKit::new(&dir.path().join("trust")).unwrap();
    let r1 = dir.path().join("r1.mwb");
    std::fs::write(&r1, kit.release(1).unwrap()).unwrap();
    let r2 = kit.release(2).unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();

    let mut fleet = Vec::new();
    for step in STEPS {
        let device = format!("gw-{}", step.replace('_', "-"));
        let mut spec = AgentSpec::replaying(&device, [12, 13], 5.0);
        spec.trust_root = Some(kit.root_path.clone());
        spec.bundle = Some(r1.clone());
        spec.updates = Some("fetch_window = 1\nfetch_timeout_secs = 2".into());
        let agent = Agent::start_with_env(
            dir.path(),
            spec,
            server.mqtt_port,
            &[("MILLWRIGHT_PAUSE_AFTER", step)],
        )
        .unwrap();
        let rogue = Rogue::start(server.mqtt_port, &device).unwrap();
        fleet.push((step, agent, rogue));
    }
    for (_, agent, _) in &fleet {
        assert!(
            wait_until(Duration::from_secs(30), || agent.serving(MODEL).is_some_and(|s| s.0 == 1)),
            "{} did not start: {}",
            agent.spec.device,
            agent.proc.log_text()
        );
    }
    let activation = Activation {
        shadow_secs: 2,
        probation_secs: 2,
        gates: Gates { min_predictions: 5, ..Gates::default() },
    };
    for (seq, (_, agent, rogue)) in fleet.iter().enumerate() {
        rogue.offer(&r2, 8 * 1024, Damage::None);
        let directive = TrustKit::directive(
            &agent.spec.device,
            10 + seq as u64,
            &r2,
            8 * 1024,
            2,
            activation.clone(),
        )
        .unwrap();
        rogue
            .publish_retained(
                topics::desired(&directive.device),
                directive.sign(&kit.server_key).to_bytes(),
            )
            .unwrap();
    }
    for (step, agent, _) in &mut fleet {
        let marker = format!("step=\"{step}\"");
        let paused = wait_until(Duration::from_secs(60), || {
            agent.proc.log_text().lines().any(|l| l.contains("test hook") && l.contains(&marker))
        });
        assert!(
            paused,
            "{}: never reached step {step}: {}",
            agent.spec.device,
            agent.proc.log_text()
        );
        agent.proc.kill();
        let serving = agent.serving(MODEL);
        println!("{step:<12} SIGKILLed; status file said it served {serving:?}");
        agent.restart().unwrap();
    }
    for (step, agent, _) in &fleet {
        let done = wait_until(Duration::from_secs(90), || {
            agent.serving(MODEL).is_some_and(|s| s.0 == 2)
                && agent.status().is_some_and(|s| s["update"].is_null())
        });
        assert!(
            done,
            "{step}: did not finish on release 2 after the restart: {}",
            agent.proc.log_text()
        );
        let committed = wait_until(Duration::from_secs(30), || {
            let reports = server
                .get(&format!("/api/v1/devices/{}/updates", agent.spec.device))
                .unwrap_or_default();
            reports
                .as_array()
                .is_some_and(|a| a.iter().any(|r| r["phase"] == "committed" && r["release"] == 2))
        });
        assert!(committed, "{step}: no committed report reached the server");
        let log = agent.proc.log_text();
        assert!(
            !log.contains("update rejected") && !log.contains("release reverted"),
            "{step}: the update did not go through cleanly: {log}"
        );
        println!("{step:<12} restarted, resumed and committed release 2");
    }
    let agents: Vec<&Agent> = fleet.iter().map(|(_, a, _)| a).collect();
    wait_for_all(&server, &agents, Duration::from_secs(120)).unwrap();
    for agent in agents {
        let n = check_exactly_once(&server, agent).unwrap();
        println!("{}: {n} predictions exactly once across the kill", agent.spec.device);
    }
}
