//! The operator's local page: one self-contained HTML document (inline CSS, server-side SVG
//! charts, a few lines of script, served apart, that reload it) rendered from a [`Status`] snapshot
//! and the prediction history. Pure: no I/O, `now` is a parameter.

use crate::status::{FeatureStatus, Point, Status, human_age, human_bytes};
use millwright_shared::drift::Severity;
use millwright_shared::wire::Level;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Seconds between reloads; a reload waits while the operator is typing a PIN.
pub const REFRESH_SECS: u32 = 5;

const CSS: &str = "\
*{box-sizing:border-box}body{margin:0;font:16px/1.4 system-ui,sans-serif;background:#f4f5f7;color:#1c1e21}\
header{background:#1f2933;color:#fff;padding:12px 16px}header h1{margin:0;font-size:1.2em}\
main{padding:12px;display:grid;gap:12px;grid-template-columns:repeat(auto-fill,minmax(320px,1fr))}\
section{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px #0002}\
h2{margin:0 0 8px;font-size:1.1em;display:flex;justify-content:space-between;align-items:center}\
.badge{border-radius:12px;padding:2px 10px;font-size:.85em;font-weight:600;color:#fff}\
td.warning{color:#b35200;font-weight:600}td.alarm{color:#c62828;font-weight:600}summary{margin-top:8px;cursor:pointer}\
.ok{background:#2e7d32}.warning{background:#ed6c02}.alarm{background:#c62828}.down{background:#c62828}\
.muted{color:#5f6b7a;font-size:.9em}.big{font-size:1.6em;font-weight:600}\
table{width:100%;border-collapse:collapse;font-size:.9em}td,th{text-align:left;padding:2px 4px;border-bottom:1px solid #eee}\
.alert{border:2px solid #c62828;border-radius:6px;padding:8px;margin:8px 0}.alert.acked{border-color:#9aa5b1}\
form{display:flex;gap:6px;flex-wrap:wrap;margin-top:6px}input{font-size:1em;padding:6px;width:8em}\
button{font-size:1em;padding:6px 14px;border:0;border-radius:6px;background:#1f2933;color:#fff}\
svg{width:100%;height:auto;display:block}dl{display:grid;grid-template-columns:auto 1fr;gap:2px 12px;margin:0}dt{color:#5f6b7a}dd{margin:0}";

/// Reloads the page every few seconds unless a PIN field has focus or holds text.
const SCRIPT: &str = "setInterval(function(){\
var busy=Array.prototype.some.call(document.querySelectorAll('input'),function(i){return i.value!==''||i===document.activeElement});\
if(!busy){location.reload()}},REFRESH_MS);";

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn level_class(level: Level) -> &'static str {
    match level {
        Level::Ok => "ok",
        Level::Warning => "warning",
        Level::Alarm => "alarm",
    }
}

fn severity_class(severity: Severity) -> &'static str {
    match severity {
        Severity::Insufficient | Severity::Ok => "",
        Severity::Warn => "warning",
        Severity::Drift => "alarm",
    }
}

