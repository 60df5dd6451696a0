//! The control-plane service: state in memory, every mutation validated, committed to the store
//! as the next revision, then applied, then announced. A refused or failed mutation leaves both
//! the store and the state as they were.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

use super::{
    alloc::Allocations,
    clock::unix_secs,
    error::{ApiError, ApiResult},
    local::NodeLocal,
    ops::{Caller, Ctx, Outcome, accounts::token_hash},
    state::State,
    store::{Commit, NodeLiveness, NodeReport, NodeStatus, Store, StoreError},
    types::{Change, Cluster},
};

/// What became of a commit made elsewhere ([`ControlPlane::apply_remote`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remote {
    /// It was the next revision: the state has it now.
    Applied,
    /// The state had it already.
    Known,
    /// Revisions between the state's (`current`) and the commit's are missing: load in full.
    Gap { current: u64 },
}

struct Inner {
    /// Shared with the snapshots readers hold (metrics, history): a snapshot is a reference
    /// count, and a change while one is out copies the state once (`Arc::make_mut`).
    state: Arc<State>,
    /// What endpoint creation allocates from, kept in step with `state` by the two methods below,
    /// the only ways the state changes.
    alloc: Allocations,
    store: Box<dyn Store>,
}

impl Inner {
    fn new(state: State, store: Box<dyn Store>) -> Self {
        Inner {
            alloc: Allocations::of(&state),
            state: Arc::new(state),
            store,
        }
    }

    /// Takes a state loaded in full.
    fn replace(&mut self, state: State) {
        self.alloc = Allocations::of(&state);
        self.state = Arc::new(state);
    }

    /// Applies a commit's changes as `revision`.
    fn apply(&mut self, revision: u64, changes: &[Change]) {
        self.alloc.apply(&self.state, changes);
        Arc::make_mut(&mut self.state).apply(revision, changes);
    }
}

pub struct ControlPlane {
    inner: Mutex<Inner>,
    admin_sha256: String,
    revision: watch::Sender<u64>,
    /// The node this plane runs beside, if any: its health view, history and report.
    local: std::sync::OnceLock<Arc<dyn NodeLocal>>,
    cluster: Cluster,
    /// False while a shared store is out of reach: the state served may be stale.
    store_reachable: std::sync::atomic::AtomicBool,
    /// Failed authentication per client address.
    auth_limiter: super::authlimit::AuthLimiter,
    /// Console sessions signed in at this server.
    sessions: super::session::Sessions,
}

/// How long a refused commit waits for the store's follower to bring the state to the store's
/// revision before loading it in full.
const CATCH_UP: std::time::Duration = std::time::Duration::from_millis(500);

fn unavailable(revision: u64, e: StoreError) -> ApiError {
    log::error!("commit of revision {revision} failed: {e}");
    ApiError::new(
        503,
        "store_unavailable",
        format!("the change was not saved and not applied: {e}"),
    )
}

fn random() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the OS random source");
    u32::from_ne_bytes(b)
}

/// A new API token: 32 random bytes, hex.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source");
    format!("pl_{}", hex::encode(b))
}

impl ControlPlane {
    /// Loads the state from `store`. `admin_token` manages accounts and networks.
    pub fn open(mut store: Box<dyn Store>, admin_token: &str) -> Result<Self, StoreError> {
        let state = store.load()?;
        let (revision, _) = watch::channel(state.revision);
        Ok(ControlPlane {
            inner: Mutex::new(Inner::new(state, store)),
            admin_sha256: token_hash(admin_token),
            revision,
            local: std::sync::OnceLock::new(),
            cluster: Cluster::default(),
            store_reachable: std::sync::atomic::AtomicBool::new(true),
            auth_limiter: Default::default(),
            sessions: Default::default(),
        })
    }

