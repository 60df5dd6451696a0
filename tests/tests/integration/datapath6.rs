//! IPv6 packet fixtures through BPF_PROG_TEST_RUN (the IPv6 program, reached by tail call from the
//! datapath): verdict, exact output bytes with checksums verified independently, and counters.
//! State is written through the agent's `Dataplane::apply`.
use std::net::{IpAddr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv6Header, NetSlice, SlicedPacket, TransportSlice,
};
use ipnet::Ipv6Net;
use privatelink_agent::{
    datapath::{Action, Rule, RuleProto},
    testkit::demo::{BACKEND6, ENDPOINT6, NAT_RANGE6},
};
use privatelink_common as c;
use privatelink_tests::{
    family::Fam,
    fixture::{BACKEND_MAC, CONSUMER_MAC, Harness, LINK, with_harness},
    fixture6::{CONSUMER6, Ext, Pkt6, parse_checked6},
    test_run,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

fn nat6() -> Ipv6Net {
    NAT_RANGE6.parse().expect("constant")
}

fn run(h: &mut Harness, ifindex: u32, frame: &[u8]) -> privatelink_tests::Run {
    test_run(h.dp.program(), ifindex, frame)
}

fn assert_dropped(h: &mut Harness, frame: &[u8], reason: u32) {
    let c0 = h.c0;
    dropped_on(h, c0, frame, reason, None);
}

/// `frame` received on `ifindex` is dropped and counted as `reason`, on the node and, when given,
/// on `link`.
fn dropped_on(h: &mut Harness, ifindex: u32, frame: &[u8], reason: u32, link: Option<u32>) {
    let before = h.outcomes()[reason as usize];
    let link_before = link.map(|l| h.plane.link_drops(l).get(&reason).copied().unwrap_or(0));
    let r = run(h, ifindex, frame);
    let name = c::OUTCOME_NAMES[reason as usize];
    assert_eq!(r.verdict, XDP_DROP, "expected a drop ({name})");
    assert_eq!(h.outcomes()[reason as usize], before + 1, "counter {name}");
    if let (Some(l), Some(b)) = (link, link_before) {
        let now = h.plane.link_drops(l).get(&reason).copied().unwrap_or(0);
        assert_eq!(now, b + 1, "link {l} drop counter {name}");
    }
}

/// A TCP segment from the IPv6 consumer to the IPv6 endpoint on `c0`.
fn seg6(h: &Harness, sport: u16, syn: bool, ack: bool) -> Vec<u8> {
    let mut p = Pkt6::syn(CONSUMER6, sport, ENDPOINT6, 80).macs(CONSUMER_MAC, h.c0_mac);
    p.tcp = Some((syn, ack));
    p.build()
}

/// Opens an IPv6 flow from `sport`: the NAT (address, port) it got.
fn open6(h: &mut Harness, sport: u16) -> (Ipv6Addr, u16) {
    let c0 = h.c0;
    let r = run(h, c0, &seg6(h, sport, true, false));
    assert_eq!(r.verdict, XDP_REDIRECT, "IPv6 SYN from {sport}");
    parse_checked6(&r.out)
}

#[test]
fn extension_headers_fragments_and_hop_limit() {
    with_harness("ext6", |h| {
        let m = Fam::model(h);
        h.apply(&m);
        let base = Pkt6::syn(CONSUMER6, 40100, ENDPOINT6, 80).macs(CONSUMER_MAC, h.c0_mac);
        // Two extension headers are walked; they stay in the forwarded frame.
        let mut two = base.clone();
        two.ext = vec![Ext::HopByHop, Ext::DestOpts];
        let r = run(h, h.c0, &two.build());
        assert_eq!(r.verdict, XDP_REDIRECT, "SYN behind two extension headers");
        let (nat, _) = parse_checked6(&r.out);
        assert_eq!(
            r.out,
            two.translated((nat, 40100), (BACKEND6, 8080), (h.p0_mac, BACKEND_MAC), 63)
                .build()
        );
        // A chain longer than the parser walks.
        let mut long = base.clone();
        long.sport = 40101;
        long.ext = vec![Ext::DestOpts; c::MAX_EXT_HDRS + 1];
        assert_dropped(h, &long.build(), c::DROP_IPV6_EXT);
        // A fragment, directly or behind an option header.
        for ext in [vec![Ext::Fragment], vec![Ext::HopByHop, Ext::Fragment]] {
            let mut frag = base.clone();
            frag.sport = 40102;
            frag.ext = ext;
            assert_dropped(h, &frag.build(), c::DROP_FRAGMENT);
        }
        let mut last_hop = base.clone();
        last_hop.sport = 40103;
        last_hop.hop_limit = 1;
        assert_dropped(h, &last_hop.build(), c::DROP_TTL_EXPIRED);
        // Cut inside the TCP header: the payload length announces more than the frame holds,
        // and once it agrees with the cut, the TCP header is what does not fit.
        let mut cut = base.build()[..14 + 40 + 10].to_vec();
        assert_dropped(h, &cut, c::DROP_BAD_LENGTH);
        cut[18..20].copy_from_slice(&10u16.to_be_bytes());
        assert_dropped(h, &cut, c::DROP_TRUNCATED);
        // Not for an endpoint: passes untouched.
        let other = Pkt6::syn(
            CONSUMER6,
            40104,
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            80,
        )
        .macs(CONSUMER_MAC, h.c0_mac)
        .build();
        let before = h.outcomes()[c::PASS_NOT_ENDPOINT as usize];
        let r = run(h, h.c0, &other);
        assert_eq!((r.verdict, r.out.clone()), (XDP_PASS, other));
        assert_eq!(h.outcomes()[c::PASS_NOT_ENDPOINT as usize], before + 1);
        // An endpoint port it does not serve.
        let mut port = base.clone();
        port.dport = 81;
        assert_dropped(h, &port.build(), c::DROP_NO_PORT);
    });
}

#[test]
fn ipv6_security_group_rules_apply_to_ipv6_flows_only() {
    with_harness("sg6", |h| {
        let rule = |source: &str, action| Rule {
            proto: RuleProto::Tcp,
            ports: 80..=80,
            source: source.parse().expect("cidr"),
            action,
        };
        let mut m = Fam::model(h);
        // First match wins: the consumer's /128 is dropped before the /64 accepts; IPv4 sources
        // are accepted by their own rule.
        m.links.get_mut(&LINK).expect("link").rules = Some(
            vec![
                rule("2001:db8::10/128", Action::Drop),
                rule("2001:db8::/64", Action::Accept),
                rule("198.18.0.0/24", Action::Accept),
            ]
            .into(),
        );
        h.apply(&m);
        let c0_mac = h.c0_mac;
        let from = |src: Ipv6Addr, sport| {
            Pkt6::syn(src, sport, ENDPOINT6, 80)
                .macs(CONSUMER_MAC, c0_mac)
                .build()
        };
        assert_dropped(h, &from(CONSUMER6, 40200), c::DROP_SECURITY_GROUP);
        let neighbour = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11);
        assert_eq!(run(h, h.c0, &from(neighbour, 40201)).verdict, XDP_REDIRECT);
        // Outside every IPv6 rule: no match drops.
        let stranger = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x11);
        assert_dropped(h, &from(stranger, 40202), c::DROP_SECURITY_GROUP);
        // IPv4 traffic of the same endpoint meets the IPv4 rule.
        let syn4 = h.consumer_syn(40203);
        assert_eq!(h.run(h.c0, &syn4).verdict, XDP_REDIRECT);
        // IPv6 flows of a Pending link are refused like IPv4 ones.
        m.links.get_mut(&LINK).expect("link").state =
            privatelink_agent::datapath::LinkState::Pending;
        h.apply(&m);
        assert_dropped(h, &from(neighbour, 40204), c::DROP_LINK_PENDING);
    });
}

