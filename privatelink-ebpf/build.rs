use which::which;

/// Rebuild when bpf-linker changes: `cargo xtask setup` rebuilds it when the nightly's LLVM changes,
/// and an object linked by a stale linker must not survive that.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
