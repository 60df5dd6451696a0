//! Packet fixtures through BPF_PROG_TEST_RUN: verdict, exact output bytes (checksums verified
//! independently), and counters. State is written through the agent's `Dataplane::apply`.
use std::net::Ipv4Addr;

use privatelink_agent::datapath::{
    Action, DataplaneError, LinkState, PortMap, Proto, Rule, RuleProto,
};
use privatelink_common as c;
use privatelink_tests::{
    fixture::{
        BACKEND, BACKEND_MAC, BACKEND_NO_NEIGH, BACKEND2, CONSUMER, CONSUMER_MAC, ENDPOINT,
        Harness, LINK, NOT_ENDPOINT, PROVIDER_NET, Pkt, SERVICE, with_harness,
    },
    parse_checked,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// Runs `pkt` and asserts a drop counted under `reason`, globally and (if `link`) on the link.
fn assert_dropped(h: &mut Harness, ifindex: u32, pkt: &Pkt, reason: u32, link: Option<u32>) {
    let before = h.outcomes()[reason as usize];
    let link_before = link.map(|l| h.plane.link_drops(l).get(&reason).copied().unwrap_or(0));
    let r = h.run(ifindex, pkt);
    assert_eq!(
        r.verdict,
        XDP_DROP,
        "expected a drop ({}) for {pkt:?}",
        c::OUTCOME_NAMES[reason as usize]
    );
    assert_eq!(
        h.outcomes()[reason as usize],
        before + 1,
        "global counter {}",
        c::OUTCOME_NAMES[reason as usize]
    );
    if let (Some(l), Some(b)) = (link, link_before) {
        assert_eq!(
            h.plane.link_drops(l).get(&reason).copied().unwrap_or(0),
            b + 1,
            "link drop counter"
        );
    }
}

/// Runs `pkt` and asserts it passed untouched, counted under `outcome`.
fn assert_passed(h: &mut Harness, ifindex: u32, pkt: &[u8], outcome: u32) {
    let before = h.outcomes()[outcome as usize];
    let r = privatelink_tests::test_run(h.dp.program(), ifindex, pkt);
    assert_eq!(
        r.verdict,
        XDP_PASS,
        "expected a pass ({})",
        c::OUTCOME_NAMES[outcome as usize]
    );
    assert_eq!(r.out, pkt, "a passed packet must be untouched");
    assert_eq!(
        h.outcomes()[outcome as usize],
        before + 1,
        "counter {}",
        c::OUTCOME_NAMES[outcome as usize]
    );
}

/// Sends a consumer SYN and returns the NAT (address, port) it was translated to.
fn open_flow(h: &mut Harness, sport: u16) -> (Ipv4Addr, u16) {
    let syn = h.consumer_syn(sport);
    let r = h.run(h.c0, &syn);
    assert_eq!(
        r.verdict, XDP_REDIRECT,
        "SYN from port {sport} not forwarded"
    );
    let out = parse_checked(&r.out);
    (out.src, out.sport)
}

#[test]
fn udp_is_translated_and_a_zero_checksum_stays_zero() {
    with_harness("udp", |h| {
        let m = h.model();
        h.apply(&m);
        let q = Pkt::udp(CONSUMER, 5000, ENDPOINT, 53).macs(CONSUMER_MAC, h.c0_mac);
        let r = h.run(h.c0, &q);
        assert_eq!(r.verdict, XDP_REDIRECT);
        let out = parse_checked(&r.out);
        assert_eq!(
            r.out,
            q.translated(
                (out.src, 5000),
                (BACKEND, 5353),
                (h.p0_mac, BACKEND_MAC),
                63
            )
            .build()
        );

        let z = Pkt::udp(CONSUMER, 5001, ENDPOINT, 53)
            .macs(CONSUMER_MAC, h.c0_mac)
            .zero_udp_checksum();
        let r = h.run(h.c0, &z);
        let out = parse_checked(&r.out);
        assert_eq!(
            r.out,
            z.translated(
                (out.src, 5001),
                (BACKEND, 5353),
                (h.p0_mac, BACKEND_MAC),
                63
            )
            .build()
        );
        assert_eq!(&r.out[40..42], &[0, 0], "UDP checksum 0 must stay 0");

        let reply = Pkt::udp(BACKEND, 5353, out.src, 5001).macs(BACKEND_MAC, h.p0_mac);
        let r = h.run(h.p0, &reply);
        assert_eq!(r.verdict, XDP_REDIRECT);
        assert_eq!(
            r.out,
            reply
                .translated(
                    (ENDPOINT, 53),
                    (CONSUMER, 5001),
                    (h.c0_mac, CONSUMER_MAC),
                    63
                )
                .build()
        );
    });
}

fn rule(
    proto: RuleProto,
    ports: std::ops::RangeInclusive<u16>,
    source: &str,
    action: Action,
) -> Rule {
    Rule {
        proto,
        ports,
        source: source.parse().unwrap(),
        action,
    }
}

#[test]
fn security_groups_first_match_in_priority_order_with_edges() {
    with_harness("security_groups", |h| {
        let mut m = h.model();
        let set =
            |h: &mut Harness, m: &mut privatelink_agent::datapath::Model, rules: Vec<Rule>| {
                m.links.get_mut(&LINK).unwrap().rules = Some(rules.into());
                h.apply(m);
            };
        // A higher-priority drop shadows a lower-priority accept...
        set(
            h,
            &mut m,
            vec![
                rule(RuleProto::Tcp, 80..=80, "198.18.0.0/24", Action::Drop),
                rule(RuleProto::All, 0..=65535, "0.0.0.0/0", Action::Accept),
            ],
        );
        assert_dropped(
            h,
            h.c0,
            &h.consumer_syn(40020),
            c::DROP_SECURITY_GROUP,
            Some(LINK),
        );
        // ...and vice versa.
        set(
            h,
            &mut m,
            vec![
                rule(RuleProto::All, 0..=65535, "0.0.0.0/0", Action::Accept),
                rule(RuleProto::Tcp, 80..=80, "198.18.0.0/24", Action::Drop),
            ],
        );
        open_flow(h, 40021);
        // Port range edges: 80 is inside 80-90 and 70-80, outside 81-90.
        for (range, accepted) in [
            (80..=90, true),
            (70..=80, true),
            (81..=90, false),
            (0..=79, false),
        ] {
            set(
                h,
                &mut m,
                vec![rule(
                    RuleProto::Tcp,
                    range.clone(),
                    "0.0.0.0/0",
                    Action::Accept,
                )],
            );
            let syn = h.consumer_syn(40030 + *range.start());
            if accepted {
                assert_eq!(
                    h.run(h.c0, &syn).verdict,
                    XDP_REDIRECT,
                    "range {range:?} should accept port 80"
                );
            } else {
                assert_dropped(h, h.c0, &syn, c::DROP_SECURITY_GROUP, Some(LINK));
            }
        }
        // CIDR edges: the consumer is 198.18.0.10.
        for (i, (cidr, accepted)) in [
            ("198.18.0.10/32", true),
            ("198.18.0.11/32", false),
            ("198.18.0.8/30", true),
            ("198.18.0.12/30", false),
        ]
        .into_iter()
        .enumerate()
        {
            set(
                h,
                &mut m,
                vec![rule(RuleProto::All, 0..=65535, cidr, Action::Accept)],
            );
            let syn = h.consumer_syn(40100 + i as u16);
            if accepted {
                assert_eq!(
                    h.run(h.c0, &syn).verdict,
                    XDP_REDIRECT,
                    "{cidr} should accept 198.18.0.10"
                );
            } else {
                assert_dropped(h, h.c0, &syn, c::DROP_SECURITY_GROUP, Some(LINK));
            }
        }
        // Protocol: a UDP-only accept does not admit TCP.
        set(
            h,
            &mut m,
            vec![rule(RuleProto::Udp, 0..=65535, "0.0.0.0/0", Action::Accept)],
        );
        assert_dropped(
            h,
            h.c0,
            &h.consumer_syn(40200),
            c::DROP_SECURITY_GROUP,
            Some(LINK),
        );
    });
}

#[test]
fn stray_ack_ttl_and_fragments_are_dropped() {
    with_harness("stray_ack_ttl_fragments", |h| {
        let m = h.model();
        h.apply(&m);
        let ack = Pkt::tcp(CONSUMER, 40300, ENDPOINT, 80, false, true).macs(CONSUMER_MAC, h.c0_mac);
        assert_dropped(h, h.c0, &ack, c::DROP_TCP_NOT_SYN, Some(LINK));
        let synack =
            Pkt::tcp(CONSUMER, 40300, ENDPOINT, 80, true, true).macs(CONSUMER_MAC, h.c0_mac);
        assert_dropped(h, h.c0, &synack, c::DROP_TCP_NOT_SYN, Some(LINK));
        assert_dropped(
            h,
            h.c0,
            &h.consumer_syn(40301).ttl(1),
            c::DROP_TTL_EXPIRED,
            Some(LINK),
        );
        assert_eq!(
            h.run(h.c0, &h.consumer_syn(40302).ttl(2)).verdict,
            XDP_REDIRECT,
            "TTL 2 still forwards"
        );
        assert_dropped(
            h,
            h.c0,
            &h.consumer_syn(40303).fragment(true, 0),
            c::DROP_FRAGMENT,
            None,
        );
        assert_dropped(
            h,
            h.c0,
            &h.consumer_syn(40304).fragment(false, 8),
            c::DROP_FRAGMENT,
            None,
        );
        assert!(
            h.plane.flows().len() == 2,
            "only the TTL-2 flow was created"
        );
    });
}

#[test]
fn truncated_and_malformed_headers() {
    with_harness("truncated", |h| {
        let m = h.model();
        h.apply(&m);
        let full = h.consumer_syn(40400).build();
        // Shorter than the IPv4 fixed header (or the VLAN tag): cannot tell, passed to the kernel.
        // (BPF_PROG_TEST_RUN refuses frames shorter than Ethernet, so that layer is not testable here.)
        assert_passed(h, h.c0, &full[..14], c::PASS_MALFORMED);
        assert_passed(h, h.c0, &full[..14 + 19], c::PASS_MALFORMED);
        let tagged = h.consumer_syn(40400).vlan(5).build();
        assert_passed(h, h.c0, &tagged[..16], c::PASS_MALFORMED);
        // Addressed to the endpoint with a cut TCP header: dropped.
        let mut cut = full[..14 + 20 + 10].to_vec();
        cut[16..18].copy_from_slice(&30u16.to_be_bytes());
        privatelink_tests::fix_ipv4_checksum(&mut cut, 14);
        assert_dropped_raw(h, &cut, c::DROP_TRUNCATED);
        // Total length beyond the frame.
        let mut long = full.clone();
        long[16..18].copy_from_slice(&2000u16.to_be_bytes());
        privatelink_tests::fix_ipv4_checksum(&mut long, 14);
        assert_dropped_raw(h, &long, c::DROP_BAD_LENGTH);
        // IHL 4, and IHL 15 beyond the packet.
        for ihl in [4u8, 15] {
            let mut bad = full.clone();
            bad[14] = 0x40 | ihl;
            assert_dropped_raw(h, &bad, c::DROP_BAD_IHL);
        }
        // The same defects in traffic not addressed to an endpoint are the kernel's business.
        let other = Pkt::syn(CONSUMER, 40401, NOT_ENDPOINT, 80).macs(CONSUMER_MAC, h.c0_mac);
        assert_passed(
            h,
            h.c0,
            &other.clone().fragment(true, 0).build(),
            c::PASS_NOT_ENDPOINT,
        );
        let mut bad = other.build();
        bad[14] = 0x44;
        assert_passed(h, h.c0, &bad, c::PASS_NOT_ENDPOINT);
        assert!(h.plane.flows().is_empty());
    });
}

fn assert_dropped_raw(h: &mut Harness, pkt: &[u8], reason: u32) {
    let before = h.outcomes()[reason as usize];
    let r = privatelink_tests::test_run(h.dp.program(), h.c0, pkt);
    assert_eq!(
        r.verdict,
        XDP_DROP,
        "expected drop {}",
        c::OUTCOME_NAMES[reason as usize]
    );
    assert_eq!(h.outcomes()[reason as usize], before + 1);
}

#[test]
fn ip_options_are_honoured() {
    with_harness("ip_options", |h| {
        let m = h.model();
        h.apply(&m);
        // Record-route-like option padding: NOP, NOP, NOP, EOL (IHL 6).
        let syn = h.consumer_syn(40500).options(&[1, 1, 1, 0]);
        let r = h.run(h.c0, &syn);
        assert_eq!(r.verdict, XDP_REDIRECT);
        let out = parse_checked(&r.out);
        assert_eq!(
            r.out,
            syn.translated(
                (out.src, 40500),
                (BACKEND, 8080),
                (h.p0_mac, BACKEND_MAC),
                63
            )
            .build()
        );
    });
}

#[test]
fn unknown_destinations_and_arp() {
    with_harness("unknown_and_arp", |h| {
        let m = h.model();
        h.apply(&m);
        let other = Pkt::syn(CONSUMER, 40700, NOT_ENDPOINT, 80)
            .macs(CONSUMER_MAC, h.c0_mac)
            .build();
        assert_passed(h, h.c0, &other, c::PASS_NOT_ENDPOINT);
        // To the endpoint on a port it does not serve: dropped (nothing else answers there).
        let wrong_port = Pkt::syn(CONSUMER, 40701, ENDPOINT, 81).macs(CONSUMER_MAC, h.c0_mac);
        assert_dropped(h, h.c0, &wrong_port, c::DROP_NO_PORT, None);
        // The provider side: not a NAT address passes; a NAT address without state drops.
        let p = Pkt::tcp(
            BACKEND,
            8080,
            Ipv4Addr::new(198, 18, 100, 1),
            40000,
            true,
            true,
        )
        .build();
        assert_passed(h, h.p0, &p, c::PASS_NOT_ENDPOINT);
        let stray = Pkt::tcp(
            BACKEND,
            8080,
            Ipv4Addr::new(198, 19, 128, 5),
            40000,
            true,
            true,
        );
        assert_dropped(h, h.p0, &stray, c::DROP_NO_FLOW, None);

        // ARP who-has for the endpoint on its network: answered with XDP_TX and c0's MAC.
        let arp = |target: Ipv4Addr| {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&CONSUMER_MAC);
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            f.extend_from_slice(&CONSUMER_MAC);
            f.extend_from_slice(&CONSUMER.octets());
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&target.octets());
            f
        };
        let r = privatelink_tests::test_run(h.dp.program(), h.c0, &arp(ENDPOINT));
        assert_eq!(r.verdict, XDP_TX);
        let mut want = CONSUMER_MAC.to_vec();
        want.extend_from_slice(&h.c0_mac);
        want.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        want.extend_from_slice(&h.c0_mac);
        want.extend_from_slice(&ENDPOINT.octets());
        want.extend_from_slice(&CONSUMER_MAC);
        want.extend_from_slice(&CONSUMER.octets());
        assert_eq!(r.out, want, "ARP reply bytes");
        assert_eq!(h.outcomes()[c::ARP_REPLIED as usize], 1);
        // Not an endpoint, or the endpoint's address on the other network: not answered.
        assert_passed(h, h.c0, &arp(NOT_ENDPOINT), c::PASS_NOT_ENDPOINT);
        assert_passed(h, h.c1, &arp(ENDPOINT), c::PASS_NOT_ENDPOINT);
    });
}

