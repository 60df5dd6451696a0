//! Following a shared store (etcd) from any server of the control plane: node agents and API
//! servers alike keep their state current with the commits other servers make.
use std::{sync::Arc, time::Duration};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

use super::{
    etcd::EtcdConfig,
    plane::{ControlPlane, Remote},
};

/// How following the shared store goes, for metrics (shared handles: clones count together).
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    /// 1 while the shared store (etcd) is reachable and followed; 0 while not (forwarding goes on
    /// with the last state). Always 1 with the embedded store.
    pub up: Gauge,
    /// Full loads of the shared store's state (the first, after a lost watch, after a gap).
    pub reloads: Counter,
    /// Commits of other servers applied from the shared store's watch, without a full load.
    pub commits_followed: Counter,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        let up = Gauge::default();
        up.set(1);
        StoreMetrics {
            up,
            reloads: Counter::default(),
            commits_followed: Counter::default(),
        }
    }
}

/// Follows a shared store as an informer does: a full load, then the commits of other servers
/// from a watch that starts right after it, each applied to the state as it arrives (the revision
/// announcement then drives the usual reconcile), so a change costs a follower what it changed,
/// not the whole state. A watch that ends, a history compacted past the load or a missed revision
/// means a full load again, and a watch from there. While etcd is unreachable the node keeps
/// forwarding on its last state; `privatelink_store_up` and the log say so, and following resumes
/// (with a full load) when it is back.
pub async fn follow_store(e: EtcdConfig, plane: Arc<ControlPlane>, metrics: StoreMetrics) {
    loop {
        // A load that fails is tried again (with backoff) until it succeeds: the watch starts
        // where the load read, so nothing committed in between is missed.
        let from = retry(
            || {
                let p = plane.clone();
                async move {
                    match tokio::task::spawn_blocking(move || p.refresh()).await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(e) => Err(format!("reload task failed: {e}")),
                    }
                }
            },
            Duration::from_millis(100),
            Duration::from_secs(2),
            |attempt, err| {
                metrics.up.set(0);
                // Once per outage in the log, not once per attempt.
                if attempt == 1 {
                    log::warn!("store: reloading from etcd failed: {err}; retrying");
                } else {
                    log::debug!("store: reload attempt {attempt} failed: {err}");
                }
            },
        )
        .await;
        metrics.reloads.inc();
        metrics.up.set(1);
        let Some(from) = from else {
            log::error!("store: the shared store gives no watch position; not following it");
            return;
        };
        let r = super::etcd::watch_commits(&e, from, |c| {
            let (p, metrics) = (plane.clone(), metrics.clone());
            async move {
                let revision = c.revision;
                // The state's lock may be held by a commit waiting on etcd: off the runtime.
                match tokio::task::spawn_blocking(move || p.apply_remote(&c)).await {
                    Ok(Remote::Applied) => {
                        metrics.commits_followed.inc();
                        true
                    }
                    Ok(Remote::Known) => true,
                    Ok(Remote::Gap { current }) => {
                        log::info!(
                            "store: revision {revision} arrived while the state is at {current}; loading in full"
                        );
                        false
                    }
                    Err(err) => {
                        log::warn!("store: applying revision {revision} failed: {err}");
                        false
                    }
                }
            }
        })
        .await;
        if let Err(err) = r {
            metrics.up.set(0);
            log::warn!(
                "store: etcd at {:?} unreachable or the watch ended ({err}); forwarding goes on with revision {}; retrying",
                e.endpoints,
                plane.revision()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Runs `attempt` until it succeeds, and returns what it gave. After the n-th failure
/// `failed(n, &error)` is called and the next attempt waits `first`, doubled each time up to
/// `max`.
async fn retry<T, E, F: std::future::Future<Output = Result<T, E>>>(
    mut attempt: impl FnMut() -> F,
    first: Duration,
    max: Duration,
    mut failed: impl FnMut(u32, &E),
) -> T {
    let mut wait = first;
    let mut n = 0u32;
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) => {
                n = n.saturating_add(1);
                failed(n, &e);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn a_failing_attempt_is_retried_with_doubling_waits_until_it_succeeds() {
        let mut calls = 0u32;
        let mut failures = Vec::new();
        let t = Instant::now();
        super::retry(
            || {
                calls += 1;
                let r = if calls <= 3 { Err(calls) } else { Ok(()) };
                async move { r }
            },
            Duration::from_millis(10),
            Duration::from_millis(25),
            |n, e: &u32| failures.push((n, *e)),
        )
        .await;
        assert_eq!(calls, 4, "three failures, then the success ends it");
        assert_eq!(
            failures,
            [(1, 1), (2, 2), (3, 3)],
            "each failure reported once"
        );
        // Waits 10, 20, then 25 (capped): at least 55 ms in all.
        assert!(
            t.elapsed() >= Duration::from_millis(55),
            "{:?}",
            t.elapsed()
        );
    }
}
