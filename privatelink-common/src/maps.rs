//! Keys and values of the datapath's maps, with their limits.
//!
//! Identifiers the agent allocates (network ids, link ids, service slots, backend slots, rule-list
//! slots) are small dense integers so that most lookups are array lookups.

/// Maximum networks (consumer and provider) per node.
pub const MAX_NETWORKS: u32 = 4096;
/// Slots of the NAT range arrays: slot `n < MAX_NETWORKS` holds provider network `n`'s whole
/// range (what a reply's destination is checked against); the slots from `MAX_NETWORKS` on hold
/// the slices of it that high-availability groups give single consumer networks (a link's
/// [`LinkInfo::nat_slot`] says which slot its new flows take their NAT address from).
pub const NAT_SLOTS: u32 = 2 * MAX_NETWORKS;
/// Default capacity of link slots (one link per endpoint). Resizable at load.
pub const DEFAULT_MAX_LINKS: u32 = 131_072;
/// Default capacity of the endpoint (ip, proto, terminal port) hash. Resizable at load.
pub const DEFAULT_MAX_ENDPOINT_PORTS: u32 = 262_144;
/// Default number of services (Maglev tables). Resizable at load.
pub const DEFAULT_MAX_SERVICES: u32 = 1024;
/// Default number of backend slots. Resizable at load.
pub const DEFAULT_MAX_BACKENDS: u32 = 16_384;
/// Default number of compiled rule lists. Endpoints with the same bound groups share one list.
pub const DEFAULT_MAX_RULE_LISTS: u32 = 2048;
/// Default conntrack capacity in entries; each flow takes two (forward and reverse).
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 2_097_152;
/// Default IPv6 conntrack capacity in entries (an IPv6 entry takes 124 bytes of key and value
/// against 76 for IPv4, and most deployments carry mostly IPv4). Resizable at load.
pub const DEFAULT_CONNTRACK6_ENTRIES: u32 = 524_288;
/// Default number of compiled IPv6 rule lists (10 KiB each). Resizable at load.
pub const DEFAULT_MAX_RULE_LISTS6: u32 = 1024;
/// Extension headers the IPv6 parser walks before it gives up (`DROP_IPV6_EXT`).
pub const MAX_EXT_HDRS: usize = 4;
/// Default capacity of the allowlist hash.
pub const DEFAULT_MAX_ALLOWLIST: u32 = 65_536;

/// Rules per compiled list: 5 groups × 100 rules would exceed it, so the agent refuses a binding
/// whose compiled list is longer.
pub const MAX_RULES: usize = 256;
/// Maglev lookup table size per service (prime, ≫ backends so a change moves about 1/N of flows).
pub const MAGLEV_SIZE: usize = 2039;
/// NAT ports a new flow tries before it is refused (`nat_exhausted`): the consumer's own port,
/// then independent random ones. At a fraction `f` of the range in use, a flow is refused with
/// probability f^256: 2·10⁻⁶ at 95 %, 7.6 % at 99 %. The bound keeps the cost of a SYN towards a
/// full range at 256 lockless lookups (about 10 µs).
pub const NAT_PORT_PROBES: u32 = 256;

/// Interface roles ([`IfaceInfo::role`]).
pub const ROLE_CONSUMER: u8 = 1;
pub const ROLE_PROVIDER: u8 = 2;

/// Link states ([`LinkInfo::state`]); 0 is an empty slot.
pub const LINK_EMPTY: u32 = 0;
pub const LINK_PENDING: u32 = 1;
pub const LINK_AVAILABLE: u32 = 2;
pub const LINK_REJECTED: u32 = 3;

/// Rule-list slot 0 means "no security group bound": every flow is accepted.
pub const RULES_NONE: u32 = 0;

/// Rule actions.
pub const ACTION_ACCEPT: u8 = 1;
pub const ACTION_DROP: u8 = 2;

/// IP protocol numbers used in keys (`proto` fields).
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// In a rule: any protocol.
pub const PROTO_ANY: u8 = 0;

/// Flow directions ([`Flow4::dir`]).
pub const DIR_FORWARD: u8 = 0;
pub const DIR_REPLY: u8 = 1;

/// TCP conntrack states ([`Flow4::tcp_state`]); UDP flows stay `CT_OPEN`. A flow is half-open
/// (`CT_SYN_SENT`, then `CT_SYN_RECV` once the backend answered) until the consumer acknowledges
/// the backend's SYN-ACK, and lives [`DatapathConfig::tcp_syn_timeout_ns`] idle until then.
pub const CT_SYN_SENT: u8 = 1;
pub const CT_ESTABLISHED: u8 = 2;
pub const CT_CLOSING: u8 = 3;
pub const CT_OPEN: u8 = 4;
pub const CT_SYN_RECV: u8 = 5;