#[test]
fn maglev_keeps_flows_and_moves_about_one_in_n_new_ones() {
    with_harness("maglev", |h| {
        let mut m = h.model();
        m.services.get_mut(&SERVICE).unwrap().backends = vec![BACKEND.into(), BACKEND2.into()];
        h.apply(&m);
        let backend_of = |h: &mut Harness, sport: u16, syn: bool| {
            let p = Pkt::tcp(CONSUMER, sport, ENDPOINT, 80, syn, !syn).macs(CONSUMER_MAC, h.c0_mac);
            let r = h.run(h.c0, &p);
            assert!(
                r.verdict == XDP_REDIRECT || r.verdict == XDP_PASS,
                "port {sport}: verdict {}",
                r.verdict
            );
            parse_checked(&r.out).dst
        };
        let before: Vec<Ipv4Addr> = (41000..41300).map(|p| backend_of(h, p, true)).collect();
        let on_b2 = before.iter().filter(|b| **b == BACKEND2).count();
        assert!(
            (100..200).contains(&on_b2),
            "two backends share evenly: {on_b2} of 300 on the second"
        );
        m.services.get_mut(&SERVICE).unwrap().backends =
            vec![BACKEND.into(), BACKEND2.into(), BACKEND_NO_NEIGH.into()];
        h.apply(&m);
        for (i, p) in (41000..41300).enumerate() {
            assert_eq!(
                backend_of(h, p, false),
                before[i],
                "established flow {p} moved"
            );
        }
        let fresh: Vec<Ipv4Addr> = (42000..42300).map(|p| backend_of(h, p, true)).collect();
        let on_new = fresh.iter().filter(|b| **b == BACKEND_NO_NEIGH).count();
        assert!(
            (60..140).contains(&on_new),
            "about 1/3 of new flows go to the new backend: {on_new} of 300"
        );
        assert!(
            h.outcomes()[c::PASS_NO_NEIGH as usize] >= on_new as u64,
            "unresolved neighbour is handed to the kernel"
        );
    });
}

