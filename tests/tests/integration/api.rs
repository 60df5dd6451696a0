//! The control-plane API through real HTTP on loopback, with a real SQLite store.
use privatelink_tests::api::{ADMIN, Client, Server};
use serde_json::{Value, json};

/// Provider and two consumers with overlapping networks, a subnet each, and a provider service.
struct World {
    server: Server,
    admin: Client,
    provider: Client,
    c1: Client,
    c2: Client,
    svc: String,
    c1_net: String,
    c1_subnet: String,
}

fn account(admin: &Client, server: &Server, id: &str) -> Client {
    let r = admin.ok("POST", "/v1/accounts", json!({ "id": id, "name": id }));
    server.client(r["token"].as_str().expect("token"))
}

fn network(admin: &Client, owner: &str, cidr: &str) -> (String, String) {
    let n = admin.ok(
        "POST",
        "/v1/networks",
        json!({ "name": format!("{owner}-vpc"), "owner": owner, "cidrs": [cidr] }),
    );
    let id = n["id"].as_str().unwrap().to_string();
    let sub = cidr.replace("/16", "/24");
    let s = admin.ok(
        "POST",
        &format!("/v1/networks/{id}/subnets"),
        json!({ "name": "main", "cidr": sub }),
    );
    (id, s["id"].as_str().unwrap().to_string())
}

fn world(name: &str) -> World {
    let server = Server::start(name);
    let admin = server.client(ADMIN);
    let provider = account(&admin, &server, "provider");
    let c1 = account(&admin, &server, "1000000001");
    let c2 = account(&admin, &server, "1000000002");
    let (p_net, _) = network(&admin, "provider", "198.18.100.0/24");
    let (c1_net, c1_subnet) = network(&admin, "1000000001", "198.18.0.0/16");
    network(&admin, "1000000002", "198.18.0.0/16");
    let svc = provider.ok(
        "POST",
        "/v1/services",
        json!({
            "name": "orders-db", "network_id": p_net, "service_type": "mysql",
            "backends": ["198.18.100.10"],
            "port_mappings": [{ "protocol": "tcp", "service_port": 3306, "terminal_port": 3306 }],
        }),
    );
    assert_eq!(svc["auto_accept"], false, "auto-accept defaults to No");
    World {
        svc: svc["id"].as_str().unwrap().into(),
        server,
        admin,
        provider,
        c1,
        c2,
        c1_net,
        c1_subnet,
    }
}

fn endpoint_req(w: &World, name: &str) -> Value {
    json!({ "name": name, "service_id": w.svc, "network_id": w.c1_net, "subnet_id": w.c1_subnet })
}

#[test]
fn auth_is_required_and_the_admin_token_is_not_an_account() {
    let w = world("auth");
    let anon = w.server.client("wrong");
    assert_eq!(anon.get("/v1/services").status, 401);
    assert_eq!(
        w.admin.post("/v1/services", json!({})).status,
        400,
        "a bad body is refused before anything"
    );
    let r = w
        .admin
        .call("GET", &format!("/v1/services/{}/verify", w.svc), None);
    assert_eq!((r.status, r.code()), (403, "account_required"));
    let r = w
        .provider
        .post("/v1/accounts", json!({ "id": "someone", "name": "x" }));
    assert_eq!((r.status, r.code()), (403, "admin_required"));
    // A second token for an account works like the first.
    let t = w
        .admin
        .ok("POST", "/v1/accounts/provider/tokens", json!({}));
    assert_eq!(
        w.server
            .client(t["token"].as_str().unwrap())
            .get("/v1/services")
            .status,
        200
    );
}

#[test]
fn the_bearer_scheme_is_case_insensitive_and_a_caller_can_ask_who_it_is() {
    let w = world("me");
    for scheme in ["Bearer", "bearer", "BEARER"] {
        assert_eq!(w.provider.get_as(scheme, "/v1/me"), 200, "{scheme}");
    }
    assert_eq!(w.provider.get_as("Basic", "/v1/me"), 401);
    let me = w.provider.get("/v1/me");
    assert_eq!(me.status, 200);
    assert_eq!(
        (&me.body["role"], &me.body["account_id"]),
        (&json!("account"), &json!("provider"))
    );
    assert!(me.body["name"].is_string(), "{}", me.text);
    let me = w.admin.get("/v1/me");
    assert_eq!(me.body, json!({ "role": "admin" }));
    assert_eq!(w.server.client("wrong").get("/v1/me").status, 401);
}