/// Untagged interfaces with an ifindex below this are also in `IFACE_INDEX`, an array indexed by
/// ifindex (an array lookup the verifier inlines instead of a hash lookup, on every packet).
pub const IFACE_INDEX_ENTRIES: u32 = 4096;

/// Key of `IFACES`: the interface (and 802.1Q VLAN id, 0 for untagged) a frame arrived on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfaceKey {
    pub ifindex: u32,
    pub vlan_id: u16,
    pub _pad: u16,
}
crate::assert_size!(IfaceKey, 8);

/// Value of `IFACES`: which network the interface belongs to and in which role.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    pub network_id: u32,
    /// [`ROLE_CONSUMER`] or [`ROLE_PROVIDER`].
    pub role: u8,
    pub _pad: u8,
    /// The interface's own MAC, used as the source of ARP replies.
    pub mac: [u8; 6],
}
crate::assert_size!(IfaceInfo, 12);

/// Key of `ENDPOINTS4`: an endpoint IPv4 address and terminal port in a consumer network.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey4 {
    pub network_id: u32,
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
crate::assert_size!(EndpointKey4, 12);

/// Value of `ENDPOINTS4`: the link it belongs to and the service port it maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    pub link_id: u32,
    pub service_port_be: u16,
    pub _pad: u16,
}
crate::assert_size!(EndpointValue, 8);

/// An IPv6 address as four words of wire bytes, each read natively (`u32::from_ne_bytes` of four
/// address bytes): network order, like the `_be` IPv4 fields, and compared a word at a time.
pub type In6 = [u32; 4];

/// Key of `ENDPOINTS6`: an endpoint IPv6 address and terminal port in a consumer network.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey6 {
    pub network_id: u32,
    pub addr_be: In6,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
crate::assert_size!(EndpointKey6, 24);

/// Key of `ENDPOINT_IPS6`: an endpoint IPv6 address in a consumer network (neighbour discovery,
/// and keeping the address unusable by anything else on the node).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointIpKey6 {
    pub network_id: u32,
    pub addr_be: In6,
}
crate::assert_size!(EndpointIpKey6, 20);

/// Key of `ENDPOINT_IPS4`: an endpoint IPv4 address in a consumer network (for ARP and for keeping
/// the address unusable by anything else on the node).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointIpKey4 {
    pub network_id: u32,
    pub addr_be: u32,
}
crate::assert_size!(EndpointIpKey4, 8);

/// Value of `ENDPOINT_IPS4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointIpValue {
    pub link_id: u32,
    pub _pad: u32,
}
crate::assert_size!(EndpointIpValue, 8);

/// Value of the `LINKS` array, indexed by link id: endpoint ↔ service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    /// [`LINK_EMPTY`], [`LINK_PENDING`], [`LINK_AVAILABLE`] or [`LINK_REJECTED`].
    pub state: u32,
    /// Agent-assigned number of the consumer account (allowlist key).
    pub account: u32,
    /// The service's slot: Maglev table and allowlist key.
    pub service_slot: u32,
    /// Provider network id: NAT range and reverse flow key.
    pub provider_network: u32,
    /// Compiled IPv4 rule list slot (`RULES4`), [`RULES_NONE`] when no group is bound.
    pub rules_slot: u32,
    /// Compiled IPv6 rule list slot (`RULES6`), [`RULES_NONE`] when no group is bound.
    pub rules_slot6: u32,
    /// Nonzero while the consumer account is allowed (allowlisted or same account); checked on every
    /// packet, so removal from the allowlist cuts established flows too.
    pub allowed: u32,
    /// Nonzero when the service answers ICMP echo requests to its endpoints (opt-in).
    pub answer_ping: u32,
    /// Most live flows the link may have; 0: no limit of its own. New flows beyond it drop
    /// ([`crate::DROP_FLOW_LIMIT`]). Live = `LINK_OPENED` − `LINK_RETIRED` for the link. (Added
    /// after layout 3: a pinned `LINKS` of the old size is created anew, see `drop_resized`.)
    pub flow_limit: u32,
    /// Nonzero: new TCP flows of the link get a PROXY protocol v2 header, whose TLVs are the
    /// link's `PROXY_TLVS` entry of this many bytes. 0: off.
    pub proxy_tlvs: u32,
    /// Nonzero: the link's new flows are logged (`CONN_LOG`, `CONN_STATS4`/`CONN_STATS6`). (Added
    /// after layout 3, like `flow_limit`.)
    pub conn_log: u32,
    /// The `NAT4`/`NAT6` slot new flows take their NAT address from: `provider_network`, or the
    /// slice of its range for the endpoint's consumer network (see [`NAT_SLOTS`]). (Added after
    /// layout 3, like `flow_limit`.)
    pub nat_slot: u32,
}
crate::assert_size!(LinkInfo, 48);

