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
//! - `<prefix>/presence/<node>`: the node's presence, under a lease the node keeps alive: it goes
//!   when the node stops renewing it (see `follow::keep_contact`).
//!
//! Followers (node agents, other API servers) list and watch, as Kubernetes informers do: a full
//! load reads every key at one etcd revision, in pages; a watch from the revision after it then
//! delivers each later transaction's events, which are applied to the state as one commit. A
//! history compacted past that point, a lost watch or a gap in the state revisions makes them load
//! in full again.
//!
//! Ids the datapath must agree on (link ids, service slots, network numbers) are allocated by the
//! operations from the state and committed in the same transaction, so every node writes the same
//! maps for the same state.
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};

use super::{
    state::State,
    store::{Commit, NodeReport, Presence, Store, StoreError},
    types::{Change, Object, kind_named},
};

/// Keys read per request of a full load: a few hundred KiB of typical objects.
const LOAD_PAGE: i64 = 500;

/// The largest response the store reads (a load page, a watch message with a backlog of
/// transactions): gRPC's default of 4 MiB would refuse a page of large security groups.
const MAX_MESSAGE: usize = 64 << 20;

/// Connection settings of the etcd store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Key prefix, without a trailing slash (e.g. `/privatelink`).
    pub prefix: String,
    /// Per request (connecting included).
    pub timeout: Duration,
    /// A store out of contact this long is taken for unreachable (HTTP/2 keepalive on every
    /// channel, and the presence lease's renewals, see `follow::keep_contact`).
    pub contact_timeout: Duration,
    /// The presence lease's time to live: a node that stops renewing it shows as gone after this.
    pub lease_ttl: Duration,
}

impl EtcdConfig {
    /// Connection options: timeouts, and HTTP/2 keepalive pings every second that give up after
    /// the contact timeout, so a dead path breaks the channel instead of leaving it silent.
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_keep_alive(Duration::from_secs(1), self.contact_timeout)
            .with_keep_alive_while_idle(true)
    }
}

/// The store. Its calls block (on a runtime of its own): it is used from blocking threads, as
/// the SQLite store is.
pub struct EtcdStore {
    /// Always `Some` until drop (taken there: a runtime dropped inside another's async context
    /// panics, a background shutdown does not).
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    cfg: EtcdConfig,
    /// The etcd revision the last load read: a watch from the one after it sees every later
    /// commit.
    loaded_at: Option<i64>,
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
        let opts = cfg.connect_options().with_timeout(cfg.timeout);
        let client = rt
            .block_on(Client::connect(&cfg.endpoints, Some(opts)))
            .map_err(|e| StoreError::Etcd(format!("connecting to {:?}: {e}", cfg.endpoints)))?;
        Ok(EtcdStore {
            rt: Some(rt),
            client,
            cfg,
            loaded_at: None,
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
        // Pages of keys, every page at the etcd revision of the first: the objects and the
        // revision as of one moment, however large the state.
        let prefix = format!("{}/", self.cfg.prefix);
        let end = range_end(&prefix);
        let rt = self.rt.as_ref().expect("runtime until drop");
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let mut state = State::default();
        let mut from = prefix.clone().into_bytes();
        let mut at = 0;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LOAD_PAGE);
            if at != 0 {
                opts = opts.with_revision(at);
            }
            let r = rt
                .block_on(kv.get(from.clone(), Some(opts)))
                .map_err(etcd)?;
            if at == 0 {
                at = r
                    .header()
                    .map(|h| h.revision())
                    .ok_or_else(|| StoreError::Etcd("a read without a revision".into()))?;
            }
            for kv in r.kvs() {
                let key = kv.key_str().map_err(etcd)?;
                match self.cfg.classify(key, Some(kv.value()))? {
                    Some(Keyed::Revision(v)) => state.revision = v,
                    Some(Keyed::Object(Change::Put(o))) => state.put(o),
                    _ => {}
                }
            }
            match r.kvs().last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        self.loaded_at = Some(at);
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

    fn watch_from(&self) -> Option<i64> {
        self.loaded_at.map(|at| at + 1)
    }

    fn presence(&mut self) -> Result<std::collections::BTreeMap<String, Presence>, StoreError> {
        let r = self
            .rt
            .as_ref()
            .expect("runtime until drop")
            .block_on(self.client.get(
                self.cfg.presence_prefix(),
                Some(GetOptions::new().with_prefix()),
            ))
            .map_err(etcd)?;
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Presence>(kv.value()).ok())
            .map(|p| (p.node.clone(), p))
            .collect())
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

/// The end of the key range of everything under `prefix` (which ends in `/`).
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    // `/` + 1: every key under the prefix sorts below it.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// What a key under the prefix holds.
// Lives for one key and is taken apart at once, as `Change` is: boxing would only add a copy.
#[allow(clippy::large_enum_variant)]
enum Keyed {
    /// The state revision.
    Revision(u64),
    /// An object written (`Put`) or deleted (`Delete`).
    Object(Change),
}

/// A watch event as etcd delivers it: `key` written (`value`) or deleted (`None`) by the
/// transaction of etcd revision `at`.
pub struct KeyEvent<'a> {
    pub at: i64,
    pub key: &'a str,
    pub value: Option<&'a [u8]>,
}

