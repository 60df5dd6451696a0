//! The benchmark's own XDP programs (`cargo xtask bench`): the generator must send exactly the
//! frame it was given, or a new valid flow per frame, and hold frames back while its window is
//! full; the sink must count what it drops, and the responder and the acker must play their end of
//! a short TCP connection with valid segments. A wrong checksum here would make the kernel's
//! conntrack refuse the frames in the comparison.
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use privatelink_agent::datapath::loader::{Datapath, Sizes};
use privatelink_common::bench::{
    CLOCK_EVERY, WINDOW_DONE, WINDOW_FIRST_NS, WINDOW_LAST_NS, WINDOW_SENT,
};
use privatelink_tests::benchkit::{ACKER_PROGRAM, Bench, RESPONDER_PROGRAM};
use privatelink_tests::{
    fixture::{CONSUMER, CONSUMER_MAC, ENDPOINT, Pkt, with_harness},
    privileged, test_run, test_run_repeated,
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
    let dp = Datapath::load(&Sizes::small()).expect("load");
    let mut bench = Bench::load(&dp, 1).expect("bench object");
    let want = frame();
    bench.set_gen_frame(&want).expect("frame head");
    // A frame as the forwarding left it (another destination, other MACs) goes out as given.
    let mut translated = want.clone();
    translated[0..12].copy_from_slice(&[9; 12]);
    translated[30..34].copy_from_slice(&[198, 18, 100, 10]);
    let r = test_run(
        bench.gen_program().expect("generator program"),
        0,
        &translated,
    );
    assert_eq!(r.verdict, XDP_TX);
    assert_eq!(r.out, want, "the head is restored, the rest untouched");

    // New flows: ports from 1024 on, the address's last byte moving on after 64,512 of them.
    bench.set_gen_new_flows(true).expect("new flows on");
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..3u16 {
        let r = test_run(bench.gen_program().expect("generator program"), 0, &want);
        assert_eq!(r.verdict, XDP_TX);
        let (src, port) = source(&r.out);
        assert_eq!((src, port), ([198, 18, 0, 10], 1024 + i));
        assert!(seen.insert((src, port)));
        assert_eq!(r.out[42..], want[42..], "payload untouched");
    }
    for _ in 3..64_512 {
        test_run(bench.gen_program().expect("generator program"), 0, &want);
    }
    let r = test_run(bench.gen_program().expect("generator program"), 0, &want);
    assert_eq!(source(&r.out), ([198, 18, 0, 11], 1024), "the next address");
    bench.set_gen_new_flows(false).expect("new flows off");
    assert_eq!(
        test_run(bench.gen_program().expect("generator program"), 0, &want).out,
        want
    );

    let before = bench.sink_count().expect("sink count");
    for _ in 0..5 {
        assert_eq!(
            test_run(bench.sink_program().expect("sink program"), 0, &want).verdict,
            XDP_DROP
        );
    }
    assert_eq!(bench.sink_count().expect("sink count"), before + 5);
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

/// A TCP segment as the test reads it back, both checksums verified: (source port, flags as
/// "SAFRP" letters, sequence number, acknowledgement number, payload).
fn segment(f: &[u8]) -> (u16, String, u32, u32, Vec<u8>) {
    let sport = privatelink_tests::parse_checked(f).sport;
    let p = SlicedPacket::from_ethernet(f).expect("parsable");
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!("not TCP: {f:02x?}")
    };
    let flags = [
        (t.syn(), 'S'),
        (t.ack(), 'A'),
        (t.fin(), 'F'),
        (t.rst(), 'R'),
        (t.psh(), 'P'),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, c)| *c)
    .collect();
    (
        sport,
        flags,
        t.sequence_number(),
        t.acknowledgment_number(),
        t.payload().to_vec(),
    )
}

