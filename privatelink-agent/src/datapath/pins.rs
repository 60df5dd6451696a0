//! bpffs pins: maps (so state survives agent restarts and upgrades) and per-interface XDP links
//! (so forwarding continues while the agent is down, and a new program replaces the old one
//! atomically).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use aya::programs::{
    Xdp,
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpMode},
};
use privatelink_common::{LAYOUT_VERSION, names};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A directory on bpffs holding this node's pins.
#[derive(Clone, Debug)]
pub struct Pins {
    dir: PathBuf,
}

/// How an interface got its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Replaced the program of a pinned link (restart or upgrade: no packet sees no program).
    Replaced,
    /// A new link, now pinned.
    New,
}

#[allow(
    clippy::unnecessary_cast,
    reason = "f_type is i64 on x86_64 but another width on other architectures"
)]
fn is_bpffs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Whether pins under a directory outlive this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// The directory's bpffs is one the host's mount namespace has too: pins stay when the
    /// process ends, and forwarding goes on through them.
    Host,
    /// The bpffs is this process's own (a private mount namespace mounted it, as `ip netns exec`
    /// or `unshare -m` make): its pins, and forwarding, end with the process.
    Private,
    /// The host's mounts cannot be read (`/proc/1/mountinfo`): nothing is known.
    Unknown,
}

/// The device (`major:minor`) of the bpffs mount that holds `dir`, from a mountinfo text: the
/// deepest bpf mount whose mount point is an ancestor of `dir`.
fn bpffs_device(mountinfo: &str, dir: &Path) -> Option<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            // id parent major:minor root mount-point options [optional...] - fstype source ...
            let (head, tail) = l.split_once(" - ")?;
            let fields: Vec<&str> = head.split(' ').collect();
            let fstype = tail.split(' ').next()?;
            (fstype == "bpf").then(|| (fields.get(2).copied(), fields.get(4).copied()))
        })
        .filter_map(|(dev, at)| Some((dev?, Path::new(at?))))
        .filter(|(_, at)| dir.starts_with(at))
        .max_by_key(|(_, at)| at.components().count())
        .map(|(dev, _)| dev.to_string())
}

/// Whether the bpffs holding `dir` (per this process's mounts) is one the host has mounted too.
pub fn persistence(own_mountinfo: &str, host_mountinfo: Option<&str>, dir: &Path) -> Persistence {
    let Some(host) = host_mountinfo else {
        return Persistence::Unknown;
    };
    let Some(dev) = bpffs_device(own_mountinfo, dir) else {
        return Persistence::Private;
    };
    let host_has_it = host.lines().any(|l| {
        l.split_once(" - ").is_some_and(|(head, tail)| {
            tail.starts_with("bpf ") && head.split(' ').nth(2) == Some(dev.as_str())
        })
    });
    if host_has_it {
        Persistence::Host
    } else {
        Persistence::Private
    }
}

impl Pins {
    /// Whether this node's pins outlive the process (see [`Persistence`]).
    pub fn persistence(&self) -> Persistence {
        let own = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let host = std::fs::read_to_string("/proc/1/mountinfo").ok();
        persistence(&own, host.as_deref(), &self.dir)
    }

