//! privatelink XDP datapath: entry points and maps. The logic lives in the modules.
//!
//! Every map is described at its declaration; keys and values are defined in `privatelink-common`.
#![no_std]
#![no_main]
// `atomic_xadd` and `atomic_cxchg` for the benchmark's shared counter and slot table (bench.rs):
// the BPF target has no atomic read-modify-write types.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod arp;
mod bench;
mod conntrack;
mod csum;
mod family;
mod flowcache;
mod forward;
mod icmp;
mod icmp6;
mod mem;
mod nat;
mod parse;
mod policy;
mod process;
mod stats;

use aya_ebpf::{
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, PerCpuArray, PerCpuHashMap, ProgramArray},
    programs::XdpContext,
};
use privatelink_common::{
    AllowKey, Backend4, Backend6, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_CONNTRACK6_ENTRIES,
    DEFAULT_MAX_ALLOWLIST, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_ENDPOINT_PORTS, DEFAULT_MAX_LINKS,
    DEFAULT_MAX_RULE_LISTS, DEFAULT_MAX_RULE_LISTS6, DEFAULT_MAX_SERVICES, DatapathConfig,
    EndpointIpKey4, EndpointIpKey6, EndpointIpValue, EndpointKey4, EndpointKey6, EndpointValue,
    FLOW_CACHE_COUNTERS, FLOW_CACHE_SLOTS, Flow4, Flow6, FlowCacheEntry4, FlowCacheEntry6,
    FlowKey4, FlowKey6, IFACE_INDEX_ENTRIES, IfaceInfo, IfaceKey, LinkDropKey, LinkInfo, LinkStats,
    MAX_NETWORKS, MaglevTable, NatRange4, NatRange6, NextHop, OUTCOMES, RuleList4, RuleList6,
};

/// (ifindex, VLAN id) → network and role. Frames from anything else pass untouched.
#[map]
static IFACES: HashMap<IfaceKey, IfaceInfo> = HashMap::with_max_entries(4096, 0);

/// ifindex → untagged interface (role 0: look in `IFACES`), the same entries as `IFACES` for
/// untagged interfaces with small ifindexes: an array lookup instead of a hash lookup per packet.
#[map]
static IFACE_INDEX: Array<IfaceInfo> = Array::with_max_entries(IFACE_INDEX_ENTRIES, 0);

/// (consumer network, endpoint IPv4, protocol, terminal port) → link and service port.
#[map]
static ENDPOINTS4: HashMap<EndpointKey4, EndpointValue> =
    HashMap::with_max_entries(DEFAULT_MAX_ENDPOINT_PORTS, 0);

/// (consumer network, endpoint IPv4) → link: ARP answers and "this address is ours".
#[map]
static ENDPOINT_IPS4: HashMap<EndpointIpKey4, EndpointIpValue> =
    HashMap::with_max_entries(DEFAULT_MAX_LINKS, 0);

/// Link id → state, account, service, provider network, rule list. Checked on every packet.
#[map]
static LINKS: Array<LinkInfo> = Array::with_max_entries(DEFAULT_MAX_LINKS, 0);

/// (service slot, account) present ⇔ the account may use the service.
#[map]
static ALLOWLIST: HashMap<AllowKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_ALLOWLIST, 0);

/// Rule-list slot → compiled security groups of an endpoint (slot 0 unused: no groups).
#[map]
static RULES4: Array<RuleList4> = Array::with_max_entries(DEFAULT_MAX_RULE_LISTS, 0);

/// Service slot → Maglev table of backend slots.
#[map]
static MAGLEV: Array<MaglevTable> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Backend slot → backend IPv4 address.
#[map]
static BACKENDS4: Array<Backend4> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Provider network id → source-NAT range.
#[map]
static NAT4: Array<NatRange4> = Array::with_max_entries(MAX_NETWORKS, 0);

/// IPv4 conntrack: forward entries (consumer tuple) and reply entries (provider tuple). A plain
/// hash, not an LRU: when it is full, new flows are refused (`conntrack_full`) instead of
/// established ones being evicted. Expired entries go when a lookup meets them, or by the agent's
/// sweep.
#[map]
static CT4: HashMap<FlowKey4, Flow4> = HashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// (consumer network, endpoint IPv6, protocol, terminal port) → link and service port.
#[map]
static ENDPOINTS6: HashMap<EndpointKey6, EndpointValue> =
    HashMap::with_max_entries(DEFAULT_MAX_ENDPOINT_PORTS, 0);

/// (consumer network, endpoint IPv6) → link: neighbour discovery and "this address is ours".
#[map]
static ENDPOINT_IPS6: HashMap<EndpointIpKey6, EndpointIpValue> =
    HashMap::with_max_entries(DEFAULT_MAX_LINKS, 0);

/// Rule-list slot → compiled IPv6 rules of an endpoint's groups (slot 0 unused: no groups).
#[map]
static RULES6: Array<RuleList6> = Array::with_max_entries(DEFAULT_MAX_RULE_LISTS6, 0);

/// Service slot → Maglev table of IPv6 backend slots.
#[map]
static MAGLEV6: Array<MaglevTable> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Backend slot → backend IPv6 address.
#[map]
static BACKENDS6: Array<Backend6> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Provider network id → IPv6 source-NAT range.
#[map]
static NAT6: Array<NatRange6> = Array::with_max_entries(MAX_NETWORKS, 0);

/// IPv6 conntrack, as `CT4`.
#[map]
static CT6: HashMap<FlowKey6, Flow6> = HashMap::with_max_entries(DEFAULT_CONNTRACK6_ENTRIES, 0);

