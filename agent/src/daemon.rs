//! The daemon: start-up order, the state-directory lock, the reconcile loops and signals
//! (DESIGN §9). `berth-agent` is a thin binary over [`run`].
//!
//! Start-up order, and why:
//! 1. lock the state directory — a second agent exits before touching pins or state;
//! 2. start the state source and wait for its first full list — the pod CIDR, the node IP and the
//!    peers come from it;
//! 3. find the uplink, create or adopt the VXLAN device — the datapath configuration names them;
//! 4. load or adopt the datapath (maps of another layout are re-created, see
//!    [`crate::datapath::check_map_layouts`]);
//! 5. write the routes and ipcache, then the endpoint entries, and only then re-point filters at
//!    new programs — a freshly created map is full before any program reads it, so an upgrade
//!    never drops established traffic;
//! 6. serve the local API; reconcile routing on every model change (and every 30 s, to repair
//!    what someone else changed); housekeeping; the tunnel.
use crate::{
    cluster::{self, ClusterModel},
    config::{DEFAULT_POD_CIDR, Settings},
    core::{AgentCore, CoreConfig, NodeNetworking},
    datapath::{DeviceRole, EbpfDatapath, Ipcache, PolicyMapsEbpf},
    error::{Error, Result},
    lock::StateLock,
    policy::{
        PolicyEngine,
        reconcile::{LocalEndpoint, PolicyReconciler},
    },
    routing::{self, NodeRoute, Router, RoutingMode, Topology},
    server,
    store::Store,
    tunnel,
};
use berth_ebpf_common::{DatapathConfig, EVENTS_ALLOWED, routing_mode};
use ipnet::Ipv4Net;
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::watch;

/// Everything the daemon needs, resolved by the binary.
#[derive(Debug, Clone)]
pub struct Options {
    pub settings: Settings,
    pub source: cluster::SourceArgs,
    pub tunnel: tunnel::TunnelArgs,
    /// Between housekeeping passes (delete queue, vanished pods, expired allocations).
    pub housekeeping_interval: Duration,
    /// How long an address may stay allocated without becoming an endpoint.
    pub allocation_lease: Duration,
    /// How long to wait for the state source's first full list (and this node's pod CIDR).
    pub source_timeout: Duration,
}

/// Routing's view of the model.
pub fn node_routes(model: &ClusterModel) -> Vec<NodeRoute> {
    model
        .node_views()
        .into_iter()
        .map(|v| NodeRoute {
            name: v.name,
            pod_cidrs: v.pod_cidrs,
            node_ip: v.internal_ip,
        })
        .collect()
}

/// Waits until the model is synced and, when `need_cidr`, this node has a pod CIDR in it.
async fn wait_for_model(
    rx: &mut watch::Receiver<Arc<ClusterModel>>,
    node_name: &str,
    need_cidr: bool,
    timeout: Duration,
) -> Result<Arc<ClusterModel>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_log = Instant::now();
    loop {
        let model = rx.borrow_and_update().clone();
        let own = model.node_view(node_name);
        let cidr_ok = !need_cidr || own.as_ref().is_some_and(|v| !v.pod_cidrs.is_empty());
        if model.synced && cidr_ok {
            return Ok(model);
        }
        if last_log.elapsed() > Duration::from_secs(10) {
            tracing::info!(
                synced = model.synced,
                node_known = own.is_some(),
                "waiting for the state source (this node's Node object and its spec.podCIDRs)"
            );
            last_log = Instant::now();
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Error::Config("the state source stopped".into())),
            Err(_) => {
                return Err(Error::Config(format!(
                    "no pod CIDR for node {node_name} after {timeout:?}: the state source {} \
                     (give --pod-cidr, or make sure the Node object exists and has spec.podCIDRs)",
                    if model.synced {
                        "has no such Node or it has no podCIDRs"
                    } else {
                        "did not finish its first list"
                    }
                )));
            }
        }
    }
}

fn blocking_err(e: tokio::task::JoinError) -> Error {
    Error::Datapath(format!("start-up task failed: {e}"))
}

