//! `privatelink-agent run`: the node runtime. [`Node::open`] loads the datapath (reusing pinned
//! maps), attaches it through pinned links and applies the current state; [`run`] then serves the
//! API, metrics and DNS and hands every [`Event`] to [`Node::handle`]: a new revision, changed
//! links, the periodic resync (a full comparison that repairs drift), changed backend health, a
//! history sample.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::AtomicI64},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    control::types::Cluster,
    control::{
        api, clock::unix_secs, etcd::EtcdConfig, follow::follow_store, plane::ControlPlane,
        store::NodeReport,
    },
    datapath::{
        Dataplane, StatsReader,
        loader::Datapath,
        pins::{Persistence, Pins},
        scan::{Latest, Scanner},
    },
    node::{
        announce,
        config::{Checked, DnsConfig, HaChecked},
        dns::Dns,
        ha::HaShared,
        health::{self, Health, TargetKey},
        history::{Counters, History},
        interfaces::Interfaces,
        local::NodeFacts,
        metrics::AgentMetrics,
        netwatch::NetWatch,
        sync::{NodeConfig, model},
    },
};

/// What happens to forwarding when the agent stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    /// Programs and maps stay pinned: forwarding goes on, and the next agent takes them over.
    KeepForwarding,
    /// Programs, links and pins are removed: forwarding stops.
    Detach,
}

/// How a sync writes the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SyncKind {
    /// Compile the state and write what differs from what was written last.
    Changes,
    /// Read the maps back first, count and repair drift, then write the differences.
    Full,
}

/// What the event loop hands to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The control plane has a new revision.
    Revision,
    /// Interfaces appeared, vanished or changed.
    Links,
    /// The periodic resync: rescan interfaces, full sync, report again.
    Resync,
    /// A backend's health changed.
    Health,
    /// Time for a monitoring-history sample.
    Sample,
    /// This node became active for its high-availability group, or stopped being active.
    Activity,
}

/// The settings the runtime reads after start, taken from the configuration once.
struct Settings {
    api: crate::control::serve::Serving,
    metrics: SocketAddr,
    resync: Duration,
    sample: Duration,
    sweep: Duration,
    etcd: Option<EtcdConfig>,
    dns: DnsConfig,
    cluster: Cluster,
}

/// What the reconciler carries between runs.
struct Sync {
    skipped: Vec<String>,
    unhealthy: BTreeSet<TargetKey>,
    /// What the node publishes to the control plane (health as applied, history, report).
    facts: Arc<NodeFacts>,
}

/// A network node: the control plane it follows, its datapath and everything that keeps them in
/// step.
pub struct Node {
    name: String,
    settings: Settings,
    plane: Arc<ControlPlane>,
    pins: Pins,
    dp: Datapath,
    dataplane: Dataplane,
    /// The node's contribution to its model: attached interfaces, NAT ranges, timeouts.
    node: NodeConfig,
    interfaces: Interfaces,
    health: Arc<Health>,
    sync: Sync,
    metrics: Arc<AgentMetrics>,
    history: Arc<Mutex<History>>,
    history_reader: StatsReader,
    /// The revision last reported (-1: none, or the last report failed).
    reported: Arc<AtomicI64>,
    /// Whether the pins outlive the agent.
    persistence: Persistence,
    dns: Option<Dns>,
    /// The latest conntrack scan (metrics and history read it).
    conntrack: Latest,
    /// The high-availability group this node serves its consumer networks with, if any.
    ha: Option<(HaChecked, Arc<HaShared>)>,
    /// The group's units whose addresses this node has added (it is active for them). At start,
    /// every unit: a node that was killed left its addresses behind, and standing by it must not
    /// answer for them (its first `move_addresses` removes them).
    moved: BTreeSet<String>,
}

