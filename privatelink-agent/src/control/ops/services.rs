//! Endpoint services (provider side): port mappings, backends, allowlist, connection decisions.
use std::{collections::BTreeSet, net::IpAddr};

use serde::Serialize;

use super::{Caller, Ctx, Outcome, accounts::join, owns};
use crate::control::{
    error::{ApiError, ApiResult},
    state::State,
    types::{
        AllowEntry, Change, ConnectionState, Endpoint, HealthCheck, Object, PortMapping, Protocol,
        ProxyProtocol, Service, ServiceType,
    },
    validate,
};

pub use crate::wire::{
    AddPortMappings, AllowRemoveReq, AllowReq, Backends, CreateService, EndpointIds,
    PortMappingReq, UpdateService,
};

/// Checks a health-check configuration.
fn health_check(h: &HealthCheck) -> ApiResult<()> {
    let bad = |f: &str, m: &str| {
        Err(ApiError::invalid(
            "invalid_health_check",
            format!("health_check.{f}"),
            m,
        ))
    };
    if !(1..=300).contains(&h.interval_secs) {
        return bad("interval_secs", "1 to 300 seconds");
    }
    if h.timeout_secs == 0 || h.timeout_secs > h.interval_secs {
        return bad("timeout_secs", "1 second up to the interval");
    }
    if !(1..=10).contains(&h.healthy_threshold) {
        return bad("healthy_threshold", "1 to 10");
    }
    if !(1..=10).contains(&h.unhealthy_threshold) {
        return bad("unhealthy_threshold", "1 to 10");
    }
    Ok(())
}

/// What "verify" reveals about a service: nothing about its owner's other data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Verified {
    pub id: String,
    pub service_name: String,
    pub private_dns_name: Option<String>,
    pub name: String,
    pub service_type: ServiceType,
    pub port_mappings: Vec<PortMapping>,
}

/// What a provider sees of an endpoint connected to its service (no IP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Connection {
    pub endpoint_id: String,
    /// The packet id: the link id the datapath forwards and counts the connection's traffic under
    /// (metrics `link_id`, PROXY protocol TLV 0xE1).
    pub link_id: u32,
    pub owner: String,
    pub state: ConnectionState,
    pub created_at: u64,
}

/// Per-item result of accept/reject.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ItemResult {
    pub endpoint_id: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<ConnectionState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The caller's own service, or 404.
pub fn own<'s>(s: &'s State, caller: &Caller, id: &str) -> ApiResult<&'s Service> {
    super::account(caller)?;
    s.services
        .get(id)
        .filter(|v| owns(caller, &v.owner))
        .ok_or_else(|| ApiError::not_found("service", id))
}

fn backends(s: &State, network_id: &str, list: &[String]) -> ApiResult<Vec<IpAddr>> {
    let net = s
        .networks
        .get(network_id)
        .ok_or_else(|| ApiError::not_found("network", network_id))?;
    if list.is_empty() {
        return Err(ApiError::invalid(
            "no_backends",
            "backends",
            "at least one backend target IP",
        ));
    }
    let mut out = Vec::new();
    for (i, b) in list.iter().enumerate() {
        let field = format!("backends[{i}]");
        let ip = validate::ip(&field, b)?;
        if !net.cidrs.iter().any(|c| c.contains(&ip)) {
            return Err(ApiError::conflicting(
                "backend_outside_network",
                field,
                format!("{ip} is not in the provider network ({})", join(&net.cidrs)),
            ));
        }
        if out.contains(&ip) {
            return Err(ApiError::invalid(
                "duplicate_backend",
                field,
                format!("{ip} repeats"),
            ));
        }
        out.push(ip);
    }
    Ok(out)
}

