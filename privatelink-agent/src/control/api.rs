//! The REST API (HTTP/JSON, bearer tokens). Every error is `{"error": {code, message, field}}`.
use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{FromRequestParts, State},
    http::{StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    error::{ApiError, ApiResult},
    http::{Body, P, Q},
    ops::{self, Caller, accounts, endpoints, groups, owns, services},
    plane::{ControlPlane, new_token},
    state::State as State_,
};

type Plane = Arc<ControlPlane>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry = self.retry_after;
        let mut r = (status, Json(json!({ "error": self }))).into_response();
        if let Some(secs) = retry {
            r.headers_mut()
                .insert(header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
        }
        r
    }
}

/// The authenticated caller.
pub struct Auth(pub Caller);

/// The authenticated caller and the token it presented (to ask other servers on its behalf).
pub struct AuthToken(pub Caller, pub String);

impl FromRequestParts<Plane> for AuthToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, plane: &Plane) -> Result<Self, ApiError> {
        // Failed authentication is limited per client address (the server puts it on each
        // request; a router driven without one is not limited).
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        plane
            .authenticate_from(peer, || credential(&parts.headers, plane))
            .map(|(c, t)| AuthToken(c, t))
    }
}

impl FromRequestParts<Plane> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, plane: &Plane) -> Result<Self, ApiError> {
        AuthToken::from_request_parts(parts, plane)
            .await
            .map(|AuthToken(c, _)| Auth(c))
    }
}

/// The token a request presents: its bearer token, or the token of the console session its
/// cookie names when it carries that session's CSRF token. A bearer token wins over a cookie.
fn credential(headers: &axum::http::HeaderMap, plane: &Plane) -> Result<Option<String>, ApiError> {
    // The scheme is case-insensitive (RFC 9110 §11.1): `bearer`, `BEARER` are `Bearer`.
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        });
    if let Some(b) = bearer {
        return Ok(Some(b.to_string()));
    }
    let Some(id) = crate::control::session::cookie(headers, crate::control::session::COOKIE) else {
        return Ok(None);
    };
    let csrf = headers
        .get(crate::control::session::CSRF_HEADER)
        .and_then(|v| v.to_str().ok());
    plane.sessions().token(&id, csrf).map(Some)
}

/// Runs a mutation on the blocking pool (a commit waits for fsync, or for etcd). When another
/// server committed first, it is validated again against the new state.
async fn mutate<T: Send + 'static>(
    plane: Plane,
    caller: Caller,
    op: impl Fn(&State_, &mut ops::Ctx) -> ops::Outcome<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(move || plane.mutate_retrying(&caller, op))
        .await
        .map_err(|e| ApiError::new(500, "internal", format!("mutation task failed: {e}")))?
}

fn created<T: Serialize>(v: T) -> Response {
    (StatusCode::CREATED, Json(with_times(v))).into_response()
}

fn ok<T: Serialize>(v: T) -> Response {
    Json(with_times(v)).into_response()
}

/// The one rule for times in JSON answers: a time is Unix seconds in a field named `<x>_at`, and
/// the same time in RFC 3339 (UTC, seconds) beside it in `<x>_time`; a null one is null in both.
fn with_times<T: Serialize>(v: T) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(o) => {
                let added: Vec<(String, Value)> = o
                    .iter()
                    .filter_map(|(k, v)| {
                        let stem = k.strip_suffix("_at")?;
                        let t = match v {
                            Value::Number(n) => Value::String(rfc3339(n.as_u64()?)),
                            Value::Null => Value::Null,
                            _ => return None,
                        };
                        Some((format!("{stem}_time"), t))
                    })
                    .collect();
                o.values_mut().for_each(walk);
                o.extend(added);
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(v).expect("answers serialise");
    walk(&mut v);
    v
}

/// Unix seconds as RFC 3339 in UTC (`2026-12-06T11:41:45Z`).
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// Paging, search and fields of a list, whichever list it is.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub search: Option<String>,
    pub page: Option<usize>,
    pub per_page: Option<usize>,
    pub fields: Option<String>,
}

/// The query of a list (`page`: paged) or of a CSV export (`export`: every match) whose `fields`
/// are the names the pattern allows.
macro_rules! list_query {
    (page $name:ident, $pattern:literal, $what:literal) => {
        #[doc = concat!("Paging, search and fields of the ", $what, " list.")]
        #[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
        #[into_params(parameter_in = Query)]
        pub struct $name {
            /// Substring of the id or the name (case-insensitive).
            #[param(max_length = 256)]
            pub search: Option<String>,
            /// 1-based.
            #[param(minimum = 1, maximum = 1000000000)]
            pub page: Option<usize>,
            /// 1 to 1000 (default 100).
            #[param(minimum = 1, maximum = 1000)]
            pub per_page: Option<usize>,
            /// Comma-separated field names (default: all, in their order).
            #[param(pattern = $pattern)]
            pub fields: Option<String>,
        }

        impl From<$name> for ListQuery {
            fn from(q: $name) -> Self {
                ListQuery {
                    search: q.search,
                    page: q.page,
                    per_page: q.per_page,
                    fields: q.fields,
                }
            }
        }
    };
    (export $name:ident, $pattern:literal, $what:literal) => {
        #[doc = concat!("Search and fields of the ", $what, " CSV export (every match, no paging).")]
        #[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
        #[into_params(parameter_in = Query)]
        pub struct $name {
            /// Substring of the id or the name (case-insensitive).
            #[param(max_length = 256)]
            pub search: Option<String>,
            /// Comma-separated field names (default: all, in their order).
            #[param(pattern = $pattern)]
            pub fields: Option<String>,
        }

        impl From<$name> for ListQuery {
            fn from(q: $name) -> Self {
                ListQuery {
                    search: q.search,
                    fields: q.fields,
                    ..Default::default()
                }
            }
        }
    };
}

