//! How tc programs attach (DESIGN §8): TCX bpf_links where the kernel has them, clsact filters
//! over netlink as the fallback for the 5.15 floor. This kernel has TCX, so the fallback is
//! exercised by forcing it (`--tc-attach netlink`), and TCX by forcing it too (`--tc-attach tcx`).
//!
//! What is inspected is the kernel's own view, not the agent's: the TCX programs of a hook come
//! from `BPF_PROG_QUERY` (bpftool 7.1 here predates TCX), the clsact filters from `tc -j filter
//! show`, program names from `bpftool prog show`.
use berth_tests::{
    cluster::{Cluster, Mode, Stream, ping_until, transfer_exact},
    cni::Node,
    netns::NetNs,
};
use serde_json::Value;
use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

const TCX: &str = "tcx";
const NETLINK: &str = "netlink";

fn cluster(mech: &str) -> Cluster {
    Cluster::with_agent_args(Mode::Native, 2, &["--tc-attach", mech])
}

/// `BPF_PROG_QUERY` of a TCX hook of `ifname` in `ns`: the program ids and link ids attached, in
/// order.
fn tcx_query(ns: &NetNs, ifname: &str, hook: &str) -> (Vec<u32>, Vec<u32>) {
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    const BPF_TCX_EGRESS: u32 = 47;
    let ifname = ifname.to_string();
    let attach_type = if hook == "ingress" {
        BPF_TCX_INGRESS
    } else {
        BPF_TCX_EGRESS
    };
    berth_tests::cni::in_netns(ns, move || {
        let ifindex = nix::net::if_::if_nametoindex(ifname.as_str()).expect("interface index");
        let mut progs = [0u32; 16];
        let mut links = [0u32; 16];
        let mut attr = QueryAttr {
            target_ifindex: ifindex,
            attach_type,
            prog_ids: progs.as_mut_ptr() as u64,
            count: progs.len() as u32,
            link_ids: links.as_mut_ptr() as u64,
            ..Default::default()
        };
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut attr as *mut QueryAttr,
                std::mem::size_of::<QueryAttr>() as libc::c_uint,
            )
        };
        assert_eq!(
            rc,
            0,
            "BPF_PROG_QUERY {ifname}: {}",
            std::io::Error::last_os_error()
        );
        let n = attr.count as usize;
        (progs[..n].to_vec(), links[..n].to_vec())
    })
}

