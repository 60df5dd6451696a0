//! The embedded default topology, used by `privatelink-agent demo` and the namespace tests:
//! two consumer networks with the same CIDR (198.18.0.0/24, client .10, endpoint .100), a node
//! running the datapath natively on its veths, and a provider network (198.18.100.0/24, backend .10)
//! that routes the NAT range (198.19.128.0/20) back to the node. Every network is dual-stack: the
//! consumers share 2001:db8::/64 too (client ::10, endpoint ::100), the provider has
//! 2001:db8:64::/64 (node ::1, backend ::10) and routes the IPv6 NAT range (2001:db8:ff::/116) to
//! the node. Everything lives in namespaces created here and deleted on drop.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use hickory_server::proto::rr::RecordType;

use anyhow::{Context as _, Result, bail};
use aya::programs::xdp::XdpMode;

use crate::{
    datapath::loader::{Datapath, Sizes},
    datapath::{Iface, Link, LinkProxy, LinkState, Model, NatRange, PortMap, Proto, Role, Service},
    testkit::netns::{Netns, veth},
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The consumers' IPv6 client address (the same in every consumer network: they overlap).
pub const CLIENT6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
/// The node's IPv6 address on the provider network, where the IPv6 NAT range is routed.
pub const NODE6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 1);
pub const ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
pub const NAT_RANGE: &str = "198.19.128.0/20";
/// The IPv6 source-NAT range (the default of `[nat.<network>] range6`).
pub const NAT_RANGE6: &str = crate::node::config::DEFAULT_NAT_RANGE6;
/// IPv6 addresses of the fixtures' dual-stack endpoint and backend.
pub const ENDPOINT6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
pub const BACKEND6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 0x10);
pub const PROVIDER_NET: u32 = 100;
pub const SERVICE: u32 = 1;
/// Terminal → service ports of the demo service.
pub const TCP_PORTS: (u16, u16) = (80, 8080);
pub const UDP_PORTS: (u16, u16) = (53, 5353);

/// The namespaces and the node's interface facts.
pub struct Topology {
    pub consumers: Vec<Netns>,
    pub node: Netns,
    pub provider: Netns,
    /// Node-side consumer interfaces (one per consumer network): (name, ifindex, MAC).
    pub consumer_ifaces: Vec<(String, u32, [u8; 6])>,
    pub provider_iface: (String, u32, [u8; 6]),
}