#[test]
fn allowlist_gates_endpoint_creation_and_state_machine_moves() {
    let w = world("state_machine");
    // Verify reveals name, type and mappings only.
    let v = w.c1.get(&format!("/v1/services/{}/verify", w.svc)).body;
    assert_eq!(v["name"], "orders-db");
    assert!(
        v.get("owner").is_none() && v.get("backends").is_none() && v.get("allowlist").is_none(),
        "{v}"
    );

    let rev = w.c1.get("/v1/revision").body["revision"].as_u64().unwrap();
    let r = w.c1.post("/v1/endpoints", endpoint_req(&w, "ep1"));
    assert_eq!((r.status, r.code()), (403, "not_allowlisted"));
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allowlist"),
        "{}",
        r.text
    );
    assert_eq!(
        w.c1.get("/v1/revision").body["revision"].as_u64().unwrap(),
        rev,
        "a refused request changes nothing"
    );

    w.provider.ok(
        "POST",
        &format!("/v1/services/{}/allowlist", w.svc),
        json!({ "account_id": "1000000001", "description": "orders team" }),
    );
    let ep = w.c1.ok("POST", "/v1/endpoints", endpoint_req(&w, "ep1"));
    assert_eq!(ep["state"], "Pending");
    assert_eq!(ep["ip"], "198.18.0.1", "first usable address of the subnet");
    let id = ep["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ep-") && id.len() == 11, "{id}");

    // The consumer cannot accept its own connection: the service is not its to see.
    let r = w.c1.post(
        &format!("/v1/services/{}/accept", w.svc),
        json!({ "endpoint_ids": [id] }),
    );
    assert_eq!(r.status, 404);

    let decide = |verb: &str, ids: Value| {
        w.provider.ok(
            "POST",
            &format!("/v1/services/{}/{verb}", w.svc),
            json!({ "endpoint_ids": ids }),
        )["results"]
            .clone()
    };
    let r = decide("accept", json!([id, "ep-00000000"]));
    assert_eq!(
        (r[0]["ok"].clone(), r[0]["state"].clone()),
        (json!(true), json!("Available"))
    );
    assert_eq!(
        r[1]["ok"], false,
        "an unknown id gets its own failed result"
    );
    assert_eq!(
        decide("accept", json!([id]))[0]["ok"],
        false,
        "Available cannot be accepted again"
    );
    assert_eq!(decide("reject", json!([id]))[0]["state"], "Rejected");
    assert_eq!(
        decide("reject", json!([id]))[0]["ok"],
        false,
        "Rejected cannot be rejected again"
    );
    assert_eq!(
        decide("accept", json!([id]))[0]["state"],
        "Available",
        "Rejected → Available"
    );

    // Provider view: no IP. Changing auto-accept does not touch existing connections.
    let conns = w
        .provider
        .get(&format!("/v1/services/{}/endpoints", w.svc))
        .body;
    assert_eq!(conns[0]["endpoint_id"], id);
    assert!(conns[0].get("ip").is_none(), "{conns}");
    w.provider.ok(
        "PATCH",
        &format!("/v1/services/{}", w.svc),
        json!({ "auto_accept": true }),
    );
    assert_eq!(
        w.c1.get(&format!("/v1/endpoints/{id}")).body["state"],
        "Available"
    );
    let ep2 = w.c1.ok("POST", "/v1/endpoints", endpoint_req(&w, "ep2"));
    assert_eq!(
        ep2["state"], "Available",
        "auto-accept Yes → Available at creation"
    );
    assert_eq!(ep2["ip"], "198.18.0.2");

    // Pending → Rejected (auto-accept is on now, so make a Pending one by turning it off first).
    w.provider.ok(
        "PATCH",
        &format!("/v1/services/{}", w.svc),
        json!({ "auto_accept": false }),
    );
    let pending =
        w.c1.ok("POST", "/v1/endpoints", endpoint_req(&w, "ep-pending"));
    assert_eq!(pending["state"], "Pending");
    assert_eq!(
        decide("reject", json!([pending["id"]]))[0]["state"],
        "Rejected",
        "Pending → Rejected"
    );
    w.provider.ok(
        "PATCH",
        &format!("/v1/services/{}", w.svc),
        json!({ "auto_accept": true }),
    );

    // Custom IP: taken, outside, network/broadcast addresses refused (each a conflict with the
    // subnet as it is: 409), a malformed one is 400.
    for (ip, status) in [
        ("198.18.0.2", 409),
        ("198.18.1.5", 409),
        ("198.18.0.0", 409),
        ("198.18.0.255", 409),
        ("198.18.0.077", 400),
    ] {
        let mut req = endpoint_req(&w, "ep3");
        req["ip"] = json!(ip);
        assert_eq!(w.c1.post("/v1/endpoints", req).status, status, "{ip}");
    }
    let mut req = endpoint_req(&w, "ep3");
    req["ip"] = json!("198.18.0.77");
    assert_eq!(w.c1.ok("POST", "/v1/endpoints", req)["ip"], "198.18.0.77");

    // Removing from the allowlist keeps the objects; the datapath stops the traffic.
    w.provider.call(
        "DELETE",
        &format!("/v1/services/{}/allowlist/1000000001", w.svc),
        None,
    );
    assert_eq!(
        w.provider
            .get(&format!("/v1/services/{}/allowlist", w.svc))
            .body,
        json!([])
    );
    // A service with endpoints cannot be deleted.
    assert_eq!(
        w.provider
            .call("DELETE", &format!("/v1/services/{}", w.svc), None)
            .status,
        409
    );
}

