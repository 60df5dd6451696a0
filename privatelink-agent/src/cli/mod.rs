//! The `privatelink` command line: every control-plane operation over the REST API.
//!
//! Server and token come from flags, then `PRIVATELINK_SERVER` / `PRIVATELINK_TOKEN`, then the
//! config file (`--config`, default `~/.config/privatelink/cli.toml` with `server = ...` and
//! `token = ...`). Errors print the server's code and message and exit non-zero.
use std::io::Write;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use ureq::http::Method;

mod render;

use crate::wire::{
    AddPortMappings, AllowReq, Backends, BindingReq, Bindings, CreateAccount, CreateEndpoint,
    CreateGroup, CreateNetwork, CreateService, CreateSubnet, EndpointIds, PortMappingReq, RuleReq,
    Rules, Tag, UpdateEndpoint, UpdateService,
};

#[derive(Parser, Debug)]
#[command(
    name = "privatelink",
    version,
    about = "privatelink control-plane client",
    after_help = "Times are shown in RFC 3339, UTC. Tables fit the terminal (COLUMNS wins); \
                  -o csv and -o json keep every value. A batch (accept, reject, remove, \
                  disallow) exits 1 when any item failed."
)]
pub struct Cli {
    /// API base URL, e.g. http://127.0.0.1:7070.
    #[arg(long, env = "PRIVATELINK_SERVER", global = true)]
    server: Option<String>,
    /// Bearer token.
    #[arg(long, env = "PRIVATELINK_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Config file with `server` and `token` (default ~/.config/privatelink/cli.toml, mode 600).
    #[arg(long, global = true)]
    config: Option<std::path::PathBuf>,
    /// table (for people), json (everything, as the server sent it) or csv (the table's columns).
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Csv,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Accounts and their tokens (admin token).
    #[command(subcommand)]
    Accounts(AccountCmd),
    /// Networks (VPCs) and subnets.
    #[command(subcommand)]
    Networks(NetworkCmd),
    /// Endpoint services (provider side).
    #[command(subcommand)]
    Services(ServiceCmd),
    /// Endpoints (consumer side).
    #[command(subcommand)]
    Endpoints(EndpointCmd),
    /// Security groups.
    #[command(subcommand, name = "security-groups", alias = "sg")]
    Groups(GroupCmd),
    /// Export services or endpoints as CSV.
    Export {
        /// What to export: services or endpoints.
        #[arg(value_parser = ["services", "endpoints"])]
        kind: String,
        #[command(flatten)]
        list: ListArgs,
    },
    /// The control plane's current revision.
    Revision,
    /// Who the token is: the admin, or an account (id, name).
    Whoami,
    /// The node agents of a shared etcd store: live or gone, last contact, revision and lag
    /// (admin).
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// Traffic history of an endpoint or service, summed over every node that carried it.
    Metrics {
        /// endpoint or service.
        #[arg(value_parser = ["endpoint", "service"])]
        kind: String,
        /// The endpoint's or service's id.
        id: String,
        /// realtime (last hour), 24h, 7d, or FROM..TO (unix seconds or RFC 3339).
        #[arg(long, default_value = "realtime")]
        period: String,
        /// 10s, 1m (realtime only), 1h or 1d (default: 10s for realtime, 1h otherwise).
        #[arg(long)]
        granularity: Option<String>,
        /// A second period of the same length, side by side: its start (unix seconds or RFC
        /// 3339), a FROM..TO (its FROM), or how long before --period (24h, 7d).
        #[arg(long)]
        compare_to: Option<String>,
    },
}

#[derive(Args, Debug, Default)]
struct ListArgs {
    /// Substring of the id or name.
    #[arg(long)]
    search: Option<String>,
    /// Page to show, from 1.
    #[arg(long)]
    page: Option<usize>,
    /// Rows a page (1 to 1000; default 100).
    #[arg(long)]
    per_page: Option<usize>,
    /// Comma-separated fields to show, in this order (id,name,state).
    #[arg(long)]
    fields: Option<String>,
}

