//! What the registry stores, and where (the layout is documented in `docs/controlplane-state.md`).
//!
//! Every value is a JSON object with a `"schema"` field ([`SCHEMA_VERSION`]); a value of another
//! schema is never guessed at: the replica reports it and the leader makes no decision while the
//! state holds one. Timestamps are Unix milliseconds written by the replica that made the change,
//! so every timer (NotReady → auto-heal, drain timeout, pod start) survives a failover.
//!
//! Keys, under `--etcd-prefix` (default `/berth/default`, one prefix per cluster):
//!
//! | key | value | written by |
//! |---|---|---|
//! | `v1/meta` | [`MetaRecord`]: registry ID | the first replica, once |
//! | `v1/state/nodes/<instance ID>` | [`NodeRecord`] | any replica (registration, heartbeat that changes something, admin), the leader (timers, drains, upgrades) |
//! | `v1/state/upgrade` | [`UpgradeRecord`]: the running or last upgrade | admin (start), the leader |
//! | `v1/state/workload` | [`Workload`]: pods, PDBs | admin, the leader (scheduler, evictions) |
//! | `v1/state/cluster` | [`ClusterRecord`]: node name counter | the leader |
//! | `v1/state/provision/<request ID>` | [`ProvisionRecord`] | the leader (request, dispatch), registration (fulfilled) |
//! | `v1/events/<server>/<ms>-<n>` | [`EventBatch`]: the history lines of one change | whoever made the change, in the same transaction |
//! | `v1/replicas/<server ID>` | [`ReplicaReport`]: heartbeats this replica received (lease-bound) | that replica, every `--heartbeat-grace-ms`/4 |
//! | `v1/leader` | [`LeaderRecord`] (lease-bound; its create revision is the term) | the elected replica |
use std::collections::BTreeMap;

use berth_proto::node::{NodeRegistration, Resources, Taint};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::machine::{NodeState, Pdb, Pod};
use crate::{Error, Result};

/// Schema version of every stored value.
pub const SCHEMA_VERSION: u64 = 1;

/// The key layout of one cluster's registry.
#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// `prefix` is the cluster's prefix (e.g. `/berth/default`); keys live under `prefix/v1/`.
    pub fn new(prefix: &str) -> Self {
        Keys {
            root: format!("{}/v1/", prefix.trim_end_matches('/')),
        }
    }
    /// Everything of this cluster.
    pub fn root(&self) -> &str {
        &self.root
    }
    pub fn meta(&self) -> String {
        format!("{}meta", self.root)
    }
    /// The decision state: what the leader's transactions check is unchanged.
    pub fn state_prefix(&self) -> String {
        format!("{}state/", self.root)
    }
    pub fn nodes_prefix(&self) -> String {
        format!("{}state/nodes/", self.root)
    }
    pub fn node(&self, instance_id: &str) -> String {
        format!("{}{instance_id}", self.nodes_prefix())
    }
    pub fn upgrade(&self) -> String {
        format!("{}state/upgrade", self.root)
    }
    pub fn workload(&self) -> String {
        format!("{}state/workload", self.root)
    }
    pub fn cluster(&self) -> String {
        format!("{}state/cluster", self.root)
    }
    pub fn provisions_prefix(&self) -> String {
        format!("{}state/provision/", self.root)
    }
    pub fn provision(&self, id: &str) -> String {
        format!("{}{id}", self.provisions_prefix())
    }
    pub fn events_prefix(&self) -> String {
        format!("{}events/", self.root)
    }
    pub fn event(&self, server: &str, unix_ms: u64, n: usize) -> String {
        format!("{}{server}/{unix_ms:013}-{n:04}", self.events_prefix())
    }
    pub fn replicas_prefix(&self) -> String {
        format!("{}replicas/", self.root)
    }
    pub fn replica(&self, server: &str) -> String {
        format!("{}{server}", self.replicas_prefix())
    }
    pub fn leader(&self) -> String {
        format!("{}leader", self.root)
    }
}

/// Encodes a value with its schema version.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut v = serde_json::to_value(value).expect("registry values serialize");
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("schema".into(), SCHEMA_VERSION.into());
    }
    serde_json::to_vec(&v).expect("json")
}

/// Decodes a value written by [`encode`]; refuses another schema version.
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    let bad = |reason: String| Error::Schema {
        key: key.to_string(),
        reason,
    };
    let mut v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let schema = v.get("schema").and_then(serde_json::Value::as_u64);
    if schema != Some(SCHEMA_VERSION) {
        return Err(bad(format!(
            "schema {} (this binary reads {SCHEMA_VERSION})",
            schema.map_or("missing".to_string(), |s| s.to_string())
        )));
    }
    if let serde_json::Value::Object(m) = &mut v {
        m.remove("schema");
    }
    serde_json::from_value(v).map_err(|e| bad(e.to_string()))
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `v1/meta`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaRecord {
    /// Identity of this registry: agents deduplicate lifecycle commands per registry (every
    /// replica delivers the same command).
    pub registry_id: String,
    pub created_ms: u64,
    pub created_by: String,
}

