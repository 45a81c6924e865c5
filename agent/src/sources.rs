//! Input sources that are files: C-MAPSS replay, one task per asset, paced in cycles per second.

use crate::cmapss;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug)]
pub enum SourceEvent {
    Reading { asset: usize, cycle: Option<u64>, values: Vec<f32> },
    Done { asset: usize },
    Failed { asset: usize, error: String },
}

#[derive(Debug, Clone)]
pub struct CmapssReplay {
    pub asset: usize,
    pub path: PathBuf,
    pub unit: u32,
    pub cycles_per_second: f64,
    /// Column indices of the model's features.
    pub columns: Vec<usize>,
    /// Rows up to this cycle were processed before a restart: send them unpaced.
    pub resume_after: Option<u64>,
}

pub fn spawn_cmapss(replay: CmapssReplay, events: mpsc::Sender<SourceEvent>) {
    tokio::spawn(async move {
        let asset = replay.asset;
        let event = match run_cmapss(replay, &events).await {
            Ok(()) => SourceEvent::Done { asset },
            Err(error) => SourceEvent::Failed { asset, error },
        };
        let _ = events.send(event).await;
    });
}

async fn run_cmapss(r: CmapssReplay, events: &mpsc::Sender<SourceEvent>) -> Result<(), String> {
    let text = tokio::fs::read_to_string(&r.path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", r.path.display()))?;
    let rows = cmapss::parse(&text).map_err(|e| format!("{}: {e}", r.path.display()))?;
    let rows: Vec<_> = rows.into_iter().filter(|row| row.unit == r.unit).collect();
    if rows.is_empty() {
        return Err(format!("{} has no unit {}", r.path.display(), r.unit));
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
        let values = r.columns.iter().map(|&c| row.values[c] as f32).collect();
        let reading = SourceEvent::Reading { asset: r.asset, cycle: Some(row.cycle), values };
        if events.send(reading).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}
