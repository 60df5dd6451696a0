//! What happened to a packet: one code per outcome, one list shared by the datapath (counter index),
//! the agent (sums) and the metrics (label values).
//!
//! Codes below [`DROP_REASONS`] are drops, and so are the drops added after the first release
//! ([`LATER_DROPS`]): codes are appended, never renumbered, so that a pinned counter array keeps
//! its meaning across an upgrade. The rest are non-drop outcomes (passes, replies, forwards).
//! Every packet the program sees ends in exactly one global outcome counter, so the counters account
//! for every packet.

/// Packet shorter than the headers it announces (Ethernet, VLAN, IPv4/IPv6 and its extension
/// headers, TCP or UDP) and addressed to us.
pub const DROP_TRUNCATED: u32 = 0;
/// IPv4 IHL below 5 or beyond the packet.
pub const DROP_BAD_IHL: u32 = 1;
/// IPv4 total length below the header or beyond the frame; IPv6 payload length beyond the frame.
pub const DROP_BAD_LENGTH: u32 = 2;
/// IPv4 fragment or IPv6 fragment header (first or later) for an endpoint or NAT address: full
/// NAT needs the L4 ports.
pub const DROP_FRAGMENT: u32 = 3;
/// Addressed to an endpoint IP on a port that is not one of its terminal ports.
pub const DROP_NO_PORT: u32 = 4;
/// The endpoint's connection is Pending (not yet accepted by the provider).
pub const DROP_LINK_PENDING: u32 = 5;
/// The endpoint's connection is Rejected.
pub const DROP_LINK_REJECTED: u32 = 6;
/// The link slot is not (or no longer) active: deleted endpoint or stale flow.
pub const DROP_LINK_INACTIVE: u32 = 7;
/// The consumer account is not on the service's allowlist.
pub const DROP_NOT_ALLOWLISTED: u32 = 8;
/// A security-group rule dropped the new flow, or groups are bound and none matched.
pub const DROP_SECURITY_GROUP: u32 = 9;
/// A TCP segment without state that is not a plain SYN.
pub const DROP_TCP_NOT_SYN: u32 = 10;
/// TTL (IPv4) or hop limit (IPv6) would reach zero.
pub const DROP_TTL_EXPIRED: u32 = 11;
/// The service has no backend in its Maglev table.
pub const DROP_NO_BACKEND: u32 = 12;
/// No free NAT port after the bounded retries.
pub const DROP_NAT_EXHAUSTED: u32 = 13;
/// The provider network has no NAT range configured.
pub const DROP_NO_NAT_RANGE: u32 = 14;
/// Addressed to a NAT address with no flow state (reply without state).
pub const DROP_NO_FLOW: u32 = 15;
/// Conntrack insert failed (map full or allocation failure).
pub const DROP_CONNTRACK_FULL: u32 = 16;
/// `bpf_fib_lookup` found no usable route (blackhole, unreachable, prohibited, ...).
pub const DROP_FIB_FAILED: u32 = 17;
/// Rewriting the frame (head adjust) failed.
pub const DROP_REWRITE_FAILED: u32 = 18;
/// An unsupported VLAN layout (more than one tag).
pub const DROP_VLAN: u32 = 19;
/// Redirect to the egress interface failed (not in the device map).
pub const DROP_REDIRECT_FAILED: u32 = 20;
/// An ICMP error (unreachable, time exceeded, parameter problem) that quotes no tracked flow.
pub const DROP_ICMP_NO_FLOW: u32 = 21;
/// An ICMP echo request to an endpoint address (services answer none).
pub const DROP_ICMP_ECHO: u32 = 22;
/// An IPv6 extension-header chain longer than the parser walks (`MAX_EXT_HDRS`), on a packet
/// addressed to an endpoint or NAT address.
pub const DROP_IPV6_EXT: u32 = 23;
/// Number of drop reasons; codes from here on are not drops.
pub const DROP_REASONS: u32 = 24;