list_query!(page ServiceListQuery, "^(id|service_name|name|private_dns_name|answer_ping|owner|network_id|service_type|backends|port_mappings|auto_accept|allowlist|tags|created_at)(,(id|service_name|name|private_dns_name|answer_ping|owner|network_id|service_type|backends|port_mappings|auto_accept|allowlist|tags|created_at))*$", "service");
list_query!(page EndpointListQuery, "^(id|name|owner|network_id|subnet_id|ip|service_id|dns_name|private_dns_enabled|state|security_groups|tags|created_at)(,(id|name|owner|network_id|subnet_id|ip|service_id|dns_name|private_dns_enabled|state|security_groups|tags|created_at))*$", "endpoint");
list_query!(page GroupListQuery, "^(id|name|owner|rules|tags|created_at)(,(id|name|owner|rules|tags|created_at))*$", "security group");
list_query!(export ServiceExportQuery, "^(id|service_name|name|private_dns_name|answer_ping|owner|network_id|service_type|backends|port_mappings|auto_accept|allowlist|tags|created_at)(,(id|service_name|name|private_dns_name|answer_ping|owner|network_id|service_type|backends|port_mappings|auto_accept|allowlist|tags|created_at))*$", "service");
list_query!(export EndpointExportQuery, "^(id|name|owner|network_id|subnet_id|ip|service_id|dns_name|private_dns_enabled|state|security_groups|tags|created_at)(,(id|name|owner|network_id|subnet_id|ip|service_id|dns_name|private_dns_enabled|state|security_groups|tags|created_at))*$", "endpoint");

pub const SERVICE_FIELDS: &[&str] = &[
    "id",
    "service_name",
    "name",
    "private_dns_name",
    "answer_ping",
    "owner",
    "network_id",
    "service_type",
    "backends",
    "port_mappings",
    "auto_accept",
    "allowlist",
    "tags",
    "created_at",
];
pub const ENDPOINT_FIELDS: &[&str] = &[
    "id",
    "name",
    "owner",
    "network_id",
    "subnet_id",
    "ip",
    "service_id",
    "dns_name",
    "private_dns_enabled",
    "state",
    "security_groups",
    "tags",
    "created_at",
];
pub const GROUP_FIELDS: &[&str] = &["id", "name", "owner", "rules", "tags", "created_at"];

fn fields<'a>(q: &'a ListQuery, valid: &[&'a str]) -> ApiResult<Vec<&'a str>> {
    let Some(f) = q.fields.as_deref() else {
        return Ok(valid.to_vec());
    };
    f.split(',')
        .map(|name| {
            let name = name.trim();
            valid.iter().find(|v| **v == name).copied().ok_or_else(|| {
                ApiError::invalid(
                    "invalid_field",
                    "fields",
                    format!("unknown field {name:?}; fields are {}", valid.join(", ")),
                )
            })
        })
        .collect()
}

/// Search, then the selected fields of each item.
fn select<T: Serialize>(
    items: Vec<T>,
    q: &ListQuery,
    valid: &[&str],
) -> ApiResult<(Vec<&'static str>, Vec<Value>)> {
    let chosen = fields(q, valid)?;
    if q.search.as_ref().is_some_and(|n| n.chars().count() > 256) {
        return Err(ApiError::invalid(
            "invalid_search",
            "search",
            "search is at most 256 characters",
        ));
    }
    let needle = q.search.as_deref().map(str::to_lowercase);
    let rows = items
        .into_iter()
        .map(|i| serde_json::to_value(i).expect("objects serialise"))
        .filter(|v| match &needle {
            None => true,
            Some(n) => ["id", "name"]
                .iter()
                .any(|k| v[*k].as_str().is_some_and(|s| s.to_lowercase().contains(n))),
        })
        .map(|v| {
            Value::Object(
                chosen
                    .iter()
                    .map(|f| (f.to_string(), v[*f].clone()))
                    .collect(),
            )
        })
        .collect();
    // The chosen names are among the static lists, so they live as long as the program.
    let names = chosen.iter().map(|c| *valid_static(c)).collect();
    Ok((names, rows))
}

fn valid_static(name: &str) -> &'static &'static str {
    SERVICE_FIELDS
        .iter()
        .chain(ENDPOINT_FIELDS)
        .chain(GROUP_FIELDS)
        .find(|v| **v == name)
        .expect("validated field name")
}

/// A page of a list: `{items, page, per_page, total}`.
fn page<T: Serialize>(items: Vec<T>, q: &ListQuery, valid: &[&str]) -> ApiResult<Response> {
    let (_, rows) = select(items, q, valid)?;
    let per_page = q.per_page.unwrap_or(100);
    if per_page == 0 || per_page > 1000 {
        return Err(ApiError::invalid(
            "invalid_page",
            "per_page",
            "per_page is 1 to 1000",
        ));
    }
    let page = q.page.unwrap_or(1);
    if page == 0 || page > 1_000_000_000 {
        return Err(ApiError::invalid(
            "invalid_page",
            "page",
            "pages are 1 to 1000000000",
        ));
    }
    let total = rows.len();
    let items: Vec<Value> = rows
        .into_iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .collect();
    Ok(ok(
        json!({ "items": items, "page": page, "per_page": per_page, "total": total }),
    ))
}

/// RFC 4180 CSV with a header; non-scalar values as compact JSON.
fn csv_response<T: Serialize>(items: Vec<T>, q: &ListQuery, valid: &[&str]) -> ApiResult<Response> {
    let (names, rows) = select(items, q, valid)?;
    let mut w = csv::Writer::from_writer(Vec::new());
    let io = |e: csv::Error| ApiError::new(500, "internal", format!("writing CSV: {e}"));
    w.write_record(&names).map_err(io)?;
    for r in rows {
        let cells: Vec<String> = names
            .iter()
            .map(|n| match &r[*n] {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                v @ (Value::Bool(_) | Value::Number(_)) => v.to_string(),
                v => v.to_string(),
            })
            .collect();
        w.write_record(&cells).map_err(io)?;
    }
    let body = w
        .into_inner()
        .map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response())
}

// ---- accounts, networks, subnets ----

#[utoipa::path(post, path = "/v1/accounts", request_body = accounts::CreateAccount, responses((status = 201, body = accounts::AccountWithToken, description = "Create an account and its first token (admin)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Create an account and its first token (admin)")]
async fn create_account(
    State(p): State<Plane>,
    Auth(c): Auth,
    Body(req): Body<accounts::CreateAccount>,
) -> ApiResult<Response> {
    let secret = new_token();
    mutate(p, c, move |s, cx| {
        accounts::create_account(s, cx, req.clone(), secret.clone())
    })
    .await
    .map(created)
}

