//! ICMPv6: neighbour discovery for endpoint addresses (the IPv6 twin of the ARP responder), echo
//! requests to endpoints, and errors about tracked flows from the provider side.
//!
//! A consumer resolves its endpoint's IPv6 address with a neighbour solicitation to the
//! solicited-node multicast group. The node answers, per consumer network, with a solicited
//! neighbour advertisement carrying the receiving interface's MAC (XDP_TX), so overlapping
//! consumer prefixes and many endpoints need no kernel neighbour or address state. Duplicate
//! address detection (unspecified source) and solicitations in any other shape pass to the kernel.
//!
//! Errors (destination unreachable, packet too big, time exceeded, parameter problem) sent to a NAT
//! address about a flow's packet are translated like the flow, as [`crate::icmp`] does for IPv4:
//! the outer header goes from the endpoint to the consumer, the quoted packet becomes the
//! consumer's own, and the ICMPv6 checksum (which covers the pseudo-header and the whole quote)
//! is updated incrementally. Path MTU discovery works across an IPv6 endpoint.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use privatelink_common::{
    DROP_BAD_VERSION, DROP_ICMP_ECHO, DROP_ICMP_NO_FLOW, DROP_NO_FLOW, DROP_NO_PORT,
    DROP_REWRITE_FAILED, DROP_TRUNCATED, DROP_TTL_EXPIRED, EndpointIpValue, FlowKey6, IfaceInfo,
    In6, ND_REPLIED, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

use crate::{
    ERROR_KEY6, LINKS,
    csum::{self, Delta},
    family::Family,
    icmp::{self, ICMP_HLEN},
    parse::{Hdr6, IPV6_HLEN, Ip6, Ipv6Raw, L2, in6, ptr_at, wire6},
    policy,
    verdict::Verdict,
};

const NEIGHBOUR_SOLICITATION: u8 = 135;
const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;
/// Error types (RFC 4443 §3): destination unreachable, packet too big, time exceeded, parameter
/// problem; errors are types 0–127, and these four are the ones that quote a packet.
const DEST_UNREACH: u8 = 1;
const PARAM_PROBLEM: u8 = 4;
/// Option types: source and target link-layer address.
const OPT_SOURCE_LLA: u8 = 1;
const OPT_TARGET_LLA: u8 = 2;
/// Advertisement flags: solicited, override (not a router).
const NA_FLAGS: [u8; 4] = [0x60, 0, 0, 0];

/// A solicitation with one source link-layer address option, the shape every host sends when it
/// has an address (RFC 4861 §4.3), as one struct so one bounds check covers it.
#[repr(C)]
struct Solicitation {
    ip: Ipv6Raw,
    icmp: [u8; ICMP_HLEN],
    target: [[u8; 4]; 4],
    opt: [u8; 2],
    lla: [u8; 6],
}
const NS_LEN: usize = core::mem::size_of::<Solicitation>() - IPV6_HLEN;

/// Answers a neighbour solicitation for an endpoint address of the network of `iface`. `None`:
/// not a solicitation for an endpoint (the caller goes on).
#[inline(always)]
pub fn neighbour_solicitation(
    ctx: &XdpContext,
    l2: &L2,
    iface: &IfaceInfo,
    h: &Hdr6,
    p: &Ip6,
) -> Option<Verdict> {
    if h.l4_off != l2.l3_off + IPV6_HLEN || h.end != h.l4_off + NS_LEN {
        return None;
    }
    let ns: *mut Solicitation = ptr_at(ctx, l2.l3_off)?;
    let eth: *mut [[u8; 6]; 2] = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let (ns, eth) = unsafe { (&mut *ns, &mut *eth) };
    if ns.icmp[0] != NEIGHBOUR_SOLICITATION
        || ns.icmp[1] != 0
        || ns.ip.head[7] != 255
        || ns.opt != [OPT_SOURCE_LLA, 1]
        || p.saddr_be == [0; 4]
    {
        return None;
    }
    let target = in6(&ns.target);
    In6::endpoint_ip(iface.network_id, target)?;
    // The advertisement in place: from the target to the soliciting host, our MAC as the target
    // link-layer address, the checksum computed afresh (every word but the target changed).
    ns.ip.dst = ns.ip.src;
    ns.ip.src = ns.target;
    ns.icmp = [
        NEIGHBOUR_ADVERTISEMENT,
        0,
        0,
        0,
        NA_FLAGS[0],
        NA_FLAGS[1],
        NA_FLAGS[2],
        NA_FLAGS[3],
    ];
    ns.opt = [OPT_TARGET_LLA, 1];
    ns.lla = iface.mac;
    let pseudo = pseudo_sum(in6(&ns.ip.src), in6(&ns.ip.dst), NS_LEN as u32);
    let body = csum::sum(&ns.icmp)
        + csum::sum(&wire_bytes(&ns.target))
        + csum::sum(&ns.opt)
        + csum::sum(&ns.lla);
    let c = csum::finish(pseudo + body).to_ne_bytes();
    ns.icmp[2] = c[0];
    ns.icmp[3] = c[1];
    *eth = [eth[1], iface.mac];
    Some(Verdict {
        action: xdp_action::XDP_TX,
        outcome: ND_REPLIED,
    })
}

