//! The operations as pure functions: each runs against a state and either returns the changes
//! it would commit (applied here as the plane would) or refuses, leaving the state as it was.
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::*;
use crate::control::{
    alloc::Allocations,
    types::{Cluster, ProxyProtocol},
};

const PROVIDER: &str = "1000000001";
const CONSUMER: &str = "1000000002";

/// A state and what operations need beside it.
struct Fixture {
    state: State,
    cluster: Cluster,
    next_id: u32,
}

fn req<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a request of the documented shape")
}

fn account(id: &str) -> Caller {
    Caller::Account(id.to_string())
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            state: State::default(),
            cluster: Cluster::default(),
            next_id: 0,
        }
    }

    /// Runs `op` as `caller`; on success its changes are applied as the next revision. A refusal
    /// must leave the state exactly as it was.
    fn run<T>(
        &mut self,
        caller: &Caller,
        op: impl FnOnce(&State, &mut Ctx) -> Outcome<T>,
    ) -> ApiResult<T> {
        let before = self.state.clone();
        let alloc = Allocations::of(&self.state);
        let mut n = self.next_id;
        let mut random = || {
            n += 1;
            n
        };
        let mut cx = Ctx {
            caller,
            now: 1_800_000_000,
            random: &mut random,
            cluster: &self.cluster,
            alloc: &alloc,
        };
        let r = op(&self.state, &mut cx);
        self.next_id = n;
        match r {
            Ok((changes, v)) => {
                let revision = self.state.revision + 1;
                self.state.apply(revision, &changes);
                Ok(v)
            }
            Err(e) => {
                assert_eq!(self.state, before, "a refused operation changed the state");
                Err(e)
            }
        }
    }

    /// The provider and the consumer, a provider network (198.18.100.0/24) with its subnet, and
    /// the consumer's network and subnet. Returns (provider network, consumer network).
    fn accounts_and_networks(&mut self) -> (String, String) {
        let mut nets = Vec::new();
        for (owner, cidr) in [(PROVIDER, "198.18.100.0/24"), (CONSUMER, "198.18.0.0/24")] {
            self.run(&Caller::Admin, |s, cx| {
                accounts::create_account(
                    s,
                    cx,
                    req(json!({ "id": owner, "name": owner })),
                    format!("secret-{owner}"),
                )
            })
            .unwrap();
            let net = self
                .run(&Caller::Admin, |s, cx| {
                    accounts::create_network(
                        s,
                        cx,
                        req(json!({ "name": "net", "owner": owner, "cidrs": [cidr] })),
                    )
                })
                .unwrap();
            self.run(&Caller::Admin, |s, cx| {
                accounts::create_subnet(s, cx, &net.id, req(json!({ "name": "sub", "cidr": cidr })))
            })
            .unwrap();
            nets.push(net.id);
        }
        (nets[0].clone(), nets[1].clone())
    }
}

#[test]
fn accounts_and_networks_are_the_admins_and_refusals_name_their_field() {
    let mut f = Fixture::new();
    let e = f
        .run(&account(PROVIDER), |s, cx| {
            accounts::create_account(
                s,
                cx,
                req(json!({ "id": PROVIDER, "name": "p" })),
                "x".into(),
            )
        })
        .unwrap_err();
    assert_eq!((e.status, e.code), (403, "admin_required"));
    let (pnet, _) = f.accounts_and_networks();
    let e = f
        .run(&Caller::Admin, |s, cx| {
            accounts::create_account(
                s,
                cx,
                req(json!({ "id": PROVIDER, "name": "again" })),
                "y".into(),
            )
        })
        .unwrap_err();
    assert_eq!((e.code, e.field.as_deref()), ("exists", Some("id")));
    // A subnet must lie inside its network.
    let e = f
        .run(&Caller::Admin, |s, cx| {
            accounts::create_subnet(
                s,
                cx,
                &pnet,
                req(json!({ "name": "out", "cidr": "198.18.200.0/24" })),
            )
        })
        .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("cidr"), "{e:?}");
}

