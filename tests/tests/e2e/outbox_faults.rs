//! The outbox's own faults must not wedge a gateway: corrupt rows are quarantined while every
//! stream flows on; a corrupt outbox file is set aside and a fresh outbox (a new epoch) started;
//! a new epoch after a wiped data folder or a set-aside never loses records to old sequence
//! numbers on the server; an expired bundle stops inference, not the uplink, so the backlog
//! still drains.

use millwright_tests::trust::TrustKit;
use millwright_tests::*;
use rusqlite::Connection;
use std::collections::BTreeSet;
use std::time::Duration;

fn outbox(agent: &Agent) -> Connection {
    Connection::open(agent.dir.join("data/outbox.sqlite")).unwrap()
}

fn dump(server: &Server, agent: &Agent) -> String {
    format!(
        "--- {} log:\n{}\n--- server log:\n{}",
        agent.spec.device,
        agent.proc.log_text(),
        server.proc.log_text()
    )
}

/// The server's view of one of the device's streams.
fn stream(server: &Server, device: &str, stream: &str) -> serde_json::Value {
    server.get(&format!("/api/v1/devices/{device}/streams")).unwrap()[stream].clone()
}

fn backlog_empty(agent: &Agent) -> bool {
    agent.status().is_some_and(|s| {
        s["uplink_connected"] == true
            && s["backlog"].as_object().is_some_and(|b| b.values().all(|v| v == 0))
    })
}

/// Takes the uplink away (the server is killed), lets the gateway buffer a few records the
/// server cannot have seen, then SIGKILLs it. Returns the newest buffered prediction's seq and
/// body: the status file can be a second old, so records 3 past it were made offline.
fn buffer_offline_then_kill(server: &mut Server, agent: &mut Agent) -> (u64, serde_json::Value) {
    server.proc.kill();
    let last_pred = || agent.status().unwrap()["last_seq"]["pred"].as_u64().unwrap();
    let at_kill = last_pred();
    assert!(wait_until(Duration::from_secs(20), || last_pred() >= at_kill + 3));
    agent.proc.kill();
    let (seq, body): (u64, String) = outbox(agent)
        .query_row(
            "SELECT seq, body FROM outbox WHERE stream = 'pred' ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["kind"], "prediction", "{body}");
    (seq, body)
}

#[test]
fn corrupt_outbox_rows_are_quarantined_and_every_stream_flows_on() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let mut agent =
        Agent::start(dir.path(), AgentSpec::replaying("corrupt-rows", [1, 2], 5.0), &server)
            .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || server.prediction_count("corrupt-rows") > 0),
        "{}",
        dump(&server, &agent)
    );
    // The uplink goes away, the gateway buffers, and is killed with records waiting.
    let (seq, body) = buffer_offline_then_kill(&mut server, &mut agent);
    let (bad_seq, bad_asset, bad_cycle) = {
        let db = outbox(&agent);
        let key = (body["asset"].as_str().unwrap().to_owned(), body["cycle"].as_u64().unwrap());
        // A prediction the server cannot have seen rots, and an update report that is not one
        // appears: the highest-priority stream, which used to stop all four.
        db.execute("UPDATE outbox SET body = '{}' WHERE stream = 'pred' AND seq = ?1", [seq])
            .unwrap();
        db.execute_batch(
            "INSERT INTO outbox (stream, seq, at_ms, body) VALUES ('update', 1, 0, '[1, 2]');
             INSERT INTO sequences (stream, last_seq) VALUES ('update', 1);
             INSERT INTO stream_bytes (stream, bytes, records) VALUES ('update', 54, 1);",
        )
        .unwrap();
        (seq, key.0, key.1)
    };
    server.restart().unwrap();
    agent.restart().unwrap();
    let expected: Vec<ExpectedPrediction> = agent
        .expected()
        .unwrap()
        .into_iter()
        .filter(|p| (p.asset.as_str(), p.cycle) != (bad_asset.as_str(), bad_cycle))
        .collect();
    let delivered = wait_until(Duration::from_secs(90), || {
        server.prediction_count("corrupt-rows") >= expected.len() as u64
            && backlog_empty(&agent)
            && agent.status().unwrap()["last_seq"]["pred"]
                == stream(&server, "corrupt-rows", "pred")["last_seq"]
    });
    assert!(delivered, "not delivered: {:?}\n{}", agent.status(), dump(&server, &agent));

    // Everything but the rotten row arrived exactly once, with the reference values.
    let stored = server.predictions("corrupt-rows").unwrap();
    let seqs: Vec<u64> = stored.iter().map(|p| p.seq).collect();
    let last = agent.status().unwrap()["last_seq"]["pred"].as_u64().unwrap();
    let want: Vec<u64> = (1..=last).filter(|&s| s != bad_seq).collect();
    assert_eq!(seqs, want, "sequence numbers: all but the quarantined {bad_seq}, once each");
    let got: BTreeSet<(String, u64, u32)> =
        stored.iter().map(|p| (p.asset.clone(), p.cycle, (p.value as f32).to_bits())).collect();
    let exp: BTreeSet<(String, u64, u32)> =
        expected.iter().map(|p| (p.asset.clone(), p.cycle, p.value.to_bits())).collect();
    assert_eq!((got.len(), &got), (stored.len(), &exp));
    assert_eq!(stream(&server, "corrupt-rows", "update")["records"], 0);

    // Counted, shown, logged once per row, and kept for inspection.
    let status = agent.status().unwrap();
    assert_eq!(status["outbox_quarantined"], 2, "{status}");
    let log = agent.proc.log_text();
    assert_eq!(log.matches("moved to quarantine").count(), 2, "{log}");
    let kept: Vec<(String, u64)> = outbox(&agent)
        .prepare("SELECT stream, seq FROM quarantine ORDER BY stream")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(kept, vec![("pred".to_owned(), bad_seq), ("update".to_owned(), 1)]);
    println!(
        "2 corrupt rows (pred seq {bad_seq}, update seq 1) quarantined; {} predictions \
         delivered exactly once around them",
        stored.len()
    );
}