    /// Makes sure `dir` is on a mounted bpffs (mounting /sys/fs/bpf if needed) and exists.
    pub fn prepare(dir: &Path) -> Result<Self> {
        let root = Path::new("/sys/fs/bpf");
        if dir.starts_with(root) && !is_bpffs(root) {
            std::fs::create_dir_all(root).ok();
            nix::mount::mount(
                Some("bpf"),
                root,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .context("bpffs: mounting /sys/fs/bpf")?;
            log::info!("mounted bpffs on /sys/fs/bpf");
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("bpffs: creating {}", dir.display()))?;
        let parent = dir.ancestors().find(|a| a.exists() && is_bpffs(a));
        if parent.is_none() {
            anyhow::bail!("bpffs: {} is not on a bpf filesystem", dir.display());
        }
        Ok(Pins {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where map `name` is pinned in the current layout.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-v{LAYOUT_VERSION}"))
    }

    fn link_path(&self, ifname: &str) -> PathBuf {
        self.dir.join(format!("link-{ifname}"))
    }

    /// Removes the pin of map `name` if it holds other than `entries` entries of `value_size`
    /// bytes, so that the load creates it anew. Only for maps that hold nothing a restart must
    /// keep: the outcome counters (one per outcome code: codes are appended, never renumbered) and
    /// `LINKS` (written whole from the state by every agent; its value grew a field). The other
    /// maps, conntrack among them, are reused as they are. Returns whether the pin was removed.
    pub fn drop_resized(&self, name: &str, entries: u32, value_size: u32) -> Result<bool> {
        let path = self.map_path(name);
        if !path.exists() {
            return Ok(false);
        }
        let info = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("opening {}", path.display()))?
            .info()
            .with_context(|| format!("reading {}", path.display()))?;
        let (pinned, pinned_size) = (info.max_entries(), info.value_size());
        if (pinned, pinned_size) == (entries, value_size) {
            return Ok(false);
        }
        log::warn!(
            "{name}: pinned with {pinned} entries of {pinned_size} bytes, this build has {entries} of {value_size}: created anew"
        );
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        Ok(true)
    }

    /// Maps pinned by an agent with another layout version (and so not reused).
    pub fn stale_maps(&self) -> Vec<PathBuf> {
        let current: Vec<String> = names::ALL
            .iter()
            .map(|n| format!("{n}-v{LAYOUT_VERSION}"))
            .collect();
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                let f = p.file_name().and_then(|f| f.to_str()).unwrap_or("");
                !f.starts_with("link-") && !current.iter().any(|c| c == f)
            })
            .collect()
    }

    /// Attaches `prog` to `ifname` through its pinned link if there is one (atomic replacement),
    /// else with a new link that is then pinned.
    pub fn attach(&self, prog: &mut Xdp, ifname: &str, mode: XdpMode) -> Result<Attached> {
        let path = self.link_path(ifname);
        if path.exists() {
            let replaced = PinnedLink::from_pin(&path)
                .map_err(anyhow::Error::from)
                .and_then(|p| XdpLink::try_from(FdLink::from(p)).map_err(anyhow::Error::from))
                .and_then(|l| prog.attach_to_link(l).map_err(anyhow::Error::from));
            match replaced {
                Ok(_) => return Ok(Attached::Replaced),
                Err(e) => {
                    // The interface went away and came back, say: start over with a new link.
                    log::warn!(
                        "pinned link {} unusable ({e:#}); attaching anew",
                        path.display()
                    );
                    std::fs::remove_file(&path).ok();
                }
            }
        }
        let id = prog
            .attach(ifname, mode)
            .with_context(|| format!("attaching to {ifname}"))?;
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .context("XDP link is not a bpf_link")?;
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        Ok(Attached::New)
    }

    /// Removes every pin: programs detach, maps are freed once nothing holds them.
    pub fn remove_all(&self) -> Result<usize> {
        let mut n = 0;
        for e in std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?
        {
            let p = e?.path();
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            n += 1;
        }
        std::fs::remove_dir(&self.dir).ok();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "\
22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 22 0:28 / /sys/fs/bpf rw,nosuid shared:12 - bpf bpf rw,mode=700
90 1 0:51 / /tmp/t/bpffs rw shared:40 - bpf bpf rw
";

    #[test]
    fn pins_persist_only_on_a_bpffs_the_host_has_mounted_too() {
        let dir = Path::new("/sys/fs/bpf/privatelink");
        assert_eq!(persistence(HOST, Some(HOST), dir), Persistence::Host);
        // `ip netns exec`: /sys remounted, and a bpffs of the process's own on /sys/fs/bpf.
        let netns_exec = "\
400 300 0:77 / /sys rw - sysfs sysfs rw
401 400 0:78 / /sys/fs/bpf rw - bpf bpf rw
";
        assert_eq!(
            persistence(netns_exec, Some(HOST), dir),
            Persistence::Private
        );
        // A test's bpffs, mounted on the host and seen through a copied mount namespace.
        let copied = "\
500 300 0:51 / /tmp/t/bpffs rw master:40 - bpf bpf rw
";
        let pins = Path::new("/tmp/t/bpffs/privatelink");
        assert_eq!(persistence(copied, Some(HOST), pins), Persistence::Host);
        // No bpffs under the directory at all, and an unreadable host.
        assert_eq!(persistence("", Some(HOST), dir), Persistence::Private);
        assert_eq!(persistence(netns_exec, None, dir), Persistence::Unknown);
        // The deepest mount wins.
        assert_eq!(
            bpffs_device(
                &format!("{HOST}91 90 0:99 / /sys/fs/bpf/privatelink rw - bpf bpf rw\n"),
                dir
            ),
            Some("0:99".to_string())
        );
    }
}
