//! Endpoints (consumer side): creation under the allowlist rule, IP assignment, security-group
//! bindings.
use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;

use super::{Caller, Ctx, Outcome, owns};
use crate::control::{
    alloc::Allocations,
    error::{ApiError, ApiResult},
    state::State,
    types::{Binding, Change, ConnectionState, Endpoint, IpAddressType, Object, Subnet},
    validate,
};

pub use crate::wire::{BindingReq, Bindings, CreateEndpoint, UpdateEndpoint};

/// Checks that `ep` may have private DNS on: its service publishes a name and no other endpoint in
/// its network resolves that name.
fn check_private_dns(s: &State, ep: &Endpoint) -> ApiResult<()> {
    let Some(svc) = s
        .services
        .get(&ep.service_id)
        .filter(|_| ep.state != ConnectionState::Removed)
    else {
        return Err(ApiError::conflicting(
            "removed",
            "private_dns_enabled",
            format!("endpoint {} was removed from its service", ep.id),
        ));
    };
    let Some(name) = svc.private_dns_name.as_deref() else {
        return Err(ApiError::conflicting(
            "no_private_dns_name",
            "private_dns_enabled",
            format!("service {} publishes no private DNS name", svc.service_name),
        ));
    };
    if let Some(o) = s.private_dns_holder(&ep.network_id, name, |e| e.id == ep.id) {
        return Err(ApiError::conflict(
            "private_dns_conflict",
            format!(
                "{name} already resolves to endpoint {} in network {}: turn its private DNS off first",
                o.id, ep.network_id
            ),
        )
        .with_field("private_dns_enabled"));
    }
    Ok(())
}

/// The caller's own endpoint, or 404.
pub fn own<'s>(s: &'s State, caller: &Caller, id: &str) -> ApiResult<&'s Endpoint> {
    super::account(caller)?;
    s.endpoints
        .get(id)
        .filter(|v| owns(caller, &v.owner))
        .ok_or_else(|| ApiError::not_found("endpoint", id))
}

/// Checks a full set of bindings: at most 5, the caller's own groups, no group or priority twice.
/// Returns them sorted by priority (evaluation order).
fn bindings(s: &State, caller: &Caller, req: &[BindingReq]) -> ApiResult<Vec<Binding>> {
    if req.len() > validate::GROUPS_PER_ENDPOINT {
        return Err(ApiError::conflicting(
            "too_many_security_groups",
            "security_groups",
            format!(
                "at most {} security groups per endpoint",
                validate::GROUPS_PER_ENDPOINT
            ),
        ));
    }
    let (mut ids, mut prios) = (BTreeSet::new(), BTreeSet::new());
    let mut out = Vec::new();
    for (i, b) in req.iter().enumerate() {
        let field = format!("security_groups[{i}]");
        if !s
            .security_groups
            .get(&b.security_group_id)
            .is_some_and(|g| owns(caller, &g.owner))
        {
            return Err(ApiError::not_found("security group", &b.security_group_id)
                .with_field(format!("{field}.security_group_id")));
        }
        if !ids.insert(&b.security_group_id) {
            return Err(ApiError::conflicting(
                "duplicate_security_group",
                field,
                format!("{} is bound twice", b.security_group_id),
            ));
        }
        if !prios.insert(b.priority) {
            return Err(ApiError::conflicting(
                "duplicate_priority",
                format!("{field}.priority"),
                format!(
                    "priority {} is used twice: priorities order the groups",
                    b.priority
                ),
            ));
        }
        out.push(Binding {
            security_group_id: b.security_group_id.clone(),
            priority: b.priority,
        });
    }
    // The datapath evaluates at most MAX_RULES per endpoint (5 groups × 100 rules would exceed it).
    let rules: usize = out
        .iter()
        .map(|b| s.security_groups[&b.security_group_id].rules.len())
        .sum();
    if rules > privatelink_common::MAX_RULES {
        return Err(ApiError::conflicting(
            "too_many_rules",
            "security_groups",
            format!(
                "the bound groups hold {rules} rules; an endpoint evaluates at most {}",
                privatelink_common::MAX_RULES
            ),
        ));
    }
    out.sort_by_key(|b| b.priority);
    Ok(out)
}

/// Addresses of a subnet an endpoint may use: not the network or broadcast address (IPv4).
fn usable(net: &IpNet, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNet::V4(n), IpAddr::V4(a)) => {
            n.prefix_len() >= 31 || (a != n.network() && a != n.broadcast())
        }
        (IpNet::V6(n), IpAddr::V6(a)) => a != n.network(),
        _ => false,
    }
}

