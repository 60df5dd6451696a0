//! What differs between the address families for the shared flow logic (conntrack, NAT, backend
//! choice, admission, forwarding): the maps each family uses and its address arithmetic.
//!
//! `u32` is IPv4 and [`In6`] is IPv6, both as wire bytes read natively. Every function here is
//! inlined into a family-specific copy of the shared code, so the IPv4 path pays nothing for
//! IPv6's existence.
use aya_ebpf::{
    bindings::bpf_fib_lookup,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};
use network_types::ip::Ipv4Hdr;
use privatelink_common::{
    ConnStats, EndpointIpKey4, EndpointIpKey6, EndpointIpValue, EndpointKey4, EndpointKey6,
    EndpointValue, Flow, FlowCacheEntry, FlowKey, In6, LinkInfo, MaglevTable, NextHop,
    ProxyPending,
};

use crate::{
    BACKENDS4, BACKENDS6, CONN_NEW4, CONN_NEW6, CONN_STATS4, CONN_STATS6, CT4, CT6, ENDPOINT_IPS4,
    ENDPOINT_IPS6, ENDPOINTS4, ENDPOINTS6, ERROR_KEY6, FLOW_CACHE4, FLOW_CACHE6, FLOW_COPY4,
    FLOW_COPY6, KEY_SCRATCH4, MAGLEV, MAGLEV6, NAT_PROBE4, NAT_PROBE6, NAT4, NAT6, NEXTHOP4,
    NEXTHOP6, PROXY_PENDING4, PROXY_PENDING6,
    csum::Delta,
    mem,
    parse::{Ipv6Raw, Pkt, ptr_at, wire6},
    policy,
};

/// The conntrack entry at `entry` copied into this CPU's slot of `copies`.
#[inline(always)]
fn copy_out<A: Copy>(copies: &PerCpuArray<Flow<A>>, entry: *mut Flow<A>) -> &'static Flow<A> {
    match copies.get_ptr_mut(0) {
        // SAFETY: per-CPU value, no concurrent user; `entry` is from a successful lookup.
        Some(c) => unsafe {
            mem::copy(&mut *c, &*entry);
            &*c
        },
        // SAFETY: as above (slot 0 of an array is always there: never taken).
        None => unsafe { &*entry },
    }
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

pub trait Family: Copy + PartialEq + Default + 'static {
    /// Address family for `bpf_fib_lookup`.
    const AF: u8;
    /// Bytes of an address.
    const ADDR_LEN: usize;
    /// The PROXY protocol v2 family and protocol byte of a TCP connection (`TCP4`, `TCP6`).
    const PP2_TCP: u8;
    /// A copy of the conntrack entry at `entry` (from a successful lookup) that the packet's
    /// rewrite reads while other CPUs may write the entry, in this CPU's `FLOW_COPY4`/`FLOW_COPY6`
    /// (the programs' stacks have no room for it next to the PROXY paths' callbacks).
    fn snapshot(entry: *mut Flow<Self>) -> &'static Flow<Self>;
    /// Wire word `i` of the address (`i` below `ADDR_LEN / 4`).
    fn word(&self, i: usize) -> u32;
    /// This CPU's scratch conntrack key of the PROXY and connection-log paths (off the IPv6
    /// program's full stack).
    fn key_scratch() -> Option<&'static mut FlowKey<Self>>;
    /// Logged connections' counters of this family.
    fn conn_stats() -> &'static PerCpuHashMap<FlowKey<Self>, ConnStats<Self>>;
    /// This CPU's scratch of a new logged connection's counters.
    fn conn_new() -> Option<&'static mut ConnStats<Self>>;
    /// PROXY flows of this family whose header is unacknowledged.
    fn proxy_pending() -> &'static HashMap<FlowKey<Self>, ProxyPending>;
    /// Adds `by` bytes to the IP packet's length field (fixing the IPv4 header checksum).
    /// `None`: the header is out of reach.
    fn grow_l3(ctx: &XdpContext, l3_off: usize, by: u16) -> Option<()>;
    /// The conntrack map.
    fn ct() -> &'static HashMap<FlowKey<Self>, Flow<Self>>;
    /// The per-CPU state of a NAT port search.
    fn nat_probe() -> Option<&'static mut crate::probe::Probe<Self>>;
    /// The per-CPU flow cache in front of the conntrack map.
    fn flow_cache() -> &'static PerCpuArray<FlowCacheEntry<Self>>;
    /// The address folded to 32 bits (the identity for IPv4), for the flow hash.
    fn fold(self) -> u32;
    /// Service slot → Maglev table of this family's backend slots.
    fn maglev() -> &'static Array<MaglevTable>;
    /// The backend address in `slot`.
    fn backend(slot: u32) -> Option<Self>;
    /// Backend slot → the next hop of its last FIB lookup (per CPU).
    fn nexthops() -> &'static PerCpuArray<NextHop>;
    /// The NAT range in slot `slot` (a link's `nat_slot`): its `pick`-th address (modulo its
    /// size) and its port range. `None`: no range.
    fn nat_addr(slot: u32, pick: u32) -> Option<(Self, u16, u16)>;
    /// Whether `addr` is in the NAT range of provider network `network`.
    fn is_nat(network: u32, addr: Self) -> bool;
    /// Evaluates the link's compiled rules of this family against a new flow.
    fn security_groups(link: &LinkInfo, saddr: Self, dport: u16, proto: u8) -> Result<(), u32>;
    /// The endpoint (address, protocol, terminal port) in consumer network `network`.
    fn endpoint(network: u32, addr: Self, port_be: u16, proto: u8) -> Option<EndpointValue>;
    /// The endpoint address `addr` in consumer network `network`.
    fn endpoint_ip(network: u32, addr: Self) -> Option<EndpointIpValue>;
    /// Fills the addresses of a FIB lookup.
    fn fib_addrs(fib: &mut bpf_fib_lookup, src: Self, dst: Self);
    /// Writes the flow's addresses into the IP header (and decrements TTL or hop limit if asked,
    /// fixing the IPv4 header checksum). Returns the change of the addresses, which the L4
    /// checksum's pseudo-header sees. `None`: the header is out of reach.
    fn rewrite_l3(
        ctx: &XdpContext,
        p: &Pkt<Self>,
        flow: &Flow<Self>,
        dec_ttl: bool,
    ) -> Option<Delta>;
}