/// CPU, memory, storage, pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Res {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub storage_bytes: u64,
    pub pods: u32,
}

impl From<Option<Resources>> for Res {
    fn from(r: Option<Resources>) -> Self {
        let r = r.unwrap_or_default();
        Res {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            storage_bytes: r.storage_bytes,
            pods: r.pods,
        }
    }
}

/// A node's registration as stored (the `berth.node.v1.NodeRegistration` fields).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub node_name: String,
    pub instance_id: String,
    pub node_pool: String,
    pub flavor: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    /// `key=value:Effect`
    pub taints: Vec<String>,
    pub capacity: Res,
    pub reserved: Res,
    pub allocatable: Res,
    pub version: String,
    pub pod_cidr: String,
    pub node_ip: String,
}

impl From<NodeRegistration> for Registration {
    fn from(r: NodeRegistration) -> Self {
        Registration {
            labels: r.labels.into_iter().collect(),
            taints: r
                .taints
                .iter()
                .map(|Taint { key, value, effect }| format!("{key}={value}:{effect}"))
                .collect(),
            capacity: r.capacity.into(),
            reserved: r.reserved.into(),
            allocatable: r.allocatable.into(),
            node_name: r.node_name,
            instance_id: r.instance_id,
            node_pool: r.node_pool,
            flavor: r.flavor,
            zone: r.zone,
            version: r.version,
            pod_cidr: r.pod_cidr,
            node_ip: r.node_ip,
        }
    }
}

/// A reported condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: bool,
    pub message: String,
}

/// A command sent to a node and whether it was acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// Unique per node.
    pub id: u64,
    pub kind: String,
    pub argument: String,
    pub acked: bool,
    pub error: Option<String>,
    #[serde(default)]
    pub issued_ms: u64,
}

/// What follows a drain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterDrain {
    Nothing,
    /// In-place upgrade to this version.
    Upgrade(String),
    Terminate,
}

/// A drain in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainOp {
    /// PodDisruptionBudgets are respected until `started_ms + drain timeout`.
    pub started_ms: u64,
    pub then: AfterDrain,
    pub blocked_by: Option<String>,
}

/// `v1/state/nodes/<instance ID>`: one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub registration: Registration,
    pub state: NodeState,
    pub reason: String,
    pub state_since_ms: u64,
    pub cordoned: bool,
    /// Version the node reports (follows upgrades).
    pub version: String,
    pub registered_ms: u64,
    /// Last heartbeat that was written with a change (liveness in between: replica reports).
    pub last_heartbeat_ms: u64,
    /// Start of the NotReady clock (auto-heal after `--autoheal-after-ms`).
    pub not_ready_since_ms: Option<u64>,
    /// Last reported conditions; a change of status is written, a message-only change is not.
    pub conditions: Vec<Condition>,
    /// Last 50 commands.
    pub commands: Vec<CommandRecord>,
    pub next_command: u64,
    pub reinstalls: u32,
    pub heals: u32,
    pub drain: Option<DrainOp>,
    /// Waiting for the node to come back at this version (in-place upgrade).
    pub upgrading_to: Option<String>,
    /// Order of the last applied report of the node's agent (start time, sequence): an older
    /// report delivered late through another replica is not applied.
    #[serde(default)]
    pub agent_start_ms: u64,
    #[serde(default)]
    pub agent_seq: u64,
}

/// Upgrade strategy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum Strategy {
    /// Cordon, drain, upgrade components, uncordon; strictly one node at a time.
    InPlace,
    /// New nodes first: at most `max_surge` extra nodes, at most `max_unavailable` missing.
    Rolling {
        max_surge: usize,
        max_unavailable: usize,
    },
}

/// An upgrade request (admin API).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRequest {
    pub pool: String,
    pub version: String,
    #[serde(flatten)]
    pub strategy: Strategy,
}

/// `v1/state/upgrade`: the running (or last) upgrade and its progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    pub request: UpgradeRequest,
    /// Pool size when the upgrade started.
    pub desired: usize,
    /// Instance IDs requested from the provisioner and not registered yet.
    pub creating: Vec<String>,
    /// Node being upgraded in place.
    pub current: Option<String>,
    pub done: bool,
    /// Why the rollout stopped early (a node failed its upgrade).
    pub failed: Option<String>,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// Highest number of nodes ever upgrading in place at the same time (must stay ≤ 1).
    pub max_concurrent_in_place: usize,
}

