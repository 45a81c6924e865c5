//! The operator's local page in a real browser (headless Chromium): a real agent replays a
//! C-MAPSS unit to failure through Mosquitto to a real server; the page shows the agent's own
//! values, acknowledging its alarm needs the operator PIN, and with the broker stopped the page
//! still loads and shows the uplink down. Screenshots go to `target/screenshots/`.

use millwright_tests::browser::{self, Load};
use millwright_tests::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const PIN: &str = "4711";
const DEVICE: &str = "page-gw";

fn dump(agent: &Agent, server: &Server) -> String {
    format!(
        "--- agent log:\n{}\n--- server log:\n{}",
        agent.proc.log_text(),
        server.proc.log_text()
    )
}

/// Loads `url` headless; fails on any console message.
fn load(url: &str) -> Load {
    let page = browser::dump_dom(url).unwrap();
    assert!(page.console.is_empty(), "console messages on {url}: {:#?}", page.console);
    page
}

/// The text of the first element after `marker` in `html` (up to the next `<`).
fn text_after<'a>(html: &'a str, marker: &str) -> &'a str {
    let start = html.find(marker).unwrap_or_else(|| panic!("{marker:?} not in page:\n{html}"));
    let rest = &html[start + marker.len()..];
    let rest = &rest[rest.find('>').map_or(0, |i| i + 1)..];
    &rest[..rest.find('<').unwrap_or(rest.len())]
}

