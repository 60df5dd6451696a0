//! High availability: the nodes of a group serve the same consumer networks, one of them active
//! at a time for each unit of ownership: the group's consumer networks together, or (with
//! `[ha.networks]`) each network alone, the units spread over the nodes (active-active by
//! network). The shared store (etcd) arbitrates; heartbeats between the nodes detect a dead one
//! within the fence time, far sooner than any lease could.
//!
//! The store holds one key per unit, `<prefix>/ha/<group>/active` (the whole group) or
//! `<prefix>/ha/<group>/active/<network id>`, naming the node that may forward for it. The group
//! prefers one node per unit ([`assignment`]): the preferred node creates a missing key, the
//! preferred survivor takes a dead owner's unit (the others a fence later, in case it cannot),
//! and with preemption an owner hands a unit to its preferred node once that node has been heard
//! long enough for its flows to be synced. The rules below hold per unit. A node forwards for a
//! unit only while all of these hold:
//! - the key names it, as the store confirmed within `fence - 2 x heartbeat` (its self-fence), or
//!   else the store is out of reach of every peer too (their heartbeats say so: none of them can
//!   take over, so forwarding goes on through an etcd outage);
//! - after taking the key over, the time the previous owner needs to fence itself has passed.
//!
//! A standby takes the key over, in one transaction that compares its revision, when the owner's
//! heartbeats have been missing for `fence`, or have said "not active" for that long (an owner
//! fenced off from the store). It starts forwarding one heartbeat after the transaction and no
//! sooner than `fence` after the owner's last heartbeat: by then the old owner, if it is alive, has
//! seen the key move (it looks every heartbeat) or fenced itself. Partition cases:
//! - owner dead: the standby forwards after `fence` + one heartbeat (about 600 ms by default);
//! - owner cut off from the standby only: the standby takes over as above; the owner reads the
//!   key at its next look and stops; at most one is active;
//! - owner cut off from the store only: it stops after its self-fence and says so in its
//!   heartbeats; the standby takes over `fence` later;
//! - owner cut off from both: it stops after its self-fence; the standby takes over after `fence`;
//! - every node cut off from the store: the owner goes on (each peer's heartbeat says it cannot
//!   claim), nobody else starts;
//! - the standby cut off from the store: nothing changes until it is back.
//!
//! Preemption is off by default: a node that returns stays standby while the owner is alive. A
//! node being drained (`privatelink-agent drain`: the key `<prefix>/ha/<group>/drain/<node>`
//! exists) stops forwarding, sends its peers a full copy of its conntrack, then hands each key to
//! the peer the group prefers among those it hears that reach the store (one heartbeat without an
//! active node: TCP retransmits), and claims nothing while the drain key stays. A node's datapath
//! keeps the consumer interfaces of the units it stands by for out of its model (their frames
//! pass to its kernel, which does not answer for the endpoints); becoming active for a unit puts
//! them in, adds the unit's provider-side addresses its NAT range (or slice) is routed through,
//! and announces the unit's endpoints and those addresses (gratuitous ARP, unsolicited neighbour
//! advertisements). A node sends the flows of the units it is active for to its peers
//! (`node::flowsync`: each new flow and TCP state change at once, from the datapath's events,
//! and the table periodically) and installs theirs, so the flows a node carried go on through
//! the node that takes its units over.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use privatelink_common::{Flow4, Flow6, FlowKey4, FlowKey6};

use crate::{
    control::{clock::unix_ms, etcd::EtcdConfig},
    datapath::{FlowSync, FlowTables, Model},
    node::{
        channel::{Beat, Kind, Message, Reject, Verifier, first_seq, seal},
        flowsync::{self, Outbox, Refuse, Update},
    },
};

/// The timing of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Between heartbeats, and between looks at the store.
    pub heartbeat: Duration,
    /// A peer silent this long is taken for dead; an owner stops when the store has not
    /// confirmed it for `fence - 2 x heartbeat`.
    pub fence: Duration,
}

impl Timing {
    fn self_fence(&self) -> Duration {
        self.fence.saturating_sub(self.heartbeat * 2)
    }
}

/// What a node knows of a peer, from its last accepted heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSeen {
    pub last: Instant,
    /// Heard without a silence longer than `fence` since then.
    pub up_since: Instant,
    pub active: bool,
    pub store: bool,
    pub draining: bool,
    /// Since when its heartbeats have said "not active" (`None`: the last one said active).
    pub inactive_since: Option<Instant>,
}

impl PeerSeen {
    /// Folds in a heartbeat accepted at `now` (`fence`: the silence after which a peer counts
    /// as newly up again).
    pub fn update(prev: Option<PeerSeen>, b: &Beat, now: Instant, fence: Duration) -> PeerSeen {
        let inactive_since = match (b.active, prev.and_then(|p| p.inactive_since)) {
            (true, _) => None,
            (false, Some(since)) => Some(since),
            (false, None) => Some(now),
        };
        let up_since = match prev {
            Some(p) if now.duration_since(p.last) <= fence => p.up_since,
            _ => now,
        };
        PeerSeen {
            last: now,
            up_since,
            active: b.active,
            store: b.store,
            draining: b.draining,
            inactive_since,
        }
    }
}

/// Consumer networks that have one owner in the group at a time, with what moves with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// Its name in the store: empty for the whole group (key `active`; `[ha]` without
    /// `networks`), else the consumer network's id (key `active/<id>`).
    pub name: String,
    /// Control-plane ids of its consumer networks.
    pub networks: Vec<String>,
    /// (interface name, address) added on the node active for it.
    pub addresses: Vec<(String, ipnet::IpNet)>,
}

/// Which candidate the group prefers for each unit: units in name order, each to its heaviest
/// candidate (rendezvous hashing) that has fewer than its share (`ceil(units / candidates)`).
/// Every node computes the same from the same units and candidates; the load is even, and a
/// change of candidates moves few units.
pub fn assignment<'a>(units: &'a [String], candidates: &[&'a str]) -> BTreeMap<&'a str, &'a str> {
    let mut out = BTreeMap::new();
    if candidates.is_empty() {
        return out;
    }
    let share = units.len().div_ceil(candidates.len());
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    let mut sorted: Vec<&String> = units.iter().collect();
    sorted.sort();
    for u in sorted {
        let mut order: Vec<&str> = candidates.to_vec();
        order.sort_by_key(|c| std::cmp::Reverse((weight(u, c), *c)));
        if let Some(c) = order
            .into_iter()
            .find(|c| load.get(c).copied().unwrap_or(0) < share)
        {
            *load.entry(c).or_default() += 1;
            out.insert(u.as_str(), c);
        }
    }
    out
}

/// The weight of `node` for `unit` (rendezvous hashing).
fn weight(unit: &str, node: &str) -> u64 {
    use sha2::Digest as _;
    let h = sha2::Sha256::new()
        .chain_update(unit)
        .chain_update([0])
        .chain_update(node)
        .finalize();
    u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
}

/// The nodes a unit may be given at `now`: this node `me` (unless `draining`) and the peers heard
/// within `fence` that reach the store and are not drained.
pub fn candidates<'a>(
    me: &'a str,
    draining: bool,
    peers: &'a BTreeMap<String, PeerSeen>,
    now: Instant,
    fence: Duration,
) -> Vec<&'a str> {
    peers
        .iter()
        .filter(|(_, p)| now.duration_since(p.last) <= fence && p.store && !p.draining)
        .map(|(n, _)| n.as_str())
        .chain((!draining).then_some(me))
        .collect()
}

