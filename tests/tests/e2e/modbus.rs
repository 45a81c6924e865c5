//! Modbus TCP inputs against a PLC we did not write: pymodbus (`tests/servers/modbus_plc.py`)
//! playing C-MAPSS rows through a register map of every type and word order (the 24 features
//! the reference bundle monitors). The gateway's
//! predictions from the registers are the replay's, bit for bit; each fault of the input
//! (down at start, NaN, an exception, a stall, killed mid-run) is counted by kind while the
//! gateway and its other asset run on.

use millwright_tests::plc::{Plc, modbus_asset, unit_rows};
use millwright_tests::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const TRAIN: &str = "data/cmapss/train_FD001_units_1-6.txt";

fn rejected(agent: &Agent, kind: &str) -> u64 {
    agent.status().and_then(|s| s["counters"]["readings_rejected"][kind].as_u64()).unwrap_or(0)
}

fn rejections(agent: &Agent) -> Value {
    agent.status().map(|s| s["counters"]["readings_rejected"].clone()).unwrap_or_default()
}

/// Adds the data-quality flags of `asset`'s last drift verdict for `feature` to `seen`.
fn note_flags(agent: &Agent, asset: &str, feature: &str, seen: &mut BTreeSet<String>) {
    let Some(status) = agent.status() else { return };
    for a in status["assets"].as_array().into_iter().flatten().filter(|a| a["asset"] == asset) {
        for flag in a["drift"][feature]["flags"].as_array().into_iter().flatten() {
            seen.extend(flag.as_str().map(str::to_owned));
        }
    }
}

/// `asset`'s input problem in the agent's status: its kind, if there is one.
fn input_problem(agent: &Agent, asset: &str) -> Option<String> {
    let status = agent.status()?;
    let a = status["assets"].as_array()?.iter().find(|a| a["asset"] == asset)?.clone();
    a["input"]["kind"].as_str().map(str::to_owned)
}

fn predictions_of(server: &Server, device: &str, asset: &str) -> Vec<StoredPrediction> {
    let all = server.predictions(device).unwrap_or_default();
    all.into_iter().filter(|p| p.asset == asset).collect()
}

