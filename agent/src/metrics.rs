//! Prometheus text exposition (format 0.0.4) of a [`Status`] snapshot, and the inference
//! latency histogram the event loop fills. Pure.
//!
//! Formatted by hand rather than through `prometheus-client`: every value already lives in the
//! snapshot the loop publishes, so a scrape is one pure function of it, with no second set of
//! live metric handles to keep in step.

use crate::status::Status;
use millwright_shared::drift::Severity;
use millwright_shared::wire::Level;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Upper bounds of the latency buckets, in microseconds (`+Inf` is implicit).
pub const LATENCY_BUCKETS_US: [u64; 12] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000];

/// Inference latencies: counts per bucket (not cumulative), their sum and count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    pub buckets: Vec<u64>,
    pub sum_us: u64,
    pub count: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: vec![0; LATENCY_BUCKETS_US.len()], sum_us: 0, count: 0 }
    }
}

impl LatencyHistogram {
    pub fn observe(&mut self, us: u64) {
        if let Some(i) = LATENCY_BUCKETS_US.iter().position(|&b| us <= b)
            && let Some(n) = self.buckets.get_mut(i)
        {
            *n += 1;
        }
        self.sum_us = self.sum_us.saturating_add(us);
        self.count += 1;
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn level_value(level: Level) -> u8 {
    match level {
        Level::Ok => 0,
        Level::Warning => 1,
        Level::Alarm => 2,
    }
}

fn severity_value(severity: Severity) -> i8 {
    match severity {
        Severity::Insufficient => -1,
        Severity::Ok => 0,
        Severity::Warn => 1,
        Severity::Drift => 2,
    }
}

/// The snapshot as Prometheus text; `now_ms` dates the backlog's age.
pub fn render(status: &Status, now_ms: i64) -> String {
    let mut out = String::new();
    let h = &status.inference_latency;
    header(
        &mut out,
        "millwright_inference_latency_seconds",
        "histogram",
        "Time to run one window through the serving model.",
    );
    let mut cumulative = 0;
    for (bound, n) in LATENCY_BUCKETS_US.iter().zip(&h.buckets) {
        cumulative += n;
        let le = *bound as f64 / 1e6;
        let _ = writeln!(
            out,
            "millwright_inference_latency_seconds_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(out, "millwright_inference_latency_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "millwright_inference_latency_seconds_sum {}", h.sum_us as f64 / 1e6);
    let _ = writeln!(out, "millwright_inference_latency_seconds_count {}", h.count);

    header(&mut out, "millwright_outbox_depth", "gauge", "Unacknowledged outbox records.");
    for (stream, n) in &status.backlog {
        let _ = writeln!(out, "millwright_outbox_depth{{stream=\"{}\"}} {n}", label(stream));
    }
    header(
        &mut out,
        "millwright_outbox_oldest_age_seconds",
        "gauge",
        "Age of the oldest unacknowledged record (0 when the outbox is empty).",
    );
    let age = status.oldest_unacked_at_ms.map_or(0, |t| (now_ms - t).max(0));
    let _ = writeln!(out, "millwright_outbox_oldest_age_seconds {}", age as f64 / 1e3);
    header(&mut out, "millwright_buffer_bytes", "gauge", "Bytes under the data directory.");
    let _ = writeln!(out, "millwright_buffer_bytes {}", status.disk_bytes);
    header(&mut out, "millwright_uplink_connected", "gauge", "1 while the MQTT uplink is up.");
    let _ = writeln!(out, "millwright_uplink_connected {}", u8::from(status.uplink_connected));
    header(&mut out, "millwright_uptime_seconds", "gauge", "Seconds since the agent started.");
    let uptime = (status.at_ms - status.started_at_ms).max(0) as f64 / 1e3;
    let _ = writeln!(out, "millwright_uptime_seconds {uptime}");

    header(
        &mut out,
        "millwright_readings_rejected_total",
        "counter",
        "Readings dropped before the model, by reason.",
    );
    for (kind, n) in &status.counters.readings_rejected {
        let _ = writeln!(out, "millwright_readings_rejected_total{{kind=\"{}\"}} {n}", label(kind));
    }
    header(
        &mut out,
        "millwright_refused_total",
        "counter",
        "Messages refused before they were acted on, by reason (forged, unsigned, replayed).",
    );
    for (reason, n) in &status.counters.refused {
        let _ = writeln!(out, "millwright_refused_total{{reason=\"{}\"}} {n}", label(reason));
    }
    header(
        &mut out,
        "millwright_clock_untrusted",
        "gauge",
        "1 while the wall clock is behind the time floor.",
    );
    let _ = writeln!(out, "millwright_clock_untrusted {}", u8::from(status.clock.untrusted));
    header(
        &mut out,
        "millwright_outbox_quarantined_records",
        "gauge",
        "Outbox rows that did not decode, quarantined and never sent.",
    );
    let _ = writeln!(out, "millwright_outbox_quarantined_records {}", status.outbox_quarantined);
    header(
        &mut out,
        "millwright_records_dropped_total",
        "counter",
        "Records dropped by the outbox quota, per stream (announced to the server as gaps).",
    );
    for (stream, n) in &status.dropped {
        let _ =
            writeln!(out, "millwright_records_dropped_total{{stream=\"{}\"}} {n}", label(stream));
    }
    header(&mut out, "millwright_outbox_bytes", "gauge", "Bytes the outbox's records take.");
    let _ = writeln!(out, "millwright_outbox_bytes {}", status.outbox_bytes);
    header(&mut out, "millwright_outbox_max_bytes", "gauge", "The outbox quota.");
    let _ = writeln!(out, "millwright_outbox_max_bytes {}", status.outbox_max_bytes);
    header(
        &mut out,
        "millwright_outbox_dead_letters",
        "gauge",
        "Records the server refused for good, kept as dead letters.",
    );
    let _ = writeln!(out, "millwright_outbox_dead_letters {}", status.outbox_dead_letters);
    header(
        &mut out,
        "millwright_outbox_set_aside",
        "gauge",
        "1 if the outbox was corrupt at start and a fresh one was started.",
    );
    let _ = writeln!(
        out,
        "millwright_outbox_set_aside {}",
        u8::from(status.outbox_set_aside.is_some())
    );
    let c = &status.counters;
    for (name, help, value) in [
        ("pin_lockouts", "Client addresses locked out after wrong operator PINs.", c.pin_lockouts),
        ("readings", "Readings accepted for inference.", c.readings),
        ("predictions", "Predictions made.", c.predictions),
        ("inference_failures", "Windows the model failed on.", c.inference_failures),
        ("alerts", "Health level changes.", c.alerts),
        ("alerts_acknowledged", "Alerts acknowledged on the local page.", c.alerts_acknowledged),
        ("records_stored", "Records committed to the outbox.", c.records_stored),
        ("records_acked", "Records the server acknowledged.", c.records_acked),
        ("store_errors", "Failed outbox commits.", c.store_errors),
        (
            "records_unstored",
            "Predictions not kept while outbox commits failed (a full disk).",
            c.records_unstored,
        ),
        (
            "records_dead_lettered",
            "Records the server refused for good, moved to the dead letters.",
            c.records_dead_lettered,
        ),
        ("batches_sent", "Uplink batches published.", c.batches_sent),
        ("resends", "Uplink batches sent again after a late ack.", c.resends),
        ("reconnects", "Uplink connections lost.", c.reconnects),
        (
            "uplink_stalls",
            "Uplink connections dropped because the broker acknowledged no publish.",
            c.uplink_stalls,
        ),
        ("drift_reports", "Drift reports closed.", c.drift_reports),
        ("updates_committed", "Model updates committed.", c.updates_committed),
        ("updates_rejected", "Model updates refused.", c.updates_rejected),
        ("updates_reverted", "Model updates reverted.", c.updates_reverted),
        ("chunks_received", "Bundle chunks accepted.", c.chunks_received),
        ("chunks_refused", "Bundle chunks refused.", c.chunks_refused),
    ] {
        let name = format!("millwright_{name}_total");
        header(&mut out, &name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    header(&mut out, "millwright_update_in_progress", "gauge", "1 while a model update runs.");
    let _ = writeln!(out, "millwright_update_in_progress {}", u8::from(status.update.is_some()));

    header(&mut out, "millwright_asset_level", "gauge", "Health: 0 ok, 1 warning, 2 alarm.");
    for a in &status.assets {
        let _ = writeln!(
            out,
            "millwright_asset_level{{asset=\"{}\"}} {}",
            label(&a.asset),
            level_value(a.level)
        );
    }
    header(
        &mut out,
        "millwright_input_refused_seconds",
        "gauge",
        "How long the asset's readings have been refused (0: they are complete), by the last kind.",
    );
    for a in &status.assets {
        let (kind, secs) = match &a.input {
            Some(p) => (p.kind.as_str(), (now_ms - p.since_ms).max(0) as f64 / 1000.0),
            None => ("", 0.0),
        };
        let _ = writeln!(
            out,
            "millwright_input_refused_seconds{{asset=\"{}\",kind=\"{}\"}} {secs}",
            label(&a.asset),
            label(kind)
        );
    }
    header(&mut out, "millwright_prediction", "gauge", "The latest model output per asset.");
    for a in &status.assets {
        if let Some(p) = a.latest {
            let _ =
                writeln!(out, "millwright_prediction{{asset=\"{}\"}} {}", label(&a.asset), p.value);
        }
    }
    header(
        &mut out,
        "millwright_drift_severity",
        "gauge",
        "Last drift verdict: -1 insufficient, 0 ok, 1 warn, 2 drift.",
    );
    for a in &status.assets {
        for (feature, f) in &a.drift {
            let _ = writeln!(
                out,
                "millwright_drift_severity{{asset=\"{}\",feature=\"{}\"}} {}",
                label(&a.asset),
                label(feature),
                severity_value(f.severity)
            );
        }
    }
    for (metric, help, pick) in [
        ("shift", "Last interval's mean shift in training standard deviations.", 0),
        ("psi", "Last interval's population stability index.", 1),
    ] {
        let name = format!("millwright_drift_{metric}");
        header(&mut out, &name, "gauge", help);
        for a in &status.assets {
            for (feature, f) in &a.drift {
                let value = if pick == 0 { f.shift } else { f.psi };
                if let Some(v) = value.filter(|v| v.is_finite()) {
                    let _ = writeln!(
                        out,
                        "{name}{{asset=\"{}\",feature=\"{}\"}} {v}",
                        label(&a.asset),
                        label(feature)
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{AssetStatus, FeatureStatus, InputProblem, Point};

    #[test]
    fn latencies_land_in_the_first_bucket_that_holds_them() {
        let mut h = LatencyHistogram::default();
        for us in [10, 50, 51, 300, 1_000_000] {
            h.observe(us);
        }
        assert_eq!(&h.buckets[..4], &[2, 1, 0, 1]);
        assert_eq!(h.buckets.iter().sum::<u64>(), 4, "1 s is only in +Inf");
        assert_eq!((h.count, h.sum_us), (5, 1_000_411));
    }

    #[test]
    fn the_exposition_has_cumulative_buckets_backlog_drift_and_escaped_labels() {
        let mut status = Status {
            at_ms: 5_000,
            started_at_ms: 1_000,
            backlog: [("pred".to_owned(), 7)].into(),
            oldest_unacked_at_ms: Some(2_000),
            ..Status::default()
        };
        status.inference_latency.observe(40);
        status.inference_latency.observe(400);
        status.counters.reconnects = 3;
        status.counters.readings_rejected.insert("non_finite".into(), 2);
        status.assets.push(AssetStatus {
            asset: "unit-\"1\"".into(),
            level: millwright_shared::wire::Level::Warning,
            model: "m".into(),
            release: 1,
            output: String::new(),
            units: String::new(),
            warning: 50.0,
            alarm: 20.0,
            latest: Some(Point { at_ms: 0, cycle: 1, value: 42.5 }),
            alert: None,
            drift: [(
                "s2".to_owned(),
                FeatureStatus {
                    severity: Severity::Warn,
                    flags: vec![],
                    shift: Some(2.5),
                    psi: Some(0.125),
                },
            )]
            .into(),
            input: Some(InputProblem { kind: "input_timeout".into(), since_ms: 2_500 }),
        });
        let text = render(&status, 6_000);
        for want in [
            "millwright_inference_latency_seconds_bucket{le=\"0.00005\"} 1\n",
            "millwright_inference_latency_seconds_bucket{le=\"0.0005\"} 2\n",
            "millwright_inference_latency_seconds_bucket{le=\"+Inf\"} 2\n",
            "millwright_inference_latency_seconds_sum 0.00044\n",
            "millwright_outbox_depth{stream=\"pred\"} 7\n",
            "millwright_outbox_oldest_age_seconds 4\n",
            "millwright_uptime_seconds 4\n",
            "millwright_reconnects_total 3\n",
            "millwright_readings_rejected_total{kind=\"non_finite\"} 2\n",
            "millwright_asset_level{asset=\"unit-\\\"1\\\"\"} 1\n",
            "millwright_prediction{asset=\"unit-\\\"1\\\"\"} 42.5\n",
            "millwright_input_refused_seconds{asset=\"unit-\\\"1\\\"\",kind=\"input_timeout\"} 3.5\n",
            "millwright_drift_shift{asset=\"unit-\\\"1\\\"\",feature=\"s2\"} 2.5\n",
            "millwright_drift_psi{asset=\"unit-\\\"1\\\"\",feature=\"s2\"} 0.125\n",
            "millwright_drift_severity{asset=\"unit-\\\"1\\\"\",feature=\"s2\"} 1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // Every sample line belongs to a declared metric.
        let declared: Vec<&str> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name.trim_end_matches("_bucket").trim_end_matches("_sum");
            let base = base.trim_end_matches("_count");
            assert!(declared.contains(&base) || declared.contains(&name), "undeclared {line}");
        }
    }
}
