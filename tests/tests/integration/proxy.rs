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
        });
    }
}
