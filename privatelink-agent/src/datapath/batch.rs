//! Reading a whole BPF hash map a few thousand entries per system call.
//!
//! aya 0.14 iterates a hash map with two system calls per entry (next key, then lookup): 1 s for
//! the 1M entries of a busy conntrack, which every metrics scrape, history sample and sweep reads.
//! `BPF_MAP_LOOKUP_BATCH` (Linux 5.6) copies up to `CHUNK` entries per call. aya does not offer it
//! in this version, so this is the one system call spelled out here; a kernel that refuses it
//! gets the iteration instead.
use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{Array, HashMap, IterableMap as _, MapData, MapError};

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`, as the kernel reads it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    /// Where the last call stopped (a bucket number for hash maps); null: from the start.
    in_batch: u64,
    /// Where this call stopped.
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: room for this many entries; out: how many were copied.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of `map`, in batches; by iteration where the kernel refuses batches, passing over
/// entries that fail to read (as the conntrack readers always did).
pub fn entries<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> Vec<(K, V)> {
    batched(map.map()).unwrap_or_else(|_| map.iter().filter_map(Result::ok).collect())
}

/// Every element of the array `map` with its index, in batches (by lookups where the kernel
/// refuses batches).
pub fn array_values<V: aya::Pod>(map: &Array<MapData, V>) -> Vec<(u32, V)> {
    batched(map.map()).unwrap_or_else(|_| {
        (0..map.len())
            .filter_map(|i| map.get(&i, 0).ok().map(|v| (i, v)))
            .collect()
    })
}

/// The same, with the error of an entry that fails to read when it comes to iterating.
pub fn try_entries<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>, MapError> {
    match batched(map.map()) {
        Ok(all) => Ok(all),
        Err(_) => map.iter().collect(),
    }
}

/// Every entry of the hash map or array `map` (keys `K`, values `V`) by `BPF_MAP_LOOKUP_BATCH`.
fn batched<K: aya::Pod, V: aya::Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(CHUNK);
    keys.resize_with(CHUNK, MaybeUninit::uninit);
    let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(CHUNK);
    values.resize_with(CHUNK, MaybeUninit::uninit);
    // Hash maps hand out a 32-bit bucket number as the batch position, arrays an index.
    let (mut at, mut next) = (0u32, 0u32);
    let mut all = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &at as *const u32 as u64 },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: `attr` points at buffers of `CHUNK` keys and values of the map's sizes (`K` and
        // `V` are its key and value types) and at two u32 batch positions, all alive for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        // ENOENT: the last batch (its entries are still copied and counted).
        let done = if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            true
        } else {
            false
        };
        let n = (attr.count as usize).min(CHUNK);
        // SAFETY: the kernel wrote the first `n` keys and values, whole values of plain-data types.
        all.extend((0..n).map(|i| unsafe { (keys[i].assume_init(), values[i].assume_init()) }));
        if done {
            return Ok(all);
        }
        (at, first) = (next, false);
    }
}