#[test]
fn a_wiped_data_folder_and_a_corrupt_outbox_file_start_new_epochs_that_lose_nothing() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let device = "new-epochs";
    let mut agent =
        Agent::start(dir.path(), AgentSpec::replaying(device, [1, 2], 30.0), &server).unwrap();
    let per_run = agent.expected().unwrap();
    let n = per_run.len() as u64;
    wait_for_all(&server, &[&agent], Duration::from_secs(60)).unwrap();
    check_exactly_once(&server, &agent).unwrap();
    let first = stream(&server, device, "pred");
    assert_eq!((first["epochs"].as_u64(), first["epoch_base"].as_u64()), (Some(1), Some(0)));

    // 1. The data folder is wiped (a reinstall): the new outbox numbers from 1 again.
    agent.proc.kill();
    std::fs::remove_dir_all(agent.dir.join("data")).unwrap();
    agent.restart().unwrap();
    // 2. Then the outbox file is found corrupt at start.
    let second_done = wait_until(Duration::from_secs(60), || {
        server.prediction_count(device) >= 2 * n && backlog_empty(&agent)
    });
    assert!(second_done, "after the wipe: {}", dump(&server, &agent));
    // A clean stop folds the WAL into the file; then the file's pages rot (an SD card).
    agent.proc.terminate(Duration::from_secs(10)).unwrap();
    let file = agent.dir.join("data/outbox.sqlite");
    assert!(!file.with_extension("sqlite-wal").exists(), "the WAL outlived a clean stop");
    std::fs::write(&file, vec![0x5a_u8; 16384]).unwrap();
    agent.restart().unwrap();
    let third_done = wait_until(Duration::from_secs(60), || {
        server.prediction_count(device) >= 3 * n && backlog_empty(&agent)
    });
    assert!(third_done, "after the set-aside: {}", dump(&server, &agent));

    // Three epochs, each stored after the one before: 3n predictions, seqs 1..=3n, and each
    // epoch's records are the replay's (before epochs, the second and third runs' records
    // 1..=n were taken for duplicates and silently dropped).
    let stored = server.predictions(device).unwrap();
    assert_eq!(stored.iter().map(|p| p.seq).collect::<Vec<_>>(), (1..=3 * n).collect::<Vec<_>>());
    for (run, chunk) in stored.chunks(n as usize).enumerate() {
        let got: Vec<(String, u64, u32)> =
            chunk.iter().map(|p| (p.asset.clone(), p.cycle, (p.value as f32).to_bits())).collect();
        let mut got = got;
        got.sort();
        let mut exp: Vec<(String, u64, u32)> =
            per_run.iter().map(|p| (p.asset.clone(), p.cycle, p.value.to_bits())).collect();
        exp.sort();
        assert_eq!(got, exp, "epoch {} holds one full replay", run + 1);
    }
    let pred = stream(&server, device, "pred");
    assert_eq!(
        (pred["epochs"].as_u64(), pred["epoch_base"].as_u64(), pred["records"].as_u64()),
        (Some(3), Some(2 * n), Some(3 * n)),
        "{pred}"
    );
    let status = agent.status().unwrap();
    assert_eq!(pred["epoch"], status["epoch"], "the server names the gateway's epoch: {status}");
    let set_aside = status["outbox_set_aside"]["moved_to"].as_str().unwrap_or_default();
    assert!(
        std::path::Path::new(set_aside).exists() && set_aside.contains("outbox.sqlite.corrupt-"),
        "{status}"
    );
    assert!(status["outbox_set_aside"]["reason"].as_str().unwrap().contains("not a database"));
    let log = server.proc.log_text();
    let opened = log
        .lines()
        .filter(|l| l.contains("outbox epoch started") && l.contains("stream=\"pred\""))
        .count();
    assert_eq!(opened, 3, "one per epoch of pred:\n{log}");
    println!(
        "3 outbox epochs (first start, wiped data folder, corrupt file set aside as {set_aside}): \
         {} predictions stored, {n} per epoch, none lost to old sequence numbers",
        stored.len()
    );
}

