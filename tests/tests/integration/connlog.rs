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

/// The whole log with real software: nginx behind a logging service, curl from two consumer
/// networks with the same CIDR; every connection nginx saw (by its NAT address and port) has an
/// opened and a closed record in the API naming the right endpoint and account, and the file
/// beside the state has them too. A consumer cannot read the provider's log.
mod real {
    use std::{
        collections::BTreeMap,
        net::Ipv4Addr,
        time::{Duration, Instant},
    };

    use privatelink_agent::testkit::demo::CLIENT;
    use privatelink_tests::{
        privileged,
        world::{World, api},
    };
    use serde_json::{Value, json};

    use crate::acceptance::{Kind, eventually, offer, run, succeeds};

    const WEB: Kind = Kind {
        name: "logged",
        service_type: "clb",
        protocol: "tcp",
        backend: Ipv4Addr::new(198, 18, 100, 31),
        service_port: 8090,
        terminal_port: 80,
        endpoint: Ipv4Addr::new(198, 18, 0, 121),
    };

    fn records(w: &World, token: &str, svc: &str) -> (u16, Vec<Value>) {
        let (status, v) = api(
            &w.topo,
            token,
            "GET",
            &format!("/v1/services/{svc}/connections-log?limit=1000"),
            None,
        );
        (status, v["records"].as_array().cloned().unwrap_or_default())
    }

    #[test]
    fn every_connection_nginx_saw_has_its_opened_and_closed_records() {
        if !privileged("every_connection_nginx_saw_has_its_opened_and_closed_records") {
            return;
        }
        let (mut w, _agent) = privatelink_tests::world::world_with(
            "connlog-real",
            "[conntrack]\ntcp_closing_timeout = 1\ngc_interval = 1\n",
        );
        w.topo
            .provider
            .ip(&["addr", "add", &format!("{}/24", WEB.backend), "dev", "eth0"])
            .unwrap();
        let _nginx = crate::proxy::real::nginx(
            &w,
            &format!("{}:{}", WEB.backend, WEB.service_port),
            "$remote_addr:$remote_port $request_uri",
            "location / { default_type text/plain; return 200 \"ok\\n\"; }",
        );
        let mut endpoints = BTreeMap::new();
        let eps = offer(
            &w,
            &WEB,
            &[WEB.backend.to_string()],
            &mut endpoints,
            json!({ "ip": WEB.endpoint.to_string() }),
        );
        let svc = eps[0]["service_id"].as_str().unwrap().to_string();
        let (status, v) = api(
            &w.topo,
            &w.tokens[0],
            "PATCH",
            &format!("/v1/services/{svc}"),
            Some(json!({ "connection_log": true })),
        );
        assert_eq!((status, &v["connection_log"]), (200, &json!(true)), "{v}");
        w.eps = endpoints.values().cloned().collect();
        for c in 0..2 {
            let ns = &w.topo.consumers[c];
            let url = format!("http://{}/ready", WEB.endpoint);
            eventually(&format!("nginx through consumer {c}"), &w, || {
                succeeds(
                    ns,
                    "curl",
                    &["-sf", "--max-time", "2", "-o", "/dev/null", &url],
                )
            });
            for i in 0..3 {
                let url = format!("http://{}/c{c}-{i}", WEB.endpoint);
                run(
                    ns,
                    "curl",
                    &["-sf", "--max-time", "10", "-o", "/dev/null", &url],
                    None,
                );
            }
        }
        // nginx's view: NAT address:port → the request (whose name says the consumer). nginx
        // writes a request's line after the response has gone, so curl may return first.
        let read = || {
            let access = std::fs::read_to_string(w.dir.join("nginx-access.log")).unwrap();
            let seen: Vec<(String, usize)> = access
                .lines()
                .filter_map(|l| {
                    let (peer, uri) = l.split_once(' ')?;
                    let c: usize = uri.strip_prefix("/c")?.split('-').next()?.parse().ok()?;
                    Some((peer.to_string(), c))
                })
                .collect();
            (access, seen)
        };
        eventually("nginx has logged the six requests", &w, || {
            read().1.len() >= 6
        });
        let (access, seen) = read();
        assert_eq!(seen.len(), 6, "nginx logged {access}");
        // Every one of them opened and (after the flows expire and the sweep runs) closed.
        let deadline = Instant::now() + Duration::from_secs(30);
        let recs = loop {
            let (status, recs) = records(&w, &w.tokens[0], &svc);
            assert_eq!(status, 200);
            let has = |event: &str, nat: &str| {
                recs.iter().any(|r| r["event"] == event && r["nat"] == nat)
            };
            if seen
                .iter()
                .all(|(nat, _)| has("opened", nat) && has("closed", nat))
            {
                break recs;
            }
            assert!(
                Instant::now() < deadline,
                "records so far: {recs:#?}\n{}",
                w.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        for (nat, c) in &seen {
            let ep = &endpoints[&(*c, WEB.name)];
            let account = format!("100000000{}", c + 1);
            for event in ["opened", "closed"] {
                let r = recs
                    .iter()
                    .find(|r| r["event"] == event && r["nat"] == nat.as_str())
                    .unwrap();
                assert_eq!(r["endpoint_id"], ep.as_str(), "{r}");
                assert_eq!(r["account_id"], account.as_str(), "{r}");
                assert_eq!(r["service_id"], svc.as_str(), "{r}");
                assert_eq!(r["protocol"], "tcp");
                assert!(
                    r["consumer"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("{CLIENT}:")),
                    "{r}"
                );
                assert_eq!(r["endpoint"], format!("{}:80", WEB.endpoint));
                assert_eq!(
                    r["backend"],
                    format!("{}:{}", WEB.backend, WEB.service_port)
                );
            }
            let closed = recs
                .iter()
                .find(|r| r["event"] == "closed" && r["nat"] == nat.as_str())
                .unwrap();
            assert_eq!(closed["ended"], "fin", "{closed}");
            assert!(
                closed["bytes_in"].as_u64().unwrap() > 0
                    && closed["bytes_out"].as_u64().unwrap() > 0
            );
            assert!(closed["packets_in"].as_u64().unwrap() >= 4, "{closed}");
        }
        // The file beside the state holds the same records.
        let file = std::fs::read_to_string(w.dir.join("store").join("connections.jsonl")).unwrap();
        let lines: Vec<Value> = file
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for (nat, _) in &seen {
            assert_eq!(
                lines.iter().filter(|r| r["nat"] == nat.as_str()).count(),
                2,
                "{nat}: opened and closed in the file"
            );
        }
        // Paging: one at a time, in order.
        let (_, first) = api(
            &w.topo,
            &w.tokens[0],
            "GET",
            &format!("/v1/services/{svc}/connections-log?limit=1"),
            None,
        );
        let next = first["next_after"].as_u64().unwrap();
        let (_, second) = api(
            &w.topo,
            &w.tokens[0],
            "GET",
            &format!("/v1/services/{svc}/connections-log?limit=1&after={next}"),
            None,
        );
        assert!(second["records"][0]["seq"].as_u64().unwrap() > next);
        // A consumer's token does not read the provider's log; a bad limit is refused.
        assert_eq!(records(&w, &w.tokens[1], &svc).0, 404);
        let (status, v) = api(
            &w.topo,
            &w.tokens[0],
            "GET",
            &format!("/v1/services/{svc}/connections-log?limit=0"),
            None,
        );
        assert_eq!(
            (status, &v["error"]["code"]),
            (400, &json!("invalid_limit"))
        );
    }
}