/// Neither IPv4, IPv6 nor ARP: passed untouched.
pub const PASS_NOT_IP: u32 = 24;
/// Arrived on an interface (or VLAN) the agent did not register: passed untouched.
pub const PASS_UNKNOWN_IFACE: u32 = 25;
/// Not addressed to an endpoint (consumer side) or a NAT address (provider side): passed untouched.
pub const PASS_NOT_ENDPOINT: u32 = 26;
/// Too short to tell where it is addressed: passed to the kernel, which drops it.
pub const PASS_MALFORMED: u32 = 27;
/// Translated, but the next hop has no neighbour entry: handed to the kernel to resolve and forward.
pub const PASS_NO_NEIGH: u32 = 28;
/// ARP request for an endpoint IP answered with XDP_TX.
pub const ARP_REPLIED: u32 = 29;
/// ICMP echo request to an endpoint of a service that answers pings, answered with XDP_TX.
pub const ICMP_ECHO_REPLIED: u32 = 30;
/// Translated and sent back out of the ingress interface (XDP_TX).
pub const FWD_TX: u32 = 31;
/// Translated and redirected to another interface.
pub const FWD_REDIRECT: u32 = 32;
/// IPv6 neighbour solicitation for an endpoint address answered with an advertisement (XDP_TX).
pub const ND_REPLIED: u32 = 33;
/// An IPv4 header whose checksum does not verify, addressed to an endpoint or a NAT address:
/// dropped before any flow is looked up or created, as a router drops it.
pub const DROP_BAD_CHECKSUM: u32 = 34;
/// An IP version that does not match the EtherType (not 4 under IPv4's, not 6 under IPv6's).
pub const DROP_BAD_VERSION: u32 = 35;
/// A new flow of a link that already has as many live flows as its limit allows
/// ([`crate::LinkInfo::flow_limit`]).
pub const DROP_FLOW_LIMIT: u32 = 36;
/// A new PROXY protocol flow while `PROXY_PENDING4`/`PROXY_PENDING6` is full (that many
/// handshakes whose header is unacknowledged).
pub const DROP_PROXY_FULL: u32 = 37;
/// A packet that was to carry a PROXY header but could not (no headroom, headers longer than
/// the datapath moves, the link's TLVs gone).
pub const DROP_PROXY_INSERT: u32 = 38;
/// The drop codes appended after the first block.
pub const LATER_DROPS: [u32; 5] = [
    DROP_BAD_CHECKSUM,
    DROP_BAD_VERSION,
    DROP_FLOW_LIMIT,
    DROP_PROXY_FULL,
    DROP_PROXY_INSERT,
];
/// Number of outcome codes (size of the global counter array).
pub const OUTCOMES: u32 = 39;

/// Metric label value for each outcome code, indexed by code.
pub const OUTCOME_NAMES: [&str; OUTCOMES as usize] = [
    "truncated",
    "bad_ihl",
    "bad_length",
    "fragment",
    "no_port",
    "link_pending",
    "link_rejected",
    "link_inactive",
    "not_allowlisted",
    "security_group",
    "tcp_not_syn",
    "ttl_expired",
    "no_backend",
    "nat_exhausted",
    "no_nat_range",
    "no_flow",
    "conntrack_full",
    "fib_failed",
    "rewrite_failed",
    "vlan",
    "redirect_failed",
    "icmp_no_flow",
    "icmp_echo",
    "ipv6_ext",
    "pass_not_ip",
    "pass_unknown_iface",
    "pass_not_endpoint",
    "pass_malformed",
    "pass_no_neigh",
    "arp_replied",
    "icmp_echo_replied",
    "fwd_tx",
    "fwd_redirect",
    "nd_replied",
    "bad_checksum",
    "bad_version",
    "flow_limit",
    "proxy_full",
    "proxy_insert",
];

/// Whether an outcome code is a drop.
pub const fn is_drop(code: u32) -> bool {
    if code < DROP_REASONS {
        return true;
    }
    let mut i = 0;
    while i < LATER_DROPS.len() {
        if LATER_DROPS[i] == code {
            return true;
        }
        i += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drops_are_the_first_block_and_the_later_drops_only() {
        for code in 0..OUTCOMES {
            let want = code < DROP_REASONS || LATER_DROPS.contains(&code);
            assert_eq!(is_drop(code), want, "{}", OUTCOME_NAMES[code as usize]);
        }
        assert!(
            is_drop(DROP_BAD_CHECKSUM) && is_drop(DROP_BAD_VERSION) && is_drop(DROP_FLOW_LIMIT)
        );
        assert!(!is_drop(ND_REPLIED) && !is_drop(FWD_REDIRECT));
    }
}
