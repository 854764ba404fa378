//! A replica's copy of the registry: everything under the cluster's prefix, loaded once and kept
//! current by a watch (re-read in full after a compaction or when a watch cannot resume). Reads
//! (status, heartbeat answers) come from here; every write is a compare-and-swap against the
//! revisions recorded here, so a stale copy can make a write fail but never overwrite a newer one.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::sync::watch;

use super::{
    state::{
        ClusterRecord, EventBatch, EventRecord, Keys, LeaderRecord, MetaRecord, NodeRecord,
        ProvisionRecord, ReplicaReport, UpgradeRecord, Workload, decode, now_ms,
    },
    store::{Kv, Op, Store, WatchEvent, WatchMessage},
};
use crate::Error;

/// A stored value with its revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// The decoded contents of the cluster's prefix.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// Every change under the prefix up to this revision is reflected.
    pub known_rev: i64,
    pub loaded: bool,
    pub meta: Option<Versioned<MetaRecord>>,
    pub nodes: BTreeMap<String, Versioned<NodeRecord>>,
    pub upgrade: Option<Versioned<UpgradeRecord>>,
    pub workload: Option<Versioned<Workload>>,
    pub cluster: Option<Versioned<ClusterRecord>>,
    pub provisions: BTreeMap<String, Versioned<ProvisionRecord>>,
    /// Event batches by (create revision, key): the history in commit order.
    pub events: BTreeMap<(i64, String), Vec<EventRecord>>,
    pub replicas: BTreeMap<String, Versioned<ReplicaReport>>,
    pub leader: Option<Versioned<LeaderRecord>>,
    /// Keys whose value this binary cannot read, with the reason.
    pub undecodable: BTreeMap<String, String>,
    /// (create, mod) revision of every present key (monotonic apply).
    revs: HashMap<String, (i64, i64)>,
    event_revs: HashMap<String, i64>,
    /// Watch events at or below this revision are already reflected (after a full re-read).
    ignore_below: i64,
}

enum Kind {
    Meta,
    Node(String),
    Upgrade,
    Workload,
    Cluster,
    Provision(String),
    Event,
    Replica(String),
    Leader,
    Unknown,
}

fn kind(keys: &Keys, key: &str) -> Kind {
    let rest = |p: String| key.strip_prefix(p.as_str()).map(str::to_string);
    if key == keys.meta() {
        Kind::Meta
    } else if key == keys.upgrade() {
        Kind::Upgrade
    } else if key == keys.workload() {
        Kind::Workload
    } else if key == keys.cluster() {
        Kind::Cluster
    } else if key == keys.leader() {
        Kind::Leader
    } else if let Some(id) = rest(keys.nodes_prefix()) {
        Kind::Node(id)
    } else if let Some(id) = rest(keys.provisions_prefix()) {
        Kind::Provision(id)
    } else if key.starts_with(&keys.events_prefix()) {
        Kind::Event
    } else if let Some(id) = rest(keys.replicas_prefix()) {
        Kind::Replica(id)
    } else {
        Kind::Unknown
    }
}

fn versioned<T>(value: T, kv: &Kv) -> Versioned<T> {
    Versioned {
        value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        lease: kv.lease,
    }
}

