//! Prometheus exposition (OpenMetrics text at `/metrics`).
//!
//! Counters are read from the per-CPU maps at scrape time and summed; they survive agent restarts
//! because the maps are pinned. Labels come from the control plane, so series exist exactly for the
//! objects that exist: a deleted endpoint's series disappear.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use privatelink_common::{DROP_NAT_EXHAUSTED, OUTCOME_NAMES, is_drop};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    control::{follow::StoreMetrics, plane::ControlPlane},
    datapath::StatsReader,
    datapath::scan::ConntrackSummary,
    node::sync::NodeConfig,
};

type Labels = Vec<(&'static str, String)>;

/// Metrics the agent's loop updates.
#[derive(Debug)]
pub struct AgentMetrics {
    pub sync_duration: Histogram,
    pub sync_errors: Counter,
    pub drift_repairs: Counter,
    pub revision: Gauge,
    /// Following the shared store.
    pub store: StoreMetrics,
    /// (interface, mode) → 1 while attached.
    pub programs: Family<Labels, Gauge>,
    /// Map → (entries, capacity), from the writer's shadow after each sync.
    pub maps: Mutex<Vec<(&'static str, usize, u32)>>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            sync_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            sync_errors: Counter::default(),
            drift_repairs: Counter::default(),
            revision: Gauge::default(),
            store: StoreMetrics::default(),
            programs: Family::default(),
            maps: Mutex::new(Vec::new()),
        }
    }
}

/// What a scrape reads from the node.
pub struct Sources {
    pub node: String,
    pub reader: StatsReader,
    pub plane: Arc<ControlPlane>,
    pub config: NodeConfig,
    pub agent: Arc<AgentMetrics>,
    /// The latest conntrack scan.
    pub conntrack: crate::datapath::scan::Latest,
    /// The high-availability group: (name, fence, what its task shares).
    pub ha: Option<(String, std::time::Duration, Arc<crate::node::ha::HaShared>)>,
}

struct NodeCollector {
    sources: Mutex<Sources>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

/// A family of const metrics: (labels, value) rows under one descriptor. The descriptor is written
/// even without rows, so every family is declared (a link's drop series appear with its first drop).
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: Vec<(Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut d = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, m) in rows {
        m.encode(d.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: i64) -> ConstGauge<i64> {
    ConstGauge::new(v)
}

fn gauge_f(v: f64) -> ConstGauge<f64> {
    ConstGauge::new(v)
}

/// What one scrape reads, once, for every family.
struct Scrape<'a> {
    src: &'a Sources,
    state: Arc<crate::control::state::State>,
    /// Conntrack as of the last scan (one read per period, shared with history and the sweep).
    ct: Arc<ConntrackSummary>,
    drops: BTreeMap<(u32, u32), u64>,
    /// `node` label alone.
    node: Labels,
}

impl Scrape<'_> {
    fn node_name(&self) -> String {
        self.src.node.clone()
    }
}

/// A link's or a service's traffic totals.
#[derive(Clone, Copy, Default)]
struct Traffic {
    fwd_bytes: u64,
    rev_bytes: u64,
    fwd_packets: u64,
    rev_packets: u64,
    new_connections: u64,
    active: i64,
}

impl Traffic {
    fn add(&mut self, o: &Traffic) {
        self.fwd_bytes += o.fwd_bytes;
        self.rev_bytes += o.rev_bytes;
        self.fwd_packets += o.fwd_packets;
        self.rev_packets += o.rev_packets;
        self.new_connections += o.new_connections;
        self.active += o.active;
    }
}

/// The rows of one labelled object's traffic families.
#[derive(Default)]
struct TrafficRows {
    bytes: Vec<(Labels, ConstCounter<u64>)>,
    packets: Vec<(Labels, ConstCounter<u64>)>,
    connections: Vec<(Labels, ConstCounter<u64>)>,
    active: Vec<(Labels, ConstGauge<i64>)>,
}

impl TrafficRows {
    fn push(&mut self, labels: &Labels, t: &Traffic) {
        let with = |d: &str| {
            let mut l = labels.clone();
            l.push(("direction", d.to_string()));
            l
        };
        self.bytes.push((with("forward"), counter(t.fwd_bytes)));
        self.bytes.push((with("reply"), counter(t.rev_bytes)));
        self.packets.push((with("forward"), counter(t.fwd_packets)));
        self.packets.push((with("reply"), counter(t.rev_packets)));
        self.connections
            .push((labels.clone(), counter(t.new_connections)));
        self.active.push((labels.clone(), gauge(t.active)));
    }