#[test]
fn tenants_are_isolated() {
    let w = world("tenants");
    w.provider.ok(
        "POST",
        &format!("/v1/services/{}/allowlist", w.svc),
        json!({ "account_id": "1000000001" }),
    );
    let ep = w.c1.ok("POST", "/v1/endpoints", endpoint_req(&w, "mine"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sg =
        w.c1.ok("POST", "/v1/security-groups", json!({ "name": "web" }))["id"]
            .as_str()
            .unwrap()
            .to_string();
    assert_eq!(
        w.c2.get(&format!("/v1/endpoints/{ep}")).status,
        404,
        "another tenant's endpoint does not exist for c2"
    );
    assert_eq!(
        w.provider.get(&format!("/v1/endpoints/{ep}")).status,
        404,
        "the provider sees connections, not endpoints"
    );
    assert_eq!(w.c2.get(&format!("/v1/services/{}", w.svc)).status, 404);
    assert_eq!(w.c2.get(&format!("/v1/security-groups/{sg}")).status, 404);
    // c2 cannot bind c1's group (to c1's endpoint or anything), nor touch c1's endpoint.
    let r = w.c2.post(
        &format!("/v1/endpoints/{ep}/security-groups"),
        json!({ "security_group_id": sg, "priority": 1 }),
    );
    assert_eq!(r.status, 404);
    let c2_sg =
        w.c2.ok("POST", "/v1/security-groups", json!({ "name": "theirs" }))["id"]
            .as_str()
            .unwrap()
            .to_string();
    let r = w.c1.post(
        &format!("/v1/endpoints/{ep}/security-groups"),
        json!({ "security_group_id": c2_sg, "priority": 1 }),
    );
    assert_eq!(r.status, 404, "binding another tenant's group: {}", r.text);
    assert_eq!(
        w.c2.call("DELETE", &format!("/v1/endpoints/{ep}"), None)
            .status,
        404
    );
    assert_eq!(w.c2.get("/v1/endpoints").body["total"], 0);
    assert_eq!(
        w.c2.get("/v1/networks").body.as_array().unwrap().len(),
        1,
        "only its own network"
    );
}

#[test]
fn port_mappings_are_add_only_and_validated() {
    let w = world("mappings");
    let path = format!("/v1/services/{}/port-mappings", w.svc);
    // Add-only: the collection answers POST alone (405 with `Allow: POST` and the JSON error),
    // and a single mapping is no resource.
    for method in ["PUT", "DELETE"] {
        let r = w.provider.call(method, &path, None);
        assert_eq!(
            (r.status, r.code()),
            (405, "method_not_allowed"),
            "{method}"
        );
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("POST")
        );
    }
    let r = w.provider.call("DELETE", &format!("{path}/tcp-3306"), None);
    assert_eq!((r.status, r.code()), (404, "no_route"));
    let m = |tp: i64| json!({ "protocol": "tcp", "service_port": 8080, "terminal_port": tp });
    for (tp, ok) in [(0, false), (1, true), (65535, true), (65536, false)] {
        let r = w.provider.post(&path, json!({ "port_mappings": [m(tp)] }));
        assert_eq!(r.status == 200, ok, "terminal port {tp}: {}", r.text);
        if !ok {
            assert_eq!(r.body["error"]["field"], "port_mappings[0].terminal_port");
        }
    }
    let r = w
        .provider
        .post(&path, json!({ "port_mappings": [m(3306)] }));
    assert_eq!(
        r.code(),
        "duplicate_port_mapping",
        "(tcp, 3306) exists already"
    );
    let udp = json!({ "port_mappings": [{ "protocol": "udp", "service_port": 53, "terminal_port": 3306 }] });
    assert_eq!(
        w.provider.post(&path, udp).status,
        200,
        "the same port on UDP is another mapping"
    );
    let fifty: Vec<Value> = (2000..2050).map(m).collect();
    let fifty_one: Vec<Value> = (3000..3051).map(m).collect();
    assert_eq!(
        w.provider
            .post(&path, json!({ "port_mappings": fifty_one }))
            .code(),
        "too_many_port_mappings"
    );
    assert_eq!(
        w.provider
            .post(&path, json!({ "port_mappings": fifty }))
            .status,
        200
    );
    let svc = w.provider.get(&format!("/v1/services/{}", w.svc)).body;
    assert_eq!(
        svc["port_mappings"].as_array().unwrap().len(),
        1 + 2 + 1 + 50
    );
}

#[test]
fn validation_errors_name_the_field_and_change_nothing() {
    let w = world("validation");
    let rev = w.provider.get("/v1/revision").body["revision"].clone();
    let net = w
        .admin
        .get("/v1/networks")
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["owner"] == "provider")
        .unwrap()["id"]
        .clone();
    let base = json!({ "name": "x", "network_id": net, "service_type": "redis", "backends": ["198.18.100.11"] });
    // (field, value, status, code, field named): a malformed value is 400, a well-formed one that
    // conflicts with the state (a backend outside the provider network) is 409.
    let cases = [
        ("name", json!("a".repeat(81)), 400, "invalid_name", "name"),
        ("name", json!("bad name"), 400, "invalid_name", "name"),
        (
            "backends",
            json!(["198.18.5.1"]),
            409,
            "backend_outside_network",
            "backends[0]",
        ),
        ("backends", json!([]), 400, "no_backends", "backends"),
        (
            "tags",
            json!(
                (0..11)
                    .map(|i| json!({"key": format!("k{i}")}))
                    .collect::<Vec<_>>()
            ),
            400,
            "too_many_tags",
            "tags",
        ),
        (
            "tags",
            json!([{ "key": "k".repeat(37) }]),
            400,
            "invalid_tag",
            "tags[0].key",
        ),
        (
            "auto_acept",
            json!(true),
            400,
            "unknown_field",
            "auto_acept",
        ),
        (
            "health_check",
            json!({ "enabled": true, "intreval_secs": 5 }),
            400,
            "unknown_field",
            "health_check.intreval_secs",
        ),
        ("flow_limit", json!(-1), 400, "invalid_json", "flow_limit"),
    ];
    for (field, value, status, code, at) in cases {
        let mut req = base.clone();
        req[field] = value;
        let r = w.provider.post("/v1/services", req);
        assert_eq!((r.status, r.code()), (status, code), "{field}: {}", r.text);
        assert_eq!(r.body["error"]["field"], at);
    }
    // A body is a JSON object: an array where one is documented creates nothing.
    for path in ["/v1/security-groups", "/v1/services"] {
        let r = w
            .provider
            .raw("POST", path, Some(r#"["arr",[],[]]"#.into()));
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_json"),
            "{path}: {}",
            r.text
        );
        assert!(r.text.contains("must be a JSON object"), "{}", r.text);
    }
    let r = w
        .provider
        .raw("POST", "/v1/services", Some("{not json".into()));
    assert_eq!((r.status, r.code()), (400, "invalid_json"));
    let mut ok = base.clone();
    ok["name"] = json!("数据库-主.prod_1");
    assert_eq!(
        w.provider.post("/v1/services", ok).status,
        201,
        "CJK names are allowed"
    );
    assert_eq!(
        w.provider.get("/v1/revision").body["revision"]
            .as_u64()
            .unwrap(),
        rev.as_u64().unwrap() + 1
    );
    // Subnets: outside the network, overlapping another.
    let c1net = &w.c1_net;
    let r = w.admin.post(
        &format!("/v1/networks/{c1net}/subnets"),
        json!({ "name": "s", "cidr": "198.19.0.0/24" }),
    );
    assert_eq!((r.status, r.code()), (409, "subnet_outside_network"));
    let r = w.admin.post(
        &format!("/v1/networks/{c1net}/subnets"),
        json!({ "name": "s", "cidr": "198.18.0.128/25" }),
    );
    assert_eq!((r.status, r.code()), (409, "overlapping_subnet"));
    let r = w.admin.post(
        &format!("/v1/networks/{c1net}/subnets"),
        json!({ "name": "s", "cidr": "198.18.1.1/24" }),
    );
    assert_eq!(r.code(), "invalid_cidr");
    // Leading zeros are refused in CIDRs as in addresses (010 could be octal to some tools), and
    // IPv4-mapped IPv6 ranges are refused (they would alias IPv4 space).
    for (cidr, why) in [
        ("198.018.2.0/24", "leading zero"),
        ("::ffff:198.18.2.0/120", "IPv4-mapped"),
    ] {
        let r = w.admin.post(
            &format!("/v1/networks/{c1net}/subnets"),
            json!({ "name": "s", "cidr": cidr }),
        );
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_cidr"),
            "{cidr}: {}",
            r.text
        );
        assert!(r.text.contains(why), "{cidr}: {}", r.text);
    }
    let r = w.admin.post(
        "/v1/networks",
        json!({ "name": "z", "owner": "provider", "cidrs": ["010.1.0.0/16"] }),
    );
    assert_eq!((r.status, r.code()), (400, "invalid_cidr"), "{}", r.text);
    // Nothing of the refused requests was committed.
    assert_eq!(
        w.provider.get("/v1/revision").body["revision"]
            .as_u64()
            .unwrap(),
        rev.as_u64().unwrap() + 1
    );
}

