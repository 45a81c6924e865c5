//! The HTTP client the fleet subcommands share: the server's address, the bearer token, the
//! CA its HTTPS certificate must chain to, and errors that carry the server's own message.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The server's HTTP API.
    #[arg(
        long,
        env = "MILLWRIGHT_SERVER",
        default_value = "https://127.0.0.1:8080",
        global = true
    )]
    pub server: String,
    /// API token of a configured user (a viewer's reads, an operator's or admin's changes).
    #[arg(long, env = "MILLWRIGHT_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// The CA certificate the server's HTTPS certificate must chain to (the fleet CA's
    /// ca.crt.pem; default: the system's roots).
    #[arg(long = "ca-cert", env = "MILLWRIGHT_CA", global = true)]
    pub ca_cert: Option<PathBuf>,
}

impl ApiArgs {
    /// Trusts `ca` unless another CA was given.
    pub fn trusting(mut self, ca: &Path) -> Self {
        if self.ca_cert.is_none() && ca.exists() {
            self.ca_cert = Some(ca.to_owned());
        }
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.trim_end_matches('/'))
    }

    pub(crate) fn agent(&self, timeout: Duration) -> anyhow::Result<ureq::Agent> {
        let mut agent = ureq::AgentBuilder::new().timeout(timeout);
        if let Some(ca) = &self.ca_cert {
            agent = agent.tls_config(millwright_io::tls::client_config(ca, None)?);
        }
        Ok(agent.build())
    }

    fn answer(result: Result<ureq::Response, ureq::Error>) -> anyhow::Result<Value> {
        match result {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let body: Value = serde_json::from_str(&text).unwrap_or_default();
                let message = body["error"].as_str().map_or(text.trim().to_owned(), str::to_owned);
                anyhow::bail!("server answered {code}: {message}")
            }
            Err(e) => anyhow::bail!("cannot reach the server: {e}"),
        }
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.get_with(&self.agent(Duration::from_secs(10))?, path)
    }

    /// GET on a client kept between calls (its connection is reused, as a browser's is).
    pub(crate) fn get_with(&self, agent: &ureq::Agent, path: &str) -> anyhow::Result<Value> {
        Self::answer(self.authorized(agent.get(&self.url(path))).call())
    }

    fn post(&self, path: &str) -> anyhow::Result<ureq::Request> {
        Ok(self.authorized(self.agent(Duration::from_secs(120))?.post(&self.url(path))))
    }

    fn authorized(&self, request: ureq::Request) -> ureq::Request {
        match &self.token {
            Some(t) => request.set("Authorization", &format!("Bearer {t}")),
            None => request,
        }
    }

    pub fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Self::answer(self.post(path)?.send_json(body.clone()))
    }

    pub fn post_bytes(&self, path: &str, body: &[u8]) -> anyhow::Result<Value> {
        Self::answer(
            self.post(path)?.set("Content-Type", "application/octet-stream").send_bytes(body),
        )
    }
}
