//! Three agents replay five units each; the server ends up with exactly the predictions the
//! agents computed, over the embedded broker and over Mosquitto.

use millwright_tests::*;
use std::time::{Duration, Instant};

fn fleet(broker: &str) -> Vec<AgentSpec> {
    (0..3)
        .map(|i| AgentSpec::replaying(&format!("{broker}-gw{i}"), (1..=5).map(|u| u + 5 * i), 0.0))
        .collect()
}

fn run_fleet(server: &Server, root: &std::path::Path, specs: Vec<AgentSpec>) {
    let started = Instant::now();
    let agents: Vec<Agent> =
        specs.into_iter().map(|s| Agent::start(root, s, server).unwrap()).collect();
    let refs: Vec<&Agent> = agents.iter().collect();
    if let Err(e) = wait_for_all(server, &refs, Duration::from_secs(90)) {
        for a in &agents {
            eprintln!("--- {} log:\n{}", a.spec.device, a.proc.log_text());
        }
        panic!("{e}\n--- server log:\n{}", server.proc.log_text());
    }
    let mut total = 0;
    for agent in &agents {
        total += check_exactly_once(server, agent).unwrap();
    }
    println!(
        "{total} predictions from {} agents stored exactly once in {:.1} s",
        agents.len(),
        started.elapsed().as_secs_f64()
    );
    let devices = server.get("/api/v1/devices").unwrap();
    assert_eq!(devices.as_array().unwrap().len(), 3);
    for d in devices.as_array().unwrap() {
        assert_eq!(d["online"], true, "{d}");
    }
    let latest = server.get(&format!("/api/v1/devices/{}/latest", agents[0].spec.device)).unwrap();
    assert_eq!(latest.as_array().unwrap().len(), 5, "latest per asset: {latest}");
}

#[test]
fn three_agents_deliver_exactly_once_over_the_embedded_broker() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    run_fleet(&server, dir.path(), fleet("embedded"));
}

#[test]
fn three_agents_deliver_exactly_once_over_mosquitto() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path()).unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Mosquitto(&mosquitto)).unwrap();
    run_fleet(&server, dir.path(), fleet("mosquitto"));
}