/// The endpoint's addresses (`ip`, and the IPv6 one of a dual-stack or IPv6 endpoint) for the
/// requested address type in `subnet`.
fn assign_ips(
    alloc: &Allocations,
    subnet: &Subnet,
    req: &CreateEndpoint,
) -> ApiResult<(IpAddressType, IpAddr, Option<std::net::Ipv6Addr>)> {
    let kind = req.ip_address_type.unwrap_or(match subnet.cidr {
        IpNet::V4(_) => IpAddressType::Ipv4,
        IpNet::V6(_) => IpAddressType::Ipv6,
    });
    let need = |range: Option<IpNet>, family: &str| {
        range.ok_or_else(|| {
            ApiError::conflicting(
                "subnet_family",
                "ip_address_type",
                format!(
                    "a {} endpoint needs an {family} range, and subnet {} has none",
                    serde_json::to_value(kind).map_or_else(|_| "?".into(), |v| v.to_string()),
                    subnet.id
                ),
            )
        })
    };
    let v6_of = |a: IpAddr| match a {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    };
    match kind {
        IpAddressType::Ipv4 => {
            if req.ipv6.is_some() {
                return Err(ApiError::invalid(
                    "invalid_ip",
                    "ipv6",
                    "an ipv4 endpoint has no IPv6 address",
                ));
            }
            let ip = assign_ip(
                alloc,
                &subnet.id,
                &need(subnet.v4(), "IPv4")?,
                req.ip.as_deref(),
                "ip",
            )?;
            Ok((kind, ip, None))
        }
        IpAddressType::Ipv6 => {
            let (field, wanted) = match (&req.ipv6, &req.ip) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::invalid(
                        "invalid_ip",
                        "ip",
                        "an ipv6 endpoint has one address: give ip or ipv6",
                    ));
                }
                (Some(w), None) => ("ipv6", Some(w.as_str())),
                (None, w) => ("ip", w.as_deref()),
            };
            let ip = assign_ip(
                alloc,
                &subnet.id,
                &need(subnet.v6(), "IPv6")?,
                wanted,
                field,
            )?;
            Ok((kind, ip, v6_of(ip)))
        }
        IpAddressType::Dualstack => {
            let (r4, r6) = (need(subnet.v4(), "IPv4")?, need(subnet.v6(), "IPv6")?);
            let ip = assign_ip(alloc, &subnet.id, &r4, req.ip.as_deref(), "ip")?;
            let ip6 = assign_ip(alloc, &subnet.id, &r6, req.ipv6.as_deref(), "ipv6")?;
            Ok((kind, ip, v6_of(ip6)))
        }
    }
}

fn assign_ip(
    alloc: &Allocations,
    subnet_id: &str,
    cidr: &IpNet,
    wanted: Option<&str>,
    field: &str,
) -> ApiResult<IpAddr> {
    if let Some(w) = wanted {
        let ip = validate::ip(field, w)?;
        if !cidr.contains(&ip) || !usable(cidr, ip) {
            return Err(ApiError::conflicting(
                "ip_outside_subnet",
                field,
                format!("{ip} is not a usable address of subnet {cidr}"),
            ));
        }
        if alloc.addr_taken(subnet_id, ip) {
            return Err(ApiError::conflict(
                "ip_in_use",
                format!("{ip} is already used in subnet {subnet_id}"),
            )
            .with_field(field));
        }
        return Ok(ip);
    }
    // Bounded: a subnet's first 65536 candidates are searched.
    alloc.first_free(subnet_id, cidr).ok_or_else(|| {
        ApiError::conflict(
            "subnet_full",
            format!("no free address left in subnet {subnet_id}"),
        )
    })
}