/// The group's owner as the store has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub node: String,
    pub mod_revision: i64,
}

/// What the node asks of the store after a look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    Nothing,
    /// Nobody owns the group: create the key.
    Create,
    /// Take the key from `from` if it is still at `mod_revision`.
    Replace {
        from: String,
        mod_revision: i64,
    },
    /// Draining: give the key (still at `mod_revision`) to `to`.
    Handover {
        to: String,
        mod_revision: i64,
    },
}

/// The decisions of one node of a group, from what the store says and what the peers' heartbeats
/// say. Pure: time comes in as arguments.
#[derive(Clone, Debug)]
pub struct Arbiter {
    me: String,
    /// The unit it decides for (its name weighs the candidates).
    unit: String,
    /// Every unit of the group (the preferred nodes spread them evenly), shared by its arbiters.
    units: Arc<[String]>,
    t: Timing,
    started: Instant,
    /// When the store last said this node owns the unit.
    confirmed: Option<Instant>,
    /// Not before this after a claim.
    start_at: Option<Instant>,
    /// Being drained: forwards nothing, claims nothing, hands the unit over.
    draining: bool,
    /// Hand the unit to the preferred node once it has been heard this long (`None`: never).
    preempt: Option<Duration>,
    /// The owner the store names, and since when this node has seen it named: an owner's
    /// "not active" counts only from then (a node that just got the unit is not yet active).
    owner_seen: Option<(String, Instant)>,
    /// Since when the store has named no owner.
    absent_since: Option<Instant>,
}

impl Arbiter {
    pub fn new(me: &str, t: Timing, now: Instant) -> Self {
        Arbiter::for_unit(me, "", vec![String::new()].into(), t, None, now)
    }

    /// The arbiter of `unit`, one of the group's `units`.
    pub fn for_unit(
        me: &str,
        unit: &str,
        units: Arc<[String]>,
        t: Timing,
        preempt: Option<Duration>,
        now: Instant,
    ) -> Self {
        Arbiter {
            me: me.to_string(),
            unit: unit.to_string(),
            units,
            t,
            started: now,
            confirmed: None,
            start_at: None,
            draining: false,
            preempt,
            owner_seen: None,
            absent_since: None,
        }
    }

    /// Starts or ends a drain.
    pub fn drain(&mut self, on: bool) {
        self.draining = on;
    }

    /// The store took this node's handover: it forwards nothing of the unit from now on.
    pub fn handed_over(&mut self) {
        self.confirmed = None;
    }

    /// Whether the store named this node at its last look.
    pub fn owns(&self) -> bool {
        self.confirmed.is_some()
    }

    /// The node the group prefers for the unit at `now` (see [`assignment`] and
    /// [`candidates`]).
    pub fn preferred(&self, now: Instant, peers: &BTreeMap<String, PeerSeen>) -> Option<String> {
        let candidates = candidates(&self.me, self.draining, peers, now, self.t.fence);
        assignment(&self.units, &candidates)
            .get(self.unit.as_str())
            .map(|n| n.to_string())
    }

    /// One look at the store at `now`: `Some(owner)` as it answered (`Some(None)`: no owner), or
    /// `None` when it did not answer.
    pub fn observe(
        &mut self,
        now: Instant,
        owner: Option<Option<Owner>>,
        peers: &BTreeMap<String, PeerSeen>,
    ) -> Claim {
        let preferred = self.preferred(now, peers);
        self.observe_with(now, owner, peers, preferred)
    }

    /// [`Self::observe`] with the preferred node given: a node with many units computes the
    /// group's [`assignment`] once per look rather than once per unit.
    pub fn observe_with(
        &mut self,
        now: Instant,
        owner: Option<Option<Owner>>,
        peers: &BTreeMap<String, PeerSeen>,
        preferred: Option<String>,
    ) -> Claim {
        let Some(owner) = owner else {
            return Claim::Nothing;
        };
        let named = owner.as_ref().map(|o| o.node.as_str());
        if self.owner_seen.as_ref().map(|(n, _)| n.as_str()) != named {
            self.owner_seen = named.map(|n| (n.to_string(), now));
        }
        self.absent_since = match owner {
            None => Some(self.absent_since.unwrap_or(now)),
            Some(_) => None,
        };
        match owner {
            Some(o) if o.node == self.me && self.draining => {
                self.confirmed = Some(now);
                // To the peer the group prefers among those heard that reach the store.
                match preferred {
                    Some(to) => Claim::Handover {
                        to,
                        mod_revision: o.mod_revision,
                    },
                    None => Claim::Nothing,
                }
            }
            Some(o) if o.node == self.me => {
                self.confirmed = Some(now);
                // Preemption: back to the preferred node once it has been heard long enough
                // for the flows to be on it (a full copy goes to a peer that joins).
                match (self.preempt, preferred) {
                    (Some(after), Some(to))
                        if to != self.me
                            && self.active(now, peers)
                            && peers
                                .get(&to)
                                .is_some_and(|p| now.duration_since(p.up_since) >= after) =>
                    {
                        Claim::Handover {
                            to,
                            mod_revision: o.mod_revision,
                        }
                    }
                    _ => Claim::Nothing,
                }
            }
            _ if self.draining => {
                self.confirmed = None;
                Claim::Nothing
            }
            None => {
                self.confirmed = None;
                // The preferred node creates it once it has had time to hear its peers; any
                // node does when nobody has for a fence.
                let settled = now.duration_since(self.started) >= self.t.heartbeat * 3;
                let abandoned = self
                    .absent_since
                    .is_some_and(|s| now.duration_since(s) > self.t.fence);
                if (settled && preferred.as_deref() == Some(self.me.as_str())) || abandoned {
                    Claim::Create
                } else {
                    Claim::Nothing
                }
            }
            Some(o) => {
                self.confirmed = None;
                self.start_at = None;
                let named_since = self.owner_seen.as_ref().map_or(now, |(_, t)| *t);
                let gone_since = match peers.get(&o.node) {
                    // Never heard: give it a fence's time after this node started.
                    None => Some(self.started),
                    Some(p) if now.duration_since(p.last) > self.t.fence => Some(p.last),
                    Some(p) => p.inactive_since.map(|s| s.max(named_since)),
                };
                let gone_for = gone_since.map(|s| now.duration_since(s));
                // The preferred survivor takes it at once; the others a fence later, in case the
                // preferred one cannot.
                let mine = preferred.as_deref() == Some(self.me.as_str());
                let wait = if mine { self.t.fence } else { self.t.fence * 2 };
                if gone_for.is_some_and(|g| g > wait) {
                    Claim::Replace {
                        from: o.node.clone(),
                        mod_revision: o.mod_revision,
                    }
                } else {
                    Claim::Nothing
                }
            }
        }
    }

    /// The store granted this node's claim at `now`; `previous`: the last heartbeat of the node
    /// it took the group from.
    pub fn claimed(&mut self, now: Instant, previous: Option<Instant>) {
        self.confirmed = Some(now);
        let seen_by_old_owner = now + self.t.heartbeat;
        let fenced = previous.map_or(now, |last| last + self.t.fence);
        self.start_at = Some(seen_by_old_owner.max(fenced));
    }