/// The sum of the IPv6 pseudo-header (addresses, upper-layer length, next header ICMPv6).
#[inline(always)]
fn pseudo_sum(src: In6, dst: In6, len: u32) -> u32 {
    csum::sum(&wire_bytes(&wire6(src)))
        + csum::sum(&wire_bytes(&wire6(dst)))
        + csum::sum(&len.to_be_bytes())
        + csum::sum(&(PROTO_ICMPV6 as u32).to_be_bytes())
}

#[inline(always)]
fn wire_bytes(w: &[[u8; 4]; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        b[i] = w[i / 4][i % 4];
        i += 1;
    }
    b
}

/// ICMPv6 from a consumer to endpoint `ep` other than an error (see [`error`]): an echo request is
/// answered in place when the service opts in and the link would admit a new flow from the sender
/// (state, allowlist, security groups with protocol `icmp`); else dropped as `icmp_echo`. Other
/// ICMPv6 to an endpoint: `no_port`.
#[inline(always)]
pub fn to_endpoint(ctx: &XdpContext, l2: &L2, ep: &EndpointIpValue, h: &Hdr6, p: &Ip6) -> Verdict {
    let Some(icmp) = ptr_at::<[u8; ICMP_HLEN]>(ctx, h.l4_off) else {
        return Verdict::drop(DROP_TRUNCATED);
    };
    // SAFETY: bounds checked by ptr_at.
    let icmp = unsafe { &mut *icmp };
    if icmp[0] != ECHO_REQUEST {
        return Verdict::drop(DROP_NO_PORT);
    }
    let Some(link) = LINKS.get(ep.link_id) else {
        return Verdict::drop(DROP_ICMP_ECHO);
    };
    if !icmp::answers_echo(link, p.saddr_be, PROTO_ICMPV6) {
        return Verdict::drop(DROP_ICMP_ECHO);
    }
    // The reply in place: addresses swapped (the pseudo-header sum does not change for a swap),
    // a fresh hop limit, type 129, MACs swapped, out where it came in.
    let (Some(eth), Some(ip)) = (
        ptr_at::<[[u8; 6]; 2]>(ctx, 0),
        ptr_at::<Ipv6Raw>(ctx, l2.l3_off),
    ) else {
        return Verdict::drop(DROP_REWRITE_FAILED);
    };
    // SAFETY: bounds checked by ptr_at.
    let (eth, ip) = unsafe { (&mut *eth, &mut *ip) };
    *eth = [eth[1], eth[0]];
    ip.head[7] = 64;
    core::mem::swap(&mut ip.src, &mut ip.dst);
    icmp::into_reply(icmp, ECHO_REPLY)
}

/// An ICMPv6 error's header and the IPv6 header it quotes, under one bounds check.
#[repr(C)]
struct ErrorHead {
    icmp: [u8; ICMP_HLEN],
    inner: Ipv6Raw,
}

/// Whether the ICMPv6 message (`h` validated) is an error that quotes a packet.
#[inline(always)]
pub fn is_error(ctx: &XdpContext, h: &Hdr6) -> bool {
    ptr_at::<[u8; ICMP_HLEN]>(ctx, h.l4_off)
        // SAFETY: bounds checked by ptr_at.
        .is_some_and(|icmp| (DEST_UNREACH..=PARAM_PROBLEM).contains(unsafe { &(*icmp)[0] }))
}

/// An ICMPv6 message about a flow (`h` and `p` validated: the outer header): on a provider
/// interface to a NAT address (`dir` `DIR_REPLY`), or an error from a consumer to an endpoint
/// address (`dir` `DIR_FORWARD`).
#[inline(always)]
pub fn error(ctx: &XdpContext, l2: &L2, iface: &IfaceInfo, h: &Hdr6, p: &Ip6, dir: u8) -> Verdict {
    match translate_error(ctx, l2, iface, h, p, dir) {
        Ok(v) => v,
        Err(reason) => Verdict::drop(reason),
    }
}

