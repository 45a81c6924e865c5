//! The fleet simulator end to end: `millwright simulate` enrolls gateways, connects each over
//! TLS with its client certificate to the server it starts itself, sends signed batches and
//! statuses, and checks the signed acks; its books must agree with the server's database,
//! which the test then reads on its own.

use millwright_tests::{bin, fleet_lock};
use std::collections::HashMap;
use std::process::Command;

fn fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace().skip(1).filter_map(|kv| kv.split_once('=')).collect()
}

#[test]
fn simulated_gateways_get_every_record_acked_and_the_server_stores_each_once() {
    let line = forty_gateways_send_for_four_seconds(&[]);
    assert_eq!(fields(&line)["broker"], "embedded", "{line}");
}

#[test]
fn simulated_gateways_on_mosquitto_get_every_record_acked_and_stored_once() {
    let line = forty_gateways_send_for_four_seconds(&["--mosquitto"]);
    let f = fields(&line);
    assert_eq!(f["broker"], "mosquitto", "{line}");
    assert!(f["broker_rss_mib"].parse::<f64>().is_ok_and(|m| m > 0.0), "{line}");
}

/// Forty gateways send for four seconds; checks the result line and the server's database.
fn forty_gateways_send_for_four_seconds(extra: &[&str]) -> String {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("simulate");
    let out = Command::new(bin("millwright"))
        .args(["simulate", "--devices", "40", "--seconds", "4", "--in-flight", "2"])
        .args(["--status-secs", "1"])
        .args(extra)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "simulate failed:\n{stdout}\n{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("simulate: ")).expect("the result line");
    println!("{line}");
    let f = fields(line);
    let num = |k: &str| f[k].parse::<f64>().unwrap_or_else(|_| panic!("{k} in {line}"));
    assert_eq!((f["devices"], f["seconds"]), ("40", "4"));
    for zero in ["lost", "duplicated", "unacked", "refused", "bad_acks", "api_failed"] {
        assert_eq!(f[zero], "0", "{zero} in {line}");
    }
    // The dashboard's reads, timed while the fleet sends: seven a round, a round a second.
    assert!(num("api_reads") >= 7.0 * 3.0, "{line}");
    assert!(
        num("api_p99_ms") >= num("api_p50_ms") && num("api_max_ms") >= num("api_p99_ms"),
        "{line}"
    );
    // Ten records a batch; the two rates are rounded apiece as printed.
    let per_batch = num("records_per_s") / num("msgs_per_s");
    assert!(num("msgs_per_s") > 0.0 && (per_batch - 10.0).abs() < 0.01, "{line}");
    assert!(num("ack_p50_ms") > 0.0 && num("ack_p99_ms") >= num("ack_p50_ms"), "{line}");
    // A status a second from each of the 40 for at least the 4 seconds of sending.
    assert!(num("statuses") >= 40.0 * 3.0, "{line}");

    // What the server stored, read from its database here rather than through the simulator:
    // every record sent, each once, from every gateway; every gateway's status recorded.
    let db = rusqlite::Connection::open(data.join("server/server.sqlite")).unwrap();
    let (rows, devices, highest): (u64, u64, u64) = db
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT device), \
             (SELECT SUM(m) FROM (SELECT MAX(seq) AS m FROM predictions GROUP BY device)) \
             FROM predictions",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(devices, 40);
    assert_eq!(rows.to_string(), f["sent"], "{line}");
    assert_eq!(f["stored"], f["sent"], "{line}");
    assert_eq!(rows, highest, "sequence numbers from 1 without a gap: each record once");
    let statuses: u64 = db
        .query_row("SELECT COUNT(*) FROM devices WHERE agent_version LIKE 'simulate-%'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(statuses, 40, "every gateway's signed status was accepted");
    line.to_owned()
}

