//! The lifecycle decisions over a working copy of the stored state ([`Model`]): registration,
//! heartbeats, admin requests and the leader's controller pass (timers, auto-healing, drains,
//! upgrades, the pod scheduler). Synchronous and clock-free: `now` comes in, every timer is
//! computed from stored timestamps. The registry turns a model's changes ([`Model::diff`]) into
//! one compare-and-swap transaction.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use berth_proto::node::{Command, CommandAck, CommandKind, HeartbeatRequest, HeartbeatResponse};

use super::{
    cache::{State, Versioned},
    machine::{self, Heal, InPlaceStep, NodeState, NodeView, Plan, Timers, eviction_allowed},
    state::{
        AfterDrain, ClusterRecord, CommandRecord, Condition, DrainOp, EventBatch, EventRecord,
        Keys, NodeRecord, ProvisionRecord, ProvisionRequest, Registration, Strategy, UpgradeRecord,
        UpgradeRequest, Workload, encode,
    },
    store::{Compare, Op},
};
use crate::{Error, Result};

/// At most this many nodes change in one transaction (etcd refuses transactions of more than
/// 128 operations by default); the rest waits for the next controller pass.
pub const NODE_BUDGET: usize = 40;
/// Commands kept per node.
const MAX_COMMANDS: usize = 50;

pub fn kind_name(kind: CommandKind) -> &'static str {
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

/// Which part of the state a change reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    /// One node (plus the upgrade and the provisioning requests): registration, heartbeat,
    /// cordon, drain.
    Node(&'a str),
    /// The workload model only.
    Workload,
    /// Everything: the controller pass, starting an upgrade.
    All,
}

/// When the replicas last heard from each node (their reports plus this replica's own view).
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    /// Heartbeats up to this time are known from every live replica.
    pub known_until_ms: u64,
    /// The earliest time from which some live replica has been listening.
    pub listening_since_ms: u64,
    pub last: HashMap<String, u64>,
}

impl Liveness {
    /// Last sign of life of a node (its stored heartbeat, any replica's report, or the start of
    /// listening, whichever is latest) and for how long it has been silent since.
    pub fn silence(&self, id: &str, record_last_ms: u64) -> (u64, std::time::Duration) {
        let last = record_last_ms
            .max(self.last.get(id).copied().unwrap_or(0))
            .max(self.listening_since_ms);
        (
            last,
            std::time::Duration::from_millis(self.known_until_ms.saturating_sub(last)),
        )
    }
}

/// A working copy of (part of) the stored state; see the module documentation.
pub struct Model {
    pub now: u64,
    pub server: String,
    pub plan: Plan,
    pub timers: Timers,
    scope_all: bool,
    pub nodes: BTreeMap<String, NodeRecord>,
    node_revs: HashMap<String, i64>,
    /// Nodes changed so far, with their value before the first change (`None`: new).
    base: BTreeMap<String, Option<NodeRecord>>,
    pub upgrade: Option<UpgradeRecord>,
    upgrade_base: Option<(i64, Option<UpgradeRecord>)>,
    pub workload: Workload,
    workload_base: Option<(i64, Workload)>,
    pub cluster: ClusterRecord,
    cluster_base: Option<(i64, ClusterRecord)>,
    pub provisions: BTreeMap<String, ProvisionRecord>,
    provision_base: BTreeMap<String, (i64, ProvisionRecord)>,
    pub events: Vec<EventRecord>,
    /// Provisioning requests decided by this change (handed out after it committed).
    pub requested: Vec<ProvisionRecord>,
}

fn split<T: Clone>(v: &Option<Versioned<T>>) -> (i64, Option<T>) {
    v.as_ref()
        .map_or((0, None), |v| (v.mod_revision, Some(v.value.clone())))
}

