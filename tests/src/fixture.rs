//! Packet fixtures and the node topology they run against.
//!
//! The harness builds a "node" namespace with real veth interfaces (two consumer networks with the
//! same CIDR, one provider network with routes and neighbours), loads the datapath, and runs
//! BPF_PROG_TEST_RUN from inside that namespace so `ingress_ifindex` and `bpf_fib_lookup` see real
//! devices. State is written only through the agent's `Dataplane::apply`.
use std::{collections::BTreeMap, net::Ipv4Addr};

use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, SingleVlanHeader,
    TcpHeader, UdpHeader, VlanId, VlanPcp,
};
use privatelink_agent::{
    datapath::loader::{Datapath, Sizes},
    datapath::{Dataplane, Iface, Model, Role},
    testkit::demo,
    testkit::netns::{Netns, veth},
};
use privatelink_common::{Flow4, FlowKey4, LinkStats};

use crate::{Run, privileged, test_run};

pub const CONSUMER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x0a];
pub const CONSUMER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const ENDPOINT: Ipv4Addr = demo::ENDPOINT;
pub const NOT_ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BACKEND: Ipv4Addr = demo::BACKEND;
pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x64, 0x0a];
pub const BACKEND2: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 11);
pub const BACKEND2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x64, 0x0b];
/// A backend with a route but no neighbour entry.
pub const BACKEND_NO_NEIGH: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 20);
pub const NAT_RANGE: &str = demo::NAT_RANGE;
pub const CONSUMER_NET: u32 = 1;
pub const CONSUMER_NET2: u32 = 2;
pub const PROVIDER_NET: u32 = demo::PROVIDER_NET;
pub const SERVICE: u32 = demo::SERVICE;
pub const LINK: u32 = 1;
pub const ACCOUNT: u32 = 7;

/// L4 of a fixture packet.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        syn: bool,
        ack: bool,
        fin: bool,
        rst: bool,
    },
    Udp {
        zero_checksum: bool,
    },
}

/// A fluent Ethernet/VLAN/IPv4/TCP|UDP packet builder with correct checksums.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub options: Vec<u8>,
    pub fragment: Option<(bool, u16)>,
    pub l4: L4,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
}

impl Pkt {
    fn new(l4: L4, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Pkt {
            src_mac: CONSUMER_MAC,
            dst_mac: [0; 6],
            vlan: None,
            src,
            dst,
            ttl: 64,
            options: Vec::new(),
            fragment: None,
            l4,
            sport,
            dport,
            payload: b"privatelink".to_vec(),
        }
    }