#[test]
fn bad_state_is_refused_whole_and_changes_nothing() {
    with_harness("refused_state", |h| {
        let m = h.model();
        h.apply(&m);
        let (nat, port) = open_flow(h, 44000);
        let shadow = h.plane.shadow().clone();
        // Two links claiming the same endpoint address and port.
        let mut dup = m.clone();
        let mut l2 = dup.links[&LINK].clone();
        l2.ports = [PortMap {
            proto: Proto::Tcp,
            terminal: 80,
            service: 9090,
        }]
        .into();
        dup.links.insert(2, l2);
        assert!(
            h.plane.apply(&dup).is_err(),
            "a duplicate endpoint address must be refused"
        );
        // More links than the map holds.
        let mut big = m.clone();
        let mut far = m.links[&LINK].clone();
        far.ip4 = Some(Ipv4Addr::new(198, 18, 0, 200));
        big.links.insert(5000, far);
        match h.plane.apply(&big) {
            Err(DataplaneError::Capacity { map, .. }) => assert_eq!(map, c::names::LINKS),
            other => panic!("expected a capacity refusal, got {other:?}"),
        }
        // Too many rules for one endpoint.
        let mut many = m.clone();
        many.links.get_mut(&LINK).unwrap().rules = Some(
            vec![rule(RuleProto::All, 0..=65535, "0.0.0.0/0", Action::Accept); c::MAX_RULES + 1]
                .into(),
        );
        assert!(h.plane.apply(&many).is_err());
        assert_eq!(h.plane.shadow(), &shadow, "the shadow is untouched");
        // And the datapath still serves the old state.
        let ack = Pkt::tcp(CONSUMER, 44000, ENDPOINT, 80, false, true).macs(CONSUMER_MAC, h.c0_mac);
        let r = h.run(h.c0, &ack);
        assert_eq!(r.verdict, XDP_REDIRECT);
        assert_eq!(
            (parse_checked(&r.out).src, parse_checked(&r.out).sport),
            (nat, port)
        );
    });
}

#[test]
fn next_hop_is_cached_until_the_fib_generation_changes() {
    with_harness("next_hop_cache", |h| {
        let m = h.model();
        h.apply(&m);
        let (nat, port) = open_flow(h, 45000);
        let ack = Pkt::tcp(CONSUMER, 45000, ENDPOINT, 80, false, true).macs(CONSUMER_MAC, h.c0_mac);
        // The first established packet resolves and caches; the backend then moves to a new MAC.
        assert_eq!(parse_checked(&h.run(h.c0, &ack).out).dst_mac, BACKEND_MAC);
        let moved = [0x02, 0, 0, 0, 0x64, 0x99];
        move_backend(moved);
        let r = h.run(h.c0, &ack);
        assert_eq!(
            parse_checked(&r.out).dst_mac,
            BACKEND_MAC,
            "served from the cached next hop"
        );
        h.plane.bump_fib_generation().expect("bump");
        let r = h.run(h.c0, &ack);
        assert_eq!(r.verdict, XDP_REDIRECT);
        assert_eq!(
            r.out,
            ack.translated((nat, port), (BACKEND, 8080), (h.p0_mac, moved), 63)
                .build(),
            "re-resolved"
        );
    });
}