pub fn create(s: &State, cx: &mut Ctx, req: CreateEndpoint) -> Outcome<Endpoint> {
    let owner = cx.account()?.to_string();
    validate::name("name", &req.name)?;
    validate::tags(&req.tags)?;
    if s.networks
        .get(&req.network_id)
        .is_none_or(|n| n.owner != owner)
    {
        return Err(ApiError::not_found("network", &req.network_id).with_field("network_id"));
    }
    let subnet = s
        .subnets
        .get(&req.subnet_id)
        .filter(|x| x.network_id == req.network_id)
        .ok_or_else(|| ApiError::not_found("subnet", &req.subnet_id).with_field("subnet_id"))?;
    let svc = s
        .service_by_ref(&req.service_id)
        .ok_or_else(|| ApiError::not_found("service", &req.service_id).with_field("service_id"))?;
    if svc.owner != owner && !svc.allowlist.iter().any(|e| e.account_id == owner) {
        return Err(ApiError::forbidden(
            "not_allowlisted",
            format!(
                "account {owner} is not on the allowlist of service {}: the provider must add it to the service's allowlist first",
                svc.id
            ),
        ));
    }
    let security_groups = bindings(s, cx.caller, &req.security_groups)?;
    let (ip_address_type, ip, ipv6) = assign_ips(cx.alloc, subnet, &req)?;
    let link_id = cx
        .alloc
        .lowest_link(u32::MAX)
        .ok_or_else(|| super::capacity(u32::MAX, "link"))?;
    let id = cx.new_id("ep", |id| s.endpoints.contains_key(id));
    let ep = Endpoint {
        dns_name: format!(
            "{id}.{}.{}.{}",
            svc.id, cx.cluster.region, cx.cluster.dns_zone
        ),
        private_dns_enabled: req.private_dns_enabled,
        id,
        link_id,
        name: req.name,
        owner,
        network_id: req.network_id,
        subnet_id: req.subnet_id,
        ip,
        ip_address_type,
        ipv6,
        service_id: svc.id.clone(),
        state: if svc.auto_accept {
            ConnectionState::Available
        } else {
            ConnectionState::Pending
        },
        security_groups,
        tags: req.tags,
        created_at: cx.now,
    };
    if ep.private_dns_enabled {
        check_private_dns(s, &ep)?;
    }
    Ok((vec![Change::Put(Object::Endpoint(ep.clone()))], ep))
}

fn put(ep: Endpoint) -> Outcome<Endpoint> {
    Ok((vec![Change::Put(Object::Endpoint(ep.clone()))], ep))
}

pub fn update(s: &State, cx: &mut Ctx, id: &str, req: UpdateEndpoint) -> Outcome<Endpoint> {
    let mut ep = own(s, cx.caller, id)?.clone();
    validate::rename_retag(&mut ep.name, &mut ep.tags, req.name, req.tags)?;
    if let Some(on) = req.private_dns_enabled {
        ep.private_dns_enabled = on;
        if on {
            check_private_dns(s, &ep)?;
        }
    }
    put(ep)
}

pub fn delete(s: &State, cx: &mut Ctx, id: &str) -> Outcome<()> {
    own(s, cx.caller, id)?;
    Ok((
        vec![Change::Delete {
            kind: "endpoint",
            id: id.to_string(),
        }],
        (),
    ))
}

/// Binds one more group at a priority.
pub fn bind(s: &State, cx: &mut Ctx, id: &str, req: BindingReq) -> Outcome<Endpoint> {
    let mut ep = own(s, cx.caller, id)?.clone();
    let mut all: Vec<BindingReq> = ep
        .security_groups
        .iter()
        .map(|b| BindingReq {
            security_group_id: b.security_group_id.clone(),
            priority: b.priority,
        })
        .collect();
    all.push(req);
    ep.security_groups = bindings(s, cx.caller, &all)?;
    put(ep)
}

pub fn unbind(s: &State, cx: &mut Ctx, id: &str, group: &str) -> Outcome<Endpoint> {
    let mut ep = own(s, cx.caller, id)?.clone();
    let before = ep.security_groups.len();
    ep.security_groups.retain(|b| b.security_group_id != group);
    if ep.security_groups.len() == before {
        return Err(ApiError::not_found("binding of security group", group));
    }
    put(ep)
}

