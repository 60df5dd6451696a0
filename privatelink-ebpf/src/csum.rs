//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Values are read natively from wire bytes (`from_ne_bytes`); the one's-complement sum does not
//! depend on byte order as long as every word is read the same way, so no swaps are needed.

/// Accumulates the difference of 16-bit words replaced in a checksummed region.
#[derive(Clone, Copy)]
pub struct Delta(u32);

impl Delta {
    #[inline(always)]
    pub const fn new() -> Self {
        Delta(0)
    }

    /// A 32-bit field (two words) changed from `old` to `new`.
    #[inline(always)]
    pub fn u32(self, old: u32, new: u32) -> Self {
        Delta(self.0 + (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16))
    }

    /// A 16-bit word changed from `old` to `new`.
    #[inline(always)]
    pub fn u16(self, old: u16, new: u16) -> Self {
        Delta(self.0 + (!old) as u32 + new as u32)
    }

    /// Both deltas together.
    #[inline(always)]
    pub fn plus(self, other: Delta) -> Self {
        // Each delta stays well below 2^20 (a handful of words), so the sum cannot overflow.
        Delta(fold32(self.0) + fold32(other.0))
    }

    /// The checksum after the changes, given the checksum before.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !fold16((!check) as u32 + fold32(self.0))
    }
}

#[inline(always)]
fn fold32(s: u32) -> u32 {
    (s & 0xffff) + (s >> 16)
}

#[inline(always)]
fn fold16(s: u32) -> u16 {
    let s = (s & 0xffff) + (s >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}