/// `(status code, body)` of a POST.
fn post(req: ureq::Request, form: Option<&[(&str, &str)]>, json: Option<&str>) -> (u16, String) {
    let answer = match (form, json) {
        (Some(f), _) => req.send_form(f),
        (None, Some(j)) => req.set("Content-Type", "application/json").send_string(j),
        (None, None) => req.call(),
    };
    match answer {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}

fn status_cmd(agent: &Agent) -> (bool, String) {
    let out = Command::new(bin("millwright-agent"))
        .arg("status")
        .arg("--config")
        .arg(&agent.config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_console_check_catches_a_deliberate_error() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("broken.html");
    std::fs::write(
        &page,
        "<!doctype html><p>x</p><script>console.error('deliberate');nope();</script>",
    )
    .unwrap();
    let loaded = browser::dump_dom(&format!("file://{}", page.display())).unwrap();
    assert!(loaded.console.iter().any(|l| l.contains("deliberate")), "{:#?}", loaded.console);
    assert!(
        loaded.console.iter().any(|l| l.contains("nope is not defined")),
        "{:#?}",
        loaded.console
    );
}

#[test]
fn the_local_page_shows_the_agent_acknowledges_with_the_pin_and_survives_the_broker() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(dir.path()).unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Mosquitto(&mosquitto)).unwrap();
    let port = free_port();
    let mut spec = AgentSpec::replaying(DEVICE, [1], 40.0);
    spec.data = Some(repo_file("data/cmapss/train_FD001_units_1-6.txt"));
    spec.drift = Some("interval_secs = 2".into());
    spec.top = format!("[local]\nlisten = \"127.0.0.1:{port}\"\noperator_pin = \"{PIN}\"");
    let mut agent = Agent::start(dir.path(), spec, &server).unwrap();
    let base = format!("http://127.0.0.1:{port}");

    // Unit 1 runs to failure (192 cycles): the model's remaining life falls through the alarm
    // threshold. Wait for the replay to end and the server to hold every prediction.
    let done = wait_until(Duration::from_secs(90), || {
        agent.proc.log_text().contains("replay finished")
            && agent.status().is_some_and(|s| {
                s["backlog"]["pred"] == 0
                    && s["counters"]["predictions"].as_u64().unwrap_or(0) > 0
                    && s["counters"]["predictions"].as_u64()
                        == Some(server.prediction_count(DEVICE))
            })
    });
    assert!(done, "the replay did not finish and drain\n{}", dump(&agent, &server));
    let status = agent.status().unwrap();
    assert_eq!(status["assets"][0]["level"], "alarm", "{status}");
    let stored = server.predictions(DEVICE).unwrap();
    let last = stored.iter().max_by_key(|p| p.cycle).unwrap();
    assert_eq!(last.cycle, 192);
    // What the dashboard's device page draws: the newest page of the stream, in order.
    let newest =
        server.get(&format!("/api/v1/devices/{DEVICE}/predictions?limit=5&newest=true")).unwrap();
    let newest: Vec<u64> =
        newest.as_array().unwrap().iter().map(|p| p["seq"].as_u64().unwrap()).collect();
    let tail: Vec<u64> = stored[stored.len() - 5..].iter().map(|p| p.seq).collect();
    assert_eq!(newest, tail);

    // The page, as a browser renders it, shows this agent's values.
    let page = load(&format!("{base}/"));
    let html = &page.dom;
    assert_eq!(text_after(html, "id=\"device\""), DEVICE);
    assert_eq!(text_after(html, "id=\"version\""), status["agent_version"].as_str().unwrap());
    assert_eq!(text_after(html, "class=\"release\""), status["models"][0]["release"].to_string());
    assert!(text_after(html, "id=\"uplink\"").contains("connected"), "{html}");
    assert!(html.contains("id=\"asset-unit-1\" data-level=\"alarm\""), "{html}");
    let value = html.split("data-value=\"").nth(1).and_then(|r| r.split('"').next()).unwrap();
    assert_eq!(value.parse::<f32>().unwrap(), last.value as f32, "page vs server, cycle 192");
    assert!(html.contains("<polyline"), "no trend chart:\n{html}");
    assert!(html.contains("data-acknowledged=\"false\""), "no open alert:\n{html}");
    let features = status["assets"][0]["drift"].as_object().unwrap();
    assert!(!features.is_empty(), "no drift verdicts: {status}");
    for feature in features.keys() {
        assert!(html.contains(&format!("<td>{feature}</td>")), "drift row {feature}:\n{html}");
    }
    let shot = browser::screenshot_dir();
    browser::screenshot(&format!("{base}/"), &shot.join("agent-page.png"), 1280, 1000).unwrap();
    browser::screenshot(&format!("{base}/"), &shot.join("agent-page-phone.png"), 412, 1400)
        .unwrap();

    // Weight: the page loads nothing but itself and its own few lines of script (no external
    // src or href).
    let body = ureq::get(&format!("{base}/")).call().unwrap().into_string().unwrap();
    let sources: Vec<&str> =
        body.split(" src=\"").skip(1).filter_map(|r| r.split('"').next()).collect();
    assert_eq!(sources, ["/page.js"], "external asset:\n{body}");
    assert!(!body.contains("href=\"http"), "external asset:\n{body}");
    let script = ureq::get(&format!("{base}/page.js")).call().unwrap().into_string().unwrap();
    println!(
        "agent page weight: {} bytes (HTML) + {} bytes (script), nothing else loaded",
        body.len(),
        script.len()
    );
    println!("agent page headless load and render: {} ms wall", page.wall.as_millis());

    // The API and metrics agree with the page.
    let api: Value = ureq::get(&format!("{base}/api/status")).call().unwrap().into_json().unwrap();
    assert_eq!(api["device"], DEVICE);
    let history: Value = ureq::get(&format!("{base}/api/assets/unit-1/history?hours=1"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let points = history["points"].as_array().unwrap();
    assert_eq!(points.len(), stored.len(), "every prediction of this run is in the history");
    let metrics = ureq::get(&format!("{base}/metrics")).call().unwrap().into_string().unwrap();
    let count = format!("millwright_inference_latency_seconds_count {}\n", stored.len());
    assert!(metrics.contains(&count), "{count:?} not in:\n{metrics}");
    assert!(metrics.contains("millwright_outbox_depth{stream=\"pred\"} 0\n"), "{metrics}");

    // Acknowledging: refused without the PIN or with a wrong one, done with it.
    let ack = format!("{base}/api/alerts/unit-1/ack");
    let (code, _) = post(ureq::post(&ack), None, Some("{}"));
    assert_eq!(code, 422, "no PIN");
    let (code, body) = post(ureq::post(&ack), None, Some(r#"{"pin":"0000"}"#));
    assert_eq!((code, body.contains("wrong operator PIN")), (403, true), "{body}");
    let form = ureq::AgentBuilder::new().redirects(0).build();
    let form_url = format!("{base}/alerts/unit-1/ack");
    let (code, _) = post(form.post(&form_url), Some(&[("pin", "1234")]), None);
    assert_eq!(code, 403, "wrong PIN through the page's form");
    assert!(load(&format!("{base}/")).dom.contains("data-acknowledged=\"false\""));
    let (code, _) = post(form.post(&form_url), Some(&[("pin", PIN)]), None);
    assert_eq!(code, 303, "the page's form redirects home once acknowledged");
    let acked = load(&format!("{base}/"));
    assert!(acked.dom.contains("data-acknowledged=\"true\""), "{}", acked.dom);
    assert!(!acked.dom.contains("<form"), "an acknowledged alert has no form");
    let (code, body) = post(ureq::post(&ack), None, Some(&format!("{{\"pin\":\"{PIN}\"}}")));
    assert_eq!((code, body.contains("already_acknowledged")), (200, true), "{body}");
    browser::screenshot(&format!("{base}/"), &shot.join("agent-page-acknowledged.png"), 1280, 1000)
        .unwrap();

    // The broker stops: the page still loads and says the uplink is down.
    mosquitto.stop();
    let down = wait_until(Duration::from_secs(20), || {
        agent.status().is_some_and(|s| s["uplink_connected"] == false)
    });
    assert!(down, "the agent never noticed the broker stopped\n{}", dump(&agent, &server));
    let page = load(&format!("{base}/"));
    assert!(text_after(&page.dom, "id=\"uplink\"").contains("DOWN"), "{}", page.dom);
    assert!(page.dom.contains("class=\"badge down\""), "{}", page.dom);
    println!("agent page with the broker down: {} ms wall", page.wall.as_millis());
    browser::screenshot(&format!("{base}/"), &shot.join("agent-page-broker-down.png"), 1280, 1000)
        .unwrap();
    browser::screenshot(
        &format!("{base}/"),
        &shot.join("agent-page-broker-down-phone.png"),
        412,
        1400,
    )
    .unwrap();

    // `millwright-agent status` prints the same from the API, then from status.json once the
    // agent is gone.
    let (ok, text) = status_cmd(&agent);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("source: {base}")), "{text}");
    assert!(text.contains("uplink DOWN") && text.contains("asset unit-1 ALARM"), "{text}");
    assert!(text.contains("acknowledged"), "{text}");
    agent.proc.terminate(Duration::from_secs(10)).unwrap();
    let (ok, text) = status_cmd(&agent);
    assert!(ok, "{text}");
    assert!(text.contains("status.json (API not reachable"), "{text}");
    assert!(text.contains(&format!("device {DEVICE}")), "{text}");
    let out =
        Command::new(bin("millwright-agent")).args(["status", "--url", &base]).output().unwrap();
    assert_eq!(out.status.code(), Some(69), "neither source: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no status available"), "{out:?}");
}
