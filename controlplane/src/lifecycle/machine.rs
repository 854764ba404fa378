//! Pure lifecycle logic: node states, heartbeat/tick transitions, PodDisruptionBudget checks and
//! the upgrade planners. No I/O, no clocks: durations come in as arguments.
use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

/// Node lifecycle state (DESIGN §1): `Installing → Ready → Draining → Terminated`, plus
/// `NotReady`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Installing,
    Ready,
    NotReady,
    Draining,
    Terminated,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Installing => "Installing",
            NodeState::Ready => "Ready",
            NodeState::NotReady => "NotReady",
            NodeState::Draining => "Draining",
            NodeState::Terminated => "Terminated",
        }
    }
}

/// The cluster's plan decides how auto-healing repairs a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// Single-zone control plane; auto-healing reinstalls the node in place (same identity).
    Free,
    /// Multi-AZ control plane; auto-healing deletes the node and creates a new one.
    Standard,
}

/// How a NotReady node is repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Heal {
    ReinstallInPlace,
    Replace,
}

/// Lifecycle timers. Defaults are the production values; tests shorten them.
#[derive(Clone, Debug)]
pub struct Timers {
    /// Heartbeat period the agents are told to use.
    pub heartbeat_interval: Duration,
    /// No heartbeat for this long → NotReady.
    pub heartbeat_grace: Duration,
    /// NotReady for this long → auto-heal.
    pub autoheal_after: Duration,
    /// PodDisruptionBudgets are respected for at most this long, then the drain is forced.
    pub drain_timeout: Duration,
    /// A rescheduled pod becomes ready after this long.
    pub pod_start: Duration,
    /// Controller tick.
    pub tick: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_grace: Duration::from_secs(40),
            autoheal_after: Duration::from_secs(600),
            drain_timeout: Duration::from_secs(600),
            pod_start: Duration::from_secs(5),
            tick: Duration::from_secs(1),
        }
    }
}

/// Condition types a heartbeat carries.
pub const KUBELET_HEALTHY: &str = "KubeletHealthy";
pub const RUNTIME_HEALTHY: &str = "ContainerRuntimeHealthy";
pub const DATAPATH_LOADED: &str = "DatapathLoaded";
pub const DISK_PRESSURE: &str = "DiskPressure";

/// Whether a set of conditions `(type, status, message)` makes a node healthy. `DiskPressure`
/// is bad when true, the others are bad when false or missing.
pub fn health(conditions: &[(String, bool, String)]) -> Result<(), String> {
    for required in [KUBELET_HEALTHY, RUNTIME_HEALTHY, DATAPATH_LOADED] {
        match conditions.iter().find(|c| c.0 == required) {
            Some((_, true, _)) => {}
            Some((_, false, msg)) => return Err(format!("{required}=False: {msg}")),
            None => return Err(format!("{required} not reported")),
        }
    }
    if let Some((_, true, msg)) = conditions.iter().find(|c| c.0 == DISK_PRESSURE) {
        return Err(format!("{DISK_PRESSURE}=True: {msg}"));
    }
    Ok(())
}

/// State after a heartbeat with the given health.
pub fn on_heartbeat(state: NodeState, health: &Result<(), String>) -> NodeState {
    match (state, health) {
        (NodeState::Terminated, _) => NodeState::Terminated,
        (NodeState::Draining, _) => NodeState::Draining,
        (NodeState::Installing, Ok(())) | (NodeState::NotReady, Ok(())) => NodeState::Ready,
        (NodeState::Installing, Err(_)) => NodeState::Installing,
        (NodeState::Ready, Ok(())) => NodeState::Ready,
        (NodeState::Ready, Err(_)) | (NodeState::NotReady, Err(_)) => NodeState::NotReady,
    }
}

/// Result of a controller tick for one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickOutcome {
    pub state: NodeState,
    pub heal: Option<Heal>,
}

/// State after time passed: heartbeats lost past the grace period → NotReady; NotReady for the
/// auto-heal period → heal according to the plan.
pub fn on_tick(
    state: NodeState,
    since_heartbeat: Duration,
    not_ready_for: Option<Duration>,
    timers: &Timers,
    plan: Plan,
) -> TickOutcome {
    let state = match state {
        NodeState::Ready | NodeState::Installing | NodeState::Draining
            if since_heartbeat > timers.heartbeat_grace =>
        {
            NodeState::NotReady
        }
        s => s,
    };
    let heal = (state == NodeState::NotReady
        && not_ready_for.is_some_and(|d| d >= timers.autoheal_after))
    .then_some(match plan {
        Plan::Free => Heal::ReinstallInPlace,
        Plan::Standard => Heal::Replace,
    });
    TickOutcome { state, heal }
}