#[test]
fn the_generator_keeps_tcp_checksums_valid_and_the_responder_answers_syns() {
    if !privileged("the_generator_keeps_tcp_checksums_valid_and_the_responder_answers_syns") {
        return;
    }
    let dp = Datapath::load(&Sizes::small()).expect("load");
    let mut bench = Bench::load(&dp, 1).expect("bench object");
    let want = syn();
    bench.set_gen_frame(&want).expect("frame head");
    bench.set_gen_new_flows(true).expect("new flows on");
    let mut sent = Vec::new();
    for i in 0..3u16 {
        let r = test_run(bench.gen_program().expect("generator program"), 0, &want);
        assert_eq!(r.verdict, XDP_TX);
        let (sport, flags, seq, ack, _) = segment(&r.out);
        assert_eq!(
            (sport, flags.as_str(), seq, ack),
            (1024 + i, "S", 0x0102_0304, 0),
            "a new source port, the SYN and both checksums valid"
        );
        assert_eq!(r.out[54..], want[54..], "options untouched");
        sent.push(r.out);
    }

    for (i, s) in sent.iter().enumerate() {
        let r = test_run(bench.responder_program().expect("responder program"), 0, s);
        assert_eq!(r.verdict, XDP_TX, "a SYN is answered");
        let (sport, flags, seq, ack_no, _) = segment(&r.out);
        assert_eq!(sport, 8080, "from the port the SYN went to");
        assert_eq!(flags, "SA", "SYN-ACK");
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
        test_run(
            bench.responder_program().expect("responder program"),
            0,
            &ack
        )
        .verdict,
        XDP_DROP
    );
    let udp = frame();
    assert_eq!(
        test_run(
            bench.responder_program().expect("responder program"),
            0,
            &udp
        )
        .verdict,
        XDP_DROP
    );
}

/// Runs `program` on `frame` and returns its answer, after checking that the answer goes back
/// where the frame came from (MACs, addresses and ports swapped).
fn answered(bench: &mut Bench, program: &'static str, frame: &[u8]) -> Vec<u8> {
    let r = test_run(bench.bench_program(program).expect("program"), 0, frame);
    assert_eq!(r.verdict, XDP_TX, "{program} answers {frame:02x?}");
    let (got, asked) = (
        privatelink_tests::parse_checked(&r.out),
        privatelink_tests::parse_checked(frame),
    );
    assert_eq!(
        (
            got.src,
            got.dst,
            got.sport,
            got.dport,
            got.src_mac,
            got.dst_mac
        ),
        (
            asked.dst,
            asked.src,
            asked.dport,
            asked.sport,
            asked.dst_mac,
            asked.src_mac
        ),
        "{program}: addresses, ports and MACs swapped"
    );
    assert_eq!(
        r.out.len(),
        frame.len(),
        "{program}: the frame keeps its length"
    );
    r.out
}

