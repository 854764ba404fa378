//! Cluster networking end to end: three nodes (network namespaces, each with its own berth-agent)
//! on a shared private network, the manifest directory as their API server, pods on every node
//! talking across nodes in both routing modes (native routing and VXLAN).
use berth_ebpf_common::{drop_reason, metric};
use berth_tests::{
    cluster::{
        Cluster, Mode, Stream, arp_frame, ipv4_echo, ipv6_router_advertisement, mac_of, ping_ttl,
        ping_until, recv_raw_frame, send_raw_frame, transfer_exact,
    },
    cni::Pod,
    netns::NetNs,
};
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

fn mtu_of(pod: &Pod) -> u32 {
    // Not /sys/class/net: sysfs shows the namespace of whoever mounted it.
    let out = pod.ns.exec_ok(&["ip", "-o", "link", "show", "eth0"]);
    let mut words = out.split_whitespace();
    words.find(|w| *w == "mtu");
    words.next().unwrap().parse().unwrap()
}

fn pods_talk_across_nodes(mode: Mode) {
    let c = Cluster::new(mode, 3);
    for (i, n) in c.nodes.iter().enumerate() {
        // The pod CIDR comes from the node's own Node object (no --pod-cidr given).
        let st = n.node.berthctl(&["status"]);
        assert_eq!(st["ipam"]["podCidr"], n.pod_cidr.as_str(), "{st}");
        assert_eq!(st["routing"]["mode"], mode.flag(), "{st}");
        assert_eq!(st["routing"]["uplink"], "eth0", "{st}");
        assert_eq!(st["routing"]["nodeIp"], n.ip.as_str(), "{st}");
        assert_eq!(st["routing"]["podMtu"], mode.pod_mtu(), "{st}");
        let routes = c.wait_routes(i, &c.remote_cidrs(i), Duration::from_secs(10));
        let mut want = c.remote_cidrs(i);
        want.sort();
        assert_eq!(routes, want, "node {i} routes");
        let st = n.node.berthctl(&["status"]);
        assert_eq!(st["routing"]["remotePodCidrs"], 2, "{st}");
    }
    let pods: Vec<(Pod, String)> = (0..3).map(|i| c.pod(i)).collect();
    for (i, (p, ip)) in pods.iter().enumerate() {
        assert_eq!(mtu_of(p), mode.pod_mtu(), "pod MTU on node {i}");
        let cidr: ipnet::Ipv4Net = c.nodes[i].pod_cidr.parse().unwrap();
        assert!(cidr.contains(&ip.parse::<Ipv4Addr>().unwrap()));
    }
    // Every pair, both ways; two router hops (the source node and the destination node).
    for (a, (pa, _)) in pods.iter().enumerate() {
        for (b, (_, ipb)) in pods.iter().enumerate() {
            if a == b {
                continue;
            }
            assert!(
                ping_until(&pa.ns, ipb, Duration::from_secs(5)),
                "{mode:?}: pod on node {a} cannot reach pod on node {b} ({ipb})\n{}",
                c.nodes[a].node.log_tail()
            );
            assert_eq!(
                ping_ttl(&pa.ns, ipb),
                Some(62),
                "{mode:?}: TTL from node {a} to node {b}"
            );
        }
    }
    // IPv4 options (record route) and fragments (a datagram larger than the MTU) cross nodes.
    let rr = pods[0]
        .0
        .ns
        .exec(&["ping", "-c", "1", "-W", "2", "-R", &pods[1].1]);
    assert!(
        rr.status.success(),
        "{mode:?}: ping with IP options: {}",
        String::from_utf8_lossy(&rr.stdout)
    );
    let frag = pods[2]
        .0
        .ns
        .exec(&["ping", "-c", "2", "-W", "2", "-s", "4000", &pods[0].1]);
    assert!(
        frag.status.success(),
        "{mode:?}: fragmented ping: {}",
        String::from_utf8_lossy(&frag.stdout)
    );
    // The host reaches remote pods too (kernel routes).
    assert!(ping_until(
        &c.nodes[0].node.ns,
        &pods[1].1,
        Duration::from_secs(5)
    ));
    // TCP both ways, byte-exact, one of them large.
    transfer_exact(&pods[1].0, &pods[0].0, &pods[1].1, 32 << 20);
    transfer_exact(&pods[0].0, &pods[2].0, &pods[0].1, 1 << 20);
    // DF pings: at the pod MTU they pass, one byte above they need fragmentation.
    let mtu = mode.pod_mtu();
    let fits = (mtu - 28).to_string();
    let too_big = (mtu - 27).to_string();
    let ok = pods[0].0.ns.exec(&[
        "ping", "-c", "1", "-W", "2", "-M", "do", "-s", &fits, &pods[2].1,
    ]);
    assert!(
        ok.status.success(),
        "DF ping of {mtu} bytes: {}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let big = pods[0].0.ns.exec(&[
        "ping", "-c", "1", "-W", "2", "-M", "do", "-s", &too_big, &pods[2].1,
    ]);
    assert!(!big.status.success(), "DF ping above the MTU went through");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&big.stdout),
        String::from_utf8_lossy(&big.stderr)
    )
    .to_lowercase();
    assert!(
        text.contains("message too long") || text.contains("frag needed"),
        "expected fragmentation needed: {text}"
    );
}

