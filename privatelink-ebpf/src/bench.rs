//! Programs for `cargo xtask bench` only; never attached by the agent.
//!
//! `traffic_gen` is a socket-free load generator: run through BPF_PROG_TEST_RUN in live-frames
//! mode on an interface, each run sends the input frame out of that interface (XDP_TX), as
//! xdp-trafficgen does (whose Debian build does not load on this kernel). Frames come back to the
//! generator's page pool as the forwarding left them (translated), so each run first writes the
//! frame's first [`GEN_HEAD`] bytes again from `GEN_FRAME`. `sink` counts and drops
//! every frame it sees: attached on the receiving side, it tells how many frames a forwarding
//! setup delivered, without a socket's cost in the measurement.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};

use crate::{GEN_FRAME, SINK, parse::ptr_at};

/// Bytes of the frame `traffic_gen` restores on every run: Ethernet, IPv4 and UDP headers (42) and
/// the first payload bytes.
pub const GEN_HEAD: usize = 48;

/// Restores the frame's head from `GEN_FRAME` (frames shorter than [`GEN_HEAD`] go as they are)
/// and sends it back out of the interface it is run on.
#[inline(always)]
pub fn generate(ctx: &XdpContext) -> u32 {
    if let (Some(head), Some(frame)) = (GEN_FRAME.get(0), ptr_at::<[u64; GEN_HEAD / 8]>(ctx, 0)) {
        // SAFETY: bounds checked by ptr_at.
        unsafe { *frame = *head };
    }
    xdp_action::XDP_TX
}

/// Counts the frame and drops it.
#[inline(always)]
pub fn sink() -> u32 {
    if let Some(c) = SINK.get_ptr_mut(0) {
        // SAFETY: per-CPU value, no concurrent writer.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}
