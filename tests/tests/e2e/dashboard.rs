//! The fleet dashboard in a real browser (headless Chromium over the DevTools protocol) on the
//! running demo: `millwright demo` (server with its embedded broker, three agents replaying
//! C-MAPSS engines at two sites, a rollout of release 2). Every page loads without a console
//! message and shows the fleet's values as the API reports them; an operator acknowledges an
//! alert and pauses and resumes the rollout from the page; writes without signing in, or as a
//! viewer, are refused. Screenshots of every page go to `target/screenshots/`.

use millwright_tests::browser::{self, Browser, Tab};
use millwright_tests::*;
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};

const MODEL: &str = "rul-cnn-fd001";
const WAIT: Duration = Duration::from_secs(20);

struct Demo {
    proc: Proc,
    base: String,
    /// An HTTPS client trusting the demo's fleet CA.
    http: ureq::Agent,
    /// The tokens the demo made for this run.
    operator: String,
    viewer: String,
}

impl Demo {
    fn get(&self, path: &str) -> Value {
        self.http
            .get(&format!("{}{path}", self.base))
            .timeout(Duration::from_secs(5))
            .set("Authorization", &format!("Bearer {}", self.viewer))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.proc.log_text()))
            .into_json()
            .unwrap()
    }

    /// `(status, body)` of a POST with an optional token.
    fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = self.http.post(&format!("{}{path}", self.base));
        if let Some(t) = token {
            request = request.set("Authorization", &format!("Bearer {t}"));
        }
        match request.send_json(body) {
            Ok(r) => (r.status(), r.into_json().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or_default()),
            Err(e) => panic!("POST {path}: {e}"),
        }
    }
}

/// A port whose three successors are free too (the demo's gateways serve their local pages
/// there).
fn four_free_ports() -> u16 {
    loop {
        let port = free_port();
        if port < 65_000
            && (1..=3).all(|i| std::net::TcpListener::bind(("127.0.0.1", port + i)).is_ok())
        {
            return port;
        }
    }
}

fn start_demo(dir: &std::path::Path) -> Demo {
    let http = four_free_ports();
    let mqtt = free_port();
    let mut cmd = Command::new(bin("millwright"));
    cmd.current_dir(repo_root())
        .arg("demo")
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
        .arg("--data-dir")
        .arg(dir.join("demo"))
        // The rollout's canary commits, then the next wave waits: long enough to pause it.
        .args(["--soak-secs", "600"]);
    let proc = Proc::spawn(&mut cmd, dir.join("demo.log")).unwrap();
    // The demo writes its fleet CA and this run's tokens before it starts the server.
    let data = dir.join("demo");
    let ca = data.join("pki/ca.crt.pem");
    let written = wait_until(Duration::from_secs(30), || data.join("viewer.token").exists());
    assert!(written, "the demo wrote no tokens:\n{}", proc.log_text());
    let token = |role: &str| std::fs::read_to_string(data.join(format!("{role}.token"))).unwrap();
    let tls = millwright_io::tls::client_config(&ca, None).unwrap();
    Demo {
        base: format!("https://127.0.0.1:{http}"),
        http: ureq::AgentBuilder::new().tls_config(tls).build(),
        operator: token("operator"),
        viewer: token("viewer"),
        proc,
    }
}

fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Saves a screenshot and says where.
fn shot(tab: &Tab, name: &str) {
    let path = browser::screenshot_dir().join(format!("dashboard-{name}.png"));
    tab.screenshot(&path).unwrap();
    println!("screenshot: {}", path.display());
}

fn show(tab: &Tab, hash: &str, view: &str) {
    tab.eval(&format!("location.hash = {}", js(hash))).unwrap();
    tab.wait_for(&format!("document.body.dataset.view === {}", js(view)), WAIT).unwrap();
}

/// Signs in on the sign-in form the tab shows.
fn sign_in(tab: &Tab, token: &str) {
    tab.wait_for("!!document.querySelector('#signin')", WAIT).unwrap();
    tab.type_into("#token", token).unwrap();
    tab.press_key("Enter").unwrap();
    tab.wait_for("!!document.body.dataset.view && document.body.dataset.view !== 'signin'", WAIT)
        .unwrap();
    show(tab, "#/fleet", "fleet");
}