    /// Encodes the four families under `prefix` (`privatelink_link`, `privatelink_service`).
    fn encode(
        self,
        enc: &mut DescriptorEncoder,
        prefix: &str,
        help: [&str; 4],
    ) -> Result<(), std::fmt::Error> {
        let name = |n: &str| format!("{prefix}_{n}");
        family(
            enc,
            &name("bytes"),
            help[0],
            MetricType::Counter,
            self.bytes,
        )?;
        family(
            enc,
            &name("packets"),
            help[1],
            MetricType::Counter,
            self.packets,
        )?;
        family(
            enc,
            &name("connections"),
            help[2],
            MetricType::Counter,
            self.connections,
        )?;
        family(
            enc,
            &name("active_connections"),
            help[3],
            MetricType::Gauge,
            self.active,
        )
    }
}

/// Per link (endpoint) and per service: traffic, resets, drops by reason.
fn encode_traffic(enc: &mut DescriptorEncoder, s: &Scrape) -> Result<(), std::fmt::Error> {
    let node = s.node_name();
    let (mut links, mut resets, mut drop_rows) = (TrafficRows::default(), Vec::new(), Vec::new());
    let mut limits = Vec::new();
    let mut services: BTreeMap<&str, (Labels, Traffic)> = BTreeMap::new();
    for ep in s.state.endpoints.values() {
        let Some(svc) = s.state.services.get(&ep.service_id) else {
            continue;
        };
        let Some(c) = s.src.reader.link(ep.link_id) else {
            continue;
        };
        let labels: Labels = vec![
            ("service_id", svc.id.clone()),
            ("service_name", svc.name.clone()),
            ("endpoint_id", ep.id.clone()),
            ("endpoint_name", ep.name.clone()),
            ("consumer_account", ep.owner.clone()),
            ("provider_account", svc.owner.clone()),
            ("node", node.clone()),
        ];
        let t = Traffic {
            fwd_bytes: c.fwd_bytes,
            rev_bytes: c.rev_bytes,
            fwd_packets: c.fwd_packets,
            rev_packets: c.rev_packets,
            new_connections: c.new_conns,
            active: s
                .ct
                .active_by_link
                .get(&ep.link_id)
                .map_or(0, |&n| n as i64),
        };
        links.push(&labels, &t);
        limits.push((labels.clone(), gauge(i64::from(svc.flow_limit_of(&ep.id)))));
        resets.push((labels.clone(), counter(c.tcp_resets)));
        for ((_, reason), n) in s.drops.range((ep.link_id, 0)..=(ep.link_id, u32::MAX)) {
            let mut l = labels.clone();
            let name = OUTCOME_NAMES.get(*reason as usize).copied();
            l.push(("reason", name.unwrap_or("unknown").to_string()));
            drop_rows.push((l, counter(*n)));
        }
        services
            .entry(svc.id.as_str())
            .or_insert_with(|| {
                let labels = vec![
                    ("service_id", svc.id.clone()),
                    ("service_name", svc.name.clone()),
                    ("provider_account", svc.owner.clone()),
                    ("node", node.clone()),
                ];
                (labels, Traffic::default())
            })
            .1
            .add(&t);
    }
    links.encode(
        enc,
        "privatelink_link",
        [
            "L2 bytes through a link, by direction",
            "Packets through a link, by direction",
            "New connections (flows) admitted on a link",
            "Live flows of a link: TCP half-open or ESTABLISHED, UDP until its timeout",
        ],
    )?;
    family(
        enc,
        "privatelink_link_flow_limit",
        "Most live flows a link may have on this node (0: no limit); beyond it new flows drop as flow_limit",
        MetricType::Gauge,
        limits,
    )?;
    family(
        enc,
        "privatelink_link_tcp_resets",
        "TCP segments with RST seen on a link",
        MetricType::Counter,
        resets,
    )?;
    family(
        enc,
        "privatelink_link_drops",
        "Packets of a link dropped, by reason",
        MetricType::Counter,
        drop_rows,
    )?;
    let mut rows = TrafficRows::default();
    for (labels, t) in services.values() {
        rows.push(labels, t);
    }
    rows.encode(
        enc,
        "privatelink_service",
        [
            "L2 bytes through all links of a service",
            "Packets through all links of a service",
            "New connections on all links of a service",
            "Live flows of a service",
        ],
    )
}

