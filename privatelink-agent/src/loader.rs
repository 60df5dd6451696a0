//! Loading the embedded object with map sizes chosen at load time.
use aya::{
    Ebpf, EbpfLoader,
    maps::ProgramArray,
    programs::{ProgramError, Xdp},
};
use privatelink_common::{
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_CONNTRACK6_ENTRIES, DEFAULT_MAX_ALLOWLIST,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_ENDPOINT_PORTS, DEFAULT_MAX_LINKS, DEFAULT_MAX_RULE_LISTS,
    DEFAULT_MAX_RULE_LISTS6, DEFAULT_MAX_SERVICES, names,
};

use crate::object;

/// Program name of the datapath entry point in the object.
pub const PROGRAM: &str = "privatelink";
/// Program name of the IPv6 datapath, tail-called by the datapath through the `JUMP` map.
pub const PROGRAM6: &str = "privatelink6";
/// Program name of the pass-through program for veth peers that receive redirects.
pub const PASS_PROGRAM: &str = "pass";
/// Program name of the benchmark floor (parse, swap MACs, XDP_TX).
pub const FLOOR_PROGRAM: &str = "floor";
/// Program name of the floor plus the interface and conntrack lookups (a bench decomposition).
pub const LOOKUP_FLOOR_PROGRAM: &str = "lookup_floor";
/// Program name of the floor plus a new flow's two slot claims in an open-addressing table (a
/// bench decomposition: what a conntrack not built on the kernel's hash map could cost at least).
pub const SLOT_FLOOR_PROGRAM: &str = "slot_floor";
/// Program names of the benchmark load generator (live-frames test runs) and sink (count, drop).
pub const GEN_PROGRAM: &str = "traffic_gen";
pub const SINK_PROGRAM: &str = "sink";
/// Program name of the benchmark responder (a backend's end of a short TCP connection: SYN-ACK,
/// echo, reset).
pub const RESPONDER_PROGRAM: &str = "responder";
/// Program name of the benchmark acker (a client's end of a short TCP connection: the final ACK
/// with a request, then a reset).
pub const ACKER_PROGRAM: &str = "acker";
/// Program name of the benchmark replay (restores the frame, tail-calls the measured program).
pub const REPLAY_PROGRAM: &str = "replay";
/// Its program array: index 0 is the program it hands frames to.
const REPLAY_JUMP: &str = "REPLAY_JUMP";
/// The benchmark programs' per-CPU counters, and the generator's frame head (restored on every
/// run, [`GEN_HEAD`] bytes).
const SINK: &str = "SINK";
const GEN_FRAME: &str = "GEN_FRAME";
const GEN_FLOWS: &str = "GEN_FLOWS";
const GEN_WINDOW: &str = "GEN_WINDOW";
const SINK_CLOCK: &str = "SINK_CLOCK";
const SLOTS: &str = "SLOTS";
pub use privatelink_common::bench::GEN_HEAD;
use privatelink_common::bench::{
    CLOCK_FIRST_COUNT, CLOCK_FIRST_NS, CLOCK_LAST_COUNT, CLOCK_LAST_NS, CLOCK_WORDS, WINDOW_LIMIT,
    WINDOW_TOTAL, WINDOW_WORDS,
};

/// Capacities of the resizable maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub links: u32,
    pub endpoint_ports: u32,
    pub services: u32,
    pub backends: u32,
    pub rule_lists: u32,
    /// Distinct compiled IPv6 rule lists.
    pub rule_lists6: u32,
    pub allowlist: u32,
    /// Entries; a flow takes two.
    pub conntrack: u32,
    /// IPv6 conntrack entries; a flow takes two.
    pub conntrack6: u32,
    /// Slots of the benchmark's open-addressing table (`slot_floor`): 1 outside the bench, where
    /// nothing runs that program, so the map takes no memory.
    pub bench_slots: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes {
            links: DEFAULT_MAX_LINKS,
            endpoint_ports: DEFAULT_MAX_ENDPOINT_PORTS,
            services: DEFAULT_MAX_SERVICES,
            backends: DEFAULT_MAX_BACKENDS,
            rule_lists: DEFAULT_MAX_RULE_LISTS,
            rule_lists6: DEFAULT_MAX_RULE_LISTS6,
            allowlist: DEFAULT_MAX_ALLOWLIST,
            conntrack: DEFAULT_CONNTRACK_ENTRIES,
            conntrack6: DEFAULT_CONNTRACK6_ENTRIES,
            bench_slots: 1,
        }
    }
}

