//! Applying a flow's translation to the packet and sending it on: TTL, checksums, MACs, VLAN, FIB,
//! XDP_TX or redirect.
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use network_types::{eth::EthHdr, tcp::TcpHdr, udp::UdpHdr};
use privatelink_common::{
    DIR_FORWARD, DROP_FIB_FAILED, DROP_REDIRECT_FAILED, DROP_REWRITE_FAILED, FWD_REDIRECT, FWD_TX,
    Flow, NextHop, PASS_NO_NEIGH, PROTO_TCP,
};

use crate::{
    DEVMAP, FIB_SCRATCH,
    csum::Delta,
    family::Family,
    mem,
    parse::{ETH_P_8021Q, L2, Pkt, VLAN_HLEN, ptr_at},
    verdict::Verdict,
};

/// A FIB lookup's next hop is reused for this long (by a flow, or by new flows to its backend).
pub const NEXTHOP_TTL_NS: u64 = 1_000_000_000;

/// The next hop cached for backend `slot`, if it is of FIB generation `fib_gen` and fresh. Read
/// in place (this CPU's entry; only this CPU writes it).
#[inline(always)]
pub fn cached_nexthop<A: Family>(slot: u32, now: u64, fib_gen: u32) -> Option<&'static NextHop> {
    let nh = A::nexthops().get(slot)?;
    (nh.ifindex != 0
        && nh.generation == fib_gen
        && now.saturating_sub(nh.resolved_ns) < NEXTHOP_TTL_NS)
        .then_some(nh)
}

/// How [`send`] goes about a packet besides its flow.
pub struct How {
    /// The FIB generation a cached next hop must have.
    pub fib_gen: u32,
    /// (backend slot, now) of a new flow, whose FIB result becomes the backend's cached next hop.
    pub learn: Option<(u32, u64)>,
    /// How far a PROXY flow's header moves the consumer's stream (0: not at all), added here
    /// (wrapping) to the TCP sequence number of a forward packet and to the acknowledgement of a
    /// reply (for those the PROXY path passes a move back: the negated length once the header is
    /// acknowledged). The translation, which holds the TCP header for the ports anyway, moves the
    /// field and takes its change into its one checksum update: no second bounds check, no second
    /// pass over the checksum.
    pub stream_move: u32,
}

/// Translates the packet by `flow` and sends it on. `entry` is the flow's conntrack entry, where a
/// forward flow caches the next hop its FIB lookup found (`None` for a flow created just now).
#[inline(always)]
pub fn send<A: Family>(
    ctx: &XdpContext,
    l2: &L2,
    p: &Pkt<A>,
    flow: &Flow<A>,
    entry: Option<*mut Flow<A>>,
    how: &How,
) -> Verdict {
    let (fib_gen, learn, moved) = (how.fib_gen, how.learn, how.stream_move);
    let cached =
        flow.dir == DIR_FORWARD && flow.egress_ifindex != 0 && flow.nh_generation == fib_gen;
    if flow.dir != DIR_FORWARD || cached {
        // Reply: back out of the consumer interface it came in on, to the MAC it came from.
        // Forward with a cached next hop: the interface and MACs of the last FIB lookup.
        if !rewrite_l34(ctx, p, flow, true, moved)
            || !rewrite_l2(ctx, l2, &flow.dst_mac, &flow.src_mac, flow.vlan_id)
        {
            return Verdict::drop(DROP_REWRITE_FAILED);
        }
        return out(l2, flow.egress_ifindex);
    }
    let mut slot = core::mem::MaybeUninit::<bpf_fib_lookup>::uninit();
    // SAFETY: plain-old-data struct, all zeroes is valid; fully written by `zero`.
    let fib = unsafe {
        mem::zero(slot.as_mut_ptr());
        slot.assume_init_mut()
    };
    fib.family = A::AF;
    fib.l4_protocol = p.proto;
    fib.sport = flow.sport_be;
    fib.dport = flow.dport_be;
    fib.__bindgen_anon_1.tot_len = p.tot_len;
    fib.ifindex = l2.ingress;
    A::fib_addrs(fib, flow.saddr_be, flow.daddr_be);
    // SAFETY: ctx and the params struct are valid for the call.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if let Some(e) = entry {
                // SAFETY: pointer from a successful lookup; plain fields, benign races.
                unsafe {
                    mem::copy_mac(&mut (*e).src_mac, &fib.smac);
                    mem::copy_mac(&mut (*e).dst_mac, &fib.dmac);
                    (*e).nh_generation = fib_gen;
                    (*e).egress_ifindex = fib.ifindex;
                }
            }
            if let Some((slot, now)) = learn
                && let Some(c) = A::nexthops().get_ptr_mut(slot)
            {
                // SAFETY: per-CPU value, no concurrent writer.
                unsafe {
                    *c = NextHop {
                        resolved_ns: now,
                        ifindex: fib.ifindex,
                        generation: fib_gen,
                        src_mac: fib.smac,
                        dst_mac: fib.dmac,
                        _pad: 0,
                    }
                };
            }
            if !rewrite_l34(ctx, p, flow, true, moved)
                || !rewrite_l2(ctx, l2, &fib.dmac, &fib.smac, 0)
            {
                return Verdict::drop(DROP_REWRITE_FAILED);
            }
            out(l2, fib.ifindex)
        }
        // The kernel forwards the translated packet (decrementing TTL itself) and resolves the
        // neighbour; the next packet of the flow takes the fast path.
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            if !rewrite_l34(ctx, p, flow, false, moved) {
                return Verdict::drop(DROP_REWRITE_FAILED);
            }
            Verdict {
                action: xdp_action::XDP_PASS,
                outcome: PASS_NO_NEIGH,
            }
        }
        _ => Verdict::drop(DROP_FIB_FAILED),
    }
}

