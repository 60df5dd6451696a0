//! High availability with real agents: two nodes of one group on a shared consumer segment and a
//! shared provider segment (bridges in namespaces of their own), one etcd, curl as the client and
//! Python's HTTP server, socat and iperf3 as backends. The nodes share one NAT range, which the
//! backends route through the group's moving address.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use privatelink_agent::{
    datapath::loader::{Datapath, Sizes},
    testkit::{
        demo::{CLIENT, ENDPOINT},
        netns::{Netns, veth},
    },
};
use privatelink_tests::{
    agent_bin, privileged,
    world::{ADMIN, API, BpfFs, Proc, sample},
};
use serde_json::{Value, json};

use crate::etcd::{etcd_url, link_to_etcd, shared_etcd};

const GROUP_KEY: &str = "a-group-key-of-more-than-thirty-two-characters";
const BACKEND: &str = "198.18.100.10";
const VIP: &str = "198.18.100.250";

/// A namespace with a bridge: one Ethernet segment.
fn segment(tag: &str) -> Netns {
    let ns = Netns::new(tag).expect("segment namespace");
    ns.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    ns.ip(&["link", "set", "br0", "up"]).unwrap();
    ns
}

/// Plugs `dev` of `ns` into `seg` (port `port`), with the pass program on the port: frames a
/// node redirects in native XDP arrive there.
fn plug(seg: &Netns, port: &str, ns: &Netns, dev: &str, pass: &mut Datapath) {
    veth(seg, port, ns, dev).expect("veth");
    seg.ip(&["link", "set", port, "master", "br0"]).unwrap();
    seg.enter(|| pass.pass_program().attach(port, XdpMode::Driver))
        .expect("the pass program on a bridge port");
}

struct Node {
    name: &'static str,
    ns: Netns,
    dir: PathBuf,
    _bpffs: BpfFs,
    agent: Option<Proc>,
}

impl Node {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns.name()))
            .arg(agent_bin("privatelink-agent"))
            .args([
                "run",
                "--config",
                self.dir.join("agent.toml").to_str().unwrap(),
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the agent");
        self.agent = Some(Proc(child));
        wait(
            &format!("{}'s API", self.name),
            Duration::from_secs(20),
            || self.api(ADMIN, "GET", "/v1/revision", None).0 == 200,
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn api(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (token, method, url) = (
            token.to_string(),
            method.to_string(),
            format!("http://{API}{path}"),
        );
        self.ns.enter(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into();
            let auth = format!("Bearer {token}");
            let r = match method.as_str() {
                "GET" => agent.get(&url).header("Authorization", &auth).call(),
                _ => agent
                    .post(&url)
                    .header("Authorization", &auth)
                    .header("Content-Type", "application/json")
                    .send(body.unwrap_or(json!({})).to_string()),
            };
            match r {
                Ok(mut r) => {
                    let status = r.status().as_u16();
                    let text = r.body_mut().read_to_string().unwrap_or_default();
                    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
                }
                Err(e) => (0, json!({ "error": e.to_string() })),
            }
        })
    }

    fn post(&self, token: &str, path: &str, body: Value) -> Value {
        let (status, v) = self.api(token, "POST", path, Some(body.clone()));
        assert!(
            status == 200 || status == 201,
            "POST {path} {body}: {status} {v}"
        );
        v
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = self.ns.enter(|| {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(3)))
                .build()
                .into();
            agent
                .get("http://127.0.0.1:9464/metrics")
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
        })?;
        sample(&text, name, labels)
    }

    fn active(&self) -> bool {
        self.metric("privatelink_ha_active", &[]) == Some(1.0)
    }

    fn links(&self, up: bool) {
        for dev in ["h0", "q0"] {
            self.ns
                .ip(&["link", "set", dev, if up { "up" } else { "down" }])
                .unwrap();
        }
    }
}

