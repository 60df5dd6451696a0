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
    model::{Action, Link, LinkState, Model, Proto, Role, RuleProto},
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
        .map(|(&id, l)| Ok((id, rule_list(id, l)?)))
        .collect::<Result<_, CompileError>>()?;
    let rule_slot = assign_slots(
        lists.iter().filter_map(|(_, l)| l.clone()),
        &prev_rules,
        RULES_NONE + 1,
    );
    for (list, &s) in &rule_slot {
        out.rules4.insert(s, list.clone());
    }

    for ((&id, l), (_, list)) in model.links.iter().zip(&lists) {
        let e = link_entries(
            model,
            id,
            l,
            list.as_ref().map_or(RULES_NONE, |v| rule_slot[v]),
        )?;
        out.add_link(id, e, l.ip)?;
    }
    Ok(out)
}

/// A link's security-group rules as the datapath holds them (`None`: no group bound).
fn rule_list(id: u32, l: &Link) -> Result<Option<Vec<Rule4>>, CompileError> {
    let list = l
        .rules
        .as_ref()
        .map(|rs| rs.iter().map(rule4).collect::<Vec<_>>());
    match list {
        Some(v) if v.len() > MAX_RULES => Err(CompileError::TooManyRules {
            link: id,
            count: v.len(),
        }),
        list => Ok(list),
    }
}

/// What one link compiles to.
struct LinkEntries {
    info: LinkInfo,
    ip: EndpointIpKey4,
    ports: Vec<(EndpointKey4, EndpointValue, Proto, u16)>,
}

/// The entries of link `id` of `model`, pointing at rule list `rules_slot`.
fn link_entries(
    model: &Model,
    id: u32,
    l: &Link,
    rules_slot: u32,
) -> Result<LinkEntries, CompileError> {
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
    let info = LinkInfo {
        state: match l.state {
            LinkState::Pending => LINK_PENDING,
            LinkState::Available => LINK_AVAILABLE,
            LinkState::Rejected => LINK_REJECTED,
        },
        account: l.account,
        service_slot: l.service_slot,
        provider_network: svc.provider_network,
        rules_slot,
        allowed: u32::from(model.allowlist.contains(&(l.service_slot, l.account))),
        answer_ping: u32::from(l.answer_ping),
    };
    let addr_be = u32::from_ne_bytes(l.ip.octets());
    let mut ports = Vec::with_capacity(l.ports.len());
    for pm in &l.ports {
        if pm.terminal == 0 || pm.service == 0 {
            return Err(CompileError::PortZero { link: id });
        }
        let proto = match pm.proto {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        };
        ports.push((
            EndpointKey4 {
                network_id: consumer_net,
                addr_be,
                port_be: pm.terminal.to_be(),
                proto,
                _pad: 0,
            },
            EndpointValue {
                link_id: id,
                service_port_be: pm.service.to_be(),
                _pad: 0,
            },
            pm.proto,
            pm.terminal,
        ));
    }
    Ok(LinkEntries {
        info,
        ip: EndpointIpKey4 {
            network_id: consumer_net,
            addr_be,
        },
        ports,
    })
}

impl MapState {
    /// Adds a link's entries, refusing an address or port another link already holds.
    fn add_link(
        &mut self,
        id: u32,
        e: LinkEntries,
        ip: std::net::Ipv4Addr,
    ) -> Result<(), CompileError> {
        self.links.insert(id, e.info);
        if let Some(other) = self.endpoint_ips4.insert(
            e.ip,
            EndpointIpValue {
                link_id: id,
                _pad: 0,
            },
        ) {
            return Err(CompileError::DuplicateIp {
                a: other.link_id,
                b: id,
                network: e.ip.network_id,
                ip,
            });
        }
        for (key, value, proto, port) in e.ports {
            if let Some(other) = self.endpoints4.insert(key, value) {
                return Err(CompileError::DuplicateEndpoint {
                    a: other.link_id,
                    b: id,
                    network: key.network_id,
                    ip,
                    proto,
                    port,
                });
            }
        }
        Ok(())
    }

    /// Replaces the per-link entries and rule lists `old` holds with those `new` holds (an
    /// incremental change, or its undoing with the arguments swapped).
    pub fn overlay(&mut self, old: &MapState, new: &MapState) {
        for k in old.links.keys() {
            self.links.remove(k);
        }
        for k in old.endpoint_ips4.keys() {
            self.endpoint_ips4.remove(k);
        }
        for k in old.endpoints4.keys() {
            self.endpoints4.remove(k);
        }
        for k in old.rules4.keys() {
            self.rules4.remove(k);
        }
        self.links.extend(new.links.iter().map(|(k, v)| (*k, *v)));
        self.endpoint_ips4
            .extend(new.endpoint_ips4.iter().map(|(k, v)| (*k, *v)));
        self.endpoints4
            .extend(new.endpoints4.iter().map(|(k, v)| (*k, *v)));
        self.rules4
            .extend(new.rules4.iter().map(|(k, v)| (*k, v.clone())));
    }
}

