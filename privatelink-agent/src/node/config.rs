//! `agent.toml`: the node's configuration. Unknown keys are errors; every error names its key and
//! nothing is loaded until the whole file is valid.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use privatelink_common::DatapathConfig;
use serde::Deserialize;

use crate::{
    datapath::loader::Sizes,
    datapath::{NatRange, Role},
    node::sync::{NodeConfig, NodeIface},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid config: {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name.
    pub node: String,
    /// File holding the admin token (at least 16 characters).
    pub admin_token_file: PathBuf,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// bpffs directory for pins. It must be on a bpffs the host has mounted (its pins outlive
    /// the agent), unless `ephemeral_pins` accepts pins that end with the process.
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    /// Run with pins on a bpffs of the agent's own mount namespace: forwarding then stops with
    /// the agent. Default: refuse to start that way.
    #[serde(default)]
    pub ephemeral_pins: bool,
    pub interfaces: Vec<InterfaceConfig>,
    /// NAT range per provider network id.
    #[serde(default)]
    pub nat: BTreeMap<String, NatConfig>,
    #[serde(default)]
    pub conntrack: ConntrackConfig,
    /// Map capacities (fixed when the maps are created; pinned maps keep theirs until detach).
    #[serde(default)]
    pub maps: MapsConfig,
    /// Seconds between full resyncs (drift repair).
    #[serde(default = "default_resync")]
    pub resync_interval: u64,
    /// Region and DNS zone: the same on every node and API server of the cluster.
    #[serde(default)]
    pub cluster: crate::control::types::Cluster,
    /// Private DNS served to consumer networks.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Built-in monitoring history.
    #[serde(default)]
    pub history: HistoryConfig,
    /// High availability: the group of nodes this one serves its consumer networks with (needs
    /// the etcd store). Absent: the node serves them alone.
    #[serde(default)]
    pub ha: Option<HaConfig>,
}

/// `[ha]`: a group of nodes with the same consumer networks, one active at a time (see
/// `node::ha` for the rules and the timing).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// The group's name (letters, digits, `-`; the same on every node of the group).
    pub group: String,
    /// Where this node takes its peers' heartbeats (UDP), e.g. `198.18.250.1:7946`.
    pub listen: std::net::SocketAddr,
    /// The other nodes' `listen` addresses.
    pub peers: Vec<std::net::SocketAddr>,
    /// The group's shared secret (one line of at least 32 characters; readable by its owner
    /// only): every heartbeat carries an HMAC-SHA256 made with it.
    pub key_file: PathBuf,
    /// Milliseconds between heartbeats and between looks at the store.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Milliseconds of silence after which a peer is taken for dead (see `node::ha`).
    #[serde(default = "default_fence_ms")]
    pub fence_ms: u64,
    /// How far the nodes' clocks may differ (heartbeats carry the sender's time).
    #[serde(default = "default_skew_ms")]
    pub max_clock_skew_ms: u64,
    /// Addresses that move to the active node, e.g. the provider-side address the NAT ranges
    /// are routed through (without `networks`; with them, each network's addresses move with it).
    #[serde(default)]
    pub addresses: Vec<HaAddressConfig>,
    /// Active-active by network: each consumer network named here has its own owner in the group
    /// (spread over the nodes), its own slice of each provider network's NAT range and its own
    /// moving addresses. Absent: the group's consumer networks have one owner together.
    #[serde(default)]
    pub networks: BTreeMap<String, HaNetworkConfig>,
    /// Hand a network back to the node the group prefers for it (spread) once that node has been
    /// heard for `preempt_after_ms` with the flows synced; off by default: a node that returns
    /// stands by.
    #[serde(default)]
    pub preempt: bool,
    #[serde(default = "default_preempt_after_ms")]
    pub preempt_after_ms: u64,
}

/// `[ha.networks.<consumer network id>]`: one unit of ownership.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaNetworkConfig {
    /// The slice of each provider network's `[nat]` range this network's flows take their NAT
    /// addresses from (one per provider network; slices of different networks do not overlap).
    pub nat: BTreeMap<String, HaSliceConfig>,
    /// Addresses that move to the node active for this network: the provider-side address its
    /// slices are routed through.
    #[serde(default)]
    pub addresses: Vec<HaAddressConfig>,
}

/// A slice of a provider network's NAT range; its ports are the range's.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaSliceConfig {
    pub range: String,
    /// Inside the provider network's `range6` (required when it has one), or `"none"`.
    pub range6: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaAddressConfig {
    /// One of `interfaces`.
    pub interface: String,
    /// With its prefix, e.g. `198.18.100.250/24`.
    pub address: String,
}

fn default_heartbeat_ms() -> u64 {
    100
}

fn default_fence_ms() -> u64 {
    500
}

fn default_skew_ms() -> u64 {
    1000
}

fn default_preempt_after_ms() -> u64 {
    3000
}

/// `[ha]` as the runtime takes it.
#[derive(Clone, Debug)]
pub struct HaChecked {
    pub group: crate::node::ha::GroupConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Seconds between samples of the counters (1 to 10: every 10 s bucket gets one).
    pub sample_interval: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            sample_interval: 10,
        }
    }
}

/// What the DNS server answers for names it holds no records for.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtherNames {
    /// NXDOMAIN, authoritatively.
    #[default]
    Nxdomain,
    /// REFUSED (clients then ask their next resolver).
    Refuse,
    /// Asked of `dns.forwarders` and their answer relayed.
    Forward,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// TTL of answers (and of negative answers), seconds.
    pub ttl: u32,
    pub others: OtherNames,
    /// Upstream servers for `others = "forward"` (UDP, then TCP).
    pub forwarders: Vec<SocketAddr>,
    pub port: u16,
    /// Consumer network id → where its DNS server listens (on that network's interfaces).
    pub networks: BTreeMap<String, DnsNetwork>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            ttl: 60,
            others: OtherNames::default(),
            forwarders: Vec::new(),
            port: 53,
            networks: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsNetwork {
    /// An address of the consumer network; the agent puts it on the network's interfaces.
    pub listen: std::net::IpAddr,
}

fn default_bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/privatelink")
}

fn default_resync() -> u64 {
    30
}

