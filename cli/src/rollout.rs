//! `millwright rollout start|status|pause|resume|abort|revert`, with a live progress bar.

use super::api::ApiArgs;
use super::{EX_DATAERR, Failure};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Start rolling a registered release out: a canary, then waves, each gated on how the
    /// model behaves on the devices.
    Start(Box<StartArgs>),
    /// One rollout (or all of them without an id).
    Status {
        id: Option<String>,
        #[command(flatten)]
        follow: FollowArgs,
    },
    /// No new wave starts until resumed.
    Pause(ActArgs),
    Resume(ActArgs),
    /// No more directives; devices keep what they have.
    Abort(ActArgs),
    /// Every device that got the release goes back to the one it ran before.
    Revert(ActArgs),
}

#[derive(Debug, clap::Args)]
pub struct ActArgs {
    id: String,
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    #[arg(long)]
    model: String,
    #[arg(long)]
    release: u64,
    /// Target every device serving the model (the default).
    #[arg(long, conflicts_with_all = ["site", "tag", "devices"])]
    all: bool,
    #[arg(long)]
    site: Option<String>,
    #[arg(long)]
    tag: Option<String>,
    /// Comma-separated device ids.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Canary size: a count ("2") or a share ("10%").
    #[arg(long, default_value = "10%")]
    canary: String,
    /// Waves after the canary.
    #[arg(long, default_value_t = 2, conflicts_with_all = ["exponential", "wave_size"])]
    waves: usize,
    /// Waves of this many devices each instead.
    #[arg(long, conflicts_with = "exponential")]
    wave_size: Option<usize>,
    /// Each wave twice the previous instead.
    #[arg(long)]
    exponential: bool,
    /// Minimum healthy time of a wave before the next starts ("30s", "10m", seconds).
    #[arg(long, default_value = "60s", value_parser = seconds)]
    soak: u64,
    /// A device that reports no new phase for this long counts as failed; the shadow and
    /// probation periods are added while they run.
    #[arg(long, default_value = "15m", value_parser = seconds)]
    timeout: u64,
    #[arg(long, default_value = "revert", value_parser = ["pause", "revert"])]
    on_failure: String,
    /// Failures tolerated per wave: a count ("2") or a share of the wave ("2%").
    #[arg(long, default_value = "0")]
    max_failures: String,
    /// Directives sent per minute within a wave (all at once without it).
    #[arg(long)]
    rate: Option<u64>,
    /// The rate is multiplied by this each minute of a wave.
    #[arg(long, requires = "rate", default_value_t = 1.0)]
    ramp: f64,
    /// The ramp stops at this many directives per minute.
    #[arg(long, requires = "rate")]
    max_rate: Option<u64>,
    /// A rollout paused this long reverts ("1h"; never without it).
    #[arg(long, value_parser = seconds)]
    pause_deadline: Option<u64>,
    /// Both models run side by side this long before the swap.
    #[arg(long, default_value = "60s", value_parser = seconds)]
    shadow: u64,
    /// The new model is watched this long after the swap before it is committed.
    #[arg(long, default_value = "60s", value_parser = seconds)]
    probation: u64,
    /// Predictions a device needs in shadow and in probation before judging.
    #[arg(long, default_value_t = 20)]
    min_predictions: u64,
    /// Shadow agreement: share of windows within --agreement-tolerance of the current model.
    #[arg(long, default_value_t = 0.9)]
    min_agreement: f64,
    #[arg(long, default_value_t = 10.0)]
    agreement_tolerance: f32,
    /// p99 latency of the new model over the current one.
    #[arg(long, default_value_t = 3.0)]
    max_latency_ratio: f64,
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    follow: FollowArgs,
}

/// `--follow [--follow-for D]`, for `start` and `status`.
#[derive(Debug, clap::Args)]
pub struct FollowArgs {
    /// Follow it with a progress bar until it ends.
    #[arg(long)]
    follow: bool,
    /// Give up following after this long ("90s", "10m", "2h"; a day by default).
    #[arg(long, requires = "follow", value_parser = seconds, default_value = "24h")]
    follow_for: u64,
}

impl FollowArgs {
    /// How long to follow, if at all.
    fn limit(&self) -> Option<Duration> {
        self.follow.then(|| Duration::from_secs(self.follow_for))
    }
}

