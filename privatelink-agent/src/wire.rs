//! The REST API's request bodies and the plain types they carry: what the server deserializes
//! (`control`) and the CLI serializes (`cli`), one definition for both. Serde only: the OpenAPI
//! schemas derive with the `control` feature, so the CLI builds without the control plane.
//! Optional fields a request leaves out are not sent (a PATCH changes only what it names).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ServiceType {
    Clb,
    Mysql,
    Redis,
    Custom,
}

/// A header in front of each new TCP connection to the backends, saying who is calling.
/// `v2`: PROXY protocol version 2 with the endpoint, link and account in TLVs 0xE0-0xE2 (see
/// docs/PROXY.md). UDP flows never carry one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    V2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Address families of an endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum IpAddressType {
    #[default]
    Ipv4,
    Ipv6,
    /// One address of each family, serving the same port mappings.
    Dualstack,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct Tag {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

/// Active TCP health checking of a service's backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct HealthCheck {
    pub enabled: bool,
    /// Port to connect to; 0 means the service port of the first TCP port mapping.
    pub port: u16,
    pub interval_secs: u32,
    pub timeout_secs: u32,
    /// Consecutive successes that make an unhealthy target healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy target unhealthy.
    pub unhealthy_threshold: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    Tcp,
    Udp,
    Icmp,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Accept,
    Drop,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            enabled: true,
            port: 0,
            interval_secs: 5,
            timeout_secs: 2,
            healthy_threshold: 3,
            unhealthy_threshold: 3,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct CreateAccount {
    pub id: String,
    pub name: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct CreateNetwork {
    pub name: String,
    pub owner: String,
    pub cidrs: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct CreateSubnet {
    pub name: String,
    /// IPv4, or IPv6 for an IPv6-only subnet.
    pub cidr: String,
    /// An IPv6 range next to an IPv4 `cidr` (dual-stack subnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_cidr: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct PortMappingReq {
    pub protocol: Protocol,
    /// Taken wide so that 0 and 65536 get a clear error.
    pub service_port: i64,
    pub terminal_port: i64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct CreateService {
    pub name: String,
    pub network_id: String,
    pub service_type: ServiceType,
    pub backends: Vec<String>,
    #[serde(default)]
    pub port_mappings: Vec<PortMappingReq>,
    /// Default: no.
    #[serde(default)]
    pub auto_accept: bool,
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// Default: enabled, 5 s interval, 2 s timeout, 3 up, 3 down.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// The name consumers may turn on private DNS for (e.g. `db.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_dns_name: Option<String>,
    /// Endpoints answer ICMP echo requests. Default: no.
    #[serde(default)]
    pub answer_ping: bool,
    /// Most live flows per endpoint on its node; 0 (the default): no limit.
    #[serde(default)]
    pub flow_limit: u32,
    /// `v2`: a PROXY protocol v2 header in front of each new TCP connection. Default: `off`.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// Log each connection (opened, closed) on the node that carries it. Default: no.
    #[serde(default)]
    pub connection_log: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct UpdateService {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_accept: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<Tag>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// A new private DNS name; `""` removes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_dns_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_ping: Option<bool>,
    /// Most live flows per endpoint on its node; 0: no limit. New connections only: flows
    /// already over a lowered limit go on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_limit: Option<u32>,
    /// Replaces the per-endpoint limits: endpoint id (an endpoint of this service) → its limit
    /// instead of `flow_limit`, 0 for none. `{}` removes them all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_flow_limits: Option<BTreeMap<String, u32>>,
    /// `v2` or `off`, for connections opened from now on (open ones keep what they started with).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Log connections from now on (`true`) or stop (`false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_log: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct Backends {
    pub backends: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct AddPortMappings {
    pub port_mappings: Vec<PortMappingReq>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct AllowReq {
    pub account_id: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct EndpointIds {
    pub endpoint_ids: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct BindingReq {
    pub security_group_id: String,
    pub priority: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct CreateEndpoint {
    pub name: String,
    pub service_id: String,
    pub network_id: String,
    pub subnet_id: String,
    /// `ipv4`, `ipv6` or `dualstack`; by default the family of the subnet's `cidr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address_type: Option<IpAddressType>,
    /// A free IPv4 address of the subnet (the IPv6 address for an `ipv6` endpoint); assigned
    /// automatically when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// A free IPv6 address of the subnet for a `dualstack` endpoint; assigned when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    #[serde(default)]
    pub security_groups: Vec<BindingReq>,
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// Resolve the service's private DNS name to this endpoint in its network. Default: off.
    #[serde(default)]
    pub private_dns_enabled: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct UpdateEndpoint {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<Tag>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_dns_enabled: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct Bindings {
    pub security_groups: Vec<BindingReq>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct RuleReq {
    pub protocol: RuleProtocol,
    /// `all`, `N` or `N-M`; only `all` for icmp and all.
    #[serde(default = "all")]
    pub ports: String,
    pub source: String,
    pub action: RuleAction,
    #[serde(default)]
    pub description: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct CreateGroup {
    pub name: String,
    #[serde(default)]
    pub rules: Vec<RuleReq>,
    #[serde(default)]
    pub tags: Vec<Tag>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct Rules {
    pub rules: Vec<RuleReq>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
pub struct UpdateGroup {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<Tag>>,
}

fn all() -> String {
    "all".into()
}
