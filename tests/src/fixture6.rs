//! IPv6 packet fixtures: frames built with correct checksums, and forwarded frames checked
//! independently (etherparse computes every checksum).
use std::net::Ipv6Addr;

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv6Header, NetSlice, SlicedPacket, TcpHeader,
    TransportSlice, UdpHeader,
};

use crate::fixture::CONSUMER_MAC;

/// The IPv6 consumer of the fixtures (the namespaces' client address).
pub const CONSUMER6: Ipv6Addr = privatelink_agent::testkit::demo::CLIENT6;

/// Extension headers a fixture can carry (each eight bytes, padded with PadN).
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    DestOpts,
    Fragment,
}

/// An Ethernet/IPv6/(extension headers)/TCP|UDP frame with correct checksums.
#[derive(Clone, Debug)]
pub struct Pkt6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub hop_limit: u8,
    pub ext: Vec<Ext>,
    /// `Some((syn, ack))` for TCP, `None` for UDP.
    pub tcp: Option<(bool, bool)>,
    pub payload: Vec<u8>,
    /// An 802.1Q tag with this VLAN id, when set.
    pub vlan: Option<u16>,
}

impl Pkt6 {
    pub fn syn(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        Pkt6 {
            src_mac: CONSUMER_MAC,
            dst_mac: [0; 6],
            src,
            dst,
            sport,
            dport,
            hop_limit: 64,
            ext: Vec::new(),
            tcp: Some((true, false)),
            payload: b"privatelink6".to_vec(),
            vlan: None,
        }
    }

    pub fn udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        Pkt6 {
            tcp: None,
            ..Self::syn(src, sport, dst, dport)
        }
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        (self.src_mac, self.dst_mac) = (src, dst);
        self
    }

    /// The same packet with addresses, ports, MACs and hop limit changed as a translation would.
    pub fn translated(
        &self,
        src: (Ipv6Addr, u16),
        dst: (Ipv6Addr, u16),
        macs: ([u8; 6], [u8; 6]),
        hop_limit: u8,
    ) -> Self {
        let mut p = self.clone();
        ((p.src, p.sport), (p.dst, p.dport)) = (src, dst);
        (p.src_mac, p.dst_mac) = macs;
        p.hop_limit = hop_limit;
        p
    }

    pub fn build(&self) -> Vec<u8> {
        let (proto, l4_len) = match self.tcp {
            Some(_) => (IpNumber::TCP, 20),
            None => (IpNumber::UDP, 8),
        };
        // The pseudo-header sees the upper-layer length and protocol, not the extension headers.
        let pseudo = Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: (l4_len + self.payload.len()) as u16,
            next_header: proto,
            hop_limit: self.hop_limit,
            source: self.src.octets(),
            destination: self.dst.octets(),
        };
        let mut ip = pseudo.clone();
        ip.payload_length += 8 * self.ext.len() as u16;
        let code = |e: &Ext| match e {
            Ext::HopByHop => IpNumber(0),
            Ext::DestOpts => IpNumber(60),
            Ext::Fragment => IpNumber(44),
        };
        if let Some(first) = self.ext.first() {
            ip.next_header = code(first);
        }
        let mut out = Vec::new();
        Ethernet2Header {
            source: self.src_mac,
            destination: self.dst_mac,
            ether_type: if self.vlan.is_some() {
                EtherType::VLAN_TAGGED_FRAME
            } else {
                EtherType::IPV6
            },
        }
        .write(&mut out)
        .expect("eth");
        if let Some(id) = self.vlan {
            out.extend(id.to_be_bytes());
            out.extend(EtherType::IPV6.0.to_be_bytes());
        }
        ip.write(&mut out).expect("ipv6");
        for (i, e) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(proto, code).0;
            match e {
                // Length 0 (eight bytes), then PadN with four bytes of padding.
                Ext::HopByHop | Ext::DestOpts => out.extend([next, 0, 1, 4, 0, 0, 0, 0]),
                // Offset 0, more fragments: the first fragment.
                Ext::Fragment => out.extend([next, 0, 0, 1, 0, 0, 0, 7]),
            }
        }
        match self.tcp {
            Some((syn, ack)) => {
                let mut t = TcpHeader::new(self.sport, self.dport, 1000, 64_000);
                (t.syn, t.ack) = (syn, ack);
                if ack {
                    t.acknowledgment_number = 1;
                }
                t.checksum = t
                    .calc_checksum_ipv6(&pseudo, &self.payload)
                    .expect("tcp checksum");
                t.write(&mut out).expect("tcp");
            }
            None => {
                UdpHeader::with_ipv6_checksum(self.sport, self.dport, &pseudo, &self.payload)
                    .expect("udp")
                    .write(&mut out)
                    .expect("udp");
            }
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Source, source port of a forwarded IPv6 frame, after checking its L4 checksum independently.
pub fn parse_checked6(frame: &[u8]) -> (Ipv6Addr, u16) {
    let p = SlicedPacket::from_ethernet(frame).expect("parsable frame");
    let Some(NetSlice::Ipv6(ip)) = &p.net else {
        panic!("not IPv6: {frame:02x?}")
    };
    let mut iph = ip.header().to_header();
    iph.next_header = match &p.transport {
        Some(TransportSlice::Tcp(_)) => IpNumber::TCP,
        _ => IpNumber::UDP,
    };
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t
                .to_header()
                .calc_checksum_ipv6(&iph, t.payload())
                .expect("tcp checksum");
            assert_eq!(t.checksum(), want, "bad TCP checksum in {frame:02x?}");
            (iph.source.into(), t.source_port())
        }
        Some(TransportSlice::Udp(u)) => {
            let want = u
                .to_header()
                .calc_checksum_ipv6(&iph, u.payload())
                .expect("udp checksum");
            assert_eq!(u.checksum(), want, "bad UDP checksum in {frame:02x?}");
            (iph.source.into(), u.source_port())
        }
        other => panic!("not TCP/UDP: {other:?}"),
    }
}
