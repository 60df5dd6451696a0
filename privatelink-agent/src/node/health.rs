//! Active TCP health checks of every service's backends, from this node.
//!
//! Targets start healthy (an agent restart must not empty every Maglev table), turn unhealthy after
//! `unhealthy_threshold` failed connects in a row and healthy again after `healthy_threshold`
//! successes. The agent keeps unhealthy targets out of the Maglev tables and cuts their flows.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::TcpStream,
    sync::{Notify, mpsc},
    time::Instant,
};

use crate::control::{plane::ControlPlane, state::State, types::HealthCheck};

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

/// What to probe: every backend of every service with checks enabled and a port to probe.
fn targets(state: &State) -> Vec<(TargetKey, u16, HealthCheck)> {
    state
        .services
        .values()
        .filter(|s| s.health_check.enabled)
        .filter_map(|s| s.health_check.probe_port(&s.port_mappings).map(|p| (s, p)))
        .flat_map(|(s, port)| {
            s.backends
                .iter()
                .map(move |ip| ((s.id.clone(), *ip), port, s.health_check))
        })
        .collect()
}

async fn probe(addr: SocketAddr, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
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
                let wanted: BTreeSet<TargetKey> = list.iter().map(|(k, _, _)| k.clone()).collect();
                health.retain(&wanted);
                due.retain(|k, _| wanted.contains(k));
                for (key, port, hc) in list {
                    let next = due.entry(key.clone()).or_insert(now);
                    if *next > now {
                        continue;
                    }
                    *next = now + Duration::from_secs(hc.interval_secs.into());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let ok = probe(SocketAddr::new(key.1, port), Duration::from_secs(hc.timeout_secs.into())).await;
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
