//! The one place that names the toolchain the eBPF crate is built with (used by the agent's build
//! script and by `cargo xtask setup`).

/// rustup toolchain for the eBPF build (needs `rust-src` for `-Z build-std=core`).
pub const EBPF_TOOLCHAIN: &str = "nightly";
/// bpf-linker version built against that toolchain's own libLLVM.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Environment variable that makes the agent's build script write an empty stub instead of building
/// the eBPF object (for `cargo check`, clippy and pure unit tests on machines without bpf-linker).
pub const SKIP_EBPF_ENV: &str = "PRIVATELINK_SKIP_EBPF";
