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
            "device = 'gw/1'\ndata_dir = 'd'\n[uplink]\nbroker = '127.0.0.1:1'\n[trust]\nkeys = []\n",
            "may only contain",
        ),
        (
            "device = 'gw'\ndata_dir = 'd'\n[uplink]\nbroker = 'h:port'\n[trust]\nkeys = []\n",
            "is not [mqtts://]host:port",
        ),
        (
            "device = 'gw'\ndata_dir = 'd'\n[uplink]\nbroker = '127.0.0.1:1'\n[trust]\nkeys = ['missing.json']\n",
            "missing.json",
        ),
        ("not toml at all [", "agent.toml"),
        (
            "device = 'gw'\ndata_dir = 'd'\n[uplink]\nbroker = 'mqtt://10.9.8.7:1883'\n[trust]\nkeys = []\n",
            "would cross the network in clear",
        ),
        (
            "device = 'gw'\ndata_dir = 'd'\n[uplink]\nbroker = '127.0.0.1:1'\n[local]\nlisten = '0.0.0.0:8090'\n[trust]\nkeys = []\n",
            "the operator PIN would cross the network in clear",
        ),
    ];
    let unenrolled = format!(
        "device = 'gw'\ndata_dir = 'd'\n[uplink]\nbroker = '127.0.0.1:1'\n[trust]\nkeys = [{:?}]\n\
         [[assets]]\nid = 'u1'\nasset_type = 'turbofan'\nbundle = {:?}\n\
         source = {{ kind = 'mqtt', topic = 'x' }}\n",
        millwright_tests::repo_file(millwright_tests::PUBLIC_KEY),
        millwright_tests::repo_file(millwright_tests::BUNDLE),
    );
    let cases = cases.iter().map(|(t, n)| ((*t).to_owned(), *n));
    for (toml, needle) in cases.chain([(unenrolled, "no [identity]: enroll this gateway")]) {
        let (code, stderr) = run_agent(&toml);
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

/// A server listening off this host without TLS refuses to start, and says why; so does one
/// without its signing key.
#[test]
fn the_server_refuses_plaintext_off_loopback_and_a_missing_identity_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let pki = millwright_tests::pki::Pki::at(dir.path()).unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, format!("[identity]\nserver_key = {:?}\n", pki.message_key)).unwrap();
    let run = |args: &[&str], with_config: bool| {
        let mut cmd = Command::new(bin("millwright-server"));
        if with_config {
            cmd.arg("--config").arg(&config);
        }
        let out = cmd.arg("--data-dir").arg(dir.path()).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = run(&["--http", "0.0.0.0:0"], true);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("http_listen 0.0.0.0:0 is off this host"), "{stderr}");
    assert!(stderr.contains("allow_plaintext"), "{stderr}");
    let (code, stderr) = run(&["--mqtt-listen", "0.0.0.0:0"], true);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("mqtt.embedded_listen 0.0.0.0:0 is off this host"), "{stderr}");
    let (code, stderr) = run(&[], false);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("no [identity]"), "{stderr}");
}
