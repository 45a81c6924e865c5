//! The SQLite outbox: the agent's source of truth for everything not yet acknowledged.
//!
//! Records get their per-stream sequence number inside the same transaction that stores them
//! and the asset cursors they advance, so after a crash the outbox, the numbering and the replay
//! position agree. WAL with `synchronous=FULL`: a committed batch survives power loss.

use crate::asset::Cursor;
use millwright_shared::AssetId;
use millwright_shared::wire::{Level, Record, RecordBody, Stream};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("outbox database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("outbox holds a record that does not decode: {0}")]
    Corrupt(String),
}

pub struct Store {
    pub(crate) conn: Connection,
}

/// A record produced but not yet stored.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub at_ms: i64,
    pub body: RecordBody,
}

/// Outbox depth per stream and the age of its oldest record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    pub records: u64,
    pub oldest_at_ms: Option<i64>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    stream TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    at_ms  INTEGER NOT NULL,
    body   TEXT NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sequences (
    stream   TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    asset TEXT PRIMARY KEY,
    cycle INTEGER NOT NULL,
    level TEXT NOT NULL
);
";

/// Numbers and stores `records` and the `cursors` they advance inside `tx`.
pub(crate) fn append_in(
    tx: &Connection,
    records: &[NewRecord],
    cursors: &[(AssetId, Cursor)],
) -> Result<(), StoreError> {
    let mut next: HashMap<Stream, u64> = HashMap::new();
    let mut last_seq = tx.prepare_cached("SELECT last_seq FROM sequences WHERE stream = ?1")?;
    let mut insert =
        tx.prepare_cached("INSERT INTO outbox (stream, seq, at_ms, body) VALUES (?1, ?2, ?3, ?4)")?;
    for record in records {
        let stream = record.body.stream();
        let seq = match next.get(&stream) {
            Some(seq) => *seq,
            None => {
                let last: Option<u64> =
                    last_seq.query_row([stream.as_str()], |r| r.get(0)).optional()?;
                last.unwrap_or(0) + 1
            }
        };
        let body =
            serde_json::to_string(&record.body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        insert.execute(params![stream.as_str(), seq, record.at_ms, body])?;
        next.insert(stream, seq + 1);
    }
    let mut save = tx.prepare_cached(
        "INSERT INTO sequences (stream, last_seq) VALUES (?1, ?2)
         ON CONFLICT (stream) DO UPDATE SET last_seq = excluded.last_seq",
    )?;
    for (stream, next) in next {
        save.execute(params![stream.as_str(), next - 1])?;
    }
    let mut cursor = tx.prepare_cached(
        "INSERT INTO cursors (asset, cycle, level) VALUES (?1, ?2, ?3)
         ON CONFLICT (asset) DO UPDATE SET cycle = excluded.cycle, level = excluded.level",
    )?;
    for (asset, c) in cursors {
        cursor.execute(params![asset.as_str(), c.cycle, c.level.as_str()])?;
    }
    Ok(())
}

fn level_from(s: &str) -> Level {
    match s {
        "alarm" => Level::Alarm,
        "warning" => Level::Warning,
        _ => Level::Ok,
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(crate::update_state::SCHEMA)?;
        Ok(Store { conn })
    }

    /// Stores `records` and the `cursors` they advance in one transaction; returns how many
    /// records were stored per stream.
    pub fn append(
        &mut self,
        records: &[NewRecord],
        cursors: &[(AssetId, Cursor)],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        append_in(&tx, records, cursors)?;
        tx.commit()?;
        Ok(())
    }

    /// Up to `limit` records of `stream` with a sequence number above `after`, in order.
    pub fn read(
        &self,
        stream: Stream,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, at_ms, body FROM outbox WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![stream.as_str(), after, limit as i64], |r| {
            Ok((r.get::<_, u64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, at_ms, body) = row?;
            let body: RecordBody = serde_json::from_str(&body)
                .map_err(|e| StoreError::Corrupt(format!("{} seq {seq}: {e}", stream.as_str())))?;
            out.push(Record { seq, at_ms, body });
        }
        Ok(out)
    }

    /// Deletes what the server acknowledged (the caller passes only ranges that were in flight);
    /// returns how many records went.
    pub fn delete(&mut self, stream: Stream, ranges: &[(u64, u64)]) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let mut deleted = 0;
        {
            let mut stmt = tx
                .prepare_cached("DELETE FROM outbox WHERE stream = ?1 AND seq BETWEEN ?2 AND ?3")?;
            for &(first, last) in ranges {
                deleted += stmt.execute(params![stream.as_str(), first, last])?;
            }
        }
        tx.commit()?;
        Ok(deleted)
    }

    pub fn cursors(&self) -> Result<HashMap<AssetId, Cursor>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT asset, cycle, level FROM cursors")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?, r.get::<_, String>(2)?))
        })?;
        let mut out = HashMap::new();
        for row in rows {
            let (asset, cycle, level) = row?;
            let asset = AssetId::new(asset).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.insert(asset, Cursor { cycle, level: level_from(&level) });
        }
        Ok(out)
    }

    pub fn backlog(&self, stream: Stream) -> Result<Backlog, StoreError> {
        let (records, oldest_at_ms) = self.conn.query_row(
            "SELECT COUNT(*), MIN(at_ms) FROM outbox WHERE stream = ?1",
            [stream.as_str()],
            |r| Ok((r.get::<_, u64>(0)?, r.get::<_, Option<i64>>(1)?)),
        )?;
        Ok(Backlog { records, oldest_at_ms })
    }

    /// The last sequence number given out on `stream` (0 before the first).
    pub fn last_seq(&self, stream: Stream) -> Result<u64, StoreError> {
        let last: Option<u64> = self
            .conn
            .query_row("SELECT last_seq FROM sequences WHERE stream = ?1", [stream.as_str()], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(last.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millwright_shared::wire::Prediction;
    use millwright_shared::{ModelName, Release};

    fn prediction(cycle: u64) -> NewRecord {
        NewRecord {
            at_ms: cycle as i64,
            body: RecordBody::Prediction(Prediction {
                asset: AssetId::new("u1").unwrap(),
                cycle,
                model: ModelName::new("m").unwrap(),
                release: Release(1),
                value: cycle as f32,
            }),
        }
    }

    #[test]
    fn outbox_numbers_records_without_gaps_across_reopen_and_deletes_only_acked_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        let asset = AssetId::new("u1").unwrap();
        {
            let mut store = Store::open(&path).unwrap();
            let batch: Vec<_> = (1..=3).map(prediction).collect();
            store
                .append(&batch, &[(asset.clone(), Cursor { cycle: 3, level: Level::Ok })])
                .unwrap();
            store.delete(Stream::Predictions, &[(1, 2)]).unwrap();
        }
        let mut store = Store::open(&path).unwrap();
        store
            .append(
                &[prediction(4)],
                &[(asset.clone(), Cursor { cycle: 4, level: Level::Warning })],
            )
            .unwrap();
        let left: Vec<u64> =
            store.read(Stream::Predictions, 0, 10).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(left, vec![3, 4]);
        assert_eq!(store.last_seq(Stream::Predictions).unwrap(), 4);
        assert_eq!(
            store.backlog(Stream::Predictions).unwrap(),
            Backlog { records: 2, oldest_at_ms: Some(3) }
        );
        assert_eq!(store.cursors().unwrap()[&asset], Cursor { cycle: 4, level: Level::Warning });
        assert_eq!(store.read(Stream::Predictions, 3, 10).unwrap().len(), 1);
    }
}
