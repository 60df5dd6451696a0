//! Bounds-checked packet access and header parsing.
use aya_ebpf::{helpers::generated::bpf_xdp_load_bytes, programs::XdpContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use privatelink_common::{
    DROP_BAD_CHECKSUM, DROP_BAD_IHL, DROP_BAD_LENGTH, DROP_BAD_VERSION, DROP_FRAGMENT,
    DROP_IPV6_EXT, DROP_TRUNCATED, In6, MAX_EXT_HDRS, PROTO_TCP, PROTO_UDP,
};

use crate::csum;

/// EtherTypes as they appear on the wire, read natively (`u16::from_ne_bytes`).
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
pub const ETH_P_ARP: u16 = 0x0806u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();
pub const ETH_P_8021AD: u16 = 0x88a8u16.to_be();

pub const VLAN_HLEN: usize = 4;

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offsets beyond this are refused: every header the datapath reads starts well before it, and an
/// offset read back from map memory (the IPv6 program's scratch) has no bound the verifier knows
/// until this check gives it one.
const MAX_OFFSET: usize = 0x3fff;

/// A pointer to a `T` at `offset` in the packet, or `None` if the packet is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if offset > MAX_OFFSET || start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Layer 2 as parsed: where layer 3 starts, its EtherType and the VLAN id (0 when untagged), and
/// the receiving interface. The context's ifindex is read here only: read in several places, LLVM
/// keeps the field's address in a register, and the verifier refuses a load through a context
/// pointer that was moved.
pub struct L2 {
    pub l3_off: usize,
    pub ether_type: u16,
    pub vlan_id: u16,
    pub ingress: u32,
}

/// Parses Ethernet and at most one 802.1Q/802.1ad tag. `None`: too short to tell anything.
#[inline(always)]
pub fn l2(ctx: &XdpContext) -> Option<L2> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let ether_type = unsafe { (*eth).ether_type };
    let ingress = ctx.ingress_ifindex() as u32;
    if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
        return Some(L2 {
            l3_off: EthHdr::LEN,
            ether_type,
            vlan_id: 0,
            ingress,
        });
    }
    let tag: *const [u8; VLAN_HLEN] = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let tag = unsafe { *tag };
    Some(L2 {
        l3_off: EthHdr::LEN + VLAN_HLEN,
        ether_type: u16::from_ne_bytes([tag[2], tag[3]]),
        vlan_id: u16::from_be_bytes([tag[0], tag[1]]) & 0x0fff,
        ingress,
    })
}

/// A TCP or UDP packet, validated: `A` is `u32` for IPv4, [`In6`] for IPv6.
pub struct Pkt<A> {
    pub l3_off: usize,
    pub l4_off: usize,
    pub saddr_be: A,
    pub daddr_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// TCP data offset: the header's length in 32-bit words, 5 without options (0 for UDP).
    pub tcp_doff: u8,
    /// Length of the IP packet, headers included, host order.
    pub tot_len: u16,
}
pub type Ip4 = Pkt<u32>;
pub type Ip6 = Pkt<In6>;

/// A validated IPv4 header (any protocol).
pub struct Hdr4 {
    /// Header length in bytes (IHL × 4).
    pub hdr_len: usize,
    /// Total length, host order.
    pub tot_len: u16,
    pub proto: u8,
    pub ttl: u8,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

/// Validates the IPv4 header at `l3_off` as a router does: version, IHL, header checksum, then
/// total length within the frame and not a fragment. `Err(code)`: a drop reason.
#[inline(always)]
pub fn ip4_hdr(ctx: &XdpContext, l3_off: usize) -> Result<Hdr4, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(DROP_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(DROP_BAD_VERSION);
    }
    let ihl = (ip.vihl & 0x0f) as usize;
    if ihl < 5 {
        return Err(DROP_BAD_IHL);
    }
    let hdr_len = ihl * 4;
    let frame_len = ctx.data_end() - ctx.data();
    if l3_off + hdr_len > frame_len {
        return Err(DROP_BAD_IHL);
    }
    if !ip4_checksum_ok(ctx, l3_off, ip, ihl) {
        return Err(DROP_BAD_CHECKSUM);
    }
    let tot_len = u16::from_be_bytes(ip.tot_len);
    if (tot_len as usize) < hdr_len || l3_off + tot_len as usize > frame_len {
        return Err(DROP_BAD_LENGTH);
    }
    // More-fragments flag or a fragment offset: full NAT needs the ports of every packet.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(DROP_FRAGMENT);
    }
    Ok(Hdr4 {
        hdr_len,
        tot_len,
        proto: ip.proto,
        ttl: ip.ttl,
        saddr_be: u32::from_ne_bytes(ip.src_addr),
        daddr_be: u32::from_ne_bytes(ip.dst_addr),
    })
}

