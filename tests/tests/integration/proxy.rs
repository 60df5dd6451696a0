//! PROXY protocol v2 from the datapath, as packet fixtures over both families (BPF_PROG_TEST_RUN):
//! one connection's segments in order as a table (input, exact output bytes), with the header
//! built independently (the `ppp` crate, CRC32C by the `crc32c` crate) and every checksum checked
//! by etherparse; state set through the agent's `Dataplane::apply`.
use std::net::SocketAddr;

use etherparse::TcpOptionElement::{
    MaximumSegmentSize as Mss, Noop, SelectiveAcknowledgement as Sack,
    SelectiveAcknowledgementPermitted, Timestamp, WindowScale,
};
use ppp::v2::{Addresses, Builder, Command, Header, Protocol, Version};
use privatelink_common as c;
use privatelink_tests::{
    family::Fam,
    fixture::{BACKEND_MAC, CONSUMER_MAC, Harness, LINK, with_harness},
    tcpseg::Seg,
    test_run,
};

const XDP_REDIRECT: u32 = 4;

/// The header the datapath must send for a connection, built with `ppp`: PROXY, TCP over the
/// family, consumer → endpoint, the TLVs in the documented order, a NOOP that pads the header to
/// a multiple of 4, and the CRC32C of the whole header.
fn expected_header(
    consumer: SocketAddr,
    endpoint: SocketAddr,
    proxy: &privatelink_agent::datapath::LinkProxy,
    isn: u32,
    nat_port: u16,
) -> Vec<u8> {
    let unique = format!(
        "{}/{}/{isn:08x}{:04x}{nat_port:04x}",
        proxy.endpoint_id,
        proxy.account_id,
        consumer.port()
    );
    let build = |pad: Option<usize>| {
        let mut b = Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            Addresses::from((consumer, endpoint)),
        )
        .write_tlv(0xe0, proxy.endpoint_id.as_bytes())
        .and_then(|b| b.write_tlv(0xe1, &LINK.to_be_bytes()))
        .and_then(|b| b.write_tlv(0xe2, proxy.account_id.as_bytes()))
        .expect("tlvs");
        if let Some(n) = pad {
            b = b.write_tlv(0x04, &vec![0; n]).expect("noop");
        }
        b.write_tlv(0x05, unique.as_bytes())
            .and_then(|b| b.write_tlv(0x03, &[0; 4]))
            .and_then(|b| b.build())
            .expect("header")
    };
    let bare = build(None).len();
    let mut h = build(Some((4 - (bare + 3) % 4) % 4));
    assert_eq!(h.len() % 4, 0);
    let crc = crc32c::crc32c(&h);
    let n = h.len();
    h[n - 4..].copy_from_slice(&crc.to_be_bytes());
    h
}

/// The PROXY counters: headers sent, acknowledged, SYN-ACKs clamped.
fn proxy_counters(h: &Harness) -> [u64; 3] {
    h.plane.stats_reader().expect("stats reader").proxy()
}

/// Entries of the family's `PROXY_PENDING` map.
fn pending(h: &Harness, fam: Fam) -> usize {
    use aya::maps::{HashMap, Map};
    match fam {
        Fam::V4 => HashMap::<_, c::FlowKey4, c::ProxyPending>::try_from(Map::HashMap(
            h.kernel_map("PROXY_PENDING4"),
        ))
        .expect("map")
        .keys()
        .count(),
        Fam::V6 => HashMap::<_, c::FlowKey6, c::ProxyPending>::try_from(Map::HashMap(
            h.kernel_map("PROXY_PENDING6"),
        ))
        .expect("map")
        .keys()
        .count(),
    }
}

/// Which side a fixture segment comes from.
#[derive(Clone, Copy, Debug)]
enum From {
    Consumer,
    Backend,
}