#[test]
fn the_dashboard_shows_the_demo_fleet_and_operators_act_from_it() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path());
    let log = || demo.proc.log_text();

    // The demo is ready when its three gateways report, the rollout's canary committed (the
    // next wave soaks for 10 minutes), an alert is open, and both sites reported drift for
    // release 1.
    let ready = wait_until(Duration::from_secs(120), || {
        let Ok(r) = demo
            .http
            .get(&format!("{}/api/v1/rollouts", demo.base))
            .set("Authorization", &format!("Bearer {}", demo.viewer))
            .call()
        else {
            return false;
        };
        let rollouts: Value = r.into_json().unwrap_or_default();
        let canary = rollouts[0]["state"] == "running"
            && rollouts[0]["devices"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["state"] == "committed"));
        let devices = demo.get("/api/v1/devices");
        let open = demo.get("/api/v1/alerts?open=true");
        let drift = demo.get(&format!("/api/v1/drift?by=site&model={MODEL}&release=1"));
        let sites: std::collections::BTreeSet<String> = drift
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["site"].as_str().map(str::to_owned))
            .collect();
        canary
            && devices.as_array().is_some_and(|d| d.len() == 3)
            && open.as_array().is_some_and(|a| !a.is_empty())
            && sites.len() == 2
    });
    assert!(ready, "the demo never got ready:\n{}", log());

    // Writes without signing in, or as a viewer, are refused, and change nothing.
    let (code, body) = demo.post("/api/v1/rollouts/r1/pause", None, json!({"reason": "x"}));
    assert_eq!(code, 401, "{body}");
    let (code, body) = demo.post("/api/v1/rollouts/r1/pause", Some(&demo.viewer), json!({}));
    assert_eq!(code, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("demo-viewer"), "{body}");
    let open = demo.get("/api/v1/alerts?open=true");
    let first = &open[0];
    let ack_path =
        format!("/api/v1/alerts/{}/{}/ack", first["device"].as_str().unwrap(), first["seq"]);
    assert_eq!(demo.post(&ack_path, None, json!({})).0, 401);
    assert_eq!(demo.post(&ack_path, Some(&demo.viewer), json!({})).0, 403);
    assert_eq!(demo.post("/api/v1/models", None, json!({})).0, 401);
    let anonymous = demo.http.get(&format!("{}/api/v1/devices", demo.base)).call();
    assert!(matches!(anonymous, Err(ureq::Error::Status(401, _))), "reads need a viewer");
    let anonymous = demo.http.head(&format!("{}/api/v1/devices", demo.base)).call();
    assert!(matches!(anonymous, Err(ureq::Error::Status(401, _))), "HEAD is a read too");
    assert_eq!(demo.get("/api/v1/rollouts/r1")["state"], "running");
    assert_eq!(demo.get("/api/v1/alerts?open=true"), open, "nothing acknowledged");

    let chromium = Browser::launch(1360, 1500).unwrap();
    let tab = chromium.tab().unwrap();
    let started = Instant::now();
    tab.goto(&format!("{}/", demo.base)).unwrap();
    tab.wait_for("!!document.querySelector('#signin')", WAIT).unwrap();
    println!("dashboard sign-in page: {} ms to render", started.elapsed().as_millis());
    shot(&tab, "signin");

    // A viewer sees the rollout but cannot act on it.
    sign_in(&tab, &demo.viewer);
    assert!(tab.text("#who").unwrap().contains("demo-viewer (viewer)"));
    show(&tab, "#/rollouts", "rollouts");
    tab.wait_for("!!document.querySelector('[data-rollout=r1] button[data-action=pause]')", WAIT)
        .unwrap();
    let disabled = tab
        .eval("document.querySelector('[data-rollout=r1] button[data-action=pause]').disabled")
        .unwrap();
    assert_eq!(disabled, Value::Bool(true), "a viewer's pause button is disabled");
    tab.click("#signout").unwrap();
    tab.wait_for("document.body.dataset.view === 'signin'", WAIT).unwrap();

    // The operator.
    sign_in(&tab, &demo.operator);
    assert!(tab.text("#who").unwrap().contains("demo-operator (operator)"));

    // Fleet overview: every device with its site, release, online state and open alerts.
    tab.wait_for("document.querySelectorAll('table.fleet tr[data-device]').length === 3", WAIT)
        .unwrap();
    let devices = demo.get("/api/v1/devices");
    assert_eq!(tab.text("#stat-devices").unwrap(), "3");
    for d in devices.as_array().unwrap() {
        let id = d["device"].as_str().unwrap();
        let row = format!(
            "table.fleet[data-site={}] tr[data-device={}]",
            js(d["site"].as_str().unwrap()),
            js(id)
        );
        let release = d["models"][0]["release"].as_u64().unwrap();
        let text = tab.text(&format!("{row} td.release")).unwrap();
        assert_eq!(text, format!("{MODEL} r{release}"), "{id}");
        assert!(tab.text(&row).unwrap().contains("online"), "{id}");
        assert!(d["backlog_records"].is_u64(), "the agent reports its backlog: {d}");
    }
    let open_total: u64 = demo
        .get("/api/v1/devices")
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["open_alerts"].as_u64().unwrap())
        .sum();
    assert!(open_total > 0);
    tab.wait_for(
        &format!("document.querySelector('#stat-open-alerts').innerText === '{open_total}'"),
        WAIT,
    )
    .unwrap();
    shot(&tab, "fleet");

    // Device detail: the latest prediction of each asset is one the server stored.
    show(&tab, "#/device/gw-01", "device");
    tab.wait_for("document.querySelectorAll('.asset').length === 2", WAIT).unwrap();
    tab.wait_for("document.querySelectorAll('.asset svg polyline').length === 2", WAIT).unwrap();
    let shown = tab
        .eval(
            "[...document.querySelectorAll('.asset')].map(a => [a.dataset.asset, \
             Number(a.querySelector('[data-value]').dataset.value), \
             Number(a.querySelector('p').innerText.match(/cycle (\\d+)/)[1])])",
        )
        .unwrap();
    for entry in shown.as_array().unwrap() {
        let (asset, value, cycle) =
            (entry[0].as_str().unwrap(), entry[1].as_f64().unwrap(), entry[2].as_u64().unwrap());
        let stored =
            demo.get(&format!("/api/v1/devices/gw-01/predictions?asset={asset}&limit=10000"));
        let hit = stored.as_array().unwrap().iter().find(|p| p["cycle"] == cycle).unwrap();
        assert_eq!(hit["value"].as_f64().unwrap(), value, "{asset} cycle {cycle}");
    }
    assert!(tab.text("#updates").unwrap().contains("committed"), "the canary's update history");
    shot(&tab, "device");

    // Rollouts: live progress, then pause and resume from the page.
    show(&tab, "#/rollouts", "rollouts");
    tab.wait_for("document.querySelector('[data-rollout=r1]')?.dataset.state === 'running'", WAIT)
        .unwrap();
    assert!(tab.text("[data-rollout=r1] .committed").unwrap().starts_with("1 of 3 committed"));
    shot(&tab, "rollouts");
    tab.type_into("#reason-r1", "browser test: hold the fleet").unwrap();
    tab.click("[data-rollout=r1] button[data-action=pause]").unwrap();
    tab.wait_for("document.querySelector('[data-rollout=r1]')?.dataset.state === 'paused'", WAIT)
        .unwrap();
    let r1 = demo.get("/api/v1/rollouts/r1");
    assert_eq!(r1["state"], "paused", "{r1}");
    assert_eq!(r1["reason"], "browser test: hold the fleet");
    shot(&tab, "rollouts-paused");
    // The page redraws every few seconds in place: the button on screen stays the same element
    // across a refresh, so a click that straddles one still lands.
    let resume = "document.querySelector('[data-rollout=r1] button[data-action=resume]')";
    tab.eval(&format!("{resume}.kept = true")).unwrap();
    let updated = tab.text("#updated").unwrap();
    tab.wait_for(
        &format!("document.querySelector('#updated').innerText !== {}", js(&updated)),
        WAIT,
    )
    .unwrap();
    assert_eq!(tab.eval(&format!("{resume}.kept === true")).unwrap(), Value::Bool(true));
    tab.click("[data-rollout=r1] button[data-action=resume]").unwrap();
    tab.wait_for("document.querySelector('[data-rollout=r1]')?.dataset.state === 'running'", WAIT)
        .unwrap();
    assert_eq!(demo.get("/api/v1/rollouts/r1")["state"], "running");

    // Drift heat map (feature × site) for release 1, and a cell's trend.
    show(&tab, "#/drift", "drift");
    tab.wait_for("!!document.querySelector('#release-picker')", WAIT).unwrap();
    tab.eval(&format!(
        "(() => {{ const p = document.querySelector('#release-picker'); p.value = '{MODEL}|1'; \
         p.dispatchEvent(new Event('change')); }})()"
    ))
    .unwrap();
    tab.wait_for("document.querySelectorAll('#heatmap th').length === 3", WAIT).unwrap();
    let legend = tab.text("#drift-legend").unwrap();
    assert!(
        legend.contains(
            "mean shift in reference σ of the site's merged histogram (warn at 2, drift at 3)"
        ),
        "{legend}"
    );
    let summary = demo.get(&format!("/api/v1/drift?by=site&model={MODEL}&release=1"));
    for s in summary.as_array().unwrap() {
        let selector = format!(
            "#heatmap td[data-site={}][data-feature={}]",
            js(s["site"].as_str().unwrap()),
            js(s["feature"].as_str().unwrap())
        );
        let severity = tab
            .eval(&format!("document.querySelector({})?.dataset.severity", js(&selector)))
            .unwrap();
        // The page refreshes on its own; a report may land between the two reads.
        assert!(severity.is_string(), "{selector} missing");
    }
    let south = summary
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["site"] == "plant-south" && s["psi"].is_number())
        .expect("a scored feature at plant-south");
    let feature = south["feature"].as_str().unwrap();
    tab.click(&format!("#heatmap td[data-site=plant-south][data-feature={}]", js(feature)))
        .unwrap();
    tab.wait_for("Number(document.querySelector('#drift-trend svg')?.dataset.points) > 0", WAIT)
        .unwrap();
    assert!(tab.text("#trend-title").unwrap().starts_with(&format!("{feature} at plant-south")));
    shot(&tab, "drift");

    // Alerts: acknowledge the first open one.
    show(&tab, "#/alerts", "alerts");
    tab.wait_for("!!document.querySelector('button[data-ack]')", WAIT).unwrap();
    let target = tab.eval("document.querySelector('button[data-ack]').dataset.ack").unwrap();
    let target = target.as_str().unwrap().to_owned();
    let (device, seq) = target.split_once('/').unwrap();
    shot(&tab, "alerts");
    tab.click(&format!("button[data-ack={}]", js(&target))).unwrap();
    let row = format!("tr[data-device={}][data-seq='{seq}'] td.ack", js(device));
    tab.wait_for(
        &format!("document.querySelector({})?.innerText.startsWith('by demo-operator')", js(&row)),
        WAIT,
    )
    .unwrap();
    let feed = demo.get("/api/v1/alerts?limit=10000");
    let acked = feed
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["device"] == device && a["seq"].as_u64() == seq.parse().ok())
        .unwrap();
    assert_eq!(acked["acknowledged_by"], "demo-operator", "{acked}");
    assert_eq!(acked["open"], false);

    // Registry and audit log.
    show(&tab, "#/models", "models");
    tab.wait_for("document.querySelectorAll('#models tr[data-release]').length === 2", WAIT)
        .unwrap();
    shot(&tab, "models");
    show(&tab, "#/audit", "audit");
    tab.wait_for("!!document.querySelector('#audit tr[data-action=alert_acknowledged]')", WAIT)
        .unwrap();
    let audit = demo.get("/api/v1/audit");
    let actions: Vec<(&str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["actor"].as_str().unwrap(), r["action"].as_str().unwrap()))
        .collect();
    for wanted in ["pause", "resume", "alert_acknowledged"] {
        assert!(actions.contains(&("demo-operator", wanted)), "{wanted} not audited: {actions:?}");
    }
    shot(&tab, "audit");

    let console = tab.console();
    assert!(console.is_empty(), "console messages on the dashboard: {console:#?}");

    the_api_answers_as_its_openapi_document_says(&demo);

    // The page weight, for the record.
    let page: usize = ["/", "/ui/app.js", "/ui/app.css"]
        .iter()
        .map(|p| {
            demo.http.get(&format!("{}{p}", demo.base)).call().unwrap().into_string().unwrap().len()
        })
        .sum();
    println!("dashboard weight: {page} bytes (HTML, script and styles; nothing else loaded)");
}

