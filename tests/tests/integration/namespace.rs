//! Real traffic through the datapath: consumer namespaces → node (XDP, native mode on veth) →
//! provider namespace with real TCP and UDP servers. Bounded: fixed counts, socket timeouts.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use ipnet::Ipv4Net;
use privatelink_agent::{
    datapath::loader::{Datapath, Sizes},
    datapath::{Dataplane, DataplaneError},
    testkit::demo::{BACKEND, ENDPOINT, ENDPOINT6, NAT_RANGE, TCP_PORTS, Topology, UDP_PORTS},
};
use privatelink_common as c;
use privatelink_tests::privileged;

const TIMEOUT: Duration = Duration::from_secs(5);
const UDP_QUERIES: usize = 5;

/// A TCP echo server that serves `conns` connections and returns the peers it saw.
fn tcp_echo(listener: TcpListener, conns: usize) -> Vec<SocketAddr> {
    (0..conns)
        .map(|_| {
            let (mut s, peer) = listener.accept().expect("accept");
            s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).expect("server read");
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).expect("server write");
            }
            peer
        })
        .collect()
}

/// A UDP echo server answering `n` datagrams; returns the peers.
fn udp_echo(sock: UdpSocket, n: usize) -> Vec<SocketAddr> {
    sock.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 2048];
    (0..n)
        .map(|_| {
            let (len, peer) = sock.recv_from(&mut buf).expect("udp server recv");
            sock.send_to(&buf[..len], peer).expect("udp server send");
            peer
        })
        .collect()
}

/// Sends `payload` over TCP to the endpoint and returns what came back.
fn tcp_client(payload: Vec<u8>) -> Vec<u8> {
    let addr = SocketAddr::from((ENDPOINT, TCP_PORTS.0));
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect to the endpoint");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(&payload).expect("client write");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("client read");
    back
}

fn udp_client(tag: u8) -> Vec<Vec<u8>> {
    let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    (0..UDP_QUERIES)
        .map(|i| {
            let q = vec![tag, i as u8, 0xab, 0xcd];
            s.send_to(&q, (ENDPOINT, UDP_PORTS.0)).expect("udp send");
            let mut buf = [0u8; 64];
            let (n, from) = s
                .recv_from(&mut buf)
                .expect("udp reply through the endpoint");
            assert_eq!(
                from,
                SocketAddr::from((ENDPOINT, UDP_PORTS.0)),
                "reply comes from the endpoint"
            );
            buf[..n].to_vec()
        })
        .collect()
}

#[test]
fn two_overlapping_consumers_reach_real_servers() {
    if !privileged("two_overlapping_consumers_reach_real_servers") {
        return;
    }
    let topo = Topology::build(2).expect("topology");
    let mut dp = Datapath::load(&Sizes::small()).expect("load");
    // Interface indexes (device map included) are the node namespace's: write from there.
    let mut plane = topo.node.enter(|| {
        let mut plane = Dataplane::new(&mut dp.ebpf).expect("maps");
        plane.apply(&topo.model()).expect("apply");
        plane
    });
    // From this (root namespace) thread the same ifindexes are other devices: refused.
    match plane.apply(&topo.model()) {
        Err(DataplaneError::WrongNamespace { .. }) => {}
        other => panic!("a write from another namespace must be refused, got {other:?}"),
    }
    topo.attach(&mut dp).expect("attach");

    let listener = topo
        .provider
        .enter(|| TcpListener::bind((BACKEND, TCP_PORTS.1)).expect("tcp bind"));
    let udp = topo
        .provider
        .enter(|| UdpSocket::bind((BACKEND, UDP_PORTS.1)).expect("udp bind"));
    let tcp_server = topo.provider.spawn(move || tcp_echo(listener, 2));
    let udp_server = topo.provider.spawn(move || udp_echo(udp, 2 * UDP_QUERIES));

    // Both consumers at once, each with its own payload.
    let payloads: Vec<Vec<u8>> = (0..2u8)
        .map(|i| (0..200_000u32).map(|b| (b as u8) ^ (i * 0x55)).collect())
        .collect();
    let clients: Vec<_> = topo
        .consumers
        .iter()
        .zip(payloads.clone())
        .enumerate()
        .map(|(i, (ns, p))| ns.spawn(move || (tcp_client(p), udp_client(i as u8))))
        .collect();
    let results: Vec<_> = clients
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect();
    let tcp_peers = tcp_server.join().expect("tcp server");
    let udp_peers = udp_server.join().expect("udp server");

    let nat: Ipv4Net = NAT_RANGE.parse().unwrap();
    for (i, (tcp_back, udp_back)) in results.iter().enumerate() {
        assert_eq!(
            tcp_back, &payloads[i],
            "consumer {i}: TCP data came back byte for byte, unmixed"
        );
        for (q, r) in udp_back.iter().enumerate() {
            assert_eq!(
                r,
                &vec![i as u8, q as u8, 0xab, 0xcd],
                "consumer {i}: UDP reply {q}"
            );
        }
    }
    for peer in tcp_peers.iter().chain(&udp_peers) {
        let SocketAddr::V4(v4) = peer else {
            panic!("IPv6 peer {peer}")
        };
        assert!(
            nat.contains(v4.ip()),
            "the backend saw {peer}, not a NAT address"
        );
    }

    let outcomes = plane.global_stats().expect("stats");
    for code in 0..c::DROP_REASONS {
        assert_eq!(
            outcomes[code as usize],
            0,
            "unexpected drops: {}",
            c::OUTCOME_NAMES[code as usize]
        );
    }
    for link in [1, 2] {
        let s = plane.link_stats(link).expect("link stats");
        assert_eq!(s.new_conns, 2, "link {link}: one TCP and one UDP flow");
        assert!(
            s.fwd_bytes > 200_000 && s.rev_bytes > 200_000,
            "link {link}: payload both ways: {s:?}"
        );
        assert!(
            s.fwd_packets >= UDP_QUERIES as u64 && s.rev_packets >= UDP_QUERIES as u64,
            "{s:?}"
        );
    }
    assert!(
        outcomes[c::ARP_REPLIED as usize] >= 2,
        "each consumer resolved the endpoint through the node"
    );
}