    /// Whether this node forwards for the group at `now`.
    pub fn active(&self, now: Instant, peers: &BTreeMap<String, PeerSeen>) -> bool {
        let Some(confirmed) = self.confirmed.filter(|_| !self.draining) else {
            return false;
        };
        if self.start_at.is_some_and(|s| now < s) {
            return false;
        }
        if now.duration_since(confirmed) < self.t.self_fence() {
            return true;
        }
        // Out of reach of the store: on only while every peer is heard and cannot claim either.
        !peers.is_empty()
            && peers
                .values()
                .all(|p| now.duration_since(p.last) <= self.t.fence && !p.store)
    }
}

/// A group as the runtime runs it.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub group: String,
    pub node: String,
    pub listen: SocketAddr,
    pub peers: Vec<SocketAddr>,
    pub key: Vec<u8>,
    pub timing: Timing,
    pub max_clock_skew: Duration,
    /// The units of ownership: one per `[ha.networks]` section, or one for the whole group.
    pub units: Vec<Unit>,
    /// Preemption: a unit goes back to its preferred node once that node has been heard this
    /// long (`None`: off).
    pub preempt: Option<Duration>,
}

/// What the group's task shares with the node: the units it is active for, and the counts
/// metrics show.
#[derive(Debug, Default)]
pub struct HaShared {
    /// Unit name → whether this node forwards for it now.
    active: Mutex<BTreeMap<String, bool>>,
    /// Unit name → its consumer network ids.
    unit_networks: BTreeMap<String, Vec<String>>,
    /// Consumer network number → the unit it belongs to (with the model).
    by_network: Mutex<BTreeMap<u32, String>>,
    changed: tokio::sync::Notify,
    peers: Mutex<BTreeMap<String, PeerSeen>>,
    pub takeovers: AtomicU64,
    /// Being drained (the drain key exists).
    pub draining: AtomicBool,
    pub beats_sent: AtomicU64,
    pub beats_received: AtomicU64,
    rejected: Mutex<BTreeMap<Reject, u64>>,
    /// The node's current model, consumer interfaces included (what synced flows are checked
    /// against).
    model: Mutex<Option<Arc<Model>>>,
    pub flows_sent: AtomicU64,
    pub flows_received: AtomicU64,
    /// Peer → the send time (its clock, Unix ms) of the newest flow update taken from it.
    last_flows: Mutex<BTreeMap<String, u64>>,
    pub flows_installed: AtomicU64,
    /// Flow-sync events read from the datapath, and those a full ring lost (as it counts them).
    pub flow_events: AtomicU64,
    pub flow_events_lost: AtomicU64,
    refused: Mutex<BTreeMap<Refuse, u64>>,
}

impl HaShared {
    pub fn new(units: &[Unit]) -> Self {
        HaShared {
            active: Mutex::new(units.iter().map(|u| (u.name.clone(), false)).collect()),
            unit_networks: units
                .iter()
                .map(|u| (u.name.clone(), u.networks.clone()))
                .collect(),
            ..Default::default()
        }
    }

    /// Whether this node forwards for at least one unit.
    pub fn active(&self) -> bool {
        lock(&self.active).values().any(|a| *a)
    }