#[test]
fn a_proxy_connection_gets_its_header_first_and_every_sequence_number_moved_over_it() {
    for fam in Fam::BOTH {
        with_harness(&format!("proxy-conn-{fam:?}"), |h| {
            let mut m = Fam::model(h);
            m.links.get_mut(&LINK).expect("link").proxy.v2 = true;
            // The connection log on too: its counters must go on after the header's state ends.
            m.links.get_mut(&LINK).expect("link").conn_log = true;
            h.apply(&m);
            let proxy = m.links[&LINK].proxy.clone();
            let consumer = SocketAddr::new(fam.consumer(), 40000);
            let endpoint = SocketAddr::new(fam.endpoint(), 80);
            let backend = SocketAddr::new(fam.backend(), 8080);
            let (isn, sisn) = (0x1122_3344u32, 0xfff0_0000u32);
            let to_node = (CONSUMER_MAC, h.c0_mac);
            let from_backend = (BACKEND_MAC, h.p0_mac);
            let (to_backend, to_consumer) = ((h.p0_mac, BACKEND_MAC), (h.c0_mac, CONSUMER_MAC));

            // The SYN passes as it is (apart from the translation), and learns the NAT address.
            let syn = Seg::new(consumer, endpoint, isn)
                .syn()
                .options(&[
                    Mss(1460),
                    SelectiveAcknowledgementPermitted,
                    Noop,
                    WindowScale(7),
                ])
                .macs(to_node.0, to_node.1);
            let r = test_run(h.dp.program(), h.c0, &syn.build());
            assert_eq!(r.verdict, XDP_REDIRECT, "{fam:?}: the SYN");
            let nat = Seg::parse(&r.out).src;
            assert_eq!(
                r.out,
                syn.moved(nat, backend, to_backend).build(),
                "{fam:?}: SYN"
            );

            let header = expected_header(consumer, endpoint, &proxy, isn, nat.port());
            let l = header.len() as u32;
            let hdr = |p: &[u8]| [&header[..], p].concat();
            let c = |seq: u32| Seg::new(consumer, endpoint, seq).macs(to_node.0, to_node.1);
            let b = |ack: u32| {
                Seg::new(backend, nat, sisn.wrapping_add(1))
                    .ack(ack)
                    .macs(from_backend.0, from_backend.1)
            };
            let (s1, i1) = (sisn.wrapping_add(1), isn + 1);
            let sack = |x: u32, y: u32| Sack((x, y), [None, None, None]);
            // (what, from, input, the output's changed fields: seq, ack, options, payload)
            #[allow(clippy::type_complexity)]
            let table: Vec<(&str, From, Seg, Box<dyn Fn(Seg) -> Seg + '_>)> = vec![
                (
                    "the SYN-ACK's MSS leaves room for the header",
                    From::Backend,
                    Seg::new(backend, nat, sisn)
                        .syn()
                        .ack(i1)
                        .options(&[
                            Mss(1460),
                            SelectiveAcknowledgementPermitted,
                            Noop,
                            WindowScale(7),
                        ])
                        .macs(from_backend.0, from_backend.1),
                    Box::new(move |s| {
                        s.options(&[
                            Mss(1460 - l as u16),
                            SelectiveAcknowledgementPermitted,
                            Noop,
                            WindowScale(7),
                        ])
                    }),
                ),
                (
                    "the handshake's last ACK carries the header",
                    From::Consumer,
                    c(i1).ack(s1),
                    Box::new(move |s| s.payload(&hdr(b""))),
                ),
                (
                    "a repeated ACK carries it again, identical",
                    From::Consumer,
                    c(i1).ack(s1),
                    Box::new(move |s| s.payload(&hdr(b""))),
                ),
                (
                    "the first data goes behind the header",
                    From::Consumer,
                    c(i1).ack(s1).payload(b"hello"),
                    Box::new(move |s| s.payload(&hdr(b"hello"))),
                ),
                (
                    "an ACK short of the header's end acknowledges nothing of the consumer's",
                    From::Backend,
                    b(i1 + 10),
                    Box::new(move |s| s.ack(i1)),
                ),
                (
                    "an ACK past the header moves back by its length",
                    From::Backend,
                    b(i1 + l + 5),
                    Box::new(move |s| s.ack(i1 + 5)),
                ),
                (
                    "later data moves up by the header's length, without it",
                    From::Consumer,
                    c(i1 + 5).ack(s1).payload(b"world"),
                    Box::new(move |s| {
                        let mut s = s;
                        s.seq = i1 + 5 + l;
                        s
                    }),
                ),
                (
                    "SACK edges move back (words aligned)",
                    From::Backend,
                    b(i1 + l + 5).options(&[
                        Noop,
                        Noop,
                        Sack(
                            (i1 + l + 100, i1 + l + 200),
                            [Some((i1 + l + 300, i1 + l + 400)), None, None],
                        ),
                    ]),
                    Box::new(move |s| {
                        s.ack(i1 + 5).options(&[
                            Noop,
                            Noop,
                            Sack(
                                (i1 + 100, i1 + 200),
                                [Some((i1 + 300, i1 + 400)), None, None],
                            ),
                        ])
                    }),
                ),
                (
                    "SACK edges move back (at odd offsets)",
                    From::Backend,
                    b(i1 + l + 5).options(&[
                        Noop,
                        sack(i1 + l + 100, i1 + l + 200),
                        Noop,
                        Noop,
                        Noop,
                    ]),
                    Box::new(move |s| {
                        s.ack(i1 + 5)
                            .options(&[Noop, sack(i1 + 100, i1 + 200), Noop, Noop, Noop])
                    }),
                ),
                (
                    "timestamps are left alone",
                    From::Backend,
                    b(i1 + l + 10).options(&[Noop, Noop, Timestamp(7, 9)]),
                    Box::new(move |s| s.ack(i1 + 10)),
                ),
                (
                    "the consumer's FIN moves up",
                    From::Consumer,
                    c(i1 + 10).ack(s1).fin(),
                    Box::new(move |s| {
                        let mut s = s;
                        s.seq = i1 + 10 + l;
                        s
                    }),
                ),
            ];
            for (what, from, input, change) in table {
                let (ifindex, src, dst, macs) = match from {
                    From::Consumer => (h.c0, nat, backend, to_backend),
                    From::Backend => (h.p0, endpoint, consumer, to_consumer),
                };
                let r = test_run(h.dp.program(), ifindex, &input.build());
                assert_eq!(r.verdict, XDP_REDIRECT, "{fam:?}: {what}");
                let want = change(input.moved(src, dst, macs));
                let got = Seg::parse(&r.out);
                assert_eq!(got, want, "{fam:?}: {what} (fields)");
                assert_eq!(r.out, want.build(), "{fam:?}: {what} (bytes)");
            }
            // The header as provider software reads it.
            let parsed = Header::try_from(&header[..]).expect("ppp parses the header");
            assert_eq!(parsed.addresses, Addresses::from((consumer, endpoint)));
            let tlvs: Vec<(u8, Vec<u8>)> = parsed
                .tlvs()
                .map(|t| t.expect("tlv"))
                .map(|t| (t.kind, t.value.to_vec()))
                .collect();
            assert_eq!(tlvs[0], (0xe0, proxy.endpoint_id.as_bytes().to_vec()));
            assert_eq!(tlvs[1], (0xe1, LINK.to_be_bytes().to_vec()));
            assert_eq!(tlvs[2], (0xe2, proxy.account_id.as_bytes().to_vec()));
            assert_eq!(
                proxy_counters(h),
                [3, 1, 1],
                "{fam:?}: headers sent (one resent, one with data), acknowledged, MSS clamped"
            );
            assert_eq!(
                pending(h, fam),
                0,
                "{fam:?}: nothing pending once the header is acknowledged"
            );
            h.plane.cut_flows(&[LINK].into()).expect("cut");
            let ended = h.plane.stats_reader().expect("reader").ended_connections();
            assert_eq!(ended.len(), 1, "{fam:?}");
            assert_eq!(
                (ended[0].fwd_packets, ended[0].rev_packets),
                (6, 6),
                "{fam:?}: every packet of the logged PROXY flow counted, before and after its header"
            );
        });
    }
}

