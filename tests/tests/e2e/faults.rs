//! Faults: the broker stops mid-run, an agent is SIGKILLed mid-run, garbage arrives on an input
//! topic. Nothing acknowledged is lost or duplicated and the agent keeps running.

use millwright_tests::trust::{OPERATOR_TOKEN, TrustKit};
use millwright_tests::*;
use rumqttc::{Client, Event, Packet, QoS};
use std::time::{Duration, Instant};

fn dump(server: &Server, agents: &[&Agent]) -> String {
    let mut s = String::new();
    for a in agents {
        s += &format!("--- {} log:\n{}\n", a.spec.device, a.proc.log_text());
    }
    s + &format!("--- server log:\n{}", server.proc.log_text())
}

#[test]
fn a_broker_outage_of_ten_seconds_loses_and_duplicates_nothing() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(dir.path()).unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Mosquitto(&mosquitto)).unwrap();
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let spec =
                AgentSpec::replaying(&format!("outage-gw{i}"), (1..=5).map(|u| u + 5 * i), 15.0);
            Agent::start(dir.path(), spec, &server).unwrap()
        })
        .collect();
    let refs: Vec<&Agent> = agents.iter().collect();
    let flowing = wait_until(Duration::from_secs(30), || {
        agents.iter().all(|a| server.prediction_count(&a.spec.device) > 0)
    });
    assert!(flowing, "predictions never started flowing\n{}", dump(&server, &refs));

    mosquitto.stop();
    let stopped = Instant::now();
    let before: Vec<u64> = agents.iter().map(|a| server.prediction_count(&a.spec.device)).collect();
    std::thread::sleep(Duration::from_secs(10));
    // The agents noticed, kept inferring and buffered in their outboxes.
    for a in &agents {
        let status = a.status().expect("status.json");
        assert_eq!(status["uplink_connected"], false, "{status}");
        assert!(status["backlog"]["pred"].as_u64().unwrap() > 0, "{status}");
    }
    let during: Vec<u64> = agents.iter().map(|a| server.prediction_count(&a.spec.device)).collect();
    assert_eq!(before, during, "nothing can arrive while the broker is down");
    mosquitto.restart().unwrap();
    println!("broker down for {:.1} s", stopped.elapsed().as_secs_f64());

    if let Err(e) = wait_for_all(&server, &refs, Duration::from_secs(120)) {
        panic!("{e}\n{}", dump(&server, &refs));
    }
    let mut total = 0;
    for a in &agents {
        total += check_exactly_once(&server, a)
            .unwrap_or_else(|e| panic!("{e}\n{}", dump(&server, &refs)));
        let backlog = a.status().unwrap()["backlog"]["pred"].as_u64();
        assert!(
            wait_until(Duration::from_secs(10), || a.status().unwrap()["backlog"]["pred"] == 0),
            "{backlog:?}"
        );
    }
    println!("{total} predictions stored exactly once across a broker outage");
}

#[test]
fn an_agent_killed_with_sigkill_resumes_from_its_outbox() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    killed_and_resumed(dir.path(), &server);
}

#[test]
fn an_agent_killed_with_sigkill_resumes_from_its_outbox_over_mosquitto() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path()).unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Mosquitto(&mosquitto)).unwrap();
    killed_and_resumed(dir.path(), &server);
}

fn killed_and_resumed(root: &std::path::Path, server: &Server) {
    let mut agent =
        Agent::start(root, AgentSpec::replaying("killed-gw", 1..=5, 25.0), server).unwrap();
    let expected = agent.expected().unwrap().len() as u64;
    let some =
        wait_until(Duration::from_secs(30), || server.prediction_count("killed-gw") > expected / 4);
    assert!(some, "no progress before the kill\n{}", dump(server, &[&agent]));
    agent.proc.kill();
    let at_kill = server.prediction_count("killed-gw");
    assert!(at_kill < expected, "the kill came after the run finished ({at_kill}/{expected})");
    println!("SIGKILL after {at_kill}/{expected} predictions were acknowledged");
    std::thread::sleep(Duration::from_millis(500));
    agent.restart().unwrap();
    if let Err(e) = wait_for_all(server, &[&agent], Duration::from_secs(90)) {
        panic!("{e}\n{}", dump(server, &[&agent]));
    }
    let n = check_exactly_once(server, &agent)
        .unwrap_or_else(|e| panic!("{e}\n{}", dump(server, &[&agent])));
    assert_eq!(n as u64, expected);
    let status = agent.proc.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "SIGTERM exit status {status}");
}