/// The trend of `points` over time as an inline SVG line chart with the warning and alarm
/// thresholds dashed; `None` without at least two points.
pub fn chart(points: &[Point], warning: f32, alarm: f32, now_ms: i64) -> Option<String> {
    let (first, last) = (points.first()?, points.last()?);
    if points.len() < 2 {
        return None;
    }
    let (w, h, left, top, bottom) = (600.0, 180.0, 44.0, 8.0, 22.0);
    let values = points.iter().map(|p| f64::from(p.value)).filter(|v| v.is_finite());
    let (mut lo, mut hi) =
        values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    for t in [f64::from(warning), f64::from(alarm)].into_iter().filter(|t| t.is_finite()) {
        lo = lo.min(t);
        hi = hi.max(t);
    }
    if !(lo.is_finite() && hi.is_finite()) {
        return None;
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let (lo, hi) = (lo - pad, hi + pad);
    let (t0, t1) = (first.at_ms, last.at_ms.max(first.at_ms + 1));
    let x = |t: i64| left + (w - left - 4.0) * (t - t0) as f64 / (t1 - t0) as f64;
    let y = |v: f64| top + (h - top - bottom) * (hi - v) / (hi - lo);
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"trend\">\
         <rect x=\"{left}\" y=\"{top}\" width=\"{}\" height=\"{}\" fill=\"#fafbfc\"/>",
        w - left - 4.0,
        h - top - bottom
    );
    for (t, colour) in [(warning, "#ed6c02"), (alarm, "#c62828")] {
        if t.is_finite() {
            let ty = y(f64::from(t));
            let _ = write!(
                svg,
                "<line x1=\"{left}\" x2=\"{}\" y1=\"{ty:.1}\" y2=\"{ty:.1}\" stroke=\"{colour}\" stroke-dasharray=\"6 4\"/>\
                 <text x=\"{}\" y=\"{:.1}\" font-size=\"14\" text-anchor=\"end\" fill=\"{colour}\">{t}</text>",
                w - 4.0,
                left - 4.0,
                ty + 4.0
            );
        }
    }
    let line: Vec<String> = points
        .iter()
        .filter(|p| p.value.is_finite())
        .map(|p| format!("{:.1},{:.1}", x(p.at_ms), y(f64::from(p.value))))
        .collect();
    let _ = write!(
        svg,
        "<polyline fill=\"none\" stroke=\"#1565c0\" stroke-width=\"2\" points=\"{}\"/>",
        line.join(" ")
    );
    let _ = write!(
        svg,
        "<text x=\"{left}\" y=\"{}\" font-size=\"14\" fill=\"#5f6b7a\">{} ago</text>\
         <text x=\"{}\" y=\"{}\" font-size=\"14\" text-anchor=\"end\" fill=\"#5f6b7a\">{}</text>\
         <text x=\"{}\" y=\"{:.1}\" font-size=\"14\" text-anchor=\"end\" fill=\"#5f6b7a\">{:.0}</text>\
         <text x=\"{}\" y=\"{:.1}\" font-size=\"14\" text-anchor=\"end\" fill=\"#5f6b7a\">{:.0}</text></svg>",
        h - 6.0,
        human_age(now_ms - first.at_ms),
        w - 4.0,
        h - 6.0,
        if now_ms - last.at_ms < 2_000 {
            "now".to_owned()
        } else {
            human_age(now_ms - last.at_ms) + " ago"
        },
        left - 4.0,
        top + 10.0,
        hi,
        left - 4.0,
        h - bottom,
        lo
    );
    Some(svg)
}

fn gateway(out: &mut String, s: &Status, now_ms: i64) {
    let (class, uplink) = if s.uplink_connected {
        ("ok", "connected")
    } else {
        ("down", "DOWN — buffering locally")
    };
    let oldest = s
        .oldest_unacked_at_ms
        .map_or("—".to_owned(), |t| format!("{} old", human_age(now_ms - t)));
    let _ = write!(
        out,
        "<section id=\"gateway\"><h2>Gateway <span id=\"uplink\" class=\"badge {class}\">Uplink {uplink}</span></h2>"
    );
    if s.clock.untrusted {
        let _ = write!(
            out,
            "<p id=\"clock\" class=\"badge alarm\">Clock untrustworthy: the gateway's clock is {} \
             behind the time it last recorded. Check NTP or the RTC; expiry and certificate checks \
             use the recorded time.</p>",
            human_age(s.clock.floor_ms - now_ms)
        );
    }
    if s.trust_root_expired {
        out.push_str(
            "<p id=\"root-expired\" class=\"badge alarm\">Trust root expired: models keep serving, \
             updates are refused until a newer root arrives.</p>",
        );
    }
    if let Some(set_aside) = &s.outbox_set_aside {
        let _ = write!(
            out,
            "<p id=\"outbox-set-aside\" class=\"badge alarm\">Outbox was corrupt at start and \
             was set aside as {}: records in it were not sent ({}).</p>",
            escape(&set_aside.moved_to),
            escape(&set_aside.reason)
        );
    }
    if s.outbox_quarantined > 0 {
        let _ = write!(
            out,
            "<p id=\"outbox-quarantine\" class=\"badge warning\">{} outbox record(s) did not \
             decode and were quarantined (kept in the outbox file, not sent).</p>",
            s.outbox_quarantined
        );
    }
    let dropped: u64 = s.dropped.values().sum();
    if dropped > 0 {
        let _ = write!(
            out,
            "<p id=\"outbox-dropped\" class=\"badge warning\">Outbox quota reached: {dropped} \
             older record(s) (predictions first, then drift reports) were dropped and the gaps \
             announced to the server; alerts and update reports are kept.</p>"
        );
    }
    if s.outbox_dead_letters > 0 {
        let _ = write!(
            out,
            "<p id=\"outbox-dead-letters\" class=\"badge warning\">{} record(s) refused by the \
             server for good are kept as dead letters (not sent again); see the agent log for why.</p>",
            s.outbox_dead_letters
        );
    }
    let refused: u64 = s.counters.refused.values().sum();
    let site = s.site.as_deref().map_or("—".to_owned(), escape);
    let _ = write!(
        out,
        "<dl><dt>Site</dt><dd id=\"site\">{site}</dd><dt>Refused</dt><dd id=\"refused\">{refused} \
         message(s) not from the server</dd>\
         <dt>Outbox</dt><dd id=\"backlog\">{} records waiting</dd><dt>Oldest</dt><dd id=\"oldest\">{oldest}</dd>\
         <dt>Buffer</dt><dd id=\"disk\">{}</dd>",
        s.backlog_total(),
        human_bytes(s.disk_bytes)
    );
    for m in &s.models {
        let _ = write!(
            out,
            "<dt>Model</dt><dd class=\"model\">{} release <b class=\"release\">{}</b></dd>",
            escape(m.model.as_str()),
            m.release.0
        );
    }
    let update = match &s.update {
        Some(u) => {
            let chunks = u.chunks.map_or(String::new(), |(r, t)| format!(", {r}/{t} chunks"));
            format!("{} release {}: {}{chunks}", escape(&u.model), u.release, escape(&u.stage))
        }
        None => "none in progress".to_owned(),
    };
    let rejected: u64 = s.counters.readings_rejected.values().sum();
    let _ = write!(
        out,
        "<dt>Update</dt><dd id=\"update\">{update}</dd>\
         <dt>Trust root</dt><dd>version {}</dd><dt>Uptime</dt><dd id=\"uptime\">{}</dd>\
         <dt>Version</dt><dd id=\"version\">{}</dd><dt>Readings</dt><dd>{} ({rejected} rejected)</dd>\
         <dt>Reconnects</dt><dd>{}</dd></dl></section>",
        s.trust_root_version,
        human_age(s.at_ms - s.started_at_ms),
        escape(&s.agent_version),
        s.counters.readings,
        s.counters.reconnects
    );
}

