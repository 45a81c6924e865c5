//! Retention in the real server: a gateway's predictions and alerts are stored; the server restarts two
//! days later (libfaketime) with raw predictions kept one day; its first pass removes them,
//! keeps their hourly summaries, keeps the alerts (a year), and the stream's accounting still
//! adds up to the gateway's own last sequence number.

use millwright_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// Checks `answer` against the OpenAPI document's schema for `GET path`.
fn answers_as_documented(server: &Server, path: &str, answer: &Value) {
    let doc = server.get_text("/api/v1/openapi.json").unwrap();
    let doc: Value =
        serde_json::from_str(&doc.replace("#/components/schemas/", "#/$defs/")).unwrap();
    let mut schema =
        doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
            .clone();
    assert!(!schema.is_null(), "the OpenAPI document has no GET {path}");
    schema["$defs"] = doc["components"]["schemas"].clone();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(answer).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{path} does not answer as documented: {errors:?}\n{answer}");
}

#[test]
fn old_predictions_are_removed_into_hourly_summaries_and_the_counts_still_add_up() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let config = "[retention]\npredictions_days = 1\nhourly_days = 7\n";
    let mut server = Server::start_with_config(dir.path(), BrokerChoice::Embedded, config).unwrap();
    // Six engines run to failure: about 1,000 predictions, and alerts as they near the end.
    let mut spec = AgentSpec::replaying("keep-gw", 1..=6, 0.0);
    spec.data = Some(repo_file("data/cmapss/train_FD001_units_1-6.txt"));
    let mut agent = Agent::start(dir.path(), spec, &server).unwrap();
    let device = agent.spec.device.clone();
    let stored = check_exactly_once(&server, &agent).unwrap() as u64;
    let before = check_streams(&server, &agent, Duration::from_secs(60)).unwrap();
    let alerts = before.iter().find(|(s, _)| s == "alert").map_or(0, |(_, n)| *n);
    assert!(stored > 100 && alerts > 0, "{stored} predictions, {alerts} alerts to keep an eye on");
    let health = server.get("/api/v1/health").unwrap();
    assert_eq!(health["retention"]["predictions"], 0, "nothing is a day old yet: {health}");
    agent.proc.kill();

    server.proc.kill();
    let lib = libfaketime();
    let env = [
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("FAKETIME", "+2d"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    server.restart_with_env(&env).unwrap();
    let passed = wait_until(Duration::from_secs(30), || {
        server.get("/api/v1/health").is_ok_and(|h| h["retention"]["passes"].as_u64() >= Some(1))
    });
    let health = server.get("/api/v1/health").unwrap();
    assert!(passed, "no retention pass within 30 s: {health}\n{}", server.proc.log_text());
    answers_as_documented(&server, "/api/v1/health", &health);
    let report = &health["retention"];
    println!("retention: {report}");
    assert_eq!(report["error"], Value::Null, "{report}");
    assert_eq!(report["predictions"].as_u64(), Some(stored), "every prediction is two days old");
    assert_eq!(report["alerts"], 0, "alerts are kept a year");
    let series = "millwright_retention_removed_total{kind=\"predictions\"}";
    assert_eq!(server.metric(series) as u64, stored, "{series}");

    let raw = server.get(&format!("/api/v1/devices/{device}/predictions")).unwrap();
    assert_eq!(raw.as_array().map(Vec::len), Some(0), "{raw}");
    let streams = server.get(&format!("/api/v1/devices/{device}/streams")).unwrap();
    let pred = &streams["pred"];
    assert_eq!(
        (pred["records"].as_u64(), pred["pruned"].as_u64(), pred["last_seq"].as_u64()),
        (Some(0), Some(stored), Some(stored)),
        "{streams}"
    );
    assert_eq!(streams["alert"]["records"].as_u64(), Some(alerts), "{streams}");
    let listed = server.get(&format!("/api/v1/devices/{device}")).unwrap();
    assert_eq!(
        (listed["predictions"].as_u64(), listed["alerts"].as_u64()),
        (Some(0), Some(alerts))
    );

    // The hourly summaries hold every removed prediction, and per asset the last one said.
    let path = "/api/v1/devices/{device}/predictions/hourly";
    let hours = server.get(&path.replace("{device}", &device)).unwrap();
    answers_as_documented(&server, path, &hours);
    let hours = hours.as_array().unwrap();
    assert!(!hours.is_empty());
    let summed: u64 = hours.iter().map(|h| h["records"].as_u64().unwrap()).sum();
    assert_eq!(summed, stored);
    let mut last_said: BTreeMap<String, (u64, f32)> = BTreeMap::new();
    for h in hours {
        let e = last_said.entry(h["asset"].as_str().unwrap().to_owned()).or_insert((0, 0.0));
        if h["last_seq"].as_u64().unwrap() >= e.0 {
            *e = (h["last_seq"].as_u64().unwrap(), h["last_value"].as_f64().unwrap() as f32);
        }
    }
    let mut expected: BTreeMap<String, f32> = BTreeMap::new();
    for p in agent.expected().unwrap() {
        expected.insert(p.asset.clone(), p.value);
    }
    let said: BTreeMap<String, f32> = last_said.into_iter().map(|(a, (_, v))| (a, v)).collect();
    assert_eq!(said, expected, "each asset's newest summarised prediction is its replay's last");
}
