//! The CNI verbs.
use crate::{
    client::{AgentClient, CallError},
    config::{CURRENT_VERSION, Command, Env, NetConf, SUPPORTED_VERSIONS},
    error::{Error, Result},
    netlink::{Netlink, NlReply, NlRequest, format_mac, in_netns},
    queue,
};
use berth_proto::agent::{
    AddEndpointRequest, AllocateRequest, Attachment, CheckRequest, CreateEndpointRequest,
    GcRequest, PodRef, ReleaseRequest, StatusRequest, local_error::Code, local_request::Op,
    local_response,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::{collections::HashSet, fs::File, net::Ipv4Addr, os::fd::AsFd, time::Duration};

/// Prefix of every host-side veth Berth creates.
pub const HOST_IF_PREFIX: &str = "bth";
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Deterministic host-side interface name of an attachment: `bth` + 12 hex digits of
/// SHA-256(containerID/ifname). DEL and GC find leaked interfaces by recomputing it.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    format!("{HOST_IF_PREFIX}{}", &hex::encode(digest)[..12])
}

/// What one invocation prints on success (nothing for DEL, STATUS and GC).
pub type Output = Option<Value>;

/// Runs verb `cmd` with the environment `env` and stdin `input`.
pub fn run(cmd: Command, env: &Env, input: &[u8]) -> Result<Output> {
    if cmd == Command::Version {
        return Ok(Some(version_json()));
    }
    let conf = NetConf::parse(input)?;
    match cmd {
        Command::Add => add(env, &conf).map(Some),
        Command::Del => del(env, &conf).map(|_| None),
        Command::Check => check(env, &conf).map(|_| None),
        Command::Status => status(&conf).map(|_| None),
        Command::Gc => gc(&conf).map(|_| None),
        Command::Version => unreachable!(),
    }
}

/// The VERSION answer.
pub fn version_json() -> Value {
    json!({"cniVersion": CURRENT_VERSION, "supportedVersions": SUPPORTED_VERSIONS})
}

