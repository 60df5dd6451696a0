//! Flow-state sync within a high-availability group: the active node sends its conntrack to its
//! peers, which install it, so that a flow it carried goes on through whichever peer takes over,
//! with the same NAT address and port and the same backend, and without a new handshake.
//!
//! The datapath announces each flow it makes and each TCP state change in a ring buffer (the key
//! of one entry, see `FlowSync`); the active node sends that flow's two entries at once
//! ([`updates_for`]). Besides, it reads both conntrack tables every `sync` period (two
//! heartbeats) and sends what changed since it last sent (removals, and what a full ring lost),
//! and everything every `refresh` period: that copy keeps long flows fresh on the peers without
//! per-packet traffic, and brings a peer that joins or returns up to date. Updates travel as
//! authenticated messages of the group's channel (`node::channel`), at most [`MAX_PAYLOAD`]
//! bytes each.
//!
//! Inserted flows bypass the allowlist and the security groups, so a standby checks every one
//! against its own current model before it writes it: the link exists and is Available, the key's
//! network, the endpoint address, the backend (one of the service's) and the NAT address (in this
//! node's NAT range of the provider network: the nodes of a group share it) all agree with the
//! link. What depends on the node is rewritten: a
//! reply entry leaves through this node's interface of the consumer network, with its MAC; a
//! forward entry resolves its next hop again; both are as fresh as the moment they arrive.
use std::{collections::HashMap, net::IpAddr};

use privatelink_common::{
    DIR_FORWARD, DIR_REPLY, Flow, Flow4, Flow6, FlowKey, FlowKey4, FlowKey6, In6,
};

use crate::datapath::{FlowEventKey, FlowTables, LinkState, Model, Role, compile::WireAddr};

/// Largest payload of one message (it fits an Ethernet frame with the channel's header).
pub const MAX_PAYLOAD: usize = 1200;

const UPSERT4: u8 = 1;
const UPSERT6: u8 = 2;
const DELETE4: u8 = 3;
const DELETE6: u8 = 4;

/// One change of a conntrack table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    Upsert4(FlowKey4, Flow4),
    Upsert6(FlowKey6, Flow6),
    Delete4(FlowKey4),
    Delete6(FlowKey6),
}

impl Update {
    /// The link of an upserted entry (`None` for a removal: it names a key only).
    pub fn link(&self) -> Option<u32> {
        match self {
            Update::Upsert4(_, f) => Some(f.link_id),
            Update::Upsert6(_, f) => Some(f.link_id),
            Update::Delete4(_) | Update::Delete6(_) => None,
        }
    }

