//! The control-plane service: state in memory, every mutation validated, committed to the store
//! as the next revision, then applied, then announced. A refused or failed mutation leaves both
//! the store and the state as they were.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;

use super::{
    error::{ApiError, ApiResult},
    ops::{Caller, Ctx, Outcome, accounts::token_hash},
    state::State,
    store::{Store, StoreError},
    types::Cluster,
};

struct Inner {
    state: State,
    store: Box<dyn Store>,
}

pub struct ControlPlane {
    inner: Mutex<Inner>,
    admin_sha256: String,
    revision: watch::Sender<u64>,
    /// Backend health as this node's checks see it: service id → (address, healthy).
    health: Mutex<BTreeMap<String, Vec<(IpAddr, bool)>>>,
    /// This node's monitoring history, when the agent keeps one.
    history: std::sync::OnceLock<Arc<Mutex<crate::history::History>>>,
    cluster: Cluster,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
            inner: Mutex::new(Inner { state, store }),
            admin_sha256: token_hash(admin_token),
            revision,
            health: Mutex::new(BTreeMap::new()),
            history: std::sync::OnceLock::new(),
            cluster: Cluster::default(),
        })
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
            .map(|t| Caller::Account(t.account_id.clone()))
            .ok_or_else(ApiError::unauthorized)
    }

    /// Reads the current state.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock().state)
    }

    /// A copy of the state (for the dataplane sync).
    pub fn snapshot(&self) -> State {
        self.lock().state.clone()
    }

    /// Announces every committed revision.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Runs a mutation: validate against the state, commit the changes as the next revision, apply.
    pub fn mutate<T>(
        &self,
        caller: &Caller,
        op: impl FnOnce(&State, &mut Ctx) -> Outcome<T>,
    ) -> ApiResult<T> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut rnd = random;
        let mut cx = Ctx {
            caller,
            now: now(),
            random: &mut rnd,
            cluster: &self.cluster,
        };
        let (changes, response) = op(&inner.state, &mut cx)?;
        if changes.is_empty() {
            return Ok(response);
        }
        let revision = inner.state.revision + 1;
        inner.store.commit(revision, &changes).map_err(|e| {
            log::error!("commit of revision {revision} failed: {e}");
            ApiError::new(
                503,
                "store_unavailable",
                format!("the change was not saved and not applied: {e}"),
            )
        })?;
        inner.state.apply(revision, &changes);
        drop(guard);
        self.revision.send_replace(revision);
        Ok(response)
    }

    /// Attaches the node's monitoring history (served by the API).
    pub fn set_history(&self, h: Arc<Mutex<crate::history::History>>) {
        let _ = self.history.set(h);
    }

    pub fn history(&self) -> Option<&Arc<Mutex<crate::history::History>>> {
        self.history.get()
    }

    /// Publishes this node's view of backend health (for the API).
    pub fn set_health(&self, h: BTreeMap<String, Vec<(IpAddr, bool)>>) {
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = h;
    }

    /// Each backend of `svc` with whether this node's checks find it healthy; a target not yet
    /// checked counts as healthy (targets start healthy).
    pub fn targets_health(&self, svc: &crate::control::types::Service) -> Vec<(IpAddr, bool)> {
        let all = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let seen = all.get(&svc.id);
        svc.backends
            .iter()
            .map(|ip| {
                let healthy = seen
                    .and_then(|s| s.iter().find(|(a, _)| a == ip))
                    .is_none_or(|(_, h)| *h);
                (*ip, healthy)
            })
            .collect()
    }

    pub fn revision(&self) -> u64 {
        self.lock().state.revision
    }
}