/// Timestamps in use (the backend's SYN-ACK carries one): the backend's segments are decided on
/// by their header's length, since every one carries a timestamp (RFC 7323) and a SACK block
/// fits beside it only in a header of 10 words or more. The usual 8-word header passes with its
/// options untouched, a timestamp with SACK blocks has its edges moved, and a connection on the
/// same tuple again without timestamps has its 8-word SACK segments' edges moved.
#[test]
fn with_timestamps_in_use_the_header_length_tells_where_sack_edges_may_be() {
    for fam in Fam::BOTH {
        with_harness(&format!("proxy-ts-{fam:?}"), |h| {
            // One CPU: the flow cache is per CPU, and the tuple used again below must meet the
            // copies the first connection left in it.
            privatelink_tests::pin_to_cpu0();
            let mut m = Fam::model(h);
            m.links.get_mut(&LINK).expect("link").proxy.v2 = true;
            h.apply(&m);
            let consumer = SocketAddr::new(fam.consumer(), 40100);
            let endpoint = SocketAddr::new(fam.endpoint(), 80);
            let backend = SocketAddr::new(fam.backend(), 8080);
            let (c0, p0, c0_mac, p0_mac) = (h.c0, h.p0, h.c0_mac, h.p0_mac);
            let to_consumer = (c0_mac, CONSUMER_MAC);
            let sack = |x: u32, y: u32| Sack((x, y), [None, None, None]);
            // A connection from `consumer` with initial sequence number `isn`, timestamps offered
            // by both ends or by neither, up to the backend's acknowledgement of the header.
            // Returns the NAT address and the header's length.
            let open = |h: &mut Harness, isn: u32, ts: bool| {
                let with = |o: &[etherparse::TcpOptionElement]| {
                    let mut o = o.to_vec();
                    if ts {
                        o.extend([Noop, Noop, Timestamp(1_000, 0)]);
                    }
                    o
                };
                let syn = Seg::new(consumer, endpoint, isn)
                    .syn()
                    .options(&with(&[Mss(1460), SelectiveAcknowledgementPermitted]))
                    .macs(CONSUMER_MAC, c0_mac);
                let r = test_run(h.dp.program(), c0, &syn.build());
                assert_eq!(r.verdict, XDP_REDIRECT, "{fam:?}: SYN");
                let nat = Seg::parse(&r.out).src;
                let syn_ack = Seg::new(backend, nat, 9_000)
                    .syn()
                    .ack(isn + 1)
                    .options(&with(&[Mss(1460), SelectiveAcknowledgementPermitted]))
                    .macs(BACKEND_MAC, p0_mac);
                let r = test_run(h.dp.program(), p0, &syn_ack.build());
                assert_eq!(r.verdict, XDP_REDIRECT, "{fam:?}: SYN-ACK");
                let ack = Seg::new(consumer, endpoint, isn + 1)
                    .ack(9_001)
                    .macs(CONSUMER_MAC, c0_mac);
                let r = test_run(h.dp.program(), c0, &ack.build());
                assert_eq!(r.verdict, XDP_REDIRECT, "{fam:?}: the last ACK");
                let l = Seg::parse(&r.out).payload.len() as u32;
                assert!(l > 0, "{fam:?}: the header went out");
                let acked = Seg::new(backend, nat, 9_001)
                    .ack(isn + 1 + l)
                    .macs(BACKEND_MAC, p0_mac);
                let r = test_run(h.dp.program(), p0, &acked.build());
                assert_eq!(r.verdict, XDP_REDIRECT, "{fam:?}: the header acknowledged");
                (nat, l)
            };
            // (what, the backend's options, the options the consumer must get)
            let check =
                |h: &mut Harness,
                 nat: SocketAddr,
                 i1: u32,
                 l: u32,
                 rows: &[(&str, Vec<etherparse::TcpOptionElement>, Vec<_>)]| {
                    for (what, sent, want) in rows {
                        let input = Seg::new(backend, nat, 9_001)
                            .ack(i1 + l + 5)
                            .options(sent)
                            .payload(b"pong")
                            .macs(BACKEND_MAC, p0_mac);
                        let r = test_run(h.dp.program(), p0, &input.build());
                        assert_eq!(r.verdict, XDP_REDIRECT, "{fam:?}: {what}");
                        let want = input
                            .moved(endpoint, consumer, to_consumer)
                            .ack(i1 + 5)
                            .options(want);
                        assert_eq!(Seg::parse(&r.out), want, "{fam:?}: {what} (fields)");
                        assert_eq!(r.out, want.build(), "{fam:?}: {what} (bytes)");
                    }
                };

            let i1 = 70_001;
            let (nat, l) = open(h, i1 - 1, true);
            let ts = [Noop, Noop, Timestamp(2_000, 1_000)];
            check(
                h,
                nat,
                i1,
                l,
                &[
                    (
                        "two NOPs and a timestamp, 8 words",
                        ts.to_vec(),
                        ts.to_vec(),
                    ),
                    (
                        "a timestamp and a SACK block, 11 words",
                        [&ts[..], &[Noop, Noop, sack(i1 + l + 100, i1 + l + 200)]].concat(),
                        [&ts[..], &[Noop, Noop, sack(i1 + 100, i1 + 200)]].concat(),
                    ),
                    (
                        "a timestamp and two SACK blocks, 13 words",
                        [
                            &ts[..],
                            &[
                                Noop,
                                Noop,
                                Sack(
                                    (i1 + l + 100, i1 + l + 200),
                                    [Some((i1 + l + 300, i1 + l + 400)), None, None],
                                ),
                            ],
                        ]
                        .concat(),
                        [
                            &ts[..],
                            &[
                                Noop,
                                Noop,
                                Sack(
                                    (i1 + 100, i1 + 200),
                                    [Some((i1 + 300, i1 + 400)), None, None],
                                ),
                            ],
                        ]
                        .concat(),
                    ),
                    // What this trusts: a backend that drops the timestamp it agreed to (against
                    // RFC 7323) and sends a SACK block in 8 words gets its edges passed as they are.
                    (
                        "a SACK block without the agreed timestamp, 8 words (against RFC 7323)",
                        vec![Noop, Noop, sack(i1 + l + 100, i1 + l + 200)],
                        vec![Noop, Noop, sack(i1 + l + 100, i1 + l + 200)],
                    ),
                ],
            );

            // The consumer's data, twice: the second is answered from the flow cache.
            for n in 0..2 {
                let data = Seg::new(consumer, endpoint, i1 + 4 * n)
                    .ack(9_001)
                    .payload(b"ping")
                    .macs(CONSUMER_MAC, c0_mac);
                let r = test_run(h.dp.program(), c0, &data.build());
                assert_eq!(r.verdict, XDP_REDIRECT, "{fam:?}: the consumer's data");
                assert_eq!(Seg::parse(&r.out).seq, i1 + 4 * n + l, "{fam:?}: moved up");
            }

            // The same tuple again, without timestamps: the SYN-ACK settles it anew, and the
            // first connection's copies in the flow cache answer for nothing of the second (its
            // last ACK carries the header, its SACK edges move).
            let i1 = 80_001;
            let (nat2, l2) = open(h, i1 - 1, false);
            assert_eq!((nat2, l2), (nat, l), "{fam:?}: the same flow, opened again");
            check(
                h,
                nat,
                i1,
                l,
                &[(
                    "a SACK block in 8 words, no timestamps in use",
                    vec![Noop, Noop, sack(i1 + l + 100, i1 + l + 200)],
                    vec![Noop, Noop, sack(i1 + 100, i1 + 200)],
                )],
            );
        });
    }
}

