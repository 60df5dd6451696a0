//! Following a shared store (etcd) from any server of the control plane: node agents and API
//! servers alike keep their state current with the commits other servers make.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

use super::{
    clock::unix_ms,
    etcd::{EtcdConfig, WatchEnd},
    plane::{ControlPlane, Remote},
};

/// How following the shared store goes, for metrics (shared handles: clones count together).
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    /// 1 while the shared store (etcd) is reachable and followed; 0 while not (forwarding goes on
    /// with the last state). Always 1 with the embedded store.
    pub up: Gauge,
    /// Full loads of the shared store's state (the first, after a gap, after a compaction).
    pub reloads: Counter,
    /// Commits of other servers applied from the shared store's watch, without a full load.
    pub commits_followed: Counter,
    /// When the store last answered (unix milliseconds; 0: never): a watch message or a
    /// renewal of the presence lease.
    pub last_contact_ms: Arc<AtomicU64>,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        let up = Gauge::default();
        up.set(1);
        StoreMetrics {
            up,
            reloads: Counter::default(),
            commits_followed: Counter::default(),
            last_contact_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl StoreMetrics {
    /// The store answered just now.
    pub fn contact(&self) {
        self.last_contact_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// Seconds since the store last answered (`None`: never).
    pub fn since_contact(&self) -> Option<f64> {
        match self.last_contact_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(unix_ms().saturating_sub(at) as f64 / 1000.0),
        }
    }
}

/// Whether the store is in reach, as the follower and the contact keeper see it together: up
/// while the watch runs and the store answered within the contact timeout. Transitions are
/// logged once, and published to the metrics and to the plane (whose API then marks its answers
/// `stale`).
#[derive(Clone)]
struct Reach {
    plane: Arc<ControlPlane>,
    metrics: StoreMetrics,
    watching: Arc<AtomicBool>,
    bound: Duration,
}

impl Reach {
    fn watching(&self, on: bool) {
        self.watching.store(on, Ordering::Relaxed);
        self.update();
    }

    fn update(&self) {
        let fresh = self
            .metrics
            .since_contact()
            .is_some_and(|s| s <= self.bound.as_secs_f64());
        let up = self.watching.load(Ordering::Relaxed) && fresh;
        let was = self.metrics.up.get() == 1;
        if up != was {
            if up {
                log::info!(
                    "store: etcd is reachable again; following from revision {}",
                    self.plane.revision()
                );
            } else {
                let why = match self.metrics.since_contact() {
                    _ if !self.watching.load(Ordering::Relaxed) => "its watch ended".to_string(),
                    Some(s) => format!("no answer for {s:.1} s, bound {} s", self.bound.as_secs()),
                    None => "it never answered".to_string(),
                };
                log::warn!(
                    "store: etcd out of reach ({why}); serving and forwarding revision {}, marked stale",
                    self.plane.revision()
                );
            }
        }
        self.metrics.up.set(i64::from(up));
        self.plane.set_store_reachable(up);
    }
}

/// Follows a shared store as an informer does: a full load, then the commits of other servers
/// from a watch that starts right after it, each applied to the state as it arrives (the revision
/// announcement then drives the usual reconcile), so a change costs a follower what it changed,
/// not the whole state. A watch that is lost (etcd unreachable, a dead path the channel's
/// keepalive caught) resumes where it stopped once etcd answers again: no full load. A history
/// compacted past that point or a missed revision means a full load, and a watch from there.
/// Meanwhile the node keeps forwarding on its last state; `privatelink_store_up`, the log and the
/// API's `privatelink-state: stale` header say so. `node`: the node's name, whose presence
/// lease this also keeps (see [`keep_contact`]); `None` for an API server.
pub async fn follow_store(
    e: EtcdConfig,
    plane: Arc<ControlPlane>,
    metrics: StoreMetrics,
    node: Option<String>,
) {
    let reach = Reach {
        plane: plane.clone(),
        metrics: metrics.clone(),
        watching: Arc::new(AtomicBool::new(false)),
        bound: e.contact_timeout,
    };
    let keeper = tokio::spawn(keep_contact(e.clone(), node, reach.clone()));
    let mut from: Option<i64> = None;
    loop {
        let mut at = match from {
            Some(at) => at,
            None => match load(&plane, &reach).await {
                Some(at) => at,
                None => {
                    log::error!(
                        "store: the shared store gives no watch position; not following it"
                    );
                    keeper.abort();
                    return;
                }
            },
        };
        reach.watching(true);
        let r = super::etcd::watch_commits(&e, &mut at, || metrics.contact(), |c| {
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
        reach.watching(false);
        match r {
            WatchEnd::Stopped => from = None,
            WatchEnd::Broken(err) => {
                log::warn!("store: {err}; loading in full");
                from = None;
            }
            WatchEnd::Lost(err) => {
                log::debug!("store: watch lost at etcd revision {at}: {err}");
                from = Some(at);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// A full load, tried again (with backoff) until it succeeds: the watch starts where the load
/// read, so nothing committed in between is missed. Returns that position.
async fn load(plane: &Arc<ControlPlane>, reach: &Reach) -> Option<i64> {
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
            reach.watching(false);
            // Once per outage in the log, not once per attempt.
            if attempt == 1 {
                log::warn!("store: reloading from etcd failed: {err}; retrying");
            } else {
                log::debug!("store: reload attempt {attempt} failed: {err}");
            }
        },
    )
    .await;
    reach.metrics.reloads.inc();
    reach.metrics.contact();
    from
}

/// Keeps in contact with the store: a lease of `lease_ttl`, renewed every third of it (at most
/// every second), each renewal counting as contact; and for a node, its presence key under that
/// lease (`<prefix>/presence/<node>`, rewritten with the time every `lease_ttl`), so the cluster
/// sees it live until it stops renewing. A renewal unanswered within the contact timeout, or a
/// lease etcd no longer knows, starts over with a new lease. Checks reachability twice a second.
async fn keep_contact(e: EtcdConfig, node: Option<String>, reach: Reach) {
    let mut check = tokio::time::interval(Duration::from_millis(500));
    let every = (e.lease_ttl / 3).clamp(Duration::from_millis(200), Duration::from_secs(1));
    loop {
        let session = lease_session(&e, node.as_deref(), &reach, every);
        tokio::pin!(session);
        loop {
            tokio::select! {
                r = &mut session => {
                    log::debug!("store: presence lease lost: {r:?}");
                    break;
                }
                _ = check.tick() => reach.update(),
            }
        }
        reach.update();
        let pause = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                _ = check.tick() => reach.update(),
            }
        }
    }
}

/// One lease: granted, the presence key put under it, renewed until something fails.
async fn lease_session(
    e: &EtcdConfig,
    node: Option<&str>,
    reach: &Reach,
    every: Duration,
) -> Result<(), etcd_client::Error> {
    use etcd_client::{Client, PutOptions};
    let bound = e.contact_timeout;
    let timed = |what: &'static str| {
        move |_| etcd_client::Error::InvalidArgs(format!("{what}: no answer within {bound:?}"))
    };
    let mut client = tokio::time::timeout(
        bound,
        Client::connect(&e.endpoints, Some(e.connect_options())),
    )
    .await
    .map_err(timed("connect"))??;
    let ttl = e.lease_ttl.as_secs().max(2) as i64;
    let lease = tokio::time::timeout(bound, client.lease_grant(ttl, None))
        .await
        .map_err(timed("lease grant"))??
        .id();
    reach.metrics.contact();
    let key = node.map(|n| format!("{}{n}", e.presence_prefix()));
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
    let mut renew = tokio::time::interval(every);
    let mut rewrite = tokio::time::interval(e.lease_ttl.max(Duration::from_secs(1)));
    let role = || reach.plane.node_local().and_then(|l| l.ha());
    let mut written = None;
    loop {
        tokio::select! {
            _ = rewrite.tick() => {
                if let (Some(key), Some(node)) = (&key, node) {
                    let ha = role();
                    let value = serde_json::to_vec(&super::store::Presence {
                        node: node.to_string(),
                        contact: unix_ms() / 1000,
                        ha: ha.clone(),
                    })
                    .expect("presence serialises");
                    written = ha;
                    tokio::time::timeout(
                        bound,
                        client.put(key.as_str(), value, Some(PutOptions::new().with_lease(lease))),
                    )
                    .await
                    .map_err(timed("presence put"))??;
                    reach.metrics.contact();
                }
            }
            _ = renew.tick() => {
                // A changed role is published at once, not at the next rewrite.
                if key.is_some() && role() != written {
                    rewrite.reset_immediately();
                }
                keeper.keep_alive().await?;
                let answer = tokio::time::timeout(bound, answers.message())
                    .await
                    .map_err(timed("lease renewal"))??;
                match answer {
                    Some(a) if a.ttl() > 0 => reach.metrics.contact(),
                    _ => {
                        return Err(etcd_client::Error::InvalidArgs(
                            "the lease expired".into(),
                        ))
                    }
                }
            }
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
