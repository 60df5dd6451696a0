//! Wakes the agent when the network under it changes, from rtnetlink's multicast groups:
//! - links (new, deleted, up, down): the agent rescans the interfaces it wants;
//! - routes and neighbours: next hops may have moved, so the datapath's cached next hops must be
//!   resolved again: the watcher's reader thread calls the agent's callback (which bumps
//!   `fib_generation`) at once, without waiting for the event loop, which may be busy with a
//!   full resync.
//!
//! Neighbour messages come often (a neighbour's state moves between reachable, stale and delay
//! with the same link-layer address); only a changed or vanished address moves a next hop, so
//! the watcher keeps the addresses it has seen and reports only those.
use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    route::RouteHeader,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use rtnetlink::constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH};
use tokio::sync::Notify;

/// The routing table of local and broadcast addresses: its routes follow address changes and
/// never name a next hop.
const RT_TABLE_LOCAL: u8 = 255;

/// Receive buffer of the event socket: room for bursts (a route table reload) before the kernel
/// drops events; a drop is recovered by treating everything as changed.
const RX_BUFFER: usize = 4 << 20;

/// How often the reader looks whether its watch was dropped.
const STOP_POLL: Duration = Duration::from_millis(500);

/// What a batch of events changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Interfaces appeared, vanished or changed state.
    pub links: bool,
    /// Routes or neighbours' link-layer addresses changed.
    pub next_hops: bool,
}

impl Changes {
    pub const ALL: Changes = Changes {
        links: true,
        next_hops: true,
    };

    fn add(&mut self, other: Changes) {
        self.links |= other.links;
        self.next_hops |= other.next_hops;
    }
}

/// A neighbour: (interface index, address).
type NeighbourKey = (u32, IpAddr);
/// A link-layer address, `None` while unresolved.
type LinkAddress = Option<Vec<u8>>;
/// Link-layer address by neighbour.
type Neighbours = HashMap<NeighbourKey, LinkAddress>;

/// Changes gathered by the reader thread, and the wake-up of whoever waits for them.
#[derive(Default)]
struct Pending {
    changes: Mutex<Changes>,
    notify: Notify,
}

impl Pending {
    fn add(&self, c: Changes) {
        if c == Changes::default() {
            return;
        }
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(c);
        self.notify.notify_one();
    }
}

/// The watch: a thread reads the events (a blocking socket of the network namespace the watch
/// was made in) as they come, so a busy event loop never delays them in the kernel's queue.
pub struct NetWatch {
    pending: Arc<Pending>,
    stop: Arc<AtomicBool>,
}

impl Drop for NetWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl NetWatch {
    /// Subscribes to link, IPv4 and IPv6 route, and neighbour events of the calling thread's
    /// network namespace. `next_hops_moved` runs on the reader thread after every batch of events
    /// that moved next hops.
    pub fn new(next_hops_moved: impl Fn() + Send + 'static) -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.set_rx_buf_sz(RX_BUFFER)?;
        socket.bind(&SocketAddr::new(
            0,
            RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE,
        ))?;
        nix::sys::socket::setsockopt(
            &socket.as_fd(),
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, STOP_POLL.as_micros() as _),
        )?;
        let pending = Arc::new(Pending::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pending.clone(), stop.clone());
        std::thread::Builder::new()
            .name("netwatch".into())
            .spawn(move || read(&socket, &p, &s, &next_hops_moved))?;
        Ok(NetWatch { pending, stop })
    }

    /// Waits until something changed, and takes everything that changed since the last call.
    pub async fn changed(&mut self) -> Changes {
        loop {
            self.pending.notify.notified().await;
            let c = std::mem::take(
                &mut *self
                    .pending
                    .changes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if c != Changes::default() {
                return c;
            }
        }
    }
}

/// The reader: classifies every message as it arrives. Lost events (ENOBUFS) count as everything
/// changed: the agent rescans, and cached next hops are resolved again.
fn read(socket: &Socket, pending: &Pending, stop: &AtomicBool, next_hops_moved: &dyn Fn()) {
    let mut neighbours = Neighbours::new();
    while !stop.load(Ordering::Relaxed) {
        let buf = match socket.recv_from_full() {
            Ok((buf, _)) => buf,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if e.raw_os_error() != Some(libc::ENOBUFS) {
                    log::warn!("network events: {e}");
                    std::thread::sleep(STOP_POLL);
                }
                neighbours.clear();
                next_hops_moved();
                pending.add(Changes::ALL);
                continue;
            }
        };
        let mut batch = Changes::default();
        let mut at = 0;
        while at < buf.len() {
            let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[at..]) else {
                // Unreadable: assume the worst rather than miss a change.
                batch.add(Changes::ALL);
                break;
            };
            let len = m.header.length as usize;
            if let NetlinkPayload::InnerMessage(m) = m.payload {
                batch.add(classify(&m, &mut neighbours));
            }
            if len == 0 {
                break;
            }
            at += len.next_multiple_of(4);
        }
        if batch.next_hops {
            next_hops_moved();
        }
        pending.add(batch);
    }
}

