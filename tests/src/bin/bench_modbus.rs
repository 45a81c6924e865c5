//! Benchmark: what polling PLCs costs a gateway. One agent polls two assets over Modbus TCP
//! on one connection (24 values in 47 registers each, two requests per asset) at 10 Hz from a
//! pymodbus PLC looping a C-MAPSS engine's rows, predicts on every reading and forwards to a
//! real server;
//! prints the agent's CPU share and RSS (current and peak) over a minute of it. The agent is
//! the test build's unless `MILLWRIGHT_BIN_MILLWRIGHT_AGENT` names another (the static edge
//! binary, for the figures the edge budget is about). Prints numbers and asserts nothing.

use millwright_tests::plc::{Plc, PlcRegister, modbus_asset, turbofan_registers, unit_rows};
use millwright_tests::{Agent, AgentSpec, BUNDLE, BrokerChoice, Server, repo_file, wait_until};
use std::time::{Duration, Instant};

const ASSETS: usize = 2;
const POLL_MS: u64 = 100;
const SECS: u64 = 60;

/// (user + system CPU seconds, RSS KiB, peak RSS KiB) of `pid`.
fn usage(pid: u32) -> anyhow::Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields.get(11..13).unwrap_or_default().iter().filter_map(|f| f.parse::<f64>().ok()).sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    // USER_HZ is 100 on Linux.
    Ok((ticks / 100.0, kib("VmRSS:"), kib("VmHWM:")))
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), BrokerChoice::Embedded)?;
    let rows = unit_rows(&repo_file("data/cmapss/train_FD001_units_1-6.txt"), 1)?;
    let plc = Plc::start_looping(dir.path(), rows)?;
    let mut spec = AgentSpec::replaying("bench-modbus", [], 0.0);
    for i in 0..ASSETS {
        spec.extra_assets +=
            &modbus_asset(&format!("press-{i}"), &repo_file(BUNDLE), plc.port, POLL_MS, 1000);
    }
    let agent = Agent::start(dir.path(), spec, &server)?;
    let pid = agent.proc.pid().ok_or_else(|| anyhow::anyhow!("the agent is not running"))?;
    if !wait_until(Duration::from_secs(60), || server.prediction_count("bench-modbus") > 0) {
        anyhow::bail!("no predictions: {}", agent.proc.log_text());
    }
    // Measured after a warm-up: the model's windows are full and the uplink is connected.
    std::thread::sleep(Duration::from_secs(5));
    let (cpu0, _, _) = usage(pid)?;
    let (t0, stored0) = (Instant::now(), server.prediction_count("bench-modbus"));
    std::thread::sleep(Duration::from_secs(SECS));
    let (cpu1, rss, peak) = usage(pid)?;
    let secs = t0.elapsed().as_secs_f64();
    let stored = server.prediction_count("bench-modbus") - stored0;
    let rejected =
        agent.status().map(|s| s["counters"]["readings_rejected"].clone()).unwrap_or_default();
    println!(
        "bench-modbus: agent={} assets={ASSETS} registers={} poll_hz={} seconds={secs:.0} \
         cpu_percent={:.2} rss_mib={:.1} peak_rss_mib={:.1} predictions_per_s={:.1} \
         plc_connections={} rejected={rejected}",
        millwright_tests::bin("millwright-agent").display(),
        ASSETS * turbofan_registers().iter().map(PlcRegister::words).sum::<usize>(),
        1000 / POLL_MS,
        100.0 * (cpu1 - cpu0) / secs,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        stored as f64 / secs,
        plc.connections()
    );
    Ok(())
}