/// Validates new mappings against each other and the existing ones.
fn mappings(existing: &[PortMapping], req: &[PortMappingReq]) -> ApiResult<Vec<PortMapping>> {
    if req.len() > validate::MAPPINGS_PER_REQUEST {
        return Err(ApiError::invalid(
            "too_many_port_mappings",
            "port_mappings",
            format!(
                "at most {} port mappings per request, got {}",
                validate::MAPPINGS_PER_REQUEST,
                req.len()
            ),
        ));
    }
    let mut taken: BTreeSet<(Protocol, u16)> = existing
        .iter()
        .map(|m| (m.protocol, m.terminal_port))
        .collect();
    let mut out = Vec::new();
    for (i, m) in req.iter().enumerate() {
        let service_port =
            validate::port(&format!("port_mappings[{i}].service_port"), m.service_port)?;
        let terminal_port = validate::port(
            &format!("port_mappings[{i}].terminal_port"),
            m.terminal_port,
        )?;
        if !taken.insert((m.protocol, terminal_port)) {
            return Err(ApiError::conflicting(
                "duplicate_port_mapping",
                format!("port_mappings[{i}].terminal_port"),
                format!(
                    "{:?} terminal port {terminal_port} is already mapped on this service",
                    m.protocol
                ),
            ));
        }
        out.push(PortMapping {
            protocol: m.protocol,
            service_port,
            terminal_port,
        });
    }
    Ok(out)
}

pub fn create(s: &State, cx: &mut Ctx, req: CreateService) -> Outcome<Service> {
    let owner = cx.account()?.to_string();
    validate::name("name", &req.name)?;
    validate::tags(&req.tags)?;
    if s.networks
        .get(&req.network_id)
        .is_none_or(|n| n.owner != owner)
    {
        return Err(ApiError::not_found("network", &req.network_id).with_field("network_id"));
    }
    let backends = backends(s, &req.network_id, &req.backends)?;
    let port_mappings = mappings(&[], &req.port_mappings)?;
    proxy_protocol(req.proxy_protocol, &port_mappings)?;
    health_check(&req.health_check)?;
    let private_dns_name = req
        .private_dns_name
        .as_deref()
        .map(|n| validate::dns_name("private_dns_name", n, &cx.cluster.dns_zone))
        .transpose()?;
    let slot = super::lowest_free(s.services.values().map(|v| v.slot), u32::MAX, "service")?;
    let id = cx.new_id("svc", |id| s.services.contains_key(id));
    let svc = Service {
        service_name: format!("{}.{}.{id}", cx.cluster.region, req.name),
        id,
        slot,
        private_dns_name,
        answer_ping: req.answer_ping,
        name: req.name,
        owner,
        network_id: req.network_id,
        service_type: req.service_type,
        backends,
        port_mappings,
        auto_accept: req.auto_accept,
        allowlist: Vec::new(),
        health_check: req.health_check,
        flow_limit: req.flow_limit,
        endpoint_flow_limits: Default::default(),
        proxy_protocol: req.proxy_protocol,
        connection_log: req.connection_log,
        tags: req.tags,
        created_at: cx.now,
    };
    Ok((vec![Change::Put(Object::Service(svc.clone()))], svc))
}

/// PROXY protocol goes in front of TCP streams only: a service without a TCP port mapping would
/// never send it, which is refused rather than silently ignored.
fn proxy_protocol(p: ProxyProtocol, mappings: &[PortMapping]) -> ApiResult<()> {
    if p == ProxyProtocol::V2 && !mappings.iter().any(|m| m.protocol == Protocol::Tcp) {
        return Err(ApiError::conflicting(
            "proxy_protocol_needs_tcp",
            "proxy_protocol",
            "PROXY protocol v2 is sent on TCP connections only, and this service has no TCP port \
             mapping (UDP flows never carry the header)",
        ));
    }
    Ok(())
}

fn put(svc: Service) -> Outcome<Service> {
    Ok((vec![Change::Put(Object::Service(svc.clone()))], svc))
}