/// The REST API's listener: address, TLS, and the limits on slow, idle and many clients.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain (leaf first): with `tls_key`, the API is served over TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Seconds a request's header (or a TLS handshake) may take to arrive.
    pub header_read_timeout_secs: u64,
    /// Seconds a request's body may take to arrive.
    pub body_read_timeout_secs: u64,
    /// Seconds a connection may stay without a request before it is closed.
    pub idle_timeout_secs: u64,
    /// Connections at once; more wait until one closes.
    pub max_connections: usize,
    /// Failed authentications a client address may have per minute before its requests are
    /// refused (429) for the rest of that minute; 0: no limit.
    pub auth_failures_per_minute: u32,
    /// The URL other API servers reach this node's API at (`http://198.18.0.1:7070`), published
    /// with the node's reports so that any server sums a link's history over every node that
    /// carried it; by default `listen` when it is neither loopback nor unspecified.
    pub advertise: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        let l = crate::control::serve::Limits::default();
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            tls_cert: None,
            tls_key: None,
            header_read_timeout_secs: l.header_read_timeout.as_secs(),
            body_read_timeout_secs: l.body_read_timeout.as_secs(),
            idle_timeout_secs: l.idle_timeout.as_secs(),
            max_connections: l.max_connections,
            auth_failures_per_minute: crate::control::authlimit::AuthLimiter::MAX_FAILURES,
            advertise: None,
        }
    }
}

impl ApiConfig {
    /// The limits and TLS files, checked (`key` names the config section in errors).
    pub fn serving(&self, key: &str) -> Result<crate::control::serve::Serving, ConfigError> {
        let secs = |name: &str, v: u64| {
            if (1..=3600).contains(&v) {
                Ok(std::time::Duration::from_secs(v))
            } else {
                Err(err(format!("{key}.{name}"), "1 to 3600 seconds"))
            }
        };
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(err(format!("{key}.max_connections"), "1 to 1000000"));
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            (Some(_), None) => return Err(err(format!("{key}.tls_key"), "tls_cert needs tls_key")),
            (None, Some(_)) => {
                return Err(err(format!("{key}.tls_cert"), "tls_key needs tls_cert"));
            }
        };
        Ok(crate::control::serve::Serving {
            listen: self.listen,
            limits: crate::control::serve::Limits {
                header_read_timeout: secs(
                    "header_read_timeout_secs",
                    self.header_read_timeout_secs,
                )?,
                body_read_timeout: secs("body_read_timeout_secs", self.body_read_timeout_secs)?,
                idle_timeout: secs("idle_timeout_secs", self.idle_timeout_secs)?,
                max_connections: self.max_connections,
            },
            advertise: crate::control::serve::advertised(
                self.advertise.as_deref(),
                self.listen,
                tls.is_some(),
            )
            .map_err(|m| err(format!("{key}.advertise"), m))?,
            tls,
            auth_failures_per_minute: self.auth_failures_per_minute,
        })
    }
}

/// Where `/metrics` (Prometheus, OpenMetrics text) is served.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct StoreConfig {
    /// The embedded store (SQLite); the monitoring history lives beside it in either case.
    pub path: PathBuf,
    /// etcd endpoints (`http://host:2379`): when given, the state lives there, shared by every
    /// node and API server of the cluster.
    pub etcd: Vec<String>,
    /// Key prefix in etcd.
    pub prefix: String,
    /// Seconds per etcd request.
    pub timeout: u64,
    /// Seconds without an answer from etcd after which the node takes it for out of reach
    /// (`privatelink_store_up` 0, the API's answers marked stale). HTTP/2 keepalive pings every
    /// second and the presence lease's renewals are what answer.
    pub contact_timeout: u64,
    /// Seconds of the node's presence lease: killed, it shows as gone after at most this.
    pub lease_ttl: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("/var/lib/privatelink/state.db"),
            etcd: Vec::new(),
            prefix: "/privatelink".into(),
            timeout: 3,
            contact_timeout: 3,
            lease_ttl: 5,
        }
    }
}

impl StoreConfig {
    /// The etcd settings, when the state lives in etcd.
    pub fn etcd(&self) -> Option<crate::control::etcd::EtcdConfig> {
        (!self.etcd.is_empty()).then(|| crate::control::etcd::EtcdConfig {
            endpoints: self.etcd.clone(),
            prefix: self.prefix.trim_end_matches('/').to_string(),
            timeout: std::time::Duration::from_secs(self.timeout),
            contact_timeout: std::time::Duration::from_secs(self.contact_timeout),
            lease_ttl: std::time::Duration::from_secs(self.lease_ttl),
        })
    }