    fn op(&self) -> u8 {
        match self {
            Update::Upsert4(..) => UPSERT4,
            Update::Upsert6(..) => UPSERT6,
            Update::Delete4(_) => DELETE4,
            Update::Delete6(_) => DELETE6,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        use bytemuck::bytes_of;
        match self {
            Update::Upsert4(k, f) => out.extend(bytes_of(k).iter().chain(bytes_of(f))),
            Update::Upsert6(k, f) => out.extend(bytes_of(k).iter().chain(bytes_of(f))),
            Update::Delete4(k) => out.extend(bytes_of(k)),
            Update::Delete6(k) => out.extend(bytes_of(k)),
        }
    }
}

fn entry_len(op: u8) -> Option<usize> {
    use std::mem::size_of;
    Some(match op {
        UPSERT4 => size_of::<FlowKey4>() + size_of::<Flow4>(),
        UPSERT6 => size_of::<FlowKey6>() + size_of::<Flow6>(),
        DELETE4 => size_of::<FlowKey4>(),
        DELETE6 => size_of::<FlowKey6>(),
        _ => return None,
    })
}

/// The payloads that carry `updates`: one kind of update each (`op | count u16 BE | entries`),
/// at most [`MAX_PAYLOAD`] bytes.
pub fn encode(updates: &[Update]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut current: Option<(u8, Vec<u8>, u16)> = None;
    for u in updates {
        let (op, len) = (u.op(), entry_len(u.op()).expect("a known op"));
        let full = current
            .as_ref()
            .is_some_and(|(o, b, _)| *o != op || b.len() + len > MAX_PAYLOAD);
        if full {
            out.extend(current.take().map(finish));
        }
        let (_, body, n) = current.get_or_insert_with(|| (op, Vec::new(), 0));
        u.write(body);
        *n += 1;
    }
    out.extend(current.map(finish));
    out
}

fn finish((op, body, n): (u8, Vec<u8>, u16)) -> Vec<u8> {
    let mut p = vec![op];
    p.extend(n.to_be_bytes());
    p.extend(body);
    p
}

/// The updates of one payload; `None` when it is not one (a wrong op, count or length).
pub fn decode(p: &[u8]) -> Option<Vec<Update>> {
    let (&op, rest) = p.split_first()?;
    let len = entry_len(op)?;
    let n = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let body = &rest[2..];
    if body.len() != n * len {
        return None;
    }
    let k4 = std::mem::size_of::<FlowKey4>();
    let k6 = std::mem::size_of::<FlowKey6>();
    let read = |b: &[u8]| -> Update {
        use bytemuck::pod_read_unaligned as r;
        match op {
            UPSERT4 => Update::Upsert4(r(&b[..k4]), r(&b[k4..])),
            UPSERT6 => Update::Upsert6(r(&b[..k6]), r(&b[k6..])),
            DELETE4 => Update::Delete4(r(b)),
            _ => Update::Delete6(r(b)),
        }
    };
    Some(body.chunks_exact(len).map(read).collect())
}

/// What the active node sent last, to send only what changed.
#[derive(Debug, Default)]
pub struct Outbox {
    sent4: HashMap<FlowKey4, u8>,
    sent6: HashMap<FlowKey6, u8>,
    /// Entries the datapath's events sent since the last diff: a table read may be older than
    /// them (it runs beside the events), so the next diff leaves them alone.
    fresh4: std::collections::HashSet<FlowKey4>,
    fresh6: std::collections::HashSet<FlowKey6>,
    /// Diffs made (and clears): a table read started before the last of them is stale.
    epoch: u64,
}

impl Outbox {
    /// The updates that bring a peer from what was sent to the tables as read now (`full`:
    /// every entry, whatever was sent), for the entries whose link `mine` says this node sends
    /// (the units it is active for). An entry that is still there but no longer this node's is
    /// forgotten, not removed on the peers: its unit went to another node, which carries it on.
    ///
    /// Entries the events sent since the last diff are left as they are (the read may predate
    /// them: sending its older state, or removing a flow it did not see yet, would undo them).
    pub fn changes(
        &mut self,
        now4: Vec<(FlowKey4, Flow4)>,
        now6: Vec<(FlowKey6, Flow6)>,
        full: bool,
        mine: impl Fn(u32) -> bool,
    ) -> Vec<Update> {
        let mut out = Vec::new();
        diff(
            (&mut self.sent4, &mut self.fresh4),
            now4,
            full,
            &mine,
            &mut out,
            Update::Upsert4,
            Update::Delete4,
        );
        diff(
            (&mut self.sent6, &mut self.fresh6),
            now6,
            full,
            &mine,
            &mut out,
            Update::Upsert6,
            Update::Delete6,
        );
        self.epoch += 1;
        out
    }

    /// Diffs and clears so far: a table read started at an earlier epoch is older than what
    /// was sent since, and must not be diffed.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records `updates` as sent (the datapath's events sent them ahead of the periodic read).
    pub fn note(&mut self, updates: &[Update]) {
        for u in updates {
            match u {
                Update::Upsert4(k, f) => {
                    self.sent4.insert(*k, f.tcp_state);
                    self.fresh4.insert(*k);
                }
                Update::Upsert6(k, f) => {
                    self.sent6.insert(*k, f.tcp_state);
                    self.fresh6.insert(*k);
                }
                Update::Delete4(k) => {
                    self.sent4.remove(k);
                }
                Update::Delete6(k) => {
                    self.sent6.remove(k);
                }
            }
        }
    }