impl Model {
    /// Copies the part of `state` that `scope` needs.
    pub fn read(
        state: &State,
        scope: Scope<'_>,
        now: u64,
        server: &str,
        plan: Plan,
        timers: &Timers,
    ) -> Self {
        let pick = |id: &str| state.nodes.get(id).map(|v| (id.to_string(), v));
        let nodes: Vec<(String, &Versioned<NodeRecord>)> = match scope {
            Scope::Node(id) => pick(id).into_iter().collect(),
            Scope::Workload => Vec::new(),
            Scope::All => state.nodes.iter().map(|(k, v)| (k.clone(), v)).collect(),
        };
        let with_workload = matches!(scope, Scope::All | Scope::Workload);
        let with_rest = scope != Scope::Workload;
        let (upgrade_rev, upgrade) = if with_rest {
            split(&state.upgrade)
        } else {
            (0, None)
        };
        let (workload_rev, workload) = if with_workload {
            split(&state.workload)
        } else {
            (0, None)
        };
        let (cluster_rev, cluster) = if scope == Scope::All {
            split(&state.cluster)
        } else {
            (0, None)
        };
        Model {
            now,
            server: server.to_string(),
            plan,
            timers: timers.clone(),
            scope_all: scope == Scope::All,
            node_revs: nodes
                .iter()
                .map(|(k, v)| (k.clone(), v.mod_revision))
                .collect(),
            nodes: nodes
                .into_iter()
                .map(|(k, v)| (k, v.value.clone()))
                .collect(),
            base: BTreeMap::new(),
            upgrade_base: with_rest.then(|| (upgrade_rev, upgrade.clone())),
            upgrade: if with_rest { upgrade } else { None },
            workload_base: with_workload
                .then(|| (workload_rev, workload.clone().unwrap_or_default())),
            workload: if with_workload {
                workload.unwrap_or_default()
            } else {
                Workload::default()
            },
            cluster_base: (scope == Scope::All)
                .then(|| (cluster_rev, cluster.clone().unwrap_or_default())),
            cluster: cluster.unwrap_or_default(),
            provision_base: if with_rest {
                state
                    .provisions
                    .iter()
                    .map(|(k, v)| (k.clone(), (v.mod_revision, v.value.clone())))
                    .collect()
            } else {
                BTreeMap::new()
            },
            provisions: if with_rest {
                state
                    .provisions
                    .iter()
                    .map(|(k, v)| (k.clone(), v.value.clone()))
                    .collect()
            } else {
                BTreeMap::new()
            },
            events: Vec::new(),
            requested: Vec::new(),
        }
    }

    /// Number of nodes this change touched.
    pub fn touched(&self) -> usize {
        self.base.len()
    }

    fn budget_left(&self) -> bool {
        self.touched() < NODE_BUDGET
    }

    /// Mutable access to a node; remembers its value before the first change.
    fn node_mut(&mut self, id: &str) -> Option<&mut NodeRecord> {
        if !self.base.contains_key(id) {
            let before = self.nodes.get(id)?.clone();
            self.base.insert(id.to_string(), Some(before));
        }
        self.nodes.get_mut(id)
    }

    fn insert_node(&mut self, id: &str, rec: NodeRecord) {
        self.base.entry(id.to_string()).or_insert(None);
        self.nodes.insert(id.to_string(), rec);
    }

    pub fn event(&mut self, node: &str, message: String) {
        tracing::info!(node, server = %self.server, "{message}");
        self.events.push(EventRecord {
            unix_ms: self.now,
            node: node.to_string(),
            message,
            server: self.server.clone(),
        });
    }

    fn command(&mut self, id: &str, kind: CommandKind, argument: &str) {
        let now = self.now;
        if let Some(r) = self.node_mut(id) {
            r.next_command += 1;
            r.commands.push(CommandRecord {
                id: r.next_command,
                kind: kind_name(kind).into(),
                argument: argument.into(),
                acked: false,
                error: None,
                issued_ms: now,
            });
            if r.commands.len() > MAX_COMMANDS {
                r.commands.remove(0);
            }
        }
    }

