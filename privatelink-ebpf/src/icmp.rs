//! ICMP errors about tracked flows, in both directions.
//!
//! A router or backend on the provider side that cannot deliver a packet of a flow (port
//! unreachable, fragmentation needed, time exceeded, parameter problem) sends the error to the
//! flow's NAT address, quoting the packet's IPv4 header and first eight L4 bytes. The quoted tuple
//! is the flow's reply tuple reversed, so the reply entry is found and the error is translated like
//! the flow: the outer header goes from the endpoint address to the consumer, the quoted packet
//! becomes the consumer's own (consumer → endpoint, its ports), every checksum is updated
//! incrementally, and the frame leaves by the reply path. Path MTU discovery works across the
//! endpoint. An error quoting no tracked flow is dropped and counted.
//!
//! The mirror image: a consumer (or a router on its side) that cannot take a reply sends the error
//! to the endpoint address, quoting the reply as it was delivered. Its tuple reversed is the
//! flow's forward key, and the same rewrite with the forward entry makes it an error from the NAT
//! address to the backend about the backend's own packet; it leaves by the forward path (the
//! flow's cached next hop, else a FIB lookup). Large replies then adapt to a smaller MTU on the
//! consumer's side.
//!
//! Echo requests to an endpoint are answered only for services that opt in.
use network_types::ip::Ipv4Hdr;
use privatelink_common::{
    DIR_FORWARD, DIR_REPLY, DROP_BAD_IHL, DROP_BAD_VERSION, DROP_ICMP_ECHO, DROP_ICMP_NO_FLOW,
    DROP_NO_FLOW, DROP_NO_PORT, DROP_REWRITE_FAILED, DROP_TRUNCATED, DROP_TTL_EXPIRED,
    EndpointIpValue, Flow, FlowKey, FlowKey4, ICMP_ECHO_REPLIED, IfaceInfo, LinkInfo, PROTO_ICMP,
    PROTO_TCP, PROTO_UDP,
};

use crate::{
    LINKS, conntrack,
    csum::Delta,
    family::Family,
    forward::{ensure_next_hop, out, rewrite_l2},
    parse::{Hdr4, L2, ptr_at},
    policy, stats,
    verdict::Verdict,
};

const DEST_UNREACH: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAM_PROBLEM: u8 = 12;
/// ICMP (and ICMPv6) header: type, code, checksum, four bytes of rest (the MTU for
/// fragmentation needed).
pub const ICMP_HLEN: usize = 8;

/// An ICMP message on a provider interface, addressed to a NAT address (`h` validated at `l3_off`).
#[inline(always)]
pub fn from_provider(
    ctx: &aya_ebpf::programs::XdpContext,
    l2: &L2,
    iface: &IfaceInfo,
    h: &Hdr4,
) -> Verdict {
    match translate(ctx, l2, iface, h, DIR_REPLY) {
        Ok(v) => v,
        Err(reason) => Verdict::drop(reason),
    }
}