/// A pod of the workload model (what the drain moves).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Node name; `None` while pending.
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub ready: bool,
}

/// A PodDisruptionBudget: `min_available` or `max_unavailable` pods among those matching the
/// selector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pdb {
    pub namespace: String,
    pub name: String,
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub min_available: Option<u32>,
    #[serde(default)]
    pub max_unavailable: Option<u32>,
}

impl Pdb {
    fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
    }
}

/// Whether evicting `pod` keeps every PodDisruptionBudget that selects it; `Err(pdb name)` names
/// the first budget that blocks. An unready pod can always be evicted.
pub fn eviction_allowed(pod: &Pod, pods: &[Pod], pdbs: &[Pdb]) -> Result<(), String> {
    if !pod.ready {
        return Ok(());
    }
    for pdb in pdbs.iter().filter(|p| p.selects(pod)) {
        let matching: Vec<&Pod> = pods.iter().filter(|p| pdb.selects(p)).collect();
        let healthy = matching.iter().filter(|p| p.ready).count() as i64;
        let expected = matching.len() as i64;
        let allowed = match (pdb.min_available, pdb.max_unavailable) {
            (Some(min), _) => healthy - i64::from(min),
            (None, Some(max)) => i64::from(max) - (expected - healthy),
            (None, None) => 1,
        };
        if allowed < 1 {
            return Err(format!("{}/{}", pdb.namespace, pdb.name));
        }
    }
    Ok(())
}

/// A node as the upgrade planners see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub state: NodeState,
    pub version: String,
    pub cordoned: bool,
}

/// Next step of an in-place upgrade (strictly one node at a time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InPlaceStep {
    /// A node is being upgraded, or an outdated node is not Ready yet.
    Wait,
    /// Start upgrading this node.
    Start(String),
    Done,
}

/// Plans an in-place upgrade: `busy` says a node is in progress. Outdated nodes go in ID order;
/// an outdated node that is not Ready holds the upgrade (it must not lose capacity twice).
pub fn in_place_next(nodes: &[NodeView], target: &str, busy: bool) -> InPlaceStep {
    if busy {
        return InPlaceStep::Wait;
    }
    let mut outdated: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| n.state != NodeState::Terminated && n.version != target)
        .collect();
    outdated.sort_by(|a, b| a.id.cmp(&b.id));
    match outdated.first() {
        None => InPlaceStep::Done,
        Some(n) if n.state == NodeState::Ready => InPlaceStep::Start(n.id.clone()),
        Some(_) => InPlaceStep::Wait,
    }
}

/// One step of a rolling upgrade.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollingStep {
    /// New nodes (at the target version) to create now.
    pub create: usize,
    /// Outdated nodes to drain and delete now.
    pub remove: Vec<String>,
    pub done: bool,
}

