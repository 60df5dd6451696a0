//! A control-plane API server on loopback for tests, and a small JSON client.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use privatelink_agent::control::{api::serve, plane::ControlPlane, store::SqliteStore};
use serde_json::Value;

pub const ADMIN: &str = "admin-token-for-tests";

/// A running API server with its own SQLite file; stopped and removed on drop.
pub struct Server {
    pub addr: SocketAddr,
    pub plane: Arc<ControlPlane>,
    pub db: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    pub fn start(name: &str) -> Self {
        let db = std::env::temp_dir().join(format!("privatelink-{name}-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&db);
        let store = SqliteStore::open(&db).expect("open store");
        let plane = Arc::new(ControlPlane::open(Box::new(store), ADMIN).expect("control plane"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind loopback");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(serve(listener, plane.clone()));
        Server {
            addr,
            plane,
            db,
            runtime: Some(runtime),
        }
    }

    pub fn client(&self, token: &str) -> Client {
        Client {
            base: format!("http://{}", self.addr),
            token: token.to_string(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", self.db.display()));
        }
    }
}

/// A response: status and parsed JSON body (Null when empty or not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl Reply {
    /// The error code of an error reply.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

pub struct Client {
    base: String,
    token: String,
}

impl Client {
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        self.raw(method, path, body.map(|b| b.to_string()))
    }

    pub fn raw(&self, method: &str, path: &str, body: Option<String>) -> Reply {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let resp = match (method, body) {
            ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => agent.delete(&url).header("Authorization", &auth).call(),
            (m, b) => {
                let req = match m {
                    "POST" => agent.post(&url),
                    "PUT" => agent.put(&url),
                    "PATCH" => agent.patch(&url),
                    other => panic!("method {other}"),
                };
                req.header("Authorization", &auth)
                    .header("Content-Type", "application/json")
                    .send(b.unwrap_or_default())
            }
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply { status, body, text }
    }

    /// GET with this client's token under another spelling of the scheme (`bearer`, `Basic`):
    /// the status.
    pub fn get_as(&self, scheme: &str, path: &str) -> u16 {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("{scheme} {}", self.token))
            .call()
            .map(|r| r.status().as_u16())
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Value) -> Reply {
        self.call("POST", path, Some(&body))
    }

    /// POST that must succeed with 201 or 200; returns the body.
    pub fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let r = self.call(method, path, Some(&body));
        assert!(
            r.status == 200 || r.status == 201,
            "{method} {path} {body}: {} {}",
            r.status,
            r.text
        );
        r.body
    }
}

/// A `privatelink-agent api` process on a loopback port with its own SQLite file and admin token,
/// started with `extra` arguments (and optionally under a lower open-file limit); killed and
/// removed on drop.
pub struct ApiProcess {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    child: std::process::Child,
}

impl ApiProcess {
    pub fn start(name: &str, nofile: Option<u64>, extra: &[&str]) -> Self {
        Self::try_start(name, nofile, extra).unwrap_or_else(|log| panic!("{name}: {log}"))
    }

    /// Starts it and waits until it answers; `Err` with its log when it exits instead.
    pub fn try_start(name: &str, nofile: Option<u64>, extra: &[&str]) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("privatelink-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let token = dir.join("admin-token");
        privatelink_agent::control::store::write_private(&token, format!("{ADMIN}\n"))
            .expect("token file");
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("addr")
        };
        let bin = crate::agent_bin("privatelink-agent");
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = std::process::Command::new("prlimit");
                c.arg(format!("--nofile={n}:{}", n * 8)).arg(&bin);
                c
            }
            None => std::process::Command::new(&bin),
        };
        let log = std::fs::File::create(dir.join("api.log")).expect("log");
        let child = cmd
            .args(["api", "--listen", &addr.to_string()])
            .arg("--store")
            .arg(dir.join("state.db"))
            .arg("--admin-token-file")
            .arg(&token)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start privatelink-agent api");
        let mut p = ApiProcess { addr, dir, child };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = p.child.try_wait() {
                return Err(p.log());
            }
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(p);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the API did not come up:\n{}",
                p.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("api.log")).unwrap_or_default()
    }

    pub fn client(&self, token: &str) -> Client {
        Client {
            base: format!("http://{}", self.addr),
            token: token.to_string(),
        }
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sets a file's permission bits.
pub fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
