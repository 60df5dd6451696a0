//! Admission of new flows: link state, allowlist, security groups (first match in priority order).
use privatelink_common::{
    ACTION_ACCEPT, AllowKey, DROP_FLOW_LIMIT, DROP_LINK_INACTIVE, DROP_LINK_PENDING,
    DROP_LINK_REJECTED, DROP_NOT_ALLOWLISTED, DROP_SECURITY_GROUP, In6, LINK_AVAILABLE,
    LINK_PENDING, LINK_REJECTED, LinkInfo, MAX_RULES, PROTO_ANY, RULES_NONE,
};

use crate::{ALLOWLIST, LINK_OPENED, LINK_RETIRED, RULES4, RULES6};

/// The check every packet of a link passes (one array lookup was needed to get `link`).
#[inline(always)]
pub fn link_usable(link: &LinkInfo) -> Result<(), u32> {
    match link.state {
        LINK_AVAILABLE if link.allowed != 0 => Ok(()),
        LINK_AVAILABLE => Err(DROP_NOT_ALLOWLISTED),
        LINK_PENDING => Err(DROP_LINK_PENDING),
        LINK_REJECTED => Err(DROP_LINK_REJECTED),
        _ => Err(DROP_LINK_INACTIVE),
    }
}

/// The consumer account is on the service's allowlist.
#[inline(always)]
pub fn allowlisted(link: &LinkInfo) -> Result<(), u32> {
    let key = AllowKey {
        service_slot: link.service_slot,
        account: link.account,
    };
    // SAFETY: the value is not read.
    match unsafe { ALLOWLIST.get(key) } {
        Some(_) => Ok(()),
        None => Err(DROP_NOT_ALLOWLISTED),
    }
}

/// The link has room for one more flow under its limit (none: always). Live flows are the flows
/// admitted under the limit minus those the agent's last scan found ended, so a flow that ends
/// frees its place at the next scan. CPUs admitting at the same instant may pass the limit by one
/// flow each.
#[inline(always)]
pub fn under_flow_limit(link: &LinkInfo, link_id: u32) -> Result<(), u32> {
    if link.flow_limit == 0 {
        return Ok(());
    }
    let opened = LINK_OPENED.get(link_id).copied().unwrap_or(0);
    let retired = LINK_RETIRED.get(link_id).copied().unwrap_or(0);
    if opened.wrapping_sub(retired) >= link.flow_limit as u64 {
        return Err(DROP_FLOW_LIMIT);
    }
    Ok(())
}

/// Counts a flow the link admitted under its limit.
#[inline(always)]
pub fn count_opened(link: &LinkInfo, link_id: u32) {
    if link.flow_limit == 0 {
        return;
    }
    if let Some(c) = LINK_OPENED.get_ptr_mut(link_id) {
        // SAFETY: an aligned u64 of map memory that lives as long as the program runs.
        unsafe { crate::mem::atomic_add(c, 1) };
    }
}

/// First match in a compiled list decides; no match drops. `matches` says whether rule `i` matches.
#[inline(always)]
fn first_match(count: u32, matches: impl Fn(usize) -> Option<u8>) -> Result<(), u32> {
    let count = count as usize;
    for i in 0..MAX_RULES {
        if i >= count {
            break;
        }
        if let Some(action) = matches(i) {
            return if action == ACTION_ACCEPT {
                Ok(())
            } else {
                Err(DROP_SECURITY_GROUP)
            };
        }
    }
    Err(DROP_SECURITY_GROUP)
}

/// Evaluates an endpoint's compiled IPv4 rule list against a new flow: first match decides, no
/// match drops, no list bound accepts. `dport` is the terminal port, host order.
#[inline(always)]
pub fn security_groups4(slot: u32, saddr_be: u32, dport: u16, proto: u8) -> Result<(), u32> {
    if slot == RULES_NONE {
        return Ok(());
    }
    // A missing slot fails closed.
    let list = RULES4.get(slot).ok_or(DROP_SECURITY_GROUP)?;
    first_match(list.count, |i| {
        // SAFETY: i < MAX_RULES, the array's length.
        let r = unsafe { list.rules.get_unchecked(i) };
        ((r.proto == PROTO_ANY || r.proto == proto)
            && saddr_be & r.mask_be == r.addr_be
            && dport >= r.port_lo
            && dport <= r.port_hi)
            .then_some(r.action)
    })
}

/// [`security_groups4`] for IPv6 sources and the endpoint's IPv6 rule list.
#[inline(always)]
pub fn security_groups6(slot: u32, saddr_be: In6, dport: u16, proto: u8) -> Result<(), u32> {
    if slot == RULES_NONE {
        return Ok(());
    }
    let list = RULES6.get(slot).ok_or(DROP_SECURITY_GROUP)?;
    first_match(list.count, |i| {
        // SAFETY: i < MAX_RULES, the array's length.
        let r = unsafe { list.rules.get_unchecked(i) };
        ((r.proto == PROTO_ANY || r.proto == proto)
            && saddr_be[0] & r.mask_be[0] == r.addr_be[0]
            && saddr_be[1] & r.mask_be[1] == r.addr_be[1]
            && saddr_be[2] & r.mask_be[2] == r.addr_be[2]
            && saddr_be[3] & r.mask_be[3] == r.addr_be[3]
            && dport >= r.port_lo
            && dport <= r.port_hi)
            .then_some(r.action)
    })
}