    /// Opens the configured store (etcd, or the SQLite file, creating its directory).
    pub fn open(&self) -> anyhow::Result<Box<dyn crate::control::store::Store>> {
        use anyhow::Context as _;
        if let Some(e) = self.etcd() {
            let s = crate::control::etcd::EtcdStore::connect(e)
                .with_context(|| format!("store.etcd: {:?}", self.etcd))?;
            return Ok(Box::new(s));
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("store.path: creating {}", dir.display()))?;
        }
        let s = crate::control::store::SqliteStore::open(&self.path)
            .with_context(|| format!("store.path: {}", self.path.display()))?;
        Ok(Box::new(s))
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RoleConfig {
    Consumer,
    Provider,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeConfig {
    /// Native (driver) mode, falling back to generic with a logged warning.
    #[default]
    Native,
    Generic,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    pub name: String,
    /// Control-plane network id (`vpc-…`).
    pub network: String,
    pub role: RoleConfig,
    #[serde(default)]
    pub vlan: u16,
    #[serde(default)]
    pub mode: XdpModeConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatConfig {
    pub range: String,
    /// The IPv6 range (at most a /96: only the last 32 bits vary), or `"none"` for no IPv6 source
    /// NAT in this network.
    #[serde(default = "default_range6")]
    pub range6: String,
    #[serde(default = "default_ports")]
    pub ports: String,
}

/// Default IPv6 source-NAT range: inside 2001:db8::/32, the documentation prefix, so a node that
/// is not configured for IPv6 can never translate into someone's real addresses.
pub const DEFAULT_NAT_RANGE6: &str = "2001:db8:ff::/116";

fn default_range6() -> String {
    DEFAULT_NAT_RANGE6.into()
}

fn default_ports() -> String {
    "1024-65535".into()
}

/// `[conntrack]`: any key left out keeps its default.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    /// Entries (two per flow).
    pub entries: u32,
    /// IPv6 entries (two per flow).
    #[serde(default = "default_entries6")]
    pub entries6: u32,
    pub tcp_syn_timeout: u64,
    pub tcp_established_timeout: u64,
    pub tcp_closing_timeout: u64,
    pub udp_timeout: u64,
    /// Seconds between sweeps of expired entries (a full table refuses new flows).
    #[serde(default = "default_gc_interval")]
    pub gc_interval: u64,
}

fn default_gc_interval() -> u64 {
    5
}

fn default_entries6() -> u32 {
    privatelink_common::DEFAULT_CONNTRACK6_ENTRIES
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        let d = DatapathConfig::DEFAULT;
        ConntrackConfig {
            entries: privatelink_common::DEFAULT_CONNTRACK_ENTRIES,
            entries6: privatelink_common::DEFAULT_CONNTRACK6_ENTRIES,
            tcp_syn_timeout: d.tcp_syn_timeout_ns / 1_000_000_000,
            tcp_established_timeout: d.tcp_established_timeout_ns / 1_000_000_000,
            tcp_closing_timeout: d.tcp_closing_timeout_ns / 1_000_000_000,
            udp_timeout: d.udp_timeout_ns / 1_000_000_000,
            gc_interval: default_gc_interval(),
        }
    }
}

/// An interface (or VLAN on it) the node should serve, whether or not it exists yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedIface {
    pub name: String,
    pub vlan_id: u16,
    pub network: String,
    pub role: Role,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MapsConfig {
    /// Endpoints (links) on this node.
    pub links: u32,
    /// Endpoint (address, protocol, terminal port) entries.
    pub endpoint_ports: u32,
    pub services: u32,
    pub backends: u32,
    /// Distinct compiled security-group lists.
    pub rule_lists: u32,
    /// Distinct compiled IPv6 security-group lists (10 KiB each).
    pub rule_lists6: u32,
    pub allowlist: u32,
}

impl Default for MapsConfig {
    fn default() -> Self {
        let d = Sizes::default();
        MapsConfig {
            links: d.links,
            endpoint_ports: d.endpoint_ports,
            services: d.services,
            backends: d.backends,
            rule_lists: d.rule_lists,
            rule_lists6: d.rule_lists6,
            allowlist: d.allowlist,
        }
    }
}

/// The checked configuration: what the agent runs with.
#[derive(Clone, Debug)]
pub struct Checked {
    pub raw: AgentConfig,
    /// NAT ranges and timeouts; the interfaces are filled in as they are found.
    pub node: NodeConfig,
    pub wanted: Vec<WantedIface>,
    pub sizes: Sizes,
    pub admin_token: String,
    /// Interface name → the XDP mode asked for.
    pub attach: BTreeMap<String, XdpModeConfig>,
    pub ha: Option<HaChecked>,
}

/// The wanted interfaces that exist now, with their index and MAC, and the names of those that do
/// not. Asks the kernel (getifaddrs over netlink) in the calling thread's network namespace: sysfs
/// would show the namespace it was mounted in, which differs for a thread that joined another.
pub fn resolve(wanted: &[WantedIface]) -> (Vec<NodeIface>, Vec<String>) {
    let mut links: BTreeMap<String, (u32, [u8; 6])> = BTreeMap::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            if let Some(link) = a.address.as_ref().and_then(|x| x.as_link_addr()) {
                links.insert(
                    a.interface_name.clone(),
                    (link.ifindex() as u32, link.addr().unwrap_or([0; 6])),
                );
            }
        }
    }
    let (mut found, mut missing) = (Vec::new(), Vec::new());
    for w in wanted {
        match links.get(&w.name) {
            Some(&(ifindex, mac)) => found.push(NodeIface {
                name: w.name.clone(),
                ifindex,
                vlan_id: w.vlan_id,
                network: w.network.clone(),
                role: w.role,
                mac,
            }),
            None => missing.push(w.name.clone()),
        }
    }
    missing.dedup();
    (found, missing)
}

/// Checks the cluster settings (also used by `privatelink-agent api`).
pub fn check_cluster(c: &crate::control::types::Cluster) -> Result<(), ConfigError> {
    let region = &c.region;
    if region.is_empty()
        || region.len() > 63
        || !region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(err(
            "cluster.region",
            format!("{region:?}: 1 to 63 lowercase letters, digits and '-'"),
        ));
    }
    crate::control::validate::dns_name("cluster.dns_zone", &c.dns_zone, "")
        .map_err(|e| err("cluster.dns_zone", e.message))?;
    Ok(())
}

/// Parses and checks `text` (interfaces are resolved later, as they appear).
pub fn parse(text: &str) -> Result<Checked, ConfigError> {
    parse_with(text, &Overrides::default())
}

/// Values given as flags or environment variables; each replaces its key from the file and is
/// checked like it.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// Replaces `node`.
    #[arg(long, env = "PRIVATELINK_NODE")]
    pub node: Option<String>,
    /// Replaces `admin_token_file`.
    #[arg(long, env = "PRIVATELINK_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Replaces `api.listen`.
    #[arg(long, env = "PRIVATELINK_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// Replaces `metrics.listen`.
    #[arg(long, env = "PRIVATELINK_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Replaces `store.path`.
    #[arg(long, env = "PRIVATELINK_STORE")]
    pub store: Option<PathBuf>,
    /// Replaces `bpffs`.
    #[arg(long, env = "PRIVATELINK_BPFFS")]
    pub bpffs: Option<PathBuf>,
    /// Sets `ephemeral_pins`: accept pins that end with the agent (forwarding stops with it).
    #[arg(long)]
    pub ephemeral_pins: bool,
    /// Replaces `resync_interval` (seconds).
    #[arg(long, env = "PRIVATELINK_RESYNC_INTERVAL")]
    pub resync_interval: Option<u64>,
    /// Replaces `cluster.region`.
    #[arg(long, env = "PRIVATELINK_REGION")]
    pub region: Option<String>,
    /// Replaces `cluster.dns_zone`.
    #[arg(long, env = "PRIVATELINK_DNS_ZONE")]
    pub dns_zone: Option<String>,
}

impl Overrides {
    fn apply(&self, c: &mut AgentConfig) {
        let o = self.clone();
        if let Some(v) = o.node {
            c.node = v;
        }
        if let Some(v) = o.admin_token_file {
            c.admin_token_file = v;
        }
        if let Some(v) = o.api_listen {
            c.api.listen = v;
        }
        if let Some(v) = o.metrics_listen {
            c.metrics.listen = v;
        }
        if let Some(v) = o.store {
            c.store.path = v;
        }
        if let Some(v) = o.bpffs {
            c.bpffs = v;
        }
        if o.ephemeral_pins {
            c.ephemeral_pins = true;
        }
        if let Some(v) = o.resync_interval {
            c.resync_interval = v;
        }
        if let Some(v) = o.region {
            c.cluster.region = v;
        }
        if let Some(v) = o.dns_zone {
            c.cluster.dns_zone = v;
        }
    }
}

