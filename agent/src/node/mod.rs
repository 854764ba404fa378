//! Node registration, heartbeats and lifecycle commands (agent side).
//!
//! For every tunnel connection the agent registers its node with that control-plane replica over
//! the same HTTP/2 connection ([`session`]), then heartbeats with its conditions. Commands in the
//! heartbeat answers (cordon, uncordon, drain, upgrade, reinstall, terminate) are executed once
//! per registry and command ID (replicas sharing one registry deliver the same command; an older
//! server without a registry ID is its own registry), acknowledged in the next heartbeat to every
//! replica that delivered them (with the first execution's result; a delivery while it still runs
//! is acknowledged later), and recorded in a JSON state file that `berthctl node` shows.
pub mod conditions;
pub mod flavor;
pub mod session;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use berth_proto::node::{Command, CommandAck, CommandKind, NodeRegistration, Resources, Taint};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One command as the node saw it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommandLog {
    pub server: String,
    pub id: u64,
    pub kind: String,
    pub argument: String,
    pub result: String,
    pub unix_ms: u64,
}

/// What `berthctl node` shows: the registration, the state each replica reports, the last
/// commands.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct NodeStateFile {
    pub node_name: String,
    pub instance_id: String,
    pub pool: String,
    pub flavor: String,
    pub zone: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<String>,
    pub capacity: BTreeMap<String, u64>,
    pub reserved: BTreeMap<String, u64>,
    pub allocatable: BTreeMap<String, u64>,
    pub cordoned: bool,
    pub terminated: bool,
    pub draining_tunnel: bool,
    /// Lifecycle state per control-plane replica.
    pub servers: BTreeMap<String, String>,
    pub conditions: BTreeMap<String, bool>,
    pub last_commands: Vec<CommandLog>,
    pub updated_unix_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn kind_name(k: i32) -> String {
    match CommandKind::try_from(k) {
        Ok(CommandKind::Cordon) => "cordon",
        Ok(CommandKind::Uncordon) => "uncordon",
        Ok(CommandKind::Drain) => "drain",
        Ok(CommandKind::Upgrade) => "upgrade",
        Ok(CommandKind::Reinstall) => "reinstall",
        Ok(CommandKind::Terminate) => "terminate",
        _ => "unknown",
    }
    .to_string()
}

fn res_map(r: &Option<Resources>) -> BTreeMap<String, u64> {
    let r = r.unwrap_or_default();
    [
        ("cpu_millis".to_string(), r.cpu_millis),
        ("memory_bytes".to_string(), r.memory_bytes),
        ("storage_bytes".to_string(), r.storage_bytes),
        ("pods".to_string(), u64::from(r.pods)),
    ]
    .into()
}

/// Outcome of a command: `None` while it runs.
type Outcome = Option<std::result::Result<(), String>>;

struct Inner {
    reg: NodeRegistration,
    file: NodeStateFile,
    /// (registry, command ID) → outcome.
    seen: HashMap<(String, u64), Outcome>,
    acks: BTreeMap<String, Vec<CommandAck>>,
}

/// The node's side of the lifecycle, shared by the per-replica sessions.
pub struct NodeAgent {
    inner: Mutex<Inner>,
    /// Orders this process's reports across replicas: (start time, counter).
    start_ms: u64,
    sequence: std::sync::atomic::AtomicU64,
    state_path: Option<PathBuf>,
    upgrade_hook: Option<String>,
}

/// Parses `key=value:Effect`.
pub fn parse_taint(s: &str) -> Result<Taint> {
    let (kv, effect) = s
        .rsplit_once(':')
        .ok_or_else(|| Error::Config(format!("taint {s:?} is not key=value:Effect")))?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(Error::Config(format!(
            "taint {s:?}: unknown effect {effect}"
        )));
    }
    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
    if k.is_empty() {
        return Err(Error::Config(format!("taint {s:?}: empty key")));
    }
    Ok(Taint {
        key: k.into(),
        value: v.into(),
        effect: effect.into(),
    })
}

/// Parses `key=value`.
pub fn parse_label(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.into(), v.into())),
        _ => Err(Error::Config(format!("label {s:?} is not key=value"))),
    }
}

/// Builds the registration from the flavor table (or the machine's own figures).
pub fn resources_for(flavor: &str, disk_path: &Path) -> (Resources, Resources, Resources) {
    let cap = match flavor::lookup(flavor) {
        Some(shape) => flavor::capacity(shape),
        None => {
            let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
            let disk = nix::sys::statvfs::statvfs(disk_path)
                .map(|s| s.blocks() * s.fragment_size())
                .unwrap_or(0);
            flavor::detected_capacity(&cpu, &mem, disk)
        }
    };
    let reserved = flavor::reserved(cap);
    let alloc = flavor::allocatable(cap, reserved);
    let conv = |r: flavor::Res| Resources {
        cpu_millis: r.cpu_millis,
        memory_bytes: r.memory_bytes,
        storage_bytes: r.storage_bytes,
        pods: r.pods,
    };
    (conv(cap), conv(reserved), conv(alloc))
}

