//! The end-to-end harness: real processes (Mosquitto, `millwright-server`, `millwright-agent`)
//! on free ports with temporary folders, and the faults the scenarios inject (broker stops,
//! SIGKILL, garbage input). Every process is killed when its handle drops.
//!
//! Every fleet is secure as a real one: a test CA ([`pki::Pki`]), TLS with client certificates
//! on both brokers, HTTPS on the server, every agent enrolled through `millwright device enroll`
//! before it starts, and the server's users with hashed tokens.

use anyhow::{Context as _, bail};
use rumqttc::MqttOptions;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

pub use millwright_shared as shared;

pub mod browser;
pub mod pki;
pub mod plc;
pub mod proxy;
pub mod rogue;
pub mod trust;
pub mod variants;

use pki::Pki;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub const BUNDLE: &str = "models/rul-cnn-fd001/rul-cnn-fd001.mwb";
pub const PUBLIC_KEY: &str = "models/keys/demo-release.pub.json";
pub const TEST_DATA: &str = "data/cmapss/test_FD001_units_1-15.txt";

pub fn repo_file(rel: &str) -> PathBuf {
    repo_root().join(rel)
}

/// Scenarios that run whole fleets take this lock so they do not starve each other of the
/// machine's cores (timeouts stay meaningful).
pub fn fleet_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Path of one of the daemons or the CLI (`millwright-agent`, `millwright-server`,
/// `millwright`), as built by cargo for this test run beside the test binary.
pub fn bin(name: &str) -> PathBuf {
    // `MILLWRIGHT_BIN_MILLWRIGHT_AGENT=…` runs another build instead (a benchmark of the edge
    // binary).
    let var = format!("MILLWRIGHT_BIN_{}", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/e2e-<hash> (a test) or target/<profile>/bench-<name> (a benchmark)
    // -> target/<profile>/e2e-<name>
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(format!("e2e-{name}"));
    assert!(path.exists(), "{} is missing: cargo builds it before the e2e tests", path.display());
    path
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, f: impl FnMut() -> bool) -> bool {
    wait_until_every(timeout, Duration::from_millis(100), f)
}

/// [`wait_until`], looking every `interval` (to catch a moment that passes quickly).
pub fn wait_until_every(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    wait_until(timeout, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
}

/// A child process that is killed (SIGKILL) when dropped; its output goes to `log`.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> anyhow::Result<Proc> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        Ok(Proc { child: Some(child), log })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else { bail!("not running") };
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a Mosquitto broker decides what an authenticated client may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acl {
    /// The ACL file the server writes from its registry (`[identity] mosquitto_acl`): each
    /// device confined to its own topics.
    Registry,
    /// No ACL: any client with a fleet certificate may publish and subscribe anywhere (a broker
    /// set up wrongly; identity must still hold).
    Open,
}

/// A Mosquitto broker on a free loopback port: TLS only, a client certificate of the test CA
/// required, its common name the user name and the client id.
pub struct Mosquitto {
    pub port: u16,
    pub acl: Acl,
    pub acl_file: PathBuf,
    pub pid_file: PathBuf,
    conf: PathBuf,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> anyhow::Result<Mosquitto> {
        Self::start_with(dir, Acl::Registry)
    }

    /// Starts with `acl`.
    pub fn start_with(dir: &Path, acl: Acl) -> anyhow::Result<Mosquitto> {
        let pki = Pki::at(dir)?;
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        let acl_file = dir.join("mosquitto.acl");
        let pid_file = dir.join("mosquitto.pid");
        std::fs::write(&acl_file, millwright_server::mosquitto::acl(&[], &[]))?;
        let acl_line = match acl {
            Acl::Registry => format!("acl_file {}\n", acl_file.display()),
            Acl::Open => String::new(),
        };
        std::fs::write(
            &conf,
            format!(
                "user root\nper_listener_settings true\npersistence false\npid_file {}\n\
                 max_queued_messages 0\nmax_inflight_messages 0\nmax_packet_size 4194304\nset_tcp_nodelay true\n\
                 log_type all\nlog_dest stderr\n\
                 listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate true\nuse_identity_as_username true\n\
                 use_username_as_clientid true\nallow_anonymous false\n{acl_line}",
                pid_file.display(),
                pki.ca_cert.display(),
                pki.broker_cert.display(),
                pki.broker_key.display(),
            ),
        )?;
        let mut m =
            Mosquitto { port, acl, acl_file, pid_file, conf, dir: dir.to_owned(), proc: None };
        m.restart()?;
        Ok(m)
    }

    fn exe() -> anyhow::Result<PathBuf> {
        ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context(
                "mosquitto is not installed (apt-get install mosquitto); scripts/test installs it",
            )
    }

    /// Starts (again) on the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let proc = Proc::spawn(
            Command::new(Self::exe()?).arg("-c").arg(&self.conf),
            self.dir.join("mosquitto.log"),
        )?;
        self.proc = Some(proc);
        if !wait_for_port(self.port, Duration::from_secs(10)) {
            bail!("mosquitto did not listen on {}", self.port);
        }
        Ok(())
    }

    /// The command the server runs after it rewrote the ACL file.
    fn reload_command(&self) -> String {
        format!("kill -HUP $(cat {})", self.pid_file.display())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// Where a server's MQTT traffic goes.
pub enum BrokerChoice<'a> {
    Embedded,
    Mosquitto(&'a Mosquitto),
    /// Mosquitto, the server reaching it through the proxy on this port (agents connect to
    /// Mosquitto itself).
    MosquittoVia(&'a Mosquitto, u16),
}

/// A `millwright-server` process.
pub struct Server {
    pub http_port: u16,
    /// The port agents connect to (embedded or external broker), always TLS.
    pub mqtt_port: u16,
    pub proc: Proc,
    pub dir: PathBuf,
    pub pki: Pki,
    /// The test's root folder (enrolled identities go under it).
    pub root: PathBuf,
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
    /// With Mosquitto and the registry ACL: its log, where each ACL reload shows.
    acl_reloads: Option<PathBuf>,
}

/// How many times the Mosquitto log at `log` says it reloaded its config.
fn reloads_in(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().matches("Reloading config").count()
}

/// An HTTPS client that trusts the test CA.
pub fn https(pki: &Pki) -> ureq::Agent {
    let tls = millwright_io::tls::client_config(&pki.ca_cert, None).expect("test CA");
    ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).tls_config(tls).build()
}

impl Server {
    pub fn start(dir: &Path, broker: BrokerChoice<'_>) -> anyhow::Result<Server> {
        Self::start_with_config(dir, broker, "")
    }

    /// Starts a server with `config` (TOML tables: `[models]`, `[drift]` ...) in its config
    /// file, after its identity and the test users (admin, operator, viewer).
    pub fn start_with_config(
        dir: &Path,
        broker: BrokerChoice<'_>,
        config: &str,
    ) -> anyhow::Result<Server> {
        Self::launch(dir, broker, config, true)
    }

    /// A server without users: open to read, closed to writes (no enrollment either).
    pub fn start_without_users(dir: &Path, broker: BrokerChoice<'_>) -> anyhow::Result<Server> {
        Self::launch(dir, broker, "", false)
    }

    fn launch(
        dir: &Path,
        broker: BrokerChoice<'_>,
        config: &str,
        users: bool,
    ) -> anyhow::Result<Server> {
        let pki = Pki::at(dir)?;
        let http_port = free_port();
        let data = dir.join("server");
        let mut cmd = Command::new(bin("millwright-server"));
        let mut toml = format!(
            "[identity]\nserver_key = {:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            pki.message_key, pki.ca_cert, pki.server_cert, pki.server_key
        );
        let mut acl_reloads = None;
        if let BrokerChoice::Mosquitto(m) | BrokerChoice::MosquittoVia(m, _) = &broker
            && m.acl == Acl::Registry
        {
            acl_reloads = Some(m.dir.join("mosquitto.log"));
            toml += &format!(
                "mosquitto_acl = {:?}\nmosquitto_reload = {:?}\n",
                m.acl_file,
                m.reload_command()
            );
        }
        if users {
            for (name, role, token) in [
                ("ada", "admin", trust::ADMIN_TOKEN),
                ("oscar", "operator", trust::OPERATOR_TOKEN),
                ("vera", "viewer", trust::VIEWER_TOKEN),
            ] {
                toml += &format!(
                    "\n[[users]]\nname = {name:?}\nrole = {role:?}\ntoken_sha256 = {:?}\n",
                    millwright_server::auth::token_hash(token)
                );
            }
        }
        toml += &format!("\n{config}");
        let path = dir.join("server.toml");
        std::fs::create_dir_all(dir)?;
        std::fs::write(&path, toml)?;
        cmd.arg("--config").arg(path);
        cmd.arg("--data-dir").arg(&data).arg("--http").arg(format!("127.0.0.1:{http_port}"));
        let mqtt_port = match broker {
            BrokerChoice::Embedded => {
                let port = free_port();
                cmd.arg("--mqtt-listen").arg(format!("127.0.0.1:{port}"));
                port
            }
            BrokerChoice::Mosquitto(m) => {
                cmd.arg("--broker").arg(format!("mqtts://127.0.0.1:{}", m.port));
                m.port
            }
            BrokerChoice::MosquittoVia(m, proxy) => {
                cmd.arg("--broker").arg(format!("mqtts://127.0.0.1:{proxy}"));
                m.port
            }
        };
        let args: Vec<std::ffi::OsString> = cmd.get_args().map(ToOwned::to_owned).collect();
        let log = dir.join("server.log");
        let proc = Proc::spawn(&mut cmd, log.clone())?;
        let server = Server {
            http_port,
            mqtt_port,
            proc,
            dir: data,
            pki,
            root: dir.to_owned(),
            args,
            log,
            acl_reloads,
        };
        server.wait_healthy()?;
        Ok(server)
    }

    fn wait_healthy(&self) -> anyhow::Result<()> {
        let up = wait_until(Duration::from_secs(20), || {
            self.get("/api/v1/health").is_ok_and(|h| h["broker_connected"] == true)
        });
        if !up {
            bail!("server did not become healthy; log:\n{}", self.proc.log_text());
        }
        Ok(())
    }

    /// Starts the server again with the same arguments, ports and data (after a kill).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.restart_with_env(&[])
    }

    /// [`Server::restart`] with extra environment variables (e.g. libfaketime's).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("millwright-server"));
        cmd.args(&self.args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.proc = Proc::spawn(&mut cmd, self.log.clone())?;
        self.wait_healthy()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.http_port)
    }

    /// An HTTPS client that trusts the server's CA.
    pub fn https(&self) -> ureq::Agent {
        https(&self.pki)
    }

    /// POSTs `body` (JSON) with a bearer token; returns the status and the JSON answer.
    pub fn post(&self, path: &str, token: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let answer = self
            .https()
            .post(&self.url(path))
            .timeout(Duration::from_secs(60))
            .set("Authorization", &format!("Bearer {token}"))
            .send_json(body.clone());
        match answer {
            Ok(r) => Ok((r.status(), r.into_json()?)),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_json().unwrap_or_default())),
            Err(e) => Err(e.into()),
        }
    }

    /// The `millwright` CLI pointed at this server with `token`.
    pub fn cli(&self, token: &str) -> Command {
        let mut cmd = Command::new(bin("millwright"));
        cmd.env("MILLWRIGHT_TOKEN", token)
            .env("MILLWRIGHT_SERVER", format!("https://127.0.0.1:{}", self.http_port))
            .env("MILLWRIGHT_CA", &self.pki.ca_cert);
        cmd
    }

    /// Enrolls `device` with `millwright device enroll` (as the admin); returns its identity
    /// folder (`<test root>/<device>/identity`, with a page certificate for 127.0.0.1).
    /// With Mosquitto's registry ACL, returns once Mosquitto has reloaded the ACL that lets the
    /// device in (the server signals the reload before it answers; Mosquitto reloads in its
    /// next loop).
    pub fn enroll(&self, device: &str) -> anyhow::Result<PathBuf> {
        let dir = self.root.join(device).join("identity");
        let reloaded = self.acl_reloads.as_deref().map(reloads_in);
        let out = self
            .cli(trust::ADMIN_TOKEN)
            .args(["device", "enroll", device, "--page-host", "127.0.0.1", "--ca"])
            .arg(&self.pki.ca_dir)
            .arg("--out-dir")
            .arg(&dir)
            .output()?;
        if !out.status.success() {
            bail!("enroll {device}: {}", String::from_utf8_lossy(&out.stderr));
        }
        if let (Some(log), Some(before)) = (&self.acl_reloads, reloaded)
            && !wait_until(Duration::from_secs(10), || reloads_in(log) > before)
        {
            bail!("enroll {device}: Mosquitto did not reload its ACL");
        }
        Ok(dir)
    }

    /// A non-JSON route (e.g. `/metrics`) as text. Like [`Server::get`], with a viewer's
    /// token: servers with users need one to read, and servers without users ignore it.
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        Ok(self.read(path).call()?.into_string()?)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.read(path).call()?.into_json()?)
    }

    /// A GET as the test viewer.
    pub fn read(&self, path: &str) -> ureq::Request {
        self.https()
            .get(&self.url(path))
            .set("Authorization", &format!("Bearer {}", trust::VIEWER_TOKEN))
    }

    /// A series of the server's `/metrics` (0 when absent), e.g.
    /// `millwright_refused_total{reason="bad_signature"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.get_text("/metrics").unwrap_or_default(), series)
    }

    /// Every prediction stored for `device`, in sequence order.
    pub fn predictions(&self, device: &str) -> anyhow::Result<Vec<StoredPrediction>> {
        let mut all: Vec<StoredPrediction> = Vec::new();
        loop {
            let after = all.last().map_or(0, |p| p.seq);
            let page: Vec<StoredPrediction> = serde_json::from_value(self.get(&format!(
                "/api/v1/devices/{device}/predictions?after_seq={after}&limit=10000"
            ))?)?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    pub fn prediction_count(&self, device: &str) -> u64 {
        self.get(&format!("/api/v1/devices/{device}"))
            .ok()
            .and_then(|d| d["predictions"].as_u64())
            .unwrap_or(0)
    }
}

/// MQTT options for a party on the test broker at `port`: TLS with `identity`'s client
/// certificate (an enrolled or an attacking folder), logged in as its device with a password
/// signed by its key, under `client_id` (default `millwright-<device>`).
pub fn mqtt_as(port: u16, identity: &Path, client_id: Option<&str>) -> anyhow::Result<MqttOptions> {
    use millwright_shared::enrollment as files;
    let file: millwright_shared::enrollment::IdentityFile =
        serde_json::from_slice(&std::fs::read(identity.join(files::IDENTITY_FILE))?)?;
    let (_, key) = millwright_shared::keys::SecretKeyFile::parse(&std::fs::read_to_string(
        identity.join(files::DEVICE_KEY),
    )?)?;
    let client_id = client_id.map_or_else(|| format!("millwright-{}", file.device), str::to_owned);
    let tls = millwright_io::tls::client_config(
        &identity.join(files::CA_CERT),
        Some(&millwright_io::tls::ClientIdentity {
            cert: identity.join(files::DEVICE_CERT),
            key: identity.join(files::DEVICE_TLS_KEY),
        }),
    )?;
    let password = millwright_shared::signed::connect_password(&key, &file.device, &client_id);
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(8 << 20, 8 << 20);
    options
        .set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls)));
    options.set_credentials(file.device.to_string(), password);
    Ok(options)
}