#[test]
fn a_gateway_whose_bundle_expired_while_offline_still_drains_its_outbox() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let kit = TrustKit::new(&dir.path().join("trust")).unwrap();
    let lifetime = 20;
    let manifest = TrustKit::manifest(1, |m| {
        m.expires_at = m.created_at + time::Duration::seconds(lifetime);
    })
    .unwrap();
    let onnx = std::fs::read(repo_file("models/rul-cnn-fd001/model.onnx")).unwrap();
    let bundle = dir.path().join("short-lived.mwb");
    std::fs::write(&bundle, TrustKit::bundle(manifest, onnx, &kit.release_signers())).unwrap();
    let mut server =
        Server::start_with_config(dir.path(), BrokerChoice::Embedded, &kit.server_config(""))
            .unwrap();
    let mut spec = AgentSpec::replaying("expired-offline", [1, 2, 3], 4.0);
    spec.trust_root = Some(kit.root_path.clone());
    spec.bundle = Some(bundle);
    let mut agent = Agent::start(dir.path(), spec, &server).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || server.prediction_count("expired-offline") > 0),
        "{}",
        dump(&server, &agent)
    );
    server.proc.kill();
    // Offline until the bundle has expired, buffering; then the gateway reboots.
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(lifetime as u64 + 2));
    agent.proc.kill();
    let waiting = outbox(&agent)
        .query_row("SELECT COUNT(*) FROM outbox WHERE stream = 'pred'", [], |r| r.get::<_, u64>(0))
        .unwrap();
    assert!(waiting > 0, "nothing buffered while offline");
    agent.restart().unwrap();
    let up = wait_until(Duration::from_secs(20), || {
        agent.status().is_some_and(|s| s["started_at_ms"].as_i64() > Some(0))
            && agent.proc.log_text().matches("agent started").count() == 2
    });
    assert!(
        up,
        "the gateway did not start with its only bundle expired:\n{}",
        agent.proc.log_text()
    );
    let status = agent.status().unwrap();
    assert_eq!(status["assets"].as_array().map(Vec::len), Some(0), "inference is off: {status}");
    assert!(agent.proc.log_text().contains("bundle expired"), "{}", agent.proc.log_text());
    server.restart().unwrap();
    let drained = wait_until(Duration::from_secs(60), || backlog_empty(&agent));
    assert!(drained, "backlog not drained: {:?}\n{}", agent.status(), dump(&server, &agent));
    // All four streams exactly once: what the gateway made before its bundle expired.
    let streams = check_streams(&server, &agent, Duration::from_secs(30)).unwrap();
    println!(
        "bundle expired {:.0} s into an outage; after a reboot the gateway served no model and \
         drained {waiting} buffered predictions: {streams:?}",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_late_batch_is_sent_again_on_time_when_the_wall_clock_steps_back_an_hour() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path()).unwrap();
    let mut server = Server::start(dir.path(), BrokerChoice::Mosquitto(&mosquitto)).unwrap();
    let offset = dir.path().join("clock-offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let lib = libfaketime();
    let env = [
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let spec = AgentSpec::replaying("clock-step", [1, 2, 3], 10.0);
    let agent = Agent::start_with_env(dir.path(), spec, &server, &env).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || server.prediction_count("clock-step") > 0),
        "{}",
        dump(&server, &agent)
    );
    // The server goes away behind a live broker: batches are taken, acks never come.
    server.proc.kill();
    let resends = || agent.status().unwrap()["counters"]["resends"].as_u64().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || resends() > 0),
        "no batch sent again (retry_after_secs = 3): {:?}",
        agent.status()
    );
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(&offset, "-1h\n").unwrap();
    let stepped = agent.status().unwrap();
    let before = resends();
    // Timed by the wall clock, the waiting batches would be due again an hour from now.
    let again = wait_until(Duration::from_secs(30), || {
        let s = agent.status().unwrap();
        s["counters"]["resends"].as_u64() > Some(before)
            && s["at_ms"].as_i64().unwrap() < stepped["at_ms"].as_i64().unwrap() - 3_000_000
    });
    assert!(again, "no resend after the step: {:?}\n{}", agent.status(), dump(&server, &agent));
    let after = resends();
    server.restart().unwrap();
    wait_for_all(&server, &[&agent], Duration::from_secs(90)).unwrap();
    let stored = check_exactly_once(&server, &agent).unwrap();
    println!(
        "wall clock stepped back 1 h with acks overdue: batches sent again {before} -> {after} \
         times on the monotonic clock; {stored} predictions stored exactly once"
    );
}