impl Node {
    /// Opens the store and the datapath, attaches to the interfaces there are, and applies the
    /// current state.
    pub fn open(cfg: Checked) -> Result<Self> {
        let raw = cfg.raw;
        let store = raw.store.open()?;
        let plane = Arc::new(
            ControlPlane::open(store, &cfg.admin_token)?.with_cluster(raw.cluster.clone()),
        );
        let pins = Pins::prepare(&raw.bpffs)?;
        let persistence = pins.persistence();
        match persistence {
            Persistence::Host => {}
            Persistence::Unknown => log::warn!(
                "bpffs: the host's mounts (/proc/1/mountinfo) cannot be read, so whether the pins \
                 under {} outlive the agent is not known",
                raw.bpffs.display()
            ),
            Persistence::Private if raw.ephemeral_pins => log::warn!(
                "bpffs: {} is on this process's own bpffs (ephemeral_pins): forwarding stops with \
                 the agent, and a restart starts with empty conntrack",
                raw.bpffs.display()
            ),
            Persistence::Private => anyhow::bail!(
                "bpffs: {} is on a bpffs of the agent's own mount namespace (as `ip netns exec` \
                 and `unshare -m` make): its pins, and so forwarding and conntrack, would end with \
                 the agent. Run it in the node's network namespace without a new mount namespace \
                 (`nsenter --net=/run/netns/NODE privatelink-agent run ...`), or set `bpffs` to a \
                 directory on a bpffs the host has mounted (/sys/fs/bpf), or accept pins that end \
                 with the process (`ephemeral_pins = true`, `--ephemeral-pins`)",
                raw.bpffs.display()
            ),
        }
        let dp = Datapath::load_pinned(&cfg.sizes, &pins).context("loading the datapath")?;
        let mut dp = dp;
        let dataplane = Dataplane::new(&mut dp.ebpf)?;
        let flows = dataplane.flows().len() + dataplane.flows6().len();
        if flows > 0 || !dataplane.shadow().links.is_empty() {
            log::info!(
                "reusing pinned maps: {} links, {flows} conntrack entries",
                dataplane.shadow().links.len()
            );
        }
        // Monitoring history beside the state file.
        let history_path = raw.store.path.with_file_name("history.db");
        let history = Arc::new(Mutex::new(
            History::open(&history_path)
                .with_context(|| format!("history: opening {}", history_path.display()))?,
        ));
        // The connection log beside it too.
        let log_path = raw.store.path.with_file_name("connections.jsonl");
        let conn_log = Arc::new(
            crate::node::connlog::ConnLog::open(Some(&log_path))
                .with_context(|| format!("connection log: opening {}", log_path.display()))?,
        );
        let facts = Arc::new(NodeFacts::new(Some(history.clone()), conn_log));
        plane.attach_node(facts.clone());
        let history_reader = dataplane.stats_reader()?;
        let mut node = Node {
            name: raw.node.clone(),
            settings: Settings {
                api: raw.api.serving("api")?,
                metrics: raw.metrics.listen,
                resync: Duration::from_secs(raw.resync_interval),
                sample: Duration::from_secs(raw.history.sample_interval),
                sweep: Duration::from_secs(raw.conntrack.gc_interval),
                etcd: raw.store.etcd(),
                dns: raw.dns.clone(),
                cluster: raw.cluster.clone(),
            },
            plane,
            pins,
            dp,
            dataplane,
            node: cfg.node,
            interfaces: Interfaces::new(cfg.wanted, cfg.attach, raw.node.clone()),
            health: Arc::new(Health::default()),
            sync: Sync {
                skipped: Vec::new(),
                unhealthy: BTreeSet::new(),
                facts,
            },
            metrics: Arc::new(AgentMetrics::default()),
            history,
            history_reader,
            reported: Arc::new(AtomicI64::new(-1)),
            persistence,
            dns: None,
            conntrack: Latest::default(),
            moved: cfg
                .ha
                .iter()
                .flat_map(|h| h.group.units.iter().map(|u| u.name.clone()))
                .collect(),
            ha: cfg.ha.map(|h| {
                let shared = Arc::new(HaShared::new(&h.group.units));
                (h, shared)
            }),
        };
        if let Some((c, h)) = &node.ha {
            node.sync.facts.set_ha(c.group.group.clone(), h.clone());
        }
        node.refresh_interfaces();
        node.reconcile(SyncKind::Changes);
        for stale in node.pins.stale_maps() {
            log::warn!(
                "removing {} pinned by an agent with another map layout (its state is not reused)",
                stale.display()
            );
            std::fs::remove_file(&stale).ok();
        }
        log::info!(
            "node {}: datapath on {} of {} interfaces, state revision {}",
            node.name,
            node.node.ifaces.len(),
            node.interfaces.wanted(),
            node.plane.revision()
        );
        Ok(node)
    }

