//! Benchmark: what signatures cost. Prints the time to sign and to verify one uplink batch
//! (10 and 500 records), and the server's ingest rate (gate, decode, store in SQLite, ack
//! built and signed) with signatures on versus off, one transaction per message and in group
//! commits, measured in one run on real SQLite files.
//! Prints numbers and asserts nothing. `.ci/run` runs it from the test build (dependencies
//! optimised, the workspace's own code not); `cargo run --release -p millwright-tests --bin
//! bench-identity` gives release numbers.

use ed25519_dalek::SigningKey;
use millwright_server::db::{Db, Write, Written};
use millwright_server::identity::{Entry, Gate, Limits, Registry, Verdict};
use millwright_server::ingest;
use millwright_shared::signed::{self, Purpose};
use millwright_shared::wire::{
    self, Prediction, Record, RecordBody, Stream, UplinkBatch, WIRE_VERSION,
};
use millwright_shared::{AssetId, DeviceId, ModelName, Release};
use std::sync::{Arc, RwLock};
use std::time::Instant;

const DEVICES: usize = 100;
const MESSAGES: usize = 3000;

fn batch(device: &DeviceId, first: u64, records: u64) -> Vec<u8> {
    wire::encode(&UplinkBatch {
        v: WIRE_VERSION,
        device: device.clone(),
        epoch: "0123456789abcdef".into(),
        stream: Stream::Predictions,
        records: (first..first + records)
            .map(|seq| Record {
                seq,
                at_ms: 1_764_000_000_000 + seq as i64,
                body: RecordBody::Prediction(Prediction {
                    asset: AssetId::new("unit-12").unwrap_or_else(|_| unreachable!()),
                    cycle: 30 + seq,
                    model: ModelName::new("rul-cnn-fd001").unwrap_or_else(|_| unreachable!()),
                    release: Release(1),
                    value: 100.0 - seq as f32 * 0.01,
                }),
            })
            .collect(),
    })
}

fn per_call<T>(n: usize, mut f: impl FnMut() -> T) -> f64 {
    let started = Instant::now();
    for _ in 0..n {
        std::hint::black_box(f());
    }
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// Messages per second through the server's ingest path: the gate (signatures on) or a bare
/// decode (off), the store (one committed transaction per message, as the server does), and
/// the signed ack.
fn ingest_rate(
    signatures: bool,
    group: usize,
    server: &SigningKey,
    keys: &[SigningKey],
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut db = Db::open(&dir.path().join("server.sqlite"))?;
    let devices: Vec<DeviceId> =
        (0..DEVICES).map(|i| DeviceId::new(format!("gw-{i:04}"))).collect::<Result<_, _>>()?;
    let mut registry = Registry::default();
    for (d, k) in devices.iter().zip(keys) {
        registry.insert(d.clone(), Entry { key: k.verifying_key(), revoked: false });
    }
    let limits = Limits { burst: 1e9, per_sec: 1e9, queue: 0 };
    let mut gate = Gate::new(Arc::new(RwLock::new(registry)), limits);
    let up = Purpose::Uplink(Stream::Predictions);
    let messages: Vec<(usize, Vec<u8>)> = (0..MESSAGES)
        .map(|m| {
            let d = m % DEVICES;
            let body = batch(&devices[d], (m / DEVICES) as u64 * 10 + 1, 10);
            let payload =
                if signatures { signed::seal(&keys[d], up, &devices[d], &body) } else { body };
            (d, payload)
        })
        .collect();
    let started = Instant::now();
    for chunk in messages.chunks(group) {
        let mut accepted = Vec::with_capacity(chunk.len());
        for (d, payload) in chunk {
            let device = &devices[*d];
            let body = if signatures {
                match gate.admit(device, up, payload, 0) {
                    Verdict::Now(admitted) => admitted.body,
                    other => anyhow::bail!("refused: {other:?}"),
                }
            } else {
                payload.clone()
            };
            accepted.push(ingest::accept(device, Stream::Predictions, &body)?);
        }
        let writes: Vec<Write<'_>> = accepted.iter().map(Write::Batch).collect();
        for (a, written) in accepted.iter().zip(db.write_all(&writes, 0)?) {
            let Written::Batch(stored) = written else { anyhow::bail!("not a batch") };
            let ack = wire::encode(&stored.ack);
            if signatures {
                std::hint::black_box(signed::seal(server, Purpose::Ack, &a.device, &ack));
            }
        }
    }
    Ok(MESSAGES as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let device = DeviceId::new("gw-0001")?;
    let key = SigningKey::from_bytes(&[7; 32]);
    let up = Purpose::Uplink(Stream::Predictions);
    println!("signatures (ed25519 over the frame: domain, purpose, device, body)");
    for records in [10, 500] {
        let body = batch(&device, 1, records);
        let frame = signed::seal(&key, up, &device, &body);
        let sign = per_call(2000, || signed::seal(&key, up, &device, &body));
        let verify = per_call(2000, || signed::verify(&frame, &key.verifying_key(), up, &device));
        println!(
            "  batch of {records:>3} records ({:>6} bytes): sign {sign:>6.1} µs, verify {verify:>6.1} µs, \
             header {} bytes",
            body.len(),
            signed::HEADER_BYTES
        );
    }
    let server = SigningKey::from_bytes(&[21; 32]);
    let keys: Vec<SigningKey> =
        (0..DEVICES).map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32])).collect();
    println!(
        "server ingest, {MESSAGES} batches of 10 records from {DEVICES} devices, SQLite WAL FULL:"
    );
    for group in [1, 256] {
        let off = ingest_rate(false, group, &server, &keys)?;
        let on = ingest_rate(true, group, &server, &keys)?;
        let per = if group == 1 {
            "one transaction per message".into()
        } else {
            format!("group commit, {group} messages per transaction")
        };
        println!("  {per}:");
        println!("    signatures off: {off:>8.0} messages/s");
        println!("    signatures on:  {on:>8.0} messages/s ({:+.1} %)", (on / off - 1.0) * 100.0);
    }
    Ok(())
}