/// Backend slot → the next hop of its last FIB lookup (per CPU), for new flows; see `NextHop`.
#[map]
static NEXTHOP4: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// The same for IPv6 backend slots.
#[map]
static NEXTHOP6: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Per-CPU direct-mapped copies of `CT4` entries of steady flows (see `FlowCacheEntry`).
#[map]
static FLOW_CACHE4: PerCpuArray<FlowCacheEntry4> =
    PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// The same in front of `CT6`.
#[map]
static FLOW_CACHE6: PerCpuArray<FlowCacheEntry6> =
    PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// Per-CPU flow-cache hits and fills (`FLOW_CACHE_HITS`, `FLOW_CACHE_FILLS`).
#[map]
static FLOW_CACHE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FLOW_CACHE_COUNTERS, 0);

/// Per-CPU [jiffies, coarse monotonic ns] of the last clock read (see `conntrack::now`).
#[map]
static TICK_CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Index 0: timeouts set by the agent (defaults apply while unset).
#[map]
static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

/// ifindex → ifindex of every attached interface, for XDP_REDIRECT.
#[map]
static DEVMAP: DevMapHash = DevMapHash::with_max_entries(4096, 0);

/// Outcome code → packets (per CPU); every packet lands in exactly one.
#[map]
static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(OUTCOMES, 0);

/// Link id → counters (per CPU).
#[map]
static LINK_STATS: PerCpuArray<LinkStats> = PerCpuArray::with_max_entries(DEFAULT_MAX_LINKS, 0);

/// (link id, drop reason) → packets (per CPU).
#[map]
static LINK_DROPS: PerCpuHashMap<LinkDropKey, u64> = PerCpuHashMap::with_max_entries(65_536, 0);

/// Index 0: the IPv6 program, tail-called for IPv6 frames. A program of its own keeps the IPv4
/// path's instructions and stack exactly what they were (both paths in one function exceed the
/// 512-byte stack).
#[map]
static JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per-CPU scratch of the IPv6 program: the parsed packet lives in map memory, not in registers
/// (the calling convention would spill its eight address words around every helper call, and the
/// 512-byte stack does not hold that).
#[map]
static SCRATCH6: PerCpuArray<parse::Ip6> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU hand-off from `privatelink` to `privatelink6`: the receiving interface, looked up once.
/// Pinned like the state maps: during an agent restart the old `privatelink` tail-calls the new
/// `privatelink6` (through the pinned `JUMP`), and both must see the same hand-off.
#[map]
static HANDOFF6: PerCpuArray<IfaceInfo> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch: FIB lookup parameters of the ICMP error paths (see `forward::next_hop`).
#[map]
static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch of the IPv6 program's ICMPv6 error path: the conntrack key of the quoted flow.
#[map]
static ERROR_KEY6: PerCpuArray<FlowKey6> = PerCpuArray::with_max_entries(1, 0);

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

/// Benchmark baseline (`cargo xtask bench`): parse Ethernet/IPv4/L4 the same way, swap MACs, XDP_TX.
/// Not attached anywhere; it only gives the datapath's costs a floor measured in the same run.
#[xdp]
pub fn floor(ctx: XdpContext) -> u32 {
    process::floor(&ctx)
}

/// Benchmark decomposition: the floor plus what every tracked packet pays first, the receiving
/// interface and one conntrack lookup of the frame's tuple. XDP_TX on a hit, XDP_PASS otherwise.
/// Not attached anywhere.
#[xdp]
pub fn lookup_floor(ctx: XdpContext) -> u32 {
    process::lookup_floor(&ctx)
}

/// Benchmark decomposition: the floor plus the two slots a new flow would claim in an
/// open-addressing flow table (`SLOTS`), by compare-and-swap; see `bench.rs`. XDP_TX once both
/// are claimed, XDP_PASS otherwise. Not attached anywhere.
#[xdp]
pub fn slot_floor(ctx: XdpContext) -> u32 {
    process::slot_floor(&ctx)
}

/// `slot_floor`'s table: one slot here, `privatelink_common::bench::SLOT_TABLE_ENTRIES` when the
/// bench loads the object (see the loader's `Sizes::bench_slots`).
#[map]
static SLOTS: Array<[u64; privatelink_common::bench::SLOT_WORDS]> = Array::with_max_entries(1, 0);

/// Benchmark generator's frame head, restored on every run (see `bench.rs`).
#[map]
static GEN_FRAME: Array<[u64; bench::GEN_HEAD / 8]> = Array::with_max_entries(1, 0);

/// Benchmark generator's new-flow switch and sequence: [on, frames numbered so far].
#[map]
static GEN_FLOWS: Array<u64> = Array::with_max_entries(2, 0);

/// Benchmark generator's window for short connections; see `privatelink_common::bench`.
#[map]
static GEN_WINDOW: Array<[u64; privatelink_common::bench::WINDOW_WORDS]> =
    Array::with_max_entries(1, 0);

/// Benchmark counters (per CPU): frames `sink` dropped (0), SYNs `responder` answered (1).
#[map]
static SINK: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(privatelink_common::bench::SINK_ENTRIES, 0);

/// Benchmark sink's clock (per CPU): its count and time at its first and latest sample; see
/// `privatelink_common::bench::CLOCK_WORDS`.
#[map]
static SINK_CLOCK: PerCpuArray<[u64; privatelink_common::bench::CLOCK_WORDS]> =
    PerCpuArray::with_max_entries(1, 0);

/// Benchmark load generator (`cargo xtask bench`), run in live-frames mode: see `bench.rs`.
#[xdp]
pub fn traffic_gen(ctx: XdpContext) -> u32 {
    bench::generate(&ctx)
}

/// Index 0: the program `replay` hands each frame to (the datapath or the floor); bench only.
#[map]
static REPLAY_JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
