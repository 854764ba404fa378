//! The registry's storage seam: the small part of etcd v3's data model the registry needs
//! (revisioned keys, transactions with compare-and-swap on revisions, prefix watches, leases),
//! with two implementations behind one trait:
//!
//! * [`etcd::EtcdStore`]: a real etcd v3 cluster (the `etcd-client` crate, tonic), shared by every
//!   replica of a cluster's control plane;
//! * [`memory::MemoryStore`]: the same semantics in process memory, for a single replica without
//!   etcd (the demo's default).
//!
//! The registry runs the same code over both, so the lifecycle tests run on both.
pub mod etcd;
pub mod memory;

use tokio::sync::mpsc;

use crate::Result;

/// One stored key with its revisions (etcd's `mvccpb.KeyValue`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key (0: it does not exist).
    pub create_revision: i64,
    /// Revision of the last transaction that wrote the key.
    pub mod_revision: i64,
    /// Lease the key is attached to (0: none); the key goes away when the lease expires.
    pub lease: i64,
}

/// A condition of a transaction; all must hold for its operations to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key was last written at `rev` (`0`: the key does not exist).
    ModRevision { key: String, rev: i64 },
    /// The key was created at `rev` (`0`: the key does not exist). Identifies one incarnation of
    /// a lease-bound key, e.g. one leadership term.
    CreateRevision { key: String, rev: i64 },
    /// No key under `prefix` was written after `rev` (what a decision read is unchanged).
    PrefixUnchangedSince { prefix: String, rev: i64 },
}

/// A write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        /// Attach the key to this lease (0: none).
        lease: i64,
    },
    Delete {
        key: String,
    },
}

/// An atomic compare-and-swap: if every compare holds, every op applies at one new revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Applied at this revision.
    Committed(i64),
    /// A compare failed; nothing was written (the store was at this revision).
    Conflict(i64),
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Put(Kv),
    Delete { key: String, mod_revision: i64 },
}

/// A message of a watch stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchMessage {
    /// The changes of one or more whole revisions, in order.
    Events(Vec<WatchEvent>),
    /// The requested start revision was compacted away: read everything again.
    Compacted,
}

/// A watch: bounded channel of messages; it ends (`None`) when the stream broke.
pub type WatchReceiver = mpsc::Receiver<Result<WatchMessage>>;

/// Messages a watch may buffer before the store stops feeding it (the watcher then restarts
/// from its last revision: no unbounded buffering for a slow reader).
pub const WATCH_BUFFER: usize = 1024;

/// The storage seam of the registry (see the module documentation).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Human-readable backend (`etcd http://127.0.0.1:2379,…` or `in-memory`).
    fn describe(&self) -> String;
    /// Whether several replicas can share this store (etcd) or it lives in this process.
    fn shared(&self) -> bool;
    /// Every key under `prefix` and the store's revision of that read (linearizable).
    async fn range(&self, prefix: &str) -> Result<(Vec<Kv>, i64)>;
    /// One key (linearizable read).
    async fn get(&self, key: &str) -> Result<Option<Kv>>;
    /// Runs a compare-and-swap transaction.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome>;
    /// Watches `prefix` from revision `from` (inclusive).
    async fn watch(&self, prefix: &str, from: i64) -> Result<WatchReceiver>;
    /// Grants a lease of `ttl_secs` seconds; returns its ID.
    async fn grant(&self, ttl_secs: i64) -> Result<i64>;
    /// Renews a lease; `false` when it has expired (its keys are gone).
    async fn keep_alive(&self, lease: i64) -> Result<bool>;
    /// Revokes a lease (its keys are deleted at once).
    async fn revoke(&self, lease: i64) -> Result<()>;
}

/// The end of the key range of `prefix` (etcd's `prefix + 1` rule).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
