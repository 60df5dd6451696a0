//! One conntrack scan per period: a thread of its own (a full table takes long to walk) reads
//! both tables once, removes the expired entries it meets (a table that refuses new flows when
//! full must not fill with ended ones), and publishes a summary that the node's metrics and
//! monitoring history read, instead of each walking the table again.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use privatelink_common::{
    CT_ESTABLISHED, CT_SYN_RECV, CT_SYN_SENT, DIR_FORWARD, DIR_REPLY, DatapathConfig, PROTO_UDP,
};

use super::{FlowView, StatsReader};

/// How often the thread looks whether it should stop.
const POLL: Duration = Duration::from_millis(100);

/// CLOCK_MONOTONIC in ns: the clock conntrack timestamps are taken on (the coarse variant).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Whether a forward entry is a live connection as the console counts them and a flow limit
/// holds them: TCP half-open or ESTABLISHED (not once a FIN or RST was seen), UDP until its
/// timeout.
pub fn is_active(f: &FlowView, now: u64, cfg: &DatapathConfig) -> bool {
    let counted =
        f.proto == PROTO_UDP || matches!(f.tcp_state, CT_SYN_SENT | CT_SYN_RECV | CT_ESTABLISHED);
    f.dir == DIR_FORWARD
        && counted
        && now.saturating_sub(f.last_seen_ns) <= cfg.timeout_for(f.proto, f.tcp_state)
}

/// What one scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackSummary {
    /// When the scan read the tables (monotonic ns).
    pub scanned_at_ns: u64,
    /// Entries left after the scan (two per flow).
    pub entries: u64,
    /// Live connections per link.
    pub active_by_link: BTreeMap<u32, u64>,
    /// (provider network, IPv6) → reply entries: one per NAT (address, port) pair in use.
    pub nat_used: BTreeMap<(u32, bool), u64>,
    /// Expired entries the scan removed.
    pub removed: u64,
}

impl ConntrackSummary {
    /// Summarises the entries left by a scan at `now`.
    pub fn of(flows: &[FlowView], removed: usize, now: u64, cfg: &DatapathConfig) -> Self {
        let mut s = ConntrackSummary {
            scanned_at_ns: now,
            entries: flows.len() as u64,
            removed: removed as u64,
            ..Default::default()
        };
        for f in flows {
            if is_active(f, now, cfg) {
                *s.active_by_link.entry(f.link_id).or_default() += 1;
            }
            if f.dir == DIR_REPLY {
                *s.nat_used.entry((f.network_id, f.ipv6)).or_default() += 1;
            }
        }
        s
    }
}

/// The latest summary, shared by the scanner and its readers.
#[derive(Clone, Default)]
pub struct Latest(Arc<Mutex<Arc<ConntrackSummary>>>);

impl Latest {
    pub fn get(&self) -> Arc<ConntrackSummary> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, s: ConntrackSummary) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
    }
}

/// One scan: read, remove the expired, summarise the rest, and tell the flow limits how many
/// flows of each link ended (the admission counts read before the tables, so that a flow
/// admitted during the walk is never taken for ended).
pub fn scan(reader: &mut StatsReader, timeouts: &DatapathConfig) -> ConntrackSummary {
    let opened = reader.opened();
    let now = monotonic_ns();
    let (flows, removed) = reader.scan(now, timeouts);
    if removed > 0 {
        log::debug!("conntrack: {removed} expired entries removed");
    }
    let summary = ConntrackSummary::of(&flows, removed, now, timeouts);
    if let Err(e) = reader.retire(&opened, &summary.active_by_link) {
        log::warn!("flow limits: {e}");
    }
    summary
}

/// A background thread that runs `step` with `pause` between runs until it is dropped (which
/// waits for the step under way).
pub struct Worker {
    on: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn start(
        name: &str,
        pause: Duration,
        mut step: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Self> {
        let on = Arc::new(AtomicBool::new(true));
        let running = on.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while running.load(Ordering::Relaxed) {
                    step();
                    std::thread::sleep(pause);
                }
            })?;
        Ok(Worker {
            on,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.on.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The scanning thread; it stops when dropped.
pub struct Scanner(#[allow(dead_code, reason = "held for its Drop")] Worker);

impl Scanner {
    /// Scans `reader`'s conntrack now and then every `every` with the datapath's `timeouts`;
    /// the summaries go to `latest`, the logged connections each scan finds ended to `ended`.
    pub fn start(
        mut reader: StatsReader,
        every: Duration,
        timeouts: DatapathConfig,
        latest: Latest,
        mut ended: impl FnMut(Vec<super::maps::ConnEnd>) + Send + 'static,
    ) -> std::io::Result<Self> {
        latest.set(scan(&mut reader, &timeouts));
        ended(reader.ended_connections());
        let mut last = Instant::now();
        Worker::start("ct-scan", POLL, move || {
            if last.elapsed() >= every {
                last = Instant::now();
                latest.set(scan(&mut reader, &timeouts));
                ended(reader.ended_connections());
            }
        })
        .map(Scanner)
    }
}

#[cfg(test)]
mod tests {
    use privatelink_common::{CT_CLOSING, PROTO_TCP};

    use super::*;

    fn flow(link: u32, dir: u8, proto: u8, tcp: u8, age_s: u64, now: u64) -> FlowView {
        FlowView {
            ipv6: false,
            network_id: if dir == DIR_REPLY { 100 } else { 1 },
            proto,
            link_id: link,
            dir,
            tcp_state: tcp,
            last_seen_ns: now - age_s * 1_000_000_000,
        }
    }

    #[test]
    fn a_summary_counts_live_connections_per_link_and_nat_pairs_per_network() {
        let now = 1_000_000 * 1_000_000_000;
        let cfg = DatapathConfig::DEFAULT;
        let flows = [
            // Link 1: an established TCP flow (both entries) and a closed one.
            flow(1, DIR_FORWARD, PROTO_TCP, CT_ESTABLISHED, 1, now),
            flow(1, DIR_REPLY, PROTO_TCP, CT_ESTABLISHED, 1, now),
            flow(1, DIR_FORWARD, PROTO_TCP, CT_CLOSING, 1, now),
            flow(1, DIR_REPLY, PROTO_TCP, CT_CLOSING, 1, now),
            // Link 2: a UDP flow, and one idle past the UDP timeout (not yet removed).
            flow(2, DIR_FORWARD, PROTO_UDP, 0, 1, now),
            flow(2, DIR_REPLY, PROTO_UDP, 0, 1, now),
            flow(2, DIR_FORWARD, PROTO_UDP, 0, 100_000, now),
        ];
        let s = ConntrackSummary::of(&flows, 3, now, &cfg);
        assert_eq!(s.entries, 7);
        assert_eq!(s.removed, 3);
        assert_eq!(s.active_by_link, BTreeMap::from([(1, 1), (2, 1)]));
        assert_eq!(s.nat_used, BTreeMap::from([((100, false), 3)]));
    }
}
