//! The web console: its session boundary attacked over real HTTP (forged, replayed, cross-site
//! and cross-tenant requests), and the console itself driven in a real browser (Debian's chromium
//! through chromium-driver over WebDriver) against a running agent with its datapath.
use privatelink_tests::api::{ADMIN, Server};
use serde_json::{Value, json};

mod browser;

/// A raw answer: status, headers that matter here, JSON body.
struct Raw {
    status: u16,
    set_cookie: Option<String>,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Raw {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request to `server` with exactly these headers (no token unless one is among them).
fn raw(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Raw {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://{}{path}", server.addr);
    let mut req = ureq::http::Request::builder().method(method).uri(&url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = match body {
        Some(b) => agent.run(req.body(b.to_string()).unwrap()),
        None => agent.run(req.body(()).unwrap()),
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let set_cookie = resp
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    Raw {
        status,
        set_cookie,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

/// A signed-in browser as the server sees it: the cookie and the CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

fn sign_in(server: &Server, token: &str) -> Session {
    let r = raw(
        server,
        "POST",
        "/console/session",
        &[("content-type", "application/json")],
        Some(&json!({ "token": token }).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let set = r.set_cookie.expect("a session cookie");
    Session {
        cookie: set.split(';').next().unwrap().to_string(),
        csrf: r.body["csrf"].as_str().unwrap().to_string(),
    }
}

impl Session {
    fn call(&self, server: &Server, method: &str, path: &str, body: Option<Value>) -> Raw {
        let body = body.map(|b| b.to_string());
        let mut h = vec![
            ("cookie", self.cookie.as_str()),
            ("x-csrf-token", self.csrf.as_str()),
        ];
        if body.is_some() {
            h.push(("content-type", "application/json"));
        }
        raw(server, method, path, &h, body.as_deref())
    }
}

#[test]
fn the_console_session_resists_forged_replayed_cross_site_and_cross_tenant_requests() {
    let server = Server::start("console-session");
    let admin = server.client(ADMIN);
    let mut tokens = Vec::new();
    for id in ["1000000001", "1000000002"] {
        let a = admin.ok("POST", "/v1/accounts", json!({ "id": id, "name": id }));
        tokens.push(a["token"].as_str().unwrap().to_string());
    }
    let net = admin.ok(
        "POST",
        "/v1/networks",
        json!({ "name": "c1-vpc", "owner": "1000000001", "cidrs": ["198.18.0.0/16"] }),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let c1 = server.client(&tokens[0]);

    // The page is served with a policy that keeps other origins' script and frames out.
    let page = raw(&server, "GET", "/", &[], None);
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert_eq!(
        raw(&server, "GET", "/console/app.js", &[], None).status,
        200
    );

    // Sign-in: a form post from another site is not JSON; another origin is refused; a wrong
    // token is 401. None of them sets a cookie.
    let form = raw(
        &server,
        "POST",
        "/console/session",
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(&format!("token={}", tokens[0])),
    );
    assert_eq!((form.status, form.set_cookie.is_none()), (415, true));
    for (h, v) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = raw(
            &server,
            "POST",
            "/console/session",
            &[("content-type", "application/json"), (h, v)],
            Some(&json!({ "token": tokens[0] }).to_string()),
        );
        assert_eq!(
            (r.status, r.code(), r.set_cookie.is_none()),
            (403, "cross_origin", true),
            "{h}: {v}"
        );
    }
    let wrong = raw(
        &server,
        "POST",
        "/console/session",
        &[("content-type", "application/json")],
        Some(r#"{"token":"pl_not-a-token"}"#),
    );
    assert_eq!((wrong.status, wrong.set_cookie.is_none()), (401, true));
    let extra = raw(
        &server,
        "POST",
        "/console/session",
        &[("content-type", "application/json")],
        Some(&json!({ "token": tokens[0], "role": "admin" }).to_string()),
    );
    assert_eq!((extra.status, extra.code()), (400, "unknown_field"));

    // A session: the cookie is HttpOnly, SameSite=Strict, for the whole origin; the token is
    // not in it.
    let same_origin = format!("http://{}", server.addr);
    let r = raw(
        &server,
        "POST",
        "/console/session",
        &[
            ("content-type", "application/json"),
            ("origin", &same_origin),
            ("sec-fetch-site", "same-origin"),
        ],
        Some(&json!({ "token": tokens[0] }).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let set = r.set_cookie.clone().unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    assert!(!set.contains(&tokens[0]) && !r.body.to_string().contains(&tokens[0]));
    assert_eq!(r.body["account_id"], "1000000001");
    let s1 = Session {
        cookie: set.split(';').next().unwrap().to_string(),
        csrf: r.body["csrf"].as_str().unwrap().to_string(),
    };
    assert_eq!(s1.csrf.len(), 64);

    // The cookie alone, or with a wrong CSRF token, does nothing; with it, the API answers.
    let before = c1.get("/v1/security-groups").body["total"].clone();
    let create = json!({ "name": "web", "rules": [] }).to_string();
    for csrf in [None, Some("00"), Some(&"0".repeat(64)[..])] {
        let mut h = vec![
            ("cookie", s1.cookie.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(c) = csrf {
            h.push(("x-csrf-token", c));
        }
        let r = raw(&server, "POST", "/v1/security-groups", &h, Some(&create));
        assert_eq!((r.status, r.code()), (403, "csrf"), "{csrf:?}");
        let r = raw(&server, "GET", "/v1/endpoints", &h[..1], None);
        assert_eq!(r.status, 403);
    }
    assert_eq!(
        c1.get("/v1/security-groups").body["total"],
        before,
        "refused writes change nothing"
    );
    let made = s1.call(
        &server,
        "POST",
        "/v1/security-groups",
        Some(json!({ "name": "web", "rules": [] })),
    );
    assert_eq!(made.status, 201, "{}", made.body);
    assert_eq!(
        s1.call(&server, "GET", "/v1/me", None).body["account_id"],
        "1000000001"
    );

    // A forged session id, or one of another format, is unknown.
    for forged in [
        format!("pl_session={}", "ab".repeat(32)),
        "pl_session=".to_string(),
        format!("pl_session={}", s1.csrf),
    ] {
        let r = raw(
            &server,
            "GET",
            "/v1/me",
            &[("cookie", &forged), ("x-csrf-token", &s1.csrf)],
            None,
        );
        assert_eq!((r.status, r.code()), (401, "session_expired"), "{forged}");
    }

    // Another tenant's session: its CSRF token does not fit the first session, and it sees
    // none of the first tenant's objects.
    let s2 = sign_in(&server, &tokens[1]);
    let mixed = Session {
        cookie: s1.cookie.clone(),
        csrf: s2.csrf.clone(),
    };
    assert_eq!(mixed.call(&server, "GET", "/v1/me", None).code(), "csrf");
    let sg = made.body["id"].as_str().unwrap();
    assert_eq!(
        s2.call(&server, "GET", &format!("/v1/security-groups/{sg}"), None)
            .status,
        404
    );
    assert_eq!(
        s2.call(&server, "GET", "/v1/security-groups", None).body["total"],
        0
    );
    assert_eq!(
        s2.call(&server, "GET", &format!("/v1/networks/{net}"), None)
            .status,
        404
    );
    // A bearer token wins over a cookie: the request is the bearer's.
    let r = raw(
        &server,
        "GET",
        "/v1/me",
        &[
            ("cookie", &s1.cookie),
            ("authorization", &format!("Bearer {}", tokens[1])),
        ],
        None,
    );
    assert_eq!(r.body["account_id"], "1000000002");
    // A reloaded page asks who it is and gets the same CSRF token back.
    let again = raw(
        &server,
        "GET",
        "/console/session",
        &[("cookie", &s1.cookie)],
        None,
    );
    assert_eq!(
        (again.status, again.body["csrf"].as_str()),
        (200, Some(s1.csrf.as_str()))
    );

    // Signing out needs the CSRF token too; afterwards the cookie is replayed in vain.
    let out = raw(
        &server,
        "DELETE",
        "/console/session",
        &[("cookie", &s1.cookie)],
        None,
    );
    assert_eq!(out.status, 403);
    assert_eq!(s1.call(&server, "GET", "/v1/me", None).status, 200);
    let out = s1.call(&server, "DELETE", "/console/session", None);
    assert_eq!(out.status, 204);
    assert!(out.set_cookie.unwrap().contains("Max-Age=0"));
    assert_eq!(
        s1.call(&server, "GET", "/v1/me", None).code(),
        "session_expired"
    );
    assert_eq!(
        raw(
            &server,
            "GET",
            "/console/session",
            &[("cookie", &s1.cookie)],
            None
        )
        .status,
        401
    );

    // Revoking the token ends its sessions at once.
    assert_eq!(s2.call(&server, "GET", "/v1/me", None).status, 200);
    let toks = admin.get("/v1/accounts/1000000002/tokens").body;
    for t in toks.as_array().unwrap() {
        let id = t["id"].as_str().unwrap();
        assert_eq!(
            admin
                .call(
                    "DELETE",
                    &format!("/v1/accounts/1000000002/tokens/{id}"),
                    None
                )
                .status,
            204
        );
    }
    assert_eq!(s2.call(&server, "GET", "/v1/me", None).status, 401);
    assert_eq!(
        raw(
            &server,
            "GET",
            "/console/session",
            &[("cookie", &s2.cookie)],
            None
        )
        .status,
        401
    );
}
