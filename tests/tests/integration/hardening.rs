//! The API against clients that misbehave or attack: slow and idle connections, lying lengths,
//! token guessing, TLS, and the files that hold secrets. Real `privatelink-agent api` processes on
//! loopback.
use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use privatelink_tests::api::{ADMIN, ApiProcess, set_mode};

/// Waits until `f` holds, up to `limit`.
fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the server closed `s` (EOF or reset; a read that would block means still open).
fn closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 512];
    let r = match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    };
    s.set_nonblocking(false).unwrap();
    r
}

/// A raw request on a new connection: the response head and body as text.
fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    while let Ok(n) = s.read(&mut b) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn slow_and_half_finished_clients_do_not_starve_the_api() {
    // An open-file limit of 1024, as systemd gives by default: 1,100 connections that never
    // finish their request line would have exhausted it.
    let api = ApiProcess::start(
        "slowloris",
        Some(1024),
        &["--header-read-timeout-secs", "30"],
    );
    let mut held: Vec<TcpStream> = (0..1100)
        .map(|_| {
            let mut s = TcpStream::connect(api.addr).unwrap();
            s.write_all(b"GET /v1/revision HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    let admin = api.client(ADMIN);
    let started = Instant::now();
    let r = admin.get("/v1/revision");
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a normal request waited {:?} behind 1,100 half-finished ones",
        started.elapsed()
    );
    assert!(
        !held.iter_mut().take(10).any(closed),
        "the half-finished requests are still within their 30 s"
    );
    drop(held);

    // Short limits: a header, a body and an idle connection each get their timeout, and the
    // connection cap makes the next client wait for a free slot instead of failing.
    let api = ApiProcess::start(
        "limits",
        None,
        &[
            "--header-read-timeout-secs",
            "1",
            "--body-read-timeout-secs",
            "1",
            "--idle-timeout-secs",
            "1",
            "--max-connections",
            "20",
        ],
    );
    let mut held: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(api.addr).unwrap();
            s.write_all(b"GET /v1/revision HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    // The 21st waits in the backlog until the header timeout frees a slot, then is answered.
    let r = api.client(ADMIN).get("/v1/revision");
    assert_eq!(r.status, 200, "{}", r.text);
    until(
        Duration::from_secs(10),
        "half-finished headers closed",
        || held.iter_mut().all(closed),
    );
    // Idle after a complete request: closed after the idle timeout.
    let mut s = TcpStream::connect(api.addr).unwrap();
    s.write_all(
        format!("GET /v1/revision HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut b = [0u8; 1024];
    let n = s.read(&mut b).unwrap();
    assert!(String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"));
    until(Duration::from_secs(10), "an idle connection closed", || {
        closed(&mut s)
    });
    // A declared length over the body limit: 413 at once, without waiting for a byte of it.
    let head = |len: u64| {
        format!(
            "POST /v1/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n{{}}"
        )
    };
    let r = raw(api.addr, head(99_999_999).as_bytes());
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert!(r.contains("\"code\":\"body_too_large\""), "{r}");
    // A length larger than the body sent: 408 once the body timeout passes, not a hang.
    let r = raw(api.addr, head(100).as_bytes());
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert!(r.contains("\"code\":\"body_timeout\""), "{r}");
    let revision = api.client(ADMIN).get("/v1/revision").body["revision"].clone();
    assert_eq!(revision, 0, "nothing was created");
}

#[test]
fn failed_authentication_is_limited_per_address() {
    let api = ApiProcess::start("authlimit", None, &["--auth-failures-per-minute", "5"]);
    let wrong = api.client("pl_not-a-real-token-0000000000");
    for i in 0..5 {
        let r = wrong.get("/v1/revision");
        assert_eq!((r.status, r.code()), (401, "unauthorized"), "attempt {i}");
    }
    let r = wrong.get("/v1/revision");
    assert_eq!(
        (r.status, r.code()),
        (429, "too_many_auth_failures"),
        "{}",
        r.text
    );
    // The right token from the same address waits too: a guesser cannot tell a hit.
    let r = api.client(ADMIN).get("/v1/revision");
    assert_eq!(r.status, 429, "{}", r.text);
    let head = raw(api.addr, b"GET /v1/revision HTTP/1.1\r\nHost: x\r\n\r\n");
    let retry: u64 = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after: ")
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no Retry-After: {head}"))
        .trim()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
}

#[test]
fn tls_serves_the_api_and_secrets_stay_private() {
    let dir = std::env::temp_dir().join(format!("privatelink-tlsfiles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let api = ApiProcess::start(
        "tls",
        None,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let curl = |scheme: &str| {
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&cert)
            .args(["-H", &format!("Authorization: Bearer {ADMIN}")])
            .arg(format!("{scheme}://{}/v1/revision", api.addr))
            .output()
            .expect("curl")
    };
    let out = curl("https");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"revision\""),
        "https: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!curl("http").status.success(), "plain HTTP on the TLS port");
    assert!(api.log().contains("https://"), "{}", api.log());
    assert!(!api.log().contains("plain HTTP"), "{}", api.log());
    drop(api);
    // Files that are not PEM: the server refuses to start and names the file.
    std::fs::write(dir.join("junk.pem"), "junk").unwrap();
    let junk = dir.join("junk.pem");
    let e = ApiProcess::try_start(
        "tls-junk",
        None,
        &[
            "--tls-cert",
            junk.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .err()
    .expect("started with a junk certificate");
    assert!(e.contains("junk.pem"), "{e}");

    // The admin token file must be the owner's alone; the state file is created 0600.
    let api = ApiProcess::start("modes", None, &[]);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(api.dir.join("state.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "state.db mode {mode:o}");
    let token = api.dir.join("admin-token");
    set_mode(&token, 0o644);
    let out = Command::new(privatelink_tests::agent_bin("privatelink-agent"))
        .args(["api", "--listen", "127.0.0.1:0", "--store"])
        .arg(api.dir.join("other.db"))
        .arg("--admin-token-file")
        .arg(&token)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("chmod 600"), "{err}");
    assert!(!api.dir.join("other.db").exists(), "nothing was created");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn token_rotation_revocation_and_account_deletion_are_in_the_audit_log() {
    let api = ApiProcess::start("audit", None, &[]);
    let admin = api.client(ADMIN);
    admin.ok(
        "POST",
        "/v1/accounts",
        serde_json::json!({ "id": "audited", "name": "audited" }),
    );
    let r = admin.ok(
        "POST",
        "/v1/accounts/audited/tokens/rotate",
        serde_json::json!({ "grace_secs": 60 }),
    );
    let tok = r["previous"][0]["id"].as_str().unwrap().to_string();
    let r = admin.call(
        "DELETE",
        &format!("/v1/accounts/audited/tokens/{tok}"),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(
        admin.call("DELETE", "/v1/accounts/audited", None).status,
        204
    );
    until(Duration::from_secs(5), "three audit lines", || {
        let log = api.log();
        log.contains("privatelink::audit")
            && log.contains("account audited: token rotated")
            && log.contains(&format!("token {tok} revoked"))
            && log.contains("account audited deleted")
    });
}