impl Family for u32 {
    const AF: u8 = AF_INET;
    const ADDR_LEN: usize = 4;
    const PP2_TCP: u8 = 0x11;

    #[inline(always)]
    fn snapshot(entry: *mut Flow<u32>) -> &'static Flow<u32> {
        copy_out(&FLOW_COPY4, entry)
    }

    #[inline(always)]
    fn word(&self, _i: usize) -> u32 {
        *self
    }

    #[inline(always)]
    fn key_scratch() -> Option<&'static mut FlowKey<u32>> {
        // SAFETY: per-CPU value; XDP programs do not nest on a CPU.
        KEY_SCRATCH4.get_ptr_mut(0).map(|k| unsafe { &mut *k })
    }

    #[inline(always)]
    fn proxy_pending() -> &'static HashMap<FlowKey<u32>, ProxyPending> {
        &PROXY_PENDING4
    }

    #[inline(always)]
    fn conn_stats() -> &'static PerCpuHashMap<FlowKey<u32>, ConnStats<u32>> {
        &CONN_STATS4
    }

    #[inline(always)]
    fn conn_new() -> Option<&'static mut ConnStats<u32>> {
        // SAFETY: per-CPU value; XDP programs do not nest on a CPU.
        CONN_NEW4.get_ptr_mut(0).map(|c| unsafe { &mut *c })
    }

    #[inline(always)]
    fn grow_l3(ctx: &XdpContext, l3_off: usize, by: u16) -> Option<()> {
        let ip = ptr_at::<Ipv4Hdr>(ctx, l3_off)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let old = u16::from_ne_bytes(ip.tot_len);
        let new = (u16::from_be_bytes(ip.tot_len).wrapping_add(by)).to_be_bytes();
        ip.tot_len = new;
        ip.check = Delta::new()
            .u16(old, u16::from_ne_bytes(new))
            .apply(u16::from_ne_bytes(ip.check))
            .to_ne_bytes();
        Some(())
    }

    #[inline(always)]
    fn ct() -> &'static HashMap<FlowKey<u32>, Flow<u32>> {
        &CT4
    }

    #[inline(always)]
    fn nat_probe() -> Option<&'static mut crate::probe::Probe<u32>> {
        // SAFETY: per-CPU value; XDP programs do not nest on a CPU.
        NAT_PROBE4.get_ptr_mut(0).map(|p| unsafe { &mut *p })
    }

    #[inline(always)]
    fn flow_cache() -> &'static PerCpuArray<FlowCacheEntry<u32>> {
        &FLOW_CACHE4
    }

    #[inline(always)]
    fn fold(self) -> u32 {
        self
    }

    #[inline(always)]
    fn maglev() -> &'static Array<MaglevTable> {
        &MAGLEV
    }

    #[inline(always)]
    fn backend(slot: u32) -> Option<u32> {
        BACKENDS4.get(slot).map(|b| b.addr_be)
    }

    #[inline(always)]
    fn nexthops() -> &'static PerCpuArray<NextHop> {
        &NEXTHOP4
    }

    #[inline(always)]
    fn nat_addr(slot: u32, pick: u32) -> Option<(u32, u16, u16)> {
        match NAT4.get(slot) {
            Some(r) if r.count != 0 => Some((
                r.base.wrapping_add(pick % r.count).to_be(),
                r.port_min,
                r.port_max,
            )),
            _ => None,
        }
    }

    #[inline(always)]
    fn is_nat(network: u32, addr: u32) -> bool {
        match NAT4.get(network) {
            Some(r) => u32::from_be(addr).wrapping_sub(r.base) < r.count,
            None => false,
        }
    }

    #[inline(always)]
    fn security_groups(link: &LinkInfo, saddr: u32, dport: u16, proto: u8) -> Result<(), u32> {
        policy::security_groups4(link.rules_slot, saddr, dport, proto)
    }

    #[inline(always)]
    fn endpoint(network: u32, addr: u32, port_be: u16, proto: u8) -> Option<EndpointValue> {
        let key = EndpointKey4 {
            network_id: network,
            addr_be: addr,
            port_be,
            proto,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        unsafe { ENDPOINTS4.get(key) }.copied()
    }

    #[inline(always)]
    fn endpoint_ip(network: u32, addr: u32) -> Option<EndpointIpValue> {
        let key = EndpointIpKey4 {
            network_id: network,
            addr_be: addr,
        };
        // SAFETY: copied out at once.
        unsafe { ENDPOINT_IPS4.get(key) }.copied()
    }

    #[inline(always)]
    fn fib_addrs(fib: &mut bpf_fib_lookup, src: u32, dst: u32) {
        fib.__bindgen_anon_3.ipv4_src = src;
        fib.__bindgen_anon_4.ipv4_dst = dst;
    }

    #[inline(always)]
    fn rewrite_l3(
        ctx: &XdpContext,
        p: &Pkt<u32>,
        flow: &Flow<u32>,
        dec_ttl: bool,
    ) -> Option<Delta> {
        let ip = ptr_at::<Ipv4Hdr>(ctx, p.l3_off)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let addrs = Delta::new()
            .u32(p.saddr_be, flow.saddr_be)
            .u32(p.daddr_be, flow.daddr_be);
        let mut l3 = addrs;
        if dec_ttl {
            let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
            ip.ttl -= 1;
            l3 = l3.u16(old, u16::from_ne_bytes([ip.ttl, ip.proto]));
        }
        ip.src_addr = flow.saddr_be.to_ne_bytes();
        ip.dst_addr = flow.daddr_be.to_ne_bytes();
        ip.check = l3.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
        Some(addrs)
    }
}