impl EtcdConfig {
    /// Where nodes keep their presence keys (each under a lease of its own).
    pub fn presence_prefix(&self) -> String {
        format!("{}/presence/", self.prefix)
    }

    /// What `key` (under this prefix) is: the revision, an object, or neither (node reports).
    /// `value`: `None` for a deletion.
    fn classify(&self, key: &str, value: Option<&[u8]>) -> Result<Option<Keyed>, StoreError> {
        let Some(rest) = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Ok(None);
        };
        if rest == "revision" {
            let value = value.ok_or_else(|| StoreError::Etcd(format!("{key} was deleted")))?;
            let v = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| StoreError::Etcd(format!("{key} is not a revision")))?;
            return Ok(Some(Keyed::Revision(v)));
        }
        let Some(rest) = rest.strip_prefix("objects/") else {
            return Ok(None);
        };
        let (kind, id) = rest.split_once('/').unwrap_or((rest, ""));
        let Some(value) = value else {
            return Ok(kind_named(kind).map(|kind| {
                Keyed::Object(Change::Delete {
                    kind,
                    id: id.to_string(),
                })
            }));
        };
        let o: Object = serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
            kind: kind.to_string(),
            id: id.to_string(),
            source,
        })?;
        Ok(Some(Keyed::Object(Change::Put(o))))
    }

    /// The commits among watch events, in order. The events of one etcd revision are one
    /// transaction: a commit when it wrote the revision key; one that wrote only node reports
    /// is no commit. Objects changed without the revision, or the revision deleted, are not a
    /// state any commit made: an error (the follower loads in full).
    pub fn commits<'a>(
        &self,
        events: impl IntoIterator<Item = KeyEvent<'a>>,
    ) -> Result<Vec<Commit>, StoreError> {
        let mut out = Vec::new();
        // The transaction being gathered: its etcd revision, state revision and changes.
        let mut txn: Option<(i64, Option<u64>, Vec<Change>)> = None;
        let finish = |txn: Option<(i64, Option<u64>, Vec<Change>)>,
                      out: &mut Vec<Commit>|
         -> Result<(), StoreError> {
            match txn {
                Some((_, Some(revision), changes)) => out.push(Commit { revision, changes }),
                Some((at, None, changes)) if !changes.is_empty() => {
                    return Err(StoreError::Etcd(format!(
                        "objects changed at etcd revision {at} without a state revision"
                    )));
                }
                _ => {}
            }
            Ok(())
        };
        for e in events {
            if txn.as_ref().is_some_and(|(at, _, _)| *at != e.at) {
                finish(txn.take(), &mut out)?;
            }
            let (_, revision, changes) = txn.get_or_insert_with(|| (e.at, None, Vec::new()));
            match self.classify(e.key, e.value)? {
                Some(Keyed::Revision(v)) => *revision = Some(v),
                Some(Keyed::Object(c)) => changes.push(c),
                None => {}
            }
        }
        finish(txn, &mut out)?;
        Ok(out)
    }
}

/// How a watch of the state's commits ended.
#[derive(Debug)]
pub enum WatchEnd {
    /// `apply` returned false (the caller loads in full).
    Stopped,
    /// etcd was unreachable or the stream ended: a watch from the returned position (the etcd
    /// revision after the last one seen) resumes without a full load.
    Lost(StoreError),
    /// The history was compacted past the position, or the events were no commits: only a full
    /// load helps.
    Broken(StoreError),
}