/// A neighbour solicitation from the consumer for `target`.
fn solicitation(h: &Harness, target: Ipv6Addr) -> Vec<u8> {
    let mut group = [0xff02, 0, 0, 0, 0, 1, 0xff00, 0];
    let t = target.segments();
    group[6] |= t[6] & 0xff;
    group[7] = t[7];
    let dst = Ipv6Addr::from(group);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend(target.octets());
    icmp.extend([1, 1]);
    icmp.extend(CONSUMER_MAC);
    let sum = icmp6_checksum(CONSUMER6, dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut out = Vec::new();
    let mcast = {
        let o = dst.octets();
        [0x33, 0x33, o[12], o[13], o[14], o[15]]
    };
    Ethernet2Header {
        source: CONSUMER_MAC,
        destination: mcast,
        ether_type: EtherType::IPV6,
    }
    .write(&mut out)
    .expect("eth");
    Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: icmp.len() as u16,
        next_header: IpNumber::IPV6_ICMP,
        hop_limit: 255,
        source: CONSUMER6.octets(),
        destination: dst.octets(),
    }
    .write(&mut out)
    .expect("ipv6");
    let _ = h;
    out.extend(icmp);
    out
}

/// The ICMPv6 checksum, computed from scratch.
fn icmp6_checksum(src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> u16 {
    let mut words: Vec<u8> = Vec::new();
    words.extend(src.octets());
    words.extend(dst.octets());
    words.extend((body.len() as u32).to_be_bytes());
    words.extend([0, 0, 0, 58]);
    let mut b = body.to_vec();
    b[2] = 0;
    b[3] = 0;
    words.extend(b);
    if words.len() % 2 == 1 {
        words.push(0);
    }
    let mut s: u32 = words
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[test]
fn neighbour_solicitations_for_endpoints_are_answered() {
    with_harness("nd6", |h| {
        let m = Fam::model(h);
        h.apply(&m);
        let ns = solicitation(h, ENDPOINT6);
        let r = run(h, h.c0, &ns);
        assert_eq!(r.verdict, XDP_TX, "solicitation for the endpoint answered");
        assert_eq!(h.outcomes()[c::ND_REPLIED as usize], 1);
        let na = &r.out;
        assert_eq!(&na[0..6], &CONSUMER_MAC, "to the soliciting host");
        assert_eq!(&na[6..12], &h.c0_mac, "from the interface");
        let ip = Ipv6Header::from_slice(&na[14..]).expect("ipv6").0;
        assert_eq!(Ipv6Addr::from(ip.source), ENDPOINT6);
        assert_eq!(Ipv6Addr::from(ip.destination), CONSUMER6);
        assert_eq!(ip.hop_limit, 255);
        let body = &na[14 + 40..];
        assert_eq!(body.len(), 32);
        assert_eq!((body[0], body[1]), (136, 0), "a neighbour advertisement");
        assert_eq!(body[4], 0x60, "solicited and override, not a router");
        assert_eq!(&body[8..24], &ENDPOINT6.octets(), "target");
        assert_eq!(&body[24..26], &[2, 1], "target link-layer address option");
        assert_eq!(&body[26..32], &h.c0_mac);
        assert_eq!(
            u16::from_be_bytes([body[2], body[3]]),
            icmp6_checksum(ENDPOINT6, CONSUMER6, body),
            "ICMPv6 checksum"
        );
        // For an address that is no endpoint: the kernel's business.
        let other = solicitation(h, Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        let r = run(h, h.c0, &other);
        assert_eq!((r.verdict, r.out.clone()), (XDP_PASS, other));
        // Consumer network 2 has no such endpoint: its interface does not answer.
        let ns2 = solicitation(h, ENDPOINT6);
        assert_eq!(run(h, h.c1, &ns2).verdict, XDP_PASS);
    });
}

#[test]
fn echo_requests_to_an_ipv6_endpoint_are_dropped_unless_the_service_answers() {
    with_harness("echo6", |h| {
        let mut m = Fam::model(h);
        h.apply(&m);
        let mut icmp = vec![128, 0, 0, 0, 0, 1, 0, 1, b'p', b'l'];
        let sum = icmp6_checksum(CONSUMER6, ENDPOINT6, &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut frame = Vec::new();
        Ethernet2Header {
            source: CONSUMER_MAC,
            destination: h.c0_mac,
            ether_type: EtherType::IPV6,
        }
        .write(&mut frame)
        .expect("eth");
        Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: icmp.len() as u16,
            next_header: IpNumber::IPV6_ICMP,
            hop_limit: 64,
            source: CONSUMER6.octets(),
            destination: ENDPOINT6.octets(),
        }
        .write(&mut frame)
        .expect("ipv6");
        frame.extend(&icmp);
        assert_dropped(h, &frame, c::DROP_ICMP_ECHO);
        m.links.get_mut(&LINK).expect("link").answer_ping = true;
        h.apply(&m);
        let r = run(h, h.c0, &frame);
        assert_eq!(r.verdict, XDP_TX, "echo answered once the service opts in");
        let ip = Ipv6Header::from_slice(&r.out[14..]).expect("ipv6").0;
        assert_eq!(
            (IpAddr::from(ip.source), IpAddr::from(ip.destination)),
            (ENDPOINT6.into(), CONSUMER6.into())
        );
        let body = &r.out[14 + 40..];
        assert_eq!(body[0], 129, "echo reply");
        assert_eq!(
            u16::from_be_bytes([body[2], body[3]]),
            icmp6_checksum(ENDPOINT6, CONSUMER6, body)
        );
    });
}

/// An ICMPv6 error from the backend to the NAT address of `quoted` (the translated frame the
/// datapath sent), quoting its first `quote_len` IPv6 bytes, as a router would.
fn icmp6_error(
    h: &Harness,
    kind: etherparse::Icmpv6Type,
    quoted: &[u8],
    quote_len: usize,
    hop_limit: u8,
) -> Vec<u8> {
    let ip = &quoted[14..];
    let nat: [u8; 16] = ip[8..24].try_into().expect("source address");
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(BACKEND_MAC, h.p0_mac)
        .ipv6(BACKEND6.octets(), nat, hop_limit)
        .icmpv6(kind)
        .write(&mut out, &ip[..quote_len.min(ip.len())])
        .expect("icmpv6 error");
    out
}

/// An ICMPv6 error from the consumer to the endpoint address about `quoted` (a frame the datapath
/// delivered to the consumer), quoting all of its IPv6 packet.
fn consumer_error6(h: &Harness, kind: etherparse::Icmpv6Type, quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(CONSUMER_MAC, h.c0_mac)
        .ipv6(CONSUMER6.octets(), ENDPOINT6.octets(), 64)
        .icmpv6(kind)
        .write(&mut out, &quoted[14..])
        .expect("icmpv6 error");
    out
}

/// An IPv6 packet as the node sent it on: one hop less (no header checksum to fix).
fn sent_on6(ip: &[u8]) -> Vec<u8> {
    let mut out = ip.to_vec();
    out[7] -= 1;
    out
}

/// The ICMPv6 message of a frame, its checksum verified independently: (outer header, type,
/// code, bytes 5–8, quoted packet).
fn icmp6_checked(frame: &[u8]) -> (etherparse::Ipv6Header, u8, u8, [u8; 4], Vec<u8>) {
    let p = SlicedPacket::from_ethernet(frame).expect("parsable");
    let Some(NetSlice::Ipv6(ip)) = &p.net else {
        panic!("not IPv6: {frame:02x?}")
    };
    let iph = ip.header().to_header();
    let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
        panic!("not ICMPv6: {frame:02x?}")
    };
    assert!(
        icmp.is_checksum_valid(iph.source, iph.destination),
        "ICMPv6 checksum of {frame:02x?}"
    );
    (
        iph,
        icmp.type_u8(),
        icmp.code_u8(),
        icmp.bytes5to8(),
        icmp.payload().to_vec(),
    )
}

#[test]
fn icmpv6_errors_about_a_flow_reach_the_consumer_as_about_its_own_packet() {
    use etherparse::{Icmpv6Type, icmpv6::DestUnreachableCode, icmpv6::TimeExceededCode};
    with_harness("icmp6_errors", |h| {
        let m = Fam::model(h);
        h.apply(&m);
        // TCP: packet too big, quoting the whole translated SYN (a router quotes up to 1280 bytes).
        let syn = Pkt6::syn(CONSUMER6, 40001, ENDPOINT6, 80).macs(CONSUMER_MAC, h.c0_mac);
        let original = syn.build();
        let r = run(h, h.c0, &original);
        assert_eq!(r.verdict, XDP_REDIRECT, "SYN to the IPv6 endpoint");
        let ptb = Icmpv6Type::PacketTooBig { mtu: 1280 };
        let err = icmp6_error(h, ptb, &r.out, 1500, 64);
        let before = h.outcomes()[c::FWD_REDIRECT as usize];
        let reply_before = h.link_stats(LINK).rev_packets;
        let p0 = h.p0;
        let e = run(h, p0, &err);
        assert_eq!(e.verdict, XDP_REDIRECT, "the error goes to the consumer");
        assert_eq!(h.outcomes()[c::FWD_REDIRECT as usize], before + 1);
        assert_eq!(
            h.link_stats(LINK).rev_packets,
            reply_before + 1,
            "counted on the link"
        );
        assert_eq!(&e.out[..12], &[CONSUMER_MAC, h.c0_mac].concat()[..], "MACs");
        let (outer, kind, code, rest, quoted) = icmp6_checked(&e.out);
        assert_eq!(
            (
                Ipv6Addr::from(outer.source),
                Ipv6Addr::from(outer.destination),
                outer.hop_limit
            ),
            (ENDPOINT6, CONSUMER6, 63),
            "from the endpoint to the consumer"
        );
        assert_eq!((kind, code, u32::from_be_bytes(rest)), (2, 0, 1280));
        // The quote is the consumer's own SYN again, byte for byte (its TCP checksum included),
        // but for the hop the node took off.
        assert_eq!(quoted, sent_on6(&original[14..]), "the quoted packet");

        // UDP: port unreachable quoting the IPv6 header and the UDP header (checksum inside).
        let dgram = Pkt6::udp(CONSUMER6, 40002, ENDPOINT6, 53).macs(CONSUMER_MAC, h.c0_mac);
        let original = dgram.build();
        let r = run(h, h.c0, &original);
        assert_eq!(r.verdict, XDP_REDIRECT);
        let port = Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port);
        let err = icmp6_error(h, port, &r.out, 48, 64);
        let e = run(h, p0, &err);
        assert_eq!(e.verdict, XDP_REDIRECT);
        let (_, kind, code, _, quoted) = icmp6_checked(&e.out);
        assert_eq!((kind, code), (1, 4));
        assert_eq!(
            quoted,
            sent_on6(&original[14..14 + 48]),
            "IPv6 header and UDP header as sent"
        );

        // Time exceeded quoting only eight TCP bytes (no TCP checksum in the quote).
        let syn3 = Pkt6::syn(CONSUMER6, 40003, ENDPOINT6, 80).macs(CONSUMER_MAC, h.c0_mac);
        let original = syn3.build();
        let r = run(h, h.c0, &original);
        let te = Icmpv6Type::TimeExceeded(TimeExceededCode::HopLimitExceeded);
        let err = icmp6_error(h, te, &r.out, 48, 64);
        let e = run(h, p0, &err);
        assert_eq!(e.verdict, XDP_REDIRECT);
        let (_, kind, _, _, quoted) = icmp6_checked(&e.out);
        assert_eq!(kind, 3);
        assert_eq!(quoted, sent_on6(&original[14..14 + 48]));

        // An error whose own hop limit is spent is not forwarded.
        let err = icmp6_error(h, te, &r.out, 48, 1);
        assert_provider_drop(h, &err, c::DROP_TTL_EXPIRED);
        // An error quoting no tracked flow (another NAT port): dropped and counted.
        let mut stray = r.out.clone();
        let sport = u16::from_be_bytes([stray[54], stray[55]]).wrapping_add(7);
        stray[54..56].copy_from_slice(&sport.to_be_bytes());
        let err = icmp6_error(h, port, &stray, 48, 64);
        assert_provider_drop(h, &err, c::DROP_ICMP_NO_FLOW);
        // A quote cut inside its L4 header: dropped as truncated.
        let err = icmp6_error(h, ptb, &r.out, 44, 64);
        assert_provider_drop(h, &err, c::DROP_TRUNCATED);
        // An echo request to a NAT address: no such flow.
        let nat: [u8; 16] = r.out[22..38].try_into().expect("address");
        let mut ping = Vec::new();
        etherparse::PacketBuilder::ethernet2(BACKEND_MAC, h.p0_mac)
            .ipv6(BACKEND6.octets(), nat, 64)
            .icmpv6_echo_request(1, 1)
            .write(&mut ping, b"ping")
            .expect("echo");
        assert_provider_drop(h, &ping, c::DROP_NO_FLOW);
        // None of the errors created or refreshed state: still the three flows' entries.
        assert_eq!(
            h.plane.flows6().len(),
            6,
            "two entries per flow, nothing more"
        );
    });
}

#[test]
fn icmpv6_errors_from_the_consumer_about_a_reply_reach_the_backend_as_about_its_own_packet() {
    with_harness("icmp6_errors_back", |h| {
        let m = Fam::model(h);
        h.apply(&m);
        let (nat, nport) = open6(h, 40020);
        // The backend's SYN-ACK as it left the backend, and as the consumer got it.
        let mut synack = Pkt6::syn(BACKEND6, 8080, nat, nport).macs(BACKEND_MAC, h.p0_mac);
        synack.tcp = Some((true, true));
        let original = synack.build();
        let p0 = h.p0;
        let r = run(h, p0, &original);
        assert_eq!(r.verdict, XDP_REDIRECT);
        // The consumer's side cannot take it whole: packet too big, to the endpoint address.
        let ptb = etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 };
        let err = consumer_error6(h, ptb, &r.out);
        let fwd_before = h.link_stats(LINK).fwd_packets;
        let c0 = h.c0;
        let e = run(h, c0, &err);
        assert_eq!(e.verdict, XDP_REDIRECT, "the error goes to the backend");
        assert_eq!(h.link_stats(LINK).fwd_packets, fwd_before + 1, "counted");
        assert_eq!(&e.out[..12], &[BACKEND_MAC, h.p0_mac].concat()[..], "MACs");
        let (outer, kind, _, rest, quoted) = icmp6_checked(&e.out);
        assert_eq!(
            (
                Ipv6Addr::from(outer.source),
                Ipv6Addr::from(outer.destination),
                outer.hop_limit
            ),
            (nat, BACKEND6, 63),
            "from the NAT address to the backend"
        );
        assert_eq!((kind, u32::from_be_bytes(rest)), (2, 1280));
        assert_eq!(
            quoted,
            sent_on6(&original[14..]),
            "the backend's own SYN-ACK"
        );
        // A quote of no tracked flow: dropped and counted.
        let mut stray = r.out.clone();
        stray[56..58].copy_from_slice(&40999u16.to_be_bytes());
        let err = consumer_error6(h, ptb, &stray);
        dropped_on(h, c0, &err, c::DROP_ICMP_NO_FLOW, None);
    });
}

