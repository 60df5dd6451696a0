//! The console in a real browser: chromium (headless, through chromium-driver) drives the page a
//! running agent serves, as a provider and two consumers, with real traffic through the datapath
//! (curl to python's HTTP server behind the endpoint). Screenshots of each page go to
//! `target/console-screenshots/` (test artefacts, not committed).
use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator};
use privatelink_agent::testkit::demo::{BACKEND, ENDPOINT};
use privatelink_tests::{
    privileged,
    world::{API, Proc, World, api, node_get, sample, world_with},
};
use serde_json::{Value, json};

const DRIVER: &str = "127.0.0.1:9515";

/// The calling thread inside a namespace until dropped (also when a panic unwinds): the browser
/// and its driver listen on the node's loopback, where the agent's API is.
struct Inside(File);

impl Inside {
    fn enter(ns: &str) -> Inside {
        let home = File::open("/proc/thread-self/ns/net").expect("this thread's namespace");
        let there = File::open(format!("/run/netns/{ns}")).expect("the node namespace");
        nix::sched::setns(there.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        Inside(home)
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = nix::sched::setns(self.0.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
    }
}

/// The browser, the console's address and where screenshots and downloads go.
struct Ui {
    c: Client,
    base: String,
    shots: PathBuf,
    downloads: PathBuf,
}

type R<T = ()> = Result<T, fantoccini::error::CmdError>;

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false))
        && v.as_str() != Some("")
        && v.as_f64() != Some(0.0)
}

impl Ui {
    /// Opens `hash` and waits for the page to be rendered for it.
    async fn go(&self, hash: &str) -> R {
        self.c
            .execute("document.body.dataset.route = 'leaving'", vec![])
            .await
            .ok();
        let url = format!("{}/{hash}", self.base);
        // The same address again is no navigation: load the page anew.
        if self.c.current_url().await?.as_str() == url {
            self.c.refresh().await?;
        } else {
            self.c.goto(&url).await?;
        }
        self.until(
            &format!("the page {hash}"),
            "return document.body.dataset.route === location.hash",
            vec![],
        )
        .await;
        Ok(())
    }

