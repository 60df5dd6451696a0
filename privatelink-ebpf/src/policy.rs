//! Admission of new flows: link state, allowlist, security groups (first match in priority order).
use privatelink_common::{
    ACTION_ACCEPT, AllowKey, DROP_LINK_INACTIVE, DROP_LINK_PENDING, DROP_LINK_REJECTED,
    DROP_NOT_ALLOWLISTED, DROP_SECURITY_GROUP, LINK_AVAILABLE, LINK_PENDING, LINK_REJECTED,
    LinkInfo, MAX_RULES, PROTO_ANY, RULES_NONE,
};

use crate::{ALLOWLIST, RULES4};

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

/// Evaluates the endpoint's compiled rule list against a new flow: first match decides, no match
/// drops, no list bound accepts. `dport` is the terminal port, host order.
#[inline(always)]
pub fn security_groups(slot: u32, saddr_be: u32, dport: u16, proto: u8) -> Result<(), u32> {
    if slot == RULES_NONE {
        return Ok(());
    }
    // A missing slot fails closed.
    let list = RULES4.get(slot).ok_or(DROP_SECURITY_GROUP)?;
    let count = list.count as usize;
    for i in 0..MAX_RULES {
        if i >= count {
            break;
        }
        // SAFETY: i < MAX_RULES, the array's length.
        let r = unsafe { list.rules.get_unchecked(i) };
        if (r.proto == PROTO_ANY || r.proto == proto)
            && saddr_be & r.mask_be == r.addr_be
            && dport >= r.port_lo
            && dport <= r.port_hi
        {
            return if r.action == ACTION_ACCEPT {
                Ok(())
            } else {
                Err(DROP_SECURITY_GROUP)
            };
        }
    }
    Err(DROP_SECURITY_GROUP)
}