/// Probation is a duration: a wall clock stepped an hour either way in the middle of it
/// neither ends it at once (+1 h) nor holds it for an hour (-1 h).
#[test]
fn a_wall_clock_stepped_an_hour_either_way_mid_probation_neither_ends_nor_stretches_it() {
    const PROBATION_SECS: u64 = 20;
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let kit = TrustKit::new(&dir.path().join("trust")).unwrap();
    let (r1, _, server) = kit.server_with_two_releases(dir.path(), "chunk_size = 65536").unwrap();
    let lib = libfaketime();
    let mut fleet = Vec::new();
    for (device, step) in [("clock-ahead", "+1h"), ("clock-behind", "-1h")] {
        let offset = dir.path().join(format!("{device}.offset"));
        std::fs::write(&offset, "+0\n").unwrap();
        let env = [
            ("LD_PRELOAD", lib.to_str().unwrap()),
            ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ];
        let mut spec = AgentSpec::replaying(device, [12, 13], 5.0);
        spec.trust_root = Some(kit.root_path.clone());
        spec.bundle = Some(r1.clone());
        let agent = Agent::start_with_env(dir.path(), spec, &server, &env).unwrap();
        fleet.push((agent, offset, step));
    }
    let known = wait_until(Duration::from_secs(60), || {
        let devices = server.get("/api/v1/devices").unwrap_or_default();
        devices.as_array().is_some_and(|a| {
            a.iter().filter(|d| d["models"][0]["release"] == 1).count() == fleet.len()
        })
    });
    assert!(known, "the server does not know both gateways yet");
    let spec = serde_json::json!({
        "model": "rul-cnn-fd001", "release": 2, "target": {"kind": "all"},
        "canary": {"count": 2}, "waves": {"fixed": 1}, "soak_secs": 0,
        "device_timeout_secs": 600, "on_failure": "pause",
        "activation": {"shadow_secs": 0, "probation_secs": PROBATION_SECS,
                       "gates": {"min_predictions": 5}},
        "reason": "clock drill",
    });
    let (code, rollout) = server.post("/api/v1/rollouts", trust::OPERATOR_TOKEN, &spec).unwrap();
    assert_eq!(code, 200, "{rollout}");

    // Each gateway's clock is stepped as soon as its probation starts.
    let mut started = Vec::new();
    for (agent, offset, step) in &fleet {
        let began = wait_until(Duration::from_secs(90), || {
            agent.proc.log_text().contains("probation started")
        });
        assert!(began, "{}: no probation: {}", agent.spec.device, agent.proc.log_text());
        std::fs::write(offset, format!("{step}\n")).unwrap();
        started.push(std::time::Instant::now());
    }
    // The gateways do live an hour off (their status files say what their clocks read).
    for (agent, _, step) in &fleet {
        let sign = if step.starts_with('-') { -1 } else { 1 };
        let off = wait_until(Duration::from_secs(5), || {
            let real = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            agent
                .status()
                .and_then(|s| s["at_ms"].as_i64())
                .is_some_and(|at| sign * (at - real) > 3_000_000)
        });
        assert!(off, "{}: its clock did not step {step}: {:?}", agent.spec.device, agent.status());
    }
    for ((agent, _, step), began) in fleet.iter().zip(started) {
        let committed = wait_until(Duration::from_secs(PROBATION_SECS + 40), || {
            agent.proc.log_text().contains("release committed")
        });
        let took = began.elapsed();
        assert!(
            committed,
            "{}: probation did not end within {} s of a {step} step: {}",
            agent.spec.device,
            PROBATION_SECS + 40,
            agent.proc.log_text()
        );
        // The step was written within a poll of the start: probation ends no sooner than its
        // length after it, less that poll and a tick.
        assert!(
            took + Duration::from_secs(2) >= Duration::from_secs(PROBATION_SECS),
            "{}: a {step} step ended probation after {took:?} of {PROBATION_SECS} s",
            agent.spec.device
        );
        assert!(agent.serving("rul-cnn-fd001").is_some_and(|s| s.0 == 2));
        println!(
            "{}: wall clock stepped {step} at the start of a {PROBATION_SECS} s probation: \
             committed {:.1} s later",
            agent.spec.device,
            took.as_secs_f64()
        );
    }
}

