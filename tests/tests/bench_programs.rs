//! The benchmark's own XDP programs (`cargo xtask bench`): the generator must send exactly the
//! frame it was given, or a new valid flow per frame, and the sink must count what it drops. A
//! wrong checksum here would make the kernel's conntrack refuse the frames in the comparison.
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use privatelink_agent::loader::{Datapath, Sizes};
use privatelink_tests::{
    fixture::{CONSUMER, CONSUMER_MAC, ENDPOINT, Pkt, with_harness},
    privileged, test_run,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// A 60-byte UDP frame from 198.18.0.10:40000 to 198.18.0.100:53 without UDP checksum.
fn frame() -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 10], [198, 18, 0, 100], 64)
        .udp(40000, 53)
        .write(&mut f, &[0x17; 18])
        .expect("frame");
    f[40..42].copy_from_slice(&[0, 0]);
    f
}

/// (source address, source port) of a generated frame, its IPv4 checksum verified.
fn source(f: &[u8]) -> ([u8; 4], u16) {
    let p = SlicedPacket::from_ethernet(f).expect("parsable");
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4: {f:02x?}")
    };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
    let Some(TransportSlice::Udp(u)) = &p.transport else {
        panic!("not UDP")
    };
    assert_eq!(u.checksum(), 0, "no UDP checksum");
    (h.source, u.source_port())
}

#[test]
fn the_generator_restores_its_frame_or_opens_a_new_flow_per_frame_and_the_sink_counts() {
    if !privileged("the_generator_restores_its_frame_or_opens_a_new_flow_per_frame") {
        return;
    }
    let mut dp = Datapath::load(&Sizes::small()).expect("load");
    let want = frame();
    dp.set_gen_frame(&want).expect("frame head");
    // A frame as the forwarding left it (another destination, other MACs) goes out as given.
    let mut translated = want.clone();
    translated[0..12].copy_from_slice(&[9; 12]);
    translated[30..34].copy_from_slice(&[198, 18, 100, 10]);
    let r = test_run(dp.gen_program().expect("generator program"), 0, &translated);
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(r.out, want, "the head is restored, the rest untouched");

    // New flows: ports from 1024 on, the address's last byte moving on after 64,512 of them.
    dp.set_gen_new_flows(true).expect("new flows on");
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..3u16 {
        let r = test_run(dp.gen_program().expect("generator program"), 0, &want);
        assert_eq!(r.verdict, XDP_TX);
        let (src, port) = source(&r.out);
        assert_eq!((src, port), ([198, 18, 0, 10], 1024 + i));
        assert!(seen.insert((src, port)));
        assert_eq!(r.out[42..], want[42..], "payload untouched");
    }
    for _ in 3..64_512 {
        test_run(dp.gen_program().expect("generator program"), 0, &want);
    }
    let r = test_run(dp.gen_program().expect("generator program"), 0, &want);
    assert_eq!(source(&r.out), ([198, 18, 0, 11], 1024), "the next address");
    dp.set_gen_new_flows(false).expect("new flows off");
    assert_eq!(
        test_run(dp.gen_program().expect("generator program"), 0, &want).out,
        want
    );

    let before = dp.sink_count().expect("sink count");
    for _ in 0..5 {
        assert_eq!(
            test_run(dp.sink_program().expect("sink program"), 0, &want).verdict,
            XDP_DROP
        );
    }
    assert_eq!(dp.sink_count().expect("sink count"), before + 5);
}

/// A TCP SYN from 198.18.0.10:40000 to 198.18.100.10:8080 with an MSS option (58 bytes).
fn syn() -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 10], [198, 18, 100, 10], 64)
        .tcp(40000, 8080, 0x0102_0304, 64240)
        .syn()
        .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
        .expect("options")
        .write(&mut f, &[])
        .expect("frame");
    f
}

/// (source port, syn, ack, sequence number, acknowledgement number) of a TCP frame whose IPv4 and
/// TCP checksums are verified.
fn tcp_of(f: &[u8]) -> (u16, bool, bool, u32, u32) {
    let parsed = privatelink_tests::parse_checked(f);
    let p = SlicedPacket::from_ethernet(f).expect("parsable");
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!("not TCP: {f:02x?}")
    };
    (
        parsed.sport,
        t.syn(),
        t.ack(),
        t.sequence_number(),
        t.acknowledgment_number(),
    )
}