#[test]
fn native_routing_pods_talk_across_nodes() {
    pods_talk_across_nodes(Mode::Native);
}

#[test]
fn vxlan_pods_talk_across_nodes() {
    pods_talk_across_nodes(Mode::Vxlan);
}

fn node_leaves_and_returns(mode: Mode) {
    let c = Cluster::new(mode, 3);
    let (p0, _) = c.pod(0);
    let (_p2, ip2) = c.pod(2);
    assert!(ping_until(&p0.ns, &ip2, Duration::from_secs(5)));
    let started = Instant::now();
    c.remove_node_object(2);
    let only_1 = vec![c.nodes[1].pod_cidr.clone()];
    assert_eq!(
        c.wait_routes(0, &only_1, Duration::from_secs(10)),
        only_1,
        "node 2's route is gone"
    );
    eprintln!(
        "{mode:?}: route removed {:?} after the Node object",
        started.elapsed()
    );
    assert!(
        !p0.ns
            .exec(&["ping", "-c", "1", "-W", "1", &ip2])
            .status
            .success(),
        "pods of a removed node are still reachable"
    );
    let started = Instant::now();
    c.restore_node_object(2);
    let mut all = c.remote_cidrs(0);
    all.sort();
    assert_eq!(c.wait_routes(0, &all, Duration::from_secs(10)), all);
    eprintln!(
        "{mode:?}: route back {:?} after the Node object",
        started.elapsed()
    );
    assert!(
        ping_until(&p0.ns, &ip2, Duration::from_secs(5)),
        "{mode:?}: no traffic after the node came back\nnode 0 routes:\n{}\nipcache:\n{}\nneighbours:\n{}\nnode 2 routes:\n{}\nhost ping: {:?}\nnode 2 log:\n{}",
        c.nodes[0].node.ns.exec_ok(&["ip", "route"]),
        String::from_utf8_lossy(
            &std::process::Command::new("bpftool")
                .args(["map", "dump", "pinned"])
                .arg(c.nodes[0].node.pin_root.join("maps/BERTH_IPCACHE"))
                .output()
                .unwrap()
                .stdout
        ),
        c.nodes[0].node.ns.exec_ok(&["ip", "neigh"]),
        c.nodes[2].node.ns.exec_ok(&["ip", "route"]),
        c.nodes[0]
            .node
            .ns
            .exec(&["ping", "-c", "1", "-W", "1", &ip2]),
        c.nodes[2].node.log_tail(),
    );
}

#[test]
fn native_node_removed_from_source_loses_routes_and_gets_them_back() {
    node_leaves_and_returns(Mode::Native);
}

#[test]
fn vxlan_node_removed_from_source_loses_tunnel_and_gets_it_back() {
    node_leaves_and_returns(Mode::Vxlan);
}

