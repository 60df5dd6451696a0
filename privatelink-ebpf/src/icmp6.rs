//! ICMPv6 on consumer interfaces: neighbour discovery for endpoint addresses (the IPv6 twin of the
//! ARP responder) and echo requests to endpoints.
//!
//! A consumer resolves its endpoint's IPv6 address with a neighbour solicitation to the
//! solicited-node multicast group. The node answers, per consumer network, with a solicited
//! neighbour advertisement carrying the receiving interface's MAC (XDP_TX), so overlapping
//! consumer prefixes and many endpoints need no kernel neighbour or address state. Duplicate
//! address detection (unspecified source) and solicitations in any other shape pass to the kernel.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use privatelink_common::{
    DROP_ICMP_ECHO, DROP_NO_PORT, DROP_REWRITE_FAILED, DROP_TRUNCATED, EndpointIpValue, IfaceInfo,
    In6, ND_REPLIED, PROTO_ICMPV6,
};

use crate::{
    LINKS, csum,
    family::Family,
    icmp::{self, ICMP_HLEN},
    parse::{Hdr6, IPV6_HLEN, Ip6, Ipv6Raw, L2, in6, ptr_at, wire6},
    process::Verdict,
};

const NEIGHBOUR_SOLICITATION: u8 = 135;
const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;
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

/// ICMPv6 from a consumer to endpoint `ep`: an echo request is answered in place when the service
/// opts in and the link would admit a new flow from the sender (state, allowlist, security groups
/// with protocol `icmp`); else dropped as `icmp_echo`. Other ICMPv6 to an endpoint: `no_port`.
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
