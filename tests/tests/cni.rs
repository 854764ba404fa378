//! Privileged end-to-end tests of pod networking on one node: the real `berth` CNI binary, the
//! real agent, the eBPF datapath, network namespaces as node and pods.
use berth_proto::agent::{
    AllocateRequest, Attachment, CreateEndpointRequest, LocalError, LocalRequest, LocalResponse,
    ReleaseRequest, local_error::Code, local_request::Op, local_response,
};
use berth_tests::cni::{NODE_IP, Node, Pod, in_netns};
use berth_tests::netns::{NetNs, workspace_bin};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Sends 1 MiB from a client in `client_ns` to an echo server in `server_ns` and checks the echo.
fn tcp_roundtrip(client_ns: &NetNs, server_ns: &NetNs, server_ip: &str) {
    let listener = in_netns(server_ns, || TcpListener::bind("0.0.0.0:0").expect("bind"));
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).expect("server read");
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).expect("server write");
        }
    });
    let payload: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let addr = format!("{server_ip}:{port}");
    let mut conn = in_netns(client_ns, || {
        TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    });
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let writer = {
        let mut w = conn.try_clone().unwrap();
        let p = payload.clone();
        std::thread::spawn(move || {
            w.write_all(&p).expect("client write");
            w.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut echoed = Vec::new();
    conn.read_to_end(&mut echoed).expect("client read");
    writer.join().unwrap();
    server.join().unwrap();
    assert!(
        echoed == payload,
        "TCP echo to {addr} differs ({} bytes back)",
        echoed.len()
    );
}

#[test]
fn three_pods_talk_to_each_other_and_the_host() {
    let node = Node::new();
    let pods: Vec<Pod> = (0..3).map(|_| Pod::new()).collect();
    let ips: Vec<String> = pods.iter().map(|p| node.add(p)).collect();
    let mut sorted = ips.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 3, "addresses not distinct: {ips:?}");

    for (i, p) in pods.iter().enumerate() {
        for (j, ip) in ips.iter().enumerate() {
            if i != j {
                // The datapath redirects pod to pod without routing: the TTL is not decremented.
                let out = p.ns.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", ip]);
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success(),
                    "pod {i} cannot ping pod {j} ({ip}): {text}"
                );
                assert!(
                    text.contains("ttl=64"),
                    "pod {i} → {ip} was routed, not redirected: {text}"
                );
            }
        }
        assert!(p.ping(NODE_IP), "pod {i} cannot reach the host");
        let out = node
            .ns
            .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", &ips[i]]);
        assert!(out.status.success(), "host cannot reach pod {i}");
    }
    tcp_roundtrip(&pods[0].ns, &pods[1].ns, &ips[1]);
    tcp_roundtrip(&pods[1].ns, &pods[0].ns, &ips[0]);
    tcp_roundtrip(&pods[2].ns, &node.ns, NODE_IP);
    tcp_roundtrip(&node.ns, &pods[2].ns, &ips[2]);

    let eps = node.berthctl(&["endpoints"]);
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), 3);
    for e in eps {
        assert_eq!(e["state"], "ready");
        assert_eq!(e["pod"], "default/test");
        assert!(
            e["txPackets"].as_u64().unwrap() > 0 && e["rxBytes"].as_u64().unwrap() > 1_000_000 / 2,
            "{e}"
        );
    }
    let status = node.berthctl(&["status"]);
    assert_eq!(status["datapath"]["loaded"], true);
    assert_eq!(status["ipam"]["allocated"], 3);
}