/// `v1/state/workload`: the control plane's model of pods and PodDisruptionBudgets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub pods: Vec<Pod>,
    pub pdbs: Vec<Pdb>,
    /// `namespace/name` → when the pod was scheduled (it becomes ready after `--pod-start-ms`).
    pub scheduled_ms: BTreeMap<String, u64>,
}

/// `v1/state/cluster`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Counter for new node names (`<pool>-node-NNNN`).
    pub next_node: u64,
}

/// Something the cloud must do for the lifecycle controller (Nova rebuild, delete, create).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ProvisionRequest {
    /// Reinstall the instance in place (Free plan auto-heal): same instance ID and node name.
    Reinstall {
        instance_id: String,
        node_name: String,
    },
    /// Delete the instance (Standard plan auto-heal, rolling upgrade).
    Delete {
        instance_id: String,
        node_name: String,
    },
    /// Create a node in `pool` at `version` (Standard plan auto-heal, rolling upgrade surge).
    Create {
        instance_id: String,
        node_name: String,
        pool: String,
        flavor: String,
        zone: String,
        version: String,
        reason: String,
    },
}

impl ProvisionRequest {
    pub fn instance_id(&self) -> &str {
        match self {
            ProvisionRequest::Reinstall { instance_id, .. }
            | ProvisionRequest::Delete { instance_id, .. }
            | ProvisionRequest::Create { instance_id, .. } => instance_id,
        }
    }

    pub fn action(&self) -> &'static str {
        match self {
            ProvisionRequest::Reinstall { .. } => "reinstall",
            ProvisionRequest::Delete { .. } => "delete",
            ProvisionRequest::Create { .. } => "create",
        }
    }
}

/// `v1/state/provision/<request ID>`: a cloud action decided by the leader. It is handed to the
/// provisioner after the decision committed and marked dispatched; a new leader hands out the
/// ones not marked (so a request may reach the provisioner twice if a leader dies in between:
/// the request ID is stable for deduplication). Creates and reinstalls are removed when the
/// instance registers, deletes when the provision hook succeeded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionRecord {
    pub id: String,
    pub request: ProvisionRequest,
    pub requested_ms: u64,
    pub requested_by: String,
    pub dispatched_ms: Option<u64>,
    pub dispatched_by: Option<String>,
}

/// `v1/events/<server>/<ms>-<n>`: the history lines one change wrote (one key per transaction).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    pub events: Vec<EventRecord>,
}

/// One line of the controller's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub unix_ms: u64,
    pub node: String,
    pub message: String,
    /// Replica that made the change.
    pub server: String,
}

/// `v1/replicas/<server ID>`: the heartbeats one replica received, flushed periodically and bound
/// to the replica's lease. A heartbeat that changes nothing writes nothing: liveness reaches
/// the store only through these reports (one write per replica per period for all nodes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub server_id: String,
    /// When the replica started receiving heartbeats (it vouches for silence only after that).
    pub started_ms: u64,
    /// Every heartbeat received up to this time is in `heartbeats`.
    pub written_ms: u64,
    /// Instance ID → last heartbeat received.
    pub heartbeats: BTreeMap<String, u64>,
    /// This replica's view of the store and its role (for `status` on any replica).
    #[serde(default)]
    pub role: String,
}

/// `v1/leader`: the elected replica. Bound to its lease: when the lease expires the key goes away
/// and the next replica's campaign creates it again with a new create revision (the term); every
/// decision transaction of the leader requires its term's key to be there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub server_id: String,
    pub lease: i64,
    pub elected_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_schema_version() {
        let rec = ClusterRecord { next_node: 7 };
        let bytes = encode(&rec);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["next_node"], 7);
        assert_eq!(decode::<ClusterRecord>("k", &bytes).unwrap(), rec);
        let future = br#"{"schema":2,"next_node":7}"#;
        let e = decode::<ClusterRecord>("/x/v1/state/cluster", future).unwrap_err();
        assert!(
            e.to_string()
                .contains("/x/v1/state/cluster that this binary cannot read: schema 2"),
            "{e}"
        );
        assert!(decode::<ClusterRecord>("k", br#"{"next_node":7}"#).is_err());
        assert!(decode::<ClusterRecord>("k", b"garbage").is_err());
    }

    #[test]
    fn keys_are_per_cluster() {
        let k = Keys::new("/berth/c1/");
        assert_eq!(k.node("i-1"), "/berth/c1/v1/state/nodes/i-1");
        assert!(k.node("i-1").starts_with(&k.state_prefix()));
        assert!(k.provision("p").starts_with(&k.state_prefix()));
        assert!(!k.leader().starts_with(&k.state_prefix()));
        assert!(!k.replica("s").starts_with(&k.state_prefix()));
        assert!(!Keys::new("/berth/c10").root().starts_with(k.root()));
        let a = k.event("s1", 5, 2);
        let b = k.event("s1", 5, 10);
        assert!(a < b, "events of one change sort in order");
    }
}