#[test]
fn a_closed_backend_port_is_reported_to_the_consumer_through_the_endpoint() {
    if !privileged("a_closed_backend_port_is_reported_to_the_consumer_through_the_endpoint") {
        return;
    }
    let topo = Topology::build(1).expect("topology");
    let mut dp = Datapath::load(&Sizes::small()).expect("load");
    // The endpoint dual-stack: the same refusal must come back over IPv4 (ICMP) and IPv6 (ICMPv6).
    let mut model = topo.model();
    for link in model.links.values_mut() {
        link.ip6 = Some(ENDPOINT6);
    }
    let plane = topo.node.enter(|| {
        let mut plane = Dataplane::new(&mut dp.ebpf).expect("maps");
        plane.apply(&model).expect("apply");
        plane
    });
    topo.attach(&mut dp).expect("attach");
    // Nothing listens on the backend's UDP port: its kernel answers port unreachable to the NAT
    // address, and the consumer's connected socket must see the refusal.
    for (any, endpoint) in [
        ("0.0.0.0:0", IpAddr::from(ENDPOINT)),
        ("[::]:0", ENDPOINT6.into()),
    ] {
        let refused = topo.consumers[0].enter(|| {
            let s = UdpSocket::bind(any).expect("bind");
            s.connect((endpoint, UDP_PORTS.0)).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
            (0..10).any(|_| {
                let _ = s.send(b"anyone there?");
                let mut buf = [0u8; 64];
                matches!(s.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
            })
        });
        assert!(
            refused,
            "the consumer never saw the port unreachable from {endpoint}"
        );
    }
    let outcomes = plane.global_stats().expect("stats");
    assert_eq!(
        outcomes[c::DROP_ICMP_NO_FLOW as usize],
        0,
        "the errors quoted tracked flows"
    );
    assert_eq!(
        plane.flows().len() + plane.flows6().len(),
        4,
        "one flow per family, two entries each"
    );
}

/// A server behind a router whose next link has a smaller MTU: reads everything, answers with the
/// byte count (8 bytes, big endian).
fn count_server(listener: TcpListener) -> u64 {
    let (mut s, _) = listener.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).expect("server read");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    s.write_all(&total.to_be_bytes()).expect("server write");
    total
}

