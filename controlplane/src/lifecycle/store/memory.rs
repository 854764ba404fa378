//! The in-memory store: etcd's revisioned key-value semantics (revisions, compare-and-swap
//! transactions, prefix watches with history, leases with expiry) in this process, for a single
//! replica without etcd. Nothing survives a restart.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{
    Compare, Kv, Op, Store, Txn, TxnOutcome, WATCH_BUFFER, WatchEvent, WatchMessage, WatchReceiver,
};
use crate::{Error, Result};

/// Changes kept for watches that start in the past (older ones count as compacted).
const HISTORY: usize = 20_000;

struct Lease {
    ttl_secs: i64,
    deadline: Instant,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Result<WatchMessage>>,
}

struct Mem {
    kv: BTreeMap<String, Kv>,
    revision: i64,
    /// Revisions up to this one are no longer in `log`.
    compacted: i64,
    log: VecDeque<(i64, WatchEvent)>,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    watchers: Vec<Watcher>,
}

/// See the module documentation.
pub struct MemoryStore {
    mem: Mutex<Mem>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn event_key(e: &WatchEvent) -> &str {
    match e {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

impl Mem {
    /// Applies `events` as revision `self.revision` (already incremented) and feeds watchers.
    fn publish(&mut self, events: Vec<WatchEvent>) {
        let rev = self.revision;
        for e in &events {
            self.log.push_back((rev, e.clone()));
        }
        while self.log.len() > HISTORY {
            if let Some((r, _)) = self.log.pop_front() {
                self.compacted = self.compacted.max(r - 1);
            }
        }
        // A revision is never split across messages; a watcher that cannot take it is dropped
        // (its receiver ends and the registry re-watches from its last revision).
        self.watchers.retain(|w| {
            let mine: Vec<WatchEvent> = events
                .iter()
                .filter(|e| event_key(e).starts_with(&w.prefix))
                .cloned()
                .collect();
            mine.is_empty() || w.tx.try_send(Ok(WatchMessage::Events(mine))).is_ok()
        });
    }

    /// Deletes the keys of expired leases (one revision per lease, as etcd's revoke).
    fn expire(&mut self, now: Instant) {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.drop_lease(id);
        }
    }

    fn drop_lease(&mut self, id: i64) {
        self.leases.remove(&id);
        let keys: Vec<String> = self
            .kv
            .values()
            .filter(|kv| kv.lease == id)
            .map(|kv| kv.key.clone())
            .collect();
        if keys.is_empty() {
            return;
        }
        self.revision += 1;
        let rev = self.revision;
        let events = keys
            .into_iter()
            .map(|key| {
                self.kv.remove(&key);
                WatchEvent::Delete {
                    key,
                    mod_revision: rev,
                }
            })
            .collect();
        self.publish(events);
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::ModRevision { key, rev } => {
                self.kv.get(key).map_or(0, |kv| kv.mod_revision) == *rev
            }
            Compare::CreateRevision { key, rev } => {
                self.kv.get(key).map_or(0, |kv| kv.create_revision) == *rev
            }
            Compare::PrefixUnchangedSince { prefix, rev } => self
                .kv
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                .all(|(_, kv)| kv.mod_revision <= *rev),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            mem: Mutex::new(Mem {
                kv: BTreeMap::new(),
                revision: 1,
                compacted: 0,
                log: VecDeque::new(),
                leases: HashMap::new(),
                next_lease: 0x1000,
                watchers: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
        let mut m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        m.expire(Instant::now());
        m
    }

    /// Current revision (tests).
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    fn describe(&self) -> String {
        "in-memory (this replica only; lost on restart)".into()
    }

    fn shared(&self) -> bool {
        false
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<Kv>, i64)> {
        let m = self.lock();
        let kvs =
            m.kv.range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, kv)| kv.clone())
                .collect();
        Ok((kvs, m.revision))
    }

    async fn get(&self, key: &str) -> Result<Option<Kv>> {
        Ok(self.lock().kv.get(key).cloned())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let mut m = self.lock();
        if !txn.compares.iter().all(|c| m.holds(c)) {
            return Ok(TxnOutcome::Conflict(m.revision));
        }
        for op in &txn.ops {
            if let Op::Put { lease, .. } = op
                && *lease != 0
                && !m.leases.contains_key(lease)
            {
                return Err(Error::Store(format!("lease {lease:x} not found")));
            }
        }
        if txn.ops.is_empty() {
            return Ok(TxnOutcome::Committed(m.revision));
        }
        m.revision += 1;
        let rev = m.revision;
        let mut events = Vec::with_capacity(txn.ops.len());
        for op in txn.ops {
            match op {
                Op::Put { key, value, lease } => {
                    let create_revision = m.kv.get(&key).map_or(rev, |kv| kv.create_revision);
                    let kv = Kv {
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: rev,
                        lease,
                    };
                    m.kv.insert(key, kv.clone());
                    events.push(WatchEvent::Put(kv));
                }
                Op::Delete { key } => {
                    if m.kv.remove(&key).is_some() {
                        events.push(WatchEvent::Delete {
                            key,
                            mod_revision: rev,
                        });
                    }
                }
            }
        }
        m.publish(events);
        Ok(TxnOutcome::Committed(rev))
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<WatchReceiver> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let mut m = self.lock();
        if from <= m.compacted {
            let _ = tx.try_send(Ok(WatchMessage::Compacted));
            return Ok(rx);
        }
        // Replay the history from `from`, one message per revision.
        let mut batch: Vec<WatchEvent> = Vec::new();
        let mut batch_rev = 0;
        let mut overflow = false;
        for (rev, e) in m.log.iter().filter(|(r, _)| *r >= from) {
            if !event_key(e).starts_with(prefix) {
                continue;
            }
            if *rev != batch_rev && !batch.is_empty() {
                overflow |= tx
                    .try_send(Ok(WatchMessage::Events(std::mem::take(&mut batch))))
                    .is_err();
            }
            batch_rev = *rev;
            batch.push(e.clone());
        }
        if !batch.is_empty() {
            overflow |= tx.try_send(Ok(WatchMessage::Events(batch))).is_err();
        }
        if overflow {
            // Too far behind for the buffer: the caller reads everything again.
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Ok(WatchMessage::Compacted));
            return Ok(rx);
        }
        m.watchers.push(Watcher {
            prefix: prefix.to_string(),
            tx,
        });
        Ok(rx)
    }

    async fn grant(&self, ttl_secs: i64) -> Result<i64> {
        if ttl_secs <= 0 {
            return Err(Error::Config(format!("lease TTL {ttl_secs}s")));
        }
        let mut m = self.lock();
        m.next_lease += 1;
        let id = m.next_lease;
        m.leases.insert(
            id,
            Lease {
                ttl_secs,
                deadline: Instant::now() + Duration::from_secs(ttl_secs as u64),
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: i64) -> Result<bool> {
        let mut m = self.lock();
        Ok(match m.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + Duration::from_secs(l.ttl_secs as u64);
                true
            }
            None => false,
        })
    }

    async fn revoke(&self, lease: i64) -> Result<()> {
        self.lock().drop_lease(lease);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            lease: 0,
        }
    }

