//! The agent's request handling: IPAM, the endpoint registry and datapath programming, behind one
//! lock. Plain synchronous code; the servers in [`crate::server`] call into it.
use crate::{
    datapath::Datapath,
    error::{Error, Result},
    ipam,
    store::{self, EndpointRecord, EndpointState, State, Store},
};
use berth_ebpf_common::{EP_FLAG_READY, EndpointInfo};
use berth_proto::agent::{
    self as pb, AddEndpointRequest, AddEndpointResponse, AllocateRequest, AllocateResponse,
    Attachment, CheckRequest, CheckResponse, CreateEndpointRequest, CreateEndpointResponse,
    GcRequest, GcResponse, LocalError, LocalRequest, LocalResponse, ReleaseRequest,
    ReleaseResponse, StatusResponse, local_request::Op, local_response,
};
use ipnet::Ipv4Net;
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// How long an address may stay allocated without its endpoint becoming ready before
/// [`AgentCore::reclaim_stale_allocations`] takes it back. An ADD takes milliseconds, so only an
/// ADD whose plugin died between Allocate and CreateEndpoint (and whose runtime neither retried,
/// nor sent DEL or GC) is still allocated after this long.
pub const DEFAULT_ALLOCATION_LEASE: Duration = Duration::from_secs(60);

/// Settings the core needs.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub node_name: String,
    pub pod_cidr: Ipv4Net,
    pub mtu: u32,
}

/// Deletes a host-side interface `(name, ifindex)` in the background.
pub type LinkDeleter = Box<dyn Fn(String, u32) + Send + Sync>;

/// How the node reaches other nodes' pods, for `berthctl status` (set once the topology is
/// known: [`AgentCore::with_node_networking`]; the routed remote count moves with the routing
/// loop: [`AgentCore::set_remote_pod_cidrs`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeNetworking {
    /// `"native"` or `"vxlan"` (the `RoutingMode`'s display form).
    pub routing_mode: String,
    /// Name of the uplink interface; `None` on a node without one.
    pub uplink: Option<String>,
    pub node_ip: Option<Ipv4Addr>,
}

struct Inner {
    state: State,
    /// Bumped by every change that must be durable.
    version: u64,
    dp: Box<dyn Datapath>,
    queue_drained: u64,
    /// When each `Allocated` (not yet ready) endpoint was allocated, by store key: monotonic and
    /// in memory only (entries loaded from disk count from start-up).
    allocated_at: HashMap<String, Instant>,
}

/// The state file and the last version written to it (group commit: one write covers every
/// change made while the previous write was in progress).
struct Persist {
    store: Store,
    persisted: u64,
}

/// Told that the endpoint registry changed; must return at once (it runs on the request path).
pub type EndpointObserver = Box<dyn Fn() + Send + Sync>;

/// The agent's state and logic.
pub struct AgentCore {
    cfg: CoreConfig,
    networking: NodeNetworking,
    remote_pod_cidrs: AtomicU32,
    link_deleter: Option<LinkDeleter>,
    /// Called after the registry changed (an endpoint became ready or went away): the policy
    /// reconciler then joins the new endpoint to its pod's policy.
    endpoint_observer: Option<EndpointObserver>,
    /// Set by the policy reconciler after each pass.
    policy_status: Mutex<pb::PolicyStatus>,
    inner: Mutex<Inner>,
    persist: Mutex<Persist>,
    started: Instant,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The ready endpoints among `records`, as the policy reconciler joins them to pods.
pub fn ready_endpoints<'a>(
    records: impl Iterator<Item = &'a EndpointRecord>,
) -> Vec<crate::policy::reconcile::LocalEndpoint> {
    records
        .filter(|e| e.state == EndpointState::Ready)
        .map(|e| crate::policy::reconcile::LocalEndpoint {
            id: e.id,
            namespace: e.pod_namespace.clone(),
            name: e.pod_name.clone(),
            uid: e.pod_uid.clone(),
            address: e.address,
        })
        .collect()
}

/// The requested address of an Allocate/AddEndpoint request (empty: none).
fn parse_requested(s: &str) -> Result<Option<Ipv4Addr>> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        Error::InvalidArgument(format!("requested address {s:?} is not an IPv4 address"))
    })
}

fn attachment_of(a: &Option<Attachment>) -> Result<(String, String)> {
    let a = a
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("attachment is missing".into()))?;
    if a.container_id.is_empty() || a.ifname.is_empty() {
        return Err(Error::InvalidArgument(
            "attachment needs container_id and ifname".into(),
        ));
    }
    Ok((a.container_id.clone(), a.ifname.clone()))
}