fn assets(out: &mut String, s: &Status, history: &BTreeMap<String, Vec<Point>>, now_ms: i64) {
    for a in &s.assets {
        let id = escape(&a.asset);
        let level = level_class(a.level);
        let _ = write!(
            out,
            "<section class=\"asset\" id=\"asset-{id}\" data-level=\"{level}\"><h2>{id} \
             <span class=\"badge {level}\">{}</span></h2>",
            level.to_uppercase()
        );
        match a.latest {
            Some(p) => {
                let _ = write!(
                    out,
                    "<div><span class=\"big prediction\" data-value=\"{}\">{:.1}</span> {} \
                     <span class=\"muted\">{} · cycle {} · {} ago</span></div>",
                    p.value,
                    p.value,
                    escape(&a.units),
                    escape(&a.output.replace('_', " ")),
                    p.cycle,
                    human_age(now_ms - p.at_ms)
                );
            }
            None => out.push_str("<div class=\"muted\">No prediction yet.</div>"),
        }
        if let Some(p) = &a.input {
            let _ = write!(
                out,
                "<div class=\"input-problem\" data-kind=\"{kind}\"><b class=\"badge warning\">INPUT</b> \
                 readings refused since {} ago ({kind}): no predictions</div>",
                human_age(now_ms - p.since_ms),
                kind = escape(&p.kind)
            );
        }
        let points = history.get(&a.asset).map(Vec::as_slice).unwrap_or_default();
        if let Some(svg) = chart(points, a.warning, a.alarm, now_ms) {
            out.push_str(&svg);
        }
        if let Some(alert) = &a.alert {
            let class = level_class(alert.level);
            let acked = match alert.acknowledged_at_ms {
                Some(t) => format!(
                    "<div class=\"muted ack-state\">Acknowledged {} ago.</div>",
                    human_age(now_ms - t)
                ),
                None => format!(
                    "<form method=\"post\" action=\"/alerts/{id}/ack\"><label>PIN \
                     <input type=\"password\" name=\"pin\" inputmode=\"numeric\" autocomplete=\"off\" required></label>\
                     <button type=\"submit\">Acknowledge</button></form>"
                ),
            };
            let _ = write!(
                out,
                "<div class=\"alert {}\" data-acknowledged=\"{}\"><b class=\"badge {class}\">{}</b> since {} ago \
                 (cycle {}{}){acked}</div>",
                if alert.acknowledged_at_ms.is_some() { "acked" } else { "open" },
                alert.acknowledged_at_ms.is_some(),
                class.to_uppercase(),
                human_age(now_ms - alert.since_ms),
                alert.cycle,
                alert.value.map_or(String::new(), |v| format!(", value {v:.1}"))
            );
        }
        drift_table(out, &a.drift);
        out.push_str("</section>");
    }
}