#[test]
fn spoofed_source_is_dropped_and_counted() {
    let node = Node::new();
    let a = Pod::new();
    let b = Pod::new();
    let _ip_a = node.add(&a);
    let ip_b = node.add(&b);
    // Pod a takes an address that is not its own and tries to reach b from it.
    a.ns.exec_ok(&["ip", "addr", "add", "10.2.0.200/32", "dev", "eth0"]);
    let out = a.ns.exec(&[
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        "10.2.0.200",
        &ip_b,
    ]);
    assert!(!out.status.success(), "spoofed packets were delivered");
    // Unknown sources are counted under endpoint 0 with their reason.
    let spoofed = node.metric_packets(
        0,
        berth_ebpf_common::metric::DROP_BASE + berth_ebpf_common::drop_reason::SPOOFED_SOURCE,
    );
    assert!(spoofed >= 2, "spoofed-source drops not counted ({spoofed})");
    // b received nothing from the spoofed address.
    let eps = node.berthctl(&["endpoints"]);
    let b_ep = eps
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == format!("{ip_b}/32"))
        .unwrap()
        .clone();
    assert_eq!(b_ep["rxPackets"], 0, "{b_ep}");
    assert!(a.ping(&ip_b), "a's own address still works");
}

#[test]
fn cni_verbs_and_error_codes() {
    let mut node = Node::new();
    let pod = Pod::new();
    let netns = pod.ns.path().to_str().unwrap().to_string();

    // The local API socket is private to root.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "agent socket mode {mode:o}");

    // VERSION needs nothing else.
    let v = node.cni(&[("CNI_COMMAND", "VERSION")], "").json();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("0.4.0"))
    );
    assert_eq!(node.cni(&[("CNI_COMMAND", "STATUS")], &node.conf()).code, 0);

    let add = node.verb("ADD", &pod.cid, Some(&netns), "eth0");
    assert_eq!(add.code, 0, "{add:?}");
    let result = add.json();
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], netns.as_str());
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(result["ips"][0]["interface"], 1);

    // CHECK with the ADD result as prevResult.
    let mut conf: Value = serde_json::from_str(&node.conf()).unwrap();
    conf["prevResult"] = result.clone();
    let check_env = [
        ("CNI_COMMAND", "CHECK"),
        ("CNI_CONTAINERID", pod.cid.as_str()),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    let check = node.cni(&check_env, &conf.to_string());
    assert_eq!(check.code, 0, "{check:?}");

    // Interface already present.
    let again = node.verb("ADD", &pod.cid, Some(&netns), "eth0");
    assert_eq!(again.error_code(), 101);
    assert!(again.json()["details"].as_str().unwrap().contains("eth0"));

    // Environment errors name the variable.
    let e = node.cni(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_IFNAME", "eth0"),
        ],
        &node.conf(),
    );
    assert_eq!(e.error_code(), 4);
    assert!(e.json()["details"].as_str().unwrap().contains("CNI_NETNS"));
    let e = node.verb("ADD", "-bad-id", Some(&netns), "eth1");
    assert_eq!(e.error_code(), 4);
    let e = node.verb("ADD", "okid", Some("/run/netns/does-not-exist"), "eth0");
    assert_eq!(e.error_code(), 4);
    let e = node.cni(&[("CNI_COMMAND", "FROB")], &node.conf());
    assert_eq!(e.error_code(), 4);

    // Config errors.
    let add_env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "cfg1"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth1"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    assert_eq!(node.cni(&add_env, "{not json").error_code(), 6);
    assert_eq!(node.cni(&add_env, "").error_code(), 6);
    assert_eq!(
        node.cni(
            &add_env,
            r#"{"cniVersion":"2.0.0","name":"b","type":"berth"}"#
        )
        .error_code(),
        1
    );
    assert_eq!(
        node.cni(&add_env, r#"{"cniVersion":"1.1.0","type":"berth"}"#)
            .error_code(),
        7
    );
    let e = node.cni(
        &add_env,
        r#"{"cniVersion":"1.1.0","name":"b","type":"berth","ipam":{"type":"host-local"}}"#,
    );
    assert_eq!(e.error_code(), 2);
    assert!(
        e.json()["details"]
            .as_str()
            .unwrap()
            .contains("ipam.type=host-local")
    );

    // CHECK of an unknown container.
    assert_eq!(
        node.verb("CHECK", "nosuch", Some(&netns), "eth0")
            .error_code(),
        3
    );

    // DEL twice, then CHECK says unknown.
    assert_eq!(node.verb("DEL", &pod.cid, Some(&netns), "eth0").code, 0);
    assert_eq!(node.verb("DEL", &pod.cid, Some(&netns), "eth0").code, 0);
    assert_eq!(
        node.verb("DEL", &pod.cid, None, "eth0").code,
        0,
        "DEL without CNI_NETNS"
    );
    assert_eq!(
        node.verb("CHECK", &pod.cid, Some(&netns), "eth0")
            .error_code(),
        3
    );
    let left = node.settled_host_links(0);
    assert!(left.is_empty(), "{left:?}");

    // DEL with the netns gone.
    let gone = Pod::new();
    node.add(&gone);
    let (gone_cid, gone_path) = (
        gone.cid.clone(),
        gone.ns.path().to_str().unwrap().to_string(),
    );
    drop(gone);
    assert_eq!(
        node.verb("DEL", &gone_cid, Some(&gone_path), "eth0").code,
        0
    );
    assert!(node.settled_host_links(0).is_empty());
    assert_eq!(node.berthctl(&["status"])["ipam"]["allocated"], 0);

    // GC accepts both keys and releases what is not listed.
    let keep = Pod::new();
    let drop_me = Pod::new();
    node.add(&keep);
    node.add(&drop_me);
    let gc_env = [("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")];
    let mut gc_conf: Value = serde_json::from_str(&node.conf()).unwrap();
    gc_conf["cni.dev/valid-attachments"] = json!([{"containerID": keep.cid, "ifname": "eth0"}]);
    assert_eq!(node.cni(&gc_env, &gc_conf.to_string()).code, 0);
    assert_eq!(node.berthctl(&["status"])["ipam"]["allocated"], 1);
    assert_eq!(node.settled_host_links(1).len(), 1);
    let mut old_conf: Value = serde_json::from_str(&node.conf()).unwrap();
    old_conf["cni.dev/attachments"] = json!([{"containerID": keep.cid, "ifname": "eth0"}]);
    assert_eq!(node.cni(&gc_env, &old_conf.to_string()).code, 0);
    assert_eq!(
        node.berthctl(&["status"])["ipam"]["allocated"],
        1,
        "older key keeps the attachment"
    );
    assert_eq!(
        node.cni(&[("CNI_COMMAND", "GC")], &node.conf())
            .error_code(),
        4,
        "GC needs CNI_PATH"
    );

    // Agent down: ADD and CHECK say "try again later", STATUS says "not available", DEL queues.
    node.stop_agent(Signal::SIGTERM);
    let other = Pod::new();
    assert_eq!(
        node.verb(
            "ADD",
            &other.cid,
            Some(other.ns.path().to_str().unwrap()),
            "eth0"
        )
        .error_code(),
        11
    );
    assert_eq!(
        node.cni(&[("CNI_COMMAND", "STATUS")], &node.conf())
            .error_code(),
        50
    );
    assert_eq!(
        node.verb(
            "CHECK",
            &keep.cid,
            Some(keep.ns.path().to_str().unwrap()),
            "eth0"
        )
        .error_code(),
        11
    );
    let del = node.verb(
        "DEL",
        &keep.cid,
        Some(keep.ns.path().to_str().unwrap()),
        "eth0",
    );
    assert_eq!(del.code, 0, "{del:?}");
    let queued = std::fs::read_dir(node.cni_state_dir().join("delete-queue"))
        .unwrap()
        .count();
    assert_eq!(queued, 1);
    assert!(
        node.host_links().is_empty(),
        "DEL removed the interface even with the agent down"
    );

    // The restarted agent drains the queue and frees the address.
    node.start_agent();
    let status = node.berthctl(&["status"]);
    assert_eq!(status["ipam"]["allocated"], 0, "{status}");
    assert_eq!(status["deleteQueueDrained"], 1);
    assert_eq!(
        std::fs::read_dir(node.cni_state_dir().join("delete-queue"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(node.endpoint_map_entries(), 0);
}

#[test]
fn agent_kill9_keeps_tcp_flowing_and_restart_adopts_pins() {
    let mut node = Node::new();
    let a = Pod::new();
    let b = Pod::new();
    let _ip_a = node.add(&a);
    let ip_b = node.add(&b);

    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let listener = in_netns(&b.ns, || TcpListener::bind("0.0.0.0:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    let server = {
        let received = received.clone();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => panic!("stream broke: {e}"),
                }
            }
        })
    };
    let addr = format!("{ip_b}:{port}");
    let conn = in_netns(&a.ns, || {
        TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)).unwrap()
    });
    let client = {
        let stop = stop.clone();
        let mut conn = conn;
        std::thread::spawn(move || {
            conn.set_write_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let chunk = vec![0x5au8; 16 * 1024];
            while !stop.load(Ordering::Relaxed) {
                conn.write_all(&chunk).expect("stream broke while writing");
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let wait_for = |min: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while received.load(Ordering::Relaxed) < min {
            assert!(
                Instant::now() < deadline,
                "stream stalled at {} bytes",
                received.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(1 << 20);

    node.stop_agent(Signal::SIGKILL);
    let at_kill = received.load(Ordering::Relaxed);
    wait_for(at_kill + (4 << 20)); // 4 MiB more while no agent runs

    node.start_agent();
    let status = node.berthctl(&["status"]);
    assert_eq!(
        status["datapath"]["adopted"], true,
        "restarted agent did not adopt the pins: {status}"
    );
    assert_eq!(status["endpoints"], 2);
    let at_restart = received.load(Ordering::Relaxed);
    wait_for(at_restart + (4 << 20));
    stop.store(true, Ordering::Relaxed);
    client.join().expect("client");
    server.join().expect("server");

    // An upgrade (a different object than the pinned one): the agent loads and re-pins the
    // programs and atomically replaces every endpoint's filters; traffic keeps working.
    node.stop_agent(Signal::SIGTERM);
    std::fs::write(node.state_dir().join("datapath-object"), "0000000000000000").unwrap();
    node.start_agent();
    let status = node.berthctl(&["status"]);
    assert_eq!(status["datapath"]["adopted"], false, "{status}");
    assert!(a.ping(&ip_b), "traffic after program replacement");

    // The adopted datapath serves new pods too, and counters survived the restarts.
    let c = Pod::new();
    node.add(&c);
    assert!(c.ping(&ip_b));
    let eps = node.berthctl(&["endpoints"]);
    let b_ep = eps
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == format!("{ip_b}/32"))
        .unwrap()
        .clone();
    assert!(b_ep["rxBytes"].as_u64().unwrap() > 8 << 20, "{b_ep}");
}

/// 500 ADD/DEL cycles in one pod namespace, then 12 ADDs whose plugin is killed (`kill -9`) at
/// varying points; returns the victims' namespaces (their sandboxes, still alive).
fn churn_then_kill_adds(node: &Node) -> Vec<Pod> {
    let pod = Pod::new();
    let netns = pod.ns.path().to_str().unwrap().to_string();
    for i in 0..500 {
        let cid = format!("churn{i}");
        let add = node.verb("ADD", &cid, Some(&netns), "eth0");
        assert_eq!(add.code, 0, "cycle {i} ADD: {add:?}");
        let del = node.verb("DEL", &cid, Some(&netns), "eth0");
        assert_eq!(del.code, 0, "cycle {i} DEL: {del:?}");
        // The agent deletes the pair in the background, racing the plugin's rename of the pod
        // side: a vanished interface is what DEL wants, never an error.
        assert!(
            !del.stderr.contains("berth: DEL"),
            "cycle {i} DEL: {}",
            del.stderr
        );
    }
    let left = node.settled_host_links(0);
    assert!(
        left.is_empty(),
        "interfaces left after 500 cycles: {left:?}"
    );
    assert_eq!(node.berthctl(&["status"])["ipam"]["allocated"], 0);

    // kill -9 of the plugin in the middle of ADDs, at varying points.
    let victims: Vec<Pod> = (0..12).map(|_| Pod::new()).collect();
    for (i, v) in victims.iter().enumerate() {
        let mut child = node
            .ns
            .command(workspace_bin("berth").to_str().unwrap())
            .env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &v.cid)
            .env("CNI_NETNS", v.ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(node.conf().as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_micros(300 * i as u64));
        let _ = child.kill();
        let _ = child.wait();
    }
    victims
}

#[test]
fn churn_and_killed_adds_leak_nothing_after_gc() {
    let node = Node::new();
    let _victims = churn_then_kill_adds(&node);
    let keep = Pod::new();
    let keep_ip = node.add(&keep);

    let mut gc_conf: Value = serde_json::from_str(&node.conf()).unwrap();
    gc_conf["cni.dev/valid-attachments"] = json!([{"containerID": keep.cid, "ifname": "eth0"}]);
    let gc = node.cni(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &gc_conf.to_string(),
    );
    assert_eq!(gc.code, 0, "{gc:?}");

    let eps = node.berthctl(&["endpoints"]);
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), 1, "leaked endpoints: {eps:?}");
    assert_eq!(eps[0]["containerID"], keep.cid.as_str());
    let left = node.settled_host_links(1);
    assert_eq!(left.len(), 1, "leaked interfaces: {left:?}");
    assert_eq!(node.endpoint_map_entries(), 1);
    assert_eq!(node.berthctl(&["status"])["ipam"]["allocated"], 1);
    assert!(keep.ping(NODE_IP));
    assert!(
        node.ns
            .exec(&["ping", "-c", "1", "-W", "2", &keep_ip])
            .status
            .success()
    );
}

#[test]
fn thirty_two_parallel_adds_get_distinct_reachable_addresses() {
    let node = Node::new();
    let pods: Vec<Pod> = (0..32).map(|_| Pod::new()).collect();
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = pods.iter().map(|p| s.spawn(|| node.add(p))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let mut sorted = ips.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 32, "duplicate addresses: {ips:?}");
    for (i, ip) in ips.iter().enumerate().skip(1) {
        let out = pods[0].ns.exec(&["ping", "-c", "1", "-W", "2", ip]);
        assert!(out.status.success(), "pod 0 cannot reach pod {i} at {ip}");
    }
    for ip in &ips {
        assert!(
            node.ns
                .exec(&["ping", "-c", "1", "-W", "2", ip])
                .status
                .success(),
            "host cannot reach {ip}"
        );
    }
    assert_eq!(node.endpoint_map_entries(), 32);
}

#[test]
fn pod_destroyed_without_del_is_released_by_the_agent() {
    let node = Node::new();
    let keep = Pod::new();
    let gone = Pod::new();
    node.add(&keep);
    node.add(&gone);
    // The runtime destroys the sandbox without a DEL (and, before CNI 1.1, never sends GC).
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.berthctl(&["status"])["ipam"]["allocated"] != 1 {
        assert!(
            Instant::now() < deadline,
            "vanished pod's address never released:\n{}",
            node.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(node.endpoint_map_entries(), 1);
    let eps = node.berthctl(&["endpoints"]);
    assert_eq!(eps[0]["containerID"], keep.cid.as_str());
}

#[test]
fn second_agent_on_the_same_state_dir_is_refused() {
    let mut node = Node::new();
    let first_pid = node.agent_pid().expect("agent running");
    let other = tempfile::Builder::new()
        .prefix("berth-second-")
        .tempdir()
        .unwrap();
    let pin_root =
        std::path::PathBuf::from("/sys/fs/bpf").join(berth_tests::netns::unique_name("berth-t"));
    let log = other.path().join("stderr.log");
    let started = Instant::now();
    let mut second = node
        .ns
        .command(workspace_bin("berth-agent").to_str().unwrap())
        .args(["--config", "/dev/null", "--socket"])
        .arg(other.path().join("agent.sock"))
        .arg("--state-dir")
        .arg(node.state_dir())
        .arg("--cni-state-dir")
        .arg(other.path().join("cni"))
        .arg("--pin-root")
        .arg(&pin_root)
        .args(["--pod-cidr", &node.pod_cidr, "--no-ip-forward"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn second berth-agent");
    // Owns the second agent: killed and its pins removed even when an assertion fails.
    struct Guard(std::process::Child, std::path::PathBuf);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let guard = Guard(second, pin_root.clone());
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("a second agent on the same state directory kept running:\n{stderr}")
    });
    assert!(!status.success(), "second agent exited 0:\n{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "second agent took {:?} to give up",
        started.elapsed()
    );
    let dir = node.state_dir().display().to_string();
    assert!(
        stderr.contains(&dir) && stderr.contains(&format!("PID {first_pid}")),
        "error does not name the state directory {dir} and the holder PID {first_pid}:\n{stderr}"
    );
    // Refused before touching pins or state.
    assert!(
        !pin_root.exists(),
        "second agent created its pin root before failing"
    );
    drop(guard);

    // The first agent keeps serving.
    assert!(
        node.agent_running(),
        "first agent died:\n{}",
        node.log_tail()
    );
    assert_eq!(node.berthctl(&["status"])["datapath"]["loaded"], true);
    let pod = Pod::new();
    let ip = node.add(&pod);
    assert!(
        node.ns
            .exec(&["ping", "-c", "1", "-W", "2", &ip])
            .status
            .success()
    );
}

fn attachment(cid: &str) -> Option<Attachment> {
    Some(Attachment {
        container_id: cid.into(),
        ifname: "eth0".into(),
    })
}

#[test]
fn churn_and_killed_adds_leak_nothing_without_gc() {
    // A runtime that never sends GC (CNI < 1.1): the allocation lease and the vanished-pod sweep
    // must clean up on their own.
    let node = Node::with_args("10.2.0.0/24", &["--allocation-lease", "2"]);
    let victims = churn_then_kill_adds(&node);
    // A plugin stopped right after Allocate, deterministically (the kills above may or may not
    // land between Allocate and CreateEndpoint).
    match node.local(Op::Allocate(AllocateRequest {
        attachment: attachment("stalled"),
        ..Default::default()
    })) {
        local_response::Result::Allocate(_) => {}
        other => panic!("Allocate: {other:?}"),
    }
    let keep = Pod::new();
    let keep_ip = node.add(&keep);
    let allocated = || node.berthctl(&["status"])["ipam"]["allocated"].clone();
    assert!(
        allocated().as_u64().unwrap() >= 2,
        "the stalled allocation is held during its lease"
    );
    // The runtime tears the victims' sandboxes down: no DEL (their ADD never returned), no GC.
    drop(victims);
    let started = Instant::now();
    while allocated() != 1 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "leaked allocations never reclaimed: {}\n{}",
            node.berthctl(&["endpoints"]),
            node.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let eps = node.berthctl(&["endpoints"]);
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), 1, "leaked endpoints: {eps:?}");
    assert_eq!(eps[0]["containerID"], keep.cid.as_str());
    assert_eq!(eps[0]["state"], "ready");
    let left = node.settled_host_links(1);
    assert_eq!(left.len(), 1, "leaked interfaces: {left:?}");
    assert_eq!(node.endpoint_map_entries(), 1);
    // The stalled plugin's late CreateEndpoint fails cleanly: it rolls back, the runtime retries.
    match node.local(Op::CreateEndpoint(CreateEndpointRequest {
        attachment: attachment("stalled"),
        host_ifindex: 1,
        host_ifname: "bthstalled".into(),
        pod_mac: vec![2; 6],
        host_mac: vec![2; 6],
        netns: String::new(),
    })) {
        local_response::Result::Error(e) => assert_eq!(e.code(), Code::NotFound, "{e:?}"),
        other => panic!("CreateEndpoint after the lease: {other:?}"),
    }
    assert!(keep.ping(NODE_IP));
    assert!(
        node.ns
            .exec(&["ping", "-c", "1", "-W", "2", &keep_ip])
            .status
            .success()
    );
}

#[test]
fn full_pool_fails_add_but_not_status() {
    // A /28 holds 13 pod addresses; plugins stopped after Allocate hold them all.
    let node = Node::with_cidr("10.2.0.0/28");
    for i in 0..13 {
        match node.local(Op::Allocate(AllocateRequest {
            attachment: attachment(&format!("hold{i}")),
            ..Default::default()
        })) {
            local_response::Result::Allocate(_) => {}
            other => panic!("Allocate {i}: {other:?}"),
        }
    }
    assert_eq!(node.berthctl(&["status"])["ipam"]["allocated"], 13);
    // The node's network is fine: STATUS succeeds (a failing STATUS would make containerd 2 mark
    // the whole node NotReady); ADD itself says why it fails.
    let status = node.cni(&[("CNI_COMMAND", "STATUS")], &node.conf());
    assert_eq!(status.code, 0, "{status:?}");
    let pod = Pod::new();
    let add = node.verb(
        "ADD",
        &pod.cid,
        Some(pod.ns.path().to_str().unwrap()),
        "eth0",
    );
    assert_eq!(add.error_code(), 102, "{add:?}");
    assert!(node.host_links().is_empty(), "failed ADD left an interface");
    match node.local(Op::Release(ReleaseRequest {
        attachment: attachment("hold0"),
    })) {
        local_response::Result::Release(r) => assert!(r.released),
        other => panic!("Release: {other:?}"),
    }
    let ip = node.add(&pod);
    assert!(pod.ping(NODE_IP), "pod {ip} after a slot was freed");
}

#[test]
fn host_side_veth_has_no_ipv6() {
    let node = Node::new();
    let pod = Pod::new();
    let ip = node.add(&pod);
    assert!(pod.ping(NODE_IP));
    let links = node.host_links();
    assert_eq!(links.len(), 1, "{links:?}");
    let host_if = &links[0];
    // Read inside the node namespace: /proc/sys/net is per network namespace.
    let disabled = node.ns.exec_ok(&[
        "cat",
        &format!("/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6"),
    ]);
    assert_eq!(disabled.trim(), "1", "disable_ipv6 on {host_if}");
    let v6 = node
        .ns
        .exec_ok(&["ip", "-6", "addr", "show", "dev", host_if]);
    assert!(v6.trim().is_empty(), "{host_if} has IPv6 addresses: {v6}");
    let details = node
        .ns
        .exec_ok(&["ip", "-d", "link", "show", "dev", host_if]);
    assert!(
        details.contains("addrgenmode none"),
        "{host_if} still generates IPv6 addresses: {details}"
    );
    // IPv4 is untouched.
    assert!(
        node.ns
            .exec(&["ping", "-c", "1", "-W", "2", &ip])
            .status
            .success()
    );
}

/// The host-side name the plugin derives for `(cid, ifname)`.
fn host_ifname(cid: &str, ifname: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{cid}/{ifname}").as_bytes());
    format!("bth{}", &hex::encode(digest)[..12])
}

#[test]
fn add_replaces_a_stale_host_interface_and_reports_the_real_macs() {
    let node = Node::new();
    let pod = Pod::new();
    let netns = pod.ns.path().to_str().unwrap().to_string();
    // What an ADD killed after creating the pair leaves when the pod side went elsewhere: a host
    // interface of the attachment's name.
    let stale = host_ifname(&pod.cid, "eth0");
    node.ns.exec_ok(&[
        "ip",
        "link",
        "add",
        &stale,
        "type",
        "veth",
        "peer",
        "name",
        "stalepeer0",
    ]);
    let add = node.verb("ADD", &pod.cid, Some(&netns), "eth0");
    assert_eq!(add.code, 0, "{add:?}");
    assert!(pod.ping(NODE_IP));
    assert_eq!(node.host_links(), vec![stale.clone()]);
    let details = node
        .ns
        .exec_ok(&["ip", "-d", "link", "show", "dev", &stale]);
    assert!(details.contains("veth"), "{details}");
    // The result names the MACs the interfaces really have, and the agent's endpoint agrees.
    let result = add.json();
    let mac_of = |ns: &NetNs, dev: &str| -> String {
        let out = ns.exec_ok(&["ip", "-o", "link", "show", "dev", dev]);
        let mut words = out.split_whitespace();
        words.find(|w| *w == "link/ether");
        words.next().unwrap_or_default().to_string()
    };
    assert_eq!(result["interfaces"][0]["name"], stale.as_str());
    assert_eq!(
        result["interfaces"][0]["mac"],
        mac_of(&node.ns, &stale).as_str()
    );
    assert_eq!(
        result["interfaces"][1]["mac"],
        mac_of(&pod.ns, "eth0").as_str()
    );
    let eps = node.berthctl(&["endpoints"]);
    assert_eq!(eps[0]["hostInterface"], stale.as_str());
    assert_eq!(eps[0]["state"], "ready");
    // The same attachment again: CNI_IFNAME exists, nothing changes.
    let again = node.verb("ADD", &pod.cid, Some(&netns), "eth0");
    assert_eq!(again.error_code(), 101);
    assert!(pod.ping(NODE_IP));
    assert_eq!(node.berthctl(&["status"])["ipam"]["allocated"], 1);
}

fn read_frame(s: &mut impl Read) -> Option<Vec<u8>> {
    let mut head = [0u8; 8];
    s.read_exact(&mut head).ok()?;
    assert_eq!(&head[..4], b"BRT1");
    let mut body = vec![0u8; u32::from_be_bytes(head[4..].try_into().unwrap()) as usize];
    s.read_exact(&mut body).ok()?;
    Some(body)
}

fn write_frame(s: &mut impl Write, body: &[u8]) {
    let mut frame = b"BRT1".to_vec();
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    s.write_all(&frame).unwrap();
}

#[test]
fn add_falls_back_to_two_requests_with_an_agent_that_predates_add_endpoint() {
    use prost::Message;
    let node = Node::new();
    // An "older agent": a proxy in front of the real one that answers AddEndpoint as an agent
    // without it does (the op decodes as empty) and passes everything else on.
    let dir = tempfile::tempdir().unwrap();
    let old_socket = dir.path().join("old-agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&old_socket).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let agent = node.socket();
    {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut upstream = std::os::unix::net::UnixStream::connect(&agent).unwrap();
                while let Some(body) = read_frame(&mut conn) {
                    let req = LocalRequest::decode(body.as_slice()).unwrap();
                    let name = match &req.op {
                        Some(Op::AddEndpoint(_)) => "AddEndpoint",
                        Some(Op::Allocate(_)) => "Allocate",
                        Some(Op::CreateEndpoint(_)) => "CreateEndpoint",
                        Some(Op::Release(_)) => "Release",
                        _ => "other",
                    };
                    seen.lock().unwrap().push(name.into());
                    if name == "AddEndpoint" {
                        let resp = LocalResponse {
                            result: Some(local_response::Result::Error(LocalError {
                                code: Code::InvalidArgument as i32,
                                message: "invalid argument: empty request".into(),
                            })),
                        };
                        write_frame(&mut conn, &resp.encode_to_vec());
                        continue;
                    }
                    write_frame(&mut upstream, &body);
                    let answer = read_frame(&mut upstream).unwrap();
                    write_frame(&mut conn, &answer);
                }
            }
        });
    }
    let mut conf: Value = serde_json::from_str(&node.conf()).unwrap();
    conf["agentSocket"] = json!(old_socket);
    let pod = Pod::new();
    let netns = pod.ns.path().to_str().unwrap().to_string();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", pod.cid.as_str()),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    let add = node.cni(&env, &conf.to_string());
    assert_eq!(add.code, 0, "{add:?}");
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["AddEndpoint", "Allocate", "CreateEndpoint"]
    );
    assert!(pod.ping(NODE_IP));
    let eps = node.berthctl(&["endpoints"]);
    assert_eq!(eps[0]["state"], "ready", "{eps}");
    assert_eq!(
        eps[0]["hostInterface"],
        host_ifname(&pod.cid, "eth0").as_str()
    );
}

#[test]
fn status_shows_node_routing() {
    let node = Node::new();
    let status = node.berthctl(&["status"]);
    let routing = &status["routing"];
    assert_eq!(routing["podMtu"], 1500, "{status}");
    assert_eq!(routing["remotePodCidrs"], 0, "{status}");
    let text = Command::new(workspace_bin("berthctl"))
        .arg("--socket")
        .arg(node.socket())
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("routing ") && l.contains("pod MTU 1500")),
        "{text}"
    );
}
