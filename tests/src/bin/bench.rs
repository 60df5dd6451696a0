//! `cargo xtask bench`: datapath cost per packet through BPF_PROG_TEST_RUN, as ratios to a floor
//! program measured in the same run, plus map memory and a cross-check under real veth traffic.
//!
//! Method (see docs/BENCHMARKS.md): repeat > 1 would rerun the program on the buffer it already
//! rewrote and on the state it already created, so every datapath path is measured as the average
//! of many repeat-1 runs (fresh tuples for new flows), minus the per-call timer overhead measured in
//! the same run (floor repeat-1 average minus floor repeat-10M average).
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use privatelink_agent::{
    datapath::loader::{Datapath, Sizes, map_memory},
    datapath::{Action, Dataplane, Link, Rule, RuleProto},
    testkit::demo::{self, BACKEND6, ENDPOINT6, Topology},
};
use privatelink_tests::{
    benchkit::{
        FLOOR_PROGRAM, LOOKUP_FLOOR_PROGRAM, PROGRAM, SLOT_FLOOR_PROGRAM, SLOT_TABLE_ENTRIES,
    },
    fixture::{
        BACKEND, BACKEND_MAC, CONSUMER, CONSUMER_MAC, CONSUMER_NET, ENDPOINT, Harness, LINK,
        NOT_ENDPOINT, PROVIDER_NET, Pkt, nat_reply_key, with_harness_object, with_harness_sized,
    },
    fixture6::{Pkt6, parse_checked6},
    privileged, test_run, test_run_repeated,
};

/// repeat-1 samples per path.
const SAMPLES: u32 = 20_000;
const FLOOR_REPEAT: u32 = 10_000_000;

fn mean_ns(h: &mut Harness, ifindex: u32, mut pkt: impl FnMut(u32) -> Vec<u8>) -> f64 {
    let total: u128 = (0..SAMPLES)
        .map(|i| {
            test_run(h.dp.program(), ifindex, &pkt(i))
                .duration
                .as_nanos()
        })
        .sum();
    total as f64 / f64::from(SAMPLES)
}

/// Per-packet cost of the datapath, `repeat` runs on one packet received on `ifindex` (a path
/// that leaves frame and state as they were).
fn hot_ns(h: &mut Harness, ifindex: u32, pkt: &[u8], repeat: u32) -> f64 {
    test_run_repeated(h.dp.program(), ifindex, pkt, repeat).1
}

/// XDP verdicts the measured paths end in.
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// Runs of a hot (replayed) measurement, and rounds of it whose median counts.
const REPLAY_REPEAT: u32 = 1_000_000;
const REPLAY_ROUNDS: usize = 7;

/// Source of the replayed new-flow sequence: no repeat-1 row uses it (they use 198.18.1.0 up to
/// .20), and the sequence's 60k flows per configuration stay on this one address.
const REPLAY_SOURCE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 200);

/// Per-packet cost of `target` (the datapath or the floor) fed by the replay program, `repeat`
/// runs on `pkt` received on `ifindex`: every run starts from the frame's original head, and with
/// `new_flows` from a source no run had before. Hot like the floor row: nothing but the measured
/// programs runs between two runs. Panics unless the last run's verdict is `verdict`.
fn replay_ns(
    h: &mut Harness,
    target: &'static str,
    ifindex: u32,
    pkt: &[u8],
    new_flows: bool,
    repeat: u32,
    verdict: u32,
) -> f64 {
    h.bench().set_gen_frame(pkt).expect("replay frame");
    h.bench()
        .set_gen_new_flows(new_flows)
        .expect("replay sequence");
    let replay = h.replay_into(target);
    let (got, ns) = test_run_repeated(replay, ifindex, pkt, repeat);
    h.bench()
        .set_gen_new_flows(false)
        .expect("replay sequence off");
    assert_eq!(
        got, verdict,
        "replay into {target}: wrong verdict, so the wrong path was measured"
    );
    ns
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The replay's own cost per run (head rewrite, tail call), taken on the one path measurable both
/// ways: the unknown destination `anchor` (ifindex, frame), replayed minus run directly, into the
/// same program, back to back.
fn replay_cost(h: &mut Harness, anchor: (u32, &[u8])) -> f64 {
    let replayed = replay_ns(
        h,
        PROGRAM,
        anchor.0,
        anchor.1,
        false,
        REPLAY_REPEAT,
        XDP_PASS,
    );
    replayed - hot_ns(h, anchor.0, anchor.1, REPLAY_REPEAT)
}

/// Hot per-packet cost of paths that rewrite the frame but create no state, each (ifindex, frame,
/// verdict): replayed, minus the replay's cost measured in the same round. [`REPLAY_ROUNDS`]
/// interleaved rounds and the median of each, so the host's drift (seconds long here) cancels
/// instead of landing on one side of the subtraction. Also returns the median replay cost.
fn hot_paths(
    h: &mut Harness,
    anchor: (u32, &[u8]),
    paths: &[(u32, &[u8], u32)],
) -> (Vec<f64>, f64) {
    let mut per_path: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut costs = Vec::new();
    for _ in 0..REPLAY_ROUNDS {
        let cost = replay_cost(h, anchor);
        costs.push(cost);
        for (i, &(ifindex, pkt, verdict)) in paths.iter().enumerate() {
            let ns = replay_ns(h, PROGRAM, ifindex, pkt, false, REPLAY_REPEAT, verdict);
            per_path[i].push(ns - cost);
        }
    }
    (per_path.into_iter().map(median).collect(), median(costs))
}

/// The replay's own cost per run (head rewrite and tail call) as the floor sees it: replay into
/// the floor minus the floor alone, both hot on the same frame (a cross-check of the cost taken
/// on the datapath's unknown-destination path).
fn replay_overhead(h: &mut Harness, floor_hot: f64) -> f64 {
    let pkt = h.consumer_syn(1).build();
    let via: Vec<f64> = (0..REPLAY_ROUNDS)
        .map(|_| replay_ns(h, FLOOR_PROGRAM, 0, &pkt, false, REPLAY_REPEAT, XDP_TX))
        .collect();
    median(via) - floor_hot
}

/// (floor cost per packet, timer overhead per call), both in ns.
fn floor(h: &mut Harness) -> (f64, f64) {
    let pkt = h.consumer_syn(1).build();
    let r1: u128 = (0..SAMPLES)
        .map(|_| {
            let mut out = vec![0u8; pkt.len() + 64];
            let mut o = TestRunOptions::new();
            o.data_in = Some(&pkt);
            o.data_out = Some(&mut out);
            h.bench()
                .floor_program()
                .expect("floor program")
                .test_run(o)
                .expect("floor test run")
                .duration
                .as_nanos()
        })
        .sum();
    let r1 = r1 as f64 / f64::from(SAMPLES);
    let mut o = TestRunOptions::new();
    o.data_in = Some(&pkt);
    o.repeat = FLOOR_REPEAT;
    let rn = h
        .bench()
        .floor_program()
        .expect("floor program")
        .test_run(o)
        .expect("floor repeat run")
        .duration
        .as_nanos() as f64;
    (rn, r1 - rn)
}

/// Address of extra endpoint `i`: from 198.18.2.0 up, skipping the NAT block, inside 198.18.0.0/15
/// for up to 126k endpoints.
fn endpoint_addr(i: u32) -> Ipv4Addr {
    let a = u32::from(Ipv4Addr::new(198, 18, 2, 0)) + i;
    let nat = u32::from(Ipv4Addr::new(198, 19, 128, 0));
    let a = if a >= nat { a + 4096 } else { a };
    assert!(
        a <= u32::from(Ipv4Addr::new(198, 19, 255, 255)),
        "endpoint {i} outside 198.18.0.0/15"
    );
    Ipv4Addr::from(a)
}

/// `n` extra endpoints (links 2..) in the consumer network, one TCP port each; the measured
/// endpoint (link 1) is dual-stack, so the IPv6 rows run against the same state.
fn with_endpoints(h: &Harness, n: u32) -> privatelink_agent::datapath::Model {
    let mut m = h.model();
    m.links.get_mut(&LINK).expect("link").ip6 = Some(ENDPOINT6);
    for i in 0..n {
        let mut l: Link = demo::endpoint_link(CONSUMER_NET, 1000 + i);
        l.ip4 = Some(endpoint_addr(i));
        m.links.insert(2 + i, l);
        m.allowlist.insert((demo::SERVICE, 1000 + i));
    }
    m
}

fn rules(n: usize) -> Option<Vec<Rule>> {
    // n-1 rules that do not match the consumer (198.18.0.10), then an accept-all.
    rules_with(
        n,
        |i| format!("198.19.{}.{}/32", i / 256, i % 256),
        "0.0.0.0/0",
    )
}

/// The IPv6 twin of [`rules`]: `n`-1 IPv6 rules that do not match the consumer, then an
/// accept-all.
fn rules6(n: usize) -> Option<Vec<Rule>> {
    rules_with(n, |i| format!("2001:db8:1::{i:x}/128"), "::/0")
}

/// `n`-1 TCP drop rules from the sources `nonmatching` names, then an accept-all from `any`; no
/// list (no group bound) for 0.
fn rules_with(n: usize, nonmatching: impl Fn(usize) -> String, any: &str) -> Option<Vec<Rule>> {
    if n == 0 {
        return None;
    }
    let mut v: Vec<Rule> = (0..n - 1)
        .map(|i| Rule {
            proto: RuleProto::Tcp,
            ports: 80..=80,
            source: nonmatching(i).parse().expect("cidr"),
            action: Action::Drop,
        })
        .collect();
    v.push(Rule {
        proto: RuleProto::All,
        ports: 0..=65535,
        source: any.parse().expect("cidr"),
        action: Action::Accept,
    });
    Some(v)
}

/// IPv6 consumer tuple number `i` (fresh for each new flow).
fn consumer6(i: u32) -> (Ipv6Addr, u16) {
    let base = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, 0));
    (
        Ipv6Addr::from(base + u128::from(i / 50_000)),
        1024 + (i % 50_000) as u16,
    )
}

/// Consumer tuple number `i` (fresh for each new flow).
fn consumer(i: u32) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 1, 0)) + (i / 50_000)),
        1024 + (i % 50_000) as u16,
    )
}

struct Row {
    config: String,
    path: &'static str,
    ns: f64,
}

/// The row of the lookup floor (hot like the floor; no replay cost to subtract).
const HALF_OPEN_ROW: &str = "half-open forward (conntrack, not in the flow cache), hot replay";
const LOOKUP_FLOOR_ROW: &str = "floor + interface and conntrack lookups (hit), hot repeat 10M";
/// The row of the slot floor: a new flow's memory traffic in an open-addressing table.
const SLOT_FLOOR_ROW: &str =
    "floor + a new flow's two slot claims in an open-addressing table (fresh tuples), hot";

/// Map sizes of the datapath rows: room for 100k endpoints and 1M flows.
fn bench_sizes() -> Sizes {
    Sizes {
        links: 131_072,
        endpoint_ports: 262_144,
        allowlist: 131_072,
        conntrack: 2_097_152,
        conntrack6: 131_072,
        ..Sizes::small()
    }
}

