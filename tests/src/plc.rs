//! PLCs for the scenarios: `tests/servers/modbus_plc.py`, a pymodbus TCP server on a free port,
//! playing rows of C-MAPSS values through a register map, one row per poll.
//!
//! The Python that runs it is `$MILLWRIGHT_TEST_PYTHON`, else `target/py/bin/python3`, the
//! virtual environment `scripts/test` makes with the pinned pymodbus. Without it a scenario
//! fails and says how to get it; none is skipped.

use crate::{Proc, free_port, repo_file, wait_until};
use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The Python with the test servers' packages, checked once.
pub fn python() -> anyhow::Result<PathBuf> {
    let python = std::env::var_os("MILLWRIGHT_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_file("target/py/bin/python3"));
    let ok =
        Command::new(&python).args(["-c", "import pymodbus"]).status().is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "{} cannot import pymodbus: run scripts/test (it makes target/py with the test \
             servers' packages) or point MILLWRIGHT_TEST_PYTHON at a Python that has them",
            python.display()
        );
    }
    Ok(python)
}

/// One register of a plan, as the agent's config and the PLC both read it.
#[derive(Debug, Clone)]
pub struct PlcRegister {
    pub feature: &'static str,
    pub table: &'static str,
    pub address: u16,
    pub value_type: &'static str,
    pub word_order: &'static str,
    pub byte_order: &'static str,
    pub scale: f64,
}

impl PlcRegister {
    fn plan(&self) -> Value {
        json!({"table": self.table, "address": self.address, "type": self.value_type,
               "word_order": self.word_order, "byte_order": self.byte_order,
               "scale": self.scale, "offset": 0.0})
    }

    /// Registers (16-bit words) it spans.
    pub fn words(&self) -> usize {
        match self.value_type {
            "u32" | "i32" | "f32" => 2,
            "f64" => 4,
            _ => 1,
        }
    }

    /// The line of the agent's `registers` table for this register.
    pub fn toml(&self) -> String {
        format!(
            "{} = {{ table = {:?}, address = {}, type = {:?}, word_order = {:?}, byte_order = {:?}, scale = {:?} }}",
            self.feature,
            self.table,
            self.address,
            self.value_type,
            self.word_order,
            self.byte_order,
            self.scale
        )
    }
}

/// The 24 features the reference bundle monitors (its model's 14 inputs and 10 more its drift
/// profile watches) laid out as a PLC might hold them: every type, both word orders and both
/// byte orders, scaled integers, in two tables of touching registers (so one request per
/// table).
pub fn turbofan_registers() -> Vec<PlcRegister> {
    let r = |feature, table, address, value_type, word_order, byte_order, scale| PlcRegister {
        feature,
        table,
        address,
        value_type,
        word_order,
        byte_order,
        scale,
    };
    vec![
        r("s2", "holding", 0, "f32", "big", "big", 1.0),
        r("s3", "holding", 2, "f32", "little", "big", 1.0),
        r("s4", "holding", 4, "f32", "big", "little", 1.0),
        r("s7", "holding", 6, "f64", "big", "big", 1.0),
        r("s8", "holding", 10, "u32", "big", "big", 0.01),
        r("setting1", "holding", 12, "f32", "big", "big", 1.0),
        r("setting2", "holding", 14, "f32", "little", "little", 1.0),
        r("setting3", "holding", 16, "u16", "big", "big", 1.0),
        r("s1", "holding", 17, "f32", "big", "big", 1.0),
        r("s5", "holding", 19, "f32", "big", "big", 1.0),
        r("s6", "holding", 21, "f32", "big", "big", 1.0),
        r("s10", "holding", 23, "f32", "big", "big", 1.0),
        r("s16", "holding", 25, "f32", "big", "big", 1.0),
        r("s18", "holding", 27, "u16", "big", "big", 1.0),
        r("s19", "holding", 28, "u16", "big", "little", 1.0),
        r("s9", "input", 0, "f32", "big", "big", 1.0),
        r("s11", "input", 2, "i16", "big", "big", 0.01),
        r("s12", "input", 3, "f32", "big", "big", 1.0),
        r("s13", "input", 5, "f32", "big", "big", 1.0),
        r("s14", "input", 7, "f32", "big", "big", 1.0),
        r("s15", "input", 9, "f64", "little", "big", 1.0),
        r("s17", "input", 13, "u16", "big", "big", 1.0),
        r("s20", "input", 14, "f32", "little", "little", 1.0),
        r("s21", "input", 16, "f32", "big", "big", 1.0),
    ]
}