#[utoipa::path(get, path = "/v1/accounts", responses((status = 200, body = Vec<crate::control::types::Account>, description = "List accounts (admin)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "List accounts (admin)")]
async fn list_accounts(State(p): State<Plane>, Auth(c): Auth) -> ApiResult<Response> {
    p.read(|s| accounts::list_accounts(s, &c)).map(ok)
}

#[utoipa::path(post, path = "/v1/accounts/{id}/tokens", params(("id" = String, Path, description = "object id")), responses((status = 201, body = accounts::AccountWithToken, description = "Issue another token (admin)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Issue another token (admin)")]
async fn issue_token(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    let secret = new_token();
    mutate(p, c, move |s, cx| {
        accounts::issue_token(s, cx, &id, secret.clone())
    })
    .await
    .map(created)
}

#[utoipa::path(delete, path = "/v1/accounts/{id}", params(("id" = String, Path, description = "account id")), responses((status = 204, description = "Delete an account that owns nothing (admin); its tokens stop at once and it leaves every allowlist"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Delete an account (admin)")]
async fn delete_account(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    let who = id.clone();
    mutate(p, c, move |s, cx| accounts::delete_account(s, cx, &id)).await?;
    log::info!(target: "privatelink::audit", "account {who} deleted by the admin (its tokens are void)");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/v1/accounts/{id}/tokens", params(("id" = String, Path, description = "account id")), responses((status = 200, body = Vec<accounts::TokenView>, description = "The account's tokens: ids and times, never the secrets (admin)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "An account's tokens (admin)")]
async fn list_tokens(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    p.read(|s| accounts::list_tokens(s, &c, &id)).map(ok)
}

#[utoipa::path(post, path = "/v1/accounts/{id}/tokens/rotate", request_body = accounts::RotateReq, params(("id" = String, Path, description = "account id")), responses((status = 201, body = accounts::Rotated, description = "A new token; the account's others stop at once or after the grace period (admin)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Rotate an account's token (admin)")]
async fn rotate_token(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<accounts::RotateReq>,
) -> ApiResult<Response> {
    let secret = new_token();
    let who = id.clone();
    let r = mutate(p, c, move |s, cx| {
        accounts::rotate_token(s, cx, &id, req.grace_secs, secret.clone())
    })
    .await?;
    log::info!(
        target: "privatelink::audit",
        "account {who}: token rotated by the admin; previous tokens {}",
        r.previous
            .iter()
            .map(|t| format!("{} until {}", t.id, t.expires_at.unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(created(r))
}

#[utoipa::path(delete, path = "/v1/accounts/{id}/tokens/{token}", params(("id" = String, Path, description = "account id"), ("token" = String, Path, description = "token id (tok-...)")), responses((status = 204, description = "Revoke a token at once (admin)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Revoke a token (admin)")]
async fn revoke_token(
    State(p): State<Plane>,
    Auth(c): Auth,
    P((id, token)): P<(String, String)>,
) -> ApiResult<Response> {
    let (who, which) = (id.clone(), token.clone());
    mutate(p, c, move |s, cx| {
        accounts::revoke_token(s, cx, &id, &token)
    })
    .await?;
    log::info!(target: "privatelink::audit", "account {who}: token {which} revoked by the admin");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/v1/networks", request_body = accounts::CreateNetwork, responses((status = 201, body = crate::control::types::Network, description = "Create a network (admin)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Create a network (admin)")]
async fn create_network(
    State(p): State<Plane>,
    Auth(c): Auth,
    Body(req): Body<accounts::CreateNetwork>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| {
        accounts::create_network(s, cx, req.clone())
    })
    .await
    .map(created)
}

#[utoipa::path(get, path = "/v1/networks", responses((status = 200, body = Vec<crate::control::types::Network>, description = "Networks the caller may see"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Networks the caller may see")]
async fn list_networks(State(p): State<Plane>, Auth(c): Auth) -> ApiResult<Response> {
    Ok(ok(p.read(|s| accounts::list_networks(s, &c))))
}

#[utoipa::path(get, path = "/v1/networks/{id}", params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::Network, description = "One network"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "One network")]
async fn get_network(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    p.read(|s| accounts::network(s, &c, &id).cloned()).map(ok)
}

#[utoipa::path(delete, path = "/v1/networks/{id}", params(("id" = String, Path, description = "object id")), responses((status = 204, description = "Delete an unused network (admin)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Delete an unused network (admin)")]
async fn delete_network(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| accounts::delete_network(s, cx, &id))
        .await
        .map(|()| StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/v1/networks/{id}/subnets", request_body = accounts::CreateSubnet, params(("id" = String, Path, description = "object id")), responses((status = 201, body = crate::control::types::Subnet, description = "Create a subnet inside the network"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Create a subnet inside the network")]
async fn create_subnet(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<accounts::CreateSubnet>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| {
        accounts::create_subnet(s, cx, &id, req.clone())
    })
    .await
    .map(created)
}

#[utoipa::path(get, path = "/v1/networks/{id}/subnets", params(("id" = String, Path, description = "object id")), responses((status = 200, body = Vec<crate::control::types::Subnet>, description = "Subnets of a network"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Subnets of a network")]
async fn list_subnets(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    p.read(|s| accounts::list_subnets(s, &c, &id)).map(ok)
}

#[utoipa::path(delete, path = "/v1/networks/{id}/subnets/{subnet}", params(("id" = String, Path, description = "object id"), ("subnet" = String, Path, description = "subnet id")), responses((status = 204, description = "Delete a subnet without endpoints"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Delete a subnet without endpoints")]
async fn delete_subnet(
    State(p): State<Plane>,
    Auth(c): Auth,
    P((net, id)): P<(String, String)>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| accounts::delete_subnet(s, cx, &net, &id))
        .await
        .map(|()| StatusCode::NO_CONTENT.into_response())
}

// ---- services ----

#[utoipa::path(post, path = "/v1/services", request_body = services::CreateService, responses((status = 201, body = crate::control::types::Service, description = "Create an endpoint service"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Create an endpoint service")]
async fn create_service(
    State(p): State<Plane>,
    Auth(c): Auth,
    Body(req): Body<services::CreateService>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| services::create(s, cx, req.clone()))
        .await
        .map(created)
}

