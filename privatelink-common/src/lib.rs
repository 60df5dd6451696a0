//! Map keys, values and constants shared by the XDP datapath and the agent.
//!
//! Rules for every type here (the kernel reads these bytes, not Rust's idea of them):
//! - `#[repr(C)]`, explicit padding fields, no `bool`, `Option` or Rust enums: integer codes instead.
//! - Byte order is in the field name: `_be` is network order (as on the wire), everything else is host
//!   order.
//! - Each type has a compile-time size assertion, so a layout change cannot slip through silently.
//! - With the `user` feature, each type is `aya::Pod` and `bytemuck::Pod` for the agent; the eBPF crate
//!   never enables it.
//!
//! Maps are split per address family like Cilium's CT4/CT6, so the IPv4 path hashes 20-byte keys
//! rather than 44-byte ones; conntrack keys and values are one generic type per family.
#![no_std]

pub mod bench;
#[cfg(feature = "build")]
pub mod build;
pub mod maps;
pub mod reasons;
pub mod stats;
pub mod toolchain;

pub use maps::*;
pub use reasons::*;
pub use stats::*;

/// Asserts the size of a shared type at compile time.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}

/// Implements `aya::Pod` and bytemuck's traits for shared types (userspace only).
#[cfg(feature = "user")]
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: the type is repr(C), has explicit padding and only integer fields, so every bit
            // pattern is valid and there are no uninitialised bytes.
            unsafe impl aya::Pod for $t {}
            // SAFETY: as above.
            unsafe impl bytemuck::Zeroable for $t {}
            // SAFETY: as above.
            unsafe impl bytemuck::Pod for $t {}
        )*
    };
}
#[cfg(feature = "user")]
pub(crate) use user_pod;
