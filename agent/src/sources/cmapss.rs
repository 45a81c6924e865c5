//! C-MAPSS replay: each file is read and parsed once; each asset replaying one of its units
//! gets a task paced in cycles per second.

use super::SourceEvent;
use crate::cmapss::{self, Row};
use crate::reading::{Reading, Sample};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// One asset replaying one unit of a C-MAPSS file.
#[derive(Debug, Clone)]
pub struct CmapssReplay {
    pub asset: usize,
    pub unit: u32,
    pub cycles_per_second: f64,
    /// Column indices of the asset's monitored features.
    pub columns: Vec<usize>,
    /// Rows up to this cycle were processed before a restart: send them unpaced.
    pub resume_after: Option<u64>,
}

/// Reads and parses `path` once, then replays one unit per entry of `replays`.
pub fn spawn(path: PathBuf, replays: Vec<CmapssReplay>, events: mpsc::Sender<SourceEvent>) {
    tokio::spawn(async move {
        let rows = match read(&path).await {
            Ok(rows) => Arc::new(rows),
            Err(error) => {
                for r in replays {
                    let _ = events
                        .send(SourceEvent::Failed { asset: r.asset, error: error.clone() })
                        .await;
                }
                return;
            }
        };
        for replay in replays {
            let (rows, events, path) = (rows.clone(), events.clone(), path.clone());
            tokio::spawn(async move {
                let asset = replay.asset;
                let event = match run_unit(&rows, replay, &events).await {
                    Ok(()) => SourceEvent::Done { asset },
                    Err(unit) => SourceEvent::Failed {
                        asset,
                        error: format!("{} has no unit {unit}", path.display()),
                    },
                };
                let _ = events.send(event).await;
            });
        }
    });
}

async fn read(path: &std::path::Path) -> Result<Vec<Row>, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    cmapss::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Sends the unit's rows; `Err(unit)` if the file has none.
async fn run_unit(
    rows: &[Row],
    r: CmapssReplay,
    events: &mpsc::Sender<SourceEvent>,
) -> Result<(), u32> {
    let rows: Vec<&Row> = rows.iter().filter(|row| row.unit == r.unit).collect();
    if rows.is_empty() {
        return Err(r.unit);
    }
    let mut pace = (r.cycles_per_second > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r.cycles_per_second));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    for row in rows {
        let catching_up = r.resume_after.is_some_and(|c| row.cycle <= c);
        if let (Some(pace), false) = (pace.as_mut(), catching_up) {
            pace.tick().await;
        }
        let samples = r.columns.iter().map(|&c| Sample::Value(row.values[c] as f32)).collect();
        let reading = Reading { cycle: Some(row.cycle), samples };
        let reading = SourceEvent::Reading { asset: r.asset, reading };
        if events.send(reading).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}
