//! `privatelink-bench`: the benchmark programs, an object of their own that only `cargo xtask
//! bench` and the bench-program tests load (feature `bench`). The agent's object
//! (`privatelink`) carries none of them. Shared datapath maps (conntrack, interfaces, config) are
//! the loaded datapath's own: the bench loader reuses them by pin, so `lookup_floor` reads the
//! same conntrack, and `replay` tail-calls the very program the agent loads.
#![no_std]
#![no_main]
// `atomic_xadd` and `atomic_cxchg` for the benchmark's shared counter and slot table (bench.rs):
// the BPF target has no atomic read-modify-write types.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod bench;
mod floors;

use aya_ebpf::{
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};

/// Benchmark baseline (`cargo xtask bench`): parse Ethernet/IPv4/L4 the same way, swap MACs, XDP_TX.
/// Not attached anywhere; it only gives the datapath's costs a floor measured in the same run.
#[xdp]
pub fn floor(ctx: XdpContext) -> u32 {
    floors::floor(&ctx)
}

/// Benchmark decomposition: the floor plus what every tracked packet pays first, the receiving
/// interface and one conntrack lookup of the frame's tuple. XDP_TX on a hit, XDP_PASS otherwise.
/// Not attached anywhere.
#[xdp]
pub fn lookup_floor(ctx: XdpContext) -> u32 {
    floors::lookup_floor(&ctx)
}

/// Benchmark decomposition: the floor plus the two slots a new flow would claim in an
/// open-addressing flow table (`SLOTS`), by compare-and-swap; see `bench.rs`. XDP_TX once both
/// are claimed, XDP_PASS otherwise. Not attached anywhere.
#[xdp]
pub fn slot_floor(ctx: XdpContext) -> u32 {
    floors::slot_floor(&ctx)
}

/// `slot_floor`'s table: one slot here, `privatelink_common::bench::SLOT_TABLE_ENTRIES` when the
/// bench loads the object (see the loader's `Sizes::bench_slots`).
#[map]
pub static SLOTS: Array<[u64; privatelink_common::bench::SLOT_WORDS]> =
    Array::with_max_entries(1, 0);

/// Benchmark generator's frame head, restored on every run (see `bench.rs`).
#[map]
pub static GEN_FRAME: Array<[u64; bench::GEN_HEAD / 8]> = Array::with_max_entries(1, 0);

/// Benchmark generator's new-flow switch and sequence: [on, frames numbered so far].
#[map]
pub static GEN_FLOWS: Array<u64> = Array::with_max_entries(2, 0);

/// Benchmark generator's window for short connections; see `privatelink_common::bench`.
#[map]
pub static GEN_WINDOW: Array<[u64; privatelink_common::bench::WINDOW_WORDS]> =
    Array::with_max_entries(1, 0);

/// Benchmark counters (per CPU): frames `sink` dropped (0), SYNs `responder` answered (1).
#[map]
pub static SINK: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(privatelink_common::bench::SINK_ENTRIES, 0);

/// Benchmark sink's clock (per CPU): its count and time at its first and latest sample; see
/// `privatelink_common::bench::CLOCK_WORDS`.
#[map]
pub static SINK_CLOCK: PerCpuArray<[u64; privatelink_common::bench::CLOCK_WORDS]> =
    PerCpuArray::with_max_entries(1, 0);

/// Benchmark load generator (`cargo xtask bench`), run in live-frames mode: see `bench.rs`.
#[xdp]
pub fn traffic_gen(ctx: XdpContext) -> u32 {
    bench::generate(&ctx)
}

/// Index 0: the program `replay` hands each frame to (the datapath or the floor); bench only.
#[map]
pub static REPLAY_JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Benchmark replay (`cargo xtask bench`): restores the frame, then tail-calls `REPLAY_JUMP[0]`,
/// so a path that rewrites the frame can run with repeat > 1: see `bench.rs`.
#[xdp]
pub fn replay(ctx: XdpContext) -> u32 {
    bench::replay(&ctx)
}

/// Benchmark responder (`cargo xtask bench`): answers TCP SYNs with SYN-ACKs and requests with
/// their echo in a backend's place, and drops the rest; see `bench.rs`.
#[xdp]
pub fn responder(ctx: XdpContext) -> u32 {
    bench::respond(&ctx)
}

/// Benchmark client (`cargo xtask bench`): completes short TCP connections in a client's place
/// (final ACK with a request, reset after the reply) and drops the rest; see `bench.rs`.
#[xdp]
pub fn acker(ctx: XdpContext) -> u32 {
    bench::ack(&ctx)
}

/// Benchmark sink (`cargo xtask bench`): counts and drops.
#[xdp]
pub fn sink(_ctx: XdpContext) -> u32 {
    bench::sink()
}