#[test]
fn path_mtu_discovery_works_across_the_endpoint_in_both_families() {
    if !privileged("path_mtu_discovery_works_across_the_endpoint_in_both_families") {
        return;
    }
    use privatelink_agent::testkit::{demo::SERVICE, netns::Netns};
    use std::net::{Ipv4Addr, Ipv6Addr};
    // consumer → node (XDP) → provider, a router → far link with MTU 1280 on the router's side →
    // the backend in a namespace of its own, whose own MTU is 1500 (so it advertises MSS 1460 and
    // nothing but the router's errors can tell the consumer to send less).
    const FAR4: Ipv4Addr = Ipv4Addr::new(198, 18, 101, 10);
    const FAR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x65, 0, 0, 0, 0, 0x10);
    let topo = Topology::build(1).expect("topology");
    let far = Netns::new("fr").expect("far namespace");
    privatelink_agent::testkit::netns::veth(&topo.provider, "far0", &far, "eth0").expect("veth");
    let p = &topo.provider;
    p.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
    p.sysctl("net.ipv6.conf.all.forwarding", "1")
        .expect("forwarding");
    for args in [
        vec!["link", "set", "far0", "mtu", "1280"],
        vec!["addr", "add", "198.18.101.1/24", "dev", "far0"],
        vec!["addr", "add", "2001:db8:65::1/64", "dev", "far0", "nodad"],
    ] {
        p.ip(&args)
            .unwrap_or_else(|e| panic!("provider {args:?}: {e:#}"));
    }
    for args in [
        vec!["addr", "add", "198.18.101.10/24", "dev", "eth0"],
        vec!["addr", "add", "2001:db8:65::10/64", "dev", "eth0", "nodad"],
        vec!["route", "add", NAT_RANGE, "via", "198.18.101.1"],
        vec![
            "route",
            "add",
            privatelink_agent::testkit::demo::NAT_RANGE6,
            "via",
            "2001:db8:65::1",
        ],
    ] {
        far.ip(&args)
            .unwrap_or_else(|e| panic!("far {args:?}: {e:#}"));
    }
    for args in [
        vec!["route", "add", "198.18.101.0/24", "via", "198.18.100.10"],
        vec!["route", "add", "2001:db8:65::/64", "via", "2001:db8:64::10"],
    ] {
        topo.node
            .ip(&args)
            .unwrap_or_else(|e| panic!("node {args:?}: {e:#}"));
    }
    let mut dp = Datapath::load(&Sizes::small()).expect("load");
    let mut model = topo.model();
    for link in model.links.values_mut() {
        link.ip6 = Some(ENDPOINT6);
    }
    model.services.get_mut(&SERVICE).expect("service").backends = vec![FAR4.into(), FAR6.into()];
    let _plane = topo.node.enter(|| {
        let mut plane = Dataplane::new(&mut dp.ebpf).expect("maps");
        plane.apply(&model).expect("apply");
        plane
    });
    topo.attach(&mut dp).expect("attach");

    const SENT: usize = 256 * 1024;
    for (far_addr, endpoint) in [
        (IpAddr::from(FAR4), IpAddr::from(ENDPOINT)),
        (FAR6.into(), ENDPOINT6.into()),
    ] {
        let listener = far
            .enter(|| TcpListener::bind((far_addr, TCP_PORTS.1)))
            .expect("bind");
        let server = far.spawn(move || count_server(listener));
        let got = topo.consumers[0].enter(|| {
            let addr = SocketAddr::new(endpoint, TCP_PORTS.0);
            let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            s.set_write_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            s.write_all(&vec![0x5a; SENT])
                .unwrap_or_else(|e| panic!("writing to {endpoint}: {e} (no PMTU discovery?)"));
            s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut n = [0u8; 8];
            s.read_exact(&mut n)
                .unwrap_or_else(|e| panic!("reply from {endpoint}: {e} (no PMTU discovery?)"));
            u64::from_be_bytes(n)
        });
        assert_eq!(got, SENT as u64, "everything arrived through {endpoint}");
        assert_eq!(server.join().expect("server"), SENT as u64);
        // The consumer learnt the smaller path MTU toward the endpoint from the translated error.
        let route = topo.consumers[0]
            .exec("ip", &["route", "get", &endpoint.to_string()])
            .expect("ip route get");
        let route = String::from_utf8_lossy(&route.stdout).to_string();
        assert!(
            route.contains("mtu 1280"),
            "no learnt MTU toward {endpoint}: {route}"
        );
    }
}

/// A backend that answers one request for N bytes (8 bytes, big endian) with N bytes, then
/// closes; returns the peer it served (the NAT address).
fn bulk_server(listener: TcpListener) -> SocketAddr {
    let (mut s, peer) = listener.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut n = [0u8; 8];
    s.read_exact(&mut n).expect("request");
    let n = u64::from_be_bytes(n) as usize;
    s.write_all(&vec![0xa5; n])
        .unwrap_or_else(|e| panic!("sending {n} bytes to {peer}: {e} (no PMTU discovery?)"));
    peer
}

