//! Loading the embedded object with map sizes chosen at load time.
use aya::{
    Ebpf, EbpfLoader,
    maps::ProgramArray,
    programs::{ProgramError, Xdp},
};
use privatelink_common::{
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_CONNTRACK6_ENTRIES, DEFAULT_MAX_ALLOWLIST,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_ENDPOINT_PORTS, DEFAULT_MAX_LINKS, DEFAULT_MAX_RULE_LISTS,
    DEFAULT_MAX_RULE_LISTS6, DEFAULT_MAX_SERVICES, LinkInfo, NAT_SLOTS, NatRange4, NatRange6,
    OUTCOMES, names,
};

use crate::datapath::object;

/// Program name of the datapath entry point in the object.
pub const PROGRAM: &str = "privatelink";
/// Program name of the IPv6 datapath, tail-called by the datapath through the `JUMP` map.
pub const PROGRAM6: &str = "privatelink6";
/// Program name of the pass-through program for veth peers that receive redirects.
pub const PASS_PROGRAM: &str = "pass";
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
    #[error("pinned maps: {0}")]
    Pins(String),
    #[error("the object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("installing the IPv6 program: {0}")]
    Jump(std::io::Error),
    #[error("installing the IPv6 program: {0}")]
    JumpMap(aya::maps::MapError),
}

/// The loaded object: programs and maps, not yet attached anywhere.
pub struct Datapath {
    pub ebpf: Ebpf,
}

impl Datapath {
    /// Loads with fresh, unpinned maps.
    pub fn load(sizes: &Sizes) -> Result<Self, LoadError> {
        Self::load_with(object::bytes()?, sizes, None)
    }

    /// Loads another build's object (`privatelink-agent`'s embedded one is [`Self::load`]), with
    /// fresh maps: for comparing two builds in one process.
    pub fn load_object(elf: &[u8], sizes: &Sizes) -> Result<Self, LoadError> {
        Self::load_with(elf, sizes, None)
    }

    /// Loads reusing (or creating and pinning) every map under `pins`.
    pub fn load_pinned(
        sizes: &Sizes,
        pins: &crate::datapath::pins::Pins,
    ) -> Result<Self, LoadError> {
        Self::load_with(object::bytes()?, sizes, Some(pins))
    }

    fn load_with(
        elf: &[u8],
        sizes: &Sizes,
        pins: Option<&crate::datapath::pins::Pins>,
    ) -> Result<Self, LoadError> {
        if let Some(p) = pins {
            let resized = [
                (names::GLOBAL_STATS, OUTCOMES, size_of::<u64>()),
                (names::LINKS, sizes.links, size_of::<LinkInfo>()),
                // Twice the entries since the consumer networks' NAT slices (the agent rewrites
                // them whole).
                (names::NAT4, NAT_SLOTS, size_of::<NatRange4>()),
                (names::NAT6, NAT_SLOTS, size_of::<NatRange6>()),
            ];
            for (name, entries, value_size) in resized {
                p.drop_resized(name, entries, value_size as u32)
                    .map_err(|e| LoadError::Pins(format!("{e:#}")))?;
            }
        }
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
            .map_max_entries(names::LINK_OPENED, sizes.links)
            .map_max_entries(names::LINK_RETIRED, sizes.links)
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
            .load(elf)?;
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
        Ok(Datapath { ebpf })
    }

    pub fn program(&mut self) -> &mut Xdp {
        self.xdp(PROGRAM)
    }

    /// The pass-through program for redirect-target veth peers.
    pub fn pass_program(&mut self) -> &mut Xdp {
        self.xdp(PASS_PROGRAM)
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
