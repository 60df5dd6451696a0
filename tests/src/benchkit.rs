//! The benchmark object (`privatelink-bench`, built from the eBPF crate with its `bench` feature
//! by this crate's build script) and its loader. The agent's object carries none of it.
//!
//! [`Bench::load`] loads it beside a loaded [`Datapath`] and shares every datapath map with it
//! (pinned under a scratch directory in bpffs, reused by name, unpinned again): the floors read
//! the datapath's own conntrack and interfaces, and [`Bench::replay_into`] tail-calls the very
//! program the agent loads.
use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::ProgramArray,
    programs::{ProgramError, Xdp},
};
use privatelink_agent::datapath::loader::Datapath;
pub use privatelink_agent::datapath::loader::{PROGRAM, PROGRAM6};

static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/privatelink-bench"));

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
use privatelink_common::bench::{
    CLOCK_FIRST_COUNT, CLOCK_FIRST_NS, CLOCK_LAST_COUNT, CLOCK_LAST_NS, CLOCK_WORDS, WINDOW_LIMIT,
    WINDOW_TOTAL, WINDOW_WORDS,
};
pub use privatelink_common::bench::{GEN_HEAD, SLOT_TABLE_ENTRIES};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("this build embeds an empty benchmark object (PRIVATELINK_SKIP_EBPF=1)")]
    Stub,
    #[error("loading the benchmark object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("loading a benchmark program (verifier): {0}")]
    Program(#[from] ProgramError),
    #[error("the benchmark object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("sharing the datapath's maps: {0}")]
    Share(std::io::Error),
    #[error("installing the benchmark replay's target: {0}")]
    Replay(std::io::Error),
    #[error("benchmark map: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// The loaded benchmark object.
pub struct Bench {
    pub ebpf: Ebpf,
}

/// A bpffs of its own, mounted on a scratch directory (a fresh machine may have none at
/// /sys/fs/bpf), unmounted and removed with what is pinned in it.
struct Scratch(PathBuf);

impl Scratch {
    fn mount(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let scratch = Scratch(dir);
        nix::mount::mount(
            Some("bpf"),
            &scratch.0,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(std::io::Error::from)?;
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

impl Bench {
    /// Loads the benchmark object beside `dp`, sharing `dp`'s maps, with `slots` slots in
    /// `slot_floor`'s open-addressing table (1 when that program is not measured).
    pub fn load(dp: &Datapath, slots: u32) -> Result<Self, BenchError> {
        if OBJECT.is_empty() {
            return Err(BenchError::Stub);
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let scratch = Scratch::mount(std::env::temp_dir().join(format!(
            "privatelink-bench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )))
        .map_err(BenchError::Share)?;
        // The datapath's maps as the kernel has them: every map its two programs use (whoever
        // holds them in userspace now, e.g. a `Dataplane` that took them from `dp`).
        let mut ids = std::collections::BTreeSet::new();
        for name in [PROGRAM, PROGRAM6] {
            let prog = dp
                .ebpf
                .program(name)
                .ok_or(BenchError::MissingProgram(name))?;
            ids.extend(prog.info()?.map_ids()?.unwrap_or_default());
        }
        // Kernel map names are cut at 15 bytes: matched against the object's own map names.
        let object = object::File::parse(OBJECT)
            .map_err(|e| BenchError::Share(std::io::Error::other(e.to_string())))?;
        let object_maps: Vec<String> = {
            use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
            object
                .symbols()
                .filter(|s| {
                    s.section_index()
                        .and_then(|i| object.section_by_index(i).ok())
                        .is_some_and(|sec| sec.name() == Ok("maps"))
                })
                .filter_map(|s| s.name().ok().map(str::to_string))
                .collect()
        };
        let mut paths = Vec::new();
        for id in ids {
            let map = aya::maps::MapData::from_id(id)?;
            let kernel_name = map.info()?.name_as_str().unwrap_or_default().to_string();
            let Some(full) = object_maps.iter().find(|n| {
                **n == kernel_name || (kernel_name.len() == 15 && n.starts_with(&kernel_name))
            }) else {
                continue;
            };
            let path = scratch.0.join(full);
            map.pin(&path)
                .map_err(|e| BenchError::Share(std::io::Error::other(e.to_string())))?;
            paths.push((full.clone(), path));
        }
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        let ebpf = loader.map_max_entries(SLOTS, slots).load(OBJECT)?;
        Ok(Bench { ebpf })
    }

    /// The benchmark floor program.
    pub fn floor_program(&mut self) -> Result<&mut Xdp, BenchError> {
        self.bench_program(FLOOR_PROGRAM)
    }

    /// The benchmark load generator (see the eBPF crate's `bench.rs`).
    pub fn gen_program(&mut self) -> Result<&mut Xdp, BenchError> {
        self.bench_program(GEN_PROGRAM)
    }

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
    /// with the generator's new-flow sequence when that is on) to `target`: a program of the
    /// datapath `dp` the agent loads ([`PROGRAM`]: the very program, not a copy) or of this
    /// object ([`FLOOR_PROGRAM`]). Run it with repeat > 1.
    pub fn replay_into(
        &mut self,
        dp: &mut Datapath,
        target: &'static str,
    ) -> Result<&mut Xdp, BenchError> {
        // The datapath's programs are the loaded datapath's own; every other target (the floors)
        // is this object's.
        let fd = if target == PROGRAM || target == PROGRAM6 {
            let p: &mut Xdp = dp
                .ebpf
                .program_mut(target)
                .ok_or(BenchError::MissingProgram(target))?
                .try_into()?;
            p.fd()?.try_clone().map_err(BenchError::Replay)?
        } else {
            self.bench_program(target)?
                .fd()?
                .try_clone()
                .map_err(BenchError::Replay)?
        };
        let mut jump: ProgramArray<_> = self
            .ebpf
            .map_mut(REPLAY_JUMP)
            .ok_or(BenchError::MissingProgram(REPLAY_PROGRAM))?
            .try_into()?;
        jump.set(0, &fd, 0)?;
        self.bench_program(REPLAY_PROGRAM)
    }

    /// The benchmark responder (see the eBPF crate's `bench.rs`).
    pub fn responder_program(&mut self) -> Result<&mut Xdp, BenchError> {
        self.bench_program(RESPONDER_PROGRAM)
    }

    /// The benchmark sink (counts and drops).
    pub fn sink_program(&mut self) -> Result<&mut Xdp, BenchError> {
        self.bench_program(SINK_PROGRAM)
    }

    /// A benchmark program (by name), loaded (through the verifier) the first time it is asked for.
    pub fn bench_program(&mut self, name: &'static str) -> Result<&mut Xdp, BenchError> {
        let p: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(BenchError::MissingProgram(name))?
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
}