impl Sizes {
    /// Small maps for tests and demos (quick to allocate, still far above what they use).
    pub fn small() -> Self {
        Sizes {
            links: 1024,
            endpoint_ports: 4096,
            services: 64,
            backends: 256,
            rule_lists: 64,
            rule_lists6: 64,
            allowlist: 1024,
            conntrack: 65_536,
            conntrack6: 16_384,
            bench_slots: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Stub(#[from] object::StubError),
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("loading the XDP program (verifier): {0}")]
    Program(#[from] ProgramError),
    #[error("the object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("installing the IPv6 program: {0}")]
    Jump(std::io::Error),
    #[error("installing the IPv6 program: {0}")]
    JumpMap(aya::maps::MapError),
    #[error("installing the benchmark replay's target: {0}")]
    Replay(std::io::Error),
    #[error("installing the benchmark replay's target: {0}")]
    ReplayMap(aya::maps::MapError),
}

/// The loaded object: programs and maps, not yet attached anywhere.
pub struct Datapath {
    pub ebpf: Ebpf,
}

impl Datapath {
    /// Loads with fresh, unpinned maps.
    pub fn load(sizes: &Sizes) -> Result<Self, LoadError> {
        Self::load_with(sizes, None)
    }

    /// Loads reusing (or creating and pinning) every map under `pins`.
    pub fn load_pinned(sizes: &Sizes, pins: &crate::pins::Pins) -> Result<Self, LoadError> {
        Self::load_with(sizes, Some(pins))
    }

    fn load_with(sizes: &Sizes, pins: Option<&crate::pins::Pins>) -> Result<Self, LoadError> {
        let paths: Vec<(&str, std::path::PathBuf)> = pins
            .map(|p| names::ALL.iter().map(|n| (*n, p.map_path(n))).collect())
            .unwrap_or_default();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .map_max_entries(names::LINKS, sizes.links)
            .map_max_entries(names::LINK_STATS, sizes.links)
            .map_max_entries(names::ENDPOINT_IPS4, sizes.links)
            .map_max_entries(names::ENDPOINTS4, sizes.endpoint_ports)
            .map_max_entries(names::MAGLEV, sizes.services)
            .map_max_entries(names::BACKENDS4, sizes.backends)
            .map_max_entries(names::RULES4, sizes.rule_lists)
            .map_max_entries(names::ALLOWLIST, sizes.allowlist)
            .map_max_entries(names::CT4, sizes.conntrack)
            .map_max_entries(names::ENDPOINT_IPS6, sizes.links)
            .map_max_entries(names::ENDPOINTS6, sizes.endpoint_ports)
            .map_max_entries(names::MAGLEV6, sizes.services)
            .map_max_entries(names::BACKENDS6, sizes.backends)
            .map_max_entries(names::NEXTHOP4, sizes.backends)
            .map_max_entries(names::NEXTHOP6, sizes.backends)
            .map_max_entries(names::RULES6, sizes.rule_lists6)
            .map_max_entries(names::CT6, sizes.conntrack6)
            .map_max_entries(SLOTS, sizes.bench_slots)
            .load(object::bytes()?)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(LoadError::MissingProgram(PROGRAM))?
            .try_into()?;
        prog.load()?;
        let prog6: &mut Xdp = ebpf
            .program_mut(PROGRAM6)
            .ok_or(LoadError::MissingProgram(PROGRAM6))?
            .try_into()?;
        prog6.load()?;
        // Before anything attaches: IPv6 frames find their program from the first packet on
        // (a reused, pinned JUMP map gets this object's program in place of the old one).
        let fd = prog6.fd()?.try_clone().map_err(LoadError::Jump)?;
        let mut jump: ProgramArray<_> = ebpf
            .map_mut(names::JUMP)
            .ok_or(LoadError::MissingProgram(PROGRAM6))?
            .try_into()
            .map_err(LoadError::JumpMap)?;
        jump.set(0, &fd, 0).map_err(LoadError::JumpMap)?;
        let pass: &mut Xdp = ebpf
            .program_mut(PASS_PROGRAM)
            .ok_or(LoadError::MissingProgram(PASS_PROGRAM))?
            .try_into()?;
        pass.load()?;
        // The benchmark's programs (floor, generator, sink) load on first use, not here: an
        // agent never runs them.
        Ok(Datapath { ebpf })
    }

    pub fn program(&mut self) -> &mut Xdp {
        self.xdp(PROGRAM)
    }

    /// The pass-through program for redirect-target veth peers.
    pub fn pass_program(&mut self) -> &mut Xdp {
        self.xdp(PASS_PROGRAM)
    }

    /// The benchmark floor program.
    pub fn floor_program(&mut self) -> Result<&mut Xdp, LoadError> {
        self.bench_program(FLOOR_PROGRAM)
    }

    /// The benchmark load generator (see the eBPF crate's `bench.rs`).
    pub fn gen_program(&mut self) -> Result<&mut Xdp, LoadError> {
        self.bench_program(GEN_PROGRAM)
    }

    /// Sets the frame head the generator restores on every run: the first [`GEN_HEAD`] bytes of
    /// `frame` (the frame given to the live-frames test run).
    pub fn set_gen_frame(&mut self, frame: &[u8]) -> Result<(), aya::maps::MapError> {
        let mut head = [0u64; GEN_HEAD / 8];
        for (i, w) in head.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            for (j, x) in b.iter_mut().enumerate() {
                *x = frame.get(i * 8 + j).copied().unwrap_or(0);
            }
            *w = u64::from_ne_bytes(b);
        }
        let mut m: aya::maps::Array<_, [u64; GEN_HEAD / 8]> =
            self.bench_map_mut(GEN_FRAME)?.try_into()?;
        m.set(0, head, 0)
    }

    /// Turns the generator's new-flow sequence on or off. On, every frame gets a source (address,
    /// port) that no frame of this load had before (the sequence is never rewound).
    pub fn set_gen_new_flows(&mut self, on: bool) -> Result<(), aya::maps::MapError> {
        let mut m: aya::maps::Array<_, u64> = self.bench_map_mut(GEN_FLOWS)?.try_into()?;
        m.set(0, u64::from(on), 0)
    }

    /// Sets the generator's window for short connections and starts its counts from zero: at most
    /// `limit` connections pending (sent, not yet completed by the acker), `total` in all; frames
    /// beyond that are dropped unsent. A `limit` of 0 turns the window off (every frame is sent).
    pub fn set_gen_window(&mut self, limit: u64, total: u64) -> Result<(), aya::maps::MapError> {
        let mut w = [0u64; WINDOW_WORDS];
        w[WINDOW_LIMIT] = limit;
        w[WINDOW_TOTAL] = total;
        let mut m: aya::maps::Array<_, [u64; WINDOW_WORDS]> =
            self.bench_map_mut(GEN_WINDOW)?.try_into()?;
        m.set(0, w, 0)
    }

    /// The generator's window as it stands (indexes: `privatelink_common::bench::WINDOW_*`).
    pub fn gen_window(&self) -> Result<[u64; WINDOW_WORDS], aya::maps::MapError> {
        let m: aya::maps::Array<_, [u64; WINDOW_WORDS]> = self.bench_map(GEN_WINDOW)?.try_into()?;
        m.get(&0, 0)
    }

    /// The benchmark replay, handing every frame (its head restored from the generator's frame,
    /// with the generator's new-flow sequence when that is on) to `target`: the datapath
    /// ([`PROGRAM`]) or the floor ([`FLOOR_PROGRAM`]). Run it with repeat > 1.
    pub fn replay_into(&mut self, target: &'static str) -> Result<&mut Xdp, LoadError> {
        let fd = self
            .bench_program(target)?
            .fd()?
            .try_clone()
            .map_err(LoadError::Replay)?;
        let mut jump: ProgramArray<_> = self
            .ebpf
            .map_mut(REPLAY_JUMP)
            .ok_or(LoadError::MissingProgram(REPLAY_PROGRAM))?
            .try_into()
            .map_err(LoadError::ReplayMap)?;
        jump.set(0, &fd, 0).map_err(LoadError::ReplayMap)?;
        self.bench_program(REPLAY_PROGRAM)
    }

    /// The benchmark responder (see the eBPF crate's `bench.rs`).
    pub fn responder_program(&mut self) -> Result<&mut Xdp, LoadError> {
        self.bench_program(RESPONDER_PROGRAM)
    }

    /// The benchmark sink (counts and drops).
    pub fn sink_program(&mut self) -> Result<&mut Xdp, LoadError> {
        self.bench_program(SINK_PROGRAM)
    }

    /// A benchmark program (by name), loaded (through the verifier) the first time it is asked for.
    pub fn bench_program(&mut self, name: &'static str) -> Result<&mut Xdp, LoadError> {
        let p: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?
            .try_into()?;
        if p.fd().is_err() {
            p.load()?;
        }
        Ok(p)
    }

    /// Frames the sink has dropped so far, all CPUs.
    pub fn sink_count(&self) -> Result<u64, aya::maps::MapError> {
        self.bench_counter(privatelink_common::bench::SINK_COUNTED)
    }

    /// SYNs the responder has answered so far, all CPUs.
    pub fn responder_count(&self) -> Result<u64, aya::maps::MapError> {
        self.bench_counter(privatelink_common::bench::SINK_RESPONDED)
    }

    /// Starts the sink's clock again: every CPU's samples zeroed (see
    /// `privatelink_common::bench::CLOCK_WORDS`).
    pub fn reset_sink_clock(&mut self) -> Result<(), aya::maps::MapError> {
        let mut m: aya::maps::PerCpuArray<_, [u64; CLOCK_WORDS]> =
            self.bench_map_mut(SINK_CLOCK)?.try_into()?;
        // As many values as the map has CPUs.
        let cpus = m.get(&0, 0)?.len();
        let zero = aya::maps::PerCpuValues::try_from(vec![[0u64; CLOCK_WORDS]; cpus])?;
        m.set(0, zero, 0)
    }

    /// What the sink counted between its clock's first and latest samples since
    /// [`Self::reset_sink_clock`]: (frames, nanoseconds), summed over the CPUs that sampled twice
    /// (frames) and from the earliest first to the latest last sample (time).
    pub fn sink_clock(&self) -> Result<(u64, u64), aya::maps::MapError> {
        let m: aya::maps::PerCpuArray<_, [u64; CLOCK_WORDS]> =
            self.bench_map(SINK_CLOCK)?.try_into()?;
        let (mut frames, mut first, mut last) = (0, u64::MAX, 0);
        for c in m.get(&0, 0)?.iter().filter(|c| c[CLOCK_LAST_NS] != 0) {
            frames += c[CLOCK_LAST_COUNT] - c[CLOCK_FIRST_COUNT];
            first = first.min(c[CLOCK_FIRST_NS]);
            last = last.max(c[CLOCK_LAST_NS]);
        }
        Ok((frames, last.saturating_sub(first)))
    }

    /// `SINK[index]` summed over the CPUs.
    fn bench_counter(&self, index: u32) -> Result<u64, aya::maps::MapError> {
        let m: aya::maps::PerCpuArray<_, u64> = self.bench_map(SINK)?.try_into()?;
        Ok(m.get(&index, 0)?.iter().sum())
    }

    /// A benchmark map by name (an object without it is a build mismatch, reported as such).
    fn bench_map(&self, name: &str) -> Result<&aya::maps::Map, aya::maps::MapError> {
        self.ebpf
            .map(name)
            .ok_or_else(|| aya::maps::MapError::InvalidName { name: name.into() })
    }

    /// The same, writable.
    fn bench_map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map, aya::maps::MapError> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| aya::maps::MapError::InvalidName { name: name.into() })
    }

    fn xdp(&mut self, name: &str) -> &mut Xdp {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Datapath::load")
    }
}

/// Kernel-side size of one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapMemory {
    pub name: String,
    pub max_entries: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// Bytes the kernel charges for the map (`memlock` in its fdinfo).
    pub memlock: u64,
}

/// Sizes of every map of a loaded object, as the kernel accounts them.
pub fn map_memory(ebpf: &Ebpf) -> std::io::Result<Vec<MapMemory>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};

    use aya::maps::Map;
    let mut out = Vec::new();
    for (name, map) in ebpf.maps() {
        let data = match map {
            Map::Array(d)
            | Map::HashMap(d)
            | Map::LruHashMap(d)
            | Map::PerCpuArray(d)
            | Map::PerCpuHashMap(d)
            | Map::DevMapHash(d) => d,
            _ => continue,
        };
        let info = data.info().map_err(std::io::Error::other)?;
        let fd = info.fd().map_err(std::io::Error::other)?;
        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
        let memlock = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        out.push(MapMemory {
            name: name.to_string(),
            max_entries: info.max_entries(),
            key_size: info.key_size(),
            value_size: info.value_size(),
            memlock,
        });
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.memlock));
    Ok(out)
}
