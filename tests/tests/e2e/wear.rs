//! SD-card wear: bytes an idle and a busy gateway write per hour, with `status.json` rewritten
//! every second (as before) and every 10 s (the default now), and a busy one's group commit
//! every 50 ms (as before) and every second (the default now). Prints the numbers.

use millwright_tests::*;
use std::time::Duration;

/// Bytes the process has caused to be written to storage, less what was cancelled (files
/// replaced before they reached the disk).
fn written(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    field("write_bytes:").saturating_sub(field("cancelled_write_bytes:"))
}

#[test]
fn an_idle_gateway_writes_a_tenth_of_its_status_file_churn_and_both_rates_are_measured() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let idle = |name: &str, every: u64| {
        let mut spec = AgentSpec::replaying(name, [], 0.0);
        spec.mqtt_assets = vec![("press-1".into(), format!("plant/{name}/readings"))];
        spec.top = format!("status_file_secs = {every}\n");
        Agent::start(dir.path(), spec, &server).unwrap()
    };
    let idle_1s = idle("idle-1s", 1);
    let idle_10s = idle("idle-10s", 10);
    let mut spec = AgentSpec::replaying("busy-10s", 1..=15, 5.0);
    spec.top = "status_file_secs = 10\n".into();
    spec.drift = Some("interval_secs = 10".into());
    spec.uplink = "flush_interval_ms = 50".into();
    let busy = Agent::start(dir.path(), spec, &server).unwrap();
    let mut spec = AgentSpec::replaying("busy-1s-flush", 1..=15, 5.0);
    spec.top = "status_file_secs = 10\n".into();
    spec.drift = Some("interval_secs = 10".into());
    let busy_slow_flush = Agent::start(dir.path(), spec, &server).unwrap();
    let agents = [&idle_1s, &idle_10s, &busy, &busy_slow_flush];
    assert!(wait_until(Duration::from_secs(30), || {
        agents.iter().all(|a| a.status().is_some_and(|s| s["uplink_connected"] == true))
    }));
    std::thread::sleep(Duration::from_secs(3));
    let window = Duration::from_secs(30);
    let before: Vec<u64> = agents.iter().map(|a| written(a.proc.pid().unwrap())).collect();
    let status_file = idle_10s.dir.join("data/status.json");
    let mut rewrites = 0;
    let mut seen = std::fs::metadata(&status_file).unwrap().modified().unwrap();
    let started = std::time::Instant::now();
    while started.elapsed() < window {
        std::thread::sleep(Duration::from_millis(250));
        let now = std::fs::metadata(&status_file).unwrap().modified().unwrap();
        if now != seen {
            rewrites += 1;
            seen = now;
        }
    }
    let per_hour: Vec<u64> = agents
        .iter()
        .zip(&before)
        .map(|(a, b)| (written(a.proc.pid().unwrap()) - b) * 3600 / window.as_secs())
        .collect();
    let predictions = busy.status().unwrap()["counters"]["predictions"].as_u64().unwrap();
    println!(
        "bytes written per hour (over {} s): idle, status.json every 1 s: {} KiB/h; idle, every \
         10 s (default): {} KiB/h; busy (15 assets, {predictions} predictions so far), a group commit \
         every 50 ms: {} KiB/h, every 1 s (default): {} KiB/h; status.json rewritten {rewrites} times \
         in {} s",
        window.as_secs(),
        per_hour[0] / 1024,
        per_hour[1] / 1024,
        per_hour[2] / 1024,
        per_hour[3] / 1024,
        window.as_secs()
    );
    assert!((2..=4).contains(&rewrites), "status.json every 10 s: {rewrites} rewrites in 30 s");
    assert!(
        per_hour[1] * 2 < per_hour[0],
        "the idle gateway's writes are mostly status.json: {per_hour:?}"
    );
    assert!(per_hour[3] * 2 < per_hour[2], "a busy gateway's are mostly commits: {per_hour:?}");
}