/// Key of `ALLOWLIST`: (service slot, account number). Value: 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowKey {
    pub service_slot: u32,
    pub account: u32,
}
crate::assert_size!(AllowKey, 8);

/// One compiled IPv4 security-group rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rule4 {
    /// Source network, already masked.
    pub addr_be: u32,
    pub mask_be: u32,
    /// Destination (terminal) port range, inclusive, host order; 0..=65535 for all.
    pub port_lo: u16,
    pub port_hi: u16,
    /// [`PROTO_TCP`], [`PROTO_UDP`], [`PROTO_ICMP`] or [`PROTO_ANY`].
    pub proto: u8,
    /// [`ACTION_ACCEPT`] or [`ACTION_DROP`].
    pub action: u8,
    pub _pad: [u8; 2],
}
crate::assert_size!(Rule4, 16);

/// Value of the `RULES4` array: one endpoint's bound groups compiled in evaluation order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleList4 {
    /// Rules in use, at most [`MAX_RULES`]. Zero with groups bound means "drop everything".
    pub count: u32,
    pub _pad: u32,
    pub rules: [Rule4; MAX_RULES],
}
crate::assert_size!(RuleList4, 8 + 16 * MAX_RULES);

/// One compiled IPv6 security-group rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rule6 {
    /// Source network, already masked.
    pub addr_be: In6,
    pub mask_be: In6,
    /// Destination (terminal) port range, inclusive, host order.
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    pub action: u8,
    pub _pad: [u8; 2],
}
crate::assert_size!(Rule6, 40);

/// Value of the `RULES6` array: an endpoint's bound groups' IPv6 rules in evaluation order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleList6 {
    pub count: u32,
    pub _pad: u32,
    pub rules: [Rule6; MAX_RULES],
}
crate::assert_size!(RuleList6, 8 + 40 * MAX_RULES);

/// Value of the `MAGLEV` and `MAGLEV6` arrays, indexed by service slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// Backends in the table; zero means the service has none.
    pub backends: u32,
    pub _pad: u32,
    /// Backend slot for each hash bucket.
    pub slots: [u32; MAGLEV_SIZE],
}
crate::assert_size!(MaglevTable, 8 + 4 * MAGLEV_SIZE);

/// Value of the `BACKENDS4` array, indexed by backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend4 {
    pub addr_be: u32,
    pub _pad: u32,
}
crate::assert_size!(Backend4, 8);

/// Value of the `BACKENDS6` array, indexed by backend slot (all zeroes: empty slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend6 {
    pub addr_be: In6,
}
crate::assert_size!(Backend6, 16);

/// Value of the `NAT6` array, indexed by NAT slot (see [`NAT_SLOTS`]): the IPv6 source-NAT range, `count`
/// addresses from `base_be` (only the last word varies, so the range is at most a /96).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatRange6 {
    pub base_be: In6,
    /// Number of addresses; zero means no range.
    pub count: u32,
    pub port_min: u16,
    pub port_max: u16,
    pub _pad: u32,
}
crate::assert_size!(NatRange6, 28);

/// Value of the `NAT4` array, indexed by NAT slot (see [`NAT_SLOTS`]): the source-NAT range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatRange4 {
    /// First address (host order, so the datapath can add an offset).
    pub base: u32,
    /// Number of addresses; zero means no range.
    pub count: u32,
    /// Ports to allocate from, inclusive, host order.
    pub port_min: u16,
    pub port_max: u16,
    pub _pad: u32,
}
crate::assert_size!(NatRange4, 16);

/// Key of `CT4` (`A` = `u32`) and `CT6` (`A` = [`In6`]): a flow as seen on ingress, in the
/// network it arrived from.
///
/// Forward entries are keyed by the consumer's tuple in its network; reply entries by the backend's
/// tuple (backend → NAT address) in the provider network.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey<A> {
    pub network_id: u32,
    pub saddr_be: A,
    pub daddr_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// Padding as two plain fields, not `[u8; 3]`: the datapath builds a key per packet, and a
    /// zeroed byte array becomes a `memset` call there (a BPF-to-BPF call into a byte loop).
    pub _pad0: u8,
    pub _pad1: u16,
}
pub type FlowKey4 = FlowKey<u32>;