impl Topology {
    /// Builds `consumers` consumer networks (same CIDR each), the node and the provider.
    pub fn build(consumers: usize) -> Result<Self> {
        let node = Netns::new("nd")?;
        let provider = Netns::new("pv")?;
        let mut cons = Vec::new();
        let mut consumer_ifaces = Vec::new();
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        // The IPv6 datapath's FIB lookups need forwarding on.
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for i in 0..consumers {
            let ns = Netns::new(&format!("c{i}"))?;
            let dev = format!("c{i}");
            veth(&node, &dev, &ns, "eth0")?;
            ns.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{CLIENT6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            consumer_ifaces.push((dev.clone(), node.ifindex(&dev)?, node.mac(&dev)?));
            cons.push(ns);
        }
        veth(&node, "p0", &provider, "eth0")?;
        node.ip(&["addr", "add", "198.18.100.1/24", "dev", "p0"])?;
        node.ip(&["addr", "add", &format!("{NODE6}/64"), "dev", "p0", "nodad"])?;
        provider.ip(&["addr", "add", &format!("{BACKEND}/24"), "dev", "eth0"])?;
        provider.ip(&[
            "addr",
            "add",
            &format!("{BACKEND6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        provider.ip(&["route", "add", NAT_RANGE, "via", "198.18.100.1"])?;
        provider.ip(&["route", "add", NAT_RANGE6, "via", &NODE6.to_string()])?;
        let provider_iface = ("p0".to_string(), node.ifindex("p0")?, node.mac("p0")?);
        Ok(Topology {
            consumers: cons,
            node,
            provider,
            consumer_ifaces,
            provider_iface,
        })
    }

    /// Attaches the datapath (native mode) on the node's interfaces and the pass program on the
    /// peers that receive redirected frames.
    pub fn attach(&self, dp: &mut Datapath) -> Result<()> {
        let node_devs: Vec<String> = self
            .consumer_ifaces
            .iter()
            .map(|c| c.0.clone())
            .chain([self.provider_iface.0.clone()])
            .collect();
        self.node.enter(|| -> Result<()> {
            for dev in &node_devs {
                dp.program()
                    .attach(dev, XdpMode::Driver)
                    .with_context(|| format!("attaching to {dev}"))?;
            }
            Ok(())
        })?;
        self.attach_pass(dp)
    }

    /// Only the pass program on the consumer and provider peers (when an agent process attaches the
    /// datapath on the node itself).
    pub fn attach_pass(&self, dp: &mut Datapath) -> Result<()> {
        for ns in self.consumers.iter().chain([&self.provider]) {
            ns.enter(|| dp.pass_program().attach("eth0", XdpMode::Driver))
                .with_context(|| format!("attaching the pass program in {}", ns.name()))?;
        }
        Ok(())
    }

    /// One service with the backend, one Available endpoint at `ENDPOINT` per consumer network
    /// (link id = network id = 1 + index), each in its own account, all allowlisted.
    pub fn model(&self) -> Model {
        let mut ifaces = Vec::new();
        let mut links = BTreeMap::new();
        for (i, (_, ifindex, mac)) in self.consumer_ifaces.iter().enumerate() {
            let id = 1 + i as u32;
            ifaces.push(Iface {
                ifindex: *ifindex,
                vlan_id: 0,
                network_id: id,
                role: Role::Consumer,
                mac: *mac,
            });
            links.insert(id, endpoint_link(id, id));
        }
        let (_, p_ifindex, p_mac) = &self.provider_iface;
        ifaces.push(Iface {
            ifindex: *p_ifindex,
            vlan_id: 0,
            network_id: PROVIDER_NET,
            role: Role::Provider,
            mac: *p_mac,
        });
        service_model(ifaces, links)
    }
}

/// An Available endpoint at `ENDPOINT` in `network_id` for `account`, serving the demo service's
/// port mappings (tcp 80→8080, udp 53→5353), no security group bound.
pub fn endpoint_link(network_id: u32, account: u32) -> Link {
    Link {
        network_id,
        ip4: Some(ENDPOINT),
        ip6: None,
        service_slot: SERVICE,
        account,
        state: LinkState::Available,
        ports: [
            PortMap {
                proto: Proto::Tcp,
                terminal: TCP_PORTS.0,
                service: TCP_PORTS.1,
            },
            PortMap {
                proto: Proto::Udp,
                terminal: UDP_PORTS.0,
                service: UDP_PORTS.1,
            },
        ]
        .into(),
        rules: None,
        answer_ping: false,
        flow_limit: 0,
        proxy: LinkProxy {
            v2: false,
            endpoint_id: format!("ep-{network_id:08x}"),
            account_id: format!("acct-{account}"),
        },
        conn_log: false,
        nat_slot: PROVIDER_NET,
    }
}

/// The demo service (backends `BACKEND` and `BACKEND6` in `PROVIDER_NET`, NAT ranges `NAT_RANGE`
/// and `NAT_RANGE6`) with the given interfaces and links; every link's account is allowlisted.
pub fn service_model(ifaces: Vec<Iface>, links: BTreeMap<u32, Link>) -> Model {
    let allowlist: BTreeSet<(u32, u32)> = links.values().map(|l| (SERVICE, l.account)).collect();
    Model {
        config: Default::default(),
        ifaces,
        nat: BTreeMap::from([(
            PROVIDER_NET,
            NatRange {
                addrs: NAT_RANGE.parse().expect("constant"),
                addrs6: Some(NAT_RANGE6.parse().expect("constant")),
                ports: 1024..=65535,
            },
        )]),
        services: BTreeMap::from([(
            SERVICE,
            Service {
                provider_network: PROVIDER_NET,
                backends: vec![BACKEND.into(), BACKEND6.into()],
            },
        )]),
        links,
        allowlist,
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);
const ADMIN_TOKEN: &str = "demo-admin-token-0123456789";
/// Where the agent serves inside the node namespace.
pub const API: &str = "127.0.0.1:7070";
pub const METRICS: &str = "127.0.0.1:9464";
/// The demo's private DNS: the name the provider publishes, and where each consumer network asks.
const PRIVATE_NAME: &str = "echo.demo.example";
const DNS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Files of one demo run, removed on drop.
struct DemoDir(std::path::PathBuf);

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An HTTP call to the agent, made from inside the node namespace (where it listens).
fn call(
    topo: &Topology,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    let (token, method, url) = (
        token.to_string(),
        method.to_string(),
        format!("http://{API}{path}"),
    );
    topo.node.enter(move || -> Result<serde_json::Value> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(IO_TIMEOUT))
            .build()
            .into();
        let auth = format!("Bearer {token}");
        let mut r = if method == "GET" {
            agent.get(&url).header("Authorization", &auth).call()?
        } else {
            agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_default().to_string())?
        };
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string()?;
        if !(200..300).contains(&status) {
            bail!("{method} {url}: {status} {text}");
        }
        Ok(serde_json::from_str(&text)?)
    })
}

/// What `prepare_store` made, in the order asked.
pub struct Prepared {
    /// Each account's API token.
    pub tokens: Vec<String>,
    /// Each account's (network id, subnet id).
    pub vpcs: Vec<(String, String)>,
}

/// Accounts, each with a network and one subnet, made through `plane` with the control-plane
/// operations. Entries are (account id, network CIDRs, subnet CIDR); several network CIDRs are
/// separated by commas, and a subnet written `v4,v6` is dual-stack.
pub fn prepare(
    plane: &crate::control::plane::ControlPlane,
    accounts: &[(&str, &str, &str)],
) -> Result<Prepared> {
    use crate::control::{
        ops::{Caller, accounts as ops},
        plane::new_token,
    };
    let (mut tokens, mut vpcs) = (Vec::new(), Vec::new());
    for &(id, cidr, subnet) in accounts {
        let req = ops::CreateAccount {
            id: id.into(),
            name: id.into(),
        };
        let secret = new_token();
        tokens.push(
            plane
                .mutate(&Caller::Admin, |s, cx| {
                    ops::create_account(s, cx, req, secret)
                })?
                .token,
        );
        let req = ops::CreateNetwork {
            name: format!("{id}-vpc"),
            owner: id.into(),
            cidrs: cidr.split(',').map(str::to_string).collect(),
        };
        let n = plane.mutate(&Caller::Admin, |s, cx| ops::create_network(s, cx, req))?;
        let mut ranges = subnet.split(',');
        let sub = ops::CreateSubnet {
            name: "main".into(),
            cidr: ranges.next().unwrap_or_default().into(),
            ipv6_cidr: ranges.next().map(str::to_string),
        };
        let sn = plane.mutate(&Caller::Admin, |s, cx| {
            ops::create_subnet(s, cx, &n.id, sub)
        })?;
        vpcs.push((n.id, sn.id));
    }
    Ok(Prepared { tokens, vpcs })
}

/// agent.toml for the topology: `head` (top-level keys and tables), then consumer interface i in
/// network `vpcs[1 + i]`, the provider interface and the NAT range in network `vpcs[0]`.
pub fn agent_config(topo: &Topology, vpcs: &[(String, String)], head: &str) -> String {
    let mut cfg = head.to_string();
    for (i, (name, _, _)) in topo.consumer_ifaces.iter().enumerate() {
        cfg += &format!(
            "[[interfaces]]\nname = \"{name}\"\nnetwork = \"{}\"\nrole = \"consumer\"\n",
            vpcs[1 + i].0
        );
    }
    cfg += &format!(
        "[[interfaces]]\nname = \"{}\"\nnetwork = \"{}\"\nrole = \"provider\"\n",
        topo.provider_iface.0, vpcs[0].0
    );
    cfg += &format!("[nat.{}]\nrange = \"{NAT_RANGE}\"\n", vpcs[0].0);
    cfg
}

/// The embedded default: two consumer networks with the same CIDR, a provider with a real backend,
/// and the real agent on the node. Accounts and networks are made with the control-plane code; the
/// service, endpoints (dual-stack) and acceptance go through the agent's API; real TCP and UDP
/// requests go through both endpoints over IPv4 and IPv6; the per-link counters come from the agent's /metrics. With `once` it
/// stops after printing; otherwise the agent serves its API and metrics until Ctrl-C. Namespaces,
/// pins and files are removed on exit, also after a failure.
/// What a demo run did, for programs (`privatelink-demo --report FILE`): what it created, every
/// exchange through the endpoints and the links' counters.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// The namespaces it made (all gone once it returns).
    pub namespaces: Vec<String>,
    /// The bpffs directory the agent pinned under (gone once it returns).
    pub pins: String,
    pub exchanges: Vec<Exchange>,
    pub links: Vec<LinkCounters>,
}

/// One consumer's requests by name over one family.
#[derive(Debug, serde::Serialize)]
pub struct Exchange {
    /// 1 or 2.
    pub consumer: usize,
    /// `A` or `AAAA`.
    pub record: String,
    /// What the network's private DNS answered.
    pub resolved: IpAddr,
    /// The backend's greeting over TCP (it names the source address it saw).
    pub tcp_reply: String,
    pub udp_echo_ok: bool,
}

/// A link's counters as the agent's metrics report them.
#[derive(Debug, serde::Serialize)]
pub struct LinkCounters {
    pub endpoint: String,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub new_connections: u64,
}

pub fn run(once: bool) -> Result<Report> {
    let topo = Topology::build(2).context("building the demo namespaces")?;
    let dir =
        DemoDir(std::env::temp_dir().join(format!("privatelink-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let mut report = Report {
        namespaces: [&topo.node, &topo.provider]
            .into_iter()
            .chain(&topo.consumers)
            .map(|n| n.name().to_string())
            .collect(),
        pins: format!("/sys/fs/bpf/privatelink-demo-{}", std::process::id()),
        ..Default::default()
    };
    println!(
        "demo: namespaces {} (node), {} (provider), consumers {}",
        topo.node.name(),
        topo.provider.name(),
        topo.consumers
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // An account pair (and one more consumer), their networks and subnets.
    let db = dir.0.join("state.db");
    let Prepared { tokens, vpcs } = prepare(
        &crate::control::plane::ControlPlane::open(
            Box::new(crate::control::store::SqliteStore::open(&db)?),
            ADMIN_TOKEN,
        )?,
        &[
            (
                "provider",
                "198.18.100.0/24,2001:db8:64::/64",
                "198.18.100.0/24,2001:db8:64::/64",
            ),
            (
                "1000000001",
                "198.18.0.0/24,2001:db8::/64",
                "198.18.0.0/24,2001:db8::/64",
            ),
            (
                "1000000002",
                "198.18.0.0/24,2001:db8::/64",
                "198.18.0.0/24,2001:db8::/64",
            ),
        ],
    )?;
    crate::control::store::write_private(&dir.0.join("admin-token"), ADMIN_TOKEN)?;
    let head = format!(
        "node = \"demo\"\nadmin_token_file = \"{}\"\nbpffs = \"{}\"\n[api]\nlisten = \"{API}\"\n[metrics]\nlisten = \"{METRICS}\"\n[store]\npath = \"{}\"\n",
        dir.0.join("admin-token").display(),
        report.pins,
        db.display()
    );
    // Private DNS for both consumer networks, at the same address in each.
    let dns: String = vpcs[1..]
        .iter()
        .map(|(vpc, _)| format!("[dns.networks.{vpc}]\nlisten = \"{DNS}\"\n"))
        .collect();
    let cfg = agent_config(&topo, &vpcs, &head) + &dns;
    let checked = crate::node::config::parse(&cfg)?;

    // Peers that receive redirected frames need an XDP program of their own.
    let mut pass = Datapath::load(&Sizes::small()).context("loading the pass program")?;
    topo.attach_pass(&mut pass)?;
    // The backend, on both its addresses: a TCP greeter and a UDP echo, for as long as the agent
    // runs (the demo stops it once the agent has stopped: after the requests, or at Ctrl-C when
    // it keeps serving). Each round waits up to 50 ms per address for a datagram, so it idles.
    let mut sockets = Vec::new();
    for addr in [IpAddr::from(BACKEND), BACKEND6.into()] {
        let listener = topo
            .provider
            .enter(|| TcpListener::bind((addr, TCP_PORTS.1)))?;
        listener.set_nonblocking(true)?;
        let udp = topo
            .provider
            .enter(|| UdpSocket::bind((addr, UDP_PORTS.1)))?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        sockets.push((listener, udp));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let servers = topo.provider.spawn(move || {
        let mut buf = [0u8; 512];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            for (listener, udp) in &sockets {
                serve_once(listener, udp, &mut buf);
            }
        }
    });
    let shutdown = crate::node::runtime::Shutdown::default();
    let agent = {
        let shutdown = shutdown.clone();
        topo.node.spawn(move || {
            crate::node::runtime::run_until(checked, crate::node::runtime::OnExit::Detach, shutdown)
        })
    };
    let outcome = drive(&topo, &tokens, &vpcs, &agent, once, &mut report);
    // Stop the agent unless it should keep serving (it detaches: pins and programs go away); also
    // after a failure, so the demo never leaves anything behind.
    if once || outcome.is_err() {
        shutdown.stop();
    }
    let agent_result = agent
        .join()
        .map_err(|_| anyhow::anyhow!("the agent thread panicked"))?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = servers.join();
    outcome.and(agent_result).map(|()| report)
}

/// One round of the demo backend on one address: a pending connection greeted, a pending
/// datagram echoed.
fn serve_once(listener: &TcpListener, udp: &UdpSocket, buf: &mut [u8; 512]) {
    if let Ok((mut s, peer)) = listener.accept() {
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
        if let Ok(n) = s.read(buf) {
            let msg = format!(
                "hello {} from the backend; you asked {:?}",
                peer.ip(),
                String::from_utf8_lossy(&buf[..n])
            );
            let _ = s.write_all(msg.as_bytes());
        }
    }
    if let Ok((n, peer)) = udp.recv_from(buf) {
        let _ = udp.send_to(&buf[..n], peer);
    }
}

/// Everything the demo does with a running agent: the service and endpoints through its API, real
/// requests through both endpoints, the counters from its metrics.
fn drive(
    topo: &Topology,
    tokens: &[String],
    vpcs: &[(String, String)],
    agent: &std::thread::JoinHandle<Result<()>>,
    once: bool,
    report: &mut Report,
) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while call(topo, ADMIN_TOKEN, "GET", "/v1/revision", None).is_err() {
        if agent.is_finished() || std::time::Instant::now() > deadline {
            bail!("the agent's API did not come up");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "demo: agent running in {} (API {API}, metrics {METRICS})",
        topo.node.name()
    );
    let svc = call(
        topo,
        &tokens[0],
        "POST",
        "/v1/services",
        Some(serde_json::json!({
        "name": "demo-echo", "network_id": vpcs[0].0, "service_type": "clb", "backends": [BACKEND.to_string(), BACKEND6.to_string()],
        "private_dns_name": PRIVATE_NAME,
        "port_mappings": [
            { "protocol": "tcp", "service_port": TCP_PORTS.1, "terminal_port": TCP_PORTS.0 },
            { "protocol": "udp", "service_port": UDP_PORTS.1, "terminal_port": UDP_PORTS.0 }] })),
    )?;
    let svc_id = svc["id"].as_str().unwrap_or_default().to_string();
    let mut eps = Vec::new();
    for c in [1usize, 2] {
        let account = format!("100000000{c}");
        call(
            topo,
            &tokens[0],
            "POST",
            &format!("/v1/services/{svc_id}/allowlist"),
            Some(serde_json::json!({ "account_id": account })),
        )?;
        let ep = call(
            topo,
            &tokens[c],
            "POST",
            "/v1/endpoints",
            Some(serde_json::json!({
            "name": format!("demo-{c}"), "service_id": svc_id, "network_id": vpcs[c].0, "subnet_id": vpcs[c].1,
            "ip_address_type": "dualstack", "ip": ENDPOINT.to_string(), "ipv6": ENDPOINT6.to_string(),
            "private_dns_enabled": true })),
        )?;
        println!(
            "demo: account {account} created dual-stack endpoint {} at {ENDPOINT} and {ENDPOINT6} ({})",
            ep["id"].as_str().unwrap_or(""),
            ep["state"]
        );
        eps.push(ep["id"].clone());
    }
    call(
        topo,
        &tokens[0],
        "POST",
        &format!("/v1/services/{svc_id}/accept"),
        Some(serde_json::json!({ "endpoint_ids": eps })),
    )?;
    println!("demo: provider accepted both connections to {svc_id}");
    for (i, ns) in topo.consumers.iter().enumerate() {
        // By name over each family: the network's private DNS answers with its own endpoint's
        // address (A, then AAAA); then a TCP request to that address and a UDP echo.
        for (kind, record) in [("A", RecordType::A), ("AAAA", RecordType::AAAA)] {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let (addr, tcp_reply, udp_reply) = loop {
                match ns.enter(|| exchange(i, record)) {
                    Ok(v) => break v,
                    Err(e) if std::time::Instant::now() > deadline => {
                        return Err(e.context(format!(
                            "requests over {kind} from consumer network {}",
                            i + 1
                        )));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            println!(
                "consumer {} -> {PRIVATE_NAME} {kind} (private DNS at {DNS}: {addr}) port {}: {tcp_reply}",
                i + 1,
                TCP_PORTS.0
            );
            if udp_reply != b"udp ping" {
                bail!("consumer {}: UDP echo came back as {udp_reply:?}", i + 1);
            }
            report.exchanges.push(Exchange {
                consumer: i + 1,
                record: kind.to_string(),
                resolved: addr,
                tcp_reply: tcp_reply.clone(),
                udp_echo_ok: true,
            });
            println!(
                "consumer {} -> {}: udp echo ok",
                i + 1,
                SocketAddr::new(addr, UDP_PORTS.0)
            );
        }
    }
    report.links = counters(topo)?;
    println!(
        "{:<8} {:>10} {:>12} {:>10} {:>12} {:>9}",
        "endpoint", "fwd_pkts", "fwd_bytes", "rev_pkts", "rev_bytes", "new_conns"
    );
    for l in &report.links {
        println!(
            "{:<8} {:>10} {:>12} {:>10} {:>12} {:>9}",
            l.endpoint, l.fwd_packets, l.fwd_bytes, l.rev_packets, l.rev_bytes, l.new_connections
        );
    }
    if !once {
        println!(
            "demo: serving until Ctrl-C; try `ip netns exec {} curl -s http://{METRICS}/metrics | grep privatelink_link`",
            topo.node.name()
        );
        // The backend answers with one line, no HTTP headers.
        println!(
            "demo: or a request through consumer 1's endpoint: `ip netns exec {} curl -s --http0.9 http://{ENDPOINT}:{}/`",
            topo.consumers[0].name(),
            TCP_PORTS.0
        );
    }
    Ok(())
}

/// From the calling thread's consumer network: `PRIVATE_NAME` resolved as `record`, a TCP request
/// to that address and a UDP echo through it. (address, TCP reply, UDP reply).
fn exchange(i: usize, record: RecordType) -> Result<(IpAddr, String, Vec<u8>)> {
    let addr = resolve(PRIVATE_NAME, record)?;
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::new(addr, TCP_PORTS.0), Duration::from_secs(1))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(format!("GET / from consumer network {}", i + 1).as_bytes())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let any: SocketAddr = match addr {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let u = UdpSocket::bind(any)?;
    u.set_read_timeout(Some(IO_TIMEOUT))?;
    u.send_to(b"udp ping", (addr, UDP_PORTS.0))?;
    let mut buf = [0u8; 64];
    let (n, _) = u.recv_from(&mut buf)?;
    Ok((addr, reply, buf[..n].to_vec()))
}

/// The `record` (A or AAAA) of `name` from the private DNS server of the calling thread's
/// network.
fn resolve(name: &str, record: RecordType) -> Result<IpAddr> {
    use hickory_server::proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RData},
    };
    use std::str::FromStr as _;
    let mut q = Message::new(0x5eed, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(Name::from_str(name)?, record));
    let u = UdpSocket::bind("0.0.0.0:0")?;
    u.set_read_timeout(Some(Duration::from_secs(1)))?;
    u.send_to(&q.to_vec()?, (DNS, 53))?;
    let mut buf = [0u8; 512];
    let n = u.recv(&mut buf)?;
    let reply = Message::from_vec(&buf[..n])?;
    reply
        .answers
        .iter()
        .find_map(|r| match r.data {
            RData::A(a) => Some(IpAddr::from(a.0)),
            RData::AAAA(a) => Some(IpAddr::from(a.0)),
            _ => None,
        })
        .with_context(|| format!("{name}: no {record} address in the answer"))
}

/// Per-link counters as the agent's /metrics reports them.
fn counters(topo: &Topology) -> Result<Vec<LinkCounters>> {
    let text = topo.node.enter(|| -> Result<String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(IO_TIMEOUT))
            .build()
            .into();
        Ok(agent
            .get(&format!("http://{METRICS}/metrics"))
            .call()?
            .body_mut()
            .read_to_string()?)
    })?;
    let value = |metric: &str, endpoint: &str, dir: Option<&str>| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with(&format!("{metric}{{"))
                    && l.contains(&format!("endpoint_name=\"{endpoint}\""))
            })
            .filter(|l| dir.is_none_or(|d| l.contains(&format!("direction=\"{d}\""))))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    Ok(["demo-1", "demo-2"]
        .into_iter()
        .map(|ep| LinkCounters {
            endpoint: ep.to_string(),
            fwd_packets: value("privatelink_link_packets_total", ep, Some("forward")),
            fwd_bytes: value("privatelink_link_bytes_total", ep, Some("forward")),
            rev_packets: value("privatelink_link_packets_total", ep, Some("reply")),
            rev_bytes: value("privatelink_link_bytes_total", ep, Some("reply")),
            new_connections: value("privatelink_link_connections_total", ep, None),
        })
        .collect())
}
