//! Trust state that must not brick a gateway: a provisioned root that expired after a newer
//! one was accepted, a root that expired with nothing newer, and a clock reset to 1970 (a box
//! without a battery-backed clock). The gateway starts, serves its verified models, delivers its
//! outbox exactly once, and says what is wrong in its status and on its page.

use millwright_shared::trust::Root;
use millwright_tests::trust::{ADMIN_TOKEN, TrustKit};
use millwright_tests::*;
use std::time::Duration;

/// A kit's root of `version` that expires `secs` from now, signed by its first two root keys.
fn short_root(kit: &TrustKit, version: u64, secs: i64) -> Vec<u8> {
    let keys: Vec<_> = kit.root_keys.iter().collect();
    let mut m = kit.metadata(version, &keys);
    m.expires_at = time::OffsetDateTime::now_utc() + time::Duration::seconds(secs);
    Root::sign(&m, &[&kit.root_keys[0], &kit.root_keys[1]]).to_bytes()
}

#[test]
fn a_gateway_whose_provisioned_root_expired_after_a_rotation_starts_on_the_newer_root() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let kit = TrustKit::new(&dir.path().join("trust")).unwrap();
    // The gateway is provisioned with version 1, which expires in 12 s; the server publishes
    // version 2 (signed by the root keys of version 1 and its own).
    let v1 = dir.path().join("root-v1.json");
    std::fs::write(&v1, short_root(&kit, 1, 12)).unwrap();
    let v2 = kit.root_document(2, &[&kit.root_keys[0], &kit.root_keys[1]]);
    std::fs::write(&kit.root_path, &v2).unwrap();
    let r1 = dir.path().join("r1.mwb");
    std::fs::write(&r1, kit.release(1).unwrap()).unwrap();
    let server =
        Server::start_with_config(dir.path(), BrokerChoice::Embedded, &kit.server_config(""))
            .unwrap();
    let mut spec = AgentSpec::replaying("gw-old-root", [3], 3.0);
    spec.trust_root = Some(v1.clone());
    spec.bundle = Some(r1);
    let mut agent = Agent::start(dir.path(), spec, &server).unwrap();
    let rotated = wait_until(Duration::from_secs(30), || {
        agent.status().is_some_and(|s| s["trust_root_version"] == 2)
    });
    assert!(rotated, "root 2 not accepted: {}", agent.proc.log_text());
    let expired = wait_until(Duration::from_secs(30), || {
        Root::provision(&std::fs::read(&v1).unwrap(), time::OffsetDateTime::now_utc()).is_err()
    });
    assert!(expired);
    agent.proc.kill();
    agent.restart().unwrap();
    let back = wait_until(Duration::from_secs(30), || {
        agent.status().is_some_and(|s| {
            s["trust_root_version"] == 2
                && s["trust_root_expired"].is_null()
                && s["uplink_connected"] == true
                && s["started_at_ms"].as_i64() > Some(0)
        }) && agent.proc.log_text().matches("agent started").count() == 2
    });
    assert!(back, "the gateway did not start on root 2:\n{}", agent.proc.log_text());
    wait_for_all(&server, &[&agent], Duration::from_secs(90)).unwrap();
    check_exactly_once(&server, &agent).unwrap();
}

#[test]
fn a_gateway_whose_only_root_expired_still_serves_and_drains_and_says_so() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let kit = TrustKit::new(&dir.path().join("trust")).unwrap();
    let old = dir.path().join("root-old.json");
    std::fs::write(&old, short_root(&kit, 1, 2)).unwrap();
    let r1 = dir.path().join("r1.mwb");
    std::fs::write(&r1, kit.release(1).unwrap()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // The server's own configured root has expired too: it starts, and refuses registrations.
    let config = format!("[rollouts]\nroot = {old:?}\n");
    let server = Server::start_with_config(dir.path(), BrokerChoice::Embedded, &config).unwrap();
    assert!(server.proc.log_text().contains("the configured trust root has expired"));
    let out = server.cli(ADMIN_TOKEN).args(["model", "register"]).arg(&r1).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("trust root has expired"), "{stderr}");
    let mut spec = AgentSpec::replaying("gw-expired", [3], 0.0);
    spec.trust_root = Some(old);
    spec.bundle = Some(r1);
    let agent = Agent::start(dir.path(), spec, &server).unwrap();
    wait_for_all(&server, &[&agent], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.proc.log_text()));
    check_exactly_once(&server, &agent).unwrap();
    let status = agent.status().unwrap();
    assert_eq!(status["trust_root_expired"], true, "{status}");
    assert!(agent.proc.log_text().contains("the trust root in force has expired"));
}

#[test]
fn a_gateway_rebooted_into_1970_keeps_its_time_floor_connects_and_says_its_clock_is_wrong() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let port = free_port();
    let mut spec = AgentSpec::replaying("gw-rtc", [12, 13], 8.0);
    spec.top = format!("[local]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut agent = Agent::start(dir.path(), spec, &server).unwrap();
    assert!(wait_until(Duration::from_secs(30), || server.prediction_count("gw-rtc") > 20));
    // A clean stop saves the time floor.
    let exit = agent.proc.terminate(Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "{exit}");
    let at_stop = server.prediction_count("gw-rtc");
    // The battery is flat: the gateway boots at 2 January 1970. Its certificates are "not yet
    // valid" by that clock; the floor keeps them valid.
    let faketime = ["faketime", "-f", "@1970-01-02 00:00:00"];
    let env = [("FAKETIME_DONT_FAKE_MONOTONIC", "1"), ("FAKETIME_NO_CACHE", "1")];
    agent.restart_under(&faketime, &env).unwrap();
    let resumed =
        wait_until(Duration::from_secs(30), || server.prediction_count("gw-rtc") > at_stop);
    assert!(resumed, "no delivery after the clock went back:\n{}", agent.proc.log_text());
    let status = agent.status().unwrap();
    assert_eq!(status["clock"]["untrusted"], true, "{status}");
    assert!(status["at_ms"].as_i64().unwrap() < 86_400_000 * 2, "the clock really was faked");
    let page =
        ureq::get(&format!("http://127.0.0.1:{port}/")).call().unwrap().into_string().unwrap();
    assert!(page.contains("Clock untrustworthy"), "{page}");
    let metrics = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert_eq!(metric(&metrics, "millwright_clock_untrusted"), 1.0);
    assert!(agent.proc.log_text().contains("the wall clock is behind"));
    wait_for_all(&server, &[&agent], Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.proc.log_text()));
    check_exactly_once(&server, &agent).unwrap();
}
