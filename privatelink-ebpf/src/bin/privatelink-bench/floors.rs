//! The benchmark floors: the datapath's own parse with the least work after it, so the bench can
//! state the datapath's costs as ratios to them (see `privatelink-common::bench`).
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::eth::EthHdr;
use privatelink_ebpf::{
    conntrack,
    parse::{self, ETH_P_IP, ptr_at},
    process::{flow_key, receiving_iface},
};

/// The benchmark floor with the interface and conntrack lookups of `classify` and `tracked` (the
/// same code) between the parse and the bounce: what a hash lookup adds to the floor.
#[inline(always)]
pub fn lookup_floor(ctx: &XdpContext) -> u32 {
    let Some(l2) = parse::l2(ctx) else {
        return xdp_action::XDP_PASS;
    };
    let Some(iface) = receiving_iface(l2.ingress, l2.vlan_id) else {
        return xdp_action::XDP_PASS;
    };
    if l2.ether_type != ETH_P_IP {
        return xdp_action::XDP_PASS;
    }
    let Ok(Some(p)) = parse::ip4(ctx, l2.l3_off) else {
        return xdp_action::XDP_PASS;
    };
    let key = flow_key(&iface, &p);
    let now = conntrack::now();
    if conntrack::lookup(&key, now, &conntrack::config()).is_none() {
        return xdp_action::XDP_PASS;
    }
    bounce(ctx)
}

/// The benchmark floor with a new flow's two slot claims in an open-addressing table between the
/// parse and the bounce (see `bench.rs`): XDP_TX once both are claimed, XDP_PASS otherwise.
#[inline(always)]
pub fn slot_floor(ctx: &XdpContext) -> u32 {
    let Some(l2) = parse::l2(ctx) else {
        return xdp_action::XDP_PASS;
    };
    if l2.ether_type != ETH_P_IP {
        return xdp_action::XDP_PASS;
    }
    let Ok(Some(p)) = parse::ip4(ctx, l2.l3_off) else {
        return xdp_action::XDP_PASS;
    };
    if !crate::bench::claim_flow_slots(&p) {
        return xdp_action::XDP_PASS;
    }
    bounce(ctx)
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
    bounce(ctx)
}

/// The floors' ending: swap the MACs and send the frame back out (XDP_PASS if the frame is too
/// short for an Ethernet header, which a parsed frame never is).
#[inline(always)]
fn bounce(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe { core::mem::swap(&mut (*eth).src_addr, &mut (*eth).dst_addr) };
    xdp_action::XDP_TX
}
