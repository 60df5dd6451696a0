//! One packet, start to finish: classify, look up, admit or drop, translate, send; count the outcome.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use privatelink_common::{
    DIR_FORWARD, DROP_LINK_INACTIVE, DROP_NO_FLOW, DROP_NO_PORT, DROP_TCP_NOT_SYN, DROP_TRUNCATED,
    DROP_TTL_EXPIRED, DatapathConfig, EndpointIpKey4, EndpointKey4, Flow4, FlowKey4, IfaceInfo,
    IfaceKey, PASS_MALFORMED, PASS_NOT_ENDPOINT, PASS_NOT_IP, PASS_UNKNOWN_IFACE, PROTO_ICMP,
    PROTO_TCP, ROLE_CONSUMER,
};

use crate::{
    ENDPOINT_IPS4, ENDPOINTS4, IFACES, LINKS, arp, conntrack, forward, icmp,
    nat::{self, Origin},
    parse::{self, ETH_P_ARP, ETH_P_IP, Ip4, L2, TCP_ACK, TCP_RST, TCP_SYN, ptr_at},
    policy, stats,
};

/// What to do with the packet, and the outcome code it is counted under.
pub struct Verdict {
    pub action: u32,
    pub outcome: u32,
}

impl Verdict {
    #[inline(always)]
    pub fn drop(reason: u32) -> Self {
        Verdict {
            action: xdp_action::XDP_DROP,
            outcome: reason,
        }
    }

