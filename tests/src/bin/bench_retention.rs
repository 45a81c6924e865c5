//! Benchmark: retention beside ingest. A real SQLite file holds 100 devices' old predictions
//! (500,000 rows, received 40 days ago); the server's ingest path (decode, group commit of up
//! to 256 messages, ack) then stores 3,000 new batches of 10 records, once alone and once while
//! a retention pass ([`millwright_server::retention_db::pass`], on a connection of its own as
//! in the server) removes the old rows into hourly summaries. Prints ingest messages/s, the
//! slowest commit, and the pass's rows/s and longest transaction. Asserts nothing but that the
//! pass removed every old row. `.ci/run` runs it from the test build.

use millwright_server::db::{Db, Write};
use millwright_server::ingest;
use millwright_server::retention::{Policy, Report};
use millwright_shared::wire::{
    self, Prediction, Record, RecordBody, Stream, UplinkBatch, WIRE_VERSION,
};
use millwright_shared::{AssetId, DeviceId, ModelName, Release};
use std::path::Path;
use std::time::{Duration, Instant};

const DEVICES: usize = 100;
const OLD_PER_DEVICE: u64 = 5_000;
const MESSAGES: usize = 3_000;
const GROUP: usize = 256;
const DAY_MS: i64 = 86_400_000;

fn batch(device: &DeviceId, first: u64, records: u64, at_ms: i64) -> Vec<u8> {
    wire::encode(&UplinkBatch {
        v: WIRE_VERSION,
        device: device.clone(),
        epoch: "0123456789abcdef".into(),
        stream: Stream::Predictions,
        records: (first..first + records)
            .map(|seq| Record {
                seq,
                at_ms: at_ms + seq as i64 * 1_000,
                body: RecordBody::Prediction(Prediction {
                    asset: AssetId::new(format!("unit-{}", seq % 4))
                        .unwrap_or_else(|_| unreachable!()),
                    cycle: seq,
                    model: ModelName::new("rul-cnn-fd001").unwrap_or_else(|_| unreachable!()),
                    release: Release(1),
                    value: 100.0 - seq as f32 * 0.01,
                }),
            })
            .collect(),
    })
}

/// Stores `messages` through decode and group commit; messages/s and the slowest commit.
fn ingest(
    db: &mut Db,
    devices: &[DeviceId],
    messages: &[(usize, Vec<u8>)],
    now: i64,
) -> anyhow::Result<(f64, Duration)> {
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for chunk in messages.chunks(GROUP) {
        let accepted = chunk
            .iter()
            .map(|(d, body)| ingest::accept(&devices[*d], Stream::Predictions, body))
            .collect::<Result<Vec<_>, _>>()?;
        let writes: Vec<Write<'_>> = accepted.iter().map(Write::Batch).collect();
        let t = Instant::now();
        std::hint::black_box(db.write_all(&writes, now)?);
        slowest = slowest.max(t.elapsed());
    }
    Ok((messages.len() as f64 / started.elapsed().as_secs_f64(), slowest))
}

fn fill(path: &Path, devices: &[DeviceId], t0: i64) -> anyhow::Result<Vec<(usize, Vec<u8>)>> {
    let mut db = Db::open(path)?;
    let old: Vec<(usize, Vec<u8>)> = (0..DEVICES)
        .flat_map(|d| (0..OLD_PER_DEVICE / 500).map(move |k| (d, k)))
        .map(|(d, k)| (d, batch(&devices[d], k * 500 + 1, 500, t0)))
        .collect();
    ingest(&mut db, devices, &old, t0)?;
    // The new messages go on after the old ones.
    Ok((0..MESSAGES)
        .map(|m| {
            let d = m % DEVICES;
            let first = OLD_PER_DEVICE + (m / DEVICES) as u64 * 10 + 1;
            (d, batch(&devices[d], first, 10, t0 + 40 * DAY_MS))
        })
        .collect())
}

fn main() -> anyhow::Result<()> {
    let devices: Vec<DeviceId> =
        (0..DEVICES).map(|i| DeviceId::new(format!("gw-{i:04}"))).collect::<Result<_, _>>()?;
    let t0 = 1_764_000_000_000;
    let now = t0 + 40 * DAY_MS;
    let old_rows = DEVICES as u64 * OLD_PER_DEVICE;
    println!(
        "retention beside ingest: {old_rows} old predictions of {DEVICES} devices; ingest of \
         {MESSAGES} batches of 10 records, group commits of up to {GROUP}, SQLite WAL FULL"
    );

    let alone = tempfile::tempdir()?;
    let path = alone.path().join("server.sqlite");
    let messages = fill(&path, &devices, t0)?;
    let mut db = Db::open(&path)?;
    let (rate, slowest) = ingest(&mut db, &devices, &messages, now)?;
    println!(
        "  ingest alone:           {rate:>7.0} messages/s, slowest commit {:>5.1} ms",
        slowest.as_secs_f64() * 1e3
    );

    let beside = tempfile::tempdir()?;
    let path = beside.path().join("server.sqlite");
    let messages = fill(&path, &devices, t0)?;
    let mut db = Db::open(&path)?;
    let pruner = {
        let path = path.clone();
        std::thread::spawn(move || -> anyhow::Result<(Report, Duration)> {
            let mut db = Db::open(&path)?;
            let mut report = Report::default();
            let started = Instant::now();
            millwright_server::retention_db::pass(
                &mut db,
                &Policy::default().cutoffs(now),
                millwright_server::retention_db::PAUSE,
                &mut report,
            )?;
            Ok((report, started.elapsed()))
        })
    };
    let (rate, slowest) = ingest(&mut db, &devices, &messages, now)?;
    println!(
        "  ingest beside the pass: {rate:>7.0} messages/s, slowest commit {:>5.1} ms",
        slowest.as_secs_f64() * 1e3
    );
    let (report, took) = pruner.join().map_err(|_| anyhow::anyhow!("the pass panicked"))??;
    println!(
        "  the pass: {} predictions removed into their hours in {:.1} s ({:.0} rows/s, {} rows \
         per transaction, {:?} between), longest transaction {} ms",
        report.predictions,
        took.as_secs_f64(),
        report.predictions as f64 / took.as_secs_f64(),
        millwright_server::retention_db::CHUNK,
        millwright_server::retention_db::PAUSE,
        report.longest_transaction_ms
    );
    anyhow::ensure!(
        report.predictions == old_rows,
        "the pass removed {} of {old_rows}",
        report.predictions
    );
    Ok(())
}