fn attachment(env: &Env) -> Attachment {
    Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

fn connect(conf: &NetConf) -> Result<AgentClient> {
    let socket = conf.agent_socket();
    AgentClient::connect(&socket, AGENT_TIMEOUT).map_err(|e| Error::AgentUnreachable {
        socket,
        reason: e.to_string(),
    })
}

fn agent_err(conf: &NetConf, e: CallError) -> Error {
    match e {
        CallError::Unreachable(io) => Error::AgentUnreachable {
            socket: conf.agent_socket(),
            reason: io.to_string(),
        },
        CallError::Agent(Code::Exhausted, m) => Error::Exhausted(m),
        CallError::Agent(Code::NotFound, m) => Error::UnknownContainer(m),
        CallError::Agent(Code::Unavailable, m) => Error::AgentUnreachable {
            socket: conf.agent_socket(),
            reason: m,
        },
        CallError::Agent(Code::InvalidArgument, m) => Error::InvalidConfig(m),
        CallError::Agent(_, m) => Error::Agent(m),
    }
}

fn open_netns(path: &str) -> Result<File> {
    File::open(path)
        .map_err(|e| Error::InvalidEnv(format!("CNI_NETNS={path:?} cannot be opened: {e}")))
}

/// A netlink socket inside the namespace at `netns`.
fn pod_netlink(netns: &File) -> Result<Netlink> {
    in_netns(netns.as_fd(), Netlink::new).map_err(|e| Error::io("open netlink in pod netns", e))
}

fn host_netlink() -> Result<Netlink> {
    Netlink::new().map_err(|e| Error::io("open netlink", e))
}

/// MTU the veth pair is created with; the agent's answer may change it (one more message in a
/// batch that is sent anyway).
const DEFAULT_MTU: u32 = 1500;

/// ADD, in one round trip to the agent: the plugin creates the veth pair (the host name derives
/// from the attachment, so DEL and GC find it without state), sends `AddEndpoint` (address and
/// endpoint at once), prepares the host side while the agent works, then plumbs the pod side
/// with the answer. Every failure after the pair exists deletes it and releases the attachment.
fn add(env: &Env, conf: &NetConf) -> Result<Value> {
    let netns_path = env.netns.clone().unwrap_or_default();
    let netns = open_netns(&netns_path)?;
    let mut pod_nl = pod_netlink(&netns)?;
    let interface_exists = || Error::InterfaceExists {
        ifname: env.ifname.clone(),
        netns: netns_path.clone(),
    };
    let mut client = match connect(conf) {
        Ok(c) => c,
        Err(e) => {
            // As before the agent was asked: an existing CNI_IFNAME is reported first.
            if let Ok(Some(_)) = pod_nl.link_by_name(&env.ifname) {
                return Err(interface_exists());
            }
            return Err(e);
        }
    };
    let host_name = host_ifname(&env.container_id, &env.ifname);
    let mut host_nl = host_netlink()?;
    let pair = create_pair(
        env,
        &netns,
        &mut host_nl,
        &mut pod_nl,
        &host_name,
        interface_exists,
    )?;
    let mut asked = false;
    match plumb(
        env,
        &mut host_nl,
        &mut pod_nl,
        &host_name,
        &pair,
        &mut client,
        &mut asked,
    ) {
        Ok(v) => Ok(add_prev_result(conf, v)),
        Err(e) => {
            // Undo: the interface pair and the address; DEL would do the same.
            if let Err(e) = host_nl.delete_link(pair.host.index) {
                eprintln!("berth: ADD: rollback: delete {host_name}: {e}");
            }
            if asked {
                let _ = client.call(Op::Release(ReleaseRequest {
                    attachment: Some(attachment(env)),
                }));
            }
            Err(e)
        }
    }
}

/// The veth pair of an ADD as created.
struct Pair {
    host: crate::netlink::Link,
    pod_index: u32,
    pod_mac: [u8; 6],
}

/// A random locally administered unicast MAC address. Set at creation rather than left to the
/// kernel, so the plugin knows both ends without asking (and udev's MAC policy, which rewrites
/// kernel-random addresses of new links, leaves them alone).
fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: writes at most mac.len() bytes into mac.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        // Practically unreachable (getrandom on 6 bytes does not fail after boot); still unique
        // enough per host from the clock and the PID.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ (u128::from(std::process::id()) << 32);
        mac.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Creates the pair (host end here, `CNI_IFNAME` in the pod) and learns the host end's index and
/// the pod end's index in one batch. `EEXIST` means either `CNI_IFNAME` exists in the pod (ADD
/// fails, code 101) or a host interface was left by an ADD that crashed half-way (deleted, and
/// the pair created again).
fn create_pair(
    env: &Env,
    netns: &File,
    host_nl: &mut Netlink,
    pod_nl: &mut Netlink,
    host_name: &str,
    interface_exists: impl Fn() -> Error,
) -> Result<Pair> {
    let host_mac = random_mac();
    let pod_mac = random_mac();
    let mut retried = false;
    loop {
        let mut replies = host_nl
            .batch(vec![
                NlRequest::create_veth(
                    host_name,
                    host_mac,
                    &env.ifname,
                    pod_mac,
                    netns.as_fd(),
                    DEFAULT_MTU,
                ),
                NlRequest::get_link_by_name(host_name),
            ])
            .map_err(|e| Error::io("create veth pair", e))?;
        let looked_up = replies.pop().expect("two answers");
        match replies.pop().expect("two answers") {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && !retried => {
                if pod_nl
                    .link_by_name(&env.ifname)
                    .map_err(|e| Error::io("look up interface", e))?
                    .is_some()
                {
                    return Err(interface_exists());
                }
                host_nl
                    .delete_link_by_name(host_name)
                    .map_err(|e| Error::io("remove stale host interface", e))?;
                retried = true;
                continue;
            }
            Err(e) => return Err(Error::io("create veth pair", e)),
        }
        let found = looked_up
            .ok()
            .as_deref()
            .and_then(Netlink::link_of_reply)
            .filter(|(l, _)| l.name == host_name);
        let Some((host, Some(pod_index))) = found else {
            // Gone again already (someone else deleted it): nothing to roll back that DEL/GC
            // would not find by name.
            let _ = host_nl.delete_link_by_name(host_name);
            return Err(Error::io(
                "look up host interface",
                std::io::ErrorKind::NotFound.into(),
            ));
        };
        return Ok(Pair {
            host,
            pod_index,
            pod_mac,
        });
    }
}

/// The first failure among a batch's answers, named by `what[i]`.
fn first_failure(replies: Vec<NlReply>, what: &[&str]) -> Result<()> {
    for (r, what) in replies.into_iter().zip(what) {
        r.map_err(|e| Error::io(*what, e))?;
    }
    Ok(())
}

/// The agent's answer, whichever protocol version produced it.
struct Granted {
    address: String,
    gateway: String,
    mtu: u32,
}

#[allow(clippy::too_many_arguments)]
fn plumb(
    env: &Env,
    host_nl: &mut Netlink,
    pod_nl: &mut Netlink,
    host_name: &str,
    pair: &Pair,
    client: &mut AgentClient,
    asked: &mut bool,
) -> Result<Value> {
    let pod = env.pod();
    let netns = env.netns.clone().unwrap_or_default();
    let lost = |what: &str, e: std::io::Error| Error::AgentUnreachable {
        socket: "agent".into(),
        reason: format!("lost during {what}: {e}"),
    };
    let add_req = AddEndpointRequest {
        attachment: Some(attachment(env)),
        pod: Some(PodRef {
            namespace: pod.namespace,
            name: pod.name,
            uid: pod.uid,
            infra_container_id: pod.infra_container_id,
        }),
        netns: netns.clone(),
        host_ifindex: pair.host.index,
        host_ifname: host_name.to_string(),
        requested_address: env.args.get("IP").cloned().unwrap_or_default(),
        pod_mac: pair.pod_mac.to_vec(),
        host_mac: pair.host.mac.to_vec(),
    };
    // The host side first (IPv6 off before the link comes up, so it never gets a link-local
    // address). Not overlapped with the agent's work: the `disable_ipv6` sysctl spins on the RTNL
    // lock (trylock and restart) while the agent's filter attach holds it.
    disable_host_ipv6(host_nl, host_name, pair.host.index)?;
    *asked = true;
    let sent = client.send(Op::AddEndpoint(add_req.clone()));

    let answer = match sent.and_then(|()| client.recv()) {
        Ok(local_response::Result::AddEndpoint(a)) => Granted {
            address: a.address,
            gateway: a.gateway,
            mtu: a.mtu,
        },
        Ok(_) => return Err(Error::Agent("unexpected response to AddEndpoint".into())),
        // An agent from before AddEndpoint: the two-step protocol.
        Err(CallError::Agent(Code::InvalidArgument, m)) if m.contains("empty request") => {
            two_step(env, client, add_req)?
        }
        Err(CallError::Unreachable(e)) => return Err(lost("AddEndpoint", e)),
        Err(CallError::Agent(Code::Exhausted, m)) => return Err(Error::Exhausted(m)),
        Err(CallError::Agent(Code::InvalidArgument, m)) => return Err(Error::InvalidConfig(m)),
        Err(CallError::Agent(Code::Unavailable, m)) => return Err(Error::Retry(m)),
        Err(CallError::Agent(_, m)) => return Err(Error::Agent(m)),
    };

    let (ip, prefix) = parse_cidr(&answer.address)?;
    let gateway: Ipv4Addr = answer
        .gateway
        .parse()
        .map_err(|_| Error::Agent(format!("agent returned bad gateway {:?}", answer.gateway)))?;
    let mtu = if answer.mtu == 0 {
        DEFAULT_MTU
    } else {
        answer.mtu
    };

    // The pod side in one batch, in order: the link must be up before routes through it.
    let mut reqs = Vec::with_capacity(6);
    let mut what = Vec::with_capacity(6);
    if mtu != DEFAULT_MTU {
        reqs.push(NlRequest::set_mtu(pair.pod_index, mtu));
        what.push("set pod MTU");
    }
    reqs.extend([
        NlRequest::add_address(pair.pod_index, ip, prefix),
        NlRequest::set_link_up(pair.pod_index, true),
        NlRequest::add_route(gateway, 32, None, pair.pod_index),
        NlRequest::add_neighbour(pair.pod_index, gateway, pair.host.mac),
        NlRequest::add_route(Ipv4Addr::UNSPECIFIED, 0, Some(gateway), pair.pod_index),
    ]);
    what.extend([
        "add pod address",
        "set pod interface up",
        "add gateway route",
        "add gateway neighbour",
        "add default route",
    ]);
    let pod_replies = pod_nl
        .batch(reqs)
        .map_err(|e| Error::io("plumb pod interface", e))?;
    first_failure(pod_replies, &what)?;

    // The host's route to the pod.
    let mut reqs = Vec::with_capacity(2);
    let mut what = Vec::with_capacity(2);
    if mtu != DEFAULT_MTU {
        reqs.push(NlRequest::set_mtu(pair.host.index, mtu));
        what.push("set host MTU");
    }
    reqs.push(NlRequest::add_route(ip, 32, None, pair.host.index));
    what.push("add host route to pod");
    let host_replies = host_nl
        .batch(reqs)
        .map_err(|e| Error::io("add host route to pod", e))?;
    first_failure(host_replies, &what)?;

    Ok(json!({
        "cniVersion": CURRENT_VERSION,
        "interfaces": [
            {"name": host_name, "mac": format_mac(&pair.host.mac), "mtu": mtu},
            {"name": env.ifname, "mac": format_mac(&pair.pod_mac), "mtu": mtu,
             "sandbox": netns},
        ],
        "ips": [{"address": answer.address, "gateway": answer.gateway, "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": answer.gateway}],
        "dns": {},
    }))
}

/// `Allocate` then `CreateEndpoint`, for an agent that predates `AddEndpoint`.
fn two_step(env: &Env, client: &mut AgentClient, req: AddEndpointRequest) -> Result<Granted> {
    let alloc = match client.call(Op::Allocate(AllocateRequest {
        attachment: req.attachment.clone(),
        pod: req.pod.clone(),
        netns: req.netns.clone(),
        requested_address: req.requested_address.clone(),
    })) {
        Ok(local_response::Result::Allocate(a)) => a,
        Ok(_) => return Err(Error::Agent("unexpected response to Allocate".into())),
        Err(CallError::Agent(Code::Exhausted, m)) => return Err(Error::Exhausted(m)),
        Err(CallError::Unreachable(e)) => {
            return Err(Error::AgentUnreachable {
                socket: "agent".into(),
                reason: format!("lost during Allocate: {e}"),
            });
        }
        Err(CallError::Agent(_, m)) => return Err(Error::Agent(m)),
    };
    match client.call(Op::CreateEndpoint(CreateEndpointRequest {
        attachment: Some(attachment(env)),
        host_ifindex: req.host_ifindex,
        host_ifname: req.host_ifname,
        pod_mac: req.pod_mac,
        host_mac: req.host_mac,
        netns: req.netns,
    })) {
        Ok(local_response::Result::CreateEndpoint(_)) => {}
        Ok(_) => return Err(Error::Agent("unexpected response to CreateEndpoint".into())),
        Err(CallError::Unreachable(e)) => {
            return Err(Error::AgentUnreachable {
                socket: "agent".into(),
                reason: format!("lost during CreateEndpoint: {e}"),
            });
        }
        // The allocation is gone (its lease expired while this ADD was stalled, or a DEL/GC
        // released it): the caller rolls back and the runtime's retry allocates afresh.
        Err(CallError::Agent(Code::NotFound, m)) => return Err(Error::Retry(m)),
        Err(CallError::Agent(_, m)) => return Err(Error::Agent(m)),
    }
    Ok(Granted {
        address: alloc.address,
        gateway: alloc.gateway,
        mtu: alloc.mtu,
    })
}

/// Keeps IPv6 off the host side of a pod's veth: no link-local address, no router solicitations
/// or neighbour discovery from the pod's link into the node, and IPv6 arriving from the pod is
/// not taken in by the host (Berth's pods are IPv4). `disable_ipv6=1` in the host namespace,
/// plus address generation mode "none" over netlink, which also holds where `/proc/sys` is
/// read-only (some containers); then the link comes up (the same batch). Best effort for IPv6:
/// a failure there is a warning on stderr, never a failed ADD.
fn disable_host_ipv6(nl: &mut Netlink, name: &str, index: u32) -> Result<()> {
    let no_ipv6 = || !std::path::Path::new("/proc/sys/net/ipv6").exists();
    let sysctl = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if let Err(e) = std::fs::write(&sysctl, "1")
        && !no_ipv6()
    {
        eprintln!(
            "berth: ADD: cannot disable IPv6 on {name} ({sysctl}: {e}); turning off its address generation only"
        );
    }
    let mut replies = nl
        .batch(vec![
            NlRequest::ipv6_addr_gen_mode_none(index),
            NlRequest::set_link_up(index, true),
        ])
        .map_err(|e| Error::io("set host interface up", e))?;
    replies
        .pop()
        .expect("two answers")
        .map_err(|e| Error::io("set host interface up", e))?;
    if let Some(Err(e)) = replies.pop()
        && e.raw_os_error() != Some(libc::EAFNOSUPPORT)
        && !no_ipv6()
    {
        eprintln!("berth: ADD: cannot turn off IPv6 address generation on {name}: {e}");
    }
    Ok(())
}

/// Merges our result into `prevResult` when chained, and shapes it for the requested version.
fn add_prev_result(conf: &NetConf, mut ours: Value) -> Value {
    if let Some(prev) = &conf.prev_result {
        let base = prev
            .get("interfaces")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let mut merged = prev.clone();
        for key in ["interfaces", "ips", "routes"] {
            let mut items = merged
                .get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for mut item in ours[key].as_array().cloned().unwrap_or_default() {
                if key == "ips"
                    && let Some(i) = item.get("interface").and_then(Value::as_u64)
                {
                    item["interface"] = json!(i as usize + base);
                }
                items.push(item);
            }
            merged[key] = json!(items);
        }
        if merged.get("dns").is_none() {
            merged["dns"] = json!({});
        }
        ours = merged;
    }
    ours["cniVersion"] = json!(conf.cni_version);
    if conf.legacy_result()
        && let Some(ips) = ours.get_mut("ips").and_then(Value::as_array_mut)
    {
        for ip in ips {
            ip["version"] = json!("4");
        }
    }
    ours
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let bad = || Error::Agent(format!("agent returned bad address {s:?}"));
    let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
    Ok((
        ip.parse().map_err(|_| bad())?,
        prefix.parse().map_err(|_| bad())?,
    ))
}

fn del(env: &Env, conf: &NetConf) -> Result<()> {
    let host_name = host_ifname(&env.container_id, &env.ifname);
    let released = connect(conf).and_then(|mut c| {
        c.call(Op::Release(ReleaseRequest {
            attachment: Some(attachment(env)),
        }))
        .map_err(|e| agent_err(conf, e))
    });
    let delete_link = || -> Result<()> {
        // Deleting the host side removes the pair, also when the pod's netns is already gone.
        host_netlink()?
            .delete_link_by_name(&host_name)
            .map(|_| ())
            .map_err(|e| Error::io(format!("delete {host_name}"), e))
    };
    match released {
        // The agent deletes the interface in the background (by ifindex).
        Ok(local_response::Result::Release(r)) if r.link_deletion_queued => {
            retire_pod_interface(env, &host_name);
            Ok(())
        }
        Ok(_) => delete_link(),
        Err(Error::AgentUnreachable { .. }) => {
            // Best effort and idempotent: remove the interface now, queue the release for the
            // agent's next start.
            delete_link()?;
            queue::enqueue(&conf.state_dir(), &env.container_id, &env.ifname)
                .map_err(|e| Error::io("write delete queue", e))
        }
        Err(e) => Err(e),
    }
}

/// While the agent deletes the pair in the background, frees `CNI_IFNAME` in the pod's namespace
/// at once (down + rename to `bdl<hash>`), so an ADD into the same namespace can follow the DEL.
/// Best effort: a missing namespace or interface is fine — also when the agent's deletion removes
/// the interface between the lookup and the rename (`ENODEV`): gone is the state DEL wants.
fn retire_pod_interface(env: &Env, host_name: &str) {
    let Some(netns) = env.netns.as_deref().and_then(|p| File::open(p).ok()) else {
        return;
    };
    let tombstone = format!("bdl{}", &host_name[HOST_IF_PREFIX.len()..]);
    let result = pod_netlink(&netns).and_then(|mut nl| {
        let Some(link) = nl
            .link_by_name(&env.ifname)
            .map_err(|e| Error::io("look up", e))?
        else {
            return Ok(());
        };
        // Down, then the rename (a link that is up cannot be renamed), in one batch.
        let replies = nl
            .batch(vec![
                NlRequest::set_link_up(link.index, false),
                NlRequest::rename_link(link.index, &tombstone),
            ])
            .map_err(|e| Error::io("retire interface", e))?;
        for r in replies {
            vanished_is_fine(r.map(|_| ())).map_err(|e| Error::io("retire interface", e))?;
        }
        Ok(())
    });
    if let Err(e) = result {
        eprintln!("berth: DEL: freeing {} in the pod: {e}", env.ifname);
    }
}

/// `ENODEV` (the link is already gone) counts as done.
fn vanished_is_fine(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        r => r,
    }
}

