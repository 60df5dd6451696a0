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
#[serde(deny_unknown_fields)]
pub struct Tag {
    #[cfg_attr(feature = "control", schema(value_type = shapes::TagKey))]
    pub key: String,
    #[serde(default)]
    #[cfg_attr(feature = "control", schema(value_type = shapes::TagValue))]
    pub value: String,
}

/// Active TCP health checking of a service's backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub enabled: bool,
    /// Port to connect to; 0 means the service port of the first TCP port mapping.
    #[cfg_attr(feature = "control", schema(maximum = 65535))]
    pub port: u16,
    #[cfg_attr(feature = "control", schema(minimum = 1, maximum = 300))]
    pub interval_secs: u32,
    #[cfg_attr(feature = "control", schema(minimum = 1, maximum = 300))]
    pub timeout_secs: u32,
    /// Consecutive successes that make an unhealthy target healthy.
    #[cfg_attr(feature = "control", schema(minimum = 1, maximum = 10))]
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy target unhealthy.
    #[cfg_attr(feature = "control", schema(minimum = 1, maximum = 10))]
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
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    #[cfg_attr(feature = "control", schema(value_type = shapes::AccountId))]
    pub id: String,
    #[cfg_attr(feature = "control", schema(value_type = shapes::Name))]
    pub name: String,
}

