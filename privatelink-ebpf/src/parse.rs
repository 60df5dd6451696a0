//! Bounds-checked packet access and header parsing.
use aya_ebpf::programs::XdpContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use privatelink_common::{
    DROP_BAD_IHL, DROP_BAD_LENGTH, DROP_FRAGMENT, DROP_TRUNCATED, PROTO_TCP, PROTO_UDP,
};

/// EtherTypes as they appear on the wire, read natively (`u16::from_ne_bytes`).
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
pub const ETH_P_ARP: u16 = 0x0806u16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();
pub const ETH_P_8021AD: u16 = 0x88a8u16.to_be();

pub const VLAN_HLEN: usize = 4;

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A pointer to a `T` at `offset` in the packet, or `None` if the packet is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Layer 2 as parsed: where layer 3 starts, its EtherType and the VLAN id (0 when untagged).
pub struct L2 {
    pub l3_off: usize,
    pub ether_type: u16,
    pub vlan_id: u16,
}

/// Parses Ethernet and at most one 802.1Q/802.1ad tag. `None`: too short to tell anything.
#[inline(always)]
pub fn l2(ctx: &XdpContext) -> Option<L2> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
        return Some(L2 {
            l3_off: EthHdr::LEN,
            ether_type,
            vlan_id: 0,
        });
    }
    let tag: *const [u8; VLAN_HLEN] = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let tag = unsafe { *tag };
    Some(L2 {
        l3_off: EthHdr::LEN + VLAN_HLEN,
        ether_type: u16::from_ne_bytes([tag[2], tag[3]]),
        vlan_id: u16::from_be_bytes([tag[0], tag[1]]) & 0x0fff,
    })
}

/// An IPv4 TCP or UDP packet addressed to us, validated.
pub struct Ip4 {
    pub l3_off: usize,
    pub l4_off: usize,
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub ttl: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// IPv4 total length, host order.
    pub tot_len: u16,
}

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

/// Validates the IPv4 header at `l3_off`: version, IHL, total length within the frame, not a
/// fragment. `Err(code)`: a drop reason.
#[inline(always)]
pub fn ip4_hdr(ctx: &XdpContext, l3_off: usize) -> Result<Hdr4, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(DROP_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return Err(DROP_BAD_IHL);
    }
    let hdr_len = ihl * 4;
    let frame_len = ctx.data_end() - ctx.data();
    if l3_off + hdr_len > frame_len {
        return Err(DROP_BAD_IHL);
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

/// Validates the IPv4 header at `l3_off` (whose fixed part the caller has seen) and parses TCP/UDP.
/// `Err(code)`: a drop reason. `Ok(None)`: valid IPv4 but neither TCP nor UDP.
#[inline(always)]
pub fn ip4(ctx: &XdpContext, l3_off: usize) -> Result<Option<Ip4>, u32> {
    let ip = ip4_hdr(ctx, l3_off)?;
    let (hdr_len, tot_len) = (ip.hdr_len, ip.tot_len);
    let l4_off = l3_off + hdr_len;
    let (sport_be, dport_be, tcp_flags, l4_len) = match ip.proto {
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
                    UdpHdr::LEN,
                )
            }
        }
        _ => return Ok(None),
    };
    if hdr_len + l4_len > tot_len as usize {
        return Err(DROP_BAD_LENGTH);
    }
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
        tot_len,
    }))
}
