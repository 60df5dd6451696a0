//! The connection log's datapath half as fixtures over both families (BPF_PROG_TEST_RUN): the
//! ring-buffer record of a new flow of a logging link (every field), the flow's counters each way
//! and how it ended, read back through the agent's `StatsReader` once the flow is gone; a link
//! that does not log writes nothing. State set through the agent's `Dataplane::apply`.
use std::net::{IpAddr, SocketAddr};

use privatelink_common as c;
use privatelink_tests::{
    family::Fam,
    fixture::{BACKEND_MAC, CONSUMER_MAC, LINK, with_harness},
    tcpseg::Seg,
    test_run,
};

const XDP_REDIRECT: u32 = 4;

/// An address from a record's wire words.
fn ip(family: u8, w: [u32; 4]) -> IpAddr {
    if family == 4 {
        std::net::Ipv4Addr::from(w[0].to_ne_bytes()).into()
    } else {
        let mut b = [0u8; 16];
        for (i, x) in w.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&x.to_ne_bytes());
        }
        std::net::Ipv6Addr::from(b).into()
    }
}

#[test]
fn a_logged_flow_writes_its_record_and_counts_its_traffic_until_it_is_gone() {
    for fam in Fam::BOTH {
        with_harness(&format!("connlog-{fam:?}"), |h| {
            let mut m = Fam::model(h);
            h.apply(&m);
            let mut ring = h.plane.take_conn_log().expect("the ring buffer");
            let consumer = SocketAddr::new(fam.consumer(), 40_100);
            let endpoint = SocketAddr::new(fam.endpoint(), 80);
            let backend = SocketAddr::new(fam.backend(), 8080);
            let (c0, p0, c0_mac, p0_mac) = (h.c0, h.p0, h.c0_mac, h.p0_mac);
            let send = |h: &mut privatelink_tests::fixture::Harness, ifindex, s: &Seg| {
                let r = test_run(h.dp.program(), ifindex, &s.build());
                assert_eq!(r.verdict, XDP_REDIRECT, "{fam:?}: {s:?}");
                (s.build().len() as u64, Seg::parse(&r.out))
            };
            // Not logging: no record.
            let syn = Seg::new(consumer, endpoint, 1)
                .syn()
                .macs(CONSUMER_MAC, c0_mac);
            send(h, c0, &syn);
            assert!(
                ring.next().is_none(),
                "{fam:?}: a link that does not log writes nothing"
            );
            h.plane.cut_flows(&[LINK].into()).expect("cut");

            m.links.get_mut(&LINK).expect("link").conn_log = true;
            h.apply(&m);
            let consumer = SocketAddr::new(fam.consumer(), 40_101);
            let syn = Seg::new(consumer, endpoint, 1)
                .syn()
                .macs(CONSUMER_MAC, c0_mac);
            let (syn_len, out) = send(h, c0, &syn);
            let nat = out.src;
            let rec = {
                let item = ring.next().expect("a record of the new flow");
                bytemuck::pod_read_unaligned::<c::ConnOpened>(&item)
            };
            assert!(ring.next().is_none(), "one record per flow");
            let family = if fam == Fam::V4 { 4 } else { 6 };
            assert_eq!(
                (rec.link_id, rec.family, rec.proto),
                (LINK, family, c::PROTO_TCP)
            );
            let at = |w, p: u16| SocketAddr::new(ip(family, w), u16::from_be(p));
            assert_eq!(at(rec.consumer_be, rec.consumer_port_be), consumer);
            assert_eq!(at(rec.endpoint_be, rec.endpoint_port_be), endpoint);
            assert_eq!(at(rec.nat_be, rec.nat_port_be), nat);
            assert_eq!(at(rec.backend_be, rec.backend_port_be), backend);
            assert!(rec.time_ns > 0);

            let (rev_len, _) = send(
                h,
                p0,
                &Seg::new(backend, nat, 500)
                    .syn()
                    .ack(2)
                    .macs(BACKEND_MAC, p0_mac),
            );
            let (ack_len, _) = send(
                h,
                c0,
                &Seg::new(consumer, endpoint, 2)
                    .ack(501)
                    .payload(b"hello")
                    .macs(CONSUMER_MAC, c0_mac),
            );
            let (fin_len, _) = send(
                h,
                c0,
                &Seg::new(consumer, endpoint, 7)
                    .ack(501)
                    .fin()
                    .macs(CONSUMER_MAC, c0_mac),
            );
            let mut reader = h.plane.stats_reader().expect("reader");
            assert!(
                reader.ended_connections().is_empty(),
                "{fam:?}: still in conntrack"
            );
            h.plane.cut_flows(&[LINK].into()).expect("cut");
            let ended = reader.ended_connections();
            assert_eq!(ended.len(), 1, "{fam:?}: {ended:?}");
            let e = &ended[0];
            assert_eq!(
                (e.consumer, e.endpoint, e.nat, e.backend),
                (consumer, endpoint, nat, backend)
            );
            assert_eq!(
                (e.fwd_packets, e.fwd_bytes, e.rev_packets, e.rev_bytes),
                (3, syn_len + ack_len + fin_len, 1, rev_len),
                "{fam:?}: counters each way"
            );
            assert_eq!(e.ended, c::CONN_FIN_CONSUMER);
            assert!(reader.ended_connections().is_empty(), "reported once");
            assert_eq!(
                reader.conn_log(),
                [1, 0, 0],
                "{fam:?}: written, lost, uncounted"
            );
        });
    }
}
