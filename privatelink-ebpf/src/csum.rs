//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Values are read natively from wire bytes (`from_ne_bytes`); the one's-complement sum does not
//! depend on byte order as long as every word is read the same way, so no swaps are needed.

/// Accumulates the difference of 16-bit words replaced in a checksummed region. The sum is kept
/// in 64 bits and folded once, when it is applied: a 32-bit field adds as one word (2^32 is 1
/// modulo 0xffff, so a sum of 32-bit words folds to the sum of their 16-bit halves), which spares
/// every address and sequence number two splits per change.
#[derive(Clone, Copy, Default)]
pub struct Delta(u64);

impl Delta {
    #[inline(always)]
    pub const fn new() -> Self {
        Delta(0)
    }

    /// A 32-bit field (two words) changed from `old` to `new`.
    #[inline(always)]
    pub fn u32(self, old: u32, new: u32) -> Self {
        Delta(self.0 + u64::from(!old) + u64::from(new))
    }

    /// A 16-bit word changed from `old` to `new`.
    #[inline(always)]
    pub fn u16(self, old: u16, new: u16) -> Self {
        Delta(self.0 + u64::from(!old) + u64::from(new))
    }

    /// Words that were not there before (inserted bytes) and sum to `s`.
    #[inline(always)]
    pub fn added(self, s: u32) -> Self {
        Delta(self.0 + u64::from(s))
    }

    /// This delta for bytes one position off the checksum's word boundaries: a one's-complement
    /// sum of byte-swapped words is the byte-swapped sum (RFC 1071).
    #[inline(always)]
    pub fn swapped(self) -> Self {
        Delta(u64::from(fold(self.0).swap_bytes()))
    }

    /// Both deltas together.
    #[inline(always)]
    pub fn plus(self, other: Delta) -> Self {
        // Each term is below 2^32 and a packet adds a few dozen: no overflow.
        Delta(self.0 + other.0)
    }

    /// The checksum after the changes, given the checksum before.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !fold(u64::from(!check) + self.0)
    }
}

/// A 64-bit sum of words folded to 16 bits with end-around carries.
#[inline(always)]
fn fold(s: u64) -> u16 {
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
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
    !fold(u64::from(s))
}
