//! Builds the benchmark object (`privatelink-bench`: the eBPF crate with its `bench` feature) into
//! `OUT_DIR` for [`benchkit`](src/benchkit.rs), or an empty stub with `PRIVATELINK_SKIP_EBPF=1`.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use privatelink_common::toolchain::{EBPF_TOOLCHAIN, SKIP_EBPF_ENV};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={SKIP_EBPF_ENV}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    if env::var(SKIP_EBPF_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        fs::write(out_dir.join("privatelink-bench"), []).context("writing the stub")?;
        return Ok(());
    }
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../privatelink-ebpf");
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../privatelink-common").display()
    );
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to the eBPF crate")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "privatelink-ebpf",
            root_dir: ebpf_dir,
            features: &["bench"],
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the benchmark object (run `cargo xtask setup` if bpf-linker is missing)")
}