/// Name, tags and auto-accept. Changing auto-accept never changes existing connections.
pub fn update(s: &State, cx: &mut Ctx, id: &str, req: UpdateService) -> Outcome<Service> {
    let mut svc = own(s, cx.caller, id)?.clone();
    validate::rename_retag(&mut svc.name, &mut svc.tags, req.name, req.tags)?;
    if let Some(a) = req.auto_accept {
        svc.auto_accept = a;
    }
    if let Some(a) = req.answer_ping {
        svc.answer_ping = a;
    }
    if let Some(n) = req.flow_limit {
        svc.flow_limit = n;
    }
    if let Some(p) = req.proxy_protocol {
        proxy_protocol(p, &svc.port_mappings)?;
        svc.proxy_protocol = p;
    }
    if let Some(l) = req.connection_log {
        svc.connection_log = l;
    }
    if let Some(limits) = req.endpoint_flow_limits {
        for id in limits.keys() {
            if s.endpoints.get(id).is_none_or(|e| e.service_id != svc.id) {
                return Err(ApiError::missing(
                    "unknown_endpoint",
                    format!("endpoint_flow_limits.{id}"),
                    format!("{id} is not an endpoint of service {}", svc.id),
                ));
            }
        }
        svc.endpoint_flow_limits = limits;
    }
    if let Some(h) = req.health_check {
        health_check(&h)?;
        svc.health_check = h;
    }
    if let Some(n) = req.private_dns_name {
        svc.private_dns_name = if n.is_empty() {
            None
        } else {
            Some(validate::dns_name(
                "private_dns_name",
                &n,
                &cx.cluster.dns_zone,
            )?)
        };
        // Endpoints that have private DNS on must not end up sharing a name in their network.
        if let Some(name) = &svc.private_dns_name {
            for e in s
                .endpoints
                .values()
                .filter(|e| e.service_id == svc.id && e.private_dns_enabled)
            {
                if let Some(other) =
                    s.private_dns_holder(&e.network_id, name, |o| o.service_id == svc.id)
                {
                    return Err(ApiError::conflict(
                        "private_dns_conflict",
                        format!(
                            "{name} already resolves to endpoint {} in network {}, where endpoint {} of this service has private DNS on",
                            other.id, e.network_id, e.id
                        ),
                    )
                    .with_field("private_dns_name"));
                }
            }
        }
    }
    put(svc)
}

/// "Manage backend services": replaces the backend targets.
pub fn set_backends(s: &State, cx: &mut Ctx, id: &str, req: Backends) -> Outcome<Service> {
    let mut svc = own(s, cx.caller, id)?.clone();
    svc.backends = backends(s, &svc.network_id, &req.backends)?;
    put(svc)
}

pub fn add_port_mappings(
    s: &State,
    cx: &mut Ctx,
    id: &str,
    req: AddPortMappings,
) -> Outcome<Service> {
    let mut svc = own(s, cx.caller, id)?.clone();
    if req.port_mappings.is_empty() {
        return Err(ApiError::invalid(
            "no_port_mappings",
            "port_mappings",
            "at least one port mapping to add",
        ));
    }
    let new = mappings(&svc.port_mappings, &req.port_mappings)?;
    svc.port_mappings.extend(new);
    put(svc)
}

pub fn delete(s: &State, cx: &mut Ctx, id: &str) -> Outcome<()> {
    own(s, cx.caller, id)?;
    let held: Vec<&Endpoint> = s
        .endpoints
        .values()
        .filter(|e| e.service_id == id && e.state != ConnectionState::Removed)
        .collect();
    if !held.is_empty() {
        let states: Vec<String> = ConnectionState::ALL
            .iter()
            .filter_map(|st| {
                let n = held.iter().filter(|e| e.state == *st).count();
                (n > 0).then(|| format!("{n} {st:?}"))
            })
            .collect();
        return Err(ApiError::conflict(
            "in_use",
            format!(
                "service {id} has {} connections ({}): reject them (POST /v1/services/{id}/reject), \
                 then remove them (POST /v1/services/{id}/remove); the consumers keep their \
                 endpoints",
                held.len(),
                states.join(", ")
            ),
        ));
    }
    Ok((
        vec![Change::Delete {
            kind: "service",
            id: id.to_string(),
        }],
        (),
    ))
}