/// Plans a rolling upgrade of a pool of `desired` nodes: at most `desired + max_surge` nodes
/// exist (counting `creating`), at least `desired - max_unavailable` are available (Ready and not
/// cordoned). `removing` counts outdated nodes already being drained.
pub fn rolling_step(
    nodes: &[NodeView],
    target: &str,
    desired: usize,
    max_surge: usize,
    max_unavailable: usize,
    creating: usize,
) -> RollingStep {
    let live: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| n.state != NodeState::Terminated)
        .collect();
    let mut old: Vec<&NodeView> = live
        .iter()
        .copied()
        .filter(|n| n.version != target)
        .collect();
    old.sort_by(|a, b| a.id.cmp(&b.id));
    let new = live.len() - old.len();
    if old.is_empty() && creating == 0 && new >= desired {
        return RollingStep {
            create: 0,
            remove: Vec::new(),
            done: true,
        };
    }
    let total = live.len() + creating;
    let room = (desired + max_surge).saturating_sub(total);
    let needed = desired.saturating_sub(new + creating);
    let create = room.min(needed);
    let available = live
        .iter()
        .filter(|n| n.state == NodeState::Ready && !n.cordoned)
        .count();
    // Cordoned or draining nodes are not available, so nodes already on their way out are
    // accounted for.
    let can_remove = available.saturating_sub(desired.saturating_sub(max_unavailable));
    let remove: Vec<String> = old
        .iter()
        .filter(|n| n.state == NodeState::Ready && !n.cordoned)
        .take(can_remove)
        .map(|n| n.id.clone())
        .collect();
    RollingStep {
        create,
        remove,
        done: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timers() -> Timers {
        Timers {
            heartbeat_grace: Duration::from_secs(40),
            autoheal_after: Duration::from_secs(600),
            ..Default::default()
        }
    }

    #[test]
    fn heartbeat_transitions() {
        let ok = Ok(());
        let bad = Err("kubelet".to_string());
        assert_eq!(on_heartbeat(NodeState::Installing, &ok), NodeState::Ready);
        assert_eq!(
            on_heartbeat(NodeState::Installing, &bad),
            NodeState::Installing
        );
        assert_eq!(on_heartbeat(NodeState::Ready, &bad), NodeState::NotReady);
        assert_eq!(on_heartbeat(NodeState::NotReady, &ok), NodeState::Ready);
        assert_eq!(on_heartbeat(NodeState::Draining, &ok), NodeState::Draining);
        assert_eq!(
            on_heartbeat(NodeState::Terminated, &ok),
            NodeState::Terminated
        );
    }

    #[test]
    fn lost_heartbeats_then_heal_by_plan() {
        let t = timers();
        let o = on_tick(
            NodeState::Ready,
            Duration::from_secs(10),
            None,
            &t,
            Plan::Free,
        );
        assert_eq!(
            o,
            TickOutcome {
                state: NodeState::Ready,
                heal: None
            }
        );
        let o = on_tick(
            NodeState::Ready,
            Duration::from_secs(41),
            None,
            &t,
            Plan::Free,
        );
        assert_eq!(o.state, NodeState::NotReady);
        assert_eq!(o.heal, None);
        let nine = Some(Duration::from_secs(599));
        assert_eq!(
            on_tick(NodeState::NotReady, Duration::ZERO, nine, &t, Plan::Free).heal,
            None
        );
        let ten = Some(Duration::from_secs(600));
        assert_eq!(
            on_tick(NodeState::NotReady, Duration::ZERO, ten, &t, Plan::Free).heal,
            Some(Heal::ReinstallInPlace)
        );
        assert_eq!(
            on_tick(NodeState::NotReady, Duration::ZERO, ten, &t, Plan::Standard).heal,
            Some(Heal::Replace)
        );
    }

    #[test]
    fn conditions() {
        let c = |t: &str, s: bool| (t.to_string(), s, String::new());
        let mut all = vec![
            c(KUBELET_HEALTHY, true),
            c(RUNTIME_HEALTHY, true),
            c(DATAPATH_LOADED, true),
            c(DISK_PRESSURE, false),
        ];
        assert!(health(&all).is_ok());
        all[3].1 = true;
        assert!(health(&all).unwrap_err().contains("DiskPressure"));
        all[3].1 = false;
        all[0].1 = false;
        assert!(health(&all).unwrap_err().contains("Kubelet"));
        assert!(health(&all[1..]).is_err());
    }

    fn pod(name: &str, app: &str, ready: bool) -> Pod {
        Pod {
            namespace: "default".into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            node: Some("n1".into()),
            ready,
        }
    }

    #[test]
    fn pdb_min_available() {
        let pods = vec![
            pod("a", "web", true),
            pod("b", "web", true),
            pod("c", "db", true),
        ];
        let pdb = Pdb {
            namespace: "default".into(),
            name: "web".into(),
            selector: [("app".to_string(), "web".to_string())].into(),
            min_available: Some(2),
            max_unavailable: None,
        };
        assert_eq!(
            eviction_allowed(&pods[0], &pods, std::slice::from_ref(&pdb)),
            Err("default/web".into())
        );
        assert_eq!(
            eviction_allowed(&pods[2], &pods, std::slice::from_ref(&pdb)),
            Ok(())
        );
        let mut more = pods.clone();
        more.push(pod("d", "web", true));
        assert_eq!(
            eviction_allowed(&more[0], &more, std::slice::from_ref(&pdb)),
            Ok(())
        );
        // an unready pod can always go
        let mut unready = pods.clone();
        unready[0].ready = false;
        assert_eq!(eviction_allowed(&unready[0], &unready, &[pdb]), Ok(()));
    }

    #[test]
    fn pdb_max_unavailable() {
        let mut pods = vec![
            pod("a", "web", true),
            pod("b", "web", true),
            pod("c", "web", true),
        ];
        let pdb = Pdb {
            namespace: "default".into(),
            name: "web".into(),
            selector: [("app".to_string(), "web".to_string())].into(),
            min_available: None,
            max_unavailable: Some(1),
        };
        assert_eq!(
            eviction_allowed(&pods[0], &pods, std::slice::from_ref(&pdb)),
            Ok(())
        );
        pods[1].ready = false;
        assert!(eviction_allowed(&pods[0], &pods, &[pdb]).is_err());
    }

    fn nv(id: &str, state: NodeState, version: &str, cordoned: bool) -> NodeView {
        NodeView {
            id: id.into(),
            state,
            version: version.into(),
            cordoned,
        }
    }

    #[test]
    fn in_place_one_at_a_time() {
        let nodes = vec![
            nv("a", NodeState::Ready, "v2", false),
            nv("b", NodeState::Ready, "v1", false),
            nv("c", NodeState::Ready, "v1", false),
        ];
        assert_eq!(
            in_place_next(&nodes, "v2", false),
            InPlaceStep::Start("b".into())
        );
        assert_eq!(in_place_next(&nodes, "v2", true), InPlaceStep::Wait);
        let mut sick = nodes.clone();
        sick[1].state = NodeState::NotReady;
        assert_eq!(in_place_next(&sick, "v2", false), InPlaceStep::Wait);
        let done: Vec<_> = nodes
            .iter()
            .map(|n| nv(&n.id, NodeState::Ready, "v2", false))
            .collect();
        assert_eq!(in_place_next(&done, "v2", false), InPlaceStep::Done);
    }

    #[test]
    fn rolling_surge_first() {
        let nodes = vec![
            nv("a", NodeState::Ready, "v1", false),
            nv("b", NodeState::Ready, "v1", false),
        ];
        // maxSurge 1, maxUnavailable 0: create one, remove none until it is Ready.
        let s = rolling_step(&nodes, "v2", 2, 1, 0, 0);
        assert_eq!((s.create, s.remove.len(), s.done), (1, 0, false));
        let s = rolling_step(&nodes, "v2", 2, 1, 0, 1);
        assert_eq!((s.create, s.remove.len()), (0, 0));
        let mut with_new = nodes.clone();
        with_new.push(nv("n1", NodeState::Installing, "v2", false));
        assert_eq!(rolling_step(&with_new, "v2", 2, 1, 0, 0).remove.len(), 0);
        with_new[2].state = NodeState::Ready;
        let s = rolling_step(&with_new, "v2", 2, 1, 0, 0);
        assert_eq!((s.create, s.remove.clone()), (0, vec!["a".to_string()]));
        // a is draining: nothing more until it is gone
        with_new[0].cordoned = true;
        with_new[0].state = NodeState::Draining;
        let s = rolling_step(&with_new, "v2", 2, 1, 0, 0);
        assert_eq!((s.create, s.remove.len()), (0, 0));
        with_new[0].state = NodeState::Terminated;
        let s = rolling_step(&with_new, "v2", 2, 1, 0, 0);
        assert_eq!((s.create, s.remove.len()), (1, 0));
        let done = vec![
            nv("a", NodeState::Terminated, "v1", true),
            nv("b", NodeState::Terminated, "v1", true),
            nv("n1", NodeState::Ready, "v2", false),
            nv("n2", NodeState::Ready, "v2", false),
        ];
        assert!(rolling_step(&done, "v2", 2, 1, 0, 0).done);
    }

    #[test]
    fn rolling_unavailable_without_surge() {
        let nodes = vec![
            nv("a", NodeState::Ready, "v1", false),
            nv("b", NodeState::Ready, "v1", false),
            nv("c", NodeState::Ready, "v1", false),
        ];
        let s = rolling_step(&nodes, "v2", 3, 0, 1, 0);
        assert_eq!((s.create, s.remove.clone()), (0, vec!["a".to_string()]));
    }
}
