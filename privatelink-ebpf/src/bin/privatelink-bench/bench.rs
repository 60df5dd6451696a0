//! Programs for `cargo xtask bench` only; never attached by the agent.
//!
//! `traffic_gen` is a socket-free load generator: run through BPF_PROG_TEST_RUN in live-frames
//! mode on an interface, each run sends the input frame out of that interface (XDP_TX), as
//! xdp-trafficgen does (whose Debian build does not load on this kernel). Frames come back to the
//! generator's page pool as the forwarding left them (translated), so each run first writes the
//! frame's first [`GEN_HEAD`] bytes again from `GEN_FRAME`. With `GEN_FLOWS[0]` set, every frame
//! also gets a source (address, port) no earlier frame had, so every frame opens a new flow. `sink` counts and drops
//! every frame it sees: attached on the receiving side, it tells how many frames a forwarding
//! setup delivered, without a socket's cost in the measurement. `responder` and `acker` stand in
//! for a server and a client of short TCP connections (handshake, request, reply, reset), so
//! connections can cross a node with no socket at either end; with a window set (`GEN_WINDOW`),
//! the generator keeps at most so many of them pending, like a client pool.
//!
//! `replay` makes the same rewrite and then tail-calls the program in `REPLAY_JUMP`: the datapath
//! gets a fresh copy of the frame on every run, so its paths can be measured with repeat > 1 (hot,
//! like the floor). The bench takes the rewrite's and the tail call's cost on the one path that
//! can run both ways (the unknown destination: replayed minus run directly).
//!
//! `slot_floor` is the floor plus the memory traffic of a new flow in an open-addressing flow
//! table (`SLOTS`, as many 64-byte slots as the conntrack has entries): it claims one slot for
//! the forward tuple and one for the reply tuple by compare-and-swap, as a conntrack not built on
//! the kernel's hash map would. Run with fresh tuples, it measures what such a design could cost
//! a new flow at least, against the real new flow's two hash inserts.
use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
pub use privatelink_common::bench::GEN_HEAD;
use privatelink_common::bench::{
    CLOCK_EVERY, CLOCK_FIRST_COUNT, CLOCK_FIRST_NS, CLOCK_LAST_COUNT, CLOCK_LAST_NS, SINK_COUNTED,
    SINK_RESPONDED, SLOT_PROBES, SLOT_TABLE_ENTRIES, SLOT_WORDS, WINDOW_DONE, WINDOW_FIRST_NS,
    WINDOW_LAST_NS, WINDOW_LIMIT, WINDOW_SENT, WINDOW_TOTAL,
};

use privatelink_ebpf::{
    csum::Delta,
    parse::{Ip4, ptr_at},
    stats,
};

use crate::{GEN_FLOWS, GEN_FRAME, GEN_WINDOW, REPLAY_JUMP, SINK, SINK_CLOCK, SLOTS};

/// Source ports a new-flow sequence uses per source address (1024-65535).
const PORTS: u64 = 64_512;
/// Offsets in the frame (Ethernet, IPv4 without options, then UDP or TCP): the IPv4 protocol and
/// checksum, the second word of the source address, the L4 source port, the UDP and the TCP
/// checksum, and the TCP sequence number, acknowledgement number, header length and flags.
const IP_PROTO: usize = 23;
const IP_CHECK: usize = 24;
const SRC_LOW: usize = 28;
const L4_SPORT: usize = 34;
const UDP_CHECK: usize = 40;
const TCP_SEQ: usize = 38;
const TCP_ACK_NO: usize = 42;
const TCP_DOFF: usize = 46;
const TCP_FLAGS: usize = 47;
const TCP_CHECK: usize = 50;
/// The IPv4 total length.
const IP_LEN: usize = 16;
/// IP protocol numbers, and TCP flags.
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
/// The responder's initial sequence number (any value does).
const RESPONDER_ISN: u32 = 0x5eed_0001;

/// Restores the frame's head and sends it back out of the interface it is run on, or drops it
/// unsent while the window (see [`window_admits`]) is full.
#[inline(always)]
pub fn generate(ctx: &XdpContext) -> u32 {
    if !window_admits() {
        return xdp_action::XDP_DROP;
    }
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

/// Stands in for a TCP server (with the generator's SYNs, a backend): a SYN is answered with its
/// SYN-ACK (counted in `SINK[1]`), a request with its echo, a FIN with a reset. Every answer goes
/// back out of the interface the segment came in on; anything else is dropped. With it in a
/// backend's place, connections cross the forwarding both ways without a socket.
#[inline(always)]
pub fn respond(ctx: &XdpContext) -> u32 {
    answer(ctx, End::Server)
}

/// Stands in for a TCP client making short connections (connect, request, reply, abortive close,
/// as the comparison's socket clients do): a SYN-ACK is answered with the final ACK carrying a
/// request (the SYN-ACK's option bytes, as payload), the reply with a reset, which completes the
/// connection (counted in the generator's window, `GEN_WINDOW`), a FIN with a reset.
#[inline(always)]
pub fn ack(ctx: &XdpContext) -> u32 {
    answer(ctx, End::Client)
}

/// Which end of a connection [`answer`] plays.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Server,
    Client,
}