impl NodeAgent {
    /// A node agent for `reg`; the state file (if any) is written on every change.
    pub fn new(
        reg: NodeRegistration,
        state_path: Option<PathBuf>,
        upgrade_hook: Option<String>,
    ) -> Self {
        let file = NodeStateFile {
            node_name: reg.node_name.clone(),
            instance_id: reg.instance_id.clone(),
            pool: reg.node_pool.clone(),
            flavor: reg.flavor.clone(),
            zone: reg.zone.clone(),
            version: reg.version.clone(),
            labels: reg
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            taints: reg
                .taints
                .iter()
                .map(|t| format!("{}={}:{}", t.key, t.value, t.effect))
                .collect(),
            capacity: res_map(&reg.capacity),
            reserved: res_map(&reg.reserved),
            allocatable: res_map(&reg.allocatable),
            ..Default::default()
        };
        let agent = Self {
            inner: Mutex::new(Inner {
                reg,
                file,
                seen: HashMap::new(),
                acks: BTreeMap::new(),
            }),
            state_path,
            upgrade_hook,
            start_ms: now_ms(),
            sequence: std::sync::atomic::AtomicU64::new(0),
        };
        agent.persist();
        agent
    }

    /// The registration as it is now, stamped for ordering (see [`NodeAgent::stamp`]).
    pub fn stamped_registration(&self) -> (NodeRegistration, u64, u64) {
        let inner = self.inner.lock().unwrap();
        let seq = self
            .sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        (inner.reg.clone(), self.start_ms, seq)
    }

    /// The version now, with this process's start time and the next sequence number, taken
    /// together (an upgrade changes the version under the same lock): a replica that receives
    /// an older report after a newer one ignores it.
    pub fn stamp(&self) -> (String, u64, u64) {
        let inner = self.inner.lock().unwrap();
        let seq = self
            .sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        (inner.reg.version.clone(), self.start_ms, seq)
    }

    /// The registration as it is now (the version follows upgrades).
    pub fn registration(&self) -> NodeRegistration {
        self.inner.lock().unwrap().reg.clone()
    }

    pub fn version(&self) -> String {
        self.inner.lock().unwrap().reg.version.clone()
    }

    /// A copy of the state shown by `berthctl node`.
    pub fn snapshot(&self) -> NodeStateFile {
        self.inner.lock().unwrap().file.clone()
    }

    fn persist(&self) {
        let Some(path) = &self.state_path else {
            return;
        };
        let mut inner = self.inner.lock().unwrap();
        inner.file.updated_unix_ms = now_ms();
        let text = serde_json::to_string_pretty(&inner.file).unwrap_or_default();
        drop(inner);
        if let Err(e) = write_atomic(path, &text) {
            tracing::warn!(path = %path.display(), "node state file: {e}");
        }
    }

    /// Records the state a replica reports.
    pub fn set_server_state(&self, server: &str, state: &str) {
        let changed = {
            let mut inner = self.inner.lock().unwrap();
            inner.file.servers.insert(server.into(), state.into()) != Some(state.into())
        };
        if changed {
            self.persist();
        }
    }

    /// Forgets a replica (its connection closed).
    pub fn forget_server(&self, server: &str) {
        self.inner.lock().unwrap().file.servers.remove(server);
        self.persist();
    }

