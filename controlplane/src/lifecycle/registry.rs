//! The node registry of one control-plane replica over a shared [`Store`] (etcd, or the in-memory
//! store for a single replica).
//!
//! * Any replica accepts registrations, heartbeats and admin requests: it reads its copy of the
//!   store ([`Cache`]), lets the [`Model`] decide, and commits the changed keys in one
//!   compare-and-swap transaction on their revisions (a conflict re-reads and retries), so
//!   concurrent replicas never overwrite each other. A heartbeat that changes nothing writes
//!   nothing: liveness reaches the store through each replica's periodic report.
//! * One replica is the leader (a lease-bound key, see [`LeaderRecord`]); only it runs the
//!   lifecycle controller (NotReady timers, auto-healing, drains, upgrades). Each of its
//!   transactions requires its term's leader key (a leader whose lease expired is fenced off)
//!   and that nothing it read changed meanwhile. Every timer runs on stored timestamps, so a new
//!   leader continues exactly where the last one stopped.
//! * When the store is unreachable the replica keeps serving tunnels and answers heartbeats
//!   from its copy; writes fail (nothing is queued), and the leader pauses its decisions and
//!   says so in its status and logs until the store answers again.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use berth_proto::node::{HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

pub use super::state::{
    CommandRecord, EventRecord as Event, ProvisionRecord, ProvisionRequest, Strategy,
    UpgradeRequest,
};
use super::{
    cache::{Cache, CacheHealth},
    machine::{NodeState, Pdb, Plan, Pod, Timers},
    model::{Liveness, Model, Scope},
    state::{EventBatch, Keys, LeaderRecord, MetaRecord, ReplicaReport, encode, now_ms},
    store::{Compare, Op, Store, Txn, TxnOutcome},
};
use crate::{Error, Result};

/// Event batches kept in the store (the leader deletes older ones).
const MAX_EVENT_BATCHES: usize = 1000;
/// Attempts of one change against concurrent writers.
const ATTEMPTS: usize = 8;

/// Lifecycle controller configuration.
#[derive(Clone, Debug)]
pub struct LifecycleConfig {
    pub plan: Plan,
    pub timers: Timers,
    pub server_id: String,
    /// Take part in the leader election (run the lifecycle controller when elected).
    pub controller: bool,
    /// TTL of this replica's lease (leadership and liveness report), in seconds; a dead leader
    /// is replaced about this long after its last renewal.
    pub lease_ttl_secs: i64,
    /// This cluster's key prefix in the store.
    pub prefix: String,
}

impl LifecycleConfig {
    /// How often a replica flushes the heartbeats it received (its report).
    pub fn report_interval(&self) -> Duration {
        (self.timers.heartbeat_grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    fn lease_ms(&self) -> u64 {
        self.lease_ttl_secs.max(1) as u64 * 1000
    }
}

/// Counters of this replica (benchmark, status).
#[derive(Debug, Default, Serialize)]
pub struct Metrics {
    pub heartbeats: AtomicU64,
    /// Heartbeats that had something to write.
    pub heartbeat_writes: AtomicU64,
    pub commits: AtomicU64,
    pub conflicts: AtomicU64,
    pub reports: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Disabled,
    Follower,
    Leader { term: i64 },
}

struct Session {
    lease: i64,
    lease_ok_ms: u64,
    role: Role,
    paused: Option<String>,
    last_commit_rev: i64,
    conflicts: u32,
    /// Provisioning requests this process already handed out.
    dispatched: HashSet<String>,
    reported_role: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreHealth {
    pub reachable: bool,
    pub since_ms: u64,
    pub last_error: Option<String>,
}

/// The store as this replica sees it.
#[derive(Clone, Debug, Serialize)]
pub struct StoreStatus {
    pub backend: String,
    pub shared: bool,
    pub prefix: String,
    pub registry_id: Option<String>,
    pub revision: i64,
    pub reachable: bool,
    pub unreachable_since_ms: Option<u64>,
    pub last_error: Option<String>,
    pub copy: CacheHealth,
    pub undecodable: BTreeMap<String, String>,
}

/// The lifecycle controller as this replica sees it.
#[derive(Clone, Debug, Serialize)]
pub struct ControllerStatus {
    pub server_id: String,
    /// `leader`, `follower` or `disabled` (`--no-lifecycle-controller`).
    pub role: String,
    /// The elected replica (from the store).
    pub leader: Option<String>,
    pub term: Option<i64>,
    /// Why this leader makes no lifecycle decisions right now.
    pub paused: Option<String>,
    pub lease_ttl_secs: i64,
}

/// A replica known from its report.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaStatus {
    pub server_id: String,
    pub role: String,
    pub report_age_ms: u64,
    pub nodes_heard: usize,
}

/// Status view of one node.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    pub node_name: String,
    pub instance_id: String,
    pub pool: String,
    pub flavor: String,
    pub zone: String,
    pub state: NodeState,
    pub reason: String,
    pub cordoned: bool,
    pub version: String,
    pub last_heartbeat_ms_ago: u64,
    pub not_ready_since_ms: Option<u64>,
    pub reinstalls: u32,
    pub heals: u32,
    pub conditions: BTreeMap<String, bool>,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<String>,
    pub allocatable_cpu_millis: u64,
    pub allocatable_memory_bytes: u64,
    pub reserved_cpu_millis: u64,
    pub reserved_memory_bytes: u64,
    pub reserved_storage_bytes: u64,
    pub pending_commands: Vec<CommandRecord>,
    pub last_commands: Vec<CommandRecord>,
    pub draining: Option<String>,
}

/// Status of the running or last upgrade.
#[derive(Clone, Debug, Serialize)]
pub struct UpgradeStatus {
    pub pool: String,
    pub version: String,
    pub strategy: Strategy,
    pub done: bool,
    /// Set when a node failed its upgrade: the rollout stopped there (the node stays cordoned).
    pub failed: Option<String>,
    pub current: Option<String>,
    pub creating: Vec<String>,
}

/// Status view of the whole registry.
#[derive(Clone, Debug, Serialize)]
pub struct RegistryStatus {
    pub plan: Plan,
    pub store: StoreStatus,
    pub controller: ControllerStatus,
    pub replicas: Vec<ReplicaStatus>,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<Pod>,
    pub pdbs: Vec<Pdb>,
    pub upgrade: Option<UpgradeStatus>,
    pub pending_actions: Vec<ProvisionRequest>,
    pub provisions: Vec<ProvisionRecord>,
    /// Highest number of nodes upgrading in place at the same time in the current or last
    /// upgrade (must stay ≤ 1).
    pub max_concurrent_in_place: usize,
    /// The stored history, oldest first.
    pub events: Vec<Event>,
}

/// The node registry (see the module documentation).
pub struct Registry {
    pub config: LifecycleConfig,
    store: Arc<dyn Store>,
    keys: Keys,
    cache: Arc<Cache>,
    provision: mpsc::UnboundedSender<ProvisionRecord>,
    started_ms: u64,
    /// Instance ID → last heartbeat this replica received.
    seen: Mutex<HashMap<String, u64>>,
    session: Mutex<Session>,
    health: Mutex<StoreHealth>,
    pub metrics: Metrics,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keys a change compared by revision (re-read after a conflict).
fn compared_keys(compares: &[Compare]) -> (Vec<String>, bool) {
    let mut keys = Vec::new();
    let mut prefix = false;
    for c in compares {
        match c {
            Compare::ModRevision { key, .. } | Compare::CreateRevision { key, .. } => {
                keys.push(key.clone())
            }
            Compare::PrefixUnchangedSince { .. } => prefix = true,
        }
    }
    (keys, prefix)
}

impl Registry {
    /// A registry over `store`; decided provisioning requests go to `provision` (the binary runs
    /// the hook on them; tests play the cloud). Nothing runs until [`Registry::run`].
    pub fn new(
        config: LifecycleConfig,
        store: Arc<dyn Store>,
        provision: mpsc::UnboundedSender<ProvisionRecord>,
    ) -> Arc<Self> {
        let keys = Keys::new(&config.prefix);
        let role = if config.controller {
            Role::Follower
        } else {
            Role::Disabled
        };
        Arc::new(Self {
            cache: Arc::new(Cache::new(keys.clone())),
            keys,
            store,
            provision,
            started_ms: now_ms(),
            seen: Mutex::new(HashMap::new()),
            session: Mutex::new(Session {
                lease: 0,
                lease_ok_ms: 0,
                role,
                paused: None,
                last_commit_rev: 0,
                conflicts: 0,
                dispatched: HashSet::new(),
                reported_role: String::new(),
            }),
            health: Mutex::new(StoreHealth::default()),
            metrics: Metrics::default(),
            config,
        })
    }

