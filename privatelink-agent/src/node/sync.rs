//! Control-plane state → the dataplane model of one node.
//!
//! Pure: the reconciler calls it with a state snapshot and the node's configuration, then hands
//! the model to `Dataplane::apply`, which diffs against what it wrote last.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use privatelink_common::DatapathConfig;

use crate::{
    control::{
        state::State,
        types::{
            Binding, ConnectionState, Protocol, ProxyProtocol, RuleAction, RuleProtocol, SgRule,
        },
        validate,
    },
    datapath::{
        Action, Iface, Link, LinkProxy, LinkState, Model, NatRange, PortMap, Proto, Role, Rule,
        RuleProto, Service,
    },
};

/// An attached interface as the node knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIface {
    pub name: String,
    pub ifindex: u32,
    pub vlan_id: u16,
    /// Control-plane network id (`vpc-…`).
    pub network: String,
    pub role: Role,
    pub mac: [u8; 6],
}

/// What the node contributes besides the control-plane state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    pub ifaces: Vec<NodeIface>,
    /// NAT range by provider network id (`vpc-…`).
    pub nat: BTreeMap<String, NatRange>,
    /// Slices of those ranges by (consumer network id, provider network id): the new flows of
    /// that consumer network's endpoints to services in that provider network take their NAT
    /// address from the slice (a high-availability group routes each slice to the node active
    /// for its consumer network).
    pub nat_slices: BTreeMap<(String, String), NatRange>,
    pub datapath: DatapathConfig,
}