/// Runs the agent until SIGTERM (twice with a tunnel: drain, then exit).
pub async fn run(opts: Options) -> Result<()> {
    let s = opts.settings.clone();
    let lock = StateLock::acquire(&s.state_dir)?;
    tracing::info!(lock = %lock.path().display(), "state directory locked");

    if s.ip_forward {
        crate::host::log_forwarding(&crate::host::ensure_ip_forward(Path::new(
            crate::host::IP_FORWARD,
        )));
    }

    let mut models = cluster::start(&opts.source, &s.node_name).await?;
    let has_source = opts.source.resolved() != cluster::SourceKind::None;
    // The CIDR this node used before (an agent restart while the API server is unreachable must
    // not stop the node from serving its pods).
    let stored_cidr: Option<Ipv4Net> = Store::new(&s.state_dir, s.fsync)?
        .load()?
        .pod_cidr
        .parse()
        .ok();
    let need_cidr = has_source && s.pod_cidr.is_none();
    let wait = if need_cidr && stored_cidr.is_none() {
        opts.source_timeout
    } else {
        opts.source_timeout.min(Duration::from_secs(5))
    };
    let model = match wait_for_model(&mut models, &s.node_name, need_cidr, wait).await {
        Ok(m) => m,
        Err(e) if !need_cidr || stored_cidr.is_some() => {
            tracing::warn!(error = %e, "starting without a complete view of the cluster; routes to other nodes stay as they are until the state source has synced");
            models.borrow().clone()
        }
        Err(e) => return Err(e),
    };
    let own = model.node_view(&s.node_name);
    let pod_cidr: Ipv4Net = match (
        s.pod_cidr,
        own.as_ref().and_then(|v| v.pod_cidrs.first()),
        stored_cidr,
    ) {
        (Some(c), _, _) => c,
        (None, Some(c), _) => {
            crate::ipam::validate_pod_cidr(c)?;
            tracing::info!(pod_cidr = %c, "pod CIDR from the Node object");
            *c
        }
        (None, None, Some(c)) if has_source => {
            tracing::warn!(pod_cidr = %c, "pod CIDR from the agent's state (the Node object is not available yet)");
            c
        }
        (None, None, _) => DEFAULT_POD_CIDR.parse().expect("default CIDR"),
    };
    let node_ip: Option<Ipv4Addr> = s.node_ip.or(own.as_ref().and_then(|v| v.internal_ip));

    let start = {
        let s = s.clone();
        let model = model.clone();
        tokio::task::spawn_blocking(move || start_datapath(&s, pod_cidr, node_ip, &model))
            .await
            .map_err(blocking_err)??
    };
    let Started {
        core,
        router,
        mtu,
        policy,
    } = start;
    let policy = Arc::new(Mutex::new(policy));
    tracing::info!(
        node = %s.node_name,
        %pod_cidr,
        mode = %s.routing,
        mtu,
        uplink = ?router.topology().uplink.as_ref().map(|l| &l.name),
        node_ip = ?router.topology().node_ip,
        "node networking ready"
    );
    let router = Arc::new(Mutex::new(router));

    let (del_tx, del_rx) = tokio::sync::mpsc::unbounded_channel::<(String, u32)>();
    let endpoints_changed = Arc::new(tokio::sync::Notify::new());
    let notify = endpoints_changed.clone();
    let core = Arc::new(
        core.with_link_deleter(Box::new(move |name, index| {
            let _ = del_tx.send((name, index));
        }))
        .with_endpoint_observer(Box::new(move || notify.notify_one())),
    );
    let drained = core.drain_delete_queue(&s.cni_state_dir)?;
    if drained > 0 {
        tracing::info!(drained, "applied DELs queued while the agent was down");
    }
    tokio::spawn(crate::links::delete_links(del_rx));
    tokio::spawn(policy_loop(
        models.clone(),
        core.clone(),
        policy.clone(),
        endpoints_changed,
    ));
    tokio::spawn(routing_loop(
        models,
        router.clone(),
        core.clone(),
        s.node_name.clone(),
        pod_cidr,
    ));
    tokio::spawn(housekeeping_loop(
        core.clone(),
        s.cni_state_dir.clone(),
        (s.pin_root.clone(), s.state_dir.clone()),
        opts.housekeeping_interval,
        opts.allocation_lease,
    ));

    if let Some(addr) = s.metrics_addr {
        let (core, pins) = (core.clone(), s.pin_root.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, core, pins).await {
                tracing::warn!(error = %e, "no /metrics endpoint");
            }
        });
    }
    let listener = server::bind(&s.socket).await?;
    tracing::info!(socket = %s.socket.display(), "serving local API");
    // Serving: the runtime may now see the CNI configuration.
    if let Some((src, dest)) = &s.install_cni_conf {
        let changed = crate::host::install_cni_conf(src, dest, &s.socket)?;
        tracing::info!(from = %src.display(), to = %dest.display(), changed, "CNI configuration installed");
    }

    // The tunnel runs beside the local API when a server is given.
    let (tunnel_tx, tunnel_rx) = tunnel::shutdown_channel();
    let tunnel_task = (!opts.tunnel.servers.is_empty()).then(|| {
        let basics = tunnel::NodeBasics {
            node_name: s.node_name.clone(),
            pod_cidr: Some(pod_cidr.into()),
        };
        let args = opts.tunnel.clone();
        tokio::spawn(async move {
            if let Err(e) = tunnel::run(args, basics, tunnel_rx).await {
                tracing::error!("tunnel stopped: {e}");
            }
        })
    });
    let has_tunnel = tunnel_task.is_some();
    let shutdown = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        if has_tunnel {
            // First signal: DRAIN (no new dials, open streams finish); second: exit.
            tracing::info!("draining the tunnel; signal again to stop");
            let _ = tunnel_tx.send(tunnel::Shutdown::Drain);
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        let _ = tunnel_tx.send(tunnel::Shutdown::Exit);
        tracing::info!("shutting down; the datapath stays pinned and attached");
    };
    server::serve(core, listener, shutdown).await?;
    if let Some(t) = tunnel_task
        && tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .is_err()
    {
        tracing::warn!("tunnel did not stop in time");
    }
    let _ = std::fs::remove_file(&s.socket);
    drop(lock);
    Ok(())
}

