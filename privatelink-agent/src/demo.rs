//! The embedded default topology, used by `privatelink-agent demo` and the namespace tests:
//! two consumer networks with the same CIDR (198.18.0.0/24, client .10, endpoint .100), a node
//! running the datapath natively on its veths, and a provider network (198.18.100.0/24, backend .10)
//! that routes the NAT range (198.19.128.0/20) back to the node. Everything lives in namespaces
//! created here and deleted on drop.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::xdp::XdpMode;
use privatelink_common::{OUTCOME_NAMES, is_drop};

use crate::{
    dataplane::{
        Dataplane, Iface, Link, LinkState, Model, NatRange, PortMap, Proto, Role, Service,
    },
    loader::{Datapath, Sizes},
    netns::{Netns, veth},
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
pub const NAT_RANGE: &str = "198.19.128.0/20";
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
        for i in 0..consumers {
            let ns = Netns::new(&format!("c{i}"))?;
            let dev = format!("c{i}");
            veth(&node, &dev, &ns, "eth0")?;
            ns.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"])?;
            consumer_ifaces.push((dev.clone(), node.ifindex(&dev)?, node.mac(&dev)?));
            cons.push(ns);
        }
        veth(&node, "p0", &provider, "eth0")?;
        node.ip(&["addr", "add", "198.18.100.1/24", "dev", "p0"])?;
        provider.ip(&["addr", "add", &format!("{BACKEND}/24"), "dev", "eth0"])?;
        provider.ip(&["route", "add", NAT_RANGE, "via", "198.18.100.1"])?;
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
        ip: ENDPOINT,
        service_slot: SERVICE,
        account,
        state: LinkState::Available,
        ports: vec![
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
        ],
        rules: None,
    }
}