/// The model, and what was left out and why (for the log). Backends in `unhealthy` (service id,
/// address) stay out of their service's Maglev table, unless every backend is unhealthy: then all
/// stay (fail open).
pub fn model(
    state: &State,
    node: &NodeConfig,
    unhealthy: &BTreeSet<(String, IpAddr)>,
) -> (Model, Vec<String>) {
    let mut skipped = Vec::new();
    let number = |vpc: &str| state.networks.get(vpc).map(|n| n.number);
    let mut m = Model {
        config: node.datapath,
        ..Default::default()
    };
    for i in &node.ifaces {
        match number(&i.network) {
            Some(n) => m.ifaces.push(Iface {
                ifindex: i.ifindex,
                vlan_id: i.vlan_id,
                network_id: n,
                role: i.role,
                mac: i.mac,
            }),
            None => skipped.push(format!(
                "interface {}: network {} is not in the control plane",
                i.name, i.network
            )),
        }
    }
    for (vpc, range) in &node.nat {
        match number(vpc) {
            Some(n) => drop(m.nat.insert(n, range.clone())),
            None => skipped.push(format!("NAT range for {vpc}: no such network")),
        }
    }
    // Slices after the whole ranges, numbered in the configuration's order (stable while it is).
    let mut slice_slots: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    for (slot, ((consumer, provider), range)) in
        (privatelink_common::MAX_NETWORKS..).zip(&node.nat_slices)
    {
        m.nat.insert(slot, range.clone());
        slice_slots.insert((consumer.as_str(), provider.as_str()), slot);
    }
    // Per service, what each of its endpoints' links repeats: its port mappings are built once
    // and shared (a model holds every link, and is rebuilt on every revision).
    let mut services_by_id = BTreeMap::new();
    for svc in state.services.values() {
        let ports: Arc<[PortMap]> = svc
            .port_mappings
            .iter()
            .map(|p| PortMap {
                proto: match p.protocol {
                    Protocol::Tcp => Proto::Tcp,
                    Protocol::Udp => Proto::Udp,
                },
                terminal: p.terminal_port,
                service: p.service_port,
            })
            .collect();
        services_by_id.insert(svc.id.as_str(), (svc, ports));
        let Some(provider_network) = number(&svc.network_id) else {
            continue;
        };
        // Per family: IPv4 endpoints reach IPv4 backends, IPv6 endpoints IPv6 ones.
        let mut backends = Vec::new();
        for v6 in [false, true] {
            let family: Vec<IpAddr> = svc
                .backends
                .iter()
                .copied()
                .filter(|a| a.is_ipv6() == v6)
                .collect();
            let healthy: Vec<IpAddr> = family
                .iter()
                .copied()
                .filter(|a| !unhealthy.contains(&(svc.id.clone(), *a)))
                .collect();
            if healthy.is_empty() && !family.is_empty() {
                skipped.push(format!(
                    "service {}: every IPv{} backend is unhealthy; keeping them all (fail open)",
                    svc.id,
                    if v6 { 6 } else { 4 }
                ));
                backends.extend(family);
            } else {
                backends.extend(healthy);
            }
        }
        m.services.insert(
            svc.slot,
            Service {
                provider_network,
                backends,
            },
        );
        for e in &svc.allowlist {
            if let Some(a) = state.accounts.get(&e.account_id) {
                m.allowlist.insert((svc.slot, a.number));
            }
        }
    }
    // Each group's rules in model form, converted once; and the rule list of each distinct list of
    // bound groups, built once and shared by the endpoints bound to the same groups in the same
    // order (typical: a few group sets over many endpoints).
    let group_rules: BTreeMap<&str, Vec<Rule>> = state
        .security_groups
        .values()
        .map(|g| (g.id.as_str(), g.rules.iter().filter_map(rule).collect()))
        .collect();
    let mut rule_lists: HashMap<&[Binding], Arc<[Rule]>> = HashMap::new();
    // Collected in a vector and built in one go: the tree is built from the run sorted by link
    // id, with no search per link.
    let mut links = Vec::with_capacity(state.endpoints.len());
    // A removed connection is no link: its service may be gone.
    for ep in state
        .endpoints
        .values()
        .filter(|e| e.state != ConnectionState::Removed)
    {
        let (Some((svc, ports)), Some(network_id), Some(account)) = (
            services_by_id.get(ep.service_id.as_str()),
            number(&ep.network_id),
            state.accounts.get(&ep.owner),
        ) else {
            skipped.push(format!(
                "endpoint {}: dangling service, network or account",
                ep.id
            ));
            continue;
        };
        let Some(provider_network) = number(&svc.network_id) else {
            skipped.push(format!(
                "endpoint {}: its service's network {} is not in the control plane",
                ep.id, svc.network_id
            ));
            continue;
        };
        let (ip4, ip6) = ep.addrs();
        if svc.owner == ep.owner {
            // Same account: always allowed.
            m.allowlist.insert((svc.slot, account.number));
        }
        let rules = (!ep.security_groups.is_empty()).then(|| {
            let bound = ep.security_groups.as_slice();
            Arc::clone(rule_lists.entry(bound).or_insert_with(|| {
                bound
                    .iter()
                    .filter_map(|b| group_rules.get(b.security_group_id.as_str()))
                    .flat_map(|rules| rules.iter().cloned())
                    .collect()
            }))
        });
        links.push((
            ep.link_id,
            Link {
                network_id,
                ip4,
                ip6,
                service_slot: svc.slot,
                account: account.number,
                state: match ep.state {
                    ConnectionState::Pending => LinkState::Pending,
                    ConnectionState::Available => LinkState::Available,
                    // The datapath refuses both; a disconnected one also has no allowlist entry.
                    ConnectionState::Rejected
                    | ConnectionState::Disconnected
                    | ConnectionState::Removed => LinkState::Rejected,
                },
                ports: Arc::clone(ports),
                rules,
                answer_ping: svc.answer_ping,
                flow_limit: svc.flow_limit_of(&ep.id),
                proxy: LinkProxy {
                    v2: svc.proxy_protocol == ProxyProtocol::V2,
                    endpoint_id: ep.id.clone(),
                    account_id: ep.owner.clone(),
                },
                conn_log: svc.connection_log,
                nat_slot: slice_slots
                    .get(&(ep.network_id.as_str(), svc.network_id.as_str()))
                    .copied()
                    .unwrap_or(provider_network),
            },
        ));
    }
    // Two endpoints with one link id (a corrupt state): the later one wins, as with inserts.
    m.links = links.into_iter().collect();
    (m, skipped)
}

