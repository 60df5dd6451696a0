//! The NAT port allocator under occupancy: a NAT address's port range pre-filled to a share of
//! live flows, then 100,000 new flows, each removed again after it is counted so the share holds.
//! Every allocation must succeed while a port is free, up to 95 % (the target is ≥ 99.99 %).
use std::net::Ipv4Addr;

use aya::maps::HashMap;
use privatelink_agent::datapath::{loader::Sizes, scan::monotonic_ns};
use privatelink_common::{self as c, CT_ESTABLISHED, DIR_REPLY, Flow4, FlowKey4, PROTO_TCP};
use privatelink_tests::{
    fixture::{
        BACKEND, CONSUMER, CONSUMER_MAC, CONSUMER_NET, ENDPOINT, PROVIDER_NET, Pkt,
        with_harness_sized,
    },
    parse_checked, privileged,
};

const XDP_REDIRECT: u32 = 4;
const NAT: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 7);
const PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;
const ALLOCATIONS: u32 = 100_000;

/// The reply key of a flow from the backend's service port to `NAT`:`port`.
fn reply_key(port: u16) -> FlowKey4 {
    FlowKey4::new(
        PROVIDER_NET,
        u32::from(BACKEND).to_be(),
        u32::from(NAT).to_be(),
        8080u16.to_be(),
        port.to_be(),
        PROTO_TCP,
    )
}

/// A small deterministic generator (the fixture must not depend on the run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

#[test]
fn nat_allocation_succeeds_while_ports_are_free() {
    if !privileged("nat_allocation_occupancy") {
        return;
    }
    let sizes = Sizes {
        conntrack: 262_144,
        ..Sizes::small()
    };
    with_harness_sized(sizes, |h| {
        let mut m = h.model();
        let range = m.nat.get_mut(&PROVIDER_NET).unwrap();
        range.addrs = "198.19.128.7/32".parse().unwrap();
        range.ports = PORTS;
        h.apply(&m);
        let mut ct: HashMap<_, FlowKey4, Flow4> =
            HashMap::try_from(aya::maps::Map::HashMap(h.kernel_map(c::names::CT4))).expect("CT4");
        let span = u32::from(PORTS.end() - PORTS.start()) + 1;
        let mut rng = Lcg(0x5eed);
        // (share of the range in use, most failures allowed in ALLOCATIONS).
        let table: [(u32, u32); 4] = [(50, 0), (90, 0), (95, 10), (99, 10_000)];
        let mut filled: Vec<u16> = Vec::new();
        let mut report = Vec::new();
        for (percent, allowed) in table {
            // Fill up to the share with live established flows of other consumers (refreshed
            // before each level, so none expires during the run).
            let want = (span as u64 * percent as u64 / 100) as usize;
            let mut ports: Vec<u16> = PORTS.collect();
            for i in (1..ports.len()).rev() {
                ports.swap(i, rng.next() as usize % (i + 1));
            }
            for &p in &filled {
                ct.remove(&reply_key(p)).expect("emptying");
            }
            filled = ports[..want].to_vec();
            let mut in_use = vec![false; 65_536];
            for &p in &filled {
                in_use[usize::from(p)] = true;
            }
            let now = monotonic_ns();
            for &p in &filled {
                let other = Flow4 {
                    last_seen_ns: now,
                    saddr_be: u32::from(ENDPOINT).to_be(),
                    daddr_be: u32::from(Ipv4Addr::new(198, 18, 250, 1)).to_be(),
                    sport_be: 80u16.to_be(),
                    dport_be: p.to_be(),
                    link_id: 7,
                    peer_network: 999,
                    dir: DIR_REPLY,
                    tcp_state: CT_ESTABLISHED,
                    ..Default::default()
                };
                ct.insert(reply_key(p), other, 0).expect("pre-filling");
            }
            let before = h.outcomes()[c::DROP_NAT_EXHAUSTED as usize];
            let mut failed = 0u32;
            for _ in 0..ALLOCATIONS {
                let sport = 1024 + (rng.next() % span) as u16;
                let syn = Pkt::syn(CONSUMER, sport, ENDPOINT, 80).macs(CONSUMER_MAC, h.c0_mac);
                let r = h.run(h.c0, &syn);
                if r.verdict != XDP_REDIRECT {
                    failed += 1;
                    continue;
                }
                let out = parse_checked(&r.out);
                assert_eq!(out.src, NAT);
                assert!(
                    !in_use[usize::from(out.sport)],
                    "port {} was in use",
                    out.sport
                );
                // Both entries go again, so the share stays where it was.
                let fwd = FlowKey4::new(
                    CONSUMER_NET,
                    u32::from(CONSUMER).to_be(),
                    u32::from(ENDPOINT).to_be(),
                    sport.to_be(),
                    80u16.to_be(),
                    PROTO_TCP,
                );
                ct.remove(&fwd).expect("forward entry");
                ct.remove(&reply_key(out.sport)).expect("reply entry");
            }
            let counted = h.outcomes()[c::DROP_NAT_EXHAUSTED as usize] - before;
            assert_eq!(counted, u64::from(failed), "every failure is counted");
            report.push(format!(
                "{percent}% in use: {failed} of {ALLOCATIONS} refused ({:.4}% success)",
                100.0 * f64::from(ALLOCATIONS - failed) / f64::from(ALLOCATIONS)
            ));
            assert!(
                failed <= allowed,
                "at {percent}% occupancy {failed} of {ALLOCATIONS} allocations failed (at most {allowed} allowed)"
            );
        }
        println!("{}", report.join("\n"));
    });
}