/// The responder's and the acker's common part: answers a TCP segment (Ethernet, IPv4 without
/// options) as `end` would, with MACs, addresses and ports swapped and the checksum kept valid.
#[inline(always)]
fn answer(ctx: &XdpContext, end: End) -> u32 {
    let Some(frame) = ptr_at::<[u8; 54]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at.
    let f = unsafe { &mut *frame };
    if f[12] != 0x08 || f[13] != 0x00 || f[14] != 0x45 || f[IP_PROTO] != PROTO_TCP {
        return xdp_action::XDP_DROP;
    }
    let header = u32::from(f[TCP_DOFF] >> 4) * 4;
    let ip_len = u32::from(u16::from_be_bytes([f[IP_LEN], f[IP_LEN + 1]]));
    if header < 20 || ip_len < 20 + header {
        return xdp_action::XDP_DROP;
    }
    let payload = ip_len - 20 - header;
    let flags = f[TCP_FLAGS];
    let seq = u32::from_be(get32(f, TCP_SEQ));
    let ack = u32::from_be(get32(f, TCP_ACK_NO));
    // (flags, sequence number, acknowledgement number, header bytes) of the answer: a SYN-ACK
    // or a reply continues at the number the segment acknowledged, a SYN-ACK's SYN starts a
    // sequence of its own.
    let (reply, new_seq, new_ack, new_header) = match (flags & (SYN | ACK | RST | FIN), end) {
        (SYN, End::Server) => (SYN | ACK, RESPONDER_ISN, seq.wrapping_add(1), header),
        // The final ACK carries the request: with the header cut to 20 bytes, the SYN-ACK's
        // option bytes become its payload, and the frame keeps its length.
        (x, End::Client) if x == SYN | ACK && header > 20 => {
            (ACK | PSH, ack, seq.wrapping_add(1), 20)
        }
        (x, _) if x == FIN | ACK => (RST | ACK, ack, seq.wrapping_add(payload + 1), header),
        (ACK, End::Server) if payload > 0 => (ACK | PSH, ack, seq.wrapping_add(payload), header),
        (ACK, End::Client) if payload > 0 => (RST | ACK, ack, seq.wrapping_add(payload), header),
        _ => return xdp_action::XDP_DROP,
    };
    // Swapping the MACs, the addresses (pseudo-header) and the ports leaves both sums as they
    // are; the sequence and acknowledgement numbers, the header length and the flags change.
    for i in 0..6 {
        f.swap(i, 6 + i);
    }
    for i in 0..4 {
        f.swap(26 + i, 30 + i);
    }
    for i in 0..2 {
        f.swap(L4_SPORT + i, L4_SPORT + 2 + i);
    }
    let (old_seq, old_ack) = (get32(f, TCP_SEQ), get32(f, TCP_ACK_NO));
    let (new_seq, new_ack) = (new_seq.to_be(), new_ack.to_be());
    let old_word = get16(f, TCP_DOFF);
    f[TCP_DOFF] = ((new_header / 4) as u8) << 4 | (f[TCP_DOFF] & 0x0f);
    f[TCP_FLAGS] = reply;
    let d = Delta::new()
        .u32(old_seq, new_seq)
        .u32(old_ack, new_ack)
        .u16(old_word, get16(f, TCP_DOFF));
    put32(f, TCP_SEQ, new_seq);
    put32(f, TCP_ACK_NO, new_ack);
    put16(f, TCP_CHECK, d.apply(get16(f, TCP_CHECK)));
    if reply == SYN | ACK {
        stats::add_one(&SINK, SINK_RESPONDED);
    } else if end == End::Client && flags & FIN == 0 && reply & RST != 0 {
        connection_done();
    }
    xdp_action::XDP_TX
}