/// Turning PROXY off applies to new connections: one in its handshake still gets its header, a
/// new one gets none (and no MSS clamp). UDP flows of a PROXY service never carry a header. A
/// PROXY flow whose pending state is gone (taken over from another node) has its header taken as
/// delivered: its numbers move, nothing is inserted.
#[test]
fn proxy_changes_apply_to_new_connections_udp_never_carries_it_and_lost_state_means_delivered() {
    for fam in Fam::BOTH {
        with_harness(&format!("proxy-life-{fam:?}"), |h| {
            let mut m = Fam::model(h);
            m.links.get_mut(&LINK).expect("link").proxy.v2 = true;
            h.apply(&m);
            let endpoint = SocketAddr::new(fam.endpoint(), 80);
            let backend = SocketAddr::new(fam.backend(), 8080);
            let (c0, p0, c0_mac, p0_mac) = (h.c0, h.p0, h.c0_mac, h.p0_mac);
            // SYN and SYN-ACK of a connection from `port`; returns its NAT address and the MSS
            // the consumer was told.
            let handshake = |h: &mut Harness, port: u16| {
                let consumer = SocketAddr::new(fam.consumer(), port);
                let syn = Seg::new(consumer, endpoint, 100)
                    .syn()
                    .macs(CONSUMER_MAC, c0_mac);
                let r = test_run(h.dp.program(), c0, &syn.build());
                assert_eq!(r.verdict, XDP_REDIRECT);
                let nat = Seg::parse(&r.out).src;
                let syn_ack = Seg::new(backend, nat, 900)
                    .syn()
                    .ack(101)
                    .options(&[Mss(1400)])
                    .macs(BACKEND_MAC, p0_mac);
                let r = test_run(h.dp.program(), p0, &syn_ack.build());
                assert_eq!(r.verdict, XDP_REDIRECT);
                (nat, Seg::parse(&r.out).options)
            };
            let last_ack = |h: &mut Harness, port: u16, seq: u32, data: &[u8]| {
                let consumer = SocketAddr::new(fam.consumer(), port);
                let ack = Seg::new(consumer, endpoint, seq)
                    .ack(901)
                    .payload(data)
                    .macs(CONSUMER_MAC, c0_mac);
                let r = test_run(h.dp.program(), c0, &ack.build());
                assert_eq!(r.verdict, XDP_REDIRECT);
                Seg::parse(&r.out)
            };
            let (_, told) = handshake(h, 50_001);
            assert_ne!(told, vec![Mss(1400)], "{fam:?}: clamped while on");
            m.links.get_mut(&LINK).expect("link").proxy.v2 = false;
            h.apply(&m);
            let out = last_ack(h, 50_001, 101, b"");
            assert!(
                Header::try_from(&out.payload[..]).is_ok(),
                "{fam:?}: the connection opened with PROXY on still gets its header"
            );
            let (_, told) = handshake(h, 50_002);
            assert_eq!(told, vec![Mss(1400)], "{fam:?}: no clamp once off");
            let out = last_ack(h, 50_002, 101, b"");
            assert!(out.payload.is_empty(), "{fam:?}: no header once off");

            // On again: a UDP datagram passes as it came (translated only).
            m.links.get_mut(&LINK).expect("link").proxy.v2 = true;
            h.apply(&m);
            let udp = fam
                .udp((fam.consumer(), 5000), (fam.endpoint(), 53))
                .macs(CONSUMER_MAC, c0_mac);
            let r = test_run(h.dp.program(), c0, &udp.build());
            assert_eq!(r.verdict, XDP_REDIRECT);
            let (nat, nport) = privatelink_tests::family::source_of(&r.out);
            let want = udp.translated(
                (nat, nport),
                (fam.backend(), 5353),
                (h.p0_mac, BACKEND_MAC),
                63,
            );
            assert_eq!(r.out, want.build(), "{fam:?}: UDP carries no header");

            // A pending PROXY flow whose pending state is gone.
            handshake(h, 50_003);
            let forget_pending = |port: u16| match fam {
                Fam::V4 => {
                    let std::net::IpAddr::V4(s) = fam.consumer() else {
                        unreachable!()
                    };
                    let std::net::IpAddr::V4(d) = fam.endpoint() else {
                        unreachable!()
                    };
                    let k = c::FlowKey4::new(
                        privatelink_tests::fixture::CONSUMER_NET,
                        u32::from_ne_bytes(s.octets()),
                        u32::from_ne_bytes(d.octets()),
                        port.to_be(),
                        80u16.to_be(),
                        c::PROTO_TCP,
                    );
                    let mut map = aya::maps::HashMap::<_, c::FlowKey4, c::ProxyPending>::try_from(
                        aya::maps::Map::HashMap(h.kernel_map("PROXY_PENDING4")),
                    )
                    .expect("map");
                    map.remove(&k).expect("the pending entry");
                }
                Fam::V6 => {
                    let std::net::IpAddr::V6(s) = fam.consumer() else {
                        unreachable!()
                    };
                    let std::net::IpAddr::V6(d) = fam.endpoint() else {
                        unreachable!()
                    };
                    let w = |a: std::net::Ipv6Addr| {
                        let o = a.octets();
                        [0, 1, 2, 3].map(|i| {
                            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
                        })
                    };
                    let k = c::FlowKey6::new(
                        privatelink_tests::fixture::CONSUMER_NET,
                        w(s),
                        w(d),
                        port.to_be(),
                        80u16.to_be(),
                        c::PROTO_TCP,
                    );
                    let mut map = aya::maps::HashMap::<_, c::FlowKey6, c::ProxyPending>::try_from(
                        aya::maps::Map::HashMap(h.kernel_map("PROXY_PENDING6")),
                    )
                    .expect("map");
                    map.remove(&k).expect("the pending entry");
                }
            };
            forget_pending(50_003);
            let out = last_ack(h, 50_003, 101, b"data");
            assert_eq!(out.payload, b"data", "{fam:?}: nothing inserted");
            assert!(
                out.seq > 101,
                "{fam:?}: the sequence number moved past the header"
            );
        });
    }
}

