//! One packet, start to finish: classify, look up, admit or drop, translate, send; count the outcome.

use aya_ebpf::programs::XdpContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use privatelink_common::{
    DIR_FORWARD, DIR_REPLY, DROP_LINK_INACTIVE, DROP_NO_FLOW, DROP_NO_PORT, DROP_TCP_NOT_SYN,
    DROP_TRUNCATED, DROP_TTL_EXPIRED, DatapathConfig, EndpointValue, FLOW_LOGGED, FWD_REDIRECT,
    FWD_TX, Flow, FlowKey, IfaceInfo, IfaceKey, In6, LinkInfo, PASS_MALFORMED, PASS_NOT_ENDPOINT,
    PASS_NOT_IP, PASS_UNKNOWN_IFACE, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, ROLE_CONSUMER, is_drop,
};

use crate::{
    HANDOFF6, IFACE_INDEX, IFACES, JUMP, LINKS, SCRATCH6, arp, connlog, conntrack,
    family::Family,
    flowcache, flowsync,
    forward::{self, How},
    icmp, icmp6,
    nat::{self, Backend, NewFlow, Origin},
    parse::{
        self, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Hdr4, Hdr6, Ip6, L2, Pkt, TCP_ACK, TCP_RST, TCP_SYN,
        ptr_at,
    },
    policy, proxy, stats,
    verdict::Verdict,
};