struct Started {
    core: AgentCore,
    router: Router,
    mtu: u32,
    policy: PolicyState,
}

/// Steps 3-5 of the start-up order (blocking: netlink and bpf syscalls).
fn start_datapath(
    s: &Settings,
    pod_cidr: Ipv4Net,
    node_ip: Option<Ipv4Addr>,
    model: &ClusterModel,
) -> Result<Started> {
    let topo = Topology::discover(s.routing, s.uplink.as_deref(), node_ip)?;
    let mtu = s.mtu.unwrap_or(topo.pod_mtu);
    let dp_cfg = DatapathConfig {
        anti_spoof: 1,
        routing_mode: match s.routing {
            RoutingMode::Native => routing_mode::NATIVE,
            RoutingMode::Vxlan => routing_mode::VXLAN,
        },
        vxlan_ifindex: topo.vxlan.as_ref().map_or(0, |l| l.index),
        uplink_ifindex: topo.uplink.as_ref().map_or(0, |l| l.index),
        node_ip: topo.node_ip.map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
        policy_revision: 0,
        event_flags: if s.monitor_allowed { EVENTS_ALLOWED } else { 0 },
        _pad: 0,
    };
    let ct_max = s.conntrack_max.unwrap_or_else(|| {
        crate::datapath::conntrack_capacity(crate::datapath::node_memory().unwrap_or(8 << 30))
    });
    let mut dp = EbpfDatapath::load(&s.pin_root, &s.state_dir, dp_cfg, s.tc_attach, ct_max)?;
    tracing::info!(conntrack_max = ct_max, "conntrack table sized");
    let mut router = Router::new(topo.clone(), Ipcache::open(&s.pin_root)?)?;
    // Only a synced model is the truth: reconciling an empty one would remove every route.
    let mut remotes = None;
    if model.synced {
        let desired = routing::desired_remotes(&node_routes(model), &s.node_name, Some(pod_cidr));
        let changes = router.reconcile(&desired)?;
        remotes = Some(desired.len() as u32);
        tracing::info!(
            ?changes,
            remotes = desired.len(),
            "routes to remote pods reconciled"
        );
    }
    if let Some(up) = &topo.uplink {
        dp.attach_device(&up.name, DeviceRole::Uplink)?;
    }
    if let Some(vx) = &topo.vxlan {
        dp.attach_device(&vx.name, DeviceRole::Overlay)?;
    }
    // Policy is in force before any filter is re-pointed at new programs (an upgrade that
    // re-created the maps never lets denied traffic through in between).
    let mut policy = PolicyState {
        engine: PolicyEngine::new(&s.node_name),
        reconciler: PolicyReconciler::adopt(PolicyMapsEbpf::open(&s.pin_root)?)?,
        model_revision: None,
        conntrack_max: ct_max,
        last_apply_seconds: 0.0,
    };
    let store = Store::new(&s.state_dir, s.fsync)?;
    if model.synced {
        let endpoints = crate::core::ready_endpoints(store.load()?.endpoints.values());
        let w = policy.apply(model, &endpoints)?;
        tracing::info!(
            writes = w.total(),
            entries = policy.reconciler.applied().policy.len(),
            revision = policy.reconciler.revision(),
            "policy at start: the pinned maps' entries adopted, differences written"
        );
    }
    let pin_root = s.pin_root.clone();
    let core = AgentCore::new(
        CoreConfig {
            node_name: s.node_name.clone(),
            pod_cidr,
            mtu,
        },
        store,
        Box::new(dp),
    )?
    .with_node_networking(NodeNetworking {
        routing_mode: topo.mode.to_string(),
        uplink: topo.uplink.as_ref().map(|l| l.name.clone()),
        node_ip: topo.node_ip,
    });
    if let Some(n) = remotes {
        core.set_remote_pod_cidrs(n);
    }
    if model.synced {
        core.set_policy_status(policy.status());
    }
    // Every filter now points at the current programs and maps.
    crate::datapath::retire_unused_pins(&pin_root)?;
    Ok(Started {
        core,
        router,
        mtu,
        policy,
    })
}

