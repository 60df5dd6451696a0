//! High availability: the nodes of a group serve the same consumer networks, one of them active
//! at a time. The shared store (etcd) arbitrates; heartbeats between the nodes detect a dead one
//! within the fence time, far sooner than any lease could.
//!
//! The store holds one key per group, `<prefix>/ha/<group>/active`, naming the node that may
//! forward. A node forwards for the group only while all of these hold:
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
//! There is no preemption: a node that returns stays standby while the owner is alive. A node
//! being drained (`privatelink-agent drain`: the key `<prefix>/ha/<group>/drain/<node>` exists)
//! stops forwarding, sends its peers a full copy of its conntrack, then hands the key to a peer it
//! hears that reaches the store (one heartbeat without an active node: TCP retransmits), and
//! claims nothing while the drain key stays. The
//! standby's datapath keeps the group's consumer interfaces out of its model (their frames pass to
//! its kernel, which does not answer for the endpoints); becoming active puts them in, adds the
//! provider-side addresses the NAT ranges are routed through, and announces the endpoints and
//! those addresses (gratuitous ARP, unsolicited neighbour advertisements). The active node sends
//! its conntrack to the standbys (`node::flowsync`: each new flow and TCP state change at once,
//! from the datapath's events, and the table periodically), so the flows it carried go on
//! through the node that takes over.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    control::etcd::EtcdConfig,
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
    pub active: bool,
    pub store: bool,
    /// Since when its heartbeats have said "not active" (`None`: the last one said active).
    pub inactive_since: Option<Instant>,
}

impl PeerSeen {
    /// Folds in a heartbeat accepted at `now`.
    pub fn update(prev: Option<PeerSeen>, b: &Beat, now: Instant) -> PeerSeen {
        let inactive_since = match (b.active, prev.and_then(|p| p.inactive_since)) {
            (true, _) => None,
            (false, Some(since)) => Some(since),
            (false, None) => Some(now),
        };
        PeerSeen {
            last: now,
            active: b.active,
            store: b.store,
            inactive_since,
        }
    }
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
    t: Timing,
    started: Instant,
    /// When the store last said this node owns the group.
    confirmed: Option<Instant>,
    /// Not before this after a claim.
    start_at: Option<Instant>,
    /// Being drained: forwards nothing, claims nothing, hands the group over.
    draining: bool,
}

impl Arbiter {
    pub fn new(me: &str, t: Timing, now: Instant) -> Self {
        Arbiter {
            me: me.to_string(),
            t,
            started: now,
            confirmed: None,
            start_at: None,
            draining: false,
        }
    }

    /// Starts or ends a drain.
    pub fn drain(&mut self, on: bool) {
        self.draining = on;
    }