    /// Moves a node to `state` as of `at` (the NotReady clock starts there).
    fn set_state_at(&mut self, id: &str, state: NodeState, reason: &str, at: u64) {
        let Some(r) = self.nodes.get(id) else {
            return;
        };
        if r.state == state {
            return;
        }
        let r = self.node_mut(id).expect("present");
        let name = r.registration.node_name.clone();
        let from = r.state;
        r.state = state;
        r.reason = reason.to_string();
        r.state_since_ms = at;
        r.not_ready_since_ms = (state == NodeState::NotReady).then_some(at);
        self.event(
            &name,
            format!("{} -> {} ({reason})", from.as_str(), state.as_str()),
        );
    }

    fn set_state(&mut self, id: &str, state: NodeState, reason: &str) {
        self.set_state_at(id, state, reason, self.now);
    }

    fn views(&self, pool: &str) -> Vec<NodeView> {
        self.nodes
            .iter()
            .filter(|(_, r)| r.registration.node_pool == pool)
            .map(|(id, r)| NodeView {
                id: id.clone(),
                state: r.state,
                version: r.version.clone(),
                cordoned: r.cordoned,
            })
            .collect()
    }

    fn provision(&mut self, req: ProvisionRequest) {
        let id = format!("{:013}-{}-{}", self.now, req.action(), req.instance_id());
        let rec = ProvisionRecord {
            id: id.clone(),
            request: req,
            requested_ms: self.now,
            requested_by: self.server.clone(),
            dispatched_ms: None,
            dispatched_by: None,
        };
        self.provisions.insert(id, rec.clone());
        self.requested.push(rec);
    }

    fn start_drain(&mut self, id: &str, then: AfterDrain) {
        let now = self.now;
        let Some(r) = self.node_mut(id) else {
            return;
        };
        r.cordoned = true;
        r.drain = Some(DrainOp {
            started_ms: now,
            then: then.clone(),
            blocked_by: None,
        });
        let name = r.registration.node_name.clone();
        let arg = match &then {
            AfterDrain::Nothing => "Nothing".to_string(),
            AfterDrain::Upgrade(v) => format!("Upgrade({v:?})"),
            AfterDrain::Terminate => "Terminate".to_string(),
        };
        self.command(id, CommandKind::Cordon, "");
        self.command(id, CommandKind::Drain, &arg);
        self.set_state(id, NodeState::Draining, "drain requested");
        self.event(&name, format!("drain started (then {arg})"));
    }

    fn new_node(&mut self, template: &Registration, version: &str, reason: &str) {
        self.cluster.next_node += 1;
        let n = self.cluster.next_node;
        let instance_id = format!(
            "{}-{n:04}-{}",
            template.node_pool,
            uuid::Uuid::new_v4().simple()
        );
        let node_name = format!("{}-node-{n:04}", template.node_pool);
        self.event(&node_name, format!("create requested ({reason})"));
        if reason == "rolling upgrade"
            && let Some(up) = self.upgrade.as_mut()
        {
            up.creating.push(instance_id.clone());
        }
        self.provision(ProvisionRequest::Create {
            instance_id,
            node_name,
            pool: template.node_pool.clone(),
            flavor: template.flavor.clone(),
            zone: template.zone.clone(),
            version: version.to_string(),
            reason: reason.to_string(),
        });
    }

    fn terminate(&mut self, id: &str, reason: &str) {
        let Some(r) = self.nodes.get(id) else {
            return;
        };
        let name = r.registration.node_name.clone();
        self.command(id, CommandKind::Terminate, reason);
        self.set_state(id, NodeState::Terminated, reason);
        // Its pods go back to pending.
        for p in self
            .workload
            .pods
            .iter_mut()
            .filter(|p| p.node.as_deref() == Some(&name))
        {
            p.node = None;
            p.ready = false;
        }
        self.provision(ProvisionRequest::Delete {
            instance_id: id.to_string(),
            node_name: name,
        });
    }