    /// A TCP SYN.
    pub fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self::new(
            L4::Tcp {
                syn: true,
                ack: false,
                fin: false,
                rst: false,
            },
            src,
            sport,
            dst,
            dport,
        )
    }

    /// A TCP segment with the given flags.
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, syn: bool, ack: bool) -> Self {
        Self::new(
            L4::Tcp {
                syn,
                ack,
                fin: false,
                rst: false,
            },
            src,
            sport,
            dst,
            dport,
        )
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self::new(
            L4::Udp {
                zero_checksum: false,
            },
            src,
            sport,
            dst,
            dport,
        )
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    pub fn options(mut self, opts: &[u8]) -> Self {
        self.options = opts.to_vec();
        self
    }

    pub fn fragment(mut self, more: bool, offset: u16) -> Self {
        self.fragment = Some((more, offset));
        self
    }

    pub fn flags(mut self, fin: bool, rst: bool) -> Self {
        if let L4::Tcp { fin: f, rst: r, .. } = &mut self.l4 {
            *f = fin;
            *r = rst;
        }
        self
    }

    pub fn zero_udp_checksum(mut self) -> Self {
        self.l4 = L4::Udp {
            zero_checksum: true,
        };
        self
    }

    /// The same packet with addresses, ports, MACs and TTL changed as a translation would.
    pub fn translated(
        &self,
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        macs: ([u8; 6], [u8; 6]),
        ttl: u8,
    ) -> Self {
        let mut p = self.clone();
        (p.src, p.sport) = src;
        (p.dst, p.dport) = dst;
        (p.src_mac, p.dst_mac) = macs;
        p.ttl = ttl;
        p
    }

    pub fn build(&self) -> Vec<u8> {
        let (proto, l4_len) = match self.l4 {
            L4::Tcp { .. } => (IpNumber::TCP, 20),
            L4::Udp { .. } => (IpNumber::UDP, 8),
        };
        let mut ip = Ipv4Header::new(
            (l4_len + self.payload.len()) as u16,
            self.ttl,
            proto,
            self.src.octets(),
            self.dst.octets(),
        )
        .expect("ipv4 header");
        ip.options =
            Ipv4Options::try_from(&self.options[..]).expect("ipv4 options (multiple of 4, ≤ 40)");
        // etherparse does not recompute the total length when options change.
        ip.total_len = (ip.header_len() + l4_len + self.payload.len()) as u16;
        if let Some((more, offset)) = self.fragment {
            ip.dont_fragment = false;
            ip.more_fragments = more;
            ip.fragment_offset = IpFragOffset::try_new(offset).expect("fragment offset");
        }
        ip.header_checksum = ip.calc_header_checksum();
        let mut out = Vec::new();
        let eth_type = if self.vlan.is_some() {
            EtherType::VLAN_TAGGED_FRAME
        } else {
            EtherType::IPV4
        };
        Ethernet2Header {
            source: self.src_mac,
            destination: self.dst_mac,
            ether_type: eth_type,
        }
        .write(&mut out)
        .expect("eth");
        if let Some(id) = self.vlan {
            SingleVlanHeader {
                pcp: VlanPcp::ZERO,
                drop_eligible_indicator: false,
                vlan_id: VlanId::try_new(id).expect("vlan id"),
                ether_type: EtherType::IPV4,
            }
            .write(&mut out)
            .expect("vlan");
        }
        ip.write(&mut out).expect("ipv4");
        match self.l4 {
            L4::Tcp { syn, ack, fin, rst } => {
                let mut t = TcpHeader::new(self.sport, self.dport, 1000, 64_000);
                (t.syn, t.ack, t.fin, t.rst) = (syn, ack, fin, rst);
                if ack {
                    t.acknowledgment_number = 1;
                }
                t.checksum = t
                    .calc_checksum_ipv4(&ip, &self.payload)
                    .expect("tcp checksum");
                t.write(&mut out).expect("tcp");
            }
            L4::Udp { zero_checksum } => {
                let mut u =
                    UdpHeader::with_ipv4_checksum(self.sport, self.dport, &ip, &self.payload)
                        .expect("udp");
                if zero_checksum {
                    u.checksum = 0;
                }
                u.write(&mut out).expect("udp");
            }
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// The node under test: namespace, loaded datapath, dataplane writer, interface facts.
pub struct Harness {
    /// The node namespace's name (the harness's interfaces exist only there).
    pub netns: String,
    pub dp: Datapath,
    /// The benchmark object beside `dp`, loaded on first use ([`Harness::bench`]) with
    /// `bench_slots` slots in the slot floor's table.
    pub bench: Option<crate::benchkit::Bench>,
    pub bench_slots: u32,
    pub plane: Dataplane,
    pub c0: u32,
    pub c1: u32,
    pub p0: u32,
    pub c0_mac: [u8; 6],
    pub c1_mac: [u8; 6],
    pub p0_mac: [u8; 6],
}

/// Builds the topology, loads the datapath and runs `f` inside the node namespace. Skips (or fails
/// in CI) without privileges. The namespace is deleted afterwards, also when `f` panics.
pub fn with_harness(test: &str, f: impl FnOnce(&mut Harness) + Send) {
    if privileged(test) {
        with_harness_sized(Sizes::small(), f);
    }
}

/// [`with_harness`] with the given map sizes and no privilege gate (the caller checked).
pub fn with_harness_sized(sizes: Sizes, f: impl FnOnce(&mut Harness) + Send) {
    with_harness_object(sizes, None, f)
}

/// The same with another build's datapath object (`None`: this build's).
pub fn with_harness_object(
    sizes: Sizes,
    object: Option<&[u8]>,
    f: impl FnOnce(&mut Harness) + Send,
) {
    let node = Netns::new("fx").expect("creating the node namespace");
    for (a, b) in [("c0", "c0p"), ("c1", "c1p"), ("p0", "p0p")] {
        veth(&node, a, &node, b).unwrap_or_else(|e| panic!("veth {a}: {e:#}"));
    }
    node.sysctl("net.ipv4.ip_forward", "1").expect("ip_forward");
    // bpf_fib_lookup answers IPv6 only where IPv6 forwarding is on.
    node.sysctl("net.ipv6.conf.all.forwarding", "1")
        .expect("ipv6 forwarding");
    node.ip(&["addr", "add", "198.18.100.1/24", "dev", "p0"])
        .expect("p0 address");
    node.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:64::1/64",
        "dev",
        "p0",
        "nodad",
    ])
    .expect("p0 IPv6 address");
    let backends: [(std::net::IpAddr, _); 3] = [
        (BACKEND.into(), BACKEND_MAC),
        (BACKEND2.into(), BACKEND2_MAC),
        (demo::BACKEND6.into(), BACKEND_MAC),
    ];
    for (ip, mac) in backends {
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        node.ip(&[
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &mac,
            "dev",
            "p0",
            "nud",
            "permanent",
        ])
        .expect("neighbour");
    }
    let facts = |dev: &str| {
        (
            node.ifindex(dev).expect("ifindex"),
            node.mac(dev).expect("mac"),
        )
    };
    let ((c0, c0_mac), (c1, c1_mac), (p0, p0_mac)) = (facts("c0"), facts("c1"), facts("p0"));
    node.enter(|| {
        let mut dp = match object {
            Some(o) => Datapath::load_object(o, &sizes),
            None => Datapath::load(&sizes),
        }
        .unwrap_or_else(|e| panic!("loading the datapath: {e}"));
        let plane = Dataplane::new(&mut dp.ebpf).expect("taking the maps");
        let mut h = Harness {
            netns: node.name().to_string(),
            dp,
            bench: None,
            bench_slots: 1,
            plane,
            c0,
            c1,
            p0,
            c0_mac,
            c1_mac,
            p0_mac,
        };
        f(&mut h);
    });
}

/// The reply key of a flow from `BACKEND`:8080 to `nat`:`port` in the provider network.
pub fn nat_reply_key(nat: Ipv4Addr, port: u16) -> FlowKey4 {
    FlowKey4::new(
        PROVIDER_NET,
        u32::from(BACKEND).to_be(),
        u32::from(nat).to_be(),
        8080u16.to_be(),
        port.to_be(),
        privatelink_common::PROTO_TCP,
    )
}

impl Harness {
    /// The benchmark object beside the datapath (loaded on first use).
    pub fn bench(&mut self) -> &mut crate::benchkit::Bench {
        let (dp, slots) = (&self.dp, self.bench_slots);
        self.bench.get_or_insert_with(|| {
            crate::benchkit::Bench::load(dp, slots).expect("loading the benchmark object")
        })
    }

    /// The benchmark replay into `target` (the datapath's [`crate::benchkit::PROGRAM`] or a
    /// floor): see [`crate::benchkit::Bench::replay_into`].
    pub fn replay_into(&mut self, target: &'static str) -> &mut aya::programs::Xdp {
        self.bench();
        let bench = self.bench.as_mut().expect("loaded above");
        bench
            .replay_into(&mut self.dp, target)
            .expect("the replay program")
    }

    /// One consumer network per consumer interface, the provider network with its NAT range, one
    /// service with `BACKEND`, one Available link at `ENDPOINT` (tcp 80→8080, udp 53→5353), no
    /// security group: the demo's service, so fixtures and demo cannot drift apart.
    pub fn model(&self) -> Model {
        let ifaces = vec![
            Iface {
                ifindex: self.c0,
                vlan_id: 0,
                network_id: CONSUMER_NET,
                role: Role::Consumer,
                mac: self.c0_mac,
            },
            Iface {
                ifindex: self.c1,
                vlan_id: 0,
                network_id: CONSUMER_NET2,
                role: Role::Consumer,
                mac: self.c1_mac,
            },
            Iface {
                ifindex: self.p0,
                vlan_id: 0,
                network_id: PROVIDER_NET,
                role: Role::Provider,
                mac: self.p0_mac,
            },
        ];
        demo::service_model(
            ifaces,
            BTreeMap::from([(LINK, demo::endpoint_link(CONSUMER_NET, ACCOUNT))]),
        )
    }

    pub fn apply(&mut self, model: &Model) {
        self.plane
            .apply(model)
            .unwrap_or_else(|e| panic!("applying the model: {e}"));
    }

    pub fn run(&mut self, ifindex: u32, pkt: &Pkt) -> Run {
        test_run(self.dp.program(), ifindex, &pkt.build())
    }

    /// Global outcome counters, indexed by outcome code.
    pub fn outcomes(&self) -> Vec<u64> {
        self.plane.global_stats().expect("global stats")
    }

    pub fn link_stats(&self, link: u32) -> LinkStats {
        self.plane.link_stats(link).expect("link stats")
    }

    /// The datapath's map `name` as the kernel has it (the `Dataplane` holds the loader's handle),
    /// found through the programs' map ids; kernel map names are cut at 15 bytes.
    pub fn kernel_map(&self, name: &str) -> aya::maps::MapData {
        let mut ids = std::collections::BTreeSet::new();
        for prog in [crate::benchkit::PROGRAM, crate::benchkit::PROGRAM6] {
            let prog = self.dp.ebpf.program(prog).expect("loaded");
            let info = prog.info().expect("program info");
            ids.extend(info.map_ids().expect("map ids").unwrap_or_default());
        }
        let short = &name[..name.len().min(15)];
        ids.into_iter()
            .map(|id| aya::maps::MapData::from_id(id).expect("map by id"))
            .find(|m| {
                m.info()
                    .ok()
                    .and_then(|i| i.name_as_str().map(str::to_string))
                    .as_deref()
                    == Some(short)
            })
            .unwrap_or_else(|| panic!("the datapath has no map {name}"))
    }

    /// IPv4 conntrack as the kernel has it.
    pub fn ct4(&self) -> aya::maps::HashMap<aya::maps::MapData, FlowKey4, Flow4> {
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
            self.kernel_map(privatelink_common::names::CT4),
        ))
        .expect("CT4")
    }

    /// Takes NAT `ports` of `nat` towards `BACKEND`:8080 with live established flows of another
    /// consumer network (reply entries only: what the allocator looks at).
    pub fn hold_nat_ports(
        ct: &mut aya::maps::HashMap<aya::maps::MapData, FlowKey4, Flow4>,
        nat: Ipv4Addr,
        ports: &[u16],
    ) {
        let now = privatelink_agent::datapath::scan::monotonic_ns();
        for &p in ports {
            let other = Flow4 {
                last_seen_ns: now,
                saddr_be: u32::from(ENDPOINT).to_be(),
                daddr_be: u32::from(Ipv4Addr::new(198, 18, 250, 1)).to_be(),
                sport_be: 80u16.to_be(),
                dport_be: p.to_be(),
                link_id: 7,
                peer_network: 999,
                dir: privatelink_common::DIR_REPLY,
                tcp_state: privatelink_common::CT_ESTABLISHED,
                ..Default::default()
            };
            ct.insert(nat_reply_key(nat, p), other, 0)
                .expect("holding a NAT port");
        }
    }

    /// Removes the flow a consumer SYN from `CONSUMER`:`sport` on c0 opened at `nat`:`port`.
    pub fn forget_flow(
        ct: &mut aya::maps::HashMap<aya::maps::MapData, FlowKey4, Flow4>,
        sport: u16,
        (nat, port): (Ipv4Addr, u16),
    ) {
        let fwd = FlowKey4::new(
            CONSUMER_NET,
            u32::from(CONSUMER).to_be(),
            u32::from(ENDPOINT).to_be(),
            sport.to_be(),
            80u16.to_be(),
            privatelink_common::PROTO_TCP,
        );
        ct.remove(&fwd).expect("forward entry");
        ct.remove(&nat_reply_key(nat, port)).expect("reply entry");
    }

    /// A consumer SYN to the endpoint from `sport` on consumer interface c0.
    pub fn consumer_syn(&self, sport: u16) -> Pkt {
        Pkt::syn(CONSUMER, sport, ENDPOINT, 80).macs(CONSUMER_MAC, self.c0_mac)
    }
}