    /// Polls `js` (a function body returning a value) until it is truthy, for at most 20 s.
    async fn until(&self, what: &str, js: &str, args: Vec<Value>) -> Value {
        let t = Instant::now();
        loop {
            match self.c.execute(js, args.clone()).await {
                Ok(v) if truthy(&v) => return v,
                other => {
                    if t.elapsed() > Duration::from_secs(20) {
                        let text = self.text().await;
                        let at = self
                            .c
                            .execute(
                                "return [location.href, document.body.dataset.route || null]",
                                vec![],
                            )
                            .await;
                        panic!(
                            "{what}: not within 20 s (last: {other:?}; at {at:?})\npage:\n{text}"
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn text(&self) -> String {
        self.c
            .execute("return document.body.innerText", vec![])
            .await
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    async fn fill(&self, css: &str, text: &str) -> R {
        let e = self.c.wait().for_element(Locator::Css(css)).await?;
        e.clear().await?;
        e.send_keys(text).await
    }

    async fn select(&self, css: &str, value: &str) -> R {
        let e = self.c.wait().for_element(Locator::Css(css)).await?;
        e.select_by_value(value).await
    }

    /// Clicks the button whose text is `label` (the first one, or the one inside `within`).
    async fn button(&self, label: &str) -> R {
        let xpath = format!("//button[normalize-space()='{label}']");
        self.c
            .wait()
            .for_element(Locator::XPath(&xpath))
            .await?
            .click()
            .await
    }

    async fn click(&self, css: &str) -> R {
        self.c
            .wait()
            .for_element(Locator::Css(css))
            .await?
            .click()
            .await
    }

    async fn hash(&self) -> String {
        self.c
            .current_url()
            .await
            .map(|u| u.fragment().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    async fn shot(&self, name: &str) {
        let png = self.c.screenshot().await.expect("screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).expect("save screenshot");
    }

    async fn sign_in(&self, token: &str) {
        self.go("#/").await.unwrap();
        self.fill("input[type=password]", token).await.unwrap();
        self.button("Sign in").await.unwrap();
        self.until(
            "signed in",
            "return document.querySelector('#who button') !== null",
            vec![],
        )
        .await;
    }

    async fn sign_out(&self) {
        self.button("Sign out").await.unwrap();
        self.until(
            "signed out",
            "return document.querySelector('input[type=password]') !== null",
            vec![],
        )
        .await;
    }

    /// The downloaded file `name`, once it is complete.
    async fn downloaded(&self, name: &str) -> String {
        let path = self.downloads.join(name);
        let t = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&path)
                && !self.downloads.join(format!("{name}.crdownload")).exists()
            {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no download {name}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The service's traffic counter on the agent's `/metrics` (forward or reply bytes).
fn service_bytes(w: &World, svc: &str, direction: &str) -> u64 {
    let text = node_get(&w.topo, "http://127.0.0.1:9464/metrics").unwrap_or_default();
    sample(
        &text,
        "privatelink_service_bytes_total",
        &[("service_id", svc), ("direction", direction)],
    )
    .unwrap_or(0.0) as u64
}

fn curl_ok(w: &World) -> bool {
    w.topo.consumers[0]
        .command("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "2",
            "-w",
            "%{http_code}",
            &format!("http://{ENDPOINT}/blob"),
        ])
        .output()
        .is_ok_and(|o| o.stdout == b"200")
}

fn artefacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_provider_and_a_consumer_do_everything_in_the_browser_and_see_their_own_traffic() {
    if !privileged("a_provider_and_a_consumer_do_everything_in_the_browser") {
        return;
    }
    let (w, _agent) = world_with("console-ui", "[history]\nsample_interval = 1\n");
    let (provider, c1, c2) = (&w.tokens[0], &w.tokens[1], &w.tokens[2]);

    // python's HTTP server behind the service, a 200 kB file to fetch.
    let site = w.dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("blob"), vec![b'x'; 200_000]).unwrap();
    let _web = Proc(
        w.topo
            .provider
            .command("python3")
            .args(["-m", "http.server", "8080", "--bind", &BACKEND.to_string()])
            .current_dir(&site)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 http.server"),
    );
    // The browser's driver in the node namespace.
    let downloads = w.dir.join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let _driver = Proc(
        w.topo
            .node
            .command("chromedriver")
            .args([&format!("--port={}", DRIVER.rsplit_once(':').unwrap().1)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian: chromium-driver)"),
    );
    let t = Instant::now();
    while node_get(&w.topo, &format!("http://{DRIVER}/status")).is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let _inside = Inside::enter(w.topo.node.name());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,900", format!("--user-data-dir={}", w.dir.join("chromium").display())],
                "prefs": { "download.default_directory": downloads.display().to_string(),
                    "download.prompt_for_download": false },
            }),
        );
        let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://{DRIVER}"))
            .await
            .expect("a WebDriver session with chromium");
        let ui = Ui {
            c,
            base: format!("http://{API}"),
            shots: artefacts(),
            downloads: downloads.clone(),
        };
        drive(&ui, &w, provider, c1, c2).await;
        let _ = ui.c.close().await;
    });
}

async fn drive(ui: &Ui, w: &World, provider: &str, c1: &str, c2: &str) {
    // ---- The admin: accounts (a new one, its token shown once and working), networks with
    // their subnets, and the node with the revision it applied.
    ui.sign_in(privatelink_tests::world::ADMIN).await;
    ui.go("#/accounts").await.unwrap();
    ui.fill("input[name=id]", "1000000009").await.unwrap();
    ui.fill("input[name=name]", "ops").await.unwrap();
    ui.button("Create account").await.unwrap();
    let token = ui
        .until(
            "the new account's token",
            "const t = document.querySelector('code.token'); return t && t.textContent",
            vec![],
        )
        .await;
    let (status, me) = api(&w.topo, token.as_str().unwrap(), "GET", "/v1/me", None);
    assert_eq!((status, &me["account_id"]), (200, &json!("1000000009")));
    assert!(
        ui.text().await.contains("1000000001"),
        "every account is listed"
    );
    ui.go(&format!("#/networks/{}", w.vpcs[1].0)).await.unwrap();
    ui.until(
        "the network's subnet",
        "return document.querySelector(`tr[data-id='${arguments[0]}']`)",
        vec![json!(w.vpcs[1].1)],
    )
    .await;
    // The node applies the new account's revision and reports it; the page shows it (reloaded
    // until then).
    let revision = api(&w.topo, provider, "GET", "/v1/revision", None).1["revision"]
        .as_u64()
        .unwrap();
    let t = Instant::now();
    loop {
        ui.go("#/nodes").await.unwrap();
        let row = ui
            .until(
                "the node's row",
                "const r = document.querySelector('tr[data-id=\"test-node\"]'); return r && r.innerText",
                vec![],
            )
            .await;
        let cells: Vec<&str> = row.as_str().unwrap().split('\t').map(str::trim).collect();
        // node, status, revision, lag, last contact
        if cells[1] == "live" && cells[2].parse::<u64>() == Ok(revision) && cells[3] == "0" {
            let ago: u64 = cells[4].trim_end_matches(" s ago").parse().unwrap();
            assert!(ago < 60, "last contact {ago} s ago");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{row} at revision {revision}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ui.shot("nodes").await;
    ui.sign_out().await;

    // ---- The provider creates a service with two port mappings; a wrong backend is refused
    // next to its field and creates nothing.
    ui.sign_in(provider).await;
    ui.go("#/services/new").await.unwrap();
    ui.fill("input[name=name]", "web").await.unwrap();
    ui.select("select[name=network_id]", &w.vpcs[0].0)
        .await
        .unwrap();
    ui.fill("input[name=backends]", "300.1.1.1").await.unwrap();
    ui.fill(".mapping input[aria-label='terminal port']", "80")
        .await
        .unwrap();
    ui.fill(".mapping input[aria-label='service port']", "8080")
        .await
        .unwrap();
    ui.button("Add port mapping").await.unwrap();
    ui.c.execute(
        "const r = document.querySelectorAll('.mapping')[1].querySelectorAll('input');
         r[0].value = '81'; r[1].value = '9000';",
        vec![],
    )
    .await
    .unwrap();
    ui.fill("input[name=tags]", "team=web").await.unwrap();
    ui.button("Create service").await.unwrap();
    let err = ui
        .until(
            "the backend's error beside its field",
            "return document.querySelector('[data-err=backends]').textContent",
            vec![],
        )
        .await;
    assert!(err.as_str().unwrap().contains("300.1.1.1"), "{err}");
    ui.shot("create-service-error").await;
    assert_eq!(
        api(&w.topo, provider, "GET", "/v1/services", None).1["total"],
        0
    );
    ui.fill("input[name=backends]", &BACKEND.to_string())
        .await
        .unwrap();
    ui.button("Create service").await.unwrap();
    ui.until(
        "the new service's page",
        "return location.hash.startsWith('#/services/') && !location.hash.endsWith('new') \
         && document.querySelector('h1').textContent.startsWith('web')",
        vec![],
    )
    .await;
    let svc = ui.hash().await.trim_start_matches("/services/").to_string();
    let s = api(
        &w.topo,
        provider,
        "GET",
        &format!("/v1/services/{svc}"),
        None,
    )
    .1;
    assert_eq!(
        s["port_mappings"],
        json!([{ "protocol": "tcp", "terminal_port": 80, "service_port": 8080 },
               { "protocol": "tcp", "terminal_port": 81, "service_port": 9000 }]),
        "{s}"
    );
    assert_eq!(s["tags"], json!([{ "key": "team", "value": "web" }]));
    let service_name = s["service_name"].as_str().unwrap().to_string();

    // Allowlist the consumer with a description.
    ui.fill("input[name=account_id]", "1000000001")
        .await
        .unwrap();
    ui.fill("input[name=description]", "consumer one")
        .await
        .unwrap();
    ui.button("Allow").await.unwrap();
    ui.until(
        "the allowlist row",
        "return document.querySelector('tr[data-id=\"1000000001\"]')",
        vec![],
    )
    .await;

    // The services list, and its CSV export against the API's.
    ui.go("#/services").await.unwrap();
    ui.until(
        "the services list",
        "return document.querySelector('table.list tbody tr[data-id]')",
        vec![],
    )
    .await;
    ui.shot("services").await;
    ui.button("Export CSV").await.unwrap();
    let csv = ui.downloaded("services.csv").await;
    let (_, want) = privatelink_tests::world::api_text(
        &w.topo,
        provider,
        "/v1/export/services.csv?fields=id,name,service_type,service_name,port_mappings,auto_accept,created_at",
    );
    assert_eq!(csv, want, "the console's CSV is the API's");
    assert!(csv.contains(&svc));
    ui.sign_out().await;

    // ---- The consumer verifies the service by name, makes two security groups (a bad source
    // is refused beside the rules), an endpoint with a chosen IP and both groups, and reorders.
    ui.sign_in(c1).await;
    ui.go("#/services").await.unwrap();
    ui.until(
        "an empty list for the consumer",
        "return document.body.innerText.includes('Nothing here yet.')",
        vec![],
    )
    .await;
    assert!(
        !ui.text().await.contains(&svc),
        "the consumer sees no provider service"
    );
    ui.go("#/find").await.unwrap();
    ui.fill("input[name=service]", &service_name).await.unwrap();
    ui.button("Verify").await.unwrap();
    let verified = ui
        .until(
            "the verified service",
            "const v = document.querySelector('.verified'); return v && v.innerText",
            vec![],
        )
        .await;
    let verified = verified.as_str().unwrap();
    assert!(
        verified.contains("tcp 80→8080") && verified.contains("tcp 81→9000"),
        "{verified}"
    );
    ui.shot("find-service").await;
    let mut groups = Vec::new();
    for (name, proto, ports, source) in [
        ("sg-web", "tcp", "80", "198.18.0.0/24"),
        ("sg-all", "all", "all", "0.0.0.0/0"),
    ] {
        ui.go("#/security-groups/new").await.unwrap();
        ui.fill("input[name=name]", name).await.unwrap();
        ui.select(".rule select[aria-label='rule protocol']", proto)
            .await
            .unwrap();
        ui.fill(".rule input[aria-label=ports]", ports)
            .await
            .unwrap();
        ui.fill(".rule input[aria-label=source]", "198.18.0.0/33")
            .await
            .unwrap();
        ui.button("Create").await.unwrap();
        let err = ui
            .until(
                "the rule's error beside the rules",
                "return document.querySelector('[data-err=rules]').textContent",
                vec![],
            )
            .await;
        assert!(err.as_str().unwrap().contains("198.18.0.0/33"), "{err}");
        ui.fill(".rule input[aria-label=source]", source)
            .await
            .unwrap();
        ui.button("Create").await.unwrap();
        ui.until(
            "the new group's page",
            "return /^#\\/security-groups\\/(?!new)/.test(location.hash)",
            vec![],
        )
        .await;
        groups.push(
            ui.hash()
                .await
                .trim_start_matches("/security-groups/")
                .to_string(),
        );
    }
    let (sg_web, sg_all) = (&groups[0], &groups[1]);
    ui.go(&format!("#/endpoints/new?service={service_name}"))
        .await
        .unwrap();
    ui.fill("input[name=name]", "web-ep").await.unwrap();
    ui.select("select[name=network_id]", &w.vpcs[1].0)
        .await
        .unwrap();
    ui.until(
        "the network's subnets",
        "return [...document.querySelectorAll('select[name=subnet_id] option')].some(o => o.value === arguments[0])",
        vec![json!(w.vpcs[1].1)],
    )
    .await;
    ui.select("select[name=subnet_id]", &w.vpcs[1].1)
        .await
        .unwrap();
    ui.fill("input[name=ip]", &ENDPOINT.to_string())
        .await
        .unwrap();
    for g in [sg_web, sg_all] {
        ui.select("select[aria-label='add security group']", g)
            .await
            .unwrap();
    }
    ui.click(&format!("button[aria-label='move up {sg_all}']"))
        .await
        .unwrap();
    ui.button("Create endpoint").await.unwrap();
    ui.until(
        "the new endpoint's page",
        "return /^#\\/endpoints\\/(?!new)/.test(location.hash)",
        vec![],
    )
    .await;
    let ep = ui
        .hash()
        .await
        .trim_start_matches("/endpoints/")
        .to_string();
    let order = |token: &str| {
        let e = api(&w.topo, token, "GET", &format!("/v1/endpoints/{ep}"), None).1;
        let mut b: Vec<(u64, String)> = e["security_groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["priority"].as_u64().unwrap(),
                    b["security_group_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        b.sort();
        (e, b.into_iter().map(|(_, g)| g).collect::<Vec<_>>())
    };
    let (e, got) = order(c1);
    assert_eq!(got, [sg_all.clone(), sg_web.clone()], "{e}");
    assert_eq!(e["ip"], ENDPOINT.to_string());
    ui.until(
        "the endpoint page's groups",
        "return document.querySelector(`button[aria-label='move up ${arguments[0]}']`)",
        vec![json!(sg_web)],
    )
    .await;
    ui.click(&format!("button[aria-label='move up {sg_web}']"))
        .await
        .unwrap();
    ui.button("Save order").await.unwrap();
    let t = Instant::now();
    while order(c1).1 != [sg_web.clone(), sg_all.clone()] {
        assert!(t.elapsed() < Duration::from_secs(10), "reordered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ui.shot("endpoint").await;
    ui.sign_out().await;

    // ---- Another consumer sees none of it, even by address.
    ui.sign_in(c2).await;
    ui.go("#/endpoints").await.unwrap();
    ui.until(
        "an empty endpoint list",
        "return document.body.innerText.includes('Nothing here yet.')",
        vec![],
    )
    .await;
    ui.go(&format!("#/endpoints/{ep}")).await.unwrap();
    let refused = ui
        .until(
            "refused",
            "return document.body.innerText.includes('not_found') && document.body.innerText",
            vec![],
        )
        .await;
    assert!(!refused.as_str().unwrap().contains("web-ep"), "{refused}");
    ui.go(&format!("#/security-groups/{sg_web}")).await.unwrap();
    ui.until(
        "refused",
        "return document.body.innerText.includes('not_found')",
        vec![],
    )
    .await;
    // (The page names the group asked for: the address holds it. Nothing else of the first
    // consumer's, or the provider's, is there.)
    let src = ui.c.source().await.unwrap();
    for id in [
        ep.as_str(),
        sg_all,
        &svc,
        "web-ep",
        "sg-web",
        "sg-all",
        "198.18.0.100",
    ] {
        assert!(!src.contains(id), "consumer 2 sees {id}");
    }
    ui.sign_out().await;

    // ---- The provider accepts the connection; real traffic goes through.
    ui.sign_in(provider).await;
    ui.go(&format!("#/services/{svc}")).await.unwrap();
    ui.until(
        "the pending connection",
        "const r = document.querySelector(`table.connections tr[data-id='${arguments[0]}']`); return r && r.innerText.includes('Pending')",
        vec![json!(ep)],
    )
    .await;
    ui.click(&format!("input.conn-pick[value='{ep}']"))
        .await
        .unwrap();
    ui.button("Accept selected").await.unwrap();
    ui.until(
        "the connection available",
        "const r = document.querySelector(`table.connections tr[data-id='${arguments[0]}']`); return r && r.innerText.includes('Available')",
        vec![json!(ep)],
    )
    .await;
    let t = Instant::now();
    while !curl_ok(w) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "curl through the endpoint\n{}",
            w.log()
        );
    }
    for _ in 0..9 {
        assert!(curl_ok(w));
    }
    // The chart's totals are /metrics' counters (the history samples every second).
    for (metric, direction) in [("fwd_bytes", "forward"), ("rev_bytes", "reply")] {
        ui.select(".monitoring select[aria-label=metric]", metric)
            .await
            .unwrap();
        let t = Instant::now();
        loop {
            let want = service_bytes(w, &svc, direction);
            ui.button("Refresh").await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            ui.select(".monitoring select[aria-label=metric]", metric)
                .await
                .unwrap();
            let shown = ui
                .c
                .execute(
                    "const b = document.querySelector('[data-total=now]'); return b && b.textContent",
                    vec![],
                )
                .await
                .unwrap();
            if want > 0 && shown.as_str() == Some(want.to_string().as_str()) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{metric}: the chart shows {shown}, /metrics {want}"
            );
        }
    }
    assert!(
        service_bytes(w, &svc, "reply") > 2_000_000,
        "ten 200 kB answers"
    );
    ui.shot("service").await;
    // A comparison: the last 24 hours over the 24 hours before, two lines on one chart; its
    // CSV export carries both, and the first's bytes are /metrics' again.
    ui.select(".monitoring select[aria-label=metric]", "rev_bytes")
        .await
        .unwrap();
    let disabled = |ui: &Ui| {
        let c = ui.c.clone();
        async move {
            c.execute(
                "return [...document.querySelectorAll('.monitoring select[aria-label=granularity] option')].filter(o => o.disabled).map(o => o.value)",
                vec![],
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(
        disabled(ui).await,
        json!(["1d"]),
        "the last hour has no 1 d points"
    );
    ui.select(".monitoring select[aria-label=period]", "24h")
        .await
        .unwrap();
    assert_eq!(
        disabled(ui).await,
        json!(["1m"]),
        "1 min points are kept an hour"
    );
    ui.c.execute(
        "const i = document.querySelectorAll('.monitoring input[type=datetime-local]')[2];
         const d = new Date(Date.now() - 86400e3 - new Date().getTimezoneOffset() * 60e3);
         i.value = d.toISOString().slice(0, 16);
         i.dispatchEvent(new Event('change'));
         const c = document.querySelector('.monitoring input[aria-label=compare]');
         c.checked = true; c.dispatchEvent(new Event('change'));",
        vec![],
    )
    .await
    .unwrap();
    ui.until(
        "two periods on one chart",
        "return document.querySelector('.chart .series-then') && document.querySelector('.chart .series-now') \
         && document.querySelector('[data-total=then]')",
        vec![],
    )
    .await;
    ui.c.execute(
        "document.querySelector('.monitoring').scrollIntoView()",
        vec![],
    )
    .await
    .unwrap();
    ui.shot("monitoring-compare").await;
    let buttons =
        ui.c.find_all(Locator::XPath(
            "//section[contains(@class,'monitoring')]//button[normalize-space()='Export CSV']",
        ))
        .await
        .unwrap();
    buttons[0].click().await.unwrap();
    let csv = ui.downloaded(&format!("service-{svc}-history.csv")).await;
    let mut rows = csv.lines();
    let header: Vec<&str> = rows.next().unwrap().split(',').collect();
    assert!(header.contains(&"compare_rev_bytes"), "{header:?}");
    let col = header.iter().position(|h| *h == "rev_bytes").unwrap();
    let sum: u64 = rows
        .filter_map(|r| r.split(',').nth(col)?.parse::<u64>().ok())
        .sum();
    assert_eq!(sum, service_bytes(w, &svc, "reply"), "{csv}");
}
