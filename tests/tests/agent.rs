//! The real agent binary in the node namespace: state made through its API reaches the datapath,
//! real traffic flows, and a rejection cuts a live consumer while the other keeps going.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use privatelink_agent::{
    control::{
        ops::{Caller, accounts},
        plane::ControlPlane,
        store::SqliteStore,
    },
    demo::{BACKEND, ENDPOINT, NAT_RANGE, TCP_PORTS, Topology},
    loader::{Datapath, Sizes},
};
use privatelink_tests::{agent_bin, privileged};
use serde_json::{Value, json};

const ADMIN: &str = "agent-test-admin-token";
const API: &str = "127.0.0.1:7171";

/// The agent process; killed and reaped on drop (also on panic).
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Calls the agent's API from inside the node namespace (where it listens on loopback).
fn api(
    topo: &Topology,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let (token, method, path) = (token.to_string(), method.to_string(), path.to_string());
    topo.node.enter(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let url = format!("http://{API}{path}");
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
            Err(_) => (0, Value::Null),
        }
    })
}

fn ok(topo: &Topology, token: &str, path: &str, body: Value) -> Value {
    let (status, v) = api(topo, token, "POST", path, Some(body.clone()));
    assert!(
        status == 200 || status == 201,
        "POST {path} {body}: {status} {v}"
    );
    v
}

/// One TCP round trip through the endpoint from consumer `i`, within `timeout`.
fn round_trip(topo: &Topology, i: usize, timeout: Duration) -> Result<Vec<u8>, String> {
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

#[test]
fn agent_syncs_api_state_into_the_datapath() {
    if !privileged("agent_syncs_api_state_into_the_datapath") {
        return;
    }
    let topo = Topology::build(2).expect("topology");
    let dir = std::env::temp_dir().join(format!("privatelink-agent-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("state.db");

    // Accounts and networks first (the node's config names its networks), with the real code.
    let (mut tokens, mut vpcs) = (Vec::new(), Vec::new());
    {
        let plane = ControlPlane::open(Box::new(SqliteStore::open(&db).unwrap()), ADMIN).unwrap();
        for (id, cidr) in [
            ("provider", "198.18.100.0/24"),
            ("1000000001", "198.18.0.0/16"),
            ("1000000002", "198.18.0.0/16"),
        ] {
            let req = accounts::CreateAccount {
                id: id.into(),
                name: id.into(),
            };
            tokens.push(
                plane
                    .mutate(&Caller::Admin, |s, cx| {
                        accounts::create_account(s, cx, req, format!("token-{id}"))
                    })
                    .unwrap()
                    .token,
            );
            let req = accounts::CreateNetwork {
                name: format!("{id}-vpc"),
                owner: id.into(),
                cidrs: vec![cidr.into()],
            };
            let n = plane
                .mutate(&Caller::Admin, |s, cx| accounts::create_network(s, cx, req))
                .unwrap();
            let sub = accounts::CreateSubnet {
                name: "main".into(),
                cidr: cidr.replace("/16", "/24"),
            };
            let sn = plane
                .mutate(&Caller::Admin, |s, cx| {
                    accounts::create_subnet(s, cx, &n.id, sub)
                })
                .unwrap();
            vpcs.push((n.id, sn.id));
        }
    }
    std::fs::write(dir.join("admin-token"), ADMIN).unwrap();
    let mut cfg = format!(
        "node = \"test-node\"\nadmin_token_file = \"{}\"\nresync_interval = 1\n[api]\nlisten = \"{API}\"\n[store]\npath = \"{}\"\n",
        dir.join("admin-token").display(),
        db.display()
    );
    for (i, (name, _, _)) in topo.consumer_ifaces.iter().enumerate() {
        cfg += &format!(
            "[[interfaces]]\nname = \"{name}\"\nnetwork = \"{}\"\nrole = \"consumer\"\n",
            vpcs[1 + i].0
        );
    }
    cfg += &format!(
        "[[interfaces]]\nname = \"{}\"\nnetwork = \"{}\"\nrole = \"provider\"\n",
        topo.provider_iface.0, vpcs[0].0
    );
    cfg += &format!("[nat.{}]\nrange = \"{NAT_RANGE}\"\n", vpcs[0].0);
    std::fs::write(dir.join("agent.toml"), &cfg).unwrap();

    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let child = topo
        .node
        .command(agent_bin("privatelink-agent").to_str().unwrap())
        .args(["run", "--config", dir.join("agent.toml").to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start the agent");
    let _agent = Agent(child);
    let agent_log = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while api(&topo, ADMIN, "GET", "/v1/revision", None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the agent's API did not come up:\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The redirect targets' peers need an XDP program; the agent attached the datapath itself.
    let mut pass = Datapath::load(&Sizes::small()).expect("load for the pass program");
    topo.attach_pass(&mut pass).expect("pass programs");

    // Provider: service and allowlist. Consumers: an endpoint each at the same address. Provider accepts.
    let svc = ok(
        &topo,
        &tokens[0],
        "/v1/services",
        json!({ "name": "echo", "network_id": vpcs[0].0, "service_type": "clb",
        "backends": [BACKEND.to_string()], "port_mappings": [{ "protocol": "tcp", "service_port": TCP_PORTS.1, "terminal_port": TCP_PORTS.0 }] }),
    );
    let svc_id = svc["id"].as_str().unwrap().to_string();
    let mut eps = Vec::new();
    for c in [1, 2] {
        ok(
            &topo,
            &tokens[0],
            &format!("/v1/services/{svc_id}/allowlist"),
            json!({ "account_id": format!("100000000{c}") }),
        );
        let ep = ok(
            &topo,
            &tokens[c],
            "/v1/endpoints",
            json!({ "name": "echo", "service_id": svc_id,
            "network_id": vpcs[c].0, "subnet_id": vpcs[c].1, "ip": ENDPOINT.to_string() }),
        );
        eps.push(ep["id"].as_str().unwrap().to_string());
    }
    // Pending: no traffic yet.
    assert!(
        round_trip(&topo, 0, Duration::from_millis(700)).is_err(),
        "a Pending endpoint must not forward"
    );
    ok(
        &topo,
        &tokens[0],
        &format!("/v1/services/{svc_id}/accept"),
        json!({ "endpoint_ids": eps }),
    );

    // A real echo server in the provider namespace.
    let listener = topo
        .provider
        .enter(|| TcpListener::bind((BACKEND, TCP_PORTS.1)).expect("bind backend"));
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = topo.provider.spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut buf = [0u8; 256];
                    if let Ok(n) = s.read(&mut buf) {
                        let _ = s.write_all(&buf[..n]);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });

    // Both consumers reach the backend through their own endpoint (the agent applies within a sync).
    for i in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match round_trip(&topo, i, Duration::from_secs(1)) {
                Ok(b) => {
                    assert_eq!(b, format!("hello from consumer {i}").into_bytes());
                    break;
                }
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "consumer {i}: {e}\n{}",
                    agent_log()
                ),
            }
        }
    }
    // Rejecting consumer 1's endpoint cuts it; consumer 2 keeps working.
    ok(
        &topo,
        &tokens[0],
        &format!("/v1/services/{svc_id}/reject"),
        json!({ "endpoint_ids": [eps[0]] }),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        round_trip(&topo, 0, Duration::from_millis(700)).is_err(),
        "a Rejected endpoint must not forward"
    );
    assert!(
        round_trip(&topo, 1, Duration::from_secs(2)).is_ok(),
        "the other consumer is unaffected"
    );
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    assert!(
        agent_log().contains("map writes"),
        "the agent logged its syncs:\n{}",
        agent_log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
