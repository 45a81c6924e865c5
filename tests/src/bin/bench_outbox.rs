//! Benchmark: the outbox. Prints the batched append rate (group commits of 1,000 predictions
//! into a real SQLite file, WAL with `synchronous=FULL`, as the agent's flush does) and the
//! drain rate of a one-hour backlog through the code a drain runs: the agent reads a batch of
//! 500 from its outbox, encodes and signs it; the server verifies, decodes, stores it (one
//! committed transaction) and signs the ack; the agent verifies the ack and deletes the batch.
//! The MQTT transport and TLS are not in it. Compares the drain rate with the rate the
//! backlog accumulated at. Prints numbers and asserts nothing.

use ed25519_dalek::SigningKey;
use millwright_agent::store::{NewRecord, Store};
use millwright_server::db::Db;
use millwright_server::identity::{Entry, Gate, Limits, Registry, Verdict};
use millwright_server::ingest;
use millwright_shared::signed::{self, Purpose};
use millwright_shared::wire::{
    self, Ack, Prediction, RecordBody, Stream, UplinkBatch, WIRE_VERSION,
};
use millwright_shared::{AssetId, DeviceId, ModelName, Release};
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// A busy gateway: 10 assets, a prediction per asset per second.
const ACCUMULATION_PER_SEC: u64 = 10;
const APPEND_RECORDS: u64 = 200_000;
const GROUP: u64 = 1000;
const BATCH: usize = 500;

fn prediction(i: u64) -> NewRecord {
    NewRecord {
        at_ms: 1_764_000_000_000 + i as i64 * 100,
        body: RecordBody::Prediction(Prediction {
            asset: AssetId::new(format!("unit-{}", i % 10)).unwrap_or_else(|_| unreachable!()),
            cycle: 30 + i / 10,
            model: ModelName::new("rul-cnn-fd001").unwrap_or_else(|_| unreachable!()),
            release: Release(1),
            value: 100.0 - (i % 1000) as f32 * 0.07,
        }),
    }
}

fn fill(store: &mut Store, records: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut next = 0;
    while next < records {
        let group: Vec<NewRecord> = (next..(next + GROUP).min(records)).map(prediction).collect();
        store.append(&group, &[])?;
        next += GROUP;
    }
    Ok(records as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    println!("outbox append, groups of {GROUP} predictions, SQLite WAL synchronous=FULL:");
    let mut store = Store::open(&dir.path().join("append.sqlite"))?;
    let rate = fill(&mut store, APPEND_RECORDS)?;
    println!("  {APPEND_RECORDS} records: {rate:>9.0} records/s");

    let backlog = ACCUMULATION_PER_SEC * 3600;
    let mut store = Store::open(&dir.path().join("outbox.sqlite"))?;
    fill(&mut store, backlog)?;
    let device = DeviceId::new("gw-0001")?;
    let device_key = SigningKey::from_bytes(&[7; 32]);
    let server_key = SigningKey::from_bytes(&[21; 32]);
    let mut registry = Registry::default();
    registry.insert(device.clone(), Entry { key: device_key.verifying_key(), revoked: false });
    let limits = Limits { burst: 1e9, per_sec: 1e9, queue: 0 };
    let mut gate = Gate::new(Arc::new(RwLock::new(registry)), limits);
    let mut db = Db::open(&dir.path().join("server.sqlite"))?;
    let up = Purpose::Uplink(Stream::Predictions);
    let started = Instant::now();
    let (mut drained, mut messages) = (0u64, 0u64);
    loop {
        let records = store.read(Stream::Predictions, 0, u64::MAX, BATCH)?.records;
        if records.is_empty() {
            break;
        }
        let body = wire::encode(&UplinkBatch {
            v: WIRE_VERSION,
            device: device.clone(),
            epoch: "0123456789abcdef".into(),
            stream: Stream::Predictions,
            records,
        });
        let frame = signed::seal(&device_key, up, &device, &body);
        let admitted = match gate.admit(&device, up, &frame, 0) {
            Verdict::Now(admitted) => admitted.body,
            other => anyhow::bail!("refused: {other:?}"),
        };
        let accepted = ingest::accept(&device, Stream::Predictions, &admitted)?;
        let ack = db.store(&accepted, 0)?.ack;
        let ack_frame = signed::seal(&server_key, Purpose::Ack, &device, &wire::encode(&ack));
        let ack_body =
            signed::verify(&ack_frame, &server_key.verifying_key(), Purpose::Ack, &device)?;
        let ack = Ack::decode(ack_body)?;
        drained += store.delete(Stream::Predictions, &ack.ranges)? as u64;
        messages += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = drained as f64 / secs;
    println!(
        "drain of a one-hour backlog ({backlog} predictions accumulated at \
         {ACCUMULATION_PER_SEC} records/s), batches of {BATCH}:"
    );
    println!(
        "  {drained} records in {messages} messages, {secs:.2} s: {rate:>9.0} records/s = {:.0}x \
         the accumulation rate (an hour's backlog drains in {:.1} s)",
        rate / ACCUMULATION_PER_SEC as f64,
        secs
    );
    Ok(())
}
