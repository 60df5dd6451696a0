//! Active TCP health checks of every service's backends, from this node.
//!
//! Targets start healthy (an agent restart must not empty every Maglev table), turn unhealthy after
//! `unhealthy_threshold` failed connects in a row and healthy again after `healthy_threshold`
//! successes. The agent keeps unhealthy targets out of the Maglev tables and cuts their flows.
//! A service with PROXY protocol on gets a PROXY v2 LOCAL header first on each check connection
//! (as AWS's load balancers send it), so that a backend requiring the header stays healthy and
//! logs no broken header.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt,
    net::TcpStream,
    sync::{Notify, mpsc},
    time::Instant,
};

use crate::control::{
    plane::ControlPlane,
    state::State,
    types::{HealthCheck, ProxyProtocol},
};

/// (service id, backend address).
pub type TargetKey = (String, IpAddr);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub healthy: bool,
    ok_streak: u32,
    fail_streak: u32,
}

impl Default for Target {
    fn default() -> Self {
        Target {
            healthy: true,
            ok_streak: 0,
            fail_streak: 0,
        }
    }
}

impl Target {
    /// Records a probe result; true when the target changed state.
    pub fn record(&mut self, ok: bool, hc: &HealthCheck) -> bool {
        if ok {
            self.ok_streak += 1;
            self.fail_streak = 0;
            if !self.healthy && self.ok_streak >= hc.healthy_threshold {
                self.healthy = true;
                return true;
            }
        } else {
            self.fail_streak += 1;
            self.ok_streak = 0;
            if self.healthy && self.fail_streak >= hc.unhealthy_threshold {
                self.healthy = false;
                return true;
            }
        }
        false
    }
}

/// Health of every checked target, shared between the checker and the reconciler.
#[derive(Default)]
pub struct Health {
    targets: Mutex<BTreeMap<TargetKey, Target>>,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<TargetKey, Target>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Targets currently unhealthy.
    pub fn unhealthy(&self) -> BTreeSet<TargetKey> {
        self.lock()
            .iter()
            .filter(|(_, t)| !t.healthy)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Per service: (address, healthy) of each checked backend.
    pub fn by_service(&self) -> BTreeMap<String, Vec<(IpAddr, bool)>> {
        let mut out: BTreeMap<String, Vec<(IpAddr, bool)>> = BTreeMap::new();
        for ((svc, ip), t) in self.lock().iter() {
            out.entry(svc.clone()).or_default().push((*ip, t.healthy));
        }
        out
    }

    fn record(&self, key: TargetKey, ok: bool, hc: &HealthCheck) -> bool {
        self.lock().entry(key).or_default().record(ok, hc)
    }

    fn retain(&self, wanted: &BTreeSet<TargetKey>) {
        self.lock().retain(|k, _| wanted.contains(k));
    }
}

/// What to probe: every backend of every service with checks enabled and a port to probe, and
/// whether the service speaks PROXY protocol.
fn targets(state: &State) -> Vec<(TargetKey, u16, HealthCheck, bool)> {
    state
        .services
        .values()
        .filter(|s| s.health_check.enabled)
        .filter_map(|s| s.health_check.probe_port(&s.port_mappings).map(|p| (s, p)))
        .flat_map(|(s, port)| {
            let proxy = s.proxy_protocol == ProxyProtocol::V2;
            s.backends
                .iter()
                .map(move |ip| ((s.id.clone(), *ip), port, s.health_check, proxy))
        })
        .collect()
}

/// A PROXY protocol v2 header with command LOCAL: a connection of the proxy's own (no addresses
/// follow), which a backend accepts without taking it for a consumer's.
pub const PROXY_V2_LOCAL: [u8; 16] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x20, 0x00, 0x00, 0x00,
];

/// One check: a TCP connect within `timeout` (with `proxy`, the LOCAL header sent as well).
async fn probe(addr: SocketAddr, timeout: Duration, proxy: bool) -> bool {
    let check = async {
        let mut s = TcpStream::connect(addr).await?;
        if proxy {
            s.write_all(&PROXY_V2_LOCAL).await?;
        }
        s.shutdown().await
    };
    matches!(tokio::time::timeout(timeout, check).await, Ok(Ok(())))
}

/// Runs the checks forever; `changed` is notified whenever a target changes state.
pub async fn run(plane: Arc<ControlPlane>, health: Arc<Health>, changed: Arc<Notify>) {
    let (tx, mut rx) = mpsc::channel::<(TargetKey, bool, HealthCheck)>(1024);
    let mut due: BTreeMap<TargetKey, Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                let list = plane.read(targets);
                let wanted: BTreeSet<TargetKey> = list.iter().map(|(k, ..)| k.clone()).collect();
                health.retain(&wanted);
                due.retain(|k, _| wanted.contains(k));
                for (key, port, hc, proxy) in list {
                    let next = due.entry(key.clone()).or_insert(now);
                    if *next > now {
                        continue;
                    }
                    *next = now + Duration::from_secs(hc.interval_secs.into());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let ok = probe(SocketAddr::new(key.1, port), Duration::from_secs(hc.timeout_secs.into()), proxy).await;
                        let _ = tx.send((key, ok, hc)).await;
                    });
                }
            }
            Some((key, ok, hc)) = rx.recv() => {
                if health.record(key.clone(), ok, &hc) {
                    log::warn!("health: backend {} of service {} is now {}", key.1, key.0, if ok { "healthy" } else { "unhealthy" });
                    changed.notify_one();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_proxy_services_check_sends_the_local_header_and_nothing_else() {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..2 {
                let (mut c, _) = l.accept().await.unwrap();
                let mut b = Vec::new();
                c.read_to_end(&mut b).await.unwrap();
                got.push(b);
            }
            got
        });
        assert!(super::probe(addr, Duration::from_secs(2), true).await);
        assert!(super::probe(addr, Duration::from_secs(2), false).await);
        let got = server.await.unwrap();
        assert_eq!(
            got[0],
            super::PROXY_V2_LOCAL,
            "version 2, LOCAL, no addresses"
        );
        assert_eq!(got[0][12], 0x20);
        assert!(got[1].is_empty(), "without PROXY protocol: a bare connect");
    }

    use super::*;

    #[test]
    fn thresholds_move_a_target() {
        let hc = HealthCheck {
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            ..HealthCheck::default()
        };
        let mut t = Target::default();
        assert!(t.healthy, "targets start healthy");
        assert!(!t.record(false, &hc) && !t.record(false, &hc));
        assert!(!t.record(true, &hc), "a success resets the failure streak");
        assert!(!t.record(false, &hc) && !t.record(false, &hc));
        assert!(t.record(false, &hc) && !t.healthy, "3 failures in a row");
        assert!(!t.record(true, &hc) && !t.healthy);
        assert!(t.record(true, &hc) && t.healthy, "2 successes in a row");
    }
}
