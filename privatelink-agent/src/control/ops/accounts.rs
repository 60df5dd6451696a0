//! Accounts, tokens, networks and subnets (managed with the admin token; owners read theirs).
use ipnet::IpNet;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::{Caller, Ctx, Outcome, owns};
use crate::control::{
    error::{ApiError, ApiResult},
    state::State,
    types::{Account, Change, Network, Object, Subnet, Token},
    validate,
};

pub use crate::wire::{CreateAccount, CreateNetwork, CreateSubnet, RotateReq};

/// At most this many CIDRs per network.
pub const CIDRS_PER_NETWORK: usize = 5;

/// A new account with its first token (shown once).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AccountWithToken {
    pub account: Account,
    pub token: String,
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn token(account_id: &str, secret: &str, now: u64) -> Token {
    Token {
        sha256: token_hash(secret),
        account_id: account_id.to_string(),
        created_at: now,
        expires_at: None,
    }
}

/// A token as the API shows it: never the secret, nor the full hash.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TokenView {
    /// `tok-` and 12 hex digits.
    pub id: String,
    pub account_id: String,
    pub created_at: u64,
    /// When it stops authenticating (after a rotation with a grace period).
    pub expires_at: Option<u64>,
}

impl From<&Token> for TokenView {
    fn from(t: &Token) -> Self {
        TokenView {
            id: t.id(),
            account_id: t.account_id.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
        }
    }
}

/// A rotation's new token, and what became of the old ones.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Rotated {
    pub account: Account,
    /// The new token (shown once).
    pub token: String,
    /// The account's other tokens: deleted (grace 0) or expiring at `expires_at`.
    pub previous: Vec<TokenView>,
}

/// The longest grace period a rotation gives the old tokens: a week.
pub const MAX_GRACE_SECS: u64 = 7 * 24 * 3600;

fn account_of<'s>(s: &'s State, id: &str) -> ApiResult<&'s Account> {
    s.accounts
        .get(id)
        .ok_or_else(|| ApiError::not_found("account", id))
}

/// The account's tokens (admin).
pub fn list_tokens(s: &State, caller: &Caller, account_id: &str) -> ApiResult<Vec<TokenView>> {
    super::admin(caller)?;
    account_of(s, account_id)?;
    Ok(s.tokens
        .values()
        .filter(|t| t.account_id == account_id)
        .map(TokenView::from)
        .collect())
}

/// Issues a new token and retires the account's others: at once (grace 0) or after `grace_secs`
/// (they keep working until then, so clients can switch without an outage).
pub fn rotate_token(
    s: &State,
    cx: &mut Ctx,
    account_id: &str,
    grace_secs: u64,
    secret: String,
) -> Outcome<Rotated> {
    cx.admin()?;
    let account = account_of(s, account_id)?.clone();
    if grace_secs > MAX_GRACE_SECS {
        return Err(ApiError::invalid(
            "invalid_grace",
            "grace_secs",
            format!("a grace period is 0 to {MAX_GRACE_SECS} seconds (a week)"),
        ));
    }
    let mut changes = vec![Change::Put(Object::Token(token(
        account_id, &secret, cx.now,
    )))];
    let mut previous = Vec::new();
    for t in s.tokens.values().filter(|t| t.account_id == account_id) {
        if grace_secs == 0 {
            changes.push(Change::Delete {
                kind: "token",
                id: t.sha256.clone(),
            });
            previous.push(TokenView {
                expires_at: Some(cx.now),
                ..TokenView::from(t)
            });
        } else {
            let until = cx.now + grace_secs;
            let mut t = t.clone();
            // A token already ending sooner keeps its earlier end.
            t.expires_at = Some(t.expires_at.map_or(until, |e| e.min(until)));
            previous.push(TokenView::from(&t));
            changes.push(Change::Put(Object::Token(t)));
        }
    }
    Ok((
        changes,
        Rotated {
            account,
            token: secret,
            previous,
        },
    ))
}

/// Revokes one token of the account at once.
pub fn revoke_token(s: &State, cx: &mut Ctx, account_id: &str, token_id: &str) -> Outcome<()> {
    cx.admin()?;
    account_of(s, account_id)?;
    let t = s
        .tokens
        .values()
        .find(|t| t.account_id == account_id && t.id() == token_id)
        .ok_or_else(|| ApiError::not_found("token", token_id))?;
    Ok((
        vec![Change::Delete {
            kind: "token",
            id: t.sha256.clone(),
        }],
        (),
    ))
}

