//! The web console: one page and its script and style, compiled into the binary (nothing is
//! fetched at run time, no JavaScript toolchain builds it), served by every API server at `/`.
//! The page drives the same REST API as the CLI, signed in through a console session
//! ([`super::session`]): a tenant sees exactly what the API shows that tenant.
use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{ConnectInfo, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use serde_json::json;

use super::{
    error::ApiError,
    http::Body,
    ops::Caller,
    plane::ControlPlane,
    serve::OverTls,
    session::{COOKIE, cookie},
};

type Plane = Arc<ControlPlane>;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// What a console page may load and where it may be shown: only from this origin, never in a
/// frame (no clickjacking), no inline script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes: `/`, its assets and `/console/session`.
pub fn router() -> Router<Plane> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/console/session",
            get(session).post(sign_in).delete(sign_out),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    secure_headers(h);
    r
}

fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// Refuses a request another site's page made: its `Origin` is not this server, or the browser
/// says it is cross-site. (A session cookie is `SameSite=Strict` already; this also stops another
/// site from signing a browser in to the attacker's account.)
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let cross = || {
        ApiError::new(
            403,
            "cross_origin",
            "the console's session can only be started or ended from the console's own page",
        )
    };
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s == "cross-site" || s == "same-site")
    {
        return Err(cross());
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().map_err(|_| cross())?;
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(cross)?;
        let origin_host = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"))
            .ok_or_else(cross)?;
        if !origin_host.eq_ignore_ascii_case(host) {
            return Err(cross());
        }
    }
    Ok(())
}

/// Who signed in, as `/v1/me` says it, and the session's CSRF token.
fn identity(plane: &ControlPlane, caller: &Caller, csrf: String) -> serde_json::Value {
    match caller {
        Caller::Admin => json!({ "role": "admin", "csrf": csrf }),
        Caller::Account(id) => {
            let name = plane.read(|s| s.accounts.get(id).map(|a| a.name.clone()));
            json!({ "role": "account", "account_id": id, "name": name, "csrf": csrf })
        }
    }
}

fn no_store(mut r: Response) -> Response {
    secure_headers(r.headers_mut());
    r
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    token: String,
}

/// `POST /console/session {"token": …}`: a token an API request would accept starts a session.
/// Failures count against the client address as failed API authentications do.
async fn sign_in(
    State(p): State<Plane>,
    connected: Option<axum::Extension<ConnectInfo<std::net::SocketAddr>>>,
    tls: Option<axum::Extension<OverTls>>,
    headers: HeaderMap,
    Body(req): Body<SignIn>,
) -> Result<Response, ApiError> {
    same_origin(&headers)?;
    let (caller, token) =
        p.authenticate_from(connected.map(|c| c.0.0.ip()), || Ok(Some(req.token)))?;
    // A session already in this browser ends: one browser, one identity.
    if let Some(old) = cookie(&headers, COOKIE) {
        p.sessions().end(&old);
    }
    let started = p.sessions().start(&token);
    let who = match &caller {
        Caller::Admin => "admin".to_string(),
        Caller::Account(a) => format!("account {a}"),
    };
    log::info!(target: "privatelink::audit", "console sign-in: {who}");
    let r = (
        StatusCode::CREATED,
        Json(identity(&p, &caller, started.csrf)),
    );
    Ok(with_cookie(
        r.into_response(),
        &started.id,
        tls.is_some_and(|t| t.0.0),
    ))
}

/// `r` setting the session cookie to `value` (scripts cannot read it, other sites' requests do
/// not carry it; `Secure` over TLS; an empty value expires it), never cached.
fn with_cookie(mut r: Response, value: &str, secure: bool) -> Response {
    let mut c = cookie::Cookie::build((COOKIE, value))
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(secure)
        .path("/");
    if value.is_empty() {
        c = c.max_age(cookie::time::Duration::ZERO);
    }
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&c.build().to_string()).expect("a hex cookie value"),
    );
    no_store(r)
}

/// `GET /console/session`: who this browser's session is, and its CSRF token (a reloaded page
/// asks again; no other origin can read the answer).
async fn session(State(p): State<Plane>, headers: HeaderMap) -> Result<Response, ApiError> {
    let id = cookie(&headers, COOKIE).ok_or_else(super::session::expired)?;
    let (token, csrf) = p.sessions().resume(&id)?;
    // A revoked or expired token ends the session here too.
    let caller = p.authenticate(Some(&token)).inspect_err(|_| {
        p.sessions().end(&id);
    })?;
    Ok(no_store(Json(identity(&p, &caller, csrf)).into_response()))
}

/// `DELETE /console/session` (with the CSRF token): signs out and clears the cookie.
async fn sign_out(
    State(p): State<Plane>,
    tls: Option<axum::Extension<OverTls>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    same_origin(&headers)?;
    if let Some(id) = cookie(&headers, COOKIE) {
        let csrf = headers
            .get(super::session::CSRF_HEADER)
            .and_then(|v| v.to_str().ok());
        p.sessions().token(&id, csrf)?;
        p.sessions().end(&id);
    }
    Ok(with_cookie(
        StatusCode::NO_CONTENT.into_response(),
        "",
        tls.is_some_and(|t| t.0.0),
    ))
}