/// An ICMP error from the provider side to `nat` about `quoted` (the translated packet the
/// datapath sent, of which the first `quote_len` IP bytes are quoted, as a router would).
fn icmp_error(
    h: &Harness,
    kind: etherparse::Icmpv4Type,
    quoted: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let ip = &quoted[14..];
    let nat: [u8; 4] = ip[12..16].try_into().unwrap();
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(BACKEND_MAC, h.p0_mac)
        .ipv4(BACKEND.octets(), nat, 64)
        .icmpv4(kind)
        .write(&mut out, &ip[..quote_len.min(ip.len())])
        .unwrap();
    out
}

/// An ICMP error from the consumer to the endpoint address about `quoted` (a frame the datapath
/// delivered to the consumer), quoting all of its IP packet.
fn consumer_error(h: &Harness, kind: etherparse::Icmpv4Type, quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(CONSUMER_MAC, h.c0_mac)
        .ipv4(CONSUMER.octets(), ENDPOINT.octets(), 64)
        .icmpv4(kind)
        .write(&mut out, &quoted[14..])
        .expect("icmp error");
    out
}

/// An IPv4 packet as the node sent it on: one hop less, header checksum updated.
fn sent_on(ip: &[u8]) -> Vec<u8> {
    let (mut h, rest) = etherparse::Ipv4Header::from_slice(ip).expect("IPv4");
    h.time_to_live -= 1;
    h.header_checksum = h.calc_header_checksum();
    let mut out = h.to_bytes().to_vec();
    out.extend_from_slice(rest);
    out
}

/// The ICMP message of a frame, its checksums verified: (outer, type, code, bytes 5–8, quoted).
fn icmp_checked(frame: &[u8]) -> (etherparse::Ipv4Header, u8, u8, [u8; 4], Vec<u8>) {
    let p = etherparse::SlicedPacket::from_ethernet(frame).expect("parsable");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4")
    };
    let iph = ip.header().to_header();
    assert_eq!(
        iph.header_checksum,
        iph.calc_header_checksum(),
        "outer IPv4 checksum"
    );
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!("not ICMP")
    };
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload()),
        "ICMP checksum"
    );
    (
        iph,
        icmp.type_u8(),
        icmp.code_u8(),
        icmp.bytes5to8(),
        icmp.payload().to_vec(),
    )
}

/// Runs `ip` in the calling thread's namespace (the harness's node), failing the test if it fails.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Points the backend's neighbour entry at `mac` (no FIB generation bump: only caches can tell).
fn move_backend(mac: [u8; 6]) {
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    ip(&[
        "neigh",
        "replace",
        &BACKEND.to_string(),
        "lladdr",
        &mac,
        "dev",
        "p0",
        "nud",
        "permanent",
    ]);
}

#[test]
fn new_flows_reuse_their_backends_next_hop_until_it_ages_or_the_generation_changes() {
    with_harness("backend_next_hop", |h| {
        // The cache is per CPU: every run on one CPU, so each one sees what the last one left.
        privatelink_tests::pin_to_cpu0();
        let m = h.model();
        h.apply(&m);
        let dst_mac = |h: &mut Harness, pkt: &Pkt| {
            let r = h.run(h.c0, pkt);
            assert_eq!(r.verdict, XDP_REDIRECT, "{pkt:?}");
            parse_checked(&r.out).dst_mac
        };
        // The first flow's FIB lookup fills the backend's next hop.
        assert_eq!(dst_mac(h, &h.consumer_syn(46000)), BACKEND_MAC);
        let moved = [0x02, 0, 0, 0, 0x64, 0x99];
        move_backend(moved);
        // A new flow within the second takes it without a lookup, and so does its next packet
        // (the forward entry starts out with it).
        assert_eq!(dst_mac(h, &h.consumer_syn(46001)), BACKEND_MAC, "cached");
        let ack = Pkt::tcp(CONSUMER, 46001, ENDPOINT, 80, false, true).macs(CONSUMER_MAC, h.c0_mac);
        assert_eq!(dst_mac(h, &ack), BACKEND_MAC, "the flow's own entry");
        // A route or neighbour change (the agent bumps the generation): resolved again.
        h.plane.bump_fib_generation().expect("bump");
        assert_eq!(dst_mac(h, &h.consumer_syn(46002)), moved, "re-resolved");
        // Without a bump, a cached next hop lives at most a second.
        move_backend(BACKEND_MAC);
        assert_eq!(dst_mac(h, &h.consumer_syn(46003)), moved, "still cached");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(dst_mac(h, &h.consumer_syn(46004)), BACKEND_MAC, "aged out");
    });
}

#[test]
fn interfaces_are_found_by_ifindex_array_or_beyond_it_by_hash() {
    with_harness("iface_index", |h| {
        // An interface whose ifindex is beyond the array: it lives in the hash only.
        let big = c::IFACE_INDEX_ENTRIES + 904;
        for args in [
            vec![
                "link",
                "add",
                "plbig0",
                "index",
                &big.to_string(),
                "type",
                "veth",
                "peer",
                "name",
                "plbig0p",
            ],
            vec!["link", "set", "plbig0", "up"],
            vec!["link", "set", "plbig0p", "up"],
        ] {
            ip(&args);
        }
        let mac: [u8; 6] = [0x02, 0, 0, 0, 0xb1, 0x90];
        let mut m = h.model();
        m.ifaces.push(privatelink_agent::datapath::Iface {
            ifindex: big,
            vlan_id: 0,
            network_id: privatelink_tests::fixture::CONSUMER_NET2,
            role: privatelink_agent::datapath::Role::Consumer,
            mac,
        });
        let mut other = m.links[&LINK].clone();
        other.network_id = privatelink_tests::fixture::CONSUMER_NET2;
        m.links.insert(2, other);
        h.apply(&m);
        let usage: std::collections::BTreeMap<_, _> = h
            .plane
            .map_usage()
            .into_iter()
            .map(|(name, n, _)| (name, n))
            .collect();
        assert_eq!(usage[c::names::IFACES], 4, "every interface in the hash");
        assert_eq!(
            usage[c::names::IFACE_INDEX],
            3,
            "the three with small ifindexes in the array"
        );
        // Both kinds classify: a new flow from each.
        let from_small = Pkt::syn(CONSUMER, 47000, ENDPOINT, 80).macs(CONSUMER_MAC, h.c0_mac);
        assert_eq!(h.run(h.c0, &from_small).verdict, XDP_REDIRECT, "array");
        let from_big = Pkt::syn(CONSUMER, 47001, ENDPOINT, 80).macs(CONSUMER_MAC, mac);
        assert_eq!(h.run(big, &from_big).verdict, XDP_REDIRECT, "hash");
        assert_eq!(
            h.link_stats(2).new_conns,
            1,
            "counted on the big interface's network's link"
        );
        // Removing an interface removes it from both.
        h.apply(&h.model());
        let usage: std::collections::BTreeMap<_, _> = h
            .plane
            .map_usage()
            .into_iter()
            .map(|(name, n, _)| (name, n))
            .collect();
        assert_eq!(
            (usage[c::names::IFACES], usage[c::names::IFACE_INDEX]),
            (3, 3)
        );
        assert_eq!(
            h.run(big, &from_big).verdict,
            XDP_PASS,
            "an unknown interface passes"
        );
    });
}