/// `drain_records_per_sec` paces a backlog's predictions (and drift), never its alerts: the
/// server's count grows no faster than the rate (plus one second's burst), and everything
/// arrives once.
#[test]
fn a_drain_rate_paces_a_backlog_and_loses_nothing() {
    const RATE: u64 = 50;
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let device = "paced";
    let mut spec = AgentSpec::replaying(device, 1..=3, 50.0);
    spec.data = Some(repo_file("data/cmapss/train_FD001_units_1-6.txt"));
    spec.uplink = format!("drain_records_per_sec = {RATE}\n");
    let agent = Agent::start(dir.path(), spec, &server).unwrap();
    assert!(wait_until(Duration::from_secs(30), || server.prediction_count(device) > 0));
    server.proc.kill();
    let finished = wait_until(Duration::from_secs(60), || {
        agent.proc.log_text().matches("replay finished").count() == 3
    });
    assert!(finished, "{}", agent.proc.log_text());
    std::thread::sleep(Duration::from_secs(2));
    let offline = agent.status().unwrap();
    let backlog = offline["backlog"]["pred"].as_u64().unwrap();
    let alerts = offline["backlog"]["alert"].as_u64().unwrap();
    assert!(backlog > 5 * RATE, "too small a backlog to pace: {offline}");

    server.restart().unwrap();
    // The backlog can hold records the server stored just before it was killed, whose ack
    // never reached the gateway: sent again, they are not stored twice. So the drain is done
    // when the server holds every prediction, not when it has taken `backlog` more.
    let total = agent.expected().unwrap().len() as u64;
    let start = server.prediction_count(device);
    let missing = total - start;
    assert!(missing > 5 * RATE, "too few predictions missing to pace: {missing} of {total}");
    let t0 = std::time::Instant::now();
    let mut samples = Vec::new();
    let drained = wait_until(Duration::from_secs(120), || {
        let n = server.prediction_count(device) - start;
        samples.push((t0.elapsed().as_secs_f64(), n));
        std::thread::sleep(Duration::from_millis(250));
        n >= missing
    });
    assert!(
        drained,
        "the backlog did not drain: {:?} of {missing}: {}",
        samples.last(),
        agent.proc.log_text()
    );
    let secs = samples.last().unwrap().0;
    // Counted from the restart: the connection takes a moment, so this bound is generous.
    for (t, n) in &samples {
        let bound = (RATE as f64 * (t + 1.0)).ceil() as u64 + RATE;
        assert!(*n <= bound, "{n} predictions delivered {t:.1} s after the restart (rate {RATE})");
    }
    let alerts_at =
        server.get(&format!("/api/v1/devices/{device}/streams")).unwrap()["alert"]["records"]
            .as_u64()
            .unwrap_or(0);
    assert!(alerts_at >= alerts, "alerts are not paced: {alerts_at} of {alerts} by then");
    wait_for_all(&server, &[&agent], Duration::from_secs(60)).unwrap();
    let stored = check_exactly_once(&server, &agent).unwrap();
    let streams = check_streams(&server, &agent, Duration::from_secs(30)).unwrap();
    println!(
        "a backlog of {backlog} predictions ({missing} not yet stored) and {alerts} alerts \
         drained at {RATE}/s: {:.0} predictions/s over {secs:.1} s ({alerts_at} alerts stored by \
         then); {stored} stored exactly once, streams {streams:?}",
        missing as f64 / secs
    );
}