/// The value of `series` in Prometheus text (0 when absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct StoredPrediction {
    pub seq: u64,
    pub asset: String,
    pub cycle: u64,
    pub value: f64,
    pub release: u64,
}

/// One line of `millwright-agent replay` output.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ExpectedPrediction {
    pub asset: String,
    pub cycle: u64,
    pub value: f32,
}

/// An agent's input: which C-MAPSS units it replays, and how fast.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub device: String,
    pub units: Vec<u32>,
    pub cycles_per_second: f64,
    /// Extra assets fed from MQTT topics: (asset id, topic).
    pub mqtt_assets: Vec<(String, String)>,
    /// The C-MAPSS file the units come from (default: the committed test_FD001 subset).
    pub data: Option<PathBuf>,
    pub site: Option<String>,
    /// Body of the agent's `[drift]` table, e.g. `interval_secs = 1`.
    pub drift: Option<String>,
    /// A root document to trust instead of the demo release key.
    pub trust_root: Option<PathBuf>,
    /// The bundle its assets start with (default: the reference bundle).
    pub bundle: Option<PathBuf>,
    /// Extra top-level config lines, e.g. `tags = ["pilot"]`.
    pub top: String,
    /// Body of the agent's `[updates]` table.
    pub updates: Option<String>,
    /// Extra lines of the agent's `[uplink]` table, e.g. `flush_max_records = 100`.
    pub uplink: String,
    /// Extra `[[assets]]` tables, as TOML (e.g. [`plc::modbus_asset`]).
    pub extra_assets: String,
}

