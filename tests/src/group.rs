//! A high-availability group in namespaces, for the ha test and the failover benchmark: two real
//! agents on bridged segments, one etcd, real clients and servers.
use std::{
    path::PathBuf,
    process::Stdio,
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
use serde_json::{Value, json};

use crate::{
    tcpwatch::{self, Watch},
    world::{ADMIN, API, BpfFs, Proc, etcd_url, link_to_etcd, sample, shared_etcd},
};

const GROUP_KEY: &str = "a-group-key-of-more-than-thirty-two-characters";
pub const BACKEND: &str = "198.18.100.10";
pub const VIP: &str = "198.18.100.250";
/// With an owner per network: the second consumer network's moving address.
pub const VIP2: &str = "198.18.100.251";
/// With an owner per network: the slices of the NAT range 198.19.128.0/24.
pub const SLICES: [&str; 2] = ["198.19.128.0/25", "198.19.128.128/25"];

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

pub struct Node {
    pub name: &'static str,
    pub ns: Netns,
    pub dir: PathBuf,
    _bpffs: BpfFs,
    pub agent: Option<Proc>,
    /// Its interfaces on the segments.
    devs: Vec<&'static str>,
}

impl Node {
    pub fn start(&mut self) {
        self.agent = Some(crate::world::spawn_agent(&self.ns, &self.dir));
        wait(
            &format!("{}'s API", self.name),
            Duration::from_secs(20),
            || self.api(ADMIN, "GET", "/v1/revision", None).0 == 200,
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn api(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        crate::world::api_in(&self.ns, API, token, method, path, body)
    }

    pub fn post(&self, token: &str, path: &str, body: Value) -> Value {
        let (status, v) = self.api(token, "POST", path, Some(body.clone()));
        assert!(
            status == 200 || status == 201,
            "POST {path} {body}: {status} {v}"
        );
        v
    }

    /// The node's /metrics text (`None`: no answer within 3 s).
    pub fn scrape(&self) -> Option<String> {
        crate::world::get_in(&self.ns, "http://127.0.0.1:9464/metrics")
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        sample(&self.scrape()?, name, labels)
    }

    pub fn active(&self) -> bool {
        self.metric("privatelink_ha_active", &[]) == Some(1.0)
    }

    /// Whether it forwards for consumer network `vpc`.
    pub fn active_for(&self, vpc: &str) -> bool {
        self.metric("privatelink_ha_network_active", &[("network", vpc)]) == Some(1.0)
    }

    /// Stops the agent as an operator does (SIGTERM), and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.agent.take() {
            let pid = nix::unistd::Pid::from_raw(p.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t = Instant::now();
            while p.0.try_wait().ok().flatten().is_none() {
                assert!(
                    t.elapsed() < Duration::from_secs(15),
                    "{} did not stop on SIGTERM",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn links(&self, up: bool) {
        for dev in &self.devs {
            self.ns
                .ip(&["link", "set", dev, if up { "up" } else { "down" }])
                .unwrap();
        }
    }
}

/// Waits (at most `within`) until `ok` holds; how long it took.
pub fn wait(what: &str, within: Duration, ok: impl FnMut() -> bool) -> Duration {
    wait_eq(what, within, &true, ok)
}

/// Waits (at most `within`) until `get` returns `want`; how long it took. On timeout it says what
/// `get` returned last.
pub fn wait_eq<T: PartialEq + std::fmt::Debug>(
    what: &str,
    within: Duration,
    want: &T,
    mut get: impl FnMut() -> T,
) -> Duration {
    let t = Instant::now();
    loop {
        let got = get();
        if &got == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "{what}: not within {within:?} (last: {got:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// curl from the client to the endpoint: the HTTP status, or 0 when nothing answered within
/// `timeout`.
pub fn curl(client: &Netns, timeout: Duration) -> u16 {
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

/// A node of the group, linked to the segments (consumer, provider, and a second consumer one
/// if given) and to etcd.
fn node(
    i: u8,
    et: &Netns,
    segments: (&Netns, &Netns, Option<&Netns>),
    pass: &mut Datapath,
    root: &std::path::Path,
) -> Node {
    let name = ["node-a", "node-b", "node-c"][i as usize];
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
    let mut devs = vec!["h0", "q0"];
    if let Some(second) = segments.2 {
        plug(second, &format!("g{i}"), &ns, "h1", pass);
        devs.push("h1");
    }
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
        devs,
    }
}

/// Its agent.toml: one owner for the group, or (with a third network in `vpcs`) an owner per
/// consumer network, each with its NAT slice and moving address, and preemption.
fn write_config(n: &Node, i: u8, count: u8, vpcs: &[(String, String)]) {
    use std::os::unix::fs::PermissionsExt as _;
    privatelink_agent::control::store::write_private(&n.dir.join("admin-token"), ADMIN).unwrap();
    let key = n.dir.join("ha.key");
    std::fs::write(&key, GROUP_KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let me = 1 + i;
    let peers = (0..count)
        .filter(|j| *j != i)
        .map(|j| format!("\"198.18.100.{}:7946\"", 1 + j))
        .collect::<Vec<_>>()
        .join(", ");
    let cfg = format!(
        r#"node = "{name}"
admin_token_file = "{dir}/admin-token"
resync_interval = 1
bpffs = "{dir}/bpffs/privatelink"
[api]
listen = "0.0.0.0:{port}"
advertise = "http://198.18.100.{me}:{port}"
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
peers = [{peers}]
key_file = "{key}"
{moving}"#,
        name = n.name,
        dir = n.dir.display(),
        etcd = etcd_url(i),
        consumer = vpcs[1].0,
        provider = vpcs[0].0,
        key = key.display(),
        port = API.rsplit_once(':').unwrap().1,
        moving = match vpcs.get(2) {
            None => format!("[[ha.addresses]]\ninterface = \"q0\"\naddress = \"{VIP}/24\"\n"),
            Some((second, _)) => format!(
                r#"preempt = true
preempt_after_ms = 2000
[ha.networks.{first}.nat.{provider}]
range = "{s0}"
range6 = "none"
[[ha.networks.{first}.addresses]]
interface = "q0"
address = "{VIP}/24"
[ha.networks.{second}.nat.{provider}]
range = "{s1}"
range6 = "none"
[[ha.networks.{second}.addresses]]
interface = "q0"
address = "{VIP2}/24"
[[interfaces]]
name = "h1"
network = "{second}"
role = "consumer"
"#,
                first = vpcs[1].0,
                provider = vpcs[0].0,
                s0 = SLICES[0],
                s1 = SLICES[1],
            ),
        },
    );
    std::fs::write(n.dir.join("agent.toml"), cfg).unwrap();
}

/// Long-lived connections through the endpoint: `n` connections, each sending a line every
/// `every` seconds (0.1 by default; all send, then all echoes are read) and checking its echo,
/// until the file `stop` appears (at most 60 s), keeping the count of finished rounds in
/// `stop.rounds`; then one JSON line: connections, rounds, how many broke (reset, closed, a wrong
/// echo, or no echo in 10 s), how many of those were resets, and the longest round (every
/// connection's line sent and its echo back).
const HOLDER: &str = r#"
import json, os, socket, sys, time
host, port, n, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
every = float(sys.argv[5]) if len(sys.argv) > 5 else 0.1
conns = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=5)
    # An echo lost in a takeover comes with TCP's retransmission, whose timeout doubles each time
    # (0.2, 0.6, 1.4, 3.0 s after the first send): a takeover of about a second can hold an echo
    # for 3 s with nothing lost. Waiting 10 s tells a connection that is gone from a slow one.
    s.settimeout(10)
    conns.append([s, s.makefile("rb"), True])
print("connected", flush=True)
rounds, broken, resets, worst, end = 0, 0, 0, 0.0, time.time() + 60
def fail(c, e):
    global broken, resets
    broken += 1
    resets += isinstance(e, ConnectionResetError)
    c[2] = False
while not os.path.exists(stop) and time.time() < end:
    # Every connection sends, then every echo is read: a round takes one round trip, not n.
    t = time.time()
    for c in conns:
        if c[2]:
            try:
                c[0].sendall(b"%d\n" % rounds)
            except OSError as e:
                fail(c, e)
    for c in conns:
        if c[2]:
            try:
                if c[1].readline() != b"%d\n" % rounds:
                    raise OSError("wrong echo")
            except OSError as e:
                fail(c, e)
    worst = max(worst, time.time() - t)
    rounds += 1
    with open(stop + ".rounds.tmp", "w") as f:
        f.write(str(rounds))
    os.replace(stop + ".rounds.tmp", stop + ".rounds")
    time.sleep(every)
print(json.dumps({"conns": n, "rounds": rounds, "broken": broken, "resets": resets, "worst_ms": int(worst * 1000)}))
"#;

/// New connections through the endpoint, one every 20 ms (echo port 81: connect, a line, its echo,
/// close), each given 0.5 s, until the file `stop` appears (at most 60 s); then one JSON line:
/// attempts, failures, how many separate runs of failures there were, the longest time between
/// two successes, and the local ports of the attempts it gave up on after their time (closed
/// while the other end may still be answering them; not those a reset or refusal ended).
const CONN_PROBE: &str = r#"
import json, os, socket, sys, time
host, stop = sys.argv[1], sys.argv[2]
attempts, failed, streaks, last_ok, worst, failing = 0, 0, 0, None, 0.0, False
abandoned = []
end = time.time() + 60
print("started", flush=True)
while not os.path.exists(stop) and time.time() < end:
    attempts += 1
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect((host, 81))
        s.sendall(b"new\n")
        if s.makefile("rb").readline() != b"new\n":
            raise OSError("wrong echo")
        now = time.time()
        if last_ok is not None:
            worst = max(worst, now - last_ok)
        last_ok, failing = now, False
    except OSError as e:
        failed += 1
        if not failing:
            streaks += 1
        failing = True
        # Given up on after its time, not ended by a reset or refusal (those count as resets).
        if isinstance(e, TimeoutError):
            try:
                abandoned.append(s.getsockname()[1])
            except OSError:
                pass
    finally:
        s.close()
    time.sleep(0.02)
print(json.dumps({"attempts": attempts, "failed": failed, "failure_runs": streaks, "worst_gap_ms": int(worst * 1000), "abandoned_ports": abandoned}))
"#;

/// A running new-connection loop (see [`CONN_PROBE`]).
pub struct ConnProbe(Holder);

impl ConnProbe {
    pub fn start(client: &Netns, root: &std::path::Path, name: &str) -> ConnProbe {
        let endpoint = ENDPOINT.to_string();
        ConnProbe(Holder::script(
            client,
            root,
            name,
            CONN_PROBE,
            &[&endpoint, "{stop}"],
        ))
    }

    /// Stops it; its summary.
    pub fn finish(self) -> Value {
        self.0.finish()
    }
}

/// tcpdump on the client's interface, keeping how the client's connections through the endpoint
/// open and end (SYN, FIN, RST), to tell the resets that broke one (see [`tcpwatch::ends`]).
pub struct Resets(Watch);

impl Resets {
    pub fn watch(client: &Netns, root: &std::path::Path) -> Resets {
        Resets::watch_as(client, root, "resets")
    }

    /// The same, its files named `name` (one per client).
    pub fn watch_as(client: &Netns, root: &std::path::Path, name: &str) -> Resets {
        Resets(Watch::start(
            client,
            root,
            name,
            &format!("({}) and host {ENDPOINT}", tcpwatch::ENDS),
        ))
    }

    /// The endpoint's resets so far to connections that were open (before both ends' FINs) and
    /// that a [`ConnProbe`] had not given up on (`probe`: its summary). Not counted, but printed:
    /// a reset after both FINs (an end answering a segment that came late, after it forgot the
    /// connection), and one to a connection the probe closed mid-handshake or mid-echo, which
    /// whichever end still holds it answers with a reset. Both are TCP, not the endpoint
    /// breaking a connection. Each reset comes with what was seen of its client port before it.
    pub fn seen_on_live(&self, probe: &Value) -> Vec<String> {
        let abandoned: Vec<u64> = probe["abandoned_ports"]
            .as_array()
            .expect("the probe's abandoned_ports")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        let lines = self.0.lines();
        let ends = tcpwatch::ends(&lines);
        let from_endpoint = |l: &String| l.contains(&format!(" IP {ENDPOINT}."));
        let (dead, live): (Vec<String>, Vec<String>) = ends
            .before_close
            .into_iter()
            .filter(from_endpoint)
            .partition(|l| {
                tcpwatch::dst_port(l).is_some_and(|p| abandoned.contains(&u64::from(p)))
            });
        let late: Vec<String> = ends.after_close.into_iter().filter(from_endpoint).collect();
        for (what, lines) in [
            ("of connections the probe had given up on", &dead),
            ("after both FINs", &late),
        ] {
            if !lines.is_empty() {
                eprintln!("resets {what}:\n{}", lines.join("\n"));
            }
        }
        live.into_iter()
            .map(|r| {
                let Some(port) = tcpwatch::dst_port(&r) else {
                    return r;
                };
                let (from, to) = (format!(".{port} > "), format!(".{port}: "));
                let history: Vec<&str> = lines
                    .iter()
                    .take_while(|l| **l != r)
                    .filter(|l| l.contains(&from) || l.contains(&to))
                    .map(String::as_str)
                    .collect();
                format!("{r}\n  after: {}", history.join("\n         "))
            })
            .collect()
    }
}

/// A UDP request/response loop through the endpoint (udp 9001, a socat echo): a datagram every
/// 5 ms from one socket, until the file `stop` appears (at most 60 s); then one JSON line: sent,
/// answered, and the longest time between two answers (a takeover's length, give or take 5 ms).
const UDP_PROBE: &str = r#"
import json, os, socket, sys, time
host, stop = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, 9001))
s.setblocking(False)
sent, got, last, worst, end = 0, 0, None, 0.0, time.time() + 60
print("started", flush=True)
while not os.path.exists(stop) and time.time() < end:
    s.send(b"%d" % sent)
    sent += 1
    time.sleep(0.005)
    while True:
        try:
            s.recv(64)
        except (BlockingIOError, ConnectionRefusedError):
            break
        now = time.time()
        if last is not None:
            worst = max(worst, now - last)
        last, got = now, got + 1
print(json.dumps({"sent": sent, "answered": got, "worst_gap_ms": int(worst * 1000)}))
"#;

/// A running UDP probe (see [`UDP_PROBE`]).
pub struct UdpProbe(Holder);

impl UdpProbe {
    pub fn start(client: &Netns, root: &std::path::Path, name: &str) -> UdpProbe {
        let endpoint = ENDPOINT.to_string();
        UdpProbe(Holder::script(
            client,
            root,
            name,
            UDP_PROBE,
            &[&endpoint, "{stop}"],
        ))
    }

    /// Stops it; its summary.
    pub fn finish(self) -> Value {
        self.0.finish()
    }
}

/// A running holder: its process and its output lines.
pub struct Holder {
    proc: Proc,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    stop: PathBuf,
}

impl Holder {
    /// `n` connections to the endpoint's echo port from `client`, once they are all connected.
    pub fn start(client: &Netns, root: &std::path::Path, name: &str, n: usize) -> Holder {
        Holder::start_every(client, root, name, n, Duration::from_millis(100))
    }

    /// The same, each connection sending once `every`.
    pub fn start_every(
        client: &Netns,
        root: &std::path::Path,
        name: &str,
        n: usize,
        every: Duration,
    ) -> Holder {
        let args = [ENDPOINT.to_string(), "81".into(), n.to_string()];
        let every = format!("{}", every.as_secs_f64());
        let args = [&args[0], &args[1], &args[2], "{stop}", &every];
        Holder::script(client, root, name, HOLDER, &args)
    }

    /// Runs the Python `body` in `client` with `args` (`{stop}` stands for its stop file), once it
    /// has printed its first line.
    fn script(
        client: &Netns,
        root: &std::path::Path,
        name: &str,
        body: &str,
        args: &[&str],
    ) -> Holder {
        let script = root.join(format!("{name}.py"));
        std::fs::write(&script, body).unwrap();
        let stop = root.join(format!("stop-{name}"));
        let stop_arg = stop.to_str().unwrap().to_string();
        let mut child = client
            .command("python3")
            .arg(&script)
            .args(
                args.iter()
                    .map(|a| if *a == "{stop}" { stop_arg.as_str() } else { a }),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut lines =
            std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        let first = lines.next().and_then(Result::ok);
        assert!(first.is_some(), "{name}: the script did not start");
        Holder {
            proc: Proc(child),
            lines,
            stop,
        }
    }

    /// The rounds finished so far (0 before the first).
    pub fn rounds(&self) -> u64 {
        let mut p = self.stop.clone().into_os_string();
        p.push(".rounds");
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Stops it; its summary.
    pub fn finish(mut self) -> Value {
        std::fs::write(&self.stop, "").unwrap();
        let line = self.lines.next().and_then(Result::ok).unwrap_or_default();
        let _ = self.proc.0.wait();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("the holder's summary {line:?}: {e}"))
    }
}

/// Two nodes of group `edge` on a consumer segment (with a client) and a provider segment (with a
/// backend namespace running python's HTTP server on 8080, a socat echo on 9000 and an iperf3
/// server on 5201, a socat UDP echo on 9001), one etcd; the nodes share the NAT range 198.19.128.0/24, which the backend
/// routes through the moving address. A service maps tcp 80, 81, 5201 and udp 9001 to them, and one
/// endpoint at `ENDPOINT` answers through node A, which is active; B stands by. Each node's API
/// listens on every address and advertises its provider-segment address to the other servers.
pub struct Group {
    pub provider_token: String,
    pub consumer_token: String,
    pub service: String,
    pub endpoint: String,
    /// node-a, node-b (and node-c).
    pub nodes: Vec<Node>,
    pub client: Netns,
    /// With an owner per network: the second consumer network (another account's, with the
    /// same CIDR): its id, its client (the same address as `client`) and its endpoint (the same
    /// address as the first).
    pub second: Option<Second>,
    /// The consumer networks' ids, the first's first.
    pub networks: Vec<String>,
    _servers: Vec<Proc>,
    pub backend: Netns,
    pub root: PathBuf,
    _lans: (Netns, Netns),
    _pass: Datapath,
    _etcd: crate::world::Etcd,
    _et: Netns,
    _cleanup: Cleanup,
}

/// The second consumer network of a group with an owner per network.
pub struct Second {
    pub client: Netns,
    pub consumer_token: String,
    pub endpoint: String,
    _lan: Netns,
}

impl Group {
    /// Two nodes, one owner for the group's consumer network.
    pub fn build(name: &str) -> Group {
        Group::build_with(name, false, 2)
    }

    /// `count` nodes (2 or 3); `per_network` (with two nodes): two consumer networks with an
    /// owner each, spread over the two nodes (see [`write_config`]); node B gets its network from
    /// A (preemption) once it has been up 2 s.
    pub fn build_with(name: &str, per_network: bool, count: u8) -> Group {
        assert!((2..=3).contains(&count) && (count == 2 || !per_network));
        let (et, etcd) = shared_etcd(name);
        let root = std::env::temp_dir().join(format!("privatelink-{name}-{}", std::process::id()));
        let cleanup = Cleanup(root.clone());
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
        let lan_c2 = per_network.then(|| segment("hlg"));
        let client2 = lan_c2.as_ref().map(|lan| {
            let c = Netns::new("hcg").unwrap();
            plug(lan, "cl", &c, "eth0", &mut pass);
            c.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"])
                .unwrap();
            c
        });
        if per_network {
            for (slice, via) in SLICES.iter().zip([VIP, VIP2]) {
                backend.ip(&["route", "add", slice, "via", via]).unwrap();
            }
        } else {
            backend
                .ip(&["route", "add", "198.19.128.0/24", "via", VIP])
                .unwrap();
        }
        let segs = (&lan_c, &lan_p, lan_c2.as_ref());
        let mut nodes: Vec<Node> = (0..count)
            .map(|i| node(i, &et, segs, &mut pass, &root))
            .collect();

        // Accounts and networks with the real code, through etcd.
        let store = privatelink_agent::node::config::StoreConfig {
            path: nodes[0].dir.join("prepare.db"),
            etcd: vec![etcd_url(0)],
            ..Default::default()
        };
        let p = nodes[0]
            .ns
            .enter(|| {
                privatelink_agent::testkit::demo::prepare(
                    &privatelink_agent::control::plane::ControlPlane::open(store.open()?, ADMIN)?,
                    &[
                        ("provider", "198.18.100.0/24", "198.18.100.0/24"),
                        ("1000000001", "198.18.0.0/16", "198.18.0.0/24"),
                        ("1000000002", "198.18.0.0/16", "198.18.0.0/24"),
                    ][..if per_network { 3 } else { 2 }],
                )
            })
            .expect("accounts and networks");
        for (i, n) in nodes.iter().enumerate() {
            write_config(n, i as u8, count, &p.vpcs);
        }
        let (first, others) = nodes.split_first_mut().expect("nodes");
        first.start();
        wait("A active", Duration::from_secs(20), || first.active());
        for n in others.iter_mut() {
            n.start();
            wait(
                &format!("{} hears A", n.name),
                Duration::from_secs(10),
                || n.metric("privatelink_ha_peer_up", &[("peer", "node-a")]) == Some(1.0),
            );
        }
        let (a, b) = (&nodes[0], &nodes[1]);
        let networks: Vec<String> = p.vpcs[1..].iter().map(|v| v.0.clone()).collect();
        if per_network {
            // A, alone at first, took both networks; B gets one of them once it has been up 2 s.
            wait(
                "the networks spread over A and B",
                Duration::from_secs(15),
                || {
                    networks
                        .iter()
                        .all(|n| usize::from(a.active_for(n)) + usize::from(b.active_for(n)) == 1)
                        && a.active()
                        && b.active()
                },
            );
        } else {
            assert!(
                nodes[1..].iter().all(|n| !n.active()),
                "the others stand by while A is alive"
            );
        }

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
        let web = spawn(
            &backend,
            "python3",
            &["-m", "http.server", "8080", "--bind", BACKEND],
        );
        // socat's listen backlog is 5 unless told: a thousand connections opened at once would
        // wait for SYN retransmissions.
        let echo_at = format!("TCP-LISTEN:9000,bind={BACKEND},fork,reuseaddr,backlog=4096");
        let echo = spawn(&backend, "socat", &[&echo_at, "PIPE"]);
        let iperf = spawn(&backend, "iperf3", &["-s", "-B", BACKEND, "-p", "5201"]);
        let udp_at = format!("UDP4-RECVFROM:9001,bind={BACKEND},fork");
        let udp = spawn(&backend, "socat", &[&udp_at, "PIPE"]);
        let (prov, cons) = (&p.tokens[0], &p.tokens[1]);
        let a = &nodes[0];
        let svc = a.post(
            prov,
            "/v1/services",
            json!({ "name": "web", "network_id": p.vpcs[0].0, "service_type": "clb",
                "backends": [BACKEND], "auto_accept": true,
                "port_mappings": [
                    { "protocol": "tcp", "service_port": 8080, "terminal_port": 80 },
                    { "protocol": "tcp", "service_port": 9000, "terminal_port": 81 },
                    { "protocol": "tcp", "service_port": 5201, "terminal_port": 5201 },
                    { "protocol": "udp", "service_port": 9001, "terminal_port": 9001 }] }),
        );
        let svc = svc["id"].as_str().unwrap().to_string();
        let mut endpoints = Vec::new();
        for (i, (vpc, subnet)) in p.vpcs.iter().enumerate().skip(1) {
            a.post(
                prov,
                &format!("/v1/services/{svc}/allowlist"),
                json!({ "account_id": format!("100000000{i}") }),
            );
            let ep = a.post(
                &p.tokens[i],
                "/v1/endpoints",
                json!({ "name": "web", "service_id": svc, "network_id": vpc,
                    "subnet_id": subnet, "ip": ENDPOINT.to_string() }),
            );
            endpoints.push(ep["id"].as_str().unwrap().to_string());
        }
        for c in std::iter::once(&client).chain(&client2) {
            wait("the endpoint answers", Duration::from_secs(15), || {
                curl(c, Duration::from_secs(1)) == 200
            });
        }
        let second = client2.zip(lan_c2).map(|(client, lan)| Second {
            client,
            consumer_token: p.tokens[2].clone(),
            endpoint: endpoints[1].clone(),
            _lan: lan,
        });
        Group {
            provider_token: prov.clone(),
            consumer_token: cons.clone(),
            endpoint: endpoints[0].clone(),
            service: svc,
            nodes,
            client,
            second,
            networks,
            _servers: vec![web, echo, iperf, udp],
            backend,
            root,
            _lans: (lan_c, lan_p),
            _pass: pass,
            _etcd: etcd,
            _et: et,
            _cleanup: cleanup,
        }
    }
}

/// Removes the test's directory (after the nodes unmounted their bpffs).
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