#[test]
fn poison_records_are_dead_lettered_with_their_reason_and_the_streams_behind_them_flow() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let device = "poison";
    let mut agent =
        Agent::start(dir.path(), AgentSpec::replaying(device, [1, 2], 5.0), &server).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || server.prediction_count(device) > 0),
        "{}",
        dump(&server, &agent)
    );
    let (seq, mut body) = buffer_offline_then_kill(&mut server, &mut agent);
    // Records the gateway can read but the server can never store: a prediction whose cycle
    // is beyond SQLite's integers (a bug, or an older agent), and an update report naming a
    // directive seq of 2^64 - 1 (what an unsigned directive once made agents write).
    let (bad_seq, bad_asset, bad_cycle) = {
        let db = outbox(&agent);
        let key = (body["asset"].as_str().unwrap().to_owned(), body["cycle"].as_u64().unwrap());
        body["cycle"] = serde_json::json!(9_223_372_036_854_775_900_u64);
        db.execute(
            "UPDATE outbox SET body = ?2 WHERE stream = 'pred' AND seq = ?1",
            rusqlite::params![seq, body.to_string()],
        )
        .unwrap();
        db.execute_batch(
            r#"INSERT INTO outbox (stream, seq, at_ms, body) VALUES ('update', 1, 0,
                 '{"kind":"update","directive":18446744073709551615,"phase":"rejected","reason":"x"}');
               INSERT INTO sequences (stream, last_seq) VALUES ('update', 1);
               INSERT INTO stream_bytes (stream, bytes, records) VALUES ('update', 130, 1);"#,
        )
        .unwrap();
        (seq, key.0, key.1)
    };
    server.restart().unwrap();
    agent.restart().unwrap();
    let expected: Vec<ExpectedPrediction> = agent
        .expected()
        .unwrap()
        .into_iter()
        .filter(|p| (p.asset.as_str(), p.cycle) != (bad_asset.as_str(), bad_cycle))
        .collect();
    let delivered = wait_until(Duration::from_secs(90), || {
        server.prediction_count(device) >= expected.len() as u64
            && backlog_empty(&agent)
            && agent.status().unwrap()["last_seq"]["pred"]
                == stream(&server, device, "pred")["last_seq"]
    });
    assert!(delivered, "not delivered: {:?}\n{}", agent.status(), dump(&server, &agent));

    // The stream behind each poison record arrived exactly once.
    let stored = server.predictions(device).unwrap();
    let last = agent.status().unwrap()["last_seq"]["pred"].as_u64().unwrap();
    let want: Vec<u64> = (1..=last).filter(|&s| s != bad_seq).collect();
    assert_eq!(stored.iter().map(|p| p.seq).collect::<Vec<_>>(), want);
    let got: BTreeSet<(String, u64, u32)> =
        stored.iter().map(|p| (p.asset.clone(), p.cycle, (p.value as f32).to_bits())).collect();
    let exp: BTreeSet<(String, u64, u32)> =
        expected.iter().map(|p| (p.asset.clone(), p.cycle, p.value.to_bits())).collect();
    assert_eq!(got, exp);
    assert_eq!(stream(&server, device, "update")["records"], 0);

    // Dead-lettered with the server's reason, counted, and no longer sent.
    let letters: Vec<(String, u64, String)> = outbox(&agent)
        .prepare("SELECT stream, seq, reason FROM dead_letters ORDER BY stream")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        letters,
        vec![
            ("pred".to_owned(), bad_seq, "cycle or release above 2^63 - 1".to_owned()),
            ("update".to_owned(), 1, "directive or release above 2^63 - 1".to_owned()),
        ]
    );
    let status = agent.status().unwrap();
    assert_eq!(
        (&status["outbox_dead_letters"], &status["counters"]["records_dead_lettered"]),
        (&serde_json::json!(2), &serde_json::json!(2)),
        "{status}"
    );
    let sent = status["counters"]["batches_sent"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let later = agent.status().unwrap();
    assert_eq!(
        later["counters"]["batches_sent"].as_u64(),
        Some(sent),
        "nothing is resent: {later}"
    );
    assert_eq!(later["counters"]["resends"], 0, "{later}");
    let refused = server.metric("millwright_refused_total{reason=\"poison_record\"}");
    assert!(refused >= 2.0, "server counts the poison records' batches: {refused}");
    println!(
        "2 poison records (pred seq {bad_seq}: cycle > 2^63; update seq 1: directive 2^64 - 1) \
         dead-lettered with the server's reasons; {} predictions around them delivered exactly once",
        stored.len()
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_outage_that_overruns_the_quota_drops_only_predictions_and_drift_and_announces_every_gap() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path()).unwrap();
    let mut server = Server::start(dir.path(), BrokerChoice::Mosquitto(&mosquitto)).unwrap();
    let device = "quota";
    // Six engines run to failure (~1,000 predictions of ~250 bytes, and their alerts) and a
    // drift report per engine a second, into a 64 KiB outbox with 16 KiB kept for alerts and
    // update reports.
    let mut spec = AgentSpec::replaying(device, 1..=6, 20.0);
    spec.data = Some(repo_file("data/cmapss/train_FD001_units_1-6.txt"));
    spec.drift = Some("interval_secs = 1".into());
    spec.top = "[outbox]\nmax_bytes = 65536\nreserve_bytes = 16384\n".into();
    let agent = Agent::start(dir.path(), spec, &server).unwrap();
    // The uplink is gone from the start: the server is down behind a live broker.
    server.proc.kill();
    let pid = agent.proc.pid().unwrap();
    let mut rss = Vec::new();
    let finished = wait_until(Duration::from_secs(120), || {
        rss.push(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(900));
        agent.proc.log_text().matches("replay finished").count() == 6
    });
    assert!(finished, "replay did not finish: {}", agent.proc.log_text());
    std::thread::sleep(Duration::from_secs(2));
    let offline = agent.status().unwrap();
    let dropped_pred = offline["dropped"]["pred"].as_u64().unwrap_or(0);
    let made_pred = offline["last_seq"]["pred"].as_u64().unwrap();
    assert!(
        dropped_pred * 2 > made_pred,
        "the quota should have been overrun several times: {offline}"
    );
    assert!(offline["outbox_bytes"].as_u64() <= Some(65536), "{offline}");
    assert_eq!(offline["dropped"]["alert"], serde_json::Value::Null, "alerts never go: {offline}");
    assert_eq!(offline["dropped"]["update"], serde_json::Value::Null, "{offline}");
    let gaps_logged = agent.proc.log_text().matches("oldest records dropped").count();

    server.restart().unwrap();
    let drained = wait_until(Duration::from_secs(180), || backlog_empty(&agent));
    assert!(drained, "backlog not drained: {:?}\n{}", agent.status(), dump(&server, &agent));
    // Exactly once outside the announced gaps, on all four streams, and the server's gaps are
    // the gateway's drop counters, exactly.
    let streams = check_streams(&server, &agent, Duration::from_secs(60)).unwrap();
    let status = agent.status().unwrap();
    for name in ["pred", "alert", "drift", "update"] {
        let on_server = stream(&server, device, name);
        assert_eq!(
            on_server["dropped"].as_u64().unwrap(),
            status["dropped"][name].as_u64().unwrap_or(0),
            "{name}: server {on_server}, gateway {}",
            status["dropped"]
        );
    }
    // The same numbers in the fleet view the dashboard draws and in /metrics.
    let total: u64 =
        ["pred", "drift"].iter().map(|n| status["dropped"][n].as_u64().unwrap_or(0)).sum();
    let row = server.get(&format!("/api/v1/devices/{device}")).unwrap();
    assert_eq!(row["dropped"].as_u64(), Some(total), "{row}");
    for name in ["pred", "drift"] {
        let series = format!("millwright_records_dropped_by_policy_total{{stream=\"{name}\"}}");
        assert_eq!(
            server.metric(&series) as u64,
            status["dropped"][name].as_u64().unwrap_or(0),
            "{series}"
        );
    }
    let alerts = stream(&server, device, "alert");
    assert_eq!(alerts["dropped"], 0);
    assert!(alerts["records"].as_u64() > Some(0), "the replay raises alerts: {alerts}");
    // What arrived are the replay's own predictions, each once.
    let stored = server.predictions(device).unwrap();
    let expected: BTreeSet<(String, u64, u32)> = agent
        .expected()
        .unwrap()
        .iter()
        .map(|p| (p.asset.clone(), p.cycle, p.value.to_bits()))
        .collect();
    let got: Vec<(String, u64, u32)> =
        stored.iter().map(|p| (p.asset.clone(), p.cycle, (p.value as f32).to_bits())).collect();
    let unique: BTreeSet<_> = got.iter().cloned().collect();
    assert_eq!(unique.len(), got.len(), "no prediction twice");
    assert!(unique.is_subset(&expected), "nothing the replay did not make");
    // Dropped predictions were thinned, not lost without a trace: per asset, the gaps'
    // summaries are exactly what the replay made and the server does not have.
    let gaps = server.get(&format!("/api/v1/devices/{device}/gaps")).unwrap();
    // ... and answer as the OpenAPI document says (the demo the dashboard test reads has none).
    let doc = server.get_text("/api/v1/openapi.json").unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&doc.replace("#/components/schemas/", "#/$defs/")).unwrap();
    let mut schema = doc["paths"]["/api/v1/devices/{device}/gaps"]["get"]["responses"]["200"]
        ["content"]["application/json"]["schema"]
        .clone();
    schema["$defs"] = doc["components"]["schemas"].clone();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(&gaps).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "the gaps do not answer as documented: {errors:?}\n{gaps}");
    assert!(gaps.as_array().is_some_and(|g| !g.is_empty()));
    let mut summarized: std::collections::BTreeMap<String, (u64, f32, f32)> = Default::default();
    for gap in gaps.as_array().unwrap().iter().filter(|g| g["stream"] == "pred") {
        for s in gap["summaries"].as_array().unwrap() {
            let e = summarized.entry(s["asset"].as_str().unwrap().to_owned()).or_insert((
                0,
                f32::INFINITY,
                f32::NEG_INFINITY,
            ));
            e.0 += s["count"].as_u64().unwrap();
            e.1 = e.1.min(s["min"].as_f64().unwrap() as f32);
            e.2 = e.2.max(s["max"].as_f64().unwrap() as f32);
        }
    }
    let have: BTreeSet<(String, u64)> = got.iter().map(|(a, c, _)| (a.clone(), *c)).collect();
    let mut missing: std::collections::BTreeMap<String, (u64, f32, f32)> = Default::default();
    for (asset, cycle, bits) in &expected {
        if !have.contains(&(asset.clone(), *cycle)) {
            let v = f32::from_bits(*bits);
            let e = missing.entry(asset.clone()).or_insert((0, f32::INFINITY, f32::NEG_INFINITY));
            (e.0, e.1, e.2) = (e.0 + 1, e.1.min(v), e.2.max(v));
        }
    }
    assert_eq!(summarized, missing, "the gaps' summaries against what is missing, per asset");
    let thinned: u64 = summarized.values().map(|(n, _, _)| n).sum();
    assert_eq!(thinned, dropped_pred, "every dropped prediction is in a summary");
    let peak = rss.iter().max().copied().unwrap_or(0);
    let sampled: Vec<String> =
        rss.iter().step_by(2).map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect();
    println!(
        "quota 64 KiB overrun: {made_pred} predictions made, {dropped_pred} dropped in \
         {gaps_logged} announced gaps (thinned into {} per-asset summaries), {} delivered; streams {streams:?}; agent RSS MiB over the \
         outage: [{}], peak {:.1}",
        gaps.as_array()
            .unwrap()
            .iter()
            .map(|g| g["summaries"].as_array().unwrap().len())
            .sum::<usize>(),
        stored.len(),
        sampled.join(", "),
        peak as f64 / 1024.0
    );
}

