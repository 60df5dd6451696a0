//! The embedded eBPF object.
use aya::include_bytes_aligned;

static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/privatelink"));

/// The eBPF object, or an error when this binary embeds the stub.
pub fn bytes() -> Result<&'static [u8], StubError> {
    if OBJECT.is_empty() {
        Err(StubError)
    } else {
        Ok(OBJECT)
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "this binary embeds an empty eBPF stub (built with PRIVATELINK_SKIP_EBPF=1): run `cargo xtask setup` \
     to install the nightly toolchain and bpf-linker, then rebuild without PRIVATELINK_SKIP_EBPF"
)]
pub struct StubError;