/// New flows through one NAT address whose port range (1024–65535) is in use to a share, repeat
/// 1, against the floor: the single insert of the first try at low occupancy, the search at high.
/// Each flow's entries are removed after its run, so the share holds. (`PRIVATELINK_BENCH_ONLY=nat`)
fn nat_occupancy() {
    const RUNS: u32 = 5_000;
    const NAT: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 7);
    println!("## New flows by NAT port occupancy\n");
    println!(
        "One NAT address, ports 1024–65535 held by live flows to the share shown, {RUNS} repeat-1 new flows each (the first try is the consumer's own port).\n"
    );
    println!("| NAT ports in use | new flow ns | × floor | refused |");
    println!("|---:|---:|---:|---:|");
    with_harness_sized(bench_sizes(), |h| {
        let (floor_ns, overhead) = floor(h);
        let mut m = h.model();
        let range = m.nat.get_mut(&PROVIDER_NET).expect("the provider's range");
        range.addrs = "198.19.128.7/32".parse().expect("a /32");
        range.ports = 1024..=65535;
        h.plane.apply(&m).expect("apply");
        let mut ct = h.ct4();
        let all: Vec<u16> = (1024..=65535).collect();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut held: Vec<u16> = Vec::new();
        for percent in [0u64, 50, 90, 95, 99] {
            for &p in &held {
                ct.remove(&nat_reply_key(NAT, p)).expect("emptying");
            }
            let mut ports = all.clone();
            for i in (1..ports.len()).rev() {
                ports.swap(i, next() as usize % (i + 1));
            }
            held = ports[..(all.len() as u64 * percent / 100) as usize].to_vec();
            Harness::hold_nat_ports(&mut ct, NAT, &held);
            let (mut total, mut refused) = (0u128, 0u32);
            for _ in 0..RUNS {
                let sport = 1024 + (next() % 64_512) as u16;
                let syn = Pkt::syn(CONSUMER, sport, ENDPOINT, 80).macs(CONSUMER_MAC, h.c0_mac);
                let r = test_run(h.dp.program(), h.c0, &syn.build());
                total += r.duration.as_nanos();
                if r.verdict == XDP_REDIRECT {
                    let out = privatelink_tests::parse_checked(&r.out);
                    Harness::forget_flow(&mut ct, sport, (NAT, out.sport));
                } else {
                    refused += 1;
                }
            }
            let ns = total as f64 / f64::from(RUNS) - overhead;
            println!(
                "| {percent} % | {ns:.0} | {:.1} | {refused} |",
                ns / floor_ns
            );
        }
    });
    println!();
}

/// One row of an added-cost table: the path, without and with the feature, the difference and
/// the with-feature cost × the floor.
fn cost_line(path: &str, (without, with): (f64, f64), floor_ns: f64) {
    println!(
        "| {path} | {without:.1} | {with:.1} | {:+.1} | {:.2} |",
        with - without,
        with / floor_ns
    );
}

/// Rounds of [`hot_pairs`]: each a pair per direction, so a small difference is read off the
/// median of 41 paired differences rather than off two medians of 7. `PRIVATELINK_BENCH_PAIRS`
/// sets another count (the median's spread shrinks with its square root).
fn pair_rounds() -> usize {
    std::env::var("PRIVATELINK_BENCH_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(41)
}

/// Hot replayed costs of two flows' later packets, one flow without a feature and one with it,
/// each (consumer → backend frame, backend → consumer frame), measured back to back in each round
/// (the order alternating), the replay's own cost taken in the same round: per direction, the
/// medians without and with, and the median of the rounds' differences with its quartiles.
fn hot_pairs(h: &mut Harness, without: (&[u8], &[u8]), with: (&[u8], &[u8])) -> [Added; 2] {
    let (c0, p0) = (h.c0, h.p0);
    let unknown = Pkt::syn(CONSUMER, 999, NOT_ENDPOINT, 80)
        .macs(CONSUMER_MAC, h.c0_mac)
        .build();
    let dirs = [(c0, without.0, with.0), (p0, without.1, with.1)];
    let mut got: [[Vec<f64>; 3]; 2] = Default::default();
    for round in 0..pair_rounds() {
        let cost = replay_cost(h, (c0, &unknown));
        for (d, &(ifindex, a, b)) in dirs.iter().enumerate() {
            let mut one = |p: &[u8]| {
                replay_ns(h, PROGRAM, ifindex, p, false, REPLAY_REPEAT, XDP_REDIRECT) - cost
            };
            let (x, y) = if round % 2 == 0 {
                let x = one(a);
                (x, one(b))
            } else {
                let y = one(b);
                (one(a), y)
            };
            got[d][0].push(x);
            got[d][1].push(y);
            got[d][2].push(y - x);
        }
    }
    got.map(|[x, y, diff]| Added {
        without: median(x),
        with: median(y),
        added: median(diff.clone()),
        quartiles: (quartile(&diff, 1), quartile(&diff, 3)),
    })
}

/// What a feature adds to a path, from paired rounds.
struct Added {
    without: f64,
    with: f64,
    /// Median of the rounds' differences.
    added: f64,
    quartiles: (f64, f64),
}

/// Quartile `q` (0 to 4) of `v`.
fn quartile(v: &[f64], q: usize) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) * q / 4]
}

/// A table row of [`hot_pairs`]: the added cost is the median of the paired differences, with
/// their quartiles.
fn added_line(path: &str, a: &Added, floor_ns: f64) {
    println!(
        "| {path} | {:.1} | {:.1} | {:+.1} ({:+.0} to {:+.0}) | {:.2} |",
        a.without,
        a.with,
        a.added,
        a.quartiles.0,
        a.quartiles.1,
        a.with / floor_ns
    );
}

/// New flows' cost without and with a feature of the link (`set` turns it on or off in the
/// model), in `rounds` pairs of rounds of `per_round` SYNs from fresh ports, alternating which
/// goes first; the medians, timer overhead off. Every SYN must be forwarded.
fn new_flow_rounds(
    h: &mut Harness,
    m: &mut privatelink_agent::datapath::Model,
    set: impl Fn(&mut Link, bool),
    (first_port, per_round, rounds): (u32, u32, usize),
    overhead: f64,
) -> (f64, f64) {
    let mut next = first_port;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for r in 0..2 * rounds {
        let enabled = (r % 2 == 0) == (r / 2 % 2 == 0);
        set(m.links.get_mut(&LINK).expect("link"), enabled);
        h.plane.apply(m).expect("apply");
        let mut total = 0u128;
        for _ in 0..per_round {
            let syn = Pkt::syn(CONSUMER, (next % 60_000 + 1_024) as u16, ENDPOINT, 80)
                .macs(CONSUMER_MAC, h.c0_mac)
                .build();
            next += 1;
            let r = test_run(h.dp.program(), h.c0, &syn);
            assert_eq!(r.verdict, XDP_REDIRECT, "a new flow");
            total += r.duration.as_nanos();
        }
        let ns = total as f64 / f64::from(per_round) - overhead;
        if enabled { on.push(ns) } else { off.push(ns) }
    }
    (median(off), median(on))
}

/// What the connection log adds, in one harness and one run: new flows of the link with the log
/// off and on (alternating rounds, medians), and a later packet of a flow made with it off
/// against one made with it on (hot replay, as the established rows).
fn connlog_cost() {
    println!("## Connection log: added cost per packet\n");
    println!(
        "The same harness for all (10 endpoints); hot rows: added = the median of {} paired differences (quartiles in brackets). `cargo xtask bench` (or `PRIVATELINK_BENCH_ONLY=proxy target/release/bench`).\n",
        pair_rounds()
    );
    println!("| path | log off ns | log on ns | added ns | log on × floor |");
    println!("|---|---:|---:|---:|---:|");
    with_harness_sized(bench_sizes(), |h| {
        let (floor_ns, overhead) = floor(h);
        let mut m = h.model();
        h.plane.apply(&m).expect("apply");
        let (c0, c0_mac, p0_mac) = (h.c0, h.c0_mac, h.p0_mac);
        let line = |path: &str, costs: (f64, f64)| cost_line(path, costs, floor_ns);
        // An established flow from `port`; its next consumer and backend packets.
        let flow = |h: &mut Harness, port: u16| {
            let syn = Pkt::syn(CONSUMER, port, ENDPOINT, 80).macs(CONSUMER_MAC, c0_mac);
            let r = test_run(h.dp.program(), c0, &syn.build());
            assert_eq!(r.verdict, XDP_REDIRECT);
            let out = privatelink_tests::parse_checked(&r.out);
            establish(h, &r.out, (CONSUMER, port));
            let data = Pkt::tcp(CONSUMER, port, ENDPOINT, 80, false, true)
                .macs(CONSUMER_MAC, c0_mac)
                .build();
            let reply = Pkt::tcp(BACKEND, 8080, out.src, out.sport, false, true)
                .macs(BACKEND_MAC, p0_mac)
                .build();
            (data, reply)
        };
        let (plain_data, plain_reply) = flow(h, 43_000);
        m.links.get_mut(&LINK).expect("link").conn_log = true;
        h.plane.apply(&m).expect("apply");
        let (log_data, log_reply) = flow(h, 43_001);
        let hot = hot_pairs(h, (&plain_data, &plain_reply), (&log_data, &log_reply));
        added_line(
            "later packet, consumer → backend (counted), hot replay",
            &hot[0],
            floor_ns,
        );
        added_line(
            "later packet, backend → consumer (counted), hot replay",
            &hot[1],
            floor_ns,
        );
        // New flows, the log switched between rounds, below the counter table's size. The ring
        // fills at about 11,900 records with nobody draining it here: past that, records are
        // lost and counted, which is the cost a full ring has.
        let log = new_flow_rounds(
            h,
            &mut m,
            |l, on| l.conn_log = on,
            (44_000, 3_000, 9),
            overhead,
        );
        line("new flow (record into the ring, counters inserted)", log);
        let written_lost = h.plane.stats_reader().expect("reader").conn_log();
        println!(
            "\nFloor: {floor_ns:.1} ns. Records written {}, lost to the full ring {}.\n",
            written_lost[0], written_lost[1]
        );
    });
}