#[test]
fn garbage_on_the_input_topic_is_counted_and_the_agent_keeps_running() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    // A gateway's local sensor bus is typically Mosquitto; here the uplink broker carries the
    // sensor topic too, so it has no ACL (the sensors publish on topics of their own).
    let mosquitto = Mosquitto::start_with(dir.path(), Acl::Open).unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Mosquitto(&mosquitto)).unwrap();
    let mut spec = AgentSpec::replaying("garbage-gw", [], 0.0);
    spec.mqtt_assets.push(("press-1".into(), "plant/press-1/readings".into()));
    let mut agent = Agent::start(dir.path(), spec, &server).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || agent
            .status()
            .is_some_and(|s| s["uplink_connected"] == true)),
        "agent never connected\n{}",
        agent.proc.log_text()
    );
    // The input subscription is sent on connect; give its SUBACK a moment.
    std::thread::sleep(Duration::from_secs(1));

    let topic = "plant/press-1/readings";
    let sender = server.enroll("garbage-sender").unwrap();
    let options = mqtt_as(server.mqtt_port, &sender, None).unwrap();
    let (client, mut connection) = Client::new(options, 100);
    // Each publish waits for the broker's PUBACK, so the sender itself loses nothing.
    let mut publish = |payload: Vec<u8>| {
        client.publish(topic, QoS::AtLeastOnce, false, payload).unwrap();
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("sender connection: {e}"),
            }
        }
    };
    let features = [
        "s2", "s3", "s4", "s7", "s8", "s9", "s11", "s12", "s13", "s14", "s15", "s17", "s20", "s21",
    ];
    let garbage: Vec<Vec<u8>> = vec![
        b"\x00\xff not json at all".to_vec(),
        b"{\"cycle\": 1, \"values\": {\"s2\": NaN}}".to_vec(),
        b"{\"cycle\": 1}".to_vec(),
        b"{\"cycle\": 1, \"values\": {\"s2\": 642.0}}".to_vec(),
        b"{\"cycle\": 1, \"values\": {\"s2\": \"NaN\"}}".to_vec(),
        br#"{"cycle": "one", "values": {}}"#.to_vec(),
    ];
    let mut all_strings = serde_json::Map::new();
    for f in features {
        all_strings.insert(f.into(), serde_json::Value::String("hot".into()));
    }
    let mut nan_one = serde_json::Map::new();
    for f in features {
        nan_one.insert(
            f.into(),
            serde_json::json!(if f == "s7" {
                serde_json::json!("NaN")
            } else {
                serde_json::json!(550.0)
            }),
        );
    }
    let mut garbage = garbage;
    garbage
        .push(serde_json::to_vec(&serde_json::json!({"cycle": 1, "values": all_strings})).unwrap());
    garbage.push(serde_json::to_vec(&serde_json::json!({"cycle": 1, "values": nan_one})).unwrap());
    // Every value fine but a cycle SQLite cannot store: refused at parse time (it used to be
    // accepted and then fail every later outbox commit, so nothing more was stored).
    let mut fine = serde_json::Map::new();
    for f in features {
        fine.insert(f.into(), serde_json::json!(550.0));
    }
    garbage.push(
        format!(
            "{{\"cycle\": 9223372036854775808, \"values\": {}}}",
            serde_json::Value::Object(fine)
        )
        .into_bytes(),
    );
    for g in &garbage {
        publish(g.clone());
    }
    // Then 40 valid readings from unit 2 of the test data (49 cycles): 11 full windows.
    let text = std::fs::read_to_string(repo_file(TEST_DATA)).unwrap();
    let columns = millwright_agent::cmapss::feature_indices(features).unwrap();
    let rows = millwright_agent::cmapss::parse(&text).unwrap();
    for row in rows.iter().filter(|r| r.unit == 2).take(40) {
        let mut values = serde_json::Map::new();
        for (name, &c) in features.iter().zip(&columns) {
            values.insert((*name).into(), serde_json::json!(row.values[c]));
        }
        let reading = serde_json::json!({"cycle": row.cycle, "values": values});
        publish(serde_json::to_vec(&reading).unwrap());
    }
    let arrived =
        wait_until(Duration::from_secs(30), || server.prediction_count("garbage-gw") >= 11);
    assert!(
        arrived,
        "valid readings after the garbage were not processed\nstatus: {:?}\n{}\n--- mosquitto log:\n{}",
        agent.status(),
        dump(&server, &[&agent]),
        mosquitto.log_text()
    );
    let stored = server.predictions("garbage-gw").unwrap();
    assert_eq!(stored.len(), 11);
    let all = expected_predictions().unwrap();
    let reference: Vec<&ExpectedPrediction> =
        all.iter().filter(|p| p.asset == "unit-2").take(11).collect();
    for (s, e) in stored.iter().zip(reference) {
        assert_eq!(
            (s.cycle, s.value as f32),
            (e.cycle, e.value),
            "MQTT input gives the replay's values"
        );
    }
    let counted = wait_until(Duration::from_secs(5), || {
        agent.status().is_some_and(|s| {
            s["counters"]["readings_rejected"]
                .as_object()
                .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum::<u64>())
                == garbage.len() as u64
        })
    });
    let status = agent.status().unwrap();
    assert!(counted, "rejections not counted: {status}");
    let rejected = &status["counters"]["readings_rejected"];
    println!("rejected readings by kind: {rejected}");
    for kind in
        ["not_json", "no_values", "missing_feature", "non_finite", "not_a_number", "bad_cycle"]
    {
        assert!(rejected[kind].as_u64().unwrap_or(0) >= 1, "no {kind} counted: {rejected}");
    }
    assert_eq!(rejected["bad_cycle"], 2, "a negative-free but oversized cycle is bad_cycle too");
    assert!(agent.proc.log_text().contains("rejected reading"), "rejections are logged");
    let exit = agent.proc.terminate(Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "agent exit after SIGTERM: {exit}");
}