    /// The store behind this registry.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn note<T>(&self, r: &Result<T>) {
        let mut h = lock(&self.health);
        match r {
            Ok(_) => {
                if !h.reachable {
                    if h.since_ms != 0 {
                        tracing::info!(store = %self.store.describe(), "registry store reachable again");
                    }
                    h.reachable = true;
                    h.since_ms = now_ms();
                }
            }
            Err(Error::Store(e)) => {
                if h.reachable || h.since_ms == 0 {
                    tracing::warn!(store = %self.store.describe(), "registry store unreachable: {e}");
                    h.reachable = false;
                    h.since_ms = now_ms();
                }
                h.last_error = Some(e.clone());
            }
            Err(_) => {}
        }
    }

    /// Follows the store (loads it, then watches) until `shutdown` changes.
    pub fn follow(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.cache.clone().run(self.store.clone(), shutdown))
    }

    /// Waits (bounded) until this replica's copy of the store is loaded.
    pub async fn wait_loaded(&self, limit: Duration) -> bool {
        let end = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < end {
            if self.cache.read(|s| s.loaded) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Runs the replica until `shutdown` changes: follows the store, keeps its lease, reports
    /// the heartbeats it received, and campaigns for and exercises leadership. On a graceful
    /// stop the lease is revoked, so another replica takes over at once.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let cache = self.follow(shutdown.clone());
        let every = |period: Duration, f: fn(Arc<Registry>) -> futures_step::Step| {
            let me = self.clone();
            let mut sd = shutdown.clone();
            tokio::spawn(async move {
                let mut iv = tokio::time::interval(period);
                iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = iv.tick() => f(me.clone()).await,
                        _ = sd.changed() => return,
                    }
                }
            })
        };
        let keepalive = Duration::from_millis(self.config.lease_ms() / 3);
        let tasks = [
            every(keepalive.max(Duration::from_millis(100)), |r| {
                Box::pin(async move { r.session_step().await })
            }),
            every(self.config.report_interval(), |r| {
                Box::pin(async move { r.report_step().await })
            }),
        ];
        // The controller: every tick, and at once when the leader key goes away (a candidate
        // campaigns without waiting for its next tick).
        let me = self.clone();
        let mut sd = shutdown.clone();
        let controller = tokio::spawn(async move {
            let mut iv = tokio::time::interval(me.config.timers.tick);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = iv.tick() => {}
                    _ = me.cache.leader_gone.notified() => {}
                    _ = sd.changed() => return,
                }
                if let Err(e) = me.controller_step().await {
                    tracing::debug!("controller pass: {e}");
                }
            }
        });
        let mut sd = shutdown.clone();
        let _ = sd.wait_for(|s| *s).await;
        for t in tasks {
            let _ = t.await;
        }
        let _ = controller.await;
        let lease = lock(&self.session).lease;
        if lease != 0 {
            match tokio::time::timeout(Duration::from_secs(2), self.store.revoke(lease)).await {
                Ok(Ok(())) => tracing::info!("lease revoked: another replica can lead at once"),
                _ => tracing::warn!("could not revoke the lease; it expires by itself"),
            }
        }
        let _ = cache.await;
    }

    /// Creates the registry's identity once (first replica) and returns it.
    async fn registry_id(&self) -> Result<String> {
        if let Some(m) = self.cache.read(|s| s.meta.clone()) {
            return Ok(m.value.registry_id);
        }
        let key = self.keys.meta();
        let meta = MetaRecord {
            registry_id: uuid::Uuid::new_v4().to_string(),
            created_ms: now_ms(),
            created_by: self.config.server_id.clone(),
        };
        let ops = vec![Op::Put {
            key: key.clone(),
            value: encode(&meta),
            lease: 0,
        }];
        let r = self
            .store
            .txn(Txn {
                compares: vec![Compare::CreateRevision {
                    key: key.clone(),
                    rev: 0,
                }],
                ops: ops.clone(),
            })
            .await;
        self.note(&r);
        match r? {
            TxnOutcome::Committed(rev) => {
                self.cache.apply_own(&ops, rev);
                tracing::info!(registry_id = %meta.registry_id, "registry created");
                Ok(meta.registry_id)
            }
            TxnOutcome::Conflict(_) => {
                let kv = self.store.get(&key).await;
                self.note(&kv);
                self.cache.apply_read(&key, kv?.as_ref());
                self.cache
                    .read(|s| s.meta.clone())
                    .map(|m| m.value.registry_id)
                    .ok_or_else(|| Error::Store("registry identity unreadable".into()))
            }
        }
    }

    fn loaded(&self) -> Result<()> {
        if self.cache.read(|s| s.loaded) {
            Ok(())
        } else {
            Err(Error::Store(format!(
                "registry not loaded yet from {}",
                self.store.describe()
            )))
        }
    }

    /// Commits a change (`fence`: the leader's term, required to still hold).
    async fn commit(
        &self,
        mut compares: Vec<Compare>,
        ops: Vec<Op>,
        fence: Option<i64>,
    ) -> Result<TxnOutcome> {
        if let Some(term) = fence {
            compares.push(Compare::CreateRevision {
                key: self.keys.leader(),
                rev: term,
            });
        }
        let r = self
            .store
            .txn(Txn {
                compares,
                ops: ops.clone(),
            })
            .await;
        self.note(&r);
        match r? {
            TxnOutcome::Committed(rev) => {
                self.metrics.commits.fetch_add(1, Ordering::Relaxed);
                self.cache.apply_own(&ops, rev);
                let mut s = lock(&self.session);
                s.last_commit_rev = s.last_commit_rev.max(rev);
                Ok(TxnOutcome::Committed(rev))
            }
            TxnOutcome::Conflict(rev) => {
                self.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
                Ok(TxnOutcome::Conflict(rev))
            }
        }
    }

    /// After a conflict: re-reads the compared keys (or waits for the copy to move on, for a
    /// change that read everything).
    async fn catch_up(&self, compares: &[Compare], read_rev: i64) -> Result<()> {
        let (keys, prefix) = compared_keys(compares);
        if prefix {
            if !self
                .cache
                .wait_past(read_rev, Duration::from_millis(500))
                .await
            {
                let r = self.cache.reload(self.store.as_ref()).await;
                self.note(&r);
                r?;
            }
            return Ok(());
        }
        for key in keys {
            let kv = self.store.get(&key).await;
            self.note(&kv);
            self.cache.apply_read(&key, kv?.as_ref());
        }
        Ok(())
    }

    /// Reads, decides and commits one change, retrying on conflicts.
    async fn change<R>(
        &self,
        scope: Scope<'_>,
        mut f: impl FnMut(&mut Model) -> Result<R>,
    ) -> Result<R> {
        self.loaded()?;
        for _ in 0..ATTEMPTS {
            let (mut m, rev) = self.cache.read(|s| {
                (
                    Model::read(
                        s,
                        scope,
                        now_ms(),
                        &self.config.server_id,
                        self.config.plan,
                        &self.config.timers,
                    ),
                    s.known_rev,
                )
            });
            let out = f(&mut m)?;
            let (compares, ops) = m.diff(&self.keys, rev);
            if ops.is_empty() {
                return Ok(out);
            }
            match self.commit(compares.clone(), ops, None).await? {
                TxnOutcome::Committed(_) => return Ok(out),
                TxnOutcome::Conflict(_) => self.catch_up(&compares, rev).await?,
            }
        }
        Err(Error::Store(
            "too many concurrent updates of the same state; try again".into(),
        ))
    }

    /// Handles a registration (idempotent per instance ID).
    pub async fn register(&self, req: RegisterRequest) -> Result<RegisterResponse> {
        let order = (req.agent_start_ms, req.sequence);
        let reg = req
            .node
            .ok_or_else(|| Error::Lifecycle("registration without node".into()))?;
        if reg.instance_id.is_empty() || reg.node_name.is_empty() {
            return Err(Error::Lifecycle(
                "registration needs instance_id and node_name".into(),
            ));
        }
        self.loaded()?;
        let registry_id = self.registry_id().await?;
        let id = reg.instance_id.clone();
        let reg: super::state::Registration = reg.into();
        let state = self
            .change(Scope::Node(&id), |m| m.register(reg.clone(), order))
            .await?;
        lock(&self.seen).insert(id, now_ms());
        Ok(RegisterResponse {
            state: state.as_str().into(),
            heartbeat_interval_ms: self.config.timers.heartbeat_interval.as_millis() as u64,
            server_id: self.config.server_id.clone(),
            registry_id,
        })
    }

    /// Handles a heartbeat: records conditions and acknowledgements (written only when they
    /// change something), moves the state, returns the unacknowledged commands.
    pub async fn heartbeat(&self, hb: HeartbeatRequest) -> Result<HeartbeatResponse> {
        self.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
        self.loaded()?;
        let id = hb.instance_id.clone();
        let mut fetched = false;
        for _ in 0..ATTEMPTS {
            let read = self.cache.read(|s| {
                s.nodes.contains_key(&id).then(|| {
                    (
                        Model::read(
                            s,
                            Scope::Node(&id),
                            now_ms(),
                            &self.config.server_id,
                            self.config.plan,
                            &self.config.timers,
                        ),
                        s.known_rev,
                    )
                })
            });
            let Some((mut m, rev)) = read else {
                // Maybe registered through another replica a moment ago.
                if !fetched {
                    fetched = true;
                    let key = self.keys.node(&id);
                    let kv = self.store.get(&key).await;
                    self.note(&kv);
                    let kv = kv?;
                    self.cache.apply_read(&key, kv.as_ref());
                    if kv.is_some() {
                        continue;
                    }
                }
                return Ok(HeartbeatResponse {
                    state: String::new(),
                    commands: Vec::new(),
                    known: false,
                });
            };
            lock(&self.seen).insert(id.clone(), m.now);
            let resp = m.heartbeat(&hb).expect("known node");
            let (compares, ops) = m.diff(&self.keys, rev);
            if ops.is_empty() {
                return Ok(resp);
            }
            self.metrics
                .heartbeat_writes
                .fetch_add(1, Ordering::Relaxed);
            match self.commit(compares.clone(), ops, None).await? {
                TxnOutcome::Committed(_) => return Ok(resp),
                TxnOutcome::Conflict(_) => self.catch_up(&compares, rev).await?,
            }
        }
        Err(Error::Store(
            "too many concurrent updates of this node; try again".into(),
        ))
    }

    /// Replaces the workload model's pods (admin API).
    pub async fn set_pods(&self, pods: Vec<Pod>) -> Result<()> {
        self.change(Scope::Workload, |m| {
            m.workload.pods = pods.clone();
            Ok(())
        })
        .await
    }

    /// Replaces the PodDisruptionBudgets (admin API).
    pub async fn set_pdbs(&self, pdbs: Vec<Pdb>) -> Result<()> {
        self.change(Scope::Workload, |m| {
            m.workload.pdbs = pdbs.clone();
            Ok(())
        })
        .await
    }

    fn resolve(&self, node: &str) -> Result<String> {
        self.loaded()?;
        self.cache.read(|s| Model::resolve(s, node))
    }

    /// Drains a node (and terminates it when `terminate`); the leader carries the drain on.
    pub async fn drain(&self, node: &str, terminate: bool) -> Result<()> {
        let id = self.resolve(node)?;
        self.change(Scope::Node(&id), |m| {
            m.drain(&id, terminate);
            Ok(())
        })
        .await
    }

    /// Cordons or uncordons a node.
    pub async fn cordon(&self, node: &str, cordon: bool) -> Result<()> {
        let id = self.resolve(node)?;
        self.change(Scope::Node(&id), |m| {
            m.cordon(&id, cordon);
            Ok(())
        })
        .await
    }

    /// Starts an upgrade of a pool; the leader carries it out.
    pub async fn upgrade(&self, req: UpgradeRequest) -> Result<()> {
        self.change(Scope::All, |m| m.start_upgrade(req.clone()))
            .await
    }

    /// The provisioner carried a request out (a hook that exited 0): a delete leaves the list
    /// (creates and reinstalls leave it when the instance registers).
    pub async fn provision_done(&self, id: &str) -> Result<()> {
        let Some(p) = self.cache.read(|s| s.provisions.get(id).cloned()) else {
            return Ok(());
        };
        if !matches!(p.value.request, ProvisionRequest::Delete { .. }) {
            return Ok(());
        }
        let key = self.keys.provision(id);
        self.commit(
            vec![Compare::ModRevision {
                key: key.clone(),
                rev: p.mod_revision,
            }],
            vec![Op::Delete { key }],
            None,
        )
        .await
        .map(|_| ())
    }

    /// Keeps this replica's lease (one pass).
    pub async fn session_step(&self) {
        let lease = lock(&self.session).lease;
        if lease == 0 {
            let r = self.store.grant(self.config.lease_ttl_secs).await;
            self.note(&r);
            if let Ok(id) = r {
                tracing::debug!(lease = format!("{id:x}"), "lease granted");
                let mut s = lock(&self.session);
                s.lease = id;
                s.lease_ok_ms = now_ms();
            }
            return;
        }
        let r = self.store.keep_alive(lease).await;
        self.note(&r);
        match r {
            Ok(true) => lock(&self.session).lease_ok_ms = now_ms(),
            Ok(false) => {
                let mut s = lock(&self.session);
                s.lease = 0;
                if let Role::Leader { term } = s.role {
                    tracing::warn!(term, "lost leadership: the lease expired");
                    s.role = Role::Follower;
                    s.paused = None;
                }
            }
            Err(_) => {}
        }
    }

    /// Writes this replica's report: the heartbeats it received (one pass).
    pub async fn report_step(&self) {
        let (lease, reported_role) = {
            let s = lock(&self.session);
            (s.lease, s.reported_role.clone())
        };
        if lease == 0 || !self.cache.read(|s| s.loaded) {
            return;
        }
        let now = now_ms();
        let grace = self.config.timers.heartbeat_grace.as_millis() as u64;
        let known: HashSet<String> = self.cache.read(|s| s.nodes.keys().cloned().collect());
        let heartbeats: BTreeMap<String, u64> = {
            let mut seen = lock(&self.seen);
            // Bounded by the registered nodes (and recent registrations).
            seen.retain(|id, t| known.contains(id) || now.saturating_sub(*t) < 2 * grace);
            seen.iter().map(|(k, v)| (k.clone(), *v)).collect()
        };
        let role = self.role_name();
        // With nodes registered, every report counts (it also vouches for silence).
        if known.is_empty() && heartbeats.is_empty() && role == reported_role {
            return;
        }
        let report = ReplicaReport {
            server_id: self.config.server_id.clone(),
            started_ms: self.started_ms,
            written_ms: now,
            heartbeats,
            role: role.clone(),
        };
        let ops = vec![Op::Put {
            key: self.keys.replica(&self.config.server_id),
            value: encode(&report),
            lease,
        }];
        match self.commit(Vec::new(), ops, None).await {
            Ok(_) => {
                self.metrics.reports.fetch_add(1, Ordering::Relaxed);
                lock(&self.session).reported_role = role;
            }
            Err(Error::Store(e)) if e.contains("lease") && e.contains("not found") => {
                lock(&self.session).lease = 0;
            }
            Err(_) => {}
        }
    }

    fn role_name(&self) -> String {
        let s = lock(&self.session);
        match (s.role, &s.paused) {
            (Role::Disabled, _) => "disabled".into(),
            (Role::Follower, _) => "follower".into(),
            (Role::Leader { .. }, None) => "leader".into(),
            (Role::Leader { .. }, Some(_)) => "leader (paused)".into(),
        }
    }

    /// Why the leader must not decide now (it never acts on a copy it cannot trust).
    fn pause_reason(&self) -> Option<String> {
        let age = now_ms().saturating_sub(lock(&self.session).lease_ok_ms);
        if age > self.config.lease_ms() / 2 {
            let err = lock(&self.health).last_error.clone().unwrap_or_default();
            return Some(format!(
                "store unreachable: lease not renewed for {:.1} s ({err})",
                age as f64 / 1000.0
            ));
        }
        let ch = self.cache.health();
        if !ch.following {
            return Some(format!(
                "registry copy not following the store: {}",
                ch.last_error.unwrap_or_default()
            ));
        }
        let bad: Vec<String> = self.cache.read(|s| s.undecodable.keys().cloned().collect());
        if !bad.is_empty() {
            return Some(format!(
                "store holds values this binary cannot read: {}",
                bad.join(", ")
            ));
        }
        None
    }

    /// Campaigns for leadership and, as the leader, runs one controller pass.
    pub async fn controller_step(&self) -> Result<()> {
        if !self.cache.read(|s| s.loaded) {
            return Ok(());
        }
        if self.cache.read(|s| s.meta.is_none()) {
            self.registry_id().await?;
        }
        let (lease, role) = {
            let s = lock(&self.session);
            (s.lease, s.role)
        };
        if role == Role::Disabled || lease == 0 {
            return Ok(());
        }
        let (leader, known_rev) = self.cache.read(|s| (s.leader.clone(), s.known_rev));
        let me = &self.config.server_id;
        let role = match (leader, role) {
            // Just elected; the copy has not seen it yet.
            (_, Role::Leader { term }) if known_rev < term => role,
            (None, _) => self.campaign(lease).await?,
            (Some(l), _) if l.value.server_id == *me && l.value.lease == lease => Role::Leader {
                term: l.create_revision,
            },
            (Some(l), _) if l.value.server_id == *me => {
                // An earlier incarnation of this replica: its lease would only delay the election.
                tracing::info!(
                    lease = format!("{:x}", l.value.lease),
                    "revoking the lease of this replica's previous run"
                );
                let r = self.store.revoke(l.value.lease).await;
                self.note(&r);
                Role::Follower
            }
            (Some(_), _) => Role::Follower,
        };
        let was = {
            let mut s = lock(&self.session);
            std::mem::replace(&mut s.role, role)
        };
        if was != role {
            match (was, role) {
                (Role::Leader { term }, _) => {
                    tracing::warn!(term, "lost leadership");
                    lock(&self.session).paused = None;
                }
                (_, Role::Leader { term }) => {
                    tracing::info!(term, "this replica leads the lifecycle controller")
                }
                _ => {}
            }
        }
        let Role::Leader { term } = role else {
            return Ok(());
        };
        let reason = self.pause_reason();
        {
            let mut s = lock(&self.session);
            if s.paused != reason {
                match &reason {
                    Some(r) => tracing::warn!(term, "lifecycle decisions paused: {r}"),
                    None => tracing::info!(term, "lifecycle decisions resumed"),
                }
                s.paused = reason.clone();
            }
        }
        if reason.is_some() {
            return Ok(());
        }
        self.decide(term).await
    }

    async fn campaign(&self, lease: i64) -> Result<Role> {
        let now = now_ms();
        let leader = LeaderRecord {
            server_id: self.config.server_id.clone(),
            lease,
            elected_ms: now,
        };
        let batch = EventBatch {
            events: vec![Event {
                unix_ms: now,
                node: "controlplane".into(),
                message: format!("{} elected leader", self.config.server_id),
                server: self.config.server_id.clone(),
            }],
        };
        let ops = vec![
            Op::Put {
                key: self.keys.leader(),
                value: encode(&leader),
                lease,
            },
            Op::Put {
                key: self.keys.event(&self.config.server_id, now, 0),
                value: encode(&batch),
                lease: 0,
            },
        ];
        let compares = vec![Compare::CreateRevision {
            key: self.keys.leader(),
            rev: 0,
        }];
        match self.commit(compares, ops, None).await {
            Ok(TxnOutcome::Committed(term)) => Ok(Role::Leader { term }),
            Ok(TxnOutcome::Conflict(_)) => Ok(Role::Follower),
            Err(Error::Store(e)) if e.contains("lease") && e.contains("not found") => {
                lock(&self.session).lease = 0;
                Ok(Role::Follower)
            }
            Err(e) => Err(e),
        }
    }

    /// What this replica knows about the nodes' heartbeats.
    fn liveness(&self) -> Liveness {
        let now = now_ms();
        let mut live = Liveness {
            known_until_ms: now,
            listening_since_ms: self.started_ms,
            last: lock(&self.seen).clone(),
        };
        self.cache.read(|s| {
            for (id, r) in &s.replicas {
                if *id == self.config.server_id {
                    continue;
                }
                let r = &r.value;
                live.known_until_ms = live.known_until_ms.min(r.written_ms);
                live.listening_since_ms = live.listening_since_ms.min(r.started_ms);
                for (n, t) in &r.heartbeats {
                    let e = live.last.entry(n.clone()).or_insert(0);
                    *e = (*e).max(*t);
                }
            }
        });
        live
    }

    /// One controller pass of the leader of `term`.
    async fn decide(&self, term: i64) -> Result<()> {
        let last = lock(&self.session).last_commit_rev;
        if self.cache.read(|s| s.known_rev) < last
            && !self
                .cache
                .wait_past(last - 1, Duration::from_millis(500))
                .await
        {
            return Ok(());
        }
        self.dispatch(term).await;
        let live = self.liveness();
        let (mut m, rev) = self.cache.read(|s| {
            (
                Model::read(
                    s,
                    Scope::All,
                    now_ms(),
                    &self.config.server_id,
                    self.config.plan,
                    &self.config.timers,
                ),
                s.known_rev,
            )
        });
        m.tick(&live);
        let (compares, ops) = m.diff(&self.keys, rev);
        if !ops.is_empty() {
            match self.commit(compares, ops, Some(term)).await? {
                TxnOutcome::Committed(_) => {
                    lock(&self.session).conflicts = 0;
                    if !m.requested.is_empty() {
                        self.dispatch(term).await;
                    }
                }
                TxnOutcome::Conflict(_) => {
                    let n = {
                        let mut s = lock(&self.session);
                        s.conflicts += 1;
                        s.conflicts
                    };
                    if n >= 3 {
                        let r = self.cache.reload(self.store.as_ref()).await;
                        self.note(&r);
                        lock(&self.session).conflicts = 0;
                    } else {
                        self.cache.wait_past(rev, Duration::from_millis(300)).await;
                    }
                    return Ok(());
                }
            }
        }
        self.trim_events(term).await
    }

    /// Hands out the provisioning requests not dispatched yet and marks them.
    async fn dispatch(&self, term: i64) {
        let pending: Vec<(i64, ProvisionRecord)> = self.cache.read(|s| {
            s.provisions
                .values()
                .filter(|p| p.value.dispatched_ms.is_none())
                .map(|p| (p.mod_revision, p.value.clone()))
                .collect()
        });
        if pending.is_empty() {
            return;
        }
        let now = now_ms();
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        for (rev, mut p) in pending {
            if lock(&self.session).dispatched.insert(p.id.clone()) {
                tracing::info!(request = %p.id, action = p.request.action(), instance = p.request.instance_id(), "provisioning request");
                let _ = self.provision.send(p.clone());
            }
            p.dispatched_ms = Some(now);
            p.dispatched_by = Some(self.config.server_id.clone());
            let key = self.keys.provision(&p.id);
            compares.push(Compare::ModRevision {
                key: key.clone(),
                rev,
            });
            ops.push(Op::Put {
                key,
                value: encode(&p),
                lease: 0,
            });
        }
        let _ = self.commit(compares, ops, Some(term)).await;
    }

    /// Keeps the stored history bounded.
    async fn trim_events(&self, term: i64) -> Result<()> {
        let old: Vec<String> = self.cache.read(|s| {
            let n = s.events.len().saturating_sub(MAX_EVENT_BATCHES);
            s.events
                .keys()
                .take(n.min(100))
                .map(|(_, k)| k.clone())
                .collect()
        });
        if old.is_empty() {
            return Ok(());
        }
        let ops = old.into_iter().map(|key| Op::Delete { key }).collect();
        self.commit(Vec::new(), ops, Some(term)).await.map(|_| ())
    }

    /// One pass of the replica's loops (tests drive the registry with this).
    pub async fn step(&self) -> Result<()> {
        self.session_step().await;
        self.report_step().await;
        self.controller_step().await
    }

    /// The status view (this replica's copy of the store plus its own view).
    pub fn status(&self) -> RegistryStatus {
        let now = now_ms();
        let live = self.liveness();
        let session_role = self.role_name();
        let paused = lock(&self.session).paused.clone();
        let health = lock(&self.health).clone();
        let cache_health = self.cache.health();
        self.cache.read(|s| {
            let nodes = s
                .nodes
                .iter()
                .map(|(id, v)| {
                    let r = &v.value;
                    let reg = &r.registration;
                    let (last, _) = live.silence(id, r.last_heartbeat_ms);
                    let last = last.max(r.last_heartbeat_ms);
                    NodeStatus {
                        node_name: reg.node_name.clone(),
                        instance_id: id.clone(),
                        pool: reg.node_pool.clone(),
                        flavor: reg.flavor.clone(),
                        zone: reg.zone.clone(),
                        state: r.state,
                        reason: r.reason.clone(),
                        cordoned: r.cordoned,
                        version: r.version.clone(),
                        last_heartbeat_ms_ago: now.saturating_sub(last),
                        not_ready_since_ms: r.not_ready_since_ms,
                        reinstalls: r.reinstalls,
                        heals: r.heals,
                        conditions: r
                            .conditions
                            .iter()
                            .map(|c| (c.kind.clone(), c.status))
                            .collect(),
                        labels: reg.labels.clone(),
                        taints: reg.taints.clone(),
                        allocatable_cpu_millis: reg.allocatable.cpu_millis,
                        allocatable_memory_bytes: reg.allocatable.memory_bytes,
                        reserved_cpu_millis: reg.reserved.cpu_millis,
                        reserved_memory_bytes: reg.reserved.memory_bytes,
                        reserved_storage_bytes: reg.reserved.storage_bytes,
                        pending_commands: r.commands.iter().filter(|c| !c.acked).cloned().collect(),
                        last_commands: r.commands.iter().rev().take(10).cloned().collect(),
                        draining: r.drain.as_ref().map(|d| match &d.blocked_by {
                            Some(b) => format!("blocked by PodDisruptionBudget {b}"),
                            None => "in progress".into(),
                        }),
                    }
                })
                .collect();
            let workload = s
                .workload
                .as_ref()
                .map(|w| w.value.clone())
                .unwrap_or_default();
            let mut provisions: Vec<ProvisionRecord> =
                s.provisions.values().map(|p| p.value.clone()).collect();
            provisions.sort_by(|a, b| a.requested_ms.cmp(&b.requested_ms).then(a.id.cmp(&b.id)));
            let leader = s.leader.as_ref();
            RegistryStatus {
                plan: self.config.plan,
                store: StoreStatus {
                    backend: self.store.describe(),
                    shared: self.store.shared(),
                    prefix: self.keys.root().to_string(),
                    registry_id: s.meta.as_ref().map(|m| m.value.registry_id.clone()),
                    revision: s.known_rev,
                    reachable: health.reachable,
                    unreachable_since_ms: (!health.reachable).then_some(health.since_ms),
                    last_error: health.last_error.clone(),
                    copy: cache_health.clone(),
                    undecodable: s.undecodable.clone(),
                },
                controller: ControllerStatus {
                    server_id: self.config.server_id.clone(),
                    role: session_role.clone(),
                    leader: leader.map(|l| l.value.server_id.clone()),
                    term: leader.map(|l| l.create_revision),
                    paused: paused.clone(),
                    lease_ttl_secs: self.config.lease_ttl_secs,
                },
                replicas: s
                    .replicas
                    .values()
                    .map(|r| ReplicaStatus {
                        server_id: r.value.server_id.clone(),
                        role: r.value.role.clone(),
                        report_age_ms: now.saturating_sub(r.value.written_ms),
                        nodes_heard: r.value.heartbeats.len(),
                    })
                    .collect(),
                nodes,
                pods: workload.pods,
                pdbs: workload.pdbs,
                upgrade: s.upgrade.as_ref().map(|u| {
                    let u = &u.value;
                    UpgradeStatus {
                        pool: u.request.pool.clone(),
                        version: u.request.version.clone(),
                        strategy: u.request.strategy.clone(),
                        done: u.done,
                        failed: u.failed.clone(),
                        current: u.current.clone(),
                        creating: u.creating.clone(),
                    }
                }),
                pending_actions: provisions.iter().map(|p| p.request.clone()).collect(),
                provisions,
                max_concurrent_in_place: s
                    .upgrade
                    .as_ref()
                    .map_or(0, |u| u.value.max_concurrent_in_place),
                events: s.events.values().flatten().cloned().collect(),
            }
        })
    }
}