/// Admits the generator's next frame under its window (`GEN_WINDOW`): with a limit set, at most
/// that many connections pending (sent, not yet completed by the acker) and at most the total.
/// The first admitted frame's time is kept.
#[inline(always)]
fn window_admits() -> bool {
    let Some(w) = GEN_WINDOW.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a map value; one generator runs at a time, the acker only adds to `WINDOW_DONE`
    // and writes `WINDOW_LAST_NS`.
    let w = unsafe { &mut *w };
    if w[WINDOW_LIMIT] == 0 {
        return true;
    }
    // SAFETY: an aligned u64 of map memory that the acker adds to atomically.
    let done = unsafe { core::ptr::read_volatile(&w[WINDOW_DONE]) };
    let sent = w[WINDOW_SENT];
    if sent >= w[WINDOW_TOTAL] || sent.wrapping_sub(done) >= w[WINDOW_LIMIT] {
        return false;
    }
    if sent == 0 {
        // SAFETY: the helper has no preconditions.
        w[WINDOW_FIRST_NS] = unsafe { bpf_ktime_get_ns() };
    }
    w[WINDOW_SENT] = sent + 1;
    true
}

/// A connection the generator started has completed: one less pending, and its time kept.
#[inline(always)]
fn connection_done() {
    let Some(w) = GEN_WINDOW.get_ptr_mut(0) else {
        return;
    };
    // An atomic add (BPF_ATOMIC): the acker may run on any CPU. The target has no atomic types
    // with read-modify-write operations, so the intrinsic is called directly.
    // SAFETY: an aligned u64 of map memory.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&mut (*w)[WINDOW_DONE], 1) };
    // SAFETY: as above; a plain store, the latest completion's time wins.
    unsafe { (*w)[WINDOW_LAST_NS] = bpf_ktime_get_ns() };
}

/// Counts the frame and drops it; on every [`CLOCK_EVERY`]th frame of this CPU, samples the
/// clock (`SINK_CLOCK`): the first sample since the loader zeroed it, or the latest.
#[inline(always)]
pub fn sink() -> u32 {
    let n = stats::add_one(&SINK, SINK_COUNTED);
    if n & (CLOCK_EVERY - 1) == 0
        && let Some(c) = SINK_CLOCK.get_ptr_mut(0)
    {
        // SAFETY: per-CPU value, no concurrent writer.
        let c = unsafe { &mut *c };
        // SAFETY: the helper has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        if c[CLOCK_FIRST_NS] == 0 {
            c[CLOCK_FIRST_COUNT] = n;
            c[CLOCK_FIRST_NS] = now;
        } else {
            c[CLOCK_LAST_COUNT] = n;
            c[CLOCK_LAST_NS] = now;
        }
    }
    xdp_action::XDP_DROP
}

/// Salt of the reply tuple's hash: the reply entry is keyed by the backend's tuple towards a NAT
/// address, which the floor does not allocate; any other hash of the tuple is as cold.
const REPLY_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// Claims the forward and the reply slot of a new flow with tuple `p` in `SLOTS` (see the module
/// documentation). False when a tuple found no free slot within [`SLOT_PROBES`] (the table is
/// full there, or the bench did not size it).
#[inline(always)]
pub fn claim_flow_slots(p: &Ip4) -> bool {
    let ports = (u64::from(p.sport_be) << 16) | u64::from(p.dport_be);
    let fwd = (u64::from(p.saddr_be) << 32) | u64::from(p.daddr_be);
    let rev = (u64::from(p.daddr_be) << 32) | u64::from(p.saddr_be);
    let proto = u64::from(p.proto);
    claim(mix(fwd, (ports << 8) | proto), fwd, ports)
        && claim(mix(rev ^ REPLY_SALT, (ports << 8) | proto), rev, ports)
}

/// A 64-bit hash of two words (multiply and xor-shift rounds): a few instructions, no helper.
#[inline(always)]
fn mix(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 29)
}

/// Takes the first free slot from `hash`'s on: word 0 goes from 0 (free) to the hash's tag by
/// compare-and-swap, so two CPUs never take one slot; then the rest of the line is written, as a
/// flow entry would be.
#[inline(always)]
fn claim(hash: u64, tuple: u64, ports: u64) -> bool {
    let tag = hash | 1;
    let mut i = 0u32;
    while i < SLOT_PROBES {
        let index = (hash as u32).wrapping_add(i) & (SLOT_TABLE_ENTRIES - 1);
        let Some(slot) = SLOTS.get_ptr_mut(index) else {
            return false;
        };
        // BPF_ATOMIC compare-and-exchange on map memory (the target has no atomic types).
        // SAFETY: an aligned u64 of map memory.
        let (_, won) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                &mut (*slot)[0],
                0,
                tag,
            )
        };
        if won {
            // SAFETY: the slot is this run's now; plain stores into its map memory.
            let s = unsafe { &mut *slot };
            s[1] = tuple;
            s[2] = ports;
            let mut w = 3;
            while w < SLOT_WORDS {
                s[w] = tag;
                w += 1;
            }
            return true;
        }
        i += 1;
    }
    false
}