/// A small deterministic generator for kill times (seeded from the clock; the seed is printed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn two_hundred_sigkills_of_a_busy_gateway_through_broker_flaps_lose_and_duplicate_nothing() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    // A rollout runs through the kills too: release 1 of the reference model is served, 2 is
    // rolled out (the same weights, so the predictions stay the reference replay's).
    let kit = TrustKit::new(&dir.path().join("trust")).unwrap();
    let (r1, _, mut server) =
        kit.server_with_two_releases(dir.path(), "chunk_size = 16384").unwrap();
    let device = "sigkill-gw";
    // Six engines run to failure (predictions and alerts), drift reports every second, and a
    // press whose readings keep arriving over MQTT whatever happens to the gateway.
    let mut spec = AgentSpec::replaying(device, 1..=6, 100.0);
    spec.data = Some(repo_file("data/cmapss/train_FD001_units_1-6.txt"));
    spec.drift = Some("interval_secs = 1".into());
    spec.mqtt_assets = vec![("press-1".into(), "plant/press-1/readings".into())];
    spec.trust_root = Some(kit.root_path.clone());
    spec.bundle = Some(r1.clone());
    spec.updates = Some("fetch_window = 2\nfetch_timeout_secs = 2".into());
    let mut agent = Agent::start(dir.path(), spec, &server).unwrap();
    let mut rollout = None;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = server.enroll("sigkill-press").unwrap();
    let topic = "plant/press-1/readings";
    let publisher = publish_readings(
        server.mqtt_port,
        &sender,
        topic,
        2,
        Duration::from_millis(5),
        stop.clone(),
    );
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64;
    let mut random = Lcg(seed);
    let (mut kills, mut flaps) = (0, 0);
    let starts = |agent: &Agent| agent.proc.log_text().matches("agent started").count();
    let mut before = 0;
    for i in 0..200 {
        // A random moment of a running gateway: replaying, inferring, committing, sending,
        // receiving acks (one kill in ten while it is still starting).
        if random.below(10) > 0 {
            let up = wait_until(Duration::from_secs(20), || starts(&agent) > before);
            assert!(up, "restart {i} did not start:\n{}", agent.proc.log_text());
        }
        if i == 10 {
            rollout = Some(start_rollout(&server, device));
        }
        std::thread::sleep(Duration::from_millis(random.below(1000)));
        agent.proc.kill();
        kills += 1;
        if i % 40 == 39 {
            // The broker (embedded in the server) goes too, and comes back.
            server.proc.kill();
            server.restart().unwrap();
            flaps += 1;
        }
        before = starts(&agent);
        agent.restart().unwrap();
    }
    let made = agent.status().map_or(0, |s| s["last_seq"]["pred"].as_u64().unwrap_or(0));
    // The replay finishes; the press goes quiet; everything drains.
    let expected = agent.expected().unwrap();
    let replayed = |stored: &[StoredPrediction]| {
        stored.iter().filter(|p| p.asset.starts_with("unit-")).count()
    };
    let finished = wait_until(Duration::from_secs(180), || {
        server.predictions(device).is_ok_and(|s| replayed(&s) >= expected.len())
    });
    assert!(finished, "seed {seed}: replay not delivered\n{}", dump(&server, &[&agent]));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let published = publisher.join().unwrap();
    let streams = check_streams(&server, &agent, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", dump(&server, &[&agent])));
    // The engines' predictions are the reference replay's, each exactly once.
    let stored = server.predictions(device).unwrap();
    let mut got: Vec<(String, u64, u32)> = stored
        .iter()
        .filter(|p| p.asset.starts_with("unit-"))
        .map(|p| (p.asset.clone(), p.cycle, (p.value as f32).to_bits()))
        .collect();
    got.sort();
    let mut want: Vec<(String, u64, u32)> =
        expected.iter().map(|p| (p.asset.clone(), p.cycle, p.value.to_bits())).collect();
    want.sort();
    assert_eq!(got, want, "seed {seed}: the engines' predictions");
    let alerts = streams.iter().find(|(s, _)| s == "alert").map_or(0, |(_, n)| *n);
    assert!(alerts > 0, "engines run to failure raise alerts: {streams:?}");
    let outcome = rollout_outcome(&server, &agent, rollout.as_deref().unwrap(), seed);
    let checked: u64 = streams.iter().map(|(_, n)| n).sum();
    println!(
        "{kills} SIGKILLs at random moments (seed {seed}) and {flaps} broker restarts, under \
         {published} MQTT readings and a rollout ({outcome}); {made} predictions made by the \
         last kill; {checked} records checked, every stream exactly once: {streams:?}"
    );
}