    /// Reacts to one event.
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Revision => {
                self.reconcile(SyncKind::Changes);
                self.update_dns();
                self.report_applied();
            }
            Event::Links => {
                if self.refresh_interfaces() {
                    self.reconcile(SyncKind::Changes);
                    self.ensure_dns();
                }
            }
            Event::Resync => {
                // Rescan too, in case an event was missed.
                self.refresh_interfaces();
                self.reconcile(SyncKind::Full);
                self.ensure_dns();
                self.report_applied();
            }
            Event::Health => self.reconcile(SyncKind::Changes),
            Event::Sample => self.sample_history(),
            Event::Activity => {
                self.reconcile(SyncKind::Changes);
                self.move_addresses();
            }
        }
    }

    /// After a change of activity: the moving addresses of the units this node became active for
    /// are added, those of the units it stopped being active for removed; the newly active units'
    /// addresses and their endpoints' addresses are announced on their segments, at once and
    /// again after 0.3, 1 and 2 s (a neighbour entry updated less than a second before ignores an
    /// announcement).
    fn move_addresses(&mut self) {
        let Some((cfg, shared)) = &self.ha else {
            return;
        };
        let active = shared.active_units();
        let by_name = |n: &str| self.node.ifaces.iter().find(|i| i.name == n);
        let mut frames: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut announce: BTreeSet<&str> = BTreeSet::new();
        for unit in &cfg.group.units {
            let on = active.contains(&unit.name);
            if on == self.moved.contains(&unit.name) {
                continue;
            }
            for (name, net) in &unit.addresses {
                let Some(i) = by_name(name) else {
                    log::warn!("ha: interface {name} is not there: {net} not moved");
                    continue;
                };
                if let Err(e) = crate::node::netlink::set_address(i.ifindex, *net, on) {
                    log::error!(
                        "ha: {} {net} on {name}: {e}",
                        if on { "adding" } else { "removing" }
                    );
                }
                if on {
                    frames.push((i.ifindex, announce::frame(i.mac, net.addr())));
                }
            }
            if on {
                announce.extend(unit.networks.iter().map(String::as_str));
            }
        }
        self.moved = active;
        self.plane.read(|s| {
            for i in self.node.ifaces.iter().filter(|i| {
                i.role == crate::datapath::Role::Consumer && announce.contains(i.network.as_str())
            }) {
                for ep in s.endpoints.values().filter(|e| e.network_id == i.network) {
                    for a in std::iter::once(ep.ip).chain(ep.ipv6.map(Into::into)) {
                        frames.push((i.ifindex, announce::frame(i.mac, a)));
                    }
                }
            }
        });
        if frames.is_empty() {
            return;
        }
        log::info!("ha: announcing {} addresses", frames.len());
        std::thread::spawn(move || {
            for wait in [0, 300, 700, 1000] {
                std::thread::sleep(Duration::from_millis(wait));
                for (ifindex, f) in &frames {
                    if let Err(e) = announce::send(*ifindex, std::slice::from_ref(f)) {
                        log::warn!("ha: announcing on interface {ifindex}: {e}");
                    }
                }
            }
        });
    }

    fn refresh_interfaces(&mut self) -> bool {
        self.interfaces
            .refresh(&mut self.dp, &self.pins, &mut self.node, &self.metrics)
    }

    fn update_dns(&mut self) {
        if let Some(dns) = self.dns.as_mut() {
            self.plane.read(|s| dns.update(s));
        }
    }

    fn ensure_dns(&mut self) {
        if let Some(dns) = self.dns.as_mut() {
            dns.ensure(&self.node.ifaces);
        }
    }

    /// Applies the control plane's current state to the maps. A full sync first reads the maps
    /// back and compares them with what was written: differences are counted as drift and
    /// repaired. A refused state is logged and the maps keep the last good state. Flows to
    /// backends that turned unhealthy since the last run are cut.
    fn reconcile(&mut self, kind: SyncKind) {
        let Node {
            plane,
            dataplane,
            node,
            health,
            sync,
            metrics,
            ha,
            ..
        } = self;
        let started = std::time::Instant::now();
        let unhealthy = health.unhealthy();

        // Everything needed from the state is taken under its read lock: no copy of the whole state.
        let (revision, (model, skipped), newly, units) = plane.read(|state| {
            let newly: BTreeSet<(u32, std::net::IpAddr)> = unhealthy
                .difference(&sync.unhealthy)
                .filter_map(|(svc, ip)| {
                    let s = state.services.get(svc)?;
                    Some((state.networks.get(&s.network_id)?.number, *ip))
                })
                .collect();
            // The group's units by consumer network number.
            let units: BTreeMap<u32, String> = ha
                .iter()
                .flat_map(|(c, _)| &c.group.units)
                .flat_map(|u| u.networks.iter().map(move |n| (n, &u.name)))
                .filter_map(|(n, u)| Some((state.networks.get(n)?.number, u.clone())))
                .collect();
            (state.revision, model(state, node, &unhealthy), newly, units)
        });
        // A node of a high-availability group forwards nothing of the consumer networks it stands
        // by for; flows synced to it are checked against the whole model (shared, not copied,
        // while it is active for every unit).
        let model = Arc::new(model);
        let model = match ha {
            Some((_, h)) => {
                h.set_model(model.clone(), units);
                let standby = |i: &crate::datapath::Iface| {
                    i.role == crate::datapath::Role::Consumer && !h.forwards(i.network_id)
                };
                if !model.ifaces.iter().any(standby) {
                    model
                } else {
                    let mut part = (*model).clone();
                    part.ifaces.retain(|i| !standby(i));
                    Arc::new(part)
                }
            }
            None => model,
        };
        if skipped != sync.skipped {
            for s in &skipped {
                log::warn!("sync: {s}");
            }
            sync.skipped = skipped;
        }
        let result = match kind {
            SyncKind::Full => dataplane.resync(&model),
            SyncKind::Changes => dataplane.apply(&model),
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
            log::warn!(
                "health: cut {n} conntrack entries of flows to backends that turned unhealthy"
            );
        }
        sync.unhealthy = unhealthy;
        sync.facts.set_health(health.by_service());
    }

    /// Records one history sample: every endpoint's counters, and each service's sums.
    fn sample_history(&self) {
        let (plane, reader, history) = (&self.plane, &self.history_reader, &self.history);
        let state = plane.snapshot();
        // Live connections as of the last conntrack scan.
        let scan = self.conntrack.get();
        let active = &scan.active_by_link;
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
        let now = unix_secs();
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

    /// Publishes the revision this node applied (in the background: a shared store is a network
    /// call), when it changed since the last report that succeeded: a failed report is made again on
    /// the next call (the periodic resync makes one), so an outage does not leave the node's row stale.
    fn report_applied(&self) {
        let (plane, facts, node, metrics, last) = (
            &self.plane,
            &self.sync.facts,
            self.name.as_str(),
            &self.metrics,
            &self.reported,
        );
        use std::sync::atomic::Ordering::Relaxed;
        let applied = metrics.revision.get();
        if last.swap(applied, Relaxed) == applied {
            return;
        }
        let report = NodeReport {
            node: node.to_string(),
            revision: applied as u64,
            reported_at: unix_secs(),
            api: self.settings.api.advertise.clone(),
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
}

/// Asks a running node to stop, as SIGTERM or Ctrl-C do (for a node run in-process, such as the
/// demo's). A stop asked before the node's loop waits for it is kept.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(Arc<tokio::sync::Notify>);

impl Shutdown {
    pub fn stop(&self) {
        self.0.notify_one();
    }
}

/// Runs the node until SIGTERM or Ctrl-C; then, by `on_exit`, leaves forwarding to the pinned
/// programs or detaches them.
pub fn run(cfg: Checked, on_exit: OnExit) -> Result<()> {
    run_until(cfg, on_exit, Shutdown::default())
}

/// The same, stopping also when `shutdown` is asked to.
pub fn run_until(cfg: Checked, on_exit: OnExit, shutdown: Shutdown) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let node = rt.block_on(serve(Node::open(cfg)?, shutdown))?;
    match on_exit {
        OnExit::Detach => {
            let n = node.pins.remove_all()?;
            log::info!("stopped and detached: {n} pins removed");
        }
        OnExit::KeepForwarding if node.persistence == Persistence::Private => log::warn!(
            "stopped; the pins were on this process's own bpffs and end with it: forwarding stops"
        ),
        OnExit::KeepForwarding => log::info!(
            "stopped; forwarding continues through the pinned programs and maps (`privatelink-agent detach` removes them)"
        ),
    }
    Ok(())
}

/// Serves the API, metrics and DNS, and feeds the node its events until asked to stop.
async fn serve(mut node: Node, shutdown: Shutdown) -> Result<Node> {
    let s = &node.settings;
    let (listener, tls) = s.api.bind().await?;
    node.plane
        .auth_limiter()
        .set_max_failures(s.api.auth_failures_per_minute);
    let metrics_listener = tokio::net::TcpListener::bind(s.metrics)
        .await
        .with_context(|| format!("metrics.listen: binding {}", s.metrics))?;
    log::info!("metrics on http://{}/metrics", s.metrics);
    // The connection log: opened records from the datapath's ring buffer, closed ones from the
    // scan below.
    let conn_log = node.sync.facts.conn_log();
    let _conn_reader = match node.dataplane.take_conn_log() {
        Some(ring) => Some(
            crate::node::connlog::Reader::start(ring, conn_log.clone(), node.plane.clone())
                .context("starting the connection log's reader")?,
        ),
        None => None,
    };
    // One conntrack scan per period: it removes expired entries and feeds metrics and history.
    let plane = node.plane.clone();
    let _scanner = Scanner::start(
        node.dataplane.stats_reader()?,
        s.sweep,
        node.node.datapath,
        node.conntrack.clone(),
        move |ended| conn_log.ended(&plane, &ended),
    )
    .context("starting the conntrack scanner")?;
    let registry = Arc::new(crate::node::metrics::registry(
        crate::node::metrics::Sources {
            node: node.name.clone(),
            reader: node.dataplane.stats_reader()?,
            plane: node.plane.clone(),
            config: node.node.clone(),
            agent: node.metrics.clone(),
            conntrack: node.conntrack.clone(),
            ha: node
                .ha
                .as_ref()
                .map(|(c, h)| (c.group.group.clone(), c.group.timing.fence, h.clone())),
        },
    ));
    let health_changed = Arc::new(tokio::sync::Notify::new());
    let tasks = [
        tokio::spawn(api::serve_with(
            listener,
            node.plane.clone(),
            s.api.limits.clone(),
            tls,
        )),
        tokio::spawn(crate::node::metrics::serve(metrics_listener, registry)),
    ];
    let checker = tokio::spawn(health::run(
        node.plane.clone(),
        node.health.clone(),
        health_changed.clone(),
    ));
    let follower = s.etcd.clone().map(|e| {
        tokio::spawn(follow_store(
            e,
            node.plane.clone(),
            node.metrics.store.clone(),
            Some(node.name.clone()),
        ))
    });
    // The datapath's flow-sync events: on in a group (its task reads them), off otherwise (a node
    // taken out of a group must not fill a ring nobody reads).
    let mut flow_sync = node
        .dataplane
        .take_flow_sync()
        .context("the flow sync's maps were taken already")?;
    let grouped = node.ha.is_some() && s.etcd.is_some();
    flow_sync
        .switch(grouped)
        .context("switching the datapath's flow-sync events")?;
    let group = match (&node.ha, &s.etcd) {
        (Some((cfg, shared)), Some(e)) => Some(tokio::spawn(crate::node::ha::run(
            cfg.group.clone(),
            e.clone(),
            shared.clone(),
            node.dataplane.flow_tables()?,
            node.dataplane.flow_tables()?,
            flow_sync,
        ))),
        _ => None,
    };
    // `HaShared::changed` keeps a wake-up that comes while the loop is busy (a Notify permit).
    let ha = node.ha.as_ref().map(|(_, h)| h.clone());
    let mut revisions = node.plane.subscribe();
    let mut resync = tokio::time::interval(s.resync);
    let mut sample = tokio::time::interval(s.sample);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Route and neighbour changes bump the FIB generation from the watcher's own thread: a full
    // resync in this loop must not hold back a moved next hop.
    let config = node.dataplane.config_map();
    let mut net = NetWatch::new(move || match config.bump_fib_generation() {
        Ok(g) => log::debug!("routes or neighbours changed: FIB generation {g}"),
        Err(e) => {
            log::warn!("routes or neighbours changed, but the FIB generation was not bumped: {e}")
        }
    })
    .context("subscribing to link, route and neighbour events")?;
    node.dns =
        Some(Dns::new(s.dns.clone(), s.cluster.clone()).context("dns: setting up the forwarder")?);
    node.report_applied();
    node.update_dns();
    node.ensure_dns();
    // Standing by at start: the moving addresses a killed agent left behind go.
    node.move_addresses();
    loop {
        let event = tokio::select! {
            changed = revisions.changed() => match changed {
                Ok(()) => Event::Revision,
                Err(_) => break,
            },
            changes = net.changed() => {
                if !changes.links {
                    continue;
                }
                Event::Links
            }
            _ = resync.tick() => Event::Resync,
            _ = health_changed.notified() => Event::Health,
            _ = sample.tick() => Event::Sample,
            _ = async {
                match &ha {
                    Some(h) => h.changed().await,
                    None => std::future::pending().await,
                }
            } => Event::Activity,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = shutdown.0.notified() => break,
        };
        node.handle(event);
    }
    for t in tasks {
        t.abort();
    }
    checker.abort();
    if let Some(f) = follower {
        f.abort();
    }
    if let Some(g) = group {
        g.abort();
    }
    Ok(node)
}