    /// Finds a node by instance ID or (live) node name.
    pub fn resolve(state: &State, node: &str) -> Result<String> {
        if state.nodes.contains_key(node) {
            return Ok(node.to_string());
        }
        state
            .nodes
            .iter()
            .filter(|(_, r)| {
                r.value.registration.node_name == node && r.value.state != NodeState::Terminated
            })
            .map(|(id, _)| id.clone())
            .next()
            .ok_or_else(|| Error::Lifecycle(format!("unknown node {node:?}")))
    }

    /// A registration (idempotent: the same registration of a live node changes nothing);
    /// `order` is the agent's (start time, sequence) stamp.
    pub fn register(&mut self, reg: Registration, order: (u64, u64)) -> Result<NodeState> {
        let id = reg.instance_id.clone();
        if let Some(r) = self.nodes.get(&id)
            && order.1 != 0
            && r.agent_start_ms == order.0
            && r.agent_seq > order.1
        {
            // Older than what this agent process reported since (delayed on this replica).
            return Ok(r.state);
        }
        let name = reg.node_name.clone();
        // Fulfilled provisioning requests leave the list.
        self.provisions.retain(|_, p| match &p.request {
            ProvisionRequest::Create { instance_id, .. }
            | ProvisionRequest::Reinstall { instance_id, .. } => *instance_id != id,
            ProvisionRequest::Delete { .. } => true,
        });
        if let Some(up) = self.upgrade.as_mut() {
            up.creating.retain(|c| *c != id);
        }
        let now = self.now;
        match self.nodes.get(&id) {
            Some(r) if r.state == NodeState::Terminated => Err(Error::Lifecycle(format!(
                "instance {id} was terminated and cannot register again"
            ))),
            Some(r) => {
                let was_not_ready = r.state == NodeState::NotReady;
                // A new agent process (restart, reinstall) starts a new report order.
                let new_process = order.1 != 0 && r.agent_start_ms != order.0;
                let changed = r.registration != reg;
                if changed || was_not_ready || new_process {
                    let r = self.node_mut(&id).expect("present");
                    r.version = reg.version.clone();
                    r.registration = reg;
                    r.last_heartbeat_ms = now;
                    if order.1 != 0 {
                        (r.agent_start_ms, r.agent_seq) = order;
                    }
                    if was_not_ready {
                        self.set_state(&id, NodeState::Installing, "registered again");
                    }
                    self.event(&name, "registered again".into());
                }
                Ok(self.nodes[&id].state)
            }
            None => {
                self.insert_node(
                    &id,
                    NodeRecord {
                        version: reg.version.clone(),
                        registration: reg,
                        state: NodeState::Installing,
                        reason: "registered".into(),
                        state_since_ms: now,
                        cordoned: false,
                        registered_ms: now,
                        last_heartbeat_ms: now,
                        not_ready_since_ms: None,
                        conditions: Vec::new(),
                        commands: Vec::new(),
                        next_command: 0,
                        reinstalls: 0,
                        heals: 0,
                        drain: None,
                        upgrading_to: None,
                        agent_start_ms: order.0,
                        agent_seq: order.1,
                    },
                );
                self.event(&name, format!("registered (instance {id})"));
                Ok(NodeState::Installing)
            }
        }
    }

