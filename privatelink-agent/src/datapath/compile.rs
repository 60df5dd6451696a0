//! Model → exact map contents. Pure: no kernel access, so every rule is unit-testable.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use privatelink_common::{
    ACTION_ACCEPT, ACTION_DROP, AllowKey, Backend4, Backend6, DatapathConfig, EndpointIpKey4,
    EndpointIpKey6, EndpointIpValue, EndpointKey4, EndpointKey6, EndpointValue,
    IFACE_INDEX_ENTRIES, IfaceInfo, IfaceKey, In6, LINK_AVAILABLE, LINK_PENDING, LINK_REJECTED,
    LinkInfo, MAX_NETWORKS, MAX_RULES, NAT_SLOTS, NatRange4, NatRange6, PP2_TYPE_ACCOUNT_ID,
    PP2_TYPE_ENDPOINT_ID, PP2_TYPE_LINK_ID, PP2_TYPE_NOOP, PP2_TYPE_UNIQUE_ID, PROTO_ANY,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PROXY_TLVS_MAX, ProxyTlvs, ROLE_CONSUMER,
    ROLE_PROVIDER, RULES_NONE, Rule4, Rule6,
};

use super::{
    maglev,
    model::{Action, Link, LinkProxy, LinkState, Model, Proto, Role, RuleProto},
};

/// The full contents of every map the agent writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub config: DatapathConfig,
    pub ifaces: BTreeMap<IfaceKey, IfaceInfo>,
    /// The untagged interfaces of `ifaces` with an ifindex below `IFACE_INDEX_ENTRIES`, by ifindex.
    pub iface_index: BTreeMap<u32, IfaceInfo>,
    pub devmap: BTreeSet<u32>,
    pub nat4: BTreeMap<u32, NatRange4>,
    pub nat6: BTreeMap<u32, NatRange6>,
    pub backends4: BTreeMap<u32, Backend4>,
    pub backends6: BTreeMap<u32, Backend6>,
    /// Rule-list slot → rules (slots are content-addressed: a list never changes in place).
    pub rules4: BTreeMap<u32, Vec<Rule4>>,
    pub rules6: BTreeMap<u32, Vec<Rule6>>,
    /// Service slot → Maglev table of backend slots, per family.
    pub maglev: BTreeMap<u32, Vec<u32>>,
    pub maglev6: BTreeMap<u32, Vec<u32>>,
    pub allowlist: BTreeSet<AllowKey>,
    pub links: BTreeMap<u32, LinkInfo>,
    pub endpoint_ips4: BTreeMap<EndpointIpKey4, EndpointIpValue>,
    pub endpoints4: BTreeMap<EndpointKey4, EndpointValue>,
    pub endpoint_ips6: BTreeMap<EndpointIpKey6, EndpointIpValue>,
    pub endpoints6: BTreeMap<EndpointKey6, EndpointValue>,
    /// Link id → the TLVs of its PROXY headers (every link with a TCP port: a flow whose header
    /// is still due needs them after the service turned PROXY off).
    pub proxy_tlvs: BTreeMap<u32, ProxyTlvs>,
}

/// A model that cannot be written. Nothing is written when compile fails.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("link {link}: service slot {service} does not exist")]
    UnknownService { link: u32, service: u32 },
    #[error("network id {0} is out of range (at most {max})", max = MAX_NETWORKS - 1)]
    NetworkId(u32),
    #[error("NAT slot {0} is out of range (at most {max})", max = NAT_SLOTS - 1)]
    NatSlot(u32),
    #[error("link {link}: {count} security-group rules compile to more than {MAX_RULES}")]
    TooManyRules { link: u32, count: usize },
    #[error("link {link}: port 0 in a port mapping")]
    PortZero { link: u32 },
    #[error("links {a} and {b} both claim {ip} {proto:?} port {port} in network {network}")]
    DuplicateEndpoint {
        a: u32,
        b: u32,
        network: u32,
        ip: IpAddr,
        proto: Proto,
        port: u16,
    },
    #[error("links {a} and {b} share endpoint address {ip} in network {network}")]
    DuplicateIp {
        a: u32,
        b: u32,
        network: u32,
        ip: IpAddr,
    },
    #[error("NAT range of network {network}: empty port range")]
    NatPorts { network: u32 },
    #[error("IPv6 NAT range of network {network}: /{len} is wider than /96")]
    Nat6Prefix { network: u32, len: u8 },
    #[error("link {0} has no address")]
    NoAddress(u32),
    #[error("link id 0 is reserved")]
    LinkZero,
    #[error("link {link}: PROXY protocol TLVs of {len} bytes exceed {PROXY_TLVS_MAX}")]
    ProxyTlvs { link: u32, len: usize },
}