impl<A> FlowKey<A> {
    /// A key with its padding zeroed (the hash covers every byte).
    #[inline(always)]
    pub const fn new(
        network_id: u32,
        saddr_be: A,
        daddr_be: A,
        sport_be: u16,
        dport_be: u16,
        proto: u8,
    ) -> Self {
        FlowKey {
            network_id,
            saddr_be,
            daddr_be,
            sport_be,
            dport_be,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}
pub type FlowKey6 = FlowKey<In6>;
crate::assert_size!(FlowKey4, 20);
crate::assert_size!(FlowKey6, 44);

/// Value of `CT4` and `CT6`: how to rewrite a packet of the flow, and the flow's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow<A> {
    /// `bpf_ktime_get_coarse_ns` of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// New source and destination after translation.
    pub saddr_be: A,
    pub daddr_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub link_id: u32,
    /// Network of the other direction's key (to find the twin entry).
    pub peer_network: u32,
    /// Reply entries: the consumer-side interface, MACs and VLAN to send back on (no FIB lookup,
    /// consumer networks overlap). Forward entries: the cached next hop of the last FIB lookup,
    /// valid while `egress_ifindex != 0` and `nh_generation` equals the config's `fib_generation`
    /// (re-resolved at most once a second per flow in any case).
    pub egress_ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// 802.1Q VLAN id to push on reply, 0 for none.
    pub vlan_id: u16,
    /// [`DIR_FORWARD`] or [`DIR_REPLY`].
    pub dir: u8,
    /// One of the `CT_*` states.
    pub tcp_state: u8,
    /// FIB generation the cached next hop was resolved in (forward entries).
    pub nh_generation: u32,
    /// Bytes of the PROXY protocol header this node put in front of the consumer's stream (0:
    /// none): the consumer's sequence numbers go up by it towards the backend, the backend's
    /// acknowledgements (and SACK blocks) down by it towards the consumer. Both entries carry it.
    pub proxy_len: u16,
    /// [`PROXY_PENDING`] while the backend has not acknowledged the header (the header's state is
    /// in `PROXY_PENDING4`/`PROXY_PENDING6` then); [`FLOW_LOGGED`] when the flow's connection is
    /// logged (its counters in `CONN_STATS4`/`CONN_STATS6`); [`PROXY_TS`] when the backend of a
    /// PROXY flow sends timestamps.
    pub flags: u8,
    pub _pad: u8,
}
pub type Flow4 = Flow<u32>;
pub type Flow6 = Flow<In6>;
crate::assert_size!(Flow4, 56);
crate::assert_size!(Flow6, 80);

impl<A: Copy> Flow<A> {
    /// The key of the other direction's entry of the same flow (`proto`: this entry's key's).
    #[inline(always)]
    pub fn twin_key(&self, proto: u8) -> FlowKey<A> {
        FlowKey::new(
            self.peer_network,
            self.daddr_be,
            self.saddr_be,
            self.dport_be,
            self.sport_be,
            proto,
        )
    }
}

/// [`Flow::flags`]: the backend has not acknowledged the PROXY header yet.
pub const PROXY_PENDING: u8 = 1;
/// [`Flow::flags`]: the flow's connection is logged.
pub const FLOW_LOGGED: u8 = 2;
/// [`Flow::flags`] of a PROXY flow: the backend's SYN-ACK carried a timestamp, so timestamps are
/// in use and every segment of the backend carries one (RFC 7323, 3.2). A SACK option then needs
/// a TCP header of 10 words at least (10 bytes of timestamp, 10 of one SACK block), so a segment
/// with a shorter header has no SACK edge to move.
pub const PROXY_TS: u8 = 4;

/// Entries of `CONN_STATS4`/`CONN_STATS6`: logged connections open at once (per family).
pub const CONN_STATS_ENTRIES: u32 = 65_536;
/// Bytes of the `CONN_LOG` ring buffer (about 11,900 records of [`ConnOpened`]).
pub const CONN_LOG_BYTES: u32 = 1 << 20;
/// Indexes of the per-CPU `CONN_LOG_STATS`: records written to the ring, records lost because
/// the ring was full, logged connections without counters because `CONN_STATS` was full.
pub const CONN_LOG_WRITTEN: u32 = 0;
pub const CONN_LOG_LOST: u32 = 1;
pub const CONN_LOG_UNCOUNTED: u32 = 2;
pub const CONN_LOG_COUNTERS: u32 = 3;
/// [`ConnStats::ended`] bits: a FIN from the consumer, a FIN from the backend, a RST from either.
pub const CONN_FIN_CONSUMER: u32 = 1;
pub const CONN_FIN_BACKEND: u32 = 2;
pub const CONN_RST: u32 = 4;

/// A connection-log record from the datapath (ring buffer `CONN_LOG`): a new flow of a link whose
/// service logs connections. Addresses as wire words, an IPv4 address in the first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnOpened {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC) when the flow was made.
    pub time_ns: u64,
    pub link_id: u32,
    /// 4 or 6.
    pub family: u8,
    pub proto: u8,
    pub _pad: u16,
    pub consumer_be: In6,
    pub endpoint_be: In6,
    pub nat_be: In6,
    pub backend_be: In6,
    pub consumer_port_be: u16,
    pub endpoint_port_be: u16,
    pub nat_port_be: u16,
    pub backend_port_be: u16,
}
crate::assert_size!(ConnOpened, 88);