#[test]
fn services_check_backends_against_their_network_and_belong_to_their_owner() {
    let mut f = Fixture::new();
    let (pnet, cnet) = f.accounts_and_networks();
    let service = |net: &str, backend: &str| {
        req::<services::CreateService>(json!({
            "name": "db", "network_id": net, "service_type": "mysql", "backends": [backend],
            "port_mappings": [{ "protocol": "tcp", "service_port": 3306, "terminal_port": 3306 }] }))
    };
    let e = f
        .run(&account(PROVIDER), |s, cx| {
            services::create(s, cx, service(&pnet, "198.18.0.10"))
        })
        .unwrap_err();
    assert_eq!(
        (e.code, e.field.as_deref()),
        ("backend_outside_network", Some("backends[0]"))
    );
    let e = f
        .run(&account(PROVIDER), |s, cx| {
            services::create(s, cx, service(&cnet, "198.18.0.10"))
        })
        .unwrap_err();
    assert_eq!(
        e.status, 404,
        "another account's network is not found: {e:?}"
    );
    let svc = f
        .run(&account(PROVIDER), |s, cx| {
            services::create(s, cx, service(&pnet, "198.18.100.10"))
        })
        .unwrap();
    assert_eq!(svc.owner, PROVIDER);
    assert!(services::own(&f.state, &account(PROVIDER), &svc.id).is_ok());
    let e = services::own(&f.state, &account(CONSUMER), &svc.id).unwrap_err();
    assert_eq!(e.status, 404, "a tenant sees nothing of another's services");
    // Any account may verify a service by id or by its service name.
    let by_name = services::verify(&f.state, &account(CONSUMER), &svc.service_name).unwrap();
    assert_eq!(by_name.id, svc.id);
}

#[test]
fn security_group_rules_are_checked_before_anything_is_written() {
    let mut f = Fixture::new();
    f.accounts_and_networks();
    let group = |rules: Value| req::<groups::CreateGroup>(json!({ "name": "web", "rules": rules }));
    let e = f
        .run(&account(CONSUMER), |s, cx| {
            groups::create(s, cx, group(json!([{ "protocol": "tcp", "ports": "90-80", "source": "0.0.0.0/0", "action": "accept" }])))
        })
        .unwrap_err();
    assert!(
        e.field
            .as_deref()
            .is_some_and(|f| f.starts_with("rules[0]")),
        "{e:?}"
    );
    let g = f
        .run(&account(CONSUMER), |s, cx| {
            groups::create(s, cx, group(json!([{ "protocol": "tcp", "ports": "80-90", "source": "198.18.0.0/24", "action": "accept" }])))
        })
        .unwrap();
    assert_eq!(g.rules.len(), 1);
    assert!(groups::own(&f.state, &account(PROVIDER), &g.id).is_err());
    let e = f
        .run(&Caller::Admin, |s, cx| {
            groups::create(s, cx, group(json!([])))
        })
        .unwrap_err();
    assert_eq!(e.code, "account_required");
}

