//! Interfaces over rtnetlink (the crates build and parse the messages), without running `ip`: the
//! node puts its DNS listen addresses on consumer interfaces, and reads a link's description.
use std::{io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::AddressHeaderFlags,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
};
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
    request(req).map(drop)
}

/// Adds (`present`) or removes `addr` with its prefix on interface `ifindex`: an address that
/// moves between the nodes of a high-availability group. Adding one that is there, or removing
/// one that is not, is no error. IPv6 without duplicate address detection.
pub fn set_address(ifindex: u32, addr: ipnet::IpNet, present: bool) -> io::Result<()> {
    let mut message = match addr {
        ipnet::IpNet::V4(a) => rtnetlink::AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(ifindex)
            .address(a.addr(), a.prefix_len())
            .build(),
        ipnet::IpNet::V6(a) => rtnetlink::AddressMessageBuilder::<std::net::Ipv6Addr>::new()
            .index(ifindex)
            .address(a.addr(), a.prefix_len())
            .build(),
    };
    if addr.addr().is_ipv6() {
        message.header.flags |= AddressHeaderFlags::Nodad;
    }
    let mut req = NetlinkMessage::from(if present {
        RouteNetlinkMessage::NewAddress(message)
    } else {
        RouteNetlinkMessage::DelAddress(message)
    });
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    if present {
        req.header.flags |= NLM_F_CREATE | NLM_F_REPLACE;
    }
    match request(req) {
        Err(e) if !present && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
        r => r.map(drop),
    }
}

/// The link `ifindex` as the kernel describes it (RTM_GETLINK).
pub fn link(ifindex: u32) -> io::Result<LinkMessage> {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetLink(msg));
    req.header.flags = NLM_F_REQUEST;
    match request(req)? {
        Some(RouteNetlinkMessage::NewLink(l)) => Ok(l),
        _ => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no link {ifindex}"),
        )),
    }
}

/// Sends one request on a socket of the calling thread's network namespace and returns its
/// answer: the object asked for, or nothing once acknowledged.
fn request(
    mut req: NetlinkMessage<RouteNetlinkMessage>,
) -> io::Result<Option<RouteNetlinkMessage>> {
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
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(None),
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    };
                }
                NetlinkPayload::Done(_) => return Ok(None),
                // A request for one object is answered with it, unacknowledged.
                NetlinkPayload::InnerMessage(m) => return Ok(Some(m)),
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len.next_multiple_of(4);
        }
    }
}

/// The peer of a veth whose peer is in this network namespace (a peer elsewhere is not ours to
/// see); `None` for any other link.
pub fn visible_veth_peer(link: &LinkMessage) -> Option<u32> {
    let veth = link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    });
    let elsewhere = link
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
    let peer = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(p) => Some(*p),
        _ => None,
    });
    peer.filter(|_| veth && !elsewhere)
}

/// Whether an XDP program is attached to the link (any mode).
pub fn has_xdp(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::Xdp(x) => x.iter().any(|x| match x {
            LinkXdp::Attached(m) => *m != XdpAttached::None,
            LinkXdp::ProgId(id) => *id != 0,
            _ => false,
        }),
        _ => false,
    })
}

/// A link's name, as the kernel has it.
pub fn name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(attributes: Vec<LinkAttribute>) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.attributes = attributes;
        l
    }

    fn veth() -> LinkAttribute {
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)])
    }

    #[test]
    fn a_veths_peer_counts_only_in_the_same_namespace() {
        assert_eq!(
            visible_veth_peer(&link(vec![veth(), LinkAttribute::Link(7)])),
            Some(7)
        );
        assert_eq!(
            visible_veth_peer(&link(vec![
                veth(),
                LinkAttribute::Link(7),
                LinkAttribute::LinkNetNsId(1)
            ])),
            None,
            "a peer in another namespace"
        );
        assert_eq!(
            visible_veth_peer(&link(vec![
                LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Dummy)]),
                LinkAttribute::Link(7)
            ])),
            None,
            "not a veth"
        );
        assert!(!has_xdp(&link(vec![LinkAttribute::Xdp(vec![
            LinkXdp::Attached(XdpAttached::None)
        ])])));
        assert!(has_xdp(&link(vec![LinkAttribute::Xdp(vec![
            LinkXdp::Attached(XdpAttached::Driver),
            LinkXdp::ProgId(12)
        ])])));
    }
}