/// Bytes of the `FLOW_SYNC` ring buffer: 32,768 IPv4 or 16,384 IPv6 events (each with the ring's
/// 8-byte header). The reader empties it at every wake-up; a burst larger than that between two
/// wake-ups loses events, counted.
pub const FLOW_SYNC_BYTES: u32 = 1 << 20;
/// Index of the per-CPU `FLOW_SYNC_STATS`: events lost because the ring was full (the periodic
/// sync still carries those flows, later).
pub const FLOW_SYNC_LOST: u32 = 0;
pub const FLOW_SYNC_COUNTERS: u32 = 1;

/// A flow-sync event from the datapath (ring buffer `FLOW_SYNC`): the flow under `key` was made,
/// or its TCP state changed. Only the key: the agent reads both of the flow's entries from
/// conntrack as they are when it sends them, so the ring carries 24 bytes (IPv4) per event and a
/// late reader never sends a stale state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent<A> {
    /// 4 or 6: which conntrack table `key` is of.
    pub family: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    pub key: FlowKey<A>,
}
pub type FlowEvent4 = FlowEvent<u32>;
pub type FlowEvent6 = FlowEvent<In6>;
crate::assert_size!(FlowEvent4, 24);
crate::assert_size!(FlowEvent6, 48);

/// Value of `CONN_STATS4`/`CONN_STATS6`, keyed by a logged flow's forward key: its counters (atomic
/// adds from any CPU), how it ended, and what its closing record needs besides the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnStats<A> {
    pub opened_ns: u64,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub nat_be: A,
    pub backend_be: A,
    pub nat_port_be: u16,
    pub backend_port_be: u16,
    pub link_id: u32,
    /// `CONN_FIN_*` and [`CONN_RST`] bits.
    pub ended: u32,
    pub _pad: u32,
}
pub type ConnStats4 = ConnStats<u32>;
pub type ConnStats6 = ConnStats<In6>;
crate::assert_size!(ConnStats4, 64);
crate::assert_size!(ConnStats6, 88);

/// Most bytes of a link's PROXY protocol TLVs ([`ProxyTlvs`]).
pub const PROXY_TLVS_MAX: usize = 128;
/// Most bytes of a PROXY protocol v2 header the datapath builds: the fixed 16, IPv6 addresses and
/// ports (36), the link's TLVs, the connection id's 16 characters and the CRC32C TLV (7).
pub const PROXY_HDR_MAX: usize = 16 + 36 + PROXY_TLVS_MAX + 16 + 7;
/// Entries of `PROXY_PENDING4`/`PROXY_PENDING6`: connections whose header is not yet acknowledged.
pub const PROXY_PENDING_ENTRIES: u32 = 65_536;

/// PROXY protocol v2 TLV types (the custom range 0xE0-0xEF, and the standard ones used).
pub const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
pub const PP2_TYPE_CRC32C: u8 = 0x03;
pub const PP2_TYPE_NOOP: u8 = 0x04;
/// The endpoint id, ASCII (`ep-1a2b3c4d`).
pub const PP2_TYPE_ENDPOINT_ID: u8 = 0xe0;
/// The link id, 4 bytes, network order.
pub const PP2_TYPE_LINK_ID: u8 = 0xe1;
/// The consumer account id, ASCII.
pub const PP2_TYPE_ACCOUNT_ID: u8 = 0xe2;

