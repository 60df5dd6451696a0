//! The conntrack sweeper: a thread of its own (a full table takes long to walk) that removes
//! expired entries every period, so a table that refuses new flows when full does not fill with
//! ended ones. It stops when dropped.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use privatelink_common::DatapathConfig;

use super::StatsReader;

/// How often the thread looks whether it should stop.
const POLL: Duration = Duration::from_millis(100);

pub struct Sweeper {
    on: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// CLOCK_MONOTONIC in ns: the clock conntrack timestamps are taken on (the coarse variant).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl Sweeper {
    /// Sweeps `reader`'s conntrack every `every` with the datapath's `timeouts`.
    pub fn start(
        mut reader: StatsReader,
        every: Duration,
        timeouts: DatapathConfig,
    ) -> std::io::Result<Self> {
        let on = Arc::new(AtomicBool::new(true));
        let running = on.clone();
        let thread = std::thread::Builder::new()
            .name("ct-sweep".into())
            .spawn(move || {
                let mut last = Instant::now();
                while running.load(Ordering::Relaxed) {
                    std::thread::sleep(POLL);
                    if last.elapsed() >= every {
                        last = Instant::now();
                        let n = reader.sweep_expired(monotonic_ns(), &timeouts);
                        if n > 0 {
                            log::debug!("conntrack: {n} expired entries removed");
                        }
                    }
                }
            })?;
        Ok(Sweeper {
            on,
            thread: Some(thread),
        })
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.on.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
