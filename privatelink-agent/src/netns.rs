//! Network namespaces for tests and the demo: uniquely named, torn down on drop (also on panic),
//! addresses only from 198.18.0.0/15 and 2001:db8::/32, nothing in the root namespace.
use std::{
    fs::File,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

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
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("pl{tag}{}x{n}", std::process::id());
        ip(&["netns", "add", &name])?;
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
        // Deleting the namespace removes its interfaces and the veth peers they had elsewhere.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {e:#}", self.name);
        }
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
