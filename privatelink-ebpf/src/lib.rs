//! privatelink XDP datapath: the maps ([`maps`]) and the logic, one packet pipeline
//! ([`process`]) over the modules below. The objects are the binaries: `privatelink` (what the
//! agent loads: the entry points only) and `privatelink-bench` (the benchmark programs, built with
//! the `bench` feature and loaded only by the benchmarks).
#![no_std]
// `mem::atomic_add` writes the one BPF atomic instruction the datapath needs.
#![feature(asm_experimental_arch)]

mod arp;
mod connlog;
pub mod conntrack;
pub mod csum;
mod family;
mod flowcache;
mod flowsync;
mod forward;
mod icmp;
mod icmp6;
pub mod maps;
mod mem;
mod nat;
pub mod parse;
mod policy;
mod probe;
pub mod process;
mod proxy;
mod proxy_scratch;
pub mod stats;
mod verdict;

pub use maps::*;
// The benchmark object builds its floors from the same parse, lookups and counters: `conntrack`,
// `csum`, `parse`, `process` and `stats` are public for it; the rest is the pipeline's own.

/// Every object's panic handler (a verified program cannot panic; the handler only has to exist).
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Every object's licence (GPL-compatible: the datapath calls GPL-only helpers).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
