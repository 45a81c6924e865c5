//! Modbus TCP input: one task and one connection (tokio-modbus) per PLC address, however many
//! assets read from it (PLCs allow few connections), each asset polled on its own interval
//! with its own unit id: one reading per poll, one request per run of touching registers
//! ([`Map::requests`]). A timeout, a dropped connection or an answer that does not fit makes
//! the features unavailable for that poll and the connection is made again (a late answer
//! must not be taken for the next request's); an exception answer leaves it up. While the PLC
//! is unreachable every poll still sends a reading, all unavailable, and connecting is tried
//! again with a backoff that doubles from [`FIRST_BACKOFF`] up to [`MAX_BACKOFF`] and starts
//! over once a poll is answered.

use super::SourceEvent;
use super::registers::{Answer, Map, Request, Table};
use crate::reading::{Fault, Reading};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{Slave, client::tcp};

pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One asset's share of a PLC.
#[derive(Debug, Clone)]
pub struct ModbusPoll {
    pub asset: usize,
    pub unit_id: u8,
    pub every: Duration,
    /// For each request.
    pub timeout: Duration,
    pub map: Map,
}

/// A PLC and the assets that read from it.
#[derive(Debug, Clone)]
pub struct ModbusDevice {
    /// `host:port`, resolved at every connection attempt.
    pub address: String,
    pub polls: Vec<ModbusPoll>,
}

pub fn spawn(device: ModbusDevice, events: mpsc::Sender<SourceEvent>) {
    tokio::spawn(run(device, events));
}

/// The connection to one PLC and when to try it again.
struct Link {
    context: Option<Context>,
    retry_at: Instant,
    backoff: Duration,
    /// The current outage was logged.
    logged: bool,
}

async fn run(d: ModbusDevice, events: mpsc::Sender<SourceEvent>) {
    if d.polls.is_empty() {
        return;
    }
    let connect_timeout = d.polls.iter().map(|p| p.timeout).max().unwrap_or(Duration::from_secs(1));
    let mut link =
        Link { context: None, retry_at: Instant::now(), backoff: FIRST_BACKOFF, logged: false };
    let mut due = vec![Instant::now(); d.polls.len()];
    loop {
        let (i, at) = due
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|&(_, at)| at)
            .unwrap_or((0, Instant::now()));
        tokio::time::sleep_until(at).await;
        let p = &d.polls[i];
        if link.context.is_none() && Instant::now() >= link.retry_at {
            link.connect(&d.address, connect_timeout).await;
        }
        let answers = match link.context.as_mut() {
            Some(ctx) => {
                ctx.set_slave(Slave(p.unit_id));
                poll(ctx, p.map.requests(), p.timeout).await
            }
            None => vec![Answer::Failed(Fault::Disconnected); p.map.requests().len()],
        };
        match (answers.iter().find_map(breaks), link.context.is_some()) {
            (Some(fault), true) => link.dropped(&d.address, fault),
            (None, true) => link.backoff = FIRST_BACKOFF,
            (_, false) => {}
        }
        let reading = Reading { cycle: None, samples: p.map.reading(&answers) };
        if events.send(SourceEvent::Reading { asset: p.asset, reading }).await.is_err() {
            return;
        }
        // A poll that ran late (a slow PLC, a connection attempt) is not made up for: the
        // next one is an interval after it ended.
        let now = Instant::now();
        due[i] = if at + p.every > now { at + p.every } else { now + p.every };
    }
}

impl Link {
    async fn connect(&mut self, address: &str, limit: Duration) {
        let attempt = async {
            let addr = tokio::net::lookup_host(address)
                .await?
                .next()
                .ok_or_else(|| std::io::Error::other("the name resolves to no address"))?;
            tcp::connect(addr).await
        };
        let error = match timeout(limit, attempt).await {
            Ok(Ok(ctx)) => {
                tracing::info!(address, "Modbus device connected");
                (self.context, self.logged) = (Some(ctx), false);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no connection within {limit:?}"),
        };
        if !self.logged {
            tracing::warn!(address, "cannot connect to the Modbus device: {error}; trying again");
            self.logged = true;
        }
        self.wait();
    }

    /// A poll broke the connection: it is made again after the backoff, which a poll that
    /// gets answers resets (a PLC that accepts connections but never answers is not
    /// reconnected to on every poll).
    fn dropped(&mut self, address: &str, fault: Fault) {
        tracing::warn!(address, "Modbus connection dropped: {fault}; connecting again");
        self.context = None;
        self.wait();
    }

    fn wait(&mut self) {
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// The fault of an answer after which the connection cannot be trusted, if it is one.
fn breaks(answer: &Answer) -> Option<Fault> {
    match answer {
        Answer::Failed(f @ (Fault::Timeout | Fault::Disconnected | Fault::BadResponse)) => Some(*f),
        _ => None,
    }
}

/// Every request in order; after one that breaks the connection the rest fail the same way.
async fn poll(ctx: &mut Context, requests: &[Request], limit: Duration) -> Vec<Answer> {
    let mut answers: Vec<Answer> = Vec::with_capacity(requests.len());
    for r in requests {
        let answer = match answers.last().and_then(breaks) {
            Some(fault) => Answer::Failed(fault),
            None => read(ctx, *r, limit).await,
        };
        answers.push(answer);
    }
    answers
}

async fn read(ctx: &mut Context, r: Request, limit: Duration) -> Answer {
    let (a, n) = (r.address, r.count);
    let answer = match r.table {
        Table::Holding => timeout(limit, ctx.read_holding_registers(a, n)).await.map(words),
        Table::Input => timeout(limit, ctx.read_input_registers(a, n)).await.map(words),
        Table::Coil => timeout(limit, ctx.read_coils(a, n)).await.map(bits),
        Table::Discrete => timeout(limit, ctx.read_discrete_inputs(a, n)).await.map(bits),
    };
    answer.unwrap_or(Answer::Failed(Fault::Timeout))
}

fn words(r: tokio_modbus::Result<Vec<u16>>) -> Answer {
    answer(r, Answer::Words)
}

fn bits(r: tokio_modbus::Result<Vec<bool>>) -> Answer {
    answer(r, Answer::Bits)
}

fn answer<T>(r: tokio_modbus::Result<T>, ok: impl FnOnce(T) -> Answer) -> Answer {
    match r {
        Ok(Ok(values)) => ok(values),
        Ok(Err(_exception)) => Answer::Failed(Fault::Exception),
        Err(tokio_modbus::Error::Transport(_)) => Answer::Failed(Fault::Disconnected),
        Err(tokio_modbus::Error::Protocol(_)) => Answer::Failed(Fault::BadResponse),
    }
}