    /// Whether the store is in reach (always, for the embedded one): while not, reads are served
    /// from the last state and the API says so.
    pub fn store_reachable(&self) -> bool {
        self.store_reachable
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Set by the shared store's follower.
    pub fn set_store_reachable(&self, up: bool) {
        self.store_reachable
            .store(up, std::sync::atomic::Ordering::Relaxed);
    }

    /// With the cluster's region and DNS zone (defaults otherwise).
    pub fn with_cluster(mut self, cluster: Cluster) -> Self {
        self.cluster = cluster;
        self
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic inside an operation cannot leave a half-applied state (state changes only after
        // a commit), so a poisoned lock is safe to take over.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Failed authentications by client address, and their counts.
    pub fn auth_limiter(&self) -> &super::authlimit::AuthLimiter {
        &self.auth_limiter
    }

    /// Console sessions signed in at this server.
    pub fn sessions(&self) -> &super::session::Sessions {
        &self.sessions
    }

    /// Who a bearer token belongs to.
    pub fn authenticate(&self, bearer: Option<&str>) -> ApiResult<Caller> {
        let token = bearer.ok_or_else(ApiError::unauthorized)?;
        let hash = token_hash(token);
        if hash == self.admin_sha256 {
            return Ok(Caller::Admin);
        }
        self.lock()
            .state
            .tokens
            .get(&hash)
            .filter(|t| t.valid_at(unix_secs()))
            .map(|t| Caller::Account(t.account_id.clone()))
            .ok_or_else(ApiError::unauthorized)
    }

    /// Who `token` (resolved only when `peer` is not over its limit) belongs to, with failed
    /// authentication limited per client address: an address over its limit is refused (429)
    /// before anything is looked at, and a failure counts against it, except a missing CSRF token
    /// (no guess at a credential). The caller, and the token it presented.
    pub fn authenticate_from(
        &self,
        peer: Option<IpAddr>,
        token: impl FnOnce() -> ApiResult<Option<String>>,
    ) -> ApiResult<(Caller, String)> {
        if let Some(ip) = peer {
            self.auth_limiter.check(ip)?;
        }
        token()
            .and_then(|t| {
                let caller = self.authenticate(t.as_deref())?;
                Ok((caller, t.unwrap_or_default()))
            })
            .inspect_err(|e| {
                if let Some(ip) = peer
                    && e.code != "csrf"
                {
                    self.auth_limiter.failed(ip);
                }
            })
    }

    /// Reads the current state.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock().state)
    }

    /// The current state, to read without holding the control plane's lock (metrics, history):
    /// shared, not copied (a copy of 100k endpoints took 50 ms, under the lock).
    pub fn snapshot(&self) -> Arc<State> {
        Arc::clone(&self.lock().state)
    }

    /// Announces every committed revision.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Runs a mutation: validate against the state, commit the changes as the next revision, apply.
    /// When a shared store moved on meanwhile (another API server committed first), the state
    /// catches up (by the store's follower, or a full load when that does not come within
    /// [`CATCH_UP`]) and the caller gets a 409 to retry; [`ControlPlane::mutate_retrying`] retries.
    pub fn mutate<T>(
        &self,
        caller: &Caller,
        op: impl FnOnce(&State, &mut Ctx) -> Outcome<T>,
    ) -> ApiResult<T> {
        self.attempt(caller, op).unwrap_or_else(|| {
            Err(ApiError::conflict(
                "state_changed",
                "another server changed the state first; retry the request",
            ))
        })
    }

    /// The same, validating again against the caught-up state when another server committed
    /// first (a bounded number of times).
    pub fn mutate_retrying<T>(
        &self,
        caller: &Caller,
        op: impl Fn(&State, &mut Ctx) -> Outcome<T>,
    ) -> ApiResult<T> {
        for _ in 0..16 {
            if let Some(r) = self.attempt(caller, &op) {
                return r;
            }
        }
        Err(ApiError::new(
            503,
            "state_busy",
            "the state kept changing under this request; retry it",
        ))
    }

    /// Loads the store's state in full, takes it if it is at another revision than ours (changes
    /// committed by other servers) and announces it. Returns where a watch of the store starts to
    /// see every later commit (`Store::watch_from`).
    pub fn refresh(&self) -> Result<Option<i64>, StoreError> {
        let mut guard = self.lock();
        let fresh = guard.store.load()?;
        let from = guard.store.watch_from();
        if fresh.revision == guard.state.revision {
            return Ok(from);
        }
        let revision = fresh.revision;
        guard.replace(fresh);
        drop(guard);
        self.revision.send_replace(revision);
        Ok(from)
    }

    /// Applies a commit another server made, as a watch of the store delivered it, and announces
    /// it. Only the next revision applies; one this state has (its own commits, or a load that
    /// was newer than the watch) is passed over.
    pub fn apply_remote(&self, commit: &Commit) -> Remote {
        let mut guard = self.lock();
        let current = guard.state.revision;
        if commit.revision <= current {
            return Remote::Known;
        }
        if commit.revision != current + 1 {
            return Remote::Gap { current };
        }
        guard.apply(commit.revision, &commit.changes);
        drop(guard);
        self.revision.send_replace(commit.revision);
        Remote::Applied
    }

    /// Records that a node applied a revision (in a shared store, for every server to list).
    pub fn report_applied(&self, report: &NodeReport) -> Result<(), StoreError> {
        self.lock().store.report(&report.node, report)
    }

    /// Every node that ever reported: the shared store's reports, with the attached node's own,
    /// each live or gone by its presence lease, with its lag behind this server's state. The node
    /// this server runs beside is live (it is answering); with the embedded store it is the only one.
    pub fn nodes(&self) -> Result<Vec<NodeStatus>, StoreError> {
        let (reports, presence) = {
            let mut inner = self.lock();
            (inner.store.nodes()?, inner.store.presence()?)
        };
        let mut all: BTreeMap<String, NodeReport> =
            reports.into_iter().map(|r| (r.node.clone(), r)).collect();
        let local = self.local.get().and_then(|l| l.report());
        if let Some(r) = &local {
            all.insert(r.node.clone(), r.clone());
        }
        let current = self.revision();
        Ok(all
            .into_values()
            .map(|r| {
                let here = local.as_ref().is_some_and(|l| l.node == r.node);
                let seen = presence.get(&r.node);
                let contact = seen.map(|p| p.contact);
                let live = here || contact.is_some();
                let ha = if here {
                    self.local.get().and_then(|l| l.ha())
                } else {
                    seen.and_then(|p| p.ha.clone())
                };
                NodeStatus {
                    status: if live {
                        NodeLiveness::Live
                    } else {
                        NodeLiveness::Gone
                    },
                    last_contact: if here && self.store_reachable() {
                        unix_secs()
                    } else {
                        contact.unwrap_or(r.reported_at).max(r.reported_at)
                    },
                    lag: current.saturating_sub(r.revision),
                    node: r.node,
                    revision: r.revision,
                    reported_at: r.reported_at,
                    ha,
                    api: r.api,
                }
            })
            .collect())
    }

    /// One try: `None` when the store refused the commit because it is at another revision (the
    /// state is reloaded then).
    fn attempt<T>(
        &self,
        caller: &Caller,
        op: impl FnOnce(&State, &mut Ctx) -> Outcome<T>,
    ) -> Option<ApiResult<T>> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut rnd = random;
        let mut cx = Ctx {
            caller,
            now: unix_secs(),
            random: &mut rnd,
            cluster: &self.cluster,
            alloc: &inner.alloc,
        };
        let (mut changes, response) = match op(&inner.state, &mut cx) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        // A write that changes nothing (an empty PATCH, the same value again) is no revision.
        changes.retain(|c| !inner.state.holds(c));
        if changes.is_empty() {
            return Some(Ok(response));
        }
        let revision = inner.state.revision + 1;
        match inner.store.commit(revision, &changes) {
            Ok(()) => {}
            Err(StoreError::Conflict { current, .. }) => {
                // A followed store's watch brings the state to `current` within milliseconds:
                // waiting for that spares a full load (a second at 100k objects, under the lock
                // every request and the follower need).
                if inner.store.watch_from().is_some() {
                    drop(guard);
                    if self.caught_up(current, CATCH_UP) {
                        log::info!(
                            "revision {revision}: the store was at {current}; validating again"
                        );
                        return None;
                    }
                    guard = self.lock();
                }
                let inner = &mut *guard;
                log::info!(
                    "revision {revision}: the store is at {current}; reloading and validating again"
                );
                return match inner.store.load() {
                    Ok(fresh) => {
                        let r = fresh.revision;
                        inner.replace(fresh);
                        drop(guard);
                        self.revision.send_replace(r);
                        None
                    }
                    Err(e) => Some(Err(unavailable(revision, e))),
                };
            }
            Err(e) => return Some(Err(unavailable(revision, e))),
        }
        inner.apply(revision, &changes);
        drop(guard);
        self.revision.send_replace(revision);
        Some(Ok(response))
    }

    /// Whether the state reaches `revision` (applied by the store's follower) within `wait`.
    fn caught_up(&self, revision: u64, wait: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if self.revision() >= revision {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Attaches the node this plane runs beside (once; later calls are ignored).
    pub fn attach_node(&self, local: Arc<dyn NodeLocal>) {
        let _ = self.local.set(local);
    }

    /// The attached node, if any.
    pub fn node_local(&self) -> Option<Arc<dyn NodeLocal>> {
        self.local.get().cloned()
    }

    /// Each backend of `svc` with whether the attached node's checks find it healthy; a target
    /// not yet checked, or without a node, counts as healthy (targets start healthy).
    pub fn targets_health(&self, svc: &crate::control::types::Service) -> Vec<(IpAddr, bool)> {
        let local = self.local.get();
        svc.backends
            .iter()
            .map(|ip| {
                let healthy = local.and_then(|l| l.backend_healthy(&svc.id, *ip));
                (*ip, healthy.unwrap_or(true))
            })
            .collect()
    }

    pub fn revision(&self) -> u64 {
        self.lock().state.revision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::types::{Account, Change, Object};

    /// A store at revision 2 that takes every commit.
    struct AtTwo;

    impl Store for AtTwo {
        fn load(&mut self) -> Result<State, StoreError> {
            Ok(State {
                revision: 2,
                ..State::default()
            })
        }
        fn commit(&mut self, _revision: u64, _changes: &[Change]) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn put(revision: u64, id: &str) -> Commit {
        Commit {
            revision,
            changes: vec![Change::Put(Object::Account(Account {
                id: id.into(),
                number: revision as u32,
                name: id.into(),
                created_at: 0,
            }))],
        }
    }

    /// A followed store at revision 2 where another server commits revision 3 first: it refuses
    /// the first commit, then takes every one; it counts its loads.
    struct Raced {
        loads: Arc<std::sync::atomic::AtomicU32>,
        refused: bool,
    }

    impl Store for Raced {
        fn load(&mut self) -> Result<State, StoreError> {
            self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            AtTwo.load()
        }
        fn commit(&mut self, revision: u64, _changes: &[Change]) -> Result<(), StoreError> {
            if !self.refused {
                self.refused = true;
                return Err(StoreError::Conflict {
                    wanted: revision,
                    current: 3,
                });
            }
            Ok(())
        }
        fn watch_from(&self) -> Option<i64> {
            Some(1)
        }
    }

    #[test]
    fn a_refused_commit_waits_for_the_follower_instead_of_loading_everything() {
        let loads = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let store = Raced {
            loads: loads.clone(),
            refused: false,
        };
        let plane =
            Arc::new(ControlPlane::open(Box::new(store), "admin-token-for-the-test").unwrap());
        // The follower delivers the other server's commit a little later.
        let follower = {
            let plane = plane.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(30));
                assert_eq!(plane.apply_remote(&put(3, "remote")), Remote::Applied);
            })
        };
        let mine = put(0, "local").changes;
        plane
            .mutate_retrying(&Caller::Admin, |_, _| Ok((mine.clone(), ())))
            .expect("committed after validating again");
        follower.join().unwrap();
        assert_eq!(plane.revision(), 4, "the remote commit, then this one");
        assert!(
            plane.read(|s| s.accounts.contains_key("remote") && s.accounts.contains_key("local"))
        );
        assert_eq!(
            loads.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "loaded once, at open: the conflict waited for the follower"
        );
    }

    #[test]
    fn snapshots_are_shared_and_keep_their_revision_while_the_state_moves_on() {
        let plane = ControlPlane::open(Box::new(AtTwo), "admin-token-for-the-test").unwrap();
        let held = plane.snapshot();
        assert!(
            Arc::ptr_eq(&held, &plane.snapshot()),
            "no copy per snapshot"
        );
        assert_eq!(plane.apply_remote(&put(3, "next")), Remote::Applied);
        assert_eq!(held.revision, 2, "a held snapshot stays as it was");
        assert!(!held.accounts.contains_key("next"));
        let now = plane.snapshot();
        assert_eq!(now.revision, 3);
        assert!(now.accounts.contains_key("next"));
    }

    #[test]
    fn only_the_next_revision_applies_and_a_gap_changes_nothing() {
        let plane = ControlPlane::open(Box::new(AtTwo), "admin-token-for-the-test").unwrap();
        let mut announced = plane.subscribe();
        assert_eq!(plane.apply_remote(&put(2, "old")), Remote::Known);
        assert_eq!(
            plane.apply_remote(&put(4, "far")),
            Remote::Gap { current: 2 }
        );
        assert_eq!(*plane.snapshot(), AtTwo.load().unwrap(), "nothing applied");
        assert!(!announced.has_changed().unwrap(), "nothing announced");

        assert_eq!(plane.apply_remote(&put(3, "next")), Remote::Applied);
        assert_eq!(plane.revision(), 3);
        assert!(plane.read(|s| s.accounts.contains_key("next")));
        assert_eq!(*announced.borrow_and_update(), 3, "announced");
        let deleted = Commit {
            revision: 4,
            changes: vec![Change::Delete {
                kind: "account",
                id: "next".into(),
            }],
        };
        assert_eq!(plane.apply_remote(&deleted), Remote::Applied);
        assert!(plane.read(|s| s.accounts.is_empty()), "the delete applied");
        assert_eq!(plane.apply_remote(&deleted), Remote::Known, "once only");
    }
}
