//! Interface addresses over rtnetlink (the crates build and parse the messages): the node puts
//! its DNS listen addresses on consumer interfaces this way, without running `ip`.
use std::{io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{RouteNetlinkMessage, address::AddressHeaderFlags};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Puts `addr` (host prefix) on interface `ifindex`, replacing an equal one; IPv6 without
/// duplicate address detection (the address is ours to answer on at once). Blocking: one request
/// and its acknowledgement on a socket of the calling thread's network namespace.
pub fn replace_host_address(ifindex: u32, addr: IpAddr) -> io::Result<()> {
    let mut message = match addr {
        IpAddr::V4(a) => rtnetlink::AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(ifindex)
            .address(a, 32)
            .build(),
        IpAddr::V6(a) => rtnetlink::AddressMessageBuilder::<std::net::Ipv6Addr>::new()
            .index(ifindex)
            .address(a, 128)
            .build(),
    };
    if addr.is_ipv6() {
        message.header.flags |= AddressHeaderFlags::Nodad;
    }
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewAddress(message));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    loop {
        let (reply, _) = socket.recv_from_full()?;
        let mut at = 0;
        while at < reply.len() {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[at..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            at += m.header.length as usize;
            match m.payload {
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    };
                }
                NetlinkPayload::Done(_) => return Ok(()),
                _ => {}
            }
            if m.header.length == 0 {
                break;
            }
        }
    }
}