/// Whether the IPv4 header (`ihl` words of 4 bytes, options included) sums to all ones, the
/// checksum field included.
#[inline(always)]
fn ip4_checksum_ok(ctx: &XdpContext, l3_off: usize, ip: &Ipv4Hdr, ihl: usize) -> bool {
    // SAFETY: `Ipv4Hdr` is the 20 bytes of the fixed header, bounds checked by the caller's ptr_at.
    let fixed = unsafe { &*(ip as *const Ipv4Hdr).cast::<[u8; IPV4_HLEN]>() };
    let mut sum = csum::sum(fixed);
    // Options (rare): at most 10 words, each copied out by the helper, which checks the read
    // against the frame. A packet pointer per word would let LLVM rebuild its address from the
    // frame's start with an offset the verifier holds no bound for.
    let mut word = [0u8; 4];
    for i in 0..MAX_IPV4_OPTION_WORDS {
        if i + 5 >= ihl {
            break;
        }
        let at = (l3_off + IPV4_HLEN + 4 * i) as u32;
        // SAFETY: the helper writes at most 4 bytes into `word`, and reads only inside the frame.
        let r = unsafe { bpf_xdp_load_bytes(ctx.ctx, at, word.as_mut_ptr().cast(), 4) };
        if r != 0 {
            return false;
        }
        sum += csum::sum(&word);
    }
    csum::finish(sum) == 0
}

/// The fixed IPv4 header, and the most option words an IHL of 15 leaves room for.
const IPV4_HLEN: usize = 20;
const MAX_IPV4_OPTION_WORDS: usize = 10;

/// Ports, TCP flags and TCP data offset of the TCP or UDP header at `l4_off`, which must end by
/// `l3_end` (the end of the IP packet). `Ok(None)`: neither TCP nor UDP.
#[inline(always)]
fn ports(
    ctx: &XdpContext,
    l4_off: usize,
    l3_end: usize,
    proto: u8,
) -> Result<Option<(u16, u16, u8, u8)>, u32> {
    let (sport_be, dport_be, tcp_flags, tcp_doff, l4_len) = match proto {
        PROTO_TCP => {
            // Every field through the one checked pointer: a second pointer to the same offset may
            // be recomputed by LLVM into a register the verifier has no bounds for.
            let tcp: *const [u8; TcpHdr::LEN] = ptr_at(ctx, l4_off).ok_or(DROP_TRUNCATED)?;
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*tcp };
            (
                u16::from_ne_bytes([h[0], h[1]]),
                u16::from_ne_bytes([h[2], h[3]]),
                h[13],
                h[12] >> 4,
                TcpHdr::LEN,
            )
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4_off).ok_or(DROP_TRUNCATED)?;
            // SAFETY: bounds checked by ptr_at.
            unsafe {
                (
                    u16::from_ne_bytes((*udp).src),
                    u16::from_ne_bytes((*udp).dst),
                    0,
                    0,
                    UdpHdr::LEN,
                )
            }
        }
        _ => return Ok(None),
    };
    if l4_off + l4_len > l3_end {
        return Err(DROP_BAD_LENGTH);
    }
    Ok(Some((sport_be, dport_be, tcp_flags, tcp_doff)))
}

/// Validates the IPv4 header at `l3_off` (whose fixed part the caller has seen) and parses TCP/UDP.
/// `Err(code)`: a drop reason. `Ok(None)`: valid IPv4 but neither TCP nor UDP.
#[inline(always)]
pub fn ip4(ctx: &XdpContext, l3_off: usize) -> Result<Option<Ip4>, u32> {
    let ip = ip4_hdr(ctx, l3_off)?;
    let l4_off = l3_off + ip.hdr_len;
    let Some((sport_be, dport_be, tcp_flags, tcp_doff)) =
        ports(ctx, l4_off, l3_off + ip.tot_len as usize, ip.proto)?
    else {
        return Ok(None);
    };
    Ok(Some(Ip4 {
        l3_off,
        l4_off,
        saddr_be: ip.saddr_be,
        daddr_be: ip.daddr_be,
        sport_be,
        dport_be,
        proto: ip.proto,
        ttl: ip.ttl,
        tcp_flags,
        tcp_doff,
        tot_len: ip.tot_len,
    }))
}

/// The fixed IPv6 header as bytes: version/class/flow, payload length, next header, hop limit,
/// then the addresses as four words each.
#[repr(C)]
pub struct Ipv6Raw {
    pub head: [u8; 8],
    pub src: [[u8; 4]; 4],
    pub dst: [[u8; 4]; 4],
}
pub const IPV6_HLEN: usize = 40;

/// Extension headers the parser steps over.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// An address from its four wire words.
#[inline(always)]
pub fn in6(w: &[[u8; 4]; 4]) -> In6 {
    [
        u32::from_ne_bytes(w[0]),
        u32::from_ne_bytes(w[1]),
        u32::from_ne_bytes(w[2]),
        u32::from_ne_bytes(w[3]),
    ]
}