/// The same, with `overrides` applied before the checks.
pub fn parse_with(text: &str, overrides: &Overrides) -> Result<Checked, ConfigError> {
    let raw: AgentConfig = toml::from_str(text).map_err(|e| {
        let key = e.message().to_string();
        err(
            e.span()
                .map(|s| format!("at byte {}", s.start))
                .unwrap_or_default(),
            key,
        )
    })?;
    let mut raw = raw;
    overrides.apply(&mut raw);
    check(raw)
}

pub fn load(path: &Path) -> Result<Checked, ConfigError> {
    load_with(path, &Overrides::default())
}

pub fn load_with(path: &Path, overrides: &Overrides) -> Result<Checked, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err("config", format!("{}: {e}", path.display())))?;
    parse_with(&text, overrides)
}

/// Reads the admin token file and applies the token rule ([`crate::control::validate::admin_token`]).
pub fn read_admin_token(path: &Path) -> Result<String, ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|e| err("admin_token_file", format!("{}: {e}", path.display())))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(err(
            "admin_token_file",
            format!(
                "{} is readable or writable by others (mode {:o}): the admin token must be the \
                 owner's alone; run chmod 600 {}",
                path.display(),
                mode & 0o777,
                path.display()
            ),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| err("admin_token_file", format!("{}: {e}", path.display())))?;
    crate::control::validate::admin_token(&text)
        .map_err(|m| err("admin_token_file", format!("{}: {m}", path.display())))
}

/// Validates the configuration (no I/O), then resolves what lives outside it: the admin token.
fn check(raw: AgentConfig) -> Result<Checked, ConfigError> {
    let v = validate(&raw)?;
    let admin_token = read_admin_token(&raw.admin_token_file)?;
    let ha = match (&raw.ha, v.ha) {
        (Some(h), Some(units)) => Some(HaChecked {
            group: crate::node::ha::GroupConfig {
                group: h.group.clone(),
                node: raw.node.clone(),
                listen: h.listen,
                peers: h.peers.clone(),
                key: read_ha_key(&h.key_file)?,
                timing: crate::node::ha::Timing {
                    heartbeat: std::time::Duration::from_millis(h.heartbeat_ms),
                    fence: std::time::Duration::from_millis(h.fence_ms),
                },
                max_clock_skew: std::time::Duration::from_millis(h.max_clock_skew_ms),
                units,
                preempt: h
                    .preempt
                    .then(|| std::time::Duration::from_millis(h.preempt_after_ms)),
            },
        }),
        _ => None,
    };
    Ok(Checked {
        ha,
        node: NodeConfig {
            ifaces: Vec::new(),
            nat: v.nat,
            nat_slices: v.nat_slices,
            datapath: v.datapath,
        },
        wanted: v.wanted,
        sizes: v.sizes,
        admin_token,
        attach: v.attach,
        raw,
    })
}

/// What validation derives from the file.
struct Validated {
    wanted: Vec<WantedIface>,
    attach: BTreeMap<String, XdpModeConfig>,
    nat: BTreeMap<String, NatRange>,
    datapath: DatapathConfig,
    sizes: Sizes,
    /// `[ha]`'s units of ownership, parsed.
    ha: Option<Vec<crate::node::ha::Unit>>,
    nat_slices: BTreeMap<(String, String), NatRange>,
}

/// Every rule of the file, in one pass over its sections; nothing is read from outside it.
fn validate(raw: &AgentConfig) -> Result<Validated, ConfigError> {
    if raw.node.trim().is_empty() {
        return Err(err("node", "must not be empty"));
    }
    let (wanted, attach) = interfaces(raw)?;
    let nat = nat_ranges(raw)?;
    let datapath = conntrack(raw)?;
    if raw.resync_interval == 0 {
        return Err(err("resync_interval", "at least 1 second"));
    }
    check_cluster(&raw.cluster)?;
    raw.api.serving("api")?;
    store(raw)?;
    if !(1..=10).contains(&raw.history.sample_interval) {
        return Err(err("history.sample_interval", "1 to 10 seconds"));
    }
    dns(raw, &wanted)?;
    let sizes = sizes(raw)?;
    let ha = raw.ha.as_ref().map(|h| ha(raw, h)).transpose()?;
    let nat_slices = match &raw.ha {
        Some(h) => nat_slices(h, &nat)?,
        None => BTreeMap::new(),
    };
    Ok(Validated {
        ha,
        nat_slices,
        wanted,
        attach,
        nat,
        datapath,
        sizes,
    })
}

/// The wanted interfaces and the XDP mode of each.
fn interfaces(
    raw: &AgentConfig,
) -> Result<(Vec<WantedIface>, BTreeMap<String, XdpModeConfig>), ConfigError> {
    if raw.interfaces.is_empty() {
        return Err(err("interfaces", "at least one interface"));
    }
    let mut wanted: Vec<WantedIface> = Vec::new();
    let mut attach = BTreeMap::new();
    for (i, c) in raw.interfaces.iter().enumerate() {
        let key = |f: &str| format!("interfaces[{i}].{f}");
        // Interfaces may appear later (the agent attaches when they do), so only the name's form is
        // checked here: what the kernel accepts as an interface name.
        if c.name.is_empty() || c.name.len() > 15 || c.name.contains(['/', ' ', ':']) {
            return Err(err(
                key("name"),
                format!(
                    "{:?} is not an interface name (1 to 15 characters, no '/', ':' or spaces)",
                    c.name
                ),
            ));
        }
        if c.vlan > 4094 {
            return Err(err(key("vlan"), "VLAN ids are 0 (untagged) to 4094"));
        }
        if !c.network.starts_with("vpc-") {
            return Err(err(
                key("network"),
                format!("{:?} is not a network id (vpc-…)", c.network),
            ));
        }
        if wanted
            .iter()
            .any(|o| o.name == c.name && o.vlan_id == c.vlan)
        {
            return Err(err(
                key("name"),
                format!("{} VLAN {} is listed twice", c.name, c.vlan),
            ));
        }
        if attach
            .insert(c.name.clone(), c.mode)
            .is_some_and(|m| m != c.mode)
        {
            return Err(err(
                key("mode"),
                format!("{} is listed with both modes", c.name),
            ));
        }
        let role = match c.role {
            RoleConfig::Consumer => Role::Consumer,
            RoleConfig::Provider => Role::Provider,
        };
        wanted.push(WantedIface {
            name: c.name.clone(),
            vlan_id: c.vlan,
            network: c.network.clone(),
            role,
        });
    }
    Ok((wanted, attach))
}