#[inline(always)]
pub fn process(ctx: &XdpContext) -> u32 {
    let v = classify(ctx);
    stats::outcome(v.outcome);
    v.action
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Verdict {
    let Some(l2) = parse::l2(ctx) else {
        return Verdict::pass(PASS_MALFORMED);
    };
    let Some(iface) = receiving_iface(l2.ingress, l2.vlan_id) else {
        return Verdict::pass(PASS_UNKNOWN_IFACE);
    };
    match l2.ether_type {
        ETH_P_IP => ipv4(ctx, &l2, &iface),
        ETH_P_IPV6 => {
            // The interface goes along through per-CPU memory (a tail call keeps no state; the
            // callee would otherwise look it up again). Same CPU, nothing runs in between.
            if let Some(slot) = HANDOFF6.get_ptr_mut(0) {
                // SAFETY: per-CPU value, no concurrent user.
                unsafe { *slot = iface };
                // SAFETY: ctx is the program's context; returns only when the call failed.
                unsafe { JUMP.tail_call(ctx, 0) };
            }
            // No IPv6 program installed: the frame passes untouched, as before IPv6 support.
            Verdict::pass(PASS_NOT_IP)
        }
        ETH_P_ARP if iface.role == ROLE_CONSUMER => arp::respond(ctx, &l2, &iface),
        ETH_P_ARP => Verdict::pass(PASS_NOT_ENDPOINT),
        _ => Verdict::pass(PASS_NOT_IP),
    }
}

/// The interface (and VLAN) a frame arrived on: untagged ones from the ifindex array, the rest
/// (and ifindexes beyond it) from the hash.
#[inline(always)]
pub fn receiving_iface(ifindex: u32, vlan_id: u16) -> Option<IfaceInfo> {
    if vlan_id == 0
        && let Some(i) = IFACE_INDEX.get(ifindex)
        && i.role != 0
    {
        return Some(*i);
    }
    let key = IfaceKey {
        ifindex,
        vlan_id,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    (unsafe { IFACES.get(key) }).copied()
}

/// The IPv6 program: parses layer 2 again (offsets do not survive a tail call), takes the
/// receiving interface from the caller's hand-off and takes the IPv6 path.
#[inline(always)]
pub fn process6(ctx: &XdpContext) -> u32 {
    // SAFETY: copied out at once; written by `classify` on this CPU just before the tail call.
    let iface = HANDOFF6.get(0).copied();
    let v = match (parse::l2(ctx), iface) {
        (None, _) => Verdict::pass(PASS_MALFORMED),
        (Some(l2), Some(iface)) if l2.ether_type == ETH_P_IPV6 => ipv6(ctx, &l2, &iface),
        (Some(_), Some(_)) => Verdict::pass(PASS_NOT_IP),
        (Some(_), None) => Verdict::pass(PASS_UNKNOWN_IFACE),
    };
    stats::outcome(v.outcome);
    v.action
}

/// A frame being handled: the program's context, its layer 2, and the interface it came in on.
pub struct Frame<'a> {
    pub ctx: &'a XdpContext,
    pub l2: &'a L2,
    pub iface: &'a IfaceInfo,
    /// Received on a consumer-facing interface (else provider-facing).
    pub consumer: bool,
}

/// A TCP or UDP packet of a frame, with the clock and configuration it is judged by.
pub struct Packet<'a, A> {
    pub frame: &'a Frame<'a>,
    pub p: &'a Pkt<A>,
    pub now: u64,
    pub cfg: &'a DatapathConfig,
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l2: &L2, iface: &IfaceInfo) -> Verdict {
    // Only the fixed header is needed to tell whether the packet is ours; others pass untouched.
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l2.l3_off) else {
        return Verdict::pass(PASS_MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    let daddr_be = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
    let f = Frame {
        ctx,
        l2,
        iface,
        consumer: iface.role == ROLE_CONSUMER,
    };
    // Provider side: the NAT range check is an array read, so it goes first. Consumer side: the
    // endpoint-address check is a hash lookup, so it waits until conntrack has missed (a flow
    // entry's tuple already names an endpoint address).
    if !f.consumer && !u32::is_nat(iface.network_id, daddr_be) {
        return Verdict::pass(PASS_NOT_ENDPOINT);
    }
    match parse::ip4(ctx, l2.l3_off) {
        Ok(Some(p)) => tracked(&f, &p),
        Ok(None) => match parse::ip4_hdr(ctx, l2.l3_off) {
            Ok(h) => not_tcp_udp4(&f, &h, daddr_be),
            Err(_) => Verdict::drop(DROP_TRUNCATED),
        },
        Err(reason) => ours_or_pass(&f, daddr_be, reason),
    }
}

/// The IPv6 twin of [`ipv4`]: the same checks in the same order, with the extension headers
/// walked by the parser.
#[inline(always)]
fn ipv6(ctx: &XdpContext, l2: &L2, iface: &IfaceInfo) -> Verdict {
    let Some(ip) = parse::ip6_fixed(ctx, l2.l3_off) else {
        return Verdict::pass(PASS_MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    let daddr_be = parse::in6(unsafe { &(*ip).dst });
    let f = Frame {
        ctx,
        l2,
        iface,
        consumer: iface.role == ROLE_CONSUMER,
    };
    if !f.consumer && !In6::is_nat(iface.network_id, daddr_be) {
        return Verdict::pass(PASS_NOT_ENDPOINT);
    }
    let Some(slot) = SCRATCH6.get_ptr_mut(0) else {
        return Verdict::pass(PASS_MALFORMED);
    };
    // SAFETY: per-CPU value, no concurrent user.
    let p = unsafe { &mut *slot };
    match parse::ip6(ctx, l2.l3_off, p) {
        Ok(None) => tracked(&f, p),
        Ok(Some(h)) => not_tcp_udp6(&f, &h, p),
        Err(reason) => ours_or_pass(&f, daddr_be, reason),
    }
}

/// The conntrack key of a packet received on `iface`: its tuple in the interface's network.
#[inline(always)]
pub fn flow_key<A: Family>(iface: &IfaceInfo, p: &Pkt<A>) -> FlowKey<A> {
    FlowKey::new(
        iface.network_id,
        p.saddr_be,
        p.daddr_be,
        p.sport_be,
        p.dport_be,
        p.proto,
    )
}

/// A TCP or UDP packet to an endpoint (consumer side) or a NAT address (provider side): its flow,
/// or a new one.
#[inline(always)]
fn tracked<A: Family>(f: &Frame, p: &Pkt<A>) -> Verdict {
    let key = flow_key(f.iface, p);
    let cfg = conntrack::config();
    let pk = Packet {
        frame: f,
        p,
        now: conntrack::now(),
        cfg: &cfg,
    };
    if let Some(e) = flowcache::get(&key, p, pk.now, &cfg) {
        return established(&pk, &e.flow, None);
    }
    if let Some(entry) = conntrack::lookup(&key, pk.now, &cfg) {
        // Copied so the rewrite uses one consistent view.
        let flow = A::snapshot(entry);
        let v = established(&pk, flow, Some(entry));
        if v.outcome == FWD_REDIRECT || v.outcome == FWD_TX {
            flowcache::fill(&key, entry, cfg.flow_generation);
        } else {
            flowcache::retire(&key);
        }
        return v;
    }
    if !f.consumer {
        return Verdict::drop(DROP_NO_FLOW);
    }
    if !is_endpoint(f.iface, p.daddr_be) {
        return Verdict::pass(PASS_NOT_ENDPOINT);
    }
    new_flow(&pk, &key)
}

/// Valid IPv4, neither TCP nor UDP. ICMP errors to a NAT address are translated back to the
/// consumer when they quote a tracked flow; an echo request to an endpoint is dropped with its own
/// reason; anything else addressed to us is dropped (an endpoint answers only its ports, a NAT
/// address has no such flow), and the rest passes.
#[inline(always)]
fn not_tcp_udp4(f: &Frame, h: &Hdr4, daddr_be: u32) -> Verdict {
    if h.proto == PROTO_ICMP {
        if !f.consumer {
            return icmp::from_provider(f.ctx, f.l2, f.iface, h);
        }
        if let Some(ep) = u32::endpoint_ip(f.iface.network_id, daddr_be) {
            return icmp::to_endpoint(f.ctx, f.l2, f.iface, &ep, h);
        }
    }
    ours_or_pass(f, daddr_be, unanswered(f))
}

/// Valid IPv6, neither TCP nor UDP, shaped as [`not_tcp_udp4`]. On consumer interfaces, neighbour
/// solicitations for endpoint addresses are answered too. Anything else addressed to us is
/// dropped, and the rest (router and neighbour discovery of the node itself, ...) passes.
#[inline(always)]
fn not_tcp_udp6(f: &Frame, h: &Hdr6, p: &Ip6) -> Verdict {
    if h.proto == PROTO_ICMPV6 {
        // One call site for both directions' error translation (it is the IPv6 program's largest
        // piece of stack): to a NAT address about a reply entry's tuple, or from a consumer to an
        // endpoint address about a forward entry's.
        let ep = if f.consumer {
            In6::endpoint_ip(f.iface.network_id, p.daddr_be)
        } else {
            None
        };
        let dir = match (f.consumer, &ep) {
            (false, _) => Some(DIR_REPLY),
            (true, Some(_)) if icmp6::is_error(f.ctx, h) => Some(DIR_FORWARD),
            _ => None,
        };
        if let Some(dir) = dir {
            return icmp6::error(f.ctx, f.l2, f.iface, h, p, dir);
        }
        if f.consumer
            && let Some(v) = icmp6::neighbour_solicitation(f.ctx, f.l2, f.iface, h, p)
        {
            return v;
        }
        if let Some(ep) = ep {
            return icmp6::to_endpoint(f.ctx, f.l2, &ep, h, p);
        }
    }
    ours_or_pass(f, p.daddr_be, unanswered(f))
}

/// Why a packet addressed to us that no path takes is dropped: an endpoint answers only its
/// ports, a NAT address only its flows.
#[inline(always)]
fn unanswered(f: &Frame) -> u32 {
    if f.consumer {
        DROP_NO_PORT
    } else {
        DROP_NO_FLOW
    }
}

/// Whether `daddr_be` is an endpoint address in the consumer network of `iface`.
#[inline(always)]
fn is_endpoint<A: Family>(iface: &IfaceInfo, daddr_be: A) -> bool {
    A::endpoint_ip(iface.network_id, daddr_be).is_some()
}

/// A packet the datapath cannot handle: dropped with `reason` if it is addressed to us (the
/// provider side has checked its NAT range already), else passed untouched.
#[inline(always)]
fn ours_or_pass<A: Family>(f: &Frame, daddr_be: A, reason: u32) -> Verdict {
    if f.consumer && !is_endpoint(f.iface, daddr_be) {
        return Verdict::pass(PASS_NOT_ENDPOINT);
    }
    Verdict::drop(reason)
}

/// A packet of a tracked flow: policy is skipped, the link is re-checked (reject, allowlist
/// removal and deletion cut live flows). `entry`: the conntrack entry `flow` was copied from, to
/// refresh; `None` when `flow` is this CPU's flow-cache copy, which stands in only where the
/// refresh would write nothing. A flow with a PROXY header has its sequence numbers moved (and the
/// header put in front when it is due) before the translation.
#[inline(always)]
fn established<A: Family>(pk: &Packet<A>, flow: &Flow<A>, entry: Option<*mut Flow<A>>) -> Verdict {
    let (ctx, p) = (pk.frame.ctx, pk.p);
    let Some(link) = LINKS.get(flow.link_id) else {
        return Verdict::drop(DROP_LINK_INACTIVE);
    };
    let v = if let Err(reason) = policy::link_usable(link) {
        Verdict::drop(reason)
    } else if p.ttl <= 1 {
        Verdict::drop(DROP_TTL_EXPIRED)
    } else {
        if let Some(e) = entry {
            conntrack::update(e, p, pk.now);
        }
        let proxied = match (flow.proxy_len, flow.dir) {
            (0, _) => Ok(0),
            (_, DIR_FORWARD) => proxy::outbound(ctx, pk.frame.iface.network_id, p, flow, entry),
            _ => proxy::inbound(ctx, p, flow, entry),
        };
        match proxied {
            Ok(stream_move) => forward::send(
                ctx,
                pk.frame.l2,
                p,
                flow,
                entry,
                &How {
                    fib_gen: pk.cfg.fib_generation,
                    learn: None,
                    stream_move,
                },
            ),
            Err(reason) => Verdict::drop(reason),
        }
    };
    // The frame as it leaves (a PROXY header or a VLAN tag changes its length), counted alike by
    // the link and by a logged flow.
    let bytes = frame_len(ctx);
    if flow.flags & FLOW_LOGGED != 0 && !is_drop(v.outcome) {
        connlog::count(pk.frame.iface.network_id, p, flow, bytes);
    }
    stats::link_packet(
        flow.link_id,
        flow.dir,
        bytes,
        p.tcp_flags & TCP_RST != 0,
        &v,
    );
    v
}

/// A packet without state towards an endpoint: admit, pick a backend, allocate NAT, create state.
#[inline(always)]
fn new_flow<A: Family>(pk: &Packet<A>, key: &FlowKey<A>) -> Verdict {
    let p = pk.p;
    let Some(ep) = A::endpoint(key.network_id, p.daddr_be, p.dport_be, p.proto) else {
        return Verdict::drop(DROP_NO_PORT);
    };
    let Some(link) = LINKS.get(ep.link_id).copied() else {
        return Verdict::drop(DROP_LINK_INACTIVE);
    };
    let (v, made) = match admit_and_create(pk, key, &link, &ep) {
        Ok((slot, flow)) => {
            stats::link_new_conn(ep.link_id);
            flowsync::emit(key);
            let v = forward::send(
                pk.frame.ctx,
                pk.frame.l2,
                p,
                flow,
                None,
                &How {
                    fib_gen: pk.cfg.fib_generation,
                    learn: Some((slot, pk.now)),
                    stream_move: 0,
                },
            );
            (v, Some(flow))
        }
        Err(reason) => (Verdict::drop(reason), None),
    };
    // Counted as `established` counts: the frame as it leaves, if it does.
    let bytes = frame_len(pk.frame.ctx);
    if let Some(flow) = made
        && link.conn_log != 0
    {
        connlog::open(key, p, flow, pk.now, (!is_drop(v.outcome)).then_some(bytes));
    }
    stats::link_packet(
        ep.link_id,
        DIR_FORWARD,
        bytes,
        p.tcp_flags & TCP_RST != 0,
        &v,
    );
    v
}

/// Admission (link, allowlist, TCP SYN, security groups, TTL, the link's flow limit), then the backend, its cached next
/// hop and the flow's entries. Returns the backend slot and the forward entry.
#[inline(always)]
fn admit_and_create<A: Family>(
    pk: &Packet<A>,
    key: &FlowKey<A>,
    link: &LinkInfo,
    ep: &EndpointValue,
) -> Result<(u32, &'static Flow<A>), u32> {
    let p = pk.p;
    policy::link_usable(link)?;
    policy::allowlisted(link)?;
    if p.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return Err(DROP_TCP_NOT_SYN);
    }
    A::security_groups(link, p.saddr_be, u16::from_be(p.dport_be), p.proto)?;
    if p.ttl <= 1 {
        return Err(DROP_TTL_EXPIRED);
    }
    policy::under_flow_limit(link, ep.link_id)?;
    let proxy_len = proxy::open(pk.frame.ctx, key, p, link)?;
    let hash = nat::flow_hash(key);
    let (slot, addr_be) = nat::pick_backend::<A>(link.service_slot, hash)?;
    let eth = ptr_at::<EthHdr>(pk.frame.ctx, 0).ok_or(PASS_MALFORMED)?;
    // SAFETY: bounds checked by ptr_at.
    let (node_mac, peer_mac) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    let request = NewFlow {
        key,
        p,
        link,
        link_id: ep.link_id,
        service_port_be: ep.service_port_be,
        proxy_len,
        logged: link.conn_log != 0,
        hash,
        now: pk.now,
        cfg: pk.cfg,
    };
    let backend = Backend {
        addr_be,
        // The backend's next hop, when a recent flow to it resolved one: no FIB lookup here.
        nh: forward::cached_nexthop::<A>(slot, pk.now, pk.cfg.fib_generation),
        origin: Origin {
            ifindex: pk.frame.l2.ingress,
            vlan_id: pk.frame.l2.vlan_id,
            node_mac,
            peer_mac,
        },
    };
    let flow = nat::create_flow(&request, &backend)?;
    policy::count_opened(link, ep.link_id);
    Ok((slot, flow))
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}