/// Real PROXY protocol software behind endpoints of the real agent, in two consumer networks with
/// the same CIDR: nginx (`listen ... proxy_protocol`), HAProxy (`accept-proxy`, which checks the
/// CRC32C) and MariaDB (`proxy_protocol_networks`, a server that speaks first). Each backend must
/// see the consumer's own address and (nginx and HAProxy, through the endpoint and account TLVs
/// and the UNIQUE_ID) the right endpoint and account;
/// then 50 MB each way under 5 % loss both ways and reordering on the provider side, with no reset
/// before the connections close.
///
/// This kernel has no `sch_netem` ("Specified qdisc kind is unknown"), so `tc netem` cannot be
/// used: the loss comes from nftables (`numgen random`), the reordering from an HTB class that a
/// random 5 % of the provider's packets are sent through at 20 Mbit/s (a classic BPF `tc`
/// filter), so they arrive behind packets sent after them.
pub(crate) mod real {
    use std::{
        net::{IpAddr, Ipv4Addr},
        path::Path,
        process::Stdio,
    };

    use privatelink_agent::testkit::demo::CLIENT;
    use privatelink_tests::{
        privileged, proxy_tool,
        tcpwatch::{self, ENDS, Watch},
        world::{Proc, World, api, node_get, sample},
    };
    use serde_json::json;

    use crate::acceptance::{
        Kind, blob, eventually, mariadb_query, mariadb_server, offer, run, server, succeeds,
    };

    const NGINX: Kind = Kind {
        name: "web",
        service_type: "clb",
        protocol: "tcp",
        backend: Ipv4Addr::new(198, 18, 100, 21),
        service_port: 8081,
        terminal_port: 80,
        endpoint: Ipv4Addr::new(198, 18, 0, 111),
    };
    const HAPROXY: Kind = Kind {
        name: "api",
        service_type: "custom",
        protocol: "tcp",
        backend: Ipv4Addr::new(198, 18, 100, 22),
        service_port: 8082,
        terminal_port: 8082,
        endpoint: Ipv4Addr::new(198, 18, 0, 112),
    };
    const MARIADB: Kind = Kind {
        name: "db",
        service_type: "mysql",
        protocol: "tcp",
        backend: Ipv4Addr::new(198, 18, 100, 23),
        service_port: 3306,
        terminal_port: 13306,
        endpoint: Ipv4Addr::new(198, 18, 0, 113),
    };
    /// HAProxy in TCP mode in front of a socat that appends what it receives to a file.
    const SINK: Kind = Kind {
        name: "sink",
        service_type: "custom",
        protocol: "tcp",
        backend: Ipv4Addr::new(198, 18, 100, 22),
        service_port: 8083,
        terminal_port: 9000,
        endpoint: Ipv4Addr::new(198, 18, 0, 114),
    };
    const BIG: usize = 50 << 20;

    /// nginx in the provider namespace: one server on `listen` (address:port and flags), access
    /// lines in `log_format` to nginx-access.log, `server` the rest of the server block.
    pub(crate) fn nginx(w: &World, listen: &str, log_format: &str, server_block: &str) -> Proc {
        let d = w.dir.display();
        let conf = format!(
            "user root; worker_processes 1; daemon off; pid {d}/nginx.pid;
             error_log {d}/nginx-error.log info;
             events {{ worker_connections 64; }}
             http {{
               access_log off; client_body_temp_path {d}/nginx-body;
               log_format peer '{log_format}';
               server {{
                 listen {listen};
                 access_log {d}/nginx-access.log peer;
                 {server_block}
               }}
             }}"
        );
        std::fs::write(w.dir.join("nginx.conf"), conf).unwrap();
        let c = w.dir.join("nginx.conf");
        let nginx = proxy_tool("nginx");
        server(
            w,
            &w.dir.join("nginx.out"),
            nginx.to_str().unwrap(),
            &["-p", &d.to_string(), "-c", c.to_str().unwrap()],
        )
    }