/// Value of `PROXY_TLVS` (link id → the TLVs of its PROXY headers), written by the agent: the
/// bytes that follow the addresses, up to the connection id the datapath appends. `len` is the
/// link's [`LinkInfo::proxy_tlvs`]; the header's length is a multiple of 4 (a NOOP TLV pads it),
/// so inserting it keeps the TCP checksum's 16-bit words aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyTlvs {
    pub len: u32,
    pub _pad: u32,
    pub bytes: [u8; PROXY_TLVS_MAX],
}
crate::assert_size!(ProxyTlvs, 136);

impl Default for ProxyTlvs {
    fn default() -> Self {
        ProxyTlvs {
            len: 0,
            _pad: 0,
            bytes: [0; PROXY_TLVS_MAX],
        }
    }
}

/// Value of `PROXY_PENDING4`/`PROXY_PENDING6`, keyed by a PROXY flow's forward key while the
/// backend has not acknowledged its header: where the consumer's stream starts (its initial
/// sequence number + 1), which the header occupies towards the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyPending {
    pub base: u32,
    pub _pad: u32,
}
crate::assert_size!(ProxyPending, 8);

/// Slots of each CPU's flow cache (`FLOW_CACHE4`, `FLOW_CACHE6`), a power of two.
pub const FLOW_CACHE_SLOTS: u32 = 4096;

/// Value of the per-CPU `FLOW_CACHE4` (`A` = `u32`) and `FLOW_CACHE6` (`A` = [`In6`]) arrays: a
/// direct-mapped copy of a conntrack entry in front of `CT4`/`CT6`, so that a steady flow's packet
/// costs an inlined array read instead of a hash-table lookup (a helper call and the kernel's
/// jhash). Written by the datapath only, on the CPU that owns it.
///
/// An entry stands in for its conntrack entry only while nothing the hash path would do differs:
/// `generation` equals [`DatapathConfig::flow_generation`] (the agent bumps it after deleting
/// entries); the copy is younger than a second and than half the flow's shortest timeout (TCP:
/// established or closing) by its own `last_seen_ns`, which is never newer than the table's, so
/// neither the datapath nor the agent's sweep can have expired the entry it copies; the flow is
/// UDP or established TCP and the packet carries no SYN, FIN or RST (no state change to write);
/// and a forward entry's next hop is of the current FIB generation. Anything else goes to the
/// table, and the table's entry is copied back in afterwards, or, when it is no longer steady
/// (a SYN of a tuple used again, a FIN, a RST, a PROXY header pending) or the packet was not
/// forwarded, the slot's copy of it is retired. Slot 0-filled: empty (protocol 0 matches no
/// packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheEntry<A> {
    pub key: FlowKey<A>,
    /// The config's `flow_generation` when the entry was copied in.
    pub generation: u32,
    pub flow: Flow<A>,
}
pub type FlowCacheEntry4 = FlowCacheEntry<u32>;
pub type FlowCacheEntry6 = FlowCacheEntry<In6>;
crate::assert_size!(FlowCacheEntry4, 80);
crate::assert_size!(FlowCacheEntry6, 128);

/// Index of the hits counter in the per-CPU `FLOW_CACHE_STATS` array: packets of established
/// flows served from the flow cache.
pub const FLOW_CACHE_HITS: u32 = 0;
/// Index of the fills counter: conntrack entries copied into the flow cache.
pub const FLOW_CACHE_FILLS: u32 = 1;
/// Entries of `FLOW_CACHE_STATS`.
pub const FLOW_CACHE_COUNTERS: u32 = 2;

/// Indexes of the per-CPU `PROXY_STATS` array: PROXY headers put in front of a stream (a
/// retransmitted one counts again), headers the backend acknowledged, and SYN-ACKs whose MSS was
/// lowered to leave room for the header.
pub const PROXY_HEADERS_SENT: u32 = 0;
pub const PROXY_HEADERS_ACKED: u32 = 1;
pub const PROXY_MSS_CLAMPED: u32 = 2;
/// Entries of `PROXY_STATS`.
pub const PROXY_COUNTERS: u32 = 3;

/// Value of the one-element `CONFIG` array: timeouts the agent sets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    pub tcp_syn_timeout_ns: u64,
    pub tcp_established_timeout_ns: u64,
    pub tcp_closing_timeout_ns: u64,
    pub udp_timeout_ns: u64,
    /// Bumped by the agent when routes or neighbours change: cached next hops of older
    /// generations are resolved again.
    pub fib_generation: u32,
    /// Bumped by the agent after it deleted conntrack entries: flow-cache entries of older
    /// generations are ignored (see [`FlowCacheEntry`]). Was padding before the flow cache, so a
    /// pinned config of an older agent reads as generation 0.
    pub flow_generation: u32,
}
crate::assert_size!(DatapathConfig, 40);