/// `frame` on the provider interface is dropped, counted as `reason`, and forwarded nothing.
fn assert_provider_drop(h: &mut Harness, frame: &[u8], reason: u32) {
    let p0 = h.p0;
    dropped_on(h, p0, frame, reason, None);
}

#[test]
fn ipv6_keeps_forwarding_while_a_restarted_agent_swaps_the_programs() {
    use privatelink_agent::{
        datapath::Dataplane,
        datapath::loader::{Datapath, Sizes},
        datapath::pins::Pins,
    };
    with_harness("restart6", |h| {
        // An agent and its restarted successor: two loads of the object on the same pins. The
        // second installs its IPv6 program in the pinned JUMP at once, while the first one's
        // programs are still attached, so the old IPv4 program tail-calls the new IPv6 one.
        let dir = std::env::temp_dir().join(format!("privatelink-restart6-{}", std::process::id()));
        let fs = privatelink_tests::world::BpfFs::mount(&dir);
        let pins = Pins::prepare(&fs.0.join("privatelink")).expect("pins");
        let mut old = Datapath::load_pinned(&Sizes::small(), &pins).expect("first load");
        let mut plane = Dataplane::new(&mut old.ebpf).expect("maps");
        plane.apply(&Fam::model(h)).expect("apply");
        let new = Datapath::load_pinned(&Sizes::small(), &pins).expect("second load");
        let syn = seg6(h, 42000, true, false);
        let r = test_run(old.program(), h.c0, &syn);
        assert_eq!(
            r.verdict, XDP_REDIRECT,
            "an IPv6 SYN through the old program and the new IPv6 program"
        );
        let (nat, _) = parse_checked6(&r.out);
        assert!(nat6().contains(&nat), "translated: {nat}");
        drop((plane, old, new));
        drop(fs);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn steady_ipv6_flows_are_served_from_the_flow_cache_until_the_agent_cuts_them() {
    with_harness("flow_cache6", |h| {
        privatelink_tests::pin_to_cpu0();
        let m = Fam::model(h);
        h.apply(&m);
        let cache = |h: &Harness| h.plane.flow_cache_stats().expect("flow cache counters");
        let udp = Pkt6::udp(CONSUMER6, 5100, ENDPOINT6, 53).macs(CONSUMER_MAC, h.c0_mac);
        let r = run(h, h.c0, &udp.build());
        assert_eq!(r.verdict, XDP_REDIRECT, "the first datagram opens the flow");
        assert_eq!(
            cache(h),
            (0, 0),
            "a new flow is not copied in by its first packet"
        );
        let (nat, nport) = parse_checked6(&r.out);
        let want = udp
            .translated((nat, nport), (BACKEND6, 5353), (h.p0_mac, BACKEND_MAC), 63)
            .build();
        let second = run(h, h.c0, &udp.build());
        assert_eq!(cache(h), (0, 1), "the second datagram fills the slot");
        let third = run(h, h.c0, &udp.build());
        assert_eq!(cache(h), (1, 1), "the third is a hit");
        assert_eq!(
            (second.out, third.out),
            (want.clone(), want),
            "same bytes either way"
        );

        let reply = Pkt6::udp(BACKEND6, 5353, nat, nport).macs(BACKEND_MAC, h.p0_mac);
        let back = reply
            .translated(
                (ENDPOINT6, 53),
                (CONSUMER6, 5100),
                (h.c0_mac, CONSUMER_MAC),
                63,
            )
            .build();
        assert_eq!(
            run(h, h.p0, &reply.build()).out,
            back,
            "reply through conntrack"
        );
        assert_eq!(
            run(h, h.p0, &reply.build()).out,
            back,
            "reply from the cache"
        );
        assert_eq!(cache(h), (2, 2), "reply: one fill, one hit");

        // The backend turns unhealthy and the agent cuts its flows: the next datagram opens a
        // new flow instead of riding the cached copy, and the reply finds no flow.
        let cut = h
            .plane
            .cut_backend_flows(&std::collections::BTreeSet::from([(
                privatelink_tests::fixture::PROVIDER_NET,
                IpAddr::from(BACKEND6),
            )]));
        assert_eq!(cut, 2, "both entries deleted");
        let conns = h.link_stats(LINK).new_conns;
        assert_eq!(
            run(h, h.c0, &udp.build()).verdict,
            XDP_REDIRECT,
            "datagram after the cut"
        );
        assert_eq!(
            h.link_stats(LINK).new_conns,
            conns + 1,
            "a new flow, not a hit"
        );
        assert_eq!(cache(h).0, 2, "no hit after the cut");
    });
}