    /// A heartbeat: conditions, version and acknowledgements, the state they imply. A heartbeat
    /// that changes nothing leaves the model unchanged (nothing is written). `None`: unknown node.
    pub fn heartbeat(&mut self, hb: &HeartbeatRequest) -> Option<HeartbeatResponse> {
        let id = hb.instance_id.clone();
        let before = self.nodes.get(&id)?.clone();
        let order = (hb.agent_start_ms, hb.sequence);
        if hb.sequence != 0 && before.agent_seq != 0 {
            if hb.agent_start_ms != before.agent_start_ms {
                // Another agent process than the one registered last (an older one's delayed
                // report, or a newer one whose registration went elsewhere): it registers again
                // (first, so that its reports are ordered), the stored state stays as it is.
                return Some(HeartbeatResponse {
                    state: String::new(),
                    commands: Vec::new(),
                    known: false,
                });
            }
            if hb.sequence < before.agent_seq {
                // Older than the last report stored (delayed on this replica): applying it would
                // undo newer facts (a version after an upgrade). Answer from the stored state.
                tracing::debug!(node = %before.registration.node_name, "stale heartbeat ignored");
                return Some(Self::answer(&before));
            }
        }
        let conditions: Vec<Condition> = hb
            .conditions
            .iter()
            .map(|c| Condition {
                kind: c.r#type.clone(),
                status: c.status,
                message: c.message.clone(),
            })
            .collect();
        let same_statuses = before.conditions.len() == conditions.len()
            && before
                .conditions
                .iter()
                .zip(&conditions)
                .all(|(a, b)| a.kind == b.kind && a.status == b.status);
        let name = before.registration.node_name.clone();
        let old_version = before.version.clone();
        let mut upgrade_failed = None;
        {
            let r = self.node_mut(&id).expect("present");
            if !same_statuses {
                r.conditions = conditions;
            }
            r.version = hb.version.clone();
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
                r.drain = None;
            }
        }
        if old_version != hb.version {
            self.event(&name, format!("version {old_version} -> {}", hb.version));
        }
        if let Some(err) = upgrade_failed {
            self.event(&name, format!("upgrade failed: {err}"));
            let now = self.now;
            if let Some(up) = self.upgrade.as_mut()
                && !up.done
            {
                up.done = true;
                up.current = None;
                up.failed = Some(format!("{name}: {err}"));
                up.finished_ms = Some(now);
            }
        }
        let r = &self.nodes[&id];
        let state = r.state;
        // Health from the reported conditions (messages included, even when not stored).
        let reported: Vec<(String, bool, String)> = hb
            .conditions
            .iter()
            .map(|c| (c.r#type.clone(), c.status, c.message.clone()))
            .collect();
        let health = machine::health(&reported);
        // An in-place upgrade holds the node in Installing until it reports the new version.
        let waiting_upgrade = r.upgrading_to.as_ref().is_some_and(|v| *v != hb.version);
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
            self.set_state(&id, next, &reason);
        }
        let now = self.now;
        let r = self.nodes.get_mut(&id).expect("present");
        if *r != before {
            r.last_heartbeat_ms = now;
            if hb.sequence != 0 {
                (r.agent_start_ms, r.agent_seq) = order;
            }
        } else {
            // Nothing to write.
            self.base.remove(&id);
        }
        Some(Self::answer(&self.nodes[&id]))
    }

