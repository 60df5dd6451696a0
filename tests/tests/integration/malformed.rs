//! Malformed IP headers, as one table over both families: the frame, the interface it arrives
//! on, and the verdict and the one outcome it must be counted under. A router drops an IPv4
//! header whose checksum does not verify; so does the datapath, before any flow is looked up or
//! created: none of these frames leaves a conntrack entry or a new connection behind.
use std::net::Ipv4Addr;

use privatelink_agent::testkit::demo::ENDPOINT6;
use privatelink_common as c;
use privatelink_tests::{
    fixture::{CONSUMER, CONSUMER_MAC, ENDPOINT, Harness, LINK, NOT_ENDPOINT, Pkt, with_harness},
    fixture6::{CONSUMER6, Pkt6},
    test_run,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Byte offsets in an untagged frame: the IPv4 version/IHL byte and header checksum, the IPv6
/// version byte.
const V4_VIHL: usize = 14;
const V4_CHECK: usize = 24;
const V6_VERSION: usize = 14;

/// A NAT address of the fixtures' provider network (198.19.128.0/20).
const NAT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 7);

struct Case {
    what: &'static str,
    /// The frame and the interface index it arrives on.
    frame: fn(&Harness) -> (Vec<u8>, u32),
    verdict: u32,
    outcome: u32,
}

fn corrupt(mut f: Vec<u8>, at: usize, xor: u8) -> Vec<u8> {
    f[at] ^= xor;
    f
}

const CASES: &[Case] = &[
    Case {
        what: "IPv4 SYN to an endpoint, header checksum wrong",
        frame: |h| (corrupt(h.consumer_syn(41000).build(), V4_CHECK, 0x5a), h.c0),
        verdict: XDP_DROP,
        outcome: c::DROP_BAD_CHECKSUM,
    },
    Case {
        what: "IPv4 UDP to an endpoint, header checksum wrong",
        frame: |h| {
            let f = Pkt::udp(CONSUMER, 41001, ENDPOINT, 53)
                .macs(CONSUMER_MAC, h.c0_mac)
                .build();
            (corrupt(f, V4_CHECK + 1, 0x01), h.c0)
        },
        verdict: XDP_DROP,
        outcome: c::DROP_BAD_CHECKSUM,
    },
    Case {
        what: "IPv4 SYN with options, an option byte changed under its checksum",
        frame: |h| {
            let f = h.consumer_syn(41002).options(&[1, 1, 1, 0]).build();
            (corrupt(f, 14 + 20, 0x02), h.c0)
        },
        verdict: XDP_DROP,
        outcome: c::DROP_BAD_CHECKSUM,
    },
    Case {
        what: "IPv4 to a NAT address on the provider side, header checksum wrong",
        frame: |h| {
            let f = Pkt::tcp(
                privatelink_tests::fixture::BACKEND,
                8080,
                NAT_ADDR,
                41003,
                true,
                true,
            )
            .macs(privatelink_tests::fixture::BACKEND_MAC, h.p0_mac)
            .build();
            (corrupt(f, V4_CHECK, 0x80), h.p0)
        },
        verdict: XDP_DROP,
        outcome: c::DROP_BAD_CHECKSUM,
    },
    Case {
        what: "IPv4 not addressed to us, header checksum wrong: the kernel's business",
        frame: |h| {
            let f = Pkt::syn(CONSUMER, 41004, NOT_ENDPOINT, 80)
                .macs(CONSUMER_MAC, h.c0_mac)
                .build();
            (corrupt(f, V4_CHECK, 0x5a), h.c0)
        },
        verdict: XDP_PASS,
        outcome: c::PASS_NOT_ENDPOINT,
    },
    Case {
        what: "IPv4 EtherType, version 6 in the header",
        frame: |h| {
            let f = h.consumer_syn(41005).build();
            (corrupt(f, V4_VIHL, 0x40 ^ 0x60), h.c0)
        },
        verdict: XDP_DROP,
        outcome: c::DROP_BAD_VERSION,
    },
    Case {
        what: "IPv6 EtherType, version 4 in the header",
        frame: |h| {
            let f = Pkt6::syn(CONSUMER6, 41006, ENDPOINT6, 80)
                .macs(CONSUMER_MAC, h.c0_mac)
                .build();
            (corrupt(f, V6_VERSION, 0x60 ^ 0x40), h.c0)
        },
        verdict: XDP_DROP,
        outcome: c::DROP_BAD_VERSION,
    },
];

#[test]
fn malformed_ip_headers_are_dropped_with_their_reason_and_create_nothing() {
    with_harness("malformed_ip_headers", |h| {
        let mut m = h.model();
        m.links.get_mut(&LINK).expect("link").ip6 = Some(ENDPOINT6);
        h.apply(&m);
        for case in CASES {
            let (frame, ifindex) = (case.frame)(h);
            let before = h.outcomes();
            let r = test_run(h.dp.program(), ifindex, &frame);
            let after = h.outcomes();
            assert_eq!(r.verdict, case.verdict, "{}", case.what);
            let mut want = before.clone();
            want[case.outcome as usize] += 1;
            assert_eq!(
                after,
                want,
                "{}: counted once, under {}",
                case.what,
                c::OUTCOME_NAMES[case.outcome as usize]
            );
            if case.verdict == XDP_PASS {
                assert_eq!(r.out, frame, "{}: passed untouched", case.what);
            }
        }
        assert!(h.plane.flows().is_empty(), "no IPv4 conntrack entry");
        assert!(h.plane.flows6().is_empty(), "no IPv6 conntrack entry");
        assert_eq!(h.link_stats(LINK).new_conns, 0, "no new connection");
        // A well-formed SYN with options still opens its flow (the options are summed right).
        let ok = h.consumer_syn(41100).options(&[1, 1, 1, 0]);
        assert_eq!(h.run(h.c0, &ok).verdict, 4, "the valid frame is redirected");
    });
}