    /// Forgets what was sent (the node stopped being active; the next changes are a full copy).
    pub fn clear(&mut self) {
        self.sent4.clear();
        self.sent6.clear();
        self.fresh4.clear();
        self.fresh6.clear();
        self.epoch += 1;
    }
}

fn diff<K: std::hash::Hash + Eq + Copy, V: Copy>(
    (sent, fresh): (&mut HashMap<K, u8>, &mut std::collections::HashSet<K>),
    now: Vec<(K, Flow<V>)>,
    full: bool,
    mine: &impl Fn(u32) -> bool,
    out: &mut Vec<Update>,
    upsert: fn(K, Flow<V>) -> Update,
    delete: fn(K) -> Update,
) {
    let mut next = HashMap::with_capacity(now.len());
    let mut present = std::collections::HashSet::with_capacity(now.len());
    for (k, f) in now {
        present.insert(k);
        if !mine(f.link_id) || fresh.contains(&k) {
            continue;
        }
        if full || sent.get(&k) != Some(&f.tcp_state) {
            out.push(upsert(k, f));
        }
        next.insert(k, f.tcp_state);
    }
    out.extend(
        sent.keys()
            .filter(|k| !present.contains(*k) && !fresh.contains(*k))
            .map(|k| delete(*k)),
    );
    // What the events sent stays as they sent it, for the next diff to compare.
    next.extend(
        fresh
            .drain()
            .filter_map(|k| sent.get(&k).map(|state| (k, *state))),
    );
    *sent = next;
}

/// Both entries of each flow the datapath's events name (an event names either of them), as the
/// tables hold them now: what a peer needs to carry the flow on. A flow gone since is left out
/// (the periodic sync sends its removal).
pub fn updates_for(tables: &FlowTables, events: &[FlowEventKey]) -> Vec<Update> {
    fn both<A: Copy>(
        key: FlowKey<A>,
        get: impl Fn(&FlowKey<A>) -> Option<Flow<A>>,
        upsert: fn(FlowKey<A>, Flow<A>) -> Update,
        out: &mut Vec<Update>,
    ) {
        let Some(f) = get(&key) else { return };
        let twin = f.twin_key(key.proto);
        out.push(upsert(key, f));
        out.extend(get(&twin).map(|t| upsert(twin, t)));
    }
    let mut out = Vec::with_capacity(events.len() * 2);
    for e in events {
        match *e {
            FlowEventKey::V4(k) => both(k, |k| tables.get4(k), Update::Upsert4, &mut out),
            FlowEventKey::V6(k) => both(k, |k| tables.get6(k), Update::Upsert6, &mut out),
        }
    }
    out
}

/// Why a received flow was not installed (the metrics' `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refuse {
    /// No such link in this node's state, or it is not Available.
    Link,
    /// The key's network, the endpoint address or the twin's network disagree with the link.
    Endpoint,
    /// The backend is not one of the link's service's.
    Backend,
    /// The NAT address is outside this node's NAT range of the provider network.
    Nat,
    /// Neither a forward nor a reply entry, or a consumer network this node has no interface of.
    Entry,
}

impl Refuse {
    pub const ALL: [Refuse; 5] = [
        Refuse::Link,
        Refuse::Endpoint,
        Refuse::Backend,
        Refuse::Nat,
        Refuse::Entry,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refuse::Link => "link",
            Refuse::Endpoint => "endpoint",
            Refuse::Backend => "backend",
            Refuse::Nat => "nat",
            Refuse::Entry => "entry",
        }
    }
}

/// An address family of the tables, as the checks need it.
pub trait Family: WireAddr {
    fn endpoint(link: &crate::datapath::Link) -> Option<IpAddr>;
}

impl Family for u32 {
    fn endpoint(link: &crate::datapath::Link) -> Option<IpAddr> {
        link.ip4.map(Into::into)
    }
}

impl Family for In6 {
    fn endpoint(link: &crate::datapath::Link) -> Option<IpAddr> {
        link.ip6.map(Into::into)
    }
}