/// Makes sure the forward entry at `entry` caches a next hop of FIB generation `fib_gen`, for
/// packets that are not the flow's own (ICMP errors about it): a FIB lookup when it does not, its
/// result written to the entry as the flow's own packets would. `Err`: a drop reason.
#[inline(always)]
pub fn ensure_next_hop<A: Family>(
    ctx: &XdpContext,
    l2: &L2,
    entry: *mut Flow<A>,
    fib_gen: u32,
    proto: u8,
) -> Result<(), u32> {
    // SAFETY: pointer from a successful lookup; plain fields, benign races.
    let e = unsafe { &mut *entry };
    if e.egress_ifindex != 0 && e.nh_generation == fib_gen {
        return Ok(());
    }
    // The parameters in per-CPU map memory: on the stack they do not fit next to the IPv6
    // program's frame.
    let fib = FIB_SCRATCH.get_ptr_mut(0).ok_or(DROP_FIB_FAILED)?;
    // SAFETY: per-CPU value, no concurrent user; plain-old-data, all zeroes is valid.
    let fib = unsafe {
        mem::zero(fib);
        &mut *fib
    };
    fib.family = A::AF;
    fib.l4_protocol = proto;
    fib.ifindex = l2.ingress;
    A::fib_addrs(fib, e.saddr_be, e.daddr_be);
    // SAFETY: ctx and the params struct are valid for the call.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc as u32 != BPF_FIB_LKUP_RET_SUCCESS {
        return Err(DROP_FIB_FAILED);
    }
    mem::copy_mac(&mut e.src_mac, &fib.smac);
    mem::copy_mac(&mut e.dst_mac, &fib.dmac);
    e.nh_generation = fib_gen;
    e.egress_ifindex = fib.ifindex;
    Ok(())
}

#[inline(always)]
pub fn out(l2: &L2, ifindex: u32) -> Verdict {
    if ifindex == l2.ingress {
        return Verdict {
            action: xdp_action::XDP_TX,
            outcome: FWD_TX,
        };
    }
    match DEVMAP.redirect(ifindex, 0) {
        Ok(action) => Verdict {
            action,
            outcome: FWD_REDIRECT,
        },
        Err(_) => Verdict::drop(DROP_REDIRECT_FAILED),
    }
}