/// Every JSON read of the API, on the demo's state after the clicks above (acknowledged and open
/// alerts, a paused and resumed rollout, drift at two sites), against the response schema the
/// server's own OpenAPI document gives for it. The document's objects list every field they
/// may have (`additionalProperties: false`), so a field added to an answer but not to the
/// document fails here too.
fn the_api_answers_as_its_openapi_document_says(demo: &Demo) {
    // OpenAPI 3.1 schemas are JSON Schema 2020-12; the components become the `$defs` of each.
    let served = demo.get("/api/v1/openapi.json").to_string();
    let doc: Value =
        serde_json::from_str(&served.replace("#/components/schemas/", "#/$defs/")).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let defs = &doc["components"]["schemas"];
    let schema_of = |path: &str| -> &Value {
        &doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    };
    let mut reads: Vec<(String, &Value)> = Vec::new();
    for path in doc["paths"].as_object().unwrap().keys() {
        // The demo drops nothing and keeps everything: its gaps and hourly summaries are
        // empty. The quota and retention tests check those answers against this document
        // instead (outbox_faults.rs, retention.rs).
        if schema_of(path).is_null()
            || path == "/api/v1/openapi.json"
            || path == "/api/v1/devices/{device}/gaps"
            || path == "/api/v1/devices/{device}/predictions/hourly"
        {
            continue;
        }
        let url = path.replace("{device}", "gw-01").replace("{model}", MODEL).replace("{id}", "r1");
        reads.push((url, schema_of(path)));
    }
    for by in ["site", "device", "bucket&bucket_s=30"] {
        reads.push((format!("/api/v1/drift?by={by}"), schema_of("/api/v1/drift")));
    }
    reads.push(("/api/v1/alerts?open=true".into(), schema_of("/api/v1/alerts")));
    assert!(reads.len() >= 20, "the document lists too few reads: {reads:?}");

    // Persistent drift at plant-south raises the retraining event about 30 s into the demo.
    let raised = wait_until(Duration::from_secs(60), || {
        demo.get("/api/v1/drift/events").as_array().is_some_and(|e| !e.is_empty())
    });
    assert!(raised, "no retraining event to check\n{}", demo.proc.log_text());
    let mut failures = Vec::new();
    for (url, schema) in &reads {
        let mut schema = (*schema).clone();
        schema["$defs"] = defs.clone();
        let validator = jsonschema::validator_for(&schema)
            .unwrap_or_else(|e| panic!("the schema of {url} does not compile: {e}"));
        let answer = demo.get(url);
        let size = answer.as_array().map_or(answer.as_object().map_or(0, |o| o.len()), |a| a.len());
        println!("openapi: {url}: {size} item(s) checked");
        assert!(size > 0, "{url} answered nothing to check: {answer}");
        for e in validator.iter_errors(&answer) {
            failures.push(format!("{url} at {}: {e}", e.instance_path()));
        }
    }
    assert!(
        failures.is_empty(),
        "answers the OpenAPI document does not describe:\n{}",
        failures.join("\n")
    );
}

