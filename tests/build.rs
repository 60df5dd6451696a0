//! Builds the benchmark object (`privatelink-bench`: the eBPF crate with its `bench` feature) into
//! `OUT_DIR` for `benchkit` (see `privatelink_common::build`).
fn main() -> anyhow::Result<()> {
    privatelink_common::build::ebpf_objects("privatelink-bench", &["bench"])
}
