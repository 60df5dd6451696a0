//! The PrivateLink objects as stored and returned by the API.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::wire::{
    HealthCheck, IpAddressType, Protocol, ProxyProtocol, RuleAction, RuleProtocol, ServiceType, Tag,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Account {
    pub id: String,
    /// Datapath number of the account (allowlist keys), allocated once.
    pub number: u32,
    pub name: String,
    pub created_at: u64,
}

/// An API token: only its SHA-256 is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub sha256: String,
    pub account_id: String,
    pub created_at: u64,
    /// Unix seconds from which it no longer authenticates (set by a rotation's grace period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl Token {
    /// The id the API names it by: `tok-` and the first 12 hex digits of its hash (the hash of a
    /// 256-bit random token reveals nothing about it).
    pub fn id(&self) -> String {
        format!("tok-{}", &self.sha256[..12.min(self.sha256.len())])
    }

    /// Whether it authenticates at `now`.
    pub fn valid_at(&self, now: u64) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

/// A network (VPC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Network {
    pub id: String,
    /// Datapath network id, allocated once (below the datapath's network limit).
    pub number: u32,
    pub name: String,
    pub owner: String,
    #[schema(value_type = Vec<String>, example = json!(["198.18.0.0/16"]))]
    pub cidrs: Vec<IpNet>,
    pub created_at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Subnet {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub network_id: String,
    /// The subnet's range: IPv4, or IPv6 for an IPv6-only subnet.
    #[schema(value_type = String, example = "198.18.0.0/24")]
    pub cidr: IpNet,
    /// An IPv6 range next to an IPv4 `cidr` (dual-stack subnet).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "2001:db8::/64")]
    pub ipv6_cidr: Option<IpNet>,
    pub created_at: u64,
}

impl Subnet {
    /// The IPv4 range, if any.
    pub fn v4(&self) -> Option<IpNet> {
        Some(self.cidr).filter(|c| matches!(c, IpNet::V4(_)))
    }

