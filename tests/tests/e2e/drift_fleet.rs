//! Fleet drift: the server merges histograms (its fleet PSI equals PSI computed on the union of
//! the devices' raw data), and over a real broker it lists drifting devices and sites and
//! raises a retraining recommendation on MQTT, the API and a webhook.

use millwright_server::db::Db;
use millwright_server::drift::{self, GroupBy, Profiles};
use millwright_server::ingest::Accepted;
use millwright_shared::drift::monitor::ReportMeta;
use millwright_shared::drift::score::PSI_EPSILON;
use millwright_shared::drift::{DriftMonitor, DriftProfile, DriftSettings, FeatureProfile};
use millwright_shared::wire::{Record, RecordBody, Stream};
use millwright_shared::{AssetId, DeviceId, ModelName, Release};
use millwright_tests::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::time::Duration;

/// PSI written out independently of the crate's scorer: bin the raw values with the profile's
/// edges, then Σ (q − p) ln(q / p) with both shares floored at ε.
fn psi_on_raw(profile: &FeatureProfile, values: &[f32]) -> f64 {
    let mut counts = vec![0u64; profile.edges.len() + 1];
    for &v in values {
        let bin = profile.edges.iter().filter(|&&e| e <= f64::from(v)).count();
        counts[bin] += 1;
    }
    let n = values.len() as f64;
    counts
        .iter()
        .zip(&profile.proportions)
        .map(|(&c, &p)| {
            let (p, q) = (p.max(PSI_EPSILON), (c as f64 / n).max(PSI_EPSILON));
            (q - p) * (q / p).ln()
        })
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fleet_psi_equals_psi_on_the_union_of_raw_data(
        reference in prop::collection::vec(-50.0f32..50.0, 20..300),
        devices in prop::collection::vec(
            (prop::collection::vec(-80.0f32..80.0, 1..250), 1u64..60, 0usize..3), 1..6),
        bins in 2usize..16,
    ) {
        let fp = FeatureProfile::build("x", &reference, bins);
        let profile = Arc::new(DriftProfile { source: "prop".into(), features: vec![fp.clone()], output: None });
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("server.sqlite")).unwrap();
        let mut sites: HashMap<String, Vec<f32>> = HashMap::new();
        for (i, (values, interval, site)) in devices.iter().enumerate() {
            let site = format!("site-{site}");
            sites.entry(site.clone()).or_default().extend(values);
            let mut monitor = DriftMonitor::new(profile.clone(), DriftSettings::default());
            let mut records = Vec::new();
            for (k, chunk) in values.chunks(*interval as usize).enumerate() {
                for (j, v) in chunk.iter().enumerate() {
                    monitor.observe((k * 1000 + j) as u64, &[Some(*v)]);
                }
                let report = monitor.report(ReportMeta {
                    asset: AssetId::new("a").unwrap(),
                    model: ModelName::new("m").unwrap(),
                    release: Release(1),
                    site: Some(site.clone()),
                    from_ms: k as i64,
                    to_ms: k as i64 + 1,
                });
                records.push(Record { seq: k as u64 + 1, at_ms: 0, body: RecordBody::Drift(Box::new(report)) });
            }
            let device = DeviceId::new(format!("d{i}")).unwrap();
            db.store(
                &Accepted {
                    device,
                    epoch: "e1".into(),
                    stream: Stream::Drift,
                    records,
                    refused: vec![],
                },
                0,
            )
                .unwrap();
        }
        let profiles = Profiles([(("m".to_owned(), 1), (*profile).clone())].into_iter().collect());
        let rows = db.drift_rows(&Default::default()).unwrap();
        let settings = DriftSettings::default();
        let fleet = drift::summarize(&rows, GroupBy::Feature, 1, &profiles, &settings);
        let union: Vec<f32> = devices.iter().flat_map(|d| d.0.iter().copied()).collect();
        prop_assert_eq!(fleet.len(), 1);
        let (server, direct) = (fleet[0].psi.unwrap(), psi_on_raw(&fp, &union));
        prop_assert!((server - direct).abs() <= 1e-9 * direct.abs().max(1.0), "{} vs {}", server, direct);
        prop_assert_eq!(fleet[0].n, union.len() as u64);
        for s in drift::summarize(&rows, GroupBy::Site, 1, &profiles, &settings) {
            let direct = psi_on_raw(&fp, &sites[s.site.as_deref().unwrap()]);
            prop_assert!((s.psi.unwrap() - direct).abs() <= 1e-9 * direct.abs().max(1.0));
        }
    }
}

/// A one-request HTTP endpoint: returns the body of the first POST it gets.
fn webhook() -> (u16, std::sync::mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
        }
    });
    (port, rx)
}

