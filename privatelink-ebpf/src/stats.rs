//! Counters: one global outcome per packet, per-link traffic and drops.
use aya_ebpf::{bindings::BPF_NOEXIST, maps::PerCpuArray};
use privatelink_common::{DIR_FORWARD, LinkDropKey, is_drop};

use crate::{GLOBAL_STATS, LINK_DROPS, LINK_STATS, verdict::Verdict};

/// Adds one to this CPU's counter `index` of `counters` and returns the new count (an index past
/// the end counts nothing and returns 0).
#[inline(always)]
pub fn add_one(counters: &PerCpuArray<u64>, index: u32) -> u64 {
    let Some(c) = counters.get_ptr_mut(index) else {
        return 0;
    };
    // SAFETY: per-CPU value, no concurrent writer.
    unsafe {
        *c += 1;
        *c
    }
}

#[inline(always)]
pub fn outcome(code: u32) {
    add_one(&GLOBAL_STATS, code);
}

#[inline(always)]
pub fn link_drop(link_id: u32, reason: u32) {
    let key = LinkDropKey { link_id, reason };
    match LINK_DROPS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, no concurrent writer.
        Some(c) => unsafe { *c += 1 },
        None => {
            // Full map: the global counter still has the drop.
            let _ = LINK_DROPS.insert(key, 1, BPF_NOEXIST as u64);
        }
    }
}

#[inline(always)]
pub fn link_new_conn(link_id: u32) {
    if let Some(s) = LINK_STATS.get_ptr_mut(link_id) {
        // SAFETY: per-CPU value, no concurrent writer.
        unsafe { (*s).new_conns += 1 };
    }
}

/// Accounts a packet of a known link by the verdict it got: traffic if it went on, a drop if not.
#[inline(always)]
pub fn link_packet(link_id: u32, dir: u8, bytes: u64, rst: bool, v: &Verdict) {
    if is_drop(v.outcome) {
        link_drop(link_id, v.outcome);
        return;
    }
    if let Some(s) = LINK_STATS.get_ptr_mut(link_id) {
        // SAFETY: per-CPU value, no concurrent writer.
        let s = unsafe { &mut *s };
        if dir == DIR_FORWARD {
            s.fwd_packets += 1;
            s.fwd_bytes += bytes;
        } else {
            s.rev_packets += 1;
            s.rev_bytes += bytes;
        }
        if rst {
            s.tcp_resets += 1;
        }
    }
}
