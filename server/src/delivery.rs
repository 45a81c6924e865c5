//! Chunk delivery, pure: the chunks devices asked for, first asked first sent, each queued once
//! however often it is asked for again, and paced twice: per device
//! (`delivery_bytes_per_sec`, a gateway's thin link) and for the whole fleet
//! (`fleet_delivery_bytes_per_sec`). The fleet pace is what keeps a wave's bundles from
//! filling the server's one MQTT connection: unpaced, 10,000 simulated gateways' chunk
//! requests queued ~3 GB of chunks on it, the acks behind them were given up (51,809
//! publishes) and the wave failed.
//!
//! Time is microseconds on the caller's monotonic clock; the caller sends what [`Queue::next`]
//! hands out and sleeps until the time it names.

use std::collections::{HashMap, HashSet, VecDeque};

/// How far past the head [`Queue::next`] looks for a chunk whose device's link is free.
const SCAN: usize = 256;

/// One chunk to send; `payload` is the caller's (the bundle's bytes and where the chunk is).
#[derive(Debug, Clone, PartialEq)]
pub struct Item<P> {
    pub device: String,
    pub sha256: String,
    pub index: u32,
    pub len: u64,
    pub payload: P,
}

/// What to do now.
#[derive(Debug, PartialEq)]
pub enum Next<P> {
    Send(Item<P>),
    /// Nothing may go before this time (the fleet's or every queued device's link is busy).
    Wait(u64),
    Idle,
}

/// Counts since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Chunks waiting to be sent now.
    pub queued: u64,
    /// Chunks handed out to be sent.
    pub sent: u64,
    /// Requests for a chunk that was still queued for the device (not queued twice).
    pub repeats: u64,
}

pub struct Queue<P> {
    device_rate: Option<u64>,
    fleet_rate: Option<u64>,
    order: VecDeque<Item<P>>,
    queued: HashSet<(String, String, u32)>,
    /// When the fleet's link is free again.
    fleet_free: u64,
    /// When each device's link is free again (only under a device rate).
    device_free: HashMap<String, u64>,
    /// Devices that asked for a chunk or were sent one since [`Queue::take_waiting`].
    touched: HashSet<String>,
    stats: Stats,
}

/// How long `len` bytes take at `rate` bytes per second, in microseconds.
fn duration_us(len: u64, rate: u64) -> u64 {
    (u128::from(len) * 1_000_000 / u128::from(rate.max(1))).min(u128::from(u64::MAX)) as u64
}

impl<P> Queue<P> {
    pub fn new(device_rate: Option<u64>, fleet_rate: Option<u64>) -> Queue<P> {
        Queue {
            device_rate: device_rate.filter(|r| *r > 0),
            fleet_rate: fleet_rate.filter(|r| *r > 0),
            order: VecDeque::new(),
            queued: HashSet::new(),
            fleet_free: 0,
            device_free: HashMap::new(),
            touched: HashSet::new(),
            stats: Stats::default(),
        }
    }

    /// Queues a chunk unless the same one is still queued for the device; true if queued.
    pub fn request(&mut self, item: Item<P>) -> bool {
        let key = (item.device.clone(), item.sha256.clone(), item.index);
        if !self.touched.contains(&item.device) {
            self.touched.insert(item.device.clone());
        }
        if !self.queued.insert(key) {
            self.stats.repeats += 1;
            return false;
        }
        self.order.push_back(item);
        true
    }

    pub fn stats(&self) -> Stats {
        Stats { queued: self.order.len() as u64, ..self.stats }
    }

    /// The next chunk to send at `now`, or how long to wait: the oldest queued whose device's
    /// link is free (looking at most [`SCAN`] deep), once the fleet's link is.
    pub fn next(&mut self, now: u64) -> Next<P> {
        if self.order.is_empty() {
            return Next::Idle;
        }
        if self.fleet_free > now {
            return Next::Wait(self.fleet_free);
        }
        let free_at = |q: &Self, device: &str| q.device_free.get(device).copied().unwrap_or(0);
        let mut soonest = u64::MAX;
        let mut pick = None;
        for (i, item) in self.order.iter().take(SCAN).enumerate() {
            let at = free_at(self, &item.device);
            if at <= now {
                pick = Some(i);
                break;
            }
            soonest = soonest.min(at);
        }
        let Some(item) = pick.and_then(|i| self.order.remove(i)) else {
            return Next::Wait(soonest);
        };
        self.queued.remove(&(item.device.clone(), item.sha256.clone(), item.index));
        if let Some(rate) = self.fleet_rate {
            self.fleet_free = now + duration_us(item.len, rate);
        }
        if let Some(rate) = self.device_rate {
            self.device_free.insert(item.device.clone(), now + duration_us(item.len, rate));
            // Links free again by now need no entry; keeps the map to devices being paced.
            if self.device_free.len() > 2 * self.order.len() + SCAN {
                self.device_free.retain(|_, at| *at > now);
            }
        }
        self.stats.sent += 1;
        if !self.touched.contains(&item.device) {
            self.touched.insert(item.device.clone());
        }
        Next::Send(item)
    }