#[utoipa::path(get, path = "/v1/services", params(ServiceListQuery), responses((status = 200, body = Page, description = "The caller's services"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "The caller's services")]
async fn list_services(
    State(p): State<Plane>,
    Auth(c): Auth,
    Q(q): Q<ServiceListQuery>,
) -> ApiResult<Response> {
    let q = ListQuery::from(q);
    let items: Vec<_> = p.read(|s| {
        s.services
            .values()
            .filter(|v| owns(&c, &v.owner))
            .cloned()
            .collect()
    });
    page(items, &q, SERVICE_FIELDS)
}

#[utoipa::path(get, path = "/v1/services/{id}", params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::Service, description = "One service"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "One service")]
async fn get_service(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    p.read(|s| services::own(s, &c, &id).cloned()).map(ok)
}

#[utoipa::path(patch, path = "/v1/services/{id}", request_body = services::UpdateService, params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::Service, description = "Change name, tags, auto-accept, health check, private DNS, flow limits"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Change name, tags, auto-accept, health check, private DNS, flow limits")]
async fn update_service(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<services::UpdateService>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| services::update(s, cx, &id, req.clone()))
        .await
        .map(ok)
}

#[utoipa::path(delete, path = "/v1/services/{id}", params(("id" = String, Path, description = "object id")), responses((status = 204, description = "Delete a service without endpoints"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Delete a service without endpoints")]
async fn delete_service(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| services::delete(s, cx, &id))
        .await
        .map(|()| StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(put, path = "/v1/services/{id}/backends", request_body = services::Backends, params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::Service, description = "Replace the backend targets"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Replace the backend targets")]
async fn set_backends(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<services::Backends>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| {
        services::set_backends(s, cx, &id, req.clone())
    })
    .await
    .map(ok)
}

#[utoipa::path(post, path = "/v1/services/{id}/port-mappings", request_body = services::AddPortMappings, params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::Service, description = "Add port mappings (at most 50 per request; add-only)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Add port mappings (at most 50 per request; add-only)")]
async fn add_port_mappings(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<services::AddPortMappings>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| {
        services::add_port_mappings(s, cx, &id, req.clone())
    })
    .await
    .map(ok)
}

#[utoipa::path(get, path = "/v1/services/{id}/allowlist", params(("id" = String, Path, description = "object id")), responses((status = 200, body = Vec<crate::control::types::AllowEntry>, description = "The service's allowlist"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "The service's allowlist")]
async fn list_allowlist(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    p.read(|s| services::own(s, &c, &id).map(|v| v.allowlist.clone()))
        .map(ok)
}

#[utoipa::path(post, path = "/v1/services/{id}/allowlist", request_body = services::AllowReq, params(("id" = String, Path, description = "object id")), responses((status = 201, body = crate::control::types::Service, description = "Allow an account"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Allow an account")]
async fn allow(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<services::AllowReq>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| services::allow(s, cx, &id, req.clone()))
        .await
        .map(created)
}

#[utoipa::path(delete, path = "/v1/services/{id}/allowlist/{account}", params(("id" = String, Path, description = "object id"), ("account" = String, Path, description = "account id")), responses((status = 200, body = crate::control::types::Service, description = "Remove an account from the allowlist"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Remove an account from the allowlist")]
async fn disallow(
    State(p): State<Plane>,
    Auth(c): Auth,
    P((id, account)): P<(String, String)>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| services::disallow(s, cx, &id, &account))
        .await
        .map(ok)
}

#[utoipa::path(get, path = "/v1/services/{id}/verify", params(("id" = String, Path, description = "object id")), responses((status = 200, body = services::Verified, description = "Name, type and port mappings of a service, for any account"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Name, type and port mappings of a service, for any account")]
async fn verify(State(p): State<Plane>, Auth(c): Auth, P(id): P<String>) -> ApiResult<Response> {
    p.read(|s| services::verify(s, &c, &id)).map(ok)
}

#[utoipa::path(get, path = "/v1/services/{id}/health", params(("id" = String, Path, description = "object id")), responses((status = 200, body = HealthView, description = "Backend health as this node's checks see it"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Backend health as this node's checks see it")]
async fn service_health(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    let svc = p.read(|s| services::own(s, &c, &id).cloned())?;
    let targets: Vec<TargetView> = p
        .targets_health(&svc)
        .into_iter()
        .map(|(ip, healthy)| TargetView {
            ip: ip.to_string(),
            healthy,
        })
        .collect();
    let healthy = targets.iter().filter(|t| t.healthy).count();
    Ok(ok(HealthView {
        enabled: svc.health_check.enabled,
        healthy,
        total: targets.len(),
        targets,
    }))
}

#[utoipa::path(get, path = "/v1/services/{id}/endpoints", params(("id" = String, Path, description = "object id")), responses((status = 200, body = Vec<services::Connection>, description = "Endpoints connected to the service (no IPs)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Endpoints connected to the service (no IPs)")]
async fn connections(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    p.read(|s| services::connections(s, &c, &id)).map(ok)
}

/// Accept, reject or remove a batch of connections: a result per item.
async fn decide(
    p: Plane,
    c: Caller,
    id: String,
    req: services::EndpointIds,
    d: services::Decision,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| {
        services::decide(s, cx, &id, req.clone(), d)
    })
    .await
    .map(|r| ok(json!({ "results": r })))
}

#[utoipa::path(post, path = "/v1/services/{id}/accept", request_body = services::EndpointIds, params(("id" = String, Path, description = "object id")), responses((status = 200, body = Results, description = "Accept connections, a result per item"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Accept connections, a result per item")]
async fn accept(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<services::EndpointIds>,
) -> ApiResult<Response> {
    decide(p, c, id, req, services::Decision::Accept).await
}

#[utoipa::path(post, path = "/v1/services/{id}/reject", request_body = services::EndpointIds, params(("id" = String, Path, description = "object id")), responses((status = 200, body = Results, description = "Reject connections, a result per item"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Reject connections, a result per item")]
async fn reject(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<services::EndpointIds>,
) -> ApiResult<Response> {
    decide(p, c, id, req, services::Decision::Reject).await
}

#[utoipa::path(post, path = "/v1/services/{id}/remove", request_body = services::EndpointIds, params(("id" = String, Path, description = "object id")), responses((status = 200, body = Results, description = "Remove rejected or disconnected connections from the service, a result per item (the consumers keep their endpoints, in state Removed)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Remove connections, a result per item")]
async fn remove(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<services::EndpointIds>,
) -> ApiResult<Response> {
    decide(p, c, id, req, services::Decision::Remove).await
}