    #[inline(always)]
    pub fn pass(outcome: u32) -> Self {
        Verdict {
            action: xdp_action::XDP_PASS,
            outcome,
        }
    }
}

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
    let key = IfaceKey {
        ifindex: ctx.ingress_ifindex() as u32,
        vlan_id: l2.vlan_id,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(iface) = (unsafe { IFACES.get(key) }).copied() else {
        return Verdict::pass(PASS_UNKNOWN_IFACE);
    };
    match l2.ether_type {
        ETH_P_IP => ipv4(ctx, &l2, &iface),
        ETH_P_ARP if iface.role == ROLE_CONSUMER => arp::respond(ctx, &l2, &iface),
        ETH_P_ARP => Verdict::pass(PASS_NOT_ENDPOINT),
        _ => Verdict::pass(PASS_NOT_IP),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l2: &L2, iface: &IfaceInfo) -> Verdict {
    // Only the fixed header is needed to tell whether the packet is ours; others pass untouched.
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l2.l3_off) else {
        return Verdict::pass(PASS_MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    let daddr_be = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
    let consumer = iface.role == ROLE_CONSUMER;
    // Provider side: the NAT range check is an array read, so it goes first. Consumer side: the
    // endpoint-address check is a hash lookup, so it waits until conntrack has missed (a flow
    // entry's tuple already names an endpoint address).
    if !consumer && !nat::is_nat_addr(iface.network_id, daddr_be) {
        return Verdict::pass(PASS_NOT_ENDPOINT);
    }
    let p = match parse::ip4(ctx, l2.l3_off) {
        Ok(Some(p)) => p,
        Ok(None) => return not_tcp_udp(ctx, l2, iface, consumer, daddr_be),
        Err(reason) => return ours_or_pass(consumer, iface, daddr_be, reason),
    };
    let key = FlowKey4 {
        network_id: iface.network_id,
        saddr_be: p.saddr_be,
        daddr_be: p.daddr_be,
        sport_be: p.sport_be,
        dport_be: p.dport_be,
        proto: p.proto,
        _pad: [0; 3],
    };
    let now = conntrack::now();
    let cfg = conntrack::config();
    if let Some(flow) = conntrack::lookup(&key, now, &cfg) {
        return established(ctx, l2, &p, flow, now, cfg.fib_generation);
    }
    if !consumer {
        return Verdict::drop(DROP_NO_FLOW);
    }
    if !is_endpoint(iface, daddr_be) {
        return Verdict::pass(PASS_NOT_ENDPOINT);
    }
    new_flow(ctx, l2, &p, &key, now, &cfg)
}

/// Valid IPv4, neither TCP nor UDP. ICMP errors to a NAT address are translated back to the
/// consumer when they quote a tracked flow; an echo request to an endpoint is dropped with its own
/// reason; anything else addressed to us is dropped (an endpoint answers only its ports, a NAT
/// address has no such flow), and the rest passes.
#[inline(always)]
fn not_tcp_udp(
    ctx: &XdpContext,
    l2: &L2,
    iface: &IfaceInfo,
    consumer: bool,
    daddr_be: u32,
) -> Verdict {
    let Ok(h) = parse::ip4_hdr(ctx, l2.l3_off) else {
        return Verdict::drop(DROP_TRUNCATED);
    };
    if h.proto == PROTO_ICMP && !consumer {
        return icmp::from_provider(ctx, l2, iface, &h);
    }
    if h.proto == PROTO_ICMP && consumer {
        let key = EndpointIpKey4 {
            network_id: iface.network_id,
            addr_be: daddr_be,
        };
        // SAFETY: copied out at once.
        if let Some(ep) = (unsafe { ENDPOINT_IPS4.get(key) }).copied() {
            return icmp::to_endpoint(ctx, l2, &ep, &h);
        }
    }
    ours_or_pass(
        consumer,
        iface,
        daddr_be,
        if consumer { DROP_NO_PORT } else { DROP_NO_FLOW },
    )
}

/// Whether `daddr_be` is an endpoint address in the consumer network of `iface`.
#[inline(always)]
fn is_endpoint(iface: &IfaceInfo, daddr_be: u32) -> bool {
    let key = EndpointIpKey4 {
        network_id: iface.network_id,
        addr_be: daddr_be,
    };
    // SAFETY: the value is not read.
    unsafe { ENDPOINT_IPS4.get(key) }.is_some()
}

/// A packet the datapath cannot handle: dropped with `reason` if it is addressed to us (the
/// provider side has checked its NAT range already), else passed untouched.
#[inline(always)]
fn ours_or_pass(consumer: bool, iface: &IfaceInfo, daddr_be: u32, reason: u32) -> Verdict {
    if consumer && !is_endpoint(iface, daddr_be) {
        return Verdict::pass(PASS_NOT_ENDPOINT);
    }
    Verdict::drop(reason)
}

/// A packet of a tracked flow: policy is skipped, the link is re-checked (reject, allowlist removal
/// and deletion cut live flows).
#[inline(always)]
fn established(
    ctx: &XdpContext,
    l2: &L2,
    p: &Ip4,
    flow_ptr: *mut Flow4,
    now: u64,
    fib_gen: u32,
) -> Verdict {
    // SAFETY: pointer from a successful lookup; copied so the rewrite uses one consistent view.
    let flow = unsafe { *flow_ptr };
    let Some(link) = LINKS.get(flow.link_id) else {
        return Verdict::drop(DROP_LINK_INACTIVE);
    };
    let v = if let Err(reason) = policy::link_usable(link) {
        Verdict::drop(reason)
    } else if p.ttl <= 1 {
        Verdict::drop(DROP_TTL_EXPIRED)
    } else {
        conntrack::update(flow_ptr, p, now);
        forward::send(ctx, l2, p, &flow, Some(flow_ptr), fib_gen)
    };
    stats::link_packet(
        flow.link_id,
        flow.dir,
        frame_len(ctx),
        p.tcp_flags & TCP_RST != 0,
        &v,
    );
    v
}

/// A packet without state towards an endpoint: admit, pick a backend, allocate NAT, create state.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    l2: &L2,
    p: &Ip4,
    key: &FlowKey4,
    now: u64,
    cfg: &DatapathConfig,
) -> Verdict {
    let ep_key = EndpointKey4 {
        network_id: key.network_id,
        addr_be: p.daddr_be,
        port_be: p.dport_be,
        proto: p.proto,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(ep) = (unsafe { ENDPOINTS4.get(ep_key) }).copied() else {
        return Verdict::drop(DROP_NO_PORT);
    };
    let Some(link) = LINKS.get(ep.link_id).copied() else {
        return Verdict::drop(DROP_LINK_INACTIVE);
    };
    let v = match admit_and_create(
        ctx,
        l2,
        p,
        key,
        &link,
        ep.link_id,
        ep.service_port_be,
        now,
        cfg,
    ) {
        Ok(flow) => {
            stats::link_new_conn(ep.link_id);
            forward::send(ctx, l2, p, &flow, None, cfg.fib_generation)
        }
        Err(reason) => Verdict::drop(reason),
    };
    stats::link_packet(
        ep.link_id,
        DIR_FORWARD,
        frame_len(ctx),
        p.tcp_flags & TCP_RST != 0,
        &v,
    );
    v
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn admit_and_create(
    ctx: &XdpContext,
    l2: &L2,
    p: &Ip4,
    key: &FlowKey4,
    link: &privatelink_common::LinkInfo,
    link_id: u32,
    service_port_be: u16,
    now: u64,
    cfg: &DatapathConfig,
) -> Result<Flow4, u32> {
    policy::link_usable(link)?;
    policy::allowlisted(link)?;
    if p.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return Err(DROP_TCP_NOT_SYN);
    }
    policy::security_groups(
        link.rules_slot,
        p.saddr_be,
        u16::from_be(p.dport_be),
        p.proto,
    )?;
    if p.ttl <= 1 {
        return Err(DROP_TTL_EXPIRED);
    }
    let hash = nat::flow_hash(key);
    let backend_be = nat::pick_backend(link.service_slot, hash)?;
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(PASS_MALFORMED)?;
    // SAFETY: bounds checked by ptr_at.
    let (node_mac, peer_mac) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    let origin = Origin {
        ifindex: ctx.ingress_ifindex() as u32,
        vlan_id: l2.vlan_id,
        node_mac,
        peer_mac,
    };
    nat::create_flow(
        key,
        p,
        link,
        link_id,
        backend_be,
        service_port_be,
        &origin,
        hash,
        now,
        cfg,
    )
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// The benchmark floor: the same parse, then swap MACs and bounce the frame.
#[inline(always)]
pub fn floor(ctx: &XdpContext) -> u32 {
    let Some(l2) = parse::l2(ctx) else {
        return xdp_action::XDP_PASS;
    };
    if l2.ether_type != ETH_P_IP || parse::ip4(ctx, l2.l3_off).ok().flatten().is_none() {
        return xdp_action::XDP_PASS;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe { core::mem::swap(&mut (*eth).src_addr, &mut (*eth).dst_addr) };
    xdp_action::XDP_TX
}