/// The demo service (backend `BACKEND` in `PROVIDER_NET`, NAT range `NAT_RANGE`) with the given
/// interfaces and links; every link's account is allowlisted.
pub fn service_model(ifaces: Vec<Iface>, links: BTreeMap<u32, Link>) -> Model {
    let allowlist: BTreeSet<(u32, u32)> = links.values().map(|l| (SERVICE, l.account)).collect();
    Model {
        config: Default::default(),
        ifaces,
        nat: BTreeMap::from([(
            PROVIDER_NET,
            NatRange {
                addrs: NAT_RANGE.parse().expect("constant"),
                ports: 1024..=65535,
            },
        )]),
        services: BTreeMap::from([(
            SERVICE,
            Service {
                provider_network: PROVIDER_NET,
                backends: vec![BACKEND],
            },
        )]),
        links,
        allowlist,
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The embedded default: builds the topology, loads and attaches the datapath, sends real TCP and
/// UDP requests from every consumer network through its endpoint, and prints the counters. With
/// `once` it returns; otherwise it keeps forwarding until Ctrl-C. Namespaces go away on return.
pub fn run(once: bool) -> Result<()> {
    let topo = Topology::build(2).context("building the demo namespaces")?;
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
    let mut dp = Datapath::load(&Sizes::small()).context("loading the datapath")?;
    let model = topo.model();
    let plane = topo.node.enter(|| -> Result<Dataplane> {
        let mut plane = Dataplane::new(&mut dp.ebpf)?;
        let report = plane.apply(&model)?;
        println!("demo: wrote {} map entries", report.writes);
        Ok(plane)
    })?;
    topo.attach(&mut dp)?;
    println!(
        "demo: datapath attached (native XDP) on {} node interfaces",
        topo.consumer_ifaces.len() + 1
    );

    let listener = topo
        .provider
        .enter(|| TcpListener::bind((BACKEND, TCP_PORTS.1)))?;
    let udp = topo
        .provider
        .enter(|| UdpSocket::bind((BACKEND, UDP_PORTS.1)))?;
    let consumers = topo.consumers.len();
    let tcp_server = topo
        .provider
        .spawn(move || -> std::io::Result<Vec<SocketAddr>> {
            let mut peers = Vec::new();
            for _ in 0..consumers {
                let (mut s, peer) = listener.accept()?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                let mut req = [0u8; 256];
                let n = s.read(&mut req)?;
                s.write_all(
                    format!(
                        "hello {} from the backend; you asked {:?}",
                        peer.ip(),
                        String::from_utf8_lossy(&req[..n])
                    )
                    .as_bytes(),
                )?;
                peers.push(peer);
            }
            Ok(peers)
        });
    let udp_server = topo.provider.spawn(move || -> std::io::Result<()> {
        udp.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut buf = [0u8; 512];
        for _ in 0..consumers {
            let (n, peer) = udp.recv_from(&mut buf)?;
            udp.send_to(&buf[..n], peer)?;
        }
        Ok(())
    });
    for (i, ns) in topo.consumers.iter().enumerate() {
        let (tcp_reply, udp_reply) = ns
            .enter(|| -> Result<(String, Vec<u8>)> {
                let mut s = TcpStream::connect_timeout(
                    &SocketAddr::from((ENDPOINT, TCP_PORTS.0)),
                    IO_TIMEOUT,
                )?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.write_all(format!("GET / from consumer network {}", i + 1).as_bytes())?;
                let mut reply = String::new();
                s.read_to_string(&mut reply)?;
                let u = UdpSocket::bind("0.0.0.0:0")?;
                u.set_read_timeout(Some(IO_TIMEOUT))?;
                u.send_to(b"udp ping", (ENDPOINT, UDP_PORTS.0))?;
                let mut buf = [0u8; 64];
                let (n, _) = u.recv_from(&mut buf)?;
                Ok((reply, buf[..n].to_vec()))
            })
            .with_context(|| format!("requests from consumer network {}", i + 1))?;
        println!(
            "consumer {} -> {ENDPOINT}:{}: {tcp_reply}",
            i + 1,
            TCP_PORTS.0
        );
        if udp_reply != b"udp ping" {
            bail!("consumer {}: UDP echo came back as {udp_reply:?}", i + 1);
        }
        println!(
            "consumer {} -> {ENDPOINT}:{}: udp echo ok",
            i + 1,
            UDP_PORTS.0
        );
    }
    tcp_server
        .join()
        .map_err(|_| anyhow::anyhow!("TCP server panicked"))??;
    udp_server
        .join()
        .map_err(|_| anyhow::anyhow!("UDP server panicked"))??;
    print_counters(&plane, &model)?;
    if !once {
        println!("demo: forwarding until Ctrl-C (the namespaces are removed on exit)");
        let (tx, rx) = std::sync::mpsc::channel();
        ctrlc_channel(tx)?;
        let _ = rx.recv();
        print_counters(&plane, &model)?;
    }
    Ok(())
}

fn ctrlc_channel(tx: std::sync::mpsc::Sender<()>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        let _ = tx.send(());
    });
    Ok(())
}

/// Prints per-link counters and the node's non-zero outcome counters.
pub fn print_counters(plane: &Dataplane, model: &Model) -> Result<()> {
    println!(
        "{:<6} {:>10} {:>12} {:>10} {:>12} {:>9} {:>7}",
        "link", "fwd_pkts", "fwd_bytes", "rev_pkts", "rev_bytes", "new_conns", "resets"
    );
    for &id in model.links.keys() {
        let s = plane.link_stats(id)?;
        println!(
            "{id:<6} {:>10} {:>12} {:>10} {:>12} {:>9} {:>7}",
            s.fwd_packets, s.fwd_bytes, s.rev_packets, s.rev_bytes, s.new_conns, s.tcp_resets
        );
    }
    let outcomes = plane.global_stats()?;
    let line: Vec<String> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 0)
        .map(|(i, v)| {
            format!(
                "{}{}={v}",
                if is_drop(i as u32) { "drop:" } else { "" },
                OUTCOME_NAMES[i]
            )
        })
        .collect();
    println!("node: {}", line.join(" "));
    Ok(())
}