/// Value of `NEXTHOP4` and `NEXTHOP6` (per CPU, indexed by backend slot): the next hop the last
/// FIB lookup found for the backend. A new flow to the backend takes it instead of a FIB lookup
/// of its own while `generation` equals [`DatapathConfig::fib_generation`] and it is younger than
/// a second (the same bound as a flow's cached next hop). `ifindex` 0: nothing cached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// `bpf_ktime_get_coarse_ns` of the lookup.
    pub resolved_ns: u64,
    pub ifindex: u32,
    pub generation: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub _pad: u32,
}
crate::assert_size!(NextHop, 32);

const SEC: u64 = 1_000_000_000;

impl DatapathConfig {
    /// Conntrack lifetimes: TCP until the handshake completes 10 s, established 2 h idle, after
    /// FIN/RST 10 s, UDP 60 s. The short half-open lifetime is what bounds a SYN flood's hold on
    /// the table (a client's retransmitted SYNs, 1 s, 3 s and 7 s in, keep its entry alive).
    pub const DEFAULT: DatapathConfig = DatapathConfig {
        tcp_syn_timeout_ns: 10 * SEC,
        tcp_established_timeout_ns: 7200 * SEC,
        tcp_closing_timeout_ns: 10 * SEC,
        udp_timeout_ns: 60 * SEC,
        fib_generation: 0,
        flow_generation: 0,
    };

    /// The idle timeout for a flow in `state` (one of the `CT_*` codes).
    #[inline(always)]
    pub fn timeout_for(&self, proto: u8, state: u8) -> u64 {
        if proto == PROTO_UDP {
            return self.udp_timeout_ns;
        }
        match state {
            CT_ESTABLISHED => self.tcp_established_timeout_ns,
            CT_CLOSING => self.tcp_closing_timeout_ns,
            _ => self.tcp_syn_timeout_ns,
        }
    }
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(feature = "user")]
crate::user_pod!(
    ConnOpened,
    FlowEvent4,
    FlowEvent6,
    ConnStats4,
    ConnStats6,
    ProxyTlvs,
    ProxyPending,
    IfaceKey,
    IfaceInfo,
    EndpointKey4,
    EndpointValue,
    EndpointIpKey4,
    EndpointIpValue,
    LinkInfo,
    AllowKey,
    Rule4,
    RuleList4,
    MaglevTable,
    Backend4,
    NatRange4,
    FlowKey4,
    Flow4,
    DatapathConfig,
    EndpointKey6,
    EndpointIpKey6,
    Rule6,
    RuleList6,
    Backend6,
    NatRange6,
    FlowKey6,
    Flow6,
    NextHop,
    FlowCacheEntry4,
    FlowCacheEntry6,
);

