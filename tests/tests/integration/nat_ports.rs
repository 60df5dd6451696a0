//! The NAT port allocator under occupancy: a NAT address's port range pre-filled to a share of
//! live flows, then 100,000 new flows, each removed again after it is counted so the share holds.
//! Every allocation must succeed while a port is free, up to 95 % (the target is ≥ 99.99 %).
use std::net::Ipv4Addr;

use privatelink_agent::datapath::loader::Sizes;
use privatelink_common as c;
use privatelink_tests::{
    fixture::{
        CONSUMER, CONSUMER_MAC, ENDPOINT, Harness, PROVIDER_NET, Pkt, nat_reply_key,
        with_harness_sized,
    },
    parse_checked, privileged,
};

const XDP_REDIRECT: u32 = 4;
const NAT: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 7);
const PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;
const ALLOCATIONS: u32 = 100_000;

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
        let mut ct = h.ct4();
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
                ct.remove(&nat_reply_key(NAT, p)).expect("emptying");
            }
            filled = ports[..want].to_vec();
            let mut in_use = vec![false; 65_536];
            for &p in &filled {
                in_use[usize::from(p)] = true;
            }
            Harness::hold_nat_ports(&mut ct, NAT, &filled);
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
                Harness::forget_flow(&mut ct, sport, (NAT, out.sport));
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

/// Opens `n` TCP connections to `addr` and holds them until its stdin closes; prints `open` once
/// they all are. (Processes of their own: a process may hold 20,000 descriptors here.)
const HOLDER: &str = r#"
import socket, sys
addr, n = sys.argv[1], int(sys.argv[2])
host, port = addr.rsplit(":", 1)
held = []
for i in range(n):
    held.append(socket.create_connection((host, int(port)), timeout=5))
print("open", flush=True)
sys.stdin.read()
"#;

/// 60,000 concurrent connections through a single NAT address (a /32 range: 64,512 ports, 93 %
/// of them in the end), opened by two consumers in overlapping networks from the same client
/// address, so their own ports collide all the time and the allocator has to search: no SYN is
/// refused by the datapath and none is retransmitted by a client. The backend's kernel completes
/// the handshakes and holds them in its accept queue.
#[test]
fn sixty_thousand_connections_through_one_nat_address_lose_no_syn() {
    use std::{
        io::BufRead as _,
        net::{SocketAddr, TcpListener},
        os::fd::AsRawFd as _,
        process::{Command, Stdio},
    };

    use privatelink_agent::testkit::demo::{BACKEND as BACKEND_IP, ENDPOINT as EP, TCP_PORTS};
    use privatelink_tests::world::{echo_service, node_get, sample, world_with};

    if !privileged("sixty_thousand_connections_through_one_nat_address_lose_no_syn") {
        return;
    }
    // Two holders per consumer.
    const PER_HOLDER: usize = 15_000;
    let (w, _agent) = echo_service(world_with(
        "nat32",
        "[nat.{provider}]\nrange = \"198.19.128.1/32\"\nports = \"1024-65535\"\n",
    ));
    w.accept_all();
    w.update_service(serde_json::json!({ "health_check": { "enabled": false } }));
    w.topo
        .provider
        .sysctl("net.core.somaxconn", "65535")
        .unwrap();
    w.topo
        .provider
        .sysctl("net.ipv4.tcp_max_syn_backlog", "65535")
        .unwrap();
    for c in &w.topo.consumers {
        c.sysctl("net.ipv4.ip_local_port_range", "1024 65535")
            .unwrap();
    }
    let listener = w.topo.provider.enter(|| {
        let l = TcpListener::bind(SocketAddr::from((BACKEND_IP, TCP_PORTS.1))).expect("bind");
        // SAFETY: listen(2) on a socket this listener owns, to raise its backlog.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 65_535) }, 0);
        l
    });
    let retrans = |i: usize| -> u64 {
        let out = w.topo.consumers[i]
            .exec("cat", &["/proc/net/snmp"])
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
        let at = names
            .split_whitespace()
            .position(|n| n == "RetransSegs")
            .unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    };
    let refusals = || {
        let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").expect("metrics");
        ["nat_exhausted", "conntrack_full", "flow_limit"].map(|o| {
            sample(&text, "privatelink_node_packets_total", &[("outcome", o)]).unwrap_or(0.0)
        })
    };
    let before = (refusals(), retrans(0), retrans(1));
    let endpoint = format!("{EP}:{}", TCP_PORTS.0);
    let mut holders: Vec<_> = (0..4)
        .map(|h| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    w.topo.consumers[h % 2].name(),
                    "python3",
                    "-c",
                ])
                .args([HOLDER, &endpoint, &PER_HOLDER.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("python3")
        })
        .collect();
    for (h, p) in holders.iter_mut().enumerate() {
        let mut line = String::new();
        std::io::BufReader::new(p.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "open",
            "holder {h} did not open its connections"
        );
    }
    let after = (refusals(), retrans(0), retrans(1));
    assert_eq!(
        after.0, before.0,
        "no new flow refused (nat_exhausted, conntrack_full, flow_limit)"
    );
    assert_eq!(
        (after.1 - before.1, after.2 - before.2),
        (0, 0),
        "no segment retransmitted by either consumer"
    );
    // Every connection has a NAT port of its own on the one address, as the backend sees them.
    let out = w
        .topo
        .provider
        .exec(
            "ss",
            &[
                "-Htn",
                "state",
                "established",
                "sport",
                "=",
                &format!(":{}", TCP_PORTS.1),
            ],
        )
        .unwrap();
    let peers: std::collections::BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect();
    assert_eq!(
        peers.len(),
        4 * PER_HOLDER,
        "distinct NAT (address, port) pairs at the backend"
    );
    assert!(
        peers.iter().all(|p| p.starts_with("198.19.128.1:")),
        "all from the one NAT address"
    );
    for mut p in holders {
        drop(p.stdin.take());
        p.wait().unwrap();
    }
    drop(listener);
}
