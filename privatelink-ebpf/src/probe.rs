//! The NAT port search's state: the value of the per-CPU maps `NAT_PROBE4`/`NAT_PROBE6`. Types
//! only, so the maps and the search (`nat`) both import it without an import cycle.
use core::mem::MaybeUninit;

use aya_ebpf::helpers::bpf_get_prandom_u32;
use privatelink_common::{DatapathConfig, Flow, FlowKey};

/// A new flow in the making: its entry (the reply entry first, then the forward entry in the same
/// memory), and the NAT port search: the reply key with the port being tried, the clock and
/// timeouts that say whether a taken port's flow expired, and a xorshift sequence of ports
/// (seeded at most once per flow: one helper call, not one per try) scaled onto the range by a
/// multiply.
/// Lives in a per-CPU map (`NAT_PROBE4`/`NAT_PROBE6`), where the `bpf_loop` callback finds it,
/// and off the programs' stacks (the IPv6 one has no room for another key and entry).
#[repr(C)]
pub struct Probe<A> {
    pub(crate) flow: MaybeUninit<Flow<A>>,
    pub(crate) rkey: FlowKey<A>,
    pub(crate) cfg: DatapathConfig,
    pub(crate) now: u64,
    pub(crate) ports: Ports,
    /// [`CLAIMED`], or the drop reason the search ended with.
    pub(crate) result: u32,
}

/// A xorshift sequence of ports in `min..min + span`.
#[repr(C)]
pub(crate) struct Ports {
    pub(crate) state: u32,
    pub(crate) span: u32,
    pub(crate) min: u16,
    pub(crate) _pad: u16,
}

/// [`Probe::result`] of a search that wrote the reply entry.
pub(crate) const CLAIMED: u32 = 0;

impl Ports {
    /// Seeds the sequence: one helper call, made only once a random port is needed (a flow that
    /// keeps its consumer's port never pays it).
    #[inline(always)]
    pub(crate) fn seed(&mut self) {
        // SAFETY: helper without preconditions.
        let seed = unsafe { bpf_get_prandom_u32() };
        // xorshift never leaves zero.
        self.state = seed | 1;
    }

    #[inline(always)]
    pub(crate) fn next(&mut self) -> u16 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        self.min + ((x as u64 * self.span as u64) >> 32) as u16
    }
}
