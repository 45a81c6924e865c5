//! The HTTP client the fleet subcommands share: the server's address, the bearer token and
//! errors that carry the server's own message.

use serde_json::Value;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The server's HTTP API.
    #[arg(long, env = "MILLWRIGHT_SERVER", default_value = "http://127.0.0.1:8080", global = true)]
    pub server: String,
    /// API token of a configured user (a viewer's reads, an operator's or admin's changes).
    #[arg(long, env = "MILLWRIGHT_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

impl ApiArgs {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.trim_end_matches('/'))
    }

    fn answer(result: Result<ureq::Response, ureq::Error>) -> anyhow::Result<Value> {
        match result {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(code, r)) => {
                let body: Value = r.into_json().unwrap_or_default();
                let message = body["error"].as_str().unwrap_or("no message").to_owned();
                anyhow::bail!("server answered {code}: {message}")
            }
            Err(e) => anyhow::bail!("cannot reach the server: {e}"),
        }
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        Self::answer(
            self.authorized(ureq::get(&self.url(path)).timeout(Duration::from_secs(10))).call(),
        )
    }

    fn post(&self, path: &str) -> ureq::Request {
        self.authorized(ureq::post(&self.url(path)).timeout(Duration::from_secs(120)))
    }

    fn authorized(&self, request: ureq::Request) -> ureq::Request {
        match &self.token {
            Some(t) => request.set("Authorization", &format!("Bearer {t}")),
            None => request,
        }
    }

    pub fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Self::answer(self.post(path).send_json(body.clone()))
    }

    pub fn post_bytes(&self, path: &str, body: &[u8]) -> anyhow::Result<Value> {
        Self::answer(
            self.post(path).set("Content-Type", "application/octet-stream").send_bytes(body),
        )
    }
}