#[test]
fn icmp_errors_about_a_flow_reach_the_consumer_as_about_its_own_packet() {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    with_harness("icmp_errors", |h| {
        let m = h.model();
        h.apply(&m);
        // TCP: fragmentation needed, quoting the whole translated SYN (as Linux does).
        let syn = h.consumer_syn(40001);
        let original = syn.build();
        let r = h.run(h.c0, &syn);
        assert_eq!(r.verdict, XDP_REDIRECT);
        let frag = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        });
        let err = icmp_error(h, frag.clone(), &r.out, 1500);
        let before = h.outcomes()[c::FWD_REDIRECT as usize];
        let reply_before = h.link_stats(LINK).rev_packets;
        let e = privatelink_tests::test_run(h.dp.program(), h.p0, &err);
        assert_eq!(e.verdict, XDP_REDIRECT, "the error goes to the consumer");
        assert_eq!(h.outcomes()[c::FWD_REDIRECT as usize], before + 1);
        assert_eq!(
            h.link_stats(LINK).rev_packets,
            reply_before + 1,
            "counted on the link"
        );
        assert_eq!(&e.out[..12], &[CONSUMER_MAC, h.c0_mac].concat()[..], "MACs");
        let (outer, kind, code, rest, quoted) = icmp_checked(&e.out);
        assert_eq!(
            (
                Ipv4Addr::from(outer.source),
                Ipv4Addr::from(outer.destination),
                outer.time_to_live
            ),
            (ENDPOINT, CONSUMER, 63),
            "from the endpoint to the consumer"
        );
        assert_eq!(
            (kind, code, u16::from_be_bytes([rest[2], rest[3]])),
            (3, 4, 1400)
        );
        // The quote is the consumer's own SYN again, byte for byte (its TCP checksum included),
        // but for the hop the node took off its TTL; its header checksum is valid.
        assert_eq!(quoted, sent_on(&original[14..]), "the quoted packet");

        // UDP: port unreachable quoting the IP header and eight bytes (UDP checksum inside).
        let dgram = Pkt::udp(CONSUMER, 40002, ENDPOINT, 53).macs(CONSUMER_MAC, h.c0_mac);
        let original = dgram.build();
        let r = h.run(h.c0, &dgram);
        assert_eq!(r.verdict, XDP_REDIRECT);
        let port = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
        let err = icmp_error(h, port.clone(), &r.out, 28);
        let e = privatelink_tests::test_run(h.dp.program(), h.p0, &err);
        assert_eq!(e.verdict, XDP_REDIRECT);
        let (_, kind, code, _, quoted) = icmp_checked(&e.out);
        assert_eq!((kind, code), (3, 3));
        assert_eq!(
            quoted,
            sent_on(&original[14..14 + 28]),
            "IP header and UDP header as sent"
        );

        // Time exceeded works the same way.
        let r = h.run(h.c0, &h.consumer_syn(40003));
        let te =
            Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit);
        let err = icmp_error(h, te, &r.out, 28);
        let e = privatelink_tests::test_run(h.dp.program(), h.p0, &err);
        assert_eq!(e.verdict, XDP_REDIRECT);

        // An error quoting no tracked flow (another NAT port): dropped and counted.
        let r = h.run(h.c0, &h.consumer_syn(40004));
        let mut stray = r.out.clone();
        let sport = u16::from_be_bytes([stray[34], stray[35]]).wrapping_add(7);
        stray[34..36].copy_from_slice(&sport.to_be_bytes());
        let err = icmp_error(h, port, &stray, 28);
        let before = h.outcomes()[c::DROP_ICMP_NO_FLOW as usize];
        let e = privatelink_tests::test_run(h.dp.program(), h.p0, &err);
        assert_eq!(e.verdict, XDP_DROP);
        assert_eq!(h.outcomes()[c::DROP_ICMP_NO_FLOW as usize], before + 1);
        // A quote cut inside its L4 header: dropped as truncated.
        let err = icmp_error(h, frag, &r.out, 24);
        let before = h.outcomes()[c::DROP_TRUNCATED as usize];
        let e = privatelink_tests::test_run(h.dp.program(), h.p0, &err);
        assert_eq!(e.verdict, XDP_DROP);
        assert_eq!(h.outcomes()[c::DROP_TRUNCATED as usize], before + 1);

        // Echo requests to an endpoint are dropped with their own reason.
        let mut ping = Vec::new();
        etherparse::PacketBuilder::ethernet2(CONSUMER_MAC, h.c0_mac)
            .ipv4(CONSUMER.octets(), ENDPOINT.octets(), 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut ping, b"ping")
            .unwrap();
        let before = h.outcomes()[c::DROP_ICMP_ECHO as usize];
        let e = privatelink_tests::test_run(h.dp.program(), h.c0, &ping);
        assert_eq!(e.verdict, XDP_DROP);
        assert_eq!(h.outcomes()[c::DROP_ICMP_ECHO as usize], before + 1);

        // A service that opts in answers them in place.
        let mut m = h.model();
        m.links.get_mut(&LINK).unwrap().answer_ping = true;
        h.apply(&m);
        let before = h.outcomes()[c::ICMP_ECHO_REPLIED as usize];
        let e = privatelink_tests::test_run(h.dp.program(), h.c0, &ping);
        assert_eq!(e.verdict, XDP_TX, "answered out of the ingress interface");
        assert_eq!(h.outcomes()[c::ICMP_ECHO_REPLIED as usize], before + 1);
        assert_eq!(
            &e.out[..12],
            &[CONSUMER_MAC, h.c0_mac].concat()[..],
            "MACs swapped"
        );
        let (outer, kind, code, rest, data) = icmp_checked(&e.out);
        assert_eq!(
            (
                Ipv4Addr::from(outer.source),
                Ipv4Addr::from(outer.destination),
                outer.time_to_live
            ),
            (ENDPOINT, CONSUMER, 64)
        );
        assert_eq!(
            (kind, code, rest, data.as_slice()),
            (0, 0, [0, 1, 0, 1], &b"ping"[..])
        );
        // Security groups apply: a group dropping ICMP silences it again.
        m.links.get_mut(&LINK).unwrap().rules = Some(
            vec![
                rule(RuleProto::Icmp, 0..=65535, "0.0.0.0/0", Action::Drop),
                rule(RuleProto::All, 0..=65535, "0.0.0.0/0", Action::Accept),
            ]
            .into(),
        );
        h.apply(&m);
        let before = h.outcomes()[c::DROP_ICMP_ECHO as usize];
        let e = privatelink_tests::test_run(h.dp.program(), h.c0, &ping);
        assert_eq!(e.verdict, XDP_DROP);
        assert_eq!(h.outcomes()[c::DROP_ICMP_ECHO as usize], before + 1);
    });
}

