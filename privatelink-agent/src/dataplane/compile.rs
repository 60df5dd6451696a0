//! Model → exact map contents. Pure: no kernel access, so every rule is unit-testable.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use privatelink_common::{
    ACTION_ACCEPT, ACTION_DROP, AllowKey, Backend4, DatapathConfig, EndpointIpKey4,
    EndpointIpValue, EndpointKey4, EndpointValue, IfaceInfo, IfaceKey, LINK_AVAILABLE,
    LINK_PENDING, LINK_REJECTED, LinkInfo, MAX_NETWORKS, MAX_RULES, NatRange4, PROTO_ANY,
    PROTO_ICMP, PROTO_TCP, PROTO_UDP, ROLE_CONSUMER, ROLE_PROVIDER, RULES_NONE, Rule4,
};

use super::{
    maglev,
    model::{Action, LinkState, Model, Proto, Role, RuleProto},
};

/// The full contents of every map the agent writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub config: DatapathConfig,
    pub ifaces: BTreeMap<IfaceKey, IfaceInfo>,
    pub devmap: BTreeSet<u32>,
    pub nat4: BTreeMap<u32, NatRange4>,
    pub backends4: BTreeMap<u32, Backend4>,
    /// Rule-list slot → rules (slots are content-addressed: a list never changes in place).
    pub rules4: BTreeMap<u32, Vec<Rule4>>,
    /// Service slot → Maglev table of backend slots.
    pub maglev: BTreeMap<u32, Vec<u32>>,
    pub allowlist: BTreeSet<AllowKey>,
    pub links: BTreeMap<u32, LinkInfo>,
    pub endpoint_ips4: BTreeMap<EndpointIpKey4, EndpointIpValue>,
    pub endpoints4: BTreeMap<EndpointKey4, EndpointValue>,
}

/// A model that cannot be written. Nothing is written when compile fails.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("link {link}: service slot {service} does not exist")]
    UnknownService { link: u32, service: u32 },
    #[error("network id {0} is out of range (at most {max})", max = MAX_NETWORKS - 1)]
    NetworkId(u32),
    #[error("link {link}: {count} security-group rules compile to more than {MAX_RULES}")]
    TooManyRules { link: u32, count: usize },
    #[error("link {link}: port 0 in a port mapping")]
    PortZero { link: u32 },
    #[error("links {a} and {b} both claim {ip} {proto:?} port {port} in network {network}")]
    DuplicateEndpoint {
        a: u32,
        b: u32,
        network: u32,
        ip: std::net::Ipv4Addr,
        proto: Proto,
        port: u16,
    },
    #[error("links {a} and {b} share endpoint address {ip} in network {network}")]
    DuplicateIp {
        a: u32,
        b: u32,
        network: u32,
        ip: std::net::Ipv4Addr,
    },
    #[error("NAT range of network {network}: empty port range")]
    NatPorts { network: u32 },
    #[error("link id 0 is reserved")]
    LinkZero,
}

fn network(id: u32) -> Result<u32, CompileError> {
    if id < MAX_NETWORKS {
        Ok(id)
    } else {
        Err(CompileError::NetworkId(id))
    }
}

fn rule4(r: &super::model::Rule) -> Rule4 {
    Rule4 {
        addr_be: u32::from_ne_bytes(r.source.network().octets()),
        mask_be: u32::from_ne_bytes(r.source.netmask().octets()),
        port_lo: *r.ports.start(),
        port_hi: *r.ports.end(),
        proto: match r.proto {
            RuleProto::Tcp => PROTO_TCP,
            RuleProto::Udp => PROTO_UDP,
            RuleProto::Icmp => PROTO_ICMP,
            RuleProto::All => PROTO_ANY,
        },
        action: match r.action {
            Action::Accept => ACTION_ACCEPT,
            Action::Drop => ACTION_DROP,
        },
        _pad: [0; 2],
    }
}

/// Gives each distinct wanted item a slot ≥ `first`: its previous slot if it had one (unchanged
/// content keeps its slot, so nothing is rewritten), else the lowest free one.
fn assign_slots<K: std::hash::Hash + Eq + Clone>(
    wanted: impl IntoIterator<Item = K>,
    prev: &HashMap<K, u32>,
    first: u32,
) -> HashMap<K, u32> {
    let wanted: Vec<K> = wanted.into_iter().collect();
    let mut slots: HashMap<K, u32> = HashMap::new();
    let mut used: BTreeSet<u32> = BTreeSet::new();
    for k in &wanted {
        if let Some(&s) = prev.get(k) {
            used.insert(s);
            slots.insert(k.clone(), s);
        }
    }
    let mut next = first;
    for k in wanted {
        if let std::collections::hash_map::Entry::Vacant(e) = slots.entry(k) {
            while used.contains(&next) {
                next += 1;
            }
            used.insert(next);
            e.insert(next);
        }
    }
    slots
}