/// More changed links than this and the full compile is used (it is the cheaper one for bulk).
pub const INCREMENTAL_MAX_LINKS: usize = 1024;

/// A change from `before` to `model` that touches only links, compiled against `shadow` (what
/// `before` compiled to): the touched links' entries before (`.0`, with the rule lists that stop
/// being used) and after (`.1`, with the rule lists that start being used). `None` when anything
/// but links changed, or too many links did: the full compile handles those.
pub fn compile_links(
    before: &Model,
    model: &Model,
    shadow: &MapState,
) -> Result<Option<(MapState, MapState)>, CompileError> {
    if before.config != model.config
        || before.ifaces != model.ifaces
        || before.nat != model.nat
        || before.services != model.services
        || before.allowlist != model.allowlist
    {
        return Ok(None);
    }
    // One merged walk over both (sorted) link maps.
    let mut touched: Vec<(u32, Option<&Link>, Option<&Link>)> = Vec::new();
    let (mut a, mut b) = (
        before.links.iter().peekable(),
        model.links.iter().peekable(),
    );
    loop {
        let step = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
        };
        match step {
            std::cmp::Ordering::Less => {
                let (k, l) = a.next().expect("peeked");
                touched.push((*k, Some(l), None));
            }
            std::cmp::Ordering::Greater => {
                let (k, l) = b.next().expect("peeked");
                touched.push((*k, None, Some(l)));
            }
            std::cmp::Ordering::Equal => {
                let ((k, x), (_, y)) = (a.next().expect("peeked"), b.next().expect("peeked"));
                if x != y {
                    touched.push((*k, Some(x), Some(y)));
                }
            }
        }
        if touched.len() > INCREMENTAL_MAX_LINKS {
            return Ok(None);
        }
    }
    let (mut old, mut new) = (MapState::default(), MapState::default());
    // Before: exactly what the shadow holds for the touched links.
    for &(id, l, _) in &touched {
        if let Some(l) = l {
            let slot = shadow.links.get(&id).map_or(RULES_NONE, |i| i.rules_slot);
            old.add_link(id, link_entries(before, id, l, slot)?, l.ip)?;
        }
    }
    // After: rule lists found by content, new ones in slots no list holds now (a slot is never
    // rewritten while links may still point at it).
    let by_content: HashMap<&Vec<Rule4>, u32> =
        shadow.rules4.iter().map(|(s, r)| (r, *s)).collect();
    let mut next_free = RULES_NONE + 1;
    for &(id, _, l) in &touched {
        let Some(l) = l else { continue };
        let slot = match rule_list(id, l)? {
            None => RULES_NONE,
            Some(list) => match by_content.get(&list) {
                Some(&s) => s,
                None => match new.rules4.iter().find(|(_, r)| **r == list) {
                    Some((&s, _)) => s,
                    None => {
                        while shadow.rules4.contains_key(&next_free)
                            || new.rules4.contains_key(&next_free)
                        {
                            next_free += 1;
                        }
                        new.rules4.insert(next_free, list);
                        next_free
                    }
                },
            },
        };
        new.add_link(id, link_entries(model, id, l, slot)?, l.ip)?;
    }
    // An address or port an untouched link holds cannot be taken.
    let is_touched = |link: u32| old.links.contains_key(&link) || new.links.contains_key(&link);
    for (k, v) in &new.endpoint_ips4 {
        if let Some(o) = shadow
            .endpoint_ips4
            .get(k)
            .filter(|o| !is_touched(o.link_id))
        {
            return Err(CompileError::DuplicateIp {
                a: o.link_id,
                b: v.link_id,
                network: k.network_id,
                ip: std::net::Ipv4Addr::from(u32::from_be(k.addr_be)),
            });
        }
    }
    for (k, v) in &new.endpoints4 {
        if let Some(o) = shadow.endpoints4.get(k).filter(|o| !is_touched(o.link_id)) {
            return Err(CompileError::DuplicateEndpoint {
                a: o.link_id,
                b: v.link_id,
                network: k.network_id,
                ip: std::net::Ipv4Addr::from(u32::from_be(k.addr_be)),
                proto: if k.proto == PROTO_TCP {
                    Proto::Tcp
                } else {
                    Proto::Udp
                },
                port: u16::from_be(k.port_be),
            });
        }
    }
    // Rule lists no link uses any more go (slot 0 is "none").
    let mut used: BTreeSet<u32> = shadow
        .links
        .iter()
        .filter(|(id, _)| !is_touched(**id))
        .map(|(_, i)| i.rules_slot)
        .collect();
    used.extend(new.links.values().map(|i| i.rules_slot));
    for (s, r) in &shadow.rules4 {
        if !used.contains(s) {
            old.rules4.insert(*s, r.clone());
        }
    }
    Ok(Some((old, new)))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::dataplane::model::{PortMap, Rule, Service};

    /// A map state with every link's rule-list slot replaced by the list itself, so states that
    /// differ only in slot numbering compare equal.
    fn resolved(s: &MapState) -> (MapState, BTreeMap<u32, Option<Vec<Rule4>>>) {
        let lists = s
            .links
            .iter()
            .map(|(id, i)| (*id, s.rules4.get(&i.rules_slot).cloned()))
            .collect();
        let mut bare = s.clone();
        for i in bare.links.values_mut() {
            i.rules_slot = u32::from(i.rules_slot != RULES_NONE);
        }
        let mut used: Vec<Vec<Rule4>> = bare.rules4.values().cloned().collect();
        used.sort_by_key(|l| format!("{l:?}"));
        bare.rules4 = used
            .into_iter()
            .enumerate()
            .map(|(i, r)| (i as u32, r))
            .collect();
        (bare, lists)
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn link(r: &mut Rng) -> Link {
        let rules = match r.next(4) {
            0 => None,
            n => Some(
                (0..n)
                    .map(|k| Rule {
                        proto: RuleProto::Tcp,
                        ports: (100 * k as u16 + 1)..=(100 * k as u16 + 50),
                        source: "198.18.0.0/24".parse().unwrap(),
                        action: if r.next(2) == 0 {
                            Action::Accept
                        } else {
                            Action::Drop
                        },
                    })
                    .collect(),
            ),
        };
        Link {
            network_id: 1 + r.next(2) as u32,
            ip: Ipv4Addr::new(198, 18, 0, 1 + r.next(60) as u8),
            service_slot: 1,
            account: 1 + r.next(3) as u32,
            state: [
                LinkState::Pending,
                LinkState::Available,
                LinkState::Rejected,
            ][r.next(3) as usize],
            ports: vec![PortMap {
                proto: if r.next(2) == 0 {
                    Proto::Tcp
                } else {
                    Proto::Udp
                },
                terminal: 80,
                service: 8080,
            }],
            rules,
            answer_ping: r.next(2) == 0,
        }
    }

    #[test]
    fn a_links_only_change_compiles_to_what_the_full_compile_gives() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut model = Model {
            services: BTreeMap::from([(
                1,
                Service {
                    provider_network: 100,
                    backends: vec![Ipv4Addr::new(198, 18, 100, 10)],
                },
            )]),
            allowlist: BTreeSet::from([(1, 1), (1, 2)]),
            ..Model::default()
        };
        let (mut compared, mut refused) = (0, 0);
        let mut shadow = compile(&model, &MapState::default()).unwrap();
        for round in 0..400 {
            let mut next = model.clone();
            for _ in 0..1 + r.next(3) {
                let id = 1 + r.next(40) as u32;
                match r.next(3) {
                    0 => drop(next.links.remove(&id)),
                    _ => drop(next.links.insert(id, link(&mut r))),
                }
            }
            let full = compile(&next, &shadow);
            let partial = compile_links(&model, &next, &shadow);
            match (full, partial) {
                (Ok(full), Ok(Some((old, new)))) => {
                    let mut inc = shadow.clone();
                    inc.overlay(&old, &new);
                    assert_eq!(resolved(&inc), resolved(&full), "round {round}");
                    // Undoing gives the state back exactly.
                    let mut undo = inc.clone();
                    undo.overlay(&new, &old);
                    assert_eq!(undo, shadow, "round {round}");
                    shadow = inc;
                    model = next;
                    compared += 1;
                }
                (Err(_), Err(_)) => refused += 1,
                (full, partial) => panic!(
                    "round {round}: full {:?} against incremental {:?}",
                    full.map(|_| ()),
                    partial.map(|p| p.is_some())
                ),
            }
        }
        assert!(
            compared > 100 && refused > 10,
            "{compared} compared, {refused} refused"
        );
        // Anything but links changed: the full compile is asked for.
        let mut other = model.clone();
        other.allowlist.insert((1, 3));
        assert!(compile_links(&model, &other, &shadow).unwrap().is_none());
    }
}
