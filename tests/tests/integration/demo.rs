//! The default of `cargo xtask build-and-load`: `privatelink-demo --once` through the real agent,
//! and nothing left behind afterwards. What it did is read from its JSON report, not its prose.
use std::process::Command;

use privatelink_tests::privileged;
use serde_json::Value;

#[test]
fn the_demo_serves_both_consumers_and_cleans_up() {
    if !privileged("the_demo_serves_both_consumers_and_cleans_up") {
        return;
    }
    let report_file = std::env::temp_dir().join(format!(
        "privatelink-demo-report-{}.json",
        std::process::id()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_privatelink-demo"))
        .arg("--once")
        .arg("--report")
        .arg(&report_file)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(&report_file).expect("the report")).unwrap();
    std::fs::remove_file(&report_file).ok();

    // Both consumers over both families of the dual-stack endpoint: the name resolves (A and
    // AAAA) to the network's own endpoint, the backend sees the family's NAT range, and the UDP
    // echo comes back.
    let exchanges = report["exchanges"].as_array().expect("exchanges");
    for consumer in [1, 2] {
        for (record, endpoint, nat) in [
            ("A", "198.18.0.100", "hello 198.19."),
            ("AAAA", "2001:db8::100", "hello 2001:db8:ff::"),
        ] {
            let e = exchanges
                .iter()
                .find(|e| e["consumer"] == consumer && e["record"] == record)
                .unwrap_or_else(|| panic!("no {record} exchange of consumer {consumer}: {report}"));
            assert_eq!(e["resolved"], endpoint, "{e}");
            assert!(
                e["tcp_reply"].as_str().unwrap().starts_with(nat),
                "consumer {consumer} over {record}: {e}"
            );
            assert_eq!(e["udp_echo_ok"], true, "{e}");
        }
    }
    assert_eq!(exchanges.len(), 4, "{report}");
    // Per-link counters from the agent's metrics: both links carried traffic both ways.
    for ep in ["demo-1", "demo-2"] {
        let l = report["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["endpoint"] == ep)
            .unwrap_or_else(|| panic!("no counters for {ep}: {report}"));
        let n = |k: &str| l[k].as_u64().unwrap();
        assert!(
            n("fwd_packets") > 0 && n("rev_packets") > 0 && n("new_connections") >= 4,
            "{ep}: {l}"
        );
    }

    // Nothing left: the namespaces it made, its pins.
    let names: Vec<&str> = report["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "node, provider, two consumers: {names:?}");
    let netns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    for n in &names {
        assert!(
            !netns
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n)),
            "namespace {n} left behind"
        );
    }
    let pins = report["pins"].as_str().unwrap();
    assert!(pins.starts_with("/sys/fs/bpf/"), "{pins}");
    assert!(
        !std::path::Path::new(pins).exists(),
        "pins left behind under {pins}"
    );
}