#[test]
fn path_mtu_discovery_works_for_replies_to_a_consumer_behind_a_smaller_mtu() {
    if !privileged("path_mtu_discovery_works_for_replies_to_a_consumer_behind_a_smaller_mtu") {
        return;
    }
    use privatelink_agent::{
        testkit::demo::{BACKEND6, SERVICE},
        testkit::netns::{Netns, veth},
    };
    use std::net::{Ipv4Addr, Ipv6Addr};
    // The client sits behind a router in the consumer network whose link toward it has MTU 1280:
    // near (client) → consumer namespace (router, near0 MTU 1280) → node (XDP) → provider
    // (backend, MTU 1500). The client's own MTU is 1500, so it advertises MSS 1460; the replies
    // outgrow the router's near link, and its frag-needed / packet-too-big goes to the endpoint
    // address. Only the datapath's translation of that error (to the NAT address's flow, out to
    // the backend) tells the backend to send less.
    const NEAR4: Ipv4Addr = Ipv4Addr::new(198, 18, 102, 10);
    const NEAR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x66, 0, 0, 0, 0, 0x10);
    let topo = Topology::build(1).expect("topology");
    let near = Netns::new("nr").expect("near namespace");
    let router = &topo.consumers[0];
    veth(router, "near0", &near, "eth0").expect("veth");
    router
        .sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding");
    router
        .sysctl("net.ipv4.conf.all.rp_filter", "0")
        .expect("rp_filter");
    router
        .sysctl("net.ipv6.conf.all.forwarding", "1")
        .expect("forwarding");
    for args in [
        vec!["link", "set", "near0", "mtu", "1280"],
        vec!["addr", "add", "198.18.102.1/24", "dev", "near0"],
        vec!["addr", "add", "2001:db8:66::1/64", "dev", "near0", "nodad"],
    ] {
        router
            .ip(&args)
            .unwrap_or_else(|e| panic!("router {args:?}: {e:#}"));
    }
    for args in [
        vec!["addr", "add", "198.18.102.10/24", "dev", "eth0"],
        vec!["addr", "add", "2001:db8:66::10/64", "dev", "eth0", "nodad"],
        vec!["route", "add", "198.18.0.0/24", "via", "198.18.102.1"],
        vec!["route", "add", "2001:db8::/64", "via", "2001:db8:66::1"],
    ] {
        near.ip(&args)
            .unwrap_or_else(|e| panic!("near {args:?}: {e:#}"));
    }
    let mut dp = Datapath::load(&Sizes::small()).expect("load");
    let mut model = topo.model();
    for link in model.links.values_mut() {
        link.ip6 = Some(ENDPOINT6);
    }
    model.services.get_mut(&SERVICE).expect("service").backends =
        vec![BACKEND.into(), BACKEND6.into()];
    let _plane = topo.node.enter(|| {
        let mut plane = Dataplane::new(&mut dp.ebpf).expect("maps");
        plane.apply(&model).expect("apply");
        plane
    });
    topo.attach(&mut dp).expect("attach");

    const WANTED: u64 = 256 * 1024;
    for (backend, client, endpoint) in [
        (
            IpAddr::from(BACKEND),
            IpAddr::from(NEAR4),
            IpAddr::from(ENDPOINT),
        ),
        (BACKEND6.into(), NEAR6.into(), ENDPOINT6.into()),
    ] {
        let listener = topo
            .provider
            .enter(|| TcpListener::bind((backend, TCP_PORTS.1)))
            .expect("bind");
        let server = topo.provider.spawn(move || bulk_server(listener));
        let got = near.enter(|| {
            let addr = SocketAddr::new(endpoint, TCP_PORTS.0);
            let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
                .unwrap_or_else(|e| panic!("{client} connecting to {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            s.write_all(&WANTED.to_be_bytes()).expect("request");
            let mut got = Vec::new();
            s.read_to_end(&mut got)
                .unwrap_or_else(|e| panic!("reply from {endpoint}: {e} (no PMTU discovery?)"));
            got
        });
        assert_eq!(
            got.len() as u64,
            WANTED,
            "everything arrived from {endpoint}"
        );
        assert!(got.iter().all(|&b| b == 0xa5), "the bytes sent");
        let nat = server.join().expect("server").ip();
        // The backend learnt the smaller path MTU toward the NAT address from the translated
        // error (its route cache says so).
        let route = topo
            .provider
            .exec("ip", &["route", "get", &nat.to_string()])
            .expect("ip route get");
        let route = String::from_utf8_lossy(&route.stdout).to_string();
        assert!(
            route.contains("mtu 1280"),
            "no learnt MTU toward {nat}: {route}"
        );
    }
}