/// Translates an error about a flow's packet. `dir`: the entry the quoted packet's reversed tuple
/// names, [`DIR_REPLY`] for errors from the provider side (to a NAT address), [`DIR_FORWARD`] for
/// errors from the consumer side (to an endpoint address). Either way the quoted packet's
/// addresses and ports become the entry's reversed and the outer ones the entry's own.
#[inline(always)]
fn translate(
    ctx: &aya_ebpf::programs::XdpContext,
    l2: &L2,
    iface: &IfaceInfo,
    h: &Hdr4,
    dir: u8,
) -> Result<Verdict, u32> {
    let l4_off = l2.l3_off + h.hdr_len;
    let icmp: *mut [u8; ICMP_HLEN] = ptr_at(ctx, l4_off).ok_or(DROP_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let kind = unsafe { (*icmp)[0] };
    if kind != DEST_UNREACH && kind != TIME_EXCEEDED && kind != PARAM_PROBLEM {
        // Echo and the rest: a NAT address has no such flow.
        return Err(DROP_NO_FLOW);
    }
    // The quoted packet: its IPv4 header (IHL honoured) and the first eight L4 bytes.
    let inner_off = l4_off + ICMP_HLEN;
    let inner: *mut Ipv4Hdr = ptr_at(ctx, inner_off).ok_or(DROP_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, proto, in_src, in_dst) = unsafe {
        (
            (*inner).vihl,
            (*inner).proto,
            u32::from_ne_bytes((*inner).src_addr),
            u32::from_ne_bytes((*inner).dst_addr),
        )
    };
    let ihl = (vihl & 0x0f) as usize;
    if vihl >> 4 != 4 {
        return Err(DROP_BAD_VERSION);
    }
    if ihl < 5 {
        return Err(DROP_BAD_IHL);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(DROP_ICMP_NO_FLOW);
    }
    // SAFETY: a plain read of a bounded value, so the verifier keeps the bound on the offset.
    let in_l4_off = inner_off + unsafe { core::ptr::read_volatile(&(ihl * 4)) };
    let ports: *mut [u8; 8] = ptr_at(ctx, in_l4_off).ok_or(DROP_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let q = unsafe { &mut *ports };
    let (in_sport, in_dport) = (
        u16::from_ne_bytes([q[0], q[1]]),
        u16::from_ne_bytes([q[2], q[3]]),
    );
    // The quoted packet went NAT address → backend; its reply would come backend → NAT address.
    let key = FlowKey4::new(iface.network_id, in_dst, in_src, in_dport, in_sport, proto);
    let entry = error_entry(ctx, l2, &key, dir, PROTO_ICMP)?;
    // SAFETY: pointer from a successful lookup; copied out at once.
    let flow = unsafe { *entry };
    let link = LINKS.get(flow.link_id).ok_or(DROP_ICMP_NO_FLOW)?;
    policy::link_usable(link)?;
    if h.ttl <= 1 {
        return Err(DROP_TTL_EXPIRED);
    }

    // The quoted packet becomes the consumer's: consumer → endpoint, its own ports.
    let in_l3 = Delta::new()
        .u32(in_src, flow.daddr_be)
        .u32(in_dst, flow.saddr_be);
    // SAFETY: bounds checked by ptr_at above.
    let inner = unsafe { &mut *inner };
    let old_in_check = u16::from_ne_bytes(inner.check);
    let new_in_check = in_l3.apply(old_in_check);
    inner.src_addr = flow.daddr_be.to_ne_bytes();
    inner.dst_addr = flow.saddr_be.to_ne_bytes();
    inner.check = new_in_check.to_ne_bytes();
    let quoted_l4 = rewrite_quoted_l4(ctx, q, in_l4_off, proto, &flow, in_l3);
    let icmp_delta = in_l3
        .plus(Delta::new().u16(old_in_check, new_in_check))
        .plus(quoted_l4);
    // SAFETY: bounds checked by ptr_at above.
    let icmp = unsafe { &mut *icmp };
    let c = icmp_delta
        .apply(u16::from_ne_bytes([icmp[2], icmp[3]]))
        .to_ne_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];

    // Outer header: from the endpoint address to the consumer, one hop less.
    let outer: *mut Ipv4Hdr = ptr_at(ctx, l2.l3_off).ok_or(DROP_REWRITE_FAILED)?;
    // SAFETY: bounds checked by ptr_at.
    let outer = unsafe { &mut *outer };
    let old_ttl = u16::from_ne_bytes([outer.ttl, outer.proto]);
    outer.ttl -= 1;
    let l3 = Delta::new()
        .u32(h.saddr_be, flow.saddr_be)
        .u32(h.daddr_be, flow.daddr_be)
        .u16(old_ttl, u16::from_ne_bytes([outer.ttl, outer.proto]));
    outer.src_addr = flow.saddr_be.to_ne_bytes();
    outer.dst_addr = flow.daddr_be.to_ne_bytes();
    outer.check = l3.apply(u16::from_ne_bytes(outer.check)).to_ne_bytes();

    Ok(send_error(ctx, l2, &flow, dir))
}

/// The conntrack entry an ICMP error is about: `key` is the quoted packet's tuple reversed, and
/// the entry must be of direction `dir`. Not refreshed: an error keeps no flow alive. Towards the
/// backend (`DIR_FORWARD`) the flow's next hop is made sure of (resolved now if it has none).
#[inline(always)]
pub fn error_entry<A: Family>(
    ctx: &aya_ebpf::programs::XdpContext,
    l2: &L2,
    key: &FlowKey<A>,
    dir: u8,
    proto: u8,
) -> Result<*mut Flow<A>, u32> {
    let entry = match A::ct().get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup.
        Some(f) if unsafe { (*f).dir } == dir => f,
        _ => return Err(DROP_ICMP_NO_FLOW),
    };
    if dir == DIR_FORWARD {
        ensure_next_hop(ctx, l2, entry, conntrack::config().fib_generation, proto)?;
    }
    Ok(entry)
}

