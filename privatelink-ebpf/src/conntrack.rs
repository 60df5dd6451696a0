//! Flow state: lookup with expiry, TCP state, refresh of both entries of a flow.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use privatelink_common::{
    CT_CLOSING, CT_ESTABLISHED, CT_SYN_RECV, CT_SYN_SENT, DIR_FORWARD, DIR_REPLY, DatapathConfig,
    Flow, FlowKey, PROTO_TCP,
};

use crate::{
    CONFIG, TICK_CLOCK,
    family::Family,
    parse::{Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// last_seen is written at most this often per flow (a write per packet would bounce cache lines).
const REFRESH_NS: u64 = 1_000_000_000;

/// Monotonic time at tick resolution: timeouts are seconds, and the coarse clock is a memory read
/// where the precise one reads the clocksource (costly under virtualisation). The coarse clock
/// only moves with the tick, so each CPU keeps the value it read with the jiffies it read it at,
/// and calls the helper again only once jiffies has moved on: one helper call per tick and CPU
/// instead of one per packet (`bpf_jiffies64` is a memory load the verifier inlines; a helper
/// call costs about 15 ns here). The value is at most one tick older than the helper's.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(c) = TICK_CLOCK.get_ptr_mut(0) else {
        // SAFETY: helper without preconditions.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: per-CPU value, no concurrent user.
    let c = unsafe { &mut *c };
    if c[0] == jiffies && c[1] != 0 {
        return c[1];
    }
    // SAFETY: helper without preconditions.
    let ns = unsafe { bpf_ktime_get_coarse_ns() };
    *c = [jiffies, ns];
    ns
}

#[inline(always)]
pub fn config() -> DatapathConfig {
    match CONFIG.get(0) {
        Some(c) if c.udp_timeout_ns != 0 => *c,
        _ => DatapathConfig::DEFAULT,
    }
}

#[inline(always)]
pub fn expired<A>(flow: &Flow<A>, proto: u8, now: u64, cfg: &DatapathConfig) -> bool {
    now.saturating_sub(flow.last_seen_ns) > cfg.timeout_for(proto, flow.tcp_state)
}

/// The live entry for `key`; an expired one counts as absent and is removed (its slot is free for
/// a new flow at once; the twin goes with its own lookup or the agent's sweep).
#[inline(always)]
pub fn lookup<A: Family>(key: &FlowKey<A>, now: u64, cfg: &DatapathConfig) -> Option<*mut Flow<A>> {
    let f = A::ct().get_ptr_mut(key)?;
    // SAFETY: pointer from a successful lookup.
    if expired(unsafe { &*f }, key.proto, now, cfg) {
        let _ = A::ct().remove(key);
        None
    } else {
        Some(f)
    }
}

/// Writes a flow key field by field into `key` (map scratch memory): a key built whole would take
/// a place on the stack first, which the IPv6 program has no room for.
#[inline(always)]
pub fn write_key<A: Family>(
    key: &mut FlowKey<A>,
    network_id: u32,
    (saddr_be, sport_be): (&A, u16),
    (daddr_be, dport_be): (&A, u16),
    proto: u8,
) {
    key.network_id = network_id;
    crate::mem::copy(&mut key.saddr_be, saddr_be);
    crate::mem::copy(&mut key.daddr_be, daddr_be);
    key.sport_be = sport_be;
    key.dport_be = dport_be;
    key.proto = proto;
    key._pad0 = 0;
    key._pad1 = 0;
}

/// Advances TCP state and refreshes the flow (and its twin) for a packet that hit `flow`.
#[inline(always)]
pub(crate) fn update<A: Family>(flow: *mut Flow<A>, p: &Pkt<A>, now: u64) {
    // SAFETY: pointer from a successful lookup; concurrent updates of these plain fields are benign.
    let flow = unsafe { &mut *flow };
    let old = flow.tcp_state;
    let mut state = old;
    if p.proto == PROTO_TCP {
        let f = p.tcp_flags;
        if f & (TCP_FIN | TCP_RST) != 0 {
            state = CT_CLOSING;
        } else if old == CT_SYN_SENT && flow.dir == DIR_REPLY {
            // The backend answered; the handshake is complete once the consumer acknowledges.
            state = CT_SYN_RECV;
        } else if old == CT_SYN_RECV
            && flow.dir == DIR_FORWARD
            && f & (TCP_SYN | TCP_ACK) == TCP_ACK
        {
            state = CT_ESTABLISHED;
        } else if old == CT_CLOSING && flow.dir == DIR_FORWARD && f & (TCP_SYN | TCP_ACK) == TCP_SYN
        {
            // The consumer reuses the tuple for a new connection: keep the mapping, restart.
            state = CT_SYN_SENT;
        }
    }
    if state == old && now.saturating_sub(flow.last_seen_ns) < REFRESH_NS {
        return;
    }
    flow.tcp_state = state;
    flow.last_seen_ns = now;
    if flow.dir == DIR_FORWARD {
        // Re-resolve the cached next hop with the next packet: staleness stays under a second
        // even if nobody bumps the FIB generation.
        flow.egress_ifindex = 0;
    }
    // Both entries live and die together, so a one-way stream keeps its reply mapping reserved.
    let twin = flow.twin_key(p.proto);
    if let Some(t) = A::ct().get_ptr_mut(twin) {
        // SAFETY: pointer from a successful lookup.
        unsafe {
            (*t).tcp_state = state;
            (*t).last_seen_ns = now;
        }
    }
    if state != old {
        crate::flowsync::emit(&twin);
    }
}
