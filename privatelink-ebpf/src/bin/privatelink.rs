//! `privatelink`: the object the agent loads. Entry points only: the pipeline and the maps live
//! in the library.
#![no_std]
#![no_main]

use aya_ebpf::{macros::xdp, programs::XdpContext};
use privatelink_ebpf::process;

/// The datapath: attached to every consumer- and provider-facing interface. Inlined into the
/// macro's entry point: past a size LLVM stops inlining it on its own, and the whole program then
/// sits behind a BPF-to-BPF call (a call and a return per packet).
#[xdp]
#[inline(always)]
pub fn privatelink(ctx: XdpContext) -> u32 {
    process::process(&ctx)
}

/// The IPv6 datapath, entered only by tail call from `privatelink`. Inlined like `privatelink`.
#[xdp]
#[inline(always)]
pub fn privatelink6(ctx: XdpContext) -> u32 {
    process::process6(&ctx)
}

/// Attached to veth peers that receive redirected frames (veth delivers XDP_REDIRECT only to a peer
/// with an XDP program). Passes everything.
#[xdp]
pub fn pass(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}
