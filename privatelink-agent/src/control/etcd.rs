//! The control-plane state in etcd v3, shared by every API server and node agent of a cluster.
//!
//! Keys under the configured prefix:
//! - `<prefix>/revision`: the state revision (decimal). Every mutation is one transaction that
//!   compares it with the revision the mutation was validated against, writes the changed objects
//!   and the next revision, or does nothing. Two API servers racing therefore never lose an
//!   update or break a rule checked on the state (such as one address per subnet): the loser's
//!   transaction fails, it reloads and validates again.
//! - `<prefix>/objects/<kind>/<id>`: one object each, as JSON (the same bodies as SQLite).
//! - `<prefix>/nodes/<node>`: what each node agent last applied (outside the revision).
//!
//! Ids the datapath must agree on (link ids, service slots, network numbers) are allocated by the
//! operations from the state and committed in the same transaction, so every node writes the same
//! maps for the same state.
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

use super::{
    state::State,
    store::{NodeReport, Store, StoreError},
    types::{Change, Object},
};

/// Connection settings of the etcd store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Key prefix, without a trailing slash (e.g. `/privatelink`).
    pub prefix: String,
    /// Per request (connecting included).
    pub timeout: Duration,
}

/// The store. Its calls block (on a runtime of its own): it is used from blocking threads, as
/// the SQLite store is.
pub struct EtcdStore {
    /// Always `Some` until drop (taken there: a runtime dropped inside another's async context
    /// panics, a background shutdown does not).
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    cfg: EtcdConfig,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn etcd(e: impl std::fmt::Display) -> StoreError {
    StoreError::Etcd(e.to_string())
}

impl EtcdStore {
    pub fn connect(cfg: EtcdConfig) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(etcd)?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(cfg.timeout)
            .with_timeout(cfg.timeout);
        let client = rt
            .block_on(Client::connect(&cfg.endpoints, Some(opts)))
            .map_err(|e| StoreError::Etcd(format!("connecting to {:?}: {e}", cfg.endpoints)))?;
        Ok(EtcdStore {
            rt: Some(rt),
            client,
            cfg,
        })
    }

    fn revision_key(&self) -> String {
        format!("{}/revision", self.cfg.prefix)
    }

    fn object_key(&self, kind: &str, id: &str) -> String {
        format!("{}/objects/{kind}/{id}", self.cfg.prefix)
    }

    fn node_key(&self, node: &str) -> String {
        format!("{}/nodes/{node}", self.cfg.prefix)
    }

    /// The stored revision (0 when nothing was ever committed).
    fn current(&mut self) -> Result<u64, StoreError> {
        let key = self.revision_key();
        let r = self
            .rt
            .as_ref()
            .expect("runtime until drop")
            .block_on(self.client.get(key, None))
            .map_err(etcd)?;
        Ok(r.kvs()
            .first()
            .and_then(|kv| kv.value_str().ok()?.parse().ok())
            .unwrap_or(0))
    }
}

impl Store for EtcdStore {
    fn load(&mut self) -> Result<State, StoreError> {
        // One range read: the objects and the revision at the same etcd revision.
        let r = self
            .rt
            .as_ref()
            .expect("runtime until drop")
            .block_on(self.client.get(
                format!("{}/", self.cfg.prefix),
                Some(GetOptions::new().with_prefix()),
            ))
            .map_err(etcd)?;
        let objects = format!("{}/objects/", self.cfg.prefix);
        let revision_key = self.revision_key();
        let mut state = State::default();
        for kv in r.kvs() {
            let key = kv.key_str().map_err(etcd)?;
            if key == revision_key {
                state.revision = kv
                    .value_str()
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| StoreError::Etcd(format!("{key} is not a revision")))?;
            } else if let Some(rest) = key.strip_prefix(&objects) {
                let (kind, id) = rest.split_once('/').unwrap_or((rest, ""));
                let o: Object =
                    serde_json::from_slice(kv.value()).map_err(|source| StoreError::Corrupt {
                        kind: kind.to_string(),
                        id: id.to_string(),
                        source,
                    })?;
                state.put(o);
            }
        }
        Ok(state)
    }

    fn commit(&mut self, revision: u64, changes: &[Change]) -> Result<(), StoreError> {
        let key = self.revision_key();
        let guard = if revision == 1 {
            // Nothing committed yet: the key must not exist.
            Compare::create_revision(key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(key.clone(), CompareOp::Equal, (revision - 1).to_string())
        };
        let mut ops: Vec<TxnOp> = changes
            .iter()
            .map(|c| match c {
                Change::Put(o) => TxnOp::put(
                    self.object_key(o.kind(), o.id()),
                    serde_json::to_vec(o).expect("objects serialise"),
                    None,
                ),
                Change::Delete { kind, id } => TxnOp::delete(self.object_key(kind, id), None),
            })
            .collect();
        ops.push(TxnOp::put(key, revision.to_string(), None));
        let txn = Txn::new().when([guard]).and_then(ops);
        let r = self
            .rt
            .as_ref()
            .expect("runtime until drop")
            .block_on(self.client.txn(txn))
            .map_err(etcd)?;
        if r.succeeded() {
            return Ok(());
        }
        Err(StoreError::Conflict {
            wanted: revision,
            current: self.current()?,
        })
    }

    fn report(&mut self, node: &str, report: &NodeReport) -> Result<(), StoreError> {
        let key = self.node_key(node);
        let body = serde_json::to_vec(report).expect("reports serialise");
        self.rt
            .as_ref()
            .expect("runtime until drop")
            .block_on(self.client.put(key, body, None))
            .map_err(etcd)?;
        Ok(())
    }

    fn nodes(&mut self) -> Result<Vec<NodeReport>, StoreError> {
        let r = self
            .rt
            .as_ref()
            .expect("runtime until drop")
            .block_on(self.client.get(
                format!("{}/nodes/", self.cfg.prefix),
                Some(GetOptions::new().with_prefix()),
            ))
            .map_err(etcd)?;
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect())
    }
}

/// Calls `changed` once when watching starts (whatever was committed before is caught by the
/// caller reloading then) and once per committed revision after, until the stream ends or fails.
/// The caller reconnects and reloads the whole state, which covers a compacted history or a lost
/// watch.
pub async fn watch_revisions(
    cfg: &EtcdConfig,
    mut changed: impl FnMut(),
) -> Result<(), StoreError> {
    let opts = ConnectOptions::new().with_connect_timeout(cfg.timeout);
    let mut client = Client::connect(&cfg.endpoints, Some(opts))
        .await
        .map_err(etcd)?;
    let key = format!("{}/revision", cfg.prefix);
    let mut stream = client.watch(key, None).await.map_err(etcd)?;
    changed();
    while let Some(msg) = stream.message().await.map_err(etcd)? {
        if msg.canceled() {
            return Err(StoreError::Etcd(format!(
                "watch canceled (compacted at {})",
                msg.compact_revision()
            )));
        }
        if !msg.events().is_empty() {
            changed();
        }
    }
    Ok(())
}