#[test]
fn the_acker_and_the_responder_play_a_short_connection_and_count_what_completes() {
    if !privileged("the_acker_and_the_responder_play_a_short_connection") {
        return;
    }
    let dp = Datapath::load(&Sizes::small()).expect("load");
    let mut bench = Bench::load(&dp, 1).expect("bench object");
    let completed = |bench: &Bench| bench.gen_window().expect("window")[WINDOW_DONE];
    let (completed0, answered0) = (
        completed(&bench),
        bench.responder_count().expect("responder count"),
    );
    let syn = syn();
    let client_isn = 0x0102_0304u32;
    let syn_ack = answered(&mut bench, RESPONDER_PROGRAM, &syn);
    let (_, flags, server_isn, ack, payload) = segment(&syn_ack);
    assert_eq!((flags.as_str(), ack), ("SA", client_isn + 1), "SYN-ACK");
    assert!(payload.is_empty());

    // The final ACK carries the request: the SYN-ACK's MSS option bytes, now payload.
    let request = answered(&mut bench, ACKER_PROGRAM, &syn_ack);
    let (_, flags, seq, ack, payload) = segment(&request);
    assert_eq!(
        (flags.as_str(), seq, ack, payload.as_slice()),
        ("AP", client_isn + 1, server_isn + 1, &syn_ack[54..58]),
        "the final ACK with a 4-byte request"
    );

    let reply = answered(&mut bench, RESPONDER_PROGRAM, &request);
    let (_, flags, seq, ack, payload) = segment(&reply);
    assert_eq!(
        (flags.as_str(), seq, ack, payload.as_slice()),
        ("AP", server_isn + 1, client_isn + 5, &syn_ack[54..58]),
        "the echo, acknowledging the request"
    );

    let reset = answered(&mut bench, ACKER_PROGRAM, &reply);
    let (_, flags, seq, ack, _) = segment(&reset);
    assert_eq!(
        (flags.as_str(), seq, ack),
        ("AR", client_isn + 5, server_isn + 5),
        "the client's reset, at the server's next expected sequence number"
    );

    // A FIN is reset by either end, and is no completed connection.
    let mut fin = request.clone();
    fin[47] = 0x11;
    let fin = fix(&fin);
    for program in [RESPONDER_PROGRAM, ACKER_PROGRAM] {
        let (_, flags, seq, ack, _) = segment(&answered(&mut bench, program, &fin));
        assert_eq!(
            (flags.as_str(), seq, ack),
            ("AR", server_isn + 1, client_isn + 6),
            "{program} resets a FIN (request and FIN acknowledged)"
        );
    }

    // Dropped: a bare ACK by both, a SYN by the acker, a reset, a SYN-ACK without options to make
    // a request of, UDP.
    let mut bare_syn_ack = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4([198, 18, 100, 10], [198, 18, 0, 10], 64)
        .tcp(8080, 40000, 7, 64240)
        .syn()
        .ack(client_isn + 1)
        .write(&mut bare_syn_ack, &[])
        .expect("SYN-ACK");
    let mut bare_ack = request[..54].to_vec();
    bare_ack[16..18].copy_from_slice(&40u16.to_be_bytes());
    bare_ack[47] = 0x10;
    let bare_ack = fix(&bare_ack);
    let drops: [(&str, &str, &[u8]); 8] = [
        (RESPONDER_PROGRAM, "a bare ACK", &bare_ack),
        (ACKER_PROGRAM, "a bare ACK", &bare_ack),
        (ACKER_PROGRAM, "a SYN", &syn),
        (RESPONDER_PROGRAM, "a reset", &reset),
        (ACKER_PROGRAM, "a reset", &reset),
        (ACKER_PROGRAM, "a SYN-ACK without options", &bare_syn_ack),
        (RESPONDER_PROGRAM, "UDP", &frame()),
        (ACKER_PROGRAM, "UDP", &frame()),
    ];
    for (program, what, f) in drops {
        assert_eq!(
            test_run(bench.bench_program(program).expect("program"), 0, f).verdict,
            XDP_DROP,
            "{program} drops {what}"
        );
    }
    assert_eq!(
        (
            completed(&bench) - completed0,
            bench.responder_count().expect("responder count") - answered0
        ),
        (1, 1),
        "one connection completed, one SYN answered"
    );
}

/// `frame` (IPv4 without options, then TCP) with both checksums computed afresh.
fn fix(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    let p = SlicedPacket::from_ethernet(frame).expect("parsable");
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(t))) = (&p.net, &p.transport) else {
        panic!("not TCP over IPv4: {frame:02x?}")
    };
    let ip = ip.header().to_header();
    let tcp = t
        .to_header()
        .calc_checksum_ipv4(&ip, t.payload())
        .expect("TCP checksum");
    f[24..26].copy_from_slice(&ip.calc_header_checksum().to_be_bytes());
    f[50..52].copy_from_slice(&tcp.to_be_bytes());
    f
}

#[test]
fn the_generators_window_holds_back_frames_while_connections_are_pending() {
    if !privileged("the_generators_window_holds_back_frames") {
        return;
    }
    let dp = Datapath::load(&Sizes::small()).expect("load");
    let mut bench = Bench::load(&dp, 1).expect("bench object");
    let syn = syn();
    bench.set_gen_frame(&syn).expect("frame head");
    bench.set_gen_new_flows(true).expect("new flows on");
    let generate = |bench: &mut Bench| {
        test_run(bench.gen_program().expect("generator program"), 0, &syn).verdict
    };
    // Two pending at most, three in all.
    bench.set_gen_window(2, 3).expect("window");
    assert_eq!(
        [generate(&mut bench), generate(&mut bench)],
        [XDP_TX, XDP_TX]
    );
    assert_eq!(generate(&mut bench), XDP_DROP, "two pending: held back");
    let w = bench.gen_window().expect("window");
    assert_eq!((w[WINDOW_SENT], w[WINDOW_DONE]), (2, 0));
    assert_ne!(w[WINDOW_FIRST_NS], 0, "the first frame's time is kept");

    // One connection completes (the acker resets the reply of a connection).
    let syn_ack = answered(&mut bench, RESPONDER_PROGRAM, &syn);
    let request = answered(&mut bench, ACKER_PROGRAM, &syn_ack);
    let reply = answered(&mut bench, RESPONDER_PROGRAM, &request);
    answered(&mut bench, ACKER_PROGRAM, &reply);
    let w = bench.gen_window().expect("window");
    assert_eq!(w[WINDOW_DONE], 1);
    assert!(
        w[WINDOW_LAST_NS] >= w[WINDOW_FIRST_NS],
        "the completion's time is kept"
    );
    assert_eq!(generate(&mut bench), XDP_TX, "one pending: the next goes");
    assert_eq!(
        generate(&mut bench),
        XDP_DROP,
        "three sent: the total is reached"
    );

    bench.set_gen_window(0, 0).expect("window off");
    assert_eq!(
        [
            generate(&mut bench),
            generate(&mut bench),
            generate(&mut bench)
        ],
        [XDP_TX; 3]
    );
}