#[test]
fn a_drifting_site_is_listed_and_retraining_is_recommended_on_mqtt_api_and_webhook() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let (hook_port, hook) = webhook();
    let config = format!(
        "[models]\nbundles = [{:?}]\ntrusted_keys = [{:?}]\n\n[drift]\npersist_reports = 2\n\
         webhook = \"http://127.0.0.1:{hook_port}/hook\"\n",
        repo_file(BUNDLE),
        repo_file(PUBLIC_KEY)
    );
    let server = Server::start_with_config(dir.path(), BrokerChoice::Embedded, &config).unwrap();
    let spec = |device: &str, site: &str, data: Option<&str>| {
        let mut s = AgentSpec::replaying(device, [1, 2], 50.0);
        s.site = Some(site.into());
        s.data = data.map(repo_file);
        s.drift = Some("interval_secs = 1".into());
        s
    };
    let north = Agent::start(dir.path(), spec("gw-north", "plant-north", None), &server).unwrap();
    let south = Agent::start(
        dir.path(),
        spec("gw-south", "plant-south", Some("data/cmapss/train_FD002_units_1-2.txt")),
        &server,
    )
    .unwrap();

    // Subscribe to the retained event topic as an enrolled ops tool would.
    let watcher = server.enroll("drift-watcher").unwrap();
    let (client, mut connection) =
        rumqttc::Client::new(mqtt_as(server.mqtt_port, &watcher, None).unwrap(), 10);
    client.subscribe(millwright_shared::topics::RETRAINING, rumqttc::QoS::AtLeastOnce).unwrap();

    let events = || {
        server
            .get("/api/v1/drift/events")
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(40), || !events().is_empty()),
        "no retraining event; server log:\n{}",
        server.proc.log_text()
    );
    let event = &events()[0];
    assert_eq!(event["model"], "rul-cnn-fd001");
    let evidence = event["features"].as_array().unwrap();
    assert!(evidence.len() >= 20, "{event}");
    for e in evidence {
        assert_eq!(e["devices"], serde_json::json!(["gw-south"]), "{e}");
        assert_eq!(e["sites"], serde_json::json!(["plant-south"]), "{e}");
    }

    let posted = hook.recv_timeout(Duration::from_secs(15)).expect("webhook was not called");
    let posted: serde_json::Value = serde_json::from_str(&posted).unwrap();
    assert_eq!(posted["id"], event["id"]);

    let mut on_mqtt = None;
    for notification in connection.iter().take(200) {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = notification {
            on_mqtt = Some(serde_json::from_slice::<serde_json::Value>(&p.payload).unwrap());
            break;
        }
    }
    assert_eq!(on_mqtt.expect("no retained event on MQTT")["id"], event["id"]);

    let by_site = server.get("/api/v1/drift?by=site&feature=s2").unwrap();
    let site = |name: &str| {
        by_site.as_array().unwrap().iter().find(|s| s["site"] == name).cloned().unwrap()
    };
    let (n, s) = (site("plant-north"), site("plant-south"));
    println!(
        "fleet s2: plant-north psi {} shift {} ({}); plant-south psi {} shift {} ({})",
        n["psi"], n["shift"], n["severity"], s["psi"], s["shift"], s["severity"]
    );
    assert_eq!(s["severity"], "drift");
    assert_ne!(n["severity"], "drift");

    let drifting = server.get("/api/v1/drift/drifting").unwrap();
    let sites: Vec<&str> =
        drifting["sites"].as_array().unwrap().iter().filter_map(|s| s["site"].as_str()).collect();
    assert!(sites.contains(&"plant-south"), "{drifting}");
    assert!(
        drifting["assets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["severity"] != "drift" || a["device"] == "gw-south")
    );

    let status = south.status().unwrap();
    assert!(status["counters"]["drift_reports"].as_u64().unwrap() > 0, "{status}");
    assert!(status["counters"]["drift_alerts"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(status["assets"][0]["drift"]["s2"]["severity"], "drift", "{status}");

    let cli = |args: &[&str]| {
        let out = server
            .cli(millwright_tests::trust::VIEWER_TOKEN)
            .arg("drift")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let table = cli(&["--by", "site", "--feature", "s2"]);
    println!("millwright drift --by site --feature s2:\n{table}");
    let south = table.lines().find(|l| l.contains("plant-south")).unwrap();
    assert!(south.trim_end().ends_with("drift"), "{table}");
    assert!(cli(&["--events"]).contains("rul-cnn-fd001"));
    assert!(cli(&["--drifting"]).contains("gw-south"));
    drop(north);
}
