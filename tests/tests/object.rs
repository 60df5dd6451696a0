//! The eBPF object as built: what its instructions call.
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SymbolKind};

/// LLVM emits some copies and clears as calls to these, and the BPF backend turns each call into
/// a BPF-to-BPF call into a loop that moves one byte per iteration (see `privatelink-ebpf`'s
/// `mem` module): hundreds of instructions for a flow entry on a path that should have none.
const BYTE_LOOPS: [&str; 5] = ["memset", "memmove", "memcpy", "memcmp", "bcmp"];

#[test]
fn no_program_calls_the_byte_loop_memset_memmove_or_memcpy() {
    let bytes = privatelink_agent::object::bytes().expect("the eBPF object is built");
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