impl Family for In6 {
    const AF: u8 = AF_INET6;
    const ADDR_LEN: usize = 16;
    const PP2_TCP: u8 = 0x21;

    #[inline(always)]
    fn snapshot(entry: *mut Flow<In6>) -> &'static Flow<In6> {
        copy_out(&FLOW_COPY6, entry)
    }

    #[inline(always)]
    fn word(&self, i: usize) -> u32 {
        self[i & 3]
    }

    #[inline(always)]
    fn key_scratch() -> Option<&'static mut FlowKey<In6>> {
        // SAFETY: per-CPU value; XDP programs do not nest on a CPU. The ICMPv6 error path, its
        // other user, never runs in the same packet.
        ERROR_KEY6.get_ptr_mut(0).map(|k| unsafe { &mut *k })
    }

    #[inline(always)]
    fn proxy_pending() -> &'static HashMap<FlowKey<In6>, ProxyPending> {
        &PROXY_PENDING6
    }

    #[inline(always)]
    fn conn_stats() -> &'static PerCpuHashMap<FlowKey<In6>, ConnStats<In6>> {
        &CONN_STATS6
    }

    #[inline(always)]
    fn conn_new() -> Option<&'static mut ConnStats<In6>> {
        // SAFETY: per-CPU value; XDP programs do not nest on a CPU.
        CONN_NEW6.get_ptr_mut(0).map(|c| unsafe { &mut *c })
    }

    #[inline(always)]
    fn grow_l3(ctx: &XdpContext, l3_off: usize, by: u16) -> Option<()> {
        let ip = ptr_at::<Ipv6Raw>(ctx, l3_off)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let len = u16::from_be_bytes([ip.head[4], ip.head[5]]).wrapping_add(by);
        [ip.head[4], ip.head[5]] = len.to_be_bytes();
        Some(())
    }

    #[inline(always)]
    fn ct() -> &'static HashMap<FlowKey<In6>, Flow<In6>> {
        &CT6
    }

    #[inline(always)]
    fn nat_probe() -> Option<&'static mut crate::probe::Probe<In6>> {
        // SAFETY: per-CPU value; XDP programs do not nest on a CPU.
        NAT_PROBE6.get_ptr_mut(0).map(|p| unsafe { &mut *p })
    }

    #[inline(always)]
    fn flow_cache() -> &'static PerCpuArray<FlowCacheEntry<In6>> {
        &FLOW_CACHE6
    }

    #[inline(always)]
    fn fold(self) -> u32 {
        self[0] ^ self[1].rotate_left(8) ^ self[2].rotate_left(16) ^ self[3].rotate_left(24)
    }

    #[inline(always)]
    fn maglev() -> &'static Array<MaglevTable> {
        &MAGLEV6
    }

    #[inline(always)]
    fn backend(slot: u32) -> Option<In6> {
        BACKENDS6.get(slot).map(|b| b.addr_be)
    }

    #[inline(always)]
    fn nexthops() -> &'static PerCpuArray<NextHop> {
        &NEXTHOP6
    }

    #[inline(always)]
    fn nat_addr(slot: u32, pick: u32) -> Option<(In6, u16, u16)> {
        match NAT6.get(slot) {
            Some(r) if r.count != 0 => {
                let mut a = r.base_be;
                a[3] = u32::from_be(a[3]).wrapping_add(pick % r.count).to_be();
                Some((a, r.port_min, r.port_max))
            }
            _ => None,
        }
    }

    #[inline(always)]
    fn is_nat(network: u32, addr: In6) -> bool {
        match NAT6.get(network) {
            Some(r) => {
                addr[0] == r.base_be[0]
                    && addr[1] == r.base_be[1]
                    && addr[2] == r.base_be[2]
                    && u32::from_be(addr[3]).wrapping_sub(u32::from_be(r.base_be[3])) < r.count
            }
            None => false,
        }
    }

    #[inline(always)]
    fn security_groups(link: &LinkInfo, saddr: In6, dport: u16, proto: u8) -> Result<(), u32> {
        policy::security_groups6(link.rules_slot6, saddr, dport, proto)
    }

    #[inline(always)]
    fn endpoint(network: u32, addr: In6, port_be: u16, proto: u8) -> Option<EndpointValue> {
        let key = EndpointKey6 {
            network_id: network,
            addr_be: addr,
            port_be,
            proto,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        unsafe { ENDPOINTS6.get(key) }.copied()
    }

    #[inline(always)]
    fn endpoint_ip(network: u32, addr: In6) -> Option<EndpointIpValue> {
        let key = EndpointIpKey6 {
            network_id: network,
            addr_be: addr,
        };
        // SAFETY: copied out at once.
        unsafe { ENDPOINT_IPS6.get(key) }.copied()
    }

    #[inline(always)]
    fn fib_addrs(fib: &mut bpf_fib_lookup, src: In6, dst: In6) {
        // SAFETY: writing a union field of plain integers.
        unsafe {
            mem::copy(&mut fib.__bindgen_anon_3.ipv6_src, &src);
            mem::copy(&mut fib.__bindgen_anon_4.ipv6_dst, &dst);
        }
    }

    #[inline(always)]
    fn rewrite_l3(
        ctx: &XdpContext,
        p: &Pkt<In6>,
        flow: &Flow<In6>,
        dec_ttl: bool,
    ) -> Option<Delta> {
        let ip = ptr_at::<Ipv6Raw>(ctx, p.l3_off)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let mut addrs = Delta::new();
        for i in 0..4 {
            addrs = addrs
                .u32(p.saddr_be[i], flow.saddr_be[i])
                .u32(p.daddr_be[i], flow.daddr_be[i]);
        }
        if dec_ttl {
            // No IPv6 header checksum to fix.
            ip.head[7] -= 1;
        }
        ip.src = wire6(flow.saddr_be);
        ip.dst = wire6(flow.daddr_be);
        Some(addrs)
    }
}