impl State {
    fn put(&mut self, keys: &Keys, kv: &Kv) {
        if self
            .revs
            .get(&kv.key)
            .is_some_and(|r| r.1 >= kv.mod_revision)
        {
            return;
        }
        self.remove(keys, &kv.key);
        self.revs
            .insert(kv.key.clone(), (kv.create_revision, kv.mod_revision));
        let k = &kv.key;
        let b = &kv.value;
        let r: Result<(), Error> = (|| {
            match kind(keys, k) {
                Kind::Meta => self.meta = Some(versioned(decode(k, b)?, kv)),
                Kind::Node(id) => {
                    self.nodes.insert(id, versioned(decode(k, b)?, kv));
                }
                Kind::Upgrade => self.upgrade = Some(versioned(decode(k, b)?, kv)),
                Kind::Workload => self.workload = Some(versioned(decode(k, b)?, kv)),
                Kind::Cluster => self.cluster = Some(versioned(decode(k, b)?, kv)),
                Kind::Provision(id) => {
                    self.provisions.insert(id, versioned(decode(k, b)?, kv));
                }
                Kind::Event => {
                    let batch: EventBatch = decode(k, b)?;
                    self.events
                        .insert((kv.create_revision, k.clone()), batch.events);
                    self.event_revs.insert(k.clone(), kv.create_revision);
                }
                Kind::Replica(id) => {
                    self.replicas.insert(id, versioned(decode(k, b)?, kv));
                }
                Kind::Leader => self.leader = Some(versioned(decode(k, b)?, kv)),
                // Keys of a newer layout: not ours to read.
                Kind::Unknown => {}
            }
            Ok(())
        })();
        if let Err(e) = r {
            tracing::error!(key = %k, "{e}");
            self.undecodable.insert(k.clone(), e.to_string());
        }
    }

    fn remove(&mut self, keys: &Keys, key: &str) {
        self.revs.remove(key);
        self.undecodable.remove(key);
        match kind(keys, key) {
            Kind::Meta => self.meta = None,
            Kind::Node(id) => {
                self.nodes.remove(&id);
            }
            Kind::Upgrade => self.upgrade = None,
            Kind::Workload => self.workload = None,
            Kind::Cluster => self.cluster = None,
            Kind::Provision(id) => {
                self.provisions.remove(&id);
            }
            Kind::Event => {
                if let Some(rev) = self.event_revs.remove(key) {
                    self.events.remove(&(rev, key.to_string()));
                }
            }
            Kind::Replica(id) => {
                self.replicas.remove(&id);
            }
            Kind::Leader => self.leader = None,
            Kind::Unknown => {}
        }
    }

    fn apply(&mut self, keys: &Keys, e: &WatchEvent) {
        let rev = match e {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        };
        if rev <= self.ignore_below {
            return;
        }
        match e {
            WatchEvent::Put(kv) => self.put(keys, kv),
            WatchEvent::Delete { key, .. } => self.remove(keys, key),
        }
        self.known_rev = self.known_rev.max(rev);
    }

    /// Create revision of a present key.
    pub fn create_revision(&self, key: &str) -> Option<i64> {
        self.revs.get(key).map(|r| r.0)
    }

    fn reset(keys: &Keys, kvs: &[Kv], rev: i64) -> Self {
        let mut s = State {
            known_rev: rev,
            loaded: true,
            ignore_below: rev,
            ..Default::default()
        };
        for kv in kvs {
            s.put(keys, kv);
        }
        s
    }
}

/// Health of the copy.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CacheHealth {
    /// The watch is running: the copy follows the store.
    pub following: bool,
    pub since_ms: u64,
    pub last_error: Option<String>,
}

/// See the module documentation.
pub struct Cache {
    keys: Keys,
    state: RwLock<State>,
    /// Signalled when the leader key goes away (candidates campaign at once).
    pub leader_gone: tokio::sync::Notify,
    rev: watch::Sender<i64>,
    health: Mutex<CacheHealth>,
}

impl Cache {
    pub fn new(keys: Keys) -> Self {
        Cache {
            keys,
            state: RwLock::new(State::default()),
            leader_gone: tokio::sync::Notify::new(),
            rev: watch::channel(0).0,
            health: Mutex::new(CacheHealth::default()),
        }
    }