#[test]
fn a_plc_polled_over_modbus_gives_the_replays_predictions_bit_for_bit() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let data = repo_file(TRAIN);
    let rows = unit_rows(&data, 1).unwrap();
    let plc = Plc::start(dir.path(), rows.clone(), json!({})).unwrap();
    let device = "modbus-gw";
    let mut spec = AgentSpec::replaying(device, [], 0.0);
    spec.extra_assets = modbus_asset("unit-1", &repo_file(BUNDLE), plc.port, 20, 1000);
    let started = Instant::now();
    let agent = Agent::start(dir.path(), spec, &server).unwrap();
    let expected: Vec<ExpectedPrediction> = expected_predictions_of(&data)
        .unwrap()
        .into_iter()
        .filter(|p| p.asset == "unit-1")
        .collect();
    let all = wait_until(Duration::from_secs(90), || {
        server.prediction_count(device) >= expected.len() as u64
    });
    assert!(
        all,
        "{} of {} predictions\n--- agent:\n{}\n--- PLC:\n{}",
        server.prediction_count(device),
        expected.len(),
        agent.proc.log_text(),
        plc.proc.log_text()
    );
    let took = started.elapsed();
    // Past its last row the PLC answers exceptions: each poll's is counted, none predicts.
    let counted = wait_until(Duration::from_secs(30), || rejected(&agent, "input_exception") >= 5);
    assert!(counted, "end-of-rows exceptions not counted: {}", rejections(&agent));
    assert!(plc.ended());
    let stored = server.predictions(device).unwrap();
    assert_eq!(stored.len(), expected.len(), "predictions beyond the rows the PLC gave");
    for (s, e) in stored.iter().zip(&expected) {
        assert_eq!(
            (s.asset.as_str(), s.cycle, (s.value as f32).to_bits()),
            (e.asset.as_str(), e.cycle, e.value.to_bits()),
            "the PLC's values give the replay's prediction ({} vs {})",
            s.value,
            e.value
        );
    }
    assert_eq!(plc.rows_shown(), (0..rows.len()).collect::<Vec<_>>(), "each row is read once");
    assert_eq!(
        plc.connections(),
        1,
        "one connection for every poll\n--- agent:\n{}\n--- PLC:\n{}",
        agent.proc.log_text(),
        plc.proc
            .log_text()
            .lines()
            .filter(|l| !l.starts_with("row "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let kinds = rejections(&agent);
    let others: Vec<&String> =
        kinds.as_object().unwrap().keys().filter(|k| *k != "input_exception").collect();
    assert!(others.is_empty(), "rejections other than the end of rows: {kinds}");
    println!(
        "{} rows over Modbus TCP (24 values in 47 registers: f32/f64/u32/i16/u16, both word and \
         byte orders, 2 requests per poll at 20 ms) gave {} predictions equal bit for bit to the replay's, \
         stored in {:.1} s; then {} exceptions counted",
        rows.len(),
        stored.len(),
        took.as_secs_f64(),
        rejected(&agent, "input_exception")
    );
}

#[test]
fn each_modbus_fault_is_counted_by_kind_and_the_gateway_and_its_other_asset_run_on() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let data = repo_file(TRAIN);
    let port = free_port();
    let device = "plc-faults";
    // Unit 2 replays beside the PLC for the whole scenario (287 cycles at 10 per second).
    let mut spec = AgentSpec::replaying(device, [2], 10.0);
    spec.data = Some(data.clone());
    spec.drift = Some("interval_secs = 1".into());
    spec.extra_assets = modbus_asset("press-7", &repo_file(BUNDLE), port, 50, 300);
    let agent = Agent::start(dir.path(), spec, &server).unwrap();

    // Down at start: every poll is a reading with every feature unavailable.
    let down = wait_until(Duration::from_secs(30), || rejected(&agent, "input_disconnected") >= 3);
    assert!(down, "an absent PLC is not counted: {}", rejections(&agent));
    assert!(agent.proc.log_text().contains("cannot connect to the Modbus device"));
    let shown = wait_until(Duration::from_secs(10), || {
        input_problem(&agent, "press-7").as_deref() == Some("input_disconnected")
    });
    assert!(shown, "the status does not say the PLC is unreachable: {:?}", agent.status());
    assert_eq!(input_problem(&agent, "unit-2"), None, "the replayed asset has no input problem");

    // Up, with a NaN in row 40, an exception before row 60 and a 2 s stall at row 80 (the
    // agent's timeout is 300 ms).
    let rows = unit_rows(&data, 1).unwrap();
    let faults = json!({"40": "nan", "60": "exception", "80": "stall"});
    let mut plc = Plc::start_on(dir.path(), port, rows.clone(), faults).unwrap();
    // The drift reports (one a second) name the faults as data-quality flags.
    let mut flags = BTreeSet::new();
    let past = wait_until(Duration::from_secs(60), || {
        note_flags(&agent, "press-7", "s2", &mut flags);
        plc.rows_shown().len() > 90
    });
    assert!(past, "the PLC is not being read: {}\n{}", plc.proc.log_text(), agent.proc.log_text());
    let counted = wait_until(Duration::from_secs(10), || {
        ["non_finite", "input_exception", "input_timeout"].iter().all(|k| rejected(&agent, k) >= 1)
    });
    assert!(counted, "a fault is not counted by its kind: {}", rejections(&agent));
    let log = agent.proc.log_text();
    assert!(log.contains("Modbus connection dropped: the request timed out"), "{log}");
    let flagged = wait_until(Duration::from_secs(10), || {
        note_flags(&agent, "press-7", "s2", &mut flags);
        flags.contains("non_finite") && flags.contains("missing")
    });
    assert!(flagged, "the NaN and the unavailable values are not flagged in drift: {flags:?}");
    let before_kill = predictions_of(&server, device, "press-7").len();
    assert!(before_kill > 30, "only {before_kill} predictions from the PLC");

    // Killed mid-run: the connection's loss is counted; restarted, polling resumes by itself.
    let disconnected = rejected(&agent, "input_disconnected");
    plc.kill();
    let noticed = wait_until(Duration::from_secs(20), || {
        rejected(&agent, "input_disconnected") > disconnected + 5
    });
    assert!(noticed, "a killed PLC is not counted: {}", rejections(&agent));
    let during = predictions_of(&server, device, "press-7").len();
    plc.restart().unwrap();
    let resumed = wait_until(Duration::from_secs(60), || {
        predictions_of(&server, device, "press-7").len() > during + 10
    });
    assert!(resumed, "no predictions after the PLC came back\n{}", agent.proc.log_text());
    let cleared =
        wait_until(Duration::from_secs(10), || input_problem(&agent, "press-7").is_none());
    assert!(cleared, "the input problem outlasts the PLC's return: {:?}", agent.status());

    // The replayed asset beside it lost nothing and was not held up.
    let expected: Vec<ExpectedPrediction> = expected_predictions_of(&data)
        .unwrap()
        .into_iter()
        .filter(|p| p.asset == "unit-2")
        .collect();
    let replayed = wait_until(Duration::from_secs(60), || {
        predictions_of(&server, device, "unit-2").len() >= expected.len()
    });
    assert!(replayed, "the replayed asset did not finish");
    let stored = predictions_of(&server, device, "unit-2");
    let got: Vec<(u64, u32)> =
        stored.iter().map(|p| (p.cycle, (p.value as f32).to_bits())).collect();
    let want: Vec<(u64, u32)> = expected.iter().map(|p| (p.cycle, p.value.to_bits())).collect();
    assert_eq!(got, want, "the replayed asset's predictions, each once");
    let status = agent.status().unwrap();
    assert!(!agent.proc.log_text().contains("panicked"));
    println!(
        "PLC faults counted by kind: {} and flagged in drift reports ({flags:?}); {} predictions from the PLC ({before_kill} before the \
         kill, {} after the restart); the replayed asset's {} predictions all stored once",
        status["counters"]["readings_rejected"],
        predictions_of(&server, device, "press-7").len(),
        predictions_of(&server, device, "press-7").len() - during,
        stored.len()
    );
}

/// The PLC is read over the plant network, not the uplink: with the server and its broker gone,
/// the engine's values still cross the alarm threshold, the gateway raises the alarm itself,
/// and the alarm reaches the server once the uplink is back.
#[test]
fn an_alarm_from_plc_values_is_raised_while_the_uplink_is_down_and_arrives_once_after() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let data = repo_file(TRAIN);
    // Unit 1 runs to failure: its last cycles are in alarm.
    let rows = unit_rows(&data, 1).unwrap();
    let plc = Plc::start(dir.path(), rows.clone(), json!({})).unwrap();
    let device = "plc-offline";
    let mut spec = AgentSpec::replaying(device, [], 0.0);
    spec.extra_assets = modbus_asset("unit-1", &repo_file(BUNDLE), plc.port, 50, 1000);
    let agent = Agent::start(dir.path(), spec, &server).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || server.prediction_count(device) > 0),
        "{}",
        agent.proc.log_text()
    );
    let alerts = |agent: &Agent| agent.status().and_then(|s| s["counters"]["alerts"].as_u64());
    assert_eq!(alerts(&agent), Some(0), "an alert before the outage");
    server.proc.kill();

    let read = wait_until(Duration::from_secs(60), || plc.ended());
    assert!(read, "the PLC was not read to its end while the uplink was down");
    std::thread::sleep(Duration::from_secs(2));
    let offline = agent.status().unwrap();
    let raised = offline["counters"]["alerts"].as_u64().unwrap_or(0);
    assert!(raised >= 1, "no alert raised while the uplink was down: {offline}");
    let level = offline["assets"][0]["level"].as_str().unwrap_or_default().to_owned();
    assert_eq!(level, "alarm", "the engine's last cycles are in alarm: {offline}");
    let waiting = offline["backlog"]["alert"].as_u64().unwrap_or(0);
    assert!(waiting >= 1, "the alerts are not in the outbox: {offline}");
    assert_eq!(offline["uplink_connected"], false, "{offline}");

    server.restart().unwrap();
    let streams = check_streams(&server, &agent, Duration::from_secs(60)).unwrap();
    let stored = server.predictions(device).unwrap();
    let expected: Vec<ExpectedPrediction> = expected_predictions_of(&data)
        .unwrap()
        .into_iter()
        .filter(|p| p.asset == "unit-1")
        .collect();
    let got: Vec<(u64, u32)> =
        stored.iter().map(|p| (p.cycle, (p.value as f32).to_bits())).collect();
    let want: Vec<(u64, u32)> = expected.iter().map(|p| (p.cycle, p.value.to_bits())).collect();
    assert_eq!(got, want, "the predictions, each once");
    let alert_records = streams.iter().find(|(s, _)| s == "alert").map_or(0, |(_, n)| *n);
    assert_eq!(alert_records, raised, "every alert raised offline arrived once: {streams:?}");
    println!(
        "uplink down while the PLC's values crossed the alarm threshold: {raised} alert(s) \
         raised on the gateway ({waiting} waiting in the outbox, level {level}), all stored once \
         after the restart with {} predictions; streams {streams:?}",
        stored.len()
    );
}