/// Translates an error about a flow's packet, as [`icmp`] does for IPv4: `dir` is the entry the
/// quoted packet's reversed tuple names (`DIR_REPLY` from the provider side, `DIR_FORWARD`
/// from the consumer side).
#[inline(always)]
fn translate_error(
    ctx: &XdpContext,
    l2: &L2,
    iface: &IfaceInfo,
    h: &Hdr6,
    p: &Ip6,
    dir: u8,
) -> Result<Verdict, u32> {
    let icmp: *const [u8; ICMP_HLEN] = ptr_at(ctx, h.l4_off).ok_or(DROP_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let kind = unsafe { (*icmp)[0] };
    if !(DEST_UNREACH..=PARAM_PROBLEM).contains(&kind) {
        // Echo and the rest: a NAT address has no such flow.
        return Err(DROP_NO_FLOW);
    }
    let e: *mut ErrorHead = ptr_at(ctx, h.l4_off).ok_or(DROP_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let e = unsafe { &mut *e };
    if e.inner.head[0] >> 4 != 6 {
        return Err(DROP_BAD_VERSION);
    }
    // The quoted packet's upper header must follow its fixed header: the datapath forwards the
    // consumer's extension headers, so a quote carrying some is not walked (dropped, counted).
    let proto = e.inner.head[6];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(DROP_ICMP_NO_FLOW);
    }
    let in_l4_off = h.l4_off + ICMP_HLEN + IPV6_HLEN;
    let ports: *mut [u8; 8] = ptr_at(ctx, in_l4_off).ok_or(DROP_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let q = unsafe { &mut *ports };
    let (in_sport, in_dport) = (
        u16::from_ne_bytes([q[0], q[1]]),
        u16::from_ne_bytes([q[2], q[3]]),
    );
    // The quoted packet went NAT address → backend; its reply would come backend → NAT address.
    // The key is built in per-CPU map memory, and the entry is read in place: on the stack,
    // either would push the program's frame past 512 bytes.
    let key = ERROR_KEY6.get_ptr_mut(0).ok_or(DROP_ICMP_NO_FLOW)?;
    // SAFETY: per-CPU value, no concurrent user.
    let key = unsafe { &mut *key };
    *key = FlowKey6::new(
        iface.network_id,
        in6(&e.inner.dst),
        in6(&e.inner.src),
        in_dport,
        in_sport,
        proto,
    );
    let entry = icmp::error_entry(ctx, l2, key, dir, PROTO_ICMPV6)?;
    // SAFETY: pointer from a successful lookup; read in place (no copy on the stack).
    let flow = unsafe { &*entry };
    let link = LINKS.get(flow.link_id).ok_or(DROP_ICMP_NO_FLOW)?;
    policy::link_usable(link)?;
    if h.hop_limit <= 1 {
        return Err(DROP_TTL_EXPIRED);
    }

    // The quoted packet becomes the consumer's: consumer → endpoint, its own ports. No IPv6
    // header checksum; the quoted L4 checksum's pseudo-header sees the address change.
    // Word by word, each read and written at once (whole addresses held in registers spill).
    let mut in_l3 = Delta::new();
    for i in 0..4 {
        let (src, dst) = (flow.daddr_be[i], flow.saddr_be[i]);
        in_l3 = in_l3
            .u32(u32::from_ne_bytes(e.inner.src[i]), src)
            .u32(u32::from_ne_bytes(e.inner.dst[i]), dst);
        e.inner.src[i] = src.to_ne_bytes();
        e.inner.dst[i] = dst.to_ne_bytes();
    }
    // IPv6 errors quote as much as fits in 1280 bytes: TCP's checksum is usually quoted.
    let icmp_delta = in_l3.plus(icmp::rewrite_quoted_l4(
        ctx, q, in_l4_off, proto, flow, in_l3,
    ));

    // Outer header: from the endpoint address to the consumer, one hop less. The ICMPv6
    // checksum's pseudo-header sees the address change.
    let outer: *mut Ipv6Raw = ptr_at(ctx, l2.l3_off).ok_or(DROP_REWRITE_FAILED)?;
    // SAFETY: bounds checked by ptr_at.
    let outer = unsafe { &mut *outer };
    let mut l3 = Delta::new();
    for i in 0..4 {
        let (src, dst) = (flow.saddr_be[i], flow.daddr_be[i]);
        l3 = l3.u32(p.saddr_be[i], src).u32(p.daddr_be[i], dst);
        outer.src[i] = src.to_ne_bytes();
        outer.dst[i] = dst.to_ne_bytes();
    }
    outer.head[7] -= 1;
    let icmp_delta = icmp_delta.plus(l3);
    let c = icmp_delta
        .apply(u16::from_ne_bytes([e.icmp[2], e.icmp[3]]))
        .to_ne_bytes();
    e.icmp[2] = c[0];
    e.icmp[3] = c[1];

    Ok(icmp::send_error(ctx, l2, flow, dir))
}