#[test]
fn flow_limits_are_the_providers_and_name_only_endpoints_of_the_service() {
    let mut f = Fixture::new();
    let (pnet, cnet) = f.accounts_and_networks();
    let svc = f
        .run(&account(PROVIDER), |s, cx| {
            services::create(
                s,
                cx,
                req(json!({
                    "name": "db", "network_id": pnet, "service_type": "mysql",
                    "backends": ["198.18.100.10"], "flow_limit": 500,
                    "port_mappings": [{ "protocol": "tcp", "service_port": 3306, "terminal_port": 3306 }] })),
            )
        })
        .unwrap();
    assert_eq!(svc.flow_limit, 500);
    f.run(&account(PROVIDER), |s, cx| {
        services::allow(s, cx, &svc.id, req(json!({ "account_id": CONSUMER })))
    })
    .unwrap();
    let subnet = f
        .state
        .subnets
        .values()
        .find(|s| s.network_id == cnet)
        .unwrap()
        .id
        .clone();
    let ep = f
        .run(&account(CONSUMER), |s, cx| {
            endpoints::create(
                s,
                cx,
                req(json!({ "name": "e", "service_id": svc.id, "network_id": cnet, "subnet_id": subnet })),
            )
        })
        .unwrap();
    assert_eq!(f.state.services[&svc.id].flow_limit_of(&ep.id), 500);
    // An override for an id that is not an endpoint of the service: refused, nothing changed.
    let e = f
        .run(&account(PROVIDER), |s, cx| {
            services::update(
                s,
                cx,
                &svc.id,
                req(json!({ "endpoint_flow_limits": { "vpce-nope": 5 } })),
            )
        })
        .unwrap_err();
    assert_eq!(
        (e.code, e.field.as_deref()),
        ("unknown_endpoint", Some("endpoint_flow_limits.vpce-nope"))
    );
    // The consumer cannot set the provider's limits.
    let e = f
        .run(&account(CONSUMER), |s, cx| {
            services::update(s, cx, &svc.id, req(json!({ "flow_limit": 0 })))
        })
        .unwrap_err();
    assert_eq!(e.status, 404);
    let updated = f
        .run(&account(PROVIDER), |s, cx| {
            services::update(
                s,
                cx,
                &svc.id,
                req(json!({ "flow_limit": 0, "endpoint_flow_limits": { ep.id.clone(): 20 } })),
            )
        })
        .unwrap();
    assert_eq!(updated.flow_limit_of(&ep.id), 20, "the override");
    assert_eq!(updated.flow_limit_of("another"), 0, "the service's: none");
}

#[test]
fn proxy_protocol_is_the_providers_tcp_only_and_refused_without_changing_anything() {
    let mut f = Fixture::new();
    let (pnet, _) = f.accounts_and_networks();
    let create = |f: &mut Fixture, body: serde_json::Value| {
        f.run(&account(PROVIDER), |s, cx| {
            services::create(s, cx, req(body))
        })
    };
    let e = create(
        &mut f,
        json!({ "name": "dns", "network_id": pnet, "service_type": "custom",
                "backends": ["198.18.100.10"], "proxy_protocol": "v2",
                "port_mappings": [{ "protocol": "udp", "service_port": 53, "terminal_port": 53 }] }),
    )
    .unwrap_err();
    assert_eq!(
        (e.code, e.field.as_deref()),
        ("proxy_protocol_needs_tcp", Some("proxy_protocol"))
    );
    assert!(f.state.services.is_empty(), "nothing created");
    let bad =
        serde_json::from_value::<crate::wire::UpdateService>(json!({ "proxy_protocol": "v3" }))
            .unwrap_err();
    assert!(bad.to_string().contains("expected `off` or `v2`"), "{bad}");
    let svc = create(
        &mut f,
        json!({ "name": "web", "network_id": pnet, "service_type": "custom",
                "backends": ["198.18.100.10"],
                "port_mappings": [{ "protocol": "tcp", "service_port": 80, "terminal_port": 80 }] }),
    )
    .unwrap();
    assert_eq!(svc.proxy_protocol, ProxyProtocol::Off, "off by default");
    let e = f
        .run(&account(CONSUMER), |s, cx| {
            services::update(s, cx, &svc.id, req(json!({ "proxy_protocol": "v2" })))
        })
        .unwrap_err();
    assert_eq!(e.status, 404, "a consumer cannot turn it on");
    let on = f
        .run(&account(PROVIDER), |s, cx| {
            services::update(s, cx, &svc.id, req(json!({ "proxy_protocol": "v2" })))
        })
        .unwrap();
    assert_eq!(on.proxy_protocol, ProxyProtocol::V2);
    assert_eq!(f.state.services[&svc.id].proxy_protocol, ProxyProtocol::V2);
}