fn check(env: &Env, conf: &NetConf) -> Result<()> {
    let mut client = connect(conf)?;
    let ep = match client.call(Op::Check(CheckRequest {
        attachment: Some(attachment(env)),
    })) {
        Ok(local_response::Result::Check(c)) => c
            .endpoint
            .ok_or_else(|| Error::UnknownContainer(env.container_id.clone()))?,
        Ok(_) => return Err(Error::Agent("unexpected response to Check".into())),
        Err(e) => return Err(agent_err(conf, e)),
    };
    if ep.state != "ready" {
        return Err(Error::CheckFailed(format!(
            "endpoint {} is {}, not ready",
            ep.id, ep.state
        )));
    }
    let (ip, prefix) = parse_cidr(&ep.address)?;
    let mut host_nl = host_netlink()?;
    let host = host_nl
        .link_by_name(&ep.host_ifname)
        .map_err(|e| Error::io("look up host interface", e))?
        .ok_or_else(|| {
            Error::CheckFailed(format!("host interface {} is missing", ep.host_ifname))
        })?;
    if host.index != ep.host_ifindex {
        return Err(Error::CheckFailed(format!(
            "host interface {} has index {}, endpoint expects {}",
            ep.host_ifname, host.index, ep.host_ifindex
        )));
    }
    let netns = open_netns(env.netns.as_deref().unwrap_or_default())?;
    let mut pod_nl = pod_netlink(&netns)?;
    let pod = pod_nl
        .link_by_name(&env.ifname)
        .map_err(|e| Error::io("look up pod interface", e))?
        .ok_or_else(|| {
            Error::CheckFailed(format!("interface {} is missing in the pod", env.ifname))
        })?;
    let addrs = pod_nl
        .addresses(pod.index)
        .map_err(|e| Error::io("list pod addresses", e))?;
    if !addrs.contains(&(ip, prefix)) {
        return Err(Error::CheckFailed(format!(
            "interface {} lacks address {} (has {addrs:?})",
            env.ifname, ep.address
        )));
    }
    if let Some(prev) = &conf.prev_result {
        let listed = prev
            .get("ips")
            .and_then(Value::as_array)
            .is_some_and(|ips| {
                ips.iter()
                    .any(|i| i.get("address") == Some(&json!(ep.address)))
            });
        if !listed {
            return Err(Error::CheckFailed(format!(
                "prevResult does not list {}",
                ep.address
            )));
        }
    }
    Ok(())
}

