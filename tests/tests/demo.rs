//! The default of `cargo xtask build-and-load`: `privatelink-demo --once` through the real agent,
//! and nothing left behind afterwards.
use std::process::Command;

use privatelink_tests::privileged;

#[test]
fn the_demo_serves_both_consumers_and_cleans_up() {
    if !privileged("the_demo_serves_both_consumers_and_cleans_up") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_privatelink-demo"))
        .arg("--once")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both families of the dual-stack endpoint: the name resolves (A and AAAA) to the network's
    // endpoint, and the backend sees the family's NAT range.
    for i in [1, 2] {
        for (kind, endpoint, nat, udp) in [
            ("A", "198.18.0.100", "198.19.", "198.18.0.100:53"),
            (
                "AAAA",
                "2001:db8::100",
                "2001:db8:ff::",
                "[2001:db8::100]:53",
            ),
        ] {
            assert!(
                text.contains(&format!(
                    "consumer {i} -> echo.demo.example {kind} (private DNS at 198.18.0.2: {endpoint}) port 80: hello {nat}"
                )),
                "consumer {i} over {kind}:\n{text}"
            );
            assert!(
                text.contains(&format!("consumer {i} -> {udp}: udp echo ok")),
                "{text}"
            );
        }
    }
    assert!(text.contains("provider accepted both connections"));
    // Per-link counters from the agent's metrics: both links carried traffic both ways.
    for ep in ["demo-1", "demo-2"] {
        let row: Vec<u64> = text
            .lines()
            .find(|l| l.starts_with(ep))
            .unwrap_or_else(|| panic!("no counters for {ep}:\n{text}"))
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(row[0] > 0 && row[2] > 0 && row[4] >= 4, "{ep}: {row:?}");
    }
    // Nothing left: the namespaces it printed, its pins, its files.
    let names: Vec<&str> = text
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .filter(|w| w.starts_with("pl"))
        .map(|w| w.trim_end_matches(','))
        .collect();
    let netns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    for n in &names {
        assert!(!netns.contains(n), "namespace {n} left behind");
    }
    let leftovers: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("privatelink-demo-")
        })
        .collect();
    assert!(leftovers.is_empty(), "pins left behind: {leftovers:?}");
}
