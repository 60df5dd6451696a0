//! The per-CPU flow cache in front of conntrack: a steady flow's packets read a direct-mapped
//! array slot (inlined by the verifier) instead of calling the hash table's lookup.
//!
//! A slot stands in for the conntrack entry only while the hash path would do nothing the cached
//! copy cannot: see `FlowCacheEntry` in `privatelink-common` for the conditions and why each one
//! keeps the translation exactly what the table holds. Everything else takes the table, and the
//! table's entry is copied back in afterwards, so the cache never decides anything on its own.
use privatelink_common::{
    CT_ESTABLISHED, DIR_FORWARD, DatapathConfig, FLOW_CACHE_FILLS, FLOW_CACHE_HITS,
    FLOW_CACHE_SLOTS, Flow, FlowCacheEntry, FlowKey, PROTO_TCP, PROTO_UDP, PROXY_PENDING,
};

use crate::{
    FLOW_CACHE_STATS,
    family::Family,
    mem,
    parse::{Pkt, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

/// A copy is trusted for at most this long after the table's `last_seen_ns` it carries: the
/// table's refresh interval (`conntrack::update` writes nothing sooner, so skipping the table
/// loses no write).
const MAX_AGE_NS: u64 = 1_000_000_000;

/// The slot of `key`: one multiply over the tuple folded to a word. Collisions only cost a miss.
#[inline(always)]
fn slot<A: Family>(key: &FlowKey<A>) -> u32 {
    let ports = ((key.sport_be as u32) << 16) | key.dport_be as u32;
    let x = key.saddr_be.fold()
        ^ key.daddr_be.fold().rotate_left(16)
        ^ ports
        ^ (key.network_id << 8)
        ^ key.proto as u32;
    x.wrapping_mul(0x9e37_79b1) >> (32 - FLOW_CACHE_SLOTS.trailing_zeros())
}

/// Whether a packet with these TCP flags leaves the flow's state as it is (UDP: always).
#[inline(always)]
fn stateless<A>(p: &Pkt<A>) -> bool {
    p.proto == PROTO_UDP || p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
}

/// The cached copy of `key`'s conntrack entry, if it may stand in for the table's for packet `p`.
/// This CPU's slot, read in place (only this CPU writes it).
#[inline(always)]
pub fn get<A: Family>(
    key: &FlowKey<A>,
    p: &Pkt<A>,
    now: u64,
    cfg: &DatapathConfig,
) -> Option<&'static FlowCacheEntry<A>> {
    if !stateless(p) {
        return None;
    }
    let e = A::flow_cache().get(slot(key))?;
    let f = &e.flow;
    // Cached TCP flows are established; a FIN or RST on another CPU can make the table's entry
    // closing behind the copy's back, so its timeout counts too.
    let timeout = if key.proto == PROTO_UDP {
        cfg.udp_timeout_ns
    } else {
        cfg.tcp_established_timeout_ns
            .min(cfg.tcp_closing_timeout_ns)
    };
    let age = now.saturating_sub(f.last_seen_ns);
    let fresh = age < MAX_AGE_NS && age < timeout / 2;
    let next_hop_current = f.dir != DIR_FORWARD || f.nh_generation == cfg.fib_generation;
    if e.generation != cfg.flow_generation || !fresh || !next_hop_current || !mem::same(&e.key, key)
    {
        return None;
    }
    stats::add_one(&FLOW_CACHE_STATS, FLOW_CACHE_HITS);
    Some(e)
}

/// Retires this CPU's copy of `key`'s flow, if its slot holds one: for a packet that took the
/// table's path and was not forwarded (its flow's entry may have changed all the same).
#[inline(always)]
pub fn retire<A: Family>(key: &FlowKey<A>) {
    if let Some(e) = A::flow_cache().get_ptr_mut(slot(key)) {
        // SAFETY: per-CPU value, no concurrent user.
        retire_in(unsafe { &mut *e }, key);
    }
}

/// Retires slot `e`'s copy if it is of `key`'s flow, by clearing its key's protocol (which no
/// packet's key has).
#[inline(always)]
fn retire_in<A: Family>(e: &mut FlowCacheEntry<A>, key: &FlowKey<A>) {
    if mem::same(&e.key, key) {
        e.key.proto = 0;
    }
}

/// Copies the table's entry for `key` (at `entry`, after the packet's own updates) into this
/// CPU's slot when it is a steady flow with a usable next hop, and otherwise retires the slot's
/// copy of the same flow: a SYN, FIN or RST changes the entry (a closing state; a tuple used
/// again makes a PROXY flow's header pending and settles its timestamps anew), and a copy of what
/// it was must not answer for the packets after it. `generation`: the config's `flow_generation`
/// as read before the table lookup, so that an entry the agent deletes in between is copied in
/// under a generation that is already gone.
#[inline(always)]
pub fn fill<A: Family>(key: &FlowKey<A>, entry: *const Flow<A>, generation: u32) {
    // SAFETY: pointer from a successful lookup; plain fields (see below for concurrent writers).
    let f = unsafe { &*entry };
    let steady =
        key.proto == PROTO_UDP || (key.proto == PROTO_TCP && f.tcp_state == CT_ESTABLISHED);
    let Some(e) = A::flow_cache().get_ptr_mut(slot(key)) else {
        return;
    };
    // SAFETY: per-CPU value, no concurrent user.
    let e = unsafe { &mut *e };
    // A PROXY flow whose header is pending needs the table's path (the header may be due).
    if !steady || f.egress_ifindex == 0 || f.flags & PROXY_PENDING != 0 {
        retire_in(e, key);
        return;
    }
    mem::copy(&mut e.flow, f);
    // Another CPU with a packet of the same flow may have written the entry during the copy (a
    // refreshed next hop, say): keep only a copy that still matches it, never a torn mix. Nothing
    // reads the slot meanwhile (only this CPU does, and XDP runs to completion); a torn copy is
    // retired by clearing its key's protocol, which no packet's key has.
    if !mem::same(&e.flow, f) {
        e.key.proto = 0;
        return;
    }
    mem::copy(&mut e.key, key);
    e.generation = generation;
    stats::add_one(&FLOW_CACHE_STATS, FLOW_CACHE_FILLS);
}
