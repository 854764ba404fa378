//! The node registry and lifecycle controller: registrations, heartbeats, NotReady detection,
//! auto-healing, drains (PodDisruptionBudgets respected up to the drain timeout, then forced),
//! in-place and rolling upgrades. The pure decisions live in [`super::machine`]; this module
//! keeps the state, the clock and the commands queued for the agents.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use berth_proto::node::{
    Command, CommandAck, CommandKind, HeartbeatRequest, HeartbeatResponse, NodeRegistration,
    RegisterRequest, RegisterResponse,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::machine::{
    self, Heal, InPlaceStep, NodeState, NodeView, Pdb, Plan, Pod, Timers, eviction_allowed,
};
use crate::{Error, Result};

/// Something the cloud must do for the lifecycle controller (Nova rebuild, delete, create).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpgradeRequest {
    pub pool: String,
    pub version: String,
    #[serde(flatten)]
    pub strategy: Strategy,
}

/// A command sent to a node and whether it was acknowledged.
#[derive(Clone, Debug, Serialize)]
pub struct CommandRecord {
    pub id: u64,
    pub kind: String,
    pub argument: String,
    pub acked: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum AfterDrain {
    Nothing,
    Upgrade(String),
    Terminate,
}

#[derive(Clone, Debug)]
struct DrainOp {
    started: Instant,
    then: AfterDrain,
    blocked_by: Option<String>,
}

#[derive(Clone, Debug)]
struct Record {
    reg: NodeRegistration,
    state: NodeState,
    reason: String,
    cordoned: bool,
    version: String,
    last_heartbeat: Instant,
    not_ready_since: Option<Instant>,
    conditions: Vec<(String, bool, String)>,
    commands: Vec<CommandRecord>,
    reinstalls: u32,
    drain: Option<DrainOp>,
    /// Waiting for the agent to come back at this version (in-place upgrade).
    upgrading_to: Option<String>,
    heals: u32,
}

#[derive(Clone, Debug)]
struct UpgradeOp {
    req: UpgradeRequest,
    desired: usize,
    /// Instance IDs requested from the provisioner and not registered yet.
    creating: Vec<String>,
    /// Node being upgraded in place.
    current: Option<String>,
    done: bool,
    /// Why the rollout stopped early (a node failed its upgrade).
    failed: Option<String>,
}

/// One line of the controller's history.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub unix_ms: u128,
    pub node: String,
    pub message: String,
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
    pub last_heartbeat_ms_ago: u128,
    pub reinstalls: u32,
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

/// Status view of the whole registry.
#[derive(Clone, Debug, Serialize)]
pub struct RegistryStatus {
    pub plan: Plan,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<Pod>,
    pub pdbs: Vec<Pdb>,
    pub upgrade: Option<UpgradeStatus>,
    pub pending_actions: Vec<ProvisionRequest>,
    /// Highest number of nodes ever upgrading in place at the same time (must stay ≤ 1).
    pub max_concurrent_in_place: usize,
    pub events: Vec<Event>,
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

struct Inner {
    nodes: BTreeMap<String, Record>,
    pods: Vec<Pod>,
    pdbs: Vec<Pdb>,
    pod_pending_since: HashMap<(String, String), Instant>,
    next_command: u64,
    upgrade: Option<UpgradeOp>,
    pending: Vec<ProvisionRequest>,
    events: Vec<Event>,
    max_concurrent_in_place: usize,
    next_node: u64,
}

/// Lifecycle controller configuration.
#[derive(Clone, Debug)]
pub struct LifecycleConfig {
    pub plan: Plan,
    pub timers: Timers,
    pub server_id: String,
}

/// The node registry.
pub struct Registry {
    pub config: LifecycleConfig,
    inner: Mutex<Inner>,
    provision: mpsc::UnboundedSender<ProvisionRequest>,
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn kind_name(kind: CommandKind) -> &'static str {
    match kind {
        CommandKind::Cordon => "cordon",
        CommandKind::Uncordon => "uncordon",
        CommandKind::Drain => "drain",
        CommandKind::Upgrade => "upgrade",
        CommandKind::Reinstall => "reinstall",
        CommandKind::Terminate => "terminate",
        CommandKind::Unspecified => "unspecified",
    }
}

fn kind_of(name: &str) -> CommandKind {
    match name {
        "cordon" => CommandKind::Cordon,
        "uncordon" => CommandKind::Uncordon,
        "drain" => CommandKind::Drain,
        "upgrade" => CommandKind::Upgrade,
        "reinstall" => CommandKind::Reinstall,
        "terminate" => CommandKind::Terminate,
        _ => CommandKind::Unspecified,
    }
}

impl Inner {
    fn event(&mut self, node: &str, message: String) {
        tracing::info!(node, "{message}");
        self.events.push(Event {
            unix_ms: unix_ms(),
            node: node.to_string(),
            message,
        });
        if self.events.len() > 1000 {
            self.events.drain(..200);
        }
    }

