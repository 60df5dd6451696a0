//! Every map of the datapath, each described at its declaration; keys and values are defined in
//! `privatelink-common`. The agent pins them by these names.
use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
};
use privatelink_common::{
    AllowKey, Backend4, Backend6, CONN_LOG_BYTES, CONN_LOG_COUNTERS, CONN_STATS_ENTRIES,
    ConnStats4, ConnStats6, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_CONNTRACK6_ENTRIES,
    DEFAULT_MAX_ALLOWLIST, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_ENDPOINT_PORTS, DEFAULT_MAX_LINKS,
    DEFAULT_MAX_RULE_LISTS, DEFAULT_MAX_RULE_LISTS6, DEFAULT_MAX_SERVICES, DatapathConfig,
    EndpointIpKey4, EndpointIpKey6, EndpointIpValue, EndpointKey4, EndpointKey6, EndpointValue,
    FLOW_CACHE_COUNTERS, FLOW_CACHE_SLOTS, FLOW_SYNC_BYTES, FLOW_SYNC_COUNTERS, Flow4, Flow6,
    FlowCacheEntry4, FlowCacheEntry6, FlowKey4, FlowKey6, IFACE_INDEX_ENTRIES, IfaceInfo, IfaceKey,
    LinkDropKey, LinkInfo, LinkStats, MaglevTable, NAT_SLOTS, NatRange4, NatRange6, NextHop,
    OUTCOMES, PROXY_COUNTERS, PROXY_PENDING_ENTRIES, ProxyPending, ProxyTlvs, RuleList4, RuleList6,
};

/// `BPF_F_NO_PREALLOC`: a hash map that allocates its entries as they are inserted.
const BPF_F_NO_PREALLOC: u32 = 1;

/// (ifindex, VLAN id) → network and role. Frames from anything else pass untouched.
#[map]
pub static IFACES: HashMap<IfaceKey, IfaceInfo> = HashMap::with_max_entries(4096, 0);

/// ifindex → untagged interface (role 0: look in `IFACES`), the same entries as `IFACES` for
/// untagged interfaces with small ifindexes: an array lookup instead of a hash lookup per packet.
#[map]
pub static IFACE_INDEX: Array<IfaceInfo> = Array::with_max_entries(IFACE_INDEX_ENTRIES, 0);

/// (consumer network, endpoint IPv4, protocol, terminal port) → link and service port.
#[map]
pub static ENDPOINTS4: HashMap<EndpointKey4, EndpointValue> =
    HashMap::with_max_entries(DEFAULT_MAX_ENDPOINT_PORTS, 0);

/// (consumer network, endpoint IPv4) → link: ARP answers and "this address is ours".
#[map]
pub static ENDPOINT_IPS4: HashMap<EndpointIpKey4, EndpointIpValue> =
    HashMap::with_max_entries(DEFAULT_MAX_LINKS, 0);

/// Link id → state, account, service, provider network, rule list. Checked on every packet.
#[map]
pub static LINKS: Array<LinkInfo> = Array::with_max_entries(DEFAULT_MAX_LINKS, 0);

/// (service slot, account) present ⇔ the account may use the service.
#[map]
pub static ALLOWLIST: HashMap<AllowKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_ALLOWLIST, 0);

/// Rule-list slot → compiled security groups of an endpoint (slot 0 unused: no groups).
#[map]
pub static RULES4: Array<RuleList4> = Array::with_max_entries(DEFAULT_MAX_RULE_LISTS, 0);

/// Service slot → Maglev table of backend slots.
#[map]
pub static MAGLEV: Array<MaglevTable> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Backend slot → backend IPv4 address.
#[map]
pub static BACKENDS4: Array<Backend4> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// NAT slot (a provider network id, or a slice of its range for one consumer network) →
/// source-NAT range.
#[map]
pub static NAT4: Array<NatRange4> = Array::with_max_entries(NAT_SLOTS, 0);

/// IPv4 conntrack: forward entries (consumer tuple) and reply entries (provider tuple). A plain
/// hash, not an LRU: when it is full, new flows are refused (`conntrack_full`) instead of
/// established ones being evicted. Expired entries go when a lookup meets them, or by the agent's
/// sweep.
#[map]
pub static CT4: HashMap<FlowKey4, Flow4> = HashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// (consumer network, endpoint IPv6, protocol, terminal port) → link and service port.
#[map]
pub static ENDPOINTS6: HashMap<EndpointKey6, EndpointValue> =
    HashMap::with_max_entries(DEFAULT_MAX_ENDPOINT_PORTS, 0);

/// (consumer network, endpoint IPv6) → link: neighbour discovery and "this address is ours".
#[map]
pub static ENDPOINT_IPS6: HashMap<EndpointIpKey6, EndpointIpValue> =
    HashMap::with_max_entries(DEFAULT_MAX_LINKS, 0);

