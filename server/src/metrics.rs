//! Prometheus `/metrics` for the server, read at scrape time from the database and the shared
//! state (no counters to keep in step): devices online, records stored per stream, rollouts per
//! state, bundle bytes sent, retraining events, broker connection, what retention removed.

use crate::db::Db;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What a scrape reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub devices_online: u64,
    pub devices_offline: u64,
    /// (stream, records stored)
    pub records: Vec<(&'static str, u64)>,
    /// (stream, records devices dropped by policy, from their gap records)
    pub dropped: Vec<(String, u64)>,
    /// (state, rollouts)
    pub rollouts: Vec<(String, u64)>,
    pub bundle_bytes_sent: u64,
    pub retraining_events: u64,
    pub broker_connected: bool,
    /// The broker keeps the connection but acknowledges nothing.
    pub broker_stalled: bool,
    pub broker_stalls: u64,
    /// Publishes given up on a full client queue.
    pub publishes_dropped: u64,
    /// (reason, messages refused before anything acted on them)
    pub refused: Vec<(String, u64)>,
    /// Enrolled devices that are not revoked.
    pub enrolled: u64,
    /// Client addresses locked out after wrong API tokens.
    pub sign_in_lockouts: u64,
    /// Messages waiting for their device's budget.
    pub queued: u64,
    /// (kind, records retention removed since start)
    pub retention_removed: Vec<(&'static str, u64)>,
    /// Bundle chunks waiting to be sent.
    pub chunks_queued: u64,
}

type Labels = Vec<(&'static str, String)>;

/// Renders a snapshot in the Prometheus text format.
pub fn render(s: &Snapshot) -> String {
    let mut registry = Registry::with_prefix("millwright");
    let devices = Family::<Labels, Gauge>::default();
    devices.get_or_create(&vec![("online", "true".into())]).set(s.devices_online as i64);
    devices.get_or_create(&vec![("online", "false".into())]).set(s.devices_offline as i64);
    registry.register("devices", "Devices known to the server, by connection", devices);
    let records = Family::<Labels, Counter>::default();
    for (stream, n) in &s.records {
        records.get_or_create(&vec![("stream", (*stream).to_owned())]).inc_by(*n);
    }
    registry.register("records_stored", "Records stored (idempotently) per uplink stream", records);
    let dropped = Family::<Labels, Counter>::default();
    for (stream, n) in &s.dropped {
        dropped.get_or_create(&vec![("stream", stream.clone())]).inc_by(*n);
    }
    registry.register(
        "records_dropped_by_policy",
        "Records devices dropped by policy (outbox quota), announced in gap records, per stream",
        dropped,
    );
    let rollouts = Family::<Labels, Gauge>::default();
    for (state, n) in &s.rollouts {
        rollouts.get_or_create(&vec![("state", state.clone())]).set(*n as i64);
    }
    registry.register("rollouts", "Rollouts by state", rollouts);
    let bytes = Counter::<u64>::default();
    bytes.inc_by(s.bundle_bytes_sent);
    registry.register("bundle_bytes_sent", "Bundle chunk bytes sent to devices since start", bytes);
    let chunks = Gauge::<i64>::default();
    chunks.set(i64::try_from(s.chunks_queued).unwrap_or(i64::MAX));
    registry.register(
        "chunks_queued",
        "Bundle chunks devices asked for, waiting to be sent",
        chunks,
    );
    let events = Counter::<u64>::default();
    events.inc_by(s.retraining_events);
    registry.register("retraining_events", "Retraining recommendations raised", events);
    let broker = Gauge::<i64>::default();
    broker.set(i64::from(s.broker_connected));
    registry.register("broker_connected", "1 when the server's MQTT client is connected", broker);
    let stalled = Gauge::<i64>::default();
    stalled.set(i64::from(s.broker_stalled));
    registry.register(
        "broker_stalled",
        "1 while the broker keeps the connection but acknowledges no publish",
        stalled,
    );
    let stalls = Counter::<u64>::default();
    stalls.inc_by(s.broker_stalls);
    registry.register(
        "broker_stalls",
        "Connections dropped because the broker acknowledged no publish",
        stalls,
    );
    let given_up = Counter::<u64>::default();
    given_up.inc_by(s.publishes_dropped);
    registry.register(
        "publishes_dropped",
        "Publishes given up because the MQTT client's queue was full (devices resend)",
        given_up,
    );
    let refused = Family::<Labels, Counter>::default();
    for (reason, n) in &s.refused {
        refused.get_or_create(&vec![("reason", reason.clone())]).inc_by(*n);
    }
    registry.register(
        "refused",
        "Messages and connections refused before anything acted on them, by reason",
        refused,
    );
    let enrolled = Gauge::<i64>::default();
    enrolled.set(s.enrolled as i64);
    registry.register("enrolled_devices", "Enrolled devices that are not revoked", enrolled);
    let lockouts = Counter::<u64>::default();
    lockouts.inc_by(s.sign_in_lockouts);
    registry.register(
        "sign_in_lockouts",
        "Client addresses locked out after wrong tokens",
        lockouts,
    );
    let queued = Gauge::<i64>::default();
    queued.set(s.queued as i64);
    registry.register("queued_messages", "Messages waiting for their device's budget", queued);
    let removed = Family::<Labels, Counter>::default();
    for (kind, n) in &s.retention_removed {
        removed.get_or_create(&vec![("kind", (*kind).to_owned())]).inc_by(*n);
    }
    registry.register(
        "retention_removed",
        "Records retention removed since start, by kind (predictions are kept as hourly sums)",
        removed,
    );
    let mut out = String::new();
    if encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

/// Reads the database's part of a snapshot.
pub fn read(db: &Db) -> rusqlite::Result<Snapshot> {
    let devices = db.devices()?;
    let online = devices.iter().filter(|d| d.online).count() as u64;
    let count = |table: &str| -> rusqlite::Result<u64> {
        db.conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
    };
    let mut rollouts: Vec<(String, u64)> = Vec::new();
    for r in db.rollouts()? {
        let state = serde_json::to_value(r.state).ok().and_then(|v| v.as_str().map(str::to_owned));
        let state = state.unwrap_or_default();
        match rollouts.iter_mut().find(|(s, _)| *s == state) {
            Some((_, n)) => *n += 1,
            None => rollouts.push((state, 1)),
        }
    }
    let mut stmt =
        db.conn.prepare_cached("SELECT stream, SUM(dropped) FROM gaps GROUP BY stream")?;
    let dropped = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Snapshot {
        dropped,
        devices_online: online,
        devices_offline: devices.len() as u64 - online,
        records: db.stored_per_stream()?,
        rollouts,
        bundle_bytes_sent: 0,
        retraining_events: count("retraining_events")?,
        broker_connected: false,
        broker_stalled: false,
        broker_stalls: 0,
        publishes_dropped: 0,
        refused: Vec::new(),
        enrolled: 0,
        sign_in_lockouts: 0,
        queued: 0,
        retention_removed: Vec::new(),
        chunks_queued: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_renders_as_prometheus_text() {
        let text = render(&Snapshot {
            devices_online: 19,
            devices_offline: 1,
            records: vec![("pred", 1234)],
            dropped: vec![("pred".into(), 1072)],
            rollouts: vec![("completed".into(), 2)],
            bundle_bytes_sent: 270_063,
            retraining_events: 1,
            broker_connected: true,
            broker_stalled: false,
            broker_stalls: 2,
            publishes_dropped: 7,
            refused: vec![("bad_signature".into(), 3)],
            enrolled: 20,
            sign_in_lockouts: 2,
            queued: 0,
            retention_removed: vec![("predictions", 1130)],
            chunks_queued: 12,
        });
        for line in [
            "millwright_devices{online=\"true\"} 19",
            "millwright_devices{online=\"false\"} 1",
            "millwright_records_stored_total{stream=\"pred\"} 1234",
            "millwright_records_dropped_by_policy_total{stream=\"pred\"} 1072",
            "millwright_rollouts{state=\"completed\"} 2",
            "millwright_bundle_bytes_sent_total 270063",
            "millwright_retraining_events_total 1",
            "millwright_broker_connected 1",
            "millwright_broker_stalled 0",
            "millwright_broker_stalls_total 2",
            "millwright_publishes_dropped_total 7",
            "millwright_refused_total{reason=\"bad_signature\"} 3",
            "millwright_enrolled_devices 20",
            "millwright_sign_in_lockouts_total 2",
            "millwright_retention_removed_total{kind=\"predictions\"} 1130",
            "millwright_chunks_queued 12",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing in:\n{text}");
        }
    }
}
