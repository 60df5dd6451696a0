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
//! like the floor). The bench takes the rewrite's and the tail call's cost on the one path that
//! can run both ways (the unknown destination: replayed minus run directly).
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};

use crate::{GEN_FLOWS, GEN_FRAME, REPLAY_JUMP, SINK, csum::Delta, parse::ptr_at};

/// Bytes of the frame `traffic_gen` restores on every run: Ethernet, IPv4 and TCP headers (54, or
/// 42 with UDP) and the first bytes after them.
pub const GEN_HEAD: usize = 56;

/// Source ports a new-flow sequence uses per source address (1024-65535).
const PORTS: u64 = 64_512;
/// Offsets in the frame (Ethernet, IPv4 without options, then UDP or TCP): the IPv4 protocol and
/// checksum, the second word of the source address, the L4 source port, the UDP and the TCP
/// checksum, and the TCP sequence number, acknowledgement number and flags.
const IP_PROTO: usize = 23;
const IP_CHECK: usize = 24;
const SRC_LOW: usize = 28;
const L4_SPORT: usize = 34;
const UDP_CHECK: usize = 40;
const TCP_SEQ: usize = 38;
const TCP_ACK_NO: usize = 42;
const TCP_FLAGS: usize = 47;
const TCP_CHECK: usize = 50;
/// IP protocol numbers, and the TCP flags a SYN and its answer carry.
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
/// The responder's initial sequence number (any value does).
const RESPONDER_ISN: u32 = 0x5eed_0001;

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
        // A plain `memcpy`, expanded inline (an assignment would be a `memmove` call, see `mem`).
        // SAFETY: the same number of bytes; the map value and the frame are distinct memory.
        unsafe {
            core::ptr::copy_nonoverlapping(head.as_ptr().cast::<u8>(), frame.as_mut_ptr(), GEN_HEAD)
        };
    }
    if let (Some(on), Some(next)) = (GEN_FLOWS.get(0), GEN_FLOWS.get_ptr_mut(1))
        && *on != 0
    {
        // SAFETY: one generator thread runs at a time.
        let n = unsafe { &mut *next };
        let port = (1024 + *n % PORTS) as u16;
        let old = get16(frame, SRC_LOW);
        // The source address's last byte moves on after every 64,512 ports.
        let low = frame[SRC_LOW + 1].wrapping_add((*n / PORTS) as u8);
        *n += 1;
        let new = u16::from_ne_bytes([frame[SRC_LOW], low]);
        let addr = Delta::new().u16(old, new);
        put16(frame, IP_CHECK, addr.apply(get16(frame, IP_CHECK)));
        frame[SRC_LOW + 1] = low;
        // The L4 checksum covers the address (pseudo-header) and the port: kept valid, so a
        // kernel's conntrack takes the frame.
        let port = port.to_be_bytes();
        let l4 = addr.u16(get16(frame, L4_SPORT), u16::from_ne_bytes(port));
        frame[L4_SPORT] = port[0];
        frame[L4_SPORT + 1] = port[1];
        if frame[IP_PROTO] == PROTO_TCP {
            put16(frame, TCP_CHECK, l4.apply(get16(frame, TCP_CHECK)));
        } else if frame[IP_PROTO] == PROTO_UDP && get16(frame, UDP_CHECK) != 0 {
            let c = l4.apply(get16(frame, UDP_CHECK));
            put16(frame, UDP_CHECK, if c == 0 { 0xffff } else { c });
        }
    }
}

#[inline(always)]
fn get16<const N: usize>(b: &[u8; N], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn put16<const N: usize>(b: &mut [u8; N], at: usize, v: u16) {
    let v = v.to_ne_bytes();
    b[at] = v[0];
    b[at + 1] = v[1];
}

#[inline(always)]
fn get32<const N: usize>(b: &[u8; N], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Byte by byte: a slice copy may become a memcpy call.
#[inline(always)]
fn put32<const N: usize>(b: &mut [u8; N], at: usize, v: u32) {
    let v = v.to_ne_bytes();
    b[at] = v[0];
    b[at + 1] = v[1];
    b[at + 2] = v[2];
    b[at + 3] = v[3];
}

/// Answers a TCP SYN (Ethernet, IPv4 without options) with its SYN-ACK, sent back out of the
/// interface it came in on: MACs, addresses and ports swapped, acknowledging the SYN's sequence
/// number, the checksum kept valid. Anything else is dropped. With it in a backend's place, a
/// connection's setup crosses the forwarding both ways without a socket: a sink on the consumer
/// side counts the answers.
#[inline(always)]
pub fn respond(ctx: &XdpContext) -> u32 {
    let Some(frame) = ptr_at::<[u8; 54]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at.
    let f = unsafe { &mut *frame };
    if f[12] != 0x08
        || f[13] != 0x00
        || f[14] != 0x45
        || f[IP_PROTO] != PROTO_TCP
        || f[TCP_FLAGS] & (SYN | ACK) != SYN
    {
        return xdp_action::XDP_DROP;
    }
    // Swapping the MACs, the addresses (pseudo-header) and the ports leaves both sums as they
    // are; the sequence and acknowledgement numbers and the flags change.
    for i in 0..6 {
        f.swap(i, 6 + i);
    }
    for i in 0..4 {
        f.swap(26 + i, 30 + i);
    }
    for i in 0..2 {
        f.swap(L4_SPORT + i, L4_SPORT + 2 + i);
    }
    let seq = get32(f, TCP_SEQ);
    let ack = get32(f, TCP_ACK_NO);
    let new_seq = RESPONDER_ISN.to_be();
    let new_ack = u32::from_be(seq).wrapping_add(1).to_be();
    let old_flags = get16(f, TCP_FLAGS - 1);
    f[TCP_FLAGS] = SYN | ACK;
    let d = Delta::new()
        .u32(seq, new_seq)
        .u32(ack, new_ack)
        .u16(old_flags, get16(f, TCP_FLAGS - 1));
    put32(f, TCP_SEQ, new_seq);
    put32(f, TCP_ACK_NO, new_ack);
    put16(f, TCP_CHECK, d.apply(get16(f, TCP_CHECK)));
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
