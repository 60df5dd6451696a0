//! Durable storage of the control-plane state.
//!
//! The trait is what the etcd backend will implement too: a state has a revision, a mutation is
//! committed atomically as the next revision or not at all (an optimistic check on the revision,
//! as an etcd transaction compares on it), and loading gives the state at the latest revision.
use std::path::Path;

use rusqlite::{Connection, OptionalExtension as _, params};

use super::{
    state::State,
    types::{Change, Object},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store: corrupt object {kind}/{id}: {source}")]
    Corrupt {
        kind: String,
        id: String,
        source: serde_json::Error,
    },
    #[error("store: revision conflict: committing {wanted} but the store is at {current}")]
    Conflict { wanted: u64, current: u64 },
    #[error("store schema version {0} is newer than this agent understands ({SCHEMA_VERSION})")]
    TooNew(i64),
    #[error("store: etcd: {0}")]
    Etcd(String),
    #[error("store: creating the file: {0}")]
    Create(#[from] std::io::Error),
}

pub trait Store: Send {
    /// The state at the latest committed revision.
    fn load(&mut self) -> Result<State, StoreError>;
    /// Commits `changes` as `revision`, which must be the store's revision + 1.
    fn commit(&mut self, revision: u64, changes: &[Change]) -> Result<(), StoreError>;
    /// Records that `node` applied `revision` to its datapath (shared stores only).
    fn report(&mut self, _node: &str, _report: &NodeReport) -> Result<(), StoreError> {
        Ok(())
    }
    /// What every node reported (shared stores only).
    fn nodes(&mut self) -> Result<Vec<NodeReport>, StoreError> {
        Ok(Vec::new())
    }
    /// The nodes that hold a live presence lease, with their last contact (unix seconds; shared
    /// stores only).
    fn presence(&mut self) -> Result<std::collections::BTreeMap<String, Presence>, StoreError> {
        Ok(Default::default())
    }
    /// Where a watch of the store's changes starts to see every commit after the last load
    /// (etcd: the revision after the one it read). `None`: no load yet, or a store nobody else
    /// writes.
    fn watch_from(&self) -> Option<i64> {
        None
    }
}

/// One committed mutation as another server sees it (a watch of a shared store): the state
/// revision it made and its changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub revision: u64,
    pub changes: Vec<Change>,
}

/// One node's last applied revision.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeReport {
    pub node: String,
    /// State revision the node's datapath holds.
    pub revision: u64,
    /// When it reported (unix seconds).
    pub reported_at: u64,
    /// Where its API answers other servers (its history is read there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
}

/// A node as the cluster sees it (`GET /v1/nodes`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeStatus {
    pub node: String,
    /// `live` while the node holds its presence lease in the shared store (it renews it every
    /// second or so; a node that stops renewing is `gone` once the lease's time is over).
    pub status: NodeLiveness,
    /// The last time the node was known in contact with the store (unix seconds).
    pub last_contact: u64,
    /// State revision the node's datapath holds.
    pub revision: u64,
    /// Revisions it is behind the state this server serves.
    pub lag: u64,
    /// When it last reported a revision (unix seconds).
    pub reported_at: u64,
    /// Its high-availability group and role, for a node of a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<HaRole>,
    /// Where its API answers other servers, when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum NodeLiveness {
    Live,
    Gone,
}

/// A node's presence value in a shared store (under a lease: it goes with the node).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Presence {
    pub node: String,
    /// When the node wrote it (unix seconds); rewritten while the node lives.
    pub contact: u64,
    /// Its high-availability group and whether it is the active node (rewritten when that
    /// changes).
    #[serde(default)]
    pub ha: Option<HaRole>,
}

/// A node's place in its high-availability group.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct HaRole {
    pub group: String,
    /// Whether it forwards for the group (or, with an owner per network, for at least one of
    /// them) now.
    pub active: bool,
    /// The consumer networks it forwards for now (the others stand by for them).
    #[serde(default)]
    pub networks: Vec<String>,
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: objects as JSON rows keyed by kind and id, and the revision.
    "CREATE TABLE objects (kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (kind, id));
     CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
     INSERT INTO meta (key, value) VALUES ('revision', 0);",
];
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The embedded default: SQLite in WAL mode with full fsync, so an acknowledged commit survives
/// a crash or power loss.
pub struct SqliteStore {
    conn: Connection,
}

/// Creates `path` readable and writable by its owner only (0600) if it does not exist, so that an
/// SQLite file holding tokens' hashes and the state is never world-readable, not even for a moment
/// (SQLite gives its -wal and -shm files the same mode).
pub fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `data` to `path`, which ends up readable and writable by its owner only (a token file).
pub fn write_private(path: &Path, data: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    create_private(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(path, data)
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        create_private(path)?;
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew(version));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        Ok(SqliteStore { conn })
    }

    fn revision(conn: &Connection) -> Result<u64, StoreError> {
        let r: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(r.unwrap_or(0) as u64)
    }
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<State, StoreError> {
        let tx = self.conn.transaction()?;
        let mut state = State {
            revision: Self::revision(&tx)?,
            ..Default::default()
        };
        {
            let mut stmt = tx.prepare("SELECT kind, id, body FROM objects")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            for row in rows {
                let (kind, id, body) = row?;
                let o: Object = serde_json::from_str(&body)
                    .map_err(|source| StoreError::Corrupt { kind, id, source })?;
                state.put(o);
            }
        }
        tx.commit()?;
        Ok(state)
    }

    fn commit(&mut self, revision: u64, changes: &[Change]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let current = Self::revision(&tx)?;
        if revision != current + 1 {
            return Err(StoreError::Conflict {
                wanted: revision,
                current,
            });
        }
        for c in changes {
            match c {
                Change::Put(o) => {
                    let body = serde_json::to_string(o).expect("objects serialise");
                    tx.execute(
                        "INSERT OR REPLACE INTO objects (kind, id, body) VALUES (?1, ?2, ?3)",
                        params![o.kind(), o.id(), body],
                    )?;
                }
                Change::Delete { kind, id } => {
                    tx.execute(
                        "DELETE FROM objects WHERE kind = ?1 AND id = ?2",
                        params![kind, id],
                    )?;
                }
            }
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'revision'",
            params![revision as i64],
        )?;
        tx.commit()?;
        Ok(())
    }
}