/// Source-NAT ranges per provider network.
fn nat_ranges(raw: &AgentConfig) -> Result<BTreeMap<String, NatRange>, ConfigError> {
    let mut nat = BTreeMap::new();
    for (vpc, n) in &raw.nat {
        let key = |f: &str| format!("nat.{vpc}.{f}");
        let addrs: Ipv4Net = n
            .range
            .parse()
            .map_err(|_| err(key("range"), format!("{:?} is not an IPv4 CIDR", n.range)))?;
        let (lo, hi) = crate::control::validate::rule_ports("", &n.ports).map_err(|_| {
            err(
                key("ports"),
                format!("{:?}: use N-M with ports 1 to 65535", n.ports),
            )
        })?;
        let addrs6 = match n.range6.as_str() {
            "none" => None,
            r => {
                let net: ipnet::Ipv6Net = r.parse().map_err(|_| {
                    err(
                        key("range6"),
                        format!("{r:?} is not an IPv6 CIDR (or \"none\")"),
                    )
                })?;
                if net.prefix_len() < 96 {
                    return Err(err(
                        key("range6"),
                        format!("{r:?} is wider than a /96 (only the last 32 bits may vary)"),
                    ));
                }
                Some(net.trunc())
            }
        };
        nat.insert(
            vpc.clone(),
            NatRange {
                addrs,
                addrs6,
                ports: lo..=hi,
            },
        );
    }
    Ok(nat)
}

/// Conntrack timeouts and sizes; the datapath's timeouts.
fn conntrack(raw: &AgentConfig) -> Result<DatapathConfig, ConfigError> {
    let ct = &raw.conntrack;
    for (k, v) in [
        ("tcp_syn_timeout", ct.tcp_syn_timeout),
        ("tcp_established_timeout", ct.tcp_established_timeout),
        ("tcp_closing_timeout", ct.tcp_closing_timeout),
        ("udp_timeout", ct.udp_timeout),
        ("gc_interval", ct.gc_interval),
    ] {
        if v == 0 {
            return Err(err(format!("conntrack.{k}"), "must be at least 1 second"));
        }
    }
    if ct.entries < 1024 {
        return Err(err("conntrack.entries", "at least 1024"));
    }
    if ct.entries6 < 1024 {
        return Err(err("conntrack.entries6", "at least 1024"));
    }
    const S: u64 = 1_000_000_000;
    Ok(DatapathConfig {
        tcp_syn_timeout_ns: ct.tcp_syn_timeout * S,
        tcp_established_timeout_ns: ct.tcp_established_timeout * S,
        tcp_closing_timeout_ns: ct.tcp_closing_timeout * S,
        udp_timeout_ns: ct.udp_timeout * S,
        ..DatapathConfig::DEFAULT
    })
}

/// The store: etcd endpoints, key prefix, timeout.
fn store(raw: &AgentConfig) -> Result<(), ConfigError> {
    for (i, e) in raw.store.etcd.iter().enumerate() {
        if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() < 10 {
            return Err(err(
                format!("store.etcd[{i}]"),
                format!("{e:?}: an endpoint is http://host:port"),
            ));
        }
    }
    if !raw.store.prefix.starts_with('/') || raw.store.prefix.trim_end_matches('/').is_empty() {
        return Err(err(
            "store.prefix",
            format!("{:?}: a key prefix like /privatelink", raw.store.prefix),
        ));
    }
    if !(1..=60).contains(&raw.store.contact_timeout) {
        return Err(err("store.contact_timeout", "1 to 60 seconds"));
    }
    if !(2..=300).contains(&raw.store.lease_ttl) {
        return Err(err("store.lease_ttl", "2 to 300 seconds"));
    }
    if !(1..=60).contains(&raw.store.timeout) {
        return Err(err("store.timeout", "1 to 60 seconds"));
    }
    Ok(())
}

/// `[ha]`: a named group on the shared store, peers, sane timing, moving addresses on configured
/// interfaces.
fn ha(raw: &AgentConfig, h: &HaConfig) -> Result<Vec<crate::node::ha::Unit>, ConfigError> {
    use crate::node::channel::MAX_NAME;
    if raw.store.etcd.is_empty() {
        return Err(err(
            "ha",
            "a group needs the shared store: set store.etcd on every node of the group",
        ));
    }
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= MAX_NAME
            && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !name_ok(&h.group) {
        return Err(err(
            "ha.group",
            format!("{:?}: 1 to {MAX_NAME} letters, digits or '-'", h.group),
        ));
    }
    if raw.node.len() > MAX_NAME {
        return Err(err("node", format!("at most {MAX_NAME} bytes in a group")));
    }
    if h.peers.is_empty() {
        return Err(err("ha.peers", "at least one peer"));
    }
    if let Some(p) = h.peers.iter().find(|p| **p == h.listen) {
        return Err(err(
            "ha.peers",
            format!("{p} is this node's own listen address"),
        ));
    }
    if !(20..=1000).contains(&h.heartbeat_ms) {
        return Err(err("ha.heartbeat_ms", "20 to 1000 milliseconds"));
    }
    if h.fence_ms < 3 * h.heartbeat_ms || h.fence_ms > 10_000 {
        return Err(err(
            "ha.fence_ms",
            "at least three heartbeats, at most 10000 milliseconds",
        ));
    }
    if !(100..=60_000).contains(&h.max_clock_skew_ms) {
        return Err(err("ha.max_clock_skew_ms", "100 to 60000 milliseconds"));
    }
    if h.preempt && !(1000..=600_000).contains(&h.preempt_after_ms) {
        return Err(err("ha.preempt_after_ms", "1000 to 600000 milliseconds"));
    }
    let consumers: BTreeSet<&str> = raw
        .interfaces
        .iter()
        .filter(|i| i.role == RoleConfig::Consumer)
        .map(|i| i.network.as_str())
        .collect();
    if h.networks.is_empty() {
        // One owner for all of the node's consumer networks.
        return Ok(vec![crate::node::ha::Unit {
            name: String::new(),
            networks: consumers.iter().map(|n| n.to_string()).collect(),
            addresses: moving(raw, "ha.addresses", &h.addresses)?,
        }]);
    }
    if !h.addresses.is_empty() {
        return Err(err(
            "ha.addresses",
            "with ha.networks, addresses move with their network: put them in ha.networks.<id>.addresses",
        ));
    }
    if let Some(n) = consumers.iter().find(|n| !h.networks.contains_key(**n)) {
        return Err(err(
            "ha.networks",
            format!(
                "consumer network {n} has no section: with ha.networks every consumer network of the node needs its own (its NAT slices and addresses)"
            ),
        ));
    }
    h.networks
        .iter()
        .map(|(vpc, n)| {
            if !name_ok(vpc) || !consumers.contains(vpc.as_str()) {
                return Err(err(
                    format!("ha.networks.{vpc}"),
                    "not a consumer network of this node's interfaces",
                ));
            }
            Ok(crate::node::ha::Unit {
                name: vpc.clone(),
                networks: vec![vpc.clone()],
                addresses: moving(raw, &format!("ha.networks.{vpc}.addresses"), &n.addresses)?,
            })
        })
        .collect()
}