    fn haproxy(w: &World) -> Proc {
        let conf = format!(
            "global
               log stdout format raw local0 info
             defaults
               log global
               timeout connect 5s
               timeout client 120s
               timeout server 120s
             frontend api
               mode http
               bind {b}:{api} accept-proxy
               log-format \"api %ci:%cp %[fc_pp_unique_id] %[fc_pp_tlv(0xE0)] %[fc_pp_tlv(0xE2)]\"
               http-request return status 200 content-type text/plain lf-string \"%[fc_pp_unique_id] %[fc_pp_tlv(0xE0)] %[fc_pp_tlv(0xE2)]\"
             frontend sink
               mode tcp
               bind {b}:{sink} accept-proxy
               log-format \"sink %ci:%cp %[fc_pp_unique_id] %U\"
               default_backend sink
             backend sink
               mode tcp
               server s 127.0.0.1:9001\n",
            b = HAPROXY.backend,
            api = HAPROXY.service_port,
            sink = SINK.service_port
        );
        let c = w.dir.join("haproxy.cfg");
        std::fs::write(&c, conf).unwrap();
        let haproxy = proxy_tool("haproxy");
        server(
            w,
            &w.dir.join("haproxy.log"),
            haproxy.to_str().unwrap(),
            &["-db", "-f", c.to_str().unwrap()],
        )
    }

    /// The classic BPF program of the reordering filter: a random number below 5 % of 2³² picks
    /// class 1:20 (0x10020), anything else 1:10 (0x10010). `ld rand; jge #k; ret; ret`.
    const REORDER: &str = "4,32 0 0 4294963256,53 0 1 214748365,6 0 0 65552,6 0 0 65568";

    /// A TCP counter of the namespace's `nstat` (absolute, all of it since the namespace began).
    fn tcp_counter(ns: &privatelink_agent::testkit::netns::Netns, name: &str) -> u64 {
        let out = run(ns, "nstat", &["-asz", "--json", name], None);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nstat's JSON");
        v["kernel"][name].as_u64().unwrap_or(0)
    }

    fn sha256(ns: &privatelink_agent::testkit::netns::Netns, file: &Path) -> String {
        let out = run(ns, "sha256sum", &[file.to_str().unwrap()], None);
        String::from_utf8(out.stdout).unwrap()[..64].to_string()
    }

