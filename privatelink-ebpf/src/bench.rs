//! Programs for `cargo xtask bench` only; never attached by the agent.
//!
//! `traffic_gen` is a socket-free load generator: run through BPF_PROG_TEST_RUN in live-frames
//! mode on an interface, each run sends the input frame out of that interface (XDP_TX), as
//! xdp-trafficgen does (whose Debian build does not load on this kernel). Frames come back to the
//! generator's page pool as the forwarding left them (translated), so each run first writes the
//! frame's first [`GEN_HEAD`] bytes again from `GEN_FRAME`. With `GEN_FLOWS[0]` set, every frame
//! also gets a source (address, port) no earlier frame had, so every frame opens a new flow. `sink` counts and drops
//! every frame it sees: attached on the receiving side, it tells how many frames a forwarding
//! setup delivered, without a socket's cost in the measurement.
//!
//! `replay` makes the same rewrite and then tail-calls the program in `REPLAY_JUMP`: the datapath
//! gets a fresh copy of the frame on every run, so its paths can be measured with repeat > 1 (hot,
//! like the floor), the rewrite and the tail call being measured by replaying into the floor.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};

use crate::{GEN_FLOWS, GEN_FRAME, REPLAY_JUMP, SINK, csum::Delta, parse::ptr_at};

/// Bytes of the frame `traffic_gen` restores on every run: Ethernet, IPv4 and UDP headers (42) and
/// the first payload bytes.
pub const GEN_HEAD: usize = 48;

/// Source ports a new-flow sequence uses per source address (1024-65535).
const PORTS: u64 = 64_512;
/// Offsets in the frame (Ethernet, IPv4 without options, UDP): the IPv4 checksum, the second
/// word of the source address, the UDP source port.
const IP_CHECK: usize = 24;
const SRC_LOW: usize = 28;
const UDP_SPORT: usize = 34;

/// Restores the frame's head and sends it back out of the interface it is run on.
#[inline(always)]
pub fn generate(ctx: &XdpContext) -> u32 {
    rewrite_head(ctx);
    xdp_action::XDP_TX
}

/// Restores the frame's head and hands it to the program under measurement (`REPLAY_JUMP[0]`);
/// XDP_ABORTED when none is installed.
#[inline(always)]
pub fn replay(ctx: &XdpContext) -> u32 {
    rewrite_head(ctx);
    // SAFETY: ctx is the program's context; returns only when the call failed.
    unsafe { REPLAY_JUMP.tail_call(ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Writes the frame's head again from `GEN_FRAME` (frames shorter than [`GEN_HEAD`] stay as they
/// are) and, with `GEN_FLOWS[0]` set, gives it the next source of the new-flow sequence.
#[inline(always)]
fn rewrite_head(ctx: &XdpContext) {
    let Some(frame) = ptr_at::<[u8; GEN_HEAD]>(ctx, 0) else {
        return;
    };
    // SAFETY: bounds checked by ptr_at.
    let frame = unsafe { &mut *frame };
    if let Some(head) = GEN_FRAME.get(0) {
        // SAFETY: same size, plain bytes.
        *frame = unsafe { core::mem::transmute::<[u64; GEN_HEAD / 8], [u8; GEN_HEAD]>(*head) };
    }
    if let (Some(on), Some(next)) = (GEN_FLOWS.get(0), GEN_FLOWS.get_ptr_mut(1))
        && *on != 0
    {
        // SAFETY: one generator thread runs at a time.
        let n = unsafe { &mut *next };
        let port = (1024 + *n % PORTS) as u16;
        let old = u16::from_ne_bytes([frame[SRC_LOW], frame[SRC_LOW + 1]]);
        // The source address's last byte moves on after every 64,512 ports.
        let low = frame[SRC_LOW + 1].wrapping_add((*n / PORTS) as u8);
        *n += 1;
        let new = u16::from_ne_bytes([frame[SRC_LOW], low]);
        let check = Delta::new()
            .u16(old, new)
            .apply(u16::from_ne_bytes([frame[IP_CHECK], frame[IP_CHECK + 1]]))
            .to_ne_bytes();
        frame[IP_CHECK] = check[0];
        frame[IP_CHECK + 1] = check[1];
        frame[SRC_LOW + 1] = low;
        let [p0, p1] = port.to_be_bytes();
        frame[UDP_SPORT] = p0;
        frame[UDP_SPORT + 1] = p1;
    }
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