/// A token rotation.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RotateReq {
    /// Seconds the account's other tokens keep working (0, the default: they stop at once; at
    /// most a week).
    #[serde(default)]
    #[cfg_attr(feature = "control", schema(minimum = 0, maximum = 604800))]
    pub grace_secs: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    #[cfg_attr(feature = "control", schema(value_type = shapes::Name))]
    pub name: String,
    #[cfg_attr(feature = "control", schema(value_type = shapes::AccountId))]
    pub owner: String,
    #[cfg_attr(feature = "control", schema(value_type = Vec<shapes::Cidr>, min_items = 1, max_items = 5))]
    pub cidrs: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSubnet {
    #[cfg_attr(feature = "control", schema(value_type = shapes::Name))]
    pub name: String,
    /// IPv4, or IPv6 for an IPv6-only subnet.
    #[cfg_attr(feature = "control", schema(value_type = shapes::Cidr))]
    pub cidr: String,
    /// An IPv6 range next to an IPv4 `cidr` (dual-stack subnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(value_type = Option<shapes::Cidr6>))]
    pub ipv6_cidr: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PortMappingReq {
    pub protocol: Protocol,
    /// Taken wide so that 0 and 65536 get a clear error.
    #[cfg_attr(feature = "control", schema(minimum = 1, maximum = 65535))]
    pub service_port: i64,
    #[cfg_attr(feature = "control", schema(minimum = 1, maximum = 65535))]
    pub terminal_port: i64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateService {
    #[cfg_attr(feature = "control", schema(value_type = shapes::Name))]
    pub name: String,
    #[cfg_attr(feature = "control", schema(value_type = shapes::ObjectId))]
    pub network_id: String,
    pub service_type: ServiceType,
    #[cfg_attr(feature = "control", schema(value_type = Vec<shapes::Ip>, min_items = 1, max_items = 64))]
    pub backends: Vec<String>,
    #[serde(default)]
    #[cfg_attr(feature = "control", schema(max_items = 50))]
    pub port_mappings: Vec<PortMappingReq>,
    /// Default: no.
    #[serde(default)]
    pub auto_accept: bool,
    #[serde(default)]
    #[cfg_attr(feature = "control", schema(max_items = 10))]
    pub tags: Vec<Tag>,
    /// Default: enabled, 5 s interval, 2 s timeout, 3 up, 3 down.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// The name consumers may turn on private DNS for (e.g. `db.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(value_type = Option<shapes::DnsName>))]
    pub private_dns_name: Option<String>,
    /// Endpoints answer ICMP echo requests. Default: no.
    #[serde(default)]
    pub answer_ping: bool,
    /// Most live flows per endpoint on its node; 0 (the default): no limit.
    #[serde(default)]
    #[cfg_attr(feature = "control", schema(minimum = 0, maximum = 4294967295_i64))]
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
#[serde(deny_unknown_fields)]
pub struct UpdateService {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(value_type = Option<shapes::Name>))]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_accept: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(max_items = 10))]
    pub tags: Option<Vec<Tag>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// A new private DNS name; `""` removes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(value_type = Option<shapes::DnsName>))]
    pub private_dns_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_ping: Option<bool>,
    /// Most live flows per endpoint on its node; 0: no limit. New connections only: flows
    /// already over a lowered limit go on.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(minimum = 0, maximum = 4294967295_i64))]
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
#[serde(deny_unknown_fields)]
pub struct Backends {
    #[cfg_attr(feature = "control", schema(value_type = Vec<shapes::Ip>, min_items = 1, max_items = 64))]
    pub backends: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddPortMappings {
    #[cfg_attr(feature = "control", schema(min_items = 1, max_items = 50))]
    pub port_mappings: Vec<PortMappingReq>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AllowReq {
    #[cfg_attr(feature = "control", schema(value_type = shapes::AccountId))]
    pub account_id: String,
    #[serde(default)]
    #[cfg_attr(feature = "control", schema(value_type = shapes::Description))]
    pub description: String,
}

/// Accounts to take off an allowlist.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AllowRemoveReq {
    #[cfg_attr(feature = "control", schema(value_type = Vec<shapes::AccountId>, max_items = 100))]
    pub account_ids: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EndpointIds {
    #[cfg_attr(feature = "control", schema(value_type = Vec<shapes::ObjectId>, max_items = 100))]
    pub endpoint_ids: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BindingReq {
    #[cfg_attr(feature = "control", schema(value_type = shapes::ObjectId))]
    pub security_group_id: String,
    pub priority: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateEndpoint {
    #[cfg_attr(feature = "control", schema(value_type = shapes::Name))]
    pub name: String,
    pub service_id: String,
    #[cfg_attr(feature = "control", schema(value_type = shapes::ObjectId))]
    pub network_id: String,
    #[cfg_attr(feature = "control", schema(value_type = shapes::ObjectId))]
    pub subnet_id: String,
    /// `ipv4`, `ipv6` or `dualstack`; by default the family of the subnet's `cidr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address_type: Option<IpAddressType>,
    /// A free IPv4 address of the subnet (the IPv6 address for an `ipv6` endpoint); assigned
    /// automatically when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(value_type = Option<shapes::Ip>))]
    pub ip: Option<String>,
    /// A free IPv6 address of the subnet for a `dualstack` endpoint; assigned when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(value_type = Option<shapes::Ip>))]
    pub ipv6: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "control", schema(max_items = 5))]
    pub security_groups: Vec<BindingReq>,
    #[serde(default)]
    #[cfg_attr(feature = "control", schema(max_items = 10))]
    pub tags: Vec<Tag>,
    /// Resolve the service's private DNS name to this endpoint in its network. Default: off.
    #[serde(default)]
    pub private_dns_enabled: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateEndpoint {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(value_type = Option<shapes::Name>))]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(max_items = 10))]
    pub tags: Option<Vec<Tag>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_dns_enabled: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Bindings {
    #[cfg_attr(feature = "control", schema(max_items = 5))]
    pub security_groups: Vec<BindingReq>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleReq {
    pub protocol: RuleProtocol,
    /// `all`, `N` or `N-M`; only `all` for icmp and all.
    #[serde(default = "all")]
    #[cfg_attr(feature = "control", schema(value_type = shapes::PortRange))]
    pub ports: String,
    #[cfg_attr(feature = "control", schema(value_type = shapes::Cidr))]
    pub source: String,
    pub action: RuleAction,
    #[serde(default)]
    #[cfg_attr(feature = "control", schema(value_type = shapes::Description))]
    pub description: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    #[cfg_attr(feature = "control", schema(value_type = shapes::Name))]
    pub name: String,
    #[serde(default)]
    #[cfg_attr(feature = "control", schema(max_items = 100))]
    pub rules: Vec<RuleReq>,
    #[serde(default)]
    #[cfg_attr(feature = "control", schema(max_items = 10))]
    pub tags: Vec<Tag>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Rules {
    #[cfg_attr(feature = "control", schema(max_items = 100))]
    pub rules: Vec<RuleReq>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "control", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateGroup {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(value_type = Option<shapes::Name>))]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "control", schema(max_items = 10))]
    pub tags: Option<Vec<Tag>>,
}

