//! `cargo xtask bench`, second part: privatelink against what a network team would run instead, in
//! the same namespace topology and the same run, in alternating rounds:
//!
//! 1. privatelink: the XDP datapath (native, on the node's veths), full NAT;
//! 2. nftables: DNAT + SNAT with the kernel's conntrack, configured by hand;
//! 3. HAProxy in TCP mode, bound to the endpoint address, connecting from a NAT-range address;
//! 4. direct routing to the backend, no translation (the floor).
//!
//! Clients and servers are the same for every mode; only the node's configuration changes. Every
//! loop is bounded in time. Besides socket clients, a socket-free generator (an XDP program run in
//! live-frames mode on the consumer's interface) sends small UDP frames into a sink that counts and
//! drops them on the provider's interface, so the frame rate measures the forwarding rather than
//! the sockets at both ends. The peers of the node's veths carry a pass-through XDP program in every
//! mode (redirect targets need one), so that cost is common to all four.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{
    TestRun as _, TestRunAttrs, TestRunOptions,
    xdp::{XdpLinkId, XdpMode},
};
use privatelink_agent::{
    datapath::loader::{Datapath, Sizes},
    datapath::{Dataplane, PortMap, Proto},
    testkit::demo::{BACKEND, CLIENT, ENDPOINT, NAT_RANGE, Topology},
};
use privatelink_common::bench::{WINDOW_DONE, WINDOW_FIRST_NS, WINDOW_LAST_NS, WINDOW_SENT};
use privatelink_tests::{
    benchkit::{ACKER_PROGRAM, Bench, RESPONDER_PROGRAM, SINK_PROGRAM},
    privileged,
};

/// Terminal → service ports: request/response echo, iperf3, UDP sink.
const ECHO: (u16, u16) = (80, 8080);
const IPERF: (u16, u16) = (5201, 5201);
const UDP: (u16, u16) = (53, 5353);
/// The node's own address on the consumer side (next hop for direct routing).
const NODE_CONSUMER: &str = "198.18.0.1";
/// HAProxy's source address toward the backend (from the NAT range, routed back to the node).
const PROXY_SOURCE: &str = "198.19.128.1";
const ROUNDS: usize = 3;
const RUN: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Privatelink,
    Nftables,
    Haproxy,
    Direct,
}