/// Per service: endpoints by connection state, backend targets by health.
fn encode_services(enc: &mut DescriptorEncoder, s: &Scrape) -> Result<(), std::fmt::Error> {
    let (mut by_state, mut targets) = (Vec::new(), Vec::new());
    for svc in s.state.services.values() {
        let base: Labels = vec![
            ("service_id", svc.id.clone()),
            ("service_name", svc.name.clone()),
            ("node", s.node_name()),
        ];
        let with = |k: &'static str, v: &str| {
            let mut l = base.clone();
            l.push((k, v.to_string()));
            l
        };
        for st in crate::control::types::ConnectionState::ALL {
            let n = s
                .state
                .endpoints
                .values()
                .filter(|e| e.service_id == svc.id && e.state == st)
                .count();
            by_state.push((with("state", &format!("{st:?}")), gauge(n as i64)));
        }
        let healthy = s
            .src
            .plane
            .targets_health(svc)
            .iter()
            .filter(|(_, h)| *h)
            .count();
        targets.push((with("health", "healthy"), gauge(healthy as i64)));
        let unhealthy = (svc.backends.len() - healthy) as i64;
        targets.push((with("health", "unhealthy"), gauge(unhealthy)));
    }
    family(
        enc,
        "privatelink_service_endpoints",
        "Endpoints of a service by connection state",
        MetricType::Gauge,
        by_state,
    )?;
    family(
        enc,
        "privatelink_service_targets",
        "Backend targets of a service by health (this node's checks)",
        MetricType::Gauge,
        targets,
    )
}

/// The node: packets by outcome, the flow cache, conntrack.
fn encode_node(enc: &mut DescriptorEncoder, s: &Scrape) -> Result<(), std::fmt::Error> {
    let rows = s
        .src
        .reader
        .outcomes()
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let l: Labels = vec![
                ("outcome", OUTCOME_NAMES[i].to_string()),
                ("drop", is_drop(i as u32).to_string()),
                ("node", s.node_name()),
            ];
            (l, counter(*v))
        })
        .collect();
    family(
        enc,
        "privatelink_node_packets",
        "Every packet the datapath saw, by outcome (drops and passes included)",
        MetricType::Counter,
        rows,
    )?;
    let one = |v: i64| vec![(s.node.clone(), gauge(v))];
    let (hits, fills) = s.src.reader.flow_cache();
    family(
        enc,
        "privatelink_flow_cache_hits",
        "Packets of established flows served from the per-CPU flow cache instead of conntrack",
        MetricType::Counter,
        vec![(s.node.clone(), counter(hits))],
    )?;
    family(
        enc,
        "privatelink_flow_cache_fills",
        "Conntrack entries copied into the per-CPU flow cache",
        MetricType::Counter,
        vec![(s.node.clone(), counter(fills))],
    )?;
    // Counters by `result`, on this node.
    let by_result = |counts: &[(&str, u64)]| -> Vec<(Labels, ConstCounter<u64>)> {
        counts
            .iter()
            .map(|(result, v)| {
                let l: Labels = vec![("result", result.to_string()), ("node", s.node_name())];
                (l, counter(*v))
            })
            .collect()
    };
    let (refused, limited) = s.src.plane.auth_limiter().counts();
    family(
        enc,
        "privatelink_api_auth_failures",
        "API requests refused for authentication: a missing or wrong token (refused), or from an address over its failure limit (rate_limited)",
        MetricType::Counter,
        by_result(&[("refused", refused), ("rate_limited", limited)]),
    )?;
    let [written, lost, uncounted] = s.src.reader.conn_log();
    family(
        enc,
        "privatelink_connection_log_records",
        "Connection-log records the datapath wrote to its ring buffer (written), lost to a full ring (lost), and logged connections without counters because the counter table was full (uncounted)",
        MetricType::Counter,
        by_result(&[
            ("written", written),
            ("lost", lost),
            ("uncounted", uncounted),
        ]),
    )?;
    let [sent, acked, clamped] = s.src.reader.proxy();
    for (name, help, v) in [
        (
            "privatelink_proxy_headers_sent",
            "PROXY protocol headers put in front of a stream (a resend counts again)",
            sent,
        ),
        (
            "privatelink_proxy_headers_acknowledged",
            "PROXY protocol headers the backend acknowledged",
            acked,
        ),
        (
            "privatelink_proxy_mss_clamped",
            "SYN-ACKs of PROXY flows whose MSS was lowered to leave room for the header",
            clamped,
        ),
    ] {
        family(
            enc,
            name,
            help,
            MetricType::Counter,
            vec![(s.node.clone(), counter(v))],
        )?;
    }
    family(
        enc,
        "privatelink_conntrack_entries",
        "Conntrack entries (two per flow)",
        MetricType::Gauge,
        one(s.ct.entries as i64),
    )?;
    let age_ns = crate::datapath::scan::monotonic_ns().saturating_sub(s.ct.scanned_at_ns);
    family(
        enc,
        "privatelink_conntrack_scan_age_seconds",
        "Seconds since the conntrack scan the entry, connection and NAT figures come from",
        MetricType::Gauge,
        one((age_ns / 1_000_000_000) as i64),
    )?;
    family(
        enc,
        "privatelink_conntrack_expired_removed",
        "Expired conntrack entries the last scan removed",
        MetricType::Gauge,
        one(s.ct.removed as i64),
    )?;
    if let Some(since) = s.src.agent.store.since_contact() {
        family(
            enc,
            "privatelink_store_last_contact_seconds",
            "Seconds since the shared store (etcd) last answered; beyond store.contact_timeout the node's revision is stale",
            MetricType::Gauge,
            vec![(s.node.clone(), gauge_f(since))],
        )?;
    }
    let r = &s.src.reader;
    family(
        enc,
        "privatelink_conntrack_capacity",
        "Conntrack capacity in entries",
        MetricType::Gauge,
        one(i64::from(r.ct4_capacity) + i64::from(r.ct6_capacity)),
    )
}

