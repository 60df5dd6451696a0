//! Builds the eBPF crate on the eBPF toolchain with aya-build (BTF included) into `OUT_DIR`, or writes
//! an empty stub when `PRIVATELINK_SKIP_EBPF=1` so that check, clippy and unit tests work without
//! bpf-linker. Loading the stub fails with an error that names the missing step. Without the `node`
//! feature nothing is built.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use privatelink_common::toolchain::{EBPF_TOOLCHAIN, SKIP_EBPF_ENV};

const OBJECT: &str = "privatelink";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={SKIP_EBPF_ENV}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    // Only the node runtime embeds the object: the CLI alone (`--no-default-features --features
    // cli`) and the control plane build without the nightly toolchain and bpf-linker.
    if env::var_os("CARGO_FEATURE_NODE").is_none() {
        return Ok(());
    }
    let skip = env::var(SKIP_EBPF_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:warning={SKIP_EBPF_ENV} is set: embedding an empty eBPF stub");
        fs::write(out_dir.join(OBJECT), []).context("writing the eBPF stub")?;
        return Ok(());
    }
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../privatelink-ebpf");
    let common_dir = manifest.join("../privatelink-common");
    // The object also depends on the shared types.
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to the eBPF crate")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "privatelink-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the eBPF crate (run `cargo xtask setup` if the nightly toolchain, rust-src or bpf-linker is missing)")
}