const MODES: [Mode; 4] = [
    Mode::Privatelink,
    Mode::Nftables,
    Mode::Haproxy,
    Mode::Direct,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Privatelink => "privatelink (XDP full NAT)",
            Mode::Nftables => "nftables DNAT+SNAT",
            Mode::Haproxy => "HAProxy TCP mode",
            Mode::Direct => "direct routing (floor)",
        }
    }

    /// Where a client connects for (echo, iperf, udp); the terminal ports, or the service ports
    /// directly when routing.
    fn target(self) -> (Ipv4Addr, u16, u16, u16) {
        match self {
            Mode::Direct => (BACKEND, ECHO.1, IPERF.1, UDP.1),
            _ => (ENDPOINT, ECHO.0, IPERF.0, UDP.0),
        }
    }
}

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Bed {
    topo: Topology,
    dp: Datapath,
    /// The benchmark object (generator, sink, responder, acker) beside the datapath.
    bench: Bench,
    _plane: Dataplane,
    dir: std::path::PathBuf,
    /// The pass program on the provider's interface (the generator measurement swaps in the sink).
    provider_pass: Option<XdpLinkId>,
    /// The same on the consumer's interface (the handshake measurement swaps in the sink).
    consumer_pass: Option<XdpLinkId>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(ns: &privatelink_agent::testkit::netns::Netns, args: &[&str]) {
    ns.exec(args[0], &args[1..])
        .unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
}

fn bed() -> Bed {
    let topo = Topology::build(1).expect("topology");
    // Conntrack for every round's new-flow and handshake measurements (flows outlive a round).
    let sizes = Sizes {
        conntrack: 1 << 21,
        ..Sizes::small()
    };
    let mut dp = Datapath::load(&sizes).expect("load");
    let mut model = topo.model();
    for l in model.links.values_mut() {
        let iperf = PortMap {
            proto: Proto::Tcp,
            terminal: IPERF.0,
            service: IPERF.1,
        };
        l.ports = l.ports.iter().copied().chain([iperf]).collect();
    }
    let plane = topo.node.enter(|| {
        let mut p = Dataplane::new(&mut dp.ebpf).expect("maps");
        p.apply(&model).expect("apply");
        p
    });
    // Pass programs on the peers (redirect targets need one), the provider's kept to swap.
    let consumer_pass = topo.consumers[0]
        .enter(|| dp.pass_program().attach("eth0", XdpMode::Driver))
        .expect("pass program on the consumer");
    let provider_pass = topo
        .provider
        .enter(|| dp.pass_program().attach("eth0", XdpMode::Driver))
        .expect("pass program on the provider");
    // The backend's neighbour is fixed: the sink drops ARP, so the node could not resolve it.
    let backend_mac = topo.provider.mac("eth0").expect("provider MAC");
    sh(
        &topo.node,
        &[
            "ip",
            "neigh",
            "replace",
            &BACKEND.to_string(),
            "lladdr",
            &backend_mac.map(|b| format!("{b:02x}")).join(":"),
            "dev",
            "p0",
            "nud",
            "permanent",
        ],
    );
    // The generator's sources (198.18.0.10 on, the address moving on every 64,512 ports; a whole
    // run uses about 35 addresses) get fixed neighbours too: the consumer side's sink drops ARP
    // while SYN-ACKs come back, and the kernel's forwarding (nftables, direct) needs their MAC.
    let consumer_mac = topo.consumers[0].mac("eth0").expect("consumer MAC");
    let consumer_mac = consumer_mac.map(|b| format!("{b:02x}")).join(":");
    for last in 10..=70 {
        sh(
            &topo.node,
            &[
                "ip",
                "neigh",
                "replace",
                &format!("198.18.0.{last}"),
                "lladdr",
                &consumer_mac,
                "dev",
                "c0",
                "nud",
                "permanent",
            ],
        );
    }
    // Routing for the direct mode, and a wide port range for the connection-rate clients.
    sh(
        &topo.node,
        &[
            "ip",
            "addr",
            "add",
            &format!("{NODE_CONSUMER}/24"),
            "dev",
            "c0",
        ],
    );
    sh(
        &topo.consumers[0],
        &[
            "ip",
            "route",
            "add",
            "198.18.100.0/24",
            "via",
            NODE_CONSUMER,
        ],
    );
    sh(
        &topo.provider,
        &["ip", "route", "add", "198.18.0.0/24", "via", "198.18.100.1"],
    );
    topo.consumers[0]
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        .unwrap();
    // HAProxy's connections to the backend all come from one address: the socket clients'
    // connections leave TIME_WAIT behind there before the socket-free ones start.
    topo.node
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        .unwrap();
    let dir = std::env::temp_dir().join(format!("privatelink-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bench = Bench::load(&dp, 1).expect("the benchmark object");
    Bed {
        topo,
        dp,
        bench,
        _plane: plane,
        dir,
        provider_pass: Some(provider_pass),
        consumer_pass: Some(consumer_pass),
    }
}

/// What a mode installed on the node, removed on drop.
enum Installed {
    Xdp(Vec<XdpLinkId>),
    Nft,
    Haproxy(Proc),
    Nothing,
}

fn enter(bed: &mut Bed, mode: Mode) -> Installed {
    let node = &bed.topo.node;
    match mode {
        Mode::Privatelink => {
            let prog = bed.dp.program();
            let ids = node.enter(|| {
                ["c0", "p0"]
                    .iter()
                    .map(|d| prog.attach(d, XdpMode::Driver).expect("attach"))
                    .collect()
            });
            Installed::Xdp(ids)
        }
        Mode::Nftables => {
            sh(
                node,
                &["ip", "addr", "add", &format!("{ENDPOINT}/32"), "dev", "c0"],
            );
            let rules = format!(
                "table ip plbench {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr {ENDPOINT} tcp dport {e0} dnat to {BACKEND}:{e1}
    ip daddr {ENDPOINT} tcp dport {i0} dnat to {BACKEND}:{i1}
    ip daddr {ENDPOINT} udp dport {u0} dnat to {BACKEND}:{u1}
  }}
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    ip daddr {BACKEND} oifname \"p0\" snat to {NAT_RANGE}
  }}
}}",
                e0 = ECHO.0,
                e1 = ECHO.1,
                i0 = IPERF.0,
                i1 = IPERF.1,
                u0 = UDP.0,
                u1 = UDP.1,
            );
            let f = bed.dir.join("rules.nft");
            std::fs::write(&f, rules).unwrap();
            sh(node, &["nft", "-f", f.to_str().unwrap()]);
            Installed::Nft
        }
        Mode::Haproxy => {
            sh(
                node,
                &["ip", "addr", "add", &format!("{ENDPOINT}/32"), "dev", "c0"],
            );
            sh(
                node,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{PROXY_SOURCE}/32"),
                    "dev",
                    "lo",
                ],
            );
            let cfg = format!(
                "global
  maxconn 8000
  nbthread 2
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
listen echo
  bind {ENDPOINT}:{e0}
  server b {BACKEND}:{e1} source {PROXY_SOURCE}
listen iperf
  bind {ENDPOINT}:{i0}
  server b {BACKEND}:{i1} source {PROXY_SOURCE}
",
                e0 = ECHO.0,
                e1 = ECHO.1,
                i0 = IPERF.0,
                i1 = IPERF.1,
            );
            let f = bed.dir.join("haproxy.cfg");
            std::fs::write(&f, cfg).unwrap();
            let log = bed.dir.join("haproxy.log");
            let p = Proc(
                node.command("haproxy")
                    .args(["-db", "-f", f.to_str().unwrap()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
                    .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
                    .spawn()
                    .expect("start haproxy"),
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while !node.enter(|| {
                TcpStream::connect_timeout(&(ENDPOINT, ECHO.0).into(), Duration::from_millis(200))
                    .is_ok()
            }) {
                assert!(
                    Instant::now() < deadline,
                    "haproxy did not come up: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Installed::Haproxy(p)
        }
        Mode::Direct => Installed::Nothing,
    }
}

fn leave(bed: &mut Bed, installed: Installed) {
    let node = &bed.topo.node;
    match installed {
        Installed::Xdp(ids) => {
            let prog = bed.dp.program();
            node.enter(|| {
                for id in ids {
                    prog.detach(id).expect("detach");
                }
            });
        }
        Installed::Nft => {
            sh(node, &["nft", "delete", "table", "ip", "plbench"]);
            sh(
                node,
                &["ip", "addr", "del", &format!("{ENDPOINT}/32"), "dev", "c0"],
            );
        }
        Installed::Haproxy(p) => {
            drop(p);
            sh(
                node,
                &["ip", "addr", "del", &format!("{ENDPOINT}/32"), "dev", "c0"],
            );
            sh(
                node,
                &[
                    "ip",
                    "addr",
                    "del",
                    &format!("{PROXY_SOURCE}/32"),
                    "dev",
                    "lo",
                ],
            );
        }
        Installed::Nothing => {}
    }
}

/// The provider's servers: a TCP echo (a pool of accepting threads), iperf3, a UDP sink.
struct Servers {
    stop: Arc<AtomicBool>,
    udp_received: Arc<AtomicU64>,
    _iperf: Proc,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn servers(bed: &Bed) -> Servers {
    let provider = &bed.topo.provider;
    let stop = Arc::new(AtomicBool::new(false));
    let listener = provider.enter(|| TcpListener::bind((BACKEND, ECHO.1)).expect("bind echo"));
    listener.set_nonblocking(true).unwrap();
    let mut threads = Vec::new();
    for _ in 0..4 {
        let l = listener.try_clone().unwrap();
        let stop = stop.clone();
        threads.push(provider.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_nodelay(true).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut buf = [0u8; 256];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        }));
    }
    let udp = provider.enter(|| UdpSocket::bind((BACKEND, UDP.1)).expect("bind udp"));
    udp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let udp_received = Arc::new(AtomicU64::new(0));
    {
        let (stop, count) = (stop.clone(), udp_received.clone());
        threads.push(provider.spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if udp.recv(&mut buf).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let iperf = Proc(
        provider
            .command("iperf3")
            .args(["-s", "-B", &BACKEND.to_string(), "-p", &IPERF.1.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3"),
    );
    std::thread::sleep(Duration::from_millis(300));
    Servers {
        stop,
        udp_received,
        _iperf: iperf,
        threads,
    }
}

/// Busy CPU time of the whole machine so far (user, nice, system, irq, softirq), in ns.
fn cpu_busy_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    (f[0] + f[1] + f[2] + f[5] + f[6]) * 1_000_000_000 / hz
}

/// iperf3 throughput in Gbit/s with `streams` parallel streams.
fn throughput(bed: &Bed, mode: Mode, streams: u32) -> f64 {
    let (host, _, port, _) = mode.target();
    let out = bed.topo.consumers[0]
        .exec(
            "timeout",
            &[
                "30",
                "iperf3",
                "-c",
                &host.to_string(),
                "-p",
                &port.to_string(),
                "-t",
                "3",
                "-P",
                &streams.to_string(),
                "-J",
            ],
        )
        .unwrap_or_else(|e| panic!("iperf3 through {}: {e:#}", mode.name()));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9
}

/// Short TCP connections per second (connect, 16-byte request, reply, abortive close) from 4
/// client threads for `RUN`; and busy CPU ns per connection.
fn connection_rate(bed: &Bed, mode: Mode) -> (f64, f64) {
    let (host, port, _, _) = mode.target();
    let addr = SocketAddr::from((host, port));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_busy_ns();
    let started = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (done, failed) = (done.clone(), failed.clone());
            bed.topo.consumers[0].spawn(move || {
                let end = Instant::now() + RUN;
                let mut buf = [0u8; 16];
                while Instant::now() < end {
                    let ok = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(Duration::from_secs(1)))?;
                        s.write_all(b"0123456789abcdef")?;
                        s.read_exact(&mut buf)?;
                        // SO_LINGER 0: RST on close, so no TIME_WAIT exhausts the client's ports.
                        let linger = libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        };
                        // SAFETY: a valid socket and a correctly sized option value.
                        unsafe {
                            libc::setsockopt(
                                s.as_raw_fd(),
                                libc::SOL_SOCKET,
                                libc::SO_LINGER,
                                (&linger as *const libc::linger).cast(),
                                std::mem::size_of::<libc::linger>() as u32,
                            )
                        };
                        Ok(())
                    })();
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_busy_ns() - cpu0;
    let n = done.load(Ordering::Relaxed);
    let f = failed.load(Ordering::Relaxed);
    if f > n / 100 {
        eprintln!("{}: {f} failed connections of {}", mode.name(), n + f);
    }
    (n as f64 / secs, cpu as f64 / n.max(1) as f64)
}

/// Request latency (p50, p99) in µs: one persistent connection, 64-byte requests paced at 2,000 per
/// second for `RUN`.
fn latency(bed: &Bed, mode: Mode) -> (f64, f64) {
    let (host, port, _, _) = mode.target();
    let mut rtts = bed.topo.consumers[0].enter(move || {
        let mut s = TcpStream::connect_timeout(&(host, port).into(), Duration::from_secs(2))
            .expect("connect for latency");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let req = [0x42u8; 64];
        let mut buf = [0u8; 64];
        let interval = Duration::from_micros(500);
        let start = Instant::now();
        let mut rtts = Vec::new();
        let mut next = start;
        while start.elapsed() < RUN {
            let t = Instant::now();
            s.write_all(&req).unwrap();
            s.read_exact(&mut buf).unwrap();
            rtts.push(t.elapsed().as_nanos() as f64 / 1000.0);
            next += interval;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        rtts
    });
    rtts.sort_by(f64::total_cmp);
    let q = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize];
    (q(0.5), q(0.99))
}

/// Small UDP packets (18-byte payload: 60-byte frames) from one sender for `RUN`: packets per second
/// delivered to the backend's socket, and busy CPU ns per delivered packet.
fn udp_pps(bed: &Bed, servers: &Servers, mode: Mode) -> (f64, f64) {
    let (host, _, _, port) = mode.target();
    let sock = bed.topo.consumers[0].enter(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    sock.connect((host, port)).unwrap();
    // Resolve the neighbours (and the flow) first.
    for _ in 0..10 {
        let _ = sock.send(&[0u8; 18]);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = servers.udp_received.load(Ordering::Relaxed);
    let cpu0 = cpu_busy_ns();
    let started = Instant::now();
    let payload = [0x17u8; 18];
    while started.elapsed() < RUN {
        for _ in 0..256 {
            let _ = sock.send(&payload);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let secs = started.elapsed().as_secs_f64() - 0.2;
    let cpu = cpu_busy_ns() - cpu0;
    let got = servers.udp_received.load(Ordering::Relaxed) - before;
    (got as f64 / secs, cpu as f64 / got.max(1) as f64)
}

/// Frames of the one-flow measurement (one test run: about 2-5 s, whichever the mode), and frames
/// per batch of the generator's test runs.
const GEN_FRAMES: u32 = 1 << 22;
const GEN_BATCH: u32 = 64;
/// New flows per new-flow measurement: fits the kernel's default conntrack limit (262,144) and,
/// over every round, the datapath's table as the bed sizes it.
const GEN_NEW_FLOWS: u32 = 1 << 17;
/// TCP handshakes per handshake measurement (with the UDP new flows of the same round, within the
/// kernel's conntrack limit too).
const GEN_HANDSHAKES: u32 = 1 << 16;

/// What the socket-free generator measured: (frames per second delivered, busy CPU ns per
/// delivered frame) for one flow, then the same with every frame a new flow, then TCP handshakes
/// (a SYN out, its SYN-ACK back, both through the node) per second and busy CPU ns per handshake.
struct GenRates {
    one_flow: (f64, f64),
    new_flows: (f64, f64),
    handshakes: (f64, f64),
}

impl GenRates {
    /// Appends this round's values to a mode's results (one list per entry of `METRICS`, the
    /// socket-free rows from [`FIRST_SOCKET_FREE`] to [`CONNECTIONS_ROW`], in this order).
    fn record(&self, results: &mut [Vec<f64>]) {
        let values = [self.one_flow, self.new_flows, self.handshakes]
            .into_iter()
            .flat_map(|(rate, cpu)| [rate, cpu]);
        for (r, v) in results[FIRST_SOCKET_FREE..CONNECTIONS_ROW]
            .iter_mut()
            .zip(values)
        {
            r.push(v);
        }
    }
}

/// Which program receives the generator's frames at either end: the consumer's and the
/// provider's interface get `program` (by name) in place of their pass program.
fn swap_in(
    bed: &mut Bed,
    consumer: Option<&'static str>,
    provider: Option<&'static str>,
) -> [Option<XdpLinkId>; 2] {
    let mut out = [None, None];
    for (i, (ns, slot, program)) in [
        (&bed.topo.consumers[0], &mut bed.consumer_pass, consumer),
        (&bed.topo.provider, &mut bed.provider_pass, provider),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(program) = program else { continue };
        let pass = slot.take().expect("pass attached");
        ns.enter(|| bed.dp.pass_program().detach(pass).expect("detach pass"));
        let prog = bed
            .bench
            .bench_program(program)
            .unwrap_or_else(|e| panic!("{program} program: {e}"));
        out[i] = Some(
            ns.enter(|| prog.attach("eth0", XdpMode::Driver))
                .unwrap_or_else(|e| panic!("attaching {program}: {e}")),
        );
    }
    out
}

/// Undoes [`swap_in`]: the pass programs go back.
fn swap_out(bed: &mut Bed, links: [Option<XdpLinkId>; 2], programs: [Option<&'static str>; 2]) {
    for (i, (link, program)) in links.into_iter().zip(programs).enumerate() {
        let (Some(link), Some(program)) = (link, program) else {
            continue;
        };
        let ns = if i == 0 {
            &bed.topo.consumers[0]
        } else {
            &bed.topo.provider
        };
        let prog = bed.bench.bench_program(program).expect("bench program");
        ns.enter(|| prog.detach(link).expect("detach"));
        let pass = ns
            .enter(|| bed.dp.pass_program().attach("eth0", XdpMode::Driver))
            .expect("pass program back");
        if i == 0 {
            bed.consumer_pass = Some(pass);
        } else {
            bed.provider_pass = Some(pass);
        }
    }
}

/// One live-frames test run of the generator on the consumer's interface: `repeat` iterations on
/// `frame` (context `ctx`, see `privatelink_tests::xdp_ctx`), in batches of `GEN_BATCH`.
fn live_run(bed: &mut Bed, frame: &[u8], ctx: &[u8], repeat: u32) {
    let generator = bed.bench.gen_program().expect("generator program");
    let mut o = TestRunOptions::new();
    o.data_in = Some(frame);
    o.ctx_in = Some(ctx);
    o.repeat = repeat;
    o.attrs = TestRunAttrs::new().xdp_live_frames(GEN_BATCH);
    bed.topo.consumers[0]
        .enter(|| generator.test_run(o))
        .expect("live-frames test run");
}

/// Sends `frames` copies of `frame` from the consumer's interface in one live-frames test run of
/// the generator, and returns what the sink received: (frames per second, busy CPU ns per counted
/// frame). The rate is timed by the sink's own clock, from its first sample to its last, so the
/// test run's setup and teardown (about 12 ms with nothing sent, a larger share of a faster mode's
/// wall time) stay out of it. Frames still queued in veth when the run returns are counted: a
/// short settle first.
fn generate(bed: &mut Bed, frame: &[u8], frames: u32) -> (f64, f64) {
    let consumer = &bed.topo.consumers[0];
    let ifindex = consumer.ifindex("eth0").expect("consumer ifindex");
    let ctx = privatelink_tests::xdp_ctx(ifindex, frame.len());
    bed.bench.reset_sink_clock().expect("sink clock");
    let before = bed.bench.sink_count().expect("sink count");
    let cpu0 = cpu_busy_ns();
    live_run(bed, frame, &ctx, frames);
    std::thread::sleep(Duration::from_millis(50));
    let cpu = cpu_busy_ns() - cpu0;
    let got = bed.bench.sink_count().expect("sink count") - before;
    let (timed, ns) = bed.bench.sink_clock().expect("sink clock");
    if ns == 0 {
        eprintln!("the sink timed none of {frames} frames ({got} counted)");
    }
    (
        timed as f64 / (ns.max(1) as f64 / 1e9),
        cpu as f64 / got.max(1) as f64,
    )
}

/// Socket-free rates through the node, with the generator on the consumer's interface (one
/// thread; no socket on either side, so what remains is the forwarding and veth, and the
/// generator, the same in every mode):
/// - small UDP frames (60 bytes) into a sink that counts and drops on the provider's interface:
///   one flow (`GEN_FRAMES` frames), then `GEN_NEW_FLOWS` frames that each open a new flow;
/// - TCP SYNs, each of a new flow, into the responder in the backend's place, whose SYN-ACKs come
///   back through the node into a sink on the consumer's interface: `GEN_HANDSHAKES` connection
///   setups, each creating the forwarding's state and crossing it both ways.
fn gen_pps(bed: &mut Bed, mode: Mode) -> GenRates {
    let (host, echo, _, port) = mode.target();
    let node_pass = node_pass_on(bed, mode);
    let consumer_mac = bed.topo.consumers[0].mac("eth0").expect("consumer MAC");
    let node_mac = bed.topo.consumer_ifaces[0].2;

    let programs = [None, Some(SINK_PROGRAM)];
    let links = swap_in(bed, programs[0], programs[1]);
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(consumer_mac, node_mac)
        .ipv4(CLIENT.octets(), host.octets(), 64)
        .udp(40000, port)
        .write(&mut frame, &[0x17u8; 18])
        .expect("frame");
    // No UDP checksum (IPv4 allows it): fewer bytes for the sequence to keep right.
    frame[40..42].copy_from_slice(&[0, 0]);
    bed.bench.set_gen_frame(&frame).expect("generator frame");
    // Warm-up: the flow (privatelink) or the kernel's conntrack entry (nftables) exists after it.
    bed.bench.set_gen_new_flows(false).expect("generator mode");
    generate(bed, &frame, 1024);
    std::thread::sleep(Duration::from_millis(100));
    let one_flow = generate(bed, &frame, GEN_FRAMES);
    bed.bench.set_gen_new_flows(true).expect("generator mode");
    let new_flows = generate(bed, &frame, GEN_NEW_FLOWS);
    bed.bench.set_gen_new_flows(false).expect("generator mode");
    swap_out(bed, links, programs);

    let programs = [Some(SINK_PROGRAM), Some(RESPONDER_PROGRAM)];
    let links = swap_in(bed, programs[0], programs[1]);
    let syn = syn_frame(bed, host, echo);
    bed.bench.set_gen_frame(&syn).expect("generator frame");
    bed.bench.set_gen_new_flows(true).expect("generator mode");
    let handshakes = generate(bed, &syn, GEN_HANDSHAKES);
    bed.bench.set_gen_new_flows(false).expect("generator mode");
    swap_out(bed, links, programs);

    node_pass_off(bed, node_pass);
    GenRates {
        one_flow,
        new_flows,
        handshakes,
    }
}

/// veth hands frames sent by XDP only to a peer with an XDP program: where the kernel forwards,
/// the node's interfaces get the pass program for a socket-free measurement (the consumer's for
/// the generator's frames, the provider's for the responder's).
fn node_pass_on(bed: &mut Bed, mode: Mode) -> Vec<XdpLinkId> {
    if mode == Mode::Privatelink {
        return Vec::new();
    }
    ["c0", "p0"]
        .into_iter()
        .map(|dev| {
            let prog = bed.dp.pass_program();
            bed.topo
                .node
                .enter(|| prog.attach(dev, XdpMode::Driver))
                .unwrap_or_else(|e| panic!("pass program on {dev}: {e}"))
        })
        .collect()
}

/// Undoes [`node_pass_on`].
fn node_pass_off(bed: &mut Bed, ids: Vec<XdpLinkId>) {
    for id in ids {
        let prog = bed.dp.pass_program();
        bed.topo
            .node
            .enter(|| prog.detach(id).expect("detach the node's pass program"));
    }
}

/// A TCP SYN from the consumer to `host:port` (the generator gives each one a new source).
fn syn_frame(bed: &Bed, host: Ipv4Addr, port: u16) -> Vec<u8> {
    let consumer_mac = bed.topo.consumers[0].mac("eth0").expect("consumer MAC");
    let node_mac = bed.topo.consumer_ifaces[0].2;
    let mut syn = Vec::new();
    etherparse::PacketBuilder::ethernet2(consumer_mac, node_mac)
        .ipv4(CLIENT.octets(), host.octets(), 64)
        .tcp(40000, port, 1, 64240)
        .syn()
        .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
        .expect("TCP options")
        .write(&mut syn, &[])
        .expect("SYN");
    syn
}

/// Connections per socket-free connection measurement, and at most this many pending (sent and
/// not yet completed); generator iterations per test run (most of them, while the window is full,
/// drop their frame unsent), and how long a measurement may take at most.
const GEN_CONNECTIONS: u64 = 1 << 16;
const GEN_PENDING: u64 = 256;
const GEN_WINDOW_REPEAT: u32 = 1 << 22;
const GEN_CONNECTION_LIMIT: Duration = Duration::from_secs(10);

/// Short TCP connections through the node with no socket at either end, every mode alike, as the
/// socket clients make them (connect, request, reply, abortive close): the generator sends SYNs of
/// new flows from the consumer's interface; the responder, in the backend's place, answers SYNs
/// and echoes requests; the acker, in the client's place, answers the SYN-ACK with the final ACK
/// and a request and the reply with a reset. Through the NATs every segment crosses the node;
/// with HAProxy, its kernel completes the client's handshake and HAProxy accepts, connects to the
/// backend, relays the request and the reply, and closes both sides. A connection counts when the
/// acker resets it after the reply. The generator keeps at most `GEN_PENDING` pending, like a
/// client pool with that many connections open, so a proxy works at its own pace instead of being
/// flooded; it spins while the window is full (one CPU busy in every mode), so no CPU figure.
/// Returns connections per second, timed in the programs from the first SYN sent to the last
/// connection completed.
fn connections(bed: &mut Bed, mode: Mode) -> f64 {
    let (host, echo, _, _) = mode.target();
    let node_pass = node_pass_on(bed, mode);
    let programs = [Some(ACKER_PROGRAM), Some(RESPONDER_PROGRAM)];
    let links = swap_in(bed, programs[0], programs[1]);
    let syn = syn_frame(bed, host, echo);
    bed.bench.set_gen_frame(&syn).expect("generator frame");
    bed.bench.set_gen_new_flows(true).expect("generator mode");
    bed.bench
        .set_gen_window(GEN_PENDING, GEN_CONNECTIONS)
        .expect("generator window");
    let consumer = &bed.topo.consumers[0];
    let ifindex = consumer.ifindex("eth0").expect("consumer ifindex");
    let ctx = privatelink_tests::xdp_ctx(ifindex, syn.len());
    let started = Instant::now();
    let mut w = bed.bench.gen_window().expect("generator window");
    while w[WINDOW_DONE] < GEN_CONNECTIONS && started.elapsed() < GEN_CONNECTION_LIMIT {
        live_run(bed, &syn, &ctx, GEN_WINDOW_REPEAT);
        w = bed.bench.gen_window().expect("generator window");
    }
    if w[WINDOW_DONE] < w[WINDOW_SENT] {
        eprintln!(
            "{}: {} of {} socket-free connections not completed within {GEN_CONNECTION_LIMIT:?}",
            mode.name(),
            w[WINDOW_SENT] - w[WINDOW_DONE],
            w[WINDOW_SENT]
        );
    }
    bed.bench
        .set_gen_window(0, 0)
        .expect("generator window off");
    bed.bench.set_gen_new_flows(false).expect("generator mode");
    swap_out(bed, links, programs);
    node_pass_off(bed, node_pass);
    let ns = w[WINDOW_LAST_NS].saturating_sub(w[WINDOW_FIRST_NS]);
    w[WINDOW_DONE] as f64 / (ns.max(1) as f64 / 1e9)
}

/// Index in `METRICS` of the first socket-free row.
const FIRST_SOCKET_FREE: usize = 9;

/// Index in `METRICS` of the socket-free connection rows (every mode, HAProxy included).
const CONNECTIONS_ROW: usize = 15;

const METRICS: [&str; 16] = [
    "TCP throughput, 1 stream (Gbit/s)",
    "TCP throughput, 8 streams (Gbit/s)",
    "connections per second (4 clients)",
    "CPU per connection (µs, whole machine)",
    "request latency p50 (µs)",
    "request latency p99 (µs)",
    "small UDP packets per second delivered",
    "CPU per delivered UDP packet (ns, whole machine)",
    "bpf run time per packet (ns, privatelink only)",
    "small UDP frames per second, socket-free generator and sink",
    "CPU per delivered frame (ns, socket-free, whole machine)",
    "new flows per second, socket-free (one UDP frame per flow)",
    "CPU per new flow (ns, socket-free, whole machine)",
    "TCP handshakes per second, socket-free (SYN out, SYN-ACK back, a new flow each)",
    "CPU per handshake (ns, socket-free, whole machine)",
    "short TCP connections per second, socket-free (handshake, request, reply, reset; 256 open)",
];

fn main() {
    if !privileged("compare") {
        eprintln!("compare needs root (CAP_BPF, CAP_NET_ADMIN)");
        std::process::exit(2);
    }
    // Stopped by a signal (Ctrl-C, a timeout), it still removes its namespaces and their servers.
    privatelink_agent::testkit::netns::teardown_on_signals().expect("signal handler");
    // `PRIVATELINK_BENCH_ONLY=pps`: only the socket-free rows (a quick look at the datapath
    // against the kernel's forwarding and HAProxy, without the socket-bound metrics).
    let only_pps = std::env::var("PRIVATELINK_BENCH_ONLY").as_deref() == Ok("pps");
    let mut bed = bed();
    let servers = servers(&bed);
    // results[mode][metric] = one value per round.
    let mut results = vec![vec![Vec::<f64>::new(); METRICS.len()]; MODES.len()];
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable bpf stats");
    for round in 0..ROUNDS {
        // Alternate the order so no mode always runs first (warm caches, conntrack tables).
        let mut order: Vec<usize> = (0..MODES.len()).collect();
        order.rotate_left(round % MODES.len());
        for m in order {
            let mode = MODES[m];
            let installed = enter(&mut bed, mode);
            let (runs0, time0) = {
                let info = bed.dp.program().info().expect("info");
                (info.run_count(), info.run_time())
            };
            let r = &mut results[m];
            let socket_free = |bed: &mut Bed, r: &mut [Vec<f64>]| {
                if mode != Mode::Haproxy {
                    gen_pps(bed, mode).record(r);
                }
                r[CONNECTIONS_ROW].push(connections(bed, mode));
            };
            if only_pps {
                socket_free(&mut bed, r);
                leave(&mut bed, installed);
                continue;
            }
            r[0].push(throughput(&bed, mode, 1));
            r[1].push(throughput(&bed, mode, 8));
            let (rate, cpu) = connection_rate(&bed, mode);
            r[2].push(rate);
            r[3].push(cpu / 1000.0);
            let (p50, p99) = latency(&bed, mode);
            r[4].push(p50);
            r[5].push(p99);
            if mode != Mode::Haproxy {
                let (pps, cpu) = udp_pps(&bed, &servers, mode);
                r[6].push(pps);
                r[7].push(cpu);
            }
            if mode == Mode::Privatelink {
                let info = bed.dp.program().info().expect("info");
                let runs = info.run_count() - runs0;
                let t = (info.run_time() - time0).as_nanos() as f64;
                r[8].push(t / runs.max(1) as f64);
            }
            socket_free(&mut bed, r);
            leave(&mut bed, installed);
            eprintln!("round {round}: {} done", mode.name());
        }
    }
    let median = |v: &[f64]| -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("## privatelink against nftables, HAProxy and direct routing\n");
    println!(
        "Kernel {}, {} CPUs; one consumer, node and provider namespace joined by veth; median of {ROUNDS} alternating rounds, {} s per measurement (iperf3: 3 s).\n",
        kernel.trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        RUN.as_secs()
    );
    println!(
        "| metric | privatelink | nftables | HAProxy | direct | privatelink ÷ direct | privatelink ÷ nftables | privatelink ÷ HAProxy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let fmt = |v: Option<f64>| match v {
        None => "n/a".to_string(),
        Some(x) if x >= 1000.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".to_string(),
    };
    for (i, name) in METRICS.iter().enumerate() {
        let v: Vec<Option<f64>> = (0..MODES.len()).map(|m| median(&results[m][i])).collect();
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            fmt(v[0]),
            fmt(v[1]),
            fmt(v[2]),
            fmt(v[3]),
            ratio(v[0], v[3]),
            ratio(v[0], v[1]),
            ratio(v[0], v[2])
        );
    }
    println!(
        "\nHAProxy does not carry UDP, and terminates TCP itself, so it has no UDP rows and no socket-free frame or handshake rows (n/a); in the socket-free short-connection row its kernel answers the client and HAProxy relays to the backend. Ratios are privatelink's value over the other's: above 1 is better for rates and throughput, below 1 is better for latency and CPU.\n"
    );
    drop(servers);
}