/// The endpoints of `account` connected to service `svc` whose state `from` holds, moved to the
/// state `to` gives.
fn move_connections(
    s: &State,
    svc: &str,
    account: &str,
    from: impl Fn(ConnectionState) -> bool,
    to: ConnectionState,
) -> Vec<Change> {
    s.endpoints
        .values()
        .filter(|e| e.service_id == svc && e.owner == account && from(e.state))
        .map(|e| {
            let mut e = e.clone();
            e.state = to;
            Change::Put(Object::Endpoint(e))
        })
        .collect()
}

pub fn allow(s: &State, cx: &mut Ctx, id: &str, req: AllowReq) -> Outcome<Service> {
    let mut svc = own(s, cx.caller, id)?.clone();
    validate::account_id("account_id", &req.account_id)?;
    validate::description("description", &req.description)?;
    if !s.has_account(&req.account_id) {
        return Err(ApiError::missing(
            "unknown_account",
            "account_id",
            format!("account {} does not exist", req.account_id),
        ));
    }
    if svc.allowlist.iter().any(|e| e.account_id == req.account_id) {
        return Err(ApiError::conflict(
            "exists",
            format!("account {} is already on the allowlist", req.account_id),
        ));
    }
    // Its disconnected connections are connected again.
    let mut changes = move_connections(
        s,
        &svc.id,
        &req.account_id,
        |st| st == ConnectionState::Disconnected,
        ConnectionState::Available,
    );
    svc.allowlist.push(AllowEntry {
        account_id: req.account_id,
        description: req.description,
        created_at: cx.now,
    });
    changes.push(Change::Put(Object::Service(svc.clone())));
    Ok((changes, svc))
}

/// Removing an account stops its endpoints' traffic to the service (they are Disconnected);
/// adding it back makes them Available again.
pub fn disallow(s: &State, cx: &mut Ctx, id: &str, account_id: &str) -> Outcome<Service> {
    let mut svc = own(s, cx.caller, id)?.clone();
    let mut changes = without_account(s, &mut svc, account_id)?;
    changes.push(Change::Put(Object::Service(svc.clone())));
    Ok((changes, svc))
}

/// Takes `account` off `svc`'s allowlist; the changes that turn that account's Available
/// connections Disconnected (their traffic stops; Pending ones stay Pending and cannot be
/// accepted). The caller writes `svc`.
fn without_account(s: &State, svc: &mut Service, account: &str) -> ApiResult<Vec<Change>> {
    let before = svc.allowlist.len();
    svc.allowlist.retain(|e| e.account_id != account);
    if svc.allowlist.len() == before {
        return Err(ApiError::not_found("allowlist entry", account));
    }
    Ok(move_connections(
        s,
        &svc.id,
        account,
        |st| st == ConnectionState::Available && account != svc.owner,
        ConnectionState::Disconnected,
    ))
}

/// Removes several accounts from the allowlist, a result per item; the ones that succeed are
/// committed together.
pub fn disallow_many(
    s: &State,
    cx: &mut Ctx,
    id: &str,
    req: AllowRemoveReq,
) -> Outcome<Vec<AccountResult>> {
    let mut svc = own(s, cx.caller, id)?.clone();
    validate::batch(
        "account_ids",
        "accounts",
        &req.account_ids,
        validate::account_id,
    )?;
    let (mut changes, mut results) = (Vec::new(), Vec::new());
    for a in &req.account_ids {
        // Later items see the earlier removals; the service is written once, last.
        match without_account(s, &mut svc, a) {
            Ok(c) => {
                changes.extend(c);
                results.push(AccountResult {
                    account_id: a.clone(),
                    ok: true,
                    error: None,
                });
            }
            Err(e) => results.push(AccountResult {
                account_id: a.clone(),
                ok: false,
                error: Some(e.message),
            }),
        }
    }
    if results.iter().any(|r| r.ok) {
        changes.push(Change::Put(Object::Service(svc)));
    }
    Ok((changes, results))
}

