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
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("simulate");
    let out = Command::new(bin("millwright"))
        .args(["simulate", "--devices", "40", "--seconds", "4", "--in-flight", "2"])
        .args(["--status-secs", "1", "--data-dir"])
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
    for zero in ["lost", "duplicated", "unacked", "refused", "bad_acks"] {
        assert_eq!(f[zero], "0", "{zero} in {line}");
    }
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
}