    fn command(&mut self, id: &str, kind: CommandKind, argument: &str) {
        self.next_command += 1;
        let cid = self.next_command;
        if let Some(r) = self.nodes.get_mut(id) {
            r.commands.push(CommandRecord {
                id: cid,
                kind: kind_name(kind).into(),
                argument: argument.into(),
                acked: false,
                error: None,
            });
            if r.commands.len() > 50 {
                r.commands.remove(0);
            }
        }
    }

    fn set_state(&mut self, id: &str, state: NodeState, reason: &str) {
        let Some(r) = self.nodes.get_mut(id) else {
            return;
        };
        if r.state == state {
            return;
        }
        let name = r.reg.node_name.clone();
        let from = r.state;
        r.state = state;
        r.reason = reason.to_string();
        r.not_ready_since = (state == NodeState::NotReady).then(Instant::now);
        self.event(
            &name,
            format!("{} -> {} ({reason})", from.as_str(), state.as_str()),
        );
    }

    fn views(&self, pool: &str) -> Vec<NodeView> {
        self.nodes
            .iter()
            .filter(|(_, r)| r.reg.node_pool == pool)
            .map(|(id, r)| NodeView {
                id: id.clone(),
                state: r.state,
                version: r.version.clone(),
                cordoned: r.cordoned,
            })
            .collect()
    }

    fn start_drain(&mut self, id: &str, then: AfterDrain) {
        let Some(r) = self.nodes.get_mut(id) else {
            return;
        };
        r.cordoned = true;
        r.drain = Some(DrainOp {
            started: Instant::now(),
            then: then.clone(),
            blocked_by: None,
        });
        let name = r.reg.node_name.clone();
        self.command(id, CommandKind::Cordon, "");
        self.command(id, CommandKind::Drain, &format!("{then:?}"));
        self.set_state(id, NodeState::Draining, "drain requested");
        self.event(&name, format!("drain started (then {then:?})"));
    }
}

impl Registry {
    /// Creates a registry; provisioning requests go to `provision`.
    pub fn new(
        config: LifecycleConfig,
        provision: mpsc::UnboundedSender<ProvisionRequest>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            inner: Mutex::new(Inner {
                nodes: BTreeMap::new(),
                pods: Vec::new(),
                pdbs: Vec::new(),
                pod_pending_since: HashMap::new(),
                next_command: 0,
                upgrade: None,
                pending: Vec::new(),
                events: Vec::new(),
                max_concurrent_in_place: 0,
                next_node: 1,
            }),
            provision,
        })
    }

    fn provision(&self, inner: &mut Inner, req: ProvisionRequest) {
        inner.pending.push(req.clone());
        let _ = self.provision.send(req);
    }