#[test]
fn icmp_errors_from_the_consumer_about_a_reply_reach_the_backend_as_about_its_own_packet() {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    with_harness("icmp_errors_back", |h| {
        let m = h.model();
        h.apply(&m);
        let (nat, nport) = open_flow(h, 40020);
        // The backend's SYN-ACK, as it left the backend and as the consumer got it.
        let synack = Pkt::tcp(BACKEND, 8080, nat, nport, true, true).macs(BACKEND_MAC, h.p0_mac);
        let original = synack.build();
        let r = h.run(h.p0, &synack);
        assert_eq!(r.verdict, XDP_REDIRECT);
        // The consumer's side cannot take it whole: fragmentation needed, to the endpoint address.
        let frag = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1280,
        });
        let err = consumer_error(h, frag, &r.out);
        let fwd_before = h.link_stats(LINK).fwd_packets;
        let e = privatelink_tests::test_run(h.dp.program(), h.c0, &err);
        assert_eq!(e.verdict, XDP_REDIRECT, "the error goes to the backend");
        assert_eq!(h.link_stats(LINK).fwd_packets, fwd_before + 1, "counted");
        assert_eq!(&e.out[..12], &[BACKEND_MAC, h.p0_mac].concat()[..], "MACs");
        let (outer, kind, code, rest, quoted) = icmp_checked(&e.out);
        assert_eq!(
            (
                Ipv4Addr::from(outer.source),
                Ipv4Addr::from(outer.destination),
                outer.time_to_live
            ),
            (nat, BACKEND, 63),
            "from the NAT address to the backend"
        );
        assert_eq!(
            (kind, code, u16::from_be_bytes([rest[2], rest[3]])),
            (3, 4, 1280)
        );
        // The quote is the backend's own SYN-ACK, checksum included, but for the node's hop.
        assert_eq!(quoted, sent_on(&original[14..]), "the quoted packet");

        // An error quoting no tracked flow is dropped and counted; so is one quoting a cut header.
        let mut stray = r.out.clone();
        stray[36..38].copy_from_slice(&40999u16.to_be_bytes());
        let port = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
        let err = consumer_error(h, port, &stray);
        assert_dropped_raw(h, &err, c::DROP_ICMP_NO_FLOW);
    });
}

#[test]
fn flow_times_follow_the_clock_and_idle_flows_expire_in_the_datapath() {
    if !privatelink_tests::privileged("flow_times_follow_the_clock") {
        return;
    }
    // The datapath reads the coarse clock once per tick and CPU and reuses it in between: the
    // times it writes must still be the clock's (within a tick), and move on as it does.
    let clock = privatelink_agent::datapath::scan::monotonic_ns;
    let tick_slack = 50_000_000; // coarse time lags the precise clock by at most a tick
    privatelink_tests::fixture::with_harness(
        "flow_times_follow_the_clock_and_idle_flows_expire_in_the_datapath",
        |h| {
            let mut m = h.model();
            m.config.udp_timeout_ns = 1_000_000_000;
            h.apply(&m);
            let dgram = Pkt::udp(CONSUMER, 31_000, ENDPOINT, 53).macs(CONSUMER_MAC, h.c0_mac);
            let newest = |h: &Harness| {
                h.plane
                    .flows()
                    .iter()
                    .map(|(_, f)| f.last_seen_ns)
                    .max()
                    .expect("a flow entry")
            };

            let before = clock();
            assert_eq!(h.run(h.c0, &dgram).verdict, XDP_REDIRECT, "first datagram");
            let after = clock();
            let created = newest(h);
            assert!(
                created + tick_slack >= before && created <= after,
                "the new flow's time {created} is the clock's ({before}..{after})"
            );
            assert_eq!(h.link_stats(LINK).new_conns, 1);

            // Within the timeout: the same flow, and no refresh yet (at most once a second).
            std::thread::sleep(std::time::Duration::from_millis(600));
            assert_eq!(h.run(h.c0, &dgram).verdict, XDP_REDIRECT, "second datagram");
            assert_eq!(h.link_stats(LINK).new_conns, 1, "still the first flow");
            assert_eq!(newest(h), created, "not refreshed within a second");

            // 1.2 s after its last refresh the flow has expired: the datapath's clock moved on,
            // so the next datagram opens a new flow, stamped with the time of now.
            std::thread::sleep(std::time::Duration::from_millis(600));
            let before = clock();
            assert_eq!(h.run(h.c0, &dgram).verdict, XDP_REDIRECT, "third datagram");
            let after = clock();
            assert_eq!(
                h.link_stats(LINK).new_conns,
                2,
                "the idle flow expired in the datapath and a new one was opened"
            );
            let renewed = newest(h);
            assert!(
                renewed + tick_slack >= before && renewed <= after,
                "the new flow's time {renewed} is the clock's ({before}..{after})"
            );
        },
    );
}