#[test]
fn node_ip_change_moves_the_route_and_not_ready_keeps_it() {
    for mode in [Mode::Native, Mode::Vxlan] {
        let c = Cluster::new(mode, 3);
        let (p0, _) = c.pod(0);
        let (_p2, ip2) = c.pod(2);
        assert!(ping_until(&p0.ns, &ip2, Duration::from_secs(5)));
        // Node 2 moves to another address of the private network.
        let new_ip = format!("{}.{}", berth_tests::cluster::PRIVATE_NET, 52);
        c.nodes[2]
            .node
            .ns
            .exec_ok(&["ip", "addr", "add", &format!("{new_ip}/24"), "dev", "eth0"]);
        c.write_node(&c.nodes[2].name, &new_ip, &c.nodes[2].pod_cidr);
        let deadline = Instant::now() + Duration::from_secs(10);
        let via_new = |c: &Cluster| match mode {
            Mode::Native => c.nodes[0]
                .node
                .ns
                .exec_ok(&["ip", "route", "show", &c.nodes[2].pod_cidr])
                .contains(&new_ip),
            Mode::Vxlan => {
                let out = std::process::Command::new("bpftool")
                    .args(["-j", "map", "dump", "pinned"])
                    .arg(c.nodes[0].node.pin_root.join("maps/BERTH_IPCACHE"))
                    .output()
                    .unwrap();
                // The tunnel endpoint bytes of the new address (network order).
                let want: Vec<String> = new_ip
                    .parse::<Ipv4Addr>()
                    .unwrap()
                    .octets()
                    .iter()
                    .map(|b| format!("0x{b:02x}"))
                    .collect();
                String::from_utf8_lossy(&out.stdout)
                    .contains(&format!("\"value\":[\"{}\"", want.join("\",\"")))
            }
        };
        while !via_new(&c) {
            assert!(
                Instant::now() < deadline,
                "{mode:?}: node 0 still reaches node 2 at its old address"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        assert!(ping_until(&p0.ns, &ip2, Duration::from_secs(5)));
        // A NotReady node keeps its routes: its pods may still run.
        c.write_node_with(
            &c.nodes[1].name,
            &c.nodes[1].ip,
            &c.nodes[1].pod_cidr,
            false,
        );
        let (_p1, ip1) = c.pod(1);
        std::thread::sleep(Duration::from_millis(500));
        let mut all = c.remote_cidrs(0);
        all.sort();
        let mut have = c.berth_routes(0);
        have.sort();
        assert_eq!(have, all, "{mode:?}: routes after node 1 became NotReady");
        assert!(ping_until(&p0.ns, &ip1, Duration::from_secs(5)));
    }
}

/// The agent with the Kubernetes API as its source (kube-rs against the test API server, which
/// listens inside the node's namespace): pod CIDR from its Node object, routes from Node events,
/// an API server restart.
#[test]
fn agent_follows_the_kubernetes_api() {
    use berth_tests::{apiserver::ApiServer, cluster::node_manifest, cni::in_netns};
    let ns = NetNs::new("bka");
    ns.exec_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    ns.exec_ok(&["ip", "addr", "add", "192.168.77.10/24", "dev", "eth0"]);
    ns.exec_ok(&["ip", "link", "set", "eth0p", "up"]);
    ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Bound inside the node's namespace: the agent reaches it on its own loopback.
    let api = in_netns(&ns, || rt.block_on(ApiServer::start()));
    api.apply(node_manifest("kn0", "192.168.77.10", "10.2.30.0/24"));
    api.apply(node_manifest("kn1", "192.168.77.11", "10.2.31.0/24"));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let node = berth_tests::cni::Node::build(
        ns,
        "kn0",
        None,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--routing",
            "native",
        ],
    );
    let st = node.berthctl(&["status"]);
    assert_eq!(st["ipam"]["podCidr"], "10.2.30.0/24", "{st}");
    fn berth_routes(node: &berth_tests::cni::Node, want: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = node
                .ns
                .exec_ok(&["ip", "-4", "route", "show", "proto", "190"]);
            let mut have: Vec<String> = out
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect();
            have.sort();
            if have == want || Instant::now() > deadline {
                return have;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    let mut node = node;
    let routes = |node: &berth_tests::cni::Node, want: &[&str]| berth_routes(node, want);
    assert_eq!(routes(&node, &["10.2.31.0/24"]), ["10.2.31.0/24"]);
    api.apply(node_manifest("kn2", "192.168.77.12", "10.2.32.0/24"));
    assert_eq!(
        routes(&node, &["10.2.31.0/24", "10.2.32.0/24"]),
        ["10.2.31.0/24", "10.2.32.0/24"]
    );
    api.delete("Node", None, "kn1");
    assert_eq!(routes(&node, &["10.2.32.0/24"]), ["10.2.32.0/24"]);
    // The API server restarts (every connection dropped); changes made meanwhile still arrive.
    in_netns(&node.ns, || rt.block_on(api.stop()));
    api.apply(node_manifest("kn3", "192.168.77.13", "10.2.33.0/24"));
    in_netns(&node.ns, || rt.block_on(api.resume()));
    assert_eq!(
        routes(&node, &["10.2.32.0/24", "10.2.33.0/24"]),
        ["10.2.32.0/24", "10.2.33.0/24"],
        "{}",
        node.log_tail()
    );
    // Pods get addresses from the Node's pod CIDR.
    let pod = Pod::new();
    let ip: Ipv4Addr = node.add(&pod).parse().unwrap();
    assert!(
        "10.2.30.0/24"
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .contains(&ip),
        "{ip}"
    );
    // The agent restarts while the API server is down: it serves with the pod CIDR it had and
    // leaves the routes alone (an unsynced, empty view must not remove them).
    in_netns(&node.ns, || rt.block_on(api.stop()));
    node.stop_agent(nix::sys::signal::Signal::SIGKILL);
    node.start_agent();
    let st = node.berthctl(&["status"]);
    assert_eq!(st["ipam"]["podCidr"], "10.2.30.0/24", "{st}");
    assert_eq!(
        routes(&node, &["10.2.32.0/24", "10.2.33.0/24"]),
        ["10.2.32.0/24", "10.2.33.0/24"],
        "{}",
        std::fs::read_to_string(node.agent_log())
            .unwrap()
            .lines()
            .filter(|l| !l.contains("kube_client") && !l.contains("watch of"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(node.log_tail().contains("pod CIDR from the agent's state"));
    api.delete("Node", None, "kn3");
    in_netns(&node.ns, || rt.block_on(api.resume()));
    assert_eq!(
        routes(&node, &["10.2.32.0/24"]),
        ["10.2.32.0/24"],
        "{}",
        node.log_tail()
    );
    drop(node);
    drop(api);
}

#[test]
fn agent_kill9_keeps_cross_node_stream_flowing() {
    for mode in [Mode::Native, Mode::Vxlan] {
        let mut c = Cluster::new(mode, 2);
        let (p0, _) = c.pod(0);
        let (p1, ip1) = c.pod(1);
        assert!(ping_until(&p0.ns, &ip1, Duration::from_secs(5)));
        let stream = Stream::start(&p1, &p0, &ip1);
        assert!(stream.grows(), "{mode:?}: stream does not flow");
        c.nodes[0]
            .node
            .stop_agent(nix::sys::signal::Signal::SIGKILL);
        assert!(stream.grows(), "{mode:?}: stream stopped with the agent");
        c.nodes[0].node.start_agent();
        assert!(stream.grows(), "{mode:?}: stream stopped after the restart");
        let st = c.nodes[0].node.berthctl(&["status"]);
        assert_eq!(st["datapath"]["adopted"], true, "{st}");
        let (p2, _) = c.pod(0);
        assert!(ping_until(&p2.ns, &ip1, Duration::from_secs(5)));
    }
}

/// Replaces a pinned map by one of another layout, as an older agent would have left it.
fn plant_old_map(pin_root: &std::path::Path, name: &str, spec: &[&str]) {
    let pin = pin_root.join("maps").join(name);
    std::fs::remove_file(&pin).unwrap();
    let mut args = vec!["map", "create", pin.to_str().unwrap()];
    args.extend_from_slice(spec);
    args.extend_from_slice(&["name", name]);
    let out = std::process::Command::new("bpftool")
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn value_size_of(pin_root: &std::path::Path, name: &str) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin_root.join("maps").join(name))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["bytes_value"].as_u64().unwrap()
}

#[test]
fn map_layout_upgrade_keeps_live_traffic() {
    let mut c = Cluster::new(Mode::Native, 2);
    let (p0, _) = c.pod(0);
    let (p0b, ip0b) = c.pod(0);
    let (p1, ip1) = c.pod(1);
    assert!(ping_until(&p0.ns, &ip1, Duration::from_secs(5)));
    let cross = Stream::start(&p1, &p0, &ip1);
    let local = Stream::start(&p0b, &p0, &ip0b);
    assert!(cross.grows() && local.grows());
    let node = &mut c.nodes[0].node;
    node.stop_agent(nix::sys::signal::Signal::SIGKILL);
    // What an agent with other layouts would have pinned: the running programs keep their maps.
    let pins = node.pin_root.clone();
    plant_old_map(
        &pins,
        "BERTH_ENDPOINTS",
        &["type", "hash", "key", "4", "value", "16", "entries", "4096"],
    );
    plant_old_map(
        &pins,
        "BERTH_IPCACHE",
        &[
            "type", "lpm_trie", "key", "8", "value", "8", "entries", "1024", "flags", "1",
        ],
    );
    plant_old_map(
        &pins,
        "BERTH_CONFIG",
        &["type", "array", "key", "4", "value", "8", "entries", "1"],
    );
    let layout_file = node.state_dir().join(berth_agent::datapath::LAYOUT_FILE);
    std::fs::write(&layout_file, "1").unwrap();
    assert!(
        cross.grows() && local.grows(),
        "traffic stopped with the agent"
    );
    node.start_agent();
    assert!(
        cross.grows(),
        "cross-node stream stopped across the upgrade"
    );
    assert!(local.grows(), "same-node stream stopped across the upgrade");
    let log = std::fs::read_to_string(node.agent_log()).unwrap();
    assert!(log.contains("map layout differs"), "{log}");
    let size = |n: usize| n as u64;
    use berth_ebpf_common::{DatapathConfig, EndpointInfo, IpcacheEntry};
    use std::mem::size_of;
    assert_eq!(
        value_size_of(&pins, "BERTH_ENDPOINTS"),
        size(size_of::<EndpointInfo>())
    );
    assert_eq!(
        value_size_of(&pins, "BERTH_IPCACHE"),
        size(size_of::<IpcacheEntry>())
    );
    assert_eq!(
        value_size_of(&pins, "BERTH_CONFIG"),
        size(size_of::<DatapathConfig>())
    );
    assert_eq!(
        std::fs::read_to_string(&layout_file).unwrap().trim(),
        berth_ebpf_common::LAYOUT_VERSION.to_string()
    );
    let st = node.berthctl(&["status"]);
    assert_eq!(
        st["datapath"]["adopted"], false,
        "programs were reloaded: {st}"
    );
    // New pods and new connections work on the re-created maps, both ways.
    let (p3, ip3) = c.pod(0);
    assert!(ping_until(&p3.ns, &ip1, Duration::from_secs(5)));
    assert!(ping_until(&p1.ns, &ip3, Duration::from_secs(5)));
    assert!(ping_until(&p3.ns, &ip0b, Duration::from_secs(5)));
}

#[test]
fn pod_cannot_spoof_arp_or_send_ipv6_or_a_foreign_source() {
    let c = Cluster::new(Mode::Native, 2);
    let node = &c.nodes[0].node;
    let (p0, ip0) = c.pod(0);
    let (_p0b, ip0b) = c.pod(0);
    let (_p1, ip1) = c.pod(1);
    let mac = mac_of(&p0.ns, "eth0");
    let octets = |ip: &str| ip.parse::<Ipv4Addr>().unwrap().octets();
    let drops = |reason: u32| node.metric_packets(0, metric::DROP_BASE + reason);

    // A valid ARP request for the gateway is answered by the datapath with the host veth's MAC.
    let gw = [169, 254, 1, 1];
    let req = arp_frame(1, mac, octets(&ip0), gw);
    let reply = recv_raw_frame(&p0.ns, "eth0", Duration::from_secs(3), Some(req), |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
    })
    .expect("ARP request for the gateway answered");
    assert_eq!(&reply[28..32], &gw, "reply is for the gateway address");
    assert_eq!(&reply[0..6], &mac, "reply goes to the pod");

    // ARP claiming another pod's address: dropped and counted.
    let before = drops(drop_reason::ARP_SPOOFED);
    for _ in 0..3 {
        send_raw_frame(
            &p0.ns,
            "eth0",
            &arp_frame(2, mac, octets(&ip0b), octets(&ip1)),
        );
    }
    // ARP with the right address but a foreign MAC.
    send_raw_frame(
        &p0.ns,
        "eth0",
        &arp_frame(1, [2, 0, 0, 0, 0, 9], octets(&ip0), gw),
    );
    assert_eq!(drops(drop_reason::ARP_SPOOFED), before + 4);

    // An IPv6 router advertisement: dropped and counted; the node learns no IPv6 route.
    let before = drops(drop_reason::IPV6);
    send_raw_frame(&p0.ns, "eth0", &ipv6_router_advertisement(mac));
    assert_eq!(drops(drop_reason::IPV6), before + 1);
    let v6 = node.ns.exec_ok(&["ip", "-6", "route", "show"]);
    assert!(!v6.contains("2001:"), "{v6}");

    // IPv4 from a foreign source address, towards a remote pod: dropped and counted.
    let before = drops(drop_reason::SPOOFED_SOURCE);
    let gw_mac = mac_of(&node.ns, &host_veth_of(node, &ip0));
    send_raw_frame(
        &p0.ns,
        "eth0",
        &ipv4_echo(gw_mac, mac, octets(&ip0b), octets(&ip1)),
    );
    assert_eq!(drops(drop_reason::SPOOFED_SOURCE), before + 1);
    // The pod's own traffic still flows.
    assert!(ping_until(&p0.ns, &ip1, Duration::from_secs(5)));
}

fn host_veth_of(node: &berth_tests::cni::Node, ip: &str) -> String {
    let eps = node.berthctl(&["endpoints"]);
    eps.as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == format!("{ip}/32"))
        .and_then(|e| e["hostInterface"].as_str())
        .expect("endpoint of the pod")
        .to_string()
}