#[test]
fn a_server_without_users_shows_its_dashboard_read_only_without_sign_in() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_without_users(dir.path(), BrokerChoice::Embedded).unwrap();
    let base = format!("https://127.0.0.1:{}", server.http_port);
    let session = server.get("/api/v1/session").unwrap();
    assert_eq!(session, json!({"name": "anonymous", "role": "viewer", "open": true}));

    let chromium = Browser::launch(1200, 800).unwrap();
    let tab = chromium.tab().unwrap();
    tab.goto(&format!("{base}/")).unwrap();
    tab.wait_for("document.body.dataset.view === 'fleet'", WAIT).unwrap();
    assert!(tab.text("#main").unwrap().contains("No device has reported yet."));
    assert!(tab.text("#who").unwrap().starts_with("read only"));
    assert_eq!(tab.eval("document.querySelector('#signout').hidden").unwrap(), Value::Bool(true));
    show(&tab, "#/rollouts", "rollouts");
    shot(&tab, "open-server");
    let console = tab.console();
    assert!(console.is_empty(), "console messages: {console:#?}");

    // Open to read, closed to writes.
    let refused = server
        .https()
        .post(&format!("{base}/api/v1/rollouts/r1/pause"))
        .send_json(json!({"reason": "x"}));
    assert!(matches!(refused, Err(ureq::Error::Status(401, _))), "{refused:?}");
}

#[test]
fn the_browser_harness_sees_console_errors_and_failed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("broken.html");
    std::fs::write(
        &page,
        "<!doctype html><p>x</p><img src=\"missing.png\"><script>console.error('deliberate');nope();</script>",
    )
    .unwrap();
    let chromium = Browser::launch(800, 600).unwrap();
    let tab = chromium.tab().unwrap();
    tab.goto(&format!("file://{}", page.display())).unwrap();
    let seen = wait_until(Duration::from_secs(10), || tab.console().len() >= 3);
    let console = tab.console();
    assert!(seen, "{console:#?}");
    assert!(console.iter().any(|l| l.contains("deliberate")), "{console:#?}");
    assert!(console.iter().any(|l| l.contains("nope is not defined")), "{console:#?}");
    assert!(console.iter().any(|l| l.contains("missing.png")), "{console:#?}");
}
