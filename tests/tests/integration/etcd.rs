//! The state in a real etcd, shared by the node agent and a second API server (both real binaries,
//! in the node namespace where the test runs etcd): a change made through the other server reaches
//! the agent's datapath within a second; two servers racing for one address give exactly one
//! winner; with etcd stopped, traffic keeps flowing, writes fail clearly and the agent says so;
//! when it is back, the agent catches up.
use std::{
    process::Stdio,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use privatelink_agent::testkit::{
    demo::{BACKEND, ENDPOINT, TCP_PORTS, Topology},
    netns::Netns,
};
use privatelink_tests::{
    agent_bin, privileged,
    world::{
        ADMIN, API, Backing, ETCD, Proc, World, api, api_at, echo_server, node_get, round_trip,
        until, wait_for_traffic, world_backed,
    },
};
use serde_json::{Value, json};

/// The second API server's address (node namespace loopback).
const OTHER: &str = "127.0.0.1:7272";

/// The standalone API server on the same etcd, waited for.
fn other_server(w: &World) -> Proc {
    let log = std::fs::File::create(w.dir.join("api2.log")).unwrap();
    let p = Proc(
        w.topo
            .node
            .command(agent_bin("privatelink-agent").to_str().unwrap())
            .args([
                "api",
                "--listen",
                OTHER,
                "--etcd",
                ETCD,
                "--admin-token-file",
                w.dir.join("admin-token").to_str().unwrap(),
                "--store",
                w.dir.join("api2.db").to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the second API server"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while other(w, ADMIN, "GET", "/v1/revision", None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the second API server did not come up:\n{}",
            std::fs::read_to_string(w.dir.join("api2.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// A call to the second API server.
fn other(w: &World, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    api_at(&w.topo, OTHER, token, method, path, body)
}

fn other_ok(w: &World, token: &str, path: &str, body: Value) -> Value {
    let (status, v) = other(w, token, "POST", path, Some(body.clone()));
    assert!(
        status == 200 || status == 201,
        "POST {path} {body} on the other server: {status} {v}"
    );
    v
}

/// Waits for the agent to report the other server's latest revision applied, for at most
/// `within`: that revision and how long it took.
fn applied_within(w: &World, within: Duration) -> (u64, Duration) {
    let committed = other(w, ADMIN, "GET", "/v1/revision", None).1["revision"]
        .as_u64()
        .unwrap();
    let t = Instant::now();
    while applied(w) < committed {
        assert!(
            t.elapsed() < within,
            "the agent did not apply revision {committed} within {within:?} (at {})\n{}",
            applied(w),
            w.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (committed, t.elapsed())
}

/// A counter of the agent's metrics (0 when it is not there yet).
fn counter(w: &World, name: &str) -> u64 {
    let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

/// The revision the agent reports having applied (from `/v1/nodes`).
fn applied(w: &World) -> u64 {
    applied_by(w, "test-node")
}

/// Links node `i`'s namespace to the etcd namespace (node side `et0`, 198.18.200.(4i+2)/30).
fn linked(et: &Netns, i: u8) -> impl Fn(&Topology) + '_ {
    move |topo: &Topology| privatelink_tests::world::link_to_etcd(et, &topo.node, i)
}

/// `n` nodes (`node-a`, `node-b`...) on one etcd of their own: the first makes the accounts and
/// networks, the others share them.
fn etcd_cluster(
    tag: &str,
    n: u8,
) -> (
    Netns,
    privatelink_tests::world::Etcd,
    Vec<(World, privatelink_tests::world::Agent)>,
) {
    let (et, etcd) = privatelink_tests::world::shared_etcd(tag);
    let mut nodes: Vec<(World, privatelink_tests::world::Agent)> = Vec::new();
    for i in 0..n {
        let connect = linked(&et, i);
        let prepared = nodes
            .first()
            .map(|(w, _)| (w.tokens.clone(), w.vpcs.clone()));
        nodes.push(world_backed(
            &format!("node-{}", char::from(b'a' + i)),
            "",
            Backing::SharedEtcd {
                url: privatelink_tests::world::etcd_url(i),
                connect: &connect,
                prepared,
            },
        ));
    }
    (et, etcd, nodes)
}

#[test]
fn agents_follow_etcd_races_have_one_winner_and_an_outage_keeps_forwarding() {
    if !privileged("agents_follow_etcd_races_have_one_winner_and_an_outage_keeps_forwarding") {
        return;
    }
    let (mut w, agent) = world_backed("etcd", "", Backing::LocalEtcd);
    let _other = other_server(&w);
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(&w.topo, stop.clone());

    // Everything through the second server; the agent learns it from etcd.
    let svc = other_ok(
        &w,
        &w.tokens[0],
        "/v1/services",
        json!({ "name": "echo", "network_id": w.vpcs[0].0, "service_type": "clb",
            "backends": [BACKEND.to_string()],
            "port_mappings": [{ "protocol": "tcp", "service_port": TCP_PORTS.1, "terminal_port": TCP_PORTS.0 }] }),
    );
    let svc = svc["id"].as_str().unwrap().to_string();
    let mut eps = Vec::new();
    for c in [1, 2] {
        other_ok(
            &w,
            &w.tokens[0],
            &format!("/v1/services/{svc}/allowlist"),
            json!({ "account_id": format!("100000000{c}") }),
        );
        let ep = other_ok(
            &w,
            &w.tokens[c],
            "/v1/endpoints",
            json!({ "name": "echo", "service_id": svc, "network_id": w.vpcs[c].0,
                "subnet_id": w.vpcs[c].1, "ip": ENDPOINT.to_string() }),
        );
        eps.push(ep["id"].as_str().unwrap().to_string());
    }
    other_ok(
        &w,
        &w.tokens[0],
        &format!("/v1/services/{svc}/accept"),
        json!({ "endpoint_ids": eps }),
    );
    let (committed, took) = applied_within(&w, Duration::from_secs(1));
    eprintln!(
        "revision {committed} written through the other server, applied by the node in {took:?}"
    );
    wait_for_traffic(&w, 0);
    wait_for_traffic(&w, 1);

    // Followed, not reloaded: each commit of the other server reaches the agent through its
    // watch; the agent has loaded the whole state only when it started.
    let reloads = counter(&w, "privatelink_store_reloads_total");
    let followed = counter(&w, "privatelink_store_commits_followed_total");
    assert!(
        reloads >= 1 && followed >= 1,
        "at least the start's load and one followed commit: {reloads} and {followed}"
    );

    // Two servers race for the same address: exactly one wins, every time.
    let mut raced = Vec::new();
    for round in 0..5u8 {
        let ip = format!("198.18.0.{}", 150 + round);
        let body = json!({ "name": "race", "service_id": svc, "network_id": w.vpcs[1].0,
            "subnet_id": w.vpcs[1].1, "ip": ip });
        let (a, b) = std::thread::scope(|s| {
            let x = s.spawn(|| {
                api(
                    &w.topo,
                    &w.tokens[1],
                    "POST",
                    "/v1/endpoints",
                    Some(body.clone()),
                )
            });
            let y = s.spawn(|| {
                other(
                    &w,
                    &w.tokens[1],
                    "POST",
                    "/v1/endpoints",
                    Some(body.clone()),
                )
            });
            (x.join().unwrap(), y.join().unwrap())
        });
        let mut statuses = [a.0, b.0];
        statuses.sort();
        assert_eq!(
            statuses,
            [201, 409],
            "round {round}: one created, one refused: {a:?} {b:?}"
        );
        let (winner, loser) = if a.0 == 409 {
            (&b.1, &a.1)
        } else {
            (&a.1, &b.1)
        };
        assert_eq!(loser["error"]["code"], "ip_in_use", "{loser}");
        raced.push(winner["id"].as_str().unwrap().to_string());
    }
    // Deleted through the other server: gone from the agent's state too, by its watch.
    for id in &raced {
        let (status, v) = other(
            &w,
            &w.tokens[1],
            "DELETE",
            &format!("/v1/endpoints/{id}"),
            None,
        );
        assert!(status == 200 || status == 204, "DELETE {id}: {status} {v}");
    }
    applied_within(&w, Duration::from_secs(1));
    for id in &raced {
        let (status, v) = api(
            &w.topo,
            &w.tokens[1],
            "GET",
            &format!("/v1/endpoints/{id}"),
            None,
        );
        assert_eq!(
            status, 404,
            "endpoint {id} deleted elsewhere is gone from the node: {v}"
        );
    }
    assert_eq!(
        counter(&w, "privatelink_store_reloads_total"),
        reloads,
        "no full load while the watch is up\n{}",
        w.log()
    );
    // Five races (the agent's own winners it had applied already) and five deletions.
    let more = counter(&w, "privatelink_store_commits_followed_total") - followed;
    assert!(
        (5..=10).contains(&more),
        "the deletions and the other server's winners were followed: {more}"
    );

    // etcd stopped: traffic keeps flowing, writes fail clearly, the node says so.
    w.etcd.as_mut().unwrap().stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").unwrap_or_default();
        if text.contains("\nprivatelink_store_up 0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "store_up never went to 0\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for c in [0, 1] {
        round_trip(&w.topo, c, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("consumer {c} during the outage: {e}"));
    }
    let (status, v) = other(
        &w,
        &w.tokens[0],
        "POST",
        &format!("/v1/services/{svc}/reject"),
        Some(json!({ "endpoint_ids": [eps[0]] })),
    );
    assert_eq!(status, 503, "a write without etcd: {v}");
    assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
    assert!(
        w.log().contains("etcd out of reach"),
        "the agent's log says the store is out of reach:\n{}",
        w.log()
    );

    // Back: the agent catches up with a change made right away.
    w.etcd.as_mut().unwrap().restart(&w.topo.node);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = other(
            &w,
            &w.tokens[0],
            "POST",
            &format!("/v1/services/{svc}/reject"),
            Some(json!({ "endpoint_ids": [eps[0]] })),
        );
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "writes did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    until(&w, 0, false, "consumer 0 rejected after the outage");
    until(&w, 1, true, "consumer 1 still accepted");
    let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").unwrap_or_default();
    assert!(
        text.contains("\nprivatelink_store_up 1"),
        "store_up back to 1"
    );
    assert_eq!(
        counter(&w, "privatelink_store_reloads_total"),
        reloads,
        "the watch lost with etcd resumes where it stopped: no full load"
    );

    // A node restarted while changes happen catches up: killed, a change made meanwhile through
    // the other server, started again.
    drop(agent);
    other_ok(
        &w,
        &w.tokens[0],
        &format!("/v1/services/{svc}/accept"),
        json!({ "endpoint_ids": [eps[0]] }),
    );
    let committed = other(&w, ADMIN, "GET", "/v1/revision", None).1["revision"]
        .as_u64()
        .unwrap();
    let _agent = w.start_agent();
    until(
        &w,
        0,
        true,
        "consumer 0 accepted again while its node was down",
    );
    assert!(
        applied(&w) >= committed,
        "the restarted node reports the new revision"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
}

#[test]
fn three_nodes_share_one_etcd_and_apply_a_change_within_a_second() {
    if !privileged("three_nodes_share_one_etcd_and_apply_a_change_within_a_second") {
        return;
    }
    let (_et, _etcd, cluster) = etcd_cluster("etcd3", 3);
    let [(a, agent_a), (b, agent_b), (c, agent_c)] = <[_; 3]>::try_from(cluster).ok().unwrap();
    // The service and both endpoints through node A's API, accepted there too.
    let (a, agent_a) = privatelink_tests::world::echo_service((a, agent_a));
    let committed = {
        a.accept_all();
        api(&a.topo, ADMIN, "GET", "/v1/revision", None).1["revision"]
            .as_u64()
            .unwrap()
    };
    let t = Instant::now();
    let nodes = |w: &World| -> Vec<(String, u64)> {
        let (_, v) = api(&w.topo, ADMIN, "GET", "/v1/nodes", None);
        v["nodes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|n| {
                        (
                            n["node"].as_str().unwrap_or("").to_string(),
                            n["revision"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    loop {
        let all = nodes(&a);
        let done = ["node-a", "node-b", "node-c"]
            .iter()
            .all(|n| all.iter().any(|(m, r)| m == n && *r >= committed));
        if done {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "not every node applied revision {committed} within 1 s: {all:?}\n{}\n{}",
            b.log(),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "revision {committed}, written through node A, applied by all three nodes in {:?}",
        t.elapsed()
    );
    // Traffic through each node's own datapath, from each node's consumers.
    for w in [&a, &b, &c] {
        let stop = Arc::new(AtomicBool::new(false));
        let server = echo_server(&w.topo, stop.clone());
        wait_for_traffic(w, 0);
        wait_for_traffic(w, 1);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        server.join().unwrap();
    }
    drop((agent_a, agent_b, agent_c));
    drop((a, b, c));
}

/// `GET /v1/nodes` of a world's agent: node name → its row.
fn nodes(w: &World) -> std::collections::BTreeMap<String, Value> {
    let (status, v) = api(&w.topo, ADMIN, "GET", "/v1/nodes", None);
    assert_eq!(status, 200, "{v}");
    // Each row is what the document says a NodeStatus is: its required fields, no others.
    let doc = serde_json::to_value(privatelink_agent::control::api::openapi()).unwrap();
    let schema = &doc["components"]["schemas"]["NodeStatus"];
    let props = schema["properties"]
        .as_object()
        .expect("NodeStatus properties");
    for row in v["nodes"].as_array().unwrap() {
        for k in row.as_object().unwrap().keys() {
            assert!(
                props.contains_key(k),
                "{k} is not in the NodeStatus schema: {row}"
            );
        }
        for r in schema["required"].as_array().unwrap() {
            assert!(row.get(r.as_str().unwrap()).is_some(), "{r} missing: {row}");
        }
    }
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["node"].as_str().unwrap().to_string(), n.clone()))
        .collect()
}

/// The `privatelink-state` header of the agent's answer to `GET /v1/revision`.
fn state_header(w: &World) -> String {
    w.topo.node.enter(|| {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(3)))
            .build()
            .into();
        let r = agent
            .get(format!(
                "http://{}/v1/revision",
                privatelink_tests::world::API
            ))
            .header("Authorization", format!("Bearer {ADMIN}"))
            .call()
            .expect("GET /v1/revision");
        r.headers()
            .get("privatelink-state")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    })
}

/// Waits (at most `within`) until `ok` holds; returns how long it took.
fn within(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    t.elapsed()
}

/// Two nodes on one etcd. Node A's path to etcd is cut by an nftables drop rule in its namespace
/// (nothing closes the connection): within the contact timeout (3 s) plus a ping A says etcd is
/// out of reach (metric, log, stale answers) while node B goes on committing; when the path is
/// back, A catches up from where its watch stopped, without a full load. Node B killed with
/// SIGKILL shows as gone on A within its lease (5 s), and live again once restarted.
#[test]
fn a_node_cut_off_from_etcd_knows_it_and_the_cluster_knows_a_dead_node() {
    if !privileged("a_node_cut_off_from_etcd_knows_it_and_the_cluster_knows_a_dead_node") {
        return;
    }
    let (_et, _etcd, cluster) = etcd_cluster("etcd-live", 2);
    let [(a, _agent_a), (b, agent_b)] = <[_; 2]>::try_from(cluster).ok().unwrap();
    let live = |w: &World, node: &str| nodes(w).get(node).is_some_and(|n| n["status"] == "live");
    within(
        "both nodes live on A, A current",
        Duration::from_secs(10),
        || live(&a, "node-a") && live(&a, "node-b") && state_header(&a) == "current",
    );
    let reloads = counter(&a, "privatelink_store_reloads_total");

    // The cut: nothing answers, nothing resets.
    let nft = |args: &str| {
        let out = a.topo.node.exec("nft", &[args]).expect("nft");
        assert!(
            out.status.success(),
            "nft {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    nft("add table inet plcut");
    nft("add chain inet plcut out { type filter hook output priority 0 ; }");
    nft("add chain inet plcut in { type filter hook input priority 0 ; }");
    nft("add rule inet plcut out ip daddr 198.18.200.1 drop");
    nft("add rule inet plcut in ip saddr 198.18.200.1 drop");
    let took = within("A reports the store down", Duration::from_secs(7), || {
        node_get(&a.topo, "http://127.0.0.1:9464/metrics")
            .unwrap_or_default()
            .contains("\nprivatelink_store_up 0")
    });
    eprintln!("node A took etcd for out of reach {took:?} after the cut");
    assert_eq!(
        state_header(&a),
        "stale",
        "answers from the last state say so"
    );
    assert!(
        a.log().contains("etcd out of reach"),
        "the log says so:\n{}",
        a.log()
    );
    let text = node_get(&a.topo, "http://127.0.0.1:9464/metrics").unwrap_or_default();
    let since =
        privatelink_tests::world::sample(&text, "privatelink_store_last_contact_seconds", &[])
            .expect("last contact");
    assert!(since >= 3.0, "last contact {since} s ago");
    // Meanwhile B commits.
    let (status, v) = api(
        &b.topo,
        &b.tokens[1],
        "POST",
        "/v1/security-groups",
        Some(json!({ "name": "made-while-a-was-cut-off" })),
    );
    assert!(status == 200 || status == 201, "{status} {v}");
    let committed = api(&b.topo, ADMIN, "GET", "/v1/revision", None).1["revision"]
        .as_u64()
        .unwrap();
    // B sees A gone once A's lease ran out.
    within("A gone on B", Duration::from_secs(10), || {
        !live(&b, "node-a")
    });

    nft("delete table inet plcut");
    within("A caught up", Duration::from_secs(10), || {
        applied_by(&a, "node-a") >= committed && state_header(&a) == "current"
    });
    assert_eq!(
        counter(&a, "privatelink_store_reloads_total"),
        reloads,
        "caught up from the watch, without a full load"
    );
    assert!(a.log().contains("etcd is reachable again"), "{}", a.log());
    within("A live again on B", Duration::from_secs(10), || {
        live(&b, "node-a")
    });
    let row = &nodes(&b)["node-a"];
    assert_eq!(row["lag"], 0, "{row}");

    // B killed outright: A lists it as gone within the lease time, then live once restarted.
    drop(agent_b);
    let gone = within("B gone on A", Duration::from_secs(5 + 3), || {
        !live(&a, "node-b")
    });
    eprintln!("node B shown gone {gone:?} after SIGKILL (lease 5 s)");
    let row = &nodes(&a)["node-b"];
    assert_eq!(row["status"], "gone");
    assert!(row["last_contact"].as_u64().unwrap() > 0, "{row}");
    // The CLI shows the same.
    let out = a
        .topo
        .node
        .command(agent_bin("privatelink").to_str().unwrap())
        .args([
            "--server",
            &format!("http://{API}"),
            "--token",
            ADMIN,
            "nodes",
            "list",
        ])
        .output()
        .expect("run privatelink");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NODE")
            && lines[0].contains("LAG")
            && lines[0].contains("LAST_CONTACT"),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("node-b") && l.contains("gone")),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("node-a") && l.contains("live")),
        "{table}"
    );
    let _agent_b = b.start_agent();
    within("B live again", Duration::from_secs(20), || {
        live(&a, "node-b")
    });
}

/// The revision node `node` reports having applied, as `w`'s agent lists it.
fn applied_by(w: &World, node: &str) -> u64 {
    nodes(w)
        .get(node)
        .and_then(|n| n["revision"].as_u64())
        .unwrap_or(0)
}
