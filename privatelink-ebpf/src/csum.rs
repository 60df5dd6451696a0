//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Values are read natively from wire bytes (`from_ne_bytes`); the one's-complement sum does not
//! depend on byte order as long as every word is read the same way, so no swaps are needed.

/// Accumulates the difference of 16-bit words replaced in a checksummed region.
#[derive(Clone, Copy, Default)]
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

    /// Words that were not there before (inserted bytes) and sum to `s`.
    #[inline(always)]
    pub fn added(self, s: u32) -> Self {
        Delta(self.0 + fold32(s))
    }

    /// This delta for bytes one position off the checksum's word boundaries: a one's-complement
    /// sum of byte-swapped words is the byte-swapped sum (RFC 1071).
    #[inline(always)]
    pub fn swapped(self) -> Self {
        Delta(fold16(self.0).swap_bytes() as u32)
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

/// The one's-complement sum of a byte array as 16-bit words read natively (`N` even).
#[inline(always)]
pub fn sum<const N: usize>(b: &[u8; N]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < N {
        s += u16::from_ne_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    s
}

/// The checksum field for a region whose words sum to `s`.
#[inline(always)]
pub fn finish(s: u32) -> u16 {
    !fold16(s)
}
