//! The node's interfaces: the wanted ones found in the kernel, the datapath attached to each
//! (through pinned links, so a restarted agent replaces the program in place), and the ones still
//! missing (attached when they appear).
use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use aya::programs::xdp::XdpMode;

use crate::{
    datapath::{
        loader::Datapath,
        pins::{Attached, Pins},
    },
    node::{
        config::{self, WantedIface, XdpModeConfig},
        metrics::AgentMetrics,
        sync::NodeConfig,
    },
};

/// Attaches to `name`; returns the mode it runs in.
fn attach(
    dp: &mut Datapath,
    pins: &Pins,
    name: &str,
    wanted: XdpModeConfig,
) -> Result<&'static str> {
    let prog = dp.program();
    let generic = wanted == XdpModeConfig::Generic;
    let mut mode = if generic { "generic" } else { "native" };
    let how = if generic {
        pins.attach(prog, name, XdpMode::Skb)
            .with_context(|| format!("attaching (generic) to {name}"))?
    } else {
        match pins.attach(prog, name, XdpMode::Driver) {
            Ok(a) => a,
            Err(e) => {
                log::warn!("native XDP on {name} failed ({e:#}); falling back to generic mode");
                mode = "generic";
                pins.attach(prog, name, XdpMode::Skb)
                    .with_context(|| format!("attaching (generic) to {name}"))?
            }
        }
    };
    match how {
        Attached::Replaced => {
            log::info!("{name}: replaced the running program through its pinned link")
        }
        Attached::New => log::info!("{name}: attached ({mode})"),
    }
    Ok(mode)
}

/// On veth, native XDP needs an XDP program on the peer too (or redirected frames and XDP_TX
/// replies are lost), and TX checksum offload off on the peer (or forwarded TCP arrives with a
/// partial checksum): says so when the peer is in this namespace and has no program.
fn warn_if_veth_peer_lacks_xdp(name: &str, ifindex: u32) {
    use crate::node::netlink;
    let Some(peer) = netlink::link(ifindex)
        .ok()
        .and_then(|l| netlink::visible_veth_peer(&l))
    else {
        return;
    };
    match netlink::link(peer) {
        Ok(p) if !netlink::has_xdp(&p) => log::warn!(
            "{name} is a veth attached natively, and its peer {} has no XDP program: redirected \
             frames and XDP_TX replies to it will be lost. Attach an XDP program to the peer (any \
             program that passes, e.g. the `pass` program), and turn TX checksum offload off on \
             it (`ethtool -K <peer> tx off`); see the README's section on veth",
            netlink::name(&p).unwrap_or("(unnamed)")
        ),
        _ => {}
    }
}

/// The node's interfaces as they are now: attaches to those that appeared or were re-created
/// (new ifindex), and returns whether the set changed (so the maps need a sync).
pub struct Interfaces {
    wanted: Vec<WantedIface>,
    /// The XDP mode each interface is configured for.
    modes: BTreeMap<String, XdpModeConfig>,
    /// The node's name, for the metrics' labels.
    node_name: String,
    /// name → (ifindex, mode) of interfaces with the program attached.
    attached: BTreeMap<String, (u32, &'static str)>,
    missing: Vec<String>,
}

impl Interfaces {
    pub fn new(
        wanted: Vec<WantedIface>,
        modes: BTreeMap<String, XdpModeConfig>,
        node_name: String,
    ) -> Self {
        Interfaces {
            wanted,
            modes,
            node_name,
            attached: BTreeMap::new(),
            missing: Vec::new(),
        }
    }

    /// How many interfaces the configuration names.
    pub fn wanted(&self) -> usize {
        self.wanted.len()
    }

    pub fn refresh(
        &mut self,
        dp: &mut Datapath,
        pins: &Pins,
        node: &mut NodeConfig,
        metrics: &AgentMetrics,
    ) -> bool {
        let (found, missing) = config::resolve(&self.wanted);
        if missing != self.missing {
            for m in &missing {
                log::warn!("interface {m} is not there; attaching when it appears");
            }
            self.missing = missing;
        }
        let present: BTreeMap<String, u32> =
            found.iter().map(|i| (i.name.clone(), i.ifindex)).collect();
        for (name, &ifindex) in &present {
            if self.attached.get(name).map(|a| a.0) == Some(ifindex) {
                continue;
            }
            match attach(
                dp,
                pins,
                name,
                self.modes.get(name).copied().unwrap_or_default(),
            ) {
                Ok(mode) => {
                    if mode == "native" {
                        warn_if_veth_peer_lacks_xdp(name, ifindex);
                    }
                    self.attached.insert(name.clone(), (ifindex, mode));
                }
                Err(e) => log::error!("{name}: {e:#}"),
            }
        }
        self.attached.retain(|n, _| present.contains_key(n));
        metrics.programs.clear();
        for (name, (_, mode)) in &self.attached {
            metrics
                .programs
                .get_or_create(&vec![
                    ("interface", name.clone()),
                    ("mode", mode.to_string()),
                    ("node", self.node_name.clone()),
                ])
                .set(1);
        }
        // Only interfaces with a program count as the node's.
        let ifaces: Vec<_> = found
            .into_iter()
            .filter(|i| self.attached.get(&i.name).map(|a| a.0) == Some(i.ifindex))
            .collect();
        let changed = ifaces != node.ifaces;
        node.ifaces = ifaces;
        changed
    }
}