/// A small tmpfs mounted at `at`, unmounted when dropped. Mounting needs root (CI runs as
/// root) or passwordless sudo.
struct SmallDisk(std::path::PathBuf, bool);

fn as_root(sudo: bool, args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut cmd = if sudo {
        let mut c = std::process::Command::new("sudo");
        c.arg("-n").args(args);
        c
    } else {
        let mut c = std::process::Command::new(args[0]);
        c.args(&args[1..]);
        c
    };
    cmd.output().expect("run mount")
}

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let options = format!("size={size}");
        let args: Vec<&std::ffi::OsStr> = vec![
            "mount".as_ref(),
            "-t".as_ref(),
            "tmpfs".as_ref(),
            "-o".as_ref(),
            options.as_ref(),
            "tmpfs".as_ref(),
            at.as_os_str(),
        ];
        let mut out = as_root(false, &args);
        let mut sudo = false;
        if !out.status.success() {
            sudo = true;
            out = as_root(true, &args);
        }
        assert!(
            out.status.success(),
            "the full-disk test mounts a {size} tmpfs: run as root or with passwordless sudo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(at.to_owned(), sudo)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = as_root(self.1, &["umount".as_ref(), "-l".as_ref(), self.0.as_os_str()]);
    }
}

#[test]
fn a_full_disk_mid_run_bounds_memory_loses_nothing_committed_and_recovers_by_itself() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let device = "full-disk";
    let disk = SmallDisk::mount(&dir.path().join(device).join("data"), "6m");
    let port = free_port();
    let mut spec = AgentSpec::replaying(device, [], 0.0);
    spec.mqtt_assets = vec![("press-1".into(), "plant/press-1/readings".into())];
    spec.top = format!("[local]\nlisten = \"127.0.0.1:{port}\"\n");
    // At most 10 x 100 records wait for a commit.
    spec.uplink = "flush_max_records = 100".into();
    let agent = Agent::start(dir.path(), spec, &server).unwrap();
    let page = format!("http://127.0.0.1:{port}/api/status");
    let live = || -> serde_json::Value {
        ureq::get(&page).call().ok().and_then(|r| r.into_json().ok()).unwrap_or_default()
    };
    assert!(wait_until(Duration::from_secs(20), || live()["uplink_connected"] == true));
    std::thread::sleep(Duration::from_secs(1));

    // A machine publishing readings at ~200/s for the whole test, from unit 2 of the data.
    let sender = server.enroll("disk-sender").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let topic = "plant/press-1/readings";
    let publisher = publish_readings(
        server.mqtt_port,
        &sender,
        topic,
        2,
        Duration::from_millis(5),
        stop.clone(),
    );
    assert!(
        wait_until(Duration::from_secs(30), || server.prediction_count(device) > 50),
        "{}",
        dump(&server, &agent)
    );

    // The disk fills up.
    let filler = disk.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() && f.flush().is_ok() {}
    }
    let full_at = live();
    let pid = agent.proc.pid().unwrap();
    let mut rss = Vec::new();
    let mut last = full_at.clone();
    let c = |s: &serde_json::Value, k: &str| s["counters"][k].as_u64().unwrap_or(0);
    // At least 15 s full, and until the cap has been passed (the rate of a debug build on a
    // loaded machine varies), at most 90 s.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(15)
        || (started.elapsed() < Duration::from_secs(90)
            && (c(&last, "records_unstored") == 0
                || c(&last, "predictions") <= c(&full_at, "predictions") + 500))
    {
        std::thread::sleep(Duration::from_secs(1));
        rss.push(rss_kib(pid));
        last = live();
    }
    assert!(c(&last, "store_errors") > c(&full_at, "store_errors"), "commits fail: {last}");
    assert!(c(&last, "records_unstored") > 0, "predictions beyond the cap not kept: {last}");
    assert!(c(&last, "predictions") > c(&full_at, "predictions") + 500, "inference goes on");
    let rss_growth = rss.last().unwrap().saturating_sub(rss[0]);
    assert!(rss_growth < 4096, "memory bounded on a full disk: RSS KiB {rss:?}");
    let log = agent.proc.log_text();
    assert_eq!(log.matches("outbox write failed").count(), 1, "logged once:\n{log}");

    // Space comes back: the agent resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    let resumed = wait_until(Duration::from_secs(30), || {
        agent.proc.log_text().contains("outbox writes work again")
    });
    assert!(resumed, "{}", dump(&server, &agent));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let published = publisher.join().unwrap();
    let drained = wait_until(Duration::from_secs(60), || backlog_empty(&agent));
    assert!(drained, "{:?}\n{}", agent.status(), dump(&server, &agent));
    // Everything committed arrived exactly once: seqs 1..=last, no gap.
    let streams = check_streams(&server, &agent, Duration::from_secs(30)).unwrap();
    let status = agent.status().unwrap();
    assert!(!agent.proc.log_text().contains("panicked"));
    println!(
        "full disk for 15 s under {published} MQTT readings: {} commits failed, {} predictions \
         not kept (shown on the page only), RSS KiB {:?} (growth {rss_growth}); after space \
         came back the agent resumed by itself and delivered {streams:?} exactly once",
        c(&status, "store_errors"),
        c(&status, "records_unstored"),
        rss
    );
}