fn bpftool_json(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

fn prog_name(id: u32) -> String {
    bpftool_json(&["prog", "show", "id", &id.to_string()])["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Ids of every bpf_link in the system.
fn all_link_ids() -> Vec<u64> {
    bpftool_json(&["link", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["id"].as_u64())
        .collect()
}

/// What is attached to one hook.
#[derive(Debug, Default, Clone)]
struct Hook {
    /// TCX programs: (program id, program name).
    tcx: Vec<(u32, String)>,
    /// TCX link ids, in the order of `tcx`.
    links: Vec<u32>,
    /// clsact bpf filters: (program id, program name).
    netlink: Vec<(u32, String)>,
}

impl Hook {
    fn berth_tcx(&self) -> usize {
        self.tcx
            .iter()
            .filter(|(_, n)| n.starts_with("berth"))
            .count()
    }
    fn berth_netlink(&self) -> usize {
        self.netlink
            .iter()
            .filter(|(_, n)| n.starts_with("berth"))
            .count()
    }
}

fn hook_of(ns: &NetNs, ifname: &str, hook: &str) -> Hook {
    let (prog_ids, links) = tcx_query(ns, ifname, hook);
    let tcx = prog_ids.iter().map(|&id| (id, prog_name(id))).collect();
    // No clsact qdisc: tc fails, and there are no filters.
    let out = ns.exec(&["tc", "-j", "filter", "show", "dev", ifname, hook]);
    let filters: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let netlink = filters
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["kind"] == "bpf")
        .filter_map(|f| {
            let prog = &f["options"]["prog"];
            Some((
                prog["id"].as_u64()? as u32,
                prog["name"].as_str()?.to_string(),
            ))
        })
        .collect();
    Hook {
        tcx,
        links,
        netlink,
    }
}

/// Every tc hook Berth uses on a node: the uplink's ingress, both hooks of the VXLAN device (in
/// overlay mode) and of every pod's host-side veth. Keyed `<ifname>:<hook>` (the name of a TCX
/// link's pin).
fn hooks(node: &Node) -> BTreeMap<String, Hook> {
    let mut want = vec![("eth0".to_string(), "ingress")];
    if node
        .ns
        .exec(&["ip", "link", "show", "berth_vxlan"])
        .status
        .success()
    {
        want.push(("berth_vxlan".into(), "ingress"));
        want.push(("berth_vxlan".into(), "egress"));
    }
    for veth in node.host_links() {
        want.push((veth.clone(), "ingress"));
        want.push((veth, "egress"));
    }
    want.into_iter()
        .map(|(ifname, hook)| (format!("{ifname}:{hook}"), hook_of(&node.ns, &ifname, hook)))
        .collect()
}

/// Names of the link pins of a node.
fn link_pins(node: &Node) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(node.pin_root.join("links"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every hook of `node` has exactly one Berth program, attached by `mech`; with TCX each link is
/// pinned under the hook's name and there are no other pins, with netlink there are no link pins.
/// Returns the hooks.
fn assert_one_program_per_hook(node: &Node, mech: &str) -> BTreeMap<String, Hook> {
    let hooks = hooks(node);
    assert!(hooks.len() >= 3, "uplink and at least one pod: {hooks:?}");
    for (name, h) in &hooks {
        let (tcx, nl) = (h.berth_tcx(), h.berth_netlink());
        assert_eq!(
            tcx + nl,
            1,
            "{name}: exactly one Berth program per hook: {h:?}\n{}",
            node.log_tail()
        );
        match mech {
            TCX => assert_eq!(tcx, 1, "{name} uses TCX: {h:?}"),
            _ => assert_eq!(nl, 1, "{name} uses a clsact filter: {h:?}"),
        }
    }
    let pins = link_pins(node);
    match mech {
        TCX => {
            let want: Vec<String> = hooks.keys().cloned().collect();
            assert_eq!(pins, want, "one pin per TCX link");
        }
        _ => assert!(pins.is_empty(), "no TCX link pins with netlink: {pins:?}"),
    }
    hooks
}

/// The TCX link ids and the program ids (TCX, then clsact) of a node's hooks, by hook.
fn link_and_prog_ids(hooks: &BTreeMap<String, Hook>) -> BTreeMap<String, (Vec<u32>, Vec<u32>)> {
    hooks
        .iter()
        .map(|(k, h)| {
            let progs = h.tcx.iter().chain(&h.netlink).map(|(id, _)| *id).collect();
            (k.clone(), (h.links.clone(), progs))
        })
        .collect()
}

fn agent_log(node: &Node) -> String {
    std::fs::read_to_string(node.agent_log()).unwrap_or_default()
}

fn pods_talk(mech: &str) {
    let c = cluster(mech);
    let (p0, ip0) = c.pod(0);
    let (p0b, ip0b) = c.pod(0);
    let (p1, ip1) = c.pod(1);
    for (from, to) in [(&p0, &ip1), (&p1, &ip0), (&p0, &ip0b), (&p1, &ip0b)] {
        assert!(
            ping_until(&from.ns, to, Duration::from_secs(5)),
            "{mech}: no ping to {to}\n{}",
            c.nodes[0].node.log_tail()
        );
    }
    transfer_exact(&p1, &p0, &ip1, 8 << 20);
    transfer_exact(&p0b, &p1, &ip0b, 1 << 20);
    transfer_exact(&p0, &p0b, &ip0, 1 << 20);
    for n in &c.nodes {
        assert_one_program_per_hook(&n.node, mech);
        let log = agent_log(&n.node);
        let why = match mech {
            TCX => "TCX forced by --tc-attach tcx",
            _ => "netlink tc forced by --tc-attach netlink",
        };
        assert!(log.contains(why), "the log says which mechanism and why");
    }
}

#[test]
fn tcx_pods_talk_across_nodes_over_pinned_links() {
    pods_talk(TCX);
}

#[test]
fn netlink_pods_talk_across_nodes_over_clsact_filters() {
    pods_talk(NETLINK);
}

fn kill9_keeps_stream(mech: &str) {
    let mut c = cluster(mech);
    let (p0, _) = c.pod(0);
    let (p1, ip1) = c.pod(1);
    assert!(ping_until(&p0.ns, &ip1, Duration::from_secs(5)));
    let before = link_and_prog_ids(&assert_one_program_per_hook(&c.nodes[0].node, mech));
    let stream = Stream::start(&p1, &p0, &ip1);
    assert!(stream.grows(), "{mech}: stream does not flow");
    let node = &mut c.nodes[0].node;
    node.stop_agent(nix::sys::signal::Signal::SIGKILL);
    assert!(stream.grows(), "{mech}: stream stopped with the agent");
    // Nothing depended on the process: every hook is as it was.
    assert_eq!(
        link_and_prog_ids(&assert_one_program_per_hook(node, mech)),
        before
    );
    node.start_agent();
    assert!(stream.grows(), "{mech}: stream stopped after the restart");
    let st = node.berthctl(&["status"]);
    assert_eq!(st["datapath"]["adopted"], true, "{st}");
    // Adopted: the same links (TCX) running the same programs.
    assert_eq!(
        link_and_prog_ids(&assert_one_program_per_hook(node, mech)),
        before,
        "{mech}: hooks changed across an adopting restart"
    );
    let (p2, _) = c.pod(0);
    assert!(ping_until(&p2.ns, &ip1, Duration::from_secs(5)));
    assert_one_program_per_hook(&c.nodes[0].node, mech);
}

#[test]
fn tcx_agent_kill9_keeps_cross_node_stream_flowing() {
    kill9_keeps_stream(TCX);
}

#[test]
fn netlink_agent_kill9_keeps_cross_node_stream_flowing() {
    kill9_keeps_stream(NETLINK);
}

/// Netlink → TCX → netlink → TCX on restarts of one node's agent, with a cross-node and a
/// same-node stream running: each time both keep flowing and every hook ends with exactly one
/// program, attached the requested way (the other one removed, its pins too).
#[test]
fn switching_mechanisms_on_restart_keeps_traffic_and_one_program_per_hook() {
    let mut c = cluster(NETLINK);
    let (p0, _) = c.pod(0);
    let (p0b, ip0b) = c.pod(0);
    let (p1, ip1) = c.pod(1);
    assert!(ping_until(&p0.ns, &ip1, Duration::from_secs(5)));
    assert_one_program_per_hook(&c.nodes[0].node, NETLINK);
    let cross = Stream::start(&p1, &p0, &ip1);
    let local = Stream::start(&p0b, &p0, &ip0b);
    assert!(cross.grows() && local.grows());
    // Pods added along the way stay (a vanished pod's veth would linger for a moment).
    let mut added = Vec::new();
    for (round, mech) in [TCX, NETLINK, TCX].into_iter().enumerate() {
        let node = &mut c.nodes[0].node;
        node.stop_agent(nix::sys::signal::Signal::SIGTERM);
        node.set_agent_arg("--tc-attach", mech);
        node.start_agent();
        assert!(
            cross.grows(),
            "round {round} ({mech}): cross-node stream stopped"
        );
        assert!(
            local.grows(),
            "round {round} ({mech}): same-node stream stopped"
        );
        assert_one_program_per_hook(node, mech);
        let st = node.berthctl(&["status"]);
        assert_eq!(st["datapath"]["adopted"], true, "same programs: {st}");
        // New pods are attached the new way and talk.
        let (p, ip) = c.pod(0);
        assert!(
            ping_until(&p.ns, &ip1, Duration::from_secs(5))
                && ping_until(&p1.ns, &ip, Duration::from_secs(5)),
            "round {round} ({mech}): new pod cannot talk"
        );
        assert_one_program_per_hook(&c.nodes[0].node, mech);
        added.push(p);
    }
    // The other node never changed.
    assert_one_program_per_hook(&c.nodes[1].node, NETLINK);
}

/// A program reload (an upgrade to another object) with streams running: TCX links are
/// re-pointed at the new programs in place (same link ids, new program ids; BPF_LINK_UPDATE,
/// never detach-and-attach), clsact filters replaced; traffic keeps flowing either way.
fn reload_keeps_streams(mech: &str) {
    let mut c = cluster(mech);
    let (p0, _) = c.pod(0);
    let (p0b, ip0b) = c.pod(0);
    let (p1, ip1) = c.pod(1);
    assert!(ping_until(&p0.ns, &ip1, Duration::from_secs(5)));
    let before = link_and_prog_ids(&assert_one_program_per_hook(&c.nodes[0].node, mech));
    let cross = Stream::start(&p1, &p0, &ip1);
    let local = Stream::start(&p0b, &p0, &ip0b);
    assert!(cross.grows() && local.grows());
    let node = &mut c.nodes[0].node;
    node.stop_agent(nix::sys::signal::Signal::SIGKILL);
    // The pinned programs now look like another object's: the agent loads its own again.
    std::fs::remove_file(node.state_dir().join("datapath-object")).unwrap();
    node.start_agent();
    assert!(
        cross.grows(),
        "{mech}: cross-node stream stopped across the reload"
    );
    assert!(
        local.grows(),
        "{mech}: same-node stream stopped across the reload"
    );
    let st = node.berthctl(&["status"]);
    assert_eq!(st["datapath"]["adopted"], false, "programs reloaded: {st}");
    let after_hooks = assert_one_program_per_hook(node, mech);
    let after = link_and_prog_ids(&after_hooks);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (hook, (links, progs)) in &after {
        let (old_links, old_progs) = &before[hook];
        assert_ne!(progs, old_progs, "{hook}: still the old program");
        if mech == TCX {
            assert_eq!(
                links, old_links,
                "{hook}: link re-created instead of updated"
            );
        }
    }
    // The hooks run the programs now pinned.
    let pinned: Vec<u64> = ["berth_from_pod", "berth_to_pod", "berth_from_netdev"]
        .iter()
        .map(|p| {
            bpftool_json(&[
                "prog",
                "show",
                "pinned",
                node.pin_root.join("progs").join(p).to_str().unwrap(),
            ])["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    for (hook, h) in &after_hooks {
        let id = h.tcx.iter().chain(&h.netlink).next().unwrap().0;
        assert!(
            pinned.contains(&u64::from(id)),
            "{hook} runs {id}, pinned {pinned:?}"
        );
    }
    let (p3, ip3) = c.pod(0);
    assert!(ping_until(&p3.ns, &ip1, Duration::from_secs(5)));
    assert!(ping_until(&p1.ns, &ip3, Duration::from_secs(5)));
}

#[test]
fn tcx_program_reload_updates_links_in_place() {
    reload_keeps_streams(TCX);
}

#[test]
fn netlink_program_reload_replaces_filters() {
    reload_keeps_streams(NETLINK);
}

/// The host-side veth of the endpoint with address `ip`.
fn host_veth_of(node: &Node, ip: &str) -> String {
    let eps = node.berthctl(&["endpoints"]);
    eps.as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == format!("{ip}/32"))
        .and_then(|e| e["hostInterface"].as_str())
        .expect("endpoint of the pod")
        .to_string()
}

/// A pod deleted with DEL and one whose namespace simply vanished: their veths go, their TCX links
/// become defunct, and a housekeeping pass removes the pins, which frees the links (and the
/// programs they held).
#[test]
fn link_pins_of_deleted_pods_are_pruned() {
    let c = Cluster::with_agent_args(Mode::Native, 1, &["--tc-attach", TCX]);
    let node = &c.nodes[0].node;
    let (keep, ip_keep) = c.pod(0);
    let (deleted, ip_deleted) = c.pod(0);
    let (vanished, ip_vanished) = c.pod(0);
    let veth_deleted = host_veth_of(node, &ip_deleted);
    let veth_vanished = host_veth_of(node, &ip_vanished);
    let hooks = assert_one_program_per_hook(node, TCX);
    let gone_links: Vec<u64> = hooks
        .iter()
        .filter(|(k, _)| {
            k.starts_with(&format!("{veth_deleted}:"))
                || k.starts_with(&format!("{veth_vanished}:"))
        })
        .flat_map(|(_, h)| h.links.iter().map(|&l| u64::from(l)))
        .collect();
    assert_eq!(gone_links.len(), 4, "{hooks:?}");
    assert!(gone_links.iter().all(|l| all_link_ids().contains(l)));

    node.del(&deleted);
    drop(deleted);
    drop(vanished);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let pins = link_pins(node);
        let left: Vec<&String> = pins
            .iter()
            .filter(|p| {
                p.starts_with(&format!("{veth_deleted}:"))
                    || p.starts_with(&format!("{veth_vanished}:"))
            })
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pins of deleted pods left: {left:?}\n{}",
            node.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The links themselves are freed (the kernel releases them once the pin is gone).
    let deadline = Instant::now() + Duration::from_secs(10);
    while gone_links.iter().any(|l| all_link_ids().contains(l)) {
        assert!(Instant::now() < deadline, "defunct links still exist");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent_log(node).contains("removed pins of TCX links whose interface is gone"));
    // The remaining pod is untouched.
    assert_eq!(node.settled_host_links(1).len(), 1);
    assert_one_program_per_hook(node, TCX);
    let (again, ip_again) = c.pod(0);
    assert!(ping_until(&again.ns, &ip_keep, Duration::from_secs(5)));
    assert!(ping_until(&keep.ns, &ip_again, Duration::from_secs(5)));
    assert_one_program_per_hook(node, TCX);
}

/// With `auto` the agent asks the kernel: this one has TCX. The overlay device's hooks follow
/// the mechanism too, also when an agent is restarted with the fallback forced.
#[test]
fn auto_chooses_tcx_on_this_kernel_and_overlay_hooks_switch_too() {
    let mut c = Cluster::with_agent_args(Mode::Vxlan, 2, &["--tc-attach", "auto"]);
    let (p0, ip0) = c.pod(0);
    let (p1, ip1) = c.pod(1);
    assert!(ping_until(&p0.ns, &ip1, Duration::from_secs(5)));
    for n in &c.nodes {
        assert!(
            agent_log(&n.node).contains("TCX supported by this kernel"),
            "{}",
            n.node.log_tail()
        );
        let hooks = assert_one_program_per_hook(&n.node, TCX);
        assert!(hooks.contains_key("berth_vxlan:egress"), "{hooks:?}");
    }
    let stream = Stream::start(&p1, &p0, &ip1);
    assert!(stream.grows());
    let node = &mut c.nodes[0].node;
    node.stop_agent(nix::sys::signal::Signal::SIGTERM);
    node.set_agent_arg("--tc-attach", NETLINK);
    node.start_agent();
    assert!(
        stream.grows(),
        "stream stopped when node 0 moved to netlink"
    );
    assert_one_program_per_hook(node, NETLINK);
    transfer_exact(&p0, &p1, &ip0, 1 << 20);
    assert_one_program_per_hook(&c.nodes[1].node, TCX);
}

/// A netlink → TCX switch cut short by a crash (some pods moved, others still on their clsact
/// filter, the switch not yet recorded as complete) is finished by the next start, although the
/// programs are adopted.
#[test]
fn interrupted_switch_is_finished_at_the_next_start() {
    let mut c = Cluster::with_agent_args(Mode::Native, 1, &["--tc-attach", TCX]);
    let (moved, _) = c.pod(0);
    let (_left, ip_left) = c.pod(0);
    let node = &mut c.nodes[0].node;
    let veth = host_veth_of(node, &ip_left);
    // The first housekeeping pass records the switch as complete.
    let state = node.state_dir();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state.join("datapath-tc-attach").exists() {
        assert!(Instant::now() < deadline, "switch never recorded complete");
        std::thread::sleep(Duration::from_millis(100));
    }
    node.stop_agent(nix::sys::signal::Signal::SIGKILL);
    // What the crash left: this pod's hooks still on clsact filters (no link, no pin) and only the
    // pending record.
    for (hook, prog) in [("ingress", "berth_from_pod"), ("egress", "berth_to_pod")] {
        let pin = node.pin_root.join("links").join(format!("{veth}:{hook}"));
        std::fs::remove_file(&pin).unwrap();
        let prog_pin = node.pin_root.join("progs").join(prog);
        let _ = node
            .ns
            .exec(&["tc", "qdisc", "add", "dev", &veth, "clsact"]);
        node.ns.exec_ok(&[
            "tc",
            "filter",
            "add",
            "dev",
            &veth,
            hook,
            "prio",
            "1",
            "handle",
            "1",
            "bpf",
            "da",
            "pinned",
            prog_pin.to_str().unwrap(),
        ]);
    }
    std::fs::rename(
        state.join("datapath-tc-attach"),
        state.join("datapath-tc-attach.pending"),
    )
    .unwrap();
    std::fs::write(state.join("datapath-tc-attach"), "netlink").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while hook_of(&node.ns, &veth, "ingress").berth_tcx()
        + hook_of(&node.ns, &veth, "egress").berth_tcx()
        > 0
    {
        assert!(Instant::now() < deadline, "unpinned links still attached");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(hook_of(&node.ns, &veth, "ingress").berth_netlink(), 1);
    node.start_agent();
    let st = node.berthctl(&["status"]);
    assert_eq!(st["datapath"]["adopted"], true, "{st}");
    assert_one_program_per_hook(node, TCX);
    assert!(ping_until(&moved.ns, &ip_left, Duration::from_secs(5)));
    let (_again, ip_again) = c.pod(0);
    assert!(ping_until(&moved.ns, &ip_again, Duration::from_secs(5)));
}
