//! Copies and clears on the packet paths, written so they stay inline.
//!
//! An assignment of a byte array, an address or a struct, or a zeroed struct, becomes a `memmove`
//! or `memset` (MemCpyOpt turns a copy of a copy into a `memmove` when it cannot tell a map value
//! from a stack copy), and this LLVM's BPF backend emits both as BPF-to-BPF calls into a loop that
//! moves one byte per iteration: about 50 instructions for a MAC address and over 200 for a flow
//! entry. A plain `memcpy` is expanded inline, so MAC addresses go through
//! `copy_nonoverlapping`; words are written with volatile stores, which no pass merges or
//! rewrites.
use core::{mem::MaybeUninit, ptr};

/// `*dst = *src` for a MAC address.
#[inline(always)]
pub fn copy_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
    // SAFETY: a shared and a mutable reference never overlap.
    unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), 6) }
}

/// `*dst = [0; 6]`.
#[inline(always)]
pub fn zero_mac(dst: &mut [u8; 6]) {
    let p = dst.as_mut_ptr();
    for i in 0..6 {
        // SAFETY: in bounds of the array.
        unsafe { ptr::write_volatile(p.add(i), 0) };
    }
}

/// Stores `size_of::<T>() / 4` words from `src` (`None`: zeroes) to `dst`. `T`'s size and
/// alignment are multiples of 4 (checked at compile time), and `T` has no implicit padding: every
/// type this is used with is a `privatelink-common` type, whose padding is spelled out as fields
/// and whose size assertion would fail if the compiler added any, or an integer array.
///
/// # Safety
/// `dst` is valid for writes of a `T`; with `None`, all-zero bytes are a valid `T`.
#[inline(always)]
unsafe fn store_words<T: Copy>(dst: *mut T, src: Option<&T>) {
    const {
        assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4);
    }
    let d = dst.cast::<u32>();
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: in bounds of `*src`, aligned (checked above), and initialised (no implicit
        // padding, see above).
        let w = src.map_or(0, |s| unsafe {
            ptr::read((s as *const T).cast::<u32>().add(i))
        });
        // SAFETY: in bounds of `*dst`, aligned; the caller vouches for it.
        unsafe { ptr::write_volatile(d.add(i), w) };
    }
}

/// `*dst = *src`.
#[inline(always)]
pub fn copy<T: Copy>(dst: &mut T, src: &T) {
    // SAFETY: `dst` is a valid `T` to write.
    unsafe { store_words(dst, Some(src)) }
}

/// `dst.write(v)`.
#[inline(always)]
pub fn write<T: Copy>(dst: &mut MaybeUninit<T>, v: T) -> &mut T {
    // SAFETY: `dst` is valid for writes and is fully written before it is read.
    unsafe {
        store_words(dst.as_mut_ptr(), Some(&v));
        dst.assume_init_mut()
    }
}

/// All-zero bytes into `*dst`.
///
/// # Safety
/// `dst` is valid for writes of a `T`, and all-zero bytes are a valid `T`.
#[inline(always)]
pub unsafe fn zero<T: Copy>(dst: *mut T) {
    // SAFETY: the caller vouches for it.
    unsafe { store_words(dst, None) }
}

/// `*a == *b` word by word, for the same kind of `T` as [`copy`] (explicit padding, size and
/// alignment multiples of 4): a derived `==` on an address array can become a `bcmp` call.
#[inline(always)]
pub fn same<T: Copy>(a: &T, b: &T) -> bool {
    const {
        assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4);
    }
    let (a, b) = ((a as *const T).cast::<u32>(), (b as *const T).cast::<u32>());
    let mut diff = 0u32;
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: in bounds of both, aligned, initialised (no implicit padding, see `store_words`).
        diff |= unsafe { ptr::read(a.add(i)) ^ ptr::read(b.add(i)) };
    }
    diff == 0
}

/// `*p += v` as one BPF_ATOMIC add (`lock *(u64 *)(p + 0) += v`), for a count other CPUs add to
/// at the same time. The BPF target has no atomic read-modify-write types (it lacks compare and
/// swap in Rust's eyes), so the instruction is written out rather than reached through core's
/// internal intrinsics.
///
/// # Safety
/// `p` points to an aligned `u64` of map memory that stays valid while the program runs.
#[inline(always)]
pub unsafe fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: the caller's; the instruction touches only the eight bytes at `p`.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({p} + 0) += {v}",
            p = in(reg) p,
            v = in(reg) v,
            options(nostack, preserves_flags),
        )
    }
}

/// A 32-bit load from `p` at any alignment as one BPF instruction, value as stored (network
/// order for a header field). LLVM's BPF backend splits a load it cannot prove aligned into four
/// byte loads and three shift-ors; the verifier allows unaligned packet access on architectures
/// with efficient unaligned access (x86-64, arm64), where the JIT emits one `mov`.
///
/// # Safety
/// `p` is valid for reading 4 bytes (a bounds-checked packet or map pointer).
#[inline(always)]
pub unsafe fn load_u32(p: *const u8) -> u32 {
    let v: u64;
    // SAFETY: the caller's; the instruction reads only the four bytes at `p`.
    unsafe {
        core::arch::asm!(
            "{v} = *(u32 *)({p} + 0)",
            p = in(reg) p,
            v = lateout(reg) v,
            options(nostack, preserves_flags, readonly),
        )
    };
    v as u32
}

/// A 32-bit store of `v` (as it is to lie in memory) to `p` at any alignment, as one instruction
/// (see [`load_u32`]).
///
/// # Safety
/// `p` is valid for writing 4 bytes.
#[inline(always)]
pub unsafe fn store_u32(p: *mut u8, v: u32) {
    // SAFETY: the caller's; the instruction writes only the four bytes at `p`.
    unsafe {
        core::arch::asm!(
            "*(u32 *)({p} + 0) = {v}",
            p = in(reg) p,
            v = in(reg) v as u64,
            options(nostack, preserves_flags),
        )
    }
}
