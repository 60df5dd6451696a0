//! Acceptance: real servers behind endpoints of the real agent, real clients in two consumer
//! networks with the same CIDR, both at once. For each service type the data is checked byte for
//! byte, the backend sees the consumer from the NAT range, and the per-link counters account for
//! the connections and packets the clients made.
//!
//! Servers (python3's http.server, redis-server, mariadbd, a UDP echo) run in the provider namespace
//! on 198.18.100.0/24 addresses only and are killed when the test ends, also on panic.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::Path,
    process::{Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use privatelink_agent::testkit::netns::Netns;
use privatelink_tests::{
    privileged,
    world::{Proc, World, node_get, ok, sample},
};
use serde_json::json;

/// One service of the suite: its backend in the provider network and its endpoint IP in each
/// consumer network (the same in both: the networks overlap).
pub(crate) struct Kind {
    pub(crate) name: &'static str,
    pub(crate) service_type: &'static str,
    pub(crate) protocol: &'static str,
    pub(crate) backend: Ipv4Addr,
    pub(crate) service_port: u16,
    pub(crate) terminal_port: u16,
    pub(crate) endpoint: Ipv4Addr,
}

const HTTP: Kind = Kind {
    name: "web",
    service_type: "clb",
    protocol: "tcp",
    backend: Ipv4Addr::new(198, 18, 100, 11),
    service_port: 8080,
    terminal_port: 80,
    endpoint: Ipv4Addr::new(198, 18, 0, 101),
};
const REDIS: Kind = Kind {
    name: "cache",
    service_type: "redis",
    protocol: "tcp",
    backend: Ipv4Addr::new(198, 18, 100, 12),
    service_port: 6379,
    terminal_port: 6379,
    endpoint: Ipv4Addr::new(198, 18, 0, 102),
};
const MYSQL: Kind = Kind {
    name: "db",
    service_type: "mysql",
    protocol: "tcp",
    backend: Ipv4Addr::new(198, 18, 100, 13),
    service_port: 3306,
    terminal_port: 13306,
    endpoint: Ipv4Addr::new(198, 18, 0, 103),
};
const UDP: Kind = Kind {
    name: "resolver",
    service_type: "custom",
    protocol: "udp",
    backend: Ipv4Addr::new(198, 18, 100, 14),
    service_port: 5353,
    terminal_port: 53,
    endpoint: Ipv4Addr::new(198, 18, 0, 104),
};
const KINDS: [&Kind; 4] = [&HTTP, &REDIS, &MYSQL, &UDP];

fn nat_range() -> Ipv4Net {
    privatelink_agent::testkit::demo::NAT_RANGE.parse().unwrap()
}

/// Runs `program` in `ns` under `timeout` (so a hung client fails the test instead of hanging it),
/// with `stdin` if given; panics with its output unless it exits 0.
pub(crate) fn run(ns: &Netns, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = ns.command("timeout");
    cmd.arg("60").arg(program).args(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    if let Some(data) = stdin {
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} in {} failed ({}):\n{}\n{}",
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts a server in the provider namespace, its output to `log`.
pub(crate) fn server(w: &World, log: &Path, program: &str, args: &[&str]) -> Proc {
    let f = std::fs::File::create(log).unwrap();
    Proc(
        w.topo
            .provider
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}")),
    )
}

/// python's http.server on `bind`, serving each consumer's own 1 MiB file (`blob-1`, `blob-2`),
/// logging to http.log.
fn http_server(w: &World, bind: &str) -> Proc {
    let www = w.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    for c in 1..=2u64 {
        std::fs::write(www.join(format!("blob-{c}")), blob(c, 1 << 20)).unwrap();
    }
    server(
        w,
        &w.dir.join("http.log"),
        "/usr/bin/python3",
        &[
            "-u",
            "-m",
            "http.server",
            &HTTP.service_port.to_string(),
            "--bind",
            bind,
            "--directory",
            www.to_str().unwrap(),
        ],
    )
}

/// redis-server on `bind`, without persistence, logging to redis.log.
fn redis_server(w: &World, bind: &str) -> Proc {
    server(
        w,
        &w.dir.join("redis.log"),
        "redis-server",
        &[
            "--bind",
            bind,
            "--port",
            &REDIS.service_port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            w.dir.to_str().unwrap(),
        ],
    )
}

/// Retries `f` (bounded) until it returns true.
pub(crate) fn eventually(what: &str, w: &World, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "{what}\n{}", w.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether `program` exits 0 in `ns` (for readiness probes).
pub(crate) fn succeeds(ns: &Netns, program: &str, args: &[&str]) -> bool {
    ns.command("timeout")
        .arg("5")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
pub(crate) fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The same, as letters and digits (for clients that print values as text).
fn text_blob(seed: u64, len: usize) -> String {
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    blob(seed, len)
        .into_iter()
        .map(|b| A[b as usize % A.len()] as char)
        .collect()
}

/// Per-endpoint counters from one scrape.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    connections: f64,
    fwd_packets: f64,
    reply_packets: f64,
    fwd_bytes: f64,
    reply_bytes: f64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;

    /// What happened between two scrapes.
    fn sub(self, b: Counters) -> Counters {
        Counters {
            connections: self.connections - b.connections,
            fwd_packets: self.fwd_packets - b.fwd_packets,
            reply_packets: self.reply_packets - b.reply_packets,
            fwd_bytes: self.fwd_bytes - b.fwd_bytes,
            reply_bytes: self.reply_bytes - b.reply_bytes,
        }
    }
}

fn counters(w: &World, endpoints: &BTreeMap<(usize, &str), String>) -> BTreeMap<String, Counters> {
    let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").expect("scrape /metrics");
    endpoints
        .values()
        .map(|ep| {
            let get = |m: &str, dir: Option<&str>| {
                let mut want = vec![("endpoint_id", ep.as_str())];
                if let Some(d) = dir {
                    want.push(("direction", d));
                }
                sample(&text, m, &want).unwrap_or(0.0)
            };
            (
                ep.clone(),
                Counters {
                    connections: get("privatelink_link_connections_total", None),
                    fwd_packets: get("privatelink_link_packets_total", Some("forward")),
                    reply_packets: get("privatelink_link_packets_total", Some("reply")),
                    fwd_bytes: get("privatelink_link_bytes_total", Some("forward")),
                    reply_bytes: get("privatelink_link_bytes_total", Some("reply")),
                },
            )
        })
        .collect()
}

/// HTTP through the endpoint with curl: each consumer downloads its own 1 MiB file three times.
fn http_client(w: &World, c: usize) {
    http_at(w, c, HTTP.endpoint.into(), HTTP.terminal_port, 3);
}

/// Consumer `c` downloads its own 1 MiB file `rounds` times from `endpoint` (either family).
fn http_at(w: &World, c: usize, endpoint: IpAddr, port: u16, rounds: usize) {
    let ns = &w.topo.consumers[c];
    let want = blob(c as u64 + 1, 1 << 20);
    for round in 0..rounds {
        let out = run(
            ns,
            "curl",
            &[
                "-sS",
                "--fail",
                "--globoff",
                "--max-time",
                "20",
                &format!("http://{}/blob-{}", SocketAddr::new(endpoint, port), c + 1),
            ],
            None,
        );
        assert!(
            out.stdout == want,
            "consumer {c} round {round}: {} bytes differ from its own file ({} bytes)",
            out.stdout.len(),
            want.len()
        );
    }
}

/// Redis through the endpoint with redis-cli and redis-benchmark.
fn redis_client(w: &World, c: usize) -> Ipv4Addr {
    match redis_at(w, c, REDIS.endpoint.into(), REDIS.terminal_port) {
        IpAddr::V4(a) => a,
        other => panic!("consumer {c}: Redis saw {other} for an IPv4 endpoint"),
    }
}

/// Redis at `endpoint` with redis-cli and redis-benchmark: the address the server saw.
fn redis_at(w: &World, c: usize, endpoint: IpAddr, port: u16) -> IpAddr {
    let ns = &w.topo.consumers[c];
    let host = endpoint.to_string();
    let port = port.to_string();
    let cli = |args: &[&str], stdin: Option<&[u8]>| {
        let mut a = vec!["-h", &host, "-p", &port];
        a.extend_from_slice(args);
        String::from_utf8(run(ns, "redis-cli", &a, stdin).stdout).unwrap()
    };
    let key = format!("consumer-{c}");
    let value = text_blob(100 + c as u64, 64 << 10);
    assert_eq!(
        cli(&["-x", "SET", &key], Some(value.as_bytes())).trim(),
        "OK"
    );
    // -x appends nothing; the stored value is exactly what was sent.
    assert!(
        cli(&["GET", &key], None) == format!("{value}\n"),
        "consumer {c}: GET returned another value"
    );
    assert_eq!(cli(&["STRLEN", &key], None).trim(), value.len().to_string());
    let info = cli(&["CLIENT", "INFO"], None);
    let addr = info
        .split_whitespace()
        .find_map(|f| f.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr in CLIENT INFO: {info}"));
    let bench = run(
        ns,
        "redis-benchmark",
        &[
            "-h", &host, "-p", &port, "-n", "2000", "-c", "4", "-t", "set,get", "--csv",
        ],
        None,
    );
    let text = String::from_utf8_lossy(&bench.stdout);
    for t in ["SET", "GET"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("\"{t}\",\""))),
            "consumer {c}: redis-benchmark did not finish {t}:\n{text}"
        );
    }
    // `addr=198.19.128.5:40000`, or `addr=[2001:db8:ff::5]:40000`.
    let ip = addr.rsplit_once(':').map_or(addr, |(ip, _)| ip);
    ip.trim_matches(['[', ']'])
        .parse()
        .unwrap_or_else(|e| panic!("consumer {c}: {e}: addr={addr} in CLIENT INFO {info}"))
}

/// MariaDB through the endpoint with the mariadb client: a table per consumer, rows in and out.
fn mysql_client(w: &World, c: usize) -> Ipv4Addr {
    let ns = &w.topo.consumers[c];
    let sql = format!(
        "CREATE DATABASE IF NOT EXISTS acceptance; \
         CREATE TABLE acceptance.t{c} (id INT PRIMARY KEY, v VARCHAR(64)); \
         INSERT INTO acceptance.t{c} VALUES (1, 'c{c}-one'), (2, 'c{c}-two'), (3, 'c{c}-three'); \
         SELECT id, v FROM acceptance.t{c} ORDER BY id; \
         SELECT USER();"
    );
    let text = mariadb_query(ns, &MYSQL, &sql);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..3],
        [
            format!("1\tc{c}-one"),
            format!("2\tc{c}-two"),
            format!("3\tc{c}-three")
        ],
        "consumer {c}: rows read back:\n{text}"
    );
    let host = lines.get(3).copied().unwrap_or_default();
    host.rsplit_once('@')
        .and_then(|(_, ip)| ip.parse().ok())
        .unwrap_or_else(|| panic!("consumer {c}: no client address in the process list:\n{text}"))
}

