//! Test support: the privilege gate, packet fixtures (built and checked with etherparse) and a
//! BPF_PROG_TEST_RUN helper. Namespaces come from `privatelink_agent::netns`.
pub mod benchkit;
pub mod family;
pub mod fixture;
pub mod fixture6;
pub mod group;
pub mod layout;
pub mod tcpseg;
pub mod tcpwatch;
pub mod world;

use std::{net::Ipv4Addr, time::Duration};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// Path of a binary of the agent package (`privatelink-agent`, `privatelink`): `PRIVATELINK_BIN_DIR`
/// or the target directory this test binary was built into. `cargo xtask test` builds them first.
pub fn agent_bin(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("PRIVATELINK_BIN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            // target/<profile>/deps/<test binary>, or target/<profile>/<binary> → target/<profile>
            let exe = std::env::current_exe().expect("current exe");
            let dir = exe.parent().expect("the binary's directory");
            match dir.file_name() {
                Some(n) if n == "deps" => dir.parent().expect("target dir").to_path_buf(),
                _ => dir.to_path_buf(),
            }
        });
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is not built: run `cargo xtask test` (or `cargo build --bins`) first",
        bin.display()
    );
    bin
}

/// Where `cargo xtask setup` puts the tools it installs beside the project:
/// `$CARGO_HOME/privatelink` (`~/.cargo/privatelink` without `CARGO_HOME`).
pub fn setup_dir() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))?;
    Some(home.join("privatelink"))
}