#[test]
fn security_groups_bind_reorder_and_limits() {
    let w = world("groups");
    w.provider.ok(
        "POST",
        &format!("/v1/services/{}/allowlist", w.svc),
        json!({ "account_id": "1000000001" }),
    );
    let rule = |ports: &str| json!({ "protocol": "tcp", "ports": ports, "source": "198.18.0.0/16", "action": "accept" });
    let sgs: Vec<String> = (0..6)
        .map(|i| {
            w.c1.ok(
                "POST",
                "/v1/security-groups",
                json!({ "name": format!("g{i}"), "rules": [rule("3306")] }),
            )["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let bindings = |n: usize| {
        json!(
            sgs[..n]
                .iter()
                .enumerate()
                .map(|(i, g)| json!({ "security_group_id": g, "priority": 10 * (i + 1) }))
                .collect::<Vec<_>>()
        )
    };
    let mut req = endpoint_req(&w, "ep");
    req["security_groups"] = bindings(6);
    assert_eq!(
        w.c1.post("/v1/endpoints", req.clone()).code(),
        "too_many_security_groups"
    );
    req["security_groups"] = bindings(2);
    let ep = w.c1.ok("POST", "/v1/endpoints", req);
    let id = ep["id"].as_str().unwrap();
    // A full new order in one call, sorted by priority.
    let r = w.c1.ok("PUT", &format!("/v1/endpoints/{id}/security-groups"), json!({ "security_groups": [
        { "security_group_id": sgs[0], "priority": 20 }, { "security_group_id": sgs[1], "priority": 5 } ] }));
    assert_eq!(
        r["security_groups"][0]["security_group_id"],
        sgs[1].as_str()
    );
    let dup = json!({ "security_groups": [{ "security_group_id": sgs[0], "priority": 1 }, { "security_group_id": sgs[1], "priority": 1 }] });
    assert_eq!(
        w.c1.call(
            "PUT",
            &format!("/v1/endpoints/{id}/security-groups"),
            Some(&dup)
        )
        .code(),
        "duplicate_priority"
    );
    assert_eq!(
        w.c1.call("DELETE", &format!("/v1/security-groups/{}", sgs[0]), None)
            .status,
        409,
        "bound groups stay"
    );
    assert_eq!(
        w.c1.call(
            "DELETE",
            &format!("/v1/endpoints/{id}/security-groups/{}", sgs[0]),
            None
        )
        .status,
        200
    );
    assert_eq!(
        w.c1.call("DELETE", &format!("/v1/security-groups/{}", sgs[0]), None)
            .status,
        204
    );
    // Rules: 100 allowed, 101 not; bad ports and sources refused.
    let path = format!("/v1/security-groups/{}/rules", sgs[2]);
    let many = |n: usize| json!({ "rules": (0..n).map(|_| rule("80-90")).collect::<Vec<_>>() });
    assert_eq!(w.c1.call("PUT", &path, Some(&many(100))).status, 200);
    assert_eq!(
        w.c1.call("PUT", &path, Some(&many(101))).code(),
        "too_many_rules"
    );
    for bad in [
        json!({ "rules": [rule("90-80")] }),
        json!({ "rules": [{ "protocol": "icmp", "ports": "80", "source": "0.0.0.0/0", "action": "drop" }] }),
        json!({ "rules": [{ "protocol": "tcp", "source": "198.18.0.1/16", "action": "drop" }] }),
    ] {
        assert_eq!(w.c1.call("PUT", &path, Some(&bad)).status, 400, "{bad}");
    }
    let v6 =
        json!({ "rules": [{ "protocol": "all", "source": "2001:db8::/32", "action": "drop" }] });
    assert_eq!(
        w.c1.call("PUT", &path, Some(&v6)).status,
        200,
        "IPv6 sources are allowed"
    );

    // The datapath evaluates at most 256 rules per endpoint: bindings and rule changes that would
    // exceed it are refused (5 groups × 100 rules would).
    let big: Vec<String> = (0..3)
        .map(|i| {
            w.c1.ok(
                "POST",
                "/v1/security-groups",
                json!({ "name": format!("big{i}"), "rules": many(100)["rules"] }),
            )["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut req = endpoint_req(&w, "ep-big");
    req["security_groups"] = json!([{ "security_group_id": big[0], "priority": 1 }, { "security_group_id": big[1], "priority": 2 }]);
    let ep_big = w.c1.ok("POST", "/v1/endpoints", req)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = w.c1.post(
        &format!("/v1/endpoints/{ep_big}/security-groups"),
        json!({ "security_group_id": big[2], "priority": 3 }),
    );
    assert_eq!(
        (r.status, r.code()),
        (409, "too_many_rules"),
        "300 rules: {}",
        r.text
    );
    let small = w.c1.ok(
        "POST",
        "/v1/security-groups",
        json!({ "name": "small", "rules": many(56)["rules"] }),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    w.c1.ok(
        "POST",
        &format!("/v1/endpoints/{ep_big}/security-groups"),
        json!({ "security_group_id": small, "priority": 3 }),
    );
    let r = w.c1.call(
        "PUT",
        &format!("/v1/security-groups/{small}/rules"),
        Some(&many(57)),
    );
    assert_eq!(
        (r.status, r.code()),
        (409, "too_many_rules"),
        "257 rules on a bound endpoint: {}",
        r.text
    );
}

#[test]
fn lists_search_page_select_and_export_csv() {
    let w = world("lists");
    w.provider.ok(
        "POST",
        &format!("/v1/services/{}/allowlist", w.svc),
        json!({ "account_id": "1000000001" }),
    );
    for i in 0..12 {
        let mut req = endpoint_req(
            &w,
            &format!("{}-{i:02}", if i % 2 == 0 { "web" } else { "db" }),
        );
        req["tags"] = json!([{ "key": "team", "value": "a,b\"c" }]);
        let r = w.c1.post("/v1/endpoints", req);
        // Tag values are restricted, so this one is refused; the same without odd characters works.
        assert_eq!(r.code(), "invalid_tag");
        let mut req = endpoint_req(
            &w,
            &format!("{}-{i:02}", if i % 2 == 0 { "web" } else { "db" }),
        );
        req["tags"] =
            json!([{ "key": "team", "value": "orders" }, { "key": "env", "value": "prod" }]);
        w.c1.ok("POST", "/v1/endpoints", req);
    }
    let r =
        w.c1.get("/v1/endpoints?search=WEB-&per_page=4&page=2&fields=id,name,state")
            .body;
    assert_eq!(r["total"], 6);
    let items = r["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        items[0].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["id", "name", "state"]
    );
    assert_eq!(
        w.c1.get("/v1/endpoints?fields=id,secret").code(),
        "invalid_field"
    );
    assert_eq!(w.c1.get("/v1/endpoints?per_page=0").code(), "invalid_page");
    let one = w.c1.get("/v1/endpoints?per_page=1").body["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        w.c1.get(&format!("/v1/endpoints?search={}", &one[3..]))
            .body["total"],
        1,
        "search by id"
    );

    let csv =
        w.c1.get("/v1/export/endpoints.csv?fields=id,name,tags&search=db-");
    assert_eq!(csv.status, 200);
    let mut rd = csv::Reader::from_reader(csv.text.as_bytes());
    assert_eq!(
        rd.headers().unwrap().iter().collect::<Vec<_>>(),
        ["id", "name", "tags"]
    );
    let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.expect("RFC 4180 row")).collect();
    assert_eq!(rows.len(), 6);
    // The tags cell holds JSON with commas and quotes: quoting must round-trip it exactly.
    let tags: Value =
        serde_json::from_str(&rows[0][2]).expect("tags JSON survives the CSV quoting");
    assert_eq!(
        tags,
        json!([{ "key": "team", "value": "orders" }, { "key": "env", "value": "prod" }])
    );
    assert!(
        csv.text.contains("\"[{\"\"key\"\""),
        "quotes are doubled inside a quoted field"
    );
    let svc_csv = w
        .provider
        .get("/v1/export/services.csv?fields=id,name,service_type");
    assert_eq!(svc_csv.text.lines().count(), 2);
    assert_eq!(w.provider.get("/v1/export/nope.csv").code(), "no_route");
}

#[test]
fn the_openapi_document_is_the_routers_own_and_every_operation_is_routed() {
    let w = world("openapi");
    let doc = w.server.client("no-token-needed").get("/openapi.json");
    assert_eq!(doc.status, 200);
    let d = doc.body;
    assert!(
        d["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        d["openapi"]
    );
    // The served document is the router's own (one registration makes both).
    assert_eq!(
        d,
        serde_json::to_value(privatelink_agent::control::api::openapi()).unwrap(),
        "the served document is the one the router was built from"
    );
    let paths = d["paths"].as_object().expect("paths");
    for (path, methods) in [
        ("/v1/services", &["get", "post"][..]),
        ("/v1/services/{id}", &["get", "patch", "delete"][..]),
        ("/v1/services/{id}/accept", &["post"][..]),
        ("/v1/services/{id}/port-mappings", &["post"][..]),
        ("/v1/endpoints", &["get", "post"][..]),
        ("/v1/endpoints/{id}/security-groups", &["post", "put"][..]),
        ("/v1/security-groups/{id}/rules", &["put"][..]),
        ("/v1/networks/{id}/subnets", &["get", "post"][..]),
        ("/v1/accounts", &["get", "post"][..]),
        ("/v1/export/services.csv", &["get"][..]),
        ("/v1/export/endpoints.csv", &["get"][..]),
        ("/v1/nodes", &["get"][..]),
    ] {
        for m in methods {
            assert!(
                paths[path].get(*m).is_some(),
                "{m} {path} missing from the OpenAPI document"
            );
        }
    }
    // Against the running router: every documented operation reaches a handler (whatever it then
    // answers, never the fallback's `no_route` nor 405), and every other method on a documented
    // path is refused with 405.
    let admin = w.server.client(ADMIN);
    let (mut routed, mut refused) = (0, 0);
    for (path, item) in paths {
        let concrete: String = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x-1" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for method in ["get", "post", "put", "patch", "delete"] {
            let r = admin.raw(&method.to_uppercase(), &concrete, Some("{}".into()));
            if item.get(method).is_some() {
                // A handler may answer 405 itself (port mappings are add-only), with its code.
                let router_refused = r.status == 405 && r.code() == "method_not_allowed";
                let fallback = r.status == 404 && r.code() == "no_route";
                assert!(
                    !router_refused && !fallback,
                    "{method} {path} is documented but not routed: {} {}",
                    r.status,
                    r.text
                );
                routed += 1;
            } else {
                assert!(
                    r.status == 405 && r.code() == "method_not_allowed",
                    "{method} {path} is not documented but answered: {} {}",
                    r.status,
                    r.text
                );
                refused += 1;
            }
        }
    }
    assert!(
        routed >= 45 && refused > 0,
        "{routed} routed, {refused} refused"
    );
    let r = admin.get("/v1/no-such-route");
    assert_eq!((r.status, r.code()), (404, "no_route"));
    assert_eq!(
        d["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // Every schema reference resolves.
    let schemas = d["components"]["schemas"].as_object().expect("schemas");
    let text = d.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &r[..r.find('"').unwrap()];
        assert!(
            schemas.contains_key(name),
            "dangling schema reference {name}"
        );
    }
    assert!(
        schemas["CreateService"]["properties"]
            .get("port_mappings")
            .is_some()
    );
}

#[test]
fn history_by_period_with_comparison_and_csv() {
    use privatelink_agent::node::history::{Counters, History};
    let w = world("history");
    w.provider.ok(
        "POST",
        &format!("/v1/services/{}/allowlist", w.svc),
        json!({ "account_id": "1000000001" }),
    );
    let ep = w.c1.ok("POST", "/v1/endpoints", endpoint_req(&w, "hist"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Without an agent's history: a clear answer.
    assert_eq!(
        w.c1.get(&format!("/v1/history/endpoint/{ep}")).code(),
        "no_history"
    );
    let path = w
        .server
        .db
        .with_file_name(format!("history-{}.db", std::process::id()));
    let h = std::sync::Arc::new(std::sync::Mutex::new(History::open(&path).unwrap()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    {
        let mut h = h.lock().unwrap();
        let c = |b: u64| Counters {
            fwd_bytes: b,
            rev_bytes: b,
            fwd_packets: b / 10,
            rev_packets: b / 10,
            new_conns: b / 100,
            drops: 0,
        };
        // Two hours ago (for the comparison) and the last minute.
        h.record(now - 7200 - 60, &[("endpoint", &ep, c(0), 0)])
            .unwrap();
        h.record(now - 7200 - 50, &[("endpoint", &ep, c(100), 1)])
            .unwrap();
        h.record(now - 60, &[("endpoint", &ep, c(100), 1)]).unwrap();
        for i in 1..=5u64 {
            h.record(
                now - 60 + i * 10,
                &[("endpoint", &ep, c(100 + 1000 * i), 2)],
            )
            .unwrap();
        }
    }
    w.server.plane.attach_node(std::sync::Arc::new(
        privatelink_agent::node::local::NodeFacts::new(
            Some(h),
            std::sync::Arc::new(privatelink_agent::node::connlog::ConnLog::open(None).unwrap()),
        ),
    ));
    let r =
        w.c1.get(&format!("/v1/history/endpoint/{ep}?period=realtime"));
    assert_eq!(r.status, 200, "{}", r.text);
    let pts = r.body["points"].as_array().unwrap();
    // The sample at now-60 saw no new traffic (a zero point with one live connection), then five
    // intervals of 1000 bytes with two.
    assert_eq!(pts.len(), 6, "{}", r.text);
    assert_eq!(
        (
            pts[0]["fwd_bytes"].as_u64(),
            pts[0]["max_active_connections"].as_u64()
        ),
        (Some(0), Some(1))
    );
    assert!(
        pts[1..]
            .iter()
            .all(|p| p["fwd_bytes"] == 1000 && p["max_active_connections"] == 2),
        "{}",
        r.text
    );
    assert_eq!(r.body["granularity_secs"], 10);
    // Hourly, with the same window two hours earlier side by side.
    let from = now - 3 * 3600;
    let r = w.c1.get(&format!(
        "/v1/history/endpoint/{ep}?period={from}..{now}&granularity=1h&compare_to={}",
        from - 3600
    ));
    assert_eq!(r.status, 200, "{}", r.text);
    let total: u64 = r.body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["fwd_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(
        total,
        100 + 5000,
        "both windows of traffic in the hourly buckets"
    );
    assert!(r.body["compare"]["points"].is_array());
    // Tenants and bad periods.
    assert_eq!(w.c2.get(&format!("/v1/history/endpoint/{ep}")).status, 404);
    assert_eq!(
        w.c1.get(&format!("/v1/history/endpoint/{ep}?period=1w"))
            .code(),
        "invalid_period"
    );
    assert_eq!(
        w.c1.get(&format!(
            "/v1/history/endpoint/{ep}?period={}..{now}&granularity=10s",
            now - 7200
        ))
        .code(),
        "invalid_period"
    );
    // CSV through the CLI (with a second token of the consumer).
    let token = w
        .admin
        .ok("POST", "/v1/accounts/1000000001/tokens", json!({}))["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let args = [
        "privatelink",
        "--server",
        &format!("http://{}", w.server.addr),
        "--token",
        &token,
        "-o",
        "csv",
        "metrics",
        "endpoint",
        &ep,
    ];
    assert_eq!(
        privatelink_agent::cli::run(args.map(String::from), &mut out, &mut err),
        0,
        "{}",
        String::from_utf8_lossy(&err)
    );
    let mut rd = csv::Reader::from_reader(out.as_slice());
    assert_eq!(&rd.headers().unwrap()[1], "fwd_bytes");
    assert_eq!(rd.records().count(), 6);
    let _ = std::fs::remove_file(path);
}

#[test]
fn tokens_rotate_and_revoke_and_accounts_are_deleted_with_an_audit_trail() {
    let w = world("tokens");
    let admin = &w.admin;
    let revision = || admin.get("/v1/revision").body["revision"].as_u64().unwrap();
    let old = &w.c2;
    assert_eq!(old.get("/v1/me").status, 200);
    // Rotation with a grace period: both work until it ends; the old one says when it ends.
    let r = admin.ok(
        "POST",
        "/v1/accounts/1000000002/tokens/rotate",
        json!({ "grace_secs": 3600 }),
    );
    let new = w.server.client(r["token"].as_str().unwrap());
    assert_eq!(new.get("/v1/me").body["account_id"], "1000000002");
    assert_eq!(old.get("/v1/me").status, 200, "inside the grace period");
    let prev = &r["previous"][0];
    assert!(prev["id"].as_str().unwrap().starts_with("tok-"), "{r}");
    assert!(prev["expires_at"].as_u64().unwrap() > prev["created_at"].as_u64().unwrap());
    let tokens = admin.get("/v1/accounts/1000000002/tokens").body;
    assert_eq!(tokens.as_array().unwrap().len(), 2, "{tokens}");
    assert!(!tokens.to_string().contains("sha256"), "no hashes shown");
    // Revoking the old one: 401 at once.
    let tid = prev["id"].as_str().unwrap();
    let r = admin.call(
        "DELETE",
        &format!("/v1/accounts/1000000002/tokens/{tid}"),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(old.get("/v1/me").status, 401);
    // Rotation without grace: the previous token stops at once.
    let r = admin.ok("POST", "/v1/accounts/1000000002/tokens/rotate", json!({}));
    assert_eq!(new.get("/v1/me").status, 401);
    let newest = w.server.client(r["token"].as_str().unwrap());
    assert_eq!(newest.get("/v1/me").status, 200);
    let r = admin.post(
        "/v1/accounts/1000000002/tokens/rotate",
        json!({ "grace_secs": 604801 }),
    );
    assert_eq!((r.status, r.code()), (400, "invalid_grace"));
    // Only the admin manages tokens.
    let r = newest.post("/v1/accounts/1000000002/tokens/rotate", json!({}));
    assert_eq!(r.status, 403);
    // An account that owns objects is not deleted; the error says what it still owns.
    let before = revision();
    let r = admin.call("DELETE", "/v1/accounts/1000000002", None);
    assert_eq!((r.status, r.code()), (409, "in_use"), "{}", r.text);
    assert!(r.text.contains("1 networks"), "{}", r.text);
    assert_eq!(revision(), before, "a refused delete changes nothing");
    // An account on an allowlist and owning nothing: deleted, off the allowlist, token void.
    let lone = admin.ok(
        "POST",
        "/v1/accounts",
        json!({ "id": "lone", "name": "lone" }),
    );
    let lone_client = w.server.client(lone["token"].as_str().unwrap());
    w.provider.ok(
        "POST",
        &format!("/v1/services/{}/allowlist", w.svc),
        json!({ "account_id": "lone" }),
    );
    let r = admin.call("DELETE", "/v1/accounts/lone", None);
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(lone_client.get("/v1/me").status, 401);
    let allow = w
        .provider
        .get(&format!("/v1/services/{}/allowlist", w.svc))
        .body;
    assert!(!allow.to_string().contains("\"lone\""), "{allow}");
    assert_eq!(admin.call("DELETE", "/v1/accounts/lone", None).status, 404);
}

#[test]
fn no_op_writes_do_not_bump_the_revision_and_times_are_rfc3339() {
    let w = world("noop");
    let revision = || {
        w.provider.get("/v1/revision").body["revision"]
            .as_u64()
            .unwrap()
    };
    let before = revision();
    let path = format!("/v1/services/{}", w.svc);
    for body in [
        json!({}),
        json!({ "name": "orders-db" }),
        json!({ "tags": [] }),
    ] {
        let r = w.provider.call("PATCH", &path, Some(&body));
        assert_eq!(r.status, 200, "{body}: {}", r.text);
        assert_eq!(revision(), before, "{body} changed nothing");
    }
    let r = w.provider.call(
        "PUT",
        &format!("{path}/backends"),
        Some(&json!({ "backends": ["198.18.100.10"] })),
    );
    assert_eq!(r.status, 200);
    assert_eq!(revision(), before, "the same backends again");
    let r = w.provider.post(
        &format!("{path}/port-mappings"),
        json!({ "port_mappings": [] }),
    );
    assert_eq!((r.status, r.code()), (400, "no_port_mappings"));
    w.provider
        .ok("PATCH", &path, json!({ "name": "orders-db-2" }));
    assert_eq!(revision(), before + 1, "a real change is one revision");
    // Every `_at` has its RFC 3339 `_time`.
    let svc = w.provider.get(&path).body;
    let at = svc["created_at"].as_u64().unwrap();
    let time = svc["created_time"].as_str().unwrap();
    assert_eq!(time, privatelink_agent::control::api::rfc3339(at));
    assert!(time.ends_with('Z') && time.len() == 20, "{time}");
    let list = w.provider.get("/v1/services").body;
    assert!(list["items"][0]["created_time"].is_string(), "{list}");
}

#[test]
fn connections_disconnect_with_the_allowlist_and_rejected_ones_can_be_removed() {
    let w = world("lifecycle");
    let svc = &w.svc;
    w.provider.ok(
        "POST",
        &format!("/v1/services/{svc}/allowlist"),
        json!({ "account_id": "1000000001" }),
    );
    let ep = w.c1.ok("POST", "/v1/endpoints", endpoint_req(&w, "ep1"));
    let id = ep["id"].as_str().unwrap().to_string();
    let decide = |verb: &str| {
        w.provider.ok(
            "POST",
            &format!("/v1/services/{svc}/{verb}"),
            json!({ "endpoint_ids": [id] }),
        )["results"][0]
            .clone()
    };
    assert_eq!(decide("accept")["state"], "Available");
    let conns = w
        .provider
        .get(&format!("/v1/services/{svc}/endpoints"))
        .body;
    assert_eq!(conns[0]["link_id"], ep["link_id"], "the packet id: {conns}");
    // The account leaves the allowlist: its connection says Disconnected everywhere.
    let r = w.provider.ok(
        "POST",
        &format!("/v1/services/{svc}/disallow"),
        json!({ "account_ids": ["1000000001", "1000000002"] }),
    );
    assert_eq!(r["results"][0]["ok"], true, "{r}");
    assert_eq!(r["results"][1]["ok"], false, "not on the allowlist: {r}");
    assert_eq!(
        w.c1.get(&format!("/v1/endpoints/{id}")).body["state"],
        "Disconnected"
    );
    let conns = w
        .provider
        .get(&format!("/v1/services/{svc}/endpoints"))
        .body;
    assert_eq!(conns[0]["state"], "Disconnected");
    let r = decide("accept");
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("allowlist"), "{r}");
    // Back on the allowlist: Available again.
    w.provider.ok(
        "POST",
        &format!("/v1/services/{svc}/allowlist"),
        json!({ "account_id": "1000000001" }),
    );
    assert_eq!(
        w.c1.get(&format!("/v1/endpoints/{id}")).body["state"],
        "Available"
    );
    // Retiring the service: refused while it has connections, with what helps.
    let r = w
        .provider
        .call("DELETE", &format!("/v1/services/{svc}"), None);
    assert_eq!((r.status, r.code()), (409, "in_use"));
    assert!(
        r.text.contains("1 Available") && r.text.contains("/remove"),
        "{}",
        r.text
    );
    let r = decide("remove");
    assert_eq!(
        r["ok"], false,
        "an Available connection is rejected first: {r}"
    );
    assert_eq!(decide("reject")["state"], "Rejected");
    assert_eq!(decide("remove")["state"], "Removed");
    assert!(
        w.provider
            .get(&format!("/v1/services/{svc}/endpoints"))
            .body
            .as_array()
            .unwrap()
            .is_empty()
    );
    let r = w
        .provider
        .call("DELETE", &format!("/v1/services/{svc}"), None);
    assert_eq!(r.status, 204, "{}", r.text);
    // The consumer keeps its endpoint, Removed, and can delete it.
    assert_eq!(
        w.c1.get(&format!("/v1/endpoints/{id}")).body["state"],
        "Removed"
    );
    assert_eq!(
        w.c1.call("DELETE", &format!("/v1/endpoints/{id}"), None)
            .status,
        204
    );
}