    /// The devices whose downloads waited on the server since the last call: each asked for a
    /// chunk, was sent one, or still has one queued. Their delay is the server's, not theirs
    /// (the rollout engine's timeout does not count it: [`crate::rollout::on_waiting`]).
    pub fn take_waiting(&mut self) -> HashSet<String> {
        let mut waiting = std::mem::take(&mut self.touched);
        waiting.extend(self.order.iter().map(|i| i.device.clone()));
        waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(device: &str, index: u32, len: u64) -> Item<()> {
        Item { device: device.into(), sha256: "ab".into(), index, len, payload: () }
    }

    fn sent(next: Next<()>) -> (String, u32) {
        match next {
            Next::Send(i) => (i.device, i.index),
            other => panic!("expected a chunk, got {other:?}"),
        }
    }

    #[test]
    fn first_asked_first_sent_and_a_repeat_is_not_queued_twice() {
        let mut q = Queue::new(None, None);
        assert!(q.request(item("a", 0, 10)));
        assert!(q.request(item("b", 0, 10)));
        assert!(!q.request(item("a", 0, 10)), "still queued for a");
        assert!(q.request(item("a", 1, 10)));
        assert_eq!(q.stats(), Stats { queued: 3, sent: 0, repeats: 1 });
        assert_eq!(sent(q.next(0)), ("a".into(), 0));
        assert_eq!(sent(q.next(0)), ("b".into(), 0));
        assert_eq!(sent(q.next(0)), ("a".into(), 1));
        assert_eq!(q.next(0), Next::Idle);
        // Once sent, asking again queues it again (the device did not get it).
        assert!(q.request(item("a", 0, 10)));
        assert_eq!(q.stats(), Stats { queued: 1, sent: 3, repeats: 1 });
    }

    #[test]
    fn the_fleet_rate_spaces_every_chunk_whoever_asked() {
        // 1,000 bytes/s: a chunk of 100 bytes holds the fleet's link for 100 ms.
        let mut q = Queue::new(None, Some(1_000));
        q.request(item("a", 0, 100));
        q.request(item("b", 0, 100));
        q.request(item("c", 0, 100));
        assert_eq!(sent(q.next(0)), ("a".into(), 0));
        assert_eq!(q.next(50_000), Next::Wait(100_000));
        assert_eq!(sent(q.next(100_000)), ("b".into(), 0));
        assert_eq!(q.next(150_000), Next::Wait(200_000));
        assert_eq!(sent(q.next(250_000)), ("c".into(), 0));
        assert_eq!(q.next(250_000), Next::Idle);
    }

    #[test]
    fn a_device_on_a_slow_link_does_not_hold_up_the_others() {
        // 100 bytes/s per device: a's second chunk waits 1 s, b's goes first.
        let mut q = Queue::new(Some(100), None);
        q.request(item("a", 0, 100));
        q.request(item("a", 1, 100));
        q.request(item("b", 0, 100));
        assert_eq!(sent(q.next(0)), ("a".into(), 0));
        assert_eq!(sent(q.next(10)), ("b".into(), 0));
        assert_eq!(q.next(20), Next::Wait(1_000_000), "a's link is busy until 1 s");
        assert_eq!(sent(q.next(1_000_000)), ("a".into(), 1));
    }

    #[test]
    fn both_paces_apply_and_zero_means_unpaced() {
        let mut q = Queue::new(Some(0), Some(0));
        for i in 0..5 {
            q.request(item("a", i, 1 << 20));
        }
        for i in 0..5 {
            assert_eq!(sent(q.next(0)), ("a".into(), i));
        }
        let mut q = Queue::new(Some(1_000), Some(10_000));
        q.request(item("a", 0, 1_000));
        q.request(item("a", 1, 1_000));
        q.request(item("b", 0, 1_000));
        assert_eq!(sent(q.next(0)), ("a".into(), 0));
        // The fleet's link is free after 100 ms, a's after 1 s: b goes at 100 ms.
        assert_eq!(q.next(0), Next::Wait(100_000));
        assert_eq!(sent(q.next(100_000)), ("b".into(), 0));
        assert_eq!(q.next(200_000), Next::Wait(1_000_000));
        assert_eq!(sent(q.next(1_000_000)), ("a".into(), 1));
    }

    #[test]
    fn a_device_waits_on_the_server_while_its_chunk_is_queued_and_once_it_is_sent() {
        let mut q = Queue::new(None, Some(10));
        q.request(item("a", 0, 10));
        q.request(item("b", 0, 10));
        let waiting = q.take_waiting();
        assert_eq!(waiting.len(), 2, "both asked: {waiting:?}");
        assert_eq!(sent(q.next(0)), ("a".into(), 0));
        // a was sent one since, b's is still queued; nobody else asked.
        let waiting = q.take_waiting();
        assert!(waiting.contains("a") && waiting.contains("b"), "{waiting:?}");
        assert_eq!(sent(q.next(1_000_000)), ("b".into(), 0));
        assert_eq!(q.take_waiting().len(), 1, "b was sent one");
        assert!(q.take_waiting().is_empty(), "nothing asked, sent or queued since");
    }
}
