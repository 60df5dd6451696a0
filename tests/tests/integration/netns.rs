//! Namespaces are removed even when their process does not get to drop them: a signal runs the
//! teardown (the benchmarks arrange it), and after SIGKILL the next process to create a namespace
//! sweeps the orphans, killing what still runs in them.
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};
use privatelink_agent::testkit::netns::{self, Netns, OWNERS};
use privatelink_tests::privileged;

/// A holder process, with the namespace it made and the pid of the process inside it.
fn holder() -> (Child, String, u32) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netns_holder"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start netns_holder");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("holder's line");
    let mut parts = line.split_whitespace();
    let name = parts.next().expect("namespace name").to_string();
    let pid = parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("pid inside in {line:?}"));
    assert!(exists(&name), "{name} was created");
    assert!(running(pid), "the process inside {name} runs");
    (child, name, pid)
}

fn exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Running: present and not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// Waits up to 5 s for `cond`.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_signal_removes_the_namespaces_and_what_runs_in_them() {
    if !privileged("a_signal_removes_the_namespaces_and_what_runs_in_them") {
        return;
    }
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let (mut child, name, inside) = holder();
        signal::kill(Pid::from_raw(child.id() as i32), sig).expect("signal the holder");
        let status = child.wait().expect("reap the holder");
        assert_eq!(
            status.code(),
            Some(128 + sig as i32),
            "{sig}: the holder exits with 128 + the signal after its teardown"
        );
        assert!(!exists(&name), "{sig}: {name} is deleted");
        assert!(
            !Path::new(OWNERS).join(&name).exists(),
            "{sig}: the owner record of {name} is gone"
        );
        eventually(&format!("the process inside {name} is gone"), || {
            !running(inside)
        });
    }
}

#[test]
fn after_sigkill_the_next_namespace_sweeps_the_orphan() {
    if !privileged("after_sigkill_the_next_namespace_sweeps_the_orphan") {
        return;
    }
    let mine = Netns::new("own").expect("this process's namespace");
    let (mut child, name, inside) = holder();
    signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill the holder");
    child.wait().expect("reap the holder");
    assert!(exists(&name), "SIGKILL leaves {name} behind");
    assert!(running(inside), "and the process inside it");
    assert!(
        netns::orphans().iter().any(|(n, _)| n == &name),
        "{name} is an orphan"
    );
    assert!(
        !netns::orphans().iter().any(|(n, _)| n == mine.name()),
        "a live process's namespace is not"
    );

    let swept = netns::sweep_orphans();
    assert!(swept.contains(&name), "swept {swept:?}, not {name}");
    assert!(!exists(&name), "{name} is deleted");
    eventually(&format!("the process inside {name} is gone"), || {
        !running(inside)
    });
    assert!(exists(mine.name()), "this process's own namespace stays");
}
