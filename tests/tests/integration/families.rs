//! Packet fixtures as tables that run over both address families (BPF_PROG_TEST_RUN): verdict,
//! exact output bytes (checksums verified independently) and counters, with state written through
//! the agent's `Dataplane::apply`. What only one family has (IPv4 options and checksums, IPv6
//! extension headers, ICMP formats) stays in `datapath.rs` and `datapath6.rs`.
use privatelink_agent::datapath::{LinkState, Model};
use privatelink_common as c;
use privatelink_tests::{
    family::{Fam, Frame, source_of},
    fixture::{
        ACCOUNT, BACKEND_MAC, CONSUMER_MAC, CONSUMER_NET, CONSUMER_NET2, Harness, LINK, SERVICE,
        with_harness,
    },
    test_run,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// Runs `frame` on `ifindex` and asserts a drop counted as `reason` on the node and, when given,
/// on `link`.
fn dropped_on(h: &mut Harness, ifindex: u32, frame: &Frame, reason: u32, link: Option<u32>) {
    let name = c::OUTCOME_NAMES[reason as usize];
    let before = h.outcomes()[reason as usize];
    let link_before = link.map(|l| h.plane.link_drops(l).get(&reason).copied().unwrap_or(0));
    let r = test_run(h.dp.program(), ifindex, &frame.build());
    assert_eq!(r.verdict, XDP_DROP, "expected a drop ({name}) of {frame:?}");
    assert_eq!(
        h.outcomes()[reason as usize],
        before + 1,
        "node counter {name}"
    );
    if let (Some(l), Some(b)) = (link, link_before) {
        let now = h.plane.link_drops(l).get(&reason).copied().unwrap_or(0);
        assert_eq!(now, b + 1, "link {l} counter {name}");
    }
}

/// Runs `frame` on `ifindex`, asserts it was redirected, and returns the output.
fn redirected(h: &mut Harness, ifindex: u32, frame: &Frame, what: &str) -> Vec<u8> {
    let r = test_run(h.dp.program(), ifindex, &frame.build());
    assert_eq!(r.verdict, XDP_REDIRECT, "{what}: {frame:?}");
    r.out
}

/// Every family in its own harness (a fresh datapath), `f` given the family.
fn each_family(test: &str, f: impl Fn(&mut Harness, Fam) + Send + Sync) {
    for fam in Fam::BOTH {
        with_harness(&format!("{test}-{fam:?}"), |h| f(h, fam));
    }
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Tcp,
    Udp,
}

/// A new flow of each protocol: (protocol, consumer port, terminal port, service port).
const NEW_FLOWS: [(Proto, u16, u16, u16); 2] =
    [(Proto::Tcp, 40000, 80, 8080), (Proto::Udp, 5000, 53, 5353)];

#[test]
fn new_flows_are_translated_both_ways_with_counters() {
    each_family("fam-new", |h, fam| {
        h.apply(&Fam::model(h));
        let (mut fwd_bytes, mut rev_bytes) = (0, 0);
        for (proto, sport, port, service_port) in NEW_FLOWS {
            let (consumer, endpoint) = ((fam.consumer(), sport), (fam.endpoint(), port));
            let first = match proto {
                Proto::Tcp => fam.tcp(consumer, endpoint, true, false),
                Proto::Udp => fam.udp(consumer, endpoint),
            }
            .macs(CONSUMER_MAC, h.c0_mac);
            let c0 = h.c0;
            let out = redirected(h, c0, &first, "to the endpoint");
            let (nat, nport) = source_of(&out);
            assert!(
                fam.nat_range().contains(&nat),
                "{proto:?}: source {nat} not in the NAT range"
            );
            assert_eq!(
                nport, sport,
                "{proto:?}: the consumer's port is kept when free"
            );
            let backend = (fam.backend(), service_port);
            let want = first.translated((nat, nport), backend, (h.p0_mac, BACKEND_MAC), 63);
            assert_eq!(out, want.build(), "{proto:?}: forward bytes");

            let reply = match proto {
                Proto::Tcp => fam.tcp(backend, (nat, nport), true, true),
                Proto::Udp => fam.udp(backend, (nat, nport)),
            }
            .macs(BACKEND_MAC, h.p0_mac);
            let p0 = h.p0;
            let back = redirected(h, p0, &reply, "the reply to the consumer");
            let want = reply.translated(endpoint, consumer, (h.c0_mac, CONSUMER_MAC), 63);
            assert_eq!(back, want.build(), "{proto:?}: reply bytes");
            source_of(&back);
            if let Proto::Tcp = proto {
                assert_eq!(
                    fam.tcp_states(h),
                    [c::CT_SYN_RECV; 2],
                    "a forward and a reply entry, half-open until the consumer acknowledges"
                );
            }
            fwd_bytes += first.build().len() as u64;
            rev_bytes += reply.build().len() as u64;
        }
        let s = h.link_stats(LINK);
        assert_eq!((s.fwd_packets, s.rev_packets, s.new_conns), (2, 2, 2));
        assert_eq!((s.fwd_bytes, s.rev_bytes), (fwd_bytes, rev_bytes));
        assert_eq!(h.outcomes()[c::FWD_REDIRECT as usize], 4);
        let other = match fam {
            Fam::V4 => h.plane.flows6().len(),
            Fam::V6 => h.plane.flows().len(),
        };
        assert_eq!(other, 0, "nothing in the other family's conntrack");
    });
}

/// Link state and allowlist, each refusing a new flow with its own reason: (what, change, reason).
#[allow(clippy::type_complexity)]
const GATES: [(&str, fn(&mut Model), u32); 3] = [
    (
        "pending",
        |m| m.links.get_mut(&LINK).expect("link").state = LinkState::Pending,
        c::DROP_LINK_PENDING,
    ),
    (
        "rejected",
        |m| m.links.get_mut(&LINK).expect("link").state = LinkState::Rejected,
        c::DROP_LINK_REJECTED,
    ),
    (
        "not allowlisted",
        |m| {
            m.links.get_mut(&LINK).expect("link").state = LinkState::Available;
            m.allowlist.clear();
        },
        c::DROP_NOT_ALLOWLISTED,
    ),
];

#[test]
fn link_state_allowlist_and_groups_gate_new_flows_and_rejection_cuts_them() {
    each_family("fam-gates", |h, fam| {
        let mut m = Fam::model(h);
        let c0 = h.c0;
        for (i, (what, change, reason)) in GATES.into_iter().enumerate() {
            change(&mut m);
            h.apply(&m);
            let syn = fam.consumer_tcp(h, 41000 + i as u16, true, false);
            dropped_on(h, c0, &syn, reason, Some(LINK));
            assert!(
                fam.tcp_states(h).is_empty(),
                "{what}: no state for a refused flow"
            );
        }
        m.allowlist.insert((SERVICE, ACCOUNT));
        h.apply(&m);
        // A segment of no flow that is not a SYN opens nothing.
        let stray = fam.consumer_tcp(h, 41010, false, true);
        dropped_on(h, c0, &stray, c::DROP_TCP_NOT_SYN, Some(LINK));
        let out = redirected(
            h,
            c0,
            &fam.consumer_tcp(h, 41011, true, false),
            "an allowed SYN",
        );
        let nat = source_of(&out);
        assert_eq!(h.link_stats(LINK).new_conns, 1);

        // Groups bound with no rule: the established flow keeps going, new ones drop.
        m.links.get_mut(&LINK).expect("link").rules = Some(Vec::new().into());
        h.apply(&m);
        let ack = fam.consumer_tcp(h, 41011, false, true);
        let out = redirected(h, c0, &ack, "the established flow skips policy");
        assert_eq!(source_of(&out), nat, "on its NAT address and port");
        let syn = fam.consumer_tcp(h, 41012, true, false);
        dropped_on(h, c0, &syn, c::DROP_SECURITY_GROUP, Some(LINK));

        // Rejecting the link cuts the live flow: both entries go at once.
        m.links.get_mut(&LINK).expect("link").state = LinkState::Rejected;
        let report = h.plane.apply(&m).expect("apply");
        assert_eq!(report.flows_cut, 2, "both entries of the flow");
        assert!(fam.tcp_states(h).is_empty());
        dropped_on(h, c0, &ack, c::DROP_LINK_REJECTED, Some(LINK));
        let reply = fam
            .tcp((fam.backend(), 8080), nat, false, true)
            .macs(BACKEND_MAC, h.p0_mac);
        let p0 = h.p0;
        dropped_on(h, p0, &reply, c::DROP_NO_FLOW, None);
    });
}

/// Frames on c1, where only VLAN 10 is a registered network: (tag, passed untouched).
const TAGS: [(Option<u16>, bool); 3] = [(Some(10), false), (None, true), (Some(11), true)];

#[test]
fn a_vlan_tag_selects_the_network_and_comes_back_on_replies() {
    each_family("fam-vlan", |h, fam| {
        let mut m = Fam::model(h);
        // VLAN 10 on c1 carries network 1 (a trunk), as untagged c0 does.
        m.ifaces[1].vlan_id = 10;
        m.ifaces[1].network_id = CONSUMER_NET;
        h.apply(&m);
        let c1 = h.c1;
        for (i, (tag, passed)) in TAGS.into_iter().enumerate() {
            let consumer = (fam.consumer(), 40600 + i as u16);
            let syn = fam
                .tcp(consumer, (fam.endpoint(), 80), true, false)
                .macs(CONSUMER_MAC, h.c1_mac)
                .vlan(tag);
            if passed {
                let before = h.outcomes()[c::PASS_UNKNOWN_IFACE as usize];
                let r = test_run(h.dp.program(), c1, &syn.build());
                assert_eq!((r.verdict, &r.out), (XDP_PASS, &syn.build()), "tag {tag:?}");
                assert_eq!(h.outcomes()[c::PASS_UNKNOWN_IFACE as usize], before + 1);
                continue;
            }
            let out = redirected(h, c1, &syn, "a tagged SYN");
            let nat = source_of(&out);
            let backend = (fam.backend(), 8080);
            let want = syn
                .translated(nat, backend, (h.p0_mac, BACKEND_MAC), 63)
                .vlan(None);
            assert_eq!(out, want.build(), "the tag is popped towards the provider");
            let synack = fam
                .tcp(backend, nat, true, true)
                .macs(BACKEND_MAC, h.p0_mac);
            let p0 = h.p0;
            let back = redirected(h, p0, &synack, "the SYN-ACK");
            let endpoint = (fam.endpoint(), 80);
            let want = synack.translated(endpoint, consumer, (h.c1_mac, CONSUMER_MAC), 63);
            assert_eq!(
                back,
                want.vlan(tag).build(),
                "the tag is pushed back towards the consumer"
            );
        }
    });
}

#[test]
fn without_a_neighbour_the_translated_packet_goes_to_the_kernel() {
    each_family("fam-noneigh", |h, fam| {
        let mut m = Fam::model(h);
        let service = m.services.get_mut(&SERVICE).expect("service");
        service.backends = Fam::BOTH.iter().map(|f| f.unresolved_backend()).collect();
        h.apply(&m);
        let syn = fam.consumer_tcp(h, 43000, true, false);
        let r = test_run(h.dp.program(), h.c0, &syn.build());
        assert_eq!(r.verdict, XDP_PASS, "the kernel resolves the neighbour");
        let nat = source_of(&r.out);
        // TTL (hop limit) untouched and MACs as received: the kernel's forwarding does both.
        let to = (fam.unresolved_backend(), 8080);
        let macs = (CONSUMER_MAC, h.c0_mac);
        assert_eq!(r.out, syn.translated(nat, to, macs, 64).build());
        assert_eq!(h.outcomes()[c::PASS_NO_NEIGH as usize], 1);
        assert_eq!(h.link_stats(LINK).fwd_packets, 1);
    });
}

#[test]
fn overlapping_consumers_collide_on_nat_and_retry() {
    each_family("fam-collide", |h, fam| {
        let mut m = Fam::model(h);
        // One NAT address: the same consumer tuple from two networks must get two ports.
        let only = fam.single_nat(&mut m);
        let mut other = m.links[&LINK].clone();
        other.network_id = CONSUMER_NET2;
        m.links.insert(2, other);
        h.apply(&m);
        let consumer = (fam.consumer(), 40800);
        let mut got = Vec::new();
        for (ifindex, mac) in [(h.c0, h.c0_mac), (h.c1, h.c1_mac)] {
            let syn = fam
                .tcp(consumer, (fam.endpoint(), 80), true, false)
                .macs(CONSUMER_MAC, mac);
            let out = redirected(h, ifindex, &syn, "the same tuple from each network");
            got.push((source_of(&out), mac));
        }
        assert_eq!((got[0].0, got[1].0.0), ((only, 40800), only));
        assert_ne!(
            got[1].0.1, 40800,
            "the second flow had to retry for a free port"
        );
        // Each reply goes back to its own network's interface, exactly.
        for (nat, mac) in got {
            let reply = fam
                .tcp((fam.backend(), 8080), nat, true, true)
                .macs(BACKEND_MAC, h.p0_mac);
            let p0 = h.p0;
            let back = redirected(h, p0, &reply, "a reply");
            let endpoint = (fam.endpoint(), 80);
            let want = reply.translated(endpoint, consumer, (mac, CONSUMER_MAC), 63);
            assert_eq!(back, want.build());
        }
        assert_eq!(h.link_stats(1).new_conns + h.link_stats(2).new_conns, 2);
    });
}

#[test]
fn a_full_conntrack_refuses_new_flows_keeps_established_ones_and_recovers() {
    use privatelink_agent::datapath::{loader::Sizes, scan::monotonic_ns};
    if !privatelink_tests::privileged("a_full_conntrack") {
        return;
    }
    for fam in Fam::BOTH {
        // 32 flows fill 64 entries (two per flow) of this family's table; the other family's
        // stays roomy. UDP flows expire after a second.
        let sizes = match fam {
            Fam::V4 => Sizes {
                conntrack: 64,
                ..Sizes::small()
            },
            Fam::V6 => Sizes {
                conntrack6: 64,
                ..Sizes::small()
            },
        };
        privatelink_tests::fixture::with_harness_sized(sizes, |h| {
            let mut m = Fam::model(h);
            m.config.udp_timeout_ns = 1_000_000_000;
            h.apply(&m);
            let c0 = h.c0;
            let dgram = |h: &Harness, sport: u16| {
                fam.udp((fam.consumer(), sport), (fam.endpoint(), 53))
                    .macs(CONSUMER_MAC, h.c0_mac)
            };
            for sport in 30_000..30_032 {
                redirected(h, c0, &dgram(h, sport), "a new flow while there is room");
            }
            // Full: a new flow is refused and counted, on the node and on its link.
            dropped_on(h, c0, &dgram(h, 40_000), c::DROP_CONNTRACK_FULL, Some(LINK));
            // Established flows are not evicted: every one of them still forwards.
            for sport in [30_000, 30_015, 30_031] {
                redirected(h, c0, &dgram(h, sport), "an established flow");
            }
            // The other family has its own table.
            let other = if fam == Fam::V4 { Fam::V6 } else { Fam::V4 };
            redirected(
                h,
                c0,
                &other.consumer_tcp(h, 40_001, true, false),
                "the other family",
            );
            // Flows end (time out); sweeps free their entries, and new flows get in.
            let mut reader = h.plane.stats_reader().expect("reader");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut swept = 0;
            while swept < 64 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "swept {swept} of 64 entries"
                );
                swept += reader.scan(monotonic_ns(), &m.config).1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            assert_eq!(
                swept, 64,
                "both entries of every flow, and the other family's live on"
            );
            assert!(fam.tcp_states(h).is_empty());
            redirected(h, c0, &dgram(h, 40_000), "room again after the sweep");
        });
    }
}
