//! The `privatelink` CLI against a real API server on loopback.
use privatelink_agent::cli;
use privatelink_tests::api::{ADMIN, Server};
use serde_json::Value;

struct Run {
    code: i32,
    out: String,
    err: String,
}

fn cli(server: &Server, token: &str, args: &[&str]) -> Run {
    let url = format!("http://{}", server.addr);
    let mut all = vec![
        "privatelink".to_string(),
        "--server".into(),
        url,
        "--token".into(),
        token.into(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cli::run(all, &mut out, &mut err);
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

fn json(r: &Run) -> Value {
    assert_eq!(r.code, 0, "stderr: {}", r.err);
    serde_json::from_str(&r.out).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.out))
}

#[test]
fn provider_and_consumer_workflow_through_the_cli() {
    let s = Server::start("cli");
    let token = |id: &str| {
        json(&cli(
            &s,
            ADMIN,
            &["-o", "json", "accounts", "create", id, "--name", id],
        ))["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (prov, cons) = (token("provider"), token("1000000001"));
    let me = json(&cli(&s, &cons, &["-o", "json", "whoami"]));
    assert_eq!(
        (&me["role"], &me["account_id"]),
        (&Value::from("account"), &Value::from("1000000001"))
    );
    assert_eq!(
        json(&cli(&s, ADMIN, &["-o", "json", "whoami"]))["role"],
        "admin"
    );
    let net = |owner: &str, cidr: &str| {
        let n = json(&cli(
            &s,
            ADMIN,
            &[
                "-o", "json", "networks", "create", "--name", "vpc", "--owner", owner, "--cidr",
                cidr,
            ],
        ));
        let id = n["id"].as_str().unwrap().to_string();
        let sub = json(&cli(
            &s,
            ADMIN,
            &[
                "-o",
                "json",
                "networks",
                "create-subnet",
                &id,
                "--name",
                "a",
                "--cidr",
                &cidr.replace("/16", "/24"),
            ],
        ));
        (id, sub["id"].as_str().unwrap().to_string())
    };
    let (pnet, _) = net("provider", "198.18.100.0/24");
    let (cnet, csub) = net("1000000001", "198.18.0.0/16");
    let svc = json(&cli(
        &s,
        &prov,
        &[
            "-o",
            "json",
            "services",
            "create",
            "--name",
            "cache",
            "--network",
            &pnet,
            "--type",
            "redis",
            "--backend",
            "198.18.100.10",
            "--map",
            "tcp:6379:6379",
            "--tag",
            "team=cache",
        ],
    ));
    let svc_id = svc["id"].as_str().unwrap();
    assert_eq!(
        (
            svc["tags"][0]["key"].as_str(),
            svc["tags"][0]["value"].as_str()
        ),
        (Some("team"), Some("cache"))
    );

    // Server errors: exit 1 with the server's code and message.
    let r = cli(
        &s,
        &cons,
        &[
            "endpoints",
            "create",
            "--name",
            "ep",
            "--service",
            svc_id,
            "--network",
            &cnet,
            "--subnet",
            &csub,
        ],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.err.contains("403 not_allowlisted") && r.err.contains("allowlist"),
        "{}",
        r.err
    );
    assert_eq!(
        cli(
            &s,
            &prov,
            &[
                "services",
                "allow",
                svc_id,
                "1000000001",
                "--description",
                "consumer"
            ]
        )
        .code,
        0
    );
    let ep = json(&cli(
        &s,
        &cons,
        &[
            "-o",
            "json",
            "endpoints",
            "create",
            "--name",
            "ep",
            "--service",
            svc_id,
            "--network",
            &cnet,
            "--subnet",
            &csub,
        ],
    ));
    let ep_id = ep["id"].as_str().unwrap();
    assert_eq!(ep["state"], "Pending");

    // Table output: a header row and one row per item.
    let t = cli(
        &s,
        &cons,
        &["endpoints", "list", "--fields", "id,name,state"],
    );
    assert_eq!(t.code, 0, "{}", t.err);
    let lines: Vec<&str> = t.out.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("STATE"),
        "{}",
        t.out
    );
    assert!(
        lines[1].starts_with(ep_id) && lines[1].contains("Pending"),
        "{}",
        t.out
    );

    // Accept in batch with per-item results; CSV output of those results.
    let r = cli(
        &s,
        &prov,
        &[
            "-o",
            "csv",
            "services",
            "accept",
            svc_id,
            ep_id,
            "ep-00000000",
        ],
    );
    // One item failed: the results are shown, and the command fails saying which.
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(
        r.err.contains("1 of 2 failed") && r.err.contains("ep-00000000"),
        "{}",
        r.err
    );
    let mut rd = csv::Reader::from_reader(r.out.as_bytes());
    let head = rd.headers().unwrap().clone();
    assert_eq!(&head[0], "endpoint_id", "{}", r.out);
    let ok = head.iter().position(|h| h == "ok").unwrap();
    let recs: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
    assert_eq!((&recs[0][0], &recs[0][ok]), (ep_id, "true"));
    assert_eq!(&recs[1][ok], "false");

    // Updates send only what was given, validated by the server.
    let upd = json(&cli(
        &s,
        &cons,
        &[
            "-o",
            "json",
            "endpoints",
            "update",
            ep_id,
            "--name",
            "renamed",
            "--tag",
            "team=web",
        ],
    ));
    assert_eq!(
        (upd["name"].as_str(), upd["tags"][0]["value"].as_str()),
        (Some("renamed"), Some("web"))
    );
    assert_eq!(upd["state"], "Available", "untouched fields stay");
    let bad = cli(
        &s,
        &cons,
        &["endpoints", "update", ep_id, "--name", "bad name"],
    );
    assert!(
        bad.code == 1 && bad.err.contains("invalid_name"),
        "{}",
        bad.err
    );
    let svc_upd = json(&cli(
        &s,
        &prov,
        &[
            "-o",
            "json",
            "services",
            "update",
            svc_id,
            "--auto-accept",
            "true",
        ],
    ));
    assert_eq!(
        (svc_upd["auto_accept"].as_bool(), svc_upd["name"].as_str()),
        (Some(true), Some("cache"))
    );

    // Export as CSV with a header.
    let e = cli(&s, &cons, &["export", "endpoints", "--fields", "id,state"]);
    assert_eq!(
        e.out.lines().collect::<Vec<_>>(),
        ["id,state", &format!("{ep_id},Available")]
    );

    // A service by its name or its service name, as well as its id.
    let by_id = json(&cli(&s, &prov, &["-o", "json", "services", "get", svc_id]));
    let service_name = by_id["service_name"].as_str().unwrap().to_string();
    for name in ["cache", service_name.as_str()] {
        assert_eq!(
            json(&cli(&s, &prov, &["-o", "json", "services", "get", name]))["id"],
            svc_id,
            "{name}"
        );
    }
    let other = cli(&s, &cons, &["services", "get", "cache"]);
    assert!(
        other.code == 1 && other.err.contains("404"),
        "{}",
        other.err
    );

    // Tables read like a console's lists: id, name, state first; RFC 3339 times; nested values
    // summarised; an empty list still has its header; --fields order kept in CSV and JSON.
    let t = cli(&s, &cons, &["endpoints", "list"]);
    let head: Vec<&str> = t.out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(&head[..3], ["ID", "NAME", "STATE"], "{}", t.out);
    assert!(head.contains(&"CREATED_TIME") && !head.contains(&"CREATED_AT"));
    assert!(!t.out.contains('{') && !t.out.contains('['), "{}", t.out);
    let t = cli(&s, &prov, &["services", "list"]);
    assert!(
        t.out.contains("tcp 6379→6379") && t.out.contains("team=cache"),
        "{}",
        t.out
    );
    let empty = cli(&s, &prov, &["endpoints", "list"]);
    assert!(empty.out.starts_with("ID  NAME  STATE"), "{}", empty.out);
    let c = cli(
        &s,
        &cons,
        &["-o", "csv", "endpoints", "list", "--fields", "state,id"],
    );
    assert!(
        c.out.starts_with(&format!("state,id\nAvailable,{ep_id}")),
        "{}",
        c.out
    );
    let j = cli(
        &s,
        &cons,
        &["-o", "json", "endpoints", "list", "--fields", "state,id"],
    );
    assert!(j.out.find("\"state\"") < j.out.find("\"id\""), "{}", j.out);

    // --help is an answer: on standard output, exit 0, every option with a help line.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cli::run(
        ["privatelink", "services", "create", "--help"].map(String::from),
        &mut out,
        &mut err,
    );
    let help = String::from_utf8(out).unwrap();
    assert!(code == 0 && err.is_empty(), "{code}");
    assert!(
        help.contains("--map") && help.contains("proto:service_port:terminal_port"),
        "{help}"
    );
    assert!(
        help.contains("--tag") && help.contains("key=value"),
        "{help}"
    );

    // Usage errors exit 2; a missing token says where to put one.
    assert_eq!(cli(&s, &cons, &["endpoints", "frobnicate"]).code, 2);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let missing = tempfile_path("missing.toml");
    let code = cli::run(
        ["privatelink", "--config", &missing, "revision"].map(String::from),
        &mut out,
        &mut err,
    );
    assert_eq!(code, 1);
    assert!(
        String::from_utf8(err)
            .unwrap()
            .contains("PRIVATELINK_TOKEN")
    );

    // The config file supplies server and token.
    let conf = tempfile_path("cli.toml");
    std::fs::write(
        &conf,
        format!("server = \"http://{}\"\ntoken = \"{cons}\"\n", s.addr),
    )
    .unwrap();
    // A token others can read is refused, saying how to fix it.
    privatelink_tests::api::set_mode(std::path::Path::new(&conf), 0o644);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cli::run(
        ["privatelink", "--config", &conf, "-o", "json", "revision"].map(String::from),
        &mut out,
        &mut err,
    );
    let text = String::from_utf8_lossy(&err);
    assert!(code != 0 && text.contains("chmod 600"), "{code}: {text}");
    privatelink_tests::api::set_mode(std::path::Path::new(&conf), 0o600);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cli::run(
        ["privatelink", "--config", &conf, "-o", "json", "revision"].map(String::from),
        &mut out,
        &mut err,
    );
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert!(
        serde_json::from_slice::<Value>(&out).unwrap()["revision"]
            .as_u64()
            .unwrap()
            > 0
    );
    let _ = std::fs::remove_file(conf);
}

fn tempfile_path(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("privatelink-{}-{name}", std::process::id()))
        .display()
        .to_string()
}