/// NAT (address, port) pairs in use, offered and free per provider network and family's range,
/// and the new flows refused for want of one (`nat_exhausted`) per provider network.
fn encode_nat(enc: &mut DescriptorEncoder, s: &Scrape) -> Result<(), std::fmt::Error> {
    let (mut used, mut avail, mut free, mut failures) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (vpc, range) in &s.src.config.nat {
        let Some(net) = s.state.networks.get(vpc) else {
            continue;
        };
        let refused: u64 = s
            .state
            .endpoints
            .values()
            .filter(|e| {
                s.state
                    .services
                    .get(&e.service_id)
                    .is_some_and(|svc| &svc.network_id == vpc)
            })
            .filter_map(|e| s.drops.get(&(e.link_id, DROP_NAT_EXHAUSTED)))
            .sum();
        failures.push((
            vec![("provider_network", vpc.clone()), ("node", s.node_name())],
            counter(refused),
        ));
        let ports = i64::from(*range.ports.end()) - i64::from(*range.ports.start()) + 1;
        // Each family's range is its own pool: a row per range, labelled with its prefix.
        let v4 = (
            range.addrs.to_string(),
            false,
            32 - u32::from(range.addrs.prefix_len()),
        );
        let v6 = range
            .addrs6
            .map(|r| (r.to_string(), true, 128 - u32::from(r.prefix_len())));
        for (prefix, ipv6, host_bits) in std::iter::once(v4).chain(v6) {
            let l: Labels = vec![
                ("provider_network", vpc.clone()),
                ("range", prefix),
                ("node", s.node_name()),
            ];
            let in_use =
                s.ct.nat_used
                    .get(&(net.number, ipv6))
                    .map_or(0, |&n| n as i64);
            used.push((l.clone(), gauge(in_use)));
            // At most 2^32 addresses (an IPv6 range is at most a /96).
            let offered = (1i64 << host_bits.min(32)) * ports;
            avail.push((l.clone(), gauge(offered)));
            free.push((l, gauge((offered - in_use).max(0))));
        }
    }
    family(
        enc,
        "privatelink_nat_ports_used",
        "NAT (address, port) pairs in use per range and protocol",
        MetricType::Gauge,
        used,
    )?;
    family(
        enc,
        "privatelink_nat_ports_available",
        "NAT (address, port) pairs a range offers per protocol",
        MetricType::Gauge,
        avail,
    )?;
    family(
        enc,
        "privatelink_nat_ports_free",
        "NAT (address, port) pairs of a range not in use (a pair is reused towards other backends and service ports, so this is a floor)",
        MetricType::Gauge,
        free,
    )?;
    family(
        enc,
        "privatelink_nat_allocation_failures",
        "New flows refused because no NAT port was found (nat_exhausted), per provider network",
        MetricType::Counter,
        failures,
    )
}