    /// The heartbeat answer: the state and the unacknowledged commands.
    fn answer(r: &NodeRecord) -> HeartbeatResponse {
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

    /// Drains a node (and terminates it when `terminate`).
    pub fn drain(&mut self, id: &str, terminate: bool) {
        let then = if terminate {
            AfterDrain::Terminate
        } else {
            AfterDrain::Nothing
        };
        self.start_drain(id, then);
    }

    /// Cordons or uncordons a node.
    pub fn cordon(&mut self, id: &str, cordon: bool) {
        if let Some(r) = self.node_mut(id) {
            r.cordoned = cordon;
        }
        let kind = if cordon {
            CommandKind::Cordon
        } else {
            CommandKind::Uncordon
        };
        self.command(id, kind, "");
    }

    /// Starts an upgrade of a pool.
    pub fn start_upgrade(&mut self, req: UpgradeRequest) -> Result<()> {
        if let Strategy::Rolling {
            max_surge: 0,
            max_unavailable: 0,
        } = req.strategy
        {
            return Err(Error::Lifecycle(
                "maxSurge and maxUnavailable cannot both be 0".into(),
            ));
        }
        if self.upgrade.as_ref().is_some_and(|u| !u.done) {
            return Err(Error::Lifecycle("an upgrade is already running".into()));
        }
        let desired = self
            .nodes
            .values()
            .filter(|r| r.registration.node_pool == req.pool && r.state != NodeState::Terminated)
            .count();
        if desired == 0 {
            return Err(Error::Lifecycle(format!(
                "pool {:?} has no nodes",
                req.pool
            )));
        }
        self.event(
            &req.pool,
            format!(
                "upgrade of pool to {} started ({:?})",
                req.version, req.strategy
            ),
        );
        self.upgrade = Some(UpgradeRecord {
            request: req,
            desired,
            creating: Vec::new(),
            current: None,
            done: false,
            failed: None,
            started_ms: self.now,
            finished_ms: None,
            max_concurrent_in_place: 0,
        });
        Ok(())
    }

    /// One controller pass (leader only): timers, auto-healing, drains, upgrades, the pod
    /// scheduler. Changes at most [`NODE_BUDGET`] nodes.
    pub fn tick(&mut self, live: &Liveness) {
        debug_assert!(self.scope_all);
        let now = self.now;
        let timers = self.timers.clone();
        // 1. heartbeats, NotReady, auto-heal
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        for id in &ids {
            if !self.budget_left() {
                break;
            }
            let r = &self.nodes[id];
            if r.state == NodeState::Terminated {
                continue;
            }
            let (last, silent) = live.silence(id, r.last_heartbeat_ms);
            let nr_for = r
                .not_ready_since_ms
                .map(|t| std::time::Duration::from_millis(now.saturating_sub(t)));
            let out = machine::on_tick(r.state, silent, nr_for, &timers, self.plan);
            if out.state != r.state {
                // The NotReady clock starts when the silence passed the grace period.
                let at = last + timers.heartbeat_grace.as_millis() as u64;
                self.set_state_at(id, out.state, "heartbeats lost", at.min(now));
            }
            match out.heal {
                None => {}
                Some(Heal::ReinstallInPlace) => {
                    let r = self.node_mut(id).expect("present");
                    r.reinstalls += 1;
                    r.heals += 1;
                    // The reinstalled node gets a whole grace period to come back.
                    r.last_heartbeat_ms = now;
                    let name = r.registration.node_name.clone();
                    self.command(id, CommandKind::Reinstall, "auto-heal");
                    self.set_state(id, NodeState::Installing, "auto-heal: reinstall in place");
                    self.provision(ProvisionRequest::Reinstall {
                        instance_id: id.clone(),
                        node_name: name,
                    });
                }
                Some(Heal::Replace) => {
                    let reg = self.nodes[id].registration.clone();
                    let version = self.nodes[id].version.clone();
                    if let Some(r) = self.node_mut(id) {
                        r.heals += 1;
                    }
                    self.terminate(id, "auto-heal: replace");
                    self.new_node(&reg, &version, "auto-heal replacement");
                }
            }
        }
        // 2. the pod scheduler: pending pods go to schedulable Ready nodes, become ready later.
        let schedulable: Vec<String> = self
            .nodes
            .values()
            .filter(|r| r.state == NodeState::Ready && !r.cordoned)
            .map(|r| r.registration.node_name.clone())
            .collect();
        let wl = &mut self.workload;
        for (i, p) in wl.pods.iter_mut().enumerate() {
            let key = format!("{}/{}", p.namespace, p.name);
            match &p.node {
                None if !schedulable.is_empty() => {
                    p.node = Some(schedulable[i % schedulable.len()].clone());
                    p.ready = false;
                    wl.scheduled_ms.insert(key, now);
                }
                Some(_) if !p.ready => {
                    let since = *wl.scheduled_ms.entry(key.clone()).or_insert(now);
                    if now.saturating_sub(since) >= timers.pod_start.as_millis() as u64 {
                        p.ready = true;
                        wl.scheduled_ms.remove(&key);
                    }
                }
                _ => {}
            }
        }
        let live_pods: BTreeSet<String> = wl
            .pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        wl.scheduled_ms.retain(|k, _| live_pods.contains(k));
        // 3. drains
        for id in &ids {
            let Some(op) = self.nodes.get(id).and_then(|r| r.drain.clone()) else {
                continue;
            };
            if !self.budget_left() && !self.base.contains_key(id) {
                break;
            }
            let name = self.nodes[id].registration.node_name.clone();
            let forced =
                now.saturating_sub(op.started_ms) >= timers.drain_timeout.as_millis() as u64;
            let mut blocked = None;
            let pods = &self.workload.pods;
            let on_node: Vec<usize> = (0..pods.len())
                .filter(|&i| pods[i].node.as_deref() == Some(&name))
                .collect();
            let mut evicted = 0;
            let mut forced_n = 0;
            for i in on_node {
                let allowed = eviction_allowed(
                    &self.workload.pods[i],
                    &self.workload.pods,
                    &self.workload.pdbs,
                );
                match allowed {
                    Ok(()) => {}
                    Err(pdb) if !forced => {
                        blocked = Some(pdb);
                        continue;
                    }
                    Err(_) => forced_n += 1,
                }
                let p = &mut self.workload.pods[i];
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
                self.event(&name, msg);
            }
            let remaining = self
                .workload
                .pods
                .iter()
                .filter(|p| p.node.as_deref() == Some(&name))
                .count();
            if remaining > 0 {
                if blocked != op.blocked_by {
                    if let Some(b) = &blocked {
                        self.event(
                            &name,
                            format!("eviction blocked by PodDisruptionBudget {b}"),
                        );
                    }
                    self.node_mut(id).expect("present").drain = Some(DrainOp {
                        blocked_by: blocked,
                        ..op
                    });
                }
                continue;
            }
            self.node_mut(id).expect("present").drain = None;
            self.event(&name, "drained".into());
            match op.then {
                AfterDrain::Nothing => {}
                AfterDrain::Terminate => self.terminate(id, "drained for removal"),
                AfterDrain::Upgrade(v) => {
                    self.node_mut(id).expect("present").upgrading_to = Some(v.clone());
                    self.command(id, CommandKind::Upgrade, &v);
                    self.set_state(id, NodeState::Installing, "upgrading components in place");
                }
            }
        }
        // 4. upgrades
        self.upgrade_tick();
    }

    fn upgrade_tick(&mut self) {
        let Some(mut up) = self.upgrade.clone() else {
            return;
        };
        if up.done {
            return;
        }
        let now = self.now;
        let target = up.request.version.clone();
        let in_place_now = self
            .nodes
            .values()
            .filter(|r| {
                r.upgrading_to.is_some()
                    || r.drain
                        .as_ref()
                        .is_some_and(|d| matches!(d.then, AfterDrain::Upgrade(_)))
            })
            .count();
        up.max_concurrent_in_place = up.max_concurrent_in_place.max(in_place_now);
        match up.request.strategy.clone() {
            Strategy::InPlace => {
                if let Some(cur) = up.current.clone() {
                    match self.nodes.get(&cur) {
                        Some(r)
                            if r.state == NodeState::Ready
                                && r.version == target
                                && r.drain.is_none() =>
                        {
                            let name = r.registration.node_name.clone();
                            let r = self.node_mut(&cur).expect("present");
                            r.upgrading_to = None;
                            r.cordoned = false;
                            self.command(&cur, CommandKind::Uncordon, "");
                            self.event(&name, format!("upgraded in place to {target}"));
                            up.current = None;
                        }
                        Some(r) if r.state == NodeState::Terminated => up.current = None,
                        Some(_) => {}
                        None => up.current = None,
                    }
                }
                let views = self.views(&up.request.pool);
                match machine::in_place_next(&views, &target, up.current.is_some()) {
                    InPlaceStep::Wait => {}
                    InPlaceStep::Start(id) => {
                        if self.budget_left() {
                            up.current = Some(id.clone());
                            self.start_drain(&id, AfterDrain::Upgrade(target.clone()));
                            up.max_concurrent_in_place = up.max_concurrent_in_place.max(
                                self.nodes
                                    .values()
                                    .filter(|r| {
                                        r.upgrading_to.is_some()
                                            || r.drain.as_ref().is_some_and(|d| {
                                                matches!(d.then, AfterDrain::Upgrade(_))
                                            })
                                    })
                                    .count(),
                            );
                        }
                    }
                    InPlaceStep::Done => {
                        up.done = true;
                        up.finished_ms = Some(now);
                        self.event(
                            &up.request.pool,
                            format!("in-place upgrade to {target} done"),
                        );
                    }
                }
            }
            Strategy::Rolling {
                max_surge,
                max_unavailable,
            } => {
                let views = self.views(&up.request.pool);
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
                    up.finished_ms = Some(now);
                    self.event(
                        &up.request.pool,
                        format!("rolling upgrade to {target} done"),
                    );
                } else {
                    let template = self
                        .nodes
                        .values()
                        .find(|r| r.registration.node_pool == up.request.pool)
                        .map(|r| r.registration.clone());
                    self.upgrade = Some(up.clone());
                    if let Some(t) = template {
                        for _ in 0..step.create {
                            self.new_node(&t, &target, "rolling upgrade");
                        }
                    }
                    up = self.upgrade.clone().expect("set above");
                    for id in step.remove {
                        if !self.budget_left() {
                            break;
                        }
                        self.start_drain(&id, AfterDrain::Terminate);
                    }
                }
            }
        }
        self.upgrade = Some(up);
    }