/// Replaces all bindings at once (a new priority order applied atomically).
pub fn set_bindings(s: &State, cx: &mut Ctx, id: &str, req: Bindings) -> Outcome<Endpoint> {
    let mut ep = own(s, cx.caller, id)?.clone();
    ep.security_groups = bindings(s, cx.caller, &req.security_groups)?;
    put(ep)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    /// A state with endpoints at `ips` (with IPv6 addresses beside them where given), all in
    /// subnet `sub`, and one at the same addresses in another subnet.
    fn state(ips: &[(&str, Option<&str>)]) -> State {
        let mut s = State::default();
        let mut add = |i: usize, subnet: &str, ip: &str, v6: Option<&str>| {
            let id = format!("ep-{subnet}-{i}");
            let v6 = v6.map(|a| a.parse::<Ipv6Addr>().unwrap());
            s.endpoints.insert(
                id.clone(),
                Endpoint::for_test(&id, i as u32 + 1, subnet, ip.parse().unwrap(), v6),
            );
        };
        for (i, (ip, v6)) in ips.iter().enumerate() {
            add(i, "sub", ip, *v6);
        }
        add(99, "other", "198.18.0.3", None);
        s
    }

    fn auto(s: &State, cidr: &str) -> ApiResult<IpAddr> {
        assign_ip(
            &Allocations::of(s),
            "sub",
            &cidr.parse().unwrap(),
            None,
            "ip",
        )
    }

    #[test]
    fn the_first_free_usable_address_of_the_subnet_is_assigned() {
        let s = state(&[
            ("198.18.0.1", None),
            ("198.18.0.2", None),
            ("198.18.0.4", None),
        ]);
        // .3 is taken in another subnet only.
        assert_eq!(auto(&s, "198.18.0.0/29").unwrap().to_string(), "198.18.0.3");
        let none = state(&[]);
        assert_eq!(
            auto(&none, "198.18.0.0/29").unwrap().to_string(),
            "198.18.0.1",
            "not the network address"
        );
        assert_eq!(
            auto(&none, "198.18.0.8/31").unwrap().to_string(),
            "198.18.0.8",
            "a /31 has no network address"
        );
        let full = state(&[
            ("198.18.0.1", None),
            ("198.18.0.2", None),
            ("198.18.0.3", None),
            ("198.18.0.4", None),
            ("198.18.0.5", None),
            ("198.18.0.6", None),
        ]);
        assert_eq!(
            auto(&full, "198.18.0.0/29").unwrap_err().code,
            "subnet_full",
            "the broadcast address is not usable"
        );
    }

    #[test]
    fn ipv6_assignment_skips_the_network_address_and_sees_only_ipv6_neighbours() {
        // A dual-stack neighbour holds 2001:db8::1; its IPv4 address is no IPv6 candidate's.
        let s = state(&[("198.18.0.2", Some("2001:db8::1"))]);
        assert_eq!(
            auto(&s, "2001:db8::/126").unwrap().to_string(),
            "2001:db8::2"
        );
        let full = state(&[
            ("198.18.0.1", Some("2001:db8::1")),
            ("198.18.0.2", Some("2001:db8::2")),
            ("198.18.0.3", Some("2001:db8::3")),
        ]);
        assert_eq!(
            auto(&full, "2001:db8::/126").unwrap_err().code,
            "subnet_full"
        );
        // An IPv6 address with the number of an IPv4 candidate (::198.18.0.1, a value only,
        // never sent anywhere) does not take that candidate.
        let s = state(&[("198.18.0.9", Some("::c612:1"))]);
        assert_eq!(auto(&s, "198.18.0.0/29").unwrap().to_string(), "198.18.0.1");
    }

    #[test]
    fn a_wanted_address_in_use_in_the_subnet_is_refused() {
        let alloc = Allocations::of(&state(&[("198.18.0.5", Some("2001:db8::5"))]));
        let want =
            |ip: &str, cidr: &str| assign_ip(&alloc, "sub", &cidr.parse().unwrap(), Some(ip), "ip");
        assert_eq!(
            want("198.18.0.5", "198.18.0.0/24").unwrap_err().code,
            "ip_in_use"
        );
        assert_eq!(
            want("2001:db8::5", "2001:db8::/64").unwrap_err().code,
            "ip_in_use"
        );
        // Used in another subnet only.
        assert_eq!(
            want("198.18.0.3", "198.18.0.0/24").unwrap().to_string(),
            "198.18.0.3"
        );
        assert_eq!(
            want("198.18.0.255", "198.18.0.0/24").unwrap_err().code,
            "ip_outside_subnet"
        );
    }

    #[test]
    fn the_lowest_free_number_is_taken_and_the_limit_is_kept() {
        let free =
            |used: &[u32], limit| super::super::lowest_free(used.iter().copied(), limit, "t");
        assert_eq!(free(&[], 10).unwrap(), 1);
        assert_eq!(free(&[1, 2, 3], 10).unwrap(), 4);
        assert_eq!(free(&[2, 3], 10).unwrap(), 1);
        assert_eq!(
            free(&[3, 1, 1, 0], 10).unwrap(),
            2,
            "duplicates and 0 count once or not at all"
        );
        assert_eq!(free(&[u32::MAX - 1, 1], u32::MAX).unwrap(), 2);
        assert_eq!(free(&[1, 2], 3).unwrap_err().code, "capacity");
    }
}
