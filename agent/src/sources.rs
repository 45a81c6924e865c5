//! The one way in for readings: every input source runs as its own task and sends
//! [`SourceEvent`]s, a [`Reading`] per sample time with one sample per monitored feature of
//! its asset. The agent loop treats a reading the same whatever its source. A source that
//! cannot read a value (a PLC that times out, refuses or is gone) sends the reading anyway,
//! with that feature unavailable and why: data quality counts it, and the source keeps trying.
//!
//! The adapters: C-MAPSS replay ([`cmapss`]), Modbus TCP polling ([`modbus`], its register maps
//! in [`registers`]). JSON readings on an MQTT topic arrive on the uplink connection and are
//! parsed in `reading.rs`.

pub mod cmapss;
pub mod modbus;
pub mod registers;

use crate::reading::Reading;

#[derive(Debug)]
pub enum SourceEvent {
    Reading { asset: usize, reading: Reading },
    Done { asset: usize },
    Failed { asset: usize, error: String },
}
