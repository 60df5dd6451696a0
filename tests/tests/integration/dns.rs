//! Service names and private DNS through the real agent: `dig` in two consumer networks with the
//! same CIDR resolves the same private name to each network's own endpoint; a client connects by
//! name (libc's resolver, pointed at the agent); turning private DNS off, or rejecting the endpoint,
//! makes the name NXDOMAIN there within a sync; bad names are refused by the API.
use std::{
    net::Ipv4Addr,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use privatelink_agent::{
    testkit::demo::{BACKEND, TCP_PORTS},
    testkit::netns::Netns,
};
use privatelink_tests::{
    privileged,
    world::{World, api, echo_server, ok, world_with},
};
use serde_json::json;

const DNS: &str = "198.18.0.2";
const PRIVATE: &str = "db.example.com";
const EP1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const EP2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 123);

/// One `dig` from consumer `c` (over TCP with `tcp`): (status, answers).
fn dig(w: &World, c: usize, name: &str, rtype: &str, tcp: bool) -> (String, Vec<String>) {
    let mut args = vec![
        "+time=1".to_string(),
        "+tries=1".to_string(),
        format!("@{DNS}"),
        name.to_string(),
        rtype.to_string(),
    ];
    if tcp {
        args.push("+tcp".into());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = w.topo.consumers[c]
        .command("dig")
        .args(&a)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO ANSWER")
        .to_string();
    let answers = text
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|s| {
            s.lines()
                .take_while(|l| !l.is_empty())
                .filter_map(|l| l.split_whitespace().last().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    (status, answers)
}

/// Waits (bounded) until `dig` from consumer `c` gives `status` and `answers`.
fn resolves(w: &World, c: usize, name: &str, rtype: &str, status: &str, answers: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = dig(w, c, name, rtype, false);
        if got.0 == status && got.1 == answers {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "consumer {c}: {name} {rtype}: {got:?}, want {status} {answers:?}\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `/etc/netns/<ns>/resolv.conf` (what `ip netns exec` shows as /etc/resolv.conf), removed on drop.
struct ResolvConf(std::path::PathBuf);

impl ResolvConf {
    fn point(ns: &Netns, server: &str) -> Self {
        let dir = std::path::Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {server}\noptions timeout:1 attempts:2\n"),
        )
        .unwrap();
        ResolvConf(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn private_dns_resolves_per_network_and_stops_when_turned_off() {
    if !privileged("private_dns_resolves_per_network_and_stops_when_turned_off") {
        return;
    }
    let extra = format!(
        "[cluster]\nregion = \"test-1\"\n[dns]\nttl = 30\n[dns.networks.{{consumer1}}]\nlisten = \"{DNS}\"\n[dns.networks.{{consumer2}}]\nlisten = \"{DNS}\"\n"
    );
    let (w, _agent) = world_with("dns", &extra);
    let provider = &w.tokens[0];
    let revision = || api(&w.topo, provider, "GET", "/v1/revision", None).1["revision"].clone();

    // Bad private DNS names: a clear error naming the field, nothing changed.
    let before = revision();
    for bad in [
        "single",
        "-db.example.com",
        "db-.example.com",
        "db..example.com",
        "under_score.example.com",
        "db.example.123",
        "x.privatelink.internal",
        &format!("{}.com", "a".repeat(64)),
        &format!("{}.com", ["abcdefghi"; 26].join(".")),
    ] {
        let (status, v) = api(
            &w.topo,
            provider,
            "POST",
            "/v1/services",
            Some(
                json!({ "name": "db", "network_id": w.vpcs[0].0, "service_type": "mysql",
                "backends": [BACKEND.to_string()], "private_dns_name": bad,
                "port_mappings": [{ "protocol": "tcp", "service_port": TCP_PORTS.1, "terminal_port": TCP_PORTS.0 }] }),
            ),
        );
        assert_eq!(status, 400, "{bad}: {v}");
        assert_eq!(v["error"]["code"], "invalid_dns_name", "{bad}: {v}");
        assert_eq!(v["error"]["field"], "private_dns_name", "{bad}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(revision(), before, "refused requests changed nothing");

    // The service: its service name in listings, usable where a service id is.
    let svc = ok(
        &w.topo,
        provider,
        "/v1/services",
        json!({ "name": "db", "network_id": w.vpcs[0].0, "service_type": "mysql",
            "backends": [BACKEND.to_string()], "private_dns_name": "DB.Example.com.",
            "port_mappings": [{ "protocol": "tcp", "service_port": TCP_PORTS.1, "terminal_port": TCP_PORTS.0 }] }),
    );
    let id = svc["id"].as_str().unwrap().to_string();
    let service_name = format!("test-1.db.{id}");
    assert_eq!(svc["service_name"], service_name.as_str());
    assert_eq!(
        svc["private_dns_name"], PRIVATE,
        "stored lowercase, no trailing dot"
    );
    let (_, list) = api(&w.topo, provider, "GET", "/v1/services", None);
    assert!(list.to_string().contains(&service_name), "{list}");
    for c in [1, 2] {
        ok(
            &w.topo,
            provider,
            &format!("/v1/services/{id}/allowlist"),
            json!({ "account_id": format!("100000000{c}") }),
        );
    }
    let (status, v) = api(
        &w.topo,
        &w.tokens[1],
        "GET",
        &format!("/v1/services/{service_name}/verify"),
        None,
    );
    assert_eq!((status, &v["id"]), (200, &json!(id)), "{v}");
    let mut eps = Vec::new();
    for (c, ip) in [(1, EP1), (2, EP2)] {
        let ep = ok(
            &w.topo,
            &w.tokens[c],
            "/v1/endpoints",
            json!({ "name": "db", "service_id": if c == 1 { &service_name } else { &id },
                "network_id": w.vpcs[c].0, "subnet_id": w.vpcs[c].1, "ip": ip.to_string(),
                "private_dns_enabled": true }),
        );
        assert_eq!(ep["service_id"], id.as_str(), "stored by id");
        let ep_id = ep["id"].as_str().unwrap().to_string();
        assert_eq!(
            ep["dns_name"],
            format!("{ep_id}.{id}.test-1.privatelink.internal").as_str()
        );
        eps.push((ep_id, ep["dns_name"].as_str().unwrap().to_string()));
    }
    // A second endpoint with private DNS on for the same name in the same network: refused.
    let (status, v) = api(
        &w.topo,
        &w.tokens[1],
        "POST",
        "/v1/endpoints",
        Some(
            json!({ "name": "db2", "service_id": id, "network_id": w.vpcs[1].0,
            "subnet_id": w.vpcs[1].1, "private_dns_enabled": true }),
        ),
    );
    assert_eq!(
        (status, &v["error"]["code"]),
        (409, &json!("private_dns_conflict")),
        "{v}"
    );

    // Pending endpoints resolve nowhere; accepted ones in their own network only.
    resolves(&w, 0, PRIVATE, "A", "NXDOMAIN", &[]);
    ok(
        &w.topo,
        provider,
        &format!("/v1/services/{id}/accept"),
        json!({ "endpoint_ids": [eps[0].0, eps[1].0] }),
    );
    resolves(&w, 0, PRIVATE, "A", "NOERROR", &[EP1.to_string()]);
    resolves(&w, 1, PRIVATE, "A", "NOERROR", &[EP2.to_string()]);
    resolves(&w, 0, &eps[0].1, "A", "NOERROR", &[EP1.to_string()]);
    resolves(&w, 1, &eps[0].1, "A", "NXDOMAIN", &[]);
    resolves(&w, 1, &eps[1].1, "A", "NOERROR", &[EP2.to_string()]);
    // NODATA for a family without an address, NXDOMAIN below a name and for other names, TCP too.
    resolves(&w, 0, PRIVATE, "AAAA", "NOERROR", &[]);
    resolves(&w, 0, &format!("x.{PRIVATE}"), "A", "NXDOMAIN", &[]);
    resolves(&w, 0, "example.org", "A", "NXDOMAIN", &[]);
    assert_eq!(
        dig(&w, 1, PRIVATE, "A", true),
        ("NOERROR".to_string(), vec![EP2.to_string()])
    );

    // A client connects by name through its endpoint (libc's resolver asks the agent).
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(&w.topo, stop.clone());
    let _resolv = ResolvConf::point(&w.topo.consumers[0], DNS);
    let script = format!(
        "exec 3<>/dev/tcp/{PRIVATE}/{port}; printf 'by-name' >&3; head -c 7 <&3",
        port = TCP_PORTS.0
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = w.topo.consumers[0]
            .command("timeout")
            .args(["5", "bash", "-c", &script])
            .output()
            .unwrap();
        if out.stdout == b"by-name" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connecting by name: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Private DNS off in consumer 1: NXDOMAIN there within a sync; consumer 2 unaffected.
    let (status, v) = api(
        &w.topo,
        &w.tokens[1],
        "PATCH",
        &format!("/v1/endpoints/{}", eps[0].0),
        Some(json!({ "private_dns_enabled": false })),
    );
    assert_eq!(status, 200, "{v}");
    resolves(&w, 0, PRIVATE, "A", "NXDOMAIN", &[]);
    resolves(&w, 0, &eps[0].1, "A", "NOERROR", &[EP1.to_string()]);
    resolves(&w, 1, PRIVATE, "A", "NOERROR", &[EP2.to_string()]);
    // Rejected: consumer 2's names stop resolving.
    ok(
        &w.topo,
        provider,
        &format!("/v1/services/{id}/reject"),
        json!({ "endpoint_ids": [eps[1].0] }),
    );
    resolves(&w, 1, PRIVATE, "A", "NXDOMAIN", &[]);
    resolves(&w, 1, &eps[1].1, "A", "NXDOMAIN", &[]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
}

#[test]
fn other_names_are_forwarded_upstream_when_configured() {
    if !privileged("other_names_are_forwarded_upstream_when_configured") {
        return;
    }
    const UPSTREAM: &str = "198.18.100.53";
    let extra = format!(
        "[dns]\nothers = \"forward\"\nforwarders = [\"{UPSTREAM}:53\"]\n[dns.networks.{{consumer1}}]\nlisten = \"{DNS}\"\n"
    );
    // The upstream: dnsmasq in the provider network, answering one name and nothing else.
    let topo_ready = |w: &World| {
        w.topo
            .provider
            .ip(&["addr", "add", &format!("{UPSTREAM}/24"), "dev", "eth0"])
            .unwrap();
        privatelink_tests::world::Proc(
            w.topo
                .provider
                .command("dnsmasq")
                .args([
                    "--no-daemon",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    &format!("--listen-address={UPSTREAM}"),
                    "--address=/upstream.example/198.18.100.99",
                    "--address=/nothing.example/",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start dnsmasq"),
        )
    };
    let (w, _agent) = world_with("dns-forward", &extra);
    let _upstream = topo_ready(&w);
    // Forwarded: the upstream's answer; unknown there: its NXDOMAIN.
    resolves(
        &w,
        0,
        "upstream.example",
        "A",
        "NOERROR",
        &["198.18.100.99".to_string()],
    );
    resolves(&w, 0, "nothing.example", "A", "NXDOMAIN", &[]);
    // The private zone is still answered here, not forwarded.
    resolves(&w, 0, "unknown.privatelink.internal", "A", "NXDOMAIN", &[]);
}