#[test]
fn the_generator_keeps_tcp_checksums_valid_and_the_responder_answers_syns() {
    if !privileged("the_generator_keeps_tcp_checksums_valid_and_the_responder_answers_syns") {
        return;
    }
    let mut dp = Datapath::load(&Sizes::small()).expect("load");
    let want = syn();
    dp.set_gen_frame(&want).expect("frame head");
    dp.set_gen_new_flows(true).expect("new flows on");
    let mut sent = Vec::new();
    for i in 0..3u16 {
        let r = test_run(dp.gen_program().expect("generator program"), 0, &want);
        assert_eq!(r.verdict, XDP_TX);
        assert_eq!(
            tcp_of(&r.out),
            (1024 + i, true, false, 0x0102_0304, 0),
            "a new source port, the SYN and both checksums valid"
        );
        assert_eq!(r.out[54..], want[54..], "options untouched");
        sent.push(r.out);
    }

    for (i, s) in sent.iter().enumerate() {
        let r = test_run(dp.responder_program().expect("responder program"), 0, s);
        assert_eq!(r.verdict, XDP_TX, "a SYN is answered");
        let (sport, syn, ack, seq, ack_no) = tcp_of(&r.out);
        assert_eq!(sport, 8080, "from the port the SYN went to");
        assert!(syn && ack, "SYN-ACK");
        assert_eq!(ack_no, 0x0102_0305, "acknowledges the SYN");
        assert_ne!(seq, 0, "a sequence number of its own");
        let got = privatelink_tests::parse_checked(&r.out);
        let asked = privatelink_tests::parse_checked(s);
        assert_eq!(
            (got.src, got.dst, got.dport, got.src_mac, got.dst_mac),
            (
                asked.dst,
                asked.src,
                asked.sport,
                asked.dst_mac,
                asked.src_mac
            ),
            "SYN-ACK {i}: addresses, ports and MACs swapped"
        );
        assert_eq!(r.out[54..], s[54..], "options kept");
    }
    // Anything but a SYN is dropped.
    let mut ack = sent[0].clone();
    ack[47] = 0x10;
    assert_eq!(
        test_run(dp.responder_program().expect("responder program"), 0, &ack).verdict,
        XDP_DROP
    );
    let udp = frame();
    assert_eq!(
        test_run(dp.responder_program().expect("responder program"), 0, &udp).verdict,
        XDP_DROP
    );
}

#[test]
fn the_lookup_floor_bounces_frames_of_tracked_flows_and_passes_the_rest() {
    with_harness("lookup_floor", |h| {
        let m = h.model();
        h.apply(&m);
        let ack = Pkt::tcp(CONSUMER, 40000, ENDPOINT, 80, false, true)
            .macs(CONSUMER_MAC, h.c0_mac)
            .build();
        let (c0, prog) = (h.c0, privatelink_agent::loader::LOOKUP_FLOOR_PROGRAM);
        let before = h.outcomes();
        let r = test_run(h.dp.bench_program(prog).expect("lookup floor"), c0, &ack);
        assert_eq!(r.verdict, XDP_PASS, "no flow yet: {r:?}");
        assert_eq!(r.out, ack, "a miss leaves the frame as it was");

        assert_eq!(h.run(c0, &h.consumer_syn(40000)).verdict, XDP_REDIRECT);
        let r = test_run(h.dp.bench_program(prog).expect("lookup floor"), c0, &ack);
        assert_eq!(r.verdict, XDP_TX, "the SYN's flow is found");
        let mut want = ack.clone();
        want[..6].copy_from_slice(&ack[6..12]);
        want[6..12].copy_from_slice(&ack[..6]);
        assert_eq!(r.out, want, "a hit swaps the MACs, nothing else");

        // On the provider interface the same tuple is in another network: no flow there.
        let r = test_run(h.dp.bench_program(prog).expect("lookup floor"), h.p0, &ack);
        assert_eq!(r.verdict, XDP_PASS, "the key carries the receiving network");
        let mut after = h.outcomes();
        // Only the SYN run through the datapath counted; the lookup floor counts nothing.
        after[privatelink_common::FWD_REDIRECT as usize] -= 1;
        assert_eq!(after, before, "outcome counters");
    });
}
