//! A running agent binary in the node namespace of the embedded topology, driven through its API:
//! shared by the agent tests and the acceptance suite.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use privatelink_agent::{
    datapath::loader::{Datapath, Sizes},
    testkit::demo::{BACKEND, ENDPOINT, TCP_PORTS, Topology},
};
use serde_json::{Value, json};

use crate::agent_bin;

pub const ADMIN: &str = "agent-test-admin-token";
pub const API: &str = "127.0.0.1:7171";

/// A child process (the agent, a server) killed and reaped on drop (also on panic).
pub struct Proc(pub Child);

/// The agent process.
pub type Agent = Proc;

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Calls the agent's API from inside the node namespace (where it listens on loopback).
pub fn api(
    topo: &Topology,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    api_at(topo, API, token, method, path, body)
}

/// The same for an API server at `addr` in the node namespace.
pub fn api_at(
    topo: &Topology,
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    api_in(&topo.node, addr, token, method, path, body)
}

/// The same for an API server at `addr` in namespace `ns`.
pub fn api_in(
    ns: &privatelink_agent::testkit::netns::Netns,
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let (token, method, path) = (token.to_string(), method.to_string(), path.to_string());
    let addr = addr.to_string();
    ns.enter(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let url = format!("http://{addr}{path}");
        let auth = format!("Bearer {token}");
        let body = body.unwrap_or(json!({})).to_string();
        let r = match method.as_str() {
            "GET" => agent.get(&url).header("Authorization", &auth).call(),
            "DELETE" => agent.delete(&url).header("Authorization", &auth).call(),
            "PUT" => agent
                .put(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(body),
            "PATCH" => agent
                .patch(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(body),
            "POST" => agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(body),
            other => panic!("method {other}"),
        };
        match r {
            Ok(mut r) => {
                let status = r.status().as_u16();
                let text = r.body_mut().read_to_string().unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    })
}

/// A GET of the agent's API from the node namespace: status and body as text (CSV exports).
pub fn api_text(topo: &Topology, token: &str, path: &str) -> (u16, String) {
    let (token, url) = (token.to_string(), format!("http://{API}{path}"));
    topo.node.enter(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        match agent
            .get(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .call()
        {
            Ok(mut r) => (
                r.status().as_u16(),
                r.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(_) => (0, String::new()),
        }
    })
}

pub fn ok(topo: &Topology, token: &str, path: &str, body: Value) -> Value {
    let (status, v) = api(topo, token, "POST", path, Some(body.clone()));
    assert!(
        status == 200 || status == 201,
        "POST {path} {body}: {status} {v}"
    );
    v
}

/// A bpffs mounted for one test, on the host (pins outlive the agent process, and each test has
/// its own); unmounted and removed on drop.
pub struct BpfFs(pub std::path::PathBuf);

impl BpfFs {
    pub fn mount(dir: &std::path::Path) -> Self {
        let m = dir.join("bpffs");
        std::fs::create_dir_all(&m).unwrap();
        nix::mount::mount(
            Some("bpf"),
            &m,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount bpffs");
        BpfFs(m)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A tmpfs mounted for the store (unmounted by the world's drop, before its directory goes).
pub struct Tmpfs(pub Option<std::path::PathBuf>);

/// Namespaces, a store with accounts and networks, the agent's config and the running agent; what
/// a test made through the API (service, endpoints) for its own bookkeeping.
pub struct World {
    pub topo: Topology,
    pub dir: std::path::PathBuf,
    pub bpffs: BpfFs,
    /// The store's tmpfs, when the test asked for one.
    pub store: Tmpfs,
    /// The etcd the state lives in, when the test asked for one.
    pub etcd: Option<Etcd>,
    /// Tokens of the provider account and the two consumer accounts.
    pub tokens: Vec<String>,
    /// (network id, subnet id) of the provider network and the two consumer networks.
    pub vpcs: Vec<(String, String)>,
    /// Service and endpoints a test made (for its own bookkeeping).
    pub svc: String,
    pub eps: Vec<String>,
    pub pass: Datapath,
}

impl World {
    /// The provider accepts every endpoint the test made (`eps`) on its service (`svc`).
    pub fn accept_all(&self) {
        ok(
            &self.topo,
            &self.tokens[0],
            &format!("/v1/services/{}/accept", self.svc),
            json!({ "endpoint_ids": self.eps }),
        );
    }

    /// The provider updates its service (`svc`) with `body`; the service as it is then.
    pub fn update_service(&self, body: Value) -> Value {
        let path = format!("/v1/services/{}", self.svc);
        let (status, v) = api(&self.topo, &self.tokens[0], "PATCH", &path, Some(body));
        assert_eq!(status, 200, "PATCH {path}: {v}");
        v
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Starts the agent (appending to agent.log) and waits for its API.
    pub fn start_agent(&self) -> Agent {
        let agent = spawn_agent(&self.topo.node, &self.dir);
        let deadline = Instant::now() + Duration::from_secs(20);
        while api(&self.topo, ADMIN, "GET", "/v1/revision", None).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the agent's API did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(e) = self.etcd.as_mut() {
            e.stop();
        }
        // The bpffs is mounted inside the directory: unmount it first or nothing is removed.
        let _ = nix::mount::umount2(&self.bpffs.0, nix::mount::MntFlags::MNT_DETACH);
        if let Some(at) = self.store.0.take() {
            let _ = nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("leaving {}: {e}", self.dir.display());
        }
    }
}

/// Builds everything up to a running agent: two overlapping consumer networks and a provider
/// network (accounts, networks and tokens made with the real store code), the agent's config with
/// `extra` appended, the pass programs on the peers. No service yet.
pub fn world_with(name: &str, extra: &str) -> (World, Agent) {
    world_on(name, extra, None)
}

/// The same, with the store (and the history next to it) on a tmpfs of `store_tmpfs` bytes when
/// given, so a test can fill the disk under it.
pub fn world_on(name: &str, extra: &str, store_tmpfs: Option<u64>) -> (World, Agent) {
    world_backed(name, extra, Backing::Sqlite { tmpfs: store_tmpfs })
}

/// The accounts' tokens and their (network id, subnet id), as one node made them.
pub type Accounts = (Vec<String>, Vec<(String, String)>);

/// Where a world's state lives.
pub enum Backing<'a> {
    /// SQLite, on a tmpfs of that many bytes when given.
    Sqlite { tmpfs: Option<u64> },
    /// An etcd started in the node namespace ([`World::etcd`]).
    LocalEtcd,
    /// A shared etcd at `url`: `connect` links the node namespace to it before anything starts;
    /// `prepared` holds the accounts' tokens and networks another node made (`None`: make them).
    /// The node is named after the world.
    SharedEtcd {
        url: String,
        connect: &'a dyn Fn(&Topology),
        prepared: Option<Accounts>,
    },
}

/// Where the etcd of a world listens, inside its node namespace.
pub const ETCD: &str = "http://127.0.0.1:2379";

/// An etcd server in the node namespace (data kept in `dir` across restarts), killed on drop.
pub struct Etcd {
    dir: std::path::PathBuf,
    proc: Option<Proc>,
    /// (listen, advertise) client URLs.
    urls: (String, String),
}

impl Etcd {
    pub fn start(node: &privatelink_agent::testkit::netns::Netns, dir: &std::path::Path) -> Self {
        Self::start_at(node, dir, ETCD, ETCD)
    }

    /// Started in `ns`, taking clients on `listen` (e.g. every address of a namespace of its own).
    pub fn start_at(
        ns: &privatelink_agent::testkit::netns::Netns,
        dir: &std::path::Path,
        listen: &str,
        advertise: &str,
    ) -> Self {
        let mut e = Etcd {
            dir: dir.to_path_buf(),
            proc: None,
            urls: (listen.to_string(), advertise.to_string()),
        };
        e.restart(ns);
        e
    }

    /// Starts it (again) and waits until it takes connections.
    pub fn restart(&mut self, node: &privatelink_agent::testkit::netns::Netns) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .unwrap();
        let child = node
            .command("etcd")
            .args([
                "--name",
                "test",
                "--data-dir",
                self.dir.join("data").to_str().unwrap(),
                "--listen-client-urls",
                &self.urls.0,
                "--advertise-client-urls",
                &self.urls.1,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "test=http://127.0.0.1:2380",
                "--max-txn-ops",
                "10000",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start etcd");
        self.proc = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !node.enter(|| {
            std::net::TcpStream::connect_timeout(
                &"127.0.0.1:2379".parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_ok()
        }) {
            assert!(
                Instant::now() < deadline,
                "etcd did not start:\n{}",
                std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }
}

impl Drop for Etcd {
    /// Stops etcd, then removes its data directory.
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `privatelink-agent run --config <dir>/agent.toml` in `ns`, appending to `<dir>/agent.log`,
/// the documented way: the node's network namespace, the host's mount namespace (so the pins
/// outlive the agent), not `ip netns exec`, which gives the agent mounts of its own.
pub fn spawn_agent(ns: &privatelink_agent::testkit::netns::Netns, dir: &std::path::Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg(agent_bin("privatelink-agent"))
        .args(["run", "--config", dir.join("agent.toml").to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start the agent");
    Proc(child)
}

/// A world whose state lives as `backing` says.
pub fn world_backed(name: &str, extra: &str, backing: Backing) -> (World, Agent) {
    let topo = Topology::build(2).expect("topology");
    let store_tmpfs = match backing {
        Backing::Sqlite { tmpfs } => tmpfs,
        _ => None,
    };
    let dir = std::env::temp_dir().join(format!("privatelink-{name}-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("store")).unwrap();
    let bpffs = BpfFs::mount(&dir);
    let store = Tmpfs(store_tmpfs.map(|size| {
        let at = dir.join("store");
        nix::mount::mount(
            Some("tmpfs"),
            &at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .expect("mount the store's tmpfs");
        at
    }));
    let db = dir.join("store").join("state.db");
    let (url, node_name) = match &backing {
        Backing::Sqlite { .. } => (None, "test-node"),
        Backing::LocalEtcd => (Some(ETCD.to_string()), "test-node"),
        Backing::SharedEtcd { url, connect, .. } => {
            connect(&topo);
            (Some(url.clone()), name)
        }
    };
    let store_cfg = privatelink_agent::node::config::StoreConfig {
        path: db.clone(),
        etcd: url.iter().cloned().collect(),
        ..Default::default()
    };
    let etcd =
        matches!(backing, Backing::LocalEtcd).then(|| Etcd::start(&topo.node, &dir.join("etcd")));
    // Accounts and networks first (the node's config names its networks), with the real code,
    // in the node namespace (where etcd is reached).
    let (tokens, vpcs) = match backing {
        Backing::SharedEtcd {
            prepared: Some(p), ..
        } => p,
        _ => {
            let p = topo
                .node
                .enter(|| {
                    privatelink_agent::testkit::demo::prepare(
                        &privatelink_agent::control::plane::ControlPlane::open(
                            store_cfg.open()?,
                            ADMIN,
                        )?,
                        &[
                            (
                                "provider",
                                "198.18.100.0/24,2001:db8:64::/64",
                                "198.18.100.0/24,2001:db8:64::/64",
                            ),
                            (
                                "1000000001",
                                "198.18.0.0/16,2001:db8::/56",
                                "198.18.0.0/24,2001:db8::/64",
                            ),
                            (
                                "1000000002",
                                "198.18.0.0/16,2001:db8::/56",
                                "198.18.0.0/24,2001:db8::/64",
                            ),
                        ],
                    )
                })
                .unwrap();
            (p.tokens, p.vpcs)
        }
    };
    privatelink_agent::control::store::write_private(&dir.join("admin-token"), ADMIN).unwrap();
    let etcd_line = url
        .map(|u| format!("etcd = [\"{u}\"]\n"))
        .unwrap_or_default();
    let head = format!(
        "node = \"{node_name}\"\nadmin_token_file = \"{}\"\nresync_interval = 1\nbpffs = \"{}\"\n[api]\nlisten = \"{API}\"\n[store]\npath = \"{}\"\n{etcd_line}",
        dir.join("admin-token").display(),
        bpffs.0.join("privatelink").display(),
        db.display()
    );
    // `{provider}`, `{consumer1}`, `{consumer2}` in `extra` name the networks made above.
    let extra = extra
        .replace("{provider}", &vpcs[0].0)
        .replace("{consumer1}", &vpcs[1].0)
        .replace("{consumer2}", &vpcs[2].0);
    let mut cfg = privatelink_agent::testkit::demo::agent_config(&topo, &vpcs, &head);
    // A `[nat.{provider}]` of the test's own replaces the demo's NAT range.
    let own_nat = format!("[nat.{}]\n", vpcs[0].0);
    if extra.contains(&own_nat) {
        let default = format!(
            "{own_nat}range = \"{}\"\n",
            privatelink_agent::testkit::demo::NAT_RANGE
        );
        assert!(cfg.contains(&default), "the demo's NAT section moved");
        cfg = cfg.replace(&default, "");
    }
    let cfg = cfg + &extra;
    std::fs::write(dir.join("agent.toml"), &cfg).unwrap();

    // The redirect targets' peers need an XDP program; the agent attaches the datapath itself.
    let mut pass = Datapath::load(&Sizes::small()).expect("load for the pass program");
    topo.attach_pass(&mut pass).expect("pass programs");
    let w = World {
        topo,
        dir,
        bpffs,
        store,
        etcd,
        tokens,
        vpcs,
        svc: String::new(),
        eps: Vec::new(),
        pass,
    };
    let agent = w.start_agent();
    (w, agent)
}

/// GET from inside the node namespace; the body as text.
pub fn node_get(topo: &Topology, url: &str) -> Option<String> {
    get_in(&topo.node, url)
}

/// GET from inside namespace `ns`; the body as text.
pub fn get_in(ns: &privatelink_agent::testkit::netns::Netns, url: &str) -> Option<String> {
    let url = url.to_string();
    ns.enter(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(3)))
            .build()
            .into();
        agent
            .get(&url)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
    })
}

/// The value of the first sample of `metric` whose labels contain every `want` pair.
pub fn sample(text: &str, metric: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with('{'))
        .find_map(|l| {
            let (labels, value) = l.rsplit_once(' ')?;
            want.iter()
                .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse().ok())?
        })
}

/// One TCP round trip through the endpoint from consumer `i`, within `timeout`.
pub fn round_trip(topo: &Topology, i: usize, timeout: Duration) -> Result<Vec<u8>, String> {
    topo.consumers[i].enter(move || {
        let addr = SocketAddr::from((ENDPOINT, TCP_PORTS.0));
        let mut s =
            TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let msg = format!("hello from consumer {i}");
        s.write_all(msg.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = vec![0u8; 256];
        let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        buf.truncate(n);
        Ok(buf)
    })
}

/// A running agent with the echo service (tcp 80→8080) and one endpoint at `ENDPOINT` in each
/// consumer network (Pending).
pub fn echo_world(name: &str) -> (World, Agent) {
    echo_world_with(name, "")
}

/// The same, with extra lines at the end of agent.toml.
pub fn echo_world_with(name: &str, extra: &str) -> (World, Agent) {
    echo_service(world_with(name, extra))
}

/// Adds the echo service and its two endpoints to a running world.
pub fn echo_service((mut w, agent): (World, Agent)) -> (World, Agent) {
    let svc = ok(
        &w.topo,
        &w.tokens[0],
        "/v1/services",
        json!({ "name": "echo", "network_id": w.vpcs[0].0, "service_type": "clb",
        "backends": [BACKEND.to_string()], "port_mappings": [{ "protocol": "tcp", "service_port": TCP_PORTS.1, "terminal_port": TCP_PORTS.0 }] }),
    );
    w.svc = svc["id"].as_str().unwrap().to_string();
    for c in [1, 2] {
        ok(
            &w.topo,
            &w.tokens[0],
            &format!("/v1/services/{}/allowlist", w.svc),
            json!({ "account_id": format!("100000000{c}") }),
        );
        let ep = ok(
            &w.topo,
            &w.tokens[c],
            "/v1/endpoints",
            json!({ "name": "echo", "service_id": w.svc,
            "network_id": w.vpcs[c].0, "subnet_id": w.vpcs[c].1, "ip": ENDPOINT.to_string() }),
        );
        w.eps.push(ep["id"].as_str().unwrap().to_string());
    }
    (w, agent)
}

/// An echo server in the provider namespace serving connections until `stop` (bounded to 60 s).
pub fn echo_server(topo: &Topology, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    echo_server_at(
        topo,
        BACKEND,
        stop,
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    )
}

/// The same on `addr`, counting accepted connections. Stopping closes the listener only: accepted
/// connections keep being served.
pub fn echo_server_at(
    topo: &Topology,
    addr: std::net::Ipv4Addr,
    stop: Arc<AtomicBool>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    let listener = topo
        .provider
        .enter(|| TcpListener::bind((addr, TCP_PORTS.1)).expect("bind backend"));
    listener.set_nonblocking(true).unwrap();
    topo.provider.spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 1 << 16];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

pub fn wait_for_traffic(w: &World, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match round_trip(&w.topo, i, Duration::from_secs(1)) {
            Ok(b) => {
                assert_eq!(b, format!("hello from consumer {i}").into_bytes());
                return;
            }
            Err(e) => assert!(Instant::now() < deadline, "consumer {i}: {e}\n{}", w.log()),
        }
    }
}

/// Waits (bounded) until consumer `i` can (or cannot) make a round trip through its endpoint.
pub fn until(w: &World, i: usize, works: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while round_trip(&w.topo, i, Duration::from_millis(500)).is_ok() != works {
        assert!(
            Instant::now() < deadline,
            "{what}: consumer {i} should {}work\n{}",
            if works { "" } else { "not " },
            w.log()
        );
    }
}

/// etcd in a namespace of its own, reached by each node over a point-to-point link of its own
/// (198.18.200.0/24, see [`link_to_etcd`]).
pub fn shared_etcd(tag: &str) -> (privatelink_agent::testkit::netns::Netns, Etcd) {
    let et = privatelink_agent::testkit::netns::Netns::new("et").expect("etcd namespace");
    let dir = std::env::temp_dir().join(format!("privatelink-{tag}-{}", std::process::id()));
    let etcd = Etcd::start_at(&et, &dir, "http://0.0.0.0:2379", "http://198.18.200.1:2379");
    (et, etcd)
}

/// Links namespace `node` to the etcd namespace as node `i` (node side `et0`).
pub fn link_to_etcd(
    et: &privatelink_agent::testkit::netns::Netns,
    node: &privatelink_agent::testkit::netns::Netns,
    i: u8,
) {
    let dev = format!("n{i}");
    privatelink_agent::testkit::netns::veth(et, &dev, node, "et0").expect("veth to etcd");
    et.ip(&[
        "addr",
        "add",
        &format!("198.18.200.{}/30", 4 * i + 1),
        "dev",
        &dev,
    ])
    .unwrap();
    node.ip(&[
        "addr",
        "add",
        &format!("198.18.200.{}/30", 4 * i + 2),
        "dev",
        "et0",
    ])
    .unwrap();
}

/// etcd's address as node `i` reaches it.
pub fn etcd_url(i: u8) -> String {
    format!("http://198.18.200.{}:2379", 4 * i + 1)
}