    /// The IPv6 range, if any.
    pub fn v6(&self) -> Option<IpNet> {
        match self.cidr {
            IpNet::V6(_) => Some(self.cidr),
            IpNet::V4(_) => self.ipv6_cidr,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortMapping {
    pub protocol: Protocol,
    pub service_port: u16,
    pub terminal_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AllowEntry {
    pub account_id: String,
    pub description: String,
    pub created_at: u64,
}

/// An endpoint service (provider side).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Service {
    pub id: String,
    /// `<region>.<name>.<id>`, fixed at creation (a rename keeps it), unique, accepted wherever a
    /// service id is (verify, create endpoint).
    #[serde(default)]
    pub service_name: String,
    /// Datapath service slot (Maglev table, allowlist key), allocated once.
    pub slot: u32,
    pub name: String,
    /// The name consumers' private DNS resolves to their endpoint (e.g. `db.example.com`).
    #[serde(default)]
    pub private_dns_name: Option<String>,
    /// Whether endpoints answer ICMP echo requests (default: dropped and counted).
    #[serde(default)]
    pub answer_ping: bool,
    pub owner: String,
    /// Provider network the backends live in.
    pub network_id: String,
    pub service_type: ServiceType,
    #[schema(value_type = Vec<String>)]
    pub backends: Vec<IpAddr>,
    pub port_mappings: Vec<PortMapping>,
    pub auto_accept: bool,
    pub allowlist: Vec<AllowEntry>,
    /// Active TCP checks of the backends, run by every node.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Most live flows each endpoint of the service may have on the node that serves it (TCP
    /// until FIN or RST, UDP until idle); new flows beyond it are dropped and counted
    /// (`flow_limit`). 0: no limit of its own (the node's conntrack table is the bound).
    #[serde(default)]
    pub flow_limit: u32,
    /// Endpoint id → its own limit instead of `flow_limit` (0: none), for endpoints of this service.
    #[serde(default)]
    pub endpoint_flow_limits: std::collections::BTreeMap<String, u32>,
    /// A PROXY protocol header in front of each new TCP connection (`v2`), or none (`off`).
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// Each connection to the service is logged on the node that carries it (opened and closed
    /// records: `GET /v1/services/{id}/connections-log`).
    #[serde(default)]
    pub connection_log: bool,
    pub tags: Vec<Tag>,
    pub created_at: u64,
}

impl Service {
    /// The flow limit of the service's endpoint `endpoint_id` (0: none).
    pub fn flow_limit_of(&self, endpoint_id: &str) -> u32 {
        self.endpoint_flow_limits
            .get(endpoint_id)
            .copied()
            .unwrap_or(self.flow_limit)
    }
}

impl HealthCheck {
    /// The port probed for `svc`, if any (UDP-only services without an explicit port: none).
    pub fn probe_port(&self, mappings: &[PortMapping]) -> Option<u16> {
        if self.port != 0 {
            return Some(self.port);
        }
        mappings
            .iter()
            .find(|m| m.protocol == Protocol::Tcp)
            .map(|m| m.service_port)
    }
}

/// A connection's state (docs/API.md has the state machine). Only `Available` forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum ConnectionState {
    /// Waiting for the provider to accept.
    Pending,
    Available,
    /// Refused by the provider; accepting it again makes it Available.
    Rejected,
    /// The consumer's account left the service's allowlist: forwarding stopped. Back on the
    /// allowlist, it is Available again (auto-accept) or Pending.
    Disconnected,
    /// The provider removed the rejected or disconnected connection from its service: the
    /// consumer keeps the endpoint (to delete), the service no longer counts it.
    Removed,
}

impl ConnectionState {
    pub const ALL: [ConnectionState; 5] = [
        ConnectionState::Pending,
        ConnectionState::Available,
        ConnectionState::Rejected,
        ConnectionState::Disconnected,
        ConnectionState::Removed,
    ];
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Binding {
    pub security_group_id: String,
    /// Smaller is evaluated first.
    pub priority: u32,
}

/// An endpoint (consumer side).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Endpoint {
    pub id: String,
    /// Datapath link id (conntrack, counters), the lowest free at creation.
    pub link_id: u32,
    pub name: String,
    pub owner: String,
    pub network_id: String,
    pub subnet_id: String,
    /// The endpoint's address: its IPv4 address, or its IPv6 address for an `ipv6` endpoint.
    #[schema(value_type = String)]
    pub ip: IpAddr,
    #[serde(default)]
    pub ip_address_type: IpAddressType,
    /// The IPv6 address of `ipv6` and `dualstack` endpoints.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub ipv6: Option<Ipv6Addr>,
    pub service_id: String,
    /// `<endpoint id>.<service id>.<region>.<zone>`: resolves to the endpoint's IP in its network.
    #[serde(default)]
    pub dns_name: String,
    /// Whether the service's private DNS name resolves to this endpoint in its network.
    #[serde(default)]
    pub private_dns_enabled: bool,
    pub state: ConnectionState,
    /// Bound groups, kept sorted by priority.
    pub security_groups: Vec<Binding>,
    pub tags: Vec<Tag>,
    pub created_at: u64,
}

impl Endpoint {
    /// The endpoint's IPv4 and IPv6 addresses.
    pub fn addrs(&self) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        match self.ip {
            IpAddr::V4(a) => (Some(a), self.ipv6),
            IpAddr::V6(a) => (None, Some(a)),
        }
    }

    /// Every address of the endpoint.
    pub fn all_ips(&self) -> impl Iterator<Item = IpAddr> {
        let (a, b) = self.addrs();
        a.map(IpAddr::V4).into_iter().chain(b.map(IpAddr::V6))
    }

    /// An available IPv4 (or dual-stack, with `ipv6`) endpoint of the given id, link and subnet,
    /// everything else a placeholder: for tests of what is derived from endpoints.
    #[cfg(test)]
    pub fn for_test(
        id: &str,
        link_id: u32,
        subnet_id: &str,
        ip: IpAddr,
        ipv6: Option<Ipv6Addr>,
    ) -> Self {
        Endpoint {
            id: id.into(),
            link_id,
            name: "e".into(),
            owner: "a".into(),
            network_id: "n".into(),
            subnet_id: subnet_id.into(),
            ip,
            ip_address_type: IpAddressType::Ipv4,
            ipv6,
            service_id: "svc".into(),
            dns_name: String::new(),
            private_dns_enabled: false,
            state: ConnectionState::Available,
            security_groups: vec![],
            tags: vec![],
            created_at: 0,
        }
    }
}

/// An inbound rule. `ports` is `all`, `N` or `N-M`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SgRule {
    pub protocol: RuleProtocol,
    pub ports: String,
    #[schema(value_type = String)]
    pub source: IpNet,
    pub action: RuleAction,
    #[serde(default)]
    pub description: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecurityGroup {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub rules: Vec<SgRule>,
    pub tags: Vec<Tag>,
    pub created_at: u64,
}

/// Any stored object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "object", rename_all = "snake_case")]
pub enum Object {
    Account(Account),
    Token(Token),
    Network(Network),
    Subnet(Subnet),
    Service(Service),
    Endpoint(Endpoint),
    SecurityGroup(SecurityGroup),
}

/// Every object kind, as `Object::kind` names it (and store keys and `Change::Delete` carry it).
pub const KINDS: [&str; 7] = [
    "account",
    "token",
    "network",
    "subnet",
    "service",
    "endpoint",
    "security_group",
];

/// The kind named `name`, if there is one.
pub fn kind_named(name: &str) -> Option<&'static str> {
    KINDS.iter().copied().find(|k| *k == name)
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Account(_) => "account",
            Object::Token(_) => "token",
            Object::Network(_) => "network",
            Object::Subnet(_) => "subnet",
            Object::Service(_) => "service",
            Object::Endpoint(_) => "endpoint",
            Object::SecurityGroup(_) => "security_group",
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Object::Account(o) => &o.id,
            Object::Token(o) => &o.sha256,
            Object::Network(o) => &o.id,
            Object::Subnet(o) => &o.id,
            Object::Service(o) => &o.id,
            Object::Endpoint(o) => &o.id,
            Object::SecurityGroup(o) => &o.id,
        }
    }
}

/// One write of a mutation. A mutation is a list of these, committed atomically.
// A change lives for one mutation and most are puts: boxing the object would only add a copy.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Put(Object),
    Delete { kind: &'static str, id: String },
}

/// Settings every node and API server of a cluster must share: they go into names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    /// Region in service names (`<region>.<name>.<service id>`) and endpoint DNS names.
    pub region: String,
    /// Zone of generated endpoint DNS names.
    pub dns_zone: String,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            region: "local-1".into(),
            dns_zone: "privatelink.internal".into(),
        }
    }
}