/// `millwright simulate --rollout`: release 2 of the reference bundle to `devices` simulated
/// gateways; returns the result lines and the server's database.
fn simulate_rollout(
    devices: &str,
    fail_share: &str,
) -> (String, rusqlite::Connection, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("simulate");
    let bundle = millwright_tests::repo_file("models/rul-cnn-fd001/rul-cnn-fd001.mwb");
    let out = Command::new(bin("millwright"))
        .args(["simulate", "--devices", devices, "--seconds", "2", "--status-secs", "5"])
        .arg("--rollout")
        .arg(&bundle)
        .args(["--fail-share", fail_share, "--max-failures-percent", "1", "--phase-secs", "1"])
        .args(["--rollout-timeout-secs", "240", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "simulate failed:\n{stdout}\n{stderr}");
    let line = |prefix: &str| {
        stdout.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{stdout}"))
    };
    let (run, rollout) = (line("simulate: "), line("rollout: "));
    println!("{run}\n{rollout}");
    for zero in ["lost", "duplicated", "unacked", "bad_acks"] {
        assert_eq!(fields(run)[zero], "0", "{zero} in {run}");
    }
    // The reason is a line of its own; here it joins the fields, spaces as underscores.
    let reason = stdout.lines().find_map(|l| l.strip_prefix("rollout reason: "));
    let rollout = format!("{rollout} reason={}", reason.unwrap_or("-").replace(' ', "_"));
    let db = rusqlite::Connection::open(data.join("server/server.sqlite")).unwrap();
    (rollout, db, dir)
}

fn count(db: &rusqlite::Connection, sql: &str) -> u64 {
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// 100 gateways, every one verifying its directive and the chunks and reporting each phase:
/// the rollout's canary and doubling waves all commit, and every gateway says it serves
/// release 2.
#[test]
fn a_simulated_fleet_takes_a_rollout_through_every_phase() {
    let _fleet = fleet_lock();
    let (line, db, _dir) = simulate_rollout("100", "0");
    let f = fields(&line);
    assert_eq!(
        (f["state"], f["wave"], f["committed"], f["failed"]),
        ("completed", "7/7", "100", "0")
    );
    for zero in ["bad_chunks", "bad_directives"] {
        assert_eq!(f[zero], "0", "{zero} in {line}");
    }
    // Five chunks of 64 KiB each (the bundle is 264 KiB) to each gateway, checked.
    assert_eq!(f["chunks"], "500", "{line}");
    let phases = count(&db, "SELECT COUNT(DISTINCT device || phase) FROM update_reports");
    assert_eq!(phases, 100 * 7, "received … committed from each gateway, once per phase");
    let serving = count(&db, "SELECT COUNT(*) FROM devices WHERE models LIKE '%\"release\":2%'");
    assert_eq!(serving, 100, "every gateway's status says release 2");
}

/// 2 % of 100 gateways fail (sim-00049 and sim-00099, spread evenly), 1 % of a wave is
/// tolerated: the canary (1) and the waves of 2, 4, 8 and 16 pass; the wave of 32
/// (sim-00031..62) holds sim-00049, and one failure is more than 1 % of 32, so the rollout
/// pauses there, and the last wave (sim-00063..99) never gets a directive.
#[test]
fn a_simulated_rollout_pauses_at_the_first_wave_whose_failures_pass_their_share() {
    let _fleet = fleet_lock();
    let (line, db, _dir) = simulate_rollout("100", "0.02");
    let f = fields(&line);
    assert_eq!((f["state"], f["wave"], f["failed"]), ("paused", "6/7", "1"), "{line}");
    assert_eq!(f["reason"], "1_of_32_device(s)_failed_in_wave_5_(at_most_0_tolerated)");
    let committed: u64 = f["committed"].parse().unwrap();
    assert!((31..=62).contains(&committed), "the waves before, and some of wave 5: {line}");
    let rejected = db
        .query_row("SELECT device, reason FROM update_reports WHERE phase = 'rejected'", [], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .unwrap();
    assert_eq!(rejected.0, "sim-00049");
    assert!(rejected.1.starts_with("simulated failure"), "{rejected:?}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM directives WHERE device >= 'sim-00063'"), 0);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM directives"), 63);
}