/// What the flow sync's events add to a new flow, in one harness and one run: new flows with the
/// datapath's events off and on (alternating rounds, medians; the ring, undrained here, holds
/// every event of the "on" rounds). An established flow's packets take no new code: the event is
/// written only when a flow is made or its TCP state changes.
fn flowsync_cost() {
    println!("## Flow sync: added cost per new flow\n");
    println!(
        "The same harness for both (10 endpoints). `cargo xtask bench` (or `PRIVATELINK_BENCH_ONLY=flowsync target/release/bench`, alone, or `=failover`, before the crashes).\n"
    );
    println!("| path | sync off ns | sync on ns | added ns | sync on × floor |");
    println!("|---|---:|---:|---:|---:|");
    with_harness_sized(bench_sizes(), |h| {
        let (floor_ns, overhead) = floor(h);
        let mut m = h.model();
        h.plane.apply(&m).expect("apply");
        let mut sync = h.plane.take_flow_sync().expect("the flow sync's maps");
        let switch = std::cell::RefCell::new(&mut sync);
        let costs = new_flow_rounds(
            h,
            &mut m,
            |_, on| switch.borrow_mut().switch(on).expect("switch"),
            (20_000, 1_000, 27),
            overhead,
        );
        cost_line("new flow (an event into the ring)", costs, floor_ns);
        let (events, lost) = (sync.drain().len(), sync.lost());
        println!(
            "\nFloor: {floor_ns:.1} ns. Events in the ring {events}, lost {lost}; added {:.0}% to a new flow (target ≤ 10%).\n",
            (costs.1 - costs.0) / costs.0 * 100.0
        );
    });
}

/// The new-flow rate the flow sync keeps up with: new flows made by the datapath (TEST_RUN, fresh
/// tuples, paced per millisecond) at rising rates, 2 s each; a sender thread wakes on the ring's
/// descriptor and does what the agent's group task does (drain, read both entries, encode, seal,
/// UDP), a receiver thread does what a peer does (verify, decode, `ha::install` into a second
/// datapath's conntrack). All on this machine's cores at once, as two nodes' agents would not be.
fn flowsync_throughput() {
    use privatelink_agent::node::{
        channel::{Kind, Message, Verifier, seal},
        flowsync,
        ha::{HaShared, install},
    };
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    };
    const KEY: &[u8] = b"a-group-key-of-more-than-thirty-two-characters";
    println!("## Flow sync: the new-flow rate it keeps up with\n");
    println!(
        "Each rate for 2 s; lag = flows made but not yet installed on the peer, over the rate. `cargo xtask bench` (or `PRIVATELINK_BENCH_ONLY=flowsync target/release/bench`).\n"
    );
    println!(
        "| asked flows/s | made flows/s | longest lag ms | caught up after ms | events lost | updates sent | updates received | flows installed |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    with_harness_sized(bench_sizes(), |h| {
        let m = h.model();
        h.plane.apply(&m).expect("apply");
        let mut sync = h.plane.take_flow_sync().expect("the flow sync's maps");
        sync.switch(true).expect("switch");
        let tables = h.plane.flow_tables().expect("tables");
        // The peer: a datapath of its own in the same namespace, the same model.
        let mut peer_dp = Datapath::load(&bench_sizes()).expect("the peer's datapath");
        let mut peer = Dataplane::new(&mut peer_dp.ebpf).expect("the peer's maps");
        peer.apply(&m).expect("apply on the peer");
        let mut peer_tables = peer.flow_tables().expect("the peer's tables");
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("receiver");
        rx.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("sender");
        // As the agent's channel has them.
        privatelink_agent::node::ha::widen_buffers(&rx);
        privatelink_agent::node::ha::widen_buffers(&tx);
        let (to, from) = (rx.local_addr().unwrap(), tx.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        // Events a full ring lost, as the sender last read the count.
        let lost = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(HaShared::default());
        let model = Arc::new(m.clone());
        std::thread::scope(|s| {
            // The active node's side.
            let sender = {
                let (stop, sent, lost) = (stop.clone(), sent.clone(), lost.clone());
                let sync = &mut sync;
                let tables = &tables;
                s.spawn(move || {
                    use std::os::fd::{AsFd as _, AsRawFd as _};
                    let mut seq = 0u64;
                    while !stop.load(Relaxed) {
                        // SAFETY: the ring's descriptor stays open while `sync` lives, which is
                        // past this loop.
                        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sync.as_raw_fd()) };
                        let mut fds = [nix::poll::PollFd::new(
                            fd.as_fd(),
                            nix::poll::PollFlags::POLLIN,
                        )];
                        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10u16));
                        let keys = sync.drain();
                        lost.store(sync.lost(), Relaxed);
                        if keys.is_empty() {
                            continue;
                        }
                        let updates = flowsync::updates_for(tables, &keys);
                        for payload in flowsync::encode(&updates) {
                            seq += 1;
                            let msg = seal(
                                KEY,
                                &Message {
                                    kind: Kind::Flows,
                                    group: "bench".into(),
                                    node: "node-a".into(),
                                    sent_at_ms: privatelink_agent::control::clock::unix_ms(),
                                    seq,
                                    payload,
                                },
                            );
                            let _ = tx.send_to(&msg, to);
                        }
                        sent.fetch_add(updates.len() as u64, Relaxed);
                    }
                })
            };
            // The peer's side.
            let receiver = {
                let (stop, shared, model) = (stop.clone(), shared.clone(), model.clone());
                let received = received.clone();
                let rx = &rx;
                let peer_tables = &mut peer_tables;
                s.spawn(move || {
                    let mut v = Verifier::new(KEY, "bench", "node-b", &[from], 10_000);
                    let mut buf = vec![0u8; 2048];
                    while !stop.load(Relaxed) {
                        let Ok((n, addr)) = rx.recv_from(&mut buf) else {
                            continue;
                        };
                        let Ok(m) = v.accept(
                            addr,
                            &buf[..n],
                            privatelink_agent::control::clock::unix_ms(),
                        ) else {
                            continue;
                        };
                        if let Some(updates) = flowsync::decode(&m.payload) {
                            received.fetch_add(updates.len() as u64, Relaxed);
                            install(&model, updates, &shared, peer_tables);
                        }
                    }
                })
            };
            let installed = || shared.flows_installed.load(Relaxed) / 2;
            let mut made = 0u64;
            for rate in [10_000u64, 25_000, 50_000, 100_000, 200_000] {
                let (lost0, sent0, inst0) = (lost.load(Relaxed), sent.load(Relaxed), installed());
                let received0 = received.load(Relaxed);
                let start = Instant::now();
                let (mut this, mut worst_lag) = (0u64, 0.0f64);
                while start.elapsed() < Duration::from_secs(2) {
                    let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                    while this < due {
                        // A fresh tuple: 60,000 ports per consumer address.
                        let (addr, port) = (made / 60_000, (made % 60_000 + 1_024) as u16);
                        let src = Ipv4Addr::from(u32::from(CONSUMER) + addr as u32);
                        let syn = Pkt::syn(src, port, ENDPOINT, 80)
                            .macs(CONSUMER_MAC, h.c0_mac)
                            .build();
                        let r = test_run(h.dp.program(), h.c0, &syn);
                        assert_eq!(r.verdict, XDP_REDIRECT, "a new flow");
                        made += 1;
                        this += 1;
                        if this % 1_000 == 0 {
                            break;
                        }
                    }
                    let behind = this.saturating_sub(installed() - inst0);
                    worst_lag = worst_lag.max(behind as f64 / rate as f64 * 1e3);
                    std::thread::sleep(Duration::from_micros(200));
                }
                let elapsed = start.elapsed().as_secs_f64();
                let end = Instant::now();
                let lost = lost.load(Relaxed) - lost0;
                // Caught up: every flow made is on the peer (never, if the ring lost events or the
                // peer's socket lost datagrams: the agent's periodic table reads send those).
                let caught = loop {
                    if installed() - inst0 >= this {
                        break Some(end.elapsed());
                    }
                    if end.elapsed() > Duration::from_secs(5) {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                let (sent, got) = (
                    sent.load(Relaxed) - sent0,
                    received.load(Relaxed) - received0,
                );
                println!(
                    "| {rate} | {:.0} | {worst_lag:.0} | {} | {lost} | {sent} | {got} | {} |",
                    this as f64 / elapsed,
                    caught.map_or("never".into(), |c| format!("{}", c.as_millis())),
                    installed() - inst0,
                );
            }
            stop.store(true, Relaxed);
            sender.join().expect("sender");
            receiver.join().expect("receiver");
        });
        // Beyond: a reader that does not keep up at all. 40,000 new flows with nobody reading
        // the ring: it keeps what it holds, the rest is counted as lost.
        let lost0 = sync.lost();
        let _ = sync.drain();
        for i in 0..40_000u32 {
            let src = Ipv4Addr::from(u32::from(CONSUMER) + 1_000 + i / 60_000);
            let syn = Pkt::syn(src, (i % 60_000 + 1_024) as u16, ENDPOINT, 80)
                .macs(CONSUMER_MAC, h.c0_mac)
                .build();
            assert_eq!(test_run(h.dp.program(), h.c0, &syn).verdict, XDP_REDIRECT);
        }
        let (kept, lost) = (sync.drain().len(), sync.lost() - lost0);
        println!(
            "\nA ring nobody reads, 40,000 new flows: {kept} events kept, {lost} lost and counted."
        );
        let refused: u64 = shared.refused().values().sum();
        println!(
            "\nRefused by the peer's checks: {refused}. Memory is bounded: the ring holds 1 MiB (32,768 IPv4 events; beyond it events are lost and counted, `privatelink_ha_flow_events_lost_total`, and the agent's table read every 200 ms sends those flows), the channel's sockets {} MiB each (a datagram the peer's socket cannot take is lost: updates received < sent; the agent's full copy every 3 s sends those flows).\n",
            privatelink_agent::node::ha::CHANNEL_BUFFER >> 20
        );
    });
}