/// The slices of the provider networks' NAT ranges that `[ha.networks]` gives each consumer
/// network: every provider network has one in every section, inside its range, and no two
/// networks' slices overlap.
fn nat_slices(
    h: &HaConfig,
    nat: &BTreeMap<String, NatRange>,
) -> Result<BTreeMap<(String, String), NatRange>, ConfigError> {
    let mut out: BTreeMap<(String, String), NatRange> = BTreeMap::new();
    for (vpc, n) in &h.networks {
        if let Some(p) = nat.keys().find(|p| !n.nat.contains_key(*p)) {
            return Err(err(
                format!("ha.networks.{vpc}.nat"),
                format!(
                    "no slice of nat.{p}: each network needs one of every provider network's range"
                ),
            ));
        }
        for (p, slice) in &n.nat {
            let key = |f: &str| format!("ha.networks.{vpc}.nat.{p}.{f}");
            let Some(whole) = nat.get(p) else {
                return Err(err(
                    format!("ha.networks.{vpc}.nat.{p}"),
                    format!("{p} has no [nat.{p}] range to slice"),
                ));
            };
            let addrs: Ipv4Net = slice.range.parse().map_err(|_| {
                err(
                    key("range"),
                    format!("{:?} is not an IPv4 CIDR", slice.range),
                )
            })?;
            if !whole.addrs.contains(&addrs) {
                return Err(err(
                    key("range"),
                    format!("{addrs} is not inside nat.{p}.range ({})", whole.addrs),
                ));
            }
            let addrs6 = match (slice.range6.as_deref(), whole.addrs6) {
                (None, Some(w)) => {
                    return Err(err(
                        key("range6"),
                        format!(
                            "nat.{p} has the IPv6 range {w}: give this network a slice of it (or \"none\")"
                        ),
                    ));
                }
                (None | Some("none"), _) => None,
                (Some(r), None) => {
                    return Err(err(
                        key("range6"),
                        format!("{r:?}: nat.{p} has no IPv6 range to slice"),
                    ));
                }
                (Some(r), Some(w)) => {
                    let net: ipnet::Ipv6Net = r.parse().map_err(|_| {
                        err(
                            key("range6"),
                            format!("{r:?} is not an IPv6 CIDR (or \"none\")"),
                        )
                    })?;
                    if !w.contains(&net) {
                        return Err(err(
                            key("range6"),
                            format!("{net} is not inside nat.{p}.range6 ({w})"),
                        ));
                    }
                    Some(net.trunc())
                }
            };
            let overlaps = out.iter().find(|((_, q), other)| {
                q == p
                    && (other.addrs.contains(&addrs.network())
                        || addrs.contains(&other.addrs.network())
                        || matches!((other.addrs6, addrs6), (Some(a), Some(b))
                            if a.contains(&b.network()) || b.contains(&a.network())))
            });
            if let Some(((other, _), _)) = overlaps {
                return Err(err(
                    format!("ha.networks.{vpc}.nat.{p}"),
                    format!(
                        "overlaps the slice of {other}: two owners would hand out the same NAT addresses"
                    ),
                ));
            }
            out.insert(
                (vpc.clone(), p.clone()),
                NatRange {
                    addrs: addrs.trunc(),
                    addrs6,
                    ports: whole.ports.clone(),
                },
            );
        }
    }
    Ok(out)
}

/// Moving addresses on configured interfaces, parsed (`at`: their key).
fn moving(
    raw: &AgentConfig,
    at: &str,
    addresses: &[HaAddressConfig],
) -> Result<Vec<(String, ipnet::IpNet)>, ConfigError> {
    addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let key = format!("{at}[{i}]");
            if !raw.interfaces.iter().any(|f| f.name == a.interface) {
                return Err(err(
                    format!("{key}.interface"),
                    format!("{:?} is not one of `interfaces`", a.interface),
                ));
            }
            let net: ipnet::IpNet = a.address.parse().map_err(|_| {
                err(
                    format!("{key}.address"),
                    format!(
                        "{:?}: an address with its prefix, e.g. 198.18.100.250/24",
                        a.address
                    ),
                )
            })?;
            Ok((a.interface.clone(), net))
        })
        .collect()
}