/// The DNS-like UDP service: 20 queries from one socket, each answered with the peer the backend
/// saw and the query itself.
fn udp_client(w: &World, c: usize) -> Ipv4Addr {
    match udp_at(
        w,
        c,
        SocketAddr::new(UDP.endpoint.into(), UDP.terminal_port),
        20,
    ) {
        IpAddr::V4(a) => a,
        other => panic!("consumer {c}: the UDP backend saw {other} for an IPv4 endpoint"),
    }
}

/// `queries` 100-byte queries from one socket of consumer `c` to `endpoint`, each answered with
/// the peer the backend saw and the query itself: that peer's address (IPv4-mapped addresses of a
/// dual-stack server socket read back as IPv4).
fn udp_at(w: &World, c: usize, endpoint: SocketAddr, queries: u64) -> IpAddr {
    let any: SocketAddr = match endpoint {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
    };
    let sock = w.topo.consumers[c].enter(|| UdpSocket::bind(any).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut seen = None;
    for q in 0..queries {
        let query = text_blob(1000 * (c as u64 + 1) + q, 100);
        sock.send_to(query.as_bytes(), endpoint).unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("consumer {c} query {q} to {endpoint}: {e}"));
        assert_eq!(from, endpoint);
        let reply = std::str::from_utf8(&buf[..n]).unwrap();
        let (peer, echoed) = reply.split_once('\n').unwrap();
        assert_eq!(echoed, query, "consumer {c} query {q}: another answer");
        let peer: SocketAddr = peer.parse().unwrap();
        assert!(
            seen.is_none_or(|s| s == peer),
            "one socket is one flow: {peer} after {seen:?}"
        );
        seen = Some(peer);
    }
    seen.unwrap().ip().to_canonical()
}