/// What PROXY protocol v2 adds per packet, in one harness and one run: flows of a link with the
/// header off (made before it was turned on) against flows of the same link with it on, each
/// measured over `SAMPLES` repeat-1 runs, timer overhead off, × the floor measured alongside.
fn proxy_cost() {
    use etherparse::TcpOptionElement;
    use privatelink_tests::tcpseg::Seg;
    println!("## PROXY protocol v2: added cost per packet\n");
    println!(
        "{SAMPLES} repeat-1 runs per row, the same harness for all (10 endpoints); a flow made before the service turned PROXY on against one made after; hot rows: added = the median of {} paired differences (quartiles in brackets). `cargo xtask bench` (or `PRIVATELINK_BENCH_ONLY=proxy target/release/bench`).\n",
        pair_rounds()
    );
    println!("| path | without ns | with PROXY ns | added ns | with PROXY × floor |");
    println!("|---|---:|---:|---:|---:|");
    with_harness_sized(bench_sizes(), |h| {
        let (floor_ns, overhead) = floor(h);
        let mut m = h.model();
        h.plane.apply(&m).expect("apply");
        let endpoint = SocketAddr::new(ENDPOINT.into(), 80);
        let (c0, p0, c0_mac, p0_mac) = (h.c0, h.p0, h.c0_mac, h.p0_mac);
        // A connection up to its established state: SYN, SYN-ACK, the ACK (with PROXY on, the
        // header) and, with `ack_header`, the backend's acknowledgement of it. With `ts`, both
        // ends agree on timestamps, as Linux does, and every segment carries the options Linux
        // sends then (two NOPs and a timestamp). Returns the consumer's next data segment, the
        // backend's next segment and the handshake's last ACK.
        type Frames = (Vec<u8>, Vec<u8>, Vec<u8>);
        let ts_opts = [
            TcpOptionElement::Noop,
            TcpOptionElement::Noop,
            TcpOptionElement::Timestamp(77_000, 66_000),
        ];
        let open = |h: &mut Harness, port: u16, ack_header: bool, ts: bool| -> Frames {
            let consumer = SocketAddr::new(CONSUMER.into(), port);
            let isn = 1_000u32;
            let opts: &[TcpOptionElement] = if ts { &ts_opts } else { &[] };
            let syn = Seg::new(consumer, endpoint, isn)
                .syn()
                .options(opts)
                .macs(CONSUMER_MAC, c0_mac);
            let r = test_run(h.dp.program(), c0, &syn.build());
            assert_eq!(r.verdict, XDP_REDIRECT, "SYN");
            let fwd = Seg::parse(&r.out);
            let (nat, backend) = (fwd.src, fwd.dst);
            let b = |ack: u32| {
                Seg::new(backend, nat, 5_001)
                    .ack(ack)
                    .options(opts)
                    .macs(BACKEND_MAC, p0_mac)
            };
            let mut syn_ack = b(isn + 1);
            syn_ack.seq = 5_000;
            syn_ack.syn = true;
            assert_eq!(
                test_run(h.dp.program(), p0, &syn_ack.build()).verdict,
                XDP_REDIRECT
            );
            let last_ack = Seg::new(consumer, endpoint, isn + 1)
                .ack(5_001)
                .options(opts)
                .macs(CONSUMER_MAC, c0_mac);
            let r = test_run(h.dp.program(), c0, &last_ack.build());
            assert_eq!(r.verdict, XDP_REDIRECT, "the handshake's last ACK");
            let header = Seg::parse(&r.out).payload.len() as u32;
            if ack_header {
                let r = test_run(h.dp.program(), p0, &b(isn + 1 + header).build());
                assert_eq!(r.verdict, XDP_REDIRECT, "the backend's ACK");
            }
            let data = Seg::new(consumer, endpoint, isn + 1)
                .ack(5_001)
                .options(opts)
                .payload(&[7; 64])
                .macs(CONSUMER_MAC, c0_mac);
            // The backend's segment carries a few bytes: the replay restores the first
            // `GEN_HEAD` bytes of a frame, so the frame must be at least that long.
            let reply = b(isn + 1 + header).payload(&[9; 8]);
            (data.build(), reply.build(), last_ack.build())
        };
        // Rounds alternate which of the pair goes first; the medians count (a row measured
        // right after another runs warmer).
        const ROUNDS: usize = 9;
        let pair = |h: &mut Harness, ifindex: u32, a: &[u8], b: &[u8]| {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            for r in 0..ROUNDS {
                let mut one = |p: &[u8]| mean_ns(h, ifindex, |_| p.to_vec()) - overhead;
                if r % 2 == 0 {
                    x.push(one(a));
                    y.push(one(b));
                } else {
                    y.push(one(b));
                    x.push(one(a));
                }
            }
            (median(x), median(y))
        };
        let (plain_data, plain_reply, plain_ack) = open(h, 41_000, true, false);
        let (plain_ts_data, plain_ts_reply, _) = open(h, 41_004, true, true);
        // A second flow without PROXY: the same pairing against the first shows what the method
        // reads where nothing differs.
        let (other_data, other_reply, _) = open(h, 41_003, true, false);
        m.links.get_mut(&LINK).expect("link").proxy.v2 = true;
        h.plane.apply(&m).expect("apply");
        let (proxy_data, proxy_reply, _) = open(h, 41_001, true, false);
        let (proxy_ts_data, proxy_ts_reply, _) = open(h, 41_005, true, true);
        let (_, _, pending_ack) = open(h, 41_002, false, false);
        let line = |path: &str, costs: (f64, f64)| cost_line(path, costs, floor_ns);
        line(
            "later packet, consumer → backend (sequence number moved)",
            pair(h, c0, &plain_data, &proxy_data),
        );
        line(
            "later packet, backend → consumer (acknowledgement moved)",
            pair(h, p0, &plain_reply, &proxy_reply),
        );
        // The same later packets hot: each replayed 1M times per round (the replay restores the
        // frame first; its own cost, taken in the same round, comes off), rounds interleaved.
        let hot = hot_pairs(h, (&plain_data, &plain_reply), (&proxy_data, &proxy_reply));
        added_line(
            "later packet, consumer → backend, hot replay",
            &hot[0],
            floor_ns,
        );
        added_line(
            "later packet, backend → consumer, hot replay",
            &hot[1],
            floor_ns,
        );
        // Flows that agreed on timestamps: every segment has options, where a SACK option may
        // be (the PROXY path tells by the header's length that two NOPs and a timestamp leave no
        // room for one).
        let hot_ts = hot_pairs(
            h,
            (&plain_ts_data, &plain_ts_reply),
            (&proxy_ts_data, &proxy_ts_reply),
        );
        added_line(
            "later packet with timestamps, consumer → backend, hot replay",
            &hot_ts[0],
            floor_ns,
        );
        added_line(
            "later packet with timestamps, backend → consumer, hot replay",
            &hot_ts[1],
            floor_ns,
        );
        let control = hot_pairs(h, (&plain_data, &plain_reply), (&other_data, &other_reply));
        added_line(
            "control: a later packet of another flow without PROXY, consumer → backend",
            &control[0],
            floor_ns,
        );
        added_line(
            "control: a later packet of another flow without PROXY, backend → consumer",
            &control[1],
            floor_ns,
        );
        // The pending flow's ACK gets the header every time (the backend never acknowledges it).
        line(
            "the packet that carries the header (built, CRC32C, inserted)",
            pair(h, c0, &plain_ack, &pending_ack),
        );
        // New flows, the link switched between rounds, few enough that the pending table
        // (PROXY_PENDING_ENTRIES) never fills (a full one refuses early, which would look cheap).
        let new = new_flow_rounds(
            h,
            &mut m,
            |l, on| l.proxy.v2 = on,
            (42_000, 4_000, ROUNDS),
            overhead,
        );
        line("new flow (SYN: the stream start recorded)", new);
        println!("\nFloor: {floor_ns:.1} ns.\n");
    });
}

/// Hot replayed runs of a profile (`PRIVATELINK_BENCH_PROFILE`): a few seconds each.
const PROFILE_ESTABLISHED_RUNS: u32 = 50_000_000;
const PROFILE_NEW_FLOW_RUNS: u32 = 900_000;

/// Answers the forwarded SYN `fwd` with the backend's SYN-ACK, so the flow is established (as
/// the flows the established rows stand for are; a half-open one is not served from the flow
/// cache).
fn establish(h: &mut Harness, fwd: &[u8], (src, port): (Ipv4Addr, u16)) {
    let out = privatelink_tests::parse_checked(fwd);
    let syn_ack = Pkt::tcp(BACKEND, 8080, out.src, out.sport, true, true)
        .macs(BACKEND_MAC, h.p0_mac)
        .build();
    let r = test_run(h.dp.program(), h.p0, &syn_ack);
    assert_eq!(r.verdict, XDP_REDIRECT, "the SYN-ACK");
    let ack = Pkt::tcp(src, port, ENDPOINT, 80, false, true)
        .macs(CONSUMER_MAC, h.c0_mac)
        .build();
    let r = test_run(h.dp.program(), h.c0, &ack);
    assert_eq!(
        r.verdict, XDP_REDIRECT,
        "the consumer's ACK completes the handshake"
    );
}

/// `PRIVATELINK_BENCH_PROFILE=established`, `half-open` (a flow whose SYN was never answered: not
/// served from the flow cache) or `new-flow`: one long hot run of that IPv4 path at
/// 10 endpoints and nothing else, for a sampling profiler to split between the program and the
/// kernel functions it calls (docs/BENCHMARKS.md has the `perf` commands).
fn profile(path: &str) {
    with_harness_sized(bench_sizes(), |h| {
        h.bench_slots = SLOT_TABLE_ENTRIES;
        let model = with_endpoints(h, 9);
        h.plane.apply(&model).expect("apply");
        let (c0, c0_mac) = (h.c0, h.c0_mac);
        let (runs, ns) = match path {
            "established" | "half-open" => {
                let (src, port) = consumer(0);
                let syn = Pkt::syn(src, port, ENDPOINT, 80).macs(CONSUMER_MAC, c0_mac);
                let r = test_run(h.dp.program(), c0, &syn.build());
                assert_eq!(r.verdict, XDP_REDIRECT, "the SYN opens the flow");
                if path == "established" {
                    establish(h, &r.out, (src, port));
                }
                let ack = Pkt::tcp(src, port, ENDPOINT, 80, false, true)
                    .macs(CONSUMER_MAC, c0_mac)
                    .build();
                let n = PROFILE_ESTABLISHED_RUNS;
                (n, replay_ns(h, PROGRAM, c0, &ack, false, n, XDP_REDIRECT))
            }
            "new-flow" => {
                let syn = Pkt::syn(REPLAY_SOURCE, 1024, ENDPOINT, 80)
                    .macs(CONSUMER_MAC, c0_mac)
                    .build();
                let n = PROFILE_NEW_FLOW_RUNS;
                let ns = replay_ns(h, PROGRAM, c0, &syn, true, n, XDP_REDIRECT);
                assert_eq!(
                    h.link_stats(LINK).new_conns,
                    u64::from(n),
                    "every replayed SYN must open a flow"
                );
                (n, ns)
            }
            other => {
                panic!("PRIVATELINK_BENCH_PROFILE={other}: established, half-open or new-flow")
            }
        };
        println!(
            "{path}: {runs} hot replayed runs, {ns:.1} ns each, the replay's own cost included"
        );
    });
}