/// Rolls release 2 out to `device` (a canary of one); returns the rollout's id.
fn start_rollout(server: &Server, device: &str) -> String {
    let known = wait_until(Duration::from_secs(30), || {
        server
            .get(&format!("/api/v1/devices/{device}"))
            .is_ok_and(|d| d["models"][0]["release"] == 1)
    });
    assert!(known, "the server does not know that {device} serves release 1");
    let spec = serde_json::json!({
        "model": "rul-cnn-fd001", "release": 2, "target": {"kind": "devices", "devices": [device]},
        "canary": {"count": 1}, "waves": {"fixed": 1}, "soak_secs": 0,
        "device_timeout_secs": 900, "on_failure": "pause",
        "activation": {"shadow_secs": 1, "probation_secs": 1, "gates": {"min_predictions": 3}},
        "reason": "through the kills",
    });
    let (code, rollout) = server.post("/api/v1/rollouts", OPERATOR_TOKEN, &spec).unwrap();
    assert_eq!(code, 200, "{rollout}");
    rollout["id"].as_str().unwrap().to_owned()
}

/// After the kills the device ends the rollout one way or the other, on a verified release
/// that the server agrees on: committed on release 2, or (when kills cut the activation more
/// often than the agent allows) failed or reverted on release 1.
fn rollout_outcome(server: &Server, agent: &Agent, id: &str, seed: u64) -> String {
    let state = || {
        server.get(&format!("/api/v1/rollouts/{id}")).ok().and_then(|r| {
            r["devices"][0]["state"].as_str().map(|s| (s.to_owned(), r["devices"][0].clone()))
        })
    };
    let ended = wait_until(Duration::from_secs(120), || {
        state().is_some_and(|(s, _)| ["committed", "failed", "reverted"].contains(&s.as_str()))
    });
    let (s, run) = state().unwrap_or_default();
    assert!(ended, "seed {seed}: the device's rollout did not end: {s} {run}");
    let want = if s == "committed" { 2 } else { 1 };
    let serving = wait_until(Duration::from_secs(30), || {
        agent.serving("rul-cnn-fd001").is_some_and(|r| r.0 == want)
    });
    assert!(
        serving,
        "seed {seed}: {s}, but the gateway serves {:?}",
        agent.serving("rul-cnn-fd001")
    );
    let agreed = wait_until(Duration::from_secs(30), || {
        server
            .get(&format!("/api/v1/devices/{}", agent.spec.device))
            .is_ok_and(|d| d["models"][0]["release"] == want)
    });
    assert!(agreed, "seed {seed}: the server does not see release {want}");
    let reason = run["reason"].as_str().unwrap_or("");
    assert!(
        s == "committed" || reason.contains("restarted"),
        "seed {seed}: the update ended {s} for another reason than the kills: {run}"
    );
    format!(
        "{s} on release {want}{}",
        if reason.is_empty() { String::new() } else { format!(": {reason}") }
    )
}