#[test]
fn steady_flows_are_served_from_the_flow_cache_until_the_agent_cuts_them() {
    with_harness("flow_cache", |h| {
        privatelink_tests::pin_to_cpu0();
        let m = h.model();
        h.apply(&m);
        let (nat, port) = open_flow(h, 41500);
        let cache = |h: &Harness| h.plane.flow_cache_stats().expect("flow cache counters");
        assert_eq!(
            cache(h),
            (0, 0),
            "a flow that only sent its SYN is not cached"
        );
        // The SYN-ACK takes conntrack (it changes the state); a half-open flow is not cached.
        let syn_ack = Pkt::tcp(BACKEND, 8080, nat, port, true, true).macs(BACKEND_MAC, h.p0_mac);
        assert_eq!(h.run(h.p0, &syn_ack).verdict, XDP_REDIRECT, "SYN-ACK");
        assert_eq!(cache(h), (0, 0), "a half-open flow is not cached");
        // The consumer's first ACK completes the handshake (conntrack) and copies the forward
        // entry in; the second is served from the copy, byte for byte the same, and counted on the
        // link all the same.
        let ack = Pkt::tcp(CONSUMER, 41500, ENDPOINT, 80, false, true).macs(CONSUMER_MAC, h.c0_mac);
        let first = h.run(h.c0, &ack);
        assert_eq!(first.verdict, XDP_REDIRECT, "first ACK");
        assert_eq!(
            cache(h),
            (0, 1),
            "the first ACK fills the forward entry's slot"
        );
        let fwd_before = h.link_stats(LINK).fwd_packets;
        let second = h.run(h.c0, &ack);
        assert_eq!(second.verdict, XDP_REDIRECT, "second ACK");
        assert_eq!(cache(h), (1, 1), "the second ACK is a hit");
        assert_eq!(
            second.out, first.out,
            "a hit translates exactly as conntrack does"
        );
        assert_eq!(
            second.out,
            ack.translated((nat, port), (BACKEND, 8080), (h.p0_mac, BACKEND_MAC), 63)
                .build(),
            "the translation"
        );
        assert_eq!(
            h.link_stats(LINK).fwd_packets,
            fwd_before + 1,
            "hit counted"
        );

        // The reply direction: the first reply fills its slot, the second is a hit.
        let reply = Pkt::tcp(BACKEND, 8080, nat, port, false, true).macs(BACKEND_MAC, h.p0_mac);
        assert_eq!(h.run(h.p0, &reply).verdict, XDP_REDIRECT, "first reply");
        assert_eq!(
            cache(h),
            (1, 2),
            "the first reply fills the reply entry's slot"
        );
        let r = h.run(h.p0, &reply);
        assert_eq!(r.verdict, XDP_REDIRECT, "reply");
        assert_eq!(cache(h), (2, 2), "the reply is a hit");
        assert_eq!(
            r.out,
            reply
                .translated(
                    (ENDPOINT, 80),
                    (CONSUMER, 41500),
                    (h.c0_mac, CONSUMER_MAC),
                    63
                )
                .build(),
            "a reply hit translates as conntrack does"
        );

        // A FIN changes the state: it takes conntrack, which records it.
        let fin = Pkt::tcp(CONSUMER, 41500, ENDPOINT, 80, false, true)
            .flags(true, false)
            .macs(CONSUMER_MAC, h.c0_mac);
        assert_eq!(h.run(h.c0, &fin).verdict, XDP_REDIRECT, "FIN");
        assert_eq!(cache(h).0, 2, "a FIN is not served from the cache");
        let closing = h
            .plane
            .flows()
            .into_iter()
            .filter(|(k, _)| k.sport_be == 41500u16.to_be())
            .all(|(_, f)| f.tcp_state == c::CT_CLOSING);
        assert!(closing, "the FIN moved both entries to closing");

        // The agent deletes the flow (its backend turned unhealthy): the cached copies must not
        // keep it alive. The ACK is now a stray one, the reply has no flow.
        let cut = h
            .plane
            .cut_backend_flows(&std::collections::BTreeSet::from([(
                PROVIDER_NET,
                std::net::IpAddr::from(BACKEND),
            )]));
        assert_eq!(cut, 2, "both entries deleted");
        let hits = cache(h).0;
        assert_dropped(h, h.c0, &ack, c::DROP_TCP_NOT_SYN, Some(LINK));
        assert_dropped(h, h.p0, &reply, c::DROP_NO_FLOW, None);
        assert_eq!(cache(h).0, hits, "no hit after the cut");
    });
}

#[test]
fn a_link_cut_and_restored_does_not_revive_its_cached_flows() {
    with_harness("flow_cache_link_cut", |h| {
        privatelink_tests::pin_to_cpu0();
        let mut m = h.model();
        h.apply(&m);
        // Once as a links-only change, once together with a service change (the agent writes
        // the two through different paths).
        for (sport, touch_service) in [(41600, false), (41601, true)] {
            let (nat, port) = open_flow(h, sport);
            let syn_ack =
                Pkt::tcp(BACKEND, 8080, nat, port, true, true).macs(BACKEND_MAC, h.p0_mac);
            assert_eq!(h.run(h.p0, &syn_ack).verdict, XDP_REDIRECT, "SYN-ACK");
            let ack =
                Pkt::tcp(CONSUMER, sport, ENDPOINT, 80, false, true).macs(CONSUMER_MAC, h.c0_mac);
            assert_eq!(h.run(h.c0, &ack).verdict, XDP_REDIRECT, "handshake ACK");
            assert_eq!(h.run(h.c0, &ack).verdict, XDP_REDIRECT, "first ACK (fill)");
            let before = h.plane.flow_cache_stats().expect("counters").0;
            assert_eq!(h.run(h.c0, &ack).verdict, XDP_REDIRECT, "second ACK (hit)");
            let hits = h.plane.flow_cache_stats().expect("counters").0;
            assert_eq!(
                hits,
                before + 1,
                "the flow is served from the cache before the cut"
            );

            // Rejected, then accepted again well within the copies' lifetime: the flow's entries
            // went with the reject, so the link being usable again must not bring them back.
            m.links.get_mut(&LINK).unwrap().state = LinkState::Rejected;
            if touch_service {
                m.services.get_mut(&SERVICE).unwrap().backends =
                    vec![BACKEND.into(), BACKEND2.into()];
            }
            assert_eq!(h.plane.apply(&m).expect("reject").flows_cut, 2, "flow cut");
            m.links.get_mut(&LINK).unwrap().state = LinkState::Available;
            h.apply(&m);
            assert_dropped(h, h.c0, &ack, c::DROP_TCP_NOT_SYN, Some(LINK));
            let reply = Pkt::tcp(BACKEND, 8080, nat, port, false, true).macs(BACKEND_MAC, h.p0_mac);
            assert_dropped(h, h.p0, &reply, c::DROP_NO_FLOW, None);
            assert_eq!(
                h.plane.flow_cache_stats().expect("counters").0,
                hits,
                "no hit after the cut (service touched: {touch_service})"
            );
        }
    });
}

/// Conntrack is read in batches of 4,096 entries (`BPF_MAP_LOOKUP_BATCH`): 5,000 flows make
/// 10,000 entries, three batches, and every reader sees each entry once (the agent's view, the
/// counters' view), and a cut removes them all.
#[test]
fn conntrack_reads_in_batches_see_every_entry_once() {
    with_harness("conntrack_batches", |h| {
        let m = h.model();
        h.apply(&m);
        const FLOWS: u16 = 5_000;
        for i in 0..FLOWS {
            let r = h.run(h.c0, &h.consumer_syn(10_000 + i));
            assert_eq!(r.verdict, XDP_REDIRECT, "SYN {i}");
        }
        let flows = h.plane.flows();
        assert_eq!(
            flows.len(),
            2 * FLOWS as usize,
            "a forward and a reply entry each"
        );
        let keys: std::collections::BTreeSet<_> = flows.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys.len(), flows.len(), "no entry twice");
        let forward: std::collections::BTreeSet<u16> = flows
            .iter()
            .filter(|(_, f)| f.dir == c::DIR_FORWARD)
            .map(|(k, _)| u16::from_be(k.sport_be))
            .collect();
        assert_eq!(
            forward,
            (10_000..10_000 + FLOWS).collect(),
            "every consumer port's forward entry"
        );
        let views = h.plane.stats_reader().expect("reader").flow_views();
        assert_eq!(
            views.len(),
            flows.len(),
            "the counters read the same entries"
        );
        let cut = h
            .plane
            .cut_flows(&std::collections::BTreeSet::from([LINK]))
            .expect("cut");
        assert_eq!(cut, flows.len(), "the cut finds every entry");
        assert!(h.plane.flows().is_empty(), "and removes them");
    });
}

