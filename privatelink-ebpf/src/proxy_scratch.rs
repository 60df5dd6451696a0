//! The PROXY paths' per-CPU working memory: the value of `PROXY_SCRATCH`. Types only, so the
//! maps and the PROXY paths (`proxy`) both import it without an import cycle.
use crate::csum::Delta;

/// Bytes of the header buffer: a power of two, so that a masked offset stays inside it.
pub(crate) const HDR_BUF: usize = 256;
/// Bytes of the TCP options buffer: the 40 of the longest options, and room past them for a
/// masked offset.
pub(crate) const OPT_BUF: usize = 128;

/// Per-CPU working memory (`PROXY_SCRATCH`): the header being built, the frame's headers while
/// they move, TCP options being rewritten, and the state of the `bpf_loop` callbacks.
#[repr(C)]
pub struct Scratch {
    pub(crate) hdr: [u32; HDR_BUF / 4],
    pub(crate) moved: [u32; 64],
    pub(crate) opts: [u32; OPT_BUF / 4],
    /// CRC32C and one's-complement sum of the header (the CRC pass).
    pub(crate) crc: u32,
    pub(crate) sum: u32,
    /// The connection id while it is written out.
    pub(crate) id: u64,
    /// Words of the header the CRC pass covers.
    pub(crate) words: u32,
    /// The option walk: where it is, where the options end, the flow's `base` and header length,
    /// whether the header is pending, whether the segment is a SYN-ACK, the checksum change.
    pub(crate) at: u32,
    pub(crate) optlen: u32,
    /// SACK edges left to rewrite, and where the next one is.
    pub(crate) edges: u32,
    pub(crate) edge_at: u32,
    pub(crate) base: u32,
    pub(crate) len: u32,
    pub(crate) pending: u32,
    pub(crate) syn: u32,
    pub(crate) changed: u32,
    /// Whether the walk met a timestamp option.
    pub(crate) ts: u32,
    pub(crate) _pad: u32,
    pub(crate) delta: Delta,
}