/// What one message changes, given the neighbours seen so far (updated here).
fn classify(m: &RouteNetlinkMessage, neighbours: &mut Neighbours) -> Changes {
    use RouteNetlinkMessage as M;
    let routes = |h: &RouteHeader| Changes {
        links: false,
        next_hops: h.table != RT_TABLE_LOCAL,
    };
    match m {
        M::NewLink(_) | M::DelLink(_) | M::SetLink(_) => Changes {
            links: true,
            next_hops: false,
        },
        M::NewRoute(r) | M::DelRoute(r) => routes(&r.header),
        M::NewNeighbour(n) => match neighbour(n) {
            Some((key, lladdr)) => {
                let before = neighbours.insert(key, lladdr.clone());
                Changes {
                    links: false,
                    // A neighbour seen for the first time may replace one the kernel resolved
                    // before the agent started: count it as a change only once it has an address.
                    next_hops: before.map_or(lladdr.is_some(), |b| b != lladdr),
                }
            }
            None => Changes::default(),
        },
        M::DelNeighbour(n) => match neighbour(n) {
            Some((key, _)) => Changes {
                links: false,
                next_hops: neighbours.remove(&key).is_some_and(|l| l.is_some()),
            },
            None => Changes::default(),
        },
        _ => Changes::default(),
    }
}

/// (interface, address) and link-layer address of a neighbour message.
fn neighbour(n: &NeighbourMessage) -> Option<(NeighbourKey, LinkAddress)> {
    let mut dst = None;
    let mut lladdr = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                dst = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                dst = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(l) if !l.is_empty() => lladdr = Some(l.clone()),
            _ => {}
        }
    }
    Some(((n.header.ifindex, dst?), lladdr))
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::{
        link::LinkMessage,
        route::{RouteHeader, RouteMessage},
    };

    use super::*;

    fn neigh(ifindex: u32, dst: &str, lladdr: Option<[u8; 6]>) -> NeighbourMessage {
        let mut n = NeighbourMessage::default();
        n.header.ifindex = ifindex;
        n.attributes.push(NeighbourAttribute::Destination(
            match dst.parse::<IpAddr>().unwrap() {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            },
        ));
        if let Some(l) = lladdr {
            n.attributes
                .push(NeighbourAttribute::LinkLayerAddress(l.to_vec()));
        }
        n
    }

    fn route(table: u8) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header = RouteHeader {
            table,
            ..Default::default()
        };
        r
    }

    const NONE: Changes = Changes {
        links: false,
        next_hops: false,
    };
    const HOPS: Changes = Changes {
        links: false,
        next_hops: true,
    };

    #[test]
    fn routes_outside_the_local_table_and_links_are_changes() {
        use RouteNetlinkMessage as M;
        let mut n = Neighbours::new();
        let main = route(RouteHeader::RT_TABLE_MAIN);
        assert_eq!(classify(&M::NewRoute(main.clone()), &mut n), HOPS);
        assert_eq!(classify(&M::DelRoute(main), &mut n), HOPS);
        assert_eq!(classify(&M::NewRoute(route(RT_TABLE_LOCAL)), &mut n), NONE);
        assert_eq!(
            classify(&M::NewLink(LinkMessage::default()), &mut n),
            Changes {
                links: true,
                next_hops: false
            }
        );
    }

    #[test]
    fn a_neighbour_counts_when_its_link_layer_address_changes_or_goes() {
        use RouteNetlinkMessage as M;
        let mut n = Neighbours::new();
        let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let cases = [
            // Resolving: no address yet, nothing to re-resolve.
            (M::NewNeighbour(neigh(3, "198.18.100.10", None)), NONE),
            (M::NewNeighbour(neigh(3, "198.18.100.10", Some(a))), HOPS),
            // Reachable → stale → delay with the same address: no change.
            (M::NewNeighbour(neigh(3, "198.18.100.10", Some(a))), NONE),
            // Another interface, another neighbour.
            (M::NewNeighbour(neigh(4, "198.18.100.10", Some(a))), HOPS),
            (M::NewNeighbour(neigh(3, "198.18.100.10", Some(b))), HOPS),
            (M::NewNeighbour(neigh(3, "2001:db8:64::10", Some(b))), HOPS),
            (M::DelNeighbour(neigh(3, "198.18.100.10", Some(b))), HOPS),
            (M::DelNeighbour(neigh(3, "198.18.100.10", Some(b))), NONE),
            // Failed: the address is gone.
            (M::NewNeighbour(neigh(3, "2001:db8:64::10", None)), HOPS),
        ];
        for (i, (m, want)) in cases.iter().enumerate() {
            assert_eq!(classify(m, &mut n), *want, "case {i}: {m:?}");
        }
    }
}