/// The UDP echo in the provider namespace (bounded to 120 s).
fn udp_server(w: &World, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    udp_server_at(
        w,
        SocketAddr::new(UDP.backend.into(), UDP.service_port),
        stop,
    )
}

/// The UDP echo at `at` in the provider namespace (bounded to 120 s).
fn udp_server_at(w: &World, at: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let sock = w.topo.provider.enter(|| UdpSocket::bind(at).unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    w.topo.provider.spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                let mut reply = format!("{peer}\n").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, peer);
            }
        }
    })
}

/// Service `k` with `backends` through the provider's API, both consumer accounts allowlisted, an
/// endpoint of each consumer (`address`: the request's address fields), all accepted.
/// Records the endpoint ids in `endpoints` by (consumer, service name); returns the endpoints.
pub(crate) fn offer(
    w: &World,
    k: &'static Kind,
    backends: &[String],
    endpoints: &mut BTreeMap<(usize, &str), String>,
    address: serde_json::Value,
) -> Vec<serde_json::Value> {
    let svc = ok(
        &w.topo,
        &w.tokens[0],
        "/v1/services",
        json!({ "name": k.name, "network_id": w.vpcs[0].0, "service_type": k.service_type,
            "backends": backends,
            "port_mappings": [{ "protocol": k.protocol, "service_port": k.service_port, "terminal_port": k.terminal_port }] }),
    );
    let svc = svc["id"].as_str().unwrap().to_string();
    let mut made = Vec::new();
    for c in 0..2 {
        ok(
            &w.topo,
            &w.tokens[0],
            &format!("/v1/services/{svc}/allowlist"),
            json!({ "account_id": format!("100000000{}", c + 1) }),
        );
        let mut req = json!({ "name": k.name, "service_id": svc, "network_id": w.vpcs[c + 1].0,
            "subnet_id": w.vpcs[c + 1].1 });
        for (f, v) in address.as_object().expect("address fields") {
            req[f] = v.clone();
        }
        let ep = ok(&w.topo, &w.tokens[c + 1], "/v1/endpoints", req);
        endpoints.insert((c, k.name), ep["id"].as_str().unwrap().to_string());
        made.push(ep);
    }
    let ids: Vec<&serde_json::Value> = made.iter().map(|ep| &ep["id"]).collect();
    ok(
        &w.topo,
        &w.tokens[0],
        &format!("/v1/services/{svc}/accept"),
        json!({ "endpoint_ids": ids }),
    );
    made
}

