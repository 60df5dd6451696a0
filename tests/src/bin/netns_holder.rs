//! Test helper for `tests/netns.rs`: creates a namespace with a process inside (`sleep`), arranges
//! the signal teardown as the benchmarks do, prints `<namespace> <pid inside>` and waits (at most
//! 60 s) for the test to signal or kill it.
use std::{io::Write as _, time::Duration};

use privatelink_agent::netns::{self, Netns};

fn main() {
    let ns = Netns::new("h").expect("namespace");
    netns::teardown_on_signals().expect("signal handler");
    let mut inside = ns
        .command("sleep")
        .arg("60")
        .spawn()
        .expect("process in the namespace");
    let mut out = std::io::stdout();
    writeln!(out, "{} {}", ns.name(), inside.id()).expect("stdout");
    out.flush().expect("stdout");
    std::thread::sleep(Duration::from_secs(60));
    // Not signalled in time: end the way Drop would, without waiting for the test.
    let _ = inside.kill();
    let _ = inside.wait();
}