    /// Handles a registration.
    pub fn register(&self, req: RegisterRequest) -> Result<RegisterResponse> {
        let reg = req
            .node
            .ok_or_else(|| Error::Lifecycle("registration without node".into()))?;
        if reg.instance_id.is_empty() || reg.node_name.is_empty() {
            return Err(Error::Lifecycle(
                "registration needs instance_id and node_name".into(),
            ));
        }
        let mut inner = self.inner.lock().unwrap();
        let id = reg.instance_id.clone();
        let name = reg.node_name.clone();
        // Fulfilled provisioning requests leave the pending list.
        inner.pending.retain(|p| match p {
            ProvisionRequest::Create { instance_id, .. }
            | ProvisionRequest::Reinstall { instance_id, .. } => *instance_id != id,
            ProvisionRequest::Delete { .. } => true,
        });
        if let Some(up) = inner.upgrade.as_mut() {
            up.creating.retain(|c| *c != id);
        }
        let state = match inner.nodes.get_mut(&id) {
            Some(r) if r.state == NodeState::Terminated => {
                return Err(Error::Lifecycle(format!(
                    "instance {id} was terminated and cannot register again"
                )));
            }
            Some(r) => {
                r.version = reg.version.clone();
                r.reg = reg;
                r.last_heartbeat = Instant::now();
                let s = r.state;
                if s == NodeState::NotReady {
                    inner.set_state(&id, NodeState::Installing, "registered again");
                }
                inner.event(&name, "registered again".into());
                inner.nodes[&id].state
            }
            None => {
                inner.nodes.insert(
                    id.clone(),
                    Record {
                        version: reg.version.clone(),
                        reg,
                        state: NodeState::Installing,
                        reason: "registered".into(),
                        cordoned: false,
                        last_heartbeat: Instant::now(),
                        not_ready_since: None,
                        conditions: Vec::new(),
                        commands: Vec::new(),
                        reinstalls: 0,
                        drain: None,
                        upgrading_to: None,
                        heals: 0,
                    },
                );
                inner.event(&name, format!("registered (instance {id})"));
                NodeState::Installing
            }
        };
        Ok(RegisterResponse {
            state: state.as_str().into(),
            heartbeat_interval_ms: self.config.timers.heartbeat_interval.as_millis() as u64,
            server_id: self.config.server_id.clone(),
        })
    }

