//! Security groups: ordered inbound rules, bound to endpoints with priorities.

use super::{Caller, Ctx, Outcome, owns};
use crate::control::{
    error::{ApiError, ApiResult},
    state::State,
    types::{Change, Object, RuleProtocol, SecurityGroup, SgRule},
    validate,
};

pub use crate::wire::{CreateGroup, RuleReq, Rules, UpdateGroup};

pub fn own<'s>(s: &'s State, caller: &Caller, id: &str) -> ApiResult<&'s SecurityGroup> {
    super::account(caller)?;
    s.security_groups
        .get(id)
        .filter(|g| owns(caller, &g.owner))
        .ok_or_else(|| ApiError::not_found("security group", id))
}

fn rules(req: &[RuleReq]) -> ApiResult<Vec<SgRule>> {
    if req.len() > validate::RULES_PER_GROUP {
        return Err(ApiError::invalid(
            "too_many_rules",
            "rules",
            format!(
                "at most {} rules per group, got {}",
                validate::RULES_PER_GROUP,
                req.len()
            ),
        ));
    }
    req.iter()
        .enumerate()
        .map(|(i, r)| {
            let ports = validate::rule_ports(&format!("rules[{i}].ports"), &r.ports)?;
            if matches!(r.protocol, RuleProtocol::Icmp | RuleProtocol::All) && r.ports != "all" {
                return Err(ApiError::invalid(
                    "invalid_port_range",
                    format!("rules[{i}].ports"),
                    "icmp and all rules take ports all",
                ));
            }
            let source = validate::cidr(&format!("rules[{i}].source"), &r.source)?;
            validate::description(&format!("rules[{i}].description"), &r.description)?;
            // Stored normalised, so equal rules compare equal.
            let ports = if ports == (1, 65535) {
                "all".into()
            } else if ports.0 == ports.1 {
                ports.0.to_string()
            } else {
                format!("{}-{}", ports.0, ports.1)
            };
            Ok(SgRule {
                protocol: r.protocol,
                ports,
                source,
                action: r.action,
                description: r.description.clone(),
            })
        })
        .collect()
}

pub fn create(s: &State, cx: &mut Ctx, req: CreateGroup) -> Outcome<SecurityGroup> {
    let owner = cx.account()?.to_string();
    validate::name("name", &req.name)?;
    validate::tags(&req.tags)?;
    let rules = rules(&req.rules)?;
    let id = cx.new_id("sg", |id| s.security_groups.contains_key(id));
    let g = SecurityGroup {
        id,
        name: req.name,
        owner,
        rules,
        tags: req.tags,
        created_at: cx.now,
    };
    Ok((vec![Change::Put(Object::SecurityGroup(g.clone()))], g))
}

fn put(g: SecurityGroup) -> Outcome<SecurityGroup> {
    Ok((vec![Change::Put(Object::SecurityGroup(g.clone()))], g))
}

/// Replaces the ordered rule list.
pub fn set_rules(s: &State, cx: &mut Ctx, id: &str, req: Rules) -> Outcome<SecurityGroup> {
    let mut g = own(s, cx.caller, id)?.clone();
    g.rules = rules(&req.rules)?;
    // No endpoint this group is bound to may end up evaluating more rules than the datapath holds.
    for e in s
        .endpoints
        .values()
        .filter(|e| e.security_groups.iter().any(|b| b.security_group_id == id))
    {
        let total: usize = e
            .security_groups
            .iter()
            .map(|b| {
                if b.security_group_id == id {
                    g.rules.len()
                } else {
                    s.security_groups[&b.security_group_id].rules.len()
                }
            })
            .sum();
        if total > privatelink_common::MAX_RULES {
            return Err(ApiError::conflicting(
                "too_many_rules",
                "rules",
                format!(
                    "endpoint {} would evaluate {total} rules; at most {}",
                    e.id,
                    privatelink_common::MAX_RULES
                ),
            ));
        }
    }
    put(g)
}

pub fn update(s: &State, cx: &mut Ctx, id: &str, req: UpdateGroup) -> Outcome<SecurityGroup> {
    let mut g = own(s, cx.caller, id)?.clone();
    validate::rename_retag(&mut g.name, &mut g.tags, req.name, req.tags)?;
    put(g)
}

pub fn delete(s: &State, cx: &mut Ctx, id: &str) -> Outcome<()> {
    own(s, cx.caller, id)?;
    let bound: Vec<&str> = s
        .endpoints
        .values()
        .filter(|e| e.security_groups.iter().any(|b| b.security_group_id == id))
        .map(|e| e.id.as_str())
        .collect();
    if !bound.is_empty() {
        return Err(ApiError::conflict(
            "in_use",
            format!("security group {id} is bound to {}", bound.join(", ")),
        ));
    }
    Ok((
        vec![Change::Delete {
            kind: "security_group",
            id: id.to_string(),
        }],
        (),
    ))
}
