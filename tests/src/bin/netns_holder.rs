//! Test helper for `tests/netns.rs`: creates a namespace with a process inside (`sleep`), arranges
//! the signal teardown as the benchmarks do, prints `<namespace> <pid inside>` and waits (at most
//! 60 s) for the test to signal or kill it.
use std::{
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use privatelink_agent::testkit::netns::{self, Netns};

fn main() {
    let ns = Netns::new("h").expect("namespace");
    netns::teardown_on_signals().expect("signal handler");
    let mut inside = ns
        .command("sleep")
        .arg("60")
        .spawn()
        .expect("process in the namespace");
    // `ip netns exec` enters the namespace after it has started: report the process only once it
    // is inside, or a test that kills at once would race its entry.
    let ns_ino = |path: &str| std::fs::metadata(path).map(|m| m.ino()).ok();
    let want = ns_ino(&format!("/run/netns/{}", ns.name())).expect("namespace mount");
    let deadline = Instant::now() + Duration::from_secs(5);
    while ns_ino(&format!("/proc/{}/ns/net", inside.id())) != Some(want) {
        assert!(
            Instant::now() < deadline,
            "the process never entered {}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut out = std::io::stdout();
    writeln!(out, "{} {}", ns.name(), inside.id()).expect("stdout");
    out.flush().expect("stdout");
    std::thread::sleep(Duration::from_secs(60));
    // Not signalled in time: end the way Drop would, without waiting for the test.
    let _ = inside.kill();
    let _ = inside.wait();
}
