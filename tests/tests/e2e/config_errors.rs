//! Bad configuration stops a daemon at once with exit code 64 and a message naming the problem.

use millwright_tests::bin;
use std::process::Command;

fn run_agent(toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(bin("millwright-agent"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_agent_names_what_is_wrong_with_its_config_and_exits_64() {
    let cases = [
        ("device = 'gw'\ndata_dir = 'd'\nspeed = 3\n", "unknown field `speed`"),
        (
            "device = 'gw/1'\ndata_dir = 'd'\n[uplink]\nbroker = 'h:1'\n[trust]\nkeys = []\n",
            "may only contain",
        ),
        (
            "device = 'gw'\ndata_dir = 'd'\n[uplink]\nbroker = 'h:port'\n[trust]\nkeys = []\n",
            "is not host:port",
        ),
        (
            "device = 'gw'\ndata_dir = 'd'\n[uplink]\nbroker = 'h:1'\n[trust]\nkeys = ['missing.json']\n",
            "missing.json",
        ),
        ("not toml at all [", "agent.toml"),
    ];
    for (toml, needle) in cases {
        let (code, stderr) = run_agent(toml);
        assert_eq!(code, Some(64), "{toml:?}: {stderr}");
        assert!(stderr.contains(needle), "{toml:?}: expected {needle:?} in {stderr:?}");
    }
}

#[test]
fn the_server_refuses_a_bad_listen_address_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("millwright-server"))
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--http")
        .arg("localhost")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("http_listen \"localhost\""), "{stderr}");
}