/// Rule-list slot → compiled IPv6 rules of an endpoint's groups (slot 0 unused: no groups).
#[map]
pub static RULES6: Array<RuleList6> = Array::with_max_entries(DEFAULT_MAX_RULE_LISTS6, 0);

/// Service slot → Maglev table of IPv6 backend slots.
#[map]
pub static MAGLEV6: Array<MaglevTable> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Backend slot → backend IPv6 address.
#[map]
pub static BACKENDS6: Array<Backend6> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// NAT slot → IPv6 source-NAT range, as `NAT4`.
#[map]
pub static NAT6: Array<NatRange6> = Array::with_max_entries(NAT_SLOTS, 0);

/// IPv6 conntrack, as `CT4`.
#[map]
pub static CT6: HashMap<FlowKey6, Flow6> = HashMap::with_max_entries(DEFAULT_CONNTRACK6_ENTRIES, 0);

/// Backend slot → the next hop of its last FIB lookup (per CPU), for new flows; see `NextHop`.
#[map]
pub static NEXTHOP4: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// The same for IPv6 backend slots.
#[map]
pub static NEXTHOP6: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Per-CPU direct-mapped copies of `CT4` entries of steady flows (see `FlowCacheEntry`).
#[map]
pub static FLOW_CACHE4: PerCpuArray<FlowCacheEntry4> =
    PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// The same in front of `CT6`.
#[map]
pub static FLOW_CACHE6: PerCpuArray<FlowCacheEntry6> =
    PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// Per-CPU flow-cache hits and fills (`FLOW_CACHE_HITS`, `FLOW_CACHE_FILLS`).
#[map]
pub static FLOW_CACHE_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(FLOW_CACHE_COUNTERS, 0);

/// Per-CPU [jiffies, coarse monotonic ns] of the last clock read (see `conntrack::now`).
#[map]
pub static TICK_CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Index 0: timeouts set by the agent (defaults apply while unset).
#[map]
pub static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

/// ifindex → ifindex of every attached interface, for XDP_REDIRECT.
#[map]
pub static DEVMAP: DevMapHash = DevMapHash::with_max_entries(4096, 0);

/// Outcome code → packets (per CPU); every packet lands in exactly one.
#[map]
pub static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(OUTCOMES, 0);

/// Link id → new flows admitted while the link had a flow limit (atomic adds: a limit must see
/// every CPU's flows). See `names::LINK_OPENED`.
#[map]
pub static LINK_OPENED: Array<u64> = Array::with_max_entries(DEFAULT_MAX_LINKS, 0);

/// Link id → flows of `LINK_OPENED` the agent's conntrack scan found ended (the agent writes it).
#[map]
pub static LINK_RETIRED: Array<u64> = Array::with_max_entries(DEFAULT_MAX_LINKS, 0);

/// Link id → counters (per CPU).
#[map]
pub static LINK_STATS: PerCpuArray<LinkStats> = PerCpuArray::with_max_entries(DEFAULT_MAX_LINKS, 0);

/// (link id, drop reason) → packets (per CPU).
#[map]
pub static LINK_DROPS: PerCpuHashMap<LinkDropKey, u64> = PerCpuHashMap::with_max_entries(65_536, 0);

/// Index 0: the IPv6 program, tail-called for IPv6 frames. A program of its own keeps the IPv4
/// path's instructions and stack exactly what they were (both paths in one function exceed the
/// 512-byte stack).
#[map]
pub static JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per-CPU scratch of the IPv6 program: the parsed packet lives in map memory, not in registers
/// (the calling convention would spill its eight address words around every helper call, and the
/// 512-byte stack does not hold that).
#[map]
pub static SCRATCH6: PerCpuArray<crate::parse::Ip6> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU hand-off from `privatelink` to `privatelink6`: the receiving interface, looked up once.
/// Pinned like the state maps: during an agent restart the old `privatelink` tail-calls the new
/// `privatelink6` (through the pinned `JUMP`), and both must see the same hand-off.
#[map]
pub static HANDOFF6: PerCpuArray<IfaceInfo> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch: FIB lookup parameters of the ICMP error paths (see `forward::next_hop`).
#[map]
pub static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

/// Per-CPU state of a new IPv4 flow's NAT port search once its first port is taken (see
/// `nat::create_flow`): the search runs in a `bpf_loop` callback, which reaches it here.
#[map]
pub static NAT_PROBE4: PerCpuArray<crate::probe::Probe<u32>> = PerCpuArray::with_max_entries(1, 0);

/// The same for IPv6 (here also to keep the reply key off the IPv6 program's full stack).
#[map]
pub static NAT_PROBE6: PerCpuArray<crate::probe::Probe<privatelink_common::In6>> =
    PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch of the IPv6 program's ICMPv6 error path (the conntrack key of the quoted flow)