/// The group's key: the file's first line, at least 32 characters, in a file only its owner can
/// read.
fn read_ha_key(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    let e = |m: String| err("ha.key_file", format!("{}: {m}", path.display()));
    let meta = std::fs::metadata(path).map_err(|x| e(x.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(e(format!(
            "readable by others (mode {:o}): chmod 600 it",
            meta.permissions().mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|x| e(x.to_string()))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let key = lines.next().unwrap_or("").trim();
    if lines.next().is_some() {
        return Err(e("more than one line".into()));
    }
    if key.len() < 32 {
        return Err(e("the key is at least 32 characters".into()));
    }
    Ok(key.as_bytes().to_vec())
}

/// DNS: TTL, port, what happens to other names, and the networks served (each needs a consumer
/// interface of its network among `wanted`).
fn dns(raw: &AgentConfig, wanted: &[WantedIface]) -> Result<(), ConfigError> {
    if raw.dns.ttl > 86_400 {
        return Err(err("dns.ttl", "0 to 86400 seconds"));
    }
    if raw.dns.port == 0 {
        return Err(err("dns.port", "1 to 65535"));
    }
    match (raw.dns.others, raw.dns.forwarders.is_empty()) {
        (OtherNames::Forward, true) => {
            return Err(err(
                "dns.forwarders",
                "others = \"forward\" needs at least one forwarder (address:port)",
            ));
        }
        (OtherNames::Nxdomain | OtherNames::Refuse, false) => {
            return Err(err(
                "dns.forwarders",
                "forwarders are used only with others = \"forward\"",
            ));
        }
        _ => {}
    }
    for (vpc, n) in &raw.dns.networks {
        let consumer = wanted
            .iter()
            .any(|w| &w.network == vpc && w.role == Role::Consumer);
        if !consumer {
            return Err(err(
                format!("dns.networks.{vpc}"),
                "no consumer interface of this network is configured",
            ));
        }
        if n.listen.is_unspecified() || n.listen.is_loopback() || n.listen.is_multicast() {
            return Err(err(
                format!("dns.networks.{vpc}.listen"),
                format!("{} is not an address a consumer can reach", n.listen),
            ));
        }
    }
    Ok(())
}

/// Map sizes.
fn sizes(raw: &AgentConfig) -> Result<Sizes, ConfigError> {
    let (m, ct) = (&raw.maps, &raw.conntrack);
    for (k, v) in [
        ("links", m.links),
        ("endpoint_ports", m.endpoint_ports),
        ("services", m.services),
        ("backends", m.backends),
        ("rule_lists", m.rule_lists),
        ("rule_lists6", m.rule_lists6),
        ("allowlist", m.allowlist),
    ] {
        // Slot 0 of the arrays is reserved, so 2 is the least that holds anything.
        if !(2..=16_777_216).contains(&v) {
            return Err(err(format!("maps.{k}"), "2 to 16777216"));
        }
    }
    Ok(Sizes {
        links: m.links,
        endpoint_ports: m.endpoint_ports,
        services: m.services,
        backends: m.backends,
        rule_lists: m.rule_lists,
        rule_lists6: m.rule_lists6,
        allowlist: m.allowlist,
        conntrack: ct.entries,
        conntrack6: ct.entries6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token(extra: &str) -> Result<Checked, ConfigError> {
        let dir =
            std::env::temp_dir().join(format!("plcfg-{}-{}", std::process::id(), extra.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok = dir.join("token");
        crate::control::store::write_private(&tok, "0123456789abcdef0123").unwrap();
        let text = format!(
            "node = \"n1\"\nadmin_token_file = \"{}\"\n{extra}",
            tok.display()
        );
        let r = parse(&text);
        let _ = std::fs::remove_dir_all(dir);
        r
    }

    const LO: &str =
        "[[interfaces]]\nname = \"lo\"\nnetwork = \"vpc-00000001\"\nrole = \"consumer\"\n";

    #[test]
    fn a_valid_file_resolves_interfaces() {
        let c = with_token(&format!(
            "{LO}[nat.vpc-00000002]\nrange = \"198.19.128.0/20\"\n"
        ))
        .unwrap();
        let (found, missing) = resolve(&c.wanted);
        assert_eq!((found[0].ifindex, missing.len()), (1, 0));
        let absent = with_token(
            "[[interfaces]]\nname = \"nosuchdev0\"\nnetwork = \"vpc-1\"\nrole = \"consumer\"\n",
        )
        .unwrap();
        assert_eq!(
            resolve(&absent.wanted).1,
            ["nosuchdev0"],
            "an interface that is not there yet is waited for"
        );
        assert_eq!(c.node.nat["vpc-00000002"].ports, 1024..=65535);
        assert_eq!(
            c.raw.api.listen.to_string(),
            "127.0.0.1:7070",
            "the API listens on loopback by default"
        );
    }

    #[test]
    fn the_example_config_matches_the_schema() {
        let c: AgentConfig = toml::from_str(include_str!("../../../examples/agent.toml"))
            .expect("examples/agent.toml");
        assert_eq!(c.interfaces.len(), 3);
        assert_eq!(c.interfaces[1].vlan, 120);
        assert_eq!(
            c.conntrack.entries,
            privatelink_common::DEFAULT_CONNTRACK_ENTRIES
        );
    }

    #[test]
    fn flags_replace_file_values_and_are_checked_like_them() {
        let text = format!("node = \"n1\"\nadmin_token_file = \"/nonexistent\"\n{LO}");
        let dir = std::env::temp_dir().join(format!("plcfg-ovr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok = dir.join("token");
        crate::control::store::write_private(&tok, "0123456789abcdef0123").unwrap();
        let o = Overrides {
            node: Some("n2".into()),
            admin_token_file: Some(tok),
            resync_interval: Some(5),
            region: Some("eu-2".into()),
            ..Overrides::default()
        };
        let c = parse_with(&text, &o).unwrap();
        assert_eq!(
            (
                c.raw.node.as_str(),
                c.raw.resync_interval,
                c.raw.cluster.region.as_str()
            ),
            ("n2", 5, "eu-2")
        );
        let bad = Overrides {
            resync_interval: Some(0),
            ..o
        };
        assert_eq!(parse_with(&text, &bad).unwrap_err().key, "resync_interval");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn each_error_names_its_key() {
        let cases = [
            (
                "[[interfaces]]\nname = \"a-name-longer-than-15\"\nnetwork = \"vpc-1\"\nrole = \"consumer\"\n",
                "interfaces[0].name",
            ),
            (
                "[[interfaces]]\nname = \"lo\"\nnetwork = \"x\"\nrole = \"consumer\"\n",
                "interfaces[0].network",
            ),
            (
                "[[interfaces]]\nname = \"lo\"\nnetwork = \"vpc-1\"\nrole = \"consumer\"\nvlan = 4095\n",
                "interfaces[0].vlan",
            ),
            (
                &format!("{LO}[nat.vpc-2]\nrange = \"198.19.128.1/33\"\n"),
                "nat.vpc-2.range",
            ),
            (
                &format!("{LO}[nat.vpc-2]\nrange = \"198.19.128.0/20\"\nports = \"9-1\"\n"),
                "nat.vpc-2.ports",
            ),
            (
                &format!(
                    "{LO}[conntrack]\nentries = 10\ntcp_syn_timeout = 1\ntcp_established_timeout = 1\ntcp_closing_timeout = 1\nudp_timeout = 1\n"
                ),
                "conntrack.entries",
            ),
            ("interfaces = []\n", "interfaces"),
            (
                &format!("{LO}[cluster]\nregion = \"Upper\"\n"),
                "cluster.region",
            ),
            (
                &format!("{LO}[cluster]\ndns_zone = \"no_underscores.internal\"\n"),
                "cluster.dns_zone",
            ),
            (&format!("{LO}[dns]\nttl = 100000\n"), "dns.ttl"),
            (
                &format!("{LO}[store]\netcd = [\"198.18.200.1:2379\"]\n"),
                "store.etcd[0]",
            ),
            (&format!("{LO}[store]\nprefix = \"x\"\n"), "store.prefix"),
            (
                &format!("{LO}[dns]\nothers = \"forward\"\n"),
                "dns.forwarders",
            ),
            (
                &format!("{LO}[dns]\nforwarders = [\"198.18.100.53:53\"]\n"),
                "dns.forwarders",
            ),
            (
                &format!("{LO}[dns.networks.vpc-00000002]\nlisten = \"198.18.0.2\"\n"),
                "dns.networks.vpc-00000002",
            ),
            (
                &format!("{LO}[dns.networks.vpc-00000001]\nlisten = \"0.0.0.0\"\n"),
                "dns.networks.vpc-00000001.listen",
            ),
        ];
        for (text, key) in cases {
            assert_eq!(with_token(text).unwrap_err().key, key, "{text}");
        }
        let e = with_token(&format!("{LO}bogus = 1\n")).unwrap_err();
        assert!(
            e.message.contains("bogus"),
            "unknown keys are refused by name: {e}"
        );
        let e =
            with_token("[[interfaces]]\nname = \"lo\"\nnetwork = \"vpc-1\"\nrole = \"router\"\n")
                .unwrap_err();
        assert!(e.message.contains("router"), "{e}");
    }

    /// A group with an owner per consumer network: two consumer networks on two interfaces, one
    /// provider network; `sections` are the `[ha.networks]` part.
    fn grouped(sections: &str) -> Result<Validated, ConfigError> {
        let text = format!(
            r#"node = "n1"
admin_token_file = "/nonexistent"
[store]
etcd = ["http://198.18.250.10:2379"]
[[interfaces]]
name = "c0"
network = "vpc-c1"
role = "consumer"
[[interfaces]]
name = "c1"
network = "vpc-c2"
role = "consumer"
[[interfaces]]
name = "p0"
network = "vpc-p"
role = "provider"
[nat.vpc-p]
range = "198.19.128.0/24"
range6 = "2001:db8:ff::/116"
[ha]
group = "edge"
listen = "198.18.250.1:7946"
peers = ["198.18.250.2:7946"]
key_file = "/nonexistent"
{sections}"#
        );
        validate(&toml::from_str(&text).expect("TOML"))
    }

    const SLICES: &str = r#"[ha.networks.vpc-c1.nat.vpc-p]
range = "198.19.128.0/25"
range6 = "2001:db8:ff::/117"
[[ha.networks.vpc-c1.addresses]]
interface = "p0"
address = "198.18.100.250/24"
[ha.networks.vpc-c2.nat.vpc-p]
range = "198.19.128.128/25"
range6 = "2001:db8:ff::800/117"
[[ha.networks.vpc-c2.addresses]]
interface = "p0"
address = "198.18.100.251/24"
"#;

    #[test]
    fn a_group_with_an_owner_per_network_slices_the_nat_ranges_without_overlap() {
        let v = grouped(SLICES).unwrap();
        let units = v.ha.unwrap();
        assert_eq!(
            units
                .iter()
                .map(|u| (
                    u.name.as_str(),
                    u.networks.clone(),
                    u.addresses[0].1.to_string()
                ))
                .collect::<Vec<_>>(),
            [
                (
                    "vpc-c1",
                    vec!["vpc-c1".to_string()],
                    "198.18.100.250/24".into()
                ),
                (
                    "vpc-c2",
                    vec!["vpc-c2".to_string()],
                    "198.18.100.251/24".into()
                )
            ]
        );
        let s = &v.nat_slices[&("vpc-c2".to_string(), "vpc-p".to_string())];
        assert_eq!(s.addrs.to_string(), "198.19.128.128/25");
        assert_eq!(s.addrs6.unwrap().to_string(), "2001:db8:ff::800/117");
        assert_eq!(s.ports, 1024..=65535, "the provider range's ports");
        // Without sections: one owner for both consumer networks, no slices.
        let v = grouped("").unwrap();
        assert_eq!(v.ha.unwrap()[0].networks, ["vpc-c1", "vpc-c2"]);
        assert!(v.nat_slices.is_empty());
    }

    #[test]
    fn a_bad_network_section_is_refused_with_its_key() {
        let first = SLICES.split("[ha.networks.vpc-c2").next().unwrap();
        let cases = [
            (first.to_string(), "ha.networks"),
            (
                SLICES.replace("198.19.128.128/25", "198.19.128.64/26"),
                "ha.networks.vpc-c2.nat.vpc-p",
            ),
            (
                SLICES.replace("198.19.128.128/25", "198.19.129.0/25"),
                "ha.networks.vpc-c2.nat.vpc-p.range",
            ),
            (
                SLICES.replace("range6 = \"2001:db8:ff::800/117\"\n", ""),
                "ha.networks.vpc-c2.nat.vpc-p.range6",
            ),
            (
                SLICES.replace("2001:db8:ff::800/117", "2001:db8:fe::/117"),
                "ha.networks.vpc-c2.nat.vpc-p.range6",
            ),
            (
                SLICES.replace(
                    "[ha.networks.vpc-c2.nat.vpc-p]",
                    "[ha.networks.vpc-c2.nat.vpc-q]",
                ),
                "ha.networks.vpc-c2.nat",
            ),
            (
                format!(
                    "{SLICES}[ha.networks.vpc-p.nat.vpc-p]\nrange = \"198.19.128.0/32\"\nrange6 = \"none\"\n"
                ),
                "ha.networks.vpc-p",
            ),
            (
                SLICES.replace("interface = \"p0\"", "interface = \"eth9\""),
                "ha.networks.vpc-c1.addresses[0].interface",
            ),
        ];
        for (sections, key) in cases {
            let e = grouped(&sections)
                .err()
                .unwrap_or_else(|| panic!("accepted:\n{sections}"));
            assert_eq!(e.key, key, "{e}");
        }
        // Group-wide moving addresses do not mix with per-network ones.
        let text = format!(
            "[[ha.addresses]]\ninterface = \"p0\"\naddress = \"198.18.100.252/24\"\n{SLICES}"
        );
        assert_eq!(grouped(&text).err().unwrap().key, "ha.addresses");
        // Preemption needs a sane delay.
        let text = format!("preempt = true\npreempt_after_ms = 10\n{SLICES}");
        assert_eq!(grouped(&text).err().unwrap().key, "ha.preempt_after_ms");
    }
}