/// Bytes of the UNIQUE_ID value the datapath appends (the connection id in hex).
pub const PROXY_CONNECTION_ID_LEN: usize = 16;

/// The TLVs of link `id`'s PROXY protocol v2 headers, as the datapath copies them after the
/// addresses: the endpoint id (0xE0), the link id (0xE1, 4 bytes, network order), the account id
/// (0xE2), a NOOP pad, and a UNIQUE_ID (0x05) of `<endpoint id>/<account id>/` whose last 16
/// characters (the connection id) the datapath appends, before its CRC32C TLV. The pad makes the
/// header's length a multiple of 4 for either family (16 + addresses and ports (12 or 36) + these
/// + 16 + 7), so that inserting it keeps the TCP checksum's words aligned.
pub fn proxy_tlvs(id: u32, p: &LinkProxy) -> Result<ProxyTlvs, CompileError> {
    fn tlv(out: &mut Vec<u8>, kind: u8, len: usize, value: &[u8]) {
        out.push(kind);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(value);
    }
    let mut b = Vec::with_capacity(PROXY_TLVS_MAX);
    tlv(
        &mut b,
        PP2_TYPE_ENDPOINT_ID,
        p.endpoint_id.len(),
        p.endpoint_id.as_bytes(),
    );
    tlv(&mut b, PP2_TYPE_LINK_ID, 4, &id.to_be_bytes());
    tlv(
        &mut b,
        PP2_TYPE_ACCOUNT_ID,
        p.account_id.len(),
        p.account_id.as_bytes(),
    );
    let prefix = format!("{}/{}/", p.endpoint_id, p.account_id);
    // The header is 51 (IPv4) or 75 (IPv6) bytes besides these, 3 modulo 4 either way.
    let unpadded = b.len() + 3 + 3 + prefix.len();
    let pad = (1 + 4 - unpadded % 4) % 4;
    tlv(&mut b, PP2_TYPE_NOOP, pad, &[0; 3][..pad]);
    tlv(
        &mut b,
        PP2_TYPE_UNIQUE_ID,
        prefix.len() + PROXY_CONNECTION_ID_LEN,
        prefix.as_bytes(),
    );
    if b.len() > PROXY_TLVS_MAX {
        return Err(CompileError::ProxyTlvs {
            link: id,
            len: b.len(),
        });
    }
    let mut t = ProxyTlvs {
        len: b.len() as u32,
        ..Default::default()
    };
    t.bytes[..b.len()].copy_from_slice(&b);
    Ok(t)
}

fn nat_slot(slot: u32) -> Result<u32, CompileError> {
    if slot < NAT_SLOTS {
        Ok(slot)
    } else {
        Err(CompileError::NatSlot(slot))
    }
}

fn network(id: u32) -> Result<u32, CompileError> {
    if id < MAX_NETWORKS {
        Ok(id)
    } else {
        Err(CompileError::NetworkId(id))
    }
}

