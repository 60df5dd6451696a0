//! The real agent binary in the node namespace: state made through its API reaches the datapath,
//! real traffic flows, and a rejection cuts a live consumer while the other keeps going.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use privatelink_agent::testkit::demo::{BACKEND, ENDPOINT, TCP_PORTS};
use privatelink_tests::{
    agent_bin, privileged,
    world::{
        ADMIN, Proc, World, api, echo_server, echo_server_at, echo_world as world,
        echo_world_with as world_with, node_get, ok, round_trip, sample, until, wait_for_traffic,
    },
};
use serde_json::{Value, json};

#[test]
fn agent_syncs_api_state_into_the_datapath() {
    if !privileged("agent_syncs_api_state_into_the_datapath") {
        return;
    }
    let (w, _agent) = world("agent-sync");
    assert!(
        round_trip(&w.topo, 0, Duration::from_millis(700)).is_err(),
        "a Pending endpoint must not forward"
    );
    w.accept_all();
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(&w.topo, stop.clone());
    // Both consumers reach the backend through their own endpoint (the agent applies within a sync).
    wait_for_traffic(&w, 0);
    wait_for_traffic(&w, 1);
    // Rejecting consumer 1's endpoint cuts it; consumer 2 keeps working.
    ok(
        &w.topo,
        &w.tokens[0],
        &format!("/v1/services/{}/reject", w.svc),
        json!({ "endpoint_ids": [w.eps[0]] }),
    );
    until(&w, 0, false, "a Rejected endpoint must not forward");
    assert!(
        round_trip(&w.topo, 1, Duration::from_secs(2)).is_ok(),
        "the other consumer is unaffected"
    );
    ok(
        &w.topo,
        &w.tokens[0],
        &format!("/v1/services/{}/accept", w.svc),
        json!({ "endpoint_ids": [w.eps[0]] }),
    );
    until(&w, 0, true, "accepted again");

    // Allowlist removal stops consumer 2's Available link; adding the account back restores it.
    let c2 = &w.tokens[2];
    api(
        &w.topo,
        &w.tokens[0],
        "DELETE",
        &format!("/v1/services/{}/allowlist/1000000002", w.svc),
        None,
    );
    until(&w, 1, false, "consumer 2 removed from the allowlist");
    until(&w, 0, true, "consumer 1 unaffected by consumer 2's removal");
    ok(
        &w.topo,
        &w.tokens[0],
        &format!("/v1/services/{}/allowlist", w.svc),
        json!({ "account_id": "1000000002" }),
    );
    until(&w, 1, true, "consumer 2 back on the allowlist");

    // A security group dropping the consumer's network blocks new connections; unbinding lifts it.
    let sg = ok(
        &w.topo,
        c2,
        "/v1/security-groups",
        json!({ "name": "deny", "rules": [
        { "protocol": "tcp", "ports": "all", "source": "198.18.0.0/24", "action": "drop" }] }),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(
        &w.topo,
        c2,
        &format!("/v1/endpoints/{}/security-groups", w.eps[1]),
        json!({ "security_group_id": sg, "priority": 1 }),
    );
    until(&w, 1, false, "a drop rule bound");
    api(
        &w.topo,
        c2,
        "DELETE",
        &format!("/v1/endpoints/{}/security-groups/{sg}", w.eps[1]),
        None,
    );
    until(&w, 1, true, "the group unbound");

    // Backends replaced by an address nobody serves: new flows fail; put back: they work.
    let backends = |ip: &str| {
        api(
            &w.topo,
            &w.tokens[0],
            "PUT",
            &format!("/v1/services/{}/backends", w.svc),
            Some(json!({ "backends": [ip] })),
        )
    };
    assert_eq!(backends("198.18.100.11").0, 200);
    until(
        &w,
        0,
        false,
        "the backend moved to an address without a server",
    );
    assert_eq!(backends(&BACKEND.to_string()).0, 200);
    until(&w, 0, true, "the backend moved back");

    // Deleting the endpoint: its address stops answering.
    assert_eq!(
        api(
            &w.topo,
            c2,
            "DELETE",
            &format!("/v1/endpoints/{}", w.eps[1]),
            None
        )
        .0,
        204
    );
    until(&w, 1, false, "the endpoint deleted");
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    assert!(
        w.log().contains("map writes"),
        "the agent logged its syncs:\n{}",
        w.log()
    );
}

#[test]
fn sigkill_and_restart_keep_a_live_stream_repair_drift_and_detach() {
    if !privileged("sigkill_and_restart_keep_a_live_stream_repair_drift_and_detach") {
        return;
    }
    let (w, agent) = world("agent-restart");
    w.accept_all();
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(&w.topo, stop.clone());
    wait_for_traffic(&w, 0);

    // A stream of a known pattern, echoed back and checked, across a SIGKILL and a restart.
    let streaming = Arc::new(AtomicBool::new(true));
    let flag = streaming.clone();
    let client = w.topo.consumers[0].spawn(move || -> Result<usize, String> {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((ENDPOINT, TCP_PORTS.0)),
            Duration::from_secs(2),
        )
        .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || -> Result<usize, String> {
            let (mut buf, mut at) = (vec![0u8; 1 << 16], 0usize);
            loop {
                let n = r
                    .read(&mut buf)
                    .map_err(|e| format!("read after {at} bytes: {e}"))?;
                if n == 0 {
                    return Ok(at);
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    if *b != ((at + k) % 251) as u8 {
                        return Err(format!("byte {} differs", at + k));
                    }
                }
                at += n;
            }
        });
        let (chunk, mut sent) = (4096usize, 0usize);
        let deadline = Instant::now() + Duration::from_secs(30);
        while flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            let data: Vec<u8> = (sent..sent + chunk).map(|i| (i % 251) as u8).collect();
            s.write_all(&data)
                .map_err(|e| format!("write after {sent} bytes: {e}"))?;
            sent += chunk;
            std::thread::sleep(Duration::from_millis(2));
        }
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let got = reader.join().map_err(|_| "reader panicked".to_string())??;
        if got != sent {
            return Err(format!("sent {sent} bytes, {got} came back"));
        }
        Ok(sent)
    });
    std::thread::sleep(Duration::from_secs(1));
    let mut agent = agent;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = agent.0.wait();
    // Without the agent, the pinned program keeps forwarding.
    std::thread::sleep(Duration::from_millis(700));
    let agent = w.start_agent();
    std::thread::sleep(Duration::from_secs(1));
    streaming.store(false, Ordering::Relaxed);
    let sent = client
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the stream broke across the restart: {e}\n{}", w.log()));
    assert!(sent > 100_000, "the stream carried data ({sent} bytes)");
    let log = w.log();
    assert!(
        log.contains("reusing pinned maps"),
        "the restarted agent reused the pinned state:\n{log}"
    );
    assert!(
        log.contains("replaced the running program"),
        "and swapped the program atomically:\n{log}"
    );

    // Drift: delete the endpoint's entry behind the agent's back; the periodic resync repairs it.
    let path = w.bpffs.0.join("privatelink").join(format!(
        "{}-v{}",
        privatelink_common::names::ENDPOINTS4,
        privatelink_common::LAYOUT_VERSION
    ));
    let map = aya::maps::MapData::from_pin(&path).expect("open the pinned endpoint map");
    let mut endpoints: aya::maps::HashMap<
        _,
        privatelink_common::EndpointKey4,
        privatelink_common::EndpointValue,
    > = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
    let keys: Vec<_> = endpoints.keys().filter_map(Result::ok).collect();
    assert_eq!(keys.len(), 2, "one port mapping per endpoint");
    for k in &keys {
        endpoints.remove(k).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !w.log().contains("drifted") {
        assert!(
            Instant::now() < deadline,
            "the resync did not notice the edit:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(endpoints.keys().count(), 2, "the entries are back");
    wait_for_traffic(&w, 0);

    // Detach: programs and pins go away.
    drop(agent);
    let out = w
        .topo
        .node
        .command(agent_bin("privatelink-agent").to_str().unwrap())
        .args([
            "detach",
            "--bpffs",
            w.bpffs.0.join("privatelink").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = w.topo.node.ip(&["link", "show", "c0"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "c0 has no program after detach"
    );
    assert!(!w.bpffs.0.join("privatelink").exists());
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

#[test]
fn a_recreated_interface_is_attached_again() {
    if !privileged("a_recreated_interface_is_attached_again") {
        return;
    }
    let (mut w, _agent) = world("agent-relink");
    w.accept_all();
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(&w.topo, stop.clone());
    wait_for_traffic(&w, 0);
    // The consumer-facing veth goes away (both ends) and comes back with a new index and MAC.
    let name = w.topo.consumer_ifaces[0].0.clone();
    w.topo.node.ip(&["link", "del", &name]).unwrap();
    until(&w, 0, false, "the interface deleted");
    privatelink_agent::testkit::netns::veth(&w.topo.node, &name, &w.topo.consumers[0], "eth0")
        .unwrap();
    w.topo.consumers[0]
        .ip(&["addr", "add", "198.18.0.10/24", "dev", "eth0"])
        .unwrap();
    let pass = &mut w.pass;
    w.topo.consumers[0]
        .enter(|| {
            pass.pass_program()
                .attach("eth0", aya::programs::xdp::XdpMode::Driver)
        })
        .unwrap();
    until(
        &w,
        0,
        true,
        "the interface re-created: the agent attaches to it without a restart",
    );
    assert!(
        w.log().contains("attaching anew")
            || w.log().matches(&format!("{name}: attached")).count() >= 2,
        "{}",
        w.log()
    );
    until(&w, 1, true, "the other consumer kept working");
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

#[test]
fn unhealthy_backends_get_no_new_flows_and_lose_their_old_ones() {
    if !privileged("unhealthy_backends_get_no_new_flows_and_lose_their_old_ones") {
        return;
    }
    let (w, _agent) = world("agent-health");
    let second: std::net::Ipv4Addr = "198.18.100.11".parse().unwrap();
    w.topo
        .provider
        .ip(&["addr", "add", "198.18.100.11/24", "dev", "eth0"])
        .unwrap();
    let (stop1, stop2) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (n1, n2) = (
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    );
    let s1 = echo_server_at(&w.topo, BACKEND, stop1.clone(), n1.clone());
    let s2 = echo_server_at(&w.topo, second, stop2.clone(), n2.clone());
    let (status, _) = api(
        &w.topo,
        &w.tokens[0],
        "PUT",
        &format!("/v1/services/{}/backends", w.svc),
        Some(json!({ "backends": [BACKEND.to_string(), second.to_string()] })),
    );
    assert_eq!(status, 200);
    w.update_service(json!({ "health_check": {
        "enabled": true, "port": 0, "interval_secs": 1, "timeout_secs": 1, "healthy_threshold": 2, "unhealthy_threshold": 2 } }));
    w.accept_all();
    wait_for_traffic(&w, 0);

    // Hold a connection that landed on the second backend (Maglev spreads new flows over both).
    let held = w.topo.consumers[0].enter(|| {
        for _ in 0..40 {
            let before = n2.load(Ordering::SeqCst);
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from((ENDPOINT, TCP_PORTS.0)),
                Duration::from_secs(2),
            )
            .expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).expect("echo");
            if n2.load(Ordering::SeqCst) > before {
                return s;
            }
        }
        panic!("no connection landed on the second backend in 40 tries");
    });
    // The second backend stops listening: its checks fail, it leaves the table, its flows are cut.
    stop2.store(true, Ordering::Relaxed);
    s2.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let (_, h) = api(
            &w.topo,
            &w.tokens[0],
            "GET",
            &format!("/v1/services/{}/health", w.svc),
            None,
        );
        if h["healthy"] == 1 && h["total"] == 2 {
            assert_eq!(h["targets"][1]["healthy"], false, "{h}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second backend was not marked unhealthy: {h}\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every new connection now reaches the healthy backend.
    for _ in 0..20 {
        round_trip(&w.topo, 0, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("new flows avoid the unhealthy backend: {e}\n{}", w.log()));
    }
    // The held connection to the unhealthy backend was cut: its packets have no state any more.
    let mut held = held;
    let cut = held
        .write_all(b"ping")
        .and_then(|_| held.read_exact(&mut [0u8; 4]));
    assert!(
        cut.is_err(),
        "the flow to the unhealthy backend should have been cut"
    );
    assert!(w.log().contains("turned unhealthy"), "{}", w.log());
    stop1.store(true, Ordering::Relaxed);
    s1.join().unwrap();
}

#[test]
fn a_state_that_does_not_fit_is_refused_whole_and_the_last_good_one_keeps_forwarding() {
    if !privileged(
        "a_state_that_does_not_fit_is_refused_whole_and_the_last_good_one_keeps_forwarding",
    ) {
        return;
    }
    // Room for link ids 1 and 2 only (slot 0 is reserved).
    let (w, _agent) = world_with("agent-capacity", "[maps]\nlinks = 3\n");
    w.accept_all();
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(&w.topo, stop.clone());
    wait_for_traffic(&w, 0);
    // A third endpoint: the control plane takes it, this node cannot hold it.
    let vpc = api(&w.topo, &w.tokens[1], "GET", "/v1/networks", None).1[0].clone();
    let subnets = api(
        &w.topo,
        &w.tokens[1],
        "GET",
        &format!("/v1/networks/{}/subnets", vpc["id"].as_str().unwrap()),
        None,
    )
    .1;
    let third = ok(
        &w.topo,
        &w.tokens[1],
        "/v1/endpoints",
        json!({ "name": "third", "service_id": w.svc,
        "network_id": vpc["id"], "subnet_id": subnets[0]["id"], "ip": "198.18.0.101" }),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !w.log().contains("refused, maps keep the last good state") {
        assert!(
            Instant::now() < deadline,
            "the agent did not refuse the state:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        w.log().contains("LINKS"),
        "the refusal names the map:\n{}",
        w.log()
    );
    // Nothing of the refused state was written: the existing endpoints keep working.
    until(&w, 0, true, "the last good state keeps forwarding");
    until(&w, 1, true, "for both consumers");
    // Once the state fits again it is applied.
    let (status, _) = api(
        &w.topo,
        &w.tokens[1],
        "DELETE",
        &format!("/v1/endpoints/{}", third["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(status, 204);
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

#[test]
fn an_invalid_config_names_the_key_and_loads_nothing() {
    if !privileged("an_invalid_config_names_the_key_and_loads_nothing") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("privatelink-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    privatelink_agent::control::store::write_private(&dir.join("token"), ADMIN).unwrap();
    let bpffs = dir.join("pins");
    let cfg = format!(
        "node = \"n\"\nadmin_token_file = \"{}\"\nbpffs = \"{}\"\n[store]\npath = \"{}\"\n[[interfaces]]\nname = \"lo\"\nnetwork = \"not-a-vpc\"\nrole = \"consumer\"\n",
        dir.join("token").display(),
        bpffs.display(),
        dir.join("state.db").display()
    );
    std::fs::write(dir.join("agent.toml"), cfg).unwrap();
    let out = Command::new(agent_bin("privatelink-agent"))
        .args(["run", "--config", dir.join("agent.toml").to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("interfaces[0].network"),
        "the error names the key: {err}"
    );
    assert!(
        !bpffs.exists() && !dir.join("state.db").exists(),
        "nothing was created or loaded"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_count_traffic_exactly_and_prometheus_scrapes_them() {
    if !privileged("metrics_count_traffic_exactly_and_prometheus_scrapes_them") {
        return;
    }
    let (w, _agent) = world_with(
        "agent-metrics",
        "[history]\nsample_interval = 1\n[conntrack]\nentries = 65536\ntcp_syn_timeout = 60\ntcp_established_timeout = 7200\ntcp_closing_timeout = 10\nudp_timeout = 5\ngc_interval = 1\n",
    );
    let add = json!({ "port_mappings": [{ "protocol": "udp", "service_port": privatelink_agent::testkit::demo::UDP_PORTS.1, "terminal_port": privatelink_agent::testkit::demo::UDP_PORTS.0 }] });
    ok(
        &w.topo,
        &w.tokens[0],
        &format!("/v1/services/{}/port-mappings", w.svc),
        add,
    );
    w.accept_all();
    let udp = w.topo.provider.enter(|| {
        std::net::UdpSocket::bind((BACKEND, privatelink_agent::testkit::demo::UDP_PORTS.1)).unwrap()
    });
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let echo = w.topo.provider.spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 2048];
        while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], peer);
            }
        }
    });
    // The history sampler (every second here) must have seen the endpoint before any traffic, so
    // that its totals end up equal to the counters: it has once its first point (a bucket is
    // written from the second sample on, zero traffic included).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = api(
            &w.topo,
            &w.tokens[1],
            "GET",
            &format!("/v1/history/endpoint/{}?period=realtime", w.eps[0]),
            None,
        );
        if status == 200 && body["points"].as_array().is_some_and(|p| !p.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the history sampler never recorded the endpoint: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Exactly 10 datagrams of 100 bytes from one socket: one flow.
    let sock = w.topo.consumers[0].enter(|| std::net::UdpSocket::bind("0.0.0.0:0").unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let send = |n: usize| {
        let sock = sock.try_clone().unwrap();
        w.topo.consumers[0].enter(move || {
            for i in 0..n {
                sock.send_to(
                    &[i as u8; 100],
                    (ENDPOINT, privatelink_agent::testkit::demo::UDP_PORTS.0),
                )
                .unwrap();
                let mut b = [0u8; 200];
                let (got, _) = sock
                    .recv_from(&mut b)
                    .expect("UDP reply through the endpoint");
                assert_eq!(got, 100);
            }
        })
    };
    // The first reply may need the backend's neighbour to be resolved: retry the first datagram.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| send(1))).is_err() {
        assert!(
            Instant::now() < deadline,
            "no UDP reply through the endpoint\n{}",
            w.log()
        );
    }
    let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").expect("scrape");
    let base = [("endpoint_id", w.eps[0].as_str())];
    let before_fwd = sample(
        &text,
        "privatelink_link_packets_total",
        &[base[0], ("direction", "forward")],
    )
    .expect("forward packets");
    send(10);
    let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").expect("scrape");
    let get = |m: &str, extra: &[(&str, &str)]| {
        let mut want = vec![base[0]];
        want.extend_from_slice(extra);
        sample(&text, m, &want).unwrap_or_else(|| panic!("{m} {extra:?} missing:\n{text}"))
    };
    let frame = (14 + 20 + 8 + 100) as f64;
    // A UDP flow of this many datagrams each way is served from the per-CPU flow cache after its
    // first packets on a CPU; every hit is a forwarded packet.
    let hits = sample(&text, "privatelink_flow_cache_hits_total", &[]).expect("cache hits");
    let forwarded: f64 = ["fwd_tx", "fwd_redirect"]
        .iter()
        .map(|o| sample(&text, "privatelink_node_packets_total", &[("outcome", o)]).unwrap_or(0.0))
        .sum();
    assert!(
        hits > 0.0 && hits <= forwarded,
        "flow-cache hits {hits} of {forwarded} forwarded packets"
    );
    assert!(
        sample(&text, "privatelink_flow_cache_fills_total", &[]).expect("cache fills") > 0.0,
        "the flow was copied into the cache"
    );
    assert_eq!(
        get(
            "privatelink_link_packets_total",
            &[("direction", "forward")]
        ) - before_fwd,
        10.0
    );
    assert_eq!(
        get("privatelink_link_packets_total", &[("direction", "reply")]),
        before_fwd + 10.0,
        "one reply per query"
    );
    assert_eq!(
        get("privatelink_link_bytes_total", &[("direction", "forward")]),
        (before_fwd + 10.0) * frame
    );
    assert_eq!(
        get("privatelink_link_bytes_total", &[("direction", "reply")]),
        (before_fwd + 10.0) * frame
    );
    assert_eq!(
        get("privatelink_link_connections_total", &[]),
        1.0,
        "one UDP flow"
    );
    // Live connections come from the periodic conntrack scan (every second here): the flow
    // shows once a scan has seen it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").expect("scrape");
        let active = sample(&text, "privatelink_link_active_connections", &base);
        if active == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "one live connection expected, the scan says {active:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The running agent's history holds the same traffic (sampled, summed into 10 s buckets).
    let (fwd, rev) = (
        get(
            "privatelink_link_packets_total",
            &[("direction", "forward")],
        ),
        get("privatelink_link_packets_total", &[("direction", "reply")]),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, h) = api(
            &w.topo,
            &w.tokens[1],
            "GET",
            &format!("/v1/history/endpoint/{}", w.eps[0]),
            None,
        );
        assert_eq!(status, 200, "{h}");
        let sum = |f: &str| {
            h["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[f].as_f64().unwrap())
                .sum::<f64>()
        };
        if sum("fwd_packets") == fwd && sum("rev_packets") == rev {
            assert_eq!(sum("new_connections"), 1.0, "{h}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "history {} / {} packets, counters {fwd} / {rev}: {h}",
            sum("fwd_packets"),
            sum("rev_packets")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Map usage covers the counter maps too: one LINK_STATS slot per endpoint, capacities as sized.
    let map = |m: &str, name: &str| {
        sample(&text, m, &[("map", name)]).unwrap_or_else(|| panic!("{m} {name}:\n{text}"))
    };
    assert_eq!(map("privatelink_map_entries", "LINK_STATS"), 2.0);
    assert_eq!(map("privatelink_map_entries", "LINKS"), 2.0);
    assert!(map("privatelink_map_capacity", "LINK_STATS") >= 2.0);
    assert!(map("privatelink_map_capacity", "LINK_DROPS") > 0.0);
    assert!(
        text.contains("service_name=\"echo\"") && text.contains("consumer_account=\"1000000001\""),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "privatelink_programs_attached",
            &[("mode", "native")]
        )
        .is_some(),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "privatelink_service_targets",
            &[("health", "healthy")]
        ) == Some(1.0),
        "{text}"
    );

    // A wrong token is counted; an account taken off the allowlist shows its connection
    // Disconnected per service.
    let (status, _) = api(&w.topo, "pl_not-a-token-0000", "GET", "/v1/revision", None);
    assert_eq!(status, 401);
    let (status, r) = api(
        &w.topo,
        &w.tokens[0],
        "DELETE",
        &format!("/v1/services/{}/allowlist/1000000002", w.svc),
        None,
    );
    assert_eq!(status, 200, "{r}");
    let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").expect("scrape");
    assert!(
        sample(
            &text,
            "privatelink_api_auth_failures_total",
            &[("result", "refused")]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    let by_state = |st: &str| {
        sample(&text, "privatelink_service_endpoints", &[("state", st)])
            .unwrap_or_else(|| panic!("{st}:\n{text}"))
    };
    assert_eq!(
        (by_state("Available"), by_state("Disconnected")),
        (1.0, 1.0)
    );

    // promtool accepts the exposition.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (installed by cargo xtask setup)");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus server scrapes the agent and answers a rate query.
    let pdir = w.dir.join("prometheus");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::write(pdir.join("prometheus.yml"), "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: privatelink\n    static_configs:\n      - targets: ['127.0.0.1:9464']\n").unwrap();
    let _prom = Proc(
        w.topo
            .node
            .command("prometheus")
            .args([
                &format!("--config.file={}", pdir.join("prometheus.yml").display()),
                &format!("--storage.tsdb.path={}", pdir.join("data").display()),
                "--web.listen-address=127.0.0.1:9099",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (installed by cargo xtask setup)"),
    );
    let query = format!(
        "http://127.0.0.1:9099/api/v1/query?query=sum(rate(privatelink_link_bytes_total%7Bendpoint_id%3D%22{}%22%2Cdirection%3D%22forward%22%7D%5B5s%5D))",
        w.eps[0]
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        send(5);
        let answer = node_get(&w.topo, &query).unwrap_or_default();
        let v: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        let rate = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
        if rate > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned a byte rate: {answer}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    check_dashboard(&w, &text);
    // The running agent sweeps ended flows out of the table: the UDP flow times out (5 s here) and
    // its two entries leave within a sweep (every second here).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").expect("scrape");
        let entries = sample(&text, "privatelink_conntrack_entries", &[]).unwrap_or(-1.0);
        if entries == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{entries} conntrack entries left after the flow ended"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The Grafana dashboard: well-formed, every query accepted by the running Prometheus (variables
/// substituted), every metric it names exposed by the agent.
fn check_dashboard(w: &World, scrape: &str) {
    let d: Value = serde_json::from_str(include_str!("../../../dashboards/privatelink.json"))
        .expect("dashboard JSON");
    assert!(
        d["uid"].is_string() && d["title"].is_string() && d["schemaVersion"].as_u64() >= Some(30)
    );
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "node", "service", "endpoint"]);
    let mut exprs: Vec<String> = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(
            p["type"].is_string() && p["title"].is_string() && p["gridPos"]["w"].is_u64(),
            "{p}"
        );
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap().iter().skip(1) {
        exprs.push(v["definition"].as_str().unwrap().to_string());
    }
    for e in &exprs {
        let mut name_at = 0;
        while let Some(i) = e[name_at..].find("privatelink_") {
            let start = name_at + i;
            let end = e[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(e.len(), |j| start + j);
            let name = &e[start..end];
            // A node of a high-availability group exposes these; the ha test checks them there.
            let group_only = name.starts_with("privatelink_ha_");
            assert!(
                group_only
                    || scrape.contains(&format!("{name}{{"))
                    || scrape.contains(&format!("{name} ")),
                "{name} (in {e}) is not exposed"
            );
            name_at = end;
        }
        if e.starts_with("label_values(") {
            continue;
        }
        let q = e
            .replace("$__rate_interval", "10s")
            .replace("$service", ".*")
            .replace("$endpoint", ".*")
            .replace("$node", ".*");
        let answer = node_get(
            &w.topo,
            &format!("http://127.0.0.1:9099/api/v1/query?query={}", encode(&q)),
        )
        .unwrap_or_default();
        let v: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        assert_eq!(
            v["status"], "success",
            "Prometheus refused the dashboard query {q}: {answer}"
        );
    }
}

/// Route and neighbour changes reach the datapath at once: the agent watches them (rtnetlink)
/// and bumps the FIB generation, so a live flow's cached next hop (kept up to a second otherwise)
/// is resolved again by its next packet. A UDP flow through the endpoint sends every 2 ms; the
/// backend's MAC address moves, then the node learns the new address (a neighbour change) or a
/// route to a gateway that has it (a route change), and replies must resume within 100 ms.
#[test]
fn a_backends_next_hop_moves_under_a_live_flow_within_100_ms() {
    if !privileged("a_backends_next_hop_moves_under_a_live_flow_within_100_ms") {
        return;
    }
    use std::net::{Ipv4Addr, UdpSocket};
    const UDP: (u16, u16) = (53, 5353);
    let (mut w, _agent) = privatelink_tests::world::world_with("nh", "");
    let svc = ok(
        &w.topo,
        &w.tokens[0],
        "/v1/services",
        json!({ "name": "udp-echo", "network_id": w.vpcs[0].0, "service_type": "clb",
        "backends": [BACKEND.to_string()], "port_mappings": [{ "protocol": "udp", "service_port": UDP.1, "terminal_port": UDP.0 }] }),
    );
    w.svc = svc["id"].as_str().unwrap().to_string();
    ok(
        &w.topo,
        &w.tokens[0],
        &format!("/v1/services/{}/allowlist", w.svc),
        json!({ "account_id": "1000000001" }),
    );
    let ep = ok(
        &w.topo,
        &w.tokens[1],
        "/v1/endpoints",
        json!({ "name": "udp", "service_id": w.svc, "network_id": w.vpcs[1].0,
        "subnet_id": w.vpcs[1].1, "ip": ENDPOINT.to_string() }),
    );
    w.eps.push(ep["id"].as_str().unwrap().to_string());
    w.accept_all();

    // A UDP echo in the backend's place, bounded in time.
    let stop = Arc::new(AtomicBool::new(false));
    let server = w
        .topo
        .provider
        .enter(|| UdpSocket::bind((BACKEND, UDP.1)).expect("bind the echo"));
    server
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let echo = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((n, from)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], from);
                }
            }
        })
    };
    let client = w.topo.consumers[0].enter(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.connect((ENDPOINT, UDP.0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
        s
    });
    // Sends every 2 ms (one flow: the same source port) until a reply comes after `since`, or
    // `limit` passes; returns how long after `since` the first reply came.
    let mut seq = 0u32;
    let mut first_reply_after = |since: Instant, limit: Duration| -> Option<Duration> {
        let mut buf = [0u8; 64];
        while since.elapsed() < limit {
            seq += 1;
            client.send(&seq.to_be_bytes()).unwrap();
            let sent = Instant::now();
            while sent.elapsed() < Duration::from_millis(2) {
                if let Ok(n) = client.recv(&mut buf) {
                    let got = u32::from_be_bytes(buf[..n.min(4)].try_into().unwrap_or([0; 4]));
                    // Only a reply to a datagram sent after the change counts.
                    if n == 4 && got == seq {
                        return Some(since.elapsed());
                    }
                }
            }
        }
        None
    };
    let start = Instant::now();
    assert!(
        first_reply_after(start, Duration::from_secs(5)).is_some(),
        "no reply through the endpoint before the change:\n{}",
        w.log()
    );
    // Keep the flow's next hop freshly cached, then move things.
    assert!(first_reply_after(Instant::now(), Duration::from_secs(1)).is_some());
    let node = &w.topo.node;
    let p0 = w.topo.provider_iface.0.clone();
    let backend = BACKEND.to_string();
    let set_backend_mac = |mac: &str| {
        w.topo
            .provider
            .ip(&["link", "set", "dev", "eth0", "address", mac])
            .expect("backend MAC");
    };

    // 1. A neighbour change: the backend moves to another MAC; the node learns it.
    set_backend_mac("02:00:5e:00:53:01");
    let t0 = Instant::now();
    node.ip(&[
        "neigh",
        "replace",
        &backend,
        "lladdr",
        "02:00:5e:00:53:01",
        "dev",
        &p0,
        "nud",
        "permanent",
    ])
    .expect("neighbour change");
    let after = first_reply_after(t0, Duration::from_secs(3));
    assert!(
        after.is_some_and(|d| d < Duration::from_millis(100)),
        "after a neighbour change the flow resumed after {after:?} (want < 100 ms)\n{}",
        w.log()
    );

    // 2. A route change: the backend is reached through a gateway address whose neighbour entry
    // is its MAC; it moves again, and the route moves to a second gateway that has the new MAC.
    node.ip(&[
        "neigh",
        "replace",
        "198.18.100.21",
        "lladdr",
        "02:00:5e:00:53:01",
        "dev",
        &p0,
        "nud",
        "permanent",
    ])
    .expect("gateway 1");
    node.ip(&[
        "route",
        "replace",
        &format!("{backend}/32"),
        "via",
        "198.18.100.21",
        "dev",
        &p0,
    ])
    .expect("route via gateway 1");
    assert!(first_reply_after(Instant::now(), Duration::from_secs(1)).is_some());
    node.ip(&[
        "neigh",
        "replace",
        "198.18.100.22",
        "lladdr",
        "02:00:5e:00:53:02",
        "dev",
        &p0,
        "nud",
        "permanent",
    ])
    .expect("gateway 2");
    set_backend_mac("02:00:5e:00:53:02");
    let t0 = Instant::now();
    node.ip(&[
        "route",
        "replace",
        &format!("{backend}/32"),
        "via",
        "198.18.100.22",
        "dev",
        &p0,
    ])
    .expect("route via gateway 2");
    let after = first_reply_after(t0, Duration::from_secs(3));
    assert!(
        after.is_some_and(|d| d < Duration::from_millis(100)),
        "after a route change the flow resumed after {after:?} (want < 100 ms)\n{}",
        w.log()
    );
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
}

/// On veth, native XDP needs a program on the peer as well: the agent says so for a veth whose
/// peer it can see (same namespace) without one, and not for a veth whose peer is elsewhere.
#[test]
fn a_native_veth_whose_peer_has_no_xdp_program_is_warned_about() {
    if !privileged("a_native_veth_whose_peer_has_no_xdp_program_is_warned_about") {
        return;
    }
    let (w, _agent) = privatelink_tests::world::world_with(
        "vw",
        "[[interfaces]]\nname = \"vx0\"\nnetwork = \"vpc-0000beef\"\nrole = \"consumer\"\n",
    );
    // The pair appears after the agent started: attached on the link event.
    let node = &w.topo.node;
    node.ip(&["link", "add", "vx0", "type", "veth", "peer", "name", "vx0p"])
        .expect("veth pair");
    node.ip(&["link", "set", "vx0p", "up"]).expect("peer up");
    node.ip(&["link", "set", "vx0", "up"]).expect("vx0 up");
    let want = "vx0 is a veth attached natively, and its peer vx0p has no XDP program";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w.log().contains(want) {
        assert!(
            Instant::now() < deadline,
            "no warning about vx0's peer:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !w.log().contains("c0 is a veth attached natively"),
        "c0's peer is in the consumer's namespace, where the agent cannot see it:\n{}",
        w.log()
    );
}

/// An agent whose pins would be on a bpffs of its own mount namespace (`ip netns exec` remounts
/// /sys and the agent mounts a bpffs there; `unshare -m` with a bpffs mounted inside) would lose
/// them, and forwarding, when it stops: it refuses to start, and says how to run it instead.
#[test]
fn an_agent_whose_pins_would_die_with_it_refuses_to_start_and_says_how_to_run_it() {
    if !privileged("an_agent_whose_pins_would_die_with_it_refuses_to_start") {
        return;
    }
    let ns = privatelink_agent::testkit::netns::Netns::new("mp").expect("namespace");
    let dir = std::env::temp_dir().join(format!("privatelink-mp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    privatelink_agent::control::store::write_private(&token, "mount-namespace-test-token").unwrap();
    let config = |bpffs: &str| {
        let path = dir.join(format!("agent-{}.toml", bpffs.len()));
        std::fs::write(
            &path,
            format!(
                "node = \"mp\"\nadmin_token_file = \"{}\"\nbpffs = \"{bpffs}\"\n[store]\npath = \"{}\"\n\
                 [[interfaces]]\nname = \"lo\"\nnetwork = \"vpc-00000001\"\nrole = \"consumer\"\n",
                token.display(),
                dir.join("state.db").display()
            ),
        )
        .unwrap();
        path
    };
    let agent = agent_bin("privatelink-agent");
    let refuses = |out: std::process::Output, how: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{how}: the agent started:\n{err}");
        assert!(
            err.contains("own mount namespace") && err.contains("nsenter --net="),
            "{how}: no clear error:\n{err}"
        );
    };
    // 1. `ip netns exec`, pins under /sys/fs/bpf.
    let cfg = config(&format!(
        "/sys/fs/bpf/privatelink-mp-{}",
        std::process::id()
    ));
    // Bounded: an agent that wrongly started would otherwise run on.
    let out = ns
        .command("timeout")
        .args(["20", agent.to_str().unwrap(), "run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    refuses(out, "ip netns exec");
    // 2. `unshare -m`, a bpffs mounted inside it.
    let private = dir.join("bpf");
    let cfg = config(&format!("{}/pins", private.display()));
    let script = format!(
        "mkdir -p {p} && mount -t bpf bpf {p} && exec timeout 20 {a} run --config {c}",
        p = private.display(),
        a = agent.display(),
        c = cfg.display()
    );
    let out = ns
        .command("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    refuses(out, "unshare -m");
    std::fs::remove_dir_all(&dir).ok();
}

/// SIGTERM, the documented way of running (the node's network namespace, the host's mounts):
/// the agent stops and says forwarding goes on, and it does, through the pinned programs and
/// maps: a connection opened before keeps working while no agent runs and after a new one took
/// over (a new conntrack would drop its segments as not being SYNs), and new connections work.
#[test]
fn sigterm_leaves_forwarding_and_conntrack_to_the_next_agent() {
    if !privileged("sigterm_leaves_forwarding_and_conntrack_to_the_next_agent") {
        return;
    }
    let (w, agent) = world("st");
    w.accept_all();
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(&w.topo, stop.clone());
    wait_for_traffic(&w, 0);
    let mut conn = w.topo.consumers[0]
        .enter(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from((ENDPOINT, TCP_PORTS.0)),
                Duration::from_secs(2),
            )
        })
        .expect("a connection through the endpoint");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut echo = |what: &str| {
        let msg = format!("still here: {what}");
        conn.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        conn.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("the connection broke ({what}): {e}\n{}", w.log()));
        assert_eq!(back, msg.as_bytes());
    };
    echo("before");
    let mut agent = agent;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = agent.0.wait().unwrap();
    assert!(
        status.success(),
        "the agent stops cleanly on SIGTERM: {status}"
    );
    assert!(
        w.log()
            .contains("forwarding continues through the pinned programs and maps"),
        "{}",
        w.log()
    );
    echo("no agent");
    round_trip(&w.topo, 0, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("no new connection without the agent: {e}\n{}", w.log()));
    let _agent = w.start_agent();
    wait_for_traffic(&w, 0);
    echo("new agent");
    drop(conn);
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}
