//! A broker connection that stays up but makes no progress: pings answered, messages relayed,
//! and not one PUBACK for two minutes. Both the server and the gateway reach Mosquitto through
//! proxies that swallow the broker's PUBACKs; each must notice, reconnect, keep its other work
//! going (the server's API writes answer at once) and deliver everything once the broker
//! acknowledges again.

use millwright_io::tls::ClientIdentity;
use millwright_shared::enrollment as files;
use millwright_tests::proxy::MqttProxy;
use millwright_tests::*;
use std::time::{Duration, Instant};

const DEVICE: &str = "half-open";
const OUTAGE: Duration = Duration::from_secs(120);
/// The product's bound on an API write while the broker stalls.
const WRITE_BOUND: Duration = Duration::from_secs(5);

#[test]
fn two_minutes_without_a_puback_are_detected_on_both_ends_and_nothing_waits_or_is_lost() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path()).unwrap();
    let pki = pki::Pki::at(dir.path()).unwrap();
    let server_proxy = MqttProxy::start(
        &pki.ca_cert,
        &pki.broker_cert,
        &pki.broker_key,
        mosquitto.port,
        &ClientIdentity { cert: pki.server_cert.clone(), key: pki.server_key.clone() },
    )
    .unwrap();
    let server =
        Server::start(dir.path(), BrokerChoice::MosquittoVia(&mosquitto, server_proxy.port))
            .unwrap();
    let identity = server.enroll(DEVICE).unwrap();
    let agent_proxy = MqttProxy::start(
        &pki.ca_cert,
        &pki.broker_cert,
        &pki.broker_key,
        mosquitto.port,
        &ClientIdentity {
            cert: identity.join(files::DEVICE_CERT),
            key: identity.join(files::DEVICE_TLS_KEY),
        },
    )
    .unwrap();
    // Six engines run to failure over about two minutes, in small batches: a steady stream of
    // uplink publishes and of the server's acks.
    let mut spec = AgentSpec::replaying(DEVICE, 1..=6, 2.0);
    spec.data = Some(repo_file("data/cmapss/train_FD001_units_1-6.txt"));
    spec.drift = Some("interval_secs = 2".into());
    spec.uplink = "flush_interval_ms = 200\nbatch_max = 5\n".into();
    let agent = Agent::start_enrolled(dir.path(), spec, agent_proxy.port, &identity, &[]).unwrap();
    let dump = || format!("{}\n--- server:\n{}", agent.proc.log_text(), server.proc.log_text());
    assert!(
        wait_until(Duration::from_secs(30), || server.prediction_count(DEVICE) > 0),
        "{}",
        dump()
    );

    server_proxy.drop_pubacks(true);
    agent_proxy.drop_pubacks(true);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut writes = 0;
    let mut reasons = std::collections::BTreeSet::new();
    while started.elapsed() < OUTAGE {
        // An operator acknowledges an alarm: a write through the server's one loop.
        let t = Instant::now();
        let (code, answer) = server
            .post(
                &format!("/api/v1/alerts/{DEVICE}/1/ack"),
                trust::OPERATOR_TOKEN,
                &serde_json::json!({}),
            )
            .unwrap();
        let took = t.elapsed();
        slowest = slowest.max(took);
        writes += 1;
        assert!(
            [200, 404, 409].contains(&code),
            "the loop did not answer the write ({code} after {took:?}): {answer}"
        );
        let health = server.get("/api/v1/health").unwrap();
        if health["status"] == "degraded" {
            reasons.insert(health["degraded_reason"].as_str().unwrap_or_default().to_owned());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let swallowed = (server_proxy.dropped(), agent_proxy.dropped());
    server_proxy.drop_pubacks(false);
    agent_proxy.drop_pubacks(false);
    println!(
        "PUBACKs swallowed for {} s: {} to the server, {} to the gateway; {writes} API writes, \
         the slowest answered in {:.0} ms; health said degraded because: {reasons:?}",
        OUTAGE.as_secs(),
        swallowed.0,
        swallowed.1,
        slowest.as_secs_f64() * 1000.0
    );
    assert!(swallowed.0 > 0 && swallowed.1 > 0, "the proxies swallowed nothing: {swallowed:?}");
    assert!(slowest <= WRITE_BOUND, "an API write took {slowest:?} while the broker stalled");
    assert!(
        reasons.iter().any(|r| r.contains("acknowledges no publish")),
        "health never named the stall: {reasons:?}\n{}",
        dump()
    );

    // Each end saw the stall as a stall and reconnected.
    let server_stalls = server.metric("millwright_broker_stalls_total");
    assert!(server_stalls >= 1.0, "the server never dropped the stalled link:\n{}", dump());
    assert!(server.proc.log_text().contains("the broker acknowledges no publish: reconnecting"));
    let agent_stalls = agent.status().unwrap()["counters"]["uplink_stalls"].as_u64().unwrap_or(0);
    assert!(agent_stalls >= 1, "the gateway never dropped the stalled link:\n{}", dump());
    println!("stalls detected: server {server_stalls}, gateway {agent_stalls}");

    // With PUBACKs back, everything arrives, once.
    assert!(
        wait_until(Duration::from_secs(180), || {
            agent.proc.log_text().matches("replay finished").count() == 6
        }),
        "{}",
        dump()
    );
    wait_for_all(&server, &[&agent], Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", dump()));
    let n = check_exactly_once(&server, &agent).unwrap_or_else(|e| panic!("{e}\n{}", dump()));
    let streams = check_streams(&server, &agent, Duration::from_secs(60)).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || {
            server.get("/api/v1/health").is_ok_and(|h| h["status"] == "ok")
        }),
        "health did not recover: {:?}",
        server.get("/api/v1/health")
    );
    println!("after the stall: {n} predictions exactly once, every stream: {streams:?}");
}
