//! Telling a segment that addresses moved to this node: gratuitous ARP for IPv4 and unsolicited
//! neighbour advertisements (override set) for IPv6, sent from the interface's MAC on a raw packet
//! socket of the calling thread's network namespace. Frames are built with etherparse.
use std::{io, net::IpAddr};

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Icmpv6Type, PacketBuilder,
    icmpv6::NeighborAdvertisementHeader,
};

const BROADCAST: [u8; 6] = [0xff; 6];
/// All-nodes multicast, and its Ethernet address.
const ALL_NODES: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// The frame that announces `addr` at `mac`: an ARP request whose sender and target are both
/// `addr` (what Linux sends for `arping -U`), or an unsolicited neighbour advertisement to all
/// nodes with the override flag and the target link-layer address option.
pub fn frame(mac: [u8; 6], addr: IpAddr) -> Vec<u8> {
    let mut out = Vec::new();
    match addr {
        IpAddr::V4(a) => {
            let arp = ArpPacket::new(
                ArpHardwareId::ETHERNET,
                EtherType::IPV4,
                ArpOperation::REQUEST,
                &mac,
                &a.octets(),
                &[0; 6],
                &a.octets(),
            )
            .expect("Ethernet and IPv4 address lengths");
            PacketBuilder::ethernet2(mac, BROADCAST)
                .arp(arp)
                .write_to_vec(&mut out)
                .expect("writing to a vector");
        }
        IpAddr::V6(a) => {
            // Target address, then option 2 (target link-layer address), 8 bytes long.
            let mut payload = a.octets().to_vec();
            payload.extend([2, 1]);
            payload.extend(mac);
            PacketBuilder::ethernet2(mac, ALL_NODES_MAC)
                .ipv6(a.octets(), ALL_NODES.octets(), 255)
                .icmpv6(Icmpv6Type::NeighborAdvertisement(
                    NeighborAdvertisementHeader {
                        router: false,
                        solicited: false,
                        r#override: true,
                    },
                ))
                .write_to_vec(&mut out, &payload)
                .expect("writing to a vector");
        }
    }
    out
}

/// Sends `frames` out of interface `ifindex`.
pub fn send(ifindex: u32, frames: &[Vec<u8>]) -> io::Result<()> {
    // SAFETY: plain socket(2); the descriptor is owned by `fd` from here on.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by socket(2) and not owned elsewhere.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    for f in frames {
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&f[..6]);
        // SAFETY: `f` outlives the call; `to` is a sockaddr_ll of the size given.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0xaa, 1];

    #[test]
    fn a_gratuitous_arp_names_the_address_as_sender_and_target() {
        let f = frame(MAC, "198.18.0.100".parse().unwrap());
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(NetSlice::Arp(arp)) = p.net else {
            panic!("not ARP: {f:02x?}")
        };
        assert_eq!(&f[..6], &BROADCAST);
        assert_eq!(arp.operation(), ArpOperation::REQUEST);
        assert_eq!(arp.sender_hw_addr(), MAC);
        assert_eq!(arp.sender_protocol_addr(), [198, 18, 0, 100]);
        assert_eq!(arp.target_protocol_addr(), [198, 18, 0, 100]);
    }

    #[test]
    fn an_unsolicited_advertisement_overrides_and_carries_the_mac() {
        let addr: std::net::Ipv6Addr = "2001:db8::100".parse().unwrap();
        let f = frame(MAC, addr.into());
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(NetSlice::Ipv6(ip)) = &p.net else {
            panic!("not IPv6")
        };
        assert_eq!(ip.header().hop_limit(), 255);
        assert_eq!(ip.header().destination_addr(), ALL_NODES);
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
            panic!("not ICMPv6")
        };
        let Icmpv6Type::NeighborAdvertisement(h) = icmp.icmp_type() else {
            panic!("not an advertisement")
        };
        assert!(h.r#override && !h.solicited);
        assert_eq!(&icmp.payload()[..16], &addr.octets());
        assert_eq!(&icmp.payload()[16..], &[2, 1, 2, 0, 0, 0, 0xaa, 1]);
        // etherparse checks the checksum it computed.
        let want = icmp
            .header()
            .icmp_type
            .calc_checksum(
                ip.header().source(),
                ip.header().destination(),
                icmp.payload(),
            )
            .unwrap();
        assert_eq!(icmp.checksum(), want);
    }
}