/// The identities-and-policy reconciler's state: the engine (compiled model) and the maps.
pub struct PolicyState {
    pub engine: PolicyEngine,
    pub reconciler: PolicyReconciler<PolicyMapsEbpf>,
    /// The model revision the engine last compiled.
    model_revision: Option<u64>,
    conntrack_max: u32,
    last_apply_seconds: f64,
}

impl PolicyState {
    /// Compiles `model` (when it changed) and writes what differs for `endpoints`.
    pub fn apply(
        &mut self,
        model: &ClusterModel,
        endpoints: &[LocalEndpoint],
    ) -> Result<crate::policy::reconcile::Writes> {
        if self.model_revision != Some(model.revision) {
            self.engine.update(model);
            self.model_revision = Some(model.revision);
        }
        let hosts = host_addresses();
        self.reconciler
            .reconcile(self.engine.compiled(), model, endpoints, &hosts)
    }

    /// What is in force, for `status`.
    pub fn status(&self) -> berth_proto::agent::PolicyStatus {
        let c = self.engine.compiled();
        let a = self.reconciler.applied();
        let rev = self.model_revision.unwrap_or(0);
        berth_proto::agent::PolicyStatus {
            applied_model_revision: rev,
            seen_model_revision: rev,
            revision: self.reconciler.revision(),
            policies: c
                .endpoints
                .values()
                .flat_map(|e| e.ingress.policies.iter().chain(e.egress.policies.iter()))
                .collect::<std::collections::BTreeSet<_>>()
                .len() as u32,
            rejected: c
                .rejected
                .iter()
                .map(|(n, r)| format!("{n}: {r}"))
                .collect(),
            isolated_endpoints: a.states.values().filter(|s| s.flags != 0).count() as u32,
            entries: a.policy.len() as u32,
            identities: c.identities.len() as u32,
            conntrack_max: self.conntrack_max,
            last_apply_seconds: self.last_apply_seconds,
        }
    }
}

/// Every IPv4 address of this node's own stack: traffic from them is the host identity.
fn host_addresses() -> Vec<Ipv4Addr> {
    match berth_netlink::Netlink::new().and_then(|mut nl| nl.all_addresses()) {
        Ok(a) => a.into_iter().map(|(_, ip, _)| ip).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "listing the node's addresses failed");
            Vec::new()
        }
    }
}