    /// The units this node forwards for now.
    pub fn active_units(&self) -> BTreeSet<String> {
        lock(&self.active)
            .iter()
            .filter(|(_, a)| **a)
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// Unit name → whether this node forwards for it now.
    pub fn units(&self) -> BTreeMap<String, bool> {
        lock(&self.active).clone()
    }

    /// The consumer networks (ids) this node forwards for now.
    pub fn networks(&self) -> Vec<String> {
        let active = self.active_units();
        self.unit_networks
            .iter()
            .filter(|(u, _)| active.contains(*u))
            .flat_map(|(_, n)| n.iter().cloned())
            .collect()
    }

    /// Each consumer network of the group (its id) → whether this node forwards for it now.
    pub fn network_states(&self) -> Vec<(String, bool)> {
        let active = self.units();
        self.unit_networks
            .iter()
            .flat_map(|(u, n)| {
                let on = active.get(u).copied().unwrap_or(false);
                n.iter().map(move |n| (n.clone(), on))
            })
            .collect()
    }

    /// Whether this node forwards for consumer network `network` (its number) now.
    pub fn forwards(&self, network: u32) -> bool {
        let unit = lock(&self.by_network).get(&network).cloned();
        unit.is_some_and(|u| lock(&self.active).get(&u).copied().unwrap_or(false))
    }

    /// Wakes when the node becomes active or stops being active.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Peer → whether its heartbeats are current (within `fence`).
    pub fn peers_up(&self, fence: Duration) -> BTreeMap<String, bool> {
        let now = Instant::now();
        lock(&self.peers)
            .iter()
            .map(|(n, p)| (n.clone(), now.duration_since(p.last) <= fence))
            .collect()
    }

    /// Peer → seconds since the newest flow update taken from it was sent: how stale this node's
    /// copy of the peer's flows may be (a node sends each change at once and everything every
    /// 3 s, so it stays under about 3 s while the peer syncs).
    pub fn sync_lag(&self) -> BTreeMap<String, f64> {
        let now = unix_ms();
        lock(&self.last_flows)
            .iter()
            .map(|(p, sent)| (p.clone(), now.saturating_sub(*sent) as f64 / 1000.0))
            .collect()
    }

    pub fn rejected(&self) -> BTreeMap<Reject, u64> {
        lock(&self.rejected).clone()
    }

    pub fn refused(&self) -> BTreeMap<Refuse, u64> {
        lock(&self.refused).clone()
    }

    /// The model the node applied last (or would apply, were it active for every unit), and
    /// its consumer networks' units by number.
    pub fn set_model(&self, m: Arc<Model>, by_network: BTreeMap<u32, String>) {
        *lock(&self.model) = Some(m);
        *lock(&self.by_network) = by_network;
    }

    fn set_active(&self, unit: &str, on: bool) {
        let was = lock(&self.active).insert(unit.to_string(), on);
        if was != Some(on) {
            self.changed.notify_one();
        }
    }

    /// Whether the flow of link `link` belongs to a unit this node forwards for (by `model`).
    fn owns_link(&self, model: &Model, link: u32) -> bool {
        model
            .links
            .get(&link)
            .is_some_and(|l| self.forwards(l.network_id))
    }

    /// Whether the flow of link `link` belongs to `unit` (by `model`).
    fn link_in(&self, model: &Model, link: u32, unit: &str) -> bool {
        let Some(l) = model.links.get(&link) else {
            return false;
        };
        lock(&self.by_network)
            .get(&l.network_id)
            .map(String::as_str)
            == Some(unit)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where the group's keys live in the store (with a trailing `/`, so that no group's prefix is
/// another's).
fn group_prefix(e: &EtcdConfig, group: &str) -> String {
    format!("{}/ha/{group}/", e.prefix)
}

/// A unit's key in the store: `active` for the whole group, `active/<network>` for one network.
pub fn active_key(e: &EtcdConfig, group: &str, unit: &str) -> String {
    match unit {
        "" => format!("{}active", group_prefix(e, group)),
        u => format!("{}active/{u}", group_prefix(e, group)),
    }
}

/// The key whose presence drains `node` of the group.
pub fn drain_key(e: &EtcdConfig, group: &str, node: &str) -> String {
    format!("{}drain/{node}", group_prefix(e, group))
}

/// Starts (`on`) or ends the drain of `node`: writes or deletes its drain key; a drain then waits
/// (at most 10 s) until no unit's key names it.
pub fn drain(e: &EtcdConfig, group: &str, node: &str, on: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = etcd_client::Client::connect(&e.endpoints, Some(e.connect_options()))
            .await
            .context("connecting to etcd")?;
        let key = drain_key(e, group, node);
        if !on {
            c.delete(key, None).await.context("deleting the drain key")?;
            println!("{node}: drain of group {group} ended (it stands by, and takes over again when a peer fails)");
            return Ok(());
        }
        c.put(key, "", None).await.context("writing the drain key")?;
        // Every unit's key: `active` and `active/<network>`.
        let active = active_key(e, group, "");
        let all = etcd_client::GetOptions::new().with_prefix();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = c.get(active.as_str(), Some(all.clone())).await?;
            let owners: BTreeSet<String> = r
                .kvs()
                .iter()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                .collect();
            if !owners.contains(node) {
                let with = owners.into_iter().collect::<Vec<_>>().join(", ");
                println!(
                    "{node}: drained; group {group} is with {}",
                    if with.is_empty() { "nobody" } else { &with }
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{node} still owns group {group} after 10 s: no peer is heard that reaches etcd (the drain stays asked)"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The socket buffers the group's channel asks for: a burst of new flows is sent at once, and a
/// datagram the peer's socket cannot take is lost (its flows wait for the next full copy).
pub const CHANNEL_BUFFER: usize = 4 << 20;

/// Asks for [`CHANNEL_BUFFER`] on both of `socket`'s buffers (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`; logged when it does).
pub fn widen_buffers(socket: &impl std::os::fd::AsFd) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(CHANNEL_BUFFER);
    let _ = s.set_send_buffer_size(CHANNEL_BUFFER);
    // Linux reports twice what it holds for bookkeeping.
    if let Ok(got) = s.recv_buffer_size()
        && got < CHANNEL_BUFFER
    {
        log::warn!(
            "ha: the channel's receive buffer is {} KiB (net.core.rmem_max caps it): a burst of new flows beyond it waits for the next full copy",
            got / 2048
        );
    }
}

/// Numbers and seals this node's messages.
struct Outgoing<'a> {
    g: &'a GroupConfig,
    seq: u64,
}

impl Outgoing<'_> {
    fn seal(&mut self, kind: Kind, payload: Vec<u8>) -> Vec<u8> {
        self.seq += 1;
        seal(
            &self.g.key,
            &Message {
                kind,
                group: self.g.group.clone(),
                node: self.g.node.clone(),
                sent_at_ms: unix_ms(),
                seq: self.seq,
                payload,
            },
        )
    }
}

/// Runs the group for this node until the task is dropped: heartbeats out and in, a look at the
/// store every heartbeat, claims for each unit when the rules above allow, the flow sync (out
/// for the units it is active for, in for the others), and `shared` kept current.
pub async fn run(
    g: GroupConfig,
    e: EtcdConfig,
    shared: Arc<HaShared>,
    mut tables: FlowTables,
    reader: FlowTables,
    events: FlowSync,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    // SAFETY: `events` owns the ring's descriptor, which stays open and the same for as long as
    // the `AsyncFd` holds it.
    let mut events = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
    .context("watching the datapath's flow-sync ring buffer")?;
    let socket = tokio::net::UdpSocket::bind(g.listen)
        .await
        .with_context(|| format!("ha.listen: binding {}", g.listen))?;
    widen_buffers(&socket);
    let mut verifier = Verifier::new(
        &g.key,
        &g.group,
        &g.node,
        &g.peers,
        g.max_clock_skew.as_millis() as u64,
    );
    let prefix = group_prefix(&e, &g.group);
    let drain = drain_key(&e, &g.group, &g.node);
    let started = Instant::now();
    // (unit, its key, its arbiter)
    let names: Arc<[String]> = g.units.iter().map(|u| u.name.clone()).collect();
    let mut units: Vec<(String, String, Arbiter)> = g
        .units
        .iter()
        .map(|u| {
            (
                u.name.clone(),
                active_key(&e, &g.group, &u.name),
                Arbiter::for_unit(
                    &g.node,
                    &u.name,
                    names.clone(),
                    g.timing,
                    g.preempt,
                    started,
                ),
            )
        })
        .collect();
    let mut tick = tokio::time::interval(g.timing.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<etcd_client::Client> = None;
    let mut store_ok = false;
    let mut out = Outgoing {
        g: &g,
        seq: first_seq(unix_ms()),
    };
    let mut outbox = Outbox::default();
    // The periodic table read runs on a blocking thread with a handle of its own (`reader`), so
    // that the datapath's events and the peers' messages never wait for it (a read costs in
    // proportion to the tables' capacity): (its handle, the tables, the outbox's epoch at its
    // start, whether it is a full copy).
    let mut reader = Some(reader);
    type Read = (FlowTables, Snapshot, u64, bool);
    let mut reading: Option<tokio::task::JoinHandle<Read>> = None;
    // A full copy is due (kept until a read that makes one starts).
    let mut full_due = false;
    let mut ticks = 0u64;
    let mut peers_up: BTreeSet<String> = Default::default();
    let mut buf = vec![0u8; 2048];
    log::info!(
        "ha: group {} on {}, peers {:?}, heartbeat {:?}, fence {:?}, {}",
        g.group,
        g.listen,
        g.peers,
        g.timing.heartbeat,
        g.timing.fence,
        match g.units.as_slice() {
            [u] if u.name.is_empty() => "one owner for the group".to_string(),
            us => format!(
                "an owner per network ({})",
                us.iter()
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    );
    loop {
        tokio::select! {
            done = async { reading.as_mut().expect("guarded by the condition").await }, if reading.is_some() => {
                reading = None;
                let (r, now, epoch, full) = match done {
                    Ok(read) => read,
                    Err(e) => {
                        log::error!("ha: the periodic table read failed ({e}); flows now go out from the datapath's events only");
                        continue;
                    }
                };
                reader = Some(r);
                // A diff or clear since the read started makes it stale: the next one counts.
                if epoch != outbox.epoch() || !shared.active() {
                    continue;
                }
                send_changes(&socket, &mut out, &mut outbox, &shared, now, full, None).await;
            }
            got = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                let refused = match verifier.accept(from, &buf[..n], unix_ms()) {
                    Ok(m) => receive(&m, &shared, &mut tables, g.timing.fence).err(),
                    Err(r) => Some(r),
                };
                if let Some(r) = refused {
                    *lock(&shared.rejected).entry(r).or_default() += 1;
                    log::debug!("ha: message from {from} refused: {}", r.as_str());
                }
            }
            ready = events.readable_mut() => {
                let Ok(mut ready) = ready else { continue };
                // Readiness cleared before the ring is read: an event committed after the last
                // read finds the reader caught up, and the kernel wakes it again.
                ready.clear_ready();
                let keys = ready.get_inner_mut().drain();
                shared.flow_events.fetch_add(keys.len() as u64, Ordering::Relaxed);
                // New flows and state changes of the units it is active for go out at once (what
                // it drains of others' is not its to send).
                if shared.active() && !keys.is_empty() {
                    let model = lock(&shared.model).clone();
                    let mut updates = flowsync::updates_for(&tables, &keys);
                    updates.retain(|u| {
                        u.link().is_some_and(|l| model.as_ref().is_some_and(|m| shared.owns_link(m, l)))
                    });
                    outbox.note(&updates);
                    send_updates(&socket, &mut out, &updates, &shared).await;
                }
            }
            _ = tick.tick() => {
                ticks += 1;
                shared
                    .flow_events_lost
                    .store(events.get_ref().lost(), Ordering::Relaxed);
                let now = Instant::now();
                let peers = lock(&shared.peers).clone();
                // "Active": forwarding for every unit the store names this node for.
                let forwarding = units
                    .iter()
                    .all(|(_, _, a)| !a.owns() || a.active(now, &peers));
                let draining = shared.draining.load(Ordering::Relaxed);
                let beat = Beat { active: forwarding && !draining, store: store_ok, draining };
                let beat = out.seal(Kind::Beat, beat.payload());
                for p in &g.peers {
                    if socket.send_to(&beat, p).await.is_ok() {
                        shared.beats_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // One read of the group's keys: the owners, and whether this node is drained.
                let keys = look(&mut client, &e, &prefix, g.timing.heartbeat).await;
                store_ok = keys.is_some();
                if let Some(keys) = &keys {
                    let on = keys.contains_key(&drain);
                    if on != shared.draining.swap(on, Ordering::Relaxed) {
                        log::warn!("ha: group {}: {}", g.group, if on { "draining" } else { "drain ended" });
                    }
                    for (_, _, a) in &mut units {
                        a.drain(on);
                    }
                }
                // The group's preferred node for every unit, once for all of them.
                let now = Instant::now();
                let draining = shared.draining.load(Ordering::Relaxed);
                let candidates = candidates(&g.node, draining, &peers, now, g.timing.fence);
                let preferred = assignment(&names, &candidates);
                for (unit, key, arbiter) in &mut units {
                    let owner = keys.as_ref().map(|k| k.get(key.as_str()).cloned());
                    let to = preferred.get(unit.as_str()).map(|n| n.to_string());
                    let claim = arbiter.observe_with(now, owner, &peers, to);
                    let what = if unit.is_empty() {
                        format!("group {}", g.group)
                    } else {
                        format!("group {} network {unit}", g.group)
                    };
                    if let Claim::Handover { to, .. } = &claim {
                        // Everything to the peers first (the unit's flows included), then the
                        // unit's forwarding stops.
                        let now = (tables.entries4(), tables.entries6());
                        let handing = Some(unit.as_str());
                        let n = send_changes(&socket, &mut out, &mut outbox, &shared, now, true, handing)
                            .await;
                        shared.set_active(unit, false);
                        log::warn!("ha: {what}: handing over to {to} ({n} flows sent)");
                    }
                    if claim == Claim::Nothing {
                        continue;
                    }
                    let previous = match &claim {
                        Claim::Replace { from, .. } => peers.get(from).map(|p| p.last),
                        _ => None,
                    };
                    if take(&mut client, key, &g.node, &claim, g.timing.heartbeat).await {
                        match &claim {
                            Claim::Replace { from, .. } => {
                                arbiter.claimed(Instant::now(), previous);
                                shared.takeovers.fetch_add(1, Ordering::Relaxed);
                                log::warn!("ha: {what}: took over from {from}");
                            }
                            Claim::Handover { to, .. } => {
                                arbiter.handed_over();
                                log::warn!("ha: {what}: handed over to {to}");
                            }
                            _ => {
                                arbiter.claimed(Instant::now(), previous);
                                log::info!("ha: {what}: owner");
                            }
                        }
                    }
                }
                let now = Instant::now();
                let was = shared.units();
                for (unit, _, arbiter) in &units {
                    let active = arbiter.active(now, &peers);
                    if was.get(unit).copied() != Some(active) {
                        log::warn!(
                            "ha: group {}{}: {}",
                            g.group,
                            if unit.is_empty() { String::new() } else { format!(" network {unit}") },
                            if active { "active" } else { "standby" }
                        );
                    }
                    shared.set_active(unit, active);
                }
                // A peer that joins or returns gets everything with the next sync.
                let up: BTreeSet<String> = shared
                    .peers_up(g.timing.fence)
                    .into_iter()
                    .filter_map(|(p, up)| up.then_some(p))
                    .collect();
                let joined = up.iter().any(|p| !peers_up.contains(p));
                peers_up = up;
                if !shared.active() {
                    outbox.clear();
                } else if ticks.is_multiple_of(2) {
                    // A full copy when a peer joined, and every 3 s; a read still running when
                    // the next is due is left to finish (the next tick tries again).
                    full_due |= joined || ticks.is_multiple_of(30);
                    if let Some(r) = reader.take() {
                        let (epoch, full) = (outbox.epoch(), std::mem::take(&mut full_due));
                        reading = Some(tokio::task::spawn_blocking(move || {
                            let now = (r.entries4(), r.entries6());
                            (r, now, epoch, full)
                        }));
                    }
                }
            }
        }
    }
}

/// Both conntrack tables as one read found them.
type Snapshot = (Vec<(FlowKey4, Flow4)>, Vec<(FlowKey6, Flow6)>);

/// Sends the peers what changed, in the tables as read (`now`), in the flows of the units this
/// node is active for since the outbox last sent (`full`: all of them), and the flows of unit
/// `handing` (being handed over: a drained node has stopped forwarding it already); how many
/// updates that was.
async fn send_changes(
    socket: &tokio::net::UdpSocket,
    out: &mut Outgoing<'_>,
    outbox: &mut Outbox,
    shared: &HaShared,
    (now4, now6): Snapshot,
    full: bool,
    handing: Option<&str>,
) -> usize {
    let Some(model) = lock(&shared.model).clone() else {
        return 0;
    };
    let updates = outbox.changes(now4, now6, full, |link| {
        shared.owns_link(&model, link) || handing.is_some_and(|u| shared.link_in(&model, link, u))
    });
    send_updates(socket, out, &updates, shared).await;
    updates.len()
}

/// Sends `updates` to every peer, as few messages as they fit in.
async fn send_updates(
    socket: &tokio::net::UdpSocket,
    out: &mut Outgoing<'_>,
    updates: &[Update],
    shared: &HaShared,
) {
    for payload in flowsync::encode(updates) {
        let msg = out.seal(Kind::Flows, payload);
        for p in &out.g.peers {
            let _ = socket.send_to(&msg, p).await;
        }
    }
    shared
        .flows_sent
        .fetch_add(updates.len() as u64, Ordering::Relaxed);
}

/// Takes in an authenticated message: a heartbeat updates what is known of its sender; flow
/// updates are installed for the units this node stands by for (it keeps its own table of the
/// units it is active for).
fn receive(
    m: &Message,
    shared: &HaShared,
    tables: &mut FlowTables,
    fence: Duration,
) -> Result<(), Reject> {
    match m.kind {
        Kind::Beat => {
            let b = Beat::parse(&m.payload)?;
            shared.beats_received.fetch_add(1, Ordering::Relaxed);
            let mut peers = lock(&shared.peers);
            let prev = peers.get(&m.node).copied();
            peers.insert(
                m.node.clone(),
                PeerSeen::update(prev, &b, Instant::now(), fence),
            );
        }
        Kind::Flows => {
            let updates = flowsync::decode(&m.payload).ok_or(Reject::Malformed)?;
            shared
                .flows_received
                .fetch_add(updates.len() as u64, Ordering::Relaxed);
            lock(&shared.last_flows).insert(m.node.clone(), m.sent_at_ms);
            let Some(model) = lock(&shared.model).clone() else {
                return Ok(());
            };
            install(&model, updates, shared, tables);
        }
    }
    Ok(())
}

/// Checks and writes received updates (see `flowsync::admit`), leaving out the flows of the
/// units this node is active for; counted in `shared`. (Public for the sync-throughput
/// benchmark, which drives the same path without a group.)
pub fn install(model: &Model, updates: Vec<Update>, shared: &HaShared, tables: &mut FlowTables) {
    let now = crate::datapath::scan::monotonic_ns();
    let mut refused = BTreeMap::new();
    let mut installed = 0;
    // A node that forwards for no unit owns no flow: no lookup needed.
    let active = shared.active();
    for u in updates {
        // The link of the entry as the update has it, or as this node's table has it (removal).
        let link = match &u {
            _ if !active => None,
            Update::Delete4(k) => tables.get4(k).map(|f| f.link_id),
            Update::Delete6(k) => tables.get6(k).map(|f| f.link_id),
            u => u.link(),
        };
        if link.is_some_and(|l| shared.owns_link(model, l)) {
            continue;
        }
        let written = match u {
            Update::Upsert4(k, f) => {
                flowsync::admit(model, &k, &f, now).map(|f| tables.insert4(&k, &f))
            }
            Update::Upsert6(k, f) => {
                flowsync::admit(model, &k, &f, now).map(|f| tables.insert6(&k, &f))
            }
            Update::Delete4(k) => Ok(tables.remove4(&k)),
            Update::Delete6(k) => Ok(tables.remove6(&k)),
        };
        match written {
            Ok(Ok(())) => installed += 1,
            Ok(Err(e)) => log::warn!("ha: writing a synced flow: {e}"),
            Err(r) => *refused.entry(r).or_insert(0u64) += 1,
        }
    }
    shared
        .flows_installed
        .fetch_add(installed, Ordering::Relaxed);
    let mut total = lock(&shared.refused);
    for (r, n) in refused {
        *total.entry(r).or_default() += n;
    }
}

/// The keys under `prefix` as the store has them within `bound` (`None`: no answer): key → the
/// node its value names, at its revision.
async fn look(
    client: &mut Option<etcd_client::Client>,
    e: &EtcdConfig,
    prefix: &str,
    bound: Duration,
) -> Option<BTreeMap<String, Owner>> {
    if client.is_none() {
        let c = tokio::time::timeout(
            e.timeout,
            etcd_client::Client::connect(&e.endpoints, Some(e.connect_options())),
        )
        .await;
        *client = c.ok().and_then(Result::ok);
    }
    let c = client.as_mut()?;
    let all = etcd_client::GetOptions::new().with_prefix();
    let r = tokio::time::timeout(bound, c.get(prefix, Some(all)))
        .await
        .ok()?
        .ok()?;
    Some(
        r.kvs()
            .iter()
            .map(|kv| {
                let owner = Owner {
                    node: String::from_utf8_lossy(kv.value()).into_owned(),
                    mod_revision: kv.mod_revision(),
                };
                (String::from_utf8_lossy(kv.key()).into_owned(), owner)
            })
            .collect(),
    )
}

/// Makes `me` the owner as `claim` says, if the key is still as it was seen.
async fn take(
    client: &mut Option<etcd_client::Client>,
    key: &str,
    me: &str,
    claim: &Claim,
    bound: Duration,
) -> bool {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let Some(c) = client.as_mut() else {
        return false;
    };
    let guard = match claim {
        Claim::Nothing => return false,
        Claim::Create => Compare::create_revision(key, CompareOp::Equal, 0),
        Claim::Replace { mod_revision, .. } | Claim::Handover { mod_revision, .. } => {
            Compare::mod_revision(key, CompareOp::Equal, *mod_revision)
        }
    };
    let owner = match claim {
        Claim::Handover { to, .. } => to.as_str(),
        _ => me,
    };
    let txn = Txn::new()
        .when([guard])
        .and_then([TxnOp::put(key, owner, None)]);
    matches!(
        tokio::time::timeout(bound, c.txn(txn)).await,
        Ok(Ok(r)) if r.succeeded()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        heartbeat: Duration::from_millis(100),
        fence: Duration::from_millis(500),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn owner(n: &str) -> Option<Option<Owner>> {
        Some(Some(Owner {
            node: n.into(),
            mod_revision: 7,
        }))
    }

    fn seen(last: Instant, active: bool, store: bool) -> PeerSeen {
        PeerSeen {
            last,
            up_since: last,
            active,
            store,
            draining: false,
            inactive_since: (!active).then_some(last),
        }
    }

    #[test]
    fn the_first_node_creates_the_key_and_forwards_after_one_heartbeat() {
        let t0 = Instant::now();
        let mut a = Arbiter::new("a", T, t0);
        let none = BTreeMap::new();
        // Not before it has had three heartbeats to hear its peers.
        assert_eq!(a.observe(t0, Some(None), &none), Claim::Nothing);
        assert_eq!(a.observe(t0 + ms(300), Some(None), &none), Claim::Create);
        let t1 = t0 + ms(300);
        a.claimed(t1, None);
        assert!(!a.active(t1, &none));
        assert!(a.active(t1 + ms(100), &none));
        // Confirmed every look: stays on.
        assert_eq!(a.observe(t1 + ms(200), owner("a"), &none), Claim::Nothing);
        assert!(a.active(t1 + ms(250), &none));
    }

    #[test]
    fn a_standby_takes_over_a_silent_owner_and_starts_once_it_has_fenced_itself() {
        let t0 = Instant::now();
        let mut b = Arbiter::new("b", T, t0);
        let mut peers = BTreeMap::from([("a".to_string(), seen(t0, true, true))]);
        // Heard within the fence: no claim.
        assert_eq!(b.observe(t0 + ms(400), owner("a"), &peers), Claim::Nothing);
        assert!(!b.active(t0 + ms(400), &peers));
        // Silent for longer than the fence: take it over.
        let claim = b.observe(t0 + ms(501), owner("a"), &peers);
        assert_eq!(
            claim,
            Claim::Replace {
                from: "a".into(),
                mod_revision: 7
            }
        );
        b.claimed(t0 + ms(510), Some(t0));
        assert!(
            !b.active(t0 + ms(600), &peers),
            "one heartbeat after the claim"
        );
        assert!(b.active(t0 + ms(610), &peers));
        // A peer that returns does not take it back (no preemption).
        peers.insert("a".into(), seen(t0 + ms(5000), false, true));
        let mut a = Arbiter::new("a", T, t0 + ms(4000));
        assert_eq!(
            a.observe(
                t0 + ms(5000),
                owner("b"),
                &BTreeMap::from([("b".to_string(), seen(t0 + ms(4990), true, true))])
            ),
            Claim::Nothing
        );
        assert!(!a.active(t0 + ms(5000), &peers));
    }

    #[test]
    fn an_owner_the_store_no_longer_confirms_stops_unless_no_peer_can_claim() {
        let t0 = Instant::now();
        let mut a = Arbiter::new("a", T, t0);
        let none = BTreeMap::new();
        a.observe(t0, owner("a"), &none);
        let self_fence = T.fence - T.heartbeat * 2;
        assert!(a.active(t0 + self_fence - ms(1), &none));
        // The store silent (no answer is no news): fenced, alone.
        assert_eq!(a.observe(t0 + ms(200), None, &none), Claim::Nothing);
        assert!(!a.active(t0 + self_fence, &none));
        // A peer that reaches the store could claim: fenced.
        let reaching = BTreeMap::from([("b".to_string(), seen(t0 + self_fence, false, true))]);
        assert!(!a.active(t0 + self_fence, &reaching));
        // Every peer cut off from the store too (an etcd outage): forwarding goes on.
        let cut = BTreeMap::from([("b".to_string(), seen(t0 + self_fence, false, false))]);
        assert!(a.active(t0 + self_fence, &cut));
        // ...until that peer falls silent.
        assert!(!a.active(t0 + self_fence + T.fence + ms(1), &cut));
    }

    #[test]
    fn an_owner_whose_key_moved_stops_at_its_next_look() {
        let t0 = Instant::now();
        let mut a = Arbiter::new("a", T, t0);
        let none = BTreeMap::new();
        a.observe(t0, owner("a"), &none);
        assert!(a.active(t0 + ms(50), &none));
        a.observe(t0 + ms(100), owner("b"), &none);
        assert!(!a.active(t0 + ms(100), &none));
    }

    #[test]
    fn a_fenced_owner_is_taken_over_after_saying_so_for_a_fence() {
        let t0 = Instant::now();
        let mut b = Arbiter::new("b", T, t0);
        let mut peers = BTreeMap::new();
        let mut prev = None;
        let beat = Beat {
            active: false,
            store: false,
            draining: false,
        };
        for i in 0..=5 {
            let now = t0 + ms(100 * i);
            let p = PeerSeen::update(prev, &beat, now, T.fence);
            prev = Some(p);
            peers.insert("a".to_string(), p);
            // Heard all along, but "not active" since t0: claimable 500 ms after.
            assert_eq!(b.observe(now, owner("a"), &peers), Claim::Nothing);
        }
        let p = PeerSeen::update(prev, &beat, t0 + ms(600), T.fence);
        peers.insert("a".to_string(), p);
        assert!(matches!(
            b.observe(t0 + ms(600), owner("a"), &peers),
            Claim::Replace { .. }
        ));
    }

    #[test]
    fn a_drained_owner_stops_and_hands_over_to_a_peer_that_reaches_the_store() {
        let t0 = Instant::now();
        let mut a = Arbiter::new("a", T, t0);
        let none = BTreeMap::new();
        a.observe(t0, owner("a"), &none);
        assert!(a.active(t0, &none));
        a.drain(true);
        assert!(!a.active(t0, &none), "a drained node forwards nothing");
        // No peer to hand over to: it keeps the key (and stands by).
        assert_eq!(a.observe(t0 + ms(100), owner("a"), &none), Claim::Nothing);
        let cut = BTreeMap::from([("b".to_string(), seen(t0 + ms(100), false, false))]);
        assert_eq!(a.observe(t0 + ms(100), owner("a"), &cut), Claim::Nothing);
        let b = BTreeMap::from([("b".to_string(), seen(t0 + ms(100), false, true))]);
        assert_eq!(
            a.observe(t0 + ms(200), owner("a"), &b),
            Claim::Handover {
                to: "b".into(),
                mod_revision: 7
            }
        );
        // Drained, it claims nothing, even from a silent owner.
        assert_eq!(a.observe(t0 + ms(5000), owner("b"), &none), Claim::Nothing);
        assert_eq!(a.observe(t0 + ms(5000), Some(None), &none), Claim::Nothing);
        // The receiving peer forwards at its next look, without waiting.
        let mut peer = Arbiter::new("b", T, t0);
        assert_eq!(
            peer.observe(t0 + ms(300), owner("b"), &none),
            Claim::Nothing
        );
        assert!(peer.active(t0 + ms(300), &none));
    }

    #[test]
    fn a_new_node_waits_a_fence_for_an_owner_it_never_heard() {
        let t0 = Instant::now();
        let mut b = Arbiter::new("b", T, t0);
        let none = BTreeMap::new();
        assert_eq!(b.observe(t0 + ms(300), owner("a"), &none), Claim::Nothing);
        assert!(matches!(
            b.observe(t0 + ms(501), owner("a"), &none),
            Claim::Replace { .. }
        ));
    }

    fn up(nodes: &[&str], t: Instant) -> BTreeMap<String, PeerSeen> {
        nodes
            .iter()
            .map(|n| (n.to_string(), seen(t, true, true)))
            .collect()
    }

    #[test]
    fn every_node_prefers_the_same_node_for_a_network_and_the_networks_spread() {
        let t0 = Instant::now();
        let nodes = ["node-a", "node-b", "node-c"];
        let mut per_node = BTreeMap::<String, usize>::new();
        let units: Vec<String> = (0..31).map(|i| format!("vpc-{i:08x}")).collect();
        for unit in &units {
            let picks: BTreeSet<Option<String>> = nodes
                .iter()
                .map(|me| {
                    let others: Vec<&str> = nodes.iter().copied().filter(|n| n != me).collect();
                    Arbiter::for_unit(me, unit, units.as_slice().into(), T, None, t0)
                        .preferred(t0, &up(&others, t0))
                })
                .collect();
            assert_eq!(picks.len(), 1, "{unit}: {picks:?}");
            *per_node
                .entry(picks.into_iter().next().flatten().unwrap())
                .or_default() += 1;
        }
        // 31 networks over three nodes: 11, 10, 10 in some order.
        let mut loads: Vec<usize> = per_node.values().copied().collect();
        loads.sort();
        assert_eq!(loads, [10, 10, 11], "{per_node:?}");
        // Two networks over two nodes: one each, whatever their names.
        for i in 0..20 {
            let two = [format!("vpc-{i:04x}a"), format!("vpc-{i:04x}b")];
            let got = assignment(&two, &["node-a", "node-b"]);
            assert_eq!(got.values().collect::<BTreeSet<_>>().len(), 2, "{got:?}");
        }
        // A node that leaves moves only its own networks.
        let all = assignment(&units, &nodes);
        let two = assignment(&units, &["node-a", "node-b"]);
        let moved = units
            .iter()
            .filter(|u| all[u.as_str()] != "node-c" && all[u.as_str()] != two[u.as_str()])
            .count();
        assert!(moved <= 2, "{moved} networks of the survivors moved");
        // A drained peer, one silent for a fence, or one cut off from the store is no candidate.
        let one = ["vpc-1".to_string()];
        let a = Arbiter::for_unit("node-a", "vpc-1", one.as_slice().into(), T, None, t0);
        let mut peers = up(&["node-b"], t0);
        peers.get_mut("node-b").unwrap().draining = true;
        assert_eq!(a.preferred(t0, &peers).as_deref(), Some("node-a"));
        let peers = up(&["node-b"], t0);
        assert_eq!(a.preferred(t0 + ms(501), &peers).as_deref(), Some("node-a"));
        let peers = BTreeMap::from([("node-b".to_string(), seen(t0, true, false))]);
        assert_eq!(a.preferred(t0, &peers).as_deref(), Some("node-a"));
    }

    fn group_units() -> Vec<String> {
        (0..8).map(|i| format!("vpc-{i:08x}")).collect()
    }

    /// A unit node `me` is preferred for, and one it is not, among `me` and `other`.
    fn units_for(me: &str, other: &str, t0: Instant) -> (String, String) {
        let peers = up(&[other], t0);
        let units = group_units();
        let prefers = |u: &String| {
            Arbiter::for_unit(me, u, units.as_slice().into(), T, None, t0)
                .preferred(t0, &peers)
                .as_deref()
                == Some(me)
        };
        (
            units.iter().find(|u| prefers(u)).unwrap().clone(),
            units.iter().find(|u| !prefers(u)).unwrap().clone(),
        )
    }

    #[test]
    fn the_preferred_node_creates_a_network_key_and_another_only_when_it_stays_absent() {
        let t0 = Instant::now();
        let (mine, theirs) = units_for("a", "b", t0);
        let peers = up(&["b"], t0 + ms(300));
        let mut a = Arbiter::for_unit("a", &mine, group_units().into(), T, None, t0);
        assert_eq!(a.observe(t0 + ms(300), Some(None), &peers), Claim::Create);
        let mut a = Arbiter::for_unit("a", &theirs, group_units().into(), T, None, t0);
        for i in 3..=8 {
            assert_eq!(
                a.observe(t0 + ms(100 * i), Some(None), &peers),
                Claim::Nothing,
                "b is preferred"
            );
        }
        // Absent for more than a fence (b cannot, or does not): a takes it.
        assert_eq!(a.observe(t0 + ms(901), Some(None), &peers), Claim::Create);
    }

    #[test]
    fn a_node_just_named_owner_is_not_taken_for_fenced_while_it_starts() {
        let t0 = Instant::now();
        // b's heartbeats have said "not active" for a long time (it owned nothing active)...
        let mut b_seen = seen(t0, false, true);
        b_seen.last = t0 + ms(5000);
        let peers = BTreeMap::from([("b".to_string(), b_seen)]);
        let mut a = Arbiter::for_unit("a", "vpc-1", vec!["vpc-1".into()].into(), T, None, t0);
        // ...then a sees the key name b (a handover, or a takeover after a partition).
        assert_eq!(a.observe(t0 + ms(5000), owner("b"), &peers), Claim::Nothing);
        assert_eq!(a.observe(t0 + ms(5400), owner("b"), &peers), Claim::Nothing);
        // Only "not active" for longer than a fence since it was named counts.
        let mut later = peers.clone();
        later.get_mut("b").unwrap().last = t0 + ms(5600);
        assert!(matches!(
            a.observe(t0 + ms(5600), owner("b"), &later),
            Claim::Replace { .. }
        ));
    }

    #[test]
    fn with_preemption_an_owner_hands_a_network_to_its_preferred_node_once_it_has_been_up_long_enough()
     {
        let t0 = Instant::now();
        let (_, theirs) = units_for("a", "b", t0);
        let after = ms(3000);
        let mut a = Arbiter::for_unit("a", &theirs, group_units().into(), T, Some(after), t0);
        a.claimed(t0, None);
        let back = t0 + ms(10_000);
        let mut peers = up(&["b"], back);
        for wait in [0, 1000, 2999] {
            peers.get_mut("b").unwrap().last = back + ms(wait);
            assert_eq!(
                a.observe(back + ms(wait), owner("a"), &peers),
                Claim::Nothing,
                "b up for {wait} ms"
            );
        }
        peers.get_mut("b").unwrap().last = back + ms(3000);
        assert_eq!(
            a.observe(back + ms(3000), owner("a"), &peers),
            Claim::Handover {
                to: "b".into(),
                mod_revision: 7
            }
        );
        a.handed_over();
        assert!(!a.active(back + ms(3000), &peers), "stops at once");
        // Off by default: never.
        let mut a = Arbiter::for_unit("a", &theirs, group_units().into(), T, None, t0);
        a.claimed(t0, None);
        assert_eq!(
            a.observe(
                back + ms(60_000),
                owner("a"),
                &up(&["b"], back + ms(60_000))
            ),
            Claim::Nothing
        );
    }

    #[test]
    fn the_preferred_survivor_takes_a_dead_owners_network_first() {
        let t0 = Instant::now();
        // Three nodes; c owned a unit that b is preferred for among {a, b}, and died at t0.
        let (unit, _) = units_for("b", "a", t0);
        let heard = |other: &str, last: Instant| {
            BTreeMap::from([
                (other.to_string(), seen(last, true, true)),
                ("c".to_string(), seen(t0, true, true)),
            ])
        };
        let mut a = Arbiter::for_unit("a", &unit, group_units().into(), T, None, t0);
        let mut b = Arbiter::for_unit("b", &unit, group_units().into(), T, None, t0);
        assert_eq!(a.observe(t0, owner("c"), &heard("b", t0)), Claim::Nothing);
        assert_eq!(b.observe(t0, owner("c"), &heard("a", t0)), Claim::Nothing);
        let t1 = t0 + ms(600);
        assert!(matches!(
            b.observe(t1, owner("c"), &heard("a", t1)),
            Claim::Replace { .. }
        ));
        assert_eq!(
            a.observe(t1, owner("c"), &heard("b", t1)),
            Claim::Nothing,
            "b goes first"
        );
        // If b does not, a does a fence later.
        let t2 = t0 + ms(1001);
        assert!(matches!(
            a.observe(t2, owner("c"), &heard("b", t2)),
            Claim::Replace { .. }
        ));
    }

    #[test]
    fn a_node_knows_which_flows_are_its_own_by_their_links_consumer_network() {
        let unit = |name: &str| Unit {
            name: name.into(),
            networks: vec![name.into()],
            addresses: vec![],
        };
        let shared = HaShared::new(&[unit("vpc-a"), unit("vpc-b")]);
        let link = |network_id| crate::testkit::demo::endpoint_link(network_id, 1);
        let model = Model {
            links: BTreeMap::from([(1, link(11)), (2, link(12))]),
            ..Default::default()
        };
        let by_network = BTreeMap::from([(11, "vpc-a".to_string()), (12, "vpc-b".to_string())]);
        shared.set_model(Arc::new(model.clone()), by_network);
        assert!(!shared.active() && !shared.owns_link(&model, 1));
        shared.set_active("vpc-a", true);
        assert!(shared.active());
        assert_eq!(
            (shared.owns_link(&model, 1), shared.owns_link(&model, 2)),
            (true, false)
        );
        // The unit being handed over is named, whether or not it still forwards.
        assert!(shared.link_in(&model, 2, "vpc-b") && !shared.link_in(&model, 1, "vpc-b"));
        assert!(!shared.owns_link(&model, 9), "an unknown link is nobody's");
        assert_eq!(shared.networks(), ["vpc-a"]);
        assert_eq!(
            shared.network_states(),
            [("vpc-a".to_string(), true), ("vpc-b".to_string(), false)]
        );
    }
}
