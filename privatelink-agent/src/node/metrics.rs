//! Prometheus exposition (OpenMetrics text at `/metrics`).
//!
//! Counters are read from the per-CPU maps at scrape time and summed; they survive agent restarts
//! because the maps are pinned. Labels come from the control plane, so series exist exactly for the
//! objects that exist: a deleted endpoint's series disappear.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use privatelink_common::{OUTCOME_NAMES, is_drop};
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

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let src = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let state = src.plane.snapshot();
        let node = src.node.clone();
        // Conntrack as of the last scan (one read per period, shared with history and the sweep).
        let ct = src.conntrack.get();
        let active_by_link = &ct.active_by_link;
        let nat_used = &ct.nat_used;
        let drops = src.reader.drops();

        // Per link and per service.
        let (mut bytes, mut packets, mut conns, mut resets, mut act, mut drop_rows) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let mut svc_sum: BTreeMap<String, (Labels, [u64; 5], i64)> = BTreeMap::new();
        for ep in state.endpoints.values() {
            let Some(svc) = state.services.get(&ep.service_id) else {
                continue;
            };
            let Some(s) = src.reader.link(ep.link_id) else {
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
            let with = |k: &'static str, v: &str| {
                let mut l = labels.clone();
                l.push((k, v.to_string()));
                l
            };
            bytes.push((with("direction", "forward"), counter(s.fwd_bytes)));
            bytes.push((with("direction", "reply"), counter(s.rev_bytes)));
            packets.push((with("direction", "forward"), counter(s.fwd_packets)));
            packets.push((with("direction", "reply"), counter(s.rev_packets)));
            conns.push((labels.clone(), counter(s.new_conns)));
            resets.push((labels.clone(), counter(s.tcp_resets)));
            let a = active_by_link.get(&ep.link_id).map_or(0, |&n| n as i64);
            act.push((labels.clone(), gauge(a)));
            for ((_, reason), n) in drops.range((ep.link_id, 0)..=(ep.link_id, u32::MAX)) {
                drop_rows.push((
                    with(
                        "reason",
                        OUTCOME_NAMES
                            .get(*reason as usize)
                            .copied()
                            .unwrap_or("unknown"),
                    ),
                    counter(*n),
                ));
            }
            let e = svc_sum.entry(svc.id.clone()).or_insert_with(|| {
                (
                    vec![
                        ("service_id", svc.id.clone()),
                        ("service_name", svc.name.clone()),
                        ("provider_account", svc.owner.clone()),
                        ("node", node.clone()),
                    ],
                    [0; 5],
                    0,
                )
            });
            for (i, v) in [
                s.fwd_bytes,
                s.rev_bytes,
                s.fwd_packets,
                s.rev_packets,
                s.new_conns,
            ]
            .into_iter()
            .enumerate()
            {
                e.1[i] += v;
            }
            e.2 += a;
        }
        family(
            &mut enc,
            "privatelink_link_bytes",
            "L2 bytes through a link, by direction",
            MetricType::Counter,
            bytes,
        )?;
        family(
            &mut enc,
            "privatelink_link_packets",
            "Packets through a link, by direction",
            MetricType::Counter,
            packets,
        )?;
        family(
            &mut enc,
            "privatelink_link_connections",
            "New connections (flows) admitted on a link",
            MetricType::Counter,
            conns,
        )?;
        family(
            &mut enc,
            "privatelink_link_tcp_resets",
            "TCP segments with RST seen on a link",
            MetricType::Counter,
            resets,
        )?;
        family(
            &mut enc,
            "privatelink_link_drops",
            "Packets of a link dropped, by reason",
            MetricType::Counter,
            drop_rows,
        )?;
        family(
            &mut enc,
            "privatelink_link_active_connections",
            "Live flows of a link: TCP in SYN or ESTABLISHED, UDP until its timeout",
            MetricType::Gauge,
            act,
        )?;

        let mut sb = Vec::new();
        let mut sp = Vec::new();
        let mut sc = Vec::new();
        let mut sa = Vec::new();
        for (labels, v, a) in svc_sum.values() {
            let with = |d: &str| {
                let mut l = labels.clone();
                l.push(("direction", d.to_string()));
                l
            };
            sb.push((with("forward"), counter(v[0])));
            sb.push((with("reply"), counter(v[1])));
            sp.push((with("forward"), counter(v[2])));
            sp.push((with("reply"), counter(v[3])));
            sc.push((labels.clone(), counter(v[4])));
            sa.push((labels.clone(), gauge(*a)));
        }
        family(
            &mut enc,
            "privatelink_service_bytes",
            "L2 bytes through all links of a service",
            MetricType::Counter,
            sb,
        )?;
        family(
            &mut enc,
            "privatelink_service_packets",
            "Packets through all links of a service",
            MetricType::Counter,
            sp,
        )?;
        family(
            &mut enc,
            "privatelink_service_connections",
            "New connections on all links of a service",
            MetricType::Counter,
            sc,
        )?;
        family(
            &mut enc,
            "privatelink_service_active_connections",
            "Live flows of a service",
            MetricType::Gauge,
            sa,
        )?;
        let mut by_state = Vec::new();
        let mut targets = Vec::new();
        for svc in state.services.values() {
            let base: Labels = vec![
                ("service_id", svc.id.clone()),
                ("service_name", svc.name.clone()),
                ("node", node.clone()),
            ];
            for st in ["Pending", "Available", "Rejected"] {
                let n = state
                    .endpoints
                    .values()
                    .filter(|e| e.service_id == svc.id && format!("{:?}", e.state) == st)
                    .count();
                let mut l = base.clone();
                l.push(("state", st.to_string()));
                by_state.push((l, gauge(n as i64)));
            }
            let healthy = src
                .plane
                .targets_health(svc)
                .iter()
                .filter(|(_, h)| *h)
                .count();
            let mut l = base.clone();
            l.push(("health", "healthy".into()));
            targets.push((l, gauge(healthy as i64)));
            let mut l = base.clone();
            l.push(("health", "unhealthy".into()));
            targets.push((l, gauge((svc.backends.len() - healthy) as i64)));
        }
        family(
            &mut enc,
            "privatelink_service_endpoints",
            "Endpoints of a service by connection state",
            MetricType::Gauge,
            by_state,
        )?;
        family(
            &mut enc,
            "privatelink_service_targets",
            "Backend targets of a service by health (this node's checks)",
            MetricType::Gauge,
            targets,
        )?;

        // Node.
        let outcomes = src.reader.outcomes();
        let rows = outcomes
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let l: Labels = vec![
                    ("outcome", OUTCOME_NAMES[i].to_string()),
                    ("drop", is_drop(i as u32).to_string()),
                    ("node", node.clone()),
                ];
                (l, counter(*v))
            })
            .collect();
        family(
            &mut enc,
            "privatelink_node_packets",
            "Every packet the datapath saw, by outcome (drops and passes included)",
            MetricType::Counter,
            rows,
        )?;
        let n: Labels = vec![("node", node.clone())];
        let (hits, fills) = src.reader.flow_cache();
        family(
            &mut enc,
            "privatelink_flow_cache_hits",
            "Packets of established flows served from the per-CPU flow cache instead of conntrack",
            MetricType::Counter,
            vec![(n.clone(), counter(hits))],
        )?;
        family(
            &mut enc,
            "privatelink_flow_cache_fills",
            "Conntrack entries copied into the per-CPU flow cache",
            MetricType::Counter,
            vec![(n.clone(), counter(fills))],
        )?;
        family(
            &mut enc,
            "privatelink_conntrack_entries",
            "Conntrack entries (two per flow)",
            MetricType::Gauge,
            vec![(n.clone(), gauge(ct.entries as i64))],
        )?;
        family(
            &mut enc,
            "privatelink_conntrack_scan_age_seconds",
            "Seconds since the conntrack scan the entry, connection and NAT figures come from",
            MetricType::Gauge,
            vec![(
                n.clone(),
                gauge(
                    (crate::datapath::scan::monotonic_ns().saturating_sub(ct.scanned_at_ns)
                        / 1_000_000_000) as i64,
                ),
            )],
        )?;
        family(
            &mut enc,
            "privatelink_conntrack_expired_removed",
            "Expired conntrack entries the last scan removed",
            MetricType::Gauge,
            vec![(n.clone(), gauge(ct.removed as i64))],
        )?;
        family(
            &mut enc,
            "privatelink_conntrack_capacity",
            "Conntrack capacity in entries",
            MetricType::Gauge,
            vec![(
                n.clone(),
                gauge(i64::from(src.reader.ct4_capacity) + i64::from(src.reader.ct6_capacity)),
            )],
        )?;
        let mut used = Vec::new();
        let mut avail = Vec::new();
        for (vpc, range) in &src.config.nat {
            let Some(net) = state.networks.get(vpc) else {
                continue;
            };
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
                    ("node", node.clone()),
                ];
                let in_use = nat_used.get(&(net.number, ipv6)).map_or(0, |&n| n as i64);
                used.push((l.clone(), gauge(in_use)));
                // At most 2^32 addresses (an IPv6 range is at most a /96).
                avail.push((l, gauge((1i64 << host_bits.min(32)) * ports)));
            }
        }
        family(
            &mut enc,
            "privatelink_nat_ports_used",
            "NAT (address, port) pairs in use per range and protocol",
            MetricType::Gauge,
            used,
        )?;
        family(
            &mut enc,
            "privatelink_nat_ports_available",
            "NAT (address, port) pairs a range offers per protocol",
            MetricType::Gauge,
            avail,
        )?;
        let maps = src
            .agent
            .maps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut entries = Vec::new();
        let mut caps = Vec::new();
        // The counter maps: one LINK_STATS slot per link (as LINKS), LINK_DROPS as read above.
        let links = maps
            .iter()
            .find(|m| m.0 == privatelink_common::names::LINKS)
            .map_or(0, |m| m.1);
        let (stats_cap, drops_cap) = src.reader.counter_capacity;
        let counters = [
            (privatelink_common::names::LINK_STATS, links, stats_cap),
            (
                privatelink_common::names::LINK_DROPS,
                drops.len(),
                drops_cap,
            ),
        ];
        for (name, e, c) in maps.into_iter().chain(counters) {
            let l: Labels = vec![("map", name.to_string()), ("node", node.clone())];
            entries.push((l.clone(), gauge(e as i64)));
            caps.push((l, gauge(c.into())));
        }
        family(
            &mut enc,
            "privatelink_map_entries",
            "Entries the agent keeps in each map",
            MetricType::Gauge,
            entries,
        )?;
        family(
            &mut enc,
            "privatelink_map_capacity",
            "Capacity of each map",
            MetricType::Gauge,
            caps,
        )?;
        let build: Labels = vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("node", node),
        ];
        family(
            &mut enc,
            "privatelink_build_info",
            "Build of the running agent",
            MetricType::Gauge,
            vec![(build, gauge(1))],
        )?;
        Ok(())
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
        "Full loads of the shared store's state: at start, after a lost watch or a missed revision",
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