impl AgentSpec {
    pub fn replaying(
        device: &str,
        units: impl IntoIterator<Item = u32>,
        cycles_per_second: f64,
    ) -> Self {
        AgentSpec {
            device: device.into(),
            units: units.into_iter().collect(),
            cycles_per_second,
            mqtt_assets: Vec::new(),
            data: None,
            site: None,
            drift: None,
            trust_root: None,
            bundle: None,
            top: String::new(),
            updates: None,
            uplink: String::new(),
            extra_assets: String::new(),
        }
    }
}

/// A `millwright-agent` process with its config and data folder.
pub struct Agent {
    pub spec: AgentSpec,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub proc: Proc,
    /// The identity folder enrollment wrote.
    pub identity: PathBuf,
}

impl Agent {
    /// Enrolls the agent with `server` and starts it on the server's broker.
    pub fn start(root: &Path, spec: AgentSpec, server: &Server) -> anyhow::Result<Agent> {
        Self::start_with_env(root, spec, server, &[])
    }

    /// Starts an agent with extra environment variables (e.g. faketime's).
    pub fn start_with_env(
        root: &Path,
        spec: AgentSpec,
        server: &Server,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Agent> {
        let identity = server.enroll(&spec.device)?;
        Self::start_enrolled(root, spec, server.mqtt_port, &identity, env)
    }

    /// Starts an agent with the identity folder `identity` (enrolled already, or not: an
    /// attack) on the broker at `broker_port`.
    pub fn start_enrolled(
        root: &Path,
        spec: AgentSpec,
        broker_port: u16,
        identity: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Agent> {
        let dir = root.join(&spec.device);
        std::fs::create_dir_all(&dir)?;
        let trust = match &spec.trust_root {
            Some(root) => format!("root = {root:?}"),
            None => format!("keys = [{:?}]", repo_file(PUBLIC_KEY)),
        };
        // The tests read status.json: every second rather than the default 10 s, unless the
        // spec says.
        let every =
            if spec.top.contains("status_file_secs") { "" } else { "status_file_secs = 1\n" };
        let mut toml = format!(
            "{every}device = {:?}\ndata_dir = {:?}\n{}\n\n[identity]\ndir = {identity:?}\n\n\
             [uplink]\nbroker = \"mqtts://127.0.0.1:{broker_port}\"\n\
             keep_alive_secs = 2\nretry_after_secs = 3\nreconnect_max_secs = 1\n{}\n\n\
             [trust]\n{trust}\n",
            spec.device,
            dir.join("data"),
            spec.top,
            spec.uplink,
        );
        if let Some(updates) = &spec.updates {
            toml += &format!("\n[updates]\n{updates}\n");
        }
        let bundle = spec.bundle.clone().unwrap_or_else(|| repo_file(BUNDLE));
        if let Some(site) = &spec.site {
            toml = format!("site = {site:?}\n{toml}");
        }
        if let Some(drift) = &spec.drift {
            toml += &format!("\n[drift]\n{drift}\n");
        }
        let data = spec.data.clone().unwrap_or_else(|| repo_file(TEST_DATA));
        for unit in &spec.units {
            toml += &format!(
                "\n[[assets]]\nid = \"unit-{unit}\"\nasset_type = \"turbofan\"\nbundle = {:?}\n\
                 source = {{ kind = \"cmapss\", path = {:?}, unit = {unit}, cycles_per_second = {} }}\n",
                bundle, data, spec.cycles_per_second
            );
        }
        for (asset, topic) in &spec.mqtt_assets {
            toml += &format!(
                "\n[[assets]]\nid = {asset:?}\nasset_type = \"turbofan\"\nbundle = {:?}\n\
                 source = {{ kind = \"mqtt\", topic = {topic:?} }}\n",
                bundle
            );
        }
        toml += &spec.extra_assets;
        let config = dir.join("agent.toml");
        std::fs::write(&config, toml)?;
        let proc = Self::spawn(&dir, &config, env)?;
        Ok(Agent { spec, dir, config, proc, identity: identity.to_owned() })
    }

    fn spawn(dir: &Path, config: &Path, env: &[(&str, &str)]) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(bin("millwright-agent"));
        cmd.arg("run").arg("--config").arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::spawn(&mut cmd, dir.join("agent.log"))
    }

    /// Starts the agent again under `wrapper` (e.g. `faketime -f @1970-01-02`), with `env`.
    pub fn restart_under(&mut self, wrapper: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
        let Some((program, args)) = wrapper.split_first() else { return self.restart() };
        let mut cmd = Command::new(program);
        cmd.args(args).arg(bin("millwright-agent")).arg("run").arg("--config").arg(&self.config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.proc = Proc::spawn(&mut cmd, self.dir.join("agent.log"))?;
        Ok(())
    }

    /// Starts the agent again with the same config and data folder.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc = Self::spawn(&self.dir, &self.config, &[])?;
        Ok(())
    }

    /// The release of `model` the agent serves, per its status file.
    pub fn serving(&self, model: &str) -> Option<(u64, String)> {
        let status = self.status()?;
        status["models"].as_array()?.iter().find(|m| m["model"] == model).map(|m| {
            (m["release"].as_u64().unwrap_or(0), m["sha256"].as_str().unwrap_or("").to_owned())
        })
    }

    /// The agent's `status.json` (written every second: the harness sets `status_file_secs`).
    pub fn status(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.dir.join("data/status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// What the server must end up holding for this agent's replayed units.
    pub fn expected(&self) -> anyhow::Result<Vec<ExpectedPrediction>> {
        let data = self.spec.data.clone().unwrap_or_else(|| repo_file(TEST_DATA));
        let all = expected_predictions_of(&data)?;
        let assets: Vec<String> = self.spec.units.iter().map(|u| format!("unit-{u}")).collect();
        Ok(all.iter().filter(|p| assets.contains(&p.asset)).cloned().collect())
    }
}

/// `millwright-agent replay` of the reference bundle over `cmapss`, predictions to `out`.
pub fn replay_command(cmapss: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(bin("millwright-agent"));
    cmd.arg("replay")
        .arg("--bundle")
        .arg(repo_file(BUNDLE))
        .arg("--trusted-key")
        .arg(repo_file(PUBLIC_KEY))
        .arg("--cmapss")
        .arg(cmapss)
        .arg("--out")
        .arg(out);
    cmd
}

/// The reference: `millwright-agent replay` over the committed test data, computed once.
pub fn expected_predictions() -> anyhow::Result<Vec<ExpectedPrediction>> {
    expected_predictions_of(&repo_file(TEST_DATA))
}

/// The reference replay of any C-MAPSS file, computed once per file.
pub fn expected_predictions_of(data: &Path) -> anyhow::Result<Vec<ExpectedPrediction>> {
    type Cache = Mutex<std::collections::HashMap<PathBuf, Result<Vec<ExpectedPrediction>, String>>>;
    static EXPECTED: OnceLock<Cache> = OnceLock::new();
    let mut cache = EXPECTED.get_or_init(Cache::default).lock().unwrap_or_else(|e| e.into_inner());
    let result = cache.entry(data.to_owned()).or_insert_with(|| {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = dir.path().join("expected.jsonl");
        let output = replay_command(data, &out).output().map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
        text.lines().map(|l| serde_json::from_str(l).map_err(|e| e.to_string())).collect()
    });
    result.clone().map_err(|e| anyhow::anyhow!("reference replay failed: {e}"))
}

/// libfaketime, for moving a daemon's wall clock (Debian's `faketime`; scripts/test installs it).
pub fn libfaketime() -> PathBuf {
    let lib = PathBuf::from(format!(
        "/usr/lib/{}-linux-gnu/faketime/libfaketime.so.1",
        std::env::consts::ARCH
    ));
    assert!(lib.exists(), "{} is missing: install Debian's faketime", lib.display());
    lib
}

/// Checks that every outbox stream of the agent (predictions, alerts, drift reports, update
/// reports) arrived exactly once: for each, the server holds as many records as its highest
/// sequence number (1..=n, so no gap and no duplicate) less what the agent announced it dropped
/// by policy (gap records), and that number is the agent's last.
/// Waits up to `timeout` for the last records to arrive. Returns the records per stream.
pub fn check_streams(
    server: &Server,
    agent: &Agent,
    timeout: Duration,
) -> anyhow::Result<Vec<(String, u64)>> {
    let device = &agent.spec.device;
    let mut last = String::new();
    let mut counted = Vec::new();
    let done = wait_until(timeout, || {
        let (Some(status), Ok(stored)) =
            (agent.status(), server.get(&format!("/api/v1/devices/{device}/streams")))
        else {
            return false;
        };
        counted.clear();
        let mut ok = true;
        last.clear();
        for stream in ["pred", "alert", "drift", "update"] {
            let sent = status["last_seq"][stream].as_u64().unwrap_or(0);
            let records = stored[stream]["records"].as_u64().unwrap_or(0);
            let highest = stored[stream]["last_seq"].as_u64().unwrap_or(0);
            let dropped = stored[stream]["dropped"].as_u64().unwrap_or(0);
            let pruned = stored[stream]["pruned"].as_u64().unwrap_or(0);
            last += &format!(
                "{stream}: agent {sent}, server {records} records + {dropped} dropped + \
                 {pruned} removed by retention up to {highest}; "
            );
            ok &= records + dropped + pruned == highest && highest == sent;
            counted.push((stream.to_owned(), records));
        }
        ok
    });
    if !done {
        bail!("{device}: streams not delivered exactly once: {last}");
    }
    Ok(counted)
}

/// Checks the server holds exactly `expected` for `device`: sequence numbers 1..=n without a
/// gap, one prediction per (asset, cycle), values bit-equal to the reference replay; and every
/// other stream exactly once too ([`check_streams`]).
pub fn check_exactly_once(server: &Server, agent: &Agent) -> anyhow::Result<usize> {
    check_streams(server, agent, Duration::from_secs(30))?;
    let expected = agent.expected()?;
    let stored = server.predictions(&agent.spec.device)?;
    let seqs: Vec<u64> = stored.iter().map(|p| p.seq).collect();
    let want: Vec<u64> = (1..=stored.len() as u64).collect();
    if seqs != want {
        bail!("{}: sequence numbers are not 1..={} without gaps", agent.spec.device, stored.len());
    }
    let mut got: Vec<(String, u64, f32)> =
        stored.iter().map(|p| (p.asset.clone(), p.cycle, p.value as f32)).collect();
    got.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut exp: Vec<(String, u64, f32)> =
        expected.iter().map(|p| (p.asset.clone(), p.cycle, p.value)).collect();
    exp.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let keys = |v: &[(String, u64, f32)]| v.iter().map(|p| (p.0.clone(), p.1)).collect::<Vec<_>>();
    let mut dedup = keys(&got);
    dedup.dedup();
    if dedup.len() != got.len() {
        bail!("{}: {} duplicate predictions", agent.spec.device, got.len() - dedup.len());
    }
    if keys(&got) != keys(&exp) {
        bail!(
            "{}: server holds {} predictions, expected {} (missing or extra (asset, cycle) pairs)",
            agent.spec.device,
            got.len(),
            exp.len()
        );
    }
    for (g, e) in got.iter().zip(&exp) {
        if g.2.to_bits() != e.2.to_bits() {
            bail!(
                "{} {} cycle {}: server value {} != agent value {}",
                agent.spec.device,
                g.0,
                g.1,
                g.2,
                e.2
            );
        }
    }
    Ok(got.len())
}

/// Waits until the server holds at least as many predictions as the agent should produce.
pub fn wait_for_all(server: &Server, agents: &[&Agent], timeout: Duration) -> anyhow::Result<()> {
    let targets: Vec<(String, u64)> = agents
        .iter()
        .map(|a| Ok((a.spec.device.clone(), a.expected()?.len() as u64)))
        .collect::<anyhow::Result<_>>()?;
    let done = wait_until(timeout, || {
        targets.iter().all(|(device, n)| server.prediction_count(device) >= *n)
    });
    if !done {
        let counts: Vec<String> = targets
            .iter()
            .map(|(d, n)| format!("{d}: {}/{n}", server.prediction_count(d)))
            .collect();
        bail!("timed out waiting for predictions ({})", counts.join(", "));
    }
    Ok(())
}

/// Runs `millwright-agent replay` with drift reports on `cmapss`; returns the reports (JSON)
/// and the prediction lines.
pub fn replay_drift(
    cmapss: &Path,
    extra: &[&str],
) -> anyhow::Result<(Vec<Value>, Vec<ExpectedPrediction>)> {
    let dir = tempfile::tempdir()?;
    let (out, drift) = (dir.path().join("p.jsonl"), dir.path().join("d.jsonl"));
    let output =
        replay_command(cmapss, &out).arg("--drift-out").arg(&drift).args(extra).output()?;
    if !output.status.success() {
        bail!("replay failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let lines = |p: &Path| -> anyhow::Result<Vec<String>> {
        Ok(std::fs::read_to_string(p)?.lines().map(str::to_owned).collect())
    };
    let reports =
        lines(&drift)?.iter().map(|l| serde_json::from_str(l)).collect::<Result<_, _>>()?;
    let preds = lines(&out)?.iter().map(|l| serde_json::from_str(l)).collect::<Result<_, _>>()?;
    Ok((reports, preds))
}

/// A machine on the broker at `port`: publishes unit `unit`'s readings of the committed test
/// data as JSON on `topic` (without cycle numbers, over and over, each publish waiting for its
/// PUBACK, `pause` apart) as `identity` until `stop`; returns how many it published.
pub fn publish_readings(
    port: u16,
    identity: &Path,
    topic: &str,
    unit: u32,
    pause: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let options = mqtt_as(port, identity, None).expect("publisher options");
    let topic = topic.to_owned();
    std::thread::spawn(move || {
        let (client, mut connection) = rumqttc::Client::new(options, 100);
        let features = [
            "s2", "s3", "s4", "s7", "s8", "s9", "s11", "s12", "s13", "s14", "s15", "s17", "s20",
            "s21",
        ];
        let text = std::fs::read_to_string(repo_file(TEST_DATA)).expect("test data");
        let columns = millwright_agent::cmapss::feature_indices(features).expect("features");
        let rows: Vec<_> = millwright_agent::cmapss::parse(&text)
            .expect("test data parses")
            .into_iter()
            .filter(|r| r.unit == unit)
            .collect();
        let mut sent = 0u64;
        for row in rows.iter().cycle() {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            let values: serde_json::Map<String, Value> = features
                .iter()
                .zip(&columns)
                .map(|(n, &c)| ((*n).to_owned(), serde_json::json!(row.values[c])))
                .collect();
            let reading = serde_json::json!({ "values": values }).to_string();
            if client.publish(topic.as_str(), rumqttc::QoS::AtLeastOnce, false, reading).is_err() {
                break;
            }
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
                    Ok(_) if !stop.load(std::sync::atomic::Ordering::SeqCst) => {}
                    Ok(_) => break,
                    // The broker restarted (some tests do that): that reading is gone, as a
                    // machine's would be; reconnect and go on.
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(200));
                        break;
                    }
                }
            }
            sent += 1;
            std::thread::sleep(pause);
        }
        sent
    })
}
