//! Counters. Per-CPU maps; userspace sums over CPUs.

/// Per-link counters, the value of the per-CPU `LINK_STATS` array indexed by link id.
///
/// "Forward" is consumer → provider, "reply" is provider → consumer. Bytes are L2 frame bytes as seen
/// on ingress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    /// New flows admitted (conntrack entries created).
    pub new_conns: u64,
    /// TCP segments with RST seen on the link, either direction.
    pub tcp_resets: u64,
}
crate::assert_size!(LinkStats, 48);

/// Key of the per-CPU `LINK_DROPS` hash: drops by reason per link. Sparse (drops are rare) so a
/// per-link array of every reason does not multiply memory by links × reasons × CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkDropKey {
    pub link_id: u32,
    /// A drop code from [`crate::reasons`].
    pub reason: u32,
}
crate::assert_size!(LinkDropKey, 8);

#[cfg(feature = "user")]
crate::user_pod!(LinkStats, LinkDropKey);

impl LinkStats {
    /// Adds another CPU's counters into these.
    pub fn add(&mut self, o: &LinkStats) {
        self.fwd_packets += o.fwd_packets;
        self.fwd_bytes += o.fwd_bytes;
        self.rev_packets += o.rev_packets;
        self.rev_bytes += o.rev_bytes;
        self.new_conns += o.new_conns;
        self.tcp_resets += o.tcp_resets;
    }
}