/// Sorts "s2" before "s10": by the name without its trailing digits, then by their value.
fn natural_key(name: &str) -> (&str, u64) {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    (stem, name[stem.len()..].parse().unwrap_or(0))
}

/// Features with a drift verdict at warn or worse, or a data-quality flag, in a table; the
/// others folded away below it.
fn drift_table(out: &mut String, drift: &BTreeMap<String, FeatureStatus>) {
    if drift.is_empty() {
        out.push_str("<div class=\"muted\">Drift: no report yet.</div>");
        return;
    }
    let mut features: Vec<(&String, &FeatureStatus)> = drift.iter().collect();
    features.sort_by(|a, b| natural_key(a.0).cmp(&natural_key(b.0)));
    let (flagged, quiet): (Vec<_>, Vec<_>) = features
        .into_iter()
        .partition(|(_, f)| f.severity >= Severity::Warn || !f.flags.is_empty());
    let rows = |out: &mut String, features: &[(&String, &FeatureStatus)]| {
        out.push_str(
            "<table class=\"drift\"><tr><th>Feature</th><th>Drift</th><th>Shift</th><th>Data quality</th></tr>",
        );
        for (feature, f) in features {
            let flags: Vec<&str> = f.flags.iter().map(|q| q.as_str()).collect();
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td></tr>",
                escape(feature),
                severity_class(f.severity),
                f.severity.as_str(),
                f.shift.map_or("—".to_owned(), |v| format!("{v:.2}")),
                if flags.is_empty() { "ok".to_owned() } else { flags.join(", ") }
            );
        }
        out.push_str("</table>");
    };
    if flagged.is_empty() {
        out.push_str("<div>Drift: every feature ok.</div>");
    } else {
        let _ = write!(out, "<div>Drift: {} feature(s) need a look.</div>", flagged.len());
        rows(out, &flagged);
    }
    if !quiet.is_empty() {
        let _ = write!(
            out,
            "<details><summary class=\"muted\">{} feature(s) without drift or data-quality flags</summary>",
            quiet.len()
        );
        rows(out, &quiet);
        out.push_str("</details>");
    }
}

/// The whole page.
pub fn render(status: &Status, history: &BTreeMap<String, Vec<Point>>, now_ms: i64) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <link rel=\"icon\" href=\"data:,\"><title>{} · Millwright</title><style>{CSS}</style>\
         <noscript><meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\"></noscript></head><body>\
         <header><h1 id=\"device\">{}</h1><div class=\"muted\" style=\"color:#cbd2d9\">Millwright agent · updated {} ago</div></header><main>",
        escape(&status.device),
        escape(&status.device),
        human_age(now_ms - status.at_ms)
    );
    gateway(&mut out, status, now_ms);
    assets(&mut out, status, history, now_ms);
    out.push_str("</main><script src=\"/page.js\"></script></body></html>");
    out
}

