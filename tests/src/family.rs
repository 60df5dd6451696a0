//! One fixture, both address families: the fixtures' addresses and frames behind [`Fam`], so a
//! table of cases runs over IPv4 and IPv6 wherever the datapath behaves the same (the
//! family-specific cases, IPv4 options and IPv6 extension headers, stay in `datapath.rs` and
//! `datapath6.rs`).
use std::net::IpAddr;

use ipnet::IpNet;
use privatelink_agent::{datapath::Model, testkit::demo};

use crate::{
    fixture::{self, CONSUMER_MAC, Harness, LINK, Pkt},
    fixture6::{self, Pkt6},
};

/// An address family of the fixtures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fam {
    V4,
    V6,
}

impl Fam {
    pub const BOTH: [Fam; 2] = [Fam::V4, Fam::V6];

    pub fn consumer(self) -> IpAddr {
        match self {
            Fam::V4 => fixture::CONSUMER.into(),
            Fam::V6 => fixture6::CONSUMER6.into(),
        }
    }

    pub fn endpoint(self) -> IpAddr {
        match self {
            Fam::V4 => demo::ENDPOINT.into(),
            Fam::V6 => demo::ENDPOINT6.into(),
        }
    }

    pub fn backend(self) -> IpAddr {
        match self {
            Fam::V4 => demo::BACKEND.into(),
            Fam::V6 => demo::BACKEND6.into(),
        }
    }

    /// The provider network's NAT range in this family.
    pub fn nat_range(self) -> IpNet {
        match self {
            Fam::V4 => demo::NAT_RANGE.parse().expect("constant"),
            Fam::V6 => demo::NAT_RANGE6.parse().expect("constant"),
        }
    }

    /// A backend address on the provider interface's prefix that has no neighbour entry.
    pub fn unresolved_backend(self) -> IpAddr {
        match self {
            Fam::V4 => fixture::BACKEND_NO_NEIGH.into(),
            Fam::V6 => IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 0x20,
            )),
        }
    }

    /// Narrows the provider network's NAT range of this family in `m` to one address: it.
    pub fn single_nat(self, m: &mut Model) -> IpAddr {
        let nat = m
            .nat
            .get_mut(&demo::PROVIDER_NET)
            .expect("the provider's NAT range");
        match self {
            Fam::V4 => {
                nat.addrs = "198.19.128.7/32".parse().expect("constant");
                nat.addrs.addr().into()
            }
            Fam::V6 => {
                let one: ipnet::Ipv6Net = "2001:db8:ff::7/128".parse().expect("constant");
                nat.addrs6 = Some(one);
                one.addr().into()
            }
        }
    }

    /// The fixtures' model with the endpoint dual-stack (its IPv6 address `ENDPOINT6`).
    pub fn model(h: &Harness) -> Model {
        let mut m = h.model();
        m.links.get_mut(&LINK).expect("link").ip6 = Some(demo::ENDPOINT6);
        m
    }

    /// A TCP segment with the given flags.
    pub fn tcp(self, src: (IpAddr, u16), dst: (IpAddr, u16), syn: bool, ack: bool) -> Frame {
        match (self, src.0, dst.0) {
            (Fam::V4, IpAddr::V4(s), IpAddr::V4(d)) => {
                Frame::V4(Pkt::tcp(s, src.1, d, dst.1, syn, ack))
            }
            (Fam::V6, IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut p = Pkt6::syn(s, src.1, d, dst.1);
                p.tcp = Some((syn, ack));
                Frame::V6(p)
            }
            other => panic!("addresses of another family: {other:?}"),
        }
    }

    pub fn udp(self, src: (IpAddr, u16), dst: (IpAddr, u16)) -> Frame {
        match (self, src.0, dst.0) {
            (Fam::V4, IpAddr::V4(s), IpAddr::V4(d)) => Frame::V4(Pkt::udp(s, src.1, d, dst.1)),
            (Fam::V6, IpAddr::V6(s), IpAddr::V6(d)) => Frame::V6(Pkt6::udp(s, src.1, d, dst.1)),
            other => panic!("addresses of another family: {other:?}"),
        }
    }

    /// A consumer segment to the endpoint's port 80 from `sport`, on consumer interface c0.
    pub fn consumer_tcp(self, h: &Harness, sport: u16, syn: bool, ack: bool) -> Frame {
        self.tcp((self.consumer(), sport), (self.endpoint(), 80), syn, ack)
            .macs(CONSUMER_MAC, h.c0_mac)
    }

    /// The TCP states of this family's conntrack entries.
    pub fn tcp_states(self, h: &Harness) -> Vec<u8> {
        match self {
            Fam::V4 => h.plane.flows().iter().map(|(_, f)| f.tcp_state).collect(),
            Fam::V6 => h.plane.flows6().iter().map(|(_, f)| f.tcp_state).collect(),
        }
    }
}

/// A fixture frame of either family.
#[derive(Clone, Debug)]
pub enum Frame {
    V4(Pkt),
    V6(Pkt6),
}

impl Frame {
    pub fn macs(self, src: [u8; 6], dst: [u8; 6]) -> Self {
        match self {
            Frame::V4(p) => Frame::V4(p.macs(src, dst)),
            Frame::V6(p) => Frame::V6(p.macs(src, dst)),
        }
    }

    /// The frame with an 802.1Q tag of this VLAN id (`None`: untagged).
    pub fn vlan(self, id: Option<u16>) -> Self {
        match self {
            Frame::V4(mut p) => {
                p.vlan = id;
                Frame::V4(p)
            }
            Frame::V6(mut p) => {
                p.vlan = id;
                Frame::V6(p)
            }
        }
    }

    /// The same frame with addresses, ports, MACs and TTL (hop limit) changed as a translation
    /// would.
    pub fn translated(
        &self,
        src: (IpAddr, u16),
        dst: (IpAddr, u16),
        macs: ([u8; 6], [u8; 6]),
        ttl: u8,
    ) -> Self {
        match (self, src.0, dst.0) {
            (Frame::V4(p), IpAddr::V4(s), IpAddr::V4(d)) => {
                Frame::V4(p.translated((s, src.1), (d, dst.1), macs, ttl))
            }
            (Frame::V6(p), IpAddr::V6(s), IpAddr::V6(d)) => {
                Frame::V6(p.translated((s, src.1), (d, dst.1), macs, ttl))
            }
            _ => panic!("addresses of another family"),
        }
    }

    pub fn build(&self) -> Vec<u8> {
        match self {
            Frame::V4(p) => p.build(),
            Frame::V6(p) => p.build(),
        }
    }
}

/// Source address and port of a forwarded frame of either family, after checking every checksum
/// independently.
pub fn source_of(frame: &[u8]) -> (IpAddr, u16) {
    match frame.get(12..14) {
        Some([0x86, 0xdd]) => {
            let (a, p) = fixture6::parse_checked6(frame);
            (a.into(), p)
        }
        Some([0x81, 0x00]) if frame.get(16..18) == Some(&[0x86, 0xdd]) => {
            let (a, p) = fixture6::parse_checked6(frame);
            (a.into(), p)
        }
        _ => {
            let p = crate::parse_checked(frame);
            (p.src.into(), p.sport)
        }
    }
}