/// Map names as declared in the eBPF object (the agent looks maps up by these).
pub mod names {
    pub const IFACES: &str = "IFACES";
    /// Untagged interfaces by ifindex (below [`super::IFACE_INDEX_ENTRIES`]); role 0: not there.
    pub const IFACE_INDEX: &str = "IFACE_INDEX";
    pub const ENDPOINTS4: &str = "ENDPOINTS4";
    pub const ENDPOINT_IPS4: &str = "ENDPOINT_IPS4";
    pub const LINKS: &str = "LINKS";
    pub const ALLOWLIST: &str = "ALLOWLIST";
    pub const RULES4: &str = "RULES4";
    pub const MAGLEV: &str = "MAGLEV";
    pub const BACKENDS4: &str = "BACKENDS4";
    pub const NAT4: &str = "NAT4";
    pub const CT4: &str = "CT4";
    pub const CONFIG: &str = "CONFIG";
    pub const DEVMAP: &str = "DEVMAP";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const LINK_STATS: &str = "LINK_STATS";
    pub const LINK_DROPS: &str = "LINK_DROPS";
    pub const ENDPOINTS6: &str = "ENDPOINTS6";
    pub const ENDPOINT_IPS6: &str = "ENDPOINT_IPS6";
    pub const RULES6: &str = "RULES6";
    pub const MAGLEV6: &str = "MAGLEV6";
    pub const BACKENDS6: &str = "BACKENDS6";
    pub const NAT6: &str = "NAT6";
    pub const CT6: &str = "CT6";
    /// Per-backend next-hop caches (per CPU). Not pinned: a cache, refilled within a second.
    pub const NEXTHOP4: &str = "NEXTHOP4";
    pub const NEXTHOP6: &str = "NEXTHOP6";
    /// Per-CPU flow caches in front of CT4/CT6. Not pinned: a cache, refilled from conntrack by
    /// the next packet of each flow.
    pub const FLOW_CACHE4: &str = "FLOW_CACHE4";
    pub const FLOW_CACHE6: &str = "FLOW_CACHE6";
    /// Flow-cache hits and fills (per CPU). Not pinned, like the caches it counts.
    pub const FLOW_CACHE_STATS: &str = "FLOW_CACHE_STATS";
    pub const JUMP: &str = "JUMP";
    /// Per-CPU hand-off from the IPv4 program to the IPv6 one across the tail call. Pinned so
    /// that, while a restarted agent replaces the programs, an old program's hand-off reaches the
    /// new IPv6 program (which the pinned `JUMP` already names).
    pub const HANDOFF6: &str = "HANDOFF6";
    /// Link id → new flows the datapath admitted under a flow limit (an atomic count).
    pub const LINK_OPENED: &str = "LINK_OPENED";
    /// Link id → how many flows of the link the agent's conntrack scan found ended, as
    /// `LINK_OPENED` counts them (written by the agent only): `LINK_OPENED` − `LINK_RETIRED` is
    /// the link's live flows as of the last scan, plus those admitted since.
    pub const LINK_RETIRED: &str = "LINK_RETIRED";
    /// Link id → the TLVs of its PROXY protocol headers.
    pub const PROXY_TLVS: &str = "PROXY_TLVS";
    /// Forward key → where the stream starts, for PROXY flows whose header is unacknowledged.
    pub const PROXY_PENDING4: &str = "PROXY_PENDING4";
    pub const PROXY_PENDING6: &str = "PROXY_PENDING6";
    /// Per-CPU PROXY counters ([`super::PROXY_HEADERS_SENT`], ...).
    pub const PROXY_STATS: &str = "PROXY_STATS";
    /// Ring buffer of connection-log records ([`super::ConnOpened`]).
    pub const CONN_LOG: &str = "CONN_LOG";
    /// Forward key → a logged connection's counters ([`super::ConnStats`]).
    pub const CONN_STATS4: &str = "CONN_STATS4";
    pub const CONN_STATS6: &str = "CONN_STATS6";
    /// Per-CPU connection-log counters ([`super::CONN_LOG_WRITTEN`], ...).
    pub const CONN_LOG_STATS: &str = "CONN_LOG_STATS";
    /// Ring buffer of flow-sync events ([`super::FlowEvent`]) for a group's peers.
    pub const FLOW_SYNC: &str = "FLOW_SYNC";
    /// Index 0: whether the datapath writes flow-sync events.
    pub const FLOW_SYNC_ON: &str = "FLOW_SYNC_ON";
    /// Per-CPU flow-sync counters ([`super::FLOW_SYNC_LOST`]).
    pub const FLOW_SYNC_STATS: &str = "FLOW_SYNC_STATS";

    /// Every map, for pinning.
    pub const ALL: &[&str] = &[
        IFACES,
        ENDPOINTS4,
        ENDPOINT_IPS4,
        LINKS,
        ALLOWLIST,
        RULES4,
        MAGLEV,
        BACKENDS4,
        NAT4,
        CT4,
        CONFIG,
        DEVMAP,
        GLOBAL_STATS,
        LINK_STATS,
        LINK_DROPS,
        ENDPOINTS6,
        ENDPOINT_IPS6,
        RULES6,
        MAGLEV6,
        BACKENDS6,
        NAT6,
        CT6,
        JUMP,
        HANDOFF6,
        IFACE_INDEX,
        LINK_OPENED,
        LINK_RETIRED,
        PROXY_TLVS,
        PROXY_PENDING4,
        PROXY_PENDING6,
        PROXY_STATS,
        CONN_LOG,
        CONN_STATS4,
        CONN_STATS6,
        CONN_LOG_STATS,
        FLOW_SYNC,
        FLOW_SYNC_ON,
        FLOW_SYNC_STATS,
    ];
}

/// Version of the maps' layout, part of every pin name: bump it with any change to a key or value
/// type above, so that an upgraded agent creates new maps instead of misreading pinned ones.
pub const LAYOUT_VERSION: u32 = 3;