    /// The changes as one compare-and-swap transaction: each changed key must still be at the
    /// revision it was read at (new keys: absent); a model of the whole state also requires that
    /// nothing under the state prefix changed since `read_rev` (its decisions read all of it).
    pub fn diff(&self, keys: &Keys, read_rev: i64) -> (Vec<Compare>, Vec<Op>) {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        let mut put = |compares: &mut Vec<Compare>, key: String, rev: i64, value: Vec<u8>| {
            compares.push(Compare::ModRevision {
                key: key.clone(),
                rev,
            });
            ops.push(Op::Put {
                key,
                value,
                lease: 0,
            });
        };
        for (id, before) in &self.base {
            let Some(now) = self.nodes.get(id) else {
                continue;
            };
            if before.as_ref() != Some(now) {
                let rev = self.node_revs.get(id).copied().unwrap_or(0);
                put(&mut compares, keys.node(id), rev, encode(now));
            }
        }
        if let Some((rev, before)) = &self.upgrade_base
            && *before != self.upgrade
            && let Some(up) = &self.upgrade
        {
            put(&mut compares, keys.upgrade(), *rev, encode(up));
        }
        if let Some((rev, before)) = &self.workload_base
            && *before != self.workload
        {
            put(&mut compares, keys.workload(), *rev, encode(&self.workload));
        }
        if let Some((rev, before)) = &self.cluster_base
            && *before != self.cluster
        {
            put(&mut compares, keys.cluster(), *rev, encode(&self.cluster));
        }
        for (id, p) in &self.provisions {
            match self.provision_base.get(id) {
                Some((_, before)) if before == p => {}
                Some((rev, _)) => put(&mut compares, keys.provision(id), *rev, encode(p)),
                None => put(&mut compares, keys.provision(id), 0, encode(p)),
            }
        }
        for (id, (rev, _)) in &self.provision_base {
            if !self.provisions.contains_key(id) {
                compares.push(Compare::ModRevision {
                    key: keys.provision(id),
                    rev: *rev,
                });
                ops.push(Op::Delete {
                    key: keys.provision(id),
                });
            }
        }
        if !ops.is_empty() && self.scope_all {
            compares.push(Compare::PrefixUnchangedSince {
                prefix: keys.state_prefix(),
                rev: read_rev,
            });
        }
        if !self.events.is_empty() {
            ops.push(Op::Put {
                key: keys.event(&self.server, self.now, next_event_seq()),
                value: encode(&EventBatch {
                    events: self.events.clone(),
                }),
                lease: 0,
            });
        }
        (compares, ops)
    }
}

/// Distinguishes event keys one replica writes within one millisecond.
fn next_event_seq() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed) % 10_000
}