/// Runs the sink on `frame` `repeat` times in one test run (one CPU throughout).
fn sink_run(bench: &mut Bench, frame: &[u8], repeat: u32) {
    let sink = bench.sink_program().expect("sink program");
    let (verdict, _) = test_run_repeated(sink, 0, frame, repeat);
    assert_eq!(verdict, XDP_DROP, "the sink drops");
}

#[test]
fn the_sinks_clock_times_the_frames_between_its_first_and_latest_sample() {
    if !privileged("the_sinks_clock_times_the_frames") {
        return;
    }
    // The clock is per CPU: every run on one CPU, so each one sees what the last one left.
    privatelink_tests::pin_to_cpu0();
    let dp = Datapath::load(&Sizes::small()).expect("load");
    let mut bench = Bench::load(&dp, 1).expect("bench object");
    let f = frame();
    bench.reset_sink_clock().expect("reset");
    assert_eq!(
        bench.sink_clock().expect("clock"),
        (0, 0),
        "nothing sampled"
    );
    // 64 frames hold one multiple of CLOCK_EVERY of the CPU's count: a first sample, no span.
    sink_run(&mut bench, &f, CLOCK_EVERY as u32);
    assert_eq!(
        bench.sink_clock().expect("clock"),
        (0, 0),
        "one sample: no span"
    );

    // After a reset, 300 frames hold 4 or 5 multiples of 64 of the count: the span from the
    // first sample to the latest is 3 or 4 times 64 frames.
    bench.reset_sink_clock().expect("reset");
    let before = bench.sink_count().expect("count");
    sink_run(&mut bench, &f, 300);
    assert_eq!(bench.sink_count().expect("count"), before + 300);
    let (frames, ns) = bench.sink_clock().expect("clock");
    assert!(
        frames == 3 * CLOCK_EVERY || frames == 4 * CLOCK_EVERY,
        "frames between the samples of 300: {frames}"
    );
    assert!(ns > 0, "a span of time: {ns} ns");
    sink_run(&mut bench, &f, 640);
    let (more, later) = bench.sink_clock().expect("clock");
    assert_eq!(
        more,
        frames + 640,
        "the latest sample moves on, the first stays"
    );
    assert!(later > ns, "{later} ns after {ns} ns");

    bench.reset_sink_clock().expect("reset");
    assert_eq!(bench.sink_clock().expect("clock"), (0, 0), "reset");
}

#[test]
fn the_lookup_floor_bounces_frames_of_tracked_flows_and_passes_the_rest() {
    with_harness("lookup_floor", |h| {
        let m = h.model();
        h.apply(&m);
        let ack = Pkt::tcp(CONSUMER, 40000, ENDPOINT, 80, false, true)
            .macs(CONSUMER_MAC, h.c0_mac)
            .build();
        let (c0, prog) = (h.c0, privatelink_tests::benchkit::LOOKUP_FLOOR_PROGRAM);
        let before = h.outcomes();
        let r = test_run(
            h.bench().bench_program(prog).expect("lookup floor"),
            c0,
            &ack,
        );
        assert_eq!(r.verdict, XDP_PASS, "no flow yet: {r:?}");
        assert_eq!(r.out, ack, "a miss leaves the frame as it was");

        assert_eq!(h.run(c0, &h.consumer_syn(40000)).verdict, XDP_REDIRECT);
        let r = test_run(
            h.bench().bench_program(prog).expect("lookup floor"),
            c0,
            &ack,
        );
        assert_eq!(r.verdict, XDP_TX, "the SYN's flow is found");
        let mut want = ack.clone();
        want[..6].copy_from_slice(&ack[6..12]);
        want[6..12].copy_from_slice(&ack[..6]);
        assert_eq!(r.out, want, "a hit swaps the MACs, nothing else");

        // On the provider interface the same tuple is in another network: no flow there.
        let p0 = h.p0;
        let r = test_run(
            h.bench().bench_program(prog).expect("lookup floor"),
            p0,
            &ack,
        );
        assert_eq!(r.verdict, XDP_PASS, "the key carries the receiving network");
        let mut after = h.outcomes();
        // Only the SYN run through the datapath counted; the lookup floor counts nothing.
        after[privatelink_common::FWD_REDIRECT as usize] -= 1;
        assert_eq!(after, before, "outcome counters");
    });
}