    pub fn set_conditions(&self, conds: &[berth_proto::node::Condition]) {
        let map: BTreeMap<String, bool> =
            conds.iter().map(|c| (c.r#type.clone(), c.status)).collect();
        let changed = {
            let mut inner = self.inner.lock().unwrap();
            std::mem::replace(&mut inner.file.conditions, map.clone()) != map
        };
        if changed {
            self.persist();
        }
    }

    pub fn set_draining(&self, draining: bool) {
        self.inner.lock().unwrap().file.draining_tunnel = draining;
        self.persist();
    }

    pub fn terminated(&self) -> bool {
        self.inner.lock().unwrap().file.terminated
    }

    /// Acknowledgements owed to `server`.
    pub fn take_acks(&self, server: &str) -> Vec<CommandAck> {
        self.inner
            .lock()
            .unwrap()
            .acks
            .remove(server)
            .unwrap_or_default()
    }

    /// Puts acknowledgements back after a failed heartbeat.
    pub fn return_acks(&self, server: &str, acks: Vec<CommandAck>) {
        self.inner
            .lock()
            .unwrap()
            .acks
            .entry(server.into())
            .or_default()
            .extend(acks);
    }

    /// Executes a command once per `registry` (a repeated delivery, also from another replica
    /// of the same registry, is acknowledged with the first result; while the first execution
    /// runs, a repeated delivery is not acknowledged yet). `server` is the delivering replica.
    pub async fn handle(&self, registry: &str, server: &str, cmd: &Command) {
        let key = (registry.to_string(), cmd.id);
        let earlier = {
            let mut inner = self.inner.lock().unwrap();
            match inner.seen.get(&key) {
                None => {
                    inner.seen.insert(key.clone(), None);
                    None
                }
                Some(o) => Some(o.clone()),
            }
        };
        let kind = kind_name(cmd.kind);
        let first = earlier.is_none();
        let result: std::result::Result<(), String> = match earlier {
            // Still running (delivered by another replica): acknowledged on a later delivery.
            Some(None) => return,
            Some(Some(r)) => r,
            None => {
                tracing::info!(registry, server, id = cmd.id, kind = %kind, argument = %cmd.argument, "lifecycle command");
                match CommandKind::try_from(cmd.kind) {
                    Ok(CommandKind::Cordon) => {
                        self.inner.lock().unwrap().file.cordoned = true;
                        Ok(())
                    }
                    Ok(CommandKind::Uncordon) => {
                        self.inner.lock().unwrap().file.cordoned = false;
                        Ok(())
                    }
                    // The kubelet evicts the pods; the node only records the drain.
                    Ok(CommandKind::Drain) | Ok(CommandKind::Reinstall) => Ok(()),
                    Ok(CommandKind::Terminate) => {
                        self.inner.lock().unwrap().file.terminated = true;
                        Ok(())
                    }
                    Ok(CommandKind::Upgrade) => self.upgrade(&cmd.argument).await,
                    _ => Err(format!("unknown command kind {}", cmd.kind)),
                }
            }
        };
        {
            let mut inner = self.inner.lock().unwrap();
            if first {
                inner.seen.insert(key, Some(result.clone()));
            }
            inner
                .acks
                .entry(server.into())
                .or_default()
                .push(CommandAck {
                    command_id: cmd.id,
                    error: result.clone().err().unwrap_or_default(),
                });
            if first {
                inner.file.last_commands.push(CommandLog {
                    server: server.into(),
                    id: cmd.id,
                    kind,
                    argument: cmd.argument.clone(),
                    result: match &result {
                        Ok(()) => "ok".into(),
                        Err(e) => e.clone(),
                    },
                    unix_ms: now_ms(),
                });
                let n = inner.file.last_commands.len();
                if n > 20 {
                    inner.file.last_commands.drain(..n - 20);
                }
            }
        }
        if first {
            self.persist();
        }
    }

    /// Upgrades the node components: runs the hook (if any) with BERTH_VERSION, then reports the
    /// new version.
    async fn upgrade(&self, version: &str) -> std::result::Result<(), String> {
        if version.is_empty() {
            return Err("upgrade without a version".into());
        }
        if let Some(hook) = &self.upgrade_hook {
            let status = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(hook)
                .env("BERTH_VERSION", version)
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("upgrade hook: {e}"))?;
            if !status.success() {
                return Err(format!("upgrade hook failed: {status}"));
            }
        }
        let mut inner = self.inner.lock().unwrap();
        inner.reg.version = version.to_string();
        inner.file.version = version.to_string();
        Ok(())
    }
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

/// Reads the state file written by a running agent (`berthctl node`).
pub fn read_state(path: &Path) -> Result<NodeStateFile> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| Error::State {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Renders the state for `berthctl node`.
pub fn format_state(s: &NodeStateFile) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node       {} (instance {})",
        s.node_name, s.instance_id
    );
    let _ = writeln!(
        out,
        "pool       {}  flavor {}  zone {}  version {}",
        s.pool, s.flavor, s.zone, s.version
    );
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "labels     {}", labels.join(","));
    let _ = writeln!(out, "taints     {}", s.taints.join(","));
    let r = |m: &BTreeMap<String, u64>| {
        format!(
            "cpu {}m, memory {:.2} GB, storage {:.0} GB, pods {}",
            m.get("cpu_millis").unwrap_or(&0),
            *m.get("memory_bytes").unwrap_or(&0) as f64 / 1e9,
            *m.get("storage_bytes").unwrap_or(&0) as f64 / 1e9,
            m.get("pods").unwrap_or(&0)
        )
    };
    let _ = writeln!(out, "capacity   {}", r(&s.capacity));
    let _ = writeln!(out, "reserved   {}", r(&s.reserved));
    let _ = writeln!(out, "allocatable {}", r(&s.allocatable));
    let _ = writeln!(
        out,
        "cordoned   {}  terminated {}  tunnel draining {}",
        s.cordoned, s.terminated, s.draining_tunnel
    );
    for (server, state) in &s.servers {
        let _ = writeln!(out, "state      {state} (control plane {server})");
    }
    let conds: Vec<String> = s
        .conditions
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(out, "conditions {}", conds.join(" "));
    let _ = writeln!(out, "last commands:");
    for c in s.last_commands.iter().rev() {
        let _ = writeln!(
            out,
            "  #{:<4} {:<10} {:<12} {} (from {})",
            c.id, c.kind, c.argument, c.result, c.server
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_and_labels() {
        let t = parse_taint("gpu=true:NoSchedule").unwrap();
        assert_eq!(
            (t.key.as_str(), t.value.as_str(), t.effect.as_str()),
            ("gpu", "true", "NoSchedule")
        );
        assert!(parse_taint("gpu=true:Sometimes").is_err());
        assert!(parse_taint("gpu").is_err());
        assert_eq!(parse_label("a=b").unwrap(), ("a".into(), "b".into()));
        assert!(parse_label("=b").is_err());
    }

    #[tokio::test]
    async fn commands_run_once_and_are_acked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        let reg = NodeRegistration {
            node_name: "n1".into(),
            instance_id: "i-1".into(),
            version: "1.0".into(),
            ..Default::default()
        };
        let n = NodeAgent::new(reg, Some(path.clone()), None);
        let up = Command {
            id: 7,
            kind: CommandKind::Upgrade as i32,
            argument: "2.0".into(),
        };
        n.handle("s1", "s1", &up).await;
        n.handle("s1", "s1", &up).await;
        assert_eq!(n.version(), "2.0");
        let acks = n.take_acks("s1");
        assert_eq!(acks.len(), 2);
        assert!(acks.iter().all(|a| a.command_id == 7 && a.error.is_empty()));
        n.handle(
            "s1",
            "s1",
            &Command {
                id: 8,
                kind: CommandKind::Cordon as i32,
                argument: String::new(),
            },
        )
        .await;
        let s = read_state(&path).unwrap();
        assert!(s.cordoned);
        assert_eq!(s.version, "2.0");
        assert_eq!(s.last_commands.len(), 2);
        assert!(format_state(&s).contains("upgrade"));
        let bad = Command {
            id: 9,
            kind: CommandKind::Upgrade as i32,
            argument: String::new(),
        };
        n.handle("s1", "s1", &bad).await;
        assert!(!n.take_acks("s1").last().unwrap().error.is_empty());
    }

    #[tokio::test]
    async fn replicas_of_one_registry_run_a_command_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("upgrades");
        let reg = NodeRegistration {
            node_name: "n1".into(),
            instance_id: "i-1".into(),
            version: "1.0".into(),
            ..Default::default()
        };
        // The hook fails the first time it runs: every replica must hear that same failure.
        let hook = format!(
            "echo \"$BERTH_VERSION\" >> {l}; [ $(wc -l < {l}) -gt 1 ]",
            l = log.display()
        );
        let n = std::sync::Arc::new(NodeAgent::new(reg, None, Some(hook)));
        let up = Command {
            id: 3,
            kind: CommandKind::Upgrade as i32,
            argument: "2.0".into(),
        };
        // Three replicas of one registry deliver command 3 at the same time.
        let (a, b, c) = tokio::join!(
            n.handle("reg-1", "cp-0", &up),
            n.handle("reg-1", "cp-1", &up),
            n.handle("reg-1", "cp-2", &up),
        );
        let _ = (a, b, c);
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
        // Deliveries during the run were not acknowledged; later ones get the first result.
        for server in ["cp-0", "cp-1", "cp-2"] {
            n.handle("reg-1", server, &up).await;
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
        for server in ["cp-0", "cp-1", "cp-2"] {
            let acks = n.take_acks(server);
            assert!(!acks.is_empty(), "{server} acknowledged");
            assert!(
                acks.iter()
                    .all(|a| a.command_id == 3 && a.error.contains("upgrade hook failed")),
                "{server}: {acks:?}"
            );
        }
        assert_eq!(n.version(), "1.0");
        // Another registry (a server without shared state) is its own scope.
        n.handle("reg-2", "cp-9", &up).await;
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 2);
        assert!(n.take_acks("cp-9")[0].error.is_empty());
        assert_eq!(n.version(), "2.0");
    }
}