/// A security-group rule in model form; `None` for a port range the control plane would not
/// have stored.
fn rule(r: &SgRule) -> Option<Rule> {
    let (lo, hi) = validate::rule_ports("", &r.ports).ok()?;
    Some(Rule {
        proto: match r.protocol {
            RuleProtocol::Tcp => RuleProto::Tcp,
            RuleProtocol::Udp => RuleProto::Udp,
            RuleProtocol::Icmp => RuleProto::Icmp,
            RuleProtocol::All => RuleProto::All,
        },
        ports: lo..=hi,
        source: r.source,
        action: match r.action {
            RuleAction::Accept => Action::Accept,
            RuleAction::Drop => Action::Drop,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{
        ops::{Caller, endpoints, groups, services},
        plane::ControlPlane,
        store::SqliteStore,
    };

    fn plane() -> ControlPlane {
        ControlPlane::open(
            Box::new(SqliteStore::open(std::path::Path::new(":memory:")).unwrap()),
            "admin",
        )
        .unwrap()
    }

    fn de<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn state_becomes_links_rules_and_allowlist() {
        let p = plane();
        let prepared = crate::testkit::demo::prepare(
            &p,
            &[
                ("provider", "198.18.100.0/24", "198.18.100.0/24"),
                ("consumer", "198.18.0.0/16", "198.18.0.0/24"),
            ],
        )
        .unwrap();
        let [(pnet, _), (cnet, csub)] = <[(String, String); 2]>::try_from(prepared.vpcs).unwrap();
        let (prov, cons) = (
            Caller::Account("provider".into()),
            Caller::Account("consumer".into()),
        );
        let svc = p
            .mutate(&prov, |s, cx| {
                services::create(s, cx, de(serde_json::json!({ "name": "db", "network_id": pnet, "service_type": "mysql",
                    "backends": ["198.18.100.10", "198.18.100.11"], "auto_accept": true,
                    "port_mappings": [{ "protocol": "tcp", "service_port": 3306, "terminal_port": 13306 }] })))
            })
            .unwrap();
        p.mutate(&prov, |s, cx| {
            services::allow(
                s,
                cx,
                &svc.id,
                de(serde_json::json!({ "account_id": "consumer" })),
            )
        })
        .unwrap();
        let group = |rules: serde_json::Value| {
            p.mutate(&cons, |s, cx| {
                groups::create(
                    s,
                    cx,
                    de(serde_json::json!({ "name": "g", "rules": rules })),
                )
            })
            .unwrap()
            .id
        };
        let late = group(
            serde_json::json!([{ "protocol": "tcp", "ports": "all", "source": "0.0.0.0/0", "action": "accept" }]),
        );
        let early = group(serde_json::json!([
            { "protocol": "all", "source": "2001:db8::/32", "action": "drop" },
            { "protocol": "tcp", "ports": "13306", "source": "198.18.0.0/24", "action": "drop" }]));
        let ep = p
            .mutate(&cons, |s, cx| {
                endpoints::create(s, cx, de(serde_json::json!({ "name": "ep", "service_id": svc.id, "network_id": cnet, "subnet_id": csub,
                    "security_groups": [{ "security_group_id": late, "priority": 20 }, { "security_group_id": early, "priority": 10 }] })))
            })
            .unwrap();
        let node = NodeConfig {
            ifaces: vec![NodeIface {
                name: "c0".into(),
                ifindex: 7,
                vlan_id: 0,
                network: cnet.clone(),
                role: Role::Consumer,
                mac: [2; 6],
            }],
            nat: BTreeMap::from([(
                pnet.clone(),
                NatRange {
                    addrs: "198.19.128.0/20".parse().unwrap(),
                    addrs6: None,
                    ports: 1024..=65535,
                },
            )]),
            nat_slices: BTreeMap::new(),
            datapath: DatapathConfig::DEFAULT,
        };
        let (m, skipped) = model(&p.snapshot(), &node, &BTreeSet::new());
        assert!(skipped.is_empty(), "{skipped:?}");
        let state = p.snapshot();
        let (pn, cn) = (state.networks[&pnet].number, state.networks[&cnet].number);
        assert_eq!(m.ifaces[0].network_id, cn);
        assert!(m.nat.contains_key(&pn));
        assert_eq!(m.services[&svc.slot].backends.len(), 2);
        let link = &m.links[&ep.link_id];
        assert_eq!((link.network_id, link.state), (cn, LinkState::Available));
        assert_eq!(
            (link.ports[0].terminal, link.ports[0].service),
            (13306, 3306)
        );
        // Priority 10 first (its IPv6 rule, then its IPv4 rule), then priority 20's.
        let rules = link.rules.as_ref().expect("groups bound");
        assert_eq!(rules.len(), 3);
        assert!(rules[0].source.addr().is_ipv6());
        assert_eq!(
            (rules[1].action, rules[1].ports.clone()),
            (Action::Drop, 13306..=13306)
        );
        assert_eq!(
            (rules[2].action, rules[2].ports.clone()),
            (Action::Accept, 1..=65535)
        );
        let consumer_no = state.accounts["consumer"].number;
        assert!(m.allowlist.contains(&(svc.slot, consumer_no)));
        // The model compiles into map contents: an IPv4-only endpoint gets the IPv4 rules only,
        // and no IPv6 list.
        let maps = crate::datapath::compile(&m, &Default::default()).expect("compiles");
        let info = maps.links[&ep.link_id];
        assert_eq!(maps.rules4[&info.rules_slot].len(), 2);
        assert_eq!(info.rules_slot6, privatelink_common::RULES_NONE);
        assert!(maps.rules6.is_empty() && maps.endpoints6.is_empty());
        // New flows take NAT addresses from the provider network's range...
        assert_eq!((link.nat_slot, info.nat_slot), (pn, pn));
        // ...or, with a slice of it for the endpoint's consumer network (a group with an owner
        // per network), from the slice, in a slot of its own; the whole range stays in its slot
        // (replies are checked against it).
        let slice = NatRange {
            addrs: "198.19.129.0/25".parse().unwrap(),
            addrs6: None,
            ports: 1024..=65535,
        };
        let sliced = NodeConfig {
            nat_slices: BTreeMap::from([((cnet.clone(), pnet.clone()), slice.clone())]),
            ..node.clone()
        };
        let (ms, _) = model(&p.snapshot(), &sliced, &BTreeSet::new());
        let slot = privatelink_common::MAX_NETWORKS;
        assert_eq!(ms.links[&ep.link_id].nat_slot, slot);
        assert_eq!(
            (ms.nat.get(&slot), ms.nat.get(&pn)),
            (Some(&slice), m.nat.get(&pn))
        );
        let maps = crate::datapath::compile(&ms, &Default::default()).expect("compiles");
        assert_eq!(maps.links[&ep.link_id].nat_slot, slot);
        assert_eq!(maps.nat4[&slot].base, u32::from(slice.addrs.network()));
        assert_eq!(maps.nat4[&pn].count, 4096);

        // Rule lists are shared between endpoints bound alike, and only between them: endpoints
        // bound [early], [early, late] again, [early] again and to nothing, created in that order
        // (the two bound [early] are not neighbours).
        let bound = |groups: serde_json::Value| {
            p.mutate(&cons, |s, cx| {
                endpoints::create(
                    s,
                    cx,
                    de(serde_json::json!({ "name": "ep", "service_id": svc.id,
                    "network_id": cnet, "subnet_id": csub, "security_groups": groups })),
                )
            })
            .unwrap()
            .link_id
        };
        let only_early = serde_json::json!([{ "security_group_id": early, "priority": 10 }]);
        let both = serde_json::json!([{ "security_group_id": early, "priority": 10 },
            { "security_group_id": late, "priority": 20 }]);
        let ids = [
            bound(only_early.clone()),
            bound(both),
            bound(only_early),
            bound(serde_json::json!([])),
        ];
        let (m, _) = model(&p.snapshot(), &node, &BTreeSet::new());
        let rules = |id: u32| m.links[&id].rules.clone();
        let (a, b, c) = (
            rules(ids[0]).unwrap(),
            rules(ids[1]).unwrap(),
            rules(ids[2]).unwrap(),
        );
        assert_eq!((a.len(), b.len()), (2, 3));
        assert!(Arc::ptr_eq(&a, &c), "endpoints bound alike share one list");
        assert_eq!(
            b,
            link.rules.clone().unwrap(),
            "same groups, same order, same rules"
        );
        assert!(rules(ids[3]).is_none());
    }
}

#[cfg(test)]
mod health_tests {
    use super::*;
    use crate::control::types::{HealthCheck, Service as Svc, ServiceType};

    fn state_with(backends: &[&str]) -> State {
        let mut s = State::default();
        s.networks.insert(
            "vpc-1".into(),
            crate::control::types::Network {
                id: "vpc-1".into(),
                number: 1,
                name: "n".into(),
                owner: "p".into(),
                cidrs: vec![],
                created_at: 0,
            },
        );
        s.services.insert(
            "svc-1".into(),
            Svc {
                id: "svc-1".into(),
                service_name: "local-1.s.svc-1".into(),
                slot: 1,
                name: "s".into(),
                private_dns_name: None,
                answer_ping: false,
                owner: "p".into(),
                network_id: "vpc-1".into(),
                service_type: ServiceType::Custom,
                backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
                port_mappings: vec![],
                auto_accept: false,
                allowlist: vec![],
                health_check: HealthCheck::default(),
                flow_limit: 0,
                endpoint_flow_limits: Default::default(),
                proxy_protocol: Default::default(),
                connection_log: false,
                tags: vec![],
                created_at: 0,
            },
        );
        s
    }

    #[test]
    fn unhealthy_backends_leave_the_table_unless_all_are() {
        let s = state_with(&["198.18.100.10", "198.18.100.11"]);
        let down = |ips: &[&str]| {
            ips.iter()
                .map(|i| ("svc-1".to_string(), i.parse().unwrap()))
                .collect::<BTreeSet<_>>()
        };
        let (m, _) = model(&s, &NodeConfig::default(), &down(&["198.18.100.11"]));
        assert_eq!(
            m.services[&1].backends,
            vec!["198.18.100.10".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        let (m, skipped) = model(
            &s,
            &NodeConfig::default(),
            &down(&["198.18.100.10", "198.18.100.11"]),
        );
        assert_eq!(m.services[&1].backends.len(), 2, "all unhealthy: fail open");
        assert!(skipped[0].contains("fail open"));
    }
}