/// An IPv6 address as the datapath holds it (four wire words read natively).
pub fn in6(a: Ipv6Addr) -> In6 {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The address the datapath's words stand for.
pub fn addr6(w: In6) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// An address as the maps hold it (wire bytes read natively), as an address again.
pub trait WireAddr: Copy {
    fn ip(self) -> IpAddr;
}

impl WireAddr for u32 {
    fn ip(self) -> IpAddr {
        Ipv4Addr::from(self.to_ne_bytes()).into()
    }
}

impl WireAddr for In6 {
    fn ip(self) -> IpAddr {
        addr6(self).into()
    }
}

fn be4(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn proto_code(p: RuleProto, icmp: u8) -> u8 {
    match p {
        RuleProto::Tcp => PROTO_TCP,
        RuleProto::Udp => PROTO_UDP,
        RuleProto::Icmp => icmp,
        RuleProto::All => PROTO_ANY,
    }
}

fn action_code(a: Action) -> u8 {
    match a {
        Action::Accept => ACTION_ACCEPT,
        Action::Drop => ACTION_DROP,
    }
}

/// The rule for IPv4 flows, if its source is IPv4.
fn rule4(r: &super::model::Rule) -> Option<Rule4> {
    let IpNet::V4(src) = r.source else {
        return None;
    };
    Some(Rule4 {
        addr_be: be4(src.network()),
        mask_be: be4(src.netmask()),
        port_lo: *r.ports.start(),
        port_hi: *r.ports.end(),
        proto: proto_code(r.proto, PROTO_ICMP),
        action: action_code(r.action),
        _pad: [0; 2],
    })
}

/// The rule for IPv6 flows, if its source is IPv6 (protocol `icmp` means ICMPv6 here).
fn rule6(r: &super::model::Rule) -> Option<Rule6> {
    let IpNet::V6(src) = r.source else {
        return None;
    };
    Some(Rule6 {
        addr_be: in6(src.network()),
        mask_be: in6(src.netmask()),
        port_lo: *r.ports.start(),
        port_hi: *r.ports.end(),
        proto: proto_code(r.proto, PROTO_ICMPV6),
        action: action_code(r.action),
        _pad: [0; 2],
    })
}

/// Gives each distinct wanted item a slot ≥ `first`: its previous slot if it had one (unchanged
/// content keeps its slot, so nothing is rewritten), else the lowest free one.
fn assign_slots<K: Hash + Eq + Clone>(
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

/// Backend slots of one family (keyed by the wire form of the address, kept from `prev`), and
/// each service's Maglev table over them. `ids` turns an address into the Maglev identity (the
/// same set of backends always gives the same table).
fn backends<A: Copy + Ord + Hash, V>(
    model: &Model,
    pick: impl Fn(&IpAddr) -> Option<A>,
    id: impl Fn(A) -> u64,
    prev: &BTreeMap<u32, V>,
    wire: impl Fn(&V) -> A,
) -> (HashMap<A, u32>, BTreeMap<u32, Vec<u32>>) {
    let prev_slot: HashMap<A, u32> = prev.iter().map(|(&s, b)| (wire(b), s)).collect();
    let wanted: BTreeSet<A> = model
        .services
        .values()
        .flat_map(|s| s.backends.iter().filter_map(&pick))
        .collect();
    let slot = assign_slots(wanted, &prev_slot, 0);
    let mut tables = BTreeMap::new();
    for (&service, svc) in &model.services {
        let mut addrs: Vec<(u64, A)> = svc
            .backends
            .iter()
            .filter_map(&pick)
            .map(|a| (id(a), a))
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        let ids: Vec<u64> = addrs.iter().map(|(i, _)| *i).collect();
        let table = maglev::table(&ids);
        // No backends, no table (reads back the same way from the map).
        if !table.is_empty() {
            tables.insert(
                service,
                table.iter().map(|&i| slot[&addrs[i as usize].1]).collect(),
            );
        }
    }
    (slot, tables)
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
        let info = IfaceInfo {
            network_id: network(i.network_id)?,
            role,
            _pad: 0,
            mac: i.mac,
        };
        out.ifaces.insert(key, info);
        if i.vlan_id == 0 && i.ifindex < IFACE_INDEX_ENTRIES {
            out.iface_index.insert(i.ifindex, info);
        }
        out.devmap.insert(i.ifindex);
    }
    for (&net, r) in &model.nat {
        if r.ports.is_empty() {
            return Err(CompileError::NatPorts { network: net });
        }
        let count = 1u32 << (32 - r.addrs.prefix_len()).min(31);
        out.nat4.insert(
            nat_slot(net)?,
            NatRange4 {
                base: u32::from(r.addrs.network()),
                count,
                port_min: *r.ports.start(),
                port_max: *r.ports.end(),
                _pad: 0,
            },
        );
        if let Some(r6) = r.addrs6 {
            if r6.prefix_len() < 96 {
                return Err(CompileError::Nat6Prefix {
                    network: net,
                    len: r6.prefix_len(),
                });
            }
            out.nat6.insert(
                net,
                NatRange6 {
                    base_be: in6(r6.network()),
                    count: 1u32 << (128 - r6.prefix_len()).min(31),
                    port_min: *r.ports.start(),
                    port_max: *r.ports.end(),
                    _pad: 0,
                },
            );
        }
    }

    for svc in model.services.values() {
        network(svc.provider_network)?;
    }
    let (slots4, maglev4) = backends(
        model,
        |a| match a {
            IpAddr::V4(a) => Some(be4(*a)),
            IpAddr::V6(_) => None,
        },
        |be| u64::from(u32::from_be(be)),
        &prev.backends4,
        |b| b.addr_be,
    );
    out.backends4 = slots4
        .into_iter()
        .map(|(addr_be, s)| (s, Backend4 { addr_be, _pad: 0 }))
        .collect();
    out.maglev = maglev4;
    let (slots6, maglev6) = backends(
        model,
        |a| match a {
            IpAddr::V6(a) => Some(in6(*a)),
            IpAddr::V4(_) => None,
        },
        |w| {
            let x = u128::from(addr6(w));
            (x >> 64) as u64 ^ x as u64
        },
        &prev.backends6,
        |b| b.addr_be,
    );
    out.backends6 = slots6
        .into_iter()
        .map(|(addr_be, s)| (s, Backend6 { addr_be }))
        .collect();
    out.maglev6 = maglev6;

    for &(service_slot, account) in &model.allowlist {
        out.allowlist.insert(AllowKey {
            service_slot,
            account,
        });
    }

    // Rule lists: content-addressed slots per family (slot 0 means "no groups").
    let lists: Vec<RuleLists> = model
        .links
        .iter()
        .map(|(&id, l)| rule_lists(id, l))
        .collect::<Result<_, CompileError>>()?;
    let prev4: HashMap<Vec<Rule4>, u32> =
        prev.rules4.iter().map(|(&s, r)| (r.clone(), s)).collect();
    let slot4 = assign_slots(
        lists.iter().filter_map(|l| l.0.clone()),
        &prev4,
        RULES_NONE + 1,
    );
    let prev6: HashMap<Vec<Rule6>, u32> =
        prev.rules6.iter().map(|(&s, r)| (r.clone(), s)).collect();
    let slot6 = assign_slots(
        lists.iter().filter_map(|l| l.1.clone()),
        &prev6,
        RULES_NONE + 1,
    );
    out.rules4 = slot4.iter().map(|(l, &s)| (s, l.clone())).collect();
    out.rules6 = slot6.iter().map(|(l, &s)| (s, l.clone())).collect();

    for ((&id, l), (r4, r6)) in model.links.iter().zip(&lists) {
        let slots = (
            r4.as_ref().map_or(RULES_NONE, |v| slot4[v]),
            r6.as_ref().map_or(RULES_NONE, |v| slot6[v]),
        );
        out.add_link(id, link_entries(model, id, l, slots)?)?;
    }
    Ok(out)
}

/// A link's security-group rules per family as the datapath holds them (`None`: no group bound,
/// or no address of that family).
type RuleLists = (Option<Vec<Rule4>>, Option<Vec<Rule6>>);

fn rule_lists(id: u32, l: &Link) -> Result<RuleLists, CompileError> {
    fn check<R>(id: u32, v: Option<Vec<R>>) -> Result<Option<Vec<R>>, CompileError> {
        match v {
            Some(v) if v.len() > MAX_RULES => Err(CompileError::TooManyRules {
                link: id,
                count: v.len(),
            }),
            v => Ok(v),
        }
    }
    let Some(rs) = &l.rules else {
        return Ok((None, None));
    };
    let v4 = l.ip4.map(|_| rs.iter().filter_map(rule4).collect());
    let v6 = l.ip6.map(|_| rs.iter().filter_map(rule6).collect());
    Ok((check(id, v4)?, check(id, v6)?))
}

/// What one link compiles to.
struct LinkEntries {
    info: LinkInfo,
    tlvs: Option<ProxyTlvs>,
    ip4: Option<EndpointIpKey4>,
    ip6: Option<EndpointIpKey6>,
    ports4: Vec<(EndpointKey4, EndpointValue)>,
    ports6: Vec<(EndpointKey6, EndpointValue)>,
}

fn proto_of(code: u8) -> Proto {
    if code == PROTO_TCP {
        Proto::Tcp
    } else {
        Proto::Udp
    }
}

/// The entries of link `id` of `model`, pointing at rule lists `rules` (IPv4, IPv6).
fn link_entries(
    model: &Model,
    id: u32,
    l: &Link,
    rules: (u32, u32),
) -> Result<LinkEntries, CompileError> {
    if id == 0 {
        return Err(CompileError::LinkZero);
    }
    if l.ip4.is_none() && l.ip6.is_none() {
        return Err(CompileError::NoAddress(id));
    }
    let svc = model
        .services
        .get(&l.service_slot)
        .ok_or(CompileError::UnknownService {
            link: id,
            service: l.service_slot,
        })?;
    let consumer_net = network(l.network_id)?;
    // Every link with a TCP port has its TLVs written (a header still due after the service turned
    // PROXY off needs them); new flows use them only while it is on.
    let tcp = l.ports.iter().any(|p| p.proto == Proto::Tcp);
    let tlvs = if tcp {
        Some(proxy_tlvs(id, &l.proxy)?)
    } else {
        None
    };
    let info = LinkInfo {
        state: match l.state {
            LinkState::Pending => LINK_PENDING,
            LinkState::Available => LINK_AVAILABLE,
            LinkState::Rejected => LINK_REJECTED,
        },
        account: l.account,
        service_slot: l.service_slot,
        provider_network: svc.provider_network,
        rules_slot: rules.0,
        rules_slot6: rules.1,
        allowed: u32::from(model.allowlist.contains(&(l.service_slot, l.account))),
        answer_ping: u32::from(l.answer_ping),
        flow_limit: l.flow_limit,
        proxy_tlvs: match &tlvs {
            Some(t) if l.proxy.v2 => t.len,
            _ => 0,
        },
        conn_log: u32::from(l.conn_log),
        nat_slot: nat_slot(l.nat_slot)?,
    };
    let value = |service: u16| EndpointValue {
        link_id: id,
        service_port_be: service.to_be(),
        _pad: 0,
    };
    let mut e = LinkEntries {
        info,
        tlvs,
        ip4: l.ip4.map(|a| EndpointIpKey4 {
            network_id: consumer_net,
            addr_be: be4(a),
        }),
        ip6: l.ip6.map(|a| EndpointIpKey6 {
            network_id: consumer_net,
            addr_be: in6(a),
        }),
        ports4: Vec::new(),
        ports6: Vec::new(),
    };
    for pm in l.ports.iter() {
        if pm.terminal == 0 || pm.service == 0 {
            return Err(CompileError::PortZero { link: id });
        }
        let proto = match pm.proto {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        };
        if let Some(a) = l.ip4 {
            e.ports4.push((
                EndpointKey4 {
                    network_id: consumer_net,
                    addr_be: be4(a),
                    port_be: pm.terminal.to_be(),
                    proto,
                    _pad: 0,
                },
                value(pm.service),
            ));
        }
        if let Some(a) = l.ip6 {
            e.ports6.push((
                EndpointKey6 {
                    network_id: consumer_net,
                    addr_be: in6(a),
                    port_be: pm.terminal.to_be(),
                    proto,
                    _pad: 0,
                },
                value(pm.service),
            ));
        }
    }
    Ok(e)
}

/// Keys of the endpoint maps: the network and address they claim, for error messages.
trait Claim: Ord + Copy {
    fn network(&self) -> u32;
    fn ip(&self) -> IpAddr;
    /// Protocol and terminal port, for port entries.
    fn port(&self) -> Option<(Proto, u16)>;
}

impl Claim for EndpointIpKey4 {
    fn network(&self) -> u32 {
        self.network_id
    }
    fn ip(&self) -> IpAddr {
        Ipv4Addr::from(self.addr_be.to_ne_bytes()).into()
    }
    fn port(&self) -> Option<(Proto, u16)> {
        None
    }
}

impl Claim for EndpointIpKey6 {
    fn network(&self) -> u32 {
        self.network_id
    }
    fn ip(&self) -> IpAddr {
        addr6(self.addr_be).into()
    }
    fn port(&self) -> Option<(Proto, u16)> {
        None
    }
}

impl Claim for EndpointKey4 {
    fn network(&self) -> u32 {
        self.network_id
    }
    fn ip(&self) -> IpAddr {
        Ipv4Addr::from(self.addr_be.to_ne_bytes()).into()
    }
    fn port(&self) -> Option<(Proto, u16)> {
        Some((proto_of(self.proto), u16::from_be(self.port_be)))
    }
}

impl Claim for EndpointKey6 {
    fn network(&self) -> u32 {
        self.network_id
    }
    fn ip(&self) -> IpAddr {
        addr6(self.addr_be).into()
    }
    fn port(&self) -> Option<(Proto, u16)> {
        Some((proto_of(self.proto), u16::from_be(self.port_be)))
    }
}

/// The error for links `a` and `b` both claiming `k`.
fn clash<K: Claim>(k: &K, a: u32, b: u32) -> CompileError {
    match k.port() {
        Some((proto, port)) => CompileError::DuplicateEndpoint {
            a,
            b,
            network: k.network(),
            ip: k.ip(),
            proto,
            port,
        },
        None => CompileError::DuplicateIp {
            a,
            b,
            network: k.network(),
            ip: k.ip(),
        },
    }
}

/// Values of the endpoint maps name their link.
trait OfLink: Copy {
    fn link(&self) -> u32;
}

impl OfLink for EndpointIpValue {
    fn link(&self) -> u32 {
        self.link_id
    }
}

impl OfLink for EndpointValue {
    fn link(&self) -> u32 {
        self.link_id
    }
}

/// Inserts `entries`, refusing a key another link already holds.
fn claim<K: Claim, V: OfLink>(
    map: &mut BTreeMap<K, V>,
    entries: impl IntoIterator<Item = (K, V)>,
) -> Result<(), CompileError> {
    for (k, v) in entries {
        if let Some(other) = map.insert(k, v) {
            // The first holder reported first, as the order of insertion is the order of links.
            return Err(clash(&k, other.link(), v.link()));
        }
    }
    Ok(())
}

/// Refuses entries of `new` whose key an untouched link holds in `shadow`.
fn untouched_clash<K: Claim, V: OfLink>(
    new: &BTreeMap<K, V>,
    shadow: &BTreeMap<K, V>,
    is_touched: impl Fn(u32) -> bool,
) -> Result<(), CompileError> {
    for (k, v) in new {
        if let Some(o) = shadow.get(k).filter(|o| !is_touched(o.link())) {
            return Err(clash(k, o.link(), v.link()));
        }
    }
    Ok(())
}

fn replace<K: Ord + Clone, V: Clone>(
    map: &mut BTreeMap<K, V>,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) {
    for k in old.keys() {
        map.remove(k);
    }
    map.extend(new.iter().map(|(k, v)| (k.clone(), v.clone())));
}

impl MapState {
    /// Adds a link's entries, refusing an address or port another link already holds.
    fn add_link(&mut self, id: u32, e: LinkEntries) -> Result<(), CompileError> {
        self.links.insert(id, e.info);
        if let Some(t) = e.tlvs {
            self.proxy_tlvs.insert(id, t);
        }
        let value = EndpointIpValue {
            link_id: id,
            _pad: 0,
        };
        claim(&mut self.endpoint_ips4, e.ip4.map(|k| (k, value)))?;
        claim(&mut self.endpoint_ips6, e.ip6.map(|k| (k, value)))?;
        claim(&mut self.endpoints4, e.ports4)?;
        claim(&mut self.endpoints6, e.ports6)
    }

    /// Replaces the per-link entries and rule lists `old` holds with those `new` holds (an
    /// incremental change, or its undoing with the arguments swapped).
    pub fn overlay(&mut self, old: &MapState, new: &MapState) {
        replace(&mut self.links, &old.links, &new.links);
        replace(&mut self.proxy_tlvs, &old.proxy_tlvs, &new.proxy_tlvs);
        replace(
            &mut self.endpoint_ips4,
            &old.endpoint_ips4,
            &new.endpoint_ips4,
        );
        replace(&mut self.endpoints4, &old.endpoints4, &new.endpoints4);
        replace(
            &mut self.endpoint_ips6,
            &old.endpoint_ips6,
            &new.endpoint_ips6,
        );
        replace(&mut self.endpoints6, &old.endpoints6, &new.endpoints6);
        replace(&mut self.rules4, &old.rules4, &new.rules4);
        replace(&mut self.rules6, &old.rules6, &new.rules6);
    }
}

/// More changed links than this and the full compile is used (it is the cheaper one for bulk).
pub const INCREMENTAL_MAX_LINKS: usize = 1024;

/// The slot of a touched link's rule list: the slot holding the same content, else a slot no list
/// holds now (a slot is never rewritten while links may still point at it), recorded in `new`.
fn list_slot<R: Clone + Eq + Hash>(
    list: Option<Vec<R>>,
    shadow: &BTreeMap<u32, Vec<R>>,
    by_content: &HashMap<&Vec<R>, u32>,
    new: &mut BTreeMap<u32, Vec<R>>,
) -> u32 {
    let Some(list) = list else {
        return RULES_NONE;
    };
    if let Some(&s) = by_content.get(&list) {
        return s;
    }
    if let Some((&s, _)) = new.iter().find(|(_, r)| **r == list) {
        return s;
    }
    let mut next = RULES_NONE + 1;
    while shadow.contains_key(&next) || new.contains_key(&next) {
        next += 1;
    }
    new.insert(next, list);
    next
}

/// Rule lists of `shadow` that no link in `used` points at any more, into `old`.
fn unused_lists<R: Clone>(
    shadow: &BTreeMap<u32, Vec<R>>,
    used: &BTreeSet<u32>,
    old: &mut BTreeMap<u32, Vec<R>>,
) {
    for (s, r) in shadow {
        if !used.contains(s) {
            old.insert(*s, r.clone());
        }
    }
}

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
            let slots = shadow
                .links
                .get(&id)
                .map_or((RULES_NONE, RULES_NONE), |i| (i.rules_slot, i.rules_slot6));
            old.add_link(id, link_entries(before, id, l, slots)?)?;
        }
    }
    // After: rule lists found by content, new ones in free slots.
    let content4: HashMap<&Vec<Rule4>, u32> = shadow.rules4.iter().map(|(s, r)| (r, *s)).collect();
    let content6: HashMap<&Vec<Rule6>, u32> = shadow.rules6.iter().map(|(s, r)| (r, *s)).collect();
    for &(id, _, l) in &touched {
        let Some(l) = l else { continue };
        let (r4, r6) = rule_lists(id, l)?;
        let slots = (
            list_slot(r4, &shadow.rules4, &content4, &mut new.rules4),
            list_slot(r6, &shadow.rules6, &content6, &mut new.rules6),
        );
        new.add_link(id, link_entries(model, id, l, slots)?)?;
    }
    // An address or port an untouched link holds cannot be taken.
    let is_touched = |link: u32| old.links.contains_key(&link) || new.links.contains_key(&link);
    untouched_clash(&new.endpoint_ips4, &shadow.endpoint_ips4, is_touched)?;
    untouched_clash(&new.endpoint_ips6, &shadow.endpoint_ips6, is_touched)?;
    untouched_clash(&new.endpoints4, &shadow.endpoints4, is_touched)?;
    untouched_clash(&new.endpoints6, &shadow.endpoints6, is_touched)?;
    // Rule lists no link uses any more go (slot 0 is "none").
    let untouched = || shadow.links.iter().filter(|(id, _)| !is_touched(**id));
    let used4: BTreeSet<u32> = untouched()
        .map(|(_, i)| i.rules_slot)
        .chain(new.links.values().map(|i| i.rules_slot))
        .collect();
    let used6: BTreeSet<u32> = untouched()
        .map(|(_, i)| i.rules_slot6)
        .chain(new.links.values().map(|i| i.rules_slot6))
        .collect();
    unused_lists(&shadow.rules4, &used4, &mut old.rules4);
    unused_lists(&shadow.rules6, &used6, &mut old.rules6);
    Ok(Some((old, new)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::model::{PortMap, Rule, Service};

    /// The lists of `lists`, renumbered in an order independent of their slots.
    fn renumbered<R: Clone + std::fmt::Debug>(
        lists: &BTreeMap<u32, Vec<R>>,
    ) -> BTreeMap<u32, Vec<R>> {
        let mut used: Vec<Vec<R>> = lists.values().cloned().collect();
        used.sort_by_key(|l| format!("{l:?}"));
        used.into_iter()
            .enumerate()
            .map(|(i, r)| (i as u32, r))
            .collect()
    }

    /// A map state with every link's rule-list slots replaced by the lists themselves, so states
    /// that differ only in slot numbering compare equal.
    #[allow(clippy::type_complexity)]
    fn resolved(
        s: &MapState,
    ) -> (
        MapState,
        BTreeMap<u32, (Option<Vec<Rule4>>, Option<Vec<Rule6>>)>,
    ) {
        let lists = s
            .links
            .iter()
            .map(|(id, i)| {
                (
                    *id,
                    (
                        s.rules4.get(&i.rules_slot).cloned(),
                        s.rules6.get(&i.rules_slot6).cloned(),
                    ),
                )
            })
            .collect();
        let mut bare = s.clone();
        for i in bare.links.values_mut() {
            i.rules_slot = u32::from(i.rules_slot != RULES_NONE);
            i.rules_slot6 = u32::from(i.rules_slot6 != RULES_NONE);
        }
        bare.rules4 = renumbered(&bare.rules4);
        bare.rules6 = renumbered(&bare.rules6);
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
                        source: if r.next(2) == 0 {
                            "198.18.0.0/24".parse().unwrap()
                        } else {
                            "2001:db8::/64".parse().unwrap()
                        },
                        action: if r.next(2) == 0 {
                            Action::Accept
                        } else {
                            Action::Drop
                        },
                    })
                    .collect(),
            ),
        };
        // IPv4, IPv6 or both, from small pools so that addresses collide.
        let ip4 = match r.next(3) {
            0 => None,
            _ => Some(Ipv4Addr::new(198, 18, 0, 1 + r.next(60) as u8)),
        };
        Link {
            network_id: 1 + r.next(2) as u32,
            ip4,
            ip6: match r.next(2) {
                0 if ip4.is_some() => None,
                _ => Some(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0,
                    0,
                    0,
                    0,
                    0,
                    1 + r.next(60) as u16,
                )),
            },
            service_slot: 1,
            account: 1 + r.next(3) as u32,
            state: [
                LinkState::Pending,
                LinkState::Available,
                LinkState::Rejected,
            ][r.next(3) as usize],
            ports: [PortMap {
                proto: if r.next(2) == 0 {
                    Proto::Tcp
                } else {
                    Proto::Udp
                },
                terminal: 80,
                service: 8080,
            }]
            .into(),
            rules,
            answer_ping: r.next(2) == 0,
            flow_limit: r.next(3) as u32,
            proxy: LinkProxy {
                v2: r.next(2) == 0,
                endpoint_id: format!("ep-{:08x}", r.next(1 << 32)),
                account_id: "a".repeat(2 + r.next(31) as usize),
            },
            conn_log: r.next(2) == 0,
            nat_slot: 100,
        }
    }

    #[test]
    fn proxy_tlvs_pad_the_header_to_words_and_name_the_endpoint_link_and_account() {
        for account_len in 2..=32 {
            let p = LinkProxy {
                v2: true,
                endpoint_id: "ep-0a1b2c3d".into(),
                account_id: "b".repeat(account_len),
            };
            let t = proxy_tlvs(7, &p).expect("fits");
            let n = t.len as usize;
            // 16 + addresses and ports + TLVs + the connection id + the CRC32C TLV.
            for addrs in [12, 36] {
                assert_eq!(
                    (16 + addrs + n + PROXY_CONNECTION_ID_LEN + 7) % 4,
                    0,
                    "{account_len}"
                );
            }
            let b = &t.bytes[..n];
            assert_eq!(&b[..3], &[PP2_TYPE_ENDPOINT_ID, 0, 11]);
            assert_eq!(&b[3..14], b"ep-0a1b2c3d");
            assert_eq!(&b[14..21], &[PP2_TYPE_LINK_ID, 0, 4, 0, 0, 0, 7]);
            assert_eq!(&b[21..24], &[PP2_TYPE_ACCOUNT_ID, 0, account_len as u8]);
            let unique = format!("ep-0a1b2c3d/{}/", p.account_id);
            assert!(
                b.ends_with(unique.as_bytes()),
                "the UNIQUE_ID's prefix ends the TLVs"
            );
            let at = n - unique.len() - 3;
            assert_eq!(b[at], PP2_TYPE_UNIQUE_ID);
            assert_eq!(
                u16::from_be_bytes([b[at + 1], b[at + 2]]) as usize,
                unique.len() + PROXY_CONNECTION_ID_LEN
            );
            assert_eq!(b[24 + account_len], PP2_TYPE_NOOP, "the pad sits before it");
            assert!(t.bytes[n..].iter().all(|x| *x == 0));
        }
        let long = LinkProxy {
            v2: true,
            endpoint_id: "e".repeat(100),
            account_id: "a".repeat(32),
        };
        assert!(matches!(
            proxy_tlvs(7, &long),
            Err(CompileError::ProxyTlvs { link: 7, .. })
        ));
    }

    #[test]
    fn a_links_only_change_compiles_to_what_the_full_compile_gives() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut model = Model {
            services: BTreeMap::from([(
                1,
                Service {
                    provider_network: 100,
                    backends: vec![
                        Ipv4Addr::new(198, 18, 100, 10).into(),
                        Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 10).into(),
                    ],
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
