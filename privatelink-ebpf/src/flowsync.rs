//! Flow-state sync's datapath half: an event into the `FLOW_SYNC` ring buffer when a flow is made
//! and when its TCP state changes, so that the agent sends it to the group's peers at once rather
//! than at its next read of the table (a flow made just before a crash would otherwise be missing
//! on the node that takes over, and stall there). Nothing per packet of an established flow, and
//! nothing at all unless the agent switched the sync on. A full ring loses the event (counted in
//! `FLOW_SYNC_STATS`); the agent's periodic copy of the table carries that flow later.
use privatelink_common::{FLOW_SYNC_LOST, FlowEvent, FlowKey};

use crate::{FLOW_SYNC, FLOW_SYNC_ON, FLOW_SYNC_STATS, family::Family, mem, stats};

/// Tells the agent about the flow under `key` (either of its entries).
#[inline(always)]
pub fn emit<A: Family>(key: &FlowKey<A>) {
    if !matches!(FLOW_SYNC_ON.get(0), Some(&on) if on != 0) {
        return;
    }
    let Some(mut e) = FLOW_SYNC.reserve::<FlowEvent<A>>(0) else {
        stats::add_one(&FLOW_SYNC_STATS, FLOW_SYNC_LOST);
        return;
    };
    let r = e.as_mut_ptr();
    // SAFETY: the reserved record is ours until submitted; every field is written.
    unsafe {
        (*r).family = if A::ADDR_LEN == 4 { 4 } else { 6 };
        (*r)._pad0 = 0;
        (*r)._pad1 = 0;
        mem::copy(&mut (*r).key, key);
    }
    e.submit(0);
}