/// mariadbd on `k`'s backend address and port (with `extra` options), its data and log in the
/// world's directory, with a network user `app` (password `app-secret`) made over its socket once
/// it is up.
pub(crate) fn mariadb_server(w: &World, k: &Kind, extra: &[&str]) -> Proc {
    let provider = &w.topo.provider;
    let data = w.dir.join(format!("mariadb-{}", k.name));
    run(
        provider,
        "mariadb-install-db",
        &[
            "--no-defaults",
            &format!("--datadir={}", data.display()),
            "--user=root",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        None,
    );
    let mut args = vec![
        "--no-defaults".to_string(),
        format!("--datadir={}", data.display()),
        format!("--socket={}", data.join("sock").display()),
        format!("--pid-file={}", data.join("pid").display()),
        format!("--bind-address={}", k.backend),
        format!("--port={}", k.service_port),
        "--user=root".into(),
        "--skip-name-resolve".into(),
        "--innodb-buffer-pool-size=32M".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = server(
        w,
        &w.dir.join(format!("mariadb-{}.log", k.name)),
        "mariadbd",
        &args,
    );
    let sock = format!("--socket={}", data.join("sock").display());
    eventually("mariadbd starts", w, || {
        succeeds(
            provider,
            "mariadb",
            &["--no-defaults", &sock, "-u", "root", "-e", "SELECT 1"],
        )
    });
    run(
        provider,
        "mariadb",
        &[
            "--no-defaults",
            &sock,
            "-u",
            "root",
            "-e",
            "CREATE USER 'app'@'%' IDENTIFIED BY 'app-secret'; GRANT ALL ON *.* TO 'app'@'%';",
        ],
        None,
    );
    p
}

/// Runs `sql` with the mariadb client in `ns` as user `app` through `k`'s endpoint; its output
/// (tab-separated, no column names).
pub(crate) fn mariadb_query(ns: &Netns, k: &Kind, sql: &str) -> String {
    let out = run(
        ns,
        "mariadb",
        &[
            "--no-defaults",
            "-h",
            &k.endpoint.to_string(),
            "-P",
            &k.terminal_port.to_string(),
            "-u",
            "app",
            "-papp-secret",
            "--batch",
            "--skip-column-names",
            "-e",
            sql,
        ],
        None,
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Stops a thread on drop (the UDP server), also on panic.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn real_clients_reach_real_servers_through_endpoints_in_overlapping_networks() {
    if !privileged("real_clients_reach_real_servers_through_endpoints_in_overlapping_networks") {
        return;
    }
    let (mut w, _agent) = privatelink_tests::world::world_with("acceptance", "");
    let provider = &w.topo.provider;
    for k in KINDS {
        provider
            .ip(&["addr", "add", &format!("{}/24", k.backend), "dev", "eth0"])
            .unwrap();
    }

    // Servers, on provider addresses only.
    let dir = w.dir.clone();
    let _http = http_server(&w, &HTTP.backend.to_string());
    let _redis = redis_server(&w, &REDIS.backend.to_string());
    let _mysql = mariadb_server(&w, &MYSQL, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let udp = udp_server(&w, stop);

    // Services, allowlists and endpoints through the agent's API; every endpoint accepted.
    let mut endpoints: BTreeMap<(usize, &str), String> = BTreeMap::new();
    for k in KINDS {
        offer(
            &w,
            k,
            &[k.backend.to_string()],
            &mut endpoints,
            json!({ "ip": k.endpoint.to_string() }),
        );
    }
    w.eps = endpoints.values().cloned().collect();

    // Every server answers through every endpoint (the first packets resolve neighbours).
    for c in 0..2 {
        let ns = &w.topo.consumers[c];
        let url = format!("http://{}/blob-{}", HTTP.endpoint, c + 1);
        eventually(&format!("HTTP through consumer {c}"), &w, || {
            succeeds(
                ns,
                "curl",
                &["-sf", "-o", "/dev/null", "--max-time", "2", &url],
            )
        });
        let h = REDIS.endpoint.to_string();
        eventually(&format!("Redis through consumer {c}"), &w, || {
            succeeds(ns, "redis-cli", &["-h", &h, "-p", "6379", "PING"])
        });
        let h = MYSQL.endpoint.to_string();
        eventually(&format!("MariaDB through consumer {c}"), &w, || {
            succeeds(
                ns,
                "mariadb",
                &[
                    "--no-defaults",
                    "-h",
                    &h,
                    "-P",
                    "13306",
                    "-u",
                    "app",
                    "-papp-secret",
                    "-e",
                    "SELECT 1",
                ],
            )
        });
        eventually(&format!("UDP through consumer {c}"), &w, || {
            let sock = ns.enter(|| UdpSocket::bind("0.0.0.0:0").unwrap());
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            sock.send_to(b"ping", (UDP.endpoint, UDP.terminal_port))
                .is_ok()
                && sock.recv_from(&mut [0u8; 64]).is_ok()
        });
    }

    // The measured run: both consumers at once, every service.
    let before = counters(&w, &endpoints);
    let http_lines_before = std::fs::read_to_string(dir.join("http.log"))
        .unwrap()
        .lines()
        .count();
    let seen: Vec<[Ipv4Addr; 3]> = std::thread::scope(|s| {
        let w = &w;
        let handles: Vec<_> = (0..2)
            .map(|c| {
                s.spawn(move || {
                    http_client(w, c);
                    [redis_client(w, c), mysql_client(w, c), udp_client(w, c)]
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a consumer's clients failed"))
            .collect()
    });
    let after = counters(&w, &endpoints);

    // The backends saw the consumers from the NAT range only.
    let nat = nat_range();
    for (c, addrs) in seen.iter().enumerate() {
        for (k, a) in [&REDIS, &MYSQL, &UDP].iter().zip(addrs) {
            assert!(
                nat.contains(a),
                "{} saw consumer {c} as {a}, outside {nat}",
                k.name
            );
        }
    }
    let http_log = std::fs::read_to_string(dir.join("http.log")).unwrap();
    let gets: Vec<&str> = http_log
        .lines()
        .skip(http_lines_before)
        .filter(|l| l.contains("\"GET /blob-"))
        .collect();
    assert_eq!(gets.len(), 6, "three downloads per consumer:\n{http_log}");
    for l in &gets {
        let a: Ipv4Addr = l.split_whitespace().next().unwrap().parse().unwrap();
        assert!(nat.contains(&a), "the HTTP server saw {a}: {l}");
    }

    // Per-link counters account for what the clients did.
    for c in 0..2 {
        let d = |k: &Kind| {
            let ep = &endpoints[&(c, k.name)];
            after[ep] - before[ep]
        };
        let http = d(&HTTP);
        assert_eq!(
            http.connections, 3.0,
            "consumer {c}: one per curl: {http:?}"
        );
        assert!(
            http.reply_bytes > 3.0 * (1 << 20) as f64,
            "consumer {c}: 3 MiB came back: {http:?}"
        );
        let redis = d(&REDIS);
        // 4 redis-cli calls plus redis-benchmark's 4 clients per test (and its config probe).
        assert!(
            redis.connections >= 12.0,
            "consumer {c}: redis connections {redis:?}"
        );
        assert!(redis.fwd_bytes > (64 << 10) as f64 && redis.reply_bytes > (64 << 10) as f64);
        let mysql = d(&MYSQL);
        assert_eq!(
            mysql.connections, 1.0,
            "consumer {c}: one client: {mysql:?}"
        );
        assert!(mysql.fwd_packets > 0.0 && mysql.reply_packets > 0.0);
        let udp = d(&UDP);
        let frame = (14 + 20 + 8 + 100) as f64;
        assert_eq!(udp.connections, 1.0, "consumer {c}: one socket: {udp:?}");
        assert_eq!(udp.fwd_packets, 20.0, "consumer {c}: {udp:?}");
        assert_eq!(udp.reply_packets, 20.0, "consumer {c}: {udp:?}");
        assert_eq!(udp.fwd_bytes, 20.0 * frame, "consumer {c}: {udp:?}");
        // Each answer carries "<peer>\n" before the query.
        assert!(udp.reply_bytes > udp.fwd_bytes, "consumer {c}: {udp:?}");
    }
    drop(_stop);
    udp.join().unwrap();
}

/// IPv6 addresses of the dual-stack and IPv6-only services' backends and endpoints (the endpoint
/// addresses are the same in both consumer networks: their IPv6 prefixes overlap too).
const WEB6: (Ipv6Addr, Ipv6Addr) = (
    Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x101),
);
const CACHE6: (Ipv6Addr, Ipv6Addr) = (
    Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x102),
);
const RESOLVER6: (Ipv6Addr, Ipv6Addr) = (
    Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 0x14),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x104),
);

fn nat_range6() -> ipnet::Ipv6Net {
    privatelink_agent::testkit::demo::NAT_RANGE6
        .parse()
        .unwrap()
}

#[test]
fn real_clients_reach_real_servers_through_ipv6_and_dual_stack_endpoints() {
    if !privileged("real_clients_reach_real_servers_through_ipv6_and_dual_stack_endpoints") {
        return;
    }
    let (w, _agent) = privatelink_tests::world::world_with("accept6", "");
    let provider = &w.topo.provider;
    for a in [HTTP.backend, UDP.backend] {
        provider
            .ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])
            .unwrap();
    }
    for (a, _) in [WEB6, CACHE6, RESOLVER6] {
        provider
            .ip(&["addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"])
            .unwrap();
    }

    // Servers: HTTP on both families of one dual-stack socket, Redis on IPv6 only, the UDP echo
    // on a socket per backend address (an unbound UDP socket would answer from the interface's
    // primary address, not the one the query went to).
    let dir = w.dir.clone();
    let _http = http_server(&w, "::");
    let _redis = redis_server(&w, &CACHE6.0.to_string());
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let udp = [IpAddr::from(RESOLVER6.0), UDP.backend.into()]
        .map(|a| udp_server_at(&w, SocketAddr::new(a, UDP.service_port), stop.clone()));

    // web and resolver: dual-stack endpoints (IPv4 and IPv6 backends); cache: IPv6 only.
    let services: [(&Kind, Vec<String>, &str, Ipv6Addr); 3] = [
        (
            &HTTP,
            vec![HTTP.backend.to_string(), WEB6.0.to_string()],
            "dualstack",
            WEB6.1,
        ),
        (&REDIS, vec![CACHE6.0.to_string()], "ipv6", CACHE6.1),
        (
            &UDP,
            vec![UDP.backend.to_string(), RESOLVER6.0.to_string()],
            "dualstack",
            RESOLVER6.1,
        ),
    ];
    let mut endpoints: BTreeMap<(usize, &str), String> = BTreeMap::new();
    for (k, backends, family, ip6) in &services {
        let address = if *family == "dualstack" {
            json!({ "ip_address_type": family, "ip": k.endpoint.to_string(), "ipv6": ip6.to_string() })
        } else {
            json!({ "ip_address_type": family, "ip": ip6.to_string() })
        };
        let made = offer(&w, k, backends, &mut endpoints, address);
        for ep in made {
            assert_eq!(ep["ip_address_type"], json!(family), "{ep}");
        }
    }

    // Every server answers through every endpoint address (the first packets resolve neighbours:
    // the consumers' through the datapath's neighbour advertisements).
    for c in 0..2 {
        let ns = &w.topo.consumers[c];
        for ip in [IpAddr::from(WEB6.1), HTTP.endpoint.into()] {
            let url = format!("http://{}/blob-{}", SocketAddr::new(ip, 80), c + 1);
            eventually(&format!("HTTP to {ip} through consumer {c}"), &w, || {
                succeeds(
                    ns,
                    "curl",
                    &["-sf", "-g", "-o", "/dev/null", "--max-time", "2", &url],
                )
            });
        }
        let h = CACHE6.1.to_string();
        eventually(&format!("Redis through consumer {c}"), &w, || {
            succeeds(ns, "redis-cli", &["-h", &h, "-p", "6379", "PING"])
        });
        for ip in [IpAddr::from(RESOLVER6.1), UDP.endpoint.into()] {
            let to = SocketAddr::new(ip, UDP.terminal_port);
            eventually(&format!("UDP to {to} through consumer {c}"), &w, || {
                let any = if ip.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
                let sock = ns.enter(|| UdpSocket::bind(any).unwrap());
                sock.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                sock.send_to(b"ping", to).is_ok() && sock.recv_from(&mut [0u8; 64]).is_ok()
            });
        }
    }

    // The measured run, both consumers at once: per consumer, three downloads over IPv6 and one
    // over IPv4 from the same dual-stack endpoint, Redis over IPv6, 20 UDP queries over IPv6 and
    // 5 over IPv4.
    let before = counters(&w, &endpoints);
    let http_lines_before = std::fs::read_to_string(dir.join("http.log"))
        .unwrap()
        .lines()
        .count();
    let seen: Vec<[IpAddr; 3]> = std::thread::scope(|s| {
        let w = &w;
        let handles: Vec<_> = (0..2)
            .map(|c| {
                s.spawn(move || {
                    http_at(w, c, WEB6.1.into(), HTTP.terminal_port, 3);
                    http_at(w, c, HTTP.endpoint.into(), HTTP.terminal_port, 1);
                    let resolver = |ip: IpAddr| SocketAddr::new(ip, UDP.terminal_port);
                    [
                        redis_at(w, c, CACHE6.1.into(), REDIS.terminal_port),
                        udp_at(w, c, resolver(RESOLVER6.1.into()), 20),
                        udp_at(w, c, resolver(UDP.endpoint.into()), 5),
                    ]
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a consumer's clients failed"))
            .collect()
    });
    let after = counters(&w, &endpoints);

    // The backends saw IPv6 consumers from the IPv6 NAT range and IPv4 ones from the IPv4 range.
    let (nat4, nat6) = (nat_range(), nat_range6());
    for (c, [redis, udp6, udp4]) in seen.iter().enumerate() {
        for a in [redis, udp6] {
            assert!(
                matches!(a, IpAddr::V6(a) if nat6.contains(a)),
                "consumer {c} was seen as {a} over IPv6, outside {nat6}"
            );
        }
        assert!(
            matches!(udp4, IpAddr::V4(a) if nat4.contains(a)),
            "consumer {c} was seen as {udp4} over IPv4, outside {nat4}"
        );
    }
    let http_log = std::fs::read_to_string(dir.join("http.log")).unwrap();
    let peers: Vec<IpAddr> = http_log
        .lines()
        .skip(http_lines_before)
        .filter(|l| l.contains("\"GET /blob-"))
        .map(|l| {
            let a = l.split_whitespace().next().unwrap();
            let a: IpAddr = a.parse().unwrap_or_else(|e| panic!("{a}: {e} in {l}"));
            a.to_canonical()
        })
        .collect();
    assert_eq!(peers.len(), 8, "four downloads per consumer:\n{http_log}");
    let v6 = peers
        .iter()
        .filter(|a| matches!(a, IpAddr::V6(a) if nat6.contains(a)))
        .count();
    let v4 = peers
        .iter()
        .filter(|a| matches!(a, IpAddr::V4(a) if nat4.contains(a)))
        .count();
    assert_eq!((v6, v4), (6, 2), "the HTTP server saw {peers:?}");

    // NAT usage per family's range: every flow holds one (address, port) pair of its family's
    // range, so the two rows add up to the flows in conntrack (one scrape, one reading), and each
    // holds at least the two consumers' UDP flows of its family (live for the 60 s UDP timeout).
    // The figures come from the periodic conntrack scan: wait (bounded) for one that has seen
    // the flows.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (text, used4, used6) = loop {
        let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").expect("scrape /metrics");
        let nat = |m: &str, range: String| {
            sample(&text, m, &[("range", range.as_str())])
                .unwrap_or_else(|| panic!("{m} for {range} missing:\n{text}"))
        };
        let (used4, used6) = (
            nat("privatelink_nat_ports_used", nat4.to_string()),
            nat("privatelink_nat_ports_used", nat6.to_string()),
        );
        if used4 >= 2.0 && used6 >= 2.0 {
            break (text, used4, used6);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "used {used4} IPv4, {used6} IPv6"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let nat = |m: &str, range: String| {
        sample(&text, m, &[("range", range.as_str())])
            .unwrap_or_else(|| panic!("{m} for {range} missing:\n{text}"))
    };
    let entries = sample(&text, "privatelink_conntrack_entries", &[]).expect("conntrack entries");
    assert_eq!(
        used4 + used6,
        entries / 2.0,
        "one NAT pair per flow:\n{text}"
    );
    assert_eq!(
        nat("privatelink_nat_ports_available", nat6.to_string()),
        (1u64 << (128 - nat6.prefix_len())) as f64 * 64512.0,
        "the IPv6 range's addresses × ports 1024-65535"
    );
    assert_eq!(
        nat("privatelink_nat_ports_free", nat4.to_string()),
        nat("privatelink_nat_ports_available", nat4.to_string())
            - nat("privatelink_nat_ports_used", nat4.to_string()),
        "free = offered − in use"
    );
    assert_eq!(
        sample(&text, "privatelink_nat_allocation_failures_total", &[]),
        Some(0.0),
        "no flow was refused a NAT port:\n{text}"
    );

    // Per-link counters account for both families' traffic on the same endpoint.
    for c in 0..2 {
        let d = |name: &str| {
            let ep = &endpoints[&(c, name)];
            after[ep] - before[ep]
        };
        let http = d(HTTP.name);
        assert_eq!(
            http.connections, 4.0,
            "consumer {c}: one per curl, both families: {http:?}"
        );
        assert!(
            http.reply_bytes > 4.0 * (1 << 20) as f64,
            "consumer {c}: 4 MiB came back: {http:?}"
        );
        let redis = d(REDIS.name);
        assert!(
            redis.connections >= 12.0,
            "consumer {c}: redis connections {redis:?}"
        );
        assert!(redis.fwd_bytes > (64 << 10) as f64 && redis.reply_bytes > (64 << 10) as f64);
        let udp = d(UDP.name);
        let (frame6, frame4) = ((14 + 40 + 8 + 100) as f64, (14 + 20 + 8 + 100) as f64);
        assert_eq!(
            udp.connections, 2.0,
            "consumer {c}: one socket per family: {udp:?}"
        );
        assert_eq!(udp.fwd_packets, 25.0, "consumer {c}: {udp:?}");
        assert_eq!(udp.reply_packets, 25.0, "consumer {c}: {udp:?}");
        assert_eq!(
            udp.fwd_bytes,
            20.0 * frame6 + 5.0 * frame4,
            "consumer {c}: {udp:?}"
        );
    }
    drop(_stop);
    for u in udp {
        u.join().unwrap();
    }
}