    /// Handles a heartbeat: records conditions and acknowledgements, moves the state, returns
    /// the unacknowledged commands.
    pub fn heartbeat(&self, hb: HeartbeatRequest) -> HeartbeatResponse {
        let mut inner = self.inner.lock().unwrap();
        let id = hb.instance_id.clone();
        let Some(r) = inner.nodes.get_mut(&id) else {
            return HeartbeatResponse {
                state: String::new(),
                commands: Vec::new(),
                known: false,
            };
        };
        r.last_heartbeat = Instant::now();
        r.conditions = hb
            .conditions
            .iter()
            .map(|c| (c.r#type.clone(), c.status, c.message.clone()))
            .collect();
        let old_version = std::mem::replace(&mut r.version, hb.version.clone());
        let mut upgrade_failed = None;
        for CommandAck { command_id, error } in &hb.acks {
            if let Some(c) = r
                .commands
                .iter_mut()
                .find(|c| c.id == *command_id && !c.acked)
            {
                c.acked = true;
                c.error = (!error.is_empty()).then(|| error.clone());
                if c.kind == "upgrade" && !error.is_empty() {
                    upgrade_failed = Some(error.clone());
                }
            }
        }
        if upgrade_failed.is_some() {
            // The node keeps its version and stays cordoned; it returns to service as it is.
            r.upgrading_to = None;
        }
        let name = r.reg.node_name.clone();
        if let Some(err) = upgrade_failed {
            inner.event(&name, format!("upgrade failed: {err}"));
            if let Some(up) = inner.upgrade.as_mut()
                && !up.done
            {
                up.done = true;
                up.current = None;
                up.failed = Some(format!("{name}: {err}"));
            }
        }
        let r = inner.nodes.get_mut(&id).expect("present");
        let state = r.state;
        let health = machine::health(&r.conditions);
        // An in-place upgrade holds the node in Installing until it reports the new version.
        let waiting_upgrade = r.upgrading_to.as_ref().is_some_and(|v| *v != hb.version);
        if old_version != hb.version {
            inner.event(&name, format!("version {old_version} -> {}", hb.version));
        }
        let next = if waiting_upgrade {
            state
        } else {
            machine::on_heartbeat(state, &health)
        };
        if next != state {
            let reason = match &health {
                Ok(()) => "heartbeat healthy".to_string(),
                Err(e) => e.clone(),
            };
            inner.set_state(&id, next, &reason);
        }
        let r = &inner.nodes[&id];
        HeartbeatResponse {
            state: r.state.as_str().into(),
            commands: r
                .commands
                .iter()
                .filter(|c| !c.acked)
                .map(|c| Command {
                    id: c.id,
                    kind: kind_of(&c.kind) as i32,
                    argument: c.argument.clone(),
                })
                .collect(),
            known: true,
        }
    }

    /// Replaces the workload model's pods (admin API).
    pub fn set_pods(&self, pods: Vec<Pod>) {
        self.inner.lock().unwrap().pods = pods;
    }

    /// Replaces the PodDisruptionBudgets (admin API).
    pub fn set_pdbs(&self, pdbs: Vec<Pdb>) {
        self.inner.lock().unwrap().pdbs = pdbs;
    }

    /// Finds a node by name or instance ID.
    fn resolve(inner: &Inner, node: &str) -> Result<String> {
        if inner.nodes.contains_key(node) {
            return Ok(node.to_string());
        }
        inner
            .nodes
            .iter()
            .filter(|(_, r)| r.reg.node_name == node && r.state != NodeState::Terminated)
            .map(|(id, _)| id.clone())
            .next()
            .ok_or_else(|| Error::Lifecycle(format!("unknown node {node:?}")))
    }

    /// Drains a node (and terminates it when `terminate`).
    pub fn drain(&self, node: &str, terminate: bool) -> Result<()> {
        let mut inner = self.inner.lock().unwrap();
        let id = Self::resolve(&inner, node)?;
        let then = if terminate {
            AfterDrain::Terminate
        } else {
            AfterDrain::Nothing
        };
        inner.start_drain(&id, then);
        Ok(())
    }

    /// Cordons or uncordons a node.
    pub fn cordon(&self, node: &str, cordon: bool) -> Result<()> {
        let mut inner = self.inner.lock().unwrap();
        let id = Self::resolve(&inner, node)?;
        inner.nodes.get_mut(&id).expect("resolved").cordoned = cordon;
        let kind = if cordon {
            CommandKind::Cordon
        } else {
            CommandKind::Uncordon
        };
        inner.command(&id, kind, "");
        Ok(())
    }

    /// Starts an upgrade of a pool.
    pub fn upgrade(&self, req: UpgradeRequest) -> Result<()> {
        if let Strategy::Rolling {
            max_surge: 0,
            max_unavailable: 0,
        } = req.strategy
        {
            return Err(Error::Lifecycle(
                "maxSurge and maxUnavailable cannot both be 0".into(),
            ));
        }
        let mut inner = self.inner.lock().unwrap();
        if inner.upgrade.as_ref().is_some_and(|u| !u.done) {
            return Err(Error::Lifecycle("an upgrade is already running".into()));
        }
        let desired = inner
            .nodes
            .values()
            .filter(|r| r.reg.node_pool == req.pool && r.state != NodeState::Terminated)
            .count();
        if desired == 0 {
            return Err(Error::Lifecycle(format!(
                "pool {:?} has no nodes",
                req.pool
            )));
        }
        inner.event(
            &req.pool,
            format!(
                "upgrade of pool to {} started ({:?})",
                req.version, req.strategy
            ),
        );
        inner.upgrade = Some(UpgradeOp {
            req,
            desired,
            creating: Vec::new(),
            current: None,
            done: false,
            failed: None,
        });
        Ok(())
    }

    fn new_node(
        &self,
        inner: &mut Inner,
        template: &NodeRegistration,
        version: &str,
        reason: &str,
    ) {
        let n = inner.next_node;
        inner.next_node += 1;
        let instance_id = format!(
            "{}-{n:04}-{}",
            template.node_pool,
            uuid::Uuid::new_v4().simple()
        );
        let node_name = format!("{}-node-{n:04}", template.node_pool);
        inner.event(&node_name, format!("create requested ({reason})"));
        if let Some(up) = inner.upgrade.as_mut()
            && reason == "rolling upgrade"
        {
            up.creating.push(instance_id.clone());
        }
        self.provision(
            inner,
            ProvisionRequest::Create {
                instance_id,
                node_name,
                pool: template.node_pool.clone(),
                flavor: template.flavor.clone(),
                zone: template.zone.clone(),
                version: version.to_string(),
                reason: reason.to_string(),
            },
        );
    }

    fn terminate(&self, inner: &mut Inner, id: &str, reason: &str) {
        let Some(r) = inner.nodes.get(id) else {
            return;
        };
        let name = r.reg.node_name.clone();
        inner.command(id, CommandKind::Terminate, reason);
        inner.set_state(id, NodeState::Terminated, reason);
        // Its pods go back to pending.
        for p in inner
            .pods
            .iter_mut()
            .filter(|p| p.node.as_deref() == Some(&name))
        {
            p.node = None;
            p.ready = false;
        }
        self.provision(
            inner,
            ProvisionRequest::Delete {
                instance_id: id.to_string(),
                node_name: name,
            },
        );
    }

    /// One controller pass: timers, auto-healing, drains, upgrades, the pod scheduler.
    pub fn tick(&self) {
        let now = Instant::now();
        let timers = self.config.timers.clone();
        let mut inner = self.inner.lock().unwrap();
        // 1. heartbeats, NotReady, auto-heal
        let ids: Vec<String> = inner.nodes.keys().cloned().collect();
        for id in &ids {
            let r = &inner.nodes[id];
            if r.state == NodeState::Terminated {
                continue;
            }
            let since = now.saturating_duration_since(r.last_heartbeat);
            let nr_for = r.not_ready_since.map(|t| now.saturating_duration_since(t));
            let out = machine::on_tick(r.state, since, nr_for, &timers, self.config.plan);
            if out.state != r.state {
                inner.set_state(id, out.state, "heartbeats lost");
            }
            match out.heal {
                None => {}
                Some(Heal::ReinstallInPlace) => {
                    let r = inner.nodes.get_mut(id).expect("present");
                    r.reinstalls += 1;
                    r.heals += 1;
                    r.last_heartbeat = now;
                    let name = r.reg.node_name.clone();
                    inner.command(id, CommandKind::Reinstall, "auto-heal");
                    inner.set_state(id, NodeState::Installing, "auto-heal: reinstall in place");
                    self.provision(
                        &mut inner,
                        ProvisionRequest::Reinstall {
                            instance_id: id.clone(),
                            node_name: name,
                        },
                    );
                }
                Some(Heal::Replace) => {
                    let reg = inner.nodes[id].reg.clone();
                    let version = inner.nodes[id].version.clone();
                    self.terminate(&mut inner, id, "auto-heal: replace");
                    self.new_node(&mut inner, &reg, &version, "auto-heal replacement");
                }
            }
        }
        // 2. the pod scheduler: pending pods go to schedulable Ready nodes, become ready later.
        let schedulable: Vec<String> = inner
            .nodes
            .values()
            .filter(|r| r.state == NodeState::Ready && !r.cordoned)
            .map(|r| r.reg.node_name.clone())
            .collect();
        let mut pending_since = std::mem::take(&mut inner.pod_pending_since);
        for (i, p) in inner.pods.iter_mut().enumerate() {
            let key = (p.namespace.clone(), p.name.clone());
            match &p.node {
                None if !schedulable.is_empty() => {
                    p.node = Some(schedulable[i % schedulable.len()].clone());
                    p.ready = false;
                    pending_since.insert(key, now);
                }
                Some(_) if !p.ready => {
                    let since = *pending_since.entry(key.clone()).or_insert(now);
                    if now.saturating_duration_since(since) >= timers.pod_start {
                        p.ready = true;
                        pending_since.remove(&key);
                    }
                }
                _ => {}
            }
        }
        inner.pod_pending_since = pending_since;
        // 3. drains
        for id in &ids {
            let Some(op) = inner.nodes.get(id).and_then(|r| r.drain.clone()) else {
                continue;
            };
            let name = inner.nodes[id].reg.node_name.clone();
            let forced = now.saturating_duration_since(op.started) >= timers.drain_timeout;
            let mut blocked = None;
            let on_node: Vec<usize> = (0..inner.pods.len())
                .filter(|&i| inner.pods[i].node.as_deref() == Some(&name))
                .collect();
            let mut evicted = 0;
            let mut forced_n = 0;
            for i in on_node {
                let allowed = eviction_allowed(&inner.pods[i], &inner.pods, &inner.pdbs);
                match allowed {
                    Ok(()) => {}
                    Err(pdb) if !forced => {
                        blocked = Some(pdb);
                        continue;
                    }
                    Err(_) => forced_n += 1,
                }
                let p = &mut inner.pods[i];
                p.node = None;
                p.ready = false;
                evicted += 1;
            }
            if evicted > 0 {
                let msg = if forced_n > 0 {
                    format!("drain timeout: forced eviction of {forced_n} pods (PDB ignored)")
                } else {
                    format!("evicted {evicted} pods")
                };
                inner.event(&name, msg);
            }
            let remaining = inner
                .pods
                .iter()
                .filter(|p| p.node.as_deref() == Some(&name))
                .count();
            if remaining > 0 {
                if blocked != op.blocked_by
                    && let Some(b) = &blocked
                {
                    inner.event(
                        &name,
                        format!("eviction blocked by PodDisruptionBudget {b}"),
                    );
                }
                inner.nodes.get_mut(id).expect("present").drain = Some(DrainOp {
                    blocked_by: blocked,
                    ..op
                });
                continue;
            }
            inner.nodes.get_mut(id).expect("present").drain = None;
            inner.event(&name, "drained".into());
            match op.then {
                AfterDrain::Nothing => {}
                AfterDrain::Terminate => self.terminate(&mut inner, id, "drained for removal"),
                AfterDrain::Upgrade(v) => {
                    inner.nodes.get_mut(id).expect("present").upgrading_to = Some(v.clone());
                    inner.command(id, CommandKind::Upgrade, &v);
                    inner.set_state(id, NodeState::Installing, "upgrading components in place");
                }
            }
        }
        // 4. upgrades
        self.upgrade_tick(&mut inner);
    }

    fn upgrade_tick(&self, inner: &mut Inner) {
        let Some(mut up) = inner.upgrade.clone() else {
            return;
        };
        if up.done {
            return;
        }
        let target = up.req.version.clone();
        let in_place_now = inner
            .nodes
            .values()
            .filter(|r| {
                r.upgrading_to.is_some()
                    || (r
                        .drain
                        .as_ref()
                        .is_some_and(|d| matches!(d.then, AfterDrain::Upgrade(_))))
            })
            .count();
        inner.max_concurrent_in_place = inner.max_concurrent_in_place.max(in_place_now);
        match up.req.strategy.clone() {
            Strategy::InPlace => {
                if let Some(cur) = up.current.clone() {
                    let r = &inner.nodes[&cur];
                    let finished =
                        r.state == NodeState::Ready && r.version == target && r.drain.is_none();
                    if finished {
                        let name = r.reg.node_name.clone();
                        let r = inner.nodes.get_mut(&cur).expect("present");
                        r.upgrading_to = None;
                        r.cordoned = false;
                        inner.command(&cur, CommandKind::Uncordon, "");
                        inner.event(&name, format!("upgraded in place to {target}"));
                        up.current = None;
                    } else if r.state == NodeState::Terminated {
                        up.current = None;
                    }
                }
                let views = inner.views(&up.req.pool);
                match machine::in_place_next(&views, &target, up.current.is_some()) {
                    InPlaceStep::Wait => {}
                    InPlaceStep::Start(id) => {
                        up.current = Some(id.clone());
                        inner.start_drain(&id, AfterDrain::Upgrade(target.clone()));
                    }
                    InPlaceStep::Done => {
                        up.done = true;
                        inner.event(&up.req.pool, format!("in-place upgrade to {target} done"));
                    }
                }
            }
            Strategy::Rolling {
                max_surge,
                max_unavailable,
            } => {
                let views = inner.views(&up.req.pool);
                let step = machine::rolling_step(
                    &views,
                    &target,
                    up.desired,
                    max_surge,
                    max_unavailable,
                    up.creating.len(),
                );
                if step.done {
                    up.done = true;
                    inner.event(&up.req.pool, format!("rolling upgrade to {target} done"));
                } else {
                    let template = inner
                        .nodes
                        .values()
                        .find(|r| r.reg.node_pool == up.req.pool)
                        .map(|r| r.reg.clone());
                    inner.upgrade = Some(up.clone());
                    if let Some(t) = template {
                        for _ in 0..step.create {
                            self.new_node(inner, &t, &target, "rolling upgrade");
                        }
                    }
                    up = inner.upgrade.clone().expect("set above");
                    for id in step.remove {
                        inner.start_drain(&id, AfterDrain::Terminate);
                    }
                }
            }
        }
        inner.upgrade = Some(up);
    }

    /// The status view.
    pub fn status(&self) -> RegistryStatus {
        let inner = self.inner.lock().unwrap();
        let now = Instant::now();
        RegistryStatus {
            plan: self.config.plan,
            nodes: inner
                .nodes
                .iter()
                .map(|(id, r)| {
                    let res = |x: &Option<berth_proto::node::Resources>| x.unwrap_or_default();
                    let alloc = res(&r.reg.allocatable);
                    let reserved = res(&r.reg.reserved);
                    NodeStatus {
                        node_name: r.reg.node_name.clone(),
                        instance_id: id.clone(),
                        pool: r.reg.node_pool.clone(),
                        flavor: r.reg.flavor.clone(),
                        zone: r.reg.zone.clone(),
                        state: r.state,
                        reason: r.reason.clone(),
                        cordoned: r.cordoned,
                        version: r.version.clone(),
                        last_heartbeat_ms_ago: now
                            .saturating_duration_since(r.last_heartbeat)
                            .as_millis(),
                        reinstalls: r.reinstalls,
                        conditions: r.conditions.iter().map(|c| (c.0.clone(), c.1)).collect(),
                        labels: r
                            .reg
                            .labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        taints: r
                            .reg
                            .taints
                            .iter()
                            .map(|t| format!("{}={}:{}", t.key, t.value, t.effect))
                            .collect(),
                        allocatable_cpu_millis: alloc.cpu_millis,
                        allocatable_memory_bytes: alloc.memory_bytes,
                        reserved_cpu_millis: reserved.cpu_millis,
                        reserved_memory_bytes: reserved.memory_bytes,
                        reserved_storage_bytes: reserved.storage_bytes,
                        pending_commands: r.commands.iter().filter(|c| !c.acked).cloned().collect(),
                        last_commands: r.commands.iter().rev().take(10).cloned().collect(),
                        draining: r.drain.as_ref().map(|d| match &d.blocked_by {
                            Some(b) => format!("blocked by PodDisruptionBudget {b}"),
                            None => "in progress".into(),
                        }),
                    }
                })
                .collect(),
            pods: inner.pods.clone(),
            pdbs: inner.pdbs.clone(),
            upgrade: inner.upgrade.as_ref().map(|u| UpgradeStatus {
                pool: u.req.pool.clone(),
                version: u.req.version.clone(),
                strategy: u.req.strategy.clone(),
                done: u.done,
                failed: u.failed.clone(),
                current: u.current.clone(),
                creating: u.creating.clone(),
            }),
            pending_actions: inner.pending.clone(),
            max_concurrent_in_place: inner.max_concurrent_in_place,
            events: inner.events.clone(),
        }
    }

    /// Runs the controller until `shutdown` changes.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut iv = tokio::time::interval(self.config.timers.tick);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = iv.tick() => self.tick(),
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Default heartbeat interval a node uses when the server gives none.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use berth_proto::node::Condition;

    use super::*;

    fn registration(name: &str, version: &str) -> RegisterRequest {
        RegisterRequest {
            node: Some(NodeRegistration {
                node_name: name.into(),
                instance_id: format!("i-{name}"),
                node_pool: "p".into(),
                version: version.into(),
                ..Default::default()
            }),
        }
    }

    fn beat(name: &str, version: &str, acks: Vec<CommandAck>) -> HeartbeatRequest {
        let c = |t: &str, status: bool| Condition {
            r#type: t.into(),
            status,
            message: String::new(),
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
        }
    }

    #[test]
    fn a_failed_upgrade_stops_the_rollout() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let r = Registry::new(
            LifecycleConfig {
                plan: Plan::Free,
                timers: Timers::default(),
                server_id: "s".into(),
            },
            tx,
        );
        for n in ["n1", "n2"] {
            assert_eq!(
                r.register(registration(n, "v1")).unwrap().state,
                "Installing"
            );
            assert_eq!(r.heartbeat(beat(n, "v1", vec![])).state, "Ready");
        }
        r.upgrade(UpgradeRequest {
            pool: "p".into(),
            version: "v2".into(),
            strategy: Strategy::InPlace,
        })
        .unwrap();
        assert!(
            r.upgrade(UpgradeRequest {
                pool: "p".into(),
                version: "v3".into(),
                strategy: Strategy::InPlace,
            })
            .is_err(),
            "one upgrade at a time"
        );
        r.tick(); // n1: cordon + drain
        r.tick(); // drained (no pods): UPGRADE
        let cmds = r.heartbeat(beat("n1", "v1", vec![])).commands;
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
        let rsp = r.heartbeat(beat("n1", "v1", acks));
        assert!(rsp.commands.is_empty());
        r.tick();
        r.tick();
        let s = r.status();
        let up = s.upgrade.unwrap();
        assert!(up.done);
        assert!(up.failed.unwrap().contains("n1: upgrade hook failed"));
        let n1 = s.nodes.iter().find(|n| n.node_name == "n1").unwrap();
        assert_eq!(
            (n1.state, n1.version.as_str(), n1.cordoned),
            (NodeState::Ready, "v1", true)
        );
        let n2 = s.nodes.iter().find(|n| n.node_name == "n2").unwrap();
        assert_eq!(
            (n2.state, n2.version.as_str(), n2.cordoned),
            (NodeState::Ready, "v1", false)
        );
        assert_eq!(s.max_concurrent_in_place, 1);
    }

    #[test]
    fn unknown_and_terminated_nodes() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let r = Registry::new(
            LifecycleConfig {
                plan: Plan::Standard,
                timers: Timers::default(),
                server_id: "s".into(),
            },
            tx,
        );
        assert!(!r.heartbeat(beat("ghost", "v1", vec![])).known);
        assert!(r.register(RegisterRequest { node: None }).is_err());
        r.register(registration("n1", "v1")).unwrap();
        r.heartbeat(beat("n1", "v1", vec![]));
        r.drain("n1", true).unwrap();
        r.tick();
        assert_eq!(r.status().nodes[0].state, NodeState::Terminated);
        assert!(matches!(rx.try_recv(), Ok(ProvisionRequest::Delete { .. })));
        // A terminated instance cannot come back.
        assert!(r.register(registration("n1", "v1")).is_err());
        assert!(r.drain("nope", false).is_err());
    }
}
