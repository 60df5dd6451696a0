//! TCP segments of either family with the fields the PROXY protocol paths change: sequence and
//! acknowledgement numbers, options (MSS, SACK, timestamps) and payload. Built and parsed with
//! etherparse; parsing checks every checksum independently of the datapath.
use std::net::{IpAddr, SocketAddr};

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, NetSlice,
    SlicedPacket, TcpHeader, TcpOptionElement, TransportSlice,
};

/// One TCP segment in an Ethernet frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seg {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// (source, destination) MAC.
    pub macs: ([u8; 6], [u8; 6]),
    pub ttl: u8,
    pub seq: u32,
    /// The acknowledgement number, with the ACK flag.
    pub ack: Option<u32>,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub window: u16,
    pub options: Vec<TcpOptionElement>,
    pub payload: Vec<u8>,
}

impl Seg {
    pub fn new(src: SocketAddr, dst: SocketAddr, seq: u32) -> Self {
        Seg {
            src,
            dst,
            macs: ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]),
            ttl: 64,
            seq,
            ack: None,
            syn: false,
            fin: false,
            rst: false,
            window: 64_000,
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.macs = (src, dst);
        self
    }

    pub fn ack(mut self, n: u32) -> Self {
        self.ack = Some(n);
        self
    }

    pub fn syn(mut self) -> Self {
        self.syn = true;
        self
    }

    pub fn fin(mut self) -> Self {
        self.fin = true;
        self
    }

    pub fn rst(mut self) -> Self {
        self.rst = true;
        self
    }

    pub fn options(mut self, o: &[TcpOptionElement]) -> Self {
        self.options = o.to_vec();
        self
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    /// The segment as a translation leaves it: other addresses, ports and MACs, one hop less.
    pub fn moved(&self, src: SocketAddr, dst: SocketAddr, macs: ([u8; 6], [u8; 6])) -> Self {
        Seg {
            src,
            dst,
            macs,
            ttl: self.ttl - 1,
            ..self.clone()
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), self.seq, self.window);
        tcp.syn = self.syn;
        tcp.fin = self.fin;
        tcp.rst = self.rst;
        if let Some(a) = self.ack {
            tcp.ack = true;
            tcp.acknowledgment_number = a;
        }
        tcp.set_options(&self.options).expect("TCP options fit");
        let mut out = Vec::new();
        let (ether_type, l4_len) = (
            match self.src {
                SocketAddr::V4(_) => EtherType::IPV4,
                SocketAddr::V6(_) => EtherType::IPV6,
            },
            tcp.header_len() + self.payload.len(),
        );
        Ethernet2Header {
            source: self.macs.0,
            destination: self.macs.1,
            ether_type,
        }
        .write(&mut out)
        .expect("ethernet");
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut ip = Ipv4Header::new(
                    l4_len as u16,
                    self.ttl,
                    IpNumber::TCP,
                    s.octets(),
                    d.octets(),
                )
                .expect("ipv4 header");
                ip.header_checksum = ip.calc_header_checksum();
                tcp.checksum = tcp
                    .calc_checksum_ipv4(&ip, &self.payload)
                    .expect("checksum");
                ip.write(&mut out).expect("ipv4");
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ip = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: l4_len as u16,
                    next_header: IpNumber::TCP,
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                };
                tcp.checksum = tcp
                    .calc_checksum_ipv6(&ip, &self.payload)
                    .expect("checksum");
                ip.write(&mut out).expect("ipv6");
            }
            other => panic!("addresses of two families: {other:?}"),
        }
        tcp.write(&mut out).expect("tcp");
        out.extend_from_slice(&self.payload);
        out
    }

    /// Parses an untagged frame of either family, asserting that the IPv4 header checksum, the
    /// IP length and the TCP checksum are right.
    pub fn parse(frame: &[u8]) -> Seg {
        let p = SlicedPacket::from_ethernet(frame).expect("an Ethernet frame");
        let eth = p.link.expect("layer 2");
        let eth = match eth {
            etherparse::LinkSlice::Ethernet2(e) => e.to_header(),
            other => panic!("not Ethernet II: {other:?}"),
        };
        let Some(TransportSlice::Tcp(t)) = p.transport else {
            panic!("not TCP: {frame:02x?}");
        };
        let tcp = t.to_header();
        let payload = t.payload().to_vec();
        let (src, dst, ttl) = match p.net.expect("layer 3") {
            NetSlice::Ipv4(ip) => {
                let h = ip.header().to_header();
                assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
                assert_eq!(
                    h.total_len as usize,
                    frame.len() - 14,
                    "IPv4 total length against the frame"
                );
                assert_eq!(
                    tcp.checksum,
                    tcp.calc_checksum_ipv4(&h, &payload).expect("sum"),
                    "TCP checksum (IPv4)"
                );
                (
                    IpAddr::V4(h.source.into()),
                    IpAddr::V4(h.destination.into()),
                    h.time_to_live,
                )
            }
            NetSlice::Ipv6(ip) => {
                let h = ip.header().to_header();
                assert_eq!(
                    h.payload_length as usize,
                    frame.len() - 14 - 40,
                    "IPv6 payload length against the frame"
                );
                assert_eq!(
                    tcp.checksum,
                    tcp.calc_checksum_ipv6(&h, &payload).expect("sum"),
                    "TCP checksum (IPv6)"
                );
                (
                    IpAddr::V6(h.source.into()),
                    IpAddr::V6(h.destination.into()),
                    h.hop_limit,
                )
            }
            other => panic!("not IP: {other:?}"),
        };
        Seg {
            src: SocketAddr::new(src, tcp.source_port),
            dst: SocketAddr::new(dst, tcp.destination_port),
            macs: (eth.source, eth.destination),
            ttl,
            seq: tcp.sequence_number,
            ack: tcp.ack.then_some(tcp.acknowledgment_number),
            syn: tcp.syn,
            fin: tcp.fin,
            rst: tcp.rst,
            window: tcp.window_size,
            options: tcp
                .options_iterator()
                .map(|o| o.expect("a well-formed option"))
                .collect(),
            payload,
        }
    }
}