#[test]
fn the_slot_floor_claims_two_slots_per_new_tuple_until_its_probes_run_out() {
    if !privileged("the_slot_floor_claims_two_slots_per_new_tuple_until_its_probes_run_out") {
        return;
    }
    use privatelink_common::bench::{SLOT_PROBES, SLOT_TABLE_ENTRIES};
    use privatelink_tests::benchkit::SLOT_FLOOR_PROGRAM;
    let syn = |port| {
        Pkt::syn(CONSUMER, port, ENDPOINT, 80)
            .macs(CONSUMER_MAC, [2, 0, 0, 0, 0, 9])
            .build()
    };
    let bounced = |f: &[u8]| {
        let mut want = f.to_vec();
        want[..6].copy_from_slice(&f[6..12]);
        want[6..12].copy_from_slice(&f[..6]);
        want
    };

    // With the agent's sizes the table has one slot, so the floor finds none and passes.
    let dp = Datapath::load(&Sizes::small()).expect("load");
    let mut bench = Bench::load(&dp, 1).expect("bench object");
    let r = test_run(
        bench.bench_program(SLOT_FLOOR_PROGRAM).expect("slot floor"),
        0,
        &syn(40000),
    );
    assert_eq!(r.verdict, XDP_PASS, "a one-slot table: {r:?}");
    drop((bench, dp));

    let dp = Datapath::load(&Sizes::small()).expect("load");
    let mut bench = Bench::load(&dp, SLOT_TABLE_ENTRIES).expect("the bench's slot table");
    let f = syn(40000);
    // The same tuple again finds its slots taken and probes on, one slot further each run.
    for run in 0..SLOT_PROBES {
        let r = test_run(
            bench.bench_program(SLOT_FLOOR_PROGRAM).expect("slot floor"),
            0,
            &f,
        );
        assert_eq!(r.verdict, XDP_TX, "run {run} claims two slots: {r:?}");
        assert_eq!(
            r.out,
            bounced(&f),
            "run {run}: the MACs swapped, nothing else"
        );
    }
    let r = test_run(
        bench.bench_program(SLOT_FLOOR_PROGRAM).expect("slot floor"),
        0,
        &f,
    );
    assert_eq!(r.verdict, XDP_PASS, "all {SLOT_PROBES} probes taken: {r:?}");
    assert_eq!(r.out, f, "a frame that found no slot passes as it came");
    // Another tuple hashes elsewhere and still finds room.
    let g = syn(40001);
    let r = test_run(
        bench.bench_program(SLOT_FLOOR_PROGRAM).expect("slot floor"),
        0,
        &g,
    );
    assert_eq!(r.verdict, XDP_TX, "a new tuple: {r:?}");
}

/// The floors measure the datapath's own state: every map the lookup floor uses is one of the
/// datapath program's maps (the same kernel map, not a copy with the same name).
#[test]
fn the_benchmark_object_uses_the_datapaths_own_maps() {
    with_harness("bench_shares_maps", |h| {
        let map_ids = |p: &aya::programs::Xdp| -> std::collections::BTreeSet<u32> {
            p.info()
                .expect("program info")
                .map_ids()
                .expect("map ids")
                .unwrap_or_default()
                .into_iter()
                .collect()
        };
        let datapath = map_ids(h.dp.program());
        let floor = map_ids(
            h.bench()
                .bench_program(privatelink_tests::benchkit::LOOKUP_FLOOR_PROGRAM)
                .expect("lookup floor"),
        );
        assert!(floor.len() >= 3, "the lookup floor uses maps: {floor:?}");
        assert!(
            floor.is_subset(&datapath),
            "lookup floor maps {floor:?} not all in the datapath's {datapath:?}"
        );
    });
}
