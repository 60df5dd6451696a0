//! The one result of the packet pipeline: what to do with the frame (an XDP action) and the outcome
//! code it is counted under (`privatelink-common`'s reasons). Every packet gets exactly one.
use aya_ebpf::bindings::xdp_action;

/// What to do with the packet, and the outcome code it is counted under.
pub struct Verdict {
    pub action: u32,
    pub outcome: u32,
}

impl Verdict {
    #[inline(always)]
    pub fn drop(reason: u32) -> Self {
        Verdict {
            action: xdp_action::XDP_DROP,
            outcome: reason,
        }
    }

    #[inline(always)]
    pub fn pass(outcome: u32) -> Self {
        Verdict {
            action: xdp_action::XDP_PASS,
            outcome,
        }
    }
}