/// Compiles `model` into map contents, reusing `prev`'s slots for unchanged content so that a
/// small change writes little.
pub fn compile(model: &Model, prev: &MapState) -> Result<MapState, CompileError> {
    let mut out = MapState {
        config: model.config,
        ..Default::default()
    };

    for i in &model.ifaces {
        let key = IfaceKey {
            ifindex: i.ifindex,
            vlan_id: i.vlan_id,
            _pad: 0,
        };
        let role = match i.role {
            Role::Consumer => ROLE_CONSUMER,
            Role::Provider => ROLE_PROVIDER,
        };
        out.ifaces.insert(
            key,
            IfaceInfo {
                network_id: network(i.network_id)?,
                role,
                _pad: 0,
                mac: i.mac,
            },
        );
        out.devmap.insert(i.ifindex);
    }
    for (&net, r) in &model.nat {
        if r.ports.is_empty() {
            return Err(CompileError::NatPorts { network: net });
        }
        let count = 1u32 << (32 - r.addrs.prefix_len()).min(31);
        out.nat4.insert(
            network(net)?,
            NatRange4 {
                base: u32::from(r.addrs.network()),
                count,
                port_min: *r.ports.start(),
                port_max: *r.ports.end(),
                _pad: 0,
            },
        );
    }

    // Backends: one slot per distinct address, kept from the previous state where it existed.
    let prev_backend: HashMap<u32, u32> = prev
        .backends4
        .iter()
        .map(|(&s, b)| (b.addr_be, s))
        .collect();
    let wanted: BTreeSet<u32> = model
        .services
        .values()
        .flat_map(|s| s.backends.iter().map(|a| u32::from_ne_bytes(a.octets())))
        .collect();
    let backend_slot = assign_slots(wanted, &prev_backend, 0);
    for (&addr, &s) in &backend_slot {
        out.backends4.insert(
            s,
            Backend4 {
                addr_be: addr,
                _pad: 0,
            },
        );
    }
    for (&slot, svc) in &model.services {
        network(svc.provider_network)?;
        // Order-independent: the same set of backends always gives the same table.
        let mut ids: Vec<u64> = svc
            .backends
            .iter()
            .map(|a| u64::from(u32::from(*a)))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let table = maglev::table(&ids);
        let slots = table
            .iter()
            .map(|&i| backend_slot[&(ids[i as usize] as u32).to_be()])
            .collect();
        // No backends, no table (reads back the same way from the map).
        if !table.is_empty() {
            out.maglev.insert(slot, slots);
        }
    }

    for &(service_slot, account) in &model.allowlist {
        out.allowlist.insert(AllowKey {
            service_slot,
            account,
        });
    }

    // Rule lists: content-addressed slots (slot 0 means "no groups").
    let prev_rules: HashMap<Vec<Rule4>, u32> =
        prev.rules4.iter().map(|(&s, r)| (r.clone(), s)).collect();
    let lists: Vec<(u32, Option<Vec<Rule4>>)> = model
        .links
        .iter()
        .map(|(&id, l)| {
            let list = l
                .rules
                .as_ref()
                .map(|rs| rs.iter().map(rule4).collect::<Vec<_>>());
            match &list {
                Some(v) if v.len() > MAX_RULES => Err(CompileError::TooManyRules {
                    link: id,
                    count: v.len(),
                }),
                _ => Ok((id, list)),
            }
        })
        .collect::<Result<_, _>>()?;
    let rule_slot = assign_slots(
        lists.iter().filter_map(|(_, l)| l.clone()),
        &prev_rules,
        RULES_NONE + 1,
    );
    for (list, &s) in &rule_slot {
        out.rules4.insert(s, list.clone());
    }

    for ((&id, l), (_, list)) in model.links.iter().zip(&lists) {
        if id == 0 {
            return Err(CompileError::LinkZero);
        }
        let svc = model
            .services
            .get(&l.service_slot)
            .ok_or(CompileError::UnknownService {
                link: id,
                service: l.service_slot,
            })?;
        let consumer_net = network(l.network_id)?;
        out.links.insert(
            id,
            LinkInfo {
                state: match l.state {
                    LinkState::Pending => LINK_PENDING,
                    LinkState::Available => LINK_AVAILABLE,
                    LinkState::Rejected => LINK_REJECTED,
                },
                account: l.account,
                service_slot: l.service_slot,
                provider_network: svc.provider_network,
                rules_slot: list.as_ref().map_or(RULES_NONE, |v| rule_slot[v]),
                allowed: u32::from(model.allowlist.contains(&(l.service_slot, l.account))),
            },
        );
        let addr_be = u32::from_ne_bytes(l.ip.octets());
        let ip_key = EndpointIpKey4 {
            network_id: consumer_net,
            addr_be,
        };
        if let Some(other) = out.endpoint_ips4.insert(
            ip_key,
            EndpointIpValue {
                link_id: id,
                _pad: 0,
            },
        ) {
            return Err(CompileError::DuplicateIp {
                a: other.link_id,
                b: id,
                network: consumer_net,
                ip: l.ip,
            });
        }
        for pm in &l.ports {
            if pm.terminal == 0 || pm.service == 0 {
                return Err(CompileError::PortZero { link: id });
            }
            let proto = match pm.proto {
                Proto::Tcp => PROTO_TCP,
                Proto::Udp => PROTO_UDP,
            };
            let key = EndpointKey4 {
                network_id: consumer_net,
                addr_be,
                port_be: pm.terminal.to_be(),
                proto,
                _pad: 0,
            };
            let value = EndpointValue {
                link_id: id,
                service_port_be: pm.service.to_be(),
                _pad: 0,
            };
            if let Some(other) = out.endpoints4.insert(key, value) {
                return Err(CompileError::DuplicateEndpoint {
                    a: other.link_id,
                    b: id,
                    network: consumer_net,
                    ip: l.ip,
                    proto: pm.proto,
                    port: pm.terminal,
                });
            }
        }
    }
    Ok(out)
}