/// Map entries and capacities, and the build.
fn encode_maps(enc: &mut DescriptorEncoder, s: &Scrape) -> Result<(), std::fmt::Error> {
    let maps = s
        .src
        .agent
        .maps
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // The counter maps: one LINK_STATS slot per link (as LINKS), LINK_DROPS as read.
    let links = maps
        .iter()
        .find(|m| m.0 == privatelink_common::names::LINKS)
        .map_or(0, |m| m.1);
    let (stats_cap, drops_cap) = s.src.reader.counter_capacity;
    let counters = [
        (privatelink_common::names::LINK_STATS, links, stats_cap),
        (
            privatelink_common::names::LINK_DROPS,
            s.drops.len(),
            drops_cap,
        ),
    ];
    let (mut entries, mut caps) = (Vec::new(), Vec::new());
    for (name, e, c) in maps.into_iter().chain(counters) {
        let l: Labels = vec![("map", name.to_string()), ("node", s.node_name())];
        entries.push((l.clone(), gauge(e as i64)));
        caps.push((l, gauge(c.into())));
    }
    family(
        enc,
        "privatelink_map_entries",
        "Entries the agent keeps in each map",
        MetricType::Gauge,
        entries,
    )?;
    family(
        enc,
        "privatelink_map_capacity",
        "Capacity of each map",
        MetricType::Gauge,
        caps,
    )?;
    let build: Labels = vec![
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("node", s.node_name()),
    ];
    family(
        enc,
        "privatelink_build_info",
        "Build of the running agent",
        MetricType::Gauge,
        vec![(build, gauge(1))],
    )
}

/// The high-availability group, when the node has one.
fn encode_ha(enc: &mut DescriptorEncoder, s: &Scrape) -> Result<(), std::fmt::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let Some((group, fence, h)) = &s.src.ha else {
        return Ok(());
    };
    let labels = |extra: Option<(&'static str, String)>| {
        let mut l = s.node.clone();
        l.push(("group", group.clone()));
        l.extend(extra);
        l
    };
    family(
        enc,
        "privatelink_ha_active",
        "1 while this node forwards for its group's consumer networks (with an owner per network: for at least one), 0 while it stands by",
        MetricType::Gauge,
        vec![(labels(None), gauge(i64::from(h.active())))],
    )?;
    let networks = h
        .network_states()
        .into_iter()
        .map(|(n, on)| (labels(Some(("network", n))), gauge(i64::from(on))))
        .collect();
    family(
        enc,
        "privatelink_ha_network_active",
        "1 while this node forwards for the consumer network, 0 while it stands by for it (one owner per network in the group)",
        MetricType::Gauge,
        networks,
    )?;
    family(
        enc,
        "privatelink_ha_takeovers",
        "Times this node took its group over from a peer it found dead or fenced",
        MetricType::Counter,
        vec![(labels(None), counter(h.takeovers.load(Relaxed)))],
    )?;
    let peers = h
        .peers_up(*fence)
        .into_iter()
        .map(|(p, up)| (labels(Some(("peer", p))), gauge(i64::from(up))))
        .collect();
    let lag = h
        .sync_lag()
        .into_iter()
        .map(|(p, secs)| (labels(Some(("peer", p))), gauge_f(secs)))
        .collect();
    family(
        enc,
        "privatelink_ha_sync_lag_seconds",
        "Seconds since the newest flow update taken from the peer was sent (each change goes at once, everything every 3 s)",
        MetricType::Gauge,
        lag,
    )?;
    family(
        enc,
        "privatelink_ha_peer_up",
        "1 while the peer's heartbeats arrive within the fence time",
        MetricType::Gauge,
        peers,
    )?;
    family(
        enc,
        "privatelink_ha_heartbeats_received",
        "Heartbeats accepted from peers",
        MetricType::Counter,
        vec![(labels(None), counter(h.beats_received.load(Relaxed)))],
    )?;
    family(
        enc,
        "privatelink_ha_heartbeats_sent",
        "Heartbeats sent to peers",
        MetricType::Counter,
        vec![(labels(None), counter(h.beats_sent.load(Relaxed)))],
    )?;
    for (name, help, v) in [
        (
            "privatelink_ha_flows_sent",
            "Conntrack updates sent to peers while active",
            &h.flows_sent,
        ),
        (
            "privatelink_ha_flows_received",
            "Conntrack updates received from the active peer",
            &h.flows_received,
        ),
        (
            "privatelink_ha_flows_installed",
            "Received conntrack updates written to this node's tables",
            &h.flows_installed,
        ),
        (
            "privatelink_ha_flow_events",
            "Flow-sync events read from the datapath (a flow made or its TCP state changed), each sent to peers at once while active",
            &h.flow_events,
        ),
        (
            "privatelink_ha_flow_events_lost",
            "Flow-sync events the datapath lost to a full ring buffer (those flows reach peers with the next periodic sync)",
            &h.flow_events_lost,
        ),
    ] {
        family(
            enc,
            name,
            help,
            MetricType::Counter,
            vec![(labels(None), counter(v.load(Relaxed)))],
        )?;
    }
    // Every reason, zero included, so a dashboard sees the series before the first one.
    let by_reason = |counts: Vec<(&str, u64)>| {
        counts
            .into_iter()
            .map(|(r, n)| (labels(Some(("reason", r.to_string()))), counter(n)))
            .collect()
    };
    let refused = h.refused();
    let rows = by_reason(
        crate::node::flowsync::Refuse::ALL
            .iter()
            .map(|r| (r.as_str(), refused.get(r).copied().unwrap_or(0)))
            .collect(),
    );
    family(
        enc,
        "privatelink_ha_flows_refused",
        "Received flows not installed: they disagree with this node's state (link, endpoint, backend, NAT range)",
        MetricType::Counter,
        rows,
    )?;
    let rejected = h.rejected();
    let rows = by_reason(
        crate::node::channel::Reject::ALL
            .iter()
            .map(|r| (r.as_str(), rejected.get(r).copied().unwrap_or(0)))
            .collect(),
    );
    family(
        enc,
        "privatelink_ha_heartbeats_rejected",
        "Received channel messages (heartbeats and flow updates) refused, by reason (forged, replayed, malformed, from an unknown peer...)",
        MetricType::Counter,
        rows,
    )
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let src = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let scrape = Scrape {
            state: src.plane.snapshot(),
            ct: src.conntrack.get(),
            drops: src.reader.drops(),
            node: vec![("node", src.node.clone())],
            src: &src,
        };
        encode_traffic(&mut enc, &scrape)?;
        encode_services(&mut enc, &scrape)?;
        encode_node(&mut enc, &scrape)?;
        encode_nat(&mut enc, &scrape)?;
        encode_ha(&mut enc, &scrape)?;
        encode_maps(&mut enc, &scrape)
    }
}

