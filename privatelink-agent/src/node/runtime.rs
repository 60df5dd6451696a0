//! `privatelink-agent run`: load (reusing pinned maps), attach through pinned links, serve the API,
//! and keep the maps in sync with the control plane (on every revision, and periodically with a
//! full comparison that repairs drift).
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::programs::xdp::XdpMode;

use crate::{
    control::{api, follow::follow_store, plane::ControlPlane, store::NodeReport},
    datapath::{
        Dataplane, StatsReader,
        loader::Datapath,
        pins::{Attached, Pins},
    },
    node::{
        config::{self, Checked},
        dns::Dns,
        health::{self, Health, TargetKey},
        history::{Counters, History},
        local::NodeFacts,
        metrics::AgentMetrics,
        netwatch::NetWatch,
        sync::{self, NodeConfig},
    },
};

/// What the reconciler carries between runs.
struct Sync {
    skipped: Vec<String>,
    unhealthy: BTreeSet<TargetKey>,
    /// What the node publishes to the control plane (health as applied, history, report).
    facts: Arc<NodeFacts>,
}

/// Applies the control plane's current state to the maps. With `full`, the maps are first read
/// back and compared with what was written: differences are counted as drift and repaired. A
/// refused state is logged and the maps keep the last good state. Flows to backends that turned
/// unhealthy since the last run are cut.
fn reconcile(
    plane: &ControlPlane,
    dataplane: &mut Dataplane,
    node: &NodeConfig,
    health: &Health,
    sync: &mut Sync,
    metrics: &AgentMetrics,
    full: bool,
) {
    let started = std::time::Instant::now();
    let unhealthy = health.unhealthy();
    // Everything needed from the state is taken under its read lock: no copy of the whole state.
    let (revision, (model, skipped), newly) = plane.read(|state| {
        let newly: BTreeSet<(u32, std::net::IpAddr)> = unhealthy
            .difference(&sync.unhealthy)
            .filter_map(|(svc, ip)| {
                let s = state.services.get(svc)?;
                Some((state.networks.get(&s.network_id)?.number, *ip))
            })
            .collect();
        (state.revision, sync::model(state, node, &unhealthy), newly)
    });
    if skipped != sync.skipped {
        for s in &skipped {
            log::warn!("sync: {s}");
        }
        sync.skipped = skipped;
    }
    let result = if full {
        dataplane.resync(&model)
    } else {
        dataplane.apply(&model)
    };
    match &result {
        Ok(r) => {
            metrics.drift_repairs.inc_by(r.drift as u64);
            metrics.revision.set(revision as i64);
        }
        Err(_) => drop(metrics.sync_errors.inc()),
    }
    *metrics.maps.lock().unwrap_or_else(|p| p.into_inner()) = dataplane.map_usage();
    metrics
        .sync_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(r) if r.drift > 0 => log::warn!(
            "sync: revision {}: {} map entries had drifted from what the agent wrote; repaired with {} map writes",
            revision,
            r.drift,
            r.writes
        ),
        Ok(r) if r.writes > 0 || r.flows_cut > 0 => {
            log::info!(
                "sync: revision {}: {} map writes, {} flows cut",
                revision,
                r.writes,
                r.flows_cut
            )
        }
        Ok(_) => log::debug!("sync: revision {}: maps up to date", revision),
        Err(e) => log::error!(
            "sync: revision {} refused, maps keep the last good state: {e}",
            revision
        ),
    }
    if !newly.is_empty() {
        let n = dataplane.cut_backend_flows(&newly);
        log::warn!("health: cut {n} conntrack entries of flows to backends that turned unhealthy");
    }
    sync.unhealthy = unhealthy;
    sync.facts.set_health(health.by_service());
}

/// Attaches to `name`; returns the mode it runs in.
fn attach(dp: &mut Datapath, pins: &Pins, name: &str, generic: bool) -> Result<&'static str> {
    let prog = dp.program();
    let mut mode = if generic { "generic" } else { "native" };
    let how = if generic {
        pins.attach(prog, name, XdpMode::Skb)
            .with_context(|| format!("attaching (generic) to {name}"))?
    } else {
        match pins.attach(prog, name, XdpMode::Driver) {
            Ok(a) => a,
            Err(e) => {
                log::warn!("native XDP on {name} failed ({e:#}); falling back to generic mode");
                mode = "generic";
                pins.attach(prog, name, XdpMode::Skb)
                    .with_context(|| format!("attaching (generic) to {name}"))?
            }
        }
    };
    match how {
        Attached::Replaced => {
            log::info!("{name}: replaced the running program through its pinned link")
        }
        Attached::New => log::info!("{name}: attached ({mode})"),
    }
    Ok(mode)
}