#[utoipa::path(post, path = "/v1/services/{id}/disallow", request_body = services::AllowRemoveReq, params(("id" = String, Path, description = "object id")), responses((status = 200, body = AccountResults, description = "Remove accounts from the allowlist, a result per item (their Available connections become Disconnected)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Remove accounts from the allowlist, a result per item")]
async fn disallow_many(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<services::AllowRemoveReq>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| {
        services::disallow_many(s, cx, &id, req.clone())
    })
    .await
    .map(|r| ok(json!({ "results": r })))
}

// ---- endpoints ----

#[utoipa::path(post, path = "/v1/endpoints", request_body = endpoints::CreateEndpoint, responses((status = 201, body = crate::control::types::Endpoint, description = "Create an endpoint (allowlist rule applies)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Create an endpoint (allowlist rule applies)")]
async fn create_endpoint(
    State(p): State<Plane>,
    Auth(c): Auth,
    Body(req): Body<endpoints::CreateEndpoint>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| endpoints::create(s, cx, req.clone()))
        .await
        .map(created)
}

#[utoipa::path(get, path = "/v1/endpoints", params(EndpointListQuery), responses((status = 200, body = Page, description = "The caller's endpoints"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "The caller's endpoints")]
async fn list_endpoints(
    State(p): State<Plane>,
    Auth(c): Auth,
    Q(q): Q<EndpointListQuery>,
) -> ApiResult<Response> {
    let q = ListQuery::from(q);
    let items: Vec<_> = p.read(|s| {
        s.endpoints
            .values()
            .filter(|v| owns(&c, &v.owner))
            .cloned()
            .collect()
    });
    page(items, &q, ENDPOINT_FIELDS)
}

#[utoipa::path(get, path = "/v1/endpoints/{id}", params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::Endpoint, description = "One endpoint"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "One endpoint")]
async fn get_endpoint(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    p.read(|s| endpoints::own(s, &c, &id).cloned()).map(ok)
}

#[utoipa::path(patch, path = "/v1/endpoints/{id}", request_body = endpoints::UpdateEndpoint, params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::Endpoint, description = "Change name or tags"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Change name or tags")]
async fn update_endpoint(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<endpoints::UpdateEndpoint>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| {
        endpoints::update(s, cx, &id, req.clone())
    })
    .await
    .map(ok)
}

#[utoipa::path(delete, path = "/v1/endpoints/{id}", params(("id" = String, Path, description = "object id")), responses((status = 204, description = "Delete an endpoint"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Delete an endpoint")]
async fn delete_endpoint(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| endpoints::delete(s, cx, &id))
        .await
        .map(|()| StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/v1/endpoints/{id}/security-groups", request_body = endpoints::BindingReq, params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::Endpoint, description = "Bind a security group at a priority"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Bind a security group at a priority")]
async fn bind(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<endpoints::BindingReq>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| endpoints::bind(s, cx, &id, req.clone()))
        .await
        .map(ok)
}

#[utoipa::path(put, path = "/v1/endpoints/{id}/security-groups", request_body = endpoints::Bindings, params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::Endpoint, description = "Replace all bindings (a new order, atomically)"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Replace all bindings (a new order, atomically)")]
async fn set_bindings(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<endpoints::Bindings>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| {
        endpoints::set_bindings(s, cx, &id, req.clone())
    })
    .await
    .map(ok)
}

#[utoipa::path(delete, path = "/v1/endpoints/{id}/security-groups/{sg}", params(("id" = String, Path, description = "object id"), ("sg" = String, Path, description = "security group id")), responses((status = 200, body = crate::control::types::Endpoint, description = "Unbind a security group"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Unbind a security group")]
async fn unbind(
    State(p): State<Plane>,
    Auth(c): Auth,
    P((id, sg)): P<(String, String)>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| endpoints::unbind(s, cx, &id, &sg))
        .await
        .map(ok)
}

// ---- security groups ----

#[utoipa::path(post, path = "/v1/security-groups", request_body = groups::CreateGroup, responses((status = 201, body = crate::control::types::SecurityGroup, description = "Create a security group"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Create a security group")]
async fn create_group(
    State(p): State<Plane>,
    Auth(c): Auth,
    Body(req): Body<groups::CreateGroup>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| groups::create(s, cx, req.clone()))
        .await
        .map(created)
}

#[utoipa::path(get, path = "/v1/security-groups", params(GroupListQuery), responses((status = 200, body = Page, description = "The caller's security groups"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "The caller's security groups")]
async fn list_groups(
    State(p): State<Plane>,
    Auth(c): Auth,
    Q(q): Q<GroupListQuery>,
) -> ApiResult<Response> {
    let q = ListQuery::from(q);
    let items: Vec<_> = p.read(|s| {
        s.security_groups
            .values()
            .filter(|v| owns(&c, &v.owner))
            .cloned()
            .collect()
    });
    page(items, &q, GROUP_FIELDS)
}

#[utoipa::path(get, path = "/v1/security-groups/{id}", params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::SecurityGroup, description = "One security group"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "One security group")]
async fn get_group(State(p): State<Plane>, Auth(c): Auth, P(id): P<String>) -> ApiResult<Response> {
    p.read(|s| groups::own(s, &c, &id).cloned()).map(ok)
}

#[utoipa::path(patch, path = "/v1/security-groups/{id}", request_body = groups::UpdateGroup, params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::SecurityGroup, description = "Change name or tags"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Change name or tags")]
async fn update_group(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<groups::UpdateGroup>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| groups::update(s, cx, &id, req.clone()))
        .await
        .map(ok)
}

#[utoipa::path(put, path = "/v1/security-groups/{id}/rules", request_body = groups::Rules, params(("id" = String, Path, description = "object id")), responses((status = 200, body = crate::control::types::SecurityGroup, description = "Replace the ordered rules"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Replace the ordered rules")]
async fn set_rules(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Body(req): Body<groups::Rules>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| {
        groups::set_rules(s, cx, &id, req.clone())
    })
    .await
    .map(ok)
}