/// Rewrites the quoted packet's ports (the first four of the eight quoted L4 bytes `q`, at
/// `l4_off`) to those `flow` gives the other side of the tuple, and its L4 checksum where the
/// quote holds it: UDP's is in the eight bytes (zero stays zero), TCP's only when more than eight
/// bytes were quoted. `addrs`: the change of the quoted addresses, which the pseudo-header sees.
/// Returns the change of the quoted L4 bytes, for the ICMP checksum.
#[inline(always)]
pub fn rewrite_quoted_l4<A: Family>(
    ctx: &aya_ebpf::programs::XdpContext,
    q: &mut [u8; 8],
    l4_off: usize,
    proto: u8,
    flow: &Flow<A>,
    addrs: Delta,
) -> Delta {
    let ports = Delta::new()
        .u16(u16::from_ne_bytes([q[0], q[1]]), flow.dport_be)
        .u16(u16::from_ne_bytes([q[2], q[3]]), flow.sport_be);
    let [s0, s1] = flow.dport_be.to_ne_bytes();
    let [d0, d1] = flow.sport_be.to_ne_bytes();
    *q = [s0, s1, d0, d1, q[4], q[5], q[6], q[7]];
    let l4 = addrs.plus(ports);
    let mut changed = ports;
    if proto == PROTO_UDP {
        let old = u16::from_ne_bytes([q[6], q[7]]);
        if old != 0 {
            let c = l4.apply(old);
            let c = if c == 0 { 0xffff } else { c };
            let [c0, c1] = c.to_ne_bytes();
            *q = [q[0], q[1], q[2], q[3], q[4], q[5], c0, c1];
            changed = changed.plus(Delta::new().u16(old, c));
        }
    } else if let Some(tcp) = ptr_at::<[u8; 18]>(ctx, l4_off) {
        // SAFETY: bounds checked by ptr_at.
        let t = unsafe { &mut *tcp };
        let old = u16::from_ne_bytes([t[16], t[17]]);
        let c = l4.apply(old).to_ne_bytes();
        t[16] = c[0];
        t[17] = c[1];
        changed = changed.plus(Delta::new().u16(old, u16::from_ne_bytes(c)));
    }
    changed
}

/// Sends a translated error out by its entry (reply entries hold the way back, forward entries
/// the next hop [`error_entry`] made sure of) and counts it on the flow's link in direction `dir`.
#[inline(always)]
pub fn send_error<A: Family>(
    ctx: &aya_ebpf::programs::XdpContext,
    l2: &L2,
    flow: &Flow<A>,
    dir: u8,
) -> Verdict {
    let v = if rewrite_l2(ctx, l2, &flow.dst_mac, &flow.src_mac, flow.vlan_id) {
        out(l2, flow.egress_ifindex)
    } else {
        Verdict::drop(DROP_REWRITE_FAILED)
    };
    stats::link_packet(
        flow.link_id,
        dir,
        (ctx.data_end() - ctx.data()) as u64,
        false,
        &v,
    );
    v
}

const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;