/// Applies policy on every model change, every endpoint change, and every 30 s (the node's
/// addresses may change; drift is repaired).
async fn policy_loop(
    mut models: watch::Receiver<Arc<ClusterModel>>,
    core: Arc<AgentCore>,
    policy: Arc<Mutex<PolicyState>>,
    endpoints_changed: Arc<tokio::sync::Notify>,
) {
    loop {
        tokio::select! {
            r = models.changed() => {
                if r.is_err() {
                    tracing::warn!("state source stopped; policy stays as it is");
                    return;
                }
            }
            _ = endpoints_changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        let model = models.borrow_and_update().clone();
        if !model.synced {
            continue;
        }
        core.set_policy_seen_revision(model.revision);
        let core = core.clone();
        let policy = policy.clone();
        let started = Instant::now();
        let res = tokio::task::spawn_blocking(move || {
            let endpoints = core.local_endpoints();
            let mut p = policy.lock().unwrap();
            let w = p.apply(&model, &endpoints)?;
            let mut st = p.status();
            // A newer model may have arrived meanwhile: the loop comes round for it.
            st.seen_model_revision = st.seen_model_revision.max(model.revision);
            if w.total() > 0 {
                st.last_apply_seconds = started.elapsed().as_secs_f64();
                p.last_apply_seconds = st.last_apply_seconds;
            } else {
                st.last_apply_seconds = p.last_apply_seconds;
            }
            core.set_policy_status(st);
            Ok::<_, Error>((w, p.reconciler.revision(), model.revision))
        })
        .await;
        match res {
            Ok(Ok((w, _, _))) if w.total() == 0 => {}
            Ok(Ok((w, revision, model_revision))) => tracing::info!(
                policy_added = w.policy_added,
                policy_removed = w.policy_removed,
                cidr = w.cidr_written + w.cidr_removed,
                states = w.states_written + w.states_removed,
                ipcache = w.ipcache_written + w.ipcache_removed,
                revision,
                model_revision,
                elapsed = ?started.elapsed(),
                "policy applied"
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "applying policy failed; retrying at the next change or in 30 s")
            }
            Err(e) => tracing::warn!(error = %e, "policy task failed"),
        }
    }
}

/// Reconciles routes and tunnels on every model change, and every 30 s against drift.
async fn routing_loop(
    mut models: watch::Receiver<Arc<ClusterModel>>,
    router: Arc<Mutex<Router>>,
    core: Arc<AgentCore>,
    node_name: String,
    pod_cidr: Ipv4Net,
) {
    let mut applied_revision = models.borrow().revision;
    // The model changes with every pod of the cluster; routing only cares about nodes.
    let mut last_desired: Option<BTreeMap<Ipv4Net, routing::Remote>> = None;
    let mut last_ok = false;
    loop {
        let changed = tokio::select! {
            r = models.changed() => {
                if r.is_err() {
                    tracing::warn!("state source stopped; routes stay as they are");
                    return;
                }
                true
            }
            _ = tokio::time::sleep(Duration::from_secs(30)) => false,
        };
        let model = models.borrow_and_update().clone();
        if (changed && model.revision == applied_revision) || !model.synced {
            continue;
        }
        applied_revision = model.revision;
        let desired = routing::desired_remotes(&node_routes(&model), &node_name, Some(pod_cidr));
        if changed && last_ok && last_desired.as_ref() == Some(&desired) {
            continue;
        }
        last_desired = Some(desired.clone());
        let remotes = desired.len() as u32;
        let router = router.clone();
        let started = Instant::now();
        let res =
            tokio::task::spawn_blocking(move || router.lock().unwrap().reconcile(&desired)).await;
        last_ok = matches!(res, Ok(Ok(_)));
        if last_ok {
            core.set_remote_pod_cidrs(remotes);
        }
        match res {
            Ok(Ok(ch)) if ch.is_empty() => {}
            Ok(Ok(ch)) => tracing::info!(
                added = ch.added,
                updated = ch.updated,
                removed = ch.removed,
                revision = model.revision,
                elapsed = ?started.elapsed(),
                "routing reconciled"
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "routing reconcile failed; retrying at the next change or in 30 s")
            }
            Err(e) => tracing::warn!(error = %e, "routing task failed"),
        }
    }
}

async fn housekeeping_loop(
    core: Arc<AgentCore>,
    queue_dir: std::path::PathBuf,
    (pin_root, state_dir): (std::path::PathBuf, std::path::PathBuf),
    every: Duration,
    lease: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let c = core.clone();
        let d = queue_dir.clone();
        let (p, s) = (pin_root.clone(), state_dir.clone());
        // Queued DELs, endpoints whose pod vanished without one, allocations that never became
        // endpoints, pins of TCX links whose interface is gone.
        let work = move || -> Result<(u64, u64, u64, usize)> {
            Ok((
                c.drain_delete_queue(&d)?,
                c.sweep_vanished()?,
                c.reclaim_stale_allocations(lease)?,
                crate::datapath::prune_link_pins(&p, &s)?.len(),
            ))
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(Ok((0, 0, 0, 0))) => {}
            Ok(Ok((drained, swept, reclaimed, pruned_link_pins))) => {
                tracing::info!(drained, swept, reclaimed, pruned_link_pins, "housekeeping")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "housekeeping failed"),
            Err(e) => tracing::warn!(error = %e, "housekeeping task failed"),
        }
    }
}