#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
    #[command(flatten)]
    api: ApiArgs,
}

/// "90", "90s", "10m", "2h" → seconds.
fn seconds(s: &str) -> Result<u64, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 =
        digits.parse().map_err(|_| format!("{s:?} is not a duration like 30s, 10m, 2h"))?;
    match unit {
        "" | "s" => Ok(n),
        "m" => Ok(n * 60),
        "h" => Ok(n * 3600),
        _ => Err(format!("{s:?} is not a duration like 30s, 10m, 2h")),
    }
}

fn spec(a: &StartArgs) -> Result<Value, String> {
    let canary = match a.canary.strip_suffix('%') {
        Some(p) => {
            json!({ "percent": p.parse::<f64>().map_err(|_| format!("bad --canary {:?}", a.canary))? })
        }
        None => {
            json!({ "count": a.canary.parse::<usize>().map_err(|_| format!("bad --canary {:?}", a.canary))? })
        }
    };
    let target = match (&a.site, &a.tag, a.devices.is_empty()) {
        (Some(site), _, _) => json!({ "kind": "site", "site": site }),
        (_, Some(tag), _) => json!({ "kind": "tag", "tag": tag }),
        (_, _, false) => json!({ "kind": "devices", "devices": a.devices }),
        _ => json!({ "kind": "all" }),
    };
    let (max_failures, max_failures_percent) = match a.max_failures.strip_suffix('%') {
        Some(p) => (
            0,
            Some(p.parse::<f64>().map_err(|_| format!("bad --max-failures {:?}", a.max_failures))?),
        ),
        None => (
            a.max_failures
                .parse::<usize>()
                .map_err(|_| format!("bad --max-failures {:?}", a.max_failures))?,
            None,
        ),
    };
    if !(a.ramp.is_finite() && a.ramp >= 1.0) {
        return Err(format!("--ramp {} must be 1 or more", a.ramp));
    }
    let rate = a.rate.map(|per_minute| {
        json!({ "per_minute": per_minute, "ramp": a.ramp, "max_per_minute": a.max_rate })
    });
    let waves = match (a.exponential, a.wave_size) {
        (true, _) => json!("exponential"),
        (false, Some(n)) => json!({ "size": n }),
        (false, None) => json!({ "fixed": a.waves }),
    };
    Ok(json!({
        "model": a.model,
        "release": a.release,
        "target": target,
        "canary": canary,
        "waves": waves,
        "soak_secs": a.soak,
        "device_timeout_secs": a.timeout,
        "max_failures_per_wave": max_failures,
        "max_failures_percent": max_failures_percent,
        "on_failure": a.on_failure,
        "rate": rate,
        "pause_deadline_secs": a.pause_deadline,
        "activation": {
            "shadow_secs": a.shadow,
            "probation_secs": a.probation,
            "gates": {
                "min_predictions": a.min_predictions,
                "min_agreement": a.min_agreement,
                "agreement_tolerance": a.agreement_tolerance,
                "max_latency_ratio": a.max_latency_ratio,
            },
        },
        "reason": a.reason,
    }))
}

fn count(r: &Value, state: &str) -> u64 {
    r["devices"].as_array().map_or(0, |d| d.iter().filter(|d| d["state"] == state).count() as u64)
}

fn summary(r: &Value) -> String {
    let waves = r["waves"].as_array().map_or(0, Vec::len);
    let mut s = format!(
        "{} {} → release {}: {} · wave {}/{} · {} committed, {} failed",
        r["id"].as_str().unwrap_or("?"),
        r["spec"]["model"].as_str().unwrap_or("?"),
        r["spec"]["release"],
        r["state"].as_str().unwrap_or("?"),
        r["wave"].as_u64().unwrap_or(0) + 1,
        waves,
        count(r, "committed"),
        count(r, "failed"),
    );
    if count(r, "reverted") + count(r, "reverting") > 0 {
        s += &format!(", {} reverted", count(r, "reverted"));
    }
    if let Some(reason) = r["reason"].as_str() {
        s += &format!(" — {reason}");
    }
    s
}

fn secs(r: &Value, key: &str) -> Option<f64> {
    Some((r[key].as_i64()? - r["created_ms"].as_i64()?) as f64 / 1000.0)
}