/// The node's interfaces as they are now: attaches to those that appeared or were re-created
/// (new ifindex), and returns whether the set changed (so the maps need a sync).
struct Interfaces {
    /// name → (ifindex, mode) of interfaces with the program attached.
    attached: BTreeMap<String, (u32, &'static str)>,
    missing: Vec<String>,
}

impl Interfaces {
    fn refresh(
        &mut self,
        dp: &mut Datapath,
        pins: &Pins,
        cfg: &Checked,
        node: &mut NodeConfig,
        metrics: &AgentMetrics,
    ) -> bool {
        let (found, missing) = config::resolve(&cfg.wanted);
        if missing != self.missing {
            for m in &missing {
                log::warn!("interface {m} is not there; attaching when it appears");
            }
            self.missing = missing;
        }
        let present: BTreeMap<String, u32> =
            found.iter().map(|i| (i.name.clone(), i.ifindex)).collect();
        for (name, &ifindex) in &present {
            if self.attached.get(name).map(|a| a.0) == Some(ifindex) {
                continue;
            }
            match attach(
                dp,
                pins,
                name,
                cfg.attach.get(name).copied().unwrap_or(false),
            ) {
                Ok(mode) => drop(self.attached.insert(name.clone(), (ifindex, mode))),
                Err(e) => log::error!("{name}: {e:#}"),
            }
        }
        self.attached.retain(|n, _| present.contains_key(n));
        metrics.programs.clear();
        for (name, (_, mode)) in &self.attached {
            metrics
                .programs
                .get_or_create(&vec![
                    ("interface", name.clone()),
                    ("mode", mode.to_string()),
                    ("node", cfg.raw.node.clone()),
                ])
                .set(1);
        }
        // Only interfaces with a program count as the node's.
        let ifaces: Vec<_> = found
            .into_iter()
            .filter(|i| self.attached.get(&i.name).map(|a| a.0) == Some(i.ifindex))
            .collect();
        let changed = ifaces != node.ifaces;
        node.ifaces = ifaces;
        changed
    }
}

/// Records one history sample: every endpoint's counters, and each service's sums.
fn sample_history(
    plane: &ControlPlane,
    reader: &StatsReader,
    history: &std::sync::Mutex<History>,
    cfg: &NodeConfig,
) {
    let state = plane.snapshot();
    let now_mono = crate::node::metrics::monotonic_ns();
    let mut active: BTreeMap<u32, u64> = BTreeMap::new();
    for f in reader.flow_views() {
        if crate::node::metrics::active(&f, now_mono, &cfg.datapath) {
            *active.entry(f.link_id).or_default() += 1;
        }
    }
    let mut drops: BTreeMap<u32, u64> = BTreeMap::new();
    for ((link, _), n) in reader.drops() {
        *drops.entry(link).or_default() += n;
    }
    let mut rows: Vec<(&str, &str, Counters, u64)> = Vec::new();
    let mut services: BTreeMap<&str, (Counters, u64)> = BTreeMap::new();
    for ep in state.endpoints.values() {
        let Some(s) = reader.link(ep.link_id) else {
            continue;
        };
        let c = Counters {
            fwd_bytes: s.fwd_bytes,
            rev_bytes: s.rev_bytes,
            fwd_packets: s.fwd_packets,
            rev_packets: s.rev_packets,
            new_conns: s.new_conns,
            drops: drops.get(&ep.link_id).copied().unwrap_or(0),
        };
        let a = active.get(&ep.link_id).copied().unwrap_or(0);
        rows.push(("endpoint", ep.id.as_str(), c, a));
        let e = services.entry(ep.service_id.as_str()).or_default();
        e.0.fwd_bytes += c.fwd_bytes;
        e.0.rev_bytes += c.rev_bytes;
        e.0.fwd_packets += c.fwd_packets;
        e.0.rev_packets += c.rev_packets;
        e.0.new_conns += c.new_conns;
        e.0.drops += c.drops;
        e.1 += a;
    }
    rows.extend(services.iter().map(|(id, (c, a))| ("service", *id, *c, *a)));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = h.record(now, &rows) {
        log::error!("history: {e}");
    }
    let keep = |kind: &str, id: &str| match kind {
        "endpoint" => state.endpoints.contains_key(id),
        _ => state.services.contains_key(id),
    };
    if let Err(e) = h.retain_cursors(&keep) {
        log::error!("history: {e}");
    }
}

/// Serves `/metrics` (a scrape reads the maps, so it runs on the blocking pool).
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: Arc<prometheus_client::registry::Registry>,
) -> std::io::Result<()> {
    use axum::{http::header, response::IntoResponse, routing::get};
    let app = axum::Router::new().route(
        "/metrics",
        get(move |headers: axum::http::HeaderMap| {
            let registry = registry.clone();
            // Prometheus asks for OpenMetrics; everything else (curl, promtool) gets the classic text.
            let openmetrics = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            async move {
                match tokio::task::spawn_blocking(move || crate::node::metrics::render(&registry))
                    .await
                {
                    Ok(Ok(text)) if openmetrics => (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Ok(Ok(text)) => (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        crate::node::metrics::to_prometheus_text(&text),
                    )
                        .into_response(),
                    _ => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "encoding the metrics failed",
                    )
                        .into_response(),
                }
            }
        }),
    );
    axum::serve(listener, app).await
}

