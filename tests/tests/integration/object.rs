//! The eBPF object as built: what its instructions call.
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SymbolKind};

/// LLVM emits some copies and clears as calls to these, and the BPF backend turns each call into
/// a BPF-to-BPF call into a loop that moves one byte per iteration (see `privatelink-ebpf`'s
/// `mem` module): hundreds of instructions for a flow entry on a path that should have none.
const BYTE_LOOPS: [&str; 5] = ["memset", "memmove", "memcpy", "memcmp", "bcmp"];

#[test]
fn no_program_calls_the_byte_loop_memset_memmove_or_memcpy() {
    let bytes = privatelink_agent::datapath::object::bytes().expect("the eBPF object is built");
    let file = object::File::parse(bytes).expect("the eBPF object is ELF");
    let mut calls = Vec::new();
    let mut relocations = 0;
    for section in file.sections() {
        let functions: Vec<(u64, u64, String)> = file
            .symbols()
            .filter(|s| s.section_index() == Some(section.index()) && s.kind() == SymbolKind::Text)
            .map(|s| {
                let name = s.name().unwrap_or("?").to_string();
                (s.address(), s.address() + s.size(), name)
            })
            .collect();
        for (offset, rel) in section.relocations() {
            relocations += 1;
            let RelocationTarget::Symbol(i) = rel.target() else {
                continue;
            };
            let target = file
                .symbol_by_index(i)
                .ok()
                .and_then(|s| s.name().ok())
                .unwrap_or("");
            if BYTE_LOOPS.contains(&target) {
                let caller = functions
                    .iter()
                    .find(|(start, end, _)| (*start..*end).contains(&offset))
                    .map_or("?", |f| f.2.as_str());
                calls.push(format!(
                    "{caller} calls {target} at {}+{offset:#x}",
                    section.name().unwrap_or("?")
                ));
            }
        }
    }
    // The walk saw the map and helper relocations, so an empty list means something.
    assert!(
        relocations > 100,
        "only {relocations} relocations in the object: the walk is broken"
    );
    assert!(
        calls.is_empty(),
        "byte-loop calls in the eBPF object (write the copy with `mem::copy_mac`, `mem::copy`, \
         `mem::write` or `mem::zero` instead):\n{}",
        calls.join("\n")
    );
}

/// The datapath programs run as one function each: a BPF-to-BPF call (a subprogram LLVM chose not
/// to inline, such as the body behind the `#[xdp]` entry once it grows) costs a call and a return
/// per packet. A call is `BPF_JMP | BPF_CALL` (0x85) with source register `BPF_PSEUDO_CALL` (1),
/// to a function in the same section or, relocated, in another. (The NAT port search's `bpf_loop`
/// callback is a function of its own by design; it runs only once a new flow's first port is
/// taken, and a callback is passed by address, not called.)
#[test]
fn the_datapath_programs_make_no_bpf_to_bpf_calls() {
    let bytes = privatelink_agent::datapath::object::bytes().expect("the eBPF object is built");
    let file = object::File::parse(bytes).expect("the eBPF object is ELF");
    for program in ["privatelink", "privatelink6"] {
        let sym = file
            .symbols()
            .find(|s| s.name() == Ok(program) && s.kind() == SymbolKind::Text)
            .unwrap_or_else(|| panic!("no function {program} in the object"));
        let section = file
            .section_by_index(sym.section_index().expect("a section"))
            .expect("its section");
        let code = section.data().expect("section bytes");
        let start = sym.address() as usize;
        let insns = &code[start..start + sym.size() as usize];
        let calls: Vec<usize> = insns
            .chunks_exact(8)
            .enumerate()
            .filter(|(_, i)| i[0] == 0x85 && i[1] >> 4 == 1)
            .map(|(n, _)| n)
            .collect();
        assert!(
            calls.is_empty(),
            "{program} calls subprograms at instructions {calls:?}: mark what it calls \
             #[inline(always)]"
        );
        // The walk read the program itself, not an empty symbol.
        assert!(insns.len() > 8_000, "{program}: only {} bytes", insns.len());
    }
}

/// What the agent loads is the datapath and nothing else: its programs and maps, named here one
/// by one. The benchmark programs and their maps live in the `privatelink-bench` object.
#[test]
fn the_production_object_holds_exactly_the_datapath_programs_and_maps() {
    const PROGRAMS: [&str; 3] = ["pass", "privatelink", "privatelink6"];
    const MAPS: [&str; 55] = [
        "ALLOWLIST",
        "BACKENDS4",
        "BACKENDS6",
        "CONFIG",
        "CONN_LOG",
        "CONN_LOG_STATS",
        "CONN_NEW4",
        "CONN_NEW6",
        "CONN_STATS4",
        "CONN_STATS6",
        "CT4",
        "CT6",
        "DEVMAP",
        "ENDPOINTS4",
        "ENDPOINTS6",
        "ENDPOINT_IPS4",
        "ENDPOINT_IPS6",
        "ERROR_KEY6",
        "FIB_SCRATCH",
        "FLOW_CACHE4",
        "FLOW_CACHE6",
        "FLOW_CACHE_STATS",
        "FLOW_COPY4",
        "FLOW_COPY6",
        "FLOW_SYNC",
        "FLOW_SYNC_ON",
        "FLOW_SYNC_STATS",
        "GLOBAL_STATS",
        "HANDOFF6",
        "IFACES",
        "IFACE_INDEX",
        "JUMP",
        "KEY_SCRATCH4",
        "LINKS",
        "LINK_DROPS",
        "LINK_OPENED",
        "LINK_RETIRED",
        "LINK_STATS",
        "MAGLEV",
        "MAGLEV6",
        "NAT4",
        "NAT6",
        "NAT_PROBE4",
        "NAT_PROBE6",
        "NEXTHOP4",
        "NEXTHOP6",
        "PROXY_PENDING4",
        "PROXY_PENDING6",
        "PROXY_SCRATCH",
        "PROXY_STATS",
        "PROXY_TLVS",
        "RULES4",
        "RULES6",
        "SCRATCH6",
        "TICK_CLOCK",
    ];
    let bytes = privatelink_agent::datapath::object::bytes().expect("the eBPF object is built");
    let file = object::File::parse(bytes).expect("the eBPF object is ELF");
    let in_section = |prefix: &str, kind: SymbolKind| {
        let mut names: Vec<String> = file
            .symbols()
            .filter(|s| s.kind() == kind)
            .filter(|s| {
                s.section_index()
                    .and_then(|i| file.section_by_index(i).ok())
                    .and_then(|sec| sec.name().ok().map(|n| n.starts_with(prefix)))
                    .unwrap_or(false)
            })
            .filter_map(|s| s.name().ok().map(str::to_string))
            .collect();
        names.sort();
        names
    };
    assert_eq!(in_section("xdp", SymbolKind::Text), PROGRAMS, "programs");
    assert_eq!(in_section("maps", SymbolKind::Data), MAPS, "maps");
    // Every pinned map is one of them (the pin list and the object cannot drift apart).
    for name in privatelink_common::names::ALL {
        assert!(
            MAPS.contains(name),
            "{name} is pinned but not in the object"
        );
    }
}