/// nginx or HAProxy that read PROXY v2 TLVs into their logs (nginx ≥ 1.23.2, HAProxy ≥ 2.9):
/// `cargo xtask setup` unpacks Debian 13's into [`setup_dir`]`/proxy-tools` (this machine's
/// Debian 12 has nginx 1.22 and HAProxy 2.6); `PRIVATELINK_PROXY_TOOLS` names another directory
/// with `bin/nginx` and `bin/haproxy`.
pub fn proxy_tool(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("PRIVATELINK_PROXY_TOOLS")
        .map(std::path::PathBuf::from)
        .or_else(|| setup_dir().map(|d| d.join("proxy-tools")))
        .expect("CARGO_HOME or HOME");
    let bin = dir.join("bin").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo xtask setup` as root (it unpacks nginx and HAProxy that log PROXY TLVs)",
        bin.display()
    );
    bin
}

/// Whether this process may load BPF programs and create namespaces. Outside CI a test without
/// them skips with a printed reason; with `CI=true` it fails instead.
pub fn privileged(test: &str) -> bool {
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("CapEff:")
                    .map(|v| u64::from_str_radix(v.trim(), 16).unwrap_or(0))
            })
        })
        .unwrap_or(0);
    const CAP_NET_ADMIN: u64 = 12;
    const CAP_SYS_ADMIN: u64 = 21;
    const CAP_BPF: u64 = 39;
    let has = |c: u64| caps & (1 << c) != 0;
    let ok = has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN));
    if ok {
        return true;
    }
    let why = format!("{test}: needs CAP_BPF and CAP_NET_ADMIN (run as root); CapEff={caps:#x}");
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{why} (CI=true: a missing capability is a failure)");
    }
    eprintln!("SKIPPED {why}");
    false
}

/// The outcome of one BPF_PROG_TEST_RUN.
#[derive(Debug)]
pub struct Run {
    pub verdict: u32,
    pub out: Vec<u8>,
    pub duration: Duration,
}

/// Layout of `struct xdp_md` for `ctx_in`.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// The `ctx_in` of a test run on a frame of `len` bytes received on `ifindex`: a `struct xdp_md`
/// (the kernel takes the frame length from data_end when a context is given).
pub fn xdp_ctx(ifindex: u32, len: usize) -> Vec<u8> {
    let md = XdpMd {
        data: 0,
        data_end: len as u32,
        data_meta: 0,
        ingress_ifindex: ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    // SAFETY: XdpMd is repr(C) plain integers.
    unsafe {
        std::slice::from_raw_parts(
            (&md as *const XdpMd).cast::<u8>(),
            std::mem::size_of::<XdpMd>(),
        )
    }
    .to_vec()
}

/// Runs `prog` once on `packet` as if received on `ifindex` (which must exist in the calling
/// thread's network namespace).
pub fn test_run(prog: &Xdp, ifindex: u32, packet: &[u8]) -> Run {
    let ctx = xdp_ctx(ifindex, packet.len());
    let mut out = vec![0u8; packet.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let r = prog
        .test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN failed: {e}"));
    out.truncate(r.data_size_out as usize);
    Run {
        verdict: r.return_value,
        out,
        duration: r.duration,
    }
}

/// Runs `prog` `repeat` times on `packet` in one test run, as if received on `ifindex`, without
/// reading the frame back: (the last run's verdict, the kernel's mean time per run in ns).
pub fn test_run_repeated(prog: &Xdp, ifindex: u32, packet: &[u8], repeat: u32) -> (u32, f64) {
    let ctx = xdp_ctx(ifindex, packet.len());
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.ctx_in = Some(&ctx);
    opts.repeat = repeat;
    let r = prog
        .test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN (repeat {repeat}) failed: {e}"));
    (r.return_value, r.duration.as_nanos() as f64)
}

/// Pins the calling thread to CPU 0: for tests of per-CPU state (the flow cache, the sink's
/// clock), which must see every run on one CPU.
pub fn pin_to_cpu0() {
    let mut cpus = nix::sched::CpuSet::new();
    cpus.set(0).expect("cpu 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).expect("affinity");
}

/// The L3/L4 view of a frame, with its checksums verified independently of the datapath.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// Parses an Ethernet/IPv4/TCP|UDP frame and panics unless the IPv4 header checksum and the L4
/// checksum (pseudo-header included; UDP zero allowed) are correct.
pub fn parse_checked(frame: &[u8]) -> Parsed {
    let p = SlicedPacket::from_ethernet(frame)
        .unwrap_or_else(|e| panic!("unparsable frame {frame:02x?}: {e}"));
    let eth = match &p.link {
        Some(etherparse::LinkSlice::Ethernet2(e)) => e.to_header(),
        other => panic!("not Ethernet II: {other:?}"),
    };
    let vlan = p.vlan_ids().first().map(|v| v.value());
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4: {frame:02x?}")
    };
    let iph = ip.header().to_header();
    assert_eq!(
        iph.header_checksum,
        iph.calc_header_checksum(),
        "bad IPv4 header checksum in {frame:02x?}"
    );
    let (sport, dport) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t
                .to_header()
                .calc_checksum_ipv4(&iph, t.payload())
                .expect("tcp checksum");
            assert_eq!(t.checksum(), want, "bad TCP checksum in {frame:02x?}");
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != 0 {
                let want = u
                    .to_header()
                    .calc_checksum_ipv4(&iph, u.payload())
                    .expect("udp checksum");
                assert_eq!(u.checksum(), want, "bad UDP checksum in {frame:02x?}");
            }
            (u.source_port(), u.destination_port())
        }
        other => panic!("not TCP/UDP: {other:?}"),
    };
    Parsed {
        src_mac: eth.source,
        dst_mac: eth.destination,
        vlan,
        src: Ipv4Addr::from(iph.source),
        dst: Ipv4Addr::from(iph.destination),
        ttl: iph.time_to_live,
        sport,
        dport,
        proto: iph.protocol.0,
    }
}

pub mod api;

/// Recomputes the IPv4 header checksum of `frame` (IPv4 header at `l3_off`), for fixtures that
/// change header fields to test one defect at a time.
pub fn fix_ipv4_checksum(frame: &mut [u8], l3_off: usize) {
    let ihl = usize::from(frame[l3_off] & 0x0f) * 4;
    frame[l3_off + 10..l3_off + 12].copy_from_slice(&[0, 0]);
    let mut sum: u32 = frame[l3_off..l3_off + ihl]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[l3_off + 10..l3_off + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}