#[utoipa::path(delete, path = "/v1/security-groups/{id}", params(("id" = String, Path, description = "object id")), responses((status = 204, description = "Delete an unbound security group"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Delete an unbound security group")]
async fn delete_group(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
) -> ApiResult<Response> {
    mutate(p, c, move |s, cx| groups::delete(s, cx, &id))
        .await
        .map(|()| StatusCode::NO_CONTENT.into_response())
}

// ---- export, revision ----

#[utoipa::path(get, path = "/v1/export/services.csv", params(ServiceExportQuery), responses((status = 200, body = String, content_type = "text/csv", description = "The caller's services as RFC 4180 CSV"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "The caller's services as RFC 4180 CSV")]
async fn export_services(
    State(p): State<Plane>,
    Auth(c): Auth,
    Q(q): Q<ServiceExportQuery>,
) -> ApiResult<Response> {
    let items: Vec<_> = p.read(|s| {
        s.services
            .values()
            .filter(|v| owns(&c, &v.owner))
            .cloned()
            .collect()
    });
    csv_response(items, &q.into(), SERVICE_FIELDS)
}

#[utoipa::path(get, path = "/v1/export/endpoints.csv", params(EndpointExportQuery), responses((status = 200, body = String, content_type = "text/csv", description = "The caller's endpoints as RFC 4180 CSV"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "The caller's endpoints as RFC 4180 CSV")]
async fn export_endpoints(
    State(p): State<Plane>,
    Auth(c): Auth,
    Q(q): Q<EndpointExportQuery>,
) -> ApiResult<Response> {
    let items: Vec<_> = p.read(|s| {
        s.endpoints
            .values()
            .filter(|v| owns(&c, &v.owner))
            .cloned()
            .collect()
    });
    csv_response(items, &q.into(), ENDPOINT_FIELDS)
}

/// Whose history.
#[derive(Clone, Copy, Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HistoryKind {
    Endpoint,
    Service,
}

#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// `realtime` (last hour, 10 s), `24h`, `7d` (1 h), or `FROM..TO` (unix seconds or RFC 3339).
    pub period: Option<String>,
    /// `10s`, `1m` (realtime only), `1h` or `1d`.
    pub granularity: Option<String>,
    /// A second period of the same length, returned side by side: its start (Unix seconds or
    /// RFC 3339), a `FROM..TO` (its FROM), or how long before the first (`24h`, `7d`).
    pub compare_to: Option<String>,
    /// `json` (default) or `csv`.
    pub format: Option<String>,
    /// `true`: only this node's own points (what one API server asks another); by default the
    /// points of every node that publishes where its API answers, summed.
    pub local: Option<bool>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct HistoryView {
    kind: String,
    id: String,
    granularity_secs: u64,
    from: u64,
    to: u64,
    points: Vec<crate::control::monitoring::Point>,
    /// The comparison period, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    compare: Option<HistoryWindow>,
    /// The nodes whose points are summed here, and any that could not be read.
    sources: Vec<crate::control::history::Source>,
}

/// A second window of history, side by side with the first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct HistoryWindow {
    from: u64,
    to: u64,
    points: Vec<crate::control::monitoring::Point>,
}

#[utoipa::path(get, path = "/v1/history/{kind}/{id}", params(("kind" = HistoryKind, Path, description = "endpoint or service"), ("id" = String, Path, description = "object id"), HistoryQuery), responses((status = 200, body = HistoryView, description = "Traffic history of an endpoint or service on this node"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Traffic history of an endpoint or service on this node")]
async fn history(
    State(p): State<Plane>,
    AuthToken(c, token): AuthToken,
    P((kind, id)): P<(HistoryKind, String)>,
    Q(q): Q<HistoryQuery>,
) -> ApiResult<Response> {
    let kind = match kind {
        HistoryKind::Endpoint => {
            p.read(|s| endpoints::own(s, &c, &id).map(drop))?;
            "endpoint".to_string()
        }
        HistoryKind::Service => {
            p.read(|s| services::own(s, &c, &id).map(drop))?;
            "service".to_string()
        }
    };
    let now = crate::control::clock::unix_secs();
    let period = crate::control::monitoring::Period::parse(
        q.period.as_deref().unwrap_or("realtime"),
        q.granularity.as_deref(),
        now,
    )
    .map_err(|m| ApiError::invalid("invalid_period", "period", m))?;
    let compare = match &q.compare_to {
        None => None,
        Some(from) => {
            let bad = |m: String| ApiError::invalid("invalid_period", "compare_to", m);
            let from = period.compare_start(from).map_err(bad)?;
            let spec = format!("{from}..{}", from + period.duration_secs());
            Some(
                crate::control::monitoring::Period::parse(
                    &spec,
                    Some(period.granularity_name()),
                    now,
                )
                .map_err(|m| bad(format!("compare_to: {m}")))?,
            )
        }
    };
    let local_only = q.local.unwrap_or(false);
    let (plane, k, i) = (p.clone(), kind.clone(), id.clone());
    let gathered = tokio::task::spawn_blocking(move || {
        crate::control::history::gather(
            &plane,
            &crate::control::history::Ask {
                kind: &k,
                id: &i,
                period: &period,
                compare: compare.as_ref(),
                token: &token,
                local_only,
            },
        )
    })
    .await
    .map_err(|e| ApiError::new(500, "internal", e.to_string()))??;
    let view = HistoryView {
        kind,
        id,
        granularity_secs: period.granularity,
        from: period.from,
        to: period.to,
        points: gathered.points,
        compare: compare
            .zip(gathered.compare)
            .map(|(c, points)| HistoryWindow {
                from: c.from,
                to: c.to,
                points,
            }),
        sources: gathered.sources,
    };
    if q.format.as_deref() == Some("csv") {
        let text = crate::control::monitoring::csv(
            &view.points,
            view.compare.as_ref().map(|c| c.points.as_slice()),
        );
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], text).into_response());
    }
    Ok(ok(view))
}

#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConnLogQuery {
    /// Records with a sequence number above this one (the `next_after` of the previous page).
    #[param(minimum = 0)]
    pub after: Option<u64>,
    /// At most this many records (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ConnLogPage {
    service_id: String,
    records: Vec<crate::control::local::ConnRecord>,
    /// `after` for the next page (the last record's sequence number, or `after` again when there
    /// was none).
    next_after: u64,
}

