//! Builds the eBPF crate's `privatelink` object into `OUT_DIR` (see `privatelink_common::build`).
//! Only the node runtime embeds it: the CLI alone (`--no-default-features --features cli`) and
//! the control plane build without the nightly toolchain and bpf-linker.
fn main() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_FEATURE_NODE").is_none() {
        return Ok(());
    }
    privatelink_common::build::ebpf_objects("privatelink", &[])
}