fn mac6(v: &[u8], what: &str) -> Result<[u8; 6]> {
    v.try_into()
        .map_err(|_| Error::InvalidArgument(format!("{what} must be 6 bytes, got {}", v.len())))
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The host side of a plumbed attachment, as the plugin reports it.
struct Plumbed {
    host_ifindex: u32,
    host_ifname: String,
    pod_mac: [u8; 6],
    host_mac: [u8; 6],
    netns: String,
}

impl Plumbed {
    fn check(
        host_ifindex: u32,
        host_ifname: String,
        pod_mac: &[u8],
        host_mac: &[u8],
        netns: String,
    ) -> Result<Self> {
        if host_ifindex == 0 || host_ifname.is_empty() {
            return Err(Error::InvalidArgument(
                "host_ifindex and host_ifname are required".into(),
            ));
        }
        Ok(Plumbed {
            host_ifindex,
            host_ifname,
            pod_mac: mac6(pod_mac, "pod_mac")?,
            host_mac: mac6(host_mac, "host_mac")?,
            netns,
        })
    }
}

impl AgentCore {
    /// Loads the persisted state and reconciles the datapath with it.
    pub fn new(cfg: CoreConfig, store: Store, dp: Box<dyn Datapath>) -> Result<Self> {
        ipam::validate_pod_cidr(&cfg.pod_cidr)?;
        let mut state = store.load()?;
        if state.next_endpoint_id == 0 {
            state.next_endpoint_id = 1;
        }
        let cidr = cfg.pod_cidr.to_string();
        if !state.pod_cidr.is_empty() && state.pod_cidr != cidr {
            check_pod_cidr_change(&state, &cfg.pod_cidr)?;
        }
        // A changed CIDR is recorded at once (the reconcile below commits).
        let version = u64::from(state.pod_cidr != cidr);
        state.pod_cidr = cidr;
        let started = Instant::now();
        let allocated_at = state
            .endpoints
            .iter()
            .filter(|(_, e)| e.state == EndpointState::Allocated)
            .map(|(k, _)| (k.clone(), started))
            .collect();
        let core = AgentCore {
            cfg,
            networking: NodeNetworking::default(),
            remote_pod_cidrs: AtomicU32::new(0),
            link_deleter: None,
            endpoint_observer: None,
            policy_status: Mutex::new(pb::PolicyStatus::default()),
            inner: Mutex::new(Inner {
                state,
                version,
                dp,
                queue_drained: 0,
                allocated_at,
            }),
            persist: Mutex::new(Persist {
                store,
                persisted: 0,
            }),
            started,
        };
        core.reconcile()?;
        Ok(core)
    }

    /// Lets DEL hand the host-side interface's deletion to the agent: the kernel's veth teardown
    /// (an RCU grace period, tens of milliseconds) then happens off the runtime's critical path.
    pub fn with_link_deleter(mut self, deleter: LinkDeleter) -> Self {
        self.link_deleter = Some(deleter);
        self
    }

    /// Calls `observer` after every change of the registry (see [`EndpointObserver`]).
    pub fn with_endpoint_observer(mut self, observer: EndpointObserver) -> Self {
        self.endpoint_observer = Some(observer);
        self
    }

    /// Records what the policy reconciler has in force (shown by `status`).
    pub fn set_policy_status(&self, status: pb::PolicyStatus) {
        *self.policy_status.lock().unwrap() = status;
    }

    /// Records the newest model revision the policy reconciler has seen.
    pub fn set_policy_seen_revision(&self, revision: u64) {
        self.policy_status.lock().unwrap().seen_model_revision = revision;
    }

    fn endpoints_changed(&self) {
        if let Some(o) = &self.endpoint_observer {
            o();
        }
    }

    /// The ready endpoints, as the policy reconciler joins them to pods.
    pub fn local_endpoints(&self) -> Vec<crate::policy::reconcile::LocalEndpoint> {
        let g = self.inner.lock().unwrap();
        ready_endpoints(g.state.endpoints.values())
    }

    /// Records how the node routes to other nodes' pods (shown by `status`).
    pub fn with_node_networking(mut self, networking: NodeNetworking) -> Self {
        self.networking = networking;
        self
    }

    /// Records how many other nodes' pod CIDRs are routed now (after each routing reconcile).
    pub fn set_remote_pod_cidrs(&self, count: u32) {
        self.remote_pod_cidrs.store(count, Ordering::Relaxed);
    }

    /// Makes the datapath match the registry: endpoint entries for every ready endpoint whose
    /// interface still exists, and (after a program upgrade) filters re-pointed at new programs.
    fn reconcile(&self) -> Result<()> {
        let mut g = self.inner.lock().unwrap();
        let inner = &mut *g;
        let reattach = inner.dp.needs_reattach();
        let mut programmed = 0;
        for ep in inner.state.endpoints.values() {
            if ep.state != EndpointState::Ready
                || !inner.dp.link_present(&ep.host_ifname, ep.host_ifindex)
            {
                continue; // released by the sweep below
            }
            // The entry first: freshly created maps must be populated before new programs see
            // the pod's traffic (the anti-spoofing check looks the source up in it).
            inner.dp.upsert_endpoint(ep.address, endpoint_info(ep))?;
            if reattach {
                inner.dp.attach(&ep.host_ifname)?;
            }
            programmed += 1;
        }
        tracing::info!(
            endpoints = inner.state.endpoints.len(),
            programmed,
            reattached = reattach,
            "registry reconciled with datapath"
        );
        drop(g);
        self.sweep_vanished()?;
        Ok(())
    }

    /// Releases ready endpoints whose host-side interface is gone: the runtime destroyed the pod's
    /// network namespace without a DEL (or before it; CNI < 1.1 runtimes never send GC). Returns
    /// how many were released.
    pub fn sweep_vanished(&self) -> Result<u64> {
        let mut g = self.inner.lock().unwrap();
        let gone: Vec<(String, String)> = g
            .state
            .endpoints
            .values()
            .filter(|e| {
                e.state == EndpointState::Ready
                    && !g.dp.link_present(&e.host_ifname, e.host_ifindex)
            })
            .map(|e| (e.container_id.clone(), e.ifname.clone()))
            .collect();
        let mut released = 0;
        for (cid, ifname) in gone {
            if Self::release_locked(&mut g, &cid, &ifname)?.is_some() {
                tracing::info!(container = %cid, ifname = %ifname, "pod interface vanished without DEL; endpoint released");
                released += 1;
            }
        }
        drop(g);
        self.commit()?;
        Ok(released)
    }

    /// Releases addresses allocated more than `lease` ago whose endpoint never became ready: the
    /// plugin died between Allocate and CreateEndpoint and the runtime sent neither DEL nor GC
    /// (CNI < 1.1 runtimes never send GC). A CreateEndpoint that comes after all fails with
    /// NotFound, so that plugin rolls back and the runtime retries. `lease` must be far longer
    /// than any ADD ([`DEFAULT_ALLOCATION_LEASE`]). Returns how many were released.
    pub fn reclaim_stale_allocations(&self, lease: Duration) -> Result<u64> {
        let mut g = self.inner.lock().unwrap();
        let inner = &mut *g;
        let now = Instant::now();
        let mut stale = Vec::new();
        for (k, e) in &inner.state.endpoints {
            if e.state != EndpointState::Allocated {
                continue;
            }
            let since = *inner.allocated_at.entry(k.clone()).or_insert(now);
            if now.duration_since(since) >= lease {
                stale.push((e.container_id.clone(), e.ifname.clone(), since));
            }
        }
        let mut released = 0;
        for (cid, ifname, since) in stale {
            if let Some(ep) = Self::release_locked(inner, &cid, &ifname)? {
                tracing::info!(container = %cid, ifname = %ifname, address = %ep.address, age = ?now.duration_since(since), "allocation never became an endpoint; lease expired, address reclaimed");
                released += 1;
            }
        }
        drop(g);
        self.commit()?;
        Ok(released)
    }

    /// Makes every change made so far durable. Must be called without holding `inner`. When
    /// several requests commit at once, the first writes the latest state and the others find
    /// their change already on disk.
    fn commit(&self) -> Result<()> {
        let mut p = self.persist.lock().unwrap();
        let (version, state) = {
            let g = self.inner.lock().unwrap();
            if g.version <= p.persisted {
                return Ok(());
            }
            (g.version, g.state.clone())
        };
        p.store.save(&state)?;
        p.persisted = version;
        drop(p);
        self.endpoints_changed();
        Ok(())
    }

    /// Allocates (or returns the existing) address for an attachment.
    pub fn allocate(&self, req: AllocateRequest) -> Result<AllocateResponse> {
        let (cid, ifname) = attachment_of(&req.attachment)?;
        let mut g = self.inner.lock().unwrap();
        let requested = parse_requested(&req.requested_address)?;
        let (address, _) =
            self.allocate_locked(&mut g, &cid, &ifname, req.pod, req.netns, requested)?;
        Ok(AllocateResponse {
            address: format!("{address}/32"),
            gateway: ipam::GATEWAY.to_string(),
            mtu: self.cfg.mtu,
            pod_cidr: self.cfg.pod_cidr.to_string(),
        })
    }

    /// The address of `cid/ifname`, allocated now unless it has one; `true` when new.
    fn allocate_locked(
        &self,
        inner: &mut Inner,
        cid: &str,
        ifname: &str,
        pod: Option<pb::PodRef>,
        netns: String,
        requested: Option<Ipv4Addr>,
    ) -> Result<(Ipv4Addr, bool)> {
        let k = store::key(cid, ifname);
        if let Some(ep) = inner.state.endpoints.get(&k) {
            if let Some(r) = requested
                && r != ep.address
            {
                return Err(Error::InvalidArgument(format!(
                    "{cid}/{ifname} already has {} (requested {r})",
                    ep.address
                )));
            }
            if ep.state == EndpointState::Allocated {
                // A retried ADD: its lease starts again.
                inner.allocated_at.insert(k.clone(), Instant::now());
            }
            return Ok((ep.address, false));
        }
        let used: BTreeSet<Ipv4Addr> = inner.state.endpoints.values().map(|e| e.address).collect();
        let ip = match requested {
            Some(r) => {
                ipam::check_requested(&self.cfg.pod_cidr, &used, r)?;
                r
            }
            None => ipam::next_free(&self.cfg.pod_cidr, &used, inner.state.last_allocated)?,
        };
        let pod = pod.unwrap_or_default();
        let id = inner.state.next_endpoint_id;
        inner.state.next_endpoint_id = id.checked_add(1).unwrap_or(1);
        inner.state.last_allocated = Some(ip);
        inner.allocated_at.insert(k.clone(), Instant::now());
        inner.state.endpoints.insert(
            k,
            EndpointRecord {
                id,
                container_id: cid.to_string(),
                ifname: ifname.to_string(),
                pod_namespace: pod.namespace,
                pod_name: pod.name,
                pod_uid: pod.uid,
                address: ip,
                netns,
                state: EndpointState::Allocated,
                host_ifname: String::new(),
                host_ifindex: 0,
                pod_mac: [0; 6],
                host_mac: [0; 6],
                created_unix: now_unix(),
            },
        );
        // Not persisted yet: an allocation only matters once the endpoint is ready (then it is
        // saved). If the agent dies in between, the plugin's CreateEndpoint fails, the ADD is
        // rolled back and retried, and no pod ever used the address.
        tracing::info!(container = %cid, ifname = %ifname, address = %ip, endpoint = id, "address allocated");
        Ok((ip, true))
    }

    /// Programs the datapath for a plumbed attachment.
    pub fn create_endpoint(&self, req: CreateEndpointRequest) -> Result<CreateEndpointResponse> {
        let (cid, ifname) = attachment_of(&req.attachment)?;
        let plumbed = Plumbed::check(
            req.host_ifindex,
            req.host_ifname,
            &req.pod_mac,
            &req.host_mac,
            req.netns,
        )?;
        let mut g = self.inner.lock().unwrap();
        if !g.state.endpoints.contains_key(&store::key(&cid, &ifname)) {
            return Err(Error::NotFound(format!(
                "no address allocated for {cid}/{ifname} (never allocated, released, or its \
                 allocation lease expired); Allocate first"
            )));
        }
        let id = Self::ready_locked(&mut g, &cid, &ifname, plumbed)?;
        drop(g);
        self.commit()?;
        Ok(CreateEndpointResponse { endpoint_id: id })
    }

    /// Allocate and CreateEndpoint at once, for a plugin that created the veth pair first. On
    /// failure an address allocated by this call is released again (nothing is left behind that
    /// would wait for the allocation lease).
    ///
    /// The state file is written while the filters attach (both take milliseconds) when no other
    /// write is in progress (else it is a group commit afterwards, as for every other change): the
    /// write already records the endpoint as ready. Should the attach fail, the change is undone and
    /// written again; should the agent die in between, the plugin's ADD fails and deletes the
    /// pair, and the restarted agent releases the endpoint whose interface vanished.
    pub fn add_endpoint(&self, req: AddEndpointRequest) -> Result<AddEndpointResponse> {
        let (cid, ifname) = attachment_of(&req.attachment)?;
        let plumbed = Plumbed::check(
            req.host_ifindex,
            req.host_ifname,
            &req.pod_mac,
            &req.host_mac,
            req.netns.clone(),
        )?;
        let k = store::key(&cid, &ifname);
        let mut g = self.inner.lock().unwrap();
        let requested = parse_requested(&req.requested_address)?;
        let (address, new) =
            self.allocate_locked(&mut g, &cid, &ifname, req.pod, req.netns, requested)?;
        let before = g.state.endpoints.get(&k).cloned().expect("just allocated");
        let ep = match Self::prepare_ready_locked(&mut g, &k, plumbed) {
            Ok(ep) => ep,
            Err(e) => {
                if new {
                    let _ = Self::release_locked(&mut g, &cid, &ifname);
                }
                return Err(e);
            }
        };
        let snapshot = (g.version, g.state.clone());
        let (attached, saved) = std::thread::scope(|s| {
            let saving = s.spawn(|| self.try_save_snapshot(snapshot.0, &snapshot.1));
            let attached = g.dp.attach(&ep.host_ifname);
            if let Err(e) = &attached {
                // Undo: no entry, and the record as it was (or none).
                if let Err(e2) = g.dp.remove_endpoint(ep.address, ep.id) {
                    tracing::warn!(address = %ep.address, error = %e2, "removing the endpoint entry after a failed attach");
                }
                if new {
                    if let Err(e2) = Self::release_locked(&mut g, &cid, &ifname) {
                        tracing::warn!(container = %cid, ifname = %ifname, error = %e2, "releasing the address of a failed AddEndpoint");
                    }
                } else {
                    if before.state == EndpointState::Allocated {
                        g.allocated_at.insert(k.clone(), Instant::now());
                    }
                    g.state.endpoints.insert(k.clone(), before);
                    g.version += 1;
                }
                tracing::warn!(container = %cid, ifname = %ifname, error = %e, "AddEndpoint: attach failed");
            }
            // Not held while the write finishes: a concurrent commit may hold the state file and
            // wait for this lock.
            drop(g);
            (attached, saving.join().expect("state writer"))
        });
        match attached {
            Ok(()) => {
                if !saved? {
                    self.commit()?;
                } else {
                    self.endpoints_changed();
                }
                tracing::info!(container = %cid, ifname = %ifname, endpoint = ep.id, host_if = %ep.host_ifname, address = %ep.address, "endpoint ready");
            }
            Err(e) => {
                if let Err(e2) = self.commit() {
                    tracing::warn!(error = %e2, "saving state after a failed AddEndpoint");
                }
                return Err(e);
            }
        }
        Ok(AddEndpointResponse {
            address: format!("{address}/32"),
            gateway: ipam::GATEWAY.to_string(),
            mtu: self.cfg.mtu,
            pod_cidr: self.cfg.pod_cidr.to_string(),
            endpoint_id: ep.id,
        })
    }

    /// Records endpoint `k` as ready on `plumbed` and writes its entry (not the filters).
    fn prepare_ready_locked(
        inner: &mut Inner,
        k: &str,
        plumbed: Plumbed,
    ) -> Result<EndpointRecord> {
        let mut ep = Self::plumbed_record(inner, k, plumbed)?;
        // The entry before the programs: the pod's first packet already finds its endpoint.
        inner.dp.upsert_endpoint(ep.address, endpoint_info(&ep))?;
        ep.state = EndpointState::Ready;
        inner.allocated_at.remove(k);
        inner.state.endpoints.insert(k.to_string(), ep.clone());
        inner.version += 1;
        Ok(ep)
    }

    /// Writes `state` (as of `version`) unless a write that includes it already happened; `false`
    /// when another write is in progress: then the caller commits afterwards, so that concurrent
    /// requests keep sharing writes (group commit) instead of writing one snapshot each.
    fn try_save_snapshot(&self, version: u64, state: &State) -> Result<bool> {
        let mut p = match self.persist.try_lock() {
            Ok(p) => p,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        };
        if version <= p.persisted {
            return Ok(true);
        }
        p.store.save(state)?;
        p.persisted = version;
        Ok(true)
    }

    /// The registry record of the allocated (or ready) endpoint `k`, updated with where the
    /// plugin plumbed it (not stored yet).
    fn plumbed_record(inner: &Inner, k: &str, plumbed: Plumbed) -> Result<EndpointRecord> {
        let mut ep = inner
            .state
            .endpoints
            .get(k)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no address allocated for {k}")))?;
        ep.host_ifname = plumbed.host_ifname;
        ep.host_ifindex = plumbed.host_ifindex;
        ep.pod_mac = plumbed.pod_mac;
        ep.host_mac = plumbed.host_mac;
        if !plumbed.netns.is_empty() {
            ep.netns = plumbed.netns;
        }
        Ok(ep)
    }

    /// Makes the allocated (or ready) endpoint `cid/ifname` ready on `plumbed`: entry, then
    /// filters. The caller commits.
    fn ready_locked(inner: &mut Inner, cid: &str, ifname: &str, plumbed: Plumbed) -> Result<u32> {
        let k = store::key(cid, ifname);
        let mut ep = Self::plumbed_record(inner, &k, plumbed)?;
        // The entry before the programs: the pod's first packet already finds its endpoint.
        inner.dp.upsert_endpoint(ep.address, endpoint_info(&ep))?;
        if let Err(e) = inner.dp.attach(&ep.host_ifname) {
            if let Err(e2) = inner.dp.remove_endpoint(ep.address, ep.id) {
                tracing::warn!(address = %ep.address, error = %e2, "removing the endpoint entry after a failed attach");
            }
            return Err(e);
        }
        ep.state = EndpointState::Ready;
        inner.allocated_at.remove(&k);
        let id = ep.id;
        tracing::info!(container = %cid, ifname = %ifname, endpoint = id, host_if = %ep.host_ifname, address = %ep.address, "endpoint ready");
        inner.state.endpoints.insert(k, ep);
        inner.version += 1;
        Ok(id)
    }

    fn release_locked(
        inner: &mut Inner,
        cid: &str,
        ifname: &str,
    ) -> Result<Option<EndpointRecord>> {
        let k = store::key(cid, ifname);
        let Some(ep) = inner.state.endpoints.get(&k).cloned() else {
            return Ok(None);
        };
        inner.dp.remove_endpoint(ep.address, ep.id)?;
        inner.state.endpoints.remove(&k);
        inner.allocated_at.remove(&k);
        inner.version += 1;
        tracing::info!(container = %cid, ifname = %ifname, endpoint = ep.id, address = %ep.address, "endpoint released");
        Ok(Some(ep))
    }

    /// Releases an attachment's address and endpoint (idempotent).
    pub fn release(&self, req: ReleaseRequest) -> Result<ReleaseResponse> {
        let (cid, ifname) = attachment_of(&req.attachment)?;
        let mut g = self.inner.lock().unwrap();
        let ep = Self::release_locked(&mut g, &cid, &ifname)?;
        drop(g);
        self.commit()?;
        let link_deletion_queued = match (&ep, &self.link_deleter) {
            (Some(ep), Some(delete))
                if ep.state == EndpointState::Ready && ep.host_ifindex != 0 =>
            {
                delete(ep.host_ifname.clone(), ep.host_ifindex);
                true
            }
            _ => false,
        };
        Ok(ReleaseResponse {
            released: ep.is_some(),
            link_deletion_queued,
        })
    }

    /// The endpoint of an attachment (CHECK).
    pub fn check(&self, req: CheckRequest) -> Result<CheckResponse> {
        let (cid, ifname) = attachment_of(&req.attachment)?;
        let g = self.inner.lock().unwrap();
        let ep = g
            .state
            .endpoints
            .get(&store::key(&cid, &ifname))
            .ok_or_else(|| Error::NotFound(format!("no endpoint for {cid}/{ifname}")))?;
        Ok(CheckResponse {
            endpoint: Some(self.to_proto(&*g.dp, ep)),
        })
    }

    /// Releases every attachment not in `valid`.
    pub fn gc(&self, req: GcRequest) -> Result<GcResponse> {
        let valid: HashSet<(String, String)> = req
            .valid
            .into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect();
        let mut g = self.inner.lock().unwrap();
        let stale: Vec<(String, String)> = g
            .state
            .endpoints
            .values()
            .map(|e| (e.container_id.clone(), e.ifname.clone()))
            .filter(|k| !valid.contains(k))
            .collect();
        let mut released = Vec::new();
        let mut first_err = None;
        for (cid, ifname) in stale {
            match Self::release_locked(&mut g, &cid, &ifname) {
                Ok(_) => released.push(Attachment {
                    container_id: cid,
                    ifname,
                }),
                Err(e) => {
                    tracing::warn!(container = %cid, ifname = %ifname, error = %e, "GC: release failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        drop(g);
        self.commit()?;
        tracing::info!(released = released.len(), kept = valid.len(), "GC done");
        match first_err {
            Some(e) if released.is_empty() => Err(e),
            _ => Ok(GcResponse { released }),
        }
    }

    /// Applies the CNI plugin's delete queue (DELs made while the agent was down).
    pub fn drain_delete_queue(&self, cni_state_dir: &Path) -> Result<u64> {
        let dir = cni_state_dir.join("delete-queue");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
        };
        let mut drained = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            let pair = parsed.as_ref().and_then(|v| {
                Some((
                    v.get("containerID")?.as_str()?.to_string(),
                    v.get("ifname")?.as_str()?.to_string(),
                ))
            });
            match pair {
                Some((cid, ifname)) => {
                    let mut g = self.inner.lock().unwrap();
                    let released = Self::release_locked(&mut g, &cid, &ifname)?.is_some();
                    drop(g);
                    // Durable before the queue entry goes.
                    self.commit()?;
                    tracing::info!(container = %cid, ifname = %ifname, released, "delete queue entry applied");
                }
                None => {
                    tracing::warn!(file = %path.display(), "unreadable delete queue entry dropped")
                }
            }
            std::fs::remove_file(&path)
                .map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
            drained += 1;
        }
        self.inner.lock().unwrap().queue_drained += drained;
        Ok(drained)
    }

    /// Agent status.
    pub fn status(&self) -> StatusResponse {
        let g = self.inner.lock().unwrap();
        let info = g.dp.info();
        StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            node_name: self.cfg.node_name.clone(),
            datapath: Some(pb::DatapathStatus {
                loaded: info.loaded,
                pin_root: info.pin_root,
                programs: info.programs,
                maps: info.maps,
                adopted: info.adopted,
            }),
            ipam: Some(pb::IpamStatus {
                pod_cidr: self.cfg.pod_cidr.to_string(),
                capacity: ipam::capacity(&self.cfg.pod_cidr),
                allocated: g.state.endpoints.len() as u32,
            }),
            endpoints: g.state.endpoints.len() as u32,
            uptime_seconds: self.started.elapsed().as_secs(),
            delete_queue_drained: g.queue_drained,
            routing: Some(pb::RoutingStatus {
                mode: self.networking.routing_mode.clone(),
                uplink: self.networking.uplink.clone().unwrap_or_default(),
                node_ip: self
                    .networking
                    .node_ip
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                pod_mtu: self.cfg.mtu,
                remote_pod_cidrs: self.remote_pod_cidrs.load(Ordering::Relaxed),
            }),
            policy: Some({
                let p = self.policy_status.lock().unwrap();
                p.clone()
            }),
        }
    }

    /// Every endpoint with its counters.
    pub fn list_endpoints(&self) -> Vec<pb::Endpoint> {
        let g = self.inner.lock().unwrap();
        g.state
            .endpoints
            .values()
            .map(|e| self.to_proto(&*g.dp, e))
            .collect()
    }

    fn to_proto(&self, dp: &dyn Datapath, e: &EndpointRecord) -> pb::Endpoint {
        let s = dp.stats(e.id);
        pb::Endpoint {
            id: e.id,
            attachment: Some(Attachment {
                container_id: e.container_id.clone(),
                ifname: e.ifname.clone(),
            }),
            pod: Some(pb::PodRef {
                namespace: e.pod_namespace.clone(),
                name: e.pod_name.clone(),
                uid: e.pod_uid.clone(),
                infra_container_id: String::new(),
            }),
            address: format!("{}/32", e.address),
            host_ifname: e.host_ifname.clone(),
            host_ifindex: e.host_ifindex,
            pod_mac: fmt_mac(&e.pod_mac),
            host_mac: fmt_mac(&e.host_mac),
            netns: e.netns.clone(),
            state: match e.state {
                EndpointState::Allocated => "allocated",
                EndpointState::Ready => "ready",
            }
            .to_string(),
            stats: Some(pb::EndpointStats {
                tx_packets: s.tx_packets,
                tx_bytes: s.tx_bytes,
                rx_packets: s.rx_packets,
                rx_bytes: s.rx_bytes,
                drops: s.drops.into_iter().collect(),
            }),
            created_unix: e.created_unix,
        }
    }

    /// Serves one request of the framed local protocol.
    pub fn handle_local(&self, req: LocalRequest) -> LocalResponse {
        use local_response::Result as R;
        let result = match req.op {
            None => Err(Error::InvalidArgument("empty request".into())),
            Some(Op::Status(_)) => Ok(R::Status(self.status())),
            Some(Op::Allocate(r)) => self.allocate(r).map(R::Allocate),
            Some(Op::CreateEndpoint(r)) => self.create_endpoint(r).map(R::CreateEndpoint),
            Some(Op::Release(r)) => self.release(r).map(R::Release),
            Some(Op::Check(r)) => self.check(r).map(R::Check),
            Some(Op::Gc(r)) => self.gc(r).map(R::Gc),
            Some(Op::AddEndpoint(r)) => self.add_endpoint(r).map(R::AddEndpoint),
        };
        let result = result.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "local request failed");
            R::Error(LocalError {
                code: e.local_code() as i32,
                message: e.to_string(),
            })
        });
        LocalResponse {
            result: Some(result),
        }
    }
}