#[utoipa::path(get, path = "/v1/services/{id}/connections-log", params(("id" = String, Path, description = "service id"), ConnLogQuery), responses((status = 200, body = ConnLogPage, description = "The service's connection log on this node, oldest first"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "The service's connection log on this node")]
async fn connections_log(
    State(p): State<Plane>,
    Auth(c): Auth,
    P(id): P<String>,
    Q(q): Q<ConnLogQuery>,
) -> ApiResult<Response> {
    p.read(|s| services::own(s, &c, &id).map(drop))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid(
            "invalid_limit",
            "limit",
            "limit is 1 to 1000",
        ));
    }
    let after = q.after.unwrap_or(0);
    let h = p.node_local().ok_or_else(|| {
        ApiError::new(
            404,
            "no_connection_log",
            "this server keeps no connection log (only agents do)",
        )
    })?;
    let records = h.connections(&id, after, limit as usize).ok_or_else(|| {
        ApiError::new(
            404,
            "no_connection_log",
            "this node keeps no connection log",
        )
    })?;
    let next_after = records.last().map_or(after, |r| r.seq);
    Ok(ok(ConnLogPage {
        service_id: id,
        records,
        next_after,
    }))
}

/// Who the caller is.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Me {
    /// `admin` or `account`.
    role: &'static str,
    /// The account's id (absent for the admin).
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<String>,
    /// The account's name (absent for the admin).
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

#[utoipa::path(get, path = "/v1/me", responses((status = 200, body = Me, description = "The caller: admin, or an account with its id and name"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Who the caller is")]
async fn me(State(p): State<Plane>, Auth(c): Auth) -> ApiResult<Response> {
    Ok(ok(match c {
        ops::Caller::Admin => Me {
            role: "admin",
            account_id: None,
            name: None,
        },
        ops::Caller::Account(id) => {
            let name = p.read(|s| s.accounts.get(&id).map(|a| a.name.clone()));
            Me {
                role: "account",
                account_id: Some(id),
                name,
            }
        }
    }))
}

#[utoipa::path(get, path = "/v1/revision", responses((status = 200, body = Revision, description = "The current state revision"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "The current state revision")]
async fn revision(State(p): State<Plane>, Auth(_): Auth) -> ApiResult<Response> {
    Ok(ok(json!({ "revision": p.revision() })))
}

#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = NodesBody, description = "Each node: live or gone, its last contact, the revision its datapath applied and how far it lags"), (status = "4XX", body = ErrorBody, description = "error: stable code, message, offending field")), security(("bearer" = [])), summary = "Which nodes run which revision")]
async fn nodes(State(p): State<Plane>, Auth(c): Auth) -> ApiResult<Response> {
    ops::admin(&c)?;
    let nodes = tokio::task::spawn_blocking(move || p.nodes())
        .await
        .map_err(|e| ApiError::new(500, "internal", format!("nodes task failed: {e}")))?
        .map_err(|e| ApiError::new(503, "store_unavailable", e.to_string()))?;
    Ok(ok(NodesBody { nodes }))
}

/// `GET /v1/nodes`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct NodesBody {
    nodes: Vec<crate::control::store::NodeStatus>,
}

/// Documentation shapes (the handlers build these with `json!`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    code: String,
    message: String,
    /// The offending request field, when there is one.
    field: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Page {
    /// The selected fields of each object.
    #[schema(value_type = Vec<Object>)]
    items: Vec<Value>,
    page: usize,
    per_page: usize,
    total: usize,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Results {
    results: Vec<services::ItemResult>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AccountResults {
    results: Vec<services::AccountResult>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct HealthView {
    enabled: bool,
    healthy: usize,
    total: usize,
    targets: Vec<TargetView>,
}

/// A backend target; not yet checked counts as healthy (targets start healthy).
#[derive(Serialize, utoipa::ToSchema)]
pub struct TargetView {
    ip: String,
    healthy: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Revision {
    revision: u64,
}

struct BearerAuth;

/// What the derived schemas cannot say, said in the document: request bodies take no other
/// fields, tags are unique, and a security-group rule for `icmp` or `all` takes `ports: all`.
struct Contract;

/// The request bodies (each refuses unknown fields).
const REQUEST_BODIES: &[&str] = &[
    "CreateAccount",
    "CreateNetwork",
    "CreateSubnet",
    "PortMappingReq",
    "CreateService",
    "UpdateService",
    "Backends",
    "AddPortMappings",
    "AllowReq",
    "AllowRemoveReq",
    "RotateReq",
    "EndpointIds",
    "BindingReq",
    "CreateEndpoint",
    "UpdateEndpoint",
    "Bindings",
    "CreateGroup",
    "Rules",
    "UpdateGroup",
    "HealthCheck",
    "Tag",
];

impl utoipa::Modify for Contract {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{
            AllOfBuilder, ObjectBuilder, OneOfBuilder, RefOr, Schema, Type,
            schema::{AdditionalProperties, SchemaType},
        };
        let Some(components) = api.components.as_mut() else {
            return;
        };
        for (name, schema) in components.schemas.iter_mut() {
            let RefOr::T(Schema::Object(o)) = schema else {
                continue;
            };
            if REQUEST_BODIES.contains(&name.as_str()) {
                o.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
            }
            // Each `<x>_at` (Unix seconds) has its `<x>_time` (RFC 3339) beside it in answers.
            if !REQUEST_BODIES.contains(&name.as_str()) {
                let times: Vec<(String, bool)> = o
                    .properties
                    .iter()
                    .filter_map(|(k, p)| {
                        let stem = k.strip_suffix("_at")?;
                        let RefOr::T(Schema::Object(p)) = p else {
                            return None;
                        };
                        let nullable = matches!(&p.schema_type, SchemaType::Array(t) if t.contains(&Type::Null));
                        Some((format!("{stem}_time"), nullable))
                    })
                    .collect();
                for (field, nullable) in times {
                    let ty = if nullable {
                        SchemaType::from_iter([Type::String, Type::Null])
                    } else {
                        SchemaType::Type(Type::String)
                    };
                    o.properties.insert(
                        field,
                        RefOr::T(Schema::Object(
                            ObjectBuilder::new()
                                .schema_type(ty)
                                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                                    utoipa::openapi::KnownFormat::DateTime,
                                )))
                                .description(Some("the `_at` time beside it, in RFC 3339 (UTC)"))
                                .build(),
                        )),
                    );
                }
            }
            for unique in ["tags", "backends"] {
                if let Some(RefOr::T(Schema::Array(a))) = o.properties.get_mut(unique) {
                    a.unique_items = true;
                }
            }
        }
        // A rule: tcp/udp with any ports, or icmp/all with `all` only.
        let rule = |protocols: &[&str], ports: RefOr<Schema>| {
            ObjectBuilder::new()
                .property(
                    "protocol",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::Type(Type::String))
                        .enum_values(Some(protocols.iter().copied())),
                )
                .required("protocol")
                .property("ports", ports)
                .property(
                    "source",
                    RefOr::Ref(utoipa::openapi::Ref::from_schema_name("Cidr")),
                )
                .required("source")
                .property(
                    "action",
                    RefOr::Ref(utoipa::openapi::Ref::from_schema_name("RuleAction")),
                )
                .required("action")
                .property(
                    "description",
                    RefOr::Ref(utoipa::openapi::Ref::from_schema_name("Description")),
                )
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                .build()
        };
        let any_ports = RefOr::T(Schema::AllOf(
            AllOfBuilder::new()
                .item(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "PortRange",
                )))
                .build(),
        ));
        let only_all = RefOr::T(Schema::Object(
            ObjectBuilder::new()
                .schema_type(SchemaType::Type(Type::String))
                .enum_values(Some(["all"]))
                .build(),
        ));
        components.schemas.insert(
            "RuleReq".into(),
            RefOr::T(Schema::OneOf(
                OneOfBuilder::new()
                    .description(Some(
                        "An inbound rule: tcp or udp with ports `all`, `N` or `N-M` (default \
                         all); icmp or all with ports `all` only.",
                    ))
                    .item(rule(&["tcp", "udp"], any_ports))
                    .item(rule(&["icmp", "all"], only_all))
                    .build(),
            )),
        );
    }
}

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document, generated from the handlers and types above.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "privatelink control plane", description = "Endpoint services, endpoints, allowlists and security groups."),
    modifiers(&BearerAuth),
    components(schemas(HistoryKind, crate::wire::shapes::Cidr, crate::wire::shapes::PortRange, crate::wire::shapes::Description)),
)]
struct ApiDoc;