/// Publishes the revision this node applied (in the background: a shared store is a network
/// call), when it changed since the last report that succeeded: a failed report is made again on
/// the next call (the periodic resync makes one), so an outage does not leave the node's row stale.
fn report_applied(
    plane: &Arc<ControlPlane>,
    facts: &NodeFacts,
    node: &str,
    metrics: &AgentMetrics,
    last: &Arc<std::sync::atomic::AtomicI64>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let applied = metrics.revision.get();
    if last.swap(applied, Relaxed) == applied {
        return;
    }
    let report = NodeReport {
        node: node.to_string(),
        revision: applied as u64,
        reported_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    // Listed by this node's own API at once, even while the shared store is unreachable.
    facts.set_report(report.clone());
    let (p, last) = (plane.clone(), last.clone());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = p.report_applied(&report) {
            log::warn!("store: reporting revision {applied}: {e}; trying again later");
            // Unless a newer revision was reported meanwhile.
            let _ = last.compare_exchange(applied, -1, Relaxed, Relaxed);
        }
    });
}

pub fn run(cfg: Checked, detach_on_exit: bool) -> Result<()> {
    let store = cfg.raw.store.open()?;
    let plane = Arc::new(
        ControlPlane::open(store, &cfg.admin_token)?.with_cluster(cfg.raw.cluster.clone()),
    );
    let pins = Pins::prepare(&cfg.raw.bpffs)?;
    let mut dp = Datapath::load_pinned(&cfg.sizes, &pins).context("loading the datapath")?;
    let mut dataplane = Dataplane::new(&mut dp.ebpf)?;
    let flows = dataplane.flows().len() + dataplane.flows6().len();
    if flows > 0 || !dataplane.shadow().links.is_empty() {
        log::info!(
            "reusing pinned maps: {} links, {flows} conntrack entries",
            dataplane.shadow().links.len()
        );
    }
    // Monitoring history beside the state file.
    let history_path = cfg.raw.store.path.with_file_name("history.db");
    let history = Arc::new(std::sync::Mutex::new(
        History::open(&history_path)
            .with_context(|| format!("history: opening {}", history_path.display()))?,
    ));
    let mut sync = Sync {
        skipped: Vec::new(),
        unhealthy: BTreeSet::new(),
        facts: Arc::new(NodeFacts::new(Some(history.clone()))),
    };
    plane.attach_node(sync.facts.clone());
    let health = Arc::new(Health::default());
    let health_changed = Arc::new(tokio::sync::Notify::new());
    let metrics = Arc::new(AgentMetrics::default());
    let registry = Arc::new(crate::node::metrics::registry(
        crate::node::metrics::Sources {
            node: cfg.raw.node.clone(),
            reader: dataplane.stats_reader()?,
            plane: plane.clone(),
            config: cfg.node.clone(),
            agent: metrics.clone(),
        },
    ));
    let history_reader = dataplane.stats_reader()?;
    let mut node = cfg.node.clone();
    let mut ifaces = Interfaces {
        attached: BTreeMap::new(),
        missing: Vec::new(),
    };
    ifaces.refresh(&mut dp, &pins, &cfg, &mut node, &metrics);
    reconcile(
        &plane,
        &mut dataplane,
        &node,
        &health,
        &mut sync,
        &metrics,
        false,
    );
    for stale in pins.stale_maps() {
        log::warn!(
            "removing {} pinned by an agent with another map layout (its state is not reused)",
            stale.display()
        );
        std::fs::remove_file(&stale).ok();
    }
    log::info!(
        "node {}: datapath on {} of {} interfaces, state revision {}",
        cfg.raw.node,
        node.ifaces.len(),
        cfg.wanted.len(),
        plane.revision()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.raw.api.listen)
            .await
            .with_context(|| format!("api.listen: binding {}", cfg.raw.api.listen))?;
        log::info!("control-plane API on http://{}", cfg.raw.api.listen);
        let server = tokio::spawn(api::serve(listener, plane.clone()));
        let metrics_listener = tokio::net::TcpListener::bind(cfg.raw.metrics.listen)
            .await
            .with_context(|| format!("metrics.listen: binding {}", cfg.raw.metrics.listen))?;
        log::info!("metrics on http://{}/metrics", cfg.raw.metrics.listen);
        let metrics_server = tokio::spawn(serve_metrics(metrics_listener, registry.clone()));
        let checker = tokio::spawn(health::run(plane.clone(), health.clone(), health_changed.clone()));
        let mut revisions = plane.subscribe();
        let mut resync = tokio::time::interval(Duration::from_secs(cfg.raw.resync_interval));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        // Route and neighbour changes bump the FIB generation from the watcher's own thread: a full
        // resync in this loop must not hold back a moved next hop.
        let config = dataplane.config_map();
        let mut net = NetWatch::new(move || match config.bump_fib_generation() {
            Ok(g) => log::debug!("routes or neighbours changed: FIB generation {g}"),
            Err(e) => log::warn!("routes or neighbours changed, but the FIB generation was not bumped: {e}"),
        })
        .context("subscribing to link, route and neighbour events")?;
        let mut sample =
            tokio::time::interval(Duration::from_secs(cfg.raw.history.sample_interval));
        // Conntrack sweeps on a thread of their own: a full table takes long to walk.
        let sweeping = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sweeper = {
            let (on, mut ct) = (sweeping.clone(), dataplane.stats_reader()?);
            let (every, timeouts) = (
                Duration::from_secs(cfg.raw.conntrack.gc_interval),
                node.datapath,
            );
            std::thread::Builder::new()
                .name("ct-sweep".into())
                .spawn(move || {
                    let mut last = std::time::Instant::now();
                    while on.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                        if last.elapsed() >= every {
                            last = std::time::Instant::now();
                            let n = ct.sweep_expired(crate::node::metrics::monotonic_ns(), &timeouts);
                            if n > 0 {
                                log::debug!("conntrack: {n} expired entries removed");
                            }
                        }
                    }
                })?
        };
        let mut dns = Dns::new(cfg.raw.dns.clone(), cfg.raw.cluster.clone())
            .context("dns: setting up the forwarder")?;
        let follower = cfg
            .raw
            .store
            .etcd()
            .map(|e| tokio::spawn(follow_store(e, plane.clone(), metrics.store.clone())));
        let reported = Arc::new(std::sync::atomic::AtomicI64::new(-1));
        report_applied(&plane, &sync.facts, &cfg.raw.node, &metrics, &reported);
        plane.read(|s| dns.update(s));
        dns.ensure(&node.ifaces);
        loop {
            tokio::select! {
                changed = revisions.changed() => {
                    if changed.is_err() { break; }
                    reconcile(&plane, &mut dataplane, &node, &health, &mut sync, &metrics, false);
                    plane.read(|s| dns.update(s));
                    report_applied(&plane, &sync.facts, &cfg.raw.node, &metrics, &reported);
                }
                changes = net.changed() => {
                    if changes.links && ifaces.refresh(&mut dp, &pins, &cfg, &mut node, &metrics) {
                        reconcile(&plane, &mut dataplane, &node, &health, &mut sync, &metrics, false);
                        dns.ensure(&node.ifaces);
                    }
                }
                _ = resync.tick() => {
                    // Rescan too, in case an event was missed.
                    ifaces.refresh(&mut dp, &pins, &cfg, &mut node, &metrics);
                    reconcile(&plane, &mut dataplane, &node, &health, &mut sync, &metrics, true);
                    dns.ensure(&node.ifaces);
                    report_applied(&plane, &sync.facts, &cfg.raw.node, &metrics, &reported);
                }
                _ = health_changed.notified() => reconcile(&plane, &mut dataplane, &node, &health, &mut sync, &metrics, false),
                _ = sample.tick() => sample_history(&plane, &history_reader, &history, &node),

                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        server.abort();
        metrics_server.abort();
        checker.abort();
        if let Some(f) = follower {
            f.abort();
        }
        sweeping.store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = sweeper.join();
        Ok::<(), anyhow::Error>(())
    })?;
    if detach_on_exit {
        let n = pins.remove_all()?;
        log::info!("stopped and detached: {n} pins removed");
    } else {
        log::info!(
            "stopped; forwarding continues through the pinned programs and maps (`privatelink-agent detach` removes them)"
        );
    }
    Ok(())
}