/// ICMP from a consumer to endpoint `ep` (`h` validated): an error about a reply of a tracked
/// flow is translated towards the backend; an echo request is answered in place when the service
/// opts in and the link would admit a new flow from the sender (state, allowlist, security groups
/// with protocol `icmp`); else dropped as `icmp_echo`. Other ICMP to an endpoint: `no_port`.
#[inline(always)]
pub fn to_endpoint(
    ctx: &aya_ebpf::programs::XdpContext,
    l2: &L2,
    iface: &IfaceInfo,
    ep: &EndpointIpValue,
    h: &Hdr4,
) -> Verdict {
    let l4_off = l2.l3_off + h.hdr_len;
    // The whole header through one checked pointer (a one-byte check compiles to a comparison
    // the verifier does not learn a bound from).
    let Some(icmp) = ptr_at::<[u8; ICMP_HLEN]>(ctx, l4_off) else {
        return Verdict::drop(DROP_TRUNCATED);
    };
    // SAFETY: bounds checked by ptr_at.
    let icmp = unsafe { &mut *icmp };
    if icmp[0] == DEST_UNREACH || icmp[0] == TIME_EXCEEDED || icmp[0] == PARAM_PROBLEM {
        return match translate(ctx, l2, iface, h, DIR_FORWARD) {
            Ok(v) => v,
            Err(reason) => Verdict::drop(reason),
        };
    }
    if icmp[0] != ECHO_REQUEST {
        return Verdict::drop(DROP_NO_PORT);
    }
    let Some(link) = LINKS.get(ep.link_id) else {
        return Verdict::drop(DROP_ICMP_ECHO);
    };
    if !answers_echo(link, h.saddr_be, PROTO_ICMP) {
        return Verdict::drop(DROP_ICMP_ECHO);
    }
    // The reply in place: addresses swapped (the IPv4 checksum does not change for a swap), a
    // fresh TTL, type 0, MACs swapped, out where it came in.
    let (Some(eth), Some(ip)) = (
        ptr_at::<[[u8; 6]; 2]>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, l2.l3_off),
    ) else {
        return Verdict::drop(DROP_REWRITE_FAILED);
    };
    // SAFETY: bounds checked by ptr_at.
    let (eth, ip) = unsafe { (&mut *eth, &mut *ip) };
    *eth = [eth[1], eth[0]];
    let old_ttl = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl = 64;
    ip.check = Delta::new()
        .u16(old_ttl, u16::from_ne_bytes([ip.ttl, ip.proto]))
        .apply(u16::from_ne_bytes(ip.check))
        .to_ne_bytes();
    core::mem::swap(&mut ip.src_addr, &mut ip.dst_addr);
    into_reply(icmp, ECHO_REPLY)
}

/// Whether an echo request from `saddr` to an endpoint of `link` is answered: the service opts
/// in and the link would admit a new flow from the sender (state, allowlist, security groups with
/// protocol `proto`, ICMP or ICMPv6).
#[inline(always)]
pub fn answers_echo<A: Family>(link: &LinkInfo, saddr: A, proto: u8) -> bool {
    link.answer_ping != 0
        && policy::link_usable(link).is_ok()
        && policy::allowlisted(link).is_ok()
        && A::security_groups(link, saddr, 0, proto).is_ok()
}

/// Turns the echo request header `icmp` into a reply of type `reply` (the checksum updated for
/// the type; the caller has swapped addresses and MACs) and sends it back out (XDP_TX).
#[inline(always)]
pub fn into_reply(icmp: &mut [u8; ICMP_HLEN], reply: u8) -> Verdict {
    let old_type = u16::from_ne_bytes([icmp[0], icmp[1]]);
    icmp[0] = reply;
    let c = Delta::new()
        .u16(old_type, u16::from_ne_bytes([icmp[0], icmp[1]]))
        .apply(u16::from_ne_bytes([icmp[2], icmp[3]]))
        .to_ne_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    Verdict {
        action: aya_ebpf::bindings::xdp_action::XDP_TX,
        outcome: ICMP_ECHO_REPLIED,
    }
}