    /// One look at the store at `now`: `Some(owner)` as it answered (`Some(None)`: no owner), or
    /// `None` when it did not answer.
    pub fn observe(
        &mut self,
        now: Instant,
        owner: Option<Option<Owner>>,
        peers: &BTreeMap<String, PeerSeen>,
    ) -> Claim {
        let Some(owner) = owner else {
            return Claim::Nothing;
        };
        match owner {
            Some(o) if o.node == self.me && self.draining => {
                self.confirmed = Some(now);
                // To a peer that is heard and reaches the store.
                let to = peers
                    .iter()
                    .find(|(_, p)| now.duration_since(p.last) <= self.t.fence && p.store);
                match to {
                    Some((to, _)) => Claim::Handover {
                        to: to.clone(),
                        mod_revision: o.mod_revision,
                    },
                    None => Claim::Nothing,
                }
            }
            Some(o) if o.node == self.me => {
                self.confirmed = Some(now);
                Claim::Nothing
            }
            _ if self.draining => {
                self.confirmed = None;
                Claim::Nothing
            }
            None => {
                self.confirmed = None;
                Claim::Create
            }
            Some(o) => {
                self.confirmed = None;
                self.start_at = None;
                let gone = match peers.get(&o.node) {
                    // Never heard: give it a fence's time after this node started.
                    None => now.duration_since(self.started) > self.t.fence,
                    Some(p) => {
                        now.duration_since(p.last) > self.t.fence
                            || p.inactive_since
                                .is_some_and(|s| now.duration_since(s) > self.t.fence)
                    }
                };
                if gone {
                    Claim::Replace {
                        from: o.node,
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
}

/// What the group's task shares with the node: whether it is active, and the counts metrics show.
#[derive(Debug, Default)]
pub struct HaShared {
    active: AtomicBool,
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
    pub flows_installed: AtomicU64,
    /// Flow-sync events read from the datapath, and those a full ring lost (as it counts them).
    pub flow_events: AtomicU64,
    pub flow_events_lost: AtomicU64,
    refused: Mutex<BTreeMap<Refuse, u64>>,
}

impl HaShared {
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
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

    pub fn rejected(&self) -> BTreeMap<Reject, u64> {
        lock(&self.rejected).clone()
    }

    pub fn refused(&self) -> BTreeMap<Refuse, u64> {
        lock(&self.refused).clone()
    }

    /// The model the node applied last (or would apply, were it active).
    pub fn set_model(&self, m: Arc<Model>) {
        *lock(&self.model) = Some(m);
    }

    fn set_active(&self, on: bool) {
        if self.active.swap(on, Ordering::Relaxed) != on {
            self.changed.notify_one();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where the group's keys live in the store (with a trailing `/`, so that no group's prefix is
/// another's).
fn group_prefix(e: &EtcdConfig, group: &str) -> String {
    format!("{}/ha/{group}/", e.prefix)
}

/// The group's key in the store.
pub fn active_key(e: &EtcdConfig, group: &str) -> String {
    format!("{}active", group_prefix(e, group))
}

/// The key whose presence drains `node` of the group.
pub fn drain_key(e: &EtcdConfig, group: &str, node: &str) -> String {
    format!("{}drain/{node}", group_prefix(e, group))
}

/// Starts (`on`) or ends the drain of `node`: writes or deletes its drain key; a drain then waits
/// (at most 10 s) until the group's key names another node.
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
        let active = active_key(e, group);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = c.get(active.as_str(), None).await?;
            let owner = r
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
            if owner.as_deref() != Some(node) {
                println!(
                    "{node}: drained; group {group} is with {}",
                    owner.as_deref().unwrap_or("nobody")
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
/// store every heartbeat, claims when the rules above allow, the flow sync (out while active,
/// in while standing by), and `shared` kept current.
pub async fn run(
    g: GroupConfig,
    e: EtcdConfig,
    shared: Arc<HaShared>,
    mut tables: FlowTables,
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
    let mut verifier = Verifier::new(
        &g.key,
        &g.group,
        &g.node,
        &g.peers,
        g.max_clock_skew.as_millis() as u64,
    );
    let prefix = group_prefix(&e, &g.group);
    let key = active_key(&e, &g.group);
    let drain = drain_key(&e, &g.group, &g.node);
    let mut arbiter = Arbiter::new(&g.node, g.timing, Instant::now());
    let mut tick = tokio::time::interval(g.timing.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<etcd_client::Client> = None;
    let mut store_ok = false;
    let mut out = Outgoing {
        g: &g,
        seq: first_seq(unix_ms()),
    };
    let mut outbox = Outbox::default();
    let mut ticks = 0u64;
    let mut peers_up: std::collections::BTreeSet<String> = Default::default();
    let mut buf = vec![0u8; 2048];
    log::info!(
        "ha: group {} on {}, peers {:?}, heartbeat {:?}, fence {:?}",
        g.group,
        g.listen,
        g.peers,
        g.timing.heartbeat,
        g.timing.fence
    );
    loop {
        tokio::select! {
            got = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                let refused = match verifier.accept(from, &buf[..n], unix_ms()) {
                    Ok(m) => receive(&m, &shared, &mut tables).err(),
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
                // New flows and state changes go out at once while active (a standby makes
                // none for the group; what it drains is not its to send).
                if shared.active() && !keys.is_empty() {
                    let updates = flowsync::updates_for(&tables, &keys);
                    outbox.note(&updates);
                    send_updates(&socket, &mut out, &updates, &shared).await;
                }
            }
            _ = tick.tick() => {
                ticks += 1;
                shared
                    .flow_events_lost
                    .store(events.get_ref().lost(), Ordering::Relaxed);
                let beat = out.seal(Kind::Beat, Beat { active: shared.active(), store: store_ok }.payload());
                for p in &g.peers {
                    if socket.send_to(&beat, p).await.is_ok() {
                        shared.beats_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // One read of the group's keys: the owner, and whether this node is drained.
                let keys = look(&mut client, &e, &prefix, g.timing.heartbeat).await;
                store_ok = keys.is_some();
                if let Some(keys) = &keys {
                    let on = keys.contains_key(&drain);
                    if on != shared.draining.swap(on, Ordering::Relaxed) {
                        log::warn!("ha: group {}: {}", g.group, if on { "draining" } else { "drain ended" });
                    }
                    arbiter.drain(on);
                }
                let owner = keys.map(|mut k| k.remove(&key));
                let now = Instant::now();
                let peers = lock(&shared.peers).clone();
                let claim = arbiter.observe(now, owner, &peers);
                if let Claim::Handover { to, .. } = &claim {
                    // Everything to the peers first, from a table no longer written to.
                    shared.set_active(false);
                    let n = send_flows(&socket, &mut out, &mut outbox, &tables, &shared, true).await;
                    log::warn!("ha: group {}: handing over to {to} ({n} flows sent)", g.group);
                }
                if claim != Claim::Nothing {
                    let previous = match &claim {
                        Claim::Replace { from, .. } => peers.get(from).map(|p| p.last),
                        _ => None,
                    };
                    if take(&mut client, &key, &g.node, &claim, g.timing.heartbeat).await {
                        match &claim {
                            Claim::Replace { from, .. } => {
                                arbiter.claimed(Instant::now(), previous);
                                shared.takeovers.fetch_add(1, Ordering::Relaxed);
                                log::warn!("ha: group {}: took over from {from}", g.group);
                            }
                            Claim::Handover { to, .. } => {
                                log::warn!("ha: group {}: handed over to {to}", g.group);
                            }
                            _ => {
                                arbiter.claimed(Instant::now(), previous);
                                log::info!("ha: group {}: owner", g.group);
                            }
                        }
                    }
                }
                let active = arbiter.active(Instant::now(), &peers);
                if active != shared.active() {
                    log::warn!(
                        "ha: group {}: {}",
                        g.group,
                        if active { "active" } else { "standby" }
                    );
                }
                shared.set_active(active);
                // A peer that joins or returns gets everything with the next sync.
                let up: std::collections::BTreeSet<String> = shared
                    .peers_up(g.timing.fence)
                    .into_iter()
                    .filter_map(|(p, up)| up.then_some(p))
                    .collect();
                let joined = up.iter().any(|p| !peers_up.contains(p));
                peers_up = up;
                if !active {
                    outbox.clear();
                } else if ticks.is_multiple_of(2) {
                    let full = joined || ticks.is_multiple_of(30);
                    send_flows(&socket, &mut out, &mut outbox, &tables, &shared, full).await;
                }
            }
        }
    }
}

/// Sends the peers what changed in the tables since the outbox last sent (`full`: everything);
/// how many updates that was.
async fn send_flows(
    socket: &tokio::net::UdpSocket,
    out: &mut Outgoing<'_>,
    outbox: &mut Outbox,
    tables: &FlowTables,
    shared: &HaShared,
    full: bool,
) -> usize {
    let updates = outbox.changes(tables.entries4(), tables.entries6(), full);
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
/// updates are installed while this node stands by (an active node keeps its own table).
fn receive(m: &Message, shared: &HaShared, tables: &mut FlowTables) -> Result<(), Reject> {
    match m.kind {
        Kind::Beat => {
            let b = Beat::parse(&m.payload)?;
            shared.beats_received.fetch_add(1, Ordering::Relaxed);
            let mut peers = lock(&shared.peers);
            let prev = peers.get(&m.node).copied();
            peers.insert(m.node.clone(), PeerSeen::update(prev, &b, Instant::now()));
        }
        Kind::Flows => {
            let updates = flowsync::decode(&m.payload).ok_or(Reject::Malformed)?;
            shared
                .flows_received
                .fetch_add(updates.len() as u64, Ordering::Relaxed);
            let model = lock(&shared.model).clone();
            let (Some(model), false) = (model, shared.active()) else {
                return Ok(());
            };
            install(&model, updates, shared, tables);
        }
    }
    Ok(())
}

/// Checks and writes received updates (see `flowsync::admit`).
fn install(model: &Model, updates: Vec<Update>, shared: &HaShared, tables: &mut FlowTables) {
    let now = crate::datapath::scan::monotonic_ns();
    let mut refused = BTreeMap::new();
    let mut installed = 0;
    for u in updates {
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
            active,
            store,
            inactive_since: (!active).then_some(last),
        }
    }

    #[test]
    fn the_first_node_creates_the_key_and_forwards_after_one_heartbeat() {
        let t0 = Instant::now();
        let mut a = Arbiter::new("a", T, t0);
        let none = BTreeMap::new();
        assert_eq!(a.observe(t0, Some(None), &none), Claim::Create);
        a.claimed(t0, None);
        assert!(!a.active(t0, &none));
        assert!(a.active(t0 + ms(100), &none));
        // Confirmed every look: stays on.
        assert_eq!(a.observe(t0 + ms(200), owner("a"), &none), Claim::Nothing);
        assert!(a.active(t0 + ms(250), &none));
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
        for i in 0..=6 {
            let now = t0 + ms(100 * i);
            let beat = Beat {
                active: false,
                store: false,
            };
            let p = PeerSeen::update(prev, &beat, now);
            prev = Some(p);
            peers.insert("a".to_string(), p);
        }
        // Heard all along, but "not active" since t0: claimable 500 ms after.
        assert_eq!(b.observe(t0 + ms(500), owner("a"), &peers), Claim::Nothing);
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
}