fn all() -> String {
    "all".into()
}

/// Named string shapes of the OpenAPI document: each carries the rule the server enforces
/// (pattern, length, or a `format` whose rule its description states), so a client can check a
/// request before sending it.
#[cfg(feature = "control")]
pub mod shapes {
    use utoipa::openapi::{ObjectBuilder, RefOr, Schema, SchemaFormat, Type, schema::SchemaType};

    fn string(description: &str) -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .description(Some(description))
    }

    macro_rules! shape {
        ($(#[$m:meta])* $name:ident, $build:expr) => {
            $(#[$m])*
            pub struct $name;
            impl utoipa::PartialSchema for $name {
                fn schema() -> RefOr<Schema> {
                    RefOr::T(Schema::Object($build.build()))
                }
            }
            impl utoipa::ToSchema for $name {}
        };
    }

    shape!(
        /// An object name.
        Name,
        string("1 to 80 characters: ASCII letters, digits, '_', '-', '.' and CJK ideographs")
            .min_length(Some(1))
            .max_length(Some(80))
            .pattern(Some(
                "^[A-Za-z0-9_.\\-\\u3400-\\u4DBF\\u4E00-\\u9FFF\\uF900-\\uFAFF]{1,80}$"
            ))
    );
    shape!(
        /// An account id.
        AccountId,
        string("a 10-digit number, or 2 to 32 characters of a-z 0-9 - starting with a letter")
            .pattern(Some("^([0-9]{10}|[a-z][a-z0-9-]{1,31})$"))
    );
    shape!(
        /// A CIDR.
        Cidr,
        string(
            "an IPv4 or IPv6 CIDR with no host bits set and no leading zeros in IPv4 octets \
             (198.18.0.0/16, 2001:db8::/48); IPv4-mapped IPv6 ranges are refused"
        )
        .format(Some(SchemaFormat::Custom("cidr".into())))
        .max_length(Some(43))
    );
    shape!(
        /// An IPv6 CIDR.
        Cidr6,
        string("an IPv6 CIDR with no host bits set (2001:db8::/64), next to an IPv4 `cidr`")
            .format(Some(SchemaFormat::Custom("cidr6".into())))
            .max_length(Some(43))
    );
    shape!(
        /// An IP address.
        Ip,
        string("an IPv4 or IPv6 address (no leading zeros in IPv4 octets)")
            .format(Some(SchemaFormat::Custom("ip".into())))
            .max_length(Some(39))
    );
    shape!(
        /// A private DNS name.
        DnsName,
        string(
            "a DNS name of at least two labels of 1 to 63 letters, digits and '-' (not at either \
             end), at most 253 characters, a last label not all digits, outside the cluster's \
             zone; \"\" removes it in a PATCH"
        )
        .format(Some(SchemaFormat::Custom("dns-name".into())))
        .max_length(Some(254))
    );
    shape!(
        /// Security-group rule ports.
        PortRange,
        string("all, N or N-M with 1 ≤ N ≤ M ≤ 65535")
            .format(Some(SchemaFormat::Custom("port-range".into())))
            .pattern(Some("^(all|[1-9][0-9]{0,4}(-[1-9][0-9]{0,4})?)$"))
    );
    shape!(
        /// A description.
        Description,
        string("at most 255 characters").max_length(Some(255))
    );
    shape!(
        /// A tag key.
        TagKey,
        string("1 to 36 characters of A-Z a-z 0-9 _ -").pattern(Some("^[A-Za-z0-9_-]{1,36}$"))
    );
    shape!(
        /// A tag value.
        TagValue,
        string("0 to 43 characters of A-Z a-z 0-9 _ -").pattern(Some("^[A-Za-z0-9_-]{0,43}$"))
    );
    shape!(
        /// An object id made by the server.
        ObjectId,
        string("an id as the server made it: a prefix, '-' and 8 hex digits (e.g. svc-0a1b2c3d)")
            .pattern(Some("^[a-z]+-[0-9a-f]{8}$"))
    );
}