/// Follows the state's commits from etcd revision `*from` (the store's `watch_from` after a
/// load, or where a lost watch stopped): `apply` gets each commit in order, for as long as it
/// returns true; `*from` moves past every etcd revision seen, and `contact` is called on every
/// message. Returns how the watch ended.
pub async fn watch_commits<F: std::future::Future<Output = bool>>(
    cfg: &EtcdConfig,
    from: &mut i64,
    mut contact: impl FnMut(),
    mut apply: impl FnMut(Commit) -> F,
) -> WatchEnd {
    let client = match Client::connect(&cfg.endpoints, Some(cfg.connect_options())).await {
        Ok(c) => c,
        Err(e) => return WatchEnd::Lost(etcd(e)),
    };
    let mut watch = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
    let started = watch
        .watch(
            format!("{}/", cfg.prefix),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(*from)
                    .with_progress_notify(),
            ),
        )
        .await;
    let mut stream = match started {
        Ok(stream) => stream,
        Err(e) => return WatchEnd::Lost(etcd(e)),
    };
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return WatchEnd::Lost(StoreError::Etcd("the watch stream ended".into())),
            Err(e) => return WatchEnd::Lost(etcd(e)),
        };
        contact();
        if msg.canceled() {
            return WatchEnd::Broken(StoreError::Etcd(format!(
                "watch canceled (compacted at {}): {}",
                msg.compact_revision(),
                msg.cancel_reason()
            )));
        }
        let events: Vec<KeyEvent> = msg
            .events()
            .iter()
            .filter_map(|e| {
                let kv = e.kv()?;
                Some(KeyEvent {
                    at: kv.mod_revision(),
                    key: kv.key_str().ok()?,
                    value: (e.event_type() == EventType::Put).then(|| kv.value()),
                })
            })
            .collect();
        let last_seen = events.iter().map(|e| e.at).max();
        let commits = match cfg.commits(events) {
            Ok(c) => c,
            Err(e) => return WatchEnd::Broken(e),
        };
        for c in commits {
            if !apply(c).await {
                return WatchEnd::Stopped;
            }
        }
        if let Some(at) = last_seen {
            *from = (*from).max(at + 1);
        } else if !msg.created() {
            // A progress notification: every event up to its revision was delivered.
            if let Some(h) = msg.header() {
                *from = (*from).max(h.revision() + 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::types::Account;

    fn cfg() -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![],
            prefix: "/pl".into(),
            timeout: Duration::from_secs(1),
            contact_timeout: Duration::from_secs(3),
            lease_ttl: Duration::from_secs(5),
        }
    }

    fn account(id: &str) -> (Object, Vec<u8>) {
        let o = Object::Account(Account {
            id: id.into(),
            number: 7,
            name: format!("name of {id}"),
            created_at: 1,
        });
        let body = serde_json::to_vec(&o).unwrap();
        (o, body)
    }

    fn put<'a>(at: i64, key: &'a str, value: &'a [u8]) -> KeyEvent<'a> {
        KeyEvent {
            at,
            key,
            value: Some(value),
        }
    }

    fn delete(at: i64, key: &str) -> KeyEvent<'_> {
        KeyEvent {
            at,
            key,
            value: None,
        }
    }

    #[test]
    fn each_transaction_is_one_commit_with_its_puts_and_deletes_in_order() {
        let (a, body_a) = account("acc-a");
        let (b, body_b) = account("acc-b");
        let commits = cfg()
            .commits([
                put(10, "/pl/objects/account/acc-a", &body_a),
                put(10, "/pl/revision", b"4"),
                // A node's report: no commit of its own.
                put(11, "/pl/nodes/node-1", b"{}"),
                delete(12, "/pl/objects/account/acc-a"),
                put(12, "/pl/objects/account/acc-b", &body_b),
                delete(12, "/pl/objects/security_group/sg-1"),
                put(12, "/pl/revision", b"5"),
            ])
            .unwrap();
        assert_eq!(
            commits,
            [
                Commit {
                    revision: 4,
                    changes: vec![Change::Put(a)],
                },
                Commit {
                    revision: 5,
                    changes: vec![
                        Change::Delete {
                            kind: "account",
                            id: "acc-a".into(),
                        },
                        Change::Put(b),
                        Change::Delete {
                            kind: "security_group",
                            id: "sg-1".into(),
                        },
                    ],
                },
            ]
        );
    }

    #[test]
    fn keys_of_another_prefix_or_kind_are_no_changes() {
        let (_, body) = account("acc-a");
        let commits = cfg()
            .commits([
                // `/plx` merely starts like the prefix.
                put(3, "/plx/objects/account/acc-a", &body),
                delete(3, "/pl/objects/no_such_kind/x"),
                put(3, "/pl/revision", b"9"),
            ])
            .unwrap();
        assert_eq!(
            commits,
            [Commit {
                revision: 9,
                changes: vec![],
            }]
        );
    }

    #[test]
    fn events_that_no_commit_makes_are_errors() {
        let (_, body) = account("acc-a");
        let cases: [(&str, Vec<KeyEvent>); 4] = [
            (
                "objects without the revision",
                vec![put(5, "/pl/objects/account/acc-a", &body)],
            ),
            ("the revision deleted", vec![delete(5, "/pl/revision")]),
            (
                "a revision that is no number",
                vec![put(5, "/pl/revision", b"x")],
            ),
            (
                "an object that is no object",
                vec![
                    put(5, "/pl/objects/account/acc-a", b"{"),
                    put(5, "/pl/revision", b"2"),
                ],
            ),
        ];
        for (what, events) in cases {
            assert!(cfg().commits(events).is_err(), "{what}: an error");
        }
    }

    #[test]
    fn the_load_range_covers_exactly_the_prefix() {
        let end = range_end("/pl/");
        assert_eq!(end, b"/pl0");
        for inside in ["/pl/", "/pl/revision", "/pl/objects/\u{ff}"] {
            assert!(inside.as_bytes() < end.as_slice(), "{inside}");
        }
        for outside in ["/pl0", "/plx/objects/account/a", "/pm"] {
            assert!(outside.as_bytes() >= end.as_slice(), "{outside}");
        }
    }
}