/// The registry served at `/metrics`.
pub fn registry(sources: Sources) -> Registry {
    let agent = sources.agent.clone();
    let mut r = Registry::default();
    r.register(
        "privatelink_sync_duration_seconds",
        "Time to apply a control-plane revision to the maps",
        agent.sync_duration.clone(),
    );
    r.register(
        "privatelink_sync_errors",
        "Revisions the maps refused (kept the last good state)",
        agent.sync_errors.clone(),
    );
    r.register(
        "privatelink_drift_repairs",
        "Map entries found changed behind the agent's back and repaired",
        agent.drift_repairs.clone(),
    );
    r.register(
        "privatelink_sync_revision",
        "Control-plane revision last applied to the maps",
        agent.revision.clone(),
    );
    r.register(
        "privatelink_store_up",
        "Whether the shared store (etcd) is reachable; the node forwards on its last state while not",
        agent.store.up.clone(),
    );
    r.register(
        "privatelink_store_reloads",
        "Full loads of the shared store's state: at start, after a missed revision or a compacted history (a lost watch resumes without one)",
        agent.store.reloads.clone(),
    );

    r.register(
        "privatelink_store_commits_followed",
        "Commits of other servers applied from the shared store's watch, without a full load",
        agent.store.commits_followed.clone(),
    );
    r.register(
        "privatelink_programs_attached",
        "Interfaces with the datapath attached, by mode",
        agent.programs.clone(),
    );
    r.register_collector(Box::new(NodeCollector {
        sources: Mutex::new(sources),
    }));
    r
}

/// The OpenMetrics text of a scrape.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition, for clients that do not
/// ask for OpenMetrics (curl, promtool): counter families are named by their `_total` samples, and
/// OpenMetrics-only lines (`# UNIT`, `# EOF`) go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Serves `/metrics` (a scrape reads the maps, so it runs on the blocking pool).
pub async fn serve(
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
                match tokio::task::spawn_blocking(move || render(&registry)).await {
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
                        to_prometheus_text(&text),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\na_bytes_total{x=\"1\"} 3\n# HELP g Gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total{x=\"1\"} 3\n# HELP g Gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