impl ListArgs {
    /// The list's query parameters (ureq encodes them).
    fn query(&self) -> Query {
        [
            ("search", self.search.clone()),
            ("page", self.page.map(|p| p.to_string())),
            ("per_page", self.per_page.map(|p| p.to_string())),
            ("fields", self.fields.clone()),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect()
    }
}

/// Query parameters of a request, in order.
type Query = Vec<(&'static str, String)>;

#[derive(Subcommand, Debug)]
enum AccountCmd {
    /// Create an account; prints its first token.
    Create {
        /// The account id (digits or a short name, e.g. 1000000001).
        id: String,
        /// A display name.
        #[arg(long)]
        name: String,
    },
    /// Every account.
    List,
    /// Issue another token for an account.
    Token {
        /// The account id.
        id: String,
    },
    /// List an account's tokens (ids and times, never the secrets).
    Tokens {
        /// The account id.
        id: String,
    },
    /// Issue a new token; the account's others stop at once, or after --grace-secs.
    #[command(name = "rotate-token")]
    RotateToken {
        /// The account id.
        id: String,
        /// Seconds the old tokens keep working (at most a week).
        #[arg(long, default_value_t = 0)]
        grace_secs: u64,
    },
    /// Revoke one token at once (its id from `accounts tokens`).
    #[command(name = "revoke-token")]
    RevokeToken {
        /// The account id.
        id: String,
        /// The token's id (tok-…), not the token.
        token_id: String,
    },
    /// Delete an account that owns nothing; its tokens stop at once.
    Delete {
        /// The account id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum NetworkCmd {
    /// Create a network for an account.
    Create {
        /// A display name.
        #[arg(long)]
        name: String,
        /// The owning account's id.
        #[arg(long)]
        owner: String,
        /// A CIDR of the network (198.18.0.0/16, 2001:db8::/56), repeatable.
        #[arg(long = "cidr", required = true)]
        cidrs: Vec<String>,
    },
    /// Every network the token may see.
    List,
    /// One network.
    Get {
        /// The network's id (vpc-…).
        id: String,
    },
    /// Delete a network without subnets in use.
    Delete {
        /// The network's id (vpc-…).
        id: String,
    },
    /// Create a subnet in a network.
    CreateSubnet {
        /// The network's id (vpc-…).
        network: String,
        /// A display name.
        #[arg(long)]
        name: String,
        /// IPv4, or IPv6 for an IPv6-only subnet.
        #[arg(long)]
        cidr: String,
        /// An IPv6 range next to an IPv4 --cidr (dual-stack subnet).
        #[arg(long)]
        ipv6_cidr: Option<String>,
    },
    /// A network's subnets.
    Subnets {
        /// The network's id (vpc-…).
        network: String,
    },
    /// Delete a subnet no endpoint uses.
    DeleteSubnet {
        /// The network's id (vpc-…).
        network: String,
        /// The subnet's id (subnet-…).
        subnet: String,
    },
}

/// A word the server takes as an enum (`tcp`, `clb`, `accept`...), checked here with the
/// server's own type, so a typo is an error naming the flag and the words it may be.
fn word<T: serde::de::DeserializeOwned>(flag: &str, s: &str) -> anyhow::Result<T> {
    serde_json::from_value(Value::String(s.to_string()))
        .map_err(|e| anyhow::anyhow!("{flag} {s}: {e}"))
}

/// A request body as JSON.
fn body(b: impl serde::Serialize) -> anyhow::Result<Option<Value>> {
    Ok(Some(serde_json::to_value(b)?))
}

/// `key=value` tags.
fn tags(v: &[String]) -> Vec<Tag> {
    v.iter()
        .map(|t| {
            let (k, val) = t.split_once('=').unwrap_or((t, ""));
            Tag {
                key: k.to_string(),
                value: val.to_string(),
            }
        })
        .collect()
}

/// `proto:service_port:terminal_port`, e.g. `tcp:3306:3306`.
fn mappings(v: &[String]) -> anyhow::Result<Vec<PortMappingReq>> {
    v.iter()
        .map(|m| {
            let p: Vec<&str> = m.split(':').collect();
            let [proto, sp, tp] = p[..] else {
                anyhow::bail!("--map {m}: use proto:service_port:terminal_port")
            };
            let port = |s: &str| {
                s.parse::<i64>()
                    .map_err(|_| anyhow::anyhow!("--map {m}: {s} is not a number"))
            };
            Ok(PortMappingReq {
                protocol: word("--map", proto)?,
                service_port: port(sp)?,
                terminal_port: port(tp)?,
            })
        })
        .collect()
}

/// `sg-id:priority`.
fn bindings(v: &[String]) -> anyhow::Result<Vec<BindingReq>> {
    v.iter()
        .map(|b| {
            let (id, p) = b
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--sg {b}: use sg-id:priority"))?;
            let priority = p
                .parse()
                .map_err(|_| anyhow::anyhow!("--sg {b}: priority is a number"))?;
            Ok(BindingReq {
                security_group_id: id.to_string(),
                priority,
            })
        })
        .collect()
}

/// `proto:ports:source:action`, e.g. `tcp:3306:198.18.0.0/16:accept` (IPv6 sources contain ':',
/// so the action is taken from the end).
fn rules(v: &[String]) -> anyhow::Result<Vec<RuleReq>> {
    v.iter()
        .map(|r| {
            let bad = || anyhow::anyhow!("--rule {r}: use proto:ports:source:action");
            let mut it = r.splitn(3, ':');
            let (proto, ports, rest) = (
                it.next().ok_or_else(bad)?,
                it.next().ok_or_else(bad)?,
                it.next().ok_or_else(bad)?,
            );
            let (source, action) = rest.rsplit_once(':').ok_or_else(bad)?;
            Ok(RuleReq {
                protocol: word("--rule", proto)?,
                ports: ports.to_string(),
                source: source.to_string(),
                action: word("--rule", action)?,
                description: String::new(),
            })
        })
        .collect()
}

/// `ENDPOINT_ID=LIMIT` items (an empty one alone: none).
fn endpoint_limits(items: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, u32>> {
    items
        .iter()
        .filter(|i| !i.is_empty())
        .map(|item| {
            item.split_once('=')
                .and_then(|(ep, n)| Some((ep.to_string(), n.parse::<u32>().ok()?)))
                .ok_or_else(|| {
                    anyhow::anyhow!("--endpoint-flow-limit {item}: want ENDPOINT_ID=LIMIT")
                })
        })
        .collect()
}

#[derive(Subcommand, Debug)]
enum ServiceCmd {
    /// Create an endpoint service.
    Create {
        /// A display name.
        #[arg(long)]
        name: String,
        /// The provider network's id (vpc-…) the backends are in.
        #[arg(long)]
        network: String,
        /// clb, mysql, redis or custom.
        #[arg(long = "type", value_parser = ["clb", "mysql", "redis", "custom"])]
        service_type: String,
        /// A backend address in the network, repeatable.
        #[arg(long = "backend", required = true)]
        backends: Vec<String>,
        /// proto:service_port:terminal_port (tcp:8080:80: consumers dial 80, backends get 8080),
        /// repeatable.
        #[arg(long = "map")]
        maps: Vec<String>,
        /// Accept new connections without asking (default: each waits, Pending).
        #[arg(long)]
        auto_accept: bool,
        /// key=value, repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The name consumers' private DNS resolves to their endpoint (e.g. db.example.com).
        #[arg(long)]
        private_dns_name: Option<String>,
        /// Endpoints answer ICMP echo requests (default: dropped and counted).
        #[arg(long)]
        answer_ping: bool,
        /// Most live flows per endpoint on its node (default 0: no limit).
        #[arg(long, default_value_t = 0)]
        flow_limit: u32,
        /// `v2`: a PROXY protocol v2 header in front of each new TCP connection (default: off).
        #[arg(long, default_value = "off")]
        proxy_protocol: String,
        /// Log each connection (opened, closed) on the node that carries it.
        #[arg(long)]
        connection_log: bool,
    },
    /// The caller's services.
    List(ListArgs),
    /// One service, by id, name or service name.
    Get {
        /// The service's id (svc-…), name, or service name.
        id: String,
    },
    /// Change a service's settings (only what is given).
    Update {
        /// The service's id (svc-…).
        id: String,
        /// A new display name.
        #[arg(long)]
        name: Option<String>,
        /// true or false.
        #[arg(long)]
        auto_accept: Option<bool>,
        /// key=value, repeatable: replaces all tags.
        #[arg(long = "tag")]
        tags: Option<Vec<String>>,
        /// A new private DNS name; "" removes it.
        #[arg(long)]
        private_dns_name: Option<String>,
        /// true or false.
        #[arg(long)]
        answer_ping: Option<bool>,
        /// Most live flows per endpoint on its node; 0: no limit.
        #[arg(long)]
        flow_limit: Option<u32>,
        /// ENDPOINT_ID=LIMIT: an endpoint's own limit, repeatable; replaces all such limits
        /// (`--endpoint-flow-limit ""` removes them).
        #[arg(long = "endpoint-flow-limit")]
        endpoint_flow_limits: Option<Vec<String>>,
        /// `v2` or `off`, for connections opened from now on.
        #[arg(long)]
        proxy_protocol: Option<String>,
        /// Log connections from now on (true) or stop (false).
        #[arg(long)]
        connection_log: Option<bool>,
    },
    /// Delete a service without connections.
    Delete {
        /// The service's id (svc-…).
        id: String,
    },
    /// The service's connection log on the node the CLI talks to (opened and closed records).
    ConnectionsLog {
        /// The service's id (svc-…).
        id: String,
        /// Records after this sequence number (the previous page's `next_after`).
        #[arg(long)]
        after: Option<u64>,
        /// At most this many records (1 to 1000; default 100).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Replace the backend targets.
    Backends {
        /// The service's id (svc-…).
        id: String,
        /// A backend address in the network, repeatable.
        #[arg(long = "backend", required = true)]
        backends: Vec<String>,
    },
    /// Add port mappings (they cannot be changed or removed later).
    AddMappings {
        /// The service's id (svc-…).
        id: String,
        /// proto:service_port:terminal_port, repeatable.
        #[arg(long = "map", required = true)]
        maps: Vec<String>,
    },
    /// The accounts allowed to connect.
    Allowlist {
        /// The service's id (svc-…).
        id: String,
    },
    /// Allow an account to connect.
    Allow {
        /// The service's id (svc-…).
        id: String,
        /// The account's id.
        account: String,
        /// Why (shown to the provider).
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Take accounts off the allowlist (one result per account); their Available connections
    /// become Disconnected.
    Disallow {
        /// The service's id (svc-…).
        id: String,
        /// Account ids.
        #[arg(required = true)]
        accounts: Vec<String>,
    },
    /// What a consumer may learn about a service before connecting.
    Verify {
        /// The service's id or service name.
        id: String,
    },
    /// Endpoints connected to the service.
    Connections {
        /// The service's id (svc-…).
        id: String,
    },
    /// Accept pending connections (one result per endpoint).
    Accept {
        /// The service's id (svc-…).
        id: String,
        /// Endpoint ids (ep-…).
        #[arg(required = true)]
        endpoints: Vec<String>,
    },
    /// Reject connections (one result per endpoint).
    Reject {
        /// The service's id (svc-…).
        id: String,
        /// Endpoint ids (ep-…).
        #[arg(required = true)]
        endpoints: Vec<String>,
    },
    /// Remove rejected or disconnected connections from the service (the consumers keep their
    /// endpoints, in state Removed), so that the service can be deleted.
    Remove {
        /// The service's id (svc-…).
        id: String,
        /// Endpoint ids (ep-…).
        #[arg(required = true)]
        endpoints: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum EndpointCmd {
    /// Create an endpoint to a service in one of the caller's networks.
    Create {
        /// A display name.
        #[arg(long)]
        name: String,
        /// The service's id or service name.
        #[arg(long)]
        service: String,
        /// The caller's network id (vpc-…).
        #[arg(long)]
        network: String,
        /// The subnet's id (subnet-…) the address comes from.
        #[arg(long)]
        subnet: String,
        /// ipv4, ipv6 or dualstack (default: the family of the subnet's cidr).
        #[arg(long)]
        ip_address_type: Option<String>,
        /// The address to take (default: one chosen in the subnet).
        #[arg(long)]
        ip: Option<String>,
        /// The IPv6 address of a dualstack endpoint.
        #[arg(long)]
        ipv6: Option<String>,
        /// sg-id:priority (1 is evaluated first), repeatable.
        #[arg(long = "sg")]
        groups: Vec<String>,
        /// key=value, repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Resolve the service's private DNS name to this endpoint in its network.
        #[arg(long)]
        private_dns: bool,
    },
    /// The caller's endpoints.
    List(ListArgs),
    /// One endpoint.
    Get {
        /// The endpoint's id (ep-…).
        id: String,
    },
    /// Change an endpoint's name, tags or private DNS (only what is given).
    Update {
        /// The endpoint's id (ep-…).
        id: String,
        /// A new display name.
        #[arg(long)]
        name: Option<String>,
        /// key=value, repeatable: replaces all tags.
        #[arg(long = "tag")]
        tags: Option<Vec<String>>,
        /// true or false.
        #[arg(long)]
        private_dns: Option<bool>,
    },
    /// Delete an endpoint.
    Delete {
        /// The endpoint's id (ep-…).
        id: String,
    },
    /// Bind a security group at a priority.
    Bind {
        /// The endpoint's id (ep-…).
        id: String,
        /// The security group's id (sg-…).
        group: String,
        /// 1 is evaluated first.
        #[arg(long)]
        priority: u32,
    },
    /// Unbind a security group.
    Unbind {
        /// The endpoint's id (ep-…).
        id: String,
        /// The security group's id (sg-…).
        group: String,
    },
    /// Replace all bindings at once: sg-id:priority ...
    Order {
        /// The endpoint's id (ep-…).
        id: String,
        /// sg-id:priority, in any order (1 is evaluated first).
        #[arg(required = true)]
        bindings: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum NodesCmd {
    /// Every node that reported to the store.
    List,
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Create a security group.
    Create {
        /// A display name.
        #[arg(long)]
        name: String,
        /// proto:ports:source:action (tcp:80-90:198.18.0.0/16:accept), repeatable, in
        /// evaluation order.
        #[arg(long = "rule")]
        rules: Vec<String>,
        /// key=value, repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// The caller's security groups.
    List(ListArgs),
    /// One security group.
    Get {
        /// The security group's id (sg-…).
        id: String,
    },
    /// Replace the rules.
    Rules {
        /// The security group's id (sg-…).
        id: String,
        /// proto:ports:source:action, repeatable, in evaluation order.
        #[arg(long = "rule")]
        rules: Vec<String>,
    },
    /// Delete a security group no endpoint uses.
    Delete {
        /// The security group's id (sg-…).
        id: String,
    },
}

/// A request the command turns into.
struct Req {
    method: Method,
    path: String,
    query: Query,
    body: Option<Value>,
}

fn req(method: Method, path: impl Into<String>, body: Option<Value>) -> Req {
    Req {
        method,
        path: path.into(),
        query: Query::new(),
        body,
    }
}

impl Req {
    fn with_query(mut self, query: Query) -> Self {
        self.query.extend(query);
        self
    }
}

fn request(cmd: &Command) -> anyhow::Result<Req> {
    use Command as C;
    Ok(match cmd {
        C::Accounts(AccountCmd::Create { id, name }) => req(
            Method::POST,
            "/v1/accounts",
            body(CreateAccount {
                id: id.clone(),
                name: name.clone(),
            })?,
        ),
        C::Accounts(AccountCmd::List) => req(Method::GET, "/v1/accounts", None),
        C::Accounts(AccountCmd::Token { id }) => req(
            Method::POST,
            format!("/v1/accounts/{id}/tokens"),
            Some(json!({})),
        ),
        C::Accounts(AccountCmd::Tokens { id }) => {
            req(Method::GET, format!("/v1/accounts/{id}/tokens"), None)
        }
        C::Accounts(AccountCmd::RotateToken { id, grace_secs }) => req(
            Method::POST,
            format!("/v1/accounts/{id}/tokens/rotate"),
            body(crate::wire::RotateReq {
                grace_secs: *grace_secs,
            })?,
        ),
        C::Accounts(AccountCmd::RevokeToken { id, token_id }) => req(
            Method::DELETE,
            format!("/v1/accounts/{id}/tokens/{token_id}"),
            None,
        ),
        C::Accounts(AccountCmd::Delete { id }) => {
            req(Method::DELETE, format!("/v1/accounts/{id}"), None)
        }
        C::Networks(n) => match n {
            NetworkCmd::Create { name, owner, cidrs } => req(
                Method::POST,
                "/v1/networks",
                body(CreateNetwork {
                    name: name.clone(),
                    owner: owner.clone(),
                    cidrs: cidrs.clone(),
                })?,
            ),
            NetworkCmd::List => req(Method::GET, "/v1/networks", None),
            NetworkCmd::Get { id } => req(Method::GET, format!("/v1/networks/{id}"), None),
            NetworkCmd::Delete { id } => req(Method::DELETE, format!("/v1/networks/{id}"), None),
            NetworkCmd::CreateSubnet {
                network,
                name,
                cidr,
                ipv6_cidr,
            } => req(
                Method::POST,
                format!("/v1/networks/{network}/subnets"),
                body(CreateSubnet {
                    name: name.clone(),
                    cidr: cidr.clone(),
                    ipv6_cidr: ipv6_cidr.clone(),
                })?,
            ),
            NetworkCmd::Subnets { network } => {
                req(Method::GET, format!("/v1/networks/{network}/subnets"), None)
            }
            NetworkCmd::DeleteSubnet { network, subnet } => req(
                Method::DELETE,
                format!("/v1/networks/{network}/subnets/{subnet}"),
                None,
            ),
        },
        C::Services(s) => match s {
            ServiceCmd::Create {
                name,
                network,
                service_type,
                backends,
                maps,
                auto_accept,
                tags: t,
                private_dns_name,
                answer_ping,
                flow_limit,
                proxy_protocol,
                connection_log,
            } => req(
                Method::POST,
                "/v1/services",
                body(CreateService {
                    name: name.clone(),
                    network_id: network.clone(),
                    service_type: word("--type", service_type)?,
                    backends: backends.clone(),
                    port_mappings: mappings(maps)?,
                    auto_accept: *auto_accept,
                    tags: tags(t),
                    health_check: Default::default(),
                    private_dns_name: private_dns_name.clone(),
                    answer_ping: *answer_ping,
                    flow_limit: *flow_limit,
                    proxy_protocol: word("--proxy-protocol", proxy_protocol)?,
                    connection_log: *connection_log,
                })?,
            ),
            ServiceCmd::List(l) => req(Method::GET, "/v1/services", None).with_query(l.query()),
            ServiceCmd::Get { id } => req(Method::GET, format!("/v1/services/{id}"), None),
            ServiceCmd::Update {
                id,
                name,
                auto_accept,
                tags: t,
                private_dns_name,
                answer_ping,
                flow_limit,
                endpoint_flow_limits,
                proxy_protocol,
                connection_log,
            } => {
                let b = UpdateService {
                    name: name.clone(),
                    auto_accept: *auto_accept,
                    tags: t.as_deref().map(tags),
                    health_check: None,
                    private_dns_name: private_dns_name.clone(),
                    answer_ping: *answer_ping,
                    flow_limit: *flow_limit,
                    endpoint_flow_limits: endpoint_flow_limits
                        .as_deref()
                        .map(endpoint_limits)
                        .transpose()?,
                    proxy_protocol: proxy_protocol
                        .as_deref()
                        .map(|w| word("--proxy-protocol", w))
                        .transpose()?,
                    connection_log: *connection_log,
                };
                req(Method::PATCH, format!("/v1/services/{id}"), body(b)?)
            }
            ServiceCmd::Delete { id } => req(Method::DELETE, format!("/v1/services/{id}"), None),
            ServiceCmd::ConnectionsLog { id, after, limit } => req(
                Method::GET,
                format!("/v1/services/{id}/connections-log"),
                None,
            )
            .with_query(
                [
                    ("after", after.map(|a| a.to_string())),
                    ("limit", limit.map(|l| l.to_string())),
                ]
                .into_iter()
                .filter_map(|(k, v)| Some((k, v?)))
                .collect(),
            ),
            ServiceCmd::Backends { id, backends } => req(
                Method::PUT,
                format!("/v1/services/{id}/backends"),
                body(Backends {
                    backends: backends.clone(),
                })?,
            ),
            ServiceCmd::AddMappings { id, maps } => req(
                Method::POST,
                format!("/v1/services/{id}/port-mappings"),
                body(AddPortMappings {
                    port_mappings: mappings(maps)?,
                })?,
            ),
            ServiceCmd::Allowlist { id } => {
                req(Method::GET, format!("/v1/services/{id}/allowlist"), None)
            }
            ServiceCmd::Allow {
                id,
                account,
                description,
            } => req(
                Method::POST,
                format!("/v1/services/{id}/allowlist"),
                body(AllowReq {
                    account_id: account.clone(),
                    description: description.clone(),
                })?,
            ),
            ServiceCmd::Disallow { id, accounts } => match accounts.as_slice() {
                [one] => req(
                    Method::DELETE,
                    format!("/v1/services/{id}/allowlist/{one}"),
                    None,
                ),
                many => req(
                    Method::POST,
                    format!("/v1/services/{id}/disallow"),
                    body(crate::wire::AllowRemoveReq {
                        account_ids: many.to_vec(),
                    })?,
                ),
            },
            ServiceCmd::Remove { id, endpoints } => req(
                Method::POST,
                format!("/v1/services/{id}/remove"),
                body(EndpointIds {
                    endpoint_ids: endpoints.clone(),
                })?,
            ),
            ServiceCmd::Verify { id } => {
                req(Method::GET, format!("/v1/services/{id}/verify"), None)
            }
            ServiceCmd::Connections { id } => {
                req(Method::GET, format!("/v1/services/{id}/endpoints"), None)
            }
            ServiceCmd::Accept { id, endpoints } => req(
                Method::POST,
                format!("/v1/services/{id}/accept"),
                body(EndpointIds {
                    endpoint_ids: endpoints.clone(),
                })?,
            ),
            ServiceCmd::Reject { id, endpoints } => req(
                Method::POST,
                format!("/v1/services/{id}/reject"),
                body(EndpointIds {
                    endpoint_ids: endpoints.clone(),
                })?,
            ),
        },
        C::Endpoints(e) => match e {
            EndpointCmd::Create {
                name,
                service,
                network,
                subnet,
                ip_address_type,
                ip,
                ipv6,
                groups,
                tags: t,
                private_dns,
            } => {
                let b = CreateEndpoint {
                    name: name.clone(),
                    service_id: service.clone(),
                    network_id: network.clone(),
                    subnet_id: subnet.clone(),
                    ip_address_type: ip_address_type
                        .as_deref()
                        .map(|w| word("--ip-address-type", w))
                        .transpose()?,
                    ip: ip.clone(),
                    ipv6: ipv6.clone(),
                    security_groups: bindings(groups)?,
                    tags: tags(t),
                    private_dns_enabled: *private_dns,
                };
                req(Method::POST, "/v1/endpoints", body(b)?)
            }
            EndpointCmd::List(l) => req(Method::GET, "/v1/endpoints", None).with_query(l.query()),
            EndpointCmd::Get { id } => req(Method::GET, format!("/v1/endpoints/{id}"), None),
            EndpointCmd::Update {
                id,
                name,
                tags: t,
                private_dns,
            } => {
                let b = UpdateEndpoint {
                    name: name.clone(),
                    tags: t.as_deref().map(tags),
                    private_dns_enabled: *private_dns,
                };
                req(Method::PATCH, format!("/v1/endpoints/{id}"), body(b)?)
            }
            EndpointCmd::Delete { id } => req(Method::DELETE, format!("/v1/endpoints/{id}"), None),
            EndpointCmd::Bind {
                id,
                group,
                priority,
            } => req(
                Method::POST,
                format!("/v1/endpoints/{id}/security-groups"),
                body(BindingReq {
                    security_group_id: group.clone(),
                    priority: *priority,
                })?,
            ),
            EndpointCmd::Unbind { id, group } => req(
                Method::DELETE,
                format!("/v1/endpoints/{id}/security-groups/{group}"),
                None,
            ),
            EndpointCmd::Order { id, bindings: b } => req(
                Method::PUT,
                format!("/v1/endpoints/{id}/security-groups"),
                body(Bindings {
                    security_groups: bindings(b)?,
                })?,
            ),
        },
        C::Groups(g) => match g {
            GroupCmd::Create {
                name,
                rules: r,
                tags: t,
            } => req(
                Method::POST,
                "/v1/security-groups",
                body(CreateGroup {
                    name: name.clone(),
                    rules: rules(r)?,
                    tags: tags(t),
                })?,
            ),
            GroupCmd::List(l) => {
                req(Method::GET, "/v1/security-groups", None).with_query(l.query())
            }
            GroupCmd::Get { id } => req(Method::GET, format!("/v1/security-groups/{id}"), None),
            GroupCmd::Rules { id, rules: r } => req(
                Method::PUT,
                format!("/v1/security-groups/{id}/rules"),
                body(Rules { rules: rules(r)? })?,
            ),
            GroupCmd::Delete { id } => {
                req(Method::DELETE, format!("/v1/security-groups/{id}"), None)
            }
        },
        C::Export { kind, list } => {
            req(Method::GET, format!("/v1/export/{kind}.csv"), None).with_query(list.query())
        }
        C::Revision => req(Method::GET, "/v1/revision", None),
        C::Whoami => req(Method::GET, "/v1/me", None),
        C::Nodes(NodesCmd::List) => req(Method::GET, "/v1/nodes", None),
        C::Metrics {
            kind,
            id,
            period,
            granularity,
            compare_to,
        } => {
            let query = [
                ("period", Some(period.clone())),
                ("granularity", granularity.clone()),
                ("compare_to", compare_to.clone()),
            ];
            req(Method::GET, format!("/v1/history/{kind}/{id}"), None).with_query(
                query
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v?)))
                    .collect(),
            )
        }
    })
}

#[derive(serde::Deserialize, Default)]
struct FileConfig {
    server: Option<String>,
    token: Option<String>,
}

fn file_config(path: Option<&std::path::Path>) -> anyhow::Result<FileConfig> {
    let default = std::env::var_os("HOME")
        .map(|h| std::path::PathBuf::from(h).join(".config/privatelink/cli.toml"));
    let Some(path) = path.map(|p| p.to_path_buf()).or(default) else {
        return Ok(FileConfig::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let c: FileConfig =
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if c.token.is_some() && mode & 0o077 != 0 {
                anyhow::bail!(
                    "{} holds a token and is readable or writable by others (mode {:o}): run \
                     chmod 600 {}",
                    path.display(),
                    mode & 0o777,
                    path.display()
                );
            }
            Ok(c)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// Runs the CLI with `args` (including the program name); returns the exit code.
pub fn run(
    args: impl IntoIterator<Item = String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        // `--help` and `--version` are answers: standard output, exit 0.
        Err(e) if !e.use_stderr() => {
            let _ = write!(out, "{}", e.render());
            return 0;
        }
        Err(e) => {
            let _ = write!(err, "{}", e.render());
            return 2;
        }
    };
    match execute(&cli, out, err) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "error: {e:#}");
            1
        }
    }
}

fn execute(cli: &Cli, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<i32> {
    let file = file_config(cli.config.as_deref())?;
    let server = cli
        .server
        .clone()
        .or(file.server)
        .unwrap_or_else(|| "http://127.0.0.1:7070".into());
    let token = cli.token.clone().or(file.token).ok_or_else(|| {
        anyhow::anyhow!("no token: pass --token, set PRIVATELINK_TOKEN, or put token = \"...\" in the config file")
    })?;
    let mut r = request(&cli.command)?;
    // History as CSV comes from the server, with the comparison side by side.
    let history_csv = matches!(cli.command, Command::Metrics { .. }) && cli.output == Output::Csv;
    if history_csv {
        r.query.push(("format", "csv".into()));
    }
    let api = Api {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into(),
        server: server.trim_end_matches('/').to_string(),
        auth: format!("Bearer {token}"),
    };
    let (mut status, mut text) = api.send(&r)?;
    // A service by its name: not an id, so look among the caller's services for one whose name
    // or service name it is.
    if let (404, Command::Services(ServiceCmd::Get { id })) = (status, &cli.command)
        && let Some(found) = api.service_named(id)?
    {
        (status, text) = (200, found.to_string());
    }
    if !(200..300).contains(&status) {
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let e = &v["error"];
        let field = e["field"]
            .as_str()
            .map(|f| format!(" (field {f})"))
            .unwrap_or_default();
        anyhow::bail!(
            "{status} {}: {}{field}",
            e["code"].as_str().unwrap_or("error"),
            e["message"].as_str().unwrap_or(&text)
        );
    }
    if matches!(cli.command, Command::Export { .. }) || history_csv {
        out.write_all(text.as_bytes())?;
        return Ok(0);
    }
    if text.is_empty() {
        return Ok(0);
    }
    let v: Value = serde_json::from_str(&text)?;
    let view = render::View {
        output: cli.output,
        fields: list_args(&cli.command).and_then(|l| l.fields.as_deref()),
        empty: empty_columns(&cli.command),
        width: render::terminal_width(),
    };
    render::render(&v, &view, out)?;
    // A batch answers for each item: any that failed makes the command fail.
    let failed: Vec<String> = v["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["ok"] == false)
        .map(|r| {
            let item = r["endpoint_id"]
                .as_str()
                .or(r["account_id"].as_str())
                .unwrap_or("?");
            format!("{item}: {}", r["error"].as_str().unwrap_or("failed"))
        })
        .collect();
    if !failed.is_empty() {
        let total = v["results"].as_array().map_or(0, Vec::len);
        writeln!(
            err,
            "error: {} of {total} failed: {}",
            failed.len(),
            failed.join("; ")
        )?;
        return Ok(1);
    }
    Ok(0)
}

/// The server and the caller's credentials.
struct Api {
    agent: ureq::Agent,
    server: String,
    auth: String,
}

impl Api {
    /// Sends `r`: the status and the body.
    fn send(&self, r: &Req) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{}", self.server, r.path);
        let query = r.query.iter().map(|(k, v)| (*k, v.as_str()));
        let resp = if r.method == Method::GET || r.method == Method::DELETE {
            let rb = if r.method == Method::GET {
                self.agent.get(&url)
            } else {
                self.agent.delete(&url)
            };
            rb.query_pairs(query)
                .header("Authorization", &self.auth)
                .call()
        } else {
            let rb = if r.method == Method::POST {
                self.agent.post(&url)
            } else if r.method == Method::PUT {
                self.agent.put(&url)
            } else {
                self.agent.patch(&url)
            };
            rb.query_pairs(query)
                .header("Authorization", &self.auth)
                .header("Content-Type", "application/json")
                .send(r.body.clone().unwrap_or(json!({})).to_string())
        };
        let mut resp = resp.map_err(|e| anyhow::anyhow!("{}: {e}", self.server))?;
        let status = resp.status().as_u16();
        Ok((status, resp.body_mut().read_to_string()?))
    }

    /// The caller's one service named `name` (its name or its service name); an error when
    /// several have that name.
    fn service_named(&self, name: &str) -> anyhow::Result<Option<Value>> {
        // Every page of the caller's services (a service name is not a search term).
        let mut all: Vec<Value> = Vec::new();
        for page in 1.. {
            let list = req(Method::GET, "/v1/services", None).with_query(vec![
                ("page", page.to_string()),
                ("per_page", "1000".into()),
            ]);
            let (status, text) = self.send(&list)?;
            if status != 200 {
                return Ok(None);
            }
            let v: Value = serde_json::from_str(&text)?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            let done = items.len() < 1000;
            all.extend(items);
            if done {
                break;
            }
        }
        let hits: Vec<&Value> = all
            .iter()
            .filter(|s| s["name"] == name || s["service_name"] == name)
            .collect();
        match hits[..] {
            [] => Ok(None),
            [one] => Ok(Some(one.clone())),
            ref many => anyhow::bail!(
                "{} services are named {name:?}: {}; give an id",
                many.len(),
                many.iter()
                    .filter_map(|s| s["id"].as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// The list options of a list command.
fn list_args(cmd: &Command) -> Option<&ListArgs> {
    match cmd {
        Command::Services(ServiceCmd::List(l))
        | Command::Endpoints(EndpointCmd::List(l))
        | Command::Groups(GroupCmd::List(l))
        | Command::Export { list: l, .. } => Some(l),
        _ => None,
    }
}

/// The header of an empty list, by command.
fn empty_columns(cmd: &Command) -> &'static [&'static str] {
    use Command as C;
    match cmd {
        C::Services(ServiceCmd::List(_)) => &[
            "id",
            "name",
            "service_type",
            "service_name",
            "port_mappings",
            "auto_accept",
            "created_time",
        ],
        C::Services(ServiceCmd::Allowlist { .. }) => &["account_id", "description", "created_time"],
        C::Services(ServiceCmd::Connections { .. }) => {
            &["endpoint_id", "state", "owner", "link_id", "created_time"]
        }
        C::Services(ServiceCmd::ConnectionsLog { .. }) => &["seq", "time", "event", "endpoint_id"],
        C::Endpoints(EndpointCmd::List(_)) => &[
            "id",
            "name",
            "state",
            "service_id",
            "ip",
            "dns_name",
            "security_groups",
            "created_time",
        ],
        C::Groups(GroupCmd::List(_)) => &["id", "name", "rules", "tags", "created_time"],
        C::Accounts(AccountCmd::List) => &["id", "name", "number", "created_time"],
        C::Accounts(AccountCmd::Tokens { .. }) => {
            &["id", "account_id", "created_time", "expires_time"]
        }
        C::Networks(NetworkCmd::List) => &["id", "name", "owner", "cidrs", "created_time"],
        C::Networks(NetworkCmd::Subnets { .. }) => &[
            "id",
            "name",
            "cidr",
            "ipv6_cidr",
            "network_id",
            "created_time",
        ],
        C::Nodes(_) => &[
            "node",
            "status",
            "revision",
            "lag",
            "last_contact",
            "reported_time",
        ],
        C::Metrics { .. } => &[
            "time",
            "fwd_bytes",
            "rev_bytes",
            "fwd_packets",
            "rev_packets",
            "new_connections",
            "max_active_connections",
            "drops",
        ],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(args: &[&str]) -> anyhow::Result<Value> {
        let cli = Cli::try_parse_from(["privatelink"].iter().chain(args))?;
        Ok(request(&cli.command)?.body.unwrap_or(Value::Null))
    }

    #[test]
    fn bodies_are_the_servers_request_types_and_leave_out_what_was_not_given() {
        let b = body_of(&["services", "update", "svc-1", "--flow-limit", "5"]).unwrap();
        assert_eq!(
            b,
            json!({ "flow_limit": 5 }),
            "a PATCH names only what changes"
        );
        let b = body_of(&[
            "services",
            "create",
            "--name",
            "db",
            "--network",
            "vpc-1",
            "--type",
            "mysql",
            "--backend",
            "198.18.100.10",
            "--map",
            "tcp:3306:3306",
        ])
        .unwrap();
        let back: crate::wire::CreateService = serde_json::from_value(b).unwrap();
        assert_eq!(back.port_mappings[0].service_port, 3306);
        assert_eq!(back.service_type, crate::wire::ServiceType::Mysql);
        for (args, says) in [
            (
                &[
                    "services",
                    "update",
                    "svc-1",
                    "--endpoint-flow-limit",
                    "ep-1",
                ][..],
                "ENDPOINT_ID=LIMIT",
            ),
            (
                &["services", "add-mappings", "svc-1", "--map", "sctp:1:2"][..],
                "--map sctp: unknown variant `sctp`",
            ),
            (
                &[
                    "security-groups",
                    "create",
                    "--name",
                    "g",
                    "--rule",
                    "tcp:80:198.18.0.0/16:allow",
                ][..],
                "--rule allow",
            ),
        ] {
            let e = body_of(args).unwrap_err().to_string();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }
}

#[cfg(test)]
mod help {
    use clap::CommandFactory;

    use super::*;

    /// Every argument of every command, and every command, has a help line.
    #[test]
    fn every_option_and_command_says_what_it_takes() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if id != "help" && id != "version" && a.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for s in c.get_subcommands() {
                let p = format!("{path} {}", s.get_name());
                if s.get_about().is_none() && s.get_name() != "help" {
                    missing.push(format!("{p} (command)"));
                }
                walk(s, &p, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "privatelink", &mut missing);
        assert!(missing.is_empty(), "no help line:\n{}", missing.join("\n"));
    }
}
