//! Network namespaces for tests and the demo: uniquely named, torn down on drop (also on panic),
//! addresses only from 198.18.0.0/15 and 2001:db8::/32, nothing in the root namespace.
//!
//! Drop does not run when a process dies of a signal, so each namespace also has an owner record
//! (`OWNERS/<name>`: the creating process's pid and start time). The first namespace a process
//! creates sweeps the namespaces whose owner is gone (killed, even with SIGKILL): their processes
//! are killed and they are deleted. A process that may be stopped by a signal (the benchmarks) also
//! calls [`teardown_on_signals`], which removes its namespaces before it exits.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Mutex, Once,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Where owner records live (tmpfs: gone after a reboot, like the namespaces).
pub const OWNERS: &str = "/run/privatelink/netns";

/// Names of this process's live namespaces, for [`teardown_on_signals`].
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The sweep runs once per process, before its first namespace.
static SWEEP: Once = Once::new();

/// A process's identity that survives pid reuse: pid and start time (clock ticks since boot, field
/// 22 of `/proc/<pid>/stat`).
fn identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let start = rest.split(' ').nth(19)?;
    Some(format!("{pid} {start}"))
}

fn owner_record(name: &str) -> PathBuf {
    Path::new(OWNERS).join(name)
}

/// Whether namespace `name` exists (its mount point under `/run/netns`, where `ip` keeps them).
fn exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Kills every process inside namespace `name`, then deletes it and its owner record.
fn remove(name: &str) -> Result<()> {
    if let Ok(out) = ip(&["netns", "pids", name]) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            // Never this process (its main thread could have entered the namespace).
            if let Ok(pid) = pid.parse::<i32>()
                && pid != std::process::id() as i32
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let deleted = ip(&["netns", "del", name]);
    let _ = std::fs::remove_file(owner_record(name));
    match deleted {
        // Gone either way (another cleaner got there first).
        Err(_) if !exists(name) => Ok(()),
        other => other.map(drop),
    }
}

/// Namespaces whose owner record names a process that no longer runs: `(name, record)`.
pub fn orphans() -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir(OWNERS) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let name = e.file_name().into_string().ok()?;
        let record = std::fs::read_to_string(e.path()).ok()?;
        let pid: u32 = record.split(' ').next()?.trim().parse().ok()?;
        (identity(pid).as_deref() != Some(record.trim())).then_some((name, record))
    })
    .collect()
}

/// Removes the namespaces (and what runs in them) of processes that died without tearing them
/// down; returns their names.
pub fn sweep_orphans() -> Vec<String> {
    let mut gone = Vec::new();
    for (name, record) in orphans() {
        if !exists(&name) {
            let _ = std::fs::remove_file(owner_record(&name));
            continue;
        }
        match remove(&name) {
            Ok(()) => {
                eprintln!(
                    "netns: removed {name}, left behind by process {}",
                    record.trim()
                );
                gone.push(name);
            }
            Err(e) => eprintln!("warning: could not remove orphaned namespace {name}: {e:#}"),
        }
    }
    gone
}

/// On SIGINT, SIGTERM or SIGHUP: kill what runs in this process's namespaces, delete them, and exit
/// with 128 + the signal's number. For processes that do not handle these signals themselves
/// (the benchmark binaries); idempotent.
pub fn teardown_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    static INSTALLED: Once = Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        result = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
            .context("installing the namespace teardown's signal handler")
            .map(|mut signals| {
                std::thread::spawn(move || {
                    if let Some(sig) = signals.forever().next() {
                        let names =
                            std::mem::take(&mut *LIVE.lock().unwrap_or_else(|p| p.into_inner()));
                        eprintln!("signal {sig}: removing {} namespace(s)", names.len());
                        for name in names {
                            if let Err(e) = remove(&name) {
                                eprintln!("warning: could not delete namespace {name}: {e:#}");
                            }
                        }
                        std::process::exit(128 + sig);
                    }
                });
            });
    });
    result
}

/// A network namespace that exists while this value lives.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// Runs a command, failing with its stderr unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip` with the given arguments.
pub fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

impl Netns {
    /// Creates `pl<tag><pid><n>` (short: interface names derived from it must fit 15 bytes).
    pub fn new(tag: &str) -> Result<Self> {
        SWEEP.call_once(|| {
            sweep_orphans();
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("pl{tag}{}x{n}", std::process::id());
        // The record first: a namespace never exists without one, whenever this process dies.
        let me = identity(std::process::id()).context("reading this process's start time")?;
        std::fs::create_dir_all(OWNERS).with_context(|| format!("creating {OWNERS}"))?;
        std::fs::write(owner_record(&name), &me)
            .with_context(|| format!("writing the owner record of {name}"))?;
        if let Err(e) = ip(&["netns", "add", &name]) {
            let _ = std::fs::remove_file(owner_record(&name));
            return Err(e);
        }
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.clone());
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command to run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a command inside the namespace, failing unless it exits 0.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run(self.command(program).args(args))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// ifindex of an interface in the namespace.
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let path = format!("/sys/class/net/{dev}/ifindex");
        let out = self.exec("cat", &[&path])?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("ifindex of {dev}"))
    }

    /// MAC address of an interface in the namespace.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        let path = format!("/sys/class/net/{dev}/address");
        let out = self.exec("cat", &[&path])?;
        let s = String::from_utf8_lossy(&out.stdout);
        let mut mac = [0u8; 6];
        for (i, part) in s.trim().split(':').enumerate().take(6) {
            mac[i] = u8::from_str_radix(part, 16).with_context(|| format!("MAC of {dev}: {s}"))?;
        }
        Ok(mac)
    }

    /// Runs `f` on a thread whose network namespace is this one; panics propagate.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Netns {
    /// Starts `f` on a background thread inside this namespace (for servers); join the handle.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n| n != &self.name);
        // Deleting the namespace removes its interfaces and the veth peers they had elsewhere.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {e:#}", self.name);
        }
        let _ = std::fs::remove_file(owner_record(&self.name));
    }
}

/// Creates a veth pair `a` (in `ns_a`) ↔ `b` (in `ns_b`), both up, with `tx` checksum offload off
/// on both (CHECKSUM_PARTIAL does not survive an XDP redirect).
pub fn veth(ns_a: &Netns, a: &str, ns_b: &Netns, b: &str) -> Result<()> {
    ns_a.ip(&[
        "link",
        "add",
        a,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        ns_b.name(),
    ])?;
    for (ns, dev) in [(ns_a, a), (ns_b, b)] {
        ns.exec("ethtool", &["-K", dev, "tx", "off"])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    Ok(())
}