    #[tokio::test]
    async fn compare_and_swap_on_revisions() {
        let s = MemoryStore::new();
        let create = Txn {
            compares: vec![Compare::ModRevision {
                key: "/a/x".into(),
                rev: 0,
            }],
            ops: vec![put("/a/x", "1")],
        };
        let TxnOutcome::Committed(r1) = s.txn(create.clone()).await.unwrap() else {
            panic!("create")
        };
        // The same create again loses: the key exists now.
        assert!(matches!(
            s.txn(create).await.unwrap(),
            TxnOutcome::Conflict(_)
        ));
        let kv = s.get("/a/x").await.unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision), (r1, r1));
        // Two writers read revision r1; only the first update applies.
        let update = |v: &str| Txn {
            compares: vec![Compare::ModRevision {
                key: "/a/x".into(),
                rev: r1,
            }],
            ops: vec![put("/a/x", v)],
        };
        assert!(matches!(
            s.txn(update("2")).await.unwrap(),
            TxnOutcome::Committed(_)
        ));
        assert!(matches!(
            s.txn(update("3")).await.unwrap(),
            TxnOutcome::Conflict(_)
        ));
        assert_eq!(s.get("/a/x").await.unwrap().unwrap().value, b"2");
        // Prefix compare: nothing under /a/ changed after r1? It did.
        let stale = Txn {
            compares: vec![Compare::PrefixUnchangedSince {
                prefix: "/a/".into(),
                rev: r1,
            }],
            ops: vec![put("/b", "x")],
        };
        assert!(matches!(
            s.txn(stale).await.unwrap(),
            TxnOutcome::Conflict(_)
        ));
        let fresh = Txn {
            compares: vec![Compare::PrefixUnchangedSince {
                prefix: "/a/".into(),
                rev: s.revision(),
            }],
            ops: vec![put("/b", "x")],
        };
        assert!(matches!(
            s.txn(fresh).await.unwrap(),
            TxnOutcome::Committed(_)
        ));
    }

    #[tokio::test]
    async fn watch_replays_history_and_follows() {
        let s = MemoryStore::new();
        let TxnOutcome::Committed(r1) = s
            .txn(Txn {
                compares: vec![],
                ops: vec![put("/p/a", "1"), put("/q/b", "1")],
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        let mut w = s.watch("/p/", r1).await.unwrap();
        s.txn(Txn {
            compares: vec![],
            ops: vec![Op::Delete { key: "/p/a".into() }],
        })
        .await
        .unwrap();
        let Some(Ok(WatchMessage::Events(first))) = w.recv().await else {
            panic!()
        };
        assert_eq!(first.len(), 1, "only /p/ keys");
        assert!(matches!(&first[0], WatchEvent::Put(kv) if kv.key == "/p/a"));
        let Some(Ok(WatchMessage::Events(second))) = w.recv().await else {
            panic!()
        };
        assert!(matches!(&second[0], WatchEvent::Delete { key, .. } if key == "/p/a"));
    }

    #[tokio::test]
    async fn lease_expiry_deletes_keys_and_fences_their_owner() {
        let s = MemoryStore::new();
        let lease = s.grant(1).await.unwrap();
        let TxnOutcome::Committed(term) = s
            .txn(Txn {
                compares: vec![Compare::CreateRevision {
                    key: "/leader".into(),
                    rev: 0,
                }],
                ops: vec![Op::Put {
                    key: "/leader".into(),
                    value: b"me".to_vec(),
                    lease,
                }],
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        assert!(s.keep_alive(lease).await.unwrap());
        // Let the lease lapse (wall clock: the store's own TTL).
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert!(s.get("/leader").await.unwrap().is_none());
        assert!(!s.keep_alive(lease).await.unwrap());
        // The old term's fenced write is refused.
        let fenced = Txn {
            compares: vec![Compare::CreateRevision {
                key: "/leader".into(),
                rev: term,
            }],
            ops: vec![put("/decision", "x")],
        };
        assert!(matches!(
            s.txn(fenced).await.unwrap(),
            TxnOutcome::Conflict(_)
        ));
        assert!(s.get("/decision").await.unwrap().is_none());
    }
}
