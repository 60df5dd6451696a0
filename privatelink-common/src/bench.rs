//! Constants of the benchmark programs (`cargo xtask bench`), shared by the eBPF crate's
//! `bench.rs` and the loader that drives them.

/// Bytes of the frame the generator and the replay restore on every run: Ethernet, IPv4 and TCP
/// headers (54, or 42 with UDP) and the first bytes after them.
pub const GEN_HEAD: usize = 56;

/// `SINK` entries (per-CPU packet counters): frames the sink dropped, and SYNs the responder
/// answered.
pub const SINK_COUNTED: u32 = 0;
pub const SINK_RESPONDED: u32 = 1;
/// Entries of `SINK`.
pub const SINK_ENTRIES: u32 = 2;

/// Words of the generator's window (`GEN_WINDOW[0]`, host order): connections pending at most
/// (0: no window, every frame is sent), connections to start in all, started so far, completed so
/// far (by the acker), and the `bpf_ktime_get_ns` times of the first start and the latest
/// completion.
pub const WINDOW_LIMIT: usize = 0;
pub const WINDOW_TOTAL: usize = 1;
pub const WINDOW_SENT: usize = 2;
pub const WINDOW_DONE: usize = 3;
pub const WINDOW_FIRST_NS: usize = 4;
pub const WINDOW_LAST_NS: usize = 5;
pub const WINDOW_WORDS: usize = 6;

/// Words of the sink's clock (`SINK_CLOCK`, per CPU, host order): the sink's count and the
/// `bpf_ktime_get_ns` time at the first and at the latest of its samples, taken on every
/// [`CLOCK_EVERY`]th frame a CPU counts. Frames over time between the two samples is the rate the
/// sink received at, with the generator's pauses before its first frame and after its last left
/// out. Zeroed by the loader before a measurement.
pub const CLOCK_FIRST_COUNT: usize = 0;
pub const CLOCK_FIRST_NS: usize = 1;
pub const CLOCK_LAST_COUNT: usize = 2;
pub const CLOCK_LAST_NS: usize = 3;
pub const CLOCK_WORDS: usize = 4;
/// The sink samples its clock on every this many frames (a power of two) per CPU.
pub const CLOCK_EVERY: u64 = 64;
const _: () = assert!(CLOCK_EVERY.is_power_of_two());

/// Words of a slot of `SLOTS`, the table `slot_floor` claims a new flow's two slots in: one
/// 64-byte cache line, what an open-addressing conntrack entry (key and flow, packed) would take.
pub const SLOT_WORDS: usize = 8;
/// Slots of `SLOTS` when the bench sizes it: a power of two, as many as `CT4`'s entries at the
/// bench's sizes (two per flow). Every other load gives it one slot, so an agent allocates nothing
/// for it.
pub const SLOT_TABLE_ENTRIES: u32 = 2_097_152;
const _: () = assert!(SLOT_TABLE_ENTRIES.is_power_of_two());
/// Slots after the hashed one that `slot_floor` tries (linear probing) before it gives up.
pub const SLOT_PROBES: u32 = 4;