/// The page's script (served at `/page.js`, so the page needs no inline script): reload every
/// few seconds unless the operator is typing a PIN.
pub fn script() -> String {
    SCRIPT.replace("REFRESH_MS", &(REFRESH_SECS * 1000).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{AssetStatus, FeatureStatus, InputProblem, OpenAlert};
    use millwright_shared::drift::Quality;

    fn points(values: &[f32]) -> Vec<Point> {
        values
            .iter()
            .enumerate()
            .map(|(i, &value)| Point { at_ms: i as i64 * 1000, cycle: i as u64 + 1, value })
            .collect()
    }

    fn status() -> Status {
        Status {
            device: "gw<1>".into(),
            agent_version: "0.1.0".into(),
            at_ms: 9_000,
            uplink_connected: false,
            backlog: [("pred".to_owned(), 12)].into(),
            oldest_unacked_at_ms: Some(1_000),
            assets: vec![AssetStatus {
                asset: "unit-1".into(),
                level: Level::Alarm,
                model: "m".into(),
                release: 2,
                output: "remaining_useful_life".into(),
                units: "cycles".into(),
                warning: 50.0,
                alarm: 20.0,
                latest: Some(Point { at_ms: 8_000, cycle: 9, value: 18.25 }),
                alert: Some(OpenAlert {
                    level: Level::Alarm,
                    since_ms: 7_000,
                    cycle: 8,
                    value: Some(19.5),
                    acknowledged_at_ms: None,
                }),
                drift: [(
                    "s2".to_owned(),
                    FeatureStatus {
                        severity: Severity::Warn,
                        flags: vec![Quality::OutOfRange],
                        shift: Some(2.25),
                        psi: None,
                    },
                )]
                .into(),
                input: Some(InputProblem { kind: "input_timeout".into(), since_ms: 3_000 }),
            }],
            ..Status::default()
        }
    }

    #[test]
    fn the_chart_scales_points_and_thresholds_into_the_frame() {
        let svg = chart(&points(&[100.0, 60.0, 10.0]), 50.0, 20.0, 2_000).unwrap();
        // The range 10..100 is padded by 4.5 each side into the plot's 150 px from y = 8:
        // 100 sits at 8 + 150 * 4.5 / 99 = 14.8, 10 at 8 + 150 * 94.5 / 99 = 151.2.
        assert!(svg.contains("points=\"44.0,14.8 320.0,75.4 596.0,151.2\""), "{svg}");
        assert!(svg.contains("y1=\"90.6\"") && svg.contains(">50</text>"), "warning line: {svg}");
        assert!(svg.contains("stroke-dasharray"), "{svg}");
        assert!(svg.contains(">2 s ago</text>") && svg.contains(">now</text>"), "{svg}");
        assert_eq!(chart(&points(&[1.0]), 50.0, 20.0, 0), None);
        assert_eq!(chart(&[], 50.0, 20.0, 0), None);
    }

    #[test]
    fn the_page_shows_uplink_down_the_alert_form_an_input_problem_and_drift_flags_escaped() {
        let history = [("unit-1".to_owned(), points(&[30.0, 18.25]))].into();
        let html = render(&status(), &history, 10_000);
        for want in [
            "<h1 id=\"device\">gw&lt;1&gt;</h1>",
            "Uplink DOWN — buffering locally",
            "12 records waiting",
            "9 s old",
            "data-level=\"alarm\"",
            "data-value=\"18.25\">18.2</span> cycles",
            "action=\"/alerts/unit-1/ack\"",
            "name=\"pin\"",
            "out_of_range",
            "<td>2.25</td>",
            "readings refused since 7 s ago (input_timeout): no predictions",
            "Drift: 1 feature(s) need a look.",
            "<polyline",
        ] {
            assert!(html.contains(want), "missing {want:?} in:\n{html}");
        }
        assert!(!html.contains("gw<1>"), "unescaped device id");
        assert!(!html.contains("http://") && !html.contains("https://"), "no external assets");
    }

    #[test]
    fn flagged_features_come_first_in_natural_order_and_quiet_ones_fold_away() {
        let feature = |severity, flags: Vec<Quality>| FeatureStatus {
            severity,
            flags,
            shift: None,
            psi: None,
        };
        let drift = [
            ("s10".to_owned(), feature(Severity::Drift, vec![])),
            ("s2".to_owned(), feature(Severity::Ok, vec![Quality::Stuck])),
            ("s3".to_owned(), feature(Severity::Ok, vec![])),
            ("s11".to_owned(), feature(Severity::Insufficient, vec![])),
        ]
        .into();
        let mut html = String::new();
        drift_table(&mut html, &drift);
        let order: Vec<usize> = ["<td>s2<", "<td>s10<", "<details>", "<td>s3<", "<td>s11<"]
            .iter()
            .map(|m| html.find(m).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{html}");
        assert!(
            html.contains("2 feature(s) need a look") && html.contains("<td>stuck</td>"),
            "{html}"
        );
        assert!(html.contains("2 feature(s) without drift"), "{html}");
    }

    #[test]
    fn an_acknowledged_alert_has_no_form_and_a_connected_uplink_says_so() {
        let mut s = status();
        s.uplink_connected = true;
        if let Some(alert) = &mut s.assets[0].alert {
            alert.acknowledged_at_ms = Some(9_500);
        }
        let html = render(&s, &BTreeMap::new(), 10_000);
        assert!(html.contains("Uplink connected"), "{html}");
        assert!(
            html.contains("data-acknowledged=\"true\"") && html.contains("Acknowledged 0 s ago")
        );
        assert!(!html.contains("<form"), "{html}");
    }
}