/// Rewrites addresses and ports to the flow's, with incremental IPv4 and L4 checksum updates
/// (pseudo-header included; a zero UDP checksum stays zero) and, if asked, the TTL (hop limit)
/// decrement. A TCP packet's sequence number (forward) or acknowledgement (reply) moves by
/// `stream_move` (see [`How`]).
#[inline(always)]
fn rewrite_l34<A: Family>(
    ctx: &XdpContext,
    p: &Pkt<A>,
    flow: &Flow<A>,
    dec_ttl: bool,
    stream_move: u32,
) -> bool {
    let Some(addrs) = A::rewrite_l3(ctx, p, flow, dec_ttl) else {
        return false;
    };
    let l4 = addrs
        .u16(p.sport_be, flow.sport_be)
        .u16(p.dport_be, flow.dport_be);
    if p.proto == PROTO_TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(ctx, p.l4_off) else {
            return false;
        };
        let l4 = if stream_move != 0 {
            // The sequence number of a forward packet, the acknowledgement of a reply.
            let at = if flow.dir == DIR_FORWARD { 4 } else { 8 };
            // SAFETY: bounds checked by ptr_at (20 bytes); the field's four bytes are within.
            l4.plus(unsafe { move_u32(tcp.cast::<u8>().add(at), stream_move) })
        } else {
            l4
        };
        // SAFETY: bounds checked by ptr_at.
        let tcp = unsafe { &mut *tcp };
        tcp.source = flow.sport_be.to_ne_bytes();
        tcp.dest = flow.dport_be.to_ne_bytes();
        tcp.check = l4.apply(u16::from_ne_bytes(tcp.check)).to_ne_bytes();
    } else {
        let Some(udp) = ptr_at::<UdpHdr>(ctx, p.l4_off) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let udp = unsafe { &mut *udp };
        udp.src = flow.sport_be.to_ne_bytes();
        udp.dst = flow.dport_be.to_ne_bytes();
        let check = u16::from_ne_bytes(udp.check);
        if check != 0 {
            let c = l4.apply(check);
            udp.check = (if c == 0 { 0xffff } else { c }).to_ne_bytes();
        }
    }
    true
}

/// Adds `by` (wrapping) to the network-order 32-bit field at `f`: one load, one store. Returns the
/// change for the checksum.
///
/// # Safety
/// `f` is valid for reading and writing 4 bytes (a bounds-checked packet pointer).
#[inline(always)]
unsafe fn move_u32(f: *mut u8, by: u32) -> Delta {
    // SAFETY: the caller's.
    unsafe {
        let old = mem::load_u32(f);
        let new = u32::from_be(old).wrapping_add(by).to_be();
        mem::store_u32(f, new);
        Delta::new().u32(old, new)
    }
}

/// Writes the MACs and makes the VLAN tag `vlan_id` (0: untagged), pushing or popping a tag.
#[inline(always)]
pub fn rewrite_l2(ctx: &XdpContext, l2: &L2, dst: &[u8; 6], src: &[u8; 6], vlan_id: u16) -> bool {
    let tagged = l2.l3_off != EthHdr::LEN;
    let macs_at = match (tagged, vlan_id != 0) {
        (false, false) | (true, true) => 0,
        // Pop: the MACs move up over the tag; the inner EtherType is already in place.
        (true, false) => VLAN_HLEN,
        // Push: make room in front; the old EtherType lands right after the new tag.
        (false, true) => {
            // SAFETY: ctx is valid; a negative delta grows the headroom side.
            if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(VLAN_HLEN as i32)) } != 0 {
                return false;
            }
            0
        }
    };
    let Some(eth) = ptr_at::<[[u8; 6]; 2]>(ctx, macs_at) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe { *eth = [*dst, *src] };
    if vlan_id != 0 {
        let Some(tag) = ptr_at::<[u8; 4]>(ctx, 12) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let pcp = if tagged { (*tag)[2] & 0xf0 } else { 0 };
            let tci = (vlan_id & 0x0fff).to_be_bytes();
            *tag = {
                let tpid = ETH_P_8021Q.to_ne_bytes();
                [tpid[0], tpid[1], pcp | tci[0], tci[1]]
            };
        }
    } else if tagged {
        // SAFETY: ctx is valid; the frame is longer than the tag.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, VLAN_HLEN as i32) } != 0 {
            return false;
        }
    }
    true
}