/// The entry this node installs for a received one, or why it does not: checked against `m` (the
/// node's full model, consumer interfaces and NAT ranges included), its node-local parts
/// rewritten, fresh as of `now_ns`.
pub fn admit<A: Family>(
    m: &Model,
    key: &FlowKey<A>,
    flow: &Flow<A>,
    now_ns: u64,
) -> Result<Flow<A>, Refuse> {
    let link = m
        .links
        .get(&flow.link_id)
        .filter(|l| l.state == LinkState::Available)
        .ok_or(Refuse::Link)?;
    let svc = m.services.get(&link.service_slot).ok_or(Refuse::Link)?;
    let endpoint = A::endpoint(link).ok_or(Refuse::Endpoint)?;
    // (consumer network, endpoint, backend, NAT address) as the entry has them.
    let (consumer_net, ep, backend, nat, provider_net) = match flow.dir {
        DIR_FORWARD => (
            key.network_id,
            key.daddr_be.ip(),
            flow.daddr_be.ip(),
            flow.saddr_be.ip(),
            flow.peer_network,
        ),
        DIR_REPLY => (
            flow.peer_network,
            flow.saddr_be.ip(),
            key.saddr_be.ip(),
            key.daddr_be.ip(),
            key.network_id,
        ),
        _ => return Err(Refuse::Entry),
    };
    if consumer_net != link.network_id || ep != endpoint || provider_net != svc.provider_network {
        return Err(Refuse::Endpoint);
    }
    if !svc.backends.contains(&backend) {
        return Err(Refuse::Backend);
    }
    // In the range the link's new flows take their addresses from (its network's slice in a
    // group that spreads networks).
    let in_range = m.nat.get(&link.nat_slot).is_some_and(|r| match nat {
        IpAddr::V4(a) => r.addrs.contains(&a),
        IpAddr::V6(a) => r.addrs6.is_some_and(|n| n.contains(&a)),
    });
    if !in_range {
        return Err(Refuse::Nat);
    }
    let mut f = *flow;
    f.last_seen_ns = now_ns;
    if flow.dir == DIR_REPLY {
        let iface = m
            .ifaces
            .iter()
            .filter(|i| i.role == Role::Consumer && i.network_id == consumer_net)
            .min_by_key(|i| i.vlan_id != flow.vlan_id)
            .ok_or(Refuse::Entry)?;
        f.egress_ifindex = iface.ifindex;
        f.src_mac = iface.mac;
        f.vlan_id = iface.vlan_id;
    } else {
        f.egress_ifindex = 0;
        f.nh_generation = 0;
        f.src_mac = [0; 6];
        f.dst_mac = [0; 6];
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use privatelink_common::{CT_ESTABLISHED, CT_SYN_RECV, PROTO_TCP};

    use super::*;
    use crate::datapath::Iface;

    const CONSUMER_NET: u32 = 1;
    const ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
    const NAT: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 7);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
    const MAC: [u8; 6] = [2, 0, 0, 0, 0xb, 1];

    fn be(a: Ipv4Addr) -> u32 {
        u32::from(a).to_be()
    }

    fn model() -> Model {
        let mut m = crate::testkit::demo::service_model(
            vec![Iface {
                ifindex: 7,
                vlan_id: 0,
                network_id: CONSUMER_NET,
                role: Role::Consumer,
                mac: MAC,
            }],
            BTreeMap::from([(1, crate::testkit::demo::endpoint_link(CONSUMER_NET, 9))]),
        );
        m.links.get_mut(&1).unwrap().ip4 = Some(ENDPOINT);
        m
    }

    /// A flow's two entries as the active node has them.
    fn flow() -> [(FlowKey4, Flow4); 2] {
        let prov = crate::testkit::demo::PROVIDER_NET;
        let fwd = Flow4 {
            last_seen_ns: 5,
            saddr_be: be(NAT),
            daddr_be: be(BACKEND),
            sport_be: 40000u16.to_be(),
            dport_be: 8080u16.to_be(),
            link_id: 1,
            peer_network: prov,
            egress_ifindex: 3,
            src_mac: [9; 6],
            dst_mac: [8; 6],
            dir: DIR_FORWARD,
            tcp_state: CT_ESTABLISHED,
            nh_generation: 4,
            ..Default::default()
        };
        let reply = Flow4 {
            saddr_be: be(ENDPOINT),
            daddr_be: be(CLIENT),
            sport_be: 80u16.to_be(),
            dport_be: 40000u16.to_be(),
            peer_network: CONSUMER_NET,
            egress_ifindex: 3,
            src_mac: [9; 6],
            dst_mac: [6; 6],
            dir: DIR_REPLY,
            ..fwd
        };
        [
            (
                FlowKey4::new(
                    CONSUMER_NET,
                    be(CLIENT),
                    be(ENDPOINT),
                    40000u16.to_be(),
                    80u16.to_be(),
                    PROTO_TCP,
                ),
                fwd,
            ),
            (
                FlowKey4::new(
                    prov,
                    be(BACKEND),
                    be(NAT),
                    8080u16.to_be(),
                    40000u16.to_be(),
                    PROTO_TCP,
                ),
                reply,
            ),
        ]
    }

    #[test]
    fn updates_round_trip_in_payloads_of_bounded_size() {
        let [(k, f), (k2, f2)] = flow();
        let mut updates: Vec<Update> = (0..40).map(|_| Update::Upsert4(k, f)).collect();
        updates.push(Update::Delete4(k2));
        updates.push(Update::Upsert4(k2, f2));
        let payloads = encode(&updates);
        assert!(payloads.iter().all(|p| p.len() <= MAX_PAYLOAD + 3));
        assert_eq!(
            payloads.len(),
            5,
            "40 upserts in three, a delete, an upsert"
        );
        let back: Vec<Update> = payloads.iter().flat_map(|p| decode(p).unwrap()).collect();
        assert_eq!(back, updates);
        // Lengths that do not add up, unknown ops and empty payloads are not updates.
        let p = &payloads[0];
        for bad in [&p[..p.len() - 1], &[9, 0, 0][..], &[][..], &p[..2]] {
            assert_eq!(decode(bad), None);
        }
    }

    #[test]
    fn the_outbox_sends_new_and_changed_entries_and_removals_and_everything_on_a_refresh() {
        let [(k, f), (k2, f2)] = flow();
        let mut o = Outbox::default();
        assert_eq!(
            o.changes(vec![(k, f)], vec![], false, |_| true),
            [Update::Upsert4(k, f)]
        );
        assert_eq!(o.changes(vec![(k, f)], vec![], false, |_| true), []);
        let closing = Flow4 {
            tcp_state: CT_SYN_RECV,
            ..f
        };
        assert_eq!(
            o.changes(vec![(k, closing), (k2, f2)], vec![], false, |_| true)
                .len(),
            2
        );
        assert_eq!(
            o.changes(vec![(k2, f2)], vec![], false, |_| true),
            [Update::Delete4(k)]
        );
        assert_eq!(
            o.changes(vec![(k2, f2)], vec![], true, |_| true),
            [Update::Upsert4(k2, f2)]
        );
    }

    #[test]
    fn the_outbox_sends_only_the_flows_of_the_networks_this_node_is_active_for() {
        let [(k, f), (k2, f2)] = flow();
        let (f, f2) = (Flow4 { link_id: 1, ..f }, Flow4 { link_id: 2, ..f2 });
        let mut o = Outbox::default();
        // Link 2's network is another node's: its entry (installed from that node) is not sent.
        let only_1 = |l: u32| l == 1;
        assert_eq!(
            o.changes(vec![(k, f), (k2, f2)], vec![], true, only_1),
            [Update::Upsert4(k, f)]
        );
        // Link 1's network handed over: its entry, still in the table, is forgotten, not removed
        // on the peers (the new owner carries it on)...
        assert_eq!(
            o.changes(vec![(k, f), (k2, f2)], vec![], false, |_| false),
            []
        );
        // ...and taken back, it is sent again; once gone from the table, its removal goes out.
        assert_eq!(
            o.changes(vec![(k, f)], vec![], false, only_1),
            [Update::Upsert4(k, f)]
        );
        assert_eq!(
            o.changes(vec![], vec![], false, only_1),
            [Update::Delete4(k)]
        );
    }

    #[test]
    fn flows_the_events_sent_are_not_sent_again_by_the_next_read_unless_they_change() {
        let [(k, f), (k2, f2)] = flow();
        let mut o = Outbox::default();
        o.note(&[Update::Upsert4(k, f), Update::Upsert4(k2, f2)]);
        assert_eq!(
            o.changes(vec![(k, f), (k2, f2)], vec![], false, |_| true),
            []
        );
        let closing = Flow4 {
            tcp_state: privatelink_common::CT_CLOSING,
            ..f
        };
        assert_eq!(
            o.changes(vec![(k, closing), (k2, f2)], vec![], false, |_| true),
            [Update::Upsert4(k, closing)]
        );
        // A flow noted and gone by the next read: that read may be older than the event (reads
        // run beside the events), so the flow stays; the read after removes it on the peers.
        o.note(&[Update::Upsert4(k2, f2)]);
        assert_eq!(o.changes(vec![(k, closing)], vec![], false, |_| true), []);
        assert_eq!(
            o.changes(vec![(k, closing)], vec![], false, |_| true),
            [Update::Delete4(k2)]
        );
        // A read older than an event does not send the older state back.
        let established = Flow4 {
            tcp_state: privatelink_common::CT_ESTABLISHED,
            ..f
        };
        o.note(&[Update::Upsert4(k, established)]);
        assert_eq!(o.changes(vec![(k, f)], vec![], true, |_| true), []);
        assert_eq!(
            o.changes(vec![(k, established)], vec![], false, |_| true),
            []
        );
    }

    #[test]
    fn a_received_flow_is_checked_against_the_state_and_made_this_nodes() {
        let m = model();
        let [(k, f), (k2, f2)] = flow();
        let fwd = admit(&m, &k, &f, 99).unwrap();
        assert_eq!(
            (fwd.egress_ifindex, fwd.nh_generation, fwd.last_seen_ns),
            (0, 0, 99)
        );
        assert_eq!(
            (fwd.saddr_be, fwd.sport_be),
            (f.saddr_be, f.sport_be),
            "same NAT address and port"
        );
        let reply = admit(&m, &k2, &f2, 99).unwrap();
        assert_eq!(
            (reply.egress_ifindex, reply.src_mac, reply.dst_mac),
            (7, MAC, [6; 6])
        );
        // A PROXY flow keeps its header's length on the node that takes it over (its sequence
        // numbers stay moved), and its pending flag: the datapath there, which has no pending
        // state for it, takes the header as delivered.
        for (key, flow) in [(k, f), (k2, f2)] {
            let proxied = Flow4 {
                proxy_len: 120,
                flags: privatelink_common::PROXY_PENDING,
                ..flow
            };
            let taken = admit(&m, &key, &proxied, 99).unwrap();
            assert_eq!((taken.proxy_len, taken.flags), (120, 1));
        }

        let mut rejected = m.clone();
        rejected.links.get_mut(&1).unwrap().state = LinkState::Rejected;
        let other_net = FlowKey4 { network_id: 2, ..k };
        let other_ep = FlowKey4 {
            daddr_be: be(Ipv4Addr::new(198, 18, 0, 101)),
            ..k
        };
        let cases: [(&Model, &FlowKey4, Flow4, Refuse); 7] = [
            (&rejected, &k, f, Refuse::Link),
            (&m, &k, Flow4 { link_id: 5, ..f }, Refuse::Link),
            (&m, &other_net, f, Refuse::Endpoint),
            (&m, &other_ep, f, Refuse::Endpoint),
            (
                &m,
                &k,
                Flow4 {
                    daddr_be: be(Ipv4Addr::new(198, 18, 100, 66)),
                    ..f
                },
                Refuse::Backend,
            ),
            (
                &m,
                &k,
                Flow4 {
                    saddr_be: be(Ipv4Addr::new(198, 18, 100, 1)),
                    ..f
                },
                Refuse::Nat,
            ),
            (&m, &k, Flow4 { dir: 7, ..f }, Refuse::Entry),
        ];
        for (model, key, flow, want) in cases {
            assert_eq!(admit(model, key, &flow, 1), Err(want), "{flow:?}");
        }
    }
}