/// The wire words of an address.
#[inline(always)]
pub fn wire6(a: In6) -> [[u8; 4]; 4] {
    [
        a[0].to_ne_bytes(),
        a[1].to_ne_bytes(),
        a[2].to_ne_bytes(),
        a[3].to_ne_bytes(),
    ]
}

/// A validated IPv6 header with its extension headers walked (any upper protocol).
pub struct Hdr6 {
    /// Where the upper-layer header starts.
    pub l4_off: usize,
    /// End of the IPv6 packet (fixed header plus payload length).
    pub end: usize,
    /// The upper-layer protocol (the last next-header value).
    pub proto: u8,
    pub hop_limit: u8,
}

/// The fixed IPv6 header at `l3_off`, read through one checked pointer.
#[inline(always)]
pub fn ip6_fixed(ctx: &XdpContext, l3_off: usize) -> Option<*mut Ipv6Raw> {
    ptr_at(ctx, l3_off)
}

/// Validates the IPv6 header at `l3_off` (version, payload length within the frame) and walks up
/// to [`MAX_EXT_HDRS`] extension headers (hop-by-hop, routing, destination options, AH).
/// Fragments drop (`DROP_FRAGMENT`), a longer chain drops (`DROP_IPV6_EXT`).
#[inline(always)]
pub fn ip6_hdr(ctx: &XdpContext, l3_off: usize) -> Result<Hdr6, u32> {
    let ip = ip6_fixed(ctx, l3_off).ok_or(DROP_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.head[0] >> 4 != 6 {
        return Err(DROP_BAD_VERSION);
    }
    let end = l3_off + IPV6_HLEN + u16::from_be_bytes([ip.head[4], ip.head[5]]) as usize;
    if end > ctx.data_end() - ctx.data() {
        return Err(DROP_BAD_LENGTH);
    }
    let mut next = ip.head[6];
    let mut off = l3_off + IPV6_HLEN;
    // One branch per step: the verifier walks every way out of this loop separately.
    for _ in 0..MAX_EXT_HDRS {
        if next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST {
            break;
        }
        let e: *const [u8; 2] = ptr_at(ctx, off).ok_or(DROP_TRUNCATED)?;
        // SAFETY: bounds checked by ptr_at.
        let e = unsafe { *e };
        next = e[0];
        off += (e[1] as usize + 1) * 8;
    }
    match next {
        // AH is not walked (its length unit differs); AH-protected traffic cannot be translated
        // anyway, as NAT breaks its integrity check.
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => Err(DROP_IPV6_EXT),
        NEXTHDR_FRAGMENT => Err(DROP_FRAGMENT),
        _ if off > end => Err(DROP_BAD_LENGTH),
        proto => Ok(Hdr6 {
            l4_off: off,
            end,
            proto,
            hop_limit: ip.head[7],
        }),
    }
}

/// Validates the IPv6 header and its extension headers at `l3_off` and parses TCP/UDP into `out`
/// (addresses, offsets and protocol are filled in for any upper protocol). `Err(code)`: a drop
/// reason. `Ok(Some(h))`: valid IPv6 but neither TCP nor UDP.
#[inline(always)]
pub fn ip6(ctx: &XdpContext, l3_off: usize, out: &mut Ip6) -> Result<Option<Hdr6>, u32> {
    let mut h = ip6_hdr(ctx, l3_off)?;
    // Each way out of the extension-header walk leaves other bounds on the offsets, and the
    // verifier would check the rest of the program once per way (past its instruction limit).
    // Written to `out` (map memory) and read back, they are one unknown value for all ways, bounded
    // again by every packet access.
    out.l4_off = h.l4_off;
    out.tot_len = (h.end - l3_off).min(u16::MAX as usize) as u16;
    // SAFETY: reads of the fields just written.
    unsafe {
        h.l4_off = core::ptr::read_volatile(&out.l4_off);
        h.end = l3_off + core::ptr::read_volatile(&out.tot_len) as usize;
    }
    // The addresses go straight from the packet to map memory (in registers they would be spilled
    // to the stack around every helper call).
    let ip = ip6_fixed(ctx, l3_off).ok_or(DROP_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        out.saddr_be = in6(&(*ip).src);
        out.daddr_be = in6(&(*ip).dst);
    }
    out.l3_off = l3_off;
    out.proto = h.proto;
    out.ttl = h.hop_limit;
    let Some((sport_be, dport_be, tcp_flags, tcp_doff)) = ports(ctx, h.l4_off, h.end, h.proto)?
    else {
        return Ok(Some(h));
    };
    out.sport_be = sport_be;
    out.dport_be = dport_be;
    out.tcp_flags = tcp_flags;
    out.tcp_doff = tcp_doff;
    Ok(None)
}