/// Hot paths of two builds in one run (`PRIVATELINK_BENCH_AB=<object of the other build>`): this
/// build's datapath (A) in two harnesses made before and after the other object's (B), each with
/// 10 endpoints, all three alive at once and measured in turns path by path (the order reverses
/// every round), through the same replay and against the same floor program. The host's drift
/// (seconds long, up to ±20 % here) lands on every side of a round; a harness's own offset (the
/// same object measured in two harnesses differs by up to 5 % here) is cancelled by setting B
/// against the geometric mean of the harnesses made before and after it. The table's A / B is the
/// median of the per-round ratios, with their quartiles; A / A is the two A harnesses against
/// each other, the resolution of the run.
fn ab(other: &str) {
    const ROUNDS: usize = 31;
    // Fresh flows per new-flow sample: ROUNDS of them keep each conntrack map under 60 % full.
    const NEW_FLOWS: u32 = 20_000;
    let object = std::fs::read(other).unwrap_or_else(|e| panic!("{other}: {e}"));
    let paths = [
        "floor",
        "established forward",
        "established reply",
        "new flow",
    ];
    /// One harness's frames: the established flow's two directions, and the fresh SYN.
    struct Frames {
        ack: Vec<u8>,
        reply: Vec<u8>,
        fresh: Vec<u8>,
    }
    let prepare = |h: &mut Harness| {
        let model = with_endpoints(h, 9);
        h.plane.apply(&model).expect("apply");
        let (src, port) = consumer(0);
        let syn = Pkt::syn(src, port, ENDPOINT, 80).macs(CONSUMER_MAC, h.c0_mac);
        let r = test_run(h.dp.program(), h.c0, &syn.build());
        assert_eq!(r.verdict, XDP_REDIRECT, "the SYN opens the flow");
        establish(h, &r.out, (src, port));
        let out = privatelink_tests::parse_checked(&r.out);
        Frames {
            ack: Pkt::tcp(src, port, ENDPOINT, 80, false, true)
                .macs(CONSUMER_MAC, h.c0_mac)
                .build(),
            reply: Pkt::tcp(BACKEND, 8080, out.src, out.sport, false, true)
                .macs(BACKEND_MAC, h.p0_mac)
                .build(),
            fresh: Pkt::syn(REPLAY_SOURCE, 1024, ENDPOINT, 80)
                .macs(CONSUMER_MAC, h.c0_mac)
                .build(),
        }
    };
    let sample = |h: &mut Harness, f: &Frames, path: usize| {
        let (c0, p0) = (h.c0, h.p0);
        match path {
            0 => replay_ns(h, FLOOR_PROGRAM, 0, &f.ack, false, REPLAY_REPEAT, XDP_TX),
            1 => replay_ns(h, PROGRAM, c0, &f.ack, false, REPLAY_REPEAT, XDP_REDIRECT),
            2 => replay_ns(h, PROGRAM, p0, &f.reply, false, REPLAY_REPEAT, XDP_REDIRECT),
            _ => replay_ns(h, PROGRAM, c0, &f.fresh, true, NEW_FLOWS, XDP_REDIRECT),
        }
    };
    // Per path: samples of A (both harnesses), of B, and the per-round ratios A / B and A / A.
    let mut ns: [[Vec<f64>; 4]; 2] = Default::default();
    let mut ratio: [Vec<f64>; 4] = Default::default();
    let mut control: [Vec<f64>; 4] = Default::default();
    with_harness_object(bench_sizes(), None, |a1| {
        let f1 = prepare(a1);
        let ns1 = a1.netns.clone();
        with_harness_object(bench_sizes(), Some(object.as_slice()), |b| {
            let fb = prepare(b);
            let nsb = b.netns.clone();
            with_harness_object(bench_sizes(), None, |a2| {
                let f2 = prepare(a2);
                let ns2 = a2.netns.clone();
                for round in 0..ROUNDS {
                    for path in 0..paths.len() {
                        let mut got = [0.0; 3];
                        let order = if round % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
                        for i in order {
                            got[i] = match i {
                                0 => in_netns(&ns1, || sample(a1, &f1, path)),
                                1 => in_netns(&nsb, || sample(b, &fb, path)),
                                _ => in_netns(&ns2, || sample(a2, &f2, path)),
                            };
                        }
                        let [x1, y, x2] = got;
                        ns[0][path].extend([x1, x2]);
                        ns[1][path].push(y);
                        ratio[path].push((x1 * x2).sqrt() / y);
                        control[path].push(x1 / x2);
                    }
                }
            });
        });
    });
    println!(
        "## A/B of two builds, hot paths through the replay ({ROUNDS} rounds, A, B and A again in turns)\n"
    );
    println!("A: this build; B: {other}\n");
    println!(
        "| path | A ns | B ns | A / floor | B / floor | A / B (median of rounds) | quartiles | A / A | quartiles |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|---:|---|");
    let (fa, fb) = (median(ns[0][0].clone()), median(ns[1][0].clone()));
    for (i, path) in paths.iter().enumerate() {
        let (a, b) = (median(ns[0][i].clone()), median(ns[1][i].clone()));
        println!(
            "| {path} | {a:.1} | {b:.1} | {:.2} | {:.2} | {:.3} | {:.3}–{:.3} | {:.3} | {:.3}–{:.3} |",
            a / fa,
            b / fb,
            median(ratio[i].clone()),
            quartile(&ratio[i], 1),
            quartile(&ratio[i], 3),
            median(control[i].clone()),
            quartile(&control[i], 1),
            quartile(&control[i], 3),
        );
    }
}

/// Runs `f` on this thread inside the namespace `name`, and returns to the thread's namespace.
fn in_netns<T>(name: &str, f: impl FnOnce() -> T) -> T {
    use nix::sched::{CloneFlags, setns};
    let here = std::fs::File::open("/proc/thread-self/ns/net").expect("this thread's namespace");
    let there = std::fs::File::open(format!("/run/netns/{name}")).expect("the namespace");
    setns(&there, CloneFlags::CLONE_NEWNET).expect("setns into the harness");
    let out = f();
    setns(&here, CloneFlags::CLONE_NEWNET).expect("setns back");
    out
}

/// One configuration's rows; `floors` gets its floor, timer overhead, replay cost and replay
/// cost measured through the floor, in ns.
fn measure(
    endpoints: u32,
    ct_fill: u32,
    rows: &mut Vec<Row>,
    floors: &mut Vec<(f64, f64, f64, f64)>,
) {
    with_harness_sized(bench_sizes(), |h| {
        h.bench_slots = SLOT_TABLE_ENTRIES;
        let model = with_endpoints(h, endpoints.saturating_sub(1));
        let t = Instant::now();
        let report = h.plane.apply(&model).expect("apply");
        let config = if ct_fill > 0 {
            format!("{endpoints} endpoints, {} conntrack entries", 2 * ct_fill)
        } else {
            format!("{endpoints} endpoints")
        };
        eprintln!(
            "bench: {config}: applied {} map writes in {:?}",
            report.writes,
            t.elapsed()
        );
        let mut next = 0u32;
        if ct_fill > 0 {
            let t = Instant::now();
            for _ in 0..ct_fill {
                let (src, port) = consumer(next);
                next += 1;
                let r = test_run(
                    h.dp.program(),
                    h.c0,
                    &Pkt::syn(src, port, ENDPOINT, 80)
                        .macs(CONSUMER_MAC, h.c0_mac)
                        .build(),
                );
                assert_eq!(r.verdict, 4, "filling conntrack");
            }
            eprintln!(
                "bench: {} live conntrack entries after {:?}",
                h.plane.flows().len(),
                t.elapsed()
            );
            // What every metrics scrape and history sample reads (and a sweep, before deleting).
            let reader = h.plane.stats_reader().expect("stats reader");
            let t = Instant::now();
            let n = reader.flow_views().len();
            eprintln!(
                "bench: read all {n} conntrack entries in {:?} (batched lookups)",
                t.elapsed()
            );
        }
        let (fl, overhead) = floor(h);
        // The one datapath path that leaves buffer and state unchanged, so it can also be measured
        // like the floor (hot, repeat 10M): its gap to the repeat-1 row is the cold-cache cost a
        // repeat-1 run adds, not program cost. No timer overhead to subtract here.
        let unknown_pkt = Pkt::syn(Ipv4Addr::new(198, 18, 0, 10), 999, NOT_ENDPOINT, 80)
            .macs(CONSUMER_MAC, h.c0_mac)
            .build();
        let hot = median(
            (0..3)
                .map(|_| hot_ns(h, h.c0, &unknown_pkt, FLOOR_REPEAT))
                .collect(),
        );
        rows.push(Row {
            config: config.clone(),
            path: "unknown destination (pass), hot repeat 10M",
            ns: hot,
        });
        // Hot rows of the paths that rewrite the frame or create state: the replay restores the
        // frame before every run, and its own cost, measured in the same round on the
        // unknown-destination path, comes off (see `hot_paths`).
        let anchor = (h.c0, unknown_pkt.as_slice());
        let mut hot_rows: Vec<(&'static str, f64)> = Vec::new();
        let mut row = |path: &'static str, ns: f64| {
            rows.push(Row {
                config: config.clone(),
                path,
                ns: ns - overhead,
            })
        };
        let (c0, p0, c0_mac, p0_mac) = (h.c0, h.p0, h.c0_mac, h.p0_mac);

        let unknown = Pkt::syn(Ipv4Addr::new(198, 18, 0, 10), 999, NOT_ENDPOINT, 80)
            .macs(CONSUMER_MAC, c0_mac)
            .build();
        row(
            "unknown destination (pass)",
            mean_ns(h, c0, |_| unknown.clone()),
        );

        let (src, port) = consumer(next);
        next += 1;
        let syn = Pkt::syn(src, port, ENDPOINT, 80).macs(CONSUMER_MAC, c0_mac);
        let r = test_run(h.dp.program(), c0, &syn.build());
        let out = privatelink_tests::parse_checked(&r.out);
        establish(h, &r.out, (src, port));
        let ack = Pkt::tcp(src, port, ENDPOINT, 80, false, true)
            .macs(CONSUMER_MAC, c0_mac)
            .build();
        row("established forward", mean_ns(h, c0, |_| ack.clone()));
        let reply = Pkt::tcp(BACKEND, 8080, out.src, out.sport, false, true)
            .macs(BACKEND_MAC, p0_mac)
            .build();
        row("established reply", mean_ns(h, p0, |_| reply.clone()));
        // A flow whose SYN was never answered: its packets are not served from the flow cache,
        // so this is what a packet of a tracked flow costs through conntrack, the cache's probe
        // and miss included.
        let (src, port) = consumer(next);
        next += 1;
        let half_syn = Pkt::syn(src, port, ENDPOINT, 80).macs(CONSUMER_MAC, c0_mac);
        let r = test_run(h.dp.program(), c0, &half_syn.build());
        assert_eq!(r.verdict, XDP_REDIRECT, "the half-open flow's SYN");
        let half_open = Pkt::tcp(src, port, ENDPOINT, 80, false, true)
            .macs(CONSUMER_MAC, c0_mac)
            .build();
        let (hot, cost) = hot_paths(
            h,
            anchor,
            &[
                (c0, &ack, XDP_REDIRECT),
                (p0, &reply, XDP_REDIRECT),
                (c0, &half_open, XDP_REDIRECT),
            ],
        );
        floors.push((fl, overhead, cost, replay_overhead(h, fl)));
        // What the conntrack lookup alone adds to the floor: the floor program with the
        // datapath's interface and conntrack lookups in between, on the established flow's frame.
        let lookup = median(
            (0..3)
                .map(|_| {
                    let prog = h
                        .bench()
                        .bench_program(LOOKUP_FLOOR_PROGRAM)
                        .expect("lookup floor");
                    let (verdict, ns) = test_run_repeated(prog, c0, &ack, FLOOR_REPEAT);
                    assert_eq!(verdict, XDP_TX, "the lookup floor must find the flow");
                    ns
                })
                .collect(),
        );
        hot_rows.push((LOOKUP_FLOOR_ROW, lookup));
        hot_rows.push(("established forward, hot replay", hot[0]));
        hot_rows.push(("established reply, hot replay", hot[1]));
        hot_rows.push((HALF_OPEN_ROW, hot[2]));

        let syn4 = |i| {
            let (src, port) = consumer(i);
            Pkt::syn(src, port, ENDPOINT, 80)
                .macs(CONSUMER_MAC, c0_mac)
                .build()
        };
        let cases = [
            (0, "new flow, 0 rules"),
            (16, "new flow, 16 rules"),
            (256, "new flow, 256 rules"),
        ];
        new_flows(h, &model, &cases, rules, syn4, &mut next, &mut row);
        let hot_syn = Pkt::syn(REPLAY_SOURCE, 1024, ENDPOINT, 80)
            .macs(CONSUMER_MAC, c0_mac)
            .build();
        for (n, path) in [
            (0, "new flow, 0 rules, hot replay"),
            (16, "new flow, 16 rules, hot replay"),
            (256, "new flow, 256 rules, hot replay"),
        ] {
            let mut m = model.clone();
            m.links.get_mut(&LINK).expect("link").rules = rules(n).map(Into::into);
            h.plane.apply(&m).expect("apply rules");
            let before = h.link_stats(LINK).new_conns;
            // As many runs as repeat-1 samples: each opens a flow, and the table has room. One
            // round (the flows stay), its replay cost measured just before.
            let cost = replay_cost(h, anchor);
            let ns = replay_ns(h, PROGRAM, c0, &hot_syn, true, SAMPLES, XDP_REDIRECT);
            assert_eq!(
                h.link_stats(LINK).new_conns - before,
                u64::from(SAMPLES),
                "{path}: every replayed SYN must open a flow"
            );
            hot_rows.push((path, ns - cost));
        }
        // What a new flow would cost at least in a conntrack that is not the kernel's hash map:
        // the floor plus two slots claimed by compare-and-swap in a table of the conntrack's size,
        // with the same fresh tuples (the sequence goes on from the rows above).
        let cost = replay_cost(h, anchor);
        let ns = replay_ns(h, SLOT_FLOOR_PROGRAM, c0, &hot_syn, true, SAMPLES, XDP_TX);
        hot_rows.push((SLOT_FLOOR_ROW, ns - cost));

        // The same paths over IPv6 (the tail call into the IPv6 program included).
        h.plane.apply(&model).expect("apply without rules");
        let (src, port) = consumer6(next);
        next += 1;
        let syn = Pkt6::syn(src, port, ENDPOINT6, 80).macs(CONSUMER_MAC, c0_mac);
        let r = test_run(h.dp.program(), c0, &syn.build());
        assert_eq!(r.verdict, 4, "IPv6 SYN redirected");
        let (nat, nport) = parse_checked6(&r.out);
        let mut syn_ack = Pkt6::syn(BACKEND6, 8080, nat, nport).macs(BACKEND_MAC, p0_mac);
        syn_ack.tcp = Some((true, true));
        let r = test_run(h.dp.program(), p0, &syn_ack.build());
        assert_eq!(r.verdict, 4, "the IPv6 SYN-ACK establishes the flow");
        let mut ack = syn.clone();
        ack.tcp = Some((false, true));
        let ack = ack.build();
        row("IPv6 established forward", mean_ns(h, c0, |_| ack.clone()));
        let mut reply = Pkt6::syn(BACKEND6, 8080, nat, nport).macs(BACKEND_MAC, p0_mac);
        reply.tcp = Some((false, true));
        let reply = reply.build();
        row("IPv6 established reply", mean_ns(h, p0, |_| reply.clone()));
        let syn6 = |i| {
            let (src, port) = consumer6(i);
            Pkt6::syn(src, port, ENDPOINT6, 80)
                .macs(CONSUMER_MAC, c0_mac)
                .build()
        };
        let cases = [
            (0, "IPv6 new flow, 0 rules"),
            (16, "IPv6 new flow, 16 rules"),
        ];
        new_flows(h, &model, &cases, rules6, syn6, &mut next, &mut row);
        rows.extend(hot_rows.into_iter().map(|(path, ns)| Row {
            config: config.clone(),
            path,
            ns,
        }));
    });
}