fn status(conf: &NetConf) -> Result<()> {
    let socket = conf.agent_socket();
    let unavailable = |reason: String| Error::NotAvailable {
        socket: socket.clone(),
        reason,
    };
    let mut client =
        AgentClient::connect(&socket, AGENT_TIMEOUT).map_err(|e| unavailable(e.to_string()))?;
    match client.call(Op::Status(StatusRequest {})) {
        // Only what makes every ADD fail marks the node's network not ready: the agent down or its
        // datapath not loaded. A full pod CIDR is not a node failure (containerd 2 would mark the
        // node NotReady); ADD then fails on its own with "pod addresses exhausted".
        Ok(local_response::Result::Status(s)) => {
            if !s.datapath.unwrap_or_default().loaded {
                return Err(unavailable("datapath not loaded".into()));
            }
            Ok(())
        }
        Ok(_) => Err(unavailable("unexpected response to Status".into())),
        Err(CallError::Unreachable(e)) => Err(unavailable(e.to_string())),
        Err(CallError::Agent(_, m)) => Err(unavailable(m)),
    }
}

fn gc(conf: &NetConf) -> Result<()> {
    let valid = conf.gc_valid();
    let keep: HashSet<String> = valid
        .iter()
        .map(|a| host_ifname(&a.container_id, &a.ifname))
        .collect();
    let mut first_err = None;
    // Leaked host interfaces (e.g. an ADD killed half-way): every bth* link not kept.
    match host_netlink().and_then(|mut nl| {
        let links = nl.links().map_err(|e| Error::io("list links", e))?;
        for l in links {
            if l.name.starts_with(HOST_IF_PREFIX)
                && l.name.len() == 15
                && !keep.contains(&l.name)
                && let Err(e) = nl.delete_link(l.index)
            {
                eprintln!("berth: GC: delete {}: {e}", l.name);
            }
        }
        Ok(())
    }) {
        Ok(()) => {}
        Err(e) => first_err = Some(e),
    }
    let req = GcRequest {
        valid: valid
            .iter()
            .map(|a| Attachment {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect(),
    };
    if let Err(e) =
        connect(conf).and_then(|mut c| c.call(Op::Gc(req)).map_err(|e| agent_err(conf, e)))
    {
        first_err.get_or_insert(e);
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifname_is_stable_and_short() {
        let a = host_ifname("c1", "eth0");
        assert_eq!(a, host_ifname("c1", "eth0"));
        assert_ne!(a, host_ifname("c1", "eth1"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("bth"));
    }

    #[test]
    fn chained_result_keeps_prev_and_shifts_interface_index() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"berth","prevResult":{"cniVersion":"1.0.0",
               "interfaces":[{"name":"x"}],"ips":[{"address":"192.0.2.1/24","interface":0}]}}"#,
        )
        .unwrap();
        let ours = json!({"cniVersion":"1.1.0","interfaces":[{"name":"h"},{"name":"eth0"}],
            "ips":[{"address":"10.2.0.2/32","interface":1}],"routes":[],"dns":{}});
        let out = add_prev_result(&conf, ours);
        assert_eq!(out["cniVersion"], "1.0.0");
        assert_eq!(out["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(out["ips"][1]["interface"], 2);
        assert_eq!(out["ips"][0]["address"], "192.0.2.1/24");
    }

    #[test]
    fn a_vanished_interface_is_no_del_error() {
        assert!(vanished_is_fine(Err(std::io::Error::from_raw_os_error(libc::ENODEV))).is_ok());
        assert!(vanished_is_fine(Ok(())).is_ok());
        let busy = vanished_is_fine(Err(std::io::Error::from_raw_os_error(libc::EBUSY)));
        assert_eq!(busy.unwrap_err().raw_os_error(), Some(libc::EBUSY));
    }

    #[test]
    fn random_macs_are_local_unicast_and_differ() {
        let a = random_mac();
        let b = random_mac();
        assert_ne!(a, b);
        for m in [a, b] {
            assert_eq!(m[0] & 0x03, 0x02, "{m:?}");
        }
    }

    #[test]
    fn legacy_versions_get_ip_version_field() {
        let conf = NetConf::parse(br#"{"cniVersion":"0.3.1","name":"n","type":"berth"}"#).unwrap();
        let out = add_prev_result(&conf, json!({"ips":[{"address":"10.2.0.2/32"}]}));
        assert_eq!(out["ips"][0]["version"], "4");
    }
}
