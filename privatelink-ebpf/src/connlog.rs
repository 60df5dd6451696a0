//! The connection log's datapath half: a record into the `CONN_LOG` ring buffer when a flow of a
//! logging link is made, and that flow's counters (packets and bytes each way, FIN and RST seen)
//! in `CONN_STATS4`/`CONN_STATS6` for as long as it lives. The agent reads the ring, and writes a
//! connection's closing record when its sweep finds the flow gone (see `datapath::connlog` in the
//! agent). Counters, not logs: a full ring or table is counted in `CONN_LOG_STATS`. The counters
//! are per CPU (no atomic add per packet); the agent sums them.
use aya_ebpf::bindings::BPF_ANY;
use privatelink_common::{
    CONN_FIN_BACKEND, CONN_FIN_CONSUMER, CONN_LOG_LOST, CONN_LOG_UNCOUNTED, CONN_LOG_WRITTEN,
    CONN_RST, ConnOpened, ConnStats, DIR_FORWARD, Flow, FlowKey, PROTO_TCP,
};

use crate::{
    CONN_LOG, CONN_LOG_STATS, conntrack,
    family::Family,
    mem,
    parse::{Pkt, TCP_FIN, TCP_RST},
    stats,
};

/// Logs new flow `flow` (the forward entry, just made) of packet `p` under forward key `key`;
/// `sent`: the packet's length as it left, when it did (it is then counted).
#[inline(always)]
pub fn open<A: Family>(key: &FlowKey<A>, p: &Pkt<A>, flow: &Flow<A>, now: u64, sent: Option<u64>) {
    if let Some(c) = A::conn_new() {
        // SAFETY: plain-old-data, all zeroes is valid.
        unsafe { mem::zero(c) };
        c.opened_ns = now;
        if let Some(bytes) = sent {
            c.fwd_packets = 1;
            c.fwd_bytes = bytes;
        }
        mem::copy(&mut c.nat_be, &flow.saddr_be);
        mem::copy(&mut c.backend_be, &flow.daddr_be);
        c.nat_port_be = flow.sport_be;
        c.backend_port_be = flow.dport_be;
        c.link_id = flow.link_id;
        // From map memory, by reference (a copy would take the IPv6 program's stack).
        let value: &ConnStats<A> = c;
        if A::conn_stats().insert(key, value, BPF_ANY as u64).is_err() {
            stats::add_one(&CONN_LOG_STATS, CONN_LOG_UNCOUNTED);
        }
    }
    let Some(mut e) = CONN_LOG.reserve::<ConnOpened>(0) else {
        stats::add_one(&CONN_LOG_STATS, CONN_LOG_LOST);
        return;
    };
    let r = e.as_mut_ptr();
    // SAFETY: the reserved record is ours until submitted; every field is written.
    unsafe {
        (*r).time_ns = now;
        (*r).link_id = flow.link_id;
        (*r).family = if A::ADDR_LEN == 4 { 4 } else { 6 };
        (*r).proto = p.proto;
        (*r)._pad = 0;
        for i in 0..4 {
            let words = A::ADDR_LEN / 4;
            let w = |a: &A| if i < words { a.word(i) } else { 0 };
            (*r).consumer_be[i] = w(&p.saddr_be);
            (*r).endpoint_be[i] = w(&p.daddr_be);
            (*r).nat_be[i] = w(&flow.saddr_be);
            (*r).backend_be[i] = w(&flow.daddr_be);
        }
        (*r).consumer_port_be = p.sport_be;
        (*r).endpoint_port_be = p.dport_be;
        (*r).nat_port_be = flow.sport_be;
        (*r).backend_port_be = flow.dport_be;
    }
    e.submit(0);
    stats::add_one(&CONN_LOG_STATS, CONN_LOG_WRITTEN);
}

/// Counts packet `p` (`bytes` long) of logged flow `flow` in interface network `network_id`.
#[inline(always)]
pub fn count<A: Family>(network_id: u32, p: &Pkt<A>, flow: &Flow<A>, bytes: u64) {
    let Some(k) = A::key_scratch() else {
        return;
    };
    // The forward key: the packet's own tuple on the consumer side, the twin's on the other.
    if flow.dir == DIR_FORWARD {
        conntrack::write_key(
            k,
            network_id,
            (&p.saddr_be, p.sport_be),
            (&p.daddr_be, p.dport_be),
            p.proto,
        );
    } else {
        conntrack::write_key(
            k,
            flow.peer_network,
            (&flow.daddr_be, flow.dport_be),
            (&flow.saddr_be, flow.sport_be),
            p.proto,
        );
    }
    let k: &FlowKey<A> = k;
    let Some(c) = A::conn_stats().get_ptr_mut(k) else {
        return;
    };
    let forward = flow.dir == DIR_FORWARD;
    // SAFETY: pointer from a successful lookup: this CPU's value, no concurrent writer.
    unsafe {
        if forward {
            (*c).fwd_packets += 1;
            (*c).fwd_bytes += bytes;
        } else {
            (*c).rev_packets += 1;
            (*c).rev_bytes += bytes;
        }
        if p.proto == PROTO_TCP && p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            let bit = if p.tcp_flags & TCP_RST != 0 {
                CONN_RST
            } else if forward {
                CONN_FIN_CONSUMER
            } else {
                CONN_FIN_BACKEND
            };
            (*c).ended |= bit;
        }
    }
}