/// New-flow rows: for each (rule count, path), the measured link gets `rules(n)` and every
/// sample is a SYN `syn(i)` from a consumer tuple no sample used before (`next` on).
fn new_flows(
    h: &mut Harness,
    model: &privatelink_agent::datapath::Model,
    cases: &[(usize, &'static str)],
    rules: fn(usize) -> Option<Vec<Rule>>,
    syn: impl Fn(u32) -> Vec<u8>,
    next: &mut u32,
    row: &mut impl FnMut(&'static str, f64),
) {
    for &(n, path) in cases {
        let mut m = model.clone();
        m.links.get_mut(&LINK).expect("link").rules = rules(n).map(Into::into);
        h.plane.apply(&m).expect("apply rules");
        let start = *next;
        *next += SAMPLES;
        row(path, mean_ns(h, h.c0, |i| syn(start + i)));
    }
}

/// Real traffic through veth with the kernel's own run-time statistics.
fn real_traffic() -> (u64, Duration, usize) {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable bpf stats");
    let topo = Topology::build(1).expect("topology");
    let mut dp = Datapath::load(&Sizes::small()).expect("load");
    let _plane = topo.node.enter(|| {
        let mut p = Dataplane::new(&mut dp.ebpf).expect("maps");
        p.apply(&topo.model()).expect("apply");
        p
    });
    topo.attach(&mut dp).expect("attach");
    const BYTES: usize = 256 << 20;
    let listener = topo
        .provider
        .enter(|| TcpListener::bind((demo::BACKEND, demo::TCP_PORTS.1)).expect("bind"));
    let server = topo.provider.spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0;
        while n < BYTES {
            let k = s.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    });
    topo.consumers[0].enter(|| {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((demo::ENDPOINT, demo::TCP_PORTS.0)),
            Duration::from_secs(5),
        )
        .expect("connect");
        let chunk = vec![0x5au8; 1 << 16];
        for _ in 0..BYTES / chunk.len() {
            s.write_all(&chunk).expect("write");
        }
    });
    let got = server.join().expect("server");
    let info = dp.program().info().expect("info");
    (info.run_count(), info.run_time(), got)
}

/// A control-plane state with one provider service and `n` Available endpoints in one consumer
/// network (built directly: this measures the agent's sync, not the API).
fn big_state(
    n: u32,
) -> (
    privatelink_agent::control::state::State,
    privatelink_agent::node::sync::NodeConfig,
) {
    use privatelink_agent::control::types::*;
    let mut s = privatelink_agent::control::state::State::default();
    for (id, number) in [("provider", 1), ("consumer", 2)] {
        s.accounts.insert(
            id.into(),
            Account {
                id: id.into(),
                number,
                name: id.into(),
                created_at: 0,
            },
        );
    }
    for (id, number, owner, cidr) in [
        ("vpc-p", 1, "provider", "198.18.100.0/24"),
        ("vpc-c", 2, "consumer", "198.18.0.0/15"),
    ] {
        s.networks.insert(
            id.into(),
            Network {
                id: id.into(),
                number,
                name: id.into(),
                owner: owner.into(),
                cidrs: vec![cidr.parse().unwrap()],
                created_at: 0,
            },
        );
    }
    s.services.insert(
        "svc-1".into(),
        Service {
            id: "svc-1".into(),
            service_name: "local-1.s.svc-1".into(),
            slot: 1,
            name: "s".into(),
            private_dns_name: None,
            answer_ping: false,
            owner: "provider".into(),
            network_id: "vpc-p".into(),
            service_type: ServiceType::Custom,
            backends: vec![
                "198.18.100.10".parse().unwrap(),
                "198.18.100.11".parse().unwrap(),
            ],
            port_mappings: vec![PortMapping {
                protocol: Protocol::Tcp,
                service_port: 8080,
                terminal_port: 80,
            }],
            auto_accept: true,
            allowlist: vec![AllowEntry {
                account_id: "consumer".into(),
                description: String::new(),
                created_at: 0,
            }],
            health_check: HealthCheck::default(),
            flow_limit: 0,
            endpoint_flow_limits: Default::default(),
            proxy_protocol: Default::default(),
            connection_log: false,
            tags: vec![],
            created_at: 0,
        },
    );
    for i in 0..n {
        let id = format!("ep-{i:08x}");
        s.endpoints.insert(
            id.clone(),
            Endpoint {
                id,
                link_id: i + 1,
                name: "e".into(),
                owner: "consumer".into(),
                network_id: "vpc-c".into(),
                subnet_id: "subnet-c".into(),
                ip: std::net::IpAddr::V4(endpoint_addr(i)),
                ip_address_type: Default::default(),
                ipv6: None,
                service_id: "svc-1".into(),
                dns_name: String::new(),
                private_dns_enabled: false,
                state: ConnectionState::Available,
                security_groups: vec![],
                tags: vec![],
                created_at: 0,
            },
        );
    }
    let node = privatelink_agent::node::sync::NodeConfig {
        ifaces: vec![],
        nat: std::collections::BTreeMap::from([(
            "vpc-p".to_string(),
            privatelink_agent::datapath::NatRange {
                addrs: "198.19.128.0/20".parse().unwrap(),
                addrs6: None,
                ports: 1024..=65535,
            },
        )]),
        nat_slices: Default::default(),
        datapath: privatelink_common::DatapathConfig::DEFAULT,
    };
    (s, node)
}

/// Milliseconds per endpoint created through the control plane's own validation when `n`
/// endpoints already share its subnet (an address and a link id each): the state of
/// [`big_state`] with its subnet, behind a store whose writes cost nothing, so what is timed is
/// the operation and the apply.
fn create_among(n: u32) -> f64 {
    use privatelink_agent::control::{
        ops::{Caller, endpoints},
        plane::ControlPlane,
        state::State,
        store::{Store, StoreError},
        types::{Change, Subnet},
    };
    struct Memory(State);
    impl Store for Memory {
        fn load(&mut self) -> Result<State, StoreError> {
            Ok(self.0.clone())
        }
        fn commit(&mut self, _revision: u64, _changes: &[Change]) -> Result<(), StoreError> {
            Ok(())
        }
    }
    let (mut s, _) = big_state(n);
    s.subnets.insert(
        "subnet-c".into(),
        Subnet {
            id: "subnet-c".into(),
            name: "c".into(),
            owner: "consumer".into(),
            network_id: "vpc-c".into(),
            cidr: "198.18.0.0/15".parse().unwrap(),
            ipv6_cidr: None,
            created_at: 0,
        },
    );
    let plane = ControlPlane::open(Box::new(Memory(s)), "bench-admin-token-xx").unwrap();
    let cons = Caller::Account("consumer".into());
    const CREATED: u32 = 200;
    let t = Instant::now();
    for i in 0..CREATED {
        let req = serde_json::from_value(serde_json::json!({ "name": format!("new{i}"), "service_id": "svc-1", "network_id": "vpc-c", "subnet_id": "subnet-c" })).unwrap();
        plane
            .mutate(&cons, |s, cx| endpoints::create(s, cx, req))
            .expect("create among many");
    }
    t.elapsed().as_secs_f64() * 1e3 / CREATED as f64
}

/// Binds two security groups of 8 rules each (priorities 10 and 20) to every endpoint of `s`.
fn bind_groups(s: &mut privatelink_agent::control::state::State) {
    use privatelink_agent::control::types::*;
    for (g, first_port) in [("sg-a", 1000u16), ("sg-b", 2000)] {
        let rules = (0..8u16)
            .map(|k| SgRule {
                protocol: RuleProtocol::Tcp,
                ports: format!("{}-{}", first_port + 10 * k, first_port + 10 * k + 5),
                source: format!("198.18.{k}.0/24").parse().unwrap(),
                action: if k % 2 == 0 {
                    RuleAction::Accept
                } else {
                    RuleAction::Drop
                },
                description: String::new(),
            })
            .collect();
        s.security_groups.insert(
            g.into(),
            SecurityGroup {
                id: g.into(),
                name: g.into(),
                owner: "consumer".into(),
                rules,
                tags: vec![],
                created_at: 0,
            },
        );
    }
    for e in s.endpoints.values_mut() {
        e.security_groups = vec![
            Binding {
                security_group_id: "sg-a".into(),
                priority: 10,
            },
            Binding {
                security_group_id: "sg-b".into(),
                priority: 20,
            },
        ];
    }
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// The agent's sync at scale: model + compile + diff + map writes.
fn sync_scale() {
    use std::collections::BTreeSet;
    println!("## Agent sync at scale\n");
    println!("| what | time | target |");
    println!("|---|---:|---|");
    let sizes = Sizes {
        links: 131_072,
        endpoint_ports: 262_144,
        allowlist: 131_072,
        conntrack: 65_536,
        ..Sizes::small()
    };
    with_harness_sized(sizes, |h| {
        let rss0 = rss_mib();
        let (s10k, node) = big_state(10_000);
        let t = Instant::now();
        let (m, _) = privatelink_agent::node::sync::model(&s10k, &node, &BTreeSet::new());
        h.plane.apply(&m).expect("apply 10k");
        println!(
            "| apply 10,000 new endpoints (model, compile, diff, map writes) | {:.0} ms | < 1 s |",
            t.elapsed().as_secs_f64() * 1e3
        );
        drop(s10k);
        let (mut s, node) = big_state(100_000);
        let t = Instant::now();
        let (m, _) = privatelink_agent::node::sync::model(&s, &node, &BTreeSet::new());
        h.plane.apply(&m).expect("apply 100k");
        println!(
            "| apply 100,000 endpoints (90,000 new) | {:.0} ms | |",
            t.elapsed().as_secs_f64() * 1e3
        );
        // Five single changes (a different endpoint rejected each time, so every run is one
        // real change): the medians of the model's time and of the whole sync.
        let one_change =
            |h: &mut Harness, s: &mut privatelink_agent::control::state::State, first| {
                let mut times = Vec::new();
                let mut model_times = Vec::new();
                for i in first..first + 5u32 {
                    let id = format!("ep-{:08x}", i * 7919);
                    let e = s.endpoints.get_mut(&id).unwrap();
                    e.state = privatelink_agent::control::types::ConnectionState::Rejected;
                    let t = Instant::now();
                    let (m, _) = privatelink_agent::node::sync::model(s, &node, &BTreeSet::new());
                    model_times.push(t.elapsed().as_secs_f64() * 1e3);
                    let r = h.plane.apply(&m).expect("apply one change");
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                    assert!(r.writes >= 1);
                }
                times.sort_by(f64::total_cmp);
                model_times.sort_by(f64::total_cmp);
                (model_times[2], times[2])
            };
        let (model_ms, ms) = one_change(h, &mut s, 0);
        println!(
            "| one change on a node with 100,000 endpoints (median of 5; the model alone {model_ms:.0} ms) | {ms:.0} ms | < 50 ms |"
        );
        println!(
            "| agent-side memory for 100,000 endpoints (process RSS growth: state, model, shadow) | {:.0} MiB | < 200 MiB |",
            rss_mib() - rss0
        );
        // The same with security groups bound to every endpoint: two groups of 8 rules each.
        bind_groups(&mut s);
        let (m, _) = privatelink_agent::node::sync::model(&s, &node, &BTreeSet::new());
        h.plane.apply(&m).expect("apply the bound groups");
        let (model_ms, ms) = one_change(h, &mut s, 5);
        println!(
            "| the same, two security groups of 8 rules bound to every endpoint (the model alone {model_ms:.0} ms) | {ms:.0} ms | < 50 ms |"
        );
    });
    // The API path, with a real SQLite file (each creation is one fsync'd commit).
    let db = std::env::temp_dir().join(format!("privatelink-bench-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&db);
    let plane = privatelink_agent::control::plane::ControlPlane::open(
        Box::new(privatelink_agent::control::store::SqliteStore::open(&db).unwrap()),
        "bench-admin-token-xx",
    )
    .unwrap();
    use privatelink_agent::control::ops::{Caller, endpoints, services};
    let prepared = privatelink_agent::testkit::demo::prepare(
        &plane,
        &[
            ("provider", "198.18.100.0/24", "198.18.100.0/24"),
            ("consumer", "198.18.0.0/16", "198.18.0.0/16"),
        ],
    )
    .unwrap();
    let [(pnet, _), (cnet, csub)] = <[(String, String); 2]>::try_from(prepared.vpcs).unwrap();
    let prov = Caller::Account("provider".into());
    let svc = plane
        .mutate(&prov, |s, cx| {
            services::create(s, cx, serde_json::from_value(serde_json::json!({ "name": "s", "network_id": pnet, "service_type": "custom",
                "backends": ["198.18.100.10"], "auto_accept": true,
                "port_mappings": [{ "protocol": "tcp", "service_port": 8080, "terminal_port": 80 }] })).unwrap())
        })
        .unwrap();
    plane
        .mutate(&prov, |s, cx| {
            services::allow(
                s,
                cx,
                &svc.id,
                serde_json::from_value(serde_json::json!({ "account_id": "consumer" })).unwrap(),
            )
        })
        .unwrap();
    let cons = Caller::Account("consumer".into());
    let t = Instant::now();
    for i in 0..1000 {
        let req = serde_json::from_value(serde_json::json!({ "name": format!("e{i}"), "service_id": svc.id, "network_id": cnet, "subnet_id": csub })).unwrap();
        plane
            .mutate(&cons, |s, cx| endpoints::create(s, cx, req))
            .unwrap();
    }
    let per = t.elapsed().as_secs_f64() * 1e3 / 1000.0;
    println!(
        "| create one endpoint through the control plane (validation + fsync'd SQLite commit), mean of 1,000 | {per:.2} ms | |"
    );
    for n in [1_000u32, 100_000] {
        println!(
            "| create one endpoint through the control plane with {n} endpoints in its subnet (validation and apply; the store's write left out), mean of 200 | {:.3} ms | |",
            create_among(n)
        );
    }
    println!(
        "\nThe sync rows build the control-plane state directly and time what the agent does with it. Creating"
    );
    println!(
        "endpoints through the API costs one fsync per commit (the fsync'd row); validation finds the link id and"
    );
    println!(
        "the address in sorted sets kept with the state, so it hardly grows with the endpoints (the last two rows).\n"
    );
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
}

/// Shared state in etcd: from one write on one server to every follower having applied it, at
/// 1k, 10k and 100k objects (etcd in a namespace of its own; followers are control planes
/// following the store as agents do; a node's datapath apply comes on top, see the sync rows).
/// Crashes of a group's active node under load (`PRIVATELINK_BENCH_ONLY=failover`): in each trial
/// a UDP loop sends a request every 5 ms (the longest gap between its answers is the takeover:
/// last packet through the dead node to the first through the new one, give or take 5 ms; TCP's
/// retransmission backoff would stretch it), one TCP connection echoes every 5 ms and 50 every
/// 100 ms; the active node's agent is killed and its interfaces taken away, the standby takes
/// over, then the dead node returns as the standby for the next trial.
fn failover() {
    use privatelink_tests::group::{Group, Holder, UdpProbe, wait};
    const TRIALS: usize = 20;
    const CONNS: usize = 50;
    let mut g = Group::build("fo");
    let root = g.root.clone();
    let (mut takeovers, mut broken, mut resets, mut total) = (Vec::new(), 0, 0, 0);
    let (mut tcp_waits, mut udp_lost, mut udp_sent) = (Vec::new(), 0, 0);
    let mut active = 0;
    for trial in 0..TRIALS {
        let probe = Holder::start_every(
            &g.client,
            &root,
            &format!("probe{trial}"),
            1,
            Duration::from_millis(5),
        );
        let load = Holder::start(&g.client, &root, &format!("load{trial}"), CONNS);
        let udp = UdpProbe::start(&g.client, &root, &format!("udp{trial}"));
        // The standby has the new flows after a sync period or two.
        std::thread::sleep(Duration::from_millis(800));
        let (dead, alive) = (active, 1 - active);
        g.nodes[dead].agent = None;
        g.nodes[dead].links(false);
        wait("the takeover", Duration::from_secs(10), || {
            g.nodes[alive].active()
        });
        std::thread::sleep(Duration::from_secs(1));
        let (p, l, u) = (probe.finish(), load.finish(), udp.finish());
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(u64::MAX);
        takeovers.push(n(&u, "worst_gap_ms"));
        tcp_waits.push(n(&p, "worst_ms"));
        udp_lost += n(&u, "sent") - n(&u, "answered");
        udp_sent += n(&u, "sent");
        broken += n(&p, "broken") + n(&l, "broken");
        resets += n(&p, "resets") + n(&l, "resets");
        total += 1 + CONNS;
        eprintln!(
            "trial {trial}: {} down, takeover {} ms (a TCP echo waited {} ms), broken {}",
            g.nodes[dead].name,
            n(&u, "worst_gap_ms"),
            n(&p, "worst_ms"),
            n(&p, "broken") + n(&l, "broken")
        );
        // The dead node returns, as the standby.
        g.nodes[dead].start();
        g.nodes[dead].links(true);
        let (dn, an) = (g.nodes[dead].name, g.nodes[alive].name);
        wait("the nodes hear each other", Duration::from_secs(15), || {
            g.nodes[dead].metric("privatelink_ha_peer_up", &[("peer", an)]) == Some(1.0)
                && g.nodes[alive].metric("privatelink_ha_peer_up", &[("peer", dn)]) == Some(1.0)
        });
        active = alive;
    }
    takeovers.sort_unstable();
    tcp_waits.sort_unstable();
    let at = |v: &[u64], q: f64| v[((q * TRIALS as f64).ceil() as usize).clamp(1, TRIALS) - 1];
    println!(
        "failover: {TRIALS} trials, takeover p50 {} ms p99 {} ms, established broken {broken} of {total}, resets {resets}",
        at(&takeovers, 0.5),
        at(&takeovers, 0.99)
    );
    println!(
        "failover: longest TCP echo wait p50 {} ms p99 {} ms (retransmission backoff included); UDP requests unanswered {udp_lost} of {udp_sent}",
        at(&tcp_waits, 0.5),
        at(&tcp_waits, 0.99)
    );
}

fn etcd_convergence() {
    use privatelink_agent::control::{
        etcd::{EtcdConfig, EtcdStore},
        ops::{Caller, endpoints},
        plane::ControlPlane,
        store::Store as _,
        types::Change,
    };
    use std::sync::Arc;
    println!("## Shared state in etcd: a write to every follower\n");
    println!(
        "| objects in the state | write on one server → applied by 2 followers (median of 5) | full load of the state |"
    );
    println!("|---:|---:|---:|");
    let ns = privatelink_agent::testkit::netns::Netns::new("eb").expect("namespace");
    let dir = std::env::temp_dir().join(format!("privatelink-bench-etcd-{}", std::process::id()));
    /// Removes etcd's directory when the benchmark ends, also on a panic.
    struct Gone(std::path::PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _gone = Gone(dir.clone());
    let etcd = privatelink_tests::world::Etcd::start(&ns, &dir);
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        for n in [1_000u32, 10_000, 100_000] {
            let cfg = EtcdConfig {
                endpoints: vec![privatelink_tests::world::ETCD.to_string()],
                prefix: format!("/bench{n}"),
                timeout: Duration::from_secs(10),
                contact_timeout: Duration::from_secs(3),
                lease_ttl: Duration::from_secs(5),
            };
            let (state, _) = big_state(n);
            let objects = state.objects().count();
            let mut seed = EtcdStore::connect(cfg.clone()).expect("connect");
            let changes: Vec<Change> = state.objects().map(Change::Put).collect();
            // In pieces: etcd takes requests of at most 2 MiB.
            for (k, chunk) in changes.chunks(1000).enumerate() {
                seed.commit(k as u64 + 1, chunk).expect("seed the state");
            }
            let t = Instant::now();
            seed.load().expect("load");
            let load = t.elapsed();
            let writer =
                ControlPlane::open(Box::new(seed), "bench-admin-token-xx").expect("writer");
            let followers: Vec<Arc<ControlPlane>> = (0..2)
                .map(|_| {
                    Arc::new(
                        ControlPlane::open(
                            Box::new(EtcdStore::connect(cfg.clone()).expect("connect")),
                            "bench-admin-token-xx",
                        )
                        .expect("follower"),
                    )
                })
                .collect();
            let tasks: Vec<_> = followers
                .iter()
                .map(|f| {
                    rt.spawn(privatelink_agent::control::follow::follow_store(
                        cfg.clone(),
                        f.clone(),
                        Default::default(),
                        None,
                    ))
                })
                .collect();
            std::thread::sleep(Duration::from_millis(500));
            let caller = Caller::Account("consumer".into());
            let mut times = Vec::new();
            for i in 0..5u32 {
                let id = format!("ep-{:08x}", i * 97);
                let t = Instant::now();
                writer
                    .mutate(&caller, |s, cx| {
                        endpoints::update(
                            s,
                            cx,
                            &id,
                            endpoints::UpdateEndpoint {
                                name: Some(format!("renamed-{i}")),
                                ..Default::default()
                            },
                        )
                    })
                    .expect("one write");
                let r = writer.revision();
                while followers.iter().any(|f| f.revision() < r) {
                    assert!(t.elapsed() < Duration::from_secs(30), "followers stuck");
                    std::thread::sleep(Duration::from_millis(1));
                }
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            for t in tasks {
                t.abort();
            }
            times.sort_by(f64::total_cmp);
            println!(
                "| {objects} | {:.0} ms | {:.0} ms |",
                times[2],
                load.as_secs_f64() * 1e3
            );
        }
    });
    drop(etcd);
    println!(
        "\nA follower loads the whole state once (the last column: at start, and again after a lost watch or a missed revision), then applies each commit from its watch, so a write costs it what the write changed, not the state's size.\n"
    );
}

fn main() {
    if !privileged("bench") {
        eprintln!("bench needs root (CAP_BPF, CAP_NET_ADMIN)");
        std::process::exit(2);
    }
    // Stopped by a signal (Ctrl-C, a timeout), it still removes its namespaces and their servers.
    privatelink_agent::testkit::netns::teardown_on_signals().expect("signal handler");
    if let Ok(path) = std::env::var("PRIVATELINK_BENCH_PROFILE") {
        return profile(&path);
    }
    if let Ok(other) = std::env::var("PRIVATELINK_BENCH_AB") {
        return ab(&other);
    }
    match std::env::var("PRIVATELINK_BENCH_ONLY").as_deref() {
        Ok("sync") => return sync_scale(),
        Ok("etcd") => return etcd_convergence(),
        Ok("nat") => return nat_occupancy(),
        Ok("flowsync") => {
            flowsync_cost();
            return flowsync_throughput();
        }
        Ok("failover") => {
            flowsync_cost();
            return failover();
        }
        Ok("proxy") => {
            proxy_cost();
            return connlog_cost();
        }
        _ => {}
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!("## Datapath cost per packet (BPF_PROG_TEST_RUN)\n");
    println!(
        "Kernel {}, {} × {cpu}, {SAMPLES} repeat-1 samples per path.\n",
        kernel.trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    let mut rows = Vec::new();
    let mut floors = Vec::new();
    let configs = [(10, 0), (10_000, 0), (100_000, 0), (100_000, 500_000)];
    // `PRIVATELINK_BENCH_CONFIGS=10,10000`: only the configurations with these endpoint counts.
    let only: Option<Vec<u32>> = std::env::var("PRIVATELINK_BENCH_CONFIGS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    for (eps, fill) in configs
        .into_iter()
        .filter(|(eps, _)| only.as_ref().is_none_or(|o| o.contains(eps)))
    {
        measure(eps, fill, &mut rows, &mut floors);
    }
    let floor = floors.iter().map(|f| f.0).sum::<f64>() / floors.len() as f64;
    let overhead = floors.iter().map(|f| f.1).sum::<f64>() / floors.len() as f64;
    let replay = floors.iter().map(|f| f.2).sum::<f64>() / floors.len() as f64;
    let via_floor = floors.iter().map(|f| f.3).sum::<f64>() / floors.len() as f64;
    println!(
        "Floor program (parse, swap MACs, XDP_TX), repeat {FLOOR_REPEAT}: **{floor:.1} ns**; per-call timer overhead subtracted from every repeat-1 figure: {overhead:.1} ns; replay cost (frame restore and tail call: the unknown destination replayed minus direct) subtracted from every hot replay figure: {replay:.1} ns (replay into the floor minus the floor: {via_floor:.1} ns).\n"
    );
    let base: BTreeMap<&str, f64> = rows
        .iter()
        .filter(|r| r.config == "10 endpoints")
        .map(|r| (r.path, r.ns))
        .collect();
    println!("| configuration | path | ns/packet | × floor | × same path at 10 endpoints |");
    println!("|---|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2} |",
            r.config,
            r.path,
            r.ns,
            r.ns / floor,
            r.ns / base[r.path]
        );
    }
    let per_rule = (base["new flow, 256 rules"] - base["new flow, 0 rules"]) / 255.0;
    println!(
        "\nSecurity-group cost per evaluated rule: {per_rule:.2} ns ((256 rules − 0 rules) / 255 at 10 endpoints).\n"
    );
    println!(
        "A new flow against its memory floor (the floor plus two slots claimed in an open-addressing table of the conntrack's size: what a conntrack not built on the kernel's hash map would cost at least), hot, same run:\n"
    );
    println!(
        "| configuration | slot floor ns | × floor | new flow, 16 rules, hot ns | new flow ÷ slot floor |"
    );
    println!("|---|---:|---:|---:|---:|");
    for r in rows.iter().filter(|r| r.path == SLOT_FLOOR_ROW) {
        if let Some(b) = rows
            .iter()
            .find(|b| b.config == r.config && b.path == "new flow, 16 rules, hot replay")
        {
            println!(
                "| {} | {:.1} | {:.2} | {:.1} | {:.2} |",
                r.config,
                r.ns,
                r.ns / floor,
                b.ns,
                b.ns / r.ns
            );
        }
    }
    println!();
    println!("IPv6 against IPv4, same path, same run:\n");
    println!("| configuration | path | IPv6 ÷ IPv4 |");
    println!("|---|---|---:|");
    for r in rows.iter().filter(|r| r.path.starts_with("IPv6 ")) {
        let v4 = &r.path["IPv6 ".len()..];
        if let Some(b) = rows.iter().find(|b| b.config == r.config && b.path == v4) {
            println!("| {} | {} | {:.2} |", r.config, v4, r.ns / b.ns);
        }
    }
    println!(
        "\nHot (replayed, nothing else running between runs) against repeat-1, same path, same run:\n"
    );
    println!("| configuration | path | hot ns | × floor | hot ÷ repeat-1 |");
    println!("|---|---|---:|---:|---:|");
    for r in rows.iter().filter(|r| r.path.ends_with(", hot replay")) {
        let cold = &r.path[..r.path.len() - ", hot replay".len()];
        if let Some(b) = rows.iter().find(|b| b.config == r.config && b.path == cold) {
            println!(
                "| {} | {} | {:.1} | {:.2} | {:.2} |",
                r.config,
                cold,
                r.ns,
                r.ns / floor,
                r.ns / b.ns
            );
        }
    }
    println!();
    nat_occupancy();
    proxy_cost();
    connlog_cost();
    flowsync_cost();
    flowsync_throughput();
    if std::env::var("PRIVATELINK_BENCH_ONLY").as_deref() == Ok("datapath") {
        return;
    }

    sync_scale();
    etcd_convergence();
    println!("## High availability: crashes of the active node under load\n");
    failover();
    println!();

    println!("## Map memory at default sizes\n");
    let dp = Datapath::load(&Sizes::default()).expect("load with default sizes");
    let mem = map_memory(&dp.ebpf).expect("map memory");
    println!("| map | max entries | key + value bytes | kernel memlock | bytes/entry |");
    println!("|---|---:|---:|---:|---:|");
    for m in &mem {
        println!(
            "| {} | {} | {} + {} | {:.1} MiB | {:.0} |",
            m.name,
            m.max_entries,
            m.key_size,
            m.value_size,
            m.memlock as f64 / 1048576.0,
            m.memlock as f64 / f64::from(m.max_entries.max(1))
        );
    }
    let total: u64 = mem.iter().map(|m| m.memlock).sum();
    println!(
        "\nTotal: {:.1} MiB on {} CPUs (per-CPU maps scale with CPUs).\n",
        total as f64 / 1048576.0,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    drop(dp);

    println!("## Cross-check under real veth traffic (kernel.bpf_stats_enabled)\n");
    let (count, time, bytes) = real_traffic();
    println!(
        "One TCP stream of {} MiB consumer → endpoint → backend through native XDP on veth: the datapath ran {count} times, {:.1} ns per run on average (all packets: data, ACKs, ARP).",
        bytes >> 20,
        time.as_nanos() as f64 / count.max(1) as f64
    );
}