    #[test]
    fn nginx_haproxy_and_mariadb_read_who_is_calling_and_50_mb_survive_loss() {
        if !privileged("nginx_haproxy_and_mariadb_read_who_is_calling_and_50_mb_survive_loss") {
            return;
        }
        let (mut w, _agent) = privatelink_tests::world::world_with("proxy-real", "");
        let provider = &w.topo.provider;
        for a in [NGINX.backend, HAPROXY.backend, MARIADB.backend] {
            provider
                .ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])
                .unwrap();
        }
        let www = w.dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        let big = blob(50, BIG);
        std::fs::write(www.join("big"), &big).unwrap();
        let _nginx = nginx(
            &w,
            &format!("{}:{} proxy_protocol", NGINX.backend, NGINX.service_port),
            "$proxy_protocol_addr $proxy_protocol_port $remote_addr $request_uri $status \
             $proxy_protocol_tlv_0xe0 $proxy_protocol_tlv_0xe2",
            &format!(
                "root {}; location = / {{ default_type text/plain; \
                 return 200 \"$proxy_protocol_addr $proxy_protocol_port \
                 $proxy_protocol_tlv_0xe0 $proxy_protocol_tlv_0xe2\\n\"; }}",
                www.display()
            ),
        );
        let _haproxy = haproxy(&w);
        // Both servers up, asked from the provider side (curl sends a v1 header, which both take).
        for (what, url, log) in [
            (
                "nginx",
                format!("http://{}:{}/", NGINX.backend, NGINX.service_port),
                "nginx-error.log",
            ),
            (
                "HAProxy",
                format!("http://{}:{}/", HAPROXY.backend, HAPROXY.service_port),
                "haproxy.log",
            ),
        ] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !succeeds(
                provider,
                "curl",
                &[
                    "-sf",
                    "--haproxy-protocol",
                    "--max-time",
                    "2",
                    "-o",
                    "/dev/null",
                    &url,
                ],
            ) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what} does not answer:\n{}",
                    std::fs::read_to_string(w.dir.join(log)).unwrap_or_default()
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let sink_file = w.dir.join("sink.bin");
        let _sink = server(
            &w,
            &w.dir.join("socat.log"),
            "socat",
            &[
                "-u",
                "TCP-LISTEN:9001,bind=127.0.0.1,reuseaddr,fork",
                &format!("OPEN:{},creat,append", sink_file.display()),
            ],
        );
        // Health checks come from the node's provider-side address with a LOCAL header: MariaDB
        // takes headers from there too.
        let _db = mariadb_server(
            &w,
            &MARIADB,
            &["--proxy-protocol-networks=198.19.128.0/20,198.18.100.0/24"],
        );
        let mut endpoints = std::collections::BTreeMap::new();
        for k in [&NGINX, &HAPROXY, &MARIADB, &SINK] {
            let eps = offer(
                &w,
                k,
                &[k.backend.to_string()],
                &mut endpoints,
                json!({ "ip": k.endpoint.to_string() }),
            );
            let svc = eps[0]["service_id"].as_str().unwrap();
            let (status, v) = api(
                &w.topo,
                &w.tokens[0],
                "PATCH",
                &format!("/v1/services/{svc}"),
                Some(json!({ "proxy_protocol": "v2" })),
            );
            assert_eq!(status, 200, "turning PROXY protocol on: {v}");
            assert_eq!(v["proxy_protocol"], "v2");
        }
        w.eps = endpoints.values().cloned().collect();

        for c in 0..2 {
            let ns = &w.topo.consumers[c];
            let account = format!("100000000{}", c + 1);
            // nginx: the consumer's own address, not the NAT address.
            let url = format!("http://{}/", NGINX.endpoint);
            eventually(&format!("nginx through consumer {c}"), &w, || {
                succeeds(
                    ns,
                    "curl",
                    &["-sf", "--max-time", "2", "-o", "/dev/null", &url],
                )
            });
            let out = run(ns, "curl", &["-sf", "--max-time", "10", &url], None);
            let body = String::from_utf8(out.stdout).unwrap();
            let f: Vec<&str> = body.split_whitespace().collect();
            assert_eq!(f.len(), 4, "nginx: address, port and two TLVs in {body:?}");
            assert_eq!(
                f[0].parse::<IpAddr>().unwrap(),
                IpAddr::V4(CLIENT),
                "nginx saw {body}"
            );
            // The endpoint (TLV 0xE0) and the consumer account (0xE2) of this consumer.
            assert_eq!(
                [f[2], f[3]],
                [endpoints[&(c, NGINX.name)].as_str(), account.as_str()],
                "consumer {c}: nginx's $proxy_protocol_tlv_0xe0/0xe2"
            );
            // HAProxy: the UNIQUE_ID names this consumer's endpoint and account.
            let url = format!("http://{}:{}/", HAPROXY.endpoint, HAPROXY.terminal_port);
            eventually(&format!("HAProxy through consumer {c}"), &w, || {
                succeeds(
                    ns,
                    "curl",
                    &["-sf", "--max-time", "2", "-o", "/dev/null", &url],
                )
            });
            let out = run(ns, "curl", &["-sf", "--max-time", "10", &url], None);
            let body = String::from_utf8(out.stdout).unwrap();
            let ep = &endpoints[&(c, HAPROXY.name)];
            let f: Vec<&str> = body.split_whitespace().collect();
            assert!(
                f.len() == 3
                    && f[0].starts_with(&format!("{ep}/{account}/"))
                    && f[0].len() == ep.len() + account.len() + 18,
                "consumer {c}: HAProxy read the unique id in {body:?}"
            );
            assert_eq!(
                [f[1], f[2]],
                [ep.as_str(), account.as_str()],
                "consumer {c}: HAProxy's fc_pp_tlv(0xE0)/fc_pp_tlv(0xE2)"
            );
            // MariaDB speaks first: the header arrived with the handshake's last ACK.
            let user = mariadb_query(ns, &MARIADB, "SELECT USER()");
            assert_eq!(
                user.trim(),
                format!("app@{CLIENT}"),
                "consumer {c}: MariaDB's USER()"
            );
        }
        // The backends' own logs. Both write a request's line once its response has gone, so
        // curl may return first: wait until a line names each consumer, then check them all.
        let nat: ipnet::Ipv4Net = privatelink_agent::testkit::demo::NAT_RANGE.parse().unwrap();
        let who: Vec<[String; 2]> = (0..2)
            .map(|c| {
                [
                    endpoints[&(c, NGINX.name)].clone(),
                    format!("100000000{}", c + 1),
                ]
            })
            .collect();
        let read_access = || std::fs::read_to_string(w.dir.join("nginx-access.log")).unwrap();
        eventually("nginx has logged both consumers' requests", &w, || {
            let access = read_access();
            who.iter().all(|[ep, account]| {
                access
                    .lines()
                    .any(|l| l.ends_with(&format!(" {ep} {account}")))
            })
        });
        let access = read_access();
        // (The readiness probe's own line comes from the provider side, not through the node.)
        let through: Vec<Vec<&str>> = access
            .lines()
            .map(|l| l.split(' ').collect::<Vec<&str>>())
            .filter(|f| f.len() > 3 && f[2].parse::<Ipv4Addr>().is_ok_and(|a| nat.contains(&a)))
            .collect();
        assert!(
            through.len() >= 2,
            "nginx logged no request through the node:\n{access}"
        );
        // Every line through the node names one consumer by its endpoint and account (the two
        // consumers have the same address), and each consumer has its lines.
        for f in &through {
            assert_eq!(
                f[0],
                CLIENT.to_string(),
                "nginx: $proxy_protocol_addr in {f:?}"
            );
            assert!(
                f.len() == 7 && who.iter().any(|w| w[0] == f[5] && w[1] == f[6]),
                "nginx: a consumer's endpoint and account in {f:?}"
            );
        }
        for w in &who {
            assert!(
                through.iter().any(|f| f[5] == w[0] && f[6] == w[1]),
                "nginx logged nothing from {w:?}:\n{access}"
            );
        }
        let read_hlog = || std::fs::read_to_string(w.dir.join("haproxy.log")).unwrap();
        let logged = |hlog: &str, c: usize| {
            let ep = &endpoints[&(c, HAPROXY.name)];
            let account = format!("100000000{}", c + 1);
            let want = format!("api {CLIENT}:");
            hlog.lines().any(|l| {
                l.starts_with(&want)
                    && l.contains(&format!(" {ep}/{account}/"))
                    && l.ends_with(&format!(" {ep} {account}"))
            })
        };
        eventually("HAProxy has logged both consumers' requests", &w, || {
            let hlog = read_hlog();
            (0..2).all(|c| logged(&hlog, c))
        });
        let hlog = read_hlog();
        for c in 0..2 {
            assert!(
                logged(&hlog, c),
                "HAProxy's log has consumer {c}'s endpoint and account (unique id and TLVs):\n{hlog}"
            );
        }

        // 5 % of TCP segments lost each way on the provider side, then 50 MB down and 50 MB up.
        provider
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .and_then(|mut ch| {
                use std::io::Write as _;
                ch.stdin.take().unwrap().write_all(
                    b"table inet lossy {
                        chain out { type filter hook output priority 0; meta l4proto tcp numgen random mod 100 < 5 drop; }
                        chain in { type filter hook input priority 0; meta l4proto tcp numgen random mod 100 < 5 drop; }
                    }",
                )?;
                ch.wait()
            })
            .map(|s| assert!(s.success(), "nft loss rules"))
            .unwrap();
        // And reordering on the provider's way out: a classic BPF filter sends a random 5 % of
        // packets into an HTB class of 20 Mbit/s, whose queue holds each back behind packets that
        // follow it through the 10 Gbit/s class.
        for args in [
            "qdisc add dev eth0 root handle 1: htb default 10",
            "class add dev eth0 parent 1: classid 1:10 htb rate 10gbit burst 256k quantum 1514",
            "class add dev eth0 parent 1: classid 1:20 htb rate 20mbit quantum 1514",
        ] {
            run(provider, "tc", &args.split(' ').collect::<Vec<_>>(), None);
        }
        run(
            provider,
            "tc",
            &[
                "filter", "add", "dev", "eth0", "parent", "1:", "prio", "1", "bpf", "bytecode",
                REORDER,
            ],
            None,
        );
        let reorders = || tcp_counter(provider, "TcpExtTCPSACKReorder");
        let reorders_before = reorders();
        let ns = &w.topo.consumers[0];
        // How the two transfers' connections end, seen by the consumer.
        let ends = Watch::start(
            ns,
            &w.dir,
            "transfer-ends",
            &format!(
                "({ENDS}) and (host {} or host {})",
                NGINX.endpoint, SINK.endpoint
            ),
        );
        let down = w.dir.join("down.bin");
        run(
            ns,
            "curl",
            &[
                "-sf",
                "--max-time",
                "55",
                "-o",
                down.to_str().unwrap(),
                &format!("http://{}/big", NGINX.endpoint),
            ],
            None,
        );
        let up = www.join("big");
        run(
            ns,
            "socat",
            &[
                "-u",
                &format!("OPEN:{}", up.display()),
                &format!("TCP:{}:{}", SINK.endpoint, SINK.terminal_port),
            ],
            None,
        );
        eventually("the sink has 50 MB", &w, || {
            std::fs::metadata(&sink_file).is_ok_and(|m| m.len() as usize >= BIG)
        });
        let want = sha256(provider, &www.join("big"));
        assert_eq!(
            sha256(ns, &down),
            want,
            "50 MB down, through PROXY, under loss"
        );
        assert_eq!(
            sha256(provider, &sink_file),
            want,
            "50 MB up, through PROXY, under loss"
        );
        // The slow class carried packets, and the backends' TCP saw segments arrive out of order
        // (a hole filled by a segment that was not retransmitted).
        let classes = String::from_utf8(
            run(
                provider,
                "tc",
                &["-s", "class", "show", "dev", "eth0"],
                None,
            )
            .stdout,
        )
        .unwrap();
        let slow = classes
            .split("class htb ")
            .find(|c| c.starts_with("1:20 "))
            .and_then(|c| c.split(" bytes ").nth(1))
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        assert!(
            slow > 1_000,
            "the reordering class sent {slow} packets:\n{classes}"
        );
        let reorders_after = reorders();
        eprintln!(
            "reordering: {slow} packets through the slow class; TCPSACKReorder {reorders_before} → {reorders_after}"
        );
        assert!(
            reorders_after > reorders_before,
            "the provider's TCP detected no reordering ({reorders_before} before, {reorders_after} after)"
        );
        let metrics = node_get(&w.topo, "http://127.0.0.1:9464/metrics").expect("scrape");
        // Every connection's header was acknowledged (2 consumers × 3 services, the transfers,
        // the readiness probes' connections through the node).
        let acked = sample(
            &metrics,
            "privatelink_proxy_headers_acknowledged_total",
            &[],
        );
        let sent = sample(&metrics, "privatelink_proxy_headers_sent_total", &[]);
        assert!(
            acked.is_some_and(|a| a >= 8.0) && sent >= acked,
            "PROXY counters: sent {sent:?}, acknowledged {acked:?}"
        );
        // No reset broke either transfer: a reset before both ends' FINs fails. Under this much
        // reordering a segment held back can reach an end after the close; the end in TIME_WAIT
        // acknowledges it and the other, closed, answers with a reset: TCP, after the fact.
        eventually("both transfers' connections closed", &w, || {
            tcpwatch::ends(&ends.lines()).closed >= 2
        });
        let e = tcpwatch::ends(&ends.lines());
        assert!(
            e.before_close.is_empty(),
            "a reset crossed the endpoint before a transfer's connection closed:\n{}",
            e.before_close.join("\n")
        );
        for k in [&NGINX, &SINK] {
            let ep = endpoints[&(0, k.name)].as_str();
            let resets = sample(
                &metrics,
                "privatelink_link_tcp_resets_total",
                &[("endpoint_id", ep)],
            );
            eprintln!("{}: {resets:?} resets counted", k.name);
        }
        eprintln!(
            "resets after both FINs (late segments answered): {}",
            e.after_close.len()
        );
        assert!(
            std::fs::read_to_string(w.dir.join("haproxy.log"))
                .unwrap()
                .lines()
                .any(|l| l.starts_with("sink ") && l.ends_with(&format!(" {BIG}"))),
            "HAProxy logged the upload's bytes"
        );
    }
}