/// Polls the rollout with a progress bar until it ends, for at most `limit`; fails unless it
/// completed.
fn follow(api: &ApiArgs, id: &str, limit: Duration) -> Result<(), Failure> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} committed · {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = Instant::now();
    loop {
        let r = api.get(&format!("/api/v1/rollouts/{id}"))?;
        bar.set_length(r["devices"].as_array().map_or(0, |d| d.len() as u64));
        bar.set_position(count(&r, "committed"));
        bar.set_message(summary(&r));
        let state = r["state"].as_str().unwrap_or("");
        let paused_on_failure = state == "paused" && count(&r, "failed") > 0;
        if !matches!(state, "running" | "reverting" | "paused") || paused_on_failure {
            bar.finish_and_clear();
            println!("{}", summary(&r));
            if let Some(t) = secs(&r, "all_notified_ms") {
                println!("all devices notified after {t:.1} s");
            }
            if let Some(t) = secs(&r, "finished_ms") {
                println!("finished after {t:.1} s");
            }
            for d in
                r["devices"].as_array().into_iter().flatten().filter(|d| d["state"] == "failed")
            {
                println!(
                    "  {} failed: {}",
                    d["device"].as_str().unwrap_or("?"),
                    d["reason"].as_str().unwrap_or("")
                );
            }
            return if state == "completed" {
                Ok(())
            } else {
                Err(Failure { code: 1, error: anyhow::anyhow!("rollout {id} ended {state}") })
            };
        }
        if started.elapsed() > limit {
            bar.finish_and_clear();
            return Err(Failure {
                code: 1,
                error: anyhow::anyhow!(
                    "gave up following after {} s: {}",
                    limit.as_secs(),
                    summary(&r)
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn run(args: RolloutArgs) -> Result<(), Failure> {
    let api = &args.api;
    let (id, action, reason) = match &args.command {
        RolloutCommand::Start(start) => {
            let body = spec(start).map_err(|e| Failure { code: 64, error: anyhow::anyhow!(e) })?;
            let r = api
                .post_json("/api/v1/rollouts", &body)
                .map_err(|e| Failure { code: EX_DATAERR, error: e })?;
            let id = r["id"].as_str().unwrap_or_default().to_owned();
            println!("started {}", summary(&r));
            return start.follow.limit().map_or(Ok(()), |limit| follow(api, &id, limit));
        }
        RolloutCommand::Status { id: Some(id), follow: f } if let Some(limit) = f.limit() => {
            return follow(api, id, limit);
        }
        RolloutCommand::Status { id: Some(id), .. } => {
            let r = api.get(&format!("/api/v1/rollouts/{id}"))?;
            println!("{}", summary(&r));
            for d in r["devices"].as_array().into_iter().flatten() {
                println!(
                    "  wave {} {:<16} {:<10} {:<14} {}",
                    d["wave"],
                    d["device"].as_str().unwrap_or(""),
                    d["state"].as_str().unwrap_or(""),
                    d["phase"].as_str().unwrap_or("-"),
                    d["reason"].as_str().unwrap_or("")
                );
            }
            return Ok(());
        }
        RolloutCommand::Status { id: None, .. } => {
            let all = api.get("/api/v1/rollouts")?;
            for r in all.as_array().into_iter().flatten() {
                println!("{}", summary(r));
            }
            return Ok(());
        }
        RolloutCommand::Pause(a) => (&a.id, "pause", &a.reason),
        RolloutCommand::Resume(a) => (&a.id, "resume", &a.reason),
        RolloutCommand::Abort(a) => (&a.id, "abort", &a.reason),
        RolloutCommand::Revert(a) => (&a.id, "revert", &a.reason),
    };
    let r = api
        .post_json(&format!("/api/v1/rollouts/{id}/{action}"), &json!({ "reason": reason }))
        .map_err(|e| Failure { code: EX_DATAERR, error: e })?;
    println!("{}", summary(&r));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::seconds;

    #[test]
    fn durations_take_units() {
        assert_eq!(seconds("90"), Ok(90));
        assert_eq!(seconds("10m"), Ok(600));
        assert_eq!(seconds("2h"), Ok(7200));
        assert!(seconds("5 days").is_err());
    }
}
