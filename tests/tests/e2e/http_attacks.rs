//! Attacks on the HTTP side: the server's API and dashboard and a gateway's local page. Plain
//! HTTP to an HTTPS port, token and PIN guessing, a large unauthenticated upload, a forged
//! cross-site form, framing, unstorable query values, a model named "..", and a script in a
//! device-supplied string, rendered inert in a real browser on the dashboard and the page.

use millwright_shared::bundle::RawBundle;
use millwright_tests::browser::{self, Browser};
use millwright_tests::trust::{ADMIN_TOKEN, TrustKit, VIEWER_TOKEN};
use millwright_tests::*;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

const XSS: &str = "<img src=x onerror=\"window.__xss=1\">";

/// A raw HTTPS request to 127.0.0.1:`port` (what a browser or curl would send, byte for byte);
/// returns what came back within `wait`.
fn raw_https(pki: &pki::Pki, port: u16, head: &str, body: &[u8], wait: Duration) -> String {
    let config = millwright_io::tls::client_config(&pki.ca_cert, None).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(wait)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(head.as_bytes()).unwrap();
    let _ = tls.write_all(body);
    let _ = tls.flush();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = tls.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.len() > 64 {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Sends `head`, reads the answer that comes before any body, then writes up to `body_len`
/// bytes of body: returns the answer and how many body bytes went out before the connection
/// was closed.
fn post_anyway(pki: &pki::Pki, port: u16, head: &str, body_len: usize) -> (String, usize) {
    let config = millwright_io::tls::client_config(&pki.ca_cert, None).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(head.as_bytes()).unwrap();
    tls.flush().unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = tls.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let chunk = vec![0u8; 64 << 10];
    let mut taken = 0;
    while taken < body_len && tls.write_all(&chunk).and_then(|()| tls.flush()).is_ok() {
        taken += chunk.len();
    }
    (String::from_utf8_lossy(&answer).into_owned(), taken)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn status_of(result: Result<ureq::Response, ureq::Error>) -> u16 {
    match result {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_server_api_refuses_plaintext_guessing_large_anonymous_uploads_and_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    let kit = TrustKit::new(&dir.path().join("trust")).unwrap();
    let server =
        Server::start_with_config(dir.path(), BrokerChoice::Embedded, &kit.server_config(""))
            .unwrap();

    // Plain HTTP on the HTTPS port: a clear answer, nothing served.
    let mut tcp = TcpStream::connect(("127.0.0.1", server.http_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = tcp.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("HTTPS only"), "{answer}");
    println!("plain HTTP to the HTTPS port | {}", answer.lines().next().unwrap());

    // Values the database cannot hold, or that would overflow, are refused or clamped.
    let (code, body) = server.post("/api/v1/models", ADMIN_TOKEN, &serde_json::json!({})).unwrap();
    assert!(code >= 400, "{body}");
    let huge = server.read(&format!("/api/v1/devices/x/predictions?after_seq={}", u64::MAX)).call();
    assert_eq!(status_of(huge), 400);
    let bucket = server.read(&format!("/api/v1/drift?by=bucket&bucket_s={}", i64::MAX)).call();
    assert_eq!(status_of(bucket), 200);

    // A model named "..": its signed manifest does not parse, nothing is written anywhere.
    let r1 = kit.release(1).unwrap();
    let raw = RawBundle::parse(&r1).unwrap();
    let manifest = String::from_utf8(raw.manifest.clone()).unwrap();
    let dotted = manifest.replace("\"model\": \"rul-cnn-fd001\"", "\"model\": \"..\"");
    assert_ne!(manifest, dotted, "the manifest names the model as expected");
    let mut bad = RawBundle { manifest: dotted.into_bytes(), signatures: vec![], model: raw.model };
    for k in kit.release_signers() {
        bad.sign(k);
    }
    let registered = server
        .https()
        .post(&server.url("/api/v1/models"))
        .timeout(Duration::from_secs(30))
        .set("Authorization", &format!("Bearer {ADMIN_TOKEN}"))
        .send_bytes(&bad.to_bytes());
    let (code, text) = match registered {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(code, 422, "{text}");
    assert!(text.contains("names a folder"), "{text}");
    println!("a model named \"..\" | {code} {text}");

    // An unauthenticated 60 MiB upload is refused after its headers, before its body.
    let pid = server.proc.pid().unwrap();
    let before = rss_kib(pid);
    let started = Instant::now();
    let head = format!(
        "POST /api/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        60 << 20
    );
    let answer = raw_https(&server.pki, server.http_port, &head, &[], Duration::from_secs(5));
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(!answer.contains("100 Continue"), "the server asked for the body: {answer}");
    // A client that does not wait for 100-continue: the answer comes after the headers, and
    // the server closes the connection instead of taking the body.
    let head = head.replace("Expect: 100-continue\r\n", "");
    let (answer, taken) = post_anyway(&server.pki, server.http_port, &head, 60 << 20);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(taken < 60 << 20, "the server took the whole body");
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 5 * 1024, "the server's memory grew by {grown} KiB");
    println!(
        "unauthenticated 60 MiB POST | 401 after {} ms; sent anyway: connection closed after \
         {} KiB; RSS +{grown} KiB",
        took.as_millis(),
        taken >> 10
    );

    // Tokens are kept as hashes; guessing locks the address out.
    let config = std::fs::read_to_string(dir.path().join("server.toml")).unwrap();
    assert!(!config.contains(ADMIN_TOKEN) && config.contains("token_sha256"));
    let mut codes = Vec::new();
    for n in 0..300 {
        let guess = server
            .https()
            .get(&server.url("/api/v1/devices"))
            .set("Authorization", &format!("Bearer wrong-token-{n:04}"))
            .call();
        codes.push(status_of(guess));
    }
    let refused = codes.iter().filter(|c| **c == 429).count();
    assert_eq!(&codes[..4], &[401; 4], "{codes:?}");
    assert!(refused >= 295, "only {refused} of 300 guesses answered 429");
    let right = server
        .https()
        .get(&server.url("/api/v1/devices"))
        .set("Authorization", &format!("Bearer {VIEWER_TOKEN}"))
        .call();
    assert_eq!(status_of(right), 429, "the right token is refused during the lockout too");
    // /metrics needs no token (a token would be checked, and this address is locked out).
    let metrics =
        server.https().get(&server.url("/metrics")).call().unwrap().into_string().unwrap();
    assert!(metric(&metrics, "millwright_sign_in_lockouts_total") >= 1.0, "{metrics}");
    let logged = server.proc.log_text().matches("too many wrong API tokens").count();
    assert_eq!(logged, 1, "the lockout is logged once");
    println!(
        "300 wrong tokens | {} x 401, {refused} x 429, lockout logged {logged}",
        300 - refused
    );

    // Unauthenticated /metrics scrapes, 20 at a time, do not hold up /api/v1/health.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scrapers: Vec<_> = (0..20)
        .map(|_| {
            let (client, url, stop) = (server.https(), server.url("/metrics"), stop.clone());
            std::thread::spawn(move || {
                let mut codes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    codes.push(status_of(client.get(&url).call()));
                }
                codes
            })
        })
        .collect();
    let mut health_ms = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        assert_eq!(status_of(server.https().get(&server.url("/api/v1/health")).call()), 200);
        health_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let scrapes: Vec<u16> = scrapers.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(scrapes.iter().all(|&c| c == 200), "a scrape failed: {scrapes:?}");
    health_ms.sort_by(f64::total_cmp);
    println!(
        "20 parallel /metrics scrapers | {} scrapes; /api/v1/health p50 {:.1} ms, p99 {:.1} ms \
         (new TLS connection each)",
        scrapes.len(),
        health_ms[49],
        health_ms[98]
    );
}

#[test]
fn the_gateway_page_refuses_pin_guessing_forged_forms_and_framing() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let port = free_port();
    let mut spec = AgentSpec::replaying("gw-page", [1], 40.0);
    spec.data = Some(repo_file("data/cmapss/train_FD001_units_1-6.txt"));
    spec.top = format!("[local]\nlisten = \"127.0.0.1:{port}\"\noperator_pin = \"4711\"");
    let agent = Agent::start(dir.path(), spec, &server).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let alarm = wait_until(Duration::from_secs(60), || {
        agent.status().is_some_and(|s| s["assets"][0]["alert"]["level"] == "alarm")
    });
    assert!(alarm, "no open alarm to acknowledge:\n{}", agent.proc.log_text());

    // Framing and the policy: on every answer.
    let page = ureq::get(&format!("{base}/")).call().unwrap();
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    let csp = page.header("content-security-policy").unwrap_or_default().to_owned();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"), "{csp}");
    let api = ureq::get(&format!("{base}/api/status")).call().unwrap();
    assert_eq!(api.header("x-frame-options"), Some("DENY"));
    println!("framing the gateway page | X-Frame-Options DENY, CSP {csp}");

    // A form posted from another site, with the right PIN even: refused.
    let forged = ureq::post(&format!("{base}/alerts/unit-1/ack"))
        .set("Origin", "http://evil.example")
        .send_form(&[("pin", "4711")]);
    let (code, body) = match forged {
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        other => panic!("forged form: {other:?}"),
    };
    assert_eq!(code, 403);
    assert!(body.contains("posted from another site"), "{body}");
    assert!(agent.status().unwrap()["assets"][0]["alert"]["acknowledged_at_ms"].is_null());
    println!("cross-site form POST | {code}");

    // 200 wrong PINs, 50 at a time: all but the first few refused before they are checked,
    // and then the right PIN too.
    let url = format!("{base}/api/alerts/unit-1/ack");
    let codes: Vec<u16> = (0..4)
        .flat_map(|round| {
            let handles: Vec<_> = (0..50)
                .map(|i| {
                    let url = url.clone();
                    std::thread::spawn(move || {
                        let pin = format!("{:04}", round * 50 + i);
                        status_of(ureq::post(&url).send_json(serde_json::json!({ "pin": pin })))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        })
        .collect();
    let locked = codes.iter().filter(|c| **c == 429).count();
    assert!(locked >= 195, "only {locked} of 200 wrong PINs answered 429: {codes:?}");
    let right = ureq::post(&url).send_json(serde_json::json!({ "pin": "4711" }));
    assert_eq!(status_of(right), 429, "the right PIN is refused during the lockout");
    let metrics = ureq::get(&format!("{base}/metrics")).call().unwrap().into_string().unwrap();
    let counted = wait_until(Duration::from_secs(5), || {
        let m = ureq::get(&format!("{base}/metrics")).call().unwrap().into_string().unwrap();
        metric(&m, "millwright_pin_lockouts_total") >= 1.0
    });
    assert!(counted, "{metrics}");
    let logged = agent.proc.log_text().matches("address locked out").count();
    assert_eq!(logged, 1, "the lockout is logged once");
    println!("200 wrong PINs, 50 in parallel | {locked} x 429; the right PIN then: 429");
}

#[test]
fn a_script_in_a_device_supplied_string_stays_text_on_the_dashboard_and_the_page() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let port = free_port();
    let mut spec = AgentSpec::replaying("gw-xss", [3], 10.0);
    spec.site = Some(XSS.into());
    spec.top = format!("[local]\nlisten = \"127.0.0.1:{port}\"\n");
    let agent = Agent::start(dir.path(), spec, &server).unwrap();
    let stored = wait_until(Duration::from_secs(30), || {
        server.get("/api/v1/devices/gw-xss").is_ok_and(|d| d["site"] == XSS)
    });
    assert!(stored, "the site never reached the server:\n{}", agent.proc.log_text());

    // The gateway's page, rendered by Chromium: the text is there, no element was made of it.
    let page = browser::dump_dom(&format!("http://127.0.0.1:{port}/")).unwrap();
    assert!(page.dom.contains("&lt;img src=x onerror="), "{}", page.dom);
    assert!(!page.dom.contains("<img src=\"x\""), "{}", page.dom);
    assert!(page.console.is_empty(), "{:#?}", page.console);

    // The dashboard, driven over the DevTools protocol.
    let chromium = Browser::launch(1200, 800).unwrap();
    let tab = chromium.tab().unwrap();
    tab.goto(&server.url("/")).unwrap();
    tab.wait_for("!!document.querySelector('#signin')", Duration::from_secs(20)).unwrap();
    tab.type_into("#token", VIEWER_TOKEN).unwrap();
    tab.press_key("Enter").unwrap();
    tab.wait_for("document.body.dataset.view === 'fleet'", Duration::from_secs(20)).unwrap();
    tab.wait_for("document.body.innerText.includes('onerror')", Duration::from_secs(20)).unwrap();
    assert_eq!(tab.eval("document.querySelectorAll('img[src=\"x\"]').length").unwrap(), 0);
    assert_eq!(tab.eval("typeof window.__xss").unwrap(), "undefined");
    tab.eval("location.hash = '#/device/gw-xss'").unwrap();
    tab.wait_for("document.body.dataset.view === 'device'", Duration::from_secs(20)).unwrap();
    tab.wait_for("document.body.innerText.includes('onerror')", Duration::from_secs(20)).unwrap();
    assert_eq!(tab.eval("document.querySelectorAll('img[src=\"x\"]').length").unwrap(), 0);
    assert_eq!(tab.eval("typeof window.__xss").unwrap(), "undefined");
    let shot = browser::screenshot_dir().join("dashboard-xss-inert.png");
    tab.screenshot(&shot).unwrap();
    println!(
        "XSS in a device's site | shown as text on the page and the dashboard ({})",
        shot.display()
    );
}