/// The boxed future type of the replica's periodic steps.
mod futures_step {
    pub type Step = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// Default heartbeat interval a node uses when the server gives none.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use berth_proto::node::{CommandAck, CommandKind, Condition, NodeRegistration};

    use super::*;
    use crate::lifecycle::{machine, store::memory::MemoryStore};

    fn timers() -> Timers {
        Timers {
            heartbeat_grace: Duration::from_millis(400),
            autoheal_after: Duration::from_millis(1_500),
            tick: Duration::from_millis(50),
            ..Default::default()
        }
    }

    struct Replica {
        r: Arc<Registry>,
        prov: mpsc::UnboundedReceiver<ProvisionRecord>,
        _stop: watch::Sender<bool>,
    }

    async fn replica(store: &Arc<MemoryStore>, server: &str, plan: Plan) -> Replica {
        let (tx, prov) = mpsc::unbounded_channel();
        let r = Registry::new(
            LifecycleConfig {
                plan,
                timers: timers(),
                server_id: server.into(),
                controller: true,
                lease_ttl_secs: 1,
                prefix: "/test".into(),
            },
            store.clone(),
            tx,
        );
        let (stop, rx) = watch::channel(false);
        r.follow(rx);
        assert!(r.wait_loaded(Duration::from_secs(5)).await);
        Replica {
            r,
            prov,
            _stop: stop,
        }
    }

