//! What the datapath should do, in the agent's terms. The sync turns control-plane state into a
//! [`Model`]; [`super::compile`] turns a model into exact map contents.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use privatelink_common::DatapathConfig;

/// Role of an attached interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Consumer,
    Provider,
}

/// An interface (or VLAN on it) that belongs to a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub ifindex: u32,
    /// 802.1Q VLAN id, 0 for untagged frames.
    pub vlan_id: u16,
    pub network_id: u32,
    pub role: Role,
    pub mac: [u8; 6],
}

/// Source-NAT range of a provider network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatRange {
    pub addrs: Ipv4Net,
    /// The IPv6 range, at most a /96 (only the last 32 bits vary); `None`: no IPv6 source NAT,
    /// so IPv6 endpoints of services in this network drop new flows (`no_nat_range`).
    pub addrs6: Option<Ipv6Net>,
    pub ports: RangeInclusive<u16>,
}

/// Protocols of port mappings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Protocols a security-group rule can match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleProto {
    Tcp,
    Udp,
    Icmp,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Accept,
    Drop,
}

/// One inbound rule, already placed in evaluation order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub proto: RuleProto,
    pub ports: RangeInclusive<u16>,
    /// IPv4 sources apply to IPv4 flows, IPv6 sources to IPv6 flows.
    pub source: IpNet,
    pub action: Action,
}

/// A port mapping: terminal port on the endpoint → service port on the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMap {
    pub proto: Proto,
    pub terminal: u16,
    pub service: u16,
}

/// Connection state of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    Pending,
    Available,
    Rejected,
}

/// An endpoint and its connection to a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Consumer network the endpoint lives in.
    pub network_id: u32,
    /// The endpoint's IPv4 address (`ipv4` and `dualstack` endpoints).
    pub ip4: Option<Ipv4Addr>,
    /// The endpoint's IPv6 address (`ipv6` and `dualstack` endpoints).
    pub ip6: Option<Ipv6Addr>,
    pub service_slot: u32,
    /// Agent-assigned number of the consumer account.
    pub account: u32,
    pub state: LinkState,
    /// The service's port mappings: one allocation per service, shared by all of its links (the
    /// sync builds a model with every link on each revision; see `sync::model`).
    pub ports: Arc<[PortMap]>,
    /// Bound security groups compiled in priority order; `None` when no group is bound. Shared by
    /// the links bound to the same groups (see `sync::model`).
    pub rules: Option<Arc<[Rule]>>,
    /// The service answers ICMP echo requests to this endpoint.
    pub answer_ping: bool,
    /// Most live flows the link may have; 0: no limit.
    pub flow_limit: u32,
    /// What the link's PROXY protocol v2 headers say, and whether new TCP flows get one.
    pub proxy: LinkProxy,
    /// The link's connections are logged.
    pub conn_log: bool,
    /// The `Model::nat` slot its new flows take their NAT address from: the service's provider
    /// network, or the slice of that network's range that a high-availability group gives the
    /// endpoint's consumer network (`privatelink_common::NAT_SLOTS`).
    pub nat_slot: u32,
}

/// The PROXY protocol v2 side of a link: its TLVs carry the endpoint id and the consumer account
/// id (and the link id); `v2` turns the header on for new TCP flows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkProxy {
    pub v2: bool,
    pub endpoint_id: String,
    pub account_id: String,
}

/// A service: its provider network and its (healthy) backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub provider_network: u32,
    /// IPv4 endpoints reach the IPv4 backends, IPv6 endpoints the IPv6 ones.
    pub backends: Vec<IpAddr>,
}

/// Everything one node's datapath needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// Timeouts; `fib_generation` is the dataplane's own and ignored here.
    pub config: DatapathConfig,
    pub ifaces: Vec<Iface>,
    /// NAT slot → NAT range: provider network id → its whole range, and from
    /// `privatelink_common::MAX_NETWORKS` on, the slices of them given to single consumer
    /// networks.
    pub nat: BTreeMap<u32, NatRange>,
    /// Service slot → service.
    pub services: BTreeMap<u32, Service>,
    /// Link id → link.
    pub links: BTreeMap<u32, Link>,
    /// (service slot, account) pairs allowed; same-account pairs are included by the sync.
    pub allowlist: BTreeSet<(u32, u32)>,
}