    /// Reads the copy.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn health(&self) -> CacheHealth {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_health(&self, following: bool, error: Option<String>) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if h.following != following || h.since_ms == 0 {
            h.since_ms = now_ms();
            if following {
                tracing::info!("registry copy follows the store again");
            } else if let Some(e) = &error {
                tracing::warn!("registry copy stopped following the store: {e}");
            }
        }
        h.following = following;
        if error.is_some() {
            h.last_error = error;
        }
    }

    fn publish(&self) {
        let r = self.read(|s| s.known_rev);
        self.rev.send_replace(r);
    }

    /// Puts a key read directly from the store (after a conflict) into the copy.
    pub fn apply_read(&self, key: &str, kv: Option<&Kv>) {
        {
            let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
            match kv {
                Some(kv) => s.put(&self.keys, kv),
                None => s.remove(&self.keys, key),
            }
        }
        self.publish();
    }

    /// Puts this replica's own committed writes (revision `rev`) into the copy, so that it reads
    /// its writes before the watch delivers them.
    pub fn apply_own(&self, ops: &[Op], rev: i64) {
        {
            let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
            for op in ops {
                match op {
                    Op::Put { key, value, lease } => {
                        let kv = Kv {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: s.create_revision(key).unwrap_or(rev),
                            mod_revision: rev,
                            lease: *lease,
                        };
                        s.put(&self.keys, &kv);
                    }
                    Op::Delete { key } => {
                        if s.revs.get(key).is_some_and(|r| r.1 < rev) {
                            s.remove(&self.keys, key);
                        }
                    }
                }
            }
        }
        self.publish();
    }

    /// Waits until the copy moved past `rev` (bounded by `limit`); whether it did.
    pub async fn wait_past(&self, rev: i64, limit: Duration) -> bool {
        let mut rx = self.rev.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|r| *r > rev))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Reads everything again (the copy is replaced atomically).
    pub async fn reload(&self, store: &dyn Store) -> crate::Result<()> {
        let (kvs, rev) = store.range(self.keys.root()).await?;
        let fresh = State::reset(&self.keys, &kvs, rev);
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        self.publish();
        Ok(())
    }

    /// Loads and follows the store until `shutdown` changes; retries with backoff while the
    /// store is unreachable.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, mut shutdown: watch::Receiver<bool>) {
        let backoff = |n: u32| Duration::from_millis((100u64 << n.min(4)).min(1_000));
        let mut failures = 0u32;
        'reload: loop {
            if *shutdown.borrow() {
                return;
            }
            if let Err(e) = self.reload(store.as_ref()).await {
                self.set_health(false, Some(e.to_string()));
                failures += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff(failures)) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            loop {
                let from = self.read(|s| s.known_rev) + 1;
                let mut rx = match store.watch(self.keys.root(), from).await {
                    Ok(rx) => rx,
                    Err(e) => {
                        self.set_health(false, Some(e.to_string()));
                        failures += 1;
                        tokio::select! {
                            _ = tokio::time::sleep(backoff(failures)) => {}
                            _ = shutdown.changed() => return,
                        }
                        continue;
                    }
                };
                failures = 0;
                self.set_health(true, None);
                loop {
                    let msg = tokio::select! {
                        m = rx.recv() => m,
                        _ = shutdown.changed() => return,
                    };
                    match msg {
                        Some(Ok(WatchMessage::Events(events))) => {
                            let leader = self.keys.leader();
                            let gone = {
                                let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
                                for e in &events {
                                    s.apply(&self.keys, e);
                                }
                                s.leader.is_none()
                                    && events.iter().any(|e| {
                                        matches!(e, WatchEvent::Delete { key, .. } if *key == leader)
                                    })
                            };
                            self.publish();
                            if gone {
                                self.leader_gone.notify_waiters();
                            }
                        }
                        Some(Ok(WatchMessage::Compacted)) => {
                            tracing::info!(
                                "registry watch fell behind a compaction: reading again"
                            );
                            continue 'reload;
                        }
                        Some(Err(e)) => {
                            self.set_health(false, Some(e.to_string()));
                            break;
                        }
                        None => {
                            self.set_health(false, Some("watch ended".into()));
                            break;
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff(1)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}