/// Waits (at most `within`) until `ok` holds; how long it took.
fn wait(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

/// curl from the client to the endpoint: the HTTP status, or 0 when nothing answered within
/// `timeout`.
fn curl(client: &Netns, timeout: Duration) -> u16 {
    let out = client
        .command("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            &format!("{:.2}", timeout.as_secs_f64()),
            &format!("http://{ENDPOINT}/"),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// A node of the group, linked to both segments and to etcd; its config written.
fn node(
    i: u8,
    et: &Netns,
    segments: (&Netns, &Netns),
    pass: &mut Datapath,
    root: &std::path::Path,
) -> Node {
    let name = ["node-a", "node-b"][i as usize];
    let ns = Netns::new(&format!("ha{i}")).expect("node namespace");
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv6.conf.all.forwarding", "1"),
    ] {
        ns.sysctl(k, v).unwrap();
    }
    plug(segments.0, &format!("h{i}"), &ns, "h0", pass);
    plug(segments.1, &format!("q{i}"), &ns, "q0", pass);
    ns.ip(&[
        "addr",
        "add",
        &format!("198.18.100.{}/24", 1 + i),
        "dev",
        "q0",
    ])
    .unwrap();
    link_to_etcd(et, &ns, i);
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let bpffs = BpfFs::mount(&dir);
    Node {
        name,
        ns,
        dir,
        _bpffs: bpffs,
        agent: None,
    }
}

fn write_config(n: &Node, i: u8, vpcs: &[(String, String)]) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(n.dir.join("admin-token"), ADMIN).unwrap();
    let key = n.dir.join("ha.key");
    std::fs::write(&key, GROUP_KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (me, peer) = (1 + i, 2 - i);
    let cfg = format!(
        r#"node = "{name}"
admin_token_file = "{dir}/admin-token"
resync_interval = 1
bpffs = "{dir}/bpffs/privatelink"
[api]
listen = "{API}"
[store]
path = "{dir}/state.db"
etcd = ["{etcd}"]
[[interfaces]]
name = "h0"
network = "{consumer}"
role = "consumer"
[[interfaces]]
name = "q0"
network = "{provider}"
role = "provider"
[nat.{provider}]
range = "198.19.128.0/24"
[ha]
group = "edge"
listen = "198.18.100.{me}:7946"
peers = ["198.18.100.{peer}:7946"]
key_file = "{key}"
[[ha.addresses]]
interface = "q0"
address = "{VIP}/24"
"#,
        name = n.name,
        dir = n.dir.display(),
        etcd = etcd_url(i),
        consumer = vpcs[1].0,
        provider = vpcs[0].0,
        key = key.display(),
    );
    std::fs::write(n.dir.join("agent.toml"), cfg).unwrap();
}

/// Long-lived connections through the endpoint: `CONNS` connections, each sending a line every
/// 100 ms and checking its echo, until the file `stop` appears (at most 60 s); then one JSON line:
/// connections, rounds, how many broke (reset, closed, a wrong echo) and the longest wait.
const HOLDER: &str = r#"
import json, os, socket, sys, time
host, port, n, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
conns = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=5)
    s.settimeout(2)
    conns.append([s, s.makefile("rb"), True])
print("connected", flush=True)
rounds, broken, worst, end = 0, 0, 0.0, time.time() + 60
while not os.path.exists(stop) and time.time() < end:
    for c in conns:
        if not c[2]:
            continue
        t = time.time()
        try:
            c[0].sendall(b"%d\n" % rounds)
            if c[1].readline() != b"%d\n" % rounds:
                raise OSError("wrong echo")
        except OSError:
            broken += 1
            c[2] = False
        worst = max(worst, time.time() - t)
    rounds += 1
    time.sleep(0.1)
print(json.dumps({"conns": n, "rounds": rounds, "broken": broken, "worst_ms": int(worst * 1000)}))
"#;

/// A running holder: its process and its output lines.
struct Holder {
    proc: Proc,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    stop: PathBuf,
}

impl Holder {
    /// `n` connections to the endpoint's echo port from `client`, once they are all connected.
    fn start(client: &Netns, root: &std::path::Path, name: &str, n: usize) -> Holder {
        let script = root.join("holder.py");
        std::fs::write(&script, HOLDER).unwrap();
        let stop = root.join(format!("stop-{name}"));
        let mut child = client
            .command("python3")
            .args([
                script.to_str().unwrap(),
                &ENDPOINT.to_string(),
                "81",
                &n.to_string(),
                stop.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the holder");
        let mut lines =
            std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        assert_eq!(
            lines.next().and_then(Result::ok).as_deref(),
            Some("connected"),
            "the holder's connections"
        );
        Holder {
            proc: Proc(child),
            lines,
            stop,
        }
    }

    /// Stops it; its summary.
    fn finish(mut self) -> Value {
        std::fs::write(&self.stop, "").unwrap();
        let line = self.lines.next().and_then(Result::ok).unwrap_or_default();
        let _ = self.proc.0.wait();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("the holder's summary {line:?}: {e}"))
    }
}

/// Node A crashes (its agent killed, its interfaces gone): node B takes the group over. The
/// flows A carried go on through B (B installed A's conntrack as A sent it): long-lived echo
/// connections and an iperf3 stream lose nothing; new connections work again within the fence
/// time and a heartbeat. A returns as a standby (no preemption). Forged messages are counted and
/// change nothing.
#[test]
fn a_standby_takes_over_when_the_active_node_crashes_and_a_returning_node_stands_by() {
    if !privileged("a_standby_takes_over_when_the_active_node_crashes") {
        return;
    }
    let (et, _etcd) = shared_etcd("ha");
    let root = std::env::temp_dir().join(format!("privatelink-ha-{}", std::process::id()));
    let _cleanup = Cleanup(root.clone());
    let mut pass = Datapath::load(&Sizes::small()).expect("the pass program");
    let (lan_c, lan_p) = (segment("hlc"), segment("hlp"));
    let client = Netns::new("hcl").unwrap();
    plug(&lan_c, "cl", &client, "eth0", &mut pass);
    client
        .ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"])
        .unwrap();
    let backend = Netns::new("hbk").unwrap();
    plug(&lan_p, "bk", &backend, "eth0", &mut pass);
    backend
        .ip(&["addr", "add", &format!("{BACKEND}/24"), "dev", "eth0"])
        .unwrap();
    backend
        .ip(&["route", "add", "198.19.128.0/24", "via", VIP])
        .unwrap();
    let mut a = node(0, &et, (&lan_c, &lan_p), &mut pass, &root);
    let mut b = node(1, &et, (&lan_c, &lan_p), &mut pass, &root);

    // Accounts and networks with the real code, through etcd.
    let store = privatelink_agent::node::config::StoreConfig {
        path: a.dir.join("prepare.db"),
        etcd: vec![etcd_url(0)],
        ..Default::default()
    };
    let p =
        a.ns.enter(|| {
            privatelink_agent::testkit::demo::prepare(
                &privatelink_agent::control::plane::ControlPlane::open(store.open()?, ADMIN)?,
                &[
                    ("provider", "198.18.100.0/24", "198.18.100.0/24"),
                    ("1000000001", "198.18.0.0/16", "198.18.0.0/24"),
                ],
            )
        })
        .expect("accounts and networks");
    write_config(&a, 0, &p.vpcs);
    write_config(&b, 1, &p.vpcs);
    a.start();
    wait("A active", Duration::from_secs(10), || a.active());
    b.start();
    wait("B hears A", Duration::from_secs(10), || {
        b.metric("privatelink_ha_peer_up", &[("peer", "node-a")]) == Some(1.0)
    });
    assert!(!b.active(), "B stands by while A is alive");

    // A real HTTP server behind the endpoint; the service made through A.
    let spawn = |ns: &Netns, program: &str, args: &[&str]| {
        Proc(
            ns.command(program)
                .args(args)
                .current_dir(&root)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{program}: {e}")),
        )
    };
    let _web = spawn(
        &backend,
        "python3",
        &["-m", "http.server", "8080", "--bind", BACKEND],
    );
    let echo_at = format!("TCP-LISTEN:9000,bind={BACKEND},fork,reuseaddr");
    let _echo = spawn(&backend, "socat", &[&echo_at, "PIPE"]);
    let _iperf = spawn(&backend, "iperf3", &["-s", "-B", BACKEND, "-p", "5201"]);
    let (prov, cons) = (&p.tokens[0], &p.tokens[1]);
    let svc = a.post(
        prov,
        "/v1/services",
        json!({ "name": "web", "network_id": p.vpcs[0].0, "service_type": "clb",
            "backends": [BACKEND], "auto_accept": true,
            "port_mappings": [
                { "protocol": "tcp", "service_port": 8080, "terminal_port": 80 },
                { "protocol": "tcp", "service_port": 9000, "terminal_port": 81 },
                { "protocol": "tcp", "service_port": 5201, "terminal_port": 5201 }] }),
    );
    let svc = svc["id"].as_str().unwrap().to_string();
    a.post(
        prov,
        &format!("/v1/services/{svc}/allowlist"),
        json!({ "account_id": "1000000001" }),
    );
    a.post(
        cons,
        "/v1/endpoints",
        json!({ "name": "web", "service_id": svc, "network_id": p.vpcs[1].0,
            "subnet_id": p.vpcs[1].1, "ip": ENDPOINT.to_string() }),
    );
    wait(
        "the endpoint answers through A",
        Duration::from_secs(15),
        || curl(&client, Duration::from_secs(1)) == 200,
    );

    // Forged heartbeats from A's address: counted by B, nothing else changes.
    a.ns.enter(|| {
        let s = std::net::UdpSocket::bind("198.18.100.1:0").unwrap();
        s.send_to(b"PLHA not a heartbeat", "198.18.100.2:7946")
            .unwrap();
        let mut forged = vec![b'P', b'L', b'H', b'A', 1, 1, 4, 6];
        forged.extend([0u8; 16]);
        forged.extend(b"edgenode-a");
        forged.extend([0u8; 32]);
        s.send_to(&forged, "198.18.100.2:7946").unwrap();
    });
    wait("B counts the forgeries", Duration::from_secs(5), || {
        b.metric(
            "privatelink_ha_heartbeats_rejected_total",
            &[("reason", "malformed")],
        ) >= Some(1.0)
            && b.metric(
                "privatelink_ha_heartbeats_rejected_total",
                &[("reason", "forged")],
            ) >= Some(1.0)
    });
    assert!(
        a.active() && !b.active(),
        "forged heartbeats changed nothing"
    );

    // Connections that live across the crash: echo holders and an iperf3 stream.
    const CONNS: usize = 100;
    let holder = Holder::start(&client, &root, "crash", CONNS);
    let iperf = client
        .command("iperf3")
        .args([
            "-c",
            &ENDPOINT.to_string(),
            "-p",
            "5201",
            "-t",
            "6",
            "-i",
            "0.5",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("iperf3");
    // B has A's flows before A goes.
    wait("B installs A's flows", Duration::from_secs(5), || {
        b.metric("privatelink_ha_flows_installed_total", &[]) >= Some(2.0 * CONNS as f64)
    });
    std::thread::sleep(Duration::from_secs(1));

    // The crash: A's agent killed and its interfaces gone at once.
    let t0 = Instant::now();
    a.agent = None;
    a.links(false);
    let took = wait(
        "the endpoint answers through B",
        Duration::from_secs(5),
        || curl(&client, Duration::from_millis(250)) == 200,
    );
    eprintln!(
        "takeover: the endpoint answered again {:?} after the crash",
        t0.elapsed()
    );
    assert!(took < Duration::from_secs(2), "took {took:?}\n{}", b.log());
    assert!(b.active());
    assert_eq!(b.metric("privatelink_ha_takeovers_total", &[]), Some(1.0));
    assert!(b.log().contains("took over from node-a"), "{}", b.log());
    // The flows A carried went on through B.
    let iperf = iperf.wait_with_output().expect("iperf3 ends");
    assert!(
        iperf.status.success(),
        "iperf3 across the takeover: {}{}",
        String::from_utf8_lossy(&iperf.stdout),
        String::from_utf8_lossy(&iperf.stderr)
    );
    let summary = holder.finish();
    eprintln!("long-lived connections across the takeover: {summary}");
    assert_eq!(summary["broken"], 0, "{summary}\n{}", b.log());
    assert!(summary["rounds"].as_u64().unwrap() > 20, "{summary}");
    assert_eq!(
        b.metric("privatelink_ha_flows_refused_total", &[("reason", "nat")]),
        Some(0.0)
    );

    // A returns (its agent first, as after a reboot): it stands by, and traffic stays on B.
    a.start();
    a.links(true);
    wait("A hears B", Duration::from_secs(10), || {
        a.metric("privatelink_ha_peer_up", &[("peer", "node-b")]) == Some(1.0)
    });
    for _ in 0..10 {
        assert!(!a.active() && b.active(), "no preemption");
        assert_eq!(curl(&client, Duration::from_secs(1)), 200);
        std::thread::sleep(Duration::from_millis(100));
    }

    // Planned maintenance: B drained under load hands its flows and the group to A.
    wait("A has B's flows", Duration::from_secs(10), || {
        a.metric("privatelink_ha_flows_installed_total", &[]) >= Some(1.0)
    });
    let holder = Holder::start(&client, &root, "drain", CONNS);
    std::thread::sleep(Duration::from_millis(500));
    let drained = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", b.ns.name()))
        .arg(agent_bin("privatelink-agent"))
        .args([
            "drain",
            "--config",
            b.dir.join("agent.toml").to_str().unwrap(),
        ])
        .output()
        .expect("privatelink-agent drain");
    let said = String::from_utf8_lossy(&drained.stdout);
    assert!(
        drained.status.success() && said.contains("group edge is with node-a"),
        "{said}{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    wait("A active after the drain", Duration::from_secs(3), || {
        a.active() && !b.active()
    });
    std::thread::sleep(Duration::from_secs(1));
    let summary = holder.finish();
    eprintln!("long-lived connections across the drain: {summary}");
    assert_eq!(summary["broken"], 0, "{summary}\n{}\n{}", a.log(), b.log());
    assert_eq!(curl(&client, Duration::from_secs(1)), 200);
    assert!(b.log().contains("handed over to node-a"), "{}", b.log());

    // Every HA metric the dashboard shows is exposed by a node of a group.
    let d: Value = serde_json::from_str(include_str!("../../../dashboards/privatelink.json"))
        .expect("dashboard JSON");
    let scrape =
        a.ns.enter(|| {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(3)))
                .build()
                .into();
            agent
                .get("http://127.0.0.1:9464/metrics")
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
        })
        .unwrap_or_default();
    let exprs: Vec<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    let mut shown = 0;
    for e in &exprs {
        for part in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if part.starts_with("privatelink_ha_") {
                shown += 1;
                assert!(
                    scrape.contains(&format!("{part}{{")),
                    "{part} is not exposed"
                );
            }
        }
    }
    assert!(shown >= 7, "the dashboard shows the group");
}

/// Removes the test's directory (after the nodes unmounted their bpffs).
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