/// Deletes an account that owns nothing: its tokens go with it (401 at once), and it leaves every
/// allowlist. An account that still owns networks, services, endpoints or security groups is
/// refused with what to delete first.
pub fn delete_account(s: &State, cx: &mut Ctx, id: &str) -> Outcome<()> {
    cx.admin()?;
    account_of(s, id)?;
    let owned = [
        (
            "networks",
            s.networks.values().filter(|n| n.owner == id).count(),
        ),
        (
            "services",
            s.services.values().filter(|v| v.owner == id).count(),
        ),
        (
            "endpoints",
            s.endpoints.values().filter(|e| e.owner == id).count(),
        ),
        (
            "security groups",
            s.security_groups.values().filter(|g| g.owner == id).count(),
        ),
    ];
    let held: Vec<String> = owned
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{n} {what}"))
        .collect();
    if !held.is_empty() {
        return Err(ApiError::conflict(
            "in_use",
            format!(
                "account {id} still owns {}: delete them first",
                held.join(", ")
            ),
        ));
    }
    let mut changes: Vec<Change> = s
        .tokens
        .values()
        .filter(|t| t.account_id == id)
        .map(|t| Change::Delete {
            kind: "token",
            id: t.sha256.clone(),
        })
        .collect();
    for svc in s.services.values() {
        if svc.allowlist.iter().any(|e| e.account_id == id) {
            let mut svc = svc.clone();
            svc.allowlist.retain(|e| e.account_id != id);
            changes.push(Change::Put(Object::Service(svc)));
        }
    }
    changes.push(Change::Delete {
        kind: "account",
        id: id.to_string(),
    });
    Ok((changes, ()))
}

pub fn create_account(
    s: &State,
    cx: &mut Ctx,
    req: CreateAccount,
    secret: String,
) -> Outcome<AccountWithToken> {
    cx.admin()?;
    validate::account_id("id", &req.id)?;
    validate::name("name", &req.name)?;
    if s.has_account(&req.id) {
        return Err(
            ApiError::conflict("exists", format!("account {} exists", req.id)).with_field("id"),
        );
    }
    let number = super::lowest_free(s.accounts.values().map(|a| a.number), u32::MAX, "account")?;
    let account = Account {
        id: req.id,
        number,
        name: req.name,
        created_at: cx.now,
    };
    let t = token(&account.id, &secret, cx.now);
    Ok((
        vec![
            Change::Put(Object::Account(account.clone())),
            Change::Put(Object::Token(t)),
        ],
        AccountWithToken {
            account,
            token: secret,
        },
    ))
}

pub fn issue_token(
    s: &State,
    cx: &mut Ctx,
    account_id: &str,
    secret: String,
) -> Outcome<AccountWithToken> {
    cx.admin()?;
    let account = s
        .accounts
        .get(account_id)
        .ok_or_else(|| ApiError::not_found("account", account_id))?
        .clone();
    Ok((
        vec![Change::Put(Object::Token(token(
            account_id, &secret, cx.now,
        )))],
        AccountWithToken {
            account,
            token: secret,
        },
    ))
}

pub fn list_accounts(s: &State, caller: &Caller) -> ApiResult<Vec<Account>> {
    super::admin(caller)?;
    Ok(s.accounts.values().cloned().collect())
}

pub fn create_network(s: &State, cx: &mut Ctx, req: CreateNetwork) -> Outcome<Network> {
    cx.admin()?;
    validate::name("name", &req.name)?;
    if !s.has_account(&req.owner) {
        return Err(ApiError::missing(
            "unknown_account",
            "owner",
            format!("account {} does not exist", req.owner),
        ));
    }
    if req.cidrs.is_empty() || req.cidrs.len() > CIDRS_PER_NETWORK {
        return Err(ApiError::invalid(
            "invalid_cidrs",
            "cidrs",
            format!("1 to {CIDRS_PER_NETWORK} CIDRs"),
        ));
    }
    let mut cidrs: Vec<IpNet> = Vec::new();
    for (i, c) in req.cidrs.iter().enumerate() {
        let field = format!("cidrs[{i}]");
        let net = validate::cidr(&field, c)?;
        if let Some(o) = cidrs.iter().find(|o| o.contains(&net) || net.contains(*o)) {
            return Err(ApiError::invalid(
                "overlapping_cidrs",
                field,
                format!("{net} overlaps {o} of the same network"),
            ));
        }
        cidrs.push(net);
    }
    let number = super::lowest_free(
        s.networks.values().map(|n| n.number),
        privatelink_common::MAX_NETWORKS,
        "network",
    )?;
    let id = cx.new_id("vpc", |id| s.networks.contains_key(id));
    let n = Network {
        id,
        number,
        name: req.name,
        owner: req.owner,
        cidrs,
        created_at: cx.now,
    };
    Ok((vec![Change::Put(Object::Network(n.clone()))], n))
}