/// Per-account result of a batch allowlist removal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AccountResult {
    pub account_id: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Any account may look a service up by id before creating an endpoint.
pub fn verify(s: &State, caller: &Caller, id: &str) -> ApiResult<Verified> {
    super::account(caller)?;
    let svc = s
        .service_by_ref(id)
        .ok_or_else(|| ApiError::not_found("service", id))?;
    Ok(Verified {
        id: svc.id.clone(),
        service_name: svc.service_name.clone(),
        private_dns_name: svc.private_dns_name.clone(),
        name: svc.name.clone(),
        service_type: svc.service_type,
        port_mappings: svc.port_mappings.clone(),
    })
}

pub fn connections(s: &State, caller: &Caller, id: &str) -> ApiResult<Vec<Connection>> {
    own(s, caller, id)?;
    Ok(s.endpoints
        .values()
        .filter(|e| e.service_id == id && e.state != ConnectionState::Removed)
        .map(|e| Connection {
            endpoint_id: e.id.clone(),
            link_id: e.link_id,
            owner: e.owner.clone(),
            state: e.state,
            created_at: e.created_at,
        })
        .collect())
}

/// What a provider does with connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Pending or Rejected → Available (the account must be allowed).
    Accept,
    /// Pending, Available or Disconnected → Rejected.
    Reject,
    /// Rejected or Disconnected → Removed: no longer the service's connection.
    Remove,
}

/// Moves a batch of connections, with a result per item. Items that cannot move are reported,
/// not fatal.
pub fn decide(
    s: &State,
    cx: &mut Ctx,
    id: &str,
    req: EndpointIds,
    decision: Decision,
) -> Outcome<Vec<ItemResult>> {
    let svc = own(s, cx.caller, id)?;
    validate::batch(
        "endpoint_ids",
        "endpoint ids",
        &req.endpoint_ids,
        validate::object_id,
    )?;
    let mut changes = Vec::new();
    let mut results = Vec::new();
    let mut seen = BTreeSet::new();
    for eid in req.endpoint_ids {
        let fail = |msg: String| ItemResult {
            endpoint_id: eid.clone(),
            ok: false,
            state: None,
            error: Some(msg),
        };
        if !seen.insert(eid.clone()) {
            results.push(fail("listed twice".into()));
            continue;
        }
        let Some(ep) = s.endpoints.get(&eid).filter(|e| e.service_id == id) else {
            results.push(fail(format!(
                "endpoint {eid} is not connected to service {id}"
            )));
            continue;
        };
        use ConnectionState as C;
        let allowed =
            ep.owner == svc.owner || svc.allowlist.iter().any(|a| a.account_id == ep.owner);
        let to = match (decision, ep.state) {
            (Decision::Accept, C::Pending | C::Rejected) if allowed => C::Available,
            (Decision::Accept, C::Pending | C::Rejected | C::Disconnected) => {
                results.push(fail(format!(
                    "account {} is not on the allowlist: add it first",
                    ep.owner
                )));
                continue;
            }
            (Decision::Reject, C::Pending | C::Available | C::Disconnected) => C::Rejected,
            (Decision::Remove, C::Rejected | C::Disconnected) => C::Removed,
            (d, from) => {
                results.push(fail(format!(
                    "cannot {} a connection that is {from:?}{}",
                    format!("{d:?}").to_lowercase(),
                    if d == Decision::Remove {
                        " (reject it first)"
                    } else {
                        ""
                    }
                )));
                continue;
            }
        };
        let mut e = ep.clone();
        e.state = to;
        changes.push(Change::Put(Object::Endpoint(e)));
        results.push(ItemResult {
            endpoint_id: eid,
            ok: true,
            state: Some(to),
            error: None,
        });
    }
    Ok((changes, results))
}