async fn fallback() -> ApiError {
    ApiError::new(404, "no_route", "no such API route")
}

/// Every API route with its OpenAPI operation, from one registration: the router serves exactly
/// what the document describes.
fn routes() -> OpenApiRouter<Plane> {
    OpenApiRouter::with_openapi(<ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(revision))
        .routes(routes!(me))
        .routes(routes!(nodes))
        .routes(routes!(create_account, list_accounts))
        .routes(routes!(delete_account))
        .routes(routes!(issue_token, list_tokens))
        .routes(routes!(rotate_token))
        .routes(routes!(revoke_token))
        .routes(routes!(create_network, list_networks))
        .routes(routes!(get_network, delete_network))
        .routes(routes!(create_subnet, list_subnets))
        .routes(routes!(delete_subnet))
        .routes(routes!(create_service, list_services))
        .routes(routes!(get_service, update_service, delete_service))
        .routes(routes!(set_backends))
        .routes(routes!(add_port_mappings))
        .routes(routes!(list_allowlist, allow))
        .routes(routes!(disallow))
        .routes(routes!(verify))
        .routes(routes!(connections))
        .routes(routes!(service_health))
        .routes(routes!(accept))
        .routes(routes!(reject))
        .routes(routes!(remove))
        .routes(routes!(disallow_many))
        .routes(routes!(create_endpoint, list_endpoints))
        .routes(routes!(get_endpoint, update_endpoint, delete_endpoint))
        .routes(routes!(bind, set_bindings))
        .routes(routes!(unbind))
        .routes(routes!(create_group, list_groups))
        .routes(routes!(get_group, update_group, delete_group))
        .routes(routes!(set_rules))
        .routes(routes!(export_services))
        .routes(routes!(export_endpoints))
        .routes(routes!(history))
        .routes(routes!(connections_log))
}

/// The OpenAPI document: the operations of [`routes`], as served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    contract(routes().split_for_parts().1)
}

/// The routes' document with what the derived schemas cannot say (they are registered with the
/// routes, so this comes after).
fn contract(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    utoipa::Modify::modify(&Contract, &mut doc);
    doc
}

/// Response header: the state revision the answer was made from.
pub const REVISION_HEADER: &str = "privatelink-revision";
/// Response header: `current`, or `stale` while a shared store is out of reach (the answer comes
/// from the last state this server had).
pub const STATE_HEADER: &str = "privatelink-state";

/// Says on every answer which revision it comes from and whether that may be stale.
async fn state_headers(
    State(p): State<Plane>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(REVISION_HEADER, axum::http::HeaderValue::from(p.revision()));
    let state = if p.store_reachable() {
        "current"
    } else {
        "stale"
    };
    h.insert(STATE_HEADER, axum::http::HeaderValue::from_static(state));
    r
}

/// The API routes, `/openapi.json`, the console (`/`, `/console/…`) and a JSON 404 for anything
/// else.
pub fn router(plane: Plane) -> Router {
    let (router, doc) = routes().split_for_parts();
    let doc = Arc::new(contract(doc));
    let api = router
        .route(
            "/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(&*doc).into_response() }
            }),
        )
        .fallback(fallback)
        .layer(axum::extract::DefaultBodyLimit::max(
            super::http::BODY_LIMIT,
        ))
        .with_state(plane.clone());
    // Outside the routes, so that a 405 already carries its `Allow` when it is made JSON.
    Router::new()
        .merge(super::console::router().with_state(plane.clone()))
        .fallback_service(api)
        .layer(axum::middleware::from_fn(super::http::json_errors))
        .layer(axum::middleware::from_fn_with_state(plane, state_headers))
}

/// Serves the API on `listener` with the default limits, plain HTTP, until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, plane: Plane) -> std::io::Result<()> {
    serve_with(listener, plane, Default::default(), None).await
}

/// Serves the API on `listener` with these limits, over TLS when an acceptor is given.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    plane: Plane,
    limits: super::serve::Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    super::serve::serve(listener, router(plane), limits, tls).await
}