/// A pod CIDR different from the stored one is accepted only when every endpoint's address is
/// one the new CIDR could have handed out: Berth never renumbers pods.
fn check_pod_cidr_change(state: &State, new: &Ipv4Net) -> Result<()> {
    let outside: Vec<&EndpointRecord> = state
        .endpoints
        .values()
        .filter(|e| !ipam::is_assignable(new, e.address))
        .collect();
    let Some(first) = outside.first() else {
        tracing::info!(old = %state.pod_cidr, new = %new, endpoints = state.endpoints.len(), "pod CIDR changed; every endpoint address is inside the new one");
        return Ok(());
    };
    Err(Error::Config(format!(
        "pod CIDR changed from {old} to {new}, but {n} of {total} endpoints hold addresses outside \
         {new} (e.g. {addr} of pod {ns}/{pod}, container {cid}); Berth never renumbers pods: \
         drain the node and delete those pods first, or keep --pod-cidr {old}",
        old = state.pod_cidr,
        n = outside.len(),
        total = state.endpoints.len(),
        addr = first.address,
        ns = first.pod_namespace,
        pod = first.pod_name,
        cid = first.container_id,
    )))
}

fn endpoint_info(ep: &EndpointRecord) -> EndpointInfo {
    EndpointInfo {
        ifindex: ep.host_ifindex,
        endpoint_id: ep.id,
        flags: EP_FLAG_READY,
        pod_mac: ep.pod_mac,
        host_mac: ep.host_mac,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{Info, Stats};
    use std::{collections::BTreeMap, sync::Arc};

    #[derive(Default)]
    struct FakeState {
        entries: BTreeMap<Ipv4Addr, EndpointInfo>,
        attached: Vec<String>,
        vanished: Vec<String>,
        /// Datapath calls in order: `upsert <ip>`, `remove <ip>`, `attach <ifname>`.
        ops: Vec<String>,
        /// Programs freshly loaded (an upgrade): reconcile re-attaches every endpoint.
        reattach: bool,
        fail_attach: bool,
    }
    struct Fake(Arc<Mutex<FakeState>>);
    impl Datapath for Fake {
        fn upsert_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<()> {
            let mut f = self.0.lock().unwrap();
            f.ops.push(format!("upsert {ip}"));
            f.entries.insert(ip, info);
            Ok(())
        }
        fn remove_endpoint(&mut self, ip: Ipv4Addr, _: u32) -> Result<()> {
            let mut f = self.0.lock().unwrap();
            f.ops.push(format!("remove {ip}"));
            f.entries.remove(&ip);
            Ok(())
        }
        fn attach(&mut self, ifname: &str) -> Result<()> {
            let mut f = self.0.lock().unwrap();
            if f.fail_attach {
                return Err(Error::Datapath(format!(
                    "attach {ifname}: injected failure"
                )));
            }
            f.ops.push(format!("attach {ifname}"));
            f.attached.push(ifname.into());
            Ok(())
        }
        fn stats(&self, _: u32) -> Stats {
            Stats::default()
        }
        fn info(&self) -> Info {
            Info {
                loaded: true,
                ..Info::default()
            }
        }
        fn needs_reattach(&self) -> bool {
            self.0.lock().unwrap().reattach
        }
        fn link_present(&self, ifname: &str, _: u32) -> bool {
            !self.0.lock().unwrap().vanished.iter().any(|v| v == ifname)
        }
    }

    fn core(dir: &Path, fake: Arc<Mutex<FakeState>>) -> AgentCore {
        core_with(dir, fake, "10.2.0.0/28").unwrap()
    }

    fn core_with(dir: &Path, fake: Arc<Mutex<FakeState>>, cidr: &str) -> Result<AgentCore> {
        let cfg = CoreConfig {
            node_name: "n".into(),
            pod_cidr: cidr.parse().unwrap(),
            mtu: 1500,
        };
        AgentCore::new(cfg, Store::new(dir, false).unwrap(), Box::new(Fake(fake)))
    }

    fn ready(core: &AgentCore, c: &str, host_if: &str) -> Result<CreateEndpointResponse> {
        core.create_endpoint(CreateEndpointRequest {
            attachment: att(c),
            host_ifindex: 9,
            host_ifname: host_if.into(),
            pod_mac: vec![2; 6],
            host_mac: vec![3; 6],
            netns: String::new(),
        })
    }

    fn att(c: &str) -> Option<Attachment> {
        Some(Attachment {
            container_id: c.into(),
            ifname: "eth0".into(),
        })
    }

    fn alloc(core: &AgentCore, c: &str) -> Result<String> {
        core.allocate(AllocateRequest {
            attachment: att(c),
            ..Default::default()
        })
        .map(|r| r.address)
    }

    #[test]
    fn ready_endpoints_persist_and_allocate_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let first = core(dir.path(), fake.clone());
        let a = alloc(&first, "c1").unwrap();
        assert_eq!(
            alloc(&first, "c1").unwrap(),
            a,
            "same attachment, same address"
        );
        first
            .create_endpoint(CreateEndpointRequest {
                attachment: att("c1"),
                host_ifindex: 4,
                host_ifname: "bthc1".into(),
                pod_mac: vec![2; 6],
                host_mac: vec![3; 6],
                netns: String::new(),
            })
            .unwrap();
        // An allocation that never became ready is not persisted (its ADD fails and rolls back).
        alloc(&first, "c2").unwrap();
        drop(first);
        let c = core(dir.path(), fake.clone());
        assert_eq!(
            alloc(&c, "c1").unwrap(),
            a,
            "ready endpoint survives a restart"
        );
        assert_eq!(c.status().ipam.unwrap().allocated, 1);
        let other = alloc(&c, "c3").unwrap();
        assert_ne!(other, a);
    }

    #[test]
    fn exhaustion_release_and_gc() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let c = core(dir.path(), fake.clone());
        for i in 0..13 {
            alloc(&c, &format!("c{i}")).unwrap();
        }
        assert!(matches!(alloc(&c, "c13"), Err(Error::Exhausted(_))));
        assert!(
            c.release(ReleaseRequest {
                attachment: att("c0")
            })
            .unwrap()
            .released
        );
        assert!(
            !c.release(ReleaseRequest {
                attachment: att("c0")
            })
            .unwrap()
            .released,
            "second release is a no-op"
        );
        alloc(&c, "c13").unwrap();
        let r = c
            .gc(GcRequest {
                valid: vec![att("c1").unwrap(), att("c2").unwrap()],
            })
            .unwrap();
        assert_eq!(r.released.len(), 11);
        assert_eq!(c.status().ipam.unwrap().allocated, 2);
    }

    #[test]
    fn create_endpoint_programs_datapath_and_release_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let c = core(dir.path(), fake.clone());
        let e = c
            .create_endpoint(CreateEndpointRequest {
                attachment: att("x"),
                host_ifindex: 5,
                host_ifname: "bthx".into(),
                pod_mac: vec![2; 6],
                host_mac: vec![3; 6],
                netns: String::new(),
            })
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        alloc(&c, "x").unwrap();
        let bad = c.create_endpoint(CreateEndpointRequest {
            attachment: att("x"),
            host_ifindex: 5,
            host_ifname: "bthx".into(),
            pod_mac: vec![2; 5],
            host_mac: vec![3; 6],
            netns: String::new(),
        });
        assert!(matches!(bad, Err(Error::InvalidArgument(_))));
        c.create_endpoint(CreateEndpointRequest {
            attachment: att("x"),
            host_ifindex: 5,
            host_ifname: "bthx".into(),
            pod_mac: vec![2; 6],
            host_mac: vec![3; 6],
            netns: String::new(),
        })
        .unwrap();
        assert_eq!(fake.lock().unwrap().entries.len(), 1);
        assert_eq!(fake.lock().unwrap().attached, vec!["bthx".to_string()]);
        assert_eq!(
            c.check(CheckRequest {
                attachment: att("x")
            })
            .unwrap()
            .endpoint
            .unwrap()
            .state,
            "ready"
        );
        c.release(ReleaseRequest {
            attachment: att("x"),
        })
        .unwrap();
        assert!(fake.lock().unwrap().entries.is_empty());
    }

    #[test]
    fn delete_queue_is_drained() {
        let dir = tempfile::tempdir().unwrap();
        let cni = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let c = core(dir.path(), fake);
        alloc(&c, "q1").unwrap();
        let q = cni.path().join("delete-queue");
        std::fs::create_dir_all(&q).unwrap();
        std::fs::write(
            q.join("q1_eth0.json"),
            r#"{"containerID":"q1","ifname":"eth0"}"#,
        )
        .unwrap();
        std::fs::write(q.join("junk.json"), "nope").unwrap();
        assert_eq!(c.drain_delete_queue(cni.path()).unwrap(), 2);
        assert_eq!(c.status().ipam.unwrap().allocated, 0);
        assert_eq!(std::fs::read_dir(&q).unwrap().count(), 0);
    }

    #[test]
    fn missing_attachment_is_invalid_argument() {
        let dir = tempfile::tempdir().unwrap();
        let c = core(dir.path(), Arc::new(Mutex::new(FakeState::default())));
        let r = c.handle_local(LocalRequest {
            op: Some(Op::Allocate(AllocateRequest::default())),
        });
        match r.result {
            Some(local_response::Result::Error(e)) => {
                assert_eq!(e.code(), pb::local_error::Code::InvalidArgument)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn endpoints_whose_interface_vanished_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let c = core(dir.path(), fake.clone());
        for (cid, ifname) in [("v1", "bthv1"), ("v2", "bthv2")] {
            alloc(&c, cid).unwrap();
            c.create_endpoint(CreateEndpointRequest {
                attachment: att(cid),
                host_ifindex: 9,
                host_ifname: ifname.into(),
                pod_mac: vec![2; 6],
                host_mac: vec![3; 6],
                netns: String::new(),
            })
            .unwrap();
        }
        assert_eq!(c.sweep_vanished().unwrap(), 0);
        fake.lock().unwrap().vanished.push("bthv1".into());
        assert_eq!(c.sweep_vanished().unwrap(), 1);
        assert_eq!(c.status().ipam.unwrap().allocated, 1);
        assert_eq!(fake.lock().unwrap().entries.len(), 1);
        // The same happens at start-up.
        fake.lock().unwrap().vanished.push("bthv2".into());
        let c = core(dir.path(), fake.clone());
        assert_eq!(c.status().ipam.unwrap().allocated, 0);
    }

    #[test]
    fn allocations_that_never_became_endpoints_are_reclaimed_after_their_lease() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let c = core(dir.path(), fake.clone());
        alloc(&c, "stuck").unwrap();
        alloc(&c, "ok").unwrap();
        ready(&c, "ok", "bthok").unwrap();
        assert_eq!(
            c.reclaim_stale_allocations(DEFAULT_ALLOCATION_LEASE)
                .unwrap(),
            0
        );
        assert_eq!(c.status().ipam.unwrap().allocated, 2);
        // Only the never-ready allocation goes; the ready endpoint is not the lease's business.
        assert_eq!(c.reclaim_stale_allocations(Duration::ZERO).unwrap(), 1);
        assert_eq!(c.status().ipam.unwrap().allocated, 1);
        assert_eq!(fake.lock().unwrap().entries.len(), 1);
        // The plugin that was stopped half-way gets a clean NotFound (it then rolls back).
        let e = ready(&c, "stuck", "bthstuck").unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        assert!(e.to_string().contains("lease"), "{e}");
        let r = c.handle_local(LocalRequest {
            op: Some(Op::CreateEndpoint(CreateEndpointRequest {
                attachment: att("stuck"),
                host_ifindex: 9,
                host_ifname: "bthstuck".into(),
                pod_mac: vec![2; 6],
                host_mac: vec![3; 6],
                netns: String::new(),
            })),
        });
        match r.result {
            Some(local_response::Result::Error(e)) => {
                assert_eq!(e.code(), pb::local_error::Code::NotFound)
            }
            other => panic!("{other:?}"),
        }
        assert!(!fake.lock().unwrap().attached.contains(&"bthstuck".into()));
        // The freed address is usable again.
        alloc(&c, "next").unwrap();
        ready(&c, "next", "bthnext").unwrap();
    }

    #[test]
    fn lease_counts_from_allocation_and_a_retried_allocate_renews_it() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let c = core(dir.path(), fake);
        let lease = Duration::from_millis(150);
        alloc(&c, "old").unwrap();
        let retried = alloc(&c, "retried").unwrap();
        std::thread::sleep(lease);
        alloc(&c, "young").unwrap();
        assert_eq!(alloc(&c, "retried").unwrap(), retried, "same address");
        assert_eq!(c.reclaim_stale_allocations(lease).unwrap(), 1);
        let left: Vec<String> = c
            .list_endpoints()
            .into_iter()
            .map(|e| e.attachment.unwrap().container_id)
            .collect();
        assert_eq!(left, vec!["retried".to_string(), "young".to_string()]);
        std::thread::sleep(lease);
        assert_eq!(c.reclaim_stale_allocations(lease).unwrap(), 2);
        assert_eq!(c.status().ipam.unwrap().allocated, 0);
    }

    #[test]
    fn allocations_saved_along_with_others_count_their_lease_from_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let c = core(dir.path(), fake.clone());
        alloc(&c, "half").unwrap();
        alloc(&c, "full").unwrap();
        // This commit writes the whole state, "half" (still allocated) included.
        ready(&c, "full", "bthfull").unwrap();
        drop(c);
        let lease = Duration::from_millis(150);
        let c = core(dir.path(), fake);
        assert_eq!(c.status().ipam.unwrap().allocated, 2);
        assert_eq!(c.reclaim_stale_allocations(lease).unwrap(), 0);
        std::thread::sleep(lease);
        assert_eq!(c.reclaim_stale_allocations(lease).unwrap(), 1);
        assert_eq!(c.status().ipam.unwrap().allocated, 1);
        drop(c);
        let c = core(dir.path(), Arc::new(Mutex::new(FakeState::default())));
        assert_eq!(
            c.status().ipam.unwrap().allocated,
            1,
            "reclaim was persisted"
        );
    }

    #[test]
    fn pod_cidr_change_is_refused_while_endpoints_are_outside_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let c = core_with(dir.path(), fake.clone(), "10.2.0.0/24").unwrap();
        // Round robin from the start of the range: 10.2.0.2 ..= 10.2.0.16.
        for i in 0..15 {
            let cid = format!("p{i:02}");
            alloc(&c, &cid).unwrap();
            ready(&c, &cid, &format!("bthp{i}")).unwrap();
        }
        drop(c);
        let refused = |cidr: &str| {
            let e = core_with(dir.path(), fake.clone(), cidr)
                .err()
                .unwrap_or_else(|| panic!("change to {cidr} accepted"));
            assert!(matches!(e, Error::Config(_)), "{e}");
            e.to_string()
        };
        // A different range: every endpoint is outside it.
        let msg = refused("10.2.1.0/24");
        for want in ["from 10.2.0.0/24 to 10.2.1.0/24", "15 of 15 endpoints"] {
            assert!(msg.contains(want), "{want:?} missing in: {msg}");
        }
        // A narrower one: 10.2.0.16 is outside it and 10.2.0.15 is its broadcast address.
        let msg = refused("10.2.0.0/28");
        assert!(msg.contains("2 of 15 endpoints"), "{msg}");
        // Refused starts changed nothing on disk.
        let stored = Store::new(dir.path(), false).unwrap().load().unwrap();
        assert_eq!(stored.pod_cidr, "10.2.0.0/24");
        assert_eq!(stored.endpoints.len(), 15);
        // A narrower range that still holds every address is accepted and recorded at once.
        let c = core_with(dir.path(), fake.clone(), "10.2.0.0/27").unwrap();
        assert_eq!(c.status().ipam.unwrap().allocated, 15);
        drop(c);
        let stored = Store::new(dir.path(), false).unwrap().load().unwrap();
        assert_eq!(stored.pod_cidr, "10.2.0.0/27");
        // So is a wider one; without endpoints anything goes.
        let c = core_with(dir.path(), fake.clone(), "10.2.0.0/16").unwrap();
        c.gc(GcRequest { valid: vec![] }).unwrap();
        drop(c);
        core_with(dir.path(), fake, "10.2.7.0/24").unwrap();
    }

    fn add(core: &AgentCore, c: &str, host_if: &str) -> Result<AddEndpointResponse> {
        core.add_endpoint(AddEndpointRequest {
            attachment: att(c),
            host_ifindex: 11,
            host_ifname: host_if.into(),
            pod_mac: vec![2; 6],
            host_mac: vec![3; 6],
            ..Default::default()
        })
    }

    #[test]
    fn add_endpoint_allocates_and_makes_ready_in_one_request() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let c = core(dir.path(), fake.clone());
        let r = add(&c, "a1", "btha1").unwrap();
        assert_eq!(r.gateway, ipam::GATEWAY.to_string());
        assert_eq!(r.mtu, 1500);
        let ip = r.address.trim_end_matches("/32").to_string();
        assert_eq!(
            fake.lock().unwrap().ops,
            vec![format!("upsert {ip}"), "attach btha1".to_string()]
        );
        let ep = c
            .check(CheckRequest {
                attachment: att("a1"),
            })
            .unwrap()
            .endpoint
            .unwrap();
        assert_eq!((ep.state.as_str(), ep.host_ifindex), ("ready", 11));
        assert_eq!(ep.id, r.endpoint_id);
        // A retried ADD (the runtime's retry after a lost answer) keeps the address.
        assert_eq!(add(&c, "a1", "btha1").unwrap().address, r.address);
        // Bad input is refused before anything is allocated.
        let bad = c.add_endpoint(AddEndpointRequest {
            attachment: att("a2"),
            host_ifindex: 0,
            host_ifname: "btha2".into(),
            pod_mac: vec![2; 6],
            host_mac: vec![3; 6],
            ..Default::default()
        });
        assert!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
        assert_eq!(c.status().ipam.unwrap().allocated, 1);
        // Durable: a restarted agent has it.
        drop(c);
        let c = core(dir.path(), fake);
        assert_eq!(alloc(&c, "a1").unwrap(), r.address);
        assert_eq!(c.status().ipam.unwrap().allocated, 1);
    }

    #[test]
    fn failed_add_endpoint_leaves_no_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let c = core(dir.path(), fake.clone());
        fake.lock().unwrap().fail_attach = true;
        assert!(add(&c, "f1", "bthf1").is_err());
        assert_eq!(c.status().ipam.unwrap().allocated, 0);
        assert!(fake.lock().unwrap().entries.is_empty());
        // Through the framed protocol: an error answer.
        let r = c.handle_local(LocalRequest {
            op: Some(Op::AddEndpoint(AddEndpointRequest {
                attachment: att("f1"),
                host_ifindex: 11,
                host_ifname: "bthf1".into(),
                pod_mac: vec![2; 6],
                host_mac: vec![3; 6],
                ..Default::default()
            })),
        });
        assert!(
            matches!(r.result, Some(local_response::Result::Error(_))),
            "{r:?}"
        );
        fake.lock().unwrap().fail_attach = false;
        // Nothing of it reached the disk either.
        drop(c);
        let c = core(dir.path(), fake.clone());
        assert_eq!(c.status().ipam.unwrap().allocated, 0);
        // A failed re-ADD of a ready endpoint leaves it as it was, on disk too.
        let first = add(&c, "r1", "bthr1").unwrap();
        fake.lock().unwrap().fail_attach = true;
        assert!(
            c.add_endpoint(AddEndpointRequest {
                attachment: att("r1"),
                host_ifindex: 99,
                host_ifname: "bthr1b".into(),
                pod_mac: vec![2; 6],
                host_mac: vec![3; 6],
                ..Default::default()
            })
            .is_err()
        );
        fake.lock().unwrap().fail_attach = false;
        drop(c);
        let c = core(dir.path(), fake.clone());
        let ep = c
            .check(CheckRequest {
                attachment: att("r1"),
            })
            .unwrap()
            .endpoint
            .unwrap();
        assert_eq!((ep.host_ifindex, ep.address), (11, first.address));
        c.release(ReleaseRequest {
            attachment: att("r1"),
        })
        .unwrap();
        // The pool is full: nothing is programmed.
        for i in 0..13 {
            add(&c, &format!("p{i}"), &format!("bthp{i}")).unwrap();
        }
        assert!(matches!(add(&c, "p13", "bthp13"), Err(Error::Exhausted(_))));
        assert_eq!(fake.lock().unwrap().entries.len(), 13);
    }

    #[test]
    fn status_reports_node_networking() {
        let dir = tempfile::tempdir().unwrap();
        let c = core(dir.path(), Arc::new(Mutex::new(FakeState::default())));
        let r = c.status().routing.unwrap();
        assert_eq!(
            (r.mode.as_str(), r.uplink.as_str(), r.node_ip.as_str()),
            ("", "", "")
        );
        assert_eq!((r.pod_mtu, r.remote_pod_cidrs), (1500, 0));
        let c = c.with_node_networking(NodeNetworking {
            routing_mode: "vxlan".into(),
            uplink: Some("eth0".into()),
            node_ip: Some(Ipv4Addr::new(192, 168, 0, 1)),
        });
        c.set_remote_pod_cidrs(2);
        let r = c.status().routing.unwrap();
        assert_eq!(
            (r.mode.as_str(), r.uplink.as_str(), r.node_ip.as_str()),
            ("vxlan", "eth0", "192.168.0.1")
        );
        assert_eq!(r.remote_pod_cidrs, 2);
    }

    #[test]
    fn endpoint_entry_is_written_before_filters_attach() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeState::default()));
        let c = core(dir.path(), fake.clone());
        let ip = alloc(&c, "o1").unwrap();
        let ip = ip.trim_end_matches("/32");
        ready(&c, "o1", "btho1").unwrap();
        assert_eq!(
            fake.lock().unwrap().ops,
            vec![format!("upsert {ip}"), "attach btho1".to_string()]
        );
        // A failed attach leaves no entry behind and the endpoint not ready.
        alloc(&c, "o2").unwrap();
        fake.lock().unwrap().fail_attach = true;
        assert!(ready(&c, "o2", "btho2").is_err());
        assert_eq!(fake.lock().unwrap().entries.len(), 1);
        fake.lock().unwrap().fail_attach = false;
        drop(c);
        // After a program upgrade reconcile re-attaches: again entry first, then filter.
        let fake2 = Arc::new(Mutex::new(FakeState {
            reattach: true,
            ..FakeState::default()
        }));
        let _c = core(dir.path(), fake2.clone());
        assert_eq!(
            fake2.lock().unwrap().ops,
            vec![format!("upsert {ip}"), "attach btho1".to_string()]
        );
    }
}
