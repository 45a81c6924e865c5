//! `millwright drift`: fleet drift summaries from a running server's JSON API, as a table.

use super::Failure;
use super::api::ApiArgs;
use millwright_server::drift::{Drifting, GroupBy};
use serde_json::Value;
use std::fmt::Write as _;

#[derive(Debug, clap::Args)]
pub struct DriftArgs {
    /// The server, a viewer's token and its CA.
    #[command(flatten)]
    api: ApiArgs,
    /// Group by feature (whole fleet), site, device or bucket (time).
    #[arg(long, value_parser = parse_by, default_value = "feature")]
    by: GroupBy,
    /// Bucket width in seconds with `--by bucket`.
    #[arg(long, default_value_t = 3600)]
    bucket_s: i64,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    release: Option<u64>,
    #[arg(long)]
    site: Option<String>,
    #[arg(long)]
    feature: Option<String>,
    /// List the assets whose latest report is not clean instead.
    #[arg(long)]
    drifting: bool,
    /// List retraining recommendations instead.
    #[arg(long)]
    events: bool,
}

fn parse_by(s: &str) -> Result<GroupBy, String> {
    serde_json::from_value(Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?} is not one of feature, site, device, bucket"))
}

fn get(args: &DriftArgs, path: &str, query: &[(&str, Option<String>)]) -> anyhow::Result<Value> {
    let mut url = path.to_owned();
    for (i, (key, value)) in query.iter().filter_map(|(k, v)| Some((k, v.as_ref()?))).enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        url.push_str(key);
        url.push('=');
        for b in value.bytes() {
            match b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                true => url.push(b as char),
                false => {
                    let _ = write!(url, "%{b:02X}");
                }
            }
        }
    }
    args.api.get(&url)
}

fn num(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.3}"))
}

pub fn run(args: DriftArgs) -> Result<(), Failure> {
    let filters = [
        ("model", args.model.clone()),
        ("release", args.release.map(|r| r.to_string())),
        ("site", args.site.clone()),
        ("feature", args.feature.clone()),
    ];
    if args.events {
        let events = get(&args, "/api/v1/drift/events", &[])?;
        for e in events.as_array().into_iter().flatten() {
            println!("event {} {} release {}: {}", e["id"], e["model"], e["release"], e["reason"]);
            for f in e["features"].as_array().into_iter().flatten() {
                println!(
                    "  {:10} since {} on {} at {}",
                    f["feature"].as_str().unwrap_or("?"),
                    f["since_ms"],
                    f["devices"],
                    f["sites"]
                );
            }
        }
        return Ok(());
    }
    if args.drifting {
        let v = get(&args, "/api/v1/drift/drifting", &filters)?;
        let assets: Vec<Drifting> = serde_json::from_value(v["assets"].clone()).unwrap_or_default();
        println!(
            "{:14} {:12} {:10} {:10} {:9} {:>8} {:>8}  flags",
            "site", "device", "asset", "feature", "severity", "shift", "psi"
        );
        for a in assets {
            println!(
                "{:14} {:12} {:10} {:10} {:9} {:>8} {:>8}  {}",
                a.site,
                a.device,
                a.asset,
                a.feature,
                a.severity.as_str(),
                a.shift.map_or("-".into(), |x| format!("{x:.2}")),
                a.psi.map_or("-".into(), |x| format!("{x:.3}")),
                a.flags.join(",")
            );
        }
        return Ok(());
    }
    let by = serde_json::to_value(args.by)?.as_str().unwrap_or("feature").to_owned();
    let mut query = filters.to_vec();
    query.push(("by", Some(by)));
    query.push(("bucket_s", Some(args.bucket_s.to_string())));
    let rows = get(&args, "/api/v1/drift", &query)?;
    println!(
        "{:16} {:>3} {:20} {:10} {:>7} {:>7} {:>8} {:>7} {:>7} {:>8} {:9}",
        "model", "rel", "group", "feature", "reports", "n", "psi", "js", "ks", "shift", "severity"
    );
    for r in rows.as_array().into_iter().flatten() {
        let group = ["site", "device", "bucket_ms"]
            .iter()
            .find_map(|k| r.get(*k).map(|v| v.to_string().trim_matches('"').to_owned()))
            .unwrap_or_else(|| "fleet".into());
        println!(
            "{:16} {:>3} {:20} {:10} {:>7} {:>7} {:>8} {:>7} {:>7} {:>8} {:9}",
            r["model"].as_str().unwrap_or("?"),
            r["release"],
            group,
            r["feature"].as_str().unwrap_or("?"),
            r["reports"],
            r["n"],
            num(&r["psi"]),
            num(&r["js"]),
            num(&r["ks"]),
            num(&r["shift"]),
            r["severity"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