/// Networks the caller may see: all for the admin, its own for an account.
pub fn list_networks(s: &State, caller: &Caller) -> Vec<Network> {
    s.networks
        .values()
        .filter(|n| *caller == Caller::Admin || owns(caller, &n.owner))
        .cloned()
        .collect()
}

pub fn network<'s>(s: &'s State, caller: &Caller, id: &str) -> ApiResult<&'s Network> {
    s.networks
        .get(id)
        .filter(|n| *caller == Caller::Admin || owns(caller, &n.owner))
        .ok_or_else(|| ApiError::not_found("network", id))
}

pub fn delete_network(s: &State, cx: &mut Ctx, id: &str) -> Outcome<()> {
    cx.admin()?;
    network(s, cx.caller, id)?;
    if s.subnets.values().any(|x| x.network_id == id)
        || s.services.values().any(|x| x.network_id == id)
    {
        return Err(ApiError::conflict(
            "in_use",
            format!("network {id} still has subnets or services"),
        ));
    }
    Ok((
        vec![Change::Delete {
            kind: "network",
            id: id.to_string(),
        }],
        (),
    ))
}

/// Subnets are created by the admin or by the network's owner.
pub fn create_subnet(
    s: &State,
    cx: &mut Ctx,
    network_id: &str,
    req: CreateSubnet,
) -> Outcome<Subnet> {
    let net = network(s, cx.caller, network_id)?.clone();
    validate::name("name", &req.name)?;
    let cidr = validate::cidr("cidr", &req.cidr)?;
    let ipv6_cidr = match &req.ipv6_cidr {
        None => None,
        Some(v) => {
            let c = validate::cidr("ipv6_cidr", v)?;
            if !matches!(c, IpNet::V6(_)) || !matches!(cidr, IpNet::V4(_)) {
                return Err(ApiError::invalid(
                    "invalid_cidr",
                    "ipv6_cidr",
                    format!(
                        "ipv6_cidr must be an IPv6 range next to an IPv4 cidr (got {c} next to {cidr})"
                    ),
                ));
            }
            Some(c)
        }
    };
    for (field, range) in [("cidr", Some(cidr)), ("ipv6_cidr", ipv6_cidr)] {
        let Some(range) = range else { continue };
        if !net.cidrs.iter().any(|c| c.contains(&range)) {
            return Err(ApiError::conflicting(
                "subnet_outside_network",
                field,
                format!(
                    "{range} is not inside the network's CIDRs ({})",
                    join(&net.cidrs)
                ),
            ));
        }
        let theirs = |o: &Subnet| {
            [Some(o.cidr), o.ipv6_cidr]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
        };
        if let Some((o, r)) = s
            .subnets
            .values()
            .filter(|o| o.network_id == network_id)
            .flat_map(|o| theirs(o).into_iter().map(move |r| (o, r)))
            .find(|(_, r)| r.contains(&range) || range.contains(r))
        {
            return Err(ApiError::conflicting(
                "overlapping_subnet",
                field,
                format!("{range} overlaps subnet {} ({r})", o.id),
            ));
        }
    }
    let id = cx.new_id("subnet", |id| s.subnets.contains_key(id));
    let sn = Subnet {
        id,
        name: req.name,
        owner: net.owner.clone(),
        network_id: network_id.to_string(),
        cidr,
        ipv6_cidr,
        created_at: cx.now,
    };
    Ok((vec![Change::Put(Object::Subnet(sn.clone()))], sn))
}

pub fn list_subnets(s: &State, caller: &Caller, network_id: &str) -> ApiResult<Vec<Subnet>> {
    network(s, caller, network_id)?;
    Ok(s.subnets
        .values()
        .filter(|x| x.network_id == network_id)
        .cloned()
        .collect())
}

pub fn delete_subnet(s: &State, cx: &mut Ctx, network_id: &str, id: &str) -> Outcome<()> {
    network(s, cx.caller, network_id)?;
    if s.subnets.get(id).is_none_or(|x| x.network_id != network_id) {
        return Err(ApiError::not_found("subnet", id));
    }
    if s.endpoints.values().any(|e| e.subnet_id == id) {
        return Err(ApiError::conflict(
            "in_use",
            format!("subnet {id} still has endpoints"),
        ));
    }
    Ok((
        vec![Change::Delete {
            kind: "subnet",
            id: id.to_string(),
        }],
        (),
    ))
}

pub fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
