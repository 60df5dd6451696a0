//! The embedded default topology, used by `privatelink-agent demo` and the namespace tests:
//! two consumer networks with the same CIDR (198.18.0.0/24, client .10, endpoint .100), a node
//! running the datapath natively on its veths, and a provider network (198.18.100.0/24, backend .10)
//! that routes the NAT range (198.19.128.0/20) back to the node. Everything lives in namespaces
//! created here and deleted on drop.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{Context as _, Result};
use aya::programs::xdp::XdpMode;

use crate::{
    dataplane::{Iface, Link, LinkState, Model, NatRange, PortMap, Proto, Role, Service},
    loader::Datapath,
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
        for ns in self.consumers.iter().chain([&self.provider]) {
            ns.enter(|| dp.pass_program().attach("eth0", XdpMode::Driver))
                .with_context(|| format!("attaching the pass program in {}", ns.name()))?;
        }
        Ok(())
    }

    /// One service with the backend, one Available endpoint at `ENDPOINT` per consumer network
    /// (link id = network id = 1 + index), each in its own account, all allowlisted.
    pub fn model(&self) -> Model {
        let mut links = BTreeMap::new();
        let mut allowlist = BTreeSet::new();
        let mut ifaces = Vec::new();
        for (i, (_, ifindex, mac)) in self.consumer_ifaces.iter().enumerate() {
            let id = 1 + i as u32;
            ifaces.push(Iface {
                ifindex: *ifindex,
                vlan_id: 0,
                network_id: id,
                role: Role::Consumer,
                mac: *mac,
            });
            links.insert(
                id,
                Link {
                    network_id: id,
                    ip: ENDPOINT,
                    service_slot: SERVICE,
                    account: id,
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
                },
            );
            allowlist.insert((SERVICE, id));
        }
        let (_, p_ifindex, p_mac) = &self.provider_iface;
        ifaces.push(Iface {
            ifindex: *p_ifindex,
            vlan_id: 0,
            network_id: PROVIDER_NET,
            role: Role::Provider,
            mac: *p_mac,
        });
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
}
