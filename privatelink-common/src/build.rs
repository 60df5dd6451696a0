//! The eBPF objects' build, for the build scripts that embed them (the agent's: `privatelink`;
//! the tests crate's: `privatelink-bench`). Feature `build`, for build scripts only.
extern crate std;

use std::{env, fs, path::PathBuf, println};

use anyhow::{Context as _, anyhow};

use crate::toolchain::{EBPF_TOOLCHAIN, SKIP_EBPF_ENV};

/// Builds the eBPF crate's objects (its binaries, with `features`) into `OUT_DIR` with aya-build
/// on the eBPF toolchain, BTF included; with `PRIVATELINK_SKIP_EBPF=1`, writes `object` as an
/// empty stub instead (loading a stub fails with an error that names the missing step).
pub fn ebpf_objects(object: &str, features: &[&str]) -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={SKIP_EBPF_ENV}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    if env::var(SKIP_EBPF_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!("cargo:warning={SKIP_EBPF_ENV} is set: embedding an empty {object} stub");
        fs::write(out_dir.join(object), []).context("writing the eBPF stub")?;
        return Ok(());
    }
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    // The objects also depend on the shared types.
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../privatelink-common").display()
    );
    let ebpf_dir = manifest.join("../privatelink-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to the eBPF crate")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "privatelink-ebpf",
            root_dir: ebpf_dir,
            features,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the eBPF crate (run `cargo xtask setup` if the nightly toolchain, rust-src or bpf-linker is missing)")
}