/// The `[[assets]]` table of an agent asset polling a PLC on `port`.
pub fn modbus_asset(id: &str, bundle: &Path, port: u16, poll_ms: u64, timeout_ms: u64) -> String {
    let registers: Vec<String> = turbofan_registers().iter().map(PlcRegister::toml).collect();
    format!(
        "\n[[assets]]\nid = {id:?}\nasset_type = \"turbofan\"\nbundle = {bundle:?}\n\
         [assets.source]\nkind = \"modbus\"\naddress = \"127.0.0.1:{port}\"\nunit_id = 1\n\
         poll_ms = {poll_ms}\ntimeout_ms = {timeout_ms}\n[assets.source.registers]\n{}\n",
        registers.join("\n")
    )
}

/// The rows of `unit` in the C-MAPSS file `data`, one value per [`turbofan_registers`] entry.
pub fn unit_rows(data: &Path, unit: u32) -> anyhow::Result<Vec<Vec<f64>>> {
    use millwright_agent::cmapss;
    let text = std::fs::read_to_string(data)?;
    let rows = cmapss::parse(&text)?;
    let registers = turbofan_registers();
    let columns = cmapss::feature_indices(registers.iter().map(|r| r.feature))?;
    Ok(rows
        .iter()
        .filter(|r| r.unit == unit)
        .map(|r| columns.iter().map(|&c| r.values[c]).collect())
        .collect())
}

/// A running PLC.
pub struct Plc {
    pub port: u16,
    pub proc: Proc,
    dir: PathBuf,
    plan: Value,
    /// Connection lines in the log up to the last start's probe.
    probes: usize,
}

impl Plc {
    /// Starts a PLC on a free port playing `rows` with `faults` ("row index" → fault).
    pub fn start(dir: &Path, rows: Vec<Vec<f64>>, faults: Value) -> anyhow::Result<Plc> {
        Self::start_on(dir, free_port(), rows, faults)
    }

    /// A PLC that plays `rows` over and over (for benchmarks: it never runs out).
    pub fn start_looping(dir: &Path, rows: Vec<Vec<f64>>) -> anyhow::Result<Plc> {
        let mut plc = Self::start(dir, rows, json!({}))?;
        plc.kill();
        plc.plan["loop"] = json!(true);
        plc.proc = Self::spawn(dir, &plc.plan)?;
        plc.wait_listening()?;
        Ok(plc)
    }

    /// The same on `port` (a PLC that comes up where the agent already looks).
    pub fn start_on(
        dir: &Path,
        port: u16,
        rows: Vec<Vec<f64>>,
        faults: Value,
    ) -> anyhow::Result<Plc> {
        let registers: Vec<Value> = turbofan_registers().iter().map(PlcRegister::plan).collect();
        let plan = json!({"port": port, "unit_id": 1, "registers": registers, "rows": rows,
                          "faults": faults, "stall_secs": 2.0, "start_row": 0});
        let proc = Self::spawn(dir, &plan)?;
        let mut plc = Plc { port, proc, dir: dir.to_owned(), plan, probes: 0 };
        plc.wait_listening()?;
        Ok(plc)
    }

    fn spawn(dir: &Path, plan: &Value) -> anyhow::Result<Proc> {
        let path = dir.join("plc-plan.json");
        std::fs::write(&path, serde_json::to_vec(plan)?)?;
        let mut cmd = Command::new(python()?);
        cmd.arg(repo_file("tests/servers/modbus_plc.py")).arg(&path);
        Proc::spawn(&mut cmd, dir.join("plc.log"))
    }

    /// Waits until the PLC takes connections; the probing one is not counted in
    /// [`Plc::connections`].
    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let (port, before) = (self.port, self.connected_lines());
        if !wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }) {
            bail!("the PLC did not listen on {port}: {}", self.proc.log_text());
        }
        wait_until(Duration::from_secs(5), || self.connected_lines() > before);
        self.probes = self.connected_lines();
        Ok(())
    }

    fn connected_lines(&self) -> usize {
        self.proc.log_text().matches("client connected").count()
    }

    /// The rows shown so far, in order (a restarted PLC's continue the list).
    pub fn rows_shown(&self) -> Vec<usize> {
        self.proc
            .log_text()
            .lines()
            .filter_map(|l| l.strip_prefix("row ")?.split(' ').next()?.parse().ok())
            .collect()
    }

    /// Client connections accepted since the PLC last started.
    pub fn connections(&self) -> usize {
        self.connected_lines() - self.probes
    }

    pub fn ended(&self) -> bool {
        self.proc.log_text().contains("end of rows")
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on its port, from the row after the last one shown.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let next = self.rows_shown().last().map_or(0, |r| r + 1);
        self.plan["start_row"] = json!(next);
        self.proc = Self::spawn(&self.dir, &self.plan).context("restarting the PLC")?;
        self.wait_listening()
    }
}