/// and of its PROXY paths (the key of a flow's pending header).
#[map]
pub static ERROR_KEY6: PerCpuArray<FlowKey6> = PerCpuArray::with_max_entries(1, 0);

/// Link id → the TLVs of its PROXY protocol v2 headers (see `ProxyTlvs`), for every link of a
/// TCP service; `LinkInfo::proxy_tlvs` says whether new flows use them. Allocated per entry (most
/// links never carry a header).
#[map]
pub static PROXY_TLVS: HashMap<u32, ProxyTlvs> =
    HashMap::with_max_entries(DEFAULT_MAX_LINKS, BPF_F_NO_PREALLOC);

/// Forward key → where the consumer's stream starts, while the backend has not acknowledged the
/// PROXY header of the flow (deleted when it has; the agent's sweep removes those whose flow
/// ended first). Full: new PROXY flows drop (`proxy_full`), established ones go on.
/// Preallocated (a few MiB): an insert per new PROXY flow must not allocate.
#[map]
pub static PROXY_PENDING4: HashMap<FlowKey4, ProxyPending> =
    HashMap::with_max_entries(PROXY_PENDING_ENTRIES, 0);

/// The same for IPv6 flows.
#[map]
pub static PROXY_PENDING6: HashMap<FlowKey6, ProxyPending> =
    HashMap::with_max_entries(PROXY_PENDING_ENTRIES, 0);

/// Per-CPU PROXY counters (`PROXY_HEADERS_SENT`, ...).
#[map]
pub static PROXY_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROXY_COUNTERS, 0);

/// Per-CPU scratch of the PROXY paths: the header being built, the frame's headers while they
/// move, TCP options being rewritten.
#[map]
pub static PROXY_SCRATCH: PerCpuArray<crate::proxy_scratch::Scratch> =
    PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch of the IPv4 PROXY and connection-log paths: a flow's forward key.
#[map]
pub static KEY_SCRATCH4: PerCpuArray<FlowKey4> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU copy of the IPv4 conntrack entry a packet is rewritten by (see `Family::snapshot`).
#[map]
pub static FLOW_COPY4: PerCpuArray<Flow4> = PerCpuArray::with_max_entries(1, 0);

/// The same for IPv6.
#[map]
pub static FLOW_COPY6: PerCpuArray<Flow6> = PerCpuArray::with_max_entries(1, 0);

/// Connection-log records ([`ConnOpened`]) for the agent, which writes them out. Full: the record
/// is lost and counted (`CONN_LOG_LOST`); the flow goes on.
#[map]
pub static CONN_LOG: RingBuf = RingBuf::with_byte_size(CONN_LOG_BYTES, 0);

/// Forward key → a logged connection's counters, until the agent's sweep finds its flow gone and
/// writes the closing record. Per CPU: each CPU counts the packets it handles without an atomic
/// add; the CPU that made the flow holds its translation; the agent sums and merges. Full: the
/// connection is logged without counters (`CONN_LOG_UNCOUNTED`).
#[map]
pub static CONN_STATS4: PerCpuHashMap<FlowKey4, ConnStats4> =
    PerCpuHashMap::with_max_entries(CONN_STATS_ENTRIES, 0);

/// The same for IPv6 flows.
#[map]
pub static CONN_STATS6: PerCpuHashMap<FlowKey6, ConnStats6> =
    PerCpuHashMap::with_max_entries(CONN_STATS_ENTRIES, 0);

/// Flow-sync events (`FlowEvent4`/`FlowEvent6`: a flow made or its TCP state changed) for
/// the agent, which sends the flows to its group's peers. Full: the event is lost and counted
/// (`FLOW_SYNC_LOST`).
#[map]
pub static FLOW_SYNC: RingBuf = RingBuf::with_byte_size(FLOW_SYNC_BYTES, 0);

/// Index 0: nonzero while the agent syncs flows to peers (no events otherwise).
#[map]
pub static FLOW_SYNC_ON: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU flow-sync counters (`FLOW_SYNC_LOST`).
#[map]
pub static FLOW_SYNC_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FLOW_SYNC_COUNTERS, 0);

/// Per-CPU connection-log counters (`CONN_LOG_WRITTEN`, ...).
#[map]
pub static CONN_LOG_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CONN_LOG_COUNTERS, 0);

/// Per-CPU scratch of a new logged connection's counters, inserted from here (off the stack).
#[map]
pub static CONN_NEW4: PerCpuArray<ConnStats4> = PerCpuArray::with_max_entries(1, 0);

/// The same for IPv6.
#[map]
pub static CONN_NEW6: PerCpuArray<ConnStats6> = PerCpuArray::with_max_entries(1, 0);
