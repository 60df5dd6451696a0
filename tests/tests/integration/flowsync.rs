//! The datapath's flow-sync events as packet fixtures over both families (BPF_PROG_TEST_RUN): one
//! connection's segments in order as a table (input, verdict, which of the flow's entries the
//! event names), read from the ring as the group's task reads it; state set through the agent's
//! `Dataplane::apply`. An event names one entry; what goes to the peers is both entries as the
//! table holds them (`node::flowsync::updates_for`). Switched off, the datapath writes nothing.
use std::net::SocketAddr;

use privatelink_agent::{
    datapath::{FlowEventKey, FlowTables},
    node::flowsync::{Update, updates_for},
};
use privatelink_common::{
    CT_CLOSING, CT_ESTABLISHED, CT_SYN_RECV, CT_SYN_SENT, DIR_FORWARD, DIR_REPLY,
};
use privatelink_tests::{
    family::Fam,
    fixture::{BACKEND_MAC, CONSUMER_MAC, with_harness},
    tcpseg::Seg,
    test_run,
};

const XDP_REDIRECT: u32 = 4;

/// One step of a connection: what, whether the consumer sends it, the segment, and the entry the
/// event must name as (direction, new TCP state) (`None`: no event).
type Step<'a> = (&'a str, bool, Seg, Option<(u8, u8)>);

/// (direction, TCP state) of the entry an event's key names, read from the table.
fn named(t: &FlowTables, e: &FlowEventKey) -> Option<(u8, u8)> {
    match e {
        FlowEventKey::V4(k) => t.get4(k).map(|f| (f.dir, f.tcp_state)),
        FlowEventKey::V6(k) => t.get6(k).map(|f| (f.dir, f.tcp_state)),
    }
}

#[test]
fn a_flow_is_announced_when_made_and_at_each_tcp_state_change_and_never_while_switched_off() {
    for fam in Fam::BOTH {
        with_harness(&format!("flowsync-{fam:?}"), |h| {
            let m = Fam::model(h);
            h.apply(&m);
            let mut sync = h.plane.take_flow_sync().expect("the flow sync's maps");
            let tables = h.plane.flow_tables().expect("tables");
            let consumer = SocketAddr::new(fam.consumer(), 40000);
            let endpoint = SocketAddr::new(fam.endpoint(), 80);
            let backend = SocketAddr::new(fam.backend(), 8080);
            let to_node = (CONSUMER_MAC, h.c0_mac);
            let from_backend = (BACKEND_MAC, h.p0_mac);
            let c = |seq: u32| Seg::new(consumer, endpoint, seq).macs(to_node.0, to_node.1);

            // Switched off (a node outside any group): a new flow writes nothing.
            let r = test_run(h.dp.program(), h.c0, &c(1).syn().build());
            assert_eq!(r.verdict, XDP_REDIRECT);
            assert_eq!(sync.drain(), [], "{fam:?}: off");

            sync.switch(true).expect("switch on");
            let consumer = SocketAddr::new(fam.consumer(), 40001);
            let c = |seq: u32| Seg::new(consumer, endpoint, seq).macs(to_node.0, to_node.1);
            let syn = c(100).syn();
            let r = test_run(h.dp.program(), h.c0, &syn.build());
            assert_eq!(r.verdict, XDP_REDIRECT, "{fam:?}: SYN");
            let nat = Seg::parse(&r.out).src;
            let b = |seq: u32| Seg::new(backend, nat, seq).macs(from_backend.0, from_backend.1);
            let events = sync.drain();
            assert_eq!(events.len(), 1, "{fam:?}: the new flow, once: {events:?}");
            assert_eq!(
                named(&tables, &events[0]),
                Some((DIR_FORWARD, CT_SYN_SENT)),
                "{fam:?}: the SYN names the forward entry"
            );
            // Sent to peers: both entries, as the table has them.
            let updates = updates_for(&tables, &events);
            let dirs: Vec<u8> = updates
                .iter()
                .map(|u| match u {
                    Update::Upsert4(_, f) => f.dir,
                    Update::Upsert6(_, f) => f.dir,
                    _ => u8::MAX,
                })
                .collect();
            assert_eq!(dirs, [DIR_FORWARD, DIR_REPLY], "{fam:?}: {updates:?}");

            let table: Vec<Step> = vec![
                (
                    "the backend's SYN-ACK",
                    false,
                    b(500).syn().ack(101),
                    Some((DIR_FORWARD, CT_SYN_RECV)),
                ),
                (
                    "the consumer's ACK completes the handshake",
                    true,
                    c(101).ack(501),
                    Some((DIR_REPLY, CT_ESTABLISHED)),
                ),
                (
                    "data from the consumer",
                    true,
                    c(101).ack(501).payload(b"hi"),
                    None,
                ),
                (
                    "data from the backend",
                    false,
                    b(501).ack(103).payload(b"yo"),
                    None,
                ),
                (
                    "the consumer's FIN",
                    true,
                    c(103).ack(503).fin(),
                    Some((DIR_REPLY, CT_CLOSING)),
                ),
                (
                    "the backend's FIN (closing already)",
                    false,
                    b(503).ack(104).fin(),
                    None,
                ),
            ];
            for (what, from_consumer, seg, want) in table {
                let iface = if from_consumer { h.c0 } else { h.p0 };
                let r = test_run(h.dp.program(), iface, &seg.build());
                assert_eq!(r.verdict, XDP_REDIRECT, "{fam:?}: {what}");
                let events = sync.drain();
                let got: Vec<_> = events.iter().map(|e| named(&tables, e)).collect();
                assert_eq!(
                    got,
                    want.into_iter().map(Some).collect::<Vec<_>>(),
                    "{fam:?}: {what}"
                );
            }
            assert_eq!(sync.lost(), 0, "{fam:?}: nothing lost");

            // Off again: nothing more.
            sync.switch(false).expect("switch off");
            let consumer = SocketAddr::new(fam.consumer(), 40002);
            let syn = Seg::new(consumer, endpoint, 7)
                .syn()
                .macs(to_node.0, to_node.1);
            assert_eq!(
                test_run(h.dp.program(), h.c0, &syn.build()).verdict,
                XDP_REDIRECT
            );
            assert_eq!(sync.drain(), [], "{fam:?}: off again");
        });
    }
}