    fn registration(name: &str, version: &str) -> RegisterRequest {
        RegisterRequest {
            node: Some(NodeRegistration {
                node_name: name.into(),
                instance_id: format!("i-{name}"),
                node_pool: "p".into(),
                version: version.into(),
                ..Default::default()
            }),
            agent_start_ms: 0,
            sequence: 0,
        }
    }

    fn beat(name: &str, version: &str, acks: Vec<CommandAck>) -> HeartbeatRequest {
        let c = |t: &str, status: bool| Condition {
            r#type: t.into(),
            status,
            message: format!("{t} probed"),
        };
        HeartbeatRequest {
            instance_id: format!("i-{name}"),
            conditions: vec![
                c(machine::KUBELET_HEALTHY, true),
                c(machine::RUNTIME_HEALTHY, true),
                c(machine::DATAPATH_LOADED, true),
                c(machine::DISK_PRESSURE, false),
            ],
            version: version.into(),
            acks,
            shutting_down: false,
            agent_start_ms: 0,
            sequence: 0,
        }
    }

    fn node(s: &RegistryStatus, name: &str) -> NodeStatus {
        s.nodes
            .iter()
            .find(|n| n.node_name == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in status"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_upgrade_stops_the_rollout() {
        let store = Arc::new(MemoryStore::new());
        let a = replica(&store, "s1", Plan::Free).await;
        let r = &a.r;
        a.r.step().await.unwrap();
        for n in ["n1", "n2"] {
            assert_eq!(
                r.register(registration(n, "v1")).await.unwrap().state,
                "Installing"
            );
            assert_eq!(
                r.heartbeat(beat(n, "v1", vec![])).await.unwrap().state,
                "Ready"
            );
        }
        r.upgrade(UpgradeRequest {
            pool: "p".into(),
            version: "v2".into(),
            strategy: Strategy::InPlace,
        })
        .await
        .unwrap();
        let again = r
            .upgrade(UpgradeRequest {
                pool: "p".into(),
                version: "v3".into(),
                strategy: Strategy::InPlace,
            })
            .await;
        assert!(again.is_err(), "one upgrade at a time");
        r.step().await.unwrap(); // n1: cordon + drain
        r.step().await.unwrap(); // drained (no pods): UPGRADE
        let cmds = r
            .heartbeat(beat("n1", "v1", vec![]))
            .await
            .unwrap()
            .commands;
        let kinds: Vec<i32> = cmds.iter().map(|c| c.kind).collect();
        assert_eq!(
            kinds,
            vec![
                CommandKind::Cordon as i32,
                CommandKind::Drain as i32,
                CommandKind::Upgrade as i32
            ]
        );
        let acks = cmds
            .iter()
            .map(|c| CommandAck {
                command_id: c.id,
                error: if c.kind == CommandKind::Upgrade as i32 {
                    "upgrade hook failed: exit status 1".into()
                } else {
                    String::new()
                },
            })
            .collect();
        let rsp = r.heartbeat(beat("n1", "v1", acks)).await.unwrap();
        assert!(rsp.commands.is_empty());
        r.step().await.unwrap();
        r.step().await.unwrap();
        let s = r.status();
        let up = s.upgrade.clone().unwrap();
        assert!(up.done);
        assert!(up.failed.unwrap().contains("n1: upgrade hook failed"));
        let n1 = node(&s, "n1");
        assert_eq!(
            (n1.state, n1.version.as_str(), n1.cordoned),
            (NodeState::Ready, "v1", true)
        );
        let n2 = node(&s, "n2");
        assert_eq!(
            (n2.state, n2.version.as_str(), n2.cordoned),
            (NodeState::Ready, "v1", false)
        );
        assert_eq!(s.max_concurrent_in_place, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_and_terminated_nodes() {
        let store = Arc::new(MemoryStore::new());
        let mut a = replica(&store, "s1", Plan::Standard).await;
        let r = a.r.clone();
        r.step().await.unwrap();
        assert!(
            !r.heartbeat(beat("ghost", "v1", vec![]))
                .await
                .unwrap()
                .known
        );
        assert!(
            r.register(RegisterRequest {
                node: None,
                agent_start_ms: 0,
                sequence: 0
            })
            .await
            .is_err()
        );
        r.register(registration("n1", "v1")).await.unwrap();
        r.heartbeat(beat("n1", "v1", vec![])).await.unwrap();
        r.drain("n1", true).await.unwrap();
        r.step().await.unwrap();
        assert_eq!(r.status().nodes[0].state, NodeState::Terminated);
        let rec = a.prov.try_recv().expect("a delete request");
        assert!(matches!(rec.request, ProvisionRequest::Delete { .. }));
        // A terminated instance cannot come back.
        assert!(r.register(registration("n1", "v1")).await.is_err());
        assert!(r.drain("nope", false).await.is_err());
        // The request is marked dispatched and is handed out once.
        r.step().await.unwrap();
        assert!(a.prov.try_recv().is_err());
        assert!(r.status().provisions[0].dispatched_ms.is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unchanged_heartbeats_write_nothing() {
        let store = Arc::new(MemoryStore::new());
        let a = replica(&store, "s1", Plan::Free).await;
        a.r.register(registration("n1", "v1")).await.unwrap();
        a.r.heartbeat(beat("n1", "v1", vec![])).await.unwrap();
        let before = store.revision();
        for _ in 0..100 {
            let rsp = a.r.heartbeat(beat("n1", "v1", vec![])).await.unwrap();
            assert_eq!(rsp.state, "Ready");
        }
        assert_eq!(
            store.revision(),
            before,
            "100 unchanged heartbeats, no write"
        );
        // A changed condition is one write; the same registration again is none.
        let mut sick = beat("n1", "v1", vec![]);
        sick.conditions[0].status = false;
        assert_eq!(a.r.heartbeat(sick.clone()).await.unwrap().state, "NotReady");
        assert_eq!(store.revision(), before + 1);
        a.r.heartbeat(sick).await.unwrap();
        assert_eq!(store.revision(), before + 1);
        a.r.register(registration("n1", "v1")).await.unwrap();
        assert_eq!(store.revision(), before + 2, "NotReady re-registration");
        a.r.register(registration("n1", "v1")).await.unwrap();
        assert_eq!(store.revision(), before + 2, "idempotent registration");
        assert_eq!(a.r.metrics.heartbeats.load(Ordering::Relaxed), 103);
        assert_eq!(a.r.metrics.heartbeat_writes.load(Ordering::Relaxed), 2);
    }

    /// A heartbeat delayed on one replica arrives after a newer one through another replica:
    /// it must not undo the newer facts (here the upgraded version).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delayed_heartbeat_never_undoes_a_newer_one() {
        let store = Arc::new(MemoryStore::new());
        let a = replica(&store, "s1", Plan::Free).await;
        let b = replica(&store, "s2", Plan::Free).await;
        let stamped = |v: &str, seq: u64| HeartbeatRequest {
            agent_start_ms: 1_000,
            sequence: seq,
            ..beat("n1", v, vec![])
        };
        a.r.register(registration("n1", "v1")).await.unwrap();
        a.r.heartbeat(stamped("v1", 1)).await.unwrap();
        // The agent upgrades; its report #3 reaches s1 first, report #2 (still v1) reaches s2 late.
        a.r.heartbeat(stamped("v2", 3)).await.unwrap();
        let rev = store.revision();
        let late = b.r.heartbeat(stamped("v1", 2)).await.unwrap();
        assert!(late.known);
        assert_eq!(store.revision(), rev, "the late report wrote nothing");
        assert_eq!(node(&b.r.status(), "n1").version, "v2");
        // A restarted agent registers first (a new report order), whatever its clock says;
        // the old process's delayed reports are then sent to register again.
        let restarted = RegisterRequest {
            agent_start_ms: 500,
            sequence: 1,
            ..registration("n1", "v3")
        };
        b.r.register(restarted).await.unwrap();
        let hb = HeartbeatRequest {
            agent_start_ms: 500,
            sequence: 2,
            ..beat("n1", "v3", vec![])
        };
        assert!(b.r.heartbeat(hb).await.unwrap().known);
        assert_eq!(node(&b.r.status(), "n1").version, "v3");
        let old = b.r.heartbeat(stamped("v2", 4)).await.unwrap();
        assert!(!old.known, "the old process must register again");
        assert_eq!(node(&b.r.status(), "n1").version, "v3");
        // Old agents (no stamp) are applied as they come.
        a.r.heartbeat(beat("n1", "v4", vec![])).await.unwrap();
        assert_eq!(node(&a.r.status(), "n1").version, "v4");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_share_one_registry_and_one_leader() {
        let store = Arc::new(MemoryStore::new());
        let a = replica(&store, "s1", Plan::Free).await;
        let b = replica(&store, "s2", Plan::Free).await;
        for _ in 0..3 {
            a.r.step().await.unwrap();
            b.r.step().await.unwrap();
        }
        let roles = [a.r.role_name(), b.r.role_name()];
        assert_eq!(
            roles.iter().filter(|r| *r == "leader").count(),
            1,
            "{roles:?}"
        );
        // Registered through one replica, heartbeating through the other.
        a.r.register(registration("n1", "v1")).await.unwrap();
        let rsp = b.r.heartbeat(beat("n1", "v1", vec![])).await.unwrap();
        assert!(rsp.known);
        assert_eq!(rsp.state, "Ready");
        assert!(a.r.cache.wait_past(0, Duration::from_secs(1)).await);
        let wait = |r: Arc<Registry>| async move {
            for _ in 0..100 {
                let s = r.status();
                if s.nodes.len() == 1 && s.nodes[0].state == NodeState::Ready {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("replica never saw the node Ready");
        };
        let (sa, sb) = (wait(a.r.clone()).await, wait(b.r.clone()).await);
        assert_eq!(sa.store.registry_id, sb.store.registry_id);
        assert_eq!(sa.controller.leader, sb.controller.leader);
        // Both replicas deliver the same command under one registry ID.
        a.r.cordon("n1", true).await.unwrap();
        let ca =
            a.r.heartbeat(beat("n1", "v1", vec![]))
                .await
                .unwrap()
                .commands;
        let mut cb = Vec::new();
        for _ in 0..100 {
            // b's copy follows the store through its watch.
            cb =
                b.r.heartbeat(beat("n1", "v1", vec![]))
                    .await
                    .unwrap()
                    .commands;
            if !cb.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(ca, cb);
        assert_eq!(ca.len(), 1);
        let id_a =
            a.r.register(registration("n1", "v1"))
                .await
                .unwrap()
                .registry_id;
        let id_b =
            b.r.register(registration("n1", "v1"))
                .await
                .unwrap()
                .registry_id;
        assert_eq!(id_a, id_b);
        // The acknowledgement through either replica lands once.
        let ack = vec![CommandAck {
            command_id: ca[0].id,
            error: String::new(),
        }];
        let (x, y) = tokio::join!(
            a.r.heartbeat(beat("n1", "v1", ack.clone())),
            b.r.heartbeat(beat("n1", "v1", ack))
        );
        assert!(x.unwrap().commands.is_empty() && y.unwrap().commands.is_empty());
    }

    /// Leader s1 stops renewing its lease (a pause, a partition from etcd): s2 takes over;
    /// s1, still believing it leads, is fenced off by its term.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_leader_is_fenced_and_the_next_continues() {
        let store = Arc::new(MemoryStore::new());
        let mut a = replica(&store, "s1", Plan::Free).await;
        let mut b = replica(&store, "s2", Plan::Free).await;
        a.r.step().await.unwrap();
        b.r.step().await.unwrap();
        let Role::Leader { term } = lock(&a.r.session).role else {
            panic!("s1 leads")
        };
        a.r.register(registration("n1", "v1")).await.unwrap();
        a.r.heartbeat(beat("n1", "v1", vec![])).await.unwrap();
        // n1 falls silent: s1 marks it NotReady (its clock starts at the silence + grace).
        let mut not_ready_since = None;
        for _ in 0..200 {
            a.r.step().await.unwrap();
            b.r.session_step().await;
            b.r.report_step().await;
            let n = node(&a.r.status(), "n1");
            if n.state == NodeState::NotReady {
                not_ready_since = n.not_ready_since_ms;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t0 = not_ready_since.expect("NotReady");
        // s1 stops (no more renewals); s2 keeps its lease and takes over once s1's expired.
        let mut took_over_ms = 0;
        for _ in 0..300 {
            b.r.step().await.unwrap();
            if b.r.role_name() == "leader" {
                took_over_ms = now_ms();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(took_over_ms > 0, "s2 took over");
        // s1 wakes up believing it leads; its decision transaction is refused.
        let rev = store.revision();
        a.r.decide(term).await.unwrap();
        assert_eq!(store.revision(), rev, "the fenced leader wrote nothing");
        // s2 heals n1 once, at NotReady + autoheal (not counted from the takeover).
        let mut healed = None;
        for _ in 0..300 {
            b.r.step().await.unwrap();
            if let Ok(rec) = b.prov.try_recv() {
                healed = Some(rec);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rec = healed.expect("auto-heal");
        assert!(matches!(rec.request, ProvisionRequest::Reinstall { .. }));
        let autoheal = timers().autoheal_after.as_millis() as u64;
        assert!(rec.requested_ms >= t0 + autoheal, "not shortened");
        assert!(
            rec.requested_ms < took_over_ms + autoheal,
            "not restarted by the failover"
        );
        a.r.step().await.unwrap();
        assert!(a.prov.try_recv().is_err(), "s1 dispatched nothing");
        for _ in 0..10 {
            b.r.step().await.unwrap();
        }
        let s = b.r.status();
        assert_eq!(node(&s, "n1").heals, 1);
        assert_eq!(
            s.events
                .iter()
                .filter(|e| e.message.contains("auto-heal"))
                .count(),
            1
        );
        assert_eq!(s.controller.leader.as_deref(), Some("s2"));
        assert!(b.prov.try_recv().is_err(), "one request");
    }
}