#[test]
fn a_link_at_its_flow_limit_refuses_new_flows_until_a_scan_sees_flows_end() {
    with_harness("flow_limit", |h| {
        let mut m = h.model();
        m.links.get_mut(&LINK).unwrap().flow_limit = 3;
        let mut other = m.links[&LINK].clone();
        other.network_id = privatelink_tests::fixture::CONSUMER_NET2;
        other.flow_limit = 0;
        m.links.insert(2, other);
        h.apply(&m);
        let mut reader = h.plane.stats_reader().expect("stats reader");
        let cfg = c::DatapathConfig::DEFAULT;
        let flows: Vec<_> = (0..3).map(|i| open_flow(h, 41_000 + i)).collect();
        assert_dropped(
            h,
            h.c0,
            &h.consumer_syn(41_003),
            c::DROP_FLOW_LIMIT,
            Some(LINK),
        );
        // Another link is not held by this one's limit.
        for i in 0..5 {
            let syn = Pkt::syn(CONSUMER, 41_000 + i, ENDPOINT, 80).macs(CONSUMER_MAC, h.c1_mac);
            assert_eq!(
                h.run(h.c1, &syn).verdict,
                XDP_REDIRECT,
                "other link, flow {i}"
            );
        }
        // The established flows of the limited link go on.
        let (nat, port) = flows[1];
        let synack = Pkt::tcp(BACKEND, 8080, nat, port, true, true).macs(BACKEND_MAC, h.p0_mac);
        assert_eq!(h.run(h.p0, &synack).verdict, XDP_REDIRECT);
        let ack =
            Pkt::tcp(CONSUMER, 41_001, ENDPOINT, 80, false, true).macs(CONSUMER_MAC, h.c0_mac);
        assert_eq!(h.run(h.c0, &ack).verdict, XDP_REDIRECT);
        // A scan that finds the three live changes nothing.
        let s = privatelink_agent::datapath::scan::scan(&mut reader, &cfg);
        assert_eq!(s.active_by_link.get(&LINK), Some(&3));
        assert_dropped(
            h,
            h.c0,
            &h.consumer_syn(41_004),
            c::DROP_FLOW_LIMIT,
            Some(LINK),
        );
        // One ends (RST from the consumer): its place is free once a scan has seen it end.
        let rst = Pkt::tcp(CONSUMER, 41_000, ENDPOINT, 80, false, true)
            .flags(false, true)
            .macs(CONSUMER_MAC, h.c0_mac);
        assert_eq!(h.run(h.c0, &rst).verdict, XDP_REDIRECT);
        assert_dropped(
            h,
            h.c0,
            &h.consumer_syn(41_005),
            c::DROP_FLOW_LIMIT,
            Some(LINK),
        );
        let s = privatelink_agent::datapath::scan::scan(&mut reader, &cfg);
        assert_eq!(s.active_by_link.get(&LINK), Some(&2));
        open_flow(h, 41_006);
        assert_dropped(
            h,
            h.c0,
            &h.consumer_syn(41_007),
            c::DROP_FLOW_LIMIT,
            Some(LINK),
        );
        assert_eq!(h.link_stats(LINK).new_conns, 4);
        assert_eq!(h.link_stats(2).new_conns, 5);
        assert!(!h.plane.link_drops(2).contains_key(&c::DROP_FLOW_LIMIT));
        // Raising the limit applies at once (the count is kept for every link).
        m.links.get_mut(&LINK).unwrap().flow_limit = 4;
        h.apply(&m);
        open_flow(h, 41_008);
        assert_dropped(
            h,
            h.c0,
            &h.consumer_syn(41_009),
            c::DROP_FLOW_LIMIT,
            Some(LINK),
        );
        // A link given a limit while it has flows: the next scan counts them against it.
        m.links.get_mut(&2).unwrap().flow_limit = 6;
        h.apply(&m);
        privatelink_agent::datapath::scan::scan(&mut reader, &cfg);
        let syn = Pkt::syn(CONSUMER, 41_100, ENDPOINT, 80).macs(CONSUMER_MAC, h.c1_mac);
        assert_eq!(h.run(h.c1, &syn).verdict, XDP_REDIRECT, "the sixth flow");
        let syn = Pkt::syn(CONSUMER, 41_101, ENDPOINT, 80).macs(CONSUMER_MAC, h.c1_mac);
        assert_dropped(h, h.c1, &syn, c::DROP_FLOW_LIMIT, Some(2));
    });
}

#[test]
fn a_handshake_is_complete_only_once_the_consumer_acknowledges() {
    with_harness("half_open", |h| {
        let m = h.model();
        h.apply(&m);
        let state = |h: &Harness, sport: u16| {
            let key = c::FlowKey4::new(
                privatelink_tests::fixture::CONSUMER_NET,
                u32::from(CONSUMER).to_be(),
                u32::from(ENDPOINT).to_be(),
                sport.to_be(),
                80u16.to_be(),
                c::PROTO_TCP,
            );
            let flows = h.plane.flows();
            flows
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, f)| f.tcp_state)
        };
        let (nat, port) = open_flow(h, 41_200);
        assert_eq!(state(h, 41_200), Some(c::CT_SYN_SENT));
        let synack = Pkt::tcp(BACKEND, 8080, nat, port, true, true).macs(BACKEND_MAC, h.p0_mac);
        assert_eq!(h.run(h.p0, &synack).verdict, XDP_REDIRECT);
        assert_eq!(
            state(h, 41_200),
            Some(c::CT_SYN_RECV),
            "the backend answered"
        );
        let ack =
            Pkt::tcp(CONSUMER, 41_200, ENDPOINT, 80, false, true).macs(CONSUMER_MAC, h.c0_mac);
        assert_eq!(h.run(h.c0, &ack).verdict, XDP_REDIRECT);
        assert_eq!(
            state(h, 41_200),
            Some(c::CT_ESTABLISHED),
            "the consumer acknowledged"
        );
        // Half-open flows live the short SYN timeout, established ones the long one.
        let d = c::DatapathConfig::DEFAULT;
        assert!(d.timeout_for(c::PROTO_TCP, c::CT_SYN_RECV) == d.tcp_syn_timeout_ns);
        assert!(d.tcp_syn_timeout_ns <= 10_000_000_000);
        assert!(d.timeout_for(c::PROTO_TCP, c::CT_ESTABLISHED) > d.tcp_syn_timeout_ns);
    });
}
